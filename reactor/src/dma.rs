//! DMA-able buffer memory: hugepage-backed when hugepages can be had, ordinary pages otherwise.
//!
//! Buffers are carved from 2 MiB chunks in power-of-two size classes and recycled through per-class free lists.
//! Allocation is a control-path operation (a task, a pool or a queue takes its buffers once); the I/O path reuses
//! them. Every chunk, and every buffer too large for a chunk, is registered in the memory map
//! ([`crate::memmap`]) for as long as it is mapped, so a VFIO or RDMA driver subscribed to it can prepare it for
//! devices; [`regions`] lists them.

use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::memmap::{self, Registration};

/// Size of one chunk, and of one hugepage.
pub const CHUNK: usize = 2 << 20;
const MIN_CLASS: usize = 4096;
const CLASSES: usize = 10; // 4 KiB .. 2 MiB

static NO_HUGE: AtomicBool = AtomicBool::new(false);
static HUGE_FAILED: AtomicBool = AtomicBool::new(false);
/// `-s`: the most DMA memory mapped at once, in bytes (0: no limit).
static LIMIT: AtomicUsize = AtomicUsize::new(0);
/// DMA memory mapped now, in bytes.
static MAPPED: AtomicUsize = AtomicUsize::new(0);
/// `--huge-dir`: a hugetlbfs mount whose files back DMA memory.
static HUGE_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
static HUGE_FILES: AtomicUsize = AtomicUsize::new(0);

/// hugetlbfs's `f_type` (statfs).
const HUGETLBFS_MAGIC: libc::c_long = 0x958458f6;

struct Region {
    reg: Registration,
    huge: bool,
}

struct Pool {
    free: [Vec<usize>; CLASSES],
    regions: Vec<Region>,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: [const { Vec::new() }; CLASSES],
    regions: Vec::new(),
});

/// Disables hugepages (`--no-huge`).
pub fn set_no_huge(v: bool) {
    NO_HUGE.store(v, Ordering::Relaxed);
}

/// Caps the DMA memory mapped at once (`-s`/`--mem-size`); 0 lifts the cap. A mapping past it fails with
/// ENOMEM and says so, so the RPC that asked for it answers "Cannot allocate memory" and nothing else is hurt.
pub fn set_limit(bytes: usize) {
    LIMIT.store(bytes, Ordering::Relaxed);
}

/// DMA memory mapped now, in bytes.
pub fn mapped() -> usize {
    MAPPED.load(Ordering::Relaxed)
}

/// Backs DMA memory with files in the hugetlbfs mount `dir` (`--huge-dir`), created and unlinked at once so
/// that nothing is left behind; refused unless `dir` is a hugetlbfs mount.
pub fn set_huge_dir(dir: Option<PathBuf>) -> std::io::Result<()> {
    if let Some(d) = &dir {
        let c = std::ffi::CString::new(d.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: statfs reads the NUL-terminated path and writes only the struct we pass, sized for it.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if st.f_type as libc::c_long != HUGETLBFS_MAGIC {
            return Err(std::io::Error::other(format!(
                "{} is not a hugetlbfs mount",
                d.display()
            )));
        }
    }
    *crate::lock(&HUGE_DIR) = dir;
    Ok(())
}

fn pool() -> MutexGuard<'static, Pool> {
    crate::lock(&POOL)
}

/// The memory regions mapped for buffers: (address, length, hugepage-backed).
pub fn regions() -> Vec<(usize, usize, bool)> {
    pool()
        .regions
        .iter()
        .map(|r| (r.reg.addr(), r.reg.size(), r.huge))
        .collect()
}

/// How many bytes [`map_anonymous`] maps for a request of `len` (whole chunks).
pub fn mapped_len(len: usize) -> usize {
    len.div_ceil(CHUNK) * CHUNK
}

/// Maps `len` bytes of zeroed anonymous memory, on hugepages when allowed and available.
/// Returns the address and whether hugepages back it.
pub fn map_anonymous(len: usize) -> std::io::Result<(NonNull<u8>, bool)> {
    let len = mapped_len(len);
    let limit = LIMIT.load(Ordering::Relaxed);
    let before = MAPPED.fetch_add(len, Ordering::Relaxed);
    if limit != 0 && before + len > limit {
        MAPPED.fetch_sub(len, Ordering::Relaxed);
        log::error!(
            "DMA memory: {} MiB asked with {} MiB mapped, past the {} MiB given (-s)",
            len >> 20,
            before >> 20,
            limit >> 20
        );
        return Err(std::io::Error::from_raw_os_error(libc::ENOMEM));
    }
    let r = map_backed(len);
    if r.is_err() {
        MAPPED.fetch_sub(len, Ordering::Relaxed);
    }
    r
}

fn map_backed(len: usize) -> std::io::Result<(NonNull<u8>, bool)> {
    if !NO_HUGE.load(Ordering::Relaxed) {
        let dir = crate::lock(&HUGE_DIR).clone();
        if let Some(d) = dir {
            return map_huge_file(&d, len).map(|p| (p, true));
        }
        if !HUGE_FAILED.load(Ordering::Relaxed) {
            if let Some(p) = mmap(len, libc::MAP_HUGETLB) {
                return Ok((p, true));
            }
            HUGE_FAILED.store(true, Ordering::Relaxed);
            log::info!("hugepages unavailable; DMA memory uses ordinary pages");
        }
    }
    mmap(len, 0)
        .map(|p| (p, false))
        .ok_or_else(std::io::Error::last_os_error)
}

