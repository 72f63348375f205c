//! The lvol bdev module (SPDK's `vbdev_lvol`): lvstores on base bdevs, each lvol a bdev named by its UUID
//! with the alias `lvs_name/lvol_name`, found again by examine when the base appears, never written to
//! `save_config` (the disk is the configuration), unloaded when the base goes away.
//!
//! Everything here runs on the app thread, which is the metadata thread of every lvstore; examine callbacks
//! and bdev events from other threads are forwarded there by message.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use bdev::{Bdev, BdevEvent, Desc, ExamineGuard};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::blob::{BlobHandle, CreateOptions};
use crate::blob_bdev::{self, BlobBdevOpts};
use crate::error::{Error, ErrorKind, Result};
use crate::exec::spawn;
use crate::format::{BlobId, ClearMethod, SuperBlock, BSTYPE_LVOLSTORE, PAGE_SIZE};
use crate::layout::InitClear;
use crate::lvol::{c_string, parse_uuid, LVOL_NAME_MAX, LVS_NAME_MAX};
use crate::map::{External, ExternalDev};
use crate::runtime::Blobstore;
use crate::store::LoadOptions;

/// Module name.
pub const MODULE: &str = "lvol";

/// One lvstore and its lvols.
pub(crate) struct Lvs {
    pub(crate) name: RefCell<String>,
    pub(crate) uuid: Uuid,
    pub(crate) bs: Blobstore,
    /// Name of the base bdev.
    pub(crate) base: String,
    pub(crate) lvols: RefCell<Vec<Rc<Lvol>>>,
    pub(crate) removing: std::cell::Cell<bool>,
}

/// One lvol.
pub(crate) struct Lvol {
    pub(crate) name: RefCell<String>,
    /// The uuid string, or `<lvs uuid>_<blob id>` without one (SPDK's `unique_id`): the bdev's name.
    pub(crate) unique_id: String,
    pub(crate) uuid: Option<Uuid>,
    pub(crate) blob: BlobId,
    pub(crate) handle: RefCell<Option<BlobHandle>>,
    pub(crate) bdev: RefCell<Option<Bdev>>,
}

thread_local! {
    static LVSTORES: RefCell<Vec<Rc<Lvs>>> = const { RefCell::new(Vec::new()) };
}

/// The lvstores, in creation / load order (app thread).
pub(crate) fn lvstores() -> Vec<Rc<Lvs>> {
    LVSTORES.with(|l| l.borrow().clone())
}

fn add_lvs(l: Rc<Lvs>) {
    LVSTORES.with(|v| v.borrow_mut().push(l));
}

fn remove_lvs(l: &Rc<Lvs>) {
    LVSTORES.with(|v| v.borrow_mut().retain(|x| !Rc::ptr_eq(x, l)));
}

/// The lvstore called `name`.
pub(crate) fn lvs_by_name(name: &str) -> Option<Rc<Lvs>> {
    lvstores().into_iter().find(|l| *l.name.borrow() == name)
}

/// The lvstore with uuid `uuid`.
pub(crate) fn lvs_by_uuid(uuid: &str) -> Option<Rc<Lvs>> {
    let u: Uuid = uuid.parse().ok()?;
    lvstores().into_iter().find(|l| l.uuid == u)
}

/// The lvol a bdev name, alias, uuid or `lvs/lvol` names, with its store.
pub(crate) fn find_lvol(name: &str) -> Option<(Rc<Lvs>, Rc<Lvol>)> {
    let bdev_name = bdev::get(name)
        .filter(|b| b.module_name() == MODULE)
        .map(|b| b.name().to_string());
    for lvs in lvstores() {
        for l in lvs.lvols.borrow().iter() {
            let alias = format!("{}/{}", lvs.name.borrow(), l.name.borrow());
            if Some(&l.unique_id) == bdev_name.as_ref() || l.unique_id == name || alias == name {
                return Some((lvs.clone(), l.clone()));
            }
        }
    }
    None
}

/// Runs `f` on the app thread (now when already there).
fn on_app(f: impl FnOnce() + Send + 'static) {
    match reactor::app_thread() {
        Some(t) if !t.is_current() => t.send(f),
        _ => f(),
    }
}

