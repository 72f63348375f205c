//! `bdev_nvme` (SPDK's `module/bdev/nvme`): NVMe-oF (TCP, RDMA) and local PCIe controllers attached by RPC (or
//! hot-plugged, [`set_hotplug`]), each active
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
//! Several controllers may share a name (multipath, SPDK's `nvme_bdev_ctrlr`): each one that reaches the same
//! subsystem adds a path to the same bdevs, used as the bdev's multipath policy says ([`NsPaths`]); or a
//! second address is kept as an alternate the controller fails over to when it reconnects (`failover`).
//!
//! Discovery services ([`discovery`]) attach what a discovery controller's log lists and follow its changes.
//!
//! Not here yet (SPDK has them): RDMA and PCIe transports, TLS, and the rest of the module's RPCs.

mod channel;
pub mod discovery;
mod hotplug;

pub use hotplug::set_hotplug;
pub use nvme_host::pci_address;

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use reactor::Poller;

use bdev::{Bdev, BdevOps, BdevParams, IoType, ModuleChannel};
use errors::{Error, ErrorKind, Result};
use jsonrpc::{Registry, Responder, RpcError, STATE_RUNTIME};
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
    /// Transport: `TCP`, `RDMA` or `PCIe`.
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
    /// Multipath defaults for the bdevs this attach creates (SPDK 25.01+ clients group them so).
    #[serde(default)]
    pub multipath_opts: Option<subsystems::bdev_nvme::MultipathOpts>,
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
    /// Made by a discovery service (not written by `save_config`: the service makes it again).
    #[serde(skip)]
    pub from_discovery: bool,
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
    /// A channel saw an ANA status: the ANA log page is read again.
    pub(crate) ana_stale: AtomicBool,
    /// Timed-out commands (queue id, command id) the supervisor sends an Abort for.
    pub(crate) aborts: std::sync::Mutex<Vec<(u16, u16)>>,
}

/// How a bdev's I/O picks among its paths (`bdev_nvme_set_multipath_policy`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    /// Every usable path takes I/O (else the first usable one in the bdev's order).
    pub(crate) active_active: bool,
    /// Active-active picks the path with the fewest commands out (else round robin).
    pub(crate) queue_depth: bool,
    /// Round robin: I/Os per path before moving on.
    pub(crate) rr_min_io: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            active_active: false,
            queue_depth: false,
            rr_min_io: 1,
        }
    }
}

impl Policy {
    fn names(&self) -> (&'static str, &'static str) {
        (
            if self.active_active {
                "active_active"
            } else {
                "active_passive"
            },
            if self.queue_depth {
                "queue_depth"
            } else {
                "round_robin"
            },
        )
    }
}

/// A namespace bdev's paths: the controllers that reach it, in preference order, and its multipath policy.
/// Channels on every thread take a copy when `version` moves (control path: the I/O path reads one atomic).
pub(crate) struct NsPaths {
    pub(crate) nsid: u32,
    pub(crate) version: AtomicU64,
    inner: std::sync::Mutex<(Vec<Arc<Shared>>, Policy)>,
}

impl NsPaths {
    /// The current paths and policy.
    pub(crate) fn snapshot(&self) -> (Vec<Arc<Shared>>, Policy) {
        let g = reactor::lock(&self.inner);
        (g.0.clone(), g.1)
    }

    /// Changes paths or policy; channels follow.
    fn change<R>(&self, f: impl FnOnce(&mut Vec<Arc<Shared>>, &mut Policy) -> R) -> R {
        let r = {
            let mut g = reactor::lock(&self.inner);
            let (list, policy) = &mut *g;
            f(list, policy)
        };
        self.version.fetch_add(1, Ordering::AcqRel);
        r
    }
}

/// A namespace bdev of a controller name (app thread).
struct NsBdev {
    /// The controller name.
    group: String,
    name: String,
    /// The namespace as its first path showed it: a path to another namespace is refused.
    ns: NsInfo,
    paths: Arc<NsPaths>,
}

/// An attached controller (app thread); several may share a name, one per path.
struct Attached {
    id: u64,
    name: String,
    params: AttachParams,
    ctrlr: Controller,
    shared: Arc<Shared>,
    /// The bdevs it is a path of.
    bdevs: Vec<String>,
    /// Where it connects (the attach's address, or an alternate it failed over to).
    target: CtrlrOpts,
    /// Alternate addresses it fails over to when it reconnects (`-x failover`), in order.
    alternates: Vec<CtrlrOpts>,
    /// Attached as an added path (`-x multipath`).
    multipath: bool,
    /// The next reconnect stays on `target` (a detach or reset chose it), rather than moving to the next
    /// alternate.
    keep_target: bool,
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
    /// Namespace bdevs, on the app thread.
    static NSBDEVS: RefCell<Vec<NsBdev>> = const { RefCell::new(Vec::new()) };
}

/// How long an admin command may take (`timeout_admin_us`, else `timeout_us`; none when both are 0).
fn admin_timeout() -> Option<Duration> {
    let o = options();
    let us = if o.timeout_admin_us > 0 {
        o.timeout_admin_us
    } else {
        o.timeout_us
    };
    (us > 0).then(|| Duration::from_micros(us))
}

/// A new controller id.
fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
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

/// Which PCI functions this process may take (`spdk_tgt -u`, `-A`, `-B`).
#[derive(Default)]
struct PciPolicy {
    none: bool,
    allowed: Vec<String>,
    blocked: Vec<String>,
}

fn pci_policy() -> std::sync::MutexGuard<'static, PciPolicy> {
    static P: OnceLock<std::sync::Mutex<PciPolicy>> = OnceLock::new();
    reactor::lock(P.get_or_init(Default::default))
}

/// Sets which PCI functions attaches may take: none (`-u`/`--no-pci`), only `allowed` when it is not empty
/// (`-A`), never `blocked` (`-B`). Addresses in any form [`pci_address`] takes; bad ones are refused.
pub fn set_pci_policy(none: bool, allowed: &[String], blocked: &[String]) -> Result<()> {
    let norm = |v: &[String]| -> Result<Vec<String>> {
        v.iter()
            .map(|a| pci_address(a).ok_or_else(|| invalid(format!("Invalid PCI address {a}"))))
            .collect()
    };
    *pci_policy() = PciPolicy {
        none,
        allowed: norm(allowed)?,
        blocked: norm(blocked)?,
    };
    Ok(())
}

/// Whether this process may take PCI function `bdf` (full form).
pub(crate) fn pci_allowed(bdf: &str) -> bool {
    let pol = pci_policy();
    let bdf = bdf.to_string();
    !pol.none
        && !pol.blocked.contains(&bdf)
        && (pol.allowed.is_empty() || pol.allowed.contains(&bdf))
}

/// The PCI functions of the controllers attached here.
pub(crate) fn pcie_controllers() -> Vec<String> {
    CTRLRS.with(|c| {
        c.borrow()
            .0
            .iter()
            .filter_map(|a| a.target.pci.clone())
            .collect()
    })
}

/// The options of a PCIe attach: the function must be one this process may take.
fn pcie_opts(p: &AttachParams) -> Result<CtrlrOpts> {
    let bdf =
        pci_address(&p.traddr).ok_or_else(|| invalid(format!("Invalid traddr {}", p.traddr)))?;
    if !pci_allowed(&bdf) {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("PCI device {bdf} is not allowed (-u, -A, -B)"),
        ));
    }
    check_knobs(p)?;
    let (hostid, default_nqn) = host_id();
    Ok(CtrlrOpts {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        rdma: false,
        pci: Some(bdf),
        subnqn: String::new(),
        hostnqn: p.hostnqn.clone().unwrap_or_else(|| default_nqn.clone()),
        hostid: *hostid.as_bytes(),
        // Keep alive is a fabrics matter.
        kato_ms: 0,
        num_io_queues: p
            .num_io_queues
            .map_or(NUM_IO_QUEUES, |n| n.clamp(1, u16::MAX as u32) as u16),
        io_queue_size: IO_QUEUE_SIZE,
        connect_timeout: CONNECT_TIMEOUT,
        digests: (false, false),
        auth: None,
        tls: None,
        tcp_user_timeout_ms: 0,
        rdma_knobs: Default::default(),
    })
}

