//! Bdevs, the registry, descriptors, claims, examine and hot-remove.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use reactor::{lock, IoDevice, ThreadHandle};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::channel::ChannelCore;
use crate::error::{BdevError, ErrorKind, Result};
use crate::histogram::Histogram;
use crate::io::{IoHandle, IoType};
use crate::stat::IoStat;

/// What a bdev module implements for each of its bdevs.
pub trait BdevOps: Send + Sync + 'static {
    /// The module name (`malloc`, `null`, ...), as claims and `driver_specific` use it.
    fn module_name(&self) -> &'static str;
    /// Whether an I/O type is supported.
    fn io_type_supported(&self, t: IoType) -> bool;
    /// Builds this thread's channel; called on the thread that first uses the bdev.
    fn create_channel(&self, bdev: &Bdev) -> Box<dyn ModuleChannel>;
    /// Builds this thread's channel when that can fail (a queue pair the device refuses, a connection that
    /// cannot be made); the default cannot fail. A failed channel completes every I/O with the error's errno,
    /// [`Desc::try_channel`] reports it, and the next attempt on the thread, once nothing holds the failed
    /// channel, tries again (SPDK's `spdk_get_io_channel` returning NULL).
    fn try_create_channel(&self, bdev: &Bdev) -> Result<Box<dyn ModuleChannel>> {
        Ok(self.create_channel(bdev))
    }
    /// Releases module resources once the bdev is unregistered and every descriptor closed.
    fn destruct(&self, _bdev: &Bdev) {}
    /// The `driver_specific` section of `bdev_get_bdevs`.
    fn dump_info(&self, _bdev: &Bdev, _out: &mut Map<String, Value>) {}
    /// The `{"method", "params"}` entry that recreates the bdev, for `save_config`.
    fn write_config(&self, _bdev: &Bdev) -> Option<Value> {
        None
    }
}

/// A module's per-thread channel for one bdev.
pub trait ModuleChannel {
    /// Starts an I/O. The module completes it (now or later, on this thread) with [`IoHandle::complete`].
    fn submit(&mut self, io: IoHandle);
    /// Reaps completions; returns whether it did work. Called every reactor iteration while the channel has
    /// I/O outstanding in the module (or NOMEM retries queued), and while [`ModuleChannel::wants_poll`] says so;
    /// never for an idle channel.
    fn poll(&mut self) -> bool {
        false
    }
    /// Whether the channel needs polling although none of its I/O is outstanding (e.g. housekeeping after the
    /// last completion). Asked after each poll once the channel is idle.
    fn wants_poll(&self) -> bool {
        false
    }
}

/// Which protection information fields a bdev checks (SPDK's `enabled_dif_check_types`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DifCheck {
    /// Reference tag.
    pub reftag: bool,
    /// Application tag.
    pub apptag: bool,
    /// Guard.
    pub guard: bool,
}

/// How a bdev's channels keep latency histograms (`bdev_enable_histogram`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistogramCfg {
    /// Buckets per power-of-two range, as a shift (SPDK's `granularity`; 7 by default).
    pub bucket_shift: u32,
    /// Count only this I/O type (SPDK's `opc`); all types when `None`.
    pub opc: Option<IoType>,
}

impl Default for HistogramCfg {
    fn default() -> Self {
        HistogramCfg {
            bucket_shift: crate::histogram::BUCKET_SHIFT_DEFAULT,
            opc: None,
        }
    }
}

/// Events delivered to a descriptor's owner, on the thread that opened it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BdevEvent {
    /// The bdev is going away: close the descriptor.
    Remove,
    /// The bdev changed size.
    Resize,
}

