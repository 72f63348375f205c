//! Format tests against bytes that do not come from our encoder: pages SPDK v24.05 wrote (an lvstore on a
//! 64 MiB aio file with 1 MiB clusters: thick lvol, thin lvol, snapshot of the thick one, clone of the
//! snapshot), with SPDK's own CRCs, and pages assembled by hand from the documented offsets.

use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A 4 KiB page with these byte runs (offset, hex) and zeroes elsewhere.
fn page_from(runs: &[(usize, &str)]) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    for (o, h) in runs {
        let b = hex(h);
        p[*o..*o + b.len()].copy_from_slice(&b);
    }
    p
}

fn put(p: &mut [u8], o: usize, b: &[u8]) {
    p[o..o + b.len()].copy_from_slice(b);
}

/// Page 0 as SPDK wrote it after a clean unload; the CRC at 4092 is SPDK's.
pub(crate) fn spdk_super() -> Vec<u8> {
    page_from(&[
        (
            0,
            "5350444b424c4f420300000000100000010000000000000001000000000010000100000001000000020000000100000004000000400000004c564f4c53544f524500000000000000030000000100000000000004000000000002",
        ),
        (4092, "4676fdce"),
    ])
}

/// The lvstore's super blob (md page 0): FLAGS, xattrs "uuid" and "name", an empty EXTENT_TABLE.
pub(crate) fn spdk_super_blob_page() -> Vec<u8> {
    page_from(&[
        (4, "01"),
        (16, "031800000004"),
        (
            45,
            "022d000000040025007575696464656561346436352d373435632d343361632d383437382d39663133396665613737656100020d000000040005006e616d656c767330000508",
        ),
        (4088, "ffffffffe9ca1d23"),
    ])
}

/// The clone made by the snapshot (md page 1): thin, internal SNAP, 3 unallocated clusters.
pub(crate) fn spdk_clone_page() -> Vec<u8> {
    page_from(&[
        (0, "0100000001"),
        (16, "031800000007"),
        (45, "0248000000040040006e616d65746869636b30"),
        (
            122,
            "022d000000040025007575696439613062343533662d653361362d343138652d616637632d35313161633736393932333200041000000004000800534e41500400000001000000051000000003",
        ),
        (210, "01"),
        (4088, "ffffffffffbd1570"),
    ])
}

/// The snapshot's extent page (md page 2): clusters 1, 2, 3. Its id is still the clone's.
pub(crate) fn spdk_extent_page() -> Vec<u8> {
    page_from(&[
        (0, "0100000001"),
        (16, "061000000000000000010000000200000003"),
        (4088, "ffffffffc0a5a03d"),
    ])
}

#[test]
fn super_block_spdk_bytes() {
    let raw = spdk_super();
    let sb = SuperBlock::decode(&raw).unwrap();
    assert_eq!(
        sb,
        SuperBlock {
            version: 3,
            length: 4096,
            clean: 1,
            super_blob: BlobId(0x1_0000_0000),
            cluster_size: 1 << 20,
            used_page_mask: Region { start: 1, len: 1 },
            used_cluster_mask: Region { start: 2, len: 1 },
            md: Region { start: 4, len: 64 },
            bstype: BSTYPE_LVOLSTORE,
            used_blobid_mask: Region { start: 3, len: 1 },
            size: 64 << 20,
            io_unit_size: 512,
            md_page_size: 0,
        }
    );
    assert!(sb.is_clean() && sb.has_blobid_mask());
    assert_eq!(sb.bstype_str(), "LVOLSTORE");
    assert_eq!(sb.total_clusters(64 << 20), 64);
    assert_eq!(sb.md_clusters(), 1);
    sb.check_geometry(64 << 20).unwrap();
    assert_eq!(
        sb.encode(),
        raw,
        "encode must reproduce SPDK's page, CRC included"
    );
}

