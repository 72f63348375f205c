//! Property tests (bounded: a fixed number of cases) over the request parser and the ring walkers with arbitrary
//! guest input: no panic, every iovec inside a guest memory region, every accepted request inside the disk.
//!
//! `PROPTEST_CASES=100000` runs more cases by hand.

use bdev::IoVec;
use proptest::prelude::*;
use vhost_blk::mem::FastMem;
use vhost_blk::request::{parse, parse_three, Geometry, Op, Parsed, RawDesc};
use vhost_blk::vring::{Ring, RingConfig};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// Cases per property: `ci` unless `PROPTEST_CASES` says otherwise.
fn cases(ci: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci)
}

fn mem() -> GuestMemoryMmap {
    // Two regions with a hole between them, like RAM below and above a PCI hole.
    GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x20000), 0x10000),
    ])
    .unwrap()
}

/// Host address ranges of the guest memory.
fn host_ranges(m: &GuestMemoryMmap) -> Vec<(usize, usize)> {
    m.iter()
        .map(|r| {
            let p = r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            (p, p + r.len() as usize)
        })
        .collect()
}

fn inside(ranges: &[(usize, usize)], v: &IoVec) -> bool {
    let s = v.base as usize;
    ranges
        .iter()
        .any(|&(a, b)| s >= a && s.checked_add(v.len).is_some_and(|e| e <= b))
}

fn in_guest(m: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
    vhost_blk::request::in_memory(m, addr, len)
}

fn addr_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..0x30000,
        0xff00u64..0x10100,
        0x2ff00u64..0x30100,
        Just(u64::MAX),
        Just(u64::MAX - 15),
        any::<u64>(),
    ]
}

fn len_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(1u32),
        Just(16),
        Just(512),
        Just(4096),
        0u32..70000,
        any::<u32>()
    ]
}

fn desc_strategy() -> impl Strategy<Value = RawDesc> {
    (addr_strategy(), len_strategy(), any::<bool>()).prop_map(|(addr, len, write)| RawDesc {
        addr,
        len,
        write,
    })
}

