//! The block device layer: registry, descriptors, claims, examine, per-thread channels, pooled I/O descriptors
//! and statistics, plus the base modules (malloc, null, uring/aio, error).

mod bdev;
mod channel;
mod error;
pub mod histogram;
mod io;
pub mod module;
pub mod modules;
mod range_lock;
pub mod rpc;
mod stat;

pub use crate::bdev::{
    examines_pending, get, list, open, register, register_examiner, unregister_by_name, Bdev,
    BdevEvent, BdevOps, BdevParams, Desc, DifCheck, EventCb, ExamineGuard, Examiner, HistogramCfg,
    ModuleChannel,
};
pub use channel::IoChannel;
pub use error::{BdevError, ErrorKind, Result};
pub use io::{
    alloc_io, pool_limit, prefill_pool, queue_io_wait, set_pool_limit, sub_iovs, BdevIo,
    Completion, IoHandle, IoId, IoSink, IoStatus, IoType, IoVec, NvmeCmd, NvmeStatus, RawCopy,
};
pub use module::{register_module, BdevModule};
pub use stat::{IoStat, OpStat, ResetMode};
