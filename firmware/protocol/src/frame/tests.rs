use std::vec::Vec;

use super::*;

/// COBS alone (no CRC), with the trailing delimiter.
fn cobs(input: &[u8]) -> Vec<u8> {
    let mut out = std::vec![0; max_frame_len(input.len())];
    let mut encoder = CobsEncoder {
        out: &mut out,
        code_position: 0,
        position: 1,
        code: 1,
    };
    for &byte in input {
        encoder.push(byte).unwrap();
    }
    let n = encoder.finish().unwrap();
    out.truncate(n);
    out
}

fn outcomes<const N: usize>(
    decoder: &mut FrameDecoder<N>,
    input: &[u8],
) -> Vec<Result<Vec<u8>, FrameError>> {
    let mut frames = decoder.feed(input);
    let mut outcomes = Vec::new();
    while let Some(outcome) = frames.next_frame() {
        outcomes.push(outcome.map(<[u8]>::to_vec));
    }
    outcomes
}

fn frame(message: &[u8]) -> Vec<u8> {
    encode_frame_to_vec(message)
}

#[test]
fn cobs_known_vectors() {
    // The usual published examples (Cheshire & Baker's encoding).
    let ramp = |from: u8, to: u8| (from..=to).collect::<Vec<u8>>();
    let cases: [(Vec<u8>, Vec<u8>); 11] = [
        (std::vec![0x00], std::vec![0x01, 0x01, 0x00]),
        (std::vec![0x00, 0x00], std::vec![0x01, 0x01, 0x01, 0x00]),
        (
            std::vec![0x00, 0x11, 0x00],
            std::vec![0x01, 0x02, 0x11, 0x01, 0x00],
        ),
        (
            std::vec![0x11, 0x22, 0x00, 0x33],
            std::vec![0x03, 0x11, 0x22, 0x02, 0x33, 0x00],
        ),
        (
            std::vec![0x11, 0x22, 0x33, 0x44],
            std::vec![0x05, 0x11, 0x22, 0x33, 0x44, 0x00],
        ),
        (
            std::vec![0x11, 0x00, 0x00, 0x00],
            std::vec![0x02, 0x11, 0x01, 0x01, 0x01, 0x00],
        ),
        (
            ramp(0x01, 0xFE),
            [&[0xFF][..], &ramp(0x01, 0xFE), &[0x00]].concat(),
        ),
        (
            [&[0x00][..], &ramp(0x01, 0xFE)].concat(),
            [&[0x01, 0xFF][..], &ramp(0x01, 0xFE), &[0x00]].concat(),
        ),
        (
            ramp(0x01, 0xFF),
            [&[0xFF][..], &ramp(0x01, 0xFE), &[0x02, 0xFF, 0x00]].concat(),
        ),
        (
            [&ramp(0x02, 0xFF)[..], &[0x00]].concat(),
            [&[0xFF][..], &ramp(0x02, 0xFF), &[0x01, 0x01, 0x00]].concat(),
        ),
        (
            [&ramp(0x03, 0xFF)[..], &[0x00, 0x01]].concat(),
            [&[0xFE][..], &ramp(0x03, 0xFF), &[0x02, 0x01, 0x00]].concat(),
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(cobs(&input), expected, "COBS of {input:02X?}");
        assert!(expected.len() <= max_frame_len(input.len()));
        // The decoder undoes it (with a CRC appended, as on the wire).
        let with_crc = [&input[..], &crc16(&input).to_be_bytes()].concat();
        let mut decoder = FrameDecoder::<512>::new();
        assert_eq!(
            outcomes(&mut decoder, &cobs(&with_crc)),
            [Ok(input.clone())]
        );
    }
}

#[test]
fn known_frames() {
    // PINGRESP: CRC 0x19BB, no zero to stuff.
    assert_eq!(frame(&[0x02, 0x17]), [0x05, 0x02, 0x17, 0x19, 0xBB, 0x00]);
    // DISCONNECT for 60 s: the zero in the duration is stuffed.
    assert_eq!(
        frame(&[0x04, 0x18, 0x00, 0x3C]),
        [0x03, 0x04, 0x18, 0x04, 0x3C, 0x53, 0x2C, 0x00]
    );
}

#[test]
fn decodes_a_frame_fed_in_any_chunks() {
    let wire = frame(&[0x04, 0x18, 0x00, 0x3C]);
    for split in 0..=wire.len() {
        let mut decoder = FrameDecoder::<16>::new();
        let mut all = outcomes(&mut decoder, &wire[..split]);
        all.extend(outcomes(&mut decoder, &wire[split..]));
        assert_eq!(
            all,
            [Ok(std::vec![0x04, 0x18, 0x00, 0x3C])],
            "split at {split}"
        );
    }
}

#[test]
fn several_frames_in_one_chunk() {
    let wire = [frame(b"\x02\x17"), frame(b"\x02\x16"), frame(b"")].concat();
    let mut decoder = FrameDecoder::<16>::new();
    assert_eq!(
        outcomes(&mut decoder, &wire),
        [
            Ok(b"\x02\x17".to_vec()),
            Ok(b"\x02\x16".to_vec()),
            Ok(Vec::new())
        ]
    );
}

#[test]
fn empty_frames_are_ignored() {
    let mut decoder = FrameDecoder::<16>::new();
    assert_eq!(outcomes(&mut decoder, &[0, 0, 0]), []);
    let wire = [&[0, 0][..], &frame(b"\x02\x17"), &[0]].concat();
    assert_eq!(outcomes(&mut decoder, &wire), [Ok(b"\x02\x17".to_vec())]);
}

#[test]
fn bad_crc_is_reported_and_the_next_frame_gets_through() {
    let mut wire = frame(b"\x02\x17");
    wire[2] ^= 0x01; // 0x17 → 0x16 on the line
    wire.extend(frame(b"\x02\x17"));
    let mut decoder = FrameDecoder::<16>::new();
    assert_eq!(
        outcomes(&mut decoder, &wire),
        [
            Err(FrameError::CrcMismatch {
                computed: crc16(b"\x02\x16"),
                received: 0x19BB
            }),
            Ok(b"\x02\x17".to_vec())
        ]
    );
}

#[test]
fn bad_cobs_and_short_frames() {
    let mut decoder = FrameDecoder::<16>::new();
    // A code byte promising four more bytes, then the delimiter after one.
    assert_eq!(
        outcomes(&mut decoder, &[0x05, 0x11, 0x00]),
        [Err(FrameError::TruncatedCobsBlock { missing: 3 })]
    );
    assert_eq!(
        outcomes(&mut decoder, &[0x02, 0x11, 0x00]),
        [Err(FrameError::TooShort {
            length: 1,
            minimum: 2
        })]
    );
    assert_eq!(
        outcomes(&mut decoder, &[0x01, 0x00]),
        [Err(FrameError::TooShort {
            length: 0,
            minimum: 2
        })]
    );
}

#[test]
fn noise_then_a_valid_frame_resynchronises() {
    let good = frame(b"\x02\x17");
    let mut decoder = FrameDecoder::<16>::new();
    // Noise ended by a delimiter: dropped with an error, the frame after it is whole.
    let wire = [&[0x13, 0x37, 0xFF, 0x42, 0x00][..], &good].concat();
    let got = outcomes(&mut decoder, &wire);
    assert_eq!(got.len(), 2);
    assert!(got[0].is_err());
    assert_eq!(got[1], Ok(b"\x02\x17".to_vec()));
    // Noise glued to the front of a frame spoils that frame only.
    let wire = [&[0x13, 0x37][..], &good, &good].concat();
    let got = outcomes(&mut decoder, &wire);
    assert_eq!(got.len(), 2);
    assert!(got[0].is_err());
    assert_eq!(got[1], Ok(b"\x02\x17".to_vec()));
    // Starting mid-frame (the first bytes were lost).
    let wire = [&good[3..], &good].concat();
    let got = outcomes(&mut decoder, &wire);
    assert_eq!(got.last(), Some(&Ok(b"\x02\x17".to_vec())));
}

#[test]
fn oversize_frames_are_reported_once_and_skipped() {
    let mut decoder = FrameDecoder::<8>::new();
    // 6 bytes of message + 2 of CRC: exactly the capacity.
    let fits = [1, 2, 3, 4, 5, 6];
    assert_eq!(outcomes(&mut decoder, &frame(&fits)), [Ok(fits.to_vec())]);
    let big = [0x55; 40];
    let wire = [frame(&big), frame(&fits)].concat();
    assert_eq!(
        outcomes(&mut decoder, &wire),
        [Err(FrameError::Oversize { capacity: 8 }), Ok(fits.to_vec())]
    );
    // Endless noise without a delimiter: one error, then nothing until a delimiter.
    assert_eq!(
        outcomes(&mut decoder, &[0x42; 100]),
        [Err(FrameError::Oversize { capacity: 8 })]
    );
    assert_eq!(outcomes(&mut decoder, &[0x42; 100]), []);
    assert!(decoder.is_mid_frame());
    assert_eq!(outcomes(&mut decoder, &[0x00]), []);
    assert!(!decoder.is_mid_frame());
    assert_eq!(outcomes(&mut decoder, &frame(&fits)), [Ok(fits.to_vec())]);
}

#[test]
fn reset_drops_a_partial_frame() {
    let good = frame(b"\x02\x17");
    let mut decoder = FrameDecoder::<16>::new();
    assert_eq!(outcomes(&mut decoder, &good[..3]), []);
    assert!(decoder.is_mid_frame());
    decoder.reset();
    assert_eq!(outcomes(&mut decoder, &good), [Ok(b"\x02\x17".to_vec())]);
}

#[test]
fn decode_reports_what_it_consumed() {
    let wire = [frame(b"\x02\x17"), frame(b"\x02\x16")].concat();
    let mut decoder = FrameDecoder::<16>::new();
    let (consumed, outcome) = decoder.decode(&wire);
    assert_eq!(consumed, 6);
    assert_eq!(outcome, Some(Ok(&b"\x02\x17"[..])));
    let (consumed, outcome) = decoder.decode(&wire[6..9]);
    assert_eq!((consumed, outcome), (3, None));
    let mut frames = decoder.feed(&wire[9..]);
    assert_eq!(frames.next_frame(), Some(Ok(&b"\x02\x16"[..])));
    assert!(frames.remaining().is_empty());
    assert_eq!(frames.next_frame(), None);
}

#[test]
fn encode_frame_needs_room() {
    let message = [0x55; 600];
    let needed = max_frame_len(message.len());
    assert_eq!(needed, 600 + 2 + 602 / 254 + 2);
    let mut out = std::vec![0; needed];
    let n = encode_frame(&message, &mut out).unwrap();
    assert_eq!(n, needed, "no zero in the message: the bound is exact");
    assert_eq!(
        encode_frame(&message, &mut out[..n - 1]),
        Err(EncodeError::BufferTooSmall {
            needed,
            available: n - 1
        })
    );
    assert_eq!(
        encode_frame(&[], &mut []),
        Err(EncodeError::BufferTooSmall {
            needed: 4,
            available: 0
        })
    );
}
