//! The NVMe/TCP transport (SPDK's `lib/nvmf/tcp.c`).
//!
//! - Listening sockets are polled for new connections by an acceptor poller on the app thread; each new
//!   connection goes to a poll group (round robin) by message, with its socket.
//! - A poll group ([`TcpGroup`]) watches its sockets with one epoll set and runs each ready connection: it reads
//!   what the socket has into the connection's receive buffer (large data straight into the command's buffer),
//!   parses PDUs, and writes what is queued with one `writev`.
//! - A connection ([`Conn`]) is one queue pair. Its command slots are fixed at creation (the transport's queue
//!   depth); a slot holds the command, its data buffer (from the poll group's cache, in-capsule data included)
//!   and its state until the response has been written. Nothing on this path allocates.
//!
//! Every length and offset in a PDU is checked ([`nvme_proto::tcp::check_header`] and the per-type checks
//! here) before it is used; a bad PDU gets a C2H termination request naming the field and the connection closes.
//! A bad command gets the NVMe status the spec names.

mod sys;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{ErrorKind as IoErrorKind, IoSlice};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex};

use bdev::IoHandle;
use nvme_proto::cmd::{sgl, Cqe, Sqe, FABRICS};
use nvme_proto::crc32c;
use nvme_proto::status::{generic, Status};
use nvme_proto::tcp::{
    self as pdu, check_header, encode_term_req, fes, flags, pdu_type, Ch, DataHdr, IcReq, IcResp,
    CAPSULE_CMD_HLEN, CAPSULE_RESP_HLEN, CH_LEN, DATA_HLEN, DIGEST_LEN, IC_HLEN,
};
use reactor::dma::DmaBuf;
use reactor::Poller;

use crate::error::{Error, Result};
use crate::pg::{self, Pg, QpKey, Qpair};
use crate::qpair::{Ident, Outcome, Session};
use crate::tgt::{self, Trid};
use crate::transport::{Transport, TransportOpts};

/// In-capsule data the admin queue always accepts (NVMe/TCP requires 8 KiB).
const ADMIN_ICD: u32 = 8192;
/// Receive buffer per connection: a few full capsules per read.
const RX_BUF: usize = 64 * 1024;
/// Largest termination request (header plus excerpt).
const TX_HDR: usize = DATA_HLEN + pdu::TERM_REQ_MAX_DATA + DIGEST_LEN;
/// Below this, data is copied out of the receive buffer; from here on it is read straight into the command's.
const DIRECT_READ_MIN: usize = 4096;
/// PDUs handled per connection per poll, so one busy host cannot starve the others.
const RX_BUDGET: usize = 64;

/// The TCP transport.
pub struct TcpTransport {
    opts: TransportOpts,
    params: crate::params::TransportOpts,
    /// Listening sockets; `true`: connections there use TLS (`secure_channel`).
    listeners: Mutex<Vec<(Trid, Arc<TcpListener>, bool)>>,
}

thread_local! {
    /// The acceptor poller, on the thread that created the transport.
    static ACCEPTOR: RefCell<Option<Poller>> = const { RefCell::new(None) };
}

impl TcpTransport {
    /// Creates the transport and its acceptor poller (on the current thread, every `acceptor_poll_rate` µs).
    pub fn create(params: crate::params::TransportOpts) -> Arc<TcpTransport> {
        let acceptor_poll_rate_us = params.acceptor_poll_rate as u64;
        let t = Arc::new(TcpTransport {
            opts: TransportOpts::from(&params),
            params,
            listeners: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&t);
        let p = Poller::register("nvmf_tcp_accept", acceptor_poll_rate_us, move || {
            weak.upgrade().is_some_and(|t| t.accept())
        });
        ACCEPTOR.with(|a| *a.borrow_mut() = Some(p));
        t
    }

    /// Accepts what is waiting on every listener and hands each connection to a poll group.
    fn accept(self: &Arc<Self>) -> bool {
        let ls: Vec<_> = reactor::lock(&self.listeners).clone();
        let mut any = false;
        for (trid, l, secure) in ls {
            loop {
                match l.accept() {
                    Ok((s, peer)) => {
                        any = true;
                        self.hand_off(s, peer, trid.clone(), secure);
                    }
                    Err(e) if e.kind() == IoErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::warn!("nvmf_tcp: accept on {}:{}: {e}", trid.traddr, trid.trsvcid);
                        break;
                    }
                }
            }
        }
        any
    }

    fn hand_off(self: &Arc<Self>, s: TcpStream, peer: SocketAddr, listen: Trid, secure: bool) {
        let _ = s.set_nodelay(true);
        if let Err(e) = s.set_nonblocking(true) {
            log::warn!("nvmf_tcp: {peer}: {e}");
            return;
        }
        let Some(pg) = tgt::tgt().next_poll_group() else {
            log::error!("nvmf_tcp: no poll group for {peer}");
            return;
        };
        log::info!(
            "nvmf_tcp: new connection from {peer} at {}:{} -> poll group {}",
            listen.traddr,
            listen.trsvcid,
            pg.id
        );
        pg.thread.send(move || {
            let Some(pg) = pg::current() else { return };
            match pg.group::<TcpGroup>() {
                Some(g) => g.add_conn(&pg, s, peer, listen, secure),
                None => log::error!("nvmf_tcp: poll group {} has no TCP part", pg.id),
            }
        });
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "TCP"
    }

    fn opts(&self) -> &TransportOpts {
        &self.opts
    }

    fn params(&self) -> &crate::params::TransportOpts {
        &self.params
    }

    fn listen(&self, trid: &Trid, secure: bool) -> Result<()> {
        let mut ls = reactor::lock(&self.listeners);
        if ls.iter().any(|(t, _, _)| t.same(trid)) {
            return Ok(());
        }
        let port: u16 = trid.trsvcid.parse().map_err(|_| {
            Error::new(
                crate::error::ErrorKind::Invalid,
                format!("invalid trsvcid {}", trid.trsvcid),
            )
        })?;
        let addr = if trid.adrfam == crate::tgt::AdrFam::Ipv6 {
            format!("[{}]:{port}", trid.traddr)
        } else {
            format!("{}:{port}", trid.traddr)
        };
        let l = TcpListener::bind(&addr)
            .map_err(|e| Error::os(e, format!("nvmf_tcp: listen on {addr}")))?;
        l.set_nonblocking(true)
            .map_err(|e| Error::os(e, format!("nvmf_tcp: listen on {addr}")))?;
        if secure {
            log::info!("TLS support is considered experimental");
        }
        log::info!(
            "*** NVMe/TCP Target Listening on {} port {port} ***",
            trid.traddr
        );
        ls.push((trid.clone(), Arc::new(l), secure));
        Ok(())
    }

    fn stop_listen(&self, trid: &Trid) {
        reactor::lock(&self.listeners).retain(|(t, _, _)| !t.same(trid));
    }

