//! Per-thread bdev channels: validation, submission to the module, deferred completion, NOMEM retry, stats.
//!
//! A completion that happens while the module is inside `submit` or `poll` is queued and delivered by the
//! thread's bdev poller right after, so callbacks never re-enter a module (and the stack never grows with queue
//! depth). That one poller per thread visits only channels with work, so idle bdevs cost nothing per iteration.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::OnceLock;

use reactor::dma::DmaBuf;
use reactor::{ticks, IoDevice, Poller};

use crate::bdev::{Bdev, HistogramCfg, ModuleChannel};
use crate::error::{BdevError, ErrorKind, Result};
use crate::histogram::Histogram;
use crate::io::{self, BdevIo, Completion, IoHandle, IoId, IoStatus, IoType, IoVec};
use crate::stat::{IoStat, ResetMode};

pub(crate) struct ChannelCore {
    bdev: Bdev,
    block_size: u32,
    align_mask: usize,
    supported: [bool; IoType::COUNT],
    module: RefCell<Box<dyn ModuleChannel>>,
    /// The bdev state of the thread this channel belongs to (it polls the channel while the channel is active).
    thread: Rc<BdevThread>,
    in_module: Cell<bool>,
    /// On the thread's active list: something is outstanding, queued or wants polling.
    active: Cell<bool>,
    deferred: RefCell<VecDeque<IoHandle>>,
    nomem: RefCell<VecDeque<IoHandle>>,
    outstanding: Cell<u64>,
    stats: RefCell<ChanStats>,
    /// How the module wants reads and writes cut (from the bdev's parameters).
    split: SplitRules,
    /// I/Os being served in pieces, by slot (the pieces carry the slot in `ctx`), and the free slots.
    splits: RefCell<(Vec<Option<IoHandle>>, Vec<u64>)>,
    /// A reset of the bdev is in progress: new I/O is aborted, as SPDK does.
    frozen: Cell<bool>,
    /// Resets submitted here that wait for the one in progress (completed with its status), or, first, the
    /// one waiting for every channel to freeze.
    resets: RefCell<VecDeque<IoHandle>>,
    /// The module is executing a reset submitted here (a forwarded reset carries one descriptor through
    /// several bdevs, so this is the channel's state, not the descriptor's).
    executing_reset: Cell<bool>,
    /// The executed reset, done, while the channels thaw.
    thawing: RefCell<Option<IoHandle>>,
    /// LBA range locks exist: new I/O is looked at before it goes on (the only thing the I/O path reads while
    /// there is none).
    pub(crate) gate: Cell<bool>,
    /// Locked LBA ranges of the bdev (held or being taken). Writes that overlap one wait, reads too when it
    /// quiesces.
    pub(crate) locks: RefCell<Vec<LockedRange>>,
    /// I/O waiting for a lock to go, in arrival order.
    held: RefCell<VecDeque<IoHandle>>,
    /// What the module has of this channel's I/O, by [`BdevIo::slot`]: enough to find an I/O to abort and to
    /// tell whether one overlaps a range being locked, without touching descriptors the module owns.
    inflight: RefCell<InFlightTable>,
    /// The module could not make this channel: the errno every I/O fails with.
    pub(crate) failed: Option<i32>,
}

/// A locked LBA range as each channel keeps it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LockedRange {
    pub(crate) id: u64,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    /// Reads wait too (SPDK's quiesce).
    pub(crate) quiesce: bool,
}

impl LockedRange {
    /// Whether an I/O of type `t` over `len` blocks at `offset` must wait for this range (the holder's own
    /// I/O never reaches this test).
    fn blocks(&self, t: IoType, offset: u64, len: u64) -> bool {
        let kind = match t {
            // Not decoded: assumed to touch the range, as SPDK assumes.
            IoType::NvmeIo => return true,
            IoType::NvmeAdmin => false,
            IoType::Read => self.quiesce,
            _ => t.is_write() || t == IoType::Compare,
        };
        kind && offset < self.offset + self.len && self.offset < offset + len.max(1)
    }
}

/// One I/O the module has (see [`ChannelCore::inflight`]), in 32 bytes.
#[derive(Clone, Copy)]
struct InFlight {
    /// The descriptor's [`IoId`]; 0: the entry is free, and `ctx` links to the next free one.
    id: u64,
    ctx: u64,
    offset: u64,
    /// Blocks, saturated ([`u32::MAX`]: to the end of the bdev, for an unmap that large).
    blocks: u32,
    io_type: IoType,
    /// The descriptor's flags ([`io::LOCK_OWNER`], [`io::SPLIT_CHILD`]); [`SPLIT_PARENT`] for an I/O served
    /// in pieces (the pieces are entries of their own).
    flags: u8,
}

impl InFlight {
    fn len(&self) -> u64 {
        match self.blocks {
            u32::MAX => u64::MAX - self.offset,
            b => b as u64,
        }
    }
    fn live(&self) -> bool {
        self.id != 0
    }
}

/// Largest piece of an emulated copy (SPDK cuts its emulated copies at its large buffer size, 128 KiB).
const COPY_PIECE_BYTES: u64 = 128 * 1024;

/// A copy emulated by reads and writes through one buffer, a piece at a time; backwards when the source lies
/// before an overlapping destination, so no piece reads blocks an earlier piece wrote.
struct CopyJob {
    ch: IoChannel,
    /// The copy's descriptor (never submitted): range, source, and the caller's callback.
    io: IoHandle,
    piece: u64,
    done: u64,
    backwards: bool,
}

impl CopyJob {
    fn start(ch: IoChannel, io: IoHandle) {
        let (dst, src, n) = (io.offset_blocks, io.copy_source(), io.num_blocks);
        let piece = (COPY_PIECE_BYTES / io.block_size as u64).clamp(1, n);
        let backwards = src < dst && dst < src + n;
        let buf = match DmaBuf::alloc((piece * io.block_size as u64) as usize) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("{}: emulated copy: {e}", ch.core.bdev.name());
                let mut io = io;
                io.status = IoStatus::Failed(libc::ENOMEM);
                ch.core.deliver_later(io);
                return;
            }
        };
        let job = CopyJob {
            ch,
            io,
            piece,
            done: 0,
            backwards,
        };
        job.next(buf);
    }

    /// Blocks of the next piece and its offset from the start of both ranges.
    fn next_piece(&self) -> (u64, u64) {
        let n = self.io.num_blocks;
        let k = self.piece.min(n - self.done);
        let at = if self.backwards {
            n - self.done - k
        } else {
            self.done
        };
        (at, k)
    }

    /// Reads the next piece into `buf`, or completes the copy when none is left.
    fn next(self, buf: DmaBuf) {
        if self.done == self.io.num_blocks {
            return self.end(IoStatus::Success);
        }
        let (at, k) = self.next_piece();
        let src = self.io.copy_source() + at;
        let ch = self.ch.clone();
        let job = Rc::new(Cell::new(Some(self)));
        let j = job.clone();
        let read_done = move |mut r: IoHandle| {
            let Some(job) = j.take() else { return };
            match (r.status(), r.take_buf()) {
                (IoStatus::Success, Some(buf)) => job.write_piece(buf),
                (st, _) => job.end(st),
            }
        };
        if let Err(e) = ch.read(buf, src, k, Completion::Closure(Box::new(read_done)), 0) {
            if let Some(job) = job.take() {
                job.end(IoStatus::Failed(e.errno()));
            }
        }
    }

    fn write_piece(self, buf: DmaBuf) {
        let (at, k) = self.next_piece();
        let dst = self.io.offset_blocks + at;
        let ch = self.ch.clone();
        let job = Rc::new(Cell::new(Some(self)));
        let j = job.clone();
        let write_done = move |mut w: IoHandle| {
            let Some(mut job) = j.take() else { return };
            match (w.status(), w.take_buf()) {
                (IoStatus::Success, Some(buf)) => {
                    job.done += k;
                    job.next(buf);
                }
                (st, _) => job.end(st),
            }
        };
        if let Err(e) = ch.write(buf, dst, k, Completion::Closure(Box::new(write_done)), 0) {
            if let Some(job) = job.take() {
                job.end(IoStatus::Failed(e.errno()));
            }
        }
    }

    fn end(self, status: IoStatus) {
        let mut io = self.io;
        io.status = status;
        io.ch = None;
        run_callback(io);
    }
}

