//! One NVMe/RDMA connection: a reliable connected queue pair and its command slots (SPDK's
//! `spdk_nvmf_rdma_qpair` and the request state machine of `nvmf_rdma_request_process`).
//!
//! A command goes: capsule received (the SQE is copied into a free slot, the receive goes back at once unless
//! it holds in-capsule data still to copy) → data buffer → RDMA READ of the host's data (host to controller) →
//! [`Session::exec`] → bdev I/O → RDMA WRITE of the data (controller to host, chained unsignaled before the
//! response) and SEND of the CQE → the SEND's completion frees the slot. Commands that find no data buffer, no
//! RDMA READ credit (the read depth the host allowed) or no send queue room wait in order.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use bdev::IoHandle;
use nvme_proto::cmd::{sgl, Cqe, Sqe, FABRICS};
use nvme_proto::rdma::CmAccept;
use nvme_proto::status::{generic, Status};
use nvmf::pg::{Pg, QpKey, Qpair};
use nvmf::qpair::{Ident, Outcome, Session};
use nvmf::tgt::Trid;
use reactor::dma::DmaBuf;

use crate::group::{registered, wr, ConnReq, DevPoller, RdmaGroup, RecvPool};
use crate::verbs::{self, CmId, Op, QpCaps, SendWr, Sge, Wc, MAX_WRS};

