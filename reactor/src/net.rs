//! A socket address in the C layout, for the few OS calls `std::net` does not make (a non-blocking connect,
//! rdma_cm's address resolution): built here once, so the pointer casts live in one place.

use std::net::SocketAddr;

/// A `SocketAddr` as a `sockaddr_storage` holding a `sockaddr_in` or `sockaddr_in6`, and its length.
pub struct SockAddr {
    ss: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl From<SocketAddr> for SockAddr {
    fn from(a: SocketAddr) -> SockAddr {
        // SAFETY: sockaddr_storage is plain data; all zero is a valid (AF_UNSPEC) value.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        SockAddr {
            ss,
            len: len as libc::socklen_t,
        }
    }
}

impl SockAddr {
    /// The address family (`AF_INET`, `AF_INET6`).
    pub fn family(&self) -> libc::c_int {
        self.ss.ss_family as libc::c_int
    }
    /// For calls that read the address.
    pub fn as_ptr(&self) -> *const libc::sockaddr {
        &self.ss as *const _ as *const libc::sockaddr
    }
    /// For calls that take a mutable pointer (and read it).
    pub fn as_mut_ptr(&mut self) -> *mut libc::sockaddr {
        &mut self.ss as *mut _ as *mut libc::sockaddr
    }
    /// Its length in bytes.
    pub fn byte_len(&self) -> libc::socklen_t {
        self.len
    }
}
