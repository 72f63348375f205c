//! A PCIe submission/completion queue pair (SPDK's `nvme_pcie_qpair`), polled by the thread that owns it.
//!
//! Both rings live in DMA memory from the core's pools (so they are in the memory map and the device reaches
//! them by IOVA). A submission writes the command into the submission ring and only marks the tail doorbell
//! dirty: [`PcieQpair::poll`] rings it once for everything submitted since, then reaps completions by phase tag
//! and rings the completion head doorbell once for all it took. Command identifiers are slots; each slot owns one
//! 4 KiB page for its PRP list (or SGL descriptors, when PRPs cannot describe the buffers and the controller
//! takes SGLs), so building a command allocates nothing.
//!
//! What the device writes is checked before use: a completion naming a command identifier that is not
//! outstanding is logged and dropped (its slot is not touched), so a confused device can fail commands but not
//! complete someone else's.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme_proto::cmd::{psdt, sgl, Cqe, SglDesc, Sqe};
use nvme_proto::host::{command_data, report_expired, CmdTimeout, Dir, Iov, SubmitError};
use nvme_proto::status::{generic, Status};
use reactor::dma::DmaBuf;
use reactor::memmap::TranslationCache;

use crate::bar::Bar;

/// Size of a submission queue entry.
const SQE_SIZE: usize = 64;
/// Memory page size the queues use (CC.MPS = 0).
pub const PAGE: usize = 4096;
/// PRP entries in one list page.
const PRP_PER_PAGE: usize = PAGE / 8;
/// Largest transfer one command can carry with a single PRP list page: the first page (possibly partial) plus a
/// full list.
pub const MAX_XFER_PRP: u32 = (PRP_PER_PAGE * PAGE) as u32;

/// Doorbell register offsets of queue `qid` for stride `dstrd` (CAP.DSTRD): (submission tail, completion head).
pub fn doorbells(qid: u16, dstrd: u8) -> (usize, usize) {
    let stride = 4usize << dstrd;
    let sq = 0x1000 + 2 * qid as usize * stride;
    (sq, sq + stride)
}

struct Slot {
    busy: bool,
    token: u64,
    deadline: Option<Instant>,
}

/// The rings' memory, which must outlive the device's use of it (see [`PcieQpair::into_memory`]).
pub struct QueueMemory {
    sq: DmaBuf,
    cq: DmaBuf,
    prp: DmaBuf,
}

impl std::fmt::Debug for QueueMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QueueMemory(sq {:p}, cq {:p})",
            self.sq.as_ptr(),
            self.cq.as_ptr()
        )
    }
}

/// A PCIe queue pair.
pub struct PcieQpair {
    bar: Arc<Bar>,
    qid: u16,
    depth: u16,
    mem: QueueMemory,
    sq_iova: u64,
    cq_iova: u64,
    prp_iova: u64,
    sq_db: usize,
    cq_db: usize,
    sq_tail: u16,
    cq_head: u16,
    phase: bool,
    /// Commands written since the tail doorbell was last rung.
    unrung: bool,
    /// Tail and head doorbell writes so far (SPDK's `sq_mmio_doorbell_updates`, `cq_mmio_doorbell_updates`).
    doorbells: (u64, u64),
    slots: Vec<Slot>,
    free: Vec<u16>,
    xl: TranslationCache,
    max_xfer: u32,
    /// The command timeout.
    timeout: CmdTimeout,
    error: Option<String>,
    /// Completions dropped because they named no outstanding command.
    bogus: u64,
    /// SGLs may describe what PRPs cannot (the controller supports them): `Some(dword_aligned)`.
    sgl: Option<bool>,
    /// Cleared when the controller instance this queue was created on is gone (reset, detached): its queue id
    /// and doorbells may belong to a new queue by then, so this one must not touch them.
    live: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for PcieQpair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PcieQpair(qid {}, depth {})", self.qid, self.depth)
    }
}

