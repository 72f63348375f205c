//! `error`: an error-injection virtual bdev (SPDK's `bdev_error_create`, `bdev_error_inject_error`,
//! `bdev_error_delete`).
//!
//! `EE_<base>` claims its base and forwards every I/O to it. Injections, per I/O type (read, write, unmap, flush),
//! make the next `num` I/Os of that type fail, stay pending until a reset (or the bdev's removal), come back with
//! NOMEM (which the bdev layer retries), or carry flipped data. An injection counter is an atomic shared by all
//! threads; an I/O only touches it after a relaxed load shows it armed, so the normal path shares nothing.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use reactor::dma::DmaBuf;
use reactor::lock;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::{
    register, Bdev, BdevError, BdevEvent, BdevIo, BdevOps, BdevParams, Completion, Desc, ErrorKind,
    IoChannel, IoHandle, IoSink, IoStatus, IoType, ModuleChannel, Result,
};

mod rpc;
pub(crate) use rpc::register_rpcs;

/// Module name.
pub const MODULE: &str = "error";

/// What an injection does to the I/Os it hits (SPDK's `error_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorType {
    /// Complete with an error (`failure`).
    Failure,
    /// Hold the I/O until a reset or the bdev's removal, then fail it (`pending`).
    Pending,
    /// XOR `corrupt_value` into the byte at `corrupt_offset`: of the data written, or of the data read
    /// (`corrupt_data`).
    CorruptData,
    /// Complete with NOMEM; the bdev layer retries (`nomem`).
    Nomem,
}

impl ErrorType {
    /// Parses SPDK's name (`failure`, `pending`, `corrupt_data`, `nomem`).
    pub fn parse(s: &str) -> Option<ErrorType> {
        Some(match s {
            "failure" => ErrorType::Failure,
            "pending" => ErrorType::Pending,
            "corrupt_data" => ErrorType::CorruptData,
            "nomem" => ErrorType::Nomem,
            _ => return None,
        })
    }

    /// SPDK's name.
    pub fn name(self) -> &'static str {
        match self {
            ErrorType::Failure => "failure",
            ErrorType::Pending => "pending",
            ErrorType::CorruptData => "corrupt_data",
            ErrorType::Nomem => "nomem",
        }
    }
}

/// `bdev_error_inject_error` parameters (besides the bdev name).
#[derive(Clone, Debug)]
pub struct InjectOpts {
    /// `read`, `write`, `unmap`, `flush`, `all` (each of those) or `clear` (stop every injection).
    pub io_type: String,
    /// What to inject.
    pub error_type: ErrorType,
    /// How many I/Os to affect (SPDK's default: 1).
    pub num: u32,
    /// Only affect an I/O when at least this many I/Os are in flight on its channel.
    pub queue_depth: u64,
    /// Byte offset, within the I/O, of the corrupted byte (`corrupt_data`).
    pub corrupt_offset: u64,
    /// Value XORed into that byte (`corrupt_data`; must not be 0).
    pub corrupt_value: u8,
}

impl InjectOpts {
    /// Options with SPDK's defaults: one I/O, no queue-depth condition, no corruption parameters.
    pub fn new(io_type: &str, error_type: ErrorType) -> Self {
        InjectOpts {
            io_type: io_type.to_string(),
            error_type,
            num: 1,
            queue_depth: 0,
            corrupt_offset: 0,
            corrupt_value: 0,
        }
    }
}

/// I/O types that take injections, in SPDK's order.
const INJECT_TYPES: [IoType; 4] = [IoType::Read, IoType::Write, IoType::Unmap, IoType::Flush];

fn inject_index(t: IoType) -> Option<usize> {
    INJECT_TYPES.iter().position(|x| *x == t)
}

#[derive(Clone, Copy)]
struct InjectCfg {
    error_type: ErrorType,
    queue_depth: u64,
    corrupt_offset: u64,
    corrupt_value: u8,
}

struct Injection {
    /// I/Os still to affect; 0 = disarmed.
    num: AtomicU32,
    cfg: Mutex<InjectCfg>,
}

/// State shared by an error bdev's channels on every thread.
struct Shared {
    inject: [Injection; 4],
    /// Bumped by resets and removal: pending I/Os held before the bump are failed.
    abort_gen: AtomicU64,
}

/// Error bdevs by name, for `inject_error`.
static DISKS: Mutex<Option<HashMap<String, Arc<Shared>>>> = Mutex::new(None);

fn disks<R>(f: impl FnOnce(&mut HashMap<String, Arc<Shared>>) -> R) -> R {
    f(lock(&DISKS).get_or_insert_with(HashMap::new))
}

