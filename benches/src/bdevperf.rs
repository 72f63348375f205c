//! `bdevperf`: SPDK's bdev benchmark with the same flags, JSON config and output table, so an operator can run
//! the same job against SPDK and against us. A counting allocator reports heap allocations in steady state.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bdev::{Completion, Desc, IoChannel, IoHandle, IoStatus, IoType, IoVec};
use jsonrpc::{Registry, Responder, RpcError, STATE_RUNTIME};
use reactor::dma::DmaBuf;
use reactor::{ticks, CpuMask};
use serde_json::{json, Value};

/// Counts heap allocations so the steady state can be shown to allocate nothing per I/O.
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; the counter has no effect on the memory returned.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Read,
    Write,
    RandRead,
    RandWrite,
    Rw,
    RandRw,
    Verify,
    Unmap,
    Flush,
    WriteZeroes,
}

impl Workload {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "read" => Workload::Read,
            "write" => Workload::Write,
            "randread" => Workload::RandRead,
            "randwrite" => Workload::RandWrite,
            "rw" => Workload::Rw,
            "randrw" => Workload::RandRw,
            "verify" => Workload::Verify,
            "unmap" => Workload::Unmap,
            "flush" => Workload::Flush,
            "write_zeroes" => Workload::WriteZeroes,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::Rw => "rw",
            Workload::RandRw => "randrw",
            Workload::Verify => "verify",
            Workload::Unmap => "unmap",
            Workload::Flush => "flush",
            Workload::WriteZeroes => "write_zeroes",
        }
    }
    fn random(self) -> bool {
        matches!(
            self,
            Workload::RandRead | Workload::RandWrite | Workload::RandRw
        )
    }
    fn mixed(self) -> bool {
        matches!(self, Workload::Rw | Workload::RandRw)
    }
}

#[derive(Clone, Debug)]
struct PerfOpts {
    qd: u32,
    io_size: u64,
    workload: Workload,
    rwmix: u32,
    time_s: u64,
    wait_rpc: bool,
    every_core: bool,
    only: Option<String>,
    continue_on_failure: bool,
    /// Ours only (`--idle-channels`): each job thread also holds a channel on every other bdev, with no I/O, to
    /// measure what idle bdevs cost a busy thread.
    idle_channels: bool,
}

fn parse_size(s: &str) -> Option<u64> {
    let (n, m) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1024),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>().ok().map(|v| v * m)
}

const USAGE: &str = "bdevperf [options]\n\
 -q <depth>          io depth\n\
 -o <size>           io size in bytes (k/m suffixes allowed)\n\
 -w <type>           io pattern type, must be one of (read, write, randread, randwrite, rw, randrw, verify, unmap, flush, write_zeroes)\n\
 -M <percent>        rwmixread (100 for reads, 0 for writes)\n\
 -t <time>           time in seconds\n\
 -z                  start bdevperf, but wait for perform_tests RPC to start tests\n\
 -C                  enable every core to send I/Os to each bdev\n\
 -T <bdev>           bdev to run against. Default: all available bdevs.\n\
 -f                  continue processing I/O even after failures\n\
 --idle-channels     (not in SPDK's) each job thread also opens a channel on every other bdev and leaves it idle\n\
 -S <period>         show performance result in real time every <period> seconds (accepted)\n\
 -l / -P <num>       latency summary / histogram (accepted)\n\
plus the common SPDK app options (-c/--json, -m, -r, -L, --no-huge, ...); see spdk_tgt --help\n";

