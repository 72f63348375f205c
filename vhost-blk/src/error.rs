//! The crate's error type: a matchable kind plus context; the RPC edge maps kinds to SPDK's errno.

use std::fmt;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad parameter (EINVAL).
    Invalid,
    /// No such controller or bdev (ENODEV).
    NotFound,
    /// A controller of that name exists (EEXIST).
    Exists,
    /// A front end is connected (EBUSY).
    Busy,
    /// The bdev is claimed by someone else (EPERM).
    Claimed,
    /// An OS call failed with this errno.
    Os(i32),
}

/// A vhost-blk error.
#[derive(Debug, Clone)]
pub struct Error {
    /// The kind.
    pub kind: ErrorKind,
    /// Context for the log.
    pub msg: String,
}

impl Error {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
        }
    }

    /// From an OS error, with context.
    pub fn os(e: &std::io::Error, ctx: impl fmt::Display) -> Self {
        Error::new(
            ErrorKind::Os(e.raw_os_error().unwrap_or(libc::EIO)),
            format!("{ctx}: {e}"),
        )
    }

    /// The positive errno SPDK answers with.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Invalid => libc::EINVAL,
            ErrorKind::NotFound => libc::ENODEV,
            ErrorKind::Exists => libc::EEXIST,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::Claimed => libc::EPERM,
            ErrorKind::Os(e) => e,
        }
    }
}

impl From<bdev::BdevError> for Error {
    fn from(e: bdev::BdevError) -> Self {
        let kind = match e.kind {
            bdev::ErrorKind::NotFound | bdev::ErrorKind::Removing => ErrorKind::NotFound,
            bdev::ErrorKind::Claimed => ErrorKind::Claimed,
            bdev::ErrorKind::Invalid => ErrorKind::Invalid,
            _ => ErrorKind::Os(e.errno()),
        };
        Error::new(kind, e.msg)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
