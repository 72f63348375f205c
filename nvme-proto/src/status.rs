//! Completion status: status code type (SCT), status code (SC) and the retry hints, as the Status field of a
//! completion queue entry carries them (NVMe base spec, "Completion Queue Entry: Status Field").

/// Status code types.
pub mod sct {
    /// Generic command status.
    pub const GENERIC: u8 = 0;
    /// Command specific status.
    pub const COMMAND_SPECIFIC: u8 = 1;
    /// Media and data integrity errors.
    pub const MEDIA: u8 = 2;
    /// Path related status.
    pub const PATH: u8 = 3;
    /// Vendor specific.
    pub const VENDOR: u8 = 7;
}

/// Generic command status codes (SCT 0).
pub mod generic {
    /// Successful completion.
    pub const SUCCESS: u8 = 0x00;
    /// Invalid command opcode.
    pub const INVALID_OPCODE: u8 = 0x01;
    /// Invalid field in command.
    pub const INVALID_FIELD: u8 = 0x02;
    /// Command ID conflict.
    pub const COMMAND_ID_CONFLICT: u8 = 0x03;
    /// Data transfer error.
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    /// Commands aborted due to power loss notification.
    pub const ABORTED_POWER_LOSS: u8 = 0x05;
    /// Internal error.
    pub const INTERNAL_DEVICE_ERROR: u8 = 0x06;
    /// Command abort requested.
    pub const ABORTED_BY_REQUEST: u8 = 0x07;
    /// Command aborted due to SQ deletion.
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    /// Command aborted due to failed fused command.
    pub const ABORTED_FAILED_FUSED: u8 = 0x09;
    /// Command aborted due to missing fused command.
    pub const ABORTED_MISSING_FUSED: u8 = 0x0a;
    /// Invalid namespace or format.
    pub const INVALID_NAMESPACE_OR_FORMAT: u8 = 0x0b;
    /// Command sequence error.
    pub const COMMAND_SEQUENCE_ERROR: u8 = 0x0c;
    /// Invalid SGL segment descriptor.
    pub const INVALID_SGL_SEG_DESCRIPTOR: u8 = 0x0d;
    /// Invalid number of SGL descriptors.
    pub const INVALID_NUM_SGL_DESCRIPTORS: u8 = 0x0e;
    /// Data SGL length invalid.
    pub const DATA_SGL_LENGTH_INVALID: u8 = 0x0f;
    /// Metadata SGL length invalid.
    pub const METADATA_SGL_LENGTH_INVALID: u8 = 0x10;
    /// SGL descriptor type invalid.
    pub const SGL_DESCRIPTOR_TYPE_INVALID: u8 = 0x11;
    /// Invalid use of controller memory buffer.
    pub const INVALID_CONTROLLER_MEM_BUF: u8 = 0x12;
    /// PRP offset invalid.
    pub const INVALID_PRP_OFFSET: u8 = 0x13;
    /// Atomic write unit exceeded.
    pub const ATOMIC_WRITE_UNIT_EXCEEDED: u8 = 0x14;
    /// Operation denied.
    pub const OPERATION_DENIED: u8 = 0x15;
    /// SGL offset invalid.
    pub const INVALID_SGL_OFFSET: u8 = 0x16;
    /// Host identifier inconsistent format.
    pub const HOSTID_INCONSISTENT_FORMAT: u8 = 0x18;
    /// Keep alive timer expired.
    pub const KEEP_ALIVE_EXPIRED: u8 = 0x19;
    /// Keep alive timeout invalid.
    pub const KEEP_ALIVE_INVALID: u8 = 0x1a;
    /// Command aborted due to preempt and abort.
    pub const ABORTED_PREEMPT: u8 = 0x1b;
    /// Namespace is write protected.
    pub const NAMESPACE_IS_WRITE_PROTECTED: u8 = 0x20;
    /// Command interrupted.
    pub const COMMAND_INTERRUPTED: u8 = 0x21;
    /// Transient transport error.
    pub const TRANSIENT_TRANSPORT_ERROR: u8 = 0x22;
    /// LBA out of range.
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    /// Capacity exceeded.
    pub const CAPACITY_EXCEEDED: u8 = 0x81;
    /// Namespace not ready.
    pub const NAMESPACE_NOT_READY: u8 = 0x82;
    /// Reservation conflict.
    pub const RESERVATION_CONFLICT: u8 = 0x83;
}

/// Command specific status codes (SCT 1).
pub mod specific {
    /// Invalid queue identifier.
    pub const INVALID_QUEUE_IDENTIFIER: u8 = 0x01;
    /// Invalid queue size.
    pub const INVALID_QUEUE_SIZE: u8 = 0x02;
    /// Abort command limit exceeded.
    pub const ABORT_COMMAND_LIMIT_EXCEEDED: u8 = 0x03;
    /// Asynchronous event request limit exceeded.
    pub const ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED: u8 = 0x05;
    /// Invalid log page.
    pub const INVALID_LOG_PAGE: u8 = 0x09;
    /// Invalid format.
    pub const INVALID_FORMAT: u8 = 0x0a;
    /// Feature identifier not saveable.
    pub const FEATURE_ID_NOT_SAVEABLE: u8 = 0x0d;
    /// Feature not changeable.
    pub const FEATURE_NOT_CHANGEABLE: u8 = 0x0e;
    /// Feature not namespace specific.
    pub const FEATURE_NOT_NAMESPACE_SPECIFIC: u8 = 0x0f;
    /// Conflicting attributes (I/O command set).
    pub const CONFLICTING_ATTRIBUTES: u8 = 0x80;
    /// Command size limit exceeded (Copy: more source ranges or blocks than allowed).
    pub const COMMAND_SIZE_LIMIT_EXCEEDED: u8 = 0x83;
    /// Fabrics: incompatible format (Connect).
    pub const FABRIC_INCOMPATIBLE_FORMAT: u8 = 0x80;
    /// Fabrics: controller busy (Connect).
    pub const FABRIC_CONTROLLER_BUSY: u8 = 0x81;
    /// Fabrics: Connect invalid parameters.
    pub const FABRIC_INVALID_PARAM: u8 = 0x82;
    /// Fabrics: restart discovery.
    pub const FABRIC_RESTART_DISCOVERY: u8 = 0x83;
    /// Fabrics: Connect invalid host.
    pub const FABRIC_INVALID_HOST: u8 = 0x84;
}