fn parse_args(args: Vec<String>) -> Result<(PerfOpts, app::cli::Opts), String> {
    let mut o = PerfOpts {
        qd: 0,
        io_size: 0,
        workload: Workload::Read,
        rwmix: 0,
        time_s: 0,
        wait_rpc: false,
        every_core: false,
        only: None,
        continue_on_failure: false,
        idle_channels: false,
    };
    let mut rest = vec![];
    let (mut have_q, mut have_o, mut have_w, mut have_t, mut have_m) =
        (false, false, false, false, false);
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let flag = a.get(..2).unwrap_or("");
        let takes = matches!(flag, "-q" | "-o" | "-w" | "-M" | "-t" | "-T" | "-S" | "-P");
        if a == "--idle-channels" {
            o.idle_channels = true;
            continue;
        }
        let plain = matches!(a.as_str(), "-z" | "-C" | "-f" | "-l");
        if !takes && !plain {
            rest.push(a);
            continue;
        }
        let val = if takes {
            if a.len() > 2 {
                a[2..].to_string()
            } else {
                it.next()
                    .ok_or_else(|| format!("{flag} requires an argument"))?
            }
        } else {
            String::new()
        };
        let bad = |what: &str| format!("invalid {what} '{val}' for {flag}");
        match flag {
            "-q" => {
                o.qd = val
                    .parse()
                    .ok()
                    .filter(|q| *q > 0)
                    .ok_or_else(|| bad("queue depth"))?;
                have_q = true;
            }
            "-o" => {
                o.io_size = parse_size(&val)
                    .filter(|s| *s > 0)
                    .ok_or_else(|| bad("io size"))?;
                have_o = true;
            }
            "-w" => {
                o.workload = Workload::parse(&val).ok_or_else(|| bad("workload"))?;
                have_w = true;
            }
            "-M" => {
                o.rwmix = val
                    .parse()
                    .ok()
                    .filter(|m| *m <= 100)
                    .ok_or_else(|| bad("rwmixread"))?;
                have_m = true;
            }
            "-t" => {
                o.time_s = val
                    .parse()
                    .ok()
                    .filter(|t| *t > 0)
                    .ok_or_else(|| bad("time"))?;
                have_t = true;
            }
            "-T" => o.only = Some(val),
            "-z" => o.wait_rpc = true,
            "-C" => o.every_core = true,
            "-f" => o.continue_on_failure = true,
            _ => {}
        }
    }
    if !(have_q && have_o && have_w && have_t) {
        return Err("missing required option: -q, -o, -w and -t are required".into());
    }
    if o.workload.mixed() && !have_m {
        return Err("-M (rwmixread) is required for rw and randrw".into());
    }
    let app_opts = match app::cli::parse(rest).map_err(|e| e.0)? {
        app::cli::Action::Run(a) => *a,
        _ => return Err(USAGE.into()),
    };
    Ok((o, app_opts))
}

/// Results of one job, sent back to the app thread.
#[derive(Clone, Debug, Default)]
struct JobResult {
    name: String,
    core: u32,
    runtime_us: u64,
    completed: u64,
    failed: u64,
    lat_total: u64,
    lat_min: u64,
    lat_max: u64,
    verify_range: Option<(u64, u64)>,
    steady_allocs: u64,
    steady_ios: u64,
    error: Option<String>,
    terminated: bool,
}

/// One outstanding I/O's state. Its buffers stay in the task: the I/O carries iovecs that point at them, as
/// SPDK's bdevperf hands its task buffer to `spdk_bdev_readv_blocks`.
struct Task {
    buf: DmaBuf,
    /// Verify reads land here, to be compared with `buf`.
    rbuf: Option<DmaBuf>,
    slot: u64,
    verifying: bool,
}

