//! The uring module's JSON-RPC methods, under both of its names: `bdev_aio_create`, `bdev_aio_delete`,
//! `bdev_aio_rescan` and `bdev_uring_create`, `bdev_uring_delete`, `bdev_uring_rescan`.

use jsonrpc::{Registry, STATE_RUNTIME};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{create, rescan, UringOpts, MODULE_AIO, MODULE_URING};
use crate::rpc::{delete_reply, method, reply, NameOnly};

/// `bdev_aio_create` params, SPDK's names and defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AioCreate {
    name: String,
    filename: String,
    #[serde(default)]
    block_size: u32,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    fallocate: bool,
    uuid: Option<Uuid>,
    #[serde(default)]
    nowait: bool,
}

/// `bdev_uring_create` params, SPDK's names and defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UringCreate {
    name: String,
    filename: String,
    #[serde(default)]
    block_size: u32,
    uuid: Option<Uuid>,
}

/// Registers the `bdev_aio_*` and `bdev_uring_*` methods.
pub(crate) fn register_rpcs(reg: &mut Registry) {
    method(reg, "bdev_aio_create", STATE_RUNTIME, |p: AioCreate, r| {
        // io_uring never blocks the submitter, so `nowait` is what it does anyway.
        let _ = p.nowait;
        let res = create(UringOpts {
            name: p.name,
            filename: p.filename,
            block_size: p.block_size,
            uuid: p.uuid,
            readonly: p.readonly,
            fallocate: p.fallocate,
            aio: true,
        });
        reply(r, res.map(|b| json!(b.name())));
    });
    method(reg, "bdev_aio_delete", STATE_RUNTIME, |p: NameOnly, r| {
        delete_reply(&p.name, MODULE_AIO, r)
    });
    method(reg, "bdev_aio_rescan", STATE_RUNTIME, |p: NameOnly, r| {
        reply(r, rescan(&p.name).map(|_| json!(true)));
    });
    method(
        reg,
        "bdev_uring_create",
        STATE_RUNTIME,
        |p: UringCreate, r| {
            let res = create(UringOpts {
                name: p.name,
                filename: p.filename,
                block_size: p.block_size,
                uuid: p.uuid,
                readonly: false,
                fallocate: false,
                aio: false,
            });
            reply(r, res.map(|b| json!(b.name())));
        },
    );
    method(reg, "bdev_uring_delete", STATE_RUNTIME, |p: NameOnly, r| {
        delete_reply(&p.name, MODULE_URING, r)
    });
    method(reg, "bdev_uring_rescan", STATE_RUNTIME, |p: NameOnly, r| {
        reply(r, rescan(&p.name).map(|_| json!(true)));
    });
}