/// Everything fixed at registration.
#[derive(Clone, Debug)]
pub struct BdevParams {
    /// Unique name.
    pub name: String,
    /// UUID (random when `None`).
    pub uuid: Option<Uuid>,
    /// Product name shown by `bdev_get_bdevs` ("Malloc disk", ...).
    pub product_name: String,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Volatile write cache present (flush matters).
    pub write_cache: bool,
    /// Optimal I/O boundary in blocks (0 = none).
    pub optimal_io_boundary: u32,
    /// Split reads and writes that cross `optimal_io_boundary` (SPDK's `split_on_optimal_io_boundary`).
    pub split_on_optimal_io_boundary: bool,
    /// Largest read or write the module takes, in blocks (SPDK's `max_rw_size`; 0 = no limit).
    pub max_rw_size: u32,
    /// Largest buffer segment the module takes, in bytes (SPDK's `max_segment_size`; 0 = no limit).
    pub max_segment_size: u32,
    /// Most buffer segments per I/O the module takes (SPDK's `max_num_segments`; 0 = no limit).
    pub max_num_segments: u32,
    /// Largest unmap the module takes, in blocks (SPDK's `max_unmap` x `max_unmap_segments`; 0 = no limit).
    pub max_unmap: u64,
    /// Largest write-zeroes the module takes, in blocks (SPDK's `max_write_zeroes`; 0 = no limit).
    pub max_write_zeroes: u64,
    /// Metadata bytes per block (0 = none).
    pub md_size: u32,
    /// Metadata interleaved with the data of each block (an extended LBA) rather than in a separate buffer.
    pub md_interleave: bool,
    /// Protection information type (0 = none, 1..=3 = T10 DIF types 1 to 3).
    pub dif_type: u32,
    /// Protection information in the first bytes of the metadata rather than the last.
    pub dif_is_head_of_md: bool,
    /// Protection checks enabled: reference tag, application tag, guard.
    pub dif_check: DifCheck,
    /// Atomic compare-and-write unit, in blocks (0 = compare-and-write not supported).
    pub acwu: u16,
    /// Required buffer alignment in bytes (power of two; 0 or 1 = none).
    pub required_alignment: u32,
    /// Physical block size in bytes (0 = same as block_size).
    pub physical_block_size: u32,
}

impl BdevParams {
    /// Parameters with defaults for everything but name, block size and count.
    pub fn new(name: &str, block_size: u32, num_blocks: u64) -> Self {
        BdevParams {
            name: name.to_string(),
            uuid: None,
            product_name: String::new(),
            block_size,
            num_blocks,
            write_cache: false,
            optimal_io_boundary: 0,
            split_on_optimal_io_boundary: false,
            max_rw_size: 0,
            max_segment_size: 0,
            max_num_segments: 0,
            max_unmap: 0,
            max_write_zeroes: 0,
            md_size: 0,
            md_interleave: false,
            dif_type: 0,
            dif_is_head_of_md: false,
            dif_check: DifCheck::default(),
            acwu: 0,
            required_alignment: 0,
            physical_block_size: 0,
        }
    }
}

struct DescEntry {
    id: u64,
    write: bool,
    thread: Option<ThreadHandle>,
    event_cb: Option<EventCb>,
}

/// A descriptor's event callback, run on the thread that opened it.
pub type EventCb = Arc<dyn Fn(BdevEvent, &Bdev) + Send + Sync>;
type UnregisterCb = Box<dyn FnOnce(Result<()>) + Send>;

#[derive(Default)]
struct State {
    aliases: Vec<String>,
    claim: Option<(String, u64)>,
    descs: Vec<DescEntry>,
    removing: bool,
    unregister_cbs: Vec<(Option<ThreadHandle>, UnregisterCb)>,
    destroyed: bool,
}

pub(crate) struct BdevInner {
    pub(crate) params: BdevParams,
    uuid: Uuid,
    num_blocks: AtomicU64,
    pub(crate) ops: Box<dyn BdevOps>,
    pub(crate) io_device: Arc<IoDevice<ChannelCore>>,
    /// Latency histogram settings while enabled (`bdev_enable_histogram`); every channel follows them.
    pub(crate) histogram: Mutex<Option<HistogramCfg>>,
    /// A reset is in progress: channels are frozen, or the module is executing it.
    pub(crate) reset_busy: std::sync::atomic::AtomicBool,
    /// LBA range locks held and asked for.
    pub(crate) range_locks: Mutex<crate::range_lock::RangeLocks>,
    state: Mutex<State>,
    id: u64,
}

/// A registered block device; cheap to clone and `Send`.
#[derive(Clone)]
pub struct Bdev(pub(crate) Arc<BdevInner>);

impl std::fmt::Debug for Bdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bdev({})", self.name())
    }
}

struct Registry {
    order: Vec<Bdev>,
    names: HashMap<String, Bdev>,
    examiners: Vec<(String, Examiner)>,
}

