//! I/O descriptors (`BdevIo`), their per-thread pool, and completion.
//!
//! A [`IoHandle`] owns a pooled `BdevIo`; dropping it returns the descriptor to the pool of the thread that drops
//! it, so steady-state I/O allocates nothing. Data is described by iovecs that point at the caller's memory (zero
//! copy) or at a [`DmaBuf`] moved into the descriptor for the I/O's lifetime.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::rc::Rc;

use reactor::dma::DmaBuf;

use crate::channel::ChannelCore;

/// I/O types, named as SPDK's `supported_io_types` keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoType {
    /// Read blocks.
    Read,
    /// Write blocks.
    Write,
    /// Deallocate blocks.
    Unmap,
    /// Make written data durable.
    Flush,
    /// Reset the device.
    Reset,
    /// Write zeroes to blocks.
    WriteZeroes,
    /// Compare blocks with a buffer.
    Compare,
    /// Abort another I/O (the one [`BdevIo::abort_target`] names).
    Abort,
    /// An NVMe admin command passed through as is ([`BdevIo::nvme_cmd`]).
    NvmeAdmin,
    /// An NVMe I/O command passed through as is ([`BdevIo::nvme_cmd`]).
    NvmeIo,
    /// Copy blocks within the bdev, from [`BdevIo::copy_source`] to the I/O's range.
    Copy,
}

impl IoType {
    /// How many types there are (for tables indexed by type).
    pub const COUNT: usize = 11;

    /// Every type, in the order `bdev_get_bdevs` lists them.
    pub const ALL: [IoType; IoType::COUNT] = [
        IoType::Read,
        IoType::Write,
        IoType::Unmap,
        IoType::Flush,
        IoType::Reset,
        IoType::NvmeAdmin,
        IoType::NvmeIo,
        IoType::Compare,
        IoType::Abort,
        IoType::WriteZeroes,
        IoType::Copy,
    ];

    /// SPDK's key for the type.
    pub fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Unmap => "unmap",
            IoType::Flush => "flush",
            IoType::Reset => "reset",
            IoType::WriteZeroes => "write_zeroes",
            IoType::Compare => "compare",
            IoType::Abort => "abort",
            IoType::NvmeAdmin => "nvme_admin",
            IoType::NvmeIo => "nvme_io",
            IoType::Copy => "copy",
        }
    }

    /// Whether the type may modify data (refused on read-only descriptors; an NVMe command passed through is
    /// not decoded, so it counts as one, as SPDK counts it).
    pub fn is_write(self) -> bool {
        matches!(
            self,
            IoType::Write
                | IoType::Unmap
                | IoType::WriteZeroes
                | IoType::Copy
                | IoType::NvmeIo
                | IoType::NvmeAdmin
        )
    }

    /// Whether the type carries block data buffers (as many bytes as blocks; an NVMe command's buffer is
    /// sized by the command, not by blocks).
    pub fn has_data(self) -> bool {
        matches!(self, IoType::Read | IoType::Write | IoType::Compare)
    }
}

/// Outcome of an I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoStatus {
    /// Not completed yet.
    Pending,
    /// Done.
    Success,
    /// Failed with a positive errno.
    Failed(i32),
    /// The module ran out of resources; the bdev layer queues and retries it.
    NoMem,
    /// Aborted (by reset or abort).
    Aborted,
    /// Data did not match (compare).
    Miscompare,
    /// Failed with an NVMe status (SPDK's `SPDK_BDEV_IO_STATUS_NVME_ERROR`), passed through unchanged by every
    /// layer that forwards the I/O, so an NVMe-oF host sees the status the drive gave.
    Nvme(NvmeStatus),
}

/// An NVMe completion status: status code type and code, plus the host's retry hints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeStatus {
    /// Status code type (0 generic, 1 command specific, 2 media and data integrity, 3 path related).
    pub sct: u8,
    /// Status code.
    pub sc: u8,
    /// Do not retry.
    pub dnr: bool,
    /// Command retry delay selector (0..=3).
    pub crd: u8,
}

