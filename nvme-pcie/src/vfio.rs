//! VFIO plumbing: the container, IOMMU groups and device file descriptors, PCI config space, BAR mapping, the
//! release request notifier, and DMA mapping of every region in the core's memory map.
//!
//! One container serves the whole process (one IOMMU domain, as SPDK's), so a region is mapped once for every
//! device. A group stays open while a device of it is open here; the last device's close closes it too (a group
//! kept open across an unbind goes stale: the function, bound to vfio-pci again, is not found in it), and the
//! last group's close ends the container's DMA mappings, which the next group sets up again. Closing the device
//! file descriptor (detach, exit or crash) makes vfio-pci reset the function, so the next owner finds it quiet.
//!
//! DMA addresses (IOVAs) are handed out by this module rather than taken equal to virtual addresses: user space
//! addresses use 47 bits while IOMMUs may translate fewer (QEMU's intel-iommu gives 39 by default). Each region of
//! the memory map gets a page-aligned IOVA range of its own, recorded as a linear translation in the map's
//! [`Translations`], so the I/O path turns a buffer into an IOVA with one lookup and no lock.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use errors::{Error, ErrorKind, Result};
use reactor::memmap::{MemEvent, MemMap, Translations};
use vfio_bindings::bindings::vfio as v;

/// An ioctl request number of VFIO's: `_IO(VFIO_TYPE, VFIO_BASE + nr)`.
const fn req(nr: u32) -> libc::c_ulong {
    ((v::VFIO_TYPE as u32) << 8 | (v::VFIO_BASE + nr)) as libc::c_ulong
}

const GET_API_VERSION: libc::c_ulong = req(0);
const CHECK_EXTENSION: libc::c_ulong = req(1);
const SET_IOMMU: libc::c_ulong = req(2);
const GROUP_GET_STATUS: libc::c_ulong = req(3);
const GROUP_SET_CONTAINER: libc::c_ulong = req(4);
const GROUP_GET_DEVICE_FD: libc::c_ulong = req(6);
const DEVICE_GET_INFO: libc::c_ulong = req(7);
const DEVICE_GET_REGION_INFO: libc::c_ulong = req(8);
const DEVICE_SET_IRQS: libc::c_ulong = req(10);
const IOMMU_MAP_DMA: libc::c_ulong = req(13);
const IOMMU_UNMAP_DMA: libc::c_ulong = req(14);

/// IOMMU page size the mappings are rounded to.
const PAGE: u64 = 4096;
/// First IOVA handed out: above the 32-bit space, clear of the MSI window and of anything firmware reserves.
const IOVA_BASE: u64 = 1 << 32;

