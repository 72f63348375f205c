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
