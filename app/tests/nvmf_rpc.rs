//! The NVMe-oF target's RPCs through SPDK's own client (`spdk-rpc`): a subsystem built the way a control plane
//! builds one, the getters' fields, SPDK v24.05's error answers, and `save_config` -> restart -> the same config.

mod common;

use common::{write_file, Tgt};
use serde_json::{json, Value};

const NQN1: &str = "nqn.2016-06.io.spdk:cnode1";
const NQN2: &str = "nqn.2016-06.io.spdk:cnode2";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427";

/// A free TCP port on 127.0.0.1.
fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

fn code(e: &Value) -> i64 {
    e["code"].as_i64().unwrap()
}

#[test]
fn nvmf_subsystems_through_spdk_rpc_and_save_config_round_trip() {
    let t = Tgt::start("nvmf-rpc", &[]);
    let port = free_port();
    t.ok(&["bdev_malloc_create", "-b", "Malloc0", "32", "512"]);
    t.ok(&["bdev_malloc_create", "-b", "Malloc1", "16", "4096"]);
    t.ok(&[
        "nvmf_create_transport",
        "-t",
        "TCP",
        "-q",
        "64",
        "-m",
        "8",
        "-c",
        "8192",
    ]);
    let e = t.err(&["nvmf_create_transport", "-t", "tcp"]);
    assert_eq!(
        (code(&e), e["message"].as_str().unwrap()),
        (-32603, "Transport type 'tcp' already exists"),
        "{e}"
    );
    let tr = t.ok(&["nvmf_get_transports"]);
    assert_eq!(tr[0]["trtype"], "TCP");
    assert_eq!(tr[0]["max_io_qpairs_per_ctrlr"], 8);
    assert_eq!(tr[0]["in_capsule_data_size"], 8192);
    assert_eq!(tr[0]["max_queue_depth"], 64);
    assert_eq!(tr[0]["c2h_success"], true);

    t.ok(&[
        "nvmf_create_subsystem",
        NQN1,
        "-s",
        "SPDK00000000000001",
        "-d",
        "spdk-rs test",
        "-m",
        "8",
        "-r",
    ]);
    t.ok(&["nvmf_create_subsystem", NQN2, "-a"]);
    let e = t.err(&["nvmf_create_subsystem", NQN1]);
    assert_eq!(code(&e), -32603, "{e}");
    assert_eq!(e["message"], format!("Unable to create subsystem {NQN1}"));
    let e = t.err(&["nvmf_create_subsystem", "not-an-nqn"]);
    assert_eq!(code(&e), -32603, "{e}");
    let e = t.err(&[
        "nvmf_create_subsystem",
        "nqn.2016-06.io.spdk:bad",
        "-s",
        &"9".repeat(21),
    ]);
    assert_eq!(code(&e), -32602, "{e}");

    // The client prints nothing for this call; the raw answer is the NSID.
    let r = t.call(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN1, "namespace": {"bdev_name": "Malloc0"}}),
    );
    assert_eq!(r["result"], 1, "{r}");
    t.ok(&["nvmf_subsystem_add_ns", NQN1, "-n", "5", "Malloc1"]);
    // A missing bdev, a claimed one, a taken or out-of-range NSID: SPDK answers "Invalid parameters".
    for args in [
        &["nvmf_subsystem_add_ns", NQN1, "Nope"][..],
        &["nvmf_subsystem_add_ns", NQN2, "Malloc0"][..],
        &["nvmf_subsystem_add_ns", NQN1, "-n", "9", "Malloc1"][..],
    ] {
        let e = t.err(args);
        assert_eq!(code(&e), -32602, "{args:?}: {e}");
    }
    t.ok(&[
        "nvmf_subsystem_add_listener",
        NQN1,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &port,
    ]);
    t.ok(&[
        "nvmf_subsystem_add_listener",
        NQN2,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &port,
    ]);
    let e = t.err(&[
        "nvmf_subsystem_add_listener",
        NQN1,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &port,
    ]);
    assert_eq!(code(&e), -32602, "duplicate listener: {e}");
    let e = t.err(&[
        "nvmf_subsystem_add_listener",
        NQN1,
        "-t",
        "rdma",
        "-a",
        "127.0.0.1",
        "-s",
        "4421",
    ]);
    assert_eq!(code(&e), -32602, "no RDMA transport: {e}");
    t.ok(&["nvmf_subsystem_add_host", NQN1, HOST]);
    t.ok(&[
        "nvmf_discovery_add_referral",
        "-t",
        "tcp",
        "-a",
        "10.0.0.9",
        "-s",
        "4430",
    ]);

    let subs = t.ok(&["nvmf_get_subsystems"]);
    let subs = subs.as_array().unwrap();
    assert_eq!(subs[0]["nqn"], "nqn.2014-08.org.nvmexpress.discovery");
    assert_eq!(subs[0]["subtype"], "Discovery");
    let s1 = &subs[1];
    assert_eq!(s1["nqn"], NQN1);
    assert_eq!(s1["subtype"], "NVMe");
    assert_eq!(s1["serial_number"], "SPDK00000000000001");
    assert_eq!(s1["model_number"], "spdk-rs test");
    assert_eq!(s1["max_namespaces"], 8);
    assert_eq!(s1["allow_any_host"], false);
    assert_eq!(s1["hosts"], json!([{"nqn": HOST}]));
    assert_eq!(
        s1["listen_addresses"],
        json!([{"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port}])
    );
    let ns = s1["namespaces"].as_array().unwrap();
    assert_eq!(ns.len(), 2);
    assert_eq!(
        (ns[0]["nsid"].clone(), ns[0]["bdev_name"].clone()),
        (json!(1), json!("Malloc0"))
    );
    assert_eq!(ns[1]["nsid"], 5);
    let uuid = t.ok(&["bdev_get_bdevs", "-b", "Malloc0"])[0]["uuid"].clone();
    assert_eq!(ns[0]["uuid"], uuid);
    assert_eq!(subs[2]["allow_any_host"], true);
    let e = t.err(&["nvmf_get_subsystems", "nqn.2016-06.io.spdk:none"]);
    assert_eq!(code(&e), -19, "{e}");

    // ANA: per listener, per group.
    t.ok(&[
        "nvmf_subsystem_listener_set_ana_state",
        NQN1,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &port,
        "-n",
        "inaccessible",
        "-g",
        "5",
    ]);
    let l = t.ok(&["nvmf_subsystem_get_listeners", NQN1]);
    let states = l[0]["ana_states"].as_array().unwrap();
    assert_eq!(states.len(), 8);
    assert_eq!(
        states[4],
        json!({"ana_group": 5, "ana_state": "inaccessible"})
    );
    assert_eq!(states[0]["ana_state"], "optimized");
    let e = t.err(&[
        "nvmf_subsystem_listener_set_ana_state",
        NQN2,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &port,
        "-n",
        "inaccessible",
    ]);
    assert_eq!(
        (code(&e), e["message"].clone()),
        (-32603, json!("error setting ANA state: -22"))
    );

    assert_eq!(t.ok(&["nvmf_subsystem_get_controllers", NQN1]), json!([]));
    assert_eq!(t.ok(&["nvmf_subsystem_get_qpairs", NQN1]), json!([]));
    let stats = t.ok(&["nvmf_get_stats"]);
    assert!(stats["tick_rate"].as_u64().unwrap() > 0);
    assert_eq!(stats["poll_groups"][0]["name"], "nvmf_tgt_poll_group_000");
    assert_eq!(
        t.ok(&["nvmf_discovery_get_referrals"])[0]["address"]["traddr"],
        "10.0.0.9"
    );

    // Taking things away.
    t.ok(&["nvmf_subsystem_remove_ns", NQN1, "5"]);
    let e = t.err(&["nvmf_subsystem_remove_ns", NQN1, "5"]);
    assert_eq!(code(&e), -32602, "{e}");
    // The bdev is free again: another subsystem may export it.
    t.ok(&["nvmf_subsystem_add_ns", NQN2, "Malloc1"]);
    let e = t.err(&[
        "nvmf_subsystem_remove_host",
        NQN1,
        "nqn.2014-08.org.nvmexpress:uuid:other",
    ]);
    assert_eq!(code(&e), -32603, "{e}");

    let saved = t.ok(&["save_config"]);
    let nvmf = saved["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subsystem"] == "nvmf")
        .unwrap()["config"]
        .clone();
    let methods: Vec<&str> = nvmf
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        [
            "nvmf_set_config",
            "nvmf_set_max_subsystems",
            "nvmf_set_crdt",
            "nvmf_create_transport",
            "nvmf_discovery_add_referral",
            "nvmf_create_subsystem",
            "nvmf_subsystem_add_host",
            "nvmf_subsystem_add_ns",
            "nvmf_subsystem_add_listener",
            "nvmf_create_subsystem",
            "nvmf_subsystem_add_ns",
            "nvmf_subsystem_add_listener",
        ]
    );
    let path = write_file(
        &std::env::temp_dir(),
        &format!("spdk-rs-nvmf-saved-{}.json", std::process::id()),
        &serde_json::to_string_pretty(&saved).unwrap(),
    );
    let (st, _) = t.stop();
    assert!(st.success());

    let t2 = Tgt::start("nvmf-restart", &["-c", path.to_str().unwrap()]);
    let again = t2.ok(&["save_config"]);
    let _ = std::fs::remove_file(&path);
    let section = |d: &Value| {
        d["subsystems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["subsystem"] == "nvmf")
            .unwrap()["config"]
            .clone()
    };
    // SPDK writes hosts and listeners newest first, so a reload reverses them; with one of each per subsystem
    // the section comes back the same.
    assert_eq!(section(&again), nvmf, "save -> restart -> save");
    assert_eq!(
        t2.ok(&["nvmf_get_subsystems", NQN1])[0]["namespaces"][0]["bdev_name"],
        "Malloc0"
    );
    // Per-host visibility: a namespace added no_auto_visible takes hosts; one visible to all refuses them.
    t2.ok(&["bdev_malloc_create", "-b", "Hidden", "8", "512"]);
    t2.ok(&["nvmf_subsystem_add_ns", NQN1, "-n", "3", "-i", "Hidden"]);
    t2.ok(&["nvmf_ns_add_host", NQN1, "3", HOST]);
    t2.ok(&["nvmf_ns_remove_host", NQN1, "3", HOST]);
    let e = t2.err(&["nvmf_ns_add_host", NQN1, "1", HOST]);
    assert_eq!(code(&e), -32602, "visible to all: {e}");
    let e = t2.err(&["nvmf_ns_add_host", NQN1, "9", HOST]);
    assert_eq!(code(&e), -32602, "no such namespace: {e}");
    let ns = t2.ok(&["nvmf_get_subsystems", NQN1])[0]["namespaces"].clone();
    assert_eq!(ns[1]["nsid"], 3);
    let (st, _) = t2.stop();
    assert!(st.success());
}
