//! Polled per-core reactors in SPDK's model.
//!
//! [`run`] starts one pinned reactor per core of a [`CpuMask`]; each runs lightweight threads
//! ([`ThreadHandle`]) that own pollers ([`Poller`]), timers ([`timer`]) and per-thread I/O channels
//! ([`IoDevice`]). Other threads reach a thread only by message ([`ThreadHandle::send`]). A
//! [`ForeignThread`] is a lightweight thread that an OS thread outside the reactors runs itself (a fio job).
//! [`dma`] hands out hugepage-backed buffer memory; [`memmap`] tracks every region that can carry I/O data and
//! tells subscribers (device drivers) about it; [`lock`] and [`pin_current_thread`] are the mutex and CPU
//! affinity helpers every crate of the target shares.

pub mod bound;
pub mod cpumask;
pub mod dma;
pub mod memmap;
pub mod net;
mod reactor;
pub mod stream;
mod sync;
mod sys;
pub mod testing;
pub mod thread;
pub mod ticks;

pub use bound::OnThread;
pub use cpumask::CpuMask;
pub use reactor::{
    add_wake_fd, all_threads, app_thread, cores, main_core, options, reactors_info, remove_wake_fd,
    run, spawn_thread, stop, stopping, Error, ForeignThread, Options, ReactorInfo,
};
pub use sync::lock;
pub use sys::pin_current_thread;
pub use thread::{
    current, current_info, for_each_thread, timer, IoDevice, Poller, PollerInfo, PollerState,
    ThreadHandle, ThreadInfo,
};
