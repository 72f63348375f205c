//! `bdev_nvme` (SPDK's `module/bdev/nvme`), first part: NVMe-oF/TCP controllers attached by RPC, each active
//! namespace a bdev `<name>n<nsid>`, with SPDK's RPC names, parameters and answers for attach, detach and
//! listing, and `save_config` entries that attach them again at the next start.
//!
//! A controller lives on the app thread (its admin queue and keep alive are polled there); each thread that
//! opens one of its bdevs gets its own I/O queue ([`channel`]).
//!
//! A lost controller (its admin connection, or an I/O queue, fails) is reconnected as SPDK's three knobs say:
//! an attempt at once and then every `reconnect_delay_sec`, I/O kept meanwhile and failed once
//! `fast_io_fail_timeout_sec` has passed, the controller and its bdevs deleted once `ctrlr_loss_timeout_sec` has
//! passed (0: after the first failed attempt; -1: never). Channels follow through [`Shared`].
//!
//! Not here yet (SPDK has them): multipath (a second path under one name), RDMA and PCIe transports, digests,
//! namespace change handling, discovery services, and the rest of the module's RPCs.

mod channel;

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use reactor::Poller;

use bdev::{Bdev, BdevOps, BdevParams, IoType, ModuleChannel};
use errors::{Error, ErrorKind, Result};
use jsonrpc::{Registry, Responder, RpcError, STATE_RUNTIME, STATE_STARTUP};
use nvme_host::{Controller, CtrlrInfo, CtrlrOpts, NsInfo};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

/// The bdevs' module name, as SPDK reports it.
pub const MODULE: &str = "nvme";

/// The module options attaches take their defaults from (`bdev_nvme_set_options`; SPDK's defaults until set).
fn options() -> std::sync::MutexGuard<'static, subsystems::bdev_nvme::NvmeOptions> {
    static O: OnceLock<std::sync::Mutex<subsystems::bdev_nvme::NvmeOptions>> = OnceLock::new();
    reactor::lock(O.get_or_init(Default::default))
}

/// Takes the options `bdev_nvme_set_options` set (the kept option store validated them): KATO, the reconnect
/// knobs' defaults, the TCP connect timeout.
pub fn set_options(o: &subsystems::bdev_nvme::NvmeOptions) {
    *options() = o.clone();
}

/// Whether any controller is attached (SPDK refuses `bdev_nvme_set_options` then).
pub fn has_controllers() -> bool {
    CTRLRS.with(|c| {
        let c = c.borrow();
        !c.0.is_empty() || !c.1.is_empty()
    })
}
/// Entries per I/O queue.
const IO_QUEUE_SIZE: u16 = 128;
/// I/O queues asked for (SPDK's default controller option).
const NUM_IO_QUEUES: u16 = 1024;
/// Bring-up time limit when the caller gives none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `bdev_nvme_attach_controller` parameters, every one SPDK's client may send.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct AttachParams {
    /// Controller name, prefix of its bdevs' names.
    pub name: String,
    /// Transport: `TCP` (`RDMA`, `PCIe` not yet).
    pub trtype: String,
    /// Target address.
    pub traddr: String,
    /// `IPv4` or `IPv6`.
    #[serde(default)]
    pub adrfam: Option<String>,
    /// Target port.
    #[serde(default)]
    pub trsvcid: Option<String>,
    /// Transport priority.
    #[serde(default)]
    pub priority: Option<String>,
    /// Subsystem NQN.
    #[serde(default)]
    pub subnqn: Option<String>,
    /// Host NQN.
    #[serde(default)]
    pub hostnqn: Option<String>,
    /// Local address to connect from.
    #[serde(default)]
    pub hostaddr: Option<String>,
    /// Local port to connect from.
    #[serde(default)]
    pub hostsvcid: Option<String>,
    /// Check the reference tag (protection information).
    #[serde(default)]
    pub prchk_reftag: Option<bool>,
    /// Check the guard (protection information).
    #[serde(default)]
    pub prchk_guard: Option<bool>,
    /// TCP header digest.
    #[serde(default)]
    pub hdgst: Option<bool>,
    /// TCP data digest.
    #[serde(default)]
    pub ddgst: Option<bool>,
    /// Fabrics Connect timeout, µs.
    #[serde(default)]
    pub fabrics_connect_timeout_us: Option<u64>,
    /// `disable`, `failover` or `multipath`.
    #[serde(default)]
    pub multipath: Option<String>,
    /// I/O queues to ask for.
    #[serde(default)]
    pub num_io_queues: Option<u32>,
    /// Seconds before a lost controller is deleted (-1: never).
    #[serde(default)]
    pub ctrlr_loss_timeout_sec: Option<i32>,
    /// Seconds between reconnect attempts.
    #[serde(default)]
    pub reconnect_delay_sec: Option<u32>,
    /// Seconds before I/O fails while the controller is unreachable.
    #[serde(default)]
    pub fast_io_fail_timeout_sec: Option<u32>,
    /// TLS pre-shared key.
    #[serde(default)]
    pub psk: Option<String>,
    /// Most bdevs to create.
    #[serde(default)]
    pub max_bdevs: Option<u32>,
    /// DH-HMAC-CHAP key name.
    #[serde(default)]
    pub dhchap_key: Option<String>,
    /// DH-HMAC-CHAP controller key name.
    #[serde(default)]
    pub dhchap_ctrlr_key: Option<String>,
    /// Attach namespaces with unrecognized command set identifiers.
    #[serde(default)]
    pub allow_unrecognized_csi: Option<bool>,
    /// Multipath policy (newer clients).
    #[serde(default)]
    pub policy: Option<String>,
    /// Multipath selector (newer clients).
    #[serde(default)]
    pub selector: Option<String>,
    /// Round-robin minimum I/O (newer clients).
    #[serde(default)]
    pub min_io: Option<u32>,
    /// Disable SQ flow control (newer clients).
    #[serde(default)]
    pub disable_sq_flow_control: Option<bool>,
}

