//! The reactor's OS calls (eventfd, epoll, affinity), kept together so every `unsafe` is in one place.

use std::io;
use std::os::fd::RawFd;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(crate) fn eventfd() -> io::Result<RawFd> {
    // SAFETY: eventfd takes no pointers; the result is checked.
    check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })
}

pub(crate) fn eventfd_write(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local; a full counter (EAGAIN) still leaves the fd readable, which is all
    // a wake-up needs, so the result is ignored.
    unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

fn eventfd_drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live local; EAGAIN (nothing pending) is fine.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

pub(crate) fn epoll_create() -> io::Result<RawFd> {
    // SAFETY: no pointers; result checked.
    check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })
}

pub(crate) fn epoll_add(ep: RawFd, fd: RawFd) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call.
    check(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(|_| ())
}

pub(crate) fn epoll_del(ep: RawFd, fd: RawFd) {
    // SAFETY: a null event is allowed for EPOLL_CTL_DEL since Linux 2.6.9.
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
}

/// Waits up to `us` microseconds for any fd of the set; drains the reactor's own wake eventfd.
pub(crate) fn epoll_wait_us(ep: RawFd, us: u64, wake_fd: RawFd) {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
    let ms = us.div_ceil(1000).min(i32::MAX as u64) as i32;
    // SAFETY: `evs` is a live array of 8 events and we pass its length.
    let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), evs.len() as i32, ms) };
    for ev in evs.iter().take(n.max(0) as usize) {
        if ev.u64 == wake_fd as u64 {
            eventfd_drain(wake_fd);
        }
    }
}

pub(crate) fn close(fd: RawFd) {
    // SAFETY: closes an fd this crate owns, once (called from Drop).
    unsafe { libc::close(fd) };
}

pub(crate) fn online_cpus() -> Vec<u32> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: passes the size of the live set we own.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return vec![0];
    }
    // SAFETY: CPU_ISSET only reads the set, for indexes below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .map(|c| c as u32)
        .collect()
}

/// Restricts the calling OS thread to CPU `core`, or, with `None`, lets it run on every CPU again.
///
/// Reactors pin themselves to their core; a thread started from a pinned thread inherits its affinity, so
/// control threads and benchmark drivers unpin (`None`) before they start work that must not compete with a
/// reactor. Fails with `EINVAL` for a core beyond `CPU_SETSIZE` (or one the kernel refuses, e.g. offline).
pub fn pin_current_thread(core: Option<u32>) -> io::Result<()> {
    let setsize = libc::CPU_SETSIZE as usize;
    if core.is_some_and(|c| c as usize >= setsize) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    match core {
        // SAFETY: CPU_SET writes inside the set: core < CPU_SETSIZE was checked above.
        Some(c) => unsafe { libc::CPU_SET(c as usize, &mut set) },
        None => {
            for c in 0..setsize {
                // SAFETY: as above, c < CPU_SETSIZE.
                unsafe { libc::CPU_SET(c, &mut set) };
            }
        }
    }
    // SAFETY: passes the size of the live set we own; 0 = the calling thread.
    check(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) })
        .map(|_| ())
}

/// Pins the calling reactor thread to its core.
pub(crate) fn pin_to_core(core: u32) -> io::Result<()> {
    pin_current_thread(Some(core))
}

pub(crate) fn gettid() -> u64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() as u64 }
}

/// The CPU the calling thread runs on now (0 if the kernel cannot say).
pub(crate) fn current_cpu() -> u32 {
    // SAFETY: sched_getcpu takes no arguments and only returns a number.
    let c = unsafe { libc::sched_getcpu() };
    c.max(0) as u32
}
