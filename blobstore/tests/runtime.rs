//! The runtime blobstore over a bdev: a new lvstore, thick and thin blobs, I/O across cluster and extent page
//! boundaries, reload (unload + load) with the data compared, resize, delete, xattrs; every image checked by
//! the loader and checker that do not share the writer's code paths.

mod common;
use common::*;

use std::sync::Arc;

use bdev::{IoStatus, IoType};
use blobstore::blob::CreateOptions;
use blobstore::layout::InitClear;
use blobstore::runtime::Blobstore;
use blobstore::{BlobId, LoadOptions, MaskState, MemDevice, Store};

const BS: u64 = 512;
const CLUSTER: u64 = 64 << 10;
const CB: u64 = CLUSTER / BS;

/// Bytes of blob `id` in `image`, through the loader's cluster map (zeroes where unallocated).
fn blob_bytes(store: &Store, image: &[u8], id: BlobId, off: u64, len: u64) -> Vec<u8> {
    let b = store.blob(id).expect("blob in the image");
    let mut out = vec![0u8; len as usize];
    let mut at = 0;
    while at < len {
        let pos = off + at;
        let c = pos / CLUSTER;
        let n = (CLUSTER - pos % CLUSTER).min(len - at);
        if let Some(d) = b.cluster(c) {
            let src = (d as u64 * CLUSTER + pos % CLUSTER) as usize;
            out[at as usize..(at + n) as usize].copy_from_slice(&image[src..src + n as usize]);
        }
        at += n;
    }
    out
}

/// Bytes of blob `id` in `image` as the blob reads them (through its ancestors).
fn chain_bytes(store: &Store, image: &[u8], id: BlobId, off: u64, len: u64) -> Vec<u8> {
    common::chain_bytes(store, image, id, off, len, CLUSTER)
}

fn checked(image: &[u8]) -> Store {
    let mut s = Store::load(&MemDevice(image.to_vec())).expect("image loads");
    if s.mask_state == MaskState::Stale {
        s.rebuild_masks();
    }
    assert_eq!(s.check(), vec![], "store consistent");
    s
}

fn create(bs: &str, name: &str, clusters: u64, thin: bool) -> BlobId {
    let (bs, name) = (bs.to_string(), name.to_string());
    run(move || async move {
        store(&bs)
            .create_blob(CreateOptions {
                num_clusters: clusters,
                thin,
                xattrs: blobstore::lvol::lvol_xattrs(&name, &uuid::Uuid::new_v4()),
                ..Default::default()
            })
            .await
            .unwrap()
    })
}

fn unload(bs: &str) {
    let bs = bs.to_string();
    run(move || async move {
        let s = forget_store(&bs).unwrap();
        s.unload().await.unwrap()
    })
}

fn load(bs: &str, disk: &str) {
    let (bs, disk) = (bs.to_string(), disk.to_string());
    run(move || async move {
        let s = Blobstore::load(claimed(&disk), &LoadOptions::default())
            .await
            .unwrap();
        keep_store(&bs, s);
    })
}

