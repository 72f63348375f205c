//! `nvmf_subsystem_add_ns`, `nvmf_subsystem_remove_ns`, `nvmf_ns_add_host`, `nvmf_ns_remove_host`, and the
//! namespaces of `nvmf_get_subsystems` (lib/nvmf/nvmf_rpc.c, `spdk_nvmf_subsystem_add_ns_ext()`).

use std::fmt;

use jsonrpc::RpcError;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use subsystems::params::{object, some};
use uuid::Uuid;

use super::nqn::parse_uuid;
use super::{errors, method};

/// `SPDK_NVME_GLOBAL_NS_TAG`: not a namespace ID.
pub const GLOBAL_NS_TAG: u32 = 0xffff_ffff;

/// Bytes written as upper-case hex and read from hex of either case, exactly `N * 2` digits
/// (`decode_hex_string_be()`, `json_write_hex_str()`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HexId<const N: usize>(pub [u8; N]);

/// A namespace globally unique identifier (16 bytes).
pub type Nguid = HexId<16>;
/// A namespace IEEE EUI-64 (8 bytes).
pub type Eui64 = HexId<8>;

impl<const N: usize> HexId<N> {
    /// Parses `N * 2` hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != N * 2 || !b.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut out = [0; N];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(HexId(out))
    }

    /// All zeros: SPDK's "not set".
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }
}

impl<const N: usize> fmt::Display for HexId<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02X}"))
    }
}

impl<const N: usize> fmt::Debug for HexId<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl<const N: usize> Serialize for HexId<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de, const N: usize> Deserialize<'de> for HexId<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HexId::parse(&s).ok_or_else(|| {
            de::Error::invalid_value(
                de::Unexpected::Str(&s),
                &format!("{} hex digits", N * 2).as_str(),
            )
        })
    }
}

/// A UUID as `spdk_json_decode_uuid()` reads it: only the hyphenated form.
fn strict_uuid<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Uuid>, D::Error> {
    let s = String::deserialize(d)?;
    parse_uuid(&s)
        .map(Some)
        .ok_or_else(|| de::Error::invalid_value(de::Unexpected::Str(&s), &"a UUID"))
}

/// The `namespace` object of `nvmf_subsystem_add_ns` (decoded strictly) and, once
/// [`resolve`](Self::resolve)d, the namespace `save_config` writes (`nsid`, `bdev_name`, `ptpl_file`,
/// `nguid`, `eui64`, `uuid`, `anagrpid` with ANA reporting, `no_auto_visible`; see
/// [`for_config`](Self::for_config)).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NamespaceParams {
    /// Namespace ID; 0 (the default) picks the lowest free one.
    #[serde(default)]
    pub nsid: u32,
    /// The bdev (must exist and not be claimed).
    pub bdev_name: String,
    /// File keeping persistent reservations.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub ptpl_file: Option<String>,
    /// NGUID (defaults to the bdev's UUID's bytes).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub nguid: Option<Nguid>,
    /// EUI-64 (none by default).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub eui64: Option<Eui64>,
    /// UUID (defaults to the bdev's).
    #[serde(
        default,
        deserialize_with = "strict_uuid",
        skip_serializing_if = "Option::is_none"
    )]
    pub uuid: Option<Uuid>,
    /// ANA group; 0 or absent means the NSID. Written only with ANA reporting.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub anagrpid: Option<u32>,
    /// Visible only to the hosts added with `nvmf_ns_add_host`.
    #[serde(default)]
    pub no_auto_visible: bool,
    /// SPDK 25.x (deprecated): hide the bdev's metadata. The 26.x `rpc.py` always sends it; not written.
    #[serde(default, deserialize_with = "some", skip_serializing)]
    pub hide_metadata: Option<bool>,
}

impl NamespaceParams {
    /// A namespace of `bdev_name` with SPDK's defaults.
    pub fn new(bdev_name: &str) -> NamespaceParams {
        NamespaceParams {
            nsid: 0,
            bdev_name: bdev_name.into(),
            ptpl_file: None,
            nguid: None,
            eui64: None,
            uuid: None,
            anagrpid: None,
            no_auto_visible: false,
            hide_metadata: None,
        }
    }

