//! A whole store read into memory: the super block, the masks, and every blob's metadata (flags, xattrs,
//! cluster map, the metadata pages it occupies), loaded the way `spdk_bs_load` + `spdk_bs_open_blob` load them.
//!
//! Which blobs exist: after a clean unload SPDK trusts the used-blobids mask; after a dirty shutdown (or with a
//! pre-v3 layout, which has no blobid mask) it scans every metadata page for first pages (valid CRC, sequence
//! number 0, id naming the page itself) and rebuilds the masks from what they reference. The loader does the
//! same; [`Store::rebuild_masks`] then replaces the stale masks with the ones the metadata implies.
//!
//! A blob whose metadata does not load is kept as a [`BrokenBlob`] (SPDK skips it while iterating) so that the
//! checker can report it; the store itself only fails to load when the super block, its geometry, a trusted
//! mask or the device do.

use std::collections::BTreeMap;

use crate::bitmap::Bitmap;
use crate::device::ReadAt;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    BlobId, Descriptor, Extent, ExtentTableEntry, Flags, Mask, MaskType, MdPage, SuperBlock, Xattr,
    BSTYPE_LEN, EXTENTS_PER_EP, PAGE_SIZE,
};

/// Internal xattr of a clone (and of a snapshot of a clone): the u64 id of its parent snapshot (`BLOB_SNAPSHOT`).
pub const XATTR_SNAPSHOT: &str = "SNAP";
/// Internal xattr of a snapshot being created; a crash leaves it behind (`SNAPSHOT_IN_PROGRESS`).
pub const XATTR_SNAPSHOT_IN_PROGRESS: &str = "SNAPTMP";
/// Internal xattr of a snapshot being deleted; the value is the clone being updated (`SNAPSHOT_PENDING_REMOVAL`).
pub const XATTR_SNAPSHOT_PENDING_REMOVAL: &str = "SNAPRM";
/// Internal xattr of an esnap clone: the external snapshot's id (`BLOB_EXTERNAL_SNAPSHOT_ID`).
pub const XATTR_EXTERNAL_SNAPSHOT_ID: &str = "EXTSNAP";

/// Metadata pages read per device read while scanning the metadata region.
const SCAN_CHUNK_PAGES: u32 = 256;

/// The three allocation masks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Masks {
    /// Used metadata pages, `md_len` bits.
    pub used_pages: Bitmap,
    /// Used clusters, `total_clusters` bits.
    pub used_clusters: Bitmap,
    /// Used blob ids (first pages), `md_len` bits.
    pub used_blobids: Bitmap,
}

impl Masks {
    /// The mask of one kind.
    pub fn get(&self, kind: MaskType) -> &Bitmap {
        match kind {
            MaskType::UsedPages => &self.used_pages,
            MaskType::UsedClusters => &self.used_clusters,
            MaskType::UsedBlobIds => &self.used_blobids,
        }
    }
}

/// Where [`Store::masks`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskState {
    /// Read from a cleanly unloaded store: SPDK trusts them.
    Clean,
    /// Read from a store that was not unloaded cleanly (or has no blobid mask): stale, SPDK ignores them and
    /// rebuilds. A mask that did not even decode is left empty.
    Stale,
    /// Computed from the metadata by [`Store::rebuild_masks`].
    Rebuilt,
}

/// How a blob records its clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentFormat {
    /// EXTENT_RLE descriptors in the chain, or no extent descriptor at all (an empty blob written without an
    /// extent table).
    Rle,
    /// An EXTENT_TABLE in the chain pointing at standalone extent pages.
    Table,
}

/// What a clone reads its unallocated clusters from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parent {
    /// A snapshot blob of this store (internal xattr `SNAP`, thin blobs only).
    Snapshot(BlobId),
    /// An external snapshot (esnap clone); the opaque id from `EXTSNAP`.
    External(Vec<u8>),
}

/// An operation a crash interrupted, recorded in an internal xattr; SPDK finishes or rolls it back at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingOp {
    /// `SNAPTMP`: this snapshot was being created from the blob named in the value.
    SnapshotInProgress(BlobId),
    /// `SNAPRM`: this snapshot was being deleted, the clone named in the value being updated.
    SnapshotPendingRemoval(BlobId),
}

