//! vhost-user-blk controllers (SPDK's `vhost_blk`): a QEMU guest's virtio-blk queues served from reactor
//! threads, guest memory handed to the bdev layer as iovecs (zero copy).
//!
//! - [`controller`]: create/delete controllers, the registry, coalescing settings.
//! - `backend`: the vhost-user protocol on one control thread per controller (the `vhost` crate parses it).
//! - `device`: the controller's queues, polled by one poller on the controller's lightweight thread.
//! - [`vring`]: split (`virtio-queue`) and packed rings; [`request`]: the virtio-blk request parser.
//! - [`rpc`]: SPDK's RPCs and the `vhost_blk` section of `save_config`.
//! - [`frontend`]: a vhost-user-blk front end (what QEMU and the guest driver do) for tests and benchmarks.
//!
//! See DESIGN.md for the threading model and how hostile guest input is handled.

mod backend;
pub mod config;
pub mod controller;
mod device;
mod error;
mod inflight;
mod io;
pub mod mem;
pub mod request;
pub mod rpc;
mod sys;
pub mod vring;

pub mod frontend;

pub use controller::{set_socket_dir, CreateOpts, Ctrlr};
pub use error::{Error, ErrorKind, Result};

/// The module name used for bdev claims.
pub const MODULE: &str = "vhost_blk";

/// The `vhost_blk` subsystem, for the application to register.
pub fn subsystem() -> std::sync::Arc<dyn subsystems::framework::Subsystem> {
    std::sync::Arc::new(VhostBlk)
}

struct VhostBlk;

impl subsystems::framework::Subsystem for VhostBlk {
    fn name(&self) -> &'static str {
        "vhost_blk"
    }
    fn register_rpcs(&self, reg: &mut jsonrpc::Registry) {
        rpc::register_rpcs(reg);
    }
    fn configure(&self, env: &subsystems::framework::AppEnv) {
        set_socket_dir(env.vhost_sock_dir.clone());
    }
    fn config_json(&self) -> Option<serde_json::Value> {
        Some(rpc::config_json())
    }
}
