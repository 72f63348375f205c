//! Rebuild on real reactors: a member added to a degraded raid1 is filled window by window while a verify
//! workload keeps writing; it serves reads only once in sync; a failing target stops the rebuild cleanly.

mod common;

use common::*;
use raid::Level;

const BS: usize = 512;

fn rebuild_under_load(p: &str, sb: bool) {
    let (m0, m1, m2, r) = (
        format!("{p}_m0"),
        format!("{p}_m1"),
        format!("{p}_m2"),
        format!("{p}_r"),
    );
    malloc(&m0, 16384, 512);
    malloc(&m1, 16384, 512);
    malloc(&m2, 16384, 512);
    raid_create(&r, Level::Raid1, &[&m0, &m1], 0, sb).unwrap();
    let off = if sb { 2048 } else { 0 };
    let t = io_thread(&format!("{p}_io"));
    let load = Load::start(&t, &r, 8, 16, 0xfeed);
    load.wait_writes(200);
    remove_base(&m1).unwrap();
    assert_eq!(info(&r).unwrap()["num_base_bdevs_operational"], 1);
    load.wait_writes(200);
    // Slow, small windows so the process is seen running.
    set_raid_options(64, 4);
    add_base(&r, &m2).unwrap();
    let v = info(&r).unwrap();
    assert_eq!(v["num_base_bdevs_discovered"], 2);
    assert_eq!(v["num_base_bdevs_operational"], 2);
    let proc_ = &v["process"];
    assert_eq!(proc_["type"], "rebuild", "{v}");
    assert_eq!(proc_["target"], m2.as_str());
    assert!(proc_["progress"]["blocks"].as_u64().is_some());
    assert!(proc_["progress"]["percent"].as_u64().unwrap() <= 100);
    // Only one process at a time.
    let e = add_base(&r, &m1).unwrap_err();
    assert_eq!(e.errno(), libc::EPERM);
    let mut last = 0;
    let mut seen_progress = false;
    wait_for("rebuild done", 60, || {
        let v = info(&r).unwrap();
        match v.get("process") {
            Some(p) => {
                let b = p["progress"]["blocks"].as_u64().unwrap();
                assert!(b >= last, "progress went back");
                if b > 0 {
                    seen_progress = true;
                }
                last = b;
                false
            }
            None => true,
        }
    });
    assert!(seen_progress);
    set_raid_options(1024, 0);
    load.wait_writes(200);
    let s = load.stop();
    assert_eq!(s.writes_failed + s.reads_failed, 0, "{s:?}");
    assert!(s.mismatches.is_empty(), "{:?}", s.mismatches);
    assert!(verify_against(&load.shared, &r, 0, BS).is_empty());
    assert!(verify_against(&load.shared, &m0, off, BS).is_empty());
    let bad = verify_against(&load.shared, &m2, off, BS);
    assert!(bad.is_empty(), "rebuilt member: {bad:?}");
    // The whole data area matches, not only what the workload wrote.
    let n = app_sync({
        let r = r.clone();
        move || bdev::get(&r).unwrap().num_blocks()
    });
    let mut lba = 0;
    while lba < n {
        let k = 1024.min(n - lba);
        assert_eq!(
            read(&m0, off + lba, k).unwrap(),
            read(&m2, off + lba, k).unwrap(),
            "blocks {lba}..{}",
            lba + k
        );
        lba += k;
    }
    if sb {
        let s = superblock_of(&m2).expect("target got the superblock");
        assert!(s
            .base_bdevs
            .iter()
            .all(|b| b.state == raid::sb::BaseState::Configured));
        assert_eq!(s.base_bdevs[1].uuid, uuid_of(&m2));
    }
    drop(load);
    raid_delete(&r, true).unwrap();
    for m in [&m0, &m1, &m2] {
        unregister(m);
    }
}

#[test]
fn rebuild_while_writing_with_superblock() {
    with_reactors("0x3", || rebuild_under_load("rbs", true));
}

#[test]
fn rebuild_while_writing_without_superblock() {
    with_reactors("0x3", || rebuild_under_load("rbn", false));
}

#[test]
fn failing_target_stops_the_rebuild() {
    with_reactors("0x3", || {
        malloc("ft_m0", 8192, 512);
        malloc("ft_m1", 8192, 512);
        malloc("ft_m2", 8192, 512);
        let ee = error_bdev("ft_m2");
        raid_create("ft_r", Level::Raid1, &["ft_m0", "ft_m1"], 0, true).unwrap();
        let t = io_thread("ft_io");
        let load = Load::start(&t, "ft_r", 8, 8, 3);
        load.wait_writes(100);
        remove_base("ft_m1").unwrap();
        set_raid_options(32, 2);
        add_base("ft_r", &ee).unwrap();
        assert!(info("ft_r").unwrap().get("process").is_some());
        inject(&ee, "write", 1);
        wait_for("rebuild stopped", 20, || {
            info("ft_r").is_some_and(|v| v.get("process").is_none())
        });
        wait_for("target removed", 20, || {
            info("ft_r").unwrap()["num_base_bdevs_operational"] == 1
        });
        let v = info("ft_r").unwrap();
        assert_eq!(v["state"], "online");
        assert_eq!(v["num_base_bdevs_discovered"], 1);
        assert!(!claimed(&ee));
        set_raid_options(1024, 0);
        load.wait_writes(100);
        let s = load.stop();
        assert_eq!(s.writes_failed + s.reads_failed, 0, "{s:?}");
        assert!(s.mismatches.is_empty(), "{:?}", s.mismatches);
        assert!(verify_against(&load.shared, "ft_m0", 2048, BS).is_empty());
        drop(load);
        raid_delete("ft_r", false).unwrap();
        unregister(&ee);
        for m in ["ft_m0", "ft_m1", "ft_m2"] {
            unregister(m);
        }
    });
}

