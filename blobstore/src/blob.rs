//! Blobs of the runtime store: create, open, close, resize, delete, xattrs, sync, and the metadata write
//! that all of them end in ([`persist`], SPDK's `blob_persist`), all on the metadata thread.
//!
//! A blob's metadata is changed in memory, then persisted in this order (each step waits for the previous):
//! 1. the super block is marked dirty, once after a load;
//! 2. extent pages whose content changed are written, **each to a fresh page** (SPDK rewrites the last one of
//!    a resized blob in place, before the chain that gives its new length: a crash in between leaves a page
//!    that disagrees with its table);
//! 3. the chain's pages after the first, to fresh pages;
//! 4. the first page, in place: the commit point;
//! 5. the pages the blob no longer uses are zeroed and released; clusters a shrink cut off are cleared (the
//!    blob's clear method) and released.
//!
//! A crash before 4 leaves the old metadata whole (the new pages are referenced by nothing); after 4, only
//! pages and clusters that nothing references. New cluster numbers reach the I/O path's map only after 4.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::exec::{join_all, AsyncMutex};
use crate::format::{
    BlobId, ClearMethod, Flags, MdPage, Xattr, DESCRIPTORS_LEN, DESC_HEADER_LEN, EXTENTS_PER_EP,
};
use crate::map::{BlobShared, ClusterMap, External};
use crate::runtime::{Blobstore, StoreInner};
use crate::serialize::{self, BlobMeta, Extents};
use crate::store::{Parent, Store};

/// Options of [`Blobstore::create_blob`] (`struct spdk_blob_opts`).
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Size in clusters.
    pub num_clusters: u64,
    /// Thin provisioned: clusters are allocated on first write.
    pub thin: bool,
    /// User xattrs, in order.
    pub xattrs: Vec<Xattr>,
    /// The clear method stored in the blob.
    pub clear_method: ClearMethod,
    /// Extent table format (SPDK's default); RLE otherwise.
    pub use_extent_table: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            num_clusters: 0,
            thin: false,
            xattrs: Vec::new(),
            clear_method: ClearMethod::Default,
            use_extent_table: true,
        }
    }
}

fn clear_bits(m: ClearMethod) -> u64 {
    match m {
        ClearMethod::Default => 0,
        ClearMethod::None => 1,
        ClearMethod::Unmap => 2,
        ClearMethod::WriteZeroes => 3,
    }
}

/// A blob's metadata in memory: what is on disk, and what changed since.
pub(crate) struct BlobMd {
    pub(crate) flags: Flags,
    pub(crate) xattrs: Vec<Xattr>,
    pub(crate) internal_xattrs: Vec<Xattr>,
    pub(crate) extent_table: bool,
    pub(crate) num_clusters: u64,
    /// Clusters changed since the last persist (blob cluster -> device cluster), not yet in the shared map.
    pub(crate) staged: BTreeMap<u64, u32>,
    /// Extent page of each slot (0 = none).
    pub(crate) extent_pages: Vec<u32>,
    /// Slots whose extent page content changed (a resize moved their end, or they are new).
    pub(crate) dirty_slots: BTreeSet<u64>,
    /// The chain on disk.
    pub(crate) chain: Vec<u32>,
    /// The extent pages on disk, per slot.
    pub(crate) disk_extent_pages: Vec<u32>,
    /// Changes not on disk.
    pub(crate) dirty: bool,
    /// Clusters a shrink cut off: cleared and released once the shorter metadata is on disk.
    pub(crate) cut_clusters: Vec<u32>,
    /// Extent pages of slots a shrink cut off: zeroed and released likewise.
    pub(crate) cut_pages: Vec<u32>,
    /// The parent snapshot.
    pub(crate) parent: Option<BlobId>,
}

impl BlobMd {
    /// The value of internal xattr `name`.
    pub(crate) fn internal(&self, name: &str) -> Option<&[u8]> {
        self.internal_xattrs
            .iter()
            .find(|x| x.name == name.as_bytes())
            .map(|x| x.value.as_slice())
    }

    /// Sets internal xattr `name` (SPDK's `blob_set_xattr(.., internal = true)`: the INTERNAL_XATTR flag
    /// goes with it).
    pub(crate) fn set_internal(&mut self, name: &str, value: Vec<u8>) {
        match self
            .internal_xattrs
            .iter_mut()
            .find(|x| x.name == name.as_bytes())
        {
            Some(x) => x.value = value,
            None => self.internal_xattrs.push(Xattr::new(name, value)),
        }
        self.flags.invalid |= Flags::INTERNAL_XATTR;
        self.dirty = true;
    }

    /// Removes internal xattr `name` if present; the flag goes with the last one.
    pub(crate) fn remove_internal(&mut self, name: &str) {
        let before = self.internal_xattrs.len();
        self.internal_xattrs.retain(|x| x.name != name.as_bytes());
        if self.internal_xattrs.is_empty() {
            self.flags.invalid &= !Flags::INTERNAL_XATTR;
        }
        if self.internal_xattrs.len() != before {
            self.dirty = true;
        }
    }

