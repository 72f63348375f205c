//! Log pages (Get Log Page, NVMe base specification 2.0 and NVMe-oF 1.1 discovery).
//!
//! Fixed-size pages are structs with `encode` / `decode` ([`ErrorInfoEntry`], [`HealthLog`],
//! [`FirmwareSlotLog`], [`CmdsEffectsLog`], [`ReservationNotificationLog`]); list pages have encode /
//! decode functions ([`encode_changed_ns_list`], [`encode_ana_log`], [`encode_discovery_log`]).
//!
//! Get Log Page reads a window of a page (a byte offset and a length). For fixed-size pages the target
//! encodes the whole page into a buffer and copies the window with [`copy_window`]. The variable-size ANA
//! and discovery encoders take the window directly (`offset`, `out`) and return the page's total length,
//! so a large discovery log never needs a buffer of its own.

pub use crate::identify::ProtoError;
use crate::identify::{layout, Wire, NQN_FIELD_LEN};

/// Log Page Identifiers (Get Log Page CDW10 bits 7:0).
pub mod lid {
    /// Supported Log Pages.
    pub const SUPPORTED_LOG_PAGES: u8 = 0x00;
    /// Error Information ([`super::ErrorInfoEntry`] entries).
    pub const ERROR: u8 = 0x01;
    /// SMART / Health Information ([`super::HealthLog`]).
    pub const HEALTH: u8 = 0x02;
    /// Firmware Slot Information ([`super::FirmwareSlotLog`]).
    pub const FIRMWARE_SLOT: u8 = 0x03;
    /// Changed Namespace List ([`super::encode_changed_ns_list`]).
    pub const CHANGED_NS_LIST: u8 = 0x04;
    /// Commands Supported and Effects ([`super::CmdsEffectsLog`]).
    pub const CMDS_EFFECTS: u8 = 0x05;
    /// Device Self-test.
    pub const DEVICE_SELF_TEST: u8 = 0x06;
    /// Telemetry Host-Initiated.
    pub const TELEMETRY_HOST: u8 = 0x07;
    /// Telemetry Controller-Initiated.
    pub const TELEMETRY_CTRLR: u8 = 0x08;
    /// Endurance Group Information.
    pub const ENDURANCE_GROUP_INFO: u8 = 0x09;
    /// Predictable Latency Per NVM Set.
    pub const PREDICTABLE_LATENCY: u8 = 0x0a;
    /// Predictable Latency Event Aggregate.
    pub const PREDICTABLE_LATENCY_EVENT: u8 = 0x0b;
    /// Asymmetric Namespace Access ([`super::encode_ana_log`]).
    pub const ANA: u8 = 0x0c;
    /// Persistent Event Log.
    pub const PERSISTENT_EVENT: u8 = 0x0d;
    /// Endurance Group Event Aggregate.
    pub const ENDURANCE_GROUP_EVENT: u8 = 0x0f;
    /// Media Unit Status.
    pub const MEDIA_UNIT_STATUS: u8 = 0x10;
    /// Supported Capacity Configuration List.
    pub const CAPACITY_CONFIG_LIST: u8 = 0x11;
    /// Feature Identifiers Supported and Effects.
    pub const FEATURE_IDS_EFFECTS: u8 = 0x12;
    /// NVMe-MI Commands Supported and Effects.
    pub const NVME_MI_CMDS_EFFECTS: u8 = 0x13;
    /// Command and Feature Lockdown.
    pub const LOCKDOWN: u8 = 0x14;
    /// Boot Partition.
    pub const BOOT_PARTITION: u8 = 0x15;
    /// Discovery (NVMe-oF discovery controllers, [`super::encode_discovery_log`]).
    pub const DISCOVERY: u8 = 0x70;
    /// Reservation Notification ([`super::ReservationNotificationLog`]).
    pub const RESERVATION_NOTIFICATION: u8 = 0x80;
    /// Sanitize Status.
    pub const SANITIZE_STATUS: u8 = 0x81;
    /// Changed Zone List (ZNS).
    pub const CHANGED_ZONE_LIST: u8 = 0xbf;
}

/// Copies the window `[offset, offset + out.len())` of an encoded `page` into `out`.
///
/// The part of the window past the end of the page is zero filled. Returns how many page bytes were
/// copied (0 when `offset` is at or past the end). Whether an offset past the end is an error (Invalid
/// Field) is the caller's decision.
pub fn copy_window(page: &[u8], offset: u64, out: &mut [u8]) -> usize {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(page.len());
    let n = (page.len() - start).min(out.len());
    out[..n].copy_from_slice(&page[start..start + n]);
    out[n..].fill(0);
    n
}

/// A writer that lays a page out from its beginning but keeps only the bytes inside one window.
struct Window<'a> {
    out: &'a mut [u8],
    offset: u64,
    pos: u64,
}

impl<'a> Window<'a> {
    /// Starts a window at page offset `offset`; `out` is zero filled first, so whatever the page does not
    /// cover reads as zero.
    fn new(offset: u64, out: &'a mut [u8]) -> Self {
        out.fill(0);
        Window {
            out,
            offset,
            pos: 0,
        }
    }

    /// Whether the next `len` page bytes overlap the window (callers skip encoding them if not).
    fn wants(&self, len: usize) -> bool {
        let end = self.offset.saturating_add(self.out.len() as u64);
        self.pos < end && self.pos.saturating_add(len as u64) > self.offset
    }

    /// Advances over `len` page bytes without writing them.
    fn skip(&mut self, len: usize) {
        self.pos = self.pos.saturating_add(len as u64);
    }

    /// Appends `bytes` to the page, copying the part inside the window.
    fn put(&mut self, bytes: &[u8]) {
        if self.wants(bytes.len()) {
            let start = self.pos.max(self.offset);
            let end = (self.pos.saturating_add(bytes.len() as u64))
                .min(self.offset.saturating_add(self.out.len() as u64));
            // Both differences are below the lengths of `bytes` and `out`, so the casts cannot truncate.
            let (src, dst) = ((start - self.pos) as usize, (start - self.offset) as usize);
            let n = (end - start) as usize;
            self.out[dst..dst + n].copy_from_slice(&bytes[src..src + n]);
        }
        self.skip(bytes.len());
    }
}

