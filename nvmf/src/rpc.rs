//! SPDK's NVMe-oF RPCs (lib/nvmf/nvmf_rpc.c, module/event/subsystems/nvmf/nvmf_rpc.c) on the target, and the
//! `nvmf` section of `save_config`. Parameters, checks and answers are [`crate::params`]'s (SPDK's, captured
//! from v24.05); what the calls do is [`crate::mgmt`]'s.

use std::rc::Rc;
use std::sync::{LazyLock, Mutex};

use jsonrpc::{Registry, Responder, RpcError, STATE_RUNTIME, STATE_STARTUP};
use serde_json::{json, Value};
use subsystems::nvmf::{NvmfConfig, NvmfCrdt, NvmfMaxSubsystems};

use crate::mgmt;
use crate::params::errors::{self, subsystem_not_found, target_not_found};
use crate::params::nqn::DISCOVERY_NQN;
use crate::params::stats::{poll_group_name, TransportPollGroupStat};
use crate::params::*;
use crate::tgt::{self, SubType};

/// The option methods' state (`nvmf_set_config`, `nvmf_set_max_subsystems`, `nvmf_set_crdt`).
struct Options {
    config: NvmfConfig,
    max_subsystems: NvmfMaxSubsystems,
    max_subsystems_set: bool,
    crdt: NvmfCrdt,
}

static OPTIONS: LazyLock<Mutex<Options>> = LazyLock::new(|| {
    Mutex::new(Options {
        config: NvmfConfig::default(),
        max_subsystems: NvmfMaxSubsystems::default().effective(),
        max_subsystems_set: false,
        crdt: NvmfCrdt::default(),
    })
});

fn options() -> std::sync::MutexGuard<'static, Options> {
    reactor::lock(&OPTIONS)
}

/// Decodes `T`'s parameters and checks `tgt_name`, as every SPDK handler starts.
fn start<T: NvmfMethod>(
    method: &str,
    params: Option<Value>,
    tgt: impl Fn(&T) -> Option<&str>,
) -> Result<T, RpcError> {
    let p: T = decode_method(params)?;
    if !is_this_target(tgt(&p)) {
        return Err(target_not_found(method, tgt(&p)));
    }
    Ok(p)
}

fn subsystem(method: &str, nqn: &str) -> Result<std::sync::Arc<tgt::Subsystem>, RpcError> {
    tgt::tgt()
        .find(nqn)
        .filter(|s| s.subtype == SubType::Nvme || method == "nvmf_subsystem_add_listener")
        .ok_or_else(|| subsystem_not_found(method, nqn))
}

fn log_err(e: crate::Error) -> crate::Error {
    log::error!("{e}");
    e
}

