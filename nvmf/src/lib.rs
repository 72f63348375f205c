//! NVMe-oF target (SPDK's lib/nvmf): bdevs exported as namespaces of NVM subsystems, over TCP.

pub mod params;
