//! Per-thread raid channels: the I/O path of raid1, raid0 and concat.
//!
//! A channel holds this thread's channels on the members, a slab of in-flight parent I/Os (a parent waits in
//! its slot until its children complete; a slot is just the handle, 8 per cache line), per-member outstanding
//! counters for read balancing, and queues for I/O held back by a quiesce (the rebuild window is the bdev layer's range lock). The state of
//! an I/O in flight (kind, children outstanding, member masks) lives in the parent's `driver_ctx`, which the bdev
//! layer reserves for the module handling the I/O and which completion touches anyway. Everything is per thread
//! in a `RefCell`: no lock, no shared atomic, and after warm-up no allocation per I/O (children come from the
//! bdev pool, completions are routed through one `Rc<dyn IoSink>`, slots and queues keep their capacity).
//!
//! An I/O that maps onto exactly one member I/O (a raid1 read; a raid0/concat I/O inside one strip or member)
//! is not copied into a child: the descriptor itself is forwarded to the member and comes back to the raid,
//! which restores the submitter's route and completes it. That spares a descriptor, its initialisation and
//! two cache misses per I/O, which is most of what a raid1 read costs over a plain read. The parent's
//! `driver_ctx` then belongs to the member, and the little state such an I/O has (the mirror read first, for a
//! retry) rides in the context word it comes back with: no slot.
//!
//! Control-plane changes (a member removed, a rebuild target attached, a quiesce) reach channels as messages
//! ([`crate::raid`] walks every thread holding one), never as shared state read on the I/O path.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Weak as ArcWeak};

use bdev::{BdevIo, Completion, IoChannel, IoHandle, IoSink, IoStatus, IoType, ModuleChannel};

use crate::raid::Raid;
use crate::Level;

/// Most members an array may have (bit masks track members per I/O).
pub const MAX_BASE_BDEVS: usize = 64;

/// Geometry fixed when the array goes online.
#[derive(Debug)]
pub(crate) struct Layout {
    pub level: Level,
    pub num_blocks: u64,
    pub strip_shift: u32,
    pub strip_size: u64,
    pub num_base: usize,
    /// concat: each member's `[start, end)` in the raid's block space.
    pub ranges: Vec<(u64, u64)>,
}

/// This thread's view of one member.
pub(crate) struct BaseCh {
    /// Channel on the member; `None` when it is missing, removed or failed here.
    pub ch: Option<IoChannel>,
    /// First data block on the member.
    pub offset: u64,
    /// Whether reads may go to it (false for a rebuild target until it is in sync).
    pub readable: bool,
    /// Membership generation of the slot (changes when another bdev takes it).
    pub gen: u32,
    /// Children in flight to it from this channel.
    pub outstanding: u32,
}

/// Kinds of parent I/O (the low byte of `driver_ctx[0]`).
const K_FREE: u64 = 0;
/// raid1 write, unmap, write_zeroes, flush: one child per member.
const K_MIRROR: u64 = 1;
/// raid0/concat: one child per strip or member piece.
const K_STRIPED: u64 = 3;
/// Reset: one child per member.
const K_RESET: u64 = 4;

/// Bit of a child's context: the member was in sync when the (mirror) child was sent.
const CTX_INSYNC: u64 = 1 << 7;
/// Bit of a child's context: it is the parent itself, forwarded. Such a context carries no slot: bits 8..14 hold
/// the mirror read first and bit 15 whether a failure is retried on another mirror (raid1 reads).
const CTX_FWD: u64 = 1 << 6;
/// See [`CTX_FWD`].
const CTX_RETRY: u64 = 1 << 15;

/// The state of a parent I/O in flight, kept in its `driver_ctx`:
/// `[0]` kind (bits 0..8), queued for resume (bit 16), children outstanding (32..64);
/// `[1]` next member or piece to send (0..32), pieces in all (32..64);
/// `[2]` members that succeeded (mirror: in-sync ones only); `[3]` members that failed.
struct Track<'a>(&'a mut [u64; 4]);