/// [`Shared::state`]: connected.
pub(crate) const ST_ENABLED: u8 = 0;
/// [`Shared::state`]: lost, being reconnected; I/O waits.
pub(crate) const ST_RESETTING: u8 = 1;
/// [`Shared::state`]: lost for longer than `fast_io_fail_timeout_sec`; I/O fails while reconnecting goes on.
pub(crate) const ST_FAIL_FAST: u8 = 2;
/// [`Shared::state`]: deleted; I/O fails.
pub(crate) const ST_DELETED: u8 = 3;

/// What a controller's channels on every thread read: the current connection and its state.
pub(crate) struct Shared {
    /// The current connection's description (replaced by a reconnect).
    pub(crate) info: ArcSwap<CtrlrInfo>,
    /// Bumped when a new connection is in place: channels make new queues.
    pub(crate) gen: AtomicU64,
    /// `ST_*`.
    pub(crate) state: AtomicU8,
    /// A channel saw its queue die.
    pub(crate) reset_wanted: AtomicBool,
}

/// An attached controller (app thread).
struct Attached {
    name: String,
    params: AttachParams,
    ctrlr: Controller,
    shared: Arc<Shared>,
    bdevs: Vec<String>,
    /// Watches the connection and runs reconnects.
    _supervisor: Poller,
    /// When it was lost (while not enabled).
    lost_at: Option<Instant>,
    /// When the next reconnect may start.
    next_attempt: Instant,
    /// A reconnect is in progress.
    attempting: bool,
    /// `bdev_nvme_reset_controller` calls waiting for the reset's outcome.
    reset_waiters: Vec<DetachDone>,
}

thread_local! {
    /// Attached controllers, and names being attached (refused meanwhile), on the app thread.
    static CTRLRS: RefCell<(Vec<Attached>, Vec<String>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// This process's host identifier, and the host NQN made from it (SPDK's default).
fn host_id() -> &'static (Uuid, String) {
    static ID: OnceLock<(Uuid, String)> = OnceLock::new();
    ID.get_or_init(|| {
        let u = Uuid::new_v4();
        (u, format!("nqn.2014-08.org.nvmexpress:uuid:{u}"))
    })
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Invalid, msg.into())
}

/// The controller options an attach asks for, after SPDK's checks.
fn ctrlr_opts(p: &AttachParams) -> Result<CtrlrOpts> {
    if !p.trtype.eq_ignore_ascii_case("tcp") {
        return Err(Error::new(
            ErrorKind::NotSupported,
            format!("trtype {} is not supported yet (TCP is)", p.trtype),
        ));
    }
    if p.hdgst == Some(true) || p.ddgst == Some(true) {
        return Err(Error::new(
            ErrorKind::NotSupported,
            "TCP digests are not supported yet",
        ));
    }
    if p.psk.is_some() || p.dhchap_key.is_some() {
        return Err(Error::new(
            ErrorKind::NotSupported,
            "TLS and DH-HMAC-CHAP are not supported yet",
        ));
    }
    let ip: IpAddr = p
        .traddr
        .parse()
        .map_err(|_| invalid(format!("Invalid traddr {}", p.traddr)))?;
    match p.adrfam.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => {}
        Some("ipv4") if ip.is_ipv4() => {}
        Some("ipv6") if ip.is_ipv6() => {}
        Some(a) => return Err(invalid(format!("adrfam {a} does not match traddr {ip}"))),
    }
    let port: u16 = match p.trsvcid.as_deref() {
        None => 4420,
        Some(s) => s
            .parse()
            .map_err(|_| invalid(format!("Invalid trsvcid {s}")))?,
    };
    check_knobs(p)?;
    let subnqn = p
        .subnqn
        .clone()
        .ok_or_else(|| invalid("subnqn is required for a fabrics controller"))?;
    if subnqn.len() > 223 {
        return Err(invalid("subnqn is longer than 223 bytes"));
    }
    let (hostid, default_nqn) = host_id();
    // Read once: a second lock within one expression would wait for the first.
    let (kato_ms, tcp_connect_ms) = {
        let o = options();
        (o.keep_alive_timeout_ms, o.tcp_connect_timeout_ms)
    };
    Ok(CtrlrOpts {
        addr: SocketAddr::new(ip, port),
        subnqn,
        hostnqn: p.hostnqn.clone().unwrap_or_else(|| default_nqn.clone()),
        hostid: *hostid.as_bytes(),
        kato_ms,
        num_io_queues: p
            .num_io_queues
            .map_or(NUM_IO_QUEUES, |n| n.clamp(1, u16::MAX as u32) as u16),
        io_queue_size: IO_QUEUE_SIZE,
        connect_timeout: p
            .fabrics_connect_timeout_us
            .filter(|&us| us > 0)
            .map(Duration::from_micros)
            .or_else(|| {
                tcp_connect_ms
                    .filter(|&ms| ms > 0)
                    .map(|ms| Duration::from_millis(ms as u64))
            })
            .unwrap_or(CONNECT_TIMEOUT),
    })
}

