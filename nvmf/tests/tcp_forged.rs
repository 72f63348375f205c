//! A small NVMe/TCP host, forged here from `nvme-proto`'s encoders over a blocking `std::net::TcpStream`,
//! against the target running in this process: the good path (ICReq, admin and I/O queue Connect, properties,
//! Identify, features, data in capsules, through R2T / H2C data and back in C2H data, with and without
//! digests), then one bad input after another. A bad PDU must get the C2H termination request the NVMe/TCP
//! spec names (FES and FEI) and the connection must close; a bad command must get the NVMe status the spec
//! names on a connection that stays usable; and after each, the target must still serve new connections. It
//! also checks asynchronous events on a namespace added at run time, controller shutdown and the loss of an
//! admin queue, discovery, PDU data alignment, PDUs split across segments and many PDUs in one segment, that a
//! connection dropped in the middle of a transfer gives its data buffers back, that commands waiting for a
//! buffer are not forgotten, and (with proptest) that random bytes after a valid ICReq never take the target
//! down.
//!
//! The target (two reactors, so two poll groups, with a malloc namespace per subsystem) starts once per test
//! binary on a background OS thread and serves every test. Tests run in parallel, so each writes its own LBA
//! range of namespace 1 (good path 0.., digests 1000.., bad commands 2000.., digest errors 3000.., disconnects
//! 4000.., buffer wait 5000.., pieces and alignment 6600.., pipelining 7000..); random I/O goes to the locked
//! subsystem's namespace, which nobody reads. Tests that need the target quiet (buffer counts) take
//! [`exclusive`], the others [`shared`]. The keep alive expiry test takes 10-20 s (a KATO rounds up to 10 s, as
//! in SPDK), so it is `#[ignore]`d:
//!
//! ```text
//! cargo test -p nvmf --test tcp_forged
//! cargo test -p nvmf --test tcp_forged -- --ignored keep_alive_expiry
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use bdev::modules::malloc::{self, MallocOpts};
use nvme_proto::cmd::{admin, feat, io as opc, psdt, sgl, Cqe, DsmRange, SglDesc, Sqe, FABRICS};
use nvme_proto::crc32c::crc32c;
use nvme_proto::fabrics::{cc, csts, fctype, reg, Cap, Connect, ConnectData, Property};
use nvme_proto::identify::{cns, decode_ns_list, padded_str, CtrlrData, NsData};
use nvme_proto::log::{decode_changed_ns_list, lid, ChangedNsList};
use nvme_proto::status::{generic, media, sct, specific};
use nvme_proto::tcp::{
    fes, flags, pdu_type, Ch, DataHdr, IcReq, IcResp, CAPSULE_CMD_HLEN, CAPSULE_RESP_HLEN, CH_LEN,
    DATA_HLEN, DIGEST_LEN, IC_HLEN,
};
use nvmf::mgmt;
use nvmf::params::{
    AnaState, ListenerConfig, NamespaceParams, NvmfCreateSubsystem, NvmfSubsystemAddHost,
    TransportKind, TransportOpts, Trid,
};
use proptest::prelude::*;

/// The subsystem most tests use: one malloc namespace of [`NS_BLOCKS`] blocks.
const NQN: &str = "nqn.2016-06.io.spdk:forged";
/// The subsystem of the asynchronous event test (a namespace is added to it at run time).
const NQN_AEN: &str = "nqn.2016-06.io.spdk:forged-aen";
/// A subsystem that allows only [`ALLOWED_HOST`].
const NQN_LOCKED: &str = "nqn.2016-06.io.spdk:forged-locked";
/// The host most connections are made as.
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:f0f0f0f0-0000-4000-8000-000000000001";
/// The one host [`NQN_LOCKED`] allows.
const ALLOWED_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:f0f0f0f0-0000-4000-8000-000000000002";
/// A subsystem behind a TLS (`secure_channel`) listener of its own, for [`TLS_HOST`] and [`TLS_HOST2`].
const NQN_TLS: &str = "nqn.2016-06.io.spdk:forged-tls";
/// Allowed in [`NQN_TLS`] with PSK [`tls_key`] 1 (32 bytes, SHA-256 suite).
const TLS_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:f0f0f0f0-0000-4000-8000-000000000003";
/// Allowed in [`NQN_TLS`] with PSK [`tls_key`] 2 (48 bytes, SHA-384 suite).
const TLS_HOST2: &str = "nqn.2014-08.org.nvmexpress:uuid:f0f0f0f0-0000-4000-8000-000000000004";
const SERIAL: &str = "SPDKFORGED0000000001";
const MODEL: &str = "spdk-rs forged NVMe/TCP host";
/// Namespace 1 of [`NQN`]: 16 MiB in 512-byte blocks.
const NS_BLOCKS: u64 = 32768;
const BS: usize = 512;
/// Blocks of each namespace of [`NQN_AEN`].
const AEN_NS_BLOCKS: u64 = 2048;
/// The transport's limits: small queues and few buffers, so the buffer tests can run the poll groups dry.
const MAX_IO: u32 = 131072;
const QD: u16 = 32;
const BUFS: u32 = 64;
const ICD: u32 = 4096;
/// How long a host waits for any answer before the test fails.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------------------------
// The target
// ---------------------------------------------------------------------------------------------------------------

/// The in-process target: where it listens (in the clear, and with TLS required).
struct Target {
    port: u16,
    tls_port: u16,
}

/// The configured PSKs of the TLS hosts: 1 for [`TLS_HOST`], 2 for [`TLS_HOST2`].
fn tls_key(which: u8) -> nvme_tls::ConfiguredPsk {
    let (len, hash) = if which == 1 { (32, 1) } else { (48, 2) };
    nvme_tls::ConfiguredPsk::new(vec![which.wrapping_mul(37); len], hash).expect("PSK")
}

/// The target, started on first use.
fn target() -> &'static Target {
    static T: OnceLock<Target> = OnceLock::new();
    T.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("forged-target".into())
            .spawn(move || {
                // Two reactors: connections alternate between two poll groups, so an I/O queue usually runs on
                // another poll group than its controller's admin queue. Idle back-off keeps the 2-core CI box
                // usable; pinning would fight the test threads.
                let opts = reactor::Options {
                    cpumask: reactor::CpuMask::parse("0x3").expect("mask"),
                    main_core: None,
                    idle_backoff: true,
                    pin: false,
                };
                reactor::run(opts, move || setup(tx)).expect("reactors run");
            })
            .expect("target thread");
        let (port, tls_port) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("target set up in time")
            .unwrap_or_else(|e| panic!("target setup: {e}"));
        Target { port, tls_port }
    })
}

/// On the app thread: bdevs, the TCP transport, three subsystems on one free port, their namespaces.
fn setup(tx: mpsc::Sender<Result<(u16, u16), String>>) {
    for (name, blocks) in [
        ("Forged0", NS_BLOCKS),
        ("ForgedAen1", AEN_NS_BLOCKS),
        ("ForgedAen2", AEN_NS_BLOCKS),
        ("ForgedLocked", AEN_NS_BLOCKS),
        ("ForgedTls", AEN_NS_BLOCKS),
    ] {
        if let Err(e) = malloc::create(MallocOpts {
            name: Some(name.into()),
            num_blocks: blocks,
            block_size: BS as u32,
            ..Default::default()
        }) {
            let _ = tx.send(Err(format!("malloc {name}: {e}")));
            return;
        }
    }
    let mut topts = TransportOpts::defaults(TransportKind::Tcp);
    topts.max_queue_depth = QD;
    topts.max_aq_depth = QD as u32;
    topts.num_shared_buffers = BUFS;
    topts.in_capsule_data_size = ICD;
    topts.max_io_size = MAX_IO;
    // Accept every millisecond: tests open hundreds of connections.
    topts.acceptor_poll_rate = 1000;
    mgmt::create_transport(topts, None, move |r| {
        if let Err(e) = r {
            let _ = tx.send(Err(format!("transport: {e}")));
            return;
        }
        for (i, (nqn, allow_any_host)) in [
            (NQN, true),
            (NQN_AEN, true),
            (NQN_LOCKED, false),
            (NQN_TLS, false),
        ]
        .into_iter()
        .enumerate()
        {
            let mut o = NvmfCreateSubsystem::new(nqn);
            o.allow_any_host = allow_any_host;
            o.serial_number = SERIAL.into();
            o.model_number = MODEL.into();
            o.max_namespaces = 32;
            if let Err(e) = o.normalize(false, i + 1, 1024) {
                let _ = tx.send(Err(format!("subsystem {nqn}: {e:?}")));
                return;
            }
            mgmt::create_subsystem(o);
        }
        let host: NvmfSubsystemAddHost =
            serde_json::from_value(serde_json::json!({ "nqn": NQN_LOCKED, "host": ALLOWED_HOST }))
                .expect("add_host parameters");
        if let Err(e) = mgmt::add_host(host, None) {
            let _ = tx.send(Err(format!("allowed host: {e}")));
            return;
        }
        for (h, k) in [(TLS_HOST, 1), (TLS_HOST2, 2)] {
            let host: NvmfSubsystemAddHost =
                serde_json::from_value(serde_json::json!({ "nqn": NQN_TLS, "host": h }))
                    .expect("add_host parameters");
            if let Err(e) = mgmt::add_host(host, Some(tls_key(k))) {
                let _ = tx.send(Err(format!("TLS host: {e}")));
                return;
            }
        }
        let listen_as = |nqn: &str, port: u16, secure: bool| {
            let trid = Trid::tcp("127.0.0.1", &port.to_string());
            let config = ListenerConfig {
                nqn: nqn.into(),
                listen_address: trid.clone(),
                secure_channel: secure,
                sock_impl: None,
            };
            mgmt::add_listener(nqn, trid, AnaState::Optimized, config)
        };
        let listen = |nqn: &str, port: u16| listen_as(nqn, port, false);
        // A port that was free a moment ago; another process may take it in between, so try a few.
        let Some(port) = (0..10)
            .map(|_| free_port())
            .find(|&p| listen(NQN, p).is_ok())
        else {
            let _ = tx.send(Err("no free port to listen on".into()));
            return;
        };
        let Some(tls_port) = (0..10)
            .map(|_| free_port())
            .find(|&p| listen_as(NQN_TLS, p, true).is_ok())
        else {
            let _ = tx.send(Err("no free port for the TLS listener".into()));
            return;
        };
        for nqn in [NQN_AEN, NQN_LOCKED] {
            if let Err(e) = listen(nqn, port) {
                let _ = tx.send(Err(format!("listener of {nqn}: {e}")));
                return;
            }
        }
        add_namespaces(
            vec![
                (NQN, "Forged0"),
                (NQN_AEN, "ForgedAen1"),
                (NQN_LOCKED, "ForgedLocked"),
                (NQN_TLS, "ForgedTls"),
            ],
            move |r| {
                let _ = tx.send(r.map(|_| (port, tls_port)));
            },
        );
    });
}

/// Adds each (subsystem, bdev) namespace in turn, then calls `done`.
fn add_namespaces(
    mut todo: Vec<(&'static str, &'static str)>,
    done: impl FnOnce(Result<(), String>) + Send + 'static,
) {
    if todo.is_empty() {
        done(Ok(()));
        return;
    }
    let (nqn, bdev) = todo.remove(0);
    mgmt::add_ns(nqn, NamespaceParams::new(bdev), move |r| match r {
        Ok(_) => add_namespaces(todo, done),
        Err(e) => done(Err(format!("namespace {bdev} in {nqn}: {e}"))),
    });
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

/// Runs `f` on the target's app thread and waits for what it sends back.
fn on_app<R: Send + 'static>(f: impl FnOnce(mpsc::Sender<R>) + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    reactor::app_thread()
        .expect("reactors run")
        .send(move || f(tx));
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the app thread answers")
}

/// Per poll group: data buffers held by commands, and connected admin + I/O queue pairs.
fn pg_usage() -> Vec<(u32, u64)> {
    let pgs = nvmf::tgt::tgt().pgs.clone();
    pgs.iter()
        .map(|p| {
            let (tx, rx) = mpsc::channel();
            p.thread.send(move || {
                let r = nvmf::pg::current().map(|pg| {
                    let bufs = pg
                        .group::<nvmf::tcp::TcpGroup>()
                        .map_or(0, |t| t.buffers_in_use());
                    let qps =
                        pg.stats.current_admin_qpairs.get() + pg.stats.current_io_qpairs.get();
                    (bufs, qps)
                });
                let _ = tx.send(r.unwrap_or_default());
            });
            rx.recv_timeout(Duration::from_secs(10))
                .expect("poll group answers")
        })
        .collect()
}

