//! The Linux kernel's NVMe/TCP host (`nvme_tcp` + nvme-cli in a QEMU/TCG guest of the `lab` crate) against an
//! NVMe-oF target running on the host, in one guest boot: discovery, a refused host, connect with 4 I/O queues
//! (the guest has 4 CPUs: the kernel takes at most one per CPU), Identify Controller / Namespace, O_DIRECT data on
//! a malloc and a file-backed namespace; namespaces hot-added (`nvmf_subsystem_add_ns`) and hot-removed
//! (`nvmf_subsystem_remove_ns`, and `bdev_malloc_delete` under a namespace) by the host side of the test while
//! the guest is connected, which sees them come and go through the Changed Namespace List AEN; disconnect,
//! reconnect with header and data digests, read back and write; then keep alive expiry: the test freezes QEMU
//! (SIGSTOP: no keep alives, TCP connections left open) and the target must drop the controller after its KATO
//! (the kernel's 5 s, rounded up to 10 s as SPDK does). The host checks the backing file holds what the guest
//! wrote and the target let go of the controllers. The guest waits for the host's actions in `host_sync`
//! (`lab::sync`).
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
/// Where (MiB) the guest writes with digests on namespace 1 (its first MiB of the pattern).
const DIGEST_AT_MIB: usize = 8;
/// I/O queues of the first connect (the kernel takes at most one per guest CPU, so the guest gets as many CPUs).
const IO_QUEUES: u32 = 4;
/// Hot-added namespace 3: a malloc bdev of 16 MiB in 512-byte blocks.
const NS3_BLOCKS: u64 = 32768;
/// Hot-added namespace 4: a malloc bdev of 8 MiB in 4096-byte blocks, later deleted under the subsystem.
const NS4_BLOCKS: u64 = 2048;
/// The keep alive timeout the target applies to the kernel's 5 s (rounded up to 10 s units, as SPDK).
const KATO: Duration = Duration::from_secs(10);
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

/// The guest's whole run: every step of `/lab/nvmf.sh` against the target, one boot. `host_sync NAME` stops
/// until the host's side of the test (see [`kernel_nvme_tcp_host`]) has done its part for NAME.
const SCRIPT: &str = r#"
. /lab/nvmf.sh
nvmf_setup
P=/opt/pat
P1=/tmp/pat1
head -c 1048576 $P > $P1
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

step "connect with $IO_QUEUES I/O queues"
nvmf_connect "$NVMF_NQN" --hostnqn="$NVMF_HOSTNQN" --hostid="$NVMF_HOSTID" --nr-io-queues=$IO_QUEUES \
  || { cat /tmp/nvmf-connect; nvmf_dmesg; fail "nvme connect"; }
C=$(nvmf_ctrl) || fail "no controller for $NVMF_NQN in /sys/class/nvme"
echo "CTRL=$C TRANSPORT=$(cat /sys/class/nvme/$C/transport) STATE=$(cat /sys/class/nvme/$C/state)"
echo "CTRL_ADDRESS=$(cat /sys/class/nvme/$C/address)"
echo "QUEUE_COUNT=$(cat /sys/class/nvme/$C/queue_count)"
echo "SQSIZE=$(cat /sys/class/nvme/$C/sqsize)"
echo "QUEUES_KMSG=$(dmesg | grep -E 'I/O queues|default/read/poll' | tail -1 | sed 's/^\[[^]]*\] //')"
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

step "namespace hot-add (nvmf_subsystem_add_ns of 3 and 4 while connected)"
host_sync hot-add || fail "no answer from the host (hot-add)"
N3=$(nvmf_ns_dev 3 "" 20) || { nvmf_dmesg; fail "namespace 3 did not appear (AEN?)"; }
N4=$(nvmf_ns_dev 4 "" 20) || { nvmf_dmesg; fail "namespace 4 did not appear (AEN?)"; }
echo "NS3_DEV=$N3 NS4_DEV=$N4"
nvmf_id_ns "$N3" NS3_ || fail "nvme id-ns /dev/$N3"
nvmf_id_ns "$N4" NS4_ || fail "nvme id-ns /dev/$N4"
echo "NS3_SECTORS=$(cat /sys/block/$N3/size)"
echo "NS4_SECTORS=$(cat /sys/block/$N4/size)"
for n in $N3 $N4; do
  nvmf_write $P1 $n 1 || fail "write /dev/$n"
  nvmf_read_compare $P1 $n 1 || fail "read-back mismatch on /dev/$n"
