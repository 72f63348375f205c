//! The PCIe driver's lower half against a software model of an NVMe controller.
//!
//! The model's BAR0 is ordinary memory (atomics the driver reaches through [`Bar`]); the test calls
//! [`Model::step`] between driver polls, on the same thread, so the model is a state machine and nothing races
//! (the shutdown test alone steps it on a second thread, as a device would run beside the host). IOVAs are
//! virtual addresses (an identity memory map), so the model reaches the rings, PRP lists and buffers through
//! them, after checking that the memory map holds the range (DMA outside it is recorded as a host error).

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme_pcie::qpair::{doorbells, MAX_XFER_PRP, PAGE};
use nvme_pcie::{Bar, PcieCtrlr, PcieQpair};
use nvme_proto::cmd::{admin, io, psdt, sgl, Cqe, SglDesc, Sqe};
use nvme_proto::fabrics::{cc, csts, reg, Cap};
use nvme_proto::host::{Dir, Iov, SubmitError};
use nvme_proto::identify::{padded_str, set_space_padded, CtrlrData, LbaFormat, NsData};
use nvme_proto::status::{generic, specific, Status};
use reactor::dma::DmaBuf;
use reactor::memmap::{MemEvent, MemMap, TranslationCache};

/// Size of the model's BAR0: registers, then the doorbells from 0x1000 (stride 4).
const BAR_LEN: usize = 16 << 10;
const CAP: usize = reg::CAP as usize;
const VS: usize = reg::VS as usize;
const CC: usize = reg::CC as usize;
const CSTS: usize = reg::CSTS as usize;
const AQA: usize = reg::AQA as usize;
const ASQ: usize = reg::ASQ as usize;
const ACQ: usize = reg::ACQ as usize;
const VS_1_4: u32 = 0x0001_0400;
/// CAP.MQES (0-based): 1024-entry queues at most.
const MQES: u16 = 1023;
/// I/O queue ids 1..=this exist.
const MAX_IO_QUEUES: u16 = 8;
/// The RAM disk: namespace 1, 512-byte blocks, 4 MiB (room for one 2 MiB transfer).
const BLOCK: usize = 512;
const DISK_BLOCKS: u64 = 8192;
const SN: &str = "MODEL-0001";
const MN: &str = "nvme-pcie software model";
const FR: &str = "1.0";
/// Identify MDTS: 2^9 pages, 2 MiB.
const MDTS: u8 = 9;
const ADMIN_DEPTH: u16 = 32;
/// The page size as an IOVA.
const PG: u64 = PAGE as u64;
const ADMIN_XFER: u32 = 128 << 10;
/// Command specific status "Completion Queue Invalid" (Create I/O SQ) and "Invalid Queue Deletion" (Delete
/// I/O CQ).
const CQ_INVALID: u8 = 0x00;
const INVALID_QUEUE_DELETION: u8 = 0x0c;

/// The model's register file, shared with the [`Bar`] the driver reads and writes.
struct ModelRegs {
    words: Box<[AtomicU32]>,
}

impl ModelRegs {
    fn get(&self, off: usize) -> u32 {
        self.words[off / 4].load(Ordering::SeqCst)
    }

    fn set(&self, off: usize, v: u32) {
        self.words[off / 4].store(v, Ordering::SeqCst)
    }

    fn get64(&self, off: usize) -> u64 {
        self.get(off) as u64 | (self.get(off + 4) as u64) << 32
    }

    fn set64(&self, off: usize, v: u64) {
        self.set(off, v as u32);
        self.set(off + 4, (v >> 32) as u32);
    }
}

/// How the model misbehaves, if it does.
#[derive(Clone, Copy, Debug)]
struct Behaviour {
    /// CAP.TO, in 500 ms units.
    to: u8,
    /// CSTS.RDY never follows CC.EN to 1.
    never_ready: bool,
    /// CSTS.RDY never follows CC.EN to 0.
    never_disables: bool,
    /// Setting CC.EN raises CSTS.CFS instead of RDY.
    cfs_on_enable: bool,
    /// CC.SHN is answered with SHST complete.
    shutdown_completes: bool,
    /// Starts as the last owner left it: enabled and ready, with stale admin queue registers.
    left_enabled: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            to: 1,
            never_ready: false,
            never_disables: false,
            cfs_on_enable: false,
            shutdown_completes: true,
            left_enabled: false,
        }
    }
}

struct Sq {
    base: u64,
    size: u16,
    head: u16,
    cqid: u16,
}

struct Cq {
    base: u64,
    size: u16,
    tail: u16,
    phase: bool,
}

/// How one command's data pointer was walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PrpUse {
    prp1: u64,
    prp2: u64,
    /// Pieces of contiguous memory (one per page touched).
    segs: usize,
    /// PRP2 pointed to a PRP list.
    list: bool,
}

struct Model {
    regs: Arc<ModelRegs>,
    /// The memory map's translations: every DMA of the model must fall in a registered region.
    xl: TranslationCache,
    b: Behaviour,
    ready: bool,
    gone: bool,
    sqs: BTreeMap<u16, Sq>,
    cqs: BTreeMap<u16, Cq>,
    disk: Vec<u8>,
    /// Commands of I/O queues are fetched but not executed until [`Model::release`].
    hold_io: bool,
    held: Vec<(u16, Sqe)>,
    /// Every command executed: (queue id, command).
    executed: Vec<(u16, Sqe)>,
    prp_log: Vec<PrpUse>,
    /// Descriptors of each SGL walked.
    sgl_log: Vec<usize>,
    /// What the host did wrong, as the model saw it.
    errors: Vec<String>,
}

impl Model {
    /// A model controller and the registers the driver reaches it by; DMA is checked against `map`.
    fn new(map: &MemMap, b: Behaviour) -> (Model, Arc<Bar>) {
        let regs = Arc::new(ModelRegs {
            words: (0..BAR_LEN / 4).map(|_| AtomicU32::new(0)).collect(),
        });
        let cap = Cap {
            mqes: MQES,
            cqr: true,
            to: b.to,
            dstrd: 0,
            css: 1,
            ..Default::default()
        };
        regs.set64(CAP, cap.to_u64());
        regs.set(VS, VS_1_4);
        let base = NonNull::new(regs.words.as_ptr() as *mut u8).expect("boxed slice");
        // SAFETY: `regs.words` is BAR_LEN bytes of atomics (interior mutability, so writes through this pointer
        // are allowed) that stay allocated while the Bar holds `regs` as its owner; plain memory takes aligned
        // 32-bit volatile accesses.
        let bar = unsafe { Bar::new(base, BAR_LEN, regs.clone()) };
        let mut m = Model {
            regs,
            xl: map.cache(),
            b,
            ready: false,
            gone: false,
            sqs: BTreeMap::new(),
            cqs: BTreeMap::new(),
            disk: vec![0; DISK_BLOCKS as usize * BLOCK],
            hold_io: false,
            held: Vec::new(),
            executed: Vec::new(),
            prp_log: Vec::new(),
            sgl_log: Vec::new(),
            errors: Vec::new(),
        };
        if b.left_enabled {
            m.regs.set(AQA, 0x00ff_00ff);
            m.regs.set64(ASQ, 0xdead_0000);
            m.regs.set64(ACQ, 0xbeef_0000);
            m.regs
                .set(CC, cc::EN | 6 << cc::IOSQES_SHIFT | 4 << cc::IOCQES_SHIFT);
            m.regs.set(CSTS, csts::RDY);
            m.ready = true;
        }
        (m, Arc::new(bar))
    }

    fn error(&mut self, e: String) {
        self.errors.push(e);
    }

    /// The device is surprise-removed: every register reads all ones from now on.
    fn vanish(&mut self) {
        self.gone = true;
        for w in self.regs.words.iter() {
            w.store(u32::MAX, Ordering::SeqCst);
        }
    }

    /// One round of the controller's work: CC into CSTS, then every submission queue up to its tail doorbell.
    fn step(&mut self) {
        if self.gone {
            return;
        }
        let ccv = self.regs.get(CC);
        let mut st = self.regs.get(CSTS);
        if ccv & cc::EN == 0 {
            if (self.ready || st & (csts::RDY | csts::CFS) != 0) && !self.b.never_disables {
                self.reset();
                st &= !(csts::RDY | csts::CFS);
            }
        } else if !self.ready && st & csts::CFS == 0 {
            if self.b.cfs_on_enable {
                st |= csts::CFS;
            } else if !self.b.never_ready && self.enable(ccv) {
                st |= csts::RDY;
            }
        }
        let shst = 3 << csts::SHST_SHIFT;
        if (ccv >> cc::SHN_SHIFT) & cc::SHN_MASK == 0 {
            st &= !shst;
        } else if self.b.shutdown_completes {
            st = (st & !shst) | csts::SHST_COMPLETE << csts::SHST_SHIFT;
        }
        self.regs.set(CSTS, st);
        if self.ready {
            self.process();
        }
    }

    /// Controller reset (CC.EN cleared): queues gone, doorbells back to zero.
    fn reset(&mut self) {
        self.ready = false;
        self.sqs.clear();
        self.cqs.clear();
        self.held.clear();
        for off in (0x1000..BAR_LEN).step_by(4) {
            self.regs.set(off, 0);
        }
    }

