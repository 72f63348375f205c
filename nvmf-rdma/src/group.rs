//! A poll group's RDMA part: per device a completion queue (and a shared receive queue with its capsule
//! buffers), the connections, and the data buffers their commands use.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use nvme_proto::rdma::{reject, CmReject};
use nvmf::pg::{Pg, TransportGroup};
use nvmf::tgt::Trid;
use reactor::dma::DmaBuf;
use reactor::memmap::TranslationCache;

use crate::conn::Conn;
use crate::transport::Shared;
use crate::verbs::{lkey_of, CmId, Cq, Device, Sge, Srq, Wc};

/// Completions taken per poll of one completion queue (and rounds per poll).
const POLL_BATCH: usize = 32;
const POLL_ROUNDS: usize = 4;

/// Work request kinds, in the top byte of a work request id; the rest is a slot or receive index.
pub(crate) mod wr {
    /// A receive (index in its pool).
    pub const RECV: u64 = 1;
    /// A response SEND (command slot).
    pub const SEND: u64 = 2;
    /// An RDMA READ of a command's data (command slot).
    pub const READ: u64 = 3;
    /// An RDMA WRITE of a command's data (command slot; unsignaled, seen only when flushed).
    pub const WRITE: u64 = 4;

    /// The id of a work request.
    pub fn id(kind: u64, idx: u32) -> u64 {
        kind << 56 | idx as u64
    }

    /// Kind and index of a work request id.
    pub fn split(id: u64) -> (u64, u32) {
        (id >> 56, id as u32)
    }
}

/// What the acceptor tells a poll group about a new connection.
pub(crate) struct ConnReq {
    /// Token in the CM id's context.
    pub token: u64,
    /// Queue id the host announced.
    pub qid: u16,
    /// Negotiated queue depth.
    pub qd: u16,
    /// RDMA READs we may have outstanding.
    pub max_read: u32,
    /// The host's address.
    pub peer: SocketAddr,
    /// The listener.
    pub listen: Trid,
    /// The device's key.
    pub dev: usize,
}

/// Receive buffers: `n` capsules of `stride` bytes (SQE and in-capsule data) in one registered buffer.
pub(crate) struct RecvPool {
    buf: DmaBuf,
    stride: usize,
    lkey: u32,
}

impl RecvPool {
    /// `n` receive buffers of one SQE plus `icd` bytes each, registered with the device of `xlat`.
    pub fn new(n: u32, icd: u32, xlat: &mut TranslationCache) -> std::io::Result<RecvPool> {
        let stride = 64 + icd as usize;
        let buf = DmaBuf::alloc(stride * n as usize)?;
        let lkey = registered(xlat, &buf, buf.len())
            .ok_or_else(|| std::io::Error::other("receive buffers are not registered"))?;
        Ok(RecvPool { buf, stride, lkey })
    }

    /// The scatter-gather entry of receive `i`.
    pub fn sge(&self, i: u32) -> Sge {
        Sge {
            addr: self.buf.as_ptr() as u64 + i as u64 * self.stride as u64,
            len: self.stride as u32,
            lkey: self.lkey,
        }
    }

    /// The bytes of receive `i`.
    pub fn capsule(&self, i: u32) -> &[u8] {
        let o = i as usize * self.stride;
        &self.buf.as_slice()[o..o + self.stride]
    }

    /// How many receives the pool has.
    pub fn len(&self) -> u32 {
        (self.buf.len() / self.stride) as u32
    }
}

/// The local key of `len` bytes of `buf`, when the device's memory map registered them in one region.
pub(crate) fn registered(xlat: &mut TranslationCache, buf: &DmaBuf, len: usize) -> Option<u32> {
    let (v, n) = xlat.translate(buf.as_ptr() as usize, len.max(1))?;
    (n >= len.max(1)).then(|| lkey_of(v))
}

/// A poll group's part for one device.
pub(crate) struct DevPoller {
    /// Index in the group.
    pub idx: usize,
    /// The device.
    pub dev: Arc<Device>,
    /// Completions of every queue pair of the device on this poll group.
    pub cq: Cq,
    /// The shared receive queue and its buffers (none with `no_srq`).
    pub srq: Option<(Srq, RecvPool)>,
    /// Completion queue entries the queue pairs can have outstanding at once.
    cqe_needed: Cell<i32>,
    /// Translations of the device's memory map.
    pub xlat: RefCell<TranslationCache>,
}

impl DevPoller {
    /// Gives a receive back to the shared receive queue.
    pub fn repost_srq(&self, i: u32) {
        if let Some((srq, pool)) = &self.srq {
            if let Err(e) = srq.post_recv(wr::id(wr::RECV, i), pool.sge(i)) {
                log::error!("nvmf_rdma: {}: {e}", self.dev.attr.name);
            }
        }
    }