/// Fills what the attach leaves out from the module options, as SPDK's attach starts from its global options.
fn with_defaults(mut p: AttachParams) -> AttachParams {
    let o = options();
    p.ctrlr_loss_timeout_sec
        .get_or_insert(o.ctrlr_loss_timeout_sec);
    p.reconnect_delay_sec.get_or_insert(o.reconnect_delay_sec);
    p.fast_io_fail_timeout_sec
        .get_or_insert(o.fast_io_fail_timeout_sec);
    p
}

/// SPDK's rules for the three reconnect knobs (`bdev_nvme_check_io_error_resiliency_params`).
fn check_knobs(p: &AttachParams) -> Result<()> {
    let loss = p.ctrlr_loss_timeout_sec.unwrap_or(0);
    let delay = p.reconnect_delay_sec.unwrap_or(0);
    let fast = p.fast_io_fail_timeout_sec.unwrap_or(0);
    let ok = match loss {
        l if l < -1 => false,
        -1 => delay > 0 && (fast == 0 || fast >= delay),
        0 => delay == 0 && fast == 0,
        l => {
            let l = l as u32;
            delay > 0 && delay <= l && (fast == 0 || (fast >= delay && fast <= l))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "ctrlr_loss_timeout_sec {loss}, reconnect_delay_sec {delay}, fast_io_fail_timeout_sec {fast} do not fit together"
        )))
    }
}

/// Attaches the controller `p` names; `done` gets its bdevs' names (app thread).
pub fn attach(p: AttachParams, done: impl FnOnce(Result<Vec<String>>) + 'static) {
    let p = with_defaults(p);
    let opts = match ctrlr_opts(&p) {
        Ok(o) => o,
        Err(e) => return done(Err(e)),
    };
    let busy = CTRLRS.with(|c| {
        let mut c = c.borrow_mut();
        if c.0.iter().any(|a| a.name == p.name) {
            // A second path under the same name is multipath, not here yet; `disable` refuses as SPDK does.
            return Some(match p.multipath.as_deref() {
                None | Some("disable") => Error::new(
                    ErrorKind::Already,
                    format!(
                        "A controller named {} already exists and multipath is disabled",
                        p.name
                    ),
                ),
                Some(_) => Error::new(
                    ErrorKind::NotSupported,
                    "a second path to a controller is not supported yet",
                ),
            });
        }
        if c.1.contains(&p.name) {
            return Some(Error::new(
                ErrorKind::Busy,
                format!("controller {} is being attached", p.name),
            ));
        }
        c.1.push(p.name.clone());
        None
    });
    if let Some(e) = busy {
        return done(Err(e));
    }
    nvme_host::connect(opts, move |res| {
        CTRLRS.with(|c| c.borrow_mut().1.retain(|n| *n != p.name));
        let ctrlr = match res {
            Ok(c) => c,
            Err(e) => return done(Err(e)),
        };
        let shared = Arc::new(Shared {
            info: ArcSwap::new(ctrlr.info.clone()),
            gen: AtomicU64::new(0),
            state: AtomicU8::new(ST_ENABLED),
            reset_wanted: AtomicBool::new(false),
        });
        let mut bdevs = Vec::new();
        let max = p.max_bdevs.unwrap_or(u32::MAX) as usize;
        for ns in ctrlr.info.namespaces.iter().take(max) {
            match register_ns(&p.name, &shared, ns) {
                Ok(b) => bdevs.push(b.name().to_string()),
                Err(e) => {
                    // Undo: nothing half made stays.
                    for n in &bdevs {
                        if let Some(b) = bdev::get(n) {
                            b.unregister(|_| {});
                        }
                    }
                    ctrlr.close();
                    return done(Err(e));
                }
            }
        }
        log::info!(
            "nvme: controller {} attached ({} at {}), bdevs {bdevs:?}",
            p.name,
            ctrlr.info.opts.subnqn,
            ctrlr.info.opts.addr
        );
        watch_namespaces(&p.name, &ctrlr);
        let watched = p.name.clone();
        let supervisor = Poller::register("bdev_nvme_ctrlr_supervisor", 10_000, move || {
            supervise(&watched);
            false
        });
        CTRLRS.with(|c| {
            c.borrow_mut().0.push(Attached {
                name: p.name.clone(),
                params: p,
                ctrlr,
                shared,
                bdevs: bdevs.clone(),
                _supervisor: supervisor,
                lost_at: None,
                next_attempt: Instant::now(),
                attempting: false,
                reset_waiters: Vec::new(),
            })
        });
        done(Ok(bdevs));
    });
}