struct Job {
    opts: PerfOpts,
    _desc: Desc,
    /// Channels held idle on this thread (`--idle-channels`), released with the job.
    _idle: Vec<(Desc, IoChannel)>,
    ch: IoChannel,
    blocks_per_io: u64,
    /// First slot (in I/O-size units) of this job's range, and the range's length: with -C, the jobs of one
    /// bdev split it between them, as SPDK does, so they never write over each other.
    slot_base: u64,
    slots: u64,
    next_slot: u64,
    rng: u64,
    tasks: Vec<Task>,
    outstanding: u32,
    start: u64,
    /// Time is up (or the bdev went away): no new I/O, finish once the outstanding ones complete. Set by a
    /// timer, as SPDK's bdevperf does, so the I/O path reads no clock of its own: latency comes from the bdev
    /// layer's histogram of the job's channel, which is what SPDK's bdevperf reports too.
    draining: bool,
    write_count: u64,
    res: JobResult,
    alloc_mark: Option<(u64, u64)>,
    alloc_end: Option<(u64, u64)>,
    /// The end-of-run and allocation-count timers.
    timers: Vec<reactor::Poller>,
    finish: Option<Box<dyn FnOnce(JobResult) + Send>>,
}

thread_local! {
    static JOBS: RefCell<Vec<Option<Job>>> = const { RefCell::new(Vec::new()) };
}

impl Job {
    fn rand(&mut self) -> u64 {
        // xorshift64*: cheap, and good enough to spread offsets.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn next_slot(&mut self) -> u64 {
        if self.opts.workload.random() {
            self.slot_base + self.rand() % self.slots
        } else {
            let s = self.next_slot;
            self.next_slot = (self.next_slot + 1) % self.slots;
            self.slot_base + s
        }
    }

    /// Starts the next I/O of task `ti`. Returns false when the job is out of time.
    fn issue(&mut self, ji: usize, ti: usize) {
        if self.draining || (self.res.error.is_some() && !self.opts.continue_on_failure) {
            return;
        }
        let ctx = ((ji as u64) << 32) | ti as u64;
        let bpi = self.blocks_per_io;
        let w = self.opts.workload;
        let verifying = self.tasks[ti].verifying;
        let slot = if verifying {
            self.tasks[ti].slot
        } else {
            self.next_slot()
        };
        let read = match w {
            Workload::Read | Workload::RandRead => true,
            Workload::Rw | Workload::RandRw => self.rand() % 100 < self.opts.rwmix as u64,
            Workload::Verify => verifying,
            _ => false,
        };
        if w == Workload::Verify && !verifying {
            self.write_count += 1;
            let stamp = self.write_count << 32;
            let base = slot * bpi * 1_000_003;
            for (i, c) in self.tasks[ti]
                .buf
                .as_mut_slice()
                .chunks_exact_mut(8)
                .enumerate()
            {
                c.copy_from_slice(&(stamp | (base + i as u64)).to_le_bytes());
            }
        }
        let t = &mut self.tasks[ti];
        t.slot = slot;
        let cb = Completion::Fn(task_done);
        let r = match w {
            Workload::Unmap => self
                .ch
                .submit_nodata(IoType::Unmap, slot * bpi, bpi, cb, ctx),
            Workload::Flush => self
                .ch
                .submit_nodata(IoType::Flush, slot * bpi, bpi, cb, ctx),
            Workload::WriteZeroes => {
                self.ch
                    .submit_nodata(IoType::WriteZeroes, slot * bpi, bpi, cb, ctx)
            }
            _ if read => {
                let buf = match (&t.rbuf, verifying) {
                    (Some(r), true) => r,
                    _ => &t.buf,
                };
                let iov = [IoVec {
                    base: buf.as_ptr(),
                    len: buf.len(),
                }];
                // SAFETY: the buffer belongs to this task, which has one I/O at a time and is touched again only
                // in that I/O's callback; the job owning it is released only once no I/O is outstanding.
                unsafe { self.ch.readv(&iov, slot * bpi, bpi, cb, ctx) }
            }
            _ => {
                let iov = [IoVec {
                    base: t.buf.as_ptr(),
                    len: t.buf.len(),
                }];
                // SAFETY: as for reads; nothing writes the buffer while the write is in flight.
                unsafe { self.ch.writev(&iov, slot * bpi, bpi, cb, ctx) }
            }
        };
        match r {
            Ok(()) => self.outstanding += 1,
            Err(_) => {
                // No descriptor left: try again once one is returned (rare; may allocate).
                self.outstanding += 1;
                bdev::queue_io_wait(move || {
                    reactor::timer(1, move || {
                        with_job(ji, |job| {
                            job.outstanding -= 1;
                            job.issue(ji, ti);
                            job.maybe_finish(ji);
                        })
                    })
                    .detach()
                });
            }
        }
    }

