//! `bdev_nvme` discovery services against this project's own target, in one process: a service started on the
//! target's port attaches the subsystem its log lists (`<name>0`); a subsystem created later is attached as it
//! appears (`<name>1`), a second listener of the first subsystem becomes a second path of `<name>0`, a deleted
//! subsystem's controller and bdev go; `save_config` writes the service, not its controllers; stopping it
//! detaches them.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nvmf::mgmt;
use nvmf::params::{NamespaceParams, NvmfCreateSubsystem};
use reactor::testing::{app, on_app};
use serde_json::Value;

const NQN2: &str = "nqn.2016-06.io.spdk:bdev-nvme-discovered";

#[test]
fn discovery_follows_the_log() {
    run(body);
}

fn start(port: u16) -> Result<(), String> {
    let p: bdev_nvme::discovery::StartParams = serde_json::from_value(serde_json::json!({
        "name": "Disc", "trtype": "tcp", "traddr": "127.0.0.1", "adrfam": "ipv4",
        "trsvcid": port.to_string(), "wait_for_attach": true,
    }))
    .unwrap();
    on_app(move |reply| {
        bdev_nvme::discovery::start(p, move |r| reply(r.map_err(|e| format!("{e:?}"))))
    })
}

/// Waits until `check` holds for `bdev_nvme_get_controllers`.
#[track_caller]
fn wait_ctrlrs(what: &str, check: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = app(|| bdev_nvme::controllers_json(None).unwrap());
        if check(&v) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn paths_of(v: &Value, name: &str) -> usize {
    v.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map_or(0, |c| c["ctrlrs"].as_array().unwrap().len())
}

fn body() {
    let a = target();
    start(a).expect("start discovery");
    // Waited for: the subsystem the log listed is attached.
    assert!(app(
        || bdev::get("Disc0n1").is_some() && bdev::get("Disc0n2").is_some()
    ));
    let info = app(bdev_nvme::discovery::info_json);
    assert_eq!(info[0]["name"], "Disc", "{info}");
    assert_eq!(info[0]["trid"]["trsvcid"], a.to_string());
    assert_eq!(
        info[0]["trid"]["subnqn"],
        "nqn.2014-08.org.nvmexpress.discovery"
    );
    // The same service again: -EEXIST.
    let e = start(a).unwrap_err();
    assert!(e.contains("-17"), "{e}");

    // A subsystem created later: attached when the log changes.
    let r: Result<(), String> = on_app(move |reply| {
        let mut o = NvmfCreateSubsystem::new(NQN2);
        o.allow_any_host = true;
        o.normalize(false, 1, 1024).unwrap();
        mgmt::create_subsystem(o);
        mgmt::add_ns(NQN2, NamespaceParams::new("OwnM2"), move |r| {
            set_listener_of(NQN2, a, true);
            reply(r.map(|_| ()).map_err(|e| e.to_string()))
        });
    });
    r.unwrap();
    wait_bdev("Disc1n1", true);

    // A second listener of the first subsystem: a second path of Disc0.
    let b = free_port();
    listener(b, true);
    wait_ctrlrs("second path", |v| paths_of(v, "Disc0") == 2);
    assert_eq!(
        io("Disc0n1", bdev::IoType::Read, 0, 8, None).0,
        bdev::IoStatus::Success
    );

    // The later subsystem goes: its controller and bdev go.
    let r: Result<(), String> =
        on_app(|reply| mgmt::delete_subsystem(NQN2, move |r| reply(r.map_err(|e| e.to_string()))));
    r.unwrap();
    wait_bdev("Disc1n1", false);
    wait_ctrlrs("Disc1 detached", |v| paths_of(v, "Disc1") == 0);

    // save_config: the service, not its controllers.
    let cfg = app(bdev_nvme::config_entries);
    assert_eq!(cfg.len(), 1, "{cfg:?}");
    assert_eq!(cfg[0]["method"], "bdev_nvme_start_discovery");
    assert_eq!(cfg[0]["params"]["name"], "Disc");
    assert_eq!(cfg[0]["params"]["wait_for_attach"], true);
    assert!(cfg[0]["params"].get("subnqn").is_none());

    // Stopped: what it attached goes.
    let r: Result<(), String> = on_app(|reply| {
        bdev_nvme::discovery::stop("Disc", move |r| reply(r.map_err(|e| format!("{e:?}"))))
    });
    r.unwrap();
    wait_bdev("Disc0n1", false);
    wait_ctrlrs("all detached", |v| v.as_array().unwrap().is_empty());
    assert_eq!(app(bdev_nvme::discovery::info_json), Value::Array(vec![]));
    let r: Result<(), String> = on_app(|reply| {
        bdev_nvme::discovery::stop("Disc", move |r| reply(r.map_err(|e| format!("{e:?}"))))
    });
    assert!(r.unwrap_err().contains("-2"));
}
