//! Base bdev modules. Each keeps its JSON-RPC methods beside it, in `<module>/rpc.rs` (passthru, the template,
//! in its one file).

pub mod error;
pub mod malloc;
pub mod null;
pub mod passthru;
pub mod uring;

use serde_json::{json, Value};

use crate::{Bdev, BdevError, ErrorKind};

/// Registers every base module's methods (after the bdev layer's own, see [`crate::rpc::register_rpcs`]).
pub(crate) fn register_rpcs(reg: &mut jsonrpc::Registry) {
    malloc::register_rpcs(reg);
    null::register_rpcs(reg);
    uring::register_rpcs(reg);
    error::register_rpcs(reg);
    passthru::register_rpcs(reg);
}

/// The `memory_domains` member `bdev_get_bdevs` prints for `bdev`, when SPDK v24.05 prints one for a bdev of its
/// module: malloc reports every memory domain of the process (spdk_tgt has two: the system domain, of type DMA,
/// and the accel framework's, of type ACCEL, in that order); null, aio, uring and error report none, and SPDK then
/// leaves the member out.
pub(crate) fn memory_domains(bdev: &Bdev) -> Option<Value> {
    (bdev.module_name() == malloc::MODULE).then(|| {
        json!([
            {"dma_device_id": "system", "dma_device_type": 1},
            {"dma_device_id": "SPDK_ACCEL_DMA_DEVICE", "dma_device_type": 2},
        ])
    })
}

/// Refuses metadata and DIF (`md_size`, `dif_type` of the create methods), which no module here supports.
pub(crate) fn no_metadata(md_size: u32, dif_type: u32) -> Result<(), BdevError> {
    if md_size != 0 || dif_type != 0 {
        return Err(BdevError::new(
            ErrorKind::NotSupported,
            "metadata and DIF are not supported",
        ));
    }
    Ok(())
}