impl Track<'_> {
    #[inline]
    fn kind(&self) -> u64 {
        self.0[0] & 0xff
    }
    #[inline]
    fn queued(&self) -> bool {
        self.0[0] & (1 << 16) != 0
    }
    #[inline]
    fn set_queued(&mut self, q: bool) {
        if q {
            self.0[0] |= 1 << 16;
        } else {
            self.0[0] &= !(1 << 16);
        }
    }
    #[inline]
    fn remaining(&self) -> u32 {
        (self.0[0] >> 32) as u32
    }
    #[inline]
    fn set_remaining(&mut self, n: u32) {
        self.0[0] = (self.0[0] & 0xffff_ffff) | ((n as u64) << 32);
    }
    #[inline]
    fn next(&self) -> u32 {
        self.0[1] as u32
    }
    #[inline]
    fn set_next(&mut self, n: u32) {
        self.0[1] = (self.0[1] & !0xffff_ffff) | n as u64;
    }
    #[inline]
    fn total(&self) -> u32 {
        (self.0[1] >> 32) as u32
    }
    #[inline]
    fn set_total(&mut self, n: u32) {
        self.0[1] = (self.0[1] & 0xffff_ffff) | ((n as u64) << 32);
    }
    #[inline]
    fn ok(&self) -> u64 {
        self.0[2]
    }
    #[inline]
    fn failed(&self) -> u64 {
        self.0[3]
    }
}

/// A write acknowledged only once the failure of the members it failed on is recorded.
struct Parked {
    parent: Option<IoHandle>,
    status: IoStatus,
    waits: Vec<(usize, u32)>,
}

pub(crate) struct ChanState {
    bases: Vec<BaseCh>,
    /// Members with a channel here (every write goes to each).
    present: u64,
    /// Members reads may go to.
    readers: u64,
    slots: Vec<Option<IoHandle>>,
    free: Vec<u32>,
    /// Parents in slots or forwarded (submitted to members, not parked).
    pub active: usize,
    /// Hold every new I/O (quiesce).
    pub quiesced: bool,
    waiting: VecDeque<IoHandle>,
    parked: Vec<Parked>,
    /// Last generation reported failed, per member.
    reported: Vec<Option<u32>>,
}

/// A thread's raid channel.
pub(crate) struct RaidChan {
    raid: ArcWeak<Raid>,
    layout: Arc<Layout>,
    me: Weak<RaidChan>,
    pub st: RefCell<ChanState>,
}

/// What [`reactor::IoDevice`] keeps per thread (a wrapper so the channel can refer to itself).
pub(crate) struct ChanHandle(pub Rc<RaidChan>);

/// Initial number of slots; the slab grows (once) if more I/O is in flight.
const INITIAL_SLOTS: usize = 256;

type Done = Option<(IoHandle, IoStatus)>;

impl RaidChan {
    pub(crate) fn create(
        raid: ArcWeak<Raid>,
        layout: Arc<Layout>,
        bases: Vec<BaseCh>,
        quiesced: bool,
    ) -> ChanHandle {
        let n = bases.len();
        let mut slots = Vec::with_capacity(INITIAL_SLOTS);
        slots.resize_with(INITIAL_SLOTS, || None);
        let free = (0..INITIAL_SLOTS as u32).rev().collect();
        let mut st = ChanState {
            bases,
            present: 0,
            readers: 0,
            slots,
            free,
            active: 0,
            quiesced,
            waiting: VecDeque::with_capacity(64),
            parked: Vec::new(),
            reported: vec![None; n],
        };
        st.refresh();
        ChanHandle(Rc::new_cyclic(|me| RaidChan {
            raid,
            layout,
            me: me.clone(),
            st: RefCell::new(st),
        }))
    }

    fn sink(&self) -> Rc<dyn IoSink> {
        self.me.upgrade().expect("live channel")
    }

    /// Starts (or holds) a parent I/O. Returns a completion to deliver once no borrow is held.
    fn start(&self, st: &mut ChanState, sink: &Rc<dyn IoSink>, io: IoHandle) -> Done {
        let t = io.io_type();
        if st.quiesced {
            st.waiting.push_back(io);
            return None;
        }
        if t == IoType::Reset {
            let idx = st.alloc(io, K_RESET, 0);
            return self.fanout(st, sink, idx);
        }
        match self.layout.level {
            Level::Raid1 => {
                if t == IoType::Read {
                    self.read_first(st, sink, io)
                } else {
                    let idx = st.alloc(io, K_MIRROR, 0);
                    self.mirror_fanout(st, sink, idx)
                }
            }
            Level::Raid0 | Level::Concat => {
                let total = self.pieces(&io, t);
                if total == 1 && io.num_blocks() > 0 {
                    return self.forward_piece(st, sink, io);
                }
                let idx = st.alloc(io, K_STRIPED, total);
                self.fanout(st, sink, idx)
            }
        }
    }

