//! The layout of a new store, computed as SPDK's `spdk_bs_init` computes it (and `spdk_lvs_init` before it for
//! an lvstore): super block, the three mask regions, the metadata region, and the clusters the metadata takes.
//!
//! ```text
//! page 0          super block
//! page 1..        used-md-pages mask      ceil((5 + ceil(md_len / 8)) / 4096) pages
//! then            used-clusters mask      reserved for max(md_len, total_clusters) bits (room to grow);
//!                                         the super block records the length for total_clusters bits
//! then            used-blobids mask       as the md-pages mask
//! then            md_len metadata pages
//! clusters 0..md_clusters hold all that and are marked used; data clusters follow
//! ```
//!
//! `md_len` is one page per cluster by default; an lvstore asks for `ratio * total_clusters / 100` pages
//! (`num_md_pages_per_cluster_ratio`, 100 by default), computed in 32 bits as `lvol.c` computes it.

use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    BlobId, Region, SuperBlock, BSTYPE_LEN, BSTYPE_LVOLSTORE, MASK_HEADER_LEN, PAGE_SIZE, VERSION,
};

/// The blobstore's default cluster size (`SPDK_BLOB_OPTS_CLUSTER_SZ`).
pub const DEFAULT_CLUSTER_SIZE: u32 = 1 << 20;
/// The lvstore's default cluster size (`SPDK_LVS_OPTS_CLUSTER_SZ`).
pub const LVS_DEFAULT_CLUSTER_SIZE: u32 = 4 << 20;
/// The lvstore's default metadata pages per 100 clusters.
pub const LVS_DEFAULT_MD_PAGES_RATIO: u32 = 100;

/// What `spdk_bs_init` does to the data clusters of a new store (`enum bs_clear_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InitClear {
    /// Unmap them (the default).
    #[default]
    Unmap,
    /// Write zeroes to them.
    WriteZeroes,
    /// Leave them alone.
    None,
}

/// Options of a new store (`struct spdk_bs_opts`, the fields that shape the disk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitOptions {
    /// Cluster size in bytes; a multiple of 4096.
    pub cluster_size: u32,
    /// Metadata pages; `None` is SPDK's default of one page per cluster.
    pub num_md_pages: Option<u32>,
    /// What to do to the data clusters.
    pub clear: InitClear,
    /// The type tag.
    pub bstype: [u8; BSTYPE_LEN],
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            cluster_size: DEFAULT_CLUSTER_SIZE,
            num_md_pages: None,
            clear: InitClear::Unmap,
            bstype: [0; BSTYPE_LEN],
        }
    }
}

impl InitOptions {
    /// The options `spdk_lvs_init` passes for a device of `num_blocks` blocks of `block_size` bytes: type tag
    /// "LVOLSTORE", `ratio * total_clusters / 100` metadata pages (u32 arithmetic, as `setup_lvs_opts`).
    pub fn lvstore(
        num_blocks: u64,
        block_size: u32,
        cluster_size: u32,
        md_pages_ratio: u32,
        clear: InitClear,
    ) -> Result<InitOptions> {
        if cluster_size < block_size || block_size == 0 {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("cluster size {cluster_size} is smaller than the block size {block_size}"),
            ));
        }
        let total_clusters = (num_blocks / (cluster_size / block_size) as u64) as u32;
        Ok(InitOptions {
            cluster_size,
            num_md_pages: Some(md_pages_ratio.wrapping_mul(total_clusters) / 100),
            clear,
            bstype: BSTYPE_LVOLSTORE,
        })
    }
}

/// A new store's geometry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The super block as `spdk_bs_init` writes it: version 3, not clean, no super blob.
    pub super_block: SuperBlock,
    /// Clusters in the store.
    pub total_clusters: u64,
    /// Clusters taken by the super block, masks and metadata (marked used).
    pub md_clusters: u64,
    /// Pages from the start of the device through the end of the metadata region (zeroed at init).
    pub md_region_pages: u64,
}

