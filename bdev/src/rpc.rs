//! The bdev layer's JSON-RPC methods (SPDK's names, params, results and error codes) and its `save_config`
//! section. Each base module keeps its own methods beside it (`modules/<module>/rpc.rs`); [`register_rpcs`]
//! registers them after the layer's, and the helpers here ([`method`], [`delete_reply`]) serve them and the
//! other crates' modules alike.

use std::rc::Rc;
use std::sync::Mutex;

use jsonrpc::{
    decode_params, no_params, Registry, Responder, RpcError, STATE_RUNTIME, STATE_STARTUP,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{IoType, ResetMode};

/// `bdev_set_options`, as SPDK keeps and saves them.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BdevOptions {
    /// Descriptors per thread at most.
    #[serde(default = "d_pool")]
    pub bdev_io_pool_size: u32,
    /// Descriptors cached per thread (accepted for compatibility; the pool is per thread here).
    #[serde(default = "d_cache")]
    pub bdev_io_cache_size: u32,
    /// Run examine on every new bdev.
    #[serde(default = "d_true")]
    pub bdev_auto_examine: bool,
    /// iobuf small buffer cache per thread (kept and saved).
    #[serde(default = "d_small")]
    pub iobuf_small_cache_size: u32,
    /// iobuf large buffer cache per thread (kept and saved).
    #[serde(default = "d_large")]
    pub iobuf_large_cache_size: u32,
    /// Deprecated in SPDK, still accepted.
    #[serde(default, skip_serializing)]
    pub small_buf_pool_size: Option<u32>,
    /// Deprecated in SPDK, still accepted.
    #[serde(default, skip_serializing)]
    pub large_buf_pool_size: Option<u32>,
}

fn d_pool() -> u32 {
    65535
}
fn d_cache() -> u32 {
    256
}
fn d_true() -> bool {
    true
}
fn d_small() -> u32 {
    128
}
fn d_large() -> u32 {
    16
}

impl Default for BdevOptions {
    fn default() -> Self {
        serde_json::from_value(json!({})).expect("defaults")
    }
}

static OPTIONS: Mutex<Option<BdevOptions>> = Mutex::new(None);

/// Current `bdev_set_options` values.
pub fn options() -> BdevOptions {
    reactor::lock(&OPTIONS).clone().unwrap_or_default()
}

/// Answers with `res`: the value, or the error as SPDK reports it.
pub(crate) fn reply<T: Into<RpcError>>(r: Responder, res: Result<Value, T>) {
    match res {
        Ok(v) => r.ok(v),
        Err(e) => r.err(e.into()),
    }
}

fn handler(f: impl Fn(Option<Value>, Responder) + 'static) -> jsonrpc::Handler {
    Rc::new(f)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    name: Option<String>,
    #[serde(default)]
    timeout: u64,
}

