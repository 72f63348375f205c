//! raid1 on real reactors: creation and reporting, I/O, member failure (write and read errors injected with the
//! error bdev), hot-remove under load, and deletion. Every scenario checks that what was acknowledged is what
//! the array and each in-sync member hold.

mod common;

use common::*;
use raid::Level;

const BS: usize = 512;

#[test]
fn raid1_create_report_io_delete() {
    with_reactors("0x1", || {
        malloc("c_m0", 4096, 512);
        malloc("c_m1", 4096, 512);
        raid_create("c_r1", Level::Raid1, &["c_m0", "c_m1"], 0, false).unwrap();
        let v = info("c_r1").unwrap();
        assert_eq!(v["name"], "c_r1");
        assert_eq!(v["state"], "online");
        assert_eq!(v["raid_level"], "raid1");
        assert_eq!(v["strip_size_kb"], 0);
        assert_eq!(v["superblock"], false);
        assert_eq!(v["num_base_bdevs"], 2);
        assert_eq!(v["num_base_bdevs_discovered"], 2);
        assert_eq!(v["num_base_bdevs_operational"], 2);
        assert!(v.get("process").is_none());
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "name",
                "uuid",
                "strip_size_kb",
                "state",
                "raid_level",
                "superblock",
                "num_base_bdevs",
                "num_base_bdevs_discovered",
                "num_base_bdevs_operational",
                "base_bdevs_list"
            ]
        );
        let list = v["base_bdevs_list"].as_array().unwrap();
        assert_eq!(list[0]["name"], "c_m0");
        assert_eq!(list[1]["name"], "c_m1");
        assert_eq!(list[0]["is_configured"], true);
        assert_eq!(list[0]["data_offset"], 0);
        assert_eq!(list[0]["data_size"], 4096);
        let uuid = v["uuid"].as_str().unwrap().to_string();
        assert_ne!(uuid, "00000000-0000-0000-0000-000000000000");

        // The bdev: size, uuid, claims, driver_specific, save_config entry.
        let (bdev_json, cfg, claimed) = app_sync(|| {
            let b = bdev::get("c_r1").unwrap();
            (
                b.info_json(),
                b.write_config(),
                bdev::get("c_m0").unwrap().claimed_by(),
            )
        });
        assert_eq!(bdev_json["num_blocks"], 4096);
        assert_eq!(bdev_json["product_name"], "Raid Volume");
        assert_eq!(bdev_json["uuid"], uuid.as_str());
        assert_eq!(bdev_json["driver_specific"]["raid"]["state"], "online");
        assert!(bdev_json["driver_specific"]["raid"].get("name").is_none());
        assert_eq!(claimed.as_deref(), Some("raid"));
        let cfg = cfg.unwrap();
        assert_eq!(cfg["method"], "bdev_raid_create");
        assert_eq!(cfg["params"]["raid_level"], "raid1");
        assert_eq!(
            cfg["params"]["base_bdevs"],
            serde_json::json!(["c_m0", "c_m1"])
        );
        assert!(cfg["params"].get("strip_size_kb").is_none());

        // Data goes to both mirrors.
        let data = pattern_vec(BS, 100, 16, 7);
        assert_eq!(write("c_r1", 100, data.clone()), bdev::IoStatus::Success);
        assert_eq!(read("c_r1", 100, 16).unwrap(), data);
        assert_eq!(read("c_m0", 100, 16).unwrap(), data);
        assert_eq!(read("c_m1", 100, 16).unwrap(), data);
        // Out of range is refused by the bdev layer.
        assert!(read("c_r1", 4090, 16).is_err());

        // A member cannot be opened for writing while claimed.
        assert!(app_sync(|| bdev::open("c_m0", true, None).is_err()));

        raid_delete("c_r1", false).unwrap();
        assert!(info("c_r1").is_none());
        assert!(!bdev_exists("c_r1"));
        assert!(app_sync(|| bdev::open("c_m0", true, None).is_ok()));
        assert!(matches!(
            raid_delete("c_r1", false),
            Err(e) if e.kind == raid::ErrorKind::NotFound
        ));
        unregister("c_m0");
        unregister("c_m1");
    });
}