    /// CC.EN set: takes the admin queue from AQA/ASQ/ACQ; whether the controller can become ready.
    fn enable(&mut self, ccv: u32) -> bool {
        if (ccv >> cc::IOSQES_SHIFT) & 0xf != 6 || (ccv >> cc::IOCQES_SHIFT) & 0xf != 4 {
            self.error(format!(
                "CC {ccv:#x}: I/O queue entry sizes are not 64/16 bytes"
            ));
        }
        if (ccv >> cc::MPS_SHIFT) & 0xf != 0 || (ccv >> cc::CSS_SHIFT) & 0x7 != 0 {
            self.error(format!(
                "CC {ccv:#x}: page size or command set not supported"
            ));
            return false;
        }
        let aqa = self.regs.get(AQA);
        let (asqs, acqs) = ((aqa & 0xfff) as u16 + 1, ((aqa >> 16) & 0xfff) as u16 + 1);
        let (asq, acq) = (self.regs.get64(ASQ), self.regs.get64(ACQ));
        if asqs < 2 || acqs < 2 || !asq.is_multiple_of(PG) || !acq.is_multiple_of(PG) {
            self.error(format!(
                "admin queue AQA {aqa:#x} ASQ {asq:#x} ACQ {acq:#x} is not valid"
            ));
            return false;
        }
        self.sqs.insert(
            0,
            Sq {
                base: asq,
                size: asqs,
                head: 0,
                cqid: 0,
            },
        );
        self.cqs.insert(
            0,
            Cq {
                base: acq,
                size: acqs,
                tail: 0,
                phase: true,
            },
        );
        self.ready = true;
        true
    }

    /// Fetches and runs what every submission queue holds up to its tail doorbell.
    fn process(&mut self) {
        let qids: Vec<u16> = self.sqs.keys().copied().collect();
        for qid in qids {
            // An admin command may have deleted this queue.
            while let Some(sq) = self.sqs.get(&qid) {
                let (base, size, head, cqid) = (sq.base, sq.size, sq.head, sq.cqid);
                let tail = self.regs.get(doorbells(qid, 0).0);
                if tail >= size as u32 {
                    self.error(format!(
                        "SQ {qid}: tail doorbell {tail} past the queue ({size})"
                    ));
                    break;
                }
                if tail == head as u32 || !self.cq_room(cqid) {
                    break;
                }
                let mut b = [0u8; 64];
                if self.dma_read(base + head as u64 * 64, &mut b).is_err() {
                    break;
                }
                let sqe = Sqe(b);
                if let Some(sq) = self.sqs.get_mut(&qid) {
                    sq.head = (head + 1) % size;
                }
                if qid != 0 && self.hold_io {
                    self.held.push((qid, sqe));
                    continue;
                }
                let (st, dw0) = self.execute(qid, &sqe);
                self.complete(qid, sqe.cid(), st, dw0);
            }
        }
    }

    /// Runs the held commands and posts their completions.
    fn release(&mut self) {
        for (qid, sqe) in std::mem::take(&mut self.held) {
            if self.sqs.contains_key(&qid) {
                let (st, dw0) = self.execute(qid, &sqe);
                self.complete(qid, sqe.cid(), st, dw0);
            }
        }
    }

    fn execute(&mut self, qid: u16, sqe: &Sqe) -> (Status, u32) {
        self.executed.push((qid, *sqe));
        let r = if qid == 0 {
            self.admin(sqe)
        } else {
            self.io(qid, sqe)
        };
        match r {
            Ok(dw0) => (Status::SUCCESS, dw0),
            Err(st) => (st, 0),
        }
    }

    fn admin(&mut self, sqe: &Sqe) -> Result<u32, Status> {
        let qid = sqe.cdw(10) as u16;
        let qsize = (sqe.cdw(10) >> 16) + 1;
        match sqe.opc() {
            admin::IDENTIFY => {
                let mut data = vec![0u8; 4096];
                match sqe.cdw(10) & 0xff {
                    1 => {
                        let mut d = CtrlrData {
                            vid: 0x1b36,
                            ssvid: 0x1af4,
                            mdts: MDTS,
                            cntlid: 1,
                            ver: VS_1_4,
                            sqes: 0x66,
                            cqes: 0x44,
                            nn: 1,
                            ..Default::default()
                        };
                        set_space_padded(&mut d.sn, SN).expect("sn");
                        set_space_padded(&mut d.mn, MN).expect("mn");
                        set_space_padded(&mut d.fr, FR).expect("fr");
                        d.encode(&mut data);
                    }
                    0 if sqe.nsid() == 1 => {
                        let mut d = NsData {
                            nsze: DISK_BLOCKS,
                            ncap: DISK_BLOCKS,
                            nuse: DISK_BLOCKS,
                            ..Default::default()
                        };
                        d.lbaf[0] = LbaFormat {
                            lbads: 9,
                            ..Default::default()
                        };
                        d.encode(&mut data);
                    }
                    0 => return Err(Status::generic(generic::INVALID_NAMESPACE_OR_FORMAT)),
                    _ => return Err(Status::generic(generic::INVALID_FIELD)),
                }
                self.copy_to_host(sqe, &data)?;
                Ok(0)
            }
            admin::CREATE_IO_CQ => {
                if qid == 0 || qid > MAX_IO_QUEUES || self.cqs.contains_key(&qid) {
                    return Err(Status::specific(specific::INVALID_QUEUE_IDENTIFIER));
                }
                if qsize < 2 || qsize > MQES as u32 + 1 {
                    return Err(Status::specific(specific::INVALID_QUEUE_SIZE));
                }
                // Physically contiguous only (CAP.CQR); interrupts are not modelled.
                let base = sqe.prp1();
                if sqe.cdw(11) & 1 == 0 || !base.is_multiple_of(PG) {
                    return Err(Status::generic(generic::INVALID_FIELD));
                }
                if !self.mapped(base, qsize as usize * Cqe::SIZE, "I/O CQ ring") {
                    return Err(Status::generic(generic::INVALID_FIELD));
                }
                self.regs.set(doorbells(qid, 0).1, 0);
                self.cqs.insert(
                    qid,
                    Cq {
                        base,
                        size: qsize as u16,
                        tail: 0,
                        phase: true,
                    },
                );
                Ok(0)
            }
            admin::CREATE_IO_SQ => {
                if qid == 0 || qid > MAX_IO_QUEUES || self.sqs.contains_key(&qid) {
                    return Err(Status::specific(specific::INVALID_QUEUE_IDENTIFIER));
                }
                if qsize < 2 || qsize > MQES as u32 + 1 {
                    return Err(Status::specific(specific::INVALID_QUEUE_SIZE));
                }
                let cqid = (sqe.cdw(11) >> 16) as u16;
                if cqid == 0 || !self.cqs.contains_key(&cqid) {
                    return Err(Status::specific(CQ_INVALID));
                }
                let base = sqe.prp1();
                if sqe.cdw(11) & 1 == 0 || !base.is_multiple_of(PG) {
                    return Err(Status::generic(generic::INVALID_FIELD));
                }
                if !self.mapped(base, qsize as usize * 64, "I/O SQ ring") {
                    return Err(Status::generic(generic::INVALID_FIELD));
                }
                self.regs.set(doorbells(qid, 0).0, 0);
                self.sqs.insert(
                    qid,
                    Sq {
                        base,
                        size: qsize as u16,
                        head: 0,
                        cqid,
                    },
                );
                Ok(0)
            }
            admin::DELETE_IO_SQ => {
                if qid == 0 || self.sqs.remove(&qid).is_none() {
                    return Err(Status::specific(specific::INVALID_QUEUE_IDENTIFIER));
                }
                self.held.retain(|(q, _)| *q != qid);
                Ok(0)
            }
            admin::DELETE_IO_CQ => {
                if qid == 0 || !self.cqs.contains_key(&qid) {
                    return Err(Status::specific(specific::INVALID_QUEUE_IDENTIFIER));
                }
                if self.sqs.values().any(|s| s.cqid == qid) {
                    return Err(Status::specific(INVALID_QUEUE_DELETION));
                }
                self.cqs.remove(&qid);
                Ok(0)
            }
            _ => Err(Status::generic(generic::INVALID_OPCODE)),
        }
    }

    fn io(&mut self, _qid: u16, sqe: &Sqe) -> Result<u32, Status> {
        match sqe.opc() {
            io::READ | io::WRITE => {
                if sqe.nsid() != 1 {
                    return Err(Status::generic(generic::INVALID_NAMESPACE_OR_FORMAT));
                }
                let (slba, nlb) = (sqe.slba(), sqe.nlb() as u64);
                if slba.checked_add(nlb).is_none_or(|e| e > DISK_BLOCKS) {
                    return Err(Status::generic(generic::LBA_OUT_OF_RANGE));
                }
                let (at, len) = (slba as usize * BLOCK, nlb as usize * BLOCK);
                if sqe.opc() == io::WRITE {
                    let data = self.copy_from_host(sqe, len)?;
                    self.disk[at..at + len].copy_from_slice(&data);
                } else {
                    let data = self.disk[at..at + len].to_vec();
                    self.copy_to_host(sqe, &data)?;
                }
                Ok(0)
            }
            io::FLUSH if sqe.nsid() == 1 || sqe.nsid() == u32::MAX => Ok(0),
            io::FLUSH => Err(Status::generic(generic::INVALID_NAMESPACE_OR_FORMAT)),
            _ => Err(Status::generic(generic::INVALID_OPCODE)),
        }
    }

