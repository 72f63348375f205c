//! An NVMe/RDMA queue pair, host side (SPDK's `nvme_rdma.c`), polled by the thread that owns it.
//!
//! Connecting is librdmacm's sequence driven from [`RdmaQpair::poll`] (address, route, queue pair, connect with
//! the NVMe/RDMA private data: queue id and sizes), each step bounded by the connect timeout. Commands are SEND
//! capsules of the bare SQE from a registered ring of capsule slots (the command identifier is the slot); data
//! always travels by keyed SGL: the controller RDMA READs what is written and RDMA WRITEs what is read, straight
//! from and into the caller's buffers, which must be in the memory map (every region there is registered with
//! each device, remote access allowed). A command completes once both its response capsule arrived (one
//! registered 16-byte receive per slot, posted again at once) and its SEND completed, so a capsule slot is never
//! reused while the adapter may still read it. Nothing on this path allocates.
//!
//! Limits, as they stand: one keyed descriptor per command (buffers must be one registered range; the kernel's
//! target takes no more either), no in-capsule data.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvme_proto::cmd::{psdt, sgl, Cqe, SglDesc, Sqe};
use nvme_proto::host::{command_data, report_expired, CmdTimeout, Dir, Iov, SubmitError};
use nvme_proto::rdma::{CmAccept, CmRequest, PRIVATE_DATA_LEN};
use nvme_proto::status::{generic, Status};
use rdma::{event, CmEvent, CmId, Cq, Device, EventChannel, Op, QpCaps, SendWr, Sge, Wc};
use reactor::dma::DmaBuf;
use reactor::memmap::TranslationCache;

/// Size of a command capsule (the SQE alone: no in-capsule data).
const CAPSULE: usize = 64;
/// Size of a response capsule.
const RSP: usize = 16;
/// Work request ids: the kind in the high half, the slot in the low one.
const WR_SEND: u64 = 1 << 32;
const WR_RECV: u64 = 2 << 32;
/// CM steps' own time limit (address and route resolution), ms.
const RESOLVE_MS: i32 = 2000;

/// The RDMA devices of the process, opened once (each registers every I/O memory region as it comes).
fn devices() -> std::io::Result<Vec<Arc<Device>>> {
    static DEVS: Mutex<Option<Vec<Arc<Device>>>> = Mutex::new(None);
    let mut d = DEVS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = d.as_ref() {
        return Ok(v.clone());
    }
    let v = Device::open_all()?;
    *d = Some(v.clone());
    Ok(v)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    ResolvingAddr,
    ResolvingRoute,
    Connecting,
    Ready,
    Failed,
}

#[derive(Default)]
struct Slot {
    busy: bool,
    token: u64,
    /// The SEND of its capsule completed.
    sent: bool,
    /// Its response, once it arrived.
    rsp: Option<Cqe>,
    deadline: Option<Instant>,
}

/// An NVMe/RDMA queue pair.
pub struct RdmaQpair {
    // Dropped first: destroying the id destroys the queue pair, before the completion queue and the buffers.
    id: Option<CmId>,
    cq: Option<Cq>,
    ch: Arc<EventChannel>,
    dev: Option<Arc<Device>>,
    xl: Option<TranslationCache>,
    phase: Phase,
    qid: u16,
    capsules: DmaBuf,
    rsps: DmaBuf,
    capsule_lkey: u32,
    rsp_lkey: u32,
    slots: Vec<Slot>,
    free: Vec<u16>,
    max_xfer: u32,
    started: Instant,
    connect_timeout: Duration,
    /// The command timeout.
    timeout: CmdTimeout,
    error: Option<String>,
    wcs: Vec<Wc>,
    /// Work requests posted so far, (send, receive): one per post, so each was its own doorbell.
    posted: (u64, u64),
    knobs: RdmaKnobs,
}

/// The RDMA connection knobs of `bdev_nvme_set_options`, as SPDK's host applies them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RdmaKnobs {
    /// `transport_retry_count`: transmission retries of the queue pair (at most 7).
    pub retry_count: u8,
    /// `transport_ack_timeout`: local ACK timeout, 4.096 µs x 2^value (0: the device's default).
    pub ack_timeout: u8,
    /// `transport_tos`: IP type of service (0: none set).
    pub tos: u8,
}

impl Default for RdmaKnobs {
    /// SPDK's defaults: 4 retries, the device's ACK timeout, no TOS.
    fn default() -> RdmaKnobs {
        RdmaKnobs {
            retry_count: 4,
            ack_timeout: 0,
            tos: 0,
        }
    }
}

