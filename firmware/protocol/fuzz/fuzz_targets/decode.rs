//! Arbitrary bytes through the message decoder (decoded messages must re-encode and decode
//! back to themselves) and through the frame decoder (in several chunkings, which must agree).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgegw_protocol::fuzz_logic::decode_everything(data);
});
