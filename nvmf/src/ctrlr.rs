//! Controllers (SPDK's `lib/nvmf/ctrlr.c`): Fabrics Connect, Property Get/Set, the admin commands, keep alive
//! and asynchronous events. A controller is created by an admin queue's Connect and runs its admin commands on
//! that queue's poll group thread; its I/O queues may be on any poll group. What it shares with them sits
//! behind a lock; the I/O path never takes it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nvme_proto::cmd::{admin, feat, Sqe};
use nvme_proto::fabrics::{cc, csts, reg, Cap, Connect, ConnectData, Property};
use nvme_proto::identify::{
    cns, csi, encode_ns_id_descs, encode_ns_list, set_nul_padded, set_space_padded, CtrlrData,
    LbaFormat, NsData, NsIdDesc,
};
use nvme_proto::log::{self as lp, copy_window, lid, CmdsEffectsLog, FirmwareSlotLog};
use nvme_proto::status::{generic, specific, Status};
use reactor::{ticks, Poller, ThreadHandle};

use crate::pg::{self, QpKey};
use crate::tgt::{self, SubType, Subsystem, Trid};
use crate::transport::TransportOpts;

/// Firmware revision reported in Identify and the firmware slot log (SPDK's `FW_VERSION`).
pub const FW_VERSION: &str = "24.05";
/// Outstanding Asynchronous Event Requests a controller accepts (AERL is this minus one).
const MAX_AERS: usize = 4;
/// Keep alive granularity reported in KAS, 100 ms units; timeouts are rounded up to multiples of it (SPDK).
const KAS: u16 = 100;
/// Keep alive timeout of a discovery controller whose host asked for none (SPDK's `NVMF_DISC_KATO_IN_MS`).
const DISC_KATO_MS: u32 = 120_000;
/// Shortest keep alive timeout (SPDK's `MIN_KEEP_ALIVE_TIMEOUT_IN_MS`).
const MIN_KATO_MS: u32 = 10_000;
/// NVMe version 1.3.
const VERSION: u32 = 0x0001_0300;
/// SPDK's large iobuf buffer (`iobuf_opts.large_bufsize`), which bounds the blocks of an emulated copy.
const COPY_EMULATION_BYTES: u32 = 132 * 1024;

/// Abort command limit, 0-based (SPDK's `NVMF_ABORT_COMMAND_LIMIT`).
const ACL: u8 = 3;
/// Asynchronous event configuration bits.
const AEC_NS_ATTR: u32 = 1 << 8;
const AEC_ANA: u32 = 1 << 11;
const AEC_DISCOVERY: u32 = 1 << 31;

/// Asynchronous event completion (dword 0) for a notice.
fn notice(info: u8, log_page: u8) -> u32 {
    2 | (info as u32) << 8 | (log_page as u32) << 16
}

/// What a transport knows when a Connect arrives.
pub struct ConnectInfo {
    /// The listener the connection came in through.
    pub listen: Trid,
    /// The host's address.
    pub peer: SocketAddr,
    /// The poll group thread of the queue pair.
    pub thread: ThreadHandle,
    /// The queue pair's key on that thread.
    pub key: QpKey,
    /// The transport's options.
    pub opts: TransportOpts,
    /// Over TLS: the host and subsystem NQNs its PSK identity names (`Some(None)`: an identity that names none).
    pub tls: Option<Option<(String, String)>>,
}

/// A queue pair that Connect accepted.
pub struct Connected {
    /// Its controller.
    pub ctrlr: Arc<Ctrlr>,
    /// Queue id.
    pub qid: u16,
    /// Submission queue size, 0-based.
    pub sqsize: u16,
}

/// An admin command's outcome.
pub enum Admin {
    /// Complete now.
    Done {
        /// Completion dword 0.
        dw0: u32,
        /// Status.
        status: Status,
    },
    /// Left outstanding (an Asynchronous Event Request); completes through the queue pair later.
    Parked,
}

fn done(status: Status) -> Admin {
    Admin::Done { dw0: 0, status }
}

fn ok(dw0: u32) -> Admin {
    Admin::Done {
        dw0,
        status: Status::SUCCESS,
    }
}

fn invalid_field() -> Admin {
    done(Status::generic(generic::INVALID_FIELD))
}

/// A queue pair of a controller.
#[derive(Clone)]
struct QpRef {
    qid: u16,
    thread: ThreadHandle,
    key: QpKey,
}

impl QpRef {
    fn disconnect(&self) {
        let key = self.key;
        self.thread.send(move || {
            if let Some(q) = pg::current().and_then(|pg| pg.qpair(key)) {
                q.disconnect();
            }
        });
    }
}

/// A controller's changing state.
struct State {
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    kato_ms: u32,
    aec: u32,
    arbitration: u32,
    power_management: u32,
    temp_threshold: u32,
    error_recovery: u32,
    volatile_write_cache: u32,
    write_atomicity: u32,
    /// AER commands parked on the admin queue: (slot, command id).
    aer_slots: Vec<(u16, u16)>,
    /// Events not yet delivered (no AER was outstanding).
    pending_events: VecDeque<u32>,
    /// Notice types sent and not yet cleared by reading their log page (bits as in AEC).
    masked: u32,
    changed_ns: Vec<u32>,
    changed_overflow: bool,
    qpairs: Vec<QpRef>,
    destroyed: bool,
}

/// A controller.
pub struct Ctrlr {
    /// Controller id.
    pub cntlid: u16,
    /// Its subsystem.
    pub subsys: Arc<Subsystem>,
    /// The host's NQN.
    pub hostnqn: String,
    /// The host's identifier.
    pub hostid: [u8; 16],
    /// The listener its admin queue came in through.
    pub listen: Trid,
    /// The transport's options.
    pub opts: TransportOpts,
    admin_thread: ThreadHandle,
    admin_key: QpKey,
    last_keep_alive: AtomicU64,
    st: Mutex<State>,
}