#[test]
fn super_block_hand_assembled() {
    // The documented offsets, filled in one by one; dirty, no super blob, 4 KiB io units, 4 MiB clusters.
    let mut p = vec![0u8; PAGE_SIZE];
    put(&mut p, 0, b"SPDKBLOB");
    put(&mut p, 8, &3u32.to_le_bytes()); // version
    put(&mut p, 12, &4096u32.to_le_bytes()); // length
    put(&mut p, 16, &0u32.to_le_bytes()); // clean
    put(&mut p, 20, &u64::MAX.to_le_bytes()); // super_blob: none
    put(&mut p, 28, &(4u32 << 20).to_le_bytes()); // cluster_size
    put(&mut p, 32, &[1, 0, 0, 0, 1, 0, 0, 0]); // used page mask 1 +1
    put(&mut p, 40, &[2, 0, 0, 0, 1, 0, 0, 0]); // used cluster mask 2 +1
    put(&mut p, 48, &[4, 0, 0, 0, 0, 1, 0, 0]); // md 4 +256
    put(&mut p, 56, b"LVOLSTORE"); // bstype, NUL padded to 16
    put(&mut p, 72, &[3, 0, 0, 0, 1, 0, 0, 0]); // used blobid mask 3 +1
    put(&mut p, 80, &(1u64 << 30).to_le_bytes()); // size 1 GiB
    put(&mut p, 88, &4096u32.to_le_bytes()); // io_unit_size
    let crc = crc32c(&p[..4092]);
    put(&mut p, 4092, &crc.to_le_bytes());

    let sb = SuperBlock::decode(&p).unwrap();
    assert!(!sb.is_clean());
    assert_eq!(sb.super_blob, BlobId::INVALID);
    assert_eq!(sb.md, Region { start: 4, len: 256 });
    assert_eq!(sb.total_clusters(1 << 30), 256);
    assert_eq!(sb.pages_per_cluster(), 1024);
    assert_eq!(sb.md_clusters(), 1);
    sb.check_geometry(1 << 30).unwrap();
    assert_eq!(sb.encode(), p);

    // The 25.05+ md_page_size field at 92: 4096 is accepted, anything else is not implemented.
    let mut v = p.clone();
    put(&mut v, 92, &4096u32.to_le_bytes());
    let c = crc32c(&v[..4092]);
    put(&mut v, 4092, &c.to_le_bytes());
    let sb2 = SuperBlock::decode(&v).unwrap();
    assert_eq!(sb2.md_page_size, 4096);
    sb2.check_geometry(1 << 30).unwrap();
    put(&mut v, 92, &16384u32.to_le_bytes());
    let c = crc32c(&v[..4092]);
    put(&mut v, 4092, &c.to_le_bytes());
    let e = SuperBlock::decode(&v)
        .unwrap()
        .check_geometry(1 << 30)
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotSupported, "{e}");
}

