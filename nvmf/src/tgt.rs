//! The target's shared state: transports, subsystems (NVM and discovery), namespaces, listeners, allowed hosts,
//! referrals, controllers, and the poll groups.
//!
//! This state is touched on the control path only (RPCs on the app thread, Connect and admin commands on poll
//! group threads), under one lock, never by the I/O path: each poll group keeps its own copy of what I/O needs
//! (a namespace table with its own bdev channels, see [`crate::pg`]), updated by message when a namespace comes
//! or goes. Lock order: the target, then a subsystem, then a controller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use nvme_proto::fabrics::DISCOVERY_NQN;
use reactor::ThreadHandle;

pub use crate::params::address::{AdrFam, AnaState, Trid};
pub use crate::params::Referral;

/// The discovery log's transport type code of `t`.
pub fn trtype_code(t: &Trid) -> u8 {
    if t.trtype.eq_ignore_ascii_case("rdma") {
        1
    } else {
        3
    }
}

/// The discovery log's address family code of `t`.
pub fn adrfam_code(t: &Trid) -> u8 {
    match t.adrfam {
        AdrFam::Ipv4 => 1,
        AdrFam::Ipv6 => 2,
        AdrFam::Ib => 3,
        AdrFam::Fc => 4,
    }
}

/// Subsystem kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubType {
    /// An NVM subsystem.
    Nvme,
    /// The discovery subsystem ("current discovery subsystem" in discovery log entries).
    Discovery,
}

impl SubType {
    /// The discovery log's subsystem type code.
    pub fn code(self) -> u8 {
        match self {
            SubType::Nvme => 2,
            SubType::Discovery => 3,
        }
    }

    /// SPDK's name in `nvmf_get_subsystems`.
    pub fn name(self) -> &'static str {
        match self {
            SubType::Nvme => "NVMe",
            SubType::Discovery => "Discovery",
        }
    }
}

/// A listener of a subsystem: an address and, per ANA group, its state.
#[derive(Clone, Debug)]
pub struct Listener {
    /// The address.
    pub trid: Trid,
    /// Port id in discovery log entries.
    pub portid: u16,
    /// ANA state per ANA group (index anagrpid - 1).
    pub ana_state: Vec<AnaState>,
    /// What `save_config` writes for it.
    pub config: crate::params::ListenerConfig,
}

/// An exported namespace.
pub struct Ns {
    /// Namespace id.
    pub nsid: u32,
    /// The bdev's name as given.
    pub bdev_name: String,
    /// The open descriptor (claimed).
    pub desc: Arc<bdev::Desc>,
    /// UUID.
    pub uuid: uuid::Uuid,
    /// NGUID (zero: none).
    pub nguid: [u8; 16],
    /// EUI64 (zero: none).
    pub eui64: [u8; 8],
    /// ANA group.
    pub anagrpid: u32,
    /// The namespace as resolved (what `nvmf_get_subsystems` and `save_config` show).
    pub params: crate::params::NamespaceParams,
    /// Hosts it is visible to when created `no_auto_visible` (`nvmf_ns_add_host`).
    pub hosts: Vec<String>,
}

impl Ns {
    /// Whether `hostnqn`'s controllers see this namespace.
    pub fn visible_to(&self, hostnqn: &str) -> bool {
        !self.params.no_auto_visible || self.hosts.iter().any(|h| h == hostnqn)
    }
}

/// An NVM subsystem or the discovery subsystem.
pub struct Subsystem {
    /// Index in poll group tables.
    pub id: u32,
    /// NQN.
    pub nqn: String,
    /// Kind.
    pub subtype: SubType,
    /// Everything that changes.
    pub st: Mutex<SubsysState>,
}

/// The changing part of a subsystem.
pub struct SubsysState {
    /// The options it was created with (normalized), as `save_config` writes them.
    pub create: crate::params::NvmfCreateSubsystem,
    /// Serial number.
    pub serial_number: String,
    /// Model number.
    pub model_number: String,
    /// Any host may connect.
    pub allow_any_host: bool,
    /// ANA reporting.
    pub ana_reporting: bool,
    /// Highest namespace id the subsystem can hold (Identify's NN; `max_namespaces`).
    pub max_nsid: u32,
    /// Lowest controller id.
    pub min_cntlid: u16,
    /// Highest controller id.
    pub max_cntlid: u16,
    /// Next controller id to try.
    pub next_cntlid: u16,
    /// Allowed hosts, newest first (SPDK's order).
    pub hosts: Vec<crate::params::NvmfSubsystemAddHost>,
    /// The TLS PSKs of hosts added with one (`psk`), by host NQN.
    pub tls_psks: Vec<(String, nvme_tls::ConfiguredPsk)>,
    /// Listeners, newest first (SPDK's order).
    pub listeners: Vec<Listener>,
    /// Namespaces by nsid - 1.
    pub ns: Vec<Option<Ns>>,
    /// Live controllers.
    pub ctrlrs: Vec<Arc<crate::ctrlr::Ctrlr>>,
}

