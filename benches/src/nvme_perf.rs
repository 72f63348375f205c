//! `nvme_perf`: a load generator on the NVMe host library with `spdk_nvme_perf`'s main flags and summary table,
//! so operators' scripts keep working: `-q` queue depth, `-o` I/O size, `-w` workload (read, write, randread,
//! randwrite, rw, randrw), `-M` read percentage for the mixed ones, `-t` seconds, `-c` core mask (each core
//! runs a job), `-H`/`-I` TCP header/data digests, `-r 'trtype:tcp adrfam:ipv4 traddr:... trsvcid:...
//! subnqn:...'` (`trtype:rdma` alike), or `-r 'trtype:pcie traddr:0000:00:04.0'` for a local controller bound to
//! vfio-pci.
//!
//! Per I/O it does what SPDK's perf does: pick the offset (sequential, or random from a per-run generator), take
//! the submit tick, submit; on completion add the latency to the total, min and max, and submit the next. Every
//! active namespace (or the one `ns:N` in `-r` names) with every core of the mask (`-c`), paired as SPDK perf
//! pairs them (namespace i with core i, round robin over the longer list): a job with its own I/O queue and
//! `-q` commands per pair, a row per pair and their total.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvme_host::{CtrlrOpts, Dir, IoQueue, Iov};
use nvme_proto::cmd::{io as opc, Sqe};
use reactor::dma::DmaBuf;
use reactor::{ticks, Poller};

struct Args {
    qd: usize,
    size: usize,
    workload: String,
    read_pct: u32,
    secs: u64,
    mask: String,
    trid: HashMap<String, String>,
    /// TCP header and data digests (`-H`, `-I`).
    digests: (bool, bool),
    /// `--psk-path`: a file holding the TLS PSK in interchange format (NVMe/TCP over TLS).
    psk_path: Option<String>,
    /// `-S`: the sock implementation (`posix`, or `ssl` for TLS).
    sock_impl: String,
}

fn usage(e: &str) -> ExitCode {
    eprintln!("nvme_perf: {e}");
    eprintln!(
        "usage: nvme_perf -q DEPTH -o BYTES -w read|write|randread|randwrite|rw|randrw [-M READ_PCT] -t SECS \
         [-c MASK] [-H] [-I] [-S ssl --psk-path FILE] \
         -r 'trtype:tcp|rdma adrfam:ipv4 traddr:A trsvcid:P subnqn:NQN [hostnqn:NQN]' | \
         -r 'trtype:pcie traddr:BDF'"
    );
    ExitCode::from(1)
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        qd: 0,
        size: 0,
        workload: String::new(),
        read_pct: 50,
        secs: 0,
        mask: "0x1".into(),
        trid: HashMap::new(),
        digests: (false, false),
        psk_path: None,
        sock_impl: "posix".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "-q" => a.qd = num(val()?)? as usize,
            "-H" => a.digests.0 = true,
            "-I" => a.digests.1 = true,
            "-o" => a.size = num(val()?)? as usize,
            "-w" => a.workload = val()?,
            "-M" => a.read_pct = num(val()?)?.min(100) as u32,
            "-t" => a.secs = num(val()?)?,
            "-c" => a.mask = val()?,
            "-S" | "--default-sock-impl" => a.sock_impl = val()?,
            "--psk-path" => a.psk_path = Some(val()?),
            // The identity NVMe/TCP offers is made from the NQNs, as in SPDK, whatever the sock option says.
            "--psk-identity" => {
                val()?;
            }
            "-r" => {
                for kv in val()?.split_whitespace() {
                    let (k, v) = kv
                        .split_once(':')
                        .ok_or_else(|| format!("-r: {kv} is not key:value"))?;
                    a.trid.insert(k.to_ascii_lowercase(), v.to_string());
                }
            }
            f => return Err(format!("unknown flag {f}")),
        }
    }
    if a.psk_path.is_some() && a.sock_impl != "ssl" {
        return Err("--psk-path needs -S ssl".into());
    }
    if !["posix", "ssl"].contains(&a.sock_impl.as_str()) {
        return Err(format!("-S: unknown sock implementation {}", a.sock_impl));
    }
    if a.qd == 0 || a.size == 0 || a.secs == 0 || a.workload.is_empty() {
        return Err("-q, -o, -w and -t are required".into());
    }
    if !["read", "write", "randread", "randwrite", "rw", "randrw"].contains(&a.workload.as_str()) {
        return Err(format!("unknown workload {}", a.workload));
    }
    match a.trid.get("trtype").map(|s| s.to_ascii_lowercase()) {
        Some(t) if ["tcp", "rdma", "pcie"].contains(&t.as_str()) => Ok(a),
        t => Err(format!("trtype {t:?}: tcp, rdma and pcie are supported")),
    }
}

