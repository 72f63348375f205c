//! Lightweight threads (SPDK's `spdk_thread`): a message queue plus pollers, run by one reactor.
//!
//! Everything a thread owns is touched only while that thread runs. Other OS threads reach it through
//! [`ThreadHandle::send`], which pushes a boxed closure (control path only: the I/O path sends no messages).

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_queue::SegQueue;

use crate::cpumask::CpuMask;
use crate::reactor::ReactorShared;
use crate::ticks;

/// A message: a closure run on the target thread.
pub type Msg = Box<dyn FnOnce() + Send>;

static NEXT_THREAD_ID: AtomicU64 = AtomicU64::new(1);
static NEXT_POLLER_ID: AtomicU64 = AtomicU64::new(1);

/// Most messages drained in one thread iteration, so one busy sender cannot starve the pollers.
const MSG_BATCH: usize = 128;

pub(crate) struct ThreadShared {
    id: u64,
    name: String,
    cpumask: CpuMask,
    msgs: SegQueue<Msg>,
    pub(crate) reactor: Arc<ReactorShared>,
    exit_requested: AtomicBool,
    exited: AtomicBool,
}

/// A `Send` handle to a lightweight thread; cheap to clone.
#[derive(Clone)]
pub struct ThreadHandle(pub(crate) Arc<ThreadShared>);

impl ThreadHandle {
    pub(crate) fn new(name: &str, cpumask: CpuMask, reactor: Arc<ReactorShared>) -> Self {
        ThreadHandle(Arc::new(ThreadShared {
            id: NEXT_THREAD_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            cpumask,
            msgs: SegQueue::new(),
            reactor,
            exit_requested: AtomicBool::new(false),
            exited: AtomicBool::new(false),
        }))
    }

    /// Runs `f` on this thread, after the messages already queued to it.
    pub fn send(&self, f: impl FnOnce() + Send + 'static) {
        self.0.msgs.push(Box::new(f));
        self.0.reactor.wake();
    }

    /// The thread's id, unique for the process lifetime.
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The cores this thread may run on.
    pub fn cpumask(&self) -> &CpuMask {
        &self.0.cpumask
    }

    /// The core of the reactor running this thread.
    pub fn core(&self) -> u32 {
        self.0.reactor.core
    }

    /// Asks the thread to exit once its pending messages are run. Its pollers are dropped then.
    pub fn request_exit(&self) {
        self.0.exit_requested.store(true, Ordering::Release);
        self.0.reactor.wake();
    }

    /// Whether the thread has exited.
    pub fn is_exited(&self) -> bool {
        self.0.exited.load(Ordering::Acquire)
    }

    /// Whether this handle names the thread the caller runs on.
    pub fn is_current(&self) -> bool {
        with_current(|t| t.shared.id == self.0.id).unwrap_or(false)
    }

    pub(crate) fn pending_msgs(&self) -> bool {
        !self.0.msgs.is_empty()
    }
}

impl std::fmt::Debug for ThreadHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Thread({}:{})", self.0.id, self.0.name)
    }
}

/// State of a poller, as `thread_get_pollers` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollerState {
    /// Runs when due.
    Running,
    /// Skipped until resumed.
    Paused,
    /// Gone; removed at the end of the current iteration.
    Unregistered,
}

struct PollerInner {
    id: u64,
    name: String,
    period_ticks: Cell<u64>,
    next_run: Cell<u64>,
    state: Cell<PollerState>,
    oneshot: bool,
    f: RefCell<Box<dyn FnMut() -> bool>>,
    run_count: Cell<u64>,
    busy_count: Cell<u64>,
}

/// A registered poller. Dropping the handle unregisters it, unless it was [`detach`](Poller::detach)ed.
pub struct Poller {
    inner: Rc<PollerInner>,
    detached: bool,
}

impl Poller {
    /// Registers `f` on the current thread to run every iteration (`period_us == 0`) or every `period_us`.
    /// `f` returns whether it did work (SPDK's BUSY/IDLE), which feeds the busy/idle counters.
    ///
    /// # Panics
    /// If the caller is not running on a reactor thread: pollers belong to a thread.
    pub fn register(name: &str, period_us: u64, f: impl FnMut() -> bool + 'static) -> Poller {
        Self::register_inner(name, period_us, false, Box::new(f))
    }

    fn register_inner(
        name: &str,
        period_us: u64,
        oneshot: bool,
        f: Box<dyn FnMut() -> bool>,
    ) -> Poller {
        let period = ticks::from_us(period_us);
        let inner = Rc::new(PollerInner {
            id: NEXT_POLLER_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            period_ticks: Cell::new(period),
            next_run: Cell::new(ticks::now() + period),
            state: Cell::new(PollerState::Running),
            oneshot,
            f: RefCell::new(f),
            run_count: Cell::new(0),
            busy_count: Cell::new(0),
        });
        with_current(|t| t.pollers.borrow_mut().push(inner.clone()))
            .expect("Poller::register called outside a reactor thread");
        Poller {
            inner,
            detached: false,
        }
    }

