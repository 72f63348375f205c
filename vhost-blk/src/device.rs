//! The reactor side of a controller: its virtqueues, polled by one poller on the controller's lightweight
//! thread, which also owns the bdev descriptor and channel and so submits and completes every I/O.
//!
//! The control thread (vhost-user protocol, see `backend`) reaches this state only by messages to that thread
//! ([`with_dev`]); replies travel back over channels. Nothing here blocks.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use bdev::{Bdev, BdevEvent, Desc, ErrorKind, IoChannel, IoHandle, IoSink, IoType, IoVec};
use reactor::{ticks, Poller};
use vm_memory::GuestAddress;

use crate::controller::Ctrlr;
use crate::mem::{FastMem, MemTable};
use crate::request::{self, Geometry, Op, Parsed, S_IOERR, S_OK};
use crate::vring::{Ring, RingConfig};

/// Iovecs per request: `seg_max` (126) data segments, plus a few for buffers that cross memory regions.
pub const MAX_IOVS: usize = 130;
/// Requests taken from one queue per poll.
const BATCH: usize = 64;
/// How often interrupt coalescing re-evaluates a queue's rate (SPDK's `SPDK_VHOST_STATS_CHECK_INTERVAL_MS`).
const STATS_INTERVAL_US: u64 = 10_000;

/// What the control thread hands over to start a queue.
pub struct QueueStart {
    /// Ring layout and addresses.
    pub cfg: RingConfig,
    /// Kick eventfd (the driver's doorbell).
    pub kick: Option<File>,
    /// Call eventfd (the interrupt).
    pub call: Option<File>,
    /// The queue's inflight tracking area, when the front end gave one (split rings).
    pub inflight: Option<crate::inflight::InflightQueue>,
}

struct Task {
    busy: bool,
    id: u16,
    ndescs: u16,
    iovs: Vec<IoVec>,
    status: GuestAddress,
    used_len: u32,
    op: Op,
    offset_blocks: u64,
    num_blocks: u64,
}

struct Queue {
    idx: u16,
    ring: Ring,
    tasks: Vec<Task>,
    inflight: u32,
    retry: VecDeque<u16>,
    kick: Option<File>,
    call: Option<File>,
    broken: bool,
    notify_pending: bool,
    stop: Option<Sender<u32>>,
    interrupt: bool,
    req_cnt: u64,
    irq_delay: u64,
    next_event: u64,
    next_check: u64,
    /// Inflight tracking (see [`crate::inflight`]): the area, the next request's counter, the requests of an
    /// earlier run to run again (oldest first), and the buffer ids completed since the last publication.
    track: Option<crate::inflight::Tracker>,
    counter: u64,
    resubmit: VecDeque<u16>,
    batch: Vec<u16>,
}

/// Per-controller state on its thread.
pub struct Dev {
    ctrlr: Arc<Ctrlr>,
    inner: RefCell<Inner>,
    done: RefCell<Vec<(u64, bool)>>,
    spare: RefCell<Vec<(u64, bool)>>,
    sink: Rc<dyn IoSink>,
    poller: RefCell<Option<Poller>>,
}

struct Inner {
    desc: Option<Desc>,
    ch: Option<IoChannel>,
    geo: Geometry,
    serial: [u8; request::ID_BYTES as usize],
    mem: Option<FastMem>,
    retired: Vec<FastMem>,
    queues: Vec<Option<Queue>>,
    removing: bool,
}

struct Sink(Weak<Dev>);

type EventCb = Arc<dyn Fn(BdevEvent, &Bdev) + Send + Sync>;

impl IoSink for Sink {
    fn io_done(&self, io: IoHandle) {
        let ok = io.success();
        let ctx = io.ctx;
        // Back to the pool before anything else runs.
        drop(io);
        if let Some(d) = self.0.upgrade() {
            d.done.borrow_mut().push((ctx, ok));
        }
    }
}

thread_local! {
    static DEVS: RefCell<HashMap<u64, Rc<Dev>>> = RefCell::new(HashMap::new());
}

