//! A vhost-user-blk front end: what QEMU (shared memory, vhost-user messages, eventfds) and a guest's virtio-blk
//! driver (rings, requests) do, without a VM. Tests use its raw accessors to forge hostile virtqueues; the
//! benchmark drives a back end with it at full speed.
//!
//! Guest memory is one memfd shared with the back end, at guest physical address [`GPA_BASE`]. Each queue `q`
//! owns the 1 MiB area at [`Frontend::queue_area`]: descriptor ring at +0, available ring (packed: driver
//! event area) at +0x4000, used ring (packed: device event area) at +0x5000, request headers at +0x8000 (16
//! bytes per slot), status bytes at +0xc000, free space for indirect tables at +0x10000. Data buffers start at
//! [`DATA_OFFSET`].

use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend as VuFrontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::bits;

/// Guest physical address of the shared memory.
pub const GPA_BASE: u64 = 0x4000_0000;
/// Offset of the data buffer area.
pub const DATA_OFFSET: u64 = 16 << 20;
/// Descriptor flags (split).
pub const F_NEXT: u16 = 1;
/// Device-writable.
pub const F_WRITE: u16 = 2;
/// Indirect table.
pub const F_INDIRECT: u16 = 4;

/// How to connect.
#[derive(Clone, Debug)]
pub struct Options {
    /// Queues to set up.
    pub queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
    /// Negotiate packed rings (if offered).
    pub packed: bool,
    /// Negotiate event idx (if offered).
    pub event_idx: bool,
    /// Shared memory size.
    pub mem_size: u64,
    /// Back the shared memory with hugepages (as QEMU with `memory-backend-memfd,hugetlb=on`): SPDK's own
    /// vhost target registers guest memory for DMA and needs it on 2 MiB pages.
    pub hugepages: bool,
    /// Ask for an inflight tracking area (as QEMU's vhost-user-blk does) when the back end offers one.
    pub inflight: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queues: 1,
            queue_size: 128,
            packed: false,
            event_idx: false,
            mem_size: 64 << 20,
            hugepages: false,
            inflight: false,
        }
    }
}

/// One driver-side queue.
pub struct DriverQueue {
    /// Queue index.
    pub idx: u16,
    /// Descriptors.
    pub size: u16,
    /// Guest physical address of the queue's area.
    pub area: u64,
    /// Next available index the driver will publish (split), or next descriptor slot (packed).
    pub avail_idx: u16,
    /// Used entries consumed so far (split: used index; packed: next used slot).
    pub last_used: u16,
    /// Packed: driver's avail wrap counter.
    pub wrap: bool,
    /// Packed: wrap counter for used descriptors.
    pub used_wrap: bool,
    /// The doorbell.
    pub kick: EventFd,
    /// The interrupt.
    pub call: EventFd,
}

impl DriverQueue {
    /// Descriptor ring address.
    pub fn desc(&self) -> u64 {
        self.area
    }
    /// Available ring (packed: driver event suppression) address.
    pub fn avail(&self) -> u64 {
        self.area + 0x4000
    }
    /// Used ring (packed: device event suppression) address.
    pub fn used(&self) -> u64 {
        self.area + 0x5000
    }
    /// Header slot `i`.
    pub fn hdr(&self, i: u16) -> u64 {
        self.area + 0x8000 + i as u64 * 16
    }
    /// Status byte slot `i`.
    pub fn status(&self, i: u16) -> u64 {
        self.area + 0xc000 + i as u64
    }
    /// Scratch area for indirect tables.
    pub fn scratch(&self) -> u64 {
        self.area + 0x10000
    }
}

/// A connected front end.
pub struct Frontend {
    fe: VuFrontend,
    /// Our mapping of the shared guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues.
    pub queues: Vec<DriverQueue>,
    /// Features acked.
    pub features: u64,
    file: std::fs::File,
    /// The inflight area the back end made (kept for as long as the connection, as QEMU keeps it).
    _inflight: Option<std::fs::File>,
}

/// Errors are strings: this is test and benchmark support.
pub type Result<T> = std::result::Result<T, String>;

fn e<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{what}: {err}")
}

