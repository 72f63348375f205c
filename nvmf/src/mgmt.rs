//! What the RPCs do to the target: transports and poll groups, subsystems, namespaces, listeners, hosts, ANA
//! states and referrals. Runs on the app thread; changes that the I/O path must see are pushed to every poll
//! group by message before the caller is answered, so a host that hears of a namespace can use it at once.

use std::rc::Rc;
use std::sync::Arc;

use reactor::CpuMask;

use crate::error::{Error, ErrorKind, Result};
use crate::params::{ListenerConfig, NamespaceParams, NvmfCreateSubsystem, NvmfSubsystemAddHost};
use crate::pg::{self, Pg, PgNs};
use crate::tgt::{self, AnaState, Listener, Ns, PgHandle, Referral, SubType, Trid};
use crate::transport::Transport;

fn not_found(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::NotFound, what)
}

fn subsystem(nqn: &str) -> Result<Arc<tgt::Subsystem>> {
    tgt::tgt()
        .find(nqn)
        .ok_or_else(|| not_found(format!("Unable to find subsystem with NQN {nqn}")))
}

/// Starts one poll group per core of `mask` (all reactor cores when `None`), once.
pub fn start_poll_groups(mask: Option<&CpuMask>) {
    if !tgt::tgt().pgs.is_empty() {
        return;
    }
    let cores: Vec<u32> = match mask {
        Some(m) => m.cores().filter(|c| reactor::cores().contains(c)).collect(),
        None => reactor::cores(),
    };
    let mut pgs = Vec::new();
    for (i, core) in cores.into_iter().enumerate() {
        let name = format!("nvmf_tgt_poll_group_{i:03}");
        let Some(t) = reactor::spawn_thread(&name, Some(&CpuMask::single(core))) else {
            continue;
        };
        t.send(move || {
            Pg::start(i);
        });
        pgs.push(PgHandle { id: i, thread: t });
    }
    log::info!("nvmf: {} poll groups", pgs.len());
    tgt::tgt().pgs = pgs;
}

/// `nvmf_create_transport` with options SPDK's checks accepted.
pub fn create_transport(
    opts: crate::params::TransportOpts,
    poll_groups_mask: Option<CpuMask>,
    done: impl FnOnce(Result<()>) + Send + 'static,
) {
    let trtype = opts.kind().name();
    let name = trtype.to_ascii_uppercase();
    {
        let t = tgt::tgt();
        if t.transports.iter().any(|x| x.name() == name) {
            done(Err(Error::new(
                ErrorKind::Exists,
                format!("Transport type '{name}' already exists"),
            )));
            return;
        }
    }
    let Some(ctor) = crate::transport::constructor(opts.kind()) else {
        done(Err(Error::new(
            ErrorKind::Invalid,
            format!("Transport type '{trtype}' is not supported by this build"),
        )));
        return;
    };
    // A transport that cannot start (RDMA without an RDMA device) fails here, as SPDK's `create` op does.
    let tr: Arc<dyn Transport> = match ctor(opts) {
        Ok(t) => t,
        Err(e) => {
            done(Err(e));
            return;
        }
    };
    start_poll_groups(poll_groups_mask.as_ref());
    let pgs = {
        let mut t = tgt::tgt();
        t.ensure_discovery();
        t.transports.push(tr.clone());
        t.pgs.clone()
    };
    pg::for_each(
        &pgs,
        move |pg| {
            tr.poll_group_start(pg);
        },
        move |_| done(Ok(())),
    );
}

/// The transport of type `trtype`.
pub fn transport(trtype: &str) -> Option<Arc<dyn Transport>> {
    tgt::tgt()
        .transports
        .iter()
        .find(|t| t.name().eq_ignore_ascii_case(trtype))
        .cloned()
}

/// `nvmf_create_subsystem`, with options already checked and normalized.
pub fn create_subsystem(o: NvmfCreateSubsystem) {
    let mut t = tgt::tgt();
    t.create_subsystem(o);
    tgt::discovery_changed(&mut t);
}