#[test]
fn removing_the_only_source_during_rebuild_takes_the_array_down() {
    with_reactors("0x1", || {
        malloc("so_m0", 8192, 512);
        malloc("so_m1", 8192, 512);
        malloc("so_m2", 8192, 512);
        raid_create("so_r", Level::Raid1, &["so_m0", "so_m1"], 0, false).unwrap();
        remove_base("so_m1").unwrap();
        set_raid_options(16, 1);
        add_base("so_r", "so_m2").unwrap();
        assert!(info("so_r").unwrap().get("process").is_some());
        unregister("so_m0");
        wait_for("array gone", 20, || info("so_r").is_none());
        assert!(!bdev_exists("so_r"));
        assert!(!claimed("so_m2"));
        set_raid_options(1024, 0);
        unregister("so_m1");
        unregister("so_m2");
    });
}

#[test]
fn two_writers_failure_rebuild_then_only_the_rebuilt_member_serves() {
    with_reactors("0x3", || {
        malloc("tw_m0", 16384, 512);
        malloc("tw_m1", 16384, 512);
        malloc("tw_m2", 16384, 512);
        let ee = error_bdev("tw_m1");
        raid_create("tw_r", Level::Raid1, &["tw_m0", &ee], 0, true).unwrap();
        let n = app_sync(|| bdev::get("tw_r").unwrap().num_blocks());
        let (ta, tb) = (io_thread("tw_a"), io_thread("tw_b"));
        let a = Load::start_range(&ta, "tw_r", Some((0, n / 2)), 8, 16, 11);
        let b = Load::start_range(&tb, "tw_r", Some((n / 2, n / 2)), 16, 16, 22);
        a.wait_writes(200);
        b.wait_writes(200);
        inject(&ee, "write", 1);
        wait_for("member failed", 10, || {
            info("tw_r").unwrap()["num_base_bdevs_operational"] == 1
        });
        set_raid_options(128, 8);
        add_base("tw_r", "tw_m2").unwrap();
        wait_for("rebuild done", 60, || {
            info("tw_r").unwrap().get("process").is_none()
        });
        set_raid_options(1024, 0);
        a.wait_writes(100);
        // The original member goes: every read now comes from the rebuilt one and is checked.
        unregister("tw_m0");
        assert_eq!(info("tw_r").unwrap()["num_base_bdevs_operational"], 1);
        a.wait_writes(300);
        b.wait_writes(300);
        let (sa, sb) = (a.stop(), b.stop());
        for s in [&sa, &sb] {
            assert_eq!(s.writes_failed + s.reads_failed, 0, "{s:?}");
            assert!(s.mismatches.is_empty(), "{:?}", s.mismatches);
        }
        for l in [&a, &b] {
            assert!(verify_against(&l.shared, "tw_r", 0, BS).is_empty());
            assert!(verify_against(&l.shared, "tw_m2", 2048, BS).is_empty());
        }
        drop((a, b));
        raid_delete("tw_r", false).unwrap();
        unregister(&ee);
        unregister("tw_m1");
        unregister("tw_m2");
    });
}

#[test]
fn shutdown_order_with_a_rebuild_running() {
    with_reactors("0x1", || {
        malloc("sd_m0", 8192, 512);
        malloc("sd_m1", 8192, 512);
        malloc("sd_m2", 8192, 512);
        raid_create("sd_r", Level::Raid1, &["sd_m0", "sd_m1"], 0, true).unwrap();
        remove_base("sd_m1").unwrap();
        set_raid_options(16, 1);
        add_base("sd_r", "sd_m2").unwrap();
        assert!(info("sd_r").unwrap().get("process").is_some());
        let before = superblock_of("sd_m0").unwrap();
        // As spdk_tgt shuts down: the raid bdev first (not by this module), then its members.
        unregister("sd_r");
        unregister("sd_m2");
        // Shutdown writes no superblock: the array comes back as it was.
        assert_eq!(superblock_of("sd_m0").unwrap(), before);
        unregister("sd_m0");
        unregister("sd_m1");
        wait_for("array gone", 10, || info("sd_r").is_none());
        set_raid_options(1024, 0);
    });
}
