//! NVMe/TCP PDUs (NVMe/TCP transport spec): the 8-byte common header, the PDU-specific headers, and the checks
//! a receiver makes on a header before it trusts any length in it.
//!
//! A PDU is: common header, the rest of the PDU header (`hlen` bytes in all), an optional header digest (4
//! bytes, CRC32C of the header), padding up to `pdo`, data, and an optional data digest (4 bytes, CRC32C of
//! the data). `plen` is the whole length.

use crate::cmd::{le16, le32, put16, put32};

/// PDU types.
pub mod pdu_type {
    /// Initialize Connection Request (host to controller).
    pub const IC_REQ: u8 = 0x00;
    /// Initialize Connection Response.
    pub const IC_RESP: u8 = 0x01;
    /// Host to controller termination request.
    pub const H2C_TERM_REQ: u8 = 0x02;
    /// Controller to host termination request.
    pub const C2H_TERM_REQ: u8 = 0x03;
    /// Command capsule.
    pub const CAPSULE_CMD: u8 = 0x04;
    /// Response capsule.
    pub const CAPSULE_RESP: u8 = 0x05;
    /// Host to controller data.
    pub const H2C_DATA: u8 = 0x06;
    /// Controller to host data.
    pub const C2H_DATA: u8 = 0x07;
    /// Ready to transfer.
    pub const R2T: u8 = 0x09;
}

/// Common header flags.
pub mod flags {
    /// A header digest follows the header.
    pub const HDGSTF: u8 = 0x01;
    /// A data digest follows the data.
    pub const DDGSTF: u8 = 0x02;
    /// Last data PDU of a command's transfer (H2C/C2H data).
    pub const LAST_PDU: u8 = 0x04;
    /// C2H data: the command succeeded and no response capsule follows.
    pub const SUCCESS: u8 = 0x08;
}

/// Fatal error status of a termination request.
pub mod fes {
    /// Invalid PDU header field (FEI: its byte offset).
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    /// PDU sequence error.
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    /// Header digest error.
    pub const HDGST_ERROR: u16 = 0x03;
    /// Data transfer out of range.
    pub const DATA_TRANSFER_OUT_OF_RANGE: u16 = 0x04;
    /// Data transfer limit exceeded.
    pub const DATA_TRANSFER_LIMIT_EXCEEDED: u16 = 0x05;
    /// Unsupported parameter (FEI: its byte offset).
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// Size of the common header.
pub const CH_LEN: usize = 8;
/// Size of a digest.
pub const DIGEST_LEN: usize = 4;
/// Header length of ICReq / ICResp.
pub const IC_HLEN: usize = 128;
/// Header length of a command capsule (common header + SQE).
pub const CAPSULE_CMD_HLEN: usize = 72;
/// Header length of a response capsule (common header + CQE).
pub const CAPSULE_RESP_HLEN: usize = 24;
/// Header length of H2C data, C2H data, R2T and termination requests.
pub const DATA_HLEN: usize = 24;
/// The largest PDU header (with digest) a receiver must buffer.
pub const MAX_HDR_LEN: usize = IC_HLEN + DIGEST_LEN;
/// Longest header excerpt a termination request carries.
pub const TERM_REQ_MAX_DATA: usize = 152;

/// The header length each PDU type must have; `None` for unknown types.
pub fn hlen_of(ty: u8) -> Option<usize> {
    Some(match ty {
        pdu_type::IC_REQ | pdu_type::IC_RESP => IC_HLEN,
        pdu_type::CAPSULE_CMD => CAPSULE_CMD_HLEN,
        pdu_type::CAPSULE_RESP => CAPSULE_RESP_HLEN,
        pdu_type::H2C_TERM_REQ
        | pdu_type::C2H_TERM_REQ
        | pdu_type::H2C_DATA
        | pdu_type::C2H_DATA
        | pdu_type::R2T => DATA_HLEN,
        _ => return None,
    })
}

/// The common header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ch {
    /// PDU type.
    pub ty: u8,
    /// Flags.
    pub flags: u8,
    /// Header length.
    pub hlen: u8,
    /// Data offset from the PDU start (0: no data).
    pub pdo: u8,
    /// Total PDU length.
    pub plen: u32,
}

