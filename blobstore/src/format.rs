//! SPDK's blobstore on-disk format (`lib/blob/blobstore.h`, v24.05), byte for byte: the super block, the three
//! allocation masks, metadata pages and their descriptors, blob ids. Every struct is packed little endian.
//!
//! ```text
//! device, in 4 KiB pages:  0 super block | used-md-pages mask | used-clusters mask | used-blobids mask | md pages ...
//!                          data clusters count from byte 0: cluster c starts at c * cluster_size
//!
//! super block (page 0)                               metadata page (md_start + index)
//!    0 signature "SPDKBLOB"      56 bstype[16]          0 id u64 (blob owning the page)
//!    8 version u32 (1..=3)       72 used_blobid_mask     8 sequence_num u32 (0 = first page of the chain)
//!   12 length u32 (4096)            start, len u32      12 reserved0 u32
//!   16 clean u32                 80 size u64 (bytes)    16 descriptors[4072]
//!   20 super_blob u64            88 io_unit_size u32  4088 next u32 (md page index, 0xFFFFFFFF = end)
//!   28 cluster_size u32          92 md_page_size u32  4092 crc u32
//!   32 used_page_mask start, len    (SPDK >= 25.05;
//!   40 used_cluster_mask start,len   reserved before) descriptor: type u8, length u32, `length` payload bytes
//!   48 md_start, md_len u32    4092 crc u32         mask: type u8, length u32 (bits), bits LSB first
//! ```
//!
//! The CRC of the super block and of every metadata page is CRC-32C over bytes 0..4092, seed and final XOR all
//! ones; masks carry none. Decoders take byte slices of any length and say what is wrong with them; they never
//! panic. Encoders write the CRC.

use nvme_proto::crc32c::crc32c;

use crate::bitmap::Bitmap;
use crate::error::{Error, ErrorKind, Result};

/// Size of a metadata page, of the super block and the unit of every region (`SPDK_BS_PAGE_SIZE`).
pub const PAGE_SIZE: usize = 4096;
/// Offset of the CRC in the super block and in metadata pages; the CRC covers the bytes before it.
pub const CRC_OFFSET: usize = PAGE_SIZE - 4;
/// Super block signature.
pub const SIGNATURE: &[u8; 8] = b"SPDKBLOB";
/// Oldest super block version SPDK loads (`SPDK_BS_INITIAL_VERSION`).
pub const VERSION_MIN: u32 = 1;
/// Current super block version (`SPDK_BS_VERSION`); version 3 added the used-blobids mask.
pub const VERSION: u32 = 3;
/// Length of the blobstore type tag.
pub const BSTYPE_LEN: usize = 16;
/// The type tag an lvstore writes.
pub const BSTYPE_LVOLSTORE: [u8; BSTYPE_LEN] = *b"LVOLSTORE\0\0\0\0\0\0\0";
/// Offset and size of the descriptor area of a metadata page.
pub const DESCRIPTORS_OFFSET: usize = 16;
/// Size of the descriptor area (`SPDK_BS_MAX_DESC_SIZE`).
pub const DESCRIPTORS_LEN: usize = 4072;
/// Size of a descriptor header (type u8 + length u32).
pub const DESC_HEADER_LEN: usize = 5;
/// Size of a mask header (type u8 + length u32).
pub const MASK_HEADER_LEN: usize = 5;
/// `next` of the last page of a chain (`SPDK_INVALID_MD_PAGE`).
pub const INVALID_PAGE: u32 = u32::MAX;
/// Cluster slots per extent page (`SPDK_EXTENTS_PER_EP`: the largest power of two that fits).
pub const EXTENTS_PER_EP: u64 = 512;

/// Descriptor type: padding; with length 0 it ends the page's descriptors.
pub const DESC_PADDING: u8 = 0;
/// Descriptor type: run-length encoded cluster list (the format before extent tables).
pub const DESC_EXTENT_RLE: u8 = 1;
/// Descriptor type: user extended attribute.
pub const DESC_XATTR: u8 = 2;
/// Descriptor type: blob flags.
pub const DESC_FLAGS: u8 = 3;
/// Descriptor type: blobstore-internal extended attribute.
pub const DESC_XATTR_INTERNAL: u8 = 4;
/// Descriptor type: extent table (md pages holding the cluster list).
pub const DESC_EXTENT_TABLE: u8 = 5;
/// Descriptor type: extent page (the only descriptor of a standalone extent page).
pub const DESC_EXTENT_PAGE: u8 = 6;

