//! Safe owners of the librdmacm / libibverbs objects NVMe-oF over RDMA uses, on both sides (the target's
//! transport in `nvmf-rdma`, the host's queue pairs in `nvme-host`): event channel, CM ids, devices with their
//! protection domain and memory regions, completion queues, shared receive queues, and the few calls on them
//! (listen or resolve and connect, post receive / send work requests, poll completions). The workspace's one
//! unsafe module for RDMA.
//!
//! Ownership rules, each kept by a type here:
//! - A [`CmId`] holds its [`EventChannel`] (an `Arc`), so the channel outlives every id created on it.
//! - A connect request's new id is taken from its [`CmEvent`] only by consuming the event ([`CmEvent::take_id`],
//!   [`CmEvent::reject`]): the event is acknowledged first, as `rdma_destroy_id` waits for every event of the id
//!   to be acknowledged and would otherwise wait for ever on the same thread.
//! - A [`Device`]'s memory map ([`reactor::memmap::MemMap`]) registers a memory region (MR) in the device's
//!   protection domain for every region of I/O memory the process registers (DMA buffers, malloc bdevs, ...) and
//!   records `lkey | rkey << 32` as its translation; the map goes (deregistering every MR) before the domain.
//! - Queue pairs are created on their CM id and destroyed with it; completion queues and shared receive queues
//!   are owned by whoever polls them, which outlives its connections.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::raw::{c_int, c_void};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use rdma_sys as sys;
use reactor::memmap::{MemEvent, MemMap};

/// Most work requests posted at once (16 data transfers and the response).
pub const MAX_WRS: usize = 17;

fn os_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// librdmacm and libibverbs return either -1 with errno or a positive errno value.
fn check(rc: c_int, what: &str) -> io::Result<()> {
    match rc {
        0 => Ok(()),
        -1 => Err(os_err(what)),
        e if e > 0 => {
            let e = io::Error::from_raw_os_error(e);
            Err(io::Error::new(e.kind(), format!("{what}: {e}")))
        }
        _ => Err(io::Error::other(format!("{what}: error {rc}"))),
    }
}

/// An RDMA CM event channel, non-blocking: the acceptor polls it on the app thread.
pub struct EventChannel(NonNull<sys::rdma_event_channel>);

// SAFETY: librdmacm's channel functions are thread-safe; the channel is only read on the app thread, and ids made
// on it are used (and destroyed) on the poll group threads, which librdmacm allows.
unsafe impl Send for EventChannel {}
// SAFETY: as above; `&EventChannel` only reads events (one thread) or creates ids (thread-safe in librdmacm).
unsafe impl Sync for EventChannel {}

impl EventChannel {
    /// A new channel with its descriptor set non-blocking. Fails without an RDMA CM device (`/dev/infiniband`).
    pub fn new() -> io::Result<Arc<EventChannel>> {
        // SAFETY: no arguments; a null result is checked.
        let ch = unsafe { sys::rdma_create_event_channel() };
        let ch = NonNull::new(ch).ok_or_else(|| os_err("rdma_create_event_channel"))?;
        let ch = EventChannel(ch);
        // SAFETY: `ch` is a live channel; its `fd` field is a descriptor it owns.
        let fd = unsafe { (*ch.0.as_ptr()).fd };
        // SAFETY: fcntl on a descriptor the channel owns; results are checked.
        let rc = unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK)
        };
        if rc < 0 {
            return Err(os_err("fcntl(O_NONBLOCK) on the RDMA CM channel"));
        }
        Ok(Arc::new(ch))
    }

    /// The next event, if one is waiting.
    pub fn next(&self) -> Option<io::Result<CmEvent>> {
        let mut ev: *mut sys::rdma_cm_event = std::ptr::null_mut();
        // SAFETY: the channel is live; `ev` is a valid out pointer. The descriptor is non-blocking.
        let rc = unsafe { sys::rdma_get_cm_event(self.0.as_ptr(), &mut ev) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => None,
                _ => Some(Err(io::Error::new(
                    e.kind(),
                    format!("rdma_get_cm_event: {e}"),
                ))),
            };
        }
        NonNull::new(ev).map(|ev| Ok(CmEvent { ev }))
    }

    /// A listening id bound to `addr` (`rdma_create_id`, `rdma_bind_addr`, `rdma_listen`). Fails when the
    /// address belongs to no RDMA device (no verbs context after binding), as SPDK's listen does.
    pub fn listen(self: &Arc<Self>, addr: SocketAddr, backlog: i32) -> io::Result<CmId> {
        let id = CmId::create(self)?;
        let mut sa = reactor::net::SockAddr::from(addr);
        // SAFETY: the id is live; `sa` is a sockaddr of the family's length, valid for the call.
        let rc = unsafe { sys::rdma_bind_addr(id.raw(), sa.as_mut_ptr()) };
        check(rc, "rdma_bind_addr")?;
        if id.device().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("no RDMA device has address {}", addr.ip()),
            ));
        }
        // SAFETY: the id is live and bound.
        let rc = unsafe { sys::rdma_listen(id.raw(), backlog) };
        check(rc, "rdma_listen")?;
        Ok(id)
    }
}

