//! `bdev_nvme` multipath against this project's own target, in one process: one subsystem reached through two
//! listeners. Two attaches under one name make two paths of the same bdevs; a path whose listener goes away
//! (its connections dropped) is left while a write load runs, with no write failed and every acknowledged write
//! on the target's bdev; policies, the preferred path, and the RPC views follow; a failover address takes over
//! a controller whose address is gone; detaching one path keeps the bdev, detaching the name removes it.

mod common;

use std::time::Duration;

use common::*;
use nvmf::params::AnaState;
use reactor::testing::{app, on_app};
use serde_json::Value;

#[test]
fn two_paths_one_bdev() {
    run(body);
}

fn with_mode(name: &str, port: u16, mode: Option<&str>) -> bdev_nvme::AttachParams {
    let mut p = params(name, port);
    p.multipath = mode.map(str::to_string);
    p
}

/// The app thread's paths of `bdev` in `bdev_nvme_get_io_paths`: (trsvcid, current, connected).
fn paths_of(bdev: &str) -> Vec<(String, bool, bool)> {
    let b = bdev.to_string();
    let v = app(move || bdev_nvme::io_paths_json(Some(&b)));
    let mut out = Vec::new();
    for g in v["poll_groups"].as_array().unwrap() {
        if g["thread"] != "app_thread" {
            continue;
        }
        for p in g["io_paths"].as_array().unwrap() {
            out.push((
                p["transport"]["trsvcid"].as_str().unwrap().to_string(),
                p["current"].as_bool().unwrap(),
                p["connected"].as_bool().unwrap(),
            ));
        }
    }
    out.sort();
    out
}

