//! Per-thread raid channels: the I/O path of raid1, raid0 and concat.
//!
//! A channel holds this thread's channels on the members, a slab of in-flight parent I/Os (a parent waits in
//! its slot until its children complete), per-member outstanding counters for read balancing, and queues for
//! I/O held back by a quiesce or by the rebuild window. Everything is per thread in a `RefCell`: no lock, no
//! shared atomic, and after warm-up no allocation per I/O (children come from the bdev pool, completions are
//! routed through one `Rc<dyn IoSink>`, slots and queues keep their capacity).
//!
//! Control-plane changes (a member removed, a rebuild target attached, a quiesce) reach channels as messages
//! ([`crate::raid`] walks every thread holding one), never as shared state read on the I/O path.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Weak as ArcWeak};

use bdev::{
    BdevIo, Completion, IoChannel, IoHandle, IoSink, IoStatus, IoType, IoVec, ModuleChannel,
};

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Free,
    /// raid1 write, unmap, write_zeroes, flush: one child per member.
    Mirror,
    /// raid1 read: one child, retried on another member on failure.
    Read,
    /// raid0/concat: one child per strip or member piece.
    Striped,
    /// Reset: one child per member.
    Reset,
}

struct Slot {
    parent: Option<IoHandle>,
    kind: Kind,
    /// Children in flight.
    remaining: u32,
    /// Next member (Mirror, Reset) or piece (Striped) to submit.
    next: u32,
    /// Pieces in all (Striped).
    total: u32,
    ok: u64,
    failed: u64,
    /// Members that were in sync when the I/O was submitted (Mirror).
    insync: u64,
    /// Members tried (Read).
    tried: u64,
    /// First member a read went to (failed when every mirror fails).
    first: u8,
    /// Waiting in the resume queue.
    queued: bool,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            parent: None,
            kind: Kind::Free,
            remaining: 0,
            next: 0,
            total: 0,
            ok: 0,
            failed: 0,
            insync: 0,
            tried: 0,
            first: 0,
            queued: false,
        }
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
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Parents in slots (submitted to members, not parked).
    pub active: usize,
    /// Hold every new I/O (quiesce).
    pub quiesced: bool,
    /// Hold new writes into this range (the rebuild window being copied).
    pub lock: Option<(u64, u64)>,
    waiting: VecDeque<IoHandle>,
    resume: VecDeque<u32>,
    parked: Vec<Parked>,
    /// Last generation reported failed, per member.
    reported: Vec<Option<u32>>,
    scratch: Vec<IoVec>,
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

fn is_write(t: IoType) -> bool {
    matches!(t, IoType::Write | IoType::Unmap | IoType::WriteZeroes)
}

fn overlaps(io: &BdevIo, r: (u64, u64)) -> bool {
    let end = io.offset_blocks() + io.num_blocks();
    io.offset_blocks() < r.1 && r.0 < end
}

type Done = Option<(IoHandle, IoStatus)>;