    /// The external snapshot's id (`EXTSNAP`), if an esnap clone.
    pub(crate) fn external_id(&self) -> Option<Vec<u8>> {
        if !self.flags.esnap() {
            return None;
        }
        self.internal(crate::store::XATTR_EXTERNAL_SNAPSHOT_ID)
            .map(<[u8]>::to_vec)
    }

    /// Makes the blob an esnap clone of `id` (`EXTSNAP` and the EXTERNAL_SNAPSHOT flag), or no longer one.
    pub(crate) fn set_external(&mut self, id: Option<Vec<u8>>) {
        match id {
            Some(v) => {
                self.set_internal(crate::store::XATTR_EXTERNAL_SNAPSHOT_ID, v);
                self.flags.invalid |= Flags::EXTERNAL_SNAPSHOT;
            }
            None => {
                self.remove_internal(crate::store::XATTR_EXTERNAL_SNAPSHOT_ID);
                self.flags.invalid &= !Flags::EXTERNAL_SNAPSHOT;
            }
        }
        self.dirty = true;
    }

    /// Sets or removes the `SNAP` xattr and the parent (SPDK: a blob without a parent has no `SNAP`).
    pub(crate) fn set_parent(&mut self, parent: Option<BlobId>) {
        match parent {
            Some(p) => self.set_internal(crate::store::XATTR_SNAPSHOT, p.0.to_le_bytes().to_vec()),
            None => self.remove_internal(crate::store::XATTR_SNAPSHOT),
        }
        self.parent = parent;
        self.dirty = true;
    }
}

/// One blob of the store (open or not).
pub(crate) struct BlobState {
    pub(crate) id: BlobId,
    pub(crate) md: RefCell<BlobMd>,
    /// Serializes this blob's metadata operations (SPDK queues a blob's persists).
    pub(crate) lock: AsyncMutex,
    pub(crate) shared: Arc<BlobShared>,
    pub(crate) open_ref: Cell<u32>,
    /// Clusters being allocated on first write, with who waits for each.
    pub(crate) alloc: RefCell<crate::allocate::AllocQueue>,
    /// Clusters an unmap covered, to give back.
    pub(crate) release: RefCell<crate::release::ReleaseQueue>,
    /// A write of the first page failed: what is on disk is unknown, so nothing this blob claimed is given
    /// back (a leak until the next load rebuilds the masks, never a cluster owned twice).
    pub(crate) uncertain: Cell<bool>,
}

impl BlobState {
    /// A blob of store `s` with metadata `md`, its I/O path reading `map` (data read-only: `read_only`).
    fn new(
        s: &StoreInner,
        id: BlobId,
        md: BlobMd,
        map: Arc<ClusterMap>,
        read_only: bool,
    ) -> Rc<BlobState> {
        Rc::new(BlobState {
            id,
            md: RefCell::new(md),
            lock: AsyncMutex::default(),
            shared: Arc::new(BlobShared::new(
                id,
                map,
                s.id,
                s.md_thread.clone(),
                s.cluster_size / s.block_size,
                read_only,
            )),
            open_ref: Cell::new(0),
            alloc: RefCell::new(Default::default()),
            release: RefCell::new(Default::default()),
            uncertain: Cell::new(false),
        })
    }
}

/// The device cluster of blob cluster `c` as the metadata will say once persisted: staged, else in `map`
/// (the blob's published map).
pub(crate) fn cluster_of(md: &BlobMd, map: &ClusterMap, c: u64) -> u32 {
    match md.staged.get(&c) {
        Some(&d) => d,
        None => map.get(c),
    }
}

/// An open blob (`struct spdk_blob *`). Close it with [`BlobHandle::close`], which persists what changed.
pub struct BlobHandle {
    store: Blobstore,
    pub(crate) state: Rc<BlobState>,
    closed: Cell<bool>,
}

impl std::fmt::Debug for BlobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobHandle({})", self.state.id)
    }
}

impl Drop for BlobHandle {
    fn drop(&mut self) {
        if !self.closed.get() {
            // Not closed: the reference goes, changes not synced stay in memory until the next persist.
            let n = self.state.open_ref.get();
            self.state.open_ref.set(n.saturating_sub(1));
        }
    }
}

fn xattr_check(name: &str, value: &[u8]) -> Result<()> {
    // SPDK: the descriptor (9 bytes of header and lengths, name, value) must fit one page; no empty value.
    if DESC_HEADER_LEN + 4 + name.len() + value.len() > DESCRIPTORS_LEN {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "xattr {name} of {} bytes does not fit a metadata page",
                value.len()
            ),
        ));
    }
    if value.is_empty() {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("xattr {name} has no value"),
        ));
    }
    Ok(())
}