    /// The checks of `spdk_nvmf_subsystem_add_ns_ext()` that do not need the bdev, in SPDK's order: the NSID
    /// is not the global tag, 0 picks the lowest free ID up to `max_nsid`, the ID is free (`in_use`) and at
    /// most `max_nsid`; the ANA group (0: the NSID) is at most `max_nsid`. Then the UUID and NGUID default to
    /// `bdev_uuid` (an all-zero NGUID counts as absent). All refusals are `-32602 "Invalid parameters"`, the
    /// detail logged; the bdev's own (missing: `-ENODEV` in the log; claimed; separate metadata) answer the
    /// same. The result has `nsid` and `anagrpid` set.
    pub fn resolve(
        &self,
        max_nsid: u32,
        in_use: impl Fn(u32) -> bool,
        bdev_uuid: Uuid,
    ) -> Result<NamespaceParams, RpcError> {
        let fail = |detail: String| {
            log::error!("{detail}");
            log::error!("Unable to add namespace");
            errors::invalid_params()
        };
        let mut ns = self.clone();
        if ns.nsid == GLOBAL_NS_TAG {
            return Err(fail(format!("Invalid NSID {}", ns.nsid)));
        }
        if ns.nsid == 0 {
            // No free ID leaves max_nsid + 1, refused below.
            ns.nsid = (1..=max_nsid)
                .find(|id| !in_use(*id))
                .unwrap_or(max_nsid.saturating_add(1));
        }
        if in_use(ns.nsid) {
            return Err(fail(format!("Requested NSID {} already in use", ns.nsid)));
        }
        if ns.nsid > max_nsid {
            return Err(fail("NSID greater than maximum not allowed".into()));
        }
        let anagrpid = match ns.anagrpid {
            None | Some(0) => ns.nsid,
            Some(g) => g,
        };
        if anagrpid > max_nsid {
            return Err(fail(
                "ANAGRPID greater than maximum NSID not allowed".into(),
            ));
        }
        ns.anagrpid = Some(anagrpid);
        if ns.uuid.is_none_or(|u| u.is_nil()) {
            ns.uuid = Some(bdev_uuid).filter(|u| !u.is_nil());
        }
        if ns.nguid.is_none_or(|n| n.is_zero()) {
            ns.nguid = Some(HexId(*bdev_uuid.as_bytes())).filter(|n| !n.is_zero());
        }
        if ns.eui64.is_some_and(|e| e.is_zero()) {
            ns.eui64 = None;
        }
        Ok(ns)
    }

    /// The `namespace` object `save_config` writes for this resolved namespace: `anagrpid` only with ANA
    /// reporting.
    pub fn for_config(&self, ana_reporting: bool) -> NamespaceParams {
        NamespaceParams {
            anagrpid: self.anagrpid.filter(|_| ana_reporting),
            hide_metadata: None,
            ..self.clone()
        }
    }
}

/// `nvmf_subsystem_add_ns` parameters, decoded relaxed at the top level (the `namespace` object strictly).
/// The result is the NSID. An unknown NQN is `-32602 "Invalid parameters"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfSubsystemAddNs {
    /// Subsystem NQN.
    pub nqn: String,
    /// The namespace.
    #[serde(deserialize_with = "object")]
    pub namespace: NamespaceParams,
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
}

method!(NvmfSubsystemAddNs, "nvmf_subsystem_add_ns", relaxed);

/// `nvmf_subsystem_remove_ns` parameters. An unknown NQN or NSID is `-32602 "Invalid parameters"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfSubsystemRemoveNs {
    /// Subsystem NQN.
    pub nqn: String,
    /// Namespace ID.
    pub nsid: u32,
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
}

method!(NvmfSubsystemRemoveNs, "nvmf_subsystem_remove_ns");

/// `nvmf_ns_add_host` / `nvmf_ns_remove_host` parameters: make a namespace (created `no_auto_visible`)
/// visible to a host or not. An unknown NQN, NSID or host is `-32602 "Invalid parameters"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfNsVisibility {
    /// Subsystem NQN.
    pub nqn: String,
    /// Namespace ID.
    pub nsid: u32,
    /// Host NQN.
    pub host: String,
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
}

method!(NvmfNsVisibility, "nvmf_ns_add_host");

/// A namespace of `nvmf_get_subsystems`: `name` repeats `bdev_name` (kept by SPDK for compatibility), the
/// identifiers once set, `anagrpid` with ANA reporting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespaceInfo {
    /// Namespace ID.
    pub nsid: u32,
    /// The bdev.
    pub bdev_name: String,
    /// The bdev, again.
    pub name: String,
    /// NGUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nguid: Option<Nguid>,
    /// EUI-64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eui64: Option<Eui64>,
    /// UUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Uuid>,
    /// ANA group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anagrpid: Option<u32>,
}

