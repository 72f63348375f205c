//! `uring`: a file or block device served through io_uring (SPDK's `bdev_uring_create`). The same engine also
//! backs `bdev_aio_create` (module `aio`), with aio's options, `driver_specific` and saved config.
//!
//! Each lightweight thread owns one ring shared by every uring/aio bdev it uses (SPDK's uring group channel).
//! Submissions are queued in `submit` and handed to the kernel once per poll (or at once when the submission
//! queue fills); completions are reaped in `poll` and routed to the bdev channel that submitted them. The ring's
//! eventfd is registered with the reactor so a reactor sleeping in idle back-off wakes on completions.
//!
//! I/O descriptors in flight live in a preallocated slot table indexed by the SQE's `user_data`; the kernel reads
//! the descriptor's iovec array in place, so the hot path allocates nothing.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::rc::Rc;
use std::sync::{Arc, Mutex, OnceLock};

use io_uring::{opcode, squeue, types, IoUring};
use reactor::IoDevice;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::{
    register, Bdev, BdevError, BdevIo, BdevOps, BdevParams, ErrorKind, IoHandle, IoStatus, IoType,
    ModuleChannel, Result,
};

mod rpc;
pub(crate) use rpc::register_rpcs;

/// Module name of bdevs made by `bdev_uring_create`.
pub const MODULE_URING: &str = "uring";
/// Module name of bdevs made by `bdev_aio_create`.
pub const MODULE_AIO: &str = "aio";

/// Submission queue depth of a thread's ring (SPDK's `SPDK_URING_QUEUE_DEPTH`).
const RING_ENTRIES: u32 = 512;
/// Most iovecs handed to one readv/writev (the kernel's `UIO_MAXIOV`); longer lists go in several steps.
const MAX_IOVCNT: usize = 1024;
/// Largest byte count of one plain read/write step.
const MAX_STEP_BYTES: usize = 1 << 30;
/// Polls without completions after which the eventfd's leftover wake-ups are cleared.
const STALE_WAKE_POLLS: u32 = 32;
/// End of an intrusive slot list.
const NIL: u32 = u32::MAX;

/// Options of `bdev_uring_create` / `bdev_aio_create`.
#[derive(Clone, Debug, Default)]
pub struct UringOpts {
    /// Bdev name.
    pub name: String,
    /// Path of the file or block device.
    pub filename: String,
    /// Block size; 0 = autodetect (the logical sector size of a block device, 512 for a file).
    pub block_size: u32,
    /// UUID (random when `None`).
    pub uuid: Option<Uuid>,
    /// Open read-only: writes, unmap and write_zeroes are not supported.
    pub readonly: bool,
    /// Serve unmap (punch hole) and write_zeroes (zero range) with fallocate (aio's `fallocate` option; uring
    /// bdevs on regular files do so whenever the filesystem can punch holes).
    pub fallocate: bool,
    /// Register as module `aio` (`bdev_aio_create`) rather than `uring`.
    pub aio: bool,
}

/// The open file, shared by the bdev and its channels; closed when the last of them goes.
struct FileCtx {
    fd: OwnedFd,
    blockdev: bool,
}

struct UringBdev {
    file: Arc<FileCtx>,
    opts: UringOpts,
    block_size_override: bool,
    unmap: bool,
    write_zeroes: bool,
}

/// Open files by bdev name, for `rescan`.
static FILES: Mutex<Option<HashMap<String, Arc<FileCtx>>>> = Mutex::new(None);

fn files<R>(f: impl FnOnce(&mut HashMap<String, Arc<FileCtx>>) -> R) -> R {
    let mut g = reactor::lock(&FILES);
    f(g.get_or_insert_with(HashMap::new))
}

fn invalid(msg: String) -> BdevError {
    BdevError::new(ErrorKind::Invalid, msg)
}

