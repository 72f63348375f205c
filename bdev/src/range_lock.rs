//! LBA range locks (SPDK's `bdev_lock_lba_range`): while a range is locked, writes (and compares) from every
//! channel of the bdev that overlap it wait, except the lock holder's own. Compare-and-write uses one so that no
//! other write lands between its compare and its write.
//!
//! Taking a lock: every channel is fenced (new I/O waits) until what was in flight before has completed, then the
//! range is installed on every channel and the fence goes; I/O that waited goes on, or keeps waiting if it
//! overlaps the range. Locks are taken one at a time per bdev, and a lock that overlaps a held one waits for it,
//! so a fence never waits on a lock holder that needs the fence gone. The fence costs new I/O on the bdev one
//! in-flight I/O's latency; the I/O path pays one flag test while no lock exists.

use crate::bdev::Bdev;
use std::collections::VecDeque;

/// How long a lock being taken waits between looks at the channels' in-flight I/O.
const DRAIN_POLL_US: u64 = 5;

/// A lock asked for and not yet taken.
struct Pending {
    offset: u64,
    len: u64,
    done: Box<dyn FnOnce(u64) + Send>,
}

/// A bdev's range locks.
#[derive(Default)]
pub(crate) struct RangeLocks {
    held: Vec<(u64, u64, u64)>,
    pending: VecDeque<Pending>,
    taking: bool,
    /// Channels are fenced (from before the fence walk until before the install walk): what a new channel
    /// starts with.
    fenced: bool,
    next_id: u64,
}

impl RangeLocks {
    /// What a channel created now must start with: the held ranges, and whether a lock is being taken.
    pub(crate) fn snapshot(&self) -> (Vec<(u64, u64, u64)>, bool) {
        (self.held.clone(), self.fenced)
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
        let len = len.max(1);
        let mut q = reactor::lock(&self.0.range_locks);
        let busy = q.taking
            || q.held
                .iter()
                .any(|&(_, o, l)| overlaps((o, l), (offset, len)));
        q.pending.push_back(Pending {
            offset,
            len,
            done: Box::new(done),
        });
        drop(q);
        if !busy {
            self.take_next();
        }
    }

    /// Releases lock `id`; writes that waited on it go on. `done` runs on the calling thread after every
    /// channel let go.
    pub fn unlock_lba_range(&self, id: u64, done: impl FnOnce() + Send + 'static) {
        // Out of the bdev's list first: a channel created from now on does not start with the range.
        reactor::lock(&self.0.range_locks)
            .held
            .retain(|l| l.0 != id);
        let bdev = self.clone();
        self.0.io_device.for_each_channel(
            move |c| {
                c.locks.borrow_mut().retain(|l| l.0 != id);
                c.release_held_here();
            },
            move |_| {
                bdev.take_next();
                done();
            },
        );
    }

    /// Starts taking the first pending lock that overlaps no held one, unless one is being taken.
    fn take_next(&self) {
        let next = {
            let mut q = reactor::lock(&self.0.range_locks);
            if q.taking {
                return;
            }
            let held = q.held.clone();
            let Some(i) = q.pending.iter().position(|p| {
                !held
                    .iter()
                    .any(|&(_, o, l)| overlaps((o, l), (p.offset, p.len)))
            }) else {
                return;
            };
            let p = q.pending.remove(i).expect("position found");
            q.taking = true;
            q.fenced = true;
            q.next_id += 1;
            (q.next_id, p)
        };
        let (id, p) = next;
        let bdev = self.clone();
        self.0.io_device.for_each_channel(
            |c| {
                c.fence.set(true);
                c.gate.set(true);
            },
            move |_| bdev.wait_drained(id, p),
        );
    }

    /// Waits until every channel has nothing in flight from before the fence, then installs the range.
    fn wait_drained(&self, id: u64, p: Pending) {
        let bdev = self.clone();
        self.0.io_device.for_each_channel(
            |c| c.drained(),
            move |all| {
                if all.iter().all(|d| *d) {
                    bdev.install(id, p);
                } else {
                    let b = bdev.clone();
                    // Holding the pending lock in a closure: the timer runs on this thread.
                    let p = std::cell::Cell::new(Some(p));
                    reactor::thread::timer(DRAIN_POLL_US, move || {
                        if let Some(p) = p.take() {
                            b.wait_drained(id, p);
                        }
                    })
                    .detach();
                }
            },
        );
    }

    fn install(&self, id: u64, p: Pending) {
        let (offset, len) = (p.offset, p.len);
        // In the bdev's list first: a channel created from now on starts with the range, and unfenced.
        {
            let mut q = reactor::lock(&self.0.range_locks);
            q.held.push((id, offset, len));
            q.fenced = false;
        }
        let bdev = self.clone();
        self.0.io_device.for_each_channel(
            move |c| {
                c.locks.borrow_mut().push((id, offset, len));
                c.fence.set(false);
                c.release_held_here();
            },
            move |_| {
                reactor::lock(&bdev.0.range_locks).taking = false;
                (p.done)(id);
                bdev.take_next();
            },
        );
    }
}
