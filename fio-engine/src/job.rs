//! One fio job thread's I/O: its own lightweight thread (polled by fio's thread itself in `getevents`), a
//! descriptor and channel per file, and the completions waiting to be reaped. Nothing here allocates or
//! locks per I/O: submissions go straight to the bdev channel over fio's buffer (zero copy), and completions
//! land in a queue sized for the job's depth.

use std::cell::RefCell;
use std::time::Instant;

use bdev::{Completion, Desc, ErrorKind, IoChannel, IoHandle, IoStatus, IoType, IoVec};
use reactor::ForeignThread;

use crate::abi::{self, IoU, Td};

thread_local! {
    /// Units whose I/O completed and that `getevents` has not reaped yet (this OS thread's job).
    static DONE: RefCell<Vec<IoU>> = const { RefCell::new(Vec::new()) };
}

/// A file of the job: a bdev opened on the job's thread.
struct Target {
    name: String,
    // Dropped in field order: the channel before its descriptor.
    ch: IoChannel,
    _desc: Desc,
    block_size: u64,
    num_blocks: u64,
}

/// The engine's state for one job (`td->io_ops_data`).
pub struct Job {
    targets: Vec<Target>,
    /// Units handed out by the last `getevents`, for `event`.
    reaped: Vec<IoU>,
    thread: ForeignThread,
}

impl Job {
    /// Opens the job's files (bdev names) on a new lightweight thread of the calling OS thread.
    pub fn new(td: Td) -> Result<Job, String> {
        let thread = ForeignThread::new(&format!("fio_{}", td.name()))
            .map_err(|e| format!("cannot make a thread for job {}: {e}", td.name()))?;
        let write = td.ddir() & (abi::TD_DDIR_WRITE | abi::TD_DDIR_TRIM) != 0;
        let mut targets = Vec::new();
        for (i, f) in td.files().into_iter().enumerate() {
            let name = f.name();
            let desc = bdev::open(&name, write, None)
                .map_err(|e| format!("Unable to open bdev {name}: {e}"))?;
            let b = desc.bdev().clone();
            targets.push(Target {
                name,
                ch: desc.channel(),
                _desc: desc,
                block_size: b.block_size() as u64,
                num_blocks: b.num_blocks(),
            });
            // 1-based: 0 is "not ours".
            f.set_engine_data(i + 1);
        }
        let depth = td.iodepth().max(1) as usize;
        DONE.with(|d| {
            let mut d = d.borrow_mut();
            d.clear();
            d.reserve(depth * 2);
        });
        Ok(Job {
            targets,
            reaped: Vec::with_capacity(depth * 2),
            thread,
        })
    }

    /// Submits `u`; returns an `FIO_Q_*` status.
    pub fn queue(&self, u: IoU) -> i32 {
        let Some(t) = u
            .file()
            .and_then(|f| f.engine_data().checked_sub(1))
            .and_then(|i| self.targets.get(i))
        else {
            u.set_result(libc::EINVAL as u32, u.buf().1);
            return abi::FIO_Q_COMPLETED;
        };
        let (buf, len) = u.buf();
        let off = u.offset();
        // Block sizes are powers of two but for metadata formats (520, 4160...): shift where one can.
        let whole = if t.block_size.is_power_of_two() {
            (off | len) & (t.block_size - 1) == 0
        } else {
            off.is_multiple_of(t.block_size) && len.is_multiple_of(t.block_size)
        };
        if !whole {
            log::error!(
                "{}: I/O at {off} of {len} bytes is not in whole {}-byte blocks",
                t.name,
                t.block_size
            );
            u.set_result(libc::EINVAL as u32, len);
            return abi::FIO_Q_COMPLETED;
        }
        let (ob, nb) = if t.block_size.is_power_of_two() {
            let shift = t.block_size.trailing_zeros();
            (off >> shift, len >> shift)
        } else {
            (off / t.block_size, len / t.block_size)
        };
        let cb = Completion::Fn(done);
        let iov = [IoVec {
            base: buf,
            len: len as usize,
        }];
        let res = match u.ddir() {
            // SAFETY: fio keeps the unit's buffer to itself until `event` hands the unit back, which happens
            // only after `done` ran for it.
            abi::DDIR_READ => unsafe { t.ch.readv(&iov, ob, nb, cb, u.addr()) },
            // SAFETY: as for reads; fio does not touch the buffer while the write is queued.
            abi::DDIR_WRITE => unsafe { t.ch.writev(&iov, ob, nb, cb, u.addr()) },
            abi::DDIR_TRIM => t.ch.submit_nodata(IoType::Unmap, ob, nb, cb, u.addr()),
            // A sync covers the whole device, as fsync covers a whole file.
            abi::DDIR_SYNC | abi::DDIR_DATASYNC => {
                t.ch.submit_nodata(IoType::Flush, 0, t.num_blocks, cb, u.addr())
            }
            d => Err(bdev::BdevError::new(
                ErrorKind::NotSupported,
                format!("fio data direction {d}"),
            )),
        };
        match res {
            Ok(()) => abi::FIO_Q_QUEUED,
            // Out of descriptors: fio reaps completions and queues the unit again.
            Err(e) if e.kind == ErrorKind::NoMemory => abi::FIO_Q_BUSY,
            Err(e) => {
                log::error!("{}: {e}", t.name);
                u.set_result(e.errno().unsigned_abs(), len);
                abi::FIO_Q_COMPLETED
            }
        }
    }

    /// Polls the job's thread until at least `min` units completed or `deadline` passed, and hands out every
    /// completed unit. fio's `max` (`iodepth_batch_complete_max`, 1 unless set) is not a cap: fio takes any
    /// count, and SPDK's engine hands out everything too, which saves a call per I/O at depth.
    pub fn getevents(&mut self, min: usize, deadline: Option<Instant>) -> usize {
        loop {
            self.thread.poll();
            if DONE.with(|d| d.borrow().len()) >= min {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        self.reaped.clear();
        // Both vectors keep their capacity (twice the depth): swapping hands the batch out without copying.
        DONE.with(|d| std::mem::swap(&mut *d.borrow_mut(), &mut self.reaped));
        self.reaped.len()
    }

    /// The `i`-th unit of the last `getevents`.
    pub fn event(&self, i: usize) -> Option<IoU> {
        self.reaped.get(i).copied()
    }

    /// Closes the channels and descriptors on the job's thread, then the thread.
    pub fn close(self) {
        let Job {
            targets, thread, ..
        } = self;
        drop(targets);
        // Let the closes' messages (descriptor release on the app thread, say) go out before the thread goes.
        thread.poll();
        DONE.with(|d| d.borrow_mut().clear());
    }
}

/// A bdev I/O of a unit finished: record its result and queue the unit for `getevents`.
fn done(io: IoHandle) {
    // SAFETY: the context is the address of the unit `queue` submitted, which fio holds for us until reaped.
    let u = unsafe { IoU::from_addr(io.ctx) };
    let len = u.buf().1;
    match io.status() {
        IoStatus::Success => u.set_result(0, 0),
        IoStatus::Failed(e) if e != 0 => u.set_result(e.unsigned_abs(), len),
        _ => u.set_result(libc::EIO as u32, len),
    }
    drop(io);
    DONE.with(|d| d.borrow_mut().push(u));
}
