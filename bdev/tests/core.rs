//! Bdev layer behaviour on real reactors: I/O paths, validation, claims, hot-remove with I/O in flight,
//! NOMEM queueing and retry, descriptor pool exhaustion, examine and statistics.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev::modules::{malloc, null};
use bdev::{
    Bdev, BdevEvent, BdevOps, BdevParams, Completion, ErrorKind, IoHandle, IoStatus, IoType,
    ModuleChannel,
};
use reactor::dma::DmaBuf;

fn run(init: impl FnOnce() + Send + 'static) {
    reactor::testing::run("0x1", Duration::from_secs(60), init);
}

fn malloc(name: &str, blocks: u64) -> Bdev {
    malloc::create(malloc::MallocOpts {
        name: Some(name.into()),
        num_blocks: blocks,
        block_size: 512,
        ..Default::default()
    })
    .unwrap()
}

fn unregister_and(b: Bdev, then: impl FnOnce() + Send + 'static) {
    b.unregister(move |r| {
        r.unwrap();
        then()
    });
}

#[test]
fn malloc_write_read_roundtrip_and_iostat() {
    let out = Arc::new(Mutex::new(None));
    let o = out.clone();
    run(move || {
        let b = malloc("M_rt", 1024);
        let desc = b.open(true, None).unwrap();
        let ch = desc.channel();
        let mut buf = DmaBuf::alloc(4096).unwrap();
        for (i, x) in buf.as_mut_slice().iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        let ch2 = ch.clone();
        ch.write(
            buf,
            8,
            8,
            Completion::Closure(Box::new(move |io: IoHandle| {
                assert_eq!(io.status(), IoStatus::Success);
                let rb = DmaBuf::alloc(4096).unwrap();
                ch2.read(
                    rb,
                    8,
                    8,
                    Completion::Closure(Box::new(move |mut io: IoHandle| {
                        assert!(io.success());
                        let rb = io.take_buf().unwrap();
                        let ok = rb
                            .as_slice()
                            .iter()
                            .enumerate()
                            .all(|(i, x)| *x == (i % 251) as u8);
                        let b2 = b.clone();
                        b.get_iostat(move |s| {
                            *o.lock().unwrap() = Some((ok, s));
                            drop(desc);
                            unregister_and(b2, reactor::stop);
                        });
                    })),
                    0,
                )
                .unwrap();
            })),
            0,
        )
        .unwrap();
    });
    let (ok, s) = out.lock().unwrap().take().unwrap();
    assert!(ok, "read back what was written");
    assert_eq!((s.write.ops, s.write.bytes), (1, 4096));
    assert_eq!((s.read.ops, s.read.bytes), (1, 4096));
    assert!(s.read.latency_ticks > 0 && s.read.min_latency_ticks <= s.read.max_latency_ticks);
}

