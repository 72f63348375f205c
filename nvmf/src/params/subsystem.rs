//! `nvmf_create_subsystem`, `nvmf_delete_subsystem`, `nvmf_get_subsystems`, `nvmf_subsystem_allow_any_host`
//! and the queries of one subsystem (lib/nvmf/nvmf_rpc.c, subsystem.c).

use jsonrpc::RpcError;
use serde::{Deserialize, Serialize};
use subsystems::params::some;

use super::address::Trid;
use super::method;
use super::namespace::NamespaceInfo;
use super::nqn::nqn_is_valid;

/// `NVMF_MIN_CNTLID`.
pub const MIN_CNTLID: u16 = 1;
/// `NVMF_MAX_CNTLID`: the spec reserves 0xfff0 and up.
pub const MAX_CNTLID: u16 = 0xffef;
/// Serial number of a subsystem created without one: 20 zeros.
pub const DEFAULT_SERIAL_NUMBER: &str = "00000000000000000000";
/// `MODEL_NUMBER_DEFAULT`.
pub const DEFAULT_MODEL_NUMBER: &str = "SPDK bdev Controller";
/// `NVMF_SUBSYSTEM_DEFAULT_NAMESPACES`: `max_namespaces` when 0 is given.
pub const DEFAULT_MAX_NAMESPACES: u32 = 32;
/// Longest serial number (`SPDK_NVME_CTRLR_SN_LEN`), in bytes.
pub const SN_MAX_LEN: usize = 20;
/// Longest model number (`SPDK_NVME_CTRLR_MN_LEN`), in bytes.
pub const MN_MAX_LEN: usize = 40;

fn default_sn() -> String {
    DEFAULT_SERIAL_NUMBER.into()
}

fn default_mn() -> String {
    DEFAULT_MODEL_NUMBER.into()
}

fn default_min_cntlid() -> u16 {
    MIN_CNTLID
}

fn default_max_cntlid() -> u16 {
    MAX_CNTLID
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn not_true(v: &Option<bool>) -> bool {
    *v != Some(true)
}

/// `nvmf_create_subsystem` parameters and, after [`normalize`](Self::normalize), the subsystem's options as
/// `save_config` writes them (`nvmf_write_nvme_subsystem_config()`: `nqn`, `allow_any_host`, `serial_number`,
/// `model_number`, `max_namespaces`, `min_cntlid`, `max_cntlid`, `ana_reporting`). `tgt_name` and the
/// discard/write-zeroes limits are taken but not written (SPDK v24.05 loses the limits on reload).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfCreateSubsystem {
    /// Subsystem NQN (see [`nqn_is_valid`]).
    pub nqn: String,
    /// Any host may connect (else only the hosts added).
    #[serde(default)]
    pub allow_any_host: bool,
    /// Serial number: printable ASCII, at most 20 bytes.
    #[serde(default = "default_sn")]
    pub serial_number: String,
    /// Model number: printable ASCII, at most 40 bytes.
    #[serde(default = "default_mn")]
    pub model_number: String,
    /// Most namespaces (and highest NSID); 0 means [`DEFAULT_MAX_NAMESPACES`], which is written then.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_namespaces: u32,
    /// Lowest controller ID.
    #[serde(default = "default_min_cntlid")]
    pub min_cntlid: u16,
    /// Highest controller ID.
    #[serde(default = "default_max_cntlid")]
    pub max_cntlid: u16,
    /// Asymmetric Namespace Access reporting.
    #[serde(default)]
    pub ana_reporting: bool,
    /// SPDK 25.x+: Dataset Management Range Size Limit, in blocks. Written once set.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub dmrsl: Option<u32>,
    /// SPDK 25.x+: Write Zeroes Size Limit (power of 2 of the minimum page size). Written once set.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub wzsl: Option<u8>,
    /// SPDK 24.09+: NVMe passthrough of all I/O commands. The 26.x `rpc.py` always sends it, `false` by
    /// default; written only when `true`, so that SPDK v24.05 (which refuses the member) loads the configs of
    /// subsystems that do not use it.
    #[serde(default, deserialize_with = "some", skip_serializing_if = "not_true")]
    pub passthrough: Option<bool>,
    /// SPDK 25.x+: NVM Subsystem Reset support. Sent and written like `passthrough`.
    #[serde(default, deserialize_with = "some", skip_serializing_if = "not_true")]
    pub enable_nssr: Option<bool>,
    /// Target name.
    #[serde(default, deserialize_with = "some", skip_serializing)]
    pub tgt_name: Option<String>,
    /// Largest discard in KiB (0: no limit). Not written.
    #[serde(default, skip_serializing)]
    pub max_discard_size_kib: u64,
    /// Largest write zeroes in KiB: 0 (no limit) or a power of 2 above 2. Not written.
    #[serde(default, skip_serializing)]
    pub max_write_zeroes_size_kib: u64,
}