    /// Number of children a striped I/O needs.
    fn pieces(&self, io: &BdevIo, t: IoType) -> u32 {
        let l = &self.layout;
        let (off, n) = (io.offset_blocks(), io.num_blocks());
        if n == 0 {
            // A flush of nothing still goes to every member.
            return l.num_base as u32;
        }
        match l.level {
            Level::Raid0 if t.has_data() => {
                let first = off >> l.strip_shift;
                let last = (off + n - 1) >> l.strip_shift;
                (last - first + 1) as u32
            }
            Level::Raid0 => {
                let first = off >> l.strip_shift;
                let last = (off + n - 1) >> l.strip_shift;
                (last - first + 1).min(l.num_base as u64) as u32
            }
            _ => {
                let first = concat_member(&l.ranges, off);
                let last = concat_member(&l.ranges, off + n - 1);
                (last - first + 1) as u32
            }
        }
    }

    /// Piece `k` of a striped I/O: (member, member block offset, blocks, byte offset into the parent's data).
    fn piece(&self, io: &BdevIo, t: IoType, k: u32) -> (usize, u64, u64, u64) {
        let l = &self.layout;
        let (off, n) = (io.offset_blocks(), io.num_blocks());
        if n == 0 {
            return (k as usize, 0, 0, 0);
        }
        let bs = io.block_size() as u64;
        match l.level {
            Level::Raid0 if t.has_data() => {
                let first = off >> l.strip_shift;
                let strip = first + k as u64;
                let start = if k == 0 { off } else { strip << l.strip_shift };
                let end = ((strip + 1) << l.strip_shift).min(off + n);
                let within = start & (l.strip_size - 1);
                let member = (strip % l.num_base as u64) as usize;
                let lba = ((strip / l.num_base as u64) << l.strip_shift) + within;
                (member, lba, end - start, (start - off) * bs)
            }
            Level::Raid0 => {
                // One contiguous range per member (SPDK's null-payload split).
                let nb = l.num_base as u64;
                let ss = l.strip_size;
                let last_blk = off + n - 1;
                let start_strip = off >> l.strip_shift;
                let end_strip = last_blk >> l.strip_shift;
                let start_disk = start_strip % nb;
                let end_disk = end_strip % nb;
                let disk = (start_disk + k as u64) % nb;
                let mut s_in_disk = start_strip / nb;
                if disk < start_disk {
                    s_in_disk += 1;
                }
                let mut e_in_disk = end_strip / nb;
                if disk > end_disk {
                    e_in_disk -= 1;
                }
                let s_off = if disk == start_disk { off % ss } else { 0 };
                let e_off = if disk == end_disk {
                    last_blk % ss
                } else {
                    ss - 1
                };
                let lba = s_in_disk * ss + s_off;
                let blocks = (e_in_disk - s_in_disk) * ss + e_off - s_off + 1;
                (disk as usize, lba, blocks, 0)
            }
            _ => {
                let m = concat_member(&l.ranges, off) + k as usize;
                let (s, e) = l.ranges[m];
                let start = off.max(s);
                let end = (off + n).min(e);
                (m, start - s, end - start, (start - off) * bs)
            }
        }
    }

