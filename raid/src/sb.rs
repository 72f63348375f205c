//! The on-disk raid superblock, in SPDK's layout (little endian), stored at block 0 of every member, inside the
//! region reserved in front of the data (`data_offset`).
//!
//! ```text
//! header (256 bytes)                          base bdev entry (64 bytes each, `base_bdevs_size` of them)
//!   0  signature "SPDKRAID"                     0  uuid (16, RFC byte order)
//!   8  version major u16 (1), minor u16 (0)    16  data_offset u64 (blocks)
//!  12  length u32 (header + entries)           24  data_size u64 (blocks)
//!  16  crc32c u32 (over `length` bytes, this   32  state u32 (missing/configured/failed/spare)
//!      field zeroed; seed 0, no final xor)     36  flags u32
//!  20  flags u32                               40  slot u8
//!  24  uuid (16)                               41  reserved (23)
//!  40  name (64, NUL padded)
//! 104  raid_size u64   112 block_size u32   116 level u32   120 strip_size u32 (blocks)   124 state u32
//! 128  seq_number u64  136 num_base_bdevs u8  137 reserved (118)  255 base_bdevs_size u8
//! ```

use uuid::Uuid;

/// Signature at offset 0.
pub const SIGNATURE: &[u8; 8] = b"SPDKRAID";
/// Major version: incremented on breaking layout changes.
pub const VERSION_MAJOR: u16 = 1;
/// Minor version: backwards compatible additions.
pub const VERSION_MINOR: u16 = 0;
/// Size of the name field (the name is at most 63 bytes).
pub const NAME_SIZE: usize = 64;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 256;
/// Size of one base bdev entry.
pub const BASE_LEN: usize = 64;
/// Largest possible superblock (255 entries).
pub const MAX_LENGTH: usize = HEADER_LEN + 255 * BASE_LEN;
/// Bytes reserved in front of the data on every member when a superblock is used.
pub const MIN_DATA_OFFSET_SIZE: u64 = 1024 * 1024;

/// State of a base bdev slot in the superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseState {
    /// No member in this slot.
    Missing,
    /// An in-sync member.
    Configured,
    /// The member failed I/O and was removed.
    Failed,
    /// A spare.
    Spare,
    /// A value this version does not know.
    Unknown(u32),
}

impl BaseState {
    fn from_u32(v: u32) -> BaseState {
        match v {
            0 => BaseState::Missing,
            1 => BaseState::Configured,
            2 => BaseState::Failed,
            3 => BaseState::Spare,
            v => BaseState::Unknown(v),
        }
    }

    fn to_u32(self) -> u32 {
        match self {
            BaseState::Missing => 0,
            BaseState::Configured => 1,
            BaseState::Failed => 2,
            BaseState::Spare => 3,
            BaseState::Unknown(v) => v,
        }
    }
}

/// One base bdev entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SbBase {
    /// UUID of the member bdev.
    pub uuid: Uuid,
    /// Blocks from the start of the member to the start of the data.
    pub data_offset: u64,
    /// Blocks of data on the member.
    pub data_size: u64,
    /// Slot state.
    pub state: BaseState,
    /// Flags (none defined).
    pub flags: u32,
    /// Slot number in the array.
    pub slot: u8,
}

/// A decoded superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Minor version read (written as [`VERSION_MINOR`]).
    pub version_minor: u16,
    /// Flags (none defined).
    pub flags: u32,
    /// UUID of the raid bdev.
    pub uuid: Uuid,
    /// Name of the raid bdev.
    pub name: String,
    /// Size of the raid bdev in blocks.
    pub raid_size: u64,
    /// Block size of the raid (and of every member).
    pub block_size: u32,
    /// SPDK's raid level value (0 raid0, 1 raid1, 95 raid5f, 99 concat).
    pub level: u32,
    /// Strip size in blocks (0 for raid1).
    pub strip_size: u32,
    /// Array state (SPDK leaves it 0).
    pub state: u32,
    /// Incremented on every write; the highest wins at assembly.
    pub seq_number: u64,
    /// Number of slots in the array.
    pub num_base_bdevs: u8,
    /// The slot entries.
    pub base_bdevs: Vec<SbBase>,
}

/// Why a buffer does not hold a usable superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// No superblock, or a corrupt one (SPDK's -EINVAL: the bdev is treated as having none).
    Invalid(String),
    /// The superblock is longer than the buffer: read this many bytes and decode again.
    NeedMore(usize),
}

fn rd_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn rd_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn rd_u64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
fn rd_uuid(b: &[u8], o: usize) -> Uuid {
    Uuid::from_bytes(b[o..o + 16].try_into().expect("16 bytes"))
}

