//! Hostile: emits `count` outputs per message (config `{"count": N}`, 5000 by default). The
//! host must refuse more than the plugin's `max_outputs`.

use edgegw_plugin_sdk::{Error, Message, Output};
use std::cell::Cell;

thread_local! {
    static COUNT: Cell<usize> = const { Cell::new(5000) };
}

#[derive(serde::Deserialize)]
struct Config {
    count: usize,
}

#[edgegw_plugin_sdk::init]
fn init(config: Option<Config>) -> Result<(), String> {
    if let Some(config) = config {
        COUNT.with(|c| c.set(config.count));
    }
    Ok(())
}

#[edgegw_plugin_sdk::rule]
fn on_message(msg: Message) -> Result<Vec<Output>, Error> {
    let count = COUNT.with(Cell::get);
    Ok((0..count)
        .map(|i| Output::new(msg.payload.clone()).to_topic(format!("{}/{i}", msg.topic)))
        .collect())
}
