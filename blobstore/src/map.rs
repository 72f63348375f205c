//! A blob's cluster map as the I/O path reads it from every thread: blob cluster -> device cluster (0 =
//! unallocated), read with one atomic load, no lock.
//!
//! The map is cut like the extent pages: one leaf of 512 entries per extent page slot, created when its
//! first cluster is allocated, so a huge thin blob costs 16 bytes per 512 clusters until written. Only the
//! metadata thread changes a map, and only after the metadata that names the cluster is on disk; a resize
//! builds a new map that shares the leaves of the old one (so an entry set through either is seen through
//! both) and bumps the blob's epoch, which each channel compares once per I/O to pick up the new map.
//!
//! A clone's map points at its parent snapshot's map. Snapshots are read-only, so a parent map never
//! changes size and its entries never change: the chain is walked without any synchronization beyond the
//! loads themselves.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::format::{BlobId, EXTENTS_PER_EP};

const LEAF: usize = EXTENTS_PER_EP as usize;

struct Leaf([AtomicU32; LEAF]);

impl Leaf {
    fn new() -> Leaf {
        Leaf(std::array::from_fn(|_| AtomicU32::new(0)))
    }
}

/// Blob cluster -> device cluster, readable from any thread.
pub struct ClusterMap {
    num_clusters: u64,
    leaves: Box<[OnceLock<Arc<Leaf>>]>,
    parent: Option<Arc<ClusterMap>>,
    /// An esnap clone's external snapshot (at the root of a chain only).
    external: Option<Arc<External>>,
}

/// The external snapshot of an esnap clone (SPDK's `esnap` bs_dev): a bdev the blob reads where neither it
/// nor its ancestors have a cluster. Found by its id (the bdev's uuid, as SPDK stores it); while it is not
/// there the blob is degraded.
pub struct External {
    /// The id in the blob's `EXTSNAP` xattr.
    pub id: Vec<u8>,
    dev: arc_swap::ArcSwapOption<ExternalDev>,
}

/// An external snapshot's device, opened read-only.
pub struct ExternalDev {
    /// Each I/O thread takes its channel from it.
    pub desc: bdev::Desc,
    /// Its size in blocks (of the store's block size).
    pub num_blocks: u64,
}

impl External {
    /// An external snapshot named `id`, not found yet.
    pub fn new(id: Vec<u8>) -> External {
        External {
            id,
            dev: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Its device, if present.
    #[inline]
    pub fn dev(&self) -> Option<Arc<ExternalDev>> {
        self.dev.load_full()
    }

    /// The device appeared (Some) or went (None).
    pub fn set_dev(&self, dev: Option<Arc<ExternalDev>>) {
        self.dev.store(dev);
    }

    /// The uuid in the id (a NUL-terminated uuid string), if it is one.
    pub fn uuid(&self) -> Option<uuid::Uuid> {
        let s = self.id.split(|&b| b == 0).next()?;
        std::str::from_utf8(s).ok()?.parse().ok()
    }
}

impl std::fmt::Debug for ClusterMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClusterMap({} clusters, {} allocated)",
            self.num_clusters,
            self.allocated()
        )
    }
}

impl ClusterMap {
    /// An empty (all unallocated) map of `num_clusters`, reading through to `parent` where unallocated.
    pub fn new(num_clusters: u64, parent: Option<Arc<ClusterMap>>) -> ClusterMap {
        let slots = num_clusters.div_ceil(LEAF as u64) as usize;
        ClusterMap {
            num_clusters,
            leaves: (0..slots).map(|_| OnceLock::new()).collect(),
            parent,
            external: None,
        }
    }

    /// An empty map of an esnap clone, reading `external` where unallocated.
    pub fn new_external(num_clusters: u64, external: Arc<External>) -> ClusterMap {
        ClusterMap {
            external: Some(external),
            ..ClusterMap::new(num_clusters, None)
        }
    }

    /// The external snapshot at the root of the chain, if any.
    #[inline]
    pub fn external(&self) -> Option<&Arc<External>> {
        let mut m = self;
        while let Some(p) = m.parent.as_deref() {
            m = p;
        }
        m.external.as_ref()
    }

    /// Size in clusters.
    #[inline]
    pub fn num_clusters(&self) -> u64 {
        self.num_clusters
    }

    /// The parent's map, if the blob is a clone.
    pub fn parent(&self) -> Option<&Arc<ClusterMap>> {
        self.parent.as_ref()
    }