impl RdmaQpair {
    /// Starts connecting queue `qid` to the controller at `addr`: `depth` command slots, at most `max_xfer`
    /// bytes per command, `knobs` applied; each connecting step must finish within `connect_timeout`. The
    /// connection completes in [`RdmaQpair::poll`].
    pub fn connect(
        addr: SocketAddr,
        qid: u16,
        depth: u16,
        max_xfer: u32,
        connect_timeout: Duration,
        knobs: RdmaKnobs,
    ) -> std::io::Result<RdmaQpair> {
        let depth = depth.max(2);
        let n = depth as usize;
        let ch = EventChannel::new()?;
        let id = ch.resolve(addr, RESOLVE_MS)?;
        Ok(RdmaQpair {
            id: Some(id),
            cq: None,
            ch,
            dev: None,
            xl: None,
            phase: Phase::ResolvingAddr,
            qid,
            capsules: DmaBuf::alloc(n * CAPSULE)?,
            rsps: DmaBuf::alloc(n * RSP)?,
            capsule_lkey: 0,
            rsp_lkey: 0,
            slots: (0..n).map(|_| Slot::default()).collect(),
            free: (0..n as u16).rev().collect(),
            max_xfer,
            started: Instant::now(),
            connect_timeout,
            timeout: CmdTimeout::default(),
            error: None,
            wcs: vec![Wc::default(); 32],
            posted: (0, 0),
            knobs,
        })
    }

    /// Work requests posted so far: (send, receive).
    pub fn posted(&self) -> (u64, u64) {
        self.posted
    }

    /// The RDMA device the queue pair runs on, once connected.
    pub fn device_name(&self) -> Option<&str> {
        self.dev.as_ref().map(|d| d.attr.name.as_str())
    }

    /// Connected: commands may go.
    pub fn ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Why the queue pair failed, once it has.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Commands submitted and not completed.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Sends command `sqe` (its command identifier and data pointer are set here) with data `iovs` moving as
    /// `dir`; its completion is reported by [`RdmaQpair::poll`] with `token`.
    ///
    /// # Safety
    /// The iovecs must stay valid (writable for [`Dir::FromCtrl`]) and not be otherwise accessed until the
    /// command completes or the queue pair is dropped.
    pub unsafe fn submit(
        &mut self,
        mut sqe: Sqe,
        iovs: &[Iov],
        dir: Dir,
        token: u64,
    ) -> Result<(), SubmitError> {
        if self.phase != Phase::Ready {
            return Err(SubmitError::NotReady);
        }
        let (iovs, len) = command_data(iovs, dir, self.max_xfer)?;
        // One keyed descriptor: the pieces must follow each other in memory, all in one registered region.
        let start = iovs.first().map_or(0, |v| v.base as usize);
        let mut at = start;
        for v in iovs {
            if v.base as usize != at {
                return Err(SubmitError::BadBuffer);
            }
            at += v.len;
        }
        let rkey = if len == 0 {
            0
        } else {
            match self.xl.as_mut().and_then(|x| x.translate(start, len)) {
                Some((key, n)) if n == len => (key >> 32) as u32,
                _ => return Err(SubmitError::BadBuffer),
            }
        };
        let Some(cid) = self.free.pop() else {
            return Err(SubmitError::Full);
        };
        sqe.set_cid(cid);
        sqe.set_flags(0, psdt::SGL_MPTR_CONTIG);
        sqe.set_sgl1(&SglDesc {
            addr: start as u64,
            len: len as u32,
            key: rkey,
            ty: sgl::TYPE_KEYED_DATA_BLOCK,
            subtype: sgl::SUBTYPE_ADDRESS,
        });
        let off = cid as usize * CAPSULE;
        self.capsules.as_mut_slice()[off..off + CAPSULE].copy_from_slice(&sqe.0);
        let wr = SendWr {
            wr_id: WR_SEND | cid as u64,
            op: Op::Send,
            sge: Sge {
                addr: self.capsules.as_ptr() as u64 + off as u64,
                len: CAPSULE as u32,
                lkey: self.capsule_lkey,
            },
            signaled: true,
        };
        let posted = self.id.as_ref().map(|id| id.post_send(&[wr]));
        if !matches!(posted, Some(Ok(()))) {
            self.free.push(cid);
            let why = match posted {
                Some(Err(e)) => e.to_string(),
                _ => "no connection".into(),
            };
            self.error.get_or_insert(why);
            return Err(SubmitError::NotReady);
        }
        self.posted.0 += 1;
        let s = &mut self.slots[cid as usize];
        s.busy = true;
        s.token = token;
        s.sent = false;
        s.rsp = None;
        s.deadline = self.timeout.deadline(sqe.opc());
        Ok(())
    }

