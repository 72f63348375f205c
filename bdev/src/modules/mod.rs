//! Base bdev modules. Each keeps its JSON-RPC methods beside it, in `<module>/rpc.rs`.

pub mod error;
pub mod malloc;
pub mod null;
pub mod uring;

use crate::{BdevError, ErrorKind};

/// Registers every base module's methods (after the bdev layer's own, see [`crate::rpc::register_rpcs`]).
pub(crate) fn register_rpcs(reg: &mut jsonrpc::Registry) {
    malloc::register_rpcs(reg);
    null::register_rpcs(reg);
    uring::register_rpcs(reg);
    error::register_rpcs(reg);
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