/// A virtual bdev module's examine callback, run for every new bdev.
pub type Examiner = Arc<dyn Fn(&Bdev) + Send + Sync>;

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);
static NEXT_DESC: AtomicU64 = AtomicU64::new(1);
static NEXT_BDEV_ID: AtomicU64 = AtomicU64::new(1);

fn registry<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    let mut g = lock(&REGISTRY);
    let r = g.get_or_insert_with(|| Registry {
        order: vec![],
        names: HashMap::new(),
        examiners: vec![],
    });
    f(r)
}

/// Registers a new bdev and runs the examiners on it.
pub fn register(params: BdevParams, ops: Box<dyn BdevOps>) -> Result<Bdev> {
    if params.name.is_empty() {
        return Err(BdevError::new(
            ErrorKind::Invalid,
            "bdev name must not be empty",
        ));
    }
    if params.block_size < 512 || !params.block_size.is_multiple_of(512) {
        return Err(BdevError::new(
            ErrorKind::Invalid,
            format!(
                "{}: block size {} is not a multiple of 512",
                params.name, params.block_size
            ),
        ));
    }
    if params.num_blocks == 0 {
        return Err(BdevError::new(
            ErrorKind::Invalid,
            format!("{}: bdev must have at least one block", params.name),
        ));
    }
    if params.dif_type > 3 || (params.dif_type != 0 && params.md_size < 8) {
        return Err(BdevError::new(
            ErrorKind::Invalid,
            format!(
                "{}: protection information type {} needs 8 metadata bytes per block (has {})",
                params.name, params.dif_type, params.md_size
            ),
        ));
    }
    if params.required_alignment > 1 && !params.required_alignment.is_power_of_two() {
        return Err(BdevError::new(
            ErrorKind::Invalid,
            "required_alignment must be a power of two",
        ));
    }
    let uuid = params.uuid.unwrap_or_else(Uuid::new_v4);
    let bdev = Bdev(Arc::new_cyclic(|weak: &Weak<BdevInner>| {
        let w = weak.clone();
        BdevInner {
            num_blocks: AtomicU64::new(params.num_blocks),
            params,
            uuid,
            ops,
            io_device: Arc::new(IoDevice::new(move || {
                let inner = w.upgrade().expect("channel of a live bdev");
                ChannelCore::new(Bdev(inner))
            })),
            state: Mutex::new(State::default()),
            reset_busy: std::sync::atomic::AtomicBool::new(false),
            range_locks: Mutex::new(Default::default()),
            histogram: Mutex::new(None),
            id: NEXT_BDEV_ID.fetch_add(1, Ordering::Relaxed),
        }
    }));
    let examiners = registry(|r| {
        let keys = [bdev.name().to_string(), uuid.to_string()];
        if let Some(k) = keys.iter().find(|k| r.names.contains_key(*k)) {
            return Err(BdevError::new(
                ErrorKind::Exists,
                format!("Bdev name {k} already exists"),
            ));
        }
        for k in keys {
            r.names.insert(k, bdev.clone());
        }
        r.order.push(bdev.clone());
        Ok(r.examiners
            .iter()
            .map(|(_, e)| e.clone())
            .collect::<Vec<_>>())
    })?;
    log::debug!(
        "bdev {} registered ({} x {})",
        bdev.name(),
        bdev.block_size(),
        bdev.num_blocks()
    );
    if crate::rpc::options().bdev_auto_examine {
        for e in examiners {
            e(&bdev);
        }
    }
    Ok(bdev)
}

/// Runs every examiner on `bdev` (`bdev_examine`, when auto-examine is off).
pub(crate) fn run_examiners(bdev: &Bdev) {
    let examiners = registry(|r| {
        r.examiners
            .iter()
            .map(|(_, e)| e.clone())
            .collect::<Vec<_>>()
    });
    for e in examiners {
        e(bdev);
    }
}

static EXAMINES_PENDING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Held by an examine callback while it continues asynchronously (e.g. reading a superblock); dropping it is
/// SPDK's `spdk_bdev_module_examine_done`. `bdev_wait_for_examine` answers once none is held.
#[derive(Debug)]
pub struct ExamineGuard(());

impl ExamineGuard {
    /// Marks one examine as in progress.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        EXAMINES_PENDING.fetch_add(1, Ordering::SeqCst);
        ExamineGuard(())
    }
}

