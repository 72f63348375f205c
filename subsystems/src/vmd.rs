//! `vmd` subsystem: `vmd_enable` (deprecated alias `enable_vmd`), module/vmd.

/// Whether `vmd_enable` was called. It takes no parameters and is saved as `{"method": "vmd_enable",
/// "params": {}}` once called (the VMD library then enumerates devices at init).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Vmd {
    /// `vmd_enable` was called.
    pub enabled: bool,
}