fn geo_strategy() -> impl Strategy<Value = Geometry> {
    (
        prop_oneof![Just(512u32), Just(4096)],
        0u64..10_000,
        any::<[bool; 5]>(),
    )
        .prop_map(|(block_size, num_blocks, f)| Geometry {
            block_size,
            num_blocks,
            readonly: f[0],
            online: f[1] || f[2],
            flush: f[2],
            discard: f[3],
            write_zeroes: f[4],
            max_discard_sectors: 32768,
            max_write_zeroes_sectors: 32768,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(3000)))]

    #[test]
    fn parser_stays_in_guest_memory(
        descs in proptest::collection::vec(desc_strategy(), 0..24),
        hdr in any::<[u8; 16]>(),
        ty in prop_oneof![0u32..16, Just(0x8000_0000u32), any::<u32>()],
        seg in any::<[u8; 16]>(),
        geo in geo_strategy(),
    ) {
        let m = mem();
        let ranges = host_ranges(&m);
        // Put a header (with a plausible type) and a discard segment where descriptors may point.
        let mut h = hdr;
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        for d in &descs {
            let _ = m.write_slice(&h, GuestAddress(d.addr));
        }
        let _ = m.write_slice(&seg, GuestAddress(0x100));
        let mut iovs = Vec::with_capacity(8);
        let fm = FastMem::new(std::sync::Arc::new(m.clone()));
        let r = parse(descs.iter().map(|d| Ok(*d)), &fm, &geo, &mut iovs, 8);
        prop_assert!(iovs.len() <= 8);
        for v in &iovs {
            prop_assert!(inside(&ranges, v), "iovec outside guest memory");
        }
        match r {
            Err(_) => {}
            Ok(p) => {
                prop_assert!(in_guest(&m, p.status_addr().0, 1));
                let st = descs.last().unwrap();
                prop_assert!(st.write && st.len == 1);
                match p {
                    Parsed::Submit { op, offset_blocks, num_blocks, used_len, .. } => {
                        prop_assert!(geo.online);
                        prop_assert!(offset_blocks.checked_add(num_blocks).is_some_and(|e| e <= geo.num_blocks));
                        if matches!(op, Op::Read | Op::Write) {
                            let total: usize = iovs.iter().map(|v| v.len).sum();
                            prop_assert_eq!(total as u64, num_blocks * geo.block_size as u64);
                            prop_assert!(num_blocks > 0);
                        }
                        if op != Op::Read {
                            prop_assert_eq!(used_len, 1);
                        }
                        if geo.readonly {
                            prop_assert!(matches!(op, Op::Read | Op::Flush));
                        }
                    }
                    Parsed::GetId { addr, len, .. } => {
                        prop_assert!(len <= 20 && len > 0);
                        prop_assert!(in_guest(&m, addr.0, len as u64));
                    }
                    Parsed::Fail { code, .. } => prop_assert!(code == 1 || code == 2),
                }
            }
        }
    }

    #[test]
    fn split_ring_walk_is_bounded(
        table in proptest::collection::vec(any::<u8>(), 16 * 16),
        avail in proptest::collection::vec(any::<u8>(), 4 + 2 * 16),
        base in any::<u16>(),
        event_idx in any::<bool>(),
        geo in geo_strategy(),
    ) {
        let m = mem();
        let ranges = host_ranges(&m);
        m.write_slice(&table, GuestAddress(0x1000)).unwrap();
        m.write_slice(&avail, GuestAddress(0x2000)).unwrap();
        let cfg = RingConfig { size: 16, desc: 0x1000, driver: 0x2000, device: 0x3000, base: base as u32, event_idx, packed: false };
        let fm = FastMem::new(std::sync::Arc::new(m.clone()));
        let mut ring = Ring::new(&cfg, &fm).unwrap();
        let mut iovs = Vec::with_capacity(8);
        for _ in 0..40 {
            match ring.pop(&fm) {
                Ok(Some((id, _n, chain))) => {
                    prop_assert!(id < 16);
                    let _ = parse(chain, &fm, &geo, &mut iovs, 8);
                    for v in &iovs {
                        prop_assert!(inside(&ranges, v));
                    }
                    let _ = ring.push_used(&fm, id, 1, 1);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let _ = ring.needs_notification(&fm);
    }

    #[test]
    fn packed_ring_walk_is_bounded(
        ring_bytes in proptest::collection::vec(any::<u8>(), 16 * 16),
        events in any::<[u8; 8]>(),
        base in any::<u16>(),
        geo in geo_strategy(),
    ) {
        let m = mem();
        let ranges = host_ranges(&m);
        m.write_slice(&ring_bytes, GuestAddress(0x1000)).unwrap();
        m.write_slice(&events, GuestAddress(0x2000)).unwrap();
        let cfg = RingConfig { size: 16, desc: 0x1000, driver: 0x2000, device: 0x2004, base: (base & 0x800f) as u32, event_idx: true, packed: true };
        let fm = FastMem::new(std::sync::Arc::new(m.clone()));
        let mut ring = Ring::new(&cfg, &fm).unwrap();
        let mut iovs = Vec::with_capacity(8);
        for _ in 0..40 {
            match ring.pop(&fm) {
                Ok(Some((id, n, chain))) => {
                    prop_assert!(id < 16 && (1..=16).contains(&n));
                    let _ = parse(chain, &fm, &geo, &mut iovs, 8);
                    for v in &iovs {
                        prop_assert!(inside(&ranges, v));
                    }
                    let _ = ring.push_used(&fm, id, n, 1);
                    let _ = ring.needs_notification(&fm);
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}

fn put_desc(m: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    m.write_slice(&b, GuestAddress(at)).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1000)))]

    /// Our split-ring walker against `virtio-queue`'s on well-formed chains (direct, in any slot order, or one
    /// indirect table): both must yield the same descriptors.
    #[test]
    fn split_chains_match_virtio_queue(
        bufs in proptest::collection::vec((0u64..0xf000, 1u32..4096, any::<bool>()), 1..10),
        perm_seed in any::<u64>(),
        indirect in any::<bool>(),
    ) {
        use virtio_queue::{Queue, QueueOwnedT, QueueT};
        let m = mem();
        let size = 16u16;
        let (desc, avail, used, table) = (0x2_0000u64, 0x2_1000u64, 0x2_2000u64, 0x2_3000u64);
        // Slots for a direct chain: a seeded permutation of 0..size.
        let mut slots: Vec<u16> = (0..size).collect();
        let mut x = perm_seed | 1;
        for i in (1..slots.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            slots.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let head = if indirect {
            for (i, &(a, l, w)) in bufs.iter().enumerate() {
                let last = i + 1 == bufs.len();
                let flags = if w { 2 } else { 0 } | if last { 0 } else { 1 };
                put_desc(&m, table + i as u64 * 16, a, l, flags, i as u16 + 1);
            }
            put_desc(&m, desc + slots[0] as u64 * 16, table, bufs.len() as u32 * 16, 4, 0);
            slots[0]
        } else {
            for (i, &(a, l, w)) in bufs.iter().enumerate() {
                let last = i + 1 == bufs.len();
                let flags = if w { 2 } else { 0 } | if last { 0 } else { 1 };
                let next = if last { 0 } else { slots[i + 1] };
                put_desc(&m, desc + slots[i] as u64 * 16, a, l, flags, next);
            }
            slots[0]
        };
        m.write_obj(head.to_le(), GuestAddress(avail + 4)).unwrap();
        m.write_obj(1u16.to_le(), GuestAddress(avail + 2)).unwrap();

        let mut q = Queue::new(size).unwrap();
        q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(used)).unwrap();
        q.set_ready(true);
        let theirs: Vec<RawDesc> = q
            .iter(&m)
            .unwrap()
            .next()
            .unwrap()
            .map(|d| RawDesc { addr: d.addr().0, len: d.len(), write: d.is_write_only() })
            .collect();

        let fm = FastMem::new(std::sync::Arc::new(m.clone()));
        let cfg = RingConfig { size, desc, driver: avail, device: used, base: 0, event_idx: false, packed: false };
        let mut ring = Ring::new(&cfg, &fm).unwrap();
        let (id, _, chain) = ring.pop(&fm).unwrap().unwrap();
        prop_assert_eq!(id, head);
        let ours: Vec<RawDesc> = chain.collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(ours, theirs);
    }
}

/// Requests the fast path accepted in `three_descriptor_fast_path_agrees_with_the_walker` (it must accept some for
/// the comparison to mean anything).
static ACCEPTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

#[test]
fn three_descriptor_fast_path_is_exercised() {
    three_descriptor_fast_path_agrees_with_the_walker();
    let n = ACCEPTED.load(std::sync::atomic::Ordering::Relaxed);
    assert!(n >= 10, "the fast path accepted only {n} requests");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(3000)))]

    /// The three-descriptor fast path against the chain walker, on chains shaped like a read or write (three
    /// descriptors at random, possibly equal, slots of the ring's table or of an indirect table, with flags,
    /// lengths, addresses, header and geometry varied): whenever the fast path accepts a request, the walker
    /// parses it identically, iovecs included.
    #[test]
    fn three_descriptor_fast_path_agrees_with_the_walker(
        slots in any::<[u8; 3]>(),
        flags in any::<[u8; 3]>(),
        hdr_addr in prop_oneof![3 => 0x4000u64..0xfff0, 1 => addr_strategy()],
        hdr_len in prop_oneof![3 => Just(16u32), 1 => len_strategy()],
        data_addr in prop_oneof![3 => 0x4000u64..0xf000, 1 => addr_strategy()],
        data_len in prop_oneof![3 => Just(4096u32), 1 => Just(512), 1 => len_strategy()],
        st_addr in prop_oneof![3 => 0x4000u64..0x10000, 1 => addr_strategy()],
        st_len in prop_oneof![3 => Just(1u32), 1 => len_strategy()],
        ty in prop_oneof![3 => Just(0u32), 3 => Just(1), 1 => Just(0x8000_0001), 1 => any::<u32>()],
        sector in prop_oneof![3 => (0u64..64).prop_map(|s| s * 8), 1 => 0u64..80_000, 1 => any::<u64>()],
        geo in geo_strategy(),
        indirect in prop_oneof![Just(None), (any::<u16>(), 0u32..200).prop_map(Some)],
    ) {
        let m = mem();
        let (ring_desc, avail) = (0x1000u64, 0x2000u64);
        let size = 16u16;
        let mut idx = slots.map(|x| (x % 17) as u16);
        // Through an indirect table: the ring's descriptor 0 points at it (flags mostly exactly INDIRECT,
        // length mostly whole descriptors, sometimes running past guest memory), the three go inside.
        let (desc, head) = match indirect {
            Some((hflags, tlen)) => {
                let table = 0x2_fe00u64;
                let hflags = if hflags < 0xe000 { 4 } else { hflags & 7 };
                let tlen = match tlen {
                    0..100 => 256,
                    100..150 => (tlen % 40) * 16,
                    _ => tlen,
                };
                put_desc(&m, ring_desc, table, tlen, hflags, 0);
                // An indirect chain starts at the table's first entry.
                if slots[0] < 200 {
                    idx[0] = 0;
                }
                (table, 0u16)
            }
            None => (ring_desc, idx[0]),
        };
        // Mostly the usual flags (NEXT; NEXT plus WRITE or not; WRITE), sometimes anything.
        let usual = [1u16, 1 | (flags[1] as u16 & 2), 2];
        let f: Vec<u16> = (0..3)
            .map(|i| if flags[i] < 240 { usual[i] } else { flags[i] as u16 & 7 })
            .collect();
        let descs = [(hdr_addr, hdr_len), (data_addr, data_len), (st_addr, st_len)];
        for i in 0..3 {
            if idx[i] < size {
                let next = if i < 2 { idx[i + 1] } else { 0 };
                put_desc(&m, desc + idx[i] as u64 * 16, descs[i].0, descs[i].1, f[i], next);
            }
        }
        if hdr_addr < 0x2_fff0 {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&ty.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            let _ = m.write_slice(&h, GuestAddress(hdr_addr));
        }
        m.write_slice(&[0, 0, 1, 0], GuestAddress(avail)).unwrap();
        m.write_slice(&head.to_le_bytes(), GuestAddress(avail + 4)).unwrap();
        let cfg = RingConfig { size, desc, driver: avail, device: 0x3000, base: 0, event_idx: false, packed: false };
        let fm = FastMem::new(std::sync::Arc::new(m.clone()));
        let mut ring = Ring::new(&cfg, &fm).unwrap();
        let Ok(Some((_, _, chain))) = ring.pop(&fm) else {
            return Ok(());
        };
        let mut fast_iovs = Vec::with_capacity(8);
        let fast = chain.three().and_then(|d| parse_three(&d, &fm, &geo, &mut fast_iovs, 8));
        let mut iovs = Vec::with_capacity(8);
        let walked = parse(chain, &fm, &geo, &mut iovs, 8);
        if let Some(p) = fast {
            prop_assert_eq!(Ok(p), walked);
            let flat = |v: &[IoVec]| v.iter().map(|x| (x.base as usize, x.len)).collect::<Vec<_>>();
            prop_assert_eq!(flat(&fast_iovs), flat(&iovs));
            ACCEPTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