type Sync = fn(&str, Option<Value>) -> Result<Value, RpcError>;
type Async = fn(&'static str, Option<Value>, Responder);

/// Registers every method.
pub fn register(reg: &mut Registry) {
    let sync: &[(&'static str, u32, Sync)] = &[
        ("nvmf_set_config", STATE_STARTUP, set_config),
        ("nvmf_set_max_subsystems", STATE_STARTUP, set_max_subsystems),
        ("nvmf_set_crdt", STATE_STARTUP, set_crdt),
        ("nvmf_get_transports", STATE_RUNTIME, get_transports),
        ("nvmf_create_subsystem", STATE_RUNTIME, create_subsystem),
        ("nvmf_subsystem_add_listener", STATE_RUNTIME, add_listener),
        (
            "nvmf_subsystem_remove_listener",
            STATE_RUNTIME,
            remove_listener,
        ),
        (
            "nvmf_subsystem_listener_set_ana_state",
            STATE_RUNTIME,
            set_ana_state,
        ),
        ("nvmf_subsystem_add_host", STATE_RUNTIME, add_host),
        ("nvmf_subsystem_remove_host", STATE_RUNTIME, remove_host),
        (
            "nvmf_subsystem_allow_any_host",
            STATE_RUNTIME,
            allow_any_host,
        ),
        ("nvmf_discovery_add_referral", STATE_RUNTIME, add_referral),
        (
            "nvmf_discovery_remove_referral",
            STATE_RUNTIME,
            remove_referral,
        ),
        ("nvmf_discovery_get_referrals", STATE_RUNTIME, get_referrals),
        ("nvmf_get_subsystems", STATE_RUNTIME, get_subsystems),
        ("nvmf_subsystem_get_listeners", STATE_RUNTIME, get_listeners),
        (
            "nvmf_subsystem_get_controllers",
            STATE_RUNTIME,
            get_controllers,
        ),
    ];
    for &(name, mask, f) in sync {
        reg.register(
            name,
            mask,
            Rc::new(move |p, r: Responder| r.respond(f(name, p))),
        );
    }
    let asynchronous: &[(&'static str, u32, Async)] = &[
        ("nvmf_create_transport", STATE_RUNTIME, create_transport),
        ("nvmf_delete_subsystem", STATE_RUNTIME, delete_subsystem),
        ("nvmf_subsystem_add_ns", STATE_RUNTIME, add_ns),
        ("nvmf_subsystem_remove_ns", STATE_RUNTIME, remove_ns),
        ("nvmf_subsystem_get_qpairs", STATE_RUNTIME, get_qpairs),
        ("nvmf_get_stats", STATE_RUNTIME, get_stats),
        ("nvmf_ns_add_host", STATE_RUNTIME, ns_add_host),
        ("nvmf_ns_remove_host", STATE_RUNTIME, ns_remove_host),
    ];
    for &(name, mask, f) in asynchronous {
        reg.register(name, mask, Rc::new(move |p, r: Responder| f(name, p, r)));
    }
}

fn set_config(_m: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let mut o = options();
    let mut c = subsystems::decode_over(&o.config, params)?;
    let cores = reactor::options()
        .and_then(|opts| subsystems::cpuset::CpuSet::parse(&opts.cpumask.to_string()));
    c.normalize(cores.as_ref())?;
    o.config = c;
    Ok(Value::Bool(true))
}

fn set_max_subsystems(_m: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let mut o = options();
    if o.max_subsystems_set {
        return Err(RpcError::invalid_params("Invalid parameters"));
    }
    let p: NvmfMaxSubsystems = subsystems::decode(params)?;
    o.max_subsystems_set = p.max_subsystems != 0;
    o.max_subsystems = p.effective();
    tgt::tgt().max_subsystems = o.max_subsystems.max_subsystems;
    Ok(Value::Bool(true))
}

fn set_crdt(_m: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let p: NvmfCrdt = subsystems::decode(params)?;
    tgt::tgt().crdt = [p.crdt1, p.crdt2, p.crdt3];
    options().crdt = p;
    Ok(Value::Bool(true))
}

/// `discovery_filter` as the target's match bits (1 transport type, 2 address, 4 service id).
fn discovery_filter_bits(s: &str) -> u32 {
    s.split(',')
        .map(|f| match f.trim() {
            "transport" => 1,
            "address" => 2,
            "svcid" => 4,
            _ => 0,
        })
        .fold(0, |a, b| a | b)
}

fn create_transport(method: &'static str, params: Option<Value>, r: Responder) {
    let res = (|| {
        let p: NvmfCreateTransport = start(method, params, |p: &NvmfCreateTransport| {
            p.tgt_name.as_deref()
        })?;
        let kind = p.kind(&crate::transport::registered_kinds())?;
        if mgmt::transport(kind.name()).is_some() {
            return Err(p.exists_error());
        }
        let env = TransportEnv {
            cores: reactor::cores().len().max(1) as u32,
            ..Default::default()
        };
        let opts = p.options(kind, &env)?;
        let (mask, filter) = {
            let o = options();
            let mask = o
                .config
                .poll_groups_mask
                .as_deref()
                .and_then(|m| reactor::CpuMask::parse(&format!("0x{m}")).ok());
            (mask, discovery_filter_bits(&o.config.discovery_filter))
        };
        tgt::tgt().discovery_filter = filter;
        Ok((opts, mask, kind))
    })();
    match res {
        Ok((opts, mask, kind)) => mgmt::create_transport(opts, mask, move |res| match res {
            Ok(()) => r.ok(Value::Bool(true)),
            Err(e) => {
                log::error!("{e}");
                r.err(RpcError::internal(format!(
                    "Transport type '{}' create failed",
                    kind.name()
                )))
            }
        }),
        Err(e) => r.err(e),
    }
}

fn get_transports(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let p: NvmfGetTransports = start(method, params, |p: &NvmfGetTransports| {
        p.tgt_name.as_deref()
    })?;
    let list: Vec<TransportOpts> = tgt::tgt()
        .transports
        .iter()
        .map(|t| t.params().clone())
        .filter(|t| p.selects(t))
        .collect();
    if p.trtype.is_some() && list.is_empty() {
        return Err(errors::no_such_device());
    }
    Ok(serde_json::to_value(list).unwrap_or_default())
}

fn create_subsystem(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let mut p: NvmfCreateSubsystem = start(method, params, |p: &NvmfCreateSubsystem| {
        p.tgt_name.as_deref()
    })?;
    let (exists, count, max) = {
        let mut t = tgt::tgt();
        t.ensure_discovery();
        (
            t.find(&p.nqn).is_some(),
            t.subsystems.len(),
            t.max_subsystems,
        )
    };
    p.normalize(exists, count, max)?;
    mgmt::create_subsystem(p);
    Ok(Value::Bool(true))
}

fn delete_subsystem(method: &'static str, params: Option<Value>, r: Responder) {
    let p: NvmfDeleteSubsystem = match start(method, params, |p: &NvmfDeleteSubsystem| {
        p.tgt_name.as_deref()
    }) {
        Ok(p) => p,
        Err(e) => return r.err(e),
    };
    if tgt::tgt()
        .find(&p.nqn)
        .is_none_or(|s| s.subtype != SubType::Nvme)
    {
        return r.err(errors::invalid_params());
    }
    mgmt::delete_subsystem(&p.nqn, move |res| match res {
        Ok(()) => r.ok(Value::Bool(true)),
        Err(e) => {
            log::error!("{e}");
            r.err(errors::invalid_params())
        }
    });
}

fn add_ns(method: &'static str, params: Option<Value>, r: Responder) {
    let p: NvmfSubsystemAddNs = match start(method, params, |p: &NvmfSubsystemAddNs| {
        p.tgt_name.as_deref()
    }) {
        Ok(p) => p,
        Err(e) => return r.err(e),
    };
    if let Err(e) = subsystem(method, &p.nqn) {
        return r.err(e);
    }
    mgmt::add_ns(&p.nqn, p.namespace, move |res| match res {
        Ok(nsid) => r.ok(json!(nsid)),
        Err(e) => {
            log::error!("{e}");
            log::error!("Unable to add namespace");
            r.err(errors::invalid_params())
        }
    });
}

fn remove_ns(method: &'static str, params: Option<Value>, r: Responder) {
    let p: NvmfSubsystemRemoveNs = match start(method, params, |p: &NvmfSubsystemRemoveNs| {
        p.tgt_name.as_deref()
    }) {
        Ok(p) => p,
        Err(e) => return r.err(e),
    };
    if let Err(e) = subsystem(method, &p.nqn) {
        return r.err(e);
    }
    mgmt::remove_ns(&p.nqn, p.nsid, move |res| match res {
        Ok(()) => r.ok(Value::Bool(true)),
        Err(e) => {
            log::error!("{e}");
            r.err(errors::invalid_params())
        }
    });
}

fn ns_add_host(method: &'static str, params: Option<Value>, r: Responder) {
    ns_visibility(method, params, r, true)
}

fn ns_remove_host(method: &'static str, params: Option<Value>, r: Responder) {
    ns_visibility(method, params, r, false)
}

/// `nvmf_ns_add_host` / `nvmf_ns_remove_host`: SPDK answers "Invalid parameters" for an unknown subsystem,
/// namespace or a namespace visible to all, and for an invalid host NQN.
fn ns_visibility(method: &'static str, params: Option<Value>, r: Responder, visible: bool) {
    let p: NvmfNsVisibility =
        match start(method, params, |p: &NvmfNsVisibility| p.tgt_name.as_deref()) {
            Ok(p) => p,
            Err(e) => return r.err(e),
        };
    if let Err(e) = subsystem(method, &p.nqn) {
        return r.err(e);
    }
    if !nqn_is_valid(&p.host) {
        log::error!("Unable to add/remove {} to namespace ID {}", p.host, p.nsid);
        return r.err(errors::invalid_params());
    }
    mgmt::ns_visibility(&p.nqn, p.nsid, &p.host, visible, move |res| match res {
        Ok(()) => r.ok(Value::Bool(true)),
        Err(e) => {
            log::error!("{e}");
            r.err(errors::invalid_params())
        }
    });
}

fn add_listener(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let p: NvmfSubsystemAddListener = start(method, params, |p: &NvmfSubsystemAddListener| {
        p.tgt_name.as_deref()
    })?;
    let s = subsystem(method, &p.nqn)?;
    let allow_any = s.state().allow_any_host;
    let (trid, ana) = p.check(allow_any)?;
    let config = p.config(trid.clone());
    mgmt::add_listener(&p.nqn, trid, ana, config)
        .map_err(log_err)
        .map_err(|_| errors::invalid_params())?;
    Ok(Value::Bool(true))
}

fn remove_listener(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let p: NvmfSubsystemRemoveListener =
        start(method, params, |p: &NvmfSubsystemRemoveListener| {
            p.tgt_name.as_deref()
        })?;
    subsystem(method, &p.nqn)?;
    let trid = p.listen_address.to_trid()?;
    if mgmt::transport(&trid.trtype).is_none() {
        return Err(errors::invalid_params());
    }
    mgmt::remove_listener(&p.nqn, &trid)
        .map_err(log_err)
        .map_err(|_| errors::invalid_params())?;
    Ok(Value::Bool(true))
}

fn set_ana_state(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let p: NvmfSubsystemListenerSetAnaState =
        start(method, params, |p: &NvmfSubsystemListenerSetAnaState| {
            p.tgt_name.as_deref()
        })?;
    let s = subsystem(method, &p.nqn)?;
    let (trid, ana) = p.check()?;
    {
        let st = s.state();
        let exists = st.listeners.iter().any(|l| l.trid.same(&trid));
        p.check_subsystem(st.ana_reporting, st.max_nsid, exists)?;
    }
    mgmt::set_ana_state(&p.nqn, &trid, ana, p.anagrpid)
        .map_err(log_err)
        .map_err(|_| RpcError::internal(format!("error setting ANA state: {}", -libc::EINVAL)))?;
    Ok(Value::Bool(true))
}

fn add_host(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let p: NvmfSubsystemAddHost = start(method, params, |p: &NvmfSubsystemAddHost| {
        p.tgt_name.as_deref()
    })?;
    let s = subsystem(method, &p.nqn)?;
    let allowed = s.state().hosts.iter().any(|h| h.host == p.host);
    // No keyring yet: a named key is never found (SPDK answers the same for an unknown key).
    if p.check(|_| false, allowed)? {
        // SPDK's TCP transport takes the PSK (a keyring key, or a key file): one it cannot read or parse
        // fails the whole call ("Unable to add host to TCP transport").
        let psk = match &p.psk {
            None => None,
            Some(name) => {
                let text = subsystems::keyring::read_psk(name).map_err(|(_, why)| {
                    log::error!("Could not retrieve PSK {name}: {why}");
                    errors::internal_error()
                })?;
                let k = nvme_tls::ConfiguredPsk::parse(&text).map_err(|e| {
                    log::error!("Failed to parse PSK interchange {name}: {e}");
                    errors::internal_error()
                })?;
                Some(k)
            }
        };
        mgmt::add_host(p, psk)
            .map_err(log_err)
            .map_err(|_| errors::internal_error())?;
    }
    Ok(Value::Bool(true))
}

fn remove_host(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let p: NvmfSubsystemRemoveHost = start(method, params, |p: &NvmfSubsystemRemoveHost| {
        p.tgt_name.as_deref()
    })?;
    subsystem(method, &p.nqn)?;
    mgmt::remove_host(&p.nqn, &p.host).map_err(|_| p.not_allowed_error())?;
    Ok(Value::Bool(true))
}

fn allow_any_host(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let p: NvmfSubsystemAllowAnyHost = start(method, params, |p: &NvmfSubsystemAllowAnyHost| {
        p.tgt_name.as_deref()
    })?;
    subsystem(method, &p.nqn)?;
    mgmt::allow_any_host(&p.nqn, p.allow_any_host)
        .map_err(log_err)
        .map_err(|_| errors::invalid_params())?;
    Ok(Value::Bool(true))
}

fn add_referral(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let p: NvmfDiscoveryAddReferral = start(method, params, |p: &NvmfDiscoveryAddReferral| {
        p.tgt_name.as_deref()
    })?;
    mgmt::add_referral(p.referral()?);
    Ok(Value::Bool(true))
}

fn remove_referral(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let p: NvmfDiscoveryRemoveReferral =
        start(method, params, |p: &NvmfDiscoveryRemoveReferral| {
            p.tgt_name.as_deref()
        })?;
    let r = p.referral()?;
    mgmt::remove_referral(&r).map_err(|_| p.not_found_error())?;
    Ok(Value::Bool(true))
}

fn get_referrals(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    start(method, params, |p: &NvmfGetReferrals| p.tgt_name.as_deref())?;
    Ok(serde_json::to_value(&tgt::tgt().referrals).unwrap_or_default())
}

/// A subsystem as `nvmf_get_subsystems` lists it.
fn subsystem_info(s: &tgt::Subsystem) -> SubsystemInfo {
    let st = s.state();
    let listeners: Vec<Trid> = st.listeners.iter().map(|l| l.trid.clone()).collect();
    let hosts: Vec<HostInfo> = st.hosts.iter().map(|h| h.info()).collect();
    if s.subtype == SubType::Discovery {
        return SubsystemInfo::discovery(listeners, hosts);
    }
    let ns = st
        .active_ns()
        .map(|n| NamespaceInfo::new(&n.params, st.ana_reporting))
        .collect();
    SubsystemInfo::nvme(&st.create, st.allow_any_host, listeners, hosts, ns)
}

/// The subsystems in SPDK's order (by NQN).
fn sorted_subsystems() -> Vec<std::sync::Arc<tgt::Subsystem>> {
    let mut t = tgt::tgt();
    t.ensure_discovery();
    let mut v = t.subsystems.clone();
    v.sort_by(|a, b| crate::params::subsystem::nqn_order(&a.nqn, &b.nqn));
    v
}

fn get_subsystems(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let p: NvmfGetSubsystems = start(method, params, |p: &NvmfGetSubsystems| {
        p.tgt_name.as_deref()
    })?;
    let mut all: Vec<SubsystemInfo> = sorted_subsystems()
        .iter()
        .filter(|s| p.nqn.as_ref().is_none_or(|n| *n == s.nqn))
        .map(|s| subsystem_info(s))
        .collect();
    if let Some(nqn) = &p.nqn {
        if all.is_empty() {
            return Err(subsystem_not_found(method, nqn));
        }
    }
    // The discovery subsystem first, as SPDK lists it.
    all.sort_by_key(|s| s.nqn != DISCOVERY_NQN);
    Ok(serde_json::to_value(all).unwrap_or_default())
}

fn query(method: &str, params: Option<Value>) -> Result<std::sync::Arc<tgt::Subsystem>, RpcError> {
    let p: NvmfSubsystemQuery = start(method, params, |p: &NvmfSubsystemQuery| {
        p.tgt_name.as_deref()
    })?;
    tgt::tgt()
        .find(&p.nqn)
        .ok_or_else(|| subsystem_not_found(method, &p.nqn))
}

fn get_listeners(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let s = query(method, params)?;
    let st = s.state();
    let list: Vec<ListenerInfo> = st
        .listeners
        .iter()
        .map(|l| ListenerInfo::new(l.trid.clone(), st.ana_reporting, &l.ana_state))
        .collect();
    Ok(serde_json::to_value(list).unwrap_or_default())
}

fn get_controllers(method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let s = query(method, params)?;
    let ctrlrs = s.state().ctrlrs.clone();
    let list: Vec<ControllerInfo> = ctrlrs.iter().map(|c| c.info()).collect();
    Ok(serde_json::to_value(list).unwrap_or_default())
}

fn get_qpairs(method: &'static str, params: Option<Value>, r: Responder) {
    let s = match query(method, params) {
        Ok(s) => s,
        Err(e) => return r.err(e),
    };
    let nqn = s.nqn.clone();
    let pgs = tgt::tgt().pgs.clone();
    crate::pg::for_each(
        &pgs,
        move |pg| {
            pg.qpairs()
                .iter()
                .filter_map(|q| q.info())
                .filter(|(n, _)| *n == nqn)
                .map(|(_, v)| v)
                .collect::<Vec<QpairInfo>>()
        },
        move |lists| {
            let all: Vec<QpairInfo> = lists.into_iter().flatten().collect();
            r.ok(serde_json::to_value(all).unwrap_or_default())
        },
    );
}

fn get_stats(method: &'static str, params: Option<Value>, r: Responder) {
    if let Err(e) = start(method, params, |p: &NvmfGetStats| p.tgt_name.as_deref()) {
        return r.err(e);
    }
    let (pgs, trtypes) = {
        let t = tgt::tgt();
        let tr: Vec<String> = t.transports.iter().map(|t| t.name().to_string()).collect();
        (t.pgs.clone(), tr)
    };
    crate::pg::for_each(
        &pgs,
        move |pg| {
            let s = &pg.stats;
            PollGroupStat {
                name: poll_group_name(pg.id as u32),
                admin_qpairs: s.admin_qpairs.get() as u32,
                io_qpairs: s.io_qpairs.get() as u32,
                current_admin_qpairs: s.current_admin_qpairs.get() as u32,
                current_io_qpairs: s.current_io_qpairs.get() as u32,
                pending_bdev_io: s.pending_bdev_io.get(),
                completed_nvme_io: s.completed_nvme_io.get(),
                transports: trtypes
                    .iter()
                    .map(|t| TransportPollGroupStat { trtype: t.clone() })
                    .collect(),
            }
        },
        move |groups| {
            r.ok(serde_json::to_value(Stats {
                tick_rate: reactor::ticks::rate(),
                poll_groups: groups,
            })
            .unwrap_or_default())
        },
    );
}

/// The `nvmf` section of `save_config`.
pub fn config_json() -> Value {
    let o = options();
    let cfg = {
        let t = tgt::tgt();
        let mut subs: Vec<SubsystemConfig> = Vec::new();
        for s in t.subsystems.iter().filter(|s| s.subtype == SubType::Nvme) {
            let st = s.state();
            subs.push(SubsystemConfig {
                nqn: s.nqn.clone(),
                create: Some(st.create.clone()),
                hosts: st.hosts.clone(),
                namespaces: st.active_ns().map(|n| n.params.clone()).collect(),
                listeners: st.listeners.iter().map(|l| l.config.clone()).collect(),
            });
        }
        NvmfSaveConfig {
            transports: t.transports.iter().map(|x| x.params().clone()).collect(),
            referrals: t.referrals.clone(),
            subsystems: subs,
        }
    };
    Value::Array(cfg.entries(&o.config, &o.max_subsystems, &o.crdt))
}