    fn poll_group_start(&self, pg: &Rc<Pg>) {
        match TcpGroup::new(&self.opts) {
            Ok(g) => pg.add_group(g),
            Err(e) => log::error!("nvmf_tcp: poll group {}: {e}", pg.id),
        }
    }

    fn shutdown(&self) {
        reactor::lock(&self.listeners).clear();
        ACCEPTOR.with(|a| a.borrow_mut().take());
    }
}

/// The TLS PSK for the identity a host offers on a `secure_channel` listener (`NVMe0R0X <hostnqn> <subnqn>`):
/// the subsystem must exist and hold a PSK for the host (`nvmf_subsystem_add_host --psk`) whose suite the
/// identity names.
fn find_psk(identity: &[u8]) -> Option<nvme_tls::TlsPsk> {
    let Some((suite, host, sub)) = nvme_tls::psk::parse_identity(identity) else {
        log::error!(
            "nvmf_tcp: unknown PSK identity format: {}",
            String::from_utf8_lossy(identity)
        );
        return None;
    };
    let subsys = tgt::tgt().find(sub);
    let key = subsys.and_then(|s| {
        let st = s.state();
        st.tls_psks
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, k)| k.clone())
    });
    let Some(key) = key else {
        log::error!("nvmf_tcp: unable to find PSK for identity: {host} {sub}");
        return None;
    };
    match key.tls_psk(host, sub) {
        Ok(p) if p.suite == suite => Some(p),
        Ok(p) => {
            log::error!(
                "nvmf_tcp: the PSK of {host} is for {}, the host asks for {}",
                p.suite.name(),
                suite.name()
            );
            None
        }
        Err(e) => {
            log::error!("nvmf_tcp: PSK of {host}: {e}");
            None
        }
    }
}

/// A poll group's TCP part: its epoll set, connections and data buffer cache.
pub struct TcpGroup {
    epoll: sys::Epoll,
    opts: TransportOpts,
    conns: RefCell<Vec<Rc<Conn>>>,
    /// Connections with work left over (buffered input, unsent output, commands waiting for a buffer).
    pending: RefCell<Vec<Rc<Conn>>>,
    bufs: RefCell<Vec<DmaBuf>>,
    bufs_out: Cell<u32>,
}

impl TcpGroup {
    fn new(opts: &TransportOpts) -> std::io::Result<Rc<TcpGroup>> {
        Ok(Rc::new(TcpGroup {
            epoll: sys::Epoll::new()?,
            opts: opts.clone(),
            conns: RefCell::new(Vec::new()),
            pending: RefCell::new(Vec::new()),
            bufs: RefCell::new(Vec::new()),
            bufs_out: Cell::new(0),
        }))
    }

    /// A data buffer of `max_io_size` bytes from the cache, or a new one while under the transport's limit.
    fn get_buf(&self) -> Option<DmaBuf> {
        if let Some(b) = self.bufs.borrow_mut().pop() {
            self.bufs_out.set(self.bufs_out.get() + 1);
            return Some(b);
        }
        let cap = self
            .opts
            .num_shared_buffers
            .max(self.opts.max_queue_depth as u32 * 2);
        if self.bufs_out.get() >= cap {
            return None;
        }
        let b = DmaBuf::alloc(self.opts.max_io_size.max(ADMIN_ICD) as usize).ok()?;
        self.bufs_out.set(self.bufs_out.get() + 1);
        Some(b)
    }

    /// Data buffers held by commands right now (a closed connection gives all of its back).
    pub fn buffers_in_use(&self) -> u32 {
        self.bufs_out.get()
    }

    fn put_buf(&self, b: DmaBuf) {
        self.bufs_out.set(self.bufs_out.get().saturating_sub(1));
        self.bufs.borrow_mut().push(b);
    }

    fn add_conn(
        self: &Rc<Self>,
        pg: &Rc<Pg>,
        s: TcpStream,
        peer: SocketAddr,
        listen: Trid,
        secure: bool,
    ) {
        let qd = self.opts.max_queue_depth.max(self.opts.max_aq_depth) as usize;
        let mut st = ConnState::new(qd);
        let fd = s.as_raw_fd();
        let io = if secure {
            st.phase = Phase::Tls;
            nvme_tls::Conn::Tls(Box::new(nvme_tls::TlsStream::server(s, Box::new(find_psk))))
        } else {
            nvme_tls::Conn::Plain(s)
        };
        let conn = Rc::new(Conn {
            key: Cell::new(0),
            group: Rc::downgrade(self),
            pg: Rc::downgrade(pg),
            fd,
            io: RefCell::new(io),
            peer,
            listen,
            queued: Cell::new(false),
            s: RefCell::new(st),
        });
        let key = pg.add_qpair(conn.clone());
        conn.key.set(key);
        if let Err(e) = self.epoll.add(conn.fd, key) {
            log::error!("nvmf_tcp: {peer}: epoll: {e}");
            pg.remove_qpair(key);
            return;
        }
        self.conns.borrow_mut().push(conn);
    }

    fn conn_by_key(&self, key: QpKey) -> Option<Rc<Conn>> {
        self.conns
            .borrow()
            .iter()
            .find(|c| c.key.get() == key)
            .cloned()
    }

    fn queue(&self, c: &Rc<Conn>) {
        if !c.queued.replace(true) {
            self.pending.borrow_mut().push(c.clone());
        }
    }

    /// One poll: ready sockets and connections with leftover work.
    fn poll_conns(&self) -> bool {
        let mut keys = [0u64; sys::MAX_EVENTS];
        let n = self.epoll.poll(&mut keys);
        for &k in &keys[..n] {
            if let Some(c) = self.conn_by_key(k) {
                self.queue(&c);
            }
        }
        let work: Vec<Rc<Conn>> = std::mem::take(&mut *self.pending.borrow_mut());
        let busy = !work.is_empty();
        for c in work {
            c.queued.set(false);
            c.run(self);
        }
        busy
    }

    /// Closes every connection (the poll group is stopping).
    fn close_all(&self) {
        let cs: Vec<_> = self.conns.borrow().clone();
        for c in cs {
            c.close("target shutting down");
        }
    }

    fn forget(&self, c: &Conn) {
        self.epoll.remove(c.fd);
        self.conns.borrow_mut().retain(|x| !std::ptr::eq(&**x, c));
    }
}

impl pg::TransportGroup for TcpGroup {
    fn name(&self) -> &'static str {
        "TCP"
    }

    fn poll(&self) -> bool {
        self.poll_conns()
    }

    fn shutdown(&self) {
        self.close_all()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// TLS handshake (a `secure_channel` listener).
    Tls,
    /// Waiting for ICReq.
    AwaitIcReq,
    /// Running.
    Ready,
    /// Closing: no more input; waits for outstanding bdev I/O, then goes.
    Closing,
    /// Gone.
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReqState {
    Free,
    /// Waiting for a data buffer.
    NeedBuf,
    /// Receiving in-capsule data.
    InCapsule,
    /// R2T sent, receiving H2C data.
    AwaitH2C,
    /// Running (bdev I/O outstanding, or an AER parked).
    Executing,
    /// Response queued; the slot frees when it has been written.
    Responding,
}

/// Data direction of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Xfer {
    None,
    H2C,
    C2H,
}