    /// Makes room in the completion queue for `n` more entries (SPDK's `nvmf_rdma_resize_cq`), or gives them
    /// back (`n` negative).
    pub fn reserve_cqes(&self, n: i32) -> std::io::Result<()> {
        let need = self.cqe_needed.get() + n;
        if n > 0 && need > self.cq.size() {
            if need > self.dev.attr.max_cqe {
                return Err(std::io::Error::other(format!(
                    "RDMA CQE requirement ({need}) exceeds device max_cqe limitation ({})",
                    self.dev.attr.max_cqe
                )));
            }
            let size = (self.cq.size() * 2).max(need).min(self.dev.attr.max_cqe);
            self.cq.resize(size)?;
        }
        self.cqe_needed.set(need.max(0));
        Ok(())
    }
}

/// Size classes of data buffers: `io_unit_size << k`, the last one `max_io_size`.
struct BufPool {
    sizes: Vec<u32>,
    free: Vec<RefCell<Vec<DmaBuf>>>,
}

impl BufPool {
    fn new(io_unit: u32, max_io: u32) -> BufPool {
        let mut sizes = Vec::new();
        let mut s = io_unit.max(4096);
        while s < max_io {
            sizes.push(s);
            s = s.saturating_mul(2);
        }
        sizes.push(max_io.max(4096));
        let free = sizes.iter().map(|_| RefCell::new(Vec::new())).collect();
        BufPool { sizes, free }
    }

    fn class_of(&self, len: u32) -> usize {
        self.sizes
            .iter()
            .position(|s| *s >= len)
            .unwrap_or(self.sizes.len() - 1)
    }
}

/// A poll group's RDMA part.
pub struct RdmaGroup {
    pub(crate) shared: Arc<Shared>,
    pub(crate) devs: Vec<Rc<DevPoller>>,
    /// Connections by (device index, queue pair number).
    conns: RefCell<HashMap<(usize, u32), Rc<Conn>>>,
    /// Connections by CM token.
    tokens: RefCell<HashMap<u64, (usize, u32)>>,
    bufs: BufPool,
    /// Connections with commands waiting for a data buffer.
    starving: RefCell<Vec<Rc<Conn>>>,
    /// Connections closing (waiting for their I/O and flushed work requests).
    closing: RefCell<Vec<Rc<Conn>>>,
}

impl RdmaGroup {
    /// The part for this thread's poll group: a completion queue per device, and a shared receive queue of
    /// `max_srq_depth` (capped by the device) unless `no_srq`.
    pub(crate) fn new(shared: Arc<Shared>) -> std::io::Result<Rc<RdmaGroup>> {
        let mut devs = Vec::new();
        for (idx, dev) in shared.devices.iter().enumerate() {
            let mut xlat = dev.translations();
            let srq_depth = (shared.rdma.max_srq_depth as i32)
                .min(dev.attr.max_srq_wr)
                .clamp(1, u16::MAX as i32) as u32;
            let use_srq = !shared.rdma.no_srq && dev.attr.max_srq > 0;
            // With a shared receive queue the completion queue starts at three entries per receive (SPDK's
            // sizing); without, at `num_cqe`. Either grows as queue pairs come.
            let cqe = if use_srq {
                srq_depth as i32 * 3
            } else {
                shared.rdma.num_cqe.max(1)
            }
            .min(dev.attr.max_cqe.max(1));
            let cq = Cq::new(dev, cqe)?;
            let srq = if use_srq {
                if shared.rdma.max_srq_depth as i32 > dev.attr.max_srq_wr {
                    log::warn!(
                        "nvmf_rdma: Requested SRQ depth {}, max supported by dev {} is {}",
                        shared.rdma.max_srq_depth,
                        dev.attr.name,
                        dev.attr.max_srq_wr
                    );
                }
                let srq = Srq::new(dev, srq_depth, 1)?;
                let pool = RecvPool::new(srq_depth, shared.opts.in_capsule_data_size, &mut xlat)?;
                for i in 0..pool.len() {
                    srq.post_recv(wr::id(wr::RECV, i), pool.sge(i))?;
                }
                Some((srq, pool))
            } else {
                None
            };
            let p = DevPoller {
                idx,
                dev: dev.clone(),
                cq,
                cqe_needed: Cell::new(if use_srq { srq_depth as i32 } else { 0 }),
                srq,
                xlat: RefCell::new(xlat),
            };
            devs.push(Rc::new(p));
        }
        Ok(Rc::new(RdmaGroup {
            bufs: BufPool::new(shared.opts.io_unit_size, shared.opts.max_io_size),
            shared,
            devs,
            conns: RefCell::new(HashMap::new()),
            tokens: RefCell::new(HashMap::new()),
            starving: RefCell::new(Vec::new()),
            closing: RefCell::new(Vec::new()),
        }))
    }

    /// A data buffer of at least `len` bytes, within `num_shared_buffers` units of `io_unit_size`: the buffer
    /// and its size class.
    pub(crate) fn get_buf(&self, len: u32) -> Option<(DmaBuf, u8)> {
        let c = self.bufs.class_of(len);
        let size = self.bufs.sizes[c];
        let units = size.div_ceil(self.shared.opts.io_unit_size.max(1));
        let cap = self.shared.opts.num_shared_buffers;
        let used = &self.shared.units_in_use;
        if used.fetch_add(units, Ordering::Relaxed) + units > cap.max(units) {
            used.fetch_sub(units, Ordering::Relaxed);
            return None;
        }
        let b = self.bufs.free[c].borrow_mut().pop();
        match b.map_or_else(|| DmaBuf::alloc(size as usize), Ok) {
            Ok(b) => Some((b, c as u8)),
            Err(e) => {
                log::error!("nvmf_rdma: data buffer of {size} bytes: {e}");
                used.fetch_sub(units, Ordering::Relaxed);
                None
            }
        }
    }

