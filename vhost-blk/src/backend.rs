//! The vhost-user protocol side: one control thread per controller accepts the front end's connection and
//! handles its messages with the `vhost` crate's `BackendReqHandler`. It keeps the negotiated state (features,
//! memory table, ring addresses, eventfds) and only exchanges messages with the controller's reactor thread:
//! "here is the memory", "start queue N", "stop queue N and tell me where it stopped". Waiting for such an answer
//! blocks this thread, never a reactor.

use std::fs::File;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use reactor::lock;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::config::{bits, MAX_QUEUES};
use crate::controller::{Ctrlr, Session};
use crate::device::{with_dev, QueueStart};
use crate::inflight::InflightRegion;
use crate::mem::MemTable;
use crate::vring::{RingConfig, MAX_QUEUE_SIZE};

/// `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`.
const INFLIGHT_SHMFD: u64 = 1 << 12;

/// How long a stop may wait for in-flight I/O before the front end gets an answer anyway.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Vring {
    num: u16,
    desc: u64,
    avail: u64,
    used: u64,
    addr_set: bool,
    base: u32,
    kick: Option<File>,
    call: Option<File>,
    kicked: bool,
    enabled: bool,
    running: bool,
}

/// One region of the memory table: the front end's address, size, and guest physical address.
#[derive(Clone, Copy)]
struct VaRegion {
    va: u64,
    size: u64,
    gpa: u64,
}

/// The control thread's view of one connection.
pub struct Backend {
    ctrlr: Arc<Ctrlr>,
    acked: u64,
    proto: u64,
    mem: Option<Arc<MemTable>>,
    regions: Vec<VaRegion>,
    vrings: Vec<Vring>,
    /// The inflight tracking area the front end gave (`SET_INFLIGHT_FD`).
    inflight: Option<Arc<InflightRegion>>,
}

fn bad(why: &'static str) -> VuError {
    log::error!("vhost-user: {why}");
    VuError::InvalidOperation(why)
}

impl Backend {
    fn new(ctrlr: Arc<Ctrlr>) -> Self {
        Backend {
            ctrlr,
            acked: 0,
            proto: 0,
            mem: None,
            regions: vec![],
            vrings: (0..MAX_QUEUES).map(|_| Vring::default()).collect(),
            inflight: None,
        }
    }

    /// Runs `f` on the controller's thread and waits for its result.
    fn on_thread<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        let (tx, rx) = mpsc::channel();
        self.ctrlr.thread.send(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(STOP_TIMEOUT).ok()
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| bad("vring index out of range"))
    }

    fn va_to_gpa(&self, va: u64, len: u64) -> VuResult<u64> {
        for r in &self.regions {
            if va >= r.va && va - r.va < r.size {
                let off = va - r.va;
                if len > r.size - off {
                    return Err(bad("ring crosses the end of a memory region"));
                }
                return Ok(r.gpa + off);
            }
        }
        Err(bad("ring address not in any memory region"))
    }

    fn update_session(&self) {
        let running: Vec<usize> = self
            .vrings
            .iter()
            .enumerate()
            .filter(|(_, v)| v.running)
            .map(|(i, _)| i)
            .collect();
        if let Some(s) = lock(&self.ctrlr.session).as_mut() {
            s.started = !running.is_empty();
            s.max_queues = running.last().map_or(0, |i| *i as u32 + 1);
        }
    }

    fn maybe_start(&mut self, index: usize) -> VuResult<()> {
        let packed = self.acked & bits::F_RING_PACKED != 0;
        let event_idx = self.acked & bits::RING_F_EVENT_IDX != 0;
        let Some(mem) = self.mem.clone() else {
            return Ok(());
        };
        let v = &mut self.vrings[index];
        if v.running || !v.kicked || !v.enabled || !v.addr_set || v.num == 0 {
            return Ok(());
        }
        let qs = QueueStart {
            cfg: RingConfig {
                size: v.num,
                desc: v.desc,
                driver: v.avail,
                device: v.used,
                base: v.base,
                event_idx,
                packed,
            },
            kick: v.kick.as_ref().and_then(|f| f.try_clone().ok()),
            call: v.call.as_ref().and_then(|f| f.try_clone().ok()),
            inflight: self
                .inflight
                .as_ref()
                .filter(|_| !packed && self.proto & INFLIGHT_SHMFD != 0)
                .and_then(|r| r.queue(index as u16, v.num)),
        };
        let id = self.ctrlr.id;
        let idx = index as u16;
        let res = self.on_thread(move || {
            with_dev(id, |d| {
                d.set_mem(mem);
                d.start_queue(idx, qs)
            })
            .unwrap_or_else(|| Err("controller is gone".into()))
        });
        match res {
            Some(Ok(())) => {
                self.vrings[index].running = true;
                log::info!("vhost {}: queue {index} started", self.ctrlr.name);
                self.update_session();
                Ok(())
            }
            Some(Err(e)) => {
                log::error!("vhost {}: cannot start queue {index}: {e}", self.ctrlr.name);
                Err(VuError::InvalidParam)
            }
            None => Err(bad("controller thread did not answer")),
        }
    }

    /// Stops a running ring (after its in-flight I/O completed) and records where it stopped.
    fn stop(&mut self, index: usize) -> u32 {
        if !self.vrings[index].running {
            return self.vrings[index].base;
        }
        let (tx, rx) = mpsc::channel();
        let id = self.ctrlr.id;
        let idx = index as u16;
        self.ctrlr.thread.send(move || {
            if with_dev(id, |d| d.stop_queue(idx, tx.clone())).is_none() {
                let _ = tx.send(u32::MAX);
            }
        });
        let base = match rx.recv_timeout(STOP_TIMEOUT) {
            Ok(b) if b != u32::MAX => b,
            _ => {
                log::error!(
                    "vhost {}: queue {index} did not stop in time",
                    self.ctrlr.name
                );
                self.vrings[index].base
            }
        };
        let v = &mut self.vrings[index];
        v.running = false;
        v.base = base;
        log::info!("vhost {}: queue {index} stopped", self.ctrlr.name);
        self.update_session();
        base
    }

    /// The front end went away: stop everything and forget its memory.
    fn disconnect(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop(i);
        }
        self.vrings.iter_mut().for_each(|v| *v = Vring::default());
        self.mem = None;
        self.regions.clear();
        self.inflight = None;
        let id = self.ctrlr.id;
        self.on_thread(move || with_dev(id, |d| d.clear_mem()));
    }
}