    /// Moves the queue pair on: connection steps, then completions (each to `done` with its token). Whether
    /// anything happened. When the queue pair fails, every command still in it completes with "aborted, SQ
    /// deleted".
    pub fn poll(&mut self, done: &mut dyn FnMut(u64, Cqe)) -> bool {
        if self.phase == Phase::Failed {
            return false;
        }
        let mut did = false;
        while let Some(ev) = self.ch.next() {
            did = true;
            match ev {
                Ok(ev) => {
                    if let Err(e) = self.cm_event(ev) {
                        self.fail(e, done);
                        return true;
                    }
                }
                Err(e) => {
                    self.fail(e.to_string(), done);
                    return true;
                }
            }
        }
        if self.phase != Phase::Ready {
            if self.started.elapsed() > self.connect_timeout {
                self.fail(format!("connect timed out ({:?})", self.phase), done);
                return true;
            }
            return did;
        }
        did | self.reap(done)
    }

    fn cm_event(&mut self, ev: CmEvent) -> Result<(), String> {
        let kind = ev.kind();
        let name = ev.name();
        match (self.phase, kind) {
            (Phase::ResolvingAddr, event::ADDR_RESOLVED) => {
                drop(ev);
                let id = self.id.as_ref().ok_or("no id")?;
                // As SPDK: a knob the device cannot take is noted, and the connection goes on without it.
                let k = self.knobs;
                if k.ack_timeout != 0 {
                    if let Err(e) = id.set_ack_timeout(k.ack_timeout.min(31)) {
                        log::info!("nvme_rdma: can't apply ACK timeout {}: {e}", k.ack_timeout);
                    }
                }
                if k.tos != 0 {
                    if let Err(e) = id.set_tos(k.tos) {
                        log::info!("nvme_rdma: can't apply TOS {}: {e}", k.tos);
                    }
                }
                id.resolve_route(RESOLVE_MS).map_err(|e| e.to_string())?;
                self.phase = Phase::ResolvingRoute;
                Ok(())
            }
            (Phase::ResolvingRoute, event::ROUTE_RESOLVED) => {
                drop(ev);
                self.setup_and_connect()
            }
            (Phase::Connecting, event::ESTABLISHED) => {
                let p = ev.conn_params();
                drop(ev);
                if let Some(a) = CmAccept::decode(&p.private_data) {
                    if (a.crqsize as usize) < self.slots.len() {
                        log::debug!(
                            "nvme_rdma: queue {}: controller receive queue {} < {} slots",
                            self.qid,
                            a.crqsize,
                            self.slots.len()
                        );
                    }
                }
                self.phase = Phase::Ready;
                Ok(())
            }
            (_, event::REJECTED) => {
                let p = ev.conn_params();
                Err(format!(
                    "connection rejected (status {}, private data {:02x?})",
                    ev.status(),
                    p.private_data
                ))
            }
            (_, event::DISCONNECTED) | (_, event::DEVICE_REMOVAL) => Err(name),
            (_, event::ADDR_ERROR)
            | (_, event::ROUTE_ERROR)
            | (_, event::CONNECT_ERROR)
            | (_, event::UNREACHABLE) => Err(format!("{name} (status {})", ev.status())),
            _ => {
                log::debug!("nvme_rdma: queue {}: CM event {name} ignored", self.qid);
                Ok(())
            }
        }
    }

