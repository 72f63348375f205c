//! Fabrics commands (NVMe-oF spec): Connect, Property Get/Set, Disconnect, the Connect data, and the controller
//! properties (registers) a fabrics host reads and writes through Property Get/Set.

use crate::cmd::{le16, le32, le64, put16, put32, put64, Sqe, FABRICS};

/// Fabrics command types (byte 4 of a Fabrics command).
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
    /// Authentication Send.
    pub const AUTHENTICATION_SEND: u8 = 0x05;
    /// Authentication Receive.
    pub const AUTHENTICATION_RECV: u8 = 0x06;
    /// Disconnect.
    pub const DISCONNECT: u8 = 0x08;
}

/// The well-known NQN of the discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Connect command fields (bytes 40.. of the command).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connect {
    /// Record format (0).
    pub recfmt: u16,
    /// Queue identifier: 0 admin, 1.. I/O.
    pub qid: u16,
    /// Submission queue size, 0-based.
    pub sqsize: u16,
    /// Connect attributes (bit 2: SQ flow control disable).
    pub cattr: u8,
    /// Keep alive timeout in milliseconds (admin queue).
    pub kato: u32,
}

impl Connect {
    /// Reads the fields of a Connect command.
    pub fn from_sqe(s: &Sqe) -> Connect {
        Connect {
            recfmt: le16(&s.0, 40),
            qid: le16(&s.0, 42),
            sqsize: le16(&s.0, 44),
            cattr: s.0[46],
            kato: le32(&s.0, 48),
        }
    }

    /// Writes a Connect command (the data pointer is left for the transport to fill).
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut s = Sqe::new(FABRICS, cid);
        s.0[4] = fctype::CONNECT;
        put16(&mut s.0, 40, self.recfmt);
        put16(&mut s.0, 42, self.qid);
        put16(&mut s.0, 44, self.sqsize);
        s.0[46] = self.cattr;
        put32(&mut s.0, 48, self.kato);
        s
    }
}

/// Connect data (1024 bytes, sent as the Connect command's data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectData {
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Controller ID: 0xffff asks for a new controller (dynamic model), else the controller to add a queue to.
    pub cntlid: u16,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
}

/// Why Connect data could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectDataError {
    /// Fewer than 1024 bytes.
    Short(usize),
    /// The subsystem NQN is not NUL-terminated within its 256 bytes or not UTF-8 (byte offset of the field).
    Nqn(usize),
}

impl std::fmt::Display for ConnectDataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectDataError::Short(n) => write!(f, "connect data is {n} bytes, not 1024"),
            ConnectDataError::Nqn(o) => {
                write!(f, "connect data NQN at offset {o} is not terminated text")
            }
        }
    }
}

impl std::error::Error for ConnectDataError {}

impl ConnectData {
    /// Encoded size.
    pub const SIZE: usize = 1024;
    /// Offset of the subsystem NQN.
    pub const SUBNQN_OFFSET: usize = 256;
    /// Offset of the host NQN.
    pub const HOSTNQN_OFFSET: usize = 512;
    /// Controller ID asking for any new controller.
    pub const CNTLID_DYNAMIC: u16 = 0xffff;