type Log = Arc<Mutex<Vec<(&'static str, IoStatus)>>>;

fn rec(tag: &'static str, o: &Log) -> Completion {
    let o = o.clone();
    Completion::Closure(Box::new(move |io: IoHandle| {
        o.lock().unwrap().push((tag, io.status()))
    }))
}

#[test]
fn invalid_io_fails_with_clear_errno_never_panics() {
    let out: Log = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    run(move || {
        let b = malloc("M_bad", 64);
        let rw = b.open(true, None).unwrap();
        let ro = b.open(false, None).unwrap();
        let (ch, rch) = (rw.channel(), ro.channel());
        let buf = || DmaBuf::alloc(4096).unwrap();
        ch.read(buf(), 60, 8, rec("past_end", &o), 0).unwrap();
        ch.read(buf(), u64::MAX - 2, 8, rec("overflow", &o), 0)
            .unwrap();
        ch.read(DmaBuf::alloc(512).unwrap(), 0, 8, rec("short_buf", &o), 0)
            .unwrap();
        ch.read(buf(), 0, 0, rec("zero_len", &o), 0).unwrap();
        rch.write(buf(), 0, 8, rec("readonly", &o), 0).unwrap();
        // SAFETY: no buffers.
        unsafe { ch.nvme_io_passthru(&bdev::NvmeCmd::default(), &[], rec("unsupported", &o), 0) }
            .unwrap();
        ch.abort(77, rec("abort_nothing", &o), 0).unwrap();
        ch.submit_nodata(IoType::Unmap, 0, 64, rec("unmap_ok", &o), 0)
            .unwrap();
        assert!(ch
            .submit_nodata(IoType::Read, 0, 1, rec("x", &o), 0)
            .is_err());
        reactor::timer(20_000, move || {
            drop((ch, rch, rw, ro));
            unregister_and(b, reactor::stop);
        })
        .detach();
    });
    let got = out.lock().unwrap().clone();
    let e = IoStatus::Failed;
    assert_eq!(
        got,
        vec![
            ("past_end", e(libc::EINVAL)),
            ("overflow", e(libc::EINVAL)),
            ("short_buf", e(libc::EINVAL)),
            ("zero_len", e(libc::EINVAL)),
            ("readonly", e(libc::EBADF)),
            ("unsupported", e(libc::ENOTSUP)),
            ("abort_nothing", e(libc::ENOENT)),
            ("unmap_ok", IoStatus::Success),
        ]
    );
}

#[test]
fn registry_names_claims_and_examine() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    run(move || {
        bdev::register_examiner(
            "test_examiner",
            Arc::new(move |b: &Bdev| s.lock().unwrap().push(b.name().to_string())),
        );
        let b = malloc("M_claim", 64);
        let dup = malloc::create(malloc::MallocOpts {
            name: Some("M_claim".into()),
            num_blocks: 8,
            block_size: 512,
            ..Default::default()
        });
        assert_eq!(dup.unwrap_err().kind, ErrorKind::Exists);
        assert!(bdev::get(&b.uuid().to_string()).is_some(), "lookup by uuid");
        b.add_alias("alias_of_claim").unwrap();
        assert!(bdev::get("alias_of_claim").unwrap().ptr_eq(&b));
        let reader = b.open(false, None).unwrap();
        let mut owner = b.open(false, None).unwrap();
        owner.claim("raid").unwrap();
        assert!(owner.writable());
        assert_eq!(b.claimed_by().as_deref(), Some("raid"));
        assert_eq!(b.open(true, None).unwrap_err().kind, ErrorKind::Claimed);
        let mut other = b.open(false, None).unwrap();
        assert_eq!(other.claim("lvol").unwrap_err().kind, ErrorKind::Claimed);
        let info = b.info_json();
        assert_eq!(info["claimed"], true);
        assert_eq!(info["claim_type"], "exclusive_write");
        // The UUID first, as SPDK lists it, then the alias added.
        assert_eq!(info["aliases"][0], b.uuid().to_string());
        assert_eq!(info["aliases"][1], "alias_of_claim");
        drop(owner);
        assert_eq!(
            b.claimed_by(),
            None,
            "closing the claimer releases the claim"
        );
        let w = b.open(true, None).unwrap();
        assert_eq!(
            other.claim("lvol").unwrap_err().kind,
            ErrorKind::Claimed,
            "another writer is open"
        );
        drop((w, other, reader));
        let n = null::create(null::NullOpts {
            name: "N_exam".into(),
            num_blocks: 100,
            block_size: 4096,
            ..Default::default()
        })
        .unwrap();
        unregister_and(b, move || {
            assert!(
                bdev::get("alias_of_claim").is_none(),
                "aliases go with the bdev"
            );
            unregister_and(n, reactor::stop)
        });
    });
    let seen = seen.lock().unwrap();
    assert!(
        seen.contains(&"M_claim".to_string()) && seen.contains(&"N_exam".to_string()),
        "{seen:?}"
    );
}

/// A module whose I/Os complete only when its poller has run `delay` times, and which answers NOMEM when more
/// than `limit` are in flight.
struct Slow {
    delay: u32,
    limit: usize,
    destructed: Arc<AtomicBool>,
    nomem_seen: Arc<AtomicUsize>,
}