impl NvmeStatus {
    /// Generic status codes the bdev layer translates to and from.
    const GENERIC: u8 = 0;
    const SUCCESS: u8 = 0x00;
    const INTERNAL_DEVICE_ERROR: u8 = 0x06;
    const ABORTED_BY_REQUEST: u8 = 0x07;
    const MEDIA_ERROR: u8 = 2;
    const COMPARE_FAILURE: u8 = 0x85;

    /// A status with no retry hints.
    pub const fn new(sct: u8, sc: u8) -> Self {
        NvmeStatus {
            sct,
            sc,
            dnr: false,
            crd: 0,
        }
    }
}

impl IoStatus {
    /// The outcome for an NVMe completion status, as SPDK's `spdk_bdev_io_complete_nvme_status` maps it:
    /// generic success is success, generic "aborted by request" is an abort, anything else is kept as is.
    pub fn from_nvme(s: NvmeStatus) -> IoStatus {
        match (s.sct, s.sc) {
            (NvmeStatus::GENERIC, NvmeStatus::SUCCESS) => IoStatus::Success,
            (NvmeStatus::GENERIC, NvmeStatus::ABORTED_BY_REQUEST) => IoStatus::Aborted,
            _ => IoStatus::Nvme(s),
        }
    }

    /// The NVMe status to report for this outcome, as SPDK's `spdk_bdev_io_get_nvme_status` derives it: an NVMe
    /// status as given, a miscompare as "compare failure", an abort as "aborted by request", any other failure as
    /// "internal device error".
    pub fn nvme(self) -> NvmeStatus {
        match self {
            IoStatus::Success => NvmeStatus::new(NvmeStatus::GENERIC, NvmeStatus::SUCCESS),
            IoStatus::Nvme(s) => s,
            IoStatus::Miscompare => {
                NvmeStatus::new(NvmeStatus::MEDIA_ERROR, NvmeStatus::COMPARE_FAILURE)
            }
            IoStatus::Aborted => {
                NvmeStatus::new(NvmeStatus::GENERIC, NvmeStatus::ABORTED_BY_REQUEST)
            }
            _ => NvmeStatus::new(NvmeStatus::GENERIC, NvmeStatus::INTERNAL_DEVICE_ERROR),
        }
    }
}

/// The identity of an I/O while it is in flight (its descriptor's address; reused once it completes): what an
/// abort names. A module that holds I/Os finds the one to abort by comparing [`BdevIo::id`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoId(pub(crate) u64);

/// An NVMe command as its submission queue entry holds it: sixteen dwords (opcode in the low byte of the first,
/// namespace in the second, CDW10..15 in the last six).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmeCmd(pub [u32; 16]);

impl NvmeCmd {
    /// The opcode.
    pub fn opcode(&self) -> u8 {
        self.0[0] as u8
    }
    /// The namespace id.
    pub fn nsid(&self) -> u32 {
        self.0[1]
    }
}

/// What the rare I/O types carry besides a range and buffers. Allocated the first time a descriptor carries
/// such an I/O and kept with the descriptor, so these types allocate nothing per I/O either.
#[derive(Default)]
pub(crate) struct IoExt {
    pub(crate) abort_target: Option<IoId>,
    /// A copy's source, as a distance from its destination (wrapping): a virtual bdev that moves the I/O's
    /// range moves the source with it.
    pub(crate) copy_delta: u64,
    pub(crate) nvme_cmd: NvmeCmd,
    pub(crate) nvme_cdw0: u32,
    /// The aligned copy and the caller's iovecs, while bounced.
    pub(crate) bounce: Option<Bounce>,
    /// Routes of outer forwards, when a forwarded I/O is forwarded again (kept, like `iovs`, once grown).
    pub(crate) outer_routes: Vec<Route>,
}

/// One scatter-gather element, laid out as `struct iovec` so it can be handed to the kernel as is.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IoVec {
    /// Start of the element.
    pub base: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