/// The Connect response for an invalid parameter: IATTR (0 command, 1 data) and the parameter's offset.
fn invalid_param(data: bool, offset: u32) -> (Status, u32) {
    (
        Status::specific(specific::FABRIC_INVALID_PARAM).dnr(),
        offset | (data as u32) << 16,
    )
}

/// Handles a Fabrics Connect on a new queue pair: admin queues create a controller, I/O queues join theirs.
pub fn connect(sqe: &Sqe, data: &[u8], info: ConnectInfo) -> Result<Connected, (Status, u32)> {
    let cmd = Connect::from_sqe(sqe);
    if data.len() < ConnectData::SIZE {
        log::error!(
            "nvmf: Connect from {} without its 1024 bytes of data",
            info.peer
        );
        return Err((Status::generic(generic::INVALID_FIELD).dnr(), 0));
    }
    let d = ConnectData::decode(data).map_err(|e| {
        log::error!("nvmf: Connect from {}: {e}", info.peer);
        invalid_param(true, ConnectData::SUBNQN_OFFSET as u32)
    })?;
    let Some(subsys) = tgt::tgt().find(&d.subnqn) else {
        log::error!(
            "nvmf: Connect from {} to unknown subsystem {}",
            info.peer,
            d.subnqn
        );
        return Err(invalid_param(true, ConnectData::SUBNQN_OFFSET as u32));
    };
    // Over TLS the PSK proved who the host is: it may connect as that host to that subsystem only.
    if let Some(tls) = &info.tls {
        if tls.as_ref() != Some(&(d.hostnqn.clone(), d.subnqn.clone())) {
            log::error!(
                "nvmf: Connect from {} as host '{}' to '{}' does not match its TLS PSK identity",
                info.peer,
                d.hostnqn,
                d.subnqn
            );
            return Err((Status::specific(specific::FABRIC_INVALID_HOST).dnr(), 0));
        }
    }
    if !subsys.host_allowed(&d.hostnqn) {
        log::error!(
            "nvmf: Subsystem '{}' does not allow host '{}'",
            d.subnqn,
            d.hostnqn
        );
        return Err((Status::specific(specific::FABRIC_INVALID_HOST).dnr(), 0));
    }
    if !subsys.listener_allowed(&info.listen) {
        log::error!(
            "nvmf: Subsystem '{}' does not allow host '{}' to connect at {}:{}",
            d.subnqn,
            d.hostnqn,
            info.listen.traddr,
            info.listen.trsvcid
        );
        return Err((Status::specific(specific::FABRIC_INVALID_HOST).dnr(), 0));
    }
    if cmd.recfmt != 0 {
        return Err((
            Status::specific(specific::FABRIC_INCOMPATIBLE_FORMAT).dnr(),
            0,
        ));
    }
    // SQSIZE is 0-based: at least 1, and below the transport's queue depth.
    let max = if cmd.qid == 0 {
        info.opts.max_aq_depth
    } else {
        info.opts.max_queue_depth
    };
    if cmd.sqsize == 0 || cmd.sqsize >= max {
        log::error!("nvmf: Connect with SQSIZE {} (max {})", cmd.sqsize, max - 1);
        return Err(invalid_param(false, 44));
    }
    if cmd.qid == 0 {
        if d.cntlid != ConnectData::CNTLID_DYNAMIC {
            log::error!(
                "nvmf: the target only supports the dynamic controller model (CNTLID {:#x})",
                d.cntlid
            );
            return Err(invalid_param(true, 16));
        }
        let c = Ctrlr::create(subsys, &d, &cmd, info)?;
        return Ok(Connected {
            ctrlr: c,
            qid: 0,
            sqsize: cmd.sqsize,
        });
    }
    if subsys.subtype == SubType::Discovery {
        return Err(invalid_param(false, 42));
    }
    let Some(c) = subsys
        .state()
        .ctrlrs
        .iter()
        .find(|c| c.cntlid == d.cntlid)
        .cloned()
    else {
        log::error!(
            "nvmf: I/O queue Connect for unknown controller {:#x}",
            d.cntlid
        );
        return Err(invalid_param(true, 16));
    };
    if c.hostnqn != d.hostnqn {
        log::error!(
            "nvmf: I/O queue Connect from host {} for a controller of {}",
            d.hostnqn,
            c.hostnqn
        );
        return Err(invalid_param(true, ConnectData::HOSTNQN_OFFSET as u32));
    }
    let mut st = c.state();
    if st.destroyed || st.cc & cc::EN == 0 {
        log::error!("nvmf: I/O queue Connect before the controller was enabled");
        return Err(invalid_param(false, 42));
    }
    if (st.cc >> cc::IOSQES_SHIFT) & 0xf != 6 || (st.cc >> cc::IOCQES_SHIFT) & 0xf != 4 {
        return Err(invalid_param(false, 42));
    }
    if cmd.qid > c.opts.max_io_qpairs_per_ctrlr {
        return Err((
            Status::specific(specific::INVALID_QUEUE_IDENTIFIER).dnr(),
            0,
        ));
    }
    if st.qpairs.iter().any(|q| q.qid == cmd.qid) {
        log::error!("nvmf: I/O queue Connect with duplicate QID {}", cmd.qid);
        return Err(invalid_param(false, 42));
    }
    st.qpairs.push(QpRef {
        qid: cmd.qid,
        thread: info.thread,
        key: info.key,
    });
    drop(st);
    Ok(Connected {
        ctrlr: c,
        qid: cmd.qid,
        sqsize: cmd.sqsize,
    })
}

