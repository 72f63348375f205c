//! The lvol RPCs of our `spdk_tgt` against SPDK v24.05's on the same disk: SPDK makes an lvstore (thick and
//! thin lvols, a snapshot, a clone), and after a restart of each the two targets answer
//! `bdev_lvol_get_lvstores`, `bdev_lvol_get_lvols` and each lvol's `bdev_get_bdevs` (name, aliases, uuid,
//! size, `driver_specific.lvol`) identically; ours shuts down cleanly and SPDK loads the store again with the
//! same answers. Then ours resizes, renames, makes read-only, clones, snapshots, decouples, inflates, deletes
//! a snapshot into its clone, sets a parent, creates, renames the lvstore, deletes, and grows the lvstore with its base; SPDK
//! loads the result with the answers ours gave.
//!
//! Needs SPDK at `/root/spdk-peer` (or `$SPDK_PEER`); without it the test prints SKIPPED and passes.

mod common;
use common::*;

use std::path::PathBuf;

use lab::target::SpdkTgt as Peer;
use serde_json::{json, Value};

/// A fresh work dir `/var/tmp/TAG-PID` with SPDK's config and an aio image (and its `bdev_aio_create`
/// parameters), or None when there is no SPDK peer build (the test then says SKIPPED and passes).
fn setup(tag: &str) -> Option<(PathBuf, PathBuf, Value)> {
    if lab::target::spdk_peer().is_none() {
        println!("SKIPPED: no SPDK peer build (set SPDK_PEER)");
        return None;
    }
    let dir = PathBuf::from(format!("/var/tmp/{tag}-{}", std::process::id()));
    let (image, aio) = aio_image(&dir);
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    Some((dir, image, aio))
}

const CONFIG: &str = r#"{"subsystems":[
 {"subsystem":"iobuf","config":[{"method":"iobuf_set_options","params":{"small_pool_count":1024,"large_pool_count":64}}]},
 {"subsystem":"bdev","config":[{"method":"bdev_set_options","params":{"bdev_io_pool_size":1024,"bdev_io_cache_size":64}}]}
]}"#;

/// What a target says about the lvstore: stores, lvols, and per lvol the bdev fields both targets share.
fn answers(call: &dyn Fn(&str, Value) -> Value) -> (Value, Value, Vec<Value>) {
    let stores = call("bdev_lvol_get_lvstores", Value::Null);
    let lvols = call("bdev_lvol_get_lvols", Value::Null);
    let mut bdevs = Vec::new();
    for l in lvols.as_array().unwrap() {
        let b = &call("bdev_get_bdevs", json!({"name": l["uuid"]}))[0];
        bdevs.push(json!({
            "name": b["name"],
            "aliases": b["aliases"],
            "uuid": b["uuid"],
            "product_name": b["product_name"],
            "block_size": b["block_size"],
            "num_blocks": b["num_blocks"],
            "claimed": b["claimed"],
            "lvol": b["driver_specific"]["lvol"],
        }));
    }
    (stores, lvols, bdevs)
}

fn sorted(v: &Value) -> Vec<Value> {
    let mut a = v.as_array().unwrap().clone();
    a.sort_by_key(|x| x["uuid"].as_str().unwrap_or_default().to_string());
    a
}

