//! NVMe-oF target (SPDK's lib/nvmf): bdevs exported as namespaces of NVM subsystems, over TCP.
//!
//! - [`tgt`]: the target's shared state (subsystems, namespaces, listeners, hosts, referrals, poll groups).
//! - [`ctrlr`]: controllers: Connect, properties, admin commands, keep alive, asynchronous events.
//! - [`pg`]: poll groups, one per core, each with its own bdev channels.
//! - [`io`]: NVM commands onto bdev I/O.
//! - [`transport`], [`tcp`]: transports behind one trait; NVMe/TCP.
//! - [`mgmt`]: what the RPCs do: create and change subsystems, namespaces, listeners, transports.
//! - [`params`]: SPDK's RPC parameters and results.
//!
//! See DESIGN.md for the threading model and how hostile hosts are handled.

pub mod ctrlr;
pub mod error;
pub mod io;
pub mod mgmt;
pub mod params;
pub mod pg;
pub mod tcp;
pub mod tgt;
pub mod transport;

pub use error::{Error, ErrorKind, Result};

/// The module name of bdev claims (SPDK's `ns_bdev_module`).
pub const CLAIM_MODULE: &str = "NVMe-oF Target";
