//! The I/O path of an NVMe namespace bdev: on each thread, one I/O queue per path (controller) to the namespace
//! (SPDK's controller channels under one bdev channel), bdev I/O turned into NVMe commands, completions polled in
//! batches.
//!
//! Each path follows its controller's state ([`Shared`]): when its queue fails it asks for a reset; once the
//! controller is connected again (a new generation) it opens a new queue. An I/O goes to a path the bdev's
//! multipath policy picks among those that can take it now; an I/O that fails for a path reason (its queue
//! died, a path status) is sent again on another path, as SPDK retries it. With no path usable now, I/O waits
//! while some path may come back, and fails (ENXIO) when none can.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use subsystems::bdev_nvme::ActionOnTimeout;

use bdev::{IoHandle, IoStatus, IoType, ModuleChannel, NvmeStatus};
use nvme_host::{Dir, IoQueue, Iov, SubmitError};
use nvme_proto::cmd::{io as opc, Cqe, DsmRange, Sqe};
use nvme_proto::log::ana_state;
use nvme_proto::status::{generic, sct};
use reactor::dma::DmaBuf;

use crate::{
    stat, Counts, NsPaths, PathEntry, Policy, Shared, TransportStats, ST_ENABLED, ST_FAIL_FAST,
};

/// Bytes of Dataset Management ranges a slot keeps (one range per unmap; the bdev layer cuts larger ones).
const DSM_BYTES: usize = DsmRange::SIZE;
/// Slots whose ranges share one 4 KiB page of DMA memory.
const DSM_PER_PAGE: usize = 4096 / DSM_BYTES;

/// The `driver_ctx` word that counts an I/O's retries.
const RETRIES: usize = 3;

/// Path status codes of ANA states (Asymmetric Access Persistent Loss, Inaccessible, Transition).
const ANA_PERSISTENT_LOSS: u8 = 0x01;
const ANA_TRANSITION: u8 = 0x03;

/// This thread's queue on one path.
struct PathQ {
    shared: Arc<Shared>,
    /// The controller generation `q` belongs to.
    gen: u64,
    q: std::result::Result<IoQueue, i32>,
    /// This path's entry in `bdev_nvme_get_io_paths`.
    entry: Arc<PathEntry>,
    /// Commands of this channel in `q`.
    outstanding: u32,
    /// The namespace's ANA group on this controller (0: none).
    anagrpid: u32,
    /// `q` was connected at the last look (a queue that connects again is a path back).
    was_ready: bool,
    /// `q`'s transport counters at the last poll (the channel adds what moved since).
    last: nvme_host::qpair::QpCounters,
}

impl PathQ {
    fn new(shared: Arc<Shared>, bdev: &str, nsid: u32, timeout: Option<Duration>) -> PathQ {
        let gen = shared.gen.load(Ordering::Acquire);
        let q = open_queue(&shared, timeout);
        let entry = crate::add_path(bdev, &shared);
        let mut p = PathQ {
            shared,
            gen,
            q,
            entry,
            outstanding: 0,
            anagrpid: 0,
            was_ready: false,
            last: Default::default(),
        };
        p.find_group(nsid);
        p
    }

    /// Looks up the namespace's ANA group on the controller's current connection.
    fn find_group(&mut self, nsid: u32) {
        let info = self.shared.info.load();
        self.anagrpid = info
            .namespaces
            .iter()
            .find(|n| n.nsid == nsid)
            .map_or(0, |n| n.anagrpid);
    }

    /// The namespace's ANA state through this path (optimized without ANA reporting).
    #[inline]
    fn ana(&self) -> u8 {
        match &self.q {
            Ok(q) => q.info().ana.get(self.anagrpid),
            Err(_) => ana_state::OPTIMIZED,
        }
    }

    /// Can take an I/O now: connected, and the namespace accessible through it (ANA optimized or not).
    #[inline]
    fn available(&self) -> bool {
        matches!(&self.q, Ok(q) if q.ready())
            && self.shared.state.load(Ordering::Acquire) == ST_ENABLED
            && matches!(self.ana(), ana_state::OPTIMIZED | ana_state::NON_OPTIMIZED)
    }

