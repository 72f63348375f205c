//! The `spdk_tgt` application: command line, logging, subsystem init order, JSON config load and save,
//! the RPC server on the app thread, signals and orderly shutdown.

pub mod cli;
pub mod compat;
pub mod config;
pub mod logging;
pub mod rpc;
pub mod signals;
mod target;

pub use target::{run, run_with, Hooks, Target, VERSION};

/// What `spdk_tgt` links, in SPDK's subsystem init order (SPDK's app Makefile library list): the bdev subsystem
/// with its modules, then the NVMe-oF target (TCP, and RDMA as a build `--with-rdma`) and the vhost-blk target.
pub fn spdk_tgt_subsystems() -> Vec<std::sync::Arc<dyn subsystems::framework::Subsystem>> {
    let mut v = bdev_subsystems();
    nvmf_rdma::register();
    v.push(nvmf::subsystem());
    v.push(vhost_blk::subsystem());
    v
}

/// What a bdev application (bdevperf) links: the bdev subsystem with every bdev module.
pub fn bdev_subsystems() -> Vec<std::sync::Arc<dyn subsystems::framework::Subsystem>> {
    let b = bdev::module::subsystem();
    bdev::register_module(raid::module());
    bdev::register_module(blobstore::lvs_bdev::module());
    vec![b]
}