/// DH-HMAC-CHAP for an attach: its keys (names in the keyring, read at every authentication as SPDK reads
/// them) and the digests and DH groups `bdev_nvme_set_options` allows, offered in SPDK's order.
fn auth_opts(p: &AttachParams) -> Result<Option<nvme_host::auth::AuthOpts>> {
    use subsystems::params::Name;
    let Some(host_name) = &p.dhchap_key else {
        if p.dhchap_ctrlr_key.is_some() {
            return Err(invalid("dhchap_ctrlr_key needs dhchap_key"));
        }
        return Ok(None);
    };
    let load = |name: &str, what: &str| {
        subsystems::keyring::get(name).ok_or_else(|| {
            Error::new(
                ErrorKind::Os(libc::ENOKEY),
                format!("Could not load DH-HMAC-CHAP {what}: {name}"),
            )
        })
    };
    let host = load(host_name, "key")?;
    let ctrlr = p
        .dhchap_ctrlr_key
        .as_deref()
        .map(|n| load(n, "controller key"))
        .transpose()?;
    let read = |k: &subsystems::keyring::FileKey| {
        k.read().map_err(|errno| {
            Error::new(
                ErrorKind::Os(errno),
                format!("Could not read DH-HMAC-CHAP key {}", k.name),
            )
        })
    };
    let (digests, dhgroups) = {
        let o = options();
        fn pos<T: Name + PartialEq>(v: T) -> u8 {
            T::ALL.iter().position(|x| *x == v).unwrap_or(0) as u8
        }
        (
            // Hash ids start at 1 (sha256), DH group ids at 0 (null), in the names' order.
            o.dhchap_digests
                .iter()
                .map(|d| pos(*d) + 1)
                .collect::<Vec<u8>>(),
            o.dhchap_dhgroups
                .iter()
                .map(|g| pos(*g))
                .collect::<Vec<u8>>(),
        )
    };
    let bidirectional = ctrlr.is_some();
    Ok(Some(nvme_host::auth::AuthOpts {
        keys: Arc::new(move || Ok((read(&host)?, ctrlr.as_deref().map(read).transpose()?))),
        digests,
        dhgroups,
        bidirectional,
    }))
}

/// The controller options an attach asks for, after SPDK's checks.
fn ctrlr_opts(p: &AttachParams) -> Result<CtrlrOpts> {
    if p.trtype.eq_ignore_ascii_case("pcie") {
        return pcie_opts(p);
    }
    let rdma = p.trtype.eq_ignore_ascii_case("rdma");
    if !rdma && !p.trtype.eq_ignore_ascii_case("tcp") {
        return Err(Error::new(
            ErrorKind::NotSupported,
            format!(
                "trtype {} is not supported yet (TCP, RDMA and PCIe are)",
                p.trtype
            ),
        ));
    }
    let auth = auth_opts(p)?;
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
    let hostnqn = p.hostnqn.clone().unwrap_or_else(|| default_nqn.clone());
    let tls = tls_psk(p, rdma, &hostnqn, &subnqn)?;
    // Read once: a second lock within one expression would wait for the first.
    let (kato_ms, tcp_connect_ms, ack_timeout, rdma_knobs) = {
        let o = options();
        (
            o.keep_alive_timeout_ms,
            o.tcp_connect_timeout_ms,
            o.transport_ack_timeout,
            nvme_host::rdma::RdmaKnobs {
                retry_count: o.transport_retry_count.min(7) as u8,
                ack_timeout: o.transport_ack_timeout,
                tos: o.transport_tos,
            },
        )
    };
    Ok(CtrlrOpts {
        addr: SocketAddr::new(ip, port),
        rdma,
        pci: None,
        subnqn,
        hostnqn,
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
        digests: (p.hdgst.unwrap_or(false), p.ddgst.unwrap_or(false)),
        auth,
        tls,
        tcp_user_timeout_ms: if rdma {
            0
        } else {
            tcp_user_timeout(ack_timeout)
        },
        rdma_knobs,
    })
}

/// `transport_ack_timeout` for NVMe/TCP, as SPDK applies it: `TCP_USER_TIMEOUT` of 2^value ms (the exponent
/// capped at 31), or none for 0. (For RDMA it is the queue pair's ACK timeout: [`nvme_host::rdma::RdmaKnobs`].)
fn tcp_user_timeout(ack_timeout: u8) -> u32 {
    match ack_timeout {
        0 => 0,
        t => 1u32 << t.min(31),
    }
}

/// TLS for an attach (`psk`): the name of a key in the keyring, or else (deprecated in SPDK, still taken) the
/// path of a key file readable by its owner only. The key is read and the TLS PSK derived now, for this host and
/// subsystem, as SPDK derives it when it makes the controller; reconnects use it.
fn tls_psk(
    p: &AttachParams,
    rdma: bool,
    hostnqn: &str,
    subnqn: &str,
) -> Result<Option<nvme_tls::TlsPsk>> {
    let Some(name) = &p.psk else {
        return Ok(None);
    };
    if rdma {
        return Err(invalid("psk: TLS is for trtype TCP only"));
    }
    let text = subsystems::keyring::read_psk(name).map_err(|(errno, why)| {
        Error::new(
            ErrorKind::Os(errno),
            format!("Could not load PSK {name}: {why}"),
        )
    })?;
    let key = nvme_tls::ConfiguredPsk::parse(&text)
        .map_err(|e| invalid(format!("Failed to parse PSK interchange ({name}): {e}")))?;
    key.tls_psk(hostnqn, subnqn).map(Some)
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

/// How an attach under a name already in use is taken (`multipath`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Disable,
    Failover,
    Multipath,
}

fn mode(p: &AttachParams) -> Mode {
    match p.multipath.as_deref() {
        Some("disable") => Mode::Disable,
        Some("failover") => Mode::Failover,
        // SPDK 25.05 and later add a path by default (v24.05 kept the address as a failover alternate).
        _ => Mode::Multipath,
    }
}

/// Whether `o` is the network path of `opts`/`p` (address, port and local address), as SPDK compares them.
fn same_path(o: &CtrlrOpts, a: &AttachParams, opts: &CtrlrOpts, p: &AttachParams) -> bool {
    o.same_place(opts) && a.hostaddr == p.hostaddr && a.hostsvcid == p.hostsvcid
}

/// SPDK's refusals of an attach under a name already in use (errno and text), checked before connecting.
fn second_path_refusal(p: &AttachParams, opts: &CtrlrOpts) -> Option<(i32, String)> {
    CTRLRS.with(|c| {
        let c = c.borrow();
        let first = c.0.iter().find(|a| a.name == p.name)?;
        let name = &p.name;
        if mode(p) == Mode::Disable {
            return Some((
                libc::EALREADY,
                format!("A controller named {name} already exists and multipath is disabled\n"),
            ));
        }
        let taken = c.0.iter().filter(|a| a.name == p.name).any(|a| {
            same_path(&a.target, &a.params, opts, p)
                || a.alternates.iter().any(|o| o.same_place(opts))
        });
        if taken {
            return Some((
                libc::EALREADY,
                format!("A controller named {name} already exists with the specified network path\n"),
            ));
        }
        if first.target.subnqn != opts.subnqn {
            return Some((
                libc::EINVAL,
                format!(
                    "A controller named {name} already exists, but uses a different subnqn ({})\n",
                    first.target.subnqn
                ),
            ));
        }
        if first.target.hostnqn != opts.hostnqn {
            return Some((
                libc::EINVAL,
                format!(
                    "A controller named {name} already exists, but uses a different hostnqn ({})\n",
                    first.target.hostnqn
                ),
            ));
        }
        if p.prchk_reftag == Some(true) || p.prchk_guard == Some(true) {
            return Some((
                libc::EINVAL,
                format!("A controller named {name} already exists. To add a path, do not specify PI options.\n"),
            ));
        }
        None
    })
}