    /// Usable now, and ANA-optimized.
    #[inline]
    fn optimized(&self) -> bool {
        self.available() && self.ana() == ana_state::OPTIMIZED
    }

    /// Not usable now, but may be soon: its controller is connected or being reconnected (not failing fast,
    /// not deleted), a queue could be made for it, and its ANA state is not a persistent loss.
    fn may_come_back(&self) -> bool {
        self.q.is_ok()
            && self.shared.state.load(Ordering::Acquire) < ST_FAIL_FAST
            && self.ana() != ana_state::PERSISTENT_LOSS
    }
}

/// A thread's queues to the namespace's paths, and the bdev I/O in them.
pub(crate) struct NvmeChannel {
    ns: Arc<NsPaths>,
    bdev: String,
    /// The path list version `paths` follows.
    version: u64,
    policy: Policy,
    paths: Vec<PathQ>,
    /// The path I/O goes to while it can (active-passive; round-robin's turn).
    current: Option<usize>,
    /// I/Os sent on `current` since round-robin moved to it.
    rr_count: u32,
    /// I/O in a queue, by token, with the path it went to.
    slots: Vec<Option<(IoHandle, usize)>>,
    free: Vec<u32>,
    /// Each slot's Dataset Management range, in DMA memory (a PCIe controller reads it from there): pages of
    /// [`DSM_PER_PAGE`] slots, added as slots are, never moved.
    dsm: Vec<DmaBuf>,
    /// Waiting for a path, or for a free slot.
    waiting: VecDeque<IoHandle>,
    /// Writes taken back from a lost path, held until the controller behind it can no longer run them (see
    /// [`NvmeChannel::take_back`]), oldest first.
    held: VecDeque<(Instant, IoHandle)>,
    iovs: Vec<Iov>,
    done: Vec<(usize, u64, Cqe)>,
    /// Times a failed I/O is sent again (SPDK's `bdev_retry_count`; -1: no limit).
    retry_limit: i32,
    /// The paths' ANA log page counts last seen: when one moves, the path is picked again (failback).
    ana_seen: u64,
    /// A reconnected path makes the policy pick again (SPDK's automatic failback; off with
    /// `bdev_nvme_set_options --disable-auto-failback`, which keeps I/O on the path it moved to).
    auto_failback: bool,
    /// Command timeout and what to do then (`bdev_nvme_set_options`' `timeout_us` and `action_on_timeout`).
    timeout: Option<(Duration, ActionOnTimeout)>,
    /// This channel's transport counters, counted here and published once per poll.
    counts: Counts,
    stats: Arc<TransportStats>,
    /// The RDMA device was recorded in `stats`.
    rdma_dev_known: bool,
}

impl NvmeChannel {
    pub(crate) fn new(
        ns: Arc<NsPaths>,
        bdev: &str,
        retry_limit: i32,
        timeout: Option<(Duration, ActionOnTimeout)>,
        auto_failback: bool,
    ) -> NvmeChannel {
        let mut ch = NvmeChannel {
            ns,
            bdev: bdev.to_string(),
            version: u64::MAX,
            policy: Policy::default(),
            paths: Vec::new(),
            current: None,
            rr_count: 0,
            slots: Vec::new(),
            free: Vec::new(),
            dsm: Vec::new(),
            waiting: VecDeque::new(),
            held: VecDeque::new(),
            iovs: Vec::with_capacity(16),
            done: Vec::new(),
            retry_limit,
            ana_seen: 0,
            auto_failback,
            timeout,
            counts: [[0; stat::N]; 3],
            stats: crate::add_stats(),
            rdma_dev_known: false,
        };
        ch.follow_paths();
        ch
    }

