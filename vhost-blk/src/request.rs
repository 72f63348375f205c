//! The virtio-blk request parser: a descriptor chain (from either ring layout) in, a validated request out.
//!
//! Everything the guest supplies is checked here before use: the chain's shape (header first, device-writable
//! 1-byte status last), every buffer's direction and that it lies inside guest memory, lengths, alignment,
//! ranges against the disk's size, and the request type against what the controller offers. The parser is pure
//! (no I/O, no allocation: data buffers go into a caller-owned iovec vector with fixed capacity), so it runs in
//! property tests over arbitrary input.

use bdev::IoVec;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::mem::FastMem;

/// Size of `struct virtio_blk_outhdr`.
pub const HDR_LEN: u32 = 16;
/// Size of one discard / write-zeroes segment.
pub const SEG_LEN: u32 = 16;
/// virtio-blk's sector: offsets in requests are in 512-byte units whatever the block size.
pub const SECTOR: u64 = 512;
/// Bytes of the serial returned by `GET_ID`.
pub const ID_BYTES: u32 = 20;

/// Request status: success.
pub const S_OK: u8 = 0;
/// Request status: I/O error.
pub const S_IOERR: u8 = 1;
/// Request status: unsupported request.
pub const S_UNSUPP: u8 = 2;

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Get the device serial.
pub const T_GET_ID: u32 = 8;
/// Discard.
pub const T_DISCARD: u32 = 11;
/// Write zeroes.
pub const T_WRITE_ZEROES: u32 = 13;
/// Legacy barrier flag, ignored (as QEMU and SPDK do).
pub const T_BARRIER: u32 = 0x8000_0000;
/// Write-zeroes flag: the device may deallocate.
pub const WZ_FLAG_UNMAP: u32 = 1;

/// One descriptor, as either ring layout describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (the guest reads it back).
    pub write: bool,
}

/// Why a chain could not even be walked (the queue is then broken: there is no trustworthy status byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// A loop, a `next` out of range, a chain longer than the queue, or a bad indirect table.
    Malformed,
    /// No descriptor at all, or the descriptor table is not in guest memory.
    Empty,
}

/// What the controller's disk looks like to the parser.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Logical block size in bytes (a multiple of 512).
    pub block_size: u32,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Writes, discards and write-zeroes fail with IOERR.
    pub readonly: bool,
    /// The bdev is there (false after hot-remove: everything fails with IOERR).
    pub online: bool,
    /// FLUSH is offered.
    pub flush: bool,
    /// DISCARD is offered.
    pub discard: bool,
    /// WRITE_ZEROES is offered.
    pub write_zeroes: bool,
    /// Largest discard, in sectors.
    pub max_discard_sectors: u32,
    /// Largest write-zeroes, in sectors.
    pub max_write_zeroes_sectors: u32,
}

/// The bdev operation a request becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read into the iovecs.
    Read,
    /// Write from the iovecs.
    Write,
    /// Flush.
    Flush,
    /// Unmap (discard).
    Unmap,
    /// Write zeroes.
    WriteZeroes,
}

/// A parsed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Submit `op` to the bdev; on completion write the status and report `used_len` bytes written.
    Submit {
        /// Where the status byte goes.
        status: GuestAddress,
        /// The operation (`Read`/`Write` use the iovecs the parser filled).
        op: Op,
        /// First block.
        offset_blocks: u64,
        /// Blocks.
        num_blocks: u64,
        /// Bytes the device writes into the chain on success (data read + the status byte).
        used_len: u32,
    },
    /// Write the device serial (`len` bytes at `addr`), then status OK.
    GetId {
        /// Where the status byte goes.
        status: GuestAddress,
        /// Start of the id buffer.
        addr: GuestAddress,
        /// Bytes to write (at most [`ID_BYTES`]).
        len: u32,
    },
    /// Answer at once with an error status (used length 1).
    Fail {
        /// Where the status byte goes.
        status: GuestAddress,
        /// `S_IOERR` or `S_UNSUPP`.
        code: u8,
        /// Why, for the log.
        why: &'static str,
    },
}

