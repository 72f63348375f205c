//! The two virtqueue layouts behind one interface (virtio 1.1 sections 2.7 and 2.8). Both hand out chains as
//! [`RawDesc`] iterators for the request parser, complete buffers into the used ring, and decide (event idx or
//! flags) whether the driver wants an interrupt.
//!
//! The split ring is implemented here on [`FastMem`] rather than with `virtio-queue`'s `Queue` so that the
//! available index is read once per batch and the used index published once per batch (each is a cache line
//! the driver's CPU polls; touching it per request halves throughput). `virtio-queue`'s chain walker serves as
//! the reference in a differential property test (`tests/parser_prop.rs`).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::mem::FastMem;
use crate::request::{in_memory, ChainError, RawDesc};

/// Largest queue we accept (SPDK's `SPDK_VHOST_MAX_VQ_SIZE`).
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// A ring as the front end configured it (addresses are guest physical).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingConfig {
    /// Number of descriptors.
    pub size: u16,
    /// Descriptor table (split) / descriptor ring (packed).
    pub desc: u64,
    /// Available ring (split) / driver event suppression area (packed).
    pub driver: u64,
    /// Used ring (split) / device event suppression area (packed).
    pub device: u64,
    /// `SET_VRING_BASE`: next available index (packed: bit 15 is the wrap counter).
    pub base: u32,
    /// `VIRTIO_RING_F_EVENT_IDX` negotiated.
    pub event_idx: bool,
    /// `VIRTIO_F_RING_PACKED` negotiated.
    pub packed: bool,
}

/// A chain of descriptors ready for the parser.
pub enum Chain<'m> {
    /// From a split ring.
    Split(SplitChain<'m>),
    /// From a packed ring (already copied out of the ring).
    Packed(PackedChain<'m>),
}

impl Chain<'_> {
    /// The three descriptors of the usual read or write, when the chain is exactly that: direct descriptors
    /// (in the ring's table or in one indirect table at the head), a device-readable header chained to one
    /// data buffer chained to a device-writable last descriptor. `None` for any other shape (the iterator
    /// walks those). Reads the tables only; the caller still validates lengths, addresses and the request.
    #[inline]
    pub fn three(&self) -> Option<[RawDesc; 3]> {
        match self {
            Chain::Split(c) => c.three(),
            Chain::Packed(_) => None,
        }
    }
}

impl Iterator for Chain<'_> {
    type Item = Result<RawDesc, ChainError>;
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Chain::Split(c) => c.next(),
            Chain::Packed(c) => c.next(),
        }
    }
}

/// A split-ring chain. Only the head may refer to an indirect table (as QEMU requires); the walk stops with
/// [`ChainError::Malformed`] on a `next` out of range, more descriptors than the table holds (loops), nested or
/// misplaced indirect descriptors, or descriptors outside guest memory.
pub struct SplitChain<'m> {
    mem: &'m FastMem,
    table: u64,
    len: u16,
    next: u16,
    ttl: u16,
    count: u16,
    indirect: bool,
    done: bool,
    failed: bool,
}

/// Split descriptor `i` of the table at `table`: (address, length, flags, next); `None` outside guest memory.
#[inline]
fn split_desc(mem: &FastMem, table: u64, i: u16) -> Option<(u64, u32, u16, u16)> {
    let (addr, rest) = mem.read_u64_pair(table + i as u64 * 16)?;
    // Bytes 8..12 are the length, 12..14 the flags, 14..16 the next index.
    Some((addr, rest as u32, (rest >> 32) as u16, (rest >> 48) as u16))
}