    /// Takes the bdev's current path list and policy when they changed: queues to new paths are opened, those of
    /// removed paths closed (what was in them is sent again on another path).
    fn follow_paths(&mut self) {
        let v = self.ns.version.load(Ordering::Acquire);
        if v == self.version {
            return;
        }
        self.version = v;
        let (list, policy) = self.ns.snapshot();
        self.policy = policy;
        // The new list in the bdev's order (the preferred path first): kept queues move, new paths get one.
        let mut old: Vec<Option<PathQ>> = std::mem::take(&mut self.paths)
            .into_iter()
            .map(Some)
            .collect();
        let mut remap = vec![usize::MAX; old.len()];
        for s in &list {
            let found = old
                .iter()
                .position(|p| p.as_ref().is_some_and(|p| Arc::ptr_eq(&p.shared, s)));
            match found.and_then(|i| old[i].take().map(|p| (i, p))) {
                Some((i, p)) => {
                    remap[i] = self.paths.len();
                    self.paths.push(p);
                }
                None => self.paths.push(PathQ::new(
                    s.clone(),
                    &self.bdev,
                    self.ns.nsid,
                    self.timeout.map(|t| t.0),
                )),
            }
        }
        // Removed paths: their queues close and what was in them is sent again on another path.
        for mut p in old.into_iter().flatten() {
            if let Ok(q) = &mut p.q {
                let back = close_queue(q, &mut self.slots, &mut self.free);
                let until = loss_deadline(&p.shared);
                self.take_back(back, until);
            }
            crate::remove_path(&p.entry);
        }
        for slot in self.slots.iter_mut().flatten() {
            slot.1 = remap.get(slot.1).copied().unwrap_or(usize::MAX);
        }
        // Room for a full queue on every path.
        let depth = self
            .paths
            .iter()
            .map(|p| p.shared.info.load().opts.io_queue_size.max(2) as usize)
            .sum::<usize>()
            .max(2);
        while self.slots.len() < depth {
            if self.slots.len() == self.dsm.len() * DSM_PER_PAGE {
                match DmaBuf::alloc(4096) {
                    Ok(b) => self.dsm.push(b),
                    Err(e) => {
                        log::error!("nvme: channel slots: {e}");
                        break;
                    }
                }
            }
            self.free.push(self.slots.len() as u32);
            self.slots.push(None);
        }
        self.done
            .reserve(depth.saturating_sub(self.done.capacity()));
        self.current = None;
        self.rr_count = 0;
    }

    /// Follows each path's controller: a queue that died asks for a reset; a new generation gets a new queue.
    fn follow(&mut self) {
        self.follow_paths();
        let (mut reconnected, mut back) = (false, false);
        for p in &mut self.paths {
            let gen = p.shared.gen.load(Ordering::Acquire);
            let enabled = p.shared.state.load(Ordering::Acquire) == ST_ENABLED;
            let dead = matches!(&p.q, Ok(q) if q.failed());
            if dead && gen == p.gen && enabled {
                p.shared.reset_wanted.store(true, Ordering::Release);
            }
            if !enabled && gen == p.gen {
                // The controller is lost (its admin connection or a queue failed, or it is being reset): this
                // queue is closed now, so what it had goes on another path at once rather than when the
                // controller is back, as SPDK disconnects a resetting controller's queues.
                if let Ok(q) = &mut p.q {
                    if !q.failed() {
                        let back = close_queue(q, &mut self.slots, &mut self.free);
                        p.outstanding = 0;
                        Self::hold(
                            &mut self.waiting,
                            &mut self.held,
                            back,
                            loss_deadline(&p.shared),
                        );
                    }
                }
            }
            if gen != p.gen && enabled {
                // The controller is back (a new connection): this thread's queue to it is made again.
                if let Ok(q) = &mut p.q {
                    let back = close_queue(q, &mut self.slots, &mut self.free);
                    Self::hold(
                        &mut self.waiting,
                        &mut self.held,
                        back,
                        loss_deadline(&p.shared),
                    );
                }
                p.q = open_queue(&p.shared, self.timeout.map(|t| t.0));
                p.last = Default::default();
                p.gen = gen;
                p.outstanding = 0;
                p.find_group(self.ns.nsid);
                reconnected = true;
            }
            let ready = matches!(&p.q, Ok(q) if q.ready());
            back |= ready && !p.was_ready;
            p.was_ready = ready;
        }
        // A path whose queue connected (again): the policy picks again, as SPDK clears its path cache once the
        // new queue pair is connected (its failback to the preferred path), unless the operator turned that off
        // and the current path still serves.
        if back && (self.auto_failback || !self.current.is_some_and(|c| self.paths[c].available()))
        {
            self.current = None;
        }
        let ana: u64 = self
            .paths
            .iter()
            .filter_map(|p| p.q.as_ref().ok().map(|q| q.info().ana.changes()))
            .sum();
        // A new connection's first ANA log page is no ANA change: the reconnect was handled above.
        if ana != self.ana_seen {
            self.ana_seen = ana;
            if !reconnected {
                self.current = None;
            }
        }
        self.release_held();
        if (!self.waiting.is_empty() || !self.held.is_empty())
            && !self.paths.iter().any(PathQ::may_come_back)
        {
            let errno = self.no_path_errno();
            for io in self
                .waiting
                .drain(..)
                .chain(self.held.drain(..).map(|h| h.1))
            {
                io.complete(IoStatus::Failed(errno));
            }
        }
    }

