//! Guest memory for the hot path: the memory table as a short list of (guest address, length, host pointer)
//! built once per table, so a guest address is checked and translated with a compare or two instead of
//! `vm-memory`'s generic accessors.
//!
//! Every access checks that the whole range lies inside one mapped region before touching it. Guest memory is
//! shared with a guest that may change it at any time, so values are copied out (never referenced) and read
//! once; that is what any device model does with guest RAM.
//!
//! A memory table the back end mapped is a [`MemTable`]: its regions are registered in the memory map
//! (`reactor::memmap`) for as long as anything (the back end, the device, I/O still in flight on a replaced
//! table) holds it, and unregistered before the mappings go away.

use std::sync::Arc;

use bdev::IoVec;
use reactor::memmap::{self, MemError, Registration};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

/// A guest memory table with its memory map registrations.
pub struct MemTable {
    // Declared first so it drops first: regions leave the memory map before `mem` may unmap them.
    regs: Vec<Registration>,
    mem: Arc<GuestMemoryMmap>,
}

impl MemTable {
    /// Registers every region of `mem` (host address and length) in the memory map. Fails, registering
    /// nothing, when a region overlaps registered memory or a memory map subscriber refuses it.
    pub fn register(mem: GuestMemoryMmap) -> Result<MemTable, MemError> {
        let mut regs = Vec::with_capacity(mem.num_regions());
        for r in mem.iter() {
            let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else {
                continue;
            };
            regs.push(memmap::register(host as usize, r.len() as usize)?);
        }
        Ok(MemTable {
            regs,
            mem: Arc::new(mem),
        })
    }

    /// A table outside the memory map (tests and benchmarks that map guest memory themselves).
    pub fn unregistered(mem: Arc<GuestMemoryMmap>) -> MemTable {
        MemTable { regs: vec![], mem }
    }

    /// The underlying `vm-memory` object.
    pub fn guest_memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// The registered regions: (host address, length).
    pub fn registered(&self) -> Vec<(usize, usize)> {
        self.regs.iter().map(|r| (r.addr(), r.size())).collect()
    }
}

#[derive(Clone, Copy, Debug)]
struct Region {
    gpa: u64,
    len: u64,
    host: *mut u8,
}

/// A memory table ready for fast access. Holds the mapping (and its memory map registrations) alive.
pub struct FastMem {
    regions: Vec<Region>,
    table: Arc<MemTable>,
}

impl FastMem {
    /// Indexes `mem`'s regions (a table outside the memory map).
    pub fn new(mem: Arc<GuestMemoryMmap>) -> FastMem {
        FastMem::from_table(Arc::new(MemTable::unregistered(mem)))
    }