/// One blob, as its metadata describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// Its id.
    pub id: BlobId,
    /// The FLAGS descriptor (all zero if the chain has none).
    pub flags: Flags,
    /// User xattrs, in on-disk order.
    pub xattrs: Vec<Xattr>,
    /// Internal xattrs, in on-disk order.
    pub internal_xattrs: Vec<Xattr>,
    /// How the cluster map is stored.
    pub extent_format: ExtentFormat,
    /// Size in clusters.
    pub num_clusters: u64,
    /// Allocated clusters: (blob cluster, device cluster), ascending by blob cluster. Unlisted blob clusters
    /// are unallocated (read from the parent, or as zeroes). Sparse, so that a huge thin blob costs nothing.
    pub clusters: Vec<(u64, u32)>,
    /// Metadata pages of the chain, in sequence order; the first is `id.page()`.
    pub md_pages: Vec<u32>,
    /// Allocated extent pages: (extent table slot, metadata page). Slot `s` covers blob clusters
    /// `512 s .. 512 (s + 1)`.
    pub extent_pages: Vec<(u64, u32)>,
    /// Types of descriptors this code does not know (skipped, as SPDK skips them).
    pub unknown_descriptors: Vec<u8>,
}

impl Blob {
    /// Thin provisioned.
    pub fn thin(&self) -> bool {
        self.flags.thin()
    }

    /// Data read-only (snapshots, or an unknown `data_ro` bit).
    pub fn read_only(&self) -> bool {
        self.flags.data_ro()
    }

    /// An esnap clone.
    pub fn is_esnap_clone(&self) -> bool {
        self.flags.esnap()
    }

    /// The first user xattr called `name`.
    pub fn xattr(&self, name: &str) -> Option<&[u8]> {
        find_xattr(&self.xattrs, name)
    }

    /// The first internal xattr called `name`.
    pub fn internal_xattr(&self, name: &str) -> Option<&[u8]> {
        find_xattr(&self.internal_xattrs, name)
    }

    /// Number of allocated clusters.
    pub fn num_allocated_clusters(&self) -> u64 {
        self.clusters.len() as u64
    }

    /// The device cluster backing blob cluster `c`, if allocated.
    pub fn cluster(&self, c: u64) -> Option<u32> {
        self.clusters
            .binary_search_by_key(&c, |&(b, _)| b)
            .ok()
            .map(|i| self.clusters[i].1)
    }

    /// The parent, as SPDK derives it at open: esnap clones have an external one; thin blobs with `SNAP` have
    /// that snapshot; everything else has none (a thick blob's `SNAP` is ignored).
    pub fn parent(&self) -> Option<Parent> {
        if self.is_esnap_clone() {
            let id = self
                .internal_xattr(XATTR_EXTERNAL_SNAPSHOT_ID)
                .unwrap_or_default();
            return Some(Parent::External(id.to_vec()));
        }
        if !self.thin() {
            return None;
        }
        let v = self.internal_xattr(XATTR_SNAPSHOT)?;
        let v: [u8; 8] = v.try_into().ok()?;
        Some(Parent::Snapshot(BlobId(u64::from_le_bytes(v))))
    }

    /// The parent snapshot's id, if the parent is a blob of this store.
    pub fn parent_snapshot(&self) -> Option<BlobId> {
        match self.parent() {
            Some(Parent::Snapshot(id)) => Some(id),
            _ => None,
        }
    }

    /// An interrupted snapshot operation recorded on this blob, if any.
    pub fn pending_op(&self) -> Option<PendingOp> {
        let id = |v: &[u8]| BlobId(v.try_into().map(u64::from_le_bytes).unwrap_or(u64::MAX));
        if let Some(v) = self.internal_xattr(XATTR_SNAPSHOT_PENDING_REMOVAL) {
            return Some(PendingOp::SnapshotPendingRemoval(id(v)));
        }
        self.internal_xattr(XATTR_SNAPSHOT_IN_PROGRESS)
            .map(|v| PendingOp::SnapshotInProgress(id(v)))
    }
}