done
ok "namespaces 3 and 4 appeared and hold data"

step "namespace hot-remove (nvmf_subsystem_remove_ns 3)"
host_sync ns-remove || fail "no answer from the host (ns-remove)"
nvmf_ns_gone 3 "" 20 || { nvmf_dmesg; fail "namespace 3 is still there"; }
nvmf_ns_find 4 > /dev/null || fail "namespace 4 went with namespace 3"
ok "namespace 3 went"

step "bdev hot-remove (bdev_malloc_delete of namespace 4's bdev)"
host_sync bdev-delete || fail "no answer from the host (bdev-delete)"
nvmf_ns_gone 4 "" 20 || { nvmf_dmesg; fail "namespace 4 is still there"; }
nvmf_ns_find 1 > /dev/null && nvmf_ns_find 2 > /dev/null || fail "namespaces 1 and 2 went too"
nvmf_read_compare $P1 $N1 $AT || fail "namespace 1 after the hot-removes"
ok "namespace 4 went; namespace 1 still reads"

step "disconnect"
nvmf_disconnect || fail "nvme disconnect"
ok "disconnected"

step "reconnect (default I/O queues) with header and data digests, read back, write"
nvmf_connect "$NVMF_NQN" --hostnqn="$NVMF_HOSTNQN" --hostid="$NVMF_HOSTID" --hdr-digest --data-digest \
  || { cat /tmp/nvmf-connect; nvmf_dmesg; fail "nvme connect (again, with digests)"; }
C=$(nvmf_ctrl) || fail "no controller after reconnecting"
echo "RECONNECT_QUEUE_COUNT=$(cat /sys/class/nvme/$C/queue_count)"
N1=$(nvmf_ns_dev 1) || fail "no namespace 1 after reconnecting"
N2=$(nvmf_ns_dev 2) || fail "no namespace 2 after reconnecting"
nvmf_ns_find 3 > /dev/null && fail "namespace 3 is back"
nvmf_ns_find 4 > /dev/null && fail "namespace 4 is back"
nvmf_read_compare $P $N1 $AT || fail "namespace 1 lost the pattern across reconnect"
nvmf_read_compare $P $N2 $AT || fail "namespace 2 lost the pattern across reconnect"
nvmf_write $P1 $N1 $DIGEST_AT_MIB || fail "write /dev/$N1 with digests"
nvmf_read_compare $P1 $N1 $DIGEST_AT_MIB || fail "read-back mismatch on /dev/$N1 with digests"
ok "data survived the reconnect; digests on"

step "keep alive timeout: a fresh controller, then the host freezes this guest"
# Fresh, so that the freeze comes before the kernel's first keep alive (KATO/2 after connecting) and the target's
# first check (KATO after) finds it expired: the test waits about KATO, not up to twice as long.
nvmf_disconnect || fail "nvme disconnect (digests)"
nvmf_connect "$NVMF_NQN" --hostnqn="$NVMF_HOSTNQN" --hostid="$NVMF_HOSTID" \
  || { cat /tmp/nvmf-connect; nvmf_dmesg; fail "nvme connect (keep alive)"; }