/// The base's event callback: a removed base takes its lvstore down (its lvol bdevs unregistered, the
/// blobstore unloaded cleanly, the base released).
fn base_events(base: String) -> bdev::EventCb {
    Arc::new(move |ev, _b: &Bdev| {
        if ev == BdevEvent::Remove {
            let base = base.clone();
            on_app(move || {
                let lvs = lvstores().into_iter().find(|l| l.base == base);
                if let Some(lvs) = lvs {
                    spawn(async move {
                        if let Err(e) = unload(&lvs).await {
                            log::error!("lvstore {}: unloading: {e}", lvs.name.borrow());
                        }
                    });
                }
            });
        }
    })
}

/// `driver_specific.lvol` of an lvol bdev, as SPDK's `vbdev_lvol_dump_info_json` writes it.
fn dump_info(bdev: &Bdev, out: &mut Map<String, Value>) {
    let Some((lvs, l)) = find_lvol(bdev.name()) else {
        return;
    };
    let h = l.handle.borrow();
    let Some(h) = h.as_ref() else { return };
    let mut m = Map::new();
    m.insert("lvol_store_uuid".into(), json!(lvs.uuid.to_string()));
    m.insert("base_bdev".into(), json!(lvs.base));
    m.insert("thin_provision".into(), json!(h.is_thin()));
    m.insert(
        "num_allocated_clusters".into(),
        json!(h.num_allocated_clusters()),
    );
    let clones = lvs.bs.clones_of(l.blob);
    m.insert("snapshot".into(), json!(!clones.is_empty()));
    let parent = h.parent();
    m.insert("clone".into(), json!(parent.is_some()));
    let name_of = |id: BlobId| {
        lvs.lvols
            .borrow()
            .iter()
            .find(|x| x.blob == id)
            .map(|x| x.name.borrow().clone())
    };
    if let Some(p) = parent.and_then(name_of) {
        m.insert("base_snapshot".into(), json!(p));
    }
    if !clones.is_empty() {
        let names: Vec<String> = clones.into_iter().filter_map(name_of).collect();
        m.insert("clones".into(), json!(names));
    }
    let external = h.external_id();
    m.insert("esnap_clone".into(), json!(external.is_some()));
    if let Some(name) = external.as_deref().and_then(external_name) {
        m.insert("external_snapshot_name".into(), json!(name));
    }
    out.insert("lvol".into(), Value::Object(m));
}

/// An external snapshot id as SPDK prints it: a NUL-terminated string (`external_snapshot_name`).
pub(crate) fn external_name(id: &[u8]) -> Option<String> {
    let (last, s) = id.split_last()?;
    (*last == 0 && !s.contains(&0))
        .then(|| std::str::from_utf8(s).ok().map(str::to_string))
        .flatten()
}

/// Gives the external snapshots of `lvs`'s esnap clones whose bdev is registered their device (opened
/// read-only; its removal makes the clones degraded again). Returns whether any was attached.
fn resolve_externals(lvs: &Lvs) -> bool {
    let mut any = false;
    for x in lvs.bs.externals() {
        if x.dev().is_some() {
            continue;
        }
        let Some(u) = x.uuid() else { continue };
        let Some(b) = bdev::list().into_iter().find(|b| b.uuid() == u) else {
            continue;
        };
        if b.block_size() as u64 != lvs.bs.io_unit_size() {
            log::error!(
                "lvstore {}: external snapshot {}: block size {} is not the lvstore's {}",
                lvs.name.borrow(),
                b.name(),
                b.block_size(),
                lvs.bs.io_unit_size()
            );
            continue;
        }
        let weak = Arc::downgrade(&x);
        let events: bdev::EventCb = Arc::new(move |ev, _b: &Bdev| {
            if ev == BdevEvent::Remove {
                let weak = weak.clone();
                on_app(move || {
                    if let Some(x) = weak.upgrade() {
                        spawn(async move { external_gone(&x).await });
                    }
                });
            }
        });
        match bdev::open(b.name(), false, Some(events)) {
            Ok(desc) => {
                let num_blocks = b.num_blocks();
                x.set_dev(Some(Arc::new(ExternalDev { desc, num_blocks })));
                any = true;
            }
            Err(e) => log::error!(
                "lvstore {}: external snapshot {}: {e}",
                lvs.name.borrow(),
                b.name()
            ),
        }
    }
    any
}

