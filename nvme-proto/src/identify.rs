//! Identify data structures (NVMe base specification 2.0, Identify command, CNS values below).
//!
//! - [`CtrlrData`]: Identify Controller (CNS 01h), including the NVMe-oF attributes at bytes 1792..2047.
//! - [`NsData`]: Identify Namespace for the NVM command set (CNS 00h).
//! - [`IocsIndepNsData`]: I/O Command Set Independent Identify Namespace (CNS 08h).
//! - [`encode_ns_list`] / [`decode_ns_list`]: Active (or allocated) Namespace ID list (CNS 02h, 10h).
//! - [`NsIdDesc`], [`encode_ns_id_descs`] / [`decode_ns_id_descs`]: Namespace Identification Descriptor
//!   list (CNS 03h).
//!
//! Bit fields are kept as the raw integers the specification defines (so a decoded value re-encodes to the
//! same bytes, reserved bits included); the small modules next to the structs ([`cmic`], [`oncs`], ...)
//! name the bits.
//!
//! This module also holds the crate's [`ProtoError`] and the fixed-layout machinery (`layout!`) that
//! [`crate::log`] reuses.

use std::fmt;

/// Size of every Identify data structure this module encodes (an Identify data buffer is 4 KiB).
pub const IDENTIFY_DATA_SIZE: usize = 4096;

/// What is wrong with a buffer or a field a decoder (or a fallible encoder) was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    /// The buffer is shorter than the structure (or the part a header announces) needs.
    Short {
        /// The structure or field being read.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// A field holds a value the layout cannot represent or the specification forbids.
    Invalid {
        /// The field.
        what: &'static str,
        /// The offending value (a length, a count, a byte, ...).
        value: u64,
    },
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Short { what, need, got } => {
                write!(f, "{what}: buffer too short, need {need} bytes, got {got}")
            }
            ProtoError::Invalid { what, value } => write!(f, "{what}: invalid value {value:#x}"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// A fixed-size little-endian field: how the layout structs read and write each member.
///
/// Callers (the [`layout!`] expansion) always hand `get` and `put` slices of at least `SIZE` bytes.
pub(crate) trait Wire: Sized {
    /// Encoded size in bytes.
    const SIZE: usize;
    /// Reads the value from the first `SIZE` bytes of `b`.
    fn get(b: &[u8]) -> Self;
    /// Writes the value into the first `SIZE` bytes of `b`.
    fn put(&self, b: &mut [u8]);
    /// The all-zero value (arrays longer than 32 have no `Default`).
    fn zero() -> Self;
}

macro_rules! wire_int {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn get(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(&b[..Self::SIZE]);
                <$t>::from_le_bytes(a)
            }
            fn put(&self, b: &mut [u8]) {
                b[..Self::SIZE].copy_from_slice(&self.to_le_bytes());
            }
            fn zero() -> Self {
                0
            }
        }
    )*};
}
wire_int!(u8, u16, u32, u64, u128);

// Arrays are element after element; for `[u8; N]` that is the bytes as they are (strings, GUIDs, EUI-64s).
impl<T: Wire, const N: usize> Wire for [T; N] {
    const SIZE: usize = T::SIZE * N;
    fn get(b: &[u8]) -> Self {
        std::array::from_fn(|i| T::get(&b[i * T::SIZE..]))
    }
    fn put(&self, b: &mut [u8]) {
        for (i, v) in self.iter().enumerate() {
            v.put(&mut b[i * T::SIZE..]);
        }
    }
    fn zero() -> Self {
        std::array::from_fn(|_| T::zero())
    }
}

/// Declares a fixed-size structure by its byte offsets and generates the struct (public fields), `SIZE`,
/// `Default` (all zero), `encode` and `decode`.
///
/// A compile-time check rejects fields that overlap or run past `SIZE`, so a typo in an offset fails the
/// build instead of silently corrupting a neighbour. Bytes not covered by a field are reserved: `encode`
/// writes zeroes there and `decode` ignores them.
macro_rules! layout {
    (
        $(#[$smeta:meta])*
        pub struct $name:ident [$size:expr] {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty = $off:expr ),* $(,)?
        }
    ) => {
        $(#[$smeta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: <$ty as $crate::identify::Wire>::zero(), )* }
            }
        }

        const _: () = {
            let offs: &[usize] = &[$($off),*];
            let sizes: &[usize] = &[$(<$ty as $crate::identify::Wire>::SIZE),*];
            let mut i = 0;
            while i < offs.len() {
                assert!(offs[i] + sizes[i] <= $size, "field runs past the end of the structure");
                let mut j = i + 1;
                while j < offs.len() {
                    assert!(
                        offs[i] + sizes[i] <= offs[j] || offs[j] + sizes[j] <= offs[i],
                        "fields overlap"
                    );
                    j += 1;
                }
                i += 1;
            }
        };

        impl $name {
            /// Encoded size in bytes.
            pub const SIZE: usize = $size;

            /// Writes the structure into `out[..Self::SIZE]`, reserved bytes zeroed; bytes of `out` past
            /// `SIZE` are left alone.
            ///
            /// # Panics
            ///
            /// If `out` is shorter than [`Self::SIZE`] (a caller bug: the buffer size is fixed by the
            /// specification).
            pub fn encode(&self, out: &mut [u8]) {
                let out = &mut out[..Self::SIZE];
                out.fill(0);
                $( $crate::identify::Wire::put(&self.$field, &mut out[$off..]); )*
            }

            /// Reads the structure from the first [`Self::SIZE`] bytes of `buf` (extra bytes are ignored).
            pub fn decode(buf: &[u8]) -> Result<Self, $crate::identify::ProtoError> {
                if buf.len() < Self::SIZE {
                    return Err($crate::identify::ProtoError::Short {
                        what: stringify!($name),
                        need: Self::SIZE,
                        got: buf.len(),
                    });
                }
                Ok(Self { $( $field: <$ty as $crate::identify::Wire>::get(&buf[$off..]), )* })
            }
        }
    };
}
pub(crate) use layout;

/// Identify CNS (Controller or Namespace Structure) values, command dword 10 bits 7:0.
pub mod cns {
    /// Identify Namespace for the NSID in the command (NVM command set).
    pub const NS: u8 = 0x00;
    /// Identify Controller.
    pub const CTRLR: u8 = 0x01;
    /// Active Namespace ID list: active NSIDs greater than the NSID in the command.
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    /// Namespace Identification Descriptor list for the NSID in the command.
    pub const NS_ID_DESC_LIST: u8 = 0x03;
    /// NVM Set list.
    pub const NVM_SET_LIST: u8 = 0x04;
    /// I/O command set specific Identify Namespace (CSI in CDW11).
    pub const NS_IOCS: u8 = 0x05;
    /// I/O command set specific Identify Controller (CSI in CDW11).
    pub const CTRLR_IOCS: u8 = 0x06;
    /// I/O command set specific Active Namespace ID list (CSI in CDW11).
    pub const ACTIVE_NS_LIST_IOCS: u8 = 0x07;
    /// I/O Command Set Independent Identify Namespace.
    pub const NS_IOCS_INDEPENDENT: u8 = 0x08;
    /// Allocated Namespace ID list.
    pub const ALLOCATED_NS_LIST: u8 = 0x10;
    /// Identify Namespace for an allocated NSID.
    pub const NS_ALLOCATED: u8 = 0x11;
    /// Controllers attached to the NSID in the command.
    pub const NS_ATTACHED_CTRLR_LIST: u8 = 0x12;
    /// Controllers in the NVM subsystem.
    pub const CTRLR_LIST: u8 = 0x13;
    /// Primary Controller Capabilities.
    pub const PRIMARY_CTRLR_CAP: u8 = 0x14;
    /// Secondary Controller list.
    pub const SECONDARY_CTRLR_LIST: u8 = 0x15;
    /// Namespace Granularity list.
    pub const NS_GRANULARITY_LIST: u8 = 0x16;
    /// UUID list.
    pub const UUID_LIST: u8 = 0x17;
    /// Domain list.
    pub const DOMAIN_LIST: u8 = 0x18;
    /// Endurance Group list.
    pub const ENDURANCE_GROUP_LIST: u8 = 0x19;
    /// I/O command set specific Allocated Namespace ID list.
    pub const ALLOCATED_NS_LIST_IOCS: u8 = 0x1a;
    /// I/O command set specific Identify Namespace for an allocated NSID.
    pub const NS_ALLOCATED_IOCS: u8 = 0x1b;
    /// Identify I/O Command Set data structure.
    pub const IOCS: u8 = 0x1c;
}