impl EventChannel {
    /// An id for a connection to `dst`, its address resolution started (`rdma_create_id`, `rdma_resolve_addr`);
    /// the channel then reports [`event::ADDR_RESOLVED`] (go on with [`CmId::resolve_route`]) or an error.
    pub fn resolve(self: &Arc<Self>, dst: SocketAddr, timeout_ms: i32) -> io::Result<CmId> {
        let id = CmId::create(self)?;
        let mut sa = reactor::net::SockAddr::from(dst);
        // SAFETY: the id is live; `sa` is a sockaddr of the family's length, valid for the call; no source
        // address (the route decides).
        let rc = unsafe {
            sys::rdma_resolve_addr(id.raw(), std::ptr::null_mut(), sa.as_mut_ptr(), timeout_ms)
        };
        check(rc, "rdma_resolve_addr")?;
        Ok(id)
    }
}

/// The CM event types a connection goes through (`rdma_cm_event_type`).
pub mod event {
    use rdma_sys::rdma_cm_event_type as t;
    /// The destination's address resolved to a device.
    pub const ADDR_RESOLVED: u32 = t::RDMA_CM_EVENT_ADDR_RESOLVED;
    /// Address resolution failed.
    pub const ADDR_ERROR: u32 = t::RDMA_CM_EVENT_ADDR_ERROR;
    /// The route resolved.
    pub const ROUTE_RESOLVED: u32 = t::RDMA_CM_EVENT_ROUTE_RESOLVED;
    /// Route resolution failed.
    pub const ROUTE_ERROR: u32 = t::RDMA_CM_EVENT_ROUTE_ERROR;
    /// The peer accepted: the connection is up.
    pub const ESTABLISHED: u32 = t::RDMA_CM_EVENT_ESTABLISHED;
    /// The peer refused (its private data says why).
    pub const REJECTED: u32 = t::RDMA_CM_EVENT_REJECTED;
    /// Connecting failed.
    pub const CONNECT_ERROR: u32 = t::RDMA_CM_EVENT_CONNECT_ERROR;
    /// The peer did not answer.
    pub const UNREACHABLE: u32 = t::RDMA_CM_EVENT_UNREACHABLE;
    /// The connection went down.
    pub const DISCONNECTED: u32 = t::RDMA_CM_EVENT_DISCONNECTED;
    /// The device went away.
    pub const DEVICE_REMOVAL: u32 = t::RDMA_CM_EVENT_DEVICE_REMOVAL;
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id made on the channel holds an `Arc` of it, so none is left; the channel is ours.
        unsafe { sys::rdma_destroy_event_channel(self.0.as_ptr()) };
    }
}