/// An external snapshot's bdev is going: the lvols that read it lose their bdevs (degraded, as SPDK) and
/// the device is let go, so that the bdev can go.
async fn external_gone(x: &Arc<External>) {
    for lvs in lvstores() {
        let lvols = lvs.lvols.borrow().clone();
        for l in lvols {
            let uses = l.handle.borrow().as_ref().is_some_and(|h| {
                h.shared()
                    .map()
                    .external()
                    .is_some_and(|e| Arc::ptr_eq(e, x))
            });
            if uses {
                log::warn!("lvol {}: external snapshot removed: degraded", l.unique_id);
                hide(&l).await;
            }
        }
    }
    x.set_dev(None);
    // The lvols stay listed (degraded), their blobs open, as SPDK keeps them (not in a store going away).
    for lvs in lvstores().into_iter().filter(|l| !l.removing.get()) {
        let lvols = lvs.lvols.borrow().clone();
        for l in lvols {
            if l.handle.borrow().is_none() {
                if let Err(e) = expose(&lvs, &l).await {
                    log::error!("lvol {}: {e}", l.unique_id);
                }
            }
        }
    }
}

/// A bdev appeared: esnap clones waiting for it (degraded) get it, and their bdevs.
fn external_appeared(name: &str) {
    let Some(b) = bdev::get(name) else { return };
    let u = b.uuid();
    for lvs in lvstores().into_iter().filter(|l| !l.removing.get()) {
        let waits = lvs
            .bs
            .externals()
            .iter()
            .any(|x| x.dev().is_none() && x.uuid() == Some(u));
        if waits && resolve_externals(&lvs) {
            spawn(async move {
                let lvols = lvs.lvols.borrow().clone();
                for l in lvols {
                    if l.bdev.borrow().is_none() {
                        if l.handle.borrow().is_some() {
                            // Open but degraded: the bdev only.
                            l.handle.borrow_mut().take();
                        }
                        if let Err(e) = expose(&lvs, &l).await {
                            log::error!("lvol {}: {e}", l.unique_id);
                        }
                    }
                }
            });
        }
    }
}

/// An lvol bdev went (unregistered, every descriptor closed): its blob is closed (nothing is left unsynced:
/// resizes and allocations persist as they happen).
fn lvol_destructed(bdev: &Bdev) {
    let name = bdev.name().to_string();
    on_app(move || {
        for lvs in lvstores() {
            for l in lvs.lvols.borrow().iter() {
                if l.unique_id == name {
                    l.bdev.borrow_mut().take();
                    l.handle.borrow_mut().take();
                }
            }
        }
    });
}

/// Opens lvol `l`'s blob and registers its bdev (name: the unique id; alias: `lvs/lvol`).
async fn expose(lvs: &Lvs, l: &Lvol) -> Result<()> {
    let h = lvs.bs.open_blob(l.blob).await?;
    if h.is_degraded() {
        // As SPDK: listed (is_degraded), no bdev until its external snapshot appears.
        log::warn!("lvol {}: external snapshot missing: degraded", l.unique_id);
        *l.handle.borrow_mut() = Some(h);
        return Ok(());
    }
    let opts = BlobBdevOpts {
        module: MODULE,
        product_name: "Logical Volume".into(),
        uuid: l.uuid,
        dump_info: Some(dump_info),
        on_destruct: Some(lvol_destructed),
    };
    let b = match blob_bdev::register(&h, &l.unique_id, opts) {
        Ok(b) => b,
        Err(e) => {
            drop(h);
            return Err(e);
        }
    };
    let alias = format!("{}/{}", lvs.name.borrow(), l.name.borrow());
    if let Err(e) = b.add_alias(&alias) {
        log::error!("lvol {}: alias {alias}: {e}", l.unique_id);
    }
    *l.handle.borrow_mut() = Some(h);
    *l.bdev.borrow_mut() = Some(b);
    Ok(())
}

/// Unregisters lvol `l`'s bdev and waits until it is gone (its blob closed).
async fn hide(l: &Lvol) {
    let b = l.bdev.borrow().clone();
    if let Some(b) = b {
        let (tx, rx) = crate::exec::oneshot::<()>();
        let tx = reactor::OnThread::new(tx);
        b.unregister(move |_| tx.with(|tx| tx.send(())));
        rx.await;
    }
    l.bdev.borrow_mut().take();
    l.handle.borrow_mut().take();
}

fn lvol_from_blob(lvs_uuid: &Uuid, h: &BlobHandle) -> Result<Lvol> {
    let name = match h.xattr("name") {
        Some(v) if v.len() <= LVOL_NAME_MAX => c_string(&v, LVOL_NAME_MAX),
        _ => {
            return Err(Error::corrupt(format!(
                "lvol blob {}: missing or too long name",
                h.id()
            )))
        }
    };
    let uuid = parse_uuid(h.xattr("uuid").as_deref());
    let unique_id = match uuid {
        Some(u) => u.hyphenated().to_string(),
        None => format!("{}_{}", lvs_uuid.hyphenated(), h.id().0),
    };
    Ok(Lvol {
        name: RefCell::new(name),
        unique_id,
        uuid,
        blob: h.id(),
        handle: RefCell::new(None),
        bdev: RefCell::new(None),
    })
}

