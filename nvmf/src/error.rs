//! The target's error type: a matchable kind, the context (what was being done, to what), and the source error;
//! the RPC edge maps kinds to SPDK's errno codes.

use std::fmt;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such subsystem, namespace, listener, host, transport or bdev (ENODEV / ENOENT at the edge).
    NotFound,
    /// It exists already (EEXIST).
    Exists,
    /// A bad argument (EINVAL).
    Invalid,
    /// A limit was reached (ENOSPC).
    NoSpace,
    /// Busy, try later (EBUSY).
    Busy,
    /// The bdev layer refused (its errno).
    Bdev(i32),
    /// An OS call failed (its errno).
    Os(i32),
}

/// A target error.
#[derive(Debug)]
pub struct Error {
    /// The kind.
    pub kind: ErrorKind,
    /// What was being done, to what.
    pub msg: String,
    /// The underlying error, if any.
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// An error with no underlying cause.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            source: None,
        }
    }

    /// From an OS error.
    pub fn os(e: std::io::Error, ctx: impl fmt::Display) -> Self {
        Error {
            kind: ErrorKind::Os(e.raw_os_error().unwrap_or(libc::EIO)),
            msg: ctx.to_string(),
            source: Some(Box::new(e)),
        }
    }

    /// From a bdev layer error.
    pub fn bdev(e: bdev::BdevError, ctx: impl fmt::Display) -> Self {
        Error {
            kind: ErrorKind::Bdev(e.errno()),
            msg: ctx.to_string(),
            source: Some(Box::new(e)),
        }
    }

    /// The positive errno SPDK returns for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::NotFound => libc::ENODEV,
            ErrorKind::Exists => libc::EEXIST,
            ErrorKind::Invalid => libc::EINVAL,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::Bdev(e) | ErrorKind::Os(e) => e,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
