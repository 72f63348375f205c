//! The Linux kernel's NVMe/TCP host (`nvme_tcp` + nvme-cli in a QEMU/TCG guest of the `lab` crate) against an
//! NVMe-oF target running on the host, in one guest boot: discovery, a refused host, connect with 2 I/O queues,
//! Identify Controller / Namespace, O_DIRECT data on a malloc and a file-backed namespace, disconnect, reconnect
//! and read back; then the host checks the backing file holds what the guest wrote and the target let go of the
//! controllers.
//!
//! The target is this package's `spdk_tgt`, or the binary named by `NVMF_TARGET` (a path; a relative one is taken
//! from the workspace root), e.g. SPDK's `nvmf_tgt` to compare. It gets `NVMF_TARGET_ARGS` (default
//! [`DEFAULT_ARGS`]) plus `--json <config> -r <socket>`. The target listens on 127.0.0.1:`NVMF_PORT` (default: a
//! free port); with `NVMF_GUEST_PORT` the guest connects to that host port instead, where a proxy such as
//! `lab/tools/nvme_tcp_trace.py` forwards to the target and logs every command. The test prints `SKIPPED ...` and passes when there is no
//! target binary, QEMU cannot run, or nvme-cli cannot be installed.
//!
//! ```text
//! cargo test -p spdk-tgt --test nvmf_kernel_host -- --nocapture
//! NVMF_TARGET=/root/spdk-peer/build/bin/nvmf_tgt cargo test -p spdk-tgt --test nvmf_kernel_host -- --nocapture
//! ```
//!
//! Logs: the guest console in `/var/tmp/spdk-rs-lab/logs/nvmf-kernel-host.log`; the target's output is printed on
//! failure and kept (with its config) in `/var/tmp/spdk-rs-nvmf-kernel-host-<pid>/`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lab::nvmf::{aio_bdev, malloc_bdev, NvmfGuest, Subsystem, TcpConfig};
use serde_json::{json, Value};

/// Target arguments besides `--json` and `-r`: one core, no hugepages (both SPDK's and ours accept these).
const DEFAULT_ARGS: &str = "-m 0x1 --no-huge -s 1024";

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";
const SERIAL: &str = "SPDKRS00000000000042";
const MODEL: &str = "spdk-rs lab NVMe-oF TCP";
/// Namespace 1: a malloc bdev of 64 MiB in 512-byte blocks.
const NS1_BLOCKS: u64 = 131072;
/// Namespace 2: an aio bdev over a 32 MiB host file in 4096-byte blocks.
const NS2_BLOCKS: u64 = 8192;
const MIB: usize = 1 << 20;
/// Size of the pattern the guest writes, and where (MiB) on each namespace.
const PATTERN_LEN: usize = 4 * MIB;
const PATTERN_AT_MIB: usize = 1;
/// A host the subsystem does not allow.
const BAD_HOSTID: &str = "00000000-0000-4000-8000-0000000000ba";

/// The target binary, or why there is none.
fn target_binary() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let p = match std::env::var_os("NVMF_TARGET") {
        Some(p) if !p.is_empty() => root.join(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_spdk_tgt")),
    };
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "no NVMe-oF target binary at {} (set NVMF_TARGET)",
            p.display()
        ))
    }
}

/// A scratch directory on a disk-backed file system (the aio bdev opens its file with O_DIRECT, which tmpfs
/// refuses); removed on drop unless the test failed, so the target's log and config stay for a look.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut v)
        .unwrap();
    v
}