struct ErrorDisk {
    shared: Arc<Shared>,
    base: Bdev,
    base_name: String,
    uuid: Option<Uuid>,
    /// The claimed base; dropped (closing the descriptor) when this bdev is destructed.
    desc: Mutex<Option<Desc>>,
}

/// A descriptor's event callback.
type EventCb = Arc<dyn Fn(BdevEvent, &Bdev) + Send + Sync>;

/// A parent I/O waiting for its child, and the corruption to apply to it once read.
type Parked = (IoHandle, Option<(u64, u8)>);

/// Creates `EE_<base_name>` on top of `base_name`, claiming it.
pub fn create(base_name: &str, uuid: Option<Uuid>) -> Result<Bdev> {
    let base = crate::get(base_name).ok_or_else(|| {
        BdevError::new(ErrorKind::NotFound, format!("bdev {base_name} not found"))
    })?;
    let name = format!("EE_{base_name}");
    if crate::get(&name).is_some() {
        return Err(BdevError::new(
            ErrorKind::Exists,
            format!("Bdev name {name} already exists"),
        ));
    }
    let ee = name.clone();
    let on_event: EventCb = Arc::new(move |ev, base| {
        if ev == BdevEvent::Remove {
            log::info!(
                "{ee}: base bdev {} is being removed; removing {ee}",
                base.name()
            );
            crate::unregister_by_name(&ee, MODULE, |_| {});
        }
    });
    let mut desc = base.open(false, Some(on_event))?;
    desc.claim(MODULE)?;
    let bp = base.params();
    let mut p = BdevParams::new(&name, bp.block_size, base.num_blocks());
    p.uuid = uuid;
    p.product_name = "Error Injection Disk".into();
    p.write_cache = bp.write_cache;
    p.required_alignment = bp.required_alignment;
    let cfg = InjectCfg {
        error_type: ErrorType::Failure,
        queue_depth: 0,
        corrupt_offset: 0,
        corrupt_value: 0,
    };
    let shared = Arc::new(Shared {
        inject: std::array::from_fn(|_| Injection {
            num: AtomicU32::new(0),
            cfg: Mutex::new(cfg),
        }),
        abort_gen: AtomicU64::new(0),
    });
    let disk = ErrorDisk {
        shared: shared.clone(),
        base: base.clone(),
        base_name: base_name.to_string(),
        uuid,
        desc: Mutex::new(Some(desc)),
    };
    // On failure the disk, and with it the descriptor and its claim, is dropped.
    let bdev = register(p, Box::new(disk))?;
    disks(|m| m.insert(name, shared));
    Ok(bdev)
}

/// Deletes an error bdev (`bdev_error_delete`), releasing its base.
pub fn delete(name: &str, done: impl FnOnce(Result<()>) + Send + 'static) {
    crate::unregister_by_name(name, MODULE, done)
}

/// Sets, or with `io_type == "clear"` stops, an injection on the error bdev `name` (`bdev_error_inject_error`).
pub fn inject_error(name: &str, opts: InjectOpts) -> Result<()> {
    if opts.error_type == ErrorType::CorruptData && opts.corrupt_value == 0 {
        // XOR with 0 would corrupt nothing.
        return Err(BdevError::new(
            ErrorKind::Invalid,
            "corrupt_value should be non-zero",
        ));
    }
    let targets: &[usize] = match opts.io_type.as_str() {
        "read" => &[0],
        "write" => &[1],
        "unmap" => &[2],
        "flush" => &[3],
        "all" | "clear" => &[0, 1, 2, 3],
        other => {
            return Err(BdevError::new(
                ErrorKind::Invalid,
                format!("invalid io_type {other}"),
            ));
        }
    };
    let shared = crate::get(name)
        .filter(|b| b.module_name() == MODULE)
        .and_then(|b| disks(|m| m.get(b.name()).cloned()))
        .ok_or_else(|| {
            BdevError::new(
                ErrorKind::NotFound,
                format!("Could not find ErrorInjection bdev {name}"),
            )
        })?;
    for &i in targets {
        let inj = &shared.inject[i];
        let mut cfg = lock(&inj.cfg);
        if opts.io_type == "clear" {
            inj.num.store(0, Ordering::Relaxed);
            continue;
        }
        *cfg = InjectCfg {
            error_type: opts.error_type,
            queue_depth: opts.queue_depth,
            corrupt_offset: opts.corrupt_offset,
            corrupt_value: opts.corrupt_value,
        };
        inj.num.store(opts.num, Ordering::Relaxed);
    }
    Ok(())
}

