//! Submission and completion queue entries, opcodes and SGL descriptors (NVMe base spec, "Submission Queue
//! Entry" and "Completion Queue Entry"; NVMe-oF spec for the Fabrics command and transport SGL types).

use crate::status::Status;

/// Little-endian field readers over fixed arrays, so offsets are checked at compile time where possible.
#[inline]
pub(crate) fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
#[inline]
pub(crate) fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
#[inline]
pub(crate) fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
#[inline]
pub(crate) fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
#[inline]
pub(crate) fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
#[inline]
pub(crate) fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Admin command opcodes.
pub mod admin {
    /// Delete I/O submission queue.
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O submission queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O completion queue.
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O completion queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    /// Namespace Management.
    pub const NS_MANAGEMENT: u8 = 0x0d;
    /// Firmware Commit.
    pub const FIRMWARE_COMMIT: u8 = 0x10;
    /// Firmware Image Download.
    pub const FIRMWARE_IMAGE_DOWNLOAD: u8 = 0x11;
    /// Namespace Attachment.
    pub const NS_ATTACHMENT: u8 = 0x15;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Directive Send.
    pub const DIRECTIVE_SEND: u8 = 0x19;
    /// Directive Receive.
    pub const DIRECTIVE_RECEIVE: u8 = 0x1a;
    /// Doorbell Buffer Config.
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
    /// Format NVM.
    pub const FORMAT_NVM: u8 = 0x80;
    /// Security Send.
    pub const SECURITY_SEND: u8 = 0x81;
    /// Security Receive.
    pub const SECURITY_RECEIVE: u8 = 0x82;
    /// Sanitize.
    pub const SANITIZE: u8 = 0x84;
}

/// NVM command set (I/O) opcodes.
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u8 = 0x04;
    /// Compare.
    pub const COMPARE: u8 = 0x05;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    /// Verify.
    pub const VERIFY: u8 = 0x0c;
    /// Reservation Register.
    pub const RESERVATION_REGISTER: u8 = 0x0d;
    /// Reservation Report.
    pub const RESERVATION_REPORT: u8 = 0x0e;
    /// Reservation Acquire.
    pub const RESERVATION_ACQUIRE: u8 = 0x11;
    /// Reservation Release.
    pub const RESERVATION_RELEASE: u8 = 0x15;
    /// Copy.
    pub const COPY: u8 = 0x19;
}

/// The Fabrics command opcode (admin and I/O queues); the command type is in byte 4.
pub const FABRICS: u8 = 0x7f;

/// Fused operation, in bits 0..=1 of command byte 1.
pub mod fuse {
    /// Not fused.
    pub const NORMAL: u8 = 0;
    /// First command of a fused pair.
    pub const FIRST: u8 = 1;
    /// Second command of a fused pair.
    pub const SECOND: u8 = 2;
}

/// Data pointer kind, PSDT in bits 6..=7 of command byte 1.
pub mod psdt {
    /// PRPs.
    pub const PRP: u8 = 0;
    /// SGL, metadata pointer is a buffer.
    pub const SGL_MPTR_CONTIG: u8 = 1;
    /// SGL, metadata pointer is an SGL segment.
    pub const SGL_MPTR_SGL: u8 = 2;
}

/// Feature identifiers (Get/Set Features CDW10 bits 0..=7).
pub mod feat {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Power management.
    pub const POWER_MANAGEMENT: u8 = 0x02;
    /// Temperature threshold.
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    /// Error recovery.
    pub const ERROR_RECOVERY: u8 = 0x05;
    /// Volatile write cache.
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Interrupt coalescing.
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    /// Interrupt vector configuration.
    pub const INTERRUPT_VECTOR_CONFIGURATION: u8 = 0x09;
    /// Write atomicity.
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    /// Asynchronous event configuration.
    pub const ASYNC_EVENT_CONFIGURATION: u8 = 0x0b;
    /// Autonomous power state transition.
    pub const AUTONOMOUS_POWER_STATE_TRANSITION: u8 = 0x0c;
    /// Host memory buffer.
    pub const HOST_MEM_BUFFER: u8 = 0x0d;
    /// Timestamp.
    pub const TIMESTAMP: u8 = 0x0e;
    /// Keep alive timer.
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
    /// Host identifier.
    pub const HOST_IDENTIFIER: u8 = 0x81;
    /// Reservation notification mask.
    pub const HOST_RESERVE_MASK: u8 = 0x82;
    /// Reservation persistence.
    pub const HOST_RESERVE_PERSIST: u8 = 0x83;
}