/// MD5 (hex) of a file region, by coreutils' `md5sum` (the guest reports its checksums the same way).
fn md5_of(bytes: &[u8], scratch: &Path) -> String {
    let p = scratch.join("md5-input");
    std::fs::write(&p, bytes).unwrap();
    let o = Command::new("md5sum").arg(&p).output().expect("md5sum");
    let _ = std::fs::remove_file(&p);
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The guest's whole run: every step of `/lab/nvmf.sh` against the target, one boot.
const SCRIPT: &str = r#"
. /lab/nvmf.sh
nvmf_setup
P=/opt/pat
AT=$PATTERN_AT_MIB

step "discover as the allowed host"
nvmf_discover || { cat /tmp/nvmf-discover; fail "nvme discover"; }
cat /tmp/nvmf-discover
nvmf_discovered "$NVMF_NQN" || fail "the discovery log page does not list $NVMF_NQN"
echo "DISCOVERY_RECORDS=$(grep -c '^subnqn:' /tmp/nvmf-discover)"
ok "discovery lists $NVMF_NQN"

step "discover as a host that is not allowed"
nvmf_discover "$BAD_HOSTNQN" "$BAD_HOSTID" || { cat /tmp/nvmf-discover; fail "nvme discover as $BAD_HOSTNQN"; }
if nvmf_discovered "$NVMF_NQN"; then echo "DISCOVERY_HIDES_DENIED=0"; else echo "DISCOVERY_HIDES_DENIED=1"; fi

step "connect as a host that is not allowed must fail"
if nvmf_connect "$NVMF_NQN" --hostnqn="$BAD_HOSTNQN" --hostid="$BAD_HOSTID"; then
  cat /tmp/nvmf-connect; fail "connect as $BAD_HOSTNQN succeeded"
fi
echo "DENIED_CONNECT_OUTPUT=$(tr '\n' ' ' < /tmp/nvmf-connect)"
echo "DENIED_KMSG=$(dmesg | grep 'Connect for subsystem' | tail -1 | sed 's/^\[[^]]*\] //')"
nvmf_ctrl > /dev/null && fail "a controller exists after the refused connect"
ok "refused"

step "connect with 2 I/O queues"
nvmf_connect "$NVMF_NQN" --hostnqn="$NVMF_HOSTNQN" --hostid="$NVMF_HOSTID" --nr-io-queues=2 \
  || { cat /tmp/nvmf-connect; nvmf_dmesg; fail "nvme connect"; }
C=$(nvmf_ctrl) || fail "no controller for $NVMF_NQN in /sys/class/nvme"
echo "CTRL=$C TRANSPORT=$(cat /sys/class/nvme/$C/transport) STATE=$(cat /sys/class/nvme/$C/state)"
echo "CTRL_ADDRESS=$(cat /sys/class/nvme/$C/address)"
echo "QUEUE_COUNT=$(cat /sys/class/nvme/$C/queue_count)"
echo "SQSIZE=$(cat /sys/class/nvme/$C/sqsize)"
nvmf_id_ctrl "$C" || fail "nvme id-ctrl /dev/$C"
nvmf_expect /tmp/nvmf-id-ctrl sn "$EXPECT_SERIAL" || fail "serial number"
nvmf_expect /tmp/nvmf-id-ctrl mn "$EXPECT_MODEL" || fail "model number"
nvmf_expect /tmp/nvmf-id-ctrl subnqn "$NVMF_NQN" || fail "subsystem NQN"
ok "identify controller"

N1=$(nvmf_ns_dev 1) || { ls -l /sys/class/nvme/$C/ /sys/class/nvme-subsystem/*/; fail "no block device for namespace 1"; }
N2=$(nvmf_ns_dev 2) || fail "no block device for namespace 2"
echo "NS1_DEV=$N1 NS2_DEV=$N2"
nvmf_id_ns "$N1" NS1_ || fail "nvme id-ns /dev/$N1"
nvmf_id_ns "$N2" NS2_ || fail "nvme id-ns /dev/$N2"
echo "NS1_SECTORS=$(cat /sys/block/$N1/size)"
echo "NS2_SECTORS=$(cat /sys/block/$N2/size)"
ok "identify namespaces"

for n in $N1 $N2; do
  step "O_DIRECT pattern on /dev/$n at ${AT} MiB"
  nvmf_write $P $n $AT || fail "write /dev/$n"
  nvmf_read_compare $P $n $AT || fail "read-back mismatch on /dev/$n"
  ok "pattern on /dev/$n"
done
echo "PATTERN_MD5=$(nvmf_md5 $P)"
echo "NS2_READ_MD5=$(nvmf_md5 /tmp/nvmf-back)"

step "disconnect"
nvmf_disconnect || fail "nvme disconnect"
ok "disconnected"

step "reconnect (default I/O queues) and read back"
nvmf_connect "$NVMF_NQN" --hostnqn="$NVMF_HOSTNQN" --hostid="$NVMF_HOSTID" \
  || { cat /tmp/nvmf-connect; nvmf_dmesg; fail "nvme connect (again)"; }
C=$(nvmf_ctrl) || fail "no controller after reconnecting"
echo "RECONNECT_QUEUE_COUNT=$(cat /sys/class/nvme/$C/queue_count)"
N1=$(nvmf_ns_dev 1) || fail "no namespace 1 after reconnecting"
N2=$(nvmf_ns_dev 2) || fail "no namespace 2 after reconnecting"
nvmf_read_compare $P $N1 $AT || fail "namespace 1 lost the pattern across reconnect"
nvmf_read_compare $P $N2 $AT || fail "namespace 2 lost the pattern across reconnect"
ok "data survived the reconnect"
nvmf_disconnect || fail "nvme disconnect (again)"
nvmf_dmesg
ok "done"
"#;

/// Polls `cond` every 50 ms for up to `secs`.
fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kernel_nvme_tcp_host() {
    const TEST: &str = "kernel_nvme_tcp_host";
    let t0 = Instant::now();
    let binary = match target_binary() {
        Ok(b) => b,
        Err(why) => {
            eprintln!("SKIPPED {TEST}: {why}");
            return;
        }
    };
    let Some(lab) = lab::Lab::get_or_skip(TEST) else {
        return;
    };
    let port = match std::env::var("NVMF_PORT") {
        Ok(p) => p.parse().expect("NVMF_PORT is a port number"),
        Err(_) => lab::nvmf::free_port().expect("a free port"),
    };
    let guest = NvmfGuest::new(port, NQN);
    let mut cfg = lab::GuestConfig::new("nvmf-kernel-host", SCRIPT);
    guest.apply(&mut cfg);
    // Installs nvme-cli when missing; building the image before starting the target keeps a skip clean.
    if lab.image_or_skip(TEST, &cfg.image).is_none() {
        return;
    }

    let scratch = Scratch(PathBuf::from(format!(
        "/var/tmp/spdk-rs-nvmf-kernel-host-{}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&scratch.0);
    std::fs::create_dir_all(&scratch.0).unwrap();
    let backing = scratch.0.join("ns2.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(NS2_BLOCKS * 4096)
        .unwrap();
    let pattern = random_bytes(PATTERN_LEN);
    let pat_path = scratch.0.join("pat");
    std::fs::write(&pat_path, &pattern).unwrap();

    let mut tc = TcpConfig::new(guest.port);
    tc.bdevs.push(malloc_bdev("Malloc0", NS1_BLOCKS, 512));
    tc.bdevs.push(aio_bdev("Aio0", &backing, 4096));
    let mut sub = Subsystem::new(NQN);
    sub.serial = SERIAL.into();
    sub.model = MODEL.into();
    sub.allow_any_host = false;
    sub.hosts.push(guest.hostnqn.clone());
    sub.namespaces.push((1, "Malloc0".into()));
    sub.namespaces.push((2, "Aio0".into()));
    tc.subsystems.push(sub);
    let json_path = scratch.0.join("nvmf.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&tc.to_json()).unwrap(),
    )
    .unwrap();

    let extra = std::env::var("NVMF_TARGET_ARGS").unwrap_or_else(|_| DEFAULT_ARGS.into());
    let mut args: Vec<&str> = extra.split_whitespace().collect();
    let json_arg = json_path.display().to_string();
    args.extend(["--json", json_arg.as_str()]);
    eprintln!("target: {} {}", binary.display(), args.join(" "));
    let mut tgt = lab::target::Target::start(&binary, &args, &scratch.0.join("target"))
        .unwrap_or_else(|e| panic!("{e}"));
    tgt.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let subs = tgt
        .call("nvmf_get_subsystems", Value::Null)
        .unwrap_or_else(|e| panic!("nvmf_get_subsystems: {e}\n{}", tgt.log()));
    let ours = subs
        .as_array()
        .and_then(|a| a.iter().find(|s| s["nqn"] == NQN))
        .unwrap_or_else(|| panic!("{NQN} not configured: {subs}\n{}", tgt.log()));
    assert_eq!(
        ours["namespaces"].as_array().map(Vec::len),
        Some(2),
        "{ours}"
    );
    let started = t0.elapsed();
    if let Ok(p) = std::env::var("NVMF_GUEST_PORT") {
        // Through a proxy on the host (e.g. lab/tools/nvme_tcp_trace.py), which forwards to the target's port.
        let _: u16 = p.parse().expect("NVMF_GUEST_PORT is a port number");
        cfg.env.retain(|(k, _)| k != "NVMF_PORT");
        cfg.env.push(("NVMF_PORT".into(), p));
    }

    cfg.files.push((pat_path.clone(), "/opt/pat".into()));
    cfg.timeout = Duration::from_secs(240);
    cfg.env.extend([
        ("BAD_HOSTNQN".to_string(), lab::nvmf::host_nqn(BAD_HOSTID)),
        ("BAD_HOSTID".to_string(), BAD_HOSTID.to_string()),
        ("EXPECT_SERIAL".to_string(), SERIAL.to_string()),
        ("EXPECT_MODEL".to_string(), MODEL.to_string()),
        ("PATTERN_AT_MIB".to_string(), PATTERN_AT_MIB.to_string()),
    ]);
    let out = lab.run(&cfg).unwrap();
    let ctx = || {
        format!(
            "guest console ({}):\n{}\ntarget log:\n{}",
            out.log.display(),
            out.console,
            tgt.log()
        )
    };
    assert!(out.success(), "guest script failed\n{}", ctx());
    let val = |k: &str| out.value(k).unwrap_or_default();

    // What the kernel saw.
    assert_eq!(val("CTRL_SN"), SERIAL, "{}", ctx());
    assert_eq!(val("CTRL_MN"), MODEL, "{}", ctx());
    assert_eq!(val("CTRL_SUBNQN"), NQN, "{}", ctx());
    // 2 I/O queues + the admin queue; on reconnect, one I/O queue per guest CPU (2 here).
    assert_eq!(val("QUEUE_COUNT"), "3", "{}", ctx());
    assert_eq!(val("RECONNECT_QUEUE_COUNT"), "3", "{}", ctx());
    assert_eq!(val("NS1_NSZE"), NS1_BLOCKS.to_string(), "{}", ctx());
    assert_eq!(val("NS1_LBADS"), "9", "{}", ctx());
    assert_eq!(val("NS1_SECTORS"), NS1_BLOCKS.to_string(), "{}", ctx());
    assert_eq!(val("NS2_NSZE"), NS2_BLOCKS.to_string(), "{}", ctx());
    assert_eq!(val("NS2_LBADS"), "12", "{}", ctx());
    assert_eq!(
        val("NS2_SECTORS"),
        (NS2_BLOCKS * 8).to_string(),
        "{}",
        ctx()
    );
    // The kernel's reason for the refused connect: the target answered Connect with "invalid host" (SCT 1h,
    // SC 84h), not e.g. a transport error.
    assert!(val("DENIED_KMSG").contains("is not allowed"), "{}", ctx());
    // SPDK lists a subsystem only to the hosts it allows.
    assert_eq!(val("DISCOVERY_HIDES_DENIED"), "1", "{}", ctx());

    // What reached the target's bdev: the file behind namespace 2 holds the pattern where the guest wrote it.
    let file = std::fs::read(&backing).unwrap();
    let at = PATTERN_AT_MIB * MIB;
    let region = &file[at..at + PATTERN_LEN];
    if let Some(i) = region.iter().zip(&pattern).position(|(a, b)| a != b) {
        panic!(
            "backing file differs from the pattern at byte {} of {PATTERN_LEN}\n{}",
            i,
            ctx()
        );
    }
    let md5 = md5_of(region, &scratch.0);
    assert_eq!(val("PATTERN_MD5"), md5, "{}", ctx());
    assert_eq!(val("NS2_READ_MD5"), md5, "{}", ctx());
    assert!(
        file[..at].iter().all(|b| *b == 0) && file[at + PATTERN_LEN..].iter().all(|b| *b == 0),
        "the guest wrote outside the pattern's range"
    );

    // The target let go of the guest's controllers, and stops cleanly.
    let gone = wait_until(10, || {
        tgt.call("nvmf_subsystem_get_controllers", json!({ "nqn": NQN }))
            .is_ok_and(|v| v.as_array().is_some_and(|a| a.is_empty()))
    });
    assert!(
        gone,
        "controllers left on the target: {:?}\n{}",
        tgt.call("nvmf_subsystem_get_controllers", json!({ "nqn": NQN })),
        tgt.log()
    );
    assert!(tgt.alive(), "target died\n{}", tgt.log());
    let st = tgt
        .stop(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}\n{}", tgt.log()));
    assert!(st.success(), "target exited with {st}\n{}", tgt.log());
    eprintln!(
        "{TEST}: target ready in {:.1} s, guest ran {:.1} s, total {:.1} s",
        started.as_secs_f64(),
        out.duration.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
