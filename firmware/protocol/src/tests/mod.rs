//! Codec tests: known byte vectors per message type (laid out as in the spec, §5.4),
//! error cases, and property tests.

mod errors;
mod properties;
mod strategies;
mod vectors;

use std::vec::Vec;

use crate::{Message, decode, decode_exact, encode, encoded_len};

/// `bytes` and `message` are the same thing: decoding gives the message (using every byte),
/// encoding gives the bytes.
#[track_caller]
fn assert_vector(bytes: &[u8], message: Message<'_>) {
    assert_eq!(decode(bytes), Ok((message, bytes.len())), "decode");
    assert_eq!(decode_exact(bytes), Ok(message), "decode_exact");
    assert_eq!(encoded_len(&message), Ok(bytes.len()), "encoded_len");
    let mut out = [0xAAu8; 1024];
    let written = encode(&message, &mut out).expect("encode");
    assert_eq!(&out[..written], bytes, "encode");
}

/// Concatenates byte strings (a header and a variable part, say).
fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}
