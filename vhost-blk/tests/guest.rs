//! Real guests (QEMU/TCG through the `lab` harness) on vhost-user-blk disks served by `spdk_tgt`.
//!
//! This test binary is also the target: started with `VHOST_BLK_TEST_TGT=1` it runs the `spdk_tgt` code (the
//! `app` library) with its arguments, so the guest always talks to the code under test without depending on a
//! separately built binary. Its own `main` runs the guest tests (few, since each boots a VM) and prints the
//! usual `test result:` summary.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const TGT_ENV: &str = "VHOST_BLK_TEST_TGT";

fn tgt_main() {
    match app::cli::parse(std::env::args().skip(1)) {
        Ok(app::cli::Action::Run(opts)) => {
            if let Err(e) = app::run(*opts, app::spdk_tgt_subsystems()) {
                eprintln!("spdk_tgt: {e}");
                std::process::exit(1);
            }
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("spdk_tgt: {e}");
            std::process::exit(1);
        }
    }
}

struct Tgt {
    child: Option<Child>,
    sock: PathBuf,
    dir: PathBuf,
    log: PathBuf,
}

impl Tgt {
    fn start(tag: &str, extra: &[&str]) -> Tgt {
        let dir = std::env::temp_dir().join(format!("vhost-blk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("spdk.sock");
        let log = dir.join("tgt.log");
        let child = Command::new(std::env::current_exe().unwrap())
            .env(TGT_ENV, "1")
            .args(["-m", "0x1", "-S"])
            .arg(&dir)
            .arg("-r")
            .arg(&sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("tgt.err")).unwrap())
            .spawn()
            .unwrap();
        let t = Tgt {
            child: Some(child),
            sock,
            dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&t.sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "spdk_tgt did not start: {}",
                t.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        t
    }

    fn logs(&self) -> String {
        let mut s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(self.dir.join("tgt.err")).unwrap_or_default());
        s
    }

    fn rpc(&self, args: &[&str]) -> Output {
        lab::spdk_rpc::run(&self.sock, args)
    }

    fn ok(&self, args: &[&str]) -> Value {
        let o = self.rpc(args);
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "spdk-rpc {args:?}: {out}{}\ntarget log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.logs()
        );
        serde_json::from_str(&out).unwrap_or(Value::String(out.trim().into()))
    }

