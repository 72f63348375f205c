//! The project's VM test lab: boots a Linux guest under QEMU (TCG, no KVM needed) with whatever devices a test
//! asks for, runs a shell script inside it and hands back the console output and the script's exit code.
//!
//! ```no_run
//! let Some(lab) = lab::Lab::get_or_skip("my_test") else { return };
//! let mut cfg = lab::GuestConfig::new("smoke", "uname -r; cat /proc/partitions");
//! cfg.qemu_args = vec!["-device".into(), "virtio-rng-pci".into()];
//! let out = lab.run(&cfg).unwrap();
//! out.assert_success();
//! ```
//!
//! The kernel is the host's Debian kernel (extracted to an uncompressed ELF so QEMU boots it through PVH, which is
//! much faster under TCG); the initramfs is busybox plus the modules and host binaries (with their shared
//! libraries) an [`ImageSpec`] names. Images are cached under [`Lab::root`] keyed by a hash of their inputs, so
//! only the first run of a given image pays for building it. The per-run script travels in a small second cpio
//! archive appended to the cached one (the kernel unpacks concatenated archives in order).
//!
//! Packages the lab needs (`qemu-system-x86`, `linux-image-amd64`, `busybox-static`, `kmod`, `xz-utils`) are
//! installed with apt when missing, and so are an image's own [`packages`](ImageSpec::packages) (e.g. `nvme-cli`)
//! before it is built. [`Lab::get`] fails with [`LabError::Unavailable`] only when QEMU truly cannot run here;
//! tests then skip with a message saying why ([`Lab::get_or_skip`], [`Lab::image_or_skip`]).
//!
//! For NVMe-oF tests the kernel's NVMe/TCP host runs in the guest ([`ImageSpec::nvme_tcp_host`], the script helpers
//! of `/lab/nvmf.sh`, the target's JSON config in [`nvmf`]) against a target process on the host ([`target`]).
//!
//! For the userspace NVMe (PCIe) driver, [`GuestConfig::vfio_nvme`] gives the guest QEMU's emulated NVMe controller
//! at a known PCI address behind an emulated VT-d IOMMU ([`GuestConfig::iommu`]); every image carries the
//! repository's `scripts/setup.sh` as `/lab/setup.sh`, which binds it to vfio-pci (`/dev/vfio/<group>`) as an
//! operator would.
//!
//! A test that acts on the host while its guest runs ([`Lab::spawn`]) meets the script at named points with
//! [`sync`] (`host_sync NAME` in the guest), and may freeze the whole guest meanwhile ([`RunningGuest::pause`]).

pub mod cpio;
mod image;
pub mod nvmf;
mod qemu;
pub mod spdk_rpc;
pub mod sync;
pub mod target;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use image::ImageSpec;
pub use qemu::{GuestOutput, RunningGuest};

/// Why the lab could not do something.
#[derive(Debug)]
pub enum LabError {
    /// QEMU cannot run on this machine (tools missing and not installable, no kernel): tests skip.
    Unavailable(String),
    /// Building the kernel or image failed.
    Build(String),
    /// Starting or talking to QEMU failed.
    Qemu(String),
    /// The guest did not reach a point in time.
    Timeout(String),
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabError::Unavailable(s) => write!(f, "QEMU guest lab unavailable: {s}"),
            LabError::Build(s) => write!(f, "lab image build failed: {s}"),
            LabError::Qemu(s) => write!(f, "qemu: {s}"),
            LabError::Timeout(s) => write!(f, "timed out: {s}"),
        }
    }
}

impl std::error::Error for LabError {}

