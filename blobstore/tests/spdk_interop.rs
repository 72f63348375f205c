//! A store made by ours, opened by SPDK v24.05: our runtime creates an lvstore on an aio file (thick and thin
//! lvols with data across clusters and extent pages, a snapshot of a written lvol, a snapshot deleted into its
//! clone, a read-only lvol and a clone of it, an xattr), unloads;
//! SPDK's `spdk_tgt` must list the same lvstore and lvols, `spdk_dd` must read our data back through SPDK's
//! lvols; SPDK then writes, creates and deletes, and is killed (SIGKILL); ours loads SPDK's dirty store, reads
//! SPDK's data and our own, and the checker finds the store consistent.
//!
//! Needs SPDK at `/root/spdk-peer` (or `$SPDK_PEER`); without it the test prints SKIPPED and passes.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bdev::modules::uring::{self, UringOpts};
use bdev::IoStatus;
use blobstore::blob::CreateOptions;
use blobstore::layout::InitClear;
use blobstore::runtime::Blobstore;
use blobstore::{BlobId, FileDevice, LoadOptions, MaskState, Store};
use lab::target::SpdkTgt as Spdk;
use serde_json::{json, Value};

const BS: u64 = 512;
const CLUSTER: u64 = 64 << 10;
const CB: u64 = CLUSTER / BS;
const DEV_SIZE: u64 = 64 << 20;

fn peer() -> PathBuf {
    PathBuf::from(std::env::var("SPDK_PEER").unwrap_or_else(|_| "/root/spdk-peer".into()))
}

const CONFIG: &str = r#"{"subsystems":[
 {"subsystem":"iobuf","config":[{"method":"iobuf_set_options","params":{"small_pool_count":1024,"large_pool_count":64}}]},
 {"subsystem":"bdev","config":[{"method":"bdev_set_options","params":{"bdev_io_pool_size":1024,"bdev_io_cache_size":64}}]}
]}"#;