/// Runs an ioctl whose argument is a pointer (or an integer passed as one); the OS error when it fails.
///
/// # Safety
/// `arg` must be what `request` expects on `fd`: a pointer to a live, correctly sized structure (or a plain
/// integer for requests that take one).
unsafe fn ioctl(fd: RawFd, request: libc::c_ulong, arg: usize) -> io::Result<i32> {
    // SAFETY: forwarded contract.
    let r = unsafe { libc::ioctl(fd, request, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The next free IOVA, and per mapped region (by start address): the IOVA of its first page and the length
/// mapped.
type IovaSpace = (u64, HashMap<usize, (u64, u64)>);

/// DMA mapping state shared with the memory map's callback.
struct Dma {
    container: RawFd,
    mapped: Mutex<IovaSpace>,
}

impl Dma {
    fn notify(&self, t: &Translations, ev: MemEvent, addr: usize, len: usize) -> io::Result<()> {
        let first = addr as u64 & !(PAGE - 1);
        let end = (addr as u64 + len as u64).next_multiple_of(PAGE);
        let mut st = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        match ev {
            MemEvent::Register => {
                let iova = st.0;
                let m = v::vfio_iommu_type1_dma_map {
                    argsz: std::mem::size_of::<v::vfio_iommu_type1_dma_map>() as u32,
                    flags: v::VFIO_DMA_MAP_FLAG_READ | v::VFIO_DMA_MAP_FLAG_WRITE,
                    vaddr: first,
                    iova,
                    size: end - first,
                };
                // SAFETY: MAP_DMA reads the structure we pass, sized by argsz; the kernel pins the pages (the
                // registrant keeps them mapped until it unregisters, the memory map's contract).
                unsafe { ioctl(self.container, IOMMU_MAP_DMA, &m as *const _ as usize) }.map_err(
                    |e| {
                        io::Error::new(
                            e.kind(),
                            format!("VFIO DMA map of {addr:#x}+{len:#x} at IOVA {iova:#x}: {e}"),
                        )
                    },
                )?;
                st.0 = iova + (end - first);
                st.1.insert(addr, (iova, end - first));
                t.set_linear_translation(addr, len, iova + (addr as u64 - first))
                    .map_err(io::Error::other)?;
                log::debug!("vfio: {addr:#x}+{len:#x} mapped at IOVA {iova:#x}");
            }
            MemEvent::Unregister => {
                if let Some((iova, size)) = st.1.remove(&addr) {
                    self.unmap(iova, size);
                }
            }
        }
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) {
        let mut u = v::vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<v::vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size,
            ..Default::default()
        };
        // SAFETY: UNMAP_DMA reads and writes back (the unmapped size) the structure we pass, sized by argsz.
        if let Err(e) = unsafe { ioctl(self.container, IOMMU_UNMAP_DMA, &mut u as *mut _ as usize) }
        {
            log::warn!("vfio: DMA unmap of IOVA {iova:#x}+{size:#x}: {e}");
        }
    }
}

/// The process's container, its groups, and its subscription to the memory map.
struct Container {
    fd: OwnedFd,
    /// Open groups by number, with how many open devices use each.
    groups: HashMap<u32, (OwnedFd, usize)>,
    /// The memory map subscription: created when the first group gives the container an IOMMU.
    map: Option<Arc<MemMap>>,
}

static CONTAINER: Mutex<Option<Container>> = Mutex::new(None);

fn os_err(e: io::Error, what: String) -> Error {
    Error::os(e, what)
}

/// The IOMMU group of PCI function `bdf`, after checking it is bound to vfio-pci.
fn group_of(bdf: &str) -> Result<u32> {
    let dev = Path::new("/sys/bus/pci/devices").join(bdf);
    if !dev.exists() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("PCI device {bdf} does not exist"),
        ));
    }
    let driver = std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if driver.as_deref() != Some("vfio-pci") {
        return Err(Error::new(
            ErrorKind::Io(libc::EACCES),
            format!(
                "PCI device {bdf} is bound to {}, not vfio-pci (scripts/setup.sh binds it)",
                driver.as_deref().unwrap_or("no driver")
            ),
        ));
    }
    let g = std::fs::read_link(dev.join("iommu_group")).map_err(|e| {
        os_err(
            e,
            format!("PCI device {bdf} has no IOMMU group (is the IOMMU on?)"),
        )
    })?;
    g.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::new(ErrorKind::Io(libc::EINVAL), format!("IOMMU group of {bdf}")))
}

fn open_rw(path: &str) -> Result<OwnedFd> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| os_err(e, format!("open {path}")))
}

