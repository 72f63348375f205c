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

/// A PCI address in SPDK's full form `dddd:bb:dd.f` (lower-case hex), from that form or `bb:dd.f` (domain 0).
pub fn pci_address(s: &str) -> Option<String> {
    let (dbd, func) = s.rsplit_once('.')?;
    let parts: Vec<&str> = dbd.split(':').collect();
    let (dom, bus, dev) = match parts[..] {
        [d, b, v] => (u32::from_str_radix(d, 16).ok()?, b, v),
        [b, v] => (0, b, v),
        _ => return None,
    };
    let bus = u8::from_str_radix(bus, 16).ok()?;
    let dev = u8::from_str_radix(dev, 16).ok().filter(|d| *d < 32)?;
    let func = u8::from_str_radix(func, 16).ok().filter(|f| *f < 8)?;
    Some(format!("{dom:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}
