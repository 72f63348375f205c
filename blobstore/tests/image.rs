//! The loader and checker over a store assembled byte by byte here (not with the crate's encoders): a toy
//! lvstore with 16 KiB clusters on 1 MiB, holding the lvstore super blob, a thick lvol in the old RLE format, a
//! thin lvol whose 1030 clusters span three extent table slots and whose chain has two pages, a snapshot and a
//! partly written clone of it, and an esnap clone. Then the same image dirty, and corrupted in many ways.

use blobstore::format::PAGE_SIZE;
use blobstore::{BlobId, FileDevice, MaskState, MaskType, MemDevice, PendingOp, Problem, Store};
use nvme_proto::crc32c::crc32c;
use proptest::prelude::*;

const CLUSTER: usize = 16 << 10;
const DEV: usize = 1 << 20;
const MD_START: usize = 4;
const MD_LEN: usize = 16;
const LVS_UUID: &str = "7a3e3c9a-52a4-4c2e-9b55-0c6f1f0d2a11";
const THICK_UUID: &str = "11111111-2222-4333-8444-555555555555";
const ESNAP_BDEV: &str = "0e5a9a9a-1b1b-4c4c-8d8d-2e2e2e2e2e2e";

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}
fn le64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}
fn id(page: u32) -> u64 {
    (1 << 32) | page as u64
}

/// A descriptor: type, u32 length, payload.
fn desc(t: u8, payload: &[u8]) -> Vec<u8> {
    let mut d = vec![t];
    d.extend_from_slice(&le32(payload.len() as u32));
    d.extend_from_slice(payload);
    d
}
fn flags(invalid: u64, data_ro: u64, md_ro: u64) -> Vec<u8> {
    desc(3, &[le64(invalid), le64(data_ro), le64(md_ro)].concat())
}
fn xattr(internal: bool, name: &str, value: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(name.len() as u16).to_le_bytes());
    p.extend_from_slice(&(value.len() as u16).to_le_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(value);
    desc(if internal { 4 } else { 2 }, &p)
}
fn c_str(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}
/// An lvol name as lvol creation stores it: the whole 64-byte buffer.
fn lvol_name(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.resize(64, 0);
    v
}
fn rle(runs: &[(u32, u32)]) -> Vec<u8> {
    desc(
        1,
        &runs
            .iter()
            .flat_map(|&(c, n)| [le32(c), le32(n)].concat())
            .collect::<Vec<_>>(),
    )
}
fn extent_table(num_clusters: u64, entries: &[(u32, u32)]) -> Vec<u8> {
    let mut p = le64(num_clusters).to_vec();
    for &(pg, n) in entries {
        p.extend_from_slice(&le32(pg));
        p.extend_from_slice(&le32(n));
    }
    desc(5, &p)
}
fn extent_page_desc(start: u32, clusters: &[u32]) -> Vec<u8> {
    let mut p = le32(start).to_vec();
    for &c in clusters {
        p.extend_from_slice(&le32(c));
    }
    desc(6, &p)
}

/// Seals the CRC of the 4 KiB page at byte `off`.
fn seal(img: &mut [u8], off: usize) {
    let crc = crc32c(&img[off..off + 4092]);
    img[off + 4092..off + 4096].copy_from_slice(&le32(crc));
}

fn md_off(page: usize) -> usize {
    (MD_START + page) * PAGE_SIZE
}

/// Writes metadata page `page`: id, sequence number, descriptors, next, CRC.
fn put_md(img: &mut [u8], page: usize, owner: u64, seq: u32, next: u32, descs: &[Vec<u8>]) {
    let o = md_off(page);
    img[o..o + PAGE_SIZE].fill(0);
    img[o..o + 8].copy_from_slice(&le64(owner));
    img[o + 8..o + 12].copy_from_slice(&le32(seq));
    let area: Vec<u8> = descs.concat();
    assert!(area.len() <= 4072);
    img[o + 16..o + 16 + area.len()].copy_from_slice(&area);
    img[o + 4088..o + 4092].copy_from_slice(&le32(next));
    seal(img, o);
}

