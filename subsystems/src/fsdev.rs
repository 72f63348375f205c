//! `fsdev` subsystem (SPDK 24.09+): `fsdev_set_opts` (lib/fsdev/fsdev_rpc.c).

use serde::{Deserialize, Serialize};

use crate::params::Params;

/// `fsdev_set_opts` parameters and options (`struct spdk_fsdev_opts`); both members are required. Saved only
/// once set (24.09+ always writes it, with [`FsdevOptions::default`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct FsdevOptions {
    /// Size of the fsdev I/O pool.
    pub fsdev_io_pool_size: u32,
    /// Per-thread cache of fsdev I/Os.
    pub fsdev_io_cache_size: u32,
}

impl Params for FsdevOptions {}

impl Default for FsdevOptions {
    /// SPDK 24.09's: 65535 and 256.
    fn default() -> Self {
        FsdevOptions {
            fsdev_io_pool_size: 65535,
            fsdev_io_cache_size: 256,
        }
    }
}
