//! The blob I/O path: one [`BlobChannel`] per thread and open blob, taking bdev I/Os whose offsets are in the
//! blob's blocks (the base's block size) and sending them to the base.
//!
//! - an I/O inside one allocated cluster is forwarded to the base at the translated offset: the same
//!   descriptor, the caller's buffers, no copy, no allocation ([`IoChannel::forward`], as passthru);
//! - an I/O across clusters is cut at cluster boundaries into child I/Os over the parent's buffers
//!   ([`IoChannel::submit_child_range`]); the parent completes when the last child does;
//! - a read of an unallocated cluster reads the nearest ancestor's cluster, or zeroes;
//! - a write to an unallocated cluster (and a write-zeroes where an ancestor has data) waits while the
//!   metadata thread allocates, fills and records the cluster ([`crate::allocate`]), then runs as above;
//! - unmap and write-zeroes of unallocated clusters do nothing (they already read as zeroes or as the parent,
//!   and unmap is a hint); of allocated ones they go to the base, and a thin blob's whole clusters that an
//!   unmap covers are given back afterwards ([`crate::release`]).
//!
//! Per I/O the path reads the blob's map epoch (one atomic load) and the map entry (one more); the map itself
//! is only re-fetched (under a lock) after a resize.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use bdev::{Completion, IoChannel, IoHandle, IoSink, IoStatus, IoType, IoVec};

use crate::map::{BlobShared, ClusterMap, ExternalDev};

/// Where one cluster's part of an I/O goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    /// To the base at this block.
    Base(u64),
    /// A read of nothing: zero the buffers.
    Zero,
    /// Nothing to do (unmap or write-zeroes of an unallocated cluster).
    Skip,
    /// A read of an esnap clone's unallocated cluster: to the external snapshot at this block.
    External(u64),
    /// A read that cannot be served: the external snapshot is missing (degraded) or does not cover it.
    Fail,
}

/// A thread's I/O channel on one blob.
pub struct BlobChannel {
    st: Rc<ChanState>,
}

struct ChanState {
    shared: Arc<BlobShared>,
    base: IoChannel,
    cluster_blocks: u64,
    /// The map as of `epoch`.
    map: RefCell<(u64, Arc<ClusterMap>)>,
    /// I/Os cut into children, by slot (children carry the slot in `ctx`), and the free slots.
    splits: RefCell<(Vec<Option<IoHandle>>, Vec<u64>)>,
    /// Clusters this channel asked the metadata thread to allocate, with the I/Os waiting for each.
    waiting: RefCell<Vec<(u64, Vec<IoHandle>)>>,
    /// This thread's channel to the external snapshot (esnap clones), taken on first use.
    esnap: RefCell<Option<(Arc<ExternalDev>, Rc<IoChannel>)>>,
}

impl BlobChannel {
    /// A channel on the blob `shared` describes, sending to the base through `base` (this thread's channel on
    /// the store's base descriptor).
    pub fn new(shared: Arc<BlobShared>, base: IoChannel) -> BlobChannel {
        let map = shared.map();
        let epoch = shared.epoch();
        BlobChannel {
            st: Rc::new(ChanState {
                cluster_blocks: shared.cluster_blocks,
                shared,
                base,
                map: RefCell::new((epoch, map)),
                splits: RefCell::new((Vec::new(), Vec::new())),
                waiting: RefCell::new(Vec::new()),
                esnap: RefCell::new(None),
            }),
        }
    }

    /// Starts `io` (offsets in the blob's blocks); it completes through its own callback.
    pub fn submit(&self, io: IoHandle) {
        self.st.submit(io);
    }
}

/// The base finished a forwarded I/O: back to the blob's submitter with the base's status.
fn forwarded_done(mut io: IoHandle) {
    io.restore();
    let st = io.status();
    io.complete(st);
}

/// Split parents keep in `driver_ctx`: [children outstanding (+1 while being cut), first failure code].
const PENDING: usize = 0;
const FAILED: usize = 1;

fn failure_code(st: IoStatus) -> u64 {
    match st {
        IoStatus::NoMem => 1,
        IoStatus::Aborted => 2,
        IoStatus::Failed(e) => (3 << 32) | e as u32 as u64,
        _ => (3 << 32) | libc::EIO as u64,
    }
}

fn failure_status(code: u64) -> IoStatus {
    match code {
        0 => IoStatus::Success,
        1 => IoStatus::NoMem,
        2 => IoStatus::Aborted,
        c => IoStatus::Failed(c as u32 as i32),
    }
}

/// Zeroes `len` bytes starting `off` bytes into a read's buffers.
fn zero_range(iovs: &[IoVec], off: u64, len: u64) {
    let mut parts = Vec::new();
    bdev::sub_iovs(iovs, off, len, &mut parts);
    for v in parts {
        // SAFETY: `v` lies inside the buffers of a read that has not completed (sub_iovs only shortens the
        // caller's elements); a read's buffers are valid for writes until it completes (the bdev submit
        // contract), and nothing else writes them while the blob layer holds the I/O.
        unsafe { std::ptr::write_bytes(v.base, 0, v.len) };
    }
}