    fn maybe_finish(&mut self, ji: usize) {
        if self.outstanding > 0 {
            return;
        }
        let mut r = std::mem::take(&mut self.res);
        r.runtime_us =
            ((ticks::now() - self.start) as u128 * 1_000_000 / ticks::rate() as u128) as u64;
        if let Some(h) = self.ch.histogram() {
            (r.lat_total, r.lat_min, r.lat_max) = h.summary();
        }
        self.timers.clear();
        if self.opts.workload == Workload::Verify {
            r.verify_range = Some((self.slot_base, self.slots));
        }
        if let (Some((a0, i0)), Some((a1, i1))) = (self.alloc_mark, self.alloc_end) {
            r.steady_allocs = a1.saturating_sub(a0);
            r.steady_ios = i1.saturating_sub(i0);
        }
        if let Some(f) = self.finish.take() {
            f(r);
        }
        // Release the descriptor and channel from this thread (a message, so we are out of the borrow).
        reactor::current().expect("job thread").send(move || {
            JOBS.with(|j| j.borrow_mut()[ji] = None);
        });
    }
}

fn with_job(ji: usize, f: impl FnOnce(&mut Job)) {
    JOBS.with(|j| {
        if let Some(job) = j.borrow_mut().get_mut(ji).and_then(|x| x.as_mut()) {
            f(job)
        }
    })
}

fn task_done(io: IoHandle) {
    let ji = (io.ctx >> 32) as usize;
    let ti = (io.ctx & 0xffff_ffff) as usize;
    let status = io.status();
    let io_type = io.io_type();
    drop(io);
    with_job(ji, |job| {
        job.outstanding -= 1;
        let t = &mut job.tasks[ti];
        let mut ok = status == IoStatus::Success;
        if ok && job.opts.workload == Workload::Verify {
            if io_type == IoType::Read {
                let same = t
                    .rbuf
                    .as_ref()
                    .is_some_and(|r| t.buf.as_slice() == r.as_slice());
                if !same {
                    ok = false;
                    let msg = format!(
                        "Buffer mismatch on {} at LBA {} ({} blocks)",
                        job.res.name,
                        t.slot * job.blocks_per_io,
                        job.blocks_per_io
                    );
                    eprintln!("[bdevperf] *ERROR*: {msg}");
                    job.res.error.get_or_insert(msg);
                }
                t.verifying = false;
            } else {
                t.verifying = true;
            }
        }
        if ok {
            // A verify pair counts as one I/O, as SPDK counts it, when its read completes.
            if !(job.opts.workload == Workload::Verify && io_type == IoType::Write) {
                job.res.completed += 1;
            }
        } else {
            job.res.failed += 1;
            job.tasks[ti].verifying = false;
            if job.res.error.is_none() {
                job.res.error = Some(format!("{} I/O failed: {status:?}", io_type.name()));
            }
        }
        job.issue(ji, ti);
        job.maybe_finish(ji);
    });
}

