//! The one error type the crates share (the bdev layer, raid, vhost-blk, the NVMe-oF target, the blobstore):
//! a kind to match on, a message that says what was being done to what, an optional underlying error, and
//! the errno SPDK answers for it, which the JSON-RPC edge turns into SPDK's error codes.

use std::fmt;

/// What went wrong. Each kind maps to one errno ([`Error::errno`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such bdev, lvstore, subsystem, controller... (ENODEV, as SPDK answers a missing device).
    NotFound,
    /// No such blob, attribute or file (ENOENT).
    NoEntry,
    /// Something of that name or id exists (EEXIST).
    Exists,
    /// A bad argument (EINVAL).
    Invalid,
    /// The bdev is claimed by a module (EPERM).
    Claimed,
    /// What the object's state forbids: a read-only blob changed, a snapshot with several clones deleted
    /// (EPERM).
    NotPermitted,
    /// The bdev is being removed (ENODEV).
    Removing,
    /// Out of memory or of I/O descriptors (ENOMEM).
    NoMemory,
    /// No free cluster, page or slot left (ENOSPC).
    NoSpace,
    /// Not supported here (ENOTSUP).
    NotSupported,
    /// A write through a descriptor opened read-only (EBADF).
    ReadOnly,
    /// In use, or an operation on it is in progress (EBUSY).
    Busy,
    /// Already in the state asked for (EALREADY).
    Already,
    /// Canceled before it finished (ECANCELED).
    Canceled,
    /// Bytes that do not decode: a bad signature, a CRC mismatch, a length that does not fit (EILSEQ, SPDK's
    /// answer to a super block it cannot use).
    Corrupt,
    /// A device I/O that completed with this errno.
    Io(i32),
    /// A system call that failed with this errno.
    Os(i32),
}

impl ErrorKind {
    /// The kind for a positive errno (ENOENT counts as NotFound: a missing device, as the bdev layer says).
    pub fn from_errno(e: i32) -> ErrorKind {
        match e {
            libc::ENODEV | libc::ENOENT => ErrorKind::NotFound,
            libc::EEXIST => ErrorKind::Exists,
            libc::EINVAL => ErrorKind::Invalid,
            libc::EPERM => ErrorKind::NotPermitted,
            libc::EBUSY => ErrorKind::Busy,
            libc::ENOMEM => ErrorKind::NoMemory,
            libc::ENOSPC => ErrorKind::NoSpace,
            libc::EALREADY => ErrorKind::Already,
            libc::ECANCELED => ErrorKind::Canceled,
            e => ErrorKind::Os(e),
        }
    }

    /// The positive errno SPDK returns for this kind.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::NotFound | ErrorKind::Removing => libc::ENODEV,
            ErrorKind::NoEntry => libc::ENOENT,
            ErrorKind::Exists => libc::EEXIST,
            ErrorKind::Invalid => libc::EINVAL,
            ErrorKind::Claimed | ErrorKind::NotPermitted => libc::EPERM,
            ErrorKind::NoMemory => libc::ENOMEM,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::NotSupported => libc::ENOTSUP,
            ErrorKind::ReadOnly => libc::EBADF,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::Already => libc::EALREADY,
            ErrorKind::Canceled => libc::ECANCELED,
            ErrorKind::Corrupt => libc::EILSEQ,
            ErrorKind::Io(e) | ErrorKind::Os(e) => e,
        }
    }
}

/// An error: kind, context, and the error underneath, if any.
#[derive(Debug)]
pub struct Error {
    /// The kind.
    pub kind: ErrorKind,
    /// What was being done, to what, and what is wrong.
    pub msg: String,
    /// The underlying error, if any (shown after the message).
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

    /// From an OS error, keeping its errno (`Os`).
    pub fn os(e: impl std::borrow::Borrow<std::io::Error>, ctx: impl fmt::Display) -> Self {
        let e = e.borrow();
        Error::new(
            ErrorKind::Os(e.raw_os_error().unwrap_or(libc::EIO)),
            format!("{ctx}: {e}"),
        )
    }

    /// From a device I/O's OS error, keeping its errno (`Io`).
    pub fn io(e: std::io::Error, ctx: impl fmt::Display) -> Self {
        Error {
            kind: ErrorKind::Io(e.raw_os_error().unwrap_or(libc::EIO)),
            msg: ctx.to_string(),
            source: Some(Box::new(e)),
        }
    }

    /// From the errno a device I/O completed with.
    pub fn errno_io(errno: i32, ctx: impl fmt::Display) -> Self {
        Error::new(
            ErrorKind::Io(errno),
            format!("{ctx}: {}", std::io::Error::from_raw_os_error(errno)),
        )
    }

    /// Corrupt on-disk or on-wire data.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, msg)
    }

    /// `e` as the cause of a failure of `ctx`, with `e`'s kind (and so its errno).
    pub fn wrap(e: Error, ctx: impl fmt::Display) -> Self {
        Error {
            kind: e.kind,
            msg: ctx.to_string(),
            source: Some(Box::new(e)),
        }
    }

    /// The same error with `ctx` in front of its message.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }

    /// The positive errno SPDK returns for this error.
    pub fn errno(&self) -> i32 {
        self.kind.errno()
    }
}

impl Clone for Error {
    /// The same kind and text; the source is kept as text (it is a trait object, not cloneable).
    fn clone(&self) -> Self {
        Error::new(self.kind, self.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_spdks_errnos_and_context_reads_outside_in() {
        assert_eq!(Error::new(ErrorKind::NotFound, "x").errno(), libc::ENODEV);
        assert_eq!(Error::new(ErrorKind::NoEntry, "x").errno(), libc::ENOENT);
        assert_eq!(ErrorKind::from_errno(libc::EALREADY), ErrorKind::Already);
        assert_eq!(ErrorKind::from_errno(libc::EIO).errno(), libc::EIO);
        let inner = Error::new(ErrorKind::Busy, "bdev m0 is claimed");
        let e = Error::wrap(inner, "adding base m0").context("raid r0");
        assert_eq!(e.errno(), libc::EBUSY);
        assert_eq!(e.to_string(), "raid r0: adding base m0: bdev m0 is claimed");
        let os = Error::os(std::io::Error::from_raw_os_error(libc::EACCES), "open /x");
        assert_eq!(os.errno(), libc::EACCES);
        assert!(os.to_string().starts_with("open /x: "));
    }
}
