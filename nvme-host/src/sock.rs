//! A TCP connection started without waiting (the one OS interface `std::net` lacks): `connect` on a
//! non-blocking socket returns at once, and the queue pair's poll asks whether it has finished. A reactor never
//! waits for a peer that is slow to answer or gone.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Starts connecting to `addr`; the stream is non-blocking and may not be connected yet (see [`connected`]).
pub fn start_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let sa = reactor::net::SockAddr::from(addr);
    // SAFETY: plain system call with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            sa.family(),
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns; the OwnedFd closes it on every error path below.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `sa` holds a valid address of `sa.byte_len()` bytes for its family, alive for the call.
    let r = unsafe { libc::connect(fd.as_raw_fd(), sa.as_ptr(), sa.byte_len()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    let s = TcpStream::from(fd);
    s.set_nodelay(true)?;
    Ok(s)
}

/// Whether the connection started by [`start_connect`] is up: `Ok(false)` while it is still being made, the
/// connection's error once it failed.
pub fn connected(s: &TcpStream) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1, timeout 0: never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Ok(false);
    }
    if let Some(e) = s.take_error()? {
        return Err(e);
    }
    // Writable with no error pending: connected (a refused connect reports its error above).
    s.peer_addr().map(|_| true)
}