impl Ch {
    /// Decodes the first 8 bytes of `b`.
    #[inline]
    pub fn decode(b: &[u8]) -> Ch {
        Ch {
            ty: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: le32(b, 4),
        }
    }

    /// Encodes into the first 8 bytes of `b`.
    #[inline]
    pub fn encode(&self, b: &mut [u8]) {
        b[0] = self.ty;
        b[1] = self.flags;
        b[2] = self.hlen;
        b[3] = self.pdo;
        put32(b, 4, self.plen);
    }
}

/// Where the parts of a received PDU are, once its common header has been checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Header length (without digest).
    pub hlen: usize,
    /// A header digest follows the header.
    pub hdgst: bool,
    /// Offset of the data in the PDU (meaningful when `data_len > 0`).
    pub data_off: usize,
    /// Data length.
    pub data_len: usize,
    /// A data digest follows the data.
    pub ddgst: bool,
    /// Total length.
    pub plen: usize,
}

/// A header check that failed: the fatal error status and the byte offset of the field (for a termination
/// request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderError {
    /// Fatal error status ([`fes`]).
    pub fes: u16,
    /// Offset of the offending field in the PDU header.
    pub fei: u32,
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bad PDU header (fes {:#x}, field at byte {})",
            self.fes, self.fei
        )
    }
}

impl std::error::Error for HeaderError {}

/// Byte offsets of the common header fields (for [`HeaderError::fei`]).
const FEI_TYPE: u32 = 0;
const FEI_FLAGS: u32 = 1;
const FEI_HLEN: u32 = 2;
const FEI_PDO: u32 = 3;
const FEI_PLEN: u32 = 4;

/// Checks a received common header and lays the PDU out. `hdgst`/`ddgst` say what the connection negotiated;
/// `pda` is the data alignment the receiver asked for (0-based, in dwords: data starts on a multiple of
/// `(pda + 1) * 4` bytes); `max_plen` bounds the whole PDU. `allowed` says which types this side may receive.
pub fn check_header(
    ch: &Ch,
    allowed: &[u8],
    hdgst: bool,
    ddgst: bool,
    pda: u8,
    max_plen: usize,
) -> Result<Layout, HeaderError> {
    let bad = |fei| HeaderError {
        fes: fes::INVALID_HEADER_FIELD,
        fei,
    };
    if !allowed.contains(&ch.ty) {
        return Err(bad(FEI_TYPE));
    }
    let hlen = hlen_of(ch.ty).ok_or(bad(FEI_TYPE))?;
    if ch.hlen as usize != hlen {
        return Err(bad(FEI_HLEN));
    }
    // ICReq/ICResp and termination requests never carry digests; other PDUs carry exactly what was negotiated.
    let digestable = !matches!(
        ch.ty,
        pdu_type::IC_REQ | pdu_type::IC_RESP | pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ
    );
    let has_h = ch.flags & flags::HDGSTF != 0;
    let has_d = ch.flags & flags::DDGSTF != 0;
    if has_h != (hdgst && digestable) || (has_d && !(ddgst && digestable)) {
        return Err(bad(FEI_FLAGS));
    }
    let plen = ch.plen as usize;
    if plen > max_plen {
        return Err(HeaderError {
            fes: fes::DATA_TRANSFER_LIMIT_EXCEEDED,
            fei: FEI_PLEN,
        });
    }
    let hend = hlen + if has_h { DIGEST_LEN } else { 0 };
    if plen < hend {
        return Err(bad(FEI_PLEN));
    }
    let term = matches!(ch.ty, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ);
    if plen == hend || term {
        // No data. A termination request's header excerpt follows its header without a pdo.
        if !term && (ch.pdo != 0 || has_d) {
            return Err(bad(if has_d { FEI_FLAGS } else { FEI_PDO }));
        }
        if term && plen > hend + TERM_REQ_MAX_DATA {
            return Err(bad(FEI_PLEN));
        }
        return Ok(Layout {
            hlen,
            hdgst: has_h,
            data_off: hend,
            data_len: plen - hend,
            ddgst: false,
            plen,
        });
    }
    if !matches!(
        ch.ty,
        pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA | pdu_type::C2H_DATA
    ) {
        return Err(bad(FEI_PLEN));
    }
    // Data is present: it must be digested as negotiated, start after the header on the asked alignment.
    if has_d != ddgst {
        return Err(bad(FEI_FLAGS));
    }
    let pdo = ch.pdo as usize;
    let align = (pda as usize + 1) * 4;
    if pdo < hend || !pdo.is_multiple_of(align) {
        return Err(bad(FEI_PDO));
    }
    let tail = if has_d { DIGEST_LEN } else { 0 };
    if plen < pdo + tail + 1 {
        return Err(bad(FEI_PLEN));
    }
    Ok(Layout {
        hlen,
        hdgst: has_h,
        data_off: pdo,
        data_len: plen - pdo - tail,
        ddgst: has_d,
        plen,
    })
}

