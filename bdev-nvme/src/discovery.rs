//! Discovery services (`bdev_nvme_start_discovery`, `_stop_discovery`, `_get_discovery_info`), as SPDK's: a
//! connection to a discovery controller whose log page lists NVM subsystems; each one listed is attached (named
//! `<name><index>`, or as one more path of the controller already attached for the same subsystem NQN), each
//! one that leaves the log is detached, and the log is read again on every discovery change notice. Discovery
//! entries (referrals, and the discovery subsystem's own) are reported as referrals.
//!
//! Controllers made by a discovery service are not written by `save_config`: the `bdev_nvme_start_discovery`
//! entry makes them again, as SPDK does.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use errors::{Error, ErrorKind, Result};
use jsonrpc::RpcError;
use nvme_host::{Controller, CtrlrOpts};
use nvme_proto::fabrics::DISCOVERY_NQN;
use nvme_proto::identify::padded_str;
use nvme_proto::log::{adrfam, subtype, trtype, DiscoveryEntry};
use reactor::Poller;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{attach, detach, trid_json, AttachParams, PathFilter};

/// `bdev_nvme_start_discovery` parameters.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct StartParams {
    /// Prefix of the controllers' names.
    pub name: String,
    /// Transport of the discovery service.
    pub trtype: String,
    /// Its address.
    pub traddr: String,
    /// `IPv4` or `IPv6`.
    #[serde(default)]
    pub adrfam: Option<String>,
    /// Its port (SPDK's default 8009 is not assumed: SPDK's client requires it for TCP).
    #[serde(default)]
    pub trsvcid: Option<String>,
    /// Host NQN for it and the controllers.
    #[serde(default)]
    pub hostnqn: Option<String>,
    /// Answer once the subsystems listed first are attached.
    #[serde(default)]
    pub wait_for_attach: Option<bool>,
    /// Give up waiting for them after this long (implies waiting).
    #[serde(default)]
    pub attach_timeout_ms: Option<u64>,
    /// Reconnect knobs of the controllers made.
    #[serde(default)]
    pub ctrlr_loss_timeout_sec: Option<i32>,
    /// Reconnect knobs of the controllers made.
    #[serde(default)]
    pub reconnect_delay_sec: Option<u32>,
    /// Reconnect knobs of the controllers made.
    #[serde(default)]
    pub fast_io_fail_timeout_sec: Option<u32>,
}

/// One NVM subsystem path the log listed and a controller was attached for.
struct NvmEntry {
    subnqn: String,
    traddr: String,
    trsvcid: String,
    /// The controller name it is a path of.
    ctrlr: String,
}

impl NvmEntry {
    /// Detaches this path of its controller (the controller goes with its last path).
    fn detach(self) {
        let f = PathFilter {
            traddr: Some(self.traddr),
            trsvcid: Some(self.trsvcid),
            subnqn: Some(self.subnqn),
            ..Default::default()
        };
        detach(&self.ctrlr, Some(f), |_| {});
    }
}

/// A running discovery service (app thread).
struct Discovery {
    params: StartParams,
    opts: CtrlrOpts,
    ctrlr: Option<Controller>,
    nvm: Vec<NvmEntry>,
    /// Discovery entries of the last log: (adrfam, traddr, trsvcid).
    referrals: Vec<(u8, String, String)>,
    index: u32,
    /// A log read is in progress; `again`: another change came meanwhile.
    reading: bool,
    again: bool,
    /// Reconnects a lost discovery controller.
    _watch: Poller,
    next_attempt: Instant,
    connecting: bool,
}

thread_local! {
    static DISCOVERIES: RefCell<Vec<Discovery>> = const { RefCell::new(Vec::new()) };
}

/// Where `start` reports.
type StartDone = Box<dyn FnOnce(std::result::Result<(), RpcError>)>;

fn with<R>(name: &str, f: impl FnOnce(&mut Discovery) -> R) -> Option<R> {
    DISCOVERIES.with(|d| {
        d.borrow_mut()
            .iter_mut()
            .find(|d| d.params.name == name)
            .map(f)
    })
}