fn find_xattr<'a>(list: &'a [Xattr], name: &str) -> Option<&'a [u8]> {
    list.iter()
        .find(|x| x.name == name.as_bytes())
        .map(|x| x.value.as_slice())
}

/// A blob whose metadata did not load.
#[derive(Debug)]
pub struct BrokenBlob {
    /// Its id.
    pub id: BlobId,
    /// The chain pages that did decode before the failure (they still count as used when masks are rebuilt).
    pub md_pages: Vec<u32>,
    /// What is wrong.
    pub error: Error,
}

/// Options of [`Store::load_with`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Refuse a store whose type tag differs (SPDK's `bstype` option; all zero, the default, accepts any).
    pub bstype: [u8; BSTYPE_LEN],
    /// Find blobs by scanning the metadata even when the store is clean (SPDK's `force_recover`).
    pub force_recover: bool,
}

/// A loaded store.
#[derive(Debug)]
pub struct Store {
    /// The super block.
    pub super_block: SuperBlock,
    /// Size of the device it was read from, in bytes.
    pub device_size: u64,
    /// The allocation masks (see [`Store::mask_state`]).
    pub masks: Masks,
    /// Whether the masks can be trusted.
    pub mask_state: MaskState,
    /// Blobs that loaded, by id.
    pub blobs: BTreeMap<BlobId, Blob>,
    /// Blobs that did not.
    pub broken: Vec<BrokenBlob>,
}

impl Store {
    /// Loads a store with default options.
    pub fn load(dev: &(impl ReadAt + ?Sized)) -> Result<Store> {
        Store::load_with(dev, &LoadOptions::default())
    }

