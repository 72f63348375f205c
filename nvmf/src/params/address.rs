//! Transport addresses: the `listen_address` / `address` objects calls give (`struct rpc_listen_address`),
//! the transport ID SPDK keeps and writes back (`nvmf_transport_listen_dump_trid()`), and ANA states.

use std::fmt;

use jsonrpc::RpcError;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::errors;
use super::transport::TransportKind;
use subsystems::params::some;

/// `SPDK_NVMF_TRSTRING_MAX_LEN`: longest transport name.
pub const TRSTRING_MAX_LEN: usize = 32;
/// `SPDK_NVMF_TRADDR_MAX_LEN`: longest transport address.
pub const TRADDR_MAX_LEN: usize = 256;
/// `SPDK_NVMF_TRSVCID_MAX_LEN`: longest transport service ID.
pub const TRSVCID_MAX_LEN: usize = 32;

/// A `listen_address` (listeners) or `address` (referrals) parameter object. Decoded strictly: an unknown
/// member is refused even where the method itself is relaxed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct ListenAddress {
    /// Deprecated name of `trtype` (SPDK 24.09 removes it); `trtype` wins when both are given. Never written.
    #[serde(default, deserialize_with = "some", skip_serializing)]
    pub transport: Option<String>,
    /// Transport type, any case: `TCP`, `RDMA`, or any other name (refused later, when no transport has it).
    /// Optional for the decoder but refused with `"Invalid parameters"` when absent.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub trtype: Option<String>,
    /// Address family, any case: `IPv4` (the default), `IPv6`, `IB`, `FC`.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub adrfam: Option<String>,
    /// Transport address (an IP address for TCP).
    pub traddr: String,
    /// Transport service ID (a port for TCP); empty when not given.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub trsvcid: Option<String>,
}

impl ListenAddress {
    /// `rpc_listen_address_to_trid()`: the transport name upper-cased (at most [`TRSTRING_MAX_LEN`]), the
    /// family parsed (default IPv4), the lengths checked. Refusals are `-32602 "Invalid parameters"`, the
    /// detail logged.
    pub fn to_trid(&self) -> Result<Trid, RpcError> {
        let Some(trtype) = self.trtype.as_ref().or(self.transport.as_ref()) else {
            log::error!("Invalid transport string: (null)");
            return Err(errors::invalid_params());
        };
        if trtype.len() > TRSTRING_MAX_LEN {
            log::error!("Invalid transport string: {trtype}");
            return Err(errors::invalid_params());
        }
        let adrfam = match &self.adrfam {
            None => AdrFam::Ipv4,
            Some(s) => AdrFam::parse(s).ok_or_else(|| {
                log::error!("Invalid adrfam: {s}");
                errors::invalid_params()
            })?,
        };
        if self.traddr.len() > TRADDR_MAX_LEN {
            log::error!(
                "Transport address longer than {TRADDR_MAX_LEN} characters: {}",
                self.traddr
            );
            return Err(errors::invalid_params());
        }
        let trsvcid = self.trsvcid.clone().unwrap_or_default();
        if trsvcid.len() > TRSVCID_MAX_LEN {
            log::error!("Transport service id longer than {TRSVCID_MAX_LEN} characters: {trsvcid}");
            return Err(errors::invalid_params());
        }
        Ok(Trid {
            trtype: trtype.to_ascii_uppercase(),
            adrfam,
            traddr: self.traddr.clone(),
            trsvcid,
        })
    }
}

/// A transport ID as SPDK writes it in `listen_addresses`, `listen_address`, `address` and `peer_address`:
/// all four members, always.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct Trid {
    /// Transport name, upper-cased (`TCP`).
    pub trtype: String,
    /// Address family.
    pub adrfam: AdrFam,
    /// Transport address.
    pub traddr: String,
    /// Transport service ID (may be empty).
    pub trsvcid: String,
}

impl Trid {
    /// A TCP/IPv4 address.
    pub fn tcp(traddr: &str, trsvcid: &str) -> Trid {
        Trid {
            trtype: TransportKind::Tcp.name().into(),
            adrfam: AdrFam::Ipv4,
            traddr: traddr.into(),
            trsvcid: trsvcid.into(),
        }
    }

    /// `spdk_nvme_transport_id_compare() == 0` (without the subsystem NQN): transport, address and service ID
    /// compared ignoring ASCII case, the family exactly. Listeners and referrals are found this way.
    pub fn same(&self, other: &Trid) -> bool {
        self.trtype.eq_ignore_ascii_case(&other.trtype)
            && self.traddr.eq_ignore_ascii_case(&other.traddr)
            && self.adrfam == other.adrfam
            && self.trsvcid.eq_ignore_ascii_case(&other.trsvcid)
    }

    /// The transport it names, if one of ours.
    pub fn kind(&self) -> Option<TransportKind> {
        TransportKind::from_name(&self.trtype)
    }
}

