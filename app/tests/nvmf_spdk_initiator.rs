//! SPDK's own NVMe-oF initiators against our target over TCP: `spdk_nvme_identify` reads the controller and
//! namespace as configured, and SPDK's `bdevperf` over SPDK's `bdev_nvme` passes verify runs (4 KiB and
//! 128 KiB, which go through R2T/H2C data) and unmap/write-zeroes/flush workloads. The initiators come from the
//! SPDK peer build (`../shared/tools/spdk-peer/build.sh`, `/root/spdk-peer` or `SPDK_PEER`); without it the
//! test prints SKIPPED and passes.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{write_file, Tgt};

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";

fn peer() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var("SPDK_PEER").unwrap_or_else(|_| "/root/spdk-peer".into()));
    p.join("build/examples/bdevperf").is_file().then_some(p)
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

#[test]
fn spdk_initiators_against_our_tcp_target() {
    let Some(peer) = peer() else {
        println!("SKIPPED: no SPDK peer build (../shared/tools/spdk-peer/build.sh)");
        return;
    };
    let port = free_port();
    let t = Tgt::start("nvmf-spdk-init", &[]);
    t.ok(&["bdev_malloc_create", "-b", "Malloc0", "64", "512"]);
    t.ok(&["nvmf_create_transport", "-t", "TCP"]);
    t.ok(&[
        "nvmf_create_subsystem",
        NQN,
        "-a",
        "-s",
        "SPDKRS0000000000007",
        "-d",
        "spdk-rs initiator test",
    ]);
    t.ok(&["nvmf_subsystem_add_ns", NQN, "Malloc0"]);
    t.ok(&[
        "nvmf_subsystem_add_listener",
        NQN,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &port,
    ]);

    let trid = format!("trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{NQN}");
    let o = Command::new(peer.join("build/bin/spdk_nvme_identify"))
        .args(["-d", "256", "-r", &trid])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "spdk_nvme_identify: {text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for want in [
        "Serial Number:                         SPDKRS0000000000007",
        "Model Number:                          spdk-rs initiator test",
        "Size (in LBAs):                        131072",
        "LBA Format #00: Data Size:   512",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }

    let cfg = write_file(
        &t.dir,
        "bdevperf.json",
        &format!(
            r#"{{"subsystems":[{{"subsystem":"bdev","config":[{{"method":"bdev_nvme_attach_controller",
            "params":{{"name":"Nvme0","trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{port}",
            "subnqn":"{NQN}"}}}}]}}]}}"#
        ),
    );
    for (w, q, o) in [
        ("verify", "32", "4096"),
        ("verify", "8", "131072"),
        ("unmap", "16", "4096"),
        ("write_zeroes", "16", "4096"),
        ("flush", "16", "4096"),
    ] {
        let out = Command::new(peer.join("build/examples/bdevperf"))
            .args(["--no-huge", "-s", "1024", "-m", "0x2", "--json"])
            .arg(&cfg)
            .args(["-q", q, "-o", o, "-w", w, "-t", "2"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "bdevperf {w}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let total = text
            .lines()
            .find(|l| l.trim_start().starts_with("Total"))
            .unwrap_or_else(|| panic!("no Total line for {w}:\n{text}"));
        // Total: IOPS MiB/s Fail/s TO/s ...: I/O happened and none failed or timed out.
        let cols: Vec<f64> = total
            .split(':')
            .nth(1)
            .unwrap()
            .split_whitespace()
            .map(|c| c.parse().unwrap())
            .collect();
        assert!(cols[0] > 0.0, "{w}: no I/O: {total}");
        assert_eq!(
            (cols[2], cols[3]),
            (0.0, 0.0),
            "{w}: failures or timeouts: {total}"
        );
    }
    let (st, _) = t.stop();
    assert!(st.success());
}