    /// The device cluster of blob cluster `c` in this blob only (0: unallocated or out of range).
    #[inline]
    pub fn get(&self, c: u64) -> u32 {
        if c >= self.num_clusters {
            return 0;
        }
        match self.leaves[(c / LEAF as u64) as usize].get() {
            Some(l) => l.0[(c % LEAF as u64) as usize].load(Ordering::Acquire),
            None => 0,
        }
    }

    /// Where blob cluster `c` reads from: this blob's cluster, else the nearest ancestor's that has one;
    /// `None` when nothing in the chain has it (it reads as zeroes).
    #[inline]
    pub fn lookup(&self, c: u64) -> Option<u32> {
        let mut m = self;
        loop {
            let d = m.get(c);
            if d != 0 {
                return Some(d);
            }
            m = m.parent.as_deref()?;
        }
    }

    /// Sets blob cluster `c` (in range). Metadata thread only, once the metadata naming it is on disk.
    pub fn set(&self, c: u64, dev_cluster: u32) {
        if c >= self.num_clusters {
            return;
        }
        let slot = &self.leaves[(c / LEAF as u64) as usize];
        if dev_cluster == 0 && slot.get().is_none() {
            return;
        }
        let leaf = slot.get_or_init(|| Arc::new(Leaf::new()));
        leaf.0[(c % LEAF as u64) as usize].store(dev_cluster, Ordering::Release);
    }

    /// Clears every entry from blob cluster `from` on (visiting only the leaves that exist). Metadata thread
    /// only, once the metadata no longer names them.
    pub fn clear_from(&self, from: u64) {
        let first_slot = (from / LEAF as u64) as usize;
        for (s, leaf) in self.leaves.iter().enumerate().skip(first_slot) {
            let Some(l) = leaf.get() else { continue };
            for (i, e) in l.0.iter().enumerate() {
                if (s * LEAF + i) as u64 >= from {
                    e.store(0, Ordering::Release);
                }
            }
        }
    }

    /// A map of `num_clusters` sharing this one's leaves (entries past the new size are the caller's to
    /// clear before a shrink is published) and parent.
    pub fn resized(&self, num_clusters: u64) -> ClusterMap {
        self.rebuilt(num_clusters, self.parent.clone(), self.external.clone())
    }

    /// The same entries (shared leaves) reading through to another parent (or external snapshot): the map of
    /// a blob whose parent changed (decoupled, inflated, its snapshot merged into it, set_parent). The old map
    /// must not be set again.
    pub fn reparented(
        &self,
        parent: Option<Arc<ClusterMap>>,
        external: Option<Arc<External>>,
    ) -> ClusterMap {
        self.rebuilt(self.num_clusters, parent, external)
    }

    /// This map's own external snapshot (not an ancestor's).
    pub fn own_external(&self) -> Option<&Arc<External>> {
        self.external.as_ref()
    }

    fn rebuilt(
        &self,
        num_clusters: u64,
        parent: Option<Arc<ClusterMap>>,
        external: Option<Arc<External>>,
    ) -> ClusterMap {
        let slots = num_clusters.div_ceil(LEAF as u64) as usize;
        let leaves = (0..slots)
            .map(|i| {
                let l = OnceLock::new();
                if let Some(a) = self.leaves.get(i).and_then(|s| s.get()) {
                    let _ = l.set(a.clone());
                }
                l
            })
            .collect();
        ClusterMap {
            num_clusters,
            leaves,
            parent,
            external,
        }
    }

    /// The allocated clusters of extent page slot `slot` (its entries, `min(512, rest)` of them).
    pub fn slot_entries(&self, slot: u64) -> Vec<u32> {
        let start = slot * LEAF as u64;
        let n = self.num_clusters.saturating_sub(start).min(LEAF as u64);
        (start..start + n).map(|c| self.get(c)).collect()
    }

    /// Whether any cluster of slot `slot` is allocated.
    pub fn slot_allocated(&self, slot: u64) -> bool {
        match self.leaves.get(slot as usize).and_then(|s| s.get()) {
            Some(l) => l.0.iter().any(|e| e.load(Ordering::Acquire) != 0),
            None => false,
        }
    }

    /// (blob cluster, device cluster) of every allocated cluster, ascending.
    pub fn allocated_clusters(&self) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        for (s, leaf) in self.leaves.iter().enumerate() {
            let Some(l) = leaf.get() else { continue };
            for (i, e) in l.0.iter().enumerate() {
                let c = (s * LEAF + i) as u64;
                let d = e.load(Ordering::Acquire);
                if d != 0 && c < self.num_clusters {
                    out.push((c, d));
                }
            }
        }
        out
    }

    /// Number of allocated clusters.
    pub fn allocated(&self) -> u64 {
        self.allocated_clusters().len() as u64
    }
}

