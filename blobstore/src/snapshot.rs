//! Snapshots and what changes a blob's parent: snapshot creation (`spdk_bs_create_snapshot`), deleting a
//! snapshot that has one clone (the clone takes its clusters), inflate and decouple
//! (`spdk_bs_inflate_blob`, `spdk_bs_blob_decouple_parent`), set_parent (`spdk_bs_blob_set_parent`), and the
//! repair at load of a snapshot creation or
//! deletion that a crash interrupted, all in SPDK's order of metadata writes so that SPDK's recovery and ours
//! agree on every intermediate state.
//!
//! **Creation** (origin O, new snapshot S):
//! 1. S is created thin, O's size, with the internal xattr `SNAPTMP` = O;
//! 2. S takes O's clusters (and O's parent): S's metadata is written (its extent pages to fresh pages);
//! 3. O becomes a thin clone of S with no clusters of its own: O's metadata is written — the commit;
//! 4. `SNAPTMP` goes and S becomes read-only.
//!
//! A crash after 2 leaves S and O naming the same clusters, S marked: at load, if O's parent is S the
//! creation is finished (4), otherwise S is deleted without touching what O still names. In memory, O's
//! current map simply *becomes* S's map (it never changes again) and O gets a new, empty one reading through
//! to it: no cluster entry is copied.
//!
//! **Deletion of a snapshot S with one clone C**: S is marked `SNAPRM` = C; C takes S's clusters where it has
//! none and S's parent (C's metadata written: the commit); S is deleted, releasing only the clusters C did not
//! take. At load a marked S is kept (marker removed) if C's parent is still S, deleted otherwise.
//!
//! Writes to the origin must be held off while a snapshot is taken (a write in flight to an origin cluster
//! that lands after the swap would land in the snapshot): the lvol module holds an LBA range lock over the
//! origin's bdev, which also waits for what is in flight. Reads need nothing: both maps read the same data.

use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::Arc;