/// `_IOR(0x12, 114, size_t)`: the device size in bytes.
const fn blkgetsize64() -> libc::Ioctl {
    let read: u32 = if cfg!(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    )) {
        2 << 29
    } else {
        2 << 30
    };
    (read | ((std::mem::size_of::<usize>() as u32) << 16) | (0x12 << 8) | 114) as libc::Ioctl
}

fn blockdev_size(fd: RawFd) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which points at a live local.
    let r = unsafe { libc::ioctl(fd, blkgetsize64(), &mut size as *mut u64) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

fn blockdev_sector_size(fd: RawFd) -> std::io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to the pointer, which points at a live local.
    let r = unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut size as *mut libc::c_int) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size.max(0) as u32)
}

/// The file's O_DIRECT offset alignment, when the kernel reports it (statx `STATX_DIOALIGN`, Linux 6.1+).
/// `Some(0)` means the file does not support direct I/O.
fn dio_offset_align(fd: RawFd) -> Option<u32> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH makes statx describe `fd`; `stx` is a live, writable struct.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align)
}

fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate takes no pointers.
    let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn open_file(path: &str, readonly: bool, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(!readonly);
    o.custom_flags(if direct { libc::O_DIRECT } else { 0 });
    o.open(path)
}

/// Creates a uring (or, with `opts.aio`, an aio) bdev on a file or block device.
pub fn create(opts: UringOpts) -> Result<Bdev> {
    let module = if opts.aio { MODULE_AIO } else { MODULE_URING };
    let name = opts.name.clone();
    if name.is_empty() {
        return Err(invalid(format!("{module} bdev name is required")));
    }
    if opts.filename.is_empty() {
        return Err(invalid(format!("{name}: filename is required")));
    }
    if crate::get(&name).is_some() {
        return Err(BdevError::new(
            ErrorKind::Exists,
            format!("Bdev name {name} already exists"),
        ));
    }
    // Fail here, not on the first I/O, when io_uring is unavailable (kernel.io_uring_disabled, seccomp).
    IoUring::new(2).map_err(|e| BdevError::os(&e, format!("{name}: io_uring is not available")))?;

    let fname = &opts.filename;
    let (mut file, mut direct) = match open_file(fname, opts.readonly, true) {
        Ok(f) => (f, true),
        Err(e) => {
            let f = open_file(fname, opts.readonly, false)
                .map_err(|e| BdevError::os(&e, format!("{name}: cannot open {fname}")))?;
            log::info!("{name}: {fname} refused O_DIRECT ({e}); using buffered I/O");
            (f, false)
        }
    };
    let meta = file
        .metadata()
        .map_err(|e| BdevError::os(&e, format!("{name}: cannot stat {fname}")))?;
    let ft = meta.file_type();
    let blockdev = ft.is_block_device();
    if !blockdev && !ft.is_file() {
        return Err(invalid(format!(
            "{name}: {fname} is neither a regular file nor a block device"
        )));
    }
    let (size, detected) = if blockdev {
        let fd = file.as_raw_fd();
        let size = blockdev_size(fd)
            .map_err(|e| BdevError::os(&e, format!("{name}: BLKGETSIZE64 on {fname}")))?;
        let ss = blockdev_sector_size(fd)
            .map_err(|e| BdevError::os(&e, format!("{name}: BLKSSZGET on {fname}")))?;
        (size, ss)
    } else {
        (meta.len(), 0)
    };

    let block_size_override = opts.block_size != 0;
    let block_size = if block_size_override {
        if opts.block_size < detected {
            return Err(invalid(format!(
                "{name}: specified block size {} is smaller than auto-detected block size {detected}",
                opts.block_size
            )));
        }
        if detected != 0 && opts.block_size != detected {
            log::warn!(
                "{name}: specified block size {} does not match auto-detected block size {detected}",
                opts.block_size
            );
        }
        opts.block_size
    } else if blockdev {
        detected
    } else {
        512
    };
    if block_size < 512 {
        return Err(invalid(format!(
            "{name}: invalid block size {block_size} (must be at least 512)"
        )));
    }
    if !block_size.is_power_of_two() {
        return Err(invalid(format!(
            "{name}: invalid block size {block_size} (must be a power of 2)"
        )));
    }
    if size % block_size as u64 != 0 {
        return Err(invalid(format!(
            "{name}: disk size {size} is not a multiple of block size {block_size}"
        )));
    }
    let num_blocks = size / block_size as u64;
    if num_blocks == 0 {
        return Err(invalid(format!(
            "{name}: {fname} ({size} bytes) does not hold one block of {block_size}"
        )));
    }

    // A file whose filesystem needs larger direct I/O alignment than the block size cannot use O_DIRECT.
    if direct && !blockdev {
        if let Some(align) =
            dio_offset_align(file.as_raw_fd()).filter(|a| *a == 0 || *a > block_size)
        {
            let f = open_file(fname, opts.readonly, false)
                .map_err(|e| BdevError::os(&e, format!("{name}: cannot open {fname}")))?;
            log::info!("{name}: {fname} needs direct I/O alignment {align} > block size {block_size}; using buffered I/O");
            file = f;
            direct = false;
        }
    }
    if direct {
        log::info!("{name}: {fname} opened with O_DIRECT ({num_blocks} blocks of {block_size})");
    }

    let fd: OwnedFd = file.into();
    let writable = !opts.readonly;
    let (unmap, write_zeroes) = if !writable {
        (false, false)
    } else if opts.aio {
        (opts.fallocate, opts.fallocate)
    } else if blockdev {
        // Zeroing a block device range via fallocate falls back to writing zeroes in the kernel, so it always
        // works; discard has no non-blocking path, so unmap is not offered.
        (false, true)
    } else {
        // Punching a hole past the end of the file changes nothing but tells whether the filesystem can.
        let ok = fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            size,
            block_size as u64,
        )
        .map_err(|e| {
            log::info!(
                "{name}: {fname} cannot punch holes ({e}); unmap and write_zeroes unsupported"
            )
        })
        .is_ok();
        (ok, ok)
    };

    let mut p = BdevParams::new(&name, block_size, num_blocks);
    p.uuid = opts.uuid;
    p.product_name = if opts.aio { "AIO disk" } else { "URING bdev" }.into();
    p.write_cache = opts.aio;
    p.required_alignment = if opts.aio && block_size_override && detected != 0 {
        detected
    } else {
        block_size
    };
    let file = Arc::new(FileCtx { fd, blockdev });
    let bdev = register(
        p,
        Box::new(UringBdev {
            file: file.clone(),
            opts,
            block_size_override,
            unmap,
            write_zeroes,
        }),
    )?;
    files(|m| m.insert(bdev.name().to_string(), file));
    Ok(bdev)
}