impl BdevOps for ErrorDisk {
    fn module_name(&self) -> &'static str {
        MODULE
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            // Resets and aborts are answered here: a reset releases the pending I/Os, an abort finds its
            // target among them or asks the base for the child it sent.
            IoType::Reset | IoType::Abort => true,
            _ => self.base.io_type_supported(t),
        }
    }

    fn create_channel(&self, _bdev: &Bdev) -> Box<dyn ModuleChannel> {
        let base = lock(&self.desc).as_ref().map(|d| d.channel());
        let st = Rc::new(ChanState {
            inflight: Cell::new(0),
            parents: RefCell::new(Parents::default()),
        });
        Box::new(ErrorChannel {
            base,
            shared: self.shared.clone(),
            sink: st.clone(),
            st,
            pending: VecDeque::new(),
            pending_gen: 0,
        })
    }

    fn destruct(&self, bdev: &Bdev) {
        disks(|m| {
            if m.get(bdev.name())
                .is_some_and(|s| Arc::ptr_eq(s, &self.shared))
            {
                m.remove(bdev.name());
            }
        });
        // Fail whatever is held pending, on every thread.
        self.shared.abort_gen.fetch_add(1, Ordering::Relaxed);
        let desc = lock(&self.desc).take();
        drop(desc);
    }

    fn dump_info(&self, _bdev: &Bdev, out: &mut Map<String, Value>) {
        out.insert(
            "error_disk".into(),
            json!({ "base_bdev": self.base.name() }),
        );
    }

    fn write_config(&self, _bdev: &Bdev) -> Option<Value> {
        let mut p = Map::new();
        p.insert("base_name".into(), json!(self.base_name));
        if let Some(u) = self.uuid {
            p.insert("uuid".into(), json!(u.to_string()));
        }
        Some(json!({ "method": "bdev_error_create", "params": Value::Object(p) }))
    }
}

/// Parent I/Os waiting for their child on the base, indexed by the child's `ctx`.
#[derive(Default)]
struct Parents {
    slots: Vec<Option<Parked>>,
    free: Vec<usize>,
}

impl Parents {
    fn reserve(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        })
    }

    fn release(&mut self, idx: usize) -> Option<Parked> {
        let e = self.slots.get_mut(idx)?.take();
        self.free.push(idx);
        e
    }
}

/// The part of a channel that child completions reach.
struct ChanState {
    /// I/Os forwarded to the base and not completed (what `queue_depth` compares with).
    inflight: Cell<u64>,
    parents: RefCell<Parents>,
}

impl IoSink for ChanState {
    fn io_done(&self, child: IoHandle) {
        let status = child.status();
        let idx = child.ctx as usize;
        let cdw0 = child.nvme_cdw0();
        drop(child);
        let entry = self.parents.borrow_mut().release(idx);
        let Some((mut parent, corrupt)) = entry else {
            log::error!("error bdev: completion for unknown I/O {idx}");
            return;
        };
        self.inflight.set(self.inflight.get().saturating_sub(1));
        if status == IoStatus::Success && parent.io_type() == IoType::Read {
            if let Some((offset, value)) = corrupt {
                corrupt_read(&parent, offset, value);
            }
        }
        if parent.nvme_cmd().is_some() {
            parent.set_nvme_cdw0(cdw0);
        }
        // No borrow is held here: the callback may submit to this channel again.
        parent.complete(status);
    }
}

/// XORs `value` into byte `offset` of a read's buffers.
fn corrupt_read(io: &BdevIo, mut offset: u64, value: u8) {
    for v in io.iovs() {
        if (v.len as u64) > offset {
            // SAFETY: offset < v.len, and a read's iovecs are valid for writes until the I/O completes (submit
            // contract); the read has not completed yet.
            unsafe { *v.base.add(offset as usize) ^= value };
            return;
        }
        offset -= v.len as u64;
    }
}

struct ErrorChannel {
    /// This thread's channel on the base (None if the base was already released).
    base: Option<IoChannel>,
    shared: Arc<Shared>,
    st: Rc<ChanState>,
    sink: Rc<dyn IoSink>,
    /// I/Os held by a `pending` injection.
    pending: VecDeque<IoHandle>,
    /// `abort_gen` when the oldest held I/O arrived.
    pending_gen: u64,
}

impl ErrorChannel {
    /// The injection hitting an I/O of type `t`, if any (and consumes one count of it).
    fn injection(&self, t: IoType) -> Option<InjectCfg> {
        let inj = &self.shared.inject[inject_index(t)?];
        let mut n = inj.num.load(Ordering::Relaxed);
        if n == 0 {
            return None;
        }
        let cfg = *lock(&inj.cfg);
        if self.st.inflight.get() < cfg.queue_depth {
            return None;
        }
        loop {
            if n == 0 {
                return None;
            }
            match inj
                .num
                .compare_exchange_weak(n, n - 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(cfg),
                Err(now) => n = now,
            }
        }
    }

