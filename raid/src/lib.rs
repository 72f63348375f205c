//! RAID bdevs (SPDK's `bdev_raid` module): raid1 (mirror), raid0 (stripe) and concat over base bdevs.
//!
//! - [`create`] builds an array from base bdev names; bases that do not exist yet are waited for (the array is
//!   `configuring`) and claimed by examine when they appear.
//! - With a superblock ([`sb`]) every member carries the array's identity, so [`init`]'s examine callback
//!   re-assembles it after a restart in any arrival order, trusting only the newest superblock.
//! - raid1 keeps serving while one member works: a member that fails a write is removed (and recorded as
//!   failed) before the write is acknowledged; reads are balanced and retried on another mirror.
//! - [`add_base_bdev`] adds a member to a degraded raid1 and rebuilds it window by window while I/O continues.
//!
//! Control operations run on the app thread; the I/O path ([`channel`]) is per thread and lock free.

mod channel;
pub mod error;
mod process;
mod raid;
pub mod rpc;
pub mod sb;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use channel::MAX_BASE_BDEVS;
pub use error::{ErrorKind, RaidError, Result};
pub use raid::{
    add_base_bdev, create, delete, get_bdevs, info, options, remove_base_bdev, set_options,
    CreateOpts, RaidOptions, RaidState,
};

/// The bdev module name (claims, `bdev_get_bdevs`' `driver_specific.raid`).
pub const MODULE: &str = "raid";

/// A RAID level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Striping.
    Raid0,
    /// Mirroring.
    Raid1,
    /// Concatenation.
    Concat,
}

impl Level {
    /// Parses SPDK's names (case-insensitive): `raid0`/`0`, `raid1`/`1`, `concat`. `raid5f` is recognized and
    /// refused as unsupported.
    pub fn parse(s: &str) -> Result<Level> {
        match s.to_ascii_lowercase().as_str() {
            "raid0" | "0" => Ok(Level::Raid0),
            "raid1" | "1" => Ok(Level::Raid1),
            "concat" => Ok(Level::Concat),
            "raid5f" | "5f" => error::err(ErrorKind::Invalid, "Unsupported raid level 'raid5f'"),
            _ => error::err(ErrorKind::Invalid, format!("invalid raid level '{s}'")),
        }
    }

    /// SPDK's name.
    pub fn name(self) -> &'static str {
        match self {
            Level::Raid0 => "raid0",
            Level::Raid1 => "raid1",
            Level::Concat => "concat",
        }
    }

    /// The value stored in the superblock (SPDK's enum).
    pub fn sb_value(self) -> u32 {
        match self {
            Level::Raid0 => 0,
            Level::Raid1 => 1,
            Level::Concat => 99,
        }
    }

    /// The level of a superblock value.
    pub fn from_sb(v: u32) -> Option<Level> {
        match v {
            0 => Some(Level::Raid0),
            1 => Some(Level::Raid1),
            99 => Some(Level::Concat),
            _ => None,
        }
    }

    /// Fewest members an array of this level may have.
    pub fn min_base_bdevs(self) -> usize {
        match self {
            Level::Raid1 => 2,
            _ => 1,
        }
    }

    /// Fewest working members that keep an array of `n` online.
    pub fn min_operational(self, n: usize) -> usize {
        match self {
            Level::Raid1 => 1,
            _ => n,
        }
    }
}

static INIT: AtomicBool = AtomicBool::new(false);

/// Registers the raid examine callback (once per process; later calls do nothing).
pub fn init() {
    if INIT.swap(true, Ordering::SeqCst) {
        return;
    }
    bdev::register_examiner(MODULE, Arc::new(raid::examine_new_bdev));
}

/// The raid bdev module, for the application to register ([`bdev::register_module`]).
pub fn module() -> Arc<dyn bdev::BdevModule> {
    Arc::new(RaidModule)
}

struct RaidModule;

impl bdev::BdevModule for RaidModule {
    fn name(&self) -> &'static str {
        MODULE
    }
    fn register_rpcs(&self, reg: &mut jsonrpc::Registry) {
        rpc::register_rpcs(reg);
    }
    fn examines(&self) -> bool {
        true
    }
    fn config_json(&self) -> Vec<serde_json::Value> {
        vec![rpc::options_config_entry()]
    }
}