struct SlowCh {
    delay: u32,
    limit: usize,
    q: VecDeque<(u32, IoHandle)>,
    nomem_seen: Arc<AtomicUsize>,
}

impl BdevOps for Slow {
    fn module_name(&self) -> &'static str {
        "slow"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        // A reset queues behind what the channel holds, so it completes once that has drained.
        matches!(t, IoType::Read | IoType::Write | IoType::Reset)
    }
    fn create_channel(&self, _b: &Bdev) -> Box<dyn ModuleChannel> {
        Box::new(SlowCh {
            delay: self.delay,
            limit: self.limit,
            q: VecDeque::new(),
            nomem_seen: self.nomem_seen.clone(),
        })
    }
    fn destruct(&self, _b: &Bdev) {
        self.destructed.store(true, Ordering::SeqCst);
    }
}

impl ModuleChannel for SlowCh {
    fn submit(&mut self, io: IoHandle) {
        if self.q.len() >= self.limit {
            self.nomem_seen.fetch_add(1, Ordering::SeqCst);
            io.complete(IoStatus::NoMem);
            return;
        }
        self.q.push_back((self.delay, io));
    }
    fn poll(&mut self) -> bool {
        let mut did = false;
        for e in self.q.iter_mut() {
            e.0 = e.0.saturating_sub(1);
        }
        while self.q.front().is_some_and(|e| e.0 == 0) {
            let (_, io) = self.q.pop_front().unwrap();
            io.complete(IoStatus::Success);
            did = true;
        }
        did
    }
}

fn slow(name: &str, delay: u32, limit: usize) -> (Bdev, Arc<AtomicBool>, Arc<AtomicUsize>) {
    let destructed = Arc::new(AtomicBool::new(false));
    let nomem = Arc::new(AtomicUsize::new(0));
    let b = bdev::register(
        BdevParams::new(name, 512, 1 << 20),
        Box::new(Slow {
            delay,
            limit,
            destructed: destructed.clone(),
            nomem_seen: nomem.clone(),
        }),
    )
    .unwrap();
    (b, destructed, nomem)
}

thread_local! {
    static DONE: RefCell<Vec<IoStatus>> = const { RefCell::new(Vec::new()) };
}

fn record(io: IoHandle) {
    DONE.with(|d| d.borrow_mut().push(io.status()));
}

type Keep = Rc<RefCell<Option<(bdev::Desc, bdev::IoChannel)>>>;

/// Calls `f` on this thread once the channel in `h` has nothing in flight, then closes it.
fn when_drained(h: Keep, f: Box<dyn FnOnce()>) {
    let busy = h.borrow().as_ref().is_some_and(|x| x.1.outstanding() > 0);
    if busy {
        reactor::timer(500, move || when_drained(h, f)).detach();
    } else {
        h.borrow_mut().take();
        f();
    }
}

#[test]
fn nomem_is_queued_and_retried_without_loss() {
    let out = Arc::new(Mutex::new((0usize, 0usize, 0usize)));
    let o = out.clone();
    run(move || {
        DONE.with(|d| d.borrow_mut().clear());
        let (b, _, nomem) = slow("S_nomem", 3, 4);
        let desc = b.open(true, None).unwrap();
        let ch = desc.channel();
        for i in 0..64u64 {
            ch.write(DmaBuf::alloc(512).unwrap(), i, 1, Completion::Fn(record), i)
                .unwrap();
        }
        fn wait(o: Arc<Mutex<(usize, usize, usize)>>, nomem: Arc<AtomicUsize>, keep: Keep) {
            let n = DONE.with(|d| d.borrow().len());
            if n < 64 {
                reactor::timer(1000, move || wait(o, nomem, keep)).detach();
                return;
            }
            let ok = DONE.with(|d| {
                d.borrow()
                    .iter()
                    .filter(|s| **s == IoStatus::Success)
                    .count()
            });
            *o.lock().unwrap() = (n, ok, nomem.load(Ordering::SeqCst));
            let b = keep.borrow().as_ref().unwrap().0.bdev().clone();
            keep.borrow_mut().take();
            unregister_and(b, reactor::stop);
        }
        wait(o, nomem, Rc::new(RefCell::new(Some((desc, ch)))));
    });
    let (n, ok, nomem) = *out.lock().unwrap();
    assert_eq!((n, ok), (64, 64), "every I/O completed successfully");
    assert!(nomem > 0, "the module did run out of resources");
}