/// The run's counters.
#[derive(Default)]
struct Stats {
    ios: u64,
    errors: u64,
    total_ticks: u64,
    min_ticks: u64,
    max_ticks: u64,
}

/// The job: queue, buffers (one per slot), offsets, submit ticks.
struct Job {
    q: IoQueue,
    bufs: Vec<DmaBuf>,
    submitted_at: Vec<u64>,
    blocks_per_io: u64,
    ns_blocks: u64,
    nsid: u32,
    random: bool,
    read_pct: u32,
    write_only: bool,
    read_only: bool,
    next_seq: u64,
    seed: u64,
    stats: Stats,
    stopping: bool,
}

impl Job {
    fn rand(&mut self) -> u64 {
        // xorshift64*: cheap, as SPDK perf's rand_r.
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn submit(&mut self, slot: usize) {
        let span = self.ns_blocks / self.blocks_per_io;
        let lba = if self.random {
            (self.rand() % span) * self.blocks_per_io
        } else {
            let l = self.next_seq;
            self.next_seq = (self.next_seq + self.blocks_per_io) % (span * self.blocks_per_io);
            l
        };
        let read = if self.read_only {
            true
        } else if self.write_only {
            false
        } else {
            (self.rand() % 100) < self.read_pct as u64
        };
        let mut s = Sqe::new(if read { opc::READ } else { opc::WRITE }, 0);
        s.set_nsid(self.nsid);
        s.set_cdw(10, lba as u32);
        s.set_cdw(11, (lba >> 32) as u32);
        s.set_cdw(12, self.blocks_per_io as u32 - 1);
        let b = &self.bufs[slot];
        let iov = [Iov {
            base: b.as_ptr(),
            len: b.len(),
        }];
        self.submitted_at[slot] = ticks::now();
        let dir = if read { Dir::FromCtrl } else { Dir::ToCtrl };
        // SAFETY: the slot's buffer lives in the job for the whole run; a slot has one command at a time.
        if let Err(e) = unsafe { self.q.submit(s, &iov, dir, slot as u64) } {
            eprintln!("nvme_perf: submit: {e:?}");
            self.stats.errors += 1;
        }
    }

    fn poll(&mut self) -> bool {
        let mut done = Vec::new();
        let did = self
            .q
            .poll(&mut |token, cqe| done.push((token as usize, cqe)));
        if self.q.ready() && self.submitted_at.iter().all(|&t| t == 0) && !self.stopping {
            for slot in 0..self.bufs.len() {
                self.submit(slot);
            }
        }
        let now = ticks::now();
        for (slot, cqe) in done {
            let t = now.saturating_sub(self.submitted_at[slot]);
            let s = &mut self.stats;
            if cqe.status.is_success() {
                s.ios += 1;
                s.total_ticks += t;
                s.min_ticks = if s.min_ticks == 0 {
                    t
                } else {
                    s.min_ticks.min(t)
                };
                s.max_ticks = s.max_ticks.max(t);
            } else {
                s.errors += 1;
            }
            if !self.stopping {
                self.submit(slot);
            }
        }
        did
    }
}

/// What a run hands back to `main`: each core's counters (or why its job failed) and the device line, or why
/// the run could not start.
type RunResult = Result<Vec<CoreResult>, String>;

/// One job's core, its device line (namespace included), and its counters or why it failed.
type CoreResult = (u32, String, Result<Stats, String>);

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    let trtype = a
        .trid
        .get("trtype")
        .map_or(String::new(), |t| t.to_ascii_lowercase());
    // A PCIe controller is named by its PCI address (bound to vfio-pci); a fabrics one by address, port and NQN.
    let (ip, port, subnqn, pci) = if trtype == "pcie" {
        let Some(bdf) = a.trid.get("traddr").and_then(|t| nvme_host::pci_address(t)) else {
            return usage("-r needs traddr:<PCI address> for trtype:pcie");
        };
        (IpAddr::from([0, 0, 0, 0]), 0, String::new(), Some(bdf))
    } else {
        let ip: IpAddr = match a.trid.get("traddr").map(|s| s.parse()) {
            Some(Ok(ip)) => ip,
            _ => return usage("-r needs traddr:<ip address>"),
        };
        let port: u16 = a
            .trid
            .get("trsvcid")
            .and_then(|p| p.parse().ok())
            .unwrap_or(4420);
        let Some(subnqn) = a.trid.get("subnqn").cloned() else {
            return usage("-r needs subnqn:<nqn>");
        };
        (ip, port, subnqn, None)
    };
    let Ok(cpumask) = reactor::CpuMask::parse(&a.mask) else {
        return usage("-c: not a core mask");
    };
    let cores: Vec<u32> = cpumask.cores().collect();
    let result: Arc<Mutex<Option<RunResult>>> = Arc::default();
    let r2 = result.clone();
    let opts = reactor::Options {
        cpumask,
        main_core: None,
        idle_backoff: false,
        pin: true,
    };
    let host = uuid_like();
    let hostnqn = a
        .trid
        .get("hostnqn")
        .cloned()
        .unwrap_or_else(|| format!("nqn.2014-08.org.nvmexpress:uuid:{host}"));
    let tls = match &a.psk_path {
        None => None,
        Some(path) => {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => return usage(&format!("Could not open PSK file {path}: {e}")),
            };
            match nvme_tls::ConfiguredPsk::parse(&text).and_then(|k| k.tls_psk(&hostnqn, &subnqn)) {
                Ok(p) => Some(p),
                Err(e) => return usage(&format!("--psk-path {path}: {e}")),
            }
        }
    };
    let ctrlr_opts = CtrlrOpts {
        rdma: trtype == "rdma",
        kato_ms: if pci.is_some() { 0 } else { 10_000 },
        pci,
        addr: SocketAddr::new(ip, port),
        subnqn: subnqn.clone(),
        hostnqn,
        hostid: [0x5a; 16],
        num_io_queues: 1,
        // As SPDK perf: as many queue entries as the depth (the target caps the queue size; ask for no more).
        io_queue_size: (a.qd.min(u16::MAX as usize) as u16).max(2),
        connect_timeout: Duration::from_secs(10),
        digests: a.digests,
        auth: None,
        tls,
        tcp_user_timeout_ms: 0,
        rdma_knobs: Default::default(),
    };
    // One queue per (namespace, core) job: the namespaces are known only once connected, so ask for plenty
    // (the controller grants what it has; a job without a queue reports it).
    let ctrlr_opts = CtrlrOpts {
        num_io_queues: 64,
        ..ctrlr_opts
    };
    let only_ns: Option<u32> = match a.trid.get("ns").map(|n| n.parse()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return usage("-r: ns:<namespace id> is not a number"),
    };
    let w = Work {
        qd: a.qd,
        size: a.size,
        random: a.workload.starts_with("rand"),
        read_pct: a.read_pct,
        write_only: a.workload.ends_with("write"),
        read_only: a.workload.ends_with("read"),
    };
    let secs = a.secs;
    let run = reactor::run(opts, move || {
        nvme_host::connect(ctrlr_opts, move |res| {
            let fail = |e: String| {
                *r2.lock().unwrap() = Some(Err(e));
                reactor::stop();
            };
            let ctrlr = match res {
                Ok(c) => c,
                Err(e) => return fail(e.to_string()),
            };
            let namespaces: Vec<_> = ctrlr
                .info
                .namespaces
                .iter()
                .filter(|n| only_ns.is_none_or(|id| n.nsid == id))
                .cloned()
                .collect();
            if namespaces.is_empty() {
                return fail(match only_ns {
                    Some(id) => format!("namespace {id} is not active"),
                    None => "no active namespace".into(),
                });
            }
            for ns in &namespaces {
                let bs = ns.block_size as usize;
                if !w.size.is_multiple_of(bs) || w.size > ctrlr.info.max_xfer as usize {
                    return fail(format!(
                        "-o {}: not a multiple of namespace {}'s block size {bs} or over the transfer limit {}",
                        w.size, ns.nsid, ctrlr.info.max_xfer
                    ));
                }
            }
            // SPDK perf's device names: `PCIE (<address>)`, or the fabric with its address and NQN.
            let device = |nsid: u32| match &ctrlr.info.opts.pci {
                Some(bdf) => format!("PCIE ({bdf}) NSID {nsid}"),
                None if ctrlr.info.opts.rdma => {
                    format!("RDMA (addr:{ip} subnqn:{subnqn}) NSID {nsid}")
                }
                None => format!("TCP (addr:{ip} subnqn:{subnqn}) NSID {nsid}"),
            };
            // SPDK perf's pairing: namespace i % n with core i % c, for the longer of the two lists. Each pair
            // is a job with its own I/O queue on a thread of that core; the main core collects their counters
            // and ends the run once all are in.
            let pairs: Vec<_> = (0..namespaces.len().max(cores.len()))
                .map(|i| {
                    (
                        namespaces[i % namespaces.len()].clone(),
                        cores[i % cores.len()],
                    )
                })
                .collect();
            let results: Arc<Mutex<Vec<CoreResult>>> = Arc::default();
            let n = pairs.len();
            let main = reactor::thread::current().expect("the main thread");
            for (ns, core) in pairs {
                let Some(t) = reactor::spawn_thread(
                    &format!("nvme_perf_{core}_ns{}", ns.nsid),
                    Some(&reactor::CpuMask::single(core)),
                ) else {
                    return fail(format!("no reactor on core {core}"));
                };
                let (info, results, main, ctrlr_done) = (
                    ctrlr.info.clone(),
                    results.clone(),
                    main.clone(),
                    r2.clone(),
                );
                let (desc, nsid, ns_blocks, bs) =
                    (device(ns.nsid), ns.nsid, ns.blocks, ns.block_size as usize);
                t.send(move || {
                    let report = move |r: Result<Stats, String>| {
                        let mut all = results.lock().unwrap();
                        all.push((core, desc, r));
                        if all.len() == n {
                            let mut v = std::mem::take(&mut *all);
                            v.sort_by(|x, y| (x.0, &x.1).cmp(&(y.0, &y.1)));
                            *ctrlr_done.lock().unwrap() = Some(Ok(v));
                            // The controller lives on the main thread: it closes and the run ends there.
                            main.send(|| {
                                if let Some(c) = CTRLR.with(|c| c.borrow_mut().take()) {
                                    c.close();
                                }
                                reactor::stop();
                            });
                        }
                    };
                    let q = match IoQueue::connect(info) {
                        Ok(q) => q,
                        Err(e) => return report(Err(e.to_string())),
                    };
                    let job = Rc::new(RefCell::new(Job {
                        q,
                        bufs: (0..w.qd)
                            .map(|_| DmaBuf::alloc(w.size).expect("I/O buffers"))
                            .collect(),
                        submitted_at: vec![0; w.qd],
                        blocks_per_io: (w.size / bs) as u64,
                        ns_blocks,
                        nsid,
                        random: w.random,
                        read_pct: w.read_pct,
                        write_only: w.write_only,
                        read_only: w.read_only,
                        next_seq: 0,
                        seed: 0x9e37_79b9_7f4a_7c15 ^ core as u64 ^ (nsid as u64) << 32,
                        stats: Stats::default(),
                        stopping: false,
                    }));
                    let j = job.clone();
                    let poller = Rc::new(RefCell::new(Some(Poller::register(
                        "nvme_perf",
                        0,
                        move || j.borrow_mut().poll(),
                    ))));
                    reactor::timer(secs * 1_000_000, move || {
                        let mut j = job.borrow_mut();
                        j.stopping = true;
                        let stats = std::mem::take(&mut j.stats);
                        let failed = j.q.failed();
                        drop(j);
                        poller.borrow_mut().take();
                        report(if failed {
                            Err("the I/O queue failed (see the target's log)".into())
                        } else {
                            Ok(stats)
                        });
                    })
                    .detach();
                });
            }
            // Kept on the main thread until the jobs are done.
            CTRLR.with(|slot| *slot.borrow_mut() = Some(ctrlr));
        });
    });
    if let Err(e) = run {
        return usage(&format!("reactors: {e}"));
    }
    let out = result.lock().unwrap().take();
    match out {
        Some(Ok(per_job)) => {
            let hz = ticks::rate() as f64;
            let us = |t: u64| t as f64 * 1e6 / hz;
            let mut total = Stats::default();
            let mut rows = Vec::new();
            for (core, desc, r) in per_job {
                let s = match r {
                    Ok(s) => s,
                    Err(e) => return usage(&format!("{desc} from core {core}: {e}")),
                };
                total.ios += s.ios;
                total.errors += s.errors;
                total.total_ticks += s.total_ticks;
                if s.min_ticks > 0 {
                    total.min_ticks = if total.min_ticks == 0 {
                        s.min_ticks
                    } else {
                        total.min_ticks.min(s.min_ticks)
                    };
                }
                total.max_ticks = total.max_ticks.max(s.max_ticks);
                rows.push((format!("{desc} from core {core:2}"), s));
            }
            println!("========================================================");
            println!("{:>104}", "Latency(us)");
            println!(
                "{:<71}: {:>10} {:>10} {:>10} {:>10} {:>10}",
                "Device Information", "IOPS", "MiB/s", "Average", "min", "max"
            );
            let row = |name: &str, s: &Stats| {
                let iops = s.ios as f64 / a.secs as f64;
                let avg = if s.ios > 0 {
                    us(s.total_ticks) / s.ios as f64
                } else {
                    0.0
                };
                println!(
                    "{:<71}: {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                    name,
                    iops,
                    iops * a.size as f64 / (1024.0 * 1024.0),
                    avg,
                    us(s.min_ticks),
                    us(s.max_ticks)
                )
            };
            for (name, s) in &rows {
                row(name, s);
            }
            println!("========================================================");
            row("Total", &total);
            if total.errors > 0 {
                eprintln!("nvme_perf: {} I/O errors", total.errors);
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Some(Err(e)) => usage(&e),
        None => usage("the run ended without a result"),
    }
}

thread_local! {
    /// The controller, on the main thread while the jobs run.
    static CTRLR: RefCell<Option<nvme_host::Controller>> = const { RefCell::new(None) };
}

/// What each core's job does (from the flags).
#[derive(Clone, Copy)]
struct Work {
    qd: usize,
    size: usize,
    random: bool,
    read_pct: u32,
    write_only: bool,
    read_only: bool,
}

/// A host identifier for this run (random, as SPDK perf's default host NQN).
fn uuid_like() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let p = std::process::id() as u64;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        t as u32,
        (t >> 32) as u16,
        p & 0xfff,
        (t >> 48) & 0xfff,
        t ^ p
    )
}