fn put_mask(img: &mut [u8], page: usize, kind: u8, bits: u32, set: &[u32]) {
    let o = page * PAGE_SIZE;
    img[o..o + PAGE_SIZE].fill(0);
    img[o] = kind;
    img[o + 1..o + 5].copy_from_slice(&le32(bits));
    for &b in set {
        img[o + 5 + b as usize / 8] |= 1 << (b % 8);
    }
}

const END: u32 = u32::MAX;
const THIN_PROV: u64 = 1;
const INTERNAL: u64 = 2;
const ET: u64 = 4;
const ESNAP: u64 = 8;

const PAGES_USED: &[u32] = &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
const BLOBIDS: &[u32] = &[0, 1, 2, 6, 8, 10];
const CLUSTERS_USED: &[u32] = &[0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14, 15];

/// The toy store, cleanly unloaded.
fn image() -> Vec<u8> {
    let mut img = vec![0u8; DEV];
    // Super block.
    img[0..8].copy_from_slice(b"SPDKBLOB");
    img[8..12].copy_from_slice(&le32(3));
    img[12..16].copy_from_slice(&le32(4096));
    img[16..20].copy_from_slice(&le32(1)); // clean
    img[20..28].copy_from_slice(&le64(id(0))); // super blob
    img[28..32].copy_from_slice(&le32(CLUSTER as u32));
    img[32..40].copy_from_slice(&[le32(1), le32(1)].concat()); // used page mask
    img[40..48].copy_from_slice(&[le32(2), le32(1)].concat()); // used cluster mask
    img[48..56].copy_from_slice(&[le32(MD_START as u32), le32(MD_LEN as u32)].concat());
    img[56..65].copy_from_slice(b"LVOLSTORE");
    img[72..80].copy_from_slice(&[le32(3), le32(1)].concat()); // used blobid mask
    img[80..88].copy_from_slice(&le64(DEV as u64));
    img[88..92].copy_from_slice(&le32(512));
    seal(&mut img, 0);

    // md 0: the lvstore super blob.
    put_md(
        &mut img,
        0,
        id(0),
        0,
        END,
        &[
            flags(ET, 0, 0),
            xattr(false, "uuid", &c_str(LVS_UUID)),
            xattr(false, "name", &c_str("lvs")),
            extent_table(0, &[]),
        ],
    );
    // md 1: thick lvol, RLE: clusters 5, 6, 9; clear method "write zeroes".
    put_md(
        &mut img,
        1,
        id(1),
        0,
        END,
        &[
            flags(0, 0, 3),
            xattr(false, "name", &lvol_name("thick")),
            xattr(false, "uuid", &c_str(THICK_UUID)),
            rle(&[(5, 2), (9, 1)]),
        ],
    );
    // md 2 -> md 5: thin lvol of 1030 clusters (slots 0, 1, 2), renamed (so strlen + 1 name), with a large
    // xattr pushing the extent table onto the second page.
    put_md(
        &mut img,
        2,
        id(2),
        0,
        5,
        &[
            flags(THIN_PROV | ET, 0, 0),
            xattr(false, "name", &c_str("thin")),
            xattr(false, "note", &vec![b'n'; 3900]),
        ],
    );
    put_md(
        &mut img,
        5,
        id(2),
        1,
        END,
        &[extent_table(1030, &[(3, 1), (0, 1), (4, 1)])],
    );
    let mut slot0 = vec![0u32; 512];
    slot0[0] = 10;
    slot0[511] = 11;
    put_md(&mut img, 3, id(2), 0, END, &[extent_page_desc(0, &slot0)]);
    put_md(
        &mut img,
        4,
        id(2),
        0,
        END,
        &[extent_page_desc(1024, &[0, 0, 12, 0, 0, 0])],
    );
    // md 6: snapshot, 2 clusters (13, 14) in extent page md 7, which still carries the clone's id (as SPDK
    // leaves it: the snapshot took over the pages of the blob it was made from).
    put_md(
        &mut img,
        6,
        id(6),
        0,
        END,
        &[
            flags(ET, 1, 0),
            xattr(false, "name", &lvol_name("snap")),
            extent_table(2, &[(7, 1)]),
        ],
    );
    put_md(
        &mut img,
        7,
        id(8),
        0,
        END,
        &[extent_page_desc(0, &[13, 14])],
    );
    // md 8: clone of the snapshot, cluster 1 written (15) in extent page md 9; no uuid xattr.
    put_md(
        &mut img,
        8,
        id(8),
        0,
        END,
        &[
            flags(THIN_PROV | INTERNAL | ET, 0, 0),
            xattr(false, "name", &lvol_name("clone")),
            xattr(true, "SNAP", &le64(id(6))),
            extent_table(2, &[(9, 1)]),
        ],
    );
    put_md(&mut img, 9, id(8), 0, END, &[extent_page_desc(0, &[0, 15])]);
    // md 10: esnap clone of an external bdev, nothing written.
    put_md(
        &mut img,
        10,
        id(10),
        0,
        END,
        &[
            flags(THIN_PROV | INTERNAL | ET | ESNAP, 0, 0),
            xattr(false, "name", &lvol_name("esnap")),
            xattr(true, "EXTSNAP", &c_str(ESNAP_BDEV)),
            extent_table(1, &[(0, 1)]),
        ],
    );
    put_mask(&mut img, 1, 0, MD_LEN as u32, PAGES_USED);
    put_mask(&mut img, 2, 1, (DEV / CLUSTER) as u32, CLUSTERS_USED);
    put_mask(&mut img, 3, 2, MD_LEN as u32, BLOBIDS);
    img
}

