//! Test helpers: run reactors, drive the app thread from a plain test thread (each call blocks until the app
//! thread answered), block I/O helpers, and a verify workload that records what was acknowledged.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bdev::modules::{error, malloc};
use bdev::{Completion, Desc, IoChannel, IoHandle, IoStatus};
use reactor::dma::DmaBuf;
use reactor::ThreadHandle;
use serde_json::Value;

/// Runs reactors on `mask`, and `f` on a driver thread; stops the reactors when `f` returns (or panics, in which
/// case the panic is re-raised here).
pub fn with_reactors(mask: &str, f: impl FnOnce() + Send + 'static) {
    let failed: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let fl = failed.clone();
    reactor::testing::run(mask, Duration::from_secs(240), move || {
        raid::init();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            if let Err(e) = r {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                *fl.lock().unwrap() = Some(msg);
            }
            // Let pending completions settle before stopping.
            std::thread::sleep(Duration::from_millis(20));
            reactor::stop();
        });
    });
    let m = failed.lock().unwrap().take();
    if let Some(m) = m {
        panic!("{m}");
    }
}

/// Runs `f` on `t`; `f` answers through the sender (possibly later, from a callback).
pub fn on<R: Send + 'static>(t: &ThreadHandle, f: impl FnOnce(Sender<R>) + Send + 'static) -> R {
    let (tx, rx) = channel();
    t.send(move || f(tx));
    rx.recv_timeout(Duration::from_secs(60))
        .expect("reactor thread answered")
}

/// Runs `f` on the app thread; `f` answers through the sender.
pub fn app<R: Send + 'static>(f: impl FnOnce(Sender<R>) + Send + 'static) -> R {
    on(&reactor::app_thread().expect("reactors run"), f)
}

/// Runs `f` on the app thread and returns its value.
pub fn app_sync<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    app(move |tx| {
        let _ = tx.send(f());
    })
}

pub fn malloc(name: &str, blocks: u64, bs: u32) {
    let n = name.to_string();
    app_sync(move || {
        malloc::create(malloc::MallocOpts {
            name: Some(n),
            num_blocks: blocks,
            block_size: bs,
            ..Default::default()
        })
        .map(|_| ())
    })
    .expect("malloc created");
}

pub fn malloc_uuid(name: &str, blocks: u64, bs: u32, uuid: uuid::Uuid) {
    let n = name.to_string();
    app_sync(move || {
        malloc::create(malloc::MallocOpts {
            name: Some(n),
            num_blocks: blocks,
            block_size: bs,
            uuid: Some(uuid),
            ..Default::default()
        })
        .map(|_| ())
    })
    .expect("malloc created");
}

/// Unregisters any bdev by name and waits for it to be gone.
pub fn unregister(name: &str) {
    let n = name.to_string();
    let r: Result<(), String> = app(move |tx| match bdev::get(&n) {
        Some(b) => b.unregister(move |r| {
            let _ = tx.send(r.map_err(|e| e.to_string()));
        }),
        None => {
            let _ = tx.send(Err(format!("no bdev {n}")));
        }
    });
    r.expect("unregistered");
}

pub fn error_bdev(base: &str) -> String {
    let b = base.to_string();
    app_sync(move || error::create(&b, None).map(|b| b.name().to_string())).expect("error bdev")
}

pub fn inject(name: &str, io_type: &str, num: u32) {
    let (n, t) = (name.to_string(), io_type.to_string());
    app_sync(move || {
        let mut o = error::InjectOpts::new(&t, error::ErrorType::Failure);
        o.num = num;
        error::inject_error(&n, o)
    })
    .expect("injected");
}

pub fn raid_create(
    name: &str,
    level: raid::Level,
    bases: &[&str],
    strip_kb: u32,
    sb: bool,
) -> raid::Result<()> {
    let opts = raid::CreateOpts {
        name: name.to_string(),
        strip_size_kb: strip_kb,
        level,
        base_bdevs: bases.iter().map(|s| s.to_string()).collect(),
        uuid: None,
        superblock: sb,
    };
    app(move |tx| {
        raid::create(opts, move |r| {
            let _ = tx.send(r);
        })
    })
}

