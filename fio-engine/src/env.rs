//! The storage environment inside fio's process: started once, by the first job that needs it, from that
//! job's engine options (as SPDK's engine starts its environment once per process), and stopped at exit.
//!
//! The target runtime (reactors, the bdev layer and its modules, the JSON config) runs on a thread of its
//! own in interrupt mode: it only does control work (config load, RPCs, channel walks) and sleeps otherwise.
//! The I/O itself runs on fio's job threads, each a [`reactor::ForeignThread`] (see `job.rs`).

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::EngineOptions;

/// How long the environment may take to start (config load included) before the job fails.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long shutdown at exit may take (lvstores unload, controllers detach).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

enum State {
    Idle,
    Running(Option<JoinHandle<()>>),
    Failed(String),
}

static STATE: Mutex<State> = Mutex::new(State::Idle);

/// Starts the environment unless it runs (or failed: the failure is returned again, as every later job
/// would meet it too).
pub fn ensure(o: &EngineOptions) -> Result<(), String> {
    let mut st = reactor::lock(&STATE);
    match &*st {
        State::Running(_) => return Ok(()),
        State::Failed(e) => return Err(e.clone()),
        State::Idle => {}
    }
    let (next, res) = match start(o) {
        Ok(join) => (State::Running(Some(join)), Ok(())),
        Err(e) => (State::Failed(e.clone()), Err(e)),
    };
    *st = next;
    res
}

fn start(o: &EngineOptions) -> Result<JoinHandle<()>, String> {
    if o.initial_zone_reset != 0 || o.zone_append != 0 {
        return Err(
            "initial_zone_reset and zone_append need zoned bdevs, which this target does not have"
                .into(),
        );
    }
    // SPDK reads the JSON config from either option (spdk_conf has taken JSON since v20.10).
    let config = [&o.json_conf, &o.conf]
        .into_iter()
        .find(|c| !c.is_empty())
        .map(PathBuf::from)
        .ok_or("no configuration file: set spdk_json_conf (or spdk_conf) to a JSON config")?;
    if !o.env_context.is_empty() {
        log::info!(
            "spdk_bdev engine: env_context '{}' is for DPDK's environment and is ignored",
            o.env_context
        );
    }
    let opts = app::cli::Opts {
        config: Some(config),
        no_rpc_server: o.rpc_listen_addr.is_empty(),
        rpc_socket: PathBuf::from(&o.rpc_listen_addr),
        mem_size_mb: (o.mem_mb > 0).then_some(o.mem_mb as u64),
        log_flags: o
            .log_flags
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(String::from)
            .collect(),
        interrupt_mode: true,
        embedded: true,
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let ready = tx.clone();
    let join = std::thread::Builder::new()
        .name("spdk_fio_env".into())
        .spawn(move || {
            let hooks = app::Hooks {
                register: None,
                on_ready: Some(Box::new(move |_t| {
                    let _ = ready.send(Ok(()));
                })),
            };
            let res = app::run_with(opts, app::bdev_subsystems(), hooks);
            // Only read when the runtime ended before it was ready.
            let _ = tx.send(Err(match res {
                Ok(()) => "the environment stopped while starting".into(),
                Err(e) => e,
            }));
        })
        .map_err(|e| format!("cannot start the environment thread: {e}"))?;
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = join.join();
            return Err(e);
        }
        Err(_) => {
            return Err(format!(
                "the environment did not start within {START_TIMEOUT:?}"
            ))
        }
    }
    crate::abi::pin_library();
    // SAFETY: `stop_at_exit` is an `extern "C" fn()` of this library, which `pin_library` keeps mapped until
    // the handlers run.
    if unsafe { libc::atexit(stop_at_exit) } != 0 {
        log::warn!(
            "spdk_bdev engine: cannot register the exit handler; bdevs are not shut down cleanly"
        );
    }
    Ok(join)
}

/// At process exit: an orderly shutdown (modules' fini: files closed, lvstores unloaded, controllers
/// detached), then the environment's thread is joined.
extern "C" fn stop_at_exit() {
    let join = match &mut *reactor::lock(&STATE) {
        State::Running(j) => j.take(),
        _ => None,
    };
    let Some(join) = join else { return };
    if let Some(app) = reactor::app_thread() {
        app.send(|| match app::Target::current() {
            Some(t) => t.shutdown(),
            None => reactor::stop(),
        });
    }
    let deadline = std::time::Instant::now() + STOP_TIMEOUT;
    while !join.is_finished() {
        if std::time::Instant::now() > deadline {
            eprintln!("spdk_bdev engine: shutdown did not finish within {STOP_TIMEOUT:?}");
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = join.join();
}