struct Req {
    state: ReqState,
    sqe: Sqe,
    xfer: Xfer,
    buf: Option<DmaBuf>,
    /// Transfer length.
    len: u32,
    /// H2C data received so far.
    recv: u32,
    /// Bdev I/Os outstanding.
    pending: u16,
    status: Status,
    dw0: u32,
    /// The data digest failed: the command completes with a transient transport error.
    digest_error: bool,
    /// This slot's own in-capsule data buffer while not lent to `buf` (as SPDK gives each request one), so
    /// in-capsule commands, Connect among them, never wait for the poll group's shared data buffers.
    icd: Option<DmaBuf>,
    /// `buf` is the slot's in-capsule buffer (goes back to `icd`, not to the poll group).
    buf_is_icd: bool,
}

impl Req {
    fn new() -> Req {
        Req {
            state: ReqState::Free,
            sqe: Sqe::default(),
            xfer: Xfer::None,
            buf: None,
            len: 0,
            recv: 0,
            pending: 0,
            icd: None,
            buf_is_icd: false,
            status: Status::SUCCESS,
            dw0: 0,
            digest_error: false,
        }
    }
}

/// One PDU to send: header bytes (with header digest and padding), then optionally a slot's data and its
/// digest.
struct Tx {
    hdr: [u8; TX_HDR.next_multiple_of(8)],
    hlen: usize,
    data: Option<(u16, u32, u32)>,
    ddgst: Option<[u8; 4]>,
    /// Bytes of this PDU already written.
    done: usize,
    /// Slot to free once written.
    release: Option<u16>,
}

impl Tx {
    fn new() -> Tx {
        Tx {
            hdr: [0; TX_HDR.next_multiple_of(8)],
            hlen: 0,
            data: None,
            ddgst: None,
            done: 0,
            release: None,
        }
    }

    fn total(&self) -> usize {
        self.hlen + self.data.map_or(0, |d| d.2 as usize) + self.ddgst.map_or(0, |_| 4)
    }
}

enum Rx {
    /// Expecting a PDU header.
    Header,
    /// Receiving `left` more data bytes for `slot` at `off`; then the digest if any.
    Data {
        slot: u16,
        off: u32,
        left: u32,
        crc: u32,
        h2c: bool,
        len: u32,
    },
    /// Expecting the data digest of `slot`'s data just received.
    Digest {
        slot: u16,
        crc: u32,
        h2c: bool,
        len: u32,
    },
}

struct ConnState {
    phase: Phase,
    hdgst: bool,
    ddgst: bool,
    cpda: u8,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    rx_state: Rx,
    tx: VecDeque<Tx>,
    reqs: Vec<Req>,
    free: Vec<u16>,
    /// Slots waiting for a data buffer, in arrival order.
    wait_buf: VecDeque<u16>,
    /// A command capsule with in-capsule data is buffered but no data buffer was free: input stops there, and
    /// the connection must be run again (its socket may have nothing more to wake it).
    rx_stalled: bool,
    /// Connect's outcome: controller, queue id, namespace table.
    sess: Session,
    sq_head: u16,
    /// Bdev I/Os outstanding on this connection.
    outstanding: u32,
    why_closed: Option<String>,
    /// The PSK identity the host used over TLS (checked against Connect's NQNs).
    tls_identity: Option<Box<[u8]>>,
}

impl ConnState {
    fn new(qd: usize) -> ConnState {
        ConnState {
            phase: Phase::AwaitIcReq,
            hdgst: false,
            ddgst: false,
            cpda: 0,
            rx: vec![0; RX_BUF],
            rx_start: 0,
            rx_end: 0,
            rx_state: Rx::Header,
            tx: VecDeque::with_capacity(qd * 2 + 4),
            reqs: (0..qd).map(|_| Req::new()).collect(),
            free: (0..qd as u16).rev().collect(),
            wait_buf: VecDeque::new(),
            rx_stalled: false,
            sess: Session::default(),
            sq_head: 0,
            outstanding: 0,
            why_closed: None,
            tls_identity: None,
        }
    }

    fn avail(&self) -> usize {
        self.rx_end - self.rx_start
    }
}

/// One NVMe/TCP connection: a queue pair.
pub struct Conn {
    key: Cell<QpKey>,
    group: Weak<TcpGroup>,
    pg: Weak<Pg>,
    /// The socket, or TLS over it.
    io: RefCell<nvme_tls::Conn>,
    fd: i32,
    peer: SocketAddr,
    listen: Trid,
    queued: Cell<bool>,
    s: RefCell<ConnState>,
}

/// A fatal protocol error: the termination request to send.
struct Fatal {
    fes: u16,
    fei: u32,
    why: String,
}

impl Conn {
    fn group(&self) -> Option<Rc<TcpGroup>> {
        self.group.upgrade()
    }

    fn me(&self) -> Option<Rc<Conn>> {
        self.group()?.conn_by_key(self.key.get())
    }

    /// Marks the connection for the next poll.
    fn wake(&self) {
        if let (Some(g), Some(me)) = (self.group(), self.me()) {
            g.queue(&me);
        }
    }

    /// Runs the connection: input, then output, then cleanup.
    fn run(&self, g: &TcpGroup) {
        let mut s = self.s.borrow_mut();
        let mut again = false;
        if s.phase == Phase::Tls {
            let r = self.io.borrow_mut().handshake();
            match r {
                Ok(false) => {}
                Ok(true) => {
                    log::debug!("nvmf_tcp: {}: TLS established", self.peer);
                    s.tls_identity = self.io.borrow().tls_identity().map(Box::from);
                    s.phase = Phase::AwaitIcReq;
                }
                Err(e) => {
                    s.why_closed.get_or_insert(format!("TLS handshake: {e}"));
                    s.phase = Phase::Closing;
                }
            }
        }
        if s.phase == Phase::AwaitIcReq || s.phase == Phase::Ready {
            self.retry_wait_buf(&mut s, g);
            s.rx_stalled = false;
            match self.rx(&mut s, g) {
                Ok(more) => again |= more,
                Err(f) => self.fatal(&mut s, f),
            }
        }
        match self.flush(&mut s, g) {
            Ok(left) => again |= left,
            Err(e) => {
                if s.phase != Phase::Closed {
                    s.why_closed.get_or_insert(format!("send failed: {e}"));
                    s.phase = Phase::Closing;
                }
            }
        }
        again |= (!s.wait_buf.is_empty() || s.rx_stalled) && s.phase == Phase::Ready;
        // TLS may hold decrypted input the socket no longer signals, or sealed output the socket did not take.
        again |= s.phase != Phase::Closing && self.io.borrow().busy();
        let closing = s.phase == Phase::Closing;
        drop(s);
        if closing {
            self.finish_close();
        } else if again {
            self.wake();
        }
    }

