//! Emits, for every message, one output whose payload describes every field of the message as
//! the plugin received it (JSON): the host's tests compare what `on-message` and `on-batch`
//! deliver, and what the host lifts from each.
//!
//! Topics under `error/` get an error naming the topic; topics under `many/` get, after the
//! description, an output to `ünï/<topic>` with an empty payload and one to the empty topic
//! with the message's payload.

use edgegw_plugin_sdk::{Error, Message, Output};

#[edgegw_plugin_sdk::rule]
fn on_message(msg: Message) -> Result<Vec<Output>, Error> {
    if msg.topic.starts_with("error/") {
        return Err(Error::new(format!("refused «{}»", msg.topic)));
    }
    let mut outputs = vec![Output::json(&serde_json::json!({
        "topic": msg.topic,
        "payload": msg.payload,
        "qos": msg.qos,
        "retain": msg.retain,
        "content_type": msg.content_type,
        "user_properties": msg.user_properties,
    }))?];
    if msg.topic.starts_with("many/") {
        outputs.push(Output::new(Vec::new()).to_topic(format!("ünï/{}", msg.topic)));
        outputs.push(Output::new(msg.payload).to_topic(""));
    }
    Ok(outputs)
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
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn errors_and_extra_outputs_on_their_topics() {
        let error = on_message(Message::new("error/x", "p")).unwrap_err();
        assert!(error.message().contains("refused «error/x»"), "{error:?}");
        let out = on_message(Message::new("many/x", "p")).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[1], Output::new(Vec::new()).to_topic("ünï/many/x"));
        assert_eq!(out[2], Output::new("p").to_topic(""));
    }
}