impl SplitChain<'_> {
    /// See [`Chain::three`] (also through an indirect table at the head). The flags are compared whole, so the
    /// three indexes are necessarily distinct (the header has only NEXT, the last only WRITE, the data NEXT):
    /// no loop can pass.
    #[inline]
    fn three(&self) -> Option<[RawDesc; 3]> {
        if self.indirect || self.count != 0 || self.done {
            return None;
        }
        let read =
            |table: u64, len: u16, i: u16| (i < len).then(|| split_desc(self.mem, table, i))?;
        let (mut a0, mut l0, mut f0, mut n0) = read(self.table, self.len, self.next)?;
        let (mut table, mut len) = (self.table, self.len);
        if f0 == F_INDIRECT {
            // A Linux guest puts every request in an indirect table when the feature is negotiated. The table
            // must be whole guest memory, as the walker requires.
            if !l0.is_multiple_of(16)
                || l0 / 16 > u16::MAX as u32
                || !self.mem.contains(a0, l0 as u64)
            {
                return None;
            }
            (table, len) = (a0, (l0 / 16) as u16);
            (a0, l0, f0, n0) = read(table, len, 0)?;
        }
        let at = |i: u16| read(table, len, i);
        if f0 != F_NEXT {
            return None;
        }
        let (a1, l1, f1, n1) = at(n0)?;
        if f1 & !F_WRITE != F_NEXT {
            return None;
        }
        let (a2, l2, f2, _) = at(n1)?;
        if f2 != F_WRITE {
            return None;
        }
        Some([
            RawDesc {
                addr: a0,
                len: l0,
                write: false,
            },
            RawDesc {
                addr: a1,
                len: l1,
                write: f1 & F_WRITE != 0,
            },
            RawDesc {
                addr: a2,
                len: l2,
                write: true,
            },
        ])
    }

    fn fail(&mut self, e: ChainError) -> Option<Result<RawDesc, ChainError>> {
        self.done = true;
        self.failed = true;
        Some(Err(e))
    }
}

impl Iterator for SplitChain<'_> {
    type Item = Result<RawDesc, ChainError>;
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.done {
            return None;
        }
        if self.next >= self.len || self.ttl == 0 {
            return self.fail(ChainError::Malformed);
        }
        let Some((addr, len, flags, next)) = split_desc(self.mem, self.table, self.next) else {
            let e = if self.count == 0 {
                ChainError::Empty
            } else {
                ChainError::Malformed
            };
            return self.fail(e);
        };
        if flags & F_INDIRECT != 0 {
            if self.indirect || self.count > 0 || flags & F_NEXT != 0 {
                return self.fail(ChainError::Malformed);
            }
            if len == 0
                || !len.is_multiple_of(16)
                || len / 16 > u16::MAX as u32
                || !self.mem.contains(addr, len as u64)
            {
                return self.fail(ChainError::Malformed);
            }
            self.table = addr;
            self.len = (len / 16) as u16;
            self.next = 0;
            self.ttl = self.len;
            self.indirect = true;
            return self.next();
        }
        self.count += 1;
        self.ttl -= 1;
        if flags & F_NEXT != 0 {
            self.next = next;
        } else {
            self.done = true;
        }
        Some(Ok(RawDesc {
            addr,
            len,
            write: flags & F_WRITE != 0,
        }))
    }
}

/// One packed descriptor (16 bytes in guest memory).
#[derive(Clone, Copy, Debug, Default)]
pub struct PackedDesc {
    addr: u64,
    len: u32,
    id: u16,
    flags: u16,
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;
const EVENT_ENABLE: u16 = 0;
const EVENT_DISABLE: u16 = 1;
const EVENT_DESC: u16 = 2;

fn read_packed(mem: &GuestMemoryMmap, addr: u64) -> Option<PackedDesc> {
    let b = mem.read_obj::<[u8; 16]>(GuestAddress(addr)).ok()?;
    Some(PackedDesc {
        addr: u64::from_le_bytes(b[0..8].try_into().ok()?),
        len: u32::from_le_bytes(b[8..12].try_into().ok()?),
        id: u16::from_le_bytes([b[12], b[13]]),
        flags: u16::from_le_bytes([b[14], b[15]]),
    })
}

/// A packed chain copied out of the ring; an indirect descriptor is expanded while iterating.
pub struct PackedChain<'m> {
    mem: &'m GuestMemoryMmap,
    descs: &'m [PackedDesc],
    i: usize,
    indirect: Option<(u64, u32, u32)>,
    failed: bool,
}

