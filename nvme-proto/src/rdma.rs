//! NVMe/RDMA (NVMe-oF RDMA transport binding): the private data of the RDMA CM connection handshake and the
//! transport specific address subtype of discovery log entries. Commands travel as SEND capsules (the SQE and any
//! in-capsule data), data as RDMA READ / WRITE against the host's keyed SGL data blocks ([`crate::cmd::sgl`]), and
//! completions as SEND of the bare CQE; none of that needs a layout beyond [`crate::cmd`].

use crate::cmd::{le16, put16};

/// Length of every CM private data block (the spec reserves the rest of the 32 bytes).
pub const PRIVATE_DATA_LEN: usize = 32;

/// Connect request private data (host to target, in `rdma_connect`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmRequest {
    /// Record format: 0.
    pub recfmt: u16,
    /// Queue id the host will connect (0: admin).
    pub qid: u16,
    /// Host receive queue size (entries): how many responses the host can take.
    pub hrqsize: u16,
    /// Host send queue size, 0-based (as the Connect command's SQSIZE).
    pub hsqsize: u16,
    /// Controller id (NVMe-oF 1.1 and later; 0 before).
    pub cntlid: u16,
}

impl CmRequest {
    /// Decodes the private data of a connect request; `None` when shorter than the 32 bytes the spec requires.
    pub fn decode(b: &[u8]) -> Option<CmRequest> {
        if b.len() < PRIVATE_DATA_LEN {
            return None;
        }
        Some(CmRequest {
            recfmt: le16(b, 0),
            qid: le16(b, 2),
            hrqsize: le16(b, 4),
            hsqsize: le16(b, 6),
            cntlid: le16(b, 8),
        })
    }

    /// Encodes into `b` (reserved bytes zeroed).
    pub fn encode(&self, b: &mut [u8; PRIVATE_DATA_LEN]) {
        b.fill(0);
        put16(b, 0, self.recfmt);
        put16(b, 2, self.qid);
        put16(b, 4, self.hrqsize);
        put16(b, 6, self.hsqsize);
        put16(b, 8, self.cntlid);
    }
}

/// Connect accept private data (target to host, in `rdma_accept`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmAccept {
    /// Record format: 0.
    pub recfmt: u16,
    /// Controller receive queue size: commands the target can hold at once.
    pub crqsize: u16,
}

impl CmAccept {
    /// Encodes into `b` (reserved bytes zeroed).
    pub fn encode(&self, b: &mut [u8; PRIVATE_DATA_LEN]) {
        b.fill(0);
        put16(b, 0, self.recfmt);
        put16(b, 2, self.crqsize);
    }

    /// Decodes; `None` when shorter than 4 bytes.
    pub fn decode(b: &[u8]) -> Option<CmAccept> {
        (b.len() >= 4).then(|| CmAccept {
            recfmt: le16(b, 0),
            crqsize: le16(b, 2),
        })
    }
}

/// Connect reject private data (target to host, in `rdma_reject`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmReject {
    /// Record format: 0.
    pub recfmt: u16,
    /// Why ([`reject`]).
    pub sts: u16,
}

impl CmReject {
    /// Encodes into the first 4 bytes of `b` (the reject private data is 4 bytes).
    pub fn encode(&self, b: &mut [u8; 4]) {
        put16(b, 0, self.recfmt);
        put16(b, 2, self.sts);
    }
}

/// Reject status codes (`enum spdk_nvmf_rdma_transport_error`).
pub mod reject {
    /// Invalid private data length.
    pub const INVALID_PRIVATE_DATA_LENGTH: u16 = 0x1;
    /// Invalid RECFMT.
    pub const INVALID_RECFMT: u16 = 0x2;
    /// Invalid QID.
    pub const INVALID_QID: u16 = 0x3;
    /// Invalid HSQSIZE.
    pub const INVALID_HSQSIZE: u16 = 0x4;
    /// Invalid HRQSIZE.
    pub const INVALID_HRQSIZE: u16 = 0x5;
    /// No resources.
    pub const NO_RESOURCES: u16 = 0x6;
    /// Invalid IRD.
    pub const INVALID_IRD: u16 = 0x7;
    /// Invalid ORD.
    pub const INVALID_ORD: u16 = 0x8;
}

/// The RDMA transport specific address subtype of a discovery log entry (TSAS bytes 0..3).
pub mod tsas {
    /// RDMA QP service type: reliable connected.
    pub const QPTYPE_RELIABLE_CONNECTED: u8 = 1;
    /// RDMA provider type: no provider specified.
    pub const PRTYPE_NONE: u8 = 1;
    /// RDMA connection management service: RDMA_CM.
    pub const CMS_RDMA_CM: u8 = 1;

    /// Writes SPDK's RDMA TSAS (reliable connected, no provider type, RDMA CM) into a discovery entry's TSAS.
    pub fn encode(b: &mut [u8]) {
        b[0] = QPTYPE_RELIABLE_CONNECTED;
        b[1] = PRTYPE_NONE;
        b[2] = CMS_RDMA_CM;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_short() {
        let r = CmRequest {
            recfmt: 0,
            qid: 3,
            hrqsize: 128,
            hsqsize: 127,
            cntlid: 1,
        };
        let mut b = [0xffu8; PRIVATE_DATA_LEN];
        r.encode(&mut b);
        assert_eq!(&b[..10], &[0, 0, 3, 0, 128, 0, 127, 0, 1, 0]);
        assert!(b[10..].iter().all(|x| *x == 0));
        assert_eq!(CmRequest::decode(&b), Some(r));
        assert_eq!(CmRequest::decode(&b[..31]), None);
    }

    #[test]
    fn accept_and_reject() {
        let mut b = [0xffu8; PRIVATE_DATA_LEN];
        CmAccept {
            recfmt: 0,
            crqsize: 32,
        }
        .encode(&mut b);
        assert_eq!(&b[..4], &[0, 0, 32, 0]);
        assert_eq!(CmAccept::decode(&b).map(|a| a.crqsize), Some(32));
        let mut r = [0u8; 4];
        CmReject {
            recfmt: 0,
            sts: reject::INVALID_IRD,
        }
        .encode(&mut r);
        assert_eq!(r, [0, 0, 7, 0]);
    }
}