impl ChanState {
    /// The current map, re-fetched when the blob's epoch moved.
    #[inline]
    fn refresh(&self) {
        let e = self.shared.epoch();
        if self.map.borrow().0 != e {
            *self.map.borrow_mut() = (e, self.shared.map());
        }
    }

    /// Where blob cluster `c` goes for an I/O of type `t` (the map borrowed for the lookup only).
    #[inline]
    fn route(&self, map: &ClusterMap, t: IoType, c: u64) -> Route {
        let own = map.get(c);
        if own != 0 {
            return Route::Base(own as u64 * self.cluster_blocks);
        }
        match t {
            IoType::Read => match map.parent().and_then(|p| p.lookup(c)) {
                Some(d) => Route::Base(d as u64 * self.cluster_blocks),
                None => match map.external() {
                    None => Route::Zero,
                    Some(x) => match x.dev() {
                        None => Route::Fail,
                        Some(dev) => {
                            let at = c * self.cluster_blocks;
                            if at + self.cluster_blocks <= dev.num_blocks {
                                Route::External(at)
                            } else if at >= dev.num_blocks {
                                // Grown past the external snapshot: zeroes, as SPDK's esnap dev reads.
                                Route::Zero
                            } else {
                                Route::Fail
                            }
                        }
                    },
                },
            },
            _ => Route::Skip,
        }
    }

    /// This thread's channel to the external snapshot's current device.
    fn esnap_channel(&self, map: &ClusterMap) -> Option<Rc<IoChannel>> {
        let dev = map.external()?.dev()?;
        let mut e = self.esnap.borrow_mut();
        match &*e {
            Some((d, ch)) if Arc::ptr_eq(d, &dev) => Some(ch.clone()),
            _ => {
                let ch = Rc::new(dev.desc.channel());
                *e = Some((dev, ch.clone()));
                Some(ch)
            }
        }
    }

    fn submit(self: &Rc<Self>, io: IoHandle) {
        let t = io.io_type();
        match t {
            IoType::Read | IoType::Write | IoType::Unmap | IoType::WriteZeroes => {}
            IoType::Reset | IoType::Flush => return io.complete(IoStatus::Success),
            _ => return io.complete(IoStatus::Failed(libc::ENOTSUP)),
        }
        if t.is_write() && self.shared.read_only() {
            return io.complete(IoStatus::Failed(libc::EPERM));
        }
        self.refresh();
        let cb = self.cluster_blocks;
        let (off, n) = (io.offset_blocks(), io.num_blocks());
        let first = off / cb;
        let last = (off + n.max(1) - 1) / cb;
        let (need_alloc, single, esnap) = {
            let m = self.map.borrow();
            let map = &*m.1;
            if last >= map.num_clusters() {
                drop(m);
                return io.complete(IoStatus::Failed(libc::EINVAL));
            }
            if t == IoType::Unmap && self.shared.thin() {
                // Whole allocated clusters go back to the store once this unmap (and whatever else was in
                // flight on them) is done: see crate::release.
                let covered: Vec<u64> = (off.div_ceil(cb)..(off + n) / cb)
                    .filter(|&c| map.get(c) != 0)
                    .collect();
                if !covered.is_empty() {
                    crate::release::request(&self.shared, covered);
                }
            }
            let mut need = None;
            if matches!(t, IoType::Write | IoType::WriteZeroes) {
                for c in first..=last {
                    if map.get(c) == 0
                        && (t == IoType::Write
                            || map.parent().and_then(|p| p.lookup(c)).is_some()
                            || map.external().is_some())
                    {
                        need = Some(c);
                        break;
                    }
                }
            }
            let single = (first == last).then(|| self.route(map, t, first));
            let esnap = match single {
                Some(Route::External(_)) => self.esnap_channel(map),
                _ => None,
            };
            (need, single, esnap)
        };
        if let Some(c) = need_alloc {
            return self.wait_for_allocation(c, io);
        }
        match single {
            Some(Route::Base(dev)) => {
                self.base
                    .forward(io, dev + off % cb, Completion::Fn(forwarded_done), 0);
            }
            Some(Route::Zero) => {
                zero_range(io.iovs(), 0, io.len_bytes());
                io.complete(IoStatus::Success);
            }
            Some(Route::Skip) => io.complete(IoStatus::Success),
            Some(Route::External(at)) => match esnap {
                Some(ch) => ch.forward(io, at + off % cb, Completion::Fn(forwarded_done), 0),
                None => io.complete(IoStatus::Failed(libc::EIO)),
            },
            Some(Route::Fail) => io.complete(IoStatus::Failed(libc::EIO)),
            None => self.split(io),
        }
    }