/// An abort waiting for the aborts it sent to the module.
struct AbortState {
    parent: Option<IoHandle>,
    remaining: usize,
    failed: bool,
}

impl AbortState {
    /// One of the aborts came back (or the walk that sent them ended): the last one completes the parent.
    fn one_done(st: &Rc<RefCell<AbortState>>, failed: bool) {
        let parent = {
            let mut s = st.borrow_mut();
            s.failed |= failed;
            s.remaining -= 1;
            if s.remaining > 0 {
                return;
            }
            s.parent.take()
        };
        if let Some(mut p) = parent {
            p.status = if st.borrow().failed {
                IoStatus::Failed(libc::EIO)
            } else {
                IoStatus::Success
            };
            match p.ch.take() {
                Some(ch) => ch.deliver_later(p),
                None => run_callback(p),
            }
        }
    }
}

/// [`InFlight::flags`]: the I/O is served in pieces by the layer, not by the module.
const SPLIT_PARENT: u8 = 0x80;
/// [`InFlight::flags`]: the module said the I/O's data is where it goes ([`IoHandle::settled`]).
const SETTLED: u8 = 0x40;

/// A slab of [`InFlight`] entries: a submission takes the free entry last given back (likely still in cache),
/// a completion gives it back; neither allocates once the table has grown to the channel's queue depth.
struct InFlightTable {
    entries: Vec<InFlight>,
    /// First free entry ([`io::NO_SLOT`]: none); free entries chain through their `ctx`.
    free: u32,
}

impl InFlightTable {
    fn live(&self) -> impl Iterator<Item = &InFlight> {
        self.entries.iter().filter(|e| e.live())
    }
}

/// The module channel of a channel the module could not make: every I/O fails with its errno.
struct FailedChannel(i32);

impl ModuleChannel for FailedChannel {
    fn submit(&mut self, io: IoHandle) {
        io.complete(IoStatus::Failed(self.0));
    }
}

/// Limits a module sets on the I/O it takes (reads and writes; unmap and write-zeroes sizes); the layer cuts
/// bigger ones into pieces.
#[derive(Clone, Copy, Default)]
struct SplitRules {
    /// Any limit set (the only thing the I/O path reads when none is).
    any: bool,
    /// Pieces never cross a multiple of this many blocks (0: no boundary).
    boundary: u64,
    /// Most blocks per piece (0: no limit).
    max_blocks: u64,
    /// Largest segment, bytes (0: no limit).
    max_seg: usize,
    /// Most segments per piece (0: no limit).
    max_segs: usize,
    /// Most blocks per unmap piece (0: no limit).
    max_unmap: u64,
    /// Most blocks per write-zeroes piece (0: no limit).
    max_write_zeroes: u64,
}

/// Pieces of one split I/O in flight at once, so one large I/O cannot take the whole descriptor pool.
const SPLIT_WINDOW: u64 = 32;

/// What a channel counts per completed I/O.
#[derive(Default)]
struct ChanStats {
    stat: IoStat,
    /// Latency histogram, while enabled for the bdev (`bdev_enable_histogram`).
    histogram: Option<Box<Histogram>>,
    /// The only I/O type the histogram counts (all when `None`).
    histogram_opc: Option<IoType>,
}

/// Per lightweight thread bdev state: one poller serves every channel of the thread, and visits only the
/// channels that have work (I/O outstanding in their module, completions to deliver, NOMEM retries, or a
/// module that asked to be polled). An idle bdev therefore costs nothing per reactor iteration, however many
/// channels a thread holds.
pub(crate) struct BdevThread {
    active: RefCell<Vec<Rc<ChannelCore>>>,
    /// Statistics of this thread's channels that are gone, per bdev id, so a statistics walk (which visits each
    /// thread in turn) sees every I/O exactly once while channels come and go.
    retired: RefCell<HashMap<u64, ChanStats>>,
}

/// The per-thread bdev state is itself a per-thread channel of one I/O device.
fn thread_device() -> &'static IoDevice<BdevThread> {
    static DEV: OnceLock<IoDevice<BdevThread>> = OnceLock::new();
    DEV.get_or_init(|| {
        IoDevice::new(|| BdevThread {
            active: RefCell::new(Vec::new()),
            retired: RefCell::new(HashMap::new()),
        })
    })
}

impl BdevThread {
    /// This thread's state, created (with its poller) on first use. The poller keeps it alive for as long as
    /// the thread lives, so retired statistics are not lost when the last channel goes.
    fn current() -> Rc<BdevThread> {
        let dev = thread_device();
        if let Some(t) = dev.existing_channel() {
            return t;
        }
        let t = dev.get_channel();
        let held = t.clone();
        Poller::register("bdev_channels", 0, move || held.poll()).detach();
        t
    }

    fn poll(&self) -> bool {
        let n = self.active.borrow().len();
        if n == 0 {
            return false;
        }
        let mut did = false;
        let mut settled = false;
        // By index: a completion callback may activate another channel (appended; served next iteration).
        for i in 0..n {
            let ch = self.active.borrow()[i].clone();
            did |= ch.poll();
            settled |= ch.outstanding.get() == 0;
        }
        // Only a channel with nothing outstanding can have run out of work: skip the sweep otherwise.
        if !settled {
            return did;
        }
        self.active.borrow_mut().retain(|c| {
            let keep = c.has_work();
            if !keep {
                c.active.set(false);
            }
            keep
        });
        did
    }
}

impl ChannelCore {
    pub(crate) fn new(bdev: Bdev) -> Self {
        let (module, failed): (Box<dyn ModuleChannel>, _) =
            match bdev.0.ops.try_create_channel(&bdev) {
                Ok(m) => (m, None),
                Err(e) => {
                    log::error!("{}: creating an I/O channel: {e}", bdev.name());
                    let errno = e.errno();
                    (Box::new(FailedChannel(errno)), Some(errno))
                }
            };
        let mut supported = [false; IoType::COUNT];
        for t in IoType::ALL {
            supported[t as usize] = bdev.io_type_supported(t);
        }
        let align = bdev.params().required_alignment.max(1) as usize;
        let hist = bdev.histogram_cfg();
        let p = bdev.params();
        let boundary = if p.split_on_optimal_io_boundary {
            p.optimal_io_boundary as u64
        } else {
            0
        };
        let split = SplitRules {
            any: boundary > 0
                || p.max_rw_size > 0
                || p.max_segment_size > 0
                || p.max_num_segments > 0
                || p.max_unmap > 0
                || p.max_write_zeroes > 0,
            boundary,
            max_blocks: p.max_rw_size as u64,
            max_seg: p.max_segment_size as usize,
            max_segs: p.max_num_segments as usize,
            max_unmap: p.max_unmap,
            max_write_zeroes: p.max_write_zeroes,
        };
        // Range locks held (or being taken) when the channel is made apply to it too.
        let locks = reactor::lock(&bdev.0.range_locks).snapshot();
        ChannelCore {
            block_size: bdev.block_size(),
            align_mask: align - 1,
            supported,
            bdev,
            module: RefCell::new(module),
            failed,
            thread: BdevThread::current(),
            in_module: Cell::new(false),
            active: Cell::new(false),
            deferred: RefCell::new(VecDeque::with_capacity(256)),
            nomem: RefCell::new(VecDeque::new()),
            outstanding: Cell::new(0),
            stats: RefCell::new(ChanStats {
                stat: IoStat::default(),
                histogram: hist.map(|c| Box::new(Histogram::new(c.bucket_shift))),
                histogram_opc: hist.and_then(|c| c.opc),
            }),
            split,
            splits: RefCell::new((Vec::new(), Vec::new())),
            frozen: Cell::new(false),
            resets: RefCell::new(VecDeque::new()),
            executing_reset: Cell::new(false),
            thawing: RefCell::new(None),
            gate: Cell::new(!locks.is_empty()),
            locks: RefCell::new(locks),
            held: RefCell::new(VecDeque::new()),
            inflight: RefCell::new(InFlightTable {
                entries: Vec::new(),
                free: io::NO_SLOT,
            }),
        }
    }