/// `nvmf_delete_subsystem`: its controllers are disconnected, its namespaces released.
pub fn delete_subsystem(nqn: &str, done: impl FnOnce(Result<()>) + Send + 'static) {
    let s = match subsystem(nqn) {
        Ok(s) if s.subtype == SubType::Nvme => s,
        Ok(_) => {
            done(Err(Error::new(
                ErrorKind::Invalid,
                "the discovery subsystem cannot be deleted",
            )));
            return;
        }
        Err(e) => {
            done(Err(e));
            return;
        }
    };
    let pgs = {
        let mut t = tgt::tgt();
        t.subsystems.retain(|x| !Arc::ptr_eq(x, &s));
        tgt::discovery_changed(&mut t);
        t.pgs.clone()
    };
    let (ctrlrs, ns) = {
        let mut st = s.state();
        st.listeners.clear();
        let ns: Vec<Ns> = st.ns.drain(..).flatten().collect();
        (std::mem::take(&mut st.ctrlrs), ns)
    };
    for c in ctrlrs {
        c.disconnect_all();
    }
    let id = s.id;
    pg::for_each(
        &pgs,
        move |pg| {
            pg.subsys.borrow_mut().remove(&id);
        },
        move |_| {
            // The poll groups hold no channel any more: the descriptors can close.
            drop(ns);
            done(Ok(()))
        },
    );
}

/// `nvmf_subsystem_add_listener`: the transport listens (if it does not already), the subsystem accepts
/// connections there.
pub fn add_listener(
    nqn: &str,
    trid: Trid,
    ana_state: AnaState,
    config: ListenerConfig,
) -> Result<()> {
    let s = subsystem(nqn)?;
    let tr = transport(&trid.trtype).ok_or_else(|| {
        Error::new(
            ErrorKind::Invalid,
            format!(
                "Unable to find {} transport. The transport must be created first.",
                trid.trtype
            ),
        )
    })?;
    if s.state().listeners.iter().any(|l| l.trid.same(&trid)) {
        return Err(Error::new(
            ErrorKind::Exists,
            format!("Listener {}:{} already exists", trid.traddr, trid.trsvcid),
        ));
    }
    tr.listen(&trid, config.tls())?;
    let mut t = tgt::tgt();
    // Port ids: the same address keeps its id across subsystems, as SPDK's listeners share a port.
    let existing = t
        .subsystems
        .iter()
        .flat_map(|x| x.state().listeners.clone())
        .find(|l| l.trid.same(&trid))
        .map(|l| l.portid);
    let portid = existing.unwrap_or_else(|| {
        let p = t.next_portid;
        t.next_portid = t.next_portid.wrapping_add(1);
        p
    });
    {
        let mut st = s.state();
        let groups = st.max_nsid.max(1) as usize;
        st.listeners.insert(
            0,
            Listener {
                trid,
                portid,
                ana_state: vec![ana_state; groups],
                config,
            },
        );
    }
    push_ana(&t, &s);
    tgt::discovery_changed(&mut t);
    Ok(())
}

/// `nvmf_subsystem_remove_listener`: connections through it are closed.
pub fn remove_listener(nqn: &str, trid: &Trid) -> Result<()> {
    let s = subsystem(nqn)?;
    {
        let mut st = s.state();
        let before = st.listeners.len();
        st.listeners.retain(|l| !l.trid.same(trid));
        if st.listeners.len() == before {
            return Err(not_found(format!(
                "Unable to find listener {}:{}",
                trid.traddr, trid.trsvcid
            )));
        }
        for c in st.ctrlrs.iter().filter(|c| c.listen.same(trid)) {
            c.disconnect_all();
        }
    }
    let mut t = tgt::tgt();
    let still_used = t
        .subsystems
        .iter()
        .any(|x| x.state().listeners.iter().any(|l| l.trid.same(trid)));
    if !still_used {
        if let Some(tr) = t
            .transports
            .iter()
            .find(|x| x.name().eq_ignore_ascii_case(&trid.trtype))
        {
            tr.stop_listen(trid);
        }
    }
    tgt::discovery_changed(&mut t);
    Ok(())
}

/// Sends a subsystem's ANA settings to every poll group.
fn push_ana(t: &tgt::Tgt, s: &tgt::Subsystem) {
    let (on, tables): (bool, Vec<(Trid, Vec<u8>)>) = {
        let st = s.state();
        (
            st.ana_reporting,
            st.listeners
                .iter()
                .map(|l| {
                    let codes = l.ana_state.iter().map(|a| a.code()).collect();
                    (l.trid.clone(), codes)
                })
                .collect(),
        )
    };
    let id = s.id;
    for p in &t.pgs {
        let tables = tables.clone();
        p.thread.send(move || {
            let Some(pg) = pg::current() else { return };
            let sub = pg.subsys(id);
            sub.ana_reporting.set(on);
            for (trid, states) in tables {
                *sub.ana_table(&trid).borrow_mut() = states;
            }
        });
    }
}

