//! The storage node's bottom layer in a QEMU/TCG guest: QEMU's emulated NVMe controller behind an intel-iommu,
//! bound to vfio-pci by `scripts/setup.sh`, driven by this package's `spdk_tgt` through `bdev_nvme_attach_controller
//! -t PCIe` (our VFIO driver), and exported over NVMe/TCP to the guest kernel's own NVMe/TCP host on the loopback:
//! the kernel writes a pattern through target -> bdev_nvme -> PCIe queue pairs (two reactors, two I/O queues) ->
//! the emulated drive, reads it back, and the host test finds it in the drive's backing file after the guest is
//! gone. On the way, from the host through `spdk-rpc` (TCP, bridged to the target's socket by socat in the
//! guest): `bdev_get_bdevs` (size, block size, PCI address), `bdev_nvme_get_controllers` (trid),
//! `bdev_nvme_get_controller_health_info`, `save_config`, two controller resets under a write/read load, detach
//! and re-attach, an lvstore created on the namespace and found again after a re-attach; flush, write zeroes and
//! deallocate from the kernel host; `bdevperf -w verify` on every core (4 KiB, and 128 KiB through PRP lists);
//! then the target is killed with SIGKILL and a new one takes the same device and reads the data back.
//!
//! ```text
//! cargo test -p spdk-tgt --test nvme_pcie_guest -- --nocapture
//! ```
//!
//! Prints `SKIPPED ...` and passes when QEMU cannot run or the guest kernel has no vfio-pci. Logs: the guest
//! console (target output as `TGT:` lines) in `/var/tmp/spdk-rs-lab/logs/nvme-pcie-guest.log`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lab::nvmf::{NvmfGuest, Subsystem, TcpConfig};
use serde_json::{json, Value};

const NQN: &str = "nqn.2016-06.io.spdk:pcie";
const SERIAL: &str = "SPDKRSPCIE0001";
/// The emulated drive: 64 MiB, 512-byte blocks (QEMU's default format).
const DRIVE: u64 = 64 << 20;
/// Where the guest writes its pattern (MiB), and how much.
const PAT_MIB: u64 = 48;
const PAT_LEN: usize = 1 << 20;
/// Guest PCI slot of the controller.
const SLOT: u8 = 4;
const GUEST_RPC_PORT: u16 = 5260;

const SCRIPT: &str = r#"
. /lab/nvmf.sh
nvmf_setup

step "setup.sh binds $BDF to vfio-pci"
HUGEMEM=0 PCI_ALLOWED=$BDF sh /lab/setup.sh config || fail "setup.sh config"
[ "$(basename $(readlink /sys/bus/pci/devices/$BDF/driver))" = vfio-pci ] || fail "$BDF is not on vfio-pci"
ok "$BDF on vfio-pci"

# start_tgt NAME: spdk_tgt on two cores with the PCIe controller and the NVMe/TCP export of its namespace.
# Its log goes to the console as it is written (TGT: lines), so a host-side failure shows it too.
start_tgt() {
  rm -f /tmp/spdk.sock
  $SPDK_TGT -m 0x3 --no-huge -s 256 --json /opt/tgt.json -r /tmp/spdk.sock > /tmp/tgt-$1.log 2>&1 &
  TGT=$!
  tail -f /tmp/tgt-$1.log | sed "s/^/TGT: /" &
  _t=600
  until grep -q "NVMe/TCP Target Listening" /tmp/tgt-$1.log; do
    kill -0 $TGT 2>/dev/null || fail "$1: spdk_tgt exited"
    [ $_t -gt 0 ] || fail "$1: spdk_tgt is not listening after 60 s"
    sleep 0.1; _t=$((_t - 1))
  done
  ok "$1: spdk_tgt up, Nvme0 attached over VFIO"
}