layout! {
    /// One Error Information log entry (log 01h), 64 bytes; the page is ELPE + 1 of them, newest first.
    pub struct ErrorInfoEntry [64] {
        /// Error Count: unique, incrementing; 0 means the entry is empty.
        error_count: u64 = 0,
        /// Submission Queue ID of the failed command.
        sqid: u16 = 8,
        /// Command ID of the failed command.
        cid: u16 = 10,
        /// Status Field of the completion, shifted left by one (bit 0 is the phase tag).
        status: u16 = 12,
        /// Parameter Error Location: byte (7:0) and bit (10:8) in the command.
        error_location: u16 = 14,
        /// LBA of the first failing block.
        lba: u64 = 16,
        /// Namespace ID.
        nsid: u32 = 24,
        /// Vendor Specific Information Available (log page identifier).
        vs: u8 = 28,
        /// Transport Type (NVMe-oF transports; 0 for PCIe).
        trtype: u8 = 29,
        /// Command Specific Information.
        csi: u64 = 32,
        /// Transport Type Specific Information.
        ttsi: u16 = 40,
    }
}

/// Critical Warning bits of [`HealthLog::critical_warning`].
pub mod critical_warning {
    /// Available spare below threshold.
    pub const AVAILABLE_SPARE: u8 = 1 << 0;
    /// Temperature outside a threshold.
    pub const TEMPERATURE: u8 = 1 << 1;
    /// Reliability degraded.
    pub const RELIABILITY: u8 = 1 << 2;
    /// Media in read only mode.
    pub const READ_ONLY: u8 = 1 << 3;
    /// Volatile memory backup failed.
    pub const VOLATILE_BACKUP: u8 = 1 << 4;
    /// Persistent memory region read only or unreliable.
    pub const PMR_READ_ONLY: u8 = 1 << 5;
}

layout! {
    /// SMART / Health Information log (log 02h), 512 bytes.
    ///
    /// Counters are 128-bit as in the specification. Data units are thousands of 512-byte units.
    pub struct HealthLog [512] {
        /// Critical Warning ([`critical_warning`]).
        critical_warning: u8 = 0,
        /// Composite Temperature (Kelvin).
        temperature: u16 = 1,
        /// Available Spare (percent).
        available_spare: u8 = 3,
        /// Available Spare Threshold (percent).
        available_spare_threshold: u8 = 4,
        /// Percentage Used (may exceed 100).
        percentage_used: u8 = 5,
        /// Endurance Group Critical Warning Summary.
        endurance_group_critical_warning: u8 = 6,
        /// Data Units Read (1000 x 512 bytes, rounded up).
        data_units_read: u128 = 32,
        /// Data Units Written (1000 x 512 bytes, rounded up).
        data_units_written: u128 = 48,
        /// Host Read Commands.
        host_read_commands: u128 = 64,
        /// Host Write Commands.
        host_write_commands: u128 = 80,
        /// Controller Busy Time (minutes).
        controller_busy_time: u128 = 96,
        /// Power Cycles.
        power_cycles: u128 = 112,
        /// Power On Hours.
        power_on_hours: u128 = 128,
        /// Unsafe Shutdowns.
        unsafe_shutdowns: u128 = 144,
        /// Media and Data Integrity Errors.
        media_errors: u128 = 160,
        /// Number of Error Information Log Entries over the controller's life.
        num_error_log_entries: u128 = 176,
        /// Warning Composite Temperature Time (minutes).
        warning_temp_time: u32 = 192,
        /// Critical Composite Temperature Time (minutes).
        critical_temp_time: u32 = 196,
        /// Temperature Sensors 1..8 (Kelvin, 0 = not implemented).
        temp_sensors: [u16; 8] = 200,
        /// Thermal Management Temperature 1 Transition Count.
        tmt1_transition_count: u32 = 216,
        /// Thermal Management Temperature 2 Transition Count.
        tmt2_transition_count: u32 = 220,
        /// Total Time For Thermal Management Temperature 1 (seconds).
        tmt1_total_time: u32 = 224,
        /// Total Time For Thermal Management Temperature 2 (seconds).
        tmt2_total_time: u32 = 228,
    }
}

layout! {
    /// Firmware Slot Information log (log 03h), 512 bytes.
    pub struct FirmwareSlotLog [512] {
        /// Active Firmware Info: bits 2:0 active slot, bits 6:4 slot activated at the next reset.
        afi: u8 = 0,
        /// Firmware Revision for slots 1..7: ASCII, space padded; all zero when the slot is empty.
        frs: [[u8; 8]; 7] = 8,
    }
}

/// Size of the Changed Namespace List log page.
pub const CHANGED_NS_LIST_SIZE: usize = 4096;
/// Most NSIDs the Changed Namespace List holds.
pub const CHANGED_NS_LIST_MAX: usize = CHANGED_NS_LIST_SIZE / 4;
/// First entry of a Changed Namespace List when more than 1024 namespaces changed.
pub const CHANGED_NS_OVERFLOW: u32 = 0xffff_ffff;

/// Encodes the Changed Namespace List (log 04h) into `out[..4096]`.
///
/// NSIDs go in as given (the specification wants increasing order), zero terminated. If `nsids` yields
/// more than 1024, the page is the overflow form instead: first entry FFFFFFFFh, the rest zero.
///
/// # Panics
///
/// If `out` is shorter than 4096 bytes.
pub fn encode_changed_ns_list<I: IntoIterator<Item = u32>>(nsids: I, out: &mut [u8]) {
    let out = &mut out[..CHANGED_NS_LIST_SIZE];
    out.fill(0);
    let mut it = nsids.into_iter();
    for (slot, nsid) in out.chunks_exact_mut(4).zip(it.by_ref()) {
        slot.copy_from_slice(&nsid.to_le_bytes());
    }
    if it.next().is_some() {
        out.fill(0);
        out[..4].copy_from_slice(&CHANGED_NS_OVERFLOW.to_le_bytes());
    }
}