fn get_bdevs(p: GetBdevs, r: Responder) {
    let Some(name) = p.name else {
        let all: Vec<Value> = crate::list()
            .iter()
            .filter(|b| !b.is_removing())
            .map(|b| b.info_json())
            .collect();
        return r.ok(Value::Array(all));
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(p.timeout);
    fn attempt(name: String, deadline: std::time::Instant, r: Responder) {
        match crate::get(&name).filter(|b| !b.is_removing()) {
            Some(b) => r.ok(json!([b.info_json()])),
            None if std::time::Instant::now() < deadline => {
                reactor::timer(1000, move || attempt(name, deadline, r)).detach();
            }
            None => r.err(RpcError::errno(libc::ENODEV)),
        }
    }
    attempt(name, deadline, r);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetIostat {
    name: Option<String>,
    /// The 26.x client's comma-separated `--names`.
    names: Option<Vec<String>>,
    #[serde(default)]
    per_channel: bool,
    /// Reset after reading: all, maxmin, error or none.
    reset_mode: Option<String>,
}

fn get_iostat(p: GetIostat, r: Responder) {
    let reset = match p.reset_mode.as_deref().map(ResetMode::parse) {
        None => ResetMode::None,
        Some(Some(m)) => m,
        Some(None) => {
            return r.err(RpcError::invalid_params(
                "reset_mode must be all, maxmin, error or none",
            ))
        }
    };
    let wanted: Option<Vec<String>> = match (p.name, p.names) {
        (None, None) => None,
        (a, b) => Some(a.into_iter().chain(b.unwrap_or_default()).collect()),
    };
    if p.per_channel {
        // One bdev's channels only: SPDK v24.05 requires `name`, 26.x exactly one of `name`/`names`.
        let Some([name]) = wanted.as_deref() else {
            log::error!("bdev_get_iostat: per_channel needs exactly one bdev name");
            return r.err(RpcError::errno(libc::EINVAL));
        };
        return match crate::get(name) {
            Some(b) => per_channel_iostat(&b, reset, r),
            None => r.err(RpcError::errno(libc::ENODEV)),
        };
    }
    let bdevs = match wanted {
        Some(names) => {
            let mut v = vec![];
            for n in names {
                match crate::get(&n) {
                    Some(b) => v.push(b),
                    None => return r.err(RpcError::errno(libc::ENODEV)),
                }
            }
            v
        }
        None => crate::list(),
    };
    let tick_rate = reactor::ticks::rate();
    let mut out = Vec::with_capacity(bdevs.len());
    fn next(
        mut bdevs: std::vec::IntoIter<crate::Bdev>,
        mut out: Vec<Value>,
        tick_rate: u64,
        reset: ResetMode,
        r: Responder,
    ) {
        let Some(b) = bdevs.next() else {
            return r.ok(json!({
                "tick_rate": tick_rate,
                "ticks": reactor::ticks::now(),
                "bdevs": out,
            }));
        };
        let name = b.name().to_string();
        let b2 = b.clone();
        b.get_iostat(move |s| {
            let mut m = serde_json::Map::new();
            m.insert("name".into(), json!(name));
            m.extend(s.to_json());
            // Queue-depth sampling (bdev_set_qd_sampling_period) is not implemented; SPDK reports these as 0
            // while sampling is off, which is the truth here.
            for k in [
                "queue_depth_polling_period",
                "queue_depth",
                "io_time",
                "weighted_io_time",
            ] {
                m.insert(k.into(), json!(0));
            }
            out.push(Value::Object(m));
            if reset != ResetMode::None {
                b2.reset_iostat(reset, move || next(bdevs, out, tick_rate, reset, r));
            } else {
                next(bdevs, out, tick_rate, reset, r)
            }
        });
    }
    out.clear();
    next(bdevs.into_iter(), out, tick_rate, reset, r);
}

/// `bdev_get_iostat` with `per_channel`: SPDK's `{"tick_rate", "ticks", "name", "channels": [{"thread_id",
/// counters...}]}`, one entry per thread holding a channel on `b` now (SPDK's `spdk_bdev_for_each_channel`), read
/// (and, with `reset`, cleared) on that thread. Channels already released are not listed: their counters live on
/// only in the bdev's totals, as in SPDK.
fn per_channel_iostat(b: &crate::Bdev, reset: ResetMode, r: Responder) {
    let name = b.name().to_string();
    // SPDK takes the clock when it starts the answer, before visiting the channels.
    let ticks = reactor::ticks::now();
    b.0.io_device.for_each_channel(
        move |c| {
            let s = c.stat();
            c.reset_stat(reset);
            (reactor::current().map_or(0, |t| t.id()), s)
        },
        move |v| {
            let channels: Vec<Value> = v
                .into_iter()
                .map(|(thread_id, s)| {
                    let mut m = serde_json::Map::new();
                    m.insert("thread_id".into(), json!(thread_id));
                    m.extend(s.to_json());
                    Value::Object(m)
                })
                .collect();
            r.ok(json!({
                "tick_rate": reactor::ticks::rate(),
                "ticks": ticks,
                "name": name,
                "channels": channels,
            }));
        },
    );
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetIostat {
    name: Option<String>,
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnableHistogram {
    name: String,
    enable: bool,
    /// Newer clients: count one I/O type only.
    opc: Option<String>,
    /// Newer clients: buckets per range, as a shift.
    granularity: Option<u32>,
    /// Newer clients: the tracked value range (not supported: every range is tracked).
    min_nsec: Option<u64>,
    max_nsec: Option<u64>,
}

/// Params of the methods that take a bdev name only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NameOnly {
    pub(crate) name: String,
}

/// Answers `true` once no examine is in progress (checked every 100 µs).
fn wait_for_examine(r: Responder) {
    if crate::examines_pending() == 0 {
        return r.ok(json!(true));
    }
    reactor::timer(100, move || wait_for_examine(r)).detach();
}

/// Deletes a bdev of `module` by name and answers `true`, or SPDK's error.
pub fn delete_reply(name: &str, module: &'static str, r: Responder) {
    crate::unregister_by_name(name, module, move |res| reply(r, res.map(|_| json!(true))));
}

/// Registers a method whose params decode to `T`.
pub fn method<T: serde::de::DeserializeOwned + 'static>(
    reg: &mut Registry,
    name: &str,
    states: u32,
    f: impl Fn(T, Responder) + 'static,
) {
    reg.register(
        name,
        states,
        handler(move |params, r| match decode_params::<T>(params) {
            Ok(p) => f(p, r),
            Err(e) => r.err(e),
        }),
    );
}

/// Registers the bdev layer's methods, then the base modules'.
pub fn register_rpcs(reg: &mut Registry) {
    method(reg, "bdev_get_bdevs", STATE_RUNTIME, get_bdevs);
    method(reg, "bdev_get_iostat", STATE_RUNTIME, get_iostat);
    method(
        reg,
        "bdev_reset_iostat",
        STATE_RUNTIME,
        |p: ResetIostat, r| {
            let mode = match p.mode.as_deref() {
                None | Some("all") => ResetMode::All,
                Some("maxmin") => ResetMode::MaxMin,
                Some(_) => return r.err(RpcError::invalid_params("mode must be all or maxmin")),
            };
            let bdevs = match &p.name {
                Some(n) => match crate::get(n) {
                    Some(b) => vec![b],
                    None => return r.err(RpcError::errno(libc::ENODEV)),
                },
                None => crate::list(),
            };
            fn next(mut it: std::vec::IntoIter<crate::Bdev>, mode: ResetMode, r: Responder) {
                match it.next() {
                    Some(b) => b.reset_iostat(mode, move || next(it, mode, r)),
                    None => r.ok(json!(true)),
                }
            }
            next(bdevs.into_iter(), mode, r);
        },
    );
    method(
        reg,
        "bdev_enable_histogram",
        STATE_RUNTIME,
        |p: EnableHistogram, r| {
            let Some(b) = crate::get(&p.name) else {
                return r.err(RpcError::errno(libc::ENODEV));
            };
            if p.min_nsec.is_some() || p.max_nsec.is_some() {
                return r.err(RpcError::invalid_params(
                    "min_nsec/max_nsec are not supported: the histogram tracks every latency range",
                ));
            }
            let opc = match p.opc.as_deref() {
                None => None,
                Some(name) => match IoType::ALL.into_iter().find(|t| t.name() == name) {
                    Some(t) => Some(t),
                    None => {
                        return r.err(RpcError::invalid_params(format!(
                            "opc: unknown I/O type '{name}'"
                        )))
                    }
                },
            };
            let shift = p
                .granularity
                .unwrap_or(crate::histogram::BUCKET_SHIFT_DEFAULT);
            if !(1..=63).contains(&shift) {
                return r.err(RpcError::invalid_params("granularity must be 1..63"));
            }
            let cfg = p.enable.then_some(crate::HistogramCfg {
                bucket_shift: shift,
                opc,
            });
            b.enable_histogram(cfg, move || r.ok(json!(true)));
        },
    );
    method(
        reg,
        "bdev_get_histogram",
        STATE_RUNTIME,
        |p: NameOnly, r| {
            let Some(b) = crate::get(&p.name) else {
                return r.err(RpcError::errno(libc::ENODEV));
            };
            b.get_histogram(move |h| match h {
                // SPDK answers -EFAULT when a channel has no histogram (not enabled).
                None => r.err(RpcError::errno(libc::EFAULT)),
                Some(h) => r.ok(json!({
                    "histogram": h.to_base64(),
                    "bucket_shift": h.bucket_shift(),
                    "tsc_rate": reactor::ticks::rate(),
                })),
            });
        },
    );
    method(
        reg,
        "bdev_set_options",
        STATE_STARTUP,
        |p: BdevOptions, r| {
            if p.bdev_io_pool_size < p.bdev_io_cache_size {
                return r.err(RpcError::errno(libc::EINVAL));
            }
            crate::set_pool_limit(p.bdev_io_pool_size as usize);
            *reactor::lock(&OPTIONS) = Some(p);
            r.ok(json!(true));
        },
    );
    reg.register(
        "bdev_wait_for_examine",
        STATE_RUNTIME,
        handler(
            |params, r| match no_params(&params, "bdev_wait_for_examine") {
                // Examine callbacks start at registration; those that read from the bdev hold an ExamineGuard.
                Ok(()) => wait_for_examine(r),
                Err(e) => r.err(e),
            },
        ),
    );
    method(reg, "bdev_examine", STATE_RUNTIME, |p: NameOnly, r| {
        if options().bdev_auto_examine {
            log::error!("bdev_examine: only allowed when bdev_auto_examine is false");
            return r.err(RpcError::errno(libc::EINVAL));
        }
        match crate::get(&p.name) {
            Some(b) => {
                crate::bdev::run_examiners(&b);
                r.ok(json!(true))
            }
            None => r.err(RpcError::errno(libc::ENODEV)),
        }
    });
    crate::modules::register_rpcs(reg);
}

/// The `bdev` subsystem's `save_config` array (see [`crate::module::config_json`]).
pub fn config_json() -> Value {
    crate::module::config_json()
}