/// What every thread's channel of a blob shares: the current map, behind an epoch.
pub struct BlobShared {
    /// The blob.
    pub id: BlobId,
    /// Bumped (after the new map is in place) whenever the map is replaced.
    epoch: AtomicU64,
    map: Mutex<Arc<ClusterMap>>,
    /// The store the blob belongs to (for allocation requests to the metadata thread).
    pub(crate) store_id: u64,
    /// The metadata thread.
    pub(crate) md_thread: reactor::ThreadHandle,
    /// Blocks per cluster.
    pub cluster_blocks: u64,
    /// Data read-only (snapshots): writes fail with EPERM.
    read_only: std::sync::atomic::AtomicBool,
    /// Thin provisioned: an unmap of a whole allocated cluster gives it back ([`crate::release`]).
    thin: std::sync::atomic::AtomicBool,
    /// The bdev over the blob, whose I/O a release waits for (none: no I/O to wait for).
    bdev_name: Mutex<Option<String>>,
}

impl std::fmt::Debug for BlobShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobShared({})", self.id)
    }
}

impl BlobShared {
    pub(crate) fn new(
        id: BlobId,
        map: Arc<ClusterMap>,
        store_id: u64,
        md_thread: reactor::ThreadHandle,
        cluster_blocks: u64,
        read_only: bool,
    ) -> BlobShared {
        BlobShared {
            id,
            epoch: AtomicU64::new(1),
            map: Mutex::new(map),
            store_id,
            md_thread,
            cluster_blocks,
            read_only: std::sync::atomic::AtomicBool::new(read_only),
            thin: std::sync::atomic::AtomicBool::new(false),
            bdev_name: Mutex::new(None),
        }
    }

    /// Whether the blob is thin provisioned (as last persisted).
    #[inline]
    pub fn thin(&self) -> bool {
        self.thin.load(Ordering::Relaxed)
    }

    pub(crate) fn set_thin(&self, thin: bool) {
        self.thin.store(thin, Ordering::Relaxed);
    }

    /// The bdev registered over the blob, if any.
    pub fn bdev_name(&self) -> Option<String> {
        self.bdev_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_bdev_name(&self, name: Option<String>) {
        *self.bdev_name.lock().unwrap_or_else(|e| e.into_inner()) = name;
    }

    /// Whether the blob's data is read-only (writes fail with EPERM).
    #[inline]
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Relaxed)
    }

    pub(crate) fn set_read_only(&self) {
        self.read_only.store(true, Ordering::Relaxed);
    }

    /// The epoch of the current map (one atomic load: the I/O path's only shared read besides the map).
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The current map (takes a lock: call it when the epoch changed, not per I/O).
    pub fn map(&self) -> Arc<ClusterMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Publishes a new map. Metadata thread only.
    pub(crate) fn replace_map(&self, m: Arc<ClusterMap>) {
        *self.map.lock().unwrap_or_else(|e| e.into_inner()) = m;
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Size in clusters.
    pub fn num_clusters(&self) -> u64 {
        self.map().num_clusters()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_shared_across_resizes_and_parents_read_through() {
        let parent = Arc::new(ClusterMap::new(2000, None));
        parent.set(5, 50);
        parent.set(1500, 150);
        let m = ClusterMap::new(2000, Some(parent.clone()));
        assert_eq!(m.lookup(5), Some(50));
        assert_eq!(m.get(5), 0);
        m.set(5, 7);
        assert_eq!(m.lookup(5), Some(7));
        assert_eq!(m.lookup(6), None);
        m.set(600, 9);
        let bigger = m.resized(5000);
        m.set(100, 8);
        assert_eq!(bigger.get(100), 8, "leaf shared");
        bigger.set(4000, 11);
        assert_eq!(m.get(4000), 0, "out of the old map's range");
        assert_eq!(bigger.lookup(1500), Some(150));
        assert_eq!(
            bigger.allocated_clusters(),
            vec![(5, 7), (100, 8), (600, 9), (4000, 11)]
        );
        assert_eq!(bigger.slot_entries(9).len(), 5000 - 9 * 512);
        assert!(bigger.slot_allocated(7) && !bigger.slot_allocated(8));
        let smaller = bigger.resized(100);
        assert_eq!(smaller.allocated(), 1, "cluster 100 is past the end");
        assert_eq!(smaller.get(600), 0);
    }
}