impl Subsystem {
    /// The state, locked.
    pub fn state(&self) -> MutexGuard<'_, SubsysState> {
        reactor::lock(&self.st)
    }

    /// Whether `hostnqn` may connect.
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        let st = self.state();
        st.allow_any_host || st.hosts.iter().any(|h| h.host == hostnqn)
    }

    /// Whether the subsystem accepts connections at `trid` (the discovery subsystem accepts them at any
    /// listener of the target, as SPDK still does).
    pub fn listener_allowed(&self, trid: &Trid) -> bool {
        self.subtype == SubType::Discovery
            || self.state().listeners.iter().any(|l| l.trid.same(trid))
    }
}

impl SubsysState {
    /// The ANA state of `anagrpid` at `trid` (optimized when not reported).
    pub fn ana_state(&self, trid: &Trid, anagrpid: u32) -> AnaState {
        self.listeners
            .iter()
            .find(|l| l.trid.same(trid))
            .and_then(|l| l.ana_state.get(anagrpid.checked_sub(1)? as usize).copied())
            .unwrap_or_default()
    }

    /// The namespace `nsid`, if active.
    pub fn ns(&self, nsid: u32) -> Option<&Ns> {
        self.ns
            .get(nsid.checked_sub(1)? as usize)
            .and_then(|n| n.as_ref())
    }

    /// Active namespaces in nsid order.
    pub fn active_ns(&self) -> impl Iterator<Item = &Ns> {
        self.ns.iter().flatten()
    }
}

/// A poll group, as the target knows it.
#[derive(Clone)]
pub struct PgHandle {
    /// Index.
    pub id: usize,
    /// Its thread.
    pub thread: ThreadHandle,
}

/// The whole target.
pub struct Tgt {
    /// Subsystems in creation order (the discovery subsystem first).
    pub subsystems: Vec<Arc<Subsystem>>,
    /// Transports in creation order.
    pub transports: Vec<Arc<dyn crate::transport::Transport>>,
    /// Referrals.
    pub referrals: Vec<Referral>,
    /// Poll groups.
    pub pgs: Vec<PgHandle>,
    /// Next poll group for a new connection.
    pub next_pg: usize,
    /// Next subsystem id.
    pub next_subsys_id: u32,
    /// Discovery log generation counter.
    pub discovery_genctr: u64,
    /// Next listener port id.
    pub next_portid: u16,
    /// Subsystem limit (`nvmf_set_max_subsystems`).
    pub max_subsystems: u32,
    /// Command retry delay times (`nvmf_set_crdt`), 100 ms units.
    pub crdt: [u16; 3],
    /// `discovery_filter` bits: 1 transport type, 2 address, 4 service id.
    pub discovery_filter: u32,
}

static TGT: LazyLock<Mutex<Tgt>> = LazyLock::new(|| {
    Mutex::new(Tgt {
        subsystems: Vec::new(),
        transports: Vec::new(),
        referrals: Vec::new(),
        pgs: Vec::new(),
        next_pg: 0,
        next_subsys_id: 0,
        discovery_genctr: 0,
        next_portid: 0,
        max_subsystems: 1024,
        crdt: [0; 3],
        discovery_filter: 0,
    })
});

/// The target, locked.
pub fn tgt() -> MutexGuard<'static, Tgt> {
    reactor::lock(&TGT)
}

/// Controller ids handed out so far, for statistics.
pub static CTRLRS_CREATED: AtomicU64 = AtomicU64::new(0);

impl Tgt {
    /// The subsystem named `nqn`.
    pub fn find(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.subsystems.iter().find(|s| s.nqn == nqn).cloned()
    }

    /// Makes sure the discovery subsystem exists (SPDK creates it with the target).
    pub fn ensure_discovery(&mut self) {
        if self.find(DISCOVERY_NQN).is_some() {
            return;
        }
        let id = self.next_subsys_id;
        self.next_subsys_id += 1;
        self.subsystems.insert(
            0,
            Arc::new(Subsystem {
                id,
                nqn: DISCOVERY_NQN.into(),
                subtype: SubType::Discovery,
                st: Mutex::new(SubsysState {
                    create: crate::params::NvmfCreateSubsystem::new(DISCOVERY_NQN),
                    serial_number: String::new(),
                    model_number: String::new(),
                    allow_any_host: true,
                    ana_reporting: false,
                    max_nsid: 0,
                    min_cntlid: 1,
                    max_cntlid: 0xffef,
                    next_cntlid: 1,
                    hosts: Vec::new(),
                    tls_psks: Vec::new(),
                    listeners: Vec::new(),
                    ns: Vec::new(),
                    ctrlrs: Vec::new(),
                }),
            }),
        );
    }