/// What to boot and run.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    /// Name (log file name, messages).
    pub name: String,
    /// The image: modules and binaries baked into the cached initramfs.
    pub image: ImageSpec,
    /// Shell script run by the guest's `/bin/sh` as `/lab/run.sh` (`. /lab/lib.sh` gives `step`/`ok`/`fail`).
    pub script: String,
    /// Variables exported to the script.
    pub env: Vec<(String, String)>,
    /// Host files copied into this run only: (host path, guest path).
    pub files: Vec<(PathBuf, String)>,
    /// Guest RAM in MiB.
    pub mem_mb: u32,
    /// vCPUs.
    pub smp: u32,
    /// Back guest RAM by a shared memfd (vhost-user back ends need to map it).
    pub shared_memory: bool,
    /// Give the guest a user-mode NIC (10.0.2.15; the host is 10.0.2.2).
    pub net: bool,
    /// TCP ports of the guest reachable from the host: (host port on 127.0.0.1, guest port). Needs `net`.
    pub host_forwards: Vec<(u16, u16)>,
    /// Puts the guest's PCI devices behind an emulated Intel VT-d IOMMU, as on a machine that hands devices to
    /// vfio-pci: `-machine q35,kernel-irqchip=split`, `-device intel-iommu,intremap=on,caching-mode=on` ahead of
    /// every other device (QEMU wires up only the devices created after it), and `intel_iommu=on iommu=pt` on the
    /// kernel command line (`pt` leaves the kernel's own drivers untranslated; vfio still gets a translating
    /// domain for the devices it takes). Set by [`vfio_nvme`](Self::vfio_nvme).
    pub iommu: bool,
    /// Extra QEMU arguments (devices, chardevs, ...).
    pub qemu_args: Vec<String>,
    /// Extra kernel command line.
    pub append: String,
    /// Let a guest reboot restart it (QEMU without `-no-reboot`); the script runs again on every boot.
    pub allow_reboot: bool,
    /// Whole-run limit; QEMU is killed after it.
    pub timeout: Duration,
}

impl GuestConfig {
    /// A config with defaults: 512 MiB, 2 vCPUs, no NIC, default image, 300 s limit.
    pub fn new(name: &str, script: &str) -> Self {
        GuestConfig {
            name: name.to_string(),
            image: ImageSpec::default(),
            script: script.to_string(),
            env: vec![],
            files: vec![],
            mem_mb: 512,
            smp: 2,
            shared_memory: false,
            net: false,
            host_forwards: vec![],
            iommu: false,
            qemu_args: vec![],
            append: String::new(),
            allow_reboot: false,
            timeout: Duration::from_secs(300),
        }
    }

    /// Adds a vhost-user-blk disk on `socket` (needs [`shared_memory`](Self::shared_memory), which this sets).
    pub fn vhost_user_blk(&mut self, id: &str, socket: &Path, extra: &str) -> &mut Self {
        self.vhost_user_blk_chardev(id, socket, "", extra)
    }

    /// [`vhost_user_blk`](Self::vhost_user_blk) whose connection QEMU makes again every second when the back end
    /// goes away (`reconnect=1`, as operators run it so that a back end can be restarted under a live guest).
    pub fn vhost_user_blk_reconnecting(
        &mut self,
        id: &str,
        socket: &Path,
        extra: &str,
    ) -> &mut Self {
        self.vhost_user_blk_chardev(id, socket, ",reconnect=1", extra)
    }

    /// Adds QEMU's emulated NVMe controller (PCI `1b36:0010`) with serial number `serial` and one namespace backed
    /// by the raw file `backing`, at PCI slot `slot` of the root bus, behind the vIOMMU ([`iommu`](Self::iommu),
    /// which this sets), for a userspace driver to take through vfio-pci in the guest. Returns the controller's
    /// address in the guest, `0000:00:<slot>.0` (slot 4 gives `0000:00:04.0`). `extra` is appended to the
    /// `-device nvme` properties (e.g. `max_ioqpairs=4,mdts=5`).
    ///
    /// The image gets `vfio_pci` (not loaded at boot: `/lab/setup.sh config`, the repository's
    /// `scripts/setup.sh`, loads it and binds the controller, e.g. `HUGEMEM=0 PCI_ALLOWED=$BDF sh /lab/setup.sh`).
    /// The kernel's `nvme` driver is not in the image unless the test adds it.
    ///
    /// Several controllers need distinct slots and serials. Use slots 4 to 0x1e: slot 0 is q35's host bridge, 0x1f
    /// its LPC/SATA/SMBus functions, and devices without a fixed address (the NIC of [`net`](Self::net), then
    /// those of [`qemu_args`](Self::qemu_args) in order) take the lowest free slots from 1 as QEMU creates them,
    /// so a low slot can already be taken (QEMU then refuses to start: "slot N function 0 not available").
    /// The backing file is opened with the host's page cache (`cache=writeback`: tmpfs has no `O_DIRECT`), so the
    /// host sees the guest's writes in it once QEMU has exited. Deallocated blocks are punched out of it
    /// (`discard=unmap`), so they read back as zeroes as a real drive's do.
    pub fn vfio_nvme(&mut self, serial: &str, backing: &Path, slot: u8, extra: &str) -> String {
        assert!(
            (1..0x1f).contains(&slot),
            "vfio_nvme: PCI slot {slot:#x} is not usable on q35's root bus (1..=0x1e)"
        );
        self.iommu = true;
        if !self.image.extra_modules.iter().any(|m| m == "vfio_pci")
            && !self.image.modules.iter().any(|m| m == "vfio_pci")
        {
            self.image.extra_modules.push("vfio_pci".into());
        }
        // A soft dependency of vfio that module dependencies do not list.
        if !self
            .image
            .extra_modules
            .iter()
            .any(|m| m == "vfio_iommu_type1")
        {
            self.image.extra_modules.push("vfio_iommu_type1".into());
        }
        // QEMU's option syntax escapes a comma in a value by doubling it.
        let esc = |s: &str| s.replace(',', ",,");
        let drive = format!("vfio-nvme{slot:02x}");
        self.qemu_args.push("-drive".into());
        self.qemu_args.push(format!(
            "file={},if=none,id={drive},format=raw,cache=writeback,discard=unmap",
            esc(&backing.display().to_string())
        ));
        self.qemu_args.push("-device".into());
        let mut dev = format!("nvme,serial={},drive={drive},addr={slot:#04x}", esc(serial));
        if !extra.is_empty() {
            dev.push(',');
            dev.push_str(extra);
        }
        self.qemu_args.push(dev);
        format!("0000:00:{slot:02x}.0")
    }

