//! LBA range locks (SPDK's `bdev_lock_lba_range`, and `spdk_bdev_quiesce_range`): while a range is locked,
//! writes (and compares) from every channel of the bdev that overlap it wait, except the lock holder's own; a
//! quiescing lock holds reads too. Compare-and-write uses one so that no other write lands between its compare
//! and its write.
//!
//! Taking a lock, as SPDK takes one: the range goes on every channel at once (new overlapping I/O waits from
//! then on), then the lock waits until no I/O it must wait for is left with the module on any channel, looking
//! only at I/O that overlaps the range (each channel keeps a table of what its module has). I/O elsewhere on
//! the bdev flows on meanwhile, and an I/O elsewhere that cannot finish (a member being removed, a path being
//! restored) does not hold the lock up. Locks are taken one at a time per bdev, and a lock that overlaps a held
//! one waits for it. The I/O path pays one flag test while no lock exists.

use crate::bdev::Bdev;
use crate::channel::LockedRange;
use std::collections::VecDeque;

/// How long a lock being taken waits between looks at the channels' in-flight I/O.
const DRAIN_POLL_US: u64 = 5;

/// A lock asked for and not yet taken.
struct Pending {
    offset: u64,
    len: u64,
    quiesce: bool,
    done: Box<dyn FnOnce(u64) + Send>,
}

/// A bdev's range locks.
#[derive(Default)]
pub(crate) struct RangeLocks {
    /// Held ranges, and the one being taken (installed on the channels, waiting for them to drain).
    held: Vec<LockedRange>,
    pending: VecDeque<Pending>,
    taking: bool,
    next_id: u64,
}

impl RangeLocks {
    /// What a channel created now must start with: the held ranges and the one being taken.
    pub(crate) fn snapshot(&self) -> Vec<LockedRange> {
        self.held.clone()
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl Bdev {
    /// Locks `len` blocks at `offset` against other writers; `done` gets the lock's id, on the calling thread,
    /// once no write from before the call is in flight on the range and none can start (SPDK's
    /// `bdev_lock_lba_range`). I/O flagged as the holder's goes through (see [`crate::IoChannel::compare_and_writev`]).
    pub fn lock_lba_range(&self, offset: u64, len: u64, done: impl FnOnce(u64) + Send + 'static) {
        self.request_lock(offset, len, false, Box::new(done));
    }

    /// Like [`Bdev::lock_lba_range`], but reads of the range wait too, and the lock is taken only once no read
    /// or write of the range is in flight (SPDK's `spdk_bdev_quiesce_range`).
    pub fn quiesce_lba_range(
        &self,
        offset: u64,
        len: u64,
        done: impl FnOnce(u64) + Send + 'static,
    ) {
        self.request_lock(offset, len, true, Box::new(done));
    }

    fn request_lock(
        &self,
        offset: u64,
        len: u64,
        quiesce: bool,
        done: Box<dyn FnOnce(u64) + Send>,
    ) {
        let len = len.max(1);
        let mut q = reactor::lock(&self.0.range_locks);
        let busy = q.taking
            || q.held
                .iter()
                .any(|r| overlaps((r.offset, r.len), (offset, len)));
        q.pending.push_back(Pending {
            offset,
            len,
            quiesce,
            done,
        });
        drop(q);
        if !busy {
            self.take_next();
        }
    }

    /// Releases lock `id`; I/O that waited on it goes on. `done` runs on the calling thread after every
    /// channel let go.
    pub fn unlock_lba_range(&self, id: u64, done: impl FnOnce() + Send + 'static) {
        // Out of the bdev's list first: a channel created from now on does not start with the range.
        reactor::lock(&self.0.range_locks)
            .held
            .retain(|l| l.id != id);
        let bdev = self.clone();
        self.0.io_device.for_each_channel(
            move |c| {
                c.locks.borrow_mut().retain(|l| l.id != id);
                c.release_held_here();
            },
            move |_| {
                bdev.take_next();
                done();
            },
        );
    }

    /// Starts taking the first pending lock that overlaps no held one, unless one is being taken: its range
    /// goes on every channel, then the lock waits for them to drain.
    fn take_next(&self) {
        let (r, done) = {
            let mut q = reactor::lock(&self.0.range_locks);
            if q.taking {
                return;
            }
            let Some(i) = q.pending.iter().position(|p| {
                !q.held
                    .iter()
                    .any(|r| overlaps((r.offset, r.len), (p.offset, p.len)))
            }) else {
                return;
            };
            let p = q.pending.remove(i).expect("position found");
            q.taking = true;
            q.next_id += 1;
            let r = LockedRange {
                id: q.next_id,
                offset: p.offset,
                len: p.len,
                quiesce: p.quiesce,
            };
            // In the bdev's list first: a channel created from now on starts with the range.
            q.held.push(r);
            (r, p.done)
        };
        let bdev = self.clone();
        self.0.io_device.for_each_channel(
            move |c| {
                c.locks.borrow_mut().push(r);
                c.gate.set(true);
            },
            move |_| bdev.wait_drained(r, done),
        );
    }

    /// Waits until no channel's module has I/O that range `r` must wait for, then hands the lock over.
    fn wait_drained(&self, r: LockedRange, done: Box<dyn FnOnce(u64) + Send>) {
        let bdev = self.clone();
        self.0.io_device.for_each_channel(
            move |c| c.drained(&r),
            move |all| {
                if all.iter().all(|d| *d) {
                    reactor::lock(&bdev.0.range_locks).taking = false;
                    done(r.id);
                    bdev.take_next();
                } else {
                    let b = bdev.clone();
                    // Holding the callback in a cell: the timer runs on this thread, once.
                    let done = std::cell::Cell::new(Some(done));
                    reactor::thread::timer(DRAIN_POLL_US, move || {
                        if let Some(d) = done.take() {
                            b.wait_drained(r, d);
                        }
                    })
                    .detach();
                }
            },
        );
    }
}