impl Iterator for PackedChain<'_> {
    type Item = Result<RawDesc, ChainError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if let Some((table, n, i)) = self.indirect.as_mut() {
            if *i >= *n {
                return None;
            }
            let addr = table.checked_add(*i as u64 * 16)?;
            *i += 1;
            return match read_packed(self.mem, addr) {
                Some(d) if d.flags & F_INDIRECT == 0 => Some(Ok(RawDesc {
                    addr: d.addr,
                    len: d.len,
                    write: d.flags & F_WRITE != 0,
                })),
                _ => {
                    self.failed = true;
                    Some(Err(ChainError::Malformed))
                }
            };
        }
        let d = *self.descs.get(self.i)?;
        self.i += 1;
        if d.flags & F_INDIRECT != 0 {
            // An indirect descriptor must be alone in its chain, and its table a whole number of descriptors.
            if self.descs.len() != 1
                || d.len == 0
                || d.len % 16 != 0
                || !in_memory(self.mem, d.addr, d.len as u64)
            {
                self.failed = true;
                return Some(Err(ChainError::Malformed));
            }
            self.indirect = Some((d.addr, d.len / 16, 0));
            return self.next();
        }
        Some(Ok(RawDesc {
            addr: d.addr,
            len: d.len,
            write: d.flags & F_WRITE != 0,
        }))
    }
}

/// Why the ring itself is unusable (the queue is marked broken).
pub type RingError = &'static str;

/// A split ring.
pub struct SplitRing {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    avail_end: u16,
    next_used: u16,
    published: u16,
    signalled: u16,
    event_idx: bool,
}

/// A packed ring.
pub struct PackedRing {
    size: u16,
    desc: u64,
    driver_event: u64,
    device_event: u64,
    avail_idx: u16,
    avail_wrap: bool,
    used_idx: u16,
    used_wrap: bool,
    event_idx: bool,
    signalled_used: u16,
    signalled_valid: bool,
    scratch: Vec<PackedDesc>,
}

/// Either layout.
pub enum Ring {
    /// Split.
    Split(SplitRing),
    /// Packed.
    Packed(PackedRing),
}