/// Deletes a uring or aio bdev (`bdev_uring_delete` / `bdev_aio_delete`); `module` is [`MODULE_URING`] or
/// [`MODULE_AIO`].
pub fn delete(name: &str, module: &str, done: impl FnOnce(Result<()>) + Send + 'static) {
    crate::unregister_by_name(name, module, done)
}

/// Re-reads the size of the file or device and announces a change (`bdev_uring_rescan` / `bdev_aio_rescan`).
pub fn rescan(name: &str) -> Result<()> {
    let bdev = crate::get(name)
        .filter(|b| matches!(b.module_name(), MODULE_URING | MODULE_AIO))
        .ok_or_else(|| {
            BdevError::new(
                ErrorKind::NotFound,
                format!("uring/aio bdev {name} not found"),
            )
        })?;
    let file = files(|m| m.get(bdev.name()).cloned()).ok_or_else(|| {
        BdevError::new(ErrorKind::NotFound, format!("bdev {name} is being removed"))
    })?;
    let fd = file.fd.as_raw_fd();
    let size = if file.blockdev {
        blockdev_size(fd).map_err(|e| BdevError::os(&e, format!("{name}: BLKGETSIZE64")))?
    } else {
        // SAFETY: fstat writes one stat struct to a live local.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open (owned by `file`), `st` is writable.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(BdevError::os(
                std::io::Error::last_os_error(),
                format!("{name}: fstat"),
            ));
        }
        st.st_size as u64
    };
    let blocks = size / bdev.block_size() as u64;
    if blocks == 0 {
        return Err(invalid(format!("{name}: the file shrank below one block")));
    }
    if blocks != bdev.num_blocks() {
        log::info!(
            "{name}: resized from {} to {blocks} blocks",
            bdev.num_blocks()
        );
        bdev.notify_resize(blocks)?;
    }
    Ok(())
}

