//! What a host-side queue pair takes from its user, whatever carries the commands (NVMe/TCP, NVMe/RDMA, PCIe):
//! data buffers, the direction data moves, and why a command was not taken. Shared so the host library can put
//! every transport behind one queue pair type.

/// One piece of a command's data buffer.
#[derive(Clone, Copy, Debug)]
pub struct Iov {
    /// Start.
    pub base: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

/// Which way a command's data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// No data.
    None,
    /// Host to controller (writes).
    ToCtrl,
    /// Controller to host (reads).
    FromCtrl,
}

/// Why a command was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Every slot is in use: submit again once one completes.
    Full,
    /// The queue pair is not connected (yet, or any more).
    NotReady,
    /// The buffers are larger than this queue pair moves in one command.
    TooLarge,
    /// The buffers cannot be described to the device: memory it cannot reach (not in the memory map), or
    /// pieces whose alignment the transport cannot express (PCIe PRPs need page-aligned joins).
    BadBuffer,
}