# io NAME WRITE: connects the kernel host, writes the pattern (when WRITE is 1), reads it back, disconnects.
io() {
  nvmf_connect "$NVMF_NQN" --nr-io-queues=2 || { cat /tmp/nvmf-connect; nvmf_dmesg; fail "$1: nvme connect"; }
  D=$(nvmf_ns_dev 1) || { nvmf_dmesg; fail "$1: no namespace block device"; }
  nvmf_id_ns $D "$1_NS_" || fail "$1: id-ns"
  if [ "$2" = 1 ]; then
    nvmf_write /opt/pat $D $PAT_MIB || fail "$1: write"
  fi
  nvmf_read_compare /opt/pat $D $PAT_MIB || fail "$1: the data read back differs"
  nvmf_disconnect || fail "$1: disconnect"
  ok "$1: pattern read back"
}

# load MIB: writes the pattern at MIB MiB and reads it back, over and over until /tmp/stop (at least twice).
load() {
  _n=0
  while [ ! -e /tmp/stop ] || [ $_n -lt 2 ]; do
    dd if=/opt/pat of=/dev/$D bs=64k seek=$(($1 * 16)) oflag=direct conv=notrunc 2>/tmp/load.$1 \
      || { cat /tmp/load.$1; echo "LOAD_ERROR_$1=write"; exit 1; }
    dd if=/dev/$D of=/tmp/back.$1 bs=64k skip=$(($1 * 16)) count=16 iflag=direct 2>/tmp/load.$1 \
      || { cat /tmp/load.$1; echo "LOAD_ERROR_$1=read"; exit 1; }
    cmp -s /opt/pat /tmp/back.$1 || { echo "LOAD_ERROR_$1=compare"; exit 1; }
    _n=$((_n + 1))
  done
  echo "LOAD_ROUNDS_$1=$_n"
}

# zeroed MIB: whether the MiB at MIB MiB reads back as zeroes.
zeroed() {
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/$D of=/tmp/z bs=64k skip=$(($1 * 16)) count=16 iflag=direct 2>/dev/null || return 1
  head -c 1048576 /dev/zero | cmp -s - /tmp/z
}

# The RPC bridge first: it listens long before the host's first call (it connects to the target per call).
socat TCP-LISTEN:$RPC_PORT,fork,reuseaddr UNIX-CONNECT:/tmp/spdk.sock &
SOCAT=$!
start_tgt first
host_sync rpc || fail "no answer from the host (rpc)"
io first 1

step "controller reset under a write/read load"
nvmf_connect "$NVMF_NQN" --nr-io-queues=2 || fail "reset: nvme connect"
D=$(nvmf_ns_dev 1) || fail "reset: no namespace block device"
rm -f /tmp/stop
load 8 & L1=$!
load 16 & L2=$!
host_sync reset || fail "no answer from the host (reset)"
touch /tmp/stop
wait $L1 || fail "the load at 8 MiB failed across the resets"
wait $L2 || fail "the load at 16 MiB failed across the resets"
ok "the load went on across the resets"

step "flush, write zeroes, deallocate"
nvme flush /dev/$D -n 1 || fail "nvme flush"
nvmf_write /opt/pat $D 32 && nvmf_write /opt/pat $D 33 || fail "write before zeroing"
# 2048 blocks of 512 bytes = 1 MiB at 32 MiB; the block count is 0-based.
nvme write-zeroes /dev/$D -n 1 --start-block=65536 --block-count=2047 || fail "nvme write-zeroes"
zeroed 32 && echo "WRITE_ZEROES=zeroed" || echo "WRITE_ZEROES=not zeroed"
nvme dsm /dev/$D -n 1 --ad --slbs=67584 --blocks=2048 || fail "nvme dsm deallocate"
zeroed 33 && echo "DEALLOCATE=zeroed" || echo "DEALLOCATE=not zeroed"
nvmf_disconnect || fail "disconnect after the load"
ok "flush, write zeroes, deallocate"

host_sync detach || fail "no answer from the host (detach)"
io reattached 0
host_sync lvol || fail "no answer from the host (lvol)"
kill $TGT; wait $TGT; echo "TGT_EXIT=$?"