impl Ctrlr {
    fn create(
        subsys: Arc<Subsystem>,
        d: &ConnectData,
        cmd: &Connect,
        info: ConnectInfo,
    ) -> Result<Arc<Ctrlr>, (Status, u32)> {
        let mut ss = subsys.state();
        // Controller ids: the next free one in the subsystem's range.
        let (lo, hi) = (ss.min_cntlid, ss.max_cntlid);
        let span = (hi - lo) as u32 + 1;
        let mut id = None;
        for i in 0..span {
            let c = lo + ((ss.next_cntlid.wrapping_sub(lo) as u32 + i) % span) as u16;
            if !ss.ctrlrs.iter().any(|x| x.cntlid == c) {
                id = Some(c);
                break;
            }
        }
        let Some(cntlid) = id else {
            log::error!("nvmf: subsystem {} has no free controller id", subsys.nqn);
            return Err((Status::specific(specific::FABRIC_CONTROLLER_BUSY), 0));
        };
        ss.next_cntlid = if cntlid == hi { lo } else { cntlid + 1 };
        // KATO rounded up to whole KAS units of 100 ms x 100, as SPDK does.
        let unit = KAS as u32 * 100;
        let mut kato = cmd.kato.div_ceil(unit) * unit;
        let mut aec = AEC_NS_ATTR;
        if ss.ana_reporting {
            aec |= AEC_ANA;
        }
        if subsys.subtype == SubType::Discovery {
            if kato == 0 {
                kato = DISC_KATO_MS;
            } else {
                aec |= AEC_DISCOVERY;
            }
        }
        let c = Arc::new(Ctrlr {
            cntlid,
            subsys: subsys.clone(),
            hostnqn: d.hostnqn.clone(),
            hostid: d.hostid,
            listen: info.listen,
            opts: info.opts,
            admin_thread: info.thread.clone(),
            admin_key: info.key,
            last_keep_alive: AtomicU64::new(ticks::now()),
            st: Mutex::new(State {
                cc: 0,
                csts: 0,
                aqa: 0,
                asq: 0,
                acq: 0,
                kato_ms: kato,
                aec,
                arbitration: 0,
                power_management: 0,
                temp_threshold: 0,
                error_recovery: 0,
                volatile_write_cache: 1,
                write_atomicity: 0,
                aer_slots: Vec::new(),
                pending_events: VecDeque::new(),
                masked: 0,
                changed_ns: Vec::new(),
                changed_overflow: false,
                qpairs: vec![QpRef {
                    qid: 0,
                    thread: info.thread,
                    key: info.key,
                }],
                destroyed: false,
            }),
        });
        ss.ctrlrs.push(c.clone());
        drop(ss);
        tgt::count_ctrlr();
        log::info!(
            "nvmf: controller {cntlid} of {} created for host {} (kato {kato} ms)",
            subsys.nqn,
            d.hostnqn
        );
        Ok(c)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        reactor::lock(&self.st)
    }

    /// Number of Queues feature value: I/O queues allowed, 0-based, for both kinds.
    fn num_queues(&self) -> u32 {
        let n = self.opts.max_io_qpairs_per_ctrlr.saturating_sub(1) as u32;
        n | n << 16
    }

    fn cap(&self) -> u64 {
        Cap {
            mqes: self.opts.max_queue_depth - 1,
            cqr: true,
            ams: 0,
            // SPDK's reset/shutdown timeout (15 s) in 500 ms units.
            to: 30,
            dstrd: 0,
            nssrs: false,
            css: 1,
            mpsmin: 0,
            mpsmax: 0,
        }
        .to_u64()
    }

    /// The keep alive timer on the admin queue's thread, if the host asked for one.
    pub fn start_keep_alive(self: &Arc<Self>) -> Option<Poller> {
        let kato = self.state().kato_ms;
        if kato == 0 {
            return None;
        }
        self.last_keep_alive.store(ticks::now(), Ordering::Relaxed);
        let weak = Arc::downgrade(self);
        Some(Poller::register(
            "nvmf_ctrlr_keep_alive_poll",
            kato as u64 * 1000,
            move || weak.upgrade().is_some_and(|c| c.keep_alive_poll()),
        ))
    }

    fn keep_alive_poll(&self) -> bool {
        let kato = self.state().kato_ms as u64;
        let last = self.last_keep_alive.load(Ordering::Relaxed);
        if ticks::now().saturating_sub(last) <= ticks::from_us(kato * 1000) {
            return false;
        }
        let qps = {
            let mut st = self.state();
            if st.csts & csts::CFS != 0 {
                return false;
            }
            st.csts |= csts::CFS;
            st.qpairs.clone()
        };
        log::warn!(
            "nvmf: Disconnecting host {} from subsystem {} due to keep alive timeout.",
            self.hostnqn,
            self.subsys.nqn
        );
        for q in qps {
            q.disconnect();
        }
        true
    }

    /// A queue pair of this controller closed; the admin queue's closing ends the controller.
    pub fn qpair_gone(&self, qid: u16, key: QpKey) {
        let rest = {
            let mut st = self.state();
            st.qpairs.retain(|q| q.key != key || q.qid != qid);
            if qid != 0 || st.destroyed {
                return;
            }
            st.destroyed = true;
            st.aer_slots.clear();
            std::mem::take(&mut st.qpairs)
        };
        self.subsys
            .state()
            .ctrlrs
            .retain(|c| !std::ptr::eq(&**c, self));
        log::info!(
            "nvmf: controller {} of {} (host {}) destroyed",
            self.cntlid,
            self.subsys.nqn,
            self.hostnqn
        );
        for q in rest {
            q.disconnect();
        }
    }