    fn fatal(&self, s: &mut ConnState, f: Fatal) {
        log::error!(
            "nvmf_tcp: {}: {}; terminating the connection",
            self.peer,
            f.why
        );
        // The request quotes the header of the PDU in error (what of it is buffered), not what follows it.
        let hlen = match s.avail() {
            0 => 0,
            _ => pdu::hlen_of(s.rx[s.rx_start]).unwrap_or(CH_LEN),
        };
        let excerpt_len = s.avail().min(hlen).min(pdu::TERM_REQ_MAX_DATA);
        // FEI names a field only for an invalid header field or an unsupported parameter; for the other
        // statuses it is reserved, so it goes out as zero.
        let fei = match f.fes {
            fes::INVALID_HEADER_FIELD | fes::UNSUPPORTED_PARAMETER => f.fei,
            _ => 0,
        };
        let mut t = Tx::new();
        encode_term_req(pdu_type::C2H_TERM_REQ, f.fes, fei, excerpt_len, &mut t.hdr);
        t.hdr[DATA_HLEN..DATA_HLEN + excerpt_len]
            .copy_from_slice(&s.rx[s.rx_start..s.rx_start + excerpt_len]);
        t.hlen = DATA_HLEN + excerpt_len;
        s.tx.push_back(t);
        s.why_closed.get_or_insert(f.why);
        // Stop reading; the termination request still goes out.
        s.phase = Phase::Closing;
    }

    /// Makes sure `need` bytes are buffered; reads once if not. `Ok(false)`: not yet.
    fn fill(&self, s: &mut ConnState, need: usize) -> std::result::Result<bool, ()> {
        if s.avail() >= need {
            return Ok(true);
        }
        if s.rx_start > 0 && s.rx.len() - s.rx_start < need.max(RX_BUF / 2) {
            let (a, b) = (s.rx_start, s.rx_end);
            s.rx.copy_within(a..b, 0);
            s.rx_end -= a;
            s.rx_start = 0;
        }
        let end = s.rx_end;
        match self.read_into_len(&mut s.rx[end..]) {
            Ok(n) => {
                s.rx_end += n;
                Ok(s.avail() >= need)
            }
            Err(true) => Ok(false),
            Err(false) => {
                s.why_closed
                    .get_or_insert("host closed the connection".into());
                Err(())
            }
        }
    }

    /// Reads what is there: `Ok(n)`, `Err(true)` would block, `Err(false)` closed or failed.
    fn read_into_len(&self, dst: &mut [u8]) -> std::result::Result<usize, bool> {
        if dst.is_empty() {
            return Err(true);
        }
        loop {
            let r = self.io.borrow_mut().read(dst);
            match r {
                Ok(0) => return Err(false),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == IoErrorKind::Interrupted => continue,
                Err(e) if e.kind() == IoErrorKind::WouldBlock => return Err(true),
                Err(_) => return Err(false),
            }
        }
    }