/// Initialize Connection Request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcReq {
    /// PDU format version (0).
    pub pfv: u16,
    /// Host PDU data alignment (0-based dwords).
    pub hpda: u8,
    /// Header digest wanted.
    pub hdgst: bool,
    /// Data digest wanted.
    pub ddgst: bool,
    /// Maximum outstanding R2Ts per command, 0-based.
    pub maxr2t: u32,
}

impl IcReq {
    /// Decodes a full ICReq header (128 bytes).
    pub fn decode(b: &[u8]) -> IcReq {
        IcReq {
            pfv: le16(b, 8),
            hpda: b[10],
            hdgst: b[11] & 1 != 0,
            ddgst: b[11] & 2 != 0,
            maxr2t: le32(b, 12),
        }
    }

    /// Encodes a full ICReq PDU (128 bytes).
    pub fn encode(&self, b: &mut [u8]) {
        b[..IC_HLEN].fill(0);
        Ch {
            ty: pdu_type::IC_REQ,
            flags: 0,
            hlen: IC_HLEN as u8,
            pdo: 0,
            plen: IC_HLEN as u32,
        }
        .encode(b);
        put16(b, 8, self.pfv);
        b[10] = self.hpda;
        b[11] = self.hdgst as u8 | (self.ddgst as u8) << 1;
        put32(b, 12, self.maxr2t);
    }
}

/// Offset of ICReq's HPDA (for termination requests naming it).
pub const IC_REQ_FEI_HPDA: u32 = 10;
/// Offset of ICReq's PFV.
pub const IC_REQ_FEI_PFV: u32 = 8;
/// Largest HPDA the spec allows.
pub const MAX_HPDA: u8 = 31;

/// Initialize Connection Response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcResp {
    /// PDU format version (0).
    pub pfv: u16,
    /// Controller PDU data alignment (0-based dwords).
    pub cpda: u8,
    /// Header digest enabled.
    pub hdgst: bool,
    /// Data digest enabled.
    pub ddgst: bool,
    /// Largest H2C data PDU data the controller accepts.
    pub maxh2cdata: u32,
}

impl IcResp {
    /// Encodes a full ICResp PDU (128 bytes).
    pub fn encode(&self, b: &mut [u8]) {
        b[..IC_HLEN].fill(0);
        Ch {
            ty: pdu_type::IC_RESP,
            flags: 0,
            hlen: IC_HLEN as u8,
            pdo: 0,
            plen: IC_HLEN as u32,
        }
        .encode(b);
        put16(b, 8, self.pfv);
        b[10] = self.cpda;
        b[11] = self.hdgst as u8 | (self.ddgst as u8) << 1;
        put32(b, 12, self.maxh2cdata);
    }