    /// Submits the children of striped and reset I/O from where it stopped (a NOMEM stops it half way).
    fn fanout(&self, st: &mut ChanState, sink: &Rc<dyn IoSink>, idx: u32) -> Done {
        let i = idx as usize;
        loop {
            let ChanState { slots, bases, .. } = &mut *st;
            let parent = slots[i].as_mut().expect("parent in slot");
            let (kind, k, count) = {
                let tr = Track(&mut parent.driver_ctx);
                let count = if tr.kind() == K_STRIPED {
                    tr.total()
                } else {
                    bases.len() as u32
                };
                (tr.kind(), tr.next(), count)
            };
            if k >= count {
                break;
            }
            let (member, res) = if kind == K_STRIPED {
                let t = parent.io_type();
                let (m, lba, blocks, byte_off) = self.piece(parent, t, k);
                let Some(ch) = &bases[m].ch else {
                    parent.driver_ctx[3] |= 1 << m;
                    Track(&mut parent.driver_ctx).set_next(k + 1);
                    continue;
                };
                let lba = bases[m].offset + lba;
                let cb = Completion::Sink(sink.clone());
                let ctx = ctx_of(idx, m);
                let r = if t.has_data() {
                    let first = byte_off / parent.block_size() as u64;
                    // SAFETY: the parent (and so its buffers) stays in its slot until every child completed.
                    unsafe { ch.submit_child_range(parent, first, blocks, lba, cb, ctx) }
                } else {
                    ch.submit_nodata(t, lba, blocks, cb, ctx)
                };
                (m, r)
            } else {
                let m = k as usize;
                let Some(ch) = &bases[m].ch else {
                    Track(&mut parent.driver_ctx).set_next(k + 1);
                    continue;
                };
                let cb = Completion::Sink(sink.clone());
                (m, ch.submit_nodata(IoType::Reset, 0, 0, cb, ctx_of(idx, m)))
            };
            let mut tr = Track(&mut parent.driver_ctx);
            match res {
                Ok(()) => {
                    let r = tr.remaining();
                    tr.set_remaining(r + 1);
                    tr.set_next(k + 1);
                    bases[member].outstanding += 1;
                }
                Err(_) => {
                    // Out of descriptors: continue from here when one is returned.
                    self.wait_for_descriptor(&mut tr, idx);
                    return None;
                }
            }
        }
        self.maybe_done(st, idx)
    }

    /// raid1 writes, unmaps, write_zeroes, flushes: one child per member with a channel, from `next` on.
    fn mirror_fanout(&self, st: &mut ChanState, sink: &Rc<dyn IoSink>, idx: u32) -> Done {
        let i = idx as usize;
        let n = st.bases.len() as u32;
        loop {
            let ChanState {
                slots,
                bases,
                present,
                readers,
                ..
            } = &mut *st;
            let parent = slots[i].as_mut().expect("parent in slot");
            let next = parent.driver_ctx[1] as u32;
            let pending = if next >= 64 {
                0
            } else {
                *present & !((1u64 << next) - 1)
            };
            if pending == 0 {
                break;
            }
            let m = pending.trailing_zeros() as usize;
            let b = &mut bases[m];
            let Some(ch) = &b.ch else { break };
            let lba = b.offset + parent.offset_blocks();
            let insync = if *readers & (1 << m) != 0 {
                CTX_INSYNC
            } else {
                0
            };
            let ctx = ctx_of(idx, m) | insync;
            // SAFETY: the parent stays in its slot until every child completed, so the buffers the child
            // shares with it stay valid.
            let res = unsafe { ch.submit_child(parent, lba, Completion::Sink(sink.clone()), ctx) };
            let mut tr = Track(&mut parent.driver_ctx);
            match res {
                Ok(()) => {
                    let r = tr.remaining();
                    tr.set_remaining(r + 1);
                    tr.set_total(tr.total() + 1);
                    tr.set_next(m as u32 + 1);
                    b.outstanding += 1;
                }
                Err(_) => {
                    tr.set_next(m as u32);
                    self.wait_for_descriptor(&mut tr, idx);
                    return None;
                }
            }
        }
        if let Some(p) = st.slots[i].as_mut() {
            Track(&mut p.driver_ctx).set_next(n);
        }
        self.maybe_done(st, idx)
    }

    /// Forwards a raid1 read to the least busy in-sync member.
    fn read_first(&self, st: &mut ChanState, sink: &Rc<dyn IoSink>, io: IoHandle) -> Done {
        let bases = &st.bases;
        let mut cand = st.readers;
        if cand == 0 {
            return Some((io, IoStatus::Failed(libc::EIO)));
        }
        let mut best = cand.trailing_zeros() as usize;
        cand &= cand - 1;
        while cand != 0 {
            let m = cand.trailing_zeros() as usize;
            if bases[m].outstanding < bases[best].outstanding {
                best = m;
            }
            cand &= cand - 1;
        }
        st.active += 1;
        let off = io.offset_blocks();
        self.forward(st, sink, io, best, off, CTX_RETRY | ((best as u64) << 8));
        None
    }

