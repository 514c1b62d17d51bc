//! Hostile to batches, written against the WIT bindings rather than `#[rule]`: `on-batch`
//! returns one result fewer than it was given, each with the payload `on-batch`;
//! `on-message` forwards the message with the payload `on-message`. The host must keep none
//! of the batch's results and give every message what `on-message` gives it.

#[cfg(target_family = "wasm")]
mod export {
    use edgegw_plugin_sdk::__private::bindings::{
        self,
        edgegw::rule::types::{Message, Output},
    };

    struct ShortBatch;

    fn output(payload: &str) -> Output {
        Output {
            topic: None,
            payload: payload.as_bytes().to_vec(),
        }
    }

    impl bindings::Guest for ShortBatch {
        fn init(_config: String) -> Result<(), String> {
            Ok(())
        }

        fn on_message(_msg: Message) -> Result<Vec<Output>, String> {
            Ok(vec![output("on-message")])
        }

        fn on_batch(msgs: Vec<Message>) -> Vec<Result<Vec<Output>, String>> {
            msgs.iter()
                .skip(1)
                .map(|_| Ok(vec![output("on-batch")]))
                .collect()
        }
    }

    bindings::export!(ShortBatch with_types_in edgegw_plugin_sdk::__private::bindings);
}