    /// Creates an NVM subsystem from normalized options (`NvmfCreateSubsystem::normalize` made SPDK's checks).
    pub fn create_subsystem(&mut self, o: crate::params::NvmfCreateSubsystem) -> Arc<Subsystem> {
        self.ensure_discovery();
        let id = self.next_subsys_id;
        self.next_subsys_id += 1;
        let s = Arc::new(Subsystem {
            id,
            nqn: o.nqn.clone(),
            subtype: SubType::Nvme,
            st: Mutex::new(SubsysState {
                serial_number: o.serial_number.clone(),
                model_number: o.model_number.clone(),
                allow_any_host: o.allow_any_host,
                ana_reporting: o.ana_reporting,
                max_nsid: o.max_namespaces,
                min_cntlid: o.min_cntlid,
                max_cntlid: o.max_cntlid,
                next_cntlid: o.min_cntlid,
                create: o,
                hosts: Vec::new(),
                tls_psks: Vec::new(),
                listeners: Vec::new(),
                ns: Vec::new(),
                ctrlrs: Vec::new(),
            }),
        });
        self.subsystems.push(s.clone());
        s
    }

    /// Picks the poll group for a new connection (round robin, as SPDK's default).
    pub fn next_poll_group(&mut self) -> Option<PgHandle> {
        if self.pgs.is_empty() {
            return None;
        }
        let pg = self.pgs[self.next_pg % self.pgs.len()].clone();
        self.next_pg = self.next_pg.wrapping_add(1);
        Some(pg)
    }

    /// The window at `offset` of the discovery log page for `hostnqn` connected through `source` (SPDK's
    /// `nvmf_generate_discovery_log`): an entry per listener of each subsystem the host may use (filtered by
    /// `discovery_filter`), then the referrals. Returns the page's full length.
    pub fn discovery_log(
        &self,
        hostnqn: &str,
        source: &Trid,
        max_aq_depth: u16,
        offset: u64,
        out: &mut [u8],
    ) -> u64 {
        use nvme_proto::identify::{set_nul_padded, set_space_padded};
        use nvme_proto::log::{encode_discovery_log, DiscoveryEntry};
        let f = self.discovery_filter;
        let matches = |t: &Trid| {
            (f & 1 == 0 || t.trtype.eq_ignore_ascii_case(&source.trtype))
                && (f & 2 == 0
                    || (t.adrfam == source.adrfam && t.traddr.eq_ignore_ascii_case(&source.traddr)))
                && (f & 4 == 0 || t.trsvcid.eq_ignore_ascii_case(&source.trsvcid))
        };
        let entry = |trid: &Trid, subtype: u8, treq: u8, portid: u16, eflags: u16, nqn: &str| {
            let mut e = DiscoveryEntry {
                trtype: trtype_code(trid),
                adrfam: adrfam_code(trid),
                subtype,
                treq,
                portid,
                cntlid: 0xffff,
                asqsz: max_aq_depth,
                eflags,
                ..Default::default()
            };
            // Over-long values were refused when the listener or referral was added.
            let _ = set_space_padded(&mut e.trsvcid, &trid.trsvcid);
            let _ = set_space_padded(&mut e.traddr, &trid.traddr);
            let _ = set_nul_padded(&mut e.subnqn, nqn);
            if e.trtype == 1 {
                // RDMA: reliable connected, no provider type, RDMA CM (SPDK's `nvmf_rdma_discover`).
                nvme_proto::rdma::tsas::encode(&mut e.tsas);
            }
            e
        };
        let mut entries = Vec::new();
        for s in &self.subsystems {
            if !s.host_allowed(hostnqn) {
                continue;
            }
            let st = s.state();
            for l in st.listeners.iter().filter(|l| matches(&l.trid)) {
                // The current discovery subsystem: duplicate returned information, explicit persistent
                // connections supported.
                let eflags = if s.subtype == SubType::Discovery {
                    0x3
                } else {
                    0
                };
                // TREQ: secure channel required at a TLS listener, not required elsewhere.
                let treq = if l.config.tls() { 0x1 } else { 0x2 };
                entries.push(entry(
                    &l.trid,
                    s.subtype.code(),
                    treq,
                    l.portid,
                    eflags,
                    &s.nqn,
                ));
            }
        }
        for r in &self.referrals {
            let subtype = if r.subnqn == DISCOVERY_NQN { 1 } else { 2 };
            let treq = if r.secure_channel { 0x1 } else { 0x2 };
            entries.push(entry(&r.address, subtype, treq, 0, 0, &r.subnqn));
        }
        encode_discovery_log(self.discovery_genctr, &entries, offset, out)
    }
}

/// Bumps the discovery generation and tells discovery controllers (SPDK's `nvmf_update_discovery_log`).
pub fn discovery_changed(t: &mut Tgt) {
    t.discovery_genctr += 1;
    if let Some(d) = t.find(DISCOVERY_NQN) {
        let ctrlrs = d.state().ctrlrs.clone();
        for c in ctrlrs {
            c.notify_discovery_change();
        }
    }
}

/// Counts a new controller.
pub fn count_ctrlr() {
    CTRLRS_CREATED.fetch_add(1, Ordering::Relaxed);
}