/// Callback run on the submitting thread when an I/O completes.
pub enum Completion {
    /// Nothing to call; the descriptor goes back to the pool.
    None,
    /// A plain function; context travels in [`BdevIo::ctx`].
    Fn(fn(IoHandle)),
    /// An object of the caller's (e.g. a virtual bdev's channel).
    Sink(Rc<dyn IoSink>),
    /// A closure (control path: it allocates).
    Closure(Box<dyn FnOnce(IoHandle)>),
}

/// An object told of completions.
pub trait IoSink {
    /// Called with the completed I/O.
    fn io_done(&self, io: IoHandle);
}

/// [`BdevIo::flags`]: an owned buffer sits in `buf`.
pub(crate) const HAS_BUF: u8 = 1;
/// [`BdevIo::flags`]: the data goes through `bounce` (the caller's buffers were not aligned as required).
pub(crate) const BOUNCED: u8 = 2;
/// [`BdevIo::flags`]: a piece of a split I/O; statistics count the I/O it belongs to, not the pieces.
pub(crate) const SPLIT_CHILD: u8 = 4;
/// [`BdevIo::flags`]: issued by the holder of an LBA range lock (compare-and-write's compare and write): it
/// goes through the lock it holds.
pub(crate) const LOCK_OWNER: u8 = 8;

/// [`BdevIo::slot`] of an I/O no channel tracks.
pub(crate) const NO_SLOT: u32 = u32::MAX;

/// Inline iovec capacity reserved per descriptor; more grows the descriptor once and is kept.
const IOVS_RESERVED: usize = 16;

/// A block I/O. Fields the module reads are public through accessors; scratch space is `driver_ctx`.
///
/// Laid out by hand, one descriptor per cache-line-aligned block: at queue depth the descriptors fall out of
/// cache between submission and completion (the data copies push them out), so what completion reads
/// (status, callback, channel, tick, type, size, the caller's and the module's context words) sits in the first
/// two lines and a completion costs two misses, not four; flags in the first line say whether the owned buffer
/// (third line) or the route (fourth) need releasing, so returning a descriptor reads no other line. The route
/// saved by a forward (see [`crate::IoChannel::forward`]) fills the fourth line, so a forwarded I/O needs no
/// memory outside its descriptor either.
#[repr(C, align(64))]
pub struct BdevIo {
    pub(crate) status: IoStatus,
    pub(crate) cb: Completion,
    pub(crate) ch: Option<Rc<ChannelCore>>,
    pub(crate) submit_tick: u64,
    pub(crate) num_blocks: u64,
    pub(crate) io_type: IoType,
    /// [`HAS_BUF`], [`BOUNCED`], [`SPLIT_CHILD`]: what returning or completing the descriptor must look at, kept
    /// on the first line so that it need not read the others.
    pub(crate) flags: u8,
    /// Forwards in progress (so returning the descriptor need not look at the route's cache line).
    pub(crate) depth: u8,
    pub(crate) block_size: u32,
    /// The caller's context word (e.g. an index into its task table).
    pub ctx: u64,
    /// Scratch words for the module handling the I/O.
    pub driver_ctx: [u64; 4],
    pub(crate) iovs: Vec<IoVec>,
    pub(crate) offset_blocks: u64,
    /// The entry of the channel's in-flight table that describes this I/O while its module has it
    /// ([`NO_SLOT`]: none).
    pub(crate) slot: u32,
    pub(crate) buf: Option<DmaBuf>,
    /// What an abort, copy or NVMe command carries, a bounce, outer routes (see [`IoExt`]).
    pub(crate) ext: Option<Box<IoExt>>,
    /// The submitter's route while the I/O is forwarded (the innermost forward's).
    pub(crate) route: RouteSlot,
}

/// The route, on a cache line of its own.
#[repr(C, align(64))]
pub(crate) struct RouteSlot(pub(crate) Option<Route>);

impl BdevIo {
    fn new() -> Self {
        BdevIo {
            status: IoStatus::Pending,
            cb: Completion::None,
            ch: None,
            submit_tick: 0,
            num_blocks: 0,
            io_type: IoType::Read,
            flags: 0,
            depth: 0,
            block_size: 512,
            ctx: 0,
            driver_ctx: [0; 4],
            iovs: Vec::with_capacity(IOVS_RESERVED),
            offset_blocks: 0,
            slot: NO_SLOT,
            buf: None,
            ext: None,
            route: RouteSlot(None),
        }
    }