impl Parsed {
    /// The status byte's address.
    pub fn status_addr(&self) -> GuestAddress {
        match *self {
            Parsed::Submit { status, .. }
            | Parsed::GetId { status, .. }
            | Parsed::Fail { status, .. } => status,
        }
    }
}

/// Why a request cannot be answered with a status (the queue must be marked broken).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Broken(pub &'static str);

/// A parsed header (type, sector) or the status and reason it is refused.
type HdrResult = Result<(u32, u64), (u8, &'static str)>;

/// Whether `[addr, addr+len)` is entirely guest memory.
pub fn in_memory(mem: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
    let mut cur = addr;
    let mut left = len;
    while left > 0 {
        let Some(region) = mem.find_region(GuestAddress(cur)) else {
            return false;
        };
        let off = cur - region.start_addr().0;
        let n = (region.len() - off).min(left);
        left -= n;
        match cur.checked_add(n) {
            Some(c) => cur = c,
            None => return left == 0,
        }
    }
    true
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Checks a byte range of the disk and converts it to blocks.
fn range(geo: &Geometry, sector: u64, bytes: u64) -> Result<(u64, u64), &'static str> {
    let bs = geo.block_size as u64;
    let off = sector.checked_mul(SECTOR).ok_or("sector overflows")?;
    if !off.is_multiple_of(bs) || !bytes.is_multiple_of(bs) {
        return Err("not aligned to the block size");
    }
    let end = off.checked_add(bytes).ok_or("range overflows")?;
    if end > geo.num_blocks.saturating_mul(bs) {
        return Err("past the end of the disk");
    }
    Ok((off / bs, bytes / bs))
}

/// Parses the usual request, a read or write of one buffer (`d`: header, data, status, as
/// [`crate::vring::Chain::three`] gives them), straight from its three descriptors. `None` when it is anything
/// else or anything about it is wrong: [`parse`] then walks the chain and says what (the two agree on every
/// request this accepts; `tests/parser_prop.rs` checks it).
#[inline]
pub fn parse_three(
    d: &[RawDesc; 3],
    mem: &FastMem,
    geo: &Geometry,
    iovs: &mut Vec<IoVec>,
    max_iovs: usize,
) -> Option<Parsed> {
    let [h, data, st] = d;
    if h.write
        || h.len != HDR_LEN
        || !st.write
        || st.len != 1
        || data.len == 0
        || data.len == u32::MAX
    {
        return None;
    }
    let (ty, sector) = mem.read_u64_pair(h.addr)?;
    let op = match ty as u32 & !T_BARRIER {
        T_IN if data.write => Op::Read,
        T_OUT if !data.write && !geo.readonly => Op::Write,
        _ => return None,
    };
    let len = data.len as u64;
    if !geo.online || !len.is_multiple_of(SECTOR) || !mem.contains(st.addr, 1) {
        return None;
    }
    let (offset_blocks, num_blocks) = range(geo, sector, len).ok()?;
    iovs.clear();
    mem.translate(data.addr, data.len, iovs, max_iovs).ok()?;
    Some(Parsed::Submit {
        status: GuestAddress(st.addr),
        op,
        offset_blocks,
        num_blocks,
        used_len: if op == Op::Read { data.len + 1 } else { 1 },
    })
}

/// Parses one request. `descs` yields the chain in order; `iovs` is cleared and receives the data buffers of
/// reads and writes (at most `max_iovs`). `Err` means the chain has no usable status byte: the caller marks
/// the queue broken.
pub fn parse<I>(
    descs: I,
    mem: &FastMem,
    geo: &Geometry,
    iovs: &mut Vec<IoVec>,
    max_iovs: usize,
) -> Result<Parsed, Broken>
where
    I: Iterator<Item = Result<RawDesc, ChainError>>,
{
    iovs.clear();
    let mut hdr: Option<HdrResult> = None;
    let mut prev: Option<RawDesc> = None;
    let mut ndata = 0u32;
    let mut first_data: Option<RawDesc> = None;
    let mut data_len: u64 = 0;
    let mut data_readable = false;
    let mut data_writable = false;
    let mut data_err: Option<&'static str> = None;
    let mut want_iovs = false;

    for item in descs {
        let d = item.map_err(|e| match e {
            ChainError::Malformed => Broken("malformed descriptor chain"),
            ChainError::Empty => Broken("empty descriptor chain"),
        })?;
        if hdr.is_none() {
            let h = if d.write {
                Err((S_UNSUPP, "header descriptor is device-writable"))
            } else if d.len != HDR_LEN {
                Err((S_UNSUPP, "header descriptor is not 16 bytes"))
            } else {
                match mem.read::<16>(d.addr) {
                    Some(b) => Ok((le32(&b[0..4]) & !T_BARRIER, le64(&b[8..16]))),
                    None => Err((S_IOERR, "header outside guest memory")),
                }
            };
            want_iovs = matches!(h, Ok((T_IN | T_OUT, _)));
            hdr = Some(h);
            continue;
        }
        let Some(p) = prev.replace(d) else { continue };
        // `p` is a data descriptor (not the last one).
        ndata += 1;
        if first_data.is_none() {
            first_data = Some(p);
        }
        data_len += p.len as u64;
        if p.write {
            data_writable = true;
        } else {
            data_readable = true;
        }
        if want_iovs && data_err.is_none() && p.len > 0 {
            if let Err(e) = mem.translate(p.addr, p.len, iovs, max_iovs) {
                data_err = Some(e);
            }
        }
    }

    let Some(hdr) = hdr else {
        return Err(Broken("empty descriptor chain"));
    };
    let Some(st) = prev else {
        return Err(Broken("chain has no status descriptor"));
    };
    if !st.write {
        return Err(Broken("status descriptor is not device-writable"));
    }
    if st.len != 1 {
        return Err(Broken("status descriptor is not 1 byte"));
    }
    if !mem.contains(st.addr, 1) {
        return Err(Broken("status byte outside guest memory"));
    }
    let status = GuestAddress(st.addr);
    let fail = |code: u8, why: &'static str| Ok(Parsed::Fail { status, code, why });

    let (ty, sector) = match hdr {
        Ok(h) => h,
        Err((code, why)) => return fail(code, why),
    };
    match ty {
        T_IN | T_OUT => {
            if data_len == 0 || !data_len.is_multiple_of(SECTOR) {
                return fail(S_UNSUPP, "data is not a multiple of 512 bytes");
            }
            if !geo.online {
                return fail(S_IOERR, "bdev removed");
            }
            if ty == T_OUT && geo.readonly {
                return fail(S_IOERR, "write to a read-only controller");
            }
            let dir_ok = if ty == T_IN {
                !data_readable
            } else {
                !data_writable
            };
            if !dir_ok {
                return fail(S_IOERR, "data descriptor of the wrong direction");
            }
            if let Some(e) = data_err {
                return fail(S_IOERR, e);
            }
            if data_len >= u32::MAX as u64 {
                return fail(S_IOERR, "request too large");
            }
            let (offset_blocks, num_blocks) = match range(geo, sector, data_len) {
                Ok(r) => r,
                Err(e) => return fail(S_IOERR, e),
            };
            let (op, used_len) = if ty == T_IN {
                (Op::Read, data_len as u32 + 1)
            } else {
                (Op::Write, 1)
            };
            Ok(Parsed::Submit {
                status,
                op,
                offset_blocks,
                num_blocks,
                used_len,
            })
        }
        T_FLUSH => {
            if !geo.flush {
                return fail(S_UNSUPP, "flush not offered");
            }
            if !geo.online {
                return fail(S_IOERR, "bdev removed");
            }
            if sector != 0 {
                return fail(S_IOERR, "flush with a non-zero sector");
            }
            Ok(Parsed::Submit {
                status,
                op: Op::Flush,
                offset_blocks: 0,
                num_blocks: geo.num_blocks,
                used_len: 1,
            })
        }
        T_GET_ID => match first_data {
            Some(d) if d.write && d.len > 0 => {
                let len = d.len.min(ID_BYTES);
                if !mem.contains(d.addr, len as u64) {
                    return fail(S_IOERR, "id buffer outside guest memory");
                }
                Ok(Parsed::GetId {
                    status,
                    addr: GuestAddress(d.addr),
                    len,
                })
            }
            _ => fail(S_UNSUPP, "GET_ID without a writable buffer"),
        },
        T_DISCARD | T_WRITE_ZEROES => {
            let discard = ty == T_DISCARD;
            if (discard && !geo.discard) || (!discard && !geo.write_zeroes) {
                return fail(S_UNSUPP, "discard/write-zeroes not offered");
            }
            if !geo.online {
                return fail(S_IOERR, "bdev removed");
            }
            if geo.readonly {
                return fail(S_IOERR, "discard/write-zeroes on a read-only controller");
            }
            let seg = match first_data {
                Some(d) if ndata == 1 && !d.write && d.len == SEG_LEN => d,
                _ => return fail(S_IOERR, "discard/write-zeroes needs one 16-byte segment"),
            };
            let Some(b) = mem.read::<16>(seg.addr) else {
                return fail(S_IOERR, "segment outside guest memory");
            };
            let (seg_sector, nsect, flags) = (le64(&b[0..8]), le32(&b[8..12]), le32(&b[12..16]));
            if flags & !WZ_FLAG_UNMAP != 0 || (discard && flags != 0) {
                return fail(S_UNSUPP, "unsupported segment flags");
            }
            let max = if discard {
                geo.max_discard_sectors
            } else {
                geo.max_write_zeroes_sectors
            };
            if nsect == 0 || nsect > max {
                return fail(S_IOERR, "segment length out of limits");
            }
            let (offset_blocks, num_blocks) = match range(geo, seg_sector, nsect as u64 * SECTOR) {
                Ok(r) => r,
                Err(e) => return fail(S_IOERR, e),
            };
            Ok(Parsed::Submit {
                status,
                op: if discard { Op::Unmap } else { Op::WriteZeroes },
                offset_blocks,
                num_blocks,
                used_len: 1,
            })
        }
        _ => fail(S_UNSUPP, "unknown request type"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x20000), 0x10000),
        ])
        .unwrap()
    }

    fn geo() -> Geometry {
        Geometry {
            block_size: 512,
            num_blocks: 64,
            readonly: false,
            online: true,
            flush: true,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 32768,
            max_write_zeroes_sectors: 32768,
        }
    }

    fn hdr(m: &GuestMemoryMmap, at: u64, ty: u32, sector: u64) -> RawDesc {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&ty.to_le_bytes());
        b[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&b, GuestAddress(at)).unwrap();
        RawDesc {
            addr: at,
            len: 16,
            write: false,
        }
    }

    fn st(at: u64) -> RawDesc {
        RawDesc {
            addr: at,
            len: 1,
            write: true,
        }
    }

    fn run(
        m: &GuestMemoryMmap,
        g: &Geometry,
        d: &[RawDesc],
    ) -> (Result<Parsed, Broken>, Vec<IoVec>) {
        let mut iovs = Vec::with_capacity(8);
        let fm = FastMem::new(std::sync::Arc::new(m.clone()));
        let r = parse(d.iter().map(|d| Ok(*d)), &fm, g, &mut iovs, 8);
        (r, iovs)
    }

    #[test]
    fn read_spanning_regions() {
        let m = mem();
        let g = geo();
        let h = hdr(&m, 0x100, T_IN, 2);
        // 0xfe00..0x10000 is the end of region 0; 0x10000.. is a hole, so use a buffer inside region 0 and one
        // in region 1.
        let d1 = RawDesc {
            addr: 0xfe00,
            len: 512,
            write: true,
        };
        let d2 = RawDesc {
            addr: 0x20000,
            len: 1024,
            write: true,
        };
        let (r, iovs) = run(&m, &g, &[h, d1, d2, st(0x200)]);
        assert_eq!(
            r.unwrap(),
            Parsed::Submit {
                status: GuestAddress(0x200),
                op: Op::Read,
                offset_blocks: 2,
                num_blocks: 3,
                used_len: 1537
            }
        );
        assert_eq!(iovs.len(), 2);
    }

    #[test]
    fn hole_and_overflow_are_ioerr() {
        let m = mem();
        let g = geo();
        let h = hdr(&m, 0x100, T_OUT, 0);
        let bad = RawDesc {
            addr: 0xff00,
            len: 512,
            write: false,
        }; // runs into the hole at 0x10000
        let (r, _) = run(&m, &g, &[h, bad, st(0x200)]);
        assert!(matches!(r, Ok(Parsed::Fail { code: S_IOERR, .. })), "{r:?}");
        let huge = RawDesc {
            addr: u64::MAX - 10,
            len: 512,
            write: false,
        };
        let (r, _) = run(&m, &g, &[h, huge, st(0x200)]);
        assert!(matches!(r, Ok(Parsed::Fail { code: S_IOERR, .. })), "{r:?}");
    }

    #[test]
    fn past_end_and_readonly() {
        let m = mem();
        let mut g = geo();
        let h = hdr(&m, 0x100, T_IN, 63);
        let d = RawDesc {
            addr: 0x1000,
            len: 1024,
            write: true,
        };
        let (r, _) = run(&m, &g, &[h, d, st(0x200)]);
        assert!(
            matches!(
                r,
                Ok(Parsed::Fail {
                    code: S_IOERR,
                    why: "past the end of the disk",
                    ..
                })
            ),
            "{r:?}"
        );
        g.readonly = true;
        let h = hdr(&m, 0x100, T_OUT, 0);
        let d = RawDesc {
            addr: 0x1000,
            len: 512,
            write: false,
        };
        let (r, _) = run(&m, &g, &[h, d, st(0x200)]);
        assert!(matches!(r, Ok(Parsed::Fail { code: S_IOERR, .. })), "{r:?}");
    }

    #[test]
    fn bad_status_breaks_queue() {
        let m = mem();
        let g = geo();
        let h = hdr(&m, 0x100, T_FLUSH, 0);
        let (r, _) = run(
            &m,
            &g,
            &[
                h,
                RawDesc {
                    addr: 0x200,
                    len: 2,
                    write: true,
                },
            ],
        );
        assert_eq!(r, Err(Broken("status descriptor is not 1 byte")));
        let (r, _) = run(
            &m,
            &g,
            &[
                h,
                RawDesc {
                    addr: 0x200,
                    len: 1,
                    write: false,
                },
            ],
        );
        assert!(r.is_err());
        let (r, _) = run(&m, &g, &[h, st(0x18000)]);
        assert!(r.is_err());
        let (r, _) = run(&m, &g, &[h]);
        assert!(r.is_err());
    }

    #[test]
    fn bad_header_is_unsupp() {
        let m = mem();
        let g = geo();
        let mut h = hdr(&m, 0x100, T_IN, 0);
        h.len = 17;
        let (r, _) = run(&m, &g, &[h, st(0x200)]);
        assert!(matches!(r, Ok(Parsed::Fail { code: S_UNSUPP, .. })));
        h.len = 16;
        h.write = true;
        let (r, _) = run(&m, &g, &[h, st(0x200)]);
        assert!(matches!(r, Ok(Parsed::Fail { code: S_UNSUPP, .. })));
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        let g = geo();
        let h = hdr(&m, 0x100, T_WRITE_ZEROES, 0);
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&4u64.to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        seg[12..16].copy_from_slice(&WZ_FLAG_UNMAP.to_le_bytes());
        m.write_slice(&seg, GuestAddress(0x300)).unwrap();
        let s = RawDesc {
            addr: 0x300,
            len: 16,
            write: false,
        };
        let (r, _) = run(&m, &g, &[h, s, st(0x200)]);
        assert_eq!(
            r.unwrap(),
            Parsed::Submit {
                status: GuestAddress(0x200),
                op: Op::WriteZeroes,
                offset_blocks: 4,
                num_blocks: 8,
                used_len: 1
            }
        );
        // The unmap flag is for write-zeroes only.
        let h = hdr(&m, 0x100, T_DISCARD, 0);
        let (r, _) = run(&m, &g, &[h, s, st(0x200)]);
        assert!(
            matches!(r, Ok(Parsed::Fail { code: S_UNSUPP, .. })),
            "{r:?}"
        );
    }
}