/// An address family (`enum spdk_nvmf_adrfam`), read in any case, written as SPDK names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdrFam {
    /// `IPv4`.
    Ipv4,
    /// `IPv6`.
    Ipv6,
    /// `IB` (InfiniBand).
    Ib,
    /// `FC` (Fibre Channel).
    Fc,
}

impl AdrFam {
    /// Every family, in `spdk_nvmf_adrfam` order.
    pub const ALL: [AdrFam; 4] = [AdrFam::Ipv4, AdrFam::Ipv6, AdrFam::Ib, AdrFam::Fc];

    /// `spdk_nvme_transport_id_adrfam_str()`.
    pub fn name(self) -> &'static str {
        match self {
            AdrFam::Ipv4 => "IPv4",
            AdrFam::Ipv6 => "IPv6",
            AdrFam::Ib => "IB",
            AdrFam::Fc => "FC",
        }
    }

    /// `spdk_nvme_transport_id_parse_adrfam()`: any case.
    pub fn parse(s: &str) -> Option<AdrFam> {
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for AdrFam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for AdrFam {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for AdrFam {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        AdrFam::parse(&s)
            .ok_or_else(|| de::Error::unknown_variant(&s, &["IPv4", "IPv6", "IB", "FC"]))
    }
}

/// An ANA state (`enum spdk_nvme_ana_state`), as `nvmf_subsystem_get_listeners` writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AnaState {
    /// `optimized`, every listener's state at first.
    #[default]
    Optimized,
    /// `non_optimized`.
    NonOptimized,
    /// `inaccessible`.
    Inaccessible,
    /// `persistent_loss` (never set by SPDK v24.05).
    PersistentLoss,
    /// `change` (never set by SPDK v24.05).
    Change,
}

impl AnaState {
    /// `nvme_ana_state_str()`.
    pub fn name(self) -> &'static str {
        match self {
            AnaState::Optimized => "optimized",
            AnaState::NonOptimized => "non_optimized",
            AnaState::Inaccessible => "inaccessible",
            AnaState::PersistentLoss => "persistent_loss",
            AnaState::Change => "change",
        }
    }

    /// The value of the `ANA state` field of an ANA group descriptor (NVMe base spec).
    pub fn code(self) -> u8 {
        match self {
            AnaState::Optimized => 0x1,
            AnaState::NonOptimized => 0x2,
            AnaState::Inaccessible => 0x3,
            AnaState::PersistentLoss => 0x4,
            AnaState::Change => 0xf,
        }
    }

    /// `rpc_ana_state_parse()`: `optimized`, `non_optimized` or `inaccessible`, any case; anything else is
    /// `-32602 "Invalid parameters"`.
    pub fn parse_rpc(s: &str) -> Result<AnaState, RpcError> {
        [
            AnaState::Optimized,
            AnaState::NonOptimized,
            AnaState::Inaccessible,
        ]
        .into_iter()
        .find(|a| a.name().eq_ignore_ascii_case(s))
        .ok_or_else(|| {
            log::error!("Invalid ANA state {s}");
            errors::invalid_params()
        })
    }
}

impl Serialize for AnaState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn addr(v: serde_json::Value) -> ListenAddress {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn trids() {
        let t = addr(json!({"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": "4421"}))
            .to_trid()
            .unwrap();
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4421"})
        );
        assert!(t.same(&Trid::tcp("127.0.0.1", "4421")));
        assert!(!t.same(&Trid::tcp("127.0.0.1", "4420")));
        let old = addr(json!({"transport": "TCP", "traddr": "::1", "adrfam": "ipv6"}))
            .to_trid()
            .unwrap();
        assert_eq!(old.adrfam, AdrFam::Ipv6);
        assert_eq!(old.trsvcid, "");
        let e = addr(json!({"traddr": "1"})).to_trid().unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32602, "Invalid parameters"));
        assert!(
            addr(json!({"trtype": "TCP", "traddr": "1", "adrfam": "ipv5"}))
                .to_trid()
                .is_err()
        );
        assert!(
            addr(json!({"trtype": "TCP", "traddr": "1", "trsvcid": "1".repeat(33)}))
                .to_trid()
                .is_err()
        );
        assert!(addr(json!({"trtype": "X".repeat(33), "traddr": "1"}))
            .to_trid()
            .is_err());
        // Custom transport names are kept (and refused later, when no transport has them).
        assert_eq!(
            addr(json!({"trtype": "bogus", "traddr": "1"}))
                .to_trid()
                .unwrap()
                .trtype,
            "BOGUS"
        );
        assert!(serde_json::from_value::<ListenAddress>(json!({"traddr": "1", "x": 1})).is_err());
    }

    #[test]
    fn ana_states() {
        assert_eq!(
            AnaState::parse_rpc("NON_optimized").unwrap(),
            AnaState::NonOptimized
        );
        assert!(AnaState::parse_rpc("change").is_err());
        assert_eq!(
            serde_json::to_value(AnaState::Inaccessible).unwrap(),
            json!("inaccessible")
        );
    }
}
