//! Poll groups (SPDK's `spdk_nvmf_poll_group`): one lightweight thread per core of the target's mask. Each owns
//! the queue pairs spread onto it and, per subsystem, a namespace table with its own bdev channels, so an I/O is
//! parsed, submitted to the bdev and completed on one thread, with no lock and no allocation.
//!
//! The target updates the tables by message (namespace added or removed, ANA state changed); a queue pair holds
//! its subsystem's table ([`PgSubsys`]) from Connect on.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use bdev::{IoChannel, IoHandle, IoType};
use nvme_proto::status::Status;
use reactor::{Poller, ThreadHandle};

use crate::tgt::Trid;

/// A namespace as a poll group's I/O path sees it.
pub struct PgNs {
    /// Namespace id.
    pub nsid: u32,
    /// This poll group's channel to the bdev.
    pub ch: IoChannel,
    /// Block size in bytes.
    pub block_size: u32,
    /// ANA group.
    pub anagrpid: u32,
    /// Supported I/O types, looked up once.
    pub unmap: bool,
    /// Write zeroes supported.
    pub write_zeroes: bool,
    /// Flush supported.
    pub flush: bool,
    /// Compare supported.
    pub compare: bool,
    /// NVMe I/O commands pass through to the bdev (an NVMe bdev): opcodes this target does not run go there.
    pub nvme_io: bool,
    /// Created `no_auto_visible`: only the hosts in `hosts` may use it.
    pub restricted: bool,
    /// Hosts that may use a restricted namespace.
    pub hosts: RefCell<Vec<String>>,
}

impl PgNs {
    /// Opens this thread's channel through `desc`.
    pub fn new(nsid: u32, anagrpid: u32, desc: &bdev::Desc, restricted: bool) -> PgNs {
        let b = desc.bdev();
        PgNs {
            nsid,
            ch: desc.channel(),
            block_size: b.block_size(),
            anagrpid,
            unmap: b.io_type_supported(IoType::Unmap),
            write_zeroes: b.io_type_supported(IoType::WriteZeroes),
            flush: b.io_type_supported(IoType::Flush),
            compare: b.io_type_supported(IoType::Compare),
            nvme_io: b.io_type_supported(IoType::NvmeIo),
            restricted,
            hosts: RefCell::new(Vec::new()),
        }
    }

    /// Whether `host` may use the namespace (a string compare only for restricted namespaces).
    #[inline]
    pub fn allows(&self, host: &str) -> bool {
        !self.restricted || self.hosts.borrow().iter().any(|h| h == host)
    }

    /// Current size in blocks (a resize is seen at once).
    #[inline]
    pub fn num_blocks(&self) -> u64 {
        self.ch.bdev().num_blocks()
    }
}

/// ANA states of one listener, per ANA group (index anagrpid - 1), shared by the queue pairs that connected
/// through it.
pub type AnaTable = Rc<RefCell<Vec<u8>>>;

/// A subsystem as a poll group's I/O path sees it.
#[derive(Default)]
pub struct PgSubsys {
    /// Namespaces by nsid - 1.
    pub ns: RefCell<Vec<Option<Rc<PgNs>>>>,
    /// Whether ANA states are reported (and enforced).
    pub ana_reporting: Cell<bool>,
    /// ANA tables per listener.
    pub ana: RefCell<Vec<(Trid, AnaTable)>>,
}

impl PgSubsys {
    /// The ANA table for connections through `trid`.
    pub fn ana_table(&self, trid: &Trid) -> AnaTable {
        let mut a = self.ana.borrow_mut();
        if let Some((_, t)) = a.iter().find(|(t, _)| t.same(trid)) {
            return t.clone();
        }
        let t: AnaTable = Rc::new(RefCell::new(Vec::new()));
        a.push((trid.clone(), t.clone()));
        t
    }
}

/// What the target can ask of any queue pair, whatever its transport.
pub trait Qpair {
    /// Completes a command that was left outstanding (an Asynchronous Event Request).
    fn complete_async(&self, slot: u16, dw0: u32, status: Status);
    /// A bdev I/O of the command in `slot` completed.
    fn io_done(&self, slot: u16, io: IoHandle);
    /// Closes the connection (the host sees it go); outstanding I/O finishes first.
    fn disconnect(&self);
    /// `nvmf_subsystem_get_qpairs` entry, with its subsystem's NQN (none before Connect).
    fn info(&self) -> Option<(String, crate::params::QpairInfo)>;
    /// Aborts command `cid`: one waiting for a data buffer completes with "aborted by request" at once; one at
    /// the bdev is aborted there if the bdev can (it then completes with "aborted by request"). `done` is told
    /// whether it was aborted, possibly before this returns.
    fn abort(&self, cid: u16, done: Box<dyn FnOnce(bool)>);
}