/// The same store after a crash: clean = 0, masks as `spdk_bs_init` left them (zero).
fn dirty(mut img: Vec<u8>) -> Vec<u8> {
    img[16..20].copy_from_slice(&le32(0));
    seal(&mut img, 0);
    img[PAGE_SIZE..4 * PAGE_SIZE].fill(0);
    img
}

fn load(img: &[u8]) -> Store {
    Store::load(img).unwrap()
}

fn ones(s: &Store, kind: MaskType) -> Vec<u32> {
    s.masks.get(kind).ones().map(|i| i as u32).collect()
}

#[test]
fn clean_toy_store() {
    let s = load(&image());
    assert_eq!(s.mask_state, MaskState::Clean);
    assert_eq!(s.check(), vec![]);
    assert_eq!(s.total_clusters(), 64);
    assert_eq!(s.md_clusters(), 5);
    assert_eq!(s.total_data_clusters(), 59);
    assert_eq!(s.free_clusters(), 64 - CLUSTERS_USED.len() as u64);
    assert_eq!(s.blobs.len(), 6);
    assert!(s.broken.is_empty());

    let thin = s.blob(BlobId(id(2))).unwrap();
    assert_eq!(thin.md_pages, vec![2, 5]);
    assert_eq!(thin.extent_pages, vec![(0, 3), (2, 4)]);
    assert_eq!(thin.num_clusters, 1030);
    assert_eq!(thin.clusters, vec![(0, 10), (511, 11), (1026, 12)]);
    assert_eq!(thin.cluster(511), Some(11));
    assert_eq!(thin.cluster(512), None);
    assert_eq!(thin.xattr("note").map(|v| v.len()), Some(3900));

    let lvs = s.lvol_store().unwrap();
    assert_eq!(lvs.name, "lvs");
    assert_eq!(lvs.uuid.to_string(), LVS_UUID);
    assert_eq!(lvs.super_blob, BlobId(id(0)));
    assert_eq!((lvs.cluster_size, lvs.block_size), (CLUSTER as u32, 512));
    assert_eq!((lvs.total_data_clusters, lvs.free_clusters), (59, 50));
    let names: Vec<&str> = lvs.lvols.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["thick", "thin", "snap", "clone", "esnap"]);

    let thick = lvs.lvol("thick").unwrap();
    assert_eq!(thick.uuid.unwrap().to_string(), THICK_UUID);
    assert_eq!(thick.unique_id, THICK_UUID);
    assert_eq!((thick.num_clusters, thick.num_allocated_clusters), (3, 3));
    assert!(!thick.thin && !thick.is_snapshot && !thick.is_clone && !thick.read_only);
    assert_eq!(
        thick.clear_method,
        blobstore::format::ClearMethod::WriteZeroes
    );
    assert_eq!(
        s.blob(thick.blob_id).unwrap().extent_format,
        blobstore::store::ExtentFormat::Rle
    );
    assert_eq!(
        s.blob(thick.blob_id).unwrap().clusters,
        vec![(0, 5), (1, 6), (2, 9)]
    );

    let thin = lvs.lvol("thin").unwrap();
    assert!(thin.thin && !thin.is_clone && thin.uuid.is_none());
    assert_eq!((thin.num_clusters, thin.num_allocated_clusters), (1030, 3));
    assert_eq!(thin.unique_id, format!("{LVS_UUID}_{}", id(2)));

    let snap = lvs.lvol("snap").unwrap();
    assert!(snap.is_snapshot && snap.read_only && !snap.thin && !snap.is_clone);
    assert_eq!(snap.clones, vec![BlobId(id(8))]);
    assert_eq!((snap.num_clusters, snap.num_allocated_clusters), (2, 2));

    let clone = lvs.lvol("clone").unwrap();
    assert!(clone.is_clone && clone.thin && !clone.is_snapshot);
    assert_eq!(clone.parent, Some(BlobId(id(6))));
    assert_eq!((clone.num_clusters, clone.num_allocated_clusters), (2, 1));

    let esnap = lvs.lvol("esnap").unwrap();
    assert!(esnap.is_esnap_clone && !esnap.is_clone && esnap.parent.is_none());
    assert_eq!(
        esnap.esnap_id.as_deref(),
        Some(c_str(ESNAP_BDEV).as_slice())
    );

    // The same through a file.
    let path = std::env::temp_dir().join(format!("blobstore-image-{}.img", std::process::id()));
    std::fs::write(&path, image()).unwrap();
    let f = Store::load(&FileDevice::open(&path).unwrap()).unwrap();
    assert_eq!(f.lvol_store().unwrap(), lvs);
    std::fs::write(&path, &image()[..DEV / 2]).unwrap();
    let e = Store::load(&FileDevice::open(&path).unwrap()).unwrap_err();
    assert!(e.msg.contains("larger than the device"), "{e}");
    std::fs::remove_file(&path).unwrap();
    let e = Store::load(&MemDevice(image()[..100].to_vec())).unwrap_err();
    assert!(matches!(e.kind, blobstore::ErrorKind::Io(_)), "{e}");
}

