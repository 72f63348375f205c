//! Ground truth from SPDK itself: SPDK v24.05's `spdk_tgt` builds an lvstore on an aio file, our loader reads
//! the file back, and everything must agree with what SPDK's RPCs reported.
//!
//! 1. `spdk_tgt` #1: lvstore with 64 KiB clusters; a thick lvol of 640 clusters (two extent pages), a thin
//!    one of 1600 clusters, a snapshot of the thick one, a clone of the snapshot (renamed, so its name is
//!    stored short), a snapshot of the clone (a two-level chain), a small thick lvol with a clear method.
//!    RPC answers recorded, clean stop (`spdk_kill_instance SIGTERM`). Our reader must match them with clean
//!    masks and no problem.
//! 2. SPDK's `spdk_dd` writes three clusters into the thin lvol across an extent page boundary.
//! 3. `spdk_tgt` #2 loads the store, snapshots the thin lvol, resizes it, deletes the small lvol, creates
//!    another; RPC answers recorded; SIGKILL. Our reader sees a dirty store; after `rebuild_masks` it must
//!    match the answers, with no problem.
//! 4. `spdk_tgt` #3 loads the dirty store (SPDK's own recovery) and stops cleanly: the masks SPDK wrote must
//!    be bit for bit the ones we rebuilt.
//!
//! Needs SPDK at `/root/spdk-peer` (or `$SPDK_PEER`); without it the test prints SKIPPED and passes. With
//! `BLOBSTORE_KEEP=1` the image and SPDK's logs stay in `/var/tmp/blobstore-spdk-<pid>`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use blobstore::{FileDevice, MaskState, Problem, Store};
use lab::target::SpdkTgt as Spdk;
use serde_json::{json, Value};

const CLUSTER: u64 = 64 << 10;
const DEV_SIZE: u64 = 64 << 20;
const LVS: &str = "lvs0";

fn peer() -> PathBuf {
    PathBuf::from(std::env::var("SPDK_PEER").unwrap_or_else(|_| "/root/spdk-peer".into()))
}

/// Small pools so that SPDK starts quickly without hugepages.
const CONFIG: &str = r#"{"subsystems":[
 {"subsystem":"iobuf","config":[{"method":"iobuf_set_options","params":{"small_pool_count":1024,"large_pool_count":64}}]},
 {"subsystem":"bdev","config":[{"method":"bdev_set_options","params":{"bdev_io_pool_size":1024,"bdev_io_cache_size":64}}]},
 {"subsystem":"iscsi","config":[{"method":"iscsi_set_options","params":{"max_sessions":1,"max_connections_per_session":1,"max_queue_depth":2}}]}
]}"#;

/// `bdev_aio_create` on `image` (512-byte blocks) and the examine that loads its lvstore.
fn attach(spdk: &Spdk, image: &Path) {
    spdk.call(
        "bdev_aio_create",
        json!({"name": "aio0", "filename": image, "block_size": 512}),
    );
    spdk.call("bdev_wait_for_examine", Value::Null);
}

/// What SPDK's RPCs say about the lvstore and its lvols.
#[derive(Debug)]
struct Truth {
    lvs: Value,
    /// Per lvol: its `bdev_lvol_get_lvols` entry merged with `bdev_get_bdevs`' size and `driver_specific.lvol`.
    lvols: Vec<Value>,
}

fn truth(spdk: &Spdk) -> Truth {
    let lvs = spdk.call("bdev_lvol_get_lvstores", json!({"lvs_name": LVS}))[0].clone();
    let mut lvols = Vec::new();
    for l in spdk
        .call("bdev_lvol_get_lvols", json!({"lvs_name": LVS}))
        .as_array()
        .unwrap()
    {
        let b = &spdk.call("bdev_get_bdevs", json!({"name": l["uuid"]}))[0];
        let mut l = l.clone();
        l["num_blocks"] = b["num_blocks"].clone();
        l["block_size"] = b["block_size"].clone();
        l["driver"] = b["driver_specific"]["lvol"].clone();
        lvols.push(l);
    }
    Truth { lvs, lvols }
}

fn sorted(v: Vec<String>) -> Vec<String> {
    let mut v = v;
    v.sort();
    v
}

