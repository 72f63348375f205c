//! The blobstore's errors: the error type every crate shares ([`errors::Error`]). Kinds used here: `Corrupt`
//! (EILSEQ, SPDK's answer to a super block it cannot use), `NotSupported` (a store using what this code does
//! not implement), `Invalid`, `NoEntry` (no such blob or attribute: ENOENT), `NoSpace`, `Busy`, `Exists`,
//! `NotPermitted` (read-only blob, snapshot with clones: EPERM), `Io` (the device's errno).

pub use errors::{Error, ErrorKind, Result};
