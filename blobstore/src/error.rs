//! The blobstore's error type: a small matchable kind, a message saying what was being read or written and
//! what is wrong with it (page index, byte offset, blob id), and the underlying error, if any. The RPC edge
//! maps kinds to SPDK's errno codes with [`Error::errno`].

use std::fmt;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bytes that do not decode: a bad signature, a CRC mismatch, a length that does not fit, a descriptor
    /// that is not laid out as SPDK lays it out, a reference that points outside its region (EILSEQ, SPDK's
    /// answer to a super block it cannot use).
    Corrupt,
    /// A well-formed store that uses something this code does not implement: a super block version above 3,
    /// an unknown `invalid_flags` bit, a metadata page size other than 4 KiB (ENOTSUP).
    Unsupported,
    /// A bad argument: a value that cannot be encoded, a store of the wrong type (EINVAL).
    Invalid,
    /// No such blob or attribute (ENOENT).
    NotFound,
    /// No free cluster or metadata page left (ENOSPC).
    NoSpace,
    /// The blob or store is in use: open, or an operation on it is in progress (EBUSY).
    Busy,
    /// Something of that name or id already exists (EEXIST).
    Exists,
    /// The blob's data or metadata is read-only (EPERM).
    ReadOnly,
    /// An operation that the object's state forbids: deleting a snapshot with several clones (EPERM).
    NotPermitted,
    /// Reading the device failed (its errno).
    Io(i32),
}

/// A blobstore error.
#[derive(Debug)]
pub struct Error {
    /// The kind.
    pub kind: ErrorKind,
    /// What was being done, to what, and what is wrong.
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

    /// From an errno an I/O completed with.
    pub fn errno_io(errno: i32, ctx: impl fmt::Display) -> Self {
        Error::new(
            ErrorKind::Io(errno),
            format!("{ctx}: {}", std::io::Error::from_raw_os_error(errno)),
        )
    }

    /// Corrupt on-disk data.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, msg)
    }

    /// From an OS error, keeping its errno.
    pub fn io(e: std::io::Error, ctx: impl fmt::Display) -> Self {
        Error {
            kind: ErrorKind::Io(e.raw_os_error().unwrap_or(libc::EIO)),
            msg: ctx.to_string(),
            source: Some(Box::new(e)),
        }
    }

    /// The same error with `ctx` in front of its message (e.g. which blob a bad page belongs to).
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }

    /// The positive errno SPDK returns for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Corrupt => libc::EILSEQ,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::Invalid => libc::EINVAL,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::Exists => libc::EEXIST,
            ErrorKind::ReadOnly | ErrorKind::NotPermitted => libc::EPERM,
            ErrorKind::Io(e) => e,
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