/// Command Set Identifiers (CSI), as in CDW11 and the CSI namespace identification descriptor.
pub mod csi {
    /// NVM command set.
    pub const NVM: u8 = 0x00;
    /// Key Value command set.
    pub const KV: u8 = 0x01;
    /// Zoned Namespace command set.
    pub const ZNS: u8 = 0x02;
}

/// Length of [`CtrlrData::sn`].
pub const SN_LEN: usize = 20;
/// Length of [`CtrlrData::mn`].
pub const MN_LEN: usize = 40;
/// Length of [`CtrlrData::fr`].
pub const FR_LEN: usize = 8;
/// Length of an NQN field ([`CtrlrData::subnqn`], the discovery log `subnqn`, Connect data NQNs).
pub const NQN_FIELD_LEN: usize = 256;

/// CMIC (controller multi-path I/O and namespace sharing capabilities) bits.
pub mod cmic {
    /// The NVM subsystem may have more than one port.
    pub const MPORTS: u8 = 1 << 0;
    /// The NVM subsystem may have more than one controller.
    pub const MCTRS: u8 = 1 << 1;
    /// SR-IOV virtual function (function type).
    pub const FT: u8 = 1 << 2;
    /// Asymmetric Namespace Access reporting supported.
    pub const ANARS: u8 = 1 << 3;
}

/// OAES (optional asynchronous events supported) bits.
pub mod oaes {
    /// Namespace Attribute Notices.
    pub const NS_ATTRIBUTE: u32 = 1 << 8;
    /// Firmware Activation Notices.
    pub const FW_ACTIVATION: u32 = 1 << 9;
    /// Asymmetric Namespace Access Change Notices.
    pub const ANA_CHANGE: u32 = 1 << 11;
    /// Predictable Latency Event Aggregate Log Change Notices.
    pub const PLEAL_CHANGE: u32 = 1 << 12;
    /// LBA Status Information Alert Notices.
    pub const LBA_STATUS_INFO: u32 = 1 << 13;
    /// Endurance Group Event Aggregate Log Page Change Notices.
    pub const EGEALP_CHANGE: u32 = 1 << 14;
    /// Normal NVM Subsystem Shutdown event.
    pub const NORMAL_NVM_SHUTDOWN: u32 = 1 << 15;
    /// Zone Descriptor Changed Notices (ZNS).
    pub const ZONE_DESC_CHANGE: u32 = 1 << 27;
    /// Discovery Log Page Change Notices (NVMe-oF discovery controllers).
    pub const DISCOVERY_LOG_CHANGE: u32 = 1 << 31;
}

/// CTRATT (controller attributes) bits.
pub mod ctratt {
    /// 128-bit Host Identifier supported.
    pub const HOST_ID_128: u32 = 1 << 0;
    /// Non-Operational Power State Permissive Mode.
    pub const NOPSPM: u32 = 1 << 1;
    /// NVM Sets.
    pub const NVM_SETS: u32 = 1 << 2;
    /// Read Recovery Levels.
    pub const READ_RECOVERY_LEVELS: u32 = 1 << 3;
    /// Endurance Groups.
    pub const ENDURANCE_GROUPS: u32 = 1 << 4;
    /// Predictable Latency Mode.
    pub const PREDICTABLE_LATENCY: u32 = 1 << 5;
    /// Traffic Based Keep Alive.
    pub const TBKAS: u32 = 1 << 6;
    /// Namespace Granularity.
    pub const NS_GRANULARITY: u32 = 1 << 7;
    /// SQ Associations.
    pub const SQ_ASSOCIATIONS: u32 = 1 << 8;
    /// UUID list.
    pub const UUID_LIST: u32 = 1 << 9;
    /// Flexible Data Placement.
    pub const FDPS: u32 = 1 << 19;
}

/// CNTRLTYPE (controller type) values.
pub mod cntrltype {
    /// Not reported (pre-1.4 controllers).
    pub const NOT_REPORTED: u8 = 0;
    /// I/O controller.
    pub const IO: u8 = 1;
    /// Discovery controller.
    pub const DISCOVERY: u8 = 2;
    /// Administrative controller.
    pub const ADMIN: u8 = 3;
}

/// OACS (optional admin command support) bits.
pub mod oacs {
    /// Security Send / Receive.
    pub const SECURITY: u16 = 1 << 0;
    /// Format NVM.
    pub const FORMAT: u16 = 1 << 1;
    /// Firmware Commit / Image Download.
    pub const FIRMWARE: u16 = 1 << 2;
    /// Namespace Management.
    pub const NS_MANAGEMENT: u16 = 1 << 3;
    /// Device Self-test.
    pub const DEVICE_SELF_TEST: u16 = 1 << 4;
    /// Directives.
    pub const DIRECTIVES: u16 = 1 << 5;
    /// NVMe-MI Send / Receive.
    pub const NVME_MI: u16 = 1 << 6;
    /// Virtualization Management.
    pub const VIRTUALIZATION: u16 = 1 << 7;
    /// Doorbell Buffer Config.
    pub const DOORBELL_BUFFER_CONFIG: u16 = 1 << 8;
    /// Get LBA Status.
    pub const GET_LBA_STATUS: u16 = 1 << 9;
    /// Command and Feature Lockdown.
    pub const LOCKDOWN: u16 = 1 << 10;
}

/// FRMW (firmware updates) fields.
pub mod frmw {
    /// Slot 1 is read only.
    pub const SLOT1_RO: u8 = 1 << 0;
    /// Number of firmware slots: bits 3:1.
    pub const NUM_SLOTS_SHIFT: u32 = 1;
    /// Mask of the number of firmware slots after shifting.
    pub const NUM_SLOTS_MASK: u8 = 0x7;
    /// Firmware activation without reset.
    pub const ACTIVATION_WITHOUT_RESET: u8 = 1 << 4;
}

/// LPA (log page attributes) bits.
pub mod lpa {
    /// SMART / Health log page per namespace.
    pub const SMART_PER_NS: u8 = 1 << 0;
    /// Commands Supported and Effects log page.
    pub const CMDS_EFFECTS: u8 = 1 << 1;
    /// Extended data (NUMDU, offsets) for Get Log Page.
    pub const EXTENDED_DATA: u8 = 1 << 2;
    /// Telemetry logs.
    pub const TELEMETRY: u8 = 1 << 3;
    /// Persistent Event log.
    pub const PERSISTENT_EVENT: u8 = 1 << 4;
    /// Supported Log Pages, Commands Supported and Effects, Feature Identifiers log pages.
    pub const MISC: u8 = 1 << 5;
    /// Telemetry Data Area 4.
    pub const TELEMETRY_DA4: u8 = 1 << 6;
}

