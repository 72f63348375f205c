//! The raid module's errors: the error type every crate shares ([`errors::Error`]), under the name the raid
//! module has always used for it.

pub use errors::{Error, ErrorKind, Result};

/// The shared error type, as the raid module names it.
pub type RaidError = Error;

pub(crate) fn err<T>(kind: ErrorKind, msg: impl Into<String>) -> Result<T> {
    Err(Error::new(kind, msg))
}