impl Superblock {
    /// Bytes this superblock occupies on disk.
    pub fn length(&self) -> usize {
        HEADER_LEN + BASE_LEN * self.base_bdevs.len()
    }

    /// Serializes with the CRC filled in (the caller bumps `seq_number` first).
    pub fn encode(&self) -> Vec<u8> {
        let len = self.length();
        let mut b = vec![0u8; len];
        b[0..8].copy_from_slice(SIGNATURE);
        b[8..10].copy_from_slice(&VERSION_MAJOR.to_le_bytes());
        b[10..12].copy_from_slice(&VERSION_MINOR.to_le_bytes());
        b[12..16].copy_from_slice(&(len as u32).to_le_bytes());
        b[20..24].copy_from_slice(&self.flags.to_le_bytes());
        b[24..40].copy_from_slice(self.uuid.as_bytes());
        let name = self.name.as_bytes();
        let n = name.len().min(NAME_SIZE - 1);
        b[40..40 + n].copy_from_slice(&name[..n]);
        b[104..112].copy_from_slice(&self.raid_size.to_le_bytes());
        b[112..116].copy_from_slice(&self.block_size.to_le_bytes());
        b[116..120].copy_from_slice(&self.level.to_le_bytes());
        b[120..124].copy_from_slice(&self.strip_size.to_le_bytes());
        b[124..128].copy_from_slice(&self.state.to_le_bytes());
        b[128..136].copy_from_slice(&self.seq_number.to_le_bytes());
        b[136] = self.num_base_bdevs;
        b[255] = self.base_bdevs.len() as u8;
        for (i, e) in self.base_bdevs.iter().enumerate() {
            let o = HEADER_LEN + i * BASE_LEN;
            b[o..o + 16].copy_from_slice(e.uuid.as_bytes());
            b[o + 16..o + 24].copy_from_slice(&e.data_offset.to_le_bytes());
            b[o + 24..o + 32].copy_from_slice(&e.data_size.to_le_bytes());
            b[o + 32..o + 36].copy_from_slice(&e.state.to_u32().to_le_bytes());
            b[o + 36..o + 40].copy_from_slice(&e.flags.to_le_bytes());
            b[o + 40] = e.slot;
        }
        let crc = crc32c(&b, 0);
        b[16..20].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and validates a superblock read from block 0 (SPDK's checks: signature, length, CRC, major
    /// version, slot numbers).
    pub fn decode(buf: &[u8]) -> Result<Superblock, DecodeError> {
        if buf.len() < HEADER_LEN || &buf[0..8] != SIGNATURE {
            return Err(DecodeError::Invalid("invalid signature".into()));
        }
        let len = rd_u32(buf, 12) as usize;
        if len > buf.len() {
            if len > MAX_LENGTH {
                return Err(DecodeError::Invalid(format!(
                    "incorrect superblock length {len}"
                )));
            }
            return Err(DecodeError::NeedMore(len));
        }
        if len < HEADER_LEN {
            return Err(DecodeError::Invalid(format!(
                "incorrect superblock length {len}"
            )));
        }
        let stored = rd_u32(buf, 16);
        let mut tmp = buf[..len].to_vec();
        tmp[16..20].fill(0);
        if crc32c(&tmp, 0) != stored {
            return Err(DecodeError::Invalid("incorrect superblock crc".into()));
        }
        let major = rd_u16(buf, 8);
        if major != VERSION_MAJOR {
            return Err(DecodeError::Invalid(format!(
                "not supported superblock major version {major}"
            )));
        }
        let minor = rd_u16(buf, 10);
        if minor > VERSION_MINOR {
            log::warn!(
                "superblock minor version {minor} is higher than the supported {VERSION_MINOR}"
            );
        }
        let num_base_bdevs = buf[136];
        let size = buf[255] as usize;
        if HEADER_LEN + size * BASE_LEN > len {
            return Err(DecodeError::Invalid(format!(
                "superblock length {len} too small for {size} base bdevs"
            )));
        }
        let name_bytes = &buf[40..40 + NAME_SIZE];
        let end = name_bytes.iter().position(|c| *c == 0).unwrap_or(NAME_SIZE);
        let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
        let mut base_bdevs = Vec::with_capacity(size);
        for i in 0..size {
            let o = HEADER_LEN + i * BASE_LEN;
            let slot = buf[o + 40];
            if slot >= num_base_bdevs {
                return Err(DecodeError::Invalid(format!(
                    "invalid superblock base bdev slot number {slot}"
                )));
            }
            base_bdevs.push(SbBase {
                uuid: rd_uuid(buf, o),
                data_offset: rd_u64(buf, o + 16),
                data_size: rd_u64(buf, o + 24),
                state: BaseState::from_u32(rd_u32(buf, o + 32)),
                flags: rd_u32(buf, o + 36),
                slot,
            });
        }
        Ok(Superblock {
            version_minor: minor,
            flags: rd_u32(buf, 20),
            uuid: rd_uuid(buf, 24),
            name,
            raid_size: rd_u64(buf, 104),
            block_size: rd_u32(buf, 112),
            level: rd_u32(buf, 116),
            strip_size: rd_u32(buf, 120),
            state: rd_u32(buf, 124),
            seq_number: rd_u64(buf, 128),
            num_base_bdevs,
            base_bdevs,
        })
    }
}

const fn crc_table() -> [u32; 256] {
    // CRC-32C (Castagnoli), reflected polynomial.
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut v = i as u32;
        let mut j = 0;
        while j < 8 {
            v = if v & 1 != 0 {
                (v >> 1) ^ 0x82F6_3B78
            } else {
                v >> 1
            };
            j += 1;
        }
        t[i] = v;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// SPDK's `spdk_crc32c_update`: the reflected CRC-32C register update from `crc`, without the conventional
/// inversions (the superblock uses seed 0 and stores the result as is).
pub fn crc32c(data: &[u8], mut crc: u32) -> u32 {
    for &b in data {
        crc = CRC_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            version_minor: 0,
            flags: 0,
            uuid: Uuid::parse_str("11223344-5566-7788-99aa-bbccddeeff00").unwrap(),
            name: "raid_vol".into(),
            raid_size: 63488,
            block_size: 512,
            level: 1,
            strip_size: 0,
            state: 0,
            seq_number: 7,
            num_base_bdevs: 2,
            base_bdevs: vec![
                SbBase {
                    uuid: Uuid::from_u128(1),
                    data_offset: 2048,
                    data_size: 63488,
                    state: BaseState::Configured,
                    flags: 0,
                    slot: 0,
                },
                SbBase {
                    uuid: Uuid::from_u128(2),
                    data_offset: 2048,
                    data_size: 63488,
                    state: BaseState::Failed,
                    flags: 0,
                    slot: 1,
                },
            ],
        }
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The standard CRC-32C of "123456789" is 0xE3069283, i.e. ~update(~0).
        assert_eq!(!crc32c(b"123456789", !0), 0xE306_9283);
    }

    #[test]
    fn layout_offsets_are_spdks() {
        let b = sample().encode();
        assert_eq!(b.len(), 256 + 2 * 64);
        assert_eq!(&b[0..8], b"SPDKRAID");
        assert_eq!(rd_u16(&b, 8), 1);
        assert_eq!(rd_u16(&b, 10), 0);
        assert_eq!(rd_u32(&b, 12), 384);
        assert_eq!(&b[24..40], sample().uuid.as_bytes());
        assert_eq!(&b[40..48], b"raid_vol");
        assert_eq!(rd_u64(&b, 104), 63488);
        assert_eq!(rd_u32(&b, 112), 512);
        assert_eq!(rd_u32(&b, 116), 1);
        assert_eq!(rd_u64(&b, 128), 7);
        assert_eq!(b[136], 2);
        assert_eq!(b[255], 2);
        assert_eq!(rd_u64(&b, 256 + 64 + 16), 2048);
        assert_eq!(rd_u32(&b, 256 + 64 + 32), 2);
        assert_eq!(b[256 + 64 + 40], 1);
        let mut z = b.clone();
        z[16..20].fill(0);
        assert_eq!(rd_u32(&b, 16), crc32c(&z, 0));
    }

    #[test]
    fn roundtrip_and_validation() {
        let s = sample();
        let mut b = s.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), s);
        // Short buffer: asks for the rest.
        assert_eq!(
            Superblock::decode(&b[..300]),
            Err(DecodeError::NeedMore(384))
        );
        // Padding after the superblock does not matter.
        let mut padded = b.clone();
        padded.resize(512, 0xaa);
        assert_eq!(Superblock::decode(&padded).unwrap(), s);
        // Corruption is caught by the CRC.
        b[50] ^= 1;
        assert!(matches!(
            Superblock::decode(&b),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            Superblock::decode(&[0u8; 512]),
            Err(DecodeError::Invalid(_))
        ));
        // A slot beyond num_base_bdevs is rejected.
        let mut bad = sample();
        bad.base_bdevs[1].slot = 5;
        assert!(matches!(
            Superblock::decode(&bad.encode()),
            Err(DecodeError::Invalid(_))
        ));
        // Unknown major version.
        let mut v = sample().encode();
        v[8] = 2;
        v[16..20].fill(0);
        let crc = crc32c(&v, 0);
        v[16..20].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Superblock::decode(&v),
            Err(DecodeError::Invalid(_))
        ));
    }
}