/// Reads a C socket address.
///
/// # Safety
/// `sa` must point to a valid socket address of its family's size.
unsafe fn socket_addr(sa: *const libc::sockaddr) -> Option<SocketAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller's guarantee; the family decides which layout is read.
    unsafe {
        match (*sa).sa_family as c_int {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// What a CM event says (the union members the transport reads, copied out).
pub struct CmEvent {
    ev: NonNull<sys::rdma_cm_event>,
}

/// A connect request's parameters.
#[derive(Clone, Debug, Default)]
pub struct ConnParams {
    /// The private data (the NVMe/RDMA request, 32 bytes when well formed).
    pub private_data: Vec<u8>,
    /// RDMA READs the host lets us have outstanding against it.
    pub initiator_depth: u8,
    /// RDMA READs the host wants to issue against us (NVMe/RDMA hosts issue none).
    pub responder_resources: u8,
}

impl CmEvent {
    fn ev(&self) -> &sys::rdma_cm_event {
        // SAFETY: the event is live until acknowledged, which only Drop does.
        unsafe { self.ev.as_ref() }
    }

    /// The event type (`rdma_cm_event_type`).
    pub fn kind(&self) -> u32 {
        self.ev().event
    }

    /// librdmacm's name of the event type.
    pub fn name(&self) -> String {
        // SAFETY: rdma_event_str returns a static string for any value.
        unsafe { CStr::from_ptr(sys::rdma_event_str(self.kind())) }
            .to_string_lossy()
            .into_owned()
    }

    /// The event's status.
    pub fn status(&self) -> i32 {
        self.ev().status
    }

    /// The token the event's id carries ([`CmId::set_token`]; 0 for none).
    pub fn token(&self) -> u64 {
        let id = self.ev().id;
        if id.is_null() {
            return 0;
        }
        // SAFETY: the id is live while its event is unacknowledged (rdma_destroy_id waits for the ack).
        unsafe { (*id).context as u64 }
    }

    /// The listening id a connect request came through ([`CmId::key`]; 0 for other events).
    pub fn listen_key(&self) -> usize {
        self.ev().listen_id as usize
    }

    /// A connect request's parameters, private data copied.
    pub fn conn_params(&self) -> ConnParams {
        // SAFETY: for connection events `param.conn` is the member librdmacm filled.
        let c = unsafe { self.ev().param.conn };
        let private_data = if c.private_data.is_null() {
            Vec::new()
        } else {
            // SAFETY: librdmacm points at `private_data_len` bytes it owns until the ack.
            unsafe {
                std::slice::from_raw_parts(c.private_data as *const u8, c.private_data_len as usize)
            }
            .to_vec()
        };
        ConnParams {
            private_data,
            initiator_depth: c.initiator_depth,
            responder_resources: c.responder_resources,
        }
    }

    /// The device (verbs context) of a connect request's new id.
    pub fn device(&self) -> Option<usize> {
        let id = self.ev().id;
        // SAFETY: the id is live while the event is unacknowledged.
        (!id.is_null()).then(|| unsafe { (*id).verbs as usize })
    }

    /// Takes a connect request's new id (acknowledging the event) with `token` in its context.
    pub fn take_id(self, ch: &Arc<EventChannel>, token: u64) -> Option<CmId> {
        let id = NonNull::new(self.ev().id)?;
        // SAFETY: a connect request's id is a new id librdmacm handed to us; setting its context is ours to do.
        unsafe { (*id.as_ptr()).context = token as *mut c_void };
        drop(self);
        Some(CmId {
            id,
            _ch: ch.clone(),
        })
    }

    /// Rejects a connect request with `private_data`, acknowledges the event and destroys the new id.
    pub fn reject(self, ch: &Arc<EventChannel>, private_data: &[u8]) {
        // SAFETY: the id is live; the private data is valid for the call (librdmacm copies it).
        unsafe {
            sys::rdma_reject(
                self.ev().id,
                private_data.as_ptr() as *const c_void,
                private_data.len() as u8,
            )
        };
        // take_id acknowledges the event before the id is dropped (destroyed).
        drop(self.take_id(ch, 0));
    }
}

impl Drop for CmEvent {
    fn drop(&mut self) {
        // SAFETY: the event came from rdma_get_cm_event and is acknowledged exactly once, here.
        unsafe { sys::rdma_ack_cm_event(self.ev.as_ptr()) };
    }
}

/// What a queue pair is created with.
#[derive(Clone, Copy, Debug)]
pub struct QpCaps {
    /// Send work requests (SEND, RDMA READ, RDMA WRITE) outstanding at once.
    pub max_send_wr: u32,
    /// Receive work requests of the queue pair's own receive queue (0 with a shared one).
    pub max_recv_wr: u32,
    /// Scatter-gather entries per send work request.
    pub max_send_sge: u32,
    /// Scatter-gather entries per receive work request.
    pub max_recv_sge: u32,
}

/// An RDMA CM id: a listener, or one connection with its reliable connected queue pair.
pub struct CmId {
    id: NonNull<sys::rdma_cm_id>,
    _ch: Arc<EventChannel>,
}

// SAFETY: an id is created on the app thread and then used by one thread at a time (the poll group that owns the
// connection); librdmacm and the providers allow calls from any thread.
unsafe impl Send for CmId {}
// SAFETY: listeners are shared by the transport but only used for `device()` reads and dropped under its lock.
unsafe impl Sync for CmId {}

impl CmId {
    fn create(ch: &Arc<EventChannel>) -> io::Result<CmId> {
        let mut id: *mut sys::rdma_cm_id = std::ptr::null_mut();
        // SAFETY: the channel is live; `id` is a valid out pointer; a null context is the "no token" value.
        let rc = unsafe {
            sys::rdma_create_id(
                ch.0.as_ptr(),
                &mut id,
                std::ptr::null_mut(),
                sys::rdma_port_space::RDMA_PS_TCP,
            )
        };
        check(rc, "rdma_create_id")?;
        let id = NonNull::new(id).ok_or_else(|| io::Error::other("rdma_create_id: no id"))?;
        Ok(CmId {
            id,
            _ch: ch.clone(),
        })
    }

    fn raw(&self) -> *mut sys::rdma_cm_id {
        self.id.as_ptr()
    }

    fn get(&self) -> &sys::rdma_cm_id {
        // SAFETY: the id is live for as long as self.
        unsafe { self.id.as_ref() }
    }

    /// The id's identity (its address), as [`CmEvent::listen_key`] reports a listener.
    pub fn key(&self) -> usize {
        self.raw() as usize
    }

    /// Refuses the connection (an id taken from a connect request that could not be set up).
    pub fn reject(&self, private_data: &[u8]) {
        // SAFETY: the id is live; the private data is valid for the call (librdmacm copies it).
        unsafe {
            sys::rdma_reject(
                self.raw(),
                private_data.as_ptr() as *const c_void,
                private_data.len() as u8,
            )
        };
    }

    /// Destroys the queue pair now (before its buffers are given back); dropping the id later skips it.
    pub fn destroy_qp(&self) {
        if !self.get().qp.is_null() {
            // SAFETY: the queue pair is ours and live; rdma_destroy_qp clears `id->qp`, and the pointer is reset
            // here as well so nothing sees a destroyed queue pair.
            unsafe {
                sys::rdma_destroy_qp(self.raw());
                (*self.raw()).qp = std::ptr::null_mut();
            }
        }
    }

    /// The device (verbs context) the id is bound to, as a key.
    pub fn device(&self) -> Option<usize> {
        let v = self.get().verbs;
        (!v.is_null()).then_some(v as usize)
    }

    /// The token set when the id was taken.
    pub fn token(&self) -> u64 {
        self.get().context as u64
    }

    /// The peer's address (connections).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: `route.addr.dst_addr_union` holds a socket address librdmacm filled for a connected id.
        unsafe {
            let dst = &self.get().route.addr.dst_addr_union.dst_storage;
            socket_addr(dst as *const _ as *const libc::sockaddr)
        }
    }

    /// Creates the reliable connected queue pair in `pd`, completing to `cq`, receiving from `srq` if given.
    /// Returns its number.
    pub fn create_qp(
        &self,
        dev: &Device,
        cq: &Cq,
        srq: Option<&Srq>,
        caps: QpCaps,
    ) -> io::Result<u32> {
        let mut attr = sys::ibv_qp_init_attr {
            qp_context: std::ptr::null_mut(),
            send_cq: cq.cq.as_ptr(),
            recv_cq: cq.cq.as_ptr(),
            srq: srq.map_or(std::ptr::null_mut(), |s| s.srq.as_ptr()),
            cap: sys::ibv_qp_cap {
                max_send_wr: caps.max_send_wr,
                max_recv_wr: if srq.is_some() { 0 } else { caps.max_recv_wr },
                max_send_sge: caps.max_send_sge,
                max_recv_sge: caps.max_recv_sge,
                max_inline_data: 0,
            },
            qp_type: sys::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: the id, the domain, the CQ and the SRQ are live; `attr` is valid for the call.
        let rc = unsafe { sys::rdma_create_qp(self.raw(), dev.pd.as_ptr(), &mut attr) };
        check(rc, "rdma_create_qp")?;
        let qp = self.get().qp;
        if qp.is_null() {
            return Err(io::Error::other("rdma_create_qp: no queue pair"));
        }
        // SAFETY: the queue pair was just created on this id and lives as long as it.
        Ok(unsafe { (*qp).qp_num })
    }

    /// Accepts the connection with `private_data`, letting ourselves issue up to `initiator_depth` RDMA READs
    /// and the host none; RNR retries are infinite so the host's SENDs never fail for want of a receive.
    pub fn accept(&self, private_data: &[u8], initiator_depth: u8) -> io::Result<()> {
        let mut p = sys::rdma_conn_param {
            private_data: private_data.as_ptr() as *const c_void,
            private_data_len: private_data.len() as u8,
            responder_resources: 0,
            initiator_depth,
            flow_control: 0,
            retry_count: 0,
            rnr_retry_count: 7,
            srq: 0,
            qp_num: 0,
        };
        // SAFETY: the id is live with its queue pair; `p` and the private data are valid for the call.
        let rc = unsafe { sys::rdma_accept(self.raw(), &mut p) };
        check(rc, "rdma_accept")
    }

    /// Resolves the route of an id whose address resolved; [`event::ROUTE_RESOLVED`] follows.
    pub fn resolve_route(&self, timeout_ms: i32) -> io::Result<()> {
        // SAFETY: the id is live and its address resolved.
        let rc = unsafe { sys::rdma_resolve_route(self.raw(), timeout_ms) };
        check(rc, "rdma_resolve_route")
    }

    /// Sets an `RDMA_OPTION_ID` option of one byte (`RDMA_OPTION_ID_TOS` 0, `RDMA_OPTION_ID_ACK_TIMEOUT` 3 in
    /// `rdma_cma.h`): once the address resolved, before the route is.
    fn set_id_option(&self, name: c_int, value: u8) -> io::Result<()> {
        /// `RDMA_OPTION_ID`: the level of the id's own options.
        const RDMA_OPTION_ID: c_int = 0;
        let mut v = value;
        // SAFETY: the id is live; `v` is a valid one-byte buffer for the call, its length passed.
        let rc = unsafe {
            sys::rdma_set_option(
                self.raw(),
                RDMA_OPTION_ID,
                name,
                (&mut v as *mut u8).cast(),
                1,
            )
        };
        check(rc, "rdma_set_option")
    }

    /// Sets the IP type of service of the connection (RFC 2474), before the route is resolved.
    pub fn set_tos(&self, tos: u8) -> io::Result<()> {
        self.set_id_option(0, tos)
    }

    /// Sets the queue pair's local ACK timeout (4.096 µs x 2^`timeout`), before the route is resolved.
    pub fn set_ack_timeout(&self, timeout: u8) -> io::Result<()> {
        self.set_id_option(3, timeout)
    }

    /// Connects (the queue pair created) with `private_data`, letting the peer issue up to
    /// `responder_resources` RDMA READs against us and us `initiator_depth` against it, retrying a transmission
    /// `retry_count` times (at most 7); [`event::ESTABLISHED`] or a refusal follows. RNR retries are infinite,
    /// as SPDK's host asks.
    pub fn connect(
        &self,
        private_data: &[u8],
        responder_resources: u8,
        initiator_depth: u8,
        retry_count: u8,
    ) -> io::Result<()> {
        let mut p = sys::rdma_conn_param {
            private_data: private_data.as_ptr() as *const c_void,
            private_data_len: private_data.len() as u8,
            responder_resources,
            initiator_depth,
            flow_control: 1,
            retry_count: retry_count.min(7),
            rnr_retry_count: 7,
            srq: 0,
            qp_num: 0,
        };
        // SAFETY: the id is live with its queue pair; `p` and the private data are valid for the call.
        let rc = unsafe { sys::rdma_connect(self.raw(), &mut p) };
        check(rc, "rdma_connect")
    }

    /// Moves the queue pair to the error state (outstanding work requests complete, flushed) and sends a
    /// disconnect request to the host.
    pub fn disconnect(&self) {
        let qp = self.get().qp;
        if !qp.is_null() {
            // SAFETY: zero is a valid ibv_qp_attr; only qp_state is read (mask IBV_QP_STATE).
            let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
            attr.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
            // SAFETY: the queue pair is live (owned by this id); failure is harmless (already in error).
            unsafe {
                sys::ibv_modify_qp(
                    qp,
                    &mut attr,
                    sys::ibv_qp_attr_mask::IBV_QP_STATE.0 as c_int,
                )
            };
        }
        // SAFETY: the id is live; disconnecting an id that is not connected just fails.
        unsafe { sys::rdma_disconnect(self.raw()) };
    }

    /// Posts one receive of `sge` on the queue pair's own receive queue.
    pub fn post_recv(&self, wr_id: u64, sge: Sge) -> io::Result<()> {
        let qp = self.get().qp;
        if qp.is_null() {
            return Err(io::Error::other("no queue pair"));
        }
        let mut s = sge.raw();
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut s,
            num_sge: 1,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: the queue pair is live; `wr` and its SGE are valid for the call (the provider copies them);
        // the memory the SGE names is registered and owned by the caller's receive pool until completion.
        let rc = unsafe { sys::ibv_post_recv(qp, &mut wr, &mut bad) };
        check(rc, "ibv_post_recv")
    }

    /// Posts `wrs` in order as one chain.
    pub fn post_send(&self, wrs: &[SendWr]) -> io::Result<()> {
        let qp = self.get().qp;
        if qp.is_null() {
            return Err(io::Error::other("no queue pair"));
        }
        let n = wrs.len().min(MAX_WRS);
        if n == 0 {
            return Ok(());
        }
        let mut sges: [sys::ibv_sge; MAX_WRS] = [sys::ibv_sge {
            addr: 0,
            length: 0,
            lkey: 0,
        }; MAX_WRS];
        // SAFETY: ibv_send_wr is plain C data; all zero (null pointers, zero counts) is a valid value.
        let mut raw: [sys::ibv_send_wr; MAX_WRS] =
            std::array::from_fn(|_| unsafe { std::mem::zeroed() });
        for (i, w) in wrs[..n].iter().enumerate() {
            sges[i] = w.sge.raw();
        }
        let base = raw.as_mut_ptr();
        let sge_base = sges.as_mut_ptr();
        for (i, w) in wrs[..n].iter().enumerate() {
            let r = &mut raw[i];
            r.wr_id = w.wr_id;
            // SAFETY: `i < n <= MAX_WRS`: both pointers stay inside their arrays, which outlive the post.
            r.sg_list = unsafe { sge_base.add(i) };
            r.num_sge = 1;
            r.send_flags = if w.signaled {
                sys::ibv_send_flags::IBV_SEND_SIGNALED.0
            } else {
                0
            };
            match w.op {
                Op::Send => r.opcode = sys::ibv_wr_opcode::IBV_WR_SEND,
                Op::Read { raddr, rkey } | Op::Write { raddr, rkey } => {
                    r.opcode = if matches!(w.op, Op::Read { .. }) {
                        sys::ibv_wr_opcode::IBV_WR_RDMA_READ
                    } else {
                        sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE
                    };
                    r.wr.rdma = sys::rdma_t {
                        remote_addr: raddr,
                        rkey,
                    };
                }
            }
            r.next = if i + 1 < n {
                // SAFETY: `i + 1 < n`: inside the array.
                unsafe { base.add(i + 1) }
            } else {
                std::ptr::null_mut()
            };
        }
        let mut bad = std::ptr::null_mut();
        // SAFETY: the queue pair is live; the chain and its SGEs are valid for the call (the provider copies
        // them); the local memory is registered and owned by the caller until the completions arrive.
        let rc = unsafe { sys::ibv_post_send(qp, base, &mut bad) };
        check(rc, "ibv_post_send")
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: the id is ours; its queue pair (if any) goes first, as librdmacm requires, and no event of
        // the id is unacknowledged on this thread (events are acknowledged as soon as they are read).
        unsafe {
            if !self.get().qp.is_null() {
                sys::rdma_destroy_qp(self.raw());
            }
            sys::rdma_destroy_id(self.raw());
        }
    }
}

/// A scatter-gather entry: registered local memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sge {
    /// Address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Local key of the memory region.
    pub lkey: u32,
}

impl Sge {
    fn raw(self) -> sys::ibv_sge {
        sys::ibv_sge {
            addr: self.addr,
            length: self.len,
            lkey: self.lkey,
        }
    }
}

/// A send queue operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// SEND (a response capsule).
    Send,
    /// RDMA READ from the host's memory at `raddr` with `rkey`.
    Read {
        /// Remote address.
        raddr: u64,
        /// Remote key.
        rkey: u32,
    },
    /// RDMA WRITE to the host's memory.
    Write {
        /// Remote address.
        raddr: u64,
        /// Remote key.
        rkey: u32,
    },
}