    /// Loads a store: super block, masks, then every blob.
    pub fn load_with(dev: &(impl ReadAt + ?Sized), opts: &LoadOptions) -> Result<Store> {
        let mut page0 = vec![0u8; PAGE_SIZE];
        dev.read_at(0, &mut page0)
            .map_err(|e| e.context("super block"))?;
        let sb = SuperBlock::decode(&page0)?;
        sb.check_geometry(dev.size())?;
        if opts.bstype != [0; BSTYPE_LEN] && opts.bstype != sb.bstype {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "store type is \"{}\", not the one asked for",
                    sb.bstype_str()
                ),
            ));
        }
        let device_size = dev.size();
        let trusted = sb.is_clean() && sb.has_blobid_mask() && !opts.force_recover;
        let masks = read_masks(dev, &sb, device_size, trusted)?;
        let mut store = Store {
            device_size,
            masks,
            mask_state: if trusted {
                MaskState::Clean
            } else {
                MaskState::Stale
            },
            blobs: BTreeMap::new(),
            broken: Vec::new(),
            super_block: sb,
        };
        let roots: Vec<u32> = if trusted {
            store.masks.used_blobids.ones().map(|p| p as u32).collect()
        } else {
            scan_roots(dev, &store.super_block)?
        };
        for root in roots {
            let id = BlobId::from_page(root);
            let mut pages = Vec::new();
            match load_blob(
                dev,
                &store.super_block,
                store.total_clusters(),
                id,
                &mut pages,
            ) {
                Ok(b) => {
                    store.blobs.insert(id, b);
                }
                Err(e) if matches!(e.kind, ErrorKind::Io(_)) => return Err(e),
                Err(error) => store.broken.push(BrokenBlob {
                    id,
                    md_pages: pages,
                    error,
                }),
            }
        }
        Ok(store)
    }

    /// Clusters in the store.
    pub fn total_clusters(&self) -> u64 {
        self.super_block.total_clusters(self.device_size)
    }

    /// Clusters taken by the super block, masks and metadata pages.
    pub fn md_clusters(&self) -> u64 {
        self.super_block.md_clusters()
    }

    /// Clusters available to blobs (`total_data_clusters` in `bdev_lvol_get_lvstores`).
    pub fn total_data_clusters(&self) -> u64 {
        self.total_clusters() - self.md_clusters()
    }

    /// Clusters the cluster mask leaves free (`free_clusters` in `bdev_lvol_get_lvstores`); only meaningful when
    /// the masks are clean or rebuilt.
    pub fn free_clusters(&self) -> u64 {
        self.total_clusters() - self.masks.used_clusters.count_ones()
    }

    /// The blob with id `id`.
    pub fn blob(&self, id: BlobId) -> Option<&Blob> {
        self.blobs.get(&id)
    }

    /// The clones of `id`: loaded blobs whose parent snapshot it is, in id order.
    pub fn clones_of(&self, id: BlobId) -> Vec<BlobId> {
        self.blobs
            .values()
            .filter(|b| b.parent_snapshot() == Some(id))
            .map(|b| b.id)
            .collect()
    }

    /// Whether `id` is a snapshot in SPDK's sense (`spdk_blob_is_snapshot`): some loaded blob has it as parent.
    /// A snapshot whose clones are all gone is only a read-only blob.
    pub fn is_snapshot(&self, id: BlobId) -> bool {
        self.blobs.values().any(|b| b.parent_snapshot() == Some(id))
    }

    /// The masks the metadata implies, as SPDK's recovery builds them: every chain page and extent page of every
    /// blob (and the decoded pages of broken ones), every first page, the metadata clusters and every allocated
    /// cluster (indexes outside a mask are left out; the checker reports them). For a blob that does not load
    /// this differs from SPDK in one way: none of its clusters are marked, where SPDK's recovery marks those
    /// named by the chain pages it could read.
    pub fn derived_masks(&self) -> Masks {
        let md_len = self.super_block.md.len as u64;
        let mut m = Masks {
            used_pages: Bitmap::new(md_len),
            used_clusters: Bitmap::new(self.total_clusters()),
            used_blobids: Bitmap::new(md_len),
        };
        for b in self.blobs.values() {
            m.used_blobids.set(b.id.page() as u64);
            for &p in b
                .md_pages
                .iter()
                .chain(b.extent_pages.iter().map(|(_, p)| p))
            {
                m.used_pages.set(p as u64);
            }
            for &(_, c) in &b.clusters {
                m.used_clusters.set(c as u64);
            }
        }
        for b in self.broken.iter().filter(|b| !b.md_pages.is_empty()) {
            m.used_blobids.set(b.id.page() as u64);
            for &p in &b.md_pages {
                m.used_pages.set(p as u64);
            }
        }
        for c in 0..self.md_clusters() {
            m.used_clusters.set(c);
        }
        m
    }

    /// Replaces the masks by the ones the metadata implies, as SPDK does when it loads a store that was not
    /// unloaded cleanly.
    pub fn rebuild_masks(&mut self) {
        self.masks = self.derived_masks();
        self.mask_state = MaskState::Rebuilt;
    }
}

/// Reads the three masks. Trusted (clean) masks must decode with the right type and length; a cluster mask
/// longer than the store is cut to it, as SPDK does after an interrupted grow. Stale ones are taken as they
/// come, or empty.
fn read_masks(
    dev: &(impl ReadAt + ?Sized),
    sb: &SuperBlock,
    device_size: u64,
    trusted: bool,
) -> Result<Masks> {
    let md_len = sb.md.len as u64;
    let total = sb.total_clusters(device_size);
    let read = |kind: MaskType, region: crate::format::Region, bits: u64| -> Result<Bitmap> {
        if region.len == 0 {
            return Ok(Bitmap::new(bits));
        }
        let mut buf = vec![0u8; region.byte_len() as usize];
        dev.read_at(region.byte_offset(), &mut buf)
            .map_err(|e| e.context(format!("{kind} mask")))?;
        let decoded = Mask::decode(&buf).and_then(|m| {
            if m.kind != kind {
                return Err(Error::corrupt(format!(
                    "{kind} mask region holds a {} mask",
                    m.kind
                )));
            }
            let ok = if kind == MaskType::UsedClusters {
                m.bits.len() >= bits
            } else {
                m.bits.len() == bits
            };
            if !ok {
                return Err(Error::corrupt(format!(
                    "{kind} mask: length {} bits, expected {bits}",
                    m.bits.len()
                )));
            }
            Ok(m.bits)
        });
        match decoded {
            Ok(mut b) => {
                b.resize(bits);
                Ok(b)
            }
            Err(e) if trusted => Err(e),
            Err(_) => Ok(Bitmap::new(bits)),
        }
    };
    Ok(Masks {
        used_pages: read(MaskType::UsedPages, sb.used_page_mask, md_len)?,
        used_clusters: read(MaskType::UsedClusters, sb.used_cluster_mask, total)?,
        used_blobids: read(MaskType::UsedBlobIds, sb.used_blobid_mask, md_len)?,
    })
}