/// Starts one job on the current (job) thread.
fn start_job(
    bdev_name: String,
    (part, parts): (u64, u64),
    opts: PerfOpts,
    finish: Box<dyn FnOnce(JobResult) + Send>,
) {
    let core = reactor::current().map(|t| t.core()).unwrap_or(0);
    let fail = |msg: String, finish: Box<dyn FnOnce(JobResult) + Send>| {
        finish(JobResult {
            name: bdev_name.clone(),
            core,
            error: Some(msg),
            ..Default::default()
        })
    };
    let write = !matches!(opts.workload, Workload::Read | Workload::RandRead);
    let on_event: bdev::EventCb = std::sync::Arc::new(|ev: bdev::BdevEvent, b: &bdev::Bdev| {
        if ev == bdev::BdevEvent::Remove {
            // Delivered on the job's thread (shutdown or hot-remove): stop issuing; the job reports and closes
            // its descriptor once its in-flight I/O completed.
            JOBS.with(|j| {
                for job in j
                    .borrow_mut()
                    .iter_mut()
                    .flatten()
                    .filter(|job| job.res.name == b.name())
                {
                    job.draining = true;
                    job.res.terminated = true;
                }
            });
        }
    });
    let desc = match bdev::open(&bdev_name, write, Some(on_event)) {
        Ok(d) => d,
        Err(e) => return fail(format!("Could not open bdev {bdev_name}: {e}"), finish),
    };
    let bs = desc.bdev().block_size() as u64;
    if !opts.io_size.is_multiple_of(bs) {
        return fail(
            format!(
                "IO size ({}) is not a multiple of the block size {bs} of {bdev_name}",
                opts.io_size
            ),
            finish,
        );
    }
    let blocks_per_io = opts.io_size / bs;
    let all_slots = desc.bdev().num_blocks() / blocks_per_io;
    let slots = all_slots / parts.max(1);
    let slot_base = slots * part;
    if slots == 0 || (opts.workload == Workload::Verify && slots < opts.qd as u64) {
        return fail(
            format!("{bdev_name} is too small for the requested I/O size and depth"),
            finish,
        );
    }
    let mut tasks = Vec::with_capacity(opts.qd as usize);
    for _ in 0..opts.qd {
        let buf = match DmaBuf::alloc(opts.io_size as usize) {
            Ok(b) => b,
            Err(e) => return fail(format!("cannot allocate buffers: {e}"), finish),
        };
        let rbuf = if opts.workload == Workload::Verify {
            DmaBuf::alloc(opts.io_size as usize).ok()
        } else {
            None
        };
        tasks.push(Task {
            buf,
            rbuf,
            slot: 0,
            verifying: false,
        });
    }
    bdev::prefill_pool(opts.qd as usize * 2);
    // Latency as SPDK's bdevperf measures it: the bdev layer's histogram of the job's channel.
    if desc.bdev().histogram_cfg().is_none() {
        desc.bdev()
            .enable_histogram(Some(bdev::HistogramCfg::default()), || {});
    }
    let ch = desc.channel();
    let idle = if opts.idle_channels {
        bdev::list()
            .iter()
            .filter(|b| b.name() != bdev_name)
            .filter_map(|b| b.open(false, None).ok())
            .map(|d| {
                let c = d.channel();
                (d, c)
            })
            .collect()
    } else {
        Vec::new()
    };
    let now = ticks::now();
    let dur_us = opts.time_s * 1_000_000;
    let job = Job {
        _desc: desc,
        _idle: idle,
        ch,
        blocks_per_io,
        slot_base,
        slots,
        next_slot: 0,
        rng: 0x9E37_79B9_7F4A_7C15 ^ (core as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1),
        tasks,
        outstanding: 0,
        start: now,
        draining: false,
        write_count: 0,
        res: JobResult {
            name: bdev_name,
            core,
            ..Default::default()
        },
        alloc_mark: None,
        alloc_end: None,
        timers: Vec::new(),
        finish: Some(finish),
        opts,
    };
    let ji = JOBS.with(|j| {
        let mut j = j.borrow_mut();
        j.push(Some(job));
        j.len() - 1
    });
    // Allocations are counted only between 25% and 75% of the run: every job is in steady state then, and
    // start-up or another job's wrap-up does not leak into the figure.
    let mark = |f: fn(&mut Job, (u64, u64))| {
        move || {
            with_job(ji, |job| {
                let ios = job.res.completed + job.res.failed;
                f(job, (ALLOCS.load(Ordering::Relaxed), ios))
            })
        }
    };
    let timers = vec![
        reactor::timer(dur_us / 4, mark(|job, m| job.alloc_mark = Some(m))),
        reactor::timer(dur_us * 3 / 4, mark(|job, m| job.alloc_end = Some(m))),
        reactor::timer(dur_us, move || with_job(ji, |job| job.draining = true)),
    ];
    with_job(ji, |job| job.timers = timers);
    with_job(ji, |job| {
        for ti in 0..job.tasks.len() {
            job.issue(ji, ti);
        }
        job.maybe_finish(ji);
    });
}