/// Namespaces added or removed on controller `name` (an Asynchronous Event and a rescan) become bdevs, or stop
/// being ones, as SPDK's namespace change handling does.
fn watch_namespaces(name: &str, ctrlr: &Controller) {
    let name = name.to_string();
    ctrlr.on_ns_change(move |list| {
        let (gone, shared, prefix) = {
            let found = CTRLRS.with(|c| {
                c.borrow()
                    .0
                    .iter()
                    .find(|a| a.name == name)
                    .map(|a| (a.bdevs.clone(), a.shared.clone()))
            });
            let Some((bdevs, shared)) = found else { return };
            let prefix = format!("{name}n");
            let gone: Vec<String> = bdevs
                .into_iter()
                .filter(|b| {
                    let nsid = b.strip_prefix(&prefix).and_then(|n| n.parse::<u32>().ok());
                    !list.iter().any(|ns| Some(ns.nsid) == nsid)
                })
                .collect();
            (gone, shared, prefix)
        };
        let mut added = Vec::new();
        for ns in &list {
            let b = format!("{prefix}{}", ns.nsid);
            if bdev::get(&b).is_none() {
                match register_ns(&name, &shared, ns) {
                    Ok(_) => added.push(b),
                    Err(e) => log::error!("nvme: namespace {} of {name}: {e}", ns.nsid),
                }
            }
        }
        for b in &gone {
            log::info!("nvme: namespace of {b} removed from the controller: bdev unregistered");
            if let Some(bd) = bdev::get(b) {
                bd.unregister(|_| {});
            }
        }
        if !added.is_empty() {
            log::info!("nvme: {name}: new namespaces, bdevs {added:?}");
        }
        CTRLRS.with(|c| {
            if let Some(a) = c.borrow_mut().0.iter_mut().find(|a| a.name == name) {
                a.bdevs.retain(|b| !gone.contains(b));
                a.bdevs.extend(added);
            }
        });
    });
}

/// What the supervisor decided, done outside the controller table's borrow.
enum Step {
    Nothing,
    Reconnect(CtrlrOpts),
}

/// Watches controller `name`: a lost connection starts the reconnect cycle; fast-fail and loss timeouts are
/// applied as time passes.
fn supervise(name: &str) {
    let step = CTRLRS.with(|c| {
        let mut c = c.borrow_mut();
        let Some(a) = c.0.iter_mut().find(|a| a.name == name) else {
            return Step::Nothing;
        };
        let now = Instant::now();
        let st = a.shared.state.load(Ordering::Acquire);
        if st == ST_ENABLED {
            if a.ctrlr.alive() && !a.shared.reset_wanted.load(Ordering::Acquire) {
                return Step::Nothing;
            }
            log::warn!("nvme: controller {} lost, reconnecting", a.name);
            a.shared.state.store(ST_RESETTING, Ordering::Release);
            a.ctrlr.close();
            a.lost_at = Some(now);
            a.next_attempt = now;
        }
        let lost = a.lost_at.map_or(Duration::ZERO, |t| now - t);
        let fast = a.params.fast_io_fail_timeout_sec.unwrap_or(0);
        if fast > 0
            && lost >= Duration::from_secs(fast as u64)
            && a.shared.state.load(Ordering::Acquire) == ST_RESETTING
        {
            log::warn!("nvme: controller {}: failing I/O fast", a.name);
            a.shared.state.store(ST_FAIL_FAST, Ordering::Release);
        }
        if a.attempting || now < a.next_attempt {
            return Step::Nothing;
        }
        a.attempting = true;
        Step::Reconnect(a.shared.info.load().opts.clone())
    });
    if let Step::Reconnect(opts) = step {
        let name = name.to_string();
        nvme_host::connect(opts, move |res| reconnected(&name, res));
    }
}

/// Resets controller `name` (`bdev_nvme_reset_controller`): its connection is dropped and made again, as when it
/// is lost; `done` hears how the first attempt went.
pub fn reset(name: &str, done: impl FnOnce(Result<()>) + 'static) {
    let mut done: Option<DetachDone> = Some(Box::new(done));
    let refused = CTRLRS.with(|c| {
        let mut c = c.borrow_mut();
        let Some(a) = c.0.iter_mut().find(|a| a.name == name) else {
            return Some(Error::new(
                ErrorKind::NotFound,
                format!("Controller {name} does not exist"),
            ));
        };
        if a.shared.state.load(Ordering::Acquire) != ST_ENABLED || !a.reset_waiters.is_empty() {
            return Some(Error::new(
                ErrorKind::Busy,
                format!("controller {name} is being reset"),
            ));
        }
        a.reset_waiters.extend(done.take());
        a.shared.reset_wanted.store(true, Ordering::Release);
        None
    });
    match (refused, done) {
        (Some(e), Some(done)) => done(Err(e)),
        _ => supervise(name),
    }
}

