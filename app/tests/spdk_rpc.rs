#![recursion_limit = "512"]
//! spdk_tgt driven by the official `spdk-rpc` client, as an operator types it; results checked field by field
//! against SPDK's documented output, and bad input checked for the right error while the target keeps serving.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[test]
fn malloc_lifecycle_and_bdev_get_bdevs_fields() {
    let t = Tgt::start("malloc", &[]);
    assert_eq!(
        t.ok(&["bdev_malloc_create", "-b", "Malloc0", "64", "512"]),
        json!("Malloc0")
    );
    let uuid = "6e8c2fa0-34b5-4b0b-8f34-3fd4c0e3c6a1";
    assert_eq!(
        t.ok(&[
            "bdev_malloc_create",
            "-b",
            "Malloc1",
            "-u",
            uuid,
            "8",
            "4096"
        ]),
        json!("Malloc1")
    );
    assert_eq!(
        t.ok(&["bdev_get_bdevs", "-b", uuid])[0]["name"],
        "Malloc1",
        "lookup by uuid"
    );
    let v = t.ok(&["bdev_get_bdevs", "-b", "Malloc0"]);
    let b = &v[0];
    assert_eq!(b["name"], "Malloc0");
    assert_eq!(b["product_name"], "Malloc disk");
    assert_eq!(b["block_size"], 512);
    assert_eq!(b["num_blocks"], 131072);
    assert_eq!(b["claimed"], false);
    assert_eq!(b["zoned"], false);
    assert_eq!(b["aliases"], json!([b["uuid"]]));
    assert_eq!(b["supported_io_types"]["read"], true);
    assert_eq!(b["supported_io_types"]["write_zeroes"], true);
    assert_eq!(b["supported_io_types"]["nvme_admin"], false);
    assert!(b["uuid"].as_str().unwrap().len() == 36);
    assert_eq!(b["driver_specific"], json!({}));
    let all = t.ok(&["bdev_get_bdevs"]);
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(
        t.ok(&["bdev_null_create", "Null0", "16", "4096"]),
        json!("Null0")
    );
    let n = t.ok(&["bdev_get_bdevs", "-b", "Null0"]);
    assert_eq!(n[0]["num_blocks"], 4096);
    assert_eq!(n[0]["product_name"], "Null disk");
    t.ok(&["bdev_null_resize", "Null0", "32"]);
    assert_eq!(
        t.ok(&["bdev_get_bdevs", "-b", "Null0"])[0]["num_blocks"],
        8192
    );
    let st = t.ok(&["bdev_get_iostat", "--names", "Malloc0"]);
    assert!(st["tick_rate"].as_u64().unwrap() > 0);
    assert_eq!(st["bdevs"][0]["name"], "Malloc0");
    // Examiners (raid) read a superblock from every new bdev, as in SPDK, so reads are not necessarily 0.
    assert!(st["bdevs"][0]["num_read_ops"].is_u64());
    for k in [
        "bytes_read",
        "bytes_written",
        "num_write_ops",
        "bytes_unmapped",
        "read_latency_ticks",
        "max_write_latency_ticks",
        "min_read_latency_ticks",
    ] {
        assert!(st["bdevs"][0].get(k).is_some(), "iostat lacks {k}");
    }
    t.ok(&["bdev_malloc_delete", "Malloc0"]);
    t.ok(&["bdev_null_delete", "Null0"]);
    let e = t.err(&["bdev_get_bdevs", "-b", "Malloc0"]);
    assert_eq!(e["code"], -19);
    assert_eq!(e["message"], "No such device");
    let (st, _) = t.stop();
    assert!(st.success());
}

