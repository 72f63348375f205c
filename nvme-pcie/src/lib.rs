//! The userspace NVMe PCIe driver's lower half (SPDK's `nvme_pcie.c` with `env_dpdk`'s VFIO): a controller
//! function taken over through VFIO ([`vfio`]), its registers ([`bar`]), bring-up to ready and shutdown
//! ([`ctrlr`]), and polled queue pairs with PRPs ([`qpair`]). The host library (`nvme-host`) drives controllers
//! found here through the same admin commands and I/O queue interface as its fabrics transports, so `bdev_nvme`
//! attaches `-t PCIe` controllers like any other.
//!
//! Interrupts stay off: every queue is polled by the reactor thread that owns it.

pub mod bar;
pub mod ctrlr;
pub mod qpair;
pub mod vfio;

pub use bar::Bar;
pub use ctrlr::PcieCtrlr;
pub use qpair::{PcieQpair, QueueMemory};
