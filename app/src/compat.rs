//! SPDK subsystems and option methods this target has no engine for (yet): iobuf, sock, accel, scheduler, vmd,
//! keyring, nvmf, iscsi, ublk, and the option methods of bdev modules we do not implement.
//!
//! Operators keep JSON configs saved by SPDK v24.x's `save_config`. Every option method in them is registered
//! here with SPDK's state mask; its parameters are decoded into the typed option structs of the `subsystems`
//! crate (unknown fields, JSON types, integer ranges, required fields) and checked as SPDK does, KEPT in
//! [`KeptOptions`], and written back by [`KeptOptions::entries`] exactly as SPDK v24.05's `spdk_tgt` writes
//! them. Nothing here stops the target from starting: defaults are kept until a method is called. This module is
//! the wiring only: which methods, their state masks, what a call changes in the store, and where each entry
//! goes in the saved config; the options, their defaults and SPDK's checks live in `subsystems`.
//!
//! The reference is `spdk_tgt` of SPDK v24.05 built with `./configure` defaults (vhost on; ublk, uring, iSCSI
//! initiator, IDXD and RDMA off). Policy for what a v24.05 `save_config` would not show:
//! - entries of build-optional modules (`keyring_linux_set_options`, the `uring` sock impl, `bdev_iscsi_set_options`,
//!   `dsa`/`iaa` scans, `ublk_create_target`) are written only once they were set;
//! - fields added after v24.05 (up to 26.x, e.g. `iobuf_set_options.enable_numa`,
//!   `bdev_nvme_set_options.tcp_connect_timeout_ms`, `nvmf_set_config.dup_host_policy`) and fields v24.05 accepts
//!   but does not save (`nvmf_set_config.dhchap_*`) are accepted, kept, and written only when set;
//! - deprecated aliases SPDK v24.05 still accepts (`bdev_nvme_set_options.retry_count`,
//!   `iscsi_set_options.no_discovery_auth` & co., methods `enable_vmd`, `*_scan_accel_engine`) are accepted and
//!   written under their current names.
//!
//! Decoding errors are `-32602` naming the field (``unknown field `x`, expected one of ...``,
//! ``invalid type: string "x", expected u32 for field `y` ``, ``missing field `z` ``); value checks that SPDK makes
//! in the RPC answer with SPDK's code and message (e.g. `-22 "Invalid argument"`), with the detail logged.
//!
//! Parameter objects are the option structs serialized, members in SPDK's order, which output keeps with
//! serde_json's `preserve_order` feature (enabled by the workspace); without it members would come out sorted,
//! which JSON readers (and SPDK's loader) ignore.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use jsonrpc::{Registry, Responder, RpcError, STATE_RUNTIME, STATE_STARTUP};
use serde_json::{json, Value};
use subsystems::accel::{
    AccelAssignOpc, AccelCryptoKeyCreate, AccelCryptoKeyDestroy, AccelOptions, AccelSetDriver,
    DsaScanAccelModule, Opcode,
};
use subsystems::bdev_iscsi::BdevIscsiOptions;
use subsystems::bdev_nvme::{NvmeHotplug, NvmeOptions};
use subsystems::cpuset::CpuSet;
use subsystems::fsdev::FsdevOptions;
use subsystems::iobuf::IobufOptions;
use subsystems::iscsi::IscsiOptions;
use subsystems::keyring::{KeyringFileAddKey, KeyringFileRemoveKey, KeyringLinuxOptions};
use subsystems::nvmf::{NvmfConfig, NvmfCrdt, NvmfMaxSubsystems};
use subsystems::params::{to_object, Name};
use subsystems::scheduler::Scheduler;
use subsystems::sock::{self, SockImplOptions, SockSetDefaultImpl, SOCK_IMPLS};
use subsystems::ublk::UblkCreateTarget;
use subsystems::vmd::Vmd;
use subsystems::{decode, decode_over};

/// One SPDK subsystem as `framework_get_subsystems` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubsystemInfo {
    /// Subsystem name, e.g. `"bdev"`.
    pub name: &'static str,
    /// Subsystems it depends on, in SPDK's `SPDK_SUBSYSTEM_DEPEND` registration order.
    pub depends_on: &'static [&'static str],
}

const fn sub(name: &'static str, depends_on: &'static [&'static str]) -> SubsystemInfo {
    SubsystemInfo { name, depends_on }
}

/// SPDK v24.05 `spdk_tgt`'s subsystems in its init order, which is the order of `framework_get_subsystems` and
/// of the `save_config` document.
///
/// SPDK registers subsystems from constructors in link order (iscsi, nvmf, nbd, (ublk), vhost_blk, vhost_scsi,
/// scheduler, scsi, bdev, accel, vmd, sock, iobuf, keyring for `app/spdk_tgt`'s library list), then
/// `subsystem_sort()` repeatedly moves, in list order, every subsystem whose dependencies are already sorted.
/// That yields this order (the same method reproduces the `scheduler, accel, vmd, sock, bdev, ...` order seen in
/// saved configs of v22.x). Two entries are not in a default v24.05 build and are listed (in their place) so
/// that configs from other builds keep their section: `ublk` (builds `--with-ublk`) and `fsdev` (SPDK 24.09+,
/// which always saves `fsdev_set_opts` there). An empty section is harmless to any SPDK's `load_config`.
///
/// This is the order of the default static build. A `--with-shared` build runs the constructors of its shared
/// libraries in reverse link order and so lists [`SHARED_BUILD_ORDER`] instead (same dependencies).
pub const SUBSYSTEMS: &[SubsystemInfo] = &[
    sub("scheduler", &[]),
    sub("vmd", &[]),
    sub("sock", &[]),
    sub("iobuf", &[]),
    sub("keyring", &[]),
    sub("fsdev", &[]),
    sub("accel", &["iobuf"]),
    sub("bdev", &["accel", "keyring", "vmd", "sock", "iobuf"]),
    sub("nvmf", &["bdev", "keyring", "sock"]),
    sub("nbd", &["bdev"]),
    sub("ublk", &["bdev"]),
    sub("vhost_blk", &["bdev"]),
    sub("scsi", &["bdev"]),
    sub("iscsi", &["scsi", "sock"]),
    sub("vhost_scsi", &["scsi"]),
];

/// The subsystem order of a SPDK v24.05 `spdk_tgt` built `--with-shared` (with ublk; `fsdev` from 24.09), for
/// reference: the dynamic loader runs library constructors in reverse link order, which `subsystem_sort()`
/// then keeps.
pub const SHARED_BUILD_ORDER: &[&str] = &[
    "fsdev",
    "keyring",
    "iobuf",
    "sock",
    "vmd",
    "accel",
    "bdev",
    "scsi",
    "scheduler",
    "vhost_scsi",
    "vhost_blk",
    "ublk",
    "nbd",
    "nvmf",
    "iscsi",
];

/// Whether SPDK's `framework_get_config` answers `null` (not an array) for `subsystem`: true for `scsi`, which
/// has no config writer, so `save_config` shows `{"subsystem": "scsi", "config": null}`.
pub fn config_is_null(subsystem: &str) -> bool {
    subsystem == "scsi"
}

/// Every method [`register`] registers, with SPDK v24.05's state mask.
pub const KEPT_METHODS: &[(&str, u32)] = &[
    ("framework_set_scheduler", STATE_STARTUP | STATE_RUNTIME),
    ("vmd_enable", STATE_STARTUP),
    ("sock_set_default_impl", STATE_STARTUP),
    ("sock_impl_set_options", STATE_STARTUP),
    ("iobuf_set_options", STATE_STARTUP),
    ("keyring_file_add_key", STATE_RUNTIME),
    ("keyring_file_remove_key", STATE_RUNTIME),
    ("keyring_linux_set_options", STATE_STARTUP),
    ("accel_set_options", STATE_STARTUP),
    ("accel_assign_opc", STATE_STARTUP),
    ("accel_set_driver", STATE_STARTUP),
    ("accel_crypto_key_create", STATE_RUNTIME),
    ("accel_crypto_key_destroy", STATE_RUNTIME),
    ("ioat_scan_accel_module", STATE_STARTUP),
    ("dsa_scan_accel_module", STATE_STARTUP),
    ("iaa_scan_accel_module", STATE_STARTUP),
    ("bdev_nvme_set_options", STATE_STARTUP | STATE_RUNTIME),
    ("bdev_nvme_set_hotplug", STATE_RUNTIME),
    ("bdev_iscsi_set_options", STATE_STARTUP | STATE_RUNTIME),
    ("nvmf_set_config", STATE_STARTUP),
    ("nvmf_set_max_subsystems", STATE_STARTUP),
    ("nvmf_set_crdt", STATE_STARTUP),
    ("iscsi_set_options", STATE_STARTUP),
    ("ublk_create_target", STATE_RUNTIME),
    ("ublk_destroy_target", STATE_RUNTIME),
    ("fsdev_set_opts", STATE_RUNTIME),
];

/// Deprecated method aliases SPDK v24.05 registers for kept methods: `(alias, method)`.
pub const KEPT_ALIASES: &[(&str, &str)] = &[
    ("enable_vmd", "vmd_enable"),
    ("ioat_scan_accel_engine", "ioat_scan_accel_module"),
    ("dsa_scan_accel_engine", "dsa_scan_accel_module"),
    ("iaa_scan_accel_engine", "iaa_scan_accel_module"),
];

/// A bdev module with no engine yet whose options are kept: it only writes them in `save_config`.
struct KeptBdevModule {
    name: &'static str,
    entries: Mutex<Vec<Value>>,
    /// The part of the module that has an engine already: its entries go after the first kept one (the nvme
    /// module's attached controllers, between `bdev_nvme_set_options` and `bdev_nvme_set_hotplug`, as SPDK
    /// writes them), and its fini runs with the module's.
    engine: Option<Engine>,
}

/// What a kept module's engine adds: its `save_config` entries, and its fini.
type Engine = (fn() -> Vec<Value>, fn());

impl bdev::BdevModule for KeptBdevModule {
    fn name(&self) -> &'static str {
        self.name
    }
    fn config_json(&self) -> Vec<Value> {
        let mut v = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some((entries, _)) = self.engine {
            let at = v.len().min(1);
            v.splice(at..at, entries());
        }
        v
    }
    fn fini(&self, done: subsystems::framework::FiniDone) {
        if let Some((_, fini)) = self.engine {
            fini();
        }
        done()
    }
}

