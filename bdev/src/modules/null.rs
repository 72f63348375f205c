//! `null`: discards writes and returns whatever the read buffer held (SPDK's `bdev_null_create`).

use serde_json::{json, Value};
use uuid::Uuid;

use crate::{
    register, Bdev, BdevError, BdevOps, BdevParams, ErrorKind, IoHandle, IoStatus, IoType,
    ModuleChannel, Result,
};

mod rpc;
pub(crate) use rpc::register_rpcs;

/// Module name.
pub const MODULE: &str = "null";

/// `bdev_null_create` options.
#[derive(Clone, Debug, Default)]
pub struct NullOpts {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: Option<Uuid>,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Block size.
    pub block_size: u32,
    /// Physical block size (0 = block size).
    pub physical_block_size: u32,
}

struct Null {
    opts: NullOpts,
}

/// Creates a null bdev.
pub fn create(mut opts: NullOpts) -> Result<Bdev> {
    if opts.name.is_empty() {
        return Err(BdevError::new(
            ErrorKind::Invalid,
            "null bdev name is required",
        ));
    }
    if opts.block_size == 0 || !opts.block_size.is_multiple_of(512) {
        return Err(BdevError::new(
            ErrorKind::Invalid,
            format!(
                "Data block size {} is not a multiple of 512",
                opts.block_size
            ),
        ));
    }
    if opts.num_blocks == 0 {
        return Err(BdevError::new(
            ErrorKind::Invalid,
            "Disk must be more than 0 blocks",
        ));
    }
    // A size past 2^64 bytes wraps wherever bytes are computed from blocks (I/O offsets, bdev_get_bdevs).
    if opts
        .num_blocks
        .checked_mul(opts.block_size as u64)
        .is_none()
    {
        return Err(BdevError::new(
            ErrorKind::Invalid,
            format!(
                "null bdev of {} blocks of {} bytes is larger than 2^64 bytes",
                opts.num_blocks, opts.block_size
            ),
        ));
    }
    if opts.physical_block_size == 0 {
        opts.physical_block_size = opts.block_size;
    }
    let mut p = BdevParams::new(&opts.name, opts.block_size, opts.num_blocks);
    p.uuid = opts.uuid;
    p.product_name = "Null disk".into();
    p.physical_block_size = opts.physical_block_size;
    register(p, Box::new(Null { opts }))
}

/// Resizes a null bdev to `new_size_mib` MiB (`bdev_null_resize`).
pub fn resize(name: &str, new_size_mib: u64) -> Result<()> {
    let bdev = crate::get(name)
        .filter(|b| b.module_name() == MODULE)
        .ok_or_else(|| {
            BdevError::new(ErrorKind::NotFound, format!("null bdev {name} not found"))
        })?;
    let blocks = new_size_mib
        .checked_mul(1024 * 1024)
        .map(|b| b / bdev.block_size() as u64)
        .filter(|b| *b > 0)
        .ok_or_else(|| {
            BdevError::new(
                ErrorKind::Invalid,
                format!("invalid new size {new_size_mib} MiB"),
            )
        })?;
    if blocks < bdev.num_blocks() {
        return Err(BdevError::new(
            ErrorKind::Invalid,
            "Cannot shrink a null bdev",
        ));
    }
    bdev.notify_resize(blocks)
}

impl BdevOps for Null {
    fn module_name(&self) -> &'static str {
        MODULE
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(
            t,
            IoType::Read | IoType::Write | IoType::WriteZeroes | IoType::Reset | IoType::Abort
        )
    }

    fn create_channel(&self, _bdev: &Bdev) -> Box<dyn ModuleChannel> {
        Box::new(NullChannel)
    }

    fn write_config(&self, bdev: &Bdev) -> Option<Value> {
        Some(json!({
            "method": "bdev_null_create",
            "params": {
                "name": bdev.name(),
                "uuid": bdev.uuid().to_string(),
                "num_blocks": bdev.num_blocks(),
                "block_size": bdev.block_size(),
                "physical_block_size": self.opts.physical_block_size,
                "md_size": 0,
                "dif_type": 0,
                "dif_is_head_of_md": false
            }
        }))
    }
}

struct NullChannel;

impl ModuleChannel for NullChannel {
    fn submit(&mut self, io: IoHandle) {
        let status = match io.io_type() {
            // Every I/O completes within its submission: none is ever left to abort.
            IoType::Abort => IoStatus::Failed(libc::ENOENT),
            _ => IoStatus::Success,
        };
        io.complete(status);
    }
}