type HotOut = (bool, Vec<IoStatus>, Vec<BdevEvent>, bool, bool);

#[test]
fn hot_remove_with_io_in_flight_completes_io_then_destroys() {
    let out: Arc<Mutex<Option<HotOut>>> = Arc::new(Mutex::new(None));
    let o = out.clone();
    run(move || {
        DONE.with(|d| d.borrow_mut().clear());
        let (b, destructed, _) = slow("S_hot", 50, 1024);
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let desc = b
            .open(
                true,
                Some(Arc::new(move |e: BdevEvent, _b: &Bdev| {
                    ev.lock().unwrap().push(e)
                })),
            )
            .unwrap();
        let ch = desc.channel();
        for i in 0..32u64 {
            ch.read(DmaBuf::alloc(512).unwrap(), i, 1, Completion::Fn(record), i)
                .unwrap();
        }
        let holder: Keep = Rc::new(RefCell::new(Some((desc, ch))));
        let unregistered = Arc::new(AtomicBool::new(false));
        let u = unregistered.clone();
        b.unregister(move |r| {
            r.unwrap();
            u.store(true, Ordering::SeqCst);
        });
        assert!(
            bdev::open("S_hot", false, None).is_err(),
            "no new opens while removing"
        );
        let destroyed_early = destructed.load(Ordering::SeqCst);
        // The owner reacts to Remove by closing once its I/O drained (as vhost and raid do).
        when_drained(
            holder,
            Box::new(move || {
                reactor::timer(5_000, move || {
                    let done = DONE.with(|d| d.borrow().clone());
                    *o.lock().unwrap() = Some((
                        destroyed_early,
                        done,
                        events.lock().unwrap().clone(),
                        destructed.load(Ordering::SeqCst),
                        unregistered.load(Ordering::SeqCst),
                    ));
                    reactor::stop();
                })
                .detach();
            }),
        );
    });
    let (early, done, events, destructed, unregistered) = out.lock().unwrap().take().unwrap();
    assert!(!early, "not destroyed while a descriptor was open");
    assert_eq!(done.len(), 32, "in-flight I/O completed");
    assert!(done.iter().all(|s| *s == IoStatus::Success));
    assert_eq!(events, vec![BdevEvent::Remove]);
    assert!(destructed && unregistered, "destroyed after the last close");
    assert!(bdev::get("S_hot").is_none());
}

#[test]
fn descriptor_pool_exhaustion_waits_instead_of_failing() {
    let out = Arc::new(Mutex::new((0, false)));
    let o = out.clone();
    run(move || {
        let b = malloc("M_pool", 64);
        let desc = b.open(true, None).unwrap();
        let ch = desc.channel();
        // Take every descriptor this thread may own.
        let mut held = vec![];
        while let Some(io) = bdev::alloc_io() {
            held.push(io);
        }
        assert_eq!(held.len(), bdev::pool_limit());
        let failed = ch
            .read(DmaBuf::alloc(512).unwrap(), 0, 1, Completion::None, 0)
            .is_err();
        let o2 = o.clone();
        let ch2 = ch.clone();
        let keep = Rc::new(RefCell::new(Some((desc, ch))));
        bdev::queue_io_wait(move || {
            ch2.read(
                DmaBuf::alloc(512).unwrap(),
                0,
                1,
                Completion::Closure(Box::new(move |io: IoHandle| {
                    o2.lock().unwrap().0 = if io.success() { 1 } else { 2 };
                    keep.borrow_mut().take();
                    unregister_and(b, reactor::stop);
                })),
                0,
            )
            .unwrap();
        });
        o.lock().unwrap().1 = failed;
        drop(held);
    });
    let (state, failed) = *out.lock().unwrap();
    assert!(failed, "submitting with no descriptor left reports ENOMEM");
    assert_eq!(state, 1, "the waiter ran and its I/O succeeded");
}