/// CRC-32C of a page as SPDK computes it (`blob_md_page_calc_crc`): bytes 0..4092, seed and final XOR all ones.
/// `page` must be at least [`CRC_OFFSET`] bytes.
pub fn page_crc(page: &[u8]) -> u32 {
    crc32c(&page[..CRC_OFFSET])
}

fn rd_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn rd_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn rd_u64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
fn wr_u16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn wr_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn wr_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Checks the stored CRC of a 4 KiB page.
fn check_crc(buf: &[u8], what: &str) -> Result<()> {
    let stored = rd_u32(buf, CRC_OFFSET);
    let computed = page_crc(buf);
    if stored != computed {
        return Err(Error::corrupt(format!(
            "{what}: crc mismatch (stored {stored:#010x}, computed {computed:#010x})"
        )));
    }
    Ok(())
}

fn need_page(buf: &[u8], what: &str) -> Result<()> {
    if buf.len() < PAGE_SIZE {
        return Err(Error::corrupt(format!(
            "{what}: {} bytes, a page is {PAGE_SIZE}",
            buf.len()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Blob ids

/// A blob id: `(1 << 32) | index of the blob's first metadata page`. Bit 32 is always set so that code mixing
/// up ids and page numbers fails loudly.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub u64);

impl BlobId {
    /// No blob (`SPDK_BLOBID_INVALID`); the super block's `super_blob` when none is set.
    pub const INVALID: BlobId = BlobId(u64::MAX);
    /// The in-memory parent id of an esnap clone (`SPDK_BLOBID_EXTERNAL_SNAPSHOT`); never stored on disk.
    pub const EXTERNAL_SNAPSHOT: BlobId = BlobId(u64::MAX - 1);
    /// The bit every valid id has (`SPDK_BLOB_BLOBID_HIGH_BIT`).
    pub const HIGH_BIT: u64 = 1 << 32;

    /// The id of the blob whose first metadata page is `page` (`bs_page_to_blobid`).
    pub fn from_page(page: u32) -> BlobId {
        BlobId(Self::HIGH_BIT | page as u64)
    }

    /// The metadata page index of the blob's first page (`bs_blobid_to_page`: the low 32 bits).
    pub fn page(self) -> u32 {
        self.0 as u32
    }

    /// Whether the id has the form SPDK hands out: bit 32 set, bits 33..63 clear.
    pub fn is_well_formed(self) -> bool {
        self.0 >> 32 == 1
    }
}

impl std::fmt::Display for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl std::fmt::Debug for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobId({:#x})", self.0)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Super block

/// A region of the device, in 4 KiB pages from byte 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Region {
    /// First page.
    pub start: u32,
    /// Number of pages.
    pub len: u32,
}

impl Region {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.start as u64 + self.len as u64
    }

    /// Byte offset of the region on the device.
    pub fn byte_offset(&self) -> u64 {
        self.start as u64 * PAGE_SIZE as u64
    }

    /// Size of the region in bytes.
    pub fn byte_len(&self) -> u64 {
        self.len as u64 * PAGE_SIZE as u64
    }
}

/// The super block (`struct spdk_bs_super_block`, page 0), field for field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuperBlock {
    /// Format version, 1..=3.
    pub version: u32,
    /// `sizeof(super)`: 4096. SPDK neither checks nor uses it.
    pub length: u32,
    /// 1 after a clean unload (the masks on disk are current); 0 from the first metadata change after a load.
    /// SPDK only compares it with 0.
    pub clean: u32,
    /// The application's super blob (the lvstore's name and uuid), or [`BlobId::INVALID`].
    pub super_blob: BlobId,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Used-metadata-pages mask.
    pub used_page_mask: Region,
    /// Used-clusters mask; `len` is what the current cluster count needs (the reserved region may be larger, so
    /// that the store can grow).
    pub used_cluster_mask: Region,
    /// Metadata pages.
    pub md: Region,
    /// Type tag, NUL padded ("LVOLSTORE" for lvstores).
    pub bstype: [u8; BSTYPE_LEN],
    /// Used-blob-ids mask; `len == 0` in pre-v3 layouts, which have none.
    pub used_blobid_mask: Region,
    /// Size of the store in bytes (device size at init, rewritten by grow); 0 in old images means the device size.
    pub size: u64,
    /// Smallest data I/O unit in bytes (the device block size); 0 in old images means 4096.
    pub io_unit_size: u32,
    /// Metadata page size in bytes (SPDK 25.05 and later, without a version bump; part of `reserved` before,
    /// so 0 there, meaning 4096).
    pub md_page_size: u32,
}

impl SuperBlock {
    /// Whether the last unload was clean, so the masks on disk can be trusted.
    pub fn is_clean(&self) -> bool {
        self.clean != 0
    }

    /// Whether the layout has a used-blobids mask (v3); without one, SPDK always rebuilds the masks on load.
    pub fn has_blobid_mask(&self) -> bool {
        self.used_blobid_mask.len != 0
    }

    /// The type tag up to its first NUL, lossily as text.
    pub fn bstype_str(&self) -> String {
        let n = self
            .bstype
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(BSTYPE_LEN);
        String::from_utf8_lossy(&self.bstype[..n]).into_owned()
    }

    /// The store size in bytes: `size`, or the device size when an old image left it 0.
    pub fn store_size(&self, device_size: u64) -> u64 {
        if self.size == 0 {
            device_size
        } else {
            self.size
        }
    }

    /// The io unit size: `io_unit_size`, or 4096 when an old image left it 0.
    pub fn io_unit(&self) -> u32 {
        if self.io_unit_size == 0 {
            PAGE_SIZE as u32
        } else {
            self.io_unit_size
        }
    }

    /// 4 KiB pages per cluster.
    pub fn pages_per_cluster(&self) -> u64 {
        self.cluster_size as u64 / PAGE_SIZE as u64
    }

    /// Clusters in the store (`size / cluster_size`); 0 when `cluster_size` is 0.
    pub fn total_clusters(&self, device_size: u64) -> u64 {
        self.store_size(device_size)
            .checked_div(self.cluster_size as u64)
            .unwrap_or(0)
    }

    /// Clusters at the start of the device taken by the super block, masks and metadata pages
    /// (`ceil((md_start + md_len) / pages_per_cluster)`); always marked used.
    pub fn md_clusters(&self) -> u64 {
        let ppc = self.pages_per_cluster().max(1);
        self.md.end().div_ceil(ppc)
    }

    /// Decodes page 0, with SPDK's checks (`bs_super_validate`): signature, version 1..=3, CRC. The geometry is
    /// checked by [`SuperBlock::check_geometry`].
    pub fn decode(buf: &[u8]) -> Result<SuperBlock> {
        need_page(buf, "super block")?;
        if &buf[0..8] != SIGNATURE {
            return Err(Error::corrupt(format!(
                "super block: signature {:02x?} is not \"SPDKBLOB\"",
                &buf[0..8]
            )));
        }
        let version = rd_u32(buf, 8);
        check_crc(buf, "super block")?;
        if !(VERSION_MIN..=VERSION).contains(&version) {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!(
                    "super block: version {version}, this code reads {VERSION_MIN}..={VERSION}"
                ),
            ));
        }
        let region = |o| Region {
            start: rd_u32(buf, o),
            len: rd_u32(buf, o + 4),
        };
        let mut bstype = [0u8; BSTYPE_LEN];
        bstype.copy_from_slice(&buf[56..72]);
        Ok(SuperBlock {
            version,
            length: rd_u32(buf, 12),
            clean: rd_u32(buf, 16),
            super_blob: BlobId(rd_u64(buf, 20)),
            cluster_size: rd_u32(buf, 28),
            used_page_mask: region(32),
            used_cluster_mask: region(40),
            md: region(48),
            bstype,
            used_blobid_mask: region(72),
            size: rd_u64(buf, 80),
            io_unit_size: rd_u32(buf, 88),
            md_page_size: rd_u32(buf, 92),
        })
    }

    /// The 4096 bytes of page 0, CRC included; reserved bytes are zero.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE];
        b[0..8].copy_from_slice(SIGNATURE);
        wr_u32(&mut b, 8, self.version);
        wr_u32(&mut b, 12, self.length);
        wr_u32(&mut b, 16, self.clean);
        wr_u64(&mut b, 20, self.super_blob.0);
        wr_u32(&mut b, 28, self.cluster_size);
        for (o, r) in [
            (32, self.used_page_mask),
            (40, self.used_cluster_mask),
            (48, self.md),
            (72, self.used_blobid_mask),
        ] {
            wr_u32(&mut b, o, r.start);
            wr_u32(&mut b, o + 4, r.len);
        }
        b[56..72].copy_from_slice(&self.bstype);
        wr_u64(&mut b, 80, self.size);
        wr_u32(&mut b, 88, self.io_unit_size);
        wr_u32(&mut b, 92, self.md_page_size);
        let crc = page_crc(&b);
        wr_u32(&mut b, CRC_OFFSET, crc);
        b
    }

    /// Checks that the layout is usable on a device of `device_size` bytes: what SPDK checks (size not past the
    /// device), and what it takes for granted (cluster size a multiple of 4 KiB, regions inside the store and
    /// after the super block, masks large enough for their bits, metadata inside the clusters).
    pub fn check_geometry(&self, device_size: u64) -> Result<()> {
        let bad = |m: String| Err(Error::corrupt(format!("super block: {m}")));
        if self.md_page_size != 0 && self.md_page_size as usize != PAGE_SIZE {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!(
                    "super block: metadata page size {} (only {PAGE_SIZE} is implemented)",
                    self.md_page_size
                ),
            ));
        }
        if self.cluster_size == 0 || !(self.cluster_size as usize).is_multiple_of(PAGE_SIZE) {
            return bad(format!(
                "cluster size {} is not a non-zero multiple of {PAGE_SIZE}",
                self.cluster_size
            ));
        }
        let io = self.io_unit();
        if io as usize > PAGE_SIZE || !PAGE_SIZE.is_multiple_of(io as usize) {
            return bad(format!("io unit size {io} does not divide {PAGE_SIZE}"));
        }
        let size = self.store_size(device_size);
        if size > device_size {
            return bad(format!(
                "store size {size} is larger than the device ({device_size} bytes)"
            ));
        }
        let total = self.total_clusters(device_size);
        if total == 0 {
            return bad(format!(
                "store size {size} holds no cluster of {} bytes",
                self.cluster_size
            ));
        }
        let pages = size / PAGE_SIZE as u64;
        let mut regions = vec![
            ("used page mask", self.used_page_mask),
            ("used cluster mask", self.used_cluster_mask),
            ("metadata", self.md),
        ];
        if self.has_blobid_mask() {
            regions.push(("used blobid mask", self.used_blobid_mask));
        }
        for (name, r) in &regions {
            if r.start == 0 || r.len == 0 || r.end() > pages {
                return bad(format!(
                    "{name} region (start {}, {} pages) is not inside pages 1..{pages}",
                    r.start, r.len
                ));
            }
        }
        let mask_bytes = |bits: u64| MASK_HEADER_LEN as u64 + bits.div_ceil(8);
        if self.used_page_mask.byte_len() < mask_bytes(self.md.len as u64) {
            return bad(format!(
                "used page mask of {} pages cannot hold {} bits",
                self.used_page_mask.len, self.md.len
            ));
        }
        if self.used_cluster_mask.byte_len() < mask_bytes(total) {
            return bad(format!(
                "used cluster mask of {} pages cannot hold {total} bits",
                self.used_cluster_mask.len
            ));
        }
        if self.has_blobid_mask()
            && self.used_blobid_mask.byte_len() < mask_bytes(self.md.len as u64)
        {
            return bad(format!(
                "used blobid mask of {} pages cannot hold {} bits",
                self.used_blobid_mask.len, self.md.len
            ));
        }
        if self.md_clusters() > total {
            return bad(format!(
                "metadata takes {} clusters, the store has {total}",
                self.md_clusters()
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Masks

/// Which allocation a mask records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MaskType {
    /// Used metadata pages: first pages, continuation pages, extent pages (type 0).
    UsedPages,
    /// Used clusters, metadata clusters included (type 1).
    UsedClusters,
    /// Blob ids in use: the first page of each blob (type 2).
    UsedBlobIds,
}

impl MaskType {
    /// The on-disk type byte.
    pub fn to_u8(self) -> u8 {
        match self {
            MaskType::UsedPages => 0,
            MaskType::UsedClusters => 1,
            MaskType::UsedBlobIds => 2,
        }
    }

    /// From the on-disk type byte.
    pub fn from_u8(v: u8) -> Option<MaskType> {
        match v {
            0 => Some(MaskType::UsedPages),
            1 => Some(MaskType::UsedClusters),
            2 => Some(MaskType::UsedBlobIds),
            _ => None,
        }
    }
}

impl std::fmt::Display for MaskType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MaskType::UsedPages => "used-pages",
            MaskType::UsedClusters => "used-clusters",
            MaskType::UsedBlobIds => "used-blobids",
        })
    }
}