    /// Sends a forwarded parent to member `m` at `lba` (in the raid's block space); `state` is kept in the
    /// context it comes back with.
    fn forward(
        &self,
        st: &mut ChanState,
        sink: &Rc<dyn IoSink>,
        io: IoHandle,
        m: usize,
        lba: u64,
        state: u64,
    ) {
        let b = &mut st.bases[m];
        let ch = b.ch.as_ref().expect("forwarded to a member with a channel");
        let ctx = state | CTX_FWD | m as u64;
        ch.forward(io, b.offset + lba, Completion::Sink(sink.clone()), ctx);
        b.outstanding += 1;
    }

    /// Forwards a raid0/concat I/O that falls in one piece to its member.
    fn forward_piece(&self, st: &mut ChanState, sink: &Rc<dyn IoSink>, io: IoHandle) -> Done {
        let (m, lba, _, _) = self.piece(&io, io.io_type(), 0);
        if st.bases[m].ch.is_none() {
            return Some((io, IoStatus::Failed(libc::EIO)));
        }
        st.active += 1;
        self.forward(st, sink, io, m, lba, 0);
        None
    }

    /// A forwarded parent came back from member `m`: complete it, or retry a raid1 read on the next mirror.
    fn forwarded_done(&self, st: &mut ChanState, mut io: IoHandle, ctx: u64) -> Done {
        let m = (ctx & 0x3f) as usize;
        st.bases[m].outstanding = st.bases[m].outstanding.saturating_sub(1);
        let status = io.status();
        io.restore();
        if status == IoStatus::Success {
            st.active -= 1;
            return Some((io, IoStatus::Success));
        }
        if ctx & CTX_RETRY != 0 {
            // The next in-sync mirror after `m`, in slot order, short of the one read first.
            let first = ((ctx >> 8) & 0x3f) as usize;
            let n = st.bases.len();
            let mut k = (m + 1) % n;
            while k != first {
                if st.readers & (1 << k) != 0 {
                    log::warn!("raid read failed on member {m}, trying member {k}");
                    let sink = self.sink();
                    let off = io.offset_blocks();
                    self.forward(st, &sink, io, k, off, ctx & !0x3f);
                    return None;
                }
                k = (k + 1) % n;
            }
            // Every mirror failed: the member read first is failed (as SPDK does).
            self.report_failure(st, first);
        }
        st.active -= 1;
        // The member's own status (an NVMe status reaches the host as the drive gave it).
        Some((io, status))
    }

    /// The status of a parent whose children all completed.
    fn final_status(kind: u64, tr: &Track<'_>) -> IoStatus {
        let ok = match kind {
            K_MIRROR => tr.ok() != 0,
            K_RESET => tr.failed() == 0,
            _ => tr.failed() == 0 && tr.next() > 0,
        };
        if ok {
            IoStatus::Success
        } else {
            IoStatus::Failed(libc::EIO)
        }
    }

    /// Completes slot `idx`; a raid1 write that failed on some member is parked until that failure is recorded.
    fn finish(&self, st: &mut ChanState, idx: u32, status: IoStatus) -> Done {
        let i = idx as usize;
        let (kind, failed) = {
            let p = st.slots[i].as_ref().expect("parent in slot");
            (p.driver_ctx[0] & 0xff, p.driver_ctx[3])
        };
        if kind == K_MIRROR && failed != 0 {
            let mut waits = Vec::new();
            for (m, b) in st.bases.iter().enumerate() {
                if failed & (1 << m) != 0 {
                    waits.push((m, b.gen));
                }
            }
            let parent = st.slots[i].take();
            // Its data is on every member still in use: a rebuild window need not wait for it (it waits for
            // the failed member's removal, which may wait for the rebuild to stop).
            if let Some(p) = &parent {
                p.settled();
            }
            st.free_slot(idx);
            st.parked.push(Parked {
                parent,
                status,
                waits,
            });
            return None;
        }
        st.release(idx, status)
    }

    /// Tells the app thread that member `m` failed I/O (once per membership); the channel stops using it now.
    fn report_failure(&self, st: &mut ChanState, m: usize) {
        let gen = st.bases[m].gen;
        st.detach(m);
        if st.reported[m] == Some(gen) {
            return;
        }
        st.reported[m] = Some(gen);
        let raid = self.raid.clone();
        // Failure path only: the message allocates.
        if let Some(app) = reactor::app_thread() {
            app.send(move || {
                if let Some(r) = raid.upgrade() {
                    crate::raid::fail_base(&r, m, gen);
                }
            });
        }
    }