    /// The memory `len` bytes of data at PRP1/PRP2 cover, in order; logged in `prp_log`.
    fn prps(&mut self, sqe: &Sqe, len: usize) -> Result<Vec<(u64, usize)>, Status> {
        if sqe.psdt() != psdt::PRP {
            return self.sgl(sqe, len);
        }
        let bad = Status::generic(generic::INVALID_PRP_OFFSET);
        let (prp1, prp2) = (sqe.prp1(), sqe.prp2());
        if !prp1.is_multiple_of(4) {
            self.error(format!("PRP1 {prp1:#x} is not dword aligned"));
            return Err(bad);
        }
        let first = len.min(PAGE - (prp1 % PAGE as u64) as usize);
        let mut segs = vec![(prp1, first)];
        let mut left = len - first;
        let mut list = false;
        if left > 0 && left <= PAGE {
            if !prp2.is_multiple_of(PG) {
                self.error(format!("PRP2 entry {prp2:#x} has an offset"));
                return Err(bad);
            }
            segs.push((prp2, left));
        } else if left > 0 {
            list = true;
            if !prp2.is_multiple_of(8) {
                self.error(format!("PRP list pointer {prp2:#x} is not qword aligned"));
                return Err(bad);
            }
            let mut at = prp2;
            while left > 0 {
                let mut e = [0u8; 8];
                self.dma_read(at, &mut e)?;
                let entry = u64::from_le_bytes(e);
                if (at + 8).is_multiple_of(PG) && left > PAGE {
                    // The last entry of a list page points to the next list page.
                    at = entry;
                    continue;
                }
                if !entry.is_multiple_of(PG) {
                    self.error(format!("PRP list entry {entry:#x} has an offset"));
                    return Err(bad);
                }
                let n = left.min(PAGE);
                segs.push((entry, n));
                left -= n;
                at += 8;
            }
        }
        self.prp_log.push(PrpUse {
            prp1,
            prp2,
            segs: segs.len(),
            list,
        });
        Ok(segs)
    }

    /// The memory an SGL (SGL1: one data block, or a last segment naming a list of data blocks) covers, which
    /// must add up to `len`; logged in `sgl_log` (descriptors used).
    fn sgl(&mut self, sqe: &Sqe, len: usize) -> Result<Vec<(u64, usize)>, Status> {
        let bad = Status::generic(generic::SGL_DESCRIPTOR_TYPE_INVALID);
        let d = sqe.sgl1();
        let descs = match d.ty {
            sgl::TYPE_DATA_BLOCK => vec![d],
            sgl::TYPE_LAST_SEGMENT if d.len.is_multiple_of(16) && d.len > 0 => {
                let mut raw = vec![0u8; d.len as usize];
                self.dma_read(d.addr, &mut raw)?;
                raw.chunks_exact(16)
                    .map(|c| SglDesc::decode(c.try_into().expect("16 bytes")))
                    .collect()
            }
            t => {
                self.error(format!("SGL1 descriptor type {t:#x}"));
                return Err(bad);
            }
        };
        let mut segs = Vec::new();
        for x in &descs {
            if x.ty != sgl::TYPE_DATA_BLOCK {
                self.error(format!("SGL list descriptor type {:#x}", x.ty));
                return Err(bad);
            }
            segs.push((x.addr, x.len as usize));
        }
        if segs.iter().map(|s| s.1).sum::<usize>() != len {
            self.error(format!(
                "SGL covers {segs:?}, the command moves {len} bytes"
            ));
            return Err(Status::generic(generic::DATA_SGL_LENGTH_INVALID));
        }
        self.sgl_log.push(descs.len());
        Ok(segs)
    }

    fn copy_to_host(&mut self, sqe: &Sqe, data: &[u8]) -> Result<(), Status> {
        let mut off = 0;
        for (a, n) in self.prps(sqe, data.len())? {
            self.dma_write(a, &data[off..off + n])?;
            off += n;
        }
        Ok(())
    }

    fn copy_from_host(&mut self, sqe: &Sqe, len: usize) -> Result<Vec<u8>, Status> {
        let mut data = vec![0u8; len];
        let mut off = 0;
        for (a, n) in self.prps(sqe, len)? {
            self.dma_read(a, &mut data[off..off + n])?;
            off += n;
        }
        Ok(data)
    }

    /// Whether `[iova, iova+len)` is memory the host registered (IOVA = VA in these tests); records an error if not.
    fn mapped(&mut self, iova: u64, len: usize, what: &str) -> bool {
        match self.xl.translate(iova as usize, len) {
            Some((a, n)) if a == iova && n == len => true,
            _ => {
                self.error(format!(
                    "{what}: DMA to {iova:#x}+{len:#x}, which is not in the memory map"
                ));
                false
            }
        }
    }

    fn dma_read(&mut self, iova: u64, out: &mut [u8]) -> Result<(), Status> {
        if !self.mapped(iova, out.len(), "read") {
            return Err(Status::generic(generic::DATA_TRANSFER_ERROR));
        }
        // SAFETY: the range is registered DMA memory (checked just above; IOVA = VA), which stays mapped while it
        // is registered. The only device is this model, run from the test's thread between driver calls, so
        // nothing else accesses the memory meanwhile; `out` is the model's own buffer, disjoint from it.
        unsafe {
            std::ptr::copy_nonoverlapping(iova as usize as *const u8, out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    fn dma_write(&mut self, iova: u64, data: &[u8]) -> Result<(), Status> {
        if !self.mapped(iova, data.len(), "write") {
            return Err(Status::generic(generic::DATA_TRANSFER_ERROR));
        }
        // SAFETY: as in `dma_read`: registered, mapped DMA memory nothing else touches while the model runs.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), iova as usize as *mut u8, data.len())
        };
        Ok(())
    }

    /// Whether completion queue `cqid` has a free entry (the host's head doorbell against the model's tail).
    fn cq_room(&mut self, cqid: u16) -> bool {
        let Some(cq) = self.cqs.get(&cqid) else {
            return false;
        };
        let (size, tail) = (cq.size, cq.tail);
        let head = self.regs.get(doorbells(cqid, 0).1);
        if head >= size as u32 {
            self.error(format!(
                "CQ {cqid}: head doorbell {head} past the queue ({size})"
            ));
            return false;
        }
        (tail + 1) % size != head as u16
    }

    /// Posts command `cid`'s completion on the completion queue of submission queue `sqid`.
    fn complete(&mut self, sqid: u16, cid: u16, status: Status, dw0: u32) {
        let Some(sq) = self.sqs.get(&sqid) else {
            return;
        };
        let cqe = Cqe {
            dw0,
            sqhd: sq.head,
            sqid,
            cid,
            status,
            ..Default::default()
        };
        self.post(sq.cqid, cqe);
    }

    /// Writes `cqe` at the tail of completion queue `cqid` with the current phase tag and moves the tail on.
    fn post(&mut self, cqid: u16, mut cqe: Cqe) {
        if !self.cq_room(cqid) {
            self.error(format!(
                "CQ {cqid}: full, completion of command {} lost",
                cqe.cid
            ));
            return;
        }
        let cq = self.cqs.get_mut(&cqid).expect("checked by cq_room");
        cqe.phase = cq.phase;
        let at = cq.base + cq.tail as u64 * Cqe::SIZE as u64;
        cq.tail += 1;
        if cq.tail == cq.size {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        self.write_cqe(at, &cqe);
    }

    /// The entry's first three dwords, then (after a release fence) the one with the phase tag.
    fn write_cqe(&mut self, at: u64, cqe: &Cqe) {
        let mut b = [0u8; 16];
        cqe.encode(&mut b);
        let _ = self.dma_write(at, &b[..12]);
        fence(Ordering::Release);
        let _ = self.dma_write(at + 12, &b[12..]);
    }

    /// A device bug: a completion for command `cid` (whether outstanding or not) on queue `cqid`.
    fn inject(&mut self, cqid: u16, cid: u16) {
        let cqe = Cqe {
            sqid: cqid,
            cid,
            ..Default::default()
        };
        self.post(cqid, cqe);
    }

    /// A completion for `cid` at the tail of `cqid` with the phase tag of the previous pass (what the ring held
    /// before), the tail not moved: the host must not take it.
    fn write_stale(&mut self, cqid: u16, cid: u16) {
        let cq = &self.cqs[&cqid];
        let at = cq.base + cq.tail as u64 * Cqe::SIZE as u64;
        let cqe = Cqe {
            sqid: cqid,
            cid,
            phase: !cq.phase,
            ..Default::default()
        };
        self.write_cqe(at, &cqe);
    }

    fn sq_doorbell(&self, qid: u16) -> u32 {
        self.regs.get(doorbells(qid, 0).0)
    }

    fn cq_doorbell(&self, qid: u16) -> u32 {
        self.regs.get(doorbells(qid, 0).1)
    }
}

/// The memory map of these tests: every registered region translates to itself (IOVA = VA).
fn memmap() -> MemMap {
    MemMap::new(|t, ev, a, l| {
        if ev == MemEvent::Register {
            t.set_linear_translation(a, l, a as u64)?;
        }
        Ok(())
    })
    .expect("memory map")
}

/// Submits through the driver.
fn submit(
    q: &mut PcieQpair,
    sqe: Sqe,
    iovs: &[Iov],
    dir: Dir,
    token: u64,
) -> Result<(), SubmitError> {
    // SAFETY: the iovecs are DmaBufs the calling test keeps alive until the command completed or was failed (or
    // memory the driver refuses without keeping). The only device is the model, which reaches memory only from
    // `step()` on the test's thread and only where the memory map still holds a registration, so even a test
    // that panics half-way leaves nothing that could touch freed memory.
    unsafe { q.submit(sqe, iovs, dir, token) }
}

/// Polls the driver and steps the model until `want` completions came; they are returned (token, entry).
fn drive(q: &mut PcieQpair, m: &mut Model, want: usize) -> Vec<(u64, Cqe)> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        q.poll(&mut |t, c| out.push((t, c)));
        if out.len() >= want {
            assert_eq!(out.len(), want, "more completions than commands");
            return out;
        }
        m.step();
    }
    panic!(
        "{} of {want} completions after 1000 polls (model errors: {:?})",
        out.len(),
        m.errors
    );
}

const TOKEN: u64 = 0x7e57;

/// One command, run to its completion.
fn run(q: &mut PcieQpair, m: &mut Model, sqe: Sqe, iovs: &[Iov], dir: Dir) -> Cqe {
    submit(q, sqe, iovs, dir, TOKEN).expect("submit");
    let done = drive(q, m, 1);
    assert_eq!(done[0].0, TOKEN);
    done[0].1
}

struct Rig {
    model: Model,
    ctrlr: PcieCtrlr,
    admin: PcieQpair,
    map: MemMap,
}

impl Rig {
    /// A controller found and an admin queue made, not enabled.
    fn start(b: Behaviour) -> Rig {
        let map = memmap();
        let (model, bar) = Model::new(&map, b);
        let ctrlr = PcieCtrlr::with_bar(bar.clone(), None).expect("with_bar");
        let admin =
            PcieQpair::new(bar, 0, ADMIN_DEPTH, 0, ADMIN_XFER, map.cache()).expect("admin queue");
        Rig {
            model,
            ctrlr,
            admin,
            map,
        }
    }