/// A decoded Changed Namespace List.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangedNsList {
    /// These namespaces changed.
    List(Vec<u32>),
    /// More than 1024 namespaces changed: rescan all of them.
    Overflow,
}

/// Decodes a Changed Namespace List: NSIDs up to the first zero or the end of `buf`, at most 1024.
pub fn decode_changed_ns_list(buf: &[u8]) -> Result<ChangedNsList, ProtoError> {
    let ids = || buf.chunks_exact(4).take(CHANGED_NS_LIST_MAX).map(u32::get);
    if ids().next() == Some(CHANGED_NS_OVERFLOW) {
        return Ok(ChangedNsList::Overflow);
    }
    Ok(ChangedNsList::List(
        ids().take_while(|&id| id != 0).collect(),
    ))
}

/// Fields of a Commands Supported and Effects entry ([`CmdsEffectsLog`]).
pub mod effects {
    /// Command Supported.
    pub const CSUPP: u32 = 1 << 0;
    /// Logical Block Content Change.
    pub const LBCC: u32 = 1 << 1;
    /// Namespace Capability Change.
    pub const NCC: u32 = 1 << 2;
    /// Namespace Inventory Change.
    pub const NIC: u32 = 1 << 3;
    /// Controller Capability Change.
    pub const CCC: u32 = 1 << 4;
    /// Command Submission and Execution: shift of the 3-bit field.
    pub const CSE_SHIFT: u32 = 16;
    /// CSE = 001b: no other command for the same namespace outstanding.
    pub const CSE_SINGLE_NS: u32 = 1 << CSE_SHIFT;
    /// CSE = 010b: no other command for any namespace outstanding.
    pub const CSE_SINGLE_CMD: u32 = 2 << CSE_SHIFT;
    /// UUID Selection Supported.
    pub const USS: u32 = 1 << 19;
    /// Command Scope: namespace.
    pub const SCOPE_NS: u32 = 1 << 20;
    /// Command Scope: controller.
    pub const SCOPE_CTRLR: u32 = 1 << 21;
    /// Command Scope: NVM set.
    pub const SCOPE_NVM_SET: u32 = 1 << 22;
    /// Command Scope: endurance group.
    pub const SCOPE_ENDURANCE_GROUP: u32 = 1 << 23;
    /// Command Scope: domain.
    pub const SCOPE_DOMAIN: u32 = 1 << 24;
    /// Command Scope: NVM subsystem.
    pub const SCOPE_SUBSYSTEM: u32 = 1 << 25;
}

layout! {
    /// Commands Supported and Effects log (log 05h), 4096 bytes. Entries are indexed by opcode.
    pub struct CmdsEffectsLog [4096] {
        /// Admin command entries ([`effects`]).
        admin: [u32; 256] = 0,
        /// I/O command entries ([`effects`]).
        io: [u32; 256] = 1024,
    }
}

/// Reservation Notification log page types.
pub mod resv_notif_type {
    /// Empty log page.
    pub const EMPTY: u8 = 0;
    /// Registration Preempted.
    pub const REGISTRATION_PREEMPTED: u8 = 1;
    /// Reservation Released.
    pub const RESERVATION_RELEASED: u8 = 2;
    /// Reservation Preempted.
    pub const RESERVATION_PREEMPTED: u8 = 3;
}

layout! {
    /// Reservation Notification log (log 80h), 64 bytes.
    pub struct ReservationNotificationLog [64] {
        /// Log Page Count: incrementing, 0 means empty.
        log_page_count: u64 = 0,
        /// Reservation Notification Log Page Type ([`resv_notif_type`]).
        log_page_type: u8 = 8,
        /// Number of Available Log Pages after this one (saturates at 255).
        num_avail: u8 = 9,
        /// Namespace ID.
        nsid: u32 = 12,
    }
}

/// ANA states (ANA group descriptor byte 16, bits 3:0).
pub mod ana_state {
    /// Optimized.
    pub const OPTIMIZED: u8 = 0x01;
    /// Non-Optimized.
    pub const NON_OPTIMIZED: u8 = 0x02;
    /// Inaccessible.
    pub const INACCESSIBLE: u8 = 0x03;
    /// Persistent Loss.
    pub const PERSISTENT_LOSS: u8 = 0x04;
    /// Change.
    pub const CHANGE: u8 = 0x0f;
}

/// Get Log Page LSP bit 0 for the ANA log: Return Groups Only (no NSID lists).
pub const ANA_LSP_RGO: u8 = 0x01;

layout! {
    /// ANA log page header, 16 bytes.
    pub struct AnaLogHeader [16] {
        /// Change Count.
        change_count: u64 = 0,
        /// Number of ANA Group Descriptors.
        ngrps: u16 = 8,
    }
}

layout! {
    /// Fixed part of an ANA group descriptor, 32 bytes; `nnsids` NSIDs (u32 each) follow it.
    pub struct AnaGroupDescHeader [32] {
        /// ANA Group ID.
        anagrpid: u32 = 0,
        /// Number of NSID Values that follow.
        nnsids: u32 = 4,
        /// Change Count.
        change_count: u64 = 8,
        /// ANA State ([`ana_state`]), bits 3:0; bits 7:4 reserved.
        state: u8 = 16,
    }
}

/// One ANA group to encode; `nsids` are the group's attached namespaces in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnaGroupDesc<'a> {
    /// ANA Group ID.
    pub anagrpid: u32,
    /// Change Count.
    pub change_count: u64,
    /// ANA State ([`ana_state`]).
    pub state: u8,
    /// Namespaces in the group.
    pub nsids: &'a [u32],
}

