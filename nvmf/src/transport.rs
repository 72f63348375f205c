//! Transports behind one trait (SPDK's `spdk_nvmf_transport_ops`): a transport listens on addresses, accepts
//! connections and hands each to a poll group, where it parses capsules into commands for the
//! transport-independent target ([`crate::ctrlr`], [`crate::io`]) and moves their data.

use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::params::TransportKind;
use crate::tgt::Trid;

/// The options every transport has (SPDK's `struct spdk_nvmf_transport_opts`), as the target uses them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportOpts {
    /// Largest I/O queue (entries).
    pub max_queue_depth: u16,
    /// I/O queue pairs per controller.
    pub max_io_qpairs_per_ctrlr: u16,
    /// In-capsule data size for I/O queues.
    pub in_capsule_data_size: u32,
    /// Largest transfer.
    pub max_io_size: u32,
    /// Unit of data buffers.
    pub io_unit_size: u32,
    /// Largest admin queue (entries).
    pub max_aq_depth: u16,
    /// Data buffers shared by the poll groups.
    pub num_shared_buffers: u32,
    /// Data buffers cached per poll group.
    pub buf_cache_size: u32,
    /// Send C2H data with the SUCCESS flag instead of a response capsule (TCP).
    pub c2h_success: bool,
    /// Seconds an abort may wait for its command.
    pub abort_timeout_sec: u32,
    /// SGL descriptors a command capsule may carry (Identify MSDBD): 1 for TCP, 16 for RDMA (SPDK's
    /// `cdata_init` of each transport).
    pub msdbd: u8,
}

impl From<&crate::params::TransportOpts> for TransportOpts {
    /// The engine's view of the options an RPC gave (SPDK's checks already made).
    fn from(o: &crate::params::TransportOpts) -> Self {
        let (c2h_success, msdbd) = match &o.specific {
            crate::params::transport::TransportSpecific::Tcp(t) => (t.c2h_success, 1),
            crate::params::transport::TransportSpecific::Rdma(_) => (false, 16),
        };
        TransportOpts {
            max_queue_depth: o.max_queue_depth,
            max_io_qpairs_per_ctrlr: o.max_io_qpairs_per_ctrlr,
            in_capsule_data_size: o.in_capsule_data_size,
            max_io_size: o.max_io_size,
            io_unit_size: o.io_unit_size,
            max_aq_depth: o.max_aq_depth.min(u16::MAX as u32) as u16,
            num_shared_buffers: o.num_shared_buffers,
            buf_cache_size: o.buf_cache_size,
            c2h_success,
            abort_timeout_sec: o.abort_timeout_sec,
            msdbd,
        }
    }
}

impl Default for TransportOpts {
    /// SPDK's TCP defaults.
    fn default() -> Self {
        TransportOpts {
            max_queue_depth: 128,
            max_io_qpairs_per_ctrlr: 127,
            in_capsule_data_size: 4096,
            max_io_size: 131072,
            io_unit_size: 131072,
            max_aq_depth: 128,
            num_shared_buffers: 511,
            buf_cache_size: 32,
            c2h_success: true,
            abort_timeout_sec: 1,
            msdbd: 1,
        }
    }
}

/// A transport (one per type in a target).
pub trait Transport: Send + Sync {
    /// SPDK's name of the type ("TCP", "RDMA").
    fn name(&self) -> &'static str;
    /// The options.
    fn opts(&self) -> &TransportOpts;
    /// The options as given and completed with SPDK's defaults: the `nvmf_get_transports` entry and the
    /// `nvmf_create_transport` params `save_config` writes.
    fn params(&self) -> &crate::params::TransportOpts;
    /// Starts listening at `trid` (already listening: success, as SPDK counts listeners); `secure`: connections
    /// there must use TLS (TCP's `secure_channel`; the first listen at an address decides, as SPDK's port).
    fn listen(&self, trid: &Trid, secure: bool) -> Result<()>;
    /// Stops listening at `trid`.
    fn stop_listen(&self, trid: &Trid);
    /// Sets the transport up on the current poll group's thread: adds its part with
    /// [`Pg::add_group`](crate::pg::Pg::add_group).
    fn poll_group_start(&self, pg: &std::rc::Rc<crate::pg::Pg>);
    /// Stops accepting and releases the listeners.
    fn shutdown(&self);
}

/// Creates a transport from the options an RPC gave (SPDK's checks made), on the app thread.
pub type Constructor = fn(crate::params::TransportOpts) -> Result<Arc<dyn Transport>>;

/// Transports built into this crate, then those registered by the application (SPDK's
/// `spdk_nvmf_transport_register`, which transport libraries call from constructors): a transport crate that
/// depends on this one (`nvmf-rdma`) plugs in without a dependency cycle.
static REGISTRY: Mutex<Vec<(TransportKind, Constructor)>> = Mutex::new(Vec::new());

fn tcp(o: crate::params::TransportOpts) -> Result<Arc<dyn Transport>> {
    Ok(crate::tcp::TcpTransport::create(o))
}

/// Registers the constructor of transport type `kind` (replacing any earlier one of that type).
pub fn register_transport(kind: TransportKind, ctor: Constructor) {
    let mut r = reactor::lock(&REGISTRY);
    r.retain(|(k, _)| *k != kind);
    r.push((kind, ctor));
}

/// The transport types `nvmf_create_transport` accepts: TCP, then those registered.
pub fn registered_kinds() -> Vec<TransportKind> {
    let mut v = vec![TransportKind::Tcp];
    v.extend(
        reactor::lock(&REGISTRY)
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| *k != TransportKind::Tcp),
    );
    v
}

/// The constructor of transport type `kind`, if this build has it.
pub fn constructor(kind: TransportKind) -> Option<Constructor> {
    let registered = reactor::lock(&REGISTRY)
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, c)| *c);
    match (registered, kind) {
        (Some(c), _) => Some(c),
        (None, TransportKind::Tcp) => Some(tcp),
        (None, _) => None,
    }
}