impl Container {
    fn open() -> Result<Container> {
        let fd = open_rw("/dev/vfio/vfio")?;
        // SAFETY: GET_API_VERSION and CHECK_EXTENSION take no pointer, only an integer argument.
        let version = unsafe { ioctl(fd.as_raw_fd(), GET_API_VERSION, 0) }
            .map_err(|e| os_err(e, "VFIO_GET_API_VERSION".into()))?;
        if version != v::VFIO_API_VERSION as i32 {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!(
                    "VFIO API version {version}, expected {}",
                    v::VFIO_API_VERSION
                ),
            ));
        }
        // SAFETY: as above.
        let type1 = unsafe {
            ioctl(
                fd.as_raw_fd(),
                CHECK_EXTENSION,
                v::VFIO_TYPE1v2_IOMMU as usize,
            )
        }
        .unwrap_or(0);
        if type1 != 1 {
            return Err(Error::new(
                ErrorKind::NotSupported,
                "VFIO has no type 1 v2 IOMMU",
            ));
        }
        Ok(Container {
            fd,
            groups: HashMap::new(),
            map: None,
        })
    }

    /// Opens group `n` and puts it in the container (once); the first gives the container its IOMMU and starts
    /// the DMA mapping of the memory map.
    fn add_group(&mut self, n: u32) -> Result<RawFd> {
        if let Some((g, users)) = self.groups.get_mut(&n) {
            *users += 1;
            return Ok(g.as_raw_fd());
        }
        let g = open_rw(&format!("/dev/vfio/{n}"))?;
        let mut st = v::vfio_group_status {
            argsz: std::mem::size_of::<v::vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: GET_STATUS writes the structure we pass, sized by argsz.
        unsafe { ioctl(g.as_raw_fd(), GROUP_GET_STATUS, &mut st as *mut _ as usize) }
            .map_err(|e| os_err(e, format!("VFIO group {n} status")))?;
        if st.flags & v::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(Error::new(
                ErrorKind::Io(libc::EBUSY),
                format!("VFIO group {n} is not viable: bind every device of the group to vfio-pci"),
            ));
        }
        let cfd: RawFd = self.fd.as_raw_fd();
        // SAFETY: SET_CONTAINER reads the container's file descriptor through the pointer we pass.
        unsafe {
            ioctl(
                g.as_raw_fd(),
                GROUP_SET_CONTAINER,
                &cfd as *const _ as usize,
            )
        }
        .map_err(|e| os_err(e, format!("VFIO group {n}: set container")))?;
        if self.map.is_none() {
            // SAFETY: SET_IOMMU takes the IOMMU type as an integer.
            unsafe {
                ioctl(
                    self.fd.as_raw_fd(),
                    SET_IOMMU,
                    v::VFIO_TYPE1v2_IOMMU as usize,
                )
            }
            .map_err(|e| os_err(e, "VFIO_SET_IOMMU".into()))?;
            let dma = Arc::new(Dma {
                container: self.fd.as_raw_fd(),
                mapped: Mutex::new((IOVA_BASE, HashMap::new())),
            });
            let map = MemMap::new(move |t, ev, a, l| dma.notify(t, ev, a, l)).map_err(|e| {
                Error::new(ErrorKind::Io(libc::EFAULT), format!("VFIO DMA map: {e}"))
            })?;
            self.map = Some(Arc::new(map));
        }
        let fd = g.as_raw_fd();
        self.groups.insert(n, (g, 1));
        Ok(fd)
    }
}

/// A PCI function opened through VFIO, with BAR0 mapped and bus mastering on.
pub struct Device {
    bdf: String,
    file: std::fs::File,
    config_offset: u64,
    bar0: NonNull<u8>,
    bar0_len: usize,
    /// Signalled by vfio-pci when the kernel wants the device back (unbind, hot removal): `None` when the
    /// kernel offers no request notification.
    release_request: Option<OwnedFd>,
    // Dropped in this order, after the device descriptor: the map (the last device's drop unmaps everything
    // while its group still gives the container an IOMMU), then the group.
    map: Arc<MemMap>,
    _group: GroupUse,
}

/// A device's use of its IOMMU group: released when the device goes.
struct GroupUse(u32);

impl Drop for GroupUse {
    fn drop(&mut self) {
        if let Some(c) = CONTAINER.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            c.release_group(self.0);
        }
    }
}