#[test]
fn bad_input_gets_spdk_errors_and_target_keeps_serving() {
    let t = Tgt::start("errors", &[]);
    t.ok(&["bdev_malloc_create", "-b", "M0", "8", "512"]);
    let e = t.err(&["bdev_malloc_create", "-b", "M0", "8", "512"]);
    assert_eq!(
        (e["code"].clone(), e["message"].clone()),
        (json!(-17), json!("File exists"))
    );
    let e = t.err(&["bdev_malloc_delete", "nope"]);
    assert_eq!(e["code"], -19);
    let e = t.err(&["bdev_malloc_create", "-b", "M1", "8", "520"]);
    assert_eq!(e["code"], -22, "block size not a multiple of 512");
    // Raw requests for what the client cannot send.
    // A size past 2^64 bytes: refused as malloc refuses it, nothing registered.
    let r = t.call(
        "bdev_null_create",
        json!({"name": "Nbig", "num_blocks": 1u64 << 62, "block_size": 4096}),
    );
    assert_eq!(r["error"]["code"], -22, "{r}");
    assert!(t.err(&["bdev_get_bdevs", "-b", "Nbig"])["code"] == -19);
    // A strip of 2^31 KiB is a power of two, but its block count does not fit the superblock's u32.
    t.ok(&["bdev_malloc_create", "-b", "R0", "8", "512"]);
    t.ok(&["bdev_malloc_create", "-b", "R1", "8", "512"]);
    let e = t.err(&[
        "bdev_raid_create",
        "-n",
        "Rbig",
        "-r",
        "raid0",
        "-z",
        "2147483648",
        "-b",
        "R0 R1",
    ]);
    assert_eq!(e["code"], -22, "{e}");
    assert!(t.err(&["bdev_get_bdevs", "-b", "Rbig"])["code"] == -19);
    let r = t.call("no_such_method", json!({}));
    assert_eq!(r["error"]["code"], -32601);
    let r = t.call(
        "bdev_malloc_create",
        json!({"name": "M2", "num_blocks": "eight", "block_size": 512}),
    );
    assert_eq!(r["error"]["code"], -32602);
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("num_blocks"),
        "{r}"
    );
    let r = t.call(
        "bdev_malloc_create",
        json!({"name": "M2", "num_blocks": 8, "block_size": 512, "bogus": 1}),
    );
    assert!(
        r["error"]["message"].as_str().unwrap().contains("bogus"),
        "{r}"
    );
    let r = t.call("bdev_malloc_create", json!({"name": "M2"}));
    assert_eq!(r["error"]["code"], -32602);
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("num_blocks"),
        "{r}"
    );
    let r = t.call(
        "bdev_malloc_create",
        json!({"name": "M2", "num_blocks": 0, "block_size": 512}),
    );
    assert_eq!(r["error"]["code"], -22);
    // Malformed JSON: parse error, then the target still answers others.
    let mut s = UnixStream::connect(&t.sock).unwrap();
    s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"spdk_get_version\"} }{ garbage")
        .unwrap();
    let v = read_value(&mut s);
    assert_eq!(v["result"]["fields"]["major"], 24);
    // A request cut off mid-way by a client that disconnects.
    {
        let mut s = UnixStream::connect(&t.sock).unwrap();
        s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"bdev_get_bd")
            .unwrap();
    }
    // A client that disconnects before reading a large response.
    for i in 0..200 {
        t.call(
            "bdev_null_create",
            json!({"name": format!("N{i}"), "num_blocks": 16, "block_size": 512}),
        );
    }
    {
        let mut s = UnixStream::connect(&t.sock).unwrap();
        s.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"bdev_get_bdevs"}"#)
            .unwrap();
    }
    let v = t.ok(&["bdev_get_bdevs"]);
    // M0, R0, R1 and the 200 null bdevs.
    assert_eq!(v.as_array().unwrap().len(), 203);
    let r = t.call("bdev_get_bdevs", json!({"name": "M0"}));
    assert_eq!(r["result"][0]["name"], "M0");
    let (st, _) = t.stop();
    assert!(st.success());
}