/// Which bdevs and cores to test: every unclaimed bdev (or `-T`), one core each round-robin, or every core with -C.
/// Jobs as (bdev, core, (part, parts)): with -C a bdev's range is split into `parts` equal parts.
type Plan = Vec<(String, u32, (u64, u64))>;

fn plan(opts: &PerfOpts, mask: &CpuMask) -> Result<Plan, String> {
    let names: Vec<String> = match &opts.only {
        Some(n) => match bdev::get(n) {
            Some(b) => vec![b.name().to_string()],
            None => return Err(format!("Unable to find bdev '{n}'")),
        },
        None => bdev::list()
            .iter()
            .filter(|b| b.claimed_by().is_none())
            .map(|b| b.name().to_string())
            .collect(),
    };
    if names.is_empty() {
        return Err("no bdevs to test: give a config with -c/--json".into());
    }
    let cores: Vec<u32> = mask.cores().collect();
    let mut out = vec![];
    for (i, n) in names.into_iter().enumerate() {
        if opts.every_core {
            let parts = cores.len() as u64;
            out.extend(
                cores
                    .iter()
                    .enumerate()
                    .map(|(k, c)| (n.clone(), *c, (k as u64, parts))),
            );
        } else {
            out.push((n, cores[i % cores.len()], (0, 1)));
        }
    }
    Ok(out)
}

fn run_tests(
    opts: PerfOpts,
    mask: CpuMask,
    done: impl FnOnce(Result<Vec<JobResult>, String>) + 'static,
) {
    let jobs = match plan(&opts, &mask) {
        Ok(j) => j,
        Err(e) => return done(Err(e)),
    };
    println!("Running I/O for {} seconds...", opts.time_s);
    let n = jobs.len();
    let results = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let app = reactor::app_thread().expect("app thread");
    // Job threads report through a Send token; `done` itself stays on the app thread.
    let done_slot = DoneSlot::new(done);
    for (i, (name, core, part)) in jobs.into_iter().enumerate() {
        let t = reactor::spawn_thread(&format!("bdevperf_{i}"), Some(&CpuMask::single(core)))
            .expect("job thread");
        let results = results.clone();
        let app = app.clone();
        let o = opts.clone();
        let slot = done_slot.clone();
        let t2 = t.clone();
        t.send(move || {
            start_job(
                name,
                part,
                o,
                Box::new(move |r| {
                    let mut v = results.lock().unwrap_or_else(|e| e.into_inner());
                    v.push((i, r));
                    let all = v.len() == n;
                    drop(v);
                    t2.request_exit();
                    if all {
                        let results = results.clone();
                        app.send(move || {
                            let mut v = std::mem::take(
                                &mut *results.lock().unwrap_or_else(|e| e.into_inner()),
                            );
                            v.sort_by_key(|x| x.0);
                            slot.fire(Ok(v.into_iter().map(|x| x.1).collect()));
                        });
                    }
                }),
            )
        });
    }
}

type DoneFn = Box<dyn FnOnce(Result<Vec<JobResult>, String>)>;

/// Holds the app-thread-only completion closure behind a `Send` token (looked up on the app thread).
#[derive(Clone)]
struct DoneSlot(u64);

thread_local! {
    static DONE_SLOTS: RefCell<Vec<(u64, DoneFn)>> = const { RefCell::new(Vec::new()) };
}
static NEXT_SLOT: AtomicU64 = AtomicU64::new(1);

