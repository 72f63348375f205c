//! `nvmf_discovery_add_referral`, `nvmf_discovery_remove_referral`, `nvmf_discovery_get_referrals`
//! (lib/nvmf/nvmf_rpc.c, `spdk_nvmf_tgt_add_referral()`).

use jsonrpc::RpcError;
use serde::{Deserialize, Serialize};
use subsystems::params::{object, some};

use super::address::{ListenAddress, Trid};
use super::nqn::{nqn_is_valid, DISCOVERY_NQN, NQN_MAX_LEN};
use super::transport::TransportKind;
use super::{errors, method};

/// A referral to another discovery service (or subsystem), as `nvmf_discovery_get_referrals` and
/// `save_config` write it. SPDK lists referrals newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Referral {
    /// Where it is.
    pub address: Trid,
    /// A secure channel is required.
    pub secure_channel: bool,
    /// The subsystem referred to (the discovery NQN by default).
    pub subnqn: String,
}

impl Referral {
    /// The same referral (`spdk_nvme_transport_id_compare()` with the NQN, which is compared exactly).
    pub fn same(&self, other: &Referral) -> bool {
        self.address.same(&other.address) && self.subnqn == other.subnqn
    }
}

/// The address and NQN of a referral call: `rpc_listen_address_to_trid()` (`-32602 "Invalid parameters"`),
/// then the NQN's length (`-32602 "Invalid subsystem NQN"`).
fn target(address: &ListenAddress, subnqn: &Option<String>) -> Result<(Trid, String), RpcError> {
    let trid = address.to_trid()?;
    let subnqn = match subnqn {
        Some(n) if n.len() > NQN_MAX_LEN => {
            return Err(RpcError::invalid_params("Invalid subsystem NQN"))
        }
        Some(n) if !n.is_empty() => n.clone(),
        _ => DISCOVERY_NQN.into(),
    };
    Ok((trid, subnqn))
}

/// `nvmf_discovery_add_referral` parameters, decoded relaxed (`address` strictly). Adding a referral that
/// exists answers `true` and changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfDiscoveryAddReferral {
    /// Where the referral is.
    #[serde(deserialize_with = "object")]
    pub address: ListenAddress,
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
    /// A secure channel is required.
    #[serde(default)]
    pub secure_channel: bool,
    /// The subsystem referred to (default: the discovery NQN).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub subnqn: Option<String>,
}

method!(
    NvmfDiscoveryAddReferral,
    "nvmf_discovery_add_referral",
    relaxed
);

impl NvmfDiscoveryAddReferral {
    /// The referral, after SPDK's checks in its order: the address and NQN length (`-32602`), a service ID for
    /// TCP and RDMA (`-32603 "Service ID is required."`), a valid NQN (`-32603 "Internal error"`).
    pub fn referral(&self) -> Result<Referral, RpcError> {
        let (address, subnqn) = target(&self.address, &self.subnqn)?;
        if needs_trsvcid(&address) && address.trsvcid.is_empty() {
            log::error!("Service ID is required.");
            return Err(RpcError::internal("Service ID is required."));
        }
        if !nqn_is_valid(&subnqn) {
            log::error!("Invalid subsystem NQN");
            return Err(errors::internal_error());
        }
        Ok(Referral {
            address,
            secure_channel: self.secure_channel,
            subnqn,
        })
    }
}

/// `nvmf_discovery_remove_referral` parameters: the decoder of `nvmf_discovery_add_referral`
/// (`secure_channel` is taken and ignored), strict. No such referral is `-32603 "Unable to remove a
/// referral."`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfDiscoveryRemoveReferral {
    /// Where the referral is.
    #[serde(deserialize_with = "object")]
    pub address: ListenAddress,
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
    /// Ignored.
    #[serde(default)]
    pub secure_channel: bool,
    /// The subsystem referred to (default: the discovery NQN).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub subnqn: Option<String>,
}

method!(
    NvmfDiscoveryRemoveReferral,
    "nvmf_discovery_remove_referral"
);

impl NvmfDiscoveryRemoveReferral {
    /// The referral to remove (its `secure_channel` is not compared): the address and NQN length checked as
    /// for adding (`-32602`).
    pub fn referral(&self) -> Result<Referral, RpcError> {
        let (address, subnqn) = target(&self.address, &self.subnqn)?;
        Ok(Referral {
            address,
            secure_channel: false,
            subnqn,
        })
    }

    /// `-32603 "Unable to remove a referral."`.
    pub fn not_found_error(&self) -> RpcError {
        log::error!("Failed to remove referral.");
        RpcError::internal("Unable to remove a referral.")
    }
}

/// `nvmf_discovery_get_referrals` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfGetReferrals {
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
}

method!(NvmfGetReferrals, "nvmf_discovery_get_referrals");

/// Whether a referral of `trid` must name a service ID (`SPDK_NVME_TRANSPORT_TCP` and `_RDMA`).
pub fn needs_trsvcid(trid: &Trid) -> bool {
    matches!(trid.kind(), Some(TransportKind::Tcp | TransportKind::Rdma))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::decode_method;
    use serde_json::json;

    fn add(v: serde_json::Value) -> Result<Referral, RpcError> {
        decode_method::<NvmfDiscoveryAddReferral>(Some(v))?.referral()
    }

    #[test]
    fn adding() {
        let r = add(
            json!({"address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1",
                                       "trsvcid": "4430"}, "bogus": 1}),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4430"},
                   "secure_channel": false, "subnqn": DISCOVERY_NQN})
        );
        let e = add(json!({"address": {"trtype": "TCP", "traddr": "127.0.0.1"}})).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (-32603, "Service ID is required.")
        );
        assert!(add(json!({"address": {"trtype": "FC", "traddr": "x"}})).is_ok());
        let e = add(
            json!({"address": {"trtype": "TCP", "traddr": "1", "trsvcid": "1"},
                           "subnqn": "n".repeat(224)}),
        )
        .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (-32602, "Invalid subsystem NQN")
        );
        let e = add(
            json!({"address": {"trtype": "TCP", "traddr": "1", "trsvcid": "1"}, "subnqn": "bad"}),
        )
        .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32603, "Internal error"));
        assert!(needs_trsvcid(&Trid::tcp("a", "")));
    }

    #[test]
    fn removing() {
        let p: NvmfDiscoveryRemoveReferral = decode_method(Some(json!({
            "address": {"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": "4430"}, "secure_channel": true})))
        .unwrap();
        let added = add(
            json!({"address": {"trtype": "TCP", "traddr": "127.0.0.1", "trsvcid": "4430"},
                               "secure_channel": true}),
        )
        .unwrap();
        assert!(p.referral().unwrap().same(&added));
        assert!(decode_method::<NvmfDiscoveryRemoveReferral>(Some(json!({
            "address": {"trtype": "tcp", "traddr": "1"}, "bogus": 1})))
        .is_err());
        assert_eq!(p.not_found_error().message, "Unable to remove a referral.");
    }
}
