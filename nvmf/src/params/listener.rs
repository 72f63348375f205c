//! `nvmf_subsystem_add_listener`, `nvmf_subsystem_remove_listener`, `nvmf_subsystem_listener_set_ana_state`
//! and `nvmf_subsystem_get_listeners`' result (lib/nvmf/nvmf_rpc.c).

use jsonrpc::RpcError;
use serde::{Deserialize, Serialize};
use subsystems::params::{object, some};

use super::address::{AnaState, ListenAddress, Trid};
use super::method;

/// `nvmf_subsystem_add_listener` parameters, decoded relaxed at the top level (`listen_address` strictly). An
/// unknown NQN, an address SPDK refuses, an existing listener, a transport type not created and a failed
/// `listen()` are all `-32602 "Invalid parameters"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfSubsystemAddListener {
    /// Subsystem NQN (the discovery NQN too).
    pub nqn: String,
    /// Address to listen on.
    #[serde(deserialize_with = "object")]
    pub listen_address: ListenAddress,
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
    /// Hosts must connect over TLS (TCP).
    #[serde(default)]
    pub secure_channel: bool,
    /// ANA state of every group at this listener (`optimized` by default); any case.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub ana_state: Option<String>,
    /// SPDK 24.09+: sock implementation of the listener.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub sock_impl: Option<String>,
}

method!(
    NvmfSubsystemAddListener,
    "nvmf_subsystem_add_listener",
    relaxed
);

impl NvmfSubsystemAddListener {
    /// The checks `rpc_nvmf_subsystem_add_listener()` makes once the subsystem is found, in SPDK's order: the
    /// address ([`ListenAddress::to_trid`]), then `secure_channel` on a subsystem that allows any host
    /// (`-32603 "Cannot establish secure channel, when 'allow_any_host' is set"`), then the ANA state
    /// (`-32602 "Invalid parameters"`). The listener must then not exist yet (`-32602`).
    pub fn check(&self, allow_any_host: bool) -> Result<(Trid, AnaState), RpcError> {
        let trid = self.listen_address.to_trid()?;
        if allow_any_host && self.secure_channel {
            return Err(RpcError::internal(
                "Cannot establish secure channel, when 'allow_any_host' is set",
            ));
        }
        let ana = match &self.ana_state {
            Some(s) => AnaState::parse_rpc(s)?,
            None => AnaState::Optimized,
        };
        Ok((trid, ana))
    }

    /// The entry `save_config` writes for the listener this call added.
    pub fn config(&self, trid: Trid) -> ListenerConfig {
        ListenerConfig {
            nqn: self.nqn.clone(),
            listen_address: trid,
            secure_channel: self.secure_channel,
            sock_impl: self.sock_impl.clone(),
        }
    }
}

/// The `nvmf_subsystem_add_listener` params `save_config` writes: the ANA state is not (SPDK v24.05 loses it
/// on reload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerConfig {
    /// Subsystem NQN.
    pub nqn: String,
    /// The address.
    pub listen_address: Trid,
    /// TLS required.
    pub secure_channel: bool,
    /// SPDK 24.09+, written once set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sock_impl: Option<String>,
}

impl ListenerConfig {
    /// Whether connections there use TLS: `secure_channel`, or the `ssl` sock implementation (SPDK 24.09+).
    pub fn tls(&self) -> bool {
        self.secure_channel || self.sock_impl.as_deref() == Some("ssl")
    }
}

/// `nvmf_subsystem_remove_listener` parameters: the decoder of `nvmf_subsystem_add_listener` (so
/// `secure_channel` and `ana_state` are taken and ignored), strict. An unknown NQN, a bad address, a
/// transport type not created and an unknown listener are `-32602 "Invalid parameters"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfSubsystemRemoveListener {
    /// Subsystem NQN.
    pub nqn: String,
    /// The listener's address.
    #[serde(deserialize_with = "object")]
    pub listen_address: ListenAddress,
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
    /// Ignored.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub secure_channel: Option<bool>,
    /// Ignored.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub ana_state: Option<String>,
}

method!(
    NvmfSubsystemRemoveListener,
    "nvmf_subsystem_remove_listener"
);

/// `nvmf_subsystem_listener_set_ana_state` parameters. An unknown NQN is `-32602 "Unable to find subsystem
/// with NQN X"` (see [`errors::subsystem_not_found`](super::errors::subsystem_not_found)).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfSubsystemListenerSetAnaState {
    /// Subsystem NQN.
    pub nqn: String,
    /// The listener's address.
    #[serde(deserialize_with = "object")]
    pub listen_address: ListenAddress,
    /// `optimized`, `non_optimized` or `inaccessible`, any case.
    pub ana_state: String,
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
    /// Only this ANA group (0, the default: all).
    #[serde(default)]
    pub anagrpid: u32,
}

method!(
    NvmfSubsystemListenerSetAnaState,
    "nvmf_subsystem_listener_set_ana_state"
);

