//! Reactors: one polled OS thread per core of the mask, pinned, each running lightweight threads.

use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_queue::SegQueue;

use crate::cpumask::CpuMask;
use crate::sys;
use crate::thread::{ThreadHandle, ThreadLocal};
use crate::ticks;

/// How reactors start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Cores to run reactors on.
    pub cpumask: CpuMask,
    /// The core that runs the app thread (default: the lowest of the mask).
    pub main_core: Option<u32>,
    /// Sleep when idle instead of busy polling (SPDK's default is busy polling).
    pub idle_backoff: bool,
    /// Pin each reactor to its core.
    pub pin: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cpumask: CpuMask::single(0),
            main_core: None,
            idle_backoff: false,
            pin: true,
        }
    }
}

/// Why reactors could not start.
#[derive(Debug)]
pub enum Error {
    /// A core of the mask is not usable on this machine.
    InvalidCore(u32, String),
    /// The main core is not in the mask.
    MainCoreNotInMask(u32),
    /// Reactors are already running in this process.
    AlreadyRunning,
    /// An OS call failed.
    Os(std::io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::InvalidCore(c, why) => write!(f, "core {c} is not usable: {why}"),
            Error::MainCoreNotInMask(c) => write!(f, "main core {c} is not in the core mask"),
            Error::AlreadyRunning => write!(f, "reactors are already running"),
            Error::Os(e) => write!(f, "{e}"),
        }
    }
}
impl std::error::Error for Error {}

pub(crate) struct ReactorShared {
    pub(crate) core: u32,
    sleeping: AtomicBool,
    wake_fd: RawFd,
    epoll_fd: RawFd,
    incoming: SegQueue<ThreadHandle>,
    busy: AtomicU64,
    idle: AtomicU64,
    tid: AtomicU64,
    threads: Mutex<Vec<ThreadHandle>>,
}

impl ReactorShared {
    fn new(core: u32) -> std::io::Result<Arc<Self>> {
        let wake_fd = sys::eventfd()?;
        let epoll_fd = sys::epoll_create()?;
        sys::epoll_add(epoll_fd, wake_fd)?;
        Ok(Arc::new(ReactorShared {
            core,
            sleeping: AtomicBool::new(false),
            wake_fd,
            epoll_fd,
            incoming: SegQueue::new(),
            busy: AtomicU64::new(0),
            idle: AtomicU64::new(0),
            tid: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
        }))
    }

    /// Wakes the reactor if it sleeps in idle back-off.
    pub(crate) fn wake(&self) {
        // SeqCst pairs with the store+recheck in `sleep`: either the reactor sees our message or we see it asleep.
        if self.sleeping.load(Ordering::SeqCst) {
            sys::eventfd_write(self.wake_fd);
        }
    }
}

impl Drop for ReactorShared {
    fn drop(&mut self) {
        sys::close(self.wake_fd);
        sys::close(self.epoll_fd);
    }
}

struct Runtime {
    reactors: Vec<Arc<ReactorShared>>,
    main: Arc<ReactorShared>,
    app_thread: ThreadHandle,
    stop: AtomicBool,
    opts: Options,
    /// Threads run by OS threads outside the reactors ([`ForeignThread`]).
    foreign: Mutex<Vec<ThreadHandle>>,
}

static RUNTIME: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);

fn runtime() -> Option<Arc<Runtime>> {
    RUNTIME.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The app thread (SPDK's `app_thread`) on the main core, while reactors run.
pub fn app_thread() -> Option<ThreadHandle> {
    runtime().map(|r| r.app_thread.clone())
}

/// Every live lightweight thread, app thread first.
pub fn all_threads() -> Vec<ThreadHandle> {
    let Some(rt) = runtime() else { return vec![] };
    let mut v = vec![];
    for r in &rt.reactors {
        for t in r.threads.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if !t.is_exited() {
                v.push(t.clone());
            }
        }
    }
    v.extend(
        rt.foreign
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|t| !t.is_exited())
            .cloned(),
    );
    v.sort_by_key(|t| t.id());
    v
}

