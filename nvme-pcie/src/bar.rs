//! Controller registers: 32-bit volatile accesses to BAR0 (the register file and the doorbells).

use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

/// The memory a controller's registers live in; shared by the admin queue and every I/O queue pair.
pub struct Bar {
    base: NonNull<u8>,
    len: usize,
    /// Keeps the mapping alive (the VFIO device, or a model's memory).
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the registers are device memory meant to be reached from any CPU; every access is a single aligned
// volatile read or write, which is what the device sees either way.
unsafe impl Send for Bar {}
// SAFETY: as above: no access creates a reference into the mapping.
unsafe impl Sync for Bar {}

impl std::fmt::Debug for Bar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bar({:p}+{:#x})", self.base, self.len)
    }
}

impl Bar {
    /// Registers at `base`, `len` bytes long, kept mapped by `owner`.
    ///
    /// # Safety
    /// `[base, base+len)` must stay mapped, readable and writable for as long as `owner` lives, and be memory
    /// that tolerates volatile 32-bit accesses (device registers, or ordinary memory standing in for them).
    pub unsafe fn new(base: NonNull<u8>, len: usize, owner: Arc<dyn Any + Send + Sync>) -> Bar {
        Bar {
            base,
            len,
            _owner: owner,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never: a BAR has registers.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at(&self, off: usize) -> *mut u32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len,
            "register {off:#x} outside BAR0 ({:#x} bytes)",
            self.len
        );
        // SAFETY: in bounds (checked above) of the mapping `new` was given.
        unsafe { self.base.as_ptr().add(off).cast() }
    }

    /// Reads the 32-bit register at `off`.
    #[inline]
    pub fn read32(&self, off: usize) -> u32 {
        // SAFETY: aligned and in bounds (`at`), mapped while `self` lives (`new`'s contract).
        unsafe { self.at(off).read_volatile() }
    }

    /// Writes the 32-bit register at `off`.
    #[inline]
    pub fn write32(&self, off: usize, v: u32) {
        // SAFETY: aligned and in bounds (`at`), mapped while `self` lives (`new`'s contract).
        unsafe { self.at(off).write_volatile(v) }
    }

    /// Reads a 64-bit register as two 32-bit halves, low first (the access size every controller takes).
    pub fn read64(&self, off: usize) -> u64 {
        self.read32(off) as u64 | (self.read32(off + 4) as u64) << 32
    }

    /// Writes a 64-bit register as two 32-bit halves, low first.
    pub fn write64(&self, off: usize, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }
}