#[test]
fn create_write_reload_resize_delete() {
    with_reactors("0x1", || {
        let st = RamState::new(vec![0xa5; 64 << 20]);
        app({
            let st = st.clone();
            move || {
                ram_disk("ram0", st, BS);
            }
        });
        let lvs_uuid = uuid::Uuid::new_v4();
        run(move || async move {
            let s = Blobstore::init_lvstore(
                claimed("ram0"),
                "lvs0",
                lvs_uuid,
                CLUSTER as u32,
                100,
                InitClear::Unmap,
            )
            .await
            .unwrap();
            keep_store("bs", s);
        });
        let thick = create("bs", "thick", 10, false);
        let thin = create("bs", "thin", 600, true);
        open_bdev("bs", thick, "b_thick");
        open_bdev("bs", thin, "b_thin");

        // Across the cluster 0/1 boundary of the thick blob.
        let a = pattern(1, (200 * BS) as usize);
        assert_eq!(write("b_thick", 100, &a, BS), IoStatus::Success);
        assert_eq!(read("b_thick", 100, 200), a);
        // Thin: a partial first write in cluster 3, and one across clusters 511/512 (two extent pages).
        let b = pattern(2, (10 * BS) as usize);
        assert_eq!(write("b_thin", 3 * CB + 7, &b, BS), IoStatus::Success);
        let c = pattern(3, (3 * CB * BS) as usize);
        let c_at = 511 * CB + 20;
        assert_eq!(write("b_thin", c_at, &c, BS), IoStatus::Success);
        assert_eq!(read("b_thin", 3 * CB + 7, 10), b);
        assert_eq!(read("b_thin", c_at, 3 * CB), c);
        // The rest of a first-written cluster reads as zeroes, as do clusters never written.
        assert!(read("b_thin", 3 * CB, 7).iter().all(|&x| x == 0));
        assert!(read("b_thin", 100 * CB, 2 * CB).iter().all(|&x| x == 0));
        let allocated = app(|| with_blob("b_thin", |h| h.num_allocated_clusters()));
        assert_eq!(allocated, 5, "clusters 3, 511, 512, 513, 514");
        // Unmap and write zeroes of unallocated thin clusters are no-ops; of allocated ones they reach the base.
        assert_eq!(
            io("b_thin", IoType::Unmap, 200 * CB, CB, None).0,
            IoStatus::Success
        );
        assert_eq!(
            io("b_thick", IoType::WriteZeroes, 100, 28, None).0,
            IoStatus::Success
        );
        assert!(read("b_thick", 100, 28).iter().all(|&x| x == 0));
        let a2 = a[(28 * BS) as usize..].to_vec();
        assert_eq!(read("b_thick", 128, 172), a2);

        close_bdev("b_thick");
        close_bdev("b_thin");
        unload("bs");
        unregister("ram0");

        let image = st.image();
        let s = checked(&image);
        assert_eq!(s.mask_state, MaskState::Clean);
        let lvs = s.lvol_store().unwrap();
        assert_eq!((lvs.name.as_str(), lvs.uuid), ("lvs0", lvs_uuid));
        assert_eq!(lvs.lvol("thick").unwrap().num_clusters, 10);
        assert!(!lvs.lvol("thick").unwrap().thin);
        let t = lvs.lvol("thin").unwrap();
        assert!(t.thin);
        assert_eq!((t.num_clusters, t.num_allocated_clusters), (600, 5));
        assert_eq!(s.blob(thin).unwrap().extent_pages.len(), 2);
        assert_eq!(blob_bytes(&s, &image, thin, c_at * BS, c.len() as u64), c);
        assert_eq!(blob_bytes(&s, &image, thick, 128 * BS, a2.len() as u64), a2);
        assert_eq!(lvs.free_clusters, lvs.total_data_clusters - 15);

        // Reload on a new disk from the image; the data reads back through the runtime too.
        let st2 = RamState::new(image);
        app({
            let st2 = st2.clone();
            move || {
                ram_disk("ram1", st2, BS);
            }
        });
        load("bs", "ram1");
        open_bdev("bs", thick, "b_thick");
        open_bdev("bs", thin, "b_thin");
        assert_eq!(read("b_thin", c_at, 3 * CB), c);
        assert_eq!(read("b_thin", 3 * CB + 7, 10), b);
        assert_eq!(read("b_thick", 128, 172), a2);
        // Grow the thick blob across an extent page, write at the end, shrink it, set an xattr.
        close_bdev("b_thick");
        let grown = run(move || async move {
            let h = store("bs").open_blob(thick).await.unwrap();
            h.resize(700).await.unwrap();
            let n = h.num_clusters();
            h.set_xattr("color", b"blue").unwrap();
            h.sync().await.unwrap();
            keep_blob("h_thick", h);
            n
        });
        assert_eq!(grown, 700);
        let free_mid = run(|| async { store("bs").free_clusters() });
        run(move || async move {
            let h = take_blob("h_thick");
            h.resize(600).await.unwrap();
            h.close().await.unwrap();
        });
        let free_after = run(|| async { store("bs").free_clusters() });
        assert_eq!(free_after, free_mid + 100);
        // Delete the thin blob.
        close_bdev("b_thin");
        run(move || async move { store("bs").delete_blob(thin).await.unwrap() });
        let masks = run(|| async { store("bs").masks() });
        unload("bs");
        unregister("ram1");
        let image = st2.image();
        let s = checked(&image);
        assert_eq!(s.masks, masks, "the masks written are the ones in memory");
        let lvs = s.lvol_store().unwrap();
        assert!(lvs.lvol("thin").is_none());
        let th = s.blob(thick).unwrap();
        assert_eq!(th.num_clusters, 600);
        assert_eq!(th.extent_pages.len(), 2);
        assert_eq!(th.xattr("color"), Some(&b"blue"[..]));
        assert_eq!(blob_bytes(&s, &image, thick, 128 * BS, a2.len() as u64), a2);
        assert_eq!(lvs.free_clusters, lvs.total_data_clusters - 600);
        let _ = Arc::strong_count(&st2);
    });
}

