//! What the `bdev_nvme` tests share: this project's NVMe-oF/TCP target in the same process (malloc namespaces
//! on loopback listeners), attach/detach/I/O helpers run on the app thread, and waits on RPC-visible state.
#![allow(dead_code)]

use std::time::Duration;

use bdev::modules::malloc::{self, MallocOpts};
use bdev::{Completion, IoHandle, IoStatus, IoType};
use bdev_nvme::AttachParams;
use nvmf::mgmt;
use nvmf::params::{
    AnaState, ListenerConfig, NamespaceParams, NvmfCreateSubsystem, TransportKind, TransportOpts,
    Trid,
};
use reactor::dma::DmaBuf;
use reactor::testing::{app, on_app};

pub const NQN: &str = "nqn.2016-06.io.spdk:bdev-nvme-own";
pub const BS: u32 = 512;
pub const BLOCKS: u64 = 16384;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// On the app thread: two malloc bdevs exported as namespaces 1 and 2 of [`NQN`] on a free port.
pub fn target() -> u16 {
    on_app(|reply| {
        for n in ["OwnM0", "OwnM1", "OwnM2"] {
            malloc::create(MallocOpts {
                name: Some(n.into()),
                num_blocks: BLOCKS,
                block_size: BS,
                ..Default::default()
            })
            .unwrap();
        }
        let topts = TransportOpts::defaults(TransportKind::Tcp);
        mgmt::create_transport(topts, None, move |r| {
            r.unwrap();
            let mut o = NvmfCreateSubsystem::new(NQN);
            o.allow_any_host = true;
            // ANA states reported, as multipath setups run it (the multipath test moves them).
            o.ana_reporting = true;
            o.normalize(false, 1, 1024).unwrap();
            mgmt::create_subsystem(o);
            let port = free_port();
            set_listener(port, true);
            mgmt::add_ns(NQN, NamespaceParams::new("OwnM0"), move |r| {
                r.unwrap();
                mgmt::add_ns(NQN, NamespaceParams::new("OwnM1"), move |r| {
                    r.unwrap();
                    reply(port);
                });
            });
        });
    })
}

pub fn params(name: &str, port: u16) -> AttachParams {
    serde_json::from_value(serde_json::json!({
        "name": name, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
        "trsvcid": port.to_string(), "subnqn": NQN,
        // What spdk-rpc's newer client adds.
        "prchk_reftag": false, "prchk_guard": false, "max_bdevs": 128,
    }))
    .unwrap()
}

pub fn attach(p: AttachParams) -> Result<Vec<String>, String> {
    on_app(move |reply| bdev_nvme::attach(p, move |r| reply(r.map_err(|e| e.to_string()))))
}

