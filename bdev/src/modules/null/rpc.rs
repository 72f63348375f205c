//! The null module's JSON-RPC methods: `bdev_null_create`, `bdev_null_delete`, `bdev_null_resize`.

use jsonrpc::{Registry, STATE_RUNTIME};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{create, resize, NullOpts, MODULE};
use crate::modules::no_metadata;
use crate::rpc::{delete_reply, method, reply, NameOnly};

/// `bdev_null_create` params, SPDK's names and defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullCreate {
    name: String,
    uuid: Option<Uuid>,
    num_blocks: u64,
    block_size: u32,
    #[serde(default)]
    physical_block_size: u32,
    #[serde(default)]
    md_size: u32,
    #[serde(default)]
    dif_type: u32,
    #[serde(default)]
    dif_is_head_of_md: bool,
    #[serde(default)]
    dif_pi_format: u32,
    preferred_write_alignment: Option<u32>,
    preferred_write_granularity: Option<u32>,
    optimal_write_size: Option<u32>,
    preferred_unmap_alignment: Option<u32>,
    preferred_unmap_granularity: Option<u32>,
}

/// `bdev_null_resize` params (`new_size` in MiB).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullResize {
    name: String,
    new_size: u64,
}

/// Registers the null module's methods.
pub(crate) fn register_rpcs(reg: &mut Registry) {
    method(
        reg,
        "bdev_null_create",
        STATE_RUNTIME,
        |p: NullCreate, r| {
            let _ = (
                p.dif_is_head_of_md,
                p.dif_pi_format,
                p.preferred_write_alignment,
                p.preferred_write_granularity,
                p.optimal_write_size,
                p.preferred_unmap_alignment,
                p.preferred_unmap_granularity,
            );
            let res = no_metadata(p.md_size, p.dif_type).and_then(|_| {
                create(NullOpts {
                    name: p.name,
                    uuid: p.uuid,
                    num_blocks: p.num_blocks,
                    block_size: p.block_size,
                    physical_block_size: p.physical_block_size,
                })
            });
            reply(r, res.map(|b| json!(b.name())));
        },
    );
    method(reg, "bdev_null_delete", STATE_RUNTIME, |p: NameOnly, r| {
        delete_reply(&p.name, MODULE, r)
    });
    method(
        reg,
        "bdev_null_resize",
        STATE_RUNTIME,
        |p: NullResize, r| {
            reply(r, resize(&p.name, p.new_size).map(|_| json!(true)));
        },
    );
}