/// Total length of the ANA log for `groups`; `rgo` (Return Groups Only) leaves the NSID lists out.
pub fn ana_log_len(groups: &[AnaGroupDesc<'_>], rgo: bool) -> u64 {
    let nsids: u64 = if rgo {
        0
    } else {
        groups.iter().map(|g| g.nsids.len() as u64).sum()
    };
    AnaLogHeader::SIZE as u64 + groups.len() as u64 * AnaGroupDescHeader::SIZE as u64 + 4 * nsids
}

/// Encodes the window `[offset, offset + out.len())` of the ANA log (log 0Ch) into `out` and returns
/// the page's total length ([`ana_log_len`]). Bytes of the window past the page end are zero.
///
/// With `rgo` each descriptor has NNSIDS 0 and no NSID list, as Return Groups Only asks. Errors: more
/// than 65535 groups or more than 2^32 - 1 NSIDs in a group ([`ProtoError::Invalid`]).
pub fn encode_ana_log(
    change_count: u64,
    groups: &[AnaGroupDesc<'_>],
    rgo: bool,
    offset: u64,
    out: &mut [u8],
) -> Result<u64, ProtoError> {
    let ngrps = u16::try_from(groups.len()).map_err(|_| ProtoError::Invalid {
        what: "ANA group count",
        value: groups.len() as u64,
    })?;
    for g in groups {
        u32::try_from(g.nsids.len()).map_err(|_| ProtoError::Invalid {
            what: "ANA group NSID count",
            value: g.nsids.len() as u64,
        })?;
    }
    let mut w = Window::new(offset, out);
    let mut buf = [0u8; AnaGroupDescHeader::SIZE];
    AnaLogHeader {
        change_count,
        ngrps,
    }
    .encode(&mut buf);
    w.put(&buf[..AnaLogHeader::SIZE]);
    for g in groups {
        let nnsids = if rgo { 0 } else { g.nsids.len() };
        if w.wants(AnaGroupDescHeader::SIZE) {
            AnaGroupDescHeader {
                anagrpid: g.anagrpid,
                nnsids: nnsids as u32,
                change_count: g.change_count,
                state: g.state,
            }
            .encode(&mut buf);
            w.put(&buf);
        } else {
            w.skip(AnaGroupDescHeader::SIZE);
        }
        if w.wants(4 * nnsids) {
            for nsid in &g.nsids[..nnsids] {
                w.put(&nsid.to_le_bytes());
            }
        } else {
            w.skip(4 * nnsids);
        }
    }
    Ok(w.pos)
}

/// A decoded ANA group descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnaGroup {
    /// ANA Group ID.
    pub anagrpid: u32,
    /// Change Count.
    pub change_count: u64,
    /// ANA State ([`ana_state`]), the whole byte as read.
    pub state: u8,
    /// NSIDs in the group (empty for Return Groups Only).
    pub nsids: Vec<u32>,
}

/// A decoded ANA log page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnaLog {
    /// Change Count.
    pub change_count: u64,
    /// The group descriptors.
    pub groups: Vec<AnaGroup>,
}

/// Decodes an ANA log page. Errors with [`ProtoError::Short`] when `buf` ends before the header, a
/// descriptor or its NSID list does.
pub fn decode_ana_log(buf: &[u8]) -> Result<AnaLog, ProtoError> {
    let hdr = AnaLogHeader::decode(buf)?;
    let mut pos = AnaLogHeader::SIZE;
    let mut groups = Vec::new();
    for _ in 0..hdr.ngrps {
        let d = AnaGroupDescHeader::decode(&buf[pos..]).map_err(|_| ProtoError::Short {
            what: "ANA group descriptor",
            need: pos + 32,
            got: buf.len(),
        })?;
        pos += AnaGroupDescHeader::SIZE;
        // Check the announced length against the buffer before collecting, so a forged NNSIDS cannot
        // make us reserve memory.
        let need = (d.nnsids as usize).saturating_mul(4).saturating_add(pos);
        if need > buf.len() {
            return Err(ProtoError::Short {
                what: "ANA group NSID list",
                need,
                got: buf.len(),
            });
        }
        let nsids = buf[pos..need].chunks_exact(4).map(u32::get).collect();
        pos = need;
        groups.push(AnaGroup {
            anagrpid: d.anagrpid,
            change_count: d.change_count,
            state: d.state,
            nsids,
        });
    }
    Ok(AnaLog {
        change_count: hdr.change_count,
        groups,
    })
}

/// Transport types (TRTYPE) of discovery log entries and transport IDs.
pub mod trtype {
    /// RDMA.
    pub const RDMA: u8 = 0x01;
    /// Fibre Channel.
    pub const FC: u8 = 0x02;
    /// TCP.
    pub const TCP: u8 = 0x03;
    /// Intra-host (loopback).
    pub const INTRA_HOST: u8 = 0xfe;
}

/// Address families (ADRFAM).
pub mod adrfam {
    /// IPv4.
    pub const IPV4: u8 = 0x01;
    /// IPv6.
    pub const IPV6: u8 = 0x02;
    /// InfiniBand.
    pub const IB: u8 = 0x03;
    /// Fibre Channel.
    pub const FC: u8 = 0x04;
    /// Intra-host.
    pub const INTRA_HOST: u8 = 0xfe;
}

/// Subsystem types (SUBTYPE).
pub mod subtype {
    /// Referral to another discovery service (also the type of a discovery subsystem's own entry before
    /// NVMe-oF 1.1a introduced [`CURRENT_DISCOVERY`]).
    pub const DISCOVERY_REFERRAL: u8 = 0x01;
    /// NVM subsystem.
    pub const NVME: u8 = 0x02;
    /// The discovery subsystem being queried.
    pub const CURRENT_DISCOVERY: u8 = 0x03;
}

/// TREQ (transport requirements) fields.
pub mod treq {
    /// Secure channel: not specified.
    pub const SECURE_CHANNEL_NOT_SPECIFIED: u8 = 0b00;
    /// Secure channel: required.
    pub const SECURE_CHANNEL_REQUIRED: u8 = 0b01;
    /// Secure channel: not required.
    pub const SECURE_CHANNEL_NOT_REQUIRED: u8 = 0b10;
    /// Mask of the secure channel field.
    pub const SECURE_CHANNEL_MASK: u8 = 0b11;
    /// SQ flow control disable supported.
    pub const DISABLE_SQ_FLOW_CONTROL: u8 = 1 << 2;
}

