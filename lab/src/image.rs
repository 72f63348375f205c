//! Kernel extraction and the cached busybox initramfs.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::LabError;

/// Bumped whenever the image layout changes, so cached images are rebuilt.
const IMAGE_VERSION: &str = "lab-image-5";

const INIT: &str = include_str!("../guest/init");
const LIB_SH: &str = include_str!("../guest/lib.sh");
const NVMF_SH: &str = include_str!("../guest/nvmf.sh");
/// The repository's operator script (hugepages, vfio-pci binding), shipped as `/lab/setup.sh` so guest tests
/// exercise the script operators run rather than a copy of it.
const SETUP_SH: &str = include_str!("../../scripts/setup.sh");

/// What goes into the guest image (cached by a hash of all of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    /// Kernel modules (with their dependencies) copied in and loaded at boot, in this order.
    pub modules: Vec<String>,
    /// Modules copied in (with dependencies) but not loaded at boot.
    pub extra_modules: Vec<String>,
    /// Host executables copied to the same path, with the shared libraries `ldd` lists.
    pub binaries: Vec<PathBuf>,
    /// Shared objects a binary opens at run time (not listed by `ldd`), copied with their libraries.
    pub dlopen: Vec<PathBuf>,
    /// Host files copied verbatim: (host path, guest path).
    pub files: Vec<(PathBuf, String)>,
    /// Debian packages the binaries come from, installed with apt when missing before the image is built
    /// ([`Lab::image`](crate::Lab::image) reports [`LabError::Unavailable`] when that fails).
    pub packages: Vec<String>,
}

impl Default for ImageSpec {
    /// virtio PCI + blk + net modules, coreutils `dd` (O_DIRECT), `blkdiscard`.
    fn default() -> Self {
        ImageSpec {
            modules: vec![
                "virtio_pci".into(),
                "virtio_blk".into(),
                "virtio_net".into(),
            ],
            extra_modules: vec![],
            binaries: vec!["/usr/bin/dd".into(), "/usr/sbin/blkdiscard".into()],
            dlopen: vec![],
            files: vec![],
            packages: vec![],
        }
    }
}

impl ImageSpec {
    /// Adds host binaries.
    pub fn with_binaries(mut self, bins: &[&str]) -> Self {
        self.binaries.extend(bins.iter().map(PathBuf::from));
        self
    }

    /// Adds modules loaded at boot.
    pub fn with_modules(mut self, mods: &[&str]) -> Self {
        self.modules.extend(mods.iter().map(|s| s.to_string()));
        self
    }

    /// Adds modules copied in (with their dependencies) but not loaded at boot; a script loads them.
    pub fn with_extra_modules(mut self, mods: &[&str]) -> Self {
        self.extra_modules
            .extend(mods.iter().map(|s| s.to_string()));
        self
    }

    /// Adds Debian packages installed (when missing) before the image is built.
    pub fn with_packages(mut self, pkgs: &[&str]) -> Self {
        self.packages.extend(pkgs.iter().map(|s| s.to_string()));
        self
    }

    /// The default image plus the kernel's NVMe/TCP host (`nvme_tcp`, which pulls in `nvme_fabrics` and
    /// `nvme_core`, loaded at boot; `crc32c_generic` for header and data digests) and nvme-cli's `nvme` (package
    /// `nvme-cli`). Scripts drive it with the helpers of `/lab/nvmf.sh` (see [`crate::nvmf`]).
    pub fn nvme_tcp_host() -> Self {
        ImageSpec::default()
            .with_modules(&["nvme_tcp", "crc32c_generic"])
            .with_binaries(&["/usr/sbin/nvme"])
            .with_packages(&["nvme-cli"])
    }
}

/// A held `flock` on the lab directory (serializes builds across test processes).
pub(crate) struct DirLock(File);

impl Drop for DirLock {
    fn drop(&mut self) {
        // SAFETY: flock on a file descriptor we own; unlocking cannot affect memory safety.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

pub(crate) fn lock(root: &Path) -> Result<DirLock, LabError> {
    let f = File::create(root.join(".lock"))
        .map_err(|e| LabError::Unavailable(format!("{}: {e}", root.display())))?;
    // SAFETY: flock on a file descriptor we own; blocks until the lock is ours.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(LabError::Build(format!(
            "flock: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(DirLock(f))
}

/// FNV-1a: a stable hash for cache keys (std's hasher may change between Rust releases).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf29ce484222325)
    }
    fn add(&mut self, b: &[u8]) {
        for x in b {
            self.0 ^= *x as u64;
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x100000001b3);
    }
    fn file(&mut self, p: &Path) {
        self.add(p.to_string_lossy().as_bytes());
        if let Ok(m) = std::fs::metadata(p) {
            self.add(&m.len().to_le_bytes());
            self.add(&m.mtime().to_le_bytes());
        }
    }
}

