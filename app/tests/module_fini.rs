//! Shutdown order with I/O in flight, in-process: the app walks the registered bdev modules. When shutdown
//! starts (as SIGTERM starts it) while a load keeps I/O outstanding on a module's slow bdev, every bdev is
//! unregistered first (the load sees Remove, stops issuing and closes once its I/O completed), and only then
//! do the modules finish, in reverse registration order, each possibly asynchronously.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bdev::{
    Bdev, BdevEvent, BdevModule, BdevOps, BdevParams, Completion, Desc, IoChannel, IoHandle,
    IoStatus, IoType, IoVec, ModuleChannel,
};
use subsystems::framework::{FiniDone, InitDone};

static SUBMITTED: AtomicU64 = AtomicU64::new(0);
static COMPLETED: AtomicU64 = AtomicU64::new(0);

fn log() -> &'static Mutex<Vec<String>> {
    static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());
    &LOG
}

fn note(s: impl Into<String>) {
    log().lock().unwrap().push(s.into());
}

/// A module whose init creates one slow bdev (I/O completes after 200 polls) and whose fini takes a while.
struct SlowModule {
    name: &'static str,
}

impl BdevModule for SlowModule {
    fn name(&self) -> &'static str {
        self.name
    }
    fn init(&self, done: InitDone) {
        note(format!("init {}", self.name));
        let p = BdevParams::new(&format!("{}_disk", self.name), 512, 1024);
        let r = bdev::register(p, Box::new(SlowOps(self.name)));
        done(r.map(|_| ()).map_err(|e| e.to_string()))
    }
    fn fini(&self, done: FiniDone) {
        let name = self.name;
        note(format!(
            "fini {name} start: bdevs left {}, in flight {}",
            bdev::list().len(),
            SUBMITTED.load(Ordering::SeqCst) - COMPLETED.load(Ordering::SeqCst)
        ));
        // Finishes later, as an lvstore unload or a controller detach would.
        reactor::timer(20_000, move || {
            note(format!("fini {name} done"));
            done()
        })
        .detach();
    }
}

struct SlowOps(&'static str);

impl BdevOps for SlowOps {
    fn module_name(&self) -> &'static str {
        self.0
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(t, IoType::Read)
    }
    fn create_channel(&self, _b: &Bdev) -> Box<dyn ModuleChannel> {
        Box::new(SlowCh(VecDeque::new()))
    }
    fn destruct(&self, b: &Bdev) {
        note(format!("destruct {}", b.name()));
    }
}

struct SlowCh(VecDeque<(u32, IoHandle)>);

impl ModuleChannel for SlowCh {
    fn submit(&mut self, io: IoHandle) {
        self.0.push_back((200, io));
    }
    fn poll(&mut self) -> bool {
        for e in self.0.iter_mut() {
            e.0 = e.0.saturating_sub(1);
        }
        while self.0.front().is_some_and(|e| e.0 == 0) {
            let (_, io) = self.0.pop_front().unwrap();
            io.complete(IoStatus::Success);
        }
        true
    }
}

/// A load of 16 reads at a time on `name` until the bdev goes away; then it closes once idle.
struct Load {
    desc: Option<Desc>,
    ch: Option<IoChannel>,
    buf: Vec<u8>,
    stopping: bool,
    outstanding: u32,
}

thread_local! {
    static LOADS: RefCell<Vec<Rc<RefCell<Load>>>> = const { RefCell::new(Vec::new()) };
}

fn issue(load: &Rc<RefCell<Load>>, idx: usize) {
    let mut l = load.borrow_mut();
    if l.stopping {
        return;
    }
    let iov = [IoVec {
        base: l.buf.as_mut_ptr(),
        len: 512,
    }];
    let Some(ch) = l.ch.clone() else { return };
    // SAFETY: the buffer lives in the load, which outlives its I/O: it is dropped only after the last
    // completion (outstanding == 0); every read writes the same bytes, and nothing else reads them.
    let r = unsafe { ch.readv(&iov, 0, 1, Completion::Fn(done), idx as u64) };
    if r.is_ok() {
        l.outstanding += 1;
        SUBMITTED.fetch_add(1, Ordering::SeqCst);
    }
}