/// ANACAP (asymmetric namespace access capabilities) bits.
pub mod anacap {
    /// Reports ANA Optimized state.
    pub const OPTIMIZED: u8 = 1 << 0;
    /// Reports ANA Non-Optimized state.
    pub const NON_OPTIMIZED: u8 = 1 << 1;
    /// Reports ANA Inaccessible state.
    pub const INACCESSIBLE: u8 = 1 << 2;
    /// Reports ANA Persistent Loss state.
    pub const PERSISTENT_LOSS: u8 = 1 << 3;
    /// Reports ANA Change state.
    pub const CHANGE: u8 = 1 << 4;
    /// ANAGRPID does not change while the namespace is attached.
    pub const NO_CHANGE_ANAGRPID: u8 = 1 << 6;
    /// Non-zero ANAGRPID supported in Namespace Management.
    pub const NON_ZERO_ANAGRPID: u8 = 1 << 7;
}

/// SQES / CQES: bits 3:0 required (minimum) entry size, bits 7:4 maximum, both as log2 of bytes.
pub const fn queue_entry_sizes(min_log2: u8, max_log2: u8) -> u8 {
    (min_log2 & 0xf) | (max_log2 << 4)
}

/// ONCS (optional NVM command support) bits.
pub mod oncs {
    /// Compare.
    pub const COMPARE: u16 = 1 << 0;
    /// Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u16 = 1 << 1;
    /// Dataset Management.
    pub const DSM: u16 = 1 << 2;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u16 = 1 << 3;
    /// Save field in Set Features, Select field in Get Features.
    pub const SAVE_SELECT: u16 = 1 << 4;
    /// Reservations.
    pub const RESERVATIONS: u16 = 1 << 5;
    /// Timestamp feature.
    pub const TIMESTAMP: u16 = 1 << 6;
    /// Verify.
    pub const VERIFY: u16 = 1 << 7;
    /// Copy.
    pub const COPY: u16 = 1 << 8;
}

/// FUSES (fused operation support) bits.
pub mod fuses {
    /// Compare and Write fused operation.
    pub const COMPARE_AND_WRITE: u16 = 1 << 0;
}

/// FNA (format NVM attributes) bits.
pub mod fna {
    /// Format applies to all namespaces.
    pub const FORMAT_ALL_NS: u8 = 1 << 0;
    /// Secure erase applies to all namespaces.
    pub const ERASE_ALL_NS: u8 = 1 << 1;
    /// Cryptographic erase supported.
    pub const CRYPTO_ERASE: u8 = 1 << 2;
}

/// VWC (volatile write cache) fields.
pub mod vwc {
    /// A volatile write cache is present.
    pub const PRESENT: u8 = 1 << 0;
    /// Flush with NSID FFFFFFFFh: bits 2:1 = 10b, not supported.
    pub const FLUSH_BROADCAST_NOT_SUPPORTED: u8 = 0b10 << 1;
    /// Flush with NSID FFFFFFFFh: bits 2:1 = 11b, supported.
    pub const FLUSH_BROADCAST_SUPPORTED: u8 = 0b11 << 1;
}

/// OCFS (optional copy formats supported) bits.
pub mod ocfs {
    /// Copy descriptor format 0.
    pub const FORMAT0: u16 = 1 << 0;
    /// Copy descriptor format 1.
    pub const FORMAT1: u16 = 1 << 1;
}

/// SGLS (SGL support) fields.
pub mod sgls {
    /// Bits 1:0 = 01b: SGLs supported, no alignment requirement.
    pub const SUPPORTED: u32 = 0b01;
    /// Bits 1:0 = 10b: SGLs supported, dword alignment and granularity.
    pub const SUPPORTED_DWORD_ALIGNED: u32 = 0b10;
    /// Mask of the support field.
    pub const SUPPORT_MASK: u32 = 0b11;
    /// Keyed SGL Data Block descriptor (RDMA).
    pub const KEYED: u32 = 1 << 2;
    /// SGL Bit Bucket descriptor.
    pub const BIT_BUCKET: u32 = 1 << 16;
    /// Byte-aligned contiguous physical buffer of metadata.
    pub const METADATA_POINTER: u32 = 1 << 17;
    /// SGL longer than the data transferred.
    pub const OVERSIZED: u32 = 1 << 18;
    /// MPTR pointing to an SGL segment.
    pub const METADATA_ADDRESS: u32 = 1 << 19;
    /// Address field as an offset (in-capsule data).
    pub const OFFSET: u32 = 1 << 20;
    /// Transport SGL Data Block descriptor.
    pub const TRANSPORT: u32 = 1 << 21;
}

/// FCATT (NVMe-oF controller attributes) bits.
pub mod fcatt {
    /// Static controller model (clear: dynamic).
    pub const STATIC_MODEL: u8 = 1 << 0;
}

/// OFCS (NVMe-oF optional fabrics commands supported) bits.
pub mod ofcs {
    /// Disconnect command and individual I/O queue deletion.
    pub const DISCONNECT: u16 = 1 << 0;
}