impl Blobstore {
    /// Creates a blob (`spdk_bs_create_blob_ext`): its first metadata page (the lowest free one) fixes its id;
    /// a thick blob gets its clusters (lowest first) and extent pages now. Returns once it is on disk.
    pub async fn create_blob(&self, o: CreateOptions) -> Result<BlobId> {
        self.create_with(o, None, Vec::new(), None).await
    }

    /// Creates an esnap clone (`spdk_bs_create_blob_ext` with `esnap_id`): a thin blob that reads `external`
    /// where it has no cluster (internal xattr `EXTSNAP`, flag EXTERNAL_SNAPSHOT). `o.thin` is implied.
    pub async fn create_esnap_clone(
        &self,
        external: Arc<External>,
        o: CreateOptions,
    ) -> Result<BlobId> {
        let internal = vec![Xattr::new(
            crate::store::XATTR_EXTERNAL_SNAPSHOT_ID,
            external.id.clone(),
        )];
        let id = self
            .create_with(
                CreateOptions { thin: true, ..o },
                None,
                internal,
                Some(external.clone()),
            )
            .await?;
        self.0.externals.borrow_mut().push(external);
        Ok(id)
    }

    /// The external snapshots of the store's esnap clones (to give them their devices).
    pub fn externals(&self) -> Vec<Arc<External>> {
        self.0.externals.borrow().clone()
    }

    /// Creates a blob as [`Blobstore::create_blob`] does, a clone of `parent` if given (internal xattr
    /// `SNAP`), with `internal` added to its internal xattrs.
    pub(crate) async fn create_with(
        &self,
        o: CreateOptions,
        parent: Option<Rc<BlobState>>,
        internal: Vec<Xattr>,
        external: Option<Arc<External>>,
    ) -> Result<BlobId> {
        let s = &self.0;
        s.check_loaded()?;
        for x in &o.xattrs {
            xattr_check(&String::from_utf8_lossy(&x.name), &x.value)?;
        }
        let root = s.claim_md_page(0)?;
        s.masks.borrow_mut().used_blobids.set(root as u64);
        let id = BlobId::from_page(root);
        let mut flags = Flags {
            md_ro: clear_bits(o.clear_method),
            ..Default::default()
        };
        if o.use_extent_table {
            flags.invalid |= Flags::EXTENT_TABLE;
        }
        if o.thin {
            flags.invalid |= Flags::THIN_PROV;
        }
        if external.is_some() {
            flags.invalid |= Flags::EXTERNAL_SNAPSHOT;
        }
        let mut internal_xattrs = Vec::new();
        if let Some(p) = &parent {
            internal_xattrs.push(Xattr::new(
                crate::store::XATTR_SNAPSHOT,
                p.id.0.to_le_bytes().to_vec(),
            ));
        }
        internal_xattrs.extend(internal);
        if !internal_xattrs.is_empty() {
            flags.invalid |= Flags::INTERNAL_XATTR;
        }
        let map = Arc::new(match external {
            Some(x) => ClusterMap::new_external(0, x),
            None => ClusterMap::new(0, parent.as_ref().map(|p| p.shared.map())),
        });
        let state = BlobState::new(
            s,
            id,
            BlobMd {
                flags,
                xattrs: o.xattrs,
                internal_xattrs,
                extent_table: o.use_extent_table,
                num_clusters: 0,
                staged: BTreeMap::new(),
                extent_pages: Vec::new(),
                dirty_slots: BTreeSet::new(),
                chain: Vec::new(),
                disk_extent_pages: Vec::new(),
                dirty: true,
                cut_clusters: Vec::new(),
                cut_pages: Vec::new(),
                parent: parent.as_ref().map(|p| p.id),
            },
            map,
            false,
        );
        let res = async {
            let _g = state.lock.lock().await;
            resize_md(s, &state, o.num_clusters)?;
            persist(s, &state).await
        }
        .await;
        if let Err(e) = res {
            if state.uncertain.get() {
                return Err(e.context(format!("creating blob {id}")));
            }
            // Nothing on disk names the blob: give back what it claimed.
            let md = state.md.borrow();
            for &d in md.staged.values() {
                s.release_cluster(d);
            }
            for &p in md.extent_pages.iter().filter(|&&p| p != 0) {
                s.release_md_page(p);
            }
            s.release_md_page(root);
            s.masks.borrow_mut().used_blobids.clear(root as u64);
            return Err(e.context(format!("creating blob {id}")));
        }
        s.blobs.borrow_mut().insert(id, state);
        Ok(id)
    }

