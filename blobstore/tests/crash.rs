//! Crash drill: the power is cut after every write index of a workload (creates, first writes to thin
//! clusters, writes across clusters and extent pages, resizes both ways, xattrs, delete, a clone, an unmap that
//! gives a cluster back, a snapshot,
//! an inflate, deleting a snapshot into its clone, unload), and every time the image left behind must load
//! consistent (after the runtime settles an interrupted snapshot operation, as the next start would) (the checker finds nothing once the masks are rebuilt, as
//! SPDK's recovery rebuilds them), every acknowledged operation and write must be there, and the runtime
//! must load it and go on working.
//!
//! A cut makes the RAM disk fail every later write (they reach nothing) and the workload stops at its first
//! failed step, as a process would die with the power.

mod common;
use common::*;

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bdev::{Completion, IoChannel, IoHandle, IoStatus};
use blobstore::blob::{BlobHandle, CreateOptions};
use blobstore::exec::oneshot;
use blobstore::layout::InitClear;
use blobstore::runtime::Blobstore;
use blobstore::{BlobId, LoadOptions, MaskState, MemDevice, Store};
use reactor::dma::DmaBuf;

const BS: u64 = 512;
const CLUSTER: u64 = 16 << 10;
const CB: u64 = CLUSTER / BS;
const DISK: usize = 16 << 20;