#[test]
fn raid1_create_errors() {
    with_reactors("0x1", || {
        malloc("e_m0", 1024, 512);
        malloc("e_m1", 1024, 4096);
        // raid1 has no strip size.
        let e = raid_create("e_r", Level::Raid1, &["e_m0", "x"], 64, false).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        // One member is not enough for raid1.
        let e = raid_create("e_r", Level::Raid1, &["e_m0"], 0, false).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        // raid0 needs a power-of-two strip size.
        let e = raid_create("e_r", Level::Raid0, &["e_m0"], 3, false).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        // Block sizes must match; the failed array is deleted and its members released.
        let e = raid_create("e_r", Level::Raid1, &["e_m0", "e_m1"], 0, false).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        wait_for("failed raid deleted", 5, || info("e_r").is_none());
        assert!(app_sync(|| bdev::get("e_m0")
            .unwrap()
            .claimed_by()
            .is_none()));
        // Duplicate names.
        malloc("e_m2", 1024, 512);
        raid_create("e_r", Level::Raid1, &["e_m0", "e_m2"], 0, false).unwrap();
        let e = raid_create("e_r", Level::Raid1, &["nope1", "nope2"], 0, false).unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST);
        // A claimed bdev cannot join another array.
        let e = raid_create("e_r2", Level::Raid1, &["e_m0", "nope"], 0, false).unwrap_err();
        assert_eq!(e.errno(), libc::EPERM);
        raid_delete("e_r", false).unwrap();
        for m in ["e_m0", "e_m1", "e_m2"] {
            unregister(m);
        }
    });
}

#[test]
fn raid1_configuring_until_members_appear() {
    with_reactors("0x1", || {
        raid_create("w_r", Level::Raid1, &["w_m0", "w_m1"], 0, false).unwrap();
        let v = info("w_r").unwrap();
        assert_eq!(v["state"], "configuring");
        assert_eq!(v["num_base_bdevs_discovered"], 0);
        assert_eq!(v["num_base_bdevs_operational"], 2);
        assert_eq!(v["uuid"], "00000000-0000-0000-0000-000000000000");
        assert!(!bdev_exists("w_r"));
        assert_eq!(
            app_sync(|| raid::get_bdevs(Some(raid::RaidState::Configuring)).len()),
            1
        );
        assert_eq!(
            app_sync(|| raid::get_bdevs(Some(raid::RaidState::Online)).len()),
            0
        );
        malloc("w_m0", 2048, 512);
        wait_for("first member claimed", 5, || {
            info("w_r").unwrap()["num_base_bdevs_discovered"] == 1
        });
        assert_eq!(state("w_r"), "configuring");
        malloc("w_m1", 2048, 512);
        wait_for("online", 5, || state("w_r") == "online");
        assert!(bdev_exists("w_r"));
        let data = pattern_vec(BS, 0, 8, 1);
        assert_eq!(write("w_r", 0, data.clone()), bdev::IoStatus::Success);
        assert_eq!(read("w_m1", 0, 8).unwrap(), data);
        raid_delete("w_r", false).unwrap();
        unregister("w_m0");
        unregister("w_m1");
    });
}

/// Creates `m0`, `m1`, an error bdev on `m1`, and a raid1 over `m0` and the error bdev.
fn mirror_with_error_member(p: &str, blocks: u64) -> (String, String, String, String) {
    let (m0, m1, r) = (format!("{p}_m0"), format!("{p}_m1"), format!("{p}_r"));
    malloc(&m0, blocks, 512);
    malloc(&m1, blocks, 512);
    let ee = error_bdev(&m1);
    raid_create(&r, Level::Raid1, &[&m0, &ee], 0, false).unwrap();
    (m0, m1, ee, r)
}