step "bdevperf -w verify on the namespace, every core (two I/O queues), 4 KiB and 128 KiB (PRP lists)"
for bs in 4096 131072; do
  $BDEVPERF -m 0x3 -C --no-huge -s 256 --json /opt/perf.json -q 16 -o $bs -w verify -t 3 > /tmp/perf.$bs 2>&1
  echo "PERF_RC_$bs=$?"
  sed "s/^/PERF: /" /tmp/perf.$bs | tail -6
  # Total: IOPS, MiB/s, failures/s.
  tr -d '\r' < /tmp/perf.$bs > /tmp/perf.txt
  echo "PERF_IOPS_$bs=$(awk '$1 == "Total" && $2 == ":" {print $3}' /tmp/perf.txt)"
  echo "PERF_FAILS_$bs=$(awk '$1 == "Total" && $2 == ":" {print $5}' /tmp/perf.txt)"
done

start_tgt again
# Creating the lvstore deallocated the whole namespace (SPDK's default clear method) and bdevperf wrote all
# over it: the pattern again.
io rewritten 1

step "SIGKILL, then a new target on the same device"
kill -9 $TGT; wait $TGT
start_tgt restarted
io restarted 0
kill $TGT; wait $TGT; echo "TGT_EXIT_LAST=$?"
kill $SOCAT 2>/dev/null

"#;

