//! A controller seen from the host (SPDK's `nvme_ctrlr.c`): bring-up on the admin queue, keep alive, and the
//! connection of I/O queues, over NVMe/TCP, NVMe/RDMA or PCIe.
//!
//! Bring-up is SPDK's sequence, every step a command on the admin queue polled by the thread that asked for the
//! controller (never a blocking wait): TCP connect and ICReq, Fabrics Connect (dynamic controller id, KATO),
//! Property Get CAP, Property Set CC.EN, Property Get CSTS until RDY (bounded by CAP.TO), Identify Controller,
//! Set Features Number of Queues, Identify Active Namespace List, Identify Namespace for each. Keep Alive is
//! sent every half KATO from then on. An I/O queue is its own TCP connection with its own Fabrics Connect, made
//! by the thread that will use it ([`IoQueue`]). NVMe/RDMA is the same over RDMA CM connections. A PCIe
//! controller replaces the fabrics steps by its registers (disable, admin queue registers, enable, RDY within
//! CAP.TO; `nvme-pcie`), has no keep alive, and gets its I/O queues from Create I/O CQ/SQ on its admin queue,
//! which the thread opening a queue posts to the controller's thread.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use errors::{Error, ErrorKind, Result};
use nvme_pcie::{Bar, PcieCtrlr, PcieQpair, QueueMemory};
use nvme_proto::cmd::{admin, feat, Cqe, Sqe};
use nvme_proto::fabrics::{cc, csts, reg, Cap, Connect, ConnectData, Property, DISCOVERY_NQN};
use nvme_proto::identify::{cns, decode_ns_list, CtrlrData, NsData, NsIdDesc};
use nvme_proto::log::{ana_state, decode_ana_log, lid, DiscoveryEntry, DiscoveryLogHeader};
use reactor::dma::DmaBuf;
use reactor::Poller;

use crate::auth::{AuthOpts, Transaction};
use crate::qpair::Qpair;
use crate::rdma::RdmaQpair;
use crate::tcp::{Dir, Iov, TcpQpair};

/// Admin queue entries (SPDK's default admin queue size is 32).
const ADMIN_DEPTH: u16 = 32;
/// In-capsule data the admin queue always takes (NVMe/TCP requires 8 KiB).
const ADMIN_ICD: u32 = 8192;
/// Largest admin transfer (Identify: 4 KiB).
const ADMIN_XFER: u32 = 8192;
/// Largest I/O transfer asked of a controller whose MDTS is unlimited.
const MAX_XFER_DEFAULT: u32 = 128 * 1024;

/// How to reach a controller and what to ask of it (`bdev_nvme_attach_controller`'s parameters).
#[derive(Clone, Debug)]
pub struct CtrlrOpts {
    /// Where the controller listens (fabrics).
    pub addr: SocketAddr,
    /// NVMe/RDMA rather than NVMe/TCP (fabrics; digests do not apply).
    pub rdma: bool,
    /// The PCI address (`0000:00:04.0`) of a PCIe controller, reached through VFIO; when set, `addr`, the NQNs,
    /// the host id, keep alive and digests do not apply.
    pub pci: Option<String>,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Keep alive timeout asked for, ms (0: none).
    pub kato_ms: u32,
    /// I/O queues asked for.
    pub num_io_queues: u16,
    /// Entries per I/O queue.
    pub io_queue_size: u16,
    /// How long bring-up (and each I/O queue's connect) may take.
    pub connect_timeout: Duration,
    /// TCP header and data digests asked for (`hdgst`, `ddgst`): each is used when the controller grants it.
    pub digests: (bool, bool),
    /// DH-HMAC-CHAP keys and what to offer, for controllers that require in-band authentication (fabrics).
    pub auth: Option<AuthOpts>,
    /// The TLS PSK (identity, key, suite) when the controller is reached over TLS (NVMe/TCP).
    pub tls: Option<nvme_tls::TlsPsk>,
    /// NVMe/TCP: how long sent data may stay unacknowledged before the connection closes, ms (0: the kernel's
    /// default; `bdev_nvme_set_options` `transport_ack_timeout`).
    pub tcp_user_timeout_ms: u32,
    /// NVMe/RDMA: retry count, ACK timeout and TOS of the connections.
    pub rdma_knobs: crate::rdma::RdmaKnobs,
}

impl CtrlrOpts {
    /// Where the controller is, as messages name it: its PCI address, or its network address.
    pub fn location(&self) -> String {
        match &self.pci {
            Some(bdf) => bdf.clone(),
            None => self.addr.to_string(),
        }
    }

    /// Whether `other` reaches a controller at the same place (same PCI function, or same network address).
    pub fn same_place(&self, other: &CtrlrOpts) -> bool {
        self.pci == other.pci
            && (self.pci.is_some() || (self.addr == other.addr && self.rdma == other.rdma))
    }
}

/// A namespace as Identify Namespace describes it.
#[derive(Clone, Debug)]
pub struct NsInfo {
    /// Namespace id.
    pub nsid: u32,
    /// Size in blocks.
    pub blocks: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// NGUID (zero when none).
    pub nguid: [u8; 16],
    /// EUI-64 (zero when none).
    pub eui64: [u8; 8],
    /// The namespace UUID of its Namespace Identification Descriptor list (CNS 03h), when it has one.
    pub uuid: Option<[u8; 16]>,
    /// The namespace may be reached through several controllers (NMIC bit 0): it may be a path of a multipath
    /// bdev.
    pub shared: bool,
    /// ANA group (0: none).
    pub anagrpid: u32,
}

impl NsInfo {
    /// Whether `other` names the same namespace, as SPDK compares two paths' namespaces: NGUID, EUI-64 and
    /// UUID (present in both and equal, or in neither).
    pub fn same_identity(&self, other: &NsInfo) -> bool {
        (self.nguid, self.eui64, self.uuid) == (other.nguid, other.eui64, other.uuid)
    }
}

/// ANA groups tracked at most (a controller announcing more is followed for the first ones only).
const MAX_ANA_GROUPS: u32 = 4096;

/// A controller's ANA group states (Asymmetric Namespace Access), kept current from the ANA log page (read at
/// bring-up, on an ANA change notice, on request), read by the threads that send I/O.
#[derive(Debug)]
pub struct AnaStates {
    reporting: bool,
    groups: Vec<AtomicU8>,
    /// Bumped when a log page was taken (users re-pick their paths, as SPDK clears its path caches).
    changes: AtomicU64,
}

impl AnaStates {
    fn new(reporting: bool, groups: u32) -> AnaStates {
        let n = if reporting {
            groups.min(MAX_ANA_GROUPS)
        } else {
            0
        };
        AnaStates {
            reporting,
            groups: (0..n)
                .map(|_| AtomicU8::new(ana_state::OPTIMIZED))
                .collect(),
            changes: AtomicU64::new(0),
        }
    }

    /// How many ANA log pages were taken so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Whether the controller reports ANA states.
    pub fn reporting(&self) -> bool {
        self.reporting
    }

    /// The state ([`ana_state`]) of group `grp`: optimized when the controller reports none or the group is
    /// not one it announced.
    #[inline]
    pub fn get(&self, grp: u32) -> u8 {
        match grp.checked_sub(1).and_then(|i| self.groups.get(i as usize)) {
            Some(s) => s.load(Ordering::Relaxed),
            None => ana_state::OPTIMIZED,
        }
    }

    /// Records group `grp`'s state (e.g. inaccessible, as an I/O's status said, until the log page says more).
    pub fn set(&self, grp: u32, state: u8) {
        if let Some(s) = grp.checked_sub(1).and_then(|i| self.groups.get(i as usize)) {
            s.store(state, Ordering::Relaxed);
        }
    }

