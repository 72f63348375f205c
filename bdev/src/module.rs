//! Bdev modules (SPDK's `struct spdk_bdev_module`) and the `bdev` subsystem that walks them: module init in
//! registration order, `save_config` in SPDK's module-list order, and at shutdown every bdev unregistered (the
//! top-most first) before the modules finish in reverse order.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use jsonrpc::Registry;
use serde_json::{json, Value};
use subsystems::framework::{chain, FiniDone, InitDone, Subsystem};

/// A bdev module. Every call runs on the app thread.
pub trait BdevModule: Send + Sync {
    /// The module's name (`malloc`, `raid`, ...).
    fn name(&self) -> &'static str;
    /// Registers the module's RPC methods.
    fn register_rpcs(&self, _reg: &mut Registry) {}
    /// Starts the module (at `framework_start_init`); may finish later.
    fn init(&self, done: InitDone) {
        done(Ok(()))
    }
    /// Whether the module examines new bdevs. SPDK lists examining modules first (in reverse registration
    /// order), and `save_config` follows that list.
    fn examines(&self) -> bool {
        false
    }
    /// Module-level `save_config` entries (options, and entries that create many bdevs at once), written after
    /// `bdev_set_options` and before the per-bdev entries.
    fn config_json(&self) -> Vec<Value> {
        Vec::new()
    }
    /// Stops the module once every bdev is unregistered (e.g. unload a blobstore, detach controllers); may
    /// finish later.
    fn fini(&self, done: FiniDone) {
        done()
    }
}

fn registry() -> MutexGuard<'static, Vec<Arc<dyn BdevModule>>> {
    static MODULES: OnceLock<Mutex<Vec<Arc<dyn BdevModule>>>> = OnceLock::new();
    MODULES
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Registers a module (a second module of the same name is ignored: each crate registers once).
pub fn register_module(m: Arc<dyn BdevModule>) {
    let mut r = registry();
    if r.iter().all(|x| x.name() != m.name()) {
        r.push(m);
    }
}

/// The registered modules, in registration order.
pub fn modules() -> Vec<Arc<dyn BdevModule>> {
    registry().clone()
}

/// The modules in SPDK's module-list order: examining modules, last registered first, then the others.
fn listed() -> Vec<Arc<dyn BdevModule>> {
    let all = modules();
    let mut v: Vec<_> = all.iter().rev().filter(|m| m.examines()).cloned().collect();
    v.extend(all.iter().filter(|m| !m.examines()).cloned());
    v
}

/// A module of this crate (its RPCs are registered with the layer's, see [`crate::rpc::register_rpcs`]).
struct Builtin {
    name: &'static str,
    examines: bool,
}

impl BdevModule for Builtin {
    fn name(&self) -> &'static str {
        self.name
    }
    fn examines(&self) -> bool {
        self.examines
    }
}

/// The `bdev` subsystem, with this crate's modules registered.
pub fn subsystem() -> Arc<dyn Subsystem> {
    use crate::modules::{error, malloc, null, passthru, uring};
    for (name, examines) in [
        (malloc::MODULE, false),
        (null::MODULE, false),
        (uring::MODULE_AIO, false),
        (uring::MODULE_URING, false),
        (error::MODULE, true),
        (passthru::MODULE, true),
    ] {
        register_module(Arc::new(Builtin { name, examines }));
    }
    Arc::new(BdevSubsystem)
}

struct BdevSubsystem;

impl Subsystem for BdevSubsystem {
    fn name(&self) -> &'static str {
        "bdev"
    }

    fn register_rpcs(&self, reg: &mut Registry) {
        crate::rpc::register_rpcs(reg);
        for m in modules() {
            m.register_rpcs(reg);
        }
    }

    fn init(&self, done: InitDone) {
        chain(modules(), |m, d| m.init(d), done)
    }

    fn fini(&self, done: FiniDone) {
        unregister_all(Box::new(move || {
            let mut mods = modules();
            mods.reverse();
            chain::<_, ()>(
                mods,
                |m, d| m.fini(Box::new(move || d(Ok(())))),
                Box::new(move |_| done()),
            )
        }));
    }

    fn config_json(&self) -> Option<Value> {
        Some(config_json())
    }
}

/// The `bdev` subsystem's `save_config` array in SPDK's order: `bdev_set_options`, the modules' entries, each
/// bdev's creation (+ `bdev_enable_histogram`), `bdev_wait_for_examine`.
pub fn config_json() -> Value {
    let mut v = vec![json!({"method": "bdev_set_options", "params": crate::rpc::options()})];
    for m in listed() {
        v.extend(m.config_json());
    }
    for b in crate::list() {
        if let Some(c) = b.write_config() {
            v.push(c);
        }
        if let Some(h) = b.histogram_cfg() {
            // v24.05 writes name and enable; what newer clients set beyond that is written only when set.
            let mut p = json!({"name": b.name(), "enable": true});
            if let Some(t) = h.opc {
                p["opc"] = json!(t.name());
            }
            if h.bucket_shift != crate::histogram::BUCKET_SHIFT_DEFAULT {
                p["granularity"] = json!(h.bucket_shift);
            }
            v.push(json!({"method": "bdev_enable_histogram", "params": p}));
        }
    }
    v.push(json!({"method": "bdev_wait_for_examine"}));
    Value::Array(v)
}

/// Unregisters every bdev one at a time, unclaimed (top-most) ones first so each virtual bdev lets go of its
/// bases before they go, then calls `done`. In-flight I/O completes as the openers close their descriptors.
pub fn unregister_all(done: FiniDone) {
    let bdevs = crate::list();
    let next = bdevs
        .iter()
        .rev()
        .find(|b| !b.is_removing() && b.claimed_by().is_none())
        .or_else(|| bdevs.iter().rev().find(|b| !b.is_removing()))
        .cloned();
    match next {
        Some(b) => {
            // Unregister callbacks must be Send; `done` stays on this thread.
            let done = reactor::OnThread::new(done);
            b.unregister(move |_| done.with(unregister_all))
        }
        None if bdevs.is_empty() => done(),
        // Some are still being removed: look again shortly.
        None => reactor::timer(1000, move || unregister_all(done)).detach(),
    }
}
