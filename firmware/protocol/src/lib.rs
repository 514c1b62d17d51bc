//! The node wire format of edgegw: the one definition shared by the gateway (`runtime/nodes`)
//! and the node firmware (`firmware/esp32c3`, `firmware/node-sim`).
//!
//! Two layers:
//!
//! - **Messages**: the MQTT-SN 1.2 codec (OASIS MQTT-SN v1.2), every message type including
//!   the forwarder encapsulation. [`decode`] reads a [`Message`] that borrows its strings and
//!   payloads from the input; [`encode`] writes one into a caller's buffer.
//! - **Frames**: on a byte stream (serial, BLE UART) each encoded message travels as
//!   `COBS(message ‖ CRC-16/CCITT-FALSE, big-endian) 0x00`. [`encode_frame`] writes one;
//!   [`FrameDecoder`] reassembles them from chunks of any size and resynchronises at the next
//!   0x00 after noise.
//!
//! ```
//! use edgegw_protocol::{decode_exact, encode, encode_frame, FrameDecoder, Message, Publish,
//!                       QoS, TopicId};
//!
//! let publish = Message::Publish(Publish {
//!     dup: false, qos: QoS::One, retain: false,
//!     topic: TopicId::Predefined(1), message_id: 7, data: br#"{"temp": 21.5}"#,
//! });
//! let mut message = [0u8; 64];
//! let n = encode(&publish, &mut message)?;
//! let mut wire = [0u8; 80];
//! let w = encode_frame(&message[..n], &mut wire)?;
//!
//! let mut decoder = FrameDecoder::<256>::new();
//! let mut frames = decoder.feed(&wire[..w]);
//! let frame = frames.next_frame().unwrap()?;
//! assert_eq!(decode_exact(frame)?, publish);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Invariants
//!
//! - No input makes [`decode`] or [`FrameDecoder`] panic, and nothing here allocates (the
//!   `alloc` feature only adds `*_to_vec` helpers). No `unsafe`, no dependencies.
//! - Every message [`encode`] accepts decodes back to an equal message; `encode` refuses the
//!   few values that would not (see [`EncodeError`]). A decoded message always re-encodes.
//! - [`FrameDecoder`] yields the same frames and errors whatever the chunking of its input.
//! - Decoding recurses at most once: an encapsulated message may not encapsulate another.
//!
//! # Limits
//!
//! - A message is at most [`MAX_MESSAGE_LEN`] (65 535) bytes, the reach of the 3-byte length
//!   field; a frame at most the decoder's capacity `N` (message + 2 CRC bytes).
//! - The codec checks the wire layout, not protocol rules: QoS −1 only with predefined or
//!   short topics, client ids of 1–23 characters, message id 0 for QoS 0, which messages a
//!   gateway or a client may send — those are the gateway's (and firmware's) to enforce and
//!   count.
//! - Strings (client id, topic names, will topic) must be UTF-8; payloads (PUBLISH data,
//!   will message, gateway address, wireless node id) are bytes.
//! - Lenient on input where nothing is lost: flag bits a message does not use, the
//!   encapsulation's reserved Ctrl bits, and a 3-byte length for a short message are
//!   accepted. The output is always canonical.

#![no_std]

// Tests use the `*_to_vec` helpers and `fuzz_logic` whatever the features.
#[cfg(any(feature = "alloc", test))]
extern crate alloc;
#[cfg(test)]
extern crate std;

mod crc;
mod decode;
mod encode;
mod error;
mod frame;
mod message;
mod types;

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz_logic;

#[cfg(test)]
mod tests;

pub use crc::{Crc16, crc16};
pub use decode::{decode, decode_exact};
#[cfg(any(feature = "alloc", test))]
pub use encode::encode_to_vec;
pub use encode::{encode, encode_encapsulated, encoded_len};
pub use error::{DecodeError, EncodeError, Field, FrameError};
#[cfg(any(feature = "alloc", test))]
pub use frame::encode_frame_to_vec;
pub use frame::{CRC_LEN, DELIMITER, FrameDecoder, Frames, encode_frame, max_frame_len};
pub use message::{
    Connect, Encapsulated, Message, Publish, Register, Subscribe, Unsubscribe, WillTopic,
};
pub use types::{Flags, MessageType, QoS, ReturnCode, Topic, TopicId, TopicIdType};

/// CONNECT's protocol id for MQTT-SN 1.2.
pub const PROTOCOL_ID: u8 = 0x01;

/// The longest message: the 3-byte length field's reach.
pub const MAX_MESSAGE_LEN: usize = 0xFFFF;

/// The longest wireless node id: the encapsulation's 1-byte length covers length, type,
/// Ctrl and the id.
pub const MAX_WIRELESS_NODE_ID_LEN: usize = 0xFF - 3;

/// The largest encapsulation radius (two Ctrl bits).
pub const MAX_RADIUS: u8 = 0b11;

/// A first byte of 0x01 announces the 3-byte length form.
const LONG_LENGTH_MARKER: u8 = 0x01;
