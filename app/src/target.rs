//! The running target: owns the RPC registry and server on the app thread, drives init and shutdown.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use jsonrpc::{Registry, Responder, Server, STATE_RUNTIME};
use reactor::Poller;
use serde_json::Value;
use subsystems::framework::{chain, AppEnv, Subsystem};

use crate::cli::Opts;
use crate::compat::{self, KeptOptions};
use crate::config::{self, Entry};

/// The SPDK version this target is compatible with, as `spdk_get_version` reports it.
pub const VERSION: (u32, u32, u32) = (24, 5, 0);

type ConfigWriter = Box<dyn Fn() -> Value>;

/// How often the RPC server and the signal flag are polled while no client is active: SPDK's 4 ms. Polling
/// every iteration would cost the data path an `accept4` syscall per reactor loop.
const RPC_POLL_PERIOD_US: u64 = 4_000;
/// The period while a request is being answered, and for `RPC_ACTIVE_GRACE` after the last one: a control
/// plane's calls one after another then cost their own time, not two 4 ms poll periods each (SPDK answers
/// about 60 `bdev_lvol_create` per second for that reason alone).
const RPC_ACTIVE_PERIOD_US: u64 = 50;
const RPC_ACTIVE_GRACE: std::time::Duration = std::time::Duration::from_millis(20);

/// App-thread state of a running target.
pub struct Target {
    /// Command line options.
    pub opts: Opts,
    /// The method table.
    pub reg: Rc<RefCell<Registry>>,
    /// Options of SPDK subsystems kept for save_config.
    pub kept: Rc<RefCell<KeptOptions>>,
    server: RefCell<Option<Server>>,
    writers: RefCell<Vec<(String, ConfigWriter)>>,
    runtime_entries: RefCell<Vec<Entry>>,
    init_done: Cell<bool>,
    wait_init: RefCell<Vec<Responder>>,
    shutting_down: Cell<bool>,
    failure: Arc<Mutex<Option<String>>>,
    poller: RefCell<Option<Poller>>,
    on_ready: RefCell<Option<ReadyHook>>,
    /// The subsystems linked in, in init order.
    subsystems: Vec<Arc<dyn Subsystem>>,
}

type ReadyHook = Box<dyn FnOnce(Rc<Target>)>;
/// Registers extra methods (see [`Hooks::register`]).
pub type RegisterHook = Box<dyn FnOnce(&mut Registry) + Send>;
/// Runs once init is done (see [`Hooks::on_ready`]).
pub type OnReadyHook = Box<dyn FnOnce(Rc<Target>) + Send>;

/// Extension points for applications built on the target runtime (e.g. bdevperf).
#[derive(Default)]
pub struct Hooks {
    /// Registers extra methods.
    pub register: Option<RegisterHook>,
    /// Runs on the app thread once init is done.
    pub on_ready: Option<OnReadyHook>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Target>>> = const { RefCell::new(None) };
}

impl Target {
    /// The target running on this (app) thread.
    pub fn current() -> Option<Rc<Target>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Adds a subsystem's `save_config` writer (replaces the kept-options default for that name).
    pub fn add_config_writer(&self, subsystem: &str, f: impl Fn() -> Value + 'static) {
        self.writers
            .borrow_mut()
            .push((subsystem.to_string(), Box::new(f)));
    }

    /// A subsystem's config array as `framework_get_config` returns it (`None` for unknown subsystems).
    pub fn subsystem_config(&self, name: &str) -> Option<Value> {
        if !compat::SUBSYSTEMS.iter().any(|s| s.name == name) {
            return None;
        }
        if let Some((_, w)) = self.writers.borrow().iter().find(|(n, _)| n == name) {
            return Some(w());
        }
        self.kept.borrow().subsystem_config(name)
    }

    /// The whole configuration document.
    pub fn config_document(&self) -> Value {
        config::document(
            compat::SUBSYSTEMS
                .iter()
                .filter_map(|s| {
                    self.subsystem_config(s.name)
                        .map(|c| (s.name.to_string(), c))
                })
                .collect(),
        )
    }

    /// Whether subsystem init has finished.
    pub fn init_done(&self) -> bool {
        self.init_done.get()
    }

    /// Answers `r` once init is done (`framework_wait_init`).
    pub fn wait_init(&self, r: Responder) {
        if self.init_done.get() {
            r.ok(Value::Bool(true));
        } else {
            self.wait_init.borrow_mut().push(r);
        }
    }