impl BdevOps for UringBdev {
    fn module_name(&self) -> &'static str {
        if self.opts.aio {
            MODULE_AIO
        } else {
            MODULE_URING
        }
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            IoType::Read | IoType::Flush | IoType::Reset => true,
            IoType::Write => !self.opts.readonly,
            IoType::Unmap => self.unmap,
            IoType::WriteZeroes => self.write_zeroes,
            IoType::Compare | IoType::Abort | IoType::NvmeAdmin | IoType::NvmeIo | IoType::Copy => {
                false
            }
        }
    }

    fn create_channel(&self, _bdev: &Bdev) -> Box<dyn ModuleChannel> {
        let group = GROUPS
            .get_or_init(|| IoDevice::new(Group::create))
            .get_channel();
        let id = match &*group {
            Ok(g) => g.borrow_mut().add_channel(),
            Err(_) => NIL,
        };
        Box::new(UringChannel {
            group,
            id,
            fd: self.file.fd.as_raw_fd(),
            _file: self.file.clone(),
            inflight: 0,
            resets: VecDeque::new(),
        })
    }

    fn destruct(&self, bdev: &Bdev) {
        files(|m| {
            if m.get(bdev.name())
                .is_some_and(|f| Arc::ptr_eq(f, &self.file))
            {
                m.remove(bdev.name());
            }
        });
    }

    fn dump_info(&self, _bdev: &Bdev, out: &mut Map<String, Value>) {
        if self.opts.aio {
            out.insert(
                "aio".into(),
                json!({
                    "filename": self.opts.filename,
                    "block_size_override": self.block_size_override,
                    "readonly": self.opts.readonly,
                    "fallocate": self.opts.fallocate,
                }),
            );
        } else {
            out.insert("uring".into(), json!({ "filename": self.opts.filename }));
        }
    }

    fn write_config(&self, bdev: &Bdev) -> Option<Value> {
        if self.opts.aio {
            let mut p = Map::new();
            p.insert("name".into(), json!(bdev.name()));
            if self.block_size_override {
                p.insert("block_size".into(), json!(bdev.block_size()));
            }
            p.insert("filename".into(), json!(self.opts.filename));
            p.insert("readonly".into(), json!(self.opts.readonly));
            p.insert("fallocate".into(), json!(self.opts.fallocate));
            p.insert("uuid".into(), json!(bdev.uuid().to_string()));
            Some(json!({ "method": "bdev_aio_create", "params": Value::Object(p) }))
        } else {
            Some(json!({
                "method": "bdev_uring_create",
                "params": {
                    "name": bdev.name(),
                    "block_size": bdev.block_size(),
                    "filename": self.opts.filename,
                    "uuid": bdev.uuid().to_string(),
                }
            }))
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The per-thread ring.

/// One I/O in flight (or completed and waiting for its channel to pick it up).
struct Slot {
    io: Option<IoHandle>,
    /// The channel that submitted it.
    owner: u32,
    /// Next slot of the free list or of the owner's done list.
    next: u32,
    /// The outcome, once done.
    status: IoStatus,
}

/// A channel's list of completed slots.
#[derive(Clone, Copy)]
struct ChanEntry {
    head: u32,
    tail: u32,
    live: bool,
    /// The filesystem refused FALLOC_FL_ZERO_RANGE: write zeroes by punching holes instead.
    no_zero_range: bool,
}

struct Group {
    ring: IoUring,
    efd: OwnedFd,
    wake_registered: bool,
    slots: Box<[Slot]>,
    free: u32,
    in_use: u32,
    chans: Vec<ChanEntry>,
    free_chans: Vec<u32>,
    submit_error_logged: bool,
    /// Completions were reaped since the eventfd was last drained.
    wake_stale: bool,
    /// Polls since the last completion.
    quiet_polls: u32,
}

/// The thread's ring, or the errno that kept it from being set up.
type GroupCell = std::result::Result<RefCell<Group>, i32>;

static GROUPS: OnceLock<IoDevice<GroupCell>> = OnceLock::new();

/// What to do with a completion.
enum Next {
    Done(IoStatus),
    Again(squeue::Entry),
}

impl Group {
    fn create() -> GroupCell {
        Group::new().map(RefCell::new).map_err(|e| {
            log::error!("uring: cannot set up this thread's io_uring: {e}");
            e.raw_os_error().unwrap_or(libc::EIO)
        })
    }

    fn new() -> std::io::Result<Group> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // Every slot in use may complete before the channel reaps, so the slot count is the CQ size: the
        // completion queue never overflows.
        let nslots = ring.params().cq_entries().max(RING_ENTRIES) as usize;
        // SAFETY: eventfd takes no pointers; the result is checked before it is wrapped.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let wake_registered = match reactor::add_wake_fd(efd.as_raw_fd()) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("uring: cannot register the completion eventfd with the reactor: {e}");
                false
            }
        };
        let slots: Box<[Slot]> = (0..nslots)
            .map(|i| Slot {
                io: None,
                owner: NIL,
                next: if i + 1 < nslots { i as u32 + 1 } else { NIL },
                status: IoStatus::Pending,
            })
            .collect();
        Ok(Group {
            ring,
            efd,
            wake_registered,
            slots,
            free: 0,
            in_use: 0,
            chans: Vec::new(),
            free_chans: Vec::new(),
            submit_error_logged: false,
            wake_stale: false,
            quiet_polls: 0,
        })
    }

    fn add_channel(&mut self) -> u32 {
        let e = ChanEntry {
            head: NIL,
            tail: NIL,
            live: true,
            no_zero_range: false,
        };
        match self.free_chans.pop() {
            Some(id) => {
                self.chans[id as usize] = e;
                id
            }
            None => {
                self.chans.push(e);
                self.chans.len() as u32 - 1
            }
        }
    }

    fn remove_channel(&mut self, id: u32) {
        if let Some(c) = self.chans.get_mut(id as usize) {
            debug_assert!(
                c.head == NIL,
                "uring channel dropped with completions pending"
            );
            c.live = false;
            self.free_chans.push(id);
        }
    }

    fn alloc_slot(&mut self, owner: u32) -> Option<u32> {
        let idx = self.free;
        if idx == NIL {
            return None;
        }
        let s = &mut self.slots[idx as usize];
        self.free = s.next;
        s.next = NIL;
        s.owner = owner;
        s.status = IoStatus::Pending;
        self.in_use += 1;
        Some(idx)
    }

    fn free_slot(&mut self, idx: u32) -> Option<IoHandle> {
        let s = &mut self.slots[idx as usize];
        let io = s.io.take();
        s.owner = NIL;
        s.next = self.free;
        self.free = idx;
        self.in_use -= 1;
        io
    }

    /// Queues an SQE, handing the queue to the kernel first if it is full.
    ///
    /// # Safety
    /// Every buffer the entry names must stay valid until its completion is reaped.
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> bool {
        // SAFETY: forwarded from the caller.
        if unsafe { self.ring.submission().push(sqe) }.is_ok() {
            return true;
        }
        self.submit();
        // SAFETY: forwarded from the caller.
        unsafe { self.ring.submission().push(sqe) }.is_ok()
    }

    /// Hands queued SQEs to the kernel. Transient errors leave them queued for the next poll.
    fn submit(&mut self) {
        match self.ring.submit() {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                ) => {}
            Err(e) => {
                if !self.submit_error_logged {
                    log::error!("uring: io_uring_enter failed: {e}");
                    self.submit_error_logged = true;
                }
            }
        }
    }

    fn drain_eventfd(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live local from our non-blocking eventfd; EAGAIN (nothing pending) is fine.
        unsafe {
            libc::read(
                self.efd.as_raw_fd(),
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            )
        };
    }

    /// Reaps every completion, resubmitting the rest of short transfers, and files finished slots on their
    /// owners' done lists. Returns how many completions it saw.
    fn reap(&mut self) -> usize {
        let mut n = 0;
        let mut resubmit_failed = false;
        {
            let (submitter, mut sq, mut cq) = self.ring.split();
            for cqe in &mut cq {
                n += 1;
                let idx = cqe.user_data() as u32;
                let slot = &mut self.slots[idx as usize];
                let owner = slot.owner;
                let io = slot.io.as_mut().expect("completed slot holds an I/O");
                let status = match next_step(
                    io,
                    cqe.result(),
                    &mut self.chans[owner as usize].no_zero_range,
                ) {
                    Next::Done(s) => s,
                    Next::Again(sqe) => {
                        let sqe = sqe.user_data(idx as u64);
                        // SAFETY: the entry names the I/O's buffers (or none); the I/O stays in its slot, iovecs
                        // untouched, until this new completion is reaped.
                        let mut pushed = unsafe { sq.push(&sqe) }.is_ok();
                        if !pushed {
                            sq.sync();
                            let _ = submitter.submit();
                            sq.sync();
                            // SAFETY: as above.
                            pushed = unsafe { sq.push(&sqe) }.is_ok();
                        }
                        if pushed {
                            continue;
                        }
                        resubmit_failed = true;
                        IoStatus::NoMem
                    }
                };
                self.slots[idx as usize].status = status;
                let c = &mut self.chans[owner as usize];
                if c.tail == NIL {
                    c.head = idx;
                } else {
                    self.slots[c.tail as usize].next = idx;
                }
                c.tail = idx;
            }
        }
        if resubmit_failed {
            log::warn!(
                "uring: submission queue full while continuing a short transfer; retrying the I/O"
            );
        }
        n
    }

    fn pop_done(&mut self, id: u32) -> Option<(IoHandle, IoStatus)> {
        let c = &mut self.chans[id as usize];
        let idx = c.head;
        if idx == NIL {
            return None;
        }
        c.head = self.slots[idx as usize].next;
        if c.head == NIL {
            c.tail = NIL;
        }
        let status = self.slots[idx as usize].status;
        let io = self.free_slot(idx)?;
        Some((io, status))
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.wake_registered {
            reactor::remove_wake_fd(self.efd.as_raw_fd());
        }
        // An I/O in a slot holds its channel, which holds the group, so a group only drops with I/O still in the
        // kernel if a thread is torn down mid-I/O. Buffers must not be released while the kernel may write them.
        let in_kernel = |g: &Group| {
            g.slots
                .iter()
                .filter(|s| s.io.is_some() && s.status == IoStatus::Pending)
                .count()
        };
        let mut rounds = 0;
        while in_kernel(self) > 0 && rounds < 10_000 {
            rounds += 1;
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for ud in done {
                if let Some(s) = self.slots.get_mut(ud as usize) {
                    s.status = IoStatus::Aborted;
                }
            }
        }
    }
}