/// A reconnect attempt of controller `name` ended.
fn reconnected(name: &str, res: Result<Controller>) {
    let mut waiters = Vec::new();
    let outcome = match &res {
        Ok(_) => Ok(()),
        Err(e) => Err(e.kind),
    };
    let delete = CTRLRS.with(|c| {
        let mut c = c.borrow_mut();
        let Some(a) = c.0.iter_mut().find(|a| a.name == name) else {
            if let Ok(ctrlr) = &res {
                ctrlr.close();
            }
            return false;
        };
        a.attempting = false;
        waiters = std::mem::take(&mut a.reset_waiters);
        match res {
            Ok(ctrlr) => {
                log::info!("nvme: controller {} reconnected", a.name);
                watch_namespaces(&a.name, &ctrlr);
                a.shared.info.store(ctrlr.info.clone());
                a.ctrlr = ctrlr;
                a.lost_at = None;
                a.shared.reset_wanted.store(false, Ordering::Release);
                a.shared.gen.fetch_add(1, Ordering::AcqRel);
                a.shared.state.store(ST_ENABLED, Ordering::Release);
                false
            }
            Err(e) => {
                let lost = a.lost_at.map_or(Duration::ZERO, |t| t.elapsed());
                let loss = a.params.ctrlr_loss_timeout_sec.unwrap_or(0);
                log::warn!("nvme: controller {}: reconnect failed: {e}", a.name);
                if loss == 0 || (loss > 0 && lost >= Duration::from_secs(loss as u64)) {
                    true
                } else {
                    let delay = a.params.reconnect_delay_sec.unwrap_or(0) as u64;
                    a.next_attempt = Instant::now() + Duration::from_secs(delay);
                    false
                }
            }
        }
    });
    for w in waiters {
        w(outcome.map_err(|k| Error::new(k, format!("reset of controller {name} failed"))));
    }
    if delete {
        log::error!("nvme: controller {name} lost for good: deleted with its bdevs");
        detach(name, |_| {});
    }
}

/// Detaches controller `name`: its bdevs are unregistered (their users see them go), then it disconnects.
pub fn detach(name: &str, done: impl FnOnce(Result<()>) + 'static) {
    let Some(a) = CTRLRS.with(|c| {
        let mut c = c.borrow_mut();
        let i = c.0.iter().position(|a| a.name == name)?;
        Some(c.0.remove(i))
    }) else {
        return done(Err(Error::new(
            ErrorKind::NotFound,
            format!("Failed to find NVMe controller {name}"),
        )));
    };
    // Channels fail what waits from now on.
    a.shared.state.store(ST_DELETED, Ordering::Release);
    let d = std::rc::Rc::new(Detaching {
        left: std::cell::Cell::new(a.bdevs.len() + 1),
        fin: RefCell::new(Some((a.ctrlr, Box::new(done)))),
    });
    for n in &a.bdevs {
        match bdev::get(n) {
            Some(b) => {
                let d = d.clone();
                let step = reactor::OnThread::new(move |_: ()| d.one());
                b.unregister(move |_| step.with(|s| s(())));
            }
            None => d.one(),
        }
    }
    d.one();
}

/// A detach waiting for its bdevs to be unregistered.
struct Detaching {
    left: std::cell::Cell<usize>,
    fin: RefCell<Option<(Controller, DetachDone)>>,
}

/// Where a detach reports.
type DetachDone = Box<dyn FnOnce(Result<()>)>;

impl Detaching {
    /// One bdev went (or the walk that unregisters them ended): the last one disconnects and answers.
    fn one(&self) {
        self.left.set(self.left.get() - 1);
        if self.left.get() == 0 {
            if let Some((ctrlr, done)) = self.fin.borrow_mut().take() {
                ctrlr.close();
                done(Ok(()));
            }
        }
    }
}

/// Registers the bdev of namespace `ns`.
fn register_ns(ctrlr: &str, shared: &Arc<Shared>, ns: &NsInfo) -> Result<Bdev> {
    let info = shared.info.load_full();
    let mut p = BdevParams::new(&format!("{ctrlr}n{}", ns.nsid), ns.block_size, ns.blocks);
    p.product_name = "NVMe disk".into();
    if ns.nguid != [0; 16] {
        let u = Uuid::from_bytes(ns.nguid);
        // The namespace's own bdev is in this process (a target exporting to itself): keep its UUID to it.
        if bdev::get(&u.to_string()).is_some() {
            log::warn!(
                "{ctrlr}n{}: UUID {u} is taken here, a new one is used",
                ns.nsid
            );
        } else {
            p.uuid = Some(u);
        }
    }
    // Read/Write carry a 16-bit block count, and the controller caps a transfer (MDTS).
    let blocks_per_cmd = (info.max_xfer / ns.block_size).clamp(1, 65536);
    p.max_rw_size = blocks_per_cmd;
    p.max_write_zeroes = 65536;
    p.max_unmap = u32::MAX as u64;
    p.write_cache = info.cdata.vwc & 1 != 0;
    bdev::register(
        p,
        Box::new(NsOps {
            shared: shared.clone(),
            nsid: ns.nsid,
        }),
    )
    .map_err(|e| Error::wrap(e, format!("register {ctrlr}n{}", ns.nsid)))
}