    /// Initializes subsystems and replays the config's runtime entries (`framework_start_init`, or at start
    /// without `--wait-for-rpc`). `done` gets the outcome.
    pub fn start_init(self: &Rc<Self>, done: impl FnOnce(Result<(), String>) + 'static) {
        self.reg.borrow_mut().set_state(STATE_RUNTIME);
        self.kept.borrow_mut().on_subsystems_init();
        let me = self.clone();
        chain(
            self.subsystems.clone(),
            |s, d| {
                let name = s.name();
                s.init(Box::new(move |r| {
                    d(r.map_err(|e| format!("subsystem {name} failed to initialize: {e}")))
                }))
            },
            Box::new(move |res| match res {
                Ok(()) => me.apply_runtime_entries(done),
                Err(e) => done(Err(e)),
            }),
        );
    }

    /// Replays the config's runtime entries once the subsystems are up.
    fn apply_runtime_entries(self: &Rc<Self>, done: impl FnOnce(Result<(), String>) + 'static) {
        let entries = std::mem::take(&mut *self.runtime_entries.borrow_mut());
        let me = self.clone();
        config::apply(
            self.reg.clone(),
            entries,
            self.opts.json_ignore_init_errors,
            move |res| {
                if res.is_ok() {
                    me.init_done.set(true);
                    for r in me.wait_init.borrow_mut().drain(..) {
                        r.ok(Value::Bool(true));
                    }
                    log::info!("spdk_tgt is ready");
                    let hook = me.on_ready.borrow_mut().take();
                    if let Some(h) = hook {
                        h(me.clone());
                    }
                }
                done(res)
            },
        );
    }

    /// Records a fatal error (the process exits non-zero) and shuts down.
    pub fn fail(self: &Rc<Self>, msg: String) {
        log::error!("{msg}");
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
        self.shutdown();
    }

    /// Orderly shutdown: stop serving RPCs, finish the subsystems in reverse init order (the bdev subsystem
    /// unregisters every bdev, virtual ones first, waiting for in-flight I/O, then finishes its modules), then
    /// stop the reactors.
    pub fn shutdown(self: &Rc<Self>) {
        if self.shutting_down.replace(true) {
            return;
        }
        log::info!("shutting down");
        if let Some(s) = self.server.borrow_mut().take() {
            s.close();
        }
        // Give up waiting after a while rather than hang on a stuck device.
        reactor::timer(10_000_000, || {
            log::error!("shutdown timed out; stopping reactors");
            reactor::stop();
        })
        .detach();
        let mut subs = self.subsystems.clone();
        subs.reverse();
        chain::<_, ()>(
            subs,
            |s, d| {
                log::debug!("finishing subsystem {}", s.name());
                s.fini(Box::new(move || d(Ok(()))))
            },
            Box::new(|_| reactor::stop()),
        );
    }
}

