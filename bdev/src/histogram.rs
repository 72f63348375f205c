//! Latency histograms with SPDK's bucket layout (`spdk_histogram_data`), so `bdev_get_histogram` answers with
//! the bytes SPDK's tools (`scripts/histogram.py`) decode, and bdevperf reports latency the way SPDK's does.
//!
//! Values (ticks) fall into ranges by their highest set bit; each range is split into `2^bucket_shift` equal
//! buckets. Range 0 holds the values below `2^bucket_shift` one per bucket; range `r > 0` holds
//! `[2^(r+shift-1), 2^(r+shift))` in buckets `2^(r-1)` wide.

/// SPDK's default bucket shift (128 buckets per range).
pub const BUCKET_SHIFT_DEFAULT: u32 = 7;

/// A latency histogram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    bucket_shift: u32,
    buckets: Box<[u64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(BUCKET_SHIFT_DEFAULT)
    }
}

impl Histogram {
    /// An empty histogram with `2^bucket_shift` buckets per range (`bucket_shift` in 1..=63).
    pub fn new(bucket_shift: u32) -> Self {
        let shift = bucket_shift.clamp(1, 63);
        let n = (1usize << shift) * Self::ranges_for(shift);
        Histogram {
            bucket_shift: shift,
            buckets: vec![0; n].into_boxed_slice(),
        }
    }

    fn ranges_for(shift: u32) -> usize {
        (64 - shift + 1) as usize
    }

    /// The bucket shift.
    pub fn bucket_shift(&self) -> u32 {
        self.bucket_shift
    }

    /// Counts one value.
    #[inline]
    pub fn tally(&mut self, value: u64) {
        let shift = self.bucket_shift;
        let lsb = 64 - shift;
        let clz = value.leading_zeros();
        let range = lsb.saturating_sub(clz);
        let index = (value >> range.saturating_sub(1)) & ((1u64 << shift) - 1);
        let i = ((range as usize) << shift) + index as usize;
        // The index is below the length by construction (range <= lsb, index < 2^shift); `get_mut` keeps a bad
        // value from ever panicking the I/O path anyway.
        if let Some(c) = self.buckets.get_mut(i) {
            *c += 1;
        }
    }

    /// Adds `o`'s counts (histograms of another shift are ignored, as SPDK refuses to merge them).
    pub fn merge(&mut self, o: &Histogram) {
        if o.bucket_shift != self.bucket_shift {
            return;
        }
        for (a, b) in self.buckets.iter_mut().zip(o.buckets.iter()) {
            *a += b;
        }
    }

    /// Clears every count.
    pub fn reset(&mut self) {
        self.buckets.fill(0);
    }

    /// Values counted.
    pub fn total(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The value where bucket `(range, index)` ends (the next bucket's start), as SPDK computes it.
    fn bucket_end(&self, range: u32, index: u64) -> u64 {
        let index = index + 1;
        if range > 0 {
            // Wraps to 0 past the top of the last range, as SPDK's unsigned arithmetic does.
            (1u64 << (range + self.bucket_shift - 1)).wrapping_add(index << (range - 1))
        } else {
            index
        }
    }

    /// Calls `f(start, end, count)` for every bucket in ascending order (SPDK's `spdk_histogram_data_iterate`).
    pub fn iterate(&self, mut f: impl FnMut(u64, u64, u64)) {
        let per = 1u64 << self.bucket_shift;
        let mut start = 0;
        for range in 0..Self::ranges_for(self.bucket_shift) as u32 {
            for index in 0..per {
                let count = self.buckets[((range as usize) << self.bucket_shift) + index as usize];
                let end = self.bucket_end(range, index);
                f(start, end, count);
                start = end;
            }
        }
    }

    /// (sum of bucket midpoints x counts, lowest bucket start, highest bucket end) over the counted values: the
    /// figures SPDK's bdevperf turns into average, min and max latency.
    pub fn summary(&self) -> (u64, u64, u64) {
        let total = self.total();
        let (mut sum, mut min, mut max, mut so_far) = (0u64, 0u64, 0u64, 0u64);
        self.iterate(|start, end, count| {
            if count == 0 {
                return;
            }
            so_far += count;
            let mid = ((start as u128 + end as u128) / 2) as u64;
            sum = sum.wrapping_add(mid.wrapping_mul(count));
            if so_far == count {
                min = start;
            }
            if so_far == total {
                max = end;
            }
        });
        (sum, min, max)
    }

    /// The buckets as SPDK's RPC sends them: native-endian u64s, base64-encoded.
    pub fn to_base64(&self) -> String {
        let mut bytes = Vec::with_capacity(self.buckets.len() * 8);
        for b in self.buckets.iter() {
            bytes.extend_from_slice(&b.to_ne_bytes());
        }
        base64(&bytes)
    }
}

/// Standard base64 with padding (RFC 4648), as SPDK's `spdk_base64_encode`.
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_buckets_that_contain_them() {
        let mut h = Histogram::default();
        for v in [
            0u64,
            1,
            127,
            128,
            129,
            255,
            256,
            1000,
            123_456,
            1 << 40,
            u64::MAX,
        ] {
            let mut one = Histogram::default();
            one.tally(v);
            let mut seen = None;
            one.iterate(|s, e, c| {
                if c > 0 {
                    seen = Some((s, e));
                }
            });
            let (s, e) = seen.expect("counted");
            assert!(s <= v && (v < e || e < s), "{v} not in [{s}, {e})");
            h.tally(v);
        }
        assert_eq!(h.total(), 11);
    }

    #[test]
    fn summary_brackets_the_values() {
        let mut h = Histogram::default();
        for v in [500u64, 800, 1200] {
            h.tally(v);
        }
        let (sum, min, max) = h.summary();
        assert!(min <= 500 && max > 1200);
        let avg = sum / 3;
        assert!((800 - 8..=850).contains(&avg), "{avg}");
    }

    #[test]
    fn merge_adds_and_reset_clears() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        a.tally(10);
        b.tally(10);
        b.tally(1 << 20);
        a.merge(&b);
        assert_eq!(a.total(), 3);
        a.reset();
        assert_eq!(a.total(), 0);
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        // 58 ranges of 128 buckets of 8 bytes: the ~80 kB SPDK's documentation mentions.
        assert_eq!(
            Histogram::default().to_base64().len(),
            58 * 128 * 8 / 3 * 4 + 4
        );
    }
}