method!(NvmfCreateSubsystem, "nvmf_create_subsystem");

impl NvmfCreateSubsystem {
    /// A subsystem of SPDK's defaults.
    pub fn new(nqn: &str) -> NvmfCreateSubsystem {
        NvmfCreateSubsystem {
            nqn: nqn.into(),
            allow_any_host: false,
            serial_number: default_sn(),
            model_number: default_mn(),
            max_namespaces: 0,
            min_cntlid: MIN_CNTLID,
            max_cntlid: MAX_CNTLID,
            ana_reporting: false,
            dmrsl: None,
            wzsl: None,
            passthrough: None,
            enable_nssr: None,
            tgt_name: None,
            max_discard_size_kib: 0,
            max_write_zeroes_size_kib: 0,
        }
    }

    /// The checks of `rpc_nvmf_create_subsystem()` in SPDK's order, after the target lookup:
    /// `spdk_nvmf_subsystem_create()` (the NQN is not taken (`exists`), is valid, and a subsystem ID is free:
    /// `subsystems` counts the target's, the discovery subsystem included, against `max_subsystems`), each
    /// `-32603 "Unable to create subsystem NQN"`; then the serial and model numbers, the controller ID range
    /// and `max_write_zeroes_size_kib` (`-32602`, see [`errors`](super::errors)). Then `max_namespaces` 0 becomes
    /// [`DEFAULT_MAX_NAMESPACES`].
    pub fn normalize(
        &mut self,
        exists: bool,
        subsystems: usize,
        max_subsystems: u32,
    ) -> Result<(), RpcError> {
        let nqn = &self.nqn;
        let unable = || {
            log::error!("Unable to create subsystem {nqn}");
            RpcError::internal(format!("Unable to create subsystem {nqn}"))
        };
        if exists {
            log::error!("Subsystem NQN '{nqn}' already exists");
            return Err(unable());
        }
        if !nqn_is_valid(nqn) {
            log::error!("Subsystem NQN '{nqn}' is invalid");
            return Err(unable());
        }
        if subsystems >= max_subsystems as usize {
            log::error!("No free subsystem IDs are available for subsystem creation");
            return Err(unable());
        }
        if !ascii_field_ok(&self.serial_number, SN_MAX_LEN) {
            log::error!(
                "Subsystem {nqn}: invalid serial number '{}'",
                self.serial_number
            );
            return Err(RpcError::invalid_params(format!(
                "Invalid SN {}",
                self.serial_number
            )));
        }
        if !ascii_field_ok(&self.model_number, MN_MAX_LEN) {
            log::error!(
                "Subsystem {nqn}: invalid model number '{}'",
                self.model_number
            );
            return Err(RpcError::invalid_params(format!(
                "Invalid MN {}",
                self.model_number
            )));
        }
        let (min, max) = (self.min_cntlid, self.max_cntlid);
        let valid = |c: u16| (MIN_CNTLID..=MAX_CNTLID).contains(&c);
        if min > max || !valid(min) || !valid(max) {
            log::error!("Subsystem {nqn}: invalid cntlid range [{min}-{max}]");
            return Err(RpcError::invalid_params(format!(
                "Invalid cntlid range [{min}-{max}]"
            )));
        }
        let wz = self.max_write_zeroes_size_kib;
        if !(wz == 0 || (wz > 2 && wz.is_power_of_two())) {
            log::error!("Subsystem {nqn}: invalid max_write_zeroes_size_kib {wz}");
            // SPDK's message ends with a newline.
            return Err(RpcError::invalid_params(format!(
                "Invalid max_write_zeroes_size_kib {wz}\n"
            )));
        }
        if self.max_namespaces == 0 {
            self.max_namespaces = DEFAULT_MAX_NAMESPACES;
        }
        Ok(())
    }
}

/// `nvmf_valid_ascii_string()` and the length check of `spdk_nvmf_subsystem_set_sn()` / `_set_mn()`.
fn ascii_field_ok(s: &str, max: usize) -> bool {
    s.len() <= max && s.bytes().all(|c| (0x20..=0x7e).contains(&c))
}

/// `nvmf_delete_subsystem` parameters. An unknown NQN is `-32602 "Invalid parameters"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfDeleteSubsystem {
    /// Subsystem NQN.
    pub nqn: String,
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
}