impl Ring {
    /// Builds the ring from the front end's configuration, checking its areas lie in guest memory.
    pub fn new(cfg: &RingConfig, fast: &FastMem) -> Result<Ring, RingError> {
        let mem: &GuestMemoryMmap = fast.guest_memory();
        if cfg.size == 0 || cfg.size > MAX_QUEUE_SIZE {
            return Err("queue size out of range");
        }
        if cfg.packed {
            let size = cfg.size;
            if !in_memory(mem, cfg.desc, size as u64 * 16)
                || !in_memory(mem, cfg.driver, 4)
                || !in_memory(mem, cfg.device, 4)
            {
                return Err("packed ring areas are not in guest memory");
            }
            let idx = (cfg.base & 0x7fff) as u16;
            if idx >= size {
                return Err("ring base out of range");
            }
            let wrap = cfg.base & 0x8000 != 0;
            return Ok(Ring::Packed(PackedRing {
                size,
                desc: cfg.desc,
                driver_event: cfg.driver,
                device_event: cfg.device,
                avail_idx: idx,
                avail_wrap: wrap,
                used_idx: idx,
                used_wrap: wrap,
                event_idx: cfg.event_idx,
                signalled_used: 0,
                signalled_valid: false,
                scratch: Vec::with_capacity(size as usize),
            }));
        }
        let n = cfg.size as u64;
        if !cfg.size.is_power_of_two() {
            return Err("split queue size is not a power of two");
        }
        if !cfg.desc.is_multiple_of(16)
            || !cfg.driver.is_multiple_of(2)
            || !cfg.device.is_multiple_of(4)
        {
            return Err("split ring areas misaligned");
        }
        if !fast.contains(cfg.desc, 16 * n)
            || !fast.contains(cfg.driver, 6 + 2 * n)
            || !fast.contains(cfg.device, 6 + 8 * n)
        {
            return Err("split ring areas are not in guest memory");
        }
        // The used index the driver last saw is in guest memory (after a reconnect it is where we stopped).
        let used = fast
            .load_u16(cfg.device + 2)
            .ok_or("used ring unreadable")?;
        let base = cfg.base as u16;
        Ok(Ring::Split(SplitRing {
            size: cfg.size,
            desc: cfg.desc,
            avail: cfg.driver,
            used: cfg.device,
            next_avail: base,
            avail_end: base,
            next_used: used,
            published: used,
            signalled: used,
            event_idx: cfg.event_idx,
        }))
    }

    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        match self {
            Ring::Split(s) => s.size,
            Ring::Packed(p) => p.size,
        }
    }

    /// The next available chain: `(buffer id, descriptors used, chain)`. The buffer id (split: head index,
    /// packed: the driver's id) is below [`size`](Self::size).
    pub fn pop<'m>(
        &'m mut self,
        fast: &'m FastMem,
    ) -> Result<Option<(u16, u16, Chain<'m>)>, RingError> {
        match self {
            Ring::Split(s) => s.pop(fast),
            Ring::Packed(p) => p.pop(fast.guest_memory()),
        }
    }

    /// Puts a completed buffer in the used ring (split: published with the next [`needs_notification`]).
    pub fn push_used(
        &mut self,
        fast: &FastMem,
        id: u16,
        ndescs: u16,
        len: u32,
    ) -> Result<(), RingError> {
        match self {
            Ring::Split(s) => {
                let at = s.used + 4 + (s.next_used & (s.size - 1)) as u64 * 8;
                // The element is `id: u32` then `len: u32`, little-endian.
                if !fast.write_u64(at, id as u64 | (len as u64) << 32) {
                    return Err("used ring write failed");
                }
                s.next_used = s.next_used.wrapping_add(1);
                Ok(())
            }
            Ring::Packed(p) => p.push_used(fast.guest_memory(), id, ndescs, len),
        }
    }

    /// Publishes the used entries added so far (split; packed entries are visible as soon as written).
    pub fn publish(&mut self, fast: &FastMem) {
        if let Ring::Split(s) = self {
            s.publish(fast);
        }
    }

    /// Publishes the used entries added so far and says whether the driver wants an interrupt for them.
    pub fn needs_notification(&mut self, fast: &FastMem) -> bool {
        match self {
            Ring::Split(s) => s.publish_and_check(fast),
            Ring::Packed(p) => p.needs_notification(fast.guest_memory()),
        }
    }

    /// Asks the driver to kick (interrupt mode) or not to (polling). Returns whether buffers are already
    /// available (enabling can race with the driver adding one).
    pub fn set_notification(&mut self, fast: &FastMem, enable: bool) -> bool {
        match self {
            Ring::Split(s) => {
                if s.event_idx {
                    if enable {
                        fast.store_u16(s.used + 4 + 8 * s.size as u64, s.next_avail);
                    }
                } else {
                    fast.store_u16(s.used, if enable { 0 } else { 1 });
                }
                fence(Ordering::SeqCst);
                enable
                    && fast
                        .load_u16(s.avail + 2)
                        .is_some_and(|i| i != s.next_avail)
            }
            Ring::Packed(p) => {
                let mem = fast.guest_memory();
                let flags = if enable { EVENT_ENABLE } else { EVENT_DISABLE };
                let _ = mem.store(
                    flags.to_le(),
                    GuestAddress(p.device_event + 2),
                    Ordering::Release,
                );
                fence(Ordering::SeqCst);
                enable && p.peek(mem)
            }
        }
    }

    /// Split rings: the used index written so far (published or not).
    pub fn next_used(&self) -> Option<u16> {
        match self {
            Ring::Split(s) => Some(s.next_used),
            Ring::Packed(_) => None,
        }
    }

    /// Split rings: the buffer id of used entry `i` (as written in guest memory).
    pub fn used_id(&self, fast: &FastMem, i: u16) -> Option<u16> {
        match self {
            Ring::Split(s) => {
                let at = s.used + 4 + (i & (s.size - 1)) as u64 * 8;
                fast.read::<4>(at).map(|b| u32::from_le_bytes(b) as u16)
            }
            Ring::Packed(_) => None,
        }
    }

    /// Split rings: where the next request is taken from the available ring (after a restart that runs the
    /// unfinished requests again, past them).
    pub fn set_next_avail(&mut self, idx: u16) {
        if let Ring::Split(s) = self {
            s.next_avail = idx;
            s.avail_end = idx;
        }
    }

    /// Split rings: the chain whose head is `head` (a request run again after a restart), as [`Ring::pop`]
    /// gives it.
    pub fn chain_at<'m>(&self, fast: &'m FastMem, head: u16) -> Option<Chain<'m>> {
        match self {
            Ring::Split(s) if head < s.size => Some(Chain::Split(SplitChain {
                mem: fast,
                table: s.desc,
                len: s.size,
                next: head,
                ttl: s.size,
                count: 0,
                indirect: false,
                done: false,
                failed: false,
            })),
            _ => None,
        }
    }

    /// The state `GET_VRING_BASE` reports: next available index (packed: with the wrap counter in bit 15).
    pub fn base(&self) -> u32 {
        match self {
            Ring::Split(s) => s.next_avail as u32,
            Ring::Packed(p) => p.avail_idx as u32 | ((p.avail_wrap as u32) << 15),
        }
    }
}

