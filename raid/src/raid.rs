//! The control plane: arrays, their members and states, configuration (create, examine, superblocks), member
//! removal (RPC, hot-remove, I/O failure), deletion, and the JSON the RPCs and `bdev_get_bdevs` show.
//!
//! Everything here runs on the app thread. State is in a `Mutex` per array (so the bdev layer's `Send + Sync`
//! ops and channel creation on other threads can read it), but no lock is held across a callback, an I/O
//! submission or a call into the bdev layer that may call back (register, unregister, dropping a descriptor).
//! Operations that walk the channels or write superblocks on an online array are serialized per array through
//! an operation queue ([`enqueue_op`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bdev::{Bdev, BdevEvent, BdevOps, BdevParams, Completion, Desc, IoType, ModuleChannel};
use reactor::dma::DmaBuf;
use reactor::IoDevice;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::channel::{BaseCh, ChanHandle, Layout, RaidChan, RaidModuleChannel, MAX_BASE_BDEVS};
use crate::error::{err, ErrorKind, RaidError, Result};
use crate::process::{self, Process};
use crate::sb::{self, BaseState, DecodeError, SbBase, Superblock};
use crate::{Level, MODULE};

/// A completion callback of a control operation.
pub(crate) type Cb = Box<dyn FnOnce(Result<()>) + Send>;

/// State of an array, as `bdev_raid_get_bdevs` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaidState {
    /// Registered as a bdev and serving I/O.
    Online,
    /// Waiting for members.
    Configuring,
    /// Lost too many members (or being torn down); not serving.
    Offline,
}

impl RaidState {
    /// SPDK's name.
    pub fn name(self) -> &'static str {
        match self {
            RaidState::Online => "online",
            RaidState::Configuring => "configuring",
            RaidState::Offline => "offline",
        }
    }
}

/// One member slot.
pub(crate) struct BaseInfo {
    pub name: Option<String>,
    pub uuid: Uuid,
    pub desc: Option<Arc<Desc>>,
    pub data_offset: u64,
    pub data_size: u64,
    pub is_configured: bool,
    pub is_process_target: bool,
    pub remove_scheduled: bool,
    pub is_failed: bool,
    /// Channels stopped using it (removal in progress).
    pub detached: bool,
    /// The bdev went away while it was being configured.
    pub hot_removed: bool,
    /// Membership generation: bumped whenever a bdev is configured into the slot.
    pub gen: u32,
    pub configure_cb: Option<Cb>,
    pub remove_cbs: Vec<Cb>,
}

impl BaseInfo {
    fn new() -> Self {
        BaseInfo {
            name: None,
            uuid: Uuid::nil(),
            desc: None,
            data_offset: 0,
            data_size: 0,
            is_configured: false,
            is_process_target: false,
            remove_scheduled: false,
            is_failed: false,
            detached: false,
            hot_removed: false,
            gen: 0,
            configure_cb: None,
            remove_cbs: Vec::new(),
        }
    }

    /// Whether channels send I/O to it.
    fn attached(&self) -> bool {
        self.desc.is_some() && self.is_configured && !self.detached
    }
}

type OpFn = Box<dyn FnOnce(OpDone) + Send>;

pub(crate) struct State {
    pub uuid: Uuid,
    pub strip_size_kb: u32,
    pub strip_size: u32,
    pub state: RaidState,
    pub superblock_enabled: bool,
    pub sb: Option<Superblock>,
    pub block_size: u32,
    pub required_alignment: u32,
    pub num_blocks: u64,
    pub bases: Vec<BaseInfo>,
    pub discovered: usize,
    pub operational: usize,
    pub destroy_started: bool,
    pub bdev: Option<Bdev>,
    pub layout: Option<Arc<Layout>>,
    /// The raid bdev is being unregistered by this module (not by the application's shutdown).
    pub unregistering: bool,
    pub quiesced: bool,
    pub process: Option<Process>,
    ops_busy: bool,
    ops: VecDeque<OpFn>,
    configure_cb: Option<Cb>,
    destruct_pending: bool,
}

/// An array.
pub struct Raid {
    pub(crate) name: String,
    pub(crate) level: Level,
    pub(crate) num_base: usize,
    pub(crate) min_operational: usize,
    pub(crate) chan_dev: Arc<IoDevice<ChanHandle>>,
    st: Mutex<State>,
}

impl std::fmt::Debug for Raid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Raid({})", self.name)
    }
}

static RAIDS: Mutex<Vec<Arc<Raid>>> = Mutex::new(Vec::new());

fn raids() -> Vec<Arc<Raid>> {
    reactor::lock(&RAIDS).clone()
}

pub(crate) fn find_by_name(name: &str) -> Option<Arc<Raid>> {
    raids().into_iter().find(|r| r.name == name)
}

fn find_by_uuid(uuid: &Uuid) -> Option<Arc<Raid>> {
    raids().into_iter().find(|r| r.lock().uuid == *uuid)
}

/// The array and slot whose member (claimed or being configured) is `bdev`.
fn find_base_by_bdev(bdev: &Bdev) -> Option<(Arc<Raid>, usize)> {
    for r in raids() {
        let st = r.lock();
        if let Some(i) = st
            .bases
            .iter()
            .position(|b| b.desc.as_ref().is_some_and(|d| d.bdev().ptr_eq(bdev)))
        {
            drop(st);
            return Some((r, i));
        }
    }
    None
}

fn unlist(raid: &Arc<Raid>) {
    let mut v = reactor::lock(&RAIDS);
    v.retain(|r| !Arc::ptr_eq(r, raid));
}

/// Runs `f` on the app thread: now when called there (or with no reactors), else by message.
pub(crate) fn on_app(f: impl FnOnce() + Send + 'static) {
    match reactor::app_thread() {
        Some(t) if !t.is_current() => t.send(f),
        _ => f(),
    }
}

/// Runs `f` on the app thread from a fresh stack (always by message when reactors run).
pub(crate) fn later(f: impl FnOnce() + Send + 'static) {
    match reactor::app_thread() {
        Some(t) => t.send(f),
        None => f(),
    }
}

impl Raid {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        reactor::lock(&self.st)
    }
}

/// Ends an operation of the per-array queue when dropped, starting the next one.
pub(crate) struct OpDone(Option<Arc<Raid>>);

impl Drop for OpDone {
    fn drop(&mut self) {
        let Some(raid) = self.0.take() else { return };
        let next = {
            let mut st = raid.lock();
            match st.ops.pop_front() {
                Some(f) => Some(f),
                None => {
                    st.ops_busy = false;
                    None
                }
            }
        };
        if let Some(f) = next {
            let r = raid.clone();
            later(move || f(OpDone(Some(r))));
        }
    }
}

/// Queues an operation that walks channels or writes superblocks; it runs when the previous one is done.
pub(crate) fn enqueue_op(raid: &Arc<Raid>, f: impl FnOnce(OpDone) + Send + 'static) {
    let run = {
        let mut st = raid.lock();
        if st.ops_busy {
            st.ops.push_back(Box::new(f));
            None
        } else {
            st.ops_busy = true;
            Some(f)
        }
    };
    if let Some(f) = run {
        f(OpDone(Some(raid.clone())));
    }
}

/// Runs `f` on every thread holding a channel of the array, then `done` on the app thread.
pub(crate) fn walk(
    raid: &Arc<Raid>,
    f: impl Fn(&RaidChan) + Send + Sync + 'static,
    done: impl FnOnce() + Send + 'static,
) {
    raid.chan_dev
        .for_each_channel(move |h: &ChanHandle| f(&h.0), move |_| done());
}