    /// Skips the poller until [`resume`](Poller::resume).
    pub fn pause(&self) {
        if self.inner.state.get() == PollerState::Running {
            self.inner.state.set(PollerState::Paused);
        }
    }

    /// Resumes a paused poller.
    pub fn resume(&self) {
        if self.inner.state.get() == PollerState::Paused {
            self.inner.state.set(PollerState::Running);
        }
    }

    /// Changes the period of a timed poller.
    pub fn set_period_us(&self, period_us: u64) {
        let p = ticks::from_us(period_us);
        self.inner.period_ticks.set(p);
        self.inner.next_run.set(ticks::now() + p);
    }

    /// Unregisters the poller now.
    pub fn unregister(self) {}

    /// Keeps the poller registered after the handle is dropped (until the thread exits, or it is one-shot and fired).
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// How often the poller has run.
    pub fn run_count(&self) -> u64 {
        self.inner.run_count.get()
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        if !self.detached {
            self.inner.state.set(PollerState::Unregistered);
        }
    }
}

/// Runs `f` once on the current thread after `delay_us`. Dropping the returned handle cancels it; call
/// [`Poller::detach`] to fire and forget.
pub fn timer(delay_us: u64, f: impl FnOnce() + 'static) -> Poller {
    let mut f = Some(f);
    Poller::register_inner(
        "timer",
        delay_us.max(1),
        true,
        Box::new(move || {
            if let Some(f) = f.take() {
                f();
            }
            true
        }),
    )
}

/// Per-poller counters, as `thread_get_pollers` reports them.
#[derive(Clone, Debug)]
pub struct PollerInfo {
    /// Poller name.
    pub name: String,
    /// Poller id.
    pub id: u64,
    /// Running or paused.
    pub state: PollerState,
    /// Times run.
    pub run_count: u64,
    /// Times it reported work.
    pub busy_count: u64,
    /// Period in ticks (0 = every iteration).
    pub period_ticks: u64,
}

/// Per-thread counters, as `thread_get_stats` and `thread_get_pollers` report them.
#[derive(Clone, Debug)]
pub struct ThreadInfo {
    /// Thread name.
    pub name: String,
    /// Thread id.
    pub id: u64,
    /// Allowed cores.
    pub cpumask: CpuMask,
    /// Core of the reactor running it.
    pub lcore: u32,
    /// Ticks spent in iterations that did work.
    pub busy: u64,
    /// Ticks spent in idle iterations.
    pub idle: u64,
    /// Ticks since the thread was created.
    pub elapsed: u64,
    /// Pollers that run every iteration.
    pub active_pollers: Vec<PollerInfo>,
    /// Pollers with a period.
    pub timed_pollers: Vec<PollerInfo>,
    /// Paused pollers.
    pub paused_pollers: Vec<PollerInfo>,
}

struct ChannelSlot {
    generation: u64,
    chan: Weak<dyn Any>,
}

/// The part of a thread only its reactor touches.
pub(crate) struct ThreadLocal {
    pub(crate) shared: Arc<ThreadShared>,
    pollers: RefCell<Vec<Rc<PollerInner>>>,
    channels: RefCell<Vec<Option<ChannelSlot>>>,
    busy: Cell<u64>,
    idle: Cell<u64>,
    created: u64,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<ThreadLocal>>> = const { RefCell::new(None) };
}

/// Runs `f` with the thread the caller runs on, or returns `None` off reactor threads.
pub(crate) fn with_current<R>(f: impl FnOnce(&ThreadLocal) -> R) -> Option<R> {
    CURRENT.with(|c| c.borrow().as_ref().map(|t| f(t)))
}

/// The lightweight thread the caller runs on, if any.
pub fn current() -> Option<ThreadHandle> {
    with_current(|t| ThreadHandle(t.shared.clone()))
}

impl ThreadLocal {
    pub(crate) fn new(shared: Arc<ThreadShared>) -> Rc<Self> {
        Rc::new(ThreadLocal {
            shared,
            pollers: RefCell::new(Vec::new()),
            channels: RefCell::new(Vec::new()),
            busy: Cell::new(0),
            idle: Cell::new(0),
            created: ticks::now(),
        })
    }