impl SplitRing {
    fn pop<'m>(&mut self, fast: &'m FastMem) -> Result<Option<(u16, u16, Chain<'m>)>, RingError> {
        if self.next_avail == self.avail_end {
            // One acquire load of the driver's index per batch.
            let idx = fast
                .load_u16(self.avail + 2)
                .ok_or("available ring unreadable")?;
            if idx.wrapping_sub(self.next_avail) > self.size {
                return Err("available index moved more than the queue size");
            }
            self.avail_end = idx;
            if idx == self.next_avail {
                return Ok(None);
            }
        }
        // Split ring sizes are powers of two (`Ring::new` refuses others): a mask, not a division.
        let slot = self.avail + 4 + (self.next_avail & (self.size - 1)) as u64 * 2;
        let head = fast.read::<2>(slot).ok_or("available ring unreadable")?;
        let head = u16::from_le_bytes(head);
        self.next_avail = self.next_avail.wrapping_add(1);
        if head >= self.size {
            return Err("head index out of range");
        }
        Ok(Some((
            head,
            1,
            Chain::Split(SplitChain {
                mem: fast,
                table: self.desc,
                len: self.size,
                next: head,
                ttl: self.size,
                count: 0,
                indirect: false,
                done: false,
                failed: false,
            }),
        )))
    }

    fn publish(&mut self, fast: &FastMem) {
        if self.published != self.next_used {
            // Release: the used elements and everything the requests wrote are visible before the index.
            fast.store_u16(self.used + 2, self.next_used);
            self.published = self.next_used;
        }
    }

    fn publish_and_check(&mut self, fast: &FastMem) -> bool {
        self.publish(fast);
        fence(Ordering::SeqCst);
        let new = Wrapping(self.next_used);
        let old = Wrapping(self.signalled);
        self.signalled = self.next_used;
        if self.event_idx {
            let Some(ev) = fast.load_u16(self.avail + 4 + 2 * self.size as u64) else {
                return true;
            };
            (new - Wrapping(ev) - Wrapping(1)) < (new - old)
        } else {
            // VRING_AVAIL_F_NO_INTERRUPT.
            fast.load_u16(self.avail).is_none_or(|f| f & 1 == 0)
        }
    }
}

impl PackedRing {
    fn desc_addr(&self, idx: u16) -> u64 {
        self.desc + idx as u64 * 16
    }