/// A mask region (`struct spdk_bs_md_mask`): type, length in bits, the bits. No CRC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    /// What it records.
    pub kind: MaskType,
    /// The bits; `bits.len()` is the header's `length`.
    pub bits: Bitmap,
}

impl Mask {
    /// Decodes a mask from its whole region (`len` pages of bytes); the length must fit the region.
    pub fn decode(buf: &[u8]) -> Result<Mask> {
        if buf.len() < MASK_HEADER_LEN {
            return Err(Error::corrupt(format!(
                "mask: {} bytes, shorter than its header",
                buf.len()
            )));
        }
        let kind = MaskType::from_u8(buf[0])
            .ok_or_else(|| Error::corrupt(format!("mask: unknown type {}", buf[0])))?;
        let bits = rd_u32(buf, 1) as u64;
        let room = (buf.len() - MASK_HEADER_LEN) as u64 * 8;
        if bits > room {
            return Err(Error::corrupt(format!(
                "{kind} mask: length {bits} bits, the region holds {room}"
            )));
        }
        Ok(Mask {
            kind,
            bits: Bitmap::from_bytes(&buf[MASK_HEADER_LEN..], bits),
        })
    }

    /// The whole region of `pages` pages (the rest zero), as SPDK writes it at unload.
    pub fn encode(&self, pages: u32) -> Result<Vec<u8>> {
        let len = pages as usize * PAGE_SIZE;
        let bits = self.bits.len();
        if bits > u32::MAX as u64 || MASK_HEADER_LEN as u64 + bits.div_ceil(8) > len as u64 {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("{} mask: {bits} bits do not fit {pages} pages", self.kind),
            ));
        }
        let mut b = vec![0u8; len];
        b[0] = self.kind.to_u8();
        wr_u32(&mut b, 1, bits as u32);
        let bytes = self.bits.as_bytes();
        b[MASK_HEADER_LEN..MASK_HEADER_LEN + bytes.len()].copy_from_slice(bytes);
        Ok(b)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Descriptors

