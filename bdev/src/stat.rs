//! I/O statistics with the fields SPDK's `bdev_get_iostat` returns.

use serde_json::{json, Value};

use crate::io::IoType;

/// What a statistics reset clears (SPDK's `reset_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetMode {
    /// Everything.
    All,
    /// The largest and smallest latencies only.
    MaxMin,
    /// The error counts only.
    Error,
    /// Nothing.
    None,
}

impl ResetMode {
    /// Parses SPDK's name (`all`, `maxmin`, `error`, `none`).
    pub fn parse(s: &str) -> Option<ResetMode> {
        Some(match s {
            "all" => ResetMode::All,
            "maxmin" => ResetMode::MaxMin,
            "error" => ResetMode::Error,
            "none" => ResetMode::None,
            _ => return None,
        })
    }
}

/// Counters for one op type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStat {
    /// Bytes moved.
    pub bytes: u64,
    /// Completed operations.
    pub ops: u64,
    /// Total latency ticks.
    pub latency_ticks: u64,
    /// Largest latency.
    pub max_latency_ticks: u64,
    /// Smallest latency (0 = none seen; reported as SPDK does).
    pub min_latency_ticks: u64,
}

impl OpStat {
    #[inline]
    fn add(&mut self, bytes: u64, ticks: u64) {
        self.bytes += bytes;
        self.ops += 1;
        self.latency_ticks += ticks;
        if ticks > self.max_latency_ticks {
            self.max_latency_ticks = ticks;
        }
        if self.min_latency_ticks == 0 || ticks < self.min_latency_ticks {
            self.min_latency_ticks = ticks;
        }
    }

    fn merge(&mut self, o: &OpStat) {
        self.bytes += o.bytes;
        self.ops += o.ops;
        self.latency_ticks += o.latency_ticks;
        self.max_latency_ticks = self.max_latency_ticks.max(o.max_latency_ticks);
        if o.min_latency_ticks != 0
            && (self.min_latency_ticks == 0 || o.min_latency_ticks < self.min_latency_ticks)
        {
            self.min_latency_ticks = o.min_latency_ticks;
        }
    }
}

/// Per-bdev or per-channel statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStat {
    /// Reads.
    pub read: OpStat,
    /// Writes.
    pub write: OpStat,
    /// Unmaps.
    pub unmap: OpStat,
    /// Copies.
    pub copy: OpStat,
    /// Write-zeroes (SPDK counts them with writes in bytes_written? no: separately, not reported).
    pub write_zeroes: OpStat,
    /// Failed I/Os by type.
    pub errors: [u64; IoType::COUNT],
}

impl IoStat {
    /// Clears what `mode` names, as SPDK's `spdk_bdev_reset_io_stat`: `MaxMin` the latency extremes, `Error`
    /// the error counts, `All` everything.
    pub fn reset(&mut self, mode: ResetMode) {
        match mode {
            ResetMode::None => {}
            ResetMode::Error => self.errors = [0; IoType::COUNT],
            ResetMode::MaxMin => {
                for o in [
                    &mut self.read,
                    &mut self.write,
                    &mut self.unmap,
                    &mut self.copy,
                ] {
                    o.max_latency_ticks = 0;
                    o.min_latency_ticks = 0;
                }
            }
            ResetMode::All => *self = IoStat::default(),
        }
    }

    /// Accounts one completed I/O.
    #[inline]
    pub fn record(&mut self, t: IoType, bytes: u64, ticks: u64, ok: bool) {
        if !ok {
            self.errors[t as usize] += 1;
            return;
        }
        match t {
            IoType::Read => self.read.add(bytes, ticks),
            IoType::Write => self.write.add(bytes, ticks),
            IoType::Unmap => self.unmap.add(bytes, ticks),
            IoType::WriteZeroes => self.write_zeroes.add(bytes, ticks),
            IoType::Copy => self.copy.add(bytes, ticks),
            _ => {}
        }
    }

    /// Adds another set of counters.
    pub fn merge(&mut self, o: &IoStat) {
        self.read.merge(&o.read);
        self.write.merge(&o.write);
        self.unmap.merge(&o.unmap);
        self.copy.merge(&o.copy);
        self.write_zeroes.merge(&o.write_zeroes);
        for (a, b) in self.errors.iter_mut().zip(o.errors) {
            *a += b;
        }
    }

    /// The counters as `bdev_get_iostat` prints them for one bdev (without `name`).
    pub fn to_json(&self) -> serde_json::Map<String, Value> {
        let v = json!({
            "bytes_read": self.read.bytes,
            "num_read_ops": self.read.ops,
            "bytes_written": self.write.bytes,
            "num_write_ops": self.write.ops,
            "bytes_unmapped": self.unmap.bytes,
            "num_unmap_ops": self.unmap.ops,
            "bytes_copied": self.copy.bytes,
            "num_copy_ops": self.copy.ops,
            "read_latency_ticks": self.read.latency_ticks,
            "max_read_latency_ticks": self.read.max_latency_ticks,
            "min_read_latency_ticks": self.read.min_latency_ticks,
            "write_latency_ticks": self.write.latency_ticks,
            "max_write_latency_ticks": self.write.max_latency_ticks,
            "min_write_latency_ticks": self.write.min_latency_ticks,
            "unmap_latency_ticks": self.unmap.latency_ticks,
            "max_unmap_latency_ticks": self.unmap.max_latency_ticks,
            "min_unmap_latency_ticks": self.unmap.min_latency_ticks,
            "copy_latency_ticks": self.copy.latency_ticks,
            "max_copy_latency_ticks": self.copy.max_latency_ticks,
            "min_copy_latency_ticks": self.copy.min_latency_ticks,
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IoStat {
        let mut s = IoStat::default();
        s.record(IoType::Read, 4096, 100, true);
        s.record(IoType::Read, 4096, 300, true);
        s.record(IoType::Write, 512, 50, true);
        s.record(IoType::Write, 512, 0, false);
        s
    }

    #[test]
    fn reset_modes_clear_what_spdk_clears() {
        let mut s = sample();
        s.reset(ResetMode::None);
        assert_eq!(s, sample());
        s.reset(ResetMode::Error);
        assert_eq!(s.errors, [0; IoType::COUNT]);
        assert_eq!((s.read.ops, s.read.max_latency_ticks), (2, 300));
        let mut s = sample();
        s.reset(ResetMode::MaxMin);
        assert_eq!(
            (s.read.ops, s.read.bytes, s.read.latency_ticks),
            (2, 8192, 400)
        );
        assert_eq!((s.read.min_latency_ticks, s.read.max_latency_ticks), (0, 0));
        assert_eq!(s.errors[IoType::Write as usize], 1);
        // The next I/O sets fresh extremes.
        s.record(IoType::Read, 4096, 70, true);
        assert_eq!(
            (s.read.min_latency_ticks, s.read.max_latency_ticks),
            (70, 70)
        );
        s.reset(ResetMode::All);
        assert_eq!(s, IoStat::default());
    }
}