    /// Decodes a full ICResp header.
    pub fn decode(b: &[u8]) -> IcResp {
        IcResp {
            pfv: le16(b, 8),
            cpda: b[10],
            hdgst: b[11] & 1 != 0,
            ddgst: b[11] & 2 != 0,
            maxh2cdata: le32(b, 12),
        }
    }
}

/// The PDU-specific part of H2C data, C2H data and R2T headers (they share one layout: command id, transfer
/// tag, offset and length).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataHdr {
    /// Command capsule's command identifier.
    pub cccid: u16,
    /// Transfer tag (H2C data, R2T; reserved in C2H data).
    pub ttag: u16,
    /// Offset of this data in the command's transfer.
    pub offset: u32,
    /// Length of this data.
    pub len: u32,
}

impl DataHdr {
    /// Byte offset of the data offset field (for termination requests).
    pub const FEI_OFFSET: u32 = 12;
    /// Byte offset of the data length field.
    pub const FEI_LEN: u32 = 16;
    /// Byte offset of the transfer tag.
    pub const FEI_TTAG: u32 = 10;
    /// Byte offset of the command capsule's command identifier.
    pub const FEI_CCCID: u32 = 8;

    /// Decodes from a 24-byte header.
    #[inline]
    pub fn decode(b: &[u8]) -> DataHdr {
        DataHdr {
            cccid: le16(b, 8),
            ttag: le16(b, 10),
            offset: le32(b, 12),
            len: le32(b, 16),
        }
    }

    /// Encodes a whole 24-byte header of type `ty` with `flags` and the PDU's layout fields.
    #[inline]
    pub fn encode(&self, ty: u8, flags: u8, pdo: u8, plen: u32, b: &mut [u8]) {
        Ch {
            ty,
            flags,
            hlen: DATA_HLEN as u8,
            pdo,
            plen,
        }
        .encode(b);
        put16(b, 8, self.cccid);
        put16(b, 10, self.ttag);
        put32(b, 12, self.offset);
        put32(b, 16, self.len);
        b[20..24].fill(0);
    }
}

/// Encodes a termination request header (24 bytes) of type `ty`, to be followed by `excerpt_len` bytes of the
/// offending header.
pub fn encode_term_req(ty: u8, fes: u16, fei: u32, excerpt_len: usize, b: &mut [u8]) {
    b[..DATA_HLEN].fill(0);
    Ch {
        ty,
        flags: 0,
        hlen: DATA_HLEN as u8,
        pdo: 0,
        plen: (DATA_HLEN + excerpt_len.min(TERM_REQ_MAX_DATA)) as u32,
    }
    .encode(b);
    put16(b, 8, fes);
    put32(b, 10, fei);
}