/// Blob flags (the FLAGS descriptor): three masks with different rules for bits a reader does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flags {
    /// A set bit the reader does not know makes the blob unopenable.
    pub invalid: u64,
    /// A set bit the reader does not know opens the blob data- and metadata-read-only.
    pub data_ro: u64,
    /// A set bit the reader does not know opens the blob metadata-read-only.
    pub md_ro: u64,
}

/// How a blob's freed clusters are cleared (the `md_ro_flags` bits 0..1, `enum blob_clear_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClearMethod {
    /// The blobstore's default (unmap).
    Default,
    /// Nothing.
    None,
    /// Unmap.
    Unmap,
    /// Write zeroes.
    WriteZeroes,
}

impl Flags {
    /// `invalid`: thin provisioned (unallocated clusters read from the parent, or as zeroes).
    pub const THIN_PROV: u64 = 1 << 0;
    /// `invalid`: the blob has internal xattrs.
    pub const INTERNAL_XATTR: u64 = 1 << 1;
    /// `invalid`: the cluster list is in an extent table and extent pages.
    pub const EXTENT_TABLE: u64 = 1 << 2;
    /// `invalid`: an esnap clone (its parent is an external bdev).
    pub const EXTERNAL_SNAPSHOT: u64 = 1 << 3;
    /// All `invalid` bits SPDK v24.05 knows.
    pub const INVALID_MASK: u64 = 0xF;
    /// `data_ro`: read-only (snapshots).
    pub const READ_ONLY: u64 = 1 << 0;
    /// All `data_ro` bits known.
    pub const DATA_RO_MASK: u64 = Self::READ_ONLY;
    /// `md_ro`: the clear method bits.
    pub const CLEAR_METHOD: u64 = 3;
    /// All `md_ro` bits known.
    pub const MD_RO_MASK: u64 = Self::CLEAR_METHOD;