    /// Route resolved: the device, its completion queue, the queue pair, the receives, then connect with the
    /// NVMe/RDMA private data.
    fn setup_and_connect(&mut self) -> Result<(), String> {
        let id = self.id.as_ref().ok_or("no id")?;
        let key = id.device().ok_or("the route leads to no RDMA device")?;
        let dev = devices()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|d| d.key() == key)
            .ok_or("the route's RDMA device is not open here")?;
        let n = self.slots.len();
        let cq = Cq::new(&dev, (2 * n) as i32).map_err(|e| e.to_string())?;
        id.create_qp(
            &dev,
            &cq,
            None,
            QpCaps {
                max_send_wr: n as u32,
                max_recv_wr: n as u32,
                max_send_sge: 1,
                max_recv_sge: 1,
            },
        )
        .map_err(|e| e.to_string())?;
        let mut xl = dev.translations();
        let key_of = |xl: &mut TranslationCache, b: &DmaBuf| -> Result<u32, String> {
            match xl.translate(b.as_ptr() as usize, b.len()) {
                Some((k, l)) if l == b.len() => Ok(rdma::lkey_of(k)),
                _ => Err("queue memory is not registered with the RDMA device".into()),
            }
        };
        self.capsule_lkey = key_of(&mut xl, &self.capsules)?;
        self.rsp_lkey = key_of(&mut xl, &self.rsps)?;
        for i in 0..n {
            let sge = Sge {
                addr: self.rsps.as_ptr() as u64 + (i * RSP) as u64,
                len: RSP as u32,
                lkey: self.rsp_lkey,
            };
            id.post_recv(WR_RECV | i as u64, sge)
                .map_err(|e| e.to_string())?;
        }
        self.posted.1 += n as u64;
        let mut pd = [0u8; PRIVATE_DATA_LEN];
        CmRequest {
            recfmt: 0,
            qid: self.qid,
            hrqsize: n as u16,
            hsqsize: n as u16 - 1,
            cntlid: 0,
        }
        .encode(&mut pd);
        // The controller RDMA READs write data from us: let it have some outstanding.
        let rd = dev.attr.max_qp_init_rd_atom.clamp(1, 16) as u8;
        id.connect(&pd, rd, 0, self.knobs.retry_count)
            .map_err(|e| e.to_string())?;
        self.dev = Some(dev);
        self.cq = Some(cq);
        self.xl = Some(xl);
        self.phase = Phase::Connecting;
        Ok(())
    }

    /// Takes completions: responses and SEND completions; a command completes when it has both.
    fn reap(&mut self, done: &mut dyn FnMut(u64, Cqe)) -> bool {
        let Some(cq) = &self.cq else { return false };
        let n = cq.poll(&mut self.wcs);
        for i in 0..n {
            let wc = self.wcs[i];
            if wc.status != rdma::WC_SUCCESS {
                let why = format!(
                    "work completion {:#x}: {}",
                    wc.wr_id,
                    rdma::wc_status_str(wc.status)
                );
                self.fail(why, done);
                return true;
            }
            let slot = (wc.wr_id & 0xffff_ffff) as usize;
            if wc.wr_id & WR_RECV != 0 {
                let off = slot * RSP;
                let mut b = [0u8; RSP];
                b.copy_from_slice(&self.rsps.as_slice()[off..off + RSP]);
                let cqe = Cqe::decode(&b);
                // The receive goes back at once: the controller may send the next response into it.
                let sge = Sge {
                    addr: self.rsps.as_ptr() as u64 + off as u64,
                    len: RSP as u32,
                    lkey: self.rsp_lkey,
                };
                if let Some(Err(e)) = self.id.as_ref().map(|id| id.post_recv(wc.wr_id, sge)) {
                    self.fail(e.to_string(), done);
                    return true;
                }
                self.posted.1 += 1;
                match self.slots.get_mut(cqe.cid as usize) {
                    Some(s) if s.busy && s.rsp.is_none() => s.rsp = Some(cqe),
                    _ => {
                        log::error!(
                            "nvme_rdma: queue {}: response for command {}, which is not outstanding: dropped",
                            self.qid,
                            cqe.cid
                        );
                        continue;
                    }
                }
                self.finish(cqe.cid as usize, done);
            } else if let Some(s) = self.slots.get_mut(slot) {
                s.sent = true;
                self.finish(slot, done);
            }
        }
        n > 0
    }

    fn finish(&mut self, cid: usize, done: &mut dyn FnMut(u64, Cqe)) {
        let s = &mut self.slots[cid];
        if !(s.busy && s.sent) {
            return;
        }
        let Some(cqe) = s.rsp.take() else { return };
        s.busy = false;
        s.deadline = None;
        let token = s.token;
        self.free.push(cid as u16);
        done(token, cqe);
    }

    /// Sets how long a command may be outstanding before [`RdmaQpair::expired`] reports it; commands of opcode
    /// `untimed_opc` are never reported.
    pub fn set_timeout(&mut self, t: Option<Duration>, untimed_opc: Option<u8>) {
        self.timeout.set(t, untimed_opc);
    }

    /// Reports, once each, the commands outstanding past their deadline at `now`: (command id, token).
    pub fn expired(&mut self, now: Instant, f: &mut dyn FnMut(u16, u64)) {
        let slots = self
            .slots
            .iter_mut()
            .map(|s| (s.busy, &mut s.deadline, s.token));
        report_expired(slots, now, f);
    }

    /// Closes the connection; commands still in it complete with "aborted, SQ deleted".
    pub fn close(&mut self, done: &mut dyn FnMut(u64, Cqe)) {
        self.fail("closed by the host".into(), done);
    }

    fn fail(&mut self, why: String, done: &mut dyn FnMut(u64, Cqe)) {
        if self.phase == Phase::Failed {
            return;
        }
        log::debug!("nvme_rdma: queue {}: {why}", self.qid);
        self.phase = Phase::Failed;
        self.error = Some(why);
        if let Some(id) = &self.id {
            // The queue pair goes to the error state: the adapter stops using our buffers.
            id.disconnect();
            id.destroy_qp();
        }
        for cid in 0..self.slots.len() {
            let s = &mut self.slots[cid];
            if s.busy {
                s.busy = false;
                s.rsp = None;
                let token = s.token;
                self.free.push(cid as u16);
                done(
                    token,
                    Cqe {
                        cid: cid as u16,
                        sqid: self.qid,
                        status: Status::generic(generic::ABORTED_SQ_DELETION),
                        ..Default::default()
                    },
                );
            }
        }
    }
}
