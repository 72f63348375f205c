//! Clusters of thin blobs allocated on first write (SPDK's `bs_allocate_and_copy_cluster` and
//! `blob_insert_cluster_on_md_thread`), on the metadata thread.
//!
//! An I/O thread that finds a write's cluster unallocated asks here ([`request`]) and parks the write. Requests
//! for one blob are served in batches, under the blob's lock:
//! 1. claim a cluster (lowest free) per blob cluster, and a page for each extent page slot that has none;
//! 2. fill each new cluster: the parent snapshot's data (read, then written) or zeroes, so that the cluster
//!    holds what the blob read there before; nothing points at it yet;
//! 3. write the metadata: the slot's extent page rewritten in place with the new entry (one atomic 4 KiB
//!    write; its length does not change), a new extent page to a fresh page and then the chain that names it
//!    (see [`crate::blob`]); if the blob has other changes not on disk, the whole blob is persisted instead;
//! 4. only then is the cluster put in the map the I/O path reads, and the waiting writes resume (they then go
//!    straight to the new cluster).
//!
//! Writes to a cluster being allocated wait with the first one; reads meanwhile read the parent (or zeroes),
//! which is what the new cluster was filled with. A crash at any point leaves either the old metadata
//! (cluster unreferenced: free at the next load) or the new one naming a filled cluster.

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::blob::{persist, BlobState};
use crate::error::{Error, ErrorKind, Result};
use crate::exec::{join_all, spawn};
use crate::format::EXTENTS_PER_EP;
use crate::map::BlobShared;
use crate::runtime::{lookup_store, StoreInner};
use crate::serialize;

/// How a waiting write learns the outcome: 0 or a positive errno. Runs on the metadata thread; it sends the
/// result on to the writer's thread.
pub type Reply = Box<dyn FnOnce(i32) + Send>;

/// Clusters allocated together at most (a batch holds a buffer per parent cluster it copies).
const MAX_BATCH: usize = 16;

/// A blob's pending allocations.
#[derive(Default)]
pub(crate) struct AllocQueue {
    waiters: BTreeMap<u64, Vec<Reply>>,
    running: bool,
}

/// Asks the metadata thread to allocate blob cluster `cluster` of `shared`'s blob; `reply` runs there when
/// it is (or when it fails). From any thread.
pub fn request(shared: &BlobShared, cluster: u64, reply: Reply) {
    let (sid, bid) = (shared.store_id, shared.id);
    shared.md_thread.send(move || {
        let Some(s) = lookup_store(sid) else {
            return reply(libc::ENODEV);
        };
        let b = s.blobs.borrow().get(&bid).cloned();
        match b {
            Some(b) => enqueue(s, b, cluster, reply),
            None => reply(libc::ENODEV),
        }
    });
}

fn enqueue(s: Rc<StoreInner>, b: Rc<BlobState>, c: u64, reply: Reply) {
    {
        let md = b.md.borrow();
        if c >= md.num_clusters {
            return reply(libc::ERANGE);
        }
        if md.flags.data_ro() {
            return reply(libc::EPERM);
        }
    }
    if b.shared.map().get(c) != 0 {
        return reply(0);
    }
    let start = {
        let mut q = b.alloc.borrow_mut();
        q.waiters.entry(c).or_default().push(reply);
        !std::mem::replace(&mut q.running, true)
    };
    if start {
        spawn(run(s, b));
    }
}

/// Serves the blob's queue until it is empty.
async fn run(s: Rc<StoreInner>, b: Rc<BlobState>) {
    loop {
        let batch: Vec<u64> = b
            .alloc
            .borrow()
            .waiters
            .keys()
            .take(MAX_BATCH)
            .copied()
            .collect();
        if batch.is_empty() {
            b.alloc.borrow_mut().running = false;
            return;
        }
        let res = {
            let _g = b.lock.lock().await;
            allocate(&s, &b, &batch).await
        };
        let (failed, errno) = match res {
            Ok(f) => (f, 0),
            Err(e) => {
                log::warn!("blobstore: allocating clusters of blob {}: {e}", b.id);
                (Vec::new(), e.errno())
            }
        };
        for c in batch {
            let ws = b.alloc.borrow_mut().waiters.remove(&c).unwrap_or_default();
            let e = if failed.contains(&c) {
                libc::ENOSPC
            } else {
                errno
            };
            for w in ws {
                w(e);
            }
        }
    }
}

