//! NVMe-oF over RDMA with the Linux kernel as the host, both inside one QEMU/TCG guest of the `lab` crate on
//! Soft-RoCE (the host kernel has no RDMA): the guest adds an `rxe0` device on its NIC, starts this package's
//! `spdk_tgt` (with libibverbs, librdmacm and the rxe provider in the image) with a JSON config (a malloc bdev, the
//! RDMA transport, a subsystem listening on the guest's address, port 4420), then the kernel's `nvme_rdma` host
//! discovers and connects, writes a pattern with O_DIRECT through large transfers (keyed SGL: RDMA READ) and 4 KiB
//! ones (in-capsule data), reads both back (RDMA WRITE) and compares, and disconnects; the target must let go of
//! every queue pair and stop cleanly. The same then runs against a target with `no_srq` (receive queues per
//! queue pair) and in-capsule data of 8 KiB, in the same boot, which is stopped while the host is still connected:
//! it must close the queue pairs itself and exit 0.
//!
//! ```text
//! cargo test -p spdk-tgt --test nvmf_rdma_guest -- --nocapture
//! ```
//!
//! The test prints `SKIPPED ...` and passes when QEMU cannot run, nvme-cli or the RDMA user space cannot be
//! installed, or the kernel has no Soft-RoCE module. Logs: the guest console (with the targets' output, `TGT:`
//! lines) in `/var/tmp/spdk-rs-lab/logs/nvmf-rdma-guest.log`.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use lab::nvmf::NvmfGuest;
use serde_json::{json, Value};

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";
const SERIAL: &str = "SPDKRS00000000000043";
const MODEL: &str = "spdk-rs lab NVMe-oF RDMA";
/// The guest's address on its user-mode NIC, where the target listens.
const GUEST_IP: &str = "10.0.2.15";
const PORT: u16 = 4420;
/// The namespace: a malloc bdev of 32 MiB in 512-byte blocks.
const NS_BLOCKS: u64 = 65536;
const MIB: usize = 1 << 20;
/// The pattern the guest writes (1 MiB transfers at 1 MiB, 4 KiB transfers of its first 256 KiB at 8 MiB, four
/// concurrent writers at 12, 14, 16 and 18 MiB).
const PATTERN_LEN: usize = 2 * MIB;

/// The guest's run: both targets, one after the other.
const SCRIPT: &str = r#"
. /lab/nvmf.sh
nvmf_setup
P=/opt/pat
trap '[ -f /tmp/tgt.log ] && sed "s/^/TGT: /" /tmp/tgt.log' EXIT

step "Soft-RoCE: rdma link add rxe0 type rxe netdev eth0"
rdma link add rxe0 type rxe netdev eth0 || fail "rdma link add"
[ -e /dev/infiniband/rdma_cm ] || fail "no /dev/infiniband/rdma_cm"
ok "rxe0 on eth0 ($NVMF_ADDR)"

# run_target NAME CONFIG: starts spdk_tgt with CONFIG and waits for its RDMA listener.
run_target() {
  rm -f /tmp/tgt.log /tmp/spdk.sock
  $SPDK_TGT -m 0x1 --no-huge -s 512 --json "$2" -r /tmp/spdk.sock > /tmp/tgt.log 2>&1 &
  TGT=$!
  _t=600
  until grep -q "NVMe/RDMA Target Listening" /tmp/tgt.log; do
    kill -0 $TGT 2>/dev/null || fail "$1: spdk_tgt exited"
    [ $_t -gt 0 ] || fail "$1: spdk_tgt is not listening after 60 s"
    sleep 0.1; _t=$((_t - 1))
  done
  ok "$1: spdk_tgt listening"
}

# stop_target NAME: SIGTERM, and the exit code.
stop_target() {
  kill $TGT
  wait $TGT
  echo "$1_TGT_EXIT=$?"
}