/// SGL descriptor types (upper nibble of byte 15).
pub mod sgl {
    /// Data block.
    pub const TYPE_DATA_BLOCK: u8 = 0x0;
    /// Bit bucket.
    pub const TYPE_BIT_BUCKET: u8 = 0x1;
    /// Segment.
    pub const TYPE_SEGMENT: u8 = 0x2;
    /// Last segment.
    pub const TYPE_LAST_SEGMENT: u8 = 0x3;
    /// Keyed data block (RDMA).
    pub const TYPE_KEYED_DATA_BLOCK: u8 = 0x4;
    /// Transport data block (TCP: data moved by the transport, not in the capsule).
    pub const TYPE_TRANSPORT_DATA_BLOCK: u8 = 0x5;
    /// Subtype: address.
    pub const SUBTYPE_ADDRESS: u8 = 0x0;
    /// Subtype: offset (in-capsule data).
    pub const SUBTYPE_OFFSET: u8 = 0x1;
    /// Subtype: transport specific.
    pub const SUBTYPE_TRANSPORT: u8 = 0xa;
    /// Subtype: invalidate key (RDMA keyed data block).
    pub const SUBTYPE_INVALIDATE_KEY: u8 = 0xf;
}

/// One SGL descriptor (16 bytes). Keyed data blocks carry a 24-bit length and a 32-bit key; the others a
/// 32-bit length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SglDesc {
    /// Address (or offset for in-capsule data).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Remote key (keyed data blocks only).
    pub key: u32,
    /// Descriptor type ([`sgl`]`::TYPE_*`).
    pub ty: u8,
    /// Descriptor subtype ([`sgl`]`::SUBTYPE_*`).
    pub subtype: u8,
}

impl SglDesc {
    /// Decodes the descriptor in `b` (16 bytes).
    pub fn decode(b: &[u8; 16]) -> SglDesc {
        let id = b[15];
        let ty = id >> 4;
        let (len, key) = if ty == sgl::TYPE_KEYED_DATA_BLOCK {
            (u32::from_le_bytes([b[8], b[9], b[10], 0]), le32(b, 11))
        } else {
            (le32(b, 8), 0)
        };
        SglDesc {
            addr: le64(b, 0),
            len,
            key,
            ty,
            subtype: id & 0xf,
        }
    }

    /// Encodes the descriptor into `b`.
    pub fn encode(&self, b: &mut [u8; 16]) {
        put64(b, 0, self.addr);
        if self.ty == sgl::TYPE_KEYED_DATA_BLOCK {
            b[8..11].copy_from_slice(&self.len.to_le_bytes()[..3]);
            put32(b, 11, self.key);
        } else {
            put32(b, 8, self.len);
            b[12..15].fill(0);
        }
        b[15] = (self.ty << 4) | (self.subtype & 0xf);
    }
}

/// A submission queue entry (64 bytes), kept as its bytes: decoding on access costs nothing more than the
/// load, and a command can be passed on (to a backing controller, into a log) exactly as received.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, align(8))]
pub struct Sqe(pub [u8; 64]);

impl Default for Sqe {
    fn default() -> Self {
        Sqe([0; 64])
    }
}

impl std::fmt::Debug for Sqe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Sqe {{ opc: {:#04x}, fuse: {}, cid: {}, nsid: {}, cdw10: {:#x}, cdw11: {:#x}, cdw12: {:#x} }}",
            self.opc(),
            self.fuse(),
            self.cid(),
            self.nsid(),
            self.cdw(10),
            self.cdw(11),
            self.cdw(12)
        )
    }
}

impl Sqe {
    /// A command with opcode and command identifier set, everything else zero.
    pub fn new(opc: u8, cid: u16) -> Sqe {
        let mut s = Sqe::default();
        s.0[0] = opc;
        s.set_cid(cid);
        s
    }

