//! `passthru`: a virtual bdev that sends every I/O to its base unchanged (SPDK's `bdev_passthru_create` /
//! `bdev_passthru_delete`).
//!
//! This is the module to copy when writing a virtual bdev. Its parts, in order:
//! - a config list: `bdev_passthru_create` records `(base, name)` first and builds the bdev when the base exists,
//!   now or when it registers later (the examine callback), as SPDK does; a delete forgets the pair;
//! - `attach`: open the base, claim it, register a bdev with the base's geometry;
//! - `BdevOps`: what the bdev layer asks of the bdev (types, channels, info, config, destruct);
//! - `ModuleChannel`: per-thread I/O. A passthru maps an I/O onto exactly one base I/O, so it forwards the
//!   descriptor itself ([`crate::IoChannel::forward`]) and restores it on the way back: no second descriptor,
//!   no copy. A module that splits an I/O takes child I/Os instead ([`crate::IoChannel::submit_child`]);
//! - its RPCs, beside it ([`register_rpcs`]).

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use jsonrpc::{Registry, Responder, RpcError, STATE_RUNTIME};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::{
    register, Bdev, BdevError, BdevEvent, BdevOps, BdevParams, Completion, Desc, ErrorKind,
    IoChannel, IoHandle, IoType, ModuleChannel, Result,
};

/// Module name.
pub const MODULE: &str = "passthru";

/// SPDK's namespace for passthru UUIDs derived from the base's (`BDEV_PASSTHRU_NAMESPACE_UUID`), so a passthru
/// over the same base gets the same UUID in SPDK and here.
const NAMESPACE: Uuid = Uuid::from_u128(0x7e25812e_c8c0_4d3f_8599_16d790555b85);

/// A requested passthru: built when its base exists.
#[derive(Clone, Debug)]
struct Config {
    base: String,
    name: String,
    uuid: Option<Uuid>,
}

fn configs() -> MutexGuard<'static, Vec<Config>> {
    static CONFIGS: OnceLock<Mutex<Vec<Config>>> = OnceLock::new();
    CONFIGS
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Creates passthru bdev `name` over `base` (`bdev_passthru_create`). When `base` does not exist yet this
/// succeeds and the bdev appears once it does.
pub fn create(base: &str, name: &str, uuid: Option<Uuid>) -> Result<()> {
    // The examine callback only matters once a passthru was asked for.
    static EXAMINER: OnceLock<()> = OnceLock::new();
    EXAMINER.get_or_init(|| crate::register_examiner(MODULE, Arc::new(examine)));
    {
        let mut c = configs();
        if c.iter().any(|c| c.name == name) {
            return Err(BdevError::new(
                ErrorKind::Exists,
                format!("passthru bdev {name} already exists"),
            ));
        }
        c.push(Config {
            base: base.into(),
            name: name.into(),
            uuid,
        });
    }
    let cfg = Config {
        base: base.into(),
        name: name.into(),
        uuid,
    };
    match attach(&cfg) {
        Ok(_) => Ok(()),
        Err(e) if e.kind == ErrorKind::NotFound && crate::get(base).is_none() => {
            log::info!("passthru {name}: creation deferred until bdev {base} arrives");
            Ok(())
        }
        Err(e) => {
            configs().retain(|c| c.name != name);
            Err(e)
        }
    }
}

/// Deletes passthru bdev `name` (`bdev_passthru_delete`); it is not re-created if its base comes back.
pub fn delete(name: &str, done: impl FnOnce(Result<()>) + Send + 'static) {
    let owned = name.to_string();
    crate::unregister_by_name(name, MODULE, move |res| {
        if res.is_ok() {
            configs().retain(|c| c.name != owned);
        }
        done(res)
    });
}

/// Examine callback: builds the passthrus waiting for `bdev`.
fn examine(bdev: &Bdev) {
    let waiting: Vec<Config> = configs()
        .iter()
        .filter(|c| c.base == bdev.name() || bdev.aliases().contains(&c.base))
        .cloned()
        .collect();
    for c in waiting {
        if crate::get(&c.name).is_none() {
            if let Err(e) = attach(&c) {
                log::error!("passthru {}: cannot attach to {}: {e}", c.name, c.base);
            }
        }
    }
}