layout! {
    /// Identify Controller data structure (CNS 01h), 4096 bytes.
    ///
    /// Covers the controller, admin and NVM command set attributes, the subsystem NQN and the NVMe-oF
    /// attributes. Power state descriptors (2048..3071) and the vendor specific area are not modelled:
    /// `encode` writes them as zero and `decode` skips them.
    pub struct CtrlrData [IDENTIFY_DATA_SIZE] {
        /// PCI Vendor ID.
        vid: u16 = 0,
        /// PCI Subsystem Vendor ID.
        ssvid: u16 = 2,
        /// Serial Number: ASCII, space padded (see [`set_space_padded`]).
        sn: [u8; SN_LEN] = 4,
        /// Model Number: ASCII, space padded.
        mn: [u8; MN_LEN] = 24,
        /// Firmware Revision: ASCII, space padded.
        fr: [u8; FR_LEN] = 64,
        /// Recommended Arbitration Burst (log2).
        rab: u8 = 72,
        /// IEEE OUI Identifier, least significant byte first.
        ieee: [u8; 3] = 73,
        /// Multi-path I/O and namespace sharing capabilities ([`cmic`]).
        cmic: u8 = 76,
        /// Maximum Data Transfer Size: log2 in units of CAP.MPSMIN pages; 0 = no limit.
        mdts: u8 = 77,
        /// Controller ID.
        cntlid: u16 = 78,
        /// Version, same layout as the VS register (major 31:16, minor 15:8, tertiary 7:0).
        ver: u32 = 80,
        /// RTD3 Resume Latency (microseconds).
        rtd3r: u32 = 84,
        /// RTD3 Entry Latency (microseconds).
        rtd3e: u32 = 88,
        /// Optional Asynchronous Events Supported ([`oaes`]).
        oaes: u32 = 92,
        /// Controller Attributes ([`ctratt`]).
        ctratt: u32 = 96,
        /// Read Recovery Levels Supported.
        rrls: u16 = 100,
        /// Controller Type ([`cntrltype`]).
        cntrltype: u8 = 111,
        /// FRU Globally Unique Identifier.
        fguid: [u8; 16] = 112,
        /// Command Retry Delay Time 1 (100 ms units).
        crdt1: u16 = 128,
        /// Command Retry Delay Time 2.
        crdt2: u16 = 130,
        /// Command Retry Delay Time 3.
        crdt3: u16 = 132,
        /// NVM Subsystem Report (NVMe-MI).
        nvmsr: u8 = 253,
        /// VPD Write Cycle Information (NVMe-MI).
        vwci: u8 = 254,
        /// Management Endpoint Capabilities (NVMe-MI).
        mec: u8 = 255,
        /// Optional Admin Command Support ([`oacs`]).
        oacs: u16 = 256,
        /// Abort Command Limit (0's based).
        acl: u8 = 258,
        /// Asynchronous Event Request Limit (0's based).
        aerl: u8 = 259,
        /// Firmware Updates ([`frmw`]).
        frmw: u8 = 260,
        /// Log Page Attributes ([`lpa`]).
        lpa: u8 = 261,
        /// Error Log Page Entries (0's based).
        elpe: u8 = 262,
        /// Number of Power States Support (0's based).
        npss: u8 = 263,
        /// Admin Vendor Specific Command Configuration.
        avscc: u8 = 264,
        /// Autonomous Power State Transition Attributes.
        apsta: u8 = 265,
        /// Warning Composite Temperature Threshold (Kelvin).
        wctemp: u16 = 266,
        /// Critical Composite Temperature Threshold (Kelvin).
        cctemp: u16 = 268,
        /// Maximum Time for Firmware Activation (100 ms units).
        mtfa: u16 = 270,
        /// Host Memory Buffer Preferred Size (4 KiB units).
        hmpre: u32 = 272,
        /// Host Memory Buffer Minimum Size (4 KiB units).
        hmmin: u32 = 276,
        /// Total NVM Capacity (bytes).
        tnvmcap: u128 = 280,
        /// Unallocated NVM Capacity (bytes).
        unvmcap: u128 = 296,
        /// Replay Protected Memory Block Support.
        rpmbs: u32 = 312,
        /// Extended Device Self-test Time (minutes).
        edstt: u16 = 316,
        /// Device Self-test Options.
        dsto: u8 = 318,
        /// Firmware Update Granularity (4 KiB units).
        fwug: u8 = 319,
        /// Keep Alive Support: timer granularity in 100 ms units; 0 = not supported.
        kas: u16 = 320,
        /// Host Controlled Thermal Management Attributes.
        hctma: u16 = 322,
        /// Minimum Thermal Management Temperature (Kelvin).
        mntmt: u16 = 324,
        /// Maximum Thermal Management Temperature (Kelvin).
        mxtmt: u16 = 326,
        /// Sanitize Capabilities.
        sanicap: u32 = 328,
        /// Host Memory Buffer Minimum Descriptor Entry Size (4 KiB units).
        hmminds: u32 = 332,
        /// Host Memory Maximum Descriptors Entries.
        hmmaxd: u16 = 336,
        /// NVM Set Identifier Maximum.
        nsetidmax: u16 = 338,
        /// Endurance Group Identifier Maximum.
        endgidmax: u16 = 340,
        /// ANA Transition Time (seconds).
        anatt: u8 = 342,
        /// Asymmetric Namespace Access Capabilities ([`anacap`]).
        anacap: u8 = 343,
        /// ANA Group Identifier Maximum.
        anagrpmax: u32 = 344,
        /// Number of ANA Group Identifiers.
        nanagrpid: u32 = 348,
        /// Persistent Event Log Size (64 KiB units).
        pels: u32 = 352,
        /// Domain Identifier.
        domainid: u16 = 356,
        /// Max Endurance Group Capacity (bytes).
        megcap: u128 = 368,
        /// Command Quiesce Time (ms; 0: not reported), NVMe 2.0 communication loss handling.
        cqt: u16 = 386,
        /// Submission Queue Entry Size ([`queue_entry_sizes`]); 0x66 for 64-byte entries.
        sqes: u8 = 512,
        /// Completion Queue Entry Size; 0x44 for 16-byte entries.
        cqes: u8 = 513,
        /// Maximum Outstanding Commands (NVMe-oF).
        maxcmd: u16 = 514,
        /// Number of Namespaces (the largest valid NSID).
        nn: u32 = 516,
        /// Optional NVM Command Support ([`oncs`]).
        oncs: u16 = 520,
        /// Fused Operation Support ([`fuses`]).
        fuses: u16 = 522,
        /// Format NVM Attributes ([`fna`]).
        fna: u8 = 524,
        /// Volatile Write Cache ([`vwc`]).
        vwc: u8 = 525,
        /// Atomic Write Unit Normal (0's based, logical blocks).
        awun: u16 = 526,
        /// Atomic Write Unit Power Fail (0's based, logical blocks).
        awupf: u16 = 528,
        /// I/O Command Set Vendor Specific Command Configuration.
        icsvscc: u8 = 530,
        /// Namespace Write Protection Capabilities.
        nwpc: u8 = 531,
        /// Atomic Compare & Write Unit (0's based, logical blocks).
        acwu: u16 = 532,
        /// Optional Copy Formats Supported ([`ocfs`]).
        ocfs: u16 = 534,
        /// SGL Support ([`sgls`]).
        sgls: u32 = 536,
        /// Maximum Number of Allowed Namespaces.
        mnan: u32 = 540,
        /// Maximum Domain Namespace Attachments.
        maxdna: u128 = 544,
        /// Maximum I/O Controller Namespace Attachments.
        maxcna: u32 = 560,
        /// NVM Subsystem NVMe Qualified Name: UTF-8, NUL padded (see [`set_nul_padded`]).
        subnqn: [u8; NQN_FIELD_LEN] = 768,
        /// I/O Queue Command Capsule Supported Size (16-byte units, NVMe-oF).
        ioccsz: u32 = 1792,
        /// I/O Queue Response Capsule Supported Size (16-byte units, NVMe-oF).
        iorcsz: u32 = 1796,
        /// In Capsule Data Offset (16-byte units, NVMe-oF).
        icdoff: u16 = 1800,
        /// Fabrics Controller Attributes ([`fcatt`]).
        fcatt: u8 = 1802,
        /// Maximum SGL Data Block Descriptors (0 = no limit, NVMe-oF).
        msdbd: u8 = 1803,
        /// Optional Fabric Commands Support ([`ofcs`]).
        ofcs: u16 = 1804,
    }
}

/// One LBA Format entry of [`NsData::lbaf`] (4 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LbaFormat {
    /// Metadata Size in bytes per logical block.
    pub ms: u16,
    /// LBA Data Size as log2 of bytes (9 = 512, 12 = 4096); 0 = format not available.
    pub lbads: u8,
    /// Relative Performance in bits 1:0 (0 best .. 3 degraded); bits 7:2 reserved, kept as read.
    pub rp: u8,
}

impl LbaFormat {
    /// Data size in bytes, `None` when `lbads` is not a usable shift.
    pub fn data_size(&self) -> Option<u64> {
        1u64.checked_shl(u32::from(self.lbads))
    }
}

impl Wire for LbaFormat {
    const SIZE: usize = 4;
    fn get(b: &[u8]) -> Self {
        LbaFormat {
            ms: u16::get(b),
            lbads: b[2],
            rp: b[3],
        }
    }
    fn put(&self, b: &mut [u8]) {
        self.ms.put(b);
        b[2] = self.lbads;
        b[3] = self.rp;
    }
    fn zero() -> Self {
        LbaFormat::default()
    }
}

/// Number of LBA format entries in [`NsData::lbaf`] (NVMe 2.0; 1.4 had 16, the rest were reserved).
pub const LBAF_COUNT: usize = 64;

/// NSFEAT (namespace features) bits.
pub mod nsfeat {
    /// Thin provisioning.
    pub const THIN_PROVISIONING: u8 = 1 << 0;
    /// NAWUN, NAWUPF and NACWU are defined for this namespace.
    pub const NS_ATOMICS: u8 = 1 << 1;
    /// Deallocated or Unwritten Logical Block error supported.
    pub const DULBE: u8 = 1 << 2;
    /// NGUID and EUI64 are never reused.
    pub const UID_REUSE: u8 = 1 << 3;
    /// NPWG, NPWA, NPDG, NPDA and NOWS are defined.
    pub const OPTPERF: u8 = 1 << 4;
}

/// FLBAS (formatted LBA size) fields.
pub mod flbas {
    /// Low four bits of the format index.
    pub const FORMAT_LOW_MASK: u8 = 0x0f;
    /// Metadata transferred at the end of the data LBA (extended LBA).
    pub const EXTENDED: u8 = 1 << 4;
    /// Bits 6:5 hold bits 5:4 of the format index when more than 16 formats exist.
    pub const FORMAT_HIGH_MASK: u8 = 0x60;
}