/// EFLAGS (entry flags) bits.
pub mod eflags {
    /// Duplicate Returned Information: other entries lead to the same information.
    pub const DUPRETINFO: u16 = 1 << 0;
    /// Explicit Persistent Connection Support for Discovery.
    pub const EPCSD: u16 = 1 << 1;
}

/// TCP SECTYPE (first byte of TSAS for TRTYPE TCP).
pub mod tcp_sectype {
    /// No security.
    pub const NONE: u8 = 0;
    /// TLS 1.2.
    pub const TLS_1_2: u8 = 1;
    /// TLS 1.3.
    pub const TLS_1_3: u8 = 2;
}

/// Length of [`DiscoveryEntry::trsvcid`].
pub const TRSVCID_LEN: usize = 32;
/// Length of [`DiscoveryEntry::traddr`].
pub const TRADDR_LEN: usize = 256;
/// Length of [`DiscoveryEntry::tsas`].
pub const TSAS_LEN: usize = 256;

layout! {
    /// Discovery log page header (log 70h), 1024 bytes; `numrec` [`DiscoveryEntry`] records follow.
    pub struct DiscoveryLogHeader [1024] {
        /// Generation Counter: changes whenever the log changes, so a host reading in pieces can restart.
        genctr: u64 = 0,
        /// Number of Records.
        numrec: u64 = 8,
        /// Record Format (0).
        recfmt: u16 = 16,
        /// Discovery Log Page Flags (extended entries etc.).
        dlpf: u8 = 18,
        /// Total Discovery Log Page Length (extended format only).
        tdlpl: u32 = 20,
    }
}

layout! {
    /// Discovery log page entry, 1024 bytes.
    pub struct DiscoveryEntry [1024] {
        /// Transport Type ([`trtype`]).
        trtype: u8 = 0,
        /// Address Family ([`adrfam`]).
        adrfam: u8 = 1,
        /// Subsystem Type ([`subtype`]).
        subtype: u8 = 2,
        /// Transport Requirements ([`treq`]).
        treq: u8 = 3,
        /// Port ID.
        portid: u16 = 4,
        /// Controller ID: FFFFh dynamic, FFFEh static with any ID.
        cntlid: u16 = 6,
        /// Admin Max SQ Size.
        asqsz: u16 = 8,
        /// Entry Flags ([`eflags`]).
        eflags: u16 = 10,
        /// Transport Service Identifier (TCP port): ASCII, space padded.
        trsvcid: [u8; TRSVCID_LEN] = 32,
        /// Subsystem NQN: UTF-8, NUL padded.
        subnqn: [u8; NQN_FIELD_LEN] = 256,
        /// Transport Address: ASCII, space padded.
        traddr: [u8; TRADDR_LEN] = 512,
        /// Transport Specific Address Subtype (TCP: byte 0 is [`tcp_sectype`]).
        tsas: [u8; TSAS_LEN] = 768,
    }
}

/// Total length of a discovery log page with `numrec` entries.
pub const fn discovery_log_len(numrec: u64) -> u64 {
    (DiscoveryLogHeader::SIZE as u64)
        .saturating_add(numrec.saturating_mul(DiscoveryEntry::SIZE as u64))
}

/// Encodes the window `[offset, offset + out.len())` of the discovery log (log 70h) into `out` and
/// returns the page's total length ([`discovery_log_len`]).
///
/// The header carries `genctr`, NUMREC = `entries.len()` and RECFMT 0. Bytes of the window past the
/// page end are zero. Entries outside the window are not encoded, so the cost follows the window.
pub fn encode_discovery_log(
    genctr: u64,
    entries: &[DiscoveryEntry],
    offset: u64,
    out: &mut [u8],
) -> u64 {
    let mut w = Window::new(offset, out);
    let mut buf = [0u8; DiscoveryEntry::SIZE];
    if w.wants(DiscoveryLogHeader::SIZE) {
        DiscoveryLogHeader {
            genctr,
            numrec: entries.len() as u64,
            ..DiscoveryLogHeader::default()
        }
        .encode(&mut buf);
        w.put(&buf);
    } else {
        w.skip(DiscoveryLogHeader::SIZE);
    }
    for e in entries {
        if w.wants(DiscoveryEntry::SIZE) {
            e.encode(&mut buf);
            w.put(&buf);
        } else {
            w.skip(DiscoveryEntry::SIZE);
        }
    }
    w.pos
}

