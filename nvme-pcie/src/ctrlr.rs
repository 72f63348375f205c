//! A controller's register-level life on PCIe (SPDK's `nvme_pcie_ctrlr`): reset to disabled, admin queue
//! registers, enable and wait for ready within CAP.TO, fatal status and surprise removal, shutdown notification.
//! Everything after CSTS.RDY (Identify, queues, namespaces) is admin commands, the host library's business.

use std::sync::Arc;
use std::time::{Duration, Instant};

use errors::{Error, ErrorKind, Result};
use nvme_proto::fabrics::{cc, csts, reg, Cap};
use reactor::memmap::Translations;

use crate::bar::Bar;
use crate::qpair::PcieQpair;
use crate::vfio::Device;

/// Where bring-up is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Waiting for CSTS.RDY to clear after CC.EN was cleared.
    Disabling,
    /// Waiting for CSTS.RDY after CC.EN was set.
    Enabling,
    /// Ready.
    Ready,
}

/// A controller reached through its registers.
pub struct PcieCtrlr {
    bar: Arc<Bar>,
    /// The VFIO device (absent for a model in tests).
    dev: Option<Arc<Device>>,
    cap: Cap,
    stage: Stage,
    since: Instant,
}

impl std::fmt::Debug for PcieCtrlr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PcieCtrlr({:?}, {:?})", self.dev, self.stage)
    }
}

/// CSTS as read from a device that is no longer there (every bit set).
const GONE: u32 = u32::MAX;

/// CSTS of the controller behind `bar`, with a vanished device (registers all ones: surprise removal) and a
/// fatal status (CFS) as errors; for whoever holds the registers (the admin poller, a queue being closed).
pub fn status(bar: &Bar) -> Result<u32> {
    let s = bar.read32(reg::CSTS as usize);
    if s == GONE {
        return Err(Error::new(
            ErrorKind::Io(libc::ENODEV),
            "the controller is gone (registers read all ones)",
        ));
    }
    if s & csts::CFS != 0 {
        return Err(Error::new(
            ErrorKind::Io(libc::EIO),
            "controller fatal status (CSTS.CFS)",
        ));
    }
    Ok(s)
}

impl PcieCtrlr {
    /// Opens the controller at PCI address `bdf` (bound to vfio-pci) and starts taking it to disabled.
    pub fn open(bdf: &str) -> Result<PcieCtrlr> {
        let dev = Arc::new(Device::open(bdf)?);
        let (base, len) = dev.bar0();
        // SAFETY: BAR0 stays mapped while the Device lives, and the Bar holds the Device.
        let bar = unsafe { Bar::new(base, len, dev.clone()) };
        Self::with_bar(Arc::new(bar), Some(dev))
    }

    /// A controller behind registers `bar` (a device, or a model of one in tests).
    pub fn with_bar(bar: Arc<Bar>, dev: Option<Arc<Device>>) -> Result<PcieCtrlr> {
        let cap = bar.read64(reg::CAP as usize);
        if cap == u64::MAX {
            return Err(Error::new(
                ErrorKind::Io(libc::ENODEV),
                "controller registers read all ones: the device is gone",
            ));
        }
        let c = PcieCtrlr {
            bar,
            dev,
            cap: Cap::from_u64(cap),
            stage: Stage::Disabling,
            since: Instant::now(),
        };
        // Start from disabled whatever the last owner left (SPDK's nvme_ctrlr_process_init does the same).
        let v = c.bar.read32(reg::CC as usize);
        if v & cc::EN != 0 {
            c.bar.write32(reg::CC as usize, v & !cc::EN);
        }
        Ok(c)
    }

    /// The registers.
    pub fn bar(&self) -> &Arc<Bar> {
        &self.bar
    }

    /// CAP.
    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// VS: (major, minor, tertiary).
    pub fn version(&self) -> (u16, u8, u8) {
        let v = self.bar.read32(reg::VS as usize);
        ((v >> 16) as u16, (v >> 8) as u8, v as u8)
    }

    /// The IOVA translations for queue pairs of this controller (the VFIO container's map).
    pub fn translations(&self) -> Option<&Translations> {
        self.dev.as_ref().map(|d| d.translations())
    }

    /// The VFIO device.
    pub fn device(&self) -> Option<&Arc<Device>> {
        self.dev.as_ref()
    }