    /// Makes `this` the current thread while `f` runs.
    pub(crate) fn enter<R>(this: &Rc<ThreadLocal>, f: impl FnOnce() -> R) -> R {
        let prev = CURRENT.with(|c| c.replace(Some(this.clone())));
        let r = f();
        CURRENT.with(|c| *c.borrow_mut() = prev);
        r
    }

    /// Makes `this` the OS thread's current thread until the next call (a [`crate::ForeignThread`]'s life).
    pub(crate) fn make_current(this: Option<Rc<ThreadLocal>>) {
        CURRENT.with(|c| *c.borrow_mut() = this);
    }

    /// One iteration: messages, then due pollers. Returns whether anything did work.
    pub(crate) fn run_once(&self, now: u64) -> bool {
        crate::ticks::set_iteration(now);
        let busy = self.run_once_at(|| now);
        crate::ticks::set_iteration(0);
        busy
    }

    /// [`Self::run_once`] reading the clock only if a timed poller needs it (`now` is called at most once).
    pub(crate) fn run_once_at(&self, now: impl FnOnce() -> u64) -> bool {
        let mut now = Some(now);
        let mut at = 0u64;
        let mut clock = move || {
            if let Some(f) = now.take() {
                at = f();
            }
            at
        };
        let mut busy = false;
        // `is_empty` is two plain loads; `pop` on an empty queue also runs a full fence, which would be paid
        // every iteration by every thread for nothing.
        let n = if self.shared.msgs.is_empty() {
            0
        } else {
            MSG_BATCH
        };
        for _ in 0..n {
            match self.shared.msgs.pop() {
                Some(m) => {
                    m();
                    busy = true;
                }
                None => break,
            }
        }
        let mut i = 0;
        let mut dead = false;
        loop {
            let p = {
                let v = self.pollers.borrow();
                match v.get(i) {
                    Some(p) => p.clone(),
                    None => break,
                }
            };
            i += 1;
            if p.state.get() != PollerState::Running {
                dead |= p.state.get() == PollerState::Unregistered;
                continue;
            }
            let period = p.period_ticks.get();
            if period > 0 {
                let now = clock();
                if now < p.next_run.get() {
                    continue;
                }
                p.next_run.set(now + period);
            }
            let did = (p.f.borrow_mut())();
            p.run_count.set(p.run_count.get() + 1);
            if did {
                p.busy_count.set(p.busy_count.get() + 1);
                busy = true;
            }
            if p.oneshot {
                p.state.set(PollerState::Unregistered);
                dead = true;
            }
        }
        if dead {
            self.pollers
                .borrow_mut()
                .retain(|p| p.state.get() != PollerState::Unregistered);
        }
        busy
    }

    pub(crate) fn account(&self, busy: bool, ticks: u64) {
        let c = if busy { &self.busy } else { &self.idle };
        c.set(c.get() + ticks);
    }

    /// Ticks until the earliest timed poller is due (`None` when there is none), and whether any poller runs
    /// every iteration.
    pub(crate) fn next_timer_in(&self, now: u64) -> (Option<u64>, bool) {
        let pollers = self.pollers.borrow();
        let running = pollers
            .iter()
            .filter(|p| p.state.get() == PollerState::Running);
        let mut every = false;
        let mut next: Option<u64> = None;
        for p in running {
            if p.period_ticks.get() == 0 {
                every = true;
            } else {
                let due = p.next_run.get().saturating_sub(now);
                next = Some(next.map_or(due, |n: u64| n.min(due)));
            }
        }
        (next, every)
    }

    pub(crate) fn exit_requested(&self) -> bool {
        self.shared.exit_requested.load(Ordering::Acquire)
    }

    pub(crate) fn mark_exited(&self) {
        self.pollers.borrow_mut().clear();
        self.shared.exited.store(true, Ordering::Release);
    }

    pub(crate) fn info(&self) -> ThreadInfo {
        let mut info = ThreadInfo {
            name: self.shared.name.clone(),
            id: self.shared.id,
            cpumask: self.shared.cpumask.clone(),
            lcore: self.shared.reactor.core,
            busy: self.busy.get(),
            idle: self.idle.get(),
            elapsed: ticks::now().saturating_sub(self.created),
            active_pollers: vec![],
            timed_pollers: vec![],
            paused_pollers: vec![],
        };
        for p in self.pollers.borrow().iter() {
            let pi = PollerInfo {
                name: p.name.clone(),
                id: p.id,
                state: p.state.get(),
                run_count: p.run_count.get(),
                busy_count: p.busy_count.get(),
                period_ticks: p.period_ticks.get(),
            };
            match (p.state.get(), p.period_ticks.get()) {
                (PollerState::Unregistered, _) => {}
                (PollerState::Paused, _) => info.paused_pollers.push(pi),
                (_, 0) => info.active_pollers.push(pi),
                _ => info.timed_pollers.push(pi),
            }
        }
        info
    }
}