    /// Whether `io` must wait: writes (reads too, for a quiescing lock) wait on a locked range they overlap,
    /// unless they are the lock holder's own.
    fn must_wait(&self, io: &BdevIo) -> bool {
        if io.flags & io::LOCK_OWNER != 0 {
            return false;
        }
        self.locks
            .borrow()
            .iter()
            .any(|r| r.blocks(io.io_type, io.offset_blocks, io.num_blocks))
    }

    /// Whether the module has no I/O of this channel that range `r` must wait for (the holder's own aside;
    /// an I/O served in pieces counts as a whole, since its later pieces go on without looking at locks).
    pub(crate) fn drained(&self, r: &LockedRange) -> bool {
        !self.inflight.borrow().live().any(|e| {
            e.flags & (io::LOCK_OWNER | SETTLED) == 0 && r.blocks(e.io_type, e.offset, e.len())
        })
    }

    /// Marks entry `slot` settled (see [`IoHandle::settled`]).
    pub(crate) fn settle(&self, slot: u32) {
        if let Some(e) = self.inflight.borrow_mut().entries.get_mut(slot as usize) {
            if e.live() {
                e.flags |= SETTLED;
            }
        }
    }

    /// Notes that the module (or the split machinery, for `parent`) now has `io`.
    #[inline]
    fn track(&self, io: &mut BdevIo, parent: bool) {
        let e = InFlight {
            id: io.id().0,
            ctx: io.ctx,
            offset: io.offset_blocks,
            blocks: io.num_blocks.min(u32::MAX as u64) as u32,
            io_type: io.io_type,
            flags: io.flags | if parent { SPLIT_PARENT } else { 0 },
        };
        let mut t = self.inflight.borrow_mut();
        let slot = t.free;
        io.slot = match t.entries.get_mut(slot as usize) {
            Some(free) => {
                let next = free.ctx as u32;
                *free = e;
                t.free = next;
                slot
            }
            None => {
                t.entries.push(e);
                t.entries.len() as u32 - 1
            }
        };
    }

    /// Forgets `io` (it came back from the module).
    #[inline]
    fn untrack(&self, io: &mut BdevIo) {
        let slot = std::mem::replace(&mut io.slot, io::NO_SLOT);
        let mut t = self.inflight.borrow_mut();
        let next = t.free;
        if let Some(e) = t.entries.get_mut(slot as usize) {
            e.id = 0;
            e.ctx = next as u64;
            t.free = slot;
        }
    }

    /// Whether the module still has the I/O `id`.
    fn has_inflight(&self, id: IoId) -> bool {
        self.inflight.borrow().live().any(|e| e.id == id.0)
    }

    /// [`Self::release_held`] for the channel of the current thread (from a `for_each_channel` walk, which
    /// lends the channel by reference).
    pub(crate) fn release_held_here(&self) {
        if let Some(me) = self.bdev.0.io_device.existing_channel() {
            me.release_held();
        }
    }

    /// Sends on the waiting I/O that may go now (the rest waits again), in order.
    pub(crate) fn release_held(self: &Rc<Self>) {
        self.gate.set(!self.locks.borrow().is_empty());
        let waiting: Vec<IoHandle> = self.held.borrow_mut().drain(..).collect();
        for io in waiting {
            if self.gate.get() && self.must_wait(&io) {
                self.held.borrow_mut().push_back(io);
            } else {
                self.dispatch(io);
            }
        }
    }

    /// Sends a checked I/O on: split when the module needs pieces, else to the module.
    fn dispatch(self: &Rc<Self>, io: IoHandle) {
        if self.split.any && io.io_type.has_data() && self.needs_split(&io) {
            self.start_split(io);
        } else {
            self.submit_to_module(io);
        }
    }

    pub(crate) fn stat(&self) -> IoStat {
        self.stats.borrow().stat
    }

    /// Clears this channel's counters as `mode` says (histograms are left alone, as SPDK leaves them).
    pub(crate) fn reset_stat(&self, mode: ResetMode) {
        self.stats.borrow_mut().stat.reset(mode);
    }

    /// Starts or stops this channel's latency histogram.
    pub(crate) fn set_histogram(&self, cfg: Option<HistogramCfg>) {
        let mut s = self.stats.borrow_mut();
        s.histogram_opc = cfg.and_then(|c| c.opc);
        match cfg {
            Some(c)
                if s.histogram
                    .as_ref()
                    .is_some_and(|h| h.bucket_shift() == c.bucket_shift) => {}
            Some(c) => s.histogram = Some(Box::new(Histogram::new(c.bucket_shift))),
            None => s.histogram = None,
        }
    }

    /// A copy of this channel's histogram, if enabled.
    pub(crate) fn histogram(&self) -> Option<Histogram> {
        self.stats.borrow().histogram.as_deref().cloned()
    }

    /// Puts the channel on its thread's active list (it is polled until it has no work left).
    #[inline]
    fn activate(self: &Rc<Self>) {
        if !self.active.replace(true) {
            self.thread.active.borrow_mut().push(self.clone());
        }
    }

    fn has_work(&self) -> bool {
        self.outstanding.get() > 0
            || !self.deferred.borrow().is_empty()
            || !self.nomem.borrow().is_empty()
            || self.module.borrow().wants_poll()
    }

    fn poll(self: &Rc<Self>) -> bool {
        self.in_module.set(true);
        let did = self.module.borrow_mut().poll();
        self.in_module.set(false);
        // Only what was queued before this run: callbacks that submit again are served next iteration.
        let n = self.deferred.borrow().len();
        // One clock read for the whole batch: these completions happened during the module call just made.
        let now = if n > 0 { ticks::now() } else { 0 };
        for _ in 0..n {
            let io = {
                let mut q = self.deferred.borrow_mut();
                let io = q.pop_front();
                // The next descriptor is likely out of cache: start loading it while this one completes.
                if let Some(next) = q.front() {
                    next.prefetch();
                }
                io
            };
            match io {
                Some(io) => finish(self, io, now),
                None => break,
            }
        }
        if self.outstanding.get() == 0 && !self.nomem.borrow().is_empty() {
            self.retry_nomem(usize::MAX);
        }
        did || n > 0
    }

    fn submit_to_module(self: &Rc<Self>, mut io: IoHandle) {
        self.outstanding.set(self.outstanding.get() + 1);
        self.activate();
        self.track(&mut io, false);
        self.hand_to_module(io);
    }

    fn hand_to_module(&self, io: IoHandle) {
        self.in_module.set(true);
        self.module.borrow_mut().submit(io);
        self.in_module.set(false);
    }

    /// Queues `io` for delivery by this channel's poller without statistics (it never reached the module).
    fn deliver_later(self: &Rc<Self>, mut io: IoHandle) {
        io.submit_tick = 0;
        io.ch = None;
        self.deferred.borrow_mut().push_back(io);
        self.activate();
    }

