//! `bdev_nvme` over NVMe/RDMA (our host transport) in a QEMU/TCG guest on Soft-RoCE: our `bdevperf` attaches
//! `-t RDMA` controllers in its JSON config and runs `-w verify` against two targets in the same guest: the
//! Linux kernel's nvmet-rdma (a memory-backed null_blk namespace) and this package's `spdk_tgt` (a malloc
//! namespace), 4 KiB and 128 KiB transfers (keyed SGL: the target RDMA READs our writes and RDMA WRITEs our
//! reads). The data checks are bdevperf's own (every block written is read back and compared).
//!
//! ```text
//! cargo test -p spdk-tgt --test nvme_rdma_host_guest -- --nocapture
//! ```
//!
//! Prints `SKIPPED ...` and passes when QEMU cannot run or the guest has no Soft-RoCE. Logs:
//! `/var/tmp/spdk-rs-lab/logs/nvme-rdma-host.log`.

mod common;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

const NQN: &str = "nqn.2016-06.io.spdk:rdmahost";
const GUEST_IP: &str = "10.0.2.15";
/// Our target's port, and the kernel target's.
const OURS: u16 = 4420;
const KERNEL: u16 = 4421;

const SCRIPT: &str = r#"
. /lab/lib.sh
step "Soft-RoCE: rxe0 on eth0"
rdma link add rxe0 type rxe netdev eth0 || fail "rdma link add"

step "the kernel's nvmet-rdma target on port $KERNEL"
rmmod null_blk 2>/dev/null
modprobe null_blk nr_devices=1 gb=1 bs=512 memory_backed=1 || fail "null_blk"
modprobe nvmet_rdma || fail "nvmet_rdma"
cd /sys/kernel/config/nvmet || fail "no nvmet configfs"
mkdir subsystems/$NQN
echo 1 > subsystems/$NQN/attr_allow_any_host
mkdir subsystems/$NQN/namespaces/1
echo -n /dev/nullb0 > subsystems/$NQN/namespaces/1/device_path
echo 1 > subsystems/$NQN/namespaces/1/enable || fail "namespace enable"
mkdir ports/1
echo rdma > ports/1/addr_trtype
echo ipv4 > ports/1/addr_adrfam
echo $GUEST_IP > ports/1/addr_traddr
echo $KERNEL > ports/1/addr_trsvcid
ln -s /sys/kernel/config/nvmet/subsystems/$NQN ports/1/subsystems/$NQN || fail "port link"
cd /

step "our target over RDMA on port $OURS"
$SPDK_TGT -m 0x1 --no-huge -s 256 --json /opt/tgt.json -r /tmp/spdk.sock > /tmp/tgt.log 2>&1 &
TGT=$!
_t=600
until grep -q "NVMe/RDMA Target Listening" /tmp/tgt.log; do
  kill -0 $TGT 2>/dev/null || { cat /tmp/tgt.log; fail "spdk_tgt exited"; }
  [ $_t -gt 0 ] || fail "spdk_tgt is not listening"
  sleep 0.1; _t=$((_t - 1))
done

for t in kernel ours; do
  for bs in 4096 131072; do
    step "bdevperf -w verify over RDMA against the $t target, $bs bytes"
    $BDEVPERF -m 0x2 --no-huge -s 256 --json /opt/perf-$t.json -q 16 -o $bs -w verify -t 3 > /tmp/perf.out 2>&1
    echo "PERF_RC_${t}_$bs=$?"
    tr -d '\r' < /tmp/perf.out > /tmp/perf.txt
    sed "s/^/PERF: /" /tmp/perf.txt | tail -8
    echo "PERF_IOPS_${t}_$bs=$(awk '$1 == "Total" && $2 == ":" {print $3}' /tmp/perf.txt)"
    echo "PERF_FAILS_${t}_$bs=$(awk '$1 == "Total" && $2 == ":" {print $5}' /tmp/perf.txt)"
  done
done
kill $TGT; wait $TGT; echo "TGT_EXIT=$?"
"#;