/// A store made without clearing its data area (clusters hold old bytes): a thin blob's first partial write
/// must still read zeroes around it, and a thick blob reads whatever was there (as in SPDK).
#[test]
fn first_write_fills_the_rest_of_the_cluster_with_zeroes() {
    with_reactors("0x1", || {
        let st = RamState::new(vec![0xa5; 16 << 20]);
        app({
            let st = st.clone();
            move || {
                ram_disk("zram", st, BS);
            }
        });
        run(|| async {
            let s = Blobstore::init_lvstore(
                claimed("zram"),
                "lvs",
                uuid::Uuid::new_v4(),
                CLUSTER as u32,
                100,
                InitClear::None,
            )
            .await
            .unwrap();
            keep_store("z", s);
        });
        let thin = create("z", "t", 8, true);
        open_bdev("z", thin, "zb");
        let d = pattern(5, (3 * BS) as usize);
        assert_eq!(write("zb", CB + 50, &d, BS), IoStatus::Success);
        let all = read("zb", CB, CB);
        assert_eq!(&all[(50 * BS) as usize..(53 * BS) as usize], &d[..]);
        assert!(all[..(50 * BS) as usize].iter().all(|&x| x == 0));
        assert!(all[(53 * BS) as usize..].iter().all(|&x| x == 0));
        // Write zeroes to an unallocated cluster of a blob without parent: nothing to do, nothing allocated.
        assert_eq!(
            io("zb", IoType::WriteZeroes, 4 * CB, CB, None).0,
            IoStatus::Success
        );
        assert_eq!(app(|| with_blob("zb", |h| h.num_allocated_clusters())), 1);
        close_bdev("zb");
        unload("z");
        unregister("zram");
        checked(&st.image());
    });
}

/// A read-only blob and a clone of it: the clone reads the parent's data, a first write copies the parent's
/// cluster around the new data, the parent does not change, writes to the parent are refused; all of it
/// survives a reload.
#[test]
fn clone_reads_the_parent_and_copies_on_first_write() {
    with_reactors("0x1", || {
        let st = RamState::new(vec![0; 32 << 20]);
        new_store("cram", "c", &st);
        let parent = create("c", "p", 6, false);
        open_bdev("c", parent, "pb");
        let pdata = pattern(7, (6 * CB * BS) as usize);
        assert_eq!(write("pb", 0, &pdata, BS), IoStatus::Success);
        close_bdev("pb");
        run(move || async move {
            let h = store("c").open_blob(parent).await.unwrap();
            h.set_read_only().unwrap();
            h.close().await.unwrap();
        });
        let clone = run(move || async move {
            store("c")
                .create_clone(
                    parent,
                    blobstore::lvol::lvol_xattrs("clone", &uuid::Uuid::new_v4()),
                )
                .await
                .unwrap()
        });
        open_bdev("c", clone, "cb");
        open_bdev("c", parent, "pb");
        assert_eq!(read("cb", 0, 6 * CB), pdata, "a clone reads its parent");
        assert_eq!(
            write("pb", 0, &pdata[..BS as usize], BS),
            IoStatus::Failed(libc::ENOTSUP),
            "a read-only blob's bdev does not take writes, as SPDK's lvol"
        );
        // A write across clusters 2/3 of the clone: both copied from the parent first.
        let d = pattern(8, (20 * BS) as usize);
        let at = 3 * CB - 10;
        assert_eq!(write("cb", at, &d, BS), IoStatus::Success);
        let mut want = pdata.clone();
        want[(at * BS) as usize..(at * BS) as usize + d.len()].copy_from_slice(&d);
        assert_eq!(read("cb", 0, 6 * CB), want);
        assert_eq!(read("pb", 0, 6 * CB), pdata, "the parent is untouched");
        assert_eq!(app(|| with_blob("cb", |h| h.num_allocated_clusters())), 2);
        close_bdev("cb");
        close_bdev("pb");
        unload("c");
        unregister("cram");
        let image = st.image();
        let s = checked(&image);
        let lvs = s.lvol_store().unwrap();
        let (p, c) = (lvs.lvol("p").unwrap(), lvs.lvol("clone").unwrap());
        assert!(p.is_snapshot && p.read_only && c.is_clone && c.thin);
        assert_eq!(c.parent, Some(parent));
        assert_eq!(
            blob_bytes(&s, &image, clone, 2 * CLUSTER, 2 * CLUSTER),
            want[(2 * CLUSTER) as usize..(4 * CLUSTER) as usize]
        );
        // Reloaded by the runtime, the clone still reads through.
        let st2 = RamState::new(image);
        app({
            let st2 = st2.clone();
            move || {
                ram_disk("cram2", st2, BS);
            }
        });
        load("c", "cram2");
        open_bdev("c", clone, "cb");
        assert_eq!(read("cb", 0, 6 * CB), want);
        close_bdev("cb");
        unload("c");
        unregister("cram2");
    });
}

