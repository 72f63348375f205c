//! The I/O path of an NVMe namespace bdev: one I/O queue per thread (SPDK's controller channel), bdev I/O
//! turned into NVMe commands, completions polled in batches.
//!
//! The channel follows its controller's state ([`Shared`]): when its queue fails it asks for a reset and keeps
//! the I/O (new, and what the dead queue gave back) waiting; once the controller is connected again (a new
//! generation) it opens a new queue and sends what waited; when the controller is set to fail I/O fast, or is
//! deleted, what waits fails.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bdev::{IoHandle, IoStatus, IoType, ModuleChannel, NvmeStatus};
use nvme_host::{Dir, IoQueue, Iov, SubmitError};
use nvme_proto::cmd::{io as opc, Cqe, DsmRange, Sqe};
use nvme_proto::status::{generic, sct};

use crate::{PathEntry, Shared, ST_ENABLED, ST_FAIL_FAST};

/// Bytes of Dataset Management ranges a slot keeps (one range per unmap; the bdev layer cuts larger ones).
const DSM_BYTES: usize = DsmRange::SIZE;

/// A thread's I/O queue to the controller, and the bdev I/O in it.
pub(crate) struct NvmeChannel {
    nsid: u32,
    /// This channel's entry in `bdev_nvme_get_io_paths`.
    path: Arc<PathEntry>,
    shared: Arc<Shared>,
    /// The controller generation `q` belongs to.
    gen: u64,
    q: Result<IoQueue, i32>,
    /// I/O in the queue, by token.
    slots: Vec<Option<IoHandle>>,
    free: Vec<u32>,
    /// Each slot's Dataset Management range buffer.
    dsm: Vec<[u8; DSM_BYTES]>,
    /// Waiting for the queue to connect, or for a free slot.
    waiting: VecDeque<IoHandle>,
    iovs: Vec<Iov>,
    done: Vec<(u64, Cqe)>,
}

impl NvmeChannel {
    pub(crate) fn new(shared: Arc<Shared>, nsid: u32, bdev: &str) -> NvmeChannel {
        let info = shared.info.load_full();
        let depth = info.opts.io_queue_size.max(2) as usize;
        let gen = shared.gen.load(Ordering::Acquire);
        let q = open_queue(&shared);
        let path = crate::add_path(bdev, &shared);
        NvmeChannel {
            nsid,
            path,
            shared,
            gen,
            q,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as u32).rev().collect(),
            dsm: vec![[0; DSM_BYTES]; depth],
            waiting: VecDeque::new(),
            iovs: Vec::with_capacity(16),
            done: Vec::with_capacity(depth),
        }
    }

    /// Whether I/O that cannot go now should fail rather than wait (the controller fails I/O fast, or is gone).
    fn failing(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) >= ST_FAIL_FAST
    }

    /// Follows the controller: a queue that died asks for a reset; a new generation gets a new queue.
    fn follow(&mut self) {
        let gen = self.shared.gen.load(Ordering::Acquire);
        let enabled = self.shared.state.load(Ordering::Acquire) == ST_ENABLED;
        let dead = matches!(&self.q, Ok(q) if q.failed());
        if dead && gen == self.gen && enabled {
            self.shared.reset_wanted.store(true, Ordering::Release);
        }
        if gen != self.gen && enabled {
            // The controller is back (a new connection): this thread's queue is made again.
            if let Ok(q) = &mut self.q {
                let slots = &mut self.slots;
                let waiting = &mut self.waiting;
                let free = &mut self.free;
                q.close(&mut |token, _| {
                    if let Some(io) = slots.get_mut(token as usize).and_then(Option::take) {
                        free.push(token as u32);
                        waiting.push_back(io);
                    }
                });
            }
            self.q = open_queue(&self.shared);
            self.gen = gen;
        }
        if self.failing() {
            for io in self.waiting.drain(..) {
                io.complete(IoStatus::Failed(libc::ENXIO));
            }
        }
    }

    /// Starts `io` on the queue, or gives it back when it cannot go now.
    fn start(&mut self, io: IoHandle) -> Option<IoHandle> {
        let failing = self.failing();
        let q = match &mut self.q {
            Ok(q) if q.ready() => q,
            // No queue could be made here (no queue id left): this thread cannot use the controller.
            Err(e) => {
                io.complete(IoStatus::Failed(*e));
                return None;
            }
            _ if failing => {
                io.complete(IoStatus::Failed(libc::ENXIO));
                return None;
            }
            // Connecting, or waiting for the controller to come back.
            _ => return Some(io),
        };
        let Some(slot) = self.free.pop() else {
            return Some(io);
        };
        let (slba, nlb) = (io.offset_blocks(), io.num_blocks());
        let rw = |op: u8| {
            let mut s = Sqe::new(op, 0);
            s.set_nsid(self.nsid);
            s.set_cdw(10, slba as u32);
            s.set_cdw(11, (slba >> 32) as u32);
            s.set_cdw(12, (nlb as u32).saturating_sub(1));
            s
        };
        self.iovs.clear();
        let (sqe, dir) = match io.io_type() {
            IoType::Read => (rw(opc::READ), Dir::FromCtrl),
            IoType::Write => (rw(opc::WRITE), Dir::ToCtrl),
            IoType::Compare => (rw(opc::COMPARE), Dir::ToCtrl),
            IoType::WriteZeroes => (rw(opc::WRITE_ZEROES), Dir::None),
            IoType::Flush => {
                let mut s = Sqe::new(opc::FLUSH, 0);
                s.set_nsid(self.nsid);
                (s, Dir::None)
            }
            IoType::Unmap => {
                let mut s = Sqe::new(opc::DATASET_MANAGEMENT, 0);
                s.set_nsid(self.nsid);
                s.set_cdw(10, 0);
                s.set_cdw(11, DsmRange::AD);
                let buf = &mut self.dsm[slot as usize];
                DsmRange {
                    attributes: 0,
                    nlb: nlb as u32,
                    slba,
                }
                .encode(buf);
                self.iovs.push(Iov {
                    base: buf.as_mut_ptr(),
                    len: DSM_BYTES,
                });
                (s, Dir::ToCtrl)
            }
            IoType::NvmeIo => {
                let Some(cmd) = io.nvme_cmd() else {
                    self.free.push(slot);
                    io.complete(IoStatus::Failed(libc::EINVAL));
                    return None;
                };
                let mut s = Sqe::default();
                for (n, d) in cmd.0.iter().enumerate() {
                    s.0[n * 4..n * 4 + 4].copy_from_slice(&d.to_le_bytes());
                }
                let dir = match s.opc() & 3 {
                    1 => Dir::ToCtrl,
                    2 => Dir::FromCtrl,
                    _ => Dir::None,
                };
                (s, dir)
            }
            _ => {
                self.free.push(slot);
                io.complete(IoStatus::Failed(libc::ENOTSUP));
                return None;
            }
        };
        if dir != Dir::None && self.iovs.is_empty() {
            self.iovs.extend(io.iovs().iter().map(|v| Iov {
                base: v.base,
                len: v.len,
            }));
        }
        // SAFETY: the iovecs are the I/O's buffers, valid until it completes (the bdev layer's submit
        // contract), or this slot's own range buffer; the I/O is kept in `slots` until its completion.
        match unsafe { q.submit(sqe, &self.iovs, dir, slot as u64) } {
            Ok(()) => {
                self.slots[slot as usize] = Some(io);
                None
            }
            Err(e) => {
                self.free.push(slot);
                match e {
                    SubmitError::Full => Some(io),
                    SubmitError::NotReady => Some(io),
                    SubmitError::TooLarge => {
                        io.complete(IoStatus::Failed(libc::EINVAL));
                        None
                    }
                }
            }
        }
    }

    /// Starts what waits, while the queue takes it.
    fn start_waiting(&mut self) {
        while let Some(io) = self.waiting.pop_front() {
            if let Some(io) = self.start(io) {
                self.waiting.push_front(io);
                return;
            }
        }
    }
}