    /// Why I/O fails when no path can take it: no queue could be made (that errno), or none is connected.
    fn no_path_errno(&self) -> i32 {
        match self.paths.iter().find_map(|p| p.q.as_ref().err()) {
            Some(&e) if self.paths.iter().all(|p| p.q.is_err()) => e,
            _ => libc::ENXIO,
        }
    }

    /// The path for the next I/O, as SPDK's `bdev_nvme_find_io_path` picks it: ANA-optimized paths first,
    /// a non-optimized one only when no optimized path is usable.
    #[inline]
    fn pick(&mut self) -> Option<usize> {
        if let Some(c) = self.current {
            if self.paths[c].available() {
                if !self.policy.active_active {
                    return Some(c);
                }
                if !self.policy.queue_depth {
                    self.rr_count += 1;
                    if self.rr_count < self.policy.rr_min_io {
                        return Some(c);
                    }
                }
            }
            self.rr_count = 0;
        }
        let n = self.paths.len();
        if self.policy.active_active && self.policy.queue_depth {
            // The least busy path; not remembered.
            let least = |ok: &dyn Fn(&PathQ) -> bool| {
                (0..n)
                    .filter(|&i| ok(&self.paths[i]))
                    .min_by_key(|&i| self.paths[i].outstanding)
            };
            return least(&PathQ::optimized).or_else(|| least(&PathQ::available));
        }
        // Active-passive: the first usable path in the bdev's order. Round-robin: the next one after the current.
        let start = match (self.policy.active_active, self.current) {
            (true, Some(c)) => c + 1,
            _ => 0,
        };
        let order = (0..n).map(|k| (start + k) % n);
        let found = order
            .clone()
            .find(|&i| self.paths[i].optimized())
            .or_else(|| order.clone().find(|&i| self.paths[i].available()));
        // An active-passive channel on a non-optimized path looks for an optimized one again next time.
        self.current = found.filter(|&i| self.policy.active_active || self.paths[i].optimized());
        found
    }