C=$(nvmf_ctrl) || fail "no controller (keep alive)"
echo "KATO_STATE_BEFORE=$(nvmf_ctrl_state $C)"
host_sync freeze || fail "no answer from the host (freeze)"
# The target dropped the connection while this guest was stopped; what the kernel makes of it is its business
# (error recovery, then reconnect attempts every 10 s): seen, not checked. No disconnect: with the connection
# gone it waits for the kernel's keep alive command to time out (6 s here), and poweroff ends it all anyway.
_t=50
while [ "$(nvmf_ctrl_state $C)" = live ] && [ $_t -gt 0 ]; do sleep 0.1; _t=$((_t - 1)); done
echo "KATO_STATE_AFTER=$(nvmf_ctrl_state $C)"
nvmf_dmesg
ok "done"
"#;

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("[... {skip} lines before]\n"));
    }
    for l in &lines[skip..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// What to print when something fails: the tail of the guest's console and of the target's log.
fn report(console: &str, tgt: &lab::target::Target) -> String {
    format!(
        "--- guest console (last 120 lines) ---\n{}--- target log ({}, last 200 lines) ---\n{}",
        tail(console, 120),
        tgt.log_path().display(),
        tail(&tgt.log(), 200)
    )
}

/// The NSIDs of `nqn`'s namespaces, from `nvmf_get_subsystems`.
fn nsids(tgt: &lab::target::Target, nqn: &str) -> Result<Vec<u64>, Value> {
    let subs = tgt.call("nvmf_get_subsystems", Value::Null)?;
    let s = subs
        .as_array()
        .and_then(|a| a.iter().find(|s| s["nqn"] == nqn))
        .ok_or_else(|| json!({ "message": format!("no subsystem {nqn}: {subs}") }))?;
    Ok(s["namespaces"]
        .as_array()
        .map(|a| a.iter().filter_map(|n| n["nsid"].as_u64()).collect())
        .unwrap_or_default())
}

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
    cfg.timeout = Duration::from_secs(300);
    cfg.env.extend([
        ("BAD_HOSTNQN".to_string(), lab::nvmf::host_nqn(BAD_HOSTID)),
        ("BAD_HOSTID".to_string(), BAD_HOSTID.to_string()),
        ("EXPECT_SERIAL".to_string(), SERIAL.to_string()),
        ("EXPECT_MODEL".to_string(), MODEL.to_string()),
        ("PATTERN_AT_MIB".to_string(), PATTERN_AT_MIB.to_string()),
    ]);
    cfg.smp = IO_QUEUES;
    cfg.env.extend([
        ("IO_QUEUES".to_string(), IO_QUEUES.to_string()),
        ("DIGEST_AT_MIB".to_string(), DIGEST_AT_MIB.to_string()),
    ]);
    let hs = lab::sync::Handshake::new().expect("a port for the guest handshake");
    hs.apply(&mut cfg);
    let g = lab.spawn(&cfg).unwrap();
    let fail = |what: String| -> ! { panic!("{what}\n{}", report(&g.console(), &tgt)) };
    let call = |method: &str, params: Value| -> Value {
        tgt.call(method, params.clone())
            .unwrap_or_else(|e| fail(format!("{method} {params}: {e}")))
    };
    let sync = |name: &str, secs: u64| {
        hs.wait(&g, name, Duration::from_secs(secs))
            .unwrap_or_else(|e| fail(format!("{e}")))
    };

    // The guest is connected with IO_QUEUES I/O queues: the target sees them too (its count has the admin queue).
    let at = sync("hot-add", 180);
    let ctrlrs = call("nvmf_subsystem_get_controllers", json!({ "nqn": NQN }));
    let qpairs = ctrlrs
        .as_array()
        .filter(|a| a.len() == 1)
        .and_then(|a| a[0]["num_io_qpairs"].as_u64());
    if qpairs != Some(IO_QUEUES as u64 + 1) {
        fail(format!(
            "expected one controller with {} queue pairs (admin included): {ctrlrs}",
            IO_QUEUES + 1
        ));
    }
    // Namespace hot-add: two new malloc bdevs, added back to back (one AEN may announce both).
    call(
        "bdev_malloc_create",
        json!({"name": "Malloc1", "num_blocks": NS3_BLOCKS, "block_size": 512}),
    );
    call(
        "bdev_malloc_create",
        json!({"name": "Malloc2", "num_blocks": NS4_BLOCKS, "block_size": 4096}),
    );
    for (nsid, bdev) in [(3, "Malloc1"), (4, "Malloc2")] {
        let r = call(
            "nvmf_subsystem_add_ns",
            json!({"nqn": NQN, "namespace": {"bdev_name": bdev, "nsid": nsid}}),
        );
        if r != json!(nsid) {
            fail(format!("nvmf_subsystem_add_ns {bdev} answered {r}"));
        }
    }
    at.reply("added 3 4")
        .unwrap_or_else(|e| fail(format!("{e}")));

    // Namespace hot-remove.
    let at = sync("ns-remove", 60);
    call("nvmf_subsystem_remove_ns", json!({"nqn": NQN, "nsid": 3}));
    match nsids(&tgt, NQN) {
        Ok(ids) if ids == [1, 2, 4] => {}
        other => fail(format!("namespaces after removing 3: {other:?}")),
    }
    at.reply("removed 3")
        .unwrap_or_else(|e| fail(format!("{e}")));

    // Bdev hot-remove: deleting namespace 4's bdev takes the namespace away (asynchronously).
    let at = sync("bdev-delete", 60);
    call("bdev_malloc_delete", json!({"name": "Malloc2"}));
    if !wait_until(10, || nsids(&tgt, NQN).is_ok_and(|ids| ids == [1, 2])) {
        fail(format!(
            "namespace 4 stays after its bdev was deleted: {:?}",
            nsids(&tgt, NQN)
        ));
    }
    at.reply("deleted Malloc2")
        .unwrap_or_else(|e| fail(format!("{e}")));

    // Keep alive expiry: the guest (reconnected) is frozen, so its keep alives stop while its TCP connections
    // stay open; the target must give up on the controller after KATO.
    let at = sync("freeze", 120);
    let ctrlrs = call("nvmf_subsystem_get_controllers", json!({ "nqn": NQN }));
    if ctrlrs.as_array().map(Vec::len) != Some(1) {
        fail(format!(
            "expected one controller before the freeze: {ctrlrs}"
        ));
    }
    g.pause().unwrap_or_else(|e| fail(format!("{e}")));
    let frozen = Instant::now();
    let gone = wait_until(KATO.as_secs() * 3 + 5, || {
        tgt.call("nvmf_subsystem_get_controllers", json!({ "nqn": NQN }))
            .is_ok_and(|v| v.as_array().is_some_and(|a| a.is_empty()))
    });
    let kato_gone = frozen.elapsed();
    g.resume().unwrap_or_else(|e| fail(format!("{e}")));
    if !gone {
        fail(format!(
            "the controller outlived its keep alive timeout ({:.1} s frozen): {:?}",
            kato_gone.as_secs_f64(),
            tgt.call("nvmf_subsystem_get_controllers", json!({ "nqn": NQN }))
        ));
    }
    // The last keep alive (or the controller's creation) came at most KATO/4 before the freeze (the kernel sends
    // one every KATO/2 of its own 5 s); the target checks every KATO.
    if kato_gone < KATO * 3 / 4 {
        fail(format!(
            "the controller went {:.1} s after the freeze, before its keep alive timeout ({KATO:?})",
            kato_gone.as_secs_f64()
        ));
    }
    if !tgt.log().contains("keep alive timeout") {
        fail("the target did not log the keep alive timeout".into());
    }
    at.reply(&format!("thawed after {:.1} s", kato_gone.as_secs_f64()))
        .unwrap_or_else(|e| fail(format!("{e}")));

    let out = g.wait().unwrap();
    let ctx = || {
        format!(
            "guest log {}\n{}",
            out.log.display(),
            report(&out.console, &tgt)
        )
    };
    assert!(out.success(), "guest script failed\n{}", ctx());
    let val = |k: &str| out.value(k).unwrap_or_default();

    // What the kernel saw.
    assert_eq!(val("CTRL_SN"), SERIAL, "{}", ctx());
    assert_eq!(val("CTRL_MN"), MODEL, "{}", ctx());
    assert_eq!(val("CTRL_SUBNQN"), NQN, "{}", ctx());
    // IO_QUEUES I/O queues + the admin queue; on reconnect, one I/O queue per guest CPU (as many).
    let queues = (IO_QUEUES + 1).to_string();
    assert_eq!(val("QUEUE_COUNT"), queues, "{}", ctx());
    assert_eq!(val("RECONNECT_QUEUE_COUNT"), queues, "{}", ctx());
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
    // The hot-added namespaces as the kernel saw them.
    assert_eq!(val("NS3_NSZE"), NS3_BLOCKS.to_string(), "{}", ctx());
    assert_eq!(val("NS3_LBADS"), "9", "{}", ctx());
    assert_eq!(val("NS3_SECTORS"), NS3_BLOCKS.to_string(), "{}", ctx());
    assert_eq!(val("NS4_NSZE"), NS4_BLOCKS.to_string(), "{}", ctx());
    assert_eq!(val("NS4_LBADS"), "12", "{}", ctx());
    assert_eq!(
        val("NS4_SECTORS"),
        (NS4_BLOCKS * 8).to_string(),
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
        "{TEST}: keep alive expiry {:.1} s after the freeze; the guest's controller then: {}",
        kato_gone.as_secs_f64(),
        val("KATO_STATE_AFTER")
    );
    eprintln!(
        "{TEST}: target ready in {:.1} s, guest ran {:.1} s, total {:.1} s",
        started.as_secs_f64(),
        out.duration.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
