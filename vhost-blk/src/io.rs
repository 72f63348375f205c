//! Submitting a parsed request to the bdev: the one place guest memory is handed to the bdev layer.

use std::rc::Rc;

use bdev::{BdevError, Completion, IoChannel, IoSink, IoType, IoVec};

use crate::request::Op;

/// Submits `op` on `ch`; the completion comes back through `sink` with `ctx`.
///
/// The iovecs were produced by [`crate::request::translate`] and point into guest memory mapped by the
/// controller. That mapping stays in place until the completion: a memory table is only unmapped once no I/O
/// is in flight (see `device::Dev`), and the controller's state lives until every I/O completed.
pub fn submit(
    ch: &IoChannel,
    sink: &Rc<dyn IoSink>,
    op: Op,
    offset_blocks: u64,
    num_blocks: u64,
    iovs: &[IoVec],
    ctx: u64,
) -> Result<(), BdevError> {
    let cb = Completion::Sink(sink.clone());
    match op {
        // SAFETY: the iovecs cover guest memory that stays mapped until the callback (see above). The guest
        // may touch its own buffers meanwhile, as it may with any device; no Rust reference to them exists.
        Op::Read => unsafe { ch.readv(iovs, offset_blocks, num_blocks, cb, ctx) },
        // SAFETY: as for reads; the bdev only reads these buffers.
        Op::Write => unsafe { ch.writev(iovs, offset_blocks, num_blocks, cb, ctx) },
        Op::Flush => ch.submit_nodata(IoType::Flush, offset_blocks, num_blocks, cb, ctx),
        Op::Unmap => ch.submit_nodata(IoType::Unmap, offset_blocks, num_blocks, cb, ctx),
        Op::WriteZeroes => {
            ch.submit_nodata(IoType::WriteZeroes, offset_blocks, num_blocks, cb, ctx)
        }
    }
}