/// Examine: a new bdev whose super block says "LVOLSTORE" is claimed and its lvstore loaded, its lvols
/// exposed as bdevs (SPDK's `vbdev_lvs_examine`).
pub(crate) fn examine(bdev: &Bdev) {
    let name = bdev.name().to_string();
    if bdev.module_name() == MODULE || bdev.block_size() as usize > PAGE_SIZE {
        // Not a base, but maybe an external snapshot that esnap clones wait for.
        on_app(move || external_appeared(&name));
        return;
    }
    let guard = ExamineGuard::new();
    on_app(move || {
        external_appeared(&name);
        spawn(async move {
            if let Err(e) = examine_async(&name).await {
                log::info!("lvol: {name}: {e}");
            }
            drop(guard);
        })
    });
}

async fn examine_async(name: &str) -> Result<()> {
    if lvstores().iter().any(|l| l.base == name) {
        return Ok(());
    }
    let mut desc = bdev::open(name, false, Some(base_events(name.to_string())))
        .map_err(|e| Error::new(ErrorKind::NoEntry, e.to_string()))?;
    let page0 = crate::base::Base::new(desc.channel())
        .read(0, PAGE_SIZE)
        .await?;
    match SuperBlock::decode(page0.as_slice()) {
        Ok(sb) if sb.bstype == BSTYPE_LVOLSTORE => {}
        _ => return Ok(()),
    }
    desc.claim(MODULE)
        .map_err(|e| Error::new(ErrorKind::Busy, e.to_string()))?;
    let bs = Blobstore::load(
        desc,
        &LoadOptions {
            bstype: BSTYPE_LVOLSTORE,
            ..Default::default()
        },
    )
    .await?;
    attach(bs, name).await.map(|_| ())
}

/// Registers a loaded lvstore: name and uuid from the super blob, every other blob an lvol bdev.
async fn attach(bs: Blobstore, base: &str) -> Result<Rc<Lvs>> {
    let sup = bs
        .super_blob()
        .ok_or_else(|| Error::new(ErrorKind::NoEntry, "lvstore without a super blob"))?;
    let h = bs.open_blob(sup).await?;
    let uuid = parse_uuid(h.xattr("uuid").as_deref())
        .ok_or_else(|| Error::corrupt("lvstore super blob: missing or bad uuid"))?;
    let name = match h.xattr("name") {
        Some(v) if v.len() <= LVS_NAME_MAX => c_string(&v, LVS_NAME_MAX),
        _ => {
            return Err(Error::corrupt(
                "lvstore super blob: missing or too long name",
            ))
        }
    };
    drop(h);
    if lvs_by_name(&name).is_some() {
        let _ = bs.unload().await;
        return Err(Error::new(
            ErrorKind::Exists,
            format!("an lvstore named {name} is loaded already"),
        ));
    }
    let lvs = Rc::new(Lvs {
        name: RefCell::new(name),
        uuid,
        bs: bs.clone(),
        base: base.to_string(),
        lvols: RefCell::new(Vec::new()),
        removing: std::cell::Cell::new(false),
    });
    for id in bs.blob_ids().into_iter().filter(|&id| id != sup) {
        let h = match bs.open_blob(id).await {
            Ok(h) => h,
            Err(e) => {
                log::error!("lvstore {}: blob {id}: {e}", lvs.name.borrow());
                continue;
            }
        };
        let l = lvol_from_blob(&uuid, &h);
        drop(h);
        match l {
            Ok(l) => lvs.lvols.borrow_mut().push(Rc::new(l)),
            Err(e) => log::error!("lvstore {}: {e}", lvs.name.borrow()),
        }
    }
    add_lvs(lvs.clone());
    resolve_externals(&lvs);
    let lvols = lvs.lvols.borrow().clone();
    for l in lvols {
        if let Err(e) = expose(&lvs, &l).await {
            log::error!("lvol {}: {e}", l.unique_id);
        }
    }
    Ok(lvs)
}