    /// Indexes `table`'s regions.
    pub fn from_table(table: Arc<MemTable>) -> FastMem {
        let mut regions: Vec<Region> = table
            .mem
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some(Region {
                    gpa: r.start_addr().0,
                    len: r.len(),
                    host,
                })
            })
            .collect();
        regions.sort_by_key(|r| r.gpa);
        FastMem { regions, table }
    }

    /// The underlying `vm-memory` object.
    pub fn guest_memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.table.mem
    }

    /// The table this was built from.
    pub fn table(&self) -> &Arc<MemTable> {
        &self.table
    }

    #[inline]
    fn region(&self, gpa: u64) -> Option<&Region> {
        // Guests have one to a few regions: a linear scan beats a binary search. `gpa - r.gpa` wraps to a value
        // past any region's length when `gpa` is below the region, so one compare checks both ends.
        self.regions
            .iter()
            .find(|r| gpa.wrapping_sub(r.gpa) < r.len)
    }

    /// Host pointer to `[gpa, gpa+len)` when that range lies inside one region.
    #[inline]
    fn host(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let r = self.region(gpa)?;
        let off = gpa - r.gpa;
        if len > r.len - off {
            return None;
        }
        // `off < r.len`, so the pointer stays inside the mapping.
        Some(r.host.wrapping_add(off as usize))
    }

    /// The two little-endian `u64`s at `gpa` (a ring descriptor), read as two loads rather than through a byte
    /// array: the descriptor walk runs for every request.
    #[inline]
    pub fn read_u64_pair(&self, gpa: u64) -> Option<(u64, u64)> {
        match self.host(gpa, 16) {
            Some(p) => {
                // SAFETY: `host` checked that `[p, p+16)` lies inside a live mapping (kept by `self.table`);
                // unaligned reads need no alignment, and guest memory is only accessed through raw copies.
                let (a, b) = unsafe {
                    (
                        std::ptr::read_unaligned(p.cast::<u64>()),
                        std::ptr::read_unaligned(p.add(8).cast::<u64>()),
                    )
                };
                Some((u64::from_le(a), u64::from_le(b)))
            }
            None => {
                let b = self.read::<16>(gpa)?;
                let (a, c) = b.split_at(8);
                Some((
                    u64::from_le_bytes(a.try_into().ok()?),
                    u64::from_le_bytes(c.try_into().ok()?),
                ))
            }
        }
    }

    /// Writes the little-endian `u64` `v` at `gpa` with one store (a used ring element); false when out of range.
    #[inline]
    pub fn write_u64(&self, gpa: u64, v: u64) -> bool {
        match self.host(gpa, 8) {
            Some(p) => {
                // SAFETY: `[p, p+8)` is inside a live mapping; unaligned writes need no alignment.
                unsafe { std::ptr::write_unaligned(p.cast::<u64>(), v.to_le()) };
                true
            }
            None => self.write(gpa, &v.to_le_bytes()),
        }
    }

    /// Copies `N` bytes at `gpa` out of guest memory (the range may span regions).
    #[inline]
    pub fn read<const N: usize>(&self, gpa: u64) -> Option<[u8; N]> {
        let mut out = [0u8; N];
        if let Some(p) = self.host(gpa, N as u64) {
            // SAFETY: `host` checked that `[p, p+N)` lies inside a live mapping (kept by `self.table`); `out` is a
            // distinct local buffer.
            unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), N) };
            return Some(out);
        }
        // Rare: the range crosses a region boundary.
        let mut done = 0usize;
        while done < N {
            let cur = gpa.checked_add(done as u64)?;
            let r = self.region(cur)?;
            let off = cur - r.gpa;
            let n = ((r.len - off) as usize).min(N - done);
            // SAFETY: `[off, off+n)` is inside region `r`'s live mapping; `out[done..done+n]` is in bounds.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    r.host.wrapping_add(off as usize),
                    out.as_mut_ptr().add(done),
                    n,
                )
            };
            done += n;
        }
        Some(out)
    }

    /// Copies `data` into guest memory at `gpa` (the range may span regions). False if any byte is outside.
    #[inline]
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        if !self.contains(gpa, data.len() as u64) {
            return false;
        }
        let mut done = 0usize;
        while done < data.len() {
            let cur = gpa + done as u64;
            let Some(r) = self.region(cur) else {
                return false;
            };
            let off = cur - r.gpa;
            let n = ((r.len - off) as usize).min(data.len() - done);
            // SAFETY: `[off, off+n)` is inside region `r`'s live mapping; the source is a distinct slice.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr().add(done),
                    r.host.wrapping_add(off as usize),
                    n,
                )
            };
            done += n;
        }
        true
    }

    /// Writes one byte (a status).
    #[inline]
    pub fn write_u8(&self, gpa: u64, v: u8) -> bool {
        match self.host(gpa, 1) {
            Some(p) => {
                // SAFETY: `p` points at one byte inside a live mapping.
                unsafe { std::ptr::write_volatile(p, v) };
                true
            }
            None => false,
        }
    }

    /// Atomically loads the (2-aligned) little-endian `u16` at `gpa` with acquire ordering: ring indexes the
    /// driver publishes.
    #[inline]
    pub fn load_u16(&self, gpa: u64) -> Option<u16> {
        let p = self.host(gpa, 2)?;
        if !(p as usize).is_multiple_of(2) {
            return None;
        }
        // SAFETY: `p` is 2-aligned and inside a live mapping (kept by `self.table`); the memory is only ever
        // accessed through raw copies and atomics, never through references.
        let a = unsafe { std::sync::atomic::AtomicU16::from_ptr(p.cast::<u16>()) };
        Some(u16::from_le(a.load(std::sync::atomic::Ordering::Acquire)))
    }

    /// Atomically stores a little-endian `u16` at (2-aligned) `gpa` with release ordering: ring indexes the
    /// device publishes. False when out of range or misaligned.
    #[inline]
    pub fn store_u16(&self, gpa: u64, v: u16) -> bool {
        let Some(p) = self.host(gpa, 2) else {
            return false;
        };
        if !(p as usize).is_multiple_of(2) {
            return false;
        }
        // SAFETY: as in `load_u16`.
        let a = unsafe { std::sync::atomic::AtomicU16::from_ptr(p.cast::<u16>()) };
        a.store(v.to_le(), std::sync::atomic::Ordering::Release);
        true
    }

    /// Whether `[gpa, gpa+len)` is entirely guest memory.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let mut cur = gpa;
        let mut left = len;
        while left > 0 {
            let Some(r) = self.region(cur) else {
                return false;
            };
            let n = (r.len - (cur - r.gpa)).min(left);
            left -= n;
            match cur.checked_add(n) {
                Some(c) => cur = c,
                None => return left == 0,
            }
        }
        true
    }

    /// Appends iovecs covering `[gpa, gpa+len)` (one per region crossed). Fails when any byte is outside guest
    /// memory or `iovs` would exceed `cap` entries.
    #[inline]
    pub fn translate(
        &self,
        gpa: u64,
        len: u32,
        iovs: &mut Vec<IoVec>,
        cap: usize,
    ) -> Result<(), &'static str> {
        let mut cur = gpa;
        let mut left = len as u64;
        while left > 0 {
            let r = self.region(cur).ok_or("buffer outside guest memory")?;
            let off = cur - r.gpa;
            let n = (r.len - off).min(left);
            if iovs.len() >= cap {
                return Err("too many segments");
            }
            iovs.push(IoVec {
                base: r.host.wrapping_add(off as usize),
                len: n as usize,
            });
            left -= n;
            cur = cur.checked_add(n).ok_or("buffer address overflows")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn fast() -> FastMem {
        // Two adjacent regions, so a 16-byte read at 0xfff8 spans both, and a hole after them.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        FastMem::new(Arc::new(mem))
    }

    #[test]
    fn pairs_and_words_are_little_endian_inside_and_across_regions() {
        let f = fast();
        let bytes: Vec<u8> = (1..=16).collect();
        for at in [0x100u64, 0x103, 0xfff8, 0xfffc, 0x1fff0] {
            assert!(f.write(at, &bytes));
            let want = (
                u64::from_le_bytes(bytes[..8].try_into().unwrap()),
                u64::from_le_bytes(bytes[8..].try_into().unwrap()),
            );
            assert_eq!(f.read_u64_pair(at), Some(want), "at {at:#x}");
            assert!(f.write_u64(at, 0x1122_3344_5566_7788));
            let back = f
                .guest_memory()
                .read_obj::<[u8; 8]>(GuestAddress(at))
                .unwrap();
            assert_eq!(back, 0x1122_3344_5566_7788u64.to_le_bytes(), "at {at:#x}");
        }
        // Past the end of guest memory, wholly or partly: refused, nothing written.
        assert_eq!(f.read_u64_pair(0x1fff8), None);
        assert_eq!(f.read_u64_pair(0x30000), None);
        assert!(!f.write_u64(0x1fffc, 1));
        assert_eq!(f.read::<4>(0x1fffc), Some([0x0d, 0x0e, 0x0f, 0x10]));
    }
}