/// Runs `f` with controller `id`'s state (on its thread). `None` if there is none.
pub fn with_dev<R>(id: u64, f: impl FnOnce(&Rc<Dev>) -> R) -> Option<R> {
    let d = DEVS.with(|m| m.borrow().get(&id).cloned())?;
    Some(f(&d))
}

fn ctx_of(q: u16, t: u16) -> u64 {
    ((q as u64) << 16) | t as u64
}

/// The geometry the parser checks requests against.
pub fn geometry(bdev: &Bdev, readonly: bool) -> Geometry {
    Geometry {
        block_size: bdev.block_size(),
        num_blocks: bdev.num_blocks(),
        readonly,
        online: true,
        flush: bdev.io_type_supported(IoType::Flush),
        discard: bdev.io_type_supported(IoType::Unmap),
        write_zeroes: bdev.io_type_supported(IoType::WriteZeroes),
        max_discard_sectors: crate::config::MAX_DISCARD_SECTORS,
        max_write_zeroes_sectors: crate::config::MAX_WRITE_ZEROES_SECTORS,
    }
}

impl Dev {
    /// Opens and claims the bdev on the current thread and registers the controller's state here.
    pub fn open(ctrlr: Arc<Ctrlr>) -> Result<(), bdev::BdevError> {
        let id = ctrlr.id;
        let on_event: EventCb = Arc::new(move |ev, b| {
            with_dev(id, |d| d.bdev_event(ev, b));
        });
        let mut desc = bdev::open(&ctrlr.bdev_name, true, Some(on_event))?;
        desc.claim(crate::MODULE)?;
        let bdev = desc.bdev().clone();
        let ch = desc.channel();
        let mut serial = [b' '; request::ID_BYTES as usize];
        for (d, s) in serial.iter_mut().zip(bdev.name().bytes()) {
            *d = s;
        }
        let geo = geometry(&bdev, ctrlr.readonly);
        let dev = Rc::new_cyclic(|w: &Weak<Dev>| Dev {
            ctrlr: ctrlr.clone(),
            inner: RefCell::new(Inner {
                desc: Some(desc),
                ch: Some(ch),
                geo,
                serial,
                mem: None,
                retired: vec![],
                queues: vec![],
                removing: false,
            }),
            done: RefCell::new(Vec::with_capacity(1024)),
            spare: RefCell::new(Vec::with_capacity(1024)),
            sink: Rc::new(Sink(w.clone())),
            poller: RefCell::new(None),
        });
        DEVS.with(|m| m.borrow_mut().insert(id, dev));
        Ok(())
    }

    /// Forgets the controller's state on this thread, closing the bdev. Queues must be stopped.
    pub fn close(id: u64) {
        let d = DEVS.with(|m| m.borrow_mut().remove(&id));
        if let Some(d) = d {
            let (ch, desc) = {
                let mut i = d.inner.borrow_mut();
                (i.ch.take(), i.desc.take())
            };
            *d.poller.borrow_mut() = None;
            drop(ch);
            drop(desc);
        }
    }

    fn bdev_event(&self, ev: BdevEvent, b: &Bdev) {
        match ev {
            BdevEvent::Remove => {
                log::warn!(
                    "vhost controller {}: bdev {} is being removed; new I/O fails",
                    self.ctrlr.name,
                    b.name()
                );
                *reactor::lock(&self.ctrlr.bdev) = None;
                let drop_now = {
                    let mut i = self.inner.borrow_mut();
                    i.removing = true;
                    i.geo.online = false;
                    if i.inflight() == 0 {
                        Some((i.ch.take(), i.desc.take()))
                    } else {
                        None
                    }
                };
                drop(drop_now);
            }
            BdevEvent::Resize => {
                self.inner.borrow_mut().geo.num_blocks = b.num_blocks();
                self.ctrlr.notify_config_change();
            }
        }
    }

    /// Installs a new memory table (the old one, with its memory map registrations, is kept until no I/O uses
    /// it).
    pub fn set_mem(&self, mem: Arc<MemTable>) {
        let mut i = self.inner.borrow_mut();
        if i.mem.as_ref().is_some_and(|m| Arc::ptr_eq(m.table(), &mem)) {
            return;
        }
        let busy = i.inflight() > 0;
        if let Some(old) = i.mem.replace(FastMem::from_table(mem)) {
            if busy {
                i.retired.push(old);
            }
        }
    }