fn start(
    opts: Opts,
    subsystems: Vec<Arc<dyn Subsystem>>,
    entries: Vec<Entry>,
    failure: Arc<Mutex<Option<String>>>,
    hooks: Hooks,
) {
    let reg = Rc::new(RefCell::new(Registry::new()));
    let kept = Rc::new(RefCell::new(KeptOptions::new()));
    if let Err(e) = kept.borrow_mut().set_app_cpumask(&opts.cpumask.to_string()) {
        log::warn!("{e}");
    }
    {
        let mut r = reg.borrow_mut();
        crate::rpc::register(&mut r);
        for s in &subsystems {
            s.register_rpcs(&mut r);
        }
        compat::register(&mut r, kept.clone());
        if let Some(f) = hooks.register {
            f(&mut r);
        }
        r.set_allowed(opts.rpcs_allowed.clone());
    }
    let t = Rc::new(Target {
        opts,
        reg,
        kept,
        server: RefCell::new(None),
        writers: RefCell::new(Vec::new()),
        runtime_entries: RefCell::new(Vec::new()),
        init_done: Cell::new(false),
        wait_init: RefCell::new(Vec::new()),
        shutting_down: Cell::new(false),
        failure,
        poller: RefCell::new(None),
        on_ready: RefCell::new(hooks.on_ready.map(|f| -> ReadyHook { f })),
        subsystems,
    });
    CURRENT.with(|c| *c.borrow_mut() = Some(t.clone()));
    let env = AppEnv {
        vhost_sock_dir: t.opts.vhost_sock_dir.clone(),
    };
    for s in t.subsystems.clone() {
        s.configure(&env);
        if s.config_json().is_some() {
            let s2 = s.clone();
            t.add_config_writer(s.name(), move || {
                s2.config_json().unwrap_or(Value::Array(Vec::new()))
            });
        }
    }
    if !t.opts.no_rpc_server {
        match Server::listen(Path::new(&t.opts.rpc_socket), t.reg.clone()) {
            Ok(s) => {
                log::info!("RPC server listening on {}", t.opts.rpc_socket.display());
                *t.server.borrow_mut() = Some(s);
            }
            Err(e) => {
                return t.fail(format!(
                    "RPC server failed to listen on {}: {e}",
                    t.opts.rpc_socket.display()
                ))
            }
        }
    }
    let weak = Rc::downgrade(&t);
    let mut last_active: Option<std::time::Instant> = None;
    *t.poller.borrow_mut() = Some(Poller::register("app_rpc", RPC_POLL_PERIOD_US, move || {
        let Some(t) = weak.upgrade() else {
            return false;
        };
        if let Some(sig) = crate::signals::take() {
            log::info!("received signal {sig}");
            t.shutdown();
            return true;
        }
        // As SPDK (v24.05 on), clients are not served while the subsystems initialize and the config loads
        // (they wait in the socket's backlog), so none sees a half-configured target; with `--wait-for-rpc`
        // they drive the start-up themselves.
        if !(t.init_done.get() || t.opts.wait_for_rpc) {
            return false;
        }
        let (n, busy) = t
            .server
            .borrow_mut()
            .as_mut()
            .map_or((0, false), |s| (s.poll(), s.busy()));
        let now = std::time::Instant::now();
        let was_active = last_active.is_some();
        if n > 0 || busy {
            last_active = Some(now);
        } else if last_active.is_some_and(|t| now.duration_since(t) > RPC_ACTIVE_GRACE) {
            last_active = None;
        }
        if last_active.is_some() != was_active {
            if let Some(p) = t.poller.borrow().as_ref() {
                p.set_period_us(if was_active {
                    RPC_POLL_PERIOD_US
                } else {
                    RPC_ACTIVE_PERIOD_US
                });
            }
        }
        n > 0
    }));
    let (startup, runtime) = config::split_by_state(&t.reg.borrow(), entries);
    *t.runtime_entries.borrow_mut() = runtime;
    let t2 = t.clone();
    config::apply(
        t.reg.clone(),
        startup,
        t.opts.json_ignore_init_errors,
        move |res| {
            if let Err(e) = res {
                return t2.fail(format!("failed to load config: {e}"));
            }
            if t2.opts.wait_for_rpc {
                log::info!("waiting for framework_start_init RPC");
                return;
            }
            let t3 = t2.clone();
            t2.start_init(move |res| {
                if let Err(e) = res {
                    t3.fail(format!("failed to load config: {e}"));
                }
            });
        },
    );
}

/// Runs `spdk_tgt` with `opts` and the linked `subsystems` (in init order) until shutdown. Errors describe why
/// it could not start or configure.
pub fn run(opts: Opts, subsystems: Vec<Arc<dyn Subsystem>>) -> Result<(), String> {
    run_with(opts, subsystems, Hooks::default())
}

/// Runs the target with extra `hooks` until shutdown.
pub fn run_with(
    opts: Opts,
    subsystems: Vec<Arc<dyn Subsystem>>,
    hooks: Hooks,
) -> Result<(), String> {
    crate::logging::init(&opts.log_flags, opts.silence_noticelog)?;
    reactor::dma::set_no_huge(opts.no_huge);
    reactor::dma::set_limit(opts.mem_size_mb.unwrap_or(0) as usize * (1 << 20));
    reactor::dma::set_huge_dir(opts.huge_dir.clone()).map_err(|e| {
        format!(
            "--huge-dir {}: {e}",
            opts.huge_dir
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display()
        )
    })?;
    bdev_nvme::set_pci_policy(opts.no_pci, &opts.pci_allowed, &opts.pci_blocked)
        .map_err(|e| format!("-A/-B: {e}"))?;
    let entries = match &opts.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
            config::parse(&text).map_err(|e| format!("config file {}: {e}", path.display()))?
        }
        None => vec![],
    };
    if !opts.embedded {
        crate::signals::install();
    }
    if let Some(p) = &opts.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write pidfile {}: {e}", p.display()))?;
    }
    let failure = Arc::new(Mutex::new(None));
    let f2 = failure.clone();
    let ropts = reactor::Options {
        cpumask: opts.cpumask.clone(),
        main_core: opts.main_core,
        idle_backoff: opts.interrupt_mode,
        pin: !opts.embedded,
    };
    log::info!("Total cores available: {}", opts.cpumask.count());
    let pidfile = opts.pidfile.clone();
    let res = reactor::run(ropts, move || start(opts, subsystems, entries, f2, hooks))
        .map_err(|e| e.to_string());
    if let Some(p) = pidfile {
        let _ = std::fs::remove_file(p);
    }
    res?;
    let failed = failure.lock().unwrap_or_else(|e| e.into_inner()).take();
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
