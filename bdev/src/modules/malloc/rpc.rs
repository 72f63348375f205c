//! The malloc module's JSON-RPC methods: `bdev_malloc_create`, `bdev_malloc_delete`.

use jsonrpc::{Registry, STATE_RUNTIME};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{create, MallocOpts, MODULE};
use crate::modules::no_metadata;
use crate::rpc::{delete_reply, method, reply, NameOnly};

/// `bdev_malloc_create` params, SPDK's names and defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MallocCreate {
    name: Option<String>,
    uuid: Option<Uuid>,
    num_blocks: u64,
    block_size: u32,
    #[serde(default)]
    physical_block_size: u32,
    #[serde(default)]
    optimal_io_boundary: u32,
    #[serde(default)]
    md_size: u32,
    #[serde(default)]
    md_interleave: bool,
    #[serde(default)]
    dif_type: u32,
    #[serde(default)]
    dif_is_head_of_md: bool,
    #[serde(default)]
    dif_pi_format: u32,
    #[serde(default)]
    numa_id: Option<i32>,
}

/// Registers the malloc module's methods.
pub(crate) fn register_rpcs(reg: &mut Registry) {
    method(
        reg,
        "bdev_malloc_create",
        STATE_RUNTIME,
        |p: MallocCreate, r| {
            let _ = (
                p.md_interleave,
                p.dif_is_head_of_md,
                p.dif_pi_format,
                p.numa_id,
            );
            let res = no_metadata(p.md_size, p.dif_type).and_then(|_| {
                create(MallocOpts {
                    name: p.name,
                    uuid: p.uuid,
                    num_blocks: p.num_blocks,
                    block_size: p.block_size,
                    physical_block_size: p.physical_block_size,
                    optimal_io_boundary: p.optimal_io_boundary,
                })
            });
            reply(r, res.map(|b| json!(b.name())));
        },
    );
    method(
        reg,
        "bdev_malloc_delete",
        STATE_RUNTIME,
        |p: NameOnly, r| delete_reply(&p.name, MODULE, r),
    );
}