/// Two reactor threads write into the same thin blob at once: writes into the same unallocated clusters
/// from both threads (the second waits for the first's allocation, on its own thread), and every write
/// reads back. The metadata thread is the app thread; the other thread's requests and replies travel by
/// message.
#[test]
fn two_threads_first_writes_into_the_same_clusters() {
    with_reactors("0x3", || {
        let st = RamState::new(vec![0; 32 << 20]);
        new_store("mram", "m", &st);
        let thin = create("m", "t", 40, true);
        open_bdev("m", thin, "mb");
        let cpu1 = reactor::CpuMask::parse("0x2").unwrap();
        let other = app(move || reactor::spawn_thread("writer", Some(&cpu1)).unwrap());
        // Each thread writes 4 KiB pieces at its own offsets of clusters 0..20: thread A the even pieces,
        // thread B the odd ones, all issued at once.
        let piece = 8u64;
        let writes = |odd: bool| -> Vec<(u64, Vec<u8>)> {
            (0..20u64)
                .flat_map(|c| (0..CB / piece).map(move |i| (c, i)))
                .filter(|(_, i)| (i % 2 == 1) == odd)
                .map(|(c, i)| {
                    let at = c * CB + i * piece;
                    (at, pattern(at as u32, (piece * BS) as usize))
                })
                .collect()
        };
        let (a, b) = (writes(false), writes(true));
        let issue = |list: Vec<(u64, Vec<u8>)>| {
            move |reply: Reply<Vec<IoStatus>>| {
                let desc = bdev::open("mb", true, None).unwrap();
                let ch = desc.channel();
                let n = list.len();
                let out = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
                let reply = std::rc::Rc::new(std::cell::RefCell::new(Some((reply, desc))));
                for (at, d) in list {
                    let (out, reply) = (out.clone(), reply.clone());
                    submit(
                        &ch,
                        IoType::Write,
                        at,
                        piece,
                        Some(d),
                        Box::new(move |(st, _)| {
                            out.borrow_mut().push(st);
                            if out.borrow().len() == n {
                                if let Some((r, desc)) = reply.borrow_mut().take() {
                                    drop(desc);
                                    r(out.borrow().clone());
                                }
                            }
                        }),
                    );
                }
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let fb = issue(b.clone());
        let txb = tx.clone();
        other.send(move || fb(Box::new(move |v| txb.send(v).unwrap())));
        let fa = issue(a.clone());
        reactor::app_thread()
            .unwrap()
            .send(move || fa(Box::new(move |v| tx.send(v).unwrap())));
        for _ in 0..2 {
            let sts = rx.recv_timeout(std::time::Duration::from_secs(60)).unwrap();
            assert!(sts.iter().all(|s| *s == IoStatus::Success), "{sts:?}");
        }
        for (at, d) in a.iter().chain(b.iter()) {
            assert_eq!(&read("mb", *at, piece), d, "block {at}");
        }
        assert_eq!(app(|| with_blob("mb", |h| h.num_allocated_clusters())), 20);
        close_bdev("mb");
        unload("m");
        unregister("mram");
        let s = checked(&st.image());
        assert_eq!(s.blob(thin).unwrap().num_allocated_clusters(), 20);
    });
}

fn snapshot(bs: &str, origin: BlobId, name: &str) -> BlobId {
    let (bs, name) = (bs.to_string(), name.to_string());
    run(move || async move {
        store(&bs)
            .create_snapshot(
                origin,
                blobstore::lvol::lvol_xattrs(&name, &uuid::Uuid::new_v4()),
            )
            .await
            .unwrap()
    })
}

fn delete(bs: &str, id: BlobId) -> blobstore::Result<()> {
    let bs = bs.to_string();
    run(move || async move { store(&bs).delete_blob(id).await })
}

fn free(bs: &str) -> u64 {
    let bs = bs.to_string();
    app(move || store(&bs).free_clusters())
}

fn new_store(disk: &str, bs: &str, st: &Arc<RamState>) {
    app({
        let (st, disk) = (st.clone(), disk.to_string());
        move || {
            ram_disk(&disk, st, BS);
        }
    });
    let (disk, bs) = (disk.to_string(), bs.to_string());
    run(move || async move {
        let s = Blobstore::init_lvstore(
            claimed(&disk),
            "lvs",
            uuid::Uuid::new_v4(),
            CLUSTER as u32,
            100,
            InitClear::Unmap,
        )
        .await
        .unwrap();
        keep_store(&bs, s);
    });
}

/// Snapshots of a blob being written: each snapshot keeps what the blob held when it was taken, the blob
/// goes on as their clone (copy on first write), and deleting a snapshot with one clone gives the clone its
/// clusters (and the snapshot's parent) and releases only what the clone had replaced.
#[test]
fn snapshots_keep_the_past_and_fold_back_into_their_clone() {
    with_reactors("0x1", || {
        let st = RamState::new(vec![0; 32 << 20]);
        new_store("sram", "s", &st);
        let total_free = free("s");
        let o = create("s", "o", 6, false);
        open_bdev("s", o, "ob");
        let a = pattern(40, (6 * CB * BS) as usize);
        assert_eq!(write("ob", 0, &a, BS), IoStatus::Success);
        let s1 = snapshot("s", o, "s1");
        assert_eq!(free("s"), total_free - 6, "a snapshot takes no cluster");
        app(move || {
            with_blob("ob", |h| {
                assert!(h.is_thin(), "the origin is thin now");
                assert_eq!(h.parent(), Some(s1));
                assert_eq!(h.num_allocated_clusters(), 0);
            })
        });
        assert_eq!(read("ob", 0, 6 * CB), a, "the origin reads the same");
        // A write across clusters 1/2 copies both from the snapshot first.
        let b = pattern(41, (16 * BS) as usize);
        let at = 2 * CB - 8;
        assert_eq!(write("ob", at, &b, BS), IoStatus::Success);
        let mut want_o = a.clone();
        want_o[(at * BS) as usize..(at * BS) as usize + b.len()].copy_from_slice(&b);
        open_bdev("s", s1, "s1b");
        assert_eq!(read("s1b", 0, 6 * CB), a, "the snapshot keeps the past");
        assert_eq!(
            write("s1b", 0, &b[..BS as usize], BS),
            IoStatus::Failed(libc::ENOTSUP),
            "a snapshot is read-only"
        );
        close_bdev("s1b");
        let e = run(move || async move {
            store("s")
                .create_snapshot(s1, Vec::new())
                .await
                .unwrap_err()
        });
        assert_eq!(
            e.kind,
            blobstore::ErrorKind::Invalid,
            "snapshot of a snapshot"
        );
        // A second snapshot: o -> s2 (clusters 1, 2) -> s1 (all six).
        let s2 = snapshot("s", o, "s2");
        let c = pattern(42, (CB * BS) as usize);
        assert_eq!(write("ob", 4 * CB, &c, BS), IoStatus::Success);
        let want_s2 = want_o.clone();
        want_o[(4 * CB * BS) as usize..(5 * CB * BS) as usize].copy_from_slice(&c);
        assert_eq!(read("ob", 0, 6 * CB), want_o);
        assert_eq!(free("s"), total_free - 9);
        // Reloaded: the same chain, read by the offline loader and by the runtime.
        close_bdev("ob");
        unload("s");
        let image = st.image();
        let m = checked(&image);
        let lvs = m.lvol_store().unwrap();
        let (l1, l2, lo) = (
            lvs.lvol("s1").unwrap(),
            lvs.lvol("s2").unwrap(),
            lvs.lvol("o").unwrap(),
        );
        assert!(l1.is_snapshot && l1.read_only && !l1.is_clone);
        assert!(l2.is_snapshot && l2.read_only && l2.is_clone && l2.parent == Some(s1));
        assert!(lo.is_clone && lo.thin && lo.parent == Some(s2));
        assert_eq!(chain_bytes(&m, &image, o, 0, 6 * CLUSTER), want_o);
        assert_eq!(chain_bytes(&m, &image, s2, 0, 6 * CLUSTER), want_s2);
        assert_eq!(chain_bytes(&m, &image, s1, 0, 6 * CLUSTER), a);
        load("s", "sram");
        // Deleting s2 (one clone): o takes its clusters 1 and 2 and its parent s1; nothing is released.
        delete("s", s2).unwrap();
        assert_eq!(free("s"), total_free - 9);
        // s1 now has one clone again; a second clone makes it undeletable.
        let extra = run(move || async move {
            store("s")
                .create_clone(s1, blobstore::lvol::lvol_xattrs("x", &uuid::Uuid::new_v4()))
                .await
                .unwrap()
        });
        let e = delete("s", s1).unwrap_err();
        assert_eq!(
            e.kind,
            blobstore::ErrorKind::Busy,
            "a snapshot with two clones"
        );
        delete("s", extra).unwrap();
        // Deleting s1: o takes clusters 0, 3, 5; s1's 1, 2 and 4 (replaced in o) are released.
        delete("s", s1).unwrap();
        assert_eq!(free("s"), total_free - 6);
        open_bdev("s", o, "ob");
        app(move || {
            with_blob("ob", |h| {
                assert_eq!(h.parent(), None);
                assert_eq!(h.num_allocated_clusters(), 6);
            })
        });
        assert_eq!(
            read("ob", 0, 6 * CB),
            want_o,
            "the data survives both merges"
        );
        close_bdev("ob");
        unload("s");
        unregister("sram");
        let image = st.image();
        let m = checked(&image);
        assert_eq!(m.blobs.len(), 2, "the lvstore's super blob and o");
        assert_eq!(chain_bytes(&m, &image, o, 0, 6 * CLUSTER), want_o);
    });
}

/// Decouple copies what the parent itself holds and skips it in the chain; inflate copies everything and
/// makes the blob thick and parentless. The data reads the same throughout. set_parent gives a thin blob a
/// snapshot to read through, with SPDK's refusals.
#[test]
fn decouple_and_inflate_cut_the_chain() {
    with_reactors("0x1", || {
        let st = RamState::new(vec![0; 32 << 20]);
        new_store("iram", "i", &st);
        let total_free = free("i");
        let p = create("i", "p", 4, false);
        open_bdev("i", p, "pb");
        let d = pattern(50, (4 * CB * BS) as usize);
        assert_eq!(write("pb", 0, &d, BS), IoStatus::Success);
        let sp = snapshot("i", p, "sp");
        let e = pattern(51, (CB * BS) as usize);
        assert_eq!(write("pb", 0, &e, BS), IoStatus::Success);
        let sp2 = snapshot("i", p, "sp2");
        let mut want = d.clone();
        want[..e.len()].copy_from_slice(&e);
        assert_eq!(free("i"), total_free - 5);
        // p -> sp2 (cluster 0) -> sp (four clusters).
        run(move || async move { store("i").decouple_parent(p).await.unwrap() });
        app(move || {
            with_blob("pb", |h| {
                assert_eq!(h.parent(), Some(sp), "the parent's parent");
                assert_eq!(h.num_allocated_clusters(), 1);
                assert!(h.is_thin());
            })
        });
        assert_eq!(free("i"), total_free - 6);
        assert_eq!(read("pb", 0, 4 * CB), want);
        run(move || async move { store("i").inflate(p).await.unwrap() });
        app(move || {
            with_blob("pb", |h| {
                assert_eq!(h.parent(), None);
                assert_eq!(h.num_allocated_clusters(), 4);
                assert!(!h.is_thin(), "inflated: thick");
            })
        });
        assert_eq!(read("pb", 0, 4 * CB), want);
        let e = run(move || async move { store("i").decouple_parent(p).await.unwrap_err() });
        assert_eq!(
            e.kind,
            blobstore::ErrorKind::Invalid,
            "no parent to decouple from"
        );
        // set_parent: a new thin blob q reads sp (a snapshot: sp2 is its clone) where it has nothing.
        let q = create("i", "q", 4, true);
        let set_parent = move |id: BlobId, parent: BlobId| {
            run(move || async move { store("i").set_parent(id, parent).await })
        };
        set_parent(q, sp).unwrap();
        open_bdev("i", q, "qb");
        assert_eq!(read("qb", 0, 4 * CB), d, "q reads its new parent");
        close_bdev("qb");
        let kind = |r: blobstore::Result<()>| r.unwrap_err().kind;
        assert_eq!(kind(set_parent(q, sp)), blobstore::ErrorKind::Exists);
        assert_eq!(
            kind(set_parent(p, sp)),
            blobstore::ErrorKind::Invalid,
            "p is thick"
        );
        assert_eq!(
            kind(set_parent(q, sp2)),
            blobstore::ErrorKind::Invalid,
            "sp2 has no clone"
        );
        assert_eq!(
            kind(set_parent(q, q)),
            blobstore::ErrorKind::Invalid,
            "itself"
        );
        delete("i", q).unwrap();
        // Nothing uses the snapshots now: both go, their clusters with them.
        close_bdev("pb");
        delete("i", sp2).unwrap();
        delete("i", sp).unwrap();
        assert_eq!(free("i"), total_free - 4);
        unload("i");
        unregister("iram");
        let image = st.image();
        let m = checked(&image);
        let b = m.blob(p).unwrap();
        assert!(!b.thin() && b.parent().is_none());
        assert_eq!(chain_bytes(&m, &image, p, 0, 4 * CLUSTER), want);
    });
}

/// Waits (up to 10 s) until `f` holds: a release runs in the background after the unmap completes.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// An unmap that covers whole allocated clusters of a thin blob gives them back (as SPDK); partly covered
/// clusters and thick blobs keep theirs; a released cluster reads as zeroes (a clone's: as its parent) and a
/// write allocates it anew.
#[test]
fn unmap_gives_whole_clusters_of_thin_blobs_back() {
    with_reactors("0x1", || {
        let st = RamState::new(vec![0; 32 << 20]);
        new_store("uram", "u", &st);
        let total_free = free("u");
        let t = create("u", "t", 8, true);
        open_bdev("u", t, "tb");
        let d = pattern(60, (4 * CB * BS) as usize);
        assert_eq!(write("tb", 0, &d, BS), IoStatus::Success);
        assert_eq!(free("u"), total_free - 4);
        // From the middle of cluster 0 to the end of cluster 2: clusters 1 and 2 go, 0 stays.
        let (st0, _) = io("tb", IoType::Unmap, CB / 2, 3 * CB - CB / 2, None);
        assert_eq!(st0, IoStatus::Success);
        eventually("two clusters released", || free("u") == total_free - 2);
        app(move || with_blob("tb", |h| assert_eq!(h.num_allocated_clusters(), 2)));
        assert!(
            read("tb", CB, 2 * CB).iter().all(|&b| b == 0),
            "released: zeroes"
        );
        assert_eq!(
            read("tb", 3 * CB, CB),
            d[(3 * CB * BS) as usize..],
            "untouched"
        );
        // Written again: allocated anew, the rest of the cluster zeroes.
        let e = pattern(61, (4 * BS) as usize);
        assert_eq!(write("tb", CB + 8, &e, BS), IoStatus::Success);
        let mut want = vec![0u8; (CB * BS) as usize];
        want[(8 * BS) as usize..(12 * BS) as usize].copy_from_slice(&e);
        assert_eq!(read("tb", CB, CB), want);
        assert_eq!(free("u"), total_free - 3);
        // A thick blob keeps its clusters.
        let k = create("u", "k", 2, false);
        open_bdev("u", k, "kb");
        let before = free("u");
        assert_eq!(
            io("kb", IoType::Unmap, 0, 2 * CB, None).0,
            IoStatus::Success
        );
        // A clone's released cluster reads its parent again.
        let s = snapshot("u", t, "ts");
        let f = pattern(62, (CB * BS) as usize);
        assert_eq!(write("tb", 3 * CB, &f, BS), IoStatus::Success);
        assert_eq!(
            io("tb", IoType::Unmap, 3 * CB, CB, None).0,
            IoStatus::Success
        );
        eventually(
            "the clone's cluster released, the thick blob's kept",
            || free("u") == before,
        );
        app(move || with_blob("tb", |h| assert_eq!(h.num_allocated_clusters(), 0)));
        assert_eq!(
            read("tb", 3 * CB, CB),
            d[(3 * CB * BS) as usize..],
            "the parent's data"
        );
        let _ = s;
        close_bdev("kb");
        close_bdev("tb");
        unload("u");
        unregister("uram");
        let image = st.image();
        let m = checked(&image);
        assert_eq!(m.blob(k).unwrap().num_allocated_clusters(), 2);
        assert_eq!(m.blob(t).unwrap().num_allocated_clusters(), 0);
    });
}

/// Shallow copy: a read-only blob's own clusters land on another device at their offsets; nothing else is
/// written there; a writable blob or a too small device is refused.
#[test]
fn shallow_copy_writes_only_the_blobs_own_clusters() {
    with_reactors("0x1", || {
        let st = RamState::new(vec![0; 32 << 20]);
        new_store("scram", "sc", &st);
        let dst_st = RamState::new(vec![0xee; (8 * CLUSTER) as usize]);
        let small_st = RamState::new(vec![0; (2 * CLUSTER) as usize]);
        app({
            let (d, s) = (dst_st.clone(), small_st.clone());
            move || {
                ram_disk("scdst", d, BS);
                ram_disk("scsmall", s, BS);
            }
        });
        let t = create("sc", "t", 8, true);
        open_bdev("sc", t, "tb");
        let d1 = pattern(70, (CB * BS) as usize);
        let d5 = pattern(71, (10 * BS) as usize);
        assert_eq!(write("tb", CB, &d1, BS), IoStatus::Success);
        assert_eq!(write("tb", 5 * CB + 3, &d5, BS), IoStatus::Success);
        close_bdev("tb");
        let copy = |dst: &'static str| {
            run(move || async move {
                let desc = bdev::open(dst, true, None).unwrap();
                let base = blobstore::base::Base::new(desc.channel());
                let n = std::rc::Rc::new(std::cell::Cell::new(0));
                let n2 = n.clone();
                let r = store("sc").shallow_copy(t, &base, move |k| n2.set(k)).await;
                r.map(|()| n.get())
            })
        };
        assert_eq!(
            copy("scdst").unwrap_err().kind,
            blobstore::ErrorKind::NotPermitted
        );
        run(move || async move {
            let h = store("sc").open_blob(t).await.unwrap();
            h.set_read_only().unwrap();
            h.close().await.unwrap();
        });
        assert_eq!(
            copy("scsmall").unwrap_err().kind,
            blobstore::ErrorKind::Invalid
        );
        assert_eq!(copy("scdst").unwrap(), 2, "two clusters copied");
        let img = dst_st.image();
        let c = CLUSTER as usize;
        assert!(img[..c].iter().all(|&b| b == 0xee), "cluster 0 untouched");
        assert_eq!(&img[c..2 * c], &d1[..]);
        let mut want5 = vec![0u8; c];
        want5[(3 * BS) as usize..(13 * BS) as usize].copy_from_slice(&d5);
        assert_eq!(
            &img[5 * c..6 * c],
            &want5[..],
            "the whole cluster, as the blob has it"
        );
        assert!(img[6 * c..].iter().all(|&b| b == 0xee));
        unload("sc");
        for d in ["scram", "scdst", "scsmall"] {
            unregister(d);
        }
    });
}

/// Esnap clones (`bdev_lvol_clone_bdev`'s blob): a thin blob reading an external bdev where it has nothing,
/// copying from it on first write; a snapshot takes the external snapshot along; reloaded without the bdev
/// the chain is degraded (reads of what it lacks fail) until the device is given back; inflate cuts it loose.
#[test]
fn esnap_clone_reads_its_external_bdev() {
    use blobstore::map::{External, ExternalDev};
    with_reactors("0x1", || {
        let st = RamState::new(vec![0; 32 << 20]);
        new_store("eram", "e", &st);
        let ext_data = pattern(80, (4 * CLUSTER) as usize);
        let ext_st = RamState::new(ext_data.clone());
        app({
            let e = ext_st.clone();
            move || {
                ram_disk("ext", e, BS);
            }
        });
        let dev = || {
            app(|| {
                let desc = bdev::open("ext", false, None).unwrap();
                let num_blocks = desc.bdev().num_blocks();
                Arc::new(ExternalDev { desc, num_blocks })
            })
        };
        let id = b"0f5c8fd9-7f0e-4bd6-9b69-bd1e3d0c6c2a\0".to_vec();
        let x = Arc::new(External::new(id.clone()));
        x.set_dev(Some(dev()));
        let clone = run(move || async move {
            store("e")
                .create_esnap_clone(
                    x,
                    CreateOptions {
                        num_clusters: 4,
                        xattrs: blobstore::lvol::lvol_xattrs("ec", &uuid::Uuid::new_v4()),
                        ..Default::default()
                    },
                )
                .await
                .unwrap()
        });
        open_bdev("e", clone, "ecb");
        assert_eq!(read("ecb", 0, 4 * CB), ext_data, "reads the external bdev");
        let w = pattern(81, (6 * BS) as usize);
        assert_eq!(write("ecb", CB + 10, &w, BS), IoStatus::Success);
        let mut want = ext_data.clone();
        want[((CB + 10) * BS) as usize..((CB + 16) * BS) as usize].copy_from_slice(&w);
        assert_eq!(read("ecb", 0, 4 * CB), want, "copied around the write");
        assert_eq!(
            ext_st.image(),
            ext_data,
            "the external bdev is never written"
        );
        let snap = snapshot("e", clone, "es");
        assert_eq!(
            read("ecb", 0, 4 * CB),
            want,
            "the same through its snapshot"
        );
        close_bdev("ecb");
        unload("e");
        let image = st.image();
        let m = checked(&image);
        let sb = m.blob(snap).unwrap();
        assert!(
            sb.is_esnap_clone() && sb.read_only(),
            "the snapshot took the external snapshot"
        );
        assert_eq!(m.blob(clone).unwrap().parent_snapshot(), Some(snap));
        assert!(!m.blob(clone).unwrap().is_esnap_clone());
        // Reloaded: degraded until the device is given back.
        load("e", "eram");
        let xs = app(|| store("e").externals());
        assert_eq!(xs.len(), 1);
        assert_eq!(xs[0].id, id);
        open_bdev("e", clone, "ecb");
        app(|| with_blob("ecb", |h| assert!(h.is_degraded())));
        assert_eq!(
            io("ecb", IoType::Read, 0, CB, None).0,
            IoStatus::Failed(libc::EIO)
        );
        assert_eq!(
            read("ecb", CB, CB),
            want[(CB * BS) as usize..(2 * CB * BS) as usize]
        );
        xs[0].set_dev(Some(dev()));
        app(|| with_blob("ecb", |h| assert!(!h.is_degraded())));
        assert_eq!(read("ecb", 0, 4 * CB), want);
        // Inflated: every cluster its own, no parent, no external snapshot.
        run(move || async move { store("e").inflate(clone).await.unwrap() });
        app(|| {
            with_blob("ecb", |h| {
                assert!(!h.is_thin() && h.parent().is_none() && h.external_id().is_none());
                assert_eq!(h.num_allocated_clusters(), 4);
            })
        });
        xs[0].set_dev(None);
        assert_eq!(
            read("ecb", 0, 4 * CB),
            want,
            "no longer needs the external bdev"
        );
        close_bdev("ecb");
        unload("e");
        unregister("eram");
        unregister("ext");
        let image = st.image();
        let m = checked(&image);
        assert!(m.blob(clone).unwrap().parent().is_none());
    });
}