/// The attach parameters of the discovery controller or of a subsystem it lists.
fn attach_params(
    p: &StartParams,
    name: &str,
    subnqn: &str,
    traddr: &str,
    trsvcid: &str,
    fam: &str,
) -> Result<AttachParams> {
    let mut v = json!({
        "name": name, "trtype": "tcp", "traddr": traddr, "adrfam": fam, "trsvcid": trsvcid, "subnqn": subnqn,
        "multipath": "multipath",
    });
    let o = v.as_object_mut().expect("an object");
    if let Some(h) = &p.hostnqn {
        o.insert("hostnqn".into(), json!(h));
    }
    for (k, val) in [
        (
            "ctrlr_loss_timeout_sec",
            p.ctrlr_loss_timeout_sec.map(i64::from),
        ),
        ("reconnect_delay_sec", p.reconnect_delay_sec.map(i64::from)),
        (
            "fast_io_fail_timeout_sec",
            p.fast_io_fail_timeout_sec.map(i64::from),
        ),
    ] {
        if let Some(x) = val {
            o.insert(k.into(), json!(x));
        }
    }
    serde_json::from_value(v).map_err(|e| Error::new(ErrorKind::Invalid, e.to_string()))
}

/// `bdev_nvme_start_discovery`: connects to the discovery controller and attaches what its log lists; `done`
/// answers at once, or once those attaches are done with `wait_for_attach` (SPDK's errno answers: a name or
/// service already in use -EEXIST).
pub fn start(p: StartParams, done: impl FnOnce(std::result::Result<(), RpcError>) + 'static) {
    if !p.trtype.eq_ignore_ascii_case("tcp") {
        return done(Err(RpcError::new(
            -libc::EINVAL,
            format!("Failed to parse trtype: {}", p.trtype),
        )));
    }
    let fam = p.adrfam.clone().unwrap_or_else(|| "ipv4".into());
    let port = p.trsvcid.clone().unwrap_or_else(|| "8009".into());
    let opts = match attach_params(&p, &p.name, DISCOVERY_NQN, &p.traddr, &port, &fam)
        .and_then(|a| crate::ctrlr_opts(&a))
    {
        Ok(o) => o,
        Err(e) => return done(Err(RpcError::new(-libc::EINVAL, e.to_string()))),
    };
    let taken = DISCOVERIES.with(|d| {
        d.borrow().iter().any(|d| {
            d.params.name == p.name
                || d.opts.same_place(&opts)
                || d.referrals
                    .iter()
                    .any(|r| r.1 == opts.addr.ip().to_string() && r.2 == port)
        })
    });
    if taken {
        return done(Err(RpcError::errno(libc::EEXIST)));
    }
    let wait = p.wait_for_attach.unwrap_or(false) || p.attach_timeout_ms.is_some_and(|t| t > 0);
    let name = p.name.clone();
    let watched = name.clone();
    let watch = Poller::register("bdev_nvme_discovery", 100_000, move || {
        watch_connection(&watched);
        false
    });
    let timeout = p
        .attach_timeout_ms
        .filter(|&t| t > 0)
        .map(Duration::from_millis);
    DISCOVERIES.with(|d| {
        d.borrow_mut().push(Discovery {
            params: p,
            opts: opts.clone(),
            ctrlr: None,
            nvm: Vec::new(),
            referrals: Vec::new(),
            index: 0,
            reading: false,
            again: false,
            _watch: watch,
            next_attempt: Instant::now() + Duration::from_secs(1),
            connecting: true,
        })
    });
    let mut done: Option<StartDone> = Some(Box::new(done));
    if !wait {
        if let Some(d) = done.take() {
            d(Ok(()));
        }
    } else if let Some(t) = timeout {
        // SPDK gives up waiting (-ETIMEDOUT) and stops the service.
        let slot = std::rc::Rc::new(RefCell::new(done.take()));
        let s2 = slot.clone();
        let n2 = name.clone();
        reactor::thread::timer(t.as_micros() as u64, move || {
            if let Some(d) = s2.borrow_mut().take() {
                stop(&n2, |_| {});
                d(Err(RpcError::errno(libc::ETIMEDOUT)));
            }
        })
        .detach();
        done = Some(Box::new(move |r| {
            if let Some(d) = slot.borrow_mut().take() {
                d(r)
            }
        }));
    }
    connect(name, opts, done);
}

/// Connects the discovery controller of service `name`, then reads its log.
fn connect(name: String, opts: CtrlrOpts, done: Option<StartDone>) {
    nvme_host::connect(opts, move |res| {
        let ctrlr = match res {
            Ok(c) => c,
            Err(e) => {
                log::error!("nvme discovery {name}: {e}");
                with(&name, |d| d.connecting = false);
                if let Some(done) = done {
                    // Nothing was attached: the service goes, as SPDK stops it on a start error.
                    stop(&name, |_| {});
                    done(Err(RpcError::from(e)));
                }
                return;
            }
        };
        let n2 = name.clone();
        ctrlr.on_event(move |ty, _, lid| {
            if ty == 2 && lid == nvme_proto::log::lid::DISCOVERY {
                refresh(&n2, None);
            }
        });
        let known = with(&name, |d| {
            d.ctrlr = Some(ctrlr);
            d.connecting = false;
        });
        if known.is_none() {
            return;
        }
        refresh(&name, done);
    });
}

