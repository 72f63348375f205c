//! NVMe-oF target (SPDK's lib/nvmf): bdevs exported as namespaces of NVM subsystems, over TCP.
//!
//! - [`tgt`]: the target's shared state (subsystems, namespaces, listeners, hosts, referrals, poll groups).
//! - [`ctrlr`]: controllers: Connect, properties, admin commands, keep alive, asynchronous events.
//! - [`pg`]: poll groups, one per core, each with its own bdev channels.
//! - [`io`]: NVM commands onto bdev I/O.
//! - [`qpair`]: what every queue pair does with a command, whatever the transport.
//! - [`transport`], [`tcp`]: transports behind one trait (and a registry, through which `nvmf-rdma` adds RDMA);
//!   NVMe/TCP.
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
pub mod qpair;
pub mod rpc;
pub mod tcp;
pub mod tgt;
pub mod transport;

pub use error::{Error, ErrorKind, Result};

/// The module name of bdev claims (SPDK's `ns_bdev_module`).
pub const CLAIM_MODULE: &str = "NVMe-oF Target";

/// The `nvmf` subsystem, for the application to register.
pub fn subsystem() -> std::sync::Arc<dyn subsystems::framework::Subsystem> {
    std::sync::Arc::new(Nvmf)
}

struct Nvmf;

impl subsystems::framework::Subsystem for Nvmf {
    fn name(&self) -> &'static str {
        "nvmf"
    }
    fn register_rpcs(&self, reg: &mut jsonrpc::Registry) {
        rpc::register(reg);
    }
    fn init(&self, done: subsystems::framework::InitDone) {
        tgt::tgt().ensure_discovery();
        done(Ok(()))
    }
    fn fini(&self, done: subsystems::framework::FiniDone) {
        // `done` must run on the app thread, where fini was called.
        let done = reactor::OnThread::new(done);
        mgmt::fini(move || done.with(|d| d()));
    }
    fn config_json(&self) -> Option<serde_json::Value> {
        Some(rpc::config_json())
    }
}