/// A transport's part of a poll group (SPDK's `spdk_nvmf_transport_poll_group`): its connections, queues and
/// buffers on this thread. The poll group's poller polls every part; [`Transport::poll_group_start`] adds one.
///
/// [`Transport::poll_group_start`]: crate::transport::Transport::poll_group_start
pub trait TransportGroup: Any {
    /// SPDK's name of the transport type ("TCP", "RDMA").
    fn name(&self) -> &'static str;
    /// One poll: returns whether there was work.
    fn poll(&self) -> bool;
    /// Closes every connection (the poll group is stopping).
    fn shutdown(&self);
}

/// Per poll group counters (`nvmf_get_stats`).
#[derive(Default)]
pub struct PgStats {
    /// Admin queue pairs connected, ever.
    pub admin_qpairs: Cell<u64>,
    /// I/O queue pairs connected, ever.
    pub io_qpairs: Cell<u64>,
    /// Admin queue pairs connected now.
    pub current_admin_qpairs: Cell<u64>,
    /// I/O queue pairs connected now.
    pub current_io_qpairs: Cell<u64>,
    /// Bdev I/Os submitted.
    pub pending_bdev_io: Cell<u64>,
    /// Completions sent.
    pub completed_nvme_io: Cell<u64>,
}

/// A poll group, on its own thread.
pub struct Pg {
    /// Index.
    pub id: usize,
    /// Per subsystem tables, by subsystem id.
    pub subsys: RefCell<HashMap<u32, Rc<PgSubsys>>>,
    qpairs: RefCell<Vec<Option<QpEntry>>>,
    free: RefCell<Vec<u32>>,
    next_gen: Cell<u16>,
    /// Every transport's part, in transport creation order.
    groups: RefCell<Vec<Rc<dyn TransportGroup>>>,
    /// Counters.
    pub stats: PgStats,
    poller: RefCell<Option<Poller>>,
}

thread_local! {
    static PG: RefCell<Option<Rc<Pg>>> = const { RefCell::new(None) };
}

/// This thread's poll group.
pub fn current() -> Option<Rc<Pg>> {
    PG.with(|p| p.borrow().clone())
}

/// A slab entry: the generation and the queue pair.
type QpEntry = (u16, Rc<dyn Qpair>);

/// Key of a queue pair in its poll group: slab index and a generation, so a stale key finds nothing.
pub type QpKey = u64;

impl Pg {
    /// Starts a poll group on the current thread.
    pub fn start(id: usize) -> Rc<Pg> {
        let pg = Rc::new(Pg {
            id,
            subsys: RefCell::new(HashMap::new()),
            qpairs: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            next_gen: Cell::new(1),
            groups: RefCell::new(Vec::new()),
            stats: PgStats::default(),
            poller: RefCell::new(None),
        });
        PG.with(|p| *p.borrow_mut() = Some(pg.clone()));
        let weak = Rc::downgrade(&pg);
        let poller = Poller::register("nvmf_poll_group_poll", 0, move || {
            let Some(pg) = weak.upgrade() else {
                return false;
            };
            // Parts are added and removed by message, never from inside a poll: the borrow cannot clash.
            let mut busy = false;
            for g in pg.groups.borrow().iter() {
                busy |= g.poll();
            }
            busy
        });
        *pg.poller.borrow_mut() = Some(poller);
        pg
    }

    /// Stops the poll group: closes every queue pair.
    pub fn stop(&self) {
        let qps: Vec<_> = self
            .qpairs
            .borrow()
            .iter()
            .flatten()
            .map(|(_, q)| q.clone())
            .collect();
        for q in qps {
            q.disconnect();
        }
        let groups = std::mem::take(&mut *self.groups.borrow_mut());
        for g in groups {
            g.shutdown();
        }
        self.poller.borrow_mut().take();
        PG.with(|p| p.borrow_mut().take());
    }

    /// Adds a transport's part (from [`Transport::poll_group_start`](crate::transport::Transport::poll_group_start)).
    pub fn add_group(&self, g: Rc<dyn TransportGroup>) {
        self.groups.borrow_mut().push(g);
    }

    /// The part of type `T`, if that transport exists.
    pub fn group<T: TransportGroup>(&self) -> Option<Rc<T>> {
        self.groups.borrow().iter().find_map(|g| {
            let any: Rc<dyn Any> = g.clone();
            any.downcast::<T>().ok()
        })
    }