    /// Drops the memory table once nothing uses it (the front end disconnected).
    pub fn clear_mem(&self) {
        let mut i = self.inner.borrow_mut();
        let busy = i.inflight() > 0;
        if let Some(old) = i.mem.take() {
            if busy {
                i.retired.push(old);
            }
        }
    }

    /// Starts queue `idx`; the memory table must be set.
    pub fn start_queue(self: &Rc<Self>, idx: u16, qs: QueueStart) -> Result<(), String> {
        let interrupt = reactor::options().is_some_and(|o| o.idle_backoff);
        {
            let mut i = self.inner.borrow_mut();
            let Inner { mem, queues, .. } = &mut *i;
            let mem = mem.as_ref().ok_or("no memory table")?;
            if queues.get(idx as usize).is_some_and(Option::is_some) {
                return Err(format!("queue {idx} already running"));
            }
            let mut ring = Ring::new(&qs.cfg, mem).map_err(|e| e.to_string())?;
            let (track, resubmit, counter) = match qs.inflight {
                Some(t) => recover(t, &mut ring, mem, idx)?,
                None => (None, VecDeque::new(), 0),
            };
            ring.set_notification(mem, interrupt);
            if let Some(k) = &qs.kick {
                let _ = crate::sys::set_nonblocking(k.as_raw_fd());
                if interrupt {
                    let _ = reactor::add_wake_fd(k.as_raw_fd());
                }
            }
            let size = ring.size() as usize;
            let tasks = (0..size)
                .map(|_| Task {
                    busy: false,
                    id: 0,
                    ndescs: 0,
                    iovs: Vec::with_capacity(MAX_IOVS),
                    status: GuestAddress(0),
                    used_len: 0,
                    op: Op::Read,
                    offset_blocks: 0,
                    num_blocks: 0,
                })
                .collect();
            let q = Queue {
                idx,
                ring,
                tasks,
                inflight: 0,
                retry: VecDeque::with_capacity(size),
                kick: qs.kick,
                call: qs.call,
                broken: false,
                notify_pending: false,
                stop: None,
                interrupt,
                req_cnt: 0,
                irq_delay: 0,
                next_event: 0,
                next_check: 0,
                track,
                counter,
                resubmit,
                batch: Vec::with_capacity(size),
            };
            if i.queues.len() <= idx as usize {
                i.queues.resize_with(idx as usize + 1, || None);
            }
            i.queues[idx as usize] = Some(q);
        }
        if self.poller.borrow().is_none() {
            let w = Rc::downgrade(self);
            let name = format!("vhost_blk_{}", self.ctrlr.name);
            *self.poller.borrow_mut() = Some(Poller::register(&name, 0, move || {
                w.upgrade().is_some_and(|d| d.poll())
            }));
        }
        Ok(())
    }

    /// Stops queue `idx` once its in-flight requests completed; `reply` gets the ring base then
    /// (`u32::MAX` if the queue was not running).
    pub fn stop_queue(&self, idx: u16, reply: Sender<u32>) {
        let mut i = self.inner.borrow_mut();
        match i.queues.get_mut(idx as usize).and_then(Option::as_mut) {
            Some(q) => q.stop = Some(reply),
            None => {
                let _ = reply.send(u32::MAX);
            }
        }
    }

    /// Replaces queue `idx`'s call eventfd.
    pub fn set_call(&self, idx: u16, call: Option<File>) {
        let mut i = self.inner.borrow_mut();
        if let Some(q) = i.queues.get_mut(idx as usize).and_then(Option::as_mut) {
            q.call = call;
            // Whatever was pending is signalled on the new one.
            q.notify_pending = true;
        }
    }

    /// Number of running queues.
    pub fn running_queues(&self) -> usize {
        self.inner.borrow().queues.iter().flatten().count()
    }