impl Drop for ExamineGuard {
    fn drop(&mut self) {
        EXAMINES_PENDING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Examines still in progress (see [`ExamineGuard`]).
pub fn examines_pending() -> usize {
    EXAMINES_PENDING.load(Ordering::SeqCst)
}

/// Adds a module's examine callback; it also runs now for every bdev already registered.
pub fn register_examiner(module: &str, f: Examiner) {
    let existing = registry(|r| {
        r.examiners.push((module.to_string(), f.clone()));
        r.order.clone()
    });
    for b in existing {
        f(&b);
    }
}

/// Looks a bdev up by name, alias or UUID.
pub fn get(name: &str) -> Option<Bdev> {
    registry(|r| r.names.get(name).cloned())
}

/// Every registered bdev, in registration order.
pub fn list() -> Vec<Bdev> {
    registry(|r| r.order.clone())
}

/// Opens a bdev by name (SPDK's `spdk_bdev_open_ext`).
pub fn open(name: &str, write: bool, event_cb: Option<EventCb>) -> Result<Desc> {
    get(name)
        .ok_or_else(|| BdevError::new(ErrorKind::NotFound, format!("bdev {name} not found")))?
        .open(write, event_cb)
}

impl Bdev {
    /// Name.
    pub fn name(&self) -> &str {
        &self.0.params.name
    }
    /// UUID.
    pub fn uuid(&self) -> Uuid {
        self.0.uuid
    }
    /// Block size.
    pub fn block_size(&self) -> u32 {
        self.0.params.block_size
    }
    /// Number of blocks.
    pub fn num_blocks(&self) -> u64 {
        self.0.num_blocks.load(Ordering::Relaxed)
    }
    /// Registration parameters.
    pub fn params(&self) -> &BdevParams {
        &self.0.params
    }
    /// The module's ops (modules downcast nothing: they keep their own handle).
    pub fn module_name(&self) -> &'static str {
        self.0.ops.module_name()
    }
    /// Whether an I/O type is supported.
    pub fn io_type_supported(&self, t: IoType) -> bool {
        self.0.ops.io_type_supported(t)
    }
    /// Aliases.
    pub fn aliases(&self) -> Vec<String> {
        // As SPDK: the UUID is the first alias (unless it is the name), then the ones added.
        let uuid = self.uuid().to_string();
        let mut v = Vec::new();
        if uuid != self.name() {
            v.push(uuid);
        }
        v.extend(lock(&self.0.state).aliases.iter().cloned());
        v
    }
    /// The claiming module, if any.
    pub fn claimed_by(&self) -> Option<String> {
        lock(&self.0.state).claim.as_ref().map(|c| c.0.clone())
    }
    /// Whether unregistration has started.
    pub fn is_removing(&self) -> bool {
        lock(&self.0.state).removing
    }
    /// Same bdev?
    pub fn ptr_eq(&self, o: &Bdev) -> bool {
        Arc::ptr_eq(&self.0, &o.0)
    }

    /// Adds an alias (unique across names and aliases).
    pub fn add_alias(&self, alias: &str) -> Result<()> {
        registry(|r| {
            if r.names.contains_key(alias) {
                return Err(BdevError::new(
                    ErrorKind::Exists,
                    format!("alias {alias} already exists"),
                ));
            }
            r.names.insert(alias.to_string(), self.clone());
            lock(&self.0.state).aliases.push(alias.to_string());
            Ok(())
        })
    }

    /// Removes an alias added with [`Bdev::add_alias`] (SPDK's `spdk_bdev_alias_del`); NotFound if absent.
    pub fn remove_alias(&self, alias: &str) -> Result<()> {
        registry(|r| {
            let mut st = lock(&self.0.state);
            let Some(i) = st.aliases.iter().position(|a| a == alias) else {
                return Err(BdevError::new(
                    ErrorKind::NotFound,
                    format!("bdev {} has no alias {alias}", self.name()),
                ));
            };
            st.aliases.remove(i);
            if r.names.get(alias).is_some_and(|b| b.ptr_eq(self)) {
                r.names.remove(alias);
            }
            Ok(())
        })
    }

    /// Opens a descriptor. Writers are refused (EPERM) while another module holds a claim.
    pub fn open(&self, write: bool, event_cb: Option<EventCb>) -> Result<Desc> {
        let mut st = lock(&self.0.state);
        if st.removing {
            return Err(BdevError::new(
                ErrorKind::NotFound,
                format!("bdev {} is being removed", self.name()),
            ));
        }
        if write && st.claim.is_some() {
            return Err(BdevError::new(
                ErrorKind::Claimed,
                format!(
                    "bdev {} is claimed by {}",
                    self.name(),
                    st.claim.as_ref().map(|c| c.0.as_str()).unwrap_or("")
                ),
            ));
        }
        let id = NEXT_DESC.fetch_add(1, Ordering::Relaxed);
        st.descs.push(DescEntry {
            id,
            write,
            thread: reactor::current(),
            event_cb,
        });
        Ok(Desc {
            bdev: self.clone(),
            id,
            write,
        })
    }

    /// Changes the size and tells every descriptor (modules call this on resize). Shrinking while descriptors
    /// are open fails with `Busy` and changes nothing, as SPDK's `spdk_bdev_notify_blockcnt_change` does: an
    /// opener may be using the blocks that would go.
    pub fn notify_resize(&self, num_blocks: u64) -> Result<()> {
        {
            let st = lock(&self.0.state);
            let old = self.num_blocks();
            if num_blocks == old {
                return Ok(());
            }
            if num_blocks < old && !st.descs.is_empty() {
                return Err(BdevError::new(
                    ErrorKind::Busy,
                    format!(
                        "{}: cannot shrink from {old} to {num_blocks} blocks while it is open",
                        self.name()
                    ),
                ));
            }
            self.0.num_blocks.store(num_blocks, Ordering::Relaxed);
        }
        self.notify(BdevEvent::Resize);
        Ok(())
    }

    fn notify(&self, ev: BdevEvent) {
        let targets: Vec<(Option<ThreadHandle>, EventCb)> = lock(&self.0.state)
            .descs
            .iter()
            .filter_map(|d| d.event_cb.clone().map(|cb| (d.thread.clone(), cb)))
            .collect();
        for (t, cb) in targets {
            let b = self.clone();
            match t {
                Some(t) => t.send(move || cb(ev, &b)),
                None => cb(ev, &b),
            }
        }
    }

    /// Starts unregistering (hot-remove): every descriptor gets [`BdevEvent::Remove`]; once all are closed the
    /// module's `destruct` runs and `done` is called on the caller's thread.
    pub fn unregister(&self, done: impl FnOnce(Result<()>) + Send + 'static) {
        let first = {
            let mut st = lock(&self.0.state);
            if st.destroyed {
                drop(st);
                done(Err(BdevError::new(
                    ErrorKind::NotFound,
                    format!("bdev {} not found", self.name()),
                )));
                return;
            }
            st.unregister_cbs.push((reactor::current(), Box::new(done)));
            !std::mem::replace(&mut st.removing, true)
        };
        if first {
            log::debug!("bdev {} unregistering", self.name());
            self.notify(BdevEvent::Remove);
        }
        self.maybe_destroy();
    }

    fn maybe_destroy(&self) {
        let cbs = {
            let mut st = lock(&self.0.state);
            if !st.removing || !st.descs.is_empty() || st.destroyed {
                return;
            }
            st.destroyed = true;
            std::mem::take(&mut st.unregister_cbs)
        };
        registry(|r| {
            r.order.retain(|b| !b.ptr_eq(self));
            r.names.retain(|_, b| !b.ptr_eq(self));
        });
        self.0.ops.destruct(self);
        let id = self.id();
        // Gone for good: forget its retired counters and histograms on every thread.
        reactor::for_each_thread(move || crate::channel::forget_thread_stat(id), |_| {});
        log::debug!("bdev {} destroyed", self.name());
        for (t, cb) in cbs {
            match t {
                Some(t) if !t.is_current() => t.send(move || cb(Ok(()))),
                _ => cb(Ok(())),
            }
        }
    }

    /// A process-unique id (never reused, unlike names).
    pub(crate) fn id(&self) -> u64 {
        self.0.id
    }

    /// Aggregated statistics over every thread, delivered to `done` on the caller's thread.
    pub fn get_iostat(&self, done: impl FnOnce(IoStat) + Send + 'static) {
        let dev = self.0.io_device.clone();
        let id = self.id();
        reactor::for_each_thread(
            move || crate::channel::thread_stat(id, dev.existing_channel().as_deref()),
            move |v| {
                let mut s = IoStat::default();
                for x in v {
                    s.merge(&x);
                }
                done(s)
            },
        );
    }

    /// Starts (or stops) latency histograms on every channel of the bdev (`bdev_enable_histogram`); channels
    /// created later follow. `done` runs on the caller's thread once every channel has switched.
    pub fn enable_histogram(
        &self,
        cfg: Option<HistogramCfg>,
        done: impl FnOnce() + Send + 'static,
    ) {
        *lock(&self.0.histogram) = cfg;
        self.0
            .io_device
            .for_each_channel(move |c| c.set_histogram(cfg), move |_| done());
    }

    /// The histogram settings, while enabled.
    pub fn histogram_cfg(&self) -> Option<HistogramCfg> {
        *lock(&self.0.histogram)
    }

    /// The latency histogram merged over every thread (`bdev_get_histogram`), or `None` when disabled.
    pub fn get_histogram(&self, done: impl FnOnce(Option<Histogram>) + Send + 'static) {
        let Some(cfg) = self.histogram_cfg() else {
            return done(None);
        };
        let dev = self.0.io_device.clone();
        let id = self.id();
        reactor::for_each_thread(
            move || crate::channel::thread_histogram(id, dev.existing_channel().as_deref()),
            move |v| {
                let mut out = Histogram::new(cfg.bucket_shift);
                for h in v.into_iter().flatten() {
                    out.merge(&h);
                }
                done(Some(out))
            },
        );
    }

    /// Clears statistics on every thread as `mode` says (`bdev_reset_iostat`).
    pub fn reset_iostat(&self, mode: crate::ResetMode, done: impl FnOnce() + Send + 'static) {
        let dev = self.0.io_device.clone();
        let id = self.id();
        reactor::for_each_thread(
            move || crate::channel::clear_thread_stat(id, dev.existing_channel().as_deref(), mode),
            move |_| done(),
        );
    }

    /// The object `bdev_get_bdevs` prints for this bdev.
    pub fn info_json(&self) -> Value {
        let p = &self.0.params;
        let claim = self.claimed_by();
        let mut m = Map::new();
        m.insert("name".into(), json!(self.name()));
        m.insert("aliases".into(), json!(self.aliases()));
        m.insert("product_name".into(), json!(p.product_name));
        m.insert("block_size".into(), json!(p.block_size));
        m.insert("num_blocks".into(), json!(self.num_blocks()));
        m.insert("uuid".into(), json!(self.uuid().to_string()));
        if p.md_size != 0 {
            // As SPDK: metadata fields only for bdevs with metadata, protection details only with DIF on.
            m.insert("md_size".into(), json!(p.md_size));
            m.insert("md_interleave".into(), json!(p.md_interleave));
            m.insert("dif_type".into(), json!(p.dif_type));
            if p.dif_type != 0 {
                m.insert("dif_is_head_of_md".into(), json!(p.dif_is_head_of_md));
                m.insert(
                    "enabled_dif_check_types".into(),
                    json!({"reftag": p.dif_check.reftag, "apptag": p.dif_check.apptag, "guard": p.dif_check.guard}),
                );
            }
        }
        m.insert(
            "assigned_rate_limits".into(),
            json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0}),
        );
        m.insert("claimed".into(), json!(claim.is_some()));
        if claim.is_some() {
            m.insert("claim_type".into(), json!("exclusive_write"));
        }
        m.insert("zoned".into(), json!(false));
        let mut io = Map::new();
        for (name, t) in SPDK_IO_TYPE_NAMES {
            io.insert(
                name.into(),
                json!(t.is_some_and(|t| self.io_type_supported(t))),
            );
        }
        m.insert("supported_io_types".into(), Value::Object(io));
        // SPDK writes `memory_domains` only when the module reports some (spdk_bdev_get_memory_domains() > 0).
        if let Some(d) = crate::modules::memory_domains(self) {
            m.insert("memory_domains".into(), d);
        }
        let mut ds = Map::new();
        self.0.ops.dump_info(self, &mut ds);
        m.insert("driver_specific".into(), Value::Object(ds));
        Value::Object(m)
    }

    /// The `save_config` entry recreating this bdev, if the module has one.
    pub fn write_config(&self) -> Option<Value> {
        self.0.ops.write_config(self)
    }

    /// This thread's channel (internal: users go through a descriptor).
    pub(crate) fn channel_core(&self) -> std::rc::Rc<ChannelCore> {
        self.0.io_device.get_channel()
    }
}

