//! The NVMe-oF target's errors: the error type every crate shares ([`errors::Error`]).

pub use errors::{Error, ErrorKind, Result};