    /// How long the controller may take to become ready or disabled: CAP.TO (500 ms units), at least 500 ms.
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_millis(self.cap.to.max(1) as u64 * 500)
    }

    /// CSTS, with a vanished device and a fatal status as errors.
    pub fn status(&self) -> Result<u32> {
        status(&self.bar)
    }

    /// Moves bring-up on: once disabled, points the controller at `admin` (AQA/ASQ/ACQ) and enables it; `Ok(true)`
    /// once ready. Fails on a fatal status, a vanished device, or a controller that does not get there within
    /// CAP.TO.
    pub fn poll_enable(&mut self, admin: &PcieQpair) -> Result<bool> {
        let s = self.bar.read32(reg::CSTS as usize);
        if s == GONE {
            return Err(Error::new(
                ErrorKind::Io(libc::ENODEV),
                "the controller is gone (registers read all ones)",
            ));
        }
        match self.stage {
            Stage::Ready => return Ok(true),
            Stage::Disabling if s & csts::RDY == 0 => {
                let n = admin.depth() as u32 - 1;
                self.bar.write32(reg::AQA as usize, n | n << 16);
                self.bar.write64(reg::ASQ as usize, admin.sq_iova());
                self.bar.write64(reg::ACQ as usize, admin.cq_iova());
                // NVM command set, 4 KiB pages, round robin, 64-byte submission and 16-byte completion entries.
                let v = cc::EN | 6 << cc::IOSQES_SHIFT | 4 << cc::IOCQES_SHIFT;
                self.bar.write32(reg::CC as usize, v);
                self.stage = Stage::Enabling;
                self.since = Instant::now();
                return Ok(false);
            }
            Stage::Enabling if s & csts::CFS != 0 => {
                return Err(Error::new(
                    ErrorKind::Io(libc::EIO),
                    "controller fatal status (CSTS.CFS) while enabling",
                ))
            }
            Stage::Enabling if s & csts::RDY != 0 => {
                self.stage = Stage::Ready;
                return Ok(true);
            }
            _ => {}
        }
        if self.since.elapsed() > self.ready_timeout() {
            let what = if self.stage == Stage::Disabling {
                "CSTS.RDY did not clear after CC.EN was cleared"
            } else {
                "CSTS.RDY was not set after CC.EN was set"
            };
            return Err(Error::new(
                ErrorKind::Io(libc::ETIMEDOUT),
                format!("{what} within CAP.TO ({:?})", self.ready_timeout()),
            ));
        }
        Ok(false)
    }

    /// Disables the controller (CC.EN cleared) and waits, up to CAP.TO, until it says so: it no longer touches
    /// any queue memory.
    pub fn disable(&self) {
        let v = self.bar.read32(reg::CC as usize);
        if v == GONE {
            return;
        }
        self.bar.write32(reg::CC as usize, v & !cc::EN);
        let start = Instant::now();
        while start.elapsed() < self.ready_timeout() {
            let s = self.bar.read32(reg::CSTS as usize);
            if s == GONE || s & csts::RDY == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        log::warn!("nvme_pcie: CSTS.RDY did not clear within CAP.TO");
    }

    /// Tells the controller the host is going away (CC.SHN normal) and waits, up to `limit`, for it to say the
    /// shutdown is complete (CSTS.SHST); then disables it. Whether it completed.
    pub fn shutdown(&self, limit: Duration) -> bool {
        let v = self.bar.read32(reg::CC as usize);
        if v == GONE {
            return false;
        }
        self.bar.write32(
            reg::CC as usize,
            (v & !(cc::SHN_MASK << cc::SHN_SHIFT)) | 1 << cc::SHN_SHIFT,
        );
        let start = Instant::now();
        let done = loop {
            let s = self.bar.read32(reg::CSTS as usize);
            if s == GONE {
                break false;
            }
            if (s >> csts::SHST_SHIFT) & 3 == csts::SHST_COMPLETE {
                break true;
            }
            if start.elapsed() > limit {
                log::warn!("nvme_pcie: shutdown not complete after {limit:?}");
                break false;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let v = self.bar.read32(reg::CC as usize);
        if v != GONE {
            self.bar.write32(reg::CC as usize, v & !cc::EN);
        }
        done
    }
}
