//! vhost-user-blk benchmark without a VM: this program is the front end (QEMU's part: shared memory, vhost-user
//! messages, eventfds) and the guest driver (split ring, requests, busy-polled completions), and drives our
//! `spdk_tgt`, `qemu-storage-daemon --export type=vhost-user-blk` and SPDK v24.05's own `vhost` (from the peer
//! build, when there is one) on the same kind of backing in the same run. With SPDK in the run the shared guest
//! memory is on 2 MiB hugepages for all three (SPDK registers guest memory for DMA and needs them).
//!
//! Backings: `null` (our null bdev / QEMU's null-co) and `ram` (our malloc bdev / a file on tmpfs). Each back end
//! runs pinned to one core (`--backend-core`, default 1); the driver runs on another (default 0). Reported: IOPS,
//! the back end's CPU use over the run (from /proc), IOPS per back-end core, and our/QEMU ratio per core. Each
//! case runs `--rounds` times (default 3) per back end, alternating, and the best run of each is reported: on
//! this kind of shared VM a back end's IOPS can halve from one run to the next (SPDK's vhost ran 1.9 M and
//! 4.6 M null randread qd32 in two runs minutes apart), so one run per back end decides nothing.
//!
//! usage: vhost_bench [-t SECS] [--qd 32,128] [--rw randread,randwrite] [--backing null,ram] [--tgt PATH]
//!                    [--qsd PATH] [--spdk PATH | --no-spdk] [--driver-core N] [--backend-core N] [--rounds N]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost_blk::frontend::{Frontend, Options, F_NEXT, F_WRITE};
use vhost_blk::mem::FastMem;

const BS: u64 = 4096;
const DISK: u64 = 1 << 30;
const QUEUE_SIZE: u16 = 1024;

struct Args {
    secs: f64,
    qds: Vec<u16>,
    rws: Vec<String>,
    backings: Vec<String>,
    tgt: PathBuf,
    qsd: String,
    /// SPDK's `vhost` binary, if it is in the run.
    spdk: Option<PathBuf>,
    driver_core: usize,
    backend_core: usize,
    socket: Option<PathBuf>,
    /// Runs per back end and case, alternating between back ends; the best of each is kept (as benches/run.sh),
    /// so that a disturbance of this shared machine during one run does not decide a ratio.
    rounds: u32,
}