    /// The type.
    #[inline]
    pub fn io_type(&self) -> IoType {
        self.io_type
    }
    /// First block.
    #[inline]
    pub fn offset_blocks(&self) -> u64 {
        self.offset_blocks
    }
    /// Number of blocks.
    #[inline]
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    /// Block size of the bdev it was submitted to.
    #[inline]
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Byte offset.
    #[inline]
    pub fn offset_bytes(&self) -> u64 {
        self.offset_blocks * self.block_size as u64
    }
    /// Byte length.
    #[inline]
    pub fn len_bytes(&self) -> u64 {
        self.num_blocks * self.block_size as u64
    }
    /// The status (valid in a completion callback).
    #[inline]
    pub fn status(&self) -> IoStatus {
        self.status
    }
    /// Whether it completed successfully.
    #[inline]
    pub fn success(&self) -> bool {
        self.status == IoStatus::Success
    }
    /// The data iovecs.
    #[inline]
    pub fn iovs(&self) -> &[IoVec] {
        &self.iovs
    }
    /// The I/O's identity while in flight (what an abort names).
    #[inline]
    pub fn id(&self) -> IoId {
        IoId(self as *const BdevIo as u64)
    }
    /// The I/O an abort names (`None` for other types).
    pub fn abort_target(&self) -> Option<IoId> {
        match self.io_type {
            IoType::Abort => self.ext.as_ref().and_then(|e| e.abort_target),
            _ => None,
        }
    }
    /// The first block a copy reads (its range is where it writes).
    pub fn copy_source(&self) -> u64 {
        match (self.io_type, &self.ext) {
            (IoType::Copy, Some(e)) => self.offset_blocks.wrapping_add(e.copy_delta),
            _ => 0,
        }
    }

    /// Gives `child` what this I/O's type carries besides range and buffers (a copy's source, an NVMe
    /// command), for a virtual bdev's child I/O of the same type.
    pub(crate) fn copy_ext_to(&self, child: &mut BdevIo) {
        if let (IoType::Copy | IoType::NvmeIo | IoType::NvmeAdmin, Some(e)) =
            (self.io_type, &self.ext)
        {
            let (delta, cmd) = (e.copy_delta, e.nvme_cmd);
            let c = child.ext_mut();
            c.copy_delta = delta;
            c.nvme_cmd = cmd;
            c.nvme_cdw0 = 0;
        }
    }
    /// The command of an NVMe passthrough I/O (`None` for other types); its data buffer is [`BdevIo::iovs`].
    pub fn nvme_cmd(&self) -> Option<&NvmeCmd> {
        match self.io_type {
            IoType::NvmeAdmin | IoType::NvmeIo => self.ext.as_ref().map(|e| &e.nvme_cmd),
            _ => None,
        }
    }
    /// Dword 0 of the NVMe completion of a passthrough I/O (valid in the completion callback).
    pub fn nvme_cdw0(&self) -> u32 {
        self.ext.as_ref().map_or(0, |e| e.nvme_cdw0)
    }
    /// Sets the completion's dword 0 (a module completing an NVMe passthrough I/O; see
    /// [`IoHandle::complete_nvme`]).
    pub fn set_nvme_cdw0(&mut self, cdw0: u32) {
        self.ext_mut().nvme_cdw0 = cdw0;
    }
    /// The descriptor's extension, made on first use.
    pub(crate) fn ext_mut(&mut self) -> &mut IoExt {
        self.ext.get_or_insert_with(Box::default)
    }

    /// Takes back the buffer moved in with the I/O.
    pub fn take_buf(&mut self) -> Option<DmaBuf> {
        if self.flags & HAS_BUF == 0 {
            return None;
        }
        self.flags &= !HAS_BUF;
        self.buf.take()
    }