    fn vhost_user_blk_chardev(
        &mut self,
        id: &str,
        socket: &Path,
        chardev: &str,
        extra: &str,
    ) -> &mut Self {
        self.shared_memory = true;
        self.qemu_args.push("-chardev".into());
        self.qemu_args
            .push(format!("socket,id={id},path={}{chardev}", socket.display()));
        self.qemu_args.push("-device".into());
        let mut dev = format!("vhost-user-blk-pci,chardev={id}");
        if !extra.is_empty() {
            dev.push(',');
            dev.push_str(extra);
        }
        self.qemu_args.push(dev);
        self
    }
}

/// The prepared lab: a kernel and a cache directory.
pub struct Lab {
    root: PathBuf,
    kernel: PathBuf,
    kver: String,
}

/// Packages the lab installs when missing.
const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "linux-image-amd64",
    "busybox-static",
    "kmod",
    "xz-utils",
];

impl Lab {
    /// The cache directory: `$SPDK_RS_LAB_DIR`, or `/var/tmp/spdk-rs-lab`.
    pub fn default_root() -> PathBuf {
        std::env::var_os("SPDK_RS_LAB_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/spdk-rs-lab"))
    }

    /// Installs what is missing, extracts the kernel, and checks QEMU starts.
    pub fn get() -> Result<Lab, LabError> {
        let root = Self::default_root();
        std::fs::create_dir_all(root.join("logs"))
            .map_err(|e| LabError::Unavailable(format!("cannot create {}: {e}", root.display())))?;
        let _lock = image::lock(&root)?;
        ensure_packages(APT_PACKAGES)?;
        let qemu_ok = Command::new(qemu::QEMU)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !qemu_ok {
            return Err(LabError::Unavailable(format!(
                "{} does not run",
                qemu::QEMU
            )));
        }
        let (kver, kernel) = image::kernel(&root)?;
        Ok(Lab { root, kernel, kver })
    }

    /// Like [`get`](Self::get), but prints why and returns `None` when QEMU cannot run here, so a test can skip
    /// with a visible message. Other failures panic (they are bugs, not a missing QEMU).
    pub fn get_or_skip(test: &str) -> Option<Lab> {
        match Self::get() {
            Ok(l) => Some(l),
            Err(LabError::Unavailable(why)) => {
                eprintln!("SKIPPED {test}: QEMU guest lab unavailable on this machine: {why}");
                None
            }
            Err(e) => panic!("{test}: {e}"),
        }
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The guest kernel's version (the host's newest installed kernel).
    pub fn kernel_version(&self) -> &str {
        &self.kver
    }

    /// Builds (or finds in the cache) the initramfs for `spec`, installing its [`packages`](ImageSpec::packages)
    /// first when missing. Fails with [`LabError::Unavailable`] when they cannot be installed, so a test that
    /// calls this before starting anything else can skip cleanly.
    pub fn image(&self, spec: &ImageSpec) -> Result<PathBuf, LabError> {
        let _lock = image::lock(&self.root)?;
        let pkgs: Vec<&str> = spec.packages.iter().map(String::as_str).collect();
        ensure_packages(&pkgs)?;
        image::build(&self.root, &self.kver, spec)
    }

    /// Like [`image`](Self::image), but prints `SKIPPED <test>: ...` and returns `None` when the image's
    /// packages cannot be installed. Other failures panic.
    pub fn image_or_skip(&self, test: &str, spec: &ImageSpec) -> Option<PathBuf> {
        match self.image(spec) {
            Ok(p) => Some(p),
            Err(LabError::Unavailable(why)) => {
                eprintln!("SKIPPED {test}: {why}");
                None
            }
            Err(e) => panic!("{test}: {e}"),
        }
    }

    /// An image with Soft-RoCE (`rdma_rxe` and the RDMA CM modules, iproute2's `rdma`, libibverbs' rxe provider
    /// and its driver file), for guests that use RDMA from user space and the kernel (`rdma link add rxe0 type
    /// rxe netdev eth0`; it needs a NIC). `None`, after printing `SKIPPED <test>: ...`, when the guest kernel has
    /// no Soft-RoCE or the user space cannot be installed.
    pub fn soft_roce_or_skip(&self, test: &str) -> Option<ImageSpec> {
        let kmod = format!(
            "/lib/modules/{}/kernel/drivers/infiniband/sw/rxe",
            self.kernel_version()
        );
        if !Path::new(&kmod).exists() {
            eprintln!("SKIPPED {test}: the guest kernel has no Soft-RoCE (rdma_rxe) module");
            return None;
        }
        let probe = ImageSpec::default().with_packages(&["iproute2", "ibverbs-providers"]);
        self.image_or_skip(test, &probe)?;
        let Some(provider) = rxe_provider() else {
            eprintln!("SKIPPED {test}: no rxe provider for libibverbs (ibverbs-providers)");
            return None;
        };
        // crc32_generic: `rdma link add` fails with ENOENT without it (not a listed dependency).
        let mut spec = ImageSpec::default()
            .with_modules(&["crc32_generic", "rdma_rxe", "ib_uverbs", "rdma_ucm"])
            .with_binaries(&["/usr/bin/rdma"])
            .with_packages(&["iproute2", "ibverbs-providers"]);
        spec.dlopen.push(provider);
        spec.files.push((
            "/etc/libibverbs.d/rxe.driver".into(),
            "/etc/libibverbs.d/rxe.driver".into(),
        ));
        Some(spec)
    }

    /// Boots a guest and returns once it powered off (or the time limit killed it).
    pub fn run(&self, cfg: &GuestConfig) -> Result<GuestOutput, LabError> {
        self.spawn(cfg)?.wait()
    }

    /// Boots a guest and returns while it runs, so the caller can act on the host meanwhile.
    pub fn spawn(&self, cfg: &GuestConfig) -> Result<RunningGuest, LabError> {
        let base = self.image(&cfg.image)?;
        qemu::spawn(&self.root, &self.kernel, &base, cfg)
    }
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs those of `pkgs` that are not installed (`apt-get update` first, once per call that needs it).
fn ensure_packages(pkgs: &[&str]) -> Result<(), LabError> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("lab: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let _ = apt(&["update", "-qq"]);
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    match apt(&args) {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(LabError::Unavailable(format!(
            "apt-get install {} failed: {}",
            missing.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Err(e) => Err(LabError::Unavailable(format!("apt-get: {e}"))),
    }
}

/// A copy of `binary` without its debug information in `dir` (guest images stay small and their cache keys
/// change only when the binary does), made once per build of the binary (named by its size and mtime).
pub fn stripped(binary: &Path, dir: &Path) -> PathBuf {
    let m = std::fs::metadata(binary).unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    let name = binary
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let out = dir.join(format!("{name}-{:x}-{mtime:x}", m.len()));
    if !out.exists() {
        // Tests running side by side may strip the same binary at once: each writes its own file and renames
        // it into place (atomic), so nobody ever sees a half-written copy.
        let tmp = out.with_extension(format!(
            "tmp-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let st = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&tmp)
            .arg(binary)
            .status();
        if !st.is_ok_and(|s| s.success()) {
            std::fs::copy(binary, &tmp).expect("copy the binary");
        }
        std::fs::rename(&tmp, &out).expect("rename the stripped copy into place");
    }
    out
}

/// The Soft-RoCE provider libibverbs opens at run time (`librxe-rdmav*.so`, package ibverbs-providers).
fn rxe_provider() -> Option<PathBuf> {
    let dir = Path::new("/usr/lib/x86_64-linux-gnu/libibverbs");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("librxe-") && n.ends_with(".so"))
        })
}