/// Attaches the controller `p` names; `done` gets its bdevs' names (app thread). Under a name already in use it
/// adds a path to the same bdevs (`multipath`), or keeps the address as an alternate (`failover`: no names).
pub fn attach(p: AttachParams, done: impl FnOnce(Result<Vec<String>>) + 'static) {
    let p = with_defaults(p);
    let opts = match ctrlr_opts(&p) {
        Ok(o) => o,
        Err(e) => return done(Err(e)),
    };
    if let Some((errno, msg)) = second_path_refusal(&p, &opts) {
        return done(Err(Error::new(
            ErrorKind::from_errno(errno),
            msg.trim_end().to_string(),
        )));
    }
    let busy = CTRLRS.with(|c| {
        let mut c = c.borrow_mut();
        // Another name on the same subsystem path: SPDK refuses a second controller with one transport id.
        if c.0.iter().any(|a| {
            a.name != p.name && a.target.same_place(&opts) && a.target.subnqn == opts.subnqn
        }) {
            return Some(Error::new(
                ErrorKind::Exists,
                format!(
                    "A controller with the provided trid (traddr: {}) already exists",
                    opts.pci
                        .clone()
                        .unwrap_or_else(|| opts.addr.ip().to_string())
                ),
            ));
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
    let failover = mode(&p) == Mode::Failover
        && CTRLRS.with(|c| c.borrow().0.iter().any(|a| a.name == p.name));
    nvme_host::connect(opts.clone(), move |res| {
        CTRLRS.with(|c| c.borrow_mut().1.retain(|n| *n != p.name));
        let ctrlr = match res {
            Ok(c) => c,
            Err(e) => return done(Err(e)),
        };
        if failover {
            return done(add_alternate(&p.name, ctrlr, opts).map(|()| Vec::new()));
        }
        let id = next_id();
        let shared = Arc::new(Shared {
            info: ArcSwap::new(ctrlr.info.clone()),
            gen: AtomicU64::new(0),
            state: AtomicU8::new(ST_ENABLED),
            reset_wanted: AtomicBool::new(false),
            ana_stale: AtomicBool::new(false),
            aborts: std::sync::Mutex::new(Vec::new()),
        });
        let mut bdevs = Vec::new();
        let max = p.max_bdevs.unwrap_or(u32::MAX) as usize;
        let policy = attach_policy(&p);
        for ns in ctrlr.info.namespaces.iter().take(max) {
            match add_ns_path(&p.name, &shared, ns, policy) {
                Ok(b) => bdevs.push(b),
                Err(e) => {
                    // Undo: nothing half made stays.
                    shared.state.store(ST_DELETED, Ordering::Release);
                    for b in &bdevs {
                        remove_ns_path(b, &shared, |_| {});
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
            ctrlr.info.opts.location()
        );
        watch_namespaces(id, &ctrlr);
        ctrlr.set_admin_timeout(admin_timeout());
        let supervisor = Poller::register("bdev_nvme_ctrlr_supervisor", 10_000, move || {
            supervise(id);
            false
        });
        let multipath = p.multipath.as_deref() == Some("multipath")
            || CTRLRS.with(|c| c.borrow().0.iter().any(|a| a.name == p.name));
        CTRLRS.with(|c| {
            c.borrow_mut().0.push(Attached {
                id,
                name: p.name.clone(),
                params: p,
                ctrlr,
                shared,
                bdevs: bdevs.clone(),
                target: opts,
                alternates: Vec::new(),
                multipath,
                keep_target: false,
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

/// The policy new bdevs of attach `p` start with: the attach's `multipath_opts` (or its flat members), else the
/// module's (`bdev_nvme_set_options`), else active-passive.
fn attach_policy(p: &AttachParams) -> Policy {
    use subsystems::bdev_nvme::{MultipathPolicy, MultipathSelector};
    let module = options().multipath_opts.clone().unwrap_or_default();
    let given = p.multipath_opts.clone().unwrap_or_default();
    let policy = given.policy.or(module.policy);
    let selector = given.selector.or(module.selector);
    let active_active = match p.policy.as_deref() {
        Some(s) => s == "active_active",
        None => policy == Some(MultipathPolicy::ActiveActive),
    };
    let queue_depth = match p.selector.as_deref() {
        Some(s) => s == "queue_depth",
        None => selector == Some(MultipathSelector::QueueDepth),
    };
    Policy {
        active_active,
        queue_depth: active_active && queue_depth,
        rr_min_io: p
            .min_io
            .or(given.min_io)
            .or(module.min_io)
            .filter(|&n| n > 0)
            .unwrap_or(1),
    }
}

/// A failover attach reached its address: the controller behind it must show the same namespaces, and the
/// address becomes an alternate of the controller already under that name (the connection is closed until a
/// failover needs it, as SPDK does).
fn add_alternate(name: &str, probe: Controller, opts: CtrlrOpts) -> Result<()> {
    let res = CTRLRS.with(|c| {
        let mut c = c.borrow_mut();
        let Some(a) = c.0.iter_mut().find(|a| a.name == name) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("controller {name} went away during the attach"),
            ));
        };
        let mine = a.shared.info.load();
        let differs = mine.namespaces.iter().any(|ns| {
            !probe
                .info
                .namespaces
                .iter()
                .any(|n| n.nsid == ns.nsid && n.same_identity(ns))
        });
        if differs {
            return Err(invalid(format!(
                "{}: the namespaces behind {} are not those of controller {name}",
                opts.subnqn,
                opts.location()
            )));
        }
        log::info!(
            "nvme: controller {name}: {} added as a failover address",
            opts.location()
        );
        a.alternates.push(opts);
        Ok(())
    });
    probe.close();
    res
}

/// Makes controller `shared` a path of its namespace `ns` under controller name `group`: the bdev
/// `<group>n<nsid>` is registered with it as its only path, or gets it as one more path. Gives the bdev's name.
fn add_ns_path(group: &str, shared: &Arc<Shared>, ns: &NsInfo, policy: Policy) -> Result<String> {
    let name = format!("{group}n{}", ns.nsid);
    let known = NSBDEVS.with(|b| {
        b.borrow()
            .iter()
            .find(|b| b.group == group && b.paths.nsid == ns.nsid)
            .map(|b| (b.ns.clone(), b.paths.clone()))
    });
    if let Some((first, paths)) = known {
        let addr = shared.info.load().opts.location();
        // SPDK's checks before adding a path (`nvme_bdev_add_ns`).
        if !ns.shared {
            return Err(invalid(format!(
                "{name}: namespace {} behind {addr} cannot be shared",
                ns.nsid
            )));
        }
        if !first.same_identity(ns) {
            return Err(invalid(format!(
                "{name}: namespace {} behind {addr} is not the same namespace (NGUID, EUI-64 or UUID differs)",
                ns.nsid
            )));
        }
        paths.change(|list, _| list.push(shared.clone()));
        return Ok(name);
    }
    let paths = Arc::new(NsPaths {
        nsid: ns.nsid,
        version: AtomicU64::new(0),
        inner: std::sync::Mutex::new((vec![shared.clone()], policy)),
    });
    register_ns(&name, shared, ns, paths.clone())?;
    NSBDEVS.with(|b| {
        b.borrow_mut().push(NsBdev {
            group: group.to_string(),
            name: name.clone(),
            ns: ns.clone(),
            paths,
        })
    });
    Ok(name)
}

/// Takes controller `shared` out of bdev `name`'s paths; the bdev is unregistered with its last path (then
/// `done` runs once it is gone, else at once).
fn remove_ns_path(name: &str, shared: &Arc<Shared>, done: impl FnOnce(()) + 'static) {
    let last = NSBDEVS.with(|b| {
        let mut b = b.borrow_mut();
        let i = b.iter().position(|b| b.name == name)?;
        // The bdev's last path stays in place while the bdev is unregistered: its users' last I/O (an lvstore
        // writing its clean state as it unloads) still goes through it, as in SPDK. Another path is taken out
        // at once; the remaining ones carry the I/O.
        let last = b[i].paths.change(|list, _| {
            let only = list.iter().all(|s| Arc::ptr_eq(s, shared));
            if !only {
                list.retain(|s| !Arc::ptr_eq(s, shared));
            }
            only
        });
        last.then(|| b.remove(i))
    });
    match last.and_then(|_| bdev::get(name)) {
        Some(bd) => {
            let step = reactor::OnThread::new(done);
            bd.unregister(move |_| step.with(|s| s(())));
        }
        None => done(()),
    }
}

/// Namespaces added or removed on controller `id` (an Asynchronous Event and a rescan): new ones become bdevs
/// or paths of them, removed ones stop being paths (a bdev goes with its last path), as SPDK's namespace change
/// handling does.
fn watch_namespaces(id: u64, ctrlr: &Controller) {
    ctrlr.on_ns_change(move |list| {
        let found = CTRLRS.with(|c| {
            c.borrow()
                .0
                .iter()
                .find(|a| a.id == id)
                .map(|a| (a.name.clone(), a.bdevs.clone(), a.shared.clone()))
        });
        let Some((name, bdevs, shared)) = found else {
            return;
        };
        let prefix = format!("{name}n");
        let nsid_of = |b: &str| b.strip_prefix(&prefix).and_then(|n| n.parse::<u32>().ok());
        let gone: Vec<String> = bdevs
            .iter()
            .filter(|b| !list.iter().any(|ns| Some(ns.nsid) == nsid_of(b)))
            .cloned()
            .collect();
        let mut added = Vec::new();
        for ns in &list {
            if !bdevs.iter().any(|b| nsid_of(b) == Some(ns.nsid)) {
                match add_ns_path(&name, &shared, ns, Policy::default()) {
                    Ok(b) => added.push(b),
                    Err(e) => log::error!("nvme: namespace {} of {name}: {e}", ns.nsid),
                }
            }
        }
        for b in &gone {
            log::info!("nvme: namespace of {b} removed from controller {name}");
            remove_ns_path(b, &shared, |_| {});
        }
        if !added.is_empty() {
            log::info!("nvme: {name}: new namespaces, bdevs {added:?}");
        }
        CTRLRS.with(|c| {
            if let Some(a) = c.borrow_mut().0.iter_mut().find(|a| a.id == id) {
                a.bdevs.retain(|b| !gone.contains(b));
                a.bdevs.extend(added);
            }
        });
    });
}

/// What the supervisor decided, done outside the controller table's borrow.
enum Step {
    Nothing,
    Reconnect(Box<CtrlrOpts>),
    /// A PCIe function the kernel wants back: detach that path (name, PCI address).
    Remove(String, String),
}

/// Watches controller `id`: a lost connection starts the reconnect cycle; fast-fail and loss timeouts are
/// applied as time passes. With failover addresses, each attempt goes to the next address in turn.
fn supervise(id: u64) {
    let step = CTRLRS.with(|c| {
        let mut c = c.borrow_mut();
        let Some(a) = c.0.iter_mut().find(|a| a.id == id) else {
            return Step::Nothing;
        };
        let now = Instant::now();
        if let (true, Some(bdf)) = (a.ctrlr.removed(), &a.target.pci) {
            // Reconnecting cannot work, and holding the function would keep the kernel's unbind waiting.
            return Step::Remove(a.name.clone(), bdf.clone());
        }
        let st = a.shared.state.load(Ordering::Acquire);
        if st == ST_ENABLED {
            if a.shared.ana_stale.swap(false, Ordering::AcqRel) {
                a.ctrlr.refresh_ana();
            }
            timeouts(a);
            if a.ctrlr.alive() && !a.shared.reset_wanted.load(Ordering::Acquire) {
                return Step::Nothing;
            }
            log::warn!(
                "nvme: controller {} ({}) lost, reconnecting",
                a.name,
                a.target.location()
            );
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
        if !std::mem::take(&mut a.keep_target) && !a.alternates.is_empty() {
            // SPDK's failover: the failed address goes to the end, the next one is tried.
            let next = a.alternates.remove(0);
            let failed = std::mem::replace(&mut a.target, next);
            log::warn!(
                "nvme: controller {}: failing over from {} to {}",
                a.name,
                failed.addr,
                a.target.addr
            );
            a.alternates.push(failed);
        }
        Step::Reconnect(Box::new(a.target.clone()))
    });
    match step {
        Step::Reconnect(opts) => nvme_host::connect(*opts, move |res| reconnected(id, res)),
        Step::Remove(name, bdf) => {
            log::warn!("nvme: controller {name}: PCI function {bdf} removed: detaching");
            let filter = PathFilter {
                trtype: Some("PCIe".into()),
                traddr: Some(bdf),
                ..Default::default()
            };
            let n = name.clone();
            detach(&name, Some(filter), move |r| {
                if let Err(e) = r {
                    log::error!("nvme: detach of removed controller {n}: {e}");
                }
            });
        }
        Step::Nothing => {}
    }
}

/// The supervisor's part of command timeouts: Aborts for the I/O commands channels found timed out (a failed
/// Abort resets the controller, as SPDK's `bdev_nvme_abort_cpl`); an admin command timed out resets it unless
/// the action is `none`.
fn timeouts(a: &Attached) {
    let aborts = std::mem::take(&mut *reactor::lock(&a.shared.aborts));
    for (sqid, cid) in aborts {
        let shared = a.shared.clone();
        a.ctrlr.abort(sqid, cid, move |ok| {
            if !ok {
                shared.reset_wanted.store(true, Ordering::Release);
            }
        });
    }
    if a.ctrlr.admin_expired() {
        log::warn!("nvme: controller {}: an admin command timed out", a.name);
        if options().action_on_timeout != subsystems::bdev_nvme::ActionOnTimeout::None {
            a.shared.reset_wanted.store(true, Ordering::Release);
        }
    }
}

/// Resets the controllers under `name` (`bdev_nvme_reset_controller`; only the one with controller id `cntlid`
/// when given): each connection is dropped and made again, as when it is lost; `done` hears how the first
/// attempts went.
pub fn reset(name: &str, cntlid: Option<u16>, done: impl FnOnce(Result<()>) + 'static) {
    let ids: Vec<u64> = CTRLRS.with(|c| {
        c.borrow()
            .0
            .iter()
            .filter(|a| a.name == name && cntlid.is_none_or(|id| a.shared.info.load().cntlid == id))
            .map(|a| a.id)
            .collect()
    });
    if ids.is_empty() {
        return done(Err(Error::new(
            ErrorKind::NotFound,
            format!("Controller {name} does not exist"),
        )));
    }
    let gather = Gather::new(ids.len(), Box::new(done));
    for id in ids {
        let g = gather.clone();
        let refused = CTRLRS.with(|c| {
            let mut c = c.borrow_mut();
            let a = c.0.iter_mut().find(|a| a.id == id)?;
            if a.shared.state.load(Ordering::Acquire) != ST_ENABLED || !a.reset_waiters.is_empty() {
                return Some(Error::new(
                    ErrorKind::Busy,
                    format!("controller {name} is being reset"),
                ));
            }
            let g = g.clone();
            a.reset_waiters.push(Box::new(move |r| g.one(r)));
            a.keep_target = true;
            a.shared.reset_wanted.store(true, Ordering::Release);
            None
        });
        match refused {
            Some(e) => g.one(Err(e)),
            None => supervise(id),
        }
    }
}

/// Several outcomes reported as one: the first error, or success once all are in.
struct Gather {
    left: std::cell::Cell<usize>,
    err: RefCell<Option<Error>>,
    done: RefCell<Option<DetachDone>>,
}

impl Gather {
    fn new(n: usize, done: DetachDone) -> std::rc::Rc<Gather> {
        std::rc::Rc::new(Gather {
            left: std::cell::Cell::new(n),
            err: RefCell::new(None),
            done: RefCell::new(Some(done)),
        })
    }

    fn one(&self, r: Result<()>) {
        if let Err(e) = r {
            self.err.borrow_mut().get_or_insert(e);
        }
        self.left.set(self.left.get() - 1);
        if self.left.get() == 0 {
            if let Some(done) = self.done.borrow_mut().take() {
                done(self.err.borrow_mut().take().map_or(Ok(()), Err));
            }
        }
    }
}

/// A reconnect attempt of controller `id` ended.
fn reconnected(id: u64, res: Result<Controller>) {
    let mut waiters = Vec::new();
    let outcome = match &res {
        Ok(_) => Ok(()),
        Err(e) => Err(e.kind),
    };
    let mut name = String::new();
    let delete = CTRLRS.with(|c| {
        let mut c = c.borrow_mut();
        let Some(a) = c.0.iter_mut().find(|a| a.id == id) else {
            if let Ok(ctrlr) = &res {
                ctrlr.close();
            }
            return false;
        };
        name = a.name.clone();
        a.attempting = false;
        waiters = std::mem::take(&mut a.reset_waiters);
        match res {
            Ok(ctrlr) => {
                log::info!(
                    "nvme: controller {} reconnected ({})",
                    a.name,
                    a.target.location()
                );
                watch_namespaces(a.id, &ctrlr);
                ctrlr.set_admin_timeout(admin_timeout());
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
        log::error!(
            "nvme: controller {name} lost for good: deleted (bdevs go with their last path)"
        );
        remove_controller(id, Box::new(|_| {}));
    }
}

/// Which paths a detach names (`bdev_nvme_detach_controller`'s transport fields; unset ones match any).
#[derive(Default, Clone)]
pub struct PathFilter {
    /// Transport type.
    pub trtype: Option<String>,
    /// Target address.
    pub traddr: Option<String>,
    /// Address family.
    pub adrfam: Option<String>,
    /// Target port.
    pub trsvcid: Option<String>,
    /// Subsystem NQN.
    pub subnqn: Option<String>,
    /// Local address.
    pub hostaddr: Option<String>,
    /// Local port.
    pub hostsvcid: Option<String>,
}

impl PathFilter {
    fn matches(&self, o: &CtrlrOpts, a: &AttachParams) -> bool {
        let fam = if o.addr.is_ipv4() { "ipv4" } else { "ipv6" };
        let (trtype, traddr) = match &o.pci {
            Some(bdf) => ("pcie", bdf.clone()),
            None if o.rdma => ("rdma", o.addr.ip().to_string()),
            None => ("tcp", o.addr.ip().to_string()),
        };
        self.traddr.as_ref().is_none_or(|t| *t == traddr)
            && self
                .trsvcid
                .as_ref()
                .is_none_or(|s| *s == o.addr.port().to_string())
            && self.subnqn.as_ref().is_none_or(|s| *s == o.subnqn)
            && self
                .trtype
                .as_ref()
                .is_none_or(|t| t.eq_ignore_ascii_case(trtype))
            && self
                .adrfam
                .as_ref()
                .is_none_or(|f| f.eq_ignore_ascii_case(fam))
            && self
                .hostaddr
                .as_ref()
                .is_none_or(|h| Some(h) == a.hostaddr.as_ref())
            && self
                .hostsvcid
                .as_ref()
                .is_none_or(|h| Some(h) == a.hostsvcid.as_ref())
    }
}

/// Detaches the paths under `name` that `filter` names (all of them without one): a controller's bdevs lose
/// it as a path and go with their last one (their users see them go), then it disconnects. A failover
/// address named is dropped; the address a controller is on, when it has alternates, makes it fail over.
pub fn detach(name: &str, filter: Option<PathFilter>, done: impl FnOnce(Result<()>) + 'static) {
    let filter = filter.unwrap_or_default();
    let mut remove = Vec::new();
    let mut failover = Vec::new();
    let mut matched = false;
    let known = CTRLRS.with(|c| {
        let mut c = c.borrow_mut();
        let mut known = false;
        for a in c.0.iter_mut().filter(|a| a.name == name) {
            known = true;
            let before = a.alternates.len();
            let params = a.params.clone();
            a.alternates.retain(|o| !filter.matches(o, &params));
            matched |= before != a.alternates.len();
            if !filter.matches(&a.target, &a.params) {
                continue;
            }
            matched = true;
            if a.alternates.is_empty() {
                remove.push(a.id);
            } else {
                // The controller leaves this address for its next alternate.
                a.target = a.alternates.remove(0);
                a.keep_target = true;
                a.shared.reset_wanted.store(true, Ordering::Release);
                failover.push(a.id);
            }
        }
        known
    });
    if !known {
        return done(Err(Error::new(
            ErrorKind::NotFound,
            format!("Failed to find NVMe controller {name}"),
        )));
    }
    if !matched {
        return done(Err(Error::new(
            ErrorKind::NotFound,
            format!("Failed to find NVMe controller {name} with that path"),
        )));
    }
    for id in failover {
        supervise(id);
    }
    let gather = Gather::new(remove.len() + 1, Box::new(done));
    for id in remove {
        let g = gather.clone();
        remove_controller(id, Box::new(move |r| g.one(r)));
    }
    gather.one(Ok(()));
}

/// Deletes controller `id`: it stops being a path of its bdevs (a bdev with no path left is unregistered), then
/// it disconnects and `done` runs.
fn remove_controller(id: u64, done: DetachDone) {
    let Some(a) = CTRLRS.with(|c| {
        let mut c = c.borrow_mut();
        let i = c.0.iter().position(|a| a.id == id)?;
        Some(c.0.remove(i))
    }) else {
        return done(Ok(()));
    };
    // The bdevs go first, with a healthy controller still serving them: their users' last I/O (an lvstore
    // writing its clean state as it unloads) still reaches the device, as in SPDK, where the controller is
    // destroyed once its bdevs are unregistered. A controller that is lost stops taking I/O at once (what it
    // had moves to another path, or fails), so an unregistration never waits for it.
    if a.shared.state.load(Ordering::Acquire) != ST_ENABLED || !a.ctrlr.alive() {
        a.shared.state.store(ST_DELETED, Ordering::Release);
    }
    let d = std::rc::Rc::new(Detaching {
        left: std::cell::Cell::new(a.bdevs.len() + 1),
        fin: RefCell::new(Some((a.ctrlr, a.shared.clone(), done))),
    });
    for n in &a.bdevs {
        let d = d.clone();
        remove_ns_path(n, &a.shared, move |_| d.one());
    }
    d.one();
}

/// A detach waiting for its bdevs to be unregistered.
struct Detaching {
    left: std::cell::Cell<usize>,
    fin: RefCell<Option<(Controller, Arc<Shared>, DetachDone)>>,
}

/// Where a detach reports.
type DetachDone = Box<dyn FnOnce(Result<()>)>;

impl Detaching {
    /// One bdev went (or the walk that unregisters them ended): the last one disconnects and answers.
    fn one(&self) {
        self.left.set(self.left.get() - 1);
        if self.left.get() == 0 {
            if let Some((ctrlr, shared, done)) = self.fin.borrow_mut().take() {
                // Channels still holding the path stop using it (what they had moves to another path, or fails
                // when none is left), then the controller goes.
                shared.state.store(ST_DELETED, Ordering::Release);
                ctrlr.close();
                done(Ok(()));
            }
        }
    }
}

/// SPDK's `nvme_generate_uuid`: a name-based (SHA-1) UUID in SPDK's namespace over the serial number as the
/// controller reports it (space-padded) followed by the namespace id in decimal.
fn generated_uuid(sn: &[u8], nsid: u32) -> Uuid {
    const SPDK_NAMESPACE: Uuid = Uuid::from_u128(0xedaed2de_24bc_4b07_b559_f47ecbe730fd);
    let sn = sn.split(|b| *b == 0).next().unwrap_or_default();
    let mut name = sn.to_vec();
    name.extend_from_slice(nsid.to_string().as_bytes());
    Uuid::new_v5(&SPDK_NAMESPACE, &name)
}

/// Registers bdev `name` of namespace `ns`, with `paths` (its first one, `shared`).
fn register_ns(name: &str, shared: &Arc<Shared>, ns: &NsInfo, paths: Arc<NsPaths>) -> Result<Bdev> {
    let info = shared.info.load_full();
    let mut p = BdevParams::new(name, ns.block_size, ns.blocks);
    p.product_name = "NVMe disk".into();
    // As SPDK: the NGUID, else the namespace UUID, else (`generate_uuids`) one derived from the controller's
    // serial number and the namespace id, the same across restarts and hosts.
    let ident = if ns.nguid != [0; 16] {
        Some(ns.nguid)
    } else if ns.uuid.is_some() {
        ns.uuid
    } else if options().generate_uuids {
        Some(*generated_uuid(&info.cdata.sn, ns.nsid).as_bytes())
    } else {
        None
    };
    if let Some(id) = ident {
        let u = Uuid::from_bytes(id);
        // The namespace's own bdev is in this process (a target exporting to itself): keep its UUID to it.
        if bdev::get(&u.to_string()).is_some() {
            log::warn!("{name}: UUID {u} is taken here, a new one is used");
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
            oncs: info.cdata.oncs,
            paths,
        }),
    )
    .map_err(|e| Error::wrap(e, format!("register {name}")))
}

/// One namespace's bdev.
struct NsOps {
    /// Optional commands of the first path's controller.
    oncs: u16,
    paths: Arc<NsPaths>,
}

impl BdevOps for NsOps {
    fn module_name(&self) -> &'static str {
        MODULE
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        use nvme_proto::identify::oncs;
        let o = self.oncs;
        match t {
            IoType::Read | IoType::Write | IoType::Flush | IoType::NvmeIo => true,
            IoType::Unmap => o & oncs::DSM != 0,
            IoType::WriteZeroes => o & oncs::WRITE_ZEROES != 0,
            IoType::Compare => o & oncs::COMPARE != 0,
            _ => false,
        }
    }

    fn create_channel(&self, bdev: &Bdev) -> Box<dyn ModuleChannel> {
        let (retries, timeout, failback) = {
            let o = options();
            let t = (o.timeout_us > 0)
                .then(|| (Duration::from_micros(o.timeout_us), o.action_on_timeout));
            (o.bdev_retry_count, t, !o.disable_auto_failback)
        };
        Box::new(channel::NvmeChannel::new(
            self.paths.clone(),
            bdev.name(),
            retries,
            timeout,
            failback,
        ))
    }

    fn dump_info(&self, _bdev: &Bdev, out: &mut serde_json::Map<String, Value>) {
        let (list, policy) = self.paths.snapshot();
        let entries: Vec<Value> = list
            .iter()
            .map(|s| {
                let info = s.info.load();
                let o = &info.opts;
                let mut m = serde_json::Map::new();
                if let Some(bdf) = &o.pci {
                    m.insert("pci_address".into(), json!(bdf));
                }
                m.insert("trid".into(), Value::Object(trid_json(o)));
                m.insert("ctrlr_data".into(), ctrlr_data_json(&info));
                let v = info.cdata.ver;
                let version = if v & 0xff != 0 {
                    format!("{}.{}.{}", v >> 16, (v >> 8) & 0xff, v & 0xff)
                } else {
                    format!("{}.{}", v >> 16, (v >> 8) & 0xff)
                };
                m.insert("vs".into(), json!({ "nvme_version": version }));
                m.insert("ns_data".into(), ns_data(&info, self.paths.nsid));
                if info.cdata.oacs & nvme_proto::identify::oacs::SECURITY != 0 {
                    // No Opal support here: SPDK says the same of a drive it does not run Opal on.
                    m.insert("security".into(), json!({ "opal": false }));
                }
                Value::Object(m)
            })
            .collect();
        out.insert("nvme".into(), Value::Array(entries));
        let (p, sel) = policy.names();
        out.insert("mp_policy".into(), json!(p));
        if policy.active_active {
            out.insert("selector".into(), json!(sel));
            if !policy.queue_depth {
                out.insert("rr_min_io".into(), json!(policy.rr_min_io));
            }
        }
    }
}

/// SPDK's `ctrlr_data` of a controller (`nvme_namespace_info_json`): Identify Controller's names, the
/// subsystem NQN it reports, and its admin command and multipath capabilities.
fn ctrlr_data_json(info: &CtrlrInfo) -> Value {
    use nvme_proto::identify::{oacs, padded_str};
    let c = &info.cdata;
    let text = |b: &[u8]| padded_str(b).unwrap_or_default().trim().to_string();
    let mut m = serde_json::Map::new();
    m.insert("cntlid".into(), json!(info.cntlid));
    m.insert("vendor_id".into(), json!(format!("0x{:04x}", c.vid)));
    m.insert("model_number".into(), json!(text(&c.mn)));
    m.insert("serial_number".into(), json!(text(&c.sn)));
    m.insert("firmware_revision".into(), json!(text(&c.fr)));
    let end = c
        .subnqn
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(c.subnqn.len());
    if end > 0 {
        m.insert(
            "subnqn".into(),
            json!(String::from_utf8_lossy(&c.subnqn[..end])),
        );
    }
    let bit = |b: u16| u32::from(c.oacs & b != 0);
    m.insert(
        "oacs".into(),
        json!({
            "security": bit(oacs::SECURITY),
            "format": bit(oacs::FORMAT),
            "firmware": bit(oacs::FIRMWARE),
            "ns_manage": bit(oacs::NS_MANAGEMENT),
        }),
    );
    m.insert("multi_ctrlr".into(), json!(c.cmic & (1 << 1) != 0));
    m.insert("ana_reporting".into(), json!(c.cmic & (1 << 3) != 0));
    Value::Object(m)
}

/// SPDK's `ns_data` of a namespace through one controller: its id, its ANA state when the controller reports
/// them, and whether it may be shared.
fn ns_data(info: &CtrlrInfo, nsid: u32) -> Value {
    let mut v = serde_json::Map::new();
    v.insert("id".into(), json!(nsid));
    let ns = info.namespaces.iter().find(|n| n.nsid == nsid);
    if info.ana.reporting() {
        let grp = ns.map_or(0, |n| n.anagrpid);
        v.insert(
            "ana_state".into(),
            json!(nvme_host::ana_state_name(info.ana.get(grp))),
        );
    }
    v.insert("can_share".into(), json!(ns.is_some_and(|n| n.shared)));
    Value::Object(v)
}

/// One I/O path: a bdev's channel on one thread (`bdev_nvme_get_io_paths`).
pub(crate) struct PathEntry {
    thread: String,
    bdev: String,
    shared: Arc<Shared>,
    /// The channel's queue is connected.
    pub(crate) connected: AtomicBool,
    /// The channel sends I/O on this path now.
    pub(crate) current: AtomicBool,
    /// The namespace is accessible through it (ANA optimized or non-optimized).
    pub(crate) accessible: AtomicBool,
}

/// A channel's counters per transport (SPDK's poll group statistics, the union of the fields its transports
/// report): [`TRANSPORTS`] by the indices of [`stat`].
pub(crate) type Counts = [[u64; stat::N]; 3];

/// The transports statistics tell apart, by their index in [`Counts`], in SPDK's names.
const TRANSPORTS: [&str; 3] = ["TCP", "RDMA", "PCIe"];

/// The index of a queue pair's transport in [`Counts`].
pub(crate) fn transport_index(t: nvme_host::qpair::Transport) -> usize {
    match t {
        nvme_host::qpair::Transport::Tcp => 0,
        nvme_host::qpair::Transport::Rdma => 1,
        nvme_host::qpair::Transport::Pcie => 2,
    }
}

/// The counters of one transport in [`Counts`].
pub(crate) mod stat {
    /// Channel polls (that had a queue of this transport).
    pub const POLLS: usize = 0;
    /// Polls that completed nothing.
    pub const IDLE_POLLS: usize = 1;
    /// TCP: polls in which a socket had something.
    pub const SOCKET_COMPLETIONS: usize = 2;
    /// Commands completed.
    pub const COMPLETIONS: usize = 3;
    /// I/Os that waited for a queue slot or a path.
    pub const QUEUED: usize = 4;
    /// Commands submitted.
    pub const SUBMITTED: usize = 5;
    /// RDMA send work requests (each posted on its own, so also the send doorbells).
    pub const SEND_WRS: usize = 6;
    /// RDMA receive work requests (likewise the receive doorbells).
    pub const RECV_WRS: usize = 7;
    /// PCIe submission tail doorbell writes.
    pub const SQ_DOORBELLS: usize = 8;
    /// PCIe completion head doorbell writes.
    pub const CQ_DOORBELLS: usize = 9;
    /// How many.
    pub const N: usize = 10;
}

/// A channel's counters as its thread publishes them once per poll, for `bdev_nvme_get_transport_statistics`;
/// counts of channels gone stay with their thread.
pub(crate) struct TransportStats {
    thread: String,
    counts: [[AtomicU64; stat::N]; 3],
    /// The RDMA device of the channel's RDMA queue, once it has one.
    rdma_dev: std::sync::Mutex<String>,
}

impl TransportStats {
    /// Publishes the channel's counts (the transports it has used).
    pub(crate) fn store(&self, c: &Counts) {
        for (dst, src) in self.counts.iter().zip(c) {
            if src[stat::POLLS] != 0 {
                for (d, v) in dst.iter().zip(src) {
                    d.store(*v, Ordering::Relaxed);
                }
            }
        }
    }

    /// Records the RDMA device the channel uses.
    pub(crate) fn set_rdma_device(&self, name: &str) {
        *reactor::lock(&self.rdma_dev) = name.to_string();
    }

    fn load(&self) -> Counts {
        let mut c = [[0; stat::N]; 3];
        for (dst, src) in c.iter_mut().zip(&self.counts) {
            for (d, v) in dst.iter_mut().zip(src) {
                *d = v.load(Ordering::Relaxed);
            }
        }
        c
    }
}

/// Per thread: its counts and its RDMA device name.
type ThreadCounts = (String, Counts, String);

/// Live channels' counters, and per thread the counts of channels gone.
type StatsRegistry = (Vec<Arc<TransportStats>>, Vec<ThreadCounts>);

/// The [`StatsRegistry`], locked.
fn stats() -> std::sync::MutexGuard<'static, StatsRegistry> {
    static S: OnceLock<std::sync::Mutex<StatsRegistry>> = OnceLock::new();
    reactor::lock(S.get_or_init(Default::default))
}

/// A new channel's counters.
pub(crate) fn add_stats() -> Arc<TransportStats> {
    let thread = reactor::thread::current().map_or_else(String::new, |t| t.name().to_string());
    let s = Arc::new(TransportStats {
        thread,
        counts: Default::default(),
        rdma_dev: Default::default(),
    });
    stats().0.push(s.clone());
    s
}

/// Adds `c` (and an RDMA device name) to `thread`'s entry of `acc`.
fn add_to(acc: &mut Vec<ThreadCounts>, thread: &str, c: &Counts, dev: &str) {
    let i = match acc.iter().position(|(t, _, _)| t == thread) {
        Some(i) => i,
        None => {
            acc.push((thread.to_string(), [[0; stat::N]; 3], String::new()));
            acc.len() - 1
        }
    };
    let (_, sum, name) = &mut acc[i];
    for (s, v) in sum.iter_mut().flatten().zip(c.iter().flatten()) {
        *s += v;
    }
    if name.is_empty() {
        *name = dev.to_string();
    }
}

/// A channel goes: its counts stay with its thread.
pub(crate) fn remove_stats(s: &Arc<TransportStats>) {
    let mut g = stats();
    g.0.retain(|x| !Arc::ptr_eq(x, s));
    let dev = reactor::lock(&s.rdma_dev).clone();
    add_to(&mut g.1, &s.thread, &s.load(), &dev);
}

/// One transport's entry of a thread, with SPDK's fields for it.
fn transport_stats_entry(k: usize, c: &[u64; stat::N], dev: &str) -> Value {
    use stat::*;
    match k {
        0 => json!({"trname": TRANSPORTS[0], "polls": c[POLLS], "idle_polls": c[IDLE_POLLS],
            "socket_completions": c[SOCKET_COMPLETIONS], "nvme_completions": c[COMPLETIONS],
            "queued_requests": c[QUEUED], "submitted_requests": c[SUBMITTED]}),
        1 => json!({"trname": TRANSPORTS[1], "devices": [{"dev_name": dev, "polls": c[POLLS],
            "idle_polls": c[IDLE_POLLS], "completions": c[COMPLETIONS], "queued_requests": c[QUEUED],
            "total_send_wrs": c[SEND_WRS], "send_doorbell_updates": c[SEND_WRS],
            "total_recv_wrs": c[RECV_WRS], "recv_doorbell_updates": c[RECV_WRS]}]}),
        _ => json!({"trname": TRANSPORTS[2], "polls": c[POLLS], "idle_polls": c[IDLE_POLLS],
            "completions": c[COMPLETIONS], "cq_mmio_doorbell_updates": c[CQ_DOORBELLS],
            "cq_shadow_doorbell_updates": 0, "queued_requests": c[QUEUED],
            "submitted_requests": c[SUBMITTED], "sq_mmio_doorbell_updates": c[SQ_DOORBELLS],
            "sq_shadow_doorbell_updates": 0}),
    }
}

/// `bdev_nvme_get_transport_statistics`: per thread that has had NVMe channels, each transport it has polled,
/// with SPDK's fields for that transport.
pub fn transport_stats_json() -> Value {
    let g = stats();
    let mut threads = g.1.clone();
    for s in &g.0 {
        let dev = reactor::lock(&s.rdma_dev).clone();
        add_to(&mut threads, &s.thread, &s.load(), &dev);
    }
    let groups: Vec<Value> = threads
        .iter()
        .map(|(t, c, dev)| {
            let trs: Vec<Value> = (0..3)
                .filter(|&k| c[k][stat::POLLS] != 0)
                .map(|k| transport_stats_entry(k, &c[k], dev))
                .collect();
            json!({"thread": t, "transports": trs})
        })
        .collect();
    json!({ "poll_groups": groups })
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
        current: AtomicBool::new(false),
        accessible: AtomicBool::new(true),
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
                        "current": connected && p.current.load(Ordering::Relaxed),
                        "connected": connected,
                        "accessible": p.accessible.load(Ordering::Relaxed),
                        "transport": transport_json(o),
                    })
                })
                .collect();
            json!({"thread": t, "io_paths": io_paths})
        })
        .collect();
    json!({ "poll_groups": groups })
}

/// SPDK's `trid` object of a controller: the transport's address fields, and the subsystem NQN of a fabrics
/// one (a PCIe controller has none, and SPDK leaves empty fields out).
fn trid_json(o: &CtrlrOpts) -> serde_json::Map<String, Value> {
    let mut m = transport_json(o);
    if o.pci.is_none() {
        m.insert("subnqn".into(), json!(o.subnqn));
    }
    m
}

/// The transport part of a controller's trid.
fn transport_json(o: &CtrlrOpts) -> serde_json::Map<String, Value> {
    let v = match &o.pci {
        Some(bdf) => json!({"trtype": "PCIe", "traddr": bdf}),
        None => json!({
            "trtype": if o.rdma { "RDMA" } else { "TCP" },
            "adrfam": if o.addr.is_ipv4() { "IPv4" } else { "IPv6" },
            "traddr": o.addr.ip().to_string(),
            "trsvcid": o.addr.port().to_string(),
        }),
    };
    match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

/// SPDK's controller entry (`nvme_ctrlr_info_json`).
fn ctrlr_json(a: &Attached) -> Value {
    let info = a.shared.info.load();
    // SPDK's state names (`nvme_ctrlr_get_state_str`).
    let state = match a.shared.state.load(Ordering::Acquire) {
        ST_ENABLED if a.ctrlr.alive() => "enabled",
        ST_ENABLED | ST_RESETTING | ST_FAIL_FAST if a.attempting => "resetting",
        ST_ENABLED | ST_RESETTING | ST_FAIL_FAST => "reconnect_is_delayed",
        _ => "deleting",
    };
    let mut v = serde_json::Map::new();
    v.insert("state".into(), json!(state));
    v.insert("trid".into(), Value::Object(trid_json(&a.target)));
    if !a.alternates.is_empty() {
        let alt: Vec<Value> = a
            .alternates
            .iter()
            .map(|o| Value::Object(trid_json(o)))
            .collect();
        v.insert("alternate_trids".into(), Value::Array(alt));
    }
    v.insert("cntlid".into(), json!(info.cntlid));
    v.insert(
        "host".into(),
        json!({
            "nqn": a.target.hostnqn,
            "addr": a.params.hostaddr.clone().unwrap_or_default(),
            "svcid": a.params.hostsvcid.clone().unwrap_or_default(),
        }),
    );
    Value::Object(v)
}

/// `bdev_nvme_get_controllers` entries (all, or the one named): one per name, with each of its controllers.
pub fn controllers_json(name: Option<&str>) -> Result<Value> {
    let v: Vec<Value> = CTRLRS.with(|c| {
        let c = c.borrow();
        let mut names: Vec<&str> = Vec::new();
        for a in c.0.iter().filter(|a| name.is_none_or(|n| n == a.name)) {
            if !names.contains(&a.name.as_str()) {
                names.push(&a.name);
            }
        }
        names
            .iter()
            .map(|n| {
                let ctrlrs: Vec<Value> =
                    c.0.iter()
                        .filter(|a| a.name == *n)
                        .map(ctrlr_json)
                        .collect();
                json!({"name": n, "ctrlrs": ctrlrs})
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
/// `bdev_nvme_set_hotplug`, as SPDK does): one per controller, with the address it is on; an added path says
/// `"multipath": "multipath"` (as SPDK 24.09 and later write it) so a restart adds it again. Failover
/// alternates are not written, as SPDK writes none.
pub fn config_entries() -> Vec<Value> {
    CTRLRS.with(|c| {
        c.borrow()
            .0
            .iter()
            .filter(|a| !a.params.from_discovery)
            .map(|a| {
                let o = &a.target;
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
                if let Some(k) = &p.psk {
                    params.insert("psk".into(), json!(k));
                }
                params.insert("hostnqn".into(), json!(o.hostnqn));
                params.insert("hdgst".into(), json!(o.digests.0));
                params.insert("ddgst".into(), json!(o.digests.1));
                if let Some(k) = &p.dhchap_key {
                    params.insert("dhchap_key".into(), json!(k));
                }
                if let Some(k) = &p.dhchap_ctrlr_key {
                    params.insert("dhchap_ctrlr_key".into(), json!(k));
                }
                if let Some(a) = &p.hostaddr {
                    params.insert("hostaddr".into(), json!(a));
                }
                if let Some(s) = &p.hostsvcid {
                    params.insert("hostsvcid".into(), json!(s));
                }
                if a.multipath {
                    params.insert("multipath".into(), json!("multipath"));
                }
                json!({"method": "bdev_nvme_attach_controller", "params": params})
            })
            .chain(discovery::config_entries())
            .collect()
    })
}

/// Detaches every controller (module fini: their bdevs are already gone).
pub fn detach_all() {
    discovery::stop_all();
    let all: Vec<Attached> = CTRLRS.with(|c| std::mem::take(&mut c.borrow_mut().0));
    NSBDEVS.with(|b| b.borrow_mut().clear());
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
    if p.multipath
        .as_deref()
        .is_some_and(|m| !["disable", "failover", "multipath"].contains(&m))
    {
        return Some(RpcError::new(
            jsonrpc::INTERNAL_ERROR,
            "spdk_json_decode_object failed",
        ));
    }
    // Under a name in use, SPDK's own refusals (checked once the address is known to parse).
    let opts = ctrlr_opts(&with_defaults(p.clone())).ok()?;
    second_path_refusal(p, &opts).map(|(errno, msg)| RpcError::new(-errno, msg))
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyParams {
    name: String,
    policy: String,
    #[serde(default)]
    selector: Option<String>,
    #[serde(default)]
    rr_min_io: Option<u32>,
}

/// Parameters that are only a name (`bdev_nvme_get_controller_health_info`, `bdev_nvme_stop_discovery`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParams {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreferredParams {
    name: String,
    cntlid: u16,
}

/// `bdev_nvme_get_controller_health_info`: the SMART / health log page of controller `name` (the first one
/// under that name), in SPDK's fields; SPDK's -32603 answers otherwise.
pub fn health_info(name: &str, done: impl FnOnce(std::result::Result<Value, RpcError>) + 'static) {
    let internal = |m: &str| RpcError::new(jsonrpc::INTERNAL_ERROR, m);
    let mut done = Some(done);
    CTRLRS.with(|c| {
        let c = c.borrow();
        let Some(a) = c.0.iter().find(|a| a.name == name && a.ctrlr.alive()) else {
            return;
        };
        let info = a.shared.info.load_full();
        // SPDK's `traddr`: the network address without the port, or the PCI address.
        let addr = a
            .target
            .pci
            .clone()
            .unwrap_or_else(|| a.target.addr.ip().to_string());
        let Some(d) = done.take() else { return };
        a.ctrlr.get_log_page(
            nvme_proto::log::lid::HEALTH,
            nvme_proto::log::HealthLog::SIZE,
            move |page| {
                d(page
                    .and_then(|p| health_json(&info, &addr, &p))
                    .map_err(|e| {
                        log::error!("nvme: health log of {addr}: {e}");
                        internal("Internal error.")
                    }))
            },
        );
    });
    if let Some(d) = done {
        d(Err(internal("Device not found")));
    }
}

/// SPDK's health info object from a health log page.
fn health_json(info: &CtrlrInfo, addr: &str, page: &[u8]) -> std::result::Result<Value, String> {
    let h = nvme_proto::log::HealthLog::decode(page).map_err(|e| e.to_string())?;
    let text = |b: &[u8]| {
        nvme_proto::identify::padded_str(b)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    // SPDK writes 128-bit counters in full; these saturate at 2^64 - 1 (no controller gets there).
    let big = |v: u128| json!(u64::try_from(v).unwrap_or(u64::MAX));
    let mut m = serde_json::Map::new();
    m.insert("model_number".into(), json!(text(&info.cdata.mn)));
    m.insert("serial_number".into(), json!(text(&info.cdata.sn)));
    m.insert("firmware_revision".into(), json!(text(&info.cdata.fr)));
    m.insert("traddr".into(), json!(addr));
    m.insert("critical_warning".into(), json!(h.critical_warning));
    m.insert(
        "temperature_celsius".into(),
        json!((h.temperature as u64).wrapping_sub(273)),
    );
    m.insert(
        "available_spare_percentage".into(),
        json!(h.available_spare),
    );
    m.insert(
        "available_spare_threshold_percentage".into(),
        json!(h.available_spare_threshold),
    );
    m.insert("percentage_used".into(), json!(h.percentage_used));
    for (k, v) in [
        ("data_units_read", h.data_units_read),
        ("data_units_written", h.data_units_written),
        ("host_read_commands", h.host_read_commands),
        ("host_write_commands", h.host_write_commands),
        ("controller_busy_time", h.controller_busy_time),
        ("power_cycles", h.power_cycles),
        ("power_on_hours", h.power_on_hours),
        ("unsafe_shutdowns", h.unsafe_shutdowns),
        ("media_errors", h.media_errors),
        ("num_err_log_entries", h.num_error_log_entries),
    ] {
        m.insert(k.into(), big(v));
    }
    m.insert(
        "warning_temperature_time_minutes".into(),
        json!(h.warning_temp_time),
    );
    m.insert(
        "critical_composite_temperature_time_minutes".into(),
        json!(h.critical_temp_time),
    );
    // SPDK writes one key per implemented sensor, all under the same name; a JSON object keeps the last.
    if let Some(t) = h.temp_sensors.iter().rev().find(|&&t| t != 0) {
        m.insert(
            "temperature_sensor_celsius".into(),
            json!((*t as u64).wrapping_sub(273)),
        );
    }
    Ok(Value::Object(m))
}

/// The paths of NVMe bdev `name`, or SPDK's answer when it is not one (-ENODEV).
fn ns_paths(name: &str) -> std::result::Result<Arc<NsPaths>, RpcError> {
    let canonical = bdev::get(name).map(|b| b.name().to_string());
    NSBDEVS
        .with(|b| {
            b.borrow()
                .iter()
                .find(|b| Some(&b.name) == canonical.as_ref())
                .map(|b| b.paths.clone())
        })
        .ok_or_else(|| RpcError::errno(libc::ENODEV))
}

/// `bdev_nvme_set_multipath_policy`: SPDK's checks and answers (a selector without active-active, or an
/// unknown policy or selector: the decode failure; round robin with `rr_min_io` 0: -EINVAL).
fn set_multipath_policy(p: PolicyParams) -> std::result::Result<(), RpcError> {
    let decode = || RpcError::new(jsonrpc::INTERNAL_ERROR, "spdk_json_decode_object failed");
    let active_active = match p.policy.as_str() {
        "active_passive" => false,
        "active_active" => true,
        _ => return Err(decode()),
    };
    let queue_depth = match p.selector.as_deref() {
        None => false,
        Some("round_robin") if active_active => false,
        Some("queue_depth") if active_active => true,
        // SPDK: "selector only works in active_active mode" (round_robin is selector 0 and passes).
        Some("round_robin") => false,
        _ => return Err(decode()),
    };
    let rr_min_io = match p.rr_min_io {
        Some(0) if active_active && !queue_depth => return Err(RpcError::errno(libc::EINVAL)),
        Some(n) => n,
        None => 1,
    };
    set_policy(&p.name, active_active, queue_depth, rr_min_io)
        .map_err(|_| RpcError::errno(libc::ENODEV))
}

/// Sets NVMe bdev `bdev`'s multipath policy: active-active (else active-passive), the queue-depth selector
/// (else round robin) and round robin's I/Os per path. Every channel takes it at its next I/O or poll.
pub fn set_policy(
    bdev: &str,
    active_active: bool,
    queue_depth: bool,
    rr_min_io: u32,
) -> Result<()> {
    let paths = ns_paths(bdev)
        .map_err(|_| Error::new(ErrorKind::NotFound, format!("{bdev} is not an NVMe bdev")))?;
    paths.change(|_, pol| {
        *pol = Policy {
            active_active,
            queue_depth: active_active && queue_depth,
            rr_min_io: rr_min_io.max(1),
        }
    });
    Ok(())
}

/// `bdev_nvme_set_preferred_path`: the path through controller `cntlid` goes first (-ENODEV when the bdev has
/// none).
fn set_preferred_path(p: PreferredParams) -> std::result::Result<(), RpcError> {
    set_preferred(&p.name, p.cntlid).map_err(|_| RpcError::errno(libc::ENODEV))
}

/// Puts the path of NVMe bdev `bdev` through controller `cntlid` first (active-passive uses it while it can).
pub fn set_preferred(bdev: &str, cntlid: u16) -> Result<()> {
    let missing = || {
        Error::new(
            ErrorKind::NotFound,
            format!("{bdev} has no path through controller {cntlid}"),
        )
    };
    let paths = ns_paths(bdev).map_err(|_| missing())?;
    let moved = paths.change(|list, _| {
        let i = list.iter().position(|s| s.info.load().cntlid == cntlid)?;
        let s = list.remove(i);
        list.insert(0, s);
        Some(())
    });
    moved.ok_or_else(missing)
}

/// Registers `bdev_nvme_attach_controller`, `bdev_nvme_detach_controller`, `bdev_nvme_reset_controller`,
/// `bdev_nvme_get_controllers`, `bdev_nvme_get_io_paths`, `bdev_nvme_set_multipath_policy` and
/// `bdev_nvme_set_preferred_path`.
pub fn register_rpcs(reg: &mut Registry) {
    bdev::rpc::method(
        reg,
        "bdev_nvme_attach_controller",
        STATE_RUNTIME,
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
            let filter = PathFilter {
                trtype: p.trtype,
                traddr: p.traddr,
                adrfam: p.adrfam,
                trsvcid: p.trsvcid,
                subnqn: p.subnqn,
                hostaddr: p.hostaddr,
                hostsvcid: p.hostsvcid,
            };
            detach(&p.name, Some(filter), move |res| match res {
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
            // A controller id that none under the name has: no such controller, as SPDK answers.
            let cntlid = p.cntlid.filter(|&id| id != 0);
            let known = CTRLRS.with(|c| {
                c.borrow().0.iter().any(|a| {
                    a.name == p.name && cntlid.is_none_or(|id| a.shared.info.load().cntlid == id)
                })
            });
            if !known {
                return r.err(RpcError::errno(libc::ENODEV));
            }
            reset(&p.name, cntlid, move |res| match res {
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
    bdev::rpc::method(
        reg,
        "bdev_nvme_set_multipath_policy",
        STATE_RUNTIME,
        |p: PolicyParams, r: Responder| match set_multipath_policy(p) {
            Ok(()) => r.ok(json!(true)),
            Err(e) => r.err(e),
        },
    );
    reg.register(
        "bdev_nvme_get_transport_statistics",
        STATE_RUNTIME,
        std::rc::Rc::new(|params: Option<Value>, r: Responder| {
            // SPDK refuses any params, even an empty object.
            if params.is_some_and(|p| !p.is_null()) {
                return r.err(RpcError::new(
                    jsonrpc::INVALID_PARAMS,
                    "'bdev_nvme_get_transport_statistics' requires no arguments",
                ));
            }
            r.ok(transport_stats_json())
        }),
    );
    bdev::rpc::method(
        reg,
        "bdev_nvme_start_discovery",
        STATE_RUNTIME,
        |p: discovery::StartParams, r: Responder| {
            discovery::start(p, move |res| match res {
                Ok(()) => r.ok(json!(true)),
                Err(e) => r.err(e),
            })
        },
    );
    bdev::rpc::method(
        reg,
        "bdev_nvme_stop_discovery",
        STATE_RUNTIME,
        |p: NameParams, r: Responder| {
            discovery::stop(&p.name, move |res| match res {
                Ok(()) => r.ok(json!(true)),
                Err(e) => r.err(e),
            })
        },
    );
    bdev::rpc::method(
        reg,
        "bdev_nvme_get_discovery_info",
        STATE_RUNTIME,
        |_: GetParams, r: Responder| r.ok(discovery::info_json()),
    );
    bdev::rpc::method(
        reg,
        "bdev_nvme_get_controller_health_info",
        STATE_RUNTIME,
        |p: NameParams, r: Responder| {
            health_info(&p.name, move |res| match res {
                Ok(v) => r.ok(v),
                Err(e) => r.err(e),
            })
        },
    );
    bdev::rpc::method(
        reg,
        "bdev_nvme_set_preferred_path",
        STATE_RUNTIME,
        |p: PreferredParams, r: Responder| match set_preferred_path(p) {
            Ok(()) => r.ok(json!(true)),
            Err(e) => r.err(e),
        },
    );
}

#[cfg(test)]
mod tests {
    /// Each transport's statistics entry has SPDK's fields for it, fed from the right counters.
    #[test]
    fn transport_stats_entries_use_spdk_fields() {
        use super::stat::*;
        let mut c = [0u64; N];
        for (i, v) in c.iter_mut().enumerate() {
            *v = 10 + i as u64;
        }
        let tcp = super::transport_stats_entry(0, &c, "");
        assert_eq!(
            tcp,
            serde_json::json!({"trname": "TCP", "polls": 10, "idle_polls": 11, "socket_completions": 12,
                "nvme_completions": 13, "queued_requests": 14, "submitted_requests": 15})
        );
        let rdma = super::transport_stats_entry(1, &c, "rxe0");
        assert_eq!(
            rdma,
            serde_json::json!({"trname": "RDMA", "devices": [{"dev_name": "rxe0", "polls": 10, "idle_polls": 11,
                "completions": 13, "queued_requests": 14, "total_send_wrs": 16, "send_doorbell_updates": 16,
                "total_recv_wrs": 17, "recv_doorbell_updates": 17}]})
        );
        let pcie = super::transport_stats_entry(2, &c, "");
        assert_eq!(
            pcie,
            serde_json::json!({"trname": "PCIe", "polls": 10, "idle_polls": 11, "completions": 13,
                "cq_mmio_doorbell_updates": 19, "cq_shadow_doorbell_updates": 0, "queued_requests": 14,
                "submitted_requests": 15, "sq_mmio_doorbell_updates": 18, "sq_shadow_doorbell_updates": 0})
        );
    }

    /// `transport_ack_timeout` becomes a TCP user timeout of 2^value ms, as in SPDK (0: none; capped at 2^31).
    #[test]
    fn ack_timeout_is_a_power_of_two_of_ms() {
        assert_eq!(
            [0, 1, 12, 31, 200].map(super::tcp_user_timeout),
            [0, 2, 4096, 1 << 31, 1 << 31]
        );
    }

    /// `generate_uuids`: the UUID SPDK derives for a namespace with neither NGUID nor UUID, from the
    /// controller's space-padded serial number and the namespace id (RFC 4122 name-based, SHA-1; the
    /// expected value computed independently with Python's `uuid.uuid5`).
    #[test]
    fn generated_uuids_are_spdks() {
        let mut sn = [b' '; 20];
        sn[..18].copy_from_slice(b"SPDK00000000000001");
        assert_eq!(
            super::generated_uuid(&sn, 7).to_string(),
            "e083a5ba-9f77-5a0a-b886-9125b2bf5fd5"
        );
        assert_ne!(super::generated_uuid(&sn, 8), super::generated_uuid(&sn, 7));
    }
}