impl NvmfSubsystemListenerSetAnaState {
    /// The checks made once the subsystem is found: the address, then the state (both `-32602 "Invalid
    /// parameters"`).
    pub fn check(&self) -> Result<(Trid, AnaState), RpcError> {
        let trid = self.listen_address.to_trid()?;
        Ok((trid, AnaState::parse_rpc(&self.ana_state)?))
    }

    /// The checks of `spdk_nvmf_subsystem_set_ana_state()`, in SPDK's order: ANA reporting is on, the group is
    /// at most `max_nsid`, the listener exists; each `-32603 "error setting ANA state: -22"`.
    pub fn check_subsystem(
        &self,
        ana_reporting: bool,
        max_nsid: u32,
        listener_exists: bool,
    ) -> Result<(), RpcError> {
        let detail = if !ana_reporting {
            "ANA reporting is disabled".to_string()
        } else if self.anagrpid > max_nsid {
            format!("ANA group ID {} is more than maximum", self.anagrpid)
        } else if !listener_exists {
            "Unable to find listener.".to_string()
        } else {
            return Ok(());
        };
        log::error!("{detail}");
        Err(RpcError::internal(format!(
            "error setting ANA state: {}",
            -libc::EINVAL
        )))
    }
}

/// One ANA group's state at a listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AnaGroupState {
    /// ANA group ID (1 to `max_namespaces`).
    pub ana_group: u32,
    /// Its state.
    pub ana_state: AnaState,
}

/// A listener of `nvmf_subsystem_get_listeners` (`dump_nvmf_subsystem_listener()`): with ANA reporting, the
/// state of every group from 1 to `max_namespaces`. SPDK lists listeners newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerInfo {
    /// The address.
    pub address: Trid,
    /// The groups' states.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ana_states: Option<Vec<AnaGroupState>>,
}

impl ListenerInfo {
    /// A listener whose group `g` is in `states[g - 1]`; `ana_reporting` off omits them.
    pub fn new(address: Trid, ana_reporting: bool, states: &[AnaState]) -> ListenerInfo {
        ListenerInfo {
            address,
            ana_states: ana_reporting.then(|| {
                (1..)
                    .zip(states)
                    .map(|(ana_group, s)| AnaGroupState {
                        ana_group,
                        ana_state: *s,
                    })
                    .collect()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::decode_method;
    use serde_json::json;

    #[test]
    fn add() {
        let p: NvmfSubsystemAddListener = decode_method(Some(json!({
            "nqn": "n", "bogus": 1, "ana_state": "NON_OPTIMIZED",
            "listen_address": {"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": "4422"}})))
        .unwrap();
        let (trid, ana) = p.check(false).unwrap();
        assert_eq!(ana, AnaState::NonOptimized);
        assert_eq!(
            serde_json::to_value(p.config(trid)).unwrap(),
            json!({"nqn": "n", "listen_address": {"trtype": "TCP", "adrfam": "IPv4",
                   "traddr": "127.0.0.1", "trsvcid": "4422"}, "secure_channel": false})
        );
        let secure: NvmfSubsystemAddListener = decode_method(Some(json!({
            "nqn": "n", "secure_channel": true, "listen_address": {"trtype": "TCP", "traddr": "a"}})))
        .unwrap();
        let e = secure.check(true).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (
                -32603,
                "Cannot establish secure channel, when 'allow_any_host' is set"
            )
        );
        assert!(secure.check(false).is_ok());
        assert!(decode_method::<NvmfSubsystemAddListener>(Some(json!({
            "nqn": "n", "listen_address": {"trtype": "TCP", "traddr": "a", "bogus": 1}})))
        .is_err());
    }

    #[test]
    fn remove_and_ana() {
        let p: NvmfSubsystemRemoveListener = decode_method(Some(json!({
            "nqn": "n", "secure_channel": false, "ana_state": "optimized",
            "listen_address": {"transport": "TCP", "traddr": "a", "trsvcid": "1"}})))
        .unwrap();
        assert!(p
            .listen_address
            .to_trid()
            .unwrap()
            .same(&Trid::tcp("A", "1")));
        assert!(decode_method::<NvmfSubsystemRemoveListener>(Some(json!({
            "nqn": "n", "bogus": 1, "listen_address": {"trtype": "TCP", "traddr": "a"}})))
        .is_err());
        let s: NvmfSubsystemListenerSetAnaState = decode_method(Some(json!({
            "nqn": "n", "ana_state": "change", "listen_address": {"trtype": "TCP", "traddr": "a"}})))
        .unwrap();
        assert_eq!(s.check().unwrap_err().message, "Invalid parameters");
        let e = s.check_subsystem(false, 4, true).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (-32603, "error setting ANA state: -22")
        );
        assert!(s.check_subsystem(true, 4, true).is_ok());
        assert!(s.check_subsystem(true, 4, false).is_err());
        let info = ListenerInfo::new(
            Trid::tcp("a", "1"),
            true,
            &[AnaState::Optimized, AnaState::Inaccessible],
        );
        assert_eq!(
            serde_json::to_value(info).unwrap()["ana_states"],
            json!([{"ana_group": 1, "ana_state": "optimized"}, {"ana_group": 2, "ana_state": "inaccessible"}])
        );
    }
}
