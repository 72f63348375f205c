//! The `nvmf` subsystem's `save_config` entries in SPDK v24.05's order (`nvmf_subsystem_write_config_json()`,
//! `spdk_nvmf_tgt_write_config_json()`): `nvmf_set_config`, `nvmf_set_max_subsystems`, `nvmf_set_crdt` (the
//! [`subsystems::nvmf`] options), one `nvmf_create_transport` per transport in creation order, one
//! `nvmf_discovery_add_referral` per referral, then per subsystem in NQN order: `nvmf_create_subsystem`, its
//! `nvmf_subsystem_add_host`s, `nvmf_subsystem_add_ns`s (by NSID) and `nvmf_subsystem_add_listener`s. The
//! discovery subsystem writes only its listeners.

use serde::Serialize;
use serde_json::{json, Value};
use subsystems::nvmf::{NvmfConfig, NvmfCrdt, NvmfMaxSubsystems};
use subsystems::params::to_object;

use super::host::NvmfSubsystemAddHost;
use super::listener::ListenerConfig;
use super::namespace::NamespaceParams;
use super::referral::Referral;
use super::subsystem::{nqn_order, NvmfCreateSubsystem};
use super::transport::TransportOpts;

/// One subsystem's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsystemConfig {
    /// Subsystem NQN.
    pub nqn: String,
    /// An NVMe subsystem's options, normalized, with its current `allow_any_host`; `None` for the discovery
    /// subsystem.
    pub create: Option<NvmfCreateSubsystem>,
    /// Hosts allowed, newest first as SPDK lists them (their `nqn` is replaced by the subsystem's).
    pub hosts: Vec<NvmfSubsystemAddHost>,
    /// Namespaces, [`resolve`](NamespaceParams::resolve)d (written by NSID).
    pub namespaces: Vec<NamespaceParams>,
    /// Listeners, newest first as SPDK lists them.
    pub listeners: Vec<ListenerConfig>,
}

/// What the target writes after the options: transports, referrals and subsystems.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NvmfSaveConfig {
    /// Transports in creation order.
    pub transports: Vec<TransportOpts>,
    /// Referrals, newest first as SPDK lists them.
    pub referrals: Vec<Referral>,
    /// Subsystems in any order (written in NQN order).
    pub subsystems: Vec<SubsystemConfig>,
}

/// `{"method": method, "params": params}`.
fn entry<T: Serialize>(method: &str, params: &T) -> Value {
    json!({"method": method, "params": to_object(params)})
}

impl NvmfSaveConfig {
    /// Every entry of the `nvmf` subsystem, the options' first (`max_subsystems` as in force:
    /// [`NvmfMaxSubsystems::effective`]).
    pub fn entries(
        &self,
        config: &NvmfConfig,
        max_subsystems: &NvmfMaxSubsystems,
        crdt: &NvmfCrdt,
    ) -> Vec<Value> {
        let mut v = vec![
            entry("nvmf_set_config", config),
            entry("nvmf_set_max_subsystems", &max_subsystems.effective()),
            entry("nvmf_set_crdt", crdt),
        ];
        v.extend(self.target_entries());
        v
    }

    /// The entries after the options'.
    pub fn target_entries(&self) -> Vec<Value> {
        let mut v: Vec<Value> = self
            .transports
            .iter()
            .map(|t| entry("nvmf_create_transport", t))
            .collect();
        v.extend(
            self.referrals
                .iter()
                .map(|r| entry("nvmf_discovery_add_referral", r)),
        );
        let mut subsystems: Vec<&SubsystemConfig> = self.subsystems.iter().collect();
        subsystems.sort_by(|a, b| nqn_order(&a.nqn, &b.nqn));
        for s in subsystems {
            if let Some(create) = &s.create {
                v.push(entry("nvmf_create_subsystem", create));
                for h in &s.hosts {
                    let h = NvmfSubsystemAddHost {
                        nqn: s.nqn.clone(),
                        ..h.clone()
                    };
                    v.push(entry("nvmf_subsystem_add_host", &h));
                }
                let mut namespaces: Vec<&NamespaceParams> = s.namespaces.iter().collect();
                namespaces.sort_by_key(|n| n.nsid);
                for ns in namespaces {
                    v.push(json!({"method": "nvmf_subsystem_add_ns", "params": {
                        "nqn": s.nqn,
                        "namespace": to_object(&ns.for_config(create.ana_reporting)),
                    }}));
                }
            }
            for l in &s.listeners {
                let l = ListenerConfig {
                    nqn: s.nqn.clone(),
                    ..l.clone()
                };
                v.push(entry("nvmf_subsystem_add_listener", &l));
            }
        }
        v
    }
}