/// `nvmf_subsystem_listener_set_ana_state`: one group (`anagrpid`, 0 for all); the RPC checked the group and
/// that the subsystem reports ANA states.
pub fn set_ana_state(nqn: &str, trid: &Trid, state: AnaState, anagrpid: u32) -> Result<()> {
    let s = subsystem(nqn)?;
    let ctrlrs = {
        let mut st = s.state();
        let l = st
            .listeners
            .iter_mut()
            .find(|l| l.trid.same(trid))
            .ok_or_else(|| not_found("Unable to find listener."))?;
        for (g, a) in (1..).zip(l.ana_state.iter_mut()) {
            if anagrpid == 0 || anagrpid == g {
                *a = state;
            }
        }
        st.ctrlrs
            .iter()
            .filter(|c| c.listen.same(trid))
            .cloned()
            .collect::<Vec<_>>()
    };
    push_ana(&tgt::tgt(), &s);
    for c in ctrlrs {
        c.ana_changed();
    }
    Ok(())
}

/// `nvmf_subsystem_add_ns`: answers with the namespace id once every poll group has its channel.
pub fn add_ns(nqn: &str, o: NamespaceParams, done: impl FnOnce(Result<u32>) + Send + 'static) {
    match add_ns_inner(nqn, o) {
        Ok((s, nsid, desc, anagrpid, pgs)) => {
            let id = s.id;
            let restricted = s.state().ns(nsid).is_some_and(|n| n.params.no_auto_visible);
            pg::for_each(
                &pgs,
                move |pg| {
                    let sub = pg.subsys(id);
                    let mut t = sub.ns.borrow_mut();
                    if t.len() < nsid as usize {
                        t.resize(nsid as usize, None);
                    }
                    let ns = PgNs::new(nsid, anagrpid, &desc, restricted);
                    t[nsid as usize - 1] = Some(Rc::new(ns));
                },
                move |_| {
                    // Only the controllers that see it hear of it.
                    let ctrlrs = s.state().ctrlrs.clone();
                    for c in ctrlrs.iter().filter(|_| !restricted) {
                        c.ns_changed(nsid);
                    }
                    done(Ok(nsid))
                },
            );
        }
        Err(e) => done(Err(e)),
    }
}

type Added = (
    Arc<tgt::Subsystem>,
    u32,
    Arc<bdev::Desc>,
    u32,
    Vec<PgHandle>,
);

