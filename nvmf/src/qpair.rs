//! What every queue pair does whatever its transport (SPDK's `spdk_nvmf_request_exec`): a command whose data
//! has arrived is run here: Fabrics commands (Connect, Property Get/Set), admin commands on the controller, I/O
//! commands on the poll group's namespace table. The transport moves data and sends the outcome.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use nvme_proto::cmd::{fuse, io, Sqe, FABRICS};
use nvme_proto::fabrics::fctype;
use nvme_proto::status::{generic, Status};
use reactor::dma::DmaBuf;
use reactor::Poller;

use crate::ctrlr::{self, Admin, Ctrlr};
use crate::io::Start;
use crate::pg::{self, AnaTable, PgSubsys, QpKey};
use crate::tgt::Trid;
use crate::transport::TransportOpts;

/// What a queue pair established at Connect.
#[derive(Default)]
pub struct Session {
    /// Connect succeeded.
    pub connected: bool,
    /// Queue id (0: admin).
    pub qid: u16,
    /// Submission queue size, 0-based.
    pub sqsize: u16,
    /// The controller.
    pub ctrlr: Option<Arc<Ctrlr>>,
    /// The poll group's table of the controller's subsystem.
    pub sub: Option<Rc<PgSubsys>>,
    /// ANA states of the listener the queue pair came through.
    pub ana: Option<AnaTable>,
    /// The keep alive timer (admin queues).
    pub ka: Option<Poller>,
    /// The first command of a fused pair (a Compare), waiting for its second: slot, command, data buffer.
    fused_first: Option<(u16, Sqe, *mut u8, u32)>,
    /// Fused pairs submitted as one compare-and-write: (second's slot, first's slot).
    fused_pairs: Vec<(u16, u16)>,
    /// A first fused command that lost its second (completed by the transport with ABORTED_MISSING_FUSED).
    orphan: Option<u16>,
    /// A first fused command whose pair was refused before it started, with the refusal.
    orphan_status: Option<(u16, Status)>,
}

/// Who the queue pair is.
pub struct Ident<'a> {
    /// Its key in the poll group.
    pub key: QpKey,
    /// The listener it came in through.
    pub listen: &'a Trid,
    /// The host's address.
    pub peer: SocketAddr,
    /// The transport's options.
    pub opts: &'a TransportOpts,
    /// The PSK identity of a connection made over TLS (`NVMe0R0X <hostnqn> <subnqn>`).
    pub tls_identity: Option<&'a [u8]>,
}

/// A command's outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Complete now.
    Done {
        /// Status.
        status: Status,
        /// Completion dword 0.
        dw0: u32,
        /// Completion dword 1.
        dw1: u32,
    },
    /// `n` bdev I/Os were submitted; the command completes when the last one does.
    Submitted(u16),
    /// Left outstanding (an Asynchronous Event Request), completed later through [`pg::Qpair::complete_async`].
    Parked,
}

fn done(status: Status, dw0: u32) -> Outcome {
    Outcome::Done {
        status,
        dw0,
        dw1: 0,
    }
}

fn sequence_error() -> Outcome {
    done(Status::generic(generic::COMMAND_SEQUENCE_ERROR), 0)
}

impl Session {
    /// Asks the bdev to abort the I/O of `target`, the command in that slot of queue pair `key` (SPDK's
    /// `spdk_nvmf_bdev_ctrlr_abort_cmd`); `done` is told whether every I/O of it was aborted. When there is no
    /// target, or the abort cannot start (no namespace, no abort in the bdev), `done(false)` runs before this
    /// returns, so it must not touch the queue pair's state.
    pub fn abort_at_bdev(
        &self,
        key: QpKey,
        target: Option<(u16, Sqe)>,
        done: Box<dyn FnOnce(bool)>,
    ) {
        let ns = target.and_then(|(_, sqe)| {
            let t = self.sub.as_ref()?.ns.borrow();
            sqe.nsid()
                .checked_sub(1)
                .and_then(|i| t.get(i as usize).cloned().flatten())
        });
        let (Some((slot, _)), Some(ns)) = (target, ns) else {
            return done(false);
        };
        if !ns.ch.bdev().io_type_supported(bdev::IoType::Abort) {
            return done(false);
        }
        // The callback is needed back if the abort cannot be submitted: shared until one side takes it.
        let cell = Rc::new(std::cell::Cell::new(Some(done)));
        let c = cell.clone();
        let cb = bdev::Completion::Closure(Box::new(move |io: bdev::IoHandle| {
            if let Some(done) = c.take() {
                done(io.success());
            }
        }));
        if ns.ch.abort(pg::io_ctx(key, slot), cb, 0).is_err() {
            if let Some(done) = cell.take() {
                done(false);
            }
        }
    }

