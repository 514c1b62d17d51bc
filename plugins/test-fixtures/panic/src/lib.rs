//! Hostile: panics (a trap) on a message whose payload is `panic`. Any other message gets
//! `{"instance_calls": n, "stage_calls": m}`: calls counted in the instance's memory (reset
//! when the host re-creates the instance) and in the host's kv store (kept).

use edgegw_plugin_sdk::{Error, Message, Output, kv};
use std::cell::Cell;

thread_local! {
    static CALLS: Cell<u64> = const { Cell::new(0) };
}

#[edgegw_plugin_sdk::rule]
fn on_message(msg: Message) -> Result<Vec<Output>, Error> {
    let stage_calls = kv::get_json::<u64>("calls").unwrap_or(0) + 1;
    kv::set_json("calls", &stage_calls)?;
    if msg.payload == b"panic" {
        panic!("asked to panic on {}", msg.topic);
    }
    let instance_calls = CALLS.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    Ok(vec![Output::json(&serde_json::json!({
        "instance_calls": instance_calls,
        "stage_calls": stage_calls,
    }))?])
}
