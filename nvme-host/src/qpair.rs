//! One queue pair type over every transport the host library speaks, so the admin queue and I/O queues are
//! written once: a match per call, which the branch predictor settles (a controller's queues are all of one
//! kind).

use std::time::{Duration, Instant};

use nvme_pcie::PcieQpair;
use nvme_proto::cmd::{Cqe, Sqe};
use nvme_proto::host::{Dir, Iov, SubmitError};

use crate::rdma::RdmaQpair;
use crate::tcp::TcpQpair;

/// The transport of a queue pair, as statistics name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// NVMe/TCP.
    Tcp,
    /// NVMe/RDMA.
    Rdma,
    /// PCIe.
    Pcie,
}

/// A queue pair's transport counters since it was made, the events SPDK's poll group statistics count: RDMA work
/// requests posted (each post here carries one, so each is also a doorbell), PCIe doorbell writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QpCounters {
    /// RDMA send work requests.
    pub send_wrs: u64,
    /// RDMA receive work requests.
    pub recv_wrs: u64,
    /// PCIe submission tail doorbell writes.
    pub sq_doorbells: u64,
    /// PCIe completion head doorbell writes.
    pub cq_doorbells: u64,
}

/// A host queue pair: NVMe/TCP, NVMe/RDMA or PCIe.
pub enum Qpair {
    /// Over a TCP connection.
    Tcp(TcpQpair),
    /// Over an RDMA reliable connection.
    Rdma(RdmaQpair),
    /// Rings in host memory and doorbells in BAR0.
    Pcie(PcieQpair),
    /// Gone: its rings were handed over to be freed once the controller deleted the queue.
    Closed,
}

impl Qpair {
    /// Ready for commands.
    pub fn ready(&self) -> bool {
        match self {
            Qpair::Tcp(q) => q.ready(),
            Qpair::Rdma(q) => q.ready(),
            Qpair::Pcie(q) => q.ready(),
            Qpair::Closed => false,
        }
    }

    /// Why the queue pair failed, once it has.
    pub fn error(&self) -> Option<&str> {
        match self {
            Qpair::Tcp(q) => q.error(),
            Qpair::Rdma(q) => q.error(),
            Qpair::Pcie(q) => q.error(),
            Qpair::Closed => Some("closed"),
        }
    }

    /// Its transport (`None` once closed).
    pub fn transport(&self) -> Option<Transport> {
        match self {
            Qpair::Tcp(_) => Some(Transport::Tcp),
            Qpair::Rdma(_) => Some(Transport::Rdma),
            Qpair::Pcie(_) => Some(Transport::Pcie),
            Qpair::Closed => None,
        }
    }

    /// Its transport counters so far.
    pub fn counters(&self) -> QpCounters {
        match self {
            Qpair::Rdma(q) => {
                let (send_wrs, recv_wrs) = q.posted();
                QpCounters {
                    send_wrs,
                    recv_wrs,
                    ..QpCounters::default()
                }
            }
            Qpair::Pcie(q) => {
                let (sq_doorbells, cq_doorbells) = q.doorbell_writes();
                QpCounters {
                    sq_doorbells,
                    cq_doorbells,
                    ..QpCounters::default()
                }
            }
            Qpair::Tcp(_) | Qpair::Closed => QpCounters::default(),
        }
    }

    /// The RDMA device of an RDMA queue pair.
    pub fn rdma_device(&self) -> Option<&str> {
        match self {
            Qpair::Rdma(q) => q.device_name(),
            _ => None,
        }
    }

    /// Commands submitted and not completed.
    pub fn outstanding(&self) -> usize {
        match self {
            Qpair::Tcp(q) => q.outstanding(),
            Qpair::Rdma(q) => q.outstanding(),
            Qpair::Pcie(q) => q.outstanding(),
            Qpair::Closed => 0,
        }
    }

    /// Submits a command (see [`TcpQpair::submit`], [`PcieQpair::submit`]).
    ///
    /// # Safety
    /// The iovecs stay valid (writable for [`Dir::FromCtrl`]) and untouched until the command completes.
    #[inline]
    pub unsafe fn submit(
        &mut self,
        sqe: Sqe,
        iovs: &[Iov],
        dir: Dir,
        token: u64,
    ) -> Result<(), SubmitError> {
        // SAFETY: forwarded contract.
        unsafe {
            match self {
                Qpair::Tcp(q) => q.submit(sqe, iovs, dir, token),
                Qpair::Rdma(q) => q.submit(sqe, iovs, dir, token),
                Qpair::Pcie(q) => q.submit(sqe, iovs, dir, token),
                Qpair::Closed => Err(SubmitError::NotReady),
            }
        }
    }

    /// Moves the queue pair on; completions go to `done` with their tokens. Whether anything happened.
    #[inline]
    pub fn poll(&mut self, done: &mut dyn FnMut(u64, Cqe)) -> bool {
        match self {
            Qpair::Tcp(q) => q.poll(done),
            Qpair::Rdma(q) => q.poll(done),
            Qpair::Pcie(q) => q.poll(done),
            Qpair::Closed => false,
        }
    }

    /// Sets the command timeout; commands of opcode `untimed_opc` never time out.
    pub fn set_timeout(&mut self, t: Option<Duration>, untimed_opc: Option<u8>) {
        match self {
            Qpair::Tcp(q) => q.set_timeout(t, untimed_opc),
            Qpair::Rdma(q) => q.set_timeout(t, untimed_opc),
            Qpair::Pcie(q) => q.set_timeout(t, untimed_opc),
            Qpair::Closed => {}
        }
    }

    /// Reports, once each, the commands outstanding past their deadline: (command id, token).
    pub fn expired(&mut self, now: Instant, f: &mut dyn FnMut(u16, u64)) {
        match self {
            Qpair::Tcp(q) => q.expired(now, f),
            Qpair::Rdma(q) => q.expired(now, f),
            Qpair::Pcie(q) => q.expired(now, f),
            Qpair::Closed => {}
        }
    }

    /// Closes the queue pair; commands still in it complete with "aborted, SQ deleted".
    pub fn close(&mut self, done: &mut dyn FnMut(u64, Cqe)) {
        match self {
            Qpair::Tcp(q) => q.close(done),
            Qpair::Rdma(q) => q.close(done),
            Qpair::Pcie(q) => q.fail("closed by the host", done),
            Qpair::Closed => {}
        }
    }
}
