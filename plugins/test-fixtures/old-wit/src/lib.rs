//! A plugin as the 0.1.0 SDK built it: the `edgegw:rule@0.1.0` world (no `on-batch`),
//! reduced to what it needs. The host must refuse it at load, naming both versions.

#[cfg(target_family = "wasm")]
#[allow(clippy::too_many_arguments)] // generated bindings, as in the SDK's
mod export {
    edgegw_plugin_sdk::__private::wit_bindgen::generate!({
        inline: r#"
            package edgegw:rule@0.1.0;

            interface types {
                record message {
                    topic: string,
                    payload: list<u8>,
                    qos: u8,
                    retain: bool,
                    content-type: option<string>,
                    user-properties: list<tuple<string, string>>,
                }
                record output {
                    topic: option<string>,
                    payload: list<u8>,
                }
            }

            interface host {
                now-ms: func() -> u64;
            }

            world rule {
                use types.{message, output};
                import host;
                export init: func(config: string) -> result<_, string>;
                export on-message: func(msg: message) -> result<list<output>, string>;
            }
        "#,
        world: "edgegw:rule/rule@0.1.0",
        runtime_path: "edgegw_plugin_sdk::__private::wit_bindgen::rt",
    });

    use edgegw::rule::host;

    struct OldWit;

    impl Guest for OldWit {
        fn init(_config: String) -> Result<(), String> {
            Ok(())
        }

        fn on_message(msg: Message) -> Result<Vec<Output>, String> {
            Ok(vec![Output {
                topic: None,
                payload: format!("{} at {}", msg.topic, host::now_ms()).into_bytes(),
            }])
        }
    }

    export!(OldWit);
}