    fn is_avail(&self, flags: u16) -> bool {
        (flags & F_AVAIL != 0) == self.avail_wrap && (flags & F_USED != 0) != self.avail_wrap
    }

    fn peek(&self, mem: &GuestMemoryMmap) -> bool {
        mem.load::<u16>(
            GuestAddress(self.desc_addr(self.avail_idx) + 14),
            Ordering::Acquire,
        )
        .map(|f| self.is_avail(u16::from_le(f)))
        .unwrap_or(false)
    }

    fn pop<'m>(
        &'m mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Result<Option<(u16, u16, Chain<'m>)>, RingError> {
        if !self.peek(mem) {
            return Ok(None);
        }
        // The first descriptor's flags were read with acquire; the rest of the chain is visible now.
        self.scratch.clear();
        let mut idx = self.avail_idx;
        let mut wrap = self.avail_wrap;
        loop {
            if self.scratch.len() >= self.size as usize {
                return Err("packed chain longer than the queue");
            }
            let d = read_packed(mem, self.desc_addr(idx)).ok_or("descriptor ring unreadable")?;
            self.scratch.push(d);
            idx += 1;
            if idx >= self.size {
                idx = 0;
                wrap = !wrap;
            }
            if d.flags & F_NEXT == 0 || d.flags & F_INDIRECT != 0 {
                break;
            }
        }
        let last = self.scratch.last().copied().unwrap_or_default();
        if last.id >= self.size {
            return Err("buffer id out of range");
        }
        let n = self.scratch.len() as u16;
        self.avail_idx = idx;
        self.avail_wrap = wrap;
        Ok(Some((
            last.id,
            n,
            Chain::Packed(PackedChain {
                mem,
                descs: &self.scratch,
                i: 0,
                indirect: None,
                failed: false,
            }),
        )))
    }

    fn push_used(
        &mut self,
        mem: &GuestMemoryMmap,
        id: u16,
        ndescs: u16,
        len: u32,
    ) -> Result<(), RingError> {
        let at = self.desc_addr(self.used_idx);
        mem.write_obj(len.to_le(), GuestAddress(at + 8))
            .map_err(|_| "descriptor ring write failed")?;
        mem.write_obj(id.to_le(), GuestAddress(at + 12))
            .map_err(|_| "descriptor ring write failed")?;
        let flags = if self.used_wrap { F_AVAIL | F_USED } else { 0 };
        // Release: the buffer contents, status, id and len are visible before the driver sees the flags.
        mem.store(flags.to_le(), GuestAddress(at + 14), Ordering::Release)
            .map_err(|_| "descriptor ring write failed")?;
        let mut n = self.used_idx as u32 + ndescs.max(1) as u32;
        if n >= self.size as u32 {
            n -= self.size as u32;
            self.used_wrap = !self.used_wrap;
        }
        self.used_idx = n as u16;
        Ok(())
    }

    fn needs_notification(&mut self, mem: &GuestMemoryMmap) -> bool {
        fence(Ordering::SeqCst);
        let old = self.signalled_used;
        let valid = self.signalled_valid;
        let new = self.used_idx;
        self.signalled_used = new;
        self.signalled_valid = true;
        let ev = mem
            .read_obj::<[u8; 4]>(GuestAddress(self.driver_event))
            .unwrap_or([0; 4]);
        let off_wrap = u16::from_le_bytes([ev[0], ev[1]]);
        let flags = u16::from_le_bytes([ev[2], ev[3]]);
        if flags == EVENT_DISABLE {
            return false;
        }
        if flags != EVENT_DESC || !self.event_idx || !valid {
            return true;
        }
        let mut old = Wrapping(old);
        let new = Wrapping(new);
        let mut off = Wrapping(off_wrap & 0x7fff);
        if new <= old {
            old -= Wrapping(self.size);
        }
        if (off_wrap >> 15 != 0) != self.used_wrap {
            off -= Wrapping(self.size);
        }
        (new - off - Wrapping(1)).0 < (new - old).0
    }
}