use crate::allocate::allocate;
use crate::blob::{delete_leaf, persist, BlobState, CreateOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::format::{BlobId, Flags, Xattr, EXTENTS_PER_EP};
use crate::map::ClusterMap;
use crate::runtime::{Blobstore, StoreInner};
use crate::store::{XATTR_SNAPSHOT_IN_PROGRESS, XATTR_SNAPSHOT_PENDING_REMOVAL};

/// Clusters allocated per step of an inflate (the blob's lock is let go between steps, so that first
/// writes of the blob's users are not held for the whole inflate).
const INFLATE_STEP: usize = 64;

fn id_bytes(id: BlobId) -> Vec<u8> {
    id.0.to_le_bytes().to_vec()
}

impl Blobstore {
    /// Takes a snapshot of blob `origin` (`spdk_bs_create_snapshot`): a new read-only blob with `xattrs` that
    /// holds what `origin` holds now; `origin` becomes its thin clone. Refused (Invalid) for a read-only blob.
    /// The caller holds writes to `origin` off meanwhile (see the module documentation).
    pub async fn create_snapshot(&self, origin: BlobId, xattrs: Vec<Xattr>) -> Result<BlobId> {
        let s = &self.0;
        s.check_loaded()?;
        let o = s.blob(origin)?;
        {
            let md = o.md.borrow();
            if md.flags.md_ro() {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!("blob {origin} is read-only: cannot snapshot it"),
                ));
            }
        }
        let _g = o.lock.lock().await;
        // What the origin has in memory goes to disk first: the snapshot takes what is on disk.
        persist(s, &o).await?;
        let (n, extent_table, clear, parent, external) = {
            let md = o.md.borrow();
            (
                md.num_clusters,
                md.extent_table,
                md.flags.clear_method(),
                md.parent,
                md.external_id(),
            )
        };
        // 1. The snapshot, empty and marked.
        let snap_id = self
            .create_with(
                CreateOptions {
                    num_clusters: n,
                    thin: true,
                    xattrs,
                    clear_method: clear,
                    use_extent_table: extent_table,
                },
                None,
                vec![Xattr::new(XATTR_SNAPSHOT_IN_PROGRESS, id_bytes(origin))],
                None,
            )
            .await?;
        let snap = s.blob(snap_id)?;
        let _gs = snap.lock.lock().await;
        // 2. The snapshot takes the origin's clusters and parent: the origin's map is the snapshot's now.
        let old_map = o.shared.map();
        {
            let mut md = snap.md.borrow_mut();
            md.set_parent(parent);
            if external.is_some() {
                // An esnap clone's snapshot takes its external snapshot (SPDK copies `EXTSNAP`).
                md.set_external(external.clone());
            }
            if extent_table {
                md.dirty_slots = old_map
                    .allocated_clusters()
                    .into_iter()
                    .map(|(c, _)| c / EXTENTS_PER_EP)
                    .collect();
            }
        }
        snap.shared.replace_map(old_map.clone());
        if let Err(e) = persist(s, &snap).await {
            snap.shared.replace_map(Arc::new(ClusterMap::new(n, None)));
            if !snap.uncertain.get() {
                drop(_gs);
                if let Err(e2) = delete_leaf(s, &snap).await {
                    log::warn!("blobstore: removing snapshot {snap_id} that failed: {e2}");
                }
            }
            return Err(e.context(format!("snapshot of blob {origin}")));
        }
        // 3. The origin: a thin clone of the snapshot with nothing of its own. Its old extent pages go once
        //    its new metadata is on disk (the snapshot has its own copies).
        let saved = {
            let mut md = o.md.borrow_mut();
            let saved = (
                md.flags,
                md.internal_xattrs.clone(),
                md.parent,
                md.extent_pages.clone(),
                md.cut_pages.len(),
            );
            md.set_parent(Some(snap_id));
            md.set_external(None);
            md.flags.invalid |= Flags::THIN_PROV;
            let old: Vec<u32> = md
                .extent_pages
                .iter()
                .copied()
                .filter(|&p| p != 0)
                .collect();
            md.cut_pages.extend(old);
            md.extent_pages.iter_mut().for_each(|p| *p = 0);
            md.dirty_slots.clear();
            saved
        };
        o.shared
            .replace_map(Arc::new(ClusterMap::new(n, Some(old_map.clone()))));
        if let Err(e) = persist(s, &o).await {
            // Back to the origin as it was; the snapshot stays for the next load to settle when the origin's
            // first page may be either version, and goes otherwise.
            {
                let mut md = o.md.borrow_mut();
                (md.flags, md.internal_xattrs, md.parent, md.extent_pages) =
                    (saved.0, saved.1, saved.2, saved.3);
                md.cut_pages.truncate(saved.4);
            }
            o.shared.replace_map(old_map);
            snap.shared.replace_map(Arc::new(ClusterMap::new(n, None)));
            if o.uncertain.get() {
                // Nothing in this session may release what the snapshot names on disk.
                s.blobs.borrow_mut().remove(&snap_id);
                s.broken.borrow_mut().push((
                    snap_id,
                    "snapshot creation interrupted by a write error".into(),
                ));
            } else {
                drop(_gs);
                if let Err(e2) = delete_leaf(s, &snap).await {
                    log::warn!("blobstore: removing snapshot {snap_id} that failed: {e2}");
                }
            }
            return Err(e.context(format!("snapshot of blob {origin}")));
        }
        // 4. Done: the marker goes, the snapshot is read-only.
        {
            let mut md = snap.md.borrow_mut();
            md.remove_internal(XATTR_SNAPSHOT_IN_PROGRESS);
            md.flags.data_ro |= Flags::READ_ONLY;
            md.dirty = true;
        }
        snap.shared.set_read_only();
        if let Err(e) = persist(s, &snap).await {
            // The snapshot is whole; the next load removes the marker (the origin's parent is the snapshot).
            log::warn!("blobstore: finishing snapshot {snap_id}: {e}");
        }
        Ok(snap_id)
    }

    /// Allocates every cluster of thin blob `id` that it does not have, copying its parent's data (or
    /// zeroes), and cuts it from its parent: it becomes a thick blob of its own (`spdk_bs_inflate_blob`). A
    /// thick blob is left as it is.
    pub async fn inflate(&self, id: BlobId) -> Result<()> {
        self.inflate_with(id, true).await
    }

    /// Allocates the clusters of blob `id` that its parent snapshot itself holds, copying them, and makes the
    /// parent's parent its parent (`spdk_bs_blob_decouple_parent`). Invalid for a blob without a parent.
    pub async fn decouple_parent(&self, id: BlobId) -> Result<()> {
        self.inflate_with(id, false).await
    }

    /// Makes snapshot `snapshot` the parent of thin blob `id` (`spdk_bs_blob_set_parent`): `id` keeps its own
    /// clusters and reads the others from `snapshot`. As SPDK: Invalid unless `id` is thin, `snapshot` is a
    /// snapshot (it has clones) of the same size and not `id` itself; Exists if it is the parent already.
    pub async fn set_parent(&self, id: BlobId, snapshot: BlobId) -> Result<()> {
        let s = &self.0;
        s.check_loaded()?;
        let invalid = |why: &str| Err(Error::new(ErrorKind::Invalid, format!("blob {id}: {why}")));
        if id == snapshot {
            return invalid("a blob cannot be its own parent");
        }
        let b = s.blob(id)?;
        if b.md.borrow().parent == Some(snapshot) {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("blob {snapshot} is the parent of blob {id} already"),
            ));
        }
        if !b.md.borrow().flags.thin() {
            return invalid("not thin provisioned");
        }
        let p = s.blob(snapshot)?;
        if self.clones_of(snapshot).is_empty() {
            return invalid("the new parent is not a snapshot");
        }
        if p.md.borrow().num_clusters != b.md.borrow().num_clusters {
            return invalid("the new parent's size differs");
        }
        // Stricter than SPDK: a parent that descends from the blob would make a cycle of parents.
        let mut up = Some(snapshot);
        while let Some(a) = up {
            if a == id {
                return invalid("the new parent descends from it");
            }
            up = s.blob(a)?.md.borrow().parent;
        }
        let _g = b.lock.lock().await;
        let saved = {
            let mut md = b.md.borrow_mut();
            let saved = (md.flags, md.internal_xattrs.clone(), md.parent);
            md.set_parent(Some(snapshot));
            md.set_external(None);
            saved
        };
        if let Err(e) = persist(s, &b).await {
            let mut md = b.md.borrow_mut();
            (md.flags, md.internal_xattrs, md.parent) = saved;
            return Err(e);
        }
        b.shared.replace_map(Arc::new(
            b.shared.map().reparented(Some(p.shared.map()), None),
        ));
        Ok(())
    }

    async fn inflate_with(&self, id: BlobId, all: bool) -> Result<()> {
        let s = &self.0;
        s.check_loaded()?;
        let b = s.blob(id)?;
        let (thin, parent, esnap) = {
            let md = b.md.borrow();
            (md.flags.thin(), md.parent, md.flags.esnap())
        };
        // SPDK: an esnap clone is always inflated whole.
        let all = all || esnap;
        if parent.is_none() && !all {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("blob {id} has no parent to decouple from"),
            ));
        }
        if !thin {
            return Ok(());
        }
        if all && b.shared.map().external().is_some_and(|x| x.dev().is_none()) {
            return Err(Error::new(
                ErrorKind::NoEntry,
                format!("blob {id}: its external snapshot is missing (degraded)"),
            ));
        }
        // The clusters to allocate: every missing one, or (decouple) those the parent itself holds.
        let needed = |b: &BlobState| -> Vec<u64> {
            let map = b.shared.map();
            let pmap = map.parent().cloned();
            (0..map.num_clusters())
                .filter(|&c| map.get(c) == 0)
                .filter(|&c| all || pmap.as_ref().is_some_and(|p| p.get(c) != 0))
                .collect()
        };
        let todo = needed(&b);
        if todo.len() as u64 > s.free_clusters() {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!("{} clusters needed, {} free", todo.len(), s.free_clusters()),
            ));
        }
        for step in todo.chunks(INFLATE_STEP) {
            let _g = b.lock.lock().await;
            let failed = allocate(s, &b, step).await?;
            if !failed.is_empty() {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!("no free cluster for {} clusters of blob {id}", failed.len()),
                ));
            }
        }
        let _g = b.lock.lock().await;
        // Grown meanwhile (a resize): those clusters too, under the lock this time.
        let rest = needed(&b);
        if !rest.is_empty() && !allocate(s, &b, &rest).await?.is_empty() {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!("no free cluster for blob {id}"),
            ));
        }
        // The new parent: none (inflate), or the parent's parent; a parent that is itself an esnap clone
        // hands its external snapshot down (SPDK would refuse: it looks for a blob of that id).
        let map = b.shared.map();
        let (new_parent, new_external, grand, grand_external) = if all {
            (None, None, None, None)
        } else {
            let pmap = map.parent();
            let grand = match parent {
                Some(p) => {
                    let pb = s.blob(p)?;
                    let md = pb.md.borrow();
                    (md.parent, md.external_id())
                }
                None => (None, None),
            };
            (
                pmap.and_then(|p| p.parent().cloned()),
                pmap.and_then(|p| p.own_external().cloned()),
                grand.0,
                grand.1,
            )
        };
        {
            let mut md = b.md.borrow_mut();
            md.set_parent(grand);
            md.set_external(grand_external);
            if all {
                md.flags.invalid &= !Flags::THIN_PROV;
            }
        }
        persist(s, &b).await?;
        b.shared.replace_map(Arc::new(
            b.shared.map().reparented(new_parent, new_external),
        ));
        Ok(())
    }
}