#[test]
fn raid1_write_failure_removes_member_and_keeps_serving() {
    with_reactors("0x3", || {
        let (m0, m1, ee, r) = mirror_with_error_member("wf", 8192);
        let t = io_thread("wf_io");
        let load = Load::start(&t, &r, 8, 16, 0x1234);
        load.wait_writes(200);
        inject(&ee, "write", 1);
        wait_for("member failed", 10, || {
            info(&r).unwrap()["num_base_bdevs_operational"] == 1
        });
        let v = info(&r).unwrap();
        assert_eq!(v["state"], "online");
        assert_eq!(v["num_base_bdevs_discovered"], 1);
        assert_eq!(v["base_bdevs_list"][1]["is_configured"], false);
        assert_eq!(v["base_bdevs_list"][1]["name"], serde_json::Value::Null);
        assert_eq!(
            v["base_bdevs_list"][1]["uuid"],
            "00000000-0000-0000-0000-000000000000"
        );
        load.wait_writes(300);
        let s = load.stop();
        assert_eq!(s.writes_failed, 0, "{s:?}");
        assert_eq!(s.reads_failed, 0, "{s:?}");
        assert!(s.mismatches.is_empty(), "{:?}", s.mismatches);
        assert!(verify_against(&load.shared, &r, 0, BS).is_empty());
        assert!(verify_against(&load.shared, &m0, 0, BS).is_empty());
        // The failed member is released.
        let e2 = ee.clone();
        assert!(app_sync(move || bdev::get(&e2)
            .unwrap()
            .claimed_by()
            .is_none()));
        drop(load);
        raid_delete(&r, false).unwrap();
        unregister(&ee);
        unregister(&m0);
        unregister(&m1);
    });
}

#[test]
fn raid1_read_failure_is_retried_on_the_other_mirror() {
    with_reactors("0x3", || {
        let (m0, m1, ee, r) = mirror_with_error_member("rf", 4096);
        let t = io_thread("rf_io");
        let load = Load::start(&t, &r, 4, 8, 0x777);
        load.wait_writes(200);
        inject(&ee, "read", 50);
        load.wait_writes(400);
        let s = load.stop();
        assert_eq!(s.reads_failed, 0, "{s:?}");
        assert_eq!(s.writes_failed, 0, "{s:?}");
        assert!(s.mismatches.is_empty(), "{:?}", s.mismatches);
        // A read error alone does not fail the member.
        let v = info(&r).unwrap();
        assert_eq!(v["num_base_bdevs_operational"], 2);
        inject(&ee, "clear", 0);
        assert!(verify_against(&load.shared, &m0, 0, BS).is_empty());
        assert!(verify_against(&load.shared, &m1, 0, BS).is_empty());
        drop(load);
        raid_delete(&r, false).unwrap();
        unregister(&ee);
        unregister(&m0);
        unregister(&m1);
    });
}

#[test]
fn raid1_hot_remove_under_load() {
    with_reactors("0x3", || {
        malloc("hr_m0", 8192, 512);
        malloc("hr_m1", 8192, 512);
        raid_create("hr_r", Level::Raid1, &["hr_m0", "hr_m1"], 0, false).unwrap();
        let t = io_thread("hr_io");
        let load = Load::start(&t, "hr_r", 8, 32, 99);
        load.wait_writes(300);
        // The member's module deletes it while I/O runs.
        unregister("hr_m1");
        let v = info("hr_r").unwrap();
        assert_eq!(v["state"], "online");
        assert_eq!(v["num_base_bdevs_operational"], 1);
        assert_eq!(v["num_base_bdevs_discovered"], 1);
        load.wait_writes(300);
        let s = load.stop();
        assert_eq!(s.writes_failed + s.reads_failed, 0, "{s:?}");
        assert!(s.mismatches.is_empty(), "{:?}", s.mismatches);
        assert!(verify_against(&load.shared, "hr_r", 0, BS).is_empty());
        assert!(verify_against(&load.shared, "hr_m0", 0, BS).is_empty());
        drop(load);
        // Removing the last member takes the array away.
        unregister("hr_m0");
        wait_for("raid gone", 5, || info("hr_r").is_none());
        assert!(!bdev_exists("hr_r"));
    });
}

