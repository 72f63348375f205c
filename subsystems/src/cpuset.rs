//! CPU masks as SPDK reads and writes them (`spdk_cpuset_parse()` / `spdk_cpuset_fmt()`), for the options that
//! take one (`nvmf_set_config.poll_groups_mask`, `ublk_create_target.cpumask`).

/// `SPDK_CPUSET_SIZE`: the cores a mask can name.
pub const CPUSET_SIZE: usize = 1024;

/// A set of cores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuSet(Vec<bool>);

impl CpuSet {
    /// Parses a hex mask (`0x3`, `3`) or a core list (`[0,2-3]`); `None` when SPDK would refuse it.
    pub fn parse(mask: &str) -> Option<CpuSet> {
        let mask = mask.trim_matches(|c| c == ' ' || c == '\t');
        if mask.is_empty() {
            return None;
        }
        let mut set = vec![false; CPUSET_SIZE];
        if let Some(list) = mask.strip_prefix('[') {
            let list = list.strip_suffix(']')?;
            for item in list.split(',') {
                let (lo, hi) = item.split_once('-').unwrap_or((item, item));
                let num = |s: &str| -> Option<usize> {
                    let s = s.trim_matches(|c| c == ' ' || c == '\t');
                    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    s.parse().ok().filter(|&n| n < CPUSET_SIZE)
                };
                let (lo, hi) = (num(lo)?, num(hi)?);
                if lo > hi {
                    return None;
                }
                set[lo..=hi].iter_mut().for_each(|b| *b = true);
            }
        } else {
            let hex = mask
                .strip_prefix("0x")
                .or_else(|| mask.strip_prefix("0X"))
                .unwrap_or(mask);
            for (i, c) in hex.chars().rev().enumerate() {
                let d = c.to_digit(16)? as usize;
                for j in 0..4 {
                    if d & (1 << j) != 0 && i * 4 + j < CPUSET_SIZE {
                        set[i * 4 + j] = true;
                    }
                }
            }
        }
        Some(CpuSet(set))
    }

    /// Whether no core is in the set.
    pub fn is_empty(&self) -> bool {
        !self.0.iter().any(|&b| b)
    }

    /// Whether every core of `self` is in `other`.
    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.0.iter().zip(&other.0).all(|(&s, &o)| !s || o)
    }

    /// Lower-case hex without `0x` or leading zeros (`"0"` for an empty set), as SPDK writes masks.
    pub fn to_hex(&self) -> String {
        let top = self.0.iter().rposition(|&b| b).unwrap_or(0);
        (0..top / 4 + 1)
            .rev()
            .map(|n| {
                let d = (0..4).fold(0u32, |acc, j| acc | (u32::from(self.0[n * 4 + j]) << j));
                std::char::from_digit(d, 16).unwrap_or('0')
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        let f = |m: &str| CpuSet::parse(m).map(|s| s.to_hex());
        assert_eq!(f("0x1").as_deref(), Some("1"));
        assert_eq!(f(" 0XfF0 ").as_deref(), Some("ff0"));
        assert_eq!(f("[0, 4-5]").as_deref(), Some("31"));
        assert_eq!(f("0").as_deref(), Some("0"));
        assert_eq!(
            f("[127]").as_deref(),
            Some(format!("8{}", "0".repeat(31)).as_str())
        );
        assert_eq!(f(""), None);
        assert_eq!(f("[1-0]"), None);
        assert_eq!(f("[1,]"), None);
        assert_eq!(f("0xg"), None);
        assert!(CpuSet::parse("0").unwrap().is_empty());
        let two = CpuSet::parse("0x3").unwrap();
        assert!(CpuSet::parse("[1]").unwrap().is_subset(&two));
        assert!(!CpuSet::parse("[2]").unwrap().is_subset(&two));
    }
}