/// The newest installed kernel: (version, path of the image QEMU boots). Extracts the uncompressed ELF `vmlinux`
/// once (PVH boot, much faster under TCG); falls back to the compressed image if it cannot.
pub(crate) fn kernel(root: &Path) -> Result<(String, PathBuf), LabError> {
    let mut kvers: Vec<String> = std::fs::read_dir("/lib/modules")
        .map_err(|e| LabError::Unavailable(format!("no kernel modules (/lib/modules): {e}")))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|v| Path::new(&format!("/boot/vmlinuz-{v}")).exists())
        .collect();
    kvers.sort_by(|a, b| version_cmp(a, b));
    let kver = kvers
        .pop()
        .ok_or_else(|| LabError::Unavailable("no /boot/vmlinuz-* with modules".into()))?;
    let vmlinuz = PathBuf::from(format!("/boot/vmlinuz-{kver}"));
    let out = root.join(format!("vmlinux-{kver}"));
    if out.exists() {
        return Ok((kver, out));
    }
    match extract_vmlinux(&vmlinuz, &out) {
        Ok(()) => Ok((kver, out)),
        Err(e) => {
            log::warn!(
                "lab: cannot extract vmlinux from {} ({e}); booting the bzImage",
                vmlinuz.display()
            );
            Ok((kver, vmlinuz))
        }
    }
}

fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().unwrap_or(0))
            .collect()
    };
    key(a).cmp(&key(b))
}

fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<(), String> {
    let data = std::fs::read(vmlinuz).map_err(|e| e.to_string())?;
    let magic = b"\xfd7zXZ\x00";
    let off = data
        .windows(magic.len())
        .position(|w| w == magic)
        .ok_or("no xz stream in the kernel image")?;
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("xz: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("xz stdin")?;
    let payload = data[off..].to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&payload);
    });
    let mut elf = Vec::new();
    child
        .stdout
        .take()
        .ok_or("xz stdout")?
        .read_to_end(&mut elf)
        .map_err(|e| e.to_string())?;
    let _ = child.wait();
    let _ = writer.join();
    if !elf.starts_with(b"\x7fELF") {
        return Err("decompressed kernel is not an ELF".into());
    }
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &elf).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, out).map_err(|e| e.to_string())
}