/// One namespace's bdev.
struct NsOps {
    shared: Arc<Shared>,
    nsid: u32,
}

impl BdevOps for NsOps {
    fn module_name(&self) -> &'static str {
        MODULE
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        use nvme_proto::identify::oncs;
        let o = self.shared.info.load().cdata.oncs;
        match t {
            IoType::Read | IoType::Write | IoType::Flush | IoType::NvmeIo => true,
            IoType::Unmap => o & oncs::DSM != 0,
            IoType::WriteZeroes => o & oncs::WRITE_ZEROES != 0,
            IoType::Compare => o & oncs::COMPARE != 0,
            _ => false,
        }
    }

    fn create_channel(&self, bdev: &Bdev) -> Box<dyn ModuleChannel> {
        Box::new(channel::NvmeChannel::new(
            self.shared.clone(),
            self.nsid,
            bdev.name(),
        ))
    }

    fn dump_info(&self, _bdev: &Bdev, out: &mut serde_json::Map<String, Value>) {
        let info = self.shared.info.load();
        let o = &info.opts;
        out.insert(
            "nvme".into(),
            json!([{
                "trid": {
                    "trtype": "TCP",
                    "adrfam": if o.addr.is_ipv4() { "IPv4" } else { "IPv6" },
                    "traddr": o.addr.ip().to_string(),
                    "trsvcid": o.addr.port().to_string(),
                    "subnqn": o.subnqn,
                },
                "ctrlr_data": {
                    "cntlid": info.cntlid,
                    "vendor_id": format!("0x{:04x}", info.cdata.vid),
                    "model_number": nvme_proto::identify::padded_str(&info.cdata.mn).unwrap_or_default().trim(),
                    "serial_number": nvme_proto::identify::padded_str(&info.cdata.sn).unwrap_or_default().trim(),
                    "firmware_revision": nvme_proto::identify::padded_str(&info.cdata.fr).unwrap_or_default().trim(),
                    "subnqn": o.subnqn,
                },
                "ns_data": { "id": self.nsid },
            }]),
        );
    }
}

/// One I/O path: a bdev's channel on one thread (`bdev_nvme_get_io_paths`).
pub(crate) struct PathEntry {
    thread: String,
    bdev: String,
    shared: Arc<Shared>,
    /// The channel's queue is connected.
    pub(crate) connected: AtomicBool,
}

/// Every channel's path, in creation order (control path only: channels come and go, the RPC reads).
fn paths() -> std::sync::MutexGuard<'static, Vec<Arc<PathEntry>>> {
    static P: OnceLock<std::sync::Mutex<Vec<Arc<PathEntry>>>> = OnceLock::new();
    reactor::lock(P.get_or_init(Default::default))
}

/// Records a new channel's path.
pub(crate) fn add_path(bdev: &str, shared: &Arc<Shared>) -> Arc<PathEntry> {
    let thread = reactor::thread::current().map_or_else(String::new, |t| t.name().to_string());
    let p = Arc::new(PathEntry {
        thread,
        bdev: bdev.to_string(),
        shared: shared.clone(),
        connected: AtomicBool::new(false),
    });
    paths().push(p.clone());
    p
}

/// Forgets a channel's path.
pub(crate) fn remove_path(p: &Arc<PathEntry>) {
    paths().retain(|x| !Arc::ptr_eq(x, p));
}

/// `bdev_nvme_get_io_paths`: per thread that has NVMe channels, its paths (those of bdev `name` only, when
/// given), as SPDK lists them.
pub fn io_paths_json(name: Option<&str>) -> Value {
    let all = paths().clone();
    let mut threads: Vec<&str> = Vec::new();
    for p in &all {
        if !threads.contains(&p.thread.as_str()) {
            threads.push(&p.thread);
        }
    }
    let groups: Vec<Value> = threads
        .iter()
        .map(|t| {
            let io_paths: Vec<Value> = all
                .iter()
                .filter(|p| p.thread == *t && name.is_none_or(|n| n == p.bdev))
                .map(|p| {
                    let info = p.shared.info.load();
                    let o = &info.opts;
                    let connected = p.connected.load(Ordering::Relaxed)
                        && p.shared.state.load(Ordering::Acquire) == ST_ENABLED;
                    json!({
                        "bdev_name": p.bdev,
                        "cntlid": info.cntlid,
                        // One path per bdev: it is current whenever it can carry I/O.
                        "current": connected,
                        "connected": connected,
                        "accessible": true,
                        "transport": {
                            "trtype": "TCP",
                            "traddr": o.addr.ip().to_string(),
                            "trsvcid": o.addr.port().to_string(),
                            "adrfam": if o.addr.is_ipv4() { "IPv4" } else { "IPv6" },
                        },
                    })
                })
                .collect();
            json!({"thread": t, "io_paths": io_paths})
        })
        .collect();
    json!({ "poll_groups": groups })
}