/// `bdev_lvol_create_lvstore`.
pub(crate) async fn create_lvstore(
    base: &str,
    name: &str,
    cluster_sz: u32,
    clear: InitClear,
    ratio: u32,
) -> Result<Uuid> {
    if name.is_empty() || name.len() >= LVS_NAME_MAX {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("name must be between 1 and {} characters", LVS_NAME_MAX - 1),
        ));
    }
    if lvs_by_name(name).is_some() {
        return Err(Error::new(
            ErrorKind::Exists,
            format!("lvolstore with name {name} already exists"),
        ));
    }
    // SPDK's answers: no such bdev is -ENODEV, a bdev another module claimed (an NVMe-oF namespace, a raid
    // member) -EPERM.
    let mut desc: Desc =
        bdev::open(base, true, Some(base_events(base.to_string()))).map_err(|e| {
            let kind = if e.kind == ErrorKind::Claimed {
                ErrorKind::NotPermitted
            } else {
                ErrorKind::NotFound
            };
            Error::new(kind, e.to_string())
        })?;
    desc.claim(MODULE)
        .map_err(|e| Error::new(ErrorKind::NotPermitted, e.to_string()))?;
    let uuid = Uuid::new_v4();
    let cluster = if cluster_sz == 0 {
        crate::layout::LVS_DEFAULT_CLUSTER_SIZE
    } else {
        cluster_sz
    };
    let ratio = if ratio == 0 {
        crate::layout::LVS_DEFAULT_MD_PAGES_RATIO
    } else {
        ratio
    };
    let bs = Blobstore::init_lvstore(desc, name, uuid, cluster, ratio, clear).await?;
    add_lvs(Rc::new(Lvs {
        name: RefCell::new(name.to_string()),
        uuid,
        bs,
        base: base.to_string(),
        lvols: RefCell::new(Vec::new()),
        removing: std::cell::Cell::new(false),
    }));
    Ok(uuid)
}

/// `bdev_lvol_create`: returns the new lvol bdev's name (its uuid).
pub(crate) async fn create_lvol(
    lvs: &Rc<Lvs>,
    name: &str,
    size_bytes: u64,
    thin: bool,
    clear: ClearMethod,
) -> Result<String> {
    check_lvol_name(lvs, name)?;
    let uuid = Uuid::new_v4();
    let id = lvs
        .bs
        .create_blob(CreateOptions {
            num_clusters: size_bytes.div_ceil(lvs.bs.cluster_size()),
            thin,
            xattrs: crate::lvol::lvol_xattrs(name, &uuid),
            clear_method: clear,
            use_extent_table: true,
        })
        .await?;
    add_lvol(lvs, id, name, uuid).await
}

fn check_lvol_name(lvs: &Lvs, name: &str) -> Result<()> {
    if name.is_empty() || name.len() >= LVOL_NAME_MAX {
        return Err(Error::new(ErrorKind::Invalid, "invalid lvol name"));
    }
    if lvs.lvols.borrow().iter().any(|l| *l.name.borrow() == name) {
        return Err(Error::new(
            ErrorKind::Exists,
            format!("lvol with name {name} already exists"),
        ));
    }
    Ok(())
}