/// The first half of deleting snapshot `snap` whose one clone is `clone_id`: the clone takes the snapshot's
/// clusters where it has none, and the snapshot's parent; the snapshot is left with only the clusters the
/// clone did not take, for [`delete_leaf`] to release.
pub(crate) async fn merge_into_clone(
    s: &StoreInner,
    snap: &Rc<BlobState>,
    clone_id: BlobId,
) -> Result<()> {
    let c = s.blob(clone_id)?;
    let _gc = c.lock.lock().await;
    let _gs = snap.lock.lock().await;
    persist(s, &c).await?;
    // 1. The snapshot is marked.
    snap.md
        .borrow_mut()
        .set_internal(XATTR_SNAPSHOT_PENDING_REMOVAL, id_bytes(clone_id));
    if let Err(e) = persist(s, snap).await {
        if !snap.uncertain.get() {
            snap.md
                .borrow_mut()
                .remove_internal(XATTR_SNAPSHOT_PENDING_REMOVAL);
        }
        return Err(e.context(format!("deleting snapshot {}", snap.id)));
    }
    // 2. The clone takes the clusters and the parent.
    let smap = snap.shared.map();
    let cmap = c.shared.map();
    let (grand, external) = {
        let md = snap.md.borrow();
        (md.parent, md.external_id())
    };
    let mut taken = BTreeSet::new();
    let saved = {
        let mut md = c.md.borrow_mut();
        let saved = (md.flags, md.internal_xattrs.clone(), md.parent);
        for (k, d) in smap.allocated_clusters() {
            if k < md.num_clusters && cmap.get(k) == 0 {
                md.staged.insert(k, d);
                taken.insert(d);
                if md.extent_table {
                    md.dirty_slots.insert(k / EXTENTS_PER_EP);
                }
            }
        }
        md.set_parent(grand);
        md.set_external(external);
        saved
    };
    if let Err(e) = persist(s, &c).await {
        {
            let mut md = c.md.borrow_mut();
            md.staged.clear();
            (md.flags, md.internal_xattrs, md.parent) = saved;
        }
        if !c.uncertain.get() {
            snap.md
                .borrow_mut()
                .remove_internal(XATTR_SNAPSHOT_PENDING_REMOVAL);
            if let Err(e2) = persist(s, snap).await {
                log::warn!("blobstore: unmarking snapshot {}: {e2}", snap.id);
            }
        }
        return Err(e.context(format!("deleting snapshot {}", snap.id)));
    }
    c.shared.replace_map(Arc::new(
        c.shared
            .map()
            .reparented(smap.parent().cloned(), smap.own_external().cloned()),
    ));
    // 3. What the snapshot still owns alone.
    snap.shared
        .replace_map(Arc::new(exclusive_map(&smap, |d| !taken.contains(&d))));
    Ok(())
}