pub fn raid_delete(name: &str, clear_sb: bool) -> raid::Result<()> {
    let n = name.to_string();
    app(move |tx| {
        let t2 = tx.clone();
        if let Err(e) = raid::delete(&n, clear_sb, move |r| {
            let _ = t2.send(r);
        }) {
            let _ = tx.send(Err(e));
        }
    })
}

pub fn add_base(raid_name: &str, base: &str) -> raid::Result<()> {
    let (r, b) = (raid_name.to_string(), base.to_string());
    app(move |tx| {
        let t2 = tx.clone();
        if let Err(e) = raid::add_base_bdev(&r, &b, move |r| {
            let _ = t2.send(r);
        }) {
            let _ = tx.send(Err(e));
        }
    })
}

pub fn remove_base(base: &str) -> raid::Result<()> {
    let b = base.to_string();
    app(move |tx| {
        let t2 = tx.clone();
        if let Err(e) = raid::remove_base_bdev(&b, move |r| {
            let _ = t2.send(r);
        }) {
            let _ = tx.send(Err(e));
        }
    })
}

/// `bdev_raid_get_bdevs` entry of `name` (None when not listed).
pub fn info(name: &str) -> Option<Value> {
    let n = name.to_string();
    app_sync(move || raid::info(&n))
}

pub fn state(name: &str) -> String {
    info(name)
        .map(|v| v["state"].as_str().unwrap().to_string())
        .unwrap_or_else(|| "absent".into())
}

/// Polls until `cond` holds (or panics after `secs`).
pub fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn bdev_exists(name: &str) -> bool {
    let n = name.to_string();
    app_sync(move || bdev::get(&n).is_some_and(|b| !b.is_removing()))
}

// ---------------------------------------------------------------------------------------------------------------
// Block I/O from the app thread.

/// Writes `data` at `lba` of `name` through a fresh descriptor.
pub fn write(name: &str, lba: u64, data: Vec<u8>) -> IoStatus {
    let n = name.to_string();
    app(move |tx| {
        let d = match bdev::open(&n, true, None) {
            Ok(d) => d,
            Err(_) => {
                let _ = tx.send(IoStatus::Failed(libc::ENODEV));
                return;
            }
        };
        let bs = d.bdev().block_size() as usize;
        let mut buf = DmaBuf::alloc(data.len()).unwrap();
        buf.as_mut_slice().copy_from_slice(&data);
        let ch = d.channel();
        let d = Arc::new(d);
        let res = ch.write(
            buf,
            lba,
            (data.len() / bs) as u64,
            Completion::Closure(Box::new(move |io: IoHandle| {
                drop(d);
                let _ = tx.send(io.status());
            })),
            0,
        );
        res.expect("submitted");
    })
}

/// Reads `blocks` at `lba` of `name` through a fresh read-only descriptor.
pub fn read(name: &str, lba: u64, blocks: u64) -> Result<Vec<u8>, IoStatus> {
    let n = name.to_string();
    app(move |tx| {
        let d = match bdev::open(&n, false, None) {
            Ok(d) => d,
            Err(_) => {
                let _ = tx.send(Err(IoStatus::Failed(libc::ENODEV)));
                return;
            }
        };
        let bs = d.bdev().block_size() as u64;
        let buf = DmaBuf::alloc((blocks * bs) as usize).unwrap();
        let ch = d.channel();
        let d = Arc::new(d);
        ch.read(
            buf,
            lba,
            blocks,
            Completion::Closure(Box::new(move |mut io: IoHandle| {
                drop(d);
                let r = if io.success() {
                    Ok(io.take_buf().unwrap().as_slice().to_vec())
                } else {
                    Err(io.status())
                };
                let _ = tx.send(r);
            })),
            0,
        )
        .expect("submitted");
    })
}

/// Block content for (lba, version): self-describing so a mismatch says what is there.
pub fn pattern(bs: usize, lba: u64, version: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&lba.to_le_bytes());
    out[8..16].copy_from_slice(&version.to_le_bytes());
    let fill = (lba.wrapping_mul(31) ^ version.wrapping_mul(131)) as u8;
    for (i, b) in out[16..bs].iter_mut().enumerate() {
        *b = fill.wrapping_add(i as u8);
    }
}