/// What the workload got acknowledged before the power went.
#[derive(Clone, Debug, Default)]
struct Acked {
    /// Blobs created: (label, id).
    created: Vec<(&'static str, BlobId)>,
    deleted: Vec<&'static str>,
    /// Last acknowledged size of each blob, in clusters.
    sizes: Vec<(&'static str, u64)>,
    /// Acknowledged writes: (blob label, first block, data).
    writes: Vec<(&'static str, u64, Vec<u8>)>,
    xattrs: Vec<(&'static str, &'static str, Vec<u8>)>,
    /// Clone clusters written once (clone, parent, cluster): the rest of the cluster is the parent's.
    copied: Vec<(&'static str, &'static str, u64)>,
    /// Blobs inflated (their parent dropped).
    inflated: Vec<&'static str>,
    /// Blobs whose deletion was started: gone or not, unless acknowledged.
    maybe_deleted: Vec<&'static str>,
    /// Steps completed.
    steps: usize,
    unloaded: bool,
}

impl Acked {
    fn id(&self, label: &str) -> Option<BlobId> {
        self.created
            .iter()
            .find(|(l, _)| *l == label)
            .map(|(_, i)| *i)
    }
    fn set_size(&mut self, label: &'static str, n: u64) {
        self.sizes.retain(|(l, _)| *l != label);
        self.sizes.push((label, n));
    }
    fn size(&self, label: &str) -> Option<u64> {
        self.sizes
            .iter()
            .find(|(l, _)| *l == label)
            .map(|(_, n)| *n)
    }
}

/// A write of `data` at `block` through `ch`, awaited.
async fn write_at(ch: &IoChannel, block: u64, data: &[u8]) -> IoStatus {
    let mut buf = DmaBuf::alloc(data.len()).unwrap();
    buf.as_mut_slice().copy_from_slice(data);
    let (tx, rx) = oneshot();
    let cb = Completion::Closure(Box::new(move |io: IoHandle| tx.send(io.status())));
    if ch.write(buf, block, data.len() as u64 / BS, cb, 0).is_err() {
        return IoStatus::Failed(libc::ENOMEM);
    }
    rx.await.unwrap_or(IoStatus::Failed(libc::EIO))
}

/// An unmap of `blocks` at `block` through `ch`, awaited.
async fn unmap_at(ch: &IoChannel, block: u64, blocks: u64) -> IoStatus {
    let (tx, rx) = oneshot();
    let cb = Completion::Closure(Box::new(move |io: IoHandle| tx.send(io.status())));
    if ch
        .submit_nodata(bdev::IoType::Unmap, block, blocks, cb, 0)
        .is_err()
    {
        return IoStatus::Failed(libc::ENOMEM);
    }
    rx.await.unwrap_or(IoStatus::Failed(libc::EIO))
}

/// An open blob with a bdev and a channel on it. Dropped (the workload stopped at a failure), its bdev goes
/// too, so that nothing holds the disk.
struct Open {
    handle: Option<BlobHandle>,
    bdev: String,
    desc: Option<bdev::Desc>,
    ch: Option<IoChannel>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.ch.take();
        self.desc.take();
        if let Some(b) = bdev::get(&self.bdev) {
            b.unregister(|_| {});
        }
    }
}

async fn open(bs: &Blobstore, id: BlobId, bdev_name: String) -> Open {
    let handle = bs.open_blob(id).await.unwrap();
    blobstore::blob_bdev::register(&handle, &bdev_name, Default::default()).unwrap();
    let desc = bdev::open(&bdev_name, true, None).unwrap();
    let ch = desc.channel();
    Open {
        handle: Some(handle),
        bdev: bdev_name,
        desc: Some(desc),
        ch: Some(ch),
    }
}

async fn close(mut o: Open) {
    o.ch.take();
    o.desc.take();
    let (tx, rx) = oneshot();
    let tx = reactor::OnThread::new(tx);
    match bdev::get(&o.bdev) {
        Some(b) => b.unregister(move |_| tx.with(|tx| tx.send(()))),
        None => tx.with(|tx| tx.send(())),
    }
    rx.await;
    if let Some(h) = o.handle.take() {
        let _ = h.close().await;
    }
}

/// Resizes an open blob; its bdev learns the new size.
async fn resize(o: &Open, n: u64) -> bool {
    if o.handle.as_ref().unwrap().resize(n).await.is_err() {
        return false;
    }
    if let Some(b) = bdev::get(&o.bdev) {
        // Shrinking is refused while descriptors are open; the blob's size is what the test checks.
        let _ = b.notify_resize((n * CB).max(1));
    }
    true
}

/// The workload. Stops at the first failed step; returns what was acknowledged.
async fn workload(bs: Blobstore, tag: String) -> Acked {
    let mut a = Acked::default();
    let ack = Rc::new(std::cell::RefCell::new(()));
    let _ = ack;
    macro_rules! step {
        ($ok:expr) => {
            if !$ok {
                return a;
            }
            a.steps += 1;
        };
    }
    let new = |thin: bool, n: u64, name: &str| CreateOptions {
        num_clusters: n,
        thin,
        xattrs: blobstore::lvol::lvol_xattrs(name, &uuid::Uuid::nil()),
        ..Default::default()
    };
    // 1-2. A thick blob and a thin one over two extent page slots.
    let r = bs.create_blob(new(false, 4, "A")).await;
    step!(r.is_ok());
    a.created.push(("A", r.unwrap()));
    a.set_size("A", 4);
    let r = bs.create_blob(new(true, 600, "B")).await;
    step!(r.is_ok());
    a.created.push(("B", r.unwrap()));
    a.set_size("B", 600);
    let oa = open(&bs, a.id("A").unwrap(), format!("{tag}_A")).await;
    let ob = open(&bs, a.id("B").unwrap(), format!("{tag}_B")).await;
    // 3. Across A's clusters 0/1.
    let d = pattern(10, (40 * BS) as usize);
    step!(write_at(oa.ch.as_ref().unwrap(), 20, &d).await == IoStatus::Success);
    a.writes.push(("A", 20, d));
    // 4. A first write into B's cluster 2 (allocating, partial).
    let d = pattern(11, (10 * BS) as usize);
    step!(write_at(ob.ch.as_ref().unwrap(), 2 * CB + 5, &d).await == IoStatus::Success);
    a.writes.push(("B", 2 * CB + 5, d));
    // 5. Across B's clusters 511/512: two allocations, the second in a new extent page.
    let d = pattern(12, (CB * BS) as usize);
    step!(write_at(ob.ch.as_ref().unwrap(), 511 * CB + 16, &d).await == IoStatus::Success);
    a.writes.push(("B", 511 * CB + 16, d));
    // 6. Into B's cluster 2 again (allocated now: straight to the base).
    let d = pattern(13, (4 * BS) as usize);
    step!(write_at(ob.ch.as_ref().unwrap(), 2 * CB + 20, &d).await == IoStatus::Success);
    a.writes.push(("B", 2 * CB + 20, d));
    // 6b. Xattrs that take A's chain to two pages.
    let h = oa.handle.as_ref().unwrap();
    let big: Vec<(&'static str, Vec<u8>)> = vec![
        ("big1", pattern(20, 1500)),
        ("big2", pattern(21, 1500)),
        ("big3", pattern(22, 1500)),
    ];
    let ok = big.iter().all(|(k, v)| h.set_xattr(k, v).is_ok()) && h.sync().await.is_ok();
    step!(ok);
    for (k, v) in big {
        a.xattrs.push(("A", k, v));
    }
    // 7. Grow A across an extent page.
    step!(resize(&oa, 520).await);
    a.set_size("A", 520);
    // 8. Write A's cluster 515.
    let d = pattern(14, (CB * BS) as usize);
    step!(write_at(oa.ch.as_ref().unwrap(), 515 * CB, &d).await == IoStatus::Success);
    a.writes.push(("A", 515 * CB, d));
    // 9. An xattr, synced.
    let h = oa.handle.as_ref().unwrap();
    let ok = h.set_xattr("k", b"v1").is_ok() && h.sync().await.is_ok();
    step!(ok);
    a.xattrs.push(("A", "k", b"v1".to_vec()));
    // 10-11. Shrink B below its second slot, and A to 3 clusters.
    step!(resize(&ob, 300).await);
    a.set_size("B", 300);
    step!(resize(&oa, 3).await);
    a.set_size("A", 3);
    // 12. A thin blob C, a whole-cluster first write, then delete C.
    let r = bs.create_blob(new(true, 10, "C")).await;
    step!(r.is_ok());
    a.created.push(("C", r.unwrap()));
    a.set_size("C", 10);
    let oc = open(&bs, a.id("C").unwrap(), format!("{tag}_C")).await;
    let d = pattern(15, CLUSTER as usize);
    step!(write_at(oc.ch.as_ref().unwrap(), 0, &d).await == IoStatus::Success);
    a.writes.push(("C", 0, d));
    close(oc).await;
    step!(bs.delete_blob(a.id("C").unwrap()).await.is_ok());
    a.deleted.push("C");
    a.writes.retain(|w| w.0 != "C");
    // 13. A snapshot-like parent P (thick, written, made read-only), a clone Q of it, and a first write into
    //     Q that copies P's cluster around the new data.
    let r = bs.create_blob(new(false, 3, "P")).await;
    step!(r.is_ok());
    a.created.push(("P", r.unwrap()));
    a.set_size("P", 3);
    let op = open(&bs, a.id("P").unwrap(), format!("{tag}_P")).await;
    let d = pattern(16, (3 * CB * BS) as usize);
    step!(write_at(op.ch.as_ref().unwrap(), 0, &d).await == IoStatus::Success);
    a.writes.push(("P", 0, d));
    let h = op.handle.as_ref().unwrap();
    let ok = h.set_read_only().is_ok() && h.sync().await.is_ok();
    step!(ok);
    close(op).await;
    let r = bs
        .create_clone(
            a.id("P").unwrap(),
            blobstore::lvol::lvol_xattrs("Q", &uuid::Uuid::nil()),
        )
        .await;
    step!(r.is_ok());
    a.created.push(("Q", r.unwrap()));
    a.set_size("Q", 3);
    let oq = open(&bs, a.id("Q").unwrap(), format!("{tag}_Q")).await;
    let d = pattern(17, (8 * BS) as usize);
    step!(write_at(oq.ch.as_ref().unwrap(), CB + 12, &d).await == IoStatus::Success);
    a.writes.push(("Q", CB + 12, d));
    a.copied.push(("Q", "P", 1));
    close(oq).await;
    // 14. Three writes at once into B: two into one unallocated cluster, one into another (one batch of
    //     allocations, the second writer waiting for the first's).
    let ch = ob.ch.as_ref().unwrap();
    let w = [
        (5 * CB + 1, pattern(30, (2 * BS) as usize)),
        (5 * CB + 9, pattern(31, (3 * BS) as usize)),
        (6 * CB, pattern(32, (CB * BS) as usize)),
    ];
    let res = blobstore::exec::join_all(w.iter().map(|(b, d)| write_at(ch, *b, d)).collect()).await;
    for ((b, d), st) in w.iter().zip(&res) {
        if *st == IoStatus::Success {
            a.writes.push(("B", *b, d.clone()));
        }
    }
    step!(res.iter().all(|st| *st == IoStatus::Success));
    // 14b. An unmap of B's cluster 6, whole: B is thin, so the cluster goes back to the store in the
    //      background (while the next steps allocate).
    step!(unmap_at(ob.ch.as_ref().unwrap(), 6 * CB, CB).await == IoStatus::Success);
    a.writes.retain(|w| !(w.0 == "B" && w.1 == 6 * CB));
    // 15. An RLE blob (no extent table, as old stores have): a first write rewrites its chain.
    let r = bs
        .create_blob(CreateOptions {
            use_extent_table: false,
            ..new(true, 20, "R")
        })
        .await;
    step!(r.is_ok());
    a.created.push(("R", r.unwrap()));
    a.set_size("R", 20);
    let or = open(&bs, a.id("R").unwrap(), format!("{tag}_R")).await;
    let d = pattern(33, (5 * BS) as usize);
    step!(write_at(or.ch.as_ref().unwrap(), 3 * CB + 2, &d).await == IoStatus::Success);
    a.writes.push(("R", 3 * CB + 2, d));
    close(or).await;
    // 16. A snapshot S of B (B's clusters go to S, B becomes its thin clone), then a first write into B that
    //     copies S's cluster around it.
    let r = bs
        .create_snapshot(
            a.id("B").unwrap(),
            blobstore::lvol::lvol_xattrs("S", &uuid::Uuid::nil()),
        )
        .await;
    step!(r.is_ok());
    a.created.push(("S", r.unwrap()));
    a.set_size("S", 300);
    let of_b: Vec<_> = a
        .writes
        .iter()
        .filter(|w| w.0 == "B")
        .map(|w| ("S", w.1, w.2.clone()))
        .collect();
    a.writes.extend(of_b);
    let d = pattern(34, (6 * BS) as usize);
    step!(write_at(ob.ch.as_ref().unwrap(), 2 * CB + 40, &d).await == IoStatus::Success);
    a.writes.push(("B", 2 * CB + 40, d));
    // 17. Inflate Q: clusters 0 and 2 copied from P, the parent dropped.
    step!(bs.inflate(a.id("Q").unwrap()).await.is_ok());
    a.inflated.push("Q");
    // 18. Delete S: B takes its clusters.
    a.maybe_deleted.push("S");
    step!(bs.delete_blob(a.id("S").unwrap()).await.is_ok());
    a.deleted.push("S");
    a.writes.retain(|w| w.0 != "S");
    // 19. Unload.
    close(oa).await;
    close(ob).await;
    step!(bs.unload().await.is_ok());
    a.unloaded = true;
    a
}

/// Bytes of blob `id` in `image` as the blob reads them (through its ancestors).
fn blob_bytes(store: &Store, image: &[u8], id: BlobId, block: u64, len: usize) -> Vec<u8> {
    common::chain_bytes(store, image, id, block * BS, len as u64, CLUSTER)
}

/// Crash points that left an interrupted snapshot operation.
static REPAIRED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `image` after the runtime loaded and unloaded it: interrupted snapshot operations finished or undone,
/// as the next start would leave them.
fn repaired(image: &[u8], tag: &str) -> Vec<u8> {
    REPAIRED.fetch_add(1, Ordering::SeqCst);
    let st = RamState::new(image.to_vec());
    let disk = format!("{tag}_repair");
    app({
        let (st, disk) = (st.clone(), disk.clone());
        move || {
            ram_disk(&disk, st, BS);
        }
    });
    let d2 = disk.clone();
    run(move || async move {
        let bs = Blobstore::load(claimed(&d2), &LoadOptions::default())
            .await
            .expect("the image loads in the runtime");
        bs.unload().await.expect("and unloads");
    });
    unregister(&disk);
    st.image()
}

/// Everything acknowledged is in `image`, which is consistent.
fn verify(image: &[u8], a: &Acked, cut: u64) {
    let s = Store::load(&MemDevice(image.to_vec()))
        .unwrap_or_else(|e| panic!("cut after {cut} writes: image does not load: {e}"));
    // Clean after the unload; dirty once a metadata change was acknowledged (the first one marks it dirty).
    if a.unloaded {
        assert_eq!(s.mask_state, MaskState::Clean, "cut after {cut}: unloaded");
    } else if a.steps > 0 {
        assert_eq!(s.mask_state, MaskState::Stale, "cut after {cut}: dirty");
    }
    // A snapshot operation the cut interrupted is settled at the next load; what counts is what that load
    // leaves.
    let fixed;
    let (mut s, image) = if s.blobs.values().any(|b| b.pending_op().is_some()) {
        fixed = repaired(image, &format!("v{cut}"));
        let s = Store::load(&MemDevice(fixed.clone())).expect("the repaired image loads");
        (s, &fixed[..])
    } else {
        (s, image)
    };
    if s.mask_state == MaskState::Stale {
        s.rebuild_masks();
    }
    assert_eq!(
        s.check(),
        vec![],
        "cut after {cut} writes ({} steps acked)",
        a.steps
    );
    let lvs = s
        .lvol_store()
        .unwrap_or_else(|e| panic!("cut after {cut}: lvstore: {e}"));
    // A deletion started but not acknowledged may have happened or not.
    let absent = |label: &str| {
        a.deleted.contains(&label)
            || (a.maybe_deleted.contains(&label) && lvs.lvol(label).is_none())
    };
    for (label, id) in &a.created {
        // A deleted blob's id may be a new blob's (ids are first pages, reused): look for the name.
        let gone = absent(label);
        assert_eq!(
            lvs.lvol(label).is_none(),
            gone,
            "cut after {cut}: blob {label}"
        );
        if gone {
            continue;
        }
        assert_eq!(lvs.lvol(label).unwrap().blob_id, *id);
        let b = s.blob(*id).unwrap();
        assert_eq!(
            Some(b.num_clusters),
            a.size(label),
            "cut after {cut}: size of {label}"
        );
        assert!(lvs.lvol(label).is_some());
    }
    for (label, block, data) in &a.writes {
        let Some(id) = a.id(label) else { continue };
        if absent(label) {
            continue;
        }
        let size = a.size(label).unwrap() * CB;
        if block + data.len() as u64 / BS > size {
            continue;
        }
        assert!(
            blob_bytes(&s, image, id, *block, data.len()) == *data,
            "cut after {cut}: acknowledged write to {label} at block {block} lost"
        );
    }
    for (clone, parent, c) in &a.copied {
        let (q, p) = (a.id(clone).unwrap(), a.id(parent).unwrap());
        let mut want = blob_bytes(&s, image, p, c * CB, CLUSTER as usize);
        for (label, block, data) in &a.writes {
            if label == clone && block / CB == *c {
                let o = ((block % CB) * BS) as usize;
                want[o..o + data.len()].copy_from_slice(data);
            }
        }
        assert!(
            blob_bytes(&s, image, q, c * CB, CLUSTER as usize) == want,
            "cut after {cut}: {clone}'s cluster {c} is not its parent's data around the write"
        );
        let want_parent = (!a.inflated.contains(clone)).then_some(p);
        assert_eq!(s.blob(q).unwrap().parent_snapshot(), want_parent);
    }
    for (label, k, v) in &a.xattrs {
        let b = s.blob(a.id(label).unwrap()).unwrap();
        assert_eq!(
            b.xattr(k),
            Some(&v[..]),
            "cut after {cut}: xattr {k} of {label}"
        );
    }
}

/// Loads `image` in the runtime on a fresh disk, creates and writes a thin blob, unloads: the store must go
/// on working after the crash, and unload clean and consistent.
fn reuse(image: Vec<u8>, tag: &str) {
    let st = RamState::new(image);
    let disk = format!("{tag}_reuse");
    app({
        let (st, disk) = (st.clone(), disk.clone());
        move || {
            ram_disk(&disk, st, BS);
        }
    });
    let t = tag.to_string();
    let d2 = disk.clone();
    let res: Result<(), String> = run(move || async move {
        let bs = Blobstore::load(claimed(&d2), &LoadOptions::default())
            .await
            .map_err(|e| format!("load: {e}"))?;
        let id = bs
            .create_blob(CreateOptions {
                num_clusters: 8,
                thin: true,
                xattrs: blobstore::lvol::lvol_xattrs("D", &uuid::Uuid::nil()),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("create: {e}"))?;
        let o = open(&bs, id, format!("{t}_D")).await;
        let st = write_at(o.ch.as_ref().unwrap(), 3, &pattern(99, 4096)).await;
        if st != IoStatus::Success {
            return Err(format!("write: {st:?}"));
        }
        close(o).await;
        bs.unload().await.map_err(|e| format!("unload: {e}"))
    });
    res.unwrap_or_else(|e| panic!("{tag}: after the crash: {e}"));
    unregister(&disk);
    let s = Store::load(&MemDevice(st.image())).unwrap();
    assert_eq!(s.mask_state, MaskState::Clean);
    assert_eq!(s.check(), vec![], "{tag}: reused store");
}

/// One run of the workload on a disk holding `image`, with the power cut after `cut` writes.
fn run_cut(image: &[u8], cut: u64, tag: &str) -> (Acked, Vec<u8>, u64) {
    let st = RamState::new(image.to_vec());
    st.cut_after.store(cut, Ordering::SeqCst);
    let disk = format!("{tag}_disk");
    app({
        let (st, disk) = (st.clone(), disk.clone());
        move || {
            ram_disk(&disk, st, BS);
        }
    });
    let (d2, t2) = (disk.clone(), tag.to_string());
    let acked = run(move || async move {
        let bs = Blobstore::load(claimed(&d2), &LoadOptions::default())
            .await
            .expect("the base image loads");
        workload(bs, t2).await
    });
    let writes = st.writes.load(Ordering::SeqCst);
    let img = st.image();
    // The store and its blobs were dropped with the workload: the disk is free to go.
    unregister(&disk);
    (acked, img, writes)
}

#[test]
fn crash_at_every_write() {
    with_reactors("0x1", || {
        // The base image: an empty lvstore, unloaded cleanly.
        let st = RamState::new(vec![0x5a; DISK]);
        app({
            let st = st.clone();
            move || {
                ram_disk("base", st, BS);
            }
        });
        run(|| async {
            let bs = Blobstore::init_lvstore(
                claimed("base"),
                "lvs",
                uuid::Uuid::new_v4(),
                CLUSTER as u32,
                100,
                InitClear::Unmap,
            )
            .await
            .unwrap();
            bs.unload().await.unwrap();
        });
        unregister("base");
        let base = st.image();
        verify(
            &base,
            &Acked {
                unloaded: true,
                ..Default::default()
            },
            u64::MAX,
        );

        let (full, img, total) = run_cut(&base, u64::MAX, "full");
        assert!(
            full.unloaded,
            "the workload runs through without a cut: {full:?}"
        );
        verify(&img, &full, u64::MAX);
        println!("workload: {} steps, {total} writes", full.steps);
        let mut points = 0;
        for cut in 0..total {
            let tag = format!("c{cut}");
            if std::env::var_os("CRASH_VERBOSE").is_some() {
                println!("cut after {cut} writes");
            }
            let (acked, img, _) = run_cut(&base, cut, &tag);
            verify(&img, &acked, cut);
            reuse(img, &tag);
            points += 1;
        }
        let repaired = REPAIRED.load(Ordering::SeqCst);
        println!(
            "crash drill: {points} crash points, every one consistent, no acknowledged write lost; \
             {repaired} left a snapshot operation for the next load to settle"
        );
        assert!(repaired > 0, "the drill cuts snapshot operations short");
        let _ = Arc::strong_count(&st);
    });
}