    fn poll(self: &Rc<Self>) -> bool {
        {
            let mut done = self.done.borrow_mut();
            if !done.is_empty() {
                std::mem::swap(&mut *done, &mut *self.spare.borrow_mut());
            }
        }
        let mut busy = false;
        let mut release = None;
        let idle;
        {
            let mut spare = self.spare.borrow_mut();
            let mut guard = self.inner.borrow_mut();
            let i = &mut *guard;
            let now = ticks::iteration();
            if !spare.is_empty() {
                busy = true;
                if let Some(mem) = i.mem.as_ref() {
                    for &(ctx, ok) in spare.iter() {
                        let (qi, ti) = ((ctx >> 16) as usize, (ctx & 0xffff) as usize);
                        if let Some(Some(q)) = i.queues.get_mut(qi) {
                            q.finish(mem, ti, if ok { S_OK } else { S_IOERR });
                        }
                    }
                }
                spare.clear();
            }
            let coalesce = (
                self.ctrlr.delay_base_us.load(Ordering::Relaxed),
                self.ctrlr.iops_threshold.load(Ordering::Relaxed),
            );
            let Inner {
                ch,
                geo,
                serial,
                queues,
                mem,
                ..
            } = &mut *i;
            if let Some(mem) = mem.as_ref() {
                for slot in queues.iter_mut() {
                    let Some(q) = slot else { continue };
                    busy |= q.poll(mem, ch.as_ref(), geo, serial, &self.sink, now, coalesce);
                    if q.stop.is_some() && q.inflight == 0 && q.retry.is_empty() {
                        q.signal(mem);
                        let base = q.ring.base();
                        if let (Some(k), true) = (&q.kick, q.interrupt) {
                            reactor::remove_wake_fd(k.as_raw_fd());
                        }
                        if let Some(tx) = q.stop.take() {
                            let _ = tx.send(base);
                        }
                        log::debug!("vhost queue {} stopped at {base:#x}", q.idx);
                        *slot = None;
                    }
                }
            }
            let inflight = i.inflight();
            self.ctrlr.inflight.store(inflight, Ordering::Relaxed);
            if inflight == 0 {
                i.retired.clear();
                if i.removing && (i.ch.is_some() || i.desc.is_some()) {
                    release = Some((i.ch.take(), i.desc.take()));
                }
            }
            idle = i.queues.iter().all(Option::is_none);
        }
        drop(release);
        if idle {
            // No queue left: stop polling until one starts again.
            *self.poller.borrow_mut() = None;
        }
        busy
    }
}

impl Inner {
    fn inflight(&self) -> u64 {
        self.queues
            .iter()
            .flatten()
            .map(|q| q.inflight as u64)
            .sum()
    }
}

/// Takes up queue `idx`'s inflight area when it starts: a fresh area starts tracking; one an earlier run left
/// gives the requests to run again (see [`crate::inflight`]) and where the available ring resumes.
#[allow(clippy::type_complexity)]
fn recover(
    t: crate::inflight::InflightQueue,
    ring: &mut Ring,
    fast: &FastMem,
    idx: u16,
) -> Result<(Option<crate::inflight::Tracker>, VecDeque<u16>, u64), String> {
    let Some(used) = ring.next_used() else {
        log::warn!("vhost queue {idx}: inflight tracking is not kept for packed rings");
        return Ok((None, VecDeque::new(), 0));
    };
    let t = t.open();
    if !t.in_use() {
        t.init(used);
        return Ok((Some(t), VecDeque::new(), 0));
    }
    // Completions published by the run that died before it cleared them.
    let mut i = t.used_idx();
    if used.wrapping_sub(i) > ring.size() {
        // Not this ring's history (the driver set the ring up again): nothing in it can be run again.
        log::warn!(
            "vhost queue {idx}: inflight area does not match the ring (used {used}, recorded {i}): started afresh"
        );
        t.init(used);
        return Ok((Some(t), VecDeque::new(), 0));
    }
    while i != used {
        if let Some(id) = ring.used_id(fast, i).filter(|&id| id < ring.size()) {
            t.clear(id);
        }
        i = i.wrapping_add(1);
    }
    t.set_used_idx(used);
    let pending = t.pending();
    let counter = pending.last().map_or(0, |p| p.0 + 1);
    ring.set_next_avail(used.wrapping_add(pending.len() as u16));
    if !pending.is_empty() {
        log::warn!(
            "vhost queue {idx}: {} request(s) of the previous run are run again",
            pending.len()
        );
    }
    Ok((Some(t), pending.into_iter().map(|p| p.1).collect(), counter))
}