    /// The table of subsystem `id`, created empty on first use.
    pub fn subsys(&self, id: u32) -> Rc<PgSubsys> {
        self.subsys.borrow_mut().entry(id).or_default().clone()
    }

    /// Registers a queue pair; its key goes into every bdev I/O's context.
    pub fn add_qpair(&self, q: Rc<dyn Qpair>) -> QpKey {
        let gen = self.next_gen.get();
        self.next_gen.set(gen.wrapping_add(1).max(1));
        let mut qs = self.qpairs.borrow_mut();
        let idx = match self.free.borrow_mut().pop() {
            Some(i) => {
                qs[i as usize] = Some((gen, q));
                i
            }
            None => {
                qs.push(Some((gen, q)));
                (qs.len() - 1) as u32
            }
        };
        (idx as u64) << 16 | gen as u64
    }

    /// Forgets a queue pair.
    pub fn remove_qpair(&self, key: QpKey) {
        let idx = (key >> 16) as usize;
        let mut qs = self.qpairs.borrow_mut();
        if qs
            .get(idx)
            .and_then(|e| e.as_ref())
            .is_some_and(|(g, _)| *g as u64 == key & 0xffff)
        {
            qs[idx] = None;
            self.free.borrow_mut().push(idx as u32);
        }
    }

    /// The queue pair with `key`, if it still exists.
    #[inline]
    pub fn qpair(&self, key: QpKey) -> Option<Rc<dyn Qpair>> {
        let idx = (key >> 16) as usize;
        match self.qpairs.borrow().get(idx) {
            Some(Some((g, q))) if *g as u64 == key & 0xffff => Some(q.clone()),
            _ => None,
        }
    }

    /// Every queue pair.
    pub fn qpairs(&self) -> Vec<Rc<dyn Qpair>> {
        self.qpairs
            .borrow()
            .iter()
            .flatten()
            .map(|(_, q)| q.clone())
            .collect()
    }
}

/// The context word of a bdev I/O: queue pair key and command slot.
#[inline]
pub fn io_ctx(key: QpKey, slot: u16) -> u64 {
    key << 16 | slot as u64
}

/// The completion function of every bdev I/O the target submits: finds the queue pair by the context word.
pub fn io_done(io: IoHandle) {
    let ctx = io.ctx;
    let key = ctx >> 16;
    let slot = ctx as u16;
    let q = PG.with(|p| p.borrow().as_ref().and_then(|pg| pg.qpair(key)));
    match q {
        Some(q) => q.io_done(slot, io),
        // The queue pair waits for its I/O before it goes, so this is a bug; the descriptor still goes home.
        None => log::error!("nvmf: completion for a queue pair that is gone (ctx {ctx:#x})"),
    }
}

/// Runs `f` on every poll group's thread and then `done` on the caller's thread with the results in poll group
/// order.
pub fn for_each<R: Send + 'static>(
    pgs: &[crate::tgt::PgHandle],
    f: impl Fn(&Rc<Pg>) -> R + Send + Sync + 'static,
    done: impl FnOnce(Vec<R>) + Send + 'static,
) {
    use std::sync::{Arc, Mutex};
    let threads: Vec<ThreadHandle> = pgs.iter().map(|p| p.thread.clone()).collect();
    let n = threads.len();
    let origin = reactor::thread::current();
    if n == 0 {
        done(Vec::new());
        return;
    }
    type Acc<R> = Arc<
        Mutex<(
            Vec<Option<R>>,
            usize,
            Option<Box<dyn FnOnce(Vec<R>) + Send>>,
        )>,
    >;
    let acc: Acc<R> = Arc::new(Mutex::new((
        (0..n).map(|_| None).collect(),
        n,
        Some(Box::new(done)),
    )));
    let f = Arc::new(f);
    for (i, t) in threads.into_iter().enumerate() {
        let acc = acc.clone();
        let f = f.clone();
        let origin = origin.clone();
        t.send(move || {
            let r = current().map(|pg| f(&pg));
            let finish = {
                let mut a = reactor::lock(&acc);
                a.0[i] = r;
                a.1 -= 1;
                if a.1 == 0 {
                    let out: Vec<R> = a.0.drain(..).flatten().collect();
                    a.2.take().map(|d| (d, out))
                } else {
                    None
                }
            };
            if let Some((d, out)) = finish {
                match origin {
                    Some(o) if !o.is_current() => o.send(move || d(out)),
                    _ => d(out),
                }
            }
        });
    }
}