/// Re-checks `pred` on every channel (every 50 µs) until it holds everywhere, then runs `done`.
pub(crate) fn wait_all(
    raid: &Arc<Raid>,
    pred: Arc<dyn Fn(&RaidChan) -> bool + Send + Sync>,
    done: impl FnOnce() + Send + 'static,
) {
    let p = pred.clone();
    let r = raid.clone();
    raid.chan_dev.for_each_channel(
        move |h: &ChanHandle| p(&h.0),
        move |v: Vec<bool>| {
            if v.iter().all(|x| *x) {
                done();
            } else {
                reactor::timer(50, move || wait_all(&r, pred, done)).detach();
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Creation.

/// `bdev_raid_create` parameters.
#[derive(Clone, Debug)]
pub struct CreateOpts {
    /// Raid bdev name.
    pub name: String,
    /// Strip size in KiB (0 for raid1).
    pub strip_size_kb: u32,
    /// Level.
    pub level: Level,
    /// Member bdev names, in slot order.
    pub base_bdevs: Vec<String>,
    /// UUID (generated when `None`).
    pub uuid: Option<Uuid>,
    /// Keep a superblock on every member.
    pub superblock: bool,
}

fn new_raid(
    name: &str,
    strip_size_kb: u32,
    num_base: usize,
    level: Level,
    superblock: bool,
    uuid: Uuid,
) -> Result<Arc<Raid>> {
    if name.len() >= sb::NAME_SIZE {
        return err(
            ErrorKind::Invalid,
            format!(
                "Raid bdev name '{name}' exceeds {} characters",
                sb::NAME_SIZE - 1
            ),
        );
    }
    if name.is_empty() {
        return err(ErrorKind::Invalid, "Raid bdev name must not be empty");
    }
    if find_by_name(name).is_some() {
        return err(
            ErrorKind::Exists,
            format!("Duplicate raid bdev name found: {name}"),
        );
    }
    if level == Level::Raid1 {
        if strip_size_kb != 0 {
            return err(ErrorKind::Invalid, "Strip size is not supported by raid1");
        }
    } else if !strip_size_kb.is_power_of_two() {
        return err(
            ErrorKind::Invalid,
            format!("Invalid strip size {strip_size_kb}"),
        );
    }
    if num_base < level.min_base_bdevs() {
        return err(
            ErrorKind::Invalid,
            format!(
                "At least {} base devices required for {}",
                level.min_base_bdevs(),
                level.name()
            ),
        );
    }
    if num_base > MAX_BASE_BDEVS {
        return err(
            ErrorKind::Invalid,
            format!("At most {MAX_BASE_BDEVS} base devices are supported"),
        );
    }
    let raid = Arc::new_cyclic(|weak: &Weak<Raid>| {
        let w = weak.clone();
        Raid {
            name: name.to_string(),
            level,
            num_base,
            min_operational: level.min_operational(num_base),
            chan_dev: Arc::new(IoDevice::new(move || {
                let raid = w.upgrade().expect("channel of a live raid");
                new_channel(&raid)
            })),
            st: Mutex::new(State {
                uuid,
                strip_size_kb,
                strip_size: 0,
                state: RaidState::Configuring,
                superblock_enabled: superblock,
                sb: None,
                block_size: 0,
                required_alignment: 0,
                num_blocks: 0,
                bases: (0..num_base).map(|_| BaseInfo::new()).collect(),
                discovered: 0,
                operational: 0,
                destroy_started: false,
                bdev: None,
                layout: None,
                unregistering: false,
                quiesced: false,
                process: None,
                ops_busy: false,
                ops: VecDeque::new(),
                configure_cb: None,
                destruct_pending: false,
            }),
        }
    });
    reactor::lock(&RAIDS).push(raid.clone());
    Ok(raid)
}

/// Creates an array (`bdev_raid_create`). `done` runs once every member present was configured (and the array
/// went online if all are), or with the first error (the array is then deleted).
pub fn create(opts: CreateOpts, done: impl FnOnce(Result<()>) + Send + 'static) {
    let mut uuid = opts.uuid.unwrap_or_else(Uuid::nil);
    if opts.superblock && uuid.is_nil() {
        // The UUID goes into the superblock before the bdev is registered.
        uuid = Uuid::new_v4();
    }
    let n = opts.base_bdevs.len();
    let raid = match new_raid(
        &opts.name,
        opts.strip_size_kb,
        n,
        opts.level,
        opts.superblock,
        uuid,
    ) {
        Ok(r) => r,
        Err(e) => return done(Err(e)),
    };
    {
        let mut st = raid.lock();
        st.operational = n;
        for (b, name) in st.bases.iter_mut().zip(&opts.base_bdevs) {
            b.name = Some(name.clone());
        }
    }
    struct Ctx {
        remaining: usize,
        status: Result<()>,
        done: Option<Cb>,
    }
    let ctx = Arc::new(Mutex::new(Ctx {
        remaining: n,
        status: Ok(()),
        done: Some(Box::new(done)),
    }));
    let part = {
        let ctx = ctx.clone();
        let raid = raid.clone();
        move |res: Result<()>, parts: usize| {
            let fin = {
                let mut c = reactor::lock(&ctx);
                if let Err(e) = res {
                    c.status = Err(e);
                }
                c.remaining -= parts;
                if c.remaining == 0 {
                    Some((c.status.clone(), c.done.take()))
                } else {
                    None
                }
            };
            if let Some((status, done)) = fin {
                if status.is_err() {
                    delete_raid(&raid, true, None);
                }
                if let Some(d) = done {
                    d(status);
                }
            }
        }
    };
    let part = Arc::new(part);
    for i in 0..n {
        let p = part.clone();
        let cb: Cb = Box::new(move |res| p(res, 1));
        match configure_base(&raid, i, false, Some(cb)) {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::NotFound => {
                log::debug!("base bdev of {} in slot {i} doesn't exist now", raid.name);
                part(Ok(()), 1);
            }
            Err(e) => {
                log::error!("Failed to add base bdev to RAID bdev {}: {e}", raid.name);
                part(Err(e), n - i);
                break;
            }
        }
    }
}

fn base_event(ev: BdevEvent, bdev: &Bdev) {
    match ev {
        BdevEvent::Remove => {
            let Some((raid, slot)) = find_base_by_bdev(bdev) else {
                log::error!("bdev to remove '{}' not found", bdev.name());
                return;
            };
            let configuring = {
                let mut st = raid.lock();
                let b = &mut st.bases[slot];
                if !b.is_configured {
                    b.hot_removed = true;
                    true
                } else {
                    false
                }
            };
            if configuring {
                return;
            }
            if let Err(e) = remove_base_slot(&raid, slot, None) {
                log::error!("Failed to remove base bdev {}: {e}", bdev.name());
            }
        }
        BdevEvent::Resize => {
            let Some((raid, _)) = find_base_by_bdev(bdev) else {
                log::error!(
                    "raid bdev whose base bdev '{}' was resized not found",
                    bdev.name()
                );
                return;
            };
            log::info!(
                "base bdev '{}' was resized: new size {}",
                bdev.name(),
                bdev.num_blocks()
            );
            let r = raid.clone();
            enqueue_op(&raid, move |op| resize(r, op));
        }
    }
}

/// Follows a member's new size (SPDK's `raid_bdev_resize_base_bdev` and the levels' `resize`): raid1 takes its
/// smallest member in use, raid0 its smallest member rounded down to a strip, times the members; concat keeps its
/// size (SPDK's concat does not resize). The array grows freely and shrinks only while nothing has it open (the
/// bdev layer refuses otherwise, and then nothing changes). With a superblock the new sizes are written to the
/// members. An array not online yet takes its members' sizes when it configures.
fn resize(raid: Arc<Raid>, op: OpDone) {
    let (bdev, size, data_size) = {
        let st = raid.lock();
        let (Some(bdev), Some(layout)) = (st.bdev.clone(), st.layout.clone()) else {
            return;
        };
        if st.state != RaidState::Online {
            return;
        }
        let Some(min) = st
            .bases
            .iter()
            .filter_map(|b| {
                let d = b.desc.as_ref()?;
                Some(d.bdev().num_blocks().saturating_sub(b.data_offset))
            })
            .min()
        else {
            return;
        };
        let (size, data_size) = match raid.level {
            Level::Raid1 => (min, min),
            Level::Raid0 => {
                let per = (min >> layout.strip_shift) << layout.strip_shift;
                (per * raid.num_base as u64, per)
            }
            Level::Concat => return,
        };
        if size == st.num_blocks || size == 0 {
            return;
        }
        (bdev, size, data_size)
    };
    let old = bdev.num_blocks();
    if let Err(e) = bdev.notify_resize(size) {
        log::error!(
            "Failed to notify blockcount change of raid bdev '{}': {e}",
            raid.name
        );
        return;
    }
    log::info!(
        "raid bdev '{}': block count was changed from {old} to {size}",
        raid.name
    );
    let write = {
        let mut st = raid.lock();
        st.num_blocks = size;
        for b in &mut st.bases {
            b.data_size = data_size;
        }
        let n = raid.num_base;
        match st.sb.as_mut() {
            Some(sb) => {
                sb.raid_size = size;
                for e in sb.base_bdevs.iter_mut().filter(|e| (e.slot as usize) < n) {
                    e.data_size = data_size;
                }
                true
            }
            None => false,
        }
    };
    if write {
        let r = raid.clone();
        write_superblock(&raid, move |res| {
            if let Err(e) = res {
                log::error!(
                    "Failed to write raid bdev '{}' superblock after resizing the bdev: {e}",
                    r.name
                );
            }
            drop(op);
        });
    }
}

/// Opens and claims the member of `slot` (by UUID, else by name) and checks it fits. With `existing` (examine
/// found it) configuration continues at once; otherwise its superblock is read first to refuse members of other
/// arrays. On error nothing is kept and `cb` is not called.
fn configure_base(raid: &Arc<Raid>, slot: usize, existing: bool, cb: Option<Cb>) -> Result<()> {
    let (mut name, uuid) = {
        let st = raid.lock();
        (st.bases[slot].name.clone(), st.bases[slot].uuid)
    };
    if !uuid.is_nil() {
        // A bdev's UUID is also one of its names.
        let Some(b) = bdev::get(&uuid.to_string()) else {
            return err(
                ErrorKind::NotFound,
                format!("base bdev with uuid {uuid} not found"),
            );
        };
        match &name {
            None => {
                name = Some(b.name().to_string());
                raid.lock().bases[slot].name = name.clone();
            }
            Some(n) if n != b.name() => {
                return err(
                    ErrorKind::Invalid,
                    format!(
                        "Name mismatch for base bdev '{}' - expected '{n}'",
                        b.name()
                    ),
                );
            }
            Some(_) => {}
        }
    }
    let Some(name) = name else {
        return err(
            ErrorKind::Invalid,
            format!("slot {slot} has no base bdev name"),
        );
    };
    let on_event: bdev::EventCb = Arc::new(base_event);
    let mut desc = bdev::open(&name, false, Some(on_event)).map_err(|e| {
        if e.kind != bdev::ErrorKind::NotFound {
            log::error!("Unable to create desc on bdev '{name}'");
        }
        RaidError::wrap(e, format!("base bdev {name}"))
    })?;
    let bdev = desc.bdev().clone();
    if !uuid.is_nil() && uuid != bdev.uuid() {
        return err(
            ErrorKind::Invalid,
            format!("UUID mismatch for base bdev '{name}'"),
        );
    }
    desc.claim(MODULE).map_err(|e| {
        log::error!("Unable to claim this bdev as it is already claimed");
        RaidError::wrap(e, format!("base bdev {name}"))
    })?;
    let desc = Arc::new(desc);
    let checked = {
        let mut st = raid.lock();
        let sb_enabled = st.superblock_enabled;
        let raid_bs = st.block_size;
        let b = &mut st.bases[slot];
        b.uuid = bdev.uuid();
        let blockcnt = bdev.num_blocks();
        let bs = bdev.block_size() as u64;
        let mut r = Ok(());
        if sb_enabled {
            let mut off = if b.data_offset == 0 {
                sb::MIN_DATA_OFFSET_SIZE / bs
            } else {
                b.data_offset
            };
            let boundary = bdev.params().optimal_io_boundary as u64;
            if boundary != 0 {
                let rounded = off.div_ceil(boundary) * boundary;
                if b.data_offset != 0 && b.data_offset != rounded {
                    log::warn!(
                        "Data offset {} on bdev '{name}' is different than optimal value {rounded}",
                        b.data_offset
                    );
                } else {
                    off = rounded;
                }
            }
            b.data_offset = off;
        }
        if b.data_offset >= blockcnt {
            r = err(
                ErrorKind::Invalid,
                format!(
                    "Data offset {} exceeds base bdev capacity {blockcnt} on bdev '{name}'",
                    b.data_offset
                ),
            );
        } else if b.data_size == 0 {
            b.data_size = blockcnt - b.data_offset;
        } else if b.data_offset + b.data_size > blockcnt {
            r = err(
                ErrorKind::Invalid,
                format!(
                    "Data offset and size exceeds base bdev capacity {blockcnt} on bdev '{name}'"
                ),
            );
        }
        if r.is_ok() && raid_bs != 0 && raid_bs != bdev.block_size() {
            r = err(
                ErrorKind::Invalid,
                format!(
                    "Raid bdev '{}' blocklen {raid_bs} differs from base bdev '{name}' blocklen {}",
                    raid.name,
                    bdev.block_size()
                ),
            );
        }
        match r {
            Ok(()) => {
                b.desc = Some(desc.clone());
                b.hot_removed = false;
                b.configure_cb = cb;
                if st.block_size == 0 {
                    st.block_size = bdev.block_size();
                }
                st.required_alignment = st.required_alignment.max(bdev.params().required_alignment);
                Ok(())
            }
            Err(e) => {
                let d = free_base_resource(&mut st, slot);
                drop(st);
                drop(d);
                Err(e)
            }
        }
    };
    checked?;
    if existing {
        configure_base_cont(raid, slot);
    } else {
        let r = raid.clone();
        read_superblock(&desc, move |res| configure_base_check_sb(&r, slot, res));
    }
    Ok(())
}

fn configure_base_check_sb(
    raid: &Arc<Raid>,
    slot: usize,
    res: std::result::Result<Superblock, SbError>,
) {
    let (raid_uuid, cb, bdev) = {
        let mut st = raid.lock();
        let uuid = st.uuid;
        let b = &mut st.bases[slot];
        let bdev = b.desc.as_ref().map(|d| d.bdev().clone());
        match &res {
            Ok(s) if s.uuid == uuid => (uuid, b.configure_cb.take(), bdev),
            Ok(_) | Err(SbError::Io(_)) => (uuid, b.configure_cb.take(), bdev),
            Err(SbError::None(_)) => (uuid, None, bdev),
        }
    };
    let error = match res {
        Ok(s) if s.uuid == raid_uuid => {
            // One of our own former members: go through the superblock path, which trusts the newest copy.
            let d = {
                let mut st = raid.lock();
                free_base_resource(&mut st, slot)
            };
            drop(d);
            match bdev {
                Some(b) => examine_sb(s, &b, cb),
                None => {
                    if let Some(cb) = cb {
                        cb(err(ErrorKind::NotFound, "base bdev went away"));
                    }
                }
            }
            return;
        }
        Ok(_) => RaidError::new(
            ErrorKind::Exists,
            format!(
                "Superblock of a different raid bdev found on bdev {}",
                bdev.as_ref().map(|b| b.name()).unwrap_or("?")
            ),
        ),
        Err(SbError::None(_)) => {
            configure_base_cont(raid, slot);
            return;
        }
        Err(SbError::Io(e)) => e,
    };
    log::error!("{error}");
    let d = {
        let mut st = raid.lock();
        free_base_resource(&mut st, slot)
    };
    drop(d);
    if let Some(cb) = cb {
        cb(Err(error));
    }
}

enum Next {
    Done,
    Configure,
    Rebuild,
    Fail(RaidError),
}

/// Marks the member configured; brings the array online when every expected member is there, or starts a
/// rebuild when the array was online already.
fn configure_base_cont(raid: &Arc<Raid>, slot: usize) {
    let (next, gone) = {
        let mut st = raid.lock();
        if st.bases[slot].hot_removed {
            let cb = st.bases[slot].configure_cb.take();
            let d = free_base_resource(&mut st, slot);
            drop(st);
            drop(d);
            if let Some(cb) = cb {
                cb(err(ErrorKind::NotFound, "base bdev was removed"));
            }
            return;
        }
        let mut next = Next::Done;
        if st.discovered == st.operational && !st.bases[slot].is_process_target {
            if st.state != RaidState::Online {
                next = Next::Fail(RaidError::new(
                    ErrorKind::Invalid,
                    format!("raid bdev {} is not online", raid.name),
                ));
            } else if st.process.is_some() {
                next = Next::Fail(RaidError::new(
                    ErrorKind::NotPermitted,
                    format!("raid bdev '{}' is in process", raid.name),
                ));
            } else {
                // A new member of an online array: it is the target of a rebuild.
                st.bases[slot].is_process_target = true;
            }
        }
        if let Next::Fail(_) = next {
            let d = free_base_resource(&mut st, slot);
            (next, d)
        } else {
            let b = &mut st.bases[slot];
            b.is_configured = true;
            b.gen = b.gen.wrapping_add(1);
            let target = b.is_process_target;
            st.discovered += 1;
            if st.discovered == st.operational {
                next = Next::Configure;
            } else if target {
                st.operational += 1;
                next = Next::Rebuild;
            }
            (next, None)
        }
    };
    drop(gone);
    match next {
        Next::Done => base_configured(raid, slot, Ok(())),
        Next::Fail(e) => {
            let cb = raid.lock().bases[slot].configure_cb.take();
            if let Some(cb) = cb {
                cb(Err(e));
            }
        }
        Next::Configure => {
            let r = raid.clone();
            let cb: Cb = Box::new(move |res| base_configured(&r, slot, res));
            if let Err(e) = configure_raid(raid, cb) {
                log::error!("Failed to configure raid bdev: {e}");
                base_configured(raid, slot, Err(e));
            }
        }
        Next::Rebuild => {
            let res = process::start_rebuild(raid, slot);
            if let Err(e) = &res {
                log::error!("Failed to start rebuild: {e}");
                let _ = remove_base_slot(raid, slot, None);
            }
            base_configured(raid, slot, res);
        }
    }
}

fn base_configured(raid: &Arc<Raid>, slot: usize, res: Result<()>) {
    let cb = raid.lock().bases[slot].configure_cb.take();
    if let Some(cb) = cb {
        cb(res);
    }
}

/// Computes the geometry of the array from its members (SPDK's per-level `start`).
fn start_layout(raid: &Raid, st: &mut State) -> Result<Layout> {
    let n = raid.num_base;
    let strip = st.strip_size as u64;
    let shift = if strip == 0 {
        0
    } else {
        strip.trailing_zeros()
    };
    let mut ranges = Vec::new();
    let num_blocks = match raid.level {
        Level::Raid1 => {
            let min = st
                .bases
                .iter()
                .map(|b| b.data_size)
                .filter(|s| *s > 0)
                .min()
                .unwrap_or(0);
            for b in &mut st.bases {
                b.data_size = min;
            }
            min
        }
        Level::Raid0 => {
            let min = st
                .bases
                .iter()
                .map(|b| b.data_size)
                .filter(|s| *s > 0)
                .min()
                .unwrap_or(0);
            let per = (min >> shift) << shift;
            for b in &mut st.bases {
                b.data_size = per;
            }
            per * n as u64
        }
        Level::Concat => {
            let mut total = 0;
            for b in &mut st.bases {
                let size = (b.data_size >> shift) << shift;
                b.data_size = size;
                ranges.push((total, total + size));
                total += size;
            }
            total
        }
    };
    if num_blocks == 0 {
        return err(
            ErrorKind::Invalid,
            format!("raid bdev {} would have no blocks", raid.name),
        );
    }
    Ok(Layout {
        level: raid.level,
        num_blocks,
        strip_shift: shift,
        strip_size: strip,
        num_base: n,
        ranges,
    })
}

/// Brings the array online: geometry, superblock (initialized or checked, then written), registration.
fn configure_raid(raid: &Arc<Raid>, cb: Cb) -> Result<()> {
    let write_sb = {
        let mut st = raid.lock();
        let bs = st.block_size;
        if bs == 0 {
            return err(ErrorKind::Invalid, "no block size known");
        }
        let strip = (st.strip_size_kb as u64 * 1024) / bs as u64;
        // The strip (in blocks) is a u32 in the superblock and the layout: a bigger one would wrap.
        let Ok(strip) = u32::try_from(strip) else {
            return err(
                ErrorKind::Invalid,
                format!("Strip size {} KiB is too large", st.strip_size_kb),
            );
        };
        st.strip_size = strip;
        if st.strip_size == 0 && raid.level != Level::Raid1 {
            return err(
                ErrorKind::Invalid,
                "Strip size cannot be smaller than the device block size",
            );
        }
        let layout = start_layout(raid, &mut st)?;
        st.num_blocks = layout.num_blocks;
        if st.superblock_enabled {
            match &st.sb {
                None => {
                    let sb = init_superblock(raid, &st);
                    st.sb = Some(sb);
                }
                Some(sb) => {
                    if sb.block_size != bs {
                        return err(
                            ErrorKind::Invalid,
                            "blocklen does not match value in superblock",
                        );
                    }
                    if sb.raid_size != layout.num_blocks {
                        return err(
                            ErrorKind::Invalid,
                            "blockcnt does not match value in superblock",
                        );
                    }
                }
            }
        }
        st.layout = Some(Arc::new(layout));
        st.configure_cb = Some(cb);
        st.superblock_enabled
    };
    if write_sb {
        let r = raid.clone();
        write_superblock(raid, move |res| match res {
            Ok(()) => configure_cont(&r),
            Err(e) => {
                log::error!("Failed to write raid bdev '{}' superblock: {e}", r.name);
                let cb = {
                    let mut st = r.lock();
                    st.layout = None;
                    st.configure_cb.take()
                };
                if let Some(cb) = cb {
                    cb(Err(e));
                }
            }
        });
    } else {
        configure_cont(raid);
    }
    Ok(())
}

fn init_superblock(raid: &Raid, st: &State) -> Superblock {
    Superblock {
        version_minor: sb::VERSION_MINOR,
        flags: 0,
        uuid: st.uuid,
        name: raid.name.clone(),
        raid_size: st.num_blocks,
        block_size: st.block_size,
        level: raid.level.sb_value(),
        strip_size: st.strip_size,
        state: 0,
        seq_number: 0,
        num_base_bdevs: raid.num_base as u8,
        base_bdevs: st
            .bases
            .iter()
            .enumerate()
            .map(|(i, b)| SbBase {
                uuid: b.uuid,
                data_offset: b.data_offset,
                data_size: b.data_size,
                state: BaseState::Configured,
                flags: 0,
                slot: i as u8,
            })
            .collect(),
    }
}

fn configure_cont(raid: &Arc<Raid>) {
    let params = {
        let st = raid.lock();
        let layout = st.layout.as_ref().expect("layout set");
        let mut p = BdevParams::new(&raid.name, st.block_size, layout.num_blocks);
        p.uuid = (!st.uuid.is_nil()).then_some(st.uuid);
        p.product_name = "Raid Volume".into();
        p.write_cache = false;
        p.required_alignment = st.required_alignment;
        if raid.level != Level::Raid1 && raid.num_base > 1 {
            p.optimal_io_boundary = st.strip_size;
        }
        p
    };
    let ops = RaidOps { raid: raid.clone() };
    // Registration runs examiners, which may open the new bdev: no lock is held here.
    let res = bdev::register(params, Box::new(ops));
    let cb = {
        let mut st = raid.lock();
        match &res {
            Ok(b) => {
                st.bdev = Some(b.clone());
                st.uuid = b.uuid();
                st.state = RaidState::Online;
                log::info!("raid bdev {} is online", raid.name);
            }
            Err(e) => {
                log::error!("Failed to register raid bdev '{}': {e}", raid.name);
                st.layout = None;
            }
        }
        st.configure_cb.take()
    };
    if let Some(cb) = cb {
        cb(res
            .map(|_| ())
            .map_err(|e| RaidError::wrap(e, format!("register {}", raid.name))));
    }
}

/// Releases the member of `slot`: forgets its name (and UUID unless configuring), closes its descriptor (which
/// the caller drops outside the lock).
pub(crate) fn free_base_resource(st: &mut State, slot: usize) -> Option<Arc<Desc>> {
    let configuring = st.state == RaidState::Configuring;
    let b = &mut st.bases[slot];
    b.name = None;
    if !configuring {
        b.uuid = Uuid::nil();
    }
    b.is_failed = false;
    b.data_offset = 0;
    b.detached = false;
    b.hot_removed = false;
    let d = b.desc.take()?;
    if b.is_configured {
        b.is_configured = false;
        b.is_process_target = false;
        st.discovered -= 1;
    }
    Some(d)
}

// ---------------------------------------------------------------------------------------------------------------
// Channels.

fn new_channel(raid: &Arc<Raid>) -> ChanHandle {
    let st = raid.lock();
    let layout = st.layout.clone().unwrap_or_else(|| {
        Arc::new(Layout {
            level: raid.level,
            num_blocks: 0,
            strip_shift: 0,
            strip_size: 0,
            num_base: raid.num_base,
            ranges: vec![(0, 0); raid.num_base],
        })
    });
    let bases = st
        .bases
        .iter()
        .map(|b| {
            let attached = b.attached();
            BaseCh {
                ch: if attached {
                    b.desc.as_ref().map(|d| d.channel())
                } else {
                    None
                },
                offset: b.data_offset,
                readable: attached && !b.is_process_target,
                gen: b.gen,
                outstanding: 0,
            }
        })
        .collect();
    RaidChan::create(Arc::downgrade(raid), layout, bases, st.quiesced)
}

struct RaidOps {
    raid: Arc<Raid>,
}

impl BdevOps for RaidOps {
    fn module_name(&self) -> &'static str {
        MODULE
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            IoType::Read | IoType::Write => true,
            IoType::Flush | IoType::Reset | IoType::Unmap | IoType::WriteZeroes => {
                let st = self.raid.lock();
                st.bases
                    .iter()
                    .filter_map(|b| b.desc.as_ref())
                    .all(|d| d.bdev().io_type_supported(t))
            }
            IoType::Compare | IoType::Abort | IoType::NvmeAdmin | IoType::NvmeIo | IoType::Copy => {
                false
            }
        }
    }

    fn create_channel(&self, _bdev: &Bdev) -> Box<dyn ModuleChannel> {
        let h = self.raid.chan_dev.get_channel();
        let chan = h.0.clone();
        let sink: std::rc::Rc<dyn bdev::IoSink> = chan.clone();
        Box::new(RaidModuleChannel { _h: h, chan, sink })
    }

    fn destruct(&self, _bdev: &Bdev) {
        let r = self.raid.clone();
        on_app(move || raid_destruct(&r));
    }

    fn dump_info(&self, _bdev: &Bdev, out: &mut Map<String, Value>) {
        out.insert("raid".into(), info_json(&self.raid, false));
    }

    fn write_config(&self, bdev: &Bdev) -> Option<Value> {
        let st = self.raid.lock();
        if st.superblock_enabled {
            // The configuration is in the superblocks.
            return None;
        }
        let mut p = Map::new();
        p.insert("name".into(), json!(bdev.name()));
        p.insert("uuid".into(), json!(bdev.uuid().to_string()));
        if st.strip_size_kb != 0 {
            p.insert("strip_size_kb".into(), json!(st.strip_size_kb));
        }
        p.insert("raid_level".into(), json!(self.raid.level.name()));
        let names: Vec<Value> = st
            .bases
            .iter()
            .enumerate()
            .map(|(i, b)| match &b.name {
                Some(n) => json!(n),
                None => json!(format!("removed_base_bdev_{i}")),
            })
            .collect();
        p.insert("base_bdevs".into(), Value::Array(names));
        Some(json!({"method": "bdev_raid_create", "params": Value::Object(p)}))
    }
}

/// The raid bdev is gone (every descriptor closed): release what it held.
fn raid_destruct(raid: &Arc<Raid>) {
    let descs = {
        let mut st = raid.lock();
        st.bdev = None;
        // The bdev is gone: whatever happens to members from now on happens to an array that is not serving.
        st.state = RaidState::Offline;
        let State {
            process,
            destruct_pending,
            ..
        } = &mut *st;
        if let Some(p) = process.as_mut() {
            // Stop the background process first; come back when it stopped.
            if !*destruct_pending {
                *destruct_pending = true;
                p.request_stop(libc::ECANCELED);
                let r = raid.clone();
                p.finish_actions.push(Box::new(move || raid_destruct(&r)));
            }
            return;
        }
        st.destruct_pending = false;
        let shutdown = !st.unregistering;
        let mut descs = Vec::new();
        for i in 0..st.bases.len() {
            if shutdown || st.bases[i].remove_scheduled {
                descs.extend(free_base_resource(&mut st, i));
            }
        }
        if shutdown {
            st.state = RaidState::Offline;
        }
        if st.discovered == 0 {
            drop(st);
            unlist(raid);
        }
        descs
    };
    drop(descs);
}

/// Takes the array offline: unregisters its bdev (`cb` runs once that finished).
fn deconfigure(raid: &Arc<Raid>, cb: Option<Cb>) {
    let bdev = {
        let mut st = raid.lock();
        if st.state != RaidState::Online {
            None
        } else {
            st.state = RaidState::Offline;
            st.unregistering = true;
            st.bdev.clone()
        }
    };
    match bdev {
        None => {
            if let Some(cb) = cb {
                cb(Ok(()));
            }
        }
        Some(b) => {
            log::info!("raid bdev {} is going offline", raid.name);
            let name = raid.name.clone();
            b.unregister(move |res| {
                if let Some(cb) = cb {
                    cb(res.map_err(|e| RaidError::wrap(e, format!("unregister {name}"))));
                }
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Member removal.

enum Removal {
    FreeNow(Option<Arc<Desc>>, bool, Option<Cb>),
    Deconfigure(Option<Cb>),
    Online,
}

/// Removes the member of `slot` (SPDK's `_raid_bdev_remove_base_bdev`).
pub(crate) fn remove_base_slot(raid: &Arc<Raid>, slot: usize, cb: Option<Cb>) -> Result<()> {
    let act = {
        let mut st = raid.lock();
        let b = &st.bases[slot];
        if b.remove_scheduled || !b.is_configured {
            return err(
                ErrorKind::NotFound,
                format!("base bdev in slot {slot} of {} is not removable", raid.name),
            );
        }
        st.bases[slot].remove_scheduled = true;
        if st.state != RaidState::Online {
            // Not registered (yet or any more): only the number of discovered members changes.
            let d = free_base_resource(&mut st, slot);
            st.bases[slot].remove_scheduled = false;
            let gone = st.discovered == 0 && st.state == RaidState::Offline;
            Removal::FreeNow(d, gone, cb)
        } else if raid.min_operational == raid.num_base {
            // This level does not survive losing a member.
            st.operational = st.operational.saturating_sub(1);
            Removal::Deconfigure(cb)
        } else {
            if let Some(cb) = cb {
                st.bases[slot].remove_cbs.push(cb);
            }
            Removal::Online
        }
    };
    match act {
        Removal::FreeNow(d, gone, cb) => {
            drop(d);
            if gone {
                unlist(raid);
            }
            if let Some(cb) = cb {
                cb(Ok(()));
            }
        }
        Removal::Deconfigure(cb) => deconfigure(raid, cb),
        Removal::Online => {
            let r = raid.clone();
            enqueue_op(raid, move |op| remove_online(r, slot, op));
        }
    }
    Ok(())
}

/// Removes a member from an online redundant array: stops a rebuild it matters to, holds I/O until in-flight
/// I/O drained, records the member as failed or missing in the superblock, closes it, lets I/O go again
/// (acknowledging the writes that waited for this), and takes the array offline if too few members remain.
fn remove_online(raid: Arc<Raid>, slot: usize, op: OpDone) {
    let wait_process = {
        let mut st = raid.lock();
        let min = raid.min_operational;
        let others = st
            .bases
            .iter()
            .filter(|b| b.is_configured && !b.remove_scheduled)
            .count();
        match st.process.as_mut() {
            Some(p) if p.target == slot || others <= min => {
                p.request_stop(libc::ENODEV);
                let r = raid.clone();
                p.finish_actions
                    .push(Box::new(move || remove_online_quiesce(r, slot, op)));
                None
            }
            _ => Some(op),
        }
    };
    if let Some(op) = wait_process {
        remove_online_quiesce(raid, slot, op);
    }
}

fn remove_online_quiesce(raid: Arc<Raid>, slot: usize, op: OpDone) {
    {
        let mut st = raid.lock();
        st.quiesced = true;
        st.bases[slot].detached = true;
    }
    let r = raid.clone();
    walk(
        &raid,
        move |ch| {
            let mut s = ch.st.borrow_mut();
            s.quiesced = true;
            s.detach(slot);
        },
        move || {
            let r2 = r.clone();
            wait_all(
                &r,
                Arc::new(|ch: &RaidChan| ch.st.borrow().active == 0),
                move || remove_online_sb(r2, slot, op),
            );
        },
    );
}

fn remove_online_sb(raid: Arc<Raid>, slot: usize, op: OpDone) {
    let write = {
        let mut st = raid.lock();
        let failed = st.bases[slot].is_failed;
        match st.sb.as_mut() {
            Some(sb) => {
                let mut changed = false;
                for e in &mut sb.base_bdevs {
                    if e.state == BaseState::Configured && e.slot as usize == slot {
                        e.state = if failed {
                            BaseState::Failed
                        } else {
                            BaseState::Missing
                        };
                        changed = true;
                    }
                }
                changed
            }
            None => false,
        }
    };
    if write {
        let r = raid.clone();
        write_superblock(&raid, move |res| {
            if let Err(e) = res {
                log::error!("Failed to write raid bdev '{}' superblock: {e}", r.name);
            }
            remove_online_release(r, slot, op);
        });
    } else {
        remove_online_release(raid, slot, op);
    }
}

fn remove_online_release(raid: Arc<Raid>, slot: usize, op: OpDone) {
    // The state is updated before the member is closed, so whoever waits for the member to go sees it.
    let (gen, desc, name, cbs, offline) = {
        let mut st = raid.lock();
        let gen = st.bases[slot].gen;
        let name = st.bases[slot].name.clone();
        // Freed meanwhile (the array was torn down): nothing left to count.
        let counted = st.bases[slot].is_configured;
        let d = free_base_resource(&mut st, slot);
        st.quiesced = false;
        st.bases[slot].remove_scheduled = false;
        if counted {
            st.operational = st.operational.saturating_sub(1);
        }
        let cbs = std::mem::take(&mut st.bases[slot].remove_cbs);
        (gen, d, name, cbs, st.operational < raid.min_operational)
    };
    log::info!(
        "base bdev {} removed from raid bdev {}",
        name.as_deref().unwrap_or("?"),
        raid.name
    );
    drop(desc);
    let r = raid.clone();
    walk(
        &raid,
        move |ch| {
            ch.st.borrow_mut().quiesced = false;
            ch.release_parked(slot, gen);
        },
        move || {
            if offline {
                // Not enough members left to serve.
                let cb: Cb = Box::new(move |res| {
                    for cb in cbs {
                        cb(res.clone());
                    }
                });
                deconfigure(&r, Some(cb));
            } else {
                for cb in cbs {
                    cb(Ok(()));
                }
            }
            drop(op);
        },
    );
}

/// A channel saw member `slot` (generation `gen`) fail I/O: remove it as failed, then acknowledge the writes
/// that waited for that.
pub(crate) fn fail_base(raid: &Arc<Raid>, slot: usize, gen: u32) {
    enum F {
        Release,
        Nothing,
        Remove,
    }
    let f = {
        let mut st = raid.lock();
        let b = &mut st.bases[slot];
        if b.gen != gen || !b.is_configured {
            F::Release
        } else if b.remove_scheduled || b.is_failed {
            // Its removal is under way and releases the waiting writes at its end.
            F::Nothing
        } else {
            b.is_failed = true;
            log::warn!(
                "Failing base bdev in slot {slot} ('{}') of raid bdev '{}'",
                b.name.as_deref().unwrap_or(""),
                raid.name
            );
            F::Remove
        }
    };
    let release = {
        let r = raid.clone();
        move || walk(&r, move |ch| ch.release_parked(slot, gen), || {})
    };
    match f {
        F::Release => release(),
        F::Nothing => {}
        F::Remove => {
            let r = raid.clone();
            let cb: Cb = Box::new(move |res| {
                if let Err(e) = res {
                    log::warn!("Failed to remove failed base bdev: {e}");
                    r.lock().bases[slot].is_failed = false;
                }
                release();
            });
            if let Err(e) = remove_base_slot(raid, slot, Some(cb)) {
                log::warn!("Failed to remove failed base bdev: {e}");
                raid.lock().bases[slot].is_failed = false;
                walk(raid, move |ch| ch.release_parked(slot, gen), || {});
            }
        }
    }
}

/// `bdev_raid_remove_base_bdev`: removes the member bdev `name` from its array.
pub fn remove_base_bdev(name: &str, done: impl FnOnce(Result<()>) + Send + 'static) -> Result<()> {
    let Some(b) = bdev::get(name) else {
        return err(ErrorKind::NotFound, format!("bdev {name} not found"));
    };
    let Some((raid, slot)) = find_base_by_bdev(&b) else {
        return err(
            ErrorKind::NotFound,
            format!("bdev to remove '{name}' not found"),
        );
    };
    remove_base_slot(&raid, slot, Some(Box::new(done)))
}

// ---------------------------------------------------------------------------------------------------------------
// Adding members.

/// `bdev_raid_add_base_bdev`: puts `base` into an empty slot of `raid_name`. On an online raid1 this starts a
/// rebuild onto it; `done` runs once it is configured (the rebuild continues in the background).
pub fn add_base_bdev(
    raid_name: &str,
    base: &str,
    done: impl FnOnce(Result<()>) + Send + 'static,
) -> Result<()> {
    let Some(raid) = find_by_name(raid_name) else {
        return err(
            ErrorKind::NotFound,
            format!("raid bdev {raid_name} is not found in config"),
        );
    };
    let slot = {
        let mut st = raid.lock();
        if st.process.is_some() {
            return err(
                ErrorKind::NotPermitted,
                format!("raid bdev '{raid_name}' is in process"),
            );
        }
        let mut slot = None;
        if st.state == RaidState::Configuring {
            if let Some(b) = bdev::get(base) {
                slot = st
                    .bases
                    .iter()
                    .position(|x| x.name.is_none() && x.uuid == b.uuid());
            }
        }
        if slot.is_none() || st.state == RaidState::Online {
            slot = st
                .bases
                .iter()
                .position(|x| x.name.is_none() && x.uuid.is_nil());
        }
        let Some(slot) = slot else {
            return err(
                ErrorKind::Invalid,
                format!(
                    "no empty slot found in raid bdev '{raid_name}' for new base bdev '{base}'"
                ),
            );
        };
        st.bases[slot].name = Some(base.to_string());
        slot
    };
    let res = configure_base(&raid, slot, false, Some(Box::new(done)));
    if let Err(e) = &res {
        let configuring = raid.lock().state == RaidState::Configuring;
        if e.kind != ErrorKind::NotFound || !configuring {
            log::error!("base bdev '{base}' configure failed: {e}");
            raid.lock().bases[slot].name = None;
        }
    }
    res
}

// ---------------------------------------------------------------------------------------------------------------
// Deletion.

/// `bdev_raid_delete`: deletes the array `name`; with `clear_sb` its superblocks are wiped first.
pub fn delete(
    name: &str,
    clear_sb: bool,
    done: impl FnOnce(Result<()>) + Send + 'static,
) -> Result<()> {
    let Some(raid) = find_by_name(name) else {
        return err(ErrorKind::NotFound, format!("raid bdev {name} not found"));
    };
    delete_raid(&raid, clear_sb, Some(Box::new(done)));
    Ok(())
}

pub(crate) fn delete_raid(raid: &Arc<Raid>, clear_sb: bool, cb: Option<Cb>) {
    {
        let mut st = raid.lock();
        if st.destroy_started {
            drop(st);
            if let Some(cb) = cb {
                cb(err(
                    ErrorKind::Already,
                    format!("destroying raid bdev {} is already started", raid.name),
                ));
            }
            return;
        }
        st.destroy_started = true;
    }
    let r = raid.clone();
    enqueue_op(raid, move |op| {
        let waiting = {
            let mut st = r.lock();
            match st.process.as_mut() {
                Some(p) => {
                    p.request_stop(libc::ECANCELED);
                    let r2 = r.clone();
                    p.finish_actions
                        .push(Box::new(move || delete_cont(r2, clear_sb, cb, op)));
                    None
                }
                None => Some((cb, op)),
            }
        };
        if let Some((cb, op)) = waiting {
            delete_cont(r, clear_sb, cb, op);
        }
    });
}

fn delete_cont(raid: Arc<Raid>, clear_sb: bool, cb: Option<Cb>, op: OpDone) {
    let has_sb = raid.lock().sb.is_some();
    if has_sb && clear_sb {
        let r = raid.clone();
        clear_superblock(&raid, move |res| {
            if let Err(e) = res {
                log::error!("Failed to clear raid bdev '{}' superblock: {e}", r.name);
            }
            delete_final(r, cb, op);
        });
    } else {
        delete_final(raid, cb, op);
    }
}

fn delete_final(raid: Arc<Raid>, cb: Option<Cb>, op: OpDone) {
    let (descs, gone) = {
        let mut st = raid.lock();
        let online = st.state == RaidState::Online;
        let mut descs = Vec::new();
        for i in 0..st.bases.len() {
            st.bases[i].remove_scheduled = true;
            if !online {
                descs.extend(free_base_resource(&mut st, i));
            }
        }
        (descs, st.discovered == 0)
    };
    drop(descs);
    if gone {
        unlist(&raid);
        log::info!("raid bdev {} deleted", raid.name);
        if let Some(cb) = cb {
            cb(Ok(()));
        }
    } else {
        deconfigure(&raid, cb);
    }
    drop(op);
}

/// Deletes a configuring array at once (examine found a newer superblock for it).
fn delete_configuring_now(raid: &Arc<Raid>) {
    let descs = {
        let mut st = raid.lock();
        st.destroy_started = true;
        let mut d = Vec::new();
        for i in 0..st.bases.len() {
            d.extend(free_base_resource(&mut st, i));
        }
        d
    };
    unlist(raid);
    drop(descs);
}

// ---------------------------------------------------------------------------------------------------------------
// Superblock I/O.

/// Why a superblock could not be loaded.
pub(crate) enum SbError {
    /// None there (or corrupt): SPDK's -EINVAL.
    None(String),
    /// Reading failed.
    Io(RaidError),
}

/// Reads and decodes the superblock at block 0 of `desc`'s bdev (app thread).
pub(crate) fn read_superblock(
    desc: &Desc,
    done: impl FnOnce(std::result::Result<Superblock, SbError>) + 'static,
) {
    let b = desc.bdev();
    let bs = b.block_size() as u64;
    let blocks = (sb::MAX_LENGTH as u64).div_ceil(bs).min(b.num_blocks());
    let buf = match DmaBuf::alloc((blocks * bs) as usize) {
        Ok(buf) => buf,
        Err(e) => {
            return done(Err(SbError::Io(RaidError::new(
                ErrorKind::NoMemory,
                e.to_string(),
            ))))
        }
    };
    let name = b.name().to_string();
    let ch = desc.channel();
    // Shared so a refused submission can still answer.
    let done = std::rc::Rc::new(std::cell::RefCell::new(Some(done)));
    let d2 = done.clone();
    let res = ch.read(
        buf,
        0,
        blocks,
        Completion::Closure(Box::new(move |mut io| {
            let Some(done) = d2.borrow_mut().take() else {
                return;
            };
            if !io.success() {
                return done(Err(SbError::Io(RaidError::new(
                    ErrorKind::Io(libc::EIO),
                    format!("Failed to read bdev {name} superblock"),
                ))));
            }
            let buf = io.take_buf().expect("read buffer");
            done(match Superblock::decode(buf.as_slice()) {
                Ok(s) => Ok(s),
                Err(DecodeError::Invalid(m)) => Err(SbError::None(m)),
                Err(DecodeError::NeedMore(n)) => Err(SbError::None(format!(
                    "superblock length {n} beyond what was read"
                ))),
            })
        })),
        0,
    );
    if let Err(e) = res {
        log::error!("Failed to read superblock: {e}");
        let d = done.borrow_mut().take();
        if let Some(d) = d {
            d(Err(SbError::Io(RaidError::wrap(e, "superblock read"))));
        }
    }
}

/// Writes `data` (padded to the block size) at block 0 of every configured member, then `done` with the last
/// error.
fn write_block0(raid: &Arc<Raid>, data: Vec<u8>, done: impl FnOnce(Result<()>) + Send + 'static) {
    let targets: Vec<(Arc<Desc>, String)> = {
        let st = raid.lock();
        st.bases
            .iter()
            .filter(|b| b.is_configured && !b.remove_scheduled)
            .filter_map(|b| {
                b.desc
                    .clone()
                    .map(|d| (d, b.name.clone().unwrap_or_default()))
            })
            .collect()
    };
    if targets.is_empty() {
        return done(Ok(()));
    }
    struct Ctx {
        remaining: usize,
        status: Result<()>,
        done: Option<Cb>,
    }
    let ctx = Arc::new(Mutex::new(Ctx {
        remaining: targets.len(),
        status: Ok(()),
        done: Some(Box::new(done)),
    }));
    let finish = move |ctx: &Arc<Mutex<Ctx>>, res: Result<()>| {
        let fin = {
            let mut c = reactor::lock(ctx);
            if res.is_err() {
                c.status = res;
            }
            c.remaining -= 1;
            (c.remaining == 0).then(|| (c.status.clone(), c.done.take()))
        };
        if let Some((s, Some(d))) = fin {
            d(s);
        }
    };
    for (desc, name) in targets {
        let bs = desc.bdev().block_size() as usize;
        let len = data.len().div_ceil(bs) * bs;
        let mut buf = match DmaBuf::alloc(len) {
            Ok(b) => b,
            Err(e) => {
                finish(&ctx, err(ErrorKind::NoMemory, e.to_string()));
                continue;
            }
        };
        buf.as_mut_slice().fill(0);
        buf.as_mut_slice()[..data.len()].copy_from_slice(&data);
        let c = ctx.clone();
        let ch = desc.channel();
        let res = ch.write(
            buf,
            0,
            (len / bs) as u64,
            Completion::Closure(Box::new(move |io| {
                let r = if io.success() {
                    Ok(())
                } else {
                    log::error!("Failed to save superblock on bdev {name}");
                    err(
                        ErrorKind::Io(libc::EIO),
                        format!("superblock write to {name} failed"),
                    )
                };
                finish(&c, r);
            })),
            0,
        );
        if let Err(e) = res {
            finish(&ctx, Err(RaidError::wrap(e, "superblock write")));
        }
    }
}

/// Bumps the sequence number and writes the superblock to every configured member.
pub(crate) fn write_superblock(raid: &Arc<Raid>, done: impl FnOnce(Result<()>) + Send + 'static) {
    let data = {
        let mut st = raid.lock();
        match st.sb.as_mut() {
            Some(sb) => {
                sb.seq_number += 1;
                sb.encode()
            }
            None => return done(err(ErrorKind::Invalid, "no superblock")),
        }
    };
    write_block0(raid, data, done);
}

fn clear_superblock(raid: &Arc<Raid>, done: impl FnOnce(Result<()>) + Send + 'static) {
    let len = match raid.lock().sb.as_ref() {
        Some(sb) => sb.length(),
        None => return done(Ok(())),
    };
    write_block0(raid, vec![0u8; len], done);
}

// ---------------------------------------------------------------------------------------------------------------
// Examine.

/// The examine callback: looks for a superblock on every new bdev, else claims it for a configuring array that
/// names it.
pub(crate) fn examine_new_bdev(bdev: &Bdev) {
    let b = bdev.clone();
    // `bdev_wait_for_examine` waits until this examine (superblock read, assembly) is over.
    let guard = bdev::ExamineGuard::new();
    on_app(move || examine(b, guard));
}

fn examine(bdev: Bdev, guard: bdev::ExamineGuard) {
    if find_base_by_bdev(&bdev).is_some() {
        return;
    }
    load_sb_of(&bdev, move |b, res| match res {
        Ok(s) => {
            log::debug!("raid superblock found on bdev {}", b.name());
            let name = b.name().to_string();
            examine_sb(
                s,
                &b,
                Some(Box::new(move |res| {
                    drop(guard);
                    match res {
                        // Configured meanwhile, by the examine of another member of its array.
                        Err(e) if e.kind == ErrorKind::Exists => {
                            log::debug!("examine of bdev {name}: {e}")
                        }
                        Err(e) => log::error!("Failed to examine bdev {name}: {e}"),
                        Ok(()) => {}
                    }
                })),
            );
        }
        Err(SbError::None(_)) => {
            examine_no_sb(&b);
            drop(guard);
        }
        Err(SbError::Io(e)) => log::error!("Failed to examine bdev {}: {e}", b.name()),
    });
}

/// Opens `bdev` read-only just to read its superblock.
fn load_sb_of(
    bdev: &Bdev,
    done: impl FnOnce(Bdev, std::result::Result<Superblock, SbError>) + 'static,
) {
    let desc = match bdev.open(false, None) {
        Ok(d) => d,
        Err(e) => {
            log::debug!("examine: cannot open {}: {e}", bdev.name());
            return done(
                bdev.clone(),
                Err(SbError::Io(RaidError::wrap(e, "examine"))),
            );
        }
    };
    let b = bdev.clone();
    let d = Arc::new(desc);
    let keep = d.clone();
    read_superblock(&d, move |res| {
        drop(keep);
        done(b, res);
    });
}

fn examine_no_sb(bdev: &Bdev) {
    for raid in raids() {
        let slot = {
            let st = raid.lock();
            if st.state != RaidState::Configuring || st.sb.is_some() {
                continue;
            }
            st.bases.iter().position(|b| {
                b.desc.is_none()
                    && (b.name.as_deref() == Some(bdev.name()) || b.uuid == bdev.uuid())
            })
        };
        if let Some(slot) = slot {
            if let Err(e) = configure_base(&raid, slot, true, None) {
                log::error!(
                    "Failed to configure bdev {} as base bdev of raid {}: {e}",
                    bdev.name(),
                    raid.name
                );
            }
            break;
        }
    }
}

fn create_from_sb(s: &Superblock) -> Result<Arc<Raid>> {
    let Some(level) = Level::from_sb(s.level) else {
        return err(
            ErrorKind::Invalid,
            format!("Unsupported raid level {} in superblock", s.level),
        );
    };
    let raid = new_raid(
        &s.name,
        ((s.strip_size as u64 * s.block_size as u64) / 1024) as u32,
        s.num_base_bdevs as usize,
        level,
        true,
        s.uuid,
    )?;
    {
        let mut st = raid.lock();
        st.sb = Some(s.clone());
        for e in &s.base_bdevs {
            let Some(b) = st.bases.get_mut(e.slot as usize) else {
                continue;
            };
            let configured = e.state == BaseState::Configured;
            if configured {
                b.uuid = e.uuid;
            }
            b.data_offset = e.data_offset;
            b.data_size = e.data_size;
            if configured {
                st.operational += 1;
            }
        }
    }
    Ok(raid)
}

/// A superblock was found on `bdev`: join (or create) the array it describes, unless a newer superblock of the
/// array says otherwise.
fn examine_sb(s: Superblock, bdev: &Bdev, cb: Option<Cb>) {
    let fail = |cb: Option<Cb>, e: RaidError| match cb {
        Some(cb) => cb(Err(e)),
        None => log::error!("{e}"),
    };
    if s.block_size != bdev.block_size() {
        return fail(
            cb,
            RaidError::new(
                ErrorKind::Invalid,
                format!(
                    "Bdev {} block size ({}) does not match the value in superblock ({})",
                    bdev.name(),
                    bdev.block_size(),
                    s.block_size
                ),
            ),
        );
    }
    if s.uuid.is_nil() {
        return fail(
            cb,
            RaidError::new(
                ErrorKind::Invalid,
                format!("NULL raid bdev UUID in superblock on bdev {}", bdev.name()),
            ),
        );
    }
    let mut s = s;
    let mut raid = find_by_uuid(&s.uuid);
    if let Some(r) = raid.clone() {
        let (rsb, state) = {
            let st = r.lock();
            (st.sb.clone(), st.state)
        };
        let Some(rsb) = rsb else {
            return fail(
                cb,
                RaidError::new(ErrorKind::Invalid, "raid superblock is null"),
            );
        };
        if s.seq_number > rsb.seq_number {
            if state != RaidState::Configuring {
                return fail(
                    cb,
                    RaidError::new(
                        ErrorKind::Busy,
                        format!(
                            "Newer version of raid bdev {} superblock found on bdev {} but raid bdev is not in configuring state.",
                            r.name,
                            bdev.name()
                        ),
                    ),
                );
            }
            // Rebuild the array from the newer superblock.
            delete_configuring_now(&r);
            raid = None;
        } else if s.seq_number < rsb.seq_number {
            s = rsb;
        }
    }
    let Some(entry) = s.base_bdevs.iter().find(|e| e.uuid == bdev.uuid()).cloned() else {
        return fail(
            cb,
            RaidError::new(
                ErrorKind::Invalid,
                format!(
                    "raid superblock does not contain bdev {}'s uuid",
                    bdev.name()
                ),
            ),
        );
    };
    let mut cb = cb;
    let raid = match raid {
        Some(r) => r,
        None => {
            let r = match create_from_sb(&s) {
                Ok(r) => r,
                Err(e) => {
                    return fail(
                        cb,
                        RaidError::new(
                            e.kind,
                            format!("Failed to create raid bdev {}: {e}", s.name),
                        ),
                    )
                }
            };
            // Once this member is configured, look for the others among existing bdevs.
            let uuid = s.uuid;
            let inner = cb.take();
            cb = Some(Box::new(move |res| examine_others(uuid, 0, res, inner)));
            r
        }
    };
    let slot = {
        let mut st = raid.lock();
        if st.state == RaidState::Online {
            let slot = entry.slot as usize;
            if slot >= st.bases.len() || st.bases[slot].is_configured {
                drop(st);
                return fail(
                    cb,
                    RaidError::new(
                        ErrorKind::Exists,
                        format!(
                            "Bdev {} is already configured in {}",
                            bdev.name(),
                            raid.name
                        ),
                    ),
                );
            }
            st.bases[slot].uuid = entry.uuid;
            log::info!("Re-adding bdev {} to raid bdev {}.", bdev.name(), raid.name);
            slot
        } else {
            if entry.state != BaseState::Configured {
                drop(st);
                return fail(
                    cb,
                    RaidError::new(
                        ErrorKind::Invalid,
                        format!(
                            "Bdev {} is not an active member of raid bdev {}. Ignoring.",
                            bdev.name(),
                            raid.name
                        ),
                    ),
                );
            }
            let Some(slot) = st.bases.iter().position(|b| b.uuid == bdev.uuid()) else {
                drop(st);
                return fail(
                    cb,
                    RaidError::new(
                        ErrorKind::Invalid,
                        format!(
                            "Bdev {} is not a member of raid bdev {}",
                            bdev.name(),
                            raid.name
                        ),
                    ),
                );
            };
            if st.bases[slot].is_configured {
                drop(st);
                return fail(
                    cb,
                    RaidError::new(
                        ErrorKind::Exists,
                        format!("bdev {} already configured", bdev.name()),
                    ),
                );
            }
            slot
        }
    };
    // configure_base takes the callback only when it succeeds.
    let cb_slot: Arc<Mutex<Option<Cb>>> = Arc::new(Mutex::new(cb));
    let c2 = cb_slot.clone();
    let wrapped: Cb = Box::new(move |res| {
        let cb = reactor::lock(&c2).take();
        if let Some(cb) = cb {
            cb(res);
        }
    });
    if let Err(e) = configure_base(&raid, slot, true, Some(wrapped)) {
        log::error!(
            "Failed to configure bdev {} as base bdev of raid {}: {e}",
            bdev.name(),
            raid.name
        );
        let cb = reactor::lock(&cb_slot).take();
        if let Some(cb) = cb {
            cb(Err(e));
        }
    }
}

/// After a superblock created an array: examine the other members that already exist.
fn examine_others(uuid: Uuid, from: usize, status: Result<()>, cb: Option<Cb>) {
    let finish = |cb: Option<Cb>, r: Result<()>| {
        if let Some(cb) = cb {
            cb(r);
        }
    };
    if let Err(e) = &status {
        if e.kind != ErrorKind::Exists {
            return finish(cb, status);
        }
    }
    let Some(raid) = find_by_uuid(&uuid) else {
        return finish(cb, err(ErrorKind::NotFound, "raid bdev vanished"));
    };
    let candidates: Vec<(usize, Uuid)> = {
        let st = raid.lock();
        st.bases
            .iter()
            .enumerate()
            .skip(from)
            .filter(|(_, b)| !b.is_configured && !b.uuid.is_nil() && b.desc.is_none())
            .map(|(i, b)| (i, b.uuid))
            .collect()
    };
    for (i, u) in candidates {
        let Some(b) = bdev::get(&u.to_string()) else {
            continue;
        };
        if find_base_by_bdev(&b).is_some() {
            continue;
        }
        load_sb_of(&b, move |b, res| match res {
            Ok(s) => examine_sb(
                s,
                &b,
                Some(Box::new(move |res| examine_others(uuid, i + 1, res, cb))),
            ),
            Err(SbError::None(m)) => examine_others(uuid, i + 1, err(ErrorKind::Invalid, m), cb),
            Err(SbError::Io(e)) => examine_others(uuid, i + 1, Err(e), cb),
        });
        return;
    }
    finish(cb, status);
}

// ---------------------------------------------------------------------------------------------------------------
// Reporting.

/// The fields `bdev_raid_get_bdevs` shows for an array (and, without `name`, `driver_specific.raid`).
pub(crate) fn info_json(raid: &Raid, with_name: bool) -> Value {
    let st = raid.lock();
    let mut m = Map::new();
    if with_name {
        m.insert("name".into(), json!(raid.name));
    }
    m.insert("uuid".into(), json!(st.uuid.to_string()));
    m.insert("strip_size_kb".into(), json!(st.strip_size_kb));
    m.insert("state".into(), json!(st.state.name()));
    m.insert("raid_level".into(), json!(raid.level.name()));
    m.insert("superblock".into(), json!(st.superblock_enabled));
    m.insert("num_base_bdevs".into(), json!(raid.num_base));
    m.insert("num_base_bdevs_discovered".into(), json!(st.discovered));
    m.insert("num_base_bdevs_operational".into(), json!(st.operational));
    if let Some(p) = &st.process {
        let total = st.num_blocks.max(1);
        let percent = (p.offset as f64 * 100.0 / total as f64) as u32;
        m.insert(
            "process".into(),
            json!({
                "type": "rebuild",
                "target": st.bases[p.target].name.clone(),
                "progress": {"blocks": p.offset, "percent": percent},
            }),
        );
    }
    let list: Vec<Value> = st
        .bases
        .iter()
        .map(|b| {
            json!({
                "name": b.name,
                "uuid": b.uuid.to_string(),
                "is_configured": b.is_configured,
                "data_offset": b.data_offset,
                "data_size": b.data_size,
            })
        })
        .collect();
    m.insert("base_bdevs_list".into(), Value::Array(list));
    Value::Object(m)
}

/// `bdev_raid_get_bdevs`: the arrays in `category` (`all`, `online`, `configuring`, `offline`).
pub fn get_bdevs(category: Option<RaidState>) -> Vec<Value> {
    raids()
        .iter()
        .filter(|r| category.is_none_or(|c| r.lock().state == c))
        .map(|r| info_json(r, true))
        .collect()
}

/// One array's `bdev_raid_get_bdevs` entry.
pub fn info(name: &str) -> Option<Value> {
    find_by_name(name).map(|r| info_json(&r, true))
}

// ---------------------------------------------------------------------------------------------------------------
// Options.

/// `bdev_raid_set_options`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaidOptions {
    /// Size of the window a rebuild copies at a time, in KiB.
    pub process_window_size_kb: u32,
    /// Rebuild bandwidth limit in MiB/s (0 = none).
    pub process_max_bandwidth_mb_sec: u32,
}

impl Default for RaidOptions {
    fn default() -> Self {
        RaidOptions {
            process_window_size_kb: 1024,
            process_max_bandwidth_mb_sec: 0,
        }
    }
}

static OPTIONS: Mutex<Option<(RaidOptions, bool)>> = Mutex::new(None);

/// Current options, and whether the bandwidth limit was ever set (SPDK v24.05 did not have it, so its
/// `save_config` only shows it when set).
pub fn options() -> (RaidOptions, bool) {
    reactor::lock(&OPTIONS).unwrap_or_default()
}

/// Sets options for rebuilds started from now on.
pub fn set_options(o: RaidOptions, bandwidth_set: bool) -> Result<()> {
    if o.process_window_size_kb == 0 {
        return err(ErrorKind::Invalid, "process_window_size_kb must not be 0");
    }
    let mut g = reactor::lock(&OPTIONS);
    let was_set = g.map(|x| x.1).unwrap_or(false);
    *g = Some((o, was_set || bandwidth_set));
    Ok(())
}
