//! Hostile: loops forever on a message whose payload is `loop`, sleeps for a minute on `sleep`;
//! forwards anything else. The host must stop both (time limit; sleeping traps) and keep the
//! stage usable.

use edgegw_plugin_sdk::{Error, Message, Output};

#[edgegw_plugin_sdk::rule]
fn on_message(msg: Message) -> Result<Vec<Output>, Error> {
    match msg.payload.as_slice() {
        b"loop" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        b"sleep" => std::thread::sleep(std::time::Duration::from_secs(60)),
        _ => {}
    }
    Ok(vec![msg.into()])
}