#[test]
fn many_clients_at_once() {
    let t = Tgt::start("clients", &[]);
    let sock = t.sock.clone();
    let threads: Vec<_> = (0..8)
        .map(|c| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                for i in 0..125 {
                    let name = format!("C{c}_{i}");
                    let req = json!({"jsonrpc":"2.0","id": i,"method":"bdev_null_create","params":{"name": name,"num_blocks":8,"block_size":512}});
                    s.write_all(req.to_string().as_bytes()).unwrap();
                    let v = read_value(&mut s);
                    assert_eq!(v["id"], i);
                    assert_eq!(v["result"], json!(name));
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    assert_eq!(t.ok(&["bdev_get_bdevs"]).as_array().unwrap().len(), 1000);
}

#[test]
fn save_config_restart_and_load_config_round_trip() {
    let t = Tgt::start("save", &[]);
    t.ok(&["bdev_malloc_create", "-b", "Malloc0", "32", "512"]);
    t.ok(&["bdev_malloc_create", "-b", "Malloc1", "16", "4096"]);
    t.ok(&["bdev_null_create", "Null0", "8", "512"]);
    t.ok(&["log_set_flag", "bdev"]);
    let saved = t.ok(&["save_config"]);
    let subs: Vec<&str> = saved["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["subsystem"].as_str().unwrap())
        .collect();
    assert!(
        subs.contains(&"bdev") && subs.contains(&"iobuf") && subs.contains(&"sock"),
        "{subs:?}"
    );
    let (_, methods) = common::subsystem_config(&saved, "bdev");
    assert_eq!(
        methods.first().map(String::as_str),
        Some("bdev_set_options")
    );
    assert_eq!(
        methods.last().map(String::as_str),
        Some("bdev_wait_for_examine")
    );
    assert_eq!(
        methods
            .iter()
            .filter(|m| **m == "bdev_malloc_create")
            .count(),
        2
    );
    let path = write_file(
        &std::env::temp_dir(),
        &format!("spdk-rs-saved-{}.json", std::process::id()),
        &serde_json::to_string_pretty(&saved).unwrap(),
    );
    let (st, _) = t.stop();
    assert!(st.success());

    let t2 = Tgt::start("restart", &["-c", path.to_str().unwrap()]);
    let again = t2.ok(&["save_config"]);
    assert_eq!(
        again, saved,
        "save -> restart -c -> save gives the same document"
    );
    assert_eq!(
        t2.ok(&["bdev_get_bdevs", "-b", "Malloc1"])[0]["block_size"],
        4096
    );
    drop(t2);

    // spdk-rpc load_config replays it from the client side into a fresh target started with --wait-for-rpc.
    let t3 = Tgt::start("load", &["--wait-for-rpc"]);
    let o = std::process::Command::new("spdk-rpc")
        .arg("-s")
        .arg(&t3.sock)
        .arg("load_config")
        .arg("-j")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "load_config: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(t3.ok(&["save_config"]), saved);
    let _ = std::fs::remove_file(path);
}

#[test]
fn wait_for_rpc_state_machine() {
    let t = Tgt::start("wait", &["--wait-for-rpc"]);
    let e = t.err(&["bdev_malloc_create", "-b", "M", "8", "512"]);
    assert_eq!(e["code"], -1, "runtime method before init");
    t.ok(&["bdev_set_options", "-p", "4096", "-c", "128"]);
    let methods = t.ok(&["rpc_get_methods", "--current"]);
    assert!(methods
        .as_array()
        .unwrap()
        .contains(&json!("framework_start_init")));
    assert!(!methods
        .as_array()
        .unwrap()
        .contains(&json!("bdev_malloc_create")));
    t.ok(&["framework_start_init"]);
    t.ok(&["framework_wait_init"]);
    let e = t.err(&["bdev_set_options", "-p", "4096"]);
    assert_eq!(e["code"], -1, "startup-only method after init");
    t.ok(&["bdev_malloc_create", "-b", "M", "8", "512"]);
    let opts = t.ok(&["framework_get_config", "bdev"]);
    assert_eq!(opts[0]["params"]["bdev_io_pool_size"], 4096);
}

#[test]
fn framework_thread_and_log_methods() {
    let mut t = Tgt::start("framework", &[]);
    let v = t.ok(&["spdk_get_version"]);
    assert_eq!(v["fields"]["major"], 24);
    let r = t.ok(&["framework_get_reactors"]);
    assert!(r["tick_rate"].as_u64().unwrap() > 0);
    assert_eq!(r["reactors"][0]["lcore"], 0);
    assert_eq!(r["reactors"][0]["lw_threads"][0]["name"], "app_thread");
    assert!(
        r["reactors"][0]["lw_threads"][0]["elapsed"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(r["reactors"][0]["tid"].as_u64().unwrap() > 0);
    assert!(
        r["reactors"][0]["busy"].as_u64().unwrap() + r["reactors"][0]["idle"].as_u64().unwrap() > 0
    );
    let s = t.ok(&["thread_get_stats"]);
    assert_eq!(s["threads"][0]["name"], "app_thread");
    assert!(s["threads"][0]["timed_pollers_count"].as_u64().unwrap() >= 1);
    let p = t.ok(&["thread_get_pollers"]);
    let rpc_poller = p["threads"][0]["timed_pollers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "app_rpc")
        .cloned()
        .expect("the RPC poller is a timed poller, as SPDK's");
    assert!(rpc_poller["period_ticks"].as_u64().unwrap() > 0);
    assert!(rpc_poller["run_count"].as_u64().unwrap() > 0);
    let subs = t.ok(&["framework_get_subsystems"]);
    assert!(subs
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["subsystem"] == "bdev"));
    t.ok(&["log_set_flag", "bdev"]);
    assert_eq!(t.ok(&["log_get_flags"])["bdev"], true);
    t.ok(&["log_clear_flag", "bdev"]);
    assert_eq!(t.ok(&["log_get_flags"])["bdev"], false);
    t.ok(&["log_set_level", "DEBUG"]);
    assert_eq!(t.ok(&["log_get_level"]), json!("DEBUG"));
    t.ok(&["log_set_print_level", "ERROR"]);
    assert_eq!(t.ok(&["log_get_print_level"]), json!("ERROR"));
    assert_eq!(t.err(&["log_set_flag", "no_such_flag"])["code"], -32602);
    let mut child = t.child.take().unwrap();
    t.ok(&["spdk_kill_instance", "SIGTERM"]);
    let st = wait_timeout(&mut child, Duration::from_secs(20));
    assert!(st.success());
    assert!(!t.sock.exists(), "socket removed on shutdown");
}

#[test]
fn command_line_and_config_errors_exit_nonzero_with_a_message() {
    let o = std::process::Command::new(bin())
        .arg("--bogus")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--bogus"));
    let o = std::process::Command::new(bin())
        .arg("-h")
        .output()
        .unwrap();
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--cpumask"));
    let dir = std::env::temp_dir();
    let bad = write_file(
        &dir,
        &format!("spdk-rs-bad-{}.json", std::process::id()),
        r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_malloc_create","params":{"name":"M","num_blocks":8,"block_size":100}}]}]}"#,
    );
    let e = Tgt::try_start("badcfg", &["-c", bad.to_str().unwrap()])
        .err()
        .expect("exits");
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("bdev_malloc_create"),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
    let t = Tgt::start(
        "ignore",
        &["-c", bad.to_str().unwrap(), "--json-ignore-init-errors"],
    );
    assert_eq!(t.ok(&["bdev_get_bdevs"]), json!([]));
    let garbage = write_file(
        &dir,
        &format!("spdk-rs-garbage-{}.json", std::process::id()),
        "{ not json",
    );
    let o = std::process::Command::new(bin())
        .args(["-c", garbage.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid JSON"));
}

#[test]
fn spdk_saved_config_with_foreign_subsystems_loads_and_round_trips() {
    // The shape of a save_config from a default SPDK v24 spdk_tgt with one malloc bdev.
    let cfg = json!({"subsystems": [
        {"subsystem": "keyring", "config": []},
        {"subsystem": "iobuf", "config": [{"method": "iobuf_set_options", "params": {"small_pool_count": 8192, "large_pool_count": 1024, "small_bufsize": 8192, "large_bufsize": 135168}}]},
        {"subsystem": "sock", "config": [{"method": "sock_set_default_impl", "params": {"impl_name": "posix"}},
            {"method": "sock_impl_set_options", "params": {"impl_name": "posix", "recv_buf_size": 2097152, "send_buf_size": 2097152, "enable_recv_pipe": true, "enable_quickack": false, "enable_placement_id": 0, "enable_zerocopy_send_server": true, "enable_zerocopy_send_client": false, "zerocopy_threshold": 0, "tls_version": 0, "enable_ktls": false}}]},
        {"subsystem": "vmd", "config": []},
        {"subsystem": "accel", "config": [{"method": "accel_set_options", "params": {"small_cache_size": 128, "large_cache_size": 16, "task_count": 2048, "sequence_count": 2048, "buf_count": 2048}}]},
        {"subsystem": "bdev", "config": [
            {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 65535, "bdev_io_cache_size": 256, "bdev_auto_examine": true, "iobuf_small_cache_size": 128, "iobuf_large_cache_size": 16}},
            {"method": "bdev_raid_set_options", "params": {"process_window_size_kb": 1024}},
            {"method": "bdev_iscsi_set_options", "params": {"timeout_sec": 30}},
            {"method": "bdev_nvme_set_options", "params": {"action_on_timeout": "none", "timeout_us": 0, "timeout_admin_us": 0, "keep_alive_timeout_ms": 10000, "arbitration_burst": 0, "low_priority_weight": 0, "medium_priority_weight": 0, "high_priority_weight": 0, "nvme_adminq_poll_period_us": 10000, "nvme_ioq_poll_period_us": 0, "io_queue_requests": 0, "delay_cmd_submit": true, "transport_retry_count": 4, "bdev_retry_count": 3, "transport_ack_timeout": 0, "ctrlr_loss_timeout_sec": 0, "reconnect_delay_sec": 0, "fast_io_fail_timeout_sec": 0, "disable_auto_failback": false, "generate_uuids": false, "transport_tos": 0, "nvme_error_stat": false, "rdma_srq_size": 0, "io_path_stat": false, "allow_accel_sequence": false, "rdma_max_cq_size": 0, "rdma_cm_event_timeout_ms": 0}},
            {"method": "bdev_nvme_set_hotplug", "params": {"period_us": 100000, "enable": false}},
            {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 65536, "block_size": 512, "physical_block_size": 512, "uuid": "3a1e4b8c-9d2f-4e6a-8b7c-1d2e3f4a5b6c", "optimal_io_boundary": 0, "md_size": 0, "dif_type": 0, "dif_is_head_of_md": false, "dif_pi_format": 0}},
            {"method": "bdev_wait_for_examine"}]},
        {"subsystem": "scsi", "config": null},
        {"subsystem": "scheduler", "config": [{"method": "framework_set_scheduler", "params": {"name": "static"}}]},
        {"subsystem": "vhost_scsi", "config": []},
        {"subsystem": "vhost_blk", "config": []},
        {"subsystem": "ublk", "config": []},
        {"subsystem": "nbd", "config": []},
        {"subsystem": "nvmf", "config": [{"method": "nvmf_set_config", "params": {"discovery_filter": "match_any", "admin_cmd_passthru": {"identify_ctrlr": false}}}, {"method": "nvmf_set_max_subsystems", "params": {"max_subsystems": 1024}}, {"method": "nvmf_set_crdt", "params": {"crdt1": 0, "crdt2": 0, "crdt3": 0}}]},
        {"subsystem": "iscsi", "config": [{"method": "iscsi_set_options", "params": {"node_base": "iqn.2016-06.io.spdk", "max_sessions": 128, "max_connections_per_session": 2, "max_queue_depth": 64, "default_time2wait": 2, "default_time2retain": 20, "first_burst_length": 8192, "immediate_data": true, "allow_duplicated_isid": false, "error_recovery_level": 0, "nop_timeout": 60, "nop_in_interval": 30, "disable_chap": false, "require_chap": false, "mutual_chap": false, "chap_group": 0, "max_large_datain_per_connection": 64, "max_r2t_per_connection": 4, "pdu_pool_size": 36864, "immediate_data_pool_size": 16384, "data_out_pool_size": 2048}}]}
    ]});
    let dir = std::env::temp_dir();
    let path = write_file(
        &dir,
        &format!("spdk-rs-v24-{}.json", std::process::id()),
        &cfg.to_string(),
    );
    let t = Tgt::start("v24cfg", &["-c", path.to_str().unwrap()]);
    let b = t.ok(&["bdev_get_bdevs", "-b", "Malloc0"]);
    assert_eq!(b[0]["uuid"], "3a1e4b8c-9d2f-4e6a-8b7c-1d2e3f4a5b6c");
    let saved = t.ok(&["save_config"]);
    let find = |sub: &str, method: &str| -> Value {
        saved["subsystems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["subsystem"] == sub)
            .and_then(|s| {
                s["config"]
                    .as_array()
                    .and_then(|c| c.iter().find(|e| e["method"] == method).cloned())
            })
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        find("iobuf", "iobuf_set_options")["params"]["small_pool_count"],
        8192
    );
    assert_eq!(
        find("bdev", "bdev_nvme_set_options")["params"]["keep_alive_timeout_ms"],
        10000
    );
    assert_eq!(
        find("bdev", "bdev_raid_set_options")["params"]["process_window_size_kb"],
        1024
    );
    assert_eq!(
        find("iscsi", "iscsi_set_options")["params"]["max_sessions"],
        128
    );
    assert_eq!(
        find("scheduler", "framework_set_scheduler")["params"]["name"],
        "static"
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn rpcs_allowed_pidfile_and_deleting_a_claimed_base() {
    let pid = std::env::temp_dir().join(format!("spdk-rs-pid-{}", std::process::id()));
    let t = Tgt::start(
        "allowed",
        &["--rpcs-allowed", "bdev_malloc_create,bdev_malloc_delete,bdev_get_bdevs,bdev_error_create,spdk_get_version", "-f", pid.to_str().unwrap()],
    );
    let written: u32 = std::fs::read_to_string(&pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        written,
        t.child.as_ref().unwrap().id(),
        "pidfile holds our pid"
    );
    let e = t.err(&["bdev_null_create", "N", "8", "512"]);
    assert_eq!(e["code"], -32601, "not in --rpcs-allowed");
    t.ok(&["bdev_malloc_create", "-b", "Base", "8", "512"]);
    t.ok(&["bdev_error_create", "Base"]);
    assert_eq!(t.ok(&["bdev_get_bdevs", "-b", "Base"])[0]["claimed"], true);
    // Deleting a claimed base hot-removes it from its owner, as SPDK does: both go away.
    t.ok(&["bdev_malloc_delete", "Base"]);
    assert_eq!(t.ok(&["bdev_get_bdevs"]), json!([]));
    let (st, _) = t.stop();
    assert!(st.success());
    assert!(!pid.exists(), "pidfile removed on exit");
}

/// A client that connects while `spdk_tgt` is still loading its config is answered once the load is over (SPDK
/// v24.05 pauses its RPC server likewise), so it never sees a half-configured target. Here the config's attach
/// to a controller that accepts the connection and never answers takes its 300 ms timeout (ignored with
/// `--json-ignore-init-errors`), and the first answer already lists the bdev the config creates after it.
#[test]
fn clients_are_answered_once_the_config_is_loaded() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let null_bdev = |name: &str| {
        json!({"method": "bdev_null_create",
            "params": {"name": name, "num_blocks": 8, "block_size": 512}})
    };
    let cfg = json!({"subsystems": [{"subsystem": "bdev", "config": [
        null_bdev("before"),
        {"method": "bdev_nvme_attach_controller", "params": {"name": "silent", "trtype": "tcp",
            "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": port.to_string(),
            "subnqn": "nqn.2016-06.io.spdk:silent", "fabrics_connect_timeout_us": 300000}},
        null_bdev("after"),
    ]}]});
    let dir = std::env::temp_dir();
    let file = write_file(
        &dir,
        &format!("spdk-rs-slow-config-{}.json", std::process::id()),
        &cfg.to_string(),
    );
    let t = Tgt::start_listening(
        "slow-config",
        &["-c", file.to_str().unwrap(), "--json-ignore-init-errors"],
    );
    // The very first call, sent as soon as the socket listens.
    let r = t.call("bdev_get_bdevs", Value::Null);
    let mut names: Vec<&str> = r["result"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["after", "before"], "{r}");
    let (st, _) = t.stop();
    assert!(st.success());
    let _ = std::fs::remove_file(file);
}