    /// Delivers an asynchronous event: to an outstanding AER on the admin queue, else queued for the next.
    fn raise(self: &Arc<Self>, dw0: u32) {
        let c = self.clone();
        self.admin_thread.send(move || {
            let slot = {
                let mut st = c.state();
                if st.destroyed {
                    return;
                }
                match st.aer_slots.pop() {
                    Some((s, _)) => s,
                    None => {
                        st.pending_events.push_back(dw0);
                        return;
                    }
                }
            };
            match pg::current().and_then(|pg| pg.qpair(c.admin_key)) {
                Some(q) => q.complete_async(slot, dw0, Status::SUCCESS),
                None => c.state().pending_events.push_back(dw0),
            }
        });
    }

    /// A namespace was added, removed or changed: remembered for the Changed Namespace List log and announced
    /// (once until the host reads that log).
    pub fn ns_changed(self: &Arc<Self>, nsid: u32) {
        let send = {
            let mut st = self.state();
            if !st.changed_ns.contains(&nsid) {
                if st.changed_ns.len() >= 1024 {
                    st.changed_overflow = true;
                } else {
                    st.changed_ns.push(nsid);
                }
            }
            let send = st.aec & AEC_NS_ATTR != 0 && st.masked & AEC_NS_ATTR == 0;
            if send {
                st.masked |= AEC_NS_ATTR;
            }
            send
        };
        if send {
            self.raise(notice(0x00, lid::CHANGED_NS_LIST));
        }
    }

    /// ANA states changed.
    pub fn ana_changed(self: &Arc<Self>) {
        let send = {
            let mut st = self.state();
            let send = st.aec & AEC_ANA != 0 && st.masked & AEC_ANA == 0;
            if send {
                st.masked |= AEC_ANA;
            }
            send
        };
        if send {
            self.raise(notice(0x03, lid::ANA));
        }
    }

    /// The discovery log changed (discovery controllers with a persistent connection).
    pub fn notify_discovery_change(self: &Arc<Self>) {
        let send = {
            let mut st = self.state();
            let send = st.aec & AEC_DISCOVERY != 0 && st.masked & AEC_DISCOVERY == 0;
            if send {
                st.masked |= AEC_DISCOVERY;
            }
            send
        };
        if send {
            self.raise(notice(0xf0, lid::DISCOVERY));
        }
    }

    /// Disconnects every queue pair (the controller goes with its admin queue).
    pub fn disconnect_all(&self) {
        let qps = self.state().qpairs.clone();
        for q in qps {
            q.disconnect();
        }
    }

    /// `nvmf_subsystem_get_controllers` entry (SPDK counts the admin queue in `num_io_qpairs`).
    pub fn info(&self) -> crate::params::ControllerInfo {
        let st = self.state();
        crate::params::ControllerInfo {
            cntlid: self.cntlid,
            hostnqn: self.hostnqn.clone(),
            hostid: uuid::Uuid::from_bytes(self.hostid),
            num_io_qpairs: st.qpairs.len() as u32,
        }
    }

    /// Property Get: the value and status.
    pub fn property_get(&self, sqe: &Sqe) -> (u64, Status) {
        let Some(p) = Property::from_sqe(sqe) else {
            return (0, Status::generic(generic::INVALID_FIELD));
        };
        let st = self.state();
        let v = match (p.offset, p.size8) {
            (reg::CAP, true) => self.cap(),
            (reg::VS, false) => VERSION as u64,
            (reg::CC, false) => st.cc as u64,
            (reg::CSTS, false) => st.csts as u64,
            (reg::AQA, false) => st.aqa as u64,
            (reg::ASQ, true) => st.asq,
            (0x28, false) => st.asq & 0xffff_ffff,
            (0x2c, false) => st.asq >> 32,
            (reg::ACQ, true) => st.acq,
            (0x30, false) => st.acq & 0xffff_ffff,
            (0x34, false) => st.acq >> 32,
            _ => {
                log::debug!("nvmf: Property Get of unknown offset {:#x}", p.offset);
                return (0, Status::generic(generic::INVALID_FIELD));
            }
        };
        (v, Status::SUCCESS)
    }

    /// Property Set.
    pub fn property_set(&self, sqe: &Sqe) -> Status {
        let Some(p) = Property::from_sqe(sqe) else {
            return Status::generic(generic::INVALID_FIELD);
        };
        match (p.offset, p.size8) {
            (reg::CC, false) => self.set_cc(p.value as u32),
            (reg::AQA, false) => {
                self.state().aqa = p.value as u32;
                Status::SUCCESS
            }
            (reg::ASQ, true) => {
                self.state().asq = p.value;
                Status::SUCCESS
            }
            (reg::ACQ, true) => {
                self.state().acq = p.value;
                Status::SUCCESS
            }
            _ => Status::generic(generic::INVALID_FIELD),
        }
    }