/// Waits until `ok` holds for the poll groups' usage; fails the test after a few seconds.
fn wait_usage(what: &str, ok: impl Fn(&[(u32, u64)]) -> bool) -> Vec<(u32, u64)> {
    let end = Instant::now() + IO_TIMEOUT;
    loop {
        let u = pg_usage();
        if ok(&u) {
            return u;
        }
        assert!(
            Instant::now() < end,
            "{what}: poll groups (buffers, queue pairs) still {u:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until no poll group holds a buffer or a connected queue pair.
fn wait_quiet() {
    wait_usage("quiet", |u| u.iter().all(|&(b, q)| b == 0 && q == 0));
}

static QUIET: RwLock<()> = RwLock::new(());

/// Taken by tests that may run alongside others.
fn shared() -> RwLockReadGuard<'static, ()> {
    let _ = target();
    QUIET.read().unwrap_or_else(|e| e.into_inner())
}

/// Taken by tests that count the target's buffers: nothing else runs meanwhile.
fn exclusive() -> RwLockWriteGuard<'static, ()> {
    let _ = target();
    QUIET.write().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------------------------
// The host
// ---------------------------------------------------------------------------------------------------------------

/// A PDU from the target, checked for its layout and digests.
#[derive(Debug)]
enum Pdu {
    IcResp(IcResp),
    Resp(Cqe),
    R2t(DataHdr),
    C2h {
        hdr: DataHdr,
        flags: u8,
        data: Vec<u8>,
    },
    Term {
        fes: u16,
        fei: u32,
        excerpt: Vec<u8>,
    },
}

/// What a host reads and writes PDUs through: the socket, or TLS over it.
trait Wire: Read + Write + Send {}
impl<T: Read + Write + Send> Wire for T {}

/// One NVMe/TCP connection of the host.
struct Host {
    s: Box<dyn Wire>,
    /// The socket itself (a second handle), for timeouts and shutdown.
    sock: TcpStream,
    hdgst: bool,
    ddgst: bool,
    /// Data alignment (0-based dwords) in both directions: the HPDA asked for, the CPDA granted.
    pda: u8,
    next_cid: u16,
}

/// A transport SGL data block: the data moves in R2T/H2C or C2H PDUs.
fn sgl_transport(len: u32) -> SglDesc {
    SglDesc {
        addr: 0,
        len,
        key: 0,
        ty: sgl::TYPE_TRANSPORT_DATA_BLOCK,
        subtype: sgl::SUBTYPE_TRANSPORT,
    }
}

/// An in-capsule data SGL (offset 0).
fn sgl_icd(len: u32) -> SglDesc {
    SglDesc {
        addr: 0,
        len,
        key: 0,
        ty: sgl::TYPE_DATA_BLOCK,
        subtype: sgl::SUBTYPE_OFFSET,
    }
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

/// A recognisable pattern for `len` bytes.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_shr(13) as u8 ^ seed)
        .collect()
}

impl Host {
    /// A new TCP connection to the target (no ICReq yet).
    fn tcp() -> Host {
        let s = TcpStream::connect(("127.0.0.1", target().port)).expect("connect to the target");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        Host {
            sock: s.try_clone().unwrap(),
            s: Box::new(s),
            hdgst: false,
            ddgst: false,
            pda: 0,
            next_cid: 1,
        }
    }

    /// A new connection to the TLS listener, through the handshake, offering `host`'s identity towards
    /// [`NQN_TLS`] with PSK `key`: `Err` says why the handshake failed.
    fn tls(host: &str, key: &nvme_tls::ConfiguredPsk) -> Result<Host, String> {
        let s =
            TcpStream::connect(("127.0.0.1", target().tls_port)).expect("connect to the target");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        let psk = key.tls_psk(host, NQN_TLS).expect("TLS PSK");
        let mut t = nvme_tls::TlsStream::client(s.try_clone().unwrap(), psk);
        // A blocking socket: each step waits for the target's answer (or the read timeout).
        while !t.handshake().map_err(|e| e.to_string())? {}
        Ok(Host {
            sock: s,
            s: Box::new(t),
            hdgst: false,
            ddgst: false,
            pda: 0,
            next_cid: 1,
        })
    }

    /// A connection past ICReq/ICResp with these digests.
    fn ready(hdgst: bool, ddgst: bool) -> Host {
        let mut h = Host::tcp();
        let r = h.ic(hdgst, ddgst);
        assert_eq!((r.hdgst, r.ddgst), (hdgst, ddgst), "digests granted");
        h
    }

    /// Sends ICReq and reads ICResp.
    fn ic(&mut self, hdgst: bool, ddgst: bool) -> IcResp {
        self.ic_aligned(hdgst, ddgst, 0)
    }

    /// Sends ICReq asking for data aligned on `(hpda + 1) * 4` bytes, and reads ICResp.
    fn ic_aligned(&mut self, hdgst: bool, ddgst: bool, hpda: u8) -> IcResp {
        let mut b = [0u8; IC_HLEN];
        IcReq {
            pfv: 0,
            hpda,
            hdgst,
            ddgst,
            maxr2t: 0,
        }
        .encode(&mut b);
        self.send(&b);
        match self.recv() {
            Pdu::IcResp(r) => {
                self.hdgst = r.hdgst;
                self.ddgst = r.ddgst;
                // The target wants from us the alignment we asked of it.
                assert_eq!(r.cpda, hpda, "CPDA");
                self.pda = r.cpda;
                r
            }
            p => panic!("expected ICResp, got {p:?}"),
        }
    }

    /// Where data starts after a header of `hlen` bytes (and its digest), on the negotiated alignment.
    fn pdo(&self, hlen: usize) -> usize {
        let hend = hlen + if self.hdgst { DIGEST_LEN } else { 0 };
        hend.next_multiple_of((self.pda as usize + 1) * 4)
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to the target");
    }

    fn cid(&mut self) -> u16 {
        let c = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        c
    }

    fn read_exact(&mut self, b: &mut [u8], what: &str) {
        if let Err(e) = self.s.read_exact(b) {
            panic!("reading {what}: {e}");
        }
    }

    /// Reads one PDU and checks what every PDU from the controller must satisfy.
    fn recv(&mut self) -> Pdu {
        let mut chb = [0u8; CH_LEN];
        self.read_exact(&mut chb, "a PDU header");
        let ch = Ch::decode(&chb);
        let plen = ch.plen as usize;
        assert!(
            (CH_LEN..=MAX_IO as usize + 256).contains(&plen),
            "PDU length {plen} ({ch:?})"
        );
        let mut b = vec![0u8; plen];
        b[..CH_LEN].copy_from_slice(&chb);
        self.read_exact(&mut b[CH_LEN..], "a PDU");
        let hlen = ch.hlen as usize;
        let digestable = !matches!(ch.ty, pdu_type::IC_RESP | pdu_type::C2H_TERM_REQ);
        let hd = self.hdgst && digestable;
        assert_eq!(ch.flags & flags::HDGSTF != 0, hd, "HDGSTF in {ch:?}");
        if hd {
            assert_eq!(
                le32(&b, hlen),
                crc32c(&b[..hlen]),
                "header digest of {ch:?}"
            );
        }
        let hend = hlen + if hd { DIGEST_LEN } else { 0 };
        match ch.ty {
            pdu_type::IC_RESP => {
                assert_eq!((hlen, plen), (IC_HLEN, IC_HLEN), "ICResp layout");
                Pdu::IcResp(IcResp::decode(&b))
            }
            pdu_type::C2H_TERM_REQ => {
                assert_eq!((hlen, ch.pdo, ch.flags), (DATA_HLEN, 0, 0), "C2HTermReq");
                assert!(plen <= DATA_HLEN + 152, "C2HTermReq length {plen}");
                let (fes, fei) = nvme_proto::tcp::decode_term_req(&b);
                Pdu::Term {
                    fes,
                    fei,
                    excerpt: b[DATA_HLEN..].to_vec(),
                }
            }
            pdu_type::CAPSULE_RESP => {
                assert_eq!(
                    (hlen, plen),
                    (CAPSULE_RESP_HLEN, hend),
                    "CapsuleResp layout"
                );
                let mut c = [0u8; 16];
                c.copy_from_slice(&b[CH_LEN..CH_LEN + 16]);
                Pdu::Resp(Cqe::decode(&c))
            }
            pdu_type::R2T => {
                assert_eq!((hlen, plen), (DATA_HLEN, hend), "R2T layout");
                Pdu::R2t(DataHdr::decode(&b))
            }
            pdu_type::C2H_DATA => {
                assert_eq!(hlen, DATA_HLEN, "C2HData hlen");
                let dd = self.ddgst;
                assert_eq!(ch.flags & flags::DDGSTF != 0, dd, "DDGSTF in {ch:?}");
                let pdo = ch.pdo as usize;
                let end = plen - if dd { DIGEST_LEN } else { 0 };
                assert!(pdo >= hend && pdo < end, "C2HData pdo {pdo} plen {plen}");
                assert_eq!(
                    pdo % ((self.pda as usize + 1) * 4),
                    0,
                    "C2HData pdo {pdo} aligned"
                );
                let hdr = DataHdr::decode(&b);
                let data = b[pdo..end].to_vec();
                assert_eq!(hdr.len as usize, data.len(), "C2HData DATAL");
                if dd {
                    assert_eq!(le32(&b, end), crc32c(&data), "C2HData data digest");
                }
                if ch.flags & flags::SUCCESS != 0 {
                    assert!(ch.flags & flags::LAST_PDU != 0, "SUCCESS without LAST_PDU");
                }
                Pdu::C2h {
                    hdr,
                    flags: ch.flags,
                    data,
                }
            }
            t => panic!("unexpected PDU type {t:#x} from the controller"),
        }
    }

    /// The bytes of a command capsule with in-capsule data (digests as negotiated; `bad_ddgst` corrupts the
    /// data digest).
    fn capsule_bytes(&self, sqe: &Sqe, icd: &[u8], bad_ddgst: bool) -> Vec<u8> {
        let hd = if self.hdgst { DIGEST_LEN } else { 0 };
        let dd = if self.ddgst && !icd.is_empty() {
            DIGEST_LEN
        } else {
            0
        };
        let pdo = if icd.is_empty() {
            0
        } else {
            self.pdo(CAPSULE_CMD_HLEN)
        };
        let plen = if icd.is_empty() {
            CAPSULE_CMD_HLEN + hd
        } else {
            pdo + icd.len() + dd
        };
        let mut fl = 0;
        if hd > 0 {
            fl |= flags::HDGSTF;
        }
        if dd > 0 {
            fl |= flags::DDGSTF;
        }
        let mut b = vec![0u8; plen];
        Ch {
            ty: pdu_type::CAPSULE_CMD,
            flags: fl,
            hlen: CAPSULE_CMD_HLEN as u8,
            pdo: pdo as u8,
            plen: plen as u32,
        }
        .encode(&mut b);
        b[CH_LEN..CAPSULE_CMD_HLEN].copy_from_slice(&sqe.0);
        if hd > 0 {
            let c = crc32c(&b[..CAPSULE_CMD_HLEN]);
            b[CAPSULE_CMD_HLEN..CAPSULE_CMD_HLEN + 4].copy_from_slice(&c.to_le_bytes());
        }
        if !icd.is_empty() {
            b[pdo..pdo + icd.len()].copy_from_slice(icd);
        }
        if dd > 0 {
            let c = crc32c(icd) ^ if bad_ddgst { 1 } else { 0 };
            b[plen - 4..].copy_from_slice(&c.to_le_bytes());
        }
        b
    }

    /// The bytes of an H2C data PDU.
    fn h2c_bytes(&self, d: DataHdr, last: bool, data: &[u8], bad_ddgst: bool) -> Vec<u8> {
        let hd = if self.hdgst { DIGEST_LEN } else { 0 };
        let dd = if self.ddgst { DIGEST_LEN } else { 0 };
        let pdo = self.pdo(DATA_HLEN);
        let plen = pdo + data.len() + dd;
        let mut fl = if last { flags::LAST_PDU } else { 0 };
        if hd > 0 {
            fl |= flags::HDGSTF;
        }
        if dd > 0 {
            fl |= flags::DDGSTF;
        }
        let mut b = vec![0u8; plen];
        d.encode(pdu_type::H2C_DATA, fl, pdo as u8, plen as u32, &mut b);
        if hd > 0 {
            let c = crc32c(&b[..DATA_HLEN]);
            b[DATA_HLEN..DATA_HLEN + 4].copy_from_slice(&c.to_le_bytes());
        }
        b[pdo..pdo + data.len()].copy_from_slice(data);
        if dd > 0 {
            let c = crc32c(data) ^ if bad_ddgst { 1 } else { 0 };
            b[plen - 4..].copy_from_slice(&c.to_le_bytes());
        }
        b
    }

    /// Reads the response capsule of `cid`.
    fn resp(&mut self, cid: u16) -> Cqe {
        match self.recv() {
            Pdu::Resp(c) => {
                assert_eq!(c.cid, cid, "response for another command: {c:?}");
                c
            }
            p => panic!("expected the response of cid {cid}, got {p:?}"),
        }
    }

    /// A command without data.
    fn cmd(&mut self, mut sqe: Sqe) -> Cqe {
        let cid = self.cid();
        sqe.set_cid(cid);
        sqe.set_flags(0, psdt::SGL_MPTR_CONTIG);
        let b = self.capsule_bytes(&sqe, &[], false);
        self.send(&b);
        self.resp(cid)
    }

    /// A command with its data in the capsule (`bad_ddgst`: with a wrong data digest).
    fn cmd_icd_digest(&mut self, mut sqe: Sqe, data: &[u8], bad_ddgst: bool) -> Cqe {
        let cid = self.cid();
        sqe.set_cid(cid);
        sqe.set_flags(0, psdt::SGL_MPTR_CONTIG);
        sqe.set_sgl1(&sgl_icd(data.len() as u32));
        let b = self.capsule_bytes(&sqe, data, bad_ddgst);
        self.send(&b);
        self.resp(cid)
    }

    fn cmd_icd(&mut self, sqe: Sqe, data: &[u8]) -> Cqe {
        self.cmd_icd_digest(sqe, data, false)
    }

    /// A command whose data goes out after the controller's R2T, in `pieces` H2C data PDUs (`bad_ddgst`:
    /// the first with a wrong data digest).
    fn cmd_r2t(&mut self, mut sqe: Sqe, data: &[u8], pieces: usize, bad_ddgst: bool) -> Cqe {
        let cid = self.cid();
        sqe.set_cid(cid);
        sqe.set_flags(0, psdt::SGL_MPTR_CONTIG);
        sqe.set_sgl1(&sgl_transport(data.len() as u32));
        let b = self.capsule_bytes(&sqe, &[], false);
        self.send(&b);
        let r2t = match self.recv() {
            Pdu::R2t(r) => r,
            // Refused before any data moved.
            Pdu::Resp(c) => {
                assert_eq!(c.cid, cid);
                return c;
            }
            p => panic!("expected R2T, got {p:?}"),
        };
        assert_eq!(
            (r2t.cccid, r2t.offset, r2t.len as usize),
            (cid, 0, data.len()),
            "R2T for the whole transfer"
        );
        let chunk = data.len().div_ceil(pieces);
        let mut off = 0;
        for (i, part) in data.chunks(chunk).enumerate() {
            let b = self.h2c_bytes(
                DataHdr {
                    cccid: cid,
                    ttag: r2t.ttag,
                    offset: off as u32,
                    len: part.len() as u32,
                },
                off + part.len() == data.len(),
                part,
                bad_ddgst && i == 0,
            );
            self.send(&b);
            off += part.len();
        }
        self.resp(cid)
    }

    /// A command that returns `len` bytes in C2H data: the completion and the data (empty when it failed).
    fn cmd_in(&mut self, mut sqe: Sqe, len: u32) -> (Cqe, Vec<u8>) {
        let cid = self.cid();
        sqe.set_cid(cid);
        sqe.set_flags(0, psdt::SGL_MPTR_CONTIG);
        sqe.set_sgl1(&sgl_transport(len));
        let b = self.capsule_bytes(&sqe, &[], false);
        self.send(&b);
        let mut data = Vec::new();
        loop {
            match self.recv() {
                Pdu::C2h {
                    hdr,
                    flags: f,
                    data: d,
                } => {
                    assert_eq!(hdr.cccid, cid, "C2H data of another command");
                    assert_eq!(hdr.offset as usize, data.len(), "C2H data in order");
                    data.extend_from_slice(&d);
                    assert!(data.len() <= len as usize, "more C2H data than asked");
                    if f & flags::SUCCESS != 0 {
                        // SUCCESS: the command completed and no response capsule follows.
                        assert_eq!(data.len(), len as usize);
                        return (
                            Cqe {
                                cid,
                                ..Default::default()
                            },
                            data,
                        );
                    }
                }
                Pdu::Resp(c) => {
                    assert_eq!(c.cid, cid, "response for another command: {c:?}");
                    if c.status.is_success() {
                        assert_eq!(data.len(), len as usize, "all the data before success");
                    }
                    return (c, data);
                }
                p => panic!("expected C2H data or a response, got {p:?}"),
            }
        }
    }

    /// Expects a C2HTermReq with `fes`/`fei` that quotes the header of the PDU `sent` (as much of it as the
    /// target had read), then the connection's end. Returns the length of the quote.
    fn expect_term(&mut self, want_fes: u16, want_fei: u32, sent: &[u8], what: &str) -> usize {
        let quoted = match self.recv() {
            Pdu::Term { fes, fei, excerpt } => {
                assert_eq!((fes, fei), (want_fes, want_fei), "{what}: FES/FEI");
                let hlen = nvme_proto::tcp::hlen_of(sent[0]).unwrap_or(CH_LEN);
                assert!(
                    (CH_LEN..=hlen).contains(&excerpt.len()) && sent.starts_with(&excerpt),
                    "{what}: the termination request quotes the header in error: {excerpt:?}"
                );
                excerpt.len()
            }
            p => panic!("{what}: expected C2HTermReq, got {p:?}"),
        };
        self.expect_closed(what);
        quoted
    }

    /// Expects the target to close the connection (end of stream or reset), with nothing more sent.
    fn expect_closed(&mut self, what: &str) {
        let mut b = [0u8; 256];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok(n) => panic!("{what}: {n} more bytes after the end: {:?}", &b[..n]),
            Err(e) => panic!("{what}: connection still open ({e})"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------------------------

fn connect_sqe(qid: u16, sqsize: u16, kato: u32) -> Sqe {
    Connect {
        recfmt: 0,
        qid,
        sqsize,
        cattr: 0,
        kato,
    }
    .to_sqe(0)
}

fn connect_data(cntlid: u16, subnqn: &str, hostnqn: &str) -> Vec<u8> {
    let mut d = vec![0u8; ConnectData::SIZE];
    ConnectData {
        hostid: [0x5a; 16],
        cntlid,
        subnqn: subnqn.into(),
        hostnqn: hostnqn.into(),
    }
    .encode(&mut d);
    d
}

fn prop_get(offset: u32, size8: bool) -> Sqe {
    Property {
        size8,
        offset,
        value: 0,
    }
    .to_sqe(false, 0)
}

fn prop_set(offset: u32, value: u64) -> Sqe {
    Property {
        size8: false,
        offset,
        value,
    }
    .to_sqe(true, 0)
}

fn identify(cns_: u8, nsid: u32) -> Sqe {
    let mut s = Sqe::new(admin::IDENTIFY, 0);
    s.set_nsid(nsid);
    s.set_cdw(10, cns_ as u32);
    s
}

fn rw(op: u8, nsid: u32, slba: u64, blocks: u32) -> Sqe {
    let mut s = Sqe::new(op, 0);
    s.set_nsid(nsid);
    s.set_cdw(10, slba as u32);
    s.set_cdw(11, (slba >> 32) as u32);
    s.set_cdw(12, blocks - 1);
    s
}

fn get_log_page(lid_: u8, len: u32) -> Sqe {
    let mut s = Sqe::new(admin::GET_LOG_PAGE, 0);
    s.set_nsid(0xffff_ffff);
    let numd = len / 4 - 1;
    s.set_cdw(10, lid_ as u32 | (numd & 0xffff) << 16);
    s.set_cdw(11, numd >> 16);
    s
}

/// CC with EN and the only queue entry sizes fabrics allow (64-byte SQEs, 16-byte CQEs).
const CC_ENABLE: u64 = (cc::EN | 6 << cc::IOSQES_SHIFT | 4 << cc::IOCQES_SHIFT) as u64;

#[track_caller]
fn assert_ok(c: &Cqe, what: &str) {
    assert!(c.status.is_success(), "{what}: {}", c.status);
}

#[track_caller]
fn assert_status(c: &Cqe, sct_: u8, sc: u8, what: &str) {
    assert_eq!(
        (c.status.sct, c.status.sc),
        (sct_, sc),
        "{what}: got {}",
        c.status
    );
}

/// An admin queue Connect; the completion.
fn connect_admin(h: &mut Host, subnqn: &str, hostnqn: &str, kato: u32) -> Cqe {
    h.cmd_icd(
        connect_sqe(0, QD - 1, kato),
        &connect_data(ConnectData::CNTLID_DYNAMIC, subnqn, hostnqn),
    )
}

/// Sets CC.EN and waits for CSTS.RDY.
fn enable(h: &mut Host) {
    assert_ok(&h.cmd(prop_set(reg::CC, CC_ENABLE)), "Property Set CC.EN");
    for _ in 0..100 {
        let c = h.cmd(prop_get(reg::CSTS, false));
        assert_ok(&c, "Property Get CSTS");
        if c.dw0 & csts::RDY != 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("CSTS.RDY never set");
}

/// A connected, enabled controller of `subnqn` for [`HOSTNQN`]: its admin queue and controller id.
fn controller(subnqn: &str, digests: bool, kato: u32) -> (Host, u16) {
    controller_as(subnqn, HOSTNQN, digests, kato)
}

/// A connected, enabled controller of `subnqn` for `hostnqn`.
fn controller_as(subnqn: &str, hostnqn: &str, digests: bool, kato: u32) -> (Host, u16) {
    let mut h = Host::ready(digests, digests);
    let c = connect_admin(&mut h, subnqn, hostnqn, kato);
    assert_ok(&c, "admin Connect");
    let cntlid = c.dw0 as u16;
    enable(&mut h);
    (h, cntlid)
}

/// An I/O queue `qid` of controller `cntlid` (of [`HOSTNQN`]).
fn io_queue(subnqn: &str, cntlid: u16, qid: u16, digests: bool) -> Host {
    io_queue_as(subnqn, HOSTNQN, cntlid, qid, digests)
}

/// An I/O queue `qid` of `hostnqn`'s controller `cntlid`.
fn io_queue_as(subnqn: &str, hostnqn: &str, cntlid: u16, qid: u16, digests: bool) -> Host {
    let mut h = Host::ready(digests, digests);
    let c = h.cmd_icd(
        connect_sqe(qid, QD - 1, 0),
        &connect_data(cntlid, subnqn, hostnqn),
    );
    assert_ok(&c, "I/O queue Connect");
    h
}

/// Reads `blocks` blocks of namespace 1 at `slba` and returns them.
fn read(h: &mut Host, slba: u64, blocks: u32) -> Vec<u8> {
    let (c, d) = h.cmd_in(rw(opc::READ, 1, slba, blocks), blocks * BS as u32);
    assert_ok(&c, "Read");
    d
}

/// The target still serves: a new controller answers Identify Controller.
fn assert_serving() {
    let (mut h, cntlid) = controller(NQN, false, 0);
    let (c, d) = h.cmd_in(identify(cns::CTRLR, 0), 4096);
    assert_ok(&c, "Identify Controller");
    let id = CtrlrData::decode(&d).expect("Identify Controller data");
    assert_eq!(id.cntlid, cntlid);
}

// ---------------------------------------------------------------------------------------------------------------
// The good path
// ---------------------------------------------------------------------------------------------------------------

/// The whole life of a controller as a host drives it, without digests.
#[test]
fn good_path() {
    let _g = shared();
    let mut a = Host::tcp();
    let ic = a.ic(false, false);
    assert_eq!(ic.pfv, 0);
    assert_eq!(ic.cpda, 0);
    assert!(!ic.hdgst && !ic.ddgst, "digests are off unless asked for");
    assert_eq!(ic.maxh2cdata, MAX_IO, "MAXH2CDATA");

    // Admin queue: a new controller (dynamic model), KATO 15 s (rounded up to 20 s, in 10 s steps as SPDK).
    let c = connect_admin(&mut a, NQN, HOSTNQN, 15_000);
    assert_ok(&c, "admin Connect");
    let cntlid = c.dw0 as u16;
    assert!(
        (1..0xfff0).contains(&cntlid),
        "controller id {cntlid:#x} in dw0"
    );

    let c = a.cmd(prop_get(reg::CAP, true));
    assert_ok(&c, "Property Get CAP");
    let cap = Cap::from_u64(c.dw0 as u64 | (c.dw1 as u64) << 32);
    assert_eq!(cap.mqes, QD - 1, "CAP.MQES");
    assert!(cap.cqr, "CAP.CQR");
    assert_eq!(cap.css & 1, 1, "CAP.CSS: NVM command set");
    assert!(cap.to > 0, "CAP.TO");
    let c = a.cmd(prop_get(reg::VS, false));
    assert_ok(&c, "Property Get VS");
    assert_eq!(c.dw0, 0x0001_0300, "VS 1.3");
    let c = a.cmd(prop_get(reg::CSTS, false));
    assert_eq!(c.dw0 & csts::RDY, 0, "not ready before CC.EN");
    enable(&mut a);
    let c = a.cmd(prop_get(reg::CC, false));
    assert_eq!(c.dw0 as u64, CC_ENABLE, "CC reads back");

    let (c, d) = a.cmd_in(identify(cns::CTRLR, 0), 4096);
    assert_ok(&c, "Identify Controller");
    let id = CtrlrData::decode(&d).expect("Identify Controller data");
    assert_eq!(padded_str(&id.sn).unwrap(), SERIAL);
    assert_eq!(padded_str(&id.mn).unwrap(), MODEL);
    assert_eq!(padded_str(&id.subnqn).unwrap(), NQN);
    assert_eq!(id.cntlid, cntlid);
    assert_eq!(
        id.ioccsz,
        (64 + ICD) / 16,
        "IOCCSZ: SQE plus in-capsule data"
    );
    assert_eq!(id.iorcsz, 1, "IORCSZ");
    assert_eq!(
        4096u32 << id.mdts,
        MAX_IO,
        "MDTS (in CAP.MPSMIN units of 4 KiB)"
    );
    assert_eq!(id.maxcmd, QD);
    assert_eq!(id.nn, 32);
    assert_eq!((id.sqes, id.cqes), (0x66, 0x44));
    assert!(id.sgls & 1 != 0, "SGLs supported");

    let mut s = Sqe::new(admin::GET_FEATURES, 0);
    s.set_cdw(10, feat::KEEP_ALIVE_TIMER as u32);
    let c = a.cmd(s);
    assert_ok(&c, "Get Features KATO");
    assert_eq!(c.dw0, 20_000, "KATO rounded up to 10 s steps");

    let mut s = Sqe::new(admin::SET_FEATURES, 0);
    s.set_cdw(10, feat::NUMBER_OF_QUEUES as u32);
    s.set_cdw(11, 3 | 3 << 16);
    let c = a.cmd(s);
    assert_ok(&c, "Set Features Number of Queues");
    assert_eq!(c.dw0, 126 | 126 << 16, "queues allocated (0-based)");

    let (c, d) = a.cmd_in(identify(cns::ACTIVE_NS_LIST, 0), 4096);
    assert_ok(&c, "Identify active namespace list");
    assert_eq!(decode_ns_list(&d).unwrap(), vec![1]);
    let (c, d) = a.cmd_in(identify(cns::NS, 1), 4096);
    assert_ok(&c, "Identify Namespace");
    let ns = NsData::decode(&d).expect("Identify Namespace data");
    assert_eq!((ns.nsze, ns.ncap), (NS_BLOCKS, NS_BLOCKS), "NSZE/NCAP");
    assert_eq!(ns.flbas & 0xf, 0);
    assert_eq!(1usize << ns.lbaf[0].lbads, BS, "LBA format 0");

    // An I/O queue on its own connection, for this controller.
    let mut q = io_queue(NQN, cntlid, 1, false);

    // 4 KiB in the capsule at LBA 0; 64 KiB through R2T in two H2C data PDUs at LBA 8.
    let small = pattern(0x11, 4096);
    assert_ok(
        &q.cmd_icd(rw(opc::WRITE, 1, 0, 8), &small),
        "Write in-capsule",
    );
    let big = pattern(0x22, 65536);
    assert_ok(
        &q.cmd_r2t(rw(opc::WRITE, 1, 8, 128), &big, 2, false),
        "Write through R2T",
    );
    assert_eq!(read(&mut q, 0, 8), small, "4 KiB read back");
    assert_eq!(read(&mut q, 8, 128), big, "64 KiB read back");
    let both = read(&mut q, 0, 136);
    assert_eq!(&both[..4096], &small[..]);
    assert_eq!(&both[4096..], &big[..]);

    let mut s = Sqe::new(opc::FLUSH, 0);
    s.set_nsid(1);
    assert_ok(&q.cmd(s), "Flush");

    assert_ok(&q.cmd(rw(opc::WRITE_ZEROES, 1, 0, 8)), "Write Zeroes");
    assert_eq!(read(&mut q, 0, 8), vec![0u8; 4096], "zeroes read back");
    assert_eq!(read(&mut q, 8, 8), big[..4096], "the next blocks untouched");

    let mut s = Sqe::new(opc::DATASET_MANAGEMENT, 0);
    s.set_nsid(1);
    s.set_cdw(10, 0);
    s.set_cdw(11, DsmRange::AD);
    let mut range = [0u8; 16];
    DsmRange {
        attributes: 0,
        nlb: 128,
        slba: 8,
    }
    .encode(&mut range);
    assert_ok(&q.cmd_icd(s, &range), "DSM deallocate");
    // The malloc bdev zeroes what is deallocated.
    assert_eq!(
        read(&mut q, 8, 128),
        vec![0u8; 65536],
        "deallocated blocks read as zeroes"
    );

    assert_ok(&a.cmd(Sqe::new(admin::KEEP_ALIVE, 0)), "Keep Alive");
}

/// The same data path with header and data digests (CRC32C) on both queues.
#[test]
fn digests() {
    let _g = shared();
    // Header and data digests on both queues: every PDU from the target is checked by `recv`.
    let (mut a, cntlid) = controller(NQN, true, 0);
    let (c, d) = a.cmd_in(identify(cns::CTRLR, 0), 4096);
    assert_ok(&c, "Identify with digests");
    assert_eq!(CtrlrData::decode(&d).unwrap().cntlid, cntlid);
    let mut q = io_queue(NQN, cntlid, 1, true);
    let small = pattern(0x33, 4096);
    assert_ok(
        &q.cmd_icd(rw(opc::WRITE, 1, 1000, 8), &small),
        "Write in-capsule with digests",
    );
    let big = pattern(0x44, 65536);
    assert_ok(
        &q.cmd_r2t(rw(opc::WRITE, 1, 1008, 128), &big, 2, false),
        "Write through R2T with digests",
    );
    assert_eq!(read(&mut q, 1000, 8), small);
    assert_eq!(read(&mut q, 1008, 128), big);
    assert_ok(&a.cmd(Sqe::new(admin::KEEP_ALIVE, 0)), "Keep Alive");
}

// ---------------------------------------------------------------------------------------------------------------
// Bad PDUs: a C2HTermReq naming the error, then the connection closes
// ---------------------------------------------------------------------------------------------------------------

/// Sends `pdu` (on a connection past ICReq when `after_ic`) and expects the termination request; returns the
/// length of its quote.
fn bad_pdu(
    what: &str,
    hdgst: bool,
    after_ic: bool,
    pdu: &[u8],
    want_fes: u16,
    want_fei: u32,
) -> usize {
    let mut h = if after_ic {
        Host::ready(hdgst, false)
    } else {
        Host::tcp()
    };
    h.send(pdu);
    let quoted = h.expect_term(want_fes, want_fei, pdu, what);
    assert_serving();
    quoted
}

fn ic_req(pfv: u16, hpda: u8) -> Vec<u8> {
    let mut b = vec![0u8; IC_HLEN];
    IcReq {
        pfv,
        hpda,
        ..Default::default()
    }
    .encode(&mut b);
    b
}

/// A capsule (no data, no digests) with its common header fields overridden.
fn raw_capsule(hlen: u8, pdo: u8, plen: u32, data: usize) -> Vec<u8> {
    let mut b = vec![0u8; (plen as usize).max(CAPSULE_CMD_HLEN + data)];
    Ch {
        ty: pdu_type::CAPSULE_CMD,
        flags: 0,
        hlen,
        pdo,
        plen,
    }
    .encode(&mut b);
    let mut s = Sqe::new(admin::KEEP_ALIVE, 1);
    s.set_sgl1(&sgl_icd(data as u32));
    b[CH_LEN..CAPSULE_CMD_HLEN].copy_from_slice(&s.0);
    b
}

/// Bad PDUs, each on its own connection: the C2HTermReq the spec names, then the end of the connection.
#[test]
fn bad_pdus() {
    let _g = shared();
    const FEI_FLAGS: u32 = 1;
    const FEI_HLEN: u32 = 2;
    const FEI_PDO: u32 = 3;
    const FEI_PLEN: u32 = 4;
    let bad = fes::INVALID_HEADER_FIELD;

    // ICReq fields. These are checked once the whole header is in, so it is all quoted back.
    let quoted = bad_pdu("ICReq PFV 1", false, false, &ic_req(1, 0), bad, 8);
    assert_eq!(quoted, IC_HLEN, "the whole ICReq quoted");
    bad_pdu("ICReq HPDA 32", false, false, &ic_req(0, 32), bad, 10);
    let mut b = ic_req(0, 0);
    b[1] = flags::HDGSTF;
    bad_pdu("ICReq with a digest flag", false, false, &b, bad, FEI_FLAGS);
    let mut b = ic_req(0, 0);
    b.extend_from_slice(&[0; 4]);
    b[4..8].copy_from_slice(&(IC_HLEN as u32 + 4).to_le_bytes());
    bad_pdu("ICReq with data", false, false, &b, bad, FEI_PLEN);

    // Out of sequence: a second ICReq; a command or data before ICReq.
    bad_pdu(
        "second ICReq",
        false,
        true,
        &ic_req(0, 0),
        fes::PDU_SEQUENCE_ERROR,
        0,
    );
    bad_pdu(
        "CapsuleCmd before ICReq",
        false,
        false,
        &raw_capsule(72, 0, 72, 0),
        fes::PDU_SEQUENCE_ERROR,
        0,
    );
    let mut h2c = vec![0u8; DATA_HLEN + 8];
    DataHdr {
        len: 8,
        ..Default::default()
    }
    .encode(
        pdu_type::H2C_DATA,
        flags::LAST_PDU,
        DATA_HLEN as u8,
        (DATA_HLEN + 8) as u32,
        &mut h2c,
    );
    bad_pdu(
        "H2CData before ICReq",
        false,
        false,
        &h2c,
        fes::PDU_SEQUENCE_ERROR,
        0,
    );

    // Common header fields.
    bad_pdu(
        "wrong hlen",
        false,
        true,
        &raw_capsule(70, 0, 72, 0),
        bad,
        FEI_HLEN,
    );
    bad_pdu(
        "plen smaller than the header",
        false,
        true,
        &raw_capsule(72, 0, 64, 0),
        bad,
        FEI_PLEN,
    );
    bad_pdu(
        "pdo inside the header",
        false,
        true,
        &raw_capsule(72, 40, 72 + 512, 512),
        bad,
        FEI_PDO,
    );
    bad_pdu(
        "pdo not dword aligned",
        false,
        true,
        &raw_capsule(72, 74, 74 + 512, 512),
        bad,
        FEI_PDO,
    );
    for ty in [0x0b, 0x7f, pdu_type::CAPSULE_RESP, pdu_type::R2T] {
        let mut b = vec![0u8; DATA_HLEN];
        Ch {
            ty,
            flags: 0,
            hlen: DATA_HLEN as u8,
            pdo: 0,
            plen: DATA_HLEN as u32,
        }
        .encode(&mut b);
        bad_pdu(&format!("PDU type {ty:#x}"), false, true, &b, bad, 0);
    }

    // Header digests: missing when negotiated, or wrong.
    bad_pdu(
        "no header digest",
        true,
        true,
        &raw_capsule(72, 0, 72, 0),
        bad,
        FEI_FLAGS,
    );
    let mut b = raw_capsule(72, 0, 76, 0);
    b[1] = flags::HDGSTF;
    let c = crc32c(&b[..72]) ^ 0x8000_0000;
    b[72..76].copy_from_slice(&c.to_le_bytes());
    bad_pdu(
        "header digest mismatch",
        true,
        true,
        &b,
        fes::HDGST_ERROR,
        0,
    );

    // In-capsule data over the 8 KiB the admin queue takes (before and after Connect) and over an I/O queue's
    // 4 KiB.
    let n = 8192 + 512;
    let big = raw_capsule(72, 72, (72 + n) as u32, n);
    bad_pdu(
        "9 KiB in-capsule data before Connect",
        false,
        true,
        &big,
        fes::DATA_TRANSFER_LIMIT_EXCEEDED,
        0,
    );
    let (mut a, cntlid) = controller(NQN, false, 0);
    a.send(&big);
    a.expect_term(
        fes::DATA_TRANSFER_LIMIT_EXCEEDED,
        0,
        &big,
        "9 KiB in-capsule data on the admin queue",
    );
    let (_a, cntlid2) = controller(NQN, false, 0);
    assert_ne!(cntlid, cntlid2);
    let mut q = io_queue(NQN, cntlid2, 1, false);
    let mut s = rw(opc::WRITE, 1, 2000, 9);
    s.set_sgl1(&sgl_icd(4608));
    let h = q.capsule_bytes(&s, &[7u8; 4608], false);
    q.send(&h);
    q.expect_term(
        fes::DATA_TRANSFER_LIMIT_EXCEEDED,
        0,
        &h,
        "4.5 KiB in-capsule data on an I/O queue",
    );

    // More commands outstanding than the queue has entries (writes waiting for their data hold theirs).
    let mut q = io_queue(NQN, cntlid2, 1, false);
    for _ in 0..QD {
        let mut s = rw(opc::WRITE, 1, 2000, 8);
        s.set_cid(q.cid());
        s.set_sgl1(&sgl_transport(4096));
        let b = q.capsule_bytes(&s, &[], false);
        q.send(&b);
        assert!(matches!(q.recv(), Pdu::R2t(_)), "R2T");
    }
    let mut s = rw(opc::WRITE, 1, 2000, 8);
    s.set_cid(q.cid());
    s.set_sgl1(&sgl_transport(4096));
    let b = q.capsule_bytes(&s, &[], false);
    q.send(&b);
    q.expect_term(fes::PDU_SEQUENCE_ERROR, 0, &b, "one command too many");
    assert_serving();
}

/// An I/O queue with a 4 KiB write waiting for its data: the queue, the write's cid and the R2T's ttag.
fn awaiting_h2c() -> (Host, Host, u16, u16) {
    let (a, cntlid) = controller(NQN, false, 0);
    let mut q = io_queue(NQN, cntlid, 1, false);
    let cid = q.cid();
    let mut s = rw(opc::WRITE, 1, 2100, 8);
    s.set_cid(cid);
    s.set_sgl1(&sgl_transport(4096));
    let b = q.capsule_bytes(&s, &[], false);
    q.send(&b);
    match q.recv() {
        Pdu::R2t(r) => {
            assert_eq!((r.cccid, r.offset, r.len), (cid, 0, 4096));
            (a, q, cid, r.ttag)
        }
        p => panic!("expected R2T, got {p:?}"),
    }
}

/// Makes a bad H2C data header for (the write's cid, the R2T's ttag), and the bytes of data the PDU carries.
type ForgeH2c = fn(u16, u16) -> (DataHdr, usize);

/// H2C data that does not fit the transfer it names (each case on its own write waiting for data).
#[test]
fn bad_h2c_data() {
    let _g = shared();
    let cases: [(&str, ForgeH2c, u16, u32); 6] = [
        (
            "unknown ttag",
            |cid, _| (h2c(cid, 0x7fff, 0, 4096), 4096),
            fes::INVALID_HEADER_FIELD,
            DataHdr::FEI_TTAG,
        ),
        (
            "ttag of a command awaiting no data",
            |cid, ttag| (h2c(cid, ttag ^ 1, 0, 4096), 4096),
            fes::INVALID_HEADER_FIELD,
            DataHdr::FEI_TTAG,
        ),
        (
            "wrong cccid",
            |cid, ttag| (h2c(cid ^ 0x100, ttag, 0, 4096), 4096),
            fes::INVALID_HEADER_FIELD,
            DataHdr::FEI_CCCID,
        ),
        (
            "wrong offset",
            |cid, ttag| (h2c(cid, ttag, 512, 512), 512),
            fes::DATA_TRANSFER_OUT_OF_RANGE,
            0,
        ),
        (
            "more data than the command's transfer",
            |cid, ttag| (h2c(cid, ttag, 0, 8192), 8192),
            fes::DATA_TRANSFER_OUT_OF_RANGE,
            0,
        ),
        (
            "DATAL not what the PDU carries",
            |cid, ttag| (h2c(cid, ttag, 0, 2048), 1024),
            fes::INVALID_HEADER_FIELD,
            DataHdr::FEI_LEN,
        ),
    ];
    for (what, make, want_fes, want_fei) in cases {
        let (_a, mut q, cid, ttag) = awaiting_h2c();
        let (d, carried) = make(cid, ttag);
        let b = q.h2c_bytes(d, true, &vec![0xa5; carried], false);
        q.send(&b);
        let quoted = q.expect_term(want_fes, want_fei, &b, what);
        assert_eq!(
            quoted, DATA_HLEN,
            "{what}: the H2C data header quoted, not its data"
        );
        assert_serving();
    }
}

fn h2c(cccid: u16, ttag: u16, offset: u32, len: u32) -> DataHdr {
    DataHdr {
        cccid,
        ttag,
        offset,
        len,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Bad commands: an NVMe status, and the connection goes on
// ---------------------------------------------------------------------------------------------------------------

/// The TLS listener: each host's PSK (SHA-256 and SHA-384 suites) carries an admin queue and an I/O queue (a
/// write through R2T/H2C read back in C2H data); a host may connect only as the host its PSK identity names;
/// NVMe/TCP in the clear, an unknown identity and a wrong key get the connection closed; the target serves on.
#[test]
fn tls_listener() {
    let _g = shared();
    for (host, k, slba) in [(TLS_HOST, 1, 0u64), (TLS_HOST2, 2, 64)] {
        let key = tls_key(k);
        let mut admin = Host::tls(host, &key).expect("handshake");
        admin.ic(true, true);
        let c = connect_admin(&mut admin, NQN_TLS, host, 0);
        assert_ok(&c, "admin Connect over TLS");
        let cntlid = c.dw0 as u16;
        enable(&mut admin);
        let mut q = Host::tls(host, &key).expect("handshake");
        q.ic(false, true);
        let c = q.cmd_icd(
            connect_sqe(1, QD - 1, 0),
            &connect_data(cntlid, NQN_TLS, host),
        );
        assert_ok(&c, "I/O queue Connect over TLS");
        // 64 KiB: more than one TLS record each way.
        let data = pattern(k, 128 * BS);
        let c = q.cmd_r2t(rw(opc::WRITE, 1, slba, 128), &data, 3, false);
        assert_ok(&c, "Write over TLS");
        assert!(read(&mut q, slba, 128) == data, "data read back over TLS");
    }
    // TLS_HOST's PSK, Connect as TLS_HOST2 (allowed, with a PSK of its own): refused.
    let mut h = Host::tls(TLS_HOST, &tls_key(1)).expect("handshake");
    h.ic(false, false);
    let c = connect_admin(&mut h, NQN_TLS, TLS_HOST2, 0);
    assert_status(
        &c,
        sct::COMMAND_SPECIFIC,
        specific::FABRIC_INVALID_HOST,
        "Connect as another host",
    );
    // Plain NVMe/TCP at the TLS listener: the ICReq is no ClientHello.
    let mut plain = TcpStream::connect(("127.0.0.1", target().tls_port)).unwrap();
    plain.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    plain.write_all(&ic_req(0, 0)).unwrap();
    let mut b = [0u8; 64];
    let n = plain.read(&mut b).unwrap_or(0);
    // At most a TLS alert record, then the end.
    assert!(
        n == 0 || b[0] == 21,
        "answer to a plain ICReq: {:?}",
        &b[..n]
    );
    // An identity the subsystem does not know, and a wrong key for a known one.
    let e = Host::tls(HOSTNQN, &tls_key(1))
        .err()
        .expect("unknown identity refused");
    assert!(e.contains("alert"), "{e}");
    let wrong = nvme_tls::ConfiguredPsk::new(vec![1; 32], 1).unwrap();
    let e = Host::tls(TLS_HOST, &wrong)
        .err()
        .expect("wrong key refused");
    assert!(e.contains("alert"), "{e}");
    assert_serving();
}

/// Connects the target must refuse, with the status and the parameter's place (IATTR/IPO) in dword 0; the
/// connection stays usable for a good Connect after them.
#[test]
fn bad_connects() {
    let _g = shared();
    let invalid_param = specific::FABRIC_INVALID_PARAM;
    let mut h = Host::ready(false, false);
    // Property Get before Connect.
    let c = h.cmd(prop_get(reg::CAP, true));
    assert_status(
        &c,
        sct::GENERIC,
        generic::COMMAND_SEQUENCE_ERROR,
        "Property Get before Connect",
    );
    // Unknown subsystem: invalid parameter in the data (IATTR 1) at SUBNQN (IPO 256).
    let c = connect_admin(&mut h, "nqn.2016-06.io.spdk:nope", HOSTNQN, 0);
    assert_status(&c, sct::COMMAND_SPECIFIC, invalid_param, "unknown NQN");
    assert_eq!(c.dw0, 1 << 16 | 256, "IATTR 1, IPO 256");
    // A host the subsystem does not allow.
    let c = connect_admin(&mut h, NQN_LOCKED, HOSTNQN, 0);
    assert_status(
        &c,
        sct::COMMAND_SPECIFIC,
        specific::FABRIC_INVALID_HOST,
        "host not allowed",
    );
    // SQSIZE 0 and beyond the transport's queue depth: invalid parameter in the command (IATTR 0) at 44.
    for sqsize in [0, QD, 0xffff] {
        let c = h.cmd_icd(
            connect_sqe(0, sqsize, 0),
            &connect_data(0xffff, NQN, HOSTNQN),
        );
        assert_status(&c, sct::COMMAND_SPECIFIC, invalid_param, "SQSIZE");
        assert_eq!(c.dw0, 44, "SQSIZE {sqsize}: IATTR 0, IPO 44");
    }
    // A static controller id on an admin queue (only the dynamic model is supported): CNTLID at 16.
    let c = h.cmd_icd(connect_sqe(0, QD - 1, 0), &connect_data(5, NQN, HOSTNQN));
    assert_status(&c, sct::COMMAND_SPECIFIC, invalid_param, "admin CNTLID");
    assert_eq!(c.dw0, 1 << 16 | 16);
    // Connect data shorter than 1024 bytes.
    let c = h.cmd_icd(connect_sqe(0, QD - 1, 0), &[0u8; 512]);
    assert_status(
        &c,
        sct::GENERIC,
        generic::INVALID_FIELD,
        "short Connect data",
    );
    // The same connection still connects, as the allowed host.
    let c = connect_admin(&mut h, NQN_LOCKED, ALLOWED_HOST, 0);
    assert_ok(&c, "Connect as the allowed host");
    let c = connect_admin(&mut h, NQN, HOSTNQN, 0);
    assert_status(
        &c,
        sct::GENERIC,
        generic::COMMAND_SEQUENCE_ERROR,
        "second Connect",
    );

    // I/O queues: before the controller is enabled (QID, IPO 42), for an unknown controller, from another
    // host.
    let mut a = Host::ready(false, false);
    let c = connect_admin(&mut a, NQN, HOSTNQN, 0);
    assert_ok(&c, "admin Connect");
    let cntlid = c.dw0 as u16;
    let mut q = Host::ready(false, false);
    let c = q.cmd_icd(
        connect_sqe(1, QD - 1, 0),
        &connect_data(cntlid, NQN, HOSTNQN),
    );
    assert_status(
        &c,
        sct::COMMAND_SPECIFIC,
        invalid_param,
        "I/O Connect before CC.EN",
    );
    assert_eq!(c.dw0, 42);
    enable(&mut a);
    let c = q.cmd_icd(
        connect_sqe(1, QD - 1, 0),
        &connect_data(0x7ff0, NQN, HOSTNQN),
    );
    assert_status(&c, sct::COMMAND_SPECIFIC, invalid_param, "unknown cntlid");
    assert_eq!(c.dw0, 1 << 16 | 16, "IATTR 1, IPO 16 (CNTLID)");
    let c = q.cmd_icd(
        connect_sqe(1, QD - 1, 0),
        &connect_data(cntlid, NQN, ALLOWED_HOST),
    );
    assert_status(
        &c,
        sct::COMMAND_SPECIFIC,
        invalid_param,
        "another host's controller",
    );
    assert_eq!(c.dw0, 1 << 16 | 512, "IATTR 1, IPO 512 (HOSTNQN)");
    let c = q.cmd_icd(connect_sqe(1, QD, 0), &connect_data(cntlid, NQN, HOSTNQN));
    assert_status(&c, sct::COMMAND_SPECIFIC, invalid_param, "I/O SQSIZE");
    assert_eq!(c.dw0, 44);
    let c = q.cmd_icd(
        connect_sqe(1, QD - 1, 0),
        &connect_data(cntlid, NQN, HOSTNQN),
    );
    assert_ok(&c, "I/O Connect after the refusals");
    assert_eq!(read(&mut q, 0, 1).len(), BS);
    // A second queue with the same QID.
    let mut q2 = Host::ready(false, false);
    let c = q2.cmd_icd(
        connect_sqe(1, QD - 1, 0),
        &connect_data(cntlid, NQN, HOSTNQN),
    );
    assert_status(&c, sct::COMMAND_SPECIFIC, invalid_param, "duplicate QID");
}

/// Admin and NVM commands the target must refuse with their NVMe status, the queues going on.
#[test]
fn bad_commands() {
    let _g = shared();
    let mut a = Host::ready(false, false);
    let c = connect_admin(&mut a, NQN, HOSTNQN, 0);
    assert_ok(&c, "admin Connect");
    let cntlid = c.dw0 as u16;
    // Admin commands before CC.EN.
    let (c, _) = a.cmd_in(identify(cns::CTRLR, 0), 4096);
    assert_status(
        &c,
        sct::GENERIC,
        generic::COMMAND_SEQUENCE_ERROR,
        "Identify before CC.EN",
    );
    let c = a.cmd(Sqe::new(admin::KEEP_ALIVE, 0));
    assert_status(
        &c,
        sct::GENERIC,
        generic::COMMAND_SEQUENCE_ERROR,
        "Keep Alive before CC.EN",
    );
    enable(&mut a);
    // Opcodes a fabrics controller does not have, or nobody has.
    for op in [
        admin::CREATE_IO_SQ,
        admin::DELETE_IO_CQ,
        admin::FORMAT_NVM,
        0xc1,
    ] {
        let c = a.cmd(Sqe::new(op, 0));
        assert_status(
            &c,
            sct::GENERIC,
            generic::INVALID_OPCODE,
            &format!("admin opcode {op:#x}"),
        );
    }
    let mut s = Sqe::new(FABRICS, 0);
    s.0[4] = fctype::DISCONNECT + 0x30;
    assert_status(
        &a.cmd(s),
        sct::GENERIC,
        generic::INVALID_OPCODE,
        "unknown fabrics type",
    );
    // Identify into less than 4 KiB, and of namespace 0.
    let (c, d) = a.cmd_in(identify(cns::CTRLR, 0), 1024);
    assert_status(
        &c,
        sct::GENERIC,
        generic::INVALID_FIELD,
        "Identify into 1 KiB",
    );
    assert!(d.is_empty(), "no data with a failed Identify");
    let (c, _) = a.cmd_in(identify(cns::NS, 0), 4096);
    assert_status(
        &c,
        sct::GENERIC,
        generic::INVALID_NAMESPACE_OR_FORMAT,
        "Identify NS 0",
    );
    // Get Log Page asking for more than its buffer.
    let mut s = get_log_page(lid::HEALTH, 8192);
    s.set_sgl1(&sgl_transport(512));
    let (c, _) = a.cmd_in(s, 512);
    assert_status(
        &c,
        sct::GENERIC,
        generic::INVALID_FIELD,
        "Get Log Page beyond its buffer",
    );

    let mut q = io_queue(NQN, cntlid, 1, false);
    let (c, _) = q.cmd_in(rw(opc::READ, 1, NS_BLOCKS - 1, 2), 1024);
    assert_status(
        &c,
        sct::GENERIC,
        generic::LBA_OUT_OF_RANGE,
        "Read past the end",
    );
    assert!(c.status.dnr, "DNR on LBA out of range");
    let (c, _) = q.cmd_in(rw(opc::READ, 1, u64::MAX, 1), 512);
    assert_status(
        &c,
        sct::GENERIC,
        generic::LBA_OUT_OF_RANGE,
        "SLBA wrapping around",
    );
    for nsid in [0, 99, 0xffff_ffff] {
        let (c, _) = q.cmd_in(rw(opc::READ, nsid, 0, 1), 512);
        assert_status(
            &c,
            sct::GENERIC,
            generic::INVALID_NAMESPACE_OR_FORMAT,
            &format!("Read of namespace {nsid}"),
        );
    }
    let (c, _) = q.cmd_in(rw(opc::READ, 1, 0, 264), MAX_IO + 4096);
    assert_status(
        &c,
        sct::GENERIC,
        generic::DATA_SGL_LENGTH_INVALID,
        "transfer over MDTS",
    );
    let (c, _) = q.cmd_in(rw(opc::READ, 1, 0, 8), 2048);
    assert_status(
        &c,
        sct::GENERIC,
        generic::DATA_SGL_LENGTH_INVALID,
        "SGL shorter than the blocks",
    );
    // SGL descriptors TCP does not take: keyed (RDMA), a segment; with and without in-capsule data.
    for ty in [
        sgl::TYPE_KEYED_DATA_BLOCK,
        sgl::TYPE_SEGMENT,
        sgl::TYPE_BIT_BUCKET,
    ] {
        let mut s = rw(opc::WRITE, 1, 2000, 8);
        let cid = q.cid();
        s.set_cid(cid);
        s.set_flags(0, psdt::SGL_MPTR_CONTIG);
        s.set_sgl1(&SglDesc {
            addr: 0,
            len: 4096,
            key: 0,
            ty,
            subtype: 0,
        });
        let b = q.capsule_bytes(&s, &[], false);
        q.send(&b);
        let c = q.resp(cid);
        assert_status(
            &c,
            sct::GENERIC,
            generic::SGL_DESCRIPTOR_TYPE_INVALID,
            "SGL type",
        );
        let b = q.capsule_bytes(&s, &[1u8; 4096], false);
        q.send(&b);
        let c = q.resp(cid);
        assert_status(
            &c,
            sct::GENERIC,
            generic::SGL_DESCRIPTOR_TYPE_INVALID,
            "SGL type with in-capsule data",
        );
    }
    // In-capsule data that the SGL describes wrongly: another length, an offset.
    let mut s = rw(opc::WRITE, 1, 2000, 8);
    let cid = q.cid();
    s.set_cid(cid);
    s.set_sgl1(&sgl_icd(2048));
    let b = q.capsule_bytes(&s, &[2u8; 4096], false);
    q.send(&b);
    let c = q.resp(cid);
    assert_status(
        &c,
        sct::GENERIC,
        generic::DATA_SGL_LENGTH_INVALID,
        "in-capsule length",
    );
    let mut d = sgl_icd(4096);
    d.addr = 16;
    s.set_sgl1(&d);
    let b = q.capsule_bytes(&s, &[2u8; 4096], false);
    q.send(&b);
    let c = q.resp(cid);
    assert_status(
        &c,
        sct::GENERIC,
        generic::INVALID_SGL_OFFSET,
        "in-capsule offset",
    );
    // An opcode the NVM command set does not have; a fused first command that is not a Compare.
    let c = q.cmd(rw(0x7c, 1, 0, 1));
    assert_status(&c, sct::GENERIC, generic::INVALID_OPCODE, "I/O opcode 0x7c");
    let mut s = rw(opc::READ, 1, 0, 1);
    let cid = q.cid();
    s.set_cid(cid);
    s.set_flags(1, psdt::SGL_MPTR_CONTIG);
    s.set_sgl1(&sgl_transport(512));
    let b = q.capsule_bytes(&s, &[], false);
    q.send(&b);
    assert_status(
        &q.resp(cid),
        sct::GENERIC,
        generic::INVALID_OPCODE,
        "fused Read",
    );
    // Both queues still work.
    let data = pattern(0x55, 4096);
    assert_ok(
        &q.cmd_icd(rw(opc::WRITE, 1, 2000, 8), &data),
        "Write after the refusals",
    );
    assert_eq!(read(&mut q, 2000, 8), data);
    let (c, _) = a.cmd_in(identify(cns::CTRLR, 0), 4096);
    assert_ok(&c, "Identify after the refusals");
}

/// A wrong data digest fails its command (transient transport error) without writing, and nothing else.
#[test]
fn data_digest_error() {
    let _g = shared();
    let (_a, cntlid) = controller(NQN, true, 0);
    let mut q = io_queue(NQN, cntlid, 1, true);
    let good = pattern(0x66, 8192);
    assert_ok(
        &q.cmd_icd(rw(opc::WRITE, 1, 3000, 8), &good[..4096]),
        "Write",
    );
    assert_ok(
        &q.cmd_r2t(rw(opc::WRITE, 1, 3008, 8), &good[4096..], 1, false),
        "Write",
    );
    // A wrong data digest: transient transport error, the command is not executed, the connection stays.
    let other = pattern(0x77, 4096);
    let c = q.cmd_icd_digest(rw(opc::WRITE, 1, 3000, 8), &other, true);
    assert_status(
        &c,
        sct::GENERIC,
        generic::TRANSIENT_TRANSPORT_ERROR,
        "in-capsule data digest",
    );
    let c = q.cmd_r2t(rw(opc::WRITE, 1, 3008, 8), &other, 2, true);
    assert_status(
        &c,
        sct::GENERIC,
        generic::TRANSIENT_TRANSPORT_ERROR,
        "H2C data digest",
    );
    assert_eq!(read(&mut q, 3000, 16), good, "nothing written");
    assert_ok(
        &q.cmd_r2t(rw(opc::WRITE, 1, 3000, 8), &other, 2, false),
        "Write after the digest errors",
    );
    assert_eq!(read(&mut q, 3000, 8), other);
}

// ---------------------------------------------------------------------------------------------------------------
// Asynchronous events, keep alive
// ---------------------------------------------------------------------------------------------------------------

/// An outstanding AER completes when a namespace is added, and the Changed Namespace List names it.
#[test]
fn namespace_added_raises_an_event() {
    let _g = shared();
    let (mut a, _) = controller(NQN_AEN, false, 0);
    let mut s = Sqe::new(admin::GET_FEATURES, 0);
    s.set_cdw(10, feat::ASYNC_EVENT_CONFIGURATION as u32);
    let c = a.cmd(s);
    assert_ok(&c, "Get Features AEC");
    assert!(c.dw0 & 1 << 8 != 0, "namespace attribute notices enabled");
    let (_, d) = a.cmd_in(identify(cns::ACTIVE_NS_LIST, 0), 4096);
    assert_eq!(decode_ns_list(&d).unwrap(), vec![1]);

    // Park an AER; a later command is answered first (the AER stays outstanding).
    let aer = park_aer(&mut a);
    assert_ok(&a.cmd(Sqe::new(admin::KEEP_ALIVE, 0)), "Keep Alive");

    let nsid = on_app(|tx| {
        mgmt::add_ns(NQN_AEN, NamespaceParams::new("ForgedAen2"), move |r| {
            let _ = tx.send(r.map_err(|e| e.to_string()));
        })
    })
    .expect("namespace added");
    assert_eq!(nsid, 2);

    // Notice (type 2), namespace attribute changed (info 0), Changed Namespace List (log 04h).
    let c = a.resp(aer);
    assert_ok(&c, "AER");
    assert_eq!(c.dw0, 0x0004_0002, "AER dword 0");
    let (c, d) = a.cmd_in(get_log_page(lid::CHANGED_NS_LIST, 4096), 4096);
    assert_ok(&c, "Get Log Page 04h");
    assert_eq!(
        decode_changed_ns_list(&d).unwrap(),
        ChangedNsList::List(vec![2])
    );
    let (_, d) = a.cmd_in(identify(cns::ACTIVE_NS_LIST, 0), 4096);
    assert_eq!(decode_ns_list(&d).unwrap(), vec![1, 2]);
    let (c, d) = a.cmd_in(identify(cns::NS, 2), 4096);
    assert_ok(&c, "Identify Namespace 2");
    assert_eq!(NsData::decode(&d).unwrap().nsze, AEN_NS_BLOCKS);
    // Reading the log cleared it.
    let (_, d) = a.cmd_in(get_log_page(lid::CHANGED_NS_LIST, 4096), 4096);
    assert_eq!(
        decode_changed_ns_list(&d).unwrap(),
        ChangedNsList::List(vec![])
    );
}

/// A KATO shorter than 10 s is taken as 10 s.
#[test]
fn keep_alive_timeout_rounds_up() {
    let _g = shared();
    // SPDK's rounding: KATO in whole KAS (100 ms) x 100 units, i.e. 1 ms becomes 10 s.
    let (mut a, _) = controller(NQN, false, 1);
    let mut s = Sqe::new(admin::GET_FEATURES, 0);
    s.set_cdw(10, feat::KEEP_ALIVE_TIMER as u32);
    let c = a.cmd(s);
    assert_ok(&c, "Get Features KATO");
    assert_eq!(c.dw0, 10_000);
}

/// A controller whose host sends no Keep Alive loses its queues once KATO (1 ms, rounded to 10 s) passes.
#[test]
#[ignore = "takes 10-20 s: a KATO rounds up to 10 s"]
fn keep_alive_expiry() {
    let _g = shared();
    let t0 = Instant::now();
    let (mut a, cntlid) = controller(NQN, false, 1);
    let mut q = io_queue(NQN, cntlid, 1, false);
    for h in [&mut a, &mut q] {
        h.sock
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        h.expect_closed("keep alive expiry");
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(9),
        "closed after {waited:?}, before KATO"
    );
    assert_serving();
}

/// No more AERs outstanding than Identify's AERL allows.
#[test]
fn asynchronous_event_request_limit() {
    let _g = shared();
    let (mut a, _) = controller(NQN, false, 0);
    let (c, d) = a.cmd_in(identify(cns::CTRLR, 0), 4096);
    assert_ok(&c, "Identify Controller");
    let aerl = CtrlrData::decode(&d).unwrap().aerl as usize;
    // AERL is 0-based: AERL + 1 requests may be outstanding; one more is refused.
    for _ in 0..=aerl {
        let mut s = Sqe::new(admin::ASYNC_EVENT_REQUEST, a.cid());
        s.set_flags(0, psdt::SGL_MPTR_CONTIG);
        let b = a.capsule_bytes(&s, &[], false);
        a.send(&b);
    }
    let c = a.cmd(Sqe::new(admin::ASYNC_EVENT_REQUEST, 0));
    assert_status(
        &c,
        sct::COMMAND_SPECIFIC,
        specific::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED,
        "one AER too many",
    );
    assert_ok(&a.cmd(Sqe::new(admin::KEEP_ALIVE, 0)), "Keep Alive");
}

// ---------------------------------------------------------------------------------------------------------------
// Controller state
// ---------------------------------------------------------------------------------------------------------------

/// CC.SHN and CC.EN=0 report themselves in CSTS and take the I/O queues down; so does losing the admin
/// queue.
#[test]
fn shutdown_and_disable_close_the_io_queues() {
    let _g = shared();
    // CC.SHN (normal shutdown): CSTS.SHST reports it complete, the I/O queues go.
    let (mut a, cntlid) = controller(NQN, false, 0);
    let mut q = io_queue(NQN, cntlid, 1, false);
    assert_ok(
        &a.cmd(prop_set(reg::CC, CC_ENABLE | 1 << cc::SHN_SHIFT)),
        "Property Set CC.SHN",
    );
    let c = a.cmd(prop_get(reg::CSTS, false));
    assert_eq!(
        (c.dw0 >> csts::SHST_SHIFT) & 3,
        csts::SHST_COMPLETE,
        "CSTS.SHST"
    );
    assert_eq!(c.dw0 & csts::RDY, 0, "not ready after shutdown");
    q.expect_closed("I/O queue after shutdown");
    // And CC.EN cleared on another controller.
    let (mut a, cntlid) = controller(NQN, false, 0);
    let mut q = io_queue(NQN, cntlid, 1, false);
    assert_ok(&a.cmd(prop_set(reg::CC, 0)), "Property Set CC.EN=0");
    q.expect_closed("I/O queue after disable");
    let c = a.cmd(prop_get(reg::CSTS, false));
    assert_eq!(c.dw0 & csts::RDY, 0);
    // The admin queue's end is the controller's: its I/O queues close too.
    let (a, cntlid) = controller(NQN, false, 0);
    let mut q = io_queue(NQN, cntlid, 1, false);
    drop(a);
    q.expect_closed("I/O queue after its admin queue");
    assert_serving();
}

/// The discovery controller: KATO default, Identify, the log of what this host may reach, no I/O queues.
#[test]
fn discovery() {
    let _g = shared();
    use nvme_proto::fabrics::DISCOVERY_NQN;
    use nvme_proto::log::{DiscoveryEntry, DiscoveryLogHeader};
    // The discovery subsystem answers at any listener; a KATO of 0 becomes SPDK's 2 minutes.
    let (mut a, _) = controller(DISCOVERY_NQN, false, 0);
    let mut s = Sqe::new(admin::GET_FEATURES, 0);
    s.set_cdw(10, feat::KEEP_ALIVE_TIMER as u32);
    assert_eq!(a.cmd(s).dw0, 120_000, "discovery KATO");
    let (c, d) = a.cmd_in(identify(cns::CTRLR, 0), 4096);
    assert_ok(&c, "Identify discovery controller");
    let id = CtrlrData::decode(&d).unwrap();
    assert_eq!(padded_str(&id.subnqn).unwrap(), DISCOVERY_NQN);
    let (c, _) = a.cmd_in(identify(cns::NS, 1), 4096);
    assert_status(
        &c,
        sct::GENERIC,
        generic::INVALID_FIELD,
        "Identify NS on discovery",
    );
    // The host sees the subsystems it may connect to, at this port.
    let (c, d) = a.cmd_in(get_log_page(lid::DISCOVERY, 4096), 4096);
    assert_ok(&c, "discovery log");
    let hdr = DiscoveryLogHeader::decode(&d[..1024]).unwrap();
    assert_eq!(hdr.numrec, 2, "NQN and NQN_AEN, not the locked one");
    let mut nqns: Vec<String> = (0..2)
        .map(|i| {
            let e = DiscoveryEntry::decode(&d[1024 * (i + 1)..1024 * (i + 2)]).unwrap();
            assert_eq!(padded_str(&e.trsvcid).unwrap(), target().port.to_string());
            padded_str(&e.subnqn).unwrap().to_string()
        })
        .collect();
    nqns.sort();
    assert_eq!(nqns, vec![NQN.to_string(), NQN_AEN.to_string()]);
    // I/O commands are not for a discovery controller.
    assert_status(
        &a.cmd(Sqe::new(admin::SET_FEATURES, 0)),
        sct::GENERIC,
        generic::INVALID_FIELD,
        "Set Features arbitration on discovery",
    );
    let mut q = Host::ready(false, false);
    let c = q.cmd_icd(
        connect_sqe(1, QD - 1, 0),
        &connect_data(id.cntlid, DISCOVERY_NQN, HOSTNQN),
    );
    assert_status(
        &c,
        sct::COMMAND_SPECIFIC,
        specific::FABRIC_INVALID_PARAM,
        "I/O queue on discovery",
    );
}

/// Non-zero HPDA/CPDA: padded data both ways, and data off the alignment refused.
#[test]
fn data_alignment() {
    let _g = shared();
    // HPDA 3: data on 16-byte boundaries both ways (the target asks the same of the host), with digests so
    // the padding sits between the header digest and the data.
    let (mut a, cntlid) = {
        let mut h = Host::tcp();
        h.ic_aligned(true, true, 3);
        let c = connect_admin(&mut h, NQN, HOSTNQN, 0);
        assert_ok(&c, "admin Connect with padded data");
        let cntlid = c.dw0 as u16;
        enable(&mut h);
        (h, cntlid)
    };
    let (c, _) = a.cmd_in(identify(cns::CTRLR, 0), 4096);
    assert_ok(&c, "Identify with padded C2H data");
    let mut q = Host::tcp();
    q.ic_aligned(false, false, 31);
    // Connect data through R2T and H2C data this time.
    let mut s = connect_sqe(1, QD - 1, 0);
    let c = q.cmd_r2t(s, &connect_data(cntlid, NQN, HOSTNQN), 1, false);
    assert_ok(&c, "I/O Connect with its data through R2T");
    let data = pattern(0xdd, 8192);
    assert_ok(
        &q.cmd_icd(rw(opc::WRITE, 1, 6700, 8), &data[..4096]),
        "Write in-capsule, 128-byte aligned",
    );
    assert_ok(
        &q.cmd_r2t(rw(opc::WRITE, 1, 6708, 8), &data[4096..], 2, false),
        "Write through R2T, 128-byte aligned",
    );
    assert_eq!(read(&mut q, 6700, 16), data);
    // Data where the alignment does not put it: the PDO field is wrong.
    s = rw(opc::WRITE, 1, 6700, 8);
    s.set_sgl1(&sgl_icd(512));
    q.pda = 0;
    let b = q.capsule_bytes(&s, &[0u8; 512], false);
    q.send(&b);
    q.expect_term(
        fes::INVALID_HEADER_FIELD,
        3,
        &b,
        "misaligned in-capsule data",
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Stream handling: PDUs in pieces, many PDUs in one read
// ---------------------------------------------------------------------------------------------------------------

impl Host {
    /// Sends `b` in pieces cut at `cuts`, pausing between them so each arrives on its own.
    fn send_in_pieces(&mut self, b: &[u8], cuts: &[usize]) {
        let mut at = 0;
        for &c in cuts.iter().chain([&b.len()]) {
            let c = c.min(b.len());
            if c > at {
                self.send(&b[at..c]);
                at = c;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// PDUs cut inside every part (header, digests, data) still make their commands.
#[test]
fn pdus_in_pieces() {
    let _g = shared();
    let (_a, cntlid) = controller(NQN, true, 0);
    let mut q = io_queue(NQN, cntlid, 1, true);
    // A capsule with digests and in-capsule data, cut inside every part: common header, SQE, header digest,
    // data, data digest.
    let data = pattern(0xbb, 4096);
    let cid = q.cid();
    let mut s = rw(opc::WRITE, 1, 6600, 8);
    s.set_cid(cid);
    s.set_sgl1(&sgl_icd(4096));
    let b = q.capsule_bytes(&s, &data, false);
    q.send_in_pieces(&b, &[1, 7, 9, 71, 73, 75, 77, 1000, 4170, b.len() - 2]);
    assert_ok(&q.resp(cid), "Write sent in pieces");
    // H2C data the same way.
    let big = pattern(0xcc, 16384);
    let cid = q.cid();
    let mut s = rw(opc::WRITE, 1, 6608, 32);
    s.set_cid(cid);
    s.set_sgl1(&sgl_transport(16384));
    let b = q.capsule_bytes(&s, &[], false);
    q.send_in_pieces(&b, &[3, 40]);
    let Pdu::R2t(r) = q.recv() else {
        panic!("expected R2T")
    };
    let b = q.h2c_bytes(h2c(cid, r.ttag, 0, 16384), true, &big, false);
    q.send_in_pieces(&b, &[2, 23, 25, 27, 29, 5000, 16000, b.len() - 1]);
    assert_ok(&q.resp(cid), "H2C data sent in pieces");
    assert_eq!(read(&mut q, 6600, 8), data);
    assert_eq!(read(&mut q, 6608, 32), big);
}

/// Many PDUs in one send (beyond the target's receive buffer), and several R2Ts outstanding at once.
#[test]
fn pipelined_commands() {
    let _g = shared();
    let (_a, cntlid) = controller(NQN, false, 0);
    let mut q = io_queue(NQN, cntlid, 1, false);
    let n = QD as u64 - 1;
    // 31 writes with 4 KiB in-capsule data in one send: more than the target's 64 KiB receive buffer.
    let mut all = Vec::new();
    let mut want = std::collections::HashMap::new();
    for i in 0..n {
        let cid = q.cid();
        let mut s = rw(opc::WRITE, 1, 7000 + i * 8, 8);
        s.set_cid(cid);
        s.set_sgl1(&sgl_icd(4096));
        let d = pattern(i as u8, 4096);
        all.extend(q.capsule_bytes(&s, &d, false));
        want.insert(cid, d);
    }
    q.send(&all);
    for _ in 0..n {
        match q.recv() {
            Pdu::Resp(c) => {
                assert_ok(&c, "pipelined Write");
                assert!(
                    want.contains_key(&c.cid),
                    "answer for an unknown cid {}",
                    c.cid
                );
            }
            p => panic!("expected a response, got {p:?}"),
        }
    }
    // 31 reads in one send; their data may come back in any order.
    let mut all = Vec::new();
    let mut expect = std::collections::HashMap::new();
    for (i, d) in (0..n).map(|i| (i, pattern(i as u8, 4096))) {
        let cid = q.cid();
        let mut s = rw(opc::READ, 1, 7000 + i * 8, 8);
        s.set_cid(cid);
        s.set_sgl1(&sgl_transport(4096));
        all.extend(q.capsule_bytes(&s, &[], false));
        expect.insert(cid, d);
    }
    q.send(&all);
    let mut got = std::collections::HashMap::new();
    while got.len() < n as usize {
        match q.recv() {
            Pdu::C2h {
                hdr,
                flags: f,
                data,
            } => {
                assert_eq!((hdr.offset, hdr.len), (0, 4096));
                got.insert(hdr.cccid, data);
                if f & flags::SUCCESS == 0 {
                    assert_ok(&q.resp(hdr.cccid), "pipelined Read");
                }
            }
            p => panic!("expected C2H data, got {p:?}"),
        }
    }
    assert_eq!(got, expect, "every read returned its blocks");
    // Eight writes through R2T outstanding at once, their data sent in the reverse order of the R2Ts.
    let mut all = Vec::new();
    let mut data = std::collections::HashMap::new();
    for i in 0..8u64 {
        let cid = q.cid();
        let mut s = rw(opc::WRITE, 1, 7400 + i * 32, 32);
        s.set_cid(cid);
        s.set_sgl1(&sgl_transport(16384));
        all.extend(q.capsule_bytes(&s, &[], false));
        data.insert(cid, (7400 + i * 32, pattern(0x80 | i as u8, 16384)));
    }
    q.send(&all);
    let mut r2ts: Vec<DataHdr> = (0..8)
        .map(|_| match q.recv() {
            Pdu::R2t(r) => r,
            p => panic!("expected R2T, got {p:?}"),
        })
        .collect();
    let mut ttags: Vec<u16> = r2ts.iter().map(|r| r.ttag).collect();
    ttags.sort();
    ttags.dedup();
    assert_eq!(ttags.len(), 8, "a transfer tag per outstanding R2T");
    r2ts.reverse();
    for r in &r2ts {
        let (_, d) = &data[&r.cccid];
        let b = q.h2c_bytes(h2c(r.cccid, r.ttag, 0, 16384), true, d, false);
        q.send(&b);
    }
    for _ in 0..8 {
        match q.recv() {
            Pdu::Resp(c) => assert_ok(&c, "R2T write"),
            p => panic!("expected a response, got {p:?}"),
        }
    }
    for (slba, d) in data.values() {
        assert_eq!(&read(&mut q, *slba, 32), d);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Resources
// ---------------------------------------------------------------------------------------------------------------

/// Hosts that go in the middle of a transfer leave no buffer or queue pair behind.
#[test]
fn disconnect_mid_transfer_leaks_nothing() {
    let _g = exclusive();
    wait_quiet();

    // Half of a 64 KiB H2C data PDU, then the host goes.
    {
        let (_a, cntlid) = controller(NQN, false, 0);
        let mut q = io_queue(NQN, cntlid, 1, false);
        let cid = q.cid();
        let mut s = rw(opc::WRITE, 1, 4000, 128);
        s.set_cid(cid);
        s.set_sgl1(&sgl_transport(65536));
        let b = q.capsule_bytes(&s, &[], false);
        q.send(&b);
        let Pdu::R2t(r) = q.recv() else {
            panic!("expected R2T")
        };
        let data = pattern(0x88, 65536);
        let b = q.h2c_bytes(h2c(cid, r.ttag, 0, 65536), true, &data, false);
        q.send(&b[..DATA_HLEN + 32768]);
        // The write holds a buffer until its data is in.
        wait_usage("write awaiting data", |u| u.iter().any(|&(b, _)| b >= 1));
    }
    wait_quiet();

    // The first of two H2C data PDUs, then the host goes.
    {
        let (_a, cntlid) = controller(NQN, false, 0);
        let mut q = io_queue(NQN, cntlid, 1, false);
        let cid = q.cid();
        let mut s = rw(opc::WRITE, 1, 4000, 128);
        s.set_cid(cid);
        s.set_sgl1(&sgl_transport(65536));
        let b = q.capsule_bytes(&s, &[], false);
        q.send(&b);
        let Pdu::R2t(r) = q.recv() else {
            panic!("expected R2T")
        };
        let b = q.h2c_bytes(h2c(cid, r.ttag, 0, 32768), false, &[1; 32768], false);
        q.send(&b);
    }
    wait_quiet();

    // Half of a capsule's in-capsule data; and reads whose data nobody collects.
    {
        let (_a, cntlid) = controller(NQN, false, 0);
        let mut q = io_queue(NQN, cntlid, 1, false);
        let mut s = rw(opc::WRITE, 1, 4000, 8);
        s.set_cid(q.cid());
        s.set_sgl1(&sgl_icd(4096));
        let b = q.capsule_bytes(&s, &[3; 4096], false);
        q.send(&b[..CAPSULE_CMD_HLEN + 2048]);
        let mut r = Host::ready(false, false);
        let c = r.cmd_icd(
            connect_sqe(2, QD - 1, 0),
            &connect_data(cntlid, NQN, HOSTNQN),
        );
        assert_ok(&c, "I/O Connect");
        for i in 0..(QD as u64 - 1) {
            let mut s = rw(opc::READ, 1, 4000 + i * 256, 256);
            s.set_cid(r.cid());
            s.set_sgl1(&sgl_transport(MAX_IO));
            let b = r.capsule_bytes(&s, &[], false);
            r.send(&b);
        }
    }
    wait_quiet();

    // All of it came back, and the target serves as before.
    assert_serving();
    let (_a, cntlid) = controller(NQN, false, 0);
    let mut q = io_queue(NQN, cntlid, 1, false);
    let data = pattern(0x99, 65536);
    assert_ok(
        &q.cmd_r2t(rw(opc::WRITE, 1, 4000, 128), &data, 2, false),
        "Write after the disconnects",
    );
    assert_eq!(read(&mut q, 4000, 128), data);
}

/// Every buffer of both poll groups held by writes waiting for their data: a command with in-capsule data still
/// runs at once (each command slot has its own in-capsule buffer, as in SPDK, so a buffer hog cannot hold up
/// Connects or small writes), while a write that needs a shared buffer for its R2T waits, and runs once one is
/// free.
#[test]
fn command_waiting_for_a_buffer_runs_when_one_frees() {
    let _g = exclusive();
    wait_quiet();
    let (_va, vcntlid) = controller(NQN, false, 0);
    let mut victim = io_queue(NQN, vcntlid, 1, false);

    // Writes through R2T, never given their data, until no poll group has a buffer left. Connections alternate
    // between the two poll groups, so eight queues of 31 writes take every one of the 2 x 64 buffers.
    let (hog_admin, hcntlid) = controller(NQN, false, 0);
    let mut hogs: Vec<Host> = (1..=8u16)
        .map(|qid| io_queue(NQN, hcntlid, qid, false))
        .collect();
    for h in &mut hogs {
        for _ in 0..QD - 1 {
            let mut s = rw(opc::WRITE, 1, 5000, 8);
            s.set_cid(h.cid());
            s.set_sgl1(&sgl_transport(4096));
            let b = h.capsule_bytes(&s, &[], false);
            h.send(&b);
        }
    }
    wait_usage("every buffer taken", |u| u.iter().all(|&(b, _)| b == BUFS));

    // In-capsule data: answered at once, buffers or not.
    let data = pattern(0xaa, 4096);
    assert_ok(
        &victim.cmd_icd(rw(opc::WRITE, 1, 5000, 8), &data),
        "in-capsule Write with every shared buffer taken",
    );
    // A write through R2T needs a shared buffer: no R2T yet.
    let more = pattern(0xbb, 4096);
    let mut s = rw(opc::WRITE, 1, 5008, 8);
    let cid = victim.cid();
    s.set_cid(cid);
    s.set_sgl1(&sgl_transport(4096));
    let b = victim.capsule_bytes(&s, &[], false);
    victim.send(&b);
    victim
        .sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut one = [0u8; 1];
    match victim.sock.peek(&mut one) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        r => panic!("a command without a buffer answered: {r:?}"),
    }
    victim.sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();

    // The hogs go; their buffers come back and the waiting command gets its R2T.
    drop(hogs);
    drop(hog_admin);
    let r2t = match victim.recv() {
        Pdu::R2t(r) => r,
        p => panic!("expected R2T, got {p:?}"),
    };
    assert_eq!((r2t.cccid, r2t.len), (cid, 4096));
    let b = victim.h2c_bytes(
        DataHdr {
            cccid: cid,
            ttag: r2t.ttag,
            offset: 0,
            len: 4096,
        },
        true,
        &more,
        false,
    );
    victim.send(&b);
    assert_ok(&victim.resp(cid), "Write that waited for a buffer");
    assert_eq!(read(&mut victim, 5000, 8), data);
    assert_eq!(read(&mut victim, 5008, 8), more);
    drop(victim);
    drop(_va);
    wait_quiet();
}

// ---------------------------------------------------------------------------------------------------------------
// Random input
// ---------------------------------------------------------------------------------------------------------------

/// Junk for a connection past ICReq: raw bytes, a common header with random fields, a well-formed capsule
/// around a random command, or a plausible NVM command with random fields (on an I/O queue of the locked
/// subsystem, whose namespace nobody else reads).
fn junk() -> impl Strategy<Value = Vec<u8>> {
    let raw = prop::collection::vec(any::<u8>(), 1..600);
    let header = (
        prop_oneof![0u8..12, any::<u8>()],
        any::<u8>(),
        prop_oneof![Just(24u8), Just(72u8), Just(128u8), any::<u8>()],
        any::<u8>(),
        prop_oneof![0u32..300, 0u32..200_000, any::<u32>()],
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(ty, fl, hlen, pdo, plen, body)| {
            let mut b = vec![0u8; CH_LEN];
            Ch {
                ty,
                flags: fl,
                hlen,
                pdo,
                plen,
            }
            .encode(&mut b);
            b.extend(body);
            b
        });
    let any_sqe = prop::collection::vec(any::<u8>(), 64).prop_map(|v| {
        let mut s = Sqe::default();
        s.0.copy_from_slice(&v);
        s
    });
    let nvm_sqe = (
        prop::sample::select(vec![
            opc::FLUSH,
            opc::WRITE,
            opc::READ,
            opc::COMPARE,
            opc::WRITE_ZEROES,
            opc::DATASET_MANAGEMENT,
            opc::VERIFY,
        ]),
        prop_oneof![Just(1u32), any::<u32>()],
        prop_oneof![0u64..AEN_NS_BLOCKS + 8, any::<u64>()],
        any::<u32>(),
        any::<u32>(),
        prop_oneof![Just(0u8), any::<u8>()],
        prop_oneof![0u32..16384, any::<u32>()],
    )
        .prop_map(|(op, nsid, slba, cdw10_12, cdw11, fl, xfer)| {
            let mut s = Sqe::new(op, 0);
            s.set_nsid(nsid);
            s.0[1] = fl;
            s.set_cdw(10, slba as u32);
            s.set_cdw(11, (slba >> 32) as u32);
            // Few blocks mostly; DSM: its range count and attributes.
            s.set_cdw(12, cdw10_12 & 0x1f);
            if op == opc::DATASET_MANAGEMENT {
                s.set_cdw(10, cdw10_12 & 0xff);
                s.set_cdw(11, cdw11);
            }
            s.set_sgl1(&sgl_transport(xfer));
            s
        });
    let capsule = (
        prop_oneof![any_sqe, nvm_sqe],
        prop::collection::vec(any::<u8>(), 0..1100),
        0u8..3,
    )
        .prop_map(|(mut s, icd, sgl_kind)| {
            // Keep the SGL as drawn, or describe the in-capsule data, or ask for the data through R2T.
            match sgl_kind {
                0 => {}
                1 => s.set_sgl1(&sgl_icd(icd.len() as u32)),
                _ => s.set_sgl1(&sgl_transport(s.sgl1().len % 8192)),
            }
            let plen = CAPSULE_CMD_HLEN + icd.len();
            let mut b = vec![0u8; plen];
            Ch {
                ty: pdu_type::CAPSULE_CMD,
                flags: 0,
                hlen: CAPSULE_CMD_HLEN as u8,
                pdo: if icd.is_empty() {
                    0
                } else {
                    CAPSULE_CMD_HLEN as u8
                },
                plen: plen as u32,
            }
            .encode(&mut b);
            b[CH_LEN..CAPSULE_CMD_HLEN].copy_from_slice(&s.0);
            b[CAPSULE_CMD_HLEN..].copy_from_slice(&icd);
            b
        });
    prop_oneof![
        1 => raw,
        1 => header,
        2 => prop::collection::vec(capsule, 1..4).prop_map(|v| v.concat()),
    ]
}

/// Where the random input goes.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// A connection past ICReq, nothing else.
    Bare,
    /// An enabled controller's admin queue.
    Admin,
    /// An I/O queue of a controller of [`NQN_LOCKED`] (its own namespace).
    Io,
}

/// Cases of the PDU-stream property: 64 in `cargo test`, `PROPTEST_CASES` for longer runs by hand.
fn stream_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: stream_cases(), ..ProptestConfig::default() })]

    /// Random input after a valid ICReq (on a bare connection, an admin queue or an I/O queue) gets answers
    /// that parse or a termination; once the host hangs up the target closes its side, and it still serves
    /// new connections.
    #[test]
    fn random_input_after_icreq(
        junk in junk(),
        mode in prop::sample::select(vec![Mode::Bare, Mode::Admin, Mode::Io]),
    ) {
        let _g = shared();
        // The admin queue of an I/O queue stays open until the end of the case.
        let mut _admin = None;
        let mut h = match mode {
            Mode::Bare => Host::ready(false, false),
            Mode::Admin => controller(NQN, false, 0).0,
            Mode::Io => {
                let (a, cntlid) = controller_as(NQN_LOCKED, ALLOWED_HOST, false, 0);
                _admin = Some(a);
                io_queue_as(NQN_LOCKED, ALLOWED_HOST, cntlid, 1, false)
            }
        };
        // The target may already have given up on us: a failed write is fine.
        let _ = h.s.write_all(&junk);
        let _ = h.sock.shutdown(Shutdown::Write);
        let end = Instant::now() + IO_TIMEOUT;
        loop {
            prop_assert!(Instant::now() < end, "the target kept the connection open");
            let mut chb = [0u8; CH_LEN];
            match h.s.read(&mut chb[..1]) {
                Ok(0) => break,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!("waiting for the target to close: {e}"),
                Ok(_) => {}
            }
            // A PDU: it must be one a controller sends, and well formed.
            if h.s.read_exact(&mut chb[1..]).is_err() {
                break;
            }
            let ch = Ch::decode(&chb);
            prop_assert!(
                matches!(ch.ty, pdu_type::CAPSULE_RESP | pdu_type::C2H_DATA | pdu_type::R2T | pdu_type::C2H_TERM_REQ),
                "PDU type {:#x}", ch.ty
            );
            prop_assert!(ch.plen as usize >= ch.hlen as usize && ch.plen <= MAX_IO + 256);
            let mut rest = vec![0u8; ch.plen as usize - CH_LEN];
            if h.s.read_exact(&mut rest).is_err() {
                break;
            }
        }
        drop(h);
        assert_serving();
    }
}

/// Sends command `sqe` (fuse bits `fuse`) with `data` in the capsule, without waiting: its command id.
fn send_icd(q: &mut Host, mut sqe: Sqe, fuse: u8, data: &[u8]) -> u16 {
    let cid = q.cid();
    sqe.set_cid(cid);
    sqe.set_flags(fuse, psdt::SGL_MPTR_CONTIG);
    sqe.set_sgl1(&sgl_icd(data.len() as u32));
    let b = q.capsule_bytes(&sqe, data, false);
    q.send(&b);
    cid
}

/// Sends an Asynchronous Event Request, left outstanding: its command id.
fn park_aer(a: &mut Host) -> u16 {
    let aer = a.cid();
    let mut s = Sqe::new(admin::ASYNC_EVENT_REQUEST, aer);
    s.set_flags(0, psdt::SGL_MPTR_CONTIG);
    let b = a.capsule_bytes(&s, &[], false);
    a.send(&b);
    aer
}

/// Sends a fused Compare (`cmp`) + Write (`data`) of 8 blocks at `slba`, both with in-capsule data, and returns
/// their responses in that order.
fn fused_compare_write(q: &mut Host, slba: u64, cmp: &[u8], data: &[u8]) -> (Cqe, Cqe) {
    let c1 = send_icd(q, rw(opc::COMPARE, 1, slba, 8), 1, cmp);
    let c2 = send_icd(q, rw(opc::WRITE, 1, slba, 8), 2, data);
    // The Compare's response comes first: both complete together, the first of the pair first.
    let r1 = q.resp(c1);
    let r2 = q.resp(c2);
    (r1, r2)
}

/// Fused Compare and Write (compare-and-write): written only when the compare matched, and answered as SPDK
/// answers the pair; a first without its second is aborted.
#[test]
fn fused_compare_and_write() {
    let _g = shared();
    let (_a, cntlid) = controller(NQN, false, 0);
    let mut q = io_queue(NQN, cntlid, 1, false);
    let old = pattern(0x21, 4096);
    let new = pattern(0x42, 4096);
    assert_ok(&q.cmd_icd(rw(opc::WRITE, 1, 5000, 8), &old), "Write");
    // A compare that does not match: the Compare fails (compare failure), the Write is "failed fused".
    let (r1, r2) = fused_compare_write(&mut q, 5000, &new, &new);
    assert_status(
        &r1,
        sct::MEDIA,
        media::COMPARE_FAILURE,
        "fused Compare, no match",
    );
    assert_status(
        &r2,
        sct::GENERIC,
        generic::ABORTED_FAILED_FUSED,
        "fused Write, no match",
    );
    assert_eq!(read(&mut q, 5000, 8), old, "nothing written");
    // A matching compare: both succeed and the new data is there.
    let (r1, r2) = fused_compare_write(&mut q, 5000, &old, &new);
    assert_ok(&r1, "fused Compare");
    assert_ok(&r2, "fused Write");
    assert_eq!(read(&mut q, 5000, 8), new);
    // A first without a second: aborted (missing fused) when the next, ordinary command arrives.
    let c1 = send_icd(&mut q, rw(opc::COMPARE, 1, 5000, 8), 1, &new);
    let c2 = q.cid();
    let mut flush = Sqe::new(opc::FLUSH, c2);
    flush.set_nsid(1);
    let b = q.capsule_bytes(&flush, &[], false);
    q.send(&b);
    let r1 = q.resp(c1);
    assert_status(
        &r1,
        sct::GENERIC,
        generic::ABORTED_MISSING_FUSED,
        "lone first",
    );
    assert_ok(&q.resp(c2), "the Flush after it");
    // A second without a first.
    let c3 = send_icd(&mut q, rw(opc::WRITE, 1, 5000, 8), 2, &old);
    assert_status(
        &q.resp(c3),
        sct::GENERIC,
        generic::ABORTED_MISSING_FUSED,
        "lone second",
    );
    assert_eq!(
        read(&mut q, 5000, 8),
        new,
        "nothing written by the refused commands"
    );
}

/// A namespace added `no_auto_visible` is not there for a host until `nvmf_ns_add_host` makes it visible to
/// it (Identify lists it, I/O reaches it), and gone again after `nvmf_ns_remove_host`.
#[test]
fn namespace_visibility_per_host() {
    let _g = exclusive();
    const HIDDEN: u32 = 7;
    on_app(|tx| {
        let made = malloc::create(MallocOpts {
            name: Some("ForgedHidden".into()),
            num_blocks: 2048,
            block_size: 512,
            ..Default::default()
        });
        if let Err(e) = made {
            let _ = tx.send(Err(e.to_string()));
            return;
        }
        let mut p = NamespaceParams::new("ForgedHidden");
        p.nsid = HIDDEN;
        p.no_auto_visible = true;
        mgmt::add_ns(NQN, p, move |r| {
            let _ = tx.send(r.map_err(|e| e.to_string()));
        })
    })
    .expect("hidden namespace added");
    let visibility = |visible: bool| {
        on_app(move |tx| {
            mgmt::ns_visibility(NQN, HIDDEN, HOSTNQN, visible, move |r| {
                let _ = tx.send(r.map_err(|e| e.to_string()));
            })
        })
        .expect("visibility changed")
    };
    let (mut a, cntlid) = controller(NQN, false, 0);
    let mut q = io_queue(NQN, cntlid, 1, false);
    let listed = |a: &mut Host| {
        let (_, d) = a.cmd_in(identify(cns::ACTIVE_NS_LIST, 0), 4096);
        decode_ns_list(&d).unwrap().contains(&HIDDEN)
    };
    assert!(!listed(&mut a), "hidden at first");
    let c = q.cmd_in(rw(opc::READ, HIDDEN, 0, 1), 512).0;
    assert_status(
        &c,
        sct::GENERIC,
        generic::INVALID_NAMESPACE_OR_FORMAT,
        "read of a hidden namespace",
    );
    visibility(true);
    assert!(listed(&mut a), "visible once added for this host");
    let data = pattern(0x77, 4096);
    assert_ok(
        &q.cmd_icd(rw(opc::WRITE, HIDDEN, 8, 8), &data),
        "write to the visible namespace",
    );
    let (c, got) = q.cmd_in(rw(opc::READ, HIDDEN, 8, 8), 4096);
    assert_ok(&c, "read back");
    assert_eq!(got, data);
    visibility(false);
    assert!(!listed(&mut a), "hidden again");
    let c = q.cmd_in(rw(opc::READ, HIDDEN, 8, 8), 4096).0;
    assert_status(
        &c,
        sct::GENERIC,
        generic::INVALID_NAMESPACE_OR_FORMAT,
        "read after removal",
    );
    // Leave the shared subsystem as the other tests expect it.
    on_app(|tx| {
        mgmt::remove_ns(NQN, HIDDEN, move |r| {
            let _ = tx.send(r.map_err(|e| e.to_string()));
        })
    })
    .expect("namespace removed");
}

fn abort_cmd(sqid: u16, cid: u16) -> Sqe {
    let mut s = Sqe::new(admin::ABORT, 0);
    s.set_cdw(10, sqid as u32 | (cid as u32) << 16);
    s
}

/// Abort: a parked AER is aborted (it completes with "aborted by request", the Abort says aborted); a command
/// that is not waiting anywhere (or unknown, on the admin or an I/O queue) is not, and the Abort says so.
#[test]
fn abort_aer_and_unknown_commands() {
    let _g = shared();
    let (mut a, cntlid) = controller(NQN, false, 0);
    let _q = io_queue(NQN, cntlid, 1, false);
    let aer = park_aer(&mut a);
    let c = a.cmd(abort_cmd(0, aer));
    assert_ok(&c, "Abort of the AER");
    assert_eq!(c.dw0 & 1, 0, "the AER was aborted");
    assert_status(
        &a.resp(aer),
        sct::GENERIC,
        generic::ABORTED_BY_REQUEST,
        "aborted AER",
    );
    let c = a.cmd(abort_cmd(0, 0x7777));
    assert_ok(&c, "Abort of an unknown admin command");
    assert_eq!(c.dw0 & 1, 1, "nothing aborted");
    let c = a.cmd(abort_cmd(1, 0x7777));
    assert_ok(&c, "Abort of an unknown I/O command");
    assert_eq!(c.dw0 & 1, 1, "nothing aborted");
    let c = a.cmd(abort_cmd(9, 1));
    assert_eq!(c.dw0 & 1, 1, "no such queue");
}

/// Copy (one source range, format 0), opcodes no bdev here runs, and Abort of a command the bdev holds: on a
/// subsystem of its own whose namespace is an error bdev over malloc (the error bdev holds reads on demand).
#[test]
fn copy_abort_and_unknown_opcodes() {
    use bdev::modules::error::{self, ErrorType, InjectOpts};
    use nvme_proto::cmd::CopyRange;
    use nvme_proto::identify::{ocfs, oncs};
    const NQN_ABORT: &str = "nqn.2016-06.io.spdk:forged-abort";
    let _g = shared();
    on_app(|tx| {
        let made = malloc::create(MallocOpts {
            name: Some("ForgedAbortBase".into()),
            num_blocks: AEN_NS_BLOCKS,
            block_size: BS as u32,
            ..Default::default()
        })
        .and_then(|_| error::create("ForgedAbortBase", None));
        if let Err(e) = made {
            let _ = tx.send(Err(e.to_string()));
            return;
        }
        let mut o = NvmfCreateSubsystem::new(NQN_ABORT);
        o.serial_number = SERIAL.into();
        if let Err(e) = o.normalize(false, 4, 1024) {
            let _ = tx.send(Err(format!("{e:?}")));
            return;
        }
        mgmt::create_subsystem(o);
        // Only for the other host, so that the discovery log [`HOSTNQN`] reads stays as the other tests expect.
        let host: NvmfSubsystemAddHost =
            serde_json::from_value(serde_json::json!({ "nqn": NQN_ABORT, "host": ALLOWED_HOST }))
                .expect("add_host parameters");
        if let Err(e) = mgmt::add_host(host, None) {
            let _ = tx.send(Err(e.to_string()));
            return;
        }
        let trid = Trid::tcp("127.0.0.1", &target().port.to_string());
        let config = ListenerConfig {
            nqn: NQN_ABORT.into(),
            listen_address: trid.clone(),
            secure_channel: false,
            sock_impl: None,
        };
        if let Err(e) = mgmt::add_listener(NQN_ABORT, trid, AnaState::Optimized, config) {
            let _ = tx.send(Err(e.to_string()));
            return;
        }
        mgmt::add_ns(
            NQN_ABORT,
            NamespaceParams::new("EE_ForgedAbortBase"),
            move |r| {
                let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
            },
        );
    })
    .expect("abort subsystem");
    let (mut a, cntlid) = controller_as(NQN_ABORT, ALLOWED_HOST, false, 0);
    let (c, d) = a.cmd_in(identify(cns::CTRLR, 0), 4096);
    assert_ok(&c, "Identify Controller");
    let cd = CtrlrData::decode(&d).unwrap();
    assert!(cd.oncs & oncs::COPY != 0, "Copy in ONCS");
    assert_eq!(cd.ocfs, ocfs::FORMAT0, "copy format 0");
    let (_, d) = a.cmd_in(identify(cns::NS, 1), 4096);
    let nd = NsData::decode(&d).unwrap();
    // malloc copies itself: no length limit (SPDK's FFFFh), one source range.
    assert_eq!((nd.msrc, nd.mcl, nd.mssrl), (0, 0xffff, 0xffff));

    let mut q = io_queue_as(NQN_ABORT, ALLOWED_HOST, cntlid, 1, false);
    let data = pattern(0x5c, 8 * BS);
    assert_ok(&q.cmd_icd(rw(opc::WRITE, 1, 0, 8), &data), "Write");
    let copy = |sdlba: u64, nr: u32, format: u32| {
        let mut s = Sqe::new(opc::COPY, 0);
        s.set_nsid(1);
        s.set_cdw(10, sdlba as u32);
        s.set_cdw(11, (sdlba >> 32) as u32);
        s.set_cdw(12, nr | format << 8);
        s
    };
    let range = |slba: u64, blocks: u16| {
        let mut b = vec![0u8; CopyRange::SIZE];
        CopyRange {
            slba,
            nlb: blocks - 1,
        }
        .encode(&mut b);
        b
    };
    assert_ok(
        &q.cmd_icd(copy(100, 0, 0), &range(0, 8)),
        "Copy 0..8 to 100",
    );
    assert_eq!(read(&mut q, 100, 8), data, "copied blocks");
    // Bad copies: two ranges (one is the limit), the data not the ranges' size, another descriptor format,
    // a range off the end; none touches the namespace.
    let two = [range(0, 1), range(1, 1)].concat();
    let c = q.cmd_icd(copy(200, 1, 0), &two);
    assert_status(
        &c,
        sct::COMMAND_SPECIFIC,
        specific::COMMAND_SIZE_LIMIT_EXCEEDED,
        "two ranges",
    );
    let c = q.cmd_icd(copy(200, 0, 0), &two);
    assert_status(
        &c,
        sct::GENERIC,
        generic::DATA_SGL_LENGTH_INVALID,
        "data length",
    );
    let c = q.cmd_icd(copy(200, 0, 1), &range(0, 1));
    assert_status(&c, sct::GENERIC, generic::INVALID_FIELD, "format 1");
    let c = q.cmd_icd(copy(AEN_NS_BLOCKS - 2, 0, 0), &range(0, 8));
    assert_status(
        &c,
        sct::GENERIC,
        generic::LBA_OUT_OF_RANGE,
        "destination off the end",
    );
    let c = q.cmd_icd(copy(0, 0, 0), &range(AEN_NS_BLOCKS, 1));
    assert_status(
        &c,
        sct::GENERIC,
        generic::LBA_OUT_OF_RANGE,
        "source off the end",
    );
    assert_eq!(
        read(&mut q, 200, 1),
        vec![0u8; BS],
        "nothing written by refused copies"
    );
    // An opcode no bdev here runs (this bdev passes no NVMe commands through).
    let mut s = Sqe::new(0x7c, 0);
    s.set_nsid(1);
    assert_status(
        &q.cmd(s),
        sct::GENERIC,
        generic::INVALID_OPCODE,
        "unknown opcode",
    );

    // Abort of a read the error bdev holds: the read completes "aborted by request", the Abort says done.
    on_app(|tx| {
        let o = InjectOpts {
            num: 1,
            ..InjectOpts::new("read", ErrorType::Pending)
        };
        let _ = tx.send(error::inject_error("EE_ForgedAbortBase", o).map_err(|e| e.to_string()));
    })
    .expect("inject pending");
    let cid = q.cid();
    let mut s = rw(opc::READ, 1, 0, 8);
    s.set_cid(cid);
    s.set_flags(0, psdt::SGL_MPTR_CONTIG);
    s.set_sgl1(&sgl_transport(8 * BS as u32));
    let b = q.capsule_bytes(&s, &[], false);
    q.send(&b);
    std::thread::sleep(Duration::from_millis(50));
    let abort = |cid: u16| {
        let mut s = Sqe::new(admin::ABORT, 0);
        s.set_cdw(10, 1 | (cid as u32) << 16);
        s
    };
    let c = a.cmd(abort(cid));
    assert_ok(&c, "Abort");
    assert_eq!(c.dw0 & 1, 0, "the read was aborted");
    let c = q.resp(cid);
    assert_status(
        &c,
        sct::GENERIC,
        generic::ABORTED_BY_REQUEST,
        "aborted read",
    );
    // Nothing with that command identifier any more: not aborted.
    let c = a.cmd(abort(cid));
    assert_ok(&c, "second Abort");
    assert_eq!(c.dw0 & 1, 1, "nothing to abort");
    assert_eq!(read(&mut q, 0, 8), data, "the queue serves on");
}