    /// Starts `io` on a path, or gives it back when it cannot go now.
    fn start(&mut self, io: IoHandle) -> Option<IoHandle> {
        let Some(path) = self.pick() else {
            if self.paths.iter().any(PathQ::may_come_back) {
                // Connecting, or waiting for a controller to come back.
                return Some(io);
            }
            io.complete(IoStatus::Failed(self.no_path_errno()));
            return None;
        };
        let Some(slot) = self.free.pop() else {
            return Some(io);
        };
        let nsid = self.ns.nsid;
        let (slba, nlb) = (io.offset_blocks(), io.num_blocks());
        let rw = |op: u8| {
            let mut s = Sqe::new(op, 0);
            s.set_nsid(nsid);
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
                s.set_nsid(nsid);
                (s, Dir::None)
            }
            IoType::Unmap => {
                let mut s = Sqe::new(opc::DATASET_MANAGEMENT, 0);
                s.set_nsid(nsid);
                s.set_cdw(10, 0);
                s.set_cdw(11, DsmRange::AD);
                let page = &mut self.dsm[slot as usize / DSM_PER_PAGE];
                let at = slot as usize % DSM_PER_PAGE * DSM_BYTES;
                let buf = &mut page.as_mut_slice()[at..at + DSM_BYTES];
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
        let p = &mut self.paths[path];
        let Ok(q) = &mut p.q else {
            self.free.push(slot);
            return Some(io);
        };
        // SAFETY: the iovecs are the I/O's buffers, valid until it completes (the bdev layer's submit
        // contract), or this slot's own range buffer; the I/O is kept in `slots` until its completion.
        match unsafe { q.submit(sqe, &self.iovs, dir, slot as u64) } {
            Ok(()) => {
                p.outstanding += 1;
                if let Some(t) = q.qpair().transport() {
                    self.counts[crate::transport_index(t)][stat::SUBMITTED] += 1;
                }
                self.slots[slot as usize] = Some((io, path));
                None
            }
            Err(e) => {
                self.free.push(slot);
                match e {
                    SubmitError::Full | SubmitError::NotReady => Some(io),
                    SubmitError::TooLarge | SubmitError::BadBuffer => {
                        io.complete(IoStatus::Failed(libc::EINVAL));
                        None
                    }
                }
            }
        }
    }

    /// Counts an I/O that waits, under the transport of the first path with a queue (TCP when none has).
    fn count_queued(&mut self) {
        let k = self
            .paths
            .iter()
            .find_map(|p| p.q.as_ref().ok()?.qpair().transport())
            .map_or(0, crate::transport_index);
        self.counts[k][stat::QUEUED] += 1;
    }

    /// Starts what waits, while a path takes it.
    fn start_waiting(&mut self) {
        while let Some(io) = self.waiting.pop_front() {
            if let Some(io) = self.start(io) {
                self.waiting.push_front(io);
                return;
            }
        }
    }

    /// Whether a failed command is sent again rather than completed, as SPDK's
    /// `bdev_nvme_io_complete_nvme_status` decides: never with Do Not Retry or when aborted on request; on
    /// another path after a path error (the path is dropped from use until its controller is back, as an ANA
    /// or path status says it cannot serve now); otherwise up to `bdev_retry_count` times.
    fn retry(&mut self, io: &mut IoHandle, path: usize, cqe: &Cqe) -> bool {
        let s = &cqe.status;
        if s.dnr || (s.sct, s.sc) == (sct::GENERIC, generic::ABORTED_BY_REQUEST) {
            return false;
        }
        if s.sct == sct::PATH && self.current == Some(path) {
            self.current = None;
        }
        if s.sct == sct::PATH && (ANA_PERSISTENT_LOSS..=ANA_TRANSITION).contains(&s.sc) {
            // The path's ANA state changed: not used until the log page says it is accessible again (asked
            // for now; an ANA change notice may bring it first). Not counted as a retry, as SPDK counts none.
            if let Some(p) = self.paths.get(path) {
                if let Ok(q) = &p.q {
                    q.info().ana.set(p.anagrpid, ana_state::INACCESSIBLE);
                }
                p.shared.ana_stale.store(true, Ordering::Release);
            }
            return self.paths.iter().any(PathQ::may_come_back);
        }
        let count = io.driver_ctx[RETRIES];
        if self.retry_limit >= 0 && count >= self.retry_limit as u64 {
            return false;
        }
        io.driver_ctx[RETRIES] = count + 1;
        self.paths.iter().any(PathQ::may_come_back)
    }
}

impl ModuleChannel for NvmeChannel {
    fn submit(&mut self, mut io: IoHandle) {
        io.driver_ctx[RETRIES] = 0;
        if self.version != self.ns.version.load(Ordering::Relaxed) {
            self.follow_paths();
        }
        if !self.waiting.is_empty() {
            self.count_queued();
            self.waiting.push_back(io);
            return;
        }
        if let Some(io) = self.start(io) {
            self.count_queued();
            self.waiting.push_back(io);
        }
    }

