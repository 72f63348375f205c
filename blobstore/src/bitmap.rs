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

    /// The lowest clear bit at or after `from`, if any (`spdk_bit_array_find_first_clear`): what SPDK hands
    /// out next, as it allocates metadata pages and clusters lowest first.
    pub fn find_first_clear(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut byte = (from / 8) as usize;
        // The first byte: only bits at or after `from`.
        let first = self.bytes[byte] | ((1u8 << (from % 8)) - 1);
        if first != 0xff {
            let i = byte as u64 * 8 + first.trailing_ones() as u64;
            return (i < self.len).then_some(i);
        }
        byte += 1;
        // Whole words of used bits are skipped eight bytes at a time (a store of millions of clusters).
        while byte + 8 <= self.bytes.len() {
            let w = u64::from_le_bytes(self.bytes[byte..byte + 8].try_into().unwrap_or([0xff; 8]));
            if w != u64::MAX {
                let i = byte as u64 * 8 + w.trailing_ones() as u64;
                return (i < self.len).then_some(i);
            }
            byte += 8;
        }
        while byte < self.bytes.len() {
            let b = self.bytes[byte];
            if b != 0xff {
                let i = byte as u64 * 8 + b.trailing_ones() as u64;
                return (i < self.len).then_some(i);
            }
            byte += 1;
        }
        None
    }

    /// Number of clear bits.
    pub fn count_zeros(&self) -> u64 {
        self.len - self.count_ones()
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

    #[test]
    fn find_first_clear_scans_bytes_and_words() {
        let mut b = Bitmap::new(200);
        assert_eq!(b.find_first_clear(0), Some(0));
        for i in 0..150 {
            b.set(i);
        }
        assert_eq!(b.find_first_clear(0), Some(150));
        assert_eq!(b.find_first_clear(151), Some(151));
        b.clear(3);
        assert_eq!(b.find_first_clear(0), Some(3));
        assert_eq!(b.find_first_clear(4), Some(150));
        for i in 150..200 {
            b.set(i);
        }
        assert_eq!(b.find_first_clear(4), None);
        assert_eq!(b.find_first_clear(200), None);
        // Tail bits past the length never count as clear.
        let mut t = Bitmap::new(10);
        for i in 0..10 {
            t.set(i);
        }
        assert_eq!(t.find_first_clear(0), None);
        assert_eq!(t.count_zeros(), 0);
    }
}