impl ModuleChannel for NvmeChannel {
    fn submit(&mut self, io: IoHandle) {
        if !self.waiting.is_empty() {
            self.waiting.push_back(io);
            return;
        }
        if let Some(io) = self.start(io) {
            self.waiting.push_back(io);
        }
    }

    fn poll(&mut self) -> bool {
        self.follow();
        let Ok(q) = &mut self.q else {
            self.start_waiting();
            return false;
        };
        let done = &mut self.done;
        let did = q.poll(&mut |token, cqe| done.push((token, cqe)));
        let n = self.done.len();
        for i in 0..n {
            let (token, cqe) = self.done[i];
            let Some(io) = self.slots.get_mut(token as usize).and_then(Option::take) else {
                log::error!("nvme: completion for unknown token {token}");
                continue;
            };
            self.free.push(token as u32);
            // Given back by a queue that died: sent again once the controller is back (or failed then).
            if (cqe.status.sct, cqe.status.sc) == (sct::GENERIC, generic::ABORTED_SQ_DELETION)
                && !self.failing()
            {
                self.waiting.push_back(io);
                continue;
            }
            let st = NvmeStatus {
                sct: cqe.status.sct,
                sc: cqe.status.sc,
                dnr: cqe.status.dnr,
                crd: cqe.status.crd,
            };
            if !cqe.status.is_success() {
                // As SPDK prints a failed command and its completion.
                log::warn!(
                    "nvme: {} nsid {} lba {} blocks {}: {}",
                    io.io_type().name(),
                    self.nsid,
                    io.offset_blocks(),
                    io.num_blocks(),
                    cqe.status
                );
            }
            if io.io_type() == IoType::NvmeIo {
                io.complete_nvme(cqe.dw0, st);
            } else {
                io.complete(IoStatus::from_nvme(st));
            }
        }
        self.done.clear();
        self.start_waiting();
        let connected = matches!(&self.q, Ok(q) if q.ready());
        if self.path.connected.load(Ordering::Relaxed) != connected {
            self.path.connected.store(connected, Ordering::Relaxed);
        }
        did || n > 0
    }

    fn wants_poll(&self) -> bool {
        !self.waiting.is_empty()
            || matches!(&self.q, Ok(q) if !q.ready() && !q.failed() || q.outstanding() > 0)
    }
}

/// A new I/O queue to the controller's current connection.
fn open_queue(shared: &Shared) -> Result<IoQueue, i32> {
    IoQueue::connect(shared.info.load_full()).map_err(|e| {
        log::error!("nvme: I/O queue: {e}");
        e.errno()
    })
}

impl Drop for NvmeChannel {
    fn drop(&mut self) {
        crate::remove_path(&self.path);
        if let Ok(q) = &mut self.q {
            let slots = &mut self.slots;
            q.close(&mut |token, _| {
                if let Some(io) = slots.get_mut(token as usize).and_then(Option::take) {
                    io.complete(IoStatus::Aborted);
                }
            });
        }
        for io in self.waiting.drain(..) {
            io.complete(IoStatus::Aborted);
        }
    }
}