/// A send work request.
#[derive(Clone, Copy, Debug)]
pub struct SendWr {
    /// Identifies the completion.
    pub wr_id: u64,
    /// What to do.
    pub op: Op,
    /// The local memory.
    pub sge: Sge,
    /// Whether it produces a completion on success.
    pub signaled: bool,
}

/// A work completion.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wc {
    /// The work request's id.
    pub wr_id: u64,
    /// Status (`ibv_wc_status`, 0 success).
    pub status: u32,
    /// Bytes received (receives).
    pub byte_len: u32,
    /// The local queue pair.
    pub qp_num: u32,
}

/// `IBV_WC_SUCCESS`.
pub const WC_SUCCESS: u32 = sys::ibv_wc_status::IBV_WC_SUCCESS;
/// `IBV_WC_WR_FLUSH_ERR`: the queue pair went to the error state.
pub const WC_FLUSH_ERR: u32 = sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR;

/// libibverbs' name of a completion status.
pub fn wc_status_str(status: u32) -> String {
    // SAFETY: ibv_wc_status_str returns a static string for any value.
    unsafe { CStr::from_ptr(sys::ibv_wc_status_str(status)) }
        .to_string_lossy()
        .into_owned()
}

/// A completion queue.
pub struct Cq {
    cq: NonNull<sys::ibv_cq>,
}