#[test]
fn our_lvol_rpcs_answer_as_spdks() {
    let Some((dir, image, aio)) = setup("lvol-spdk") else {
        return;
    };

    // SPDK builds the store.
    let p = Peer::start(&dir, "spdk1");
    p.call("bdev_aio_create", aio.clone());
    p.call(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "aio0", "lvs_name": "lvs", "cluster_sz": 1 << 20}),
    );
    p.call(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs", "lvol_name": "thick", "size_in_mib": 8}),
    );
    p.call(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs", "lvol_name": "thin", "size_in_mib": 16, "thin_provision": true}),
    );
    p.call(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs/thick", "snapshot_name": "snap"}),
    );
    p.call(
        "bdev_lvol_clone",
        json!({"snapshot_name": "lvs/snap", "clone_name": "clone"}),
    );
    p.stop();
    // SPDK's answers after loading it.
    let p = Peer::start(&dir, "spdk2");
    p.call("bdev_aio_create", aio.clone());
    p.call("bdev_wait_for_examine", Value::Null);
    let spdk = answers(&|m, a| p.call(m, a));
    p.stop();

    // Ours, on the same disk.
    let t = Tgt::start("lvol_spdk", &[]);
    let call = |m: &str, a: Value| {
        let v = t.call(m, a);
        assert!(v.get("error").is_none(), "ours {m}: {v}");
        v["result"].clone()
    };
    call("bdev_aio_create", aio.clone());
    call("bdev_wait_for_examine", Value::Null);
    let ours = answers(&call);
    assert_eq!(ours.0, spdk.0, "bdev_lvol_get_lvstores");
    assert_eq!(sorted(&ours.1), sorted(&spdk.1), "bdev_lvol_get_lvols");
    assert_eq!(
        ours.1.as_array().unwrap().len(),
        4,
        "thick (now a clone), thin, snap, clone"
    );
    let mut a = ours.2.clone();
    let mut b = spdk.2.clone();
    a.sort_by_key(|x| x["name"].as_str().unwrap().to_string());
    b.sort_by_key(|x| x["name"].as_str().unwrap().to_string());
    assert_eq!(a, b, "each lvol's bdev");
    // Ours changes the store: grow, rename, read-only, clone, new lvol, rename the lvstore, delete.
    call(
        "bdev_lvol_resize",
        json!({"name": "lvs/thin", "size_in_mib": 40}),
    );
    call(
        "bdev_lvol_rename",
        json!({"old_name": "lvs/clone", "new_name": "clone2"}),
    );
    call("bdev_lvol_set_read_only", json!({"name": "lvs/thin"}));
    call(
        "bdev_lvol_clone",
        json!({"snapshot_name": "lvs/thin", "clone_name": "thinclone"}),
    );
    call(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs", "lvol_name": "adopted", "size_in_mib": 40, "thin_provision": true}),
    );
    call(
        "bdev_lvol_set_parent",
        json!({"lvol_name": "lvs/adopted", "parent_name": "lvs/thin"}),
    );
    call(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs", "lvol_name": "extra", "size_in_mib": 3, "thin_provision": true}),
    );
    // Snapshots: clone2 -> snap2 -> snap; decouple clone2 (back to snap), inflate thick (off snap); snap
    // has two clones (snap2, clone2) and cannot go; snap2 goes, then snap folds into clone2.
    call(
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs/clone2", "snapshot_name": "snap2"}),
    );
    let err = |m: &str, a: Value| {
        let v = t.call(m, a);
        let e = v
            .get("error")
            .unwrap_or_else(|| panic!("ours {m}: no error: {v}"));
        (
            e["code"].as_i64().unwrap(),
            e["message"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(
        err(
            "bdev_lvol_snapshot",
            json!({"lvol_name": "lvs/clone2", "snapshot_name": "snap2"})
        ),
        (-32602, "File exists".to_string())
    );
    assert_eq!(
        err(
            "bdev_lvol_snapshot",
            json!({"lvol_name": "lvs/nope", "snapshot_name": "x"})
        )
        .0,
        -19
    );
    call("bdev_lvol_decouple_parent", json!({"name": "lvs/clone2"}));
    call("bdev_lvol_inflate", json!({"name": "lvs/thick"}));
    assert_eq!(
        err("bdev_lvol_decouple_parent", json!({"name": "lvs/thick"})),
        (-32602, "Invalid argument".to_string()),
        "no parent any more"
    );
    assert_eq!(
        err("bdev_lvol_delete", json!({"name": "lvs/snap"})),
        (-32603, "Operation not permitted".to_string()),
        "a snapshot with two clones"
    );
    call("bdev_lvol_delete", json!({"name": "lvs/snap2"}));
    call("bdev_lvol_delete", json!({"name": "lvs/snap"}));
    let lv = call("bdev_lvol_get_lvols", Value::Null);
    let get = |n: &str| {
        lv.as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no lvol {n}: {lv}"))
    };
    assert_eq!(get("thick")["is_clone"], false);
    assert_eq!(get("thick")["is_thin_provisioned"], false);
    assert_eq!(
        get("clone2")["is_clone"],
        false,
        "its snapshot folded into it"
    );
    call(
        "bdev_lvol_rename_lvstore",
        json!({"old_name": "lvs", "new_name": "lvs2"}),
    );
    call("bdev_lvol_delete", json!({"name": "lvs2/extra"}));
    // The base grows by half; the lvstore follows it.
    let before = call("bdev_lvol_get_lvstores", Value::Null)[0]["total_data_clusters"]
        .as_u64()
        .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    call("bdev_aio_rescan", json!({"name": "aio0"}));
    call("bdev_lvol_grow_lvstore", json!({"lvs_name": "lvs2"}));
    let after = call("bdev_lvol_get_lvstores", Value::Null)[0]["total_data_clusters"]
        .as_u64()
        .unwrap();
    assert_eq!(after, before + 32, "32 more clusters of 1 MiB");
    let changed = answers(&call);
    let b = &call("bdev_get_bdevs", json!({"name": "lvs2/thin"}))[0];
    assert_eq!(b["num_blocks"].as_u64().unwrap() * 512, 40 << 20);
    assert_eq!(
        b["driver_specific"]["lvol"]["clones"],
        json!(["thinclone", "adopted"])
    );
    let (st, _) = t.stop();
    assert!(st.success());

    // SPDK loads what ours unloaded, and says what ours said.
    let p = Peer::start(&dir, "spdk3");
    p.call("bdev_aio_create", aio);
    p.call("bdev_wait_for_examine", Value::Null);
    let again = answers(&|m, a| p.call(m, a));
    p.stop();
    assert_eq!(
        again.0, changed.0,
        "bdev_lvol_get_lvstores after our changes"
    );
    assert_eq!(
        sorted(&again.1),
        sorted(&changed.1),
        "bdev_lvol_get_lvols after our changes"
    );
    let mut a = again.2.clone();
    let mut b = changed.2.clone();
    a.sort_by_key(|x| x["name"].as_str().unwrap().to_string());
    b.sort_by_key(|x| x["name"].as_str().unwrap().to_string());
    assert_eq!(a, b, "each lvol's bdev after our changes");
    if std::env::var_os("BLOBSTORE_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Esnap clones both ways: one made by SPDK and one made by ours, over the same external malloc bdev (fixed
/// uuid), are listed and described identically by both targets.
#[test]
fn esnap_clones_as_spdks() {
    let Some((dir, _, aio)) = setup("lvol-esnap-spdk") else {
        return;
    };
    let ext = json!({"name": "ext", "num_blocks": 8192, "block_size": 512,
                     "uuid": "3a4b5c6d-7e8f-4a0b-8c1d-2e3f4a5b6c7d"});
    let p = Peer::start(&dir, "spdk1");
    p.call("bdev_malloc_create", ext.clone());
    p.call("bdev_aio_create", aio.clone());
    p.call(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "aio0", "lvs_name": "lvs", "cluster_sz": 1 << 20}),
    );
    p.call(
        "bdev_lvol_clone_bdev",
        json!({"bdev": "ext", "lvs_name": "lvs", "clone_name": "spdk_ec"}),
    );
    p.stop();

    let t = Tgt::start("esnap_spdk", &[]);
    let call = |m: &str, a: Value| {
        let v = t.call(m, a);
        assert!(v.get("error").is_none(), "ours {m}: {v}");
        v["result"].clone()
    };
    call("bdev_malloc_create", ext.clone());
    call("bdev_aio_create", aio.clone());
    call("bdev_wait_for_examine", Value::Null);
    call(
        "bdev_lvol_clone_bdev",
        json!({"bdev": "ext", "lvs_name": "lvs", "clone_name": "our_ec"}),
    );
    let ours = answers(&call);
    let (st, _) = t.stop();
    assert!(st.success());

    let p = Peer::start(&dir, "spdk2");
    p.call("bdev_malloc_create", ext);
    p.call("bdev_aio_create", aio);
    p.call("bdev_wait_for_examine", Value::Null);
    let spdk = answers(&|m, a| p.call(m, a));
    p.stop();
    assert_eq!(sorted(&ours.1), sorted(&spdk.1), "bdev_lvol_get_lvols");
    let by_name = |v: &Vec<Value>| {
        let mut v = v.clone();
        v.sort_by_key(|x| x["name"].as_str().unwrap().to_string());
        v
    };
    assert_eq!(
        by_name(&ours.2),
        by_name(&spdk.2),
        "each esnap clone's bdev"
    );
    assert_eq!(ours.2.len(), 2);
    assert!(ours.2.iter().all(|b| b["lvol"]["esnap_clone"] == true));
    let _ = std::fs::remove_dir_all(&dir);
}