fn run(cmd: &mut Command) -> Result<String, LabError> {
    let o = cmd
        .output()
        .map_err(|e| LabError::Build(format!("{cmd:?}: {e}")))?;
    if !o.status.success() {
        return Err(LabError::Build(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Copies `src` to the same path under `r` (usr-merged: /lib, /bin, /sbin, /lib64 go under /usr), following
/// symlinks.
fn copy_in(r: &Path, src: &Path) -> Result<(), LabError> {
    let s = src.to_string_lossy();
    let dst = if ["/lib/", "/lib64/", "/bin/", "/sbin/"]
        .iter()
        .any(|p| s.starts_with(p))
    {
        format!("/usr{s}")
    } else {
        s.into_owned()
    };
    let dst = r.join(dst.trim_start_matches('/'));
    if dst.exists() {
        return Ok(());
    }
    if let Some(p) = dst.parent() {
        std::fs::create_dir_all(p).map_err(|e| LabError::Build(format!("{}: {e}", p.display())))?;
    }
    std::fs::copy(src, &dst)
        .map(|_| ())
        .map_err(|e| LabError::Build(format!("copy {}: {e}", src.display())))
}

fn copy_with_libs(r: &Path, bin: &Path) -> Result<(), LabError> {
    if !bin.exists() {
        return Err(LabError::Build(format!(
            "{} does not exist on the host",
            bin.display()
        )));
    }
    copy_in(r, bin)?;
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| LabError::Build(format!("ldd: {e}")))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        let lib = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if lib.starts_with('/') {
            copy_in(r, Path::new(lib))?;
        }
    }
    Ok(())
}

/// Builds the image for `spec` unless the cache has it; returns its path.
pub(crate) fn build(root: &Path, kver: &str, spec: &ImageSpec) -> Result<PathBuf, LabError> {
    let mut h = Fnv::new();
    h.add(IMAGE_VERSION.as_bytes());
    h.add(INIT.as_bytes());
    h.add(LIB_SH.as_bytes());
    h.add(NVMF_SH.as_bytes());
    h.add(SETUP_SH.as_bytes());
    h.add(kver.as_bytes());
    h.file(Path::new("/bin/busybox"));
    for m in spec.modules.iter().chain(&spec.extra_modules) {
        h.add(m.as_bytes());
    }
    h.add(b"|");
    for b in spec.binaries.iter().chain(&spec.dlopen) {
        h.file(b);
    }
    for (src, dst) in &spec.files {
        h.file(src);
        h.add(dst.as_bytes());
    }
    let out = root.join(format!("initramfs-{:016x}.cpio", h.0));
    if out.exists() {
        return Ok(out);
    }
    let t0 = std::time::Instant::now();
    let r = root.join(format!("rootfs-{:016x}", h.0));
    let _ = std::fs::remove_dir_all(&r);
    let res = populate(&r, kver, spec).and_then(|()| write_cpio(&r, &out));
    let _ = std::fs::remove_dir_all(&r);
    res?;
    eprintln!(
        "lab: built {} ({} KiB) in {:.1} s",
        out.display(),
        std::fs::metadata(&out).map(|m| m.len() / 1024).unwrap_or(0),
        t0.elapsed().as_secs_f64()
    );
    Ok(out)
}

fn populate(r: &Path, kver: &str, spec: &ImageSpec) -> Result<(), LabError> {
    let mk = |p: &str| {
        std::fs::create_dir_all(r.join(p)).map_err(|e| LabError::Build(format!("{p}: {e}")))
    };
    for d in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "mnt",
        "root",
        "lab",
    ] {
        mk(d)?;
    }
    for (l, t) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        std::os::unix::fs::symlink(t, r.join(l))
            .map_err(|e| LabError::Build(format!("symlink {l}: {e}")))?;
    }
    std::fs::copy("/bin/busybox", r.join("usr/bin/busybox"))
        .map_err(|e| LabError::Unavailable(format!("/bin/busybox (busybox-static): {e}")))?;
    std::os::unix::fs::symlink("busybox", r.join("usr/bin/sh"))
        .map_err(|e| LabError::Build(format!("sh: {e}")))?;
    for b in &spec.binaries {
        copy_with_libs(r, b)?;
    }
    for b in &spec.dlopen {
        copy_with_libs(r, b)?;
    }
    for (src, dst) in &spec.files {
        let d = r.join(dst.trim_start_matches('/'));
        if let Some(p) = d.parent() {
            std::fs::create_dir_all(p).map_err(|e| LabError::Build(e.to_string()))?;
        }
        std::fs::copy(src, &d).map_err(|e| LabError::Build(format!("{}: {e}", src.display())))?;
    }
    std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(|e| LabError::Build(e.to_string()))?;
    std::fs::write(r.join("etc/ld.so.conf"), "/usr/lib/x86_64-linux-gnu\n")
        .map_err(|e| LabError::Build(e.to_string()))?;
    // Kernel modules with their dependencies, then depmod for the guest's modprobe.
    let mut kos = Vec::new();
    for m in spec.modules.iter().chain(&spec.extra_modules) {
        let deps = run(Command::new("modprobe").args(["-S", kver, "--show-depends", m]))?;
        for l in deps.lines() {
            let mut w = l.split_whitespace();
            if w.next() == Some("insmod") {
                if let Some(ko) = w.next() {
                    kos.push(ko.to_string());
                }
            }
        }
    }
    kos.sort();
    kos.dedup();
    for ko in &kos {
        copy_in(r, Path::new(ko))?;
    }
    let mdir = format!("/lib/modules/{kver}");
    std::fs::create_dir_all(r.join(format!("usr{mdir}")))
        .map_err(|e| LabError::Build(e.to_string()))?;
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        let src = Path::new(&mdir).join(f);
        if src.exists() {
            copy_in(r, &src)?;
        }
    }
    run(Command::new("depmod").arg("-b").arg(r).arg(kver))?;
    std::fs::write(r.join("lab/modules"), spec.modules.join("\n") + "\n")
        .map_err(|e| LabError::Build(e.to_string()))?;
    let bins: Vec<String> = spec
        .binaries
        .iter()
        .map(|b| b.display().to_string())
        .collect();
    std::fs::write(r.join("lab/binaries"), bins.join("\n") + "\n")
        .map_err(|e| LabError::Build(e.to_string()))?;
    Ok(())
}

fn write_cpio(r: &Path, out: &Path) -> Result<(), LabError> {
    let tmp = out.with_extension("tmp");
    let f = File::create(&tmp).map_err(|e| LabError::Build(format!("{}: {e}", tmp.display())))?;
    let mut w = crate::cpio::Writer::new(BufWriter::new(f));
    let err = |e: std::io::Error| LabError::Build(format!("writing {}: {e}", out.display()));
    w.tree(r).map_err(err)?;
    w.chardev("dev/console", 0o600, 5, 1).map_err(err)?;
    w.file("init", 0o755, INIT.as_bytes()).map_err(err)?;
    w.file("lab/lib.sh", 0o644, LIB_SH.as_bytes())
        .map_err(err)?;
    w.file("lab/nvmf.sh", 0o644, NVMF_SH.as_bytes())
        .map_err(err)?;
    w.file("lab/setup.sh", 0o755, SETUP_SH.as_bytes())
        .map_err(err)?;
    w.finish().map_err(err)?;
    std::fs::rename(&tmp, out).map_err(|e| LabError::Build(e.to_string()))
}