    /// Decodes the data; an NQN must end with a NUL within its 256 bytes, as the spec requires (an NQN is at most
    /// 223 bytes), so a host cannot make the target read past the field.
    pub fn decode(b: &[u8]) -> Result<ConnectData, ConnectDataError> {
        if b.len() < Self::SIZE {
            return Err(ConnectDataError::Short(b.len()));
        }
        let nqn = |o: usize| -> Result<String, ConnectDataError> {
            let f = &b[o..o + 256];
            let end = f
                .iter()
                .position(|&c| c == 0)
                .ok_or(ConnectDataError::Nqn(o))?;
            std::str::from_utf8(&f[..end])
                .map(str::to_owned)
                .map_err(|_| ConnectDataError::Nqn(o))
        };
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&b[..16]);
        Ok(ConnectData {
            hostid,
            cntlid: le16(b, 16),
            subnqn: nqn(Self::SUBNQN_OFFSET)?,
            hostnqn: nqn(Self::HOSTNQN_OFFSET)?,
        })
    }

    /// Encodes into `b` (at least 1024 bytes); NQNs longer than 255 bytes are cut.
    pub fn encode(&self, b: &mut [u8]) {
        b[..Self::SIZE].fill(0);
        b[..16].copy_from_slice(&self.hostid);
        put16(b, 16, self.cntlid);
        for (o, s) in [
            (Self::SUBNQN_OFFSET, &self.subnqn),
            (Self::HOSTNQN_OFFSET, &self.hostnqn),
        ] {
            let n = s.len().min(255);
            b[o..o + n].copy_from_slice(&s.as_bytes()[..n]);
        }
    }
}

/// Property Get/Set fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Property {
    /// Size: false 4 bytes, true 8 bytes (attrib bits 0..=2: 0 or 1).
    pub size8: bool,
    /// Property offset.
    pub offset: u32,
    /// Value (Property Set).
    pub value: u64,
}

impl Property {
    /// Reads the fields of a Property Get or Set command; `None` for a reserved size.
    pub fn from_sqe(s: &Sqe) -> Option<Property> {
        let size8 = match s.0[40] & 0x7 {
            0 => false,
            1 => true,
            _ => return None,
        };
        Some(Property {
            size8,
            offset: le32(&s.0, 44),
            value: le64(&s.0, 48),
        })
    }

    /// Writes a Property Get (`set` false) or Set command.
    pub fn to_sqe(&self, set: bool, cid: u16) -> Sqe {
        let mut s = Sqe::new(FABRICS, cid);
        s.0[4] = if set {
            fctype::PROPERTY_SET
        } else {
            fctype::PROPERTY_GET
        };
        s.0[40] = self.size8 as u8;
        put32(&mut s.0, 44, self.offset);
        if set {
            put64(&mut s.0, 48, self.value);
        }
        s
    }
}

/// Controller property (register) offsets.
pub mod reg {
    /// Controller capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version.
    pub const VS: u32 = 0x08;
    /// Interrupt mask set (PCIe only).
    pub const INTMS: u32 = 0x0c;
    /// Interrupt mask clear (PCIe only).
    pub const INTMC: u32 = 0x10;
    /// Controller configuration.
    pub const CC: u32 = 0x14;
    /// Controller status.
    pub const CSTS: u32 = 0x1c;
    /// NVM subsystem reset.
    pub const NSSR: u32 = 0x20;
    /// Admin queue attributes (PCIe only).
    pub const AQA: u32 = 0x24;
    /// Admin submission queue base (PCIe only, 8 bytes).
    pub const ASQ: u32 = 0x28;
    /// Admin completion queue base (PCIe only, 8 bytes).
    pub const ACQ: u32 = 0x30;
}

/// Controller capabilities (CAP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cap {
    /// Maximum queue entries supported, 0-based.
    pub mqes: u16,
    /// Contiguous queues required.
    pub cqr: bool,
    /// Arbitration mechanisms supported (bits 17..=18).
    pub ams: u8,
    /// Worst-case time to ready, in 500 ms units.
    pub to: u8,
    /// Doorbell stride (PCIe): 2^(2 + dstrd) bytes.
    pub dstrd: u8,
    /// NVM subsystem reset supported.
    pub nssrs: bool,
    /// Command sets supported (bit 0 of the field: NVM).
    pub css: u8,
    /// Memory page size minimum: 2^(12 + mpsmin).
    pub mpsmin: u8,
    /// Memory page size maximum.
    pub mpsmax: u8,
}