impl NamespaceInfo {
    /// The entry of a [`resolve`](NamespaceParams::resolve)d namespace.
    pub fn new(ns: &NamespaceParams, ana_reporting: bool) -> NamespaceInfo {
        NamespaceInfo {
            nsid: ns.nsid,
            bdev_name: ns.bdev_name.clone(),
            name: ns.bdev_name.clone(),
            nguid: ns.nguid,
            eui64: ns.eui64,
            uuid: ns.uuid,
            anagrpid: ns.anagrpid.filter(|_| ana_reporting),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::decode_method;
    use serde_json::json;

    const BDEV: &str = "6d3b1bd5-3a4e-4d4b-9a2f-0c5f4a9e1a01";

    fn add(v: serde_json::Value) -> Result<NvmfSubsystemAddNs, RpcError> {
        decode_method(Some(v))
    }

    #[test]
    fn decoding() {
        let p = add(json!({"nqn": "n", "bogus": 1, "namespace": {"bdev_name": "Malloc0",
                           "nguid": "0123456789abcdef0123456789ABCDEF", "eui64": "ABCDEF0123456789",
                           "uuid": "0F2D6C4E-7B1A-4C3E-9D5F-1A2B3C4D5E6F", "hide_metadata": false}}))
        .unwrap();
        assert_eq!(
            p.namespace.nguid.unwrap().to_string(),
            "0123456789ABCDEF0123456789ABCDEF"
        );
        assert_eq!(
            add(json!({"nqn": "n", "namespace": {"bdev_name": "M", "bogus": 1}}))
                .unwrap_err()
                .message,
            "unknown field `bogus`, expected one of `nsid`, `bdev_name`, `ptpl_file`, `nguid`, `eui64`, \
             `uuid`, `anagrpid`, `no_auto_visible`, `hide_metadata` in `namespace`"
        );
        assert_eq!(
            add(json!({"nqn": "n", "namespace": {"bdev_name": "M", "nguid": "12"}}))
                .unwrap_err()
                .message,
            "invalid value: string \"12\", expected 32 hex digits for field `namespace.nguid`"
        );
        assert!(add(json!({"nqn": "n", "namespace": {"bdev_name": "M",
                           "uuid": "0f2d6c4e7b1a4c3e9d5f1a2b3c4d5e6f"}}))
        .is_err());
        assert_eq!(
            add(json!({"nqn": "n", "bdev_name": "M"}))
                .unwrap_err()
                .message,
            "missing field `namespace`"
        );
        assert!(decode_method::<NvmfSubsystemRemoveNs>(Some(json!({"nqn": "n"}))).is_err());
    }

    #[test]
    fn resolving() {
        let uuid = Uuid::parse_str(BDEV).unwrap();
        let ns = NamespaceParams::new("Malloc0");
        let r = ns.resolve(32, |id| id == 1, uuid).unwrap();
        assert_eq!((r.nsid, r.anagrpid), (2, Some(2)));
        assert_eq!(
            serde_json::to_value(r.for_config(false)).unwrap(),
            json!({"nsid": 2, "bdev_name": "Malloc0", "nguid": "6D3B1BD53A4E4D4B9A2F0C5F4A9E1A01",
                   "uuid": BDEV, "no_auto_visible": false})
        );
        assert_eq!(
            serde_json::to_value(NamespaceInfo::new(&r, true)).unwrap(),
            json!({"nsid": 2, "bdev_name": "Malloc0", "name": "Malloc0",
                   "nguid": "6D3B1BD53A4E4D4B9A2F0C5F4A9E1A01", "uuid": BDEV, "anagrpid": 2})
        );
        let full = |id| id <= 4;
        let e = ns.resolve(4, full, uuid).unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32602, "Invalid parameters"));
        let with = |nsid, anagrpid| NamespaceParams {
            nsid,
            anagrpid,
            ..NamespaceParams::new("M")
        };
        assert!(with(5, None).resolve(4, |_| false, uuid).is_err());
        assert!(with(1, Some(5)).resolve(4, |_| false, uuid).is_err());
        assert!(with(GLOBAL_NS_TAG, None)
            .resolve(u32::MAX, |_| false, uuid)
            .is_err());
        assert!(with(3, None).resolve(4, |id| id == 3, uuid).is_err());
        assert_eq!(
            with(3, Some(0))
                .resolve(4, |_| false, uuid)
                .unwrap()
                .anagrpid,
            Some(3)
        );
    }
}