impl Cq {
    /// A completion queue of at least `cqe` entries on `dev`.
    pub fn new(dev: &Device, cqe: i32) -> io::Result<Cq> {
        // SAFETY: the context is live (librdmacm keeps device contexts open); no channel, vector 0.
        let cq = unsafe {
            sys::ibv_create_cq(dev.ctx, cqe, std::ptr::null_mut(), std::ptr::null_mut(), 0)
        };
        Ok(Cq {
            cq: NonNull::new(cq).ok_or_else(|| os_err("ibv_create_cq"))?,
        })
    }

    /// Grows (or shrinks) the queue to at least `cqe` entries.
    pub fn resize(&self, cqe: i32) -> io::Result<()> {
        // SAFETY: the queue is live and polled only by this thread.
        let rc = unsafe { sys::ibv_resize_cq(self.cq.as_ptr(), cqe) };
        check(rc, "ibv_resize_cq")
    }

    /// Entries the queue has.
    pub fn size(&self) -> i32 {
        // SAFETY: the queue is live; `cqe` is its current capacity.
        unsafe { (*self.cq.as_ptr()).cqe }
    }

    /// Takes up to `out.len()` completions; returns how many (negative provider errors count as none).
    pub fn poll(&self, out: &mut [Wc]) -> usize {
        const N: usize = 32;
        let mut raw: [MaybeUninit<sys::ibv_wc>; N] = [const { MaybeUninit::uninit() }; N];
        let want = out.len().min(N) as c_int;
        // SAFETY: the queue is live; `raw` has room for `want` entries, which the provider fills.
        let n = unsafe { sys::ibv_poll_cq(self.cq.as_ptr(), want, raw.as_mut_ptr() as *mut _) };
        let n = n.max(0) as usize;
        for (o, r) in out.iter_mut().zip(&raw[..n]) {
            // SAFETY: the provider initialised the first `n` entries.
            let w = unsafe { r.assume_init_ref() };
            *o = Wc {
                wr_id: w.wr_id,
                status: w.status,
                byte_len: w.byte_len,
                qp_num: w.qp_num,
            };
        }
        n
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: no queue pair uses the queue any more (they are destroyed before their poll group part).
        unsafe { sys::ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

/// A shared receive queue.
pub struct Srq {
    srq: NonNull<sys::ibv_srq>,
}

impl Srq {
    /// A shared receive queue of `max_wr` receives with up to `max_sge` entries each, in `dev`'s domain.
    pub fn new(dev: &Device, max_wr: u32, max_sge: u32) -> io::Result<Srq> {
        let mut attr = sys::ibv_srq_init_attr {
            srq_context: std::ptr::null_mut(),
            attr: sys::ibv_srq_attr {
                max_wr,
                max_sge,
                srq_limit: 0,
            },
        };
        // SAFETY: the domain is live; `attr` is valid for the call.
        let srq = unsafe { sys::ibv_create_srq(dev.pd.as_ptr(), &mut attr) };
        Ok(Srq {
            srq: NonNull::new(srq).ok_or_else(|| os_err("ibv_create_srq"))?,
        })
    }

    /// Posts one receive of `sge`.
    pub fn post_recv(&self, wr_id: u64, sge: Sge) -> io::Result<()> {
        let mut s = sge.raw();
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut s,
            num_sge: 1,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: the queue is live; `wr` and its SGE are valid for the call (copied by the provider); the
        // memory is registered and owned by the receive pool until the receive completes.
        let rc = unsafe { sys::ibv_post_srq_recv(self.srq.as_ptr(), &mut wr, &mut bad) };
        check(rc, "ibv_post_srq_recv")
    }
}

impl Drop for Srq {
    fn drop(&mut self) {
        // SAFETY: no queue pair uses the queue any more (they are destroyed before their poll group part).
        unsafe { sys::ibv_destroy_srq(self.srq.as_ptr()) };
    }
}

/// A device's limits, as the transport uses them.
#[derive(Clone, Debug, Default)]
pub struct DeviceAttr {
    /// Device name (`rxe0`, `mlx5_0`).
    pub name: String,
    /// IEEE vendor id (0: Soft-RoCE).
    pub vendor_id: u32,
    /// Work requests per queue.
    pub max_qp_wr: i32,
    /// RDMA READs a queue pair may have outstanding as initiator.
    pub max_qp_init_rd_atom: i32,
    /// Scatter-gather entries per work request.
    pub max_sge: i32,
    /// Completion queue entries.
    pub max_cqe: i32,
    /// Shared receive queues.
    pub max_srq: i32,
    /// Receives per shared receive queue.
    pub max_srq_wr: i32,
}

/// The translation value of registered memory: its local key, and its remote key above.
pub fn lkey_of(translation: u64) -> u32 {
    translation as u32
}

/// An RDMA device: its verbs context (librdmacm's), a protection domain, and the memory map that registers
/// every region of I/O memory in it.
pub struct Device {
    ctx: *mut sys::ibv_context,
    pd: NonNull<sys::ibv_pd>,
    /// Limits.
    pub attr: DeviceAttr,
    map: Option<MemMap>,
}

// SAFETY: verbs contexts, domains and memory regions may be used from any thread (libibverbs is thread-safe);
// the device is shared read-only by the poll groups.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

/// A memory region pointer kept by the map callback.
struct MrPtr(NonNull<sys::ibv_mr>);
// SAFETY: memory regions may be deregistered from any thread.
unsafe impl Send for MrPtr {}

/// A protection domain pointer the map callback registers memory in.
#[derive(Clone, Copy)]
struct PdPtr(NonNull<sys::ibv_pd>);
// SAFETY: registering memory in a domain is thread-safe in libibverbs.
unsafe impl Send for PdPtr {}
// SAFETY: as above.
unsafe impl Sync for PdPtr {}

impl PdPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut sys::ibv_pd {
        self.0.as_ptr()
    }
}

impl Device {
    /// Every RDMA device librdmacm knows, each with a domain and its memory map. Fails when librdmacm cannot
    /// start (no RDMA CM in the kernel); an empty list when there is no device.
    pub fn open_all() -> io::Result<Vec<Arc<Device>>> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out pointer; a null list is an error.
        let list = unsafe { sys::rdma_get_devices(&mut n) };
        if list.is_null() {
            return Err(os_err("rdma_get_devices"));
        }
        let mut out = Vec::new();
        let mut res = Ok(());
        for i in 0..n.max(0) as usize {
            // SAFETY: librdmacm returned `n` contexts (NULL terminated).
            let ctx = unsafe { *list.add(i) };
            if ctx.is_null() {
                break;
            }
            match Device::open(ctx) {
                Ok(d) => out.push(Arc::new(d)),
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        // SAFETY: the list came from rdma_get_devices; the contexts stay open (librdmacm owns them).
        unsafe { sys::rdma_free_devices(list) };
        res.map(|()| out)
    }

    fn open(ctx: *mut sys::ibv_context) -> io::Result<Device> {
        let mut a = MaybeUninit::<sys::ibv_device_attr>::zeroed();
        // SAFETY: the context is live; `a` has room for the attributes.
        let rc = unsafe { sys::ibv_query_device(ctx, a.as_mut_ptr()) };
        check(rc, "ibv_query_device")?;
        // SAFETY: zero-initialised and filled by the call above.
        let a = unsafe { a.assume_init() };
        // SAFETY: the context's device is live; the name is a NUL-terminated string it owns.
        let name = unsafe { CStr::from_ptr(sys::ibv_get_device_name((*ctx).device)) }
            .to_string_lossy()
            .into_owned();
        let attr = DeviceAttr {
            name,
            vendor_id: a.vendor_id,
            max_qp_wr: a.max_qp_wr,
            max_qp_init_rd_atom: a.max_qp_init_rd_atom,
            max_sge: a.max_sge,
            max_cqe: a.max_cqe,
            max_srq: a.max_srq,
            max_srq_wr: a.max_srq_wr,
        };
        // SAFETY: the context is live.
        let pd = unsafe { sys::ibv_alloc_pd(ctx) };
        let pd = NonNull::new(pd).ok_or_else(|| os_err("ibv_alloc_pd"))?;
        let mut dev = Device {
            ctx,
            pd,
            attr,
            map: None,
        };
        let pdp = PdPtr(pd);
        let mrs: Mutex<HashMap<usize, MrPtr>> = Mutex::new(HashMap::new());
        let dev_name = dev.attr.name.clone();
        let map = MemMap::new(move |t, ev, addr, len| {
            let mut mrs = reactor::lock(&mrs);
            match ev {
                MemEvent::Register => {
                    let access = sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
                        | sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
                        | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
                    // SAFETY: the domain lives until the map is dropped (Device::drop drops the map first); the
                    // region is mapped memory its producer keeps until it unregisters it.
                    let mr = unsafe {
                        sys::ibv_reg_mr(pdp.get(), addr as *mut c_void, len, access as c_int)
                    };
                    match NonNull::new(mr) {
                        Some(mr) => {
                            // SAFETY: the memory region was just created.
                            let (lkey, rkey) =
                                unsafe { ((*mr.as_ptr()).lkey, (*mr.as_ptr()).rkey) };
                            t.set_translation(addr, len, lkey as u64 | (rkey as u64) << 32)
                                .map_err(io::Error::from)?;
                            mrs.insert(addr, MrPtr(mr));
                        }
                        // Memory the device cannot register stays usable by everyone else; the transport
                        // refuses commands whose buffer has no translation.
                        None => log::warn!(
                            "rdma: {dev_name}: ibv_reg_mr {addr:#x}+{len:#x}: {}",
                            io::Error::last_os_error()
                        ),
                    }
                }
                MemEvent::Unregister => {
                    if let Some(mr) = mrs.remove(&addr) {
                        // SAFETY: the region is ours, registered above; nothing of ours uses the memory any
                        // more (its producer is unmapping it).
                        unsafe { sys::ibv_dereg_mr(mr.0.as_ptr()) };
                    }
                }
            }
            Ok(())
        })
        .map_err(io::Error::from)?;
        dev.map = Some(map);
        Ok(dev)
    }

    /// The device's key (its verbs context), as CM ids report it.
    pub fn key(&self) -> usize {
        self.ctx as usize
    }

    /// Soft-RoCE (rxe), whose vendor id is 0.
    pub fn is_rxe(&self) -> bool {
        self.attr.vendor_id == 0 || self.attr.vendor_id == 0xffffff
    }

    /// A cache of the translations of this device's memory map, for one user on the I/O path.
    pub fn translations(&self) -> reactor::memmap::TranslationCache {
        match &self.map {
            Some(m) => m.cache(),
            None => reactor::memmap::Translations::new().cache(),
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // The map goes first: it deregisters every memory region in the domain.
        self.map.take();
        // SAFETY: nothing else uses the domain (queue pairs, SRQs and regions are gone).
        unsafe { sys::ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}