/// The SQE for the part of a read or write not yet transferred (`done` bytes are).
fn rw_sqe(io: &BdevIo, fd: RawFd, done: u64) -> squeue::Entry {
    let write = io.io_type() == IoType::Write;
    let offset = io.offset_bytes() + done;
    let iovs = io.iovs();
    let mut skip = done as usize;
    let mut k = 0;
    while k < iovs.len() && skip >= iovs[k].len {
        skip -= iovs[k].len;
        k += 1;
    }
    if skip == 0 {
        let rest = &iovs[k..];
        // IoVec is #[repr(C)] { base: *mut u8, len: usize }, the layout of struct iovec.
        let ptr = rest.as_ptr() as *const libc::iovec;
        let cnt = rest.len().min(MAX_IOVCNT) as u32;
        if write {
            opcode::Writev::new(types::Fd(fd), ptr, cnt)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(types::Fd(fd), ptr, cnt)
                .offset(offset)
                .build()
        }
    } else {
        // Resume inside an iovec: transfer the rest of that one element, then continue with whole ones.
        let v = iovs[k];
        // SAFETY: skip < v.len, so the pointer stays inside the caller's buffer.
        let base = unsafe { v.base.add(skip) };
        let len = (v.len - skip).min(MAX_STEP_BYTES) as u32;
        if write {
            opcode::Write::new(types::Fd(fd), base, len)
                .offset(offset)
                .build()
        } else {
            opcode::Read::new(types::Fd(fd), base, len)
                .offset(offset)
                .build()
        }
    }
}