/// Decodes a whole discovery log page: the header and its `numrec` entries.
///
/// Errors: `buf` shorter than the header plus NUMREC entries ([`ProtoError::Short`]). A host that reads
/// the page in pieces decodes [`DiscoveryLogHeader`] and [`DiscoveryEntry`] itself.
pub fn decode_discovery_log(
    buf: &[u8],
) -> Result<(DiscoveryLogHeader, Vec<DiscoveryEntry>), ProtoError> {
    let hdr = DiscoveryLogHeader::decode(buf)?;
    let need = discovery_log_len(hdr.numrec);
    if need > buf.len() as u64 {
        let need = usize::try_from(need).unwrap_or(usize::MAX);
        return Err(ProtoError::Short {
            what: "discovery log entries",
            need,
            got: buf.len(),
        });
    }
    // `need` fits in the buffer, so NUMREC is bounded by its length.
    let entries = buf[DiscoveryLogHeader::SIZE..]
        .chunks_exact(DiscoveryEntry::SIZE)
        .take(hdr.numrec as usize)
        .map(DiscoveryEntry::decode)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((hdr, entries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identify::{set_nul_padded, set_space_padded};
    use proptest::prelude::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn copy_window_edges() {
        let page: Vec<u8> = (0..100).collect();
        let mut out = [0xffu8; 30];
        assert_eq!(copy_window(&page, 0, &mut out), 30);
        assert_eq!(out[29], 29);
        assert_eq!(copy_window(&page, 90, &mut out), 10);
        assert_eq!(&out[..10], &page[90..]);
        assert!(out[10..].iter().all(|&b| b == 0));
        out.fill(0xff);
        assert_eq!(copy_window(&page, 100, &mut out), 0);
        assert!(out.iter().all(|&b| b == 0));
        assert_eq!(copy_window(&page, u64::MAX, &mut out), 0);
    }

    #[test]
    fn error_entry() {
        let e = ErrorInfoEntry {
            error_count: 7,
            sqid: 1,
            cid: 0x42,
            status: 0x0002 << 1,
            error_location: 0xffff,
            lba: 0x1234_5678,
            nsid: 1,
            trtype: trtype::TCP,
            csi: 9,
            ..ErrorInfoEntry::default()
        };
        let mut b = [0xffu8; 64];
        e.encode(&mut b);
        assert_eq!(u64_at(&b, 0), 7);
        assert_eq!(u16_at(&b, 8), 1);
        assert_eq!(u16_at(&b, 10), 0x42);
        assert_eq!(u16_at(&b, 12), 4);
        assert_eq!(u64_at(&b, 16), 0x1234_5678);
        assert_eq!(u32_at(&b, 24), 1);
        assert_eq!(b[29], 3);
        assert_eq!(&b[30..32], &[0, 0]);
        assert_eq!(u64_at(&b, 32), 9);
        assert_eq!(ErrorInfoEntry::decode(&b).unwrap(), e);
    }

    #[test]
    fn health() {
        let h = HealthLog {
            critical_warning: critical_warning::TEMPERATURE,
            temperature: 310,
            available_spare: 100,
            available_spare_threshold: 10,
            percentage_used: 3,
            data_units_read: (1 << 64) + 5,
            data_units_written: 6,
            host_read_commands: 7,
            host_write_commands: 8,
            controller_busy_time: 9,
            power_cycles: 10,
            power_on_hours: 11,
            unsafe_shutdowns: 12,
            media_errors: 13,
            num_error_log_entries: 14,
            warning_temp_time: 15,
            critical_temp_time: 16,
            temp_sensors: [300, 301, 0, 0, 0, 0, 0, 0],
            ..HealthLog::default()
        };
        let mut b = [0xffu8; 512];
        h.encode(&mut b);
        assert_eq!(b[0], 2);
        assert_eq!(u16_at(&b, 1), 310);
        assert_eq!((b[3], b[4], b[5]), (100, 10, 3));
        assert_eq!(u64_at(&b, 32), 5);
        assert_eq!(u64_at(&b, 40), 1);
        assert_eq!(u64_at(&b, 48), 6);
        assert_eq!(u64_at(&b, 64), 7);
        assert_eq!(u64_at(&b, 80), 8);
        assert_eq!(u64_at(&b, 96), 9);
        assert_eq!(u64_at(&b, 112), 10);
        assert_eq!(u64_at(&b, 128), 11);
        assert_eq!(u64_at(&b, 144), 12);
        assert_eq!(u64_at(&b, 160), 13);
        assert_eq!(u64_at(&b, 176), 14);
        assert_eq!(u32_at(&b, 192), 15);
        assert_eq!(u32_at(&b, 196), 16);
        assert_eq!(u16_at(&b, 200), 300);
        assert_eq!(u16_at(&b, 202), 301);
        assert!(b[232..].iter().all(|&x| x == 0));
        assert_eq!(HealthLog::decode(&b).unwrap(), h);
    }

    #[test]
    fn firmware_slot() {
        let mut f = FirmwareSlotLog {
            afi: 1,
            ..Default::default()
        };
        set_space_padded(&mut f.frs[0], "25.01").unwrap();
        set_space_padded(&mut f.frs[6], "slot7").unwrap();
        let mut b = [0xffu8; 512];
        f.encode(&mut b);
        assert_eq!(b[0], 1);
        assert!(b[1..8].iter().all(|&x| x == 0));
        assert_eq!(&b[8..16], b"25.01   ");
        assert_eq!(&b[56..64], b"slot7   ");
        assert!(b[64..].iter().all(|&x| x == 0));
        assert_eq!(FirmwareSlotLog::decode(&b).unwrap(), f);
    }

    #[test]
    fn changed_ns_list() {
        let mut b = [0xffu8; 4096];
        encode_changed_ns_list([3, 7], &mut b);
        assert_eq!((u32_at(&b, 0), u32_at(&b, 4), u32_at(&b, 8)), (3, 7, 0));
        assert_eq!(
            decode_changed_ns_list(&b).unwrap(),
            ChangedNsList::List(vec![3, 7])
        );
        encode_changed_ns_list(1..=1024, &mut b);
        assert_eq!(u32_at(&b, 4092), 1024);
        assert_eq!(
            decode_changed_ns_list(&b).unwrap(),
            ChangedNsList::List((1..=1024).collect())
        );
        encode_changed_ns_list(1..=1025, &mut b);
        assert_eq!(u32_at(&b, 0), CHANGED_NS_OVERFLOW);
        assert!(b[4..].iter().all(|&x| x == 0));
        assert_eq!(decode_changed_ns_list(&b).unwrap(), ChangedNsList::Overflow);
        assert_eq!(
            decode_changed_ns_list(&[]).unwrap(),
            ChangedNsList::List(vec![])
        );
    }

    #[test]
    fn cmds_effects() {
        let mut l = CmdsEffectsLog::default();
        l.admin[0x06] = effects::CSUPP;
        l.io[0x01] = effects::CSUPP | effects::LBCC;
        l.io[0xff] = effects::CSUPP | effects::CSE_SINGLE_CMD;
        let mut b = [0xffu8; 4096];
        l.encode(&mut b);
        assert_eq!(u32_at(&b, 0x06 * 4), 1);
        assert_eq!(u32_at(&b, 1024 + 4), 3);
        assert_eq!(u32_at(&b, 1024 + 0xff * 4), 1 | (2 << 16));
        assert!(b[2048..].iter().all(|&x| x == 0));
        assert_eq!(CmdsEffectsLog::decode(&b).unwrap(), l);
    }

    #[test]
    fn reservation_notification() {
        let r = ReservationNotificationLog {
            log_page_count: 2,
            log_page_type: resv_notif_type::RESERVATION_RELEASED,
            num_avail: 1,
            nsid: 5,
        };
        let mut b = [0xffu8; 64];
        r.encode(&mut b);
        assert_eq!(u64_at(&b, 0), 2);
        assert_eq!((b[8], b[9]), (2, 1));
        assert_eq!(u32_at(&b, 12), 5);
        assert_eq!(ReservationNotificationLog::decode(&b).unwrap(), r);
    }

    fn ana_groups() -> (Vec<u32>, Vec<u32>) {
        (vec![1, 2, 3], vec![])
    }

    #[test]
    fn ana() {
        let (a, b2) = ana_groups();
        let groups = [
            AnaGroupDesc {
                anagrpid: 1,
                change_count: 5,
                state: ana_state::OPTIMIZED,
                nsids: &a,
            },
            AnaGroupDesc {
                anagrpid: 2,
                change_count: 6,
                state: ana_state::INACCESSIBLE,
                nsids: &b2,
            },
        ];
        let len = ana_log_len(&groups, false);
        assert_eq!(len, 16 + 32 + 12 + 32);
        let mut b = vec![0xffu8; 200];
        assert_eq!(encode_ana_log(9, &groups, false, 0, &mut b).unwrap(), len);
        assert_eq!(u64_at(&b, 0), 9);
        assert_eq!(u16_at(&b, 8), 2);
        assert_eq!(u32_at(&b, 16), 1);
        assert_eq!(u32_at(&b, 20), 3);
        assert_eq!(u64_at(&b, 24), 5);
        assert_eq!(b[32], 1);
        assert!(b[33..48].iter().all(|&x| x == 0));
        assert_eq!((u32_at(&b, 48), u32_at(&b, 52), u32_at(&b, 56)), (1, 2, 3));
        assert_eq!(u32_at(&b, 60), 2);
        assert_eq!(u32_at(&b, 64), 0);
        assert_eq!(b[76], 3);
        assert!(b[len as usize..].iter().all(|&x| x == 0));

        let d = decode_ana_log(&b).unwrap();
        assert_eq!(d.change_count, 9);
        assert_eq!(
            d.groups,
            vec![
                AnaGroup {
                    anagrpid: 1,
                    change_count: 5,
                    state: 1,
                    nsids: vec![1, 2, 3]
                },
                AnaGroup {
                    anagrpid: 2,
                    change_count: 6,
                    state: 3,
                    nsids: vec![]
                },
            ]
        );

        // Every window agrees with the full page.
        let full = b[..len as usize].to_vec();
        for off in 0..len + 8 {
            for n in [1usize, 3, 7, 16, 100] {
                let mut w = vec![0xaau8; n];
                assert_eq!(encode_ana_log(9, &groups, false, off, &mut w).unwrap(), len);
                let mut want = vec![0u8; n];
                copy_window(&full, off, &mut want);
                assert_eq!(w, want, "offset {off} len {n}");
            }
        }

        // Return Groups Only.
        let rlen = ana_log_len(&groups, true);
        assert_eq!(rlen, 16 + 64);
        assert_eq!(encode_ana_log(9, &groups, true, 0, &mut b).unwrap(), rlen);
        assert_eq!(u32_at(&b, 20), 0);
        assert_eq!(u32_at(&b, 48), 2);
        let d = decode_ana_log(&b).unwrap();
        assert!(d.groups.iter().all(|g| g.nsids.is_empty()));

        assert!(matches!(
            decode_ana_log(&full[..50]),
            Err(ProtoError::Short { need: 60, .. })
        ));
        assert!(matches!(
            decode_ana_log(&full[..40]),
            Err(ProtoError::Short { need: 48, .. })
        ));
    }

    fn tcp_entry(port: &str, addr: &str, nqn: &str) -> DiscoveryEntry {
        let mut e = DiscoveryEntry {
            trtype: trtype::TCP,
            adrfam: adrfam::IPV4,
            subtype: subtype::NVME,
            treq: treq::SECURE_CHANNEL_NOT_REQUIRED,
            portid: 1,
            cntlid: 0xffff,
            asqsz: 128,
            ..DiscoveryEntry::default()
        };
        set_space_padded(&mut e.trsvcid, port).unwrap();
        set_space_padded(&mut e.traddr, addr).unwrap();
        set_nul_padded(&mut e.subnqn, nqn).unwrap();
        e.tsas[0] = tcp_sectype::NONE;
        e
    }

    #[test]
    fn discovery_offsets() {
        let e = DiscoveryEntry {
            subtype: subtype::CURRENT_DISCOVERY,
            eflags: eflags::DUPRETINFO | eflags::EPCSD,
            tsas: [0x5a; TSAS_LEN],
            ..tcp_entry("4420", "127.0.0.1", "nqn.2014-08.org.nvmexpress.discovery")
        };
        let mut b = [0xffu8; 1024];
        e.encode(&mut b);
        assert_eq!(&b[..4], &[3, 1, 3, 2]);
        assert_eq!(u16_at(&b, 4), 1);
        assert_eq!(u16_at(&b, 6), 0xffff);
        assert_eq!(u16_at(&b, 8), 128);
        assert_eq!(u16_at(&b, 10), 3);
        assert!(b[12..32].iter().all(|&x| x == 0));
        assert_eq!(&b[32..36], b"4420");
        assert!(b[36..64].iter().all(|&x| x == b' '));
        assert!(b[64..256].iter().all(|&x| x == 0));
        assert_eq!(&b[256..292], b"nqn.2014-08.org.nvmexpress.discovery");
        assert!(b[292..512].iter().all(|&x| x == 0));
        assert_eq!(&b[512..521], b"127.0.0.1");
        assert!(b[521..768].iter().all(|&x| x == b' '));
        assert!(b[768..].iter().all(|&x| x == 0x5a));
        assert_eq!(DiscoveryEntry::decode(&b).unwrap(), e);
    }

    #[test]
    fn discovery_page() {
        let entries = [
            tcp_entry("4420", "10.0.0.1", "nqn.2016-06.io.spdk:cnode1"),
            tcp_entry("4421", "10.0.0.2", "nqn.2016-06.io.spdk:cnode2"),
            tcp_entry("4422", "10.0.0.3", "nqn.2016-06.io.spdk:cnode3"),
        ];
        let len = discovery_log_len(3);
        assert_eq!(len, 4096);
        let mut page = vec![0xffu8; 4096 + 100];
        assert_eq!(encode_discovery_log(42, &entries, 0, &mut page), len);
        assert_eq!(u64_at(&page, 0), 42);
        assert_eq!(u64_at(&page, 8), 3);
        assert_eq!(u16_at(&page, 16), 0);
        assert!(page[18..1024].iter().all(|&x| x == 0));
        assert_eq!(&page[1024 + 32..1024 + 36], b"4420");
        assert_eq!(&page[2048 + 512..2048 + 520], b"10.0.0.2");
        assert_eq!(&page[3072 + 256..3072 + 282], b"nqn.2016-06.io.spdk:cnode3");
        assert!(page[4096..].iter().all(|&x| x == 0));

        let (hdr, got) = decode_discovery_log(&page).unwrap();
        assert_eq!((hdr.genctr, hdr.numrec, hdr.recfmt), (42, 3, 0));
        assert_eq!(got, entries);
        assert!(matches!(
            decode_discovery_log(&page[..4000]),
            Err(ProtoError::Short {
                need: 4096,
                got: 4000,
                ..
            })
        ));

        // Windows, including ones straddling records and running past the end.
        let full = page[..4096].to_vec();
        for (off, n) in [
            (0u64, 16usize),
            (1020, 8),
            (1024, 1024),
            (2000, 3000),
            (4090, 20),
            (5000, 10),
        ] {
            let mut w = vec![0xaau8; n];
            assert_eq!(encode_discovery_log(42, &entries, off, &mut w), len);
            let mut want = vec![0u8; n];
            copy_window(&full, off, &mut want);
            assert_eq!(w, want, "offset {off} len {n}");
        }

        // An empty log is just the header.
        let mut h = [0xffu8; 1024];
        assert_eq!(encode_discovery_log(1, &[], 0, &mut h), 1024);
        assert!(decode_discovery_log(&h).unwrap().1.is_empty());
    }

    #[test]
    fn discovery_forged_numrec() {
        let mut b = [0u8; 2048];
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode_discovery_log(&b),
            Err(ProtoError::Short { .. })
        ));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = ErrorInfoEntry::decode(&buf);
            let _ = HealthLog::decode(&buf);
            let _ = FirmwareSlotLog::decode(&buf);
            let _ = CmdsEffectsLog::decode(&buf);
            let _ = ReservationNotificationLog::decode(&buf);
            let _ = decode_changed_ns_list(&buf);
            let _ = decode_ana_log(&buf);
            let _ = DiscoveryEntry::decode(&buf);
            let _ = decode_discovery_log(&buf);
        }

        #[test]
        fn ana_small_counts_never_panic(
            ngrps in 0u16..8,
            groups in proptest::collection::vec((any::<u32>(), 0u32..6, any::<u8>()), 0..8),
            tail in 0usize..64,
        ) {
            // Plausible headers with truncated bodies reach the descriptor paths that random bytes rarely do.
            let mut b = vec![0u8; 16];
            b[8..10].copy_from_slice(&ngrps.to_le_bytes());
            for (id, n, state) in groups {
                let mut d = [0u8; 32];
                d[..4].copy_from_slice(&id.to_le_bytes());
                d[4..8].copy_from_slice(&n.to_le_bytes());
                d[16] = state;
                b.extend_from_slice(&d);
                b.extend(std::iter::repeat_n(1u8, 4 * n as usize));
            }
            let cut = b.len().saturating_sub(tail);
            if let Ok(log) = decode_ana_log(&b[..cut]) {
                prop_assert_eq!(log.groups.len(), usize::from(ngrps));
            }
        }

        #[test]
        fn ana_round_trip(
            cc in any::<u64>(),
            groups in proptest::collection::vec(
                (any::<u32>(), any::<u64>(), any::<u8>(), proptest::collection::vec(any::<u32>(), 0..5)),
                0..6,
            ),
        ) {
            let descs: Vec<AnaGroupDesc<'_>> = groups
                .iter()
                .map(|(id, c, s, n)| AnaGroupDesc { anagrpid: *id, change_count: *c, state: *s, nsids: n })
                .collect();
            let len = ana_log_len(&descs, false) as usize;
            let mut b = vec![0u8; len];
            prop_assert_eq!(encode_ana_log(cc, &descs, false, 0, &mut b).unwrap() as usize, len);
            let d = decode_ana_log(&b).unwrap();
            prop_assert_eq!(d.change_count, cc);
            prop_assert_eq!(d.groups.len(), groups.len());
            for (g, (id, c, s, n)) in d.groups.iter().zip(&groups) {
                prop_assert_eq!((g.anagrpid, g.change_count, g.state, &g.nsids), (*id, *c, *s, n));
            }
        }

        #[test]
        fn discovery_entry_reencodes(buf in proptest::collection::vec(any::<u8>(), 1024..=1024)) {
            let e = DiscoveryEntry::decode(&buf).unwrap();
            let mut out = [0u8; 1024];
            e.encode(&mut out);
            prop_assert_eq!(DiscoveryEntry::decode(&out).unwrap(), e);
            // Everything but the reserved ranges comes back byte for byte.
            prop_assert_eq!(&out[..12], &buf[..12]);
            prop_assert_eq!(&out[32..64], &buf[32..64]);
            prop_assert_eq!(&out[256..], &buf[256..]);
        }
    }
}
