//! The transport object: devices, listeners and the acceptor (app thread).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nvme_proto::rdma::{reject, CmReject, CmRequest};
use nvmf::error::{Error, ErrorKind, Result};
use nvmf::params::transport::{RdmaOpts, TransportSpecific};
use nvmf::pg::Pg;
use nvmf::tgt::{AdrFam, Trid};
use nvmf::transport::{Transport, TransportOpts};
use reactor::{Poller, ThreadHandle};

use crate::group::{ConnReq, RdmaGroup};
use crate::verbs::{CmEvent, CmId, Device, EventChannel};

/// CM events handled per acceptor poll (SPDK's `NVMF_RDMA_MAX_EVENTS_PER_POLL`).
const MAX_EVENTS_PER_POLL: usize = 32;

/// What the transport shares with its poll groups.
pub(crate) struct Shared {
    /// The engine's options.
    pub opts: TransportOpts,
    /// RDMA's own options.
    pub rdma: RdmaOpts,
    /// Every RDMA device.
    pub devices: Vec<Arc<Device>>,
    /// Data buffer units (`io_unit_size` bytes) held by commands, against `num_shared_buffers`.
    pub units_in_use: AtomicU32,
    /// Poll group of each connection, by the token in its CM id's context (for CM events).
    pub conns: Mutex<HashMap<u64, ThreadHandle>>,
}

/// The RDMA transport.
pub struct RdmaTransport {
    params: nvmf::params::TransportOpts,
    shared: Arc<Shared>,
    ch: Arc<EventChannel>,
    listeners: Mutex<Vec<(Trid, CmId)>>,
    next_token: AtomicU64,
}

thread_local! {
    /// The acceptor poller, on the thread that created the transport.
    static ACCEPTOR: RefCell<Option<Poller>> = const { RefCell::new(None) };
}

fn os(e: std::io::Error, ctx: &str) -> Error {
    Error::os(e, format!("nvmf_rdma: {ctx}"))
}