    /// Rewrites the range (for virtual bdevs that forward an I/O to a base at another offset).
    pub fn remap(&mut self, offset_blocks: u64) {
        self.offset_blocks = offset_blocks;
    }

    /// Copies the I/O's data into `dst` (which must be `len_bytes` long); used for writes.
    pub fn copy_out(&self, dst: &mut [u8]) {
        let mut off = 0;
        for v in &self.iovs {
            let n = v.len.min(dst.len() - off);
            // SAFETY: the iovecs were valid for `len` bytes when submitted and stay valid until completion
            // (contract of the unsafe submit functions, or an owned DmaBuf); `dst` is a distinct slice.
            unsafe { std::ptr::copy_nonoverlapping(v.base, dst[off..].as_mut_ptr(), n) };
            off += n;
        }
    }

    /// Copies `src` into the I/O's buffers; used for reads.
    pub fn copy_in(&mut self, src: &[u8]) {
        let mut off = 0;
        for v in &self.iovs {
            let n = v.len.min(src.len() - off);
            // SAFETY: as in copy_out; the caller's buffers are writable for reads by the submit contract.
            unsafe { std::ptr::copy_nonoverlapping(src[off..].as_ptr(), v.base, n) };
            off += n;
        }
    }

    /// Copies between the I/O's buffers and raw memory at `mem` (`len_bytes` long), as `how` says.
    ///
    /// # Safety
    /// `mem` must be valid for `len_bytes()` bytes of reads (or writes, when copying out of the buffers).
    pub unsafe fn copy_raw(&self, mem: *mut u8, how: RawCopy) {
        let mut off = 0usize;
        for v in &self.iovs {
            // SAFETY: iovecs are valid per the submit contract; `mem` per this function's contract; the total
            // iovec length equals len_bytes (checked at submit).
            unsafe {
                match how {
                    RawCopy::ToBuffers => {
                        std::ptr::copy_nonoverlapping(mem.add(off), v.base, v.len)
                    }
                    RawCopy::FromBuffers => {
                        std::ptr::copy_nonoverlapping(v.base, mem.add(off), v.len)
                    }
                    RawCopy::FromBuffersStreaming => {
                        reactor::stream::copy_streaming(mem.add(off), v.base, v.len)
                    }
                }
            }
            off += v.len;
        }
    }

    /// Fills the I/O's buffers with zeroes.
    pub fn zero_iovs(&mut self) {
        for v in &self.iovs {
            // SAFETY: writable iovecs per the submit contract.
            unsafe { std::ptr::write_bytes(v.base, 0, v.len) };
        }
    }

    /// Moves the I/O's data into an aligned buffer (a write's data is copied in): the caller's iovecs are kept
    /// and put back by [`BdevIo::unbounce`]. The slow path for callers whose buffers are not aligned as the bdev
    /// requires (SPDK bounces them too); it allocates.
    pub(crate) fn bounce(&mut self, align: usize) -> std::io::Result<()> {
        if self.flags & BOUNCED != 0 {
            return Err(std::io::Error::other("buffer already bounced"));
        }
        let len = self.len_bytes() as usize;
        let mut buf = DmaBuf::alloc(len)?;
        if !(buf.as_ptr() as usize).is_multiple_of(align) {
            return Err(std::io::Error::other(format!(
                "no {align}-byte aligned buffer"
            )));
        }
        if matches!(self.io_type, IoType::Write | IoType::Compare) {
            self.copy_out(buf.as_mut_slice());
        }
        let one = vec![IoVec {
            base: buf.as_ptr(),
            len,
        }];
        let orig = std::mem::replace(&mut self.iovs, one);
        self.ext_mut().bounce = Some(Bounce { buf, orig });
        self.flags |= BOUNCED;
        Ok(())
    }

    /// Gives the caller's iovecs back (a successful read's data copied into them).
    pub(crate) fn unbounce(&mut self) {
        let Some(b) = self.ext.as_mut().and_then(|e| e.bounce.take()) else {
            return;
        };
        self.flags &= !BOUNCED;
        self.iovs = b.orig;
        if self.io_type == IoType::Read && self.status == IoStatus::Success {
            self.copy_in(b.buf.as_slice());
        }
    }