    fn err(&self, args: &[&str]) -> String {
        let o = self.rpc(args);
        assert!(
            !o.status.success(),
            "spdk-rpc {args:?} unexpectedly succeeded"
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// Kills the target at once (a storage node losing power).
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    fn stop(mut self) {
        let mut c = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "spdk_tgt exited with {st}: {}", self.logs());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "spdk_tgt did not stop: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut v)
        .unwrap();
    std::fs::write(path, &v).unwrap();
    v
}

fn wait_sessions_gone(t: &Tgt, ctrlr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = t.ok(&["vhost_get_controllers", "-n", ctrlr]);
        if v[0]["sessions"].as_array().is_some_and(|s| s.is_empty()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "session of {ctrlr} did not go away: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const MIB: usize = 1 << 20;

/// Malloc and io_uring-file bdevs and a read-only controller in one guest: data written with O_DIRECT across
/// each disk reads back; flush, discard and write-zeroes reach the backing file; fio verifies; writes to the
/// read-only disk fail. The host then checks the file holds what the guest wrote.
fn guest_io_malloc_uring_readonly() {
    let Some(lab) = lab::Lab::get_or_skip("guest_io_malloc_uring_readonly") else {
        return;
    };
    let t = Tgt::start("io", &[]);
    let img = t.dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 * MIB as u64)
        .unwrap();
    let pat_path = t.dir.join("pat");
    let pat = random_file(&pat_path, 4 * MIB);

    t.ok(&["bdev_malloc_create", "-b", "Malloc0", "32", "512"]);
    t.ok(&["bdev_uring_create", img.to_str().unwrap(), "Uring0", "4096"]);
    t.ok(&["bdev_malloc_create", "-b", "Malloc1", "8", "4096"]);
    t.ok(&["vhost_create_blk_controller", "vhost.0", "Malloc0"]);
    t.ok(&[
        "vhost_create_blk_controller",
        "--cpumask",
        "0x1",
        "-p",
        "vhost.1",
        "Uring0",
    ]);
    t.ok(&["vhost_create_blk_controller", "-r", "vhost.2", "Malloc1"]);
    // The bdev is claimed while exported: a second controller cannot take it.
    let e = t.err(&["vhost_create_blk_controller", "vhost.3", "Malloc0"]);
    assert!(e.contains("-32602"), "{e}");
    let b = t.ok(&["bdev_get_bdevs", "-b", "Malloc0"]);
    assert_eq!(b[0]["claimed"], Value::Bool(true), "{b}");
    let c = t.ok(&["vhost_get_controllers"]);
    assert_eq!(c.as_array().unwrap().len(), 3, "{c}");
    assert_eq!(
        c[2]["backend_specific"]["block"]["readonly"],
        Value::Bool(true)
    );
    assert_eq!(c[1]["backend_specific"]["block"]["bdev"], "Uring0");
    assert_eq!(c[0]["socket"], t.dir.join("vhost.0").display().to_string());

    let script = r#"
. /lab/lib.sh
P=/opt/pat
for d in vda vdb vdc; do [ -b /dev/$d ] || fail "no /dev/$d"; done
echo "VDA_SECTORS=$(cat /sys/block/vda/size) VDB_LBS=$(cat /sys/block/vdb/queue/logical_block_size)"
echo "VDA_QUEUES=$(ls /sys/block/vda/mq | wc -l)"
echo "VDB_DISCARD=$(cat /sys/block/vdb/queue/discard_max_bytes) VDB_WZ=$(cat /sys/block/vdb/queue/write_zeroes_max_bytes)"
echo "VDC_RO=$(cat /sys/block/vdc/ro)"
echo "VDB_FEATURES=$(cat /sys/block/vdb/device/features)"
dd if=/dev/zero of=/tmp/zero bs=1M count=1 2>/dev/null
for d in vda vdb; do
  step "pattern across /dev/$d"
  i=0
  while [ $i -lt 8 ]; do
    dd if=$P of=/dev/$d bs=1M seek=$((i*4)) oflag=direct conv=notrunc,fsync 2>/tmp/err || { cat /tmp/err; fail "write $d at $((i*4))M"; }
    i=$((i+1))
  done
  echo 3 > /proc/sys/vm/drop_caches
  i=0
  while [ $i -lt 8 ]; do
    dd if=/dev/$d of=/tmp/back bs=1M skip=$((i*4)) count=4 iflag=direct 2>/dev/null || fail "read $d at $((i*4))M"
    cmp /tmp/back $P || fail "data mismatch on $d at $((i*4))M"
    i=$((i+1))
  done
  ok "pattern $d"
done
step "discard and write-zeroes on vdb"
blkdiscard -o $((4<<20)) -l $((1<<20)) /dev/vdb || fail "discard"
blkdiscard -z -o $((8<<20)) -l $((1<<20)) /dev/vdb || fail "write zeroes"
for off in 4 8; do
  dd if=/dev/vdb of=/tmp/back bs=1M skip=$off count=1 iflag=direct 2>/dev/null || fail "read $off"
  cmp /tmp/back /tmp/zero || fail "not zero at ${off}M"
done
ok "discard+write-zeroes"
step "read-only vdc"
dd if=/dev/vdc of=/tmp/back bs=1M count=1 iflag=direct 2>/dev/null || fail "read vdc"
if dd if=/tmp/zero of=/dev/vdc bs=4096 count=1 oflag=direct 2>/dev/null; then fail "write to read-only vdc succeeded"; fi
ok "read-only"
step "fio verify on vda"
fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=16 \
    --size=4M --offset=16M --verify=crc32c --do_verify=1 --numjobs=1 --output-format=terse > /tmp/fio 2>&1 \
    || { cat /tmp/fio; fail "fio"; }
ok "fio"
sync
"#;
    let mut cfg = lab::GuestConfig::new("vhost-blk-io", script);
    cfg.image = lab::ImageSpec::default().with_binaries(&["/usr/bin/fio"]);
    cfg.files.push((pat_path.clone(), "/opt/pat".into()));
    cfg.vhost_user_blk("c0", &t.dir.join("vhost.0"), "num-queues=2");
    // The uring disk uses packed virtqueues.
    cfg.vhost_user_blk("c1", &t.dir.join("vhost.1"), "num-queues=1,packed=on");
    cfg.vhost_user_blk("c2", &t.dir.join("vhost.2"), "num-queues=1");
    let out = lab.run(&cfg).unwrap();
    out.assert_success();
    assert_eq!(out.value("VDC_RO").as_deref(), Some("1"));
    // virtio feature bit 34 (packed ring) negotiated on vdb.
    let feats = out.value("VDB_FEATURES").unwrap_or_default();
    assert_eq!(
        feats.as_bytes().get(34),
        Some(&b'1'),
        "packed ring not negotiated: {feats}\n{}",
        t.logs()
    );
    assert!(out.console.contains("VDA_QUEUES=2"), "{}", out.console);
    assert!(out.console.contains("VDA_SECTORS=65536"), "{}", out.console);

    // Host side: the file holds the pattern everywhere but the discarded and zeroed MiB.
    let file = std::fs::read(&img).unwrap();
    assert_eq!(file.len(), 32 * MIB);
    for i in 0..8 {
        let chunk = &file[i * 4 * MIB..(i + 1) * 4 * MIB];
        if i == 1 || i == 2 {
            assert!(
                chunk[..MIB].iter().all(|b| *b == 0),
                "range at {}M not zero",
                i * 4
            );
            assert_eq!(&chunk[MIB..], &pat[MIB..], "pattern at {}M", i * 4);
        } else {
            assert_eq!(chunk, &pat[..], "pattern at {}M", i * 4);
        }
    }
    let st = t.ok(&["bdev_get_iostat"]);
    let s = st["bdevs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "Uring0")
        .unwrap();
    assert!(s["num_unmap_ops"].as_u64().unwrap_or(0) >= 1, "{st}");

    // QEMU is gone: the sessions end, the controllers stay and can be deleted.
    for c in ["vhost.0", "vhost.1", "vhost.2"] {
        wait_sessions_gone(&t, c);
    }
    let cfg = t.ok(&["save_config"]);
    let vb = cfg["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subsystem"] == "vhost_blk")
        .unwrap()["config"]
        .clone();
    assert_eq!(vb.as_array().unwrap().len(), 3, "{vb}");
    assert_eq!(vb[2]["params"]["readonly"], Value::Bool(true));
    // The saved config recreates the controllers in a new target.
    let saved = t.dir.join("saved.json");
    std::fs::write(&saved, cfg.to_string()).unwrap();
    let t2 = Tgt::start("reload", &["-c", saved.to_str().unwrap()]);
    let c2 = t2.ok(&["vhost_get_controllers"]);
    assert_eq!(c2.as_array().unwrap().len(), 3, "{c2}");
    assert_eq!(c2[1]["backend_specific"]["block"]["bdev"], "Uring0");
    assert_eq!(
        c2[2]["backend_specific"]["block"]["readonly"],
        Value::Bool(true)
    );
    assert!(t2.dir.join("vhost.1").exists());
    t2.stop();
    t.ok(&["vhost_delete_controller", "vhost.2"]);
    assert!(!t.dir.join("vhost.2").exists());
    let b = t.ok(&["bdev_get_bdevs", "-b", "Malloc1"]);
    assert_eq!(b[0]["claimed"], Value::Bool(false), "{b}");
    t.stop();
}

/// One controller, two guests: the first reboots mid-run (device reset on a live connection), then is killed
/// while I/O is in flight (QEMU crash); deleting the controller meanwhile is refused. A second guest then finds
/// the first one's data, and the controller can be deleted once it is gone.
fn guest_reboot_kill_and_second_guest() {
    let Some(lab) = lab::Lab::get_or_skip("guest_reboot_kill_and_second_guest") else {
        return;
    };
    let mut t = Tgt::start("reboot", &["--interrupt-mode"]);
    let pat_path = t.dir.join("pat");
    random_file(&pat_path, MIB);
    t.ok(&["bdev_malloc_create", "-b", "Malloc0", "16", "512"]);
    t.ok(&["vhost_create_blk_controller", "vhost.0", "Malloc0"]);
    let sock = t.dir.join("vhost.0");

    let script1 = r#"
. /lab/lib.sh
[ -b /dev/vda ] || fail "no /dev/vda"
if [ "$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 5)" = "BOOT1" ]; then
  step "second boot"
  dd if=/dev/vda of=/tmp/back bs=1M skip=1 count=1 iflag=direct 2>/dev/null || fail "read after reboot"
  cmp /tmp/back /opt/pat || fail "data lost across the reboot"
  ok "data survived the reboot"
  echo "PHASE2-RUNNING"
  while true; do
    dd if=/opt/pat of=/dev/vda bs=64k seek=64 oflag=direct conv=notrunc 2>/dev/null
    dd if=/dev/vda of=/dev/null bs=64k skip=64 count=16 iflag=direct 2>/dev/null
  done
fi
step "first boot"
dd if=/opt/pat of=/dev/vda bs=1M seek=1 oflag=direct conv=notrunc,fsync 2>/dev/null || fail "write"
printf 'BOOT1' > /tmp/m
dd if=/tmp/m of=/dev/vda bs=512 count=1 oflag=direct conv=sync,notrunc,fsync 2>/dev/null || fail "marker"
echo "REBOOTING"
reboot -f
"#;
    let mut cfg = lab::GuestConfig::new("vhost-blk-reboot", script1);
    cfg.files.push((pat_path.clone(), "/opt/pat".into()));
    cfg.allow_reboot = true;
    cfg.vhost_user_blk("c0", &sock, "num-queues=2");
    let g = lab.spawn(&cfg).unwrap();
    g.wait_for("PHASE2-RUNNING", Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("{e}\ntarget log:\n{}", t.logs()));
    assert!(g.console().contains("LAB-OK: data survived the reboot"));
    // Attached and busy: deletion is refused, as SPDK does.
    let e = t.err(&["vhost_delete_controller", "vhost.0"]);
    assert!(e.contains("Device or resource busy"), "{e}");
    let c = t.ok(&["vhost_get_controllers", "-n", "vhost.0"]);
    assert_eq!(c[0]["sessions"][0]["started"], Value::Bool(true), "{c}");
    std::thread::sleep(Duration::from_millis(500));
    let out = g.kill();
    assert_eq!(out.boots, 2, "{}", out.console);
    wait_sessions_gone(&t, "vhost.0");
    assert!(t.alive(), "spdk_tgt died: {}", t.logs());

    let script2 = r#"
. /lab/lib.sh
dd if=/dev/vda of=/tmp/back bs=1M skip=1 count=1 iflag=direct 2>/dev/null || fail "read"
cmp /tmp/back /opt/pat || fail "data of the first guest missing"
dd if=/dev/vda of=/tmp/back bs=64k skip=64 count=16 iflag=direct 2>/dev/null || fail "read 2"
dd if=/opt/pat of=/dev/vda bs=1M seek=4 oflag=direct conv=notrunc,fsync 2>/dev/null || fail "write"
dd if=/dev/vda of=/tmp/back bs=1M skip=4 count=1 iflag=direct 2>/dev/null || fail "read 3"
cmp /tmp/back /opt/pat || fail "readback"
ok "second guest"
"#;
    let mut cfg2 = lab::GuestConfig::new("vhost-blk-second", script2);
    cfg2.files.push((pat_path, "/opt/pat".into()));
    cfg2.vhost_user_blk("c0", &sock, "");
    let out2 = lab.run(&cfg2).unwrap();
    out2.assert_success();
    wait_sessions_gone(&t, "vhost.0");
    t.ok(&["vhost_delete_controller", "vhost.0"]);
    assert!(!sock.exists());
    assert_eq!(t.ok(&["vhost_get_controllers"]), Value::Array(vec![]));
    t.stop();
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

/// A storage node exporting bdev `bdev` (made by `make`) as the only namespace of `nqn` on `port`.
fn storage_node(tag: &str, nqn: &str, port: &str, make: &[&[&str]], bdev: &str) -> Tgt {
    let s = Tgt::start(tag, &[]);
    for args in make {
        s.ok(args);
    }
    s.ok(&["nvmf_create_transport", "-t", "TCP"]);
    s.ok(&["nvmf_create_subsystem", nqn, "-a"]);
    s.ok(&["nvmf_subsystem_add_ns", nqn, bdev]);
    s.ok(&[
        "nvmf_subsystem_add_listener",
        nqn,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-f",
        "ipv4",
        "-s",
        port,
    ]);
    s
}

/// The whole write path of the two node kinds, each process our `spdk_tgt`: two storage nodes (one exports an
/// lvol on an lvstore on a malloc bdev, the other an io_uring file bdev) reached over NVMe/TCP by a compute
/// node, which builds a RAID1 over the two NVMe bdevs and serves it to a guest over vhost-user-blk. The guest
/// writes a pattern and runs fio verify; the file replica holds the pattern byte for byte; then the file's
/// storage node is killed, the RAID1 goes on degraded, and a second guest reads everything back from the lvol
/// replica across the fabric and writes more.
fn guest_on_raid1_over_two_storage_nodes() {
    let Some(lab) = lab::Lab::get_or_skip("guest_on_raid1_over_two_storage_nodes") else {
        return;
    };
    let (port_a, port_b) = (free_port(), free_port());
    let (nqn_a, nqn_b) = (
        "nqn.2016-06.io.spdk:replica-a",
        "nqn.2016-06.io.spdk:replica-b",
    );
    let a = storage_node(
        "storage-a",
        nqn_a,
        &port_a,
        &[
            &["bdev_malloc_create", "-b", "Malloc0", "48", "512"],
            &["bdev_lvol_create_lvstore", "Malloc0", "lvs0"],
            &["bdev_lvol_create", "-l", "lvs0", "replica", "32"],
        ],
        "lvs0/replica",
    );
    let file_dir = std::env::temp_dir().join(format!("vhost-blk-replica-{}", std::process::id()));
    std::fs::create_dir_all(&file_dir).unwrap();
    let img = file_dir.join("replica-b.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 * MIB as u64)
        .unwrap();
    let img_s = img.to_str().unwrap().to_string();
    let mut b = storage_node(
        "storage-b",
        nqn_b,
        &port_b,
        &[&["bdev_uring_create", &img_s, "Replica", "512"]],
        "Replica",
    );

    let c = Tgt::start("compute", &[]);
    for (name, port, nqn) in [("NvmeA", &port_a, nqn_a), ("NvmeB", &port_b, nqn_b)] {
        let out = c.ok(&[
            "bdev_nvme_attach_controller",
            "-b",
            name,
            "-t",
            "tcp",
            "-a",
            "127.0.0.1",
            "-f",
            "ipv4",
            "-s",
            port,
            "-n",
            nqn,
        ]);
        assert_eq!(out, Value::String(format!("{name}n1")));
    }
    c.ok(&[
        "bdev_raid_create",
        "-n",
        "Raid1",
        "-r",
        "raid1",
        "-b",
        "NvmeAn1 NvmeBn1",
    ]);
    c.ok(&["vhost_create_blk_controller", "vhost.0", "Raid1"]);
    let sock = c.dir.join("vhost.0");
    let pat_path = c.dir.join("pat");
    let pat = random_file(&pat_path, 4 * MIB);

    let script1 = r#"
. /lab/lib.sh
[ -b /dev/vda ] || fail "no /dev/vda"
echo "VDA_SECTORS=$(cat /sys/block/vda/size)"
step "pattern through raid1 and the fabric"
dd if=/opt/pat of=/dev/vda bs=1M seek=4 oflag=direct conv=notrunc,fsync 2>/tmp/err || { cat /tmp/err; fail "write"; }
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=1M skip=4 count=4 iflag=direct 2>/dev/null || fail "read"
cmp /tmp/back /opt/pat || fail "data mismatch"
ok "pattern"
step "fio verify"
fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=16     --size=4M --offset=16M --verify=crc32c --do_verify=1 --output-format=terse > /tmp/fio 2>&1     || { cat /tmp/fio; fail "fio"; }
ok "fio"
sync
"#;
    let mut cfg = lab::GuestConfig::new("vhost-raid1-nvmf", script1);
    cfg.image = lab::ImageSpec::default().with_binaries(&["/usr/bin/fio"]);
    cfg.files.push((pat_path.clone(), "/opt/pat".into()));
    cfg.vhost_user_blk("c0", &sock, "num-queues=2");
    let out = lab.run(&cfg).unwrap();
    if !out.success() {
        panic!(
            "{}
compute log:
{}
storage a log:
{}",
            out.console,
            c.logs(),
            a.logs()
        );
    }
    assert!(out.console.contains("VDA_SECTORS=65536"), "{}", out.console);
    wait_sessions_gone(&c, "vhost.0");
    // The file replica holds what the guest wrote, at the same offset (RAID1 without a superblock).
    let file = std::fs::read(&img).unwrap();
    assert_eq!(&file[4 * MIB..8 * MIB], &pat[..], "file replica");

    // Storage node b dies: the compute node loses its controller, the RAID1 goes on with one base.
    b.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.ok(&["bdev_raid_get_bdevs", "online"]);
        let ok = r[0]["num_base_bdevs_operational"] == 1;
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "raid never degraded: {r}
{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let script2 = r#"
. /lab/lib.sh
dd if=/dev/vda of=/tmp/back bs=1M skip=4 count=4 iflag=direct 2>/dev/null || fail "read"
cmp /tmp/back /opt/pat || fail "the lvol replica lost the pattern"
dd if=/opt/pat of=/dev/vda bs=1M seek=24 oflag=direct conv=notrunc,fsync 2>/dev/null || fail "degraded write"
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=1M skip=24 count=4 iflag=direct 2>/dev/null || fail "read 2"
cmp /tmp/back /opt/pat || fail "degraded readback"
ok "degraded"
"#;
    let mut cfg2 = lab::GuestConfig::new("vhost-raid1-degraded", script2);
    cfg2.files.push((pat_path, "/opt/pat".into()));
    cfg2.vhost_user_blk("c0", &sock, "");
    let out2 = lab.run(&cfg2).unwrap();
    if !out2.success() {
        panic!(
            "{}
compute log:
{}",
            out2.console,
            c.logs()
        );
    }
    wait_sessions_gone(&c, "vhost.0");
    c.ok(&["vhost_delete_controller", "vhost.0"]);
    c.ok(&["bdev_raid_delete", "Raid1"]);
    c.ok(&["bdev_nvme_detach_controller", "NvmeA"]);
    c.stop();
    a.stop();
    let _ = std::fs::remove_dir_all(file_dir);
}

/// `spdk_tgt` killed (SIGKILL) under a guest writing and checking a pattern, and started again on the same
/// config and socket: QEMU reconnects (`reconnect=1`), the requests that were in flight run again from the
/// inflight area, and the guest sees no error and loses no write; the file holds the pattern.
fn guest_survives_backend_restart() {
    let Some(lab) = lab::Lab::get_or_skip("guest_survives_backend_restart") else {
        return;
    };
    let data = std::env::temp_dir().join(format!("vhost-blk-restart-data-{}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();
    let img = data.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 * MIB as u64)
        .unwrap();
    let pat_path = data.join("pat");
    let pat = random_file(&pat_path, 4 * MIB);
    let mut t1 = Tgt::start("restart", &[]);
    t1.ok(&["bdev_uring_create", img.to_str().unwrap(), "Uring0", "512"]);
    // An error bdev on top: it holds a write on request, so that one is surely in flight at the kill.
    t1.ok(&["bdev_error_create", "Uring0"]);
    t1.ok(&["vhost_create_blk_controller", "vhost.0", "EE_Uring0"]);
    let cfg_path = data.join("config.json");
    std::fs::write(&cfg_path, t1.ok(&["save_config"]).to_string()).unwrap();
    let sock = t1.dir.join("vhost.0");

    let script = r#"
. /lab/lib.sh
[ -b /dev/vda ] || fail "no /dev/vda"
r=0
while [ $r -lt 12 ]; do
  i=0
  while [ $i -lt 6 ]; do
    dd if=/opt/pat of=/dev/vda bs=64k seek=$((i*64)) oflag=direct conv=notrunc 2>/tmp/err || { cat /tmp/err; fail "write round $r chunk $i"; }
    dd if=/dev/vda of=/tmp/back bs=64k skip=$((i*64)) count=64 iflag=direct 2>/tmp/err || { cat /tmp/err; fail "read round $r chunk $i"; }
    cmp /tmp/back /opt/pat || fail "data mismatch round $r chunk $i"
    i=$((i+1))
  done
  echo "ROUND $r"
  r=$((r+1))
done
sync
ok "rounds"
"#;
    let mut cfg = lab::GuestConfig::new("vhost-blk-restart", script);
    cfg.files.push((pat_path, "/opt/pat".into()));
    cfg.vhost_user_blk_reconnecting("c0", &sock, "num-queues=2");
    let g = lab.spawn(&cfg).unwrap();
    g.wait_for("ROUND 1", Duration::from_secs(240))
        .unwrap_or_else(|e| {
            panic!(
                "{e}
{}
target log:
{}",
                g.console(),
                t1.logs()
            )
        });
    // The next write is held (never completes in this run), then the back end loses power with it in flight
    // and the operator starts it again (the injection is not part of the saved config).
    t1.ok(&[
        "bdev_error_inject_error",
        "EE_Uring0",
        "write",
        "pending",
        "-n",
        "1",
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    let st = t1.ok(&["bdev_get_iostat", "--names", "EE_Uring0"]);
    t1.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let t2 = Tgt::start("restart", &["-c", cfg_path.to_str().unwrap()]);
    let out = g.wait().unwrap();
    if !out.success() {
        panic!(
            "{}
target log:
{}",
            out.console,
            t2.logs()
        );
    }
    assert!(out.console.contains("ROUND 11"), "{}", out.console);
    let logs = t2.logs();
    let rerun = logs.lines().filter(|l| l.contains("run again")).count();
    assert!(rerun >= 1, "no request was run again: {st}\n{logs}");
    let file = std::fs::read(&img).unwrap();
    for i in 0..6 {
        assert_eq!(&file[i * 4 * MIB..(i + 1) * 4 * MIB], &pat[..], "chunk {i}");
    }
    wait_sessions_gone(&t2, "vhost.0");
    t2.stop();
    drop(t1);
    let _ = std::fs::remove_dir_all(data);
}

/// A bdev resized under a running guest: the guest sees the new capacity without a reboot (the configuration
/// change message on the back-end request channel, QEMU reading the configuration again).
fn guest_sees_resize() {
    let Some(lab) = lab::Lab::get_or_skip("guest_sees_resize") else {
        return;
    };
    let t = Tgt::start("resize", &[]);
    t.ok(&["bdev_null_create", "Null0", "64", "512"]);
    t.ok(&["vhost_create_blk_controller", "vhost.0", "Null0"]);
    let script = r#"
. /lab/lib.sh
[ -b /dev/vda ] || fail "no /dev/vda"
s0=$(cat /sys/block/vda/size)
echo "SIZE0=$s0"
n=0
while [ "$(cat /sys/block/vda/size)" = "$s0" ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
echo "SIZE1=$(cat /sys/block/vda/size)"
dd if=/dev/vda of=/dev/null bs=1M skip=100 count=1 iflag=direct 2>/dev/null || fail "read past the old end"
ok "resize"
"#;
    let mut cfg = lab::GuestConfig::new("vhost-blk-resize", script);
    cfg.vhost_user_blk("c0", &t.dir.join("vhost.0"), "");
    let g = lab.spawn(&cfg).unwrap();
    g.wait_for("SIZE0=", Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("{e}\n{}", g.console()));
    t.ok(&["bdev_null_resize", "Null0", "128"]);
    let out = g.wait().unwrap();
    if !out.success() {
        panic!("{}\ntarget log:\n{}", out.console, t.logs());
    }
    assert_eq!(
        out.value("SIZE0").as_deref(),
        Some("131072"),
        "{}",
        out.console
    );
    assert_eq!(
        out.value("SIZE1").as_deref(),
        Some("262144"),
        "{}",
        out.console
    );
    wait_sessions_gone(&t, "vhost.0");
    t.stop();
}

fn main() {
    if std::env::var_os(TGT_ENV).is_some() {
        tgt_main();
        return;
    }
    let tests: &[(&str, fn())] = &[
        (
            "guest_io_malloc_uring_readonly",
            guest_io_malloc_uring_readonly,
        ),
        (
            "guest_reboot_kill_and_second_guest",
            guest_reboot_kill_and_second_guest,
        ),
        (
            "guest_on_raid1_over_two_storage_nodes",
            guest_on_raid1_over_two_storage_nodes,
        ),
        (
            "guest_survives_backend_restart",
            guest_survives_backend_restart,
        ),
        ("guest_sees_resize", guest_sees_resize),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if std::env::args().any(|a| a == "--list") {
        for (n, _) in tests {
            println!("{n}: test");
        }
        return;
    }
    let selected: Vec<_> = tests
        .iter()
        .filter(|(n, _)| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed) = (0, 0);
    for (name, f) in &selected {
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(f);
        match r {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1} s)", t0.elapsed().as_secs_f64());
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED");
            }
        }
    }
    let filtered = tests.len() - selected.len();
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed; 0 ignored; 0 measured; {filtered} filtered out\n",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    if failed > 0 {
        std::process::exit(101);
    }
}
