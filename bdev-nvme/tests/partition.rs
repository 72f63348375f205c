//! A network partition that drops packets (no connection closes), with a write load on a multipath bdev: the
//! path through a proxy that goes silent is found lost by its unanswered keep alive, its queues are closed and
//! the writes go on over the other path with none failed; the lost path's controller is deleted once its
//! reconnects have failed for `ctrlr_loss_timeout_sec`; with the network back it is attached again. Every
//! acknowledged write is on the target's bdev at the end.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reactor::testing::app;
use subsystems::bdev_nvme::NvmeOptions;

#[test]
fn silent_path_is_left_without_failed_writes() {
    run(body);
}

fn paths(name: &str) -> usize {
    let n = name.to_string();
    app(move || bdev_nvme::controllers_json(Some(&n)))
        .map(|v| v[0]["ctrlrs"].as_array().unwrap().len())
        .unwrap_or(0)
}

fn load_runs(more: u64, within: Duration) {
    let (start, _) = load_progress();
    let deadline = Instant::now() + within;
    while load_progress().0 < start + more {
        assert!(Instant::now() < deadline, "the load stalled");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn body() {
    let a = target();
    let b = free_port();
    listener(b, true);
    let proxy = Blackhole::start(a);
    // A short keep alive timeout, so that a silent path is found lost within a second.
    app(|| {
        bdev_nvme::set_options(&NvmeOptions {
            keep_alive_timeout_ms: 1000,
            ..Default::default()
        })
    });
    let mut pa = params("Nvme0", proxy.port);
    pa.fabrics_connect_timeout_us = Some(500_000);
    pa.ctrlr_loss_timeout_sec = Some(2);
    pa.reconnect_delay_sec = Some(1);
    attach(pa.clone()).expect("path through the proxy");
    let mut pb = params("Nvme0", b);
    pb.multipath = Some("multipath".into());
    attach(pb).expect("direct path");
    assert_eq!(paths("Nvme0"), 2);

    start_load("Nvme0n1", 256, 8);
    load_runs(300, Duration::from_secs(10));
    // The load runs on the proxy's path (the preferred one).
    let port = proxy.port.to_string();
    let cntlid = cntlid_of("Nvme0", &port);
    app(move || bdev_nvme::set_preferred("Nvme0n1", cntlid).unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        load_runs(50, Duration::from_secs(10));
        let v = app(|| bdev_nvme::io_paths_json(Some("Nvme0n1")));
        let on_proxy = v["poll_groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["io_paths"].as_array().unwrap().clone())
            .any(|p| p["transport"]["trsvcid"] == port && p["current"] == true);
        if on_proxy {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the load never moved to the proxy's path: {v}"
        );
    }
    load_runs(300, Duration::from_secs(10));
    let t0 = Instant::now();
    proxy.set_cut(true);
    // Writes stall on the silent path until its keep alive goes unanswered, then go on over the other one.
    load_runs(500, Duration::from_secs(10));
    let moved = t0.elapsed();
    assert!(
        moved >= Duration::from_millis(400),
        "writes did not wait for the keep alive: {moved:?}"
    );
    assert_eq!(load_progress().1, 0, "a write failed across the partition");
    let deadline = Instant::now() + Duration::from_secs(20);
    while paths("Nvme0") != 1 {
        assert!(
            Instant::now() < deadline,
            "the silent path was never deleted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    load_runs(200, Duration::from_secs(10));

    // The network is back: the path is attached again and the load goes on.
    proxy.set_cut(false);
    pa.multipath = Some("multipath".into());
    attach(pa).expect("path through the proxy again");
    assert_eq!(paths("Nvme0"), 2);
    load_runs(200, Duration::from_secs(10));
    let res = stop_load();
    assert_eq!(res.failed, 0, "{res:?}");
    check_acked("OwnM0", &res.acked);
    eprintln!("writes moved to the other path {moved:?} after the cut");
    detach("Nvme0");
    app(|| bdev_nvme::set_options(&NvmeOptions::default()));
}