/// Counters of the thread the caller runs on.
pub fn current_info() -> Option<ThreadInfo> {
    with_current(|t| t.info())
}

/// Runs `f` on every live thread in turn (one at a time, as SPDK's `spdk_for_each_thread`), then `done` with
/// the results on the calling thread (or on the app thread when called off the reactors).
pub fn for_each_thread<R: Send + 'static>(
    f: impl Fn() -> R + Send + Sync + 'static,
    done: impl FnOnce(Vec<R>) + Send + 'static,
) {
    let threads = crate::reactor::all_threads();
    let origin = current().or_else(crate::reactor::app_thread);
    struct Walk<R> {
        threads: Vec<ThreadHandle>,
        next: usize,
        f: Box<dyn Fn() -> R + Send + Sync>,
        out: Vec<R>,
        done: Box<dyn FnOnce(Vec<R>) + Send>,
        origin: Option<ThreadHandle>,
    }
    fn step<R: Send + 'static>(mut w: Walk<R>) {
        while w.next < w.threads.len() && w.threads[w.next].is_exited() {
            w.next += 1;
        }
        if let Some(t) = w.threads.get(w.next).cloned() {
            w.next += 1;
            t.send(move || {
                let r = (w.f)();
                w.out.push(r);
                step(w);
            });
        } else {
            let Walk {
                out, done, origin, ..
            } = w;
            match origin {
                Some(o) => o.send(move || done(out)),
                None => done(out),
            }
        }
    }
    step(Walk {
        threads,
        next: 0,
        f: Box::new(f),
        out: Vec::new(),
        done: Box::new(done),
        origin,
    });
}

/// Identifies an I/O device (SPDK's `io_device`): something with one channel per thread.
pub struct IoDevice<T: 'static> {
    index: usize,
    generation: u64,
    create: Box<dyn Fn() -> T + Send + Sync>,
}

struct IdAlloc {
    free: Vec<usize>,
    next: usize,
}
static DEVICE_IDS: Mutex<IdAlloc> = Mutex::new(IdAlloc {
    free: Vec::new(),
    next: 0,
});
static DEVICE_GEN: AtomicU64 = AtomicU64::new(1);

impl<T: 'static> IoDevice<T> {
    /// A device whose per-thread channel is built by `create` on first use on each thread.
    pub fn new(create: impl Fn() -> T + Send + Sync + 'static) -> Self {
        let mut ids = DEVICE_IDS.lock().unwrap_or_else(|e| e.into_inner());
        let index = ids.free.pop().unwrap_or_else(|| {
            ids.next += 1;
            ids.next - 1
        });
        IoDevice {
            index,
            generation: DEVICE_GEN.fetch_add(1, Ordering::Relaxed),
            create: Box::new(create),
        }
    }

    /// This thread's channel for the device, created on first use. The channel lives while any `Rc` to it
    /// does; the thread's slot is an index, so this is O(1).
    ///
    /// # Panics
    /// Off a reactor thread.
    pub fn get_channel(&self) -> Rc<T> {
        if let Some(c) = self.existing_channel() {
            return c;
        }
        let ch = Rc::new((self.create)());
        let any: Rc<dyn Any> = ch.clone();
        with_current(|t| {
            let mut slots = t.channels.borrow_mut();
            if slots.len() <= self.index {
                slots.resize_with(self.index + 1, || None);
            }
            slots[self.index] = Some(ChannelSlot {
                generation: self.generation,
                chan: Rc::downgrade(&any),
            });
        })
        .expect("IoDevice::get_channel called outside a reactor thread");
        ch
    }

    /// This thread's channel if one exists now.
    pub fn existing_channel(&self) -> Option<Rc<T>> {
        with_current(|t| {
            let slots = t.channels.borrow();
            let slot = slots.get(self.index)?.as_ref()?;
            if slot.generation != self.generation {
                return None;
            }
            slot.chan.upgrade()?.downcast::<T>().ok()
        })
        .flatten()
    }

    /// Runs `f` on every thread that holds a channel of this device, then `done` with the results.
    pub fn for_each_channel<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl Fn(&T) -> R + Send + Sync + 'static,
        done: impl FnOnce(Vec<R>) + Send + 'static,
    ) where
        T: 'static,
    {
        let dev = self.clone();
        for_each_thread(
            move || dev.existing_channel().map(|c| f(&c)),
            move |v| done(v.into_iter().flatten().collect()),
        );
    }
}

impl<T: 'static> Drop for IoDevice<T> {
    fn drop(&mut self) {
        DEVICE_IDS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .free
            .push(self.index);
    }
}