#[test]
fn super_block_rejects() {
    let good = spdk_super();
    let reseal = |mut p: Vec<u8>| {
        let c = crc32c(&p[..4092]);
        put(&mut p, 4092, &c.to_le_bytes());
        p
    };
    let e = SuperBlock::decode(&good[..4095]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    let mut p = good.clone();
    p[0] = b'X';
    assert!(SuperBlock::decode(&reseal(p))
        .unwrap_err()
        .msg
        .contains("signature"));
    let mut p = good.clone();
    p[100] = 1; // reserved byte changed, CRC not updated
    assert!(SuperBlock::decode(&p).unwrap_err().msg.contains("crc"));
    for v in [0u32, 4] {
        let mut p = good.clone();
        put(&mut p, 8, &v.to_le_bytes());
        assert_eq!(
            SuperBlock::decode(&reseal(p)).unwrap_err().kind,
            ErrorKind::NotSupported
        );
    }
    let sb = SuperBlock::decode(&good).unwrap();
    // Larger than the device: SPDK refuses (EILSEQ).
    assert!(sb.check_geometry(32 << 20).is_err());
    let mut s = sb.clone();
    s.cluster_size = 6000;
    assert!(s
        .check_geometry(64 << 20)
        .unwrap_err()
        .msg
        .contains("cluster size"));
    let mut s = sb.clone();
    s.md.len = 20000;
    assert!(s.check_geometry(64 << 20).is_err());
    let mut s = sb.clone();
    s.used_page_mask.start = 0;
    assert!(s.check_geometry(64 << 20).is_err());
    let mut s = sb;
    s.io_unit_size = 3000;
    assert!(s.check_geometry(64 << 20).is_err());
}

#[test]
fn md_page_spdk_super_blob() {
    let raw = spdk_super_blob_page();
    let p = MdPage::decode(&raw).unwrap();
    assert_eq!(p.id, BlobId::from_page(0));
    assert_eq!(p.sequence_num, 0);
    assert_eq!(p.next_page(), None);
    assert_eq!(
        p.descriptors,
        vec![
            Descriptor::Flags(Flags {
                invalid: Flags::EXTENT_TABLE,
                data_ro: 0,
                md_ro: 0
            }),
            Descriptor::Xattr(Xattr::new(
                "uuid",
                &b"deea4d65-745c-43ac-8478-9f139fea77ea\0"[..]
            )),
            Descriptor::Xattr(Xattr::new("name", &b"lvs0\0"[..])),
            Descriptor::ExtentTable {
                num_clusters: 0,
                entries: vec![]
            },
        ]
    );
    assert_eq!(p.encode().unwrap(), raw);
}

#[test]
fn md_page_spdk_clone_and_extent_page() {
    let raw = spdk_clone_page();
    let p = MdPage::decode(&raw).unwrap();
    assert_eq!(p.id, BlobId(0x1_0000_0001));
    let mut name = b"thick0".to_vec();
    name.resize(64, 0);
    assert_eq!(
        p.descriptors,
        vec![
            Descriptor::Flags(Flags {
                invalid: Flags::THIN_PROV | Flags::INTERNAL_XATTR | Flags::EXTENT_TABLE,
                data_ro: 0,
                md_ro: 0
            }),
            Descriptor::Xattr(Xattr::new("name", name)),
            Descriptor::Xattr(Xattr::new(
                "uuid",
                &b"9a0b453f-e3a6-418e-af7c-511ac7699232\0"[..]
            )),
            Descriptor::XattrInternal(Xattr::new("SNAP", 0x1_0000_0004u64.to_le_bytes())),
            Descriptor::ExtentTable {
                num_clusters: 3,
                entries: vec![ExtentTableEntry {
                    page_idx: 0,
                    num_pages: 1
                }]
            },
        ]
    );
    assert_eq!(p.encode().unwrap(), raw);

    let raw = spdk_extent_page();
    let e = MdPage::decode(&raw).unwrap();
    assert_eq!(
        e.id,
        BlobId(0x1_0000_0001),
        "extent pages keep the id of the blob they were written for"
    );
    assert_eq!(
        e.descriptors,
        vec![Descriptor::ExtentPage {
            start_cluster_idx: 0,
            clusters: vec![1, 2, 3]
        }]
    );
    assert_eq!(e.encode().unwrap(), raw);
}

#[test]
fn md_page_hand_assembled_rle_xattr_flags() {
    // Blob 0x100000007, second page of its chain (sequence 1), next page 9:
    //   FLAGS (thin, read-only, clear method "none"), XATTR "k"="v1", XATTR_INTERNAL "SNAP"=0x100000002,
    //   EXTENT_RLE [(5, 2), (0, 3), (40, 1)].
    let mut p = vec![0u8; PAGE_SIZE];
    put(&mut p, 0, &0x1_0000_0007u64.to_le_bytes());
    put(&mut p, 8, &1u32.to_le_bytes());
    let mut o = 16;
    put(&mut p, o, &[3, 24, 0, 0, 0]); // FLAGS, 24 bytes
    put(&mut p, o + 5, &1u64.to_le_bytes()); // invalid: THIN_PROV
    put(&mut p, o + 13, &1u64.to_le_bytes()); // data_ro: READ_ONLY
    put(&mut p, o + 21, &1u64.to_le_bytes()); // md_ro: clear method 1
    o += 29;
    put(&mut p, o, &[2, 7, 0, 0, 0, 1, 0, 2, 0]); // XATTR, length 4 + 1 + 2, name 1, value 2
    put(&mut p, o + 9, b"kv1");
    o += 12;
    put(&mut p, o, &[4, 16, 0, 0, 0, 4, 0, 8, 0]); // XATTR_INTERNAL, 4 + 4 + 8
    put(&mut p, o + 9, b"SNAP");
    put(&mut p, o + 13, &0x1_0000_0002u64.to_le_bytes());
    o += 21;
    put(&mut p, o, &[1, 24, 0, 0, 0]); // EXTENT_RLE, 3 runs
    for (i, (c, n)) in [(5u32, 2u32), (0, 3), (40, 1)].iter().enumerate() {
        put(&mut p, o + 5 + 8 * i, &c.to_le_bytes());
        put(&mut p, o + 9 + 8 * i, &n.to_le_bytes());
    }
    put(&mut p, 4088, &9u32.to_le_bytes());
    let crc = crc32c(&p[..4092]);
    put(&mut p, 4092, &crc.to_le_bytes());

    let page = MdPage::decode(&p).unwrap();
    assert_eq!(page.id, BlobId::from_page(7));
    assert_eq!(page.sequence_num, 1);
    assert_eq!(page.next_page(), Some(9));
    let Descriptor::Flags(f) = page.descriptors[0] else {
        panic!("{:?}", page.descriptors[0])
    };
    assert!(f.thin() && f.data_ro() && f.md_ro() && !f.extent_table());
    assert_eq!(f.clear_method(), ClearMethod::None);
    assert_eq!(
        page.descriptors[1],
        Descriptor::Xattr(Xattr::new("k", "v1"))
    );
    assert_eq!(
        page.descriptors[2],
        Descriptor::XattrInternal(Xattr::new("SNAP", 0x1_0000_0002u64.to_le_bytes()))
    );
    assert_eq!(
        page.descriptors[3],
        Descriptor::ExtentRle(vec![
            Extent {
                cluster_idx: 5,
                length: 2
            },
            Extent {
                cluster_idx: 0,
                length: 3
            },
            Extent {
                cluster_idx: 40,
                length: 1
            },
        ])
    );
    assert_eq!(page.descriptors.len(), 4);
    assert_eq!(page.encode().unwrap(), p);
}

#[test]
fn mask_spdk_and_hand_bytes() {
    // The used-clusters mask SPDK wrote: type 1, 64 bits, clusters 0..3.
    let raw = page_from(&[(0, "01400000000f")]);
    let m = Mask::decode(&raw).unwrap();
    assert_eq!(m.kind, MaskType::UsedClusters);
    assert_eq!(m.bits.len(), 64);
    assert_eq!(m.bits.ones().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    assert_eq!(m.encode(1).unwrap(), raw);

    // Hand-built: used-blobids, 13 bits, bits 0, 1, 3, 9, 12 (byte 5 = 0b0000_1011, byte 6 = 0b0001_0010); a
    // stray bit past the length (bit 13) is ignored, as SPDK ignores it.
    let mut p = vec![0u8; PAGE_SIZE];
    put(&mut p, 0, &[2, 13, 0, 0, 0, 0b0000_1011, 0b0011_0010]);
    let m = Mask::decode(&p).unwrap();
    assert_eq!(m.kind, MaskType::UsedBlobIds);
    assert_eq!(m.bits.ones().collect::<Vec<_>>(), vec![0, 1, 3, 9, 12]);
    p[6] = 0b0001_0010;
    assert_eq!(m.encode(1).unwrap(), p);

    // Lengths that do not fit, unknown types.
    let mut p = vec![0u8; PAGE_SIZE];
    put(&mut p, 0, &[0]);
    put(&mut p, 1, &(4091u32 * 8 + 1).to_le_bytes());
    assert!(Mask::decode(&p).unwrap_err().msg.contains("holds"));
    put(&mut p, 1, &(4091u32 * 8).to_le_bytes());
    assert_eq!(Mask::decode(&p).unwrap().bits.len(), 4091 * 8);
    p[0] = 3;
    assert!(Mask::decode(&p).unwrap_err().msg.contains("unknown type"));
    assert!(Mask::decode(&[0, 0, 0]).is_err());
    let big = Mask {
        kind: MaskType::UsedPages,
        bits: Bitmap::new(4092 * 8),
    };
    assert_eq!(big.encode(1).unwrap_err().kind, ErrorKind::Invalid);
    assert_eq!(big.encode(2).unwrap().len(), 2 * PAGE_SIZE);
}

#[test]
fn blob_ids() {
    assert_eq!(BlobId::from_page(0), BlobId(0x1_0000_0000));
    assert_eq!(BlobId::from_page(u32::MAX), BlobId(0x1_FFFF_FFFF));
    assert_eq!(BlobId(0x1_0000_002a).page(), 42);
    assert!(BlobId(0x1_0000_002a).is_well_formed());
    assert!(!BlobId::INVALID.is_well_formed());
    assert!(!BlobId(42).is_well_formed());
    assert_eq!(BlobId(0x1_0000_0005).to_string(), "0x100000005");
}

/// A page holding `area` as descriptors, CRC sealed.
fn page_with_area(area: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    put(&mut p, 16, area);
    put(&mut p, 4088, &INVALID_PAGE.to_le_bytes());
    let crc = crc32c(&p[..4092]);
    put(&mut p, 4092, &crc.to_le_bytes());
    p
}

#[test]
fn descriptor_length_rules() {
    let err = |area: &[u8]| MdPage::decode(&page_with_area(area)).unwrap_err().msg;
    assert!(err(&[3, 23, 0, 0, 0]).contains("flags"));
    assert!(err(&[1, 0, 0, 0, 0]).contains("extent RLE"));
    assert!(err(&[1, 12, 0, 0, 0]).contains("extent RLE"));
    assert!(err(&[2, 6, 0, 0, 0, 1, 0, 2, 0, b'a', b'b']).contains("xattr"));
    assert!(err(&[4, 3, 0, 0, 0, 0, 0, 0]).contains("internal xattr"));
    assert!(err(&[5, 4, 0, 0, 0, 0, 0, 0, 0]).contains("extent table"));
    assert!(err(&[5, 12, 0, 0, 0]).contains("extent table"));
    assert!(err(&[6, 4, 0, 0, 0]).contains("extent page"));
    assert!(err(&[6, 6, 0, 0, 0]).contains("extent page"));
    // A descriptor running past the area.
    assert!(err(&[2, 0xf0, 0x0f, 0, 0]).contains("left in the page"));
    // Padding with a length is skipped; unknown types are kept; type 0 length 0 ends the page.
    let p = MdPage::decode(&page_with_area(&[
        0, 2, 0, 0, 0, 0, 0, 9, 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0,
    ]))
    .unwrap();
    assert_eq!(
        p.descriptors,
        vec![
            Descriptor::Padding(2),
            Descriptor::Unknown {
                kind: 9,
                payload: vec![7]
            }
        ]
    );
    // A descriptor may end exactly at the end of the area, and fewer than 5 bytes left end it.
    let mut area = vec![0u8; DESCRIPTORS_LEN];
    area[0] = 9;
    area[1..5].copy_from_slice(&(DESCRIPTORS_LEN as u32 - 5 - 3).to_le_bytes());
    let p = MdPage::decode(&page_with_area(&area)).unwrap();
    assert_eq!(p.descriptors.len(), 1);
    area[1..5].copy_from_slice(&(DESCRIPTORS_LEN as u32 - 5).to_le_bytes());
    assert_eq!(
        MdPage::decode(&page_with_area(&area))
            .unwrap()
            .descriptors
            .len(),
        1
    );
}

#[test]
fn encode_refuses_what_does_not_fit() {
    let big = MdPage {
        id: BlobId::from_page(1),
        sequence_num: 0,
        reserved0: 0,
        descriptors: vec![Descriptor::Xattr(Xattr::new("x", vec![0u8; 4072 - 5 - 4]))],
        next: INVALID_PAGE,
    };
    assert_eq!(big.encode().unwrap_err().kind, ErrorKind::Invalid);
    let fits = MdPage {
        descriptors: vec![Descriptor::Xattr(Xattr::new("x", vec![0u8; 4072 - 5 - 5]))],
        ..big.clone()
    };
    assert_eq!(MdPage::decode(&fits.encode().unwrap()).unwrap(), fits);
    let end = MdPage {
        descriptors: vec![Descriptor::Padding(0)],
        ..big
    };
    assert_eq!(end.encode().unwrap_err().kind, ErrorKind::Invalid);
}

fn arb_xattr() -> impl Strategy<Value = Xattr> {
    (
        prop::collection::vec(any::<u8>(), 0..20),
        prop::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(n, v)| Xattr::new(n, v))
}

fn arb_descriptor() -> impl Strategy<Value = Descriptor> {
    prop_oneof![
        (1u32..30).prop_map(Descriptor::Padding),
        prop::collection::vec((any::<u32>(), any::<u32>()), 1..20).prop_map(|v| {
            Descriptor::ExtentRle(
                v.into_iter()
                    .map(|(cluster_idx, length)| Extent {
                        cluster_idx,
                        length,
                    })
                    .collect(),
            )
        }),
        arb_xattr().prop_map(Descriptor::Xattr),
        arb_xattr().prop_map(Descriptor::XattrInternal),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(invalid, data_ro, md_ro)| {
            Descriptor::Flags(Flags {
                invalid,
                data_ro,
                md_ro,
            })
        }),
        (
            any::<u64>(),
            prop::collection::vec((any::<u32>(), any::<u32>()), 0..20)
        )
            .prop_map(|(n, v)| {
                Descriptor::ExtentTable {
                    num_clusters: n,
                    entries: v
                        .into_iter()
                        .map(|(page_idx, num_pages)| ExtentTableEntry {
                            page_idx,
                            num_pages,
                        })
                        .collect(),
                }
            }),
        (any::<u32>(), prop::collection::vec(any::<u32>(), 1..40)).prop_map(|(s, c)| {
            Descriptor::ExtentPage {
                start_cluster_idx: s,
                clusters: c,
            }
        }),
        (7u8..=255, prop::collection::vec(any::<u8>(), 0..30))
            .prop_map(|(kind, payload)| Descriptor::Unknown { kind, payload }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes never panic any decoder, with the CRC left as is or made right (so that the
    /// descriptor parser is reached).
    #[test]
    fn decoders_never_panic(mut page in prop::collection::vec(any::<u8>(), 0..4200), seal in any::<bool>()) {
        if seal && page.len() >= PAGE_SIZE {
            let c = crc32c(&page[..4092]);
            page[4092..4096].copy_from_slice(&c.to_le_bytes());
        }
        let _ = SuperBlock::decode(&page).map(|s| s.check_geometry(u64::MAX));
        let _ = MdPage::decode(&page);
        let _ = MdPage::decode_unchecked(&page);
        let _ = Mask::decode(&page);
        let _ = decode_descriptors(&page);
    }

    /// Descriptor streams built from valid-looking headers with arbitrary lengths and payloads.
    #[test]
    fn descriptor_walk_never_panics(parts in prop::collection::vec((0u8..9, 0u32..5000, prop::collection::vec(any::<u8>(), 0..64)), 0..40)) {
        let mut area = Vec::new();
        for (t, l, payload) in parts {
            area.push(t);
            area.extend_from_slice(&l.to_le_bytes());
            area.extend_from_slice(&payload);
        }
        area.resize(DESCRIPTORS_LEN, 0);
        let _ = MdPage::decode(&page_with_area(&area));
    }

    /// What we encode decodes to the same descriptors.
    #[test]
    fn descriptors_round_trip(descs in prop::collection::vec(arb_descriptor(), 0..12), seq in any::<u32>(), next in any::<u32>()) {
        let page = MdPage { id: BlobId::from_page(3), sequence_num: seq, reserved0: 0, descriptors: descs, next };
        if let Ok(bytes) = page.encode() {
            prop_assert_eq!(MdPage::decode(&bytes).unwrap(), page);
        }
    }
}