    /// Polls bring-up, stepping the model, until ready; the number of polls.
    fn enable(&mut self) -> errors::Result<usize> {
        for i in 0..100 {
            if self.ctrlr.poll_enable(&self.admin)? {
                return Ok(i);
            }
            self.model.step();
        }
        panic!("not ready after 100 polls");
    }

    fn up() -> Rig {
        let mut r = Rig::start(Behaviour::default());
        r.enable().expect("enable");
        r
    }

    fn admin_cmd(&mut self, sqe: Sqe, iovs: &[Iov], dir: Dir) -> Cqe {
        run(&mut self.admin, &mut self.model, sqe, iovs, dir)
    }

    /// Create I/O CQ/SQ as the host library sends them: the ring's IOVA set in PRP1, no data.
    fn create_cmds(q: &PcieQpair) -> (Sqe, Sqe) {
        let qid = q.qid() as u32;
        let mut c = Sqe::new(admin::CREATE_IO_CQ, 0);
        c.set_prp(q.cq_iova(), 0);
        c.set_cdw(10, qid | (q.depth() as u32 - 1) << 16);
        c.set_cdw(11, 1);
        let mut s = Sqe::new(admin::CREATE_IO_SQ, 0);
        s.set_prp(q.sq_iova(), 0);
        s.set_cdw(10, qid | (q.depth() as u32 - 1) << 16);
        s.set_cdw(11, 1 | qid << 16);
        (c, s)
    }

    /// An I/O queue pair, created on the controller.
    fn io_queue(&mut self, qid: u16, depth: u16, max_xfer: u32) -> PcieQpair {
        let q = PcieQpair::new(
            self.ctrlr.bar().clone(),
            qid,
            depth,
            self.ctrlr.cap().dstrd,
            max_xfer,
            self.map.cache(),
        )
        .expect("I/O queue");
        let (c, s) = Rig::create_cmds(&q);
        let st = self.admin_cmd(c, &[], Dir::None).status;
        assert!(
            st.is_success(),
            "Create I/O CQ {qid}: {st} ({:?})",
            self.model.errors
        );
        let st = self.admin_cmd(s, &[], Dir::None).status;
        assert!(
            st.is_success(),
            "Create I/O SQ {qid}: {st} ({:?})",
            self.model.errors
        );
        q
    }

    fn delete(&mut self, opc: u8, qid: u16) -> Status {
        let mut d = Sqe::new(opc, 0);
        d.set_cdw(10, qid as u32);
        self.admin_cmd(d, &[], Dir::None).status
    }

    /// The model saw the host do nothing wrong.
    fn check(&self) {
        assert!(
            self.model.errors.is_empty(),
            "model saw host errors: {:#?}",
            self.model.errors
        );
    }
}

/// A piece of a data buffer: (buffer, offset, length).
type Piece<'a> = (&'a DmaBuf, usize, usize);

fn iovs(pieces: &[Piece]) -> Vec<Iov> {
    pieces
        .iter()
        .map(|&(b, off, len)| {
            assert!(off + len <= b.len());
            Iov {
                base: b.as_ptr().wrapping_add(off),
                len,
            }
        })
        .collect()
}

fn gather(pieces: &[Piece]) -> Vec<u8> {
    pieces
        .iter()
        .flat_map(|&(b, off, len)| b.as_slice()[off..off + len].iter().copied())
        .collect()
}