impl RaidChan {
    pub(crate) fn create(
        raid: ArcWeak<Raid>,
        layout: Arc<Layout>,
        bases: Vec<BaseCh>,
        quiesced: bool,
        lock: Option<(u64, u64)>,
    ) -> ChanHandle {
        let n = bases.len();
        let mut slots = Vec::with_capacity(INITIAL_SLOTS);
        slots.resize_with(INITIAL_SLOTS, Slot::empty);
        let free = (0..INITIAL_SLOTS as u32).rev().collect();
        let mut st = ChanState {
            bases,
            present: 0,
            readers: 0,
            slots,
            free,
            active: 0,
            quiesced,
            lock,
            waiting: VecDeque::with_capacity(64),
            resume: VecDeque::with_capacity(64),
            parked: Vec::new(),
            reported: vec![None; n],
            scratch: Vec::with_capacity(32),
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
        if st.quiesced || (is_write(io.io_type()) && st.lock.is_some_and(|r| overlaps(&io, r))) {
            st.waiting.push_back(io);
            return None;
        }
        let t = io.io_type();
        if t == IoType::Reset {
            let idx = st.alloc(io, Kind::Reset);
            return self.fanout(st, sink, idx);
        }
        match self.layout.level {
            Level::Raid1 => {
                if t == IoType::Read {
                    let idx = st.alloc(io, Kind::Read);
                    self.read_next(st, sink, idx)
                } else {
                    let idx = st.alloc(io, Kind::Mirror);
                    st.slots[idx as usize].insync = st.readers;
                    self.mirror_fanout(st, sink, idx)
                }
            }
            Level::Raid0 | Level::Concat => {
                let total = self.pieces(&io, t);
                let idx = st.alloc(io, Kind::Striped);
                st.slots[idx as usize].total = total;
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

    /// Submits the children of slot `idx` from where it stopped (a NOMEM stops it half way).
    fn fanout(&self, st: &mut ChanState, sink: &Rc<dyn IoSink>, idx: u32) -> Done {
        let i = idx as usize;
        let kind = st.slots[i].kind;
        let count = match kind {
            Kind::Striped => st.slots[i].total,
            _ => st.bases.len() as u32,
        };
        while st.slots[i].next < count {
            let k = st.slots[i].next;
            let ChanState {
                slots,
                bases,
                scratch,
                ..
            } = st;
            let slot = &mut slots[i];
            let parent = slot.parent.as_ref().expect("parent in slot");
            let (member, res) = match kind {
                Kind::Striped => {
                    let t = parent.io_type();
                    let (m, lba, blocks, byte_off) = self.piece(parent, t, k);
                    let Some(ch) = &bases[m].ch else {
                        slot.failed |= 1 << m;
                        slot.next += 1;
                        continue;
                    };
                    let lba = bases[m].offset + lba;
                    let ctx = ctx_of(idx, m);
                    let cb = Completion::Sink(sink.clone());
                    let r = if t.has_data() {
                        sub_iovs(
                            parent.iovs(),
                            byte_off,
                            blocks * parent.block_size() as u64,
                            scratch,
                        );
                        // SAFETY: the parent (and so its buffers) stays in its slot until every child completed;
                        // the sub-iovecs lie inside the parent's iovecs.
                        unsafe {
                            if t == IoType::Read {
                                ch.readv(scratch, lba, blocks, cb, ctx)
                            } else {
                                ch.writev(scratch, lba, blocks, cb, ctx)
                            }
                        }
                    } else {
                        ch.submit_nodata(t, lba, blocks, cb, ctx)
                    };
                    (m, r)
                }
                Kind::Reset => {
                    let m = k as usize;
                    let Some(ch) = &bases[m].ch else {
                        slot.next += 1;
                        continue;
                    };
                    let cb = Completion::Sink(sink.clone());
                    (m, ch.submit_nodata(IoType::Reset, 0, 0, cb, ctx_of(idx, m)))
                }
                _ => {
                    let m = k as usize;
                    let Some(ch) = &bases[m].ch else {
                        slot.next += 1;
                        continue;
                    };
                    let lba = bases[m].offset + parent.offset_blocks();
                    let cb = Completion::Sink(sink.clone());
                    // SAFETY: the parent stays in its slot until every child completed, so the buffers the
                    // child shares with it stay valid.
                    (m, unsafe {
                        ch.submit_child(parent, lba, cb, ctx_of(idx, m))
                    })
                }
            };
            match res {
                Ok(()) => {
                    slot.remaining += 1;
                    slot.next += 1;
                    bases[member].outstanding += 1;
                }
                Err(_) => {
                    // Out of descriptors: nothing sent yet means the bdev layer may retry the whole I/O;
                    // otherwise continue from here once descriptors come back.
                    if slot.remaining == 0 && slot.next == 0 {
                        return st.release(idx, IoStatus::NoMem);
                    }
                    if !slot.queued {
                        slot.queued = true;
                        st.resume.push_back(idx);
                    }
                    return None;
                }
            }
        }
        if st.slots[i].remaining == 0 {
            let s = self.final_status(&st.slots[i]);
            return self.finish(st, idx, s);
        }
        None
    }

    /// raid1 writes, unmaps, write_zeroes, flushes: one child per member with a channel, from `next` on.
    fn mirror_fanout(&self, st: &mut ChanState, sink: &Rc<dyn IoSink>, idx: u32) -> Done {
        let i = idx as usize;
        let n = st.bases.len() as u32;
        loop {
            let next = st.slots[i].next;
            let pending = if next >= 64 {
                0
            } else {
                st.present & !((1u64 << next) - 1)
            };
            if pending == 0 {
                break;
            }
            let m = pending.trailing_zeros() as usize;
            let ChanState { slots, bases, .. } = &mut *st;
            let slot = &mut slots[i];
            let parent = slot.parent.as_ref().expect("parent in slot");
            let b = &mut bases[m];
            let Some(ch) = &b.ch else { break };
            let lba = b.offset + parent.offset_blocks();
            // SAFETY: the parent stays in its slot until every child completed, so the buffers the child
            // shares with it stay valid.
            let res = unsafe {
                ch.submit_child(parent, lba, Completion::Sink(sink.clone()), ctx_of(idx, m))
            };
            match res {
                Ok(()) => {
                    slot.remaining += 1;
                    slot.total += 1;
                    slot.next = m as u32 + 1;
                    b.outstanding += 1;
                }
                Err(_) => {
                    slot.next = m as u32;
                    if slot.total == 0 {
                        return st.release(idx, IoStatus::NoMem);
                    }
                    if !slot.queued {
                        slot.queued = true;
                        st.resume.push_back(idx);
                    }
                    return None;
                }
            }
        }
        st.slots[i].next = n;
        if st.slots[i].remaining == 0 {
            let s = self.final_status(&st.slots[i]);
            return self.finish(st, idx, s);
        }
        None
    }

    fn final_status(&self, slot: &Slot) -> IoStatus {
        match slot.kind {
            Kind::Mirror => {
                if slot.ok & slot.insync != 0 {
                    IoStatus::Success
                } else {
                    IoStatus::Failed(libc::EIO)
                }
            }
            Kind::Reset => {
                if slot.failed == 0 {
                    IoStatus::Success
                } else {
                    IoStatus::Failed(libc::EIO)
                }
            }
            _ => {
                if slot.failed == 0 && slot.next > 0 {
                    IoStatus::Success
                } else {
                    IoStatus::Failed(libc::EIO)
                }
            }
        }
    }

    /// Sends a raid1 read to the least busy in-sync member not tried yet.
    fn read_next(&self, st: &mut ChanState, sink: &Rc<dyn IoSink>, idx: u32) -> Done {
        let i = idx as usize;
        let tried = st.slots[i].tried;
        let mut cand = st.readers & !tried;
        let best = if cand == 0 {
            None
        } else {
            let mut best = cand.trailing_zeros() as usize;
            cand &= cand - 1;
            while cand != 0 {
                let m = cand.trailing_zeros() as usize;
                if st.bases[m].outstanding < st.bases[best].outstanding {
                    best = m;
                }
                cand &= cand - 1;
            }
            Some(best)
        };
        let Some(m) = best else {
            if tried != 0 {
                // Every mirror failed: the member read first is failed (as SPDK does).
                let first = st.slots[i].first as usize;
                self.report_failure(st, first);
            }
            return self.finish(st, idx, IoStatus::Failed(libc::EIO));
        };
        let ChanState { slots, bases, .. } = st;
        let slot = &mut slots[i];
        let parent = slot.parent.as_ref().expect("parent in slot");
        let b = &mut bases[m];
        let lba = b.offset + parent.offset_blocks();
        let cb = Completion::Sink(sink.clone());
        // SAFETY: the parent stays in its slot until the child completed.
        let res = unsafe {
            b.ch.as_ref()
                .expect("checked")
                .submit_child(parent, lba, cb, ctx_of(idx, m))
        };
        match res {
            Ok(()) => {
                if tried == 0 {
                    slot.first = m as u8;
                }
                slot.tried |= 1 << m;
                slot.remaining = 1;
                b.outstanding += 1;
                None
            }
            Err(_) if tried == 0 => st.release(idx, IoStatus::NoMem),
            Err(_) => {
                if !slot.queued {
                    slot.queued = true;
                    st.resume.push_back(idx);
                }
                None
            }
        }
    }

    /// Completes slot `idx`; a raid1 write that failed on some member is parked until that failure is recorded.
    fn finish(&self, st: &mut ChanState, idx: u32, status: IoStatus) -> Done {
        let slot = &st.slots[idx as usize];
        if slot.kind == Kind::Mirror && slot.failed != 0 {
            let mut waits = Vec::new();
            for (m, b) in st.bases.iter().enumerate() {
                if slot.failed & (1 << m) != 0 {
                    waits.push((m, b.gen));
                }
            }
            let parent = st.slots[idx as usize].parent.take();
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

    fn child_done(&self, st: &mut ChanState, idx: u32, m: usize, ok: bool) -> Done {
        let i = idx as usize;
        st.bases[m].outstanding = st.bases[m].outstanding.saturating_sub(1);
        let kind = st.slots[i].kind;
        st.slots[i].remaining -= 1;
        match kind {
            Kind::Read => {
                if ok {
                    return self.finish(st, idx, IoStatus::Success);
                }
                log::warn!("raid read failed on member {m}, trying another mirror");
                let sink = self.sink();
                self.read_next(st, &sink, idx)
            }
            Kind::Mirror => {
                if ok {
                    st.slots[i].ok |= 1 << m;
                } else {
                    st.slots[i].failed |= 1 << m;
                    self.report_failure(st, m);
                }
                self.maybe_done(st, idx)
            }
            Kind::Striped | Kind::Reset => {
                if !ok {
                    st.slots[i].failed |= 1 << m;
                }
                self.maybe_done(st, idx)
            }
            Kind::Free => {
                log::error!("raid: completion for a free slot {idx}");
                None
            }
        }
    }

    fn maybe_done(&self, st: &mut ChanState, idx: u32) -> Done {
        let slot = &st.slots[idx as usize];
        let count = match slot.kind {
            Kind::Striped => slot.total,
            _ => st.bases.len() as u32,
        };
        if slot.remaining == 0 && slot.next >= count && !slot.queued {
            let s = self.final_status(slot);
            return self.finish(st, idx, s);
        }
        None
    }

    /// Runs queued work: I/O waiting for descriptors, and held I/O that may go now.
    fn run_queues(&self) -> bool {
        {
            let st = self.st.borrow();
            if st.resume.is_empty() && st.waiting.is_empty() {
                return false;
            }
        }
        let sink = self.sink();
        let mut did = false;
        let n = self.st.borrow().resume.len();
        for _ in 0..n {
            let done = {
                let mut st = self.st.borrow_mut();
                let Some(idx) = st.resume.pop_front() else {
                    break;
                };
                st.slots[idx as usize].queued = false;
                did = true;
                match st.slots[idx as usize].kind {
                    Kind::Read => self.read_next(&mut st, &sink, idx),
                    Kind::Mirror => self.mirror_fanout(&mut st, &sink, idx),
                    Kind::Free => None,
                    _ => self.fanout(&mut st, &sink, idx),
                }
            };
            if let Some((io, s)) = done {
                io.complete(s);
            }
        }
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
                did = true;
                self.start(&mut st, &sink, io)
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

    /// Whether a write overlapping `r` is in flight here.
    pub(crate) fn writes_in_range(&self, r: (u64, u64)) -> bool {
        let st = self.st.borrow();
        st.slots.iter().any(|s| {
            s.kind != Kind::Free
                && s.parent
                    .as_ref()
                    .is_some_and(|p| is_write(p.io_type()) && overlaps(p, r))
        })
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

/// Fills `out` with the part `[off, off + len)` (bytes) of `iovs`.
fn sub_iovs(iovs: &[IoVec], mut off: u64, mut len: u64, out: &mut Vec<IoVec>) {
    out.clear();
    for v in iovs {
        if len == 0 {
            break;
        }
        let vl = v.len as u64;
        if off >= vl {
            off -= vl;
            continue;
        }
        let take = (vl - off).min(len);
        // SAFETY: `off < v.len`, so the pointer stays inside the caller's iovec.
        let base = unsafe { v.base.add(off as usize) };
        out.push(IoVec {
            base,
            len: take as usize,
        });
        len -= take;
        off = 0;
    }
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

    fn alloc(&mut self, io: IoHandle, kind: Kind) -> u32 {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                // Grow once by doubling; steady state never gets here.
                let old = self.slots.len();
                self.slots.resize_with(old * 2, Slot::empty);
                self.free.extend((old as u32 + 1..(old * 2) as u32).rev());
                old as u32
            }
        };
        let s = &mut self.slots[idx as usize];
        s.parent = Some(io);
        s.kind = kind;
        s.remaining = 0;
        s.next = 0;
        s.total = 0;
        s.ok = 0;
        s.failed = 0;
        s.insync = 0;
        s.tried = 0;
        s.first = 0;
        s.queued = false;
        self.active += 1;
        idx
    }

    fn free_slot(&mut self, idx: u32) {
        let s = &mut self.slots[idx as usize];
        s.kind = Kind::Free;
        s.parent = None;
        self.free.push(idx);
        self.active -= 1;
    }

    fn release(&mut self, idx: u32, status: IoStatus) -> Done {
        let parent = self.slots[idx as usize].parent.take();
        self.free_slot(idx);
        parent.map(|p| (p, status))
    }
}

impl IoSink for RaidChan {
    fn io_done(&self, child: IoHandle) {
        let ok = child.success();
        let ctx = child.ctx;
        drop(child);
        let done = {
            let mut st = self.st.borrow_mut();
            self.child_done(&mut st, (ctx >> 8) as u32, (ctx & 0xff) as usize, ok)
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
    fn sub_iovs_cuts_ranges() {
        let mut a = [0u8; 100];
        let mut b = [0u8; 50];
        let iovs = [
            IoVec {
                base: a.as_mut_ptr(),
                len: 100,
            },
            IoVec {
                base: b.as_mut_ptr(),
                len: 50,
            },
        ];
        let mut out = Vec::new();
        sub_iovs(&iovs, 90, 30, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len, 10);
        assert_eq!(out[0].base, a[90..].as_mut_ptr());
        assert_eq!(out[1].len, 20);
        assert_eq!(out[1].base, b.as_mut_ptr());
        sub_iovs(&iovs, 100, 50, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len, 50);
    }

    #[test]
    fn concat_member_lookup() {
        let r = [(0, 10), (10, 30), (30, 31)];
        assert_eq!(concat_member(&r, 0), 0);
        assert_eq!(concat_member(&r, 9), 0);
        assert_eq!(concat_member(&r, 10), 1);
        assert_eq!(concat_member(&r, 30), 2);
    }
}
