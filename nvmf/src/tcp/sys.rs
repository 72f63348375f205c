//! The one OS interface the TCP transport needs beyond `std::net`: an epoll set per poll group, so a poll
//! costs one system call however many connections are idle (SPDK's posix sock group does the same).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// An epoll instance (level-triggered, read interest).
pub struct Epoll {
    fd: OwnedFd,
}

/// Events fetched per `wait`.
pub const MAX_EVENTS: usize = 64;

impl Epoll {
    /// A new epoll set.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain system call with a flag argument; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd })
    }

    /// Watches `fd` for input (and hang-up), reporting `key`.
    pub fn add(&self, fd: RawFd, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: key,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call; both descriptors are open.
        let r = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) {
        // SAFETY: a null event pointer is allowed for EPOLL_CTL_DEL; failure (fd already closed) is harmless.
        unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Collects ready keys without waiting; returns how many were written to `out`.
    pub fn poll(&self, out: &mut [u64; MAX_EVENTS]) -> usize {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
        // SAFETY: `evs` has room for MAX_EVENTS entries, the count passed; timeout 0 never blocks.
        let n = unsafe {
            libc::epoll_wait(self.fd.as_raw_fd(), evs.as_mut_ptr(), MAX_EVENTS as i32, 0)
        };
        let n = n.max(0) as usize;
        for (o, e) in out.iter_mut().zip(&evs[..n]) {
            *o = e.u64;
        }
        n
    }
}
