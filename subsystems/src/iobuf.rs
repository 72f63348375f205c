//! `iobuf` subsystem: `iobuf_set_options` (lib/thread/iobuf.c, `spdk_iobuf_set_opts()`).

use jsonrpc::RpcError;
use serde::{Deserialize, Serialize};

use crate::params::{einval, some, Params};

/// `iobuf_set_options` parameters and the iobuf pools' options (`struct spdk_iobuf_opts`), in SPDK's write
/// order. A call changes the members it gives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct IobufOptions {
    /// Buffers in the small pool (at least 64).
    pub small_pool_count: u64,
    /// Buffers in the large pool (at least 8).
    pub large_pool_count: u64,
    /// Size of a small buffer (at least 4096).
    pub small_bufsize: u32,
    /// Size of a large buffer (at least 8192).
    pub large_bufsize: u32,
    /// SPDK 24.09+: per-NUMA-node pools. Written only once set.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub enable_numa: Option<bool>,
}

impl Params for IobufOptions {}

impl Default for IobufOptions {
    /// 8192 small and 1024 large buffers of 8 KiB and 132 KiB.
    fn default() -> Self {
        IobufOptions {
            small_pool_count: 8192,
            large_pool_count: 1024,
            small_bufsize: 8192,
            large_bufsize: 135168,
            enable_numa: None,
        }
    }
}

impl IobufOptions {
    /// `spdk_iobuf_set_opts()`'s minimums; `-EINVAL` otherwise.
    pub fn check(&self) -> Result<(), RpcError> {
        let mins = [
            ("small_pool_count", self.small_pool_count, 64),
            ("large_pool_count", self.large_pool_count, 8),
            ("small_bufsize", u64::from(self.small_bufsize), 4096),
            ("large_bufsize", u64::from(self.large_bufsize), 8192),
        ];
        for (name, v, min) in mins {
            if v < min {
                return Err(einval(&format!("{name} must be at least {min}")));
            }
        }
        Ok(())
    }
}