/// A NUL-terminated string value, as SPDK stores names after a rename.
fn c_value(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// `bdev_lvol_resize` (`spdk_lvol_resize` + the bdev's new size).
pub(crate) async fn resize_lvol(lvs: &Lvs, l: &Lvol, size_bytes: u64) -> Result<()> {
    let n = size_bytes.div_ceil(lvs.bs.cluster_size());
    let cb = lvs.bs.cluster_size() / lvs.bs.io_unit_size();
    let h = l.handle.borrow_mut().take().ok_or_else(|| {
        Error::new(
            ErrorKind::NoEntry,
            format!("lvol {} is not open", l.unique_id),
        )
    })?;
    let r = h.resize(n).await;
    *l.handle.borrow_mut() = Some(h);
    r?;
    if let Some(b) = l.bdev.borrow().as_ref() {
        b.notify_resize(n * cb)
            .map_err(|e| Error::new(ErrorKind::Busy, e.to_string()))?;
    }
    Ok(())
}

/// `bdev_lvol_set_read_only`.
pub(crate) async fn set_read_only(l: &Lvol) -> Result<()> {
    let h = l.handle.borrow_mut().take().ok_or_else(|| {
        Error::new(
            ErrorKind::NoEntry,
            format!("lvol {} is not open", l.unique_id),
        )
    })?;
    let r = match h.set_read_only() {
        Ok(()) => h.sync().await,
        Err(e) => Err(e),
    };
    *l.handle.borrow_mut() = Some(h);
    r
}

/// `bdev_lvol_rename`: the name xattr (`strlen + 1` bytes) and the alias.
pub(crate) async fn rename_lvol(lvs: &Lvs, l: &Lvol, new_name: &str) -> Result<()> {
    if *l.name.borrow() == new_name {
        return Ok(());
    }
    check_lvol_name(lvs, new_name)?;
    let h = l.handle.borrow_mut().take().ok_or_else(|| {
        Error::new(
            ErrorKind::NoEntry,
            format!("lvol {} is not open", l.unique_id),
        )
    })?;
    let r = match h.set_xattr("name", &c_value(new_name)) {
        Ok(()) => h.sync().await,
        Err(e) => Err(e),
    };
    *l.handle.borrow_mut() = Some(h);
    r?;
    let old = std::mem::replace(&mut *l.name.borrow_mut(), new_name.to_string());
    if let Some(b) = l.bdev.borrow().as_ref() {
        let lvs_name = lvs.name.borrow().clone();
        let _ = b.remove_alias(&format!("{lvs_name}/{old}"));
        if let Err(e) = b.add_alias(&format!("{lvs_name}/{new_name}")) {
            log::error!("lvol {}: {e}", l.unique_id);
        }
    }
    Ok(())
}

/// `bdev_lvol_rename_lvstore`: the super blob's name xattr, and every lvol's alias.
pub(crate) async fn rename_lvstore(lvs: &Lvs, new_name: &str) -> Result<()> {
    if *lvs.name.borrow() == new_name {
        return Ok(());
    }
    if new_name.is_empty() || new_name.len() >= LVS_NAME_MAX {
        return Err(Error::new(ErrorKind::Invalid, "invalid lvstore name"));
    }
    if lvs_by_name(new_name).is_some() {
        return Err(Error::new(
            ErrorKind::Exists,
            format!("lvolstore with name {new_name} already exists"),
        ));
    }
    let sup = lvs
        .bs
        .super_blob()
        .ok_or_else(|| Error::new(ErrorKind::NoEntry, "lvstore without a super blob"))?;
    let h = lvs.bs.open_blob(sup).await?;
    h.set_xattr("name", &c_value(new_name))?;
    h.close().await?;
    let old = std::mem::replace(&mut *lvs.name.borrow_mut(), new_name.to_string());
    for l in lvs.lvols.borrow().iter() {
        if let Some(b) = l.bdev.borrow().as_ref() {
            let _ = b.remove_alias(&format!("{old}/{}", l.name.borrow()));
            if let Err(e) = b.add_alias(&format!("{new_name}/{}", l.name.borrow())) {
                log::error!("lvol {}: {e}", l.unique_id);
            }
        }
    }
    Ok(())
}

/// `bdev_lvol_clone`: a thin clone of a read-only lvol; returns the clone's bdev name.
pub(crate) async fn clone_lvol(lvs: &Rc<Lvs>, snap: &Lvol, name: &str) -> Result<String> {
    check_lvol_name(lvs, name)?;
    let uuid = Uuid::new_v4();
    let id = lvs
        .bs
        .create_clone(snap.blob, crate::lvol::lvol_xattrs(name, &uuid))
        .await?;
    add_lvol(lvs, id, name, uuid).await
}

/// Runs `f` while writes to lvol `l`'s bdev are held off: an LBA range lock over the whole bdev, which waits
/// for every I/O in flight and holds new writes (SPDK's blob freeze, which does not wait). Reads go on.
async fn with_writes_held<T>(l: &Lvol, f: impl std::future::Future<Output = T>) -> T {
    let b = l.bdev.borrow().clone();
    match b {
        Some(b) => blob_bdev::with_range_locked(&b, 0, b.num_blocks(), f).await,
        None => f.await,
    }
}

/// A new lvol of `lvs` for blob `id` (named `name`, `uuid`), with its bdev.
async fn add_lvol(lvs: &Rc<Lvs>, id: BlobId, name: &str, uuid: Uuid) -> Result<String> {
    let l = Rc::new(Lvol {
        name: RefCell::new(name.to_string()),
        unique_id: uuid.hyphenated().to_string(),
        uuid: Some(uuid),
        blob: id,
        handle: RefCell::new(None),
        bdev: RefCell::new(None),
    });
    lvs.lvols.borrow_mut().push(l.clone());
    expose(lvs, &l).await?;
    Ok(l.unique_id.clone())
}

/// `bdev_lvol_snapshot`: a read-only snapshot of lvol `origin`, which becomes its thin clone; returns the
/// snapshot's bdev name. Writes to the origin wait while the snapshot is taken.
pub(crate) async fn snapshot_lvol(lvs: &Rc<Lvs>, origin: &Lvol, name: &str) -> Result<String> {
    check_lvol_name(lvs, name)?;
    let uuid = Uuid::new_v4();
    let xattrs = crate::lvol::lvol_xattrs(name, &uuid);
    let id = with_writes_held(origin, lvs.bs.create_snapshot(origin.blob, xattrs)).await?;
    add_lvol(lvs, id, name, uuid).await
}

/// A shallow copy's progress (`bdev_lvol_check_shallow_copy`).
struct CopyStatus {
    id: u32,
    copied: std::cell::Cell<u64>,
    total: u64,
    /// The errno it ended with (0: none, or still running).
    result: std::cell::Cell<i32>,
}

thread_local! {
    static COPIES: RefCell<Vec<Rc<CopyStatus>>> = const { RefCell::new(Vec::new()) };
    static LAST_COPY: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// `bdev_lvol_start_shallow_copy`: `dst` is opened and claimed (ENODEV / EPERM, as SPDK), the copy goes on
/// in the background; returns the operation id.
pub(crate) fn start_shallow_copy(lvs: &Lvs, l: &Lvol, dst: &str) -> std::result::Result<u32, i32> {
    let mut desc = bdev::open(dst, true, None).map_err(|_| libc::ENODEV)?;
    desc.claim(MODULE).map_err(|_| libc::EPERM)?;
    let total = l
        .handle
        .borrow()
        .as_ref()
        .map_or(0, |h| h.num_allocated_clusters());
    let id = LAST_COPY.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    let st = Rc::new(CopyStatus {
        id,
        copied: std::cell::Cell::new(0),
        total,
        result: std::cell::Cell::new(0),
    });
    COPIES.with(|c| c.borrow_mut().push(st.clone()));
    let (bs, blob) = (lvs.bs.clone(), l.blob);
    spawn(async move {
        let base = crate::base::Base::new(desc.channel());
        let progress = st.clone();
        let r = bs
            .shallow_copy(blob, &base, move |n| progress.copied.set(n))
            .await;
        if let Err(e) = r {
            log::error!("shallow copy of blob {blob} to {}: {e}", desc.bdev().name());
            st.result.set(-e.errno());
        }
        drop(base);
        desc.release_claim();
    });
    Ok(id)
}

/// `bdev_lvol_check_shallow_copy`: the operation's state as SPDK reports it (an operation that ended is
/// forgotten once reported); None for an unknown id.
pub(crate) fn check_shallow_copy(id: u32) -> Option<Value> {
    let st = COPIES.with(|c| c.borrow().iter().find(|s| s.id == id).cloned())?;
    let (copied, total, result) = (st.copied.get(), st.total, st.result.get());
    let mut v = json!({"copied_clusters": copied, "total_clusters": total});
    let state = match (result, copied.cmp(&total)) {
        (0, std::cmp::Ordering::Less) => "in progress",
        (0, std::cmp::Ordering::Equal) => "complete",
        _ => "error",
    };
    v["state"] = json!(state);
    if state == "error" {
        v["error"] = json!(jsonrpc::strerror(-result));
    }
    if state != "in progress" {
        COPIES.with(|c| c.borrow_mut().retain(|s| s.id != id));
    }
    Some(v)
}

/// `bdev_lvol_inflate` (`all`) and `bdev_lvol_decouple_parent`.
pub(crate) async fn inflate_lvol(lvs: &Lvs, l: &Lvol, all: bool) -> Result<()> {
    if all {
        lvs.bs.inflate(l.blob).await
    } else {
        lvs.bs.decouple_parent(l.blob).await
    }
}

/// `bdev_lvol_clone_bdev`: an esnap clone of bdev `esnap` (read-only, its size a whole number of clusters);
/// returns the clone's bdev name.
pub(crate) async fn clone_bdev(lvs: &Rc<Lvs>, esnap: &str, name: &str) -> Result<String> {
    let desc = bdev::open(esnap, false, None)
        .map_err(|e| Error::new(ErrorKind::NoEntry, e.to_string()))?;
    let b = desc.bdev().clone();
    let size = b.num_blocks() * b.block_size() as u64;
    if !size.is_multiple_of(lvs.bs.cluster_size()) {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "bdev {esnap}: size {size} is not a multiple of the cluster size {}",
                lvs.bs.cluster_size()
            ),
        ));
    }
    if b.block_size() as u64 != lvs.bs.io_unit_size() {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("bdev {esnap}: its block size is not the lvstore's"),
        ));
    }
    check_lvol_name(lvs, name)?;
    drop(desc);
    // SPDK's id: the bdev's uuid, lower case, NUL-terminated.
    let mut id = b.uuid().hyphenated().to_string().into_bytes();
    id.push(0);
    let x = Arc::new(External::new(id));
    let uuid = Uuid::new_v4();
    let blob = lvs
        .bs
        .create_esnap_clone(
            x,
            CreateOptions {
                num_clusters: size / lvs.bs.cluster_size(),
                xattrs: crate::lvol::lvol_xattrs(name, &uuid),
                ..Default::default()
            },
        )
        .await?;
    resolve_externals(lvs);
    add_lvol(lvs, blob, name, uuid).await
}