    /// Opcode.
    #[inline]
    pub fn opc(&self) -> u8 {
        self.0[0]
    }
    /// Fused operation ([`fuse`]).
    #[inline]
    pub fn fuse(&self) -> u8 {
        self.0[1] & 0x3
    }
    /// PRP or SGL ([`psdt`]).
    #[inline]
    pub fn psdt(&self) -> u8 {
        self.0[1] >> 6
    }
    /// Command identifier.
    #[inline]
    pub fn cid(&self) -> u16 {
        le16(&self.0, 2)
    }
    /// Sets the command identifier.
    #[inline]
    pub fn set_cid(&mut self, cid: u16) {
        put16(&mut self.0, 2, cid)
    }
    /// Namespace identifier.
    #[inline]
    pub fn nsid(&self) -> u32 {
        le32(&self.0, 4)
    }
    /// Sets the namespace identifier.
    #[inline]
    pub fn set_nsid(&mut self, nsid: u32) {
        put32(&mut self.0, 4, nsid)
    }
    /// Sets the flags byte (fuse and PSDT).
    #[inline]
    pub fn set_flags(&mut self, fuse: u8, psdt: u8) {
        self.0[1] = (fuse & 0x3) | (psdt << 6);
    }
    /// Command dword `n` (0..=15).
    #[inline]
    pub fn cdw(&self, n: usize) -> u32 {
        le32(&self.0, n * 4)
    }
    /// The sixteen command dwords.
    pub fn dwords(&self) -> [u32; 16] {
        std::array::from_fn(|n| self.cdw(n))
    }
    /// Sets command dword `n` (2..=15; 0 and 1 are opcode/flags/cid and nsid).
    #[inline]
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        put32(&mut self.0, n * 4, v)
    }
    /// Metadata pointer.
    #[inline]
    pub fn mptr(&self) -> u64 {
        le64(&self.0, 16)
    }
    /// The data pointer as an SGL descriptor (fabrics commands always use SGLs).
    #[inline]
    pub fn sgl1(&self) -> SglDesc {
        let mut d = [0u8; 16];
        d.copy_from_slice(&self.0[24..40]);
        SglDesc::decode(&d)
    }
    /// Sets the data pointer to an SGL descriptor.
    #[inline]
    pub fn set_sgl1(&mut self, d: &SglDesc) {
        let mut b = [0u8; 16];
        d.encode(&mut b);
        self.0[24..40].copy_from_slice(&b);
    }
    /// Sets PRP entries 1 and 2 (the data pointer of a PCIe command that uses PRPs).
    #[inline]
    pub fn set_prp(&mut self, prp1: u64, prp2: u64) {
        self.0[24..32].copy_from_slice(&prp1.to_le_bytes());
        self.0[32..40].copy_from_slice(&prp2.to_le_bytes());
    }
    /// PRP entry 1.
    #[inline]
    pub fn prp1(&self) -> u64 {
        le64(&self.0, 24)
    }
    /// PRP entry 2.
    #[inline]
    pub fn prp2(&self) -> u64 {
        le64(&self.0, 32)
    }
    /// Starting LBA of an NVM read/write/compare/write zeroes command (CDW10-11).
    #[inline]
    pub fn slba(&self) -> u64 {
        le64(&self.0, 40)
    }
    /// Number of logical blocks of an NVM read/write/compare/write zeroes command (CDW12 bits 0..=15, 0-based
    /// in the command, returned 1-based).
    #[inline]
    pub fn nlb(&self) -> u32 {
        (self.cdw(12) & 0xffff) + 1
    }
    /// The Fabrics command type (byte 4 of a Fabrics command).
    #[inline]
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }
}

/// A completion queue entry (16 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    /// Command specific dword 0.
    pub dw0: u32,
    /// Command specific dword 1.
    pub dw1: u32,
    /// Submission queue head pointer.
    pub sqhd: u16,
    /// Submission queue identifier.
    pub sqid: u16,
    /// Command identifier.
    pub cid: u16,
    /// Status (phase excluded).
    pub status: Status,
    /// Phase tag (PCIe queues only; zero on fabrics).
    pub phase: bool,
}

impl Cqe {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Encodes into `b`.
    #[inline]
    pub fn encode(&self, b: &mut [u8; 16]) {
        put32(b, 0, self.dw0);
        put32(b, 4, self.dw1);
        put16(b, 8, self.sqhd);
        put16(b, 10, self.sqid);
        put16(b, 12, self.cid);
        put16(b, 14, self.status.to_field() | self.phase as u16);
    }

    /// Decodes from `b`.
    #[inline]
    pub fn decode(b: &[u8; 16]) -> Cqe {
        let st = le16(b, 14);
        Cqe {
            dw0: le32(b, 0),
            dw1: le32(b, 4),
            sqhd: le16(b, 8),
            sqid: le16(b, 10),
            cid: le16(b, 12),
            status: Status::from_field(st),
            phase: st & 1 != 0,
        }
    }
}