/// Byte offset of metadata page `idx`.
fn md_page_offset(sb: &SuperBlock, idx: u32) -> u64 {
    (sb.md.start as u64 + idx as u64) * PAGE_SIZE as u64
}

/// Reads and decodes metadata page `idx`.
fn read_md_page(dev: &(impl ReadAt + ?Sized), sb: &SuperBlock, idx: u32) -> Result<MdPage> {
    if idx >= sb.md.len {
        return Err(Error::corrupt(format!(
            "md page {idx} is outside the metadata region ({} pages)",
            sb.md.len
        )));
    }
    let mut buf = vec![0u8; PAGE_SIZE];
    dev.read_at(md_page_offset(sb, idx), &mut buf)
        .map_err(|e| e.context(format!("md page {idx}")))?;
    MdPage::decode(&buf).map_err(|e| e.context(format!("md page {idx}")))
}

/// First pages of blobs found by scanning the metadata region, as SPDK's recovery finds them: a valid CRC,
/// sequence number 0 and the id of the page itself (extent pages also have sequence number 0, but the id of
/// their blob).
fn scan_roots(dev: &(impl ReadAt + ?Sized), sb: &SuperBlock) -> Result<Vec<u32>> {
    let mut roots = Vec::new();
    let mut buf = Vec::new();
    let mut first = 0u32;
    while first < sb.md.len {
        let n = SCAN_CHUNK_PAGES.min(sb.md.len - first);
        buf.resize(n as usize * PAGE_SIZE, 0);
        dev.read_at(md_page_offset(sb, first), &mut buf)
            .map_err(|e| e.context(format!("md pages {first}..{}", first + n)))?;
        for (i, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
            let idx = first + i as u32;
            let crc_ok = u32::from_le_bytes([page[4092], page[4093], page[4094], page[4095]])
                == crate::format::page_crc(page);
            let id = u64::from_le_bytes(page[0..8].try_into().unwrap_or([0; 8]));
            let seq = u32::from_le_bytes([page[8], page[9], page[10], page[11]]);
            if crc_ok && seq == 0 && BlobId(id) == BlobId::from_page(idx) {
                roots.push(idx);
            }
        }
        first += n;
    }
    Ok(roots)
}

/// Loads one blob (`blob_load`): the chain from its first page, then its extent pages. `pages` collects the
/// chain pages that decoded, also on failure.
fn load_blob(
    dev: &(impl ReadAt + ?Sized),
    sb: &SuperBlock,
    total_clusters: u64,
    id: BlobId,
    pages: &mut Vec<u32>,
) -> Result<Blob> {
    let ctx = |e: Error| e.context(format!("blob {id}"));
    let mut descs = Vec::new();
    let mut cur = id.page();
    loop {
        if pages.contains(&cur) {
            return Err(ctx(Error::corrupt(format!(
                "chain loops back to md page {cur}"
            ))));
        }
        let page = read_md_page(dev, sb, cur).map_err(ctx)?;
        let seq = pages.len() as u32;
        if page.id != id {
            return Err(ctx(Error::corrupt(format!(
                "md page {cur} (sequence {seq}) belongs to blob {}",
                page.id
            ))));
        }
        if page.sequence_num != seq {
            return Err(ctx(Error::corrupt(format!(
                "md page {cur} has sequence number {}, expected {seq}",
                page.sequence_num
            ))));
        }
        pages.push(cur);
        let next = page.next_page();
        descs.extend(page.descriptors);
        match next {
            Some(n) => cur = n,
            None => break,
        }
    }
    parse_blob(dev, sb, total_clusters, id, pages.clone(), descs).map_err(ctx)
}