    pub(crate) fn total_iov_len(&self) -> u64 {
        self.iovs.iter().map(|v| v.len as u64).sum()
    }
}

/// Cuts `len` bytes starting `off` bytes into `iovs` into `out` (cleared first): the elements that cover that
/// range, the first and last shortened to it. Stops early if `iovs` hold less.
pub fn sub_iovs(iovs: &[IoVec], mut off: u64, mut len: u64, out: &mut Vec<IoVec>) {
    out.clear();
    for v in iovs {
        if len == 0 {
            break;
        }
        let vl = v.len as u64;
        if off >= vl {
            off -= vl;
            continue;
        }
        let take = (vl - off).min(len);
        out.push(IoVec {
            // In bounds (`off < v.len`); no dereference here, so plain address arithmetic.
            base: v.base.wrapping_add(off as usize),
            len: take as usize,
        });
        len -= take;
        off = 0;
    }
}

/// An owned, pooled I/O descriptor.
///
/// The box sits in a `ManuallyDrop` rather than an `Option` so that every field access on the I/O path is a
/// plain pointer dereference, with no "is it still there" branch; `Drop` is the one place that takes it out.
pub struct IoHandle(ManuallyDrop<Box<BdevIo>>);

impl Deref for IoHandle {
    type Target = BdevIo;
    #[inline]
    fn deref(&self) -> &BdevIo {
        &self.0
    }
}

impl DerefMut for IoHandle {
    #[inline]
    fn deref_mut(&mut self) -> &mut BdevIo {
        &mut self.0
    }
}

impl IoHandle {
    /// Completes the I/O with `status`. The callback runs on this (the submitting) thread; when called from
    /// inside the module's `submit` or `poll`, right after that call returns.
    #[inline]
    pub fn complete(mut self, status: IoStatus) {
        self.status = status;
        crate::channel::complete(self);
    }

    /// Tells the layer that this I/O's data is where it goes and the I/O only waits to report (a mirror's write
    /// held until a member's failure is on disk): range locks being taken on the bdev no longer wait for it.
    pub fn settled(&self) {
        if let Some(ch) = &self.ch {
            ch.settle(self.slot);
        }
    }

    /// Completes an NVMe passthrough I/O with the device's completion: dword 0 and status (SPDK's
    /// `spdk_bdev_io_complete_nvme_status`).
    pub fn complete_nvme(mut self, cdw0: u32, status: NvmeStatus) {
        self.set_nvme_cdw0(cdw0);
        self.complete(IoStatus::from_nvme(status));
    }

    /// Starts loading what completion reads of the descriptor (its first two lines, and the route's line that a
    /// forwarded I/O needs) into cache.
    #[inline]
    pub(crate) fn prefetch(&self) {
        prefetch_lines(&**self.0 as *const BdevIo as *const i8);
    }

    /// Gives a forwarded I/O back to the bdev it was submitted to: its submitter's callback, context, channel,
    /// tick and range, as [`crate::IoChannel::forward`] saved them. Call it when the forwarded I/O comes back,
    /// before completing it or forwarding it again. Returns false (and changes nothing) when the I/O is not
    /// forwarded.
    #[inline]
    pub fn restore(&mut self) -> bool {
        let Some(r) = self.route.0.take() else {
            return false;
        };
        self.cb = r.cb;
        self.ch = r.ch;
        self.ctx = r.ctx;
        self.submit_tick = r.submit_tick;
        self.offset_blocks = r.offset_blocks;
        self.block_size = r.block_size;
        self.slot = r.slot;
        self.route.0 = if self.depth > 1 {
            self.ext.as_mut().and_then(|e| e.outer_routes.pop())
        } else {
            None
        };
        self.depth -= 1;
        true
    }

