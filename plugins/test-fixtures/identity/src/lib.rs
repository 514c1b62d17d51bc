//! Forwards every message unchanged: the smallest possible rule, used to measure the cost of
//! one rule stage.

use edgegw_plugin_sdk::{Error, Message, Output};

#[edgegw_plugin_sdk::rule]
fn on_message(msg: Message) -> Result<Vec<Output>, Error> {
    Ok(vec![msg.into()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_unchanged() {
        let out = on_message(Message::new("a/b", "x")).unwrap();
        assert_eq!(out, vec![Output::new("x")]);
    }
}
