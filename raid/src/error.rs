//! The raid module's error type: a matchable kind, a message with context (raid and base bdev names), and the
//! bdev-layer error that caused it, if any. The RPC edge maps kinds to SPDK's errno codes.

use std::fmt;

use bdev::BdevError;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such raid or base bdev (ENODEV).
    NotFound,
    /// A raid, bdev or superblock of that identity exists already (EEXIST).
    Exists,
    /// Bad argument or incompatible base bdev (EINVAL).
    Invalid,
    /// Not allowed now, e.g. a background process runs, or the bdev is claimed (EPERM).
    NotPermitted,
    /// A newer superblock was found for an array that is not configuring (EBUSY).
    Busy,
    /// Out of memory or I/O descriptors (ENOMEM).
    NoMemory,
    /// I/O to a base bdev failed (EIO).
    Io,
    /// The operation was already started (EALREADY).
    Already,
    /// A background process was stopped before it finished (ECANCELED).
    Canceled,
    /// Any other errno.
    Os(i32),
}

/// A raid module error.
#[derive(Debug, Clone)]
pub struct RaidError {
    /// The kind.
    pub kind: ErrorKind,
    /// Human-readable context.
    pub msg: String,
    /// The bdev-layer error behind it.
    pub source: Option<BdevError>,
}

impl RaidError {
    /// Builds an error.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        RaidError {
            kind,
            msg: msg.into(),
            source: None,
        }
    }

    /// Wraps a bdev-layer error, keeping its errno.
    pub fn bdev(e: BdevError, ctx: impl fmt::Display) -> Self {
        RaidError {
            kind: ErrorKind::from_errno(e.errno()),
            msg: format!("{ctx}: {}", e.msg),
            source: Some(e),
        }
    }

    /// The positive errno SPDK returns for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::NotFound => libc::ENODEV,
            ErrorKind::Exists => libc::EEXIST,
            ErrorKind::Invalid => libc::EINVAL,
            ErrorKind::NotPermitted => libc::EPERM,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::NoMemory => libc::ENOMEM,
            ErrorKind::Io => libc::EIO,
            ErrorKind::Already => libc::EALREADY,
            ErrorKind::Canceled => libc::ECANCELED,
            ErrorKind::Os(e) => e,
        }
    }
}

impl ErrorKind {
    /// The kind for a positive errno.
    pub fn from_errno(e: i32) -> ErrorKind {
        match e {
            libc::ENODEV | libc::ENOENT => ErrorKind::NotFound,
            libc::EEXIST => ErrorKind::Exists,
            libc::EINVAL => ErrorKind::Invalid,
            libc::EPERM => ErrorKind::NotPermitted,
            libc::EBUSY => ErrorKind::Busy,
            libc::ENOMEM => ErrorKind::NoMemory,
            libc::EIO => ErrorKind::Io,
            libc::EALREADY => ErrorKind::Already,
            libc::ECANCELED => ErrorKind::Canceled,
            e => ErrorKind::Os(e),
        }
    }
}

impl fmt::Display for RaidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for RaidError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Result alias for the raid module.
pub type Result<T> = std::result::Result<T, RaidError>;

pub(crate) fn err<T>(kind: ErrorKind, msg: impl Into<String>) -> Result<T> {
    Err(RaidError::new(kind, msg))
}
