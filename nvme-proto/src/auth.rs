//! NVMe in-band authentication (DH-HMAC-CHAP, NVMe Base 2.0 section 8.13): the Authentication Send / Receive
//! Fabrics commands and the messages they carry. Multi-byte message fields are little-endian; the DH values are
//! big-endian numbers, as the specification writes them.

use crate::cmd::{put32, Sqe, FABRICS};
use crate::fabrics::fctype;

/// The security protocol of NVMe in-band authentication (SECP).
pub const SECP_NVME: u8 = 0xe9;
/// SPSP0 and SPSP1 of the DH-HMAC-CHAP protocol.
pub const SPSP: u8 = 0x01;
/// Connect response dword 0: an authentication transaction is required (ATR).
pub const CONNECT_ATR: u32 = 1 << 17;
/// Connect response dword 0: authentication and a secure channel are required (ASCR).
pub const CONNECT_ASCR: u32 = 1 << 18;
/// The allocation length a host gives Authentication Receive (as SPDK's and Linux's hosts).
pub const RECV_LEN: usize = 4096;

/// AUTH_Type values.
pub mod auth_type {
    /// Common messages (negotiate, failures).
    pub const COMMON: u8 = 0x00;
    /// DH-HMAC-CHAP messages.
    pub const DHCHAP: u8 = 0x01;
}

/// AUTH_ID values.
pub mod auth_id {
    /// AUTH_Negotiate (common).
    pub const NEGOTIATE: u8 = 0x00;
    /// DH-HMAC-CHAP_Challenge.
    pub const CHALLENGE: u8 = 0x01;
    /// DH-HMAC-CHAP_Reply.
    pub const REPLY: u8 = 0x02;
    /// DH-HMAC-CHAP_Success1.
    pub const SUCCESS1: u8 = 0x03;
    /// DH-HMAC-CHAP_Success2.
    pub const SUCCESS2: u8 = 0x04;
    /// AUTH_Failure2 (host to controller, common).
    pub const FAILURE2: u8 = 0xf0;
    /// AUTH_Failure1 (controller to host, common).
    pub const FAILURE1: u8 = 0xf1;
}

/// Failure reason code explanations (RCE).
pub mod rce {
    /// Authentication failed.
    pub const FAILED: u8 = 0x01;
    /// The authentication protocol is not usable.
    pub const PROTOCOL: u8 = 0x02;
    /// Secure channel concatenation mismatch.
    pub const SC_MISMATCH: u8 = 0x03;
    /// Hash function not usable.
    pub const HASH: u8 = 0x04;
    /// DH group not usable.
    pub const DHGROUP: u8 = 0x05;
    /// Incorrect payload.
    pub const PAYLOAD: u8 = 0x06;
    /// Incorrect protocol message.
    pub const MESSAGE: u8 = 0x07;
}

/// Hash function identifiers (HashID); also the transformation hash of a `DHHC-1:XX:` secret (0: none).
pub mod hash_id {
    /// SHA-256.
    pub const SHA256: u8 = 0x01;
    /// SHA-384.
    pub const SHA384: u8 = 0x02;
    /// SHA-512.
    pub const SHA512: u8 = 0x03;
}

/// Diffie-Hellman group identifiers (DHGID).
pub mod dhgroup_id {
    /// No DH exchange.
    pub const NULL: u8 = 0x00;
    /// ffdhe2048 (RFC 7919).
    pub const FFDHE2048: u8 = 0x01;
    /// ffdhe3072.
    pub const FFDHE3072: u8 = 0x02;
    /// ffdhe4096.
    pub const FFDHE4096: u8 = 0x03;
    /// ffdhe6144.
    pub const FFDHE6144: u8 = 0x04;
    /// ffdhe8192.
    pub const FFDHE8192: u8 = 0x05;
}

/// The digest length of hash `id` (0: unknown).
pub fn hash_len(id: u8) -> usize {
    match id {
        hash_id::SHA256 => 32,
        hash_id::SHA384 => 48,
        hash_id::SHA512 => 64,
        _ => 0,
    }
}