/// Maps `len` bytes of a new file in hugetlbfs mount `dir`; the file is unlinked before this returns (the
/// mapping keeps its pages, and nothing is left in `dir` after a crash).
fn map_huge_file(dir: &std::path::Path, len: usize) -> std::io::Result<NonNull<u8>> {
    use std::os::fd::AsRawFd;
    let n = HUGE_FILES.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("spdk_tgt.{}.{n}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let _ = std::fs::remove_file(&path);
    f.set_len(len as u64)?;
    // SAFETY: a new shared mapping of our own file at an address the kernel picks touches no existing memory;
    // the file stays mapped after its descriptor closes.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("hugepages in {}: {e}", dir.display()),
        ));
    }
    NonNull::new(p as *mut u8).ok_or_else(|| std::io::Error::other("mmap returned null"))
}

fn mmap(len: usize, extra: libc::c_int) -> Option<NonNull<u8>> {
    // SAFETY: an anonymous private mapping at an address the kernel picks touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | extra,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        None
    } else {
        NonNull::new(p as *mut u8)
    }
}

/// Unmaps memory from [`map_anonymous`].
///
/// # Safety
/// `p`/`len` must come from one `map_anonymous` call, and nothing may use the memory afterwards.
pub unsafe fn unmap(p: NonNull<u8>, len: usize) {
    let len = mapped_len(len);
    // SAFETY: the caller guarantees the range is one mapping of ours that nothing uses any more.
    unsafe { libc::munmap(p.as_ptr() as *mut libc::c_void, len) };
    MAPPED.fetch_sub(len, Ordering::Relaxed);
}

/// A DMA-able buffer, aligned to at least 4 KiB, owned and `Send`.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: DmaBuf owns its memory exclusively, like a Box<[u8]>.
unsafe impl Send for DmaBuf {}
// SAFETY: shared access only reads through &self.
unsafe impl Sync for DmaBuf {}

fn class_of(len: usize) -> Option<usize> {
    let size = len.max(MIN_CLASS).next_power_of_two();
    (size <= CHUNK).then(|| size.trailing_zeros() as usize - MIN_CLASS.trailing_zeros() as usize)
}

/// Maps `len` bytes (rounded up to chunks) and registers them in the memory map; unmaps again if a memory map
/// subscriber refuses them. Called without the pool lock: subscribers may allocate buffers themselves.
fn map_registered(len: usize) -> std::io::Result<(NonNull<u8>, Region)> {
    let (ptr, huge) = map_anonymous(len)?;
    match memmap::register(ptr.as_ptr() as usize, mapped_len(len)) {
        Ok(reg) => Ok((ptr, Region { reg, huge })),
        Err(e) => {
            // SAFETY: `ptr`/`len` is the mapping made just above, not handed out to anyone.
            unsafe { unmap(ptr, len) };
            Err(e.into())
        }
    }
}

impl DmaBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn alloc(len: usize) -> std::io::Result<DmaBuf> {
        let Some(class) = class_of(len) else {
            let (ptr, region) = map_registered(len)?;
            let cap = region.reg.size();
            pool().regions.push(region);
            return Ok(DmaBuf { ptr, len, cap });
        };
        let size = MIN_CLASS << class;
        let addr = loop {
            if let Some(a) = pool().free[class].pop() {
                break a;
            }
            let (chunk, region) = map_registered(CHUNK)?;
            let base = chunk.as_ptr() as usize;
            let mut pool = pool();
            pool.regions.push(region);
            for off in (0..CHUNK).step_by(size).rev() {
                pool.free[class].push(base + off);
            }
        };
        let ptr = NonNull::new(addr as *mut u8).ok_or_else(|| std::io::Error::other("dma pool"))?;
        // SAFETY: the block is `size` bytes of our mapping, no longer handed out to anyone else.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, size) };
        Ok(DmaBuf {
            ptr,
            len,
            cap: size,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: we own `len` initialised bytes at `ptr` (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: we own `len` initialised bytes at `ptr`, exclusively through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        let addr = self.ptr.as_ptr() as usize;
        match class_of(self.cap) {
            Some(class) if self.cap <= CHUNK => pool().free[class].push(addr),
            _ => {
                let region = {
                    let mut pool = pool();
                    let i = pool.regions.iter().position(|r| r.reg.addr() == addr);
                    i.map(|i| pool.regions.swap_remove(i))
                };
                // Unregister (outside the pool lock) before the memory goes away.
                drop(region);
                // SAFETY: a large buffer is exactly one mapping of `cap` bytes, owned by us and dropped now.
                unsafe { unmap(self.ptr, self.cap) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_recycled() {
        let mut a = DmaBuf::alloc(512).unwrap();
        assert_eq!(a.as_ptr() as usize % 4096, 0);
        assert!(a.as_slice().iter().all(|b| *b == 0));
        a.as_mut_slice().fill(7);
        let addr = a.as_ptr() as usize;
        drop(a);
        let b = DmaBuf::alloc(4096).unwrap();
        assert_eq!(b.as_ptr() as usize, addr, "freed block is reused");
        assert!(
            b.as_slice().iter().all(|x| *x == 0),
            "reused block is zeroed"
        );
        let big = DmaBuf::alloc(5 << 20).unwrap();
        assert_eq!(big.len(), 5 << 20);
        assert!(regions().iter().any(|r| r.0 == big.as_ptr() as usize));
    }
}