/// NMIC (namespace multi-path I/O and sharing capabilities) bits.
pub mod nmic {
    /// The namespace may be attached to two or more controllers.
    pub const SHARED: u8 = 1 << 0;
}

/// RESCAP (reservation capabilities) bits.
pub mod rescap {
    /// Persist Through Power Loss.
    pub const PTPL: u8 = 1 << 0;
    /// Write Exclusive.
    pub const WRITE_EXCLUSIVE: u8 = 1 << 1;
    /// Exclusive Access.
    pub const EXCLUSIVE_ACCESS: u8 = 1 << 2;
    /// Write Exclusive - Registrants Only.
    pub const WRITE_EXCLUSIVE_REG_ONLY: u8 = 1 << 3;
    /// Exclusive Access - Registrants Only.
    pub const EXCLUSIVE_ACCESS_REG_ONLY: u8 = 1 << 4;
    /// Write Exclusive - All Registrants.
    pub const WRITE_EXCLUSIVE_ALL_REGS: u8 = 1 << 5;
    /// Exclusive Access - All Registrants.
    pub const EXCLUSIVE_ACCESS_ALL_REGS: u8 = 1 << 6;
    /// Ignore Existing Key (1.3 behaviour).
    pub const IGNORE_EXISTING_KEY: u8 = 1 << 7;
}

layout! {
    /// Identify Namespace data structure for the NVM command set (CNS 00h), 4096 bytes.
    ///
    /// The vendor specific area (384..4095) is not modelled.
    pub struct NsData [IDENTIFY_DATA_SIZE] {
        /// Namespace Size (logical blocks).
        nsze: u64 = 0,
        /// Namespace Capacity (logical blocks).
        ncap: u64 = 8,
        /// Namespace Utilization (logical blocks).
        nuse: u64 = 16,
        /// Namespace Features ([`nsfeat`]).
        nsfeat: u8 = 24,
        /// Number of LBA Formats (0's based).
        nlbaf: u8 = 25,
        /// Formatted LBA Size ([`flbas`], [`NsData::format_index`]).
        flbas: u8 = 26,
        /// Metadata Capabilities.
        mc: u8 = 27,
        /// End-to-end Data Protection Capabilities.
        dpc: u8 = 28,
        /// End-to-end Data Protection Type Settings.
        dps: u8 = 29,
        /// Multi-path I/O and Namespace Sharing Capabilities ([`nmic`]).
        nmic: u8 = 30,
        /// Reservation Capabilities ([`rescap`]).
        rescap: u8 = 31,
        /// Format Progress Indicator.
        fpi: u8 = 32,
        /// Deallocate Logical Block Features.
        dlfeat: u8 = 33,
        /// Namespace Atomic Write Unit Normal.
        nawun: u16 = 34,
        /// Namespace Atomic Write Unit Power Fail.
        nawupf: u16 = 36,
        /// Namespace Atomic Compare & Write Unit.
        nacwu: u16 = 38,
        /// Namespace Atomic Boundary Size Normal.
        nabsn: u16 = 40,
        /// Namespace Atomic Boundary Offset.
        nabo: u16 = 42,
        /// Namespace Atomic Boundary Size Power Fail.
        nabspf: u16 = 44,
        /// Namespace Optimal I/O Boundary (logical blocks).
        noiob: u16 = 46,
        /// NVM Capacity (bytes).
        nvmcap: u128 = 48,
        /// Namespace Preferred Write Granularity (0's based).
        npwg: u16 = 64,
        /// Namespace Preferred Write Alignment (0's based).
        npwa: u16 = 66,
        /// Namespace Preferred Deallocate Granularity (0's based).
        npdg: u16 = 68,
        /// Namespace Preferred Deallocate Alignment (0's based).
        npda: u16 = 70,
        /// Namespace Optimal Write Size (0's based).
        nows: u16 = 72,
        /// Maximum Single Source Range Length (Copy).
        mssrl: u16 = 74,
        /// Maximum Copy Length.
        mcl: u32 = 76,
        /// Maximum Source Range Count (0's based).
        msrc: u8 = 80,
        /// ANA Group Identifier.
        anagrpid: u32 = 92,
        /// Namespace Attributes (bit 0: write protected).
        nsattr: u8 = 99,
        /// NVM Set Identifier.
        nvmsetid: u16 = 100,
        /// Endurance Group Identifier.
        endgid: u16 = 102,
        /// Namespace Globally Unique Identifier, bytes as transmitted.
        nguid: [u8; 16] = 104,
        /// IEEE Extended Unique Identifier, bytes as transmitted.
        eui64: [u8; 8] = 120,
        /// LBA Format Support.
        lbaf: [LbaFormat; LBAF_COUNT] = 128,
    }
}

impl NsData {
    /// The index into [`NsData::lbaf`] that FLBAS selects (bits 3:0, plus bits 6:5 as bits 5:4 when the
    /// namespace has more than 16 formats).
    pub fn format_index(&self) -> usize {
        let low = usize::from(self.flbas & flbas::FORMAT_LOW_MASK);
        if self.nlbaf >= 16 {
            low | (usize::from(self.flbas & flbas::FORMAT_HIGH_MASK) >> 1)
        } else {
            low
        }
    }

    /// Sets the format index bits of FLBAS, leaving the extended bit alone.
    ///
    /// Indexes of 64 and above do not fit; they are reported as [`ProtoError::Invalid`].
    pub fn set_format_index(&mut self, index: usize) -> Result<(), ProtoError> {
        if index >= LBAF_COUNT {
            return Err(ProtoError::Invalid {
                what: "FLBAS format index",
                value: index as u64,
            });
        }
        let index = index as u8;
        self.flbas = (self.flbas & flbas::EXTENDED)
            | (index & flbas::FORMAT_LOW_MASK)
            | ((index << 1) & flbas::FORMAT_HIGH_MASK);
        Ok(())
    }

    /// The LBA format in use.
    pub fn current_lbaf(&self) -> LbaFormat {
        self.lbaf[self.format_index()]
    }
}

/// NSTAT (namespace status) bits of [`IocsIndepNsData`].
pub mod nstat {
    /// Namespace ready.
    pub const READY: u8 = 1 << 0;
}

layout! {
    /// I/O Command Set Independent Identify Namespace data structure (CNS 08h), 4096 bytes.
    pub struct IocsIndepNsData [IDENTIFY_DATA_SIZE] {
        /// Common Namespace Features.
        nsfeat: u8 = 0,
        /// Multi-path I/O and Namespace Sharing Capabilities ([`nmic`]).
        nmic: u8 = 1,
        /// Reservation Capabilities ([`rescap`]).
        rescap: u8 = 2,
        /// Format Progress Indicator.
        fpi: u8 = 3,
        /// ANA Group Identifier.
        anagrpid: u32 = 4,
        /// Namespace Attributes.
        nsattr: u8 = 8,
        /// NVM Set Identifier.
        nvmsetid: u16 = 10,
        /// Endurance Group Identifier.
        endgid: u16 = 12,
        /// Namespace Status ([`nstat`]).
        nstat: u8 = 14,
    }
}

/// Maximum number of NSIDs in a Namespace ID list (4096 / 4).
pub const NS_LIST_MAX: usize = IDENTIFY_DATA_SIZE / 4;

/// Encodes a Namespace ID list (CNS 02h active, CNS 10h allocated) into `out[..4096]`.
///
/// Writes the NSIDs of `nsids` that are greater than `after` (the NSID in the command), up to 1024 of
/// them, and zeroes the rest, which terminates the list. `nsids` must be in increasing order, as the
/// list must be; this function does not sort (it does not allocate). Returns how many NSIDs it wrote.
///
/// # Panics
///
/// If `out` is shorter than 4096 bytes.
pub fn encode_ns_list<I: IntoIterator<Item = u32>>(nsids: I, after: u32, out: &mut [u8]) -> usize {
    let out = &mut out[..IDENTIFY_DATA_SIZE];
    out.fill(0);
    let mut n = 0;
    for (slot, nsid) in out
        .chunks_exact_mut(4)
        .zip(nsids.into_iter().filter(|&id| id > after))
    {
        slot.copy_from_slice(&nsid.to_le_bytes());
        n += 1;
    }
    n
}

