//! Framing for byte streams (serial, BLE UART): each message travels as
//! `COBS(message ‖ CRC-16/CCITT-FALSE big-endian) 0x00`.
//!
//! COBS removes every 0x00 from the frame body, so 0x00 only ever delimits frames: a receiver
//! that starts mid-stream, or loses bytes to noise, is back in sync at the next 0x00. The CRC
//! catches what COBS cannot (flipped bits, bytes lost inside a frame). Empty frames (two
//! delimiters in a row) are ignored, so a sender may write a delimiter before its first frame
//! after a (re)connect to cut off whatever half frame the receiver still holds.

use crate::crc::crc16;
use crate::error::{EncodeError, FrameError};

/// Ends every frame; never appears inside one.
pub const DELIMITER: u8 = 0x00;

/// The CRC after the message, inside the COBS encoding.
pub const CRC_LEN: usize = 2;

/// COBS starts a new block after at most 254 data bytes.
const MAX_BLOCK_DATA: u8 = 0xFE;

/// The longest frame [`encode_frame`] writes for a message of `message_len` bytes: COBS adds
/// one byte per started 254 bytes, plus the delimiter. A buffer this long always suffices.
pub const fn max_frame_len(message_len: usize) -> usize {
    let data = message_len.saturating_add(CRC_LEN);
    data.saturating_add(data / MAX_BLOCK_DATA as usize)
        .saturating_add(2)
}

/// Writes the frame for `message` (the bytes of one encoded message) at the start of `out`
/// and returns its length, delimiter included. When `out` is too short the error names
/// [`max_frame_len`] as the size needed.
pub fn encode_frame(message: &[u8], out: &mut [u8]) -> Result<usize, EncodeError> {
    let too_small = EncodeError::BufferTooSmall {
        needed: max_frame_len(message.len()),
        available: out.len(),
    };
    let crc = crc16(message).to_be_bytes();
    let mut cobs = CobsEncoder {
        out,
        code_position: 0,
        position: 1,
        code: 1,
    };
    for &byte in message.iter().chain(&crc) {
        cobs.push(byte).ok_or(too_small)?;
    }
    cobs.finish().ok_or(too_small)
}

/// [`encode_frame`] into a new vector.
#[cfg(any(feature = "alloc", test))]
pub fn encode_frame_to_vec(message: &[u8]) -> alloc::vec::Vec<u8> {
    let mut out = alloc::vec![0; max_frame_len(message.len())];
    // Cannot fail: the buffer has the maximum length.
    let written = encode_frame(message, &mut out).unwrap_or_default();
    out.truncate(written);
    out
}

/// COBS, one byte at a time: data bytes go straight to `out`, each block's code byte is
/// written into the slot kept for it once the block ends.
struct CobsEncoder<'b> {
    out: &'b mut [u8],
    /// The slot of the current block's code byte.
    code_position: usize,
    position: usize,
    /// 1 + the data bytes in the current block.
    code: u8,
}

impl CobsEncoder<'_> {
    fn put(&mut self, at: usize, byte: u8) -> Option<()> {
        *self.out.get_mut(at)? = byte;
        Some(())
    }

    fn close_block(&mut self) -> Option<()> {
        self.put(self.code_position, self.code)?;
        self.code_position = self.position;
        self.position += 1;
        self.code = 1;
        Some(())
    }

    fn push(&mut self, byte: u8) -> Option<()> {
        // A full block closes only when more data follows, so a frame never ends in an
        // empty block.
        if self.code == MAX_BLOCK_DATA + 1 {
            self.close_block()?;
        }
        if byte == 0 {
            self.close_block()
        } else {
            self.put(self.position, byte)?;
            self.position += 1;
            self.code += 1;
            Some(())
        }
    }

    fn finish(mut self) -> Option<usize> {
        self.put(self.code_position, self.code)?;
        self.put(self.position, DELIMITER)?;
        Some(self.position + 1)
    }
}

/// Turns a byte stream back into frames: feed it chunks as they arrive, in any sizes; it
/// returns each complete frame's message bytes (CRC checked and removed), or a typed error
/// for a frame it dropped.
///
/// `N` bounds a frame after COBS decoding, CRC included: messages up to `N - 2` bytes get
/// through. The decoder holds one `[u8; N]` and allocates nothing. After any error it
/// resynchronises at the next delimiter; one bad frame never costs the one after it.
///
/// ```
/// use edgegw_protocol::{encode_frame, FrameDecoder};
///
/// let mut wire = [0u8; 32];
/// let n = encode_frame(b"\x02\x17", &mut wire).unwrap(); // PINGRESP
///
/// let mut decoder = FrameDecoder::<64>::new();
/// let mut frames = decoder.feed(&wire[..n]);
/// assert_eq!(frames.next_frame(), Some(Ok(&b"\x02\x17"[..])));
/// assert_eq!(frames.next_frame(), None);
/// ```
#[derive(Debug, Clone)]
pub struct FrameDecoder<const N: usize> {
    buffer: [u8; N],
    length: usize,
    /// The current COBS block's code byte; 0 before the frame's first one.
    code: u8,
    /// Bytes of the current block still to come.
    remaining: u8,
    /// After an error, skip to the next delimiter.
    skipping: bool,
}

