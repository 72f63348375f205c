//! The error module's JSON-RPC methods: `bdev_error_create`, `bdev_error_delete`, `bdev_error_inject_error`.

use jsonrpc::{Registry, RpcError, STATE_RUNTIME};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{create, delete, inject_error, ErrorType, InjectOpts};
use crate::rpc::{method, reply, NameOnly};

/// `bdev_error_create` params.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorCreate {
    base_name: String,
    uuid: Option<Uuid>,
}

/// `bdev_error_inject_error` params, SPDK's names and defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorInject {
    name: String,
    io_type: String,
    error_type: String,
    #[serde(default = "one")]
    num: u32,
    #[serde(default)]
    queue_depth: u64,
    #[serde(default)]
    corrupt_offset: u64,
    #[serde(default)]
    corrupt_value: u8,
    #[serde(default)]
    nvme_sct: u8,
    #[serde(default)]
    nvme_sc: u8,
}

fn one() -> u32 {
    1
}

/// Registers the error module's methods.
pub(crate) fn register_rpcs(reg: &mut Registry) {
    method(
        reg,
        "bdev_error_create",
        STATE_RUNTIME,
        |p: ErrorCreate, r| {
            reply(r, create(&p.base_name, p.uuid).map(|b| json!(b.name())));
        },
    );
    method(reg, "bdev_error_delete", STATE_RUNTIME, |p: NameOnly, r| {
        delete(&p.name, move |res| reply(r, res.map(|_| json!(true))));
    });
    method(
        reg,
        "bdev_error_inject_error",
        STATE_RUNTIME,
        |p: ErrorInject, r| {
            // NVMe status codes have no carrier in this bdev layer yet: nvme_failure fails the I/O like failure.
            let _ = (p.nvme_sct, p.nvme_sc);
            let et = if p.error_type == "nvme_failure" {
                Some(ErrorType::Failure)
            } else {
                ErrorType::parse(&p.error_type)
            };
            let Some(error_type) = et else {
                return r.err(RpcError::invalid_params(format!(
                    "unknown error_type {}",
                    p.error_type
                )));
            };
            let res = inject_error(
                &p.name,
                InjectOpts {
                    io_type: p.io_type,
                    error_type,
                    num: p.num,
                    queue_depth: p.queue_depth,
                    corrupt_offset: p.corrupt_offset,
                    corrupt_value: p.corrupt_value,
                },
            );
            reply(r, res.map(|_| json!(true)));
        },
    );
}