/// Allocates `batch` (blob clusters); returns those left without a cluster for want of space.
pub(crate) async fn allocate(s: &StoreInner, b: &BlobState, batch: &[u64]) -> Result<Vec<u64>> {
    let map = b.shared.map();
    let (todo, staged_pending, extent_table) = {
        let md = b.md.borrow();
        let todo: Vec<u64> = batch
            .iter()
            .copied()
            .filter(|&c| c < md.num_clusters && map.get(c) == 0 && !md.staged.contains_key(&c))
            .collect();
        let pending = batch
            .iter()
            .any(|c| md.staged.get(c).is_some_and(|&d| d != 0));
        (todo, pending, md.extent_table)
    };
    if todo.is_empty() {
        // Allocated meanwhile, or allocated by a persist that failed: persisting again finishes it.
        if staged_pending {
            persist(s, b).await?;
        }
        return Ok(Vec::new());
    }
    // 1. Claims.
    let mut got: Vec<(u64, u32)> = Vec::new();
    let mut failed = Vec::new();
    let mut new_pages: BTreeMap<u64, u32> = BTreeMap::new();
    let release = |got: &[(u64, u32)], pages: &BTreeMap<u64, u32>| {
        for &(_, d) in got {
            s.release_cluster(d);
        }
        for &p in pages.values() {
            s.release_md_page(p);
        }
    };
    for &c in &todo {
        let d = match s.claim_cluster() {
            Ok(d) => d,
            Err(_) => {
                failed.push(c);
                continue;
            }
        };
        let slot = c / EXTENTS_PER_EP;
        let has_page = {
            let md = b.md.borrow();
            !extent_table || md.extent_pages.get(slot as usize).is_some_and(|&p| p != 0)
        };
        if !has_page && !new_pages.contains_key(&slot) {
            match s.claim_md_page(1) {
                Ok(p) => {
                    new_pages.insert(slot, p);
                }
                Err(_) => {
                    s.release_cluster(d);
                    failed.push(c);
                    continue;
                }
            }
        }
        got.push((c, d));
    }
    if got.is_empty() {
        release(&got, &new_pages);
        return Ok(failed);
    }
    // 2. Fill the new clusters with what the blob reads there now.
    let fills: Vec<_> = got
        .iter()
        .map(|&(c, d)| {
            let src = map.parent().and_then(|p| p.lookup(c));
            let external = map.external().cloned();
            async move {
                let dst = s.cluster_offset(d);
                let at = c * s.cluster_size;
                let buf = match (src, external) {
                    (Some(src), _) => {
                        s.base
                            .read(s.cluster_offset(src), s.cluster_size as usize)
                            .await?
                    }
                    (None, None) => return s.base.write_zeroes(dst, s.cluster_size).await,
                    (None, Some(x)) => {
                        // An esnap clone: the external snapshot's data (zeroes past its end).
                        let dev = x.dev().ok_or_else(|| {
                            Error::new(
                                ErrorKind::Io(libc::EIO),
                                format!("blob {}: external snapshot missing", b.id),
                            )
                        })?;
                        if at >= dev.num_blocks * s.block_size {
                            return s.base.write_zeroes(dst, s.cluster_size).await;
                        }
                        crate::base::Base::new(dev.desc.channel())
                            .read(at, s.cluster_size as usize)
                            .await?
                    }
                };
                s.base.write(dst, buf).await
            }
        })
        .collect();
    let filled: Result<Vec<()>> = join_all(fills).await.into_iter().collect();
    if let Err(e) = filled.and(s.mark_dirty().await) {
        release(&got, &new_pages);
        return Err(e);
    }
    // 3. Metadata.
    let md_dirty = b.md.borrow().dirty;
    if md_dirty || !extent_table {
        {
            let mut md = b.md.borrow_mut();
            for &(c, d) in &got {
                md.staged.insert(c, d);
                if extent_table {
                    md.dirty_slots.insert(c / EXTENTS_PER_EP);
                }
            }
            for (&slot, &p) in &new_pages {
                if let Some(e) = md.extent_pages.get_mut(slot as usize) {
                    *e = p;
                }
            }
            md.dirty = true;
        }
        persist(s, b).await?;
        return Ok(failed);
    }
    let overlay: BTreeMap<u64, u32> = got.iter().copied().collect();
    let slots: Vec<u64> = {
        let mut v: Vec<u64> = got.iter().map(|&(c, _)| c / EXTENTS_PER_EP).collect();
        v.dedup();
        v
    };
    let writes: Vec<_> = {
        let md = b.md.borrow();
        slots
            .iter()
            .map(|&slot| {
                let page = new_pages
                    .get(&slot)
                    .copied()
                    .unwrap_or_else(|| md.extent_pages[slot as usize]);
                let start = slot * EXTENTS_PER_EP;
                let n = md.num_clusters.saturating_sub(start).min(EXTENTS_PER_EP);
                let entries: Vec<u32> = (start..start + n)
                    .map(|c| overlay.get(&c).copied().unwrap_or_else(|| map.get(c)))
                    .collect();
                (page, serialize::extent_page(b.id, slot, entries))
            })
            .collect()
    };
    let w: Vec<_> = writes
        .iter()
        .map(|(p, page)| s.write_md_page(*p, page))
        .collect();
    if let Err(e) = join_all(w).await.into_iter().collect::<Result<Vec<()>>>() {
        // An in-place extent page may or may not hold the new entries: keep every claim (a leak until the
        // next load, never a cluster owned twice).
        return Err(e.context("writing extent pages"));
    }
    if new_pages.is_empty() {
        for &(c, d) in &got {
            map.set(c, d);
        }
        return Ok(failed);
    }
    {
        let mut md = b.md.borrow_mut();
        for (&slot, &p) in &new_pages {
            md.extent_pages[slot as usize] = p;
        }
        md.staged.extend(overlay);
        md.dirty = true;
    }
    persist(s, b).await?;
    Ok(failed)
}
