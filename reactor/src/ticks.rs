//! A cheap monotonic tick counter (the TSC on x86_64) and its rate, as SPDK's `spdk_get_ticks`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Current tick count.
#[inline]
pub fn now() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no memory effects and is available on every x86_64 CPU.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        start().elapsed().as_nanos() as u64
    }
}

thread_local! {
    static ITERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The tick the running reactor iteration of this OS thread began at (a clock read when no reactor iteration is
/// running here). Pollers that only need a time for rate limits or coalescing take this instead of a clock read
/// each: a TSC read costs tens of cycles (more in some VMs), and the reactor reads it once per iteration anyway.
#[inline]
pub fn iteration() -> u64 {
    match ITERATION.with(|c| c.get()) {
        0 => now(),
        t => t,
    }
}

/// Records the start of a reactor iteration (0: none running).
#[inline]
pub(crate) fn set_iteration(t: u64) {
    ITERATION.with(|c| c.set(t));
}

#[cfg(not(target_arch = "x86_64"))]
fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Ticks per second, measured once against the monotonic clock.
pub fn rate() -> u64 {
    static RATE: OnceLock<u64> = OnceLock::new();
    *RATE.get_or_init(|| {
        if !cfg!(target_arch = "x86_64") {
            return 1_000_000_000;
        }
        // Each endpoint pairs a TSC read with the clock reads around it; the tightest of a few tries wins, so a
        // preemption between the two reads (common on a loaded machine) cannot skew the rate.
        let sample = || {
            (0..16)
                .map(|_| {
                    let a = Instant::now();
                    let c = now();
                    let b = Instant::now();
                    (b - a, a + (b - a) / 2, c)
                })
                .min_by_key(|x| x.0)
                .map(|x| (x.1, x.2))
                .unwrap_or_else(|| (Instant::now(), now()))
        };
        let (t0, c0) = sample();
        std::thread::sleep(Duration::from_millis(50));
        let (t1, c1) = sample();
        let dt = t1 - t0;
        let r = (c1.wrapping_sub(c0) as u128 * 1_000_000_000 / dt.as_nanos().max(1)) as u64;
        // Round to 1 MHz so repeated runs report the same rate, as SPDK's users expect a stable tick_rate.
        (r / 1_000_000).max(1) * 1_000_000
    })
}

/// Converts ticks to microseconds as a float.
pub fn to_us(ticks: u64) -> f64 {
    ticks as f64 * 1_000_000.0 / rate() as f64
}

/// Converts a duration in microseconds to ticks.
pub fn from_us(us: u64) -> u64 {
    (us as u128 * rate() as u128 / 1_000_000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iteration_is_the_recorded_start_or_else_the_clock() {
        set_iteration(0);
        let a = iteration();
        let b = iteration();
        assert!(a > 0 && b >= a, "the clock while no iteration runs");
        set_iteration(42);
        assert_eq!(iteration(), 42);
        assert_eq!(iteration(), 42);
        set_iteration(0);
        assert!(iteration() >= b);
    }
}