impl RdmaTransport {
    /// Opens the devices and the event channel and starts the acceptor poller on the current thread (every
    /// `acceptor_poll_rate` µs). Fails when there is no RDMA CM (no RDMA in the kernel), as SPDK's create does.
    pub fn create(params: nvmf::params::TransportOpts) -> Result<Arc<RdmaTransport>> {
        let rdma = match &params.specific {
            TransportSpecific::Rdma(r) => r.clone(),
            TransportSpecific::Tcp(_) => {
                return Err(Error::new(ErrorKind::Invalid, "not RDMA options"));
            }
        };
        let ch = EventChannel::new().map_err(|e| os(e, "rdma_create_event_channel() failed"))?;
        let devices = Device::open_all().map_err(|e| os(e, "rdma_get_devices() failed"))?;
        for d in &devices {
            log::info!(
                "nvmf_rdma: Create IB device {} (vendor {:#x}, max_qp_wr {}, max_srq_wr {}, max_sge {}) succeed",
                d.attr.name,
                d.attr.vendor_id,
                d.attr.max_qp_wr,
                d.attr.max_srq_wr,
                d.attr.max_sge
            );
        }
        let opts = TransportOpts::from(&params);
        log::info!(
            "nvmf_rdma: *** RDMA Transport Init *** max_ioq_depth={} max_io_size={} io_unit_size={} \
             in_capsule_data_size={} max_aq_depth={} num_shared_buffers={} num_cqe={} max_srq_depth={} \
             no_srq={} acceptor_backlog={}",
            opts.max_queue_depth,
            opts.max_io_size,
            opts.io_unit_size,
            opts.in_capsule_data_size,
            opts.max_aq_depth,
            opts.num_shared_buffers,
            rdma.num_cqe,
            rdma.max_srq_depth,
            rdma.no_srq,
            rdma.acceptor_backlog
        );
        let poll_rate = params.acceptor_poll_rate as u64;
        let t = Arc::new(RdmaTransport {
            params,
            shared: Arc::new(Shared {
                opts,
                rdma,
                devices,
                units_in_use: AtomicU32::new(0),
                conns: Mutex::new(HashMap::new()),
            }),
            ch,
            listeners: Mutex::new(Vec::new()),
            next_token: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&t);
        let p = Poller::register("nvmf_rdma_accept", poll_rate, move || {
            weak.upgrade().is_some_and(|t| t.accept())
        });
        ACCEPTOR.with(|a| *a.borrow_mut() = Some(p));
        Ok(t)
    }

    /// Handles the waiting CM events.
    fn accept(&self) -> bool {
        let mut n = 0;
        while n < MAX_EVENTS_PER_POLL {
            match self.ch.next() {
                None => break,
                Some(Err(e)) => {
                    log::error!("nvmf_rdma: {e}");
                    break;
                }
                Some(Ok(ev)) => {
                    n += 1;
                    self.event(ev);
                }
            }
        }
        n > 0
    }

    fn event(&self, ev: CmEvent) {
        use rdma_sys::rdma_cm_event_type as t;
        match ev.kind() {
            t::RDMA_CM_EVENT_CONNECT_REQUEST => self.connect_request(ev),
            // The connection runs from the accept on; nothing waits for this.
            t::RDMA_CM_EVENT_ESTABLISHED | t::RDMA_CM_EVENT_TIMEWAIT_EXIT => {}
            t::RDMA_CM_EVENT_DISCONNECTED
            | t::RDMA_CM_EVENT_CONNECT_ERROR
            | t::RDMA_CM_EVENT_UNREACHABLE
            | t::RDMA_CM_EVENT_REJECTED => {
                let token = ev.token();
                let name = ev.name();
                // Acknowledge before anything else: the poll group may be destroying the id.
                drop(ev);
                self.route_disconnect(token, name);
            }
            t::RDMA_CM_EVENT_DEVICE_REMOVAL => {
                let token = ev.token();
                drop(ev);
                if token == 0 {
                    log::error!("nvmf_rdma: an RDMA device of a listener was removed");
                } else {
                    self.route_disconnect(token, "RDMA_CM_EVENT_DEVICE_REMOVAL".into());
                }
            }
            _ => log::info!(
                "nvmf_rdma: unexpected RDMA CM event {} (status {})",
                ev.name(),
                ev.status()
            ),
        }
    }

    /// Tells the connection's poll group its host is gone (SPDK's `nvmf_rdma_disconnect`).
    fn route_disconnect(&self, token: u64, why: String) {
        if token == 0 {
            return;
        }
        let th = reactor::lock(&self.shared.conns).get(&token).cloned();
        if let Some(th) = th {
            th.send(move || {
                if let Some(g) = nvmf::pg::current().and_then(|pg| pg.group::<RdmaGroup>()) {
                    g.cm_disconnect(token, &why);
                }
            });
        }
    }

    /// A connect request: checks the private data, sizes the queue, hands the id to a poll group (SPDK's
    /// `nvmf_rdma_connect`; the accept is sent by the poll group once the queue pair exists).
    fn connect_request(&self, ev: CmEvent) {
        let refuse = |ev: CmEvent, sts: u16, why: &str| {
            log::error!("nvmf_rdma: connect request refused: {why}");
            let mut b = [0u8; 4];
            CmReject { recfmt: 0, sts }.encode(&mut b);
            ev.reject(&self.ch, &b);
        };
        let p = ev.conn_params();
        let Some(req) = CmRequest::decode(&p.private_data) else {
            return refuse(
                ev,
                reject::INVALID_PRIVATE_DATA_LENGTH,
                "no private data provided",
            );
        };
        if req.recfmt != 0 {
            return refuse(
                ev,
                reject::INVALID_RECFMT,
                "Received RDMA private data with RECFMT != 0",
            );
        }
        let Some(dev) = ev
            .device()
            .and_then(|k| self.shared.devices.iter().find(|d| d.key() == k))
            .cloned()
        else {
            return refuse(ev, reject::NO_RESOURCES, "no such RDMA device");
        };
        if p.responder_resources != 0 {
            log::debug!(
                "nvmf_rdma: host asks for {} responder resources; it is not allowed RDMA READs",
                p.responder_resources
            );
        }
        if p.initiator_depth == 0 {
            return refuse(
                ev,
                reject::INVALID_IRD,
                "Host (Initiator) doesn't support RDMA_READ or atomic operations",
            );
        }
        // The queue depth: the target's limit, the device's, and the host's receive and send queues.
        let opts = &self.shared.opts;
        let qd = (opts.max_queue_depth as u32)
            .min(dev.attr.max_qp_wr.max(1) as u32)
            .min(req.hrqsize as u32)
            .min(req.hsqsize as u32 + 1);
        if qd == 0 {
            return refuse(ev, reject::INVALID_HRQSIZE, "host receive queue size 0");
        }
        let max_read = (opts.max_queue_depth as u32)
            .min(dev.attr.max_qp_init_rd_atom.max(1) as u32)
            .min(p.initiator_depth as u32);
        let listen_key = ev.listen_key();
        let listen = reactor::lock(&self.listeners)
            .iter()
            .find(|(_, id)| id.key() == listen_key)
            .map(|(t, _)| t.clone());
        let Some(listen) = listen else {
            return refuse(ev, reject::NO_RESOURCES, "no listener for the request");
        };
        let Some(pg) = nvmf::tgt::tgt().next_poll_group() else {
            return refuse(ev, reject::NO_RESOURCES, "no poll group");
        };
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        reactor::lock(&self.shared.conns).insert(token, pg.thread.clone());
        let Some(id) = ev.take_id(&self.ch, token) else {
            reactor::lock(&self.shared.conns).remove(&token);
            return;
        };
        let peer = id
            .peer_addr()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        log::info!(
            "nvmf_rdma: connect request from {peer} for queue {} (hrqsize {}, hsqsize {}) at {}:{} -> poll \
             group {}, queue depth {qd}, read depth {max_read}",
            req.qid,
            req.hrqsize,
            req.hsqsize,
            listen.traddr,
            listen.trsvcid,
            pg.id
        );
        let cr = ConnReq {
            token,
            qid: req.qid,
            qd: qd as u16,
            max_read,
            peer,
            listen,
            dev: dev.key(),
        };
        let shared = self.shared.clone();
        pg.thread.send(move || {
            let g = nvmf::pg::current().and_then(|pg| pg.group::<RdmaGroup>().map(|g| (pg, g)));
            match g {
                Some((pg, g)) => g.add_conn(&pg, id, cr),
                None => {
                    log::error!("nvmf_rdma: poll group has no RDMA part");
                    let mut b = [0u8; 4];
                    CmReject {
                        recfmt: 0,
                        sts: reject::NO_RESOURCES,
                    }
                    .encode(&mut b);
                    id.reject(&b);
                    reactor::lock(&shared.conns).remove(&token);
                }
            }
        });
    }
}

impl Transport for RdmaTransport {
    fn name(&self) -> &'static str {
        "RDMA"
    }

