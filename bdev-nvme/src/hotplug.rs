//! PCIe hotplug (`bdev_nvme_set_hotplug`, SPDK's `bdev_nvme_hotplug` poller): while enabled, every period the PCI
//! bus is scanned for NVMe controllers (class 01:08:02) bound to vfio-pci that this process may take (`-u`, `-A`,
//! `-B`) and no controller here drives yet; each is attached as `HotInNvme<N>` (SPDK's names, one counter per
//! process). A hot-attached controller whose function left the bus (removed, or given back to the kernel) is
//! detached, so its bdevs go as SPDK's do on a hot removal.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use reactor::Poller;
use serde_json::json;

use crate::{attach, detach, pci_address, pci_allowed, pcie_controllers, AttachParams};

/// The PCI class code of an NVMe controller (mass storage, non-volatile memory, NVM Express).
const NVME_CLASS: &str = "0x010802";

thread_local! {
    static POLLER: RefCell<Option<Poller>> = const { RefCell::new(None) };
    /// Functions being attached by the poller (not yet in the controller list).
    static PENDING: RefCell<HashSet<String>> = RefCell::new(HashSet::new());
    /// Controller names the poller attached, with their function.
    static ATTACHED: RefCell<Vec<(String, String)>> = const { RefCell::new(Vec::new()) };
    static NEXT: Cell<u32> = const { Cell::new(0) };
    /// Functions whose attach failed, and when: tried again after [`RETRY`], not every period.
    static FAILED: RefCell<HashMap<String, Instant>> = RefCell::new(HashMap::new());
}

/// How long a function whose attach failed is left alone.
const RETRY: Duration = Duration::from_secs(10);

/// Starts (or restarts with a new period) or stops the hotplug poller; on the app thread.
pub fn set_hotplug(enable: bool, period_us: u64) {
    if reactor::thread::current().is_none() {
        // No reactor (option checks in unit tests): nothing to poll from.
        log::debug!("nvme hotplug: no reactor thread, not polling");
        return;
    }
    POLLER.with(|p| {
        *p.borrow_mut() = enable.then(|| {
            let period = Duration::from_micros(period_us.max(1000));
            Poller::register("bdev_nvme_hotplug", period.as_micros() as u64, || {
                scan();
                false
            })
        });
    });
    if enable {
        scan();
    }
}

/// NVMe functions on the bus bound to vfio-pci, in address order.
fn vfio_nvme_functions() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/bus/pci/devices") else {
        return Vec::new();
    };
    let mut v: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            let class = std::fs::read_to_string(p.join("class")).ok()?;
            if class.trim() != NVME_CLASS || driver(&p).as_deref() != Some("vfio-pci") {
                return None;
            }
            pci_address(&e.file_name().to_string_lossy())
        })
        .collect();
    v.sort();
    v
}

fn driver(dev: &Path) -> Option<String> {
    std::fs::read_link(dev.join("driver"))
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

fn scan() {
    let present = vfio_nvme_functions();
    let taken: HashSet<String> = pcie_controllers().into_iter().collect();
    for bdf in &present {
        let pending = PENDING.with(|p| p.borrow().contains(bdf));
        let failed_lately =
            FAILED.with(|f| f.borrow().get(bdf).is_some_and(|t| t.elapsed() < RETRY));
        if pending || failed_lately || taken.contains(bdf) || !pci_allowed(bdf) {
            continue;
        }
        let n = NEXT.with(|c| {
            let n = c.get();
            c.set(n + 1);
            n
        });
        let name = format!("HotInNvme{n}");
        let params: AttachParams = match serde_json::from_value(json!({
            "name": name, "trtype": "PCIe", "traddr": bdf,
        })) {
            Ok(p) => p,
            Err(e) => {
                log::error!("nvme hotplug: {bdf}: {e}");
                continue;
            }
        };
        log::info!("nvme hotplug: attaching {bdf} as {name}");
        PENDING.with(|p| p.borrow_mut().insert(bdf.clone()));
        let (bdf2, name2) = (bdf.clone(), name.clone());
        attach(params, move |r| {
            PENDING.with(|p| p.borrow_mut().remove(&bdf2));
            match r {
                Ok(bdevs) => {
                    FAILED.with(|f| f.borrow_mut().remove(&bdf2));
                    log::info!("nvme hotplug: {name2} ({bdf2}): bdevs {bdevs:?}");
                    ATTACHED.with(|a| a.borrow_mut().push((name2, bdf2)));
                }
                Err(e) => {
                    log::error!("nvme hotplug: {bdf2}: {e} (tried again in {RETRY:?})");
                    FAILED.with(|f| f.borrow_mut().insert(bdf2, Instant::now()));
                }
            }
        });
    }
    // Hot-attached controllers whose function is no longer ours on the bus.
    let gone: Vec<(String, String)> = ATTACHED.with(|a| {
        let mut a = a.borrow_mut();
        let (gone, kept) = a.drain(..).partition(|(_, bdf)| !present.contains(bdf));
        *a = kept;
        gone
    });
    for (name, bdf) in gone {
        if !taken.contains(&bdf) {
            // Already detached (removed on the kernel's request, or by RPC).
            continue;
        }
        log::warn!("nvme hotplug: {bdf} left the bus: detaching {name}");
        let n = name.clone();
        detach(&name, None, move |r| {
            if let Err(e) = r {
                log::error!("nvme hotplug: detach {n}: {e}");
            }
        });
    }
}