/// Opens and claims the base, then registers the passthru with its geometry.
fn attach(cfg: &Config) -> Result<Bdev> {
    let name = cfg.name.clone();
    let on_event: crate::EventCb = Arc::new(move |ev, base: &Bdev| {
        if ev == BdevEvent::Remove {
            // Hot-remove keeps the config: the passthru comes back with its base, as in SPDK.
            log::info!("passthru {name}: base {} is going away", base.name());
            crate::unregister_by_name(&name, MODULE, |_| {});
        }
    });
    let mut desc = crate::open(&cfg.base, true, Some(on_event))?;
    desc.claim(MODULE)?;
    let base = desc.bdev().clone();
    let bp = base.params();
    let mut p = BdevParams::new(&cfg.name, bp.block_size, base.num_blocks());
    p.uuid = Some(
        cfg.uuid
            .unwrap_or_else(|| Uuid::new_v5(&NAMESPACE, base.uuid().as_bytes())),
    );
    p.product_name = "passthru".into();
    p.write_cache = bp.write_cache;
    p.required_alignment = bp.required_alignment;
    p.optimal_io_boundary = bp.optimal_io_boundary;
    p.physical_block_size = bp.physical_block_size;
    // On failure the descriptor, and with it the claim, is dropped.
    register(
        p,
        Box::new(Passthru {
            base,
            desc: Mutex::new(Some(desc)),
        }),
    )
}

struct Passthru {
    base: Bdev,
    /// The claimed base; released when the passthru is destroyed.
    desc: Mutex<Option<Desc>>,
}

impl BdevOps for Passthru {
    fn module_name(&self) -> &'static str {
        MODULE
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        self.base.io_type_supported(t)
    }

    fn create_channel(&self, _bdev: &Bdev) -> Box<dyn ModuleChannel> {
        let base = self
            .desc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|d| d.channel());
        Box::new(PassthruChannel { base })
    }

    fn destruct(&self, _bdev: &Bdev) {
        self.desc.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn dump_info(&self, bdev: &Bdev, out: &mut Map<String, Value>) {
        out.insert(
            "passthru".into(),
            json!({"name": bdev.name(), "base_bdev_name": self.base.name()}),
        );
    }

    fn write_config(&self, bdev: &Bdev) -> Option<Value> {
        Some(json!({
            "method": "bdev_passthru_create",
            "params": {
                "base_bdev_name": self.base.name(),
                "name": bdev.name(),
                "uuid": bdev.uuid().to_string(),
            }
        }))
    }
}

struct PassthruChannel {
    /// This thread's channel on the base (`None` once the base was released).
    base: Option<IoChannel>,
}

impl ModuleChannel for PassthruChannel {
    fn submit(&mut self, io: IoHandle) {
        match &self.base {
            Some(base) => {
                let offset = io.offset_blocks();
                base.forward(io, offset, Completion::Fn(base_done), 0);
            }
            None => io.complete(crate::IoStatus::Failed(libc::ENODEV)),
        }
    }
}

/// The base finished a forwarded I/O: hand it back to the passthru's submitter with the base's status.
fn base_done(mut io: IoHandle) {
    io.restore();
    let status = io.status();
    io.complete(status);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    base_bdev_name: String,
    name: String,
    uuid: Option<Uuid>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteParams {
    name: String,
}

/// Registers the module's RPC methods.
pub fn register_rpcs(reg: &mut Registry) {
    crate::rpc::method(
        reg,
        "bdev_passthru_create",
        STATE_RUNTIME,
        |p: CreateParams, r: Responder| match create(&p.base_bdev_name, &p.name, p.uuid) {
            Ok(()) => r.ok(json!(p.name)),
            Err(e) => r.err(RpcError::from(e)),
        },
    );
    crate::rpc::method(
        reg,
        "bdev_passthru_delete",
        STATE_RUNTIME,
        |p: DeleteParams, r: Responder| {
            delete(&p.name, move |res| match res {
                Ok(()) => r.ok(json!(true)),
                Err(e) => r.err(RpcError::from(e)),
            })
        },
    );
}