    /// Runs the command in `slot`. `buf[..len]` holds its data (host to controller), or is the place for the
    /// answer when `c2h` (zeroed here for admin commands, as SPDK does).
    ///
    /// # Safety
    /// `buf` must stay allocated, and not be otherwise accessed, until every bdev I/O this submits (the count
    /// in [`Outcome::Submitted`]) has completed through [`pg::io_done`].
    pub unsafe fn exec(
        &mut self,
        id: &Ident<'_>,
        sqe: &Sqe,
        buf: Option<&mut DmaBuf>,
        len: u32,
        c2h: bool,
        slot: u16,
    ) -> Outcome {
        if sqe.opc() == FABRICS {
            let data = buf
                .as_ref()
                .map_or(&[][..], |b| &b.as_slice()[..len as usize]);
            return self.fabrics(id, sqe, data);
        }
        if !self.connected {
            return sequence_error();
        }
        if self.qid == 0 {
            let Some(c) = self.ctrlr.clone() else {
                return sequence_error();
            };
            let data: &mut [u8] = match buf {
                Some(b) => &mut b.as_mut_slice()[..len as usize],
                None => &mut [],
            };
            if c2h {
                data.fill(0);
            }
            return match c.admin(sqe, data, slot, id.listen) {
                Admin::Done { dw0, status } => done(status, dw0),
                Admin::Parked => Outcome::Parked,
            };
        }
        let Some(sub) = self.sub.clone() else {
            return sequence_error();
        };
        let ptr = buf.map_or(std::ptr::null_mut(), |b| b.as_ptr());
        let ctx = pg::io_ctx(id.key, slot);
        let ctrlr = self.ctrlr.clone();
        let host = ctrlr.as_ref().map_or("", |c| c.hostnqn.as_str());
        let started = match sqe.fuse() {
            0 => {
                if let Some((first, ..)) = self.fused_first.take() {
                    // A first fused command whose second never came (SPDK fails it the same way).
                    self.orphan = Some(first);
                }
                // SAFETY: forwarded from the caller, who keeps the buffer for the bdev I/O's whole life.
                unsafe { crate::io::exec(&sub, self.ana.as_ref(), host, sqe, ptr, len, ctx) }
            }
            fuse::FIRST => {
                if let Some((first, ..)) = self.fused_first.take() {
                    self.orphan = Some(first);
                }
                if sqe.opc() != io::COMPARE {
                    return done(Status::generic(generic::INVALID_OPCODE), 0);
                }
                self.fused_first = Some((slot, *sqe, ptr, len));
                return Outcome::Parked;
            }
            fuse::SECOND => {
                let Some((first, fsqe, fptr, flen)) = self.fused_first.take() else {
                    return done(Status::generic(generic::ABORTED_MISSING_FUSED), 0);
                };
                if sqe.opc() != io::WRITE {
                    self.orphan = Some(first);
                    return done(Status::generic(generic::INVALID_OPCODE), 0);
                }
                // SAFETY: forwarded from the caller for both slots' buffers (the first's stays with its slot,
                // outstanding until this pair completes).
                let s = unsafe {
                    crate::io::compare_and_write(
                        &sub,
                        self.ana.as_ref(),
                        host,
                        &fsqe,
                        (fptr, flen),
                        sqe,
                        (ptr, len),
                        ctx,
                    )
                };
                match s {
                    Start::Submitted(_) => self.fused_pairs.push((slot, first)),
                    // Refused before it started: the first carries the reason, the second "failed fused".
                    Start::Done(st) => {
                        self.orphan_status = Some((first, st));
                        return done(Status::generic(generic::ABORTED_FAILED_FUSED), 0);
                    }
                }
                s
            }
            _ => return done(Status::generic(generic::INVALID_FIELD), 0),
        };
        match started {
            Start::Submitted(n) => Outcome::Submitted(n),
            Start::Done(st) => done(st, 0),
        }
    }

    /// A first fused command to complete now, with its status: it lost its second (ABORTED_MISSING_FUSED),
    /// or the pair was refused before it started.
    pub fn take_orphan(&mut self) -> Option<(u16, Status)> {
        if let Some(x) = self.orphan_status.take() {
            return Some(x);
        }
        self.orphan
            .take()
            .map(|s| (s, Status::generic(generic::ABORTED_MISSING_FUSED)))
    }