/// Our model against SPDK's answers.
fn compare(store: &Store, t: &Truth) {
    let lvs = store.lvol_store().unwrap();
    assert_eq!(lvs.name, t.lvs["name"]);
    assert_eq!(lvs.uuid.to_string(), t.lvs["uuid"]);
    assert_eq!(lvs.cluster_size as u64, t.lvs["cluster_size"]);
    assert_eq!(lvs.block_size as u64, t.lvs["block_size"]);
    assert_eq!(lvs.total_data_clusters, t.lvs["total_data_clusters"]);
    assert_eq!(lvs.free_clusters, t.lvs["free_clusters"], "free clusters");
    assert_eq!(
        sorted(lvs.lvols.iter().map(|l| l.name.clone()).collect()),
        sorted(
            t.lvols
                .iter()
                .map(|l| l["name"].as_str().unwrap().to_string())
                .collect()
        ),
        "the same lvols"
    );
    let name_of = |id| lvs.lvol_by_id(id).map(|l| l.name.clone()).unwrap();
    for r in &t.lvols {
        let name = r["name"].as_str().unwrap();
        let ours = lvs.lvol(name).unwrap();
        let d = &r["driver"];
        assert_eq!(
            ours.uuid.map(|u| u.to_string()).as_deref(),
            r["uuid"].as_str(),
            "{name} uuid"
        );
        assert_eq!(ours.unique_id, r["uuid"], "{name} unique id");
        assert_eq!(ours.thin, r["is_thin_provisioned"], "{name} thin");
        assert_eq!(ours.thin, d["thin_provision"], "{name} thin");
        assert_eq!(ours.is_snapshot, r["is_snapshot"], "{name} snapshot");
        assert_eq!(ours.is_clone, r["is_clone"], "{name} clone");
        assert_eq!(
            ours.is_esnap_clone, r["is_esnap_clone"],
            "{name} esnap clone"
        );
        let bytes = r["num_blocks"].as_u64().unwrap() * r["block_size"].as_u64().unwrap();
        assert_eq!(ours.num_clusters * CLUSTER, bytes, "{name} size");
        assert_eq!(
            ours.num_allocated_clusters, d["num_allocated_clusters"],
            "{name} allocated"
        );
        assert_eq!(ours.is_snapshot, d["snapshot"], "{name} snapshot");
        assert_eq!(ours.is_clone, d["clone"], "{name} clone");
        assert!(
            !ours.is_snapshot || ours.read_only,
            "{name}: snapshots are read-only"
        );
        assert_eq!(
            ours.parent.map(name_of).as_deref(),
            d.get("base_snapshot").and_then(Value::as_str),
            "{name} parent"
        );
        let clones: Vec<String> = d
            .get("clones")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|c| c.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        assert_eq!(
            sorted(ours.clones.iter().map(|&c| name_of(c)).collect()),
            sorted(clones),
            "{name} clones"
        );
    }
}

fn load(image: &Path) -> Store {
    Store::load(&FileDevice::open(image).unwrap()).unwrap()
}

