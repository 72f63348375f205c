//! `nvmf` subsystem options (lib/nvmf/nvmf_rpc.c, module/event/subsystems/nvmf/nvmf_rpc.c):
//! `nvmf_set_config`, `nvmf_set_max_subsystems`, `nvmf_set_crdt`. Transports, subsystems and their listeners
//! are not options and are not here.

use jsonrpc::RpcError;
use serde::{Deserialize, Serialize};

use crate::cpuset::CpuSet;
use crate::dhchap::{DhGroup, Digest};
use crate::params::{object, some, Name, NameSet, Params};

/// `admin_cmd_passthru`: admin commands passed to the backing NVMe controller instead of emulated. A call
/// changes the members it gives; the ones added after v24.05 are written once set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct AdminCmdPassthru {
    /// Identify Controller.
    pub identify_ctrlr: bool,
    /// SPDK 25.09+: Identify UUID List.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub identify_uuid_list: Option<bool>,
    /// SPDK 25.09+: Get Log Page.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub get_log_page: Option<bool>,
    /// SPDK 25.09+: Get/Set Features.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub get_set_features: Option<bool>,
    /// SPDK 25.09+: Sanitize.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub sanitize: Option<bool>,
    /// SPDK 25.09+: Security Send/Receive.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub security_send_recv: Option<bool>,
    /// SPDK 25.09+: Firmware Download/Commit.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub fw_update: Option<bool>,
    /// SPDK 25.09+: NVMe-MI Send/Receive.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub nvme_mi: Option<bool>,
    /// SPDK 25.09+: vendor-specific commands.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub vendor_specific: Option<bool>,
}

crate::names! {
    /// What a discovery log page is filtered on (SPDK 26.x `discovery_filters`).
    pub enum DiscoveryFilter {
        /// Transport type.
        Transport = "transport",
        /// Transport address.
        Address = "address",
        /// Transport service id.
        Svcid = "svcid",
    }
}

crate::names! {
    /// How a host already connected is treated (SPDK 25.x `dup_host_policy`).
    pub enum DupHostPolicy {
        /// Allowed again.
        Allow = "allow",
        /// Once per listener.
        RestrictPerListener = "restrict_per_listener",
    }
}

/// `nvmf_set_config` parameters and the target's options (`struct spdk_nvmf_tgt_conf`), in SPDK's write order.
/// A call changes the members it gives and must pass [`normalize`](Self::normalize). `dhchap_*` are accepted by
/// v24.05 but only saved by later versions, so written once set, like the members added later.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct NvmfConfig {
    /// `match_any` or a comma-separated list of `transport`, `address`, `svcid`; written as SPDK formats it.
    pub discovery_filter: String,
    /// Admin commands passed through.
    #[serde(deserialize_with = "object")]
    pub admin_cmd_passthru: AdminCmdPassthru,
    /// Cores of the poll groups (a subset of the application's); written as hex without `0x`.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub poll_groups_mask: Option<String>,
    /// DH-HMAC-CHAP digests allowed.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub dhchap_digests: Option<NameSet<Digest>>,
    /// DH-HMAC-CHAP groups allowed.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub dhchap_dhgroups: Option<NameSet<DhGroup>>,
    /// SPDK 25.x+: how a host already connected is treated.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub dup_host_policy: Option<DupHostPolicy>,
    /// SPDK 26.x: the filter as a list; it replaces `discovery_filter` (and is kept as that).
    #[serde(deserialize_with = "some", skip_serializing)]
    pub discovery_filters: Option<NameSet<DiscoveryFilter>>,
}

impl Params for NvmfConfig {}

impl Default for NvmfConfig {
    /// `match_any`, no passthrough.
    fn default() -> Self {
        NvmfConfig {
            discovery_filter: "match_any".into(),
            admin_cmd_passthru: AdminCmdPassthru::default(),
            poll_groups_mask: None,
            dhchap_digests: None,
            dhchap_dhgroups: None,
            dup_host_policy: None,
            discovery_filters: None,
        }
    }
}

impl NvmfConfig {
    /// The checks of `rpc_nvmf_set_config()` and the forms SPDK keeps: `discovery_filters` becomes
    /// `discovery_filter`; the filter is parsed (`decode_discovery_filter()`) and written back canonically; the
    /// mask must parse and, when the application's cores are known, be within them. Failures are `-32602
    /// "Invalid parameters"`, the detail logged.
    pub fn normalize(&mut self, app_cores: Option<&CpuSet>) -> Result<(), RpcError> {
        if let Some(list) = self.discovery_filters.take() {
            let bits = list.iter().fold(0, |acc, f| acc | filter_bit(*f));
            self.discovery_filter = discovery_filter_str(bits).into();
        }
        let bits = parse_discovery_filter(&self.discovery_filter).ok_or_else(|| {
            log::error!("Invalid value {}", self.discovery_filter);
            RpcError::invalid_params("Invalid parameters")
        })?;
        self.discovery_filter = discovery_filter_str(bits).into();
        if let Some(mask) = &self.poll_groups_mask {
            let set = CpuSet::parse(mask)
                .filter(|s| app_cores.is_none_or(|app| s.is_subset(app)))
                .ok_or_else(|| {
                    log::error!("Invalid cpumask {mask}");
                    RpcError::invalid_params("Invalid parameters")
                })?;
            self.poll_groups_mask = Some(set.to_hex());
        }
        Ok(())
    }
}

fn filter_bit(f: DiscoveryFilter) -> u32 {
    1 << DiscoveryFilter::ALL
        .iter()
        .position(|d| *d == f)
        .unwrap_or(0)
}

/// `decode_discovery_filter()`: `match_any` or a comma-separated list of `transport`, `address`, `svcid`
/// (each matched by prefix, as SPDK does), as bits in [`DiscoveryFilter`] order; `None` if SPDK refuses it.
pub fn parse_discovery_filter(s: &str) -> Option<u32> {
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
            let f = DiscoveryFilter::ALL
                .iter()
                .find(|d| tok.starts_with(d.name()))?;
            bits |= filter_bit(*f);
        }
    }
    Some(bits)
}

/// How SPDK writes the filter bits.
pub fn discovery_filter_str(bits: u32) -> &'static str {
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

/// `SPDK_NVMF_DEFAULT_MAX_SUBSYSTEMS`.
pub const DEFAULT_MAX_SUBSYSTEMS: u32 = 1024;

/// `nvmf_set_max_subsystems` parameters. Only one call with a non-zero value is accepted (a later one is
/// `-32603 "Must not call more than once"`); 0 keeps [`DEFAULT_MAX_SUBSYSTEMS`], which is what is written then.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct NvmfMaxSubsystems {
    /// Maximum number of subsystems.
    pub max_subsystems: u32,
}

impl Params for NvmfMaxSubsystems {}

impl NvmfMaxSubsystems {
    /// The value in force: the default for 0.
    pub fn effective(&self) -> NvmfMaxSubsystems {
        NvmfMaxSubsystems {
            max_subsystems: match self.max_subsystems {
                0 => DEFAULT_MAX_SUBSYSTEMS,
                n => n,
            },
        }
    }
}

/// `nvmf_set_crdt` parameters and the Command Retry Delay Times (in 100 ms units) reported to hosts: members
/// not given are reset to 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct NvmfCrdt {
    /// CRDT1.
    pub crdt1: u16,
    /// CRDT2.
    pub crdt2: u16,
    /// CRDT3.
    pub crdt3: u16,
}

impl Params for NvmfCrdt {}
