//! `malloc`: a RAM disk (SPDK's `bdev_malloc_create`). Memory is DMA-able (hugepages when available) and
//! registered in the memory map (`reactor::memmap`) from create to destruct.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::{
    register, Bdev, BdevError, BdevOps, BdevParams, ErrorKind, IoHandle, IoStatus, IoType,
    ModuleChannel, RawCopy, Result,
};

mod rpc;
pub(crate) use rpc::register_rpcs;

/// Module name.
pub const MODULE: &str = "malloc";

static AUTO_NAME: AtomicU32 = AtomicU32::new(0);

/// `bdev_malloc_create` options.
#[derive(Clone, Debug, Default)]
pub struct MallocOpts {
    /// Name (auto-generated `MallocN` when `None`).
    pub name: Option<String>,
    /// UUID.
    pub uuid: Option<Uuid>,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Block size.
    pub block_size: u32,
    /// Physical block size (0 = block size).
    pub physical_block_size: u32,
    /// Optimal I/O boundary in blocks.
    pub optimal_io_boundary: u32,
}

struct Memory {
    ptr: NonNull<u8>,
    len: usize,
    /// Writes go in with streaming stores: the disk is much larger than the cache, so a written line would be
    /// read for ownership and evicted unread (see `reactor::stream`).
    stream_writes: bool,
    /// The memory map registration, dropped at destruct (or with the memory, whichever comes first).
    reg: Mutex<Option<reactor::memmap::Registration>>,
}

// SAFETY: the mapping is owned by this struct and unmapped once, in Drop, when the last channel (each holds an
// Arc) is gone. Nothing ever makes a Rust reference (`&[u8]`, `&mut [u8]`) to it: every access is a raw-pointer
// copy or fill bounded by `len` (see MallocChannel::submit), so sharing the pointer between threads creates no
// aliasing references.
unsafe impl Send for Memory {}
// SAFETY: see above.
unsafe impl Sync for Memory {}

impl Drop for Memory {
    fn drop(&mut self) {
        // Unregistered before it is unmapped.
        drop(self.reg.get_mut().unwrap_or_else(|e| e.into_inner()).take());
        // SAFETY: `ptr`/`len` are the mapping made in `create`, used by nobody once the last Arc is gone.
        unsafe { reactor::dma::unmap(self.ptr, self.len) };
    }
}

struct Malloc {
    mem: Arc<Memory>,
    opts: MallocOpts,
}

/// Creates a malloc bdev.
pub fn create(mut opts: MallocOpts) -> Result<Bdev> {
    if opts.block_size == 0 || !opts.block_size.is_multiple_of(512) {
        return Err(BdevError::new(
            ErrorKind::Invalid,
            format!(
                "Data block size {} is not a multiple of 512",
                opts.block_size
            ),
        ));
    }
    if opts.num_blocks == 0 {
        return Err(BdevError::new(
            ErrorKind::Invalid,
            "Disk num_blocks must be greater than 0",
        ));
    }
    if opts.physical_block_size != 0
        && (!opts.physical_block_size.is_multiple_of(opts.block_size)
            || !opts.physical_block_size.is_power_of_two())
    {
        return Err(BdevError::new(
            ErrorKind::Invalid,
            format!(
                "Physical block size {} is not a power-of-two multiple of the block size",
                opts.physical_block_size
            ),
        ));
    }
    let len = opts
        .num_blocks
        .checked_mul(opts.block_size as u64)
        .filter(|l| *l <= isize::MAX as u64)
        .ok_or_else(|| BdevError::new(ErrorKind::Invalid, "malloc bdev size overflows"))?
        as usize;
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| format!("Malloc{}", AUTO_NAME.fetch_add(1, Ordering::Relaxed)));
    if crate::get(&name).is_some() {
        return Err(BdevError::new(
            ErrorKind::Exists,
            format!("Bdev name {name} already exists"),
        ));
    }
    let (ptr, _huge) = reactor::dma::map_anonymous(len).map_err(|e| {
        BdevError::new(
            ErrorKind::NoMemory,
            format!("{name}: cannot allocate {len} bytes: {e}"),
        )
    })?;
    let mut mem = Memory {
        ptr,
        len,
        stream_writes: reactor::stream::worth_streaming(len as u64),
        reg: Mutex::new(None),
    };
    let mapped = reactor::dma::mapped_len(len);
    let reg = reactor::memmap::register(ptr.as_ptr() as usize, mapped).map_err(|e| {
        BdevError::new(
            ErrorKind::NoMemory,
            format!("{name}: cannot register its memory: {e}"),
        )
    })?;
    *mem.reg.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(reg);
    opts.name = Some(name.clone());
    let mut p = BdevParams::new(&name, opts.block_size, opts.num_blocks);
    p.uuid = opts.uuid;
    p.product_name = "Malloc disk".into();
    p.write_cache = false;
    p.optimal_io_boundary = opts.optimal_io_boundary;
    // As SPDK's malloc: a boundary given is a boundary kept.
    p.split_on_optimal_io_boundary = opts.optimal_io_boundary > 0;
    p.physical_block_size = opts.physical_block_size;
    register(
        p,
        Box::new(Malloc {
            mem: Arc::new(mem),
            opts,
        }),
    )
}