    /// CC writes, as SPDK's `nvmf_prop_set_cc`: enable sets ready; disable and shutdown disconnect the I/O
    /// queues and report shutdown complete.
    fn set_cc(&self, v: u32) -> Status {
        let mut st = self.state();
        let diff = v ^ st.cc;
        let mut io_disconnect = false;
        if diff & cc::EN != 0 {
            if v & cc::EN != 0 {
                st.cc |= cc::EN;
                st.csts |= csts::RDY;
            } else {
                st.cc &= !cc::EN;
                st.csts &= !csts::RDY;
                io_disconnect = true;
            }
        }
        let shn_mask = cc::SHN_MASK << cc::SHN_SHIFT;
        if diff & shn_mask != 0 {
            let shn = (v >> cc::SHN_SHIFT) & cc::SHN_MASK;
            match shn {
                1 | 2 => {
                    st.cc = (st.cc & !shn_mask) | shn << cc::SHN_SHIFT;
                    st.csts = (st.csts & !(0x3 << csts::SHST_SHIFT))
                        | csts::SHST_COMPLETE << csts::SHST_SHIFT;
                    st.csts &= !csts::RDY;
                    st.cc &= !cc::EN;
                    io_disconnect = true;
                }
                0 => {
                    st.cc &= !shn_mask;
                    st.csts &= !(0x3 << csts::SHST_SHIFT);
                }
                _ => return Status::generic(generic::INVALID_FIELD),
            }
        }
        for (shift, bits) in [(cc::IOSQES_SHIFT, 0xf), (cc::IOCQES_SHIFT, 0xf)] {
            let m = bits << shift;
            if diff & m != 0 {
                st.cc = (st.cc & !m) | (v & m);
            }
        }
        if diff & (0x7 << cc::AMS_SHIFT) != 0 || diff & (0xf << cc::MPS_SHIFT) != 0 {
            log::error!("nvmf: Property Set CC: AMS/MPS {v:#x} not supported");
            return Status::generic(generic::INVALID_FIELD);
        }
        let css = 0x7 << cc::CSS_SHIFT;
        if diff & css != 0 {
            if (v >> cc::CSS_SHIFT) & 0x7 > 6 {
                return Status::generic(generic::INVALID_FIELD);
            }
            st.cc = (st.cc & !css) | (v & css);
        }
        if io_disconnect {
            let qps: Vec<_> = st.qpairs.iter().filter(|q| q.qid != 0).cloned().collect();
            drop(st);
            for q in qps {
                q.disconnect();
            }
        }
        Status::SUCCESS
    }

    /// Runs an admin command on the admin queue's thread. `data` is the command's buffer: the host's data, or
    /// the zeroed place for the answer.
    pub fn admin(self: &Arc<Self>, sqe: &Sqe, data: &mut [u8], slot: u16, source: &Trid) -> Admin {
        if sqe.fuse() != 0 {
            return invalid_field();
        }
        if self.state().cc & cc::EN == 0 {
            log::error!("nvmf: admin command sent to a disabled controller");
            return done(Status::generic(generic::COMMAND_SEQUENCE_ERROR));
        }
        let discovery = self.subsys.subtype == SubType::Discovery;
        let opc = sqe.opc();
        if discovery
            && !matches!(
                opc,
                admin::IDENTIFY
                    | admin::GET_LOG_PAGE
                    | admin::KEEP_ALIVE
                    | admin::SET_FEATURES
                    | admin::GET_FEATURES
                    | admin::ASYNC_EVENT_REQUEST
            )
        {
            return done(Status::generic(generic::INVALID_OPCODE));
        }
        match opc {
            admin::GET_LOG_PAGE => self.get_log_page(sqe, data, source),
            admin::IDENTIFY => self.identify(sqe, data),
            admin::ABORT => self.abort(sqe, slot),
            admin::GET_FEATURES => self.get_features(sqe, data),
            admin::SET_FEATURES => self.set_features(sqe),
            admin::ASYNC_EVENT_REQUEST => {
                let mut st = self.state();
                if st.aer_slots.len() >= MAX_AERS {
                    return done(Status::specific(
                        specific::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED,
                    ));
                }
                if let Some(ev) = st.pending_events.pop_front() {
                    return ok(ev);
                }
                st.aer_slots.push((slot, sqe.cid()));
                Admin::Parked
            }
            admin::KEEP_ALIVE => {
                self.last_keep_alive.store(ticks::now(), Ordering::Relaxed);
                ok(0)
            }
            _ => done(Status::generic(generic::INVALID_OPCODE)),
        }
    }

    /// Abort (SPDK's `nvmf_ctrlr_abort`): an AER on the admin queue, or a command of one of this controller's
    /// queues that has not reached the bdev, completes with "aborted by request"; one at the bdev is aborted
    /// through the bdev layer when the bdev supports aborts (SPDK's `spdk_nvmf_bdev_ctrlr_abort_cmd`). Dword 0
    /// bit 0 of the Abort's answer says whether it was not aborted.
    fn abort(self: &Arc<Self>, sqe: &Sqe, slot: u16) -> Admin {
        let (sqid, cid) = (sqe.cdw(10) as u16, (sqe.cdw(10) >> 16) as u16);
        let found = {
            let mut st = self.state();
            if sqid == 0 {
                if let Some(i) = st.aer_slots.iter().position(|&(_, c)| c == cid) {
                    let (aer, _) = st.aer_slots.remove(i);
                    drop(st);
                    // Not from inside this queue pair's own command: by message, on its thread.
                    let key = self.admin_key;
                    self.admin_thread.send(move || {
                        if let Some(q) = pg::current().and_then(|pg| pg.qpair(key)) {
                            q.complete_async(aer, 0, Status::generic(generic::ABORTED_BY_REQUEST));
                        }
                    });
                    return ok(0);
                }
            }
            st.qpairs.iter().find(|q| q.qid == sqid).cloned()
        };
        let Some(q) = found else {
            return ok(1);
        };
        // The queue pair may be on another poll group: ask it there, answer the Abort here when it replied.
        let (admin_thread, admin_key) = (self.admin_thread.clone(), self.admin_key);
        q.thread.send(move || {
            let answer = move |aborted: bool| {
                admin_thread.send(move || {
                    if let Some(a) = pg::current().and_then(|pg| pg.qpair(admin_key)) {
                        a.complete_async(slot, !aborted as u32, Status::SUCCESS);
                    }
                });
            };
            match pg::current().and_then(|pg| pg.qpair(q.key)) {
                Some(qp) => qp.abort(cid, Box::new(answer)),
                None => answer(false),
            }
        });
        Admin::Parked
    }

