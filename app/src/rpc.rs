//! Framework, thread, log and version methods (SPDK's `lib/event`, `lib/thread`, `lib/log` RPCs).

use jsonrpc::{no_params, Registry, Responder, RpcError, STATE_RUNTIME, STATE_STARTUP};
use reactor::{PollerInfo, PollerState};
use serde::Deserialize;
use serde_json::{json, Value};

use bdev::rpc::method;

use crate::logging::{self, Level};
use crate::target::{Target, VERSION};

const ANY: u32 = STATE_STARTUP | STATE_RUNTIME;

fn target(r: &Responder) -> Option<std::rc::Rc<Target>> {
    let t = Target::current();
    if t.is_none() {
        log::error!("{}: no target on this thread", r.method());
    }
    t
}

/// A method with no params.
fn plain(reg: &mut Registry, name: &'static str, states: u32, f: impl Fn(Responder) + 'static) {
    reg.register(
        name,
        states,
        std::rc::Rc::new(
            move |p: Option<Value>, r: Responder| match no_params(&p, name) {
                Ok(()) => f(r),
                Err(e) => r.err(e),
            },
        ),
    );
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetConfig {
    name: String,
    #[serde(default)]
    with_batches: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Flag {
    flag: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelParam {
    level: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Kill {
    sig_name: String,
}

/// Per-core (user, system, irq) times from /proc/stat, in clock ticks, as SPDK reports them.
fn cpu_times() -> std::collections::HashMap<u32, (u64, u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let core: u32 = f.next()?.strip_prefix("cpu")?.parse().ok()?;
            let v: Vec<u64> = f.take(6).filter_map(|x| x.parse().ok()).collect();
            // user nice system idle iowait irq
            (v.len() == 6).then(|| (core, (v[0], v[2], v[5])))
        })
        .collect()
}

fn mask_hex(m: &reactor::CpuMask) -> String {
    m.to_string().trim_start_matches("0x").to_string()
}

fn poller_json(p: &PollerInfo, timed: bool) -> Value {
    let mut v = json!({
        "name": p.name,
        "id": p.id,
        "state": match p.state { PollerState::Paused => "paused", _ => "waiting" },
        "run_count": p.run_count,
        "busy_count": p.busy_count,
    });
    if timed {
        v["period_ticks"] = json!(p.period_ticks);
    }
    v
}

/// Registers the framework's methods.
pub fn register(reg: &mut Registry) {
    plain(reg, "spdk_get_version", ANY, |r| {
        let (ma, mi, pa) = VERSION;
        r.ok(json!({
            "version": format!("SPDK v{ma}.{mi:02}{}", if pa > 0 { format!(".{pa}") } else { String::new() }),
            "fields": {"major": ma, "minor": mi, "patch": pa, "suffix": ""}
        }))
    });
    plain(reg, "framework_start_init", STATE_STARTUP, |r| {
        let Some(t) = target(&r) else {
            return r.err(RpcError::internal("no target"));
        };
        t.start_init(move |res| match res {
            Ok(()) => r.ok(json!(true)),
            Err(e) => r.err(RpcError::internal(e)),
        });
    });
    plain(reg, "framework_wait_init", ANY, |r| match target(&r) {
        Some(t) => t.wait_init(r),
        None => r.err(RpcError::internal("no target")),
    });
    plain(reg, "framework_get_subsystems", STATE_RUNTIME, |r| {
        r.ok(Value::Array(
            crate::compat::SUBSYSTEMS
                .iter()
                .map(|s| json!({"subsystem": s.name, "depends_on": s.depends_on}))
                .collect(),
        ))
    });
    method(
        reg,
        "framework_get_config",
        STATE_RUNTIME,
        |p: GetConfig, r| {
            let _ = p.with_batches;
            match target(&r).and_then(|t| t.subsystem_config(&p.name)) {
                Some(c) => r.ok(c),
                None => r.err(RpcError::invalid_params("Invalid parameters")),
            }
        },
    );
    plain(reg, "keyring_get_keys", STATE_RUNTIME, |r| {
        r.ok(Value::Array(subsystems::keyring::list()))
    });
    plain(reg, "framework_get_reactors", STATE_RUNTIME, |r| {
        // Thread counters live on their threads: collect them there, then lay them out per reactor.
        reactor::for_each_thread(reactor::current_info, move |infos| {
            let infos: Vec<_> = infos.into_iter().flatten().collect();
            let cpu = cpu_times();
            let reactors: Vec<Value> = reactor::reactors_info()
                .into_iter()
                .map(|ri| {
                    let lw: Vec<Value> = infos
                        .iter()
                        .filter(|t| t.lcore == ri.lcore)
                        .map(|t| json!({"name": t.name, "id": t.id, "cpumask": mask_hex(&t.cpumask), "elapsed": t.elapsed}))
                        .collect();
                    json!({
                        "lcore": ri.lcore,
                        "tid": ri.tid,
                        "busy": ri.busy,
                        "idle": ri.idle,
                        "in_interrupt": ri.in_interrupt,
                        "irq": cpu.get(&ri.lcore).map_or(0, |c| c.2),
                        "sys": cpu.get(&ri.lcore).map_or(0, |c| c.1),
                        "usr": cpu.get(&ri.lcore).map_or(0, |c| c.0),
                        "lw_threads": lw,
                    })
                })
                .collect();
            r.ok(json!({"tick_rate": reactor::ticks::rate(), "pid": std::process::id(), "reactors": reactors}))
        });
    });
    plain(reg, "thread_get_stats", STATE_RUNTIME, |r| {
        reactor::for_each_thread(reactor::current_info, move |infos| {
            let threads: Vec<Value> = infos
                .into_iter()
                .flatten()
                .map(|t| {
                    json!({
                        "name": t.name, "id": t.id, "cpumask": mask_hex(&t.cpumask),
                        "busy": t.busy, "idle": t.idle,
                        "active_pollers_count": t.active_pollers.len(),
                        "timed_pollers_count": t.timed_pollers.len(),
                        "paused_pollers_count": t.paused_pollers.len(),
                    })
                })
                .collect();
            r.ok(json!({"tick_rate": reactor::ticks::rate(), "threads": threads}))
        });
    });
    plain(reg, "thread_get_pollers", STATE_RUNTIME, |r| {
        reactor::for_each_thread(reactor::current_info, move |infos| {
            let threads: Vec<Value> = infos
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        json!({
                            "name": t.name, "id": t.id,
                            "active_pollers": t.active_pollers.iter().map(|p| poller_json(p, false)).collect::<Vec<_>>(),
                            "timed_pollers": t.timed_pollers.iter().map(|p| poller_json(p, true)).collect::<Vec<_>>(),
                            "paused_pollers": t.paused_pollers.iter().map(|p| poller_json(p, p.period_ticks > 0)).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
            r.ok(json!({"tick_rate": reactor::ticks::rate(), "threads": threads}))
        });
    });
    method(
        reg,
        "log_set_flag",
        ANY,
        |p: Flag, r| match logging::set_flag(&p.flag) {
            Ok(()) => r.ok(json!(true)),
            Err(e) => r.err(RpcError::invalid_params(e)),
        },
    );
    method(
        reg,
        "log_clear_flag",
        ANY,
        |p: Flag, r| match logging::clear_flag(&p.flag) {
            Ok(()) => r.ok(json!(true)),
            Err(e) => r.err(RpcError::invalid_params(e)),
        },
    );
    plain(reg, "log_get_flags", ANY, |r| {
        let m: serde_json::Map<String, Value> = logging::flags()
            .into_iter()
            .map(|(f, on)| (f.to_string(), json!(on)))
            .collect();
        r.ok(Value::Object(m))
    });
    for (set, get, setter, getter) in [
        (
            "log_set_level",
            "log_get_level",
            logging::set_level as fn(Level),
            logging::level as fn() -> Level,
        ),
        (
            "log_set_print_level",
            "log_get_print_level",
            logging::set_print_level,
            logging::print_level,
        ),
    ] {
        method(reg, set, ANY, move |p: LevelParam, r| {
            match Level::parse(&p.level) {
                Some(l) => {
                    setter(l);
                    r.ok(json!(true))
                }
                None => r.err(RpcError::invalid_params(format!(
                    "invalid log level {}",
                    p.level
                ))),
            }
        });
        plain(reg, get, ANY, move |r| r.ok(json!(getter().name())));
    }
    method(reg, "spdk_kill_instance", ANY, |p: Kill, r| {
        let sig = match p.sig_name.as_str() {
            "SIGINT" | "INT" => libc::SIGINT,
            "SIGTERM" | "TERM" => libc::SIGTERM,
            "SIGQUIT" | "QUIT" => libc::SIGQUIT,
            "SIGHUP" | "HUP" => libc::SIGHUP,
            "SIGKILL" | "KILL" => libc::SIGKILL,
            _ => return r.err(RpcError::invalid_params("Invalid parameters")),
        };
        r.ok(json!(true));
        crate::signals::raise(sig);
    });
}