/// Keyed SGL descriptors per command (SPDK's `SPDK_NVMF_MAX_SGL_ENTRIES`, reported as MSDBD).
const MAX_SGL: usize = 16;
/// How long a closing connection waits for its flushed work requests before it goes anyway.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Queue pair created, accept not yet sent.
    Connecting,
    /// Running.
    Ready,
    /// Closing: the queue pair is in the error state; waits for bdev I/O and flushed work requests.
    Closing,
    /// Gone.
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReqState {
    Free,
    /// Waiting for a data buffer.
    NeedBuf,
    /// Waiting for RDMA READ credit.
    NeedRead,
    /// RDMA READs posted.
    Reading,
    /// Running (bdev I/O outstanding, or an AER parked).
    Executing,
    /// Response ready, waiting for send queue room.
    NeedSend,
    /// Response (and data) posted; the slot frees with the SEND's completion.
    Responding,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Xfer {
    None,
    H2C,
    C2H,
}

/// One of the host's keyed SGL data blocks.
#[derive(Clone, Copy, Debug, Default)]
struct Remote {
    addr: u64,
    key: u32,
    len: u32,
}

struct Req {
    state: ReqState,
    sqe: Sqe,
    xfer: Xfer,
    buf: Option<(DmaBuf, u8)>,
    lkey: u32,
    len: u32,
    remote: [Remote; MAX_SGL],
    nremote: u8,
    /// In-capsule data still in receive `.0` at offset `.1`, to copy once the buffer is here.
    icd: Option<(u32, u32)>,
    /// RDMA READs outstanding.
    reads_left: u16,
    /// Work requests of this slot in the send queue.
    wrs: u32,
    /// Bdev I/Os outstanding.
    pending: u16,
    status: Status,
    /// Completion dword 0 an NVMe bdev answered a passed-through command with.
    dw0: u32,
}

impl Req {
    fn new() -> Req {
        Req {
            state: ReqState::Free,
            sqe: Sqe::default(),
            xfer: Xfer::None,
            buf: None,
            lkey: 0,
            len: 0,
            remote: [Remote::default(); MAX_SGL],
            nremote: 0,
            icd: None,
            reads_left: 0,
            wrs: 0,
            pending: 0,
            status: Status::SUCCESS,
            dw0: 0,
        }
    }
}

struct State {
    phase: Phase,
    reqs: Vec<Req>,
    free: Vec<u16>,
    sess: Session,
    sq_head: u16,
    /// Receives holding a capsule, waiting for a free slot.
    waiting_recvs: VecDeque<(u32, u32)>,
    wait_buf: VecDeque<u16>,
    wait_read: VecDeque<u16>,
    wait_send: VecDeque<u16>,
    read_depth: u32,
    max_read: u32,
    send_depth: u32,
    max_send: u32,
    /// Signaled send work requests without a completion yet.
    sends_out: u32,
    /// Receives posted on the queue pair's own receive queue (no SRQ).
    recvs_posted: u32,
    /// Bdev I/Os outstanding.
    outstanding: u32,
    why_closed: Option<String>,
    close_deadline: Option<Instant>,
    /// Closing has dropped waiting work and moved the queue pair to the error state.
    torn_down: bool,
    /// The poll group is stopping: flushed work requests are not waited for.
    forced: bool,
}

/// One NVMe/RDMA queue pair.
pub(crate) struct Conn {
    pub token: u64,
    pub qpn: u32,
    pub dev: Rc<DevPoller>,
    key: Cell<QpKey>,
    id: CmId,
    pg: Weak<Pg>,
    me: RefCell<Weak<Conn>>,
    peer: SocketAddr,
    listen: Trid,
    qid: u16,
    qd: u16,
    /// Own receives (no SRQ).
    recvs: Option<RecvPool>,
    /// Completion entries, 16 bytes per slot, sent from here.
    rsp: RefCell<DmaBuf>,
    rsp_lkey: u32,
    /// Completion queue entries reserved for this queue pair.
    cqes: i32,
    s: RefCell<State>,
}

fn err(sc: u8) -> Status {
    Status::generic(sc)
}

impl Conn {
    /// Creates the queue pair and its buffers; on failure gives the id back (to be rejected) unless it is gone.
    pub fn create(
        g: &Rc<RdmaGroup>,
        pg: &Rc<Pg>,
        id: CmId,
        r: ConnReq,
    ) -> Result<Rc<Conn>, (Option<CmId>, String)> {
        let Some(dev) = g.devs.iter().find(|d| d.dev.key() == r.dev).cloned() else {
            return Err((Some(id), "no poller for the device".into()));
        };
        let qd = r.qd.max(1);
        let srq = dev.srq.as_ref();
        // Responses and data (a READ or a WRITE and the SEND per command) complete here; so do own receives.
        let cqes = 2 * qd as i32 + 2 + if srq.is_none() { qd as i32 } else { 0 };
        if let Err(e) = dev.reserve_cqes(cqes) {
            return Err((Some(id), e.to_string()));
        }
        let fail = |id: CmId, e: String| {
            let _ = dev.reserve_cqes(-cqes);
            Err((Some(id), e))
        };
        let max_sge = (dev.dev.attr.max_sge.max(1) as u32).min(1);
        let caps = QpCaps {
            max_send_wr: 2 * qd as u32,
            max_recv_wr: qd as u32,
            max_send_sge: max_sge,
            max_recv_sge: 1,
        };
        let qpn = match id.create_qp(&dev.dev, &dev.cq, srq.map(|s| &s.0), caps) {
            Ok(n) => n,
            Err(e) => return fail(id, e.to_string()),
        };
        let (recvs, rsp, rsp_lkey) = {
            let mut x = dev.xlat.borrow_mut();
            let recvs = if srq.is_none() {
                match RecvPool::new(qd as u32, g.shared.opts.in_capsule_data_size, &mut x) {
                    Ok(p) => Some(p),
                    Err(e) => return fail(id, e.to_string()),
                }
            } else {
                None
            };
            let rsp = match DmaBuf::alloc(qd as usize * Cqe::SIZE) {
                Ok(b) => b,
                Err(e) => return fail(id, e.to_string()),
            };
            let Some(lkey) = registered(&mut x, &rsp, rsp.len()) else {
                return fail(id, "response buffers are not registered".into());
            };
            (recvs, rsp, lkey)
        };
        let c = Rc::new(Conn {
            token: r.token,
            qpn,
            dev: dev.clone(),
            key: Cell::new(0),
            id,
            pg: Rc::downgrade(pg),
            me: RefCell::new(Weak::new()),
            peer: r.peer,
            listen: r.listen,
            qid: r.qid,
            qd,
            recvs,
            rsp: RefCell::new(rsp),
            rsp_lkey,
            cqes,
            s: RefCell::new(State {
                phase: Phase::Connecting,
                reqs: (0..qd).map(|_| Req::new()).collect(),
                free: (0..qd).rev().collect(),
                sess: Session::default(),
                sq_head: 0,
                waiting_recvs: VecDeque::new(),
                wait_buf: VecDeque::new(),
                wait_read: VecDeque::new(),
                wait_send: VecDeque::new(),
                read_depth: 0,
                max_read: r.max_read.max(1),
                send_depth: 0,
                max_send: 2 * qd as u32,
                sends_out: 0,
                recvs_posted: 0,
                outstanding: 0,
                why_closed: None,
                close_deadline: None,
                torn_down: false,
                forced: false,
            }),
        });
        *c.me.borrow_mut() = Rc::downgrade(&c);
        if let Some(p) = &c.recvs {
            let mut s = c.s.borrow_mut();
            for i in 0..p.len() {
                if let Err(e) = c.id.post_recv(wr::id(wr::RECV, i), p.sge(i)) {
                    log::error!("nvmf_rdma: {}: {e}", c.peer);
                    break;
                }
                s.recvs_posted += 1;
            }
        }
        c.key.set(pg.add_qpair(c.clone()));
        Ok(c)
    }

    /// Sends the accept with CRQSIZE, our queue depth (the connection is ready from here on).
    pub fn accept(self: &Rc<Self>, g: &RdmaGroup) {
        let mut pd = [0u8; nvme_proto::rdma::PRIVATE_DATA_LEN];
        CmAccept {
            recfmt: 0,
            crqsize: self.qd,
        }
        .encode(&mut pd);
        let max_read = self.s.borrow().max_read.min(u8::MAX as u32) as u8;
        self.s.borrow_mut().phase = Phase::Ready;
        if let Err(e) = self.id.accept(&pd, max_read) {
            log::error!("nvmf_rdma: {}: {e}", self.peer);
            self.close(g, "accept failed");
        }
    }

    fn me(&self) -> Option<Rc<Conn>> {
        self.me.borrow().upgrade()
    }

    /// A completion of one of this queue pair's work requests.
    pub fn completion(&self, g: &RdmaGroup, wc: &Wc) {
        let (kind, idx) = wr::split(wc.wr_id);
        let ok = wc.status == verbs::WC_SUCCESS;
        if !ok && wc.status != verbs::WC_FLUSH_ERR {
            log::error!(
                "nvmf_rdma: {} queue {}: work request failed: {} ({})",
                self.peer,
                self.qid,
                verbs::wc_status_str(wc.status),
                wc.status
            );
        }
        match kind {
            wr::RECV => {
                {
                    let mut s = self.s.borrow_mut();
                    if self.recvs.is_some() {
                        s.recvs_posted = s.recvs_posted.saturating_sub(1);
                    }
                }
                if ok {
                    self.recv(g, idx, wc.byte_len);
                } else {
                    self.close(g, "receive failed");
                }
            }
            wr::SEND => {
                {
                    let mut s = self.s.borrow_mut();
                    s.sends_out = s.sends_out.saturating_sub(1);
                    self.release(&mut s, g, idx as u16);
                }
                if !ok {
                    self.close(g, "send failed");
                }
                self.progress(g);
            }
            wr::READ => {
                let exec = {
                    let mut s = self.s.borrow_mut();
                    s.sends_out = s.sends_out.saturating_sub(1);
                    s.read_depth = s.read_depth.saturating_sub(1);
                    s.send_depth = s.send_depth.saturating_sub(1);
                    let closing = s.phase != Phase::Ready;
                    let r = &mut s.reqs[idx as usize];
                    r.wrs = r.wrs.saturating_sub(1);
                    r.reads_left = r.reads_left.saturating_sub(1);
                    if r.reads_left == 0 && r.state == ReqState::Reading {
                        if closing || !ok {
                            self.release(&mut s, g, idx as u16);
                            false
                        } else {
                            true
                        }
                    } else {
                        false
                    }
                };
                if !ok {
                    self.close(g, "RDMA READ failed");
                } else if exec {
                    let mut s = self.s.borrow_mut();
                    self.exec(&mut s, g, idx as u16);
                }
                self.progress(g);
            }
            // Unsignaled: only a flushed one reports; its SEND's completion accounts for it.
            _ => {}
        }
        self.check_closing(g);
    }

    /// A capsule arrived in receive `idx`.
    fn recv(&self, g: &RdmaGroup, idx: u32, byte_len: u32) {
        let mut s = self.s.borrow_mut();
        if s.phase != Phase::Ready {
            self.repost(&mut s, idx);
            return;
        }
        if (byte_len as usize) < 64 {
            self.repost(&mut s, idx);
            drop(s);
            self.close(g, &format!("capsule of {byte_len} bytes"));
            return;
        }
        match s.free.pop() {
            Some(slot) => self.start(&mut s, g, slot, idx, byte_len),
            // The slot of an answered command frees when its SEND completes, which the host may not wait for.
            None => s.waiting_recvs.push_back((idx, byte_len)),
        }
    }

    /// Gives a receive back: to the shared queue, or to the queue pair's own (unless closing).
    fn repost(&self, s: &mut State, idx: u32) {
        match &self.recvs {
            None => self.dev.repost_srq(idx),
            Some(p) => {
                if s.phase != Phase::Ready && s.phase != Phase::Connecting {
                    return;
                }
                match self.id.post_recv(wr::id(wr::RECV, idx), p.sge(idx)) {
                    Ok(()) => s.recvs_posted += 1,
                    Err(e) => log::error!("nvmf_rdma: {}: {e}", self.peer),
                }
            }
        }
    }

    fn pool(&self) -> &RecvPool {
        match &self.recvs {
            Some(p) => p,
            None => &self.dev.srq.as_ref().expect("shared receive queue").1,
        }
    }

    /// Starts the command in receive `idx` in `slot` (SPDK's `nvmf_rdma_request_parse_sgl`).
    fn start(&self, s: &mut State, g: &RdmaGroup, slot: u16, idx: u32, byte_len: u32) {
        let mut sqe = Sqe::default();
        sqe.0.copy_from_slice(&self.pool().capsule(idx)[..64]);
        // SQ head: one more command taken from the host's queue (0-based size, wraps).
        s.sq_head = if s.sq_head >= s.sess.sqsize {
            0
        } else {
            s.sq_head + 1
        };
        s.reqs[slot as usize] = Req {
            sqe,
            state: ReqState::NeedBuf,
            ..Req::new()
        };
        let dir = if sqe.opc() == FABRICS {
            sqe.fctype() & 0x3
        } else {
            sqe.opc() & 0x3
        };
        let d = sqe.sgl1();
        let xfer = match dir {
            0 => Xfer::None,
            1 => Xfer::H2C,
            2 => Xfer::C2H,
            _ => return self.fail_start(s, g, slot, idx, generic::INVALID_FIELD),
        };
        if xfer == Xfer::None || (d.len == 0 && d.ty != sgl::TYPE_LAST_SEGMENT) {
            self.repost(s, idx);
            self.exec(s, g, slot);
            return;
        }
        let icd = g.shared.opts.in_capsule_data_size;
        let max_io = g.shared.opts.max_io_size;
        let received = byte_len - 64;
        let mut remote = [Remote::default(); MAX_SGL];
        let (nremote, len, in_capsule) = match (d.ty, d.subtype) {
            (sgl::TYPE_KEYED_DATA_BLOCK, sgl::SUBTYPE_ADDRESS | sgl::SUBTYPE_INVALIDATE_KEY) => {
                if d.len > max_io {
                    log::error!(
                        "nvmf_rdma: SGL length {:#x} exceeds max io size {max_io:#x}",
                        d.len
                    );
                    return self.fail_start(s, g, slot, idx, generic::DATA_SGL_LENGTH_INVALID);
                }
                remote[0] = Remote {
                    addr: d.addr,
                    key: d.key,
                    len: d.len,
                };
                (1, d.len, None)
            }
            (sgl::TYPE_DATA_BLOCK, sgl::SUBTYPE_OFFSET) => {
                if xfer != Xfer::H2C {
                    return self.fail_start(s, g, slot, idx, generic::INVALID_FIELD);
                }
                if d.addr > icd as u64 {
                    log::error!(
                        "nvmf_rdma: In-capsule offset {:#x} exceeds capsule length {icd:#x}",
                        d.addr
                    );
                    return self.fail_start(s, g, slot, idx, generic::INVALID_SGL_OFFSET);
                }
                let off = d.addr as u32;
                // The data must fit in the capsule, and have been sent.
                if d.len > icd - off || off as u64 + d.len as u64 > received as u64 {
                    log::error!(
                        "nvmf_rdma: In-capsule data length {:#x} exceeds capsule length {:#x}",
                        d.len,
                        (icd - off).min(received.saturating_sub(off))
                    );
                    return self.fail_start(s, g, slot, idx, generic::DATA_SGL_LENGTH_INVALID);
                }
                (0, d.len, Some((idx, off)))
            }
            (sgl::TYPE_LAST_SEGMENT, sgl::SUBTYPE_OFFSET) => {
                // Up to 16 keyed descriptors in the capsule (SPDK's `nvmf_rdma_request_fill_iovs_multi_sgl`).
                let n = d.len as usize / 16;
                if d.addr > icd as u64
                    || d.len % 16 != 0
                    || n == 0
                    || n > MAX_SGL
                    || d.addr + d.len as u64 > received as u64
                {
                    return self.fail_start(s, g, slot, idx, generic::DATA_SGL_LENGTH_INVALID);
                }
                let cap = self.pool().capsule(idx);
                let mut total = 0u64;
                for (i, rm) in remote.iter_mut().enumerate().take(n) {
                    let o = 64 + d.addr as usize + i * 16;
                    let mut b = [0u8; 16];
                    b.copy_from_slice(&cap[o..o + 16]);
                    let e = nvme_proto::cmd::SglDesc::decode(&b);
                    if e.ty != sgl::TYPE_KEYED_DATA_BLOCK
                        || !matches!(
                            e.subtype,
                            sgl::SUBTYPE_ADDRESS | sgl::SUBTYPE_INVALIDATE_KEY
                        )
                    {
                        return self.fail_start(
                            s,
                            g,
                            slot,
                            idx,
                            generic::SGL_DESCRIPTOR_TYPE_INVALID,
                        );
                    }
                    total += e.len as u64;
                    *rm = Remote {
                        addr: e.addr,
                        key: e.key,
                        len: e.len,
                    };
                }
                if total > max_io as u64 {
                    log::error!(
                        "nvmf_rdma: Multi SGL length {total:#x} exceeds max io size {max_io:#x}"
                    );
                    return self.fail_start(s, g, slot, idx, generic::DATA_SGL_LENGTH_INVALID);
                }
                (n as u8, total as u32, None)
            }
            _ => {
                log::error!(
                    "nvmf_rdma: Invalid NVMf I/O Command SGL: Type {:#x}, Subtype {:#x}",
                    d.ty,
                    d.subtype
                );
                return self.fail_start(s, g, slot, idx, generic::SGL_DESCRIPTOR_TYPE_INVALID);
            }
        };
        let r = &mut s.reqs[slot as usize];
        r.remote = remote;
        r.nremote = nremote;
        r.len = len;
        r.icd = in_capsule;
        if in_capsule.is_none() {
            // The capsule is consumed (its SGL copied): the receive goes back at once.
            self.repost(s, idx);
        }
        if len == 0 {
            s.reqs[slot as usize].xfer = Xfer::None;
            self.exec(s, g, slot);
            return;
        }
        s.reqs[slot as usize].xfer = xfer;
        s.wait_buf.push_back(slot);
        self.take_bufs(s, g);
    }

    /// A command that cannot start: its receive goes back and it completes with `sc`.
    fn fail_start(&self, s: &mut State, g: &RdmaGroup, slot: u16, idx: u32, sc: u8) {
        self.repost(s, idx);
        s.reqs[slot as usize].xfer = Xfer::None;
        self.complete(s, g, slot, err(sc), 0, 0);
    }

    /// Gives data buffers to the commands waiting for one, in order; each then reads its data or runs.
    fn take_bufs(&self, s: &mut State, g: &RdmaGroup) {
        while let Some(&slot) = s.wait_buf.front() {
            let len = s.reqs[slot as usize].len;
            let Some((mut b, class)) = g.get_buf(len) else {
                if let Some(me) = self.me() {
                    g.starve(&me);
                }
                return;
            };
            let lkey = registered(&mut self.dev.xlat.borrow_mut(), &b, len as usize);
            let Some(lkey) = lkey else {
                s.wait_buf.pop_front();
                g.put_buf(b, class);
                log::error!("nvmf_rdma: a data buffer is not registered with the device");
                if let Some((idx, _)) = s.reqs[slot as usize].icd.take() {
                    self.repost(s, idx);
                }
                s.reqs[slot as usize].xfer = Xfer::None;
                self.complete(s, g, slot, err(generic::INTERNAL_DEVICE_ERROR), 0, 0);
                continue;
            };
            s.wait_buf.pop_front();
            let r = &mut s.reqs[slot as usize];
            if let Some((idx, off)) = r.icd.take() {
                let cap = self.pool().capsule(idx);
                let from = 64 + off as usize;
                b.as_mut_slice()[..len as usize].copy_from_slice(&cap[from..from + len as usize]);
                r.buf = Some((b, class));
                r.lkey = lkey;
                self.repost(s, idx);
                self.exec(s, g, slot);
                continue;
            }
            r.buf = Some((b, class));
            r.lkey = lkey;
            if r.xfer == Xfer::H2C {
                r.state = ReqState::NeedRead;
                s.wait_read.push_back(slot);
            } else {
                self.exec(s, g, slot);
            }
        }
        self.post_reads(s, g);
    }

    /// Retries commands waiting for data buffers (the group calls this every poll while they wait).
    pub fn retry_bufs(&self, g: &RdmaGroup) {
        {
            let mut s = self.s.borrow_mut();
            if s.phase == Phase::Ready {
                self.take_bufs(&mut s, g);
            }
        }
        self.check_closing(g);
    }

    /// Posts the RDMA READs of waiting commands while the read depth and the send queue allow.
    fn post_reads(&self, s: &mut State, g: &RdmaGroup) {
        let _ = g;
        while let Some(&slot) = s.wait_read.front() {
            let n = s.reqs[slot as usize].nremote as u32;
            if s.read_depth + n > s.max_read || s.send_depth + n > s.max_send {
                return;
            }
            s.wait_read.pop_front();
            let r = &mut s.reqs[slot as usize];
            let base = r.buf.as_ref().map_or(0, |b| b.0.as_ptr() as u64);
            let mut wrs = [SendWr {
                wr_id: 0,
                op: Op::Send,
                sge: Sge::default(),
                signaled: false,
            }; MAX_WRS];
            let mut off = 0u64;
            for (i, rm) in r.remote[..n as usize].iter().enumerate() {
                wrs[i] = SendWr {
                    wr_id: wr::id(wr::READ, slot as u32),
                    op: Op::Read {
                        raddr: rm.addr,
                        rkey: rm.key,
                    },
                    sge: Sge {
                        addr: base + off,
                        len: rm.len,
                        lkey: r.lkey,
                    },
                    signaled: true,
                };
                off += rm.len as u64;
            }
            r.state = ReqState::Reading;
            r.reads_left = n as u16;
            r.wrs = n;
            s.read_depth += n;
            s.send_depth += n;
            s.sends_out += n;
            if let Err(e) = self.id.post_send(&wrs[..n as usize]) {
                log::error!("nvmf_rdma: {}: RDMA READ: {e}", self.peer);
                // Nothing was posted: undo, and close.
                s.read_depth -= n;
                s.send_depth -= n;
                s.sends_out -= n;
                let r = &mut s.reqs[slot as usize];
                r.reads_left = 0;
                r.wrs = 0;
                self.release(s, g, slot);
                self.begin_close(s, "post send failed");
                return;
            }
        }
    }

    /// Runs a command whose data (if any) is here.
    fn exec(&self, s: &mut State, g: &RdmaGroup, slot: u16) {
        let id = Ident {
            tls_identity: None,
            key: self.key.get(),
            listen: &self.listen,
            peer: self.peer,
            opts: &g.shared.opts,
        };
        let State { sess, reqs, .. } = s;
        let r = &mut reqs[slot as usize];
        r.state = ReqState::Executing;
        let sqe = r.sqe;
        let (len, c2h) = (r.len, r.xfer == Xfer::C2H);
        // SAFETY: the buffer belongs to this slot until its response's SEND completes, which happens only after
        // every bdev I/O submitted here has completed (`pending` counts them); a closing connection waits for
        // `outstanding` to drain before it gives any buffer back.
        let out = unsafe { sess.exec(&id, &sqe, r.buf.as_mut().map(|b| &mut b.0), len, c2h, slot) };
        match out {
            Outcome::Done { status, dw0, dw1 } => self.complete(s, g, slot, status, dw0, dw1),
            Outcome::Submitted(n) => {
                s.reqs[slot as usize].pending = n;
                s.outstanding += n as u32;
            }
            Outcome::Parked => {}
        }
        // A fused Compare whose Write did not follow (or whose pair was refused) is answered now.
        if let Some((first, st)) = s.sess.take_orphan() {
            self.complete(s, g, first, st, 0, 0);
        }
    }

    /// Builds the response of `slot` and queues it (with its data) for the send queue.
    fn complete(&self, s: &mut State, g: &RdmaGroup, slot: u16, st: Status, dw0: u32, dw1: u32) {
        if s.phase != Phase::Ready {
            self.release(s, g, slot);
            return;
        }
        let cqe = Cqe {
            dw0,
            dw1,
            sqhd: s.sq_head,
            sqid: s.sess.qid,
            cid: s.reqs[slot as usize].sqe.cid(),
            status: st,
            phase: false,
        };
        let mut b = [0u8; 16];
        cqe.encode(&mut b);
        let o = slot as usize * Cqe::SIZE;
        self.rsp.borrow_mut().as_mut_slice()[o..o + Cqe::SIZE].copy_from_slice(&b);
        let r = &mut s.reqs[slot as usize];
        r.status = st;
        r.state = ReqState::NeedSend;
        s.wait_send.push_back(slot);
        self.post_sends(s, g);
    }

    /// Posts waiting responses while the send queue has room: RDMA WRITEs of read data (unsignaled) chained
    /// before the SEND of the CQE (SPDK's `request_transfer_out`).
    fn post_sends(&self, s: &mut State, g: &RdmaGroup) {
        while let Some(&slot) = s.wait_send.front() {
            let r = &s.reqs[slot as usize];
            let data = r.xfer == Xfer::C2H && r.status.is_success() && r.len > 0;
            let nw = if data { r.nremote as u32 } else { 0 };
            if s.send_depth + nw + 1 > s.max_send {
                return;
            }
            s.wait_send.pop_front();
            let mut wrs = [SendWr {
                wr_id: 0,
                op: Op::Send,
                sge: Sge::default(),
                signaled: false,
            }; MAX_WRS];
            if data {
                let base = r.buf.as_ref().map_or(0, |b| b.0.as_ptr() as u64);
                let mut off = 0u64;
                // Only as much as the command produced, in the host's descriptors' order.
                let mut left = r.len as u64;
                for (i, rm) in r.remote[..nw as usize].iter().enumerate() {
                    let len = (rm.len as u64).min(left);
                    wrs[i] = SendWr {
                        wr_id: wr::id(wr::WRITE, slot as u32),
                        op: Op::Write {
                            raddr: rm.addr,
                            rkey: rm.key,
                        },
                        sge: Sge {
                            addr: base + off,
                            len: len as u32,
                            lkey: r.lkey,
                        },
                        signaled: false,
                    };
                    off += len;
                    left -= len;
                }
            }
            wrs[nw as usize] = SendWr {
                wr_id: wr::id(wr::SEND, slot as u32),
                op: Op::Send,
                sge: Sge {
                    addr: self.rsp.borrow().as_ptr() as u64 + slot as u64 * Cqe::SIZE as u64,
                    len: Cqe::SIZE as u32,
                    lkey: self.rsp_lkey,
                },
                signaled: true,
            };
            let n = nw + 1;
            let r = &mut s.reqs[slot as usize];
            r.state = ReqState::Responding;
            r.wrs = n;
            s.send_depth += n;
            s.sends_out += 1;
            if let Err(e) = self.id.post_send(&wrs[..n as usize]) {
                log::error!("nvmf_rdma: {}: SEND: {e}", self.peer);
                s.send_depth -= n;
                s.sends_out -= 1;
                s.reqs[slot as usize].wrs = 0;
                self.release(s, g, slot);
                self.begin_close(s, "post send failed");
                return;
            }
            if let Some(pg) = self.pg.upgrade() {
                pg.stats
                    .completed_nvme_io
                    .set(pg.stats.completed_nvme_io.get() + 1);
            }
        }
    }

    /// Frees a slot: its send queue entries, its buffer.
    fn release(&self, s: &mut State, g: &RdmaGroup, slot: u16) {
        let r = &mut s.reqs[slot as usize];
        if r.state == ReqState::Free {
            return;
        }
        let wrs = std::mem::take(&mut r.wrs);
        r.state = ReqState::Free;
        if let Some((b, c)) = r.buf.take() {
            g.put_buf(b, c);
        }
        let icd = r.icd.take();
        s.send_depth = s.send_depth.saturating_sub(wrs);
        s.free.push(slot);
        if let Some((idx, _)) = icd {
            // Only on the closing path: the receive is not needed any more.
            if self.recvs.is_none() {
                self.dev.repost_srq(idx);
            }
        }
    }

    /// After a slot or send queue room freed: capsules waiting for a slot start, waiting transfers go.
    fn progress(&self, g: &RdmaGroup) {
        let mut s = self.s.borrow_mut();
        if s.phase != Phase::Ready {
            return;
        }
        while !s.waiting_recvs.is_empty() && !s.free.is_empty() {
            let (idx, len) = s.waiting_recvs.pop_front().expect("not empty");
            let slot = s.free.pop().expect("not empty");
            self.start(&mut s, g, slot, idx, len);
        }
        self.post_reads(&mut s, g);
        self.post_sends(&mut s, g);
    }

    /// Starts closing (SPDK's `nvmf_rdma_close_qpair`): the queue pair goes to the error state, so posted
    /// work requests come back flushed; the connection goes once they have and its bdev I/O is done.
    pub fn close(&self, g: &RdmaGroup, why: &str) {
        {
            let mut s = self.s.borrow_mut();
            self.begin_close(&mut s, why);
            if s.phase != Phase::Closing || std::mem::replace(&mut s.torn_down, true) {
                return;
            }
            // Work that has not reached the wire or the bdev is dropped now.
            let st = &mut *s;
            let waiting: Vec<u16> = st
                .wait_buf
                .drain(..)
                .chain(st.wait_read.drain(..))
                .chain(st.wait_send.drain(..))
                .collect();
            for slot in waiting {
                self.release(&mut s, g, slot);
            }
            let recvs: Vec<(u32, u32)> = s.waiting_recvs.drain(..).collect();
            if self.recvs.is_none() {
                for (idx, _) in recvs {
                    self.dev.repost_srq(idx);
                }
            }
            // Parked commands (AERs) have nothing outstanding.
            for slot in 0..s.reqs.len() as u16 {
                if s.reqs[slot as usize].state == ReqState::Executing
                    && s.reqs[slot as usize].pending == 0
                {
                    self.release(&mut s, g, slot);
                }
            }
        }
        self.id.disconnect();
        if let Some(me) = self.me() {
            g.closing(&me);
        }
        self.check_closing(g);
    }

    /// Marks the connection closing (once).
    fn begin_close(&self, s: &mut State, why: &str) {
        if matches!(s.phase, Phase::Closing | Phase::Closed) {
            return;
        }
        s.phase = Phase::Closing;
        s.why_closed.get_or_insert(why.to_string());
        s.close_deadline = Some(Instant::now() + FLUSH_WAIT);
    }

    fn check_closing(&self, g: &RdmaGroup) {
        let (closing, torn_down) = {
            let s = self.s.borrow();
            (s.phase == Phase::Closing, s.torn_down)
        };
        if closing && !torn_down {
            // Marked closing under a borrow (a failed post): finish the teardown now.
            self.close(g, "");
            return;
        }
        if closing {
            if let Some(me) = self.me() {
                g.closing(&me);
            }
            self.try_finish_close(g, Instant::now());
        }
    }

    /// Finishes closing once bdev I/O is done and the flushed work requests are back (or the wait is over).
    pub fn try_finish_close(&self, g: &RdmaGroup, now: Instant) {
        let why = {
            let mut s = self.s.borrow_mut();
            if s.phase != Phase::Closing || s.outstanding > 0 {
                return;
            }
            let drained = s.sends_out == 0 && (self.recvs.is_none() || s.recvs_posted == 0);
            let late = s.close_deadline.is_some_and(|d| now >= d);
            if !drained && !late {
                return;
            }
            if !drained && !s.forced {
                log::warn!(
                    "nvmf_rdma: {}: {} work requests not flushed; destroying the queue pair",
                    self.peer,
                    s.sends_out + s.recvs_posted
                );
            }
            s.phase = Phase::Closed;
            s.why_closed.take().unwrap_or_default()
        };
        // No more DMA once the queue pair is gone: then buffers go back.
        self.id.destroy_qp();
        {
            let mut s = self.s.borrow_mut();
            for slot in 0..s.reqs.len() as u16 {
                self.release(&mut s, g, slot);
            }
        }
        let _ = self.dev.reserve_cqes(-self.cqes);
        log::info!(
            "nvmf_rdma: connection from {} (queue {}) closed: {why}",
            self.peer,
            self.qid
        );
        g.forget(self);
        if let Some(pg) = self.pg.upgrade() {
            pg.remove_qpair(self.key.get());
        }
        // Take the session out first: closing it may reach other queue pairs by message only, never this one.
        let mut sess = std::mem::take(&mut self.s.borrow_mut().sess);
        sess.close(self.key.get());
    }

    /// Closes without waiting for flushed work requests (the poll group is stopping); bdev I/O is still
    /// waited for, as its buffers are ours.
    pub fn force_close(&self, g: &RdmaGroup) {
        {
            let mut s = self.s.borrow_mut();
            s.close_deadline = Some(Instant::now());
            s.forced = true;
        }
        self.try_finish_close(g, Instant::now());
    }
}

impl Qpair for Conn {
    fn abort(&self, cid: u16, done: Box<dyn FnOnce(bool)>) {
        let Some(g) = self.pg.upgrade().and_then(|pg| pg.group::<RdmaGroup>()) else {
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
            // Completed like a command that ran (the response path frees the slot).
            s.reqs[slot as usize].state = ReqState::Executing;
            let st = Status::generic(nvme_proto::status::generic::ABORTED_BY_REQUEST);
            self.complete(&mut s, &g, slot, st, 0, 0);
            drop(s);
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
        let Some(g) = self.pg.upgrade().and_then(|pg| pg.group::<RdmaGroup>()) else {
            return;
        };
        let mut s = self.s.borrow_mut();
        if s.phase != Phase::Ready
            || s.reqs.get(slot as usize).map(|r| r.state) != Some(ReqState::Executing)
        {
            return;
        }
        self.complete(&mut s, &g, slot, status, dw0, 0);
    }

    fn io_done(&self, slot: u16, io: IoHandle) {
        let st = nvmf::io::status_of(io.status());
        let dw0 = io.nvme_cdw0();
        // The descriptor goes back to the pool before the response is built.
        drop(io);
        let Some(g) = self.pg.upgrade().and_then(|pg| pg.group::<RdmaGroup>()) else {
            return;
        };
        {
            let mut s = self.s.borrow_mut();
            s.outstanding = s.outstanding.saturating_sub(1);
            let r = &mut s.reqs[slot as usize];
            r.pending = r.pending.saturating_sub(1);
            r.dw0 |= dw0;
            if !st.is_success() && r.status.is_success() {
                r.status = st;
            }
            if r.pending == 0 && r.state == ReqState::Executing {
                let (st, dw0) = (r.status, r.dw0);
                // The Write of a fused pair answers for its Compare too.
                let (st, first) = match s.sess.fused_done(slot, st) {
                    Some((first, fst, sst)) => (sst, Some((first, fst))),
                    None => (st, None),
                };
                if s.phase == Phase::Ready {
                    if let Some((f, fst)) = first {
                        self.complete(&mut s, &g, f, fst, 0, 0);
                    }
                    self.complete(&mut s, &g, slot, st, dw0, 0);
                } else {
                    self.release(&mut s, &g, slot);
                    if let Some((f, _)) = first {
                        self.release(&mut s, &g, f);
                    }
                }
            }
        }
        self.check_closing(&g);
    }

    fn disconnect(&self) {
        if let Some(g) = self.pg.upgrade().and_then(|pg| pg.group::<RdmaGroup>()) {
            self.close(&g, "disconnected by the target");
        }
    }

    fn info(&self) -> Option<(String, nvmf::params::QpairInfo)> {
        use nvmf::params::stats::QpairState;
        let s = self.s.borrow();
        let state = match s.phase {
            Phase::Ready => QpairState::Enabled,
            Phase::Connecting => QpairState::Connecting,
            _ => QpairState::Deactivating,
        };
        s.sess.qpair_info(state, &self.listen, "RDMA", self.peer)
    }
}