impl PcieQpair {
    /// A queue pair `qid` of `depth` entries (at least 2) on the controller whose registers are `bar`, doorbell
    /// stride `dstrd`, at most `max_xfer` bytes per command; buffers are translated to IOVAs through `xl`. The
    /// rings are allocated here, empty; the controller learns of them through AQA/ASQ/ACQ (admin) or Create I/O
    /// CQ/SQ ([`PcieQpair::sq_iova`], [`PcieQpair::cq_iova`]).
    pub fn new(
        bar: Arc<Bar>,
        qid: u16,
        depth: u16,
        dstrd: u8,
        max_xfer: u32,
        mut xl: TranslationCache,
    ) -> std::io::Result<PcieQpair> {
        let depth = depth.max(2);
        let n = depth as usize;
        let sq = DmaBuf::alloc(n * SQE_SIZE)?;
        let cq = DmaBuf::alloc(n * Cqe::SIZE)?;
        let prp = DmaBuf::alloc((n - 1) * PAGE)?;
        let mut iova = |b: &DmaBuf| -> std::io::Result<u64> {
            match xl.translate(b.as_ptr() as usize, b.len()) {
                Some((a, l)) if l == b.len() && a % PAGE as u64 == 0 => Ok(a),
                _ => Err(std::io::Error::other(
                    "queue memory is not mapped for the device",
                )),
            }
        };
        let (sq_iova, cq_iova, prp_iova) = (iova(&sq)?, iova(&cq)?, iova(&prp)?);
        let (sq_db, cq_db) = doorbells(qid, dstrd);
        if cq_db + 4 > bar.len() {
            return Err(std::io::Error::other(format!(
                "queue {qid}: doorbell {cq_db:#x} outside BAR0"
            )));
        }
        Ok(PcieQpair {
            bar,
            qid,
            depth,
            mem: QueueMemory { sq, cq, prp },
            sq_iova,
            cq_iova,
            prp_iova,
            sq_db,
            cq_db,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            unrung: false,
            doorbells: (0, 0),
            slots: (0..n - 1)
                .map(|_| Slot {
                    busy: false,
                    token: 0,
                    deadline: None,
                })
                .collect(),
            free: (0..n as u16 - 1).rev().collect(),
            xl,
            max_xfer: max_xfer.min(MAX_XFER_PRP),
            timeout: CmdTimeout::default(),
            error: None,
            bogus: 0,
            sgl: None,
            live: None,
        })
    }

    /// Lets commands whose buffers PRPs cannot describe (pieces that do not join on page boundaries) go with
    /// an SGL instead, for a controller that supports them on I/O queues (Identify SGLS); `dword_aligned` when
    /// it asks for dword-aligned data blocks (SGLS 10b). SPDK's driver does the same.
    pub fn enable_sgl(&mut self, dword_aligned: bool) {
        self.sgl = Some(dword_aligned);
    }

