//! Feature bits and the virtio-blk configuration space a controller offers.

use bdev::{Bdev, IoType};

/// Largest discard, in 512-byte sectors (16 MiB, as SPDK).
pub const MAX_DISCARD_SECTORS: u32 = 32768;
/// Largest write-zeroes, in 512-byte sectors (16 MiB, as SPDK).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 32768;
/// `seg_max`: SPDK's `SPDK_VHOST_IOVS_MAX - 2 - 1`.
pub const SEG_MAX: u32 = 126;
/// `size_max`: largest single segment.
pub const SIZE_MAX: u32 = 131072;
/// Queues a front end may use.
pub const MAX_QUEUES: u16 = 64;

/// virtio feature bits.
pub mod bits {
    /// Maximum segment size in config.
    pub const BLK_F_SIZE_MAX: u64 = 1 << 1;
    /// Maximum segment count in config.
    pub const BLK_F_SEG_MAX: u64 = 1 << 2;
    /// Read-only device.
    pub const BLK_F_RO: u64 = 1 << 5;
    /// Block size in config.
    pub const BLK_F_BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command.
    pub const BLK_F_FLUSH: u64 = 1 << 9;
    /// Topology in config.
    pub const BLK_F_TOPOLOGY: u64 = 1 << 10;
    /// Multiple queues.
    pub const BLK_F_MQ: u64 = 1 << 12;
    /// Discard command.
    pub const BLK_F_DISCARD: u64 = 1 << 13;
    /// Write-zeroes command.
    pub const BLK_F_WRITE_ZEROES: u64 = 1 << 14;
    /// Indirect descriptors.
    pub const RING_F_INDIRECT_DESC: u64 = 1 << 28;
    /// Event index notification suppression.
    pub const RING_F_EVENT_IDX: u64 = 1 << 29;
    /// vhost-user protocol features negotiation.
    pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
    /// virtio 1.0.
    pub const F_VERSION_1: u64 = 1 << 32;
    /// Packed virtqueues.
    pub const F_RING_PACKED: u64 = 1 << 34;
}

/// Static description of what a controller exports.
#[derive(Clone, Debug)]
pub struct BlkInfo {
    /// Block size.
    pub block_size: u32,
    /// Number of blocks (0 once the bdev is gone).
    pub num_blocks: u64,
    /// Physical block size (0 = block size).
    pub physical_block_size: u32,
    /// Flush supported.
    pub flush: bool,
    /// Unmap supported.
    pub unmap: bool,
    /// Write zeroes supported.
    pub write_zeroes: bool,
}

impl BlkInfo {
    /// From a bdev.
    pub fn of(b: &Bdev) -> Self {
        BlkInfo {
            block_size: b.block_size(),
            num_blocks: b.num_blocks(),
            physical_block_size: b.params().physical_block_size,
            flush: b.io_type_supported(IoType::Flush),
            unmap: b.io_type_supported(IoType::Unmap),
            write_zeroes: b.io_type_supported(IoType::WriteZeroes),
        }
    }
}

/// The virtio features a controller offers.
pub fn features(info: &BlkInfo, readonly: bool, packed: bool) -> u64 {
    use bits::*;
    let mut f = F_VERSION_1
        | VHOST_USER_F_PROTOCOL_FEATURES
        | RING_F_EVENT_IDX
        | RING_F_INDIRECT_DESC
        | BLK_F_SIZE_MAX
        | BLK_F_SEG_MAX
        | BLK_F_BLK_SIZE
        | BLK_F_TOPOLOGY
        | BLK_F_MQ;
    if info.flush {
        f |= BLK_F_FLUSH;
    }
    if info.unmap {
        f |= BLK_F_DISCARD;
    }
    if info.write_zeroes {
        f |= BLK_F_WRITE_ZEROES;
    }
    if readonly {
        f |= BLK_F_RO;
    }
    if packed {
        f |= F_RING_PACKED;
    }
    f
}

/// Size of the config space we describe (`struct virtio_blk_config` up to the zoned fields).
pub const CONFIG_LEN: usize = 96;

/// `struct virtio_blk_config` (little endian) for `info`.
pub fn config_space(info: &BlkInfo) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let put =
        |c: &mut [u8; CONFIG_LEN], off: usize, b: &[u8]| c[off..off + b.len()].copy_from_slice(b);
    let bs = info.block_size.max(1) as u64;
    let capacity = info.num_blocks.saturating_mul(bs) / 512;
    put(&mut c, 0, &capacity.to_le_bytes());
    put(&mut c, 8, &SIZE_MAX.to_le_bytes());
    put(&mut c, 12, &SEG_MAX.to_le_bytes());
    // geometry (16..20) left zero: not offered.
    put(&mut c, 20, &info.block_size.to_le_bytes());
    let phys = if info.physical_block_size > info.block_size {
        (info.physical_block_size / info.block_size.max(1)).trailing_zeros() as u8
    } else {
        0
    };
    c[24] = phys; // physical_block_exp
    c[25] = 0; // alignment_offset
    put(&mut c, 26, &1u16.to_le_bytes()); // min_io_size (blocks)
    put(&mut c, 28, &0u32.to_le_bytes()); // opt_io_size
    c[32] = 0; // wce
    put(&mut c, 34, &MAX_QUEUES.to_le_bytes()); // num_queues (QEMU overrides)
    if info.unmap {
        put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(&mut c, 40, &1u32.to_le_bytes());
        put(&mut c, 44, &((info.block_size / 512).max(1)).to_le_bytes());
    }
    if info.write_zeroes {
        put(&mut c, 48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        put(&mut c, 52, &1u32.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let info = BlkInfo {
            block_size: 4096,
            num_blocks: 256,
            physical_block_size: 0,
            flush: true,
            unmap: true,
            write_zeroes: true,
        };
        let c = config_space(&info);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        let f = features(&info, true, false);
        assert_ne!(f & bits::BLK_F_RO, 0);
        assert_eq!(f & bits::F_RING_PACKED, 0);
    }
}