/// The first SQE of an I/O (without user_data).
fn first_sqe(io: &mut BdevIo, fd: RawFd, no_zero_range: bool) -> squeue::Entry {
    io.driver_ctx[0] = 0;
    io.driver_ctx[1] = 0;
    let fd_t = types::Fd(fd);
    match io.io_type() {
        IoType::Read | IoType::Write => rw_sqe(io, fd, 0),
        IoType::Flush => opcode::Fsync::new(fd_t)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        IoType::Unmap => punch_sqe(io, fd),
        _ => {
            if no_zero_range {
                io.driver_ctx[1] = 1;
                punch_sqe(io, fd)
            } else {
                opcode::Fallocate::new(fd_t, io.len_bytes())
                    .offset(io.offset_bytes())
                    .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
            }
        }
    }
}

fn punch_sqe(io: &BdevIo, fd: RawFd) -> squeue::Entry {
    opcode::Fallocate::new(types::Fd(fd), io.len_bytes())
        .offset(io.offset_bytes())
        .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
        .build()
}

/// Interprets a completion: done (with a status), or another step to submit. `driver_ctx[0]` counts bytes
/// transferred, `driver_ctx[1]` is 1 once write_zeroes fell back to punching a hole; `driver_ctx[2]` holds the fd.
fn next_step(io: &mut BdevIo, res: i32, no_zero_range: &mut bool) -> Next {
    let fd = io.driver_ctx[2] as RawFd;
    match io.io_type() {
        IoType::Read | IoType::Write => {
            if res < 0 {
                // The kernel may refuse for lack of resources: let the bdev layer retry.
                return Next::Done(if res == -libc::EAGAIN {
                    IoStatus::NoMem
                } else {
                    IoStatus::Failed(-res)
                });
            }
            let done = io.driver_ctx[0] + res as u64;
            if done >= io.len_bytes() {
                return Next::Done(IoStatus::Success);
            }
            if res == 0 {
                // End of file or device before the end of the range: never report a short transfer as success.
                return Next::Done(IoStatus::Failed(libc::EIO));
            }
            io.driver_ctx[0] = done;
            Next::Again(rw_sqe(io, fd, done))
        }
        IoType::WriteZeroes if res == -libc::EOPNOTSUPP && io.driver_ctx[1] == 0 => {
            // The filesystem cannot zero a range in place; a punched hole reads back as zeroes too.
            *no_zero_range = true;
            io.driver_ctx[1] = 1;
            Next::Again(punch_sqe(io, fd))
        }
        _ if res < 0 => Next::Done(IoStatus::Failed(-res)),
        _ => Next::Done(IoStatus::Success),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Per-bdev channels.

struct UringChannel {
    group: Rc<GroupCell>,
    id: u32,
    fd: RawFd,
    /// Keeps `fd` open while this channel may use it.
    _file: Arc<FileCtx>,
    /// This channel's I/Os in the ring.
    inflight: u32,
    /// Resets waiting for the I/Os in flight before them.
    resets: VecDeque<IoHandle>,
}

impl UringChannel {
    fn start(&mut self, mut io: IoHandle) {
        let g = match &*self.group {
            Ok(g) => g,
            Err(errno) => {
                io.complete(IoStatus::Failed(*errno));
                return;
            }
        };
        let mut g = g.borrow_mut();
        let Some(idx) = g.alloc_slot(self.id) else {
            io.complete(IoStatus::NoMem);
            return;
        };
        let no_zero_range = g.chans[self.id as usize].no_zero_range;
        let sqe = first_sqe(&mut io, self.fd, no_zero_range).user_data(idx as u64);
        io.driver_ctx[2] = self.fd as u64;
        g.slots[idx as usize].io = Some(io);
        // SAFETY: the SQE names the I/O's iovec array (in its boxed descriptor) and the buffers it points at; both
        // stay valid and untouched while the descriptor sits in slot `idx`, which it does until the completion is
        // reaped. The fd stays open: `self.file` outlives every I/O of this channel.
        if unsafe { g.push(&sqe) } {
            self.inflight += 1;
        } else if let Some(io) = g.free_slot(idx) {
            io.complete(IoStatus::NoMem);
        }
    }
}

impl ModuleChannel for UringChannel {
    fn submit(&mut self, io: IoHandle) {
        match io.io_type() {
            IoType::Read | IoType::Write | IoType::Flush | IoType::Unmap | IoType::WriteZeroes => {
                self.start(io)
            }
            IoType::Reset => {
                if self.inflight == 0 {
                    io.complete(IoStatus::Success);
                } else {
                    self.resets.push_back(io);
                }
            }
            IoType::Compare | IoType::Abort | IoType::NvmeAdmin | IoType::NvmeIo | IoType::Copy => {
                io.complete(IoStatus::Failed(libc::ENOTSUP))
            }
        }
    }

    fn poll(&mut self) -> bool {
        let Ok(cell) = &*self.group else { return false };
        let mut g = cell.borrow_mut();
        let mut did = false;
        if !g.ring.submission().is_empty() {
            g.submit();
            did = true;
        }
        if g.in_use > 0 && !g.ring.completion().is_empty() {
            g.reap();
            g.wake_stale = true;
            g.quiet_polls = 0;
            did = true;
        } else if g.wake_stale {
            // Completions leave the eventfd readable. It only matters to a reactor about to sleep, so it is not
            // drained while completions flow (no syscall per batch) but once the ring has been quiet for a while.
            // The queue is checked again after the drain: a completion posted just before it would otherwise sit
            // unreaped with its wake-up consumed.
            g.quiet_polls += 1;
            if g.quiet_polls >= STALE_WAKE_POLLS {
                g.drain_eventfd();
                g.wake_stale = false;
                if g.in_use > 0 && !g.ring.completion().is_empty() {
                    g.reap();
                    g.wake_stale = true;
                    g.quiet_polls = 0;
                    did = true;
                }
            }
        }
        while let Some((io, status)) = g.pop_done(self.id) {
            self.inflight -= 1;
            did = true;
            // Completing from inside poll only queues the callback; it runs after this returns.
            io.complete(status);
        }
        drop(g);
        if self.inflight == 0 && !self.resets.is_empty() {
            while let Some(r) = self.resets.pop_front() {
                r.complete(IoStatus::Success);
            }
            did = true;
        }
        did
    }

    fn wants_poll(&self) -> bool {
        // The eventfd still has to be drained after the last completion, or an idle reactor would keep waking.
        !self.resets.is_empty()
            || match &*self.group {
                Ok(cell) => cell.try_borrow().is_ok_and(|g| g.wake_stale),
                Err(_) => false,
            }
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        if let Ok(g) = &*self.group {
            g.borrow_mut().remove_channel(self.id);
        }
    }
}