# host_io NAME: discovery, connect, data both ways, disconnect.
host_io() {
  step "$1: discover"
  nvmf_discover || { cat /tmp/nvmf-discover; fail "$1: nvme discover -t rdma"; }
  cat /tmp/nvmf-discover
  nvmf_discovered "$NVMF_NQN" || fail "$1: the discovery log page does not list $NVMF_NQN"
  echo "$1_DISCOVERY_TRTYPE=$(sed -n 's/^trtype: *//p' /tmp/nvmf-discover | head -1)"
  ok "$1: discovery lists $NVMF_NQN"

  step "$1: connect"
  nvmf_connect "$NVMF_NQN" --nr-io-queues=2 || { cat /tmp/nvmf-connect; nvmf_dmesg; fail "$1: nvme connect -t rdma"; }
  C=$(nvmf_ctrl) || { nvmf_dmesg; fail "$1: no controller for $NVMF_NQN"; }
  echo "$1_TRANSPORT=$(cat /sys/class/nvme/$C/transport)"
  echo "$1_QUEUE_COUNT=$(cat /sys/class/nvme/$C/queue_count)"
  nvmf_id_ctrl "$C" "$1_CTRL_" || fail "$1: nvme id-ctrl"
  N=$(nvmf_ns_dev 1) || fail "$1: no block device for namespace 1"
  echo "$1_NS_SECTORS=$(cat /sys/block/$N/size)"
  ok "$1: connected ($C, /dev/$N)"

  step "$1: O_DIRECT 1 MiB writes (keyed SGL, RDMA READ) and read-back (RDMA WRITE)"
  nvmf_write $P $N 1 || fail "$1: write /dev/$N"
  nvmf_read_compare $P $N 1 || fail "$1: read-back mismatch (1 MiB transfers)"
  ok "$1: 1 MiB transfers"

  step "$1: O_DIRECT 4 KiB writes (in-capsule data) and read-back"
  dd if=$P of=/tmp/pat4k bs=4k count=64 2>/dev/null
  dd if=/tmp/pat4k of=/dev/$N bs=4k seek=2048 oflag=direct conv=notrunc,fsync 2>/tmp/nvmf-dd \
    || { cat /tmp/nvmf-dd; fail "$1: 4 KiB writes"; }
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/$N of=/tmp/back4k bs=4k skip=2048 count=64 iflag=direct 2>/tmp/nvmf-dd \
    || { cat /tmp/nvmf-dd; fail "$1: 4 KiB reads"; }
  cmp /tmp/pat4k /tmp/back4k || fail "$1: read-back mismatch (4 KiB transfers)"
  ok "$1: 4 KiB transfers"

  step "$1: 4 concurrent O_DIRECT writers, then read-back"
  _pids=""
  for _i in 0 1 2 3; do
    dd if=$P of=/dev/$N bs=1M seek=$((12 + _i * 2)) oflag=direct conv=notrunc 2>/dev/null &
    _pids="$_pids $!"
  done
  for _p in $_pids; do wait $_p || fail "$1: a concurrent writer failed"; done
  for _i in 0 1 2 3; do
    nvmf_read_compare $P $N $((12 + _i * 2)) || fail "$1: read-back mismatch (concurrent writer $_i)"
  done
  ok "$1: concurrent transfers"
}

# host_disconnect NAME: the host disconnects; the target closes all 4 queue pairs it had (discovery included).
host_disconnect() {
  step "$1: disconnect"
  nvmf_disconnect || fail "$1: nvme disconnect"
  _t=100
  until [ "$(grep -c 'nvmf_rdma: connection from .* closed' /tmp/tgt.log)" -ge 4 ]; do
    [ $_t -gt 0 ] || fail "$1: the target did not close every queue pair"
    sleep 0.1; _t=$((_t - 1))
  done
  echo "$1_CLOSED=$(grep -c 'nvmf_rdma: connection from .* closed' /tmp/tgt.log)"
  ok "$1: disconnected"
}

run_target SRQ /opt/srq.json
host_io SRQ
host_disconnect SRQ
stop_target SRQ
sed "s/^/TGT: /" /tmp/tgt.log

run_target NOSRQ /opt/nosrq.json
host_io NOSRQ
step "NOSRQ: stop the target with the host connected"
stop_target NOSRQ
echo "NOSRQ_CLOSED_BY_TARGET=$(grep -c 'nvmf_rdma: connection from .* closed: disconnected by the target' /tmp/tgt.log)"
nvmf_disconnect || fail "NOSRQ: nvme disconnect after the target stopped"
ok "NOSRQ: target stopped, host disconnected"
nvmf_dmesg
ok "done"
"#;

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut v)
        .unwrap();
    v
}

/// The target's JSON config: a malloc bdev, the RDMA transport with `transport` options, the subsystem and the
/// discovery subsystem listening on the guest's address.
fn config(transport: Value) -> Value {
    let la = json!({"trtype": "RDMA", "adrfam": "IPv4", "traddr": GUEST_IP,
                    "trsvcid": PORT.to_string()});
    let mut tp = transport;
    tp["trtype"] = json!("RDMA");
    json!({"subsystems": [
        {"subsystem": "bdev", "config": [
            lab::nvmf::malloc_bdev("Malloc0", NS_BLOCKS, 512),
            {"method": "bdev_wait_for_examine"}
        ]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": tp},
            {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "serial_number": SERIAL,
                "model_number": MODEL, "allow_any_host": true}},
            {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN,
                "namespace": {"bdev_name": "Malloc0", "nsid": 1}}},
            {"method": "nvmf_subsystem_add_listener", "params": {"nqn": NQN, "listen_address": la}},
            {"method": "nvmf_subsystem_add_listener", "params": {"nqn": lab::nvmf::DISCOVERY_NQN,
                "listen_address": la}}
        ]}
    ]})
}

