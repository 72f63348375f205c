//! Base bdev modules.

pub mod error;
pub mod malloc;
pub mod null;
pub mod passthru;
pub mod uring;
