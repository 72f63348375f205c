//! Parameters and results of SPDK v24.05's NVMe-oF target RPCs (lib/nvmf/nvmf_rpc.c), as typed structs: SPDK's
//! member names and write order, SPDK's defaults, and the value checks SPDK's handlers make, answering SPDK's
//! codes and messages. Pure data: the target engine owns the state, registers the methods and calls these.
//!
//! | module | methods |
//! | --- | --- |
//! | [`transport`] | `nvmf_create_transport`, `nvmf_get_transports` |
//! | [`subsystem`] | `nvmf_create_subsystem`, `nvmf_delete_subsystem`, `nvmf_get_subsystems`, `nvmf_subsystem_allow_any_host`, the `nqn` + `tgt_name` queries (`nvmf_subsystem_get_controllers`, `_get_qpairs`, `_get_listeners`) |
//! | [`namespace`] | `nvmf_subsystem_add_ns`, `nvmf_subsystem_remove_ns`, `nvmf_ns_add_host`, `nvmf_ns_remove_host` |
//! | [`listener`] | `nvmf_subsystem_add_listener`, `nvmf_subsystem_remove_listener`, `nvmf_subsystem_listener_set_ana_state`, `nvmf_subsystem_get_listeners`' result |
//! | [`host`] | `nvmf_subsystem_add_host`, `nvmf_subsystem_remove_host` |
//! | [`referral`] | `nvmf_discovery_add_referral`, `nvmf_discovery_remove_referral`, `nvmf_discovery_get_referrals` |
//! | [`stats`] | `nvmf_get_stats`, and the results of `nvmf_subsystem_get_controllers` and `_get_qpairs` |
//! | [`config`] | the `nvmf` subsystem's `save_config` entries, in SPDK's order |
//!
//! Shared pieces: [`nqn`] (`nvmf_nqn_is_valid()`), [`address`] (`listen_address` objects and the transport ID
//! SPDK writes back), [`errors`] (SPDK's answers, with the table of which call answers what). The options of
//! `nvmf_set_config`, `nvmf_set_max_subsystems` and `nvmf_set_crdt` are [`subsystems::nvmf`]'s.
//!
//! # Decoding
//!
//! Decode with [`decode_method`]: like SPDK, it ignores unknown top-level members for the methods SPDK decodes
//! "relaxed" (it hands the whole object on to the transport: `nvmf_create_transport`,
//! `nvmf_subsystem_add_listener`, `nvmf_subsystem_add_ns`, `nvmf_subsystem_add_host`,
//! `nvmf_discovery_add_referral`) and refuses them for the others and inside nested objects. A decoding fault
//! is `-32602` with a serde-style message naming the member (SPDK says `"Invalid parameters"`, see
//! [`subsystems::params`]); the checks after decoding answer exactly what SPDK answers.
//!
//! Members SPDK v24.05 does not know but later clients send (the 26.x `rpc.py` always sends
//! `"passthrough": false` and `"enable_nssr": false` to `nvmf_create_subsystem`, `"hide_metadata": false` in
//! a namespace, ...) are accepted as `Option`s and written back only once set.
//!
//! # Order
//!
//! SPDK keeps subsystems in a tree keyed by NQN (`strcmp` order: `cnode1`, `cnode10`, `cnode2`), transports in
//! creation order, namespaces by NSID, and hosts, listeners and referrals newest first: the getters and
//! `save_config` list them so (see the fixtures under `tests/fixtures/spdk-v24.05/`).

use jsonrpc::RpcError;
use serde_json::Value;
use subsystems::params::Params;

pub mod address;
pub mod config;
pub mod errors;
pub mod host;
pub mod listener;
pub mod namespace;
pub mod nqn;
pub mod referral;
pub mod stats;
pub mod subsystem;
pub mod transport;

pub use address::{AdrFam, AnaState, ListenAddress, Trid};
pub use config::{NvmfSaveConfig, SubsystemConfig};
pub use host::{NvmfSubsystemAddHost, NvmfSubsystemRemoveHost};
pub use listener::{
    ListenerConfig, ListenerInfo, NvmfSubsystemAddListener, NvmfSubsystemListenerSetAnaState,
    NvmfSubsystemRemoveListener,
};
pub use namespace::{
    Eui64, NamespaceInfo, NamespaceParams, Nguid, NvmfNsVisibility, NvmfSubsystemAddNs,
    NvmfSubsystemRemoveNs,
};
pub use nqn::{nqn_is_valid, DISCOVERY_NQN};
pub use referral::{
    NvmfDiscoveryAddReferral, NvmfDiscoveryRemoveReferral, NvmfGetReferrals, Referral,
};
pub use stats::{ControllerInfo, NvmfGetStats, PollGroupStat, QpairInfo, Stats};
pub use subsystem::{
    HostInfo, NvmfCreateSubsystem, NvmfDeleteSubsystem, NvmfGetSubsystems,
    NvmfSubsystemAllowAnyHost, NvmfSubsystemQuery, SubsystemInfo,
};
pub use transport::{
    NvmfCreateTransport, NvmfGetTransports, TransportEnv, TransportKind, TransportOpts,
};

/// The name of the one NVMe-oF target (`nvmf_tgt`, module/event/subsystems/nvmf/nvmf_tgt.c).
pub const DEFAULT_TGT_NAME: &str = "nvmf_tgt";

/// A method's parameters object.
pub trait NvmfMethod: Params {
    /// The method's name (the first one, for a struct several methods share).
    const METHOD: &'static str;
    /// SPDK decodes the top level with `spdk_json_decode_object_relaxed()`: unknown members are ignored.
    const RELAXED: bool = false;
}

/// Decodes the parameters of `T`'s method as SPDK does (relaxed or not, see the module docs).
pub fn decode_method<T: NvmfMethod>(params: Option<Value>) -> Result<T, RpcError> {
    if T::RELAXED {
        subsystems::decode_relaxed(params)
    } else {
        subsystems::decode(params)
    }
}

/// `spdk_nvmf_get_tgt()` with one target: no name, or its name.
pub fn is_this_target(tgt_name: Option<&str>) -> bool {
    tgt_name.is_none_or(|n| n == DEFAULT_TGT_NAME)
}

/// Declares a method's parameters struct: `Params` and [`NvmfMethod`] (`relaxed` for SPDK's relaxed decoders).
macro_rules! method {
    ($ty:ty, $name:literal) => {
        impl subsystems::params::Params for $ty {}
        impl $crate::params::NvmfMethod for $ty {
            const METHOD: &'static str = $name;
        }
    };
    ($ty:ty, $name:literal, relaxed) => {
        impl subsystems::params::Params for $ty {}
        impl $crate::params::NvmfMethod for $ty {
            const METHOD: &'static str = $name;
            const RELAXED: bool = true;
        }
    };
}
pub(crate) use method;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names() {
        assert!(is_this_target(None));
        assert!(is_this_target(Some("nvmf_tgt")));
        assert!(!is_this_target(Some("none")));
    }
}
