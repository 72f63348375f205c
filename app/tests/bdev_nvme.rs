//! `bdev_nvme` through SPDK's own client between two processes, the way a compute node attaches a storage node:
//! a storage node (ours, and SPDK v24.05's `spdk_tgt` when the peer build is present) exports a malloc bdev over
//! NVMe/TCP; the compute node (ours) attaches it with `bdev_nvme_attach_controller`, builds an lvstore and an
//! lvol on the NVMe bdev (its metadata travels over the wire), detaches, attaches again and finds them (read
//! back over the wire), saves its config and restarts from it. SPDK's error answers are checked on the way.

mod common;

use common::{write_file, Tgt};
use serde_json::{json, Value};

const NQN: &str = "nqn.2016-06.io.spdk:storage1";

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

/// The storage node's exports, as JSON-RPC calls (for ours and for SPDK's): the subsystem on `port`, and on
/// `port2` too when given (a second path).
fn export_calls(port: &str, port2: Option<&str>) -> Vec<(&'static str, Value)> {
    let listener = |p: &str| {
        (
            "nvmf_subsystem_add_listener",
            json!({"nqn": NQN, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": p}}),
        )
    };
    let mut calls = vec![
        (
            "bdev_malloc_create",
            json!({"name": "Malloc0", "num_blocks": 65536, "block_size": 512}),
        ),
        ("nvmf_create_transport", json!({"trtype": "TCP"})),
        (
            "nvmf_create_subsystem",
            json!({"nqn": NQN, "allow_any_host": true}),
        ),
        (
            "nvmf_subsystem_add_ns",
            json!({"nqn": NQN, "namespace": {"bdev_name": "Malloc0"}}),
        ),
        listener(port),
    ];
    calls.extend(port2.map(listener));
    calls
}

fn attach_args(port: &str) -> Vec<String> {
    [
        "bdev_nvme_attach_controller",
        "-b",
        "Nvme0",
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-f",
        "ipv4",
        "-s",
        port,
        "-n",
        NQN,
    ]
    .map(String::from)
    .to_vec()
}

/// The namespace the storage nodes export: (block size, blocks).
const NS_512: (u64, u64) = (512, 65536);

/// What the compute node does against a storage node listening on `port` (and on `port2`, a second path, when
/// given) whose namespace is `ns`.
fn compute_node_drill(port: &str, port2: Option<&str>, digests: bool, tag: &str, ns: (u64, u64)) {
    let c = std::cell::RefCell::new(Some(Tgt::start(tag, &[])));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drill_steps(&c, port, port2, digests, tag, ns)
    }));
    if let Err(p) = r {
        // The compute node's log says what went wrong on its side.
        if let Some(c) = c.borrow_mut().take() {
            eprintln!("compute node log:\n{}", c.stop().1);
        }
        std::panic::resume_unwind(p);
    }
}