// SAFETY: the BAR mapping is device memory shared with the device anyway; every access to it goes through
// volatile reads and writes (the `Bar` type), and the descriptor is a plain file descriptor.
unsafe impl Send for Device {}
// SAFETY: as above; `&Device` gives only reads of plain fields and positioned reads/writes of the config space.
unsafe impl Sync for Device {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vfio::Device({})", self.bdf)
    }
}

impl Device {
    /// Opens PCI function `bdf` (`0000:00:04.0`), which must be bound to vfio-pci: maps BAR0 and enables memory
    /// space and bus mastering.
    pub fn open(bdf: &str) -> Result<Device> {
        let group = group_of(bdf)?;
        let (gfd, map) = {
            let mut c = CONTAINER.lock().unwrap_or_else(|e| e.into_inner());
            if c.is_none() {
                *c = Some(Container::open()?);
            }
            let c = c.as_mut().expect("container set above");
            let gfd = c.add_group(group)?;
            (gfd, c.map.clone().expect("map set with the first group"))
        };
        // From here on, an early return gives the group back.
        let group = GroupUse(group);
        let name = CString::new(bdf)
            .map_err(|_| Error::new(ErrorKind::Io(libc::EINVAL), format!("PCI address {bdf:?}")))?;
        // SAFETY: GET_DEVICE_FD reads the NUL-terminated name through the pointer we pass.
        let dfd = unsafe { ioctl(gfd, GROUP_GET_DEVICE_FD, name.as_ptr() as usize) }
            .map_err(|e| os_err(e, format!("VFIO device {bdf} (in use by another process?)")))?;
        // SAFETY: the ioctl returned a new file descriptor that nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(dfd) };
        let fd = file.as_raw_fd();
        let mut info = v::vfio_device_info {
            argsz: std::mem::size_of::<v::vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: GET_INFO writes the structure we pass, sized by argsz.
        unsafe { ioctl(fd, DEVICE_GET_INFO, &mut info as *mut _ as usize) }
            .map_err(|e| os_err(e, format!("VFIO device {bdf} info")))?;
        if info.flags & v::VFIO_DEVICE_FLAGS_PCI == 0
            || info.num_regions <= v::VFIO_PCI_CONFIG_REGION_INDEX
        {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!("VFIO device {bdf} is not a PCI device with BARs and config space"),
            ));
        }
        let config = region_info(fd, v::VFIO_PCI_CONFIG_REGION_INDEX)
            .map_err(|e| os_err(e, format!("{bdf}: config space region")))?;
        let bar = region_info(fd, v::VFIO_PCI_BAR0_REGION_INDEX)
            .map_err(|e| os_err(e, format!("{bdf}: BAR0 region")))?;
        if bar.flags & v::VFIO_REGION_INFO_FLAG_MMAP == 0 || bar.size < 0x2000 {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!("{bdf}: BAR0 ({} bytes) cannot be mapped", bar.size),
            ));
        }
        // SAFETY: maps the BAR region of our device descriptor at the offset VFIO gave; the mapping is ours
        // until Drop unmaps it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bar.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                bar.offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err(
                io::Error::last_os_error(),
                format!("{bdf}: mmap BAR0"),
            ));
        }
        let dev = Device {
            bdf: bdf.to_string(),
            file,
            config_offset: config.offset,
            bar0: NonNull::new(p.cast()).expect("mmap succeeded"),
            bar0_len: bar.size as usize,
            release_request: request_notifier(fd),
            map,
            _group: group,
        };
        // Memory space and bus master enable (PCI command register, bits 1 and 2).
        let cmd = dev.config_read16(4)?;
        dev.config_write16(4, cmd | 0x6)?;
        Ok(dev)
    }

    /// The PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// BAR0: its start and length (valid while the device is).
    pub fn bar0(&self) -> (NonNull<u8>, usize) {
        (self.bar0, self.bar0_len)
    }

    /// The IOVA translations of the memory map (for the I/O path's lookups).
    pub fn translations(&self) -> &Translations {
        self.map.translations()
    }

    /// Reads a 16-bit config space register.
    pub fn config_read16(&self, off: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.file
            .read_exact_at(&mut b, self.config_offset + off)
            .map_err(|e| os_err(e, format!("{}: config read at {off:#x}", self.bdf)))?;
        Ok(u16::from_le_bytes(b))
    }

    /// Writes a 16-bit config space register.
    pub fn config_write16(&self, off: u64, val: u16) -> Result<()> {
        self.file
            .write_all_at(&val.to_le_bytes(), self.config_offset + off)
            .map_err(|e| os_err(e, format!("{}: config write at {off:#x}", self.bdf)))
    }

    /// Whether the kernel asked for the device back (it is being unbound from vfio-pci or removed): the user must
    /// let go of it, or the unbind waits. Reading clears the notification; callers keep the answer.
    pub fn release_requested(&self) -> bool {
        let Some(fd) = &self.release_request else {
            return false;
        };
        let mut n = [0u8; 8];
        // SAFETY: reads 8 bytes into our buffer from a non-blocking eventfd we own.
        let r = unsafe { libc::read(fd.as_raw_fd(), n.as_mut_ptr().cast(), 8) };
        r == 8
    }
}