    /// Runs abort `parent` (see [`IoChannel::abort`]): I/Os still queued in this layer complete as aborted at
    /// once; an I/O served in pieces sends no more pieces; the module gets one abort per I/O (or piece) it has.
    fn start_abort(self: &Rc<Self>, parent: IoHandle, target: u64) {
        let matches = |ctx: u64, t: IoType, flags: u8| {
            ctx == target
                && flags & io::SPLIT_CHILD == 0
                && !matches!(t, IoType::Abort | IoType::Reset)
        };
        let mut matched = 0u32;
        // Waiting for a range lock or for module resources: never reached the module.
        for q in [&self.held, &self.nomem] {
            let waiting: Vec<IoHandle> = q.borrow_mut().drain(..).collect();
            for mut io in waiting {
                if matches(io.ctx, io.io_type, io.flags) {
                    matched += 1;
                    io.status = IoStatus::Aborted;
                    io.ch = None;
                    // Counted outstanding so that its completion's accounting balances, as a frozen I/O is.
                    self.outstanding.set(self.outstanding.get() + 1);
                    self.deferred.borrow_mut().push_back(io);
                    self.activate();
                } else {
                    q.borrow_mut().push_back(io);
                }
            }
        }
        // With the module (or being cut into pieces).
        let mut in_module = Vec::new();
        let hits: Vec<InFlight> = self
            .inflight
            .borrow()
            .live()
            .filter(|e| matches(e.ctx, e.io_type, e.flags))
            .copied()
            .collect();
        for e in hits {
            matched += 1;
            let id = IoId(e.id);
            if e.flags & SPLIT_PARENT == 0 {
                in_module.push(id);
                continue;
            }
            // No more pieces; the ones out are aborted, and the parent completes as aborted once they are back.
            let slot = {
                let mut s = self.splits.borrow_mut();
                let slot =
                    s.0.iter()
                        .position(|p| p.as_ref().is_some_and(|p| p.id() == id));
                if let Some(p) = slot.and_then(|i| s.0[i].as_mut()) {
                    p.driver_ctx[2] = status_code(IoStatus::Aborted);
                }
                slot
            };
            if let Some(slot) = slot {
                in_module.extend(self.inflight.borrow().live().filter_map(|p| {
                    (p.flags & io::SPLIT_CHILD != 0 && p.ctx == slot as u64).then_some(IoId(p.id))
                }));
            }
        }
        if matched == 0 {
            // Nothing of that context here: the abort fails, as SPDK's does.
            let mut parent = parent;
            parent.status = IoStatus::Failed(libc::ENOENT);
            self.deliver_later(parent);
            return;
        }
        let state = Rc::new(RefCell::new(AbortState {
            parent: Some(parent),
            remaining: in_module.len() + 1,
            failed: false,
        }));
        for id in in_module {
            let st = state.clone();
            let me = self.clone();
            let done = move |c: IoHandle| {
                let ok = c.status == IoStatus::Success;
                drop(c);
                // A failed abort whose target has completed meanwhile did its job.
                let failed = !ok && me.has_inflight(id);
                AbortState::one_done(&st, failed);
            };
            match io::build(IoType::Abort, 0, 0, Completion::Closure(Box::new(done)), 0) {
                Some(mut child) => {
                    child.ext_mut().abort_target = Some(id);
                    child.block_size = self.block_size;
                    child.submit_tick = ticks::now();
                    child.ch = Some(self.clone());
                    self.submit_to_module(child);
                }
                None => AbortState::one_done(&state, true),
            }
        }
        AbortState::one_done(&state, false);
    }

    /// A reset, as SPDK runs one: every channel of the bdev freezes (new I/O is aborted, I/O waiting for
    /// resources is aborted), then the module executes the reset (it drains or aborts what it has outstanding),
    /// then the channels thaw and the reset completes. Resets arriving meanwhile complete with the same status.
    fn start_reset(self: &Rc<Self>, io: IoHandle) {
        self.outstanding.set(self.outstanding.get() + 1);
        self.activate();
        self.resets.borrow_mut().push_back(io);
        let inner = &self.bdev.0;
        if inner
            .reset_busy
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let bdev = self.bdev.clone();
        inner.io_device.for_each_channel(
            |c| c.freeze(),
            move |_| {
                // Back on this thread, every channel frozen: the module gets the reset.
                match bdev.0.io_device.existing_channel() {
                    Some(ch) => ch.execute_reset(),
                    None => bdev
                        .0
                        .reset_busy
                        .store(false, std::sync::atomic::Ordering::Release),
                }
            },
        );
    }

    fn freeze(&self) {
        self.frozen.set(true);
        let waiting: Vec<IoHandle> = self.nomem.borrow_mut().drain(..).collect();
        for mut io in waiting {
            io.status = IoStatus::Aborted;
            self.outstanding.set(self.outstanding.get() + 1);
            self.deferred.borrow_mut().push_back(io);
        }
    }

    fn execute_reset(self: &Rc<Self>) {
        let Some(io) = self.resets.borrow_mut().pop_front() else {
            return;
        };
        self.executing_reset.set(true);
        self.hand_to_module(io);
    }

    /// The module finished the reset: thaw every channel, finishing the resets that waited, then complete it.
    fn end_reset(self: &Rc<Self>, io: IoHandle) {
        self.executing_reset.set(false);
        let status = io.status;
        *self.thawing.borrow_mut() = Some(io);
        let bdev = self.bdev.clone();
        self.bdev.0.io_device.for_each_channel(
            move |c| c.thaw(status),
            move |_| {
                bdev.0
                    .reset_busy
                    .store(false, std::sync::atomic::Ordering::Release);
                let ch = bdev.0.io_device.existing_channel();
                let io = ch.as_ref().and_then(|c| c.thawing.borrow_mut().take());
                if let Some(io) = io {
                    run_callback(io);
                }
            },
        );
    }

    fn thaw(&self, status: IoStatus) {
        self.frozen.set(false);
        let waiting: Vec<IoHandle> = self.resets.borrow_mut().drain(..).collect();
        for mut io in waiting {
            io.status = status;
            io.ch = None;
            self.deferred.borrow_mut().push_back(io);
        }
    }

    fn retry_nomem(self: &Rc<Self>, max: usize) {
        for _ in 0..max {
            let io = self.nomem.borrow_mut().pop_front();
            match io {
                Some(mut io) => {
                    io.status = IoStatus::Pending;
                    io.ch = Some(self.clone());
                    self.submit_to_module(io);
                }
                None => break,
            }
        }
    }

    /// Whether a read or write breaks one of the module's limits.
    fn needs_split(&self, io: &BdevIo) -> bool {
        let r = &self.split;
        match io.io_type {
            IoType::Unmap => return r.max_unmap > 0 && io.num_blocks > r.max_unmap,
            IoType::WriteZeroes => {
                return r.max_write_zeroes > 0 && io.num_blocks > r.max_write_zeroes
            }
            t if !t.has_data() => return false,
            _ => {}
        }
        (r.boundary > 0 && io.offset_blocks % r.boundary + io.num_blocks > r.boundary)
            || (r.max_blocks > 0 && io.num_blocks > r.max_blocks)
            || (r.max_segs > 0 && io.iovs.len() > r.max_segs)
            || (r.max_seg > 0 && io.iovs.iter().any(|v| v.len > r.max_seg))
    }

    /// Serves `parent` in pieces that keep to the module's limits, as SPDK splits: in order, a window at a
    /// time, each piece a child descriptor over part of the parent's buffers; the parent completes when the
    /// last piece does, with the first failure if any. Its `driver_ctx` (the module never sees it) holds the
    /// next block, the pieces in flight and the first failure.
    fn start_split(self: &Rc<Self>, mut parent: IoHandle) {
        self.outstanding.set(self.outstanding.get() + 1);
        self.activate();
        self.track(&mut parent, true);
        parent.driver_ctx = [0; 4];
        let slot = {
            let mut s = self.splits.borrow_mut();
            match s.1.pop() {
                Some(i) => {
                    s.0[i as usize] = Some(parent);
                    i
                }
                None => {
                    s.0.push(Some(parent));
                    s.0.len() as u64 - 1
                }
            }
        };
        // A parent that cannot even start completes after this submission returns, like any completion.
        self.in_module.set(true);
        self.split_more(slot);
        self.in_module.set(false);
    }