impl Queue {
    #[allow(clippy::too_many_arguments)]
    fn poll(
        &mut self,
        fast: &FastMem,
        ch: Option<&IoChannel>,
        geo: &Geometry,
        serial: &[u8],
        sink: &Rc<dyn IoSink>,
        now: u64,
        coalesce: (u32, u32),
    ) -> bool {
        let mut busy = false;
        if self.interrupt {
            if let Some(k) = &self.kick {
                let mut b = [0u8; 8];
                let _ = (&*k).read(&mut b);
            }
        }
        while let Some(&ti) = self.retry.front() {
            let t = &self.tasks[ti as usize];
            let r = match ch {
                Some(ch) => crate::io::submit(
                    ch,
                    sink,
                    t.op,
                    t.offset_blocks,
                    t.num_blocks,
                    &t.iovs,
                    ctx_of(self.idx, ti),
                ),
                None => Err(bdev::BdevError::new(ErrorKind::NotFound, "bdev removed")),
            };
            match r {
                Ok(()) => {
                    self.retry.pop_front();
                    busy = true;
                }
                Err(e) if e.kind == ErrorKind::NoMemory => break,
                Err(_) => {
                    self.retry.pop_front();
                    self.finish(fast, ti as usize, S_IOERR);
                    busy = true;
                }
            }
        }
        if !self.broken && self.stop.is_none() {
            for _ in 0..BATCH {
                let popped = match self.resubmit.pop_front() {
                    // A request an earlier run took and did not finish: run again first.
                    Some(head) => match self.ring.chain_at(fast, head) {
                        Some(c) => Ok(Some((head, 1, c))),
                        None => Err("inflight request out of range"),
                    },
                    None => {
                        let p = self.ring.pop(fast);
                        if let (Ok(Some((head, _, _))), Some(t)) = (&p, &self.track) {
                            t.mark(*head, self.counter);
                            self.counter += 1;
                        }
                        p
                    }
                };
                let (id, ndescs, chain) = match popped {
                    Err(why) => {
                        self.mark_broken(why);
                        break;
                    }
                    Ok(None) => {
                        if self.interrupt && self.ring.set_notification(fast, true) {
                            busy = true;
                        }
                        break;
                    }
                    Ok(Some(x)) => x,
                };
                busy = true;
                let task = &mut self.tasks[id as usize];
                if task.busy {
                    self.mark_broken("buffer id reused while in flight");
                    break;
                }
                // The usual read or write straight from its three descriptors; anything else is walked.
                let parsed = match chain
                    .three()
                    .and_then(|d| request::parse_three(&d, fast, geo, &mut task.iovs, MAX_IOVS))
                {
                    Some(p) => Ok(p),
                    None => request::parse(chain, fast, geo, &mut task.iovs, MAX_IOVS),
                };
                match parsed {
                    Err(request::Broken(why)) => {
                        self.mark_broken(why);
                        break;
                    }
                    Ok(Parsed::Fail { status, code, why }) => {
                        log::debug!("vhost queue {}: request {id} failed: {why}", self.idx);
                        self.answer(fast, id, ndescs, status, code, 1);
                    }
                    Ok(Parsed::GetId { status, addr, len }) => {
                        let code = if fast.write(addr.0, &serial[..len as usize]) {
                            S_OK
                        } else {
                            S_IOERR
                        };
                        self.answer(fast, id, ndescs, status, code, len + 1);
                    }
                    Ok(Parsed::Submit {
                        status,
                        op,
                        offset_blocks,
                        num_blocks,
                        used_len,
                    }) => {
                        task.busy = true;
                        task.id = id;
                        task.ndescs = ndescs;
                        task.status = status;
                        task.used_len = used_len;
                        task.op = op;
                        task.offset_blocks = offset_blocks;
                        task.num_blocks = num_blocks;
                        self.inflight += 1;
                        let r = match ch {
                            Some(ch) => crate::io::submit(
                                ch,
                                sink,
                                op,
                                offset_blocks,
                                num_blocks,
                                &task.iovs,
                                ctx_of(self.idx, id),
                            ),
                            None => Err(bdev::BdevError::new(ErrorKind::NotFound, "bdev removed")),
                        };
                        match r {
                            Ok(()) => {}
                            Err(e) if e.kind == ErrorKind::NoMemory => self.retry.push_back(id),
                            Err(e) => {
                                log::debug!("vhost queue {}: submit failed: {e}", self.idx);
                                self.finish(fast, id as usize, S_IOERR);
                            }
                        }
                    }
                }
            }
        }
        // Completions become visible to a polling driver at once; only the interrupt may be delayed.
        self.publish(fast);
        if now >= self.next_check {
            self.update_coalescing(now, coalesce);
        }
        if self.notify_pending && (self.irq_delay == 0 || now >= self.next_event) {
            self.signal(fast);
            self.next_event = now + self.irq_delay;
        }
        busy
    }