    fn get_log_page(&self, sqe: &Sqe, data: &mut [u8], source: &Trid) -> Admin {
        let cdw10 = sqe.cdw(10);
        let lid_ = cdw10 as u8;
        let rae = cdw10 & (1 << 15) != 0;
        let numd = ((sqe.cdw(11) & 0xffff) as u64) << 16 | (cdw10 >> 16) as u64;
        let len = (numd + 1) * 4;
        let offset = sqe.cdw(12) as u64 | (sqe.cdw(13) as u64) << 32;
        if offset & 3 != 0 || len > data.len() as u64 {
            return invalid_field();
        }
        let out = &mut data[..len as usize];
        if self.subsys.subtype == SubType::Discovery {
            if lid_ != lid::DISCOVERY {
                return invalid_field();
            }
            tgt::tgt().discovery_log(&self.hostnqn, source, self.opts.max_aq_depth, offset, out);
            if !rae {
                self.state().masked &= !AEC_DISCOVERY;
            }
            return ok(0);
        }
        if offset > len {
            return invalid_field();
        }
        match lid_ {
            // No errors are logged and no health data is kept: zeroes, as SPDK answers.
            lid::ERROR | lid::HEALTH => {}
            lid::FIRMWARE_SLOT => {
                let mut l = FirmwareSlotLog {
                    afi: 1,
                    ..Default::default()
                };
                let _ = set_space_padded(&mut l.frs[0], FW_VERSION);
                let mut page = [0u8; FirmwareSlotLog::SIZE];
                l.encode(&mut page);
                copy_window(&page, offset, out);
            }
            lid::CMDS_EFFECTS => {
                let mut l = CmdsEffectsLog::default();
                for o in [
                    admin::GET_LOG_PAGE,
                    admin::IDENTIFY,
                    admin::ABORT,
                    admin::SET_FEATURES,
                    admin::GET_FEATURES,
                    admin::ASYNC_EVENT_REQUEST,
                    admin::KEEP_ALIVE,
                ] {
                    l.admin[o as usize] = lp::effects::CSUPP;
                }
                for o in crate::io::SUPPORTED {
                    let mut e = lp::effects::CSUPP;
                    if crate::io::is_h2c(o) || o == nvme_proto::cmd::io::WRITE_ZEROES {
                        e |= lp::effects::LBCC;
                    }
                    l.io[o as usize] = e;
                }
                let mut page = vec![0u8; CmdsEffectsLog::SIZE];
                l.encode(&mut page);
                copy_window(&page, offset, out);
            }
            lid::CHANGED_NS_LIST => {
                let mut st = self.state();
                let mut page = vec![0u8; 4096];
                if st.changed_overflow {
                    page[..4].copy_from_slice(&u32::MAX.to_le_bytes());
                } else {
                    lp::encode_changed_ns_list(st.changed_ns.iter().copied(), &mut page);
                }
                copy_window(&page, offset, out);
                if !rae {
                    st.changed_ns.clear();
                    st.changed_overflow = false;
                    st.masked &= !AEC_NS_ATTR;
                }
            }
            lid::ANA => {
                let ss = self.subsys.state();
                if !ss.ana_reporting {
                    return invalid_field();
                }
                let rgo = cdw10 & (1 << 8) != 0;
                let max = ss.max_nsid.max(1);
                let mut nsids: Vec<Vec<u32>> = vec![Vec::new(); max as usize];
                for ns in ss.active_ns() {
                    if let Some(v) = nsids.get_mut(ns.anagrpid.saturating_sub(1) as usize) {
                        v.push(ns.nsid);
                    }
                }
                let groups: Vec<lp::AnaGroupDesc<'_>> = nsids
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(i, v)| lp::AnaGroupDesc {
                        anagrpid: i as u32 + 1,
                        change_count: 0,
                        state: ss.ana_state(&self.listen, i as u32 + 1).code(),
                        nsids: v,
                    })
                    .collect();
                if lp::encode_ana_log(0, &groups, rgo, offset, out).is_err() {
                    return invalid_field();
                }
                drop(ss);
                if !rae {
                    self.state().masked &= !AEC_ANA;
                }
            }
            _ => {
                log::info!("nvmf: unsupported Get Log Page {lid_:#04x}");
                return invalid_field();
            }
        }
        ok(0)
    }

    fn identify(&self, sqe: &Sqe, data: &mut [u8]) -> Admin {
        if data.len() < 4096 {
            return invalid_field();
        }
        let c = sqe.cdw(10) as u8;
        if self.subsys.subtype == SubType::Discovery && c != cns::CTRLR {
            return invalid_field();
        }
        let out = &mut data[..4096];
        match c {
            cns::CTRLR => {
                self.identify_ctrlr().encode(out);
                ok(0)
            }
            cns::NS => self.identify_ns(sqe.nsid(), out),
            cns::ACTIVE_NS_LIST => {
                let nsid = sqe.nsid();
                if nsid >= 0xffff_fffe {
                    return done(Status::generic(generic::INVALID_NAMESPACE_OR_FORMAT));
                }
                let ss = self.subsys.state();
                let visible = ss.active_ns().filter(|n| n.visible_to(&self.hostnqn));
                encode_ns_list(visible.map(|n| n.nsid), nsid, out);
                ok(0)
            }
            cns::NS_ID_DESC_LIST => {
                let ss = self.subsys.state();
                let Some(ns) = ss.ns(sqe.nsid()).filter(|n| n.visible_to(&self.hostnqn)) else {
                    return done(Status::generic(generic::INVALID_NAMESPACE_OR_FORMAT));
                };
                let mut d = Vec::with_capacity(3);
                if ns.eui64 != [0; 8] {
                    d.push(NsIdDesc::Eui64(ns.eui64));
                }
                if ns.nguid != [0; 16] {
                    d.push(NsIdDesc::Nguid(ns.nguid));
                }
                if !ns.uuid.is_nil() {
                    d.push(NsIdDesc::Uuid(*ns.uuid.as_bytes()));
                }
                let _ = encode_ns_id_descs(&d, out);
                ok(0)
            }
            cns::NS_IOCS => {
                let ss = self.subsys.state();
                let nsid = sqe.nsid();
                let seen = ss.ns(nsid).is_some_and(|n| n.visible_to(&self.hostnqn));
                if nsid == 0 || nsid > ss.max_nsid || !seen {
                    return done(Status::generic(generic::INVALID_NAMESPACE_OR_FORMAT));
                }
                ok(0)
            }
            cns::CTRLR_IOCS => {
                if (sqe.cdw(11) >> 24) as u8 != csi::NVM {
                    return invalid_field();
                }
                ok(0)
            }
            cns::IOCS => {
                // Only the NVM command set.
                out[0] = 1;
                ok(0)
            }
            _ => invalid_field(),
        }
    }

    /// Identify Controller, as SPDK's `spdk_nvmf_ctrlr_identify_ctrlr` fills it.
    pub fn identify_ctrlr(&self) -> CtrlrData {
        // The target's lock before the subsystem's, never inside it (lock order: target, subsystem).
        let crdt = tgt::tgt().crdt;
        let ss = self.subsys.state();
        let mut d = CtrlrData::default();
        let _ = set_space_padded(&mut d.fr, FW_VERSION);
        d.mdts = (self.opts.max_io_size / 4096).max(1).ilog2() as u8;
        d.cntlid = self.cntlid;
        d.ver = VERSION;
        d.aerl = (MAX_AERS - 1) as u8;
        // Extended data for Get Log Page.
        d.lpa = 1 << 2;
        d.elpe = 127;
        d.maxcmd = self.opts.max_queue_depth;
        // SGLs supported, keyed SGL data blocks, SGL offsets.
        d.sgls = 0x1 | 1 << 2 | 1 << 20;
        d.acwu = 0;
        if ss.ana_reporting {
            d.mnan = ss.max_nsid;
        }
        let _ = set_nul_padded(&mut d.subnqn, &self.subsys.nqn);
        if self.subsys.subtype == SubType::Discovery {
            d.oaes = 1 << 31;
            return d;
        }
        d.vid = 0x8086;
        d.ssvid = 0x8086;
        d.ieee = [0xe4, 0xd2, 0x5c];
        let _ = set_space_padded(&mut d.mn, &ss.model_number);
        let _ = set_space_padded(&mut d.sn, &ss.serial_number);
        d.kas = KAS;
        d.rab = 6;
        // Multiple ports, multiple controllers.
        d.cmic = 0x3;
        d.oaes = 1 << 8;
        // 128-bit host identifier.
        d.ctratt = 1;
        d.acl = ACL;
        // Slot 1 read-only, one slot.
        d.frmw = 0x1 | 1 << 1;
        // Commands supported and effects log.
        d.lpa |= 1 << 1;
        d.sqes = 0x66;
        d.cqes = 0x44;
        d.nn = ss.max_nsid;
        // Volatile write cache present; flush of all namespaces not supported.
        d.vwc = 0x1 | 0b10 << 1;
        d.ioccsz = (64 + self.opts.in_capsule_data_size) / 16;
        d.iorcsz = 1;
        d.icdoff = 0;
        d.fcatt = 0;
        d.msdbd = self.opts.msdbd;
        let all = |t: bdev::IoType| ss.active_ns().all(|n| n.desc.bdev().io_type_supported(t));
        let mut oncs = 0u16;
        if all(bdev::IoType::Compare) {
            oncs |= 1;
            // Fused compare-and-write, emulated under an LBA range lock as SPDK does.
            d.fuses = 1;
        }
        if all(bdev::IoType::Unmap) {
            oncs |= 1 << 2;
        }
        if all(bdev::IoType::WriteZeroes) {
            oncs |= 1 << 3;
        }
        // Copy (one source range, format 0), native or emulated by the bdev layer: always, as SPDK.
        oncs |= nvme_proto::identify::oncs::COPY;
        d.ocfs = nvme_proto::identify::ocfs::FORMAT0;
        d.oncs = oncs;
        if ss.ana_reporting {
            d.cmic |= 1 << 3;
            d.oaes |= 1 << 11;
            d.anatt = 10;
            d.anacap = 0x1 | 0x2 | 0x4 | 0x40;
            d.anagrpmax = ss.max_nsid;
            d.nanagrpid = ss.max_nsid;
        }
        d.crdt1 = crdt[0];
        d.crdt2 = crdt[1];
        d.crdt3 = crdt[2];
        d
    }

    fn identify_ns(&self, nsid: u32, out: &mut [u8]) -> Admin {
        let ss = self.subsys.state();
        if nsid == 0 || nsid > ss.max_nsid {
            return done(Status::generic(generic::INVALID_NAMESPACE_OR_FORMAT));
        }
        // An inactive namespace (or one this host may not see) reads as zeroes.
        let Some(ns) = ss.ns(nsid).filter(|n| n.visible_to(&self.hostnqn)) else {
            return ok(0);
        };
        let b = ns.desc.bdev();
        let p = b.params();
        let nb = b.num_blocks();
        let lbads = b.block_size().max(1).ilog2() as u8;
        let mut d = NsData {
            nsze: nb,
            ncap: nb,
            nuse: nb,
            nacwu: p.acwu.saturating_sub(1),
            // Optimal performance fields, namespace atomic write unit fields.
            nsfeat: 1 << 4 | 1 << 1,
            // May be shared by controllers.
            nmic: 1,
            nguid: ns.nguid,
            eui64: ns.eui64,
            ..Default::default()
        };
        d.lbaf[0] = LbaFormat {
            ms: p.md_size as u16,
            lbads,
            rp: 0,
        };
        if p.md_size != 0 {
            d.flbas |= 1 << 4;
            d.mc = 1;
            d.dps = if p.dif_is_head_of_md { 1 << 3 } else { 0 };
        }
        let phys = p.physical_block_size.max(b.block_size());
        let npwg = ((phys >> lbads).max(1) - 1) as u16;
        d.npwg = npwg;
        d.nawupf = npwg;
        d.npwa = npwg;
        d.npdg = npwg;
        d.npda = npwg;
        // The Linux host needs NOIOB no larger than MDTS.
        let max_blocks = (self.opts.max_io_size >> lbads).min(u16::MAX as u32 + 1);
        d.noiob = p.optimal_io_boundary.min(max_blocks) as u16;
        d.nows = (max_blocks - 1) as u16;
        // One source range per Copy (MSRC 0-based); the length limits are SPDK's: unlimited (FFFFh) for a bdev
        // that copies itself, else what its emulation moves through one large buffer (132 KiB).
        d.msrc = 0;
        let max_copy = if b.io_type_supported(bdev::IoType::Copy) {
            0
        } else {
            (COPY_EMULATION_BYTES / b.block_size().max(1)).max(1)
        };
        let mcl = if max_copy == 0 || max_copy > u16::MAX as u32 {
            u16::MAX as u32
        } else {
            max_copy
        };
        d.mcl = mcl;
        d.mssrl = mcl as u16;
        if ss.ana_reporting {
            d.anagrpid = ns.anagrpid;
            let st = ss.ana_state(&self.listen, ns.anagrpid);
            if matches!(
                st,
                tgt::AnaState::Inaccessible | tgt::AnaState::PersistentLoss
            ) {
                d.nuse = 0;
            }
        }
        d.encode(out);
        ok(0)
    }

    fn get_features(&self, sqe: &Sqe, data: &mut [u8]) -> Admin {
        let fid = sqe.cdw(10) as u8;
        let st = self.state();
        if self.subsys.subtype == SubType::Discovery {
            return match fid {
                feat::KEEP_ALIVE_TIMER => ok(st.kato_ms),
                feat::ASYNC_EVENT_CONFIGURATION => ok(st.aec),
                _ => invalid_field(),
            };
        }
        match fid {
            feat::ARBITRATION => ok(st.arbitration),
            feat::POWER_MANAGEMENT => ok(st.power_management),
            feat::TEMPERATURE_THRESHOLD => ok(st.temp_threshold),
            feat::ERROR_RECOVERY => ok(st.error_recovery),
            feat::VOLATILE_WRITE_CACHE => ok(st.volatile_write_cache),
            feat::NUMBER_OF_QUEUES => ok(self.num_queues()),
            feat::INTERRUPT_COALESCING => ok(0),
            // Coalescing disabled for the vector asked about.
            feat::INTERRUPT_VECTOR_CONFIGURATION => ok((sqe.cdw(11) & 0xffff) | 1 << 16),
            feat::WRITE_ATOMICITY => ok(st.write_atomicity),
            feat::ASYNC_EVENT_CONFIGURATION => ok(st.aec),
            feat::KEEP_ALIVE_TIMER => ok(st.kato_ms),
            feat::HOST_IDENTIFIER => {
                // Only the 128-bit identifier (EXHID) is supported.
                if sqe.cdw(11) & 1 == 0 || data.len() < 16 {
                    return invalid_field();
                }
                data[..16].copy_from_slice(&self.hostid);
                ok(0)
            }
            _ => invalid_field(),
        }
    }

    fn set_features(&self, sqe: &Sqe) -> Admin {
        let cdw10 = sqe.cdw(10);
        let cdw11 = sqe.cdw(11);
        if cdw10 & (1 << 31) != 0 {
            return done(Status::specific(specific::FEATURE_ID_NOT_SAVEABLE));
        }
        let fid = cdw10 as u8;
        let discovery = self.subsys.subtype == SubType::Discovery;
        if discovery
            && !matches!(
                fid,
                feat::KEEP_ALIVE_TIMER | feat::ASYNC_EVENT_CONFIGURATION
            )
        {
            return invalid_field();
        }
        let mut st = self.state();
        match fid {
            feat::ARBITRATION => st.arbitration = cdw11,
            feat::POWER_MANAGEMENT => {
                // One power state.
                if cdw11 & 0x1f != 0 {
                    return invalid_field();
                }
                st.power_management = cdw11;
            }
            feat::TEMPERATURE_THRESHOLD => st.temp_threshold = cdw11,
            feat::ERROR_RECOVERY => st.error_recovery = cdw11,
            feat::VOLATILE_WRITE_CACHE => st.volatile_write_cache = cdw11 & 1,
            feat::NUMBER_OF_QUEUES => {
                if cdw11 & 0xffff == 0xffff || cdw11 >> 16 == 0xffff {
                    return invalid_field();
                }
                if st.qpairs.len() > 1 {
                    return done(Status::generic(generic::COMMAND_SEQUENCE_ERROR));
                }
                return ok(self.num_queues());
            }
            feat::INTERRUPT_COALESCING => {
                return done(Status::specific(specific::FEATURE_NOT_CHANGEABLE))
            }
            feat::WRITE_ATOMICITY => st.write_atomicity = cdw11 & 1,
            feat::ASYNC_EVENT_CONFIGURATION => st.aec = cdw11,
            feat::KEEP_ALIVE_TIMER => {
                if cdw11 == 0 {
                    return done(Status::generic(generic::KEEP_ALIVE_INVALID));
                }
                let unit = KAS as u32 * 100;
                st.kato_ms = if cdw11 < MIN_KATO_MS {
                    MIN_KATO_MS
                } else {
                    cdw11.div_ceil(unit) * unit
                };
            }
            feat::HOST_IDENTIFIER => {
                return done(Status::generic(generic::COMMAND_SEQUENCE_ERROR));
            }
            _ => return invalid_field(),
        }
        ok(0)
    }
}