#[test]
fn spdk_lvstore() {
    if !peer().join("build/bin/spdk_tgt").exists() {
        println!("SKIPPED: no SPDK at {} (set SPDK_PEER)", peer().display());
        return;
    }
    let t0 = Instant::now();
    let dir = PathBuf::from(format!("/var/tmp/blobstore-spdk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    let image = dir.join("lvs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DEV_SIZE)
        .unwrap();

    // 1. Build, record, stop cleanly.
    let spdk = Spdk::start(&dir, "tgt1");
    attach(&spdk, &image);
    let lvs_uuid = spdk.call(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "aio0", "lvs_name": LVS, "cluster_sz": CLUSTER}),
    );
    let create = |name: &str, mib: u64, thin: bool| {
        spdk.call(
            "bdev_lvol_create",
            json!({"lvs_name": LVS, "lvol_name": name, "size_in_mib": mib, "thin_provision": thin}),
        )
    };
    create("thick0", 40, false);
    create("thin0", 100, true);
    spdk.call(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs0/thick0", "snapshot_name": "snap0"}),
    );
    spdk.call(
        "bdev_lvol_clone",
        json!({"snapshot_name": "lvs0/snap0", "clone_name": "clone0"}),
    );
    spdk.call(
        "bdev_lvol_rename",
        json!({"old_name": "lvs0/clone0", "new_name": "clone0r"}),
    );
    spdk.call(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs0/clone0r", "snapshot_name": "snap1"}),
    );
    spdk.call(
        "bdev_lvol_create",
        json!({"lvs_name": LVS, "lvol_name": "small", "size_in_mib": 1, "clear_method": "write_zeroes"}),
    );
    let t1 = truth(&spdk);
    assert_eq!(t1.lvs["uuid"], lvs_uuid);
    spdk.stop();

    let clean = load(&image);
    assert_eq!(clean.mask_state, MaskState::Clean);
    assert_eq!(clean.check(), vec![], "clean store from spdk_tgt #1");
    compare(&clean, &t1);
    let lvs = clean.lvol_store().unwrap();
    let thick0 = clean.blob(lvs.lvol("snap0").unwrap().blob_id).unwrap();
    assert_eq!(
        thick0.extent_pages.len(),
        2,
        "640 clusters take two extent pages"
    );
    assert_eq!(
        lvs.lvol("clone0r").unwrap().parent,
        Some(lvs.lvol("snap1").unwrap().blob_id)
    );
    assert_eq!(
        lvs.lvol("snap1").unwrap().parent,
        Some(lvs.lvol("snap0").unwrap().blob_id)
    );
    assert_eq!(
        clean
            .blob(lvs.lvol("clone0r").unwrap().blob_id)
            .unwrap()
            .xattr("name"),
        Some(&b"clone0r\0"[..])
    );
    assert_eq!(
        lvs.lvol("small").unwrap().clear_method,
        blobstore::format::ClearMethod::WriteZeroes
    );

    // 2. SPDK writes three clusters of thin0, 511..513: extent pages of slots 0 and 1 get allocated.
    let data = dir.join("data");
    std::fs::write(&data, vec![0x5a; 3 * CLUSTER as usize]).unwrap();
    let dd_config = dir.join("dd.json");
    let mut cfg: Value = serde_json::from_str(CONFIG).unwrap();
    cfg["subsystems"][1]["config"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "method": "bdev_aio_create",
            "params": {"name": "aio0", "filename": image, "block_size": 512}
        }));
    std::fs::write(&dd_config, cfg.to_string()).unwrap();
    let dd = Command::new(peer().join("build/bin/spdk_dd"))
        .args([
            "-m",
            "0x1",
            "--no-huge",
            "-s",
            "256",
            "--disable-cpumask-locks",
            "--no-rpc-server",
        ])
        .arg("--json")
        .arg(&dd_config)
        .arg(format!("--if={}", data.display()))
        .args(["--ob=lvs0/thin0", "--bs=65536", "--count=3", "--seek=511"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let dd_pid = dd.id();
    let out = dd.wait_with_output().unwrap();
    lab::target::remove_leftovers(Path::new("spdk_dd"), dd_pid);
    assert!(
        out.status.success(),
        "spdk_dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 3. Load in SPDK, change, record, crash.
    let spdk = Spdk::start(&dir, "tgt2");
    attach(&spdk, &image);
    spdk.call(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs0/thin0", "snapshot_name": "snap2"}),
    );
    spdk.call(
        "bdev_lvol_resize",
        json!({"name": "lvs0/thin0", "size_in_mib": 200}),
    );
    spdk.call("bdev_lvol_delete", json!({"name": "lvs0/small"}));
    spdk.call(
        "bdev_lvol_create",
        json!({"lvs_name": LVS, "lvol_name": "late", "size_in_mib": 2, "thin_provision": false}),
    );
    let t2 = truth(&spdk);
    spdk.crash();

    let mut dirty = load(&image);
    assert!(!dirty.super_block.is_clean());
    assert_eq!(dirty.mask_state, MaskState::Stale);
    assert_eq!(dirty.check(), vec![Problem::MasksNotTrusted]);
    dirty.rebuild_masks();
    assert_eq!(
        dirty.check(),
        vec![],
        "dirty store from spdk_tgt #2, masks rebuilt"
    );
    compare(&dirty, &t2);
    let lvs = dirty.lvol_store().unwrap();
    let snap2 = dirty.blob(lvs.lvol("snap2").unwrap().blob_id).unwrap();
    assert_eq!(
        snap2.clusters.iter().map(|&(c, _)| c).collect::<Vec<_>>(),
        vec![511, 512, 513]
    );
    assert_eq!(
        snap2
            .extent_pages
            .iter()
            .map(|&(s, _)| s)
            .collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert_eq!(lvs.lvol("thin0").unwrap().num_clusters, 3200);

    // 4. SPDK's own recovery writes the masks we rebuilt.
    let spdk = Spdk::start(&dir, "tgt3");
    attach(&spdk, &image);
    let t3 = truth(&spdk);
    spdk.stop();
    let recovered = load(&image);
    assert_eq!(recovered.mask_state, MaskState::Clean);
    assert_eq!(recovered.masks, dirty.masks, "SPDK's recovered masks");
    assert_eq!(recovered.check(), vec![]);
    compare(&recovered, &t3);
    assert_eq!(recovered.blobs, dirty.blobs);

    if std::env::var_os("BLOBSTORE_KEEP").is_none() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    println!("spdk_lvstore: {:.1} s", t0.elapsed().as_secs_f64());
}