/// A lightweight thread that an OS thread outside the reactors runs itself, as SPDK lets its creator poll an
/// `spdk_thread` (`spdk_thread_poll`): a fio job thread, say, that submits bdev I/O and reaps the completions
/// on its own stack, with no hop to a reactor. While it lives it is the calling OS thread's current thread
/// (channels got and I/O submitted there belong to it), so the I/O path pays no switch per call. It takes part
/// in [`crate::for_each_thread`] walks like any thread (channel walks for range locks, resets,
/// unregistration), so its owner must keep calling [`ForeignThread::poll`] while it holds channels. Not
/// `Send`: it belongs to the OS thread that made it, which runs no other lightweight thread meanwhile.
pub struct ForeignThread {
    local: Rc<ThreadLocal>,
    handle: ThreadHandle,
}

impl ForeignThread {
    /// Makes a thread named `name` and makes it the calling OS thread's current one; fails when reactors
    /// are not running or the OS thread already runs a lightweight thread.
    pub fn new(name: &str) -> std::io::Result<ForeignThread> {
        let rt = runtime().ok_or_else(|| std::io::Error::other("reactors are not running"))?;
        if crate::thread::current().is_some() {
            return Err(std::io::Error::other(
                "this OS thread already runs a lightweight thread",
            ));
        }
        // Its own wake-up state: nothing ever sleeps on it (the owner polls), so a wake is a flag load.
        let shared = ReactorShared::new(sys::current_cpu())?;
        let handle = ThreadHandle::new(name, rt.opts.cpumask.clone(), shared);
        rt.foreign
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle.clone());
        let local = ThreadLocal::new(handle.0.clone());
        ThreadLocal::make_current(Some(local.clone()));
        Ok(ForeignThread { local, handle })
    }

    /// One iteration: the messages sent to the thread, then its due pollers (I/O completions among them).
    /// Returns whether anything did work.
    pub fn poll(&self) -> bool {
        // Most foreign threads have no timed poller: no clock read then.
        self.local.run_once_at(ticks::now)
    }

    /// A `Send` handle to the thread.
    pub fn handle(&self) -> &ThreadHandle {
        &self.handle
    }
}

impl Drop for ForeignThread {
    fn drop(&mut self) {
        // Messages already sent (a channel walk's step, say) still run, so no walk waits for a thread that is gone.
        while self.handle.pending_msgs() {
            self.poll();
        }
        self.local.mark_exited();
        ThreadLocal::make_current(None);
        if let Some(rt) = runtime() {
            rt.foreign
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|t| t.id() != self.handle.id());
        }
    }
}

/// The cores reactors run on.
pub fn cores() -> Vec<u32> {
    runtime()
        .map(|r| r.reactors.iter().map(|x| x.core).collect())
        .unwrap_or_default()
}

/// The main core.
pub fn main_core() -> Option<u32> {
    runtime().map(|r| r.main.core)
}

/// The options reactors were started with.
pub fn options() -> Option<Options> {
    runtime().map(|r| r.opts.clone())
}

/// Busy/idle counters of one reactor, as `framework_get_reactors` reports them.
#[derive(Clone, Debug)]
pub struct ReactorInfo {
    /// The core.
    pub lcore: u32,
    /// Ticks in busy iterations.
    pub busy: u64,
    /// Ticks in idle iterations.
    pub idle: u64,
    /// Whether it sleeps when idle.
    pub in_interrupt: bool,
    /// OS thread id of the reactor.
    pub tid: u64,
    /// Threads it runs: (name, id, cpumask).
    pub threads: Vec<(String, u64, CpuMask)>,
}

/// Counters of every reactor.
pub fn reactors_info() -> Vec<ReactorInfo> {
    let Some(rt) = runtime() else { return vec![] };
    rt.reactors
        .iter()
        .map(|r| ReactorInfo {
            lcore: r.core,
            busy: r.busy.load(Ordering::Relaxed),
            idle: r.idle.load(Ordering::Relaxed),
            in_interrupt: rt.opts.idle_backoff,
            tid: r.tid.load(Ordering::Relaxed),
            threads: r
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|t| !t.is_exited())
                .map(|t| (t.name().to_string(), t.id(), t.cpumask().clone()))
                .collect(),
        })
        .collect()
}

/// Creates a lightweight thread on the least loaded reactor allowed by `cpumask` (any, if `None`).
/// Returns `None` when reactors are not running or the mask names no reactor core.
pub fn spawn_thread(name: &str, cpumask: Option<&CpuMask>) -> Option<ThreadHandle> {
    let rt = runtime()?;
    let reactor = rt
        .reactors
        .iter()
        .filter(|r| cpumask.is_none_or(|m| m.contains(r.core)))
        .min_by_key(|r| {
            r.threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|t| !t.is_exited())
                .count()
        })?
        .clone();
    let mask = cpumask.cloned().unwrap_or_else(|| rt.opts.cpumask.clone());
    Some(place_thread(name, mask, reactor))
}

