//! A fixed-length bit array in SPDK's mask byte order: bit `i` is bit `i % 8` (LSB first) of byte `i / 8`, which
//! is also what `spdk_bit_array_store_mask` writes from its little-endian 64-bit words.

/// A fixed-length array of bits.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bitmap {
    len: u64,
    bytes: Vec<u8>,
}

impl Bitmap {
    /// `len` clear bits.
    pub fn new(len: u64) -> Self {
        Bitmap {
            len,
            bytes: vec![0; len.div_ceil(8) as usize],
        }
    }

    /// The first `len` bits of `bytes`; bits past `len` in the last byte are ignored, as SPDK ignores them.
    /// `bytes` must hold at least `ceil(len / 8)` bytes (the mask decoder checks it).
    pub fn from_bytes(bytes: &[u8], len: u64) -> Self {
        let n = len.div_ceil(8) as usize;
        let mut b = Bitmap {
            len,
            bytes: bytes[..n].to_vec(),
        };
        b.clear_tail();
        b
    }

    /// The bits as bytes, `ceil(len / 8)` of them, bits past `len` zero.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the array has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bit `i`; bits past the end read as clear (like `spdk_bit_array_get`).
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.bytes[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// Sets bit `i`; returns false (and changes nothing) when `i` is past the end.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        self.bytes[(i / 8) as usize] |= 1 << (i % 8);
        true
    }

    /// Clears bit `i`; returns false when `i` is past the end.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        self.bytes[(i / 8) as usize] &= !(1 << (i % 8));
        true
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.bytes.iter().map(|b| b.count_ones() as u64).sum()
    }

    /// Indexes of the set bits, ascending.
    pub fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.bytes
            .iter()
            .enumerate()
            .filter(|(_, &b)| b != 0)
            .flat_map(|(i, &b)| {
                (0..8)
                    .filter(move |k| b & (1 << k) != 0)
                    .map(move |k| i as u64 * 8 + k)
            })
    }

    /// Changes the length; new bits are clear.
    pub fn resize(&mut self, len: u64) {
        self.len = len;
        self.bytes.resize(len.div_ceil(8) as usize, 0);
        self.clear_tail();
    }

    fn clear_tail(&mut self) {
        let rem = self.len % 8;
        if rem != 0 {
            if let Some(last) = self.bytes.last_mut() {
                *last &= (1u8 << rem) - 1;
            }
        }
    }
}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bitmap({} bits, set: {:?})",
            self.len,
            self.ones().collect::<Vec<_>>()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_order_and_tail() {
        let b = Bitmap::from_bytes(&[0b1010_0001, 0xff], 11);
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![0, 5, 7, 8, 9, 10]);
        assert_eq!(b.as_bytes(), &[0b1010_0001, 0b0000_0111]);
        assert!(!b.get(11));
        let mut b = b;
        assert!(!b.set(11));
        assert!(b.clear(0));
        b.resize(17);
        assert_eq!(b.count_ones(), 5);
        assert!(b.set(16));
        assert_eq!(b.as_bytes(), &[0b1010_0000, 0b0000_0111, 1]);
    }
}