/// Reconnects a discovery controller that went away (every second while it is gone).
fn watch_connection(name: &str) {
    let retry = with(name, |d| {
        let lost = d.ctrlr.as_ref().is_some_and(|c| !c.alive());
        if lost {
            log::warn!(
                "nvme discovery {}: connection lost, reconnecting",
                d.params.name
            );
            if let Some(c) = d.ctrlr.take() {
                c.close();
            }
        }
        if d.ctrlr.is_none() && !d.connecting && Instant::now() >= d.next_attempt {
            d.connecting = true;
            d.next_attempt = Instant::now() + Duration::from_secs(1);
            return Some(d.opts.clone());
        }
        None
    });
    if let Some(Some(opts)) = retry {
        connect(name.to_string(), opts, None);
    }
}

/// Reads the discovery log of service `name` and makes the attached controllers follow it; `done` hears once
/// the attaches this read started are done.
fn refresh(name: &str, done: Option<StartDone>) {
    let ctrlr_ok = with(name, |d| {
        if d.reading {
            d.again = true;
            return false;
        }
        d.reading = true;
        d.ctrlr.is_some()
    });
    if ctrlr_ok != Some(true) {
        if let Some(done) = done {
            done(Ok(()));
        }
        return;
    }
    let n = name.to_string();
    DISCOVERIES.with(|d| {
        let d = d.borrow();
        let Some(c) = d
            .iter()
            .find(|d| d.params.name == n)
            .and_then(|d| d.ctrlr.as_ref())
        else {
            return;
        };
        let n2 = n.clone();
        c.discovery_log(move |r| match r {
            Ok(entries) => apply(&n2, entries, done),
            Err(e) => {
                log::error!("nvme discovery {n2}: {e}");
                finish_read(&n2);
                if let Some(done) = done {
                    done(Err(RpcError::errno(libc::EIO)));
                }
            }
        });
    });
}

/// A log read is over: another one goes when a change came meanwhile.
fn finish_read(name: &str) {
    let again = with(name, |d| {
        d.reading = false;
        std::mem::take(&mut d.again)
    });
    if again == Some(true) {
        refresh(name, None);
    }
}

fn text(b: &[u8]) -> String {
    padded_str(b).unwrap_or_default().trim().to_string()
}

/// Attaches what the log lists and was not attached, detaches what it no longer lists.
fn apply(name: &str, entries: Vec<DiscoveryEntry>, done: Option<StartDone>) {
    let mut referrals = Vec::new();
    let mut listed = Vec::new();
    for e in &entries {
        let (traddr, trsvcid, subnqn) = (text(&e.traddr), text(&e.trsvcid), text(&e.subnqn));
        match e.subtype {
            subtype::DISCOVERY_REFERRAL | subtype::CURRENT_DISCOVERY => {
                referrals.push((e.adrfam, traddr, trsvcid))
            }
            subtype::NVME if e.trtype == trtype::TCP => {
                listed.push((subnqn, traddr, trsvcid, e.adrfam))
            }
            subtype::NVME => log::info!(
                "nvme discovery {name}: {subnqn} at {traddr}: transport {} not supported",
                e.trtype
            ),
            t => log::info!("nvme discovery {name}: entry of subsystem type {t} skipped"),
        }
    }
    let Some((gone, new, params)) = with(name, |d| {
        d.referrals = referrals;
        let (keep, gone): (Vec<NvmEntry>, Vec<NvmEntry>) =
            std::mem::take(&mut d.nvm).into_iter().partition(|n| {
                listed
                    .iter()
                    .any(|l| l.0 == n.subnqn && l.1 == n.traddr && l.2 == n.trsvcid)
            });
        d.nvm = keep;
        let new: Vec<_> = listed
            .iter()
            .filter(|l| {
                !d.nvm
                    .iter()
                    .any(|n| l.0 == n.subnqn && l.1 == n.traddr && l.2 == n.trsvcid)
            })
            .cloned()
            .collect();
        (gone, new, d.params.clone())
    }) else {
        if let Some(done) = done {
            done(Ok(()));
        }
        return;
    };
    for g in gone {
        log::info!(
            "nvme discovery {name}: {} at {}:{} left the log",
            g.subnqn,
            g.traddr,
            g.trsvcid
        );
        g.detach();
    }
    attach_each(name.to_string(), params, new.into(), done);
}