/// Waits until `bdev`'s paths on the app thread read `want` (in any order).
#[track_caller]
fn wait_paths(bdev: &str, want: &[(String, bool, bool)]) {
    let mut want = want.to_vec();
    want.sort();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got = paths_of(bdev);
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{bdev} paths {got:?}, wanted {want:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ctrlrs(name: &str) -> Value {
    let n = name.to_string();
    app(move || bdev_nvme::controllers_json(Some(&n)).unwrap())[0]["ctrlrs"].clone()
}

/// Lets the load run until it completed `more` further writes.
fn load_runs(more: u64) {
    let (start, _) = load_progress();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while load_progress().0 < start + more {
        assert!(std::time::Instant::now() < deadline, "the load stalled");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn body() {
    // A short keep alive timeout: writes a lost path gave back wait for it before going on another path.
    app(|| {
        bdev_nvme::set_options(&subsystems::bdev_nvme::NvmeOptions {
            keep_alive_timeout_ms: 1000,
            ..Default::default()
        })
    });
    let a = target();
    let b = free_port();
    listener(b, true);
    let (pa, pb) = (a.to_string(), b.to_string());

    // Two paths under one name: the second attach answers with the same bdevs.
    let names = attach(params("Nvme0", a)).expect("attach path a");
    assert_eq!(names, vec!["Nvme0n1", "Nvme0n2"]);
    // Path b with TCP header and data digests.
    let mut pb_params = with_mode("Nvme0", b, Some("multipath"));
    pb_params.hdgst = Some(true);
    pb_params.ddgst = Some(true);
    let names = attach(pb_params).expect("attach path b");
    assert_eq!(names, vec!["Nvme0n1", "Nvme0n2"]);
    let c = ctrlrs("Nvme0");
    assert_eq!(c.as_array().unwrap().len(), 2, "{c}");
    let info = app(|| bdev::get("Nvme0n1").unwrap().info_json());
    let nvme = &info["driver_specific"]["nvme"];
    assert_eq!(nvme.as_array().unwrap().len(), 2, "{info}");
    assert_eq!(info["driver_specific"]["mp_policy"], "active_passive");

    // SPDK's refusals of a second path.
    let e = attach(with_mode("Nvme0", b, Some("multipath"))).unwrap_err();
    assert!(e.contains("specified network path"), "{e}");
    let e = attach(with_mode("Nvme0", b, Some("disable"))).unwrap_err();
    assert!(e.contains("multipath is disabled"), "{e}");
    let mut other = with_mode("Nvme0", free_port(), Some("multipath"));
    other.subnqn = Some("nqn.2016-06.io.spdk:other".into());
    let e = attach(other).unwrap_err();
    assert!(e.contains("different subnqn"), "{e}");

    // Active-passive: the load goes to the first path; the io_paths view says so.
    start_load("Nvme0n1", 256, 8);
    load_runs(200);
    wait_paths(
        "Nvme0n1",
        &[(pa.clone(), true, true), (pb.clone(), false, true)],
    );

    // Path a's listener goes (its connections dropped): writes go on over b, none fails, and path a's
    // controller is deleted after its failed reconnect (ctrlr_loss_timeout_sec 0) while the bdev stays.
    let t0 = std::time::Instant::now();
    listener(a, false);
    load_runs(500);
    // The writes path a had were not sent again before its controller's keep alive timeout (SPDK #3593).
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "writes moved after {:?}",
        t0.elapsed()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while ctrlrs("Nvme0").as_array().unwrap().len() != 1 {
        assert!(std::time::Instant::now() < deadline, "path a never deleted");
        std::thread::sleep(Duration::from_millis(20));
    }
    load_runs(200);
    assert_eq!(load_progress().1, 0, "a write failed while a path went");
    wait_paths("Nvme0n1", &[(pb.clone(), true, true)]);

    // Path a comes back: attached again as a path, the load keeps going; the preferred path and the
    // active-active policy move the current path(s).
    listener(a, true);
    attach(with_mode("Nvme0", a, Some("multipath"))).expect("attach path a again");
    load_runs(200);
    // Active-passive keeps the path it is on (b, first in the list now).
    wait_paths(
        "Nvme0n1",
        &[(pa.clone(), false, true), (pb.clone(), true, true)],
    );
    let cntlid_a = cntlid_of("Nvme0", &pa);
    app(move || bdev_nvme::set_preferred("Nvme0n1", cntlid_a).unwrap());
    load_runs(200);
    wait_paths(
        "Nvme0n1",
        &[(pa.clone(), true, true), (pb.clone(), false, true)],
    );
    assert!(app(|| bdev_nvme::set_preferred("Nvme0n1", 0xfff0).is_err()));

    // ANA: path a inaccessible (the target's change notice): the load moves to b, no write fails, the views
    // say so; a non-optimized path a stays unused while b is optimized; optimized again, a is current again.
    ana(a, AnaState::Inaccessible);
    load_runs(200);
    wait_paths(
        "Nvme0n1",
        &[(pa.clone(), false, true), (pb.clone(), true, true)],
    );
    let accessible = |port: &str| {
        let v = app(|| bdev_nvme::io_paths_json(Some("Nvme0n1")));
        v["poll_groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["io_paths"].as_array().unwrap().clone())
            .find(|p| p["transport"]["trsvcid"] == port)
            .unwrap()["accessible"]
            .clone()
    };
    assert_eq!(accessible(&pa), false);
    assert_eq!(accessible(&pb), true);
    let info = app(|| bdev::get("Nvme0n1").unwrap().info_json());
    let states: Vec<(String, String)> = info["driver_specific"]["nvme"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["trid"]["trsvcid"].as_str().unwrap().to_string(),
                n["ns_data"]["ana_state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        states.contains(&(pa.clone(), "inaccessible".into())),
        "{states:?}"
    );
    assert!(
        states.contains(&(pb.clone(), "optimized".into())),
        "{states:?}"
    );
    ana(a, AnaState::NonOptimized);
    load_runs(200);
    wait_paths(
        "Nvme0n1",
        &[(pa.clone(), false, true), (pb.clone(), true, true)],
    );
    ana(a, AnaState::Optimized);
    load_runs(200);
    wait_paths(
        "Nvme0n1",
        &[(pa.clone(), true, true), (pb.clone(), false, true)],
    );
    assert_eq!(load_progress().1, 0, "a write failed across ANA changes");
    app(|| bdev_nvme::set_policy("Nvme0n1", true, false, 4).unwrap());
    load_runs(200);
    wait_paths(
        "Nvme0n1",
        &[(pa.clone(), true, true), (pb.clone(), true, true)],
    );
    let info = app(|| bdev::get("Nvme0n1").unwrap().info_json());
    assert_eq!(info["driver_specific"]["mp_policy"], "active_active");
    assert_eq!(info["driver_specific"]["selector"], "round_robin");
    assert_eq!(info["driver_specific"]["rr_min_io"], 4);
    app(|| bdev_nvme::set_policy("Nvme0n1", true, true, 1).unwrap());
    load_runs(200);

    // Detaching one path (by its port) keeps the bdev on the other one, under load.
    let pa2 = pa.clone();
    let r: Result<(), String> = on_app(move |reply| {
        let f = bdev_nvme::PathFilter {
            trsvcid: Some(pa2),
            ..Default::default()
        };
        bdev_nvme::detach("Nvme0", Some(f), move |r| {
            reply(r.map_err(|e| e.to_string()))
        })
    });
    r.unwrap();
    load_runs(300);
    wait_paths("Nvme0n1", &[(pb.clone(), true, true)]);
    let res = stop_load();
    assert_eq!(res.failed, 0, "writes failed: {res:?}");
    assert!(res.ok > 1000);
    check_acked("OwnM0", &res.acked);
    detach("Nvme0");
    wait_bdev("Nvme0n1", false);

    // Failover: a second address under the name is an alternate (no bdev names in the answer); when the
    // controller's address goes, it reconnects through the alternate and I/O goes on.
    attach(params("Nvme1", b)).expect("attach Nvme1");
    let names = attach(with_mode("Nvme1", a, Some("failover"))).expect("failover address");
    assert!(names.is_empty(), "{names:?}");
    let c = ctrlrs("Nvme1");
    assert_eq!(c[0]["trid"]["trsvcid"], pb);
    assert_eq!(c[0]["alternate_trids"][0]["trsvcid"], pa);
    let cfg = app(bdev_nvme::config_entries);
    assert_eq!(cfg.len(), 1, "alternates are not saved, as SPDK: {cfg:?}");
    start_load("Nvme1n1", 256, 4);
    load_runs(100);
    listener(b, false);
    // The reconnect can be over before a look at it: wait for its outcome.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let c = loop {
        let c = ctrlrs("Nvme1");
        if c[0]["trid"]["trsvcid"] == pa && c[0]["state"] == "enabled" {
            break c;
        }
        assert!(std::time::Instant::now() < deadline, "no failover: {c}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(c[0]["trid"]["trsvcid"], pa, "{c}");
    assert_eq!(c[0]["alternate_trids"][0]["trsvcid"], pb, "{c}");
    load_runs(300);
    let res = stop_load();
    assert_eq!(res.failed, 0, "writes failed across the failover: {res:?}");
    check_acked("OwnM0", &res.acked);
    detach("Nvme1");
    wait_bdev("Nvme1n1", false);

    // A path that comes back (its controller reconnects, the same controller): SPDK fails back to the first
    // path; with `disable_auto_failback` I/O stays on the path it moved to.
    listener(b, true);
    for failback in [true, false] {
        app(move || {
            bdev_nvme::set_options(&subsystems::bdev_nvme::NvmeOptions {
                keep_alive_timeout_ms: 1000,
                disable_auto_failback: !failback,
                ..Default::default()
            })
        });
        for (port, mode) in [(a, None), (b, Some("multipath"))] {
            let mut p = with_mode("Nvme2", port, mode);
            p.ctrlr_loss_timeout_sec = Some(-1);
            p.reconnect_delay_sec = Some(1);
            attach(p).expect("attach a path of Nvme2");
        }
        start_load("Nvme2n1", 256, 8);
        load_runs(200);
        wait_paths(
            "Nvme2n1",
            &[(pa.clone(), true, true), (pb.clone(), false, true)],
        );
        listener(a, false);
        load_runs(300);
        wait_paths(
            "Nvme2n1",
            &[(pa.clone(), false, false), (pb.clone(), true, true)],
        );
        listener(a, true);
        let back = if failback {
            [(pa.clone(), true, true), (pb.clone(), false, true)]
        } else {
            [(pa.clone(), false, true), (pb.clone(), true, true)]
        };
        wait_paths("Nvme2n1", &back);
        load_runs(300);
        wait_paths("Nvme2n1", &back);
        let res = stop_load();
        assert_eq!(
            res.failed, 0,
            "writes failed (failback {failback}): {res:?}"
        );
        check_acked("OwnM0", &res.acked);
        detach("Nvme2");
        wait_bdev("Nvme2n1", false);
    }
}