fn add_ns_inner(nqn: &str, o: NamespaceParams) -> Result<Added> {
    let s = subsystem(nqn)?;
    if s.subtype != SubType::Nvme {
        return Err(Error::new(
            ErrorKind::Invalid,
            "the discovery subsystem has no namespaces",
        ));
    }
    let name = o.bdev_name.clone();
    let weak_s = Arc::downgrade(&s);
    let ev: bdev::EventCb = Arc::new(move |e, b| {
        let Some(s) = weak_s.upgrade() else { return };
        let bname = b.name().to_string();
        let nqn = s.nqn.clone();
        let Some(app) = reactor::app_thread() else {
            return;
        };
        match e {
            bdev::BdevEvent::Remove => app.send(move || {
                let nsid = s
                    .state()
                    .active_ns()
                    .find(|n| n.bdev_name == bname)
                    .map(|n| n.nsid);
                if let Some(nsid) = nsid {
                    log::info!("nvmf: bdev {bname} removed: namespace {nsid} of {nqn} goes");
                    remove_ns(&nqn, nsid, |_| {});
                }
            }),
            bdev::BdevEvent::Resize => app.send(move || {
                let st = s.state();
                let nsid = st
                    .active_ns()
                    .find(|n| n.bdev_name == bname)
                    .map(|n| n.nsid);
                if let Some(nsid) = nsid {
                    for c in st.ctrlrs.clone() {
                        c.ns_changed(nsid);
                    }
                }
            }),
        }
    });
    let mut desc = bdev::open(&name, true, Some(ev)).map_err(|e| {
        Error::new(
            ErrorKind::NotFound,
            format!("Unable to add namespace: bdev {name}: {e}"),
        )
    })?;
    desc.claim(crate::CLAIM_MODULE).map_err(|e| {
        Error::new(
            ErrorKind::Invalid,
            format!(
                "Unable to add namespace: bdev {name} cannot be opened, error={}: {e}",
                -libc::EPERM
            ),
        )
    })?;
    let bdev_uuid = desc.bdev().uuid();
    let mut st = s.state();
    let max = st.max_nsid;
    let ns = o
        .resolve(max, |id| st.ns(id).is_some(), bdev_uuid)
        .map_err(|e| {
            Error::new(
                ErrorKind::Invalid,
                format!("Unable to add namespace: {}", e.message),
            )
        })?;
    let nsid = ns.nsid;
    let anagrpid = ns.anagrpid.unwrap_or(nsid);
    let uuid = ns.uuid.unwrap_or(bdev_uuid);
    if st.ns.len() < nsid as usize {
        st.ns.resize_with(nsid as usize, || None);
    }
    let groups = max as usize;
    for l in st.listeners.iter_mut() {
        if l.ana_state.len() < groups {
            l.ana_state.resize(groups, AnaState::Optimized);
        }
    }
    let desc = Arc::new(desc);
    st.ns[nsid as usize - 1] = Some(Ns {
        nsid,
        bdev_name: name,
        desc: desc.clone(),
        uuid,
        nguid: ns.nguid.map(|n| n.0).unwrap_or([0; 16]),
        eui64: ns.eui64.map(|e| e.0).unwrap_or([0; 8]),
        anagrpid,
        params: ns,
        hosts: Vec::new(),
    });
    drop(st);
    let t = tgt::tgt();
    push_ana(&t, &s);
    Ok((s, nsid, desc, anagrpid, t.pgs.clone()))
}

/// `nvmf_subsystem_remove_ns`.
pub fn remove_ns(nqn: &str, nsid: u32, done: impl FnOnce(Result<()>) + Send + 'static) {
    let s = match subsystem(nqn) {
        Ok(s) => s,
        Err(e) => {
            done(Err(e));
            return;
        }
    };
    let ns = {
        let mut st = s.state();
        match nsid
            .checked_sub(1)
            .and_then(|i| st.ns.get_mut(i as usize))
            .and_then(|n| n.take())
        {
            Some(n) => n,
            None => {
                done(Err(Error::new(
                    ErrorKind::Invalid,
                    format!("Invalid NSID {nsid}"),
                )));
                return;
            }
        }
    };
    let pgs = tgt::tgt().pgs.clone();
    let id = s.id;
    pg::for_each(
        &pgs,
        move |pg| {
            let sub = pg.subsys(id);
            let mut t = sub.ns.borrow_mut();
            if let Some(slot) = t.get_mut(nsid as usize - 1) {
                *slot = None;
            }
        },
        move |_| {
            let ctrlrs = s.state().ctrlrs.clone();
            for c in ctrlrs.iter().filter(|c| ns.visible_to(&c.hostnqn)) {
                c.ns_changed(nsid);
            }
            drop(ns);
            done(Ok(()))
        },
    );
}