    /// Creates a clone of the read-only blob `snapshot` (`spdk_bs_create_clone`): a thin blob of the same
    /// size whose unallocated clusters read from it (internal xattr `SNAP`); first writes copy the snapshot's
    /// cluster.
    pub async fn create_clone(&self, snapshot: BlobId, xattrs: Vec<Xattr>) -> Result<BlobId> {
        let s = &self.0;
        s.check_loaded()?;
        let parent = s
            .blobs
            .borrow()
            .get(&snapshot)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::NoEntry, format!("no blob {snapshot}")))?;
        let (n, extent_table) = {
            let md = parent.md.borrow();
            if !md.flags.data_ro() || md.dirty {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!("blob {snapshot} is not a read-only blob on disk: cannot clone it"),
                ));
            }
            (md.num_clusters, md.extent_table)
        };
        self.create_with(
            CreateOptions {
                num_clusters: n,
                thin: true,
                xattrs,
                use_extent_table: extent_table,
                ..Default::default()
            },
            Some(parent),
            Vec::new(),
            None,
        )
        .await
    }

    /// The clones of blob `id` (blobs whose parent snapshot it is), ascending.
    pub fn clones_of(&self, id: BlobId) -> Vec<BlobId> {
        self.0
            .blobs
            .borrow()
            .values()
            .filter(|b| b.md.borrow().parent == Some(id))
            .map(|b| b.id)
            .collect()
    }

    /// Opens a blob (`spdk_bs_open_blob`); every open needs a close.
    pub async fn open_blob(&self, id: BlobId) -> Result<BlobHandle> {
        let s = &self.0;
        s.check_loaded()?;
        let state = s.blobs.borrow().get(&id).cloned().ok_or_else(|| {
            match s.broken.borrow().iter().find(|(b, _)| *b == id) {
                Some((_, why)) => Error::corrupt(format!("blob {id} does not load: {why}")),
                None => Error::new(ErrorKind::NoEntry, format!("no blob {id}")),
            }
        })?;
        state.open_ref.set(state.open_ref.get() + 1);
        Ok(BlobHandle {
            store: self.clone(),
            state,
            closed: Cell::new(false),
        })
    }

    /// Deletes a closed blob (`spdk_bs_delete_blob`): its first page is zeroed first (after that the blob is
    /// gone for any load), then its other pages, then its clusters are cleared and everything is released.
    /// A snapshot with one clone is first merged into it (the clone takes its clusters and its parent, as
    /// SPDK's snapshot deletion); a snapshot with more clones cannot be deleted (Busy).
    pub async fn delete_blob(&self, id: BlobId) -> Result<()> {
        let s = &self.0;
        s.check_loaded()?;
        let state = s.blob(id)?;
        if state.open_ref.get() > 0 {
            return Err(Error::new(ErrorKind::Busy, format!("blob {id} is open")));
        }
        let clones = self.clones_of(id);
        match clones.len() {
            0 => {}
            1 => crate::snapshot::merge_into_clone(s, &state, clones[0]).await?,
            n => {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("blob {id} is a snapshot with {n} clones"),
                ))
            }
        }
        delete_leaf(s, &state).await
    }
}

/// Deletes blob `state`, which nothing names as its parent: its first page is zeroed first (the commit), then
/// the pages and clusters its metadata and map list are cleared and released.
pub(crate) async fn delete_leaf(s: &StoreInner, state: &Rc<BlobState>) -> Result<()> {
    let id = state.id;
    {
        let _g = state.lock.lock().await;
        if !s.blobs.borrow().contains_key(&id) {
            return Err(Error::new(ErrorKind::NoEntry, format!("no blob {id}")));
        }
        s.mark_dirty().await?;
        let root = id.page();
        s.zero_md_page(root).await?;
        // Committed: the blob no longer exists on disk.
        s.blobs.borrow_mut().remove(&id);
        s.masks.borrow_mut().used_blobids.clear(root as u64);
        let (pages, clusters, clear) = {
            let md = state.md.borrow();
            let mut pages: Vec<u32> = md.chain.iter().skip(1).copied().collect();
            pages.extend(md.extent_pages.iter().copied().filter(|&p| p != 0));
            pages.extend(md.disk_extent_pages.iter().copied().filter(|&p| p != 0));
            pages.extend(md.cut_pages.iter().copied());
            pages.sort_unstable();
            pages.dedup();
            let mut clusters: Vec<u32> = state
                .shared
                .map()
                .allocated_clusters()
                .into_iter()
                .map(|(_, d)| d)
                .collect();
            clusters.extend(md.staged.values().copied().filter(|&d| d != 0));
            clusters.extend(md.cut_clusters.iter().copied());
            clusters.sort_unstable();
            clusters.dedup();
            (pages, clusters, md.flags.clear_method())
        };
        cleanup(s, &pages, &clusters, clear).await;
        s.release_md_page(root);
    }
    Ok(())
}