    fn poll(&mut self) -> bool {
        self.follow();
        if self.timeout.is_some() {
            self.check_timeouts();
        }
        let mut did = false;
        // Per transport: polled this time, and completions.
        let mut polled = [(false, 0u64); 3];
        for (i, p) in self.paths.iter_mut().enumerate() {
            if let Ok(q) = &mut p.q {
                let done = &mut self.done;
                let before = done.len();
                let any = q.poll(&mut |token, cqe| done.push((i, token, cqe)));
                did |= any;
                let Some(t) = q.qpair().transport() else {
                    continue;
                };
                let k = crate::transport_index(t);
                let c = &mut self.counts[k];
                polled[k].0 = true;
                polled[k].1 += (done.len() - before) as u64;
                if any && t == nvme_host::qpair::Transport::Tcp {
                    c[stat::SOCKET_COMPLETIONS] += 1;
                }
                let now = q.qpair().counters();
                c[stat::SEND_WRS] += now.send_wrs.saturating_sub(p.last.send_wrs);
                c[stat::RECV_WRS] += now.recv_wrs.saturating_sub(p.last.recv_wrs);
                c[stat::SQ_DOORBELLS] += now.sq_doorbells.saturating_sub(p.last.sq_doorbells);
                c[stat::CQ_DOORBELLS] += now.cq_doorbells.saturating_sub(p.last.cq_doorbells);
                p.last = now;
                if !self.rdma_dev_known {
                    if let Some(d) = q.qpair().rdma_device() {
                        self.stats.set_rdma_device(d);
                        self.rdma_dev_known = true;
                    }
                }
            }
        }
        for (c, (was, n)) in self.counts.iter_mut().zip(polled) {
            if was {
                c[stat::POLLS] += 1;
                c[stat::COMPLETIONS] += n;
                if n == 0 {
                    c[stat::IDLE_POLLS] += 1;
                }
            }
        }
        let n = self.done.len();
        for k in 0..n {
            let (path, token, cqe) = self.done[k];
            let Some((mut io, _)) = self.slots.get_mut(token as usize).and_then(Option::take)
            else {
                log::error!("nvme: completion for unknown token {token}");
                continue;
            };
            self.free.push(token as u32);
            if let Some(p) = self.paths.get_mut(path) {
                p.outstanding = p.outstanding.saturating_sub(1);
            }
            if cqe.status.is_success() {
                if io.io_type() == IoType::NvmeIo {
                    io.complete_nvme(cqe.dw0, nvme_status(&cqe));
                } else {
                    io.complete(IoStatus::Success);
                }
                continue;
            }
            // Given back by a queue that died: sent again on a path that works (a write once the old path can
            // no longer run it), or once one is back.
            if (cqe.status.sct, cqe.status.sc) == (sct::GENERIC, generic::ABORTED_SQ_DELETION) {
                if self.current == Some(path) {
                    self.current = None;
                }
                if self.paths.iter().any(PathQ::may_come_back) {
                    let until = self.paths.get(path).map(|p| loss_deadline(&p.shared));
                    Self::hold(
                        &mut self.waiting,
                        &mut self.held,
                        vec![io],
                        until.unwrap_or_else(Instant::now),
                    );
                    continue;
                }
            } else if self.retry(&mut io, path, &cqe) {
                log::info!(
                    "nvme: {} nsid {} lba {}: {}; sent again",
                    io.io_type().name(),
                    self.ns.nsid,
                    io.offset_blocks(),
                    cqe.status
                );
                // The retry delay the completion asks for (CRD picks one of the controller's CRDT, 100 ms units).
                let delay = match (cqe.status.crd, self.paths.get(path)) {
                    (crd @ 1..=3, Some(p)) => {
                        let cd = &p.shared.info.load().cdata;
                        [cd.crdt1, cd.crdt2, cd.crdt3][crd as usize - 1] as u64 * 100
                    }
                    _ => 0,
                };
                if delay == 0 {
                    self.waiting.push_back(io);
                } else {
                    hold_until(
                        &mut self.held,
                        Instant::now() + Duration::from_millis(delay),
                        io,
                    );
                }
                continue;
            }
            // As SPDK prints a failed command and its completion.
            log::warn!(
                "nvme: {} nsid {} lba {} blocks {}: {}",
                io.io_type().name(),
                self.ns.nsid,
                io.offset_blocks(),
                io.num_blocks(),
                cqe.status
            );
            let st = nvme_status(&cqe);
            if io.io_type() == IoType::NvmeIo {
                io.complete_nvme(cqe.dw0, st);
            } else {
                io.complete(IoStatus::from_nvme(st));
            }
        }
        self.done.clear();
        self.start_waiting();
        self.publish();
        self.stats.store(&self.counts);
        did || n > 0
    }