fn place_thread(name: &str, mask: CpuMask, reactor: Arc<ReactorShared>) -> ThreadHandle {
    let t = ThreadHandle::new(name, mask, reactor.clone());
    reactor
        .threads
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(t.clone());
    reactor.incoming.push(t.clone());
    reactor.wake();
    t
}

/// Asks every reactor to stop after its current iteration. Callable from any thread.
pub fn stop() {
    if let Some(rt) = runtime() {
        rt.stop.store(true, Ordering::SeqCst);
        for r in &rt.reactors {
            sys::eventfd_write(r.wake_fd);
        }
    }
}

/// Whether a stop was requested.
pub fn stopping() -> bool {
    runtime().is_some_and(|r| r.stop.load(Ordering::Relaxed))
}

/// Registers `fd` with the current reactor so readiness wakes it from idle back-off (e.g. an io_uring eventfd).
pub fn add_wake_fd(fd: RawFd) -> std::io::Result<()> {
    let core = crate::thread::current()
        .ok_or_else(|| std::io::Error::other("not on a reactor"))?
        .0
        .reactor
        .clone();
    sys::epoll_add(core.epoll_fd, fd)
}

/// Removes an fd added with [`add_wake_fd`].
pub fn remove_wake_fd(fd: RawFd) {
    if let Some(t) = crate::thread::current() {
        sys::epoll_del(t.0.reactor.epoll_fd, fd);
    }
}

/// Starts one reactor per core of the mask and runs `init` on the app thread. The main reactor runs on the
/// calling OS thread; returns once [`stop`] was called and every reactor has exited.
pub fn run(opts: Options, init: impl FnOnce() + Send + 'static) -> Result<(), Error> {
    let main_core = opts
        .main_core
        .unwrap_or_else(|| opts.cpumask.first().unwrap_or(0));
    if !opts.cpumask.contains(main_core) {
        return Err(Error::MainCoreNotInMask(main_core));
    }
    let online = sys::online_cpus();
    for c in opts.cpumask.cores() {
        if opts.pin && !online.contains(&c) {
            return Err(Error::InvalidCore(
                c,
                "not an online CPU of this process".into(),
            ));
        }
    }
    let mut reactors = vec![];
    for c in opts.cpumask.cores() {
        reactors.push(ReactorShared::new(c).map_err(Error::Os)?);
    }
    let main = reactors
        .iter()
        .find(|r| r.core == main_core)
        .cloned()
        .ok_or(Error::MainCoreNotInMask(main_core))?;
    let app_thread = place_thread("app_thread", CpuMask::single(main_core), main.clone());
    let rt = Arc::new(Runtime {
        reactors: reactors.clone(),
        main: main.clone(),
        app_thread: app_thread.clone(),
        stop: AtomicBool::new(false),
        opts: opts.clone(),
        foreign: Mutex::new(Vec::new()),
    });
    {
        let mut g = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_some() {
            return Err(Error::AlreadyRunning);
        }
        *g = Some(rt.clone());
    }
    let _ = ticks::rate();
    app_thread.send(init);
    let mut joins = vec![];
    for r in reactors.iter().filter(|r| r.core != main_core) {
        let r = r.clone();
        let rt = rt.clone();
        joins.push(
            std::thread::Builder::new()
                .name(format!("reactor_{}", r.core))
                .spawn(move || reactor_loop(&rt, &r))
                .map_err(Error::Os)?,
        );
    }
    reactor_loop(&rt, &main);
    for j in joins {
        let _ = j.join();
    }
    *RUNTIME.lock().unwrap_or_else(|e| e.into_inner()) = None;
    Ok(())
}

/// Idle iterations before a back-off reactor sleeps.
const IDLE_SPINS: u32 = 200;
/// Longest idle sleep, so timed pollers with no fd still run about on time.
const MAX_SLEEP_US: u64 = 10_000;
/// Longest idle sleep while every-iteration pollers exist.
const EVERY_ITERATION_SLEEP_US: u64 = 1_000;