    fn opts(&self) -> &TransportOpts {
        &self.shared.opts
    }

    fn params(&self) -> &nvmf::params::TransportOpts {
        &self.params
    }

    fn listen(&self, trid: &Trid, _secure: bool) -> Result<()> {
        let mut ls = reactor::lock(&self.listeners);
        if ls.iter().any(|(t, _)| t.same(trid)) {
            return Ok(());
        }
        let port = match trid.trsvcid.parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => p as u16,
            _ => {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!("invalid trsvcid {}", trid.trsvcid),
                ))
            }
        };
        let ip: IpAddr = match (trid.adrfam, trid.traddr.parse::<IpAddr>()) {
            (AdrFam::Ipv4, Ok(ip @ IpAddr::V4(_))) | (AdrFam::Ipv6, Ok(ip @ IpAddr::V6(_))) => ip,
            (AdrFam::Ipv4 | AdrFam::Ipv6, _) => {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!("getaddrinfo failed for {}", trid.traddr),
                ))
            }
            (f, _) => {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!("Unhandled ADRFAM {f:?}"),
                ))
            }
        };
        let id = self
            .ch
            .listen(SocketAddr::new(ip, port), self.shared.rdma.acceptor_backlog)
            .map_err(|e| os(e, &format!("listen on {}:{port}", trid.traddr)))?;
        log::info!(
            "*** NVMe/RDMA Target Listening on {} port {port} ***",
            trid.traddr
        );
        ls.push((trid.clone(), id));
        Ok(())
    }

    fn stop_listen(&self, trid: &Trid) {
        reactor::lock(&self.listeners).retain(|(t, _)| !t.same(trid));
    }

    fn poll_group_start(&self, pg: &Rc<Pg>) {
        match RdmaGroup::new(self.shared.clone()) {
            Ok(g) => pg.add_group(g),
            Err(e) => log::error!("nvmf_rdma: poll group {}: {e}", pg.id),
        }
    }

    fn shutdown(&self) {
        reactor::lock(&self.listeners).clear();
        ACCEPTOR.with(|a| a.borrow_mut().take());
    }
}
