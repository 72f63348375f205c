//! The raid module in the real binaries, driven with the official `spdk-rpc` client: `spdk_tgt` for the RPCs,
//! their results and errors, `save_config`, restart with superblocks on files (stale member left out, then
//! rebuilt); `bdevperf -w verify` for I/O while faults are injected, a member is hot-removed and a rebuild runs.

mod harness;

use std::time::Duration;

use harness::*;
use serde_json::{json, Value};

fn entry(method: &str, params: Value) -> Value {
    json!({"method": method, "params": params})
}

fn bdev_cfg(saved: &Value) -> Vec<Value> {
    saved["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subsystem"] == "bdev")
        .unwrap()["config"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn spdk_tgt_raid_rpcs_results_errors_and_save_config() {
    let t = Tgt::spdk_tgt("rpcs", &["-m", "0x1"]);
    for m in ["M0", "M1"] {
        t.ok(&["bdev_malloc_create", "-b", m, "32", "512"]);
    }
    t.ok(&[
        "bdev_raid_create",
        "-n",
        "raid_v1",
        "-r",
        "raid1",
        "-b",
        "M0 M1",
    ]);
    let all = t.ok(&["bdev_raid_get_bdevs", "all"]);
    assert_eq!(all.as_array().unwrap().len(), 1);
    let r = &all[0];
    assert_eq!(r["name"], "raid_v1");
    assert_eq!(r["state"], "online");
    assert_eq!(r["raid_level"], "raid1");
    assert_eq!(r["strip_size_kb"], 0);
    assert_eq!(r["superblock"], false);
    assert_eq!(r["num_base_bdevs"], 2);
    assert_eq!(r["num_base_bdevs_discovered"], 2);
    assert_eq!(r["num_base_bdevs_operational"], 2);
    assert_eq!(
        r["base_bdevs_list"][1],
        json!({"name": "M1", "uuid": r["base_bdevs_list"][1]["uuid"], "is_configured": true,
               "data_offset": 0, "data_size": 65536})
    );
    assert_eq!(
        t.ok(&["bdev_raid_get_bdevs", "online"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(t.ok(&["bdev_raid_get_bdevs", "configuring"]), json!([]));
    assert_eq!(t.ok(&["bdev_raid_get_bdevs", "offline"]), json!([]));

    let b = t.ok(&["bdev_get_bdevs", "-b", "raid_v1"]);
    assert_eq!(b[0]["num_blocks"], 65536);
    assert_eq!(b[0]["product_name"], "Raid Volume");
    assert_eq!(b[0]["uuid"], r["uuid"]);
    assert_eq!(
        b[0]["driver_specific"]["raid"]["num_base_bdevs_operational"],
        2
    );
    assert_eq!(b[0]["driver_specific"]["raid"]["uuid"], r["uuid"]);
    let m0 = t.ok(&["bdev_get_bdevs", "-b", "M0"]);
    assert_eq!(m0[0]["claimed"], true);

    // Errors, as SPDK reports them.
    let e = t.err(&[
        "bdev_raid_create",
        "-n",
        "raid_v1",
        "-r",
        "raid1",
        "-b",
        "A B",
    ]);
    assert_eq!(e["code"], -17);
    assert_eq!(
        e["message"],
        "Failed to create RAID bdev raid_v1: File exists"
    );
    let e = t.err(&[
        "bdev_raid_create",
        "-n",
        "x",
        "-r",
        "raid1",
        "-z",
        "64",
        "-b",
        "A B",
    ]);
    assert_eq!(e["code"], -22);
    let e = t.err(&["bdev_raid_delete", "nope"]);
    assert_eq!(e["code"], -19);
    assert_eq!(e["message"], "raid bdev nope not found");
    let e = t.call("bdev_raid_get_bdevs", json!({"category": "bogus"}));
    assert_eq!(e["error"]["code"], -22);
    let e = t.err(&["bdev_raid_set_options", "-w", "0"]);
    assert_eq!(e["code"], -22);
    let e = t.err(&["bdev_raid_add_base_bdev", "nope", "M0"]);
    assert_eq!(e["code"], -19);
    let e = t.err(&["bdev_raid_remove_base_bdev", "nope"]);
    assert_eq!(e["code"], -19);
    t.ok(&["bdev_raid_set_options", "-w", "2048"]);

    // A raid whose members appear later: configuring until examine claimed them all.
    t.ok(&[
        "bdev_raid_create",
        "-n",
        "raid_c",
        "-r",
        "0",
        "-z",
        "64",
        "-b",
        "X0 X1",
    ]);
    let c = t.raid("raid_c").unwrap();
    assert_eq!(c["state"], "configuring");
    assert_eq!(c["raid_level"], "raid0");
    assert_eq!(c["strip_size_kb"], 64);
    assert_eq!(c["base_bdevs_list"][0]["name"], "X0");
    assert_eq!(c["base_bdevs_list"][0]["is_configured"], false);
    assert_eq!(
        t.ok(&["bdev_raid_get_bdevs", "configuring"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    t.ok(&["bdev_malloc_create", "-b", "X0", "16", "512"]);
    t.ok(&["bdev_wait_for_examine"]);
    assert_eq!(t.raid("raid_c").unwrap()["num_base_bdevs_discovered"], 1);
    assert_eq!(t.raid("raid_c").unwrap()["state"], "configuring");
    t.ok(&["bdev_malloc_create", "-b", "X1", "16", "512"]);
    t.ok(&["bdev_wait_for_examine"]);
    assert_eq!(t.raid("raid_c").unwrap()["state"], "online");
    assert_eq!(
        t.ok(&["bdev_get_bdevs", "-b", "raid_c"])[0]["num_blocks"],
        65536
    );

    // save_config: the options among the module entries, the arrays after their members.
    let saved = t.ok(&["save_config"]);
    let cfg = bdev_cfg(&saved);
    let methods: Vec<&str> = cfg.iter().map(|e| e["method"].as_str().unwrap()).collect();
    let pos = |m: &str, name: &str| {
        cfg.iter()
            .position(|e| e["method"] == m && (name.is_empty() || e["params"]["name"] == name))
            .unwrap_or_else(|| panic!("{m} {name} in {methods:?}"))
    };
    assert_eq!(
        cfg[pos("bdev_raid_set_options", "")]["params"],
        json!({"process_window_size_kb": 2048})
    );
    assert!(pos("bdev_raid_set_options", "") < pos("bdev_malloc_create", "M0"));
    let rc = &cfg[pos("bdev_raid_create", "raid_v1")];
    assert!(pos("bdev_raid_create", "raid_v1") > pos("bdev_malloc_create", "M1"));
    assert_eq!(
        rc["params"],
        json!({"name": "raid_v1", "uuid": r["uuid"], "raid_level": "raid1", "base_bdevs": ["M0", "M1"]})
    );
    assert_eq!(
        cfg[pos("bdev_raid_create", "raid_c")]["params"]["strip_size_kb"],
        64
    );
    assert_eq!(*methods.last().unwrap(), "bdev_wait_for_examine");

    // Remove a member, add it back: a rebuild runs (slowed down so it is seen), and delete stops it.
    t.ok(&["bdev_raid_remove_base_bdev", "M1"]);
    let r = t.raid("raid_v1").unwrap();
    assert_eq!(r["num_base_bdevs_operational"], 1);
    assert_eq!(r["base_bdevs_list"][1]["name"], Value::Null);
    assert_eq!(r["base_bdevs_list"][1]["is_configured"], false);
    assert_eq!(t.ok(&["bdev_get_bdevs", "-b", "M1"])[0]["claimed"], false);
    t.ok(&["bdev_raid_set_options", "-w", "64", "-b", "1"]);
    t.ok(&["bdev_raid_add_base_bdev", "raid_v1", "M1"]);
    let r = t.raid("raid_v1").unwrap();
    assert_eq!(r["process"]["type"], "rebuild", "{r}");
    assert_eq!(r["process"]["target"], "M1");
    assert!(r["process"]["progress"]["percent"].as_u64().unwrap() < 100);
    assert_eq!(r["num_base_bdevs_discovered"], 2);
    let e = t.err(&["bdev_raid_add_base_bdev", "raid_v1", "X0"]);
    assert_eq!(e["code"], -1, "{e}");
    std::thread::sleep(Duration::from_millis(300));
    let b1 = t.raid("raid_v1").unwrap()["process"]["progress"]["blocks"]
        .as_u64()
        .unwrap();
    assert!(b1 > 0);
    t.ok(&["bdev_raid_delete", "raid_v1"]);
    assert!(t.raid("raid_v1").is_none());
    assert_eq!(t.ok(&["bdev_get_bdevs", "-b", "M0"])[0]["claimed"], false);
    assert_eq!(t.ok(&["bdev_get_bdevs", "-b", "M1"])[0]["claimed"], false);
    t.ok(&["bdev_malloc_delete", "M1"]);

    // The saved configuration brings the arrays back in a new target.
    let dir = TmpDir::new("rpcs-cfg");
    let p = dir.0.join("saved.json");
    std::fs::write(&p, saved.to_string()).unwrap();
    let (st, _, _) = t.stop();
    assert!(st.success());
    let t2 = Tgt::spdk_tgt("rpcs2", &["-m", "0x1", "-c", p.to_str().unwrap()]);
    assert_eq!(t2.raid("raid_v1").unwrap()["state"], "online");
    assert_eq!(t2.raid("raid_c").unwrap()["state"], "online");
    let (st, _, _) = t2.stop();
    assert!(st.success());
}

fn superblock_of(path: &std::path::Path) -> raid::sb::Superblock {
    let data = std::fs::read(path).unwrap();
    raid::sb::Superblock::decode(&data[..32768]).expect("superblock on file")
}

#[test]
fn superblock_restart_stale_member_and_rebuild_across_processes() {
    let d = TmpDir::new("sbrestart");
    let f0 = d.file("a0.img", 24 << 20);
    let f1 = d.file("a1.img", 24 << 20);
    let ee_uuid = "7c1f3b52-6f0e-4c1e-9a7d-2b8a0e5d4c31";
    let raid_uuid = "1b6d2a9e-3c4f-4e5a-8b7c-9d0e1f2a3b4c";
    // As save_config records them: members are found by UUID.
    let aio = |name: &str, f: &std::path::Path, uuid: &str| {
        entry(
            "bdev_aio_create",
            json!({"name": name, "filename": f.to_str().unwrap(), "block_size": 512, "uuid": uuid}),
        )
    };
    let members = [
        aio("A0", &f0, "0a5e11f0-0000-4000-8000-000000000000"),
        aio("A1", &f1, "0a5e11f1-0000-4000-8000-000000000000"),
        entry(
            "bdev_error_create",
            json!({"base_name": "A1", "uuid": ee_uuid}),
        ),
    ];
    let mut first = members.to_vec();
    first.push(entry(
        "bdev_raid_create",
        json!({"name": "raid_sb", "raid_level": "raid1", "base_bdevs": ["A0", "EE_A1"],
               "superblock": true, "uuid": raid_uuid}),
    ));
    let cfg1 = d.bdev_config("first.json", &first);

    // Run 1: bdevperf verify on the array; member 1 fails a write half way.
    let perf = Tgt::start(
        "bdevperf",
        "sb1",
        &[
            "-q",
            "16",
            "-o",
            "4096",
            "-w",
            "verify",
            "-t",
            "3",
            "-z",
            "-T",
            "raid_sb",
            "--interrupt-mode",
            "-c",
            cfg1.to_str().unwrap(),
        ],
    );
    let r = perf.raid("raid_sb").unwrap();
    assert_eq!(r["state"], "online");
    assert_eq!(r["superblock"], true);
    assert_eq!(r["uuid"], raid_uuid);
    assert_eq!(r["base_bdevs_list"][0]["data_offset"], 2048);
    let run = perform_tests(&perf.sock);
    std::thread::sleep(Duration::from_millis(700));
    perf.ok(&[
        "bdev_error_inject_error",
        "EE_A1",
        "write",
        "failure",
        "-n",
        "1",
    ]);
    perf.wait("member failed", 10, |t| {
        t.raid("raid_sb").unwrap()["num_base_bdevs_operational"] == 1
    });
    let res = results(run).expect("verify passes although a member failed");
    assert_eq!(res["results"][0]["io_failed"], 0, "{res}");
    assert_eq!(
        perf.ok(&["bdev_get_bdevs", "-b", "EE_A1"])[0]["claimed"],
        false
    );
    let _ = perf.stop();

    // On disk: member 0's superblock is newer and records member 1 as failed.
    let s0 = superblock_of(&f0);
    let s1 = superblock_of(&f1);
    assert_eq!(s0.uuid.to_string(), raid_uuid);
    assert_eq!(s0.name, "raid_sb");
    assert!(
        s0.seq_number > s1.seq_number,
        "{} vs {}",
        s0.seq_number,
        s1.seq_number
    );
    assert_eq!(s0.base_bdevs[1].state, raid::sb::BaseState::Failed);
    assert_eq!(s1.base_bdevs[1].state, raid::sb::BaseState::Configured);
    assert_eq!(s0.base_bdevs[1].uuid.to_string(), ee_uuid);

    // Run 2: spdk_tgt with only the members, the stale one first: assembled degraded, the stale one left out.
    let order = vec![members[1].clone(), members[2].clone(), members[0].clone()];
    let cfg2 = d.bdev_config("second.json", &order);
    let t = Tgt::spdk_tgt("sb2", &["-m", "0x1", "-c", cfg2.to_str().unwrap()]);
    let r = t.raid("raid_sb").expect("assembled from superblocks");
    assert_eq!(r["state"], "online", "{r}");
    assert_eq!(r["uuid"], raid_uuid);
    assert_eq!(r["num_base_bdevs_discovered"], 1);
    assert_eq!(r["num_base_bdevs_operational"], 1);
    assert_eq!(r["base_bdevs_list"][0]["name"], "A0");
    assert_eq!(
        t.ok(&["bdev_get_bdevs", "-b", "EE_A1"])[0]["claimed"],
        false
    );
    // Superblock arrays are not in save_config.
    let saved = t.ok(&["save_config"]);
    assert!(!bdev_cfg(&saved)
        .iter()
        .any(|e| e["method"] == "bdev_raid_create"));
    // Put the stale member back: it is rebuilt.
    t.ok(&["bdev_raid_add_base_bdev", "raid_sb", "EE_A1"]);
    t.wait("rebuilt", 60, |t| {
        let r = t.raid("raid_sb").unwrap();
        r.get("process").is_none() && r["num_base_bdevs_discovered"] == 2
    });
    std::thread::sleep(Duration::from_millis(200));
    let (st, _, _) = t.stop();
    assert!(st.success());
    let a = std::fs::read(&f0).unwrap();
    let b = std::fs::read(&f1).unwrap();
    assert!(
        a[1 << 20..] == b[1 << 20..],
        "the rebuilt member holds the array's data"
    );
    assert!(a[1 << 20..].iter().any(|x| *x != 0));
    let s0 = superblock_of(&f0);
    let s1 = superblock_of(&f1);
    assert_eq!(s0, s1);
    assert!(s0
        .base_bdevs
        .iter()
        .all(|b| b.state == raid::sb::BaseState::Configured));

    // Run 3: both members, the other order: the full array comes back.
    let cfg3 = d.bdev_config("third.json", &members);
    let t = Tgt::spdk_tgt("sb3", &["-m", "0x1", "-c", cfg3.to_str().unwrap()]);
    let r = t.raid("raid_sb").unwrap();
    assert_eq!(r["state"], "online");
    assert_eq!(r["num_base_bdevs_discovered"], 2);
    // delete with clear_sb wipes the superblocks.
    t.ok(&["bdev_raid_delete", "raid_sb", "-c"]);
    let (st, _, _) = t.stop();
    assert!(st.success());
    let a = std::fs::read(&f0).unwrap();
    assert!(raid::sb::Superblock::decode(&a[..32768]).is_err());
}

#[test]
fn bdevperf_verify_through_faults_rebuild_and_hot_remove() {
    let d = TmpDir::new("perf");
    let cfg = d.bdev_config(
        "perf.json",
        &[
            entry(
                "bdev_malloc_create",
                json!({"name": "P0", "num_blocks": 65536, "block_size": 512}),
            ),
            entry(
                "bdev_malloc_create",
                json!({"name": "P1", "num_blocks": 65536, "block_size": 512}),
            ),
            entry(
                "bdev_malloc_create",
                json!({"name": "P2", "num_blocks": 65536, "block_size": 512}),
            ),
            entry("bdev_error_create", json!({"base_name": "P1"})),
            entry(
                "bdev_raid_set_options",
                json!({"process_window_size_kb": 256, "process_max_bandwidth_mb_sec": 16}),
            ),
            entry(
                "bdev_raid_create",
                json!({"name": "raid_p", "raid_level": "raid1", "base_bdevs": ["P0", "EE_P1"]}),
            ),
        ],
    );
    let perf = Tgt::start(
        "bdevperf",
        "perf",
        &[
            "-q",
            "32",
            "-o",
            "4096",
            "-w",
            "verify",
            "-t",
            "8",
            "-z",
            "-m",
            "0x1",
            "-T",
            "raid_p",
            "--interrupt-mode",
            "-c",
            cfg.to_str().unwrap(),
        ],
    );
    let run = perform_tests(&perf.sock);
    std::thread::sleep(Duration::from_millis(500));
    // Read errors on one mirror: retried on the other, the member stays.
    perf.ok(&[
        "bdev_error_inject_error",
        "EE_P1",
        "read",
        "failure",
        "-n",
        "20",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        perf.raid("raid_p").unwrap()["num_base_bdevs_operational"],
        2
    );
    // A write error: the member is failed and removed.
    perf.ok(&[
        "bdev_error_inject_error",
        "EE_P1",
        "write",
        "failure",
        "-n",
        "1",
    ]);
    perf.wait("member failed", 10, |t| {
        t.raid("raid_p").unwrap()["num_base_bdevs_operational"] == 1
    });
    // A replacement is rebuilt while the workload runs.
    perf.ok(&["bdev_raid_add_base_bdev", "raid_p", "P2"]);
    assert_eq!(perf.raid("raid_p").unwrap()["process"]["target"], "P2");
    perf.wait("rebuild done", 30, |t| {
        t.raid("raid_p").unwrap().get("process").is_none()
    });
    let r = perf.raid("raid_p").unwrap();
    assert_eq!(r["num_base_bdevs_discovered"], 2);
    assert_eq!(r["base_bdevs_list"][1]["name"], "P2");
    // The original member is hot-removed: reads now come from the rebuilt one only.
    perf.ok(&["bdev_malloc_delete", "P0"]);
    let r = perf.raid("raid_p").unwrap();
    assert_eq!(r["state"], "online");
    assert_eq!(r["num_base_bdevs_operational"], 1);
    let res = results(run).expect("verify passes through every fault");
    for j in res["results"].as_array().unwrap() {
        assert_eq!(j["io_failed"], 0, "{res}");
    }
    let _ = perf.stop();
}

/// SPDK's `raid_state_function_test` (test/bdev/bdev_raid.sh), step by step, through spdk-rpc.
fn state_function(t: &Tgt, level: &str, n: usize, sb: bool) {
    let bases: Vec<String> = (1..=n).map(|i| format!("BaseBdev{i}")).collect();
    let list = bases.join(" ");
    let strip = if level == "raid1" { 0 } else { 64 };
    let mut create: Vec<String> = vec!["bdev_raid_create".into()];
    if strip != 0 {
        create.extend(["-z".into(), strip.to_string()]);
    }
    if sb {
        create.push("-s".into());
    }
    create.extend([
        "-r".into(),
        level.into(),
        "-b".into(),
        list.clone(),
        "-n".into(),
        "Existed_Raid".into(),
    ]);
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    let verify = |state: &str, operational: usize| {
        let r = t.raid("Existed_Raid").expect("listed");
        assert_eq!(r["state"], state, "{r}");
        assert_eq!(r["raid_level"], level);
        assert_eq!(r["strip_size_kb"], strip);
        assert_eq!(r["num_base_bdevs"], n);
        let configured = r["base_bdevs_list"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["is_configured"] == true)
            .count();
        assert_eq!(r["num_base_bdevs_discovered"], configured);
        assert_eq!(r["num_base_bdevs_operational"], operational, "{r}");
        let in_state = t.ok(&["bdev_raid_get_bdevs", state]);
        assert!(in_state
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "Existed_Raid"));
    };
    let malloc = |name: &str| {
        t.ok(&["bdev_malloc_create", "32", "512", "-b", name]);
        t.ok(&["bdev_wait_for_examine"]);
    };
    let malloc_uuid = |name: &str, uuid: &str| {
        t.ok(&["bdev_malloc_create", "32", "512", "-b", name, "-u", uuid]);
        t.ok(&["bdev_wait_for_examine"]);
    };
    // Step 1: no members.
    t.ok(&create);
    verify("configuring", n);
    t.ok(&["bdev_raid_delete", "Existed_Raid"]);
    // Step 2: one member.
    t.ok(&create);
    malloc(&bases[0]);
    verify("configuring", n);
    t.ok(&["bdev_raid_delete", "Existed_Raid"]);
    // Step 3: the others appear one by one.
    t.ok(&create);
    for b in &bases[1..] {
        verify("configuring", n);
        malloc(b);
    }
    verify("online", n);
    let rb = t.ok(&["bdev_get_bdevs", "-b", "Existed_Raid"]);
    assert_eq!(rb[0]["block_size"], 512);
    // Step 4: one member deleted.
    t.ok(&["bdev_malloc_delete", &bases[0]]);
    verify(
        if level == "raid1" {
            "online"
        } else {
            "offline"
        },
        n - 1,
    );
    // Step 5: the others deleted; the array goes away with the last one.
    for b in &bases[1..] {
        assert!(
            t.raid("Existed_Raid").is_some(),
            "removed before its last member"
        );
        t.ok(&["bdev_malloc_delete", b]);
    }
    assert!(t.raid("Existed_Raid").is_none());
    if n > 2 {
        for b in &bases[1..] {
            malloc(b);
        }
        t.ok(&create);
        verify("configuring", n);
        let conf = |i: usize| {
            t.raid("Existed_Raid").unwrap()["base_bdevs_list"][i]["is_configured"].clone()
        };
        t.ok(&["bdev_raid_remove_base_bdev", &bases[1]]);
        verify("configuring", n);
        assert_eq!(conf(1), false);
        malloc(&bases[0]);
        verify("configuring", n);
        assert_eq!(conf(0), true);
        t.ok(&["bdev_raid_remove_base_bdev", &bases[2]]);
        verify("configuring", n);
        assert_eq!(conf(2), false);
        t.ok(&["bdev_raid_add_base_bdev", "Existed_Raid", &bases[2]]);
        verify("configuring", n);
        assert_eq!(conf(2), true);
        t.ok(&["bdev_malloc_delete", &bases[0]]);
        verify("configuring", n);
        assert_eq!(conf(0), false);
        t.ok(&["bdev_raid_add_base_bdev", "Existed_Raid", &bases[1]]);
        verify("configuring", n);
        assert_eq!(conf(1), true);
        let u = t.raid("Existed_Raid").unwrap()["base_bdevs_list"][0]["uuid"]
            .as_str()
            .unwrap()
            .to_string();
        malloc_uuid("NewBaseBdev", &u);
        verify("online", n);
        t.ok(&["bdev_raid_delete", "Existed_Raid"]);
        for b in bases[1..].iter().map(String::as_str).chain(["NewBaseBdev"]) {
            t.ok(&["bdev_malloc_delete", b]);
        }
    }
    assert_eq!(t.ok(&["bdev_raid_get_bdevs", "all"]), json!([]));
}

#[test]
fn spdk_raid_state_function_test_flow() {
    let t = Tgt::spdk_tgt("statefn", &["-m", "0x1"]);
    // A representative subset (each RPC starts a python process).
    for (level, n, sb) in [
        ("raid0", 3, false),
        ("raid1", 3, true),
        ("concat", 2, true),
        ("raid1", 2, false),
    ] {
        state_function(&t, level, n, sb);
    }
    let (st, _, _) = t.stop();
    assert!(st.success());
}

/// Volume expansion as a control plane drives it: the replicas grow (here `bdev_null_resize`), and the raid1 on
/// top follows once all of them have, as `bdev_get_bdevs` and `bdev_raid_get_bdevs` show.
#[test]
fn raid1_follows_its_members_through_bdev_null_resize() {
    let t = Tgt::spdk_tgt("resize", &["-m", "0x1"]);
    for n in ["N0", "N1"] {
        t.ok(&["bdev_null_create", n, "16", "512"]);
    }
    t.ok(&[
        "bdev_raid_create",
        "-n",
        "vol",
        "-r",
        "raid1",
        "-b",
        "N0 N1",
    ]);
    let size = |t: &Tgt| t.ok(&["bdev_get_bdevs", "-b", "vol"])[0]["num_blocks"].clone();
    assert_eq!(size(&t), 32768);
    t.ok(&["bdev_null_resize", "N0", "32"]);
    assert_eq!(size(&t), 32768);
    t.ok(&["bdev_null_resize", "N1", "32"]);
    t.wait("vol grown", 10, |t| size(t) == 65536);
    let r = t.raid("vol").unwrap();
    assert_eq!(r["base_bdevs_list"][0]["data_size"], 65536);
    assert_eq!(r["base_bdevs_list"][1]["data_size"], 65536);
    // A null bdev does not shrink; the error is SPDK's and the array is untouched.
    let e = t.err(&["bdev_null_resize", "N0", "8"]);
    assert_eq!(e["code"], -22, "{e}");
    assert_eq!(size(&t), 65536);
    let (st, _, _) = t.stop();
    assert!(st.success());
}