/// Registers every method of [`KEPT_METHODS`] (and the aliases of [`KEPT_ALIASES`]) on `reg`; each one runs
/// [`KeptOptions::call`] on `store` and answers its result (`true` on success, as SPDK does).
pub fn register(reg: &mut Registry, store: Rc<RefCell<KeptOptions>>) {
    // The bdev modules without an engine yet: registered so the bdev layer's `save_config` walk writes their
    // kept options in their place in SPDK's module list.
    let modules: Vec<Arc<KeptBdevModule>> = ["nvme", "iscsi"]
        .into_iter()
        .map(|name| {
            Arc::new(KeptBdevModule {
                name,
                entries: Mutex::new(store.borrow().kept_module_entries(name)),
                engine: (name == "nvme").then_some((
                    bdev_nvme::config_entries as fn() -> Vec<Value>,
                    bdev_nvme::detach_all as fn(),
                )),
            })
        })
        .collect();
    for m in &modules {
        bdev::register_module(m.clone());
    }
    // The controller methods of the nvme module (its option methods stay kept here until it takes them).
    bdev_nvme::register_rpcs(reg);
    for &(name, state) in KEPT_METHODS {
        // A linked subsystem that implements the method (the NVMe-oF target's option methods) owns it.
        if reg.state_mask(name).is_some() {
            continue;
        }
        let store = store.clone();
        let modules = modules.clone();
        reg.register(
            name,
            state,
            Rc::new(move |params: Option<Value>, r: Responder| {
                if name == "bdev_nvme_set_options" && bdev_nvme::has_controllers() {
                    return r.err(RpcError::new(
                        -libc::EPERM,
                        "RPC not permitted with nvme controllers already attached",
                    ));
                }
                let res = store.borrow_mut().call(name, params);
                if res.is_ok() {
                    if name == "bdev_nvme_set_options" {
                        bdev_nvme::set_options(&store.borrow().nvme);
                    }
                    if name == "bdev_nvme_set_hotplug" {
                        let h = store.borrow().hotplug.clone();
                        bdev_nvme::set_hotplug(h.enable, h.period_us);
                    }
                    for m in &modules {
                        *m.entries.lock().unwrap_or_else(|e| e.into_inner()) =
                            store.borrow().kept_module_entries(m.name);
                    }
                }
                match res {
                    Ok(v) => r.ok(v),
                    Err(e) => r.err(e),
                }
            }),
        );
    }
    for &(alias, target) in KEPT_ALIASES {
        reg.register_alias(alias, target);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The store.

fn entry(method: &str, params: Value) -> Value {
    json!({"method": method, "params": params})
}

/// The current options of every kept method, typed (see the `subsystems` crate), starting from SPDK v24.05's
/// defaults. Build-optional and one-shot methods (`vmd_enable`, `*_scan_accel_module`,
/// `keyring_linux_set_options`, `bdev_iscsi_set_options`, `ublk_create_target`, `accel_set_driver`,
/// `fsdev_set_opts`) are kept only once called.
#[derive(Debug, Clone)]
pub struct KeptOptions {
    scheduler: Scheduler,
    vmd: Vmd,
    sock_default: SockSetDefaultImpl,
    /// Per-impl options in SPDK's write order (`uring` first when present, then `ssl`, `posix`).
    sock_impls: Vec<SockImplOptions>,
    iobuf: IobufOptions,
    keyring_keys: Vec<KeyringFileAddKey>,
    keyring_linux: Option<KeyringLinuxOptions>,
    accel: AccelOptions,
    accel_driver: Option<AccelSetDriver>,
    ioat: bool,
    dsa: Option<DsaScanAccelModule>,
    iaa: bool,
    /// `accel_assign_opc` assignments, by operation.
    opc_overrides: BTreeMap<Opcode, String>,
    crypto_keys: Vec<AccelCryptoKeyCreate>,
    fsdev: Option<FsdevOptions>,
    nvme: NvmeOptions,
    hotplug: NvmeHotplug,
    bdev_iscsi: Option<BdevIscsiOptions>,
    nvmf: NvmfConfig,
    nvmf_max_subsystems: NvmfMaxSubsystems,
    /// `nvmf_set_max_subsystems` was called with a non-zero value (SPDK refuses a second call then).
    nvmf_max_subsystems_set: bool,
    nvmf_crdt: NvmfCrdt,
    iscsi: IscsiOptions,
    /// `iscsi_set_options` was called (SPDK refuses a second call).
    iscsi_set: bool,
    ublk: Option<UblkCreateTarget>,
    /// The application's core mask, when known (see [`set_app_cpumask`](Self::set_app_cpumask)).
    app_cpumask: Option<CpuSet>,
}

impl Default for KeptOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl KeptOptions {
    /// SPDK v24.05's defaults.
    pub fn new() -> Self {
        KeptOptions {
            scheduler: Scheduler::default(),
            vmd: Vmd::default(),
            sock_default: SockSetDefaultImpl::default(),
            sock_impls: vec![SockImplOptions::new("ssl"), SockImplOptions::new("posix")],
            iobuf: IobufOptions::default(),
            keyring_keys: Vec::new(),
            keyring_linux: None,
            accel: AccelOptions::default(),
            accel_driver: None,
            ioat: false,
            dsa: None,
            iaa: false,
            opc_overrides: BTreeMap::new(),
            crypto_keys: Vec::new(),
            fsdev: None,
            nvme: NvmeOptions::default(),
            hotplug: NvmeHotplug::default(),
            bdev_iscsi: None,
            nvmf: NvmfConfig::default(),
            nvmf_max_subsystems: NvmfMaxSubsystems::default().effective(),
            nvmf_max_subsystems_set: false,
            nvmf_crdt: NvmfCrdt::default(),
            iscsi: IscsiOptions::default(),
            iscsi_set: false,
            ublk: None,
            app_cpumask: None,
        }
    }

    /// Tells the store the application's core mask (`-m`), as `spdk_env_get_cpuset()` gives SPDK: the default
    /// `cpumask` that `ublk_create_target` saves, and the bound `nvmf_set_config.poll_groups_mask` must fit in.
    /// Without it, masks are not checked against the cores.
    pub fn set_app_cpumask(&mut self, mask: &str) -> Result<(), String> {
        let set = CpuSet::parse(mask).ok_or_else(|| format!("invalid cpumask {mask}"))?;
        self.app_cpumask = Some(set);
        Ok(())
    }

    /// Mirrors SPDK's subsystem init where it matters here: the `scheduler` subsystem selects `static` when no
    /// scheduler was set (a later `framework_set_scheduler {"name": "static"}` then keeps the 1 s period it sets,
    /// as in SPDK). Call it when subsystems initialize.
    pub fn on_subsystems_init(&mut self) {
        self.scheduler.on_init();
    }

    /// `framework_get_config`'s answer for a subsystem: `Some(null)` for `scsi` (see [`config_is_null`]),
    /// `Some([...])` with [`entries`](Self::entries) for the other subsystems of [`SUBSYSTEMS`], `None` for
    /// unknown names.
    pub fn subsystem_config(&self, subsystem: &str) -> Option<Value> {
        if !SUBSYSTEMS.iter().any(|s| s.name == subsystem) {
            return None;
        }
        if config_is_null(subsystem) {
            return Some(Value::Null);
        }
        Some(Value::Array(self.entries(subsystem)))
    }

    /// `save_config` entries for `subsystem`, in SPDK's order: `[{"method": .., "params": {..}}, ...]`.
    ///
    /// - `scheduler`: `framework_set_scheduler` (`{"name": "static"}` by default; `period` only when non-zero).
    /// - `vmd`: `vmd_enable` once enabled.
    /// - `sock`: `sock_set_default_impl`, then `sock_impl_set_options` per impl (`uring` if kept, `ssl`, `posix`).
    /// - `iobuf`: `iobuf_set_options`.
    /// - `keyring`: `keyring_file_add_key` per key, then `keyring_linux_set_options` if set.
    /// - `accel`: `accel_set_options`, `accel_set_driver` if set, module scans (`ioat`, `dsa`, `iaa`),
    ///   `accel_assign_opc` in opcode order, `accel_crypto_key_create` per key.
    /// - `bdev`: only the kept module entries ([`bdev_module_entries`](Self::bdev_module_entries) then
    ///   [`bdev_trailing_entries`](Self::bdev_trailing_entries)); the bdev layer writes `bdev_set_options`, the
    ///   bdevs and `bdev_wait_for_examine` around them.
    /// - `nvmf`: `nvmf_set_config`, `nvmf_set_max_subsystems`, `nvmf_set_crdt` (transports and subsystems are not
    ///   kept here).
    /// - `iscsi`: `iscsi_set_options` (portal/initiator groups and target nodes are not kept here).
    /// - `ublk`: `ublk_create_target` while created.
    /// - `fsdev` (SPDK 24.09+): `fsdev_set_opts` once set (24.09+ always writes it; its default there is
    ///   `{"fsdev_io_pool_size": 65535, "fsdev_io_cache_size": 256}`).
    /// - `nbd`, `vhost_blk`, `vhost_scsi`, `scsi` and unknown names: nothing (SPDK writes only objects there;
    ///   `scsi` is `null`, see [`subsystem_config`](Self::subsystem_config)).
    pub fn entries(&self, subsystem: &str) -> Vec<Value> {
        let mut v = Vec::new();
        let mut push = |method: &str, params: Value| v.push(entry(method, params));
        match subsystem {
            "scheduler" => push(
                "framework_set_scheduler",
                to_object(&self.scheduler.saved()),
            ),
            "vmd" if self.vmd.enabled => push("vmd_enable", json!({})),
            "sock" => {
                push("sock_set_default_impl", to_object(&self.sock_default));
                for o in &self.sock_impls {
                    push("sock_impl_set_options", to_object(o));
                }
            }
            "iobuf" => push("iobuf_set_options", to_object(&self.iobuf)),
            "keyring" => {
                for k in &self.keyring_keys {
                    push("keyring_file_add_key", to_object(k));
                }
                if let Some(o) = &self.keyring_linux {
                    push("keyring_linux_set_options", to_object(o));
                }
            }
            "accel" => {
                push("accel_set_options", to_object(&self.accel));
                if let Some(d) = &self.accel_driver {
                    push("accel_set_driver", to_object(d));
                }
                if self.ioat {
                    v.push(json!({"method": "ioat_scan_accel_module"}));
                }
                if let Some(d) = &self.dsa {
                    v.push(entry("dsa_scan_accel_module", to_object(d)));
                }
                if self.iaa {
                    v.push(json!({"method": "iaa_scan_accel_module"}));
                }
                for (&opname, module) in &self.opc_overrides {
                    let a = AccelAssignOpc {
                        opname,
                        module: module.clone(),
                    };
                    v.push(entry("accel_assign_opc", to_object(&a)));
                }
                for k in &self.crypto_keys {
                    v.push(entry("accel_crypto_key_create", to_object(k)));
                }
            }
            "bdev" => {
                v.extend(self.bdev_module_entries());
                v.extend(self.bdev_trailing_entries());
            }
            "nvmf" => {
                push("nvmf_set_config", to_object(&self.nvmf));
                push(
                    "nvmf_set_max_subsystems",
                    to_object(&self.nvmf_max_subsystems),
                );
                push("nvmf_set_crdt", to_object(&self.nvmf_crdt));
            }
            "iscsi" => push("iscsi_set_options", to_object(&self.iscsi)),
            "fsdev" => {
                if let Some(o) = &self.fsdev {
                    push("fsdev_set_opts", to_object(o));
                }
            }
            "ublk" => {
                if let Some(u) = &self.ublk {
                    let saved = u.saved(self.app_cpumask.as_ref());
                    push("ublk_create_target", to_object(&saved));
                }
            }
            _ => {}
        }
        v
    }

    /// The bdev-module option entries that SPDK writes inside the `"bdev"` subsystem array after
    /// `bdev_set_options`.
    ///
    /// SPDK v24.05's `bdev` array is: `bdev_set_options`; `bdev_examine` per allow-listed name; then every bdev
    /// module's `config_json` in module-list order (modules with examine callbacks first, in reverse registration
    /// order, then the others in registration order); then per bdev its creation entry (+ `bdev_set_qos_limit`,
    /// `bdev_enable_histogram`); last `bdev_wait_for_examine`. Among the modules, `raid` (an examine module, with
    /// an engine here: it writes its own) writes `bdev_raid_set_options`; `nvme` writes `bdev_nvme_set_options`,
    /// its controllers and discovery services, and `bdev_nvme_set_hotplug` (deliberately after its own
    /// controllers, but still before every bdev entry); `iscsi` (only in builds `--with-iscsi-initiator`) writes
    /// `bdev_iscsi_set_options`. So this returns `[bdev_nvme_set_options, bdev_nvme_set_hotplug]` (+
    /// `bdev_iscsi_set_options` once set); the kept `nvme` and `iscsi` modules registered by [`register`] write
    /// them where the bdev layer's module walk puts those modules. (A
    /// `--with-shared` build registers modules in reverse link order and writes `bdev_iscsi_set_options` between
    /// the raid and nvme entries; loading either order gives the same options.)
    pub fn bdev_module_entries(&self) -> Vec<Value> {
        let mut v = self.kept_module_entries("nvme");
        v.extend(self.kept_module_entries("iscsi"));
        v
    }

    /// The kept entries of one engine-less bdev module (`nvme`, `iscsi`), as that module writes them.
    pub fn kept_module_entries(&self, module: &str) -> Vec<Value> {
        match module {
            "nvme" => vec![
                entry("bdev_nvme_set_options", to_object(&self.nvme)),
                entry("bdev_nvme_set_hotplug", to_object(&self.hotplug)),
            ],
            "iscsi" => self
                .bdev_iscsi
                .iter()
                .map(|o| entry("bdev_iscsi_set_options", to_object(o)))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Kept entries that go after the bdevs and before `bdev_wait_for_examine`: none. In SPDK v24.05 every
    /// module-level entry (including `bdev_nvme_set_hotplug`) precedes all per-bdev entries, see
    /// [`bdev_module_entries`](Self::bdev_module_entries); this exists so callers need not change if a kept
    /// entry ever has to follow the bdevs.
    pub fn bdev_trailing_entries(&self) -> Vec<Value> {
        Vec::new()
    }

    /// The index of `impl_name`'s options; `uring` is added (with its defaults) the first time it is named.
    fn sock_impl_index(&mut self, impl_name: &str) -> Option<usize> {
        if !SOCK_IMPLS.contains(&impl_name) {
            return None;
        }
        if let Some(i) = self
            .sock_impls
            .iter()
            .position(|o| o.impl_name == impl_name)
        {
            return Some(i);
        }
        // Only uring can be missing: it registers last, so SPDK lists it first.
        self.sock_impls.insert(0, SockImplOptions::new(impl_name));
        Some(0)
    }

    /// Runs one kept method (by name or deprecated alias) on the store, as the registered handler does: `Ok`
    /// with the result to answer (`true`), or the error to send. Nothing is kept from a call that fails.
    pub fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let method = KEPT_ALIASES
            .iter()
            .find(|(a, _)| *a == method)
            .map_or(method, |(_, t)| *t);
        let cores = self.app_cpumask.as_ref();
        match method {
            "framework_set_scheduler" => self.scheduler.set(decode(params)?)?,
            "vmd_enable" => {
                jsonrpc::no_params(&params, method)?;
                self.vmd.enabled = true;
            }
            "sock_set_default_impl" => {
                let p: SockSetDefaultImpl = decode(params)?;
                if self.sock_impl_index(&p.impl_name).is_none() {
                    return Err(sock::unknown_impl(method, &p.impl_name));
                }
                self.sock_default = p;
            }
            "sock_impl_set_options" => {
                let p: SockImplOptions = decode(params.clone())?;
                let Some(i) = self.sock_impl_index(&p.impl_name) else {
                    return Err(sock::unknown_impl(method, &p.impl_name));
                };
                self.sock_impls[i] = decode_over(&self.sock_impls[i], params)?;
            }
            "iobuf_set_options" => {
                let o = decode_over(&self.iobuf, params)?;
                o.check()?;
                self.iobuf = o;
            }
            "keyring_file_add_key" => {
                let k: KeyringFileAddKey = decode(params)?;
                k.check(&self.keyring_keys)?;
                subsystems::keyring::add(&k);
                self.keyring_keys.push(k);
            }
            "keyring_file_remove_key" => {
                let p: KeyringFileRemoveKey = decode(params)?;
                subsystems::keyring::remove(&p.name);
                self.keyring_keys.retain(|k| k.name != p.name);
            }
            "keyring_linux_set_options" => {
                let cur = self.keyring_linux.clone().unwrap_or_default();
                self.keyring_linux = Some(decode_over(&cur, params)?);
            }
            "accel_set_options" => self.accel = decode_over(&self.accel, params)?,
            "accel_assign_opc" => {
                let p: AccelAssignOpc = decode(params)?;
                log::info!(
                    "Operation {} will be assigned to module {}",
                    p.opname.name(),
                    p.module
                );
                self.opc_overrides.insert(p.opname, p.module);
            }
            "accel_set_driver" => self.accel_driver = Some(decode(params)?),
            "fsdev_set_opts" => self.fsdev = Some(decode(params)?),
            "accel_crypto_key_create" => {
                let k: AccelCryptoKeyCreate = decode(params)?;
                k.check(&self.crypto_keys)?;
                self.crypto_keys.push(k);
            }
            "accel_crypto_key_destroy" => {
                let p: AccelCryptoKeyDestroy = decode(params)?;
                let before = self.crypto_keys.len();
                self.crypto_keys.retain(|k| k.name != p.key_name);
                if self.crypto_keys.len() == before {
                    return Err(RpcError::invalid_params("No key object found"));
                }
            }
            "ioat_scan_accel_module" => {
                jsonrpc::no_params(&params, method)?;
                self.ioat = true;
            }
            "dsa_scan_accel_module" => {
                let p: DsaScanAccelModule = decode(params)?;
                if self.dsa.is_some() {
                    return Err(RpcError::errno(libc::EALREADY));
                }
                self.dsa = Some(p);
            }
            "iaa_scan_accel_module" => {
                jsonrpc::no_params(&params, method)?;
                if self.iaa {
                    return Err(RpcError::errno(libc::EALREADY));
                }
                self.iaa = true;
            }
            "bdev_nvme_set_options" => {
                let o = decode_over(&self.nvme, params)?;
                o.check()?;
                self.nvme = o;
            }
            "bdev_nvme_set_hotplug" => {
                self.hotplug = decode::<NvmeHotplug>(params)?.normalized();
            }
            "bdev_iscsi_set_options" => {
                let cur = self.bdev_iscsi.clone().unwrap_or_default();
                self.bdev_iscsi = Some(decode_over(&cur, params)?);
            }
            "nvmf_set_config" => {
                let mut o = decode_over(&self.nvmf, params)?;
                o.normalize(cores)?;
                self.nvmf = o;
            }
            "nvmf_set_max_subsystems" => {
                if self.nvmf_max_subsystems_set {
                    log::error!("this RPC must not be called more than once.");
                    return Err(RpcError::internal("Must not call more than once"));
                }
                let p: NvmfMaxSubsystems = decode(params)?;
                self.nvmf_max_subsystems_set = p.max_subsystems != 0;
                self.nvmf_max_subsystems = p.effective();
            }
            // Members not given are reset to 0.
            "nvmf_set_crdt" => self.nvmf_crdt = decode(params)?,
            "iscsi_set_options" => {
                if self.iscsi_set {
                    log::error!("this RPC must not be called more than once.");
                    return Err(RpcError::internal("Must not call more than once"));
                }
                let o = decode_over(&self.iscsi, params)?;
                o.check()?;
                self.iscsi = o;
                self.iscsi_set = true;
            }
            "ublk_create_target" => {
                let p: UblkCreateTarget = decode(params)?;
                if self.ublk.is_some() {
                    log::error!("UBLK target has been created");
                    return Err(RpcError::internal(jsonrpc::strerror(libc::EBUSY)));
                }
                p.check(cores)?;
                self.ublk = Some(p);
            }
            "ublk_destroy_target" => {
                jsonrpc::no_params(&params, method)?;
                if self.ublk.take().is_none() {
                    return Err(RpcError::internal(jsonrpc::strerror(libc::ENOENT)));
                }
            }
            _ => return Err(RpcError::method_not_found()),
        }
        Ok(Value::Bool(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonrpc::{INTERNAL_ERROR, INVALID_PARAMS, INVALID_STATE};

    fn call(k: &mut KeptOptions, m: &str, p: Value) -> Result<Value, RpcError> {
        k.call(m, Some(p))
    }

    fn err_msg(k: &mut KeptOptions, m: &str, p: Value) -> String {
        let e = call(k, m, p).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS, "{e:?}");
        e.message
    }

    /// `save_config` of a default SPDK v24.05 `spdk_tgt` (./configure defaults, no bdevs), as SPDK writes it
    /// (indent 2). The `bdev` array's first and last entries belong to the bdev layer.
    const SPDK_V24_05_DEFAULT: &str = r#"{
  "subsystems": [
    {
      "subsystem": "scheduler",
      "config": [
        {
          "method": "framework_set_scheduler",
          "params": {
            "name": "static"
          }
        }
      ]
    },
    {
      "subsystem": "vmd",
      "config": []
    },
    {
      "subsystem": "sock",
      "config": [
        {
          "method": "sock_set_default_impl",
          "params": {
            "impl_name": "posix"
          }
        },
        {
          "method": "sock_impl_set_options",
          "params": {
            "impl_name": "ssl",
            "recv_buf_size": 4096,
            "send_buf_size": 4096,
            "enable_recv_pipe": true,
            "enable_quickack": false,
            "enable_placement_id": 0,
            "enable_zerocopy_send_server": true,
            "enable_zerocopy_send_client": false,
            "zerocopy_threshold": 0,
            "tls_version": 0,
            "enable_ktls": false
          }
        },
        {
          "method": "sock_impl_set_options",
          "params": {
            "impl_name": "posix",
            "recv_buf_size": 2097152,
            "send_buf_size": 2097152,
            "enable_recv_pipe": true,
            "enable_quickack": false,
            "enable_placement_id": 0,
            "enable_zerocopy_send_server": true,
            "enable_zerocopy_send_client": false,
            "zerocopy_threshold": 0,
            "tls_version": 0,
            "enable_ktls": false
          }
        }
      ]
    },
    {
      "subsystem": "iobuf",
      "config": [
        {
          "method": "iobuf_set_options",
          "params": {
            "small_pool_count": 8192,
            "large_pool_count": 1024,
            "small_bufsize": 8192,
            "large_bufsize": 135168
          }
        }
      ]
    },
    {
      "subsystem": "keyring",
      "config": []
    },
    {
      "subsystem": "accel",
      "config": [
        {
          "method": "accel_set_options",
          "params": {
            "small_cache_size": 128,
            "large_cache_size": 16,
            "task_count": 2048,
            "sequence_count": 2048,
            "buf_count": 2048
          }
        }
      ]
    },
    {
      "subsystem": "bdev",
      "config": [
        {
          "method": "bdev_set_options",
          "params": {
            "bdev_io_pool_size": 65535,
            "bdev_io_cache_size": 256,
            "bdev_auto_examine": true,
            "iobuf_small_cache_size": 128,
            "iobuf_large_cache_size": 16
          }
        },
        {
          "method": "bdev_raid_set_options",
          "params": {
            "process_window_size_kb": 1024
          }
        },
        {
          "method": "bdev_nvme_set_options",
          "params": {
            "action_on_timeout": "none",
            "timeout_us": 0,
            "timeout_admin_us": 0,
            "keep_alive_timeout_ms": 10000,
            "arbitration_burst": 0,
            "low_priority_weight": 0,
            "medium_priority_weight": 0,
            "high_priority_weight": 0,
            "nvme_adminq_poll_period_us": 10000,
            "nvme_ioq_poll_period_us": 0,
            "io_queue_requests": 0,
            "delay_cmd_submit": true,
            "transport_retry_count": 4,
            "bdev_retry_count": 3,
            "transport_ack_timeout": 0,
            "ctrlr_loss_timeout_sec": 0,
            "reconnect_delay_sec": 0,
            "fast_io_fail_timeout_sec": 0,
            "disable_auto_failback": false,
            "generate_uuids": false,
            "transport_tos": 0,
            "nvme_error_stat": false,
            "rdma_srq_size": 0,
            "io_path_stat": false,
            "allow_accel_sequence": false,
            "rdma_max_cq_size": 0,
            "rdma_cm_event_timeout_ms": 0,
            "dhchap_digests": [
              "sha256",
              "sha384",
              "sha512"
            ],
            "dhchap_dhgroups": [
              "null",
              "ffdhe2048",
              "ffdhe3072",
              "ffdhe4096",
              "ffdhe6144",
              "ffdhe8192"
            ]
          }
        },
        {
          "method": "bdev_nvme_set_hotplug",
          "params": {
            "period_us": 100000,
            "enable": false
          }
        },
        {
          "method": "bdev_wait_for_examine"
        }
      ]
    },
    {
      "subsystem": "nvmf",
      "config": [
        {
          "method": "nvmf_set_config",
          "params": {
            "discovery_filter": "match_any",
            "admin_cmd_passthru": {
              "identify_ctrlr": false
            }
          }
        },
        {
          "method": "nvmf_set_max_subsystems",
          "params": {
            "max_subsystems": 1024
          }
        },
        {
          "method": "nvmf_set_crdt",
          "params": {
            "crdt1": 0,
            "crdt2": 0,
            "crdt3": 0
          }
        }
      ]
    },
    {
      "subsystem": "nbd",
      "config": []
    },
    {
      "subsystem": "vhost_blk",
      "config": []
    },
    {
      "subsystem": "scsi",
      "config": null
    },
    {
      "subsystem": "iscsi",
      "config": [
        {
          "method": "iscsi_set_options",
          "params": {
            "node_base": "iqn.2016-06.io.spdk",
            "max_sessions": 128,
            "max_connections_per_session": 2,
            "max_queue_depth": 64,
            "default_time2wait": 2,
            "default_time2retain": 20,
            "first_burst_length": 8192,
            "immediate_data": true,
            "allow_duplicated_isid": false,
            "error_recovery_level": 0,
            "nop_timeout": 60,
            "nop_in_interval": 30,
            "disable_chap": false,
            "require_chap": false,
            "mutual_chap": false,
            "chap_group": 0,
            "max_large_datain_per_connection": 64,
            "max_r2t_per_connection": 4,
            "pdu_pool_size": 36864,
            "immediate_data_pool_size": 16384,
            "data_out_pool_size": 2048
          }
        }
      ]
    },
    {
      "subsystem": "vhost_scsi",
      "config": []
    }
  ]
}"#;

    #[test]
    fn defaults_match_spdk_v24_05() {
        let doc: Value = serde_json::from_str(SPDK_V24_05_DEFAULT).unwrap();
        let spdk: Vec<(String, Value)> = doc["subsystems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["subsystem"].as_str().unwrap().to_string(),
                    s["config"].clone(),
                )
            })
            .collect();
        // Same subsystems in the same order, except ublk (listed here, absent without --with-ublk) and fsdev
        // (SPDK 24.09+).
        let ours: Vec<&str> = SUBSYSTEMS
            .iter()
            .map(|s| s.name)
            .filter(|n| *n != "ublk" && *n != "fsdev")
            .collect();
        let theirs: Vec<&str> = spdk.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(ours, theirs);
        let k = KeptOptions::new();
        let text = |v: &Value| serde_json::to_string_pretty(v).unwrap();
        for (name, config) in &spdk {
            let expected = if name == "bdev" {
                // Less the bdev layer's own entries and raid's (a module with an engine writes its own).
                let a = config.as_array().unwrap();
                Value::Array(
                    a[1..a.len() - 1]
                        .iter()
                        .filter(|e| e["method"] != "bdev_raid_set_options")
                        .cloned()
                        .collect(),
                )
            } else {
                config.clone()
            };
            let got = k.subsystem_config(name).unwrap();
            assert_eq!(got, expected, "subsystem {name}");
            // Member order too (serde_json's preserve_order is on in the workspace).
            assert_eq!(text(&got), text(&expected), "subsystem {name}");
        }
        assert_eq!(k.subsystem_config("ublk"), Some(json!([])));
        assert_eq!(k.subsystem_config("fsdev"), Some(json!([])));
        assert_eq!(k.bdev_trailing_entries(), Vec::<Value>::new());
        assert!(k.subsystem_config("nope").is_none());
        assert!(k.entries("nope").is_empty());
    }

    #[test]
    fn default_is_new() {
        let d = KeptOptions::default();
        for s in SUBSYSTEMS {
            assert_eq!(d.entries(s.name), KeptOptions::new().entries(s.name));
        }
    }

    #[test]
    fn subsystem_order_and_dependencies() {
        let names: Vec<&str> = SUBSYSTEMS.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "scheduler",
                "vmd",
                "sock",
                "iobuf",
                "keyring",
                "fsdev",
                "accel",
                "bdev",
                "nvmf",
                "nbd",
                "ublk",
                "vhost_blk",
                "scsi",
                "iscsi",
                "vhost_scsi"
            ]
        );
        // Dependency-sorted: every dependency comes earlier.
        for (i, s) in SUBSYSTEMS.iter().enumerate() {
            for d in s.depends_on {
                let j = names.iter().position(|n| n == d).expect("known dependency");
                assert!(j < i, "{} depends on later {d}", s.name);
            }
        }
        // The shared-build order is the same set, also dependency-sorted.
        let mut a = names.clone();
        let mut b = SHARED_BUILD_ORDER.to_vec();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        for (i, n) in SHARED_BUILD_ORDER.iter().enumerate() {
            let s = SUBSYSTEMS.iter().find(|s| s.name == *n).unwrap();
            for d in s.depends_on {
                assert!(SHARED_BUILD_ORDER[..i].contains(d), "{n} before {d}");
            }
        }
        let bdev = SUBSYSTEMS.iter().find(|s| s.name == "bdev").unwrap();
        assert_eq!(
            bdev.depends_on,
            ["accel", "keyring", "vmd", "sock", "iobuf"]
        );
        assert!(config_is_null("scsi") && !config_is_null("iscsi"));
    }

    #[test]
    fn unknown_field_wrong_type_missing_required() {
        let mut k = KeptOptions::new();
        let m = err_msg(&mut k, "iobuf_set_options", json!({"small_pool_cnt": 1}));
        assert!(
            m.starts_with("unknown field `small_pool_cnt`, expected one of"),
            "{m}"
        );
        let m = err_msg(
            &mut k,
            "iobuf_set_options",
            json!({"small_pool_count": "8192"}),
        );
        assert_eq!(
            m,
            "invalid type: string \"8192\", expected u64 for field `small_pool_count`"
        );
        let m = err_msg(&mut k, "iobuf_set_options", json!({"small_bufsize": -1}));
        assert_eq!(
            m,
            "invalid value: integer `-1`, expected u32 for field `small_bufsize`"
        );
        let m = err_msg(&mut k, "iobuf_set_options", json!({"enable_numa": 1}));
        assert_eq!(
            m,
            "invalid type: integer `1`, expected a boolean for field `enable_numa`"
        );
        let m = err_msg(&mut k, "sock_impl_set_options", json!({"recv_buf_size": 1}));
        assert_eq!(m, "missing field `impl_name`");
        let m = err_msg(
            &mut k,
            "sock_impl_set_options",
            json!({"impl_name": "posix", "x": 1}),
        );
        assert!(m.contains("unknown field `x`"), "{m}");
        let m = err_msg(
            &mut k,
            "bdev_nvme_set_options",
            json!({"transport_tos": 256}),
        );
        assert_eq!(
            m,
            "invalid value: integer `256`, expected u8 for field `transport_tos`"
        );
        let m = err_msg(
            &mut k,
            "bdev_nvme_set_options",
            json!({"bdev_retry_count": 1.5}),
        );
        assert!(
            m.contains("floating point") && m.contains("`bdev_retry_count`"),
            "{m}"
        );
        let m = err_msg(
            &mut k,
            "bdev_nvme_set_options",
            json!({"action_on_timeout": "explode"}),
        );
        assert!(m.starts_with("unknown variant `explode`"), "{m}");
        let m = err_msg(
            &mut k,
            "bdev_nvme_set_options",
            json!({"dhchap_digests": ["md5"]}),
        );
        assert!(m.contains("`dhchap_digests[0]`"), "{m}");
        let m = err_msg(
            &mut k,
            "nvmf_set_config",
            json!({"admin_cmd_passthru": {"identify_ctrlr": "yes"}}),
        );
        assert!(m.contains("`admin_cmd_passthru.identify_ctrlr`"), "{m}");
        let m = err_msg(
            &mut k,
            "nvmf_set_config",
            json!({"admin_cmd_passthru": {"bogus": true}}),
        );
        assert!(
            m.starts_with("unknown field `bogus`") && m.ends_with("in `admin_cmd_passthru`"),
            "{m}"
        );
        let m = err_msg(&mut k, "accel_set_options", json!([1, 2]));
        assert_eq!(m, "invalid type: array, expected an object");
        let m = err_msg(&mut k, "bdev_nvme_set_hotplug", json!({"period_us": 5}));
        assert_eq!(m, "missing field `enable`");
        let m = err_msg(&mut k, "framework_set_scheduler", json!({"period": 5}));
        assert_eq!(m, "missing field `name`");
        let m = err_msg(
            &mut k,
            "accel_assign_opc",
            json!({"opname": "teleport", "module": "sw"}),
        );
        assert!(m.starts_with("unknown variant `teleport`"), "{m}");
        let m = err_msg(&mut k, "vmd_enable", json!({"x": 1}));
        assert_eq!(m, "vmd_enable requires no parameters");
        // Nothing was changed by the failed calls.
        assert_eq!(k.entries("iobuf"), KeptOptions::new().entries("iobuf"));
        assert_eq!(k.entries("bdev"), KeptOptions::new().entries("bdev"));
    }

    #[test]
    fn set_then_entries_round_trip() {
        let mut k = KeptOptions::new();
        assert_eq!(
            call(
                &mut k,
                "iobuf_set_options",
                json!({"small_pool_count": 16384})
            ),
            Ok(json!(true))
        );
        call(
            &mut k,
            "iobuf_set_options",
            json!({"large_bufsize": 270336}),
        )
        .unwrap();
        assert_eq!(
            k.entries("iobuf"),
            [json!({"method": "iobuf_set_options", "params": {
                "small_pool_count": 16384, "large_pool_count": 1024,
                "small_bufsize": 8192, "large_bufsize": 270336}})]
        );
        call(
            &mut k,
            "sock_impl_set_options",
            json!({"impl_name": "posix", "enable_quickack": true}),
        )
        .unwrap();
        call(&mut k, "sock_set_default_impl", json!({"impl_name": "ssl"})).unwrap();
        let sock = k.entries("sock");
        assert_eq!(sock[0]["params"], json!({"impl_name": "ssl"}));
        assert_eq!(sock[1]["params"]["impl_name"], "ssl");
        assert_eq!(sock[1]["params"]["enable_quickack"], false);
        assert_eq!(sock[2]["params"]["enable_quickack"], true);
        assert_eq!(sock.len(), 3);
        assert!(k.sock_impls[1].enable_quickack);
        let m = call(
            &mut k,
            "sock_impl_set_options",
            json!({"impl_name": "rdma"}),
        )
        .unwrap_err();
        assert_eq!(m, RpcError::invalid_params("Invalid parameters"));
        // uring is kept once referenced, and listed first (registered last, inserted at the head).
        call(
            &mut k,
            "sock_impl_set_options",
            json!({"impl_name": "uring", "recv_buf_size": 8192}),
        )
        .unwrap();
        let sock = k.entries("sock");
        assert_eq!(sock.len(), 4);
        assert_eq!(sock[1]["params"]["impl_name"], "uring");
        assert_eq!(sock[1]["params"]["recv_buf_size"], 8192);
        assert_eq!(sock[1]["params"]["enable_zerocopy_send_server"], false);

        call(
            &mut k,
            "bdev_nvme_set_options",
            json!({"retry_count": 7, "timeout_us": 5, "timeout_admin_us": 6,
            "dhchap_digests": ["sha512", "sha256", "sha512"], "tcp_connect_timeout_ms": 100}),
        )
        .unwrap();
        call(&mut k, "bdev_nvme_set_hotplug", json!({"enable": true})).unwrap();
        let b = k.bdev_module_entries();
        assert_eq!(b[0]["method"], "bdev_nvme_set_options");
        assert_eq!(b[0]["params"]["transport_retry_count"], 7);
        assert!(b[0]["params"].get("retry_count").is_none());
        assert_eq!(
            b[0]["params"]["dhchap_digests"],
            json!(["sha256", "sha512"])
        );
        assert_eq!(b[0]["params"]["tcp_connect_timeout_ms"], 100);
        assert_eq!(b[1]["params"], json!({"period_us": 100000, "enable": true}));
        call(&mut k, "bdev_iscsi_set_options", json!({"timeout_sec": 5})).unwrap();
        assert_eq!(
            k.bdev_module_entries()[2],
            json!({"method": "bdev_iscsi_set_options", "params": {"timeout_sec": 5}})
        );

        call(
            &mut k,
            "accel_assign_opc",
            json!({"opname": "crc32c", "module": "software"}),
        )
        .unwrap();
        call(
            &mut k,
            "accel_assign_opc",
            json!({"opname": "copy", "module": "dsa"}),
        )
        .unwrap();
        call(&mut k, "ioat_scan_accel_module", Value::Null).unwrap();
        let a = k.entries("accel");
        assert_eq!(a[1], json!({"method": "ioat_scan_accel_module"}));
        assert_eq!(a[2]["params"], json!({"opname": "copy", "module": "dsa"}));
        assert_eq!(
            a[3]["params"],
            json!({"opname": "crc32c", "module": "software"})
        );

        call(
            &mut k,
            "nvmf_set_config",
            json!({"discovery_filter": "svcid,transport", "poll_groups_mask": "0x0F",
            "dhchap_dhgroups": ["ffdhe2048"]}),
        )
        .unwrap();
        call(
            &mut k,
            "nvmf_set_max_subsystems",
            json!({"max_subsystems": 32}),
        )
        .unwrap();
        call(&mut k, "nvmf_set_crdt", json!({"crdt2": 5})).unwrap();
        assert_eq!(
            k.entries("nvmf"),
            [
                json!({"method": "nvmf_set_config", "params": {"discovery_filter": "transport,svcid",
                    "admin_cmd_passthru": {"identify_ctrlr": false}, "poll_groups_mask": "f",
                    "dhchap_dhgroups": ["ffdhe2048"]}}),
                json!({"method": "nvmf_set_max_subsystems", "params": {"max_subsystems": 32}}),
                json!({"method": "nvmf_set_crdt", "params": {"crdt1": 0, "crdt2": 5, "crdt3": 0}}),
            ]
        );
        let e = call(
            &mut k,
            "nvmf_set_max_subsystems",
            json!({"max_subsystems": 64}),
        )
        .unwrap_err();
        assert_eq!(
            e,
            RpcError::new(INTERNAL_ERROR, "Must not call more than once")
        );

        call(
            &mut k,
            "iscsi_set_options",
            json!({"max_sessions": 4, "no_discovery_auth": true}),
        )
        .unwrap();
        let i = &k.entries("iscsi")[0]["params"];
        assert_eq!(i["max_sessions"], 4);
        assert_eq!(i["disable_chap"], true);
        assert_eq!(i["pdu_pool_size"], 36864);
        assert!(i.get("auth_file").is_none());
        assert_eq!(
            call(&mut k, "iscsi_set_options", json!({}))
                .unwrap_err()
                .code,
            INTERNAL_ERROR
        );

        call(&mut k, "vmd_enable", json!({})).unwrap();
        call(&mut k, "accel_set_driver", json!({"name": "mlx5"})).unwrap();
        assert_eq!(
            k.entries("accel")[1],
            json!({"method": "accel_set_driver", "params": {"name": "mlx5"}})
        );
        assert_eq!(
            err_msg(&mut k, "fsdev_set_opts", json!({"fsdev_io_pool_size": 1})),
            "missing field `fsdev_io_cache_size`"
        );
        call(
            &mut k,
            "fsdev_set_opts",
            json!({"fsdev_io_pool_size": 65535, "fsdev_io_cache_size": 128}),
        )
        .unwrap();
        assert_eq!(
            k.entries("fsdev"),
            [
                json!({"method": "fsdev_set_opts", "params": {"fsdev_io_pool_size": 65535, "fsdev_io_cache_size": 128}})
            ]
        );
        assert_eq!(
            k.entries("vmd"),
            [json!({"method": "vmd_enable", "params": {}})]
        );

        // Replaying what entries() wrote into a fresh store gives the same entries.
        let mut fresh = KeptOptions::new();
        // Only what this store keeps: entries owned by real modules (raid's options) are replayed by them.
        let kept = |e: &Value| KEPT_METHODS.iter().any(|(m, _)| e["method"] == *m);
        for s in SUBSYSTEMS {
            for e in k.entries(s.name).iter().filter(|e| kept(e)) {
                fresh
                    .call(e["method"].as_str().unwrap(), e.get("params").cloned())
                    .unwrap_or_else(|err| panic!("{e}: {err}"));
            }
        }
        for s in SUBSYSTEMS {
            assert_eq!(fresh.entries(s.name), k.entries(s.name), "{}", s.name);
        }
    }

    #[test]
    fn spdk_value_checks() {
        let mut k = KeptOptions::new();
        let e = call(&mut k, "iobuf_set_options", json!({"small_pool_count": 63})).unwrap_err();
        assert_eq!(e, RpcError::new(-22, "Invalid argument"));
        let e = call(
            &mut k,
            "bdev_nvme_set_options",
            json!({"timeout_admin_us": 1}),
        )
        .unwrap_err();
        assert_eq!(e.code, -22);
        let e = call(
            &mut k,
            "bdev_nvme_set_options",
            json!({"ctrlr_loss_timeout_sec": 10}),
        )
        .unwrap_err();
        assert_eq!(e.code, -22);
        call(
            &mut k,
            "bdev_nvme_set_options",
            json!({"ctrlr_loss_timeout_sec": -1, "reconnect_delay_sec": 2}),
        )
        .unwrap();
        let e = call(&mut k, "iscsi_set_options", json!({"max_queue_depth": 257})).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        let e = call(
            &mut k,
            "iscsi_set_options",
            json!({"require_chap": false, "mutual_chap": true}),
        )
        .unwrap_err();
        assert!(e.message.contains("CHAP"), "{e:?}");
        call(&mut k, "iscsi_set_options", json!({"node_base": "iqn.x"})).unwrap();
        assert!(call(
            &mut k,
            "nvmf_set_config",
            json!({"discovery_filter": "match_any,svcid"})
        )
        .is_err());
        assert!(call(
            &mut k,
            "nvmf_set_config",
            json!({"poll_groups_mask": "0xZ"})
        )
        .is_err());
        k.set_app_cpumask("0x3").unwrap();
        assert!(call(
            &mut k,
            "nvmf_set_config",
            json!({"poll_groups_mask": "[0-2]"})
        )
        .is_err());
        call(
            &mut k,
            "nvmf_set_config",
            json!({"poll_groups_mask": "[0-1]", "discovery_filters": ["address"]}),
        )
        .unwrap();
        assert_eq!(k.nvmf.poll_groups_mask.as_deref(), Some("3"));
        assert_eq!(k.nvmf.discovery_filter, "address");

        call(
            &mut k,
            "dsa_scan_accel_module",
            json!({"config_kernel_mode": true}),
        )
        .unwrap();
        let e = call(&mut k, "dsa_scan_accel_module", json!({})).unwrap_err();
        assert_eq!(e.code, -libc::EALREADY);

        call(
            &mut k,
            "accel_crypto_key_create",
            json!({"cipher": "AES_XTS", "name": "k1",
            "key": "00112233445566778899aabbccddeeff", "key2": "ffeeddccbbaa99887766554433221100"}),
        )
        .unwrap();
        let e = call(
            &mut k,
            "accel_crypto_key_create",
            json!({"cipher": "AES_XTS", "name": "k1", "key": "00"}),
        )
        .unwrap_err();
        assert_eq!(e, RpcError::invalid_params("failed to create DEK, rc -17"));
        let e = call(
            &mut k,
            "accel_crypto_key_create",
            json!({"cipher": "DES", "name": "k2", "key": "00"}),
        )
        .unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        assert_eq!(k.entries("accel").last().unwrap()["params"]["name"], "k1");
        assert!(call(
            &mut k,
            "accel_crypto_key_destroy",
            json!({"key_name": "nope"})
        )
        .is_err());
        call(
            &mut k,
            "accel_crypto_key_destroy",
            json!({"key_name": "k1"}),
        )
        .unwrap();
        assert!(k.crypto_keys.is_empty());

        call(&mut k, "ublk_create_target", json!({"cpumask": "[1]"})).unwrap();
        assert_eq!(
            k.entries("ublk"),
            [json!({"method": "ublk_create_target", "params": {"cpumask": "2"}})]
        );
        assert_eq!(
            call(&mut k, "ublk_create_target", json!({}))
                .unwrap_err()
                .code,
            INTERNAL_ERROR
        );
        call(&mut k, "ublk_destroy_target", Value::Null).unwrap();
        assert!(k.entries("ublk").is_empty());
        assert_eq!(
            call(&mut k, "ublk_destroy_target", Value::Null)
                .unwrap_err()
                .code,
            INTERNAL_ERROR
        );
        assert_eq!(
            call(&mut k, "no_such_method", json!({})).unwrap_err().code,
            -32601
        );
    }

    #[test]
    fn scheduler_like_spdk() {
        let mut k = KeptOptions::new();
        // At startup nothing is selected yet: selecting static runs its init, which clears the period.
        call(&mut k, "framework_set_scheduler", json!({"name": "static"})).unwrap();
        assert_eq!(
            k.entries("scheduler")[0]["params"],
            json!({"name": "static"})
        );
        // Selecting it again keeps the default 1 s period the RPC set.
        call(&mut k, "framework_set_scheduler", json!({"name": "static"})).unwrap();
        assert_eq!(
            k.entries("scheduler")[0]["params"],
            json!({"name": "static", "period": 1000000})
        );
        call(
            &mut k,
            "framework_set_scheduler",
            json!({"name": "dynamic", "period": 5000, "load_limit": 30}),
        )
        .unwrap();
        assert_eq!(
            k.entries("scheduler")[0]["params"],
            json!({"name": "dynamic", "period": 5000})
        );
        assert_eq!(k.scheduler.tuning.load_limit, Some(30));
        let e = call(&mut k, "framework_set_scheduler", json!({"name": "static"})).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        let e = call(&mut k, "framework_set_scheduler", json!({"name": "fancy"})).unwrap_err();
        assert_eq!(e, RpcError::new(INTERNAL_ERROR, "Unknown error -22"));
        let e = call(
            &mut k,
            "framework_set_scheduler",
            json!({"name": "dynamic", "core_busy": 300}),
        )
        .unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);

        let mut k = KeptOptions::new();
        k.on_subsystems_init();
        call(&mut k, "framework_set_scheduler", json!({"name": "static"})).unwrap();
        assert_eq!(
            k.entries("scheduler")[0]["params"],
            json!({"name": "static", "period": 1000000})
        );
    }

    #[test]
    fn keyring_file_keys() {
        let mut k = KeptOptions::new();
        let dir = std::env::temp_dir().join(format!("compat-keyring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key0");
        std::fs::write(&key, "NVMeTLSkey-1:01:AAAA:\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = key.to_str().unwrap();
        let e = call(
            &mut k,
            "keyring_file_add_key",
            json!({"name": "key0", "path": path}),
        )
        .unwrap_err();
        assert_eq!(e.code, -libc::EPERM);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        call(
            &mut k,
            "keyring_file_add_key",
            json!({"name": "key0", "path": path}),
        )
        .unwrap();
        let e = call(
            &mut k,
            "keyring_file_add_key",
            json!({"name": "key0", "path": path}),
        )
        .unwrap_err();
        assert_eq!(e.code, -libc::EEXIST);
        let e = call(
            &mut k,
            "keyring_file_add_key",
            json!({"name": "key1", "path": "rel/key"}),
        )
        .unwrap_err();
        assert_eq!(e.code, -libc::EPERM);
        let e = call(
            &mut k,
            "keyring_file_add_key",
            json!({"name": "key1", "path": "/nonexistent/key"}),
        )
        .unwrap_err();
        assert_eq!(e.code, -libc::ENOENT);
        call(&mut k, "keyring_linux_set_options", json!({})).unwrap();
        assert_eq!(
            k.entries("keyring"),
            [
                json!({"method": "keyring_file_add_key", "params": {"name": "key0", "path": path}}),
                json!({"method": "keyring_linux_set_options", "params": {"enable": false}}),
            ]
        );
        call(&mut k, "keyring_file_remove_key", json!({"name": "key0"})).unwrap();
        assert_eq!(k.entries("keyring").len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn member_order_is_spdk_order() {
        let preserve_order =
            serde_json::to_string(&json!({"b": 1, "a": 2})).unwrap() == r#"{"b":1,"a":2}"#;
        if !preserve_order {
            return;
        }
        let k = KeptOptions::new();
        let text = |v: &Value| serde_json::to_string(v).unwrap();
        assert_eq!(
            text(&k.entries("sock")[2]),
            r#"{"method":"sock_impl_set_options","params":{"impl_name":"posix","recv_buf_size":2097152,"send_buf_size":2097152,"enable_recv_pipe":true,"enable_quickack":false,"enable_placement_id":0,"enable_zerocopy_send_server":true,"enable_zerocopy_send_client":false,"zerocopy_threshold":0,"tls_version":0,"enable_ktls":false}}"#
        );
        assert_eq!(
            text(&k.bdev_module_entries()[0]),
            concat!(
                r#"{"method":"bdev_nvme_set_options","params":{"action_on_timeout":"none","timeout_us":0,"#,
                r#""timeout_admin_us":0,"keep_alive_timeout_ms":10000,"arbitration_burst":0,"low_priority_weight":0,"#,
                r#""medium_priority_weight":0,"high_priority_weight":0,"nvme_adminq_poll_period_us":10000,"#,
                r#""nvme_ioq_poll_period_us":0,"io_queue_requests":0,"delay_cmd_submit":true,"transport_retry_count":4,"#,
                r#""bdev_retry_count":3,"transport_ack_timeout":0,"ctrlr_loss_timeout_sec":0,"reconnect_delay_sec":0,"#,
                r#""fast_io_fail_timeout_sec":0,"disable_auto_failback":false,"generate_uuids":false,"transport_tos":0,"#,
                r#""nvme_error_stat":false,"rdma_srq_size":0,"io_path_stat":false,"allow_accel_sequence":false,"#,
                r#""rdma_max_cq_size":0,"rdma_cm_event_timeout_ms":0,"dhchap_digests":["sha256","sha384","sha512"],"#,
                r#""dhchap_dhgroups":["null","ffdhe2048","ffdhe3072","ffdhe4096","ffdhe6144","ffdhe8192"]}}"#
            )
        );
        assert_eq!(
            text(&k.bdev_module_entries()[1]),
            r#"{"method":"bdev_nvme_set_hotplug","params":{"period_us":100000,"enable":false}}"#
        );
        assert_eq!(
            text(&k.entries("nvmf")[0]),
            r#"{"method":"nvmf_set_config","params":{"discovery_filter":"match_any","admin_cmd_passthru":{"identify_ctrlr":false}}}"#
        );
        let mut k = k;
        k.call(
            "iscsi_set_options",
            Some(json!({"data_out_pool_size": 9, "auth_file": "/a"})),
        )
        .unwrap();
        let t = text(&k.entries("iscsi")[0]);
        assert!(
            t.starts_with(
                r#"{"method":"iscsi_set_options","params":{"auth_file":"/a","node_base":"#
            ),
            "{t}"
        );
        assert!(
            t.ends_with(r#""immediate_data_pool_size":16384,"data_out_pool_size":9}}"#),
            "{t}"
        );
    }

    #[test]
    fn registered_with_spdk_state_masks() {
        let store = Rc::new(RefCell::new(KeptOptions::new()));
        let mut reg = Registry::new();
        register(&mut reg, store.clone());
        assert!(reg.verify_methods());
        assert_eq!(reg.state_mask("iobuf_set_options"), Some(STATE_STARTUP));
        assert_eq!(
            reg.state_mask("framework_set_scheduler"),
            Some(STATE_STARTUP | STATE_RUNTIME)
        );
        assert_eq!(reg.state_mask("bdev_nvme_set_hotplug"), Some(STATE_RUNTIME));
        assert_eq!(reg.state_mask("enable_vmd"), Some(STATE_STARTUP));

        let run = |reg: &Registry, m: &str, p: Value| {
            let (r, rx) = Responder::local(m);
            reg.dispatch(m, Some(p), r);
            rx.try_recv().unwrap()
        };
        assert_eq!(
            run(&reg, "iobuf_set_options", json!({"large_pool_count": 2048})),
            Ok(json!(true))
        );
        assert_eq!(store.borrow().iobuf.large_pool_count, 2048);
        assert_eq!(run(&reg, "enable_vmd", json!({})), Ok(json!(true)));
        assert!(store.borrow().vmd.enabled);
        assert_eq!(
            run(&reg, "bdev_nvme_set_hotplug", json!({"enable": true}))
                .unwrap_err()
                .code,
            INVALID_STATE
        );
        reg.set_state(STATE_RUNTIME);
        assert_eq!(
            run(&reg, "iobuf_set_options", json!({})).unwrap_err().code,
            INVALID_STATE
        );
        assert_eq!(
            run(
                &reg,
                "bdev_nvme_set_hotplug",
                json!({"enable": true, "period_us": 99999999})
            ),
            Ok(json!(true))
        );
        assert_eq!(
            store.borrow().hotplug,
            NvmeHotplug {
                period_us: 10_000_000,
                enable: true
            }
        );
    }
}