#[test]
fn dirty_toy_store_rebuilds_masks() {
    let clean = load(&image());
    let mut s = load(&dirty(image()));
    assert_eq!(s.mask_state, MaskState::Stale);
    assert_eq!(s.check(), vec![Problem::MasksNotTrusted]);
    // The blobs were found by scanning the metadata, not through the (empty) blobid mask.
    assert_eq!(s.blobs, clean.blobs);
    s.rebuild_masks();
    assert_eq!(s.mask_state, MaskState::Rebuilt);
    assert_eq!(s.check(), vec![]);
    assert_eq!(s.masks, clean.masks);
    assert_eq!(ones(&s, MaskType::UsedPages), PAGES_USED);
    assert_eq!(ones(&s, MaskType::UsedBlobIds), BLOBIDS);
    assert_eq!(ones(&s, MaskType::UsedClusters), CLUSTERS_USED);
    assert_eq!(s.lvol_store().unwrap(), clean.lvol_store().unwrap());

    // A forced scan of the clean store finds the same blobs.
    let forced = Store::load_with(
        image().as_slice(),
        &blobstore::LoadOptions {
            force_recover: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(forced.blobs, clean.blobs);
    let wrong_type = Store::load_with(
        image().as_slice(),
        &blobstore::LoadOptions {
            bstype: *b"BLOBFS\0\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        },
    );
    assert!(wrong_type.is_err());
}

#[test]
fn mask_mismatches() {
    let mut img = image();
    // Cluster 20 marked without an owner, cluster 13 (the snapshot's) not marked, page 11 marked.
    img[2 * PAGE_SIZE + 5 + 20 / 8] |= 1 << (20 % 8);
    img[2 * PAGE_SIZE + 5 + 13 / 8] &= !(1 << (13 % 8));
    img[PAGE_SIZE + 5 + 1] |= 1 << 3;
    let p = load(&img).check();
    assert_eq!(
        p,
        vec![
            Problem::Leaked {
                mask: MaskType::UsedPages,
                index: 11
            },
            Problem::Unmarked {
                mask: MaskType::UsedClusters,
                index: 13
            },
            Problem::Leaked {
                mask: MaskType::UsedClusters,
                index: 20
            },
        ]
    );
}

#[test]
fn double_ownership_and_ranges() {
    let mut img = image();
    // The clone's extent page now claims the snapshot's cluster 14 instead of its own 15; then a metadata
    // cluster and one past the end.
    put_md(&mut img, 9, id(8), 0, END, &[extent_page_desc(0, &[14, 0])]);
    let p = load(&img).check();
    assert!(p.contains(&Problem::ClusterOwnedTwice {
        cluster: 14,
        first: BlobId(id(6)),
        second: BlobId(id(8))
    }));
    assert!(p.contains(&Problem::Leaked {
        mask: MaskType::UsedClusters,
        index: 15
    }));
    put_md(&mut img, 9, id(8), 0, END, &[extent_page_desc(0, &[3, 64])]);
    let p = load(&img).check();
    assert!(p.contains(&Problem::ClusterInMetadata {
        blob: BlobId(id(8)),
        cluster: 3
    }));
    assert!(p.contains(&Problem::ClusterOutOfRange {
        blob: BlobId(id(8)),
        cluster: 64
    }));
    assert!(p.contains(&Problem::Leaked {
        mask: MaskType::UsedClusters,
        index: 15
    }));

    // The clone's extent table now points at the snapshot's extent page.
    let mut img = image();
    put_md(
        &mut img,
        8,
        id(8),
        0,
        END,
        &[
            flags(THIN_PROV | INTERNAL | ET, 0, 0),
            xattr(false, "name", &lvol_name("clone")),
            xattr(true, "SNAP", &le64(id(6))),
            extent_table(2, &[(7, 1)]),
        ],
    );
    let p = load(&img).check();
    assert!(p.contains(&Problem::PageOwnedTwice {
        page: 7,
        first: BlobId(id(6)),
        second: BlobId(id(8))
    }));
    assert!(p.contains(&Problem::ClusterOwnedTwice {
        cluster: 13,
        first: BlobId(id(6)),
        second: BlobId(id(8))
    }));
    assert!(p.contains(&Problem::Leaked {
        mask: MaskType::UsedPages,
        index: 9
    }));
}

/// Rewrites the clone (md 8) with these extra internal xattrs and this SNAP value.
fn clone_with(img: &mut [u8], snap: u64, extra: &[Vec<u8>]) {
    let mut d = vec![
        flags(THIN_PROV | INTERNAL | ET, 0, 0),
        xattr(false, "name", &lvol_name("clone")),
        xattr(true, "SNAP", &le64(snap)),
    ];
    d.extend_from_slice(extra);
    d.push(extent_table(2, &[(9, 1)]));
    put_md(img, 8, id(8), 0, END, &d);
}

#[test]
fn parent_chains() {
    let mut img = image();
    clone_with(&mut img, id(12), &[]);
    let s = load(&img);
    assert_eq!(
        s.check(),
        vec![Problem::MissingParent {
            blob: BlobId(id(8)),
            parent: BlobId(id(12))
        }]
    );
    assert!(!s.lvol_store().unwrap().lvol("snap").unwrap().is_snapshot);

    // The clone's parent is the thick lvol: writable.
    let mut img = image();
    clone_with(&mut img, id(1), &[]);
    assert_eq!(
        load(&img).check(),
        vec![Problem::ParentNotReadOnly {
            blob: BlobId(id(8)),
            parent: BlobId(id(1))
        }]
    );

    // Snapshot and clone point at each other.
    let mut img = image();
    put_md(
        &mut img,
        6,
        id(6),
        0,
        END,
        &[
            flags(THIN_PROV | INTERNAL | ET, 1, 0),
            xattr(false, "name", &lvol_name("snap")),
            xattr(true, "SNAP", &le64(id(8))),
            extent_table(2, &[(7, 1)]),
        ],
    );
    let p = load(&img).check();
    assert!(
        p.contains(&Problem::ParentCycle {
            blob: BlobId(id(6))
        }),
        "{p:?}"
    );
    assert!(
        p.contains(&Problem::ParentCycle {
            blob: BlobId(id(8))
        }),
        "{p:?}"
    );
    assert!(p.contains(&Problem::ParentNotReadOnly {
        blob: BlobId(id(6)),
        parent: BlobId(id(8))
    }));

    // An interrupted snapshot deletion.
    let mut img = image();
    clone_with(&mut img, id(6), &[xattr(true, "SNAPRM", &le64(id(1)))]);
    assert_eq!(
        load(&img).check(),
        vec![Problem::Interrupted {
            blob: BlobId(id(8)),
            op: PendingOp::SnapshotPendingRemoval(BlobId(id(1)))
        }]
    );
}

fn bad_blob(img: &[u8], page: u32, what: &str) -> Store {
    let s = load(img);
    let b = s
        .broken
        .iter()
        .find(|b| b.id == BlobId(id(page)))
        .unwrap_or_else(|| panic!("blob at md {page} should be broken ({what})"));
    assert!(
        b.error.to_string().contains(what),
        "{} does not say {what:?}",
        b.error
    );
    assert!(s
        .check()
        .iter()
        .any(|p| matches!(p, Problem::BadBlob { blob, .. } if blob.page() == page)));
    s
}

#[test]
fn broken_blobs() {
    // CRC of the thin lvol's second chain page.
    let mut img = image();
    img[md_off(5) + 100] ^= 1;
    let s = bad_blob(&img, 2, "crc");
    assert_eq!(s.broken[0].md_pages, vec![2]);
    let p = s.check();
    for page in [3, 4, 5] {
        assert!(p.contains(&Problem::Leaked {
            mask: MaskType::UsedPages,
            index: page
        }));
    }
    for c in [10, 11, 12] {
        assert!(p.contains(&Problem::Leaked {
            mask: MaskType::UsedClusters,
            index: c
        }));
    }
    // The others still load.
    assert_eq!(s.blobs.len(), 5);

    let mut img = image();
    put_md(
        &mut img,
        2,
        id(2),
        0,
        200,
        &[
            flags(THIN_PROV | ET, 0, 0),
            xattr(false, "name", &c_str("thin")),
        ],
    );
    bad_blob(&img, 2, "outside the metadata region");

    let mut img = image();
    put_md(
        &mut img,
        2,
        id(2),
        0,
        2,
        &[
            flags(THIN_PROV | ET, 0, 0),
            xattr(false, "name", &c_str("thin")),
        ],
    );
    bad_blob(&img, 2, "loops");

    let mut img = image();
    put_md(
        &mut img,
        5,
        id(2),
        3,
        END,
        &[extent_table(1030, &[(3, 1), (0, 1), (4, 1)])],
    );
    bad_blob(&img, 2, "sequence number 3");

    let mut img = image();
    put_md(
        &mut img,
        5,
        id(1),
        1,
        END,
        &[extent_table(1030, &[(3, 1), (0, 1), (4, 1)])],
    );
    bad_blob(&img, 2, "belongs to blob 0x100000001");

    let mut img = image();
    put_md(
        &mut img,
        5,
        id(2),
        1,
        END,
        &[extent_table(1030, &[(3, 1), (4, 1)])],
    );
    bad_blob(&img, 2, "2 slots");

    let mut img = image();
    put_md(
        &mut img,
        4,
        id(2),
        0,
        END,
        &[extent_page_desc(1024, &[0, 0, 12])],
    );
    bad_blob(&img, 2, "expected 6");

    let mut img = image();
    put_md(
        &mut img,
        4,
        id(2),
        0,
        END,
        &[extent_page_desc(1000, &[0, 0, 12, 0, 0, 0])],
    );
    bad_blob(&img, 2, "expected 1024");

    let mut img = image();
    put_md(&mut img, 7, id(8), 0, END, &[extent_page_desc(0, &[13, 0])]);
    bad_blob(&img, 6, "unallocated in a thick blob");

    let mut img = image();
    put_md(
        &mut img,
        1,
        id(1),
        0,
        END,
        &[
            flags(0x10, 0, 0),
            xattr(false, "name", &lvol_name("thick")),
            rle(&[(5, 3)]),
        ],
    );
    let s = bad_blob(&img, 1, "unknown invalid_flags");
    assert_eq!(s.broken[0].error.kind, blobstore::ErrorKind::NotSupported);

    let mut img = image();
    put_md(
        &mut img,
        1,
        id(1),
        0,
        END,
        &[
            flags(0, 0, 0),
            xattr(false, "name", &lvol_name("thick")),
            rle(&[(5, 2), (0, 1)]),
        ],
    );
    bad_blob(&img, 1, "thick blob");

    let mut img = image();
    put_md(
        &mut img,
        1,
        id(1),
        0,
        END,
        &[flags(0, 0, 0), rle(&[(5, 3)]), extent_table(0, &[])],
    );
    bad_blob(&img, 1, "extent RLE and extent table");

    let mut img = image();
    clone_with(&mut img, id(6), &[]);
    put_md(
        &mut img,
        10,
        id(10),
        0,
        END,
        &[
            flags(THIN_PROV | ET | ESNAP, 0, 0),
            extent_table(1, &[(0, 1)]),
        ],
    );
    bad_blob(&img, 10, "EXTSNAP");

    // Unknown descriptor types and data_ro / md_ro bits are tolerated, as SPDK tolerates them.
    let mut img = image();
    put_md(
        &mut img,
        1,
        id(1),
        0,
        END,
        &[
            flags(0, 0x100, 0x4),
            xattr(false, "name", &lvol_name("thick")),
            desc(42, b"future"),
            rle(&[(5, 2), (9, 1)]),
        ],
    );
    let s = load(&img);
    assert_eq!(s.check(), vec![]);
    let b = s.blob(BlobId(id(1))).unwrap();
    assert_eq!(b.unknown_descriptors, vec![42]);
    assert!(b.read_only() && b.flags.md_ro());
}

#[test]
fn lvstore_rules() {
    let mut img = image();
    put_md(
        &mut img,
        8,
        id(8),
        0,
        END,
        &[flags(THIN_PROV | ET, 0, 0), extent_table(2, &[(9, 1)])],
    );
    let e = load(&img).lvol_store().unwrap_err();
    assert!(e.msg.contains("name"), "{e}");

    let mut img = image();
    put_md(
        &mut img,
        0,
        id(0),
        0,
        END,
        &[
            flags(ET, 0, 0),
            xattr(false, "uuid", LVS_UUID.as_bytes()),
            xattr(false, "name", b"lvs\0"),
        ],
    );
    let e = load(&img).lvol_store().unwrap_err();
    assert!(e.msg.contains("uuid"), "{e}");

    let mut img = image();
    img[56..72].copy_from_slice(b"BLOBFS\0\0\0\0\0\0\0\0\0\0");
    seal(&mut img, 0);
    assert_eq!(
        load(&img).lvol_store().unwrap_err().kind,
        blobstore::ErrorKind::Invalid
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random bytes written into the masks and metadata, every page resealed so that the corruption reaches
    /// the parsers, clean or dirty: loading, checking, rebuilding and the lvstore view never panic.
    #[test]
    fn corrupted_images_never_panic(
        edits in prop::collection::vec((PAGE_SIZE..(MD_START + MD_LEN) * PAGE_SIZE, any::<u8>()), 1..40),
        dirty_store in any::<bool>(),
    ) {
        let mut img = if dirty_store { dirty(image()) } else { image() };
        for (o, v) in edits {
            img[o] = v;
        }
        for page in 0..MD_LEN {
            seal(&mut img, md_off(page));
        }
        if let Ok(mut s) = Store::load(img.as_slice()) {
            let _ = s.check();
            let _ = s.lvol_store();
            s.rebuild_masks();
            let _ = s.check();
        }
    }
}

#[test]
fn pre_v3_layout() {
    // Version 2: no blobid mask (so SPDK always scans), size and io_unit_size 0 (device size, 4096).
    let mut img = image();
    img[8..12].copy_from_slice(&le32(2));
    img[72..80].fill(0);
    img[80..92].fill(0);
    seal(&mut img, 0);
    img[3 * PAGE_SIZE..4 * PAGE_SIZE].fill(0);
    let clean = load(&image());
    let mut s = load(&img);
    assert!(s.super_block.is_clean() && !s.super_block.has_blobid_mask());
    assert_eq!(s.mask_state, MaskState::Stale);
    assert_eq!(s.super_block.io_unit(), 4096);
    assert_eq!(s.total_clusters(), 64);
    assert_eq!(s.blobs, clean.blobs);
    s.rebuild_masks();
    assert_eq!(s.check(), vec![]);
    assert_eq!(s.masks, clean.masks);
}