/// Zeroes and releases metadata pages nothing references any more, then clears and releases clusters.
/// Failures are logged, not returned: what is cleaned up here is already unreferenced on disk.
pub(crate) async fn cleanup(s: &StoreInner, pages: &[u32], clusters: &[u32], clear: ClearMethod) {
    let zeroes: Vec<_> = pages.iter().map(|&p| s.zero_md_page(p)).collect();
    for r in join_all(zeroes).await {
        if let Err(e) = r {
            log::warn!("blobstore: {e}");
        }
    }
    for &p in pages {
        s.release_md_page(p);
    }
    let runs = cluster_runs(clusters);
    let clears: Vec<_> = runs
        .iter()
        .map(|&(c, n)| {
            let off = s.cluster_offset(c);
            let len = n as u64 * s.cluster_size;
            async move {
                match clear {
                    ClearMethod::Default | ClearMethod::Unmap => s.base.unmap(off, len).await,
                    ClearMethod::WriteZeroes => s.base.write_zeroes(off, len).await,
                    ClearMethod::None => Ok(()),
                }
            }
        })
        .collect();
    for r in join_all(clears).await {
        if let Err(e) = r {
            log::warn!("blobstore: clearing released clusters: {e}");
        }
    }
    for &c in clusters {
        s.release_cluster(c);
    }
}

/// Sorted clusters as (first, count) runs of consecutive ones (one clear per run, as SPDK batches them).
fn cluster_runs(sorted: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &c in sorted {
        match out.last_mut() {
            Some((f, n)) if *f + *n == c => *n += 1,
            _ => out.push((c, 1)),
        }
    }
    out
}

/// Changes the blob's size in memory (`blob_resize`): a thick blob gets its new clusters (lowest first) and
/// the extent pages of new slots (lowest first from page 1: an extent page is never page 0, which means
/// "none" in a table); a shrink sets aside what it cuts off, released after the next persist.
pub(crate) fn resize_md(s: &StoreInner, b: &BlobState, n: u64) -> Result<()> {
    let mut md = b.md.borrow_mut();
    let old = md.num_clusters;
    if n == old {
        return Ok(());
    }
    if md.flags.md_ro() {
        return Err(Error::new(
            ErrorKind::NotPermitted,
            format!("blob {} is read-only", b.id),
        ));
    }
    let thin = md.flags.thin();
    let new_slots = serialize::slots(n);
    if n > old {
        let old_slots = md.extent_pages.len() as u64;
        if !thin {
            if n - old > s.free_clusters() {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!("{} clusters needed, {} free", n - old, s.free_clusters()),
                ));
            }
            let new_eps = if md.extent_table {
                new_slots - old_slots
            } else {
                0
            };
            if !s.has_free_md_pages(1, new_eps) {
                return Err(Error::new(ErrorKind::NoSpace, "no free metadata page"));
            }
        }
        if md.extent_table {
            md.extent_pages.resize(new_slots as usize, 0);
            // The last slot's page gets more entries; a thick blob's new slots get pages. A thin blob's new
            // slots have nothing allocated, so no page (a huge thin blob costs nothing here).
            let last = old / EXTENTS_PER_EP;
            if !old.is_multiple_of(EXTENTS_PER_EP) && md.extent_pages[last as usize] != 0 {
                md.dirty_slots.insert(last);
            }
            if !thin {
                for sl in old_slots..new_slots {
                    md.dirty_slots.insert(sl);
                }
            }
        }
        if !thin {
            for c in old..n {
                let d = s.claim_cluster()?;
                md.staged.insert(c, d);
                let slot = (c / EXTENTS_PER_EP) as usize;
                if md.extent_table && md.extent_pages[slot] == 0 {
                    md.extent_pages[slot] = s.claim_md_page(1)?;
                }
            }
        }
    } else {
        // What is cut off: published clusters past the new end (not overridden by a staged change), and
        // staged ones; visiting allocated clusters only, so that shrinking a huge thin blob costs little.
        let map = b.shared.map();
        let mut cut: Vec<u32> = map
            .allocated_clusters()
            .into_iter()
            .filter(|&(c, _)| c >= n && !md.staged.contains_key(&c))
            .map(|(_, d)| d)
            .collect();
        let staged_cut: Vec<u64> = md.staged.range(n..).map(|(&c, _)| c).collect();
        for c in staged_cut {
            if let Some(d) = md.staged.remove(&c) {
                if d != 0 {
                    cut.push(d);
                }
            }
        }
        md.cut_clusters.extend(cut);
        if md.extent_table {
            let cut: Vec<u32> = md.extent_pages[new_slots as usize..]
                .iter()
                .copied()
                .filter(|&p| p != 0)
                .collect();
            md.cut_pages.extend(cut);
            md.extent_pages.truncate(new_slots as usize);
            md.dirty_slots.retain(|&sl| sl < new_slots);
            let last = n / EXTENTS_PER_EP;
            if !n.is_multiple_of(EXTENTS_PER_EP) && md.extent_pages[last as usize] != 0 {
                md.dirty_slots.insert(last);
            }
        }
    }
    md.num_clusters = n;
    md.dirty = true;
    Ok(())
}