    /// Aborts the I/O `abort` names: one held pending completes as aborted here; one with the base is
    /// aborted there, through the child sent for it.
    fn abort(&mut self, abort: IoHandle) {
        let Some(target) = abort.abort_target() else {
            abort.complete(IoStatus::Failed(libc::EINVAL));
            return;
        };
        if let Some(i) = self.pending.iter().position(|p| p.id() == target) {
            if let Some(io) = self.pending.remove(i) {
                io.complete(IoStatus::Aborted);
            }
            abort.complete(IoStatus::Success);
            return;
        }
        let child = self
            .st
            .parents
            .borrow()
            .slots
            .iter()
            .position(|p| p.as_ref().is_some_and(|(io, _)| io.id() == target));
        let (Some(idx), Some(base)) = (child, &self.base) else {
            abort.complete(IoStatus::Failed(libc::ENOENT));
            return;
        };
        // The abort waits for the base's answer (an abort is rare: the allocations do not matter).
        let waiting = Rc::new(Cell::new(Some(abort)));
        let w = waiting.clone();
        let done = move |a: IoHandle| {
            if let Some(abort) = w.take() {
                abort.complete(a.status());
            }
        };
        if let Err(e) = base.abort(idx as u64, Completion::Closure(Box::new(done)), 0) {
            log::debug!("error bdev: abort through the base: {e}");
            if let Some(abort) = waiting.take() {
                abort.complete(IoStatus::Failed(e.errno()));
            }
        }
    }

    fn fail_pending(&mut self) -> bool {
        let any = !self.pending.is_empty();
        while let Some(io) = self.pending.pop_front() {
            io.complete(IoStatus::Failed(libc::EIO));
        }
        any
    }

    /// Sends `io` to the base; with `corrupt`, a write carries flipped data and a read comes back flipped.
    fn forward(&mut self, io: IoHandle, corrupt: Option<(u64, u8)>) {
        let Some(base) = &self.base else {
            io.complete(IoStatus::Failed(libc::ENODEV));
            return;
        };
        let idx = self.st.parents.borrow_mut().reserve();
        let cb = Completion::Sink(self.sink.clone());
        let sent = match corrupt {
            Some((offset, value)) if io.io_type() == IoType::Write => {
                // Corrupt a copy: the caller's buffer is only lent for reading. This allocates, but only on the
                // injected path.
                let len = io.len_bytes() as usize;
                match DmaBuf::alloc(len) {
                    Ok(mut buf) => {
                        io.copy_out(buf.as_mut_slice());
                        if let Some(b) = buf.as_mut_slice().get_mut(offset as usize) {
                            *b ^= value;
                        }
                        base.write(buf, io.offset_blocks(), io.num_blocks(), cb, idx as u64)
                    }
                    Err(e) => Err(BdevError::new(ErrorKind::NoMemory, e.to_string())),
                }
            }
            // SAFETY: `io` is parked in `parents` below and only completed from the child's callback (io_done), so
            // its buffers outlive the child.
            _ => unsafe { base.submit_child(&io, io.offset_blocks(), cb, idx as u64) },
        };
        let mut parents = self.st.parents.borrow_mut();
        match sent {
            Ok(()) => {
                parents.slots[idx] = Some((io, corrupt));
                self.st.inflight.set(self.st.inflight.get() + 1);
            }
            Err(_) => {
                parents.release(idx);
                drop(parents);
                io.complete(IoStatus::NoMem);
            }
        }
    }
}

impl ModuleChannel for ErrorChannel {
    fn submit(&mut self, io: IoHandle) {
        let t = io.io_type();
        if t == IoType::Reset {
            // SPDK fails every held I/O and completes the reset without passing it on.
            self.fail_pending();
            self.shared.abort_gen.fetch_add(1, Ordering::Relaxed);
            io.complete(IoStatus::Success);
            return;
        }
        if t == IoType::Abort {
            self.abort(io);
            return;
        }
        match self.injection(t) {
            None => self.forward(io, None),
            Some(cfg) => match cfg.error_type {
                ErrorType::Failure => io.complete(IoStatus::Failed(libc::EIO)),
                ErrorType::Nomem => io.complete(IoStatus::NoMem),
                ErrorType::Pending => {
                    if self.pending.is_empty() {
                        self.pending_gen = self.shared.abort_gen.load(Ordering::Relaxed);
                    }
                    self.pending.push_back(io);
                }
                ErrorType::CorruptData => {
                    self.forward(io, Some((cfg.corrupt_offset, cfg.corrupt_value)))
                }
            },
        }
    }

    fn poll(&mut self) -> bool {
        if self.pending.is_empty()
            || self.shared.abort_gen.load(Ordering::Relaxed) == self.pending_gen
        {
            return false;
        }
        self.fail_pending()
    }
}