    /// Takes the states an ANA log page gives.
    fn apply(&self, page: &[u8]) -> std::result::Result<(), String> {
        let log = decode_ana_log(page).map_err(|e| format!("ANA log page: {e}"))?;
        for g in &log.groups {
            self.set(g.anagrpid, g.state & 0x0f);
        }
        self.changes.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// SPDK's name of an ANA state (`optimized`, `non_optimized`, ...).
pub fn ana_state_name(state: u8) -> &'static str {
    match state {
        ana_state::OPTIMIZED => "optimized",
        ana_state::NON_OPTIMIZED => "non_optimized",
        ana_state::INACCESSIBLE => "inaccessible",
        ana_state::PERSISTENT_LOSS => "persistent_loss",
        _ => "change",
    }
}

/// Reads the ANA log page into `ana`; `done` hears whether it worked.
fn read_ana(
    admin: &Rc<Admin>,
    ana: Arc<AnaStates>,
    done: impl FnOnce(std::result::Result<(), String>) + 'static,
) {
    log_page(admin, lid::ANA, ADMIN_XFER as usize, move |r| {
        done(r.and_then(|d| ana.apply(d)))
    });
}

/// Reads the controller-wide log page `lid` (up to `len` bytes, at most the admin transfer size); `done` gets
/// the data or the failed status.
fn log_page(
    admin: &Rc<Admin>,
    lid: u8,
    len: usize,
    done: impl FnOnce(std::result::Result<&[u8], String>) + 'static,
) {
    log_page_at(admin, lid, len, 0, done)
}

/// [`log_page`] from byte `offset` of the page.
fn log_page_at(
    admin: &Rc<Admin>,
    lid: u8,
    len: usize,
    offset: u64,
    done: impl FnOnce(std::result::Result<&[u8], String>) + 'static,
) {
    let len = len.clamp(4, ADMIN_XFER as usize) & !3;
    let mut s = Sqe::new(admin::GET_LOG_PAGE, 0);
    s.set_nsid(0xffff_ffff);
    let numd = (len / 4 - 1) as u32;
    s.set_cdw(10, lid as u32 | (numd & 0xffff) << 16);
    s.set_cdw(11, numd >> 16);
    s.set_cdw(12, offset as u32);
    s.set_cdw(13, (offset >> 32) as u32);
    admin.cmd(s, Dir::FromCtrl, vec![0; len], move |c, d| {
        if ok(c) {
            done(Ok(d))
        } else {
            done(Err(format!("Get Log Page {lid:#04x}: {}", c.status)))
        }
    });
}

/// What bring-up learned; shared with the threads that open I/O queues.
#[derive(Debug)]
pub struct CtrlrInfo {
    /// The options it was reached with.
    pub opts: CtrlrOpts,
    /// Controller id the Connect gave.
    pub cntlid: u16,
    /// Identify Controller.
    pub cdata: CtrlrData,
    /// Active namespaces.
    pub namespaces: Vec<NsInfo>,
    /// I/O queues granted (Set Features Number of Queues).
    pub io_queues: u16,
    /// Largest transfer per command (MDTS).
    pub max_xfer: u32,
    /// Largest write carried in the command capsule (IOCCSZ).
    pub icd_max: u32,
    /// ANA group states.
    pub ana: Arc<AnaStates>,
    /// What I/O queues of a PCIe controller need (its registers, and the admin queue to create them on).
    pub pcie: Option<Arc<PcieShared>>,
    next_qid: AtomicU16,
}

/// An admin command asked for from another thread, and what hears its completion (on the admin thread).
type MailboxCmd = (Sqe, Box<dyn FnOnce(&Cqe) + Send>);

/// What the I/O queues of a PCIe controller share with it: the registers, and a mailbox through which a thread
/// opening or closing a queue has the controller's thread send Create/Delete I/O CQ/SQ on the admin queue.
pub struct PcieShared {
    bar: Arc<Bar>,
    ctrlr_dev: Arc<nvme_pcie::vfio::Device>,
    dstrd: u8,
    /// Largest queue the controller takes (CAP.MQES + 1).
    max_entries: u16,
    /// Cleared when this controller instance closes (reset, detach): its queues stop touching the doorbells,
    /// which a new instance's queues of the same ids use next.
    live: Arc<std::sync::atomic::AtomicBool>,
    /// `None` once the controller is closed: what is still posted is dropped (the controller is disabled by
    /// then, so queue memory kept for it may go).
    mailbox: std::sync::Mutex<Option<VecDeque<MailboxCmd>>>,
}

impl std::fmt::Debug for PcieShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PcieShared({:?})", self.ctrlr_dev)
    }
}

impl PcieShared {
    /// Posts an admin command for the controller's thread; false when the controller is closed.
    fn post(&self, sqe: Sqe, cb: impl FnOnce(&Cqe) + Send + 'static) -> bool {
        let mut m = self.mailbox.lock().unwrap_or_else(|e| e.into_inner());
        match m.as_mut() {
            Some(q) => {
                q.push_back((sqe, Box::new(cb)));
                true
            }
            None => false,
        }
    }

    fn take_posted(&self) -> Vec<MailboxCmd> {
        let mut m = self.mailbox.lock().unwrap_or_else(|e| e.into_inner());
        m.as_mut()
            .map(|q| q.drain(..).collect())
            .unwrap_or_default()
    }

    /// The instance is going: its queues stop touching the doorbells.
    fn stop(&self) {
        self.live.store(false, Ordering::Release);
    }