/// `bdev_lvol_delete`: the bdev goes, then the blob. A snapshot with one clone is folded into it (writes
/// to the clone held meanwhile); with more clones it cannot go (EPERM, as SPDK).
pub(crate) async fn delete_lvol(lvs: &Rc<Lvs>, l: &Rc<Lvol>) -> Result<()> {
    let clones = lvs.bs.clones_of(l.blob);
    if clones.len() > 1 {
        return Err(Error::new(
            ErrorKind::NotPermitted,
            format!(
                "lvol {} is a snapshot with {} clones",
                l.name.borrow(),
                clones.len()
            ),
        ));
    }
    hide(l).await;
    let clone = clones
        .first()
        .and_then(|&c| lvs.lvols.borrow().iter().find(|x| x.blob == c).cloned());
    match clone {
        Some(c) => with_writes_held(&c, lvs.bs.delete_blob(l.blob)).await?,
        None => lvs.bs.delete_blob(l.blob).await?,
    }
    lvs.lvols.borrow_mut().retain(|x| !Rc::ptr_eq(x, l));
    Ok(())
}

/// Takes an lvstore down cleanly (base removed, or shutdown): its lvol bdevs, then an unload.
pub(crate) async fn unload(lvs: &Rc<Lvs>) -> Result<()> {
    if lvs.removing.replace(true) {
        return Ok(());
    }
    let lvols = lvs.lvols.borrow().clone();
    for l in &lvols {
        hide(l).await;
    }
    remove_lvs(lvs);
    lvs.bs.unload().await
}