    /// Sends the next pieces of split I/O `slot`, or completes it once nothing is left in flight.
    fn split_more(self: &Rc<Self>, slot: u64) {
        loop {
            let piece = {
                let mut s = self.splits.borrow_mut();
                let Some(p) = s.0.get_mut(slot as usize).and_then(|p| p.as_mut()) else {
                    return;
                };
                let [next, in_flight, failed, _] = p.driver_ctx;
                if next >= p.num_blocks || failed != 0 || in_flight >= SPLIT_WINDOW {
                    break;
                }
                let Some(mut c) = io::alloc_io() else {
                    if in_flight == 0 {
                        // Nothing in flight will return a descriptor to us: wait for one.
                        let me = self.clone();
                        io::queue_io_wait(move || me.split_more(slot));
                    }
                    return;
                };
                let blocks = self.cut(p, next, &mut c.iovs);
                if blocks == 0 {
                    // A segment limit leaves less than a block: the buffers cannot be cut as the module needs.
                    p.driver_ctx[2] = status_code(IoStatus::Failed(libc::EINVAL));
                    break;
                }
                c.io_type = p.io_type;
                c.offset_blocks = p.offset_blocks + next;
                c.num_blocks = blocks;
                c.block_size = p.block_size;
                c.submit_tick = p.submit_tick;
                c.ctx = slot;
                c.flags |= io::SPLIT_CHILD;
                c.status = IoStatus::Pending;
                c.ch = Some(self.clone());
                p.driver_ctx[0] = next + blocks;
                p.driver_ctx[1] = in_flight + 1;
                c
            };
            self.submit_to_module(piece);
        }
        let done = {
            let mut s = self.splits.borrow_mut();
            let finished = s.0[slot as usize]
                .as_ref()
                .is_some_and(|p| p.driver_ctx[1] == 0);
            if finished {
                s.1.push(slot);
                s.0[slot as usize].take()
            } else {
                None
            }
        };
        if let Some(mut parent) = done {
            let failed = parent.driver_ctx[2];
            parent.driver_ctx = [0; 4];
            parent.status = status_of(failed);
            // The parent was counted outstanding when it was split; `finish` counts it done.
            complete(parent);
        }
    }

    /// A piece of a split I/O came back.
    fn piece_done(self: &Rc<Self>, piece: IoHandle) {
        let slot = piece.ctx;
        let st = piece.status;
        drop(piece);
        {
            let mut s = self.splits.borrow_mut();
            let Some(p) = s.0.get_mut(slot as usize).and_then(|p| p.as_mut()) else {
                log::error!("{}: piece of an unknown split I/O", self.bdev.name());
                return;
            };
            p.driver_ctx[1] -= 1;
            if st != IoStatus::Success && p.driver_ctx[2] == 0 {
                p.driver_ctx[2] = status_code(st);
            }
        }
        self.split_more(slot);
    }

    /// Cuts the next piece of `p`, from block `next`, into `out`: as many blocks as the boundary and size limits
    /// allow, with no segment over the size limit and no more segments than allowed, ending on a block.
    /// Returns its blocks (0 when the segment limits leave less than one).
    fn cut(&self, p: &BdevIo, next: u64, out: &mut Vec<IoVec>) -> u64 {
        let r = &self.split;
        let bs = p.block_size as u64;
        let mut limit = p.num_blocks - next;
        // No buffers: only the module's block limit for the type.
        match p.io_type {
            IoType::Unmap => return limit.min(r.max_unmap),
            IoType::WriteZeroes => return limit.min(r.max_write_zeroes),
            _ => {}
        }
        if r.boundary > 0 {
            limit = limit.min(r.boundary - (p.offset_blocks + next) % r.boundary);
        }
        if r.max_blocks > 0 {
            limit = limit.min(r.max_blocks);
        }
        let want = (limit * bs) as usize;
        let mut skip = (next * bs) as usize;
        let mut got = 0usize;
        out.clear();
        'iovs: for v in &p.iovs {
            if skip >= v.len {
                skip -= v.len;
                continue;
            }
            let mut at = skip;
            skip = 0;
            while at < v.len && got < want {
                if r.max_segs > 0 && out.len() == r.max_segs {
                    break 'iovs;
                }
                let mut take = (v.len - at).min(want - got);
                if r.max_seg > 0 {
                    take = take.min(r.max_seg);
                }
                out.push(IoVec {
                    base: v.base.wrapping_add(at),
                    len: take,
                });
                at += take;
                got += take;
            }
            if got == want {
                break;
            }
        }
        // Whole blocks only: give back the tail of a partial block.
        let mut extra = got % bs as usize;
        while extra > 0 {
            let Some(last) = out.last_mut() else { break };
            if last.len > extra {
                last.len -= extra;
                extra = 0;
            } else {
                extra -= last.len;
                out.pop();
            }
        }
        got as u64 / bs
    }

    /// Accounts a completed I/O that was submitted at `submit_tick` (0: it never reached the module).
    #[inline]
    fn account(&self, io: &mut BdevIo, now: u64) {
        if io.submit_tick == 0 {
            return;
        }
        self.untrack(io);
        self.outstanding
            .set(self.outstanding.get().saturating_sub(1));
        if io.flags & io::SPLIT_CHILD != 0 {
            // Counted once, with the I/O it is a piece of.
            return;
        }
        let ticks = now.saturating_sub(io.submit_tick);
        let mut s = self.stats.borrow_mut();
        s.stat.record(
            io.io_type,
            io.len_bytes(),
            ticks,
            io.status == IoStatus::Success,
        );
        let opc = s.histogram_opc;
        if let Some(h) = s.histogram.as_mut() {
            if opc.is_none_or(|t| t == io.io_type) {
                h.tally(ticks);
            }
        }
    }
}

/// Delivers an I/O completed on channel `ch` to its submitter: statistics, then the callback (at clock `now`).
fn finish(ch: &Rc<ChannelCore>, mut io: IoHandle, now: u64) {
    if io.status == IoStatus::NoMem {
        // The module is out of resources: keep the I/O and resubmit when something completes.
        ch.outstanding.set(ch.outstanding.get().saturating_sub(1));
        ch.untrack(&mut io);
        ch.nomem.borrow_mut().push_back(io);
        return;
    }
    ch.account(&mut io, now);
    if io.io_type == IoType::Reset && ch.executing_reset.get() {
        ch.end_reset(io);
        return;
    }
    if io.flags & io::SPLIT_CHILD != 0 {
        ch.piece_done(io);
        return;
    }
    if io.flags & io::BOUNCED != 0 {
        io.unbounce();
    }
    // A parent completed from this callback (a virtual bdev's) completed at this same moment.
    let outer = DONE_NOW.replace(now);
    run_callback(io);
    DONE_NOW.set(outer);
    if !ch.nomem.borrow().is_empty() {
        ch.retry_nomem(1);
    }
}

/// A failed status in one word (0: none), for a split parent's `driver_ctx`.
fn status_code(st: IoStatus) -> u64 {
    match st {
        IoStatus::Failed(e) => (1 << 32) | e as u32 as u64,
        IoStatus::Aborted => 2 << 32,
        IoStatus::Miscompare => 3 << 32,
        IoStatus::Nvme(n) => {
            (4 << 32)
                | (n.sct as u64) << 24
                | (n.sc as u64) << 16
                | (n.dnr as u64) << 8
                | n.crd as u64
        }
        _ => (1 << 32) | libc::EIO as u64,
    }
}

/// The status a split parent completes with.
fn status_of(code: u64) -> IoStatus {
    match code >> 32 {
        0 => IoStatus::Success,
        2 => IoStatus::Aborted,
        3 => IoStatus::Miscompare,
        4 => IoStatus::Nvme(io::NvmeStatus {
            sct: (code >> 24) as u8,
            sc: (code >> 16) as u8,
            dnr: (code >> 8) & 1 != 0,
            crd: code as u8,
        }),
        _ => IoStatus::Failed(code as u32 as i32),
    }
}