    /// Saves the submitter's route and readies the I/O for `cb`/`ctx` at `offset_blocks` (see
    /// [`crate::IoChannel::forward`]).
    #[inline(always)]
    pub(crate) fn save_route(&mut self, offset_blocks: u64, cb: Completion, ctx: u64) {
        let r = Route {
            cb: std::mem::replace(&mut self.cb, cb),
            ch: self.ch.take(),
            ctx: std::mem::replace(&mut self.ctx, ctx),
            submit_tick: self.submit_tick,
            offset_blocks: std::mem::replace(&mut self.offset_blocks, offset_blocks),
            block_size: self.block_size,
            slot: std::mem::replace(&mut self.slot, NO_SLOT),
        };
        if let Some(outer) = self.route.0.replace(r) {
            // Forwarded again by the bdev it was forwarded to (allocates once per descriptor and depth).
            self.ext_mut().outer_routes.push(outer);
        }
        self.depth += 1;
        self.status = IoStatus::Pending;
    }

    pub(crate) fn take_cb(&mut self) -> Completion {
        std::mem::replace(&mut self.cb, Completion::None)
    }
}

/// How [`BdevIo::copy_raw`] moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawCopy {
    /// From the memory into the I/O's buffers (a read).
    ToBuffers,
    /// From the I/O's buffers into the memory (a write).
    FromBuffers,
    /// As `FromBuffers`, with streaming stores that bypass the cache (see [`reactor::stream`]). They are weakly
    /// ordered: the caller runs [`reactor::stream::store_fence`] before anyone learns that the write is done.
    FromBuffersStreaming,
}

/// A bounced I/O's aligned buffer and the caller's iovecs.
pub(crate) struct Bounce {
    buf: DmaBuf,
    orig: Vec<IoVec>,
}

/// What an I/O forwarded to another bdev needs back before it completes to its submitter: the submitter's
/// callback, context, channel, submission tick and range.
pub(crate) struct Route {
    pub(crate) cb: Completion,
    pub(crate) ch: Option<Rc<ChannelCore>>,
    pub(crate) ctx: u64,
    pub(crate) submit_tick: u64,
    pub(crate) offset_blocks: u64,
    pub(crate) block_size: u32,
    pub(crate) slot: u32,
}

/// Hints the CPU to load lines 0, 1 and 3 of the descriptor at `p` (a prefetch never faults, whatever the address).
#[inline]
fn prefetch_lines(p: *const i8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: PREFETCHT0 is an SSE instruction (baseline on x86_64) with no architectural effect: it reads
        // nothing into registers and cannot fault, even on an invalid address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(128));
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(192));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

struct Pool {
    // Boxed on purpose: a descriptor keeps its address while in flight (io_uring holds pointers into it).
    #[allow(clippy::vec_box)]
    free: Vec<Box<BdevIo>>,
    allocated: usize,
    limit: usize,
    waiters: VecDeque<Box<dyn FnOnce()>>,
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { free: Vec::new(), allocated: 0, limit: 0, waiters: VecDeque::new() }) };
    static WAKING: Cell<bool> = const { Cell::new(false) };
}

/// Descriptors a thread may own at most (SPDK's `bdev_io_pool_size`).
static POOL_LIMIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(65535);

/// Sets the per-thread descriptor limit (`bdev_set_options bdev_io_pool_size`).
pub fn set_pool_limit(n: usize) {
    POOL_LIMIT.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// The per-thread descriptor limit.
pub fn pool_limit() -> usize {
    POOL_LIMIT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Takes a descriptor from this thread's pool, or `None` when the thread already owns its limit (queue a retry
/// with [`queue_io_wait`]).
#[inline]
pub fn alloc_io() -> Option<IoHandle> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if let Some(b) = p.free.pop() {
            return Some(IoHandle(ManuallyDrop::new(b)));
        }
        if p.limit == 0 {
            p.limit = pool_limit();
        }
        if p.allocated >= p.limit {
            return None;
        }
        p.allocated += 1;
        Some(IoHandle(ManuallyDrop::new(Box::new(BdevIo::new()))))
    })
}