/// Computes the layout of a new store on a device of `num_blocks` blocks of `block_size` bytes, with the
/// checks `spdk_bs_init` and `bs_alloc` make (and one of ours: the cluster size must be a multiple of 4 KiB,
/// as every store SPDK can use has it).
pub fn compute(num_blocks: u64, block_size: u32, opts: &InitOptions) -> Result<Layout> {
    let invalid = |m: String| Err(Error::new(ErrorKind::Invalid, m));
    if block_size == 0 || !PAGE_SIZE.is_multiple_of(block_size as usize) {
        return invalid(format!("unsupported block size {block_size}"));
    }
    let cluster = opts.cluster_size;
    if (cluster as usize) < PAGE_SIZE || !(cluster as usize).is_multiple_of(PAGE_SIZE) {
        return invalid(format!(
            "cluster size {cluster} is not a multiple of {PAGE_SIZE}"
        ));
    }
    let dev_size = num_blocks * block_size as u64;
    if dev_size < cluster as u64 {
        return Err(Error::new(
            ErrorKind::NoSpace,
            format!("device of {dev_size} bytes is smaller than a cluster of {cluster}"),
        ));
    }
    if opts.num_md_pages == Some(0) {
        return invalid("a store needs at least one metadata page".into());
    }
    let total_clusters = num_blocks / (cluster / block_size) as u64;
    let md_len: u32 = match opts.num_md_pages {
        Some(n) => n,
        None => u32::try_from(total_clusters).map_err(|_| {
            Error::new(
                ErrorKind::Invalid,
                format!("{total_clusters} clusters need more metadata pages than 2^32"),
            )
        })?,
    };
    let mask_pages =
        |bits: u64| (MASK_HEADER_LEN as u64 + bits.div_ceil(8)).div_ceil(PAGE_SIZE as u64);
    let mut next = 1u64;
    let used_page_mask = Region {
        start: next as u32,
        len: mask_pages(md_len as u64) as u32,
    };
    next += used_page_mask.len as u64;
    let used_cluster_mask = Region {
        start: next as u32,
        len: mask_pages(total_clusters) as u32,
    };
    // Room for the largest cluster mask the metadata could describe, so that the store can grow.
    next += mask_pages(md_len as u64).max(used_cluster_mask.len as u64);
    let used_blobid_mask = Region {
        start: next as u32,
        len: mask_pages(md_len as u64) as u32,
    };
    next += used_blobid_mask.len as u64;
    let md = Region {
        start: next as u32,
        len: md_len,
    };
    next += md_len as u64;
    let pages_per_cluster = cluster as u64 / PAGE_SIZE as u64;
    let md_clusters = next.div_ceil(pages_per_cluster);
    if md_clusters > total_clusters {
        return Err(Error::new(
            ErrorKind::NoSpace,
            format!(
                "metadata takes {md_clusters} clusters, the device has {total_clusters}: use fewer \
                 metadata pages or larger clusters"
            ),
        ));
    }
    Ok(Layout {
        super_block: SuperBlock {
            version: VERSION,
            length: PAGE_SIZE as u32,
            clean: 0,
            super_blob: BlobId::INVALID,
            cluster_size: cluster,
            used_page_mask,
            used_cluster_mask,
            md,
            bstype: opts.bstype,
            used_blobid_mask,
            size: dev_size,
            io_unit_size: block_size,
            md_page_size: 0,
        },
        total_clusters,
        md_clusters,
        md_region_pages: next,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvstore_of_64_mib_with_1_mib_clusters_is_what_spdk_wrote() {
        // SPDK's page 0 of this store is in format/tests.rs (super_block_spdk_bytes).
        let opts = InitOptions::lvstore(131072, 512, 1 << 20, 100, InitClear::Unmap).unwrap();
        assert_eq!(opts.num_md_pages, Some(64));
        let l = compute(131072, 512, &opts).unwrap();
        let sb = &l.super_block;
        assert_eq!(sb.used_page_mask, Region { start: 1, len: 1 });
        assert_eq!(sb.used_cluster_mask, Region { start: 2, len: 1 });
        assert_eq!(sb.used_blobid_mask, Region { start: 3, len: 1 });
        assert_eq!(sb.md, Region { start: 4, len: 64 });
        assert_eq!(
            (l.total_clusters, l.md_clusters, l.md_region_pages),
            (64, 1, 68)
        );
        assert_eq!(sb.clean, 0);
        assert_eq!(sb.super_blob, BlobId::INVALID);
        sb.check_geometry(64 << 20).unwrap();
        // With the super blob set and a clean unload, it is SPDK's page 0 byte for byte.
        let mut done = sb.clone();
        done.super_blob = BlobId::from_page(0);
        done.clean = 1;
        assert_eq!(done.encode(), crate::format::tests::spdk_super());
    }

    #[test]
    fn cluster_mask_region_reserves_room_to_grow() {
        // 40000 md pages, 10000 clusters: the cluster mask is 1 page, its region as large as the md mask's 2.
        let opts = InitOptions {
            cluster_size: 64 << 10,
            num_md_pages: Some(40000),
            ..Default::default()
        };
        let l = compute(10000 * 128, 512, &opts).unwrap();
        let sb = &l.super_block;
        assert_eq!(sb.used_page_mask, Region { start: 1, len: 2 });
        assert_eq!(sb.used_cluster_mask, Region { start: 3, len: 1 });
        assert_eq!(sb.used_blobid_mask, Region { start: 5, len: 2 });
        assert_eq!(sb.md.start, 7);
        assert_eq!(l.md_clusters, (7u64 + 40000).div_ceil(16));
    }

    #[test]
    fn refusals() {
        let d = InitOptions::default();
        assert_eq!(compute(100, 512, &d).unwrap_err().kind, ErrorKind::NoSpace);
        assert_eq!(
            compute(1 << 20, 3000, &d).unwrap_err().kind,
            ErrorKind::Invalid
        );
        let odd = InitOptions {
            cluster_size: 6000,
            ..Default::default()
        };
        assert_eq!(
            compute(1 << 20, 512, &odd).unwrap_err().kind,
            ErrorKind::Invalid
        );
        let many = InitOptions {
            cluster_size: 4096,
            num_md_pages: Some(1000),
            ..Default::default()
        };
        // 1000 md pages need more than the 100 clusters of 4 KiB the device has.
        assert_eq!(
            compute(800, 512, &many).unwrap_err().kind,
            ErrorKind::NoSpace
        );
    }
}
