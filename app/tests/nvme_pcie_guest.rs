//! The storage node's bottom layer in a QEMU/TCG guest: QEMU's emulated NVMe controller behind an intel-iommu,
//! bound to vfio-pci by `scripts/setup.sh`, driven by this package's `spdk_tgt` through `bdev_nvme_attach_controller
//! -t PCIe` (our VFIO driver), and exported over NVMe/TCP to the guest kernel's own NVMe/TCP host on the loopback:
//! the kernel writes a pattern through target -> bdev_nvme -> PCIe queue pairs (two reactors, two I/O queues) ->
//! the emulated drive, reads it back, and the host test finds it in the drive's backing file after the guest is
//! gone. On the way, from the host through `spdk-rpc` (TCP, bridged to the target's socket by socat in the
//! guest): `bdev_get_bdevs` (size, block size, PCI address), `bdev_nvme_get_controllers` (trid),
//! `bdev_nvme_get_controller_health_info`, detach and re-attach, `save_config`; then the target is killed with
//! SIGKILL and a new one takes the same device and reads the data back.
//!
//! ```text
//! cargo test -p spdk-tgt --test nvme_pcie_guest -- --nocapture
//! ```
//!
//! Prints `SKIPPED ...` and passes when QEMU cannot run or the guest kernel has no vfio-pci. Logs: the guest
//! console (target output as `TGT:` lines) in `/var/tmp/spdk-rs-lab/logs/nvme-pcie-guest.log`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lab::nvmf::{NvmfGuest, Subsystem, TcpConfig};
use serde_json::{json, Value};

const NQN: &str = "nqn.2016-06.io.spdk:pcie";
const SERIAL: &str = "SPDKRSPCIE0001";
/// The emulated drive: 64 MiB, 512-byte blocks (QEMU's default format).
const DRIVE: u64 = 64 << 20;
/// Where the guest writes its pattern (MiB), and how much.
const PAT_MIB: u64 = 3;
const PAT_LEN: usize = 1 << 20;
/// Guest PCI slot of the controller.
const SLOT: u8 = 4;
const GUEST_RPC_PORT: u16 = 5260;

const SCRIPT: &str = r#"
. /lab/nvmf.sh
nvmf_setup
trap '[ -f /tmp/tgt.log ] && sed "s/^/TGT: /" /tmp/tgt.log' EXIT

step "setup.sh binds $BDF to vfio-pci"
HUGEMEM=0 PCI_ALLOWED=$BDF sh /lab/setup.sh config || fail "setup.sh config"
[ "$(basename $(readlink /sys/bus/pci/devices/$BDF/driver))" = vfio-pci ] || fail "$BDF is not on vfio-pci"
ok "$BDF on vfio-pci"

