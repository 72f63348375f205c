//! A bdev over an open blob: the blob's blocks, served by [`BlobChannel`]s. The lvol module builds its bdevs
//! on this (adding names, aliases and RPCs); tests use it to drive blob I/O through the ordinary bdev API.

use std::sync::Arc;

use bdev::{Bdev, BdevOps, BdevParams, Desc, IoHandle, IoType, ModuleChannel};
use uuid::Uuid;

use crate::blob::BlobHandle;
use crate::error::{Error, ErrorKind, Result};
use crate::io::BlobChannel;
use crate::map::BlobShared;

/// Module name of plain blob bdevs.
pub const MODULE: &str = "blob";

/// The bdev side of a blob.
struct BlobBdev {
    module: &'static str,
    shared: Arc<BlobShared>,
    desc: Arc<Desc>,
}

impl BdevOps for BlobBdev {
    fn module_name(&self) -> &'static str {
        self.module
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

/// Registers bdev `name` over the open blob `blob`, `module` being the module name it reports. Its size is
/// the blob's; after a resize the caller tells the bdev layer ([`Bdev::notify_resize`]). The blob must stay
/// open until the bdev is unregistered.
pub fn register(
    blob: &BlobHandle,
    name: &str,
    uuid: Option<Uuid>,
    module: &'static str,
) -> Result<Bdev> {
    let store = blob.store();
    let desc = store
        .base_desc()
        .ok_or_else(|| Error::new(ErrorKind::NotFound, "blobstore is unloaded"))?;
    let shared = blob.shared();
    let bs = store.io_unit_size();
    let mut p = BdevParams::new(
        name,
        bs as u32,
        (blob.num_clusters() * shared.cluster_blocks).max(1),
    );
    p.uuid = uuid;
    p.product_name = "Logical Volume".into();
    let base = desc.bdev().params();
    p.required_alignment = base.required_alignment;
    p.physical_block_size = base.physical_block_size;
    bdev::register(
        p,
        Box::new(BlobBdev {
            module,
            shared,
            desc,
        }),
    )
    .map_err(|e| Error::new(ErrorKind::Invalid, format!("registering bdev {name}: {e}")))
}