    fn child_done(&self, st: &mut ChanState, idx: u32, ctx: u64, ok: bool) -> Done {
        let i = idx as usize;
        let m = (ctx & 0x3f) as usize;
        st.bases[m].outstanding = st.bases[m].outstanding.saturating_sub(1);
        let Some(parent) = st.slots[i].as_mut() else {
            log::error!("raid: completion for a free slot {idx}");
            return None;
        };
        let mut tr = Track(&mut parent.driver_ctx);
        let r = tr.remaining();
        tr.set_remaining(r.saturating_sub(1));
        match tr.kind() {
            K_MIRROR => {
                if ok {
                    if ctx & CTX_INSYNC != 0 {
                        tr.0[2] |= 1 << m;
                    }
                } else {
                    tr.0[3] |= 1 << m;
                    self.report_failure(st, m);
                }
                self.maybe_done(st, idx)
            }
            _ => {
                if !ok {
                    tr.0[3] |= 1 << m;
                }
                self.maybe_done(st, idx)
            }
        }
    }

    /// Completes slot `idx` if every child was sent and completed.
    fn maybe_done(&self, st: &mut ChanState, idx: u32) -> Done {
        let n = st.bases.len() as u32;
        let p = st.slots[idx as usize].as_mut().expect("parent in slot");
        let tr = Track(&mut p.driver_ctx);
        let kind = tr.kind();
        let count = if kind == K_STRIPED { tr.total() } else { n };
        if tr.remaining() == 0 && tr.next() >= count && !tr.queued() {
            let s = Self::final_status(kind, &tr);
            return self.finish(st, idx, s);
        }
        None
    }

    /// Out of descriptors: wait in the pool's queue (first come, first served as descriptors are returned), then
    /// continue slot `idx` from where it stopped.
    fn wait_for_descriptor(&self, tr: &mut Track<'_>, idx: u32) {
        if tr.queued() {
            return;
        }
        tr.set_queued(true);
        let me = self.me.clone();
        // Exhaustion path only: the waiter allocates.
        bdev::queue_io_wait(move || {
            if let Some(c) = me.upgrade() {
                c.resume(idx);
            }
        });
    }

    /// Continues slot `idx` now that a descriptor was returned.
    fn resume(&self, idx: u32) {
        let done = {
            let Ok(mut st) = self.st.try_borrow_mut() else {
                // Returned while this channel is busy: wait for the next one.
                let me = self.me.clone();
                bdev::queue_io_wait(move || {
                    if let Some(c) = me.upgrade() {
                        c.resume(idx);
                    }
                });
                return;
            };
            let Some(p) = st.slots[idx as usize].as_mut() else {
                return;
            };
            let mut tr = Track(&mut p.driver_ctx);
            tr.set_queued(false);
            let kind = tr.kind();
            let sink = self.sink();
            match kind {
                K_MIRROR => self.mirror_fanout(&mut st, &sink, idx),
                K_FREE => None,
                _ => self.fanout(&mut st, &sink, idx),
            }
        };
        if let Some((io, s)) = done {
            io.complete(s);
        }
    }

    /// Runs held I/O that may go now.
    fn run_queues(&self) -> bool {
        {
            let st = self.st.borrow();
            if st.waiting.is_empty() {
                return false;
            }
        }
        let sink = self.sink();
        let mut did = false;
        let n = self.st.borrow().waiting.len();
        for _ in 0..n {
            let done = {
                let mut st = self.st.borrow_mut();
                if st.quiesced {
                    break;
                }
                let Some(io) = st.waiting.pop_front() else {
                    break;
                };
                let before = st.waiting.len();
                let d = self.start(&mut st, &sink, io);
                if st.waiting.len() == before {
                    did = true;
                }
                d
            };
            if let Some((io, s)) = done {
                io.complete(s);
            }
        }
        did
    }

    /// Completes the parked writes that waited for member `m` (generation `gen`) to be recorded as gone.
    pub(crate) fn release_parked(&self, m: usize, gen: u32) {
        let mut out = Vec::new();
        {
            let mut st = self.st.borrow_mut();
            st.parked.retain_mut(|p| {
                p.waits.retain(|w| *w != (m, gen));
                if p.waits.is_empty() {
                    if let Some(io) = p.parent.take() {
                        out.push((io, p.status));
                    }
                    false
                } else {
                    true
                }
            });
        }
        for (io, s) in out {
            io.complete(s);
        }
    }
}