    fn wants_poll(&self) -> bool {
        !self.waiting.is_empty()
            || !self.held.is_empty()
            || self.version != self.ns.version.load(Ordering::Relaxed)
            || self
                .paths
                .iter()
                .any(|p| matches!(&p.q, Ok(q) if !q.ready() && !q.failed() || q.outstanding() > 0))
    }
}

impl NvmeChannel {
    /// Takes back what a lost path had: see [`NvmeChannel::hold`].
    fn take_back(&mut self, back: Vec<IoHandle>, until: Instant) {
        Self::hold(&mut self.waiting, &mut self.held, back, until);
    }

    /// Queues commands a lost path gave back. Reads go again at once; a command that changes data waits until
    /// `until`, when the controller behind the lost path can no longer run it (SPDK #3593: NVMe's communication
    /// loss handling; the old path's copy landing after a newer write through another path would undo it).
    fn hold(
        waiting: &mut VecDeque<IoHandle>,
        held: &mut VecDeque<(Instant, IoHandle)>,
        back: Vec<IoHandle>,
        until: Instant,
    ) {
        for io in back {
            if changes_data(io.io_type()) && until > Instant::now() {
                hold_until(held, until, io);
            } else {
                waiting.push_back(io);
            }
        }
    }

    /// Moves the held commands whose time has come to the waiting ones.
    fn release_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let now = Instant::now();
        while self.held.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, io)) = self.held.pop_front() {
                self.waiting.push_back(io);
            }
        }
    }

    /// Commands out longer than `timeout_us`: SPDK's warning, then its action — abort the command (the
    /// controller's thread sends the Abort; a failed Abort resets the controller) or reset the controller.
    fn check_timeouts(&mut self) {
        let Some((_, action)) = self.timeout else {
            return;
        };
        let now = Instant::now();
        for p in &mut self.paths {
            let Ok(q) = &mut p.q else { continue };
            let qid = q.qid();
            let shared = &p.shared;
            q.expired(now, &mut |cid, _| {
                log::warn!(
                    "nvme: timeout of command {cid} on I/O queue {qid} of {}",
                    shared.info.load().opts.location()
                );
                match action {
                    ActionOnTimeout::Abort => reactor::lock(&shared.aborts).push((qid, cid)),
                    ActionOnTimeout::Reset => shared.reset_wanted.store(true, Ordering::Release),
                    ActionOnTimeout::None => {}
                }
            });
        }
    }

    /// Tells `bdev_nvme_get_io_paths` what changed: each path's connected state and which is current (one
    /// relaxed store per change).
    fn publish(&self) {
        let any_optimized = self.paths.iter().any(PathQ::optimized);
        for (i, p) in self.paths.iter().enumerate() {
            let connected = matches!(&p.q, Ok(q) if q.ready());
            let accessible = matches!(p.ana(), ana_state::OPTIMIZED | ana_state::NON_OPTIMIZED);
            let current = if self.policy.active_active {
                // A non-optimized path is current only when no optimized one is usable (SPDK's view).
                p.optimized() || (p.available() && !any_optimized)
            } else {
                match self.current {
                    Some(c) => c == i,
                    None => self.paths.iter().position(PathQ::available) == Some(i),
                }
            };
            if p.entry.connected.load(Ordering::Relaxed) != connected {
                p.entry.connected.store(connected, Ordering::Relaxed);
            }
            if p.entry.current.load(Ordering::Relaxed) != current {
                p.entry.current.store(current, Ordering::Relaxed);
            }
            if p.entry.accessible.load(Ordering::Relaxed) != accessible {
                p.entry.accessible.store(accessible, Ordering::Relaxed);
            }
        }
    }
}

