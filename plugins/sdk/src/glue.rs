//! What the `#[rule]` and `#[init]` expansions call. Not a public API.

use crate::{Error, Output};
use std::fmt::Display;
use std::marker::PhantomData;

#[cfg(target_family = "wasm")]
pub use wit_bindgen;

/// The WIT bindings of the `rule` world (WebAssembly builds only).
#[cfg(target_family = "wasm")]
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "edgegw:rule/rule",
        pub_export_macro: true,
        default_bindings_module: "::edgegw_plugin_sdk::__private::bindings",
        runtime_path: "::edgegw_plugin_sdk::__private::wit_bindgen::rt",
    });
}

/// Implemented by `#[init]` for the plugin type.
pub trait Init {
    fn init(config: &str) -> Result<(), String>;
}

/// Picks the `#[init]` function when there is one, else accepts any config (autoref
/// dispatch: the by-trait impl is found one auto-reference earlier than the default one).
pub struct InitProbe<T>(PhantomData<T>);

impl<T> InitProbe<T> {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

pub trait InitByTrait {
    fn run(&self, config: &str) -> Result<(), String>;
}

impl<T: Init> InitByTrait for InitProbe<T> {
    fn run(&self, config: &str) -> Result<(), String> {
        T::init(config)
    }
}

pub trait InitByDefault {
    fn run(&self, config: &str) -> Result<(), String>;
}

impl<T> InitByDefault for &InitProbe<T> {
    fn run(&self, _config: &str) -> Result<(), String> {
        Ok(())
    }
}

/// Decodes the config JSON into the `#[init]` function's parameter type and calls it.
pub fn init<C, E>(config: &str, function: fn(C) -> Result<(), E>) -> Result<(), String>
where
    C: serde::de::DeserializeOwned,
    E: Display,
{
    let config: C = serde_json::from_str(config).map_err(|e| format!("config: {e}"))?;
    function(config).map_err(|e| e.to_string())
}

/// The result of the author's rule function, with the failing message's topic on errors.
pub fn finish<E: Into<Error>>(
    topic: String,
    result: Result<Vec<Output>, E>,
) -> Result<Vec<Output>, Error> {
    result.map_err(|e| e.into().or_topic(topic))
}

/// The result of the author's rule function as the export returns it: the host adds the
/// message's topic to errors.
pub fn finish_in_host<E: Into<Error>>(
    result: Result<Vec<Output>, E>,
) -> Result<Vec<Output>, Error> {
    result.map_err(Into::into)
}

#[cfg(target_family = "wasm")]
mod wit {
    use super::bindings::edgegw::rule::types;
    use crate::{Message, Output};

    impl From<types::Message> for Message {
        fn from(m: types::Message) -> Self {
            Self {
                topic: m.topic,
                payload: m.payload,
                qos: m.qos,
                retain: m.retain,
                content_type: m.content_type,
                user_properties: m.user_properties,
            }
        }
    }

    impl From<Output> for types::Output {
        fn from(o: Output) -> Self {
            Self {
                topic: o.topic,
                payload: o.payload,
            }
        }
    }
}

/// `Guest::on_message`: WIT types in and out, the author's function in between.
#[cfg(target_family = "wasm")]
pub fn on_message(
    msg: bindings::edgegw::rule::types::Message,
    rule: fn(crate::Message) -> Result<Vec<Output>, Error>,
) -> Result<Vec<bindings::edgegw::rule::types::Output>, String> {
    match rule(msg.into()) {
        Ok(outputs) => Ok(outputs.into_iter().map(Into::into).collect()),
        Err(error) => Err(error.into_message()),
    }
}

/// `Guest::on_batch`: the author's function for each message in turn, each result as
/// `on_message` would give it.
#[cfg(target_family = "wasm")]
pub fn on_batch(
    msgs: Vec<bindings::edgegw::rule::types::Message>,
    rule: fn(crate::Message) -> Result<Vec<Output>, Error>,
) -> Vec<Result<Vec<bindings::edgegw::rule::types::Output>, String>> {
    msgs.into_iter().map(|msg| on_message(msg, rule)).collect()
}
