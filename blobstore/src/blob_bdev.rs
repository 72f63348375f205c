//! A bdev over an open blob: the blob's blocks, served by [`BlobChannel`]s. The lvol module builds its bdevs
//! on this (adding names, aliases and RPCs); tests use it to drive blob I/O through the ordinary bdev API.

use std::sync::Arc;

use bdev::{Bdev, BdevOps, BdevParams, Desc, IoHandle, IoType, ModuleChannel};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::blob::BlobHandle;
use crate::error::{Error, ErrorKind, Result};
use crate::io::BlobChannel;
use crate::map::BlobShared;

/// Module name of plain blob bdevs.
pub const MODULE: &str = "blob";

/// Fills a bdev's `driver_specific` object (`bdev_get_bdevs`).
pub type DumpInfo = fn(&Bdev, &mut Map<String, Value>);

/// How a bdev over a blob presents itself.
#[derive(Clone)]
pub struct BlobBdevOpts {
    /// Module name (claims, `bdev_get_bdevs`).
    pub module: &'static str,
    /// Product name.
    pub product_name: String,
    /// UUID of the bdev (random when `None`).
    pub uuid: Option<Uuid>,
    /// Fills `driver_specific` in `bdev_get_bdevs`.
    pub dump_info: Option<DumpInfo>,
    /// Called once the bdev is unregistered and every descriptor closed (`destruct`), on whichever thread
    /// that happens.
    pub on_destruct: Option<fn(&Bdev)>,
}

impl Default for BlobBdevOpts {
    fn default() -> Self {
        BlobBdevOpts {
            module: MODULE,
            product_name: "Blob".into(),
            uuid: None,
            dump_info: None,
            on_destruct: None,
        }
    }
}

/// The bdev side of a blob.
struct BlobBdev {
    opts: BlobBdevOpts,
    shared: Arc<BlobShared>,
    desc: Arc<Desc>,
}

impl BdevOps for BlobBdev {
    fn module_name(&self) -> &'static str {
        self.opts.module
    }

    fn dump_info(&self, bdev: &Bdev, out: &mut Map<String, Value>) {
        if let Some(f) = self.opts.dump_info {
            f(bdev, out);
        }
    }

    fn destruct(&self, bdev: &Bdev) {
        self.shared.set_bdev_name(None);
        if let Some(f) = self.opts.on_destruct {
            f(bdev);
        }
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            IoType::Write | IoType::Unmap | IoType::WriteZeroes => !self.shared.read_only(),
            IoType::Read | IoType::Reset => true,
            _ => false,
        }
    }

    fn create_channel(&self, _bdev: &Bdev) -> Box<dyn ModuleChannel> {
        Box::new(BlobBdevChannel(BlobChannel::new(
            self.shared.clone(),
            self.desc.channel(),
        )))
    }
}

struct BlobBdevChannel(BlobChannel);

impl ModuleChannel for BlobBdevChannel {
    fn submit(&mut self, io: IoHandle) {
        self.0.submit(io);
    }
}

/// Registers bdev `name` over the open blob `blob`. Its size is the blob's; after a resize the caller tells
/// the bdev layer ([`Bdev::notify_resize`]). The blob must stay open until the bdev is unregistered.
pub fn register(blob: &BlobHandle, name: &str, opts: BlobBdevOpts) -> Result<Bdev> {
    let store = blob.store();
    let desc = store
        .base_desc()
        .ok_or_else(|| Error::new(ErrorKind::NoEntry, "blobstore is unloaded"))?;
    let shared = blob.shared();
    let bs = store.io_unit_size();
    let mut p = BdevParams::new(
        name,
        bs as u32,
        (blob.num_clusters() * shared.cluster_blocks).max(1),
    );
    p.uuid = opts.uuid;
    p.product_name = opts.product_name.clone();
    let base = desc.bdev().params();
    p.required_alignment = base.required_alignment;
    p.physical_block_size = base.physical_block_size;
    let b = bdev::register(
        p,
        Box::new(BlobBdev {
            opts,
            shared: shared.clone(),
            desc,
        }),
    )
    .map_err(|e| Error::new(ErrorKind::Exists, format!("registering bdev {name}: {e}")))?;
    shared.set_bdev_name(Some(name.to_string()));
    Ok(b)
}

/// Runs `f` while LBA range `offset`, `blocks` of `bdev` is locked: the lock's fence first waits for every I/O
/// of the bdev in flight, then writes to the range wait until `f` is done (reads go on).
pub(crate) async fn with_range_locked<T>(
    bdev: &Bdev,
    offset: u64,
    blocks: u64,
    f: impl std::future::Future<Output = T>,
) -> T {
    let (tx, rx) = crate::exec::oneshot::<u64>();
    let tx = reactor::OnThread::new(tx);
    bdev.lock_lba_range(offset, blocks, move |id| tx.with(move |tx| tx.send(id)));
    let id = rx.await;
    let out = f.await;
    if let Some(id) = id {
        let (tx, rx) = crate::exec::oneshot::<()>();
        let tx = reactor::OnThread::new(tx);
        bdev.unlock_lba_range(id, move || tx.with(|tx| tx.send(())));
        rx.await;
    }
    out
}