/// SPDK's `trid` object of a controller.
fn trid_json(o: &CtrlrOpts) -> serde_json::Map<String, Value> {
    let v = json!({
        "trtype": "TCP",
        "adrfam": if o.addr.is_ipv4() { "IPv4" } else { "IPv6" },
        "traddr": o.addr.ip().to_string(),
        "trsvcid": o.addr.port().to_string(),
        "subnqn": o.subnqn,
    });
    match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

/// `bdev_nvme_get_controllers` entries (all, or the one named).
pub fn controllers_json(name: Option<&str>) -> Result<Value> {
    let v: Vec<Value> = CTRLRS.with(|c| {
        c.borrow()
            .0
            .iter()
            .filter(|a| name.is_none_or(|n| n == a.name))
            .map(|a| {
                let info = a.shared.info.load();
                let o = &info.opts;
                // SPDK's state names (`nvme_ctrlr_get_state_str`).
                let state = match a.shared.state.load(Ordering::Acquire) {
                    ST_ENABLED if a.ctrlr.alive() => "enabled",
                    ST_ENABLED | ST_RESETTING | ST_FAIL_FAST if a.attempting => "resetting",
                    ST_ENABLED | ST_RESETTING | ST_FAIL_FAST => "reconnect_is_delayed",
                    _ => "deleting",
                };
                json!({
                    "name": a.name,
                    "ctrlrs": [{
                        "state": state,
                        "trid": trid_json(o),
                        "cntlid": info.cntlid,
                        "host": {
                            "nqn": o.hostnqn,
                            "addr": a.params.hostaddr.clone().unwrap_or_default(),
                            "svcid": a.params.hostsvcid.clone().unwrap_or_default(),
                        },
                    }],
                })
            })
            .collect()
    });
    if let Some(n) = name {
        if v.is_empty() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("Controller {n} does not exist"),
            ));
        }
    }
    Ok(Value::Array(v))
}

/// The `bdev_nvme_attach_controller` entries `save_config` writes (between `bdev_nvme_set_options` and
/// `bdev_nvme_set_hotplug`, as SPDK does).
pub fn config_entries() -> Vec<Value> {
    CTRLRS.with(|c| {
        c.borrow()
            .0
            .iter()
            .map(|a| {
                let info = a.shared.info.load();
                let o = &info.opts;
                let mut params = serde_json::Map::new();
                params.insert("name".into(), json!(a.name));
                params.extend(trid_json(o));
                let p = &a.params;
                params.insert(
                    "prchk_reftag".into(),
                    json!(p.prchk_reftag.unwrap_or(false)),
                );
                params.insert("prchk_guard".into(), json!(p.prchk_guard.unwrap_or(false)));
                params.insert(
                    "ctrlr_loss_timeout_sec".into(),
                    json!(p.ctrlr_loss_timeout_sec.unwrap_or(0)),
                );
                params.insert(
                    "reconnect_delay_sec".into(),
                    json!(p.reconnect_delay_sec.unwrap_or(0)),
                );
                params.insert(
                    "fast_io_fail_timeout_sec".into(),
                    json!(p.fast_io_fail_timeout_sec.unwrap_or(0)),
                );
                params.insert("hostnqn".into(), json!(o.hostnqn));
                params.insert("hdgst".into(), json!(false));
                params.insert("ddgst".into(), json!(false));
                if let Some(a) = &p.hostaddr {
                    params.insert("hostaddr".into(), json!(a));
                }
                if let Some(s) = &p.hostsvcid {
                    params.insert("hostsvcid".into(), json!(s));
                }
                json!({"method": "bdev_nvme_attach_controller", "params": params})
            })
            .collect()
    })
}

/// Detaches every controller (module fini: their bdevs are already gone).
pub fn detach_all() {
    let all: Vec<Attached> = CTRLRS.with(|c| std::mem::take(&mut c.borrow_mut().0));
    for a in all {
        a.shared.state.store(ST_DELETED, Ordering::Release);
        a.ctrlr.close();
    }
}