impl Cap {
    /// The register value.
    pub fn to_u64(&self) -> u64 {
        self.mqes as u64
            | (self.cqr as u64) << 16
            | ((self.ams & 0x3) as u64) << 17
            | (self.to as u64) << 24
            | ((self.dstrd & 0xf) as u64) << 32
            | (self.nssrs as u64) << 36
            | (self.css as u64) << 37
            | ((self.mpsmin & 0xf) as u64) << 48
            | ((self.mpsmax & 0xf) as u64) << 52
    }

    /// Decodes the register.
    pub fn from_u64(v: u64) -> Cap {
        Cap {
            mqes: v as u16,
            cqr: (v >> 16) & 1 != 0,
            ams: ((v >> 17) & 0x3) as u8,
            to: (v >> 24) as u8,
            dstrd: ((v >> 32) & 0xf) as u8,
            nssrs: (v >> 36) & 1 != 0,
            css: (v >> 37) as u8,
            mpsmin: ((v >> 48) & 0xf) as u8,
            mpsmax: ((v >> 52) & 0xf) as u8,
        }
    }
}

/// Controller configuration (CC) fields.
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1;
    /// Shift of the shutdown notification field (2 bits: 0 none, 1 normal, 2 abrupt).
    pub const SHN_SHIFT: u32 = 14;
    /// Mask of SHN after shifting.
    pub const SHN_MASK: u32 = 0x3;
    /// Shift of the I/O submission queue entry size (log2).
    pub const IOSQES_SHIFT: u32 = 16;
    /// Shift of the I/O completion queue entry size (log2).
    pub const IOCQES_SHIFT: u32 = 20;
    /// Shift of the command set selected (3 bits).
    pub const CSS_SHIFT: u32 = 4;
    /// Shift of the memory page size (4 bits).
    pub const MPS_SHIFT: u32 = 7;
    /// Shift of the arbitration mechanism (3 bits).
    pub const AMS_SHIFT: u32 = 11;
}

/// Controller status (CSTS) fields.
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1;
    /// Controller fatal status.
    pub const CFS: u32 = 1 << 1;
    /// Shift of the shutdown status field (0 normal operation, 1 occurring, 2 complete).
    pub const SHST_SHIFT: u32 = 2;
    /// Shutdown processing complete (SHST value).
    pub const SHST_COMPLETE: u32 = 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_round_trip() {
        let c = Connect {
            recfmt: 0,
            qid: 3,
            sqsize: 127,
            cattr: 0,
            kato: 15000,
        };
        let s = c.to_sqe(9);
        assert_eq!(s.fctype(), fctype::CONNECT);
        assert_eq!(s.opc(), FABRICS);
        assert_eq!(Connect::from_sqe(&s), c);
        let d = ConnectData {
            hostid: [7; 16],
            cntlid: 0xffff,
            subnqn: "nqn.2016-06.io.spdk:cnode1".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1".into(),
        };
        let mut b = [0u8; 1024];
        d.encode(&mut b);
        assert_eq!(&b[256..260], b"nqn.");
        assert_eq!(ConnectData::decode(&b).unwrap(), d);
        assert_eq!(
            ConnectData::decode(&b[..100]),
            Err(ConnectDataError::Short(100))
        );
        b[256..512].fill(b'a');
        assert_eq!(ConnectData::decode(&b), Err(ConnectDataError::Nqn(256)));
    }

    #[test]
    fn property_and_cap() {
        let p = Property {
            size8: true,
            offset: reg::CAP,
            value: 0,
        };
        assert_eq!(Property::from_sqe(&p.to_sqe(false, 1)), Some(p));
        let mut s = p.to_sqe(false, 1);
        s.0[40] = 5;
        assert_eq!(Property::from_sqe(&s), None);
        let cap = Cap {
            mqes: 127,
            cqr: true,
            ams: 0,
            to: 15,
            dstrd: 0,
            nssrs: false,
            css: 1,
            mpsmin: 0,
            mpsmax: 0,
        };
        assert_eq!(cap.to_u64(), 127 | 1 << 16 | 15 << 24 | 1 << 37);
        assert_eq!(Cap::from_u64(cap.to_u64()), cap);
    }
}
