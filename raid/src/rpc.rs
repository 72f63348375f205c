//! The raid module's JSON-RPC methods, with SPDK's names, parameters, results and error codes/messages.

use bdev::rpc::method;
use jsonrpc::{strerror, Registry, Responder, RpcError, STATE_RUNTIME, STATE_STARTUP};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::raid::{self, CreateOpts, RaidOptions, RaidState};
use crate::{Level, RaidError};

fn fmt_err(e: &RaidError, msg: String) -> RpcError {
    log::error!("{e}");
    RpcError::new(-e.errno(), msg)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    category: String,
}

/// Base bdev names: a JSON array (what clients send) or, as older SPDK accepted, one whitespace-separated string.
#[derive(Deserialize)]
#[serde(untagged)]
enum BaseBdevs {
    List(Vec<String>),
    Words(String),
}

/// A level by name, or by SPDK's enum value.
#[derive(Deserialize)]
#[serde(untagged)]
enum LevelArg {
    Name(String),
    Number(u32),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    #[serde(default)]
    strip_size_kb: u32,
    raid_level: LevelArg,
    base_bdevs: BaseBdevs,
    uuid: Option<Uuid>,
    #[serde(default)]
    superblock: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Delete {
    name: String,
    #[serde(default)]
    clear_sb: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBase {
    raid_bdev: String,
    base_bdev: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveBase {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetOptions {
    process_window_size_kb: Option<u32>,
    process_max_bandwidth_mb_sec: Option<u32>,
}

fn get_bdevs(p: GetBdevs, r: Responder) {
    let cat = match p.category.as_str() {
        "all" => None,
        "online" => Some(RaidState::Online),
        "configuring" => Some(RaidState::Configuring),
        "offline" => Some(RaidState::Offline),
        _ => return r.err(RpcError::errno(libc::EINVAL)),
    };
    r.ok(Value::Array(raid::get_bdevs(cat)))
}

fn create(p: Create, r: Responder) {
    let name = p.name.clone();
    let level = match p.raid_level {
        LevelArg::Name(s) => Level::parse(&s),
        LevelArg::Number(n) => Level::from_sb(n).ok_or_else(|| {
            RaidError::new(crate::ErrorKind::Invalid, format!("invalid raid level {n}"))
        }),
    };
    let level = match level {
        Ok(l) => l,
        Err(e) => {
            let msg = format!("Failed to create RAID bdev {name}: {}", strerror(e.errno()));
            return r.err(fmt_err(&e, msg));
        }
    };
    let bases = match p.base_bdevs {
        BaseBdevs::List(v) => v,
        BaseBdevs::Words(s) => s.split_whitespace().map(str::to_string).collect(),
    };
    if bases.iter().any(|b| b.is_empty()) {
        return r.err(RpcError::new(
            -libc::EINVAL,
            format!(
                "The base bdev name cannot be empty: {}",
                strerror(libc::EINVAL)
            ),
        ));
    }
    raid::create(
        CreateOpts {
            name: p.name,
            strip_size_kb: p.strip_size_kb,
            level,
            base_bdevs: bases,
            uuid: p.uuid.filter(|u| !u.is_nil()),
            superblock: p.superblock,
        },
        move |res| match res {
            Ok(()) => r.ok(json!(true)),
            Err(e) => {
                let msg = format!("Failed to create RAID bdev {name}: {}", strerror(e.errno()));
                r.err(fmt_err(&e, msg))
            }
        },
    );
}

fn delete(p: Delete, r: Responder) {
    let name = p.name.clone();
    let (tx, rx) = shared_responder(r);
    if let Err(e) = raid::delete(&p.name, p.clear_sb, move |res| {
        if let Some(r) = take(&tx) {
            match res {
                Ok(()) => r.ok(json!(true)),
                Err(e) => {
                    log::error!("Failed to delete raid bdev {name}: {e}");
                    r.err(RpcError::internal(strerror(e.errno())))
                }
            }
        }
    }) {
        if let Some(r) = take(&rx) {
            let msg = format!("raid bdev {} not found", p.name);
            r.err(fmt_err(&e, msg));
        }
    }
}

type SharedResponder = std::sync::Arc<std::sync::Mutex<Option<Responder>>>;

/// One responder, answered by whichever of the synchronous or asynchronous paths comes first.
fn shared_responder(r: Responder) -> (SharedResponder, SharedResponder) {
    let s = std::sync::Arc::new(std::sync::Mutex::new(Some(r)));
    (s.clone(), s)
}

fn take(s: &SharedResponder) -> Option<Responder> {
    reactor::lock(s).take()
}

fn add_base(p: AddBase, r: Responder) {
    let (tx, rx) = shared_responder(r);
    if let Err(e) = raid::add_base_bdev(&p.raid_bdev, &p.base_bdev, move |res| {
        if let Some(r) = take(&tx) {
            match res {
                Ok(()) => r.ok(json!(true)),
                Err(e) => {
                    let msg = format!(
                        "Failed to add base bdev to RAID bdev: {}",
                        strerror(e.errno())
                    );
                    r.err(fmt_err(&e, msg))
                }
            }
        }
    }) {
        if let Some(r) = take(&rx) {
            let msg = if e.kind == crate::ErrorKind::NotFound && raid::info(&p.raid_bdev).is_none()
            {
                format!("raid bdev {} is not found in config", p.raid_bdev)
            } else {
                format!(
                    "Failed to add base bdev {} to RAID bdev {}: {}",
                    p.base_bdev,
                    p.raid_bdev,
                    strerror(e.errno())
                )
            };
            r.err(fmt_err(&e, msg));
        }
    }
}

fn remove_base(p: RemoveBase, r: Responder) {
    let (tx, rx) = shared_responder(r);
    if let Err(e) = raid::remove_base_bdev(&p.name, move |res| {
        if let Some(r) = take(&tx) {
            match res {
                Ok(()) => r.ok(json!(true)),
                Err(e) => r.err(fmt_err(
                    &e,
                    "Failed to remove base bdev from raid bdev".into(),
                )),
            }
        }
    }) {
        if let Some(r) = take(&rx) {
            r.err(fmt_err(
                &e,
                "Failed to remove base bdev from raid bdev".into(),
            ));
        }
    }
}

fn set_options(p: SetOptions, r: Responder) {
    let (mut o, _) = raid::options();
    if let Some(w) = p.process_window_size_kb {
        o.process_window_size_kb = w;
    }
    if let Some(b) = p.process_max_bandwidth_mb_sec {
        o.process_max_bandwidth_mb_sec = b;
    }
    match raid::set_options(o, p.process_max_bandwidth_mb_sec.is_some()) {
        Ok(()) => r.ok(json!(true)),
        Err(e) => r.err(e.into()),
    }
}

/// The `bdev_raid_set_options` entry of the `bdev` subsystem's `save_config` (SPDK writes it among the module
/// options, before the bdevs). The bandwidth limit, which SPDK v24.05 did not have, is written once it was set.
pub fn options_config_entry() -> Value {
    let (o, bandwidth_set) = raid::options();
    let mut p = Map::new();
    p.insert(
        "process_window_size_kb".into(),
        json!(o.process_window_size_kb),
    );
    if bandwidth_set {
        p.insert(
            "process_max_bandwidth_mb_sec".into(),
            json!(o.process_max_bandwidth_mb_sec),
        );
    }
    json!({"method": "bdev_raid_set_options", "params": Value::Object(p)})
}

/// Current options (for embedding applications).
pub fn current_options() -> RaidOptions {
    raid::options().0
}

/// Registers the raid methods, and the raid examine callback.
pub fn register_rpcs(reg: &mut Registry) {
    crate::init();
    method(reg, "bdev_raid_get_bdevs", STATE_RUNTIME, get_bdevs);
    method(reg, "bdev_raid_create", STATE_RUNTIME, create);
    method(reg, "bdev_raid_delete", STATE_RUNTIME, delete);
    method(reg, "bdev_raid_add_base_bdev", STATE_RUNTIME, add_base);
    method(
        reg,
        "bdev_raid_remove_base_bdev",
        STATE_RUNTIME,
        remove_base,
    );
    method(
        reg,
        "bdev_raid_set_options",
        STATE_STARTUP | STATE_RUNTIME,
        set_options,
    );
}
