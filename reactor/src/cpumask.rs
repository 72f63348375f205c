//! Core masks in SPDK's syntax: a hex mask (`0x3`, `3`) or a list (`[0,1]`, `[0-3,6]`).

use std::fmt;

/// A set of CPU cores (up to 1024).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct CpuMask {
    bits: Vec<u64>,
}

/// Why a core mask string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuMaskError(pub String);

impl fmt::Display for CpuMaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid core mask: {}", self.0)
    }
}
impl std::error::Error for CpuMaskError {}

const MAX_CORES: u32 = 1024;

impl CpuMask {
    /// An empty mask.
    pub fn new() -> Self {
        Self::default()
    }

    /// A mask holding exactly one core.
    pub fn single(core: u32) -> Self {
        let mut m = Self::new();
        m.set(core);
        m
    }

    /// Parses SPDK's syntax: hex with or without `0x`, or a bracketed list of cores and ranges.
    pub fn parse(s: &str) -> Result<Self, CpuMaskError> {
        let s = s.trim();
        let err = |why: &str| CpuMaskError(format!("'{s}': {why}"));
        let mut m = Self::new();
        if let Some(list) = s.strip_prefix('[') {
            let list = list.strip_suffix(']').ok_or_else(|| err("missing ']'"))?;
            for part in list.split(',') {
                let part = part.trim();
                let (lo, hi) = match part.split_once('-') {
                    Some((a, b)) => (a.trim(), b.trim()),
                    None => (part, part),
                };
                let lo: u32 = lo.parse().map_err(|_| err("bad core number"))?;
                let hi: u32 = hi.parse().map_err(|_| err("bad core number"))?;
                if lo > hi || hi >= MAX_CORES {
                    return Err(err("bad core range"));
                }
                for c in lo..=hi {
                    m.set(c);
                }
            }
        } else {
            let hex = s
                .strip_prefix("0x")
                .or_else(|| s.strip_prefix("0X"))
                .unwrap_or(s);
            if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(err("not a hex mask or [list]"));
            }
            for (i, c) in hex.chars().rev().enumerate() {
                let v = c.to_digit(16).unwrap_or(0);
                for b in 0..4 {
                    if v & (1 << b) != 0 {
                        let core = (i * 4 + b) as u32;
                        if core >= MAX_CORES {
                            return Err(err("core out of range"));
                        }
                        m.set(core);
                    }
                }
            }
        }
        if m.is_empty() {
            return Err(err("no cores selected"));
        }
        Ok(m)
    }

    /// Adds a core.
    pub fn set(&mut self, core: u32) {
        let w = core as usize / 64;
        if self.bits.len() <= w {
            self.bits.resize(w + 1, 0);
        }
        self.bits[w] |= 1 << (core % 64);
    }

    /// Whether the mask holds `core`.
    pub fn contains(&self, core: u32) -> bool {
        self.bits
            .get(core as usize / 64)
            .is_some_and(|w| w & (1 << (core % 64)) != 0)
    }

    /// Whether no core is set.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    /// The cores, ascending.
    pub fn cores(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.bits.len() as u32 * 64).filter(|c| self.contains(*c))
    }

    /// Number of cores.
    pub fn count(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The lowest core, if any.
    pub fn first(&self) -> Option<u32> {
        self.cores().next()
    }
}

impl fmt::Display for CpuMask {
    /// Formats as SPDK prints masks: `0x` and lower-case hex without leading zeroes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        let mut started = false;
        for w in self.bits.iter().rev() {
            if started {
                s.push_str(&format!("{w:016x}"));
            } else if *w != 0 {
                s.push_str(&format!("{w:x}"));
                started = true;
            }
        }
        if s.is_empty() {
            s.push('0');
        }
        write!(f, "0x{s}")
    }
}

impl fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_lists() {
        assert_eq!(
            CpuMask::parse("0x3").unwrap().cores().collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(
            CpuMask::parse("5").unwrap().cores().collect::<Vec<_>>(),
            [0, 2]
        );
        assert_eq!(
            CpuMask::parse("[0,1]").unwrap().cores().collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(
            CpuMask::parse("[0-2, 70]")
                .unwrap()
                .cores()
                .collect::<Vec<_>>(),
            [0, 1, 2, 70]
        );
        assert_eq!(
            CpuMask::parse("[0-2,70]").unwrap().to_string(),
            "0x400000000000000007"
        );
        assert_eq!(CpuMask::parse("0x1").unwrap().to_string(), "0x1");
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "0x", "xyz", "[1-0]", "[a]", "[0,1", "0x0", "[2000]"] {
            assert!(CpuMask::parse(bad).is_err(), "{bad}");
        }
    }
}