/// Builds a blob from its chain's descriptors (`blob_parse` + `blob_parse_page`), reading its extent pages.
fn parse_blob(
    dev: &(impl ReadAt + ?Sized),
    sb: &SuperBlock,
    total_clusters: u64,
    id: BlobId,
    md_pages: Vec<u32>,
    descs: Vec<Descriptor>,
) -> Result<Blob> {
    let mut flags = Flags::default();
    let mut xattrs = Vec::new();
    let mut internal_xattrs = Vec::new();
    let mut unknown_descriptors = Vec::new();
    let mut rle: Option<Vec<Extent>> = None;
    let mut table: Option<(u64, Vec<ExtentTableEntry>)> = None;
    for d in descs {
        match d {
            Descriptor::Flags(f) => flags = f,
            Descriptor::Xattr(x) => xattrs.push(x),
            Descriptor::XattrInternal(x) => internal_xattrs.push(x),
            Descriptor::ExtentRle(ext) => {
                if table.is_some() {
                    return Err(Error::corrupt("extent RLE and extent table in one blob"));
                }
                if ext.iter().all(|e| e.length == 0) {
                    return Err(Error::corrupt("extent RLE descriptor describes no cluster"));
                }
                rle.get_or_insert_with(Vec::new).extend(ext);
            }
            Descriptor::ExtentTable {
                num_clusters,
                entries,
            } => {
                if rle.is_some() {
                    return Err(Error::corrupt("extent RLE and extent table in one blob"));
                }
                match &mut table {
                    Some((n, _)) if *n != num_clusters => {
                        return Err(Error::corrupt(format!(
                        "extent table pieces disagree on the size: {n} and {num_clusters} clusters"
                    )))
                    }
                    Some((_, e)) => e.extend(entries),
                    None => table = Some((num_clusters, entries)),
                }
            }
            Descriptor::ExtentPage { .. } => {
                return Err(Error::corrupt(
                    "extent page descriptor inside a metadata chain",
                ))
            }
            Descriptor::Padding(_) => {}
            Descriptor::Unknown { kind, .. } => unknown_descriptors.push(kind),
        }
    }
    if flags.unknown_invalid() != 0 {
        return Err(Error::new(
            ErrorKind::NotSupported,
            format!("unknown invalid_flags bits {:#x}", flags.unknown_invalid()),
        ));
    }
    let mut blob = Blob {
        id,
        flags,
        xattrs,
        internal_xattrs,
        extent_format: ExtentFormat::Rle,
        num_clusters: 0,
        clusters: Vec::new(),
        md_pages,
        extent_pages: Vec::new(),
        unknown_descriptors,
    };
    if let Some(runs) = rle {
        parse_rle(&mut blob, &runs, total_clusters)?;
    } else if let Some((num_clusters, entries)) = table {
        blob.extent_format = ExtentFormat::Table;
        parse_extent_table(dev, sb, &mut blob, num_clusters, &entries, total_clusters)?;
    }
    if blob.is_esnap_clone() {
        if blob.internal_xattr(XATTR_EXTERNAL_SNAPSHOT_ID).is_none() {
            return Err(Error::corrupt("esnap clone without an EXTSNAP xattr"));
        }
    } else if blob.thin() {
        if let Some(v) = blob.internal_xattr(XATTR_SNAPSHOT) {
            if v.len() != 8 {
                return Err(Error::corrupt(format!(
                    "SNAP xattr of {} bytes, a blob id is 8",
                    v.len()
                )));
            }
        }
    }
    Ok(blob)
}