/// Media and data integrity status codes (SCT 2).
pub mod media {
    /// Write fault.
    pub const WRITE_FAULTS: u8 = 0x80;
    /// Unrecovered read error.
    pub const UNRECOVERED_READ_ERROR: u8 = 0x81;
    /// End-to-end guard check error.
    pub const GUARD_CHECK_ERROR: u8 = 0x82;
    /// End-to-end application tag check error.
    pub const APPLICATION_TAG_CHECK_ERROR: u8 = 0x83;
    /// End-to-end reference tag check error.
    pub const REFERENCE_TAG_CHECK_ERROR: u8 = 0x84;
    /// Compare failure.
    pub const COMPARE_FAILURE: u8 = 0x85;
    /// Access denied.
    pub const ACCESS_DENIED: u8 = 0x86;
    /// Deallocated or unwritten logical block.
    pub const DEALLOCATED_OR_UNWRITTEN_BLOCK: u8 = 0x87;
}

/// Path related status codes (SCT 3).
pub mod path {
    /// Internal path error.
    pub const INTERNAL_PATH_ERROR: u8 = 0x00;
    /// Asymmetric access persistent loss.
    pub const ASYMMETRIC_ACCESS_PERSISTENT_LOSS: u8 = 0x01;
    /// Asymmetric access inaccessible.
    pub const ASYMMETRIC_ACCESS_INACCESSIBLE: u8 = 0x02;
    /// Asymmetric access transition.
    pub const ASYMMETRIC_ACCESS_TRANSITION: u8 = 0x03;
    /// Controller pathing error.
    pub const CONTROLLER_PATHING_ERROR: u8 = 0x60;
    /// Host pathing error.
    pub const HOST_PATHING_ERROR: u8 = 0x70;
    /// Command aborted by host.
    pub const ABORTED_BY_HOST: u8 = 0x71;
}

/// A completion status (without the phase tag, which belongs to the queue, not the command).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Status {
    /// Status code type.
    pub sct: u8,
    /// Status code.
    pub sc: u8,
    /// Command retry delay selector (0 none, 1..=3 pick CRDT1..3).
    pub crd: u8,
    /// More status information in the error log page.
    pub more: bool,
    /// Do not retry.
    pub dnr: bool,
}

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status::new(sct::GENERIC, generic::SUCCESS);

    /// A status with no retry hints.
    pub const fn new(sct: u8, sc: u8) -> Status {
        Status {
            sct,
            sc,
            crd: 0,
            more: false,
            dnr: false,
        }
    }

    /// A generic status.
    pub const fn generic(sc: u8) -> Status {
        Status::new(sct::GENERIC, sc)
    }

    /// A command specific status.
    pub const fn specific(sc: u8) -> Status {
        Status::new(sct::COMMAND_SPECIFIC, sc)
    }

    /// The same status with Do Not Retry set.
    pub const fn dnr(mut self) -> Status {
        self.dnr = true;
        self
    }

    /// Whether this is a successful completion.
    pub const fn is_success(&self) -> bool {
        self.sct == sct::GENERIC && self.sc == generic::SUCCESS
    }

    /// The Status field's upper 15 bits as they sit in bits 1..=15 of CQE dword 3's upper half, phase excluded
    /// (bit 0 of the returned value is the phase position, left zero).
    pub const fn to_field(&self) -> u16 {
        ((self.sc as u16) << 1)
            | (((self.sct & 0x7) as u16) << 9)
            | (((self.crd & 0x3) as u16) << 12)
            | ((self.more as u16) << 14)
            | ((self.dnr as u16) << 15)
    }

    /// Decodes the Status field (the phase bit is ignored).
    pub const fn from_field(f: u16) -> Status {
        Status {
            sc: (f >> 1) as u8,
            sct: ((f >> 9) & 0x7) as u8,
            crd: ((f >> 12) & 0x3) as u8,
            more: (f >> 14) & 1 != 0,
            dnr: (f >> 15) & 1 != 0,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sct {:#x} sc {:#04x}", self.sct, self.sc)?;
        if self.dnr {
            f.write_str(" dnr")?;
        }
        if self.crd != 0 {
            write!(f, " crd {}", self.crd)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_layout() {
        // Invalid field, DNR: SC 0x02 in bits 1..=8, DNR in bit 15.
        assert_eq!(
            Status::generic(generic::INVALID_FIELD).dnr().to_field(),
            0x8004
        );
        // Compare failure: SCT 2 in bits 9..=11.
        assert_eq!(
            Status::new(sct::MEDIA, media::COMPARE_FAILURE).to_field(),
            (0x85 << 1) | (2 << 9)
        );
        for f in [0u16, 0x8004, 0xffff, 0x1234] {
            assert_eq!(Status::from_field(f).to_field(), f & !1);
        }
    }
}