#[test]
fn raid1_all_members_failing_fails_io_and_takes_the_array_down() {
    with_reactors("0x1", || {
        malloc("af_m0", 2048, 512);
        malloc("af_m1", 2048, 512);
        let e0 = error_bdev("af_m0");
        let e1 = error_bdev("af_m1");
        raid_create("af_r", Level::Raid1, &[&e0, &e1], 0, false).unwrap();
        inject(&e0, "write", 10);
        inject(&e1, "write", 10);
        let st = write("af_r", 0, pattern_vec(BS, 0, 8, 1));
        assert_eq!(st, bdev::IoStatus::Failed(libc::EIO));
        wait_for("raid gone", 5, || info("af_r").is_none());
        for b in [&e0, &e1] {
            let b = b.clone();
            assert!(app_sync(move || bdev::get(&b)
                .unwrap()
                .claimed_by()
                .is_none()));
        }
        unregister(&e0);
        unregister(&e1);
        unregister("af_m0");
        unregister("af_m1");
    });
}

#[test]
fn raid1_remove_base_rpc_and_flush_unmap() {
    with_reactors("0x1", || {
        malloc("rb_m0", 2048, 512);
        malloc("rb_m1", 2048, 512);
        raid_create("rb_r", Level::Raid1, &["rb_m0", "rb_m1"], 0, false).unwrap();
        let data = pattern_vec(BS, 10, 4, 3);
        assert_eq!(write("rb_r", 10, data.clone()), bdev::IoStatus::Success);
        // Unmap and flush reach both mirrors.
        let st = app(|tx| {
            let d = bdev::open("rb_r", true, None).unwrap();
            let ch = d.channel();
            let d = std::sync::Arc::new(d);
            ch.submit_nodata(
                bdev::IoType::Unmap,
                10,
                2,
                bdev::Completion::Closure(Box::new(move |io| {
                    drop(d);
                    let _ = tx.send(io.status());
                })),
                0,
            )
            .unwrap();
        });
        assert_eq!(st, bdev::IoStatus::Success);
        assert!(read("rb_m0", 10, 2).unwrap().iter().all(|b| *b == 0));
        assert!(read("rb_m1", 10, 2).unwrap().iter().all(|b| *b == 0));
        assert_eq!(read("rb_m1", 12, 2).unwrap(), data[2 * BS..]);
        remove_base("rb_m0").unwrap();
        let v = info("rb_r").unwrap();
        assert_eq!(v["num_base_bdevs_operational"], 1);
        assert_eq!(v["base_bdevs_list"][0]["is_configured"], false);
        assert_eq!(read("rb_r", 12, 2).unwrap(), data[2 * BS..]);
        assert!(app_sync(|| bdev::get("rb_m0")
            .unwrap()
            .claimed_by()
            .is_none()));
        // Not a member any more.
        assert_eq!(remove_base("rb_m0").unwrap_err().errno(), libc::ENODEV);
        raid_delete("rb_r", false).unwrap();
        unregister("rb_m0");
        unregister("rb_m1");
    });
}