/// `spdk_dd` copies `count` clusters between a file and an lvol of the image (`to_lvol`: file -> lvol).
fn spdk_dd(
    dir: &Path,
    image: &Path,
    lvol: &str,
    file: &Path,
    skip: u64,
    count: u64,
    to_lvol: bool,
) {
    let cfg_path = dir.join("dd.json");
    let mut cfg: Value = serde_json::from_str(CONFIG).unwrap();
    cfg["subsystems"][1]["config"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "method": "bdev_aio_create",
            "params": {"name": "aio0", "filename": image, "block_size": 512}
        }));
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut cmd = Command::new(peer().join("build/bin/spdk_dd"));
    cmd.args([
        "-m",
        "0x1",
        "--no-huge",
        "-s",
        "256",
        "--disable-cpumask-locks",
        "--no-rpc-server",
    ])
    .arg("--json")
    .arg(&cfg_path)
    .arg(format!("--bs={CLUSTER}"))
    .arg(format!("--count={count}"));
    if to_lvol {
        cmd.arg(format!("--if={}", file.display()))
            .arg(format!("--ob={lvol}"))
            .arg(format!("--seek={skip}"));
    } else {
        cmd.arg(format!("--ib={lvol}"))
            .arg(format!("--of={}", file.display()))
            .arg(format!("--skip={skip}"));
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    lab::target::remove_leftovers(Path::new("spdk_dd"), pid);
    assert!(
        out.status.success(),
        "spdk_dd {lvol}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn create_lvol(
    bs: &Blobstore,
    name: &str,
    clusters: u64,
    thin: bool,
) -> impl std::future::Future<Output = BlobId> {
    let bs = bs.clone();
    let name = name.to_string();
    async move {
        bs.create_blob(CreateOptions {
            num_clusters: clusters,
            thin,
            xattrs: blobstore::lvol::lvol_xattrs(&name, &uuid::Uuid::new_v4()),
            ..Default::default()
        })
        .await
        .unwrap()
    }
}

fn aio(name: &str, image: &Path) {
    let opts = UringOpts {
        name: name.into(),
        filename: image.display().to_string(),
        block_size: 512,
        aio: true,
        fallocate: true,
        ..Default::default()
    };
    app(move || uring::create(opts).map(|_| ())).unwrap();
}

#[test]
fn spdk_opens_our_store_and_we_open_spdks() {
    if !peer().join("build/bin/spdk_tgt").exists() {
        println!("SKIPPED: no SPDK at {} (set SPDK_PEER)", peer().display());
        return;
    }
    let dir = PathBuf::from(format!("/var/tmp/blobstore-interop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    let image = dir.join("lvs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DEV_SIZE)
        .unwrap();
    let d2 = dir.clone();
    with_reactors("0x1", move || body(&d2, &image));
    if std::env::var_os("BLOBSTORE_KEEP").is_none() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn body(dir: &Path, image: &Path) {
    // 1. Ours builds the store.
    aio("aio_ours", image);
    let lvs_uuid = uuid::Uuid::new_v4();
    let (thick, thin, snap) = run(move || async move {
        let bs = Blobstore::init_lvstore(
            claimed("aio_ours"),
            "ours",
            lvs_uuid,
            CLUSTER as u32,
            100,
            InitClear::Unmap,
        )
        .await
        .unwrap();
        let thick = create_lvol(&bs, "thick", 20, false).await;
        let thin = create_lvol(&bs, "thin", 1000, true).await;
        let snap = create_lvol(&bs, "snap", 4, false).await;
        keep_store("bs", bs);
        (thick, thin, snap)
    });
    open_bdev("bs", thick, "b_thick");
    open_bdev("bs", thin, "b_thin");
    open_bdev("bs", snap, "b_snap");
    let thick_data = pattern(1, (20 * CLUSTER) as usize);
    assert_eq!(write("b_thick", 0, &thick_data, BS), IoStatus::Success);
    // Thin: clusters 510..514, across the extent pages of slots 0 and 1.
    let thin_data = pattern(2, (4 * CLUSTER) as usize);
    assert_eq!(write("b_thin", 510 * CB, &thin_data, BS), IoStatus::Success);
    // A snapshot of thick taken by ours, then a write into thick (copied around from the snapshot).
    let snapshot = |id: BlobId, name: &'static str| {
        run(move || async move {
            store("bs")
                .create_snapshot(
                    id,
                    blobstore::lvol::lvol_xattrs(name, &uuid::Uuid::new_v4()),
                )
                .await
                .unwrap()
        })
    };
    snapshot(thick, "tsnap");
    let tnew = pattern(6, (2 * BS) as usize);
    assert_eq!(write("b_thick", 3 * CB + 7, &tnew, BS), IoStatus::Success);
    let mut thick_view = thick_data.clone();
    thick_view[((3 * CB + 7) * BS) as usize..((3 * CB + 9) * BS) as usize].copy_from_slice(&tnew);
    // A snapshot of thin, a write into thin, and the snapshot deleted again: thin takes its clusters.
    let thsnap = snapshot(thin, "thsnap");
    let thnew = pattern(7, (3 * BS) as usize);
    assert_eq!(
        write("b_thin", 511 * CB + 100, &thnew, BS),
        IoStatus::Success
    );
    run(move || async move { store("bs").delete_blob(thsnap).await.unwrap() });
    let mut thin_view = thin_data.clone();
    thin_view[((CB + 100) * BS) as usize..((CB + 103) * BS) as usize].copy_from_slice(&thnew);
    assert_eq!(read("b_thin", 510 * CB, 4 * CB), thin_view);
    let snap_data = pattern(3, (4 * CLUSTER) as usize);
    assert_eq!(write("b_snap", 0, &snap_data, BS), IoStatus::Success);
    close_bdev("b_snap");
    let clone = run(move || async move {
        let bs = store("bs");
        let h = bs.open_blob(snap).await.unwrap();
        h.set_read_only().unwrap();
        h.close().await.unwrap();
        let c = bs
            .create_clone(
                snap,
                blobstore::lvol::lvol_xattrs("clone", &uuid::Uuid::new_v4()),
            )
            .await
            .unwrap();
        let h = bs.open_blob(thick).await.unwrap();
        h.set_xattr("owner", b"ours\0").unwrap();
        h.close().await.unwrap();
        c
    });
    open_bdev("bs", clone, "b_clone");
    let clone_data = pattern(4, (2 * BS) as usize);
    assert_eq!(write("b_clone", CB + 3, &clone_data, BS), IoStatus::Success);
    let mut clone_view = snap_data.clone();
    clone_view[((CB + 3) * BS) as usize..((CB + 5) * BS) as usize].copy_from_slice(&clone_data);
    assert_eq!(read("b_clone", 0, 4 * CB), clone_view);
    close_bdev("b_clone");
    close_bdev("b_thick");
    close_bdev("b_thin");
    let free_ours = run(|| async {
        let bs = forget_store("bs").unwrap();
        let f = bs.free_clusters();
        bs.unload().await.unwrap();
        f
    });
    unregister("aio_ours");
    let ours = Store::load(&FileDevice::open(image).unwrap()).unwrap();
    assert_eq!(ours.mask_state, MaskState::Clean);
    assert_eq!(ours.check(), vec![]);

    // 2. SPDK loads it: the same lvstore and lvols.
    let spdk = Spdk::start(dir, "tgt1");
    spdk.call(
        "bdev_aio_create",
        json!({"name": "aio0", "filename": image, "block_size": 512}),
    );
    spdk.call("bdev_wait_for_examine", Value::Null);
    let lvs = spdk.call("bdev_lvol_get_lvstores", json!({"lvs_name": "ours"}))[0].clone();
    assert_eq!(lvs["uuid"], lvs_uuid.to_string());
    assert_eq!(lvs["cluster_size"], CLUSTER);
    assert_eq!(lvs["block_size"], BS);
    assert_eq!(lvs["free_clusters"], free_ours);
    assert_eq!(lvs["total_data_clusters"], ours.total_data_clusters());
    let lvols = spdk.call("bdev_lvol_get_lvols", json!({"lvs_name": "ours"}));
    let by_name = |n: &str| -> Value {
        lvols
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("SPDK does not list lvol {n}: {lvols}"))
    };
    let model = ours.lvol_store().unwrap();
    for l in &model.lvols {
        let s = by_name(&l.name);
        assert_eq!(s["uuid"], l.uuid.unwrap().to_string(), "{}", l.name);
        assert_eq!(s["is_thin_provisioned"], l.thin, "{}", l.name);
        assert_eq!(s["is_snapshot"], l.is_snapshot, "{}", l.name);
        assert_eq!(s["is_clone"], l.is_clone, "{}", l.name);
        let b = &spdk.call("bdev_get_bdevs", json!({"name": s["uuid"]}))[0];
        assert_eq!(
            b["num_blocks"].as_u64().unwrap() * BS,
            l.num_clusters * CLUSTER,
            "{} size",
            l.name
        );
        assert_eq!(
            b["driver_specific"]["lvol"]["num_allocated_clusters"], l.num_allocated_clusters,
            "{} allocated",
            l.name
        );
    }
    assert_eq!(model.lvols.len(), lvols.as_array().unwrap().len());
    assert_eq!(by_name("clone")["is_clone"], true);
    assert_eq!(by_name("snap")["is_snapshot"], true);
    assert_eq!(by_name("tsnap")["is_snapshot"], true);
    assert_eq!(by_name("thick")["is_clone"], true);
    assert!(
        lvols
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["name"] != "thsnap"),
        "the deleted snapshot is gone"
    );
    // SPDK changes the store, then dies.
    spdk.call(
        "bdev_lvol_create",
        json!({"lvs_name": "ours", "lvol_name": "spdk_new", "size_in_mib": 1, "thin_provision": true}),
    );
    spdk.call("bdev_lvol_delete", json!({"name": "ours/thin"}));
    spdk.stop();

    // 3. SPDK reads our data, and writes some of its own.
    let out = dir.join("out");
    spdk_dd(dir, image, "ours/thick", &out, 0, 20, false);
    assert!(
        std::fs::read(&out).unwrap() == thick_view,
        "SPDK reads our lvol, now a clone of our snapshot"
    );
    spdk_dd(dir, image, "ours/tsnap", &out, 0, 20, false);
    assert!(
        std::fs::read(&out).unwrap() == thick_data,
        "SPDK reads our snapshot"
    );
    spdk_dd(dir, image, "ours/clone", &out, 0, 4, false);
    assert!(
        std::fs::read(&out).unwrap() == clone_view,
        "SPDK reads our clone through its snapshot"
    );
    let spdk_data = pattern(5, (2 * CLUSTER) as usize);
    std::fs::write(dir.join("in"), &spdk_data).unwrap();
    spdk_dd(dir, image, "ours/spdk_new", &dir.join("in"), 5, 2, true);

    // 4. SPDK once more, killed after a change: a dirty store for ours.
    let spdk = Spdk::start(dir, "tgt2");
    spdk.call(
        "bdev_aio_create",
        json!({"name": "aio0", "filename": image, "block_size": 512}),
    );
    spdk.call("bdev_wait_for_examine", Value::Null);
    spdk.call(
        "bdev_lvol_create",
        json!({"lvs_name": "ours", "lvol_name": "late", "size_in_mib": 1}),
    );
    spdk.crash();

    let mut dirty = Store::load(&FileDevice::open(image).unwrap()).unwrap();
    assert_eq!(dirty.mask_state, MaskState::Stale);
    dirty.rebuild_masks();
    assert_eq!(dirty.check(), vec![]);
    let model = dirty.lvol_store().unwrap();
    let spdk_new = model.lvol("spdk_new").unwrap().blob_id;
    assert!(model.lvol("thin").is_none() && model.lvol("late").is_some());

    // 5. Ours loads SPDK's dirty store and reads SPDK's data and its own.
    aio("aio_ours2", image);
    run(|| async {
        let bs = Blobstore::load(claimed("aio_ours2"), &LoadOptions::default())
            .await
            .unwrap();
        keep_store("bs", bs);
    });
    open_bdev("bs", spdk_new, "b_new");
    open_bdev("bs", thick, "b_thick");
    open_bdev("bs", clone, "b_clone");
    assert_eq!(
        read("b_new", 5 * CB, 2 * CB),
        spdk_data,
        "ours reads what SPDK wrote"
    );
    assert!(read("b_new", 0, 5 * CB).iter().all(|&b| b == 0));
    assert_eq!(read("b_thick", 0, 20 * CB), thick_view);
    assert_eq!(read("b_clone", 0, 4 * CB), clone_view);
    close_bdev("b_new");
    close_bdev("b_thick");
    close_bdev("b_clone");
    run(|| async {
        let bs = forget_store("bs").unwrap();
        bs.unload().await.unwrap();
    });
    unregister("aio_ours2");
    let after = Store::load(&FileDevice::open(image).unwrap()).unwrap();
    assert_eq!(after.mask_state, MaskState::Clean);
    assert_eq!(after.check(), vec![]);
    assert_eq!(
        after.masks, dirty.masks,
        "ours writes the masks SPDK's recovery would"
    );
}