/// Copy source range, descriptor format 0 (32 bytes each; NR + 1 of them in a Copy's data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyRange {
    /// Starting LBA.
    pub slba: u64,
    /// Number of logical blocks, 0's based.
    pub nlb: u16,
}

impl CopyRange {
    /// Encoded size.
    pub const SIZE: usize = 32;

    /// Decodes one range from `b` (32 bytes).
    pub fn decode(b: &[u8]) -> CopyRange {
        CopyRange {
            slba: le64(b, 8),
            nlb: u16::from_le_bytes([b[16], b[17]]),
        }
    }

    /// Encodes into `b` (32 bytes; the fields this type does not carry are zero).
    pub fn encode(&self, b: &mut [u8]) {
        b[..Self::SIZE].fill(0);
        put64(b, 8, self.slba);
        b[16..18].copy_from_slice(&self.nlb.to_le_bytes());
    }
}

/// Dataset Management range (16 bytes each, up to 256 per command).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DsmRange {
    /// Context attributes.
    pub attributes: u32,
    /// Length in logical blocks.
    pub nlb: u32,
    /// Starting LBA.
    pub slba: u64,
}

impl DsmRange {
    /// Encoded size.
    pub const SIZE: usize = 16;
    /// DSM attribute (CDW11 bit 2): deallocate.
    pub const AD: u32 = 1 << 2;

    /// Decodes one range from `b` (16 bytes).
    pub fn decode(b: &[u8]) -> DsmRange {
        DsmRange {
            attributes: le32(b, 0),
            nlb: le32(b, 4),
            slba: le64(b, 8),
        }
    }

    /// Encodes into `b` (16 bytes).
    pub fn encode(&self, b: &mut [u8]) {
        put32(b, 0, self.attributes);
        put32(b, 4, self.nlb);
        put64(b, 8, self.slba);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{generic, sct};

    #[test]
    fn sqe_fields() {
        let mut s = Sqe::new(io::WRITE, 0x1234);
        s.set_nsid(7);
        s.set_cdw(10, 0x89ab_cdef);
        s.set_cdw(11, 0x1);
        s.set_cdw(12, 7);
        s.set_flags(fuse::FIRST, psdt::SGL_MPTR_CONTIG);
        assert_eq!(s.opc(), 1);
        assert_eq!(s.cid(), 0x1234);
        assert_eq!(s.nsid(), 7);
        assert_eq!(s.slba(), 0x1_89ab_cdef);
        assert_eq!(s.nlb(), 8);
        assert_eq!(s.fuse(), fuse::FIRST);
        assert_eq!(s.psdt(), psdt::SGL_MPTR_CONTIG);
        assert_eq!(&s.0[40..44], &0x89ab_cdefu32.to_le_bytes());
    }

    #[test]
    fn sgl_round_trip() {
        let keyed = SglDesc {
            addr: 0x1122_3344_5566_7788,
            len: 0x00ab_cdef,
            key: 0xdead_beef,
            ty: sgl::TYPE_KEYED_DATA_BLOCK,
            subtype: sgl::SUBTYPE_ADDRESS,
        };
        let mut b = [0u8; 16];
        keyed.encode(&mut b);
        assert_eq!(b[15], 0x40);
        assert_eq!(&b[8..11], &[0xef, 0xcd, 0xab]);
        assert_eq!(SglDesc::decode(&b), keyed);
        let incapsule = SglDesc {
            addr: 0,
            len: 4096,
            key: 0,
            ty: sgl::TYPE_DATA_BLOCK,
            subtype: sgl::SUBTYPE_OFFSET,
        };
        incapsule.encode(&mut b);
        assert_eq!(b[15], 0x01);
        assert_eq!(SglDesc::decode(&b), incapsule);
        let mut s = Sqe::default();
        s.set_sgl1(&incapsule);
        assert_eq!(s.sgl1(), incapsule);
    }

    #[test]
    fn cqe_round_trip() {
        let c = Cqe {
            dw0: 1,
            dw1: 2,
            sqhd: 3,
            sqid: 4,
            cid: 5,
            status: Status::new(sct::GENERIC, generic::INVALID_FIELD).dnr(),
            phase: true,
        };
        let mut b = [0u8; 16];
        c.encode(&mut b);
        assert_eq!(&b[14..16], &0x8005u16.to_le_bytes());
        assert_eq!(Cqe::decode(&b), c);
    }
}
