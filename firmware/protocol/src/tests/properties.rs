//! Property tests: round trips for every message type, and arbitrary input never panics.

use std::collections::BTreeSet;
use std::vec::Vec;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

use super::strategies::message;
use crate::fuzz_logic::{
    check_frame_decoder, check_frame_round_trip, check_message, check_round_trip, decode_frames,
};
use crate::{
    DecodeError, FrameDecoder, Message, decode, decode_exact, encode_frame_to_vec, encode_to_vec,
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// encode → decode gives the same message, for every type with arbitrary field values;
    /// the encoding is canonical (1-byte length exactly when it fits).
    #[test]
    fn encode_then_decode_is_identity(message in message()) {
        let bytes = check_round_trip(&message);
        if !matches!(message, Message::Encapsulated(_)) {
            if bytes.len() < 256 {
                prop_assert_eq!(usize::from(bytes[0]), bytes.len());
            } else {
                prop_assert_eq!(bytes[0], 0x01);
                prop_assert_eq!(usize::from(u16::from_be_bytes([bytes[1], bytes[2]])), bytes.len());
            }
        }
    }
}

proptest! {
    /// Arbitrary bytes: `decode` never panics, and what it accepts round-trips.
    #[test]
    fn decode_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..600)) {
        check_message(&bytes);
    }

    /// Arbitrary bytes that start like a message (plausible length and type) reach deeper.
    #[test]
    fn decode_plausible_headers_never_panics(
        message_type in prop_oneof![0u8..=0x1D, Just(0xFE)],
        body in vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = std::vec![u8::try_from(body.len() + 2).unwrap(), message_type];
        bytes.extend_from_slice(&body);
        check_message(&bytes);
    }

    /// A valid message with one byte changed: decodes to something valid or fails cleanly.
    #[test]
    fn decode_mutated_messages_never_panics(
        message in message(),
        index in any::<proptest::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = encode_to_vec(&message).unwrap();
        let at = index.index(bytes.len());
        bytes[at] = byte;
        check_message(&bytes);
    }

    /// Every strict prefix of a message is incomplete, and says how much more it needs.
    #[test]
    fn prefixes_are_incomplete(message in message(), cut in any::<proptest::sample::Index>()) {
        let bytes = encode_to_vec(&message).unwrap();
        let prefix = &bytes[..cut.index(bytes.len())];
        match decode(prefix) {
            Err(DecodeError::Incomplete { needed, available }) => {
                prop_assert!(needed > available);
                prop_assert!(needed <= bytes.len());
                prop_assert_eq!(available, prefix.len());
            }
            other => prop_assert!(false, "prefix of {} bytes: {:?}", prefix.len(), other),
        }
    }

    /// The frame decoder, fed arbitrary bytes in arbitrary chunks, never panics and reports
    /// the same as when fed everything at once.
    #[test]
    fn frame_decoder_arbitrary_chunks_never_panics(
        bytes in vec(any::<u8>(), 0..1200),
        chunks in vec(1usize..64, 1..16),
    ) {
        check_frame_decoder(&bytes);
        prop_assert_eq!(decode_frames(&bytes, &chunks), decode_frames(&bytes, &[usize::MAX]));
    }

    /// Noise that contains mostly delimiters and short COBS blocks (the nasty kind).
    #[test]
    fn frame_decoder_delimiter_heavy_noise_never_panics(
        bytes in vec(prop_oneof![Just(0u8), 1u8..4, any::<u8>()], 0..600),
        chunks in vec(1usize..8, 1..8),
    ) {
        check_frame_decoder(&bytes);
        prop_assert_eq!(decode_frames(&bytes, &chunks), decode_frames(&bytes, &[usize::MAX]));
    }

    /// Any payload survives framing whatever the chunking; noise before a delimiter does not
    /// hurt the frame after it.
    #[test]
    fn frame_round_trip_after_noise(payload in vec(any::<u8>(), 0..400)) {
        check_frame_round_trip(&payload);
    }

    /// Messages framed back to back, fed in arbitrary chunks after arbitrary noise and a
    /// delimiter, all come out in order.
    #[test]
    fn message_stream_after_noise_resynchronises(
        noise in vec(any::<u8>(), 0..300),
        messages in vec(message(), 1..6),
        chunks in vec(1usize..100, 1..8),
    ) {
        let mut wire = noise;
        wire.push(crate::DELIMITER);
        for message in &messages {
            wire.extend(encode_frame_to_vec(&encode_to_vec(message).unwrap()));
        }
        let mut decoder = FrameDecoder::<4096>::new();
        let mut received = Vec::new();
        let mut rest = &wire[..];
        let mut sizes = chunks.iter().copied().cycle();
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(sizes.next().unwrap().min(rest.len()));
            rest = tail;
            let mut frames = decoder.feed(chunk);
            while let Some(outcome) = frames.next_frame() {
                received.push(outcome.map(<[u8]>::to_vec));
            }
        }
        let tail = &received[received.len().saturating_sub(messages.len())..];
        prop_assert_eq!(tail.len(), messages.len());
        for (outcome, message) in tail.iter().zip(&messages) {
            let frame = outcome.as_ref().map_err(|error| TestCaseError::fail(std::format!("{error}")))?;
            prop_assert_eq!(&decode_exact(frame).unwrap(), message);
        }
    }
}

/// The message strategy really produces every message type (so the round trip covers all).
#[test]
fn strategy_covers_every_message_type() {
    let mut runner = TestRunner::deterministic();
    let strategy = message();
    let mut seen = BTreeSet::new();
    for _ in 0..4000 {
        let message = strategy.new_tree(&mut runner).unwrap().current();
        seen.insert(message.message_type().to_byte());
        if let Message::Encapsulated(encapsulated) = message {
            seen.insert(
                encapsulated
                    .decode_message()
                    .unwrap()
                    .message_type()
                    .to_byte(),
            );
        }
    }
    let all: BTreeSet<u8> = (0..=0xFF)
        .filter(|&byte| crate::MessageType::from_byte(byte).is_some())
        .collect();
    assert_eq!(all.len(), 28);
    assert_eq!(seen, all);
}