/// Attaches the listed paths one after the other (a second path of a subsystem joins the name the first one
/// got), then ends the read and answers `done`.
fn attach_each(
    name: String,
    params: StartParams,
    mut left: std::collections::VecDeque<(String, String, String, u8)>,
    done: Option<StartDone>,
) {
    let Some((subnqn, traddr, trsvcid, fam)) = left.pop_front() else {
        finish_read(&name);
        if let Some(d) = done {
            d(Ok(()));
        }
        return;
    };
    // One name per subsystem NQN, across every discovery service: a second path joins it.
    let existing = DISCOVERIES.with(|d| {
        d.borrow()
            .iter()
            .flat_map(|d| d.nvm.iter())
            .find(|n| n.subnqn == subnqn)
            .map(|n| n.ctrlr.clone())
    });
    let ctrlr = existing.unwrap_or_else(|| {
        with(&name, |d| {
            let c = format!("{}{}", d.params.name, d.index);
            d.index += 1;
            c
        })
        .unwrap_or_default()
    });
    let fam_s = if fam == adrfam::IPV6 { "ipv6" } else { "ipv4" };
    let a = match attach_params(&params, &ctrlr, &subnqn, &traddr, &trsvcid, fam_s) {
        Ok(mut a) => {
            a.from_discovery = true;
            a
        }
        Err(e) => {
            log::error!("nvme discovery {name}: {subnqn} at {traddr}:{trsvcid}: {e}");
            return attach_each(name, params, left, done);
        }
    };
    log::info!("nvme discovery {name}: attaching {subnqn} at {traddr}:{trsvcid} as {ctrlr}");
    attach(a, move |r| {
        match r {
            Ok(_) => {
                with(&name, |d| {
                    d.nvm.push(NvmEntry {
                        subnqn,
                        traddr,
                        trsvcid,
                        ctrlr,
                    })
                });
            }
            Err(e) => {
                log::error!("nvme discovery {name}: attaching {subnqn} at {traddr}:{trsvcid}: {e}")
            }
        }
        attach_each(name, params, left, done);
    });
}

/// `bdev_nvme_stop_discovery`: detaches what service `name` attached and closes it (-ENOENT: no such
/// service).
pub fn stop(name: &str, done: impl FnOnce(std::result::Result<(), RpcError>)) {
    let Some(d) = DISCOVERIES.with(|d| {
        let mut d = d.borrow_mut();
        let i = d.iter().position(|d| d.params.name == name)?;
        Some(d.remove(i))
    }) else {
        return done(Err(RpcError::errno(libc::ENOENT)));
    };
    for n in d.nvm {
        n.detach();
    }
    if let Some(c) = d.ctrlr {
        c.close();
    }
    done(Ok(()))
}

/// Stops every discovery service (module fini).
pub fn stop_all() {
    let names: Vec<String> =
        DISCOVERIES.with(|d| d.borrow().iter().map(|d| d.params.name.clone()).collect());
    for n in names {
        stop(&n, |_| {});
    }
}

fn trid(fam: u8, traddr: &str, trsvcid: &str, subnqn: &str) -> Value {
    json!({
        "trtype": "TCP",
        "adrfam": if fam == adrfam::IPV6 { "IPv6" } else { "IPv4" },
        "traddr": traddr,
        "trsvcid": trsvcid,
        "subnqn": subnqn,
    })
}

/// `bdev_nvme_get_discovery_info`: each service, its discovery controller's address and its referrals.
pub fn info_json() -> Value {
    DISCOVERIES.with(|d| {
        Value::Array(
            d.borrow()
                .iter()
                .map(|d| {
                    let referrals: Vec<Value> = d
                        .referrals
                        .iter()
                        .map(|r| json!({"trid": trid(r.0, &r.1, &r.2, DISCOVERY_NQN)}))
                        .collect();
                    json!({
                        "name": d.params.name,
                        "trid": Value::Object(trid_json(&d.opts)),
                        "referrals": referrals,
                    })
                })
                .collect(),
        )
    })
}

/// The `bdev_nvme_start_discovery` entries `save_config` writes (SPDK's fields; the controllers the services
/// made are not written).
pub fn config_entries() -> Vec<Value> {
    DISCOVERIES.with(|d| {
        d.borrow()
            .iter()
            .map(|d| {
                let p = &d.params;
                let mut t = trid_json(&d.opts);
                t.remove("subnqn");
                let mut params = serde_json::Map::new();
                params.insert("name".into(), json!(p.name));
                params.insert("hostnqn".into(), json!(d.opts.hostnqn));
                params.extend(t);
                params.insert(
                    "wait_for_attach".into(),
                    json!(
                        p.wait_for_attach.unwrap_or(false)
                            || p.attach_timeout_ms.is_some_and(|t| t > 0)
                    ),
                );
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
                json!({"method": "bdev_nvme_start_discovery", "params": params})
            })
            .collect()
    })
}