    /// If `slot` is the second of a fused pair that just completed with `status`: the first's slot and the
    /// statuses of (first, second), as SPDK's `spdk_bdev_io_get_nvme_fused_status` gives them.
    pub fn fused_done(&mut self, slot: u16, status: Status) -> Option<(u16, Status, Status)> {
        let i = self.fused_pairs.iter().position(|p| p.0 == slot)?;
        let (_, first) = self.fused_pairs.swap_remove(i);
        if status.is_success() {
            return Some((first, Status::SUCCESS, Status::SUCCESS));
        }
        Some((
            first,
            status,
            Status::generic(generic::ABORTED_FAILED_FUSED),
        ))
    }

    fn fabrics(&mut self, id: &Ident<'_>, sqe: &Sqe, data: &[u8]) -> Outcome {
        let fct = sqe.fctype();
        if !self.connected {
            if fct != fctype::CONNECT {
                return sequence_error();
            }
            return self.connect(id, sqe, data);
        }
        let Some(c) = self.ctrlr.clone() else {
            return sequence_error();
        };
        match fct {
            fctype::PROPERTY_GET if self.qid == 0 => {
                let (v, status) = c.property_get(sqe);
                // Property Get returns its value in dwords 0 and 1.
                Outcome::Done {
                    status,
                    dw0: v as u32,
                    dw1: (v >> 32) as u32,
                }
            }
            fctype::PROPERTY_SET if self.qid == 0 => done(c.property_set(sqe), 0),
            fctype::CONNECT => sequence_error(),
            _ => done(Status::generic(generic::INVALID_OPCODE), 0),
        }
    }

    fn connect(&mut self, id: &Ident<'_>, sqe: &Sqe, data: &[u8]) -> Outcome {
        let Some(pg) = pg::current() else {
            return done(Status::generic(generic::INTERNAL_DEVICE_ERROR), 0);
        };
        let info = ctrlr::ConnectInfo {
            listen: id.listen.clone(),
            peer: id.peer,
            thread: reactor::thread::current().expect("poll group thread"),
            key: id.key,
            opts: id.opts.clone(),
            tls: id.tls_identity.map(|i| {
                nvme_tls::psk::parse_identity(i).map(|(_, h, s)| (h.to_string(), s.to_string()))
            }),
        };
        match ctrlr::connect(sqe, data, info) {
            Ok(c) => {
                self.connected = true;
                self.qid = c.qid;
                self.sqsize = c.sqsize;
                let sub = pg.subsys(c.ctrlr.subsys.id);
                self.ana = Some(sub.ana_table(id.listen));
                self.sub = Some(sub);
                let st = &pg.stats;
                if c.qid == 0 {
                    st.admin_qpairs.set(st.admin_qpairs.get() + 1);
                    st.current_admin_qpairs
                        .set(st.current_admin_qpairs.get() + 1);
                    self.ka = c.ctrlr.start_keep_alive();
                } else {
                    st.io_qpairs.set(st.io_qpairs.get() + 1);
                    st.current_io_qpairs.set(st.current_io_qpairs.get() + 1);
                }
                let cntlid = c.ctrlr.cntlid;
                self.ctrlr = Some(c.ctrlr);
                done(Status::SUCCESS, cntlid as u32)
            }
            Err((st, dw0)) => done(st, dw0),
        }
    }

    /// The `nvmf_subsystem_get_qpairs` entry of a queue pair with this session (none before Connect), with its
    /// subsystem's NQN.
    pub fn qpair_info(
        &self,
        state: crate::params::stats::QpairState,
        listen: &Trid,
        trtype: &str,
        peer: SocketAddr,
    ) -> Option<(String, crate::params::QpairInfo)> {
        let c = self.ctrlr.as_ref()?;
        let (adrfam, traddr) = match peer {
            SocketAddr::V4(a) => (crate::tgt::AdrFam::Ipv4, a.ip().to_string()),
            SocketAddr::V6(a) => (crate::tgt::AdrFam::Ipv6, a.ip().to_string()),
        };
        Some((
            c.subsys.nqn.clone(),
            crate::params::QpairInfo {
                cntlid: c.cntlid,
                qid: self.qid,
                state,
                listen_address: Some(listen.clone()),
                peer_address: Some(Trid {
                    trtype: trtype.into(),
                    adrfam,
                    traddr,
                    trsvcid: peer.port().to_string(),
                }),
                auth: None,
            },
        ))
    }

    /// The queue pair is gone: counters, keep alive, and the controller (which goes with its admin queue).
    pub fn close(&mut self, key: QpKey) {
        self.ka = None;
        let Some(c) = self.ctrlr.take() else { return };
        if let Some(pg) = pg::current() {
            let st = &pg.stats;
            let cur = if self.qid == 0 {
                &st.current_admin_qpairs
            } else {
                &st.current_io_qpairs
            };
            cur.set(cur.get().saturating_sub(1));
        }
        c.qpair_gone(self.qid, key);
    }
}
