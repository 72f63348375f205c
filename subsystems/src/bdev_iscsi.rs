//! Options of the iSCSI initiator bdev module (module/bdev/iscsi, builds `--with-iscsi-initiator`):
//! `bdev_iscsi_set_options`, saved in the `bdev` subsystem only once set.

use serde::{Deserialize, Serialize};

use crate::params::Params;

/// `bdev_iscsi_set_options` parameters and options; a call changes the members it gives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct BdevIscsiOptions {
    /// Timeout of iSCSI commands in seconds (0: none).
    pub timeout_sec: u64,
}

impl Params for BdevIscsiOptions {}

impl Default for BdevIscsiOptions {
    /// 30 s.
    fn default() -> Self {
        BdevIscsiOptions { timeout_sec: 30 }
    }
}
