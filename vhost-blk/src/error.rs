//! vhost-blk's errors: the error type every crate shares ([`errors::Error`]).

pub use errors::{Error, ErrorKind, Result};