    /// An I/O across clusters: one child per allocated cluster piece, zeroes or nothing for the others.
    fn split(self: &Rc<Self>, mut parent: IoHandle) {
        let t = parent.io_type();
        let cb = self.cluster_blocks;
        let bs = parent.block_size() as u64;
        let (off, n) = (parent.offset_blocks(), parent.num_blocks());
        // One extra count while cutting: the parent cannot complete before every child is out.
        parent.driver_ctx[PENDING] = 1;
        parent.driver_ctx[FAILED] = 0;
        let slot = {
            let mut s = self.splits.borrow_mut();
            match s.1.pop() {
                Some(i) => i,
                None => {
                    s.0.push(None);
                    s.0.len() as u64 - 1
                }
            }
        };
        let mut at = off;
        while at < off + n {
            let c = at / cb;
            let len = (cb - at % cb).min(off + n - at);
            let (route, esnap) = {
                let m = self.map.borrow();
                let r = self.route(&m.1, t, c);
                let esnap = match r {
                    Route::External(_) => self.esnap_channel(&m.1),
                    _ => None,
                };
                (r, esnap)
            };
            let target = match (route, &esnap) {
                (Route::Base(dev), _) => Some((&self.base, dev)),
                (Route::External(dev), Some(ch)) => Some((&**ch, dev)),
                _ => None,
            };
            match route {
                Route::Base(_) | Route::External(_) if target.is_some() => {
                    let (ch, dev) = target.expect("matched");
                    let sink: Rc<dyn IoSink> = self.clone();
                    // SAFETY: the parent completes only once its PENDING count drops to zero, and every child
                    // submitted here holds one count until it completes (io_done), so the parent's buffers
                    // outlive every child.
                    let r = unsafe {
                        ch.submit_child_range(
                            &parent,
                            at - off,
                            len,
                            dev + at % cb,
                            Completion::Sink(sink),
                            slot,
                        )
                    };
                    match r {
                        Ok(()) => parent.driver_ctx[PENDING] += 1,
                        Err(_) => {
                            // No descriptor: the whole I/O is retried by the bdev layer (NOMEM) once the
                            // pieces out now are back; reads and writes may run twice, harmlessly.
                            if parent.driver_ctx[FAILED] == 0 {
                                parent.driver_ctx[FAILED] = failure_code(IoStatus::NoMem);
                            }
                            break;
                        }
                    }
                }
                Route::Zero => zero_range(parent.iovs(), (at - off) * bs, len * bs),
                Route::Skip => {}
                Route::Base(_) | Route::External(_) | Route::Fail => {
                    if parent.driver_ctx[FAILED] == 0 {
                        parent.driver_ctx[FAILED] = failure_code(IoStatus::Failed(libc::EIO));
                    }
                    break;
                }
            }
            at += len;
        }
        self.splits.borrow_mut().0[slot as usize] = Some(parent);
        self.child_finished(slot, IoStatus::Success);
    }

    /// One count of split parent `slot` is done (a child, or the cutting itself).
    fn child_finished(&self, slot: u64, st: IoStatus) {
        let done = {
            let mut s = self.splits.borrow_mut();
            let Some(p) = s.0.get_mut(slot as usize).and_then(|p| p.as_mut()) else {
                log::error!("blob {}: child of an unknown split I/O", self.shared.id);
                return;
            };
            if st != IoStatus::Success && p.driver_ctx[FAILED] == 0 {
                p.driver_ctx[FAILED] = failure_code(st);
            }
            p.driver_ctx[PENDING] -= 1;
            if p.driver_ctx[PENDING] == 0 {
                s.1.push(slot);
                s.0[slot as usize].take()
            } else {
                None
            }
        };
        if let Some(p) = done {
            let st = failure_status(p.driver_ctx[FAILED]);
            p.complete(st);
        }
    }

    /// Parks `io` until cluster `c` is allocated (one request per cluster from this channel).
    fn wait_for_allocation(self: &Rc<Self>, c: u64, io: IoHandle) {
        {
            let mut w = self.waiting.borrow_mut();
            if let Some(e) = w.iter_mut().find(|(x, _)| *x == c) {
                e.1.push(io);
                return;
            }
            w.push((c, vec![io]));
        }
        let token = reactor::OnThread::new(self.clone());
        crate::allocate::request(
            &self.shared,
            c,
            Box::new(move |errno| token.with(move |st: Rc<ChanState>| st.allocated(c, errno))),
        );
    }

    /// Cluster `c` is allocated (`errno` 0) or could not be: the waiting I/Os go on, or fail.
    fn allocated(self: &Rc<Self>, c: u64, errno: i32) {
        let ios = {
            let mut w = self.waiting.borrow_mut();
            match w.iter().position(|(x, _)| *x == c) {
                Some(i) => w.swap_remove(i).1,
                None => Vec::new(),
            }
        };
        for io in ios {
            if errno == 0 {
                self.submit(io);
            } else {
                io.complete(IoStatus::Failed(errno));
            }
        }
    }
}

impl IoSink for ChanState {
    fn io_done(&self, child: IoHandle) {
        let (slot, st) = (child.ctx, child.status());
        drop(child);
        self.child_finished(slot, st);
    }
}