/// SPDK's I/O type names in its enum order, with the types this layer knows.
const SPDK_IO_TYPE_NAMES: [(&str, Option<IoType>); 20] = [
    ("read", Some(IoType::Read)),
    ("write", Some(IoType::Write)),
    ("unmap", Some(IoType::Unmap)),
    ("flush", Some(IoType::Flush)),
    ("reset", Some(IoType::Reset)),
    ("nvme_admin", Some(IoType::NvmeAdmin)),
    ("nvme_io", Some(IoType::NvmeIo)),
    ("nvme_io_md", None),
    ("write_zeroes", Some(IoType::WriteZeroes)),
    ("zcopy", None),
    ("get_zone_info", None),
    ("zone_management", None),
    ("zone_append", None),
    ("compare", Some(IoType::Compare)),
    ("compare_and_write", None),
    ("abort", Some(IoType::Abort)),
    ("seek_hole", None),
    ("seek_data", None),
    ("copy", Some(IoType::Copy)),
    ("nvme_iov_md", None),
];

/// An open handle on a bdev. Closing (dropping) it releases its claim and may complete an unregister.
pub struct Desc {
    bdev: Bdev,
    id: u64,
    write: bool,
}

impl Desc {
    /// The bdev.
    pub fn bdev(&self) -> &Bdev {
        &self.bdev
    }