# start_tgt NAME: spdk_tgt on two cores with the PCIe controller and the NVMe/TCP export of its namespace.
start_tgt() {
  rm -f /tmp/tgt.log /tmp/spdk.sock
  $SPDK_TGT -m 0x3 --no-huge -s 256 --json /opt/tgt.json -r /tmp/spdk.sock > /tmp/tgt.log 2>&1 &
  TGT=$!
  _t=600
  until grep -q "NVMe/TCP Target Listening" /tmp/tgt.log; do
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

start_tgt first
socat TCP-LISTEN:$RPC_PORT,fork,reuseaddr UNIX-CONNECT:/tmp/spdk.sock &
SOCAT=$!
host_sync rpc || fail "no answer from the host (rpc)"
io first 1
host_sync detach || fail "no answer from the host (detach)"
io reattached 0

step "SIGKILL, then a new target on the same device"
kill -9 $TGT; wait $TGT
start_tgt restarted
io restarted 0
kill $TGT; wait $TGT; echo "TGT_EXIT=$?"
kill $SOCAT 2>/dev/null
"#;

/// `spdk-rpc` against the guest's target through the forwarded port; the JSON it prints (Null when nothing).
fn rpc(port: u16, args: &[&str]) -> Value {
    let out = Command::new("spdk-rpc")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-t", "60"])
        .args(args)
        .output()
        .expect("spdk-rpc is installed (pip install spdk)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "spdk-rpc {args:?}: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
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

/// `spdk_tgt` without its debug information, cached by size and time (the image is cached by content).
fn stripped(binary: &Path, dir: &Path) -> PathBuf {
    let m = std::fs::metadata(binary).expect("spdk_tgt");
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let out = dir.join(format!("spdk_tgt-{:x}-{mtime:x}", m.len()));
    if !out.exists() {
        let tmp = out.with_extension("tmp");
        let st = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&tmp)
            .arg(binary)
            .status();
        if st.is_ok_and(|s| s.success()) {
            std::fs::rename(&tmp, &out).unwrap();
        } else {
            std::fs::copy(binary, &out).unwrap();
        }
    }
    out
}

#[test]
fn pcie_controller_over_vfio_in_guest() {
    const TEST: &str = "pcie_controller_over_vfio_in_guest";
    let t0 = Instant::now();
    let Some(lab) = lab::Lab::get_or_skip(TEST) else {
        return;
    };
    let kmod = format!(
        "/lib/modules/{}/kernel/drivers/vfio/pci",
        lab.kernel_version()
    );
    if !Path::new(&kmod).exists() {
        eprintln!("SKIPPED {TEST}: the guest kernel has no vfio-pci module");
        return;
    }
    let tgt = stripped(Path::new(env!("CARGO_BIN_EXE_spdk_tgt")), lab.root());
    let scratch = lab.root().join(format!("nvme-pcie-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let drive = scratch.join("drive.img");
    std::fs::File::create(&drive)
        .unwrap()
        .set_len(DRIVE)
        .unwrap();
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
    if lab.image_or_skip(TEST, &cfg.image).is_none() {
        return;
    }
    cfg.env.retain(|(k, _)| k != "NVMF_ADDR");
    let rpc_port = lab::nvmf::free_port().unwrap();
    cfg.host_forwards.push((rpc_port, GUEST_RPC_PORT));
    cfg.env.extend([
        ("NVMF_ADDR".to_string(), "127.0.0.1".to_string()),
        ("SPDK_TGT".to_string(), tgt.display().to_string()),
        ("BDF".to_string(), bdf.clone()),
        ("PAT_MIB".to_string(), PAT_MIB.to_string()),
        ("RPC_PORT".to_string(), GUEST_RPC_PORT.to_string()),
    ]);
    cfg.files.push((pat, "/opt/pat".into()));
    cfg.files.push((tgt_json, "/opt/tgt.json".into()));
    cfg.mem_mb = 1024;
    cfg.timeout = Duration::from_secs(600);
    let hs = lab::sync::Handshake::new().expect("a port for the guest handshake");
    hs.apply(&mut cfg);

    let running = lab.spawn(&cfg).unwrap();
    let at = hs
        .wait(&running, "rpc", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}\n{}", running.console()));
    // What the target reports of the controller and its namespace.
    let bdevs = rpc(rpc_port, &["bdev_get_bdevs", "-b", "Nvme0n1"]);
    let b = &bdevs[0];
    assert_eq!(b["block_size"], 512, "{bdevs:#}");
    assert_eq!(b["num_blocks"], DRIVE / 512, "{bdevs:#}");
    let nvme = &b["driver_specific"]["nvme"][0];
    assert_eq!(nvme["trid"]["trtype"], "PCIe", "{bdevs:#}");
    assert_eq!(nvme["trid"]["traddr"], bdf.as_str(), "{bdevs:#}");
    assert_eq!(nvme["ctrlr_data"]["serial_number"], SERIAL, "{bdevs:#}");
    let ctrlrs = rpc(rpc_port, &["bdev_nvme_get_controllers", "-n", "Nvme0"]);
    let trid = &ctrlrs[0]["ctrlrs"][0]["trid"];
    assert_eq!(
        *trid,
        json!({"trtype": "PCIe", "traddr": bdf}),
        "{ctrlrs:#}"
    );
    let health = rpc(
        rpc_port,
        &["bdev_nvme_get_controller_health_info", "-c", "Nvme0"],
    );
    assert_eq!(health["traddr"], bdf.as_str(), "{health:#}");
    assert_eq!(health["serial_number"], SERIAL, "{health:#}");
    assert!(
        health["temperature_celsius"].as_u64().is_some(),
        "{health:#}"
    );
    let saved = rpc(rpc_port, &["save_config"]);
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

    let at = hs
        .wait(&running, "detach", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}\n{}", running.console()));
    // Detach (the controller is shut down and let go), attach again, and give the namespace back to the
    // subsystem (removing the bdev took it away).
    rpc(rpc_port, &["bdev_nvme_detach_controller", "Nvme0"]);
    let gone = rpc(rpc_port, &["bdev_get_bdevs"]);
    assert!(
        gone.as_array()
            .unwrap()
            .iter()
            .all(|b| b["name"] != "Nvme0n1"),
        "{gone:#}"
    );
    let names = rpc(
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
        rpc_port,
        &["nvmf_subsystem_add_ns", NQN, "Nvme0n1", "-n", "1"],
    );
    at.reply("go").unwrap();

    let out = running.wait().unwrap();
    let ctx = || format!("guest console ({}):\n{}", out.log.display(), out.console);
    assert!(out.success(), "guest script failed\n{}", ctx());
    for run in ["first", "reattached", "restarted"] {
        assert_eq!(
            out.value(&format!("{run}_NS_NSZE")).as_deref(),
            Some(&*(DRIVE / 512).to_string()),
            "{}",
            ctx()
        );
    }
    assert_eq!(out.value("TGT_EXIT").as_deref(), Some("0"), "{}", ctx());
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
