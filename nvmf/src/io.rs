//! NVM I/O commands onto bdev I/O (SPDK's `ctrlr_bdev.c`): Read, Write, Compare, Write Zeroes, Flush, Dataset
//! Management (deallocate), Copy; other opcodes pass through to an NVMe bdev. Runs on the poll group's thread with the poll group's channel; the bdev I/O carries
//! the queue pair key and command slot in its context word and completes through [`crate::pg::io_done`].

use bdev::{Completion, IoStatus, IoType, IoVec};
use nvme_proto::cmd::{io as opc, CopyRange, DsmRange, Sqe};
use nvme_proto::status::{generic, path, sct, specific, Status};

use crate::pg::{AnaTable, PgNs, PgSubsys};

/// What happened to a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// `n` bdev I/Os were submitted; the command completes when all have.
    Submitted(u16),
    /// The command completes now with this status.
    Done(Status),
}

/// The most DSM ranges one command may carry.
const MAX_DSM_RANGES: usize = 256;

fn invalid_ns() -> Start {
    Start::Done(Status::generic(generic::INVALID_NAMESPACE_OR_FORMAT).dnr())
}

/// The path status for an ANA state that does not allow I/O.
pub fn ana_status(state: u8) -> Option<Status> {
    match state {
        // Optimized, non-optimized.
        0x1 | 0x2 => None,
        0x3 => Some(Status::new(sct::PATH, path::ASYMMETRIC_ACCESS_INACCESSIBLE)),
        0x4 => Some(Status::new(
            sct::PATH,
            path::ASYMMETRIC_ACCESS_PERSISTENT_LOSS,
        )),
        0xf => Some(Status::new(sct::PATH, path::ASYMMETRIC_ACCESS_TRANSITION)),
        _ => Some(Status::new(sct::PATH, path::INTERNAL_PATH_ERROR)),
    }
}

/// Converts a bdev outcome to the NVMe status sent to the host (the bdev's own NVMe status when it has one).
#[inline]
pub fn status_of(s: IoStatus) -> Status {
    let n = s.nvme();
    Status {
        sct: n.sct,
        sc: n.sc,
        crd: n.crd,
        more: false,
        dnr: n.dnr,
    }
}

/// Starts the I/O command `sqe` on `sub`. `buf`/`buf_len` is the command's data buffer (the host's data for
/// writes, the place for read data); `ana` is the ANA table of the listener the queue pair connected through.
///
/// # Safety
/// `buf` must point to `buf_len` bytes that stay valid, and are not otherwise accessed, until every bdev I/O
/// submitted here has completed (the transport keeps the buffer with the command slot until then).
pub unsafe fn exec(
    sub: &PgSubsys,
    ana: Option<&AnaTable>,
    host: &str,
    sqe: &Sqe,
    buf: *mut u8,
    buf_len: u32,
    ctx: u64,
) -> Start {
    let ns = match namespace(sub, ana, host, sqe) {
        Ok(ns) => ns,
        Err(s) => return s,
    };
    match sqe.opc() {
        opc::READ | opc::WRITE | opc::COMPARE => {
            // SAFETY: forwarded from the caller.
            unsafe { rw(&ns, sqe, buf, buf_len, ctx) }
        }
        opc::WRITE_ZEROES => {
            if !ns.write_zeroes {
                return Start::Done(Status::generic(generic::INVALID_OPCODE).dnr());
            }
            let (slba, nlb) = (sqe.slba(), sqe.nlb() as u64);
            if let Some(s) = range_check(&ns, slba, nlb) {
                return Start::Done(s);
            }
            submit_nodata(&ns, IoType::WriteZeroes, slba, nlb, ctx)
        }
        opc::FLUSH => {
            if !ns.flush {
                // Nothing is cached below: a flush has nothing to do (as SPDK answers it).
                return Start::Done(Status::SUCCESS);
            }
            submit_nodata(&ns, IoType::Flush, 0, ns.num_blocks(), ctx)
        }
        opc::DATASET_MANAGEMENT => {
            // SAFETY: forwarded from the caller.
            unsafe { dsm(&ns, sqe, buf, buf_len, ctx) }
        }
        opc::COPY => {
            // SAFETY: forwarded from the caller.
            unsafe { copy(&ns, sqe, buf, buf_len, ctx) }
        }
        _ if ns.nvme_io => {
            // An NVMe bdev runs what this target does not (SPDK's `nvmf_bdev_ctrlr_nvme_passthru_io`).
            let iov = [IoVec {
                base: buf,
                len: buf_len as usize,
            }];
            let iovs: &[IoVec] = if buf.is_null() { &[] } else { &iov };
            let cmd = bdev::NvmeCmd(sqe.dwords());
            let cb = Completion::Fn(crate::pg::io_done);
            // SAFETY: the caller keeps `buf` alive and untouched until the completion.
            match unsafe { ns.ch.nvme_io_passthru(&cmd, iovs, cb, ctx) } {
                Ok(()) => Start::Submitted(1),
                Err(_) => Start::Done(Status::generic(generic::INVALID_OPCODE).dnr()),
            }
        }
        _ => Start::Done(Status::generic(generic::INVALID_OPCODE).dnr()),
    }
}