#[test]
fn raid1_and_raid0_survive_running_out_of_io_descriptors() {
    with_reactors("0x3", || {
        malloc("nm_m0", 4096, 512);
        malloc("nm_m1", 4096, 512);
        malloc("nm_m2", 4096, 512);
        malloc("nm_m3", 4096, 512);
        raid_create("nm_r1", Level::Raid1, &["nm_m0", "nm_m1"], 0, false).unwrap();
        raid_create("nm_r0", Level::Raid0, &["nm_m2", "nm_m3"], 4, false).unwrap();
        // A thread whose pool holds every parent (2 x 16) but not their children (one per member, or per
        // strip): fan-outs run out of descriptors half way and must resume. (A pool smaller than the queue
        // depth can be filled with parents alone; like SPDK's, it must be sized above the queue depth.)
        let old = bdev::pool_limit();
        bdev::set_pool_limit(40);
        let t = io_thread("nm_io");
        let l1 = Load::start(&t, "nm_r1", 8, 16, 5);
        let l0 = Load::start(&t, "nm_r0", 16, 16, 6);
        l1.wait_writes(300);
        l0.wait_writes(300);
        let (s1, s0) = (l1.stop(), l0.stop());
        bdev::set_pool_limit(old);
        for s in [&s1, &s0] {
            assert_eq!(s.writes_failed + s.reads_failed, 0, "{s:?}");
            assert!(s.mismatches.is_empty(), "{:?}", s.mismatches);
        }
        assert!(verify_against(&l1.shared, "nm_m0", 0, BS).is_empty());
        assert!(verify_against(&l1.shared, "nm_m1", 0, BS).is_empty());
        assert!(verify_against(&l0.shared, "nm_r0", 0, BS).is_empty());
        drop((l1, l0));
        raid_delete("nm_r1", false).unwrap();
        raid_delete("nm_r0", false).unwrap();
        for m in ["nm_m0", "nm_m1", "nm_m2", "nm_m3"] {
            unregister(m);
        }
    });
}

/// raid0 over two raid1 arrays: an I/O inside one strip is forwarded twice (raid0 to a raid1, the raid1 to a
/// mirror), one that crosses strips is split first. Read failures on a mirror are retried on the other one
/// from inside that nesting, and every block still reads back as written.
#[test]
fn raid10_nested_forwarding_with_read_retries() {
    with_reactors("0x3", || {
        let (a0, a1, ae, ar) = mirror_with_error_member("n10a", 4096);
        let (b0, b1, be, br) = mirror_with_error_member("n10b", 4096);
        raid_create("n10_r", Level::Raid0, &[&ar, &br], 4, false).unwrap();
        let t = io_thread("n10_io");
        // 3 blocks of 512 against 8-block strips: most I/O fall in one strip, some cross two.
        let load = Load::start(&t, "n10_r", 3, 16, 0x1010);
        load.wait_writes(300);
        inject(&ae, "read", 40);
        inject(&be, "read", 40);
        load.wait_writes(700);
        let s = load.stop();
        assert_eq!(s.reads_failed + s.writes_failed, 0, "{s:?}");
        assert!(s.mismatches.is_empty(), "{:?}", s.mismatches);
        assert!(s.reads_ok > 0, "{s:?}");
        // The injected failures happened (and were retried): each error bdev failed its 40 reads.
        for e in [&ae, &be] {
            let name = e.clone();
            let failed = app(move |tx| {
                bdev::get(&name).unwrap().get_iostat(move |st| {
                    let _ = tx.send(st.errors[bdev::IoType::Read as usize]);
                })
            });
            assert_eq!(failed, 40, "{e}");
        }
        for r in [&ar, &br] {
            assert_eq!(info(r).unwrap()["num_base_bdevs_operational"], 2, "{r}");
        }
        inject(&ae, "clear", 0);
        inject(&be, "clear", 0);
        assert!(verify_against(&load.shared, "n10_r", 0, BS).is_empty());
        drop(load);
        raid_delete("n10_r", false).unwrap();
        for r in [&ar, &br] {
            raid_delete(r, false).unwrap();
        }
        for b in [&ae, &be, &a0, &a1, &b0, &b1] {
            unregister(b);
        }
    });
}