/// The same lvstore made by SPDK and by ours (same name and uuids, same lvols in the same order) is the same
/// bytes: super block, masks, and every metadata page.
#[test]
fn same_metadata_bytes_as_spdk() {
    if !peer().join("build/bin/spdk_tgt").exists() {
        println!("SKIPPED: no SPDK at {} (set SPDK_PEER)", peer().display());
        return;
    }
    let dir = PathBuf::from(format!(
        "/var/tmp/blobstore-samebytes-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    let spdk_img = dir.join("spdk.img");
    let ours_img = dir.join("ours.img");
    for p in [&spdk_img, &ours_img] {
        std::fs::File::create(p).unwrap().set_len(DEV_SIZE).unwrap();
    }
    // SPDK: an lvstore, a thick lvol over two extent pages, a thin one, a small thick one; clean stop.
    let spdk = Spdk::start(&dir, "tgt");
    spdk.call(
        "bdev_aio_create",
        json!({"name": "aio0", "filename": spdk_img, "block_size": 512}),
    );
    let lvs_uuid = spdk.call(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "aio0", "lvs_name": "same", "cluster_sz": CLUSTER}),
    );
    let lvols = [
        ("big", 40u64, false),
        ("thin", 100, true),
        ("small", 1, false),
    ];
    let mut uuids = Vec::new();
    for (name, mib, thin) in lvols {
        let u = spdk.call(
            "bdev_lvol_create",
            json!({"lvs_name": "same", "lvol_name": name, "size_in_mib": mib, "thin_provision": thin}),
        );
        uuids.push(u.as_str().unwrap().parse::<uuid::Uuid>().unwrap());
    }
    spdk.stop();
    let lvs_uuid: uuid::Uuid = lvs_uuid.as_str().unwrap().parse().unwrap();

    // Ours: the same, with SPDK's uuids.
    let oi = ours_img.clone();
    with_reactors("0x1", move || {
        aio("aio_same", &oi);
        run(move || async move {
            let bs = Blobstore::init_lvstore(
                claimed("aio_same"),
                "same",
                lvs_uuid,
                CLUSTER as u32,
                100,
                InitClear::Unmap,
            )
            .await
            .unwrap();
            for ((name, mib, thin), u) in lvols.iter().zip(&uuids) {
                bs.create_blob(CreateOptions {
                    num_clusters: (mib << 20).div_ceil(CLUSTER),
                    thin: *thin,
                    xattrs: blobstore::lvol::lvol_xattrs(name, u),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            bs.unload().await.unwrap();
        });
        unregister("aio_same");
    });
    let a = std::fs::read(&spdk_img).unwrap();
    let b = std::fs::read(&ours_img).unwrap();
    let s = Store::load(&FileDevice::open(&spdk_img).unwrap()).unwrap();
    let md_end = (s.super_block.md.end() * 4096) as usize;
    for page in 0..md_end / 4096 {
        let r = page * 4096..(page + 1) * 4096;
        assert!(
            a[r.clone()] == b[r],
            "page {page} differs (md starts at page {})",
            s.super_block.md.start
        );
    }
    if std::env::var_os("BLOBSTORE_KEEP").is_none() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
