//! Clusters of thin blobs given back by unmap, as SPDK v24.05 gives back a whole allocated cluster that an
//! unmap covers (`SPDK_BLOB_UNMAP` in `blob_request_submit_op_single`).
//!
//! The I/O path forwards the unmap to the base as it always does, and tells the metadata thread which whole
//! allocated clusters it covered ([`request`]). There, per blob:
//! 1. under the blob's lock, the clusters' map entries are cleared: from now on they read as the parent's data
//!    or zeroes, and a write allocates anew;
//! 2. with the lock let go (a write in flight may be waiting for an allocation, which takes it), every I/O of
//!    the blob's bdev routed before 1 is waited for: an LBA range lock over the clusters is taken and let go,
//!    and its fence drains every channel of the bdev (the unmap itself included);
//! 3. under the lock again, the metadata is persisted without them (the commit);
//! 4. the device clusters go back to the free pool: no entry names them and nothing routed through one is in
//!    flight. Allocation fills a whole cluster before anything names it, so their old data never shows.
//!
//! The unmap completes at once, before 1: waiting for 2 would wait for itself. A crash before 3 leaves the
//! clusters allocated with their data, which an unmap allows; after 3 they are free at the next load. If 3
//! fails, the clusters stay claimed until the next load (never owned twice).

use std::collections::BTreeSet;
use std::rc::Rc;

use crate::blob::{persist, BlobState};
use crate::exec::spawn;
use crate::format::EXTENTS_PER_EP;
use crate::map::BlobShared;
use crate::runtime::{lookup_store, StoreInner};

/// A blob's clusters waiting to be released.
#[derive(Default)]
pub(crate) struct ReleaseQueue {
    pending: BTreeSet<u64>,
    running: bool,
}

/// Tells the metadata thread that an unmap covered blob clusters `clusters` of `shared`'s blob whole. From
/// any thread; control path (an unmap), so the message may allocate.
pub fn request(shared: &BlobShared, clusters: Vec<u64>) {
    let (sid, bid) = (shared.store_id, shared.id);
    shared.md_thread.send(move || {
        let Some(s) = lookup_store(sid) else { return };
        let Some(b) = s.blobs.borrow().get(&bid).cloned() else {
            return;
        };
        let start = {
            let mut q = b.release.borrow_mut();
            q.pending.extend(clusters);
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            s.background_started();
            spawn(async move {
                run(&s, &b).await;
                s.background_done();
            });
        }
    });
}

/// Serves the blob's queue until it is empty.
async fn run(s: &StoreInner, b: &Rc<BlobState>) {
    loop {
        let batch = std::mem::take(&mut b.release.borrow_mut().pending);
        if batch.is_empty() || s.unloaded.get() {
            b.release.borrow_mut().running = false;
            return;
        }
        release(s, b, batch).await;
    }
}

async fn release(s: &StoreInner, b: &Rc<BlobState>, batch: BTreeSet<u64>) {
    // 1. Out of the map.
    let freed: Vec<(u64, u32)> = {
        let _g = b.lock.lock().await;
        let md = b.md.borrow();
        if !md.flags.thin() || md.flags.data_ro() || !s.blobs.borrow().contains_key(&b.id) {
            return;
        }
        let map = b.shared.map();
        batch
            .into_iter()
            .filter(|c| !md.staged.contains_key(c))
            .filter_map(|c| {
                let d = map.get(c);
                (d != 0).then(|| {
                    map.set(c, 0);
                    (c, d)
                })
            })
            .collect()
    };
    let (Some(&(lo, _)), Some(&(hi, _))) = (freed.first(), freed.last()) else {
        return;
    };
    // 2. What was routed through them is done.
    let cb = b.shared.cluster_blocks;
    drain(&b.shared, lo * cb, (hi + 1 - lo) * cb).await;
    // 3. The metadata without them, unless the blob went meanwhile (its deletion did not list them).
    {
        let _g = b.lock.lock().await;
        if s.blobs.borrow().contains_key(&b.id) {
            {
                let mut md = b.md.borrow_mut();
                if md.extent_table {
                    for &(c, _) in &freed {
                        md.dirty_slots.insert(c / EXTENTS_PER_EP);
                    }
                }
                md.dirty = true;
            }
            if let Err(e) = persist(s, b).await {
                log::warn!(
                    "blobstore: blob {}: releasing {} unmapped clusters: {e} (kept until the next load)",
                    b.id,
                    freed.len()
                );
                return;
            }
        }
    }
    // 4. Free.
    for (_, d) in freed {
        s.release_cluster(d);
    }
}

/// Waits until every I/O of the bdev over the blob that started before now has completed (nothing to wait
/// for without a bdev).
async fn drain(shared: &BlobShared, offset: u64, blocks: u64) {
    if let Some(bdev) = shared.bdev_name().and_then(|n| bdev::get(&n)) {
        crate::blob_bdev::with_range_locked(&bdev, offset, blocks, async {}).await;
    }
}