    /// Thin provisioned.
    pub fn thin(&self) -> bool {
        self.invalid & Self::THIN_PROV != 0
    }

    /// Extent table format.
    pub fn extent_table(&self) -> bool {
        self.invalid & Self::EXTENT_TABLE != 0
    }

    /// Esnap clone.
    pub fn esnap(&self) -> bool {
        self.invalid & Self::EXTERNAL_SNAPSHOT != 0
    }

    /// `invalid` bits this code does not know: such a blob cannot be opened.
    pub fn unknown_invalid(&self) -> u64 {
        self.invalid & !Self::INVALID_MASK
    }

    /// Data read-only: the READ_ONLY bit, or an unknown `data_ro` bit.
    pub fn data_ro(&self) -> bool {
        self.data_ro != 0
    }

    /// Metadata read-only: data read-only, or an unknown `md_ro` bit.
    pub fn md_ro(&self) -> bool {
        self.data_ro() || self.md_ro & !Self::MD_RO_MASK != 0
    }

    /// The stored clear method.
    pub fn clear_method(&self) -> ClearMethod {
        match self.md_ro & Self::CLEAR_METHOD {
            0 => ClearMethod::Default,
            1 => ClearMethod::None,
            2 => ClearMethod::Unmap,
            _ => ClearMethod::WriteZeroes,
        }
    }
}