impl BdevOps for Malloc {
    fn module_name(&self) -> &'static str {
        MODULE
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(
            t,
            IoType::Read
                | IoType::Write
                | IoType::Unmap
                | IoType::Flush
                | IoType::Reset
                | IoType::WriteZeroes
                | IoType::Compare
                | IoType::Abort
                | IoType::Copy
        )
    }

    fn create_channel(&self, _bdev: &Bdev) -> Box<dyn ModuleChannel> {
        Box::new(MallocChannel {
            mem: self.mem.clone(),
            scratch: Vec::new(),
            unfenced: false,
        })
    }

    fn write_config(&self, bdev: &Bdev) -> Option<Value> {
        Some(json!({
            "method": "bdev_malloc_create",
            "params": {
                "name": bdev.name(),
                "num_blocks": bdev.num_blocks(),
                "block_size": bdev.block_size(),
                "physical_block_size": if self.opts.physical_block_size == 0 { bdev.block_size() } else { self.opts.physical_block_size },
                "uuid": bdev.uuid().to_string(),
                "optimal_io_boundary": self.opts.optimal_io_boundary,
                "md_size": 0,
                "md_interleave": false,
                "dif_type": 0,
                "dif_is_head_of_md": false
            }
        }))
    }

    fn dump_info(&self, _bdev: &Bdev, _out: &mut Map<String, Value>) {}

    fn destruct(&self, _bdev: &Bdev) {
        // Every descriptor is closed and malloc I/O completes inside submit, so nothing uses the memory for I/O
        // any more: it leaves the memory map now even if a stray handle keeps the mapping a while longer.
        let reg = self
            .mem
            .reg
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(reg);
    }
}

struct MallocChannel {
    mem: Arc<Memory>,
    /// Compare's copies: the caller's data, then the disk's (both owned here, so they can be compared as slices).
    scratch: Vec<u8>,
    /// Streaming stores were made since the last fence. Completions made inside `submit` are delivered by the
    /// bdev layer right after this channel's next `poll`, which fences once for all of them.
    unfenced: bool,
}

impl Drop for MallocChannel {
    fn drop(&mut self) {
        // The bdev layer polls a channel until its completions are delivered, so this finds nothing to fence;
        // it keeps the guarantee should that ever change.
        if self.unfenced {
            reactor::stream::store_fence();
        }
    }
}