/// Decodes a Namespace ID list: the NSIDs up to the first zero entry or the end of `buf`, at most 1024.
///
/// A buffer shorter than 4096 bytes is read as far as it goes (a trailing partial entry is ignored),
/// so this never fails today; it returns `Result` like the other decoders.
pub fn decode_ns_list(buf: &[u8]) -> Result<Vec<u32>, ProtoError> {
    Ok(buf
        .chunks_exact(4)
        .take(NS_LIST_MAX)
        .map(u32::get)
        .take_while(|&id| id != 0)
        .collect())
}

/// Namespace Identifier Types (NIDT) of the Namespace Identification Descriptor list.
pub mod nidt {
    /// IEEE Extended Unique Identifier, NIDL 8.
    pub const EUI64: u8 = 0x01;
    /// Namespace Globally Unique Identifier, NIDL 16.
    pub const NGUID: u8 = 0x02;
    /// Namespace UUID, NIDL 16.
    pub const UUID: u8 = 0x03;
    /// Command Set Identifier, NIDL 1.
    pub const CSI: u8 = 0x04;
}

/// One Namespace Identification Descriptor (CNS 03h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NsIdDesc {
    /// IEEE EUI-64, bytes as transmitted.
    Eui64([u8; 8]),
    /// NGUID, bytes as transmitted.
    Nguid([u8; 16]),
    /// UUID, bytes in RFC 4122 (big-endian) order.
    Uuid([u8; 16]),
    /// Command Set Identifier ([`csi`]).
    Csi(u8),
}

impl NsIdDesc {
    /// Namespace Identifier Type.
    pub fn nidt(&self) -> u8 {
        match self {
            NsIdDesc::Eui64(_) => nidt::EUI64,
            NsIdDesc::Nguid(_) => nidt::NGUID,
            NsIdDesc::Uuid(_) => nidt::UUID,
            NsIdDesc::Csi(_) => nidt::CSI,
        }
    }

    /// The identifier bytes; their length is the NIDL field.
    pub fn nid(&self) -> &[u8] {
        match self {
            NsIdDesc::Eui64(b) => b,
            NsIdDesc::Nguid(b) | NsIdDesc::Uuid(b) => b,
            NsIdDesc::Csi(b) => std::slice::from_ref(b),
        }
    }

    /// Encoded size: the 4-byte header plus the identifier.
    pub fn encoded_len(&self) -> usize {
        4 + self.nid().len()
    }
}

/// Encodes a Namespace Identification Descriptor list into `out[..4096]`, rest zeroed.
///
/// Descriptors are packed back to back (header: NIDT, NIDL, 2 reserved bytes; then NIDL bytes); the
/// zeroed remainder terminates the list. Returns the bytes used, or [`ProtoError::Invalid`] if the
/// descriptors do not fit in 4096 bytes.
///
/// # Panics
///
/// If `out` is shorter than 4096 bytes.
pub fn encode_ns_id_descs(descs: &[NsIdDesc], out: &mut [u8]) -> Result<usize, ProtoError> {
    let out = &mut out[..IDENTIFY_DATA_SIZE];
    let total: usize = descs.iter().map(NsIdDesc::encoded_len).sum();
    if total > IDENTIFY_DATA_SIZE {
        return Err(ProtoError::Invalid {
            what: "namespace identification descriptor list length",
            value: total as u64,
        });
    }
    out.fill(0);
    let mut pos = 0;
    for d in descs {
        let nid = d.nid();
        out[pos] = d.nidt();
        out[pos + 1] = nid.len() as u8;
        out[pos + 4..pos + 4 + nid.len()].copy_from_slice(nid);
        pos += d.encoded_len();
    }
    Ok(pos)
}

/// Decodes a Namespace Identification Descriptor list.
///
/// Stops at a descriptor whose NIDT or NIDL is zero, or when fewer than 4 bytes remain. Descriptors of
/// unknown type are skipped (later specifications add types). Errors: a descriptor running past the end
/// of `buf` ([`ProtoError::Short`]), a known type with the wrong NIDL ([`ProtoError::Invalid`]).
pub fn decode_ns_id_descs(buf: &[u8]) -> Result<Vec<NsIdDesc>, ProtoError> {
    let mut descs = Vec::new();
    let mut pos = 0;
    while buf.len() - pos >= 4 {
        let (t, l) = (buf[pos], usize::from(buf[pos + 1]));
        if t == 0 || l == 0 {
            break;
        }
        let end = pos + 4 + l;
        if end > buf.len() {
            return Err(ProtoError::Short {
                what: "namespace identification descriptor",
                need: end,
                got: buf.len(),
            });
        }
        let nid = &buf[pos + 4..end];
        let want = match t {
            nidt::EUI64 => Some(8),
            nidt::NGUID | nidt::UUID => Some(16),
            nidt::CSI => Some(1),
            _ => None,
        };
        if let Some(want) = want {
            if l != want {
                return Err(ProtoError::Invalid {
                    what: "namespace identification descriptor NIDL",
                    value: l as u64,
                });
            }
            descs.push(match t {
                nidt::EUI64 => NsIdDesc::Eui64(Wire::get(nid)),
                nidt::NGUID => NsIdDesc::Nguid(Wire::get(nid)),
                nidt::UUID => NsIdDesc::Uuid(Wire::get(nid)),
                _ => NsIdDesc::Csi(nid[0]),
            });
        }
        pos = end;
    }
    Ok(descs)
}

/// Writes `s` into a fixed ASCII field, padded with spaces (SN, MN, FR, discovery TRADDR / TRSVCID).
///
/// Errors: `s` longer than the field, or a byte outside printable ASCII (0x20..=0x7e), which the
/// specification does not allow in these fields. On error `dst` is unchanged.
pub fn set_space_padded(dst: &mut [u8], s: &str) -> Result<(), ProtoError> {
    if s.len() > dst.len() {
        return Err(ProtoError::Invalid {
            what: "string length",
            value: s.len() as u64,
        });
    }
    if let Some(&b) = s.as_bytes().iter().find(|b| !(0x20..=0x7e).contains(*b)) {
        return Err(ProtoError::Invalid {
            what: "non-printable ASCII byte",
            value: u64::from(b),
        });
    }
    dst[..s.len()].copy_from_slice(s.as_bytes());
    dst[s.len()..].fill(b' ');
    Ok(())
}

/// Writes `s` into a fixed field, padded with NULs (NQNs).
///
/// Errors: `s` does not leave room for at least one terminating NUL, or contains a NUL. On error `dst`
/// is unchanged.
pub fn set_nul_padded(dst: &mut [u8], s: &str) -> Result<(), ProtoError> {
    if s.len() >= dst.len() {
        return Err(ProtoError::Invalid {
            what: "string length",
            value: s.len() as u64,
        });
    }
    if s.as_bytes().contains(&0) {
        return Err(ProtoError::Invalid {
            what: "NUL inside string",
            value: 0,
        });
    }
    dst[..s.len()].copy_from_slice(s.as_bytes());
    dst[s.len()..].fill(0);
    Ok(())
}