/// `bdev_lvol_delete_lvstore`: every lvol deleted (clones before their snapshots), then the store destroyed.
pub(crate) async fn destroy(lvs: &Rc<Lvs>) -> Result<()> {
    if lvs.removing.replace(true) {
        return Err(Error::new(ErrorKind::Busy, "lvstore is being removed"));
    }
    let res = async {
        loop {
            let lvols = lvs.lvols.borrow().clone();
            if lvols.is_empty() {
                break;
            }
            let leaf = lvols
                .iter()
                .find(|l| lvs.bs.clones_of(l.blob).is_empty())
                .cloned()
                .ok_or_else(|| Error::new(ErrorKind::Busy, "clone cycle"))?;
            delete_lvol(lvs, &leaf).await?;
        }
        if let Some(sup) = lvs.bs.super_blob() {
            lvs.bs.delete_blob(sup).await?;
        }
        lvs.bs.destroy().await
    }
    .await;
    match res {
        Ok(()) => {
            remove_lvs(lvs);
            Ok(())
        }
        Err(e) => {
            lvs.removing.set(false);
            Err(e)
        }
    }
}

/// The module, for the application to register ([`bdev::register_module`]).
pub fn module() -> Arc<dyn bdev::BdevModule> {
    Arc::new(LvolModule)
}

struct LvolModule;

static EXAMINER: std::sync::Once = std::sync::Once::new();

/// Registers the examine callback (once).
pub fn init() {
    EXAMINER.call_once(|| bdev::register_examiner(MODULE, Arc::new(examine)));
}

impl bdev::BdevModule for LvolModule {
    fn name(&self) -> &'static str {
        MODULE
    }
    fn register_rpcs(&self, reg: &mut jsonrpc::Registry) {
        init();
        crate::lvs_rpc::register_rpcs(reg);
    }
    fn examines(&self) -> bool {
        true
    }
}