    /// Whether writes are allowed.
    pub fn writable(&self) -> bool {
        self.write
    }

    /// Claims the bdev exclusively for `module` (SPDK's exclusive_write claim). Makes this descriptor writable.
    pub fn claim(&mut self, module: &str) -> Result<()> {
        let mut st = lock(&self.bdev.0.state);
        if let Some((m, _)) = &st.claim {
            return Err(BdevError::new(
                ErrorKind::Claimed,
                format!("bdev {} already claimed by {m}", self.bdev.name()),
            ));
        }
        if st.descs.iter().any(|d| d.write && d.id != self.id) {
            return Err(BdevError::new(
                ErrorKind::Claimed,
                format!("bdev {} is open for writing elsewhere", self.bdev.name()),
            ));
        }
        st.claim = Some((module.to_string(), self.id));
        self.write = true;
        if let Some(d) = st.descs.iter_mut().find(|d| d.id == self.id) {
            d.write = true;
        }
        Ok(())
    }

    /// Releases this descriptor's claim.
    pub fn release_claim(&mut self) {
        let mut st = lock(&self.bdev.0.state);
        if st.claim.as_ref().is_some_and(|c| c.1 == self.id) {
            st.claim = None;
        }
    }

    /// This thread's I/O channel through this descriptor. If the module could not make one, every I/O through
    /// it fails with the module's errno (see [`Desc::try_channel`]).
    pub fn channel(&self) -> crate::channel::IoChannel {
        crate::channel::IoChannel::new(self.bdev.channel_core(), self.write)
    }

