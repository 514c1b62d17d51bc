//! The checks the cargo-fuzz target (`fuzz/fuzz_targets/decode.rs`) and the property tests
//! run on arbitrary bytes. They panic when an invariant of the crate breaks, which is what a
//! fuzzer reports. Compiled with the `fuzzing` feature (and in tests) only.

use alloc::vec::Vec;

use crate::{
    DecodeError, EncodeError, FrameDecoder, FrameError, Message, decode, decode_exact, encode,
    encode_frame_to_vec, encoded_len,
};

/// Receive buffer for the frame checks: small, so that oversize frames are exercised too.
const FRAME_CAPACITY: usize = 256;

/// Runs every check on `data`.
pub fn decode_everything(data: &[u8]) {
    check_message(data);
    check_frame_decoder(data);
    check_frame_round_trip(data);
}

/// `decode` never panics; what it decodes re-encodes and decodes back to the same message.
pub fn check_message(data: &[u8]) {
    let exact = decode_exact(data);
    let Ok((message, consumed)) = decode(data) else {
        assert!(exact.is_err(), "decode_exact accepted what decode refused");
        return;
    };
    assert!(
        (2..=data.len()).contains(&consumed),
        "consumed {consumed} of {}",
        data.len()
    );
    match exact {
        Ok(exact) => {
            assert_eq!(consumed, data.len());
            assert_eq!(exact, message);
        }
        Err(error) => assert_eq!(
            error,
            DecodeError::TrailingBytes {
                consumed,
                available: data.len()
            }
        ),
    }
    let encoded = check_round_trip(&message);
    // Output is canonical, so never longer than what was read.
    assert!(encoded.len() <= consumed, "{} > {consumed}", encoded.len());
    if let Message::Encapsulated(encapsulated) = message {
        let inner = encapsulated
            .decode_message()
            .expect("a decoded encapsulation holds a valid message");
        check_round_trip(&inner);
    }
}

/// Encodes `message` (which must be encodable), decodes it back, compares; returns the bytes.
pub fn check_round_trip(message: &Message<'_>) -> Vec<u8> {
    let length = encoded_len(message).expect("message encodes");
    let mut buffer = alloc::vec![0; length];
    let written = encode(message, &mut buffer).expect("message encodes");
    assert_eq!(written, length, "encoded_len disagrees with encode");
    let (decoded, consumed) = decode(&buffer).expect("encoded message decodes");
    assert_eq!(consumed, length);
    assert_eq!(&decoded, message);
    if let Some(short) = length.checked_sub(1) {
        assert!(
            matches!(
                encode(message, &mut buffer[..short]),
                Err(EncodeError::BufferTooSmall { .. })
            ),
            "encoding into a buffer one byte short must fail cleanly"
        );
    }
    buffer
}

/// What a decoder made of a stream: frames (owned) and errors, in order.
pub type Outcomes = Vec<Result<Vec<u8>, FrameError>>;

/// Feeds `data` to a fresh decoder in chunks of the given sizes (cycled; sizes of 0 count
/// as 1) and collects everything it reports.
pub fn decode_frames(data: &[u8], chunk_sizes: &[usize]) -> Outcomes {
    let mut decoder = FrameDecoder::<FRAME_CAPACITY>::new();
    let mut outcomes = Vec::new();
    let mut rest = data;
    let mut sizes = chunk_sizes.iter().copied().cycle();
    while !rest.is_empty() {
        let size = sizes.next().unwrap_or(usize::MAX).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        let mut frames = decoder.feed(chunk);
        while let Some(outcome) = frames.next_frame() {
            outcomes.push(outcome.map(<[u8]>::to_vec));
        }
        assert!(frames.remaining().is_empty());
    }
    outcomes
}

/// The decoder never panics, reports the same whatever the chunking, and every frame it
/// passes is at most its capacity; the messages in them go through [`check_message`].
pub fn check_frame_decoder(data: &[u8]) {
    let whole = decode_frames(data, &[usize::MAX]);
    let sizes: Vec<usize> = data.iter().take(16).map(|&b| usize::from(b % 17)).collect();
    assert_eq!(
        decode_frames(data, &sizes),
        whole,
        "chunking changed the outcome"
    );
    assert_eq!(
        decode_frames(data, &[1]),
        whole,
        "byte-by-byte changed the outcome"
    );
    for frame in whole.iter().flatten() {
        assert!(frame.len() + crate::CRC_LEN <= FRAME_CAPACITY);
        check_message(frame);
    }
}

/// Any bytes survive framing, and a good frame after noise gets through: noise, a
/// delimiter, then the frame of `data` decode to the frame of `data` last.
pub fn check_frame_round_trip(data: &[u8]) {
    let payload = data.get(..FRAME_CAPACITY - crate::CRC_LEN).unwrap_or(data);
    let frame = encode_frame_to_vec(payload);
    assert_eq!(frame.last(), Some(&crate::DELIMITER));
    assert!(!frame[..frame.len() - 1].contains(&crate::DELIMITER));
    assert!(frame.len() <= crate::max_frame_len(payload.len()));
    assert_eq!(decode_frames(&frame, &[1]), [Ok(payload.to_vec())]);

    let mut stream = data.to_vec();
    stream.push(crate::DELIMITER);
    stream.extend_from_slice(&frame);
    let outcomes = decode_frames(&stream, &[7]);
    assert_eq!(outcomes.last(), Some(&Ok(payload.to_vec())));
}