thread_local! {
    /// Clock of the outermost submission running on this thread (0: none). A child I/O that a virtual bdev
    /// submits from inside its parent's submission takes this tick rather than reading the clock again: the
    /// two happen within the same call, and a clock read costs as much as the rest of the child's submission.
    static SUBMIT_NOW: Cell<u64> = const { Cell::new(0) };
    /// Clock of the completion whose callback is running (0: none); see [`finish`].
    static DONE_NOW: Cell<u64> = const { Cell::new(0) };
}

/// This thread's statistics for bdev `id`: the live channel's plus those of channels already released.
pub(crate) fn thread_stat(id: u64, live: Option<&ChannelCore>) -> IoStat {
    let mut s = thread_device()
        .existing_channel()
        .and_then(|t| t.retired.borrow().get(&id).map(|r| r.stat))
        .unwrap_or_default();
    if let Some(ch) = live {
        s.merge(&ch.stat());
    }
    s
}

/// This thread's histogram for bdev `id` (live channel plus retired ones), if any was kept.
pub(crate) fn thread_histogram(id: u64, live: Option<&ChannelCore>) -> Option<Histogram> {
    let mut h = thread_device().existing_channel().and_then(|t| {
        t.retired
            .borrow()
            .get(&id)
            .and_then(|r| r.histogram.as_deref().cloned())
    });
    if let Some(l) = live.and_then(|c| c.histogram()) {
        match h.as_mut() {
            Some(h) => h.merge(&l),
            None => h = Some(l),
        }
    }
    h
}

/// Clears this thread's statistics for bdev `id` (`live` is its channel here, if any).
pub(crate) fn clear_thread_stat(id: u64, live: Option<&ChannelCore>, mode: ResetMode) {
    if let Some(t) = thread_device().existing_channel() {
        if let Some(r) = t.retired.borrow_mut().get_mut(&id) {
            r.stat.reset(mode);
        }
    }
    if let Some(ch) = live {
        ch.reset_stat(mode);
    }
}

/// Drops this thread's retired statistics of bdev `id` (the bdev is destroyed).
pub(crate) fn forget_thread_stat(id: u64) {
    if let Some(t) = thread_device().existing_channel() {
        t.retired.borrow_mut().remove(&id);
    }
}

impl Drop for ChannelCore {
    fn drop(&mut self) {
        let s = std::mem::take(&mut *self.stats.borrow_mut());
        let mut retired = self.thread.retired.borrow_mut();
        let r = retired.entry(self.bdev.id()).or_default();
        r.stat.merge(&s.stat);
        if let Some(h) = s.histogram {
            match r.histogram.as_mut() {
                Some(rh) => rh.merge(&h),
                None => r.histogram = Some(h),
            }
        }
    }
}

fn run_callback(mut io: IoHandle) {
    match io.take_cb() {
        Completion::None => {}
        Completion::Fn(f) => f(io),
        Completion::Sink(s) => s.io_done(io),
        Completion::Closure(c) => c(io),
    }
}

/// Delivers a completion (see [`IoHandle::complete`]).
pub(crate) fn complete(mut io: IoHandle) {
    let Some(ch) = io.ch.take() else {
        run_callback(io);
        return;
    };
    if ch.in_module.get() {
        // Queued without its channel reference: the thread's active list holds the channel while its queue
        // is not empty.
        ch.deferred.borrow_mut().push_back(io);
        return;
    }
    let now = match DONE_NOW.get() {
        0 => ticks::now(),
        t => t,
    };
    finish(&ch, io, now);
}

/// A thread's handle for submitting I/O to one bdev through one descriptor. Not `Send`: channels belong to
/// the thread that got them, and completions run there.
#[derive(Clone)]
pub struct IoChannel {
    core: Rc<ChannelCore>,
    writable: bool,
}

impl IoChannel {
    pub(crate) fn new(core: Rc<ChannelCore>, writable: bool) -> Self {
        IoChannel { core, writable }
    }

    /// The bdev.
    pub fn bdev(&self) -> &Bdev {
        &self.core.bdev
    }

    /// This channel's latency histogram, while histograms are enabled for the bdev.
    pub fn histogram(&self) -> Option<Histogram> {
        self.core.histogram()
    }

    /// I/Os submitted to the module and not yet completed.
    pub fn outstanding(&self) -> u64 {
        self.core.outstanding.get()
    }

    /// Validates `io` against this bdev; `data_checked` skips the buffer checks (length, alignment) when they
    /// were already made for a parent with the same block size and at least this alignment. `Ok(true)`: valid,
    /// but a buffer is not aligned as the bdev requires, so the I/O goes through a bounce buffer.
    #[inline]
    fn check(
        &self,
        io: &crate::io::BdevIo,
        data_checked: bool,
    ) -> std::result::Result<bool, (i32, String)> {
        let t = io.io_type;
        if !self.core.supported[t as usize] {
            let name = self.core.bdev.name();
            return Err((libc::ENOTSUP, format!("{name}: {} not supported", t.name())));
        }
        self.check_args(io, data_checked)
    }

