//! I/O statistics with the fields SPDK's `bdev_get_iostat` returns.

use serde_json::{json, Value};

use crate::io::IoType;

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
    pub errors: [u64; 8],
}

impl IoStat {
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