#[test]
fn kernel_nvme_rdma_host_in_guest() {
    const TEST: &str = "kernel_nvme_rdma_host_in_guest";
    let t0 = Instant::now();
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_spdk_tgt"));
    let Some(lab) = lab::Lab::get_or_skip(TEST) else {
        return;
    };
    // Soft-RoCE and the RDMA user space the guest needs (iproute2's `rdma`, the rxe provider).
    let Some(rdma) = lab.soft_roce_or_skip(TEST) else {
        return;
    };
    let tgt = lab::stripped(&binary, lab.root());

    let guest = NvmfGuest::new(PORT, NQN);
    let mut cfg = lab::GuestConfig::new("nvmf-rdma-guest", SCRIPT);
    cfg.image = rdma
        .with_modules(&["nvme_rdma"])
        .with_binaries(&["/usr/bin/cmp"]);
    cfg.image.binaries.push(tgt.clone());
    guest.apply(&mut cfg);
    if lab.image_or_skip(TEST, &cfg.image).is_none() {
        return;
    }
    // The host is the guest itself: the target listens on the guest's own address.
    cfg.env.retain(|(k, _)| k != "NVMF_ADDR");
    cfg.env.extend([
        ("NVMF_ADDR".to_string(), GUEST_IP.to_string()),
        ("NVMF_TRANSPORT".to_string(), "rdma".to_string()),
        ("SPDK_TGT".to_string(), tgt.display().to_string()),
    ]);

    let scratch = std::env::temp_dir().join(format!("spdk-rs-nvmf-rdma-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let pat = scratch.join("pat");
    std::fs::write(&pat, random_bytes(PATTERN_LEN)).unwrap();
    let srq = scratch.join("srq.json");
    // A small shared receive queue keeps the guest's memory use low; the rest are SPDK's defaults.
    std::fs::write(&srq, config(json!({"max_srq_depth": 256})).to_string()).unwrap();
    let nosrq = scratch.join("nosrq.json");
    std::fs::write(
        &nosrq,
        config(json!({"no_srq": true, "num_cqe": 64, "in_capsule_data_size": 8192})).to_string(),
    )
    .unwrap();
    cfg.files.push((pat, "/opt/pat".into()));
    cfg.files.push((srq, "/opt/srq.json".into()));
    cfg.files.push((nosrq, "/opt/nosrq.json".into()));
    cfg.mem_mb = 1024;
    cfg.timeout = Duration::from_secs(420);

    let out = lab.run(&cfg).unwrap();
    let _ = std::fs::remove_dir_all(&scratch);
    let ctx = || format!("guest console ({}):\n{}", out.log.display(), out.console);
    assert!(out.success(), "guest script failed\n{}", ctx());
    let val = |k: &str| out.value(k).unwrap_or_default();
    for (run, ioccsz) in [("SRQ", "260"), ("NOSRQ", "516")] {
        let v = |k: &str| val(&format!("{run}_{k}"));
        // SPDK's RDMA controller data: 16 SGL descriptors per capsule, the SQE plus in-capsule data (4 or 8 KiB)
        // in 16-byte units, keyed SGLs supported.
        assert_eq!(v("CTRL_MSDBD"), "16", "{}", ctx());
        assert_eq!(v("CTRL_IOCCSZ"), ioccsz, "{}", ctx());
        assert_eq!(v("CTRL_SGLS"), "0x100005", "{}", ctx());
        assert_eq!(v("DISCOVERY_TRTYPE"), "rdma", "{}", ctx());
        assert_eq!(v("TRANSPORT"), "rdma", "{}", ctx());
        // 2 I/O queues + the admin queue.
        assert_eq!(v("QUEUE_COUNT"), "3", "{}", ctx());
        assert_eq!(v("CTRL_SN"), SERIAL, "{}", ctx());
        assert_eq!(v("CTRL_MN"), MODEL, "{}", ctx());
        assert_eq!(v("CTRL_SUBNQN"), NQN, "{}", ctx());
        assert_eq!(v("NS_SECTORS"), NS_BLOCKS.to_string(), "{}", ctx());
        assert_eq!(v("TGT_EXIT"), "0", "{}", ctx());
    }
    // The target closed the admin and both I/O queue pairs itself when stopped with the host connected.
    assert_eq!(val("NOSRQ_CLOSED_BY_TARGET"), "3", "{}", ctx());
    eprintln!(
        "{TEST}: guest ran {:.1} s, total {:.1} s",
        out.duration.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