/// The prime's length in bytes of DH group `id` (0 for the null group, `None` for an unknown one).
pub fn dhgroup_len(id: u8) -> Option<usize> {
    Some(match id {
        dhgroup_id::NULL => 0,
        dhgroup_id::FFDHE2048 => 256,
        dhgroup_id::FFDHE3072 => 384,
        dhgroup_id::FFDHE4096 => 512,
        dhgroup_id::FFDHE6144 => 768,
        dhgroup_id::FFDHE8192 => 1024,
        _ => return None,
    })
}

fn auth_cmd(ty: u8, len: usize, cid: u16) -> Sqe {
    let mut s = Sqe::new(FABRICS, cid);
    s.0[4] = ty;
    // CDW10: NSSF (reserved, 0), SPSP0, SPSP1, SECP.
    s.0[41] = SPSP;
    s.0[42] = SPSP;
    s.0[43] = SECP_NVME;
    put32(&mut s.0, 44, len as u32);
    s
}

/// Authentication Send of a `len`-byte message (the transport fills the data pointer).
pub fn auth_send(len: usize, cid: u16) -> Sqe {
    auth_cmd(fctype::AUTHENTICATION_SEND, len, cid)
}

/// Authentication Receive into a `len`-byte buffer.
pub fn auth_recv(len: usize, cid: u16) -> Sqe {
    auth_cmd(fctype::AUTHENTICATION_RECV, len, cid)
}

/// AUTH_Negotiate offering DH-HMAC-CHAP with `hashes` and `dhgroups` (at most 30 each): 72 bytes.
pub fn negotiate(tid: u16, hashes: &[u8], dhgroups: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; 72];
    m[0] = auth_type::COMMON;
    m[1] = auth_id::NEGOTIATE;
    m[4..6].copy_from_slice(&tid.to_le_bytes());
    m[6] = 0; // SC_C: no secure channel concatenation
    m[7] = 1; // one protocol descriptor
    let (h, d) = (
        &hashes[..hashes.len().min(30)],
        &dhgroups[..dhgroups.len().min(30)],
    );
    m[8] = 0x01; // DH-HMAC-CHAP
    m[10] = h.len() as u8;
    m[11] = d.len() as u8;
    m[12..12 + h.len()].copy_from_slice(h);
    m[42..42 + d.len()].copy_from_slice(d);
    m
}

/// A received message's kind, from its first two bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// DH-HMAC-CHAP_Challenge.
    Challenge,
    /// DH-HMAC-CHAP_Success1.
    Success1,
    /// AUTH_Failure1 with its reason code explanation.
    Failure1(u8),
    /// Anything else.
    Other(u8, u8),
}

/// What `m` is (empty or short: `Other`).
pub fn received(m: &[u8]) -> Received {
    match (m.first().copied(), m.get(1).copied()) {
        (Some(auth_type::DHCHAP), Some(auth_id::CHALLENGE)) => Received::Challenge,
        (Some(auth_type::DHCHAP), Some(auth_id::SUCCESS1)) => Received::Success1,
        (Some(auth_type::COMMON), Some(auth_id::FAILURE1)) => {
            Received::Failure1(m.get(7).copied().unwrap_or(0))
        }
        (t, i) => Received::Other(t.unwrap_or(0xff), i.unwrap_or(0xff)),
    }
}

/// A DH-HMAC-CHAP_Challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// Transaction id.
    pub tid: u16,
    /// Hash function.
    pub hash: u8,
    /// DH group.
    pub dhgroup: u8,
    /// Sequence number S1 (non-zero).
    pub seqnum: u32,
    /// Challenge C1 (hash length bytes).
    pub c1: Vec<u8>,
    /// The controller's DH value, big-endian (empty for the null group).
    pub dhv: Vec<u8>,
}