pub fn pattern_vec(bs: usize, lba: u64, blocks: u64, version: u64) -> Vec<u8> {
    let mut v = vec![0u8; bs * blocks as usize];
    for i in 0..blocks {
        let o = i as usize * bs;
        pattern(bs, lba + i, version, &mut v[o..o + bs]);
    }
    v
}

/// (lba, version) a block says it holds.
pub fn decode(block: &[u8]) -> (u64, u64) {
    (
        u64::from_le_bytes(block[..8].try_into().unwrap()),
        u64::from_le_bytes(block[8..16].try_into().unwrap()),
    )
}

// ---------------------------------------------------------------------------------------------------------------
// Verify workload.

/// What the workload saw.
#[derive(Clone, Debug, Default)]
pub struct LoadStats {
    pub writes_ok: u64,
    pub writes_failed: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
    pub mismatches: Vec<String>,
}

/// Shared between the workload (on its reactor thread) and the test.
pub struct LoadShared {
    pub stop: AtomicBool,
    pub stopped: AtomicBool,
    pub stats: Mutex<LoadStats>,
    /// Acknowledged version per block (0 = never written by the workload); `u64::MAX` = unknown (a write failed).
    pub shadow: Mutex<Vec<u64>>,
}

/// A random read/write workload over `[0, blocks)` in `io_blocks` regions, at most one I/O per region at a
/// time so the acknowledged content of every block is known; reads are checked against it.
pub struct Load {
    pub shared: Arc<LoadShared>,
    pub thread: ThreadHandle,
}

struct LoadState {
    ch: IoChannel,
    _desc: Desc,
    bs: usize,
    io_blocks: u64,
    first: u64,
    regions: u64,
    busy: Vec<bool>,
    versions: u64,
    rng: u64,
    inflight: usize,
    qd: usize,
    shared: Arc<LoadShared>,
    bufs: Vec<DmaBuf>,
}