method!(NvmfDeleteSubsystem, "nvmf_delete_subsystem");

/// `nvmf_get_subsystems` parameters. An unknown NQN is `-19 "No such device"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfGetSubsystems {
    /// Only this subsystem.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub nqn: Option<String>,
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
}

method!(NvmfGetSubsystems, "nvmf_get_subsystems");

/// Parameters of the queries of one subsystem: `nvmf_subsystem_get_controllers`, `nvmf_subsystem_get_qpairs`
/// and `nvmf_subsystem_get_listeners` (SPDK pauses the subsystem to answer). An unknown NQN is
/// `-32602 "Invalid parameters"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfSubsystemQuery {
    /// Subsystem NQN.
    pub nqn: String,
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
}

method!(NvmfSubsystemQuery, "nvmf_subsystem_get_controllers");

/// `nvmf_subsystem_allow_any_host` parameters. An unknown NQN is `-32602 "Invalid parameters"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfSubsystemAllowAnyHost {
    /// Subsystem NQN.
    pub nqn: String,
    /// Any host may connect (required).
    pub allow_any_host: bool,
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
}

method!(NvmfSubsystemAllowAnyHost, "nvmf_subsystem_allow_any_host");

/// A subsystem's type as `nvmf_get_subsystems` writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Subtype {
    /// An NVM subsystem.
    #[serde(rename = "NVMe")]
    Nvme,
    /// The discovery subsystem.
    #[serde(rename = "Discovery")]
    Discovery,
}

/// A host allowed to connect, as `nvmf_get_subsystems` writes it: the keys by name, once set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostInfo {
    /// Host NQN.
    pub nqn: String,
    /// DH-HMAC-CHAP key name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dhchap_key: Option<String>,
    /// DH-HMAC-CHAP controller key name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dhchap_ctrlr_key: Option<String>,
}

/// One subsystem of `nvmf_get_subsystems` (`dump_nvmf_subsystem()`). The members after `hosts` are written
/// for NVMe subsystems only (see [`SubsystemInfo::discovery`] and [`SubsystemInfo::nvme`]); SPDK lists
/// listeners and hosts newest first, namespaces by NSID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubsystemInfo {
    /// Subsystem NQN.
    pub nqn: String,
    /// Type.
    pub subtype: Subtype,
    /// Listeners' addresses.
    pub listen_addresses: Vec<Trid>,
    /// Any host may connect.
    pub allow_any_host: bool,
    /// Hosts allowed.
    pub hosts: Vec<HostInfo>,
    /// Serial number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    /// Model number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_number: Option<String>,
    /// Most namespaces (SPDK omits 0, which an NVMe subsystem never has).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_namespaces: Option<u32>,
    /// Lowest controller ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_cntlid: Option<u16>,
    /// Highest controller ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cntlid: Option<u16>,
    /// Namespaces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<NamespaceInfo>>,
}

impl SubsystemInfo {
    /// The discovery subsystem: it allows any host.
    pub fn discovery(listen_addresses: Vec<Trid>, hosts: Vec<HostInfo>) -> SubsystemInfo {
        SubsystemInfo {
            nqn: super::nqn::DISCOVERY_NQN.into(),
            subtype: Subtype::Discovery,
            listen_addresses,
            allow_any_host: true,
            hosts,
            serial_number: None,
            model_number: None,
            max_namespaces: None,
            min_cntlid: None,
            max_cntlid: None,
            namespaces: None,
        }
    }

    /// An NVMe subsystem created with `opts` (normalized), with its current `allow_any_host`.
    pub fn nvme(
        opts: &NvmfCreateSubsystem,
        allow_any_host: bool,
        listen_addresses: Vec<Trid>,
        hosts: Vec<HostInfo>,
        namespaces: Vec<NamespaceInfo>,
    ) -> SubsystemInfo {
        SubsystemInfo {
            nqn: opts.nqn.clone(),
            subtype: Subtype::Nvme,
            listen_addresses,
            allow_any_host,
            hosts,
            serial_number: Some(opts.serial_number.clone()),
            model_number: Some(opts.model_number.clone()),
            max_namespaces: Some(opts.max_namespaces).filter(|n| *n != 0),
            min_cntlid: Some(opts.min_cntlid),
            max_cntlid: Some(opts.max_cntlid),
            namespaces: Some(namespaces),
        }
    }
}