impl Container {
    /// A device of group `n` closed: the group closes with its last device, and the DMA mappings with the last
    /// group (unmapped while a group still gives the container its IOMMU).
    fn release_group(&mut self, n: u32) {
        let Some((_, users)) = self.groups.get_mut(&n) else {
            return;
        };
        *users -= 1;
        if *users > 0 {
            return;
        }
        if self.groups.len() == 1 {
            self.map = None;
        }
        self.groups.remove(&n);
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: unmaps the BAR mapping made in `open`; users of the BAR (queue pairs, the controller) hold the
        // device and are gone before it drops.
        unsafe { libc::munmap(self.bar0.as_ptr().cast(), self.bar0_len) };
    }
}

/// VFIO_DEVICE_SET_IRQS with one eventfd (the request interrupt's).
#[repr(C)]
struct IrqSetOne {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fd: i32,
}

/// An eventfd vfio-pci signals when the kernel wants the device back (VFIO_PCI_REQ_IRQ_INDEX), so that a
/// user driver can let go instead of blocking the unbind.
fn request_notifier(dev: RawFd) -> Option<OwnedFd> {
    // SAFETY: creates a new eventfd; the flags are valid.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if efd < 0 {
        return None;
    }
    // SAFETY: `efd` is a new descriptor nothing else owns.
    let efd = unsafe { OwnedFd::from_raw_fd(efd) };
    let set = IrqSetOne {
        argsz: std::mem::size_of::<IrqSetOne>() as u32,
        flags: v::VFIO_IRQ_SET_DATA_EVENTFD | v::VFIO_IRQ_SET_ACTION_TRIGGER,
        index: v::VFIO_PCI_REQ_IRQ_INDEX,
        start: 0,
        count: 1,
        fd: efd.as_raw_fd(),
    };
    // SAFETY: SET_IRQS reads the structure we pass (header plus one eventfd), sized by argsz.
    match unsafe { ioctl(dev, DEVICE_SET_IRQS, &set as *const _ as usize) } {
        Ok(_) => Some(efd),
        Err(e) => {
            log::debug!("vfio: no device request notification: {e}");
            None
        }
    }
}

fn region_info(fd: RawFd, index: u32) -> io::Result<v::vfio_region_info> {
    let mut r = v::vfio_region_info {
        argsz: std::mem::size_of::<v::vfio_region_info>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: GET_REGION_INFO writes the structure we pass, sized by argsz (capabilities past it are left out).
    unsafe { ioctl(fd, DEVICE_GET_REGION_INFO, &mut r as *mut _ as usize) }?;
    Ok(r)
}
