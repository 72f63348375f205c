//! Helpers for tests that need running reactors (used by this and higher crates' tests).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{CpuMask, Options};

static LOCK: Mutex<()> = Mutex::new(());

/// Runs reactors on `mask` (unpinned, idle back-off) with `init` on the app thread until something calls
/// [`crate::stop`]. Reactors are process-global, so callers are serialized; a watchdog fails the process if the
/// run takes longer than `limit` instead of hanging CI.
pub fn run(mask: &str, limit: Duration, init: impl FnOnce() + Send + 'static) {
    let _g = crate::lock(&LOCK);
    let opts = Options {
        cpumask: CpuMask::parse(mask).expect("valid test mask"),
        main_core: None,
        idle_backoff: true,
        pin: false,
    };
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        if !d2.load(Ordering::SeqCst) {
            eprintln!("reactor test did not stop within {limit:?}");
            std::process::exit(101);
        }
    });
    crate::run(opts, init).expect("reactors start");
    done.store(true, Ordering::SeqCst);
}

/// Holds the lock that [`run`] takes, for tests that start reactors themselves.
pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    crate::lock(&LOCK)
}

/// A reply channel handed to code run on the app thread: called once with the answer, possibly later (from a
/// completion callback).
pub type Reply<R> = Box<dyn FnOnce(R) + Send>;

/// Runs `f` on the app thread (reactors must be running) and waits for the answer it gives through its reply.
/// Panics after two minutes without one.
pub fn on_app<R: Send + 'static>(f: impl FnOnce(Reply<R>) + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    crate::app_thread()
        .expect("reactors are running")
        .send(move || {
            f(Box::new(move |r| {
                let _ = tx.send(r);
            }))
        });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("no reply from the app thread")
}

/// Runs `f` on the app thread and returns its result.
pub fn app<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    on_app(move |reply| reply(f()))
}