impl<const N: usize> Default for FrameDecoder<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> FrameDecoder<N> {
    pub const fn new() -> Self {
        Self {
            buffer: [0; N],
            length: 0,
            code: 0,
            remaining: 0,
            skipping: false,
        }
    }

    /// The longest frame (message + CRC) this decoder accepts.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Forgets any partial frame (e.g. when the link is reopened).
    pub fn reset(&mut self) {
        self.length = 0;
        self.code = 0;
        self.remaining = 0;
        self.skipping = false;
    }

    /// Whether bytes of an unfinished frame are held.
    pub const fn is_mid_frame(&self) -> bool {
        self.code != 0 || self.skipping
    }

    /// Consumes `input` up to the end of the first frame or error in it. Returns how many
    /// bytes it consumed and what it found: `None` when `input` ran out first (all of it was
    /// consumed and the partial frame is kept for the next call). The returned frame borrows
    /// the decoder, so it lives until the next call.
    pub fn decode(&mut self, input: &[u8]) -> (usize, Option<Result<&[u8], FrameError>>) {
        for (index, &byte) in input.iter().enumerate() {
            let consumed = index + 1;
            if byte == DELIMITER {
                match self.end_frame() {
                    None => continue,
                    Some(Err(error)) => return (consumed, Some(Err(error))),
                    Some(Ok(length)) => {
                        let frame = self.buffer.get(..length).unwrap_or_default();
                        return (consumed, Some(Ok(frame)));
                    }
                }
            }
            if self.skipping {
                continue;
            }
            if let Err(error) = self.push(byte) {
                self.skipping = true;
                return (consumed, Some(Err(error)));
            }
        }
        (input.len(), None)
    }

    /// Iterates over the frames (and errors) that `input` completes:
    /// `while let Some(frame) = frames.next_frame() { … }`.
    pub fn feed<'d, 'i>(&'d mut self, input: &'i [u8]) -> Frames<'d, 'i, N> {
        Frames {
            decoder: self,
            input,
        }
    }

    /// One byte of the COBS body (never the delimiter).
    fn push(&mut self, byte: u8) -> Result<(), FrameError> {
        if self.remaining == 0 {
            // A code byte. The block before it, unless it was a full one, stood for data
            // followed by a zero.
            if self.code != 0 && self.code != MAX_BLOCK_DATA + 1 {
                self.store(0)?;
            }
            self.code = byte;
            self.remaining = byte.saturating_sub(1);
        } else {
            self.store(byte)?;
            self.remaining -= 1;
        }
        Ok(())
    }

    fn store(&mut self, byte: u8) -> Result<(), FrameError> {
        let slot = self
            .buffer
            .get_mut(self.length)
            .ok_or(FrameError::Oversize { capacity: N })?;
        *slot = byte;
        self.length += 1;
        Ok(())
    }

    /// At a delimiter: the message length of a good frame, an error, or `None` for nothing to
    /// report (an empty frame, or the end of one already reported). Resets for the next frame
    /// but leaves the bytes in place for the caller to borrow.
    fn end_frame(&mut self) -> Option<Result<usize, FrameError>> {
        let (length, code, remaining, skipping) =
            (self.length, self.code, self.remaining, self.skipping);
        self.reset();
        if skipping || code == 0 {
            return None;
        }
        if remaining != 0 {
            return Some(Err(FrameError::TruncatedCobsBlock {
                missing: usize::from(remaining),
            }));
        }
        let Some(message_length) = length.checked_sub(CRC_LEN) else {
            return Some(Err(FrameError::TooShort {
                length,
                minimum: CRC_LEN,
            }));
        };
        let (message, crc) = self.buffer.get(..length)?.split_at(message_length);
        let received = u16::from_be_bytes([*crc.first()?, *crc.get(1)?]);
        let computed = crc16(message);
        Some(if computed == received {
            Ok(message_length)
        } else {
            Err(FrameError::CrcMismatch { computed, received })
        })
    }
}

/// The frames one chunk of input completes; see [`FrameDecoder::feed`].
pub struct Frames<'d, 'i, const N: usize> {
    decoder: &'d mut FrameDecoder<N>,
    input: &'i [u8],
}

impl<'i, const N: usize> Frames<'_, 'i, N> {
    /// The next frame's message bytes or error; `None` when the chunk is used up.
    // Not `Iterator`: each frame borrows the decoder's buffer, which the next call reuses.
    pub fn next_frame(&mut self) -> Option<Result<&[u8], FrameError>> {
        let input = self.input;
        let (consumed, outcome) = self.decoder.decode(input);
        self.input = input.get(consumed..).unwrap_or_default();
        outcome
    }

    /// The part of the chunk not consumed yet.
    pub fn remaining(&self) -> &'i [u8] {
        self.input
    }
}

#[cfg(test)]
mod tests;