/// Copy (SPDK's `nvmf_bdev_ctrlr_copy_cmd`): one source range of descriptor format 0 to SDLBA, by the bdev's
/// copy or the bdev layer's emulation.
///
/// # Safety
/// As [`exec`]; the range is read from `buf` before this returns.
unsafe fn copy(ns: &PgNs, sqe: &Sqe, buf: *mut u8, buf_len: u32, ctx: u64) -> Start {
    let sdlba = sqe.cdw(10) as u64 | (sqe.cdw(11) as u64) << 32;
    let cdw12 = sqe.cdw(12);
    let (nr, format) = (cdw12 & 0xff, (cdw12 >> 8) & 0xf);
    if buf.is_null() || buf_len as usize != (nr as usize + 1) * CopyRange::SIZE {
        return Start::Done(Status::generic(generic::DATA_SGL_LENGTH_INVALID).dnr());
    }
    if nr > 0 {
        let limit = specific::COMMAND_SIZE_LIMIT_EXCEEDED;
        return Start::Done(Status::new(sct::COMMAND_SPECIFIC, limit).dnr());
    }
    if format != 0 {
        return Start::Done(Status::generic(generic::INVALID_FIELD).dnr());
    }
    // SAFETY: the caller guarantees `buf_len` (here exactly one range) readable bytes at `buf`.
    let bytes = unsafe { std::slice::from_raw_parts(buf as *const u8, CopyRange::SIZE) };
    let r = CopyRange::decode(bytes);
    let nlb = r.nlb as u64 + 1;
    if let Some(s) = range_check(ns, r.slba, nlb).or_else(|| range_check(ns, sdlba, nlb)) {
        return Start::Done(s);
    }
    let cb = Completion::Fn(crate::pg::io_done);
    match ns.ch.copy(sdlba, r.slba, nlb, cb, ctx) {
        Ok(()) => Start::Submitted(1),
        Err(_) => Start::Done(Status::generic(generic::INTERNAL_DEVICE_ERROR)),
    }
}

/// The command's namespace in this poll group, if it exists and its ANA state at this listener allows I/O.
fn namespace(
    sub: &PgSubsys,
    ana: Option<&AnaTable>,
    host: &str,
    sqe: &Sqe,
) -> Result<std::rc::Rc<PgNs>, Start> {
    let ns = {
        let t = sub.ns.borrow();
        match sqe.nsid().checked_sub(1).and_then(|i| t.get(i as usize)) {
            // A namespace not visible to this host is, for it, not there (as SPDK answers).
            Some(Some(ns)) if ns.allows(host) => ns.clone(),
            _ => return Err(invalid_ns()),
        }
    };
    if sub.ana_reporting.get() {
        if let Some(a) = ana {
            let st = a
                .borrow()
                .get(ns.anagrpid.saturating_sub(1) as usize)
                .copied()
                .unwrap_or(crate::tgt::AnaState::Optimized.code());
            if let Some(s) = ana_status(st) {
                return Err(Start::Done(s));
            }
        }
    }
    Ok(ns)
}

/// A fused Compare (`first`) and Write (`second`): the write happens only if the compare matched, with no
/// other write to those blocks in between (SPDK's `nvmf_bdev_ctrlr_compare_and_write_cmd`). Both must name the
/// same namespace and blocks.
///
/// # Safety
/// As [`exec`], for both buffers.
#[allow(clippy::too_many_arguments)]
pub unsafe fn compare_and_write(
    sub: &PgSubsys,
    ana: Option<&AnaTable>,
    host: &str,
    first: &Sqe,
    cmp: (*mut u8, u32),
    second: &Sqe,
    write: (*mut u8, u32),
    ctx: u64,
) -> Start {
    let ns = match namespace(sub, ana, host, second) {
        Ok(ns) => ns,
        Err(s) => return s,
    };
    let (slba, nlb) = (second.slba(), second.nlb() as u64);
    if first.nsid() != second.nsid() || first.slba() != slba || first.nlb() as u64 != nlb {
        return Start::Done(Status::generic(generic::INVALID_FIELD).dnr());
    }
    if !ns.compare {
        return Start::Done(Status::generic(generic::INVALID_OPCODE).dnr());
    }
    if let Some(s) = range_check(&ns, slba, nlb) {
        return Start::Done(s);
    }
    let len = nlb * ns.block_size as u64;
    if len > cmp.1 as u64 || len > write.1 as u64 {
        return Start::Done(Status::generic(generic::DATA_SGL_LENGTH_INVALID).dnr());
    }
    let c = [IoVec {
        base: cmp.0,
        len: len as usize,
    }];
    let w = [IoVec {
        base: write.0,
        len: len as usize,
    }];
    let cb = Completion::Fn(crate::pg::io_done);
    // SAFETY: the caller keeps both buffers alive and untouched until the completion.
    match unsafe { ns.ch.compare_and_writev(&c, &w, slba, nlb, cb, ctx) } {
        Ok(()) => Start::Submitted(1),
        Err(_) => Start::Done(Status::generic(generic::INTERNAL_DEVICE_ERROR)),
    }
}