impl VhostUserBackendReqHandlerMut for Backend {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.disconnect();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.disconnect();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.ctrlr.features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.ctrlr.features() != 0 {
            return Err(bad("front end acked features that were not offered"));
        }
        self.acked = features;
        log::info!(
            "vhost {}: features {features:#x} acked (offered {:#x})",
            self.ctrlr.name,
            self.ctrlr.features()
        );
        // Without protocol features rings start enabled.
        if features & bits::VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            for v in &mut self.vrings {
                v.enabled = true;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let mut regions = Vec::with_capacity(ctx.len());
        let mut va = Vec::with_capacity(ctx.len());
        for (r, f) in ctx.iter().zip(files) {
            let size = usize::try_from(r.memory_size).map_err(|_| bad("region too large"))?;
            let map = MmapRegion::from_file(FileOffset::new(f, r.mmap_offset), size)
                .map_err(|_| bad("cannot map a memory region"))?;
            let g = GuestRegionMmap::new(map, GuestAddress(r.guest_phys_addr))
                .ok_or_else(|| bad("memory region wraps the address space"))?;
            regions.push(g);
            va.push(VaRegion {
                va: r.user_addr,
                size: r.memory_size,
                gpa: r.guest_phys_addr,
            });
        }
        regions.sort_by_key(vm_memory::GuestMemoryRegion::start_addr);
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|_| bad("overlapping memory regions"))?;
        // The new table is registered before the old one is let go (make before break); the old one leaves the
        // memory map when its last user (this back end, the device, I/O in flight) drops it.
        let mem = Arc::new(MemTable::register(mem).map_err(|e| {
            log::error!("vhost {}: {e}", self.ctrlr.name);
            bad("cannot register guest memory in the memory map")
        })?);
        log::info!(
            "vhost {}: memory table with {} region(s)",
            self.ctrlr.name,
            ctx.len()
        );
        self.regions = va;
        self.mem = Some(mem.clone());
        if self.vrings.iter().any(|v| v.running) {
            let id = self.ctrlr.id;
            self.ctrlr.thread.send(move || {
                with_dev(id, |d| d.set_mem(mem));
            });
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > MAX_QUEUE_SIZE as u32 {
            return Err(bad("queue size out of range"));
        }
        self.vring(index)?.num = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let n = self.vring(index)?.num.max(1) as u64;
        let packed = self.acked & bits::F_RING_PACKED != 0;
        let (dl, al, ul) = if packed {
            (16 * n, 4, 4)
        } else {
            (16 * n, 6 + 2 * n, 6 + 8 * n)
        };
        let d = self.va_to_gpa(descriptor, dl)?;
        let a = self.va_to_gpa(available, al)?;
        let u = self.va_to_gpa(used, ul)?;
        let v = self.vring(index)?;
        v.desc = d;
        v.avail = a;
        v.used = u;
        v.addr_set = true;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.vring(index)?.base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        let base = self.stop(index as usize);
        let v = &mut self.vrings[index as usize];
        v.kicked = false;
        v.kick = None;
        Ok(VhostUserVringState::new(index, base))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = index as usize;
        if i >= self.vrings.len() {
            return Err(bad("vring index out of range"));
        }
        if self.vrings[i].running {
            self.stop(i);
        }
        let v = &mut self.vrings[i];
        v.kick = fd;
        v.kicked = true;
        self.maybe_start(i)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = index as usize;
        if i >= self.vrings.len() {
            return Err(bad("vring index out of range"));
        }
        self.vrings[i].call = fd;
        if self.vrings[i].running {
            let call = self.vrings[i]
                .call
                .as_ref()
                .and_then(|f| f.try_clone().ok());
            let id = self.ctrlr.id;
            self.ctrlr.thread.send(move || {
                with_dev(id, |d| d.set_call(index as u16, call));
            });
        }
        Ok(())
    }

    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.proto = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(MAX_QUEUES as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let i = index as usize;
        self.vring(index)?.enabled = enable;
        if enable {
            self.maybe_start(i)
        } else {
            self.stop(i);
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let cfg = self.ctrlr.config_space();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(cfg.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(cfg.len());
        out[..end - start].copy_from_slice(&cfg[start..end]);
        Ok(out)
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Nothing in the config space is writable (no writeback cache toggle offered).
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(bad("GPU_SET_SOCKET not supported"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(bad("GET_SHARED_OBJECT not supported"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let (nq, qs) = (inflight.num_queues, inflight.queue_size);
        if nq == 0 || nq > MAX_QUEUES || qs == 0 || qs > MAX_QUEUE_SIZE {
            return Err(bad("GET_INFLIGHT_FD: queue count or size out of range"));
        }
        let (region, file) = InflightRegion::create(nq, qs).map_err(|e| {
            log::error!("vhost {}: inflight area: {e}", self.ctrlr.name);
            VuError::InvalidOperation("cannot create the inflight area")
        })?;
        self.inflight = Some(Arc::new(region));
        let size = crate::inflight::queue_area(qs) * nq as u64;
        Ok((VhostUserInflight::new(size, 0, nq, qs), file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let r = InflightRegion::map(
            file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(|e| {
            log::error!("vhost {}: SET_INFLIGHT_FD: {e}", self.ctrlr.name);
            VuError::InvalidParam
        })?;
        self.inflight = Some(Arc::new(r));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(bad("GET_MAX_MEM_SLOTS not supported"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        Err(bad("ADD_MEM_REG not supported"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(bad("REM_MEM_REG not supported"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(bad("SET_DEVICE_STATE_FD not supported"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(bad("CHECK_DEVICE_STATE not supported"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(bad("GET_SHMEM_CONFIG not supported"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(bad("SET_LOG_BASE not supported"))
    }
}

/// The control thread: accepts one front end at a time until the controller is deleted.
pub fn serve(ctrlr: Arc<Ctrlr>, listener: UnixListener) {
    // Threads inherit the affinity of their creator: a control thread started from a pinned reactor must not
    // compete with it. Failing to unpin only costs performance.
    let _ = reactor::pin_current_thread(None);
    // Non-blocking accept polled every few milliseconds, so a deleted controller's thread notices and exits.
    if let Err(e) = listener.set_nonblocking(true) {
        log::error!("vhost {}: {e}", ctrlr.name);
        return;
    }
    while !ctrlr.shutdown.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                if ctrlr.shutdown.load(Ordering::SeqCst) {
                    break;
                }
                session(&ctrlr, stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                log::error!("vhost {}: accept: {e}", ctrlr.name);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    log::debug!("vhost {}: control thread exits", ctrlr.name);
}

fn session(ctrlr: &Arc<Ctrlr>, stream: UnixStream) {
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    let vid = ctrlr.next_vid.fetch_add(1, Ordering::Relaxed);
    *lock(&ctrlr.session) = Some(Session {
        vid,
        started: false,
        max_queues: 0,
    });
    *lock(&ctrlr.conn) = stream.try_clone().ok();
    log::info!("vhost {}: front end connected (vid {vid})", ctrlr.name);
    let backend = Arc::new(Mutex::new(Backend::new(ctrlr.clone())));
    let inner = match relay(ctrlr, stream) {
        Ok(s) => s,
        Err(e) => {
            log::error!("vhost {}: {e}", ctrlr.name);
            *lock(&ctrlr.conn) = None;
            *lock(&ctrlr.session) = None;
            return;
        }
    };
    let mut h = BackendReqHandler::from_stream(inner, backend.clone());
    loop {
        match h.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected)
            | Err(VuError::PartialMessage)
            | Err(VuError::SocketBroken(_)) => {
                log::info!("vhost {}: front end disconnected (vid {vid})", ctrlr.name);
                break;
            }
            Err(e) => {
                log::error!("vhost {}: {e}; closing the connection", ctrlr.name);
                break;
            }
        }
        if ctrlr.shutdown.load(Ordering::SeqCst) {
            break;
        }
    }
    lock(&backend).disconnect();
    if let Some(c) = lock(&ctrlr.conn).take() {
        // Ends the relay threads too.
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
    *lock(&ctrlr.backend_req) = None;
    *lock(&ctrlr.session) = None;
}

/// vhost-user message header bytes (request, flags, payload size).
const HDR_LEN: usize = 12;
/// Largest payload relayed (a memory table of the most regions is far smaller).
const MAX_PAYLOAD: usize = 64 * 1024;
/// `VHOST_USER_SET_BACKEND_REQ_FD`.
const SET_BACKEND_REQ_FD: u32 = 21;

/// Reads one whole vhost-user message (header, payload, the descriptors sent with it) from `fd`; `None` at the
/// end of the stream.
fn read_msg(fd: std::os::unix::io::RawFd) -> std::io::Result<Option<(Vec<u8>, Vec<File>)>> {
    let mut msg = vec![0u8; HDR_LEN];
    let mut fds = Vec::new();
    let mut at = 0;
    while at < msg.len() {
        let (n, more) = crate::sys::recv_with_fds(fd, &mut msg[at..])?;
        if n == 0 {
            return Ok(None);
        }
        fds.extend(more);
        at += n;
        if at == HDR_LEN {
            let size = u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]) as usize;
            if size > MAX_PAYLOAD {
                return Err(std::io::Error::other(format!(
                    "vhost-user message of {size} bytes"
                )));
            }
            msg.resize(HDR_LEN + size, 0);
        }
    }
    Ok(Some((msg, fds)))
}

/// Copies whole messages with their descriptors from `from` to `to` until either side ends; `seen` looks at
/// each message first.
fn pump(from: UnixStream, to: UnixStream, seen: impl Fn(&[u8], &[File])) {
    use std::os::unix::io::AsRawFd;
    while let Ok(Some((msg, fds))) = read_msg(from.as_raw_fd()) {
        seen(&msg, &fds);
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        if crate::sys::send_with_fds(to.as_raw_fd(), &msg, &raw).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// Puts a relay between the front end's connection and the `vhost` crate's handler, which gets the returned
/// end: messages and descriptors pass unchanged both ways, and the back-end request channel the front end
/// hands over (`SET_BACKEND_REQ_FD`) is kept for [`Ctrlr::notify_config_change`] (the crate keeps that channel
/// to itself and cannot send a configuration change).
fn relay(ctrlr: &Arc<Ctrlr>, front: UnixStream) -> std::io::Result<UnixStream> {
    let (ours, theirs) = UnixStream::pair()?;
    let (front2, ours2) = (front.try_clone()?, ours.try_clone()?);
    let c = ctrlr.clone();
    std::thread::Builder::new()
        .name(format!("vhost-relay-{}", ctrlr.name))
        .spawn(move || {
            pump(front, ours, |msg, fds| {
                let req = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
                if req == SET_BACKEND_REQ_FD {
                    *lock(&c.backend_req) = fds
                        .first()
                        .and_then(|f| f.try_clone().ok())
                        .map(|f| UnixStream::from(std::os::fd::OwnedFd::from(f)));
                }
            })
        })?;
    std::thread::Builder::new()
        .name(format!("vhost-relay-{}", ctrlr.name))
        .spawn(move || pump(ours2, front2, |_, _| {}))?;
    Ok(theirs)
}