impl Challenge {
    /// Decodes a challenge (the receive buffer may be longer than the message); the reason code explanation
    /// when it is malformed.
    pub fn parse(m: &[u8]) -> Result<Challenge, u8> {
        if m.len() < 16 || received(m) != Received::Challenge {
            return Err(rce::MESSAGE);
        }
        let hl = m[6] as usize;
        let hash = m[8];
        let dhgroup = m[9];
        let dhvlen = u16::from_le_bytes([m[10], m[11]]) as usize;
        let seqnum = u32::from_le_bytes([m[12], m[13], m[14], m[15]]);
        if hash_len(hash) == 0 || hash_len(hash) != hl || seqnum == 0 {
            return Err(rce::PAYLOAD);
        }
        let glen = dhgroup_len(dhgroup).ok_or(rce::PAYLOAD)?;
        // Null group: no value. Otherwise a value no longer than the prime (SPDK's target may send it unpadded).
        if (glen == 0) != (dhvlen == 0) || dhvlen > glen || m.len() < 16 + hl + dhvlen {
            return Err(rce::PAYLOAD);
        }
        Ok(Challenge {
            tid: u16::from_le_bytes([m[4], m[5]]),
            hash,
            dhgroup,
            seqnum,
            c1: m[16..16 + hl].to_vec(),
            dhv: m[16 + hl..16 + hl + dhvlen].to_vec(),
        })
    }
}

/// DH-HMAC-CHAP_Reply: the response `r1`, the controller challenge `c2` (all zeroes, `seqnum` 0, unless
/// bidirectional) and the host's DH value (`dhv`, padded to the prime's length).
pub fn reply(tid: u16, r1: &[u8], c2: Option<(&[u8], u32)>, dhv: &[u8]) -> Vec<u8> {
    let hl = r1.len();
    let mut m = vec![0u8; 16 + 2 * hl + dhv.len()];
    m[0] = auth_type::DHCHAP;
    m[1] = auth_id::REPLY;
    m[4..6].copy_from_slice(&tid.to_le_bytes());
    m[6] = hl as u8;
    m[10..12].copy_from_slice(&(dhv.len() as u16).to_le_bytes());
    m[16..16 + hl].copy_from_slice(r1);
    if let Some((c2, s2)) = c2 {
        m[8] = 1; // CVALID
        m[12..16].copy_from_slice(&s2.to_le_bytes());
        m[16 + hl..16 + 2 * hl].copy_from_slice(&c2[..hl]);
    }
    m[16 + 2 * hl..].copy_from_slice(dhv);
    m
}

/// A DH-HMAC-CHAP_Success1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Success1 {
    /// Transaction id.
    pub tid: u16,
    /// Hash length.
    pub hl: u8,
    /// The controller's response R2, when it sent one (RVALID).
    pub r2: Option<Vec<u8>>,
}

impl Success1 {
    /// Decodes a Success1; the reason code explanation when it is malformed.
    pub fn parse(m: &[u8]) -> Result<Success1, u8> {
        if m.len() < 16 || received(m) != Received::Success1 {
            return Err(rce::MESSAGE);
        }
        let hl = m[6];
        let r2 = match m[8] {
            0 => None,
            1 if m.len() >= 16 + hl as usize => Some(m[16..16 + hl as usize].to_vec()),
            _ => return Err(rce::PAYLOAD),
        };
        Ok(Success1 {
            tid: u16::from_le_bytes([m[4], m[5]]),
            hl,
            r2,
        })
    }
}

/// DH-HMAC-CHAP_Success2 (16 bytes).
pub fn success2(tid: u16) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m[0] = auth_type::DHCHAP;
    m[1] = auth_id::SUCCESS2;
    m[4..6].copy_from_slice(&tid.to_le_bytes());
    m
}