/// `nvmf_ns_add_host` / `nvmf_ns_remove_host`: makes namespace `nsid` of a `no_auto_visible` namespace
/// visible (or not) to `host`; that host's controllers hear of the change by AEN. Answers once every poll group
/// applied it.
pub fn ns_visibility(
    nqn: &str,
    nsid: u32,
    host: &str,
    visible: bool,
    done: impl FnOnce(Result<()>) + Send + 'static,
) {
    let res = (|| {
        let s = subsystem(nqn)?;
        let mut st = s.state();
        let ns = nsid
            .checked_sub(1)
            .and_then(|i| st.ns.get_mut(i as usize))
            .and_then(|n| n.as_mut())
            .ok_or_else(|| not_found(format!("no namespace {nsid} in {nqn}")))?;
        if !ns.params.no_auto_visible {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "namespace {nsid} of {nqn} is visible to every host (no_auto_visible not set)"
                ),
            ));
        }
        let had = ns.hosts.iter().any(|h| h == host);
        if visible && !had {
            ns.hosts.push(host.to_string());
        } else if !visible {
            ns.hosts.retain(|h| h != host);
        }
        let hosts = ns.hosts.clone();
        let ctrlrs: Vec<_> = if had != visible {
            st.ctrlrs
                .iter()
                .filter(|c| c.hostnqn == host)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        drop(st);
        Ok((s.id, hosts, ctrlrs))
    })();
    let (id, hosts, ctrlrs) = match res {
        Ok(x) => x,
        Err(e) => return done(Err(e)),
    };
    let pgs = tgt::tgt().pgs.clone();
    pg::for_each(
        &pgs,
        move |pg| {
            let sub = pg.subsys(id);
            let t = sub.ns.borrow();
            if let Some(Some(ns)) = t.get(nsid as usize - 1) {
                *ns.hosts.borrow_mut() = hosts.clone();
            }
        },
        move |_| {
            for c in ctrlrs {
                c.ns_changed(nsid);
            }
            done(Ok(()))
        },
    );
}

/// `nvmf_subsystem_add_host` (the RPC made SPDK's checks; a host already allowed was answered there).
pub fn add_host(h: NvmfSubsystemAddHost, psk: Option<nvme_tls::ConfiguredPsk>) -> Result<()> {
    let s = subsystem(&h.nqn)?;
    {
        let mut st = s.state();
        if !st.hosts.iter().any(|x| x.host == h.host) {
            if let Some(k) = psk {
                st.tls_psks.push((h.host.clone(), k));
            }
            st.hosts.insert(0, h);
        }
    }
    tgt::discovery_changed(&mut tgt::tgt());
    Ok(())
}

/// `nvmf_subsystem_remove_host`: its controllers are disconnected.
pub fn remove_host(nqn: &str, host: &str) -> Result<()> {
    let s = subsystem(nqn)?;
    {
        let mut st = s.state();
        let before = st.hosts.len();
        st.hosts.retain(|h| h.host != host);
        st.tls_psks.retain(|(h, _)| h != host);
        if before == st.hosts.len() {
            return Err(not_found(format!("Host {host} not found")));
        }
        for c in st.ctrlrs.iter().filter(|c| c.hostnqn == host) {
            c.disconnect_all();
        }
    }
    tgt::discovery_changed(&mut tgt::tgt());
    Ok(())
}

/// `nvmf_subsystem_allow_any_host`.
pub fn allow_any_host(nqn: &str, allow: bool) -> Result<()> {
    let s = subsystem(nqn)?;
    s.state().allow_any_host = allow;
    tgt::discovery_changed(&mut tgt::tgt());
    Ok(())
}

/// `nvmf_discovery_add_referral` (the same referral again changes nothing, as SPDK).
pub fn add_referral(r: Referral) {
    let mut t = tgt::tgt();
    if !t.referrals.iter().any(|x| x.same(&r)) {
        t.referrals.insert(0, r);
        tgt::discovery_changed(&mut t);
    }
}

/// `nvmf_discovery_remove_referral`.
pub fn remove_referral(r: &Referral) -> Result<()> {
    let mut t = tgt::tgt();
    let i = t
        .referrals
        .iter()
        .position(|x| x.same(r))
        .ok_or_else(|| not_found("Referral not found"))?;
    t.referrals.remove(i);
    tgt::discovery_changed(&mut t);
    Ok(())
}

/// Shuts the target down (subsystem fini): every connection closes, poll groups stop, listeners close,
/// namespaces release their bdevs.
pub fn fini(done: impl FnOnce() + Send + 'static) {
    let (pgs, transports, subs) = {
        let mut t = tgt::tgt();
        (
            std::mem::take(&mut t.pgs),
            std::mem::take(&mut t.transports),
            std::mem::take(&mut t.subsystems),
        )
    };
    for tr in &transports {
        tr.shutdown();
    }
    let threads: Vec<_> = pgs.iter().map(|p| p.thread.clone()).collect();
    pg::for_each(
        &pgs,
        |pg| pg.stop(),
        move |_| {
            for s in subs {
                let mut st = s.state();
                st.ctrlrs.clear();
                st.ns.clear();
            }
            drop(transports);
            for t in threads {
                t.request_exit();
            }
            done()
        },
    );
}