impl DoneSlot {
    fn new(f: impl FnOnce(Result<Vec<JobResult>, String>) + 'static) -> Self {
        let id = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
        DONE_SLOTS.with(|s| s.borrow_mut().push((id, Box::new(f))));
        DoneSlot(id)
    }
    fn fire(&self, r: Result<Vec<JobResult>, String>) {
        let f = DONE_SLOTS.with(|s| {
            let mut s = s.borrow_mut();
            let i = s.iter().position(|x| x.0 == self.0)?;
            Some(s.remove(i).1)
        });
        if let Some(f) = f {
            f(r)
        }
    }
}

fn us(ticks_v: u64) -> f64 {
    ticks::to_us(ticks_v)
}

/// Prints SPDK bdevperf's table; returns the `perform_tests` result object.
fn report(opts: &PerfOpts, results: &[JobResult]) -> Value {
    let mb = (1024 * 1024) as f64;
    println!("\n{:>107}", "Latency(us)");
    println!(
        "\r {:<28}: {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}",
        "Device Information",
        "runtime(s)",
        "IOPS",
        "MiB/s",
        "Fail/s",
        "TO/s",
        "Average",
        "min",
        "max"
    );
    let (mut t_iops, mut t_mbps, mut t_fail, mut t_lat, mut t_done) = (0.0, 0.0, 0.0, 0u64, 0u64);
    let (mut t_min, mut t_max) = (f64::MAX, 0.0f64);
    let mut json_jobs = vec![];
    let mut cores = CpuMask::new();
    for r in results {
        cores.set(r.core);
        let secs = (r.runtime_us.max(1)) as f64 / 1e6;
        let iops = r.completed as f64 / secs;
        let mbps = iops * opts.io_size as f64 / mb;
        let fails = r.failed as f64 / secs;
        let total = r.completed + r.failed;
        let avg = if total > 0 {
            us(r.lat_total) / total as f64
        } else {
            0.0
        };
        let (min, max) = (us(r.lat_min), us(r.lat_max));
        let mask = format!("0x{:x}", 1u128 << r.core);
        if opts.workload.mixed() {
            println!(
                "Job: {} (Core Mask {mask}, workload: {}, percentage: {}, depth: {}, IO size: {})",
                r.name,
                opts.workload.name(),
                opts.rwmix,
                opts.qd,
                opts.io_size
            );
        } else {
            println!(
                "Job: {} (Core Mask {mask}, workload: {}, depth: {}, IO size: {})",
                r.name,
                opts.workload.name(),
                opts.qd,
                opts.io_size
            );
        }
        if r.error.is_some() && !opts.continue_on_failure {
            println!(
                "Job: {} ended in about {:.2} seconds with error",
                r.name, secs
            );
        }
        if let Some((start, len)) = r.verify_range {
            println!("\t Verification LBA range: start 0x{start:x} length 0x{len:x}");
        }
        println!(
            "\t {:<20}: {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2}",
            r.name, secs, iops, mbps, fails, 0.0, avg, min, max
        );
        t_iops += iops;
        t_mbps += mbps;
        t_fail += fails;
        t_lat += r.lat_total;
        t_done += total;
        if r.completed > 0 {
            t_min = t_min.min(min);
            t_max = t_max.max(max);
        }
        let mut j = json!({
            "job": r.name, "core_mask": mask, "workload": opts.workload.name(),
        });
        if opts.workload.mixed() {
            j["percentage"] = json!(opts.rwmix);
        }
        j["status"] = json!(if r.error.is_some() && !opts.continue_on_failure {
            "failed"
        } else {
            "finished"
        });
        if let Some((start, len)) = r.verify_range {
            j["verify_range"] = json!({"start": start, "length": len});
        }
        for (k, v) in [
            ("queue_depth", json!(opts.qd)),
            ("io_size", json!(opts.io_size)),
            ("runtime", json!(secs)),
            ("iops", json!(iops)),
            ("mibps", json!(mbps)),
            ("io_failed", json!(r.failed)),
            // No I/O timeout is armed (SPDK's -k), so none can expire.
            ("io_timeout", json!(0)),
            ("avg_latency_us", json!(avg)),
            ("min_latency_us", json!(min)),
            ("max_latency_us", json!(max)),
        ] {
            j[k] = v;
        }
        json_jobs.push(j);
    }
    if t_min == f64::MAX {
        t_min = 0.0;
    }
    println!("\r {}", "=".repeat(115));
    let avg = if t_done > 0 {
        us(t_lat) / t_done as f64
    } else {
        0.0
    };
    println!(
        "\r {:<28}: {:>10} {:>10.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2}",
        "Total", "", t_iops, t_mbps, t_fail, 0.0, avg, t_min, t_max
    );
    if let Some(r) = results.iter().find(|r| r.terminated) {
        println!(
            "Received shutdown signal, test time was about {:.6} seconds",
            r.runtime_us as f64 / 1e6
        );
    }
    let (allocs, ios): (u64, u64) = results
        .iter()
        .fold((0, 0), |a, r| (a.0 + r.steady_allocs, a.1 + r.steady_ios));
    if ios > 0 {
        println!(
            "\n Steady-state heap allocations: {allocs} over {ios} I/Os ({:.6} per I/O)",
            allocs as f64 / ios as f64
        );
    }
    json!({"results": json_jobs, "core_count": cores.count()})
}

