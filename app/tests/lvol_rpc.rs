//! The lvol module through the real `spdk_tgt` and JSON-RPC: an lvstore on an aio file, thick and thin lvols
//! (bdevs named by uuid with the `lvs/lvol` alias and `driver_specific.lvol`), SPDK's errors for bad input,
//! a clean unload at shutdown, examine finding the lvstore again after a restart, delete of an lvol and of
//! the lvstore.

mod common;
use common::*;

use blobstore::{FileDevice, MaskState, Store};
use serde_json::{json, Value};

fn result(v: Value) -> Value {
    assert!(v.get("error").is_none(), "unexpected error: {v}");
    v["result"].clone()
}

fn error(v: Value) -> (i64, String) {
    let e = v
        .get("error")
        .unwrap_or_else(|| panic!("expected an error: {v}"));
    (
        e["code"].as_i64().unwrap(),
        e["message"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn lvstore_and_lvols_over_rpc_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("lvol-rpc-{}", std::process::id()));
    let (image, aio) = aio_image(&dir);

    let t = Tgt::start("lvol1", &[]);
    result(t.call("bdev_aio_create", aio.clone()));
    let lvs_uuid = result(t.call(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "aio0", "lvs_name": "lvs0", "cluster_sz": 1 << 20}),
    ));
    let lvs_uuid = lvs_uuid.as_str().unwrap().to_string();
    // The base is claimed; a second lvstore of that name is refused.
    let aio_info = &result(t.call("bdev_get_bdevs", json!({"name": "aio0"})))[0];
    assert_eq!(aio_info["claimed"], true);
    let (code, _) = error(t.call(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "aio0", "lvs_name": "lvs0"}),
    ));
    assert_eq!(code, -32602);
    let thick = result(t.call(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs0", "lvol_name": "thick", "size_in_mib": 4}),
    ));
    let thin = result(t.call(
        "bdev_lvol_create",
        json!({"uuid": lvs_uuid, "lvol_name": "thin", "size_in_mib": 8, "thin_provision": true}),
    ));
    // Bad input, as SPDK answers it.
    assert_eq!(
        error(t.call(
            "bdev_lvol_create",
            json!({"lvs_name": "nope", "lvol_name": "x", "size_in_mib": 1}),
        ))
        .0,
        -libc::ENODEV as i64
    );
    assert_eq!(
        error(t.call(
            "bdev_lvol_create",
            json!({"lvs_name": "lvs0", "uuid": lvs_uuid, "lvol_name": "x", "size_in_mib": 1}),
        ))
        .0,
        -libc::EINVAL as i64
    );
    assert_eq!(
        error(t.call(
            "bdev_lvol_create",
            json!({"lvs_name": "lvs0", "lvol_name": "thick", "size_in_mib": 1}),
        ))
        .0,
        -libc::EEXIST as i64
    );
    let stores = result(t.call("bdev_lvol_get_lvstores", Value::Null));
    assert_eq!(stores.as_array().unwrap().len(), 1);
    let s = &stores[0];
    assert_eq!(s["uuid"], lvs_uuid);
    assert_eq!(s["name"], "lvs0");
    assert_eq!(s["base_bdev"], "aio0");
    assert_eq!(s["cluster_size"], 1 << 20);
    assert_eq!(s["block_size"], 512);
    let total = s["total_data_clusters"].as_u64().unwrap();
    assert_eq!(s["free_clusters"].as_u64().unwrap(), total - 4);
    let lvols = result(t.call("bdev_lvol_get_lvols", json!({"lvs_name": "lvs0"})));
    let names: Vec<&str> = lvols
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["alias"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["lvs0/thick", "lvs0/thin"]);
    assert_eq!(lvols[1]["is_thin_provisioned"], true);
    assert_eq!(lvols[1]["uuid"], thin);
    assert_eq!(lvols[0]["lvs"]["uuid"], lvs_uuid);
    let b = &result(t.call("bdev_get_bdevs", json!({"name": "lvs0/thick"})))[0];
    assert_eq!(b["name"], thick);
    assert_eq!(b["uuid"], thick);
    assert_eq!(b["aliases"], json!(["lvs0/thick"]));
    assert_eq!(b["product_name"], "Logical Volume");
    assert_eq!(b["num_blocks"].as_u64().unwrap() * 512, 4 << 20);
    let d = &b["driver_specific"]["lvol"];
    assert_eq!(d["lvol_store_uuid"], lvs_uuid);
    assert_eq!(d["base_bdev"], "aio0");
    assert_eq!(d["thin_provision"], false);
    assert_eq!(d["num_allocated_clusters"], 4);
    assert_eq!(d["snapshot"], false);
    assert_eq!(d["clone"], false);
    // Shallow copy, with SPDK's answers: the source must be read-only (reported by the check), the
    // destination must exist; a read-only thick lvol copies its four clusters to a malloc bdev.
    result(t.call(
        "bdev_malloc_create",
        json!({"name": "dst", "num_blocks": 8192, "block_size": 512}),
    ));
    let op = result(t.call(
        "bdev_lvol_start_shallow_copy",
        json!({"src_lvol_name": "lvs0/thick", "dst_bdev_name": "dst"}),
    ))["operation_id"]
        .as_u64()
        .unwrap();
    let check = |op: u64| -> Value {
        for _ in 0..1000 {
            let v = result(t.call("bdev_lvol_check_shallow_copy", json!({"operation_id": op})));
            if v["state"] != "in progress" {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("shallow copy {op} never ended");
    };
    assert_eq!(
        check(op),
        json!({"copied_clusters": 0, "total_clusters": 4, "state": "error", "error": "Operation not permitted"})
    );
    assert_eq!(
        error(t.call("bdev_lvol_check_shallow_copy", json!({"operation_id": op}))).0,
        -libc::ENODEV as i64,
        "an ended operation is reported once"
    );
    assert_eq!(
        error(t.call(
            "bdev_lvol_start_shallow_copy",
            json!({"src_lvol_name": "lvs0/thick", "dst_bdev_name": "nope"}),
        )),
        (-32602, "No such device".to_string())
    );
    result(t.call("bdev_lvol_set_read_only", json!({"name": "lvs0/thick"})));
    let op = result(t.call(
        "bdev_lvol_start_shallow_copy",
        json!({"src_lvol_name": "lvs0/thick", "dst_bdev_name": "dst"}),
    ))["operation_id"]
        .as_u64()
        .unwrap();
    assert_eq!(
        check(op),
        json!({"copied_clusters": 4, "total_clusters": 4, "state": "complete"})
    );
    let dst = &result(t.call("bdev_get_bdevs", json!({"name": "dst"})))[0];
    assert_eq!(dst["claimed"], false, "the destination is let go");
    let (st, _) = t.stop();
    assert!(st.success());

    // Shut down cleanly: the store on disk is clean and consistent.
    let store = Store::load(&FileDevice::open(&image).unwrap()).unwrap();
    assert_eq!(store.mask_state, MaskState::Clean);
    assert_eq!(store.check(), vec![]);
    assert_eq!(store.lvol_store().unwrap().lvols.len(), 2);

    // Restart: examine finds the lvstore and its lvols again.
    let t = Tgt::start("lvol2", &[]);
    result(t.call("bdev_aio_create", aio.clone()));
    result(t.call("bdev_wait_for_examine", Value::Null));
    let stores = result(t.call("bdev_lvol_get_lvstores", json!({"uuid": lvs_uuid})));
    assert_eq!(stores[0]["name"], "lvs0");
    let lvols2 = result(t.call("bdev_lvol_get_lvols", Value::Null));
    assert_eq!(lvols2, lvols, "the same lvols after a restart");
    let b = &result(t.call("bdev_get_bdevs", json!({"name": thin})))[0];
    assert_eq!(b["aliases"], json!(["lvs0/thin"]));
    // Delete the thin lvol, then the lvstore.
    assert_eq!(
        result(t.call("bdev_lvol_delete", json!({"name": "lvs0/thin"}))),
        true
    );
    assert_eq!(
        error(t.call("bdev_lvol_delete", json!({"name": "lvs0/thin"}))).0,
        -libc::ENODEV as i64
    );
    let lvols = result(t.call("bdev_lvol_get_lvols", Value::Null));
    assert_eq!(lvols.as_array().unwrap().len(), 1);
    assert_eq!(
        result(t.call("bdev_lvol_delete_lvstore", json!({"lvs_name": "lvs0"}))),
        true
    );
    assert_eq!(
        result(t.call("bdev_lvol_get_lvstores", Value::Null)),
        json!([])
    );
    assert_eq!(
        error(t.call("bdev_get_bdevs", json!({"name": thick}))).0,
        -libc::ENODEV as i64,
        "the lvol bdevs are gone"
    );
    let aio_info = &result(t.call("bdev_get_bdevs", json!({"name": "aio0"})))[0];
    assert_eq!(aio_info["claimed"], false, "the base is released");
    let (st, _) = t.stop();
    assert!(st.success());
    assert!(
        Store::load(&FileDevice::open(&image).unwrap()).is_err(),
        "a destroyed lvstore has no super block"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Esnap clones through the RPCs: `bdev_lvol_clone_bdev` with SPDK's refusals; the clone reports its
/// external snapshot; it is degraded (listed, no bdev) while that bdev is gone, at runtime and after a
/// restart, and comes back when a bdev with its uuid appears.
#[test]
fn esnap_clone_degrades_and_comes_back() {
    let dir = std::env::temp_dir().join(format!("lvol-esnap-{}", std::process::id()));
    let (_, aio) = aio_image(&dir);
    let ext_uuid = "7d8e9f00-1111-4222-8333-944455556666";
    let ext = json!({"name": "ext", "num_blocks": 8192, "block_size": 512, "uuid": ext_uuid});
    let t = Tgt::start("esnap1", &[]);
    result(t.call("bdev_aio_create", aio.clone()));
    result(t.call(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "aio0", "lvs_name": "lvs", "cluster_sz": 1 << 20}),
    ));
    result(t.call("bdev_malloc_create", ext.clone()));
    result(t.call(
        "bdev_malloc_create",
        json!({"name": "odd", "num_blocks": 3072, "block_size": 512}),
    ));
    let clone_bdev = |b: &str, lvs: &str, name: &str| {
        t.call(
            "bdev_lvol_clone_bdev",
            json!({"bdev": b, "lvs_name": lvs, "clone_name": name}),
        )
    };
    assert_eq!(
        error(clone_bdev("ext", "nope", "ec")),
        (-32602, "lvs does not exist".to_string())
    );
    assert_eq!(
        error(clone_bdev("nope", "lvs", "ec")),
        (-32602, "bdev does not exist".to_string())
    );
    assert_eq!(
        error(clone_bdev("odd", "lvs", "ec")),
        (-32602, "Invalid argument".to_string()),
        "1.5 MiB is not a whole number of clusters"
    );
    let ec = result(clone_bdev("ext", "lvs", "ec"));
    let ec = ec.as_str().unwrap().to_string();
    assert_eq!(
        error(clone_bdev("lvs/ec", "lvs", "ec2")).1,
        "bdev is an lvol in same lvs as clone; use bdev_lvol_clone instead"
    );
    let lvol = |t: &Tgt| result(t.call("bdev_lvol_get_lvols", Value::Null))[0].clone();
    let l = lvol(&t);
    assert_eq!(
        (l["is_esnap_clone"].clone(), l["is_degraded"].clone()),
        (json!(true), json!(false))
    );
    assert_eq!(l["is_thin_provisioned"], true);
    let b = &result(t.call("bdev_get_bdevs", json!({"name": ec})))[0];
    assert_eq!(b["num_blocks"], 8192);
    assert_eq!(b["driver_specific"]["lvol"]["esnap_clone"], true);
    assert_eq!(
        b["driver_specific"]["lvol"]["external_snapshot_name"],
        ext_uuid
    );
    // The external bdev goes: the clone is degraded, its bdev gone; it comes back with the bdev.
    result(t.call("bdev_malloc_delete", json!({"name": "ext"})));
    let wait = |t: &Tgt, present: bool| {
        for _ in 0..400 {
            let found = t
                .call("bdev_get_bdevs", json!({"name": ec}))
                .get("error")
                .is_none();
            if found == present {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("lvol bdev never became present={present}");
    };
    wait(&t, false);
    assert_eq!(lvol(&t)["is_degraded"], true);
    result(t.call("bdev_malloc_create", ext.clone()));
    wait(&t, true);
    assert_eq!(lvol(&t)["is_degraded"], false);
    let (st, _) = t.stop();
    assert!(st.success());
    // Restarted without it: degraded until it is created.
    let t = Tgt::start("esnap2", &[]);
    result(t.call("bdev_aio_create", aio.clone()));
    result(t.call("bdev_wait_for_examine", Value::Null));
    assert_eq!(lvol(&t)["is_degraded"], true);
    wait(&t, false);
    result(t.call("bdev_malloc_create", ext));
    wait(&t, true);
    assert_eq!(lvol(&t)["is_degraded"], false);
    result(t.call("bdev_lvol_delete", json!({"name": "lvs/ec"})));
    let (st, _) = t.stop();
    assert!(st.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad metadata on disk: a super block whose CRC does not match is refused (the base stays unclaimed, the
/// target goes on serving); an lvol whose metadata page is corrupt is left out while the rest of the store
/// loads and serves.
#[test]
fn corrupt_lvstores_are_refused_and_the_target_serves_on() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = std::env::temp_dir().join(format!("lvol-corrupt-{}", std::process::id()));
    let (image, aio) = aio_image(&dir);
    let t = Tgt::start("corrupt1", &[]);
    result(t.call("bdev_aio_create", aio.clone()));
    result(t.call(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "aio0", "lvs_name": "lvs", "cluster_sz": 1 << 20}),
    ));
    for name in ["a", "b"] {
        result(t.call(
            "bdev_lvol_create",
            json!({"lvs_name": "lvs", "lvol_name": name, "size_in_mib": 2}),
        ));
    }
    let (st, _) = t.stop();
    assert!(st.success());
    let flip = |off: u64| {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(off)).unwrap();
        f.read_exact(&mut b).unwrap();
        b[0] ^= 0x5a;
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&b).unwrap();
    };
    // 1. An lvol's first metadata page: that lvol is left out.
    let store = Store::load(&FileDevice::open(&image).unwrap()).unwrap();
    let a = store.lvol_store().unwrap().lvol("a").unwrap().blob_id;
    let page = store.blob(a).unwrap().md_pages[0] as u64;
    let md_start = store.super_block.md.start as u64;
    flip((md_start + page) * 4096 + 100);
    let t = Tgt::start("corrupt2", &[]);
    result(t.call("bdev_aio_create", aio.clone()));
    result(t.call("bdev_wait_for_examine", Value::Null));
    let lvols = result(t.call("bdev_lvol_get_lvols", Value::Null));
    let names: Vec<&str> = lvols
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["b"],
        "the corrupt lvol is left out, the other serves"
    );
    assert!(t
        .call("bdev_get_bdevs", json!({"name": "lvs/b"}))
        .get("error")
        .is_none());
    let (st, _) = t.stop();
    assert!(st.success());
    // 2. The super block: the store is refused, the base stays free, the target serves.
    flip(200);
    let t = Tgt::start("corrupt3", &[]);
    result(t.call("bdev_aio_create", aio));
    result(t.call("bdev_wait_for_examine", Value::Null));
    assert_eq!(
        result(t.call("bdev_lvol_get_lvstores", Value::Null)),
        json!([])
    );
    let b = &result(t.call("bdev_get_bdevs", json!({"name": "aio0"})))[0];
    assert_eq!(b["claimed"], false);
    result(t.call(
        "bdev_malloc_create",
        json!({"name": "m", "num_blocks": 2048, "block_size": 512}),
    ));
    let (st, _) = t.stop();
    assert!(st.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// What SPDK's newer client sends: `md_page_size` (4096 accepted, other sizes refused with -EINVAL) and the
/// `default` clear method.
#[test]
fn newer_client_params() {
    let t = Tgt::start("lvol_newer", &[]);
    result(t.call(
        "bdev_malloc_create",
        json!({"name": "m", "num_blocks": 32768, "block_size": 512}),
    ));
    let create = |page: u32| {
        t.call(
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "m", "lvs_name": "lvs", "md_page_size": page}),
        )
    };
    assert_eq!(error(create(8192)).0, -libc::EINVAL as i64);
    result(create(4096));
    result(t.call(
        "bdev_lvol_create",
        json!({"lvs_name": "lvs", "lvol_name": "v", "size_in_mib": 1, "clear_method": "default"}),
    ));
    let (st, _) = t.stop();
    assert!(st.success());
}