/// Writes the blob's metadata (`blob_persist`), in the order described at the top of this module. The
/// caller holds the blob's lock.
pub(crate) async fn persist(s: &StoreInner, b: &BlobState) -> Result<()> {
    if !b.md.borrow().dirty {
        return Ok(());
    }
    s.mark_dirty().await?;
    // Plan the pages (claims in memory), with no borrow held across a write.
    let mut claimed: Vec<u32> = Vec::new();
    let plan = plan_pages(s, b, &mut claimed);
    let (ep_writes, chain_pages, chain, new_eps, replaced) = match plan {
        Ok(p) => p,
        Err(e) => {
            for p in claimed {
                s.release_md_page(p);
            }
            return Err(e);
        }
    };
    let root_tried = Cell::new(false);
    let written = async {
        let w: Vec<_> = ep_writes
            .iter()
            .map(|(p, page)| s.write_md_page(*p, page))
            .collect();
        join_all(w).await.into_iter().collect::<Result<Vec<()>>>()?;
        let w: Vec<_> = chain_pages
            .iter()
            .zip(&chain)
            .skip(1)
            .map(|(page, &p)| s.write_md_page(p, page))
            .collect();
        join_all(w).await.into_iter().collect::<Result<Vec<()>>>()?;
        root_tried.set(true);
        s.write_md_page(chain[0], &chain_pages[0]).await
    }
    .await;
    if let Err(e) = written {
        if root_tried.get() {
            // The first page may or may not be on disk: keep every page either version could name.
            b.uncertain.set(true);
        } else {
            // Nothing on disk names the new pages.
            for p in claimed {
                s.release_md_page(p);
            }
        }
        return Err(e.context(format!("persisting blob {}", b.id)));
    }
    // Committed. Bring memory in line and publish the new map to the I/O path.
    let (old_pages, cut_clusters, clear) = {
        let mut md = b.md.borrow_mut();
        let mut old: Vec<u32> = md.chain.iter().skip(1).copied().collect();
        old.extend(replaced);
        old.append(&mut md.cut_pages);
        md.chain = chain;
        md.extent_pages = new_eps.clone();
        md.disk_extent_pages = new_eps;
        md.dirty_slots.clear();
        md.dirty = false;
        let staged = std::mem::take(&mut md.staged);
        publish(b, md.num_clusters, &staged);
        if md.flags.data_ro() {
            b.shared.set_read_only();
        }
        b.shared.set_thin(md.flags.thin());
        let cut = std::mem::take(&mut md.cut_clusters);
        (old, cut, md.flags.clear_method())
    };
    let mut cut = cut_clusters;
    cut.sort_unstable();
    cleanup(s, &old_pages, &cut, clear).await;
    Ok(())
}

type Plan = (
    Vec<(u32, MdPage)>,
    Vec<MdPage>,
    Vec<u32>,
    Vec<u32>,
    Vec<u32>,
);

/// The pages a persist writes: (extent page writes, chain pages, their md pages, the new extent page per
/// slot, extent pages replaced by fresh copies). Every page claimed is pushed to `claimed`.
fn plan_pages(s: &StoreInner, b: &BlobState, claimed: &mut Vec<u32>) -> Result<Plan> {
    let md = b.md.borrow();
    let map = b.shared.map();
    let mut eps = md.extent_pages.clone();
    let mut ep_writes = Vec::new();
    let mut replaced = Vec::new();
    if md.extent_table {
        for &slot in &md.dirty_slots {
            let i = slot as usize;
            if i >= eps.len() {
                continue;
            }
            let start = slot * EXTENTS_PER_EP;
            let n = md.num_clusters.saturating_sub(start).min(EXTENTS_PER_EP);
            let entries: Vec<u32> = (start..start + n)
                .map(|c| cluster_of(&md, &map, c))
                .collect();
            if eps[i] == 0 && entries.iter().all(|&d| d == 0) {
                continue;
            }
            let on_disk = eps[i] != 0 && md.disk_extent_pages.get(i) == Some(&eps[i]);
            if eps[i] == 0 || on_disk {
                let p = s.claim_md_page(1)?;
                claimed.push(p);
                if on_disk {
                    replaced.push(eps[i]);
                }
                eps[i] = p;
            }
            ep_writes.push((eps[i], serialize::extent_page(b.id, slot, entries)));
        }
    }
    let runs;
    let extents = if md.extent_table {
        Extents::Table {
            num_clusters: md.num_clusters,
            pages: &eps,
        }
    } else {
        runs = serialize::rle_runs(md.num_clusters, |c| cluster_of(&md, &map, c));
        Extents::Rle(&runs)
    };
    let mut pages = serialize::serialize(&BlobMeta {
        id: b.id,
        flags: md.flags,
        xattrs: &md.xattrs,
        internal_xattrs: &md.internal_xattrs,
        extents,
    })?;
    // Pages after the first: the lowest free ones (SPDK searches from page 0).
    let mut chain = vec![b.id.page()];
    for _ in 1..pages.len() {
        let p = s.claim_md_page(0)?;
        claimed.push(p);
        chain.push(p);
    }
    for i in 0..pages.len() - 1 {
        pages[i].next = chain[i + 1];
    }
    Ok((ep_writes, pages, chain, eps, replaced))
}