/// `spdk-rpc` against the guest's target through the forwarded port; the JSON it prints (Null when nothing).
/// A failure panics with the guest's console so far (the target's log is in it).
fn rpc(guest: &lab::RunningGuest, port: u16, args: &[&str]) -> Value {
    let out = Command::new("spdk-rpc")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-t", "60"])
        .args(args)
        .output()
        .expect("spdk-rpc is installed (pip install spdk)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "spdk-rpc {args:?}: {}{}\nguest console:\n{}",
        text,
        String::from_utf8_lossy(&out.stderr),
        guest.console()
    );
    if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text.trim().to_string()))
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What both guests start from: the lab (None after printing SKIPPED when it, or vfio-pci in the guest kernel,
/// is missing), a stripped `spdk_tgt`, a scratch directory, and the emulated drive's backing file in it.
struct Setup {
    lab: lab::Lab,
    tgt: std::path::PathBuf,
    scratch: std::path::PathBuf,
    drive: std::path::PathBuf,
}

fn setup(test: &str, tag: &str) -> Option<Setup> {
    let lab = lab::Lab::get_or_skip(test)?;
    let kmod = format!(
        "/lib/modules/{}/kernel/drivers/vfio/pci",
        lab.kernel_version()
    );
    if !Path::new(&kmod).exists() {
        eprintln!("SKIPPED {test}: the guest kernel has no vfio-pci module");
        return None;
    }
    let tgt = lab::stripped(Path::new(env!("CARGO_BIN_EXE_spdk_tgt")), lab.root());
    let scratch = lab.root().join(format!("{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let drive = scratch.join("drive.img");
    std::fs::File::create(&drive)
        .unwrap()
        .set_len(DRIVE)
        .unwrap();
    Some(Setup {
        lab,
        tgt,
        scratch,
        drive,
    })
}

#[test]
fn pcie_controller_over_vfio_in_guest() {
    const TEST: &str = "pcie_controller_over_vfio_in_guest";
    let t0 = Instant::now();
    let Some(Setup {
        lab,
        tgt,
        scratch,
        drive,
    }) = setup(TEST, "nvme-pcie")
    else {
        return;
    };
    let pat = scratch.join("pat");
    let pattern = random_bytes(PAT_LEN);
    std::fs::write(&pat, &pattern).unwrap();

    let mut cfg = lab::GuestConfig::new("nvme-pcie-guest", SCRIPT);
    let bdf = cfg.vfio_nvme(SERIAL, &drive, SLOT, "");
    let attach = json!({"method": "bdev_nvme_attach_controller",
        "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": bdf}});
    let mut tc = TcpConfig::new(4420);
    tc.addr = "127.0.0.1".into();
    tc.bdevs.push(attach);
    let mut s = Subsystem::new(NQN);
    s.namespaces.push((1, "Nvme0n1".into()));
    tc.subsystems.push(s);
    let perf_json = scratch.join("perf.json");
    let bdev_only = json!({"subsystems": [{"subsystem": "bdev", "config": [tc.bdevs[0].clone()]}]});
    std::fs::write(&perf_json, bdev_only.to_string()).unwrap();
    let tgt_json = scratch.join("tgt.json");
    std::fs::write(&tgt_json, tc.to_json().to_string()).unwrap();

    let guest = NvmfGuest::new(4420, NQN);
    guest.apply(&mut cfg);
    cfg.image = cfg
        .image
        .clone()
        .with_binaries(&["/usr/bin/socat", "/usr/bin/cmp"])
        .with_packages(&["socat"]);
    cfg.image.binaries.push(tgt.clone());
    let perf = lab::stripped(&common::bdevperf(), lab.root());
    cfg.image.binaries.push(perf.clone());
    if lab.image_or_skip(TEST, &cfg.image).is_none() {
        return;
    }
    cfg.env.retain(|(k, _)| k != "NVMF_ADDR");
    let rpc_port = lab::nvmf::free_port().unwrap();
    cfg.host_forwards.push((rpc_port, GUEST_RPC_PORT));
    cfg.env.extend([
        ("NVMF_ADDR".to_string(), "127.0.0.1".to_string()),
        ("SPDK_TGT".to_string(), tgt.display().to_string()),
        ("BDEVPERF".to_string(), perf.display().to_string()),
        ("BDF".to_string(), bdf.clone()),
        ("PAT_MIB".to_string(), PAT_MIB.to_string()),
        ("RPC_PORT".to_string(), GUEST_RPC_PORT.to_string()),
    ]);
    cfg.files.push((pat, "/opt/pat".into()));
    cfg.files.push((tgt_json, "/opt/tgt.json".into()));
    cfg.files.push((perf_json, "/opt/perf.json".into()));
    cfg.mem_mb = 1024;
    cfg.timeout = Duration::from_secs(600);
    let hs = lab::sync::Handshake::new().expect("a port for the guest handshake");
    hs.apply(&mut cfg);

    let running = lab.spawn(&cfg).unwrap();
    let at = hs
        .wait(&running, "rpc", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}\n{}", running.console()));
    // What the target reports of the controller and its namespace.
    let bdevs = rpc(&running, rpc_port, &["bdev_get_bdevs", "-b", "Nvme0n1"]);
    let b = &bdevs[0];
    assert_eq!(b["block_size"], 512, "{bdevs:#}");
    assert_eq!(b["num_blocks"], DRIVE / 512, "{bdevs:#}");
    let nvme = &b["driver_specific"]["nvme"][0];
    assert_eq!(nvme["trid"]["trtype"], "PCIe", "{bdevs:#}");
    assert_eq!(nvme["trid"]["traddr"], bdf.as_str(), "{bdevs:#}");
    assert_eq!(nvme["ctrlr_data"]["serial_number"], SERIAL, "{bdevs:#}");
    assert_eq!(nvme["pci_address"], bdf.as_str(), "{bdevs:#}");
    // QEMU names its controller's subsystem after the serial; VS 1.4.
    assert_eq!(
        nvme["ctrlr_data"]["subnqn"],
        format!("nqn.2019-08.org.qemu:{SERIAL}").as_str(),
        "{bdevs:#}"
    );
    assert_eq!(nvme["vs"]["nvme_version"], "1.4", "{bdevs:#}");
    assert_eq!(nvme["ns_data"]["id"], 1, "{bdevs:#}");
    let ctrlrs = rpc(
        &running,
        rpc_port,
        &["bdev_nvme_get_controllers", "-n", "Nvme0"],
    );
    let trid = &ctrlrs[0]["ctrlrs"][0]["trid"];
    assert_eq!(
        *trid,
        json!({"trtype": "PCIe", "traddr": bdf}),
        "{ctrlrs:#}"
    );
    // The I/O so far went through PCIe queues: SPDK's PCIe counters, doorbells batched per poll.
    let st = rpc(&running, rpc_port, &["bdev_nvme_get_transport_statistics"]);
    let pcie: Vec<&Value> = st["poll_groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["transports"].as_array().unwrap())
        .filter(|t| t["trname"] == "PCIe")
        .collect();
    let sum = |k: &str| pcie.iter().map(|t| t[k].as_u64().unwrap()).sum::<u64>();
    assert!(
        sum("completions") > 0 && sum("submitted_requests") > 0,
        "{st:#}"
    );
    assert!(
        (1..=sum("submitted_requests")).contains(&sum("sq_mmio_doorbell_updates"))
            && (1..=sum("completions")).contains(&sum("cq_mmio_doorbell_updates")),
        "{st:#}"
    );
    let health = rpc(
        &running,
        rpc_port,
        &["bdev_nvme_get_controller_health_info", "-c", "Nvme0"],
    );
    assert_eq!(health["traddr"], bdf.as_str(), "{health:#}");
    assert_eq!(health["serial_number"], SERIAL, "{health:#}");
    assert!(
        health["temperature_celsius"].as_u64().is_some(),
        "{health:#}"
    );
    let saved = rpc(&running, rpc_port, &["save_config"]);
    let entry = saved["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subsystem"] == "bdev")
        .and_then(|s| {
            s["config"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["method"] == "bdev_nvme_attach_controller")
                .cloned()
        })
        .unwrap_or_else(|| panic!("no attach entry in {saved:#}"));
    assert_eq!(entry["params"]["trtype"], "PCIe", "{entry:#}");
    assert_eq!(entry["params"]["traddr"], bdf.as_str(), "{entry:#}");
    at.reply("go").unwrap();

    // Two controller resets while the guest writes and reads: its I/O waits and goes on.
    let at = hs
        .wait(&running, "reset", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}\n{}", running.console()));
    for _ in 0..2 {
        rpc(&running, rpc_port, &["bdev_nvme_reset_controller", "Nvme0"]);
        std::thread::sleep(Duration::from_millis(500));
    }
    at.reply("go").unwrap();

    let at = hs
        .wait(&running, "detach", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}\n{}", running.console()));
    // Detach (the controller is shut down and let go), attach again, and give the namespace back to the
    // subsystem (removing the bdev took it away).
    rpc(
        &running,
        rpc_port,
        &["bdev_nvme_detach_controller", "Nvme0"],
    );
    let gone = rpc(&running, rpc_port, &["bdev_get_bdevs"]);
    assert!(
        gone.as_array()
            .unwrap()
            .iter()
            .all(|b| b["name"] != "Nvme0n1"),
        "{gone:#}"
    );
    let names = rpc(
        &running,
        rpc_port,
        &[
            "bdev_nvme_attach_controller",
            "-b",
            "Nvme0",
            "-t",
            "PCIe",
            "-a",
            &bdf,
        ],
    );
    // spdk-rpc prints the bdev names one per line.
    assert_eq!(names, json!("Nvme0n1"));
    rpc(
        &running,
        rpc_port,
        &["nvmf_subsystem_add_ns", NQN, "Nvme0n1", "-n", "1"],
    );
    at.reply("go").unwrap();

    // An lvstore on the PCIe namespace (taken out of the subsystem first: a namespace claims its bdev, as in
    // SPDK), with 1 MiB clusters (its lvol takes the first few, clear of the pattern); detached and attached
    // again, the controller's namespace is examined and the lvstore and its lvol come back from the device.
    let at = hs
        .wait(&running, "lvol", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}\n{}", running.console()));
    rpc(&running, rpc_port, &["nvmf_subsystem_remove_ns", NQN, "1"]);
    rpc(
        &running,
        rpc_port,
        &[
            "bdev_lvol_create_lvstore",
            "Nvme0n1",
            "lvs0",
            "-c",
            "1048576",
        ],
    );
    rpc(
        &running,
        rpc_port,
        &["bdev_lvol_create", "-l", "lvs0", "lv0", "4"],
    );
    rpc(
        &running,
        rpc_port,
        &["bdev_nvme_detach_controller", "Nvme0"],
    );
    rpc(
        &running,
        rpc_port,
        &[
            "bdev_nvme_attach_controller",
            "-b",
            "Nvme0",
            "-t",
            "PCIe",
            "-a",
            &bdf,
        ],
    );
    rpc(&running, rpc_port, &["bdev_wait_for_examine"]);
    let lvs = rpc(&running, rpc_port, &["bdev_lvol_get_lvstores"]);
    assert_eq!(lvs[0]["name"], "lvs0", "{lvs:#}");
    assert_eq!(lvs[0]["base_bdev"], "Nvme0n1", "{lvs:#}");
    assert_eq!(lvs[0]["cluster_size"], 1 << 20, "{lvs:#}");
    let lv = rpc(&running, rpc_port, &["bdev_get_bdevs", "-b", "lvs0/lv0"]);
    assert_eq!(lv[0]["num_blocks"], 4 * 2048, "{lv:#}");
    rpc(
        &running,
        rpc_port,
        &["bdev_lvol_delete_lvstore", "-l", "lvs0"],
    );
    rpc(
        &running,
        rpc_port,
        &["nvmf_subsystem_add_ns", NQN, "Nvme0n1", "-n", "1"],
    );
    at.reply("go").unwrap();

    let out = running.wait().unwrap();
    let ctx = || format!("guest console ({}):\n{}", out.log.display(), out.console);
    assert!(out.success(), "guest script failed\n{}", ctx());
    for run in ["first", "reattached", "rewritten", "restarted"] {
        assert_eq!(
            out.value(&format!("{run}_NS_NSZE")).as_deref(),
            Some(&*(DRIVE / 512).to_string()),
            "{}",
            ctx()
        );
    }
    assert_eq!(out.value("TGT_EXIT").as_deref(), Some("0"), "{}", ctx());
    assert_eq!(
        out.value("TGT_EXIT_LAST").as_deref(),
        Some("0"),
        "{}",
        ctx()
    );
    // The lvstore unloaded cleanly at the detach: its writes reached the device before the controller went.
    assert!(
        !out.console.contains("unloading: write"),
        "the lvstore's unload writes failed at the detach\n{}",
        ctx()
    );
    for bs in [4096, 131072] {
        let v = |k: &str| out.value(&format!("PERF_{k}_{bs}")).unwrap_or_default();
        assert_eq!(v("RC"), "0", "bdevperf -o {bs}\n{}", ctx());
        assert_eq!(v("FAILS"), "0.00", "bdevperf -o {bs}\n{}", ctx());
        let iops: f64 = v("IOPS").parse().unwrap_or(0.0);
        assert!(iops > 0.0, "bdevperf -o {bs}: no I/O\n{}", ctx());
    }
    assert_eq!(
        out.value("WRITE_ZEROES").as_deref(),
        Some("zeroed"),
        "{}",
        ctx()
    );
    assert_eq!(
        out.value("DEALLOCATE").as_deref(),
        Some("zeroed"),
        "{}",
        ctx()
    );
    for mib in [8, 16] {
        let rounds: u32 = out
            .value(&format!("LOAD_ROUNDS_{mib}"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(rounds >= 2, "load at {mib} MiB: {rounds} rounds\n{}", ctx());
    }
    // The pattern is in the drive's backing file, where the guest kernel put it through our driver.
    let img = std::fs::read(&drive).unwrap();
    let at = (PAT_MIB << 20) as usize;
    assert!(
        img[at..at + PAT_LEN] == pattern[..],
        "the backing file does not hold the pattern at {PAT_MIB} MiB\n{}",
        ctx()
    );
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!(
        "{TEST}: guest ran {:.1} s, total {:.1} s",
        out.duration.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// Hotplug: the target runs with `bdev_nvme_set_hotplug` on and no controller; the controller is bound to
/// vfio-pci afterwards and appears as `HotInNvme0n1`; given back to the kernel while attached (setup.sh reset),
/// the target lets go when vfio-pci asks (the unbind would wait forever otherwise) and the kernel's nvme driver
/// takes it; bound again, it comes back as `HotInNvme1`.
const HOTPLUG_SCRIPT: &str = r#"
. /lab/lib.sh
$SPDK_TGT -m 0x1 --no-huge -s 256 --json /opt/hot.json -r /tmp/spdk.sock > /tmp/tgt.log 2>&1 &
TGT=$!
tail -f /tmp/tgt.log | sed "s/^/TGT: /" &
# wait_log TEXT SECONDS: waits until the target logged TEXT.
wait_log() {
  _t=$(($2 * 10))
  until grep -q "$1" /tmp/tgt.log; do [ $_t -gt 0 ] || return 1; sleep 0.1; _t=$((_t - 1)); done
}
drv() { basename "$(readlink /sys/bus/pci/devices/$BDF/driver)"; }
wait_log "spdk_tgt is ready" 60 || fail "spdk_tgt not ready"

step "bind the controller while the target runs: hotplug attaches it"
HUGEMEM=0 PCI_ALLOWED=$BDF sh /lab/setup.sh config || fail "setup.sh config"
wait_log 'HotInNvme0 (0000:00:04.0): bdevs \["HotInNvme0n1"\]' 30 || fail "not hot-attached"
ok "HotInNvme0n1"

step "give it back to the kernel while attached"
(HUGEMEM=0 PCI_ALLOWED=$BDF sh /lab/setup.sh reset; echo $? > /tmp/reset.rc) &
_t=300; until [ -e /tmp/reset.rc ] || [ $_t -eq 0 ]; do sleep 0.1; _t=$((_t - 1)); done
if [ ! -e /tmp/reset.rc ]; then
  tail -15 /tmp/tgt.log | sed "s/^/LOG: /"
  ls -l /proc/$TGT/fd | grep -c vfio | sed "s/^/VFIO_FDS: /"
  fail "the unbind still waits after 30 s"
fi
echo "RESET_RC=$(cat /tmp/reset.rc)"
wait_log "removed: detaching" 10 || fail "the target did not let go"
echo "DRIVER_AFTER_RESET=$(drv)"

step "bind it again: attached again"
HUGEMEM=0 PCI_ALLOWED=$BDF sh /lab/setup.sh config || fail "setup.sh config again"
wait_log 'HotInNvme1 (0000:00:04.0): bdevs \["HotInNvme1n1"\]' 30 || fail "not hot-attached again"
ok "HotInNvme1n1"
kill $TGT; wait $TGT; echo "TGT_EXIT=$?"
"#;

#[test]
fn pcie_hotplug_in_guest() {
    const TEST: &str = "pcie_hotplug_in_guest";
    let Some(Setup {
        lab,
        tgt,
        scratch,
        drive,
    }) = setup(TEST, "nvme-hotplug")
    else {
        return;
    };
    let mut cfg = lab::GuestConfig::new("nvme-pcie-hotplug", HOTPLUG_SCRIPT);
    let bdf = cfg.vfio_nvme(SERIAL, &drive, SLOT, "");
    let conf = json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_nvme_set_hotplug", "params": {"enable": true, "period_us": 100000}}]}]});
    let conf_path = scratch.join("hot.json");
    std::fs::write(&conf_path, conf.to_string()).unwrap();
    cfg.image = cfg.image.clone().with_extra_modules(&["nvme"]);
    cfg.image.binaries.push(tgt.clone());
    cfg.files.push((conf_path, "/opt/hot.json".into()));
    cfg.env.extend([
        ("SPDK_TGT".to_string(), tgt.display().to_string()),
        ("BDF".to_string(), bdf),
    ]);
    cfg.timeout = Duration::from_secs(300);
    let out = lab.run(&cfg).unwrap();
    let _ = std::fs::remove_dir_all(&scratch);
    let ctx = || format!("guest console ({}):\n{}", out.log.display(), out.console);
    assert!(out.success(), "guest script failed\n{}", ctx());
    assert_eq!(out.value("RESET_RC").as_deref(), Some("0"), "{}", ctx());
    assert_eq!(
        out.value("DRIVER_AFTER_RESET").as_deref(),
        Some("nvme"),
        "{}",
        ctx()
    );
    assert_eq!(out.value("TGT_EXIT").as_deref(), Some("0"), "{}", ctx());
}
