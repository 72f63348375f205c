//! The bdev layer's errors: the error type every crate shares ([`errors::Error`]), under the name the bdev
//! layer has always used for it.

pub use errors::{Error, ErrorKind, Result};

/// The shared error type, as the bdev layer names it.
pub type BdevError = Error;