fn next_rand(s: &mut u64) -> u64 {
    // xorshift64*
    let mut x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

impl Load {
    /// Starts the workload on `thread` against `bdev_name`.
    pub fn start(
        thread: &ThreadHandle,
        bdev_name: &str,
        io_blocks: u64,
        qd: usize,
        seed: u64,
    ) -> Load {
        Self::start_range(thread, bdev_name, None, io_blocks, qd, seed)
    }

    /// Starts the workload on `thread` against blocks `[first, first + len)` of `bdev_name` (all when `None`).
    pub fn start_range(
        thread: &ThreadHandle,
        bdev_name: &str,
        range: Option<(u64, u64)>,
        io_blocks: u64,
        qd: usize,
        seed: u64,
    ) -> Load {
        let shared = Arc::new(LoadShared {
            stop: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            stats: Mutex::new(LoadStats::default()),
            shadow: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let n = bdev_name.to_string();
        on(thread, move |tx: Sender<()>| {
            let desc = bdev::open(&n, true, None).expect("open raid");
            let bs = desc.bdev().block_size() as usize;
            let total = desc.bdev().num_blocks();
            let (first, blocks) = range.unwrap_or((0, total));
            let regions = blocks / io_blocks;
            *sh.shadow.lock().unwrap() = vec![0; total as usize];
            let ch = desc.channel();
            let st = Rc::new(RefCell::new(LoadState {
                ch,
                _desc: desc,
                bs,
                io_blocks,
                first,
                regions,
                busy: vec![false; regions as usize],
                versions: 0,
                rng: seed | 1,
                inflight: 0,
                qd,
                shared: sh,
                bufs: (0..qd)
                    .map(|_| DmaBuf::alloc(bs * io_blocks as usize).unwrap())
                    .collect(),
            }));
            for _ in 0..qd {
                submit_one(&st);
            }
            let _ = tx.send(());
        });
        Load {
            shared,
            thread: thread.clone(),
        }
    }

    /// Stops submitting, waits for in-flight I/O, returns the statistics.
    pub fn stop(&self) -> LoadStats {
        self.shared.stop.store(true, Ordering::SeqCst);
        wait_for("workload drained", 60, || {
            self.shared.stopped.load(Ordering::SeqCst)
        });
        self.shared.stats.lock().unwrap().clone()
    }

    pub fn stats(&self) -> LoadStats {
        self.shared.stats.lock().unwrap().clone()
    }

    /// Waits until at least `n` more writes completed.
    pub fn wait_writes(&self, n: u64) {
        let start = self.stats().writes_ok + self.stats().writes_failed;
        wait_for("workload progress", 60, || {
            let s = self.stats();
            s.writes_ok + s.writes_failed >= start + n
        });
    }
}

fn submit_one(st: &Rc<RefCell<LoadState>>) {
    let mut s = st.borrow_mut();
    if s.shared.stop.load(Ordering::Relaxed) {
        if s.inflight == 0 {
            s.shared.stopped.store(true, Ordering::SeqCst);
        }
        return;
    }
    let Some(mut buf) = s.bufs.pop() else { return };
    // Pick a free region.
    let mut region = None;
    for _ in 0..16 {
        let r = next_rand(&mut s.rng) % s.regions;
        if !s.busy[r as usize] {
            region = Some(r);
            break;
        }
    }
    let Some(region) = region else {
        s.bufs.push(buf);
        drop(s);
        let st2 = st.clone();
        reactor::timer(10, move || submit_one(&st2)).detach();
        return;
    };
    s.busy[region as usize] = true;
    s.inflight += 1;
    let is_write = next_rand(&mut s.rng).is_multiple_of(2);
    let lba = s.first + region * s.io_blocks;
    let n = s.io_blocks;
    let bs = s.bs;
    let st2 = st.clone();
    if is_write {
        s.versions += 1;
        let v = s.versions;
        for i in 0..n {
            let o = i as usize * bs;
            pattern(bs, lba + i, v, &mut buf.as_mut_slice()[o..o + bs]);
        }
        let res = s.ch.write(
            buf,
            lba,
            n,
            Completion::Closure(Box::new(move |mut io: IoHandle| {
                let ok = io.success();
                let buf = io.take_buf().unwrap();
                drop(io);
                done_one(&st2, region, buf, |sh| {
                    let mut shadow = sh.shadow.lock().unwrap();
                    for i in 0..n {
                        shadow[(lba + i) as usize] = if ok { v } else { u64::MAX };
                    }
                    let mut stats = sh.stats.lock().unwrap();
                    if ok {
                        stats.writes_ok += 1;
                    } else {
                        stats.writes_failed += 1;
                    }
                });
            })),
            0,
        );
        if res.is_err() {
            drop(s);
            out_of_descriptors(st, region, bs, n);
        }
    } else {
        let expect: Vec<u64> = {
            let shadow = s.shared.shadow.lock().unwrap();
            (0..n).map(|i| shadow[(lba + i) as usize]).collect()
        };
        let res = s.ch.read(
            buf,
            lba,
            n,
            Completion::Closure(Box::new(move |mut io: IoHandle| {
                let ok = io.success();
                let buf = io.take_buf().unwrap();
                drop(io);
                let mut bad = Vec::new();
                if ok {
                    for i in 0..n {
                        let want = expect[i as usize];
                        if want == 0 || want == u64::MAX {
                            continue;
                        }
                        let o = i as usize * bs;
                        let got = decode(&buf.as_slice()[o..o + bs]);
                        let mut exp = vec![0u8; bs];
                        pattern(bs, lba + i, want, &mut exp);
                        if buf.as_slice()[o..o + bs] != exp[..] {
                            bad.push(format!(
                                "read of block {} gave (lba {}, version {}), expected version {want}",
                                lba + i,
                                got.0,
                                got.1
                            ));
                        }
                    }
                }
                done_one(&st2, region, buf, |sh| {
                    let mut stats = sh.stats.lock().unwrap();
                    if ok {
                        stats.reads_ok += 1;
                    } else {
                        stats.reads_failed += 1;
                    }
                    stats.mismatches.extend(bad);
                });
            })),
            0,
        );
        if res.is_err() {
            drop(s);
            out_of_descriptors(st, region, bs, n);
        }
    }
}

/// Submission found this thread's descriptor pool empty: undo and try again once one is returned.
fn out_of_descriptors(st: &Rc<RefCell<LoadState>>, region: u64, bs: usize, n: u64) {
    {
        let mut s = st.borrow_mut();
        s.busy[region as usize] = false;
        s.inflight -= 1;
        // The buffer went with the refused request.
        s.bufs.push(DmaBuf::alloc(bs * n as usize).unwrap());
    }
    let st2 = st.clone();
    bdev::queue_io_wait(move || submit_one(&st2));
}

fn done_one(st: &Rc<RefCell<LoadState>>, region: u64, buf: DmaBuf, f: impl FnOnce(&LoadShared)) {
    {
        let mut s = st.borrow_mut();
        s.busy[region as usize] = false;
        s.inflight -= 1;
        s.bufs.push(buf);
        f(&s.shared);
    }
    submit_one(st);
}

/// Checks every block the workload acknowledged, reading `name` at `base_offset + lba`. Returns mismatches.
pub fn verify_against(shared: &LoadShared, name: &str, base_offset: u64, bs: usize) -> Vec<String> {
    let shadow = shared.shadow.lock().unwrap().clone();
    let mut bad = Vec::new();
    let chunk = 256u64;
    let total = shadow.len() as u64;
    let mut lba = 0;
    while lba < total {
        let n = chunk.min(total - lba);
        let data = read(name, base_offset + lba, n)
            .unwrap_or_else(|s| panic!("read {name} failed: {s:?}"));
        for i in 0..n {
            let want = shadow[(lba + i) as usize];
            if want == 0 || want == u64::MAX {
                continue;
            }
            let o = i as usize * bs;
            let mut exp = vec![0u8; bs];
            pattern(bs, lba + i, want, &mut exp);
            if data[o..o + bs] != exp[..] {
                let got = decode(&data[o..o + bs]);
                bad.push(format!(
                    "{name}: block {} holds (lba {}, version {}), acknowledged version {want}",
                    lba + i,
                    got.0,
                    got.1
                ));
                if bad.len() > 10 {
                    return bad;
                }
            }
        }
        lba += n;
    }
    bad
}

/// A second reactor thread for I/O (so channel walks cross threads).
pub fn io_thread(name: &str) -> ThreadHandle {
    reactor::spawn_thread(name, None).expect("spawn thread")
}

/// Names of the configured members of a raid and their data offsets.
pub fn members(raid_name: &str) -> Vec<(String, u64)> {
    let v = info(raid_name).expect("raid listed");
    v["base_bdevs_list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["is_configured"].as_bool().unwrap())
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["data_offset"].as_u64().unwrap(),
            )
        })
        .collect()
}

pub type Json = HashMap<String, Value>;

pub fn error_bdev_uuid(base: &str, uuid: uuid::Uuid) -> String {
    let b = base.to_string();
    app_sync(move || error::create(&b, Some(uuid)).map(|b| b.name().to_string()))
        .expect("error bdev")
}

pub fn uuid_of(name: &str) -> uuid::Uuid {
    let n = name.to_string();
    app_sync(move || bdev::get(&n).expect("bdev").uuid())
}

pub fn claimed(name: &str) -> bool {
    let n = name.to_string();
    app_sync(move || bdev::get(&n).expect("bdev").claimed_by().is_some())
}

pub fn set_raid_options(window_kb: u32, mb_sec: u32) {
    app_sync(move || {
        raid::set_options(
            raid::RaidOptions {
                process_window_size_kb: window_kb,
                process_max_bandwidth_mb_sec: mb_sec,
            },
            true,
        )
    })
    .unwrap();
}

/// The superblock at block 0 of `name`.
pub fn superblock_of(name: &str) -> Option<raid::sb::Superblock> {
    let data = read(name, 0, 33).ok()?;
    raid::sb::Superblock::decode(&data).ok()
}