    /// Drops what is still posted, with the queue memory it keeps: only once the controller is disabled.
    fn close(&self) {
        self.mailbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

impl CtrlrInfo {
    /// A queue id for a new I/O queue, while any is left.
    pub fn take_qid(&self) -> Option<u16> {
        let q = self.next_qid.fetch_add(1, Ordering::Relaxed);
        (q >= 1 && q <= self.io_queues).then_some(q)
    }
}

type AdminCb = Box<dyn FnOnce(&Cqe, &[u8])>;
/// An admin command waiting to be submitted: command, direction, data buffer, callback.
type QueuedCmd = (Sqe, Dir, Vec<u8>, AdminCb);
/// A submitted admin command: its data buffer, the DMA copy a PCIe controller works on, its callback.
type Waiting = (Vec<u8>, Option<DmaBuf>, AdminCb);
/// Where a bring-up reports.
type BringupDone = Box<dyn FnOnce(Result<Controller>)>;

/// The admin queue: commands with callbacks, submitted once the connection is up, polled by a poller.
struct Admin {
    qp: RefCell<Qpair>,
    /// Commands not submitted yet (connection not up, or every slot busy).
    queued: RefCell<VecDeque<QueuedCmd>>,
    /// Submitted: token -> (data buffer, its DMA copy for a PCIe controller, callback).
    waiting: RefCell<HashMap<u64, Waiting>>,
    next: Cell<u64>,
}

impl Admin {
    /// Queues an admin command with `data` (sent for [`Dir::ToCtrl`], the place for the answer for
    /// [`Dir::FromCtrl`]).
    fn cmd(&self, sqe: Sqe, dir: Dir, data: Vec<u8>, cb: impl FnOnce(&Cqe, &[u8]) + 'static) {
        self.queued
            .borrow_mut()
            .push_back((sqe, dir, data, Box::new(cb)));
        self.submit_queued();
    }

    fn submit_queued(&self) {
        let mut qp = self.qp.borrow_mut();
        if !qp.ready() {
            return;
        }
        loop {
            let Some((sqe, dir, mut data, cb)) = self.queued.borrow_mut().pop_front() else {
                return;
            };
            let token = self.next.get();
            self.next.set(token + 1);
            // A PCIe controller, and an RDMA adapter, reach only memory in the memory map: the data goes
            // through a DMA buffer (admin commands are few and small).
            let mut dma = None;
            if !matches!(*qp, Qpair::Tcp(_)) && dir != Dir::None && !data.is_empty() {
                match DmaBuf::alloc(data.len()) {
                    Ok(mut b) => {
                        b.as_mut_slice().copy_from_slice(&data);
                        dma = Some(b);
                    }
                    Err(e) => log::error!("nvme admin command: DMA buffer: {e}"),
                }
            }
            let iov = [match &dma {
                Some(b) => Iov {
                    base: b.as_ptr(),
                    len: b.len(),
                },
                None => Iov {
                    base: data.as_mut_ptr(),
                    len: data.len(),
                },
            }];
            let iovs: &[Iov] = if dir == Dir::None { &[] } else { &iov };
            // SAFETY: `data` (or its DMA copy) moves into `waiting` below and stays there (its heap buffer does
            // not move) until the command completes or the queue pair is dropped with the Admin.
            match unsafe { qp.submit(sqe, iovs, dir, token) } {
                Ok(()) => {
                    self.waiting.borrow_mut().insert(token, (data, dma, cb));
                }
                Err(nvme_proto::host::SubmitError::Full) => {
                    self.queued.borrow_mut().push_front((sqe, dir, data, cb));
                    return;
                }
                Err(e) => {
                    drop(qp);
                    let c = Cqe {
                        status: nvme_proto::status::Status::generic(
                            nvme_proto::status::generic::INTERNAL_DEVICE_ERROR,
                        ),
                        ..Default::default()
                    };
                    log::error!("nvme admin command: {e:?}");
                    cb(&c, &[]);
                    qp = self.qp.borrow_mut();
                }
            }
        }
    }

    /// Polls the connection; runs the callbacks of completed commands. Whether anything happened.
    fn poll(&self) -> bool {
        let mut done = Vec::new();
        let did = self
            .qp
            .borrow_mut()
            .poll(&mut |token, cqe| done.push((token, cqe)));
        for (token, cqe) in done {
            let entry = self.waiting.borrow_mut().remove(&token);
            if let Some((mut data, dma, cb)) = entry {
                if let Some(b) = dma {
                    data.copy_from_slice(b.as_slice());
                }
                cb(&cqe, &data);
            }
        }
        self.submit_queued();
        did
    }
}

/// A controller, on the thread that brought it up.
pub struct Controller {
    /// What bring-up learned.
    pub info: Arc<CtrlrInfo>,
    admin: Rc<Admin>,
    _poller: Poller,
    _keep_alive: Option<Poller>,
    /// Set when the admin connection failed (keep alive or a command saw it).
    failed: Rc<Cell<bool>>,
    ns_hook: NsChangeHook,
    event_hook: EventHook,
    /// The PCIe controller's registers (shutdown at close).
    pcie: Option<PcieCtrlr>,
    /// The kernel asked for the PCIe function back.
    removed: Rc<Cell<bool>>,
}

impl Controller {
    /// Reads log page `lid` (the controller-wide one, up to `len` bytes, at most the admin transfer size);
    /// `done` gets the data or the failed status.
    pub fn get_log_page(
        &self,
        lid: u8,
        len: usize,
        done: impl FnOnce(std::result::Result<Vec<u8>, String>) + 'static,
    ) {
        log_page(&self.admin, lid, len, move |r| done(r.map(<[u8]>::to_vec)));
    }

    /// Asks the controller to abort command `cid` of queue `sqid` (SPDK's `spdk_nvme_ctrlr_cmd_abort`); `done`
    /// hears whether the Abort itself succeeded (the aborted command completes on its own queue).
    pub fn abort(&self, sqid: u16, cid: u16, done: impl FnOnce(bool) + 'static) {
        let mut s = Sqe::new(admin::ABORT, 0);
        s.set_cdw(10, sqid as u32 | (cid as u32) << 16);
        self.admin.cmd(s, Dir::None, Vec::new(), move |c, _| {
            if !ok(c) {
                log::warn!("nvme: Abort of command {cid} on queue {sqid}: {}", c.status);
            }
            done(ok(c))
        });
    }

    /// Sets how long an admin command may take before [`Controller::admin_expired`] says so.
    pub fn set_admin_timeout(&self, t: Option<Duration>) {
        self.admin
            .qp
            .borrow_mut()
            .set_timeout(t, Some(admin::ASYNC_EVENT_REQUEST));
    }

    /// Whether an admin command has been outstanding past the admin timeout (each reported once).
    pub fn admin_expired(&self) -> bool {
        let mut any = false;
        self.admin
            .qp
            .borrow_mut()
            .expired(Instant::now(), &mut |_, _| any = true);
        any
    }

    /// Reads the ANA log page again (an I/O saw an ANA status); the states change when it is in.
    pub fn refresh_ana(&self) {
        if self.info.ana.reporting() {
            read_ana(&self.admin, self.info.ana.clone(), |r| {
                if let Err(e) = r {
                    log::warn!("nvme: {e}");
                }
            });
        }
    }
}

impl Controller {
    /// Whether the controller was removed (a PCIe function the kernel asked back, for an unbind or a hot removal):
    /// it is not coming back; its user detaches it.
    pub fn removed(&self) -> bool {
        self.removed.get()
    }

    /// Whether the admin connection is still up.
    pub fn alive(&self) -> bool {
        !self.failed.get() && self.admin.qp.borrow().error().is_none()
    }

    /// Sets what hears of every Asynchronous Event (type, information, log page), once its log page was read
    /// (e.g. a discovery log change).
    pub fn on_event(&self, f: impl Fn(u8, u8, u8) + 'static) {
        *self.event_hook.borrow_mut() = Some(Box::new(f));
    }

    /// Reads the whole discovery log page (a discovery controller's), in pieces of the admin transfer size,
    /// again from the start when its generation changed meanwhile (up to three times); `done` gets the entries.
    pub fn discovery_log(
        &self,
        done: impl FnOnce(std::result::Result<Vec<DiscoveryEntry>, String>) + 'static,
    ) {
        read_discovery(self.admin.clone(), 3, Box::new(done));
    }

    /// Sets what hears of namespace changes (the new active namespace list, after an Asynchronous Event).
    pub fn on_ns_change(&self, f: impl Fn(Vec<NsInfo>) + 'static) {
        *self.ns_hook.borrow_mut() = Some(Box::new(f));
    }

    /// Closes the admin connection (the controller goes away on the target once its I/O queues are gone
    /// too). A PCIe controller is shut down (CC.SHN) and disabled first, which may take up to 5 s.
    pub fn close(&self) {
        self.admin.qp.borrow_mut().close(&mut |_, _| {});
        if let Some(c) = &self.pcie {
            if let Some(s) = &self.info.pcie {
                s.stop();
            }
            // The controller finishes what it holds and flushes its caches before the host lets go (SPDK's
            // shutdown notification at detach); then it is disabled, so no queue memory is used any more.
            c.shutdown(Duration::from_secs(5));
            if let Some(s) = &self.info.pcie {
                s.close();
            }
        }
        // The callbacks still waiting (the outstanding Asynchronous Event Request's, commands never sent) hold
        // the admin queue themselves: dropping them breaks that cycle, so the queue, and for PCIe the device it
        // keeps open, go when the controller does. Only now: their data buffers may be the target of a PCIe
        // controller's DMA until it is disabled.
        let waiting = std::mem::take(&mut *self.admin.waiting.borrow_mut());
        let queued = std::mem::take(&mut *self.admin.queued.borrow_mut());
        drop((waiting, queued));
    }
}

/// Bring-up in progress.
struct Bringup {
    opts: CtrlrOpts,
    admin: Rc<Admin>,
    started: Instant,
    cntlid: Cell<u16>,
    cap: Cell<u64>,
    cdata: RefCell<Option<CtrlrData>>,
    io_queues: Cell<u16>,
    namespaces: RefCell<Vec<NsInfo>>,
    ana: RefCell<Option<Arc<AnaStates>>>,
    done: RefCell<Option<BringupDone>>,
    poller: RefCell<Option<Poller>>,
    /// A PCIe controller's registers, until they are handed to the [`Controller`].
    pcie: RefCell<Option<PcieCtrlr>>,
    /// Past the transport's own steps (Fabrics Connect and properties, or PCIe registers).
    enabled: Cell<bool>,
}

/// Brings a controller up; `done` runs on this thread with it, or with why it could not be reached.
pub fn connect(opts: CtrlrOpts, done: impl FnOnce(Result<Controller>) + 'static) {
    let mut pcie = None;
    let qp = if let Some(bdf) = &opts.pci {
        match open_pcie(bdf) {
            Ok((c, q)) => {
                pcie = Some(c);
                Qpair::Pcie(q)
            }
            Err(e) => return done(Err(e)),
        }
    } else if opts.rdma {
        match RdmaQpair::connect(
            opts.addr,
            0,
            ADMIN_DEPTH,
            ADMIN_XFER,
            opts.connect_timeout,
            opts.rdma_knobs,
        ) {
            Ok(q) => Qpair::Rdma(q),
            Err(e) => return done(Err(Error::os(e, format!("connect to {}", opts.addr)))),
        }
    } else {
        match TcpQpair::connect(
            opts.addr,
            ADMIN_DEPTH,
            ADMIN_ICD,
            ADMIN_XFER,
            opts.digests,
            opts.tls.as_ref(),
            opts.tcp_user_timeout_ms,
        ) {
            Ok(q) => Qpair::Tcp(q),
            Err(e) => return done(Err(Error::os(e, format!("connect to {}", opts.addr)))),
        }
    };
    let admin = Rc::new(Admin {
        qp: RefCell::new(qp),
        queued: RefCell::new(VecDeque::new()),
        waiting: RefCell::new(HashMap::new()),
        next: Cell::new(1),
    });
    let b = Rc::new(Bringup {
        opts,
        admin: admin.clone(),
        started: Instant::now(),
        cntlid: Cell::new(0),
        cap: Cell::new(0),
        cdata: RefCell::new(None),
        io_queues: Cell::new(0),
        namespaces: RefCell::new(Vec::new()),
        ana: RefCell::new(None),
        done: RefCell::new(Some(Box::new(done))),
        poller: RefCell::new(None),
        pcie: RefCell::new(pcie),
        enabled: Cell::new(false),
    });
    let b2 = b.clone();
    let poller = Poller::register("nvme_ctrlr_bringup", 0, move || {
        if !b2.enabled.get() {
            // PCIe: the register steps to ready, then the admin commands as on fabrics.
            let r = {
                let mut c = b2.pcie.borrow_mut();
                let q = b2.admin.qp.borrow();
                match (c.as_mut(), &*q) {
                    (Some(c), Qpair::Pcie(q)) => c.poll_enable(q),
                    _ => Ok(false),
                }
            };
            match r {
                Ok(true) => {
                    b2.enabled.set(true);
                    b2.identify();
                }
                Ok(false) => {}
                Err(e) => b2.fail(e.kind, e.to_string()),
            }
            return true;
        }
        let did = b2.admin.poll();
        let err = b2.admin.qp.borrow().error().map(str::to_string);
        if let Some(e) = err {
            b2.fail(ErrorKind::Io(libc::ECONNREFUSED), e);
        } else if b2.started.elapsed() > b2.opts.connect_timeout {
            b2.fail(
                ErrorKind::Io(libc::ETIMEDOUT),
                "controller bring-up timed out".into(),
            );
        }
        did
    });
    *b.poller.borrow_mut() = Some(poller);
    let cap = b.pcie.borrow().as_ref().map(|c| c.cap().to_u64());
    if let Some(cap) = cap {
        b.cap.set(cap);
    } else {
        b.enabled.set(true);
        b.fabrics_connect();
    }
}

/// Opens the PCIe controller at `bdf` and its admin queue pair (not yet known to the controller).
fn open_pcie(bdf: &str) -> Result<(PcieCtrlr, PcieQpair)> {
    let c = PcieCtrlr::open(bdf)?;
    let cache = c.translations().map(|t| t.cache()).ok_or_else(|| {
        Error::new(
            ErrorKind::Io(libc::ENODEV),
            format!("{bdf}: no VFIO device"),
        )
    })?;
    let q = PcieQpair::new(
        c.bar().clone(),
        0,
        ADMIN_DEPTH,
        c.cap().dstrd,
        ADMIN_XFER,
        cache,
    )
    .map_err(|e| Error::os(e, format!("{bdf}: admin queue")))?;
    Ok((c, q))
}

fn ok(c: &Cqe) -> bool {
    c.status.is_success()
}

impl Bringup {
    fn fail(self: &Rc<Self>, kind: ErrorKind, why: String) {
        let Some(done) = self.done.borrow_mut().take() else {
            return;
        };
        self.poller.borrow_mut().take();
        self.admin.qp.borrow_mut().close(&mut |_, _| {});
        if let Some(c) = self.pcie.borrow().as_ref() {
            // Before the admin queue's memory goes back to the pool.
            c.disable();
        }
        let at = match &self.opts.pci {
            Some(bdf) => format!("PCIe controller {bdf}"),
            None => format!("controller {} at {}", self.opts.subnqn, self.opts.addr),
        };
        done(Err(Error::new(kind, format!("{at}: {why}"))));
    }

    /// A step's command failed: the bring-up ends with its status.
    fn step_failed(self: &Rc<Self>, what: &str, c: &Cqe) {
        self.fail(ErrorKind::Io(libc::EIO), format!("{what}: {}", c.status));
    }

    fn fabrics_connect(self: &Rc<Self>) {
        let sqe = Connect {
            recfmt: 0,
            qid: 0,
            sqsize: ADMIN_DEPTH - 1,
            cattr: 0,
            kato: self.opts.kato_ms,
        }
        .to_sqe(0);
        let data = connect_data(&self.opts, ConnectData::CNTLID_DYNAMIC);
        let me = self.clone();
        self.admin.cmd(sqe, Dir::ToCtrl, data, move |c, _| {
            if !ok(c) {
                return me.step_failed("Connect", c);
            }
            me.cntlid.set(c.dw0 as u16);
            // The admin queue's transaction is number 0; each I/O queue's is its queue id.
            match auth_after_connect(&me.opts, c.dw0, 0) {
                Ok(None) => me.get_cap(),
                Ok(Some(t)) => me.authenticate(Rc::new(RefCell::new(t))),
                Err(e) => me.fail(e.kind, e.to_string()),
            }
        });
    }

    /// The admin queue's DH-HMAC-CHAP transaction, a command at a time; then the bring-up goes on (the
    /// controller answers nothing else, Property Get included, before it).
    fn authenticate(self: &Rc<Self>, t: Rc<RefCell<Transaction>>) {
        let next = t.borrow().command().map(|c| {
            let data = match c.dir {
                Dir::ToCtrl => c.data.to_vec(),
                _ => vec![0; c.len],
            };
            (c.sqe, c.dir, data)
        });
        let Some((sqe, dir, data)) = next else {
            return self.get_cap();
        };
        let me = self.clone();
        self.admin.cmd(sqe, dir, data, move |c, data| {
            let r = t.borrow_mut().completed(c, data);
            match r {
                Ok(true) => {
                    log::info!(
                        "controller {}: authenticated (DH-HMAC-CHAP)",
                        me.opts.subnqn
                    );
                    me.get_cap()
                }
                Ok(false) => me.authenticate(t),
                Err(e) => me.fail(e.kind, format!("DH-HMAC-CHAP: {e}")),
            }
        });
    }

    fn get_cap(self: &Rc<Self>) {
        let me = self.clone();
        self.admin.cmd(
            prop(reg::CAP, true, None),
            Dir::None,
            Vec::new(),
            move |c, _| {
                if !ok(c) {
                    return me.step_failed("Property Get CAP", c);
                }
                me.cap.set(c.dw0 as u64 | (c.dw1 as u64) << 32);
                me.enable();
            },
        );
    }

    fn enable(self: &Rc<Self>) {
        let v = cc::EN | 6 << cc::IOSQES_SHIFT | 4 << cc::IOCQES_SHIFT;
        let me = self.clone();
        self.admin.cmd(
            prop(reg::CC, false, Some(v as u64)),
            Dir::None,
            Vec::new(),
            move |c, _| {
                if !ok(c) {
                    return me.step_failed("Property Set CC", c);
                }
                me.wait_ready();
            },
        );
    }

    fn wait_ready(self: &Rc<Self>) {
        let me = self.clone();
        self.admin.cmd(
            prop(reg::CSTS, false, None),
            Dir::None,
            Vec::new(),
            move |c, _| {
                if !ok(c) {
                    return me.step_failed("Property Get CSTS", c);
                }
                if c.dw0 & csts::CFS != 0 {
                    return me.fail(ErrorKind::Io(libc::EIO), "controller fatal status".into());
                }
                if c.dw0 & csts::RDY != 0 {
                    return me.identify();
                }
                // CAP.TO in 500 ms units bounds the wait (the bring-up timeout bounds it too).
                let to = Duration::from_millis(Cap::from_u64(me.cap.get()).to as u64 * 500);
                if me.started.elapsed() > to.max(Duration::from_millis(500)) {
                    return me.fail(ErrorKind::Io(libc::ETIMEDOUT), "CSTS.RDY never set".into());
                }
                let again = me.clone();
                reactor::timer(1000, move || again.wait_ready()).detach();
            },
        );
    }

    fn identify(self: &Rc<Self>) {
        let me = self.clone();
        self.admin.cmd(
            identify_sqe(cns::CTRLR, 0),
            Dir::FromCtrl,
            vec![0; 4096],
            move |c, d| {
                if !ok(c) {
                    return me.step_failed("Identify Controller", c);
                }
                match CtrlrData::decode(d) {
                    Ok(cd) => *me.cdata.borrow_mut() = Some(cd),
                    Err(e) => {
                        return me.fail(
                            ErrorKind::Io(libc::EIO),
                            format!("Identify Controller: {e}"),
                        )
                    }
                }
                if me.opts.subnqn == DISCOVERY_NQN {
                    // A discovery controller has no I/O queues and no namespaces: its log page is all there is.
                    return me.finish();
                }
                me.set_queues();
            },
        );
    }

    fn set_queues(self: &Rc<Self>) {
        let n = self.opts.num_io_queues.max(1) as u32 - 1;
        let mut sqe = Sqe::new(admin::SET_FEATURES, 0);
        sqe.set_cdw(10, feat::NUMBER_OF_QUEUES as u32);
        sqe.set_cdw(11, n | n << 16);
        let me = self.clone();
        self.admin.cmd(sqe, Dir::None, Vec::new(), move |c, _| {
            if !ok(c) {
                return me.step_failed("Set Features Number of Queues", c);
            }
            // Both counts 0-based; the smaller of what was asked and what is granted.
            let granted = (c.dw0 & 0xffff).min(c.dw0 >> 16) as u16 + 1;
            me.io_queues.set(granted.min(me.opts.num_io_queues.max(1)));
            me.ns_list();
        });
    }

    fn ns_list(self: &Rc<Self>) {
        let me = self.clone();
        scan_namespaces(&self.admin, move |res| match res {
            Ok(list) => {
                *me.namespaces.borrow_mut() = list;
                me.ana_log();
            }
            Err(e) => me.fail(ErrorKind::Io(libc::EIO), e),
        });
    }

    /// With ANA reporting, the groups' states before the first I/O (SPDK's init reads the log page too).
    fn ana_log(self: &Rc<Self>) {
        let (reporting, groups) = self
            .cdata
            .borrow()
            .as_ref()
            .map_or((false, 0), |c| (c.cmic & (1 << 3) != 0, c.nanagrpid));
        let ana = Arc::new(AnaStates::new(reporting, groups));
        *self.ana.borrow_mut() = Some(ana.clone());
        if !reporting {
            return self.finish();
        }
        let me = self.clone();
        read_ana(&self.admin, ana, move |r| match r {
            Ok(()) => me.finish(),
            Err(e) => me.fail(ErrorKind::Io(libc::EIO), e),
        });
    }

    fn finish(self: &Rc<Self>) {
        let Some(done) = self.done.borrow_mut().take() else {
            return;
        };
        let poller = self.poller.borrow_mut().take();
        drop(poller);
        let cdata = self
            .cdata
            .borrow_mut()
            .take()
            .unwrap_or_else(|| CtrlrData::decode(&[0u8; 4096]).expect("zeroes decode"));
        // MDTS in units of the minimum page size (2^(12 + MPSMIN)); 0: no limit.
        let page = 4096u64 << Cap::from_u64(self.cap.get()).mpsmin;
        let max_xfer = match cdata.mdts {
            0 => MAX_XFER_DEFAULT as u64,
            m => (page << m).min(MAX_XFER_DEFAULT as u64),
        } as u32;
        let icd_max = (cdata.ioccsz * 16).saturating_sub(64);
        let pcie_ctrlr = self.pcie.borrow_mut().take();
        let max_xfer = if pcie_ctrlr.is_some() {
            max_xfer.min(nvme_pcie::qpair::MAX_XFER_PRP)
        } else {
            max_xfer
        };
        let pcie = pcie_ctrlr.as_ref().and_then(|c| {
            Some(Arc::new(PcieShared {
                bar: c.bar().clone(),
                ctrlr_dev: c.device()?.clone(),
                dstrd: c.cap().dstrd,
                max_entries: c.cap().mqes.saturating_add(1).max(2),
                live: Arc::new(std::sync::atomic::AtomicBool::new(true)),
                mailbox: std::sync::Mutex::new(Some(VecDeque::new())),
            }))
        });
        let ana = self
            .ana
            .borrow_mut()
            .take()
            .unwrap_or_else(|| Arc::new(AnaStates::new(false, 0)));
        let info = Arc::new(CtrlrInfo {
            opts: self.opts.clone(),
            cntlid: self.cntlid.get(),
            cdata,
            namespaces: std::mem::take(&mut *self.namespaces.borrow_mut()),
            io_queues: self.io_queues.get(),
            max_xfer,
            icd_max,
            ana: ana.clone(),
            pcie: pcie.clone(),
            next_qid: AtomicU16::new(1),
        });
        let admin = self.admin.clone();
        let failed = Rc::new(Cell::new(false));
        let a = admin.clone();
        let f = failed.clone();
        let regs = pcie_ctrlr.as_ref().map(|c| c.bar().clone());
        let dev = pcie_ctrlr.as_ref().and_then(|c| c.device().cloned());
        let removed = Rc::new(Cell::new(false));
        let rm = removed.clone();
        let poller = Poller::register("nvme_ctrlr_admin", 1000, move || {
            let mut did = false;
            if let Some(p) = &pcie {
                for (sqe, cb) in p.take_posted() {
                    a.cmd(sqe, Dir::None, Vec::new(), move |c, _| cb(c));
                    did = true;
                }
            }
            did |= a.poll();
            if a.qp.borrow().error().is_some() {
                f.set(true);
            }
            if dev.as_ref().is_some_and(|d| d.release_requested()) {
                // The kernel wants the function back (unbind, hot removal): the controller is going.
                log::warn!("nvme_pcie: the kernel asks for the device back: controller removed");
                rm.set(true);
                f.set(true);
            }
            if let Some(bar) = &regs {
                // A PCIe controller's loss shows in its status register.
                if let Err(e) = nvme_pcie::ctrlr::status(bar) {
                    if !f.get() {
                        log::error!("nvme_pcie: controller lost: {e}");
                    }
                    f.set(true);
                }
            }
            did
        });
        let keep_alive = (self.opts.kato_ms > 0).then(|| {
            let a = admin.clone();
            let f = failed.clone();
            // Ticks (half the keep alive timeout each) the last keep alive has gone unanswered; `None`: answered.
            let unanswered: Rc<Cell<Option<u32>>> = Rc::new(Cell::new(None));
            let addr = self.opts.addr;
            Poller::register(
                "nvme_ctrlr_keep_alive",
                self.opts.kato_ms as u64 * 1000 / 2,
                move || {
                    // A dead connection gets no more keep alives (they would only pile up).
                    if f.get() || a.qp.borrow().error().is_some() {
                        f.set(true);
                        return false;
                    }
                    if let Some(n) = unanswered.get() {
                        // A connection that silently stopped carrying anything (a network cut that drops
                        // packets): no answer within the keep alive timeout means the controller is lost.
                        if n + 1 >= 2 {
                            log::error!("nvme: {addr}: keep alive not answered within the keep alive timeout");
                            f.set(true);
                        } else {
                            unanswered.set(Some(n + 1));
                        }
                        return false;
                    }
                    unanswered.set(Some(0));
                    let (f, u) = (f.clone(), unanswered.clone());
                    a.cmd(
                        Sqe::new(admin::KEEP_ALIVE, 0),
                        Dir::None,
                        Vec::new(),
                        move |c, _| {
                            u.set(None);
                            if !c.status.is_success() {
                                log::error!("keep alive failed: {}", c.status);
                                f.set(true);
                            }
                        },
                    );
                    true
                },
            )
        });
        // Namespace attribute (and ANA change) notices on, and one event request outstanding (SPDK's init does
        // both).
        let mut aec = Sqe::new(admin::SET_FEATURES, 0);
        aec.set_cdw(10, feat::ASYNC_EVENT_CONFIGURATION as u32);
        let notices = if self.opts.subnqn == DISCOVERY_NQN {
            // Discovery log page change notices.
            1 << 31
        } else {
            1 << 8 | if ana.reporting() { 1 << 11 } else { 0 }
        };
        aec.set_cdw(11, notices);
        admin.cmd(aec, Dir::None, Vec::new(), |c, _| {
            if !c.status.is_success() {
                log::warn!("nvme: Set Features Async Event Configuration: {}", c.status);
            }
        });
        let ns_hook: NsChangeHook = Rc::new(RefCell::new(None));
        let event_hook: EventHook = Rc::new(RefCell::new(None));
        arm_aer(admin.clone(), ns_hook.clone(), event_hook.clone(), ana);
        done(Ok(Controller {
            info,
            admin,
            _poller: poller,
            _keep_alive: keep_alive,
            failed,
            ns_hook,
            event_hook,
            pcie: pcie_ctrlr,
            removed,
        }));
    }
}

/// Reads the active namespace list and Identify Namespace of each (SPDK's namespace scan); `done` gets the
/// usable ones, or the step that failed.
fn scan_namespaces(
    admin: &Rc<Admin>,
    done: impl FnOnce(std::result::Result<Vec<NsInfo>, String>) + 'static,
) {
    let a = admin.clone();
    admin.cmd(
        identify_sqe(cns::ACTIVE_NS_LIST, 0),
        Dir::FromCtrl,
        vec![0; 4096],
        move |c, d| {
            if !ok(c) {
                return done(Err(format!("Identify Active Namespace List: {}", c.status)));
            }
            match decode_ns_list(d) {
                Ok(list) => identify_each(a, list, Vec::new(), Box::new(done)),
                Err(e) => done(Err(format!("namespace list: {e}"))),
            }
        },
    );
}

type ScanDone = Box<dyn FnOnce(std::result::Result<Vec<NsInfo>, String>)>;

/// The Namespace Identification Descriptor list of `ns` (its UUID, and its NGUID when Identify Namespace
/// gave none), then the next namespace. A controller older than NVMe 1.3 may refuse CNS 03h: the namespace
/// then has no UUID, as SPDK leaves it.
fn identify_descs(
    admin: Rc<Admin>,
    mut ns: NsInfo,
    left: Vec<u32>,
    mut got: Vec<NsInfo>,
    done: ScanDone,
) {
    let a = admin.clone();
    admin.cmd(
        identify_sqe(cns::NS_ID_DESC_LIST, ns.nsid),
        Dir::FromCtrl,
        vec![0; 4096],
        move |c, d| {
            if ok(c) {
                match nvme_proto::identify::decode_ns_id_descs(d) {
                    Ok(descs) => {
                        for desc in descs {
                            match desc {
                                NsIdDesc::Uuid(u) => ns.uuid = Some(u),
                                NsIdDesc::Nguid(g) if ns.nguid == [0; 16] => ns.nguid = g,
                                _ => {}
                            }
                        }
                    }
                    Err(e) => log::warn!("namespace {}: identification descriptors: {e}", ns.nsid),
                }
            }
            got.push(ns);
            identify_each(a, left, got, done);
        },
    );
}

/// Identify Namespace for each of `left`, collecting the usable ones into `got`.
fn identify_each(admin: Rc<Admin>, mut left: Vec<u32>, got: Vec<NsInfo>, done: ScanDone) {
    if left.is_empty() {
        return done(Ok(got));
    }
    let nsid = left.remove(0);
    let a = admin.clone();
    admin.cmd(
        identify_sqe(cns::NS, nsid),
        Dir::FromCtrl,
        vec![0; 4096],
        move |c, d| {
            if !ok(c) {
                return done(Err(format!("Identify Namespace {nsid}: {}", c.status)));
            }
            match NsData::decode(d) {
                Ok(n) => {
                    let bs = n.lbaf[n.format_index()].data_size();
                    match bs.filter(|b| (512..=65536).contains(b)) {
                        Some(bs) if n.nsze > 0 => {
                            let ns = NsInfo {
                                nsid,
                                blocks: n.nsze,
                                block_size: bs as u32,
                                nguid: n.nguid,
                                eui64: n.eui64,
                                uuid: None,
                                shared: n.nmic & 1 != 0,
                                anagrpid: n.anagrpid,
                            };
                            return identify_descs(a, ns, left, got, done);
                        }
                        // Inactive or unusable: no bdev for it (as SPDK skips it).
                        _ => log::warn!(
                            "namespace {nsid}: size {} block size {bs:?}: skipped",
                            n.nsze
                        ),
                    }
                }
                Err(e) => log::warn!("namespace {nsid}: {e}: skipped"),
            }
            identify_each(a, left, got, done);
        },
    );
}

/// What hears of every Asynchronous Event: (type, information, log page).
type EventHook = Rc<RefCell<Option<Box<dyn Fn(u8, u8, u8)>>>>;

/// Where a discovery log read reports.
type DiscoveryDone = Box<dyn FnOnce(std::result::Result<Vec<DiscoveryEntry>, String>)>;

/// Discovery log entries read at most (a larger log is cut, with a warning).
const MAX_DISCOVERY_ENTRIES: u64 = 1024;

/// Reads the discovery log: the header and first entries, then the rest in pieces; starts over (up to `tries`
/// times) when the generation counter moved while reading.
fn read_discovery(admin: Rc<Admin>, tries: u32, done: DiscoveryDone) {
    let a = admin.clone();
    log_page_at(&admin, lid::DISCOVERY, ADMIN_XFER as usize, 0, move |r| {
        let first = match r {
            Ok(d) => d.to_vec(),
            Err(e) => return done(Err(e)),
        };
        let hdr = match DiscoveryLogHeader::decode(&first) {
            Ok(h) => h,
            Err(e) => return done(Err(format!("discovery log: {e}"))),
        };
        let mut numrec = hdr.numrec;
        if numrec > MAX_DISCOVERY_ENTRIES {
            log::warn!(
                "discovery log: {numrec} entries, only the first {MAX_DISCOVERY_ENTRIES} are used"
            );
            numrec = MAX_DISCOVERY_ENTRIES;
        }
        let total = nvme_proto::log::discovery_log_len(numrec) as usize;
        more_discovery(a, tries, hdr.genctr, total, first, done);
    });
}

/// Reads the discovery log from `got.len()` on until `total` bytes are in, then checks the generation.
fn more_discovery(
    admin: Rc<Admin>,
    tries: u32,
    genctr: u64,
    total: usize,
    mut got: Vec<u8>,
    done: DiscoveryDone,
) {
    if got.len() >= total {
        got.truncate(total);
        // The generation read last must be the one read first, or the pieces may not fit together.
        let a = admin.clone();
        return log_page_at(&admin, lid::DISCOVERY, 16, 0, move |r| {
            let now = r
                .ok()
                .and_then(|d| DiscoveryLogHeader::decode(d).ok().map(|h| h.genctr));
            if now != Some(genctr) && tries > 1 {
                return read_discovery(a, tries - 1, done);
            }
            let entries = got[DiscoveryLogHeader::SIZE..]
                .chunks_exact(DiscoveryEntry::SIZE)
                .filter_map(|c| DiscoveryEntry::decode(c).ok())
                .collect();
            done(Ok(entries))
        });
    }
    let at = got.len();
    let a = admin.clone();
    log_page_at(
        &admin,
        lid::DISCOVERY,
        ADMIN_XFER as usize,
        at as u64,
        move |r| match r {
            Ok(d) => {
                got.extend_from_slice(d);
                more_discovery(a, tries, genctr, total, got, done)
            }
            Err(e) => done(Err(e)),
        },
    );
}

/// What a controller's user hears of namespace changes: the new active list.
pub type NsChangeHook = Rc<RefCell<Option<Box<dyn Fn(Vec<NsInfo>)>>>>;

/// Keeps one Asynchronous Event Request outstanding: a namespace attribute notice reads the Changed Namespace
/// List (which also re-arms the event) and rescans, then tells `hook`; an ANA change notice reads the ANA log
/// page into `ana`; any other event's log page is read so the controller sends the next one. Stops when the
/// admin queue goes.
fn arm_aer(admin: Rc<Admin>, hook: NsChangeHook, events: EventHook, ana: Arc<AnaStates>) {
    let a = admin.clone();
    admin.cmd(
        Sqe::new(admin::ASYNC_EVENT_REQUEST, 0),
        Dir::None,
        Vec::new(),
        move |c, _| {
            if !ok(c) {
                // Aborted with the queue (or refused): nothing more to wait for.
                return;
            }
            let (ty, info, lid) = (c.dw0 & 7, (c.dw0 >> 8) & 0xff, (c.dw0 >> 16) & 0xff);
            log::info!("nvme: async event type {ty} info {info:#x} log {lid:#x}");
            let notice_ns = ty == 2 && info == 0;
            let (a2, h2, e2, ana2) = (a.clone(), hook.clone(), events.clone(), ana.clone());
            let after_log = move || {
                if notice_ns {
                    let h = h2.clone();
                    scan_namespaces(&a2, move |res| match res {
                        Ok(list) => {
                            if let Some(f) = h.borrow().as_ref() {
                                f(list);
                            }
                        }
                        Err(e) => log::error!("nvme: namespace rescan: {e}"),
                    });
                }
                if let Some(f) = e2.borrow().as_ref() {
                    f(ty as u8, info as u8, lid as u8);
                }
                arm_aer(a2, h2, e2, ana2);
            };
            if ty == 2 && info == 3 && ana.reporting() {
                // ANA change: the log page read both updates the states and re-arms the notice.
                read_ana(&a, ana.clone(), move |r| {
                    if let Err(e) = r {
                        log::warn!("nvme: {e}");
                    }
                    after_log();
                });
            } else if lid != 0 {
                log_page(&a, lid as u8, 4096, move |_| after_log());
            } else {
                after_log();
            }
        },
    );
}

fn connect_data(opts: &CtrlrOpts, cntlid: u16) -> Vec<u8> {
    let mut d = vec![0u8; ConnectData::SIZE];
    ConnectData {
        hostid: opts.hostid,
        cntlid,
        subnqn: opts.subnqn.clone(),
        hostnqn: opts.hostnqn.clone(),
    }
    .encode(&mut d);
    d
}

fn prop(offset: u32, size8: bool, set: Option<u64>) -> Sqe {
    Property {
        size8,
        offset,
        value: set.unwrap_or(0),
    }
    .to_sqe(set.is_some(), 0)
}

fn identify_sqe(cns_: u8, nsid: u32) -> Sqe {
    let mut s = Sqe::new(admin::IDENTIFY, 0);
    s.set_nsid(nsid);
    s.set_cdw(10, cns_ as u32);
    s
}

/// Token of an I/O queue's own Fabrics Connect (callers' tokens are below it).
const CONNECT_TOKEN: u64 = u64::MAX;
/// Token of an I/O queue's own authentication commands.
const AUTH_TOKEN: u64 = u64::MAX - 1;

/// Whether a token is one of the queue's own commands rather than a caller's.
fn own_token(token: u64) -> bool {
    token >= AUTH_TOKEN
}

/// What a queue pair does after its Connect answered `dw0`: nothing more, or DH-HMAC-CHAP transaction `tid`
/// (the controller requires it, or we want it to prove it holds the controller key), as SPDK's host decides.
fn auth_after_connect(opts: &CtrlrOpts, dw0: u32, tid: u16) -> Result<Option<Transaction>> {
    use nvme_proto::auth::{CONNECT_ASCR, CONNECT_ATR};
    if dw0 & CONNECT_ASCR != 0 {
        return Err(Error::new(
            ErrorKind::Invalid,
            "the controller requires a secure channel (TLS concatenation), which is not supported",
        ));
    }
    let bidirectional = opts.auth.as_ref().is_some_and(|a| a.bidirectional);
    if dw0 & CONNECT_ATR == 0 && !bidirectional {
        return Ok(None);
    }
    let Some(a) = &opts.auth else {
        return Err(Error::new(
            ErrorKind::Io(libc::ENOKEY),
            "the controller requires authentication: no DH-HMAC-CHAP key (dhchap_key) was given",
        ));
    };
    Transaction::new(a, tid, &opts.hostnqn, &opts.subnqn).map(Some)
}

/// An I/O queue pair of a controller, on the thread that uses it: its own connection and Fabrics Connect (or,
/// on PCIe, its rings created through the admin queue), then commands.
pub struct IoQueue {
    qp: Qpair,
    info: Arc<CtrlrInfo>,
    /// PCIe: the result of the Create I/O CQ or SQ in flight on the admin thread (0: none yet; else the status
    /// field with bit 16 set).
    created: Arc<std::sync::atomic::AtomicU32>,
    /// PCIe: Create I/O SQ was asked for (so closing deletes the SQ before the CQ).
    sq_posted: bool,
    qid: u16,
    state: IoState,
    started: Instant,
    /// The Connect command's data, in DMA memory (an RDMA controller reads it from there).
    connect_data: DmaBuf,
    /// The DH-HMAC-CHAP transaction in progress, and the DMA buffer its messages go through.
    auth: Option<Box<Transaction>>,
    auth_buf: Option<DmaBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IoState {
    Connecting,
    ConnectSent,
    Authenticating,
    Ready,
    Failed,
}

impl IoQueue {
    /// Starts an I/O queue of the controller `info` describes; ready once [`IoQueue::poll`] got it connected.
    pub fn connect(info: Arc<CtrlrInfo>) -> Result<IoQueue> {
        let qid = info.take_qid().ok_or_else(|| {
            Error::new(
                ErrorKind::NoMemory,
                format!("controller {}: no I/O queue left", info.opts.subnqn),
            )
        })?;
        let depth = info.opts.io_queue_size.max(2);
        let created = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let qp = if let Some(p) = &info.pcie {
            let mut q = PcieQpair::new(
                p.bar.clone(),
                qid,
                // One entry more than the commands it carries (a full ring would look empty), so that
                // `io_queue_size` commands fit as on fabrics.
                depth.saturating_add(1).min(p.max_entries),
                p.dstrd,
                info.max_xfer,
                p.ctrlr_dev.translations().cache(),
            )
            .map_err(|e| Error::os(e, "I/O queue memory"))?;
            q.set_liveness(p.live.clone());
            // SGLs for what PRPs cannot describe, when the controller takes them (SGLS bits 1:0: 01b any
            // alignment, 10b dword-aligned data blocks), as SPDK's driver does.
            use nvme_proto::identify::sgls;
            match info.cdata.sgls & sgls::SUPPORT_MASK {
                sgls::SUPPORTED => q.enable_sgl(false),
                sgls::SUPPORTED_DWORD_ALIGNED => q.enable_sgl(true),
                _ => {}
            }
            // Create I/O Completion Queue: physically contiguous, interrupts off (polled).
            let mut sqe = Sqe::new(admin::CREATE_IO_CQ, 0);
            sqe.set_prp(q.cq_iova(), 0);
            sqe.set_cdw(10, qid as u32 | ((q.depth() as u32 - 1) << 16));
            sqe.set_cdw(11, 1);
            let c = created.clone();
            if !p.post(sqe, move |cqe| {
                c.store(1 << 16 | cqe.status.to_field() as u32, Ordering::Release)
            }) {
                return Err(Error::new(ErrorKind::Io(libc::ENXIO), "controller closed"));
            }
            Qpair::Pcie(q)
        } else if info.opts.rdma {
            Qpair::Rdma(
                RdmaQpair::connect(
                    info.opts.addr,
                    qid,
                    depth,
                    info.max_xfer,
                    info.opts.connect_timeout,
                    info.opts.rdma_knobs,
                )
                .map_err(|e| Error::os(e, "I/O queue connect"))?,
            )
        } else {
            Qpair::Tcp(
                TcpQpair::connect(
                    info.opts.addr,
                    depth,
                    info.icd_max,
                    info.max_xfer,
                    info.opts.digests,
                    info.opts.tls.as_ref(),
                    info.opts.tcp_user_timeout_ms,
                )
                .map_err(|e| Error::os(e, "I/O queue connect"))?,
            )
        };
        let data = connect_data(&info.opts, info.cntlid);
        let mut connect_data =
            DmaBuf::alloc(data.len()).map_err(|e| Error::os(e, "I/O queue connect data"))?;
        connect_data.as_mut_slice().copy_from_slice(&data);
        Ok(IoQueue {
            qp,
            created,
            sq_posted: false,
            info,
            qid,
            state: IoState::Connecting,
            started: Instant::now(),
            connect_data,
            auth: None,
            auth_buf: None,
        })
    }

    /// Ready for commands.
    pub fn ready(&self) -> bool {
        self.state == IoState::Ready
    }

    /// Failed (connection lost, Connect refused, or timed out): commands complete with errors and new ones are
    /// refused.
    pub fn failed(&self) -> bool {
        self.state == IoState::Failed
    }

    /// Commands outstanding.
    pub fn outstanding(&self) -> usize {
        self.qp.outstanding()
    }

    /// The queue id.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// The controller.
    pub fn info(&self) -> &Arc<CtrlrInfo> {
        &self.info
    }

    /// The queue pair underneath (its transport and counters).
    pub fn qpair(&self) -> &Qpair {
        &self.qp
    }

    /// Sends an I/O command (see [`Qpair::submit`]).
    ///
    /// # Safety
    /// As [`Qpair::submit`].
    pub unsafe fn submit(
        &mut self,
        sqe: Sqe,
        iovs: &[Iov],
        dir: Dir,
        token: u64,
    ) -> std::result::Result<(), nvme_proto::host::SubmitError> {
        if self.state != IoState::Ready {
            return Err(nvme_proto::host::SubmitError::NotReady);
        }
        // SAFETY: forwarded contract.
        unsafe { self.qp.submit(sqe, iovs, dir, token) }
    }

    /// Moves the queue on (connecting, then completions to `done`); whether anything happened.
    pub fn poll(&mut self, done: &mut dyn FnMut(u64, Cqe)) -> bool {
        let mut connect_result = None;
        let mut auth_result = None;
        let did = self.qp.poll(&mut |token, cqe| match token {
            CONNECT_TOKEN => connect_result = Some(cqe),
            AUTH_TOKEN => auth_result = Some(cqe),
            _ => done(token, cqe),
        });
        if let Some(c) = connect_result {
            if c.status.is_success() {
                match auth_after_connect(&self.info.opts, c.dw0, self.qid) {
                    Ok(None) => self.state = IoState::Ready,
                    Ok(Some(t)) => {
                        self.auth = Some(Box::new(t));
                        self.state = IoState::Authenticating;
                        self.auth_next();
                    }
                    Err(e) => {
                        log::error!("I/O queue {}: {e}", self.qid);
                        self.state = IoState::Failed;
                    }
                }
            } else {
                log::error!("I/O queue {} Connect: {}", self.qid, c.status);
                self.state = IoState::Failed;
            }
        }
        if let Some(c) = auth_result {
            self.auth_completed(&c);
        }
        if self.qp.error().is_some() {
            self.state = IoState::Failed;
        }
        if matches!(self.qp, Qpair::Pcie(_)) {
            self.pcie_create();
        } else if self.state == IoState::Connecting && self.qp.ready() {
            let sqe = Connect {
                recfmt: 0,
                qid: self.qid,
                sqsize: self.info.opts.io_queue_size.max(2) - 1,
                cattr: 0,
                kato: 0,
            }
            .to_sqe(0);
            let iov = [Iov {
                base: self.connect_data.as_ptr(),
                len: self.connect_data.len(),
            }];
            // SAFETY: `connect_data` lives in this IoQueue, alongside the queue pair, until both are dropped.
            match unsafe { self.qp.submit(sqe, &iov, Dir::ToCtrl, CONNECT_TOKEN) } {
                Ok(()) => self.state = IoState::ConnectSent,
                Err(e) => {
                    log::error!("I/O queue {} Connect: {e:?}", self.qid);
                    self.state = IoState::Failed;
                }
            }
        }
        if matches!(
            self.state,
            IoState::Connecting | IoState::ConnectSent | IoState::Authenticating
        ) && self.started.elapsed() > self.info.opts.connect_timeout
        {
            log::error!("I/O queue {}: connect timed out", self.qid);
            self.close(done);
        }
        did
    }

    /// Sends the authentication transaction's next command, or ends it (the queue is ready).
    fn auth_next(&mut self) {
        let Some(cmd) = self.auth.as_ref().and_then(|t| t.command()) else {
            self.auth = None;
            self.state = IoState::Ready;
            return;
        };
        if self.auth_buf.is_none() {
            match DmaBuf::alloc(nvme_proto::auth::RECV_LEN) {
                Ok(b) => self.auth_buf = Some(b),
                Err(e) => {
                    log::error!("I/O queue {}: authentication buffer: {e}", self.qid);
                    self.state = IoState::Failed;
                    return;
                }
            }
        }
        let Some(buf) = self.auth_buf.as_mut() else {
            return;
        };
        let len = cmd.len.min(buf.len());
        if cmd.dir == Dir::ToCtrl {
            buf.as_mut_slice()[..len].copy_from_slice(&cmd.data[..len]);
        }
        let iov = [Iov {
            base: buf.as_ptr(),
            len,
        }];
        // SAFETY: `auth_buf` lives in this IoQueue, alongside the queue pair, until both are dropped, and is not
        // touched again until this command completes.
        if let Err(e) = unsafe { self.qp.submit(cmd.sqe, &iov, cmd.dir, AUTH_TOKEN) } {
            log::error!("I/O queue {} authentication: {e:?}", self.qid);
            self.state = IoState::Failed;
        }
    }

    /// An authentication command completed: the transaction's next step.
    fn auth_completed(&mut self, c: &Cqe) {
        let received = self.auth_buf.as_ref().map_or(&[][..], |b| b.as_slice());
        match self.auth.as_mut().map(|t| t.completed(c, received)) {
            Some(Ok(true)) => {
                self.auth = None;
                self.state = IoState::Ready;
            }
            Some(Ok(false)) => self.auth_next(),
            Some(Err(e)) => {
                log::error!("I/O queue {} DH-HMAC-CHAP: {e}", self.qid);
                self.auth = None;
                self.state = IoState::Failed;
            }
            None => {}
        }
    }

    /// PCIe: the queue exists once the controller's thread had Create I/O CQ, then Create I/O SQ, done.
    fn pcie_create(&mut self) {
        if !matches!(self.state, IoState::Connecting | IoState::ConnectSent) {
            return;
        }
        let r = self.created.load(Ordering::Acquire);
        if r == 0 {
            return;
        }
        let status = nvme_proto::status::Status::from_field(r as u16);
        let what = if self.state == IoState::Connecting {
            "CQ"
        } else {
            "SQ"
        };
        if !status.is_success() {
            log::error!("I/O queue {}: Create I/O {what}: {status}", self.qid);
            self.state = IoState::Failed;
            return;
        }
        if self.state == IoState::ConnectSent {
            self.state = IoState::Ready;
            return;
        }
        let (Some(p), Qpair::Pcie(q)) = (&self.info.pcie, &self.qp) else {
            return;
        };
        // Create I/O Submission Queue on the completion queue of the same id, physically contiguous, medium
        // priority (ignored under round robin).
        let mut sqe = Sqe::new(admin::CREATE_IO_SQ, 0);
        sqe.set_prp(q.sq_iova(), 0);
        sqe.set_cdw(10, self.qid as u32 | ((q.depth() as u32 - 1) << 16));
        sqe.set_cdw(11, 1 | (self.qid as u32) << 16);
        self.created.store(0, Ordering::Release);
        let c = self.created.clone();
        self.sq_posted = true;
        if p.post(sqe, move |cqe| {
            c.store(1 << 16 | cqe.status.to_field() as u32, Ordering::Release)
        }) {
            self.state = IoState::ConnectSent;
        } else {
            self.state = IoState::Failed;
        }
    }

    /// Sets the command timeout [`IoQueue::expired`] reports against (`None`: none).
    pub fn set_timeout(&mut self, t: Option<Duration>) {
        self.qp.set_timeout(t, None);
    }

    /// Reports, once each, the commands outstanding past the timeout at `now`: (command id, token).
    pub fn expired(&mut self, now: Instant, f: &mut dyn FnMut(u16, u64)) {
        self.qp.expired(now, &mut |cid, token| {
            if !own_token(token) {
                f(cid, token)
            }
        });
    }

    /// Closes the queue; commands still in it complete through `done` with "aborted, SQ deleted".
    pub fn close(&mut self, done: &mut dyn FnMut(u64, Cqe)) {
        if matches!(self.qp, Qpair::Pcie(_)) {
            return self.close_pcie(done);
        }
        // The queue's own Connect and authentication are not the caller's to hear about.
        self.qp.close(&mut |token, cqe| {
            if !own_token(token) {
                done(token, cqe)
            }
        });
        self.state = IoState::Failed;
    }

    /// PCIe: the device may still work on what it was given, into the callers' buffers: commands are given a
    /// short while to complete for real (the device runs them on its own), the rest are failed, and the queue
    /// is deleted on the controller's thread, which keeps the rings' memory until the device let go of them.
    fn close_pcie(&mut self, done: &mut dyn FnMut(u64, Cqe)) {
        if self.state == IoState::Failed && self.qp.error().is_some() {
            return;
        }
        let alive = self.info.pcie.as_ref().is_some_and(|p| {
            if !p.live.load(Ordering::Acquire) {
                return false;
            }
            nvme_pcie::ctrlr::status(&p.bar).is_ok_and(|st| st & csts::RDY != 0)
        });
        let until = Instant::now() + Duration::from_millis(100);
        while alive && self.qp.outstanding() > 0 && Instant::now() < until {
            self.qp.poll(done);
        }
        if self.qp.outstanding() > 0 {
            log::warn!(
                "I/O queue {}: {} commands still at the device: failed",
                self.qid,
                self.qp.outstanding()
            );
        }
        self.qp.close(done);
        let existed =
            self.state != IoState::Connecting || self.created.load(Ordering::Acquire) != 0;
        self.state = IoState::Failed;
        let (Some(p), true) = (self.info.pcie.clone(), existed) else {
            return;
        };
        // The rings go to the controller's thread with the deletions; a placeholder stays here.
        let q = std::mem::replace(&mut self.qp, Qpair::Closed);
        let Qpair::Pcie(q) = q else { return };
        let mem: QueueMemory = q.into_memory();
        let qid = self.qid;
        let p2 = p.clone();
        let delete_cq = move || {
            let mut del_cq = Sqe::new(admin::DELETE_IO_CQ, 0);
            del_cq.set_cdw(10, qid as u32);
            p2.post(del_cq, move |c| {
                if !c.status.is_success() {
                    log::warn!("I/O queue {qid}: Delete I/O CQ: {}", c.status);
                }
                drop(mem);
            });
        };
        if !self.sq_posted {
            return delete_cq();
        }
        let mut del_sq = Sqe::new(admin::DELETE_IO_SQ, 0);
        del_sq.set_cdw(10, qid as u32);
        p.post(del_sq, move |c| {
            if !c.status.is_success() {
                log::warn!("I/O queue {qid}: Delete I/O SQ: {}", c.status);
            }
            delete_cq();
        });
    }
}