fn ctx_of(idx: u32, m: usize) -> u64 {
    ((idx as u64) << 8) | m as u64
}

/// The concat member holding block `b`.
fn concat_member(ranges: &[(u64, u64)], b: u64) -> usize {
    ranges
        .iter()
        .position(|&(s, e)| b >= s && b < e)
        .unwrap_or(ranges.len().saturating_sub(1))
}

impl ChanState {
    /// Recomputes the member masks after a change.
    fn refresh(&mut self) {
        self.present = 0;
        self.readers = 0;
        for (m, b) in self.bases.iter().enumerate() {
            if b.ch.is_some() {
                self.present |= 1 << m;
                if b.readable {
                    self.readers |= 1 << m;
                }
            }
        }
    }

    /// Member `m` as this channel sees it.
    pub(crate) fn base(&self, m: usize) -> &BaseCh {
        &self.bases[m]
    }

    /// Puts `b` in slot `m` (a rebuild target being attached).
    pub(crate) fn set_base(&mut self, m: usize, b: BaseCh) {
        self.bases[m] = b;
        self.refresh();
    }

    /// Stops using member `m` here.
    pub(crate) fn detach(&mut self, m: usize) {
        self.bases[m].ch = None;
        self.bases[m].readable = false;
        self.refresh();
    }

    /// Lets reads go to member `m` (generation `gen`), once it is in sync.
    pub(crate) fn make_readable(&mut self, m: usize, gen: u32) {
        let b = &mut self.bases[m];
        if b.gen == gen {
            b.readable = b.ch.is_some();
            self.refresh();
        }
    }

    fn alloc(&mut self, mut io: IoHandle, kind: u64, total: u32) -> u32 {
        io.driver_ctx = [kind, (total as u64) << 32, 0, 0];
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                // Grow once by doubling; steady state never gets here.
                let old = self.slots.len();
                self.slots.resize_with(old * 2, || None);
                self.free.extend((old as u32 + 1..(old * 2) as u32).rev());
                old as u32
            }
        };
        self.slots[idx as usize] = Some(io);
        self.active += 1;
        idx
    }

    fn free_slot(&mut self, idx: u32) {
        self.free.push(idx);
        self.active -= 1;
    }

    fn release(&mut self, idx: u32, status: IoStatus) -> Done {
        let parent = self.slots[idx as usize].take();
        self.free_slot(idx);
        parent.map(|p| (p, status))
    }
}

impl IoSink for RaidChan {
    fn io_done(&self, child: IoHandle) {
        let ctx = child.ctx;
        if ctx & CTX_FWD != 0 {
            let done = {
                let mut st = self.st.borrow_mut();
                self.forwarded_done(&mut st, child, ctx)
            };
            if let Some((io, s)) = done {
                io.complete(s);
            }
            return;
        }
        let ok = child.success();
        drop(child);
        let done = {
            let mut st = self.st.borrow_mut();
            self.child_done(&mut st, (ctx >> 8) as u32, ctx, ok)
        };
        if let Some((io, s)) = done {
            io.complete(s);
        }
    }
}

/// The module channel the bdev layer calls.
pub(crate) struct RaidModuleChannel {
    /// Keeps this thread's channel registered with the raid's I/O device.
    pub _h: Rc<ChanHandle>,
    pub chan: Rc<RaidChan>,
    pub sink: Rc<dyn IoSink>,
}

impl ModuleChannel for RaidModuleChannel {
    fn submit(&mut self, io: IoHandle) {
        let chan = &self.chan;
        let done = {
            let mut st = chan.st.borrow_mut();
            chan.start(&mut st, &self.sink, io)
        };
        if let Some((io, s)) = done {
            io.complete(s);
        }
    }

    fn poll(&mut self) -> bool {
        self.chan.run_queues()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_member_lookup() {
        let r = [(0, 10), (10, 30), (30, 31)];
        assert_eq!(concat_member(&r, 0), 0);
        assert_eq!(concat_member(&r, 9), 0);
        assert_eq!(concat_member(&r, 10), 1);
        assert_eq!(concat_member(&r, 30), 2);
    }
}