/// One run of an EXTENT_RLE descriptor: `length` blob clusters at device clusters `cluster_idx..`, or
/// unallocated when `cluster_idx == 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First device cluster, 0 for a run of unallocated clusters.
    pub cluster_idx: u32,
    /// Number of clusters.
    pub length: u32,
}

/// One entry of an EXTENT_TABLE descriptor: the md page of one extent page, or `num_pages` unallocated ones
/// when `page_idx == 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentTableEntry {
    /// Metadata page index of an extent page, 0 for unallocated ones.
    pub page_idx: u32,
    /// Number of extent pages (1 for an allocated one).
    pub num_pages: u32,
}

/// An extended attribute (XATTR or XATTR_INTERNAL descriptor). Names are stored without a NUL; values are raw
/// bytes (lvol strings include their NUL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xattr {
    /// Name bytes.
    pub name: Vec<u8>,
    /// Value bytes.
    pub value: Vec<u8>,
}

impl Xattr {
    /// Builds one from a name and a value.
    pub fn new(name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Xattr {
        Xattr {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// A metadata descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Descriptor {
    /// Padding of `len` payload bytes, skipped (SPDK never writes it; type 0 with length 0 ends a page and is
    /// not a descriptor).
    Padding(u32),
    /// Run-length encoded cluster list (type 1).
    ExtentRle(Vec<Extent>),
    /// User xattr (type 2).
    Xattr(Xattr),
    /// Flags (type 3), always the first descriptor of the first page.
    Flags(Flags),
    /// Internal xattr (type 4).
    XattrInternal(Xattr),
    /// Extent table (type 5); each piece of a table split over pages repeats `num_clusters`.
    ExtentTable {
        /// The blob's size in clusters.
        num_clusters: u64,
        /// Extent page references, with runs of unallocated ones.
        entries: Vec<ExtentTableEntry>,
    },
    /// Extent page (type 6): the cluster of blob clusters `start_cluster_idx..`, 0 = unallocated.
    ExtentPage {
        /// First blob cluster described (a multiple of 512).
        start_cluster_idx: u32,
        /// Device cluster of each blob cluster.
        clusters: Vec<u32>,
    },
    /// A type this code does not know; SPDK skips these (newer formats guard features with flag bits).
    Unknown {
        /// The type byte.
        kind: u8,
        /// The payload.
        payload: Vec<u8>,
    },
}

impl Descriptor {
    /// The type byte.
    pub fn kind(&self) -> u8 {
        match self {
            Descriptor::Padding(_) => DESC_PADDING,
            Descriptor::ExtentRle(_) => DESC_EXTENT_RLE,
            Descriptor::Xattr(_) => DESC_XATTR,
            Descriptor::Flags(_) => DESC_FLAGS,
            Descriptor::XattrInternal(_) => DESC_XATTR_INTERNAL,
            Descriptor::ExtentTable { .. } => DESC_EXTENT_TABLE,
            Descriptor::ExtentPage { .. } => DESC_EXTENT_PAGE,
            Descriptor::Unknown { kind, .. } => *kind,
        }
    }

    /// Payload length (the header's `length` field).
    pub fn payload_len(&self) -> usize {
        match self {
            Descriptor::Padding(n) => *n as usize,
            Descriptor::ExtentRle(e) => 8 * e.len(),
            Descriptor::Xattr(x) | Descriptor::XattrInternal(x) => 4 + x.name.len() + x.value.len(),
            Descriptor::Flags(_) => 24,
            Descriptor::ExtentTable { entries, .. } => 8 + 8 * entries.len(),
            Descriptor::ExtentPage { clusters, .. } => 4 + 4 * clusters.len(),
            Descriptor::Unknown { payload, .. } => payload.len(),
        }
    }

    /// Bytes the descriptor takes in a page, header included.
    pub fn encoded_len(&self) -> usize {
        DESC_HEADER_LEN + self.payload_len()
    }

    /// Writes the descriptor at the start of `out` (which must hold [`Descriptor::encoded_len`] bytes).
    fn write(&self, out: &mut [u8]) -> Result<()> {
        let invalid = |m: String| Err(Error::new(ErrorKind::Invalid, m));
        match self {
            Descriptor::Padding(0) => {
                return invalid("padding of length 0 would end the page".into())
            }
            Descriptor::Unknown { kind: 0, payload } if payload.is_empty() => {
                return invalid("descriptor type 0 of length 0 would end the page".into())
            }
            Descriptor::Xattr(x) | Descriptor::XattrInternal(x)
                if x.name.len() > u16::MAX as usize || x.value.len() > u16::MAX as usize =>
            {
                return invalid(format!(
                    "xattr name {} bytes / value {} bytes: each must fit a u16",
                    x.name.len(),
                    x.value.len()
                ))
            }
            _ => {}
        }
        let len = self.payload_len();
        out[0] = self.kind();
        wr_u32(out, 1, len as u32);
        let p = &mut out[DESC_HEADER_LEN..DESC_HEADER_LEN + len];
        match self {
            Descriptor::Padding(_) => p.fill(0),
            Descriptor::ExtentRle(ext) => {
                for (i, e) in ext.iter().enumerate() {
                    wr_u32(p, 8 * i, e.cluster_idx);
                    wr_u32(p, 8 * i + 4, e.length);
                }
            }
            Descriptor::Xattr(x) | Descriptor::XattrInternal(x) => {
                wr_u16(p, 0, x.name.len() as u16);
                wr_u16(p, 2, x.value.len() as u16);
                p[4..4 + x.name.len()].copy_from_slice(&x.name);
                p[4 + x.name.len()..].copy_from_slice(&x.value);
            }
            Descriptor::Flags(f) => {
                wr_u64(p, 0, f.invalid);
                wr_u64(p, 8, f.data_ro);
                wr_u64(p, 16, f.md_ro);
            }
            Descriptor::ExtentTable {
                num_clusters,
                entries,
            } => {
                wr_u64(p, 0, *num_clusters);
                for (i, e) in entries.iter().enumerate() {
                    wr_u32(p, 8 + 8 * i, e.page_idx);
                    wr_u32(p, 12 + 8 * i, e.num_pages);
                }
            }
            Descriptor::ExtentPage {
                start_cluster_idx,
                clusters,
            } => {
                wr_u32(p, 0, *start_cluster_idx);
                for (i, c) in clusters.iter().enumerate() {
                    wr_u32(p, 4 + 4 * i, *c);
                }
            }
            Descriptor::Unknown { payload, .. } => p.copy_from_slice(payload),
        }
        Ok(())
    }

    /// Decodes one descriptor payload of type `kind`, with the length rules of SPDK's `blob_parse_page`.
    fn parse(kind: u8, p: &[u8], at: usize) -> Result<Descriptor> {
        let len = p.len();
        let bad = |name: &str, why: String| {
            Err(Error::corrupt(format!(
                "{name} descriptor at byte {at} (length {len}): {why}"
            )))
        };
        Ok(match kind {
            DESC_PADDING => Descriptor::Padding(len as u32),
            DESC_EXTENT_RLE => {
                if len == 0 || !len.is_multiple_of(8) {
                    return bad("extent RLE", "not a non-empty multiple of 8".into());
                }
                Descriptor::ExtentRle(
                    p.chunks_exact(8)
                        .map(|c| Extent {
                            cluster_idx: rd_u32(c, 0),
                            length: rd_u32(c, 4),
                        })
                        .collect(),
                )
            }
            DESC_XATTR | DESC_XATTR_INTERNAL => {
                let name = if kind == DESC_XATTR {
                    "xattr"
                } else {
                    "internal xattr"
                };
                if len < 4 {
                    return bad(name, "shorter than the name and value lengths".into());
                }
                let nl = rd_u16(p, 0) as usize;
                let vl = rd_u16(p, 2) as usize;
                if len != 4 + nl + vl {
                    return bad(
                        name,
                        format!("name length {nl} + value length {vl} + 4 is not the length"),
                    );
                }
                let x = Xattr {
                    name: p[4..4 + nl].to_vec(),
                    value: p[4 + nl..].to_vec(),
                };
                if kind == DESC_XATTR {
                    Descriptor::Xattr(x)
                } else {
                    Descriptor::XattrInternal(x)
                }
            }
            DESC_FLAGS => {
                if len != 24 {
                    return bad("flags", "must be 24".into());
                }
                Descriptor::Flags(Flags {
                    invalid: rd_u64(p, 0),
                    data_ro: rd_u64(p, 8),
                    md_ro: rd_u64(p, 16),
                })
            }
            DESC_EXTENT_TABLE => {
                if len < 8 || !(len - 8).is_multiple_of(8) {
                    return bad("extent table", "not 8 + a multiple of 8".into());
                }
                Descriptor::ExtentTable {
                    num_clusters: rd_u64(p, 0),
                    entries: p[8..]
                        .chunks_exact(8)
                        .map(|c| ExtentTableEntry {
                            page_idx: rd_u32(c, 0),
                            num_pages: rd_u32(c, 4),
                        })
                        .collect(),
                }
            }
            DESC_EXTENT_PAGE => {
                if len <= 4 || !(len - 4).is_multiple_of(4) {
                    return bad("extent page", "not 4 + a non-zero multiple of 4".into());
                }
                Descriptor::ExtentPage {
                    start_cluster_idx: rd_u32(p, 0),
                    clusters: p[4..].chunks_exact(4).map(|c| rd_u32(c, 0)).collect(),
                }
            }
            kind => Descriptor::Unknown {
                kind,
                payload: p.to_vec(),
            },
        })
    }
}

/// Decodes a descriptor area (normally the 4072 bytes of a page) the way SPDK walks it: a descriptor of type 0
/// and length 0 ends it, as does room for less than one more header; a descriptor that runs past the end is
/// an error (SPDK reads past it).
pub fn decode_descriptors(area: &[u8]) -> Result<Vec<Descriptor>> {
    let mut out = Vec::new();
    let mut cur = 0usize;
    while cur + DESC_HEADER_LEN <= area.len() {
        let kind = area[cur];
        let len = rd_u32(area, cur + 1) as usize;
        if kind == DESC_PADDING && len == 0 {
            break;
        }
        let start = cur + DESC_HEADER_LEN;
        let left = area.len() - start;
        if len > left {
            return Err(Error::corrupt(format!(
                "descriptor at byte {cur} (type {kind}) claims {len} payload bytes, {left} are left in the page"
            )));
        }
        out.push(Descriptor::parse(kind, &area[start..start + len], cur)?);
        cur = start + len;
    }
    Ok(out)
}

/// Encodes descriptors into an area of `area_len` bytes (zero filled after the last one).
pub fn encode_descriptors(descs: &[Descriptor], area_len: usize) -> Result<Vec<u8>> {
    let total: usize = descs.iter().map(Descriptor::encoded_len).sum();
    if total > area_len {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("descriptors take {total} bytes, the area holds {area_len}"),
        ));
    }
    let mut area = vec![0u8; area_len];
    let mut cur = 0;
    for d in descs {
        d.write(&mut area[cur..])?;
        cur += d.encoded_len();
    }
    Ok(area)
}

// ---------------------------------------------------------------------------------------------------------------
// Metadata pages

/// A metadata page (`struct spdk_blob_md_page`): a page of a blob's chain, or a standalone extent page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MdPage {
    /// The blob the page belongs to. Extent pages keep the id of the blob they were first written for: a
    /// snapshot takes over its origin's extent pages without rewriting them, and SPDK does not check this field
    /// on extent pages.
    pub id: BlobId,
    /// Position in the chain, 0 for the first page (and for extent pages).
    pub sequence_num: u32,
    /// Reserved, 0.
    pub reserved0: u32,
    /// The descriptors, in order.
    pub descriptors: Vec<Descriptor>,
    /// Metadata page index of the next page of the chain, [`INVALID_PAGE`] at the end.
    pub next: u32,
}