/// The attach refusals SPDK answers with its own code and text (checked before anything starts).
fn spdk_refusal(p: &AttachParams) -> Option<RpcError> {
    let einval = |m: String| Some(RpcError::new(-libc::EINVAL, m));
    if !["tcp", "rdma", "pcie", "fc", "vfiouser", "custom"]
        .contains(&p.trtype.to_ascii_lowercase().as_str())
    {
        return einval(format!("Failed to parse trtype: {}", p.trtype));
    }
    if let Some(a) = &p.adrfam {
        if !["ipv4", "ipv6", "ib", "fc", "intra_host"].contains(&a.to_ascii_lowercase().as_str()) {
            return einval(format!("Failed to parse adrfam: {a}"));
        }
    }
    if p.max_bdevs == Some(0) {
        return einval("max_bdevs cannot be zero".into());
    }
    let exists = CTRLRS.with(|c| c.borrow().0.iter().any(|a| a.name == p.name));
    if exists && matches!(p.multipath.as_deref(), None | Some("disable")) {
        return Some(RpcError::new(
            -libc::EALREADY,
            format!(
                "A controller named {} already exists and multipath is disabled\n",
                p.name
            ),
        ));
    }
    None
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetachParams {
    name: String,
    #[serde(default)]
    trtype: Option<String>,
    #[serde(default)]
    traddr: Option<String>,
    #[serde(default)]
    adrfam: Option<String>,
    #[serde(default)]
    trsvcid: Option<String>,
    #[serde(default)]
    subnqn: Option<String>,
    #[serde(default)]
    hostaddr: Option<String>,
    #[serde(default)]
    hostsvcid: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetParams {
    name: String,
    #[serde(default)]
    cntlid: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetParams {
    #[serde(default)]
    name: Option<String>,
}

/// Registers `bdev_nvme_attach_controller`, `bdev_nvme_detach_controller`, `bdev_nvme_reset_controller`,
/// `bdev_nvme_get_controllers` and `bdev_nvme_get_io_paths`.
pub fn register_rpcs(reg: &mut Registry) {
    bdev::rpc::method(
        reg,
        "bdev_nvme_attach_controller",
        STATE_STARTUP | STATE_RUNTIME,
        |p: AttachParams, r: Responder| {
            if let Some(e) = spdk_refusal(&p) {
                return r.err(e);
            }
            attach(p, move |res| match res {
                Ok(names) => r.ok(json!(names)),
                Err(e) => r.err(RpcError::from(e)),
            })
        },
    );
    bdev::rpc::method(
        reg,
        "bdev_nvme_detach_controller",
        STATE_RUNTIME,
        |p: DetachParams, r: Responder| {
            // A path filter that names another path than the controller's one: nothing to detach.
            let wrong_path = CTRLRS.with(|c| {
                c.borrow()
                    .0
                    .iter()
                    .find(|a| a.name == p.name)
                    .is_some_and(|a| {
                        let o = &a.ctrlr.info.opts;
                        p.traddr
                            .as_ref()
                            .is_some_and(|t| *t != o.addr.ip().to_string())
                            || p.trsvcid
                                .as_ref()
                                .is_some_and(|s| *s != o.addr.port().to_string())
                            || p.subnqn.as_ref().is_some_and(|s| *s != o.subnqn)
                            || p.trtype
                                .as_ref()
                                .is_some_and(|t| !t.eq_ignore_ascii_case("tcp"))
                            || p.hostaddr
                                .as_ref()
                                .is_some_and(|h| Some(h) != a.params.hostaddr.as_ref())
                            || p.hostsvcid
                                .as_ref()
                                .is_some_and(|h| Some(h) != a.params.hostsvcid.as_ref())
                            || p.adrfam.as_ref().is_some_and(|f| {
                                !f.eq_ignore_ascii_case(if o.addr.is_ipv4() {
                                    "ipv4"
                                } else {
                                    "ipv6"
                                })
                            })
                    })
            });
            if wrong_path {
                return r.err(RpcError::from(Error::new(
                    ErrorKind::NotFound,
                    format!("Failed to find NVMe controller {} with that path", p.name),
                )));
            }
            detach(&p.name, move |res| match res {
                Ok(()) => r.ok(json!(true)),
                Err(e) => r.err(RpcError::from(e)),
            })
        },
    );
    bdev::rpc::method(
        reg,
        "bdev_nvme_get_io_paths",
        STATE_RUNTIME,
        |p: GetParams, r: Responder| r.ok(io_paths_json(p.name.as_deref())),
    );
    bdev::rpc::method(
        reg,
        "bdev_nvme_reset_controller",
        STATE_RUNTIME,
        |p: ResetParams, r: Responder| {
            // A controller id that is not this controller's: no such controller, as SPDK answers.
            let other = p.cntlid.filter(|&id| id != 0).is_some_and(|id| {
                CTRLRS.with(|c| {
                    c.borrow()
                        .0
                        .iter()
                        .find(|a| a.name == p.name)
                        .is_some_and(|a| a.shared.info.load().cntlid != id)
                })
            });
            if other {
                return r.err(RpcError::errno(libc::ENODEV));
            }
            reset(&p.name, move |res| match res {
                Ok(()) => r.ok(json!(true)),
                Err(e) => r.err(RpcError::from(e)),
            })
        },
    );
    bdev::rpc::method(
        reg,
        "bdev_nvme_get_controllers",
        STATE_RUNTIME,
        |p: GetParams, r: Responder| match controllers_json(p.name.as_deref()) {
            Ok(v) => r.ok(v),
            // SPDK answers this one with a positive EINVAL.
            Err(_) => r.err(RpcError::new(
                libc::EINVAL,
                format!("Controller {} does not exist", p.name.unwrap_or_default()),
            )),
        },
    );
}