/// `strncmp()` order of NQNs, SPDK's order of subsystems (byte order, as `str`'s `Ord`).
pub fn nqn_order(a: &str, b: &str) -> std::cmp::Ordering {
    a.as_bytes().cmp(b.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::decode_method;
    use serde_json::json;

    fn create(v: serde_json::Value) -> Result<NvmfCreateSubsystem, RpcError> {
        let mut p: NvmfCreateSubsystem = decode_method(Some(v))?;
        p.normalize(false, 1, 1024)?;
        Ok(p)
    }

    fn err(v: serde_json::Value) -> (i32, String) {
        let e = create(v).unwrap_err();
        (e.code, e.message)
    }

    #[test]
    fn defaults_and_write_order() {
        let p = create(
            json!({"nqn": "nqn.2016-06.io.spdk:cnode1", "tgt_name": "nvmf_tgt",
                              "max_discard_size_kib": 8}),
        )
        .unwrap();
        assert_eq!(p.max_discard_size_kib, 8);
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            concat!(
                r#"{"nqn":"nqn.2016-06.io.spdk:cnode1","allow_any_host":false,"#,
                r#""serial_number":"00000000000000000000","model_number":"SPDK bdev Controller","#,
                r#""max_namespaces":32,"min_cntlid":1,"max_cntlid":65519,"ana_reporting":false}"#
            )
        );
        // What the 26.x rpc.py sends.
        let p = create(
            json!({"nqn": "nqn.2016-06.io.spdk:x", "allow_any_host": false,
                              "ana_reporting": false, "passthrough": false, "enable_nssr": false}),
        )
        .unwrap();
        assert_eq!(p.passthrough, Some(false));
        assert!(!serde_json::to_string(&p).unwrap().contains("passthrough"));
    }

    #[test]
    fn refusals() {
        let e =
            decode_method::<NvmfCreateSubsystem>(Some(json!({"serial_number": "x"}))).unwrap_err();
        assert_eq!(e.message, "missing field `nqn`");
        assert!(
            decode_method::<NvmfCreateSubsystem>(Some(json!({"nqn": "n", "bogus": 1}))).is_err()
        );
        assert_eq!(
            err(json!({"nqn": "nqn.2016-06.io.spdk"})),
            (
                -32603,
                "Unable to create subsystem nqn.2016-06.io.spdk".into()
            )
        );
        assert_eq!(
            err(json!({"nqn": "nqn.2016-06.io.spdk:x", "serial_number": "S".repeat(21)})),
            (-32602, format!("Invalid SN {}", "S".repeat(21)))
        );
        assert_eq!(
            err(json!({"nqn": "nqn.2016-06.io.spdk:x", "model_number": "é"})),
            (-32602, "Invalid MN é".into())
        );
        assert_eq!(
            err(json!({"nqn": "nqn.2016-06.io.spdk:x", "min_cntlid": 10, "max_cntlid": 5})),
            (-32602, "Invalid cntlid range [10-5]".into())
        );
        assert_eq!(
            err(json!({"nqn": "nqn.2016-06.io.spdk:x", "max_cntlid": 65520})),
            (-32602, "Invalid cntlid range [1-65520]".into())
        );
        assert_eq!(
            err(json!({"nqn": "nqn.2016-06.io.spdk:x", "min_cntlid": 0})),
            (-32602, "Invalid cntlid range [0-65519]".into())
        );
        assert_eq!(
            err(json!({"nqn": "nqn.2016-06.io.spdk:x", "max_write_zeroes_size_kib": 6})),
            (-32602, "Invalid max_write_zeroes_size_kib 6\n".into())
        );
        assert_eq!(
            err(json!({"nqn": "nqn.2016-06.io.spdk:x", "max_write_zeroes_size_kib": 2})).0,
            -32602
        );
        assert!(
            create(json!({"nqn": "nqn.2016-06.io.spdk:x", "max_write_zeroes_size_kib": 4})).is_ok()
        );
        let mut p = NvmfCreateSubsystem::new("nqn.2016-06.io.spdk:x");
        assert_eq!(
            p.normalize(true, 1, 1024).unwrap_err().message,
            "Unable to create subsystem nqn.2016-06.io.spdk:x"
        );
        assert!(p.normalize(false, 1024, 1024).is_err());
    }

    #[test]
    fn order() {
        let mut v = [
            "nqn.2016-06.io.spdk:cnode2",
            "nqn.2016-06.io.spdk:cnode10",
            crate::params::DISCOVERY_NQN,
        ];
        v.sort_by(|a, b| nqn_order(a, b));
        assert_eq!(
            v,
            [
                crate::params::DISCOVERY_NQN,
                "nqn.2016-06.io.spdk:cnode10",
                "nqn.2016-06.io.spdk:cnode2"
            ]
        );
    }
}