fn nvme_status(cqe: &Cqe) -> NvmeStatus {
    NvmeStatus {
        sct: cqe.status.sct,
        sc: cqe.status.sc,
        dnr: cqe.status.dnr,
        crd: cqe.status.crd,
    }
}

/// Closes `q` and gives back what was in it.
fn close_queue(
    q: &mut IoQueue,
    slots: &mut [Option<(IoHandle, usize)>],
    free: &mut Vec<u32>,
) -> Vec<IoHandle> {
    let mut back = Vec::new();
    q.close(&mut |token, _| {
        if let Some((io, _)) = slots.get_mut(token as usize).and_then(Option::take) {
            free.push(token as u32);
            back.push(io);
        }
    });
    back
}

/// Holds `io` until `until`, in deadline order.
fn hold_until(held: &mut VecDeque<(Instant, IoHandle)>, until: Instant, io: IoHandle) {
    let at = held.partition_point(|(t, _)| *t <= until);
    held.insert(at, (until, io));
}

/// Whether a command may change data (a replay after a newer write would undo it).
fn changes_data(t: IoType) -> bool {
    t.is_write() || t == IoType::NvmeIo
}

/// A new I/O queue to the controller's current connection, its commands timing out after `timeout`.
fn open_queue(shared: &Shared, timeout: Option<Duration>) -> std::result::Result<IoQueue, i32> {
    let mut q = IoQueue::connect(shared.info.load_full()).map_err(|e| {
        log::error!("nvme: I/O queue: {e}");
        e.errno()
    })?;
    q.set_timeout(timeout);
    Ok(q)
}

impl Drop for NvmeChannel {
    fn drop(&mut self) {
        crate::remove_stats(&self.stats);
        for p in &mut self.paths {
            crate::remove_path(&p.entry);
            if let Ok(q) = &mut p.q {
                let slots = &mut self.slots;
                q.close(&mut |token, _| {
                    if let Some((io, _)) = slots.get_mut(token as usize).and_then(Option::take) {
                        io.complete(IoStatus::Aborted);
                    }
                });
            }
        }
        for io in self
            .waiting
            .drain(..)
            .chain(self.held.drain(..).map(|h| h.1))
        {
            io.complete(IoStatus::Aborted);
        }
    }
}

/// When a command the controller behind `shared` was given before it was lost can no longer run there: its keep
/// alive timeout (after which a controller that lost its host stops, SPDK's default 10 s when none was asked)
/// plus the command quiesce time it reports, from now (the loss is seen after the last contact, so this is
/// never early).
fn loss_deadline(shared: &Shared) -> Instant {
    let info = shared.info.load();
    if info.pcie.is_some() {
        // A PCIe controller is disabled before it is brought up again or let go: nothing it was given runs
        // after that, so there is nothing to wait for.
        return Instant::now();
    }
    let kato = match info.opts.kato_ms {
        0 => 10_000,
        k => k as u64,
    };
    Instant::now() + Duration::from_millis(kato + info.cdata.cqt as u64)
}