    fn mark_broken(&mut self, why: &str) {
        if !self.broken {
            log::error!(
                "vhost queue {}: driver error ({why}); queue stops until it is reset",
                self.idx
            );
        }
        self.broken = true;
    }

    /// SPDK's interrupt coalescing: above `iops_threshold`, delay interrupts by up to `delay_base_us` scaled by
    /// how far the rate is over the threshold.
    fn update_coalescing(&mut self, now: u64, (delay_base_us, iops_threshold): (u32, u32)) {
        let per_interval = iops_threshold as u64 * STATS_INTERVAL_US / 1_000_000;
        self.irq_delay = if delay_base_us == 0 || per_interval == 0 || self.req_cnt <= per_interval
        {
            0
        } else {
            ticks::from_us(delay_base_us as u64) * (self.req_cnt - per_interval) / per_interval
        };
        self.req_cnt = 0;
        self.next_check = now + ticks::from_us(STATS_INTERVAL_US);
    }

    /// Publishes the used entries written so far; with inflight tracking, their requests are cleared then.
    fn publish(&mut self, fast: &FastMem) {
        self.ring.publish(fast);
        if let Some(t) = &self.track {
            if !self.batch.is_empty() {
                for &id in &self.batch {
                    t.clear(id);
                }
                self.batch.clear();
                if let Some(u) = self.ring.next_used() {
                    t.set_used_idx(u);
                }
            }
        }
    }

    /// Signals the driver if it asked for it (event idx / flags) and something was completed.
    fn signal(&mut self, fast: &FastMem) {
        if !self.notify_pending {
            return;
        }
        self.notify_pending = false;
        self.publish(fast);
        if self.ring.needs_notification(fast) {
            if let Some(c) = &self.call {
                let _ = (&*c).write(&1u64.to_ne_bytes());
            }
        }
    }

    /// Answers a request that never reached the bdev.
    fn answer(
        &mut self,
        fast: &FastMem,
        id: u16,
        ndescs: u16,
        status: GuestAddress,
        code: u8,
        len: u32,
    ) {
        fast.write_u8(status.0, code);
        if let Err(why) = self.ring.push_used(fast, id, ndescs, len) {
            self.mark_broken(why);
        }
        if self.track.is_some() {
            self.batch.push(id);
        }
        self.notify_pending = true;
        self.req_cnt += 1;
    }

    /// Completes task `ti` with `code`.
    fn finish(&mut self, fast: &FastMem, ti: usize, code: u8) {
        let Some(t) = self.tasks.get_mut(ti) else {
            return;
        };
        if !t.busy {
            return;
        }
        t.busy = false;
        let (id, ndescs, status) = (t.id, t.ndescs, t.status);
        let len = if code == S_OK { t.used_len } else { 1 };
        self.inflight -= 1;
        self.answer(fast, id, ndescs, status, code, len);
    }
}