    /// Ties the queue to its controller instance: once `live` is false, polling fails the queue (its commands
    /// complete with "aborted, SQ deleted") instead of ringing doorbells that may be another queue's by then.
    pub fn set_liveness(&mut self, live: Arc<AtomicBool>) {
        self.live = Some(live);
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Entries per ring.
    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// IOVA of the submission ring.
    pub fn sq_iova(&self) -> u64 {
        self.sq_iova
    }

    /// IOVA of the completion ring.
    pub fn cq_iova(&self) -> u64 {
        self.cq_iova
    }

    /// Whether commands may be submitted.
    pub fn ready(&self) -> bool {
        self.error.is_none()
    }

    /// Why the queue pair failed, once it has.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Commands submitted and not completed.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Doorbell writes so far: (submission tail, completion head).
    pub fn doorbell_writes(&self) -> (u64, u64) {
        self.doorbells
    }

    /// Completions dropped because they named no outstanding command.
    pub fn bogus_completions(&self) -> u64 {
        self.bogus
    }

    /// Writes command `sqe` (its command identifier is set here, and its PRPs unless `dir` is [`Dir::None`]) with
    /// data `iovs` moving as `dir` into the submission ring; the next [`PcieQpair::poll`] rings the doorbell, and
    /// reports the completion with `token`.
    ///
    /// # Safety
    /// The iovecs must stay valid (writable for [`Dir::FromCtrl`]) and not be otherwise accessed until the
    /// command completes or the queue pair's memory is released after the device let go of it.
    pub unsafe fn submit(
        &mut self,
        mut sqe: Sqe,
        iovs: &[Iov],
        dir: Dir,
        token: u64,
    ) -> Result<(), SubmitError> {
        if self.error.is_some() {
            return Err(SubmitError::NotReady);
        }
        let (iovs, _) = command_data(iovs, dir, self.max_xfer)?;
        let Some(cid) = self.free.pop() else {
            return Err(SubmitError::Full);
        };
        let dptr = match self.build_prps(cid, iovs) {
            Some(p) => Some(Ok(p)),
            None => self.build_sgl(cid, iovs).map(Err),
        };
        let Some(dptr) = dptr else {
            self.free.push(cid);
            return Err(SubmitError::BadBuffer);
        };
        sqe.set_cid(cid);
        // No fused pairs: a command passed through from elsewhere must not carry a FUSE bit whose partner never
        // comes.
        let (prp1, prp2) = match dptr {
            Ok(p) => {
                sqe.set_flags(0, psdt::PRP);
                p
            }
            Err(desc) => {
                sqe.set_flags(0, psdt::SGL_MPTR_CONTIG);
                sqe.set_sgl1(&desc);
                (0, 0)
            }
        };
        // A command without data keeps the pointer its caller put there (Create I/O CQ/SQ carry the ring's IOVA
        // in PRP1).
        if dir != Dir::None && sqe.psdt() == psdt::PRP {
            sqe.set_prp(prp1, prp2);
        }
        let s = &mut self.slots[cid as usize];
        s.busy = true;
        s.token = token;
        s.deadline = self.timeout.deadline(sqe.opc());
        let at = self.sq_tail as usize * SQE_SIZE;
        // SAFETY: `at` is inside the submission ring (tail < depth); the device reads this entry only after the
        // tail doorbell covers it, which `poll` rings after a release fence.
        unsafe {
            std::ptr::copy_nonoverlapping(sqe.0.as_ptr(), self.mem.sq.as_ptr().add(at), SQE_SIZE)
        };
        self.sq_tail = (self.sq_tail + 1) % self.depth;
        self.unrung = true;
        Ok(())
    }

    /// PRP1 and PRP2 for `iovs` (the list, when one is needed, in slot `cid`'s page); `None` when a piece is not
    /// in the memory map or the pieces do not join on page boundaries as PRPs require.
    fn build_prps(&mut self, cid: u16, iovs: &[Iov]) -> Option<(u64, u64)> {
        let list = self.prp_iova + cid as u64 * PAGE as u64;
        // SAFETY: slot `cid`'s list page is ours (the slot was free until now) and PRP_PER_PAGE entries long.
        let page = unsafe { self.mem.prp.as_ptr().add(cid as usize * PAGE) }.cast::<u64>();
        let mut prp1 = 0u64;
        let mut entries = 0usize;
        // Where the data so far ends (a following piece must start a page, and this must end one).
        let mut end: Option<u64> = None;
        for v in iovs {
            let mut addr = v.base as usize;
            let mut left = v.len;
            while left > 0 {
                let (iova, n) = self.xl.translate(addr, left)?;
                if n == 0 {
                    return None;
                }
                match end {
                    None => {
                        if iova % 4 != 0 {
                            return None;
                        }
                        prp1 = iova;
                    }
                    Some(e) => {
                        // Contiguous IOVAs continue the same page run; anything else must join on page
                        // boundaries.
                        if e != iova && (e % PAGE as u64 != 0 || iova % PAGE as u64 != 0) {
                            return None;
                        }
                    }
                }
                // Every page start after the first one the data touches is an entry.
                let stop = iova + n as u64;
                let mut p = match end {
                    Some(e) if e == iova && e % PAGE as u64 != 0 => {
                        iova.next_multiple_of(PAGE as u64)
                    }
                    None => (iova & !(PAGE as u64 - 1)) + PAGE as u64,
                    _ => iova,
                };
                while p < stop {
                    if entries == PRP_PER_PAGE {
                        return None;
                    }
                    // SAFETY: entries < PRP_PER_PAGE: inside slot `cid`'s list page.
                    unsafe { page.add(entries).write(p) };
                    entries += 1;
                    p += PAGE as u64;
                }
                end = Some(stop);
                addr += n;
                left -= n;
            }
        }
        let prp2 = match entries {
            0 => 0,
            // SAFETY: written above.
            1 => unsafe { page.read() },
            _ => list,
        };
        Some((prp1, prp2))
    }

    /// The SGL for `iovs` when the controller takes SGLs: one data block descriptor for one piece, else a last
    /// segment descriptor naming a list of them in slot `cid`'s page (256 at most); `None` when SGLs are off,
    /// a piece is not in the memory map, or the pieces are too many or not aligned as the controller asks.
    fn build_sgl(&mut self, cid: u16, iovs: &[Iov]) -> Option<SglDesc> {
        let dword = self.sgl?;
        const PER_PAGE: usize = PAGE / 16;
        let list = self.prp_iova + cid as u64 * PAGE as u64;
        let mut n = 0usize;
        let mut first = SglDesc::default();
        for v in iovs {
            let (mut addr, mut left) = (v.base as usize, v.len);
            while left > 0 {
                let (iova, len) = self.xl.translate(addr, left)?;
                if len == 0 || n == PER_PAGE || (dword && (iova % 4 != 0 || !len.is_multiple_of(4)))
                {
                    return None;
                }
                let d = SglDesc {
                    addr: iova,
                    len: len as u32,
                    key: 0,
                    ty: sgl::TYPE_DATA_BLOCK,
                    subtype: sgl::SUBTYPE_ADDRESS,
                };
                if n == 0 {
                    first = d;
                }
                let mut b = [0u8; 16];
                d.encode(&mut b);
                let at = cid as usize * PAGE + n * 16;
                self.prp_page_mut()[at..at + 16].copy_from_slice(&b);
                n += 1;
                addr += len;
                left -= len;
            }
        }
        if n <= 1 {
            return Some(first);
        }
        Some(SglDesc {
            addr: list,
            len: (n * 16) as u32,
            key: 0,
            ty: sgl::TYPE_LAST_SEGMENT,
            subtype: sgl::SUBTYPE_ADDRESS,
        })
    }

    fn prp_page_mut(&mut self) -> &mut [u8] {
        self.mem.prp.as_mut_slice()
    }

    /// Rings the tail doorbell for what was submitted, reaps completions (each to `done` with its token) and rings
    /// the head doorbell; whether anything happened.
    pub fn poll(&mut self, done: &mut dyn FnMut(u64, Cqe)) -> bool {
        if self.error.is_some() {
            return false;
        }
        if self
            .live
            .as_ref()
            .is_some_and(|l| !l.load(Ordering::Acquire))
        {
            self.fail("controller reset or detached", done);
            return true;
        }
        if self.unrung {
            // The entries must be in memory before the device hears of them.
            fence(Ordering::Release);
            self.bar.write32(self.sq_db, self.sq_tail as u32);
            self.unrung = false;
            self.doorbells.0 += 1;
        }
        let mut reaped = false;
        loop {
            let at = self.cq_head as usize * Cqe::SIZE;
            // SAFETY: `at` is inside the completion ring; the device writes it, so it is read with volatile
            // loads, the status (with the phase tag) first.
            let st = unsafe {
                self.mem
                    .cq
                    .as_ptr()
                    .add(at + 12)
                    .cast::<u32>()
                    .read_volatile()
            };
            if ((st >> 16) & 1 != 0) != self.phase {
                break;
            }
            // The rest of the entry is read after its phase tag was seen.
            fence(Ordering::Acquire);
            let mut b = [0u8; 16];
            for (i, w) in b.chunks_exact_mut(4).enumerate() {
                // SAFETY: as above, the entry's four dwords.
                let d = unsafe {
                    self.mem
                        .cq
                        .as_ptr()
                        .add(at + 4 * i)
                        .cast::<u32>()
                        .read_volatile()
                };
                w.copy_from_slice(&d.to_le_bytes());
            }
            let cqe = Cqe::decode(&b);
            self.cq_head += 1;
            if self.cq_head == self.depth {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            reaped = true;
            let cid = cqe.cid as usize;
            match self.slots.get_mut(cid) {
                Some(s) if s.busy => {
                    s.busy = false;
                    s.deadline = None;
                    let token = s.token;
                    self.free.push(cid as u16);
                    done(token, cqe);
                }
                _ => {
                    self.bogus += 1;
                    log::error!(
                        "nvme_pcie: queue {}: completion for command {cid}, which is not outstanding: dropped",
                        self.qid
                    );
                }
            }
        }
        if reaped {
            self.bar.write32(self.cq_db, self.cq_head as u32);
            self.doorbells.1 += 1;
        }
        reaped
    }

    /// Sets how long a command may be outstanding before [`PcieQpair::expired`] reports it (commands submitted
    /// from now on); commands of opcode `untimed_opc` are never reported.
    pub fn set_timeout(&mut self, t: Option<Duration>, untimed_opc: Option<u8>) {
        self.timeout.set(t, untimed_opc);
    }

    /// Reports, once each, the commands outstanding past their deadline at `now`: (command id, token).
    pub fn expired(&mut self, now: Instant, f: &mut dyn FnMut(u16, u64)) {
        let slots = self
            .slots
            .iter_mut()
            .map(|s| (s.busy, &mut s.deadline, s.token));
        report_expired(slots, now, f);
    }

    /// Fails the queue pair: commands still in it complete through `done` with "aborted, SQ deleted", and no
    /// more are taken. The caller makes sure the device no longer works on them (queue deleted, controller
    /// disabled or gone) before it releases their buffers and [`PcieQpair::into_memory`].
    pub fn fail(&mut self, why: &str, done: &mut dyn FnMut(u64, Cqe)) {
        if self.error.is_none() {
            log::debug!("nvme_pcie: queue {}: {why}", self.qid);
            self.error = Some(why.to_string());
        }
        // Commands written since the last poll are reported aborted here: the device must never hear of them.
        self.unrung = false;
        for cid in 0..self.slots.len() {
            if self.slots[cid].busy {
                self.slots[cid].busy = false;
                self.free.push(cid as u16);
                done(
                    self.slots[cid].token,
                    Cqe {
                        cid: cid as u16,
                        sqid: self.qid,
                        status: Status::generic(generic::ABORTED_SQ_DELETION),
                        ..Default::default()
                    },
                );
            }
        }
    }

    /// The rings' memory, to keep until the device has let go of the queue.
    pub fn into_memory(self) -> QueueMemory {
        self.mem
    }
}