    /// Parses and handles buffered PDUs. `Ok(true)`: stopped with work left (budget used up).
    fn rx(&self, s: &mut ConnState, g: &TcpGroup) -> std::result::Result<bool, Fatal> {
        for _ in 0..RX_BUDGET {
            let progressed = match s.rx_state {
                Rx::Header => self.rx_header(s, g)?,
                Rx::Data { .. } => self.rx_data(s, g)?,
                Rx::Digest { .. } => self.rx_digest(s, g)?,
            };
            if !progressed || s.phase != Phase::AwaitIcReq && s.phase != Phase::Ready {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn closed(&self, s: &mut ConnState) -> bool {
        s.phase = Phase::Closing;
        false
    }

    /// Handles one PDU header; `Ok(false)` when more bytes are needed.
    fn rx_header(&self, s: &mut ConnState, g: &TcpGroup) -> std::result::Result<bool, Fatal> {
        match self.fill(s, CH_LEN) {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(()) => return Ok(self.closed(s)),
        }
        let ch = Ch::decode(&s.rx[s.rx_start..]);
        let allowed: &[u8] = if s.phase == Phase::AwaitIcReq {
            &[pdu_type::IC_REQ]
        } else {
            &[
                pdu_type::CAPSULE_CMD,
                pdu_type::H2C_DATA,
                pdu_type::H2C_TERM_REQ,
            ]
        };
        if s.phase == Phase::Ready && ch.ty == pdu_type::IC_REQ {
            return Err(Fatal {
                fes: fes::PDU_SEQUENCE_ERROR,
                fei: 0,
                why: "second ICReq".into(),
            });
        }
        // A PDU the host may send, but only once the connection is set up, is out of sequence (not an invalid
        // type) before ICReq, as SPDK answers it.
        if s.phase == Phase::AwaitIcReq
            && matches!(
                ch.ty,
                pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA | pdu_type::H2C_TERM_REQ
            )
        {
            return Err(Fatal {
                fes: fes::PDU_SEQUENCE_ERROR,
                fei: 0,
                why: format!("PDU type {:#x} before ICReq", ch.ty),
            });
        }
        let max_icd = self.max_icd(s, g) as usize;
        let max_plen =
            CAPSULE_CMD_HLEN + 2 * DIGEST_LEN + 128 + max_icd.max(g.opts.max_io_size as usize);
        let l = check_header(&ch, allowed, s.hdgst, s.ddgst, s.cpda, max_plen).map_err(|e| Fatal {
            fes: e.fes,
            fei: e.fei,
            why: format!(
                "bad PDU header (type {:#x}, hlen {}, pdo {}, plen {}, flags {:#x}): field at byte {}",
                ch.ty, ch.hlen, ch.pdo, ch.plen, ch.flags, e.fei
            ),
        })?;
        // The header (with digest and padding) must be buffered whole before it is looked at.
        let hend = if l.data_len > 0 && ch.ty != pdu_type::H2C_TERM_REQ {
            l.data_off
        } else {
            l.plen
        };
        match self.fill(s, hend) {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(()) => return Ok(self.closed(s)),
        }
        let h = s.rx_start;
        if l.hdgst {
            let want = crc32c::crc32c(&s.rx[h..h + l.hlen]);
            let got = u32::from_le_bytes(s.rx[h + l.hlen..h + l.hlen + 4].try_into().unwrap());
            if want != got {
                return Err(Fatal {
                    fes: fes::HDGST_ERROR,
                    fei: 0,
                    why: format!("header digest {got:#010x}, expected {want:#010x}"),
                });
            }
        }
        match ch.ty {
            pdu_type::IC_REQ => {
                let ic = IcReq::decode(&s.rx[h..]);
                if ic.pfv != 0 {
                    return Err(Fatal {
                        fes: fes::INVALID_HEADER_FIELD,
                        fei: pdu::IC_REQ_FEI_PFV,
                        why: format!("ICReq PFV {}", ic.pfv),
                    });
                }
                if ic.hpda > pdu::MAX_HPDA {
                    return Err(Fatal {
                        fes: fes::INVALID_HEADER_FIELD,
                        fei: pdu::IC_REQ_FEI_HPDA,
                        why: format!("ICReq HPDA {}", ic.hpda),
                    });
                }
                s.rx_start += l.plen;
                s.hdgst = ic.hdgst;
                s.ddgst = ic.ddgst;
                s.cpda = ic.hpda;
                let mut t = Tx::new();
                IcResp {
                    pfv: 0,
                    cpda: s.cpda,
                    hdgst: s.hdgst,
                    ddgst: s.ddgst,
                    maxh2cdata: g.opts.max_io_size,
                }
                .encode(&mut t.hdr);
                t.hlen = IC_HLEN;
                s.tx.push_back(t);
                s.phase = Phase::Ready;
                Ok(true)
            }
            pdu_type::H2C_TERM_REQ => {
                let (f, i) = pdu::decode_term_req(&s.rx[h..]);
                s.why_closed.get_or_insert(format!(
                    "host terminated the connection (fes {f:#x}, fei {i})"
                ));
                s.rx_start += l.plen;
                s.phase = Phase::Closing;
                Ok(false)
            }
            pdu_type::CAPSULE_CMD => self.rx_capsule(s, g, &l),
            _ => self.rx_h2c(s, g, &l),
        }
    }

    fn max_icd(&self, s: &ConnState, g: &TcpGroup) -> u32 {
        if !s.sess.connected || s.sess.qid == 0 {
            ADMIN_ICD.max(g.opts.in_capsule_data_size)
        } else {
            g.opts.in_capsule_data_size
        }
    }

    fn rx_capsule(
        &self,
        s: &mut ConnState,
        g: &TcpGroup,
        l: &pdu::Layout,
    ) -> std::result::Result<bool, Fatal> {
        let h = s.rx_start;
        let mut sqe = Sqe::default();
        sqe.0
            .copy_from_slice(&s.rx[h + CH_LEN..h + CAPSULE_CMD_HLEN]);
        if l.data_len > self.max_icd(s, g) as usize {
            return Err(Fatal {
                fes: fes::DATA_TRANSFER_LIMIT_EXCEEDED,
                fei: 4,
                why: format!("{} bytes of in-capsule data", l.data_len),
            });
        }
        let Some(slot) = s.free.pop() else {
            return Err(Fatal {
                fes: fes::PDU_SEQUENCE_ERROR,
                fei: 0,
                why: format!("more commands than the queue holds ({})", s.reqs.len()),
            });
        };
        // In-capsule data goes to the slot's own buffer (made on first use); only if that cannot be had, to a
        // shared one. A capsule is not consumed before it has a buffer: without one, try again next poll.
        let mut buf_is_icd = false;
        let buf = if l.data_len > 0 {
            let max = self.max_icd(s, g) as usize;
            let r = &mut s.reqs[slot as usize];
            let own = match r.icd.take() {
                Some(b) if b.len() >= l.data_len => Some(b),
                _ => DmaBuf::alloc(max.max(l.data_len)).ok(),
            };
            match own {
                Some(b) => {
                    buf_is_icd = true;
                    Some(b)
                }
                None => match g.get_buf() {
                    Some(b) => Some(b),
                    None => {
                        s.free.push(slot);
                        s.rx_stalled = true;
                        return Ok(false);
                    }
                },
            }
        } else {
            None
        };
        // SQ head: one more command taken from the host's queue (0-based size, wraps).
        s.sq_head = if s.sq_head >= s.sess.sqsize {
            0
        } else {
            s.sq_head + 1
        };
        let r = &mut s.reqs[slot as usize];
        r.sqe = sqe;
        r.buf = buf;
        r.buf_is_icd = buf_is_icd;
        r.len = 0;
        r.recv = 0;
        r.pending = 0;
        r.status = Status::SUCCESS;
        r.dw0 = 0;
        r.digest_error = false;
        r.xfer = Xfer::None;
        if l.data_len > 0 {
            r.state = ReqState::InCapsule;
            s.rx_start += l.data_off;
            s.rx_state = Rx::Data {
                slot,
                off: 0,
                left: l.data_len as u32,
                crc: !0,
                h2c: false,
                len: l.data_len as u32,
            };
        } else {
            s.rx_start += l.plen;
            self.start_cmd(s, g, slot, 0);
        }
        Ok(true)
    }

    fn rx_h2c(
        &self,
        s: &mut ConnState,
        g: &TcpGroup,
        l: &pdu::Layout,
    ) -> std::result::Result<bool, Fatal> {
        let d = DataHdr::decode(&s.rx[s.rx_start..]);
        let bad = |fei, why: String| Fatal {
            fes: fes::INVALID_HEADER_FIELD,
            fei,
            why,
        };
        let slot = d.ttag;
        let Some(r) = s.reqs.get(slot as usize) else {
            return Err(bad(
                DataHdr::FEI_TTAG,
                format!("H2C data with unknown ttag {slot}"),
            ));
        };
        if r.state != ReqState::AwaitH2C {
            return Err(bad(
                DataHdr::FEI_TTAG,
                format!("H2C data for ttag {slot}, which awaits none"),
            ));
        }
        if r.sqe.cid() != d.cccid {
            return Err(bad(
                DataHdr::FEI_CCCID,
                format!(
                    "H2C data for ttag {slot} names cid {}, not {}",
                    d.cccid,
                    r.sqe.cid()
                ),
            ));
        }
        // DATAL must say what the PDU carries (a header field inconsistent with PLEN).
        if d.len as usize != l.data_len {
            return Err(bad(
                DataHdr::FEI_LEN,
                format!(
                    "H2C data header says {} bytes, the PDU carries {}",
                    d.len, l.data_len
                ),
            ));
        }
        if d.offset != r.recv {
            return Err(Fatal {
                fes: fes::DATA_TRANSFER_OUT_OF_RANGE,
                fei: DataHdr::FEI_OFFSET,
                why: format!("H2C data offset {} where {} was expected", d.offset, r.recv),
            });
        }
        if d.offset as u64 + d.len as u64 > r.len as u64 || d.len == 0 {
            return Err(Fatal {
                fes: fes::DATA_TRANSFER_OUT_OF_RANGE,
                fei: DataHdr::FEI_LEN,
                why: format!(
                    "H2C data of {} bytes at {} for a {}-byte transfer",
                    d.len, d.offset, r.len
                ),
            });
        }
        if d.len > g.opts.max_io_size {
            return Err(Fatal {
                fes: fes::DATA_TRANSFER_LIMIT_EXCEEDED,
                fei: DataHdr::FEI_LEN,
                why: format!("H2C data of {} bytes", d.len),
            });
        }
        s.rx_start += l.data_off;
        s.rx_state = Rx::Data {
            slot,
            off: d.offset,
            left: d.len,
            crc: !0,
            h2c: true,
            len: d.len,
        };
        Ok(true)
    }

    /// Moves data into the command's buffer; `Ok(false)` when the socket has no more yet.
    fn rx_data(&self, s: &mut ConnState, g: &TcpGroup) -> std::result::Result<bool, Fatal> {
        let Rx::Data {
            slot,
            off,
            left,
            crc,
            h2c,
            len,
        } = s.rx_state
        else {
            return Ok(false);
        };
        let ddgst = s.ddgst;
        let (o, n) = (off as usize, left as usize);
        let got: usize;
        let mut crc2 = crc;
        let avail = s.avail();
        if avail > 0 {
            let take = avail.min(n);
            let (a, st) = (s.rx_start, &mut *s);
            let ConnState { rx, reqs, .. } = st;
            let buf = reqs[slot as usize]
                .buf
                .as_mut()
                .expect("data slot has a buffer");
            buf.as_mut_slice()[o..o + take].copy_from_slice(&rx[a..a + take]);
            if ddgst {
                crc2 = crc32c::update(crc2, &rx[a..a + take]);
            }
            s.rx_start += take;
            got = take;
        } else if n >= DIRECT_READ_MIN {
            // Large data: straight from the socket into the command's buffer.
            let r = {
                let buf = s.reqs[slot as usize]
                    .buf
                    .as_mut()
                    .expect("data slot has a buffer");
                let dst = &mut buf.as_mut_slice()[o..o + n];
                self.read_into_len(dst)
            };
            match r {
                Ok(k) => {
                    if ddgst {
                        let buf = s.reqs[slot as usize].buf.as_ref().expect("buffer");
                        crc2 = crc32c::update(crc2, &buf.as_slice()[o..o + k]);
                    }
                    got = k;
                }
                Err(true) => return Ok(false),
                Err(false) => return Ok(self.closed(s)),
            }
        } else {
            match self.fill(s, 1) {
                Ok(true) => return Ok(true),
                Ok(false) => return Ok(false),
                Err(()) => return Ok(self.closed(s)),
            }
        }
        let left = left - got as u32;
        if left > 0 {
            s.rx_state = Rx::Data {
                slot,
                off: off + got as u32,
                left,
                crc: crc2,
                h2c,
                len,
            };
            return Ok(true);
        }
        if ddgst {
            s.rx_state = Rx::Digest {
                slot,
                crc: !crc2,
                h2c,
                len,
            };
            return Ok(true);
        }
        s.rx_state = Rx::Header;
        self.data_done(s, g, slot, h2c, len);
        Ok(true)
    }

    fn rx_digest(&self, s: &mut ConnState, g: &TcpGroup) -> std::result::Result<bool, Fatal> {
        let Rx::Digest {
            slot,
            crc,
            h2c,
            len,
        } = s.rx_state
        else {
            return Ok(false);
        };
        match self.fill(s, DIGEST_LEN) {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(()) => return Ok(self.closed(s)),
        }
        let a = s.rx_start;
        let got = u32::from_le_bytes(s.rx[a..a + 4].try_into().unwrap());
        s.rx_start += 4;
        s.rx_state = Rx::Header;
        if got != crc {
            log::error!(
                "nvmf_tcp: {}: data digest {got:#010x}, expected {crc:#010x} (cid {})",
                self.peer,
                s.reqs[slot as usize].sqe.cid()
            );
            s.reqs[slot as usize].digest_error = true;
        }
        self.data_done(s, g, slot, h2c, len);
        Ok(true)
    }

    /// A data PDU's payload is in: in-capsule data starts the command, H2C data may complete its transfer.
    fn data_done(&self, s: &mut ConnState, g: &TcpGroup, slot: u16, h2c: bool, len: u32) {
        if !h2c {
            self.start_cmd(s, g, slot, len);
            return;
        }
        let r = &mut s.reqs[slot as usize];
        r.recv += len;
        if r.recv < r.len {
            return;
        }
        if r.digest_error {
            self.complete(
                s,
                g,
                slot,
                Status::generic(generic::TRANSIENT_TRANSPORT_ERROR),
                0,
            );
            return;
        }
        self.exec(s, g, slot);
    }

    /// A command capsule is in (with `icd` bytes of in-capsule data): works out its data transfer.
    fn start_cmd(&self, s: &mut ConnState, g: &TcpGroup, slot: u16, icd: u32) {
        let r = &mut s.reqs[slot as usize];
        if r.digest_error {
            self.complete(
                s,
                g,
                slot,
                Status::generic(generic::TRANSIENT_TRANSPORT_ERROR),
                0,
            );
            return;
        }
        let sqe = r.sqe;
        let dir = if sqe.opc() == FABRICS {
            sqe.fctype() & 0x3
        } else {
            sqe.opc() & 0x3
        };
        let d = sqe.sgl1();
        let err = |st: u8| Status::generic(st).dnr();
        let xfer = match dir {
            0 => Xfer::None,
            1 => Xfer::H2C,
            2 => Xfer::C2H,
            _ => {
                self.complete(s, g, slot, err(generic::INVALID_FIELD), 0);
                return;
            }
        };
        if xfer == Xfer::None || d.len == 0 {
            if icd > 0 {
                self.complete(s, g, slot, err(generic::INVALID_FIELD), 0);
                return;
            }
            s.reqs[slot as usize].xfer = Xfer::None;
            self.exec(s, g, slot);
            return;
        }
        let r = &mut s.reqs[slot as usize];
        r.xfer = xfer;
        match (d.ty, d.subtype) {
            (sgl::TYPE_DATA_BLOCK, sgl::SUBTYPE_OFFSET) => {
                // In-capsule data: it must all be there, at offset 0 (ICDOFF is 0).
                if xfer != Xfer::H2C || d.addr != 0 {
                    let st = if d.addr != 0 {
                        generic::INVALID_SGL_OFFSET
                    } else {
                        generic::INVALID_FIELD
                    };
                    self.complete(s, g, slot, err(st), 0);
                    return;
                }
                if d.len != icd {
                    self.complete(s, g, slot, err(generic::DATA_SGL_LENGTH_INVALID), 0);
                    return;
                }
                r.len = d.len;
                self.exec(s, g, slot);
            }
            (sgl::TYPE_TRANSPORT_DATA_BLOCK, sgl::SUBTYPE_TRANSPORT) => {
                if icd > 0 {
                    self.complete(s, g, slot, err(generic::INVALID_FIELD), 0);
                    return;
                }
                if d.len > g.opts.max_io_size {
                    self.complete(s, g, slot, err(generic::DATA_SGL_LENGTH_INVALID), 0);
                    return;
                }
                r.len = d.len;
                r.state = ReqState::NeedBuf;
                s.wait_buf.push_back(slot);
                self.retry_wait_buf(s, g);
            }
            _ => self.complete(s, g, slot, err(generic::SGL_DESCRIPTOR_TYPE_INVALID), 0),
        }
    }

    /// Gives buffers to commands waiting for one, in order; each then asks for its data or runs.
    fn retry_wait_buf(&self, s: &mut ConnState, g: &TcpGroup) {
        while let Some(&slot) = s.wait_buf.front() {
            let Some(b) = g.get_buf() else { return };
            s.wait_buf.pop_front();
            let r = &mut s.reqs[slot as usize];
            r.buf = Some(b);
            if r.xfer == Xfer::H2C {
                r.state = ReqState::AwaitH2C;
                let (cid, len) = (r.sqe.cid(), r.len);
                let mut t = Tx::new();
                let hd = if s.hdgst { DIGEST_LEN } else { 0 };
                DataHdr {
                    cccid: cid,
                    ttag: slot,
                    offset: 0,
                    len,
                }
                .encode(
                    pdu_type::R2T,
                    if s.hdgst { flags::HDGSTF } else { 0 },
                    0,
                    (DATA_HLEN + hd) as u32,
                    &mut t.hdr,
                );
                t.hlen = DATA_HLEN + hd;
                if s.hdgst {
                    let c = crc32c::crc32c(&t.hdr[..DATA_HLEN]);
                    t.hdr[DATA_HLEN..DATA_HLEN + 4].copy_from_slice(&c.to_le_bytes());
                }
                s.tx.push_back(t);
            } else {
                self.exec(s, g, slot);
            }
        }
    }

    /// Runs a command whose data (if any) is here.
    fn exec(&self, s: &mut ConnState, g: &TcpGroup, slot: u16) {
        let ConnState {
            sess,
            reqs,
            tls_identity,
            ..
        } = &mut *s;
        let id = Ident {
            tls_identity: tls_identity.as_deref(),
            key: self.key.get(),
            listen: &self.listen,
            peer: self.peer,
            opts: &g.opts,
        };
        let r = &mut reqs[slot as usize];
        r.state = ReqState::Executing;
        let sqe = r.sqe;
        // SAFETY: the buffer belongs to this slot until its response has been written, which happens only after
        // every bdev I/O submitted here has completed (`pending` counts them, and a closing connection waits for
        // `outstanding` to drain before it frees any buffer).
        let out = unsafe { sess.exec(&id, &sqe, r.buf.as_mut(), r.len, r.xfer == Xfer::C2H, slot) };
        match out {
            Outcome::Done { status, dw0, dw1 } => self.complete_full(s, g, slot, status, dw0, dw1),
            Outcome::Submitted(n) => {
                s.reqs[slot as usize].pending = n;
                s.outstanding += n as u32;
            }
            Outcome::Parked => {}
        }
        // A fused Compare whose Write did not follow (or whose pair was refused) is answered now.
        if let Some((first, st)) = s.sess.take_orphan() {
            self.complete(s, g, first, st, 0);
        }
    }

    fn complete(&self, s: &mut ConnState, g: &TcpGroup, slot: u16, status: Status, dw0: u32) {
        self.complete_full(s, g, slot, status, dw0, 0)
    }

    /// Queues the command's data (reads) and response; the slot frees when they are written.
    fn complete_full(
        &self,
        s: &mut ConnState,
        _g: &TcpGroup,
        slot: u16,
        status: Status,
        dw0: u32,
        dw1: u32,
    ) {
        if s.phase == Phase::Closed {
            return;
        }
        let hd = if s.hdgst { DIGEST_LEN } else { 0 };
        let c2h_success = _g.opts.c2h_success;
        let (cid, xfer, len) = {
            let r = &mut s.reqs[slot as usize];
            r.state = ReqState::Responding;
            r.status = status;
            (r.sqe.cid(), r.xfer, r.len)
        };
        let mut send_resp = true;
        if xfer == Xfer::C2H && status.is_success() && len > 0 {
            let mut t = Tx::new();
            let align = (s.cpda as usize + 1) * 4;
            let mut pdo = DATA_HLEN + hd;
            if s.cpda != 0 {
                pdo = pdo.next_multiple_of(align);
            }
            let dd = if s.ddgst { DIGEST_LEN } else { 0 };
            let mut fl = flags::LAST_PDU;
            if s.hdgst {
                fl |= flags::HDGSTF;
            }
            if s.ddgst {
                fl |= flags::DDGSTF;
            }
            if c2h_success && dw0 == 0 && dw1 == 0 {
                fl |= flags::SUCCESS;
                send_resp = false;
            }
            DataHdr {
                cccid: cid,
                ttag: 0,
                offset: 0,
                len,
            }
            .encode(
                pdu_type::C2H_DATA,
                fl,
                pdo as u8,
                (pdo + len as usize + dd) as u32,
                &mut t.hdr,
            );
            if s.hdgst {
                let c = crc32c::crc32c(&t.hdr[..DATA_HLEN]);
                t.hdr[DATA_HLEN..DATA_HLEN + 4].copy_from_slice(&c.to_le_bytes());
            }
            t.hlen = pdo;
            t.data = Some((slot, 0, len));
            if s.ddgst {
                let b = s.reqs[slot as usize].buf.as_ref().expect("read buffer");
                t.ddgst = Some(crc32c::crc32c(&b.as_slice()[..len as usize]).to_le_bytes());
            }
            if !send_resp {
                t.release = Some(slot);
            }
            s.tx.push_back(t);
        }
        if send_resp {
            let mut t = Tx::new();
            Ch {
                ty: pdu_type::CAPSULE_RESP,
                flags: if s.hdgst { flags::HDGSTF } else { 0 },
                hlen: CAPSULE_RESP_HLEN as u8,
                pdo: 0,
                plen: (CAPSULE_RESP_HLEN + hd) as u32,
            }
            .encode(&mut t.hdr);
            let cqe = Cqe {
                dw0,
                dw1,
                sqhd: s.sq_head,
                sqid: s.sess.qid,
                cid,
                status,
                phase: false,
            };
            let mut b = [0u8; 16];
            cqe.encode(&mut b);
            t.hdr[CH_LEN..CH_LEN + 16].copy_from_slice(&b);
            if s.hdgst {
                let c = crc32c::crc32c(&t.hdr[..CAPSULE_RESP_HLEN]);
                t.hdr[CAPSULE_RESP_HLEN..CAPSULE_RESP_HLEN + 4].copy_from_slice(&c.to_le_bytes());
            }
            t.hlen = CAPSULE_RESP_HLEN + hd;
            t.release = Some(slot);
            s.tx.push_back(t);
        }
        if let Some(pg) = self.pg.upgrade() {
            pg.stats
                .completed_nvme_io
                .set(pg.stats.completed_nvme_io.get() + 1);
        }
    }

    fn release(&self, s: &mut ConnState, g: &TcpGroup, slot: u16) {
        let r = &mut s.reqs[slot as usize];
        r.state = ReqState::Free;
        if let Some(b) = r.buf.take() {
            if std::mem::take(&mut r.buf_is_icd) {
                r.icd = Some(b);
            } else {
                g.put_buf(b);
            }
        }
        s.free.push(slot);
    }

    /// Writes queued PDUs. `Ok(true)`: output is left (the socket, or TLS's sealed bytes, waits).
    fn flush(&self, s: &mut ConnState, g: &TcpGroup) -> std::io::Result<bool> {
        loop {
            if s.tx.is_empty() {
                let mut io = self.io.borrow_mut();
                io.flush()?;
                return Ok(io.pending());
            }
            let written = {
                let ConnState { tx, reqs, .. } = &*s;
                let mut slices: [IoSlice<'_>; 48] = std::array::from_fn(|_| IoSlice::new(&[]));
                let mut n = 0;
                'items: for t in tx.iter() {
                    let mut skip = t.done;
                    let data = t.data.map(|(slot, off, len)| {
                        let b = reqs[slot as usize]
                            .buf
                            .as_ref()
                            .expect("data slot has a buffer");
                        &b.as_slice()[off as usize..(off + len) as usize]
                    });
                    let parts: [&[u8]; 3] = [
                        &t.hdr[..t.hlen],
                        data.unwrap_or(&[]),
                        t.ddgst.as_ref().map_or(&[][..], |d| &d[..]),
                    ];
                    for p in parts {
                        if skip >= p.len() {
                            skip -= p.len();
                            continue;
                        }
                        slices[n] = IoSlice::new(&p[skip..]);
                        skip = 0;
                        n += 1;
                        if n == slices.len() {
                            break 'items;
                        }
                    }
                }
                let r = self.io.borrow_mut().write_vectored(&slices[..n]);
                match r {
                    Ok(w) => w,
                    Err(e) if e.kind() == IoErrorKind::WouldBlock => return Ok(true),
                    Err(e) if e.kind() == IoErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            let mut w = written;
            while w > 0 {
                let Some(t) = s.tx.front_mut() else { break };
                let left = t.total() - t.done;
                if w < left {
                    t.done += w;
                    break;
                }
                w -= left;
                let t = s.tx.pop_front().expect("front exists");
                if let Some(slot) = t.release {
                    self.release(s, g, slot);
                }
            }
        }
    }

    /// Starts closing: no more input is read; the connection goes once its bdev I/O has completed.
    fn close(&self, why: &str) {
        {
            let mut s = self.s.borrow_mut();
            if matches!(s.phase, Phase::Closed) {
                return;
            }
            s.why_closed.get_or_insert(why.to_string());
            s.phase = Phase::Closing;
        }
        self.finish_close();
    }

    fn finish_close(&self) {
        let outstanding = {
            let s = self.s.borrow();
            if s.phase == Phase::Closed {
                return;
            }
            s.outstanding
        };
        if outstanding > 0 {
            // Bdev I/O still uses this connection's buffers: the last completion finishes the close.
            return;
        }
        let Some(g) = self.group() else { return };
        let why = {
            let mut s = self.s.borrow_mut();
            s.phase = Phase::Closed;
            // Whatever is still queued goes: slots and buffers back.
            s.tx.clear();
            for i in 0..s.reqs.len() {
                let r = &mut s.reqs[i];
                r.icd = None;
                if let Some(b) = r.buf.take().filter(|_| !std::mem::take(&mut r.buf_is_icd)) {
                    g.put_buf(b);
                }
            }
            s.why_closed.take().unwrap_or_default()
        };
        self.io.borrow_mut().shutdown();
        log::info!("nvmf_tcp: connection from {} closed: {why}", self.peer);
        g.forget(self);
        if let Some(pg) = self.pg.upgrade() {
            pg.remove_qpair(self.key.get());
        }
        // Take the session out first: closing it may reach other queue pairs by message only, never this one.
        let mut sess = std::mem::take(&mut self.s.borrow_mut().sess);
        sess.close(self.key.get());
    }
}

impl Qpair for Conn {
    fn abort(&self, cid: u16, done: Box<dyn FnOnce(bool)>) {
        let Some(g) = self.group() else {
            return done(false);
        };
        let mut s = self.s.borrow_mut();
        if s.phase != Phase::Ready {
            drop(s);
            return done(false);
        }
        let waiting = s.wait_buf.iter().position(|&slot| {
            let r = &s.reqs[slot as usize];
            r.state == ReqState::NeedBuf && r.sqe.cid() == cid
        });
        if let Some(i) = waiting {
            let slot = s.wait_buf.remove(i).expect("position found");
            let st = Status::generic(generic::ABORTED_BY_REQUEST);
            self.complete(&mut s, &g, slot, st, 0);
            drop(s);
            self.wake();
            return done(true);
        }
        // At the bdev: the bdev layer aborts it if the bdev can.
        let target = s
            .reqs
            .iter()
            .position(|r| r.state == ReqState::Executing && r.pending > 0 && r.sqe.cid() == cid)
            .map(|slot| (slot as u16, s.reqs[slot].sqe));
        s.sess.abort_at_bdev(self.key.get(), target, done);
    }

    fn complete_async(&self, slot: u16, dw0: u32, status: Status) {
        let Some(g) = self.group() else { return };
        {
            let mut s = self.s.borrow_mut();
            if s.phase != Phase::Ready
                || s.reqs.get(slot as usize).map(|r| r.state) != Some(ReqState::Executing)
            {
                return;
            }
            self.complete(&mut s, &g, slot, status, dw0);
        }
        self.wake();
    }

    fn io_done(&self, slot: u16, io: IoHandle) {
        let st = crate::io::status_of(io.status());
        let dw0 = io.nvme_cdw0();
        // The descriptor goes back to the pool before the response is built.
        drop(io);
        let Some(g) = self.group() else { return };
        let closing = {
            let mut s = self.s.borrow_mut();
            s.outstanding = s.outstanding.saturating_sub(1);
            let r = &mut s.reqs[slot as usize];
            r.pending = r.pending.saturating_sub(1);
            r.dw0 |= dw0;
            if !st.is_success() && r.status.is_success() {
                r.status = st;
            }
            if r.pending == 0 && s.phase != Phase::Closed {
                let st = s.reqs[slot as usize].status;
                // The Write of a fused pair answers for its Compare too.
                let (st, first) = match s.sess.fused_done(slot, st) {
                    Some((first, fst, sst)) => (sst, Some((first, fst))),
                    None => (st, None),
                };
                if s.phase == Phase::Closing {
                    // Nobody to answer: just free the slots.
                    self.release(&mut s, &g, slot);
                    if let Some((f, _)) = first {
                        self.release(&mut s, &g, f);
                    }
                } else {
                    if let Some((f, fst)) = first {
                        self.complete(&mut s, &g, f, fst, 0);
                    }
                    let dw0 = s.reqs[slot as usize].dw0;
                    self.complete(&mut s, &g, slot, st, dw0);
                }
            }
            s.phase == Phase::Closing && s.outstanding == 0
        };
        if closing {
            self.finish_close();
        } else {
            self.wake();
        }
    }

    fn disconnect(&self) {
        self.close("disconnected by the target");
    }

    fn info(&self) -> Option<(String, crate::params::QpairInfo)> {
        use crate::params::stats::QpairState;
        let s = self.s.borrow();
        let state = match s.phase {
            Phase::Ready => QpairState::Enabled,
            Phase::AwaitIcReq => QpairState::Connecting,
            _ => QpairState::Deactivating,
        };
        s.sess.qpair_info(state, &self.listen, "TCP", self.peer)
    }
}
