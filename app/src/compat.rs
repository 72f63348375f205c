//! SPDK subsystems and option methods this target has no engine for (yet): iobuf, sock, accel, scheduler, vmd,
//! keyring, nvmf, iscsi, ublk, and the option methods of bdev modules we do not implement.
//!
//! Operators keep JSON configs saved by SPDK v24.x's `save_config`. Every option method in them is registered
//! here with SPDK's state mask; its parameters are validated (unknown fields, JSON types, integer ranges,
//! required fields and SPDK's own value checks), KEPT in [`KeptOptions`], and written back by
//! [`KeptOptions::entries`] exactly as SPDK v24.05's `spdk_tgt` writes them. Nothing here stops the target from
//! starting: defaults are kept until a method is called.
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
//! Parameter objects are built in SPDK's member order, which output keeps with serde_json's `preserve_order`
//! feature (enabled by the workspace); without it members would come out sorted, which JSON readers (and SPDK's
//! loader) ignore.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use jsonrpc::{Registry, Responder, RpcError, STATE_RUNTIME, STATE_STARTUP};
use serde_json::{json, Map, Value};

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

/// Registers every method of [`KEPT_METHODS`] (and the aliases of [`KEPT_ALIASES`]) on `reg`; each one runs
/// [`KeptOptions::call`] on `store` and answers its result (`true` on success, as SPDK does).
pub fn register(reg: &mut Registry, store: Rc<RefCell<KeptOptions>>) {
    for &(name, state) in KEPT_METHODS {
        let store = store.clone();
        reg.register(
            name,
            state,
            Rc::new(move |params: Option<Value>, r: Responder| {
                let res = store.borrow_mut().call(name, params);
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
// Parameter schemas.

#[derive(Clone, Copy)]
enum Ty {
    Bool,
    /// Unsigned integer up to the maximum; the name is used in messages (`u32`).
    Uint(u64, &'static str),
    I32,
    Str,
    /// One of the names.
    Enum(&'static [&'static str]),
    /// An array of names that SPDK keeps as a bitmask: duplicates dropped, written in this order.
    Set(&'static [&'static str]),
    Obj(&'static [Field]),
}

const U8: Ty = Ty::Uint(u8::MAX as u64, "u8");
const U16: Ty = Ty::Uint(u16::MAX as u64, "u16");
const U32: Ty = Ty::Uint(u32::MAX as u64, "u32");
const U64: Ty = Ty::Uint(u64::MAX, "u64");

struct Field {
    name: &'static str,
    ty: Ty,
}

const fn fl(name: &'static str, ty: Ty) -> Field {
    Field { name, ty }
}

/// A method's parameters: fields in the order SPDK writes them (fields SPDK does not write by default last).
struct Schema {
    fields: &'static [Field],
    required: &'static [&'static str],
    /// Accepted old names: `(alias, field)`. The field wins when both are given.
    aliases: &'static [(&'static str, &'static str)],
}

const fn schema(fields: &'static [Field]) -> Schema {
    Schema {
        fields,
        required: &[],
        aliases: &[],
    }
}

const DIGESTS: &[&str] = &["sha256", "sha384", "sha512"];
const DHGROUPS: &[&str] = &[
    "null",
    "ffdhe2048",
    "ffdhe3072",
    "ffdhe4096",
    "ffdhe6144",
    "ffdhe8192",
];
/// `g_opcode_strings` (v24.05 has the first 15; the `dix_*` ones came later).
const ACCEL_OPCODES: &[&str] = &[
    "copy",
    "fill",
    "dualcast",
    "compare",
    "crc32c",
    "copy_crc32c",
    "compress",
    "decompress",
    "encrypt",
    "decrypt",
    "xor",
    "dif_verify",
    "dif_verify_copy",
    "dif_generate",
    "dif_generate_copy",
    "dix_generate",
    "dix_verify",
];
const SCHEDULERS: &[&str] = &["static", "dynamic", "gscheduler"];
/// Sock implementations: `posix` and `ssl` are always built; `uring` only `--with-uring`.
const SOCK_IMPLS: &[&str] = &["posix", "ssl", "uring"];
const TWEAK_MODES: &[&str] = &[
    "SIMPLE_LBA",
    "JOIN_NEG_LBA_WITH_LBA",
    "INCR_512_FULL_LBA",
    "INCR_512_UPPER_LBA",
];
const CIPHERS: &[&str] = &["AES_CBC", "AES_XTS"];

const SCHED: Schema = Schema {
    fields: &[
        fl("name", Ty::Str),
        fl("period", U64),
        // dynamic scheduler
        fl("load_limit", U8),
        fl("core_limit", U8),
        fl("core_busy", U8),
        // static scheduler (SPDK 25.x+)
        fl("mappings", Ty::Str),
    ],
    required: &["name"],
    aliases: &[],
};

const SOCK_DEFAULT: Schema = Schema {
    fields: &[fl("impl_name", Ty::Str)],
    required: &["impl_name"],
    aliases: &[],
};

const SOCK_IMPL: Schema = Schema {
    fields: &[
        fl("impl_name", Ty::Str),
        fl("recv_buf_size", U32),
        fl("send_buf_size", U32),
        fl("enable_recv_pipe", Ty::Bool),
        fl("enable_quickack", Ty::Bool),
        fl("enable_placement_id", U32),
        fl("enable_zerocopy_send_server", Ty::Bool),
        fl("enable_zerocopy_send_client", Ty::Bool),
        fl("zerocopy_threshold", U32),
        fl("tls_version", U32),
        fl("enable_ktls", Ty::Bool),
    ],
    required: &["impl_name"],
    aliases: &[],
};

const IOBUF: Schema = schema(&[
    fl("small_pool_count", U64),
    fl("large_pool_count", U64),
    fl("small_bufsize", U32),
    fl("large_bufsize", U32),
    // SPDK 24.09+
    fl("enable_numa", Ty::Bool),
]);

const ACCEL_OPTS: Schema = schema(&[
    fl("small_cache_size", U32),
    fl("large_cache_size", U32),
    fl("task_count", U32),
    fl("sequence_count", U32),
    fl("buf_count", U32),
]);

const ACCEL_ASSIGN: Schema = Schema {
    fields: &[fl("opname", Ty::Enum(ACCEL_OPCODES)), fl("module", Ty::Str)],
    required: &["opname", "module"],
    aliases: &[],
};

const ACCEL_DRIVER: Schema = Schema {
    fields: &[fl("name", Ty::Str)],
    required: &["name"],
    aliases: &[],
};

const FSDEV: Schema = Schema {
    fields: &[
        fl("fsdev_io_pool_size", U32),
        fl("fsdev_io_cache_size", U32),
    ],
    required: &["fsdev_io_pool_size", "fsdev_io_cache_size"],
    aliases: &[],
};

const ACCEL_KEY: Schema = Schema {
    fields: &[
        fl("name", Ty::Str),
        fl("cipher", Ty::Str),
        fl("key", Ty::Str),
        fl("key2", Ty::Str),
        fl("tweak_mode", Ty::Enum(TWEAK_MODES)),
    ],
    required: &["cipher", "key", "name"],
    aliases: &[],
};

const ACCEL_KEY_DESTROY: Schema = Schema {
    fields: &[fl("key_name", Ty::Str)],
    required: &["key_name"],
    aliases: &[],
};

const DSA: Schema = schema(&[fl("config_kernel_mode", Ty::Bool)]);

const KEYRING_ADD: Schema = Schema {
    fields: &[fl("name", Ty::Str), fl("path", Ty::Str)],
    required: &["name", "path"],
    aliases: &[],
};

const KEYRING_REMOVE: Schema = Schema {
    fields: &[fl("name", Ty::Str)],
    required: &["name"],
    aliases: &[],
};

const KEYRING_LINUX: Schema = schema(&[fl("enable", Ty::Bool)]);

const MULTIPATH_OPTS: &[Field] = &[
    fl("policy", Ty::Enum(&["active_passive", "active_active"])),
    fl("selector", Ty::Enum(&["round_robin", "queue_depth"])),
    fl("min_io", U32),
];

const NVME: Schema = Schema {
    fields: &[
        fl("action_on_timeout", Ty::Enum(&["none", "reset", "abort"])),
        fl("timeout_us", U64),
        fl("timeout_admin_us", U64),
        fl("keep_alive_timeout_ms", U32),
        fl("arbitration_burst", U32),
        fl("low_priority_weight", U32),
        fl("medium_priority_weight", U32),
        fl("high_priority_weight", U32),
        fl("nvme_adminq_poll_period_us", U64),
        fl("nvme_ioq_poll_period_us", U64),
        fl("io_queue_requests", U32),
        fl("delay_cmd_submit", Ty::Bool),
        fl("transport_retry_count", U32),
        fl("bdev_retry_count", Ty::I32),
        fl("transport_ack_timeout", U8),
        fl("ctrlr_loss_timeout_sec", Ty::I32),
        fl("reconnect_delay_sec", U32),
        fl("fast_io_fail_timeout_sec", U32),
        fl("disable_auto_failback", Ty::Bool),
        fl("generate_uuids", Ty::Bool),
        fl("transport_tos", U8),
        fl("nvme_error_stat", Ty::Bool),
        fl("rdma_srq_size", U32),
        fl("io_path_stat", Ty::Bool),
        fl("allow_accel_sequence", Ty::Bool),
        fl("rdma_max_cq_size", U32),
        fl("rdma_cm_event_timeout_ms", U16),
        fl("dhchap_digests", Ty::Set(DIGESTS)),
        fl("dhchap_dhgroups", Ty::Set(DHGROUPS)),
        // SPDK 25.01+
        fl("rdma_umr_per_io", Ty::Bool),
        fl("tcp_connect_timeout_ms", U32),
        fl("enable_flush", Ty::Bool),
        fl("multipath_opts", Ty::Obj(MULTIPATH_OPTS)),
    ],
    required: &[],
    aliases: &[("retry_count", "transport_retry_count")],
};

const HOTPLUG: Schema = Schema {
    fields: &[fl("period_us", U64), fl("enable", Ty::Bool)],
    required: &["enable"],
    aliases: &[],
};

const ISCSI_BDEV: Schema = schema(&[fl("timeout_sec", U64)]);

const ADMIN_PASSTHRU: &[Field] = &[
    fl("identify_ctrlr", Ty::Bool),
    // SPDK 25.09+
    fl("identify_uuid_list", Ty::Bool),
    fl("get_log_page", Ty::Bool),
    fl("get_set_features", Ty::Bool),
    fl("sanitize", Ty::Bool),
    fl("security_send_recv", Ty::Bool),
    fl("fw_update", Ty::Bool),
    fl("nvme_mi", Ty::Bool),
    fl("vendor_specific", Ty::Bool),
];

const DISCOVERY_FILTERS: &[&str] = &["transport", "address", "svcid"];

const NVMF_CONFIG: Schema = schema(&[
    fl("discovery_filter", Ty::Str),
    fl("admin_cmd_passthru", Ty::Obj(ADMIN_PASSTHRU)),
    fl("poll_groups_mask", Ty::Str),
    // accepted by v24.05 but only saved by later versions
    fl("dhchap_digests", Ty::Set(DIGESTS)),
    fl("dhchap_dhgroups", Ty::Set(DHGROUPS)),
    // SPDK 25.x+
    fl(
        "dup_host_policy",
        Ty::Enum(&["allow", "restrict_per_listener"]),
    ),
    // SPDK 26.x: the filter as a list; kept as `discovery_filter`
    fl("discovery_filters", Ty::Set(DISCOVERY_FILTERS)),
]);

const NVMF_MAX: Schema = schema(&[fl("max_subsystems", U32)]);

const NVMF_CRDT: Schema = schema(&[fl("crdt1", U16), fl("crdt2", U16), fl("crdt3", U16)]);

const ISCSI: Schema = Schema {
    fields: &[
        fl("auth_file", Ty::Str),
        fl("node_base", Ty::Str),
        fl("max_sessions", U32),
        fl("max_connections_per_session", U32),
        fl("max_queue_depth", U32),
        fl("default_time2wait", U32),
        fl("default_time2retain", U32),
        fl("first_burst_length", U32),
        fl("immediate_data", Ty::Bool),
        fl("allow_duplicated_isid", Ty::Bool),
        fl("error_recovery_level", U32),
        fl("nop_timeout", Ty::I32),
        fl("nop_in_interval", Ty::I32),
        fl("disable_chap", Ty::Bool),
        fl("require_chap", Ty::Bool),
        fl("mutual_chap", Ty::Bool),
        fl("chap_group", Ty::I32),
        fl("max_large_datain_per_connection", U32),
        fl("max_r2t_per_connection", U32),
        fl("pdu_pool_size", U32),
        fl("immediate_data_pool_size", U32),
        fl("data_out_pool_size", U32),
    ],
    required: &[],
    aliases: &[
        ("no_discovery_auth", "disable_chap"),
        ("req_discovery_auth", "require_chap"),
        ("req_discovery_auth_mutual", "mutual_chap"),
        ("discovery_auth_group", "chap_group"),
    ],
};

const UBLK: Schema = schema(&[fl("cpumask", Ty::Str), fl("disable_user_copy", Ty::Bool)]);

/// `serde`-style description of an unexpected JSON value.
fn unexpected(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_f64() => format!("floating point `{n}`"),
        Value::Number(n) => format!("integer `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "sequence".to_string(),
        Value::Object(_) => "map".to_string(),
    }
}

fn one_of(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn invalid_type(v: &Value, expected: &str, path: &str) -> RpcError {
    RpcError::invalid_params(format!(
        "invalid type: {}, expected {expected} for field `{path}`",
        unexpected(v)
    ))
}

/// Checks one value against its type; returns it normalized (sets in canonical order, objects decoded).
fn check(ty: Ty, v: Value, path: &str) -> Result<Value, RpcError> {
    match ty {
        Ty::Bool if v.is_boolean() => Ok(v),
        Ty::Bool => Err(invalid_type(&v, "a boolean", path)),
        Ty::Str if v.is_string() => Ok(v),
        Ty::Str => Err(invalid_type(&v, "a string", path)),
        Ty::Uint(max, name) => match &v {
            Value::Number(n) if n.as_u64().is_some_and(|u| u <= max) => Ok(v),
            Value::Number(n) if !n.is_f64() => Err(RpcError::invalid_params(format!(
                "invalid value: integer `{n}`, expected {name} for field `{path}`"
            ))),
            _ => Err(invalid_type(&v, name, path)),
        },
        Ty::I32 => match &v {
            Value::Number(n) if n.as_i64().is_some_and(|i| i32::try_from(i).is_ok()) => Ok(v),
            Value::Number(n) if !n.is_f64() => Err(RpcError::invalid_params(format!(
                "invalid value: integer `{n}`, expected i32 for field `{path}`"
            ))),
            _ => Err(invalid_type(&v, "i32", path)),
        },
        Ty::Enum(names) => match v.as_str() {
            Some(s) if names.contains(&s) => Ok(v),
            Some(s) => Err(RpcError::invalid_params(format!(
                "unknown variant `{s}`, expected one of {} for field `{path}`",
                one_of(names)
            ))),
            None => Err(invalid_type(&v, "a string", path)),
        },
        Ty::Set(names) => {
            let Value::Array(items) = &v else {
                return Err(invalid_type(&v, "a sequence", path));
            };
            let mut bits = vec![false; names.len()];
            for (i, item) in items.iter().enumerate() {
                let p = format!("{path}[{i}]");
                match item.as_str() {
                    Some(s) => match names.iter().position(|n| *n == s) {
                        Some(k) => bits[k] = true,
                        None => {
                            return Err(RpcError::invalid_params(format!(
                                "unknown variant `{s}`, expected one of {} for field `{p}`",
                                one_of(names)
                            )))
                        }
                    },
                    None => return Err(invalid_type(item, "a string", &p)),
                }
            }
            Ok(Value::Array(
                names
                    .iter()
                    .zip(bits)
                    .filter(|(_, b)| *b)
                    .map(|(n, _)| json!(n))
                    .collect(),
            ))
        }
        Ty::Obj(fields) => match v {
            Value::Object(m) => Ok(Value::Object(decode_fields(fields, &[], m, path)?)),
            other => Err(invalid_type(&other, "an object", path)),
        },
    }
}

fn decode_fields(
    fields: &[Field],
    aliases: &[(&str, &str)],
    obj: Map<String, Value>,
    prefix: &str,
) -> Result<Map<String, Value>, RpcError> {
    let path = |name: &str| {
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    };
    let field = |name: &str| fields.iter().find(|f| f.name == name);
    let mut aliased = Vec::new();
    let mut direct = Vec::new();
    for (k, v) in obj {
        if let Some(&(_, to)) = aliases.iter().find(|(a, _)| *a == k) {
            aliased.push((to, k, v));
        } else if let Some(f) = field(&k) {
            direct.push((f, v));
        } else {
            let names: Vec<&str> = fields.iter().map(|f| f.name).collect();
            let mut msg = format!("unknown field `{k}`, expected one of {}", one_of(&names));
            if !prefix.is_empty() {
                msg.push_str(&format!(" in `{prefix}`"));
            }
            return Err(RpcError::invalid_params(msg));
        }
    }
    let mut out = Map::new();
    for (to, orig, v) in aliased {
        let f = field(to).expect("alias of a schema field");
        out.insert(to.to_string(), check(f.ty, v, &path(&orig))?);
    }
    for (f, v) in direct {
        out.insert(f.name.to_string(), check(f.ty, v, &path(f.name))?);
    }
    Ok(out)
}

/// Decodes `params` as SPDK's `spdk_json_decode_object()` would, with serde-style messages: absent or `null`
/// params are `{}`; anything but an object is rejected.
fn decode(s: &Schema, params: Option<Value>) -> Result<Map<String, Value>, RpcError> {
    let obj = match params {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(Value::Array(_)) => {
            return Err(RpcError::invalid_params(
                "invalid type: array, expected an object",
            ))
        }
        Some(other) => {
            return Err(RpcError::invalid_params(format!(
                "invalid type: {}, expected an object",
                unexpected(&other)
            )))
        }
    };
    let out = decode_fields(s.fields, s.aliases, obj, "")?;
    if let Some(missing) = s.required.iter().find(|r| !out.contains_key(**r)) {
        return Err(RpcError::invalid_params(format!(
            "missing field `{missing}`"
        )));
    }
    Ok(out)
}

/// `params` merged over `base` (later calls override, as SPDK decodes over its current options).
fn merge(base: &Value, params: Map<String, Value>) -> Map<String, Value> {
    let mut out = base.as_object().cloned().unwrap_or_default();
    for (k, v) in params {
        match (out.get_mut(&k), v) {
            (Some(Value::Object(cur)), Value::Object(new)) => cur.extend(new),
            (_, v) => {
                out.insert(k, v);
            }
        }
    }
    out
}

/// The members of `m` present, in the schema's order (nested objects too).
fn ordered(fields: &[Field], m: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for f in fields {
        if let Some(v) = m.get(f.name) {
            let v = match (f.ty, v) {
                (Ty::Obj(sub), Value::Object(o)) => ordered(sub, o),
                _ => v.clone(),
            };
            out.insert(f.name.to_string(), v);
        }
    }
    Value::Object(out)
}

fn entry(method: &str, params: Value) -> Value {
    json!({"method": method, "params": params})
}

fn u64_of(m: &Map<String, Value>, k: &str) -> u64 {
    m.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn i64_of(m: &Map<String, Value>, k: &str) -> i64 {
    m.get(k).and_then(Value::as_i64).unwrap_or(0)
}

fn bool_of(m: &Map<String, Value>, k: &str) -> bool {
    m.get(k).and_then(Value::as_bool).unwrap_or(false)
}

fn einval(detail: &str) -> RpcError {
    log::error!("{detail}");
    RpcError::errno(libc::EINVAL)
}

// ---------------------------------------------------------------------------------------------------------------
// CPU masks (`spdk_cpuset_parse` / `spdk_cpuset_fmt`).

const CPUSET_SIZE: usize = 1024;

/// Parses a hex mask (`0x3`, `3`) or a core list (`[0,2-3]`).
fn parse_cpuset(mask: &str) -> Option<Vec<bool>> {
    let mask = mask.trim_matches(|c| c == ' ' || c == '\t');
    if mask.is_empty() {
        return None;
    }
    let mut set = vec![false; CPUSET_SIZE];
    if let Some(list) = mask.strip_prefix('[') {
        let list = list.strip_suffix(']')?;
        for item in list.split(',') {
            let (lo, hi) = match item.split_once('-') {
                Some((a, b)) => (a, b),
                None => (item, item),
            };
            let num = |s: &str| -> Option<usize> {
                let s = s.trim_matches(|c| c == ' ' || c == '\t');
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                s.parse().ok().filter(|&n| n < CPUSET_SIZE)
            };
            let (lo, hi) = (num(lo)?, num(hi)?);
            if lo > hi {
                return None;
            }
            set[lo..=hi].iter_mut().for_each(|b| *b = true);
        }
    } else {
        let hex = mask
            .strip_prefix("0x")
            .or_else(|| mask.strip_prefix("0X"))
            .unwrap_or(mask);
        for (i, c) in hex.chars().rev().enumerate() {
            let d = c.to_digit(16)? as usize;
            for j in 0..4 {
                if d & (1 << j) != 0 && i * 4 + j < CPUSET_SIZE {
                    set[i * 4 + j] = true;
                }
            }
        }
    }
    Some(set)
}

/// Lower-case hex without `0x` or leading zeros (`"0"` for an empty set).
fn fmt_cpuset(set: &[bool]) -> String {
    let top = set.iter().rposition(|&b| b).unwrap_or(0);
    let nibbles = top / 4 + 1;
    (0..nibbles)
        .rev()
        .map(|n| {
            let d = (0..4).fold(0u32, |acc, j| acc | (u32::from(set[n * 4 + j]) << j));
            std::char::from_digit(d, 16).unwrap_or('0')
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// The store.

const SCHEDULER_DEFAULT_PERIOD_US: u64 = 1_000_000;
const HOTPLUG_PERIOD_DEFAULT_US: u64 = 100_000;
const HOTPLUG_PERIOD_MAX_US: u64 = 10_000_000;
const NVMF_DEFAULT_MAX_SUBSYSTEMS: u64 = 1024;

fn sock_defaults(impl_name: &str) -> Map<String, Value> {
    // posix and uring: DEFAULT_SO_{RCV,SND}BUF_SIZE (2 MiB); ssl: MIN_SO_{RCV,SND}BUF_SIZE (4 KiB). Zero-copy send
    // on the server side is on for posix and ssl, off for uring.
    let buf = if impl_name == "ssl" { 4096 } else { 2_097_152 };
    let zcopy_server = impl_name != "uring";
    let v = json!({
        "impl_name": impl_name,
        "recv_buf_size": buf,
        "send_buf_size": buf,
        "enable_recv_pipe": true,
        "enable_quickack": false,
        "enable_placement_id": 0,
        "enable_zerocopy_send_server": zcopy_server,
        "enable_zerocopy_send_client": false,
        "zerocopy_threshold": 0,
        "tls_version": 0,
        "enable_ktls": false
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn iscsi_defaults() -> Value {
    // iscsi_opts_init(): pool sizes derive from the default MaxSessions (128), MaxQueueDepth (64),
    // MaxLargeDataInPerConnection (64) and MaxR2TPerConnection (4).
    json!({
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
    })
}

/// The current parameters of every kept method, starting from SPDK v24.05's defaults.
///
/// [`get`](Self::get) shows them per method: an object for option methods (what `save_config` would write,
/// plus kept fields SPDK does not save, such as the dynamic scheduler's `load_limit`), an array of params objects
/// for methods that add list items (`sock_impl_set_options` (one per impl, in write order),
/// `accel_assign_opc`, `accel_crypto_key_create`, `keyring_file_add_key`), and for build-optional or one-shot
/// methods (`vmd_enable`, `*_scan_accel_module`, `keyring_linux_set_options`, `bdev_iscsi_set_options`,
/// `ublk_create_target`) nothing until they were called.
#[derive(Debug, Clone)]
pub struct KeptOptions {
    store: BTreeMap<&'static str, Value>,
    /// Selected scheduler; `None` until `framework_set_scheduler` or subsystem init selects one.
    scheduler: Option<String>,
    /// Scheduler period in microseconds (0: none, as with `static`).
    scheduler_period: u64,
    /// Per-impl sock options in SPDK's write order (`uring` first when present, then `ssl`, `posix`).
    sock_impls: Vec<Map<String, Value>>,
    /// `accel_assign_opc` overrides by opcode index.
    opc_overrides: BTreeMap<usize, String>,
    /// `nvmf_set_max_subsystems` was called with a non-zero value (SPDK refuses a second call then).
    nvmf_max_subsystems_set: bool,
    /// `iscsi_set_options` was called (SPDK refuses a second call).
    iscsi_set: bool,
    /// The application's core mask, when known (see [`set_app_cpumask`](Self::set_app_cpumask)).
    app_cpumask: Option<Vec<bool>>,
}

impl Default for KeptOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl KeptOptions {
    /// SPDK v24.05's defaults.
    pub fn new() -> Self {
        let mut store = BTreeMap::new();
        store.insert("framework_set_scheduler", json!({"name": "static"}));
        store.insert(
            "iobuf_set_options",
            json!({
                "small_pool_count": 8192,
                "large_pool_count": 1024,
                "small_bufsize": 8192,
                "large_bufsize": 135168
            }),
        );
        store.insert("sock_set_default_impl", json!({"impl_name": "posix"}));
        store.insert(
            "accel_set_options",
            json!({
                "small_cache_size": 128,
                "large_cache_size": 16,
                "task_count": 2048,
                "sequence_count": 2048,
                "buf_count": 2048
            }),
        );
        store.insert("accel_assign_opc", json!([]));
        store.insert("accel_crypto_key_create", json!([]));
        store.insert("keyring_file_add_key", json!([]));
        store.insert(
            "bdev_nvme_set_options",
            json!({
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
                "dhchap_digests": DIGESTS,
                "dhchap_dhgroups": DHGROUPS
            }),
        );
        store.insert(
            "bdev_nvme_set_hotplug",
            json!({"period_us": HOTPLUG_PERIOD_DEFAULT_US, "enable": false}),
        );
        store.insert(
            "nvmf_set_config",
            json!({
                "discovery_filter": "match_any",
                "admin_cmd_passthru": {"identify_ctrlr": false}
            }),
        );
        store.insert(
            "nvmf_set_max_subsystems",
            json!({"max_subsystems": NVMF_DEFAULT_MAX_SUBSYSTEMS}),
        );
        store.insert("nvmf_set_crdt", json!({"crdt1": 0, "crdt2": 0, "crdt3": 0}));
        store.insert("iscsi_set_options", iscsi_defaults());
        let mut k = KeptOptions {
            store,
            scheduler: None,
            scheduler_period: 0,
            sock_impls: vec![sock_defaults("ssl"), sock_defaults("posix")],
            opc_overrides: BTreeMap::new(),
            nvmf_max_subsystems_set: false,
            iscsi_set: false,
            app_cpumask: None,
        };
        k.sync_sock();
        k
    }

    /// Look up one method's current params (for layers that later give them meaning). See the type's docs for
    /// the shape per method; `None` for unknown methods and for optional ones never called.
    pub fn get(&self, method: &str) -> Option<&Value> {
        self.store.get(method)
    }

    /// Tells the store the application's core mask (`-m`), as `spdk_env_get_cpuset()` gives SPDK: the default
    /// `cpumask` that `ublk_create_target` saves, and the bound `nvmf_set_config.poll_groups_mask` must fit in.
    /// Without it, masks are not checked against the cores.
    pub fn set_app_cpumask(&mut self, mask: &str) -> Result<(), String> {
        let set = parse_cpuset(mask).ok_or_else(|| format!("invalid cpumask {mask}"))?;
        self.app_cpumask = Some(set);
        Ok(())
    }

    /// Mirrors SPDK's subsystem init where it matters here: the `scheduler` subsystem selects `static` when no
    /// scheduler was set (a later `framework_set_scheduler {"name": "static"}` then keeps the 1 s period it sets,
    /// as in SPDK). Call it when subsystems initialize.
    pub fn on_subsystems_init(&mut self) {
        if self.scheduler.is_none() {
            self.scheduler = Some("static".into());
            self.scheduler_period = 0;
            self.sync_scheduler(Map::new());
        }
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
        match subsystem {
            "scheduler" => v.push(entry("framework_set_scheduler", self.scheduler_params())),
            "vmd" => self.push_if_set(&mut v, "vmd_enable"),
            "sock" => {
                v.push(self.written("sock_set_default_impl", &SOCK_DEFAULT));
                for m in &self.sock_impls {
                    v.push(entry("sock_impl_set_options", ordered(SOCK_IMPL.fields, m)));
                }
            }
            "iobuf" => v.push(self.written("iobuf_set_options", &IOBUF)),
            "keyring" => {
                self.push_items(&mut v, "keyring_file_add_key", &KEYRING_ADD);
                if self.store.contains_key("keyring_linux_set_options") {
                    v.push(self.written("keyring_linux_set_options", &KEYRING_LINUX));
                }
            }
            "accel" => {
                v.push(self.written("accel_set_options", &ACCEL_OPTS));
                if self.store.contains_key("accel_set_driver") {
                    v.push(self.written("accel_set_driver", &ACCEL_DRIVER));
                }
                if self.store.contains_key("ioat_scan_accel_module") {
                    v.push(json!({"method": "ioat_scan_accel_module"}));
                }
                if self.store.contains_key("dsa_scan_accel_module") {
                    v.push(self.written("dsa_scan_accel_module", &DSA));
                }
                if self.store.contains_key("iaa_scan_accel_module") {
                    v.push(json!({"method": "iaa_scan_accel_module"}));
                }
                self.push_items(&mut v, "accel_assign_opc", &ACCEL_ASSIGN);
                self.push_items(&mut v, "accel_crypto_key_create", &ACCEL_KEY);
            }
            "bdev" => {
                v.extend(self.bdev_module_entries());
                v.extend(self.bdev_trailing_entries());
            }
            "nvmf" => {
                v.push(self.written("nvmf_set_config", &NVMF_CONFIG));
                v.push(self.written("nvmf_set_max_subsystems", &NVMF_MAX));
                v.push(self.written("nvmf_set_crdt", &NVMF_CRDT));
            }
            "iscsi" => v.push(self.written("iscsi_set_options", &ISCSI)),
            "fsdev" if self.store.contains_key("fsdev_set_opts") => {
                v.push(self.written("fsdev_set_opts", &FSDEV));
            }
            "ublk" => {
                if let Some(Value::Object(m)) = self.store.get("ublk_create_target") {
                    // SPDK saves only the core mask (the given one, else the app's).
                    let mask = m
                        .get("cpumask")
                        .and_then(Value::as_str)
                        .and_then(parse_cpuset)
                        .or_else(|| self.app_cpumask.clone());
                    let params = match mask {
                        Some(set) => json!({"cpumask": fmt_cpuset(&set)}),
                        None => json!({}),
                    };
                    v.push(entry("ublk_create_target", params));
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
    /// `bdev_enable_histogram`); last `bdev_wait_for_examine`. Among the modules, `raid` (an examine module) writes
    /// `bdev_raid_set_options`; `nvme` writes `bdev_nvme_set_options`, its controllers and discovery services, and
    /// `bdev_nvme_set_hotplug` (deliberately after its own controllers, but still before every bdev entry); `iscsi`
    /// (only in builds `--with-iscsi-initiator`) writes `bdev_iscsi_set_options`. So this returns
    /// `[bdev_raid_set_options, bdev_nvme_set_options, bdev_nvme_set_hotplug]` (+ `bdev_iscsi_set_options` once
    /// set), to be placed after `bdev_set_options` and any `bdev_examine` entries, before the bdevs. (A
    /// `--with-shared` build registers modules in reverse link order and writes `bdev_iscsi_set_options` between
    /// the raid and nvme entries; loading either order gives the same options.)
    pub fn bdev_module_entries(&self) -> Vec<Value> {
        let mut v = vec![
            // Owned by the raid module (it gives the options meaning); written from its current values.
            raid::rpc::options_config_entry(),
            self.written("bdev_nvme_set_options", &NVME),
            self.written("bdev_nvme_set_hotplug", &HOTPLUG),
        ];
        if self.store.contains_key("bdev_iscsi_set_options") {
            v.push(self.written("bdev_iscsi_set_options", &ISCSI_BDEV));
        }
        v
    }

    /// Kept entries that go after the bdevs and before `bdev_wait_for_examine`: none. In SPDK v24.05 every
    /// module-level entry (including `bdev_nvme_set_hotplug`) precedes all per-bdev entries, see
    /// [`bdev_module_entries`](Self::bdev_module_entries); this exists so callers need not change if a kept
    /// entry ever has to follow the bdevs.
    pub fn bdev_trailing_entries(&self) -> Vec<Value> {
        Vec::new()
    }

    fn written(&self, method: &str, s: &Schema) -> Value {
        let empty = Map::new();
        let m = self
            .store
            .get(method)
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        entry(method, ordered(s.fields, m))
    }

    fn push_if_set(&self, v: &mut Vec<Value>, method: &str) {
        if let Some(p) = self.store.get(method) {
            v.push(entry(method, p.clone()));
        }
    }

    fn push_items(&self, v: &mut Vec<Value>, method: &str, s: &Schema) {
        if let Some(Value::Array(items)) = self.store.get(method) {
            for it in items.iter().filter_map(Value::as_object) {
                v.push(entry(method, ordered(s.fields, it)));
            }
        }
    }

    fn scheduler_params(&self) -> Value {
        let mut m = Map::new();
        m.insert(
            "name".into(),
            json!(self.scheduler.as_deref().unwrap_or("static")),
        );
        if self.scheduler_period != 0 {
            // spdk_json_write_named_uint32() of a uint64_t.
            m.insert("period".into(), json!(self.scheduler_period as u32));
        }
        Value::Object(m)
    }

    fn sync_scheduler(&mut self, extra: Map<String, Value>) {
        let mut m = match self.scheduler_params() {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        if let Some(Value::Object(old)) = self.store.get("framework_set_scheduler") {
            for (k, v) in old {
                if !matches!(k.as_str(), "name" | "period") {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
        m.extend(extra);
        self.store
            .insert("framework_set_scheduler", Value::Object(m));
    }

    fn sync_sock(&mut self) {
        let arr = self
            .sock_impls
            .iter()
            .map(|m| ordered(SOCK_IMPL.fields, m))
            .collect();
        self.store
            .insert("sock_impl_set_options", Value::Array(arr));
    }

    fn sock_impl_index(&mut self, impl_name: &str) -> Option<usize> {
        if !SOCK_IMPLS.contains(&impl_name) {
            return None;
        }
        if let Some(i) = self
            .sock_impls
            .iter()
            .position(|m| m.get("impl_name").and_then(Value::as_str) == Some(impl_name))
        {
            return Some(i);
        }
        // Only uring can be missing: it registers last, so SPDK lists it first.
        self.sock_impls.insert(0, sock_defaults(impl_name));
        self.sync_sock();
        Some(0)
    }

    fn set(&mut self, method: &'static str, m: Map<String, Value>) {
        self.store.insert(method, Value::Object(m));
    }

    fn current(&self, method: &str) -> Value {
        self.store.get(method).cloned().unwrap_or_else(|| json!({}))
    }

    /// Runs one kept method (by name or deprecated alias) on the store, as the registered handler does: `Ok`
    /// with the result to answer (`true`), or the error to send.
    pub fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let method = KEPT_ALIASES
            .iter()
            .find(|(a, _)| *a == method)
            .map_or(method, |(_, t)| *t);
        match method {
            "framework_set_scheduler" => self.framework_set_scheduler(params)?,
            "vmd_enable" => {
                jsonrpc::no_params(&params, method)?;
                self.store.insert("vmd_enable", json!({}));
            }
            "sock_set_default_impl" => {
                let p = decode(&SOCK_DEFAULT, params)?;
                let name = p["impl_name"].as_str().unwrap_or_default().to_string();
                if self.sock_impl_index(&name).is_none() {
                    log::error!("sock_set_default_impl: unknown sock implementation {name}");
                    return Err(RpcError::invalid_params("Invalid parameters"));
                }
                self.set("sock_set_default_impl", p);
            }
            "sock_impl_set_options" => {
                let p = decode(&SOCK_IMPL, params)?;
                let name = p["impl_name"].as_str().unwrap_or_default().to_string();
                let Some(i) = self.sock_impl_index(&name) else {
                    log::error!("sock_impl_set_options: unknown sock implementation {name}");
                    return Err(RpcError::invalid_params("Invalid parameters"));
                };
                self.sock_impls[i].extend(p);
                self.sync_sock();
            }
            "iobuf_set_options" => {
                let p = decode(&IOBUF, params)?;
                let m = merge(&self.current(method), p);
                for (k, min) in [
                    ("small_pool_count", 64),
                    ("large_pool_count", 8),
                    ("small_bufsize", 4096),
                    ("large_bufsize", 8192),
                ] {
                    if u64_of(&m, k) < min {
                        return Err(einval(&format!("{k} must be at least {min}")));
                    }
                }
                self.set("iobuf_set_options", m);
            }
            "keyring_file_add_key" => self.keyring_file_add_key(params)?,
            "keyring_file_remove_key" => {
                let p = decode(&KEYRING_REMOVE, params)?;
                if let Some(Value::Array(keys)) = self.store.get_mut("keyring_file_add_key") {
                    keys.retain(|k| k.get("name") != p.get("name"));
                }
            }
            "keyring_linux_set_options" => {
                let p = decode(&KEYRING_LINUX, params)?;
                let base = self
                    .store
                    .get(method)
                    .cloned()
                    .unwrap_or_else(|| json!({"enable": false}));
                self.set("keyring_linux_set_options", merge(&base, p));
            }
            "accel_set_options" => {
                let p = decode(&ACCEL_OPTS, params)?;
                let m = merge(&self.current(method), p);
                self.set("accel_set_options", m);
            }
            "accel_assign_opc" => {
                let p = decode(&ACCEL_ASSIGN, params)?;
                let op = p["opname"].as_str().unwrap_or_default();
                let idx = ACCEL_OPCODES.iter().position(|o| *o == op).unwrap_or(0);
                let module = p["module"].as_str().unwrap_or_default().to_string();
                log::info!("Operation {op} will be assigned to module {module}");
                self.opc_overrides.insert(idx, module);
                let arr = self
                    .opc_overrides
                    .iter()
                    .map(|(i, m)| json!({"opname": ACCEL_OPCODES[*i], "module": m}))
                    .collect();
                self.store.insert("accel_assign_opc", Value::Array(arr));
            }
            "accel_set_driver" => {
                // The driver (mlx5 in SPDK) is not checked: there is none here to select.
                let p = decode(&ACCEL_DRIVER, params)?;
                self.set("accel_set_driver", p);
            }
            "fsdev_set_opts" => {
                let p = decode(&FSDEV, params)?;
                self.set("fsdev_set_opts", p);
            }
            "accel_crypto_key_create" => self.accel_crypto_key_create(params)?,
            "accel_crypto_key_destroy" => {
                let p = decode(&ACCEL_KEY_DESTROY, params)?;
                let name = p.get("key_name");
                let Some(Value::Array(keys)) = self.store.get_mut("accel_crypto_key_create") else {
                    return Err(RpcError::invalid_params("No key object found"));
                };
                let before = keys.len();
                keys.retain(|k| k.get("name") != name);
                if keys.len() == before {
                    return Err(RpcError::invalid_params("No key object found"));
                }
            }
            "ioat_scan_accel_module" => {
                jsonrpc::no_params(&params, method)?;
                self.store.insert("ioat_scan_accel_module", json!({}));
            }
            "dsa_scan_accel_module" => {
                let p = decode(&DSA, params)?;
                if self.store.contains_key(method) {
                    return Err(RpcError::errno(libc::EALREADY));
                }
                let kernel = bool_of(&p, "config_kernel_mode");
                self.store.insert(
                    "dsa_scan_accel_module",
                    json!({"config_kernel_mode": kernel}),
                );
            }
            "iaa_scan_accel_module" => {
                jsonrpc::no_params(&params, method)?;
                if self.store.contains_key(method) {
                    return Err(RpcError::errno(libc::EALREADY));
                }
                self.store.insert("iaa_scan_accel_module", json!({}));
            }
            "bdev_nvme_set_options" => {
                let p = decode(&NVME, params)?;
                let m = merge(&self.current(method), p);
                check_nvme_opts(&m)?;
                self.set("bdev_nvme_set_options", m);
            }
            "bdev_nvme_set_hotplug" => {
                let p = decode(&HOTPLUG, params)?;
                let period = match u64_of(&p, "period_us") {
                    0 => HOTPLUG_PERIOD_DEFAULT_US,
                    n => n.min(HOTPLUG_PERIOD_MAX_US),
                };
                let enable = bool_of(&p, "enable");
                self.store.insert(
                    "bdev_nvme_set_hotplug",
                    json!({"period_us": period, "enable": enable}),
                );
            }
            "bdev_iscsi_set_options" => {
                let p = decode(&ISCSI_BDEV, params)?;
                let base = self
                    .store
                    .get(method)
                    .cloned()
                    .unwrap_or_else(|| json!({"timeout_sec": 30}));
                self.set("bdev_iscsi_set_options", merge(&base, p));
            }
            "nvmf_set_config" => self.nvmf_set_config(params)?,
            "nvmf_set_max_subsystems" => {
                if self.nvmf_max_subsystems_set {
                    log::error!("this RPC must not be called more than once.");
                    return Err(RpcError::internal("Must not call more than once"));
                }
                let p = decode(&NVMF_MAX, params)?;
                let n = u64_of(&p, "max_subsystems");
                self.nvmf_max_subsystems_set = n != 0;
                let effective = if n == 0 {
                    NVMF_DEFAULT_MAX_SUBSYSTEMS
                } else {
                    n
                };
                self.store.insert(
                    "nvmf_set_max_subsystems",
                    json!({"max_subsystems": effective}),
                );
            }
            "nvmf_set_crdt" => {
                // Members not given are reset to 0.
                let p = decode(&NVMF_CRDT, params)?;
                let m = merge(&json!({"crdt1": 0, "crdt2": 0, "crdt3": 0}), p);
                self.set("nvmf_set_crdt", m);
            }
            "iscsi_set_options" => {
                if self.iscsi_set {
                    log::error!("this RPC must not be called more than once.");
                    return Err(RpcError::internal("Must not call more than once"));
                }
                let p = decode(&ISCSI, params)?;
                let m = merge(&iscsi_defaults(), p);
                check_iscsi_opts(&m)?;
                self.iscsi_set = true;
                self.set("iscsi_set_options", m);
            }
            "ublk_create_target" => {
                let p = decode(&UBLK, params)?;
                if self.store.contains_key(method) {
                    log::error!("UBLK target has been created");
                    return Err(RpcError::internal(jsonrpc::strerror(libc::EBUSY)));
                }
                if let Some(mask) = p.get("cpumask").and_then(Value::as_str) {
                    let ok = parse_cpuset(mask)
                        .is_some_and(|set| set.iter().any(|&b| b) && self.fits_app_cpumask(&set));
                    if !ok {
                        log::error!("invalid cpumask {mask}");
                        return Err(RpcError::internal(jsonrpc::strerror(libc::EINVAL)));
                    }
                }
                self.set("ublk_create_target", p);
            }
            "ublk_destroy_target" => {
                jsonrpc::no_params(&params, method)?;
                if self.store.remove("ublk_create_target").is_none() {
                    return Err(RpcError::internal(jsonrpc::strerror(libc::ENOENT)));
                }
            }
            _ => return Err(RpcError::method_not_found()),
        }
        Ok(Value::Bool(true))
    }

    fn fits_app_cpumask(&self, set: &[bool]) -> bool {
        match &self.app_cpumask {
            Some(app) => set.iter().zip(app).all(|(&s, &a)| !s || a),
            None => true,
        }
    }

    fn framework_set_scheduler(&mut self, params: Option<Value>) -> Result<(), RpcError> {
        let mut p = decode(&SCHED, params)?;
        let name = p["name"].as_str().unwrap_or_default().to_string();
        if name == "static" && self.scheduler.as_deref().is_some_and(|s| s != "static") {
            return Err(RpcError::invalid_params(
                "Static scheduler cannot be re-enabled after a different scheduler was selected",
            ));
        }
        match u64_of(&p, "period") {
            0 if self.scheduler_period == 0 => self.scheduler_period = SCHEDULER_DEFAULT_PERIOD_US,
            0 => {}
            n => self.scheduler_period = n,
        }
        if !SCHEDULERS.contains(&name.as_str()) {
            log::error!("Requested scheduler is missing");
            // spdk_strerror(-EINVAL): glibc's text for a negative errno.
            return Err(RpcError::internal(format!(
                "Unknown error {}",
                -libc::EINVAL
            )));
        }
        if self.scheduler.as_deref() != Some(name.as_str()) {
            if name == "static" {
                // The static scheduler's init clears the period.
                self.scheduler_period = 0;
            }
            self.scheduler = Some(name);
        }
        p.remove("name");
        p.remove("period");
        self.sync_scheduler(p);
        Ok(())
    }

    fn keyring_file_add_key(&mut self, params: Option<Value>) -> Result<(), RpcError> {
        let p = decode(&KEYRING_ADD, params)?;
        let name = p["name"].as_str().unwrap_or_default();
        let path = p["path"].as_str().unwrap_or_default();
        if name.find(':').is_some_and(|i| i != 0) {
            log::error!("Couldn't add key '{name}' to the keyring: keyring doesn't exist");
            return Err(RpcError::errno(libc::EINVAL));
        }
        let keys = self
            .store
            .get("keyring_file_add_key")
            .and_then(Value::as_array);
        if keys.is_some_and(|k| k.iter().any(|k| k["name"] == name)) {
            log::error!("Key '{name}' already exists");
            return Err(RpcError::errno(libc::EEXIST));
        }
        check_key_file(path)?;
        let item = json!({"name": name, "path": path});
        match self.store.get_mut("keyring_file_add_key") {
            Some(Value::Array(keys)) => keys.push(item),
            _ => {
                self.store.insert("keyring_file_add_key", json!([item]));
            }
        }
        Ok(())
    }

    fn accel_crypto_key_create(&mut self, params: Option<Value>) -> Result<(), RpcError> {
        let p = decode(&ACCEL_KEY, params)?;
        let dek = |rc: i32, why: &str| {
            log::error!("accel_crypto_key_create: {why}");
            RpcError::invalid_params(format!("failed to create DEK, rc {rc}"))
        };
        let cipher = p["cipher"].as_str().unwrap_or_default();
        if !CIPHERS.iter().any(|c| cipher.starts_with(c)) {
            return Err(dek(-libc::EINVAL, "Failed to parse cipher"));
        }
        for k in ["key", "key2"] {
            if let Some(hex) = p.get(k).and_then(Value::as_str) {
                let ok = !hex.is_empty()
                    && hex.len() % 2 == 0
                    && hex.bytes().all(|b| b.is_ascii_hexdigit());
                if !ok {
                    return Err(dek(-libc::EINVAL, &format!("invalid hex {k}")));
                }
            }
        }
        let keys = self
            .store
            .get("accel_crypto_key_create")
            .and_then(Value::as_array);
        if keys.is_some_and(|k| k.iter().any(|k| k.get("name") == p.get("name"))) {
            return Err(dek(-libc::EEXIST, "key name already exists"));
        }
        let item = ordered(ACCEL_KEY.fields, &p);
        match self.store.get_mut("accel_crypto_key_create") {
            Some(Value::Array(keys)) => keys.push(item),
            _ => {
                self.store.insert("accel_crypto_key_create", json!([item]));
            }
        }
        Ok(())
    }

    fn nvmf_set_config(&mut self, params: Option<Value>) -> Result<(), RpcError> {
        let mut p = decode(&NVMF_CONFIG, params)?;
        if let Some(f) = p.remove("discovery_filters") {
            let bits = f
                .as_array()
                .map(|a| {
                    a.iter().fold(0, |acc, n| {
                        acc | DISCOVERY_FILTERS
                            .iter()
                            .position(|d| Some(*d) == n.as_str())
                            .map_or(0, |i| 1 << i)
                    })
                })
                .unwrap_or(0);
            p.insert("discovery_filter".into(), json!(discovery_filter_str(bits)));
        }
        if let Some(f) = p.get("discovery_filter").and_then(Value::as_str) {
            let bits = parse_discovery_filter(f).ok_or_else(|| {
                log::error!("Invalid value {f}");
                RpcError::invalid_params("Invalid parameters")
            })?;
            p.insert("discovery_filter".into(), json!(discovery_filter_str(bits)));
        }
        if let Some(mask) = p.get("poll_groups_mask").and_then(Value::as_str) {
            let set = parse_cpuset(mask)
                .filter(|s| self.fits_app_cpumask(s))
                .ok_or_else(|| {
                    log::error!("Invalid cpumask {mask}");
                    RpcError::invalid_params("Invalid parameters")
                })?;
            p.insert("poll_groups_mask".into(), json!(fmt_cpuset(&set)));
        }
        let m = merge(&self.current("nvmf_set_config"), p);
        self.set("nvmf_set_config", m);
        Ok(())
    }
}

/// `decode_discovery_filter()`: `match_any` or a comma-separated list of `transport`, `address`, `svcid`.
fn parse_discovery_filter(s: &str) -> Option<u32> {
    let mut bits = 0;
    let mut any = false;
    for tok in s.split(',').filter(|t| !t.is_empty()) {
        if tok.starts_with("match_any") {
            if bits != 0 {
                return None;
            }
            any = true;
        } else {
            if any {
                return None;
            }
            let i = DISCOVERY_FILTERS.iter().position(|d| tok.starts_with(d))?;
            bits |= 1 << i;
        }
    }
    Some(bits)
}

/// How SPDK saves the discovery filter bits.
fn discovery_filter_str(bits: u32) -> &'static str {
    const ANSWERS: [&str; 8] = [
        "match_any",
        "transport",
        "address",
        "transport,address",
        "svcid",
        "transport,svcid",
        "address,svcid",
        "transport,address,svcid",
    ];
    ANSWERS[(bits & 7) as usize]
}

/// `bdev_nvme_validate_opts()`.
fn check_nvme_opts(m: &Map<String, Value>) -> Result<(), RpcError> {
    if u64_of(m, "timeout_us") == 0 && u64_of(m, "timeout_admin_us") != 0 {
        return Err(einval(
            "Invalid options: Can't have (timeout_us == 0) with (timeout_admin_us > 0)",
        ));
    }
    if i64_of(m, "bdev_retry_count") < -1 {
        return Err(einval(
            "Invalid option: bdev_retry_count can't be less than -1.",
        ));
    }
    let loss = i64_of(m, "ctrlr_loss_timeout_sec");
    let delay = u64_of(m, "reconnect_delay_sec");
    let fail = u64_of(m, "fast_io_fail_timeout_sec");
    let bad = if loss < -1 {
        Some("ctrlr_loss_timeout_sec can't be less than -1.")
    } else if loss == -1 {
        if delay == 0 {
            Some("reconnect_delay_sec can't be 0 if ctrlr_loss_timeout_sec is not 0.")
        } else if fail != 0 && fail < delay {
            Some("reconnect_delay_sec can't be more than fast_io-fail_timeout_sec.")
        } else {
            None
        }
    } else if loss != 0 {
        let loss = loss as u64;
        if delay == 0 {
            Some("reconnect_delay_sec can't be 0 if ctrlr_loss_timeout_sec is not 0.")
        } else if delay > loss {
            Some("reconnect_delay_sec can't be more than ctrlr_loss_timeout_sec.")
        } else if fail != 0 && fail < delay {
            Some("reconnect_delay_sec can't be more than fast_io_fail_timeout_sec.")
        } else if fail != 0 && fail > loss {
            Some("fast_io_fail_timeout_sec can't be more than ctrlr_loss_timeout_sec.")
        } else {
            None
        }
    } else if delay != 0 || fail != 0 {
        Some("Both reconnect_delay_sec and fast_io_fail_timeout_sec must be 0 if ctrlr_loss_timeout_sec is 0.")
    } else {
        None
    };
    match bad {
        Some(why) => Err(einval(why)),
        None => Ok(()),
    }
}

/// `iscsi_opts_verify()`, which SPDK runs at iSCSI subsystem init (failing the init); here the RPC fails, with
/// SPDK's log text.
fn check_iscsi_opts(m: &Map<String, Value>) -> Result<(), RpcError> {
    let u = |k| u64_of(m, k);
    let i = |k| i64_of(m, k);
    let b = |k| bool_of(m, k);
    let err = |msg: String| {
        Err(RpcError::invalid_params(format!(
            "iscsi_set_options: {msg}"
        )))
    };
    const MAX_BURST: u64 = 65536 * 16;
    if u("max_sessions") == 0 || u("max_sessions") > 65535 {
        return err(format!(
            "{} is invalid. MaxSessions must be more than 0 and no more than 65535",
            u("max_sessions")
        ));
    }
    if u("max_connections_per_session") == 0 || u("max_connections_per_session") > 65535 {
        return err(format!(
            "{} is invalid. MaxConnectionsPerSession must be more than 0 and no more than 65535",
            u("max_connections_per_session")
        ));
    }
    if u("max_queue_depth") == 0 || u("max_queue_depth") > 256 {
        return err(format!(
            "{} is invalid. MaxQueueDepth must be more than 0 and no more than 256",
            u("max_queue_depth")
        ));
    }
    for (k, name) in [
        ("default_time2wait", "DefaultTime2Wait"),
        ("default_time2retain", "DefaultTime2Retain"),
    ] {
        if u(k) > 3600 {
            return err(format!(
                "{} is invalid. {name} must be no more than 3600",
                u(k)
            ));
        }
    }
    let fbl = u("first_burst_length");
    if fbl < 512 {
        return err(format!("FirstBurstLength {fbl} shall be no less than 512"));
    }
    if fbl > MAX_BURST {
        return err(format!(
            "FirstBurstLength {fbl} shall not exceed MaxBurstLength {MAX_BURST}"
        ));
    }
    if u("error_recovery_level") > 2 {
        return err(format!(
            "ErrorRecoveryLevel {} is not supported.",
            u("error_recovery_level")
        ));
    }
    if i("nop_timeout") < 0 {
        return err(format!(
            "{} is invalid. timeout must not be less than 0",
            i("nop_timeout")
        ));
    }
    if !(0..=60).contains(&i("nop_in_interval")) {
        return err(format!(
            "{} is invalid. nopinterval must be between 0 and 60",
            i("nop_in_interval")
        ));
    }
    let (d, r, mu) = (b("disable_chap"), b("require_chap"), b("mutual_chap"));
    let chap_ok = i("chap_group") >= 0
        && matches!(
            (d, r, mu),
            (false, false, false)
                | (true, false, false)
                | (false, true, false)
                | (false, true, true)
        );
    if !chap_ok {
        return err("CHAP params in opts are illegal combination".into());
    }
    for (k, name) in [
        (
            "max_large_datain_per_connection",
            "MaxLargeDataInPerConnection",
        ),
        ("max_r2t_per_connection", "MaxR2TPerConnection"),
        ("pdu_pool_size", "pdu_pool_size"),
        ("immediate_data_pool_size", "immediate_data_pool_size"),
        ("data_out_pool_size", "data_out_pool_size"),
    ] {
        if u(k) == 0 {
            return err(format!("0 is invalid. {name} must be more than 0"));
        }
    }
    Ok(())
}

/// `keyring_file_check_path()`: an absolute path to a file of ours that only we can read.
fn check_key_file(path: &str) -> Result<(), RpcError> {
    use std::os::unix::fs::MetadataExt;
    if !path.starts_with('/') {
        log::error!("Non-absolute paths are not allowed: {path}");
        return Err(RpcError::errno(libc::EPERM));
    }
    let md = std::fs::metadata(path).map_err(|e| {
        log::error!("Could not stat key file '{path}': {e}");
        RpcError::errno(e.raw_os_error().unwrap_or(libc::EIO))
    })?;
    // SAFETY: getuid() has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if md.mode() & 0o077 != 0 || md.uid() != uid {
        log::error!(
            "Invalid permissions for key file '{path}': 0{:o}",
            md.mode()
        );
        return Err(RpcError::errno(libc::EPERM));
    }
    Ok(())
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
                let a = config.as_array().unwrap();
                Value::Array(a[1..a.len() - 1].to_vec())
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
        assert_eq!(
            k.get("sock_impl_set_options").unwrap()[1]["enable_quickack"],
            true
        );
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
        assert_eq!(b[0]["method"], "bdev_raid_set_options");
        assert_eq!(b[1]["params"]["transport_retry_count"], 7);
        assert!(b[1]["params"].get("retry_count").is_none());
        assert_eq!(
            b[1]["params"]["dhchap_digests"],
            json!(["sha256", "sha512"])
        );
        assert_eq!(b[1]["params"]["tcp_connect_timeout_ms"], 100);
        assert_eq!(b[2]["params"], json!({"period_us": 100000, "enable": true}));
        call(&mut k, "bdev_iscsi_set_options", json!({"timeout_sec": 5})).unwrap();
        assert_eq!(
            k.bdev_module_entries()[3],
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
        assert_eq!(k.get("nvmf_set_config").unwrap()["poll_groups_mask"], "3");
        assert_eq!(
            k.get("nvmf_set_config").unwrap()["discovery_filter"],
            "address"
        );

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
        assert_eq!(k.get("accel_crypto_key_create"), Some(&json!([])));

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
        assert_eq!(k.get("framework_set_scheduler").unwrap()["load_limit"], 30);
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
            text(&k.bdev_module_entries()[1]),
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
            text(&k.bdev_module_entries()[2]),
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
    fn cpusets() {
        let f = |m: &str| parse_cpuset(m).map(|s| fmt_cpuset(&s));
        assert_eq!(f("0x1").as_deref(), Some("1"));
        assert_eq!(f(" 0XfF0 ").as_deref(), Some("ff0"));
        assert_eq!(f("[0, 4-5]").as_deref(), Some("31"));
        assert_eq!(f("0").as_deref(), Some("0"));
        assert_eq!(
            f("[127]").as_deref(),
            Some(format!("8{}", "0".repeat(31)).as_str())
        );
        assert_eq!(f(""), None);
        assert_eq!(f("[1-0]"), None);
        assert_eq!(f("[1,]"), None);
        assert_eq!(f("0xg"), None);
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
        assert_eq!(
            store.borrow().get("iobuf_set_options").unwrap()["large_pool_count"],
            2048
        );
        assert_eq!(run(&reg, "enable_vmd", json!({})), Ok(json!(true)));
        assert!(store.borrow().get("vmd_enable").is_some());
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
            store.borrow().get("bdev_nvme_set_hotplug"),
            Some(&json!({"period_us": 10000000, "enable": true}))
        );
    }
}
