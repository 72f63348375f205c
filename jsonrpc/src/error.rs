//! JSON-RPC error objects and SPDK's error codes.

use std::fmt;

/// Invalid JSON was received (`SPDK_JSONRPC_ERROR_PARSE_ERROR`).
pub const PARSE_ERROR: i32 = -32700;
/// The JSON sent is not a valid request object (`SPDK_JSONRPC_ERROR_INVALID_REQUEST`).
pub const INVALID_REQUEST: i32 = -32600;
/// The method does not exist or is not allowed (`SPDK_JSONRPC_ERROR_METHOD_NOT_FOUND`).
pub const METHOD_NOT_FOUND: i32 = -32601;
/// Invalid method parameters (`SPDK_JSONRPC_ERROR_INVALID_PARAMS`).
pub const INVALID_PARAMS: i32 = -32602;
/// Internal JSON-RPC error (`SPDK_JSONRPC_ERROR_INTERNAL_ERROR`).
pub const INTERNAL_ERROR: i32 = -32603;
/// The method is not allowed in the current RPC state (`SPDK_JSONRPC_ERROR_INVALID_STATE`).
pub const INVALID_STATE: i32 = -1;

/// Message of the error sent for a [`crate::Responder`] dropped unanswered.
pub const NO_RESPONSE_MESSAGE: &str = "Internal error: no response";

/// The `error` member of a JSON-RPC response: `{"code": .., "message": ..}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// Error code: one of the constants of this crate, or a negative errno.
    pub code: i32,
    /// Human-readable message, sent verbatim.
    pub message: String,
}

impl RpcError {
    /// An error with any code and message.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// `-32700 "Parse error"`.
    pub fn parse_error() -> Self {
        Self::new(PARSE_ERROR, "Parse error")
    }

    /// `-32600 "Invalid request"`.
    pub fn invalid_request() -> Self {
        Self::new(INVALID_REQUEST, "Invalid request")
    }

    /// `-32601 "Method not found"`.
    pub fn method_not_found() -> Self {
        Self::new(METHOD_NOT_FOUND, "Method not found")
    }

    /// `-32602` with the given message (SPDK's generic one is `"Invalid parameters"`).
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }

    /// `-32603` with the given message (SPDK's generic one is `"Internal error"`).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(INTERNAL_ERROR, message)
    }

    /// `-1` (invalid state) with the given message.
    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(INVALID_STATE, message)
    }

    /// An errno-based error as SPDK sends them: `code = -errno`.
    ///
    /// `errno` is positive (e.g. `libc::EEXIST`); a negative value is
    /// accepted too and means the same.
    pub fn from_errno(errno: i32, message: impl Into<String>) -> Self {
        Self::new(-errno.abs(), message)
    }

    /// Like [`from_errno`](Self::from_errno) with the message SPDK's
    /// `spdk_strerror()` gives, e.g. `"File exists"` for `EEXIST`.
    pub fn errno(errno: i32) -> Self {
        Self::from_errno(errno, strerror(errno.abs()))
    }
}

/// The C library's description of `errno` (without Rust's `" (os error N)"` suffix).
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl std::error::Error for RpcError {}

impl From<errors::Error> for RpcError {
    /// The edge where the crates' errors meet SPDK's answers: `-errno` and `strerror(errno)`, as SPDK
    /// answers; the detailed message goes to the log.
    fn from(e: errors::Error) -> Self {
        log::error!("{e}");
        RpcError::errno(e.errno())
    }
}

impl From<std::io::Error> for RpcError {
    /// OS errors become errno-based errors; others become internal errors.
    fn from(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(errno) => RpcError::errno(errno),
            None => RpcError::internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_codes() {
        let e = RpcError::from_errno(libc::EEXIST, "exists");
        assert_eq!(e.code, -17);
        assert_eq!(RpcError::from_errno(-libc::ENOENT, "x").code, -2);
        assert_eq!(RpcError::errno(libc::EEXIST).message, "File exists");
        assert_eq!(RpcError::errno(libc::ENODEV).code, -libc::ENODEV);
        let io = std::io::Error::from_raw_os_error(libc::EBUSY);
        assert_eq!(RpcError::from(io).code, -libc::EBUSY);
    }
}
