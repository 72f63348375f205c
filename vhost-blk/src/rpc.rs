//! SPDK's vhost-blk RPCs (`vhost_create_blk_controller`, `vhost_delete_controller`, `vhost_get_controllers`,
//! `vhost_controller_set_coalescing`) and the `vhost_blk` section of `save_config`.
//!
//! `vhost_create_blk_controller` decodes its parameters the way SPDK does (relaxed: unknown keys are ignored,
//! since SPDK passes the whole object on to the transport), so configs written by any SPDK load here.

use std::rc::Rc;

use jsonrpc::{decode_params, Registry, Responder, RpcError, INTERNAL_ERROR, STATE_RUNTIME};
use reactor::lock;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::controller::{self, CreateOpts, TRANSPORT};
use crate::Error;

fn invalid_params(e: Error) -> RpcError {
    log::error!("{e}");
    RpcError::invalid_params(jsonrpc::strerror(e.errno()))
}

#[derive(Deserialize)]
struct CreateParams {
    ctrlr: String,
    dev_name: String,
    cpumask: Option<String>,
    transport: Option<String>,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    packed_ring: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CtrlrParam {
    ctrlr: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetParams {
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CoalescingParams {
    ctrlr: String,
    delay_base_us: u32,
    iops_threshold: u32,
}

fn decode<T: serde::de::DeserializeOwned>(
    params: Option<Value>,
    r: Responder,
) -> Option<(T, Responder)> {
    match decode_params::<T>(params) {
        Ok(p) => Some((p, r)),
        Err(_) => {
            r.err(RpcError::invalid_params(jsonrpc::strerror(libc::EINVAL)));
            None
        }
    }
}

fn create(params: Option<Value>, r: Responder) {
    let Some((p, r)) = decode::<CreateParams>(params, r) else {
        return;
    };
    let opts = CreateOpts {
        ctrlr: p.ctrlr,
        dev_name: p.dev_name,
        cpumask: p.cpumask,
        readonly: p.readonly,
        packed_ring: p.packed_ring,
        transport: p.transport,
    };
    controller::create(opts, move |res| match res {
        Ok(()) => r.ok(Value::Bool(true)),
        Err(e) => r.err(invalid_params(e)),
    });
}

fn delete(params: Option<Value>, r: Responder) {
    let Some((p, r)) = decode::<CtrlrParam>(params, r) else {
        return;
    };
    controller::delete(&p.ctrlr, move |res| match res {
        Ok(()) => r.ok(Value::Bool(true)),
        Err(e) => r.err(invalid_params(e)),
    });
}

/// One controller as `vhost_get_controllers` shows it.
pub fn controller_json(c: &controller::Ctrlr) -> Value {
    let sessions: Vec<Value> = lock(&c.session)
        .iter()
        .map(|s| {
            json!({
                "vid": s.vid,
                "id": 0,
                "name": format!("{}s{}", c.name, s.vid),
                "started": s.started,
                "max_queues": s.max_queues,
                "inflight_task_cnt": c.inflight.load(std::sync::atomic::Ordering::Relaxed),
            })
        })
        .collect();
    let bdev = lock(&c.bdev).as_ref().map(|b| b.name().to_string());
    json!({
        "ctrlr": c.name,
        "cpumask": c.cpumask.to_string(),
        "delay_base_us": c.delay_base_us.load(std::sync::atomic::Ordering::Relaxed),
        "iops_threshold": c.iops_threshold.load(std::sync::atomic::Ordering::Relaxed),
        "socket": c.socket.display().to_string(),
        "sessions": sessions,
        "backend_specific": {
            "block": {
                "readonly": c.readonly,
                "bdev": bdev,
                "transport": TRANSPORT,
            }
        }
    })
}

fn get(params: Option<Value>, r: Responder) {
    let p = match params {
        None => GetParams { name: None },
        Some(v) => match decode_params::<GetParams>(Some(v)) {
            Ok(p) => p,
            Err(_) => {
                return r.err(RpcError::new(
                    INTERNAL_ERROR,
                    jsonrpc::strerror(libc::EINVAL),
                ))
            }
        },
    };
    let list = match p.name {
        Some(n) => match controller::get(&n) {
            Some(c) => vec![c],
            None => {
                return r.err(RpcError::new(
                    INTERNAL_ERROR,
                    jsonrpc::strerror(libc::ENODEV),
                ))
            }
        },
        None => controller::list(),
    };
    r.ok(Value::Array(
        list.iter().map(|c| controller_json(c)).collect(),
    ));
}

fn set_coalescing(params: Option<Value>, r: Responder) {
    let Some((p, r)) = decode::<CoalescingParams>(params, r) else {
        return;
    };
    match controller::set_coalescing(&p.ctrlr, p.delay_base_us, p.iops_threshold) {
        Ok(()) => r.ok(Value::Bool(true)),
        Err(e) => r.err(invalid_params(e)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransportParams {
    name: Option<String>,
}

fn get_transports(params: Option<Value>, r: Responder) {
    let name = match params {
        None => None,
        Some(v) => match decode_params::<TransportParams>(Some(v)) {
            Ok(p) => p.name,
            Err(_) => return r.err(RpcError::invalid_params("Invalid parameters")),
        },
    };
    if name.as_deref().is_some_and(|n| n != TRANSPORT) {
        return r.err(RpcError::errno(libc::ENODEV));
    }
    r.ok(json!([{ "name": TRANSPORT }]))
}

/// Registers the vhost-blk methods (all RUNTIME, as in SPDK).
pub fn register_rpcs(reg: &mut Registry) {
    reg.register(
        "vhost_create_blk_controller",
        STATE_RUNTIME,
        Rc::new(create),
    );
    reg.register("vhost_delete_controller", STATE_RUNTIME, Rc::new(delete));
    reg.register("vhost_get_controllers", STATE_RUNTIME, Rc::new(get));
    reg.register(
        "vhost_controller_set_coalescing",
        STATE_RUNTIME,
        Rc::new(set_coalescing),
    );
    reg.register(
        "virtio_blk_get_transports",
        STATE_RUNTIME,
        Rc::new(get_transports),
    );
}

/// The `vhost_blk` subsystem's `save_config` entries, as SPDK writes them: per controller whose bdev is still
/// there, `vhost_create_blk_controller` (cpumask as bare hex) and, when coalescing is on,
/// `vhost_controller_set_coalescing`.
pub fn config_json() -> Value {
    let mut v = vec![];
    for c in controller::list() {
        let Some(bdev) = lock(&c.bdev).as_ref().map(|b| b.name().to_string()) else {
            continue;
        };
        let mask = c.cpumask.to_string();
        let mut params = json!({
            "ctrlr": c.name,
            "dev_name": bdev,
            "cpumask": mask.trim_start_matches("0x"),
            "readonly": c.readonly,
            "transport": TRANSPORT,
        });
        if c.packed {
            params["packed_ring"] = Value::Bool(true);
        }
        v.push(json!({"method": "vhost_create_blk_controller", "params": params}));
        let delay = c.delay_base_us.load(std::sync::atomic::Ordering::Relaxed);
        if delay != 0 {
            v.push(json!({
                "method": "vhost_controller_set_coalescing",
                "params": {
                    "ctrlr": c.name,
                    "delay_base_us": delay,
                    "iops_threshold": c.iops_threshold.load(std::sync::atomic::Ordering::Relaxed),
                }
            }));
        }
    }
    Value::Array(v)
}
