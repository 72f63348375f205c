//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): a shared memory file the back end keeps
//! per connection and the front end (QEMU) holds on to, so that a back end that dies with requests in flight
//! and is started again finds them and runs them again; the guest sees no error and loses no write.
//!
//! The layout per queue is libvhost-user's (SPDK's `rte_vhost` uses the same): a 16-byte header (features,
//! version, desc_num, last_batch_head, used_idx) and a 16-byte state per descriptor (inflight flag, next,
//! counter), the queue's area rounded up to 64 bytes. Only split rings are tracked.
//!
//! How it is kept (our used ring is published in batches, so the single `last_batch_head` of libvhost-user's
//! scheme does not cover a batch):
//! - a request is marked (counter, then flag) when taken from the available ring, before anything runs;
//! - a batch of completions is put in the used ring, the used index published, then each request's flag is
//!   cleared and `used_idx` set to the published index;
//! - on start, the used entries between the recorded `used_idx` and the guest's used index are completions
//!   whose flags a dead back end had not cleared: they are cleared; the requests still flagged are run again in
//!   counter order, and the next available index is the used index plus their number.
//!
//! The memory is never accessed through Rust references: `vm-memory` on the control path, and on the I/O path
//! the same checked, volatile accessors as guest memory ([`FastMem`], built on the queue's thread).

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::mem::FastMem;

/// Header bytes of a queue's area.
const HDR: u64 = 16;
/// Bytes of one descriptor's state.
const DESC: u64 = 16;
/// Header field offsets.
const VERSION: u64 = 8;
const DESC_NUM: u64 = 10;
const USED_IDX: u64 = 14;
/// The layout version written once a queue's area is in use (libvhost-user's `INFLIGHT_VERSION`).
const LAYOUT_VERSION: u16 = 1;

/// Bytes of one queue's area for `queue_size` descriptors.
pub fn queue_area(queue_size: u16) -> u64 {
    (HDR + DESC * queue_size as u64).next_multiple_of(64)
}

/// A connection's inflight area.
pub struct InflightRegion {
    mem: Arc<GuestMemoryMmap>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// A new zeroed area for `num_queues` queues of `queue_size` (`GET_INFLIGHT_FD`), and the file to hand the
    /// front end.
    pub fn create(num_queues: u16, queue_size: u16) -> std::io::Result<(InflightRegion, File)> {
        let size = queue_area(queue_size) * num_queues as u64;
        let f = crate::sys::memfd("vhost-blk-inflight", size, false)?;
        let r = InflightRegion::map(f.try_clone()?, 0, size, num_queues, queue_size)?;
        for q in 0..num_queues {
            let base = queue_area(queue_size) * q as u64;
            r.store_u16(base + DESC_NUM, queue_size);
        }
        Ok((r, f))
    }

    /// Maps the area the front end hands over (`SET_INFLIGHT_FD`), checking it holds the queues it claims.
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> std::io::Result<InflightRegion> {
        let bad =
            |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string());
        if num_queues == 0 || queue_size == 0 || queue_size > crate::vring::MAX_QUEUE_SIZE {
            return Err(bad("inflight area: bad queue count or size"));
        }
        if size < queue_area(queue_size) * num_queues as u64 || size > 64 << 20 {
            return Err(bad("inflight area: size does not fit its queues"));
        }
        let map = MmapRegion::from_file(FileOffset::new(file, offset), size as usize)
            .map_err(|e| bad(&format!("inflight area: {e}")))?;
        let region = GuestRegionMmap::new(map, GuestAddress(0))
            .ok_or_else(|| bad("inflight area: cannot map"))?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| bad(&format!("{e}")))?;
        Ok(InflightRegion {
            mem: Arc::new(mem),
            num_queues,
            queue_size,
        })
    }

    /// Queue `idx`'s part, for a ring of `ring_size` descriptors (the area must have room for them).
    pub fn queue(self: &Arc<Self>, idx: u16, ring_size: u16) -> Option<InflightQueue> {
        if idx >= self.num_queues || ring_size > self.queue_size {
            return None;
        }
        Some(InflightQueue {
            region: self.clone(),
            base: queue_area(self.queue_size) * idx as u64,
            size: ring_size,
        })
    }

    fn store_u16(&self, at: u64, v: u16) {
        let _ = self.mem.store(v, GuestAddress(at), Ordering::Release);
    }
}

/// One queue's part of the area, handed to the queue's thread.
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    base: u64,
    size: u16,
}

impl InflightQueue {
    /// The queue's tracker, on the thread that runs the queue.
    pub fn open(self) -> Tracker {
        Tracker {
            fast: FastMem::new(self.region.mem.clone()),
            base: self.base,
            size: self.size,
        }
    }
}

/// One queue's inflight state, on the queue's thread.
pub struct Tracker {
    fast: FastMem,
    base: u64,
    size: u16,
}

impl Tracker {
    fn desc(&self, head: u16) -> u64 {
        self.base + HDR + DESC * head as u64
    }

    /// Whether the area holds state of an earlier run of this queue (else it is fresh).
    pub fn in_use(&self) -> bool {
        self.fast.load_u16(self.base + VERSION) == Some(LAYOUT_VERSION)
    }

    /// Starts tracking on a fresh area: no request in flight, the used index where the ring is.
    pub fn init(&self, used_idx: u16) {
        for h in 0..self.size {
            self.fast.write_u8(self.desc(h), 0);
        }
        self.set_used_idx(used_idx);
        self.fast.store_u16(self.base + VERSION, LAYOUT_VERSION);
    }

    /// Records request `head` as taken, `counter` giving its order (before anything of it runs).
    #[inline]
    pub fn mark(&self, head: u16, counter: u64) {
        let d = self.desc(head);
        self.fast.write_u64(d + 8, counter);
        // The counter before the flag: a flag found set always has its counter.
        std::sync::atomic::compiler_fence(Ordering::Release);
        self.fast.write_u8(d, 1);
    }

    /// Records request `head` as completed (after the used index that shows it was published).
    #[inline]
    pub fn clear(&self, head: u16) {
        self.fast.write_u8(self.desc(head), 0);
    }

    /// The used index recorded after the last batch was cleared.
    pub fn used_idx(&self) -> u16 {
        self.fast.load_u16(self.base + USED_IDX).unwrap_or(0)
    }

    /// Records the used index whose completions are all cleared.
    #[inline]
    pub fn set_used_idx(&self, idx: u16) {
        self.fast.store_u16(self.base + USED_IDX, idx);
    }

    /// The requests still flagged, oldest first: `(counter, head)`.
    pub fn pending(&self) -> Vec<(u64, u16)> {
        let mut v: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.fast.read::<1>(self.desc(h)) == Some([1]))
            .map(|h| {
                let c = self
                    .fast
                    .read::<8>(self.desc(h) + 8)
                    .map_or(0, u64::from_le_bytes);
                (c, h)
            })
            .collect();
        v.sort_unstable();
        v
    }
}