/// Runs `f` on this thread once a descriptor is returned to its pool (SPDK's `spdk_bdev_queue_io_wait`).
pub fn queue_io_wait(f: impl FnOnce() + 'static) {
    POOL.with(|p| p.borrow_mut().waiters.push_back(Box::new(f)));
}

/// Pre-fills this thread's pool so the first I/Os do not allocate.
pub fn prefill_pool(n: usize) {
    let have: Vec<IoHandle> = (0..n).filter_map(|_| alloc_io()).collect();
    drop(have);
}

impl Drop for IoHandle {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once and nothing touches `self.0` after it, so taking the box out leaves no
        // second owner behind.
        let mut b = unsafe { ManuallyDrop::take(&mut self.0) };
        b.cb = Completion::None;
        b.ch = None;
        if b.flags & HAS_BUF != 0 {
            b.buf = None;
        }
        if b.flags & BOUNCED != 0 {
            if let Some(e) = b.ext.as_mut() {
                e.bounce = None;
            }
        }
        b.flags = 0;
        b.slot = NO_SLOT;
        b.iovs.clear();
        if b.depth > 0 {
            // Dropped while forwarded: whoever forwarded it is gone; release what the routes hold.
            b.route.0 = None;
            if let Some(e) = b.ext.as_mut() {
                e.outer_routes.clear();
            }
            b.depth = 0;
        }
        b.status = IoStatus::Pending;
        let waiter = POOL.with(|p| {
            let mut p = p.borrow_mut();
            p.free.push(b);
            p.waiters.pop_front()
        });
        if let Some(w) = waiter {
            // A waiter that allocates and drops again must not recurse without bound.
            if WAKING.with(|x| x.replace(true)) {
                POOL.with(|p| p.borrow_mut().waiters.push_front(w));
            } else {
                w();
                WAKING.with(|x| x.set(false));
            }
        }
    }
}

/// Builds an I/O ready to submit.
#[inline(always)]
pub(crate) fn build(
    io_type: IoType,
    offset_blocks: u64,
    num_blocks: u64,
    cb: Completion,
    ctx: u64,
) -> Option<IoHandle> {
    let mut io = alloc_io()?;
    io.io_type = io_type;
    io.offset_blocks = offset_blocks;
    io.num_blocks = num_blocks;
    io.cb = cb;
    io.ctx = ctx;
    io.status = IoStatus::Pending;
    Some(io)
}

#[cfg(test)]
mod sub_iovs_tests {
    use super::*;

    #[test]
    fn cuts_ranges_across_elements() {
        let mut a = [0u8; 100];
        let mut b = [0u8; 50];
        let iovs = [
            IoVec {
                base: a.as_mut_ptr(),
                len: 100,
            },
            IoVec {
                base: b.as_mut_ptr(),
                len: 50,
            },
        ];
        let mut out = Vec::new();
        sub_iovs(&iovs, 90, 30, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].base, out[0].len), (a[90..].as_mut_ptr(), 10));
        assert_eq!((out[1].base, out[1].len), (b.as_mut_ptr(), 20));
        sub_iovs(&iovs, 100, 50, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len, 50);
        // Asking past the end gives what there is.
        sub_iovs(&iovs, 140, 100, &mut out);
        assert_eq!((out.len(), out[0].len), (1, 10));
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn completion_fields_fit_two_cache_lines() {
        let io = BdevIo::new();
        let base = &io as *const BdevIo as usize;
        let end = |p: usize, len: usize| p - base + len;
        assert_eq!(std::mem::align_of::<BdevIo>(), 64);
        assert!(end(&io.driver_ctx as *const _ as usize, 32) <= 128);
        assert!(end(&io.ctx as *const _ as usize, 8) <= 128);
        assert!(end(&io.block_size as *const _ as usize, 4) <= 64);
        assert!(end(&io.depth as *const _ as usize, 1) <= 64);
        assert!(end(&io.flags as *const _ as usize, 1) <= 64);
        let route = &io.route as *const _ as usize;
        assert!(route - base >= 192 && end(route, std::mem::size_of::<Option<Route>>()) <= 256);
        assert_eq!(std::mem::size_of::<BdevIo>(), 256);
    }
}
