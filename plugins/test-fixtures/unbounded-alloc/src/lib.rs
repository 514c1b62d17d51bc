//! Hostile: allocates memory without bound on a message whose payload is
//! `alloc`; forwards anything else. The host must stop it (memory limit) and keep the stage
//! usable.

use edgegw_plugin_sdk::{Error, Message, Output};

#[edgegw_plugin_sdk::rule]
fn on_message(msg: Message) -> Result<Vec<Output>, Error> {
    if msg.payload == b"alloc" {
        // 1 MiB blocks, each touched once: the limit is reached in a few dozen memory.grow
        // calls, well within the time limit.
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut block = Vec::<u8>::with_capacity(1 << 20);
            block.push(1);
            hoard.push(std::hint::black_box(block));
        }
    }
    Ok(vec![msg.into()])
}