    /// This thread's I/O channel, or the error the module's channel creation failed with.
    pub fn try_channel(&self) -> Result<crate::channel::IoChannel> {
        let core = self.bdev.channel_core();
        if let Some(errno) = core.failed {
            return Err(BdevError::new(
                ErrorKind::from_errno(errno),
                format!("{}: no I/O channel on this thread", self.bdev.name()),
            ));
        }
        Ok(crate::channel::IoChannel::new(core, self.write))
    }
}

impl std::fmt::Debug for Desc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Desc({}, write={})", self.bdev.name(), self.write)
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.bdev.0.state);
            st.descs.retain(|d| d.id != self.id);
            if st.claim.as_ref().is_some_and(|c| c.1 == self.id) {
                st.claim = None;
            }
        }
        self.bdev.maybe_destroy();
    }
}

/// Unregisters the bdev `name` if it belongs to `module` (the `bdev_*_delete` RPCs).
pub fn unregister_by_name(
    name: &str,
    module: &str,
    done: impl FnOnce(Result<()>) + Send + 'static,
) {
    match get(name) {
        Some(b) if b.module_name() == module && !b.is_removing() => b.unregister(done),
        Some(b) if b.module_name() != module => done(Err(BdevError::new(
            ErrorKind::NotFound,
            format!("bdev {name} is not a {module} bdev"),
        ))),
        _ => done(Err(BdevError::new(
            ErrorKind::NotFound,
            format!("bdev {name} not found"),
        ))),
    }
}
