//! `nvmf_subsystem_add_host` and `nvmf_subsystem_remove_host` (lib/nvmf/nvmf_rpc.c, subsystem.c, tcp.c).

use jsonrpc::RpcError;
use serde::{Deserialize, Serialize};
use subsystems::params::some;

use super::nqn::nqn_is_valid;
use super::subsystem::HostInfo;
use super::{errors, method};

/// `nvmf_subsystem_add_host` parameters (decoded relaxed: SPDK hands the object on to the transports, TCP
/// takes `psk` from it) and, as given, the entry `save_config` writes (`nqn`, `host`, the key names once set,
/// then TCP's `psk`). Adding a host already allowed answers `true` and changes nothing, keys included.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfSubsystemAddHost {
    /// Subsystem NQN (unknown: `-32602 "Invalid parameters"`).
    pub nqn: String,
    /// Host NQN.
    pub host: String,
    /// Target name.
    #[serde(default, deserialize_with = "some", skip_serializing)]
    pub tgt_name: Option<String>,
    /// Keyring key the host authenticates with (DH-HMAC-CHAP).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub dhchap_key: Option<String>,
    /// Keyring key the controller authenticates with (bidirectional; needs `dhchap_key`).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub dhchap_ctrlr_key: Option<String>,
    /// TCP: keyring key name, or (deprecated) path of a file, of the TLS PSK in interchange format.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub psk: Option<String>,
}

method!(NvmfSubsystemAddHost, "nvmf_subsystem_add_host", relaxed);

impl NvmfSubsystemAddHost {
    /// The checks of `rpc_nvmf_subsystem_add_host()` and `spdk_nvmf_subsystem_add_host_ext()` made once the
    /// subsystem is found, in SPDK's order: the keys are in the keyring (`key_exists`; `-32602 "Invalid
    /// parameters"`), the host NQN is valid (`-32603 "Internal error"`), then a host `already_allowed` is
    /// `Ok(false)` (nothing to add: SPDK answers `true`), then a controller key needs a host key (`-32603
    /// "Internal error"`). `Ok(true)`: add the host; the transport's checks (the PSK) answer `-32603
    /// "Internal error"` too.
    pub fn check(
        &self,
        key_exists: impl Fn(&str) -> bool,
        already_allowed: bool,
    ) -> Result<bool, RpcError> {
        for (what, key) in [
            ("DH-HMAC-CHAP key", &self.dhchap_key),
            ("DH-HMAC-CHAP ctrlr key", &self.dhchap_ctrlr_key),
        ] {
            if let Some(k) = key.as_deref().filter(|k| !key_exists(k)) {
                log::error!("Unable to find {what}: {k}");
                return Err(errors::invalid_params());
            }
        }
        if !nqn_is_valid(&self.host) {
            return Err(errors::internal_error());
        }
        if already_allowed {
            return Ok(false);
        }
        if self.dhchap_key.is_none() && self.dhchap_ctrlr_key.is_some() {
            log::error!("DH-HMAC-CHAP controller key requires host key to be set");
            return Err(errors::internal_error());
        }
        Ok(true)
    }

    /// The host as `nvmf_get_subsystems` lists it.
    pub fn info(&self) -> HostInfo {
        HostInfo {
            nqn: self.host.clone(),
            dhchap_key: self.dhchap_key.clone(),
            dhchap_ctrlr_key: self.dhchap_ctrlr_key.clone(),
        }
    }
}

/// `nvmf_subsystem_remove_host` parameters: the decoder of `nvmf_subsystem_add_host` (the keys are taken and
/// ignored), strict. An unknown NQN is `-32602 "Invalid parameters"`; a host not allowed is `-32603
/// "Internal error"`. SPDK disconnects the host's controllers before answering.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfSubsystemRemoveHost {
    /// Subsystem NQN.
    pub nqn: String,
    /// Host NQN.
    pub host: String,
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
    pub dhchap_key: Option<String>,
    /// Ignored.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub dhchap_ctrlr_key: Option<String>,
    /// SPDK 25.x+: milliseconds to wait for the host's I/O (the 26.x `rpc.py` sends it when given).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout_ms: Option<u64>,
}

method!(NvmfSubsystemRemoveHost, "nvmf_subsystem_remove_host");

impl NvmfSubsystemRemoveHost {
    /// `-32603 "Internal error"`: the host is not allowed (`spdk_nvmf_subsystem_remove_host()` is `-ENOENT`).
    pub fn not_allowed_error(&self) -> RpcError {
        errors::internal_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::decode_method;
    use serde_json::json;

    fn add(v: serde_json::Value) -> NvmfSubsystemAddHost {
        decode_method(Some(v)).unwrap()
    }

    #[test]
    fn checks() {
        let h = add(
            json!({"nqn": "n", "host": "nqn.2016-06.io.spdk:host1", "bogus": 1, "tgt_name": "nvmf_tgt"}),
        );
        assert_eq!(h.check(|_| false, false), Ok(true));
        assert_eq!(h.check(|_| false, true), Ok(false));
        assert_eq!(
            serde_json::to_value(&h).unwrap(),
            json!({"nqn": "n", "host": "nqn.2016-06.io.spdk:host1"})
        );
        let e = add(json!({"nqn": "n", "host": "bad-host"}))
            .check(|_| true, false)
            .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32603, "Internal error"));
        let e = add(json!({"nqn": "n", "host": "bad-host", "dhchap_key": "k"}))
            .check(|_| false, false)
            .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32602, "Invalid parameters"));
        let e = add(json!({"nqn": "n", "host": "nqn.2016-06.io.spdk:h", "dhchap_ctrlr_key": "k"}))
            .check(|_| true, false)
            .unwrap_err();
        assert_eq!(e.code, -32603);
        let h = add(
            json!({"nqn": "n", "host": "nqn.2016-06.io.spdk:h", "dhchap_key": "k",
                           "dhchap_ctrlr_key": "c", "psk": "p"}),
        );
        assert_eq!(h.check(|_| true, false), Ok(true));
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            r#"{"nqn":"n","host":"nqn.2016-06.io.spdk:h","dhchap_key":"k","dhchap_ctrlr_key":"c","psk":"p"}"#
        );
        assert_eq!(
            serde_json::to_string(&h.info()).unwrap(),
            r#"{"nqn":"nqn.2016-06.io.spdk:h","dhchap_key":"k","dhchap_ctrlr_key":"c"}"#
        );
    }

    #[test]
    fn remove() {
        assert!(decode_method::<NvmfSubsystemRemoveHost>(Some(
            json!({"nqn": "n", "host": "h", "bogus": 1})
        ))
        .is_err());
        assert!(decode_method::<NvmfSubsystemRemoveHost>(Some(
            json!({"nqn": "n", "host": "h", "timeout_ms": 5})
        ))
        .is_ok());
    }
}