/// A copy of `m` (same parent) with only the entries whose device cluster `keep` accepts.
fn exclusive_map(m: &ClusterMap, keep: impl Fn(u32) -> bool) -> ClusterMap {
    let out = ClusterMap::new(m.num_clusters(), m.parent().cloned());
    for (c, d) in m.allocated_clusters() {
        if keep(d) {
            out.set(c, d);
        }
    }
    out
}

/// Finishes or undoes, at load, every snapshot creation (`SNAPTMP`) and deletion (`SNAPRM`) a crash
/// interrupted, as SPDK's `bs_load_iter` does: a marked snapshot whose recorded clone has it as its parent is
/// kept (marker removed, read-only); otherwise it is deleted, releasing only what no other blob names.
pub(crate) async fn repair_interrupted(bs: &Blobstore) -> Result<()> {
    let s = &bs.0;
    let marked: Vec<(BlobId, Option<BlobId>)> = s
        .blobs
        .borrow()
        .values()
        .filter_map(|b| {
            let md = b.md.borrow();
            let v = md
                .internal(XATTR_SNAPSHOT_PENDING_REMOVAL)
                .or_else(|| md.internal(XATTR_SNAPSHOT_IN_PROGRESS))?;
            let other = <[u8; 8]>::try_from(v)
                .ok()
                .map(|v| BlobId(u64::from_le_bytes(v)));
            Some((b.id, other))
        })
        .collect();
    for (id, other) in marked {
        let b = s.blob(id)?;
        let keep = match other.and_then(|o| s.blobs.borrow().get(&o).cloned()) {
            Some(c) => c.md.borrow().parent == Some(id),
            None => {
                // SPDK leaves such a blob out of the store's list: it is neither used nor released.
                log::error!("blobstore: blob {id}: interrupted snapshot operation names no blob");
                s.blobs.borrow_mut().remove(&id);
                s.broken.borrow_mut().push((
                    id,
                    "interrupted snapshot operation naming a blob that does not exist".into(),
                ));
                continue;
            }
        };
        if keep {
            log::info!("blobstore: blob {id}: finishing an interrupted snapshot operation");
            let _g = b.lock.lock().await;
            {
                let mut md = b.md.borrow_mut();
                md.remove_internal(XATTR_SNAPSHOT_PENDING_REMOVAL);
                md.remove_internal(XATTR_SNAPSHOT_IN_PROGRESS);
                md.flags.data_ro |= Flags::READ_ONLY;
                md.dirty = true;
            }
            b.shared.set_read_only();
            persist(s, &b).await?;
            continue;
        }
        log::info!("blobstore: blob {id}: removing a snapshot whose operation a crash interrupted");
        // What the other blobs name stays theirs.
        let mut clusters = BTreeSet::new();
        let mut pages = BTreeSet::new();
        for o in s.blobs.borrow().values().filter(|o| o.id != id) {
            clusters.extend(
                o.shared
                    .map()
                    .allocated_clusters()
                    .into_iter()
                    .map(|(_, d)| d),
            );
            let md = o.md.borrow();
            pages.extend(md.extent_pages.iter().copied().filter(|&p| p != 0));
            pages.extend(md.chain.iter().copied());
        }
        {
            let mut guard = b.md.borrow_mut();
            let md = &mut *guard;
            for p in md
                .extent_pages
                .iter_mut()
                .chain(md.disk_extent_pages.iter_mut())
            {
                if pages.contains(p) {
                    *p = 0;
                }
            }
        }
        let m = b.shared.map();
        b.shared
            .replace_map(Arc::new(exclusive_map(&m, |d| !clusters.contains(&d))));
        delete_leaf(s, &b).await?;
    }
    Ok(())
}