    /// [`Self::check`] but for the type's support: descriptor, ranges, buffers.
    #[inline(always)]
    fn check_args(
        &self,
        io: &crate::io::BdevIo,
        data_checked: bool,
    ) -> std::result::Result<bool, (i32, String)> {
        let t = io.io_type;
        let name = self.core.bdev.name();
        if t.is_write() && !self.writable {
            return Err((libc::EBADF, format!("{name}: descriptor is read-only")));
        }
        let nb = self.core.bdev.num_blocks();
        let needs_range = !matches!(
            t,
            IoType::Reset | IoType::Abort | IoType::NvmeAdmin | IoType::NvmeIo
        );
        if t == IoType::Copy {
            let src = io.copy_source();
            if src.checked_add(io.num_blocks).is_none_or(|e| e > nb) {
                return Err((
                    libc::EINVAL,
                    format!(
                        "{name}: copy source of {} blocks at {src} is outside 0..{nb}",
                        io.num_blocks
                    ),
                ));
            }
        }
        if needs_range {
            let end = io.offset_blocks.checked_add(io.num_blocks);
            let empty_ok = matches!(t, IoType::Flush | IoType::Copy);
            if (io.num_blocks == 0 && !empty_ok) || end.is_none_or(|e| e > nb) {
                return Err((
                    libc::EINVAL,
                    format!(
                        "{name}: {} of {} blocks at {} is outside 0..{nb}",
                        t.name(),
                        io.num_blocks,
                        io.offset_blocks
                    ),
                ));
            }
        }
        if t.has_data() && !data_checked {
            if io.total_iov_len() != io.num_blocks * self.core.block_size as u64 {
                return Err((
                    libc::EINVAL,
                    format!(
                        "{name}: buffers hold {} bytes for {} blocks",
                        io.total_iov_len(),
                        io.num_blocks
                    ),
                ));
            }
            if io
                .iovs
                .iter()
                .any(|v| (v.base as usize) & self.core.align_mask != 0)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Submits a prepared I/O. Invalid I/O (range, length, alignment, type, read-only) completes with
    /// `IoStatus::Failed(errno)`; the callback always runs, on this thread, after this call returns.
    pub fn submit(&self, io: IoHandle) {
        self.submit_checked(io, false);
    }

    #[inline]
    fn submit_checked(&self, mut io: IoHandle, data_checked: bool) {
        let core = &self.core;
        io.block_size = core.block_size;
        let checked = match self.check(&io, data_checked) {
            Ok(true) => io
                .bounce(core.align_mask + 1)
                .map_err(|e| (libc::ENOMEM, format!("{}: {e}", core.bdev.name()))),
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err((errno, msg)) = checked {
            log::warn!("{msg}");
            io.status = IoStatus::Failed(errno);
            io.submit_tick = 0;
            io.ch = None;
            core.deferred.borrow_mut().push_back(io);
            core.activate();
            return;
        }
        io.ch = Some(core.clone());
        let outer = SUBMIT_NOW.get();
        let now = if outer != 0 { outer } else { ticks::now() };
        io.submit_tick = now;
        SUBMIT_NOW.set(now);
        if io.io_type == IoType::Reset {
            core.start_reset(io);
        } else if core.frozen.get() {
            // A reset is in progress: new I/O is aborted, as SPDK does.
            io.status = IoStatus::Aborted;
            io.ch = None;
            core.outstanding.set(core.outstanding.get() + 1);
            core.deferred.borrow_mut().push_back(io);
            core.activate();
        } else if core.gate.get() && core.must_wait(&io) {
            // A range lock is being taken or held: the I/O goes on when it is.
            core.held.borrow_mut().push_back(io);
        } else if core.split.any && core.needs_split(&io) {
            core.start_split(io);
        } else {
            core.submit_to_module(io);
        }
        SUBMIT_NOW.set(outer);
    }

    #[inline]
    fn prepare(
        &self,
        t: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<IoHandle> {
        io::build(t, offset_blocks, num_blocks, cb, ctx)
            .ok_or_else(|| BdevError::new(ErrorKind::NoMemory, "no bdev_io available"))
    }

    /// Reads into an owned buffer (taken back with [`crate::BdevIo::take_buf`] in the callback).
    pub fn read(
        &self,
        buf: DmaBuf,
        offset_blocks: u64,
        num_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        self.with_buf(IoType::Read, buf, offset_blocks, num_blocks, cb, ctx)
    }

    /// Writes from an owned buffer.
    pub fn write(
        &self,
        buf: DmaBuf,
        offset_blocks: u64,
        num_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        self.with_buf(IoType::Write, buf, offset_blocks, num_blocks, cb, ctx)
    }

    /// Compares blocks with an owned buffer.
    pub fn compare(
        &self,
        buf: DmaBuf,
        offset_blocks: u64,
        num_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        self.with_buf(IoType::Compare, buf, offset_blocks, num_blocks, cb, ctx)
    }

    fn with_buf(
        &self,
        t: IoType,
        buf: DmaBuf,
        offset_blocks: u64,
        num_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        let mut io = self.prepare(t, offset_blocks, num_blocks, cb, ctx)?;
        let len = (num_blocks * self.core.block_size as u64).min(buf.len() as u64) as usize;
        io.iovs.push(IoVec {
            base: buf.as_ptr(),
            len,
        });
        io.buf = Some(buf);
        io.flags |= io::HAS_BUF;
        self.submit(io);
        Ok(())
    }

    /// Reads into caller memory, zero copy.
    ///
    /// # Safety
    /// Every iovec must stay valid for writes, and not be accessed otherwise, until the callback runs.
    #[inline]
    pub unsafe fn readv(
        &self,
        iovs: &[IoVec],
        offset_blocks: u64,
        num_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        self.with_iovs(IoType::Read, iovs, offset_blocks, num_blocks, cb, ctx)
    }

    /// Submits an I/O of type `t` over caller memory (the callers' safety contracts cover `iovs`).
    #[inline(always)]
    fn with_iovs(
        &self,
        t: IoType,
        iovs: &[IoVec],
        offset_blocks: u64,
        num_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        let mut io = self.prepare(t, offset_blocks, num_blocks, cb, ctx)?;
        io.iovs.extend_from_slice(iovs);
        self.submit(io);
        Ok(())
    }

    /// Writes from caller memory, zero copy.
    ///
    /// # Safety
    /// Every iovec must stay valid for reads, and not be written otherwise, until the callback runs.
    #[inline]
    pub unsafe fn writev(
        &self,
        iovs: &[IoVec],
        offset_blocks: u64,
        num_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        self.with_iovs(IoType::Write, iovs, offset_blocks, num_blocks, cb, ctx)
    }

    /// Compares blocks with caller memory, zero copy (a mismatch completes with [`IoStatus::Miscompare`]).
    ///
    /// # Safety
    /// Every iovec must stay valid for reads, and not be written otherwise, until the callback runs.
    pub unsafe fn comparev(
        &self,
        iovs: &[IoVec],
        offset_blocks: u64,
        num_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        self.with_iovs(IoType::Compare, iovs, offset_blocks, num_blocks, cb, ctx)
    }

    /// Compares the blocks with `cmp` and, only if they match, writes `write` to them, with no other write to
    /// those blocks in between, from any channel (SPDK's `spdk_bdev_comparev_and_writev_blocks`, emulated as
    /// SPDK does for bdevs without a native one: LBA range lock, compare, write, unlock). Completes through
    /// `cb`/`ctx` with success, [`IoStatus::Miscompare`] (nothing written) or the failure.
    ///
    /// # Safety
    /// Both iovec lists must stay valid, and the write's not be written otherwise, until the callback runs.
    pub unsafe fn compare_and_writev(
        &self,
        cmp: &[IoVec],
        write: &[IoVec],
        offset_blocks: u64,
        num_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        let core = &self.core;
        let name = core.bdev.name();
        if !core.supported[IoType::Compare as usize] || !core.supported[IoType::Write as usize] {
            return Err(BdevError::new(
                ErrorKind::NotSupported,
                format!("{name}: compare and write not supported"),
            ));
        }
        if !self.writable {
            return Err(BdevError::new(
                ErrorKind::ReadOnly,
                format!("{name}: descriptor is read-only"),
            ));
        }
        // The descriptor the result is delivered in (never submitted itself).
        let fin = self.prepare(IoType::Compare, offset_blocks, num_blocks, cb, ctx)?;
        let (cmp, write) = (cmp.to_vec(), write.to_vec());
        let ch = self.clone();
        let bdev = core.bdev.clone();
        let step = reactor::OnThread::new(move |id: u64| ch.locked_compare(id, fin, cmp, write));
        bdev.lock_lba_range(offset_blocks, num_blocks, move |id| {
            step.with(move |f| f(id))
        });
        Ok(())
    }

    /// Compare-and-write with the range locked: the compare, then the write if it matched; then the unlock
    /// and the result.
    fn locked_compare(&self, id: u64, fin: IoHandle, cmp: Vec<IoVec>, write: Vec<IoVec>) {
        let (off, n) = (fin.offset_blocks, fin.num_blocks);
        let bdev = self.core.bdev.clone();
        // Whichever step ends the operation takes the result descriptor out.
        let fin = Rc::new(RefCell::new(Some(fin)));
        let end = {
            let fin = fin.clone();
            move |status: IoStatus| {
                bdev.unlock_lba_range(id, || {});
                if let Some(f) = fin.borrow_mut().take() {
                    f.complete(status);
                }
            }
        };
        let end2 = end.clone();
        let ch = self.clone();
        let after_compare = move |cio: IoHandle| {
            let st = cio.status();
            drop(cio);
            if st != IoStatus::Success {
                return end(st);
            }
            let end_w = end.clone();
            let after_write = move |wio: IoHandle| {
                let st = wio.status();
                drop(wio);
                end_w(st);
            };
            let w = ch.prepare(
                IoType::Write,
                off,
                n,
                Completion::Closure(Box::new(after_write)),
                0,
            );
            match w {
                Ok(mut w) => {
                    w.iovs.extend_from_slice(&write);
                    w.flags |= io::LOCK_OWNER;
                    ch.submit(w);
                }
                Err(_) => end(IoStatus::Failed(libc::ENOMEM)),
            }
        };
        let c = self.prepare(
            IoType::Compare,
            off,
            n,
            Completion::Closure(Box::new(after_compare)),
            0,
        );
        match c {
            Ok(mut c) => {
                c.iovs.extend_from_slice(&cmp);
                c.flags |= io::LOCK_OWNER;
                self.submit(c);
            }
            Err(_) => end2(IoStatus::Failed(libc::ENOMEM)),
        }
        drop(fin);
    }

    /// Passes an NVMe I/O command through to the bdev as is (SPDK's `spdk_bdev_nvme_io_passthru`), with `iovs` as its data buffer; the completion's status and
    /// dword 0 are the device's ([`IoStatus::Nvme`] / [`crate::BdevIo::nvme_cdw0`]). Needs a writable
    /// descriptor, as in SPDK (the command is not decoded).
    ///
    /// # Safety
    /// Every iovec must stay valid, and not be accessed otherwise, until the callback runs.
    pub unsafe fn nvme_io_passthru(
        &self,
        cmd: &crate::io::NvmeCmd,
        iovs: &[IoVec],
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        self.nvme_passthru(IoType::NvmeIo, cmd, iovs, cb, ctx)
    }

    /// Passes an NVMe admin command through to the bdev's controller as is (SPDK's
    /// `spdk_bdev_nvme_admin_passthru`); see [`Self::nvme_io_passthru`].
    ///
    /// # Safety
    /// As for [`Self::nvme_io_passthru`].
    pub unsafe fn nvme_admin_passthru(
        &self,
        cmd: &crate::io::NvmeCmd,
        iovs: &[IoVec],
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        self.nvme_passthru(IoType::NvmeAdmin, cmd, iovs, cb, ctx)
    }

    fn nvme_passthru(
        &self,
        t: IoType,
        cmd: &crate::io::NvmeCmd,
        iovs: &[IoVec],
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        let mut io = self.prepare(t, 0, 0, cb, ctx)?;
        let ext = io.ext_mut();
        ext.nvme_cmd = *cmd;
        ext.nvme_cdw0 = 0;
        io.iovs.extend_from_slice(iovs);
        self.submit(io);
        Ok(())
    }

    /// Copies `num_blocks` blocks from `src_offset` to `dst_offset` within the bdev (SPDK's
    /// `spdk_bdev_copy_blocks`): the module's own copy when it has one, else read then write through a buffer,
    /// in pieces, as SPDK emulates it (the emulated copy counts as the reads and writes it is made of).
    /// Overlapping ranges copy as if through a buffer of the whole range. An empty or in-place copy succeeds
    /// at once.
    pub fn copy(
        &self,
        dst_offset: u64,
        src_offset: u64,
        num_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        let core = &self.core;
        let mut io = self.prepare(IoType::Copy, dst_offset, num_blocks, cb, ctx)?;
        io.ext_mut().copy_delta = src_offset.wrapping_sub(dst_offset);
        io.block_size = core.block_size;
        // Checked as a copy (read-only descriptor, both ranges) whether the module copies or not.
        if let Err((errno, msg)) = self.check_args(&io, true) {
            log::warn!("{msg}");
            io.status = IoStatus::Failed(errno);
            core.deliver_later(io);
        } else if num_blocks == 0 || dst_offset == src_offset {
            io.status = IoStatus::Success;
            core.deliver_later(io);
        } else if core.supported[IoType::Copy as usize] {
            self.submit(io);
        } else {
            CopyJob::start(self.clone(), io);
        }
        Ok(())
    }

    /// Aborts the I/Os submitted on this channel with context `target_ctx` and not yet completed (SPDK's
    /// `spdk_bdev_abort`, which names them by their callback argument). Each completes as
    /// [`IoStatus::Aborted`] if the module could stop it; the abort then completes through `cb`/`ctx`:
    /// success when every one was aborted (or completed meanwhile), a failure when one could not be, or when
    /// none had that context (`ENOENT`). Errors: the bdev does not support aborts (`NotSupported`), no
    /// descriptor (`NoMemory`).
    pub fn abort(&self, target_ctx: u64, cb: Completion, ctx: u64) -> Result<()> {
        let core = &self.core;
        if !core.supported[IoType::Abort as usize] {
            return Err(BdevError::new(
                ErrorKind::NotSupported,
                format!("{}: abort not supported", core.bdev.name()),
            ));
        }
        let mut io = self.prepare(IoType::Abort, 0, 0, cb, ctx)?;
        io.block_size = core.block_size;
        io.ch = Some(core.clone());
        core.start_abort(io, target_ctx);
        Ok(())
    }

    /// Submits an I/O with no data (flush, unmap, write_zeroes, reset).
    #[inline]
    pub fn submit_nodata(
        &self,
        t: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        if t.has_data() || matches!(t, IoType::NvmeAdmin | IoType::NvmeIo) {
            return Err(BdevError::new(
                ErrorKind::Invalid,
                format!("{} needs buffers", t.name()),
            ));
        }
        if matches!(t, IoType::Abort | IoType::Copy) {
            return Err(BdevError::new(
                ErrorKind::Invalid,
                format!(
                    "{} needs its own arguments (IoChannel::{})",
                    t.name(),
                    t.name()
                ),
            ));
        }
        let io = self.prepare(t, offset_blocks, num_blocks, cb, ctx)?;
        self.submit(io);
        Ok(())
    }

    /// Forwards `parent`'s request (type and buffers) to this channel's bdev at `offset_blocks`, as a child I/O
    /// that completes through `cb`/`ctx`. Used by virtual bdevs.
    ///
    /// # Safety
    /// `parent` must not complete before the child does, so its buffers stay valid for the child.
    #[inline]
    pub unsafe fn submit_child(
        &self,
        parent: &crate::io::BdevIo,
        offset_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        let mut io = self.prepare(parent.io_type, offset_blocks, parent.num_blocks, cb, ctx)?;
        io.iovs.extend_from_slice(&parent.iovs);
        parent.copy_ext_to(&mut io);
        let data_checked = self.data_checked(parent);
        self.submit_checked(io, data_checked);
        Ok(())
    }

    /// Sends part of `parent`'s request to this channel's bdev, as a child I/O that completes through `cb`/`ctx`:
    /// `num_blocks` starting `parent_block` blocks into the parent, at `offset_blocks` here. Data types carry the
    /// matching part of the parent's buffers (for a striping or splitting virtual bdev).
    ///
    /// # Safety
    /// `parent` must not complete before the child does, so its buffers stay valid for the child.
    pub unsafe fn submit_child_range(
        &self,
        parent: &crate::io::BdevIo,
        parent_block: u64,
        num_blocks: u64,
        offset_blocks: u64,
        cb: Completion,
        ctx: u64,
    ) -> Result<()> {
        let t = parent.io_type;
        let mut io = self.prepare(t, offset_blocks, num_blocks, cb, ctx)?;
        parent.copy_ext_to(&mut io);
        if t.has_data() {
            let bs = parent.block_size as u64;
            io::sub_iovs(
                &parent.iovs,
                parent_block * bs,
                num_blocks * bs,
                &mut io.iovs,
            );
        }
        self.submit(io);
        Ok(())
    }

    /// Sends `io` itself on to this channel's bdev at `offset_blocks`: for a virtual bdev that maps an I/O onto
    /// exactly one base I/O, no second descriptor, and the buffers travel with it. It comes back through
    /// `cb`/`ctx` (on this thread, after this call returns); call [`IoHandle::restore`] on it then, before
    /// completing it to its submitter or forwarding it again. The submitter's route is kept in the descriptor.
    // Always inlined: called out of line, the callback the caller just built on its stack is read back with a
    // wider load than it was stored with, which stalls on store forwarding (seen in lvol's submit).
    #[inline(always)]
    pub fn forward(&self, mut io: IoHandle, offset_blocks: u64, cb: Completion, ctx: u64) {
        let data_checked = self.data_checked(&io);
        io.save_route(offset_blocks, cb, ctx);
        self.submit_checked(io, data_checked);
    }

    /// Whether `parent`'s buffers need no second look here: they passed its bdev's checks (they hold its
    /// blocks, aligned to that bdev's alignment), this bdev has the same block size and needs no stricter
    /// alignment.
    #[inline]
    fn data_checked(&self, parent: &crate::io::BdevIo) -> bool {
        let core = &self.core;
        parent.block_size == core.block_size
            && parent
                .ch
                .as_ref()
                .is_some_and(|p| p.align_mask & core.align_mask == core.align_mask)
    }
}