/// Puts persisted clusters into the map the I/O path reads: a new map when the size changed (entries a
/// shrink cut off are cleared first), the staged entries set before the new map is published.
fn publish(b: &BlobState, num_clusters: u64, staged: &BTreeMap<u64, u32>) {
    let cur = b.shared.map();
    if cur.num_clusters() == num_clusters {
        for (&c, &d) in staged {
            cur.set(c, d);
        }
        return;
    }
    if num_clusters < cur.num_clusters() {
        cur.clear_from(num_clusters);
    }
    let m = cur.resized(num_clusters);
    for (&c, &d) in staged {
        m.set(c, d);
    }
    b.shared.replace_map(Arc::new(m));
}

impl BlobHandle {
    /// The blob's id.
    pub fn id(&self) -> BlobId {
        self.state.id
    }

    /// What its I/O channels share (the cluster map).
    pub fn shared(&self) -> Arc<BlobShared> {
        self.state.shared.clone()
    }

    /// The store.
    pub fn store(&self) -> &Blobstore {
        &self.store
    }

    /// Size in clusters.
    pub fn num_clusters(&self) -> u64 {
        self.state.md.borrow().num_clusters
    }

    /// Allocated clusters.
    pub fn num_allocated_clusters(&self) -> u64 {
        let md = self.state.md.borrow();
        let map = self.state.shared.map();
        let mut n = map.allocated();
        for (&c, &d) in &md.staged {
            match (map.get(c) != 0, d != 0) {
                (false, true) => n += 1,
                (true, false) => n -= 1,
                _ => {}
            }
        }
        n
    }

    /// Thin provisioned.
    pub fn is_thin(&self) -> bool {
        self.state.md.borrow().flags.thin()
    }

    /// Data read-only.
    pub fn is_read_only(&self) -> bool {
        self.state.md.borrow().flags.data_ro()
    }

    /// The flags.
    pub fn flags(&self) -> Flags {
        self.state.md.borrow().flags
    }

    /// The parent snapshot, if a clone.
    pub fn parent(&self) -> Option<BlobId> {
        self.state.md.borrow().parent
    }

    /// The external snapshot's id, if an esnap clone itself.
    pub fn external_id(&self) -> Option<Vec<u8>> {
        self.state.md.borrow().external_id()
    }

    /// Degraded (`spdk_blob_is_degraded`): the external snapshot at the root of its chain is missing.
    pub fn is_degraded(&self) -> bool {
        self.state
            .shared
            .map()
            .external()
            .is_some_and(|x| x.dev().is_none())
    }

    /// The value of user xattr `name`.
    pub fn xattr(&self, name: &str) -> Option<Vec<u8>> {
        let md = self.state.md.borrow();
        md.xattrs
            .iter()
            .find(|x| x.name == name.as_bytes())
            .map(|x| x.value.clone())
    }

    /// Names of the user xattrs, in order.
    pub fn xattr_names(&self) -> Vec<String> {
        let md = self.state.md.borrow();
        md.xattrs
            .iter()
            .map(|x| String::from_utf8_lossy(&x.name).into_owned())
            .collect()
    }

    fn check_md_writable(&self) -> Result<()> {
        if self.closed.get() {
            return Err(Error::new(ErrorKind::Invalid, "blob handle is closed"));
        }
        if self.state.md.borrow().flags.md_ro() {
            return Err(Error::new(
                ErrorKind::NotPermitted,
                format!("blob {} is read-only", self.state.id),
            ));
        }
        Ok(())
    }

    /// Sets user xattr `name` (`spdk_blob_set_xattr`): replaced in place if present, else appended. In
    /// memory until [`BlobHandle::sync`] or [`BlobHandle::close`].
    pub fn set_xattr(&self, name: &str, value: &[u8]) -> Result<()> {
        self.check_md_writable()?;
        xattr_check(name, value)?;
        let mut md = self.state.md.borrow_mut();
        match md.xattrs.iter_mut().find(|x| x.name == name.as_bytes()) {
            Some(x) => x.value = value.to_vec(),
            None => md.xattrs.push(Xattr::new(name, value)),
        }
        md.dirty = true;
        Ok(())
    }

    /// Removes user xattr `name` (`spdk_blob_remove_xattr`); NotFound if absent. In memory until synced.
    pub fn remove_xattr(&self, name: &str) -> Result<()> {
        self.check_md_writable()?;
        let mut md = self.state.md.borrow_mut();
        let before = md.xattrs.len();
        md.xattrs.retain(|x| x.name != name.as_bytes());
        if md.xattrs.len() == before {
            return Err(Error::new(
                ErrorKind::NoEntry,
                format!("blob {} has no xattr {name}", self.state.id),
            ));
        }
        md.dirty = true;
        Ok(())
    }

