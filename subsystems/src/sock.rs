//! `sock` subsystem: `sock_set_default_impl` and `sock_impl_set_options` (lib/sock/sock_rpc.c).

use serde::{Deserialize, Serialize};

use crate::params::Params;

/// Sock implementations: `posix` and `ssl` are always built, `uring` only `--with-uring`. Any other name is
/// refused with `-32602 "Invalid parameters"`.
pub const SOCK_IMPLS: &[&str] = &["posix", "ssl", "uring"];

/// `DEFAULT_SO_RCVBUF_SIZE` / `DEFAULT_SO_SNDBUF_SIZE` of `posix` and `uring`: 2 MiB.
pub const DEFAULT_BUF_SIZE: u32 = 2 * 1024 * 1024;
/// `MIN_SO_RCVBUF_SIZE` / `MIN_SO_SNDBUF_SIZE`, the defaults of `ssl`: 4 KiB.
pub const SSL_BUF_SIZE: u32 = 4096;

/// `sock_set_default_impl` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct SockSetDefaultImpl {
    /// Implementation used when a caller names none; one of [`SOCK_IMPLS`].
    pub impl_name: String,
}

impl Params for SockSetDefaultImpl {}

impl Default for SockSetDefaultImpl {
    /// `posix`.
    fn default() -> Self {
        SockSetDefaultImpl {
            impl_name: "posix".into(),
        }
    }
}

/// `sock_impl_set_options` parameters, and one implementation's options (`struct spdk_sock_impl_opts`) as SPDK
/// saves them, per implementation.
///
/// A call changes the members it gives over the implementation's current options. The defaults differ per
/// implementation: see [`SockImplOptions::new`] (the serde defaults only stand for "not given").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct SockImplOptions {
    /// Implementation the options are for; one of [`SOCK_IMPLS`].
    pub impl_name: String,
    /// Socket receive buffer size (`SO_RCVBUF`).
    #[serde(default)]
    pub recv_buf_size: u32,
    /// Socket send buffer size (`SO_SNDBUF`).
    #[serde(default)]
    pub send_buf_size: u32,
    /// Receive through a pipe buffer.
    #[serde(default)]
    pub enable_recv_pipe: bool,
    /// `TCP_QUICKACK`.
    #[serde(default)]
    pub enable_quickack: bool,
    /// Placement id mode for poll groups (0: off, 1: NAPI id, 2: CPU).
    #[serde(default)]
    pub enable_placement_id: u32,
    /// Zero-copy send on server sockets.
    #[serde(default)]
    pub enable_zerocopy_send_server: bool,
    /// Zero-copy send on client sockets.
    #[serde(default)]
    pub enable_zerocopy_send_client: bool,
    /// Minimum request size for zero-copy send (0: any).
    #[serde(default)]
    pub zerocopy_threshold: u32,
    /// TLS version for `ssl` (0: any of 1.2 and 1.3).
    #[serde(default)]
    pub tls_version: u32,
    /// Kernel TLS for `ssl`.
    #[serde(default)]
    pub enable_ktls: bool,
}

impl Params for SockImplOptions {}

impl SockImplOptions {
    /// SPDK's defaults for `impl_name`: 2 MiB buffers for `posix` and `uring`, 4 KiB for `ssl`; zero-copy send
    /// on the server side for `posix` and `ssl`, not `uring`; receive pipe on.
    pub fn new(impl_name: &str) -> Self {
        let buf = if impl_name == "ssl" {
            SSL_BUF_SIZE
        } else {
            DEFAULT_BUF_SIZE
        };
        SockImplOptions {
            impl_name: impl_name.into(),
            recv_buf_size: buf,
            send_buf_size: buf,
            enable_recv_pipe: true,
            enable_quickack: false,
            enable_placement_id: 0,
            enable_zerocopy_send_server: impl_name != "uring",
            enable_zerocopy_send_client: false,
            zerocopy_threshold: 0,
            tls_version: 0,
            enable_ktls: false,
        }
    }
}

/// `-32602 "Invalid parameters"` for a name not in [`SOCK_IMPLS`], logged as SPDK does.
pub fn unknown_impl(method: &str, name: &str) -> jsonrpc::RpcError {
    log::error!("{method}: unknown sock implementation {name}");
    jsonrpc::RpcError::invalid_params("Invalid parameters")
}