fn done(io: IoHandle) {
    let idx = io.ctx as usize;
    drop(io);
    COMPLETED.fetch_add(1, Ordering::SeqCst);
    let load = LOADS.with(|l| l.borrow()[idx].clone());
    load.borrow_mut().outstanding -= 1;
    issue(&load, idx);
    let mut l = load.borrow_mut();
    if l.stopping && l.outstanding == 0 && l.desc.is_some() {
        note("load closed its descriptor");
        l.ch = None;
        l.desc = None;
    }
}

fn start_load(name: &str) {
    let idx = LOADS.with(|l| l.borrow().len());
    let on_event: bdev::EventCb = Arc::new(move |ev, _b: &Bdev| {
        if ev == BdevEvent::Remove {
            note("load told of removal");
            LOADS.with(|l| l.borrow()[idx].borrow_mut().stopping = true);
        }
    });
    let desc = bdev::open(name, false, Some(on_event)).expect("open");
    let ch = desc.channel();
    let load = Rc::new(RefCell::new(Load {
        desc: Some(desc),
        ch: Some(ch),
        buf: vec![0; 512],
        stopping: false,
        outstanding: 0,
    }));
    LOADS.with(|l| l.borrow_mut().push(load.clone()));
    for _ in 0..16 {
        issue(&load, idx);
    }
}

#[test]
fn modules_finish_in_reverse_order_after_every_bdev_with_io_in_flight() {
    let mut opts = match app::cli::parse(["-m".to_string(), "0x1".to_string()]) {
        Ok(app::cli::Action::Run(o)) => *o,
        _ => panic!("options"),
    };
    opts.no_rpc_server = true;
    let subs = app::bdev_subsystems();
    bdev::register_module(Arc::new(SlowModule { name: "first" }));
    bdev::register_module(Arc::new(SlowModule { name: "second" }));
    let hooks = app::Hooks {
        register: None,
        on_ready: Some(Box::new(|t: Rc<app::Target>| {
            start_load("first_disk");
            start_load("second_disk");
            // Shut down while the loads have I/O outstanding (what the SIGTERM handler calls).
            reactor::timer(50_000, move || {
                note(format!(
                    "shutdown with {} in flight",
                    SUBMITTED.load(Ordering::SeqCst) - COMPLETED.load(Ordering::SeqCst)
                ));
                t.shutdown()
            })
            .detach();
        })),
    };
    app::run_with(opts, subs, hooks).expect("run");
    let log = log().lock().unwrap().clone();
    let pos = |s: &str| {
        log.iter()
            .position(|l| l.starts_with(s))
            .unwrap_or_else(|| panic!("{s} missing from {log:#?}"))
    };
    assert!(pos("init first") < pos("init second"), "{log:#?}");
    let shutdown = &log[pos("shutdown with")];
    assert_ne!(shutdown, "shutdown with 0 in flight", "{log:#?}");
    // Every bdev went (its opener closed after its I/O completed) before any module finished.
    let destructs = log.iter().filter(|l| l.starts_with("destruct")).count();
    assert_eq!(destructs, 2, "{log:#?}");
    let last_destruct = log.iter().rposition(|l| l.starts_with("destruct")).unwrap();
    assert!(last_destruct < pos("fini second start"), "{log:#?}");
    assert_eq!(
        log[pos("fini second start")],
        "fini second start: bdevs left 0, in flight 0"
    );
    // Reverse registration order, each waiting for the one before to finish.
    assert!(
        pos("fini second done") < pos("fini first start"),
        "{log:#?}"
    );
    assert!(pos("fini first done") < log.len());
    assert_eq!(
        SUBMITTED.load(Ordering::SeqCst),
        COMPLETED.load(Ordering::SeqCst)
    );
}