    /// Makes the blob's data read-only (`spdk_blob_set_read_only`); it takes effect (writes refused, metadata
    /// frozen) once synced, as in SPDK.
    pub fn set_read_only(&self) -> Result<()> {
        self.check_md_writable()?;
        let mut md = self.state.md.borrow_mut();
        md.flags.data_ro |= Flags::READ_ONLY;
        md.dirty = true;
        Ok(())
    }

    /// Writes what changed to disk (`spdk_blob_sync_md`).
    pub async fn sync(&self) -> Result<()> {
        if self.closed.get() {
            return Err(Error::new(ErrorKind::Invalid, "blob handle is closed"));
        }
        let s = &self.store.0;
        s.check_loaded()?;
        let _g = self.state.lock.lock().await;
        persist(s, &self.state).await
    }

    /// Resizes the blob to `n` clusters and writes the metadata (SPDK's `spdk_blob_resize` followed by
    /// `spdk_blob_sync_md`, as the lvol library always does). Growing a thick blob takes clusters now
    /// (NoSpace if there are not enough); shrinking releases them once the shorter metadata is on disk.
    pub async fn resize(&self, n: u64) -> Result<()> {
        self.check_md_writable()?;
        let s = &self.store.0;
        s.check_loaded()?;
        let _g = self.state.lock.lock().await;
        resize_md(s, &self.state, n)?;
        persist(s, &self.state).await
    }

    /// Closes the blob (`spdk_blob_close`): what changed is persisted first.
    pub async fn close(self) -> Result<()> {
        let s = &self.store.0;
        if !s.unloaded.get() {
            let _g = self.state.lock.lock().await;
            persist(s, &self.state).await?;
        }
        self.closed.set(true);
        let n = self.state.open_ref.get();
        self.state.open_ref.set(n.saturating_sub(1));
        Ok(())
    }
}

/// Builds the runtime blobs of a freshly loaded store from the loader's model: maps (parents first, so that a
/// clone's map reads through its snapshot's), extent pages, chains.
pub(crate) fn attach_loaded(bs: &Blobstore, store: &Store) -> Result<()> {
    let s = &bs.0;
    let mut maps: BTreeMap<BlobId, Arc<ClusterMap>> = BTreeMap::new();
    fn map_of(
        store: &Store,
        id: BlobId,
        maps: &mut BTreeMap<BlobId, Arc<ClusterMap>>,
        depth: usize,
    ) -> Option<Arc<ClusterMap>> {
        if let Some(m) = maps.get(&id) {
            return Some(m.clone());
        }
        let b = store.blobs.get(&id)?;
        let m = match b.parent() {
            Some(Parent::Snapshot(p)) if depth < store.blobs.len() => {
                ClusterMap::new(b.num_clusters, map_of(store, p, maps, depth + 1))
            }
            Some(Parent::External(x)) => {
                ClusterMap::new_external(b.num_clusters, Arc::new(External::new(x)))
            }
            _ => ClusterMap::new(b.num_clusters, None),
        };
        for &(c, d) in &b.clusters {
            m.set(c, d);
        }
        let m = Arc::new(m);
        maps.insert(id, m.clone());
        Some(m)
    }
    for (&id, b) in &store.blobs {
        let Some(map) = map_of(store, id, &mut maps, 0) else {
            continue;
        };
        let mut eps = vec![0u32; serialize::slots(b.num_clusters) as usize];
        for &(slot, p) in &b.extent_pages {
            if let Some(e) = eps.get_mut(slot as usize) {
                *e = p;
            }
        }
        let extent_table = b.flags.extent_table();
        let state = BlobState::new(
            s,
            id,
            BlobMd {
                flags: b.flags,
                xattrs: b.xattrs.clone(),
                internal_xattrs: b.internal_xattrs.clone(),
                extent_table,
                num_clusters: b.num_clusters,
                staged: BTreeMap::new(),
                extent_pages: if extent_table {
                    eps.clone()
                } else {
                    Vec::new()
                },
                dirty_slots: BTreeSet::new(),
                chain: b.md_pages.clone(),
                disk_extent_pages: if extent_table { eps } else { Vec::new() },
                dirty: false,
                cut_clusters: Vec::new(),
                cut_pages: Vec::new(),
                parent: b.parent_snapshot(),
            },
            map,
            b.read_only(),
        );
        state.shared.set_thin(b.flags.thin());
        if let Some(x) = state.shared.map().own_external() {
            s.externals.borrow_mut().push(x.clone());
        }
        s.blobs.borrow_mut().insert(id, state);
    }
    Ok(())
}