/// Our `spdk_tgt`'s config: a malloc namespace exported over RDMA on the guest's address.
fn target_config() -> Value {
    let la = json!({"trtype": "RDMA", "adrfam": "IPv4", "traddr": GUEST_IP,
                    "trsvcid": OURS.to_string()});
    json!({"subsystems": [
        {"subsystem": "bdev", "config": [lab::nvmf::malloc_bdev("Malloc0", 131072, 512)]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "RDMA", "max_srq_depth": 256}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": true,
                "serial_number": "SPDKRSRDMAHOST01"}},
            {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN,
                "namespace": {"bdev_name": "Malloc0", "nsid": 1}}},
            {"method": "nvmf_subsystem_add_listener", "params": {"nqn": NQN, "listen_address": la}}
        ]}
    ]})
}

/// bdevperf's config: one RDMA controller at `port`, with the RDMA knobs of `bdev_nvme_set_options` set
/// (retry count, ACK timeout, TOS: Soft-RoCE takes all three).
fn perf_config(port: u16) -> Value {
    json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_nvme_set_options", "params": {"transport_retry_count": 6,
            "transport_ack_timeout": 14, "transport_tos": 32}},
        {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "RDMA",
            "adrfam": "IPv4", "traddr": GUEST_IP, "trsvcid": port.to_string(), "subnqn": NQN}}
    ]}]})
}

#[test]
fn bdev_nvme_over_rdma_in_guest() {
    const TEST: &str = "bdev_nvme_over_rdma_in_guest";
    let Some(lab) = lab::Lab::get_or_skip(TEST) else {
        return;
    };
    let Some(rdma) = lab.soft_roce_or_skip(TEST) else {
        return;
    };
    let tgt = lab::stripped(Path::new(env!("CARGO_BIN_EXE_spdk_tgt")), lab.root());
    let perf = lab::stripped(&common::bdevperf(), lab.root());
    let scratch = lab
        .root()
        .join(format!("nvme-rdma-host-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let mut cfg = lab::GuestConfig::new("nvme-rdma-host", SCRIPT);
    cfg.image = rdma.with_modules(&["nvmet", "nvmet_rdma", "null_blk"]);
    cfg.image.binaries.extend([tgt.clone(), perf.clone()]);
    for (name, v) in [
        ("tgt.json", target_config()),
        ("perf-ours.json", perf_config(OURS)),
        ("perf-kernel.json", perf_config(KERNEL)),
    ] {
        let p = scratch.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        cfg.files.push((p, format!("/opt/{name}")));
    }
    cfg.net = true;
    cfg.env.extend([
        ("SPDK_TGT".to_string(), tgt.display().to_string()),
        ("BDEVPERF".to_string(), perf.display().to_string()),
        ("NQN".to_string(), NQN.to_string()),
        ("GUEST_IP".to_string(), GUEST_IP.to_string()),
        ("OURS".to_string(), OURS.to_string()),
        ("KERNEL".to_string(), KERNEL.to_string()),
    ]);
    cfg.mem_mb = 1536;
    cfg.timeout = Duration::from_secs(420);
    let out = lab.run(&cfg).unwrap();
    let _ = std::fs::remove_dir_all(&scratch);
    let ctx = || format!("guest console ({}):\n{}", out.log.display(), out.console);
    assert!(out.success(), "guest script failed\n{}", ctx());
    for t in ["kernel", "ours"] {
        for bs in [4096, 131072] {
            let v = |k: &str| out.value(&format!("PERF_{k}_{t}_{bs}")).unwrap_or_default();
            assert_eq!(v("RC"), "0", "bdevperf against {t}, {bs}\n{}", ctx());
            assert_eq!(v("FAILS"), "0.00", "bdevperf against {t}, {bs}\n{}", ctx());
            let iops: f64 = v("IOPS").parse().unwrap_or(0.0);
            assert!(iops > 0.0, "bdevperf against {t}, {bs}: no I/O\n{}", ctx());
        }
    }
    assert_eq!(out.value("TGT_EXIT").as_deref(), Some("0"), "{}", ctx());
}