fn drill_steps(
    cell: &std::cell::RefCell<Option<Tgt>>,
    port: &str,
    port2: Option<&str>,
    digests: bool,
    tag: &str,
    ns: (u64, u64),
) {
    let guard = cell.borrow();
    let c = guard.as_ref().unwrap();
    // Module options set before any controller are the attaches' defaults; once one is attached they are
    // refused, as SPDK refuses them.
    let r = c.call(
        "bdev_nvme_set_options",
        json!({"ctrlr_loss_timeout_sec": 30, "reconnect_delay_sec": 2, "fast_io_fail_timeout_sec": 10}),
    );
    assert_eq!(r["result"], true, "{r}");
    let mut args = attach_args(port);
    if digests {
        args.extend(["-e", "-d"].map(String::from));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.rpc(&argv);
    assert!(out.status.success(), "attach: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Nvme0n1");

    let b = c.ok(&["bdev_get_bdevs", "-b", "Nvme0n1"]);
    assert_eq!(b[0]["product_name"], "NVMe disk");
    assert_eq!(b[0]["block_size"], ns.0);
    assert_eq!(b[0]["num_blocks"], ns.1);
    assert_eq!(b[0]["driver_specific"]["nvme"][0]["trid"]["trsvcid"], port);
    let r = c.call(
        "bdev_nvme_set_options",
        json!({"keep_alive_timeout_ms": 5000}),
    );
    assert_eq!(r["error"]["code"], -libc::EPERM, "{r}");
    assert_eq!(
        r["error"]["message"],
        "RPC not permitted with nvme controllers already attached"
    );
    // The controller's health log page, in SPDK's fields.
    let h = c.ok(&["bdev_nvme_get_controller_health_info", "-c", "Nvme0"]);
    assert_eq!(h["traddr"], "127.0.0.1", "{h}");
    for k in [
        "model_number",
        "serial_number",
        "critical_warning",
        "temperature_celsius",
        "available_spare_percentage",
        "percentage_used",
        "data_units_read",
        "data_units_written",
        "host_read_commands",
        "host_write_commands",
        "power_on_hours",
        "unsafe_shutdowns",
        "media_errors",
        "num_err_log_entries",
    ] {
        assert!(h.get(k).is_some(), "{k} missing: {h}");
    }
    let e = c.err(&["bdev_nvme_get_controller_health_info", "-c", "Nvme9"]);
    assert_eq!(
        (e["code"].as_i64(), e["message"].as_str()),
        (Some(-32603), Some("Device not found"))
    );
    let ctrlrs = c.ok(&["bdev_nvme_get_controllers"]);
    assert_eq!(ctrlrs[0]["name"], "Nvme0");
    assert_eq!(ctrlrs[0]["ctrlrs"][0]["state"], "enabled");
    assert_eq!(ctrlrs[0]["ctrlrs"][0]["trid"]["subnqn"], NQN);

    // SPDK's refusals, code and text: the same path again, and another one with multipath disabled.
    let e = c.err(&argv);
    assert_eq!(e["code"], -libc::EALREADY, "{e}");
    assert_eq!(
        e["message"],
        "A controller named Nvme0 already exists with the specified network path\n"
    );
    let mut disabled = argv.clone();
    disabled.extend(["-s", "1", "-x", "disable"]);
    let e = c.err(&disabled);
    assert_eq!(e["code"], -libc::EALREADY, "{e}");
    assert_eq!(
        e["message"],
        "A controller named Nvme0 already exists and multipath is disabled\n"
    );
    let e = c.err(&["bdev_nvme_get_controllers", "-n", "Nvme9"]);
    assert_eq!(
        (e["code"].as_i64(), e["message"].as_str()),
        (Some(22), Some("Controller Nvme9 does not exist"))
    );
    let e = c.err(&["bdev_nvme_detach_controller", "Nvme9"]);
    assert_eq!(e["code"], -libc::ENODEV, "{e}");
    let r = c.call(
        "bdev_nvme_attach_controller",
        json!({"name": "Nvme1", "trtype": "carrier-pigeon", "traddr": "127.0.0.1", "subnqn": NQN}),
    );
    assert_eq!(
        r["error"]["message"], "Failed to parse trtype: carrier-pigeon",
        "{r}"
    );
    // Nobody listening: a clear error, nothing left behind, the target serves on.
    let r = c.call(
        "bdev_nvme_attach_controller",
        json!({"name": "Nvme1", "trtype": "TCP", "traddr": "127.0.0.1", "trsvcid": free_port(), "subnqn": NQN}),
    );
    assert!(r["error"]["code"].as_i64().unwrap() < 0, "{r}");
    assert_eq!(
        c.ok(&["bdev_nvme_get_controllers"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Metadata written over the wire, then read back over it after a detach and a second attach.
    let lvs = c.ok(&["bdev_lvol_create_lvstore", "Nvme0n1", "lvs0"]);
    c.ok(&["bdev_lvol_create", "-l", "lvs0", "lv0", "8"]);
    // The lvstore's metadata I/O opened a channel: one path, connected and current.
    let paths = c.ok(&["bdev_nvme_get_io_paths"]);
    let p0 = &paths["poll_groups"][0]["io_paths"][0];
    assert_eq!(p0["bdev_name"], "Nvme0n1", "{paths}");
    assert_eq!(
        (p0["connected"].as_bool(), p0["current"].as_bool()),
        (Some(true), Some(true)),
        "{paths}"
    );
    assert_eq!(p0["transport"]["trsvcid"], port);
    assert_eq!(p0["transport"]["adrfam"], "IPv4");
    let none = c.ok(&["bdev_nvme_get_io_paths", "-n", "Nvme7n1"]);
    assert!(
        none["poll_groups"][0]["io_paths"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{none}"
    );
    if let Some(p2) = port2 {
        multipath_steps(c, port, p2);
    }
    // Transport counters of the thread that did the I/O, SPDK's names.
    let st = c.ok(&["bdev_nvme_get_transport_statistics"]);
    let tr = &st["poll_groups"][0]["transports"][0];
    assert_eq!(tr["trname"], "TCP", "{st}");
    assert!(tr["submitted_requests"].as_u64().unwrap() > 0, "{st}");
    assert!(tr["nvme_completions"].as_u64().unwrap() > 0, "{st}");
    assert!(tr["polls"].as_u64().unwrap() >= tr["idle_polls"].as_u64().unwrap());
    c.ok(&["bdev_nvme_detach_controller", "Nvme0"]);
    assert_eq!(c.ok(&["bdev_lvol_get_lvstores"]), json!([]));
    if let Some(p2) = port2 {
        discovery_steps(c, port, p2);
    }
    let out = c.rpc(&argv);
    assert!(out.status.success(), "attach again: {out:?}");
    c.ok(&["bdev_wait_for_examine"]);
    let stores = c.ok(&["bdev_lvol_get_lvstores"]);
    assert_eq!(
        stores[0]["uuid"], lvs,
        "the lvstore came back over the wire"
    );
    assert_eq!(
        c.ok(&["bdev_get_bdevs", "-b", "lvs0/lv0"])[0]["num_blocks"],
        16384
    );

    // save_config has the attach entry in SPDK's place; a restart from it attaches and loads again.
    let cfg = c.ok(&["save_config"]);
    let (bdev_cfg, methods) = common::subsystem_config(&cfg, "bdev");
    let at = |m: &str| methods.iter().position(|x| *x == m).unwrap();
    assert!(at("bdev_nvme_set_options") < at("bdev_nvme_attach_controller"));
    let attach_entry = &bdev_cfg[at("bdev_nvme_attach_controller")]["params"];
    assert_eq!(attach_entry["ctrlr_loss_timeout_sec"], 30, "{attach_entry}");
    assert_eq!(attach_entry["reconnect_delay_sec"], 2);
    assert_eq!(attach_entry["fast_io_fail_timeout_sec"], 10);
    assert!(at("bdev_nvme_attach_controller") < at("bdev_nvme_set_hotplug"));
    drop(guard);
    let c = cell.borrow_mut().take().unwrap();
    let (st, _) = c.stop();
    assert!(st.success());
    let dir = std::env::temp_dir().join(format!("bdev-nvme-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = write_file(&dir, "config.json", &cfg.to_string());
    let c = Tgt::start(&format!("{tag}-again"), &["-c", file.to_str().unwrap()]);
    c.ok(&["bdev_wait_for_examine"]);
    assert_eq!(c.ok(&["bdev_lvol_get_lvstores"])[0]["uuid"], lvs);
    c.ok(&["bdev_lvol_delete_lvstore", "-l", "lvs0"]);
    c.ok(&["bdev_nvme_detach_controller", "Nvme0"]);
    let (st, _) = c.stop();
    assert!(st.success());
    let _ = std::fs::remove_dir_all(dir);
}

/// A second path to the storage node under the same name, through `spdk-rpc`: the same bdev, two controllers,
/// SPDK's policy RPCs, the first path detached while the lvstore on the bdev stays and takes metadata writes
/// through the second.
fn multipath_steps(c: &Tgt, port: &str, port2: &str) {
    // The second path with TCP header and data digests.
    let mut args = attach_args(port2);
    args.extend(["-x", "multipath", "-e", "-d"].map(String::from));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.rpc(&argv);
    assert!(out.status.success(), "second path: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Nvme0n1");
    let ctrlrs = c.ok(&["bdev_nvme_get_controllers", "-n", "Nvme0"]);
    let list = ctrlrs[0]["ctrlrs"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{ctrlrs}");
    let cntlid2 = list.iter().find(|x| x["trid"]["trsvcid"] == port2).unwrap()["cntlid"]
        .as_u64()
        .unwrap();
    let b = c.ok(&["bdev_get_bdevs", "-b", "Nvme0n1"]);
    assert_eq!(
        b[0]["driver_specific"]["nvme"].as_array().unwrap().len(),
        2,
        "{b}"
    );
    assert_eq!(b[0]["driver_specific"]["mp_policy"], "active_passive");
    c.ok(&[
        "bdev_nvme_set_preferred_path",
        "-b",
        "Nvme0n1",
        "-c",
        &cntlid2.to_string(),
    ]);
    let e = c.err(&[
        "bdev_nvme_set_preferred_path",
        "-b",
        "Nvme0n1",
        "-c",
        "4000",
    ]);
    assert_eq!(e["code"], -libc::ENODEV, "{e}");
    // Not in the 26.x client's command line any more; SPDK's targets still answer it.
    let r = c.call(
        "bdev_nvme_set_multipath_policy",
        json!({"name": "Nvme0n1", "policy": "active_active", "selector": "round_robin", "rr_min_io": 2}),
    );
    assert_eq!(r["result"], true, "{r}");
    let b = c.ok(&["bdev_get_bdevs", "-b", "Nvme0n1"]);
    assert_eq!(b[0]["driver_specific"]["mp_policy"], "active_active");
    assert_eq!(b[0]["driver_specific"]["rr_min_io"], 2);
    let r = c.call(
        "bdev_nvme_set_multipath_policy",
        json!({"name": "Nvme0n1", "policy": "sometimes"}),
    );
    assert_eq!(r["error"]["code"], -32603, "{r}");
    let r = c.call(
        "bdev_nvme_set_multipath_policy",
        json!({"name": "Malloc9", "policy": "active_passive"}),
    );
    assert_eq!(r["error"]["code"], -libc::ENODEV, "{r}");
    c.ok(&["bdev_lvol_create", "-l", "lvs0", "lv1", "4"]);
    // The first path goes: the bdev, its lvstore and their metadata writes go on through the second.
    c.ok(&[
        "bdev_nvme_detach_controller",
        "Nvme0",
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-f",
        "ipv4",
        "-s",
        port,
        "-n",
        NQN,
    ]);
    let ctrlrs = c.ok(&["bdev_nvme_get_controllers", "-n", "Nvme0"]);
    assert_eq!(ctrlrs[0]["ctrlrs"].as_array().unwrap().len(), 1, "{ctrlrs}");
    assert_eq!(ctrlrs[0]["ctrlrs"][0]["trid"]["trsvcid"], port2);
    c.ok(&["bdev_lvol_create", "-l", "lvs0", "lv2", "4"]);
    c.ok(&["bdev_lvol_delete", "lvs0/lv1"]);
    c.ok(&["bdev_lvol_delete", "lvs0/lv2"]);
    let paths = c.ok(&["bdev_nvme_get_io_paths", "-n", "Nvme0n1"]);
    let p = &paths["poll_groups"][0]["io_paths"];
    assert_eq!(p.as_array().unwrap().len(), 1, "{paths}");
    assert_eq!(p[0]["transport"]["trsvcid"], port2, "{paths}");
    assert_eq!(p[0]["current"], true, "{paths}");
}

/// A discovery service on the storage node's port, through `spdk-rpc`: the subsystem it lists is attached as
/// `Disc0` with a path per listener (the lvstore on it is found), listed by `bdev_nvme_get_discovery_info`, and
/// detached when the service stops.
fn discovery_steps(c: &Tgt, port: &str, port2: &str) {
    // (The client prints nothing for it.)
    c.ok(&[
        "bdev_nvme_start_discovery",
        "-b",
        "Disc",
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-f",
        "ipv4",
        "-s",
        port,
        "-w",
    ]);
    let b = c.ok(&["bdev_get_bdevs", "-b", "Disc0n1"]);
    assert_eq!(
        b[0]["driver_specific"]["nvme"].as_array().unwrap().len(),
        2,
        "a path per listener: {b}"
    );
    let mut ports: Vec<String> = b[0]["driver_specific"]["nvme"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["trid"]["trsvcid"].as_str().unwrap().to_string())
        .collect();
    ports.sort();
    let mut want = vec![port.to_string(), port2.to_string()];
    want.sort();
    assert_eq!(ports, want);
    let info = c.ok(&["bdev_nvme_get_discovery_info"]);
    assert_eq!(info[0]["name"], "Disc", "{info}");
    assert_eq!(info[0]["trid"]["trsvcid"], port, "{info}");
    let e = c.err(&[
        "bdev_nvme_start_discovery",
        "-b",
        "Disc",
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-f",
        "ipv4",
        "-s",
        port,
    ]);
    assert_eq!(e["code"], -libc::EEXIST, "{e}");
    c.ok(&["bdev_wait_for_examine"]);
    assert_eq!(c.ok(&["bdev_lvol_get_lvstores"])[0]["name"], "lvs0");
    c.ok(&["bdev_nvme_stop_discovery", "-b", "Disc"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while c
        .call("bdev_get_bdevs", json!({"name": "Disc0n1"}))
        .get("result")
        .is_some()
    {
        assert!(std::time::Instant::now() < deadline, "Disc0n1 stayed");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(c.ok(&["bdev_nvme_get_discovery_info"]), json!([]));
    let e = c.err(&["bdev_nvme_stop_discovery", "-b", "Disc"]);
    assert_eq!(e["code"], -libc::ENOENT, "{e}");
}

#[test]
fn compute_node_attaches_our_storage_node() {
    let s = Tgt::start("nvme-storage", &[]);
    let (port, port2) = (free_port(), free_port());
    for (m, p) in export_calls(&port, Some(&port2)) {
        let r = s.call(m, p);
        assert!(r.get("error").is_none(), "{m}: {r}");
    }
    compute_node_drill(&port, Some(&port2), false, "nvme-compute", NS_512);
    let (st, _) = s.stop();
    assert!(st.success());
}

/// The Linux kernel's NVMe-oF/TCP target (nvmet, configured through configfs in a lab guest, a memory-backed
/// null_blk namespace of 1 GiB) as the storage node, reached through a forwarded port. (A file on tmpfs will not
/// do: its write zeroes fails, and the blobstore zeroes its metadata area.)
#[test]
fn compute_node_attaches_kernel_storage_node() {
    const TEST: &str = "compute_node_attaches_kernel_storage_node";
    let Some(lab) = lab::Lab::get_or_skip(TEST) else {
        return;
    };
    // crc32c_generic: the TCP digests the drill asks for (nvmet-tcp drops the connection without it, and 6.1
    // then oopses releasing the queue).
    let spec = lab::ImageSpec::default().with_modules(&[
        "nvmet",
        "nvmet_tcp",
        "null_blk",
        "crc32c_generic",
    ]);
    if lab.image_or_skip(TEST, &spec).is_none() {
        return;
    }
    let port: u16 = free_port().parse().unwrap();
    let script = format!(
        r#"
. /lab/lib.sh
step nvmet
# Loaded at boot with its defaults (not memory backed): again, keeping what is written.
rmmod null_blk
modprobe null_blk nr_devices=1 gb=1 bs=512 memory_backed=1 || fail "null_blk"
cd /sys/kernel/config/nvmet || fail "no nvmet configfs"
mkdir subsystems/{NQN}
echo 1 > subsystems/{NQN}/attr_allow_any_host
mkdir subsystems/{NQN}/namespaces/1
echo -n /dev/nullb0 > subsystems/{NQN}/namespaces/1/device_path
echo 1 > subsystems/{NQN}/namespaces/1/enable || fail "namespace enable"
mkdir ports/1
echo tcp > ports/1/addr_trtype
echo ipv4 > ports/1/addr_adrfam
echo 0.0.0.0 > ports/1/addr_traddr
echo 4420 > ports/1/addr_trsvcid
ln -s /sys/kernel/config/nvmet/subsystems/{NQN} ports/1/subsystems/{NQN} || fail "port link"
modprobe crc32c_generic || fail "crc32c"
echo "nvmet ready"
sleep 600
"#
    );
    let mut cfg = lab::GuestConfig::new("bdev-nvme-kernel-target", &script);
    cfg.image = spec;
    cfg.net = true;
    cfg.host_forwards.push((port, 4420));
    cfg.timeout = std::time::Duration::from_secs(600);
    let g = lab.spawn(&cfg).unwrap();
    if let Err(e) = g.wait_for("nvmet ready", std::time::Duration::from_secs(180)) {
        panic!(
            "{e}
{}",
            g.console()
        );
    }
    let drill = std::panic::catch_unwind(|| {
        compute_node_drill(
            &port.to_string(),
            None,
            true,
            "nvme-compute-kernel",
            (512, 2 * 1024 * 1024),
        )
    });
    let out = g.kill();
    if let Err(p) = drill {
        eprintln!("{}", out.console);
        std::panic::resume_unwind(p);
    }
}

#[test]
fn compute_node_attaches_spdk_storage_node() {
    if lab::target::spdk_peer().is_none() {
        eprintln!("skipped: no SPDK peer build");
        return;
    }
    let dir = std::env::temp_dir().join(format!("bdev-nvme-spdk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (port, port2) = (free_port(), free_port());
    let config: Vec<Value> = export_calls(&port, Some(&port2))
        .into_iter()
        .filter(|(m, _)| m.starts_with("bdev_"))
        .map(|(m, p)| json!({"method": m, "params": p}))
        .collect();
    let nvmf: Vec<Value> = export_calls(&port, Some(&port2))
        .into_iter()
        .filter(|(m, _)| m.starts_with("nvmf_"))
        .map(|(m, p)| json!({"method": m, "params": p}))
        .collect();
    let cfg = json!({"subsystems": [
        {"subsystem": "bdev", "config": config},
        {"subsystem": "nvmf", "config": nvmf},
    ]});
    write_file(&dir, "config.json", &cfg.to_string());
    let s = lab::target::SpdkTgt::start(&dir, "spdk");
    compute_node_drill(&port, Some(&port2), false, "nvme-compute-spdk", NS_512);
    s.stop();
    let _ = std::fs::remove_dir_all(dir);
}

/// Eight clients attach and detach the same two controller names as fast as they can while two more read
/// `bdev_get_bdevs`, `bdev_nvme_get_controllers` and `bdev_nvme_get_io_paths`: every answer is a result or an
/// error object, nothing crashes, and at the end what the compute node lists is exactly what exists (bdevs for
/// listed controllers only, as many controllers on the storage node as the compute node lists).
#[test]
fn attach_detach_races_leave_consistent_state() {
    let s = Tgt::start("nvme-race-storage", &[]);
    let port = free_port();
    for (m, p) in export_calls(&port, None) {
        let r = s.call(m, p);
        assert!(r.get("error").is_none(), "{m}: {r}");
    }
    let c = std::sync::Arc::new(Tgt::start("nvme-race-compute", &[]));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (c, port) = (c.clone(), port.clone());
        workers.push(std::thread::spawn(move || {
            for i in 0..12 {
                let name = format!("Race{}", (w + i) % 2);
                let r = if (w + i) % 3 == 0 {
                    c.call("bdev_nvme_detach_controller", json!({"name": name}))
                } else {
                    c.call(
                        "bdev_nvme_attach_controller",
                        json!({"name": name, "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1",
                               "trsvcid": port, "subnqn": NQN}),
                    )
                };
                assert!(
                    r.get("result").is_some() || r["error"]["code"].is_i64(),
                    "malformed answer {r}"
                );
            }
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (c, stop) = (c.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for m in [
                    "bdev_get_bdevs",
                    "bdev_nvme_get_controllers",
                    "bdev_nvme_get_io_paths",
                ] {
                    let r = c.call(m, json!({}));
                    assert!(r.get("result").is_some(), "{m}: {r}");
                    n += 1;
                }
            }
            n
        }));
    }
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    // Settled: what is listed exists, and nothing else does.
    let listed: Vec<String> = c
        .ok(&["bdev_nvme_get_controllers"])
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect();
    let bdevs: Vec<String> = c
        .ok(&["bdev_get_bdevs"])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    for k in 0..2 {
        let name = format!("Race{k}");
        assert_eq!(
            listed.contains(&name),
            bdevs.contains(&format!("{name}n1")),
            "{name}: listed {listed:?}, bdevs {bdevs:?}"
        );
    }
    // The storage node holds one controller per attached one (none leaked by a lost race).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ctrlrs = s.call("nvmf_subsystem_get_controllers", json!({"nqn": NQN}));
        let n = ctrlrs["result"].as_array().map_or(usize::MAX, Vec::len);
        if n == listed.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "storage node has {n} controllers, compute node lists {listed:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for name in &listed {
        c.ok(&["bdev_nvme_detach_controller", name]);
    }
    let c = std::sync::Arc::try_unwrap(c).ok().unwrap();
    let (st, _) = c.stop();
    assert!(st.success());
    let (st, _) = s.stop();
    assert!(st.success());
}

/// A `DHHC-1` secret of `len` bytes (pseudo-random from `seed`) whose responses use transformation `xx`, as
/// `nvme gen-dhchap-key` writes it.
fn dhchap_secret(len: usize, xx: u8, seed: u64) -> String {
    let mut x = seed | 1;
    let key: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    nvme_host::auth::Secret { key, transform: xx }.to_text()
}

/// A key file readable by its owner only (SPDK's keyring refuses others).
fn key_file(dir: &std::path::Path, name: &str, text: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = write_file(dir, name, text);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.to_string_lossy().into_owned()
}

/// Writes `dir/config.json` for SPDK's target as a storage node that lets in only `hosts` (the params of
/// `nvmf_subsystem_add_host` calls), its keyring holding `keys` (name, path), its listener on `port` requiring
/// a secure channel (TLS) when `secure`.
fn spdk_locked_node_config(
    dir: &std::path::Path,
    port: &str,
    secure: bool,
    keys: &[(&str, &str)],
    hosts: Vec<Value>,
) {
    let nvmf: Vec<Value> = export_calls(port, None)
        .into_iter()
        .filter(|(m, _)| m.starts_with("nvmf_"))
        .map(|(m, mut p)| {
            if m == "nvmf_create_subsystem" {
                p["allow_any_host"] = json!(false);
            }
            if m == "nvmf_subsystem_add_listener" {
                p["secure_channel"] = json!(secure);
            }
            json!({"method": m, "params": p})
        })
        .chain(
            hosts
                .into_iter()
                .map(|h| json!({"method": "nvmf_subsystem_add_host", "params": h})),
        )
        .collect();
    let keyring: Vec<Value> = keys
        .iter()
        .map(|(n, p)| json!({"method": "keyring_file_add_key", "params": {"name": n, "path": p}}))
        .collect();
    let cfg = json!({"subsystems": [
        {"subsystem": "keyring", "config": keyring},
        {"subsystem": "bdev", "config": [{"method": "bdev_malloc_create",
            "params": {"name": "Malloc0", "num_blocks": 65536, "block_size": 512}}]},
        {"subsystem": "nvmf", "config": nvmf},
    ]});
    write_file(dir, "config.json", &cfg.to_string());
}

/// DH-HMAC-CHAP against SPDK v24.05's target, which requires it of our host NQN: no key, a wrong key, an
/// unknown key name and a wrong controller key are refused with a clear error; the right keys (bidirectional)
/// connect the admin queue and the I/O queues (an lvstore is written and read over them), SPDK reports every
/// queue pair authenticated, and `bdev_nvme_set_options` narrows what is offered (SHA-256 / ffdhe2048 instead
/// of SPDK's pick of SHA-512 / ffdhe8192).
#[test]
fn dhchap_with_spdk_storage_node() {
    if lab::target::spdk_peer().is_none() {
        eprintln!("skipped: no SPDK peer build");
        return;
    }
    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:6a0c3f0e-1d2b-4c5a-9e8f-0123456789ab";
    let dir = std::env::temp_dir().join(format!("bdev-nvme-dhchap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key0 = key_file(&dir, "key0", &dhchap_secret(32, 1, 1));
    let ckey0 = key_file(&dir, "ckey0", &dhchap_secret(48, 2, 2));
    let wrong = key_file(&dir, "wrong", &dhchap_secret(32, 1, 3));
    let port = free_port();
    spdk_locked_node_config(
        &dir,
        &port,
        false,
        &[("key0", &key0), ("ckey0", &ckey0)],
        vec![json!({"nqn": NQN, "host": HOST, "dhchap_key": "key0", "dhchap_ctrlr_key": "ckey0"})],
    );
    let s = lab::target::SpdkTgt::start(&dir, "spdk");
    let c = Tgt::start("nvme-dhchap-compute", &[]);
    for (name, path) in [("key0", &key0), ("ckey0", &ckey0), ("wrong", &wrong)] {
        c.ok(&["keyring_file_add_key", name, path]);
    }
    let attach = |extra: &[&str]| -> Vec<String> {
        let mut a = attach_args(&port);
        a.extend(["-q", HOST].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let refused = |extra: &[&str], want: &str| {
        let a = attach(extra);
        let e = c.err(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let msg = e["message"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{extra:?}: wanted '{want}', got {e}");
        e
    };
    // The target requires authentication of this host: no key is refused.
    refused(&[], "Required key not available");
    // A key name the keyring does not have: SPDK's -ENOKEY.
    let e = refused(&["--dhchap-key", "nokey"], "Required key not available");
    assert_eq!(e["code"], -126, "{e}");
    // A wrong secret: the target sends AUTH_Failure1.
    refused(&["--dhchap-key", "wrong"], "Permission denied");
    // The right host key with a wrong controller key: the target's R2 does not verify.
    refused(
        &["--dhchap-key", "key0", "--dhchap-ctrlr-key", "wrong"],
        "Permission denied",
    );
    assert!(c.ok(&["bdev_get_bdevs"]).as_array().unwrap().is_empty());
    // The right keys, both ways.
    c.ok(
        &attach(&["--dhchap-key", "key0", "--dhchap-ctrlr-key", "ckey0"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    // Metadata written and read over the I/O queue (which authenticated on its own).
    c.ok(&["bdev_lvol_create_lvstore", "Nvme0n1", "lvs0"]);
    let lvs = c.ok(&["bdev_lvol_get_lvstores"]);
    assert_eq!(lvs[0]["name"], "lvs0", "{lvs}");
    let qpairs = s.call("nvmf_subsystem_get_qpairs", json!({"nqn": NQN}));
    let qpairs = qpairs.as_array().unwrap();
    assert!(qpairs.len() >= 2, "admin and I/O queue pairs: {qpairs:?}");
    for q in qpairs {
        assert_eq!(q["auth"]["state"], "completed", "{q}");
        assert_eq!(
            (q["auth"]["digest"].as_str(), q["auth"]["dhgroup"].as_str()),
            (Some("sha512"), Some("ffdhe8192")),
            "{q}"
        );
    }
    let keys = c.ok(&["keyring_get_keys"]);
    let key = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "key0")
        .unwrap();
    assert_eq!(
        key["refcnt"], 2,
        "the keyring and the controller hold it: {keys}"
    );
    let saved = c.ok(&["save_config"]);
    let (bdev_cfg, _) = common::subsystem_config(&saved, "bdev");
    let entry = bdev_cfg
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["method"] == "bdev_nvme_attach_controller")
        .unwrap();
    assert_eq!(
        (
            &entry["params"]["dhchap_key"],
            &entry["params"]["dhchap_ctrlr_key"]
        ),
        (&json!("key0"), &json!("ckey0"))
    );
    // Narrower offers: SPDK picks among them.
    c.ok(&["bdev_nvme_detach_controller", "Nvme0"]);
    c.ok(&[
        "bdev_nvme_set_options",
        "--dhchap-digests",
        "sha256",
        "--dhchap-dhgroups",
        "ffdhe2048",
    ]);
    c.ok(&attach(&["--dhchap-key", "key0"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    c.ok(&["bdev_lvol_get_lvstores"]);
    let qpairs = s.call("nvmf_subsystem_get_qpairs", json!({"nqn": NQN}));
    let q = &qpairs[0];
    assert_eq!(
        (q["auth"]["digest"].as_str(), q["auth"]["dhgroup"].as_str()),
        (Some("sha256"), Some("ffdhe2048")),
        "{q}"
    );
    c.stop();
    s.stop();
    let _ = std::fs::remove_dir_all(dir);
}

/// A TLS PSK in interchange format: `len` bytes (32: SHA-256 suite, 48: SHA-384) with hash `xx`.
fn tls_psk_text(len: usize, xx: u8, seed: u8) -> String {
    let key: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(31) ^ seed).collect();
    nvme_tls::ConfiguredPsk::new(key, xx).unwrap().to_text()
}

/// NVMe/TCP over TLS against SPDK v24.05's target, whose listener requires a secure channel: attaching without
/// a PSK, with a wrong one, or naming no key is refused with a clear error; with the right keyring key the admin
/// and I/O queues run over TLS 1.3 (an lvstore is written, then found again over a second host's connection
/// that uses the SHA-384 suite); the deprecated key-file form works; `save_config` writes `psk`.
#[test]
fn tls_with_spdk_storage_node() {
    if lab::target::spdk_peer().is_none() {
        eprintln!("skipped: no SPDK peer build");
        return;
    }
    const HOST1: &str = "nqn.2014-08.org.nvmexpress:uuid:6a0c3f0e-1d2b-4c5a-9e8f-0123456789a1";
    const HOST2: &str = "nqn.2014-08.org.nvmexpress:uuid:6a0c3f0e-1d2b-4c5a-9e8f-0123456789a2";
    let dir = std::env::temp_dir().join(format!("bdev-nvme-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Hash 00 (the configured PSK is the retained PSK); keys with hash 01/02, which SPDK derives with the host
    // NQN, are what its initiators use against our target (nvmf_spdk_initiator).
    let key0 = key_file(&dir, "key0", &tls_psk_text(32, 0, 1));
    let key1 = key_file(&dir, "key1", &tls_psk_text(48, 0, 2));
    let wrong = key_file(&dir, "wrong", &tls_psk_text(32, 0, 3));
    let port = free_port();
    spdk_locked_node_config(
        &dir,
        &port,
        true,
        &[("key0", &key0), ("key1", &key1)],
        vec![
            json!({"nqn": NQN, "host": HOST1, "psk": "key0"}),
            json!({"nqn": NQN, "host": HOST2, "psk": "key1"}),
        ],
    );
    let s = lab::target::SpdkTgt::start(&dir, "spdk-tls");
    let c = Tgt::start("nvme-tls-compute", &[]);
    for (name, path) in [("key0", &key0), ("key1", &key1), ("wrong", &wrong)] {
        c.ok(&["keyring_file_add_key", name, path]);
    }
    let attach = |name: &str, host: &str, extra: &[&str]| -> Vec<String> {
        let mut a = attach_args(&port);
        a[2] = name.to_string();
        a.extend(["-q", host].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let refused = |extra: &[&str], want: &str| {
        let a = attach("Nvme0", HOST1, extra);
        let e = c.err(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let msg = e["message"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{extra:?}: wanted '{want}', got {e}");
        e
    };
    // The listener speaks TLS only: NVMe/TCP in the clear gets nowhere.
    refused(&[], "");
    // The wrong key: SPDK's server finds the identity, but the binder does not verify.
    refused(&["--psk", "wrong"], "");
    // SPDK v24.05 as released asks OpenSSL for HKDF with a NULL salt, which Debian 12's OpenSSL 3.0 refuses,
    // so its TLS works with no key at all; SPDK fixed it later (an empty salt, include/spdk_internal/nvme_tcp.h).
    let log = std::fs::read_to_string(dir.join("spdk-tls/target.log")).unwrap_or_default();
    if log.contains("Unable to set salt for HKDF") {
        eprintln!(
            "skipped: this SPDK peer build cannot derive TLS PSKs (v24.05 with OpenSSL 3.0: backport SPDK's \
             empty-salt fix to include/spdk_internal/nvme_tcp.h and rebuild)"
        );
        c.stop();
        s.stop();
        return;
    }
    // Neither a key name nor a key file: SPDK's -EACCES; a key file others may read: -EPERM.
    let e = refused(&["--psk", "nokey"], "Permission denied");
    assert_eq!(e["code"], -13, "{e}");
    let open = write_file(&dir, "open", &tls_psk_text(32, 0, 1));
    let e = refused(
        &["--psk", &open.to_string_lossy()],
        "Operation not permitted",
    );
    assert_eq!(e["code"], -1, "{e}");
    // A key that is not in interchange format.
    let junk = key_file(&dir, "junk", "NVMeTLSkey-1:01:notbase64:\n");
    let e = refused(&["--psk", &junk], "Invalid argument");
    assert_eq!(e["code"], -22, "{e}");
    assert!(c.ok(&["bdev_get_bdevs"]).as_array().unwrap().is_empty());
    // The right key (SHA-256 suite): metadata written and read over the TLS I/O queue.
    c.ok(&attach("Nvme0", HOST1, &["--psk", "key0"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    c.ok(&["bdev_lvol_create_lvstore", "Nvme0n1", "lvs0"]);
    c.ok(&["bdev_lvol_create", "-l", "lvs0", "v0", "4"]);
    let qpairs = s.call("nvmf_subsystem_get_qpairs", json!({"nqn": NQN}));
    assert!(qpairs.as_array().unwrap().len() >= 2, "{qpairs}");
    let saved = c.ok(&["save_config"]);
    let (bdev_cfg, _) = common::subsystem_config(&saved, "bdev");
    let entry = bdev_cfg
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["method"] == "bdev_nvme_attach_controller")
        .unwrap();
    assert_eq!(entry["params"]["psk"], "key0", "{entry}");
    c.ok(&["bdev_nvme_detach_controller", "Nvme0"]);
    // The second host's key is 48 bytes: TLS_AES_256_GCM_SHA384. The lvstore comes back over it.
    c.ok(&attach("Nvme1", HOST2, &["--psk", "key1"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let lvs = c.ok(&["bdev_lvol_get_lvstores"]);
        if lvs[0]["name"] == "lvs0" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{lvs}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let lvols = c.ok(&["bdev_lvol_get_lvols"]);
    assert_eq!(lvols[0]["name"], "v0", "{lvols}");
    c.ok(&["bdev_nvme_detach_controller", "Nvme1"]);
    // The deprecated form: the path of the key file itself.
    c.ok(&attach("Nvme2", HOST1, &["--psk", &key0])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    c.ok(&["bdev_nvme_detach_controller", "Nvme2"]);
    c.stop();
    s.stop();
    let _ = std::fs::remove_dir_all(dir);
}

/// Our compute node and our storage node over TLS: the storage node's `secure_channel` listener and host PSKs
/// (hash 01: both ends derive the retained PSK from the host NQN), the compute node attaching with the same key
/// from its keyring; an lvstore written through the TLS queues survives a controller reset (every queue pair
/// reconnects through a new handshake) and a detach and re-attach.
#[test]
fn tls_between_our_nodes() {
    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:6a0c3f0e-1d2b-4c5a-9e8f-0123456789b1";
    let s = Tgt::start("nvme-tls-storage", &[]);
    let key = key_file(&s.dir, "key0", &tls_psk_text(32, 1, 5));
    let port = free_port();
    s.ok(&["keyring_file_add_key", "key0", &key]);
    for (m, mut p) in export_calls(&port, None) {
        if m == "nvmf_create_subsystem" {
            p["allow_any_host"] = json!(false);
        }
        if m == "nvmf_subsystem_add_listener" {
            p["secure_channel"] = json!(true);
        }
        let r = s.call(m, p);
        assert!(r.get("error").is_none(), "{m}: {r}");
    }
    s.ok(&["nvmf_subsystem_add_host", NQN, HOST, "--psk", "key0"]);
    let c = Tgt::start("nvme-tls-compute2", &[]);
    let ckey = key_file(&c.dir, "key0", &tls_psk_text(32, 1, 5));
    c.ok(&["keyring_file_add_key", "key0", &ckey]);
    let mut a = attach_args(&port);
    a.extend(["-q", HOST, "--psk", "key0"].map(String::from));
    let argv: Vec<&str> = a.iter().map(String::as_str).collect();
    c.ok(&argv);
    c.ok(&["bdev_lvol_create_lvstore", "Nvme0n1", "lvs0"]);
    c.ok(&["bdev_lvol_create", "-l", "lvs0", "v0", "4"]);
    c.ok(&["bdev_nvme_reset_controller", "Nvme0"]);
    c.ok(&["bdev_lvol_create", "-l", "lvs0", "v1", "4"]);
    let ctrlrs = c.ok(&["bdev_nvme_get_controllers", "-n", "Nvme0"]);
    assert_eq!(ctrlrs[0]["ctrlrs"][0]["state"], "enabled", "{ctrlrs}");
    c.ok(&["bdev_nvme_detach_controller", "Nvme0"]);
    c.ok(&argv);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let lvols = c.ok(&["bdev_lvol_get_lvols"]);
        if lvols.as_array().unwrap().len() == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{lvols}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (st, _) = c.stop();
    assert!(st.success());
    let (st, _) = s.stop();
    assert!(st.success());
}

/// Two storage nodes export namespaces that agree on NGUID and EUI-64 but not on their UUID (the
/// Namespace Identification Descriptor list): a second path from the other node is refused as SPDK refuses it,
/// and the bdev keeps its one good path.
#[test]
fn a_path_to_a_namespace_with_another_uuid_is_refused() {
    let ports = [free_port(), free_port()];
    let nodes: Vec<Tgt> = ["nvme-uuid-a", "nvme-uuid-b"]
        .iter()
        .zip(&ports)
        .zip([
            "6f3c4b8e-0d51-4a5b-8d7e-1a2b3c4d5e6f",
            "0b7e0a21-6f64-4f0e-9b9e-7c0de5a1b2c3",
        ])
        .map(|((tag, port), uuid)| {
            let n = Tgt::start(tag, &[]);
            for (m, mut p) in export_calls(port, None) {
                if m == "nvmf_subsystem_add_ns" {
                    p["namespace"]["nguid"] = json!("000102030405060708090A0B0C0D0E0F");
                    p["namespace"]["eui64"] = json!("0011223344556677");
                    p["namespace"]["uuid"] = json!(uuid);
                }
                let r = n.call(m, p);
                assert!(r.get("error").is_none(), "{m}: {r}");
            }
            n
        })
        .collect();
    let c = Tgt::start("nvme-uuid-compute", &[]);
    let argv = |a: &[String]| a.iter().map(String::clone).collect::<Vec<_>>();
    let first = argv(&attach_args(&ports[0]));
    c.ok(&first.iter().map(String::as_str).collect::<Vec<_>>());
    let mut second = argv(&attach_args(&ports[1]));
    second.extend(["-x", "multipath"].map(String::from));
    let e = c.err(&second.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(e["code"], -22, "{e}");
    let b = c.ok(&["bdev_get_bdevs", "-b", "Nvme0n1"]);
    assert_eq!(
        b[0]["driver_specific"]["nvme"].as_array().unwrap().len(),
        1,
        "{b}"
    );
    // The bdev's UUID is the namespace's NGUID, as SPDK names it.
    assert_eq!(b[0]["uuid"], "00010203-0405-0607-0809-0a0b0c0d0e0f", "{b}");
    c.stop();
    for n in nodes {
        n.stop();
    }
}