/// Records one allocated cluster; a blob cannot own more clusters than the store has (which also bounds what a
/// forged page can make us allocate).
fn push_cluster(
    blob: &mut Blob,
    blob_cluster: u64,
    dev_cluster: u32,
    total_clusters: u64,
) -> Result<()> {
    if blob.clusters.len() as u64 >= total_clusters {
        return Err(Error::corrupt(format!(
            "more allocated clusters than the store's {total_clusters}"
        )));
    }
    blob.clusters.push((blob_cluster, dev_cluster));
    Ok(())
}

fn parse_rle(blob: &mut Blob, runs: &[Extent], total_clusters: u64) -> Result<()> {
    for r in runs {
        if r.cluster_idx == 0 {
            if !blob.thin() {
                return Err(Error::corrupt(format!(
                    "unallocated run of {} clusters in a thick blob",
                    r.length
                )));
            }
        } else {
            if r.cluster_idx as u64 + r.length as u64 > u32::MAX as u64 + 1 {
                return Err(Error::corrupt(format!(
                    "run of {} clusters from cluster {} passes cluster 2^32",
                    r.length, r.cluster_idx
                )));
            }
            for j in 0..r.length {
                push_cluster(
                    blob,
                    blob.num_clusters + j as u64,
                    r.cluster_idx + j,
                    total_clusters,
                )?;
            }
        }
        blob.num_clusters += r.length as u64;
    }
    Ok(())
}

/// Reads the extent pages an extent table names (`blob_load_cpl_extents_cpl`). SPDK writes exactly
/// `ceil(num_clusters / 512)` slots, allocated ones one page each, and every extent page but the last full.
fn parse_extent_table(
    dev: &(impl ReadAt + ?Sized),
    sb: &SuperBlock,
    blob: &mut Blob,
    num_clusters: u64,
    entries: &[ExtentTableEntry],
    total_clusters: u64,
) -> Result<()> {
    let mut slots = 0u64;
    for e in entries {
        if e.page_idx != 0 && e.num_pages != 1 {
            return Err(Error::corrupt(format!(
                "extent table entry for md page {} counts {} pages",
                e.page_idx, e.num_pages
            )));
        }
        if e.page_idx == 0 && !blob.thin() {
            return Err(Error::corrupt("unallocated extent page in a thick blob"));
        }
        slots += e.num_pages as u64;
    }
    let expected = num_clusters.div_ceil(EXTENTS_PER_EP);
    if slots != expected {
        return Err(Error::corrupt(format!(
            "extent table has {slots} slots, {num_clusters} clusters need {expected}"
        )));
    }
    let mut slot = 0u64;
    let mut done = 0u64;
    for e in entries {
        if e.page_idx == 0 {
            done += (num_clusters - done).min(EXTENTS_PER_EP * e.num_pages as u64);
            slot += e.num_pages as u64;
            continue;
        }
        let want = (num_clusters - done).min(EXTENTS_PER_EP);
        let page = read_md_page(dev, sb, e.page_idx).map_err(|err| err.context("extent page"))?;
        let bad = |m: String| {
            Err(Error::corrupt(format!(
                "extent page {} (slot {slot}): {m}",
                e.page_idx
            )))
        };
        if page.sequence_num != 0 {
            return bad(format!("sequence number {}", page.sequence_num));
        }
        if page.next_page().is_some() {
            return bad(format!("next page {}", page.next));
        }
        let [Descriptor::ExtentPage {
            start_cluster_idx,
            clusters,
        }] = page.descriptors.as_slice()
        else {
            return bad("not exactly one extent page descriptor".into());
        };
        if *start_cluster_idx as u64 != done {
            return bad(format!(
                "starts at cluster {start_cluster_idx}, expected {done}"
            ));
        }
        if clusters.len() as u64 != want {
            return bad(format!("{} clusters, expected {want}", clusters.len()));
        }
        for (i, &c) in clusters.iter().enumerate() {
            if c != 0 {
                push_cluster(blob, done + i as u64, c, total_clusters)?;
            } else if !blob.thin() {
                return bad(format!(
                    "blob cluster {} unallocated in a thick blob",
                    done + i as u64
                ));
            }
        }
        blob.extent_pages.push((slot, e.page_idx));
        done += want;
        slot += 1;
    }
    blob.num_clusters = num_clusters;
    Ok(())
}