/// Reads a padded string field: up to the first NUL, trailing spaces removed. Works for both paddings.
///
/// Errors: the bytes are not UTF-8 ([`ProtoError::Invalid`] with the offset of the first bad byte).
pub fn padded_str(field: &[u8]) -> Result<&str, ProtoError> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let s = std::str::from_utf8(&field[..end]).map_err(|e| ProtoError::Invalid {
        what: "string encoding",
        value: e.valid_up_to() as u64,
    })?;
    Ok(s.trim_end_matches(' '))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn sample_ctrlr() -> CtrlrData {
        let mut c = CtrlrData {
            vid: 0x8086,
            ssvid: 0x8087,
            ieee: [0xe4, 0xd2, 0x5c],
            cmic: cmic::MPORTS | cmic::MCTRS | cmic::ANARS,
            mdts: 5,
            cntlid: 0x1234,
            ver: 0x0001_0300,
            oaes: oaes::NS_ATTRIBUTE | oaes::ANA_CHANGE,
            ctratt: ctratt::HOST_ID_128,
            cntrltype: cntrltype::IO,
            crdt1: 1,
            crdt2: 2,
            crdt3: 3,
            oacs: oacs::NS_MANAGEMENT,
            acl: 3,
            aerl: 3,
            frmw: 3,
            lpa: lpa::CMDS_EFFECTS | lpa::EXTENDED_DATA,
            elpe: 127,
            wctemp: 343,
            cctemp: 373,
            tnvmcap: 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10,
            kas: 10,
            anatt: 10,
            anacap: anacap::OPTIMIZED | anacap::INACCESSIBLE,
            anagrpmax: 32,
            nanagrpid: 32,
            sqes: queue_entry_sizes(6, 6),
            cqes: queue_entry_sizes(4, 4),
            maxcmd: 128,
            nn: 32,
            oncs: oncs::DSM | oncs::WRITE_ZEROES | oncs::RESERVATIONS,
            fuses: fuses::COMPARE_AND_WRITE,
            vwc: vwc::PRESENT | vwc::FLUSH_BROADCAST_NOT_SUPPORTED,
            awun: 7,
            awupf: 6,
            acwu: 1,
            ocfs: ocfs::FORMAT0,
            sgls: sgls::SUPPORTED | sgls::OFFSET,
            mnan: 32,
            ioccsz: 260,
            iorcsz: 1,
            icdoff: 0,
            fcatt: 0,
            msdbd: 1,
            ofcs: ofcs::DISCONNECT,
            ..CtrlrData::default()
        };
        set_space_padded(&mut c.sn, "SPDK00000000000001").unwrap();
        set_space_padded(&mut c.mn, "SPDK bdev Controller").unwrap();
        set_space_padded(&mut c.fr, "25.01").unwrap();
        set_nul_padded(&mut c.subnqn, "nqn.2016-06.io.spdk:cnode1").unwrap();
        c
    }

    #[test]
    fn ctrlr_offsets() {
        let c = sample_ctrlr();
        let mut b = vec![0xaau8; 4200];
        c.encode(&mut b);
        assert_eq!(u16_at(&b, 0), 0x8086);
        assert_eq!(u16_at(&b, 2), 0x8087);
        assert_eq!(&b[4..22], b"SPDK00000000000001");
        assert_eq!(&b[22..24], b"  ");
        assert_eq!(&b[24..44], b"SPDK bdev Controller");
        assert!(b[44..64].iter().all(|&x| x == b' '));
        assert_eq!(&b[64..72], b"25.01   ");
        assert_eq!(&b[73..76], &[0xe4, 0xd2, 0x5c]);
        assert_eq!(b[76], 0x0b);
        assert_eq!(b[77], 5);
        assert_eq!(u16_at(&b, 78), 0x1234);
        assert_eq!(u32_at(&b, 80), 0x0001_0300);
        assert_eq!(u32_at(&b, 92), (1 << 8) | (1 << 11));
        assert_eq!(b[111], 1);
        assert_eq!(
            (u16_at(&b, 128), u16_at(&b, 130), u16_at(&b, 132)),
            (1, 2, 3)
        );
        assert_eq!(u16_at(&b, 256), 1 << 3);
        assert_eq!(b[262], 127);
        assert_eq!(u16_at(&b, 266), 343);
        assert_eq!(b[280], 0x10);
        assert_eq!(b[295], 0x01);
        assert_eq!(u16_at(&b, 320), 10);
        assert_eq!(b[342], 10);
        assert_eq!(u32_at(&b, 344), 32);
        assert_eq!(b[512], 0x66);
        assert_eq!(b[513], 0x44);
        assert_eq!(u16_at(&b, 514), 128);
        assert_eq!(u32_at(&b, 516), 32);
        assert_eq!(u16_at(&b, 520), 0x2c);
        assert_eq!(u16_at(&b, 522), 1);
        assert_eq!(b[525], 0x05);
        assert_eq!(u32_at(&b, 536), 0x0010_0001);
        assert_eq!(u32_at(&b, 540), 32);
        assert_eq!(&b[768..794], b"nqn.2016-06.io.spdk:cnode1");
        assert!(b[794..1024].iter().all(|&x| x == 0));
        assert_eq!(u32_at(&b, 1792), 260);
        assert_eq!(u32_at(&b, 1796), 1);
        assert_eq!(b[1803], 1);
        assert_eq!(u16_at(&b, 1804), 1);
        // Reserved bytes are zeroed, bytes past the structure untouched.
        assert!(b[134..253].iter().all(|&x| x == 0));
        assert!(b[1806..4096].iter().all(|&x| x == 0));
        assert!(b[4096..].iter().all(|&x| x == 0xaa));
    }

    #[test]
    fn ctrlr_round_trip() {
        let c = sample_ctrlr();
        let mut b = [0u8; 4096];
        c.encode(&mut b);
        let d = CtrlrData::decode(&b).unwrap();
        assert_eq!(d, c);
        assert_eq!(padded_str(&d.sn).unwrap(), "SPDK00000000000001");
        assert_eq!(padded_str(&d.fr).unwrap(), "25.01");
        assert_eq!(padded_str(&d.subnqn).unwrap(), "nqn.2016-06.io.spdk:cnode1");
        assert_eq!(
            CtrlrData::decode(&b[..4095]),
            Err(ProtoError::Short {
                what: "CtrlrData",
                need: 4096,
                got: 4095
            })
        );
    }

    fn sample_ns() -> NsData {
        let mut n = NsData {
            nsze: 0x1_0000_0000,
            ncap: 0x1_0000_0000,
            nuse: 0x8000,
            nsfeat: nsfeat::THIN_PROVISIONING | nsfeat::OPTPERF,
            nlbaf: 1,
            dps: 0,
            nmic: nmic::SHARED,
            rescap: 0x7f,
            nawupf: 7,
            noiob: 256,
            nvmcap: 1 << 40,
            npwg: 7,
            mcl: 0x10000,
            msrc: 0,
            anagrpid: 3,
            nvmsetid: 1,
            endgid: 2,
            nguid: *b"0123456789abcdef",
            eui64: [1, 2, 3, 4, 5, 6, 7, 8],
            ..NsData::default()
        };
        n.lbaf[0] = LbaFormat {
            ms: 0,
            lbads: 9,
            rp: 0,
        };
        n.lbaf[1] = LbaFormat {
            ms: 8,
            lbads: 12,
            rp: 2,
        };
        n.lbaf[63] = LbaFormat {
            ms: 64,
            lbads: 12,
            rp: 3,
        };
        n.set_format_index(1).unwrap();
        n
    }

    #[test]
    fn ns_offsets() {
        let n = sample_ns();
        let mut b = [0xffu8; 4096];
        n.encode(&mut b);
        assert_eq!(u32_at(&b, 0), 0);
        assert_eq!(u32_at(&b, 4), 1);
        assert_eq!(u32_at(&b, 16), 0x8000);
        assert_eq!(b[24], 0x11);
        assert_eq!(b[25], 1);
        assert_eq!(b[26], 1);
        assert_eq!(b[30], 1);
        assert_eq!(b[31], 0x7f);
        assert_eq!(u16_at(&b, 36), 7);
        assert_eq!(u16_at(&b, 46), 256);
        assert_eq!(b[48 + 5], 1);
        assert_eq!(u16_at(&b, 64), 7);
        assert_eq!(u32_at(&b, 76), 0x10000);
        assert_eq!(u32_at(&b, 92), 3);
        assert_eq!(u16_at(&b, 100), 1);
        assert_eq!(u16_at(&b, 102), 2);
        assert_eq!(&b[104..120], b"0123456789abcdef");
        assert_eq!(&b[120..128], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[128..132], &[0, 0, 9, 0]);
        assert_eq!(&b[132..136], &[8, 0, 12, 2]);
        assert_eq!(&b[380..384], &[64, 0, 12, 3]);
        assert!(b[384..].iter().all(|&x| x == 0));
        assert_eq!(n.current_lbaf().data_size(), Some(4096));
    }

    #[test]
    fn ns_round_trip() {
        let n = sample_ns();
        let mut b = [0u8; 4096];
        n.encode(&mut b);
        assert_eq!(NsData::decode(&b).unwrap(), n);
        assert!(NsData::decode(&b[..100]).is_err());
    }

    #[test]
    fn format_index_high_bits() {
        let mut n = NsData {
            nlbaf: 63,
            flbas: flbas::EXTENDED,
            ..NsData::default()
        };
        n.set_format_index(0x2b).unwrap();
        assert_eq!(n.flbas, flbas::EXTENDED | 0x0b | (0b10 << 5));
        assert_eq!(n.format_index(), 0x2b);
        // With 16 or fewer formats the high bits are ignored.
        n.nlbaf = 15;
        assert_eq!(n.format_index(), 0x0b);
        assert!(n.set_format_index(64).is_err());
    }

    #[test]
    fn iocs_indep_round_trip() {
        let n = IocsIndepNsData {
            nmic: 1,
            anagrpid: 9,
            nstat: nstat::READY,
            endgid: 4,
            ..Default::default()
        };
        let mut b = [0u8; 4096];
        n.encode(&mut b);
        assert_eq!(u32_at(&b, 4), 9);
        assert_eq!(b[14], 1);
        assert_eq!(u16_at(&b, 12), 4);
        assert_eq!(IocsIndepNsData::decode(&b).unwrap(), n);
    }

    #[test]
    fn ns_list() {
        let mut b = [0xffu8; 4096];
        assert_eq!(encode_ns_list([1, 2, 5, 9], 2, &mut b), 2);
        assert_eq!(u32_at(&b, 0), 5);
        assert_eq!(u32_at(&b, 4), 9);
        assert!(b[8..].iter().all(|&x| x == 0));
        assert_eq!(decode_ns_list(&b).unwrap(), vec![5, 9]);

        assert_eq!(encode_ns_list(1..=5000, 0, &mut b), 1024);
        assert_eq!(u32_at(&b, 4092), 1024);
        let l = decode_ns_list(&b).unwrap();
        assert_eq!(l.len(), 1024);
        assert_eq!(l[1023], 1024);
        assert_eq!(decode_ns_list(&b[..10]).unwrap(), vec![1, 2]);
    }

    #[test]
    fn ns_id_descs() {
        let descs = [
            NsIdDesc::Eui64([1, 2, 3, 4, 5, 6, 7, 8]),
            NsIdDesc::Nguid([0x11; 16]),
            NsIdDesc::Uuid([0x22; 16]),
            NsIdDesc::Csi(csi::NVM),
        ];
        let mut b = [0xffu8; 4096];
        let n = encode_ns_id_descs(&descs, &mut b).unwrap();
        assert_eq!(n, 12 + 20 + 20 + 5);
        assert_eq!(&b[0..4], &[1, 8, 0, 0]);
        assert_eq!(&b[4..12], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[12..16], &[2, 16, 0, 0]);
        assert_eq!(&b[32..36], &[3, 16, 0, 0]);
        assert_eq!(&b[52..57], &[4, 1, 0, 0, 0]);
        assert!(b[57..].iter().all(|&x| x == 0));
        assert_eq!(decode_ns_id_descs(&b).unwrap(), descs);

        // Unknown types are skipped, a wrong NIDL for a known type is an error, truncation is Short.
        let mut u = [0u8; 64];
        u[..6].copy_from_slice(&[0x7f, 2, 0, 0, 9, 9]);
        u[6..11].copy_from_slice(&[4, 1, 0, 0, 2]);
        assert_eq!(decode_ns_id_descs(&u).unwrap(), vec![NsIdDesc::Csi(2)]);
        u[1] = 0;
        assert_eq!(decode_ns_id_descs(&u).unwrap(), Vec::<NsIdDesc>::new());
        let bad = [nidt::EUI64, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            decode_ns_id_descs(&bad),
            Err(ProtoError::Invalid { value: 7, .. })
        ));
        assert!(matches!(
            decode_ns_id_descs(&b[..20]),
            Err(ProtoError::Short {
                need: 32,
                got: 20,
                ..
            })
        ));

        let many = [NsIdDesc::Uuid([0; 16]); 205];
        assert!(encode_ns_id_descs(&many, &mut b).is_err());
    }

    #[test]
    fn strings() {
        let mut f = [0u8; 8];
        assert!(set_space_padded(&mut f, "123456789").is_err());
        assert!(set_space_padded(&mut f, "a\u{7f}").is_err());
        assert!(set_space_padded(&mut f, "é").is_err());
        set_space_padded(&mut f, "12345678").unwrap();
        assert_eq!(padded_str(&f).unwrap(), "12345678");
        assert!(set_nul_padded(&mut f, "12345678").is_err());
        assert!(set_nul_padded(&mut f, "a\0b").is_err());
        set_nul_padded(&mut f, "abc").unwrap();
        assert_eq!(&f, b"abc\0\0\0\0\0");
        assert_eq!(padded_str(&f).unwrap(), "abc");
        assert_eq!(
            padded_str(&[b'a', 0xff]),
            Err(ProtoError::Invalid {
                what: "string encoding",
                value: 1
            })
        );
        assert_eq!(
            ProtoError::Short {
                what: "x",
                need: 4,
                got: 2
            }
            .to_string(),
            "x: buffer too short, need 4 bytes, got 2"
        );
    }

    proptest! {
        #[test]
        fn decoders_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..4200)) {
            let _ = CtrlrData::decode(&buf);
            let _ = NsData::decode(&buf);
            let _ = IocsIndepNsData::decode(&buf);
            let _ = decode_ns_list(&buf);
            let _ = decode_ns_id_descs(&buf);
            let _ = padded_str(&buf);
        }

        #[test]
        fn descs_never_panic(buf in proptest::collection::vec(0u8..6, 0..200)) {
            // Small byte values hit the known NIDT / short NIDL paths far more often than random bytes.
            let _ = decode_ns_id_descs(&buf);
        }

        #[test]
        fn ctrlr_reencodes(buf in proptest::collection::vec(any::<u8>(), 4096..=4096)) {
            let c = CtrlrData::decode(&buf).unwrap();
            let mut out = [0u8; 4096];
            c.encode(&mut out);
            prop_assert_eq!(CtrlrData::decode(&out).unwrap(), c);
        }

        #[test]
        fn ns_reencodes(buf in proptest::collection::vec(any::<u8>(), 4096..=4096)) {
            let n = NsData::decode(&buf).unwrap();
            let mut out = [0u8; 4096];
            n.encode(&mut out);
            prop_assert_eq!(&out[..384], &buf[..384].iter().enumerate().map(|(i, &b)| {
                // Reserved ranges inside the modelled part come back zeroed.
                if (81..92).contains(&i) || (96..99).contains(&i) { 0 } else { b }
            }).collect::<Vec<u8>>()[..]);
            prop_assert_eq!(NsData::decode(&out).unwrap(), n);
        }
    }
}