// Every access to the backing memory below is a raw-pointer copy (`ptr::copy_nonoverlapping` between an iovec
// and the mapping, in `BdevIo::copy_raw` or here) or fill (`ptr::write_bytes`): no `&[u8]` or `&mut [u8]` over
// the mapping is ever made, because other threads' channels copy to and from it at the same time. I/Os in flight
// together on overlapping blocks, one of them writing, race: what they read or leave is unspecified, as on a disk
// and with SPDK's memcpy. Strictly, the Rust memory model makes such a race undefined behaviour even through raw
// pointers; keeping overlapping I/Os apart is the submitters' duty, as with any block device (this bdev layer,
// like SPDK's, does not serialize I/Os). What this module guarantees is that it adds no reference whose aliasing
// rules a race could break, and that no access leaves the mapping.
impl ModuleChannel for MallocChannel {
    fn submit(&mut self, io: IoHandle) {
        let off = io.offset_bytes() as usize;
        let len = io.len_bytes() as usize;
        // The bdev layer checked the range against num_blocks, and num_blocks * block_size == mem.len.
        debug_assert!(off + len <= self.mem.len);
        // SAFETY: off + len <= mem.len (range validated at submit), so the pointer stays inside the mapping.
        let at = unsafe { self.mem.ptr.as_ptr().add(off) };
        let status = match io.io_type() {
            IoType::Read => {
                // SAFETY: `at` is valid for `len` bytes of the mapping (above), which this channel's Arc keeps
                // mapped; the iovecs hold exactly `len` bytes (checked at submit) and are writable until the
                // I/O completes (submit contract); they cannot overlap the mapping, which is private to this
                // module. Concurrent I/O on the same blocks: see above.
                unsafe { io.copy_raw(at, RawCopy::ToBuffers) };
                IoStatus::Success
            }
            IoType::Write => {
                let how = if self.mem.stream_writes {
                    RawCopy::FromBuffersStreaming
                } else {
                    RawCopy::FromBuffers
                };
                self.unfenced |= how == RawCopy::FromBuffersStreaming;
                // SAFETY: as for reads, copying the other way; the mapping is writable and the iovecs readable.
                unsafe { io.copy_raw(at, how) };
                IoStatus::Success
            }
            IoType::Unmap | IoType::WriteZeroes => {
                // SAFETY: `at..at + len` is inside the writable mapping (above).
                unsafe { std::ptr::write_bytes(at, 0, len) };
                IoStatus::Success
            }
            IoType::Compare => {
                self.scratch.resize(2 * len, 0);
                let (data, disk) = self.scratch.split_at_mut(len);
                io.copy_out(data);
                // SAFETY: `at` is valid for `len` bytes of reads (above); `disk` is `len` bytes of this channel's
                // own buffer, which cannot overlap the mapping.
                unsafe { std::ptr::copy_nonoverlapping(at, disk.as_mut_ptr(), len) };
                if data == disk {
                    IoStatus::Success
                } else {
                    IoStatus::Miscompare
                }
            }
            IoType::Copy => {
                let src = io.copy_source() as usize * io.block_size() as usize;
                debug_assert!(src + len <= self.mem.len);
                // SAFETY: the bdev layer checked the source range against num_blocks too, so `src..src + len`
                // and `at..at + len` are both inside the writable mapping; `ptr::copy` allows them to overlap.
                unsafe { std::ptr::copy(self.mem.ptr.as_ptr().add(src), at, len) };
                IoStatus::Success
            }
            IoType::Flush | IoType::Reset => IoStatus::Success,
            // Every I/O completes within its submission: none is ever left to abort (SPDK's malloc answers so).
            IoType::Abort => IoStatus::Failed(libc::ENOENT),
            IoType::NvmeAdmin | IoType::NvmeIo => IoStatus::Failed(libc::ENOTSUP),
        };
        io.complete(status);
    }

    fn poll(&mut self) -> bool {
        // Before the completions of this channel's streamed writes are delivered: whoever they tell (a guest, a
        // peer thread) must see the data.
        if std::mem::take(&mut self.unfenced) {
            reactor::stream::store_fence();
        }
        false
    }
}
