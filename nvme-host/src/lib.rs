//! The NVMe host library (SPDK's `lib/nvme`): queue pairs over NVMe/TCP ([`tcp`]), NVMe/RDMA ([`rdma`]) and PCIe
//! (the `nvme-pcie` driver), one type over all ([`qpair`]), controllers
//! brought up through their admin queue with keep alive, and I/O queues one per thread that uses the controller
//! ([`ctrlr`]), with DH-HMAC-CHAP in-band authentication on every queue pair ([`auth`]). Everything is polled by the reactor thread that owns it; nothing blocks.

pub mod auth;
pub mod ctrlr;
pub mod qpair;
pub mod rdma;
mod sock;
pub mod tcp;

pub use ctrlr::{
    ana_state_name, connect, AnaStates, Controller, CtrlrInfo, CtrlrOpts, IoQueue, NsInfo,
    PcieShared,
};
pub use nvme_pcie::pci_address;
pub use tcp::{Dir, Iov, SubmitError, TcpQpair};