/// One I/O on `name` on the app thread: (status, data read).
pub fn io(
    name: &str,
    t: IoType,
    offset: u64,
    blocks: u64,
    data: Option<Vec<u8>>,
) -> (IoStatus, Vec<u8>) {
    let name = name.to_string();
    on_app(move |reply| {
        let desc = bdev::open(&name, t.is_write() || t == IoType::Flush, None).unwrap();
        let ch = desc.channel();
        let keep = std::cell::RefCell::new(Some((desc, ch.clone())));
        let cb = Completion::Closure(Box::new(move |mut io: IoHandle| {
            let d = io
                .take_buf()
                .map(|b| b.as_slice().to_vec())
                .unwrap_or_default();
            let st = io.status();
            drop(io);
            keep.borrow_mut().take();
            reply((st, d));
        }));
        let len = (blocks * BS as u64) as usize;
        let r = match t {
            IoType::Read => ch.read(DmaBuf::alloc(len).unwrap(), offset, blocks, cb, 0),
            IoType::Write => {
                let mut b = DmaBuf::alloc(len).unwrap();
                b.as_mut_slice().copy_from_slice(&data.unwrap());
                ch.write(b, offset, blocks, cb, 0)
            }
            t => ch.submit_nodata(t, offset, blocks, cb, 0),
        };
        r.unwrap();
    })
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Waits until bdev `name` exists (or is gone).
pub fn wait_bdev(name: &str, present: bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = name.to_string();
        if app(move || bdev::get(&n).is_some()) == present {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} present: never {present}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn detach(name: &str) {
    let name = name.to_string();
    let r: Result<(), String> = on_app(move |reply| {
        bdev_nvme::detach(&name, None, move |r| reply(r.map_err(|e| e.to_string())))
    });
    r.unwrap();
}

/// Adds or removes the target's listener (removing it drops its connections, as SPDK's does), from the test.
pub fn listener(port: u16, add: bool) {
    app(move || set_listener(port, add));
}

/// [`listener`] on the app thread.
pub fn set_listener(port: u16, add: bool) {
    set_listener_of(NQN, port, add);
}

/// [`set_listener`] for subsystem `nqn`.
pub fn set_listener_of(nqn: &str, port: u16, add: bool) {
    let trid = Trid::tcp("127.0.0.1", &port.to_string());
    if add {
        let config = ListenerConfig {
            nqn: nqn.into(),
            listen_address: trid.clone(),
            secure_channel: false,
            sock_impl: None,
        };
        mgmt::add_listener(nqn, trid, AnaState::Optimized, config).unwrap();
    } else {
        mgmt::remove_listener(nqn, &trid).unwrap();
    }
}

/// Waits until controller `name` reads one of `states` in `bdev_nvme_get_controllers`.
pub fn wait_state(name: &str, states: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let name2 = name.to_string();
        let v = app(move || bdev_nvme::controllers_json(Some(&name2)).unwrap());
        let st = v[0]["ctrlrs"][0]["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if states.contains(&st.as_str()) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} still {st}, wanted {states:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `body` on a test thread while the reactors run on cores 0-1; fails when it panics.
pub fn run(body: fn()) {
    let (tx, rx) = std::sync::mpsc::channel();
    reactor::testing::run("0x3", Duration::from_secs(120), move || {
        std::thread::spawn(move || {
            let res = std::panic::catch_unwind(body);
            reactor::stop();
            let _ = tx.send(res.is_ok());
        });
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        "test body failed"
    );
}

/// A write load on the app thread: `qd` writes at a time over the first `span` blocks, each block written with
/// a pattern that changes every pass, and the pattern of each block's last acknowledged write remembered.
struct Load {
    ch: bdev::IoChannel,
    _desc: bdev::Desc,
    span: u64,
    next: std::cell::Cell<u64>,
    acked: std::cell::RefCell<Vec<Option<u8>>>,
    failed: std::cell::Cell<u64>,
    stop: std::cell::Cell<bool>,
    inflight: std::cell::Cell<u32>,
    done: std::cell::RefCell<Option<LoadDone>>,
}

/// Where a stopped load reports.
type LoadDone = Box<dyn FnOnce(LoadResult)>;

/// What a write load did.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Each block's pattern seed of its last acknowledged write.
    pub acked: Vec<Option<u8>>,
    /// Writes completed with an error.
    pub failed: u64,
    /// Writes acknowledged.
    pub ok: u64,
}

thread_local! {
    static LOAD: std::cell::RefCell<Option<std::rc::Rc<Load>>> = const { std::cell::RefCell::new(None) };
}

fn issue(l: &std::rc::Rc<Load>) {
    let n = l.next.get();
    l.next.set(n + 1);
    let block = n % l.span;
    let seed = ((n / l.span) as u8)
        .wrapping_mul(13)
        .wrapping_add(block as u8);
    let mut b = DmaBuf::alloc(BS as usize).unwrap();
    b.as_mut_slice()
        .copy_from_slice(&pattern(seed, BS as usize));
    let me = l.clone();
    l.inflight.set(l.inflight.get() + 1);
    let cb = Completion::Closure(Box::new(move |io: IoHandle| {
        let st = io.status();
        drop(io);
        me.inflight.set(me.inflight.get() - 1);
        if st == IoStatus::Success {
            me.acked.borrow_mut()[block as usize] = Some(seed);
        } else {
            me.failed.set(me.failed.get() + 1);
        }
        if !me.stop.get() {
            issue(&me);
        } else if me.inflight.get() == 0 {
            let res = LoadResult {
                acked: me.acked.borrow().clone(),
                failed: me.failed.get(),
                ok: me.next.get() - me.failed.get(),
            };
            LOAD.with(|s| s.borrow_mut().take());
            if let Some(done) = me.done.borrow_mut().take() {
                done(res);
            }
        }
    }));
    l.ch.write(b, block, 1, cb, 0).unwrap();
}

/// Starts a write load on bdev `name` (see [`Load`]).
pub fn start_load(name: &str, span: u64, qd: u32) {
    let name = name.to_string();
    app(move || {
        let desc = bdev::open(&name, true, None).unwrap();
        let ch = desc.channel();
        let l = std::rc::Rc::new(Load {
            ch,
            _desc: desc,
            span,
            next: std::cell::Cell::new(0),
            acked: std::cell::RefCell::new(vec![None; span as usize]),
            failed: std::cell::Cell::new(0),
            stop: std::cell::Cell::new(false),
            inflight: std::cell::Cell::new(0),
            done: std::cell::RefCell::new(None),
        });
        for _ in 0..qd {
            issue(&l);
        }
        LOAD.with(|s| *s.borrow_mut() = Some(l));
    });
}

/// Writes the load has completed so far.
pub fn load_progress() -> (u64, u64) {
    app(|| {
        LOAD.with(|s| {
            s.borrow().as_ref().map_or((0, 0), |l| {
                (l.next.get() - l.inflight.get() as u64, l.failed.get())
            })
        })
    })
}

/// Stops the write load once what is in flight completed.
pub fn stop_load() -> LoadResult {
    on_app(|reply| {
        LOAD.with(|s| {
            let s = s.borrow();
            let l = s.as_ref().expect("a load runs");
            l.stop.set(true);
            *l.done.borrow_mut() = Some(Box::new(reply));
        })
    })
}

/// Checks that bdev `name` holds, in each block, the pattern of its last acknowledged write.
pub fn check_acked(name: &str, acked: &[Option<u8>]) {
    let data = io(name, IoType::Read, 0, acked.len() as u64, None).1;
    for (k, seed) in acked.iter().enumerate() {
        if let Some(seed) = seed {
            assert_eq!(
                &data[k * BS as usize..(k + 1) * BS as usize],
                &pattern(*seed, BS as usize)[..],
                "block {k} of {name} lost its last acknowledged write"
            );
        }
    }
}

/// Sets the ANA state of the target's listener on `port` (all groups), from the test.
pub fn ana(port: u16, state: AnaState) {
    app(move || {
        mgmt::set_ana_state(NQN, &Trid::tcp("127.0.0.1", &port.to_string()), state, 0).unwrap()
    });
}

/// A TCP proxy in front of a target port that can cut the network without closing anything: while cut, what
/// either side sends is read and thrown away (a partition that drops packets), and connections stay open.
pub struct Blackhole {
    /// The port hosts connect to.
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Blackhole {
    /// Starts forwarding from a free port to `target` on loopback.
    pub fn start(target: u16) -> Blackhole {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = cut.clone();
        std::thread::spawn(move || {
            for host in l.incoming() {
                let Ok(host) = host else { return };
                let Ok(tgt) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (host.try_clone().unwrap(), tgt.try_clone().unwrap()),
                    (tgt, host),
                ] {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 256 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if !c.load(Ordering::Relaxed)
                                        && to.write_all(&buf[..n]).is_err()
                                    {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Blackhole { port, cut }
    }

    /// Cuts (`true`) or restores the network through the proxy.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The controller id of the path of controller `name` through port `port` (`bdev_nvme_get_controllers`).
pub fn cntlid_of(name: &str, port: &str) -> u16 {
    let n = name.to_string();
    let v = app(move || bdev_nvme::controllers_json(Some(&n)).unwrap());
    v[0]["ctrlrs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["trid"]["trsvcid"] == port)
        .unwrap_or_else(|| panic!("no path of {name} through port {port}: {v}"))["cntlid"]
        .as_u64()
        .unwrap() as u16
}
