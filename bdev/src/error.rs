//! The bdev layer's error type: a matchable kind, context, and the errno SPDK would return.

use std::fmt;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No bdev of that name (ENODEV).
    NotFound,
    /// A bdev with that name or alias exists (EEXIST).
    Exists,
    /// Bad argument (EINVAL).
    Invalid,
    /// Claimed by another module, or not allowed (EPERM).
    Claimed,
    /// The bdev is being removed (ENODEV).
    Removing,
    /// No I/O descriptor or buffer could be had (ENOMEM).
    NoMemory,
    /// The operation is not supported by the bdev (ENOTSUP).
    NotSupported,
    /// Writing through a read-only descriptor (EBADF).
    ReadOnly,
    /// An OS call failed (its errno).
    Os(i32),
    /// Busy (EBUSY).
    Busy,
}

/// A bdev layer error.
#[derive(Debug, Clone)]
pub struct BdevError {
    /// The kind.
    pub kind: ErrorKind,
    /// Human-readable context, e.g. the bdev name.
    pub msg: String,
}

impl BdevError {
    /// Builds an error.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        BdevError {
            kind,
            msg: msg.into(),
        }
    }

    /// From an OS error, with context.
    pub fn os(e: &std::io::Error, ctx: impl fmt::Display) -> Self {
        BdevError::new(
            ErrorKind::Os(e.raw_os_error().unwrap_or(libc::EIO)),
            format!("{ctx}: {e}"),
        )
    }

    /// The positive errno SPDK returns for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::NotFound | ErrorKind::Removing => libc::ENODEV,
            ErrorKind::Exists => libc::EEXIST,
            ErrorKind::Invalid => libc::EINVAL,
            ErrorKind::Claimed => libc::EPERM,
            ErrorKind::NoMemory => libc::ENOMEM,
            ErrorKind::NotSupported => libc::ENOTSUP,
            ErrorKind::ReadOnly => libc::EBADF,
            ErrorKind::Os(e) => e,
            ErrorKind::Busy => libc::EBUSY,
        }
    }
}

impl fmt::Display for BdevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for BdevError {}

/// Result alias for the bdev layer.
pub type Result<T> = std::result::Result<T, BdevError>;