fn reactor_loop(rt: &Runtime, me: &Arc<ReactorShared>) {
    if rt.opts.pin {
        if let Err(e) = sys::pin_to_core(me.core) {
            log::warn!("reactor {}: could not pin: {e}", me.core);
        }
    }
    me.tid.store(sys::gettid(), Ordering::Relaxed);
    log::info!("Reactor started on core {}", me.core);
    let mut threads: Vec<Rc<ThreadLocal>> = vec![];
    let mut last = ticks::now();
    let mut idle_spins = 0u32;
    let mut stop_seen = 0u32;
    loop {
        // (`is_empty` first: `pop` on an empty queue runs a full fence.)
        while !me.incoming.is_empty() {
            let Some(t) = me.incoming.pop() else { break };
            threads.push(ThreadLocal::new(t.0.clone()));
        }
        let mut busy = false;
        // At most one clock read per thread: where one thread's run ends the next one's begins, and an iteration
        // begins where the last one ended (the bookkeeping in between is a few instructions). A thread that found
        // nothing to do took a few tens of nanoseconds; the clock is not read for it (a read costs as much), and
        // that moment is counted with the next thread that reads it.
        let mut now = last;
        let n = threads.len();
        for (i, t) in threads.iter().enumerate() {
            let did = ThreadLocal::enter(t, || t.run_once(now));
            if did || i + 1 == n {
                let end = ticks::now();
                t.account(did, end.saturating_sub(now));
                now = end;
            }
            busy |= did;
        }
        let mut exited = false;
        for t in &threads {
            if t.exit_requested() && !ThreadHandle(t.shared.clone()).pending_msgs() {
                ThreadLocal::enter(t, || t.mark_exited());
                exited = true;
            }
        }
        if exited {
            threads.retain(|t| !ThreadHandle(t.shared.clone()).is_exited());
            me.threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|t| !t.is_exited());
        }
        if threads.is_empty() {
            now = ticks::now();
        }
        let spent = now.saturating_sub(last);
        last = now;
        let ctr = if busy { &me.busy } else { &me.idle };
        ctr.store(ctr.load(Ordering::Relaxed) + spent, Ordering::Relaxed);
        if rt.stop.load(Ordering::SeqCst) {
            // Run a few more iterations so messages sent during shutdown (completions, replies) are delivered.
            stop_seen += 1;
            if !busy || stop_seen > 1000 {
                break;
            }
            continue;
        }
        if busy {
            idle_spins = 0;
        } else if rt.opts.idle_backoff {
            idle_spins += 1;
            if idle_spins >= IDLE_SPINS {
                sleep(me, &threads, now);
                // The sleep is idle time; the next iteration starts when it ends.
                last = ticks::now();
                me.idle.store(
                    me.idle.load(Ordering::Relaxed) + (last - now),
                    Ordering::Relaxed,
                );
            }
        }
    }
    for t in &threads {
        ThreadLocal::enter(t, || t.mark_exited());
    }
    log::info!("Reactor on core {} stopped", me.core);
}

fn sleep(me: &ReactorShared, threads: &[Rc<ThreadLocal>], now: u64) {
    let mut cap = MAX_SLEEP_US;
    let mut next_ticks: Option<u64> = None;
    for t in threads {
        let (next, every) = t.next_timer_in(now);
        if every {
            // Every-iteration pollers (bdev channels) found nothing to do for IDLE_SPINS iterations. Sleep, but
            // briefly: work that is not fd-driven (and so cannot wake us) waits at most this long.
            cap = cap.min(EVERY_ITERATION_SLEEP_US);
        }
        if let Some(n) = next {
            next_ticks = Some(next_ticks.map_or(n, |x| x.min(n)));
        }
    }
    let next = next_ticks
        .map(|t| (t as f64 * 1_000_000.0 / ticks::rate() as f64) as u64)
        .unwrap_or(cap)
        .min(cap);
    if next == 0 {
        return;
    }
    me.sleeping.store(true, Ordering::SeqCst);
    let pending = !me.incoming.is_empty()
        || threads
            .iter()
            .any(|t| ThreadHandle(t.shared.clone()).pending_msgs() || t.exit_requested());
    if !pending {
        sys::epoll_wait_us(me.epoll_fd, next, me.wake_fd);
    }
    me.sleeping.store(false, Ordering::SeqCst);
}