/// AUTH_Failure2 with reason code explanation `explanation` (8 bytes).
pub fn failure2(tid: u16, explanation: u8) -> Vec<u8> {
    let mut m = vec![0u8; 8];
    m[0] = auth_type::COMMON;
    m[1] = auth_id::FAILURE2;
    m[4..6].copy_from_slice(&tid.to_le_bytes());
    m[6] = 0x01; // reason code: authentication failure
    m[7] = explanation;
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_negotiate_are_laid_out_as_the_spec() {
        let s = auth_send(72, 9);
        assert_eq!(
            (s.0[0], s.0[4], s.0[41], s.0[42], s.0[43]),
            (0x7f, 0x05, 1, 1, 0xe9)
        );
        assert_eq!(u32::from_le_bytes(s.0[44..48].try_into().unwrap()), 72);
        assert_eq!(auth_recv(4096, 1).0[4], 0x06);
        let m = negotiate(0x0a0b, &[1, 2, 3], &[0, 1, 2, 3, 4, 5]);
        assert_eq!(m.len(), 72);
        assert_eq!(&m[..12], &[0, 0, 0, 0, 0x0b, 0x0a, 0, 1, 1, 0, 3, 6]);
        assert_eq!(&m[12..15], &[1, 2, 3]);
        assert_eq!(&m[42..48], &[0, 1, 2, 3, 4, 5]);
        assert!(m[15..42].iter().all(|b| *b == 0));
    }

    #[test]
    fn challenges_are_checked() {
        let mut m = vec![0u8; 16 + 32];
        m[0] = 1;
        m[1] = 1;
        m[4] = 7;
        m[6] = 32;
        m[8] = hash_id::SHA256;
        m[12] = 5;
        let c = Challenge::parse(&m).unwrap();
        assert_eq!((c.tid, c.seqnum, c.c1.len(), c.dhv.len()), (7, 5, 32, 0));
        // Longer receive buffers (nvmet pads to the allocation length) are fine.
        let mut padded = m.clone();
        padded.resize(4096, 0);
        assert_eq!(Challenge::parse(&padded).unwrap(), c);
        let bad = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut x = m.clone();
            f(&mut x);
            Challenge::parse(&x)
        };
        assert_eq!(
            bad(&|x| x[6] = 48),
            Err(rce::PAYLOAD),
            "hash length mismatch"
        );
        assert_eq!(bad(&|x| x[12] = 0), Err(rce::PAYLOAD), "sequence number 0");
        assert_eq!(bad(&|x| x[9] = 9), Err(rce::PAYLOAD), "unknown group");
        assert_eq!(
            bad(&|x| x[10] = 4),
            Err(rce::PAYLOAD),
            "a value for the null group"
        );
        assert_eq!(
            bad(&|x| x[9] = 1),
            Err(rce::PAYLOAD),
            "no value for ffdhe2048"
        );
        assert_eq!(bad(&|x| x.truncate(40)), Err(rce::PAYLOAD), "short");
        assert_eq!(bad(&|x| x[1] = 3), Err(rce::MESSAGE));
        assert_eq!(received(&failure2(1, rce::HASH)), Received::Other(0, 0xf0));
        let mut f1 = failure2(1, rce::HASH);
        f1[1] = auth_id::FAILURE1;
        assert_eq!(received(&f1), Received::Failure1(rce::HASH));
    }

    #[test]
    fn reply_and_success_layouts() {
        let r = reply(
            3,
            &[0xaa; 32],
            Some((&[0xbb; 32], 0x11223344)),
            &[0xcc; 256],
        );
        assert_eq!(r.len(), 16 + 64 + 256);
        assert_eq!(
            &r[..16],
            &[1, 2, 0, 0, 3, 0, 32, 0, 1, 0, 0, 1, 0x44, 0x33, 0x22, 0x11]
        );
        let r = reply(3, &[0xaa; 48], None, &[]);
        assert_eq!(r.len(), 16 + 96);
        assert!(r[8] == 0 && r[12..16] == [0; 4] && r[64..].iter().all(|b| *b == 0));
        let mut s1 = vec![1u8, 3, 0, 0, 3, 0, 32, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        s1.extend([0x5a; 32]);
        let s = Success1::parse(&s1).unwrap();
        assert_eq!(
            (s.tid, s.hl, s.r2.as_deref()),
            (3, 32, Some(&[0x5a; 32][..]))
        );
        s1[8] = 0;
        assert_eq!(Success1::parse(&s1[..16]).unwrap().r2, None);
        assert_eq!(
            success2(3),
            [1, 4, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
