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

/// A queue pair's command timeout (every transport's): how long a command may stay outstanding, counted from
/// its submission; none by default. Commands of one opcode may be exempt: the admin queue's Asynchronous Event
/// Requests wait for events, as long as that takes.
#[derive(Clone, Copy, Debug, Default)]
pub struct CmdTimeout {
    limit: Option<std::time::Duration>,
    untimed_opc: Option<u8>,
}

impl CmdTimeout {
    /// Sets the limit (`None` or zero: none) for commands submitted from now on, and the exempt opcode.
    pub fn set(&mut self, limit: Option<std::time::Duration>, untimed_opc: Option<u8>) {
        self.limit = limit.filter(|t| !t.is_zero());
        self.untimed_opc = untimed_opc;
    }

    /// The deadline of a command of opcode `opc` submitted now.
    #[inline]
    pub fn deadline(&self, opc: u8) -> Option<std::time::Instant> {
        self.limit
            .filter(|_| Some(opc) != self.untimed_opc)
            .map(|t| std::time::Instant::now() + t)
    }
}

/// Reports, once each, the commands past their deadline at `now` to `f` as (command id, token): `slots` gives,
/// per command id in order, whether it is outstanding, its deadline (cleared once reported) and its token.
pub fn report_expired<'a>(
    slots: impl Iterator<Item = (bool, &'a mut Option<std::time::Instant>, u64)>,
    now: std::time::Instant,
    f: &mut dyn FnMut(u16, u64),
) {
    for (cid, (busy, deadline, token)) in slots.enumerate() {
        if busy && deadline.is_some_and(|d| d <= now) {
            *deadline = None;
            f(cid as u16, token);
        }
    }
}

/// The data a command moves, as every queue pair checks it: none for [`Dir::None`] (whatever `iovs` holds),
/// otherwise `iovs` and their total length, refused as [`SubmitError::TooLarge`] past `max_xfer` bytes.
#[inline]
pub fn command_data(iovs: &[Iov], dir: Dir, max_xfer: u32) -> Result<(&[Iov], usize), SubmitError> {
    let iovs = if dir == Dir::None { &[][..] } else { iovs };
    let len: usize = iovs.iter().map(|v| v.len).sum();
    if len > max_xfer as usize {
        return Err(SubmitError::TooLarge);
    }
    Ok((iovs, len))
}
