//! A TCP connection started without waiting (the one OS interface `std::net` lacks): `connect` on a
//! non-blocking socket returns at once, and the queue pair's poll asks whether it has finished. A reactor never
//! waits for a peer that is slow to answer or gone.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Starts connecting to `addr`; the stream is non-blocking and may not be connected yet (see [`connected`]).
/// `user_timeout_ms` (`TCP_USER_TIMEOUT`, 0: the kernel's default): data left unacknowledged that long closes
/// the connection, as SPDK's `transport_ack_timeout` asks of its TCP sockets.
pub fn start_connect(addr: SocketAddr, user_timeout_ms: u32) -> io::Result<TcpStream> {
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
    if user_timeout_ms > 0 {
        let v = user_timeout_ms as libc::c_uint;
        // SAFETY: `v` is a valid c_uint for the duration of the call, its size passed; the result is checked.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_USER_TIMEOUT,
                (&v as *const libc::c_uint).cast(),
                std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn user_timeout(s: &TcpStream) -> u32 {
        let mut v: libc::c_uint = 0;
        let mut len = std::mem::size_of::<libc::c_uint>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid out pointers of the sizes given, alive for the call.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_USER_TIMEOUT,
                (&mut v as *mut libc::c_uint).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        v
    }

    #[test]
    fn user_timeout_is_set_when_asked() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        assert_eq!(user_timeout(&start_connect(a, 4096).unwrap()), 4096);
        assert_eq!(user_timeout(&start_connect(a, 0).unwrap()), 0);
    }
}
