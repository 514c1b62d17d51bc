//! Emits, for every message, one output whose payload describes every field of the message as
//! the plugin received it (JSON): the host's tests compare what `on-message` and `on-batch`
//! deliver.

use edgegw_plugin_sdk::{Error, Message, Output};

#[edgegw_plugin_sdk::rule]
fn on_message(msg: Message) -> Result<Vec<Output>, Error> {
    Output::json(&serde_json::json!({
        "topic": msg.topic,
        "payload": msg.payload,
        "qos": msg.qos,
        "retain": msg.retain,
        "content_type": msg.content_type,
        "user_properties": msg.user_properties,
    }))
    .map(|out| vec![out])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_every_field() {
        let mut msg = Message::new("a/b", "x");
        msg.qos = 1;
        msg.user_properties = vec![("k".into(), "v".into())];
        let out = on_message(msg).unwrap();
        assert_eq!(
            out[0].json_value().unwrap(),
            serde_json::json!({
                "topic": "a/b", "payload": [120], "qos": 1, "retain": false,
                "content_type": null, "user_properties": [["k", "v"]],
            })
        );
    }
}
