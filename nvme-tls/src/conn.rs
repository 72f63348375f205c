//! A queue pair's byte stream: the TCP socket itself, or TLS over it. The NVMe/TCP code of both roles reads and
//! writes through this, so the plain path stays the system calls it was.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;

use crate::TlsStream;

/// The socket, with or without TLS.
pub enum Conn {
    /// NVMe/TCP in the clear.
    Plain(TcpStream),
    /// NVMe/TCP over TLS 1.3.
    Tls(Box<TlsStream>),
}

impl Conn {
    /// The socket underneath.
    pub fn sock(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => t.sock(),
        }
    }

    /// Reads what arrived (decrypted); `WouldBlock` when nothing did.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => (&*s).read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }

    /// Writes (for TLS: seals and starts sending) what the socket takes now.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => (&*s).write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }

    /// Writes several buffers in one go, as `writev`.
    pub fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => (&*s).write_vectored(bufs),
            Conn::Tls(t) => t.write_vectored(bufs),
        }
    }

    /// Sends what TLS sealed but the socket did not take yet (nothing to do in the clear).
    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(_) => Ok(()),
            Conn::Tls(t) => t.flush(),
        }
    }

    /// Whether TLS holds sealed bytes the socket did not take yet.
    pub fn pending(&self) -> bool {
        matches!(self, Conn::Tls(t) if t.pending())
    }

    /// Whether bytes wait to be sent ([`Conn::flush`]) or to be read without the socket saying so (decrypted
    /// or buffered records): a poller that waits for socket readiness must not wait while this holds.
    pub fn busy(&self) -> bool {
        match self {
            Conn::Plain(_) => false,
            Conn::Tls(t) => t.pending() || t.buffered(),
        }
    }

    /// Moves a TLS handshake on (see [`TlsStream::handshake`]); in the clear there is none: `Ok(true)`.
    pub fn handshake(&mut self) -> io::Result<bool> {
        match self {
            Conn::Plain(_) => Ok(true),
            Conn::Tls(t) => t.handshake(),
        }
    }

    /// The PSK identity TLS used, if any.
    pub fn tls_identity(&self) -> Option<&[u8]> {
        match self {
            Conn::Plain(_) => None,
            Conn::Tls(t) => Some(t.identity()),
        }
    }

    /// Closes: TLS says close_notify first; both shut the socket down.
    pub fn shutdown(&mut self) {
        match self {
            Conn::Plain(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            Conn::Tls(t) => t.close(),
        }
    }
}