#[test]
fn bdev_info_json_has_spdk_fields() {
    let out = Arc::new(Mutex::new(None));
    let o = out.clone();
    run(move || {
        let b = null::create(null::NullOpts {
            name: "N_info".into(),
            num_blocks: 2048,
            block_size: 4096,
            ..Default::default()
        })
        .unwrap();
        *o.lock().unwrap() = Some((b.info_json(), b.write_config()));
        unregister_and(b, reactor::stop);
    });
    let (info, cfg) = out.lock().unwrap().take().unwrap();
    let keys: Vec<&str> = info
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    for k in [
        "name",
        "aliases",
        "product_name",
        "block_size",
        "num_blocks",
        "uuid",
        "assigned_rate_limits",
        "claimed",
        "zoned",
        "supported_io_types",
        "driver_specific",
    ] {
        assert!(keys.contains(&k), "missing {k}");
    }
    assert_eq!(info["product_name"], "Null disk");
    assert_eq!(info["supported_io_types"]["read"], true);
    assert_eq!(info["supported_io_types"]["unmap"], false);
    assert_eq!(info["supported_io_types"].as_object().unwrap().len(), 20);
    assert_eq!(cfg.unwrap()["method"], "bdev_null_create");
}

#[test]
fn metadata_fields_show_as_spdk_prints_them() {
    let out = Arc::new(Mutex::new(None));
    let o = out.clone();
    run(move || {
        let mk = |name: &str, md: u32, dif: u32| {
            let mut p = BdevParams::new(name, 512, 64);
            p.md_size = md;
            p.dif_type = dif;
            p.dif_check.guard = dif != 0;
            p.acwu = 1;
            bdev::register(p, Box::new(Ops)).map(|b| b.info_json())
        };
        let r = (
            mk("md_none", 0, 0),
            mk("md_plain", 8, 0),
            mk("md_dif", 16, 1),
            mk("md_bad", 4, 1).map_err(|e| e.errno()),
            mk("md_bad2", 8, 4).map_err(|e| e.errno()),
        );
        *o.lock().unwrap() = Some(r);
        for n in ["md_none", "md_plain", "md_dif"] {
            bdev::get(n).unwrap().unregister(|_| {});
        }
        reactor::timer(1000, reactor::stop).detach();
    });
    let (none, plain, dif, bad, bad2) = out.lock().unwrap().take().unwrap();
    let none = none.unwrap();
    assert!(none.get("md_size").is_none() && none.get("dif_type").is_none());
    let plain = plain.unwrap();
    assert_eq!(
        (
            &plain["md_size"],
            &plain["md_interleave"],
            &plain["dif_type"]
        ),
        (
            &serde_json::json!(8),
            &serde_json::json!(false),
            &serde_json::json!(0)
        )
    );
    assert!(plain.get("enabled_dif_check_types").is_none());
    let dif = dif.unwrap();
    assert_eq!(dif["dif_type"], 1);
    assert_eq!(dif["dif_is_head_of_md"], false);
    assert_eq!(
        dif["enabled_dif_check_types"],
        serde_json::json!({"reftag": false, "apptag": false, "guard": true})
    );
    // Right after uuid, as SPDK writes them.
    let keys: Vec<&String> = dif.as_object().unwrap().keys().collect();
    let at = keys.iter().position(|k| *k == "uuid").unwrap();
    assert_eq!(keys[at + 1], "md_size");
    assert_eq!(bad.unwrap_err(), libc::EINVAL);
    assert_eq!(bad2.unwrap_err(), libc::EINVAL);
}

/// A bdev that completes everything at once (for tests of what the layer reports).
struct Ops;

impl BdevOps for Ops {
    fn module_name(&self) -> &'static str {
        "test"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        t == IoType::Read
    }
    fn create_channel(&self, _b: &Bdev) -> Box<dyn ModuleChannel> {
        Box::new(OpsCh)
    }
}

struct OpsCh;