fn parse_args() -> Args {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let mut a = Args {
        secs: 5.0,
        qds: vec![32, 128],
        rws: vec!["randread".into(), "randwrite".into()],
        backings: vec!["null".into(), "ram".into()],
        tgt: exe_dir.join("spdk_tgt"),
        qsd: "qemu-storage-daemon".into(),
        spdk: Some(
            PathBuf::from(std::env::var("SPDK_PEER").unwrap_or_else(|_| "/root/spdk-peer".into()))
                .join("build/bin/vhost"),
        )
        .filter(|p| p.exists()),
        driver_core: 0,
        backend_core: 1,
        socket: None,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "-t" => a.secs = v().parse().expect("seconds"),
            "--qd" => a.qds = v().split(',').map(|x| x.parse().expect("qd")).collect(),
            "--rw" => a.rws = v().split(',').map(String::from).collect(),
            "--backing" => a.backings = v().split(',').map(String::from).collect(),
            "--tgt" => a.tgt = PathBuf::from(v()),
            "--qsd" => a.qsd = v(),
            "--spdk" => a.spdk = Some(PathBuf::from(v())),
            "--no-spdk" => a.spdk = None,
            "--driver-core" => a.driver_core = v().parse().expect("core"),
            "--backend-core" => a.backend_core = v().parse().expect("core"),
            "--socket" => a.socket = Some(PathBuf::from(v())),
            "--rounds" => a.rounds = v().parse::<u32>().expect("rounds").max(1),
            "-h" | "--help" => {
                println!("usage: vhost_bench [-t SECS] [--qd 32,128] [--rw randread,randwrite] [--backing null,ram] [--tgt PATH] [--qsd PATH] [--spdk PATH | --no-spdk] [--driver-core N] [--backend-core N] [--rounds N]");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Pins the calling thread to `core` (`None`: every CPU again, so children start unrestricted).
fn pin(core: Option<usize>) {
    if let Err(e) = reactor::pin_current_thread(core.map(|c| c as u32)) {
        eprintln!("vhost_bench: cannot pin to {core:?}: {e}");
    }
}

/// CPU seconds (user + system) a process used so far.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

struct Backend {
    child: Option<Child>,
    sock: PathBuf,
    name: &'static str,
    /// Guest memory on hugepages.
    huge: bool,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{what} did not create {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rpc(sock: &Path, method: &str, params: serde_json::Value) {
    let mut s = UnixStream::connect(sock).expect("rpc socket");
    let req = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    s.write_all(req.to_string().as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&buf) {
            assert!(v.get("error").is_none(), "{method}: {v}");
            return;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "{method}: connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Our `spdk_tgt`, or SPDK's `vhost` (`spdk`): the same command line and RPCs.
fn start_ours(a: &Args, dir: &Path, backing: &str, spdk: bool) -> Backend {
    let rpc_sock = dir.join("spdk.sock");
    let bin = match (&a.spdk, spdk) {
        (Some(p), true) => p.clone(),
        _ => a.tgt.clone(),
    };
    let child = Command::new(&bin)
        .args(["-m", &format!("0x{:x}", 1u64 << a.backend_core), "-S"])
        .arg(dir)
        .arg("-r")
        .arg(&rpc_sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (build it: cargo build --release -p spdk-tgt)",
                bin.display()
            )
        });
    wait_for(&rpc_sock, "spdk_tgt");
    let blocks = DISK / BS;
    let bdev = match backing {
        "null" => {
            rpc(
                &rpc_sock,
                "bdev_null_create",
                serde_json::json!({"name": "b0", "num_blocks": blocks, "block_size": BS}),
            );
            "b0"
        }
        _ => {
            rpc(
                &rpc_sock,
                "bdev_malloc_create",
                serde_json::json!({"name": "b0", "num_blocks": blocks, "block_size": BS}),
            );
            "b0"
        }
    };
    rpc(
        &rpc_sock,
        "vhost_create_blk_controller",
        serde_json::json!({"ctrlr": "vb0", "dev_name": bdev}),
    );
    let sock = dir.join("vb0");
    wait_for(&sock, "spdk_tgt");
    Backend {
        child: Some(child),
        sock,
        name: if spdk { "spdk" } else { "spdk-rs" },
        huge: a.spdk.is_some(),
    }
}

fn start_qsd(a: &Args, dir: &Path, backing: &str) -> Backend {
    let sock = dir.join("qsd.sock");
    let blockdev = match backing {
        "null" => format!("driver=null-co,node-name=n0,size={DISK}"),
        _ => {
            let f = PathBuf::from(format!("/dev/shm/vhost-bench-{}", std::process::id()));
            let file = std::fs::File::create(&f).unwrap();
            file.set_len(DISK).unwrap();
            // Touch every page so both back ends start with their RAM populated.
            let mut w = std::io::BufWriter::new(file);
            let z = vec![0u8; 1 << 20];
            for _ in 0..(DISK >> 20) {
                w.write_all(&z).unwrap();
            }
            w.flush().unwrap();
            format!(
                "driver=file,filename={},node-name=n0,cache.direct=off",
                f.display()
            )
        }
    };
    let child = Command::new("taskset")
        .args(["-c", &a.backend_core.to_string(), &a.qsd, "--blockdev", &blockdev, "--export"])
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", a.qsd));
    wait_for(&sock, "qemu-storage-daemon");
    Backend {
        child: Some(child),
        sock,
        name: "qemu-sd",
        huge: a.spdk.is_some(),
    }
}

struct Run {
    iops: f64,
    cpu: f64,
    errors: u64,
}

/// Keeps `qd` 4 KiB requests in flight on queue 0 for `secs`.
fn drive(b: &Backend, rw: &str, qd: u16, secs: f64, core: usize) -> Run {
    pin(Some(core));
    let r = drive_pinned(b, rw, qd, secs);
    pin(None);
    r
}

fn drive_pinned(b: &Backend, rw: &str, qd: u16, secs: f64) -> Run {
    let f = Frontend::connect(
        &b.sock,
        &Options {
            queues: 1,
            queue_size: QUEUE_SIZE,
            mem_size: 64 << 20,
            hugepages: b.huge,
            // As QEMU's vhost-user-blk: every back end that offers inflight tracking keeps it.
            inflight: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", b.name));
    let write = rw.contains("write");
    let q = &f.queues[0];
    let (desc, avail, used, size) = (q.desc(), q.avail(), q.used(), q.size);
    let hdrs: Vec<u64> = (0..qd).map(|s| q.hdr(s)).collect();
    let stats: Vec<u64> = (0..qd).map(|s| q.status(s)).collect();
    for s in 0..qd {
        let head = s * 3;
        let data = f.data(s as u64 * BS);
        f.write_hdr(hdrs[s as usize], if write { 1 } else { 0 }, 0);
        f.write_desc(0, head, hdrs[s as usize], 16, F_NEXT, head + 1);
        f.write_desc(
            0,
            head + 1,
            data,
            BS as u32,
            F_NEXT | if write { 0 } else { F_WRITE },
            head + 2,
        );
        f.write_desc(0, head + 2, stats[s as usize], 1, F_WRITE, 0);
    }
    let _ = desc;
    // The driver's hot loop uses the same fast accessors as the back end (one region, raw copies, atomics).
    let fast = FastMem::new(std::sync::Arc::new(f.mem.clone()));
    let mem = &fast;
    let mut rng: u64 = 0x9e3779b97f4a7c15;
    let blocks = DISK / BS;
    let mut next_sector = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * (BS / 512)
    };
    let mut avail_idx: u16 = 0;
    let mut last_used: u16 = 0;
    let put = |mem: &FastMem, s: u16, avail_idx: &mut u16, sector: u64| {
        mem.write(hdrs[s as usize] + 8, &sector.to_le_bytes());
        let slot = avail + 4 + (*avail_idx % size) as u64 * 2;
        mem.write(slot, &(s * 3).to_le_bytes());
        *avail_idx = avail_idx.wrapping_add(1);
    };
    let kick = |f: &Frontend, mem: &FastMem, avail_idx: u16| {
        mem.store_u16(avail + 2, avail_idx);
        fence(Ordering::SeqCst);
        let flags = mem.load_u16(used).unwrap_or(0);
        if flags & 1 == 0 {
            let _ = f.queues[0].kick.write(1);
        }
    };
    for s in 0..qd {
        let sec = next_sector();
        put(mem, s, &mut avail_idx, sec);
    }
    kick(&f, mem, avail_idx);
    let mut done: u64 = 0;
    let mut errors: u64 = 0;
    let warm = Instant::now() + Duration::from_millis(300);
    while Instant::now() < warm {
        // warm-up: same loop, not counted
        let u: u16 = mem.load_u16(used + 2).unwrap_or(0);
        let mut n = 0;
        while last_used != u {
            let at = used + 4 + (last_used % size) as u64 * 8;
            let id = u32::from_le_bytes(mem.read::<4>(at).unwrap_or([0; 4]));
            last_used = last_used.wrapping_add(1);
            let s = (id / 3) as u16;
            let sec = next_sector();
            put(mem, s, &mut avail_idx, sec);
            n += 1;
        }
        if n > 0 {
            kick(&f, mem, avail_idx);
        }
    }
    let pid = b.child.as_ref().map_or(0, |c| c.id());
    let cpu0 = cpu_secs(pid);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut check = 0u32;
    loop {
        let u: u16 = mem.load_u16(used + 2).unwrap_or(0);
        let mut n = 0;
        while last_used != u {
            let at = used + 4 + (last_used % size) as u64 * 8;
            let id = u32::from_le_bytes(mem.read::<4>(at).unwrap_or([0; 4]));
            last_used = last_used.wrapping_add(1);
            let s = (id / 3) as u16;
            let st = mem.read::<1>(stats[s as usize]).map_or(0xff, |b| b[0]);
            if st != 0 {
                errors += 1;
            }
            let sec = next_sector();
            put(mem, s, &mut avail_idx, sec);
            n += 1;
        }
        if n > 0 {
            done += n;
            kick(&f, mem, avail_idx);
        }
        check += 1;
        if check.is_multiple_of(256) && Instant::now() >= end {
            break;
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu0;
    // Let in-flight requests finish before disconnecting.
    let drain = Instant::now() + Duration::from_secs(2);
    while mem.load_u16(used + 2).unwrap_or(0) != avail_idx && Instant::now() < drain {
        std::hint::spin_loop();
    }
    drop(f);
    Run {
        iops: done as f64 / wall,
        cpu: cpu / wall,
        errors,
    }
}

/// Keeps the run with the most IOPS; errors of every run are kept.
fn keep_best(best: &mut Option<Run>, r: Run) {
    *best = Some(match best.take() {
        Some(b) if b.iops >= r.iops => Run {
            errors: b.errors + r.errors,
            ..b
        },
        Some(b) => Run {
            errors: b.errors + r.errors,
            ..r
        },
        None => r,
    });
}

fn main() {
    let a = parse_args();
    let dir = std::env::temp_dir().join(format!("vhost-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!(
        "vhost-user-blk, 4 KiB, 1 queue, best of {} runs of {:.0} s, back ends alternating; back ends pinned to core {}, driver on core {}",
        a.rounds, a.secs, a.backend_core, a.driver_core
    );
    println!(
        "{:<6} {:<10} {:>4} | {:>10} {:>6} {:>11} | {:>10} {:>6} {:>11} | {:>7} {:>9}",
        "backing",
        "workload",
        "qd",
        "ours IOPS",
        "cpu",
        "IOPS/core",
        "qsd IOPS",
        "cpu",
        "IOPS/core",
        "ratio",
        "ratio/core"
    );
    if a.spdk.is_some() {
        println!(
            "{:>80}| {:>10} {:>6} {:>11} | {:>7} {:>9}",
            "", "spdk IOPS", "cpu", "IOPS/core", "vs spdk", "per core"
        );
    }
    if let Some(sock) = &a.socket {
        // Drive an already running back end (for profiling it).
        let b = Backend {
            child: None,
            sock: sock.clone(),
            name: "socket",
            huge: a.spdk.is_some(),
        };
        for rw in &a.rws {
            for &qd in &a.qds {
                let r = drive(&b, rw, qd, a.secs, a.driver_core);
                println!("{rw} qd {qd}: {:.0} IOPS ({} errors)", r.iops, r.errors);
            }
        }
        return;
    }
    let mut worst: Option<f64> = None;
    for backing in &a.backings {
        for rw in &a.rws {
            for &qd in &a.qds {
                let sub = dir.join(format!("{backing}-{rw}-{qd}"));
                std::fs::create_dir_all(&sub).unwrap();
                let (mut ours, mut spdk, mut qsd) = (None, None, None);
                for round in 0..a.rounds {
                    // Fresh directories each run: SPDK refuses an RPC socket path a killed instance left.
                    let dir = |name: &str| {
                        let d = sub.join(format!("{name}{round}"));
                        std::fs::create_dir_all(&d).unwrap();
                        d
                    };
                    let b = start_ours(&a, &dir("ours"), backing, false);
                    keep_best(&mut ours, drive(&b, rw, qd, a.secs, a.driver_core));
                    drop(b);
                    if a.spdk.is_some() {
                        let b = start_ours(&a, &dir("spdk"), backing, true);
                        keep_best(&mut spdk, drive(&b, rw, qd, a.secs, a.driver_core));
                    }
                    let b = start_qsd(&a, &dir("qsd"), backing);
                    keep_best(&mut qsd, drive(&b, rw, qd, a.secs, a.driver_core));
                }
                let (ours, qsd) = (ours.expect("one round"), qsd.expect("one round"));
                let _ =
                    std::fs::remove_file(format!("/dev/shm/vhost-bench-{}", std::process::id()));
                let per = |r: &Run| r.iops / r.cpu.max(0.01);
                let ratio_core = per(&ours) / per(&qsd).max(1.0);
                worst = Some(worst.map_or(ratio_core, |w: f64| w.min(ratio_core)));
                println!(
                    "{:<7} {:<10} {:>4} | {:>10.0} {:>6.2} {:>11.0} | {:>10.0} {:>6.2} {:>11.0} | {:>7.2} {:>9.2}{}{}",
                    backing,
                    rw,
                    qd,
                    ours.iops,
                    ours.cpu,
                    per(&ours),
                    qsd.iops,
                    qsd.cpu,
                    per(&qsd),
                    ours.iops / qsd.iops.max(1.0),
                    ratio_core,
                    match &spdk {
                        Some(sp) => format!(
                            " | {:>10.0} {:>6.2} {:>11.0} | {:>7.2} {:>9.2}",
                            sp.iops,
                            sp.cpu,
                            per(sp),
                            ours.iops / sp.iops.max(1.0),
                            per(&ours) / per(sp).max(1.0)
                        ),
                        None => String::new(),
                    },
                    if ours.errors + qsd.errors + spdk.as_ref().map_or(0, |s| s.errors) > 0 {
                        format!(
                            "  (errors: ours {}, qsd {}, spdk {})",
                            ours.errors,
                            qsd.errors,
                            spdk.as_ref().map_or(0, |s| s.errors)
                        )
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(w) = worst {
        println!("lowest IOPS-per-back-end-core ratio: {w:.2} (bar: 2.00)");
    }
}
