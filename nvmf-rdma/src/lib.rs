//! The NVMe-oF RDMA transport (SPDK's `lib/nvmf/rdma.c`) for the `nvmf` target.
//!
//! - [`RdmaTransport`] (app thread): opens every RDMA device (a protection domain each, and a memory map that
//!   registers all I/O memory of the process in it), listens with RDMA CM ids on one event channel that an
//!   acceptor poller reads without blocking, checks each connect request's private data, and hands the new id
//!   to a poll group (round robin). Disconnect events are routed to the connection's poll group.
//! - [`RdmaGroup`] (a poll group's part): per device, a completion queue polled by the poll group's poller and
//!   a shared receive queue with its capsule buffers (or, with `no_srq`, receive queues per connection); the data
//!   buffers of its commands.
//! - A connection ([`conn`]) is one reliable connected queue pair: commands arrive as SEND capsules (SQE plus
//!   in-capsule data), keyed SGL data moves with RDMA READ (before the command runs) and RDMA WRITE (before the
//!   response), responses go back as SEND. Execution is [`nvmf::qpair::Session::exec`], shared with TCP.
//!
//! All unsafe code is in [`verbs`]. Call [`register`] before the target's RPCs run (the application does) so
//! `nvmf_create_transport` accepts `"trtype": "RDMA"`. Without an RDMA device or RDMA CM (the host kernel has no
//! RDMA), creating the transport fails as SPDK's does, and nothing else changes.

mod conn;
mod group;
mod transport;
/// The verbs layer, shared with the host side (the `rdma` crate).
pub use rdma as verbs;

pub use group::RdmaGroup;
pub use transport::RdmaTransport;

use std::sync::Arc;

/// Registers the RDMA transport with the target (`nvmf_create_transport` then accepts `RDMA`).
pub fn register() {
    nvmf::transport::register_transport(nvmf::params::TransportKind::Rdma, create);
}

fn create(
    params: nvmf::params::TransportOpts,
) -> nvmf::Result<Arc<dyn nvmf::transport::Transport>> {
    let t: Arc<dyn nvmf::transport::Transport> = RdmaTransport::create(params)?;
    Ok(t)
}