/// Pseudo-random bytes (xorshift) from `seed`.
fn fill(seed: u64, out: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in out {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

fn dma(len: usize, seed: u64) -> DmaBuf {
    let mut b = DmaBuf::alloc(len).expect("DMA buffer");
    fill(seed, b.as_mut_slice());
    b
}

/// A read or write of `len` bytes at block `slba` of namespace 1.
fn rw(opc: u8, slba: u64, len: usize) -> Sqe {
    assert!(len.is_multiple_of(BLOCK) && len > 0);
    let mut s = Sqe::new(opc, 0);
    s.set_nsid(1);
    s.set_cdw(10, slba as u32);
    s.set_cdw(11, (slba >> 32) as u32);
    s.set_cdw(12, (len / BLOCK) as u32 - 1);
    s
}

/// Writes `w` at `slba`, checks the model's disk, reads it back into `rd` and compares; how the model walked
/// the write's and the read's PRPs.
fn write_read(
    r: &mut Rig,
    q: &mut PcieQpair,
    slba: u64,
    w: &[Piece],
    rd: &[Piece],
) -> (PrpUse, PrpUse) {
    let data = gather(w);
    let len = data.len();
    let st = run(
        q,
        &mut r.model,
        rw(io::WRITE, slba, len),
        &iovs(w),
        Dir::ToCtrl,
    )
    .status;
    assert!(st.is_success(), "write: {st}");
    let pw = *r.model.prp_log.last().expect("write walked PRPs");
    let at = slba as usize * BLOCK;
    assert!(
        r.model.disk[at..at + len] == data[..],
        "disk differs from what was written"
    );
    let st = run(
        q,
        &mut r.model,
        rw(io::READ, slba, len),
        &iovs(rd),
        Dir::FromCtrl,
    )
    .status;
    assert!(st.is_success(), "read: {st}");
    let pr = *r.model.prp_log.last().expect("read walked PRPs");
    assert!(
        gather(rd) == data,
        "read back differs from what was written"
    );
    (pw, pr)
}

#[test]
fn bring_up_and_identify() {
    let mut r = Rig::start(Behaviour::default());
    let cap = r.ctrlr.cap();
    assert_eq!((cap.mqes, cap.to, cap.dstrd), (MQES, 1, 0));
    assert_eq!(r.ctrlr.version(), (1, 4, 0));
    assert_eq!(r.ctrlr.ready_timeout(), Duration::from_millis(500));
    let polls = r.enable().expect("enable");
    assert!(polls >= 1, "ready before the model ran");
    let regs = &r.model.regs;
    assert_eq!(regs.get(AQA), 31 | 31 << 16);
    assert_eq!(regs.get64(ASQ), r.admin.sq_iova());
    assert_eq!(regs.get64(ACQ), r.admin.cq_iova());
    let ccv = regs.get(CC);
    assert_eq!(ccv & cc::EN, cc::EN);
    assert_eq!((ccv >> cc::IOSQES_SHIFT) & 0xf, 6);
    assert_eq!((ccv >> cc::IOCQES_SHIFT) & 0xf, 4);
    assert_eq!((ccv >> cc::SHN_SHIFT) & cc::SHN_MASK, 0);
    assert_eq!(r.ctrlr.status().expect("status") & csts::RDY, csts::RDY);
    // Ready stays ready.
    assert!(r.ctrlr.poll_enable(&r.admin).expect("poll_enable"));

    let buf = DmaBuf::alloc(4096).expect("buffer");
    let mut id = Sqe::new(admin::IDENTIFY, 0);
    id.set_cdw(10, 1);
    let c = r.admin_cmd(id, &iovs(&[(&buf, 0, 4096)]), Dir::FromCtrl);
    assert!(c.status.is_success(), "Identify: {}", c.status);
    assert_eq!((c.sqid, c.sqhd), (0, 1));
    let d = CtrlrData::decode(buf.as_slice()).expect("identify data");
    assert_eq!(padded_str(&d.sn).expect("sn"), SN);
    assert_eq!(padded_str(&d.mn).expect("mn"), MN);
    assert_eq!(padded_str(&d.fr).expect("fr"), FR);
    assert_eq!(
        (d.vid, d.mdts, d.cntlid, d.ver, d.nn),
        (0x1b36, MDTS, 1, VS_1_4, 1)
    );
    assert_eq!((d.sqes, d.cqes), (0x66, 0x44));

    // Identify Namespace into a buffer that starts mid-page (PRP1 with an offset, PRP2 the next page).
    let buf = DmaBuf::alloc(3 * 4096).expect("buffer");
    let mut id = Sqe::new(admin::IDENTIFY, 0);
    id.set_nsid(1);
    let c = r.admin_cmd(id, &iovs(&[(&buf, 100 * 4, 4096)]), Dir::FromCtrl);
    assert!(c.status.is_success(), "Identify Namespace: {}", c.status);
    let p = *r.model.prp_log.last().unwrap();
    assert_eq!((p.segs, p.list), (2, false));
    assert_eq!(p.prp2, buf.as_ptr() as u64 + 4096);
    let ns = NsData::decode(&buf.as_slice()[400..]).expect("namespace data");
    assert_eq!((ns.nsze, ns.lbaf[0].lbads), (DISK_BLOCKS, 9));
    // Namespace 2 does not exist.
    let mut id = Sqe::new(admin::IDENTIFY, 0);
    id.set_nsid(2);
    let c = r.admin_cmd(id, &iovs(&[(&buf, 0, 4096)]), Dir::FromCtrl);
    assert_eq!(
        c.status,
        Status::generic(generic::INVALID_NAMESPACE_OR_FORMAT)
    );
    // An admin opcode the model does not know.
    let c = r.admin_cmd(Sqe::new(0xc5, 0), &[], Dir::None);
    assert_eq!(c.status, Status::generic(generic::INVALID_OPCODE));
    r.check();
}

#[test]
fn bring_up_from_a_controller_left_enabled() {
    let mut r = Rig::start(Behaviour {
        left_enabled: true,
        ..Default::default()
    });
    // with_bar cleared CC.EN; the controller has not reset yet.
    assert_eq!(r.model.regs.get(CC) & cc::EN, 0);
    assert_eq!(r.model.regs.get(CSTS) & csts::RDY, csts::RDY);
    // While RDY is still set the admin queue registers are left alone.
    assert!(!r.ctrlr.poll_enable(&r.admin).expect("poll_enable"));
    assert_eq!(r.model.regs.get(AQA), 0x00ff_00ff);
    r.enable().expect("enable");
    assert_eq!(r.model.regs.get64(ASQ), r.admin.sq_iova());
    let buf = DmaBuf::alloc(4096).expect("buffer");
    let mut id = Sqe::new(admin::IDENTIFY, 0);
    id.set_cdw(10, 1);
    let c = r.admin_cmd(id, &iovs(&[(&buf, 0, 4096)]), Dir::FromCtrl);
    assert!(c.status.is_success());
    r.check();
}

#[test]
fn io_queue_reads_and_writes() {
    let mut r = Rig::up();
    let mut q = r.io_queue(1, 64, MAX_XFER_PRP);
    assert_eq!(r.model.cqs[&1].base, q.cq_iova());
    assert_eq!(r.model.sqs[&1].base, q.sq_iova());

    // One page.
    let (w, rd) = (dma(4096, 1), DmaBuf::alloc(4096).unwrap());
    let (pw, pr) = write_read(&mut r, &mut q, 8, &[(&w, 0, 4096)], &[(&rd, 0, 4096)]);
    assert_eq!(
        (pw.segs, pw.list, pw.prp1, pw.prp2),
        (1, false, w.as_ptr() as u64, 0)
    );
    assert_eq!((pr.segs, pr.list, pr.prp1), (1, false, rd.as_ptr() as u64));

    // 4 KiB starting 512 bytes into a page: two pages, PRP2 is the second.
    let (w, rd) = (dma(8192, 2), DmaBuf::alloc(8192).unwrap());
    let (pw, pr) = write_read(&mut r, &mut q, 100, &[(&w, 512, 4096)], &[(&rd, 512, 4096)]);
    assert_eq!((pw.segs, pw.list), (2, false));
    assert_eq!(
        (pw.prp1, pw.prp2),
        (w.as_ptr() as u64 + 512, w.as_ptr() as u64 + 4096)
    );
    assert_eq!(pr.prp2, rd.as_ptr() as u64 + 4096);

    // 8 KiB starting 1 KiB into a page: three pages, a PRP list of two.
    let (w, rd) = (dma(3 * 4096, 3), DmaBuf::alloc(3 * 4096).unwrap());
    let (pw, _) = write_read(
        &mut r,
        &mut q,
        200,
        &[(&w, 1024, 8192)],
        &[(&rd, 1024, 8192)],
    );
    assert_eq!((pw.segs, pw.list), (3, true));

    // 128 KiB, page aligned: PRP1 and a list of 31.
    let (w, rd) = (dma(128 << 10, 4), DmaBuf::alloc(128 << 10).unwrap());
    let (pw, pr) = write_read(
        &mut r,
        &mut q,
        1000,
        &[(&w, 0, 128 << 10)],
        &[(&rd, 0, 128 << 10)],
    );
    assert_eq!((pw.segs, pw.list, pr.segs, pr.list), (32, true, 32, true));

    // Several iovecs joined on page boundaries, in different pieces for the write and the read.
    let (a, b, c) = (dma(4096, 5), dma(8192, 6), dma(4096, 7));
    let (d, e, f) = (
        DmaBuf::alloc(4096).unwrap(),
        DmaBuf::alloc(8192).unwrap(),
        DmaBuf::alloc(4096).unwrap(),
    );
    let (pw, pr) = write_read(
        &mut r,
        &mut q,
        3000,
        &[(&a, 512, 3584), (&b, 0, 8192), (&c, 0, 1024)],
        &[(&d, 3072, 1024), (&e, 0, 8192), (&f, 0, 3584)],
    );
    assert_eq!((pw.segs, pw.list), (4, true));
    assert_eq!((pr.segs, pr.list), (4, true));

    // Two iovecs that continue each other in memory need not join on a page boundary.
    let (w, rd) = (dma(8192, 8), DmaBuf::alloc(8192).unwrap());
    let (pw, _) = write_read(
        &mut r,
        &mut q,
        4000,
        &[(&w, 0, 1000), (&w, 1000, 3608)],
        &[(&rd, 0, 3000), (&rd, 3000, 1608)],
    );
    assert_eq!((pw.segs, pw.list), (2, false));

    // The largest transfer, 2 MiB starting mid-page: 513 pages, a list page filled to its last entry.
    let (w, rd) = (
        dma((2 << 20) + 4096, 9),
        DmaBuf::alloc((2 << 20) + 4096).unwrap(),
    );
    let (pw, pr) = write_read(
        &mut r,
        &mut q,
        0,
        &[(&w, 512, 2 << 20)],
        &[(&rd, 512, 2 << 20)],
    );
    assert_eq!((pw.segs, pw.list, pr.segs, pr.list), (513, true, 513, true));

    // Flush; the model's errors for a bad LBA range, namespace and opcode come back as such.
    let mut fl = Sqe::new(io::FLUSH, 0);
    fl.set_nsid(1);
    let c = run(&mut q, &mut r.model, fl, &[], Dir::None);
    assert!(c.status.is_success());
    assert_eq!(c.sqid, 1);
    let c = run(
        &mut q,
        &mut r.model,
        rw(io::READ, DISK_BLOCKS - 1, 1024),
        &iovs(&[(&rd, 0, 1024)]),
        Dir::FromCtrl,
    );
    assert_eq!(c.status, Status::generic(generic::LBA_OUT_OF_RANGE));
    let mut bad_ns = rw(io::WRITE, 0, 512);
    bad_ns.set_nsid(2);
    let c = run(
        &mut q,
        &mut r.model,
        bad_ns,
        &iovs(&[(&w, 0, 512)]),
        Dir::ToCtrl,
    );
    assert_eq!(
        c.status,
        Status::generic(generic::INVALID_NAMESPACE_OR_FORMAT)
    );
    let c = run(&mut q, &mut r.model, Sqe::new(0x55, 0), &[], Dir::None);
    assert_eq!(c.status, Status::generic(generic::INVALID_OPCODE));
    assert_eq!(q.outstanding(), 0);

    // Tear down: the CQ cannot go while its SQ is there; then both go and the queue pair is failed.
    assert_eq!(
        r.delete(admin::DELETE_IO_CQ, 1),
        Status::specific(INVALID_QUEUE_DELETION)
    );
    assert!(r.delete(admin::DELETE_IO_SQ, 1).is_success());
    assert!(r.delete(admin::DELETE_IO_CQ, 1).is_success());
    assert!(!r.model.sqs.contains_key(&1) && !r.model.cqs.contains_key(&1));
    q.fail("deleted", &mut |_, _| panic!("nothing outstanding"));
    let _mem = q.into_memory();
    r.check();
}

#[test]
fn queue_creation_errors() {
    let mut r = Rig::up();
    let q = PcieQpair::new(r.ctrlr.bar().clone(), 2, 16, 0, ADMIN_XFER, r.map.cache()).unwrap();
    let (mut c, mut s) = Rig::create_cmds(&q);
    // An SQ on a CQ that does not exist.
    assert_eq!(
        r.admin_cmd(s, &[], Dir::None).status,
        Status::specific(CQ_INVALID)
    );
    // Queue id 0, or past the controller's queues.
    c.set_cdw(10, c.cdw(10) & !0xffff);
    assert_eq!(
        r.admin_cmd(c, &[], Dir::None).status,
        Status::specific(specific::INVALID_QUEUE_IDENTIFIER)
    );
    c.set_cdw(10, (c.cdw(10) & !0xffff) | (MAX_IO_QUEUES as u32 + 1));
    assert_eq!(
        r.admin_cmd(c, &[], Dir::None).status,
        Status::specific(specific::INVALID_QUEUE_IDENTIFIER)
    );
    // Larger than CAP.MQES allows.
    c.set_cdw(10, 2 | (MQES as u32 + 1) << 16);
    assert_eq!(
        r.admin_cmd(c, &[], Dir::None).status,
        Status::specific(specific::INVALID_QUEUE_SIZE)
    );
    // Right, then twice.
    let (c, _) = Rig::create_cmds(&q);
    assert!(r.admin_cmd(c, &[], Dir::None).status.is_success());
    assert_eq!(
        r.admin_cmd(c, &[], Dir::None).status,
        Status::specific(specific::INVALID_QUEUE_IDENTIFIER)
    );
    s.set_cdw(11, 1 | 2 << 16);
    assert!(r.admin_cmd(s, &[], Dir::None).status.is_success());
    assert_eq!(r.model.sqs[&2].size, 16);
    r.check();
}

#[test]
fn bad_buffers_are_refused() {
    let mut r = Rig::up();
    let mut q = r.io_queue(1, 8, 64 << 10);
    let (a, b, c) = (dma(8192, 1), dma(8192, 2), dma(8192, 3));
    let w = |len| rw(io::WRITE, 0, len);
    // Memory outside the memory map.
    let mut v = vec![0u8; 4096];
    let heap = [Iov {
        base: v.as_mut_ptr(),
        len: 4096,
    }];
    assert_eq!(
        submit(&mut q, w(4096), &heap, Dir::ToCtrl, 1),
        Err(SubmitError::BadBuffer)
    );
    assert_eq!(
        submit(&mut q, rw(io::READ, 0, 4096), &heap, Dir::FromCtrl, 1),
        Err(SubmitError::BadBuffer)
    );
    // Mapped memory followed by unmapped memory.
    let mixed = [iovs(&[(&a, 0, 4096)])[0], heap[0]];
    assert_eq!(
        submit(&mut q, w(8192), &mixed, Dir::ToCtrl, 1),
        Err(SubmitError::BadBuffer)
    );
    // A first piece that does not end a page.
    let bad = iovs(&[(&a, 0, 2048), (&b, 0, 2048)]);
    assert_eq!(
        submit(&mut q, w(4096), &bad, Dir::ToCtrl, 1),
        Err(SubmitError::BadBuffer)
    );
    // A second piece that does not start a page.
    let bad = iovs(&[(&a, 0, 4096), (&b, 512, 512)]);
    assert_eq!(
        submit(&mut q, w(4608), &bad, Dir::ToCtrl, 1),
        Err(SubmitError::BadBuffer)
    );
    // A middle piece that does not end a page.
    let bad = iovs(&[(&a, 0, 4096), (&b, 0, 2048), (&c, 0, 2048)]);
    assert_eq!(
        submit(&mut q, w(8192), &bad, Dir::ToCtrl, 1),
        Err(SubmitError::BadBuffer)
    );
    // PRP1 not dword aligned.
    let bad = iovs(&[(&a, 2, 512)]);
    assert_eq!(
        submit(&mut q, w(512), &bad, Dir::ToCtrl, 1),
        Err(SubmitError::BadBuffer)
    );
    // Larger than the queue pair moves.
    let big = dma(68 << 10, 4);
    assert_eq!(
        submit(
            &mut q,
            w(68 << 10),
            &iovs(&[(&big, 0, 68 << 10)]),
            Dir::ToCtrl,
            1
        ),
        Err(SubmitError::TooLarge)
    );
    // Nothing was taken, no slot leaked, and the model never heard of any of it.
    assert_eq!(q.outstanding(), 0);
    assert!(!q.poll(&mut |_, _| panic!("no command was taken")));
    r.model.step();
    assert!(r.model.executed.iter().all(|(qid, _)| *qid == 0));
    for t in 0..7 {
        submit(&mut q, w(4096), &iovs(&[(&a, 0, 4096)]), Dir::ToCtrl, t).expect("slot free");
    }
    assert_eq!(drive(&mut q, &mut r.model, 7).len(), 7);
    r.check();
}

#[test]
fn queue_full() {
    let mut r = Rig::up();
    let mut q = r.io_queue(1, 4, ADMIN_XFER);
    let mut fl = Sqe::new(io::FLUSH, 0);
    fl.set_nsid(1);
    for t in 0..3 {
        submit(&mut q, fl, &[], Dir::None, t).expect("room");
    }
    assert_eq!(q.outstanding(), 3);
    assert_eq!(
        submit(&mut q, fl, &[], Dir::None, 3),
        Err(SubmitError::Full)
    );
    let mut done = drive(&mut q, &mut r.model, 3);
    done.sort_by_key(|d| d.0);
    assert_eq!(done.iter().map(|d| d.0).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(done.iter().all(|d| d.1.status.is_success()));
    submit(&mut q, fl, &[], Dir::None, 3).expect("room again");
    assert_eq!(drive(&mut q, &mut r.model, 1)[0].0, 3);

    // The admin queue too: depth - 1 commands.
    let mut id = Sqe::new(admin::IDENTIFY, 0);
    id.set_cdw(10, 1);
    let bufs: Vec<DmaBuf> = (0..ADMIN_DEPTH)
        .map(|_| DmaBuf::alloc(4096).unwrap())
        .collect();
    for (t, b) in bufs.iter().enumerate().take(ADMIN_DEPTH as usize - 1) {
        submit(
            &mut r.admin,
            id,
            &iovs(&[(b, 0, 4096)]),
            Dir::FromCtrl,
            t as u64,
        )
        .expect("room");
    }
    let last = iovs(&[(&bufs[ADMIN_DEPTH as usize - 1], 0, 4096)]);
    assert_eq!(
        submit(&mut r.admin, id, &last, Dir::FromCtrl, 99),
        Err(SubmitError::Full)
    );
    assert_eq!(
        drive(&mut r.admin, &mut r.model, ADMIN_DEPTH as usize - 1).len(),
        31
    );
    r.check();
}

#[test]
fn rings_wrap_around() {
    let mut r = Rig::up();
    const DEPTH: u16 = 8;
    let mut q = r.io_queue(1, DEPTH, ADMIN_XFER);
    // Each command writes 8 KiB from 1 KiB into a buffer: a PRP list in its slot's page, reused as slots are.
    let bufs: Vec<DmaBuf> = (0..DEPTH).map(|i| dma(3 * 4096, 100 + i as u64)).collect();
    let (mut submitted, mut completed) = (0u64, 0u64);
    let mut phase_flips = 0;
    let mut last_phase = true;
    for round in 0..60u64 {
        let k = 1 + (round % (DEPTH as u64 - 1));
        for i in 0..k {
            let b = &bufs[i as usize];
            let slba = (submitted % 400) * 16;
            let mut s = rw(io::WRITE, slba, 8192);
            s.set_cdw(13, round as u32); // unused by the model, makes commands differ
            submit(&mut q, s, &iovs(&[(b, 1024, 8192)]), Dir::ToCtrl, submitted).expect("room");
            submitted += 1;
        }
        // The first poll rings the tail doorbell for all of them (the model has not run yet).
        assert!(!q.poll(&mut |_, _| panic!("nothing ran yet")));
        assert_eq!(r.model.sq_doorbell(1) as u64, submitted % DEPTH as u64);
        let done = drive(&mut q, &mut r.model, k as usize);
        for (i, (t, c)) in done.iter().enumerate() {
            assert_eq!(*t, completed + i as u64, "completions in order");
            assert!(c.status.is_success());
            assert_eq!(c.sqid, 1);
            assert_eq!(c.sqhd as u64, (completed + i as u64 + 1) % DEPTH as u64);
        }
        for i in 0..k {
            let slba = ((completed + i) % 400) * 16;
            let at = slba as usize * BLOCK;
            assert!(
                r.model.disk[at..at + 8192] == bufs[i as usize].as_slice()[1024..1024 + 8192],
                "command {} wrote the wrong data",
                completed + i
            );
        }
        completed += k;
        assert_eq!(r.model.cq_doorbell(1) as u64, completed % DEPTH as u64);
        let p = r.model.cqs[&1].phase;
        if p != last_phase {
            phase_flips += 1;
            last_phase = p;
        }
        // The device sees all it was told of, and nothing more.
        assert_eq!(r.model.sqs[&1].head as u64, submitted % DEPTH as u64);
    }
    assert!(submitted > 20 * DEPTH as u64, "{submitted} commands");
    assert!(phase_flips > 10, "{phase_flips} phase flips");
    assert_eq!(q.outstanding(), 0);
    r.check();
}

#[test]
fn bogus_completions_are_dropped() {
    let mut r = Rig::up();
    let mut q = r.io_queue(1, 8, ADMIN_XFER);
    let w = dma(4096, 1);
    r.model.hold_io = true;
    submit(
        &mut q,
        rw(io::WRITE, 10, 4096),
        &iovs(&[(&w, 0, 4096)]),
        Dir::ToCtrl,
        42,
    )
    .unwrap();
    q.poll(&mut |_, _| panic!("not yet"));
    r.model.step();
    assert_eq!(r.model.held.len(), 1);
    let cid = r.model.held[0].1.cid();
    // A command id that is free, and one past every slot.
    r.model.inject(1, cid + 3);
    r.model.inject(1, 999);
    assert!(q.poll(&mut |t, c| panic!("completion {t} {c:?} taken")));
    assert_eq!(q.bogus_completions(), 2);
    assert_eq!(q.outstanding(), 1);
    assert_eq!(r.model.cq_doorbell(1), 2);
    r.model.hold_io = false;
    r.model.release();
    let done = drive(&mut q, &mut r.model, 1);
    assert_eq!(done[0].0, 42);
    assert!(done[0].1.status.is_success());
    assert_eq!(done[0].1.cid, cid);
    assert!(r.model.disk[10 * BLOCK..10 * BLOCK + 4096] == w.as_slice()[..]);
    assert_eq!(q.bogus_completions(), 2);
    assert_eq!(r.model.cq_doorbell(1), 3);
    r.check();
}

#[test]
fn stale_phase_is_not_taken() {
    let mut r = Rig::up();
    let mut q = r.io_queue(1, 4, ADMIN_XFER);
    let mut fl = Sqe::new(io::FLUSH, 0);
    fl.set_nsid(1);
    // One pass over the completion ring: the host now waits for phase 0, and the ring holds phase 1 entries.
    for _ in 0..4 {
        run(&mut q, &mut r.model, fl, &[], Dir::None);
    }
    assert!(!r.model.cqs[&1].phase);
    assert_eq!(r.model.cq_doorbell(1), 0);
    r.model.hold_io = true;
    submit(&mut q, fl, &[], Dir::None, 7).unwrap();
    q.poll(&mut |_, _| panic!("not yet"));
    r.model.step();
    let cid = r.model.held[0].1.cid();
    // An entry naming the outstanding command, with last pass's phase tag, where the next completion goes.
    r.model.write_stale(1, cid);
    for _ in 0..3 {
        assert!(!q.poll(&mut |t, c| panic!("stale completion {t} {c:?} taken")));
    }
    assert_eq!((q.outstanding(), q.bogus_completions()), (1, 0));
    assert_eq!(r.model.cq_doorbell(1), 0);
    r.model.hold_io = false;
    r.model.release();
    let done = drive(&mut q, &mut r.model, 1);
    assert_eq!((done[0].0, done[0].1.cid, done[0].1.phase), (7, cid, false));
    assert_eq!(r.model.cq_doorbell(1), 1);
    r.check();
}

#[test]
fn fatal_status_while_enabling() {
    let mut r = Rig::start(Behaviour {
        cfs_on_enable: true,
        ..Default::default()
    });
    let e = (0..100)
        .find_map(|_| match r.ctrlr.poll_enable(&r.admin) {
            Ok(true) => panic!("ready despite CFS"),
            Ok(false) => {
                r.model.step();
                None
            }
            Err(e) => Some(e),
        })
        .expect("CFS noticed");
    assert_eq!(e.errno(), libc::EIO, "{e:?}");
    assert_eq!(r.ctrlr.status().expect_err("CFS").errno(), libc::EIO);
}

/// Polls bring-up (with the model stepping, 1 ms apart) until it fails; the error and how long it took.
fn enable_until_error(r: &mut Rig) -> (errors::Error, Duration) {
    let t = Instant::now();
    loop {
        match r.ctrlr.poll_enable(&r.admin) {
            Ok(true) => panic!("ready"),
            Ok(false) => r.model.step(),
            Err(e) => return (e, t.elapsed()),
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no timeout after 5 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn never_ready_times_out() {
    let mut r = Rig::start(Behaviour {
        to: 1,
        never_ready: true,
        ..Default::default()
    });
    let (e, took) = enable_until_error(&mut r);
    assert_eq!(e.errno(), libc::ETIMEDOUT, "{e:?}");
    assert!(e.msg.contains("was not set"), "{e:?}");
    assert!(took >= Duration::from_millis(500), "gave up after {took:?}");
    assert!(
        took < Duration::from_millis(1500),
        "gave up only after {took:?}"
    );
}

#[test]
fn never_disabling_times_out() {
    let mut r = Rig::start(Behaviour {
        to: 1,
        left_enabled: true,
        never_disables: true,
        ..Default::default()
    });
    let (e, took) = enable_until_error(&mut r);
    assert_eq!(e.errno(), libc::ETIMEDOUT, "{e:?}");
    assert!(e.msg.contains("did not clear"), "{e:?}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

#[test]
fn vanished_device() {
    // Gone before it was found.
    let map = memmap();
    let (mut m, bar) = Model::new(&map, Behaviour::default());
    m.vanish();
    assert_eq!(
        PcieCtrlr::with_bar(bar, None).expect_err("gone").errno(),
        libc::ENODEV
    );

    // Gone during bring-up.
    let mut r = Rig::start(Behaviour::default());
    assert!(!r.ctrlr.poll_enable(&r.admin).unwrap());
    r.model.vanish();
    assert_eq!(
        r.ctrlr.poll_enable(&r.admin).expect_err("gone").errno(),
        libc::ENODEV
    );
    assert_eq!(r.ctrlr.status().expect_err("gone").errno(), libc::ENODEV);

    // Gone once ready, with a command outstanding.
    let mut r = Rig::up();
    let mut q = r.io_queue(1, 8, ADMIN_XFER);
    let buf = DmaBuf::alloc(4096).unwrap();
    submit(
        &mut q,
        rw(io::READ, 0, 4096),
        &iovs(&[(&buf, 0, 4096)]),
        Dir::FromCtrl,
        5,
    )
    .unwrap();
    r.model.vanish();
    assert_eq!(r.ctrlr.status().expect_err("gone").errno(), libc::ENODEV);
    assert_eq!(
        r.ctrlr.poll_enable(&r.admin).expect_err("gone").errno(),
        libc::ENODEV
    );
    for _ in 0..10 {
        assert!(!q.poll(&mut |_, _| panic!("nothing completes")));
        r.model.step();
    }
    let t = Instant::now();
    assert!(!r.ctrlr.shutdown(Duration::from_secs(5)));
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "shutdown waited {:?}",
        t.elapsed()
    );
    let mut aborted = Vec::new();
    q.fail("controller gone", &mut |t, c| aborted.push((t, c.status)));
    assert_eq!(
        aborted,
        [(5, Status::generic(generic::ABORTED_SQ_DELETION))]
    );
}

#[test]
fn fail_completes_outstanding_commands() {
    let mut r = Rig::up();
    let mut q = r.io_queue(1, 8, ADMIN_XFER);
    let bufs: Vec<DmaBuf> = (0..4).map(|i| dma(4096, i)).collect();
    r.model.hold_io = true;
    for (t, b) in bufs.iter().enumerate().take(3) {
        submit(
            &mut q,
            rw(io::WRITE, t as u64 * 8, 4096),
            &iovs(&[(b, 0, 4096)]),
            Dir::ToCtrl,
            t as u64,
        )
        .unwrap();
    }
    q.poll(&mut |_, _| panic!("not yet"));
    r.model.step();
    assert_eq!(r.model.held.len(), 3);
    // A fourth, written into the ring but not rung yet.
    submit(
        &mut q,
        rw(io::WRITE, 100, 4096),
        &iovs(&[(&bufs[3], 0, 4096)]),
        Dir::ToCtrl,
        3,
    )
    .unwrap();
    let mut aborted = Vec::new();
    q.fail("test", &mut |t, c| aborted.push((t, c)));
    aborted.sort_by_key(|a| a.0);
    assert_eq!(
        aborted.iter().map(|a| a.0).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    for (_, c) in &aborted {
        assert_eq!(c.status, Status::generic(generic::ABORTED_SQ_DELETION));
        assert_eq!(c.sqid, 1);
    }
    assert_eq!(q.outstanding(), 0);
    assert!(!q.ready());
    assert_eq!(q.error(), Some("test"));
    assert_eq!(
        submit(
            &mut q,
            rw(io::WRITE, 0, 4096),
            &iovs(&[(&bufs[0], 0, 4096)]),
            Dir::ToCtrl,
            9
        ),
        Err(SubmitError::NotReady)
    );
    // The command reported aborted before the device heard of it must stay unheard of.
    q.poll(&mut |_, _| panic!("failed"));
    r.model.step();
    assert_eq!(
        r.model.held.len(),
        3,
        "a command reported aborted reached the device"
    );
    assert_eq!(r.model.sq_doorbell(1), 3);
    // Completions the device posts afterwards complete nothing, and a failed queue touches no doorbell (its id
    // may belong to a new queue by then).
    r.model.hold_io = false;
    r.model.release();
    let head = r.model.cq_doorbell(1);
    q.poll(&mut |t, c| panic!("completion {t} {c:?} after fail"));
    assert_eq!(q.bogus_completions(), 0);
    assert_eq!(r.model.cq_doorbell(1), head);
    assert_eq!(r.model.sq_doorbell(1), 3);
    r.check();
}

#[test]
fn expired_reports_held_commands() {
    let mut r = Rig::up();
    let mut q = r.io_queue(1, 8, ADMIN_XFER);
    let w = dma(4096, 1);
    q.set_timeout(Some(Duration::from_millis(5)), Some(io::FLUSH));
    r.model.hold_io = true;
    let start = Instant::now();
    submit(
        &mut q,
        rw(io::WRITE, 0, 4096),
        &iovs(&[(&w, 0, 4096)]),
        Dir::ToCtrl,
        11,
    )
    .unwrap();
    let mut fl = Sqe::new(io::FLUSH, 0);
    fl.set_nsid(1);
    submit(&mut q, fl, &[], Dir::None, 12).unwrap();
    q.poll(&mut |_, _| panic!("held"));
    r.model.step();
    assert_eq!(r.model.held.len(), 2);
    let write_cid = r.model.held[0].1.cid();
    let mut seen = Vec::new();
    q.expired(start, &mut |cid, t| seen.push((cid, t)));
    assert!(seen.is_empty(), "expired before its time: {seen:?}");
    std::thread::sleep(Duration::from_millis(10));
    q.poll(&mut |_, _| panic!("held"));
    r.model.step();
    q.expired(Instant::now(), &mut |cid, t| seen.push((cid, t)));
    // The write, once; never the flush (untimed opcode).
    assert_eq!(seen, [(write_cid, 11)]);
    q.expired(Instant::now() + Duration::from_secs(60), &mut |cid, t| {
        seen.push((cid, t))
    });
    assert_eq!(seen.len(), 1);
    // Late completions still complete.
    r.model.hold_io = false;
    r.model.release();
    let mut done = drive(&mut q, &mut r.model, 2);
    done.sort_by_key(|d| d.0);
    assert_eq!(done.iter().map(|d| d.0).collect::<Vec<_>>(), [11, 12]);
    // A command under the timeout that completes in time is never reported.
    q.set_timeout(Some(Duration::from_secs(60)), None);
    run(&mut q, &mut r.model, fl, &[], Dir::None);
    q.expired(Instant::now() + Duration::from_secs(3600), &mut |cid, t| {
        panic!("{cid} {t} completed")
    });
    r.check();
}

#[test]
fn shutdown_completes() {
    let mut r = Rig::up();
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    // The one test where the model runs beside the host, as a device would: shutdown() waits in place.
    let done = std::thread::scope(|s| {
        let model = &mut r.model;
        let stop = &stop;
        s.spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                model.step();
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        let done = r.ctrlr.shutdown(Duration::from_secs(2));
        stop.store(true, Ordering::SeqCst);
        done
    });
    assert!(done, "shutdown not seen complete");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let ccv = r.model.regs.get(CC);
    assert_eq!((ccv >> cc::SHN_SHIFT) & cc::SHN_MASK, 1, "CC.SHN normal");
    assert_eq!(ccv & cc::EN, 0, "disabled after shutdown");
    let st = r.model.regs.get(CSTS);
    assert_eq!((st >> csts::SHST_SHIFT) & 3, csts::SHST_COMPLETE);
    r.model.step();
    assert_eq!(r.model.regs.get(CSTS) & csts::RDY, 0);
    r.check();
}

#[test]
fn shutdown_gives_up() {
    let mut r = Rig::start(Behaviour {
        shutdown_completes: false,
        ..Default::default()
    });
    r.enable().unwrap();
    let t = Instant::now();
    assert!(!r.ctrlr.shutdown(Duration::from_millis(20)));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(20) && took < Duration::from_secs(1),
        "{took:?}"
    );
    assert_eq!(r.model.regs.get(CC) & cc::EN, 0);
}

#[test]
fn a_queue_of_a_gone_controller_instance_lets_go() {
    let mut r = Rig::up();
    let mut q = r.io_queue(1, 8, ADMIN_XFER);
    let live = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    q.set_liveness(live.clone());
    let b = dma(4096, 1);
    r.model.hold_io = true;
    submit(
        &mut q,
        rw(io::WRITE, 0, 4096),
        &iovs(&[(&b, 0, 4096)]),
        Dir::ToCtrl,
        7,
    )
    .unwrap();
    q.poll(&mut |_, _| panic!("not yet"));
    r.model.step();
    // Another write goes into the ring; then the instance goes (a reset): the queue must not ring for it.
    submit(
        &mut q,
        rw(io::WRITE, 8, 4096),
        &iovs(&[(&b, 0, 4096)]),
        Dir::ToCtrl,
        8,
    )
    .unwrap();
    live.store(false, std::sync::atomic::Ordering::Release);
    let (sq, cq) = (r.model.sq_doorbell(1), r.model.cq_doorbell(1));
    let mut got = Vec::new();
    assert!(q.poll(&mut |t, c| got.push((t, c.status))));
    got.sort_by_key(|g| g.0);
    assert_eq!(
        got,
        vec![
            (7, Status::generic(generic::ABORTED_SQ_DELETION)),
            (8, Status::generic(generic::ABORTED_SQ_DELETION))
        ]
    );
    assert_eq!((r.model.sq_doorbell(1), r.model.cq_doorbell(1)), (sq, cq));
    assert!(!q.ready());
    r.model.hold_io = false;
    r.model.release();
    q.poll(&mut |t, c| panic!("completion {t} {c:?} after the instance went"));
    assert_eq!((r.model.sq_doorbell(1), r.model.cq_doorbell(1)), (sq, cq));
    r.check();
}

#[test]
fn sgls_carry_what_prps_cannot() {
    let mut r = Rig::up();
    let mut q = r.io_queue(1, 16, MAX_XFER_PRP);
    let (a, b, c) = (dma(8192, 1), dma(8192, 2), dma(8192, 3));
    // Pieces that do not join on page boundaries: refused with PRPs only.
    let odd = iovs(&[(&a, 0, 2048), (&b, 512, 1536), (&c, 100, 512)]);
    let w = |len: usize| rw(io::WRITE, 40, len);
    assert_eq!(
        submit(&mut q, w(4096), &odd, Dir::ToCtrl, 1),
        Err(SubmitError::BadBuffer)
    );
    q.enable_sgl(false);
    submit(&mut q, w(4096), &odd, Dir::ToCtrl, 1).expect("an SGL describes them");
    assert_eq!(drive(&mut q, &mut r.model, 1).len(), 1);
    assert_eq!(r.model.sgl_log.last(), Some(&3));
    // The disk holds the three pieces in order.
    let mut want = a.as_slice()[..2048].to_vec();
    want.extend_from_slice(&b.as_slice()[512..2048]);
    want.extend_from_slice(&c.as_slice()[100..612]);
    assert_eq!(&r.model.disk[40 * 512..40 * 512 + 4096], &want[..]);
    // Read back through another odd layout.
    let (x, y) = (dma(8192, 0), dma(8192, 0));
    let back = iovs(&[(&x, 300, 1000), (&y, 8, 3096)]);
    submit(&mut q, rw(io::READ, 40, 4096), &back, Dir::FromCtrl, 2).expect("SGL read");
    assert_eq!(drive(&mut q, &mut r.model, 1).len(), 1);
    let mut got = x.as_slice()[300..1300].to_vec();
    got.extend_from_slice(&y.as_slice()[8..3104]);
    assert_eq!(got, want);
    // Page-joined buffers still go with PRPs.
    let sgls = r.model.sgl_log.len();
    submit(&mut q, w(4096), &iovs(&[(&a, 0, 4096)]), Dir::ToCtrl, 3).unwrap();
    assert_eq!(drive(&mut q, &mut r.model, 1).len(), 1);
    assert_eq!(r.model.sgl_log.len(), sgls);
    // A controller that wants dword-aligned blocks: a piece at an odd address is refused.
    q.enable_sgl(true);
    let unaligned = iovs(&[(&a, 0, 2048), (&b, 3, 2048)]);
    assert_eq!(
        submit(&mut q, w(4096), &unaligned, Dir::ToCtrl, 4),
        Err(SubmitError::BadBuffer)
    );
    r.check();
}