    /// Gives a data buffer back.
    pub(crate) fn put_buf(&self, b: DmaBuf, class: u8) {
        let c = class as usize;
        let units = self.bufs.sizes[c].div_ceil(self.shared.opts.io_unit_size.max(1));
        self.shared.units_in_use.fetch_sub(units, Ordering::Relaxed);
        self.bufs.free[c].borrow_mut().push(b);
    }

    /// A connection waits for data buffers: it is retried every poll until it has them.
    pub(crate) fn starve(&self, c: &Rc<Conn>) {
        let mut s = self.starving.borrow_mut();
        if !s.iter().any(|x| Rc::ptr_eq(x, c)) {
            s.push(c.clone());
        }
    }

    /// A connection started closing.
    pub(crate) fn closing(&self, c: &Rc<Conn>) {
        self.closing.borrow_mut().push(c.clone());
    }

    /// The connection of a CM token.
    pub(crate) fn conn_by_token(&self, token: u64) -> Option<Rc<Conn>> {
        let k = *self.tokens.borrow().get(&token)?;
        self.conns.borrow().get(&k).cloned()
    }

    /// Forgets a closed connection.
    pub(crate) fn forget(&self, c: &Conn) {
        let k = (c.dev.idx, c.qpn);
        self.conns.borrow_mut().remove(&k);
        self.tokens.borrow_mut().remove(&c.token);
        self.starving
            .borrow_mut()
            .retain(|x| !std::ptr::eq(&**x, c));
        self.closing.borrow_mut().retain(|x| !std::ptr::eq(&**x, c));
        reactor::lock(&self.shared.conns).remove(&c.token);
    }

    /// Sets up a connection handed over by the acceptor: queue pair, receives, accept (SPDK's
    /// `nvmf_rdma_qpair_initialize` and `nvmf_rdma_event_accept`).
    pub(crate) fn add_conn(self: &Rc<Self>, pg: &Rc<Pg>, id: CmId, r: ConnReq) {
        let token = r.token;
        match Conn::create(self, pg, id, r) {
            Ok(c) => {
                self.conns
                    .borrow_mut()
                    .insert((c.dev.idx, c.qpn), c.clone());
                self.tokens.borrow_mut().insert(token, (c.dev.idx, c.qpn));
                c.accept(self);
            }
            Err((id, e)) => {
                log::error!("nvmf_rdma: cannot set up the connection: {e}");
                let mut b = [0u8; 4];
                CmReject {
                    recfmt: 0,
                    sts: reject::NO_RESOURCES,
                }
                .encode(&mut b);
                if let Some(id) = id {
                    id.reject(&b);
                }
                reactor::lock(&self.shared.conns).remove(&token);
            }
        }
    }

    /// The host disconnected (or the connection failed): the connection closes.
    pub(crate) fn cm_disconnect(&self, token: u64, why: &str) {
        if let Some(c) = self.conn_by_token(token) {
            c.close(self, &format!("{why} from the host"));
        }
    }

    fn poll_dev(&self, d: &Rc<DevPoller>) -> bool {
        let mut wcs = [Wc::default(); POLL_BATCH];
        let mut any = false;
        for _ in 0..POLL_ROUNDS {
            let n = d.cq.poll(&mut wcs);
            for wc in &wcs[..n] {
                any = true;
                let c = self.conns.borrow().get(&(d.idx, wc.qp_num)).cloned();
                match c {
                    Some(c) => c.completion(self, wc),
                    None => {
                        // A receive of the shared queue for a connection that is gone: the buffer goes back.
                        let (kind, idx) = wr::split(wc.wr_id);
                        if kind == wr::RECV
                            && d.srq.is_some()
                            && wc.status == crate::verbs::WC_SUCCESS
                        {
                            d.repost_srq(idx);
                        }
                    }
                }
            }
            if n < POLL_BATCH {
                break;
            }
        }
        any
    }
}

impl TransportGroup for RdmaGroup {
    fn name(&self) -> &'static str {
        "RDMA"
    }

    fn poll(&self) -> bool {
        let mut busy = false;
        for d in &self.devs {
            busy |= self.poll_dev(d);
        }
        if !self.starving.borrow().is_empty() {
            let s: Vec<Rc<Conn>> = std::mem::take(&mut *self.starving.borrow_mut());
            for c in s {
                c.retry_bufs(self);
            }
        }
        if !self.closing.borrow().is_empty() {
            let now = Instant::now();
            let cs: Vec<Rc<Conn>> = self.closing.borrow().clone();
            for c in cs {
                c.try_finish_close(self, now);
            }
        }
        busy
    }

    fn shutdown(&self) {
        let cs: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        for c in cs {
            c.close(self, "target shutting down");
            c.force_close(self);
        }
    }
}
