//! `ublk` subsystem (builds `--with-ublk`): `ublk_create_target` and `ublk_destroy_target`
//! (lib/ublk/ublk_rpc.c).

use jsonrpc::RpcError;
use serde::{Deserialize, Serialize};

use crate::cpuset::CpuSet;
use crate::params::{some, Params};

/// `ublk_create_target` parameters. One target at a time (`-EBUSY` while created, as `-32603` with
/// `spdk_strerror()`); SPDK saves only the core mask, see [`saved`](Self::saved).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct UblkCreateTarget {
    /// Cores of the ublk threads (default: the application's); non-empty and within the application's.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub cpumask: Option<String>,
    /// Copy through the kernel instead of user copy.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub disable_user_copy: Option<bool>,
}

impl Params for UblkCreateTarget {}

impl UblkCreateTarget {
    /// The mask must parse, name a core, and be within `app_cores` when known; else `-32603` with
    /// `spdk_strerror(EINVAL)`.
    pub fn check(&self, app_cores: Option<&CpuSet>) -> Result<(), RpcError> {
        if let Some(mask) = &self.cpumask {
            let ok = CpuSet::parse(mask).is_some_and(|set| {
                !set.is_empty() && app_cores.is_none_or(|app| set.is_subset(app))
            });
            if !ok {
                log::error!("invalid cpumask {mask}");
                return Err(RpcError::internal(jsonrpc::strerror(libc::EINVAL)));
            }
        }
        Ok(())
    }

    /// What SPDK saves: `{"cpumask": <hex>}` with the mask given, else the application's; `{}` when neither is
    /// known.
    pub fn saved(&self, app_cores: Option<&CpuSet>) -> UblkCreateTarget {
        let mask = self
            .cpumask
            .as_deref()
            .and_then(CpuSet::parse)
            .or_else(|| app_cores.cloned());
        UblkCreateTarget {
            cpumask: mask.map(|m| m.to_hex()),
            disable_user_copy: None,
        }
    }
}