impl Frontend {
    /// Connects to `socket`, negotiates, shares memory and starts `opts.queues` queues.
    pub fn connect(socket: &Path, opts: &Options) -> Result<Frontend> {
        let file = crate::sys::memfd("vhost-frontend", opts.mem_size, opts.hugepages)
            .map_err(e("memfd"))?;
        let map = MmapRegion::from_file(
            FileOffset::new(file.try_clone().map_err(e("dup"))?, 0),
            opts.mem_size as usize,
        )
        .map_err(e("mmap"))?;
        let va = map.as_ptr() as u64;
        let region = GuestRegionMmap::new(map, GuestAddress(GPA_BASE)).ok_or("region")?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(e("memory"))?;
        let mut fe = VuFrontend::connect(socket, opts.queues as u64).map_err(e("connect"))?;
        fe.set_owner().map_err(e("SET_OWNER"))?;
        let offered = fe.get_features().map_err(e("GET_FEATURES"))?;
        let mut want = bits::F_VERSION_1
            | bits::VHOST_USER_F_PROTOCOL_FEATURES
            | bits::BLK_F_FLUSH
            | bits::BLK_F_DISCARD
            | bits::BLK_F_WRITE_ZEROES
            | bits::BLK_F_BLK_SIZE
            | bits::BLK_F_SEG_MAX
            | bits::BLK_F_MQ
            | bits::RING_F_INDIRECT_DESC
            | bits::BLK_F_RO;
        if opts.packed {
            want |= bits::F_RING_PACKED;
        }
        if opts.event_idx {
            want |= bits::RING_F_EVENT_IDX;
        }
        let features = offered & want;
        if opts.packed && features & bits::F_RING_PACKED == 0 {
            return Err("packed ring not offered".into());
        }
        fe.set_features(features).map_err(e("SET_FEATURES"))?;
        if features & bits::VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let pf = fe
                .get_protocol_features()
                .map_err(e("GET_PROTOCOL_FEATURES"))?;
            let mut wanted = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK;
            if opts.inflight {
                wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
            }
            let use_pf = pf & wanted;
            fe.set_protocol_features(use_pf)
                .map_err(e("SET_PROTOCOL_FEATURES"))?;
            if use_pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every message is acknowledged, so a refused one shows up here as an error.
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: GPA_BASE,
            memory_size: opts.mem_size,
            userspace_addr: va,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }])
        .map_err(e("SET_MEM_TABLE"))?;
        // As QEMU: the back end makes the inflight area, and gets it back before the rings start.
        let mut inflight = None;
        let pf_acked = features & bits::VHOST_USER_F_PROTOCOL_FEATURES != 0;
        if opts.inflight && pf_acked {
            let ask = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: opts.queues,
                queue_size: opts.queue_size,
            };
            if let Ok((info, area)) = fe.get_inflight_fd(&ask) {
                fe.set_inflight_fd(&info, area.as_raw_fd())
                    .map_err(e("SET_INFLIGHT_FD"))?;
                inflight = Some(area);
            }
        }
        let mut f = Frontend {
            fe,
            mem,
            queues: vec![],
            features,
            file,
            _inflight: inflight,
        };
        for q in 0..opts.queues {
            let area = GPA_BASE + q as u64 * (1 << 20);
            let dq = DriverQueue {
                idx: q,
                size: opts.queue_size,
                area,
                avail_idx: 0,
                last_used: 0,
                wrap: true,
                used_wrap: true,
                kick: EventFd::new(libc::EFD_NONBLOCK).map_err(e("eventfd"))?,
                call: EventFd::new(libc::EFD_NONBLOCK).map_err(e("eventfd"))?,
            };
            f.start_queue(dq, va)?;
        }
        Ok(f)
    }

    fn start_queue(&mut self, dq: DriverQueue, va: u64) -> Result<()> {
        let to_va = |gpa: u64| gpa - GPA_BASE + va;
        let i = dq.idx as usize;
        if self.packed() {
            // Driver event suppression: enable (0) interrupts by default.
            self.mem
                .write_obj(0u32, GuestAddress(dq.avail()))
                .map_err(e("mem"))?;
        }
        self.fe
            .set_vring_num(i, dq.size)
            .map_err(e("SET_VRING_NUM"))?;
        self.fe
            .set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: dq.size,
                    queue_size: dq.size,
                    flags: 0,
                    desc_table_addr: to_va(dq.desc()),
                    used_ring_addr: to_va(dq.used()),
                    avail_ring_addr: to_va(dq.avail()),
                    log_addr: None,
                },
            )
            .map_err(e("SET_VRING_ADDR"))?;
        let base = if self.packed() { 1 << 15 } else { 0 };
        self.fe
            .set_vring_base(i, base)
            .map_err(e("SET_VRING_BASE"))?;
        self.fe
            .set_vring_call(i, &dq.call)
            .map_err(e("SET_VRING_CALL"))?;
        self.fe
            .set_vring_kick(i, &dq.kick)
            .map_err(e("SET_VRING_KICK"))?;
        if self.features & bits::VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            self.fe
                .set_vring_enable(i, true)
                .map_err(e("SET_VRING_ENABLE"))?;
        }
        self.queues.push(dq);
        Ok(())
    }

    /// Whether packed rings were negotiated.
    pub fn packed(&self) -> bool {
        self.features & bits::F_RING_PACKED != 0
    }

    /// Reads the device config space.
    pub fn config(&mut self, len: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; len as usize];
        self.fe
            .get_config(0, len, VhostUserConfigFlags::WRITABLE, &buf)
            .map(|(_, b)| b)
            .map_err(e("GET_CONFIG"))
    }

    /// Stops queue `q` (`GET_VRING_BASE`) and returns the back end's ring state.
    pub fn stop_queue(&mut self, q: u16) -> Result<u32> {
        self.fe
            .get_vring_base(q as usize)
            .map_err(e("GET_VRING_BASE"))
    }

    /// The raw vhost-user front end (for protocol-level tests).
    pub fn raw(&mut self) -> &mut VuFrontend {
        &mut self.fe
    }

    /// The file behind guest memory (to send it again in another memory table).
    pub fn memory_file(&self) -> &std::fs::File {
        &self.file
    }

    /// Guest address `off` bytes into the data area.
    pub fn data(&self, off: u64) -> u64 {
        GPA_BASE + DATA_OFFSET + off
    }

    /// Writes a split descriptor.
    pub fn write_desc(&self, q: u16, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.queues[q as usize].desc() + i as u64 * 16;
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&b, GuestAddress(d)).unwrap();
    }

    /// Writes a split descriptor into a table at `table`.
    pub fn write_table_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&b, GuestAddress(table + i as u64 * 16))
            .unwrap();
    }

    /// Writes a virtio-blk request header.
    pub fn write_hdr(&self, addr: u64, ty: u32, sector: u64) {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&ty.to_le_bytes());
        b[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&b, GuestAddress(addr)).unwrap();
    }

    /// Puts `head` in the available ring and publishes it (split).
    pub fn publish(&mut self, q: u16, head: u16) {
        let dq = &mut self.queues[q as usize];
        let slot = dq.avail() + 4 + (dq.avail_idx % dq.size) as u64 * 2;
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        self.mem
            .store(
                dq.avail_idx.to_le(),
                GuestAddress(dq.avail() + 2),
                Ordering::Release,
            )
            .unwrap();
    }

    /// Sets the available index to anything (hostile drivers).
    pub fn set_avail_idx(&mut self, q: u16, idx: u16) {
        let dq = &mut self.queues[q as usize];
        dq.avail_idx = idx;
        self.mem
            .store(idx.to_le(), GuestAddress(dq.avail() + 2), Ordering::Release)
            .unwrap();
    }

    /// Rings queue `q`'s doorbell if the device asked for kicks (always, when `force`).
    pub fn kick(&self, q: u16, force: bool) {
        let dq = &self.queues[q as usize];
        fence(Ordering::SeqCst);
        let no_notify = if self.packed() {
            self.mem
                .load::<u16>(GuestAddress(dq.used() + 2), Ordering::Acquire)
                .map(|f| u16::from_le(f) == 1)
                .unwrap_or(false)
        } else {
            self.mem
                .load::<u16>(GuestAddress(dq.used()), Ordering::Acquire)
                .map(|f| u16::from_le(f) & 1 != 0)
                .unwrap_or(false)
        };
        if force || !no_notify {
            let _ = dq.kick.write(1);
        }
    }

    /// The device's used index (split).
    pub fn used_idx(&self, q: u16) -> u16 {
        let dq = &self.queues[q as usize];
        u16::from_le(
            self.mem
                .load(GuestAddress(dq.used() + 2), Ordering::Acquire)
                .unwrap(),
        )
    }

    /// Used element `n` (split): (id, len).
    pub fn used_elem(&self, q: u16, n: u16) -> (u32, u32) {
        let dq = &self.queues[q as usize];
        let at = dq.used() + 4 + (n % dq.size) as u64 * 8;
        let b: [u8; 8] = self.mem.read_obj(GuestAddress(at)).unwrap();
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
        )
    }

    /// Waits until the used index reaches `n` (split). False on timeout.
    pub fn wait_used(&self, q: u16, n: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.used_idx(q) != n {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    /// Submits a well-formed 3-descriptor request in slot `s` (descriptors 3s..3s+2) and returns the head.
    /// `data` is `(gpa, len)`; it is device-writable when `data_write`.
    pub fn request(
        &mut self,
        q: u16,
        s: u16,
        ty: u32,
        sector: u64,
        data: Option<(u64, u32)>,
        data_write: bool,
    ) -> u16 {
        let (hdr, st) = {
            let dq = &self.queues[q as usize];
            (dq.hdr(s), dq.status(s))
        };
        self.write_hdr(hdr, ty, sector);
        self.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        let mut descs = vec![(hdr, 16u32, 0u16)];
        if let Some((addr, len)) = data {
            descs.push((addr, len, if data_write { F_WRITE } else { 0 }));
        }
        descs.push((st, 1, F_WRITE));
        if self.packed() {
            self.packed_chain(q, s, &descs);
            return s;
        }
        let head = s * 3;
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let k = k as u16;
            let last = k as usize + 1 == descs.len();
            let f = if last { flags } else { flags | F_NEXT };
            self.write_desc(q, head + k, addr, len, f, head + k + 1);
        }
        self.publish(q, head);
        self.kick(q, false);
        head
    }

    /// The status byte of slot `s`.
    pub fn status(&self, q: u16, s: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(self.queues[q as usize].status(s)))
            .unwrap()
    }

    /// Makes a packed chain available at the driver's next slot: `(addr, len, split-style flags)`; NEXT is
    /// set on all but the last (unless a descriptor already carries it), the buffer id is `id`.
    pub fn packed_chain(&mut self, q: u16, id: u16, descs: &[(u64, u32, u16)]) {
        let (first, first_flags) = {
            let dq = &mut self.queues[q as usize];
            let mut first = None;
            for (k, &(addr, len, fl)) in descs.iter().enumerate() {
                let mut flags = fl & (F_WRITE | F_INDIRECT);
                if k + 1 < descs.len() {
                    flags |= F_NEXT;
                }
                if dq.wrap {
                    flags |= 1 << 7;
                } else {
                    flags |= 1 << 15;
                }
                let at = dq.desc() + dq.avail_idx as u64 * 16;
                let mut b = [0u8; 16];
                b[0..8].copy_from_slice(&addr.to_le_bytes());
                b[8..12].copy_from_slice(&len.to_le_bytes());
                b[12..14].copy_from_slice(&id.to_le_bytes());
                if k == 0 {
                    // The first descriptor's flags are written last, after a barrier.
                    first = Some((at, flags));
                } else {
                    b[14..16].copy_from_slice(&flags.to_le_bytes());
                }
                self.mem.write_slice(&b, GuestAddress(at)).unwrap();
                dq.avail_idx += 1;
                if dq.avail_idx >= dq.size {
                    dq.avail_idx = 0;
                    dq.wrap = !dq.wrap;
                }
            }
            let (a, f) = first.unwrap();
            (a, f)
        };
        self.mem
            .store(
                first_flags.to_le(),
                GuestAddress(first + 14),
                Ordering::Release,
            )
            .unwrap();
        self.kick(q, false);
    }

    /// Takes the next used packed descriptor, if any: (id, len). Advances by `ndescs` slots.
    pub fn packed_used(&mut self, q: u16, ndescs: u16) -> Option<(u16, u32)> {
        let dq = &mut self.queues[q as usize];
        let at = dq.desc() + dq.last_used as u64 * 16;
        let flags = u16::from_le(
            self.mem
                .load(GuestAddress(at + 14), Ordering::Acquire)
                .ok()?,
        );
        let avail = flags & (1 << 7) != 0;
        let used = flags & (1 << 15) != 0;
        if avail != dq.used_wrap || used != dq.used_wrap {
            return None;
        }
        let b: [u8; 16] = self.mem.read_obj(GuestAddress(at)).ok()?;
        let len = u32::from_le_bytes(b[8..12].try_into().ok()?);
        let id = u16::from_le_bytes(b[12..14].try_into().ok()?);
        dq.last_used += ndescs;
        if dq.last_used >= dq.size {
            dq.last_used -= dq.size;
            dq.used_wrap = !dq.used_wrap;
        }
        Some((id, len))
    }

    /// Waits for the next used packed descriptor.
    pub fn wait_packed_used(
        &mut self,
        q: u16,
        ndescs: u16,
        timeout: Duration,
    ) -> Option<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(x) = self.packed_used(q, ndescs) {
                return Some(x);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::yield_now();
        }
    }
}