fn range_check(ns: &PgNs, slba: u64, nlb: u64) -> Option<Status> {
    match slba.checked_add(nlb) {
        Some(end) if end <= ns.num_blocks() => None,
        _ => Some(Status::generic(generic::LBA_OUT_OF_RANGE).dnr()),
    }
}

fn submit_nodata(ns: &PgNs, t: IoType, slba: u64, nlb: u64, ctx: u64) -> Start {
    match ns
        .ch
        .submit_nodata(t, slba, nlb, Completion::Fn(crate::pg::io_done), ctx)
    {
        Ok(()) => Start::Submitted(1),
        Err(_) => Start::Done(Status::generic(generic::INTERNAL_DEVICE_ERROR)),
    }
}

/// Read, Write, Compare.
///
/// # Safety
/// As [`exec`].
unsafe fn rw(ns: &PgNs, sqe: &Sqe, buf: *mut u8, buf_len: u32, ctx: u64) -> Start {
    let (slba, nlb) = (sqe.slba(), sqe.nlb() as u64);
    if let Some(s) = range_check(ns, slba, nlb) {
        return Start::Done(s);
    }
    let len = nlb * ns.block_size as u64;
    if len > buf_len as u64 {
        return Start::Done(Status::generic(generic::DATA_SGL_LENGTH_INVALID).dnr());
    }
    let iov = [IoVec {
        base: buf,
        len: len as usize,
    }];
    let cb = Completion::Fn(crate::pg::io_done);
    // SAFETY: the caller keeps `buf` (at least `len` bytes) alive and untouched until the completion.
    let r = unsafe {
        match sqe.opc() {
            opc::READ => ns.ch.readv(&iov, slba, nlb, cb, ctx),
            opc::WRITE => ns.ch.writev(&iov, slba, nlb, cb, ctx),
            _ => {
                if !ns.compare {
                    return Start::Done(Status::generic(generic::INVALID_OPCODE).dnr());
                }
                ns.ch.comparev(&iov, slba, nlb, cb, ctx)
            }
        }
    };
    match r {
        Ok(()) => Start::Submitted(1),
        Err(_) => Start::Done(Status::generic(generic::INTERNAL_DEVICE_ERROR)),
    }
}

/// Dataset Management: deallocate the listed ranges (one unmap each); other attributes are hints and succeed.
///
/// # Safety
/// As [`exec`]; the ranges are read from `buf` before this returns.
unsafe fn dsm(ns: &PgNs, sqe: &Sqe, buf: *mut u8, buf_len: u32, ctx: u64) -> Start {
    let nr = (sqe.cdw(10) & 0xff) as usize + 1;
    if sqe.cdw(11) & DsmRange::AD == 0 {
        return Start::Done(Status::SUCCESS);
    }
    if !ns.unmap {
        return Start::Done(Status::generic(generic::INVALID_OPCODE).dnr());
    }
    let need = nr * DsmRange::SIZE;
    if nr > MAX_DSM_RANGES || need > buf_len as usize {
        return Start::Done(Status::generic(generic::DATA_SGL_LENGTH_INVALID).dnr());
    }
    // SAFETY: the caller guarantees `buf_len` readable bytes at `buf`, and `need <= buf_len`.
    let bytes = unsafe { std::slice::from_raw_parts(buf as *const u8, need) };
    let mut ranges = [DsmRange::default(); MAX_DSM_RANGES];
    for (i, r) in ranges.iter_mut().take(nr).enumerate() {
        *r = DsmRange::decode(&bytes[i * DsmRange::SIZE..]);
        if let Some(s) = range_check(ns, r.slba, r.nlb as u64) {
            return Start::Done(s);
        }
    }
    let mut n = 0u16;
    for r in ranges.iter().take(nr).filter(|r| r.nlb > 0) {
        if ns
            .ch
            .submit_nodata(
                IoType::Unmap,
                r.slba,
                r.nlb as u64,
                Completion::Fn(crate::pg::io_done),
                ctx,
            )
            .is_err()
        {
            break;
        }
        n += 1;
    }
    if n == 0 {
        return Start::Done(Status::SUCCESS);
    }
    Start::Submitted(n)
}

/// Whether an I/O opcode moves data from host to controller (so its data must arrive before it runs).
#[inline]
pub fn is_h2c(opc: u8) -> bool {
    opc & 0x3 == 0x1
}

/// The I/O opcodes this target runs, for the Commands Supported and Effects log.
pub const SUPPORTED: [u8; 7] = [
    opc::FLUSH,
    opc::WRITE,
    opc::READ,
    opc::COMPARE,
    opc::WRITE_ZEROES,
    opc::DATASET_MANAGEMENT,
    opc::COPY,
];