/// Decodes a termination request's (fes, fei).
pub fn decode_term_req(b: &[u8]) -> (u16, u32) {
    (le16(b, 8), le32(b, 10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H2C: &[u8] = &[
        pdu_type::IC_REQ,
        pdu_type::H2C_TERM_REQ,
        pdu_type::CAPSULE_CMD,
        pdu_type::H2C_DATA,
    ];

    fn ch(ty: u8, flags: u8, pdo: u8, plen: u32) -> Ch {
        Ch {
            ty,
            flags,
            hlen: hlen_of(ty).unwrap() as u8,
            pdo,
            plen,
        }
    }

    #[test]
    fn capsule_layouts() {
        // No digests, no data.
        let l = check_header(&ch(4, 0, 0, 72), H2C, false, false, 0, 1 << 20).unwrap();
        assert_eq!((l.data_len, l.hdgst), (0, false));
        // In-capsule data right after the header.
        let l = check_header(&ch(4, 0, 72, 72 + 4096), H2C, false, false, 0, 1 << 20).unwrap();
        assert_eq!((l.data_off, l.data_len), (72, 4096));
        // Both digests.
        let l = check_header(
            &ch(4, flags::HDGSTF | flags::DDGSTF, 76, 76 + 512 + 4),
            H2C,
            true,
            true,
            0,
            1 << 20,
        )
        .unwrap();
        assert_eq!(
            (l.data_off, l.data_len, l.hdgst, l.ddgst),
            (76, 512, true, true)
        );
    }

    #[test]
    fn bad_headers_name_their_field() {
        let e = |c: Ch, hd, dd, pda| check_header(&c, H2C, hd, dd, pda, 1 << 20).unwrap_err();
        // A controller-to-host type from the host.
        assert_eq!(e(ch(5, 0, 0, 24), false, false, 0).fei, FEI_TYPE);
        let mut c = ch(4, 0, 0, 72);
        c.hlen = 70;
        assert_eq!(e(c, false, false, 0).fei, FEI_HLEN);
        // Header digest flag not negotiated, or missing when negotiated.
        assert_eq!(
            e(ch(4, flags::HDGSTF, 0, 76), false, false, 0).fei,
            FEI_FLAGS
        );
        assert_eq!(e(ch(4, 0, 0, 72), true, false, 0).fei, FEI_FLAGS);
        // plen shorter than the header; data offset inside the header; misaligned data.
        assert_eq!(e(ch(4, 0, 0, 60), false, false, 0).fei, FEI_PLEN);
        assert_eq!(e(ch(4, 0, 8, 200), false, false, 0).fei, FEI_PDO);
        assert_eq!(e(ch(4, 0, 76, 200), false, false, 7).fei, FEI_PDO);
        assert_eq!(e(ch(4, 0, 0, 200), false, false, 0).fei, FEI_PDO);
        // Oversized.
        assert_eq!(
            check_header(&ch(4, 0, 72, 1 << 21), H2C, false, false, 0, 1 << 20)
                .unwrap_err()
                .fes,
            fes::DATA_TRANSFER_LIMIT_EXCEEDED
        );
    }

    #[test]
    fn ic_and_data_round_trip() {
        let r = IcReq {
            pfv: 0,
            hpda: 3,
            hdgst: true,
            ddgst: false,
            maxr2t: 0,
        };
        let mut b = [0u8; 128];
        r.encode(&mut b);
        assert_eq!(Ch::decode(&b).plen, 128);
        assert_eq!(IcReq::decode(&b), r);
        let resp = IcResp {
            pfv: 0,
            cpda: 0,
            hdgst: true,
            ddgst: true,
            maxh2cdata: 131072,
        };
        resp.encode(&mut b);
        assert_eq!(IcResp::decode(&b), resp);
        let d = DataHdr {
            cccid: 7,
            ttag: 9,
            offset: 4096,
            len: 8192,
        };
        d.encode(pdu_type::C2H_DATA, flags::LAST_PDU, 24, 24 + 8192, &mut b);
        assert_eq!(DataHdr::decode(&b), d);
        assert_eq!(Ch::decode(&b).pdo, 24);
        encode_term_req(pdu_type::C2H_TERM_REQ, 1, 4, 200, &mut b);
        assert_eq!(decode_term_req(&b), (1, 4));
        assert_eq!(Ch::decode(&b).plen, 24 + 152);
    }

    proptest! {
        #[test]
        fn any_header_checks_without_panic(bytes in proptest::array::uniform8(any::<u8>()),
                                           hd in any::<bool>(), dd in any::<bool>(), pda in 0u8..32) {
            let c = Ch::decode(&bytes);
            if let Ok(l) = check_header(&c, H2C, hd, dd, pda, 1 << 20) {
                // Whatever is accepted is self-consistent: the parts fit in the PDU.
                let hd_len = if l.hdgst { DIGEST_LEN } else { 0 };
                let dd_len = if l.ddgst { DIGEST_LEN } else { 0 };
                let hend = l.hlen + hd_len;
                prop_assert!(hend <= l.plen);
                prop_assert!(l.data_off >= hend || l.data_len == 0);
                prop_assert!(l.data_off + l.data_len + dd_len <= l.plen);
                prop_assert!(l.plen <= 1 << 20);
            }
        }
    }
}
