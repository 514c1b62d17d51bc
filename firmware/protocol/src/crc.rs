//! CRC-16/CCITT-FALSE: polynomial 0x1021, initial value 0xFFFF, not reflected, no final XOR
//! (check value: `"123456789"` → 0x29B1). Table-driven; the 512-byte table is built at
//! compile time.

const POLYNOMIAL: u16 = 0x1021;
const INITIAL: u16 = 0xFFFF;

const TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = (byte as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ POLYNOMIAL
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
};

/// An incremental CRC-16/CCITT-FALSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crc16 {
    state: u16,
}

impl Default for Crc16 {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc16 {
    pub const fn new() -> Self {
        Self { state: INITIAL }
    }

    pub const fn update(mut self, bytes: &[u8]) -> Self {
        let mut i = 0;
        while i < bytes.len() {
            let index = ((self.state >> 8) as u8 ^ bytes[i]) as usize;
            self.state = (self.state << 8) ^ TABLE[index];
            i += 1;
        }
        self
    }

    pub const fn value(self) -> u16 {
        self.state
    }
}

/// The CRC-16/CCITT-FALSE of `bytes`.
pub const fn crc16(bytes: &[u8]) -> u16 {
    Crc16::new().update(bytes).value()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        assert_eq!(crc16(b"123456789"), 0x29B1);
    }

    #[test]
    fn empty_input_is_the_initial_value() {
        assert_eq!(crc16(b""), 0xFFFF);
    }

    #[test]
    fn incremental_equals_one_shot() {
        let whole = crc16(b"123456789");
        let split = Crc16::new().update(b"1234").update(b"56789").value();
        assert_eq!(split, whole);
    }

    #[test]
    fn appending_the_crc_big_endian_leaves_zero() {
        // The property receivers can rely on: no reflection, no final XOR.
        let crc = crc16(b"123456789");
        assert_eq!(
            Crc16::new()
                .update(b"123456789")
                .update(&crc.to_be_bytes())
                .value(),
            0
        );
    }

    #[test]
    fn table_matches_bitwise() {
        fn bitwise(bytes: &[u8]) -> u16 {
            let mut crc = INITIAL;
            for &byte in bytes {
                crc ^= u16::from(byte) << 8;
                for _ in 0..8 {
                    crc = if crc & 0x8000 != 0 {
                        (crc << 1) ^ POLYNOMIAL
                    } else {
                        crc << 1
                    };
                }
            }
            crc
        }
        let bytes: [u8; 256] = core::array::from_fn(|i| i as u8);
        for end in 0..bytes.len() {
            assert_eq!(crc16(&bytes[..end]), bitwise(&bytes[..end]));
        }
    }
}