impl ModuleChannel for OpsCh {
    fn submit(&mut self, io: IoHandle) {
        io.complete(IoStatus::Success)
    }
}

/// A module that holds every I/O until the test opens the gate, and tells the test when a reset reaches it (the
/// bdev layer hands a reset to the module only once every channel is frozen).
struct Gate;

/// What the gate holds, and what to run when a reset arrives.
type GateState = (VecDeque<IoHandle>, Option<Box<dyn FnOnce()>>);

thread_local! {
    static GATE: RefCell<GateState> = const { RefCell::new((VecDeque::new(), None)) };
}

impl BdevOps for Gate {
    fn module_name(&self) -> &'static str {
        "gate"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(t, IoType::Read | IoType::Reset)
    }
    fn create_channel(&self, _b: &Bdev) -> Box<dyn ModuleChannel> {
        Box::new(GateCh)
    }
}

struct GateCh;

impl ModuleChannel for GateCh {
    fn submit(&mut self, io: IoHandle) {
        let reset = io.io_type() == IoType::Reset;
        let hook = GATE.with(|g| {
            let mut g = g.borrow_mut();
            g.0.push_back(io);
            if reset {
                g.1.take()
            } else {
                None
            }
        });
        if let Some(h) = hook {
            // Not from inside the module: the test submits I/O of its own.
            reactor::timer(1, h).detach();
        }
    }
}

/// Completes everything the gate holds, in order.
fn open_gate() {
    while let Some(io) = GATE.with(|g| g.borrow_mut().0.pop_front()) {
        io.complete(IoStatus::Success);
    }
}

#[test]
fn reset_freezes_channels_waits_for_the_module_and_thaws() {
    let out: Log = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    run(move || {
        let b = bdev::register(BdevParams::new("G_reset", 512, 64), Box::new(Gate)).unwrap();
        let desc = b.open(true, None).unwrap();
        let ch = desc.channel();
        let buf = || DmaBuf::alloc(512).unwrap();
        for _ in 0..4 {
            ch.read(buf(), 0, 1, rec("before", &o), 0).unwrap();
        }
        // When the reset completes, I/O flows again: read once more (the gate is open now), then end.
        let (ch_after, o_after) = (ch.clone(), o.clone());
        let keep = Rc::new(RefCell::new(Some((desc, b))));
        let reset_done = Completion::Closure(Box::new(move |io: IoHandle| {
            o_after.lock().unwrap().push(("reset", io.status()));
            let o_end = o_after.clone();
            let end = Completion::Closure(Box::new(move |io: IoHandle| {
                o_end.lock().unwrap().push(("after", io.status()));
                if let Some((desc, b)) = keep.borrow_mut().take() {
                    drop(desc);
                    unregister_and(b, reactor::stop);
                }
            }));
            ch_after.read(buf(), 0, 1, end, 0).unwrap();
            reactor::timer(1, open_gate).detach();
        }));
        // The reset reaches the module with every channel frozen: new I/O is aborted then, and a second reset
        // waits for the first and shares its outcome. Then the module drains what it holds, reset last.
        let o2 = o.clone();
        let ch_reset = ch.clone();
        GATE.with(|g| {
            g.borrow_mut().1 = Some(Box::new(move || {
                ch.read(buf(), 0, 1, rec("during", &o2), 0).unwrap();
                ch.submit_nodata(IoType::Reset, 0, 0, rec("reset2", &o2), 0)
                    .unwrap();
                reactor::timer(1, open_gate).detach();
            }))
        });
        ch_reset
            .submit_nodata(IoType::Reset, 0, 0, reset_done, 0)
            .unwrap();
    });
    let got = out.lock().unwrap().clone();
    let ok = IoStatus::Success;
    assert_eq!(
        got,
        vec![
            ("during", IoStatus::Aborted),
            ("before", ok),
            ("before", ok),
            ("before", ok),
            ("before", ok),
            ("reset", ok),
            ("reset2", ok),
            ("after", ok),
        ],
        "the reset completes after what was outstanding, and I/O flows again after it"
    );
}
