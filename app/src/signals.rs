//! SIGINT/SIGTERM handling: the handler only sets a flag, which a poller on the app thread turns into an
//! orderly shutdown.

use std::sync::atomic::{AtomicI32, Ordering};

static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    PENDING.store(sig, Ordering::SeqCst);
}

/// Installs handlers for SIGINT and SIGTERM and ignores SIGPIPE (a vanished RPC client must not kill us).
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; we set a handler that only performs an atomic store, which is
        // async-signal-safe, and pass pointers to live locals.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    // SAFETY: setting SIG_IGN for SIGPIPE has no memory effects.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// The signal received since the last call, if any.
pub fn take() -> Option<i32> {
    match PENDING.swap(0, Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Sends `sig` to this process (`spdk_kill_instance`).
pub fn raise(sig: i32) {
    // SAFETY: kill(getpid(), sig) has no memory effects on this process beyond delivering the signal.
    unsafe { libc::kill(libc::getpid(), sig) };
}