impl MdPage {
    /// Decodes a page: length, CRC, then every descriptor.
    pub fn decode(buf: &[u8]) -> Result<MdPage> {
        need_page(buf, "metadata page")?;
        check_crc(buf, "metadata page")?;
        Self::decode_unchecked(buf)
    }

    /// Decodes a page without checking its CRC (for dump tools and fuzzing the descriptor parser).
    pub fn decode_unchecked(buf: &[u8]) -> Result<MdPage> {
        need_page(buf, "metadata page")?;
        Ok(MdPage {
            id: BlobId(rd_u64(buf, 0)),
            sequence_num: rd_u32(buf, 8),
            reserved0: rd_u32(buf, 12),
            descriptors: decode_descriptors(
                &buf[DESCRIPTORS_OFFSET..DESCRIPTORS_OFFSET + DESCRIPTORS_LEN],
            )?,
            next: rd_u32(buf, 4088),
        })
    }

    /// The next page of the chain, if any.
    pub fn next_page(&self) -> Option<u32> {
        (self.next != INVALID_PAGE).then_some(self.next)
    }

    /// The 4096 bytes of the page, CRC included; fails when the descriptors do not fit 4072 bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let area = encode_descriptors(&self.descriptors, DESCRIPTORS_LEN)?;
        let mut b = vec![0u8; PAGE_SIZE];
        wr_u64(&mut b, 0, self.id.0);
        wr_u32(&mut b, 8, self.sequence_num);
        wr_u32(&mut b, 12, self.reserved0);
        b[DESCRIPTORS_OFFSET..DESCRIPTORS_OFFSET + DESCRIPTORS_LEN].copy_from_slice(&area);
        wr_u32(&mut b, 4088, self.next);
        let crc = page_crc(&b);
        wr_u32(&mut b, CRC_OFFSET, crc);
        Ok(b)
    }
}

#[cfg(test)]
pub(crate) mod tests;