static FAILED: AtomicBool = AtomicBool::new(false);

fn finish_results(opts: &PerfOpts, res: Result<Vec<JobResult>, String>) -> Result<Value, String> {
    let results = res?;
    let v = report(opts, &results);
    if let Some(e) = results.iter().find_map(|r| r.error.clone()) {
        if !opts.continue_on_failure {
            return Err(e);
        }
    }
    Ok(v)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{USAGE}");
        return;
    }
    let (perf, app_opts) = match parse_args(args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("bdevperf: {e}");
            eprint!("{USAGE}");
            std::process::exit(1);
        }
    };
    let mut app_opts = app_opts;
    if !perf.wait_rpc {
        // Without -z nothing talks to us: no RPC socket, so a second instance never collides.
        app_opts.no_rpc_server = true;
    }
    let mask = app_opts.cpumask.clone();
    let (p1, p2, m2) = (perf.clone(), perf.clone(), mask.clone());
    let hooks = app::Hooks {
        register: Some(Box::new(move |reg: &mut Registry| {
            let busy = Rc::new(std::cell::Cell::new(false));
            reg.register(
                "perform_tests",
                STATE_RUNTIME,
                Rc::new(move |_params: Option<Value>, r: Responder| {
                    if busy.replace(true) {
                        return r.err(RpcError::errno(libc::EBUSY));
                    }
                    let (o, b) = (p1.clone(), busy.clone());
                    run_tests(p1.clone(), mask.clone(), move |res| {
                        b.set(false);
                        match finish_results(&o, res) {
                            Ok(v) => r.ok(v),
                            Err(e) => {
                                FAILED.store(true, Ordering::SeqCst);
                                r.err(RpcError::internal(e))
                            }
                        }
                    });
                }),
            );
        })),
        on_ready: Some(Box::new(move |t: Rc<app::Target>| {
            if p2.wait_rpc {
                return;
            }
            let opts = p2.clone();
            run_tests(p2, m2, move |res| match finish_results(&opts, res) {
                Ok(_) => t.shutdown(),
                Err(e) => t.fail(format!("bdevperf: {e}")),
            });
        })),
    };
    if let Err(e) = app::run_with(app_opts, app::bdev_subsystems(), hooks) {
        eprintln!("bdevperf: {e}");
        std::process::exit(1);
    }
    if FAILED.load(Ordering::SeqCst) {
        std::process::exit(1);
    }
}
