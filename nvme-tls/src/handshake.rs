//! The TLS 1.3 handshake messages a PSK-only handshake uses (RFC 8446 section 4), encoded and decoded: ClientHello
//! with `pre_shared_key` and its binder, ServerHello, EncryptedExtensions, Finished, and the key schedule's
//! PSK part. Nothing here touches a socket; everything the peer sends is bounds-checked while it is read.

use crate::crypto::{same, Suite};

/// Handshake message types.
pub mod ty {
    /// ClientHello.
    pub const CLIENT_HELLO: u8 = 1;
    /// ServerHello (and HelloRetryRequest).
    pub const SERVER_HELLO: u8 = 2;
    /// NewSessionTicket (post-handshake).
    pub const NEW_SESSION_TICKET: u8 = 4;
    /// EncryptedExtensions.
    pub const ENCRYPTED_EXTENSIONS: u8 = 8;
    /// Certificate (never in a PSK handshake).
    pub const CERTIFICATE: u8 = 11;
    /// Finished.
    pub const FINISHED: u8 = 20;
    /// KeyUpdate (post-handshake).
    pub const KEY_UPDATE: u8 = 24;
}

mod ext {
    pub const SUPPORTED_GROUPS: u16 = 10;
    pub const SIGNATURE_ALGORITHMS: u16 = 13;
    pub const PRE_SHARED_KEY: u16 = 41;
    pub const SUPPORTED_VERSIONS: u16 = 43;
    pub const PSK_KEY_EXCHANGE_MODES: u16 = 45;
    pub const KEY_SHARE: u16 = 51;
}

const X25519: u16 = 0x001d;
const TLS13: u16 = 0x0304;
/// `psk_dhe_ke`: the PSK with an (EC)DHE exchange, for forward secrecy (OpenSSL's servers require it).
const PSK_DHE_KE: u8 = 1;
/// The ServerHello random that marks a HelloRetryRequest (RFC 8446 section 4.1.3).
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

/// Alert descriptions sent when a handshake fails.
pub mod alert {
    /// The peer's messages do not fit the protocol.
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    /// A record failed authentication.
    pub const BAD_RECORD_MAC: u8 = 20;
    /// No acceptable set of parameters.
    pub const HANDSHAKE_FAILURE: u8 = 40;
    /// A field out of range.
    pub const ILLEGAL_PARAMETER: u8 = 47;
    /// A message that cannot be parsed.
    pub const DECODE_ERROR: u8 = 50;
    /// A Finished or binder that does not verify.
    pub const DECRYPT_ERROR: u8 = 51;
    /// An extension the protocol requires is missing.
    pub const MISSING_EXTENSION: u8 = 109;
    /// No offered PSK identity is known.
    pub const UNKNOWN_PSK_IDENTITY: u8 = 115;
}

/// A handshake failure: the alert to send and why.
#[derive(Debug)]
pub struct Fail {
    /// The alert description.
    pub alert: u8,
    /// What went wrong, for the log.
    pub why: String,
}

pub(crate) fn fail(alert: u8, why: impl Into<String>) -> Fail {
    Fail {
        alert,
        why: why.into(),
    }
}

/// A bounds-checked reader over a peer's message.
struct Rd<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Rd<'a> {
    fn new(b: &'a [u8]) -> Rd<'a> {
        Rd { b, at: 0 }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Fail> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len());
        let end = end.ok_or_else(|| fail(alert::DECODE_ERROR, "message too short"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Fail> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Fail> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Result<&'a [u8], Fail> {
        let n = self.u8()? as usize;
        self.bytes(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], Fail> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }
    fn done(&self) -> bool {
        self.at == self.b.len()
    }
    fn end(&self) -> Result<(), Fail> {
        if self.done() {
            Ok(())
        } else {
            Err(fail(alert::DECODE_ERROR, "trailing bytes in a message"))
        }
    }
}

/// Writes `body` as a handshake message of type `t`.
pub fn message(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(4 + body.len());
    m.push(t);
    m.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    m.extend_from_slice(body);
    m
}

fn put16(v: &mut Vec<u8>, x: usize) {
    v.extend_from_slice(&(x as u16).to_be_bytes());
}

fn put_ext(v: &mut Vec<u8>, t: u16, body: &[u8]) {
    put16(v, t as usize);
    put16(v, body.len());
    v.extend_from_slice(body);
}

/// The early secret and the binder key of an external PSK.
pub fn early_secret(suite: Suite, psk: &[u8]) -> Vec<u8> {
    suite.extract(&[], psk)
}

/// The binder of an external PSK over the hash of the truncated ClientHello.
pub fn binder(suite: Suite, early: &[u8], truncated_hash: &[u8]) -> Vec<u8> {
    let binder_key = suite.derive_secret(early, "ext binder", &suite.hash(&[]));
    finished_mac(suite, &binder_key, truncated_hash)
}

/// The Finished value (and binder) over `transcript_hash` with base key `secret`.
pub fn finished_mac(suite: Suite, secret: &[u8], transcript_hash: &[u8]) -> Vec<u8> {
    let fk = suite.expand_label(secret, "finished", &[], suite.hash_len());
    suite.hmac(&fk, &[transcript_hash])
}

/// A ClientHello offering one external PSK under `identity` with an x25519 key share; the binder is filled in.
/// Returns the message (header included).
pub fn client_hello(
    suite: Suite,
    random: &[u8; 32],
    session_id: &[u8; 32],
    share: &[u8; 32],
    identity: &[u8],
    psk: &[u8],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(256 + identity.len());
    put16(&mut b, 0x0303);
    b.extend_from_slice(random);
    b.push(32);
    b.extend_from_slice(session_id);
    put16(&mut b, 2);
    put16(&mut b, suite.id() as usize);
    b.extend_from_slice(&[1, 0]);
    let mut e = Vec::with_capacity(128 + identity.len());
    put_ext(&mut e, ext::SUPPORTED_VERSIONS, &[2, 0x03, 0x04]);
    put_ext(&mut e, ext::SUPPORTED_GROUPS, &[0, 2, 0x00, 0x1d]);
    let mut ks = vec![0, 36, 0x00, 0x1d, 0, 32];
    ks.extend_from_slice(share);
    put_ext(&mut e, ext::KEY_SHARE, &ks);
    // Not used by a PSK handshake, but some servers look for it before they look at the PSK.
    put_ext(
        &mut e,
        ext::SIGNATURE_ALGORITHMS,
        &[0, 6, 0x08, 0x04, 0x04, 0x03, 0x08, 0x07],
    );
    put_ext(&mut e, ext::PSK_KEY_EXCHANGE_MODES, &[1, PSK_DHE_KE]);
    // pre_shared_key comes last: identities, then the binders, which cover everything before them.
    let hl = suite.hash_len();
    let mut psk_ext = Vec::with_capacity(identity.len() + hl + 16);
    put16(&mut psk_ext, identity.len() + 6);
    put16(&mut psk_ext, identity.len());
    psk_ext.extend_from_slice(identity);
    psk_ext.extend_from_slice(&0u32.to_be_bytes());
    put16(&mut psk_ext, hl + 1);
    psk_ext.push(hl as u8);
    psk_ext.resize(psk_ext.len() + hl, 0);
    put_ext(&mut e, ext::PRE_SHARED_KEY, &psk_ext);
    put16(&mut b, e.len());
    b.extend_from_slice(&e);
    let mut m = message(ty::CLIENT_HELLO, &b);
    let cut = m.len() - (2 + 1 + hl);
    let early = early_secret(suite, psk);
    let bd = binder(suite, &early, &suite.hash(&m[..cut]));
    let at = m.len() - hl;
    m[at..].copy_from_slice(&bd);
    m
}

/// What a ServerHello chose.
pub struct ServerHello {
    /// The server's x25519 share.
    pub share: [u8; 32],
}

/// Checks a ServerHello body against what the client offered: TLS 1.3, our suite, our session id, our PSK
/// (identity 0), an x25519 share.
pub fn parse_server_hello(
    body: &[u8],
    suite: Suite,
    session_id: &[u8; 32],
) -> Result<ServerHello, Fail> {
    let mut r = Rd::new(body);
    r.u16()?;
    let random = r.bytes(32)?;
    if random == HRR_RANDOM {
        return Err(fail(
            alert::HANDSHAKE_FAILURE,
            "the server asked to retry the hello (it takes no x25519 key share)",
        ));
    }
    if r.vec8()? != session_id {
        return Err(fail(alert::ILLEGAL_PARAMETER, "session id not echoed"));
    }
    let cs = r.u16()?;
    if cs != suite.id() {
        return Err(fail(
            alert::ILLEGAL_PARAMETER,
            format!("cipher suite {cs:#06x} not offered"),
        ));
    }
    if r.u8()? != 0 {
        return Err(fail(alert::ILLEGAL_PARAMETER, "compression"));
    }
    let mut exts = Rd::new(r.vec16()?);
    r.end()?;
    let (mut version, mut share, mut psk) = (None, None, None);
    while !exts.done() {
        let t = exts.u16()?;
        let mut d = Rd::new(exts.vec16()?);
        match t {
            ext::SUPPORTED_VERSIONS => version = Some(d.u16()?),
            ext::KEY_SHARE => {
                if d.u16()? != X25519 {
                    return Err(fail(alert::ILLEGAL_PARAMETER, "key share group"));
                }
                let k = d.vec16()?;
                share = Some(
                    <[u8; 32]>::try_from(k)
                        .map_err(|_| fail(alert::ILLEGAL_PARAMETER, "x25519 share length"))?,
                );
            }
            ext::PRE_SHARED_KEY => psk = Some(d.u16()?),
            _ => {
                return Err(fail(
                    alert::UNEXPECTED_MESSAGE,
                    format!("ServerHello extension {t}"),
                ))
            }
        }
        d.end()?;
    }
    if version != Some(TLS13) {
        return Err(fail(
            alert::HANDSHAKE_FAILURE,
            "the server does not speak TLS 1.3",
        ));
    }
    match psk {
        Some(0) => {}
        Some(i) => {
            return Err(fail(
                alert::ILLEGAL_PARAMETER,
                format!("PSK {i} not offered"),
            ))
        }
        None => {
            return Err(fail(
                alert::HANDSHAKE_FAILURE,
                "the server did not accept the PSK",
            ))
        }
    }
    let share = share.ok_or_else(|| fail(alert::MISSING_EXTENSION, "no key share"))?;
    Ok(ServerHello { share })
}

/// Checks an EncryptedExtensions body (a list that must parse; its contents need no action).
pub fn parse_encrypted_extensions(body: &[u8]) -> Result<(), Fail> {
    let mut r = Rd::new(body);
    let mut exts = Rd::new(r.vec16()?);
    r.end()?;
    while !exts.done() {
        exts.u16()?;
        exts.vec16()?;
    }
    Ok(())
}

/// What a server needs from a ClientHello offering PSKs.
pub struct ClientHello<'a> {
    /// Echoed in ServerHello.
    pub session_id: &'a [u8],
    /// The offered suites.
    suites: &'a [u8],
    /// The client's x25519 share.
    pub share: [u8; 32],
    /// The offered identities, with their binders.
    pub psks: Vec<(&'a [u8], &'a [u8])>,
    /// The message up to its binders list, which the binders cover.
    pub truncated: &'a [u8],
}

impl ClientHello<'_> {
    /// Whether the client offered `s`.
    pub fn offers(&self, s: Suite) -> bool {
        self.suites
            .chunks_exact(2)
            .any(|c| u16::from_be_bytes([c[0], c[1]]) == s.id())
    }
}

/// Parses a whole ClientHello message (`msg` includes the header): TLS 1.3 offered, `psk_dhe_ke` allowed, an
/// x25519 share, and `pre_shared_key` last.
pub fn parse_client_hello(msg: &[u8]) -> Result<ClientHello<'_>, Fail> {
    let mut r = Rd::new(&msg[4..]);
    r.u16()?;
    r.bytes(32)?;
    let session_id = r.vec8()?;
    if session_id.len() > 32 {
        return Err(fail(alert::ILLEGAL_PARAMETER, "session id length"));
    }
    let suites = r.vec16()?;
    r.vec8()?;
    let ext_start = 4 + r.at + 2;
    let mut exts = Rd::new(r.vec16()?);
    r.end()?;
    let (mut tls13, mut dhe_ke, mut share, mut psks, mut truncated) =
        (false, false, None, Vec::new(), None);
    while !exts.done() {
        if truncated.is_some() {
            return Err(fail(
                alert::ILLEGAL_PARAMETER,
                "pre_shared_key is not the last extension",
            ));
        }
        let t = exts.u16()?;
        let body_at = ext_start + exts.at + 2;
        let mut d = Rd::new(exts.vec16()?);
        match t {
            ext::SUPPORTED_VERSIONS => {
                tls13 = d.vec8()?.chunks_exact(2).any(|c| c == TLS13.to_be_bytes());
            }
            ext::PSK_KEY_EXCHANGE_MODES => dhe_ke = d.vec8()?.contains(&PSK_DHE_KE),
            ext::KEY_SHARE => {
                let mut l = Rd::new(d.vec16()?);
                while !l.done() {
                    let g = l.u16()?;
                    let k = l.vec16()?;
                    if g == X25519 {
                        share =
                            Some(<[u8; 32]>::try_from(k).map_err(|_| {
                                fail(alert::ILLEGAL_PARAMETER, "x25519 share length")
                            })?);
                    }
                }
            }
            ext::PRE_SHARED_KEY => {
                let mut ids = Rd::new(d.vec16()?);
                let binders_at = body_at + d.at;
                let mut bs = Rd::new(d.vec16()?);
                let mut list = Vec::new();
                while !ids.done() {
                    let id = ids.vec16()?;
                    ids.bytes(4)?;
                    list.push(id);
                }
                for id in list {
                    psks.push((id, bs.vec8()?));
                }
                if !bs.done() || psks.is_empty() {
                    return Err(fail(
                        alert::ILLEGAL_PARAMETER,
                        "PSK binders do not match identities",
                    ));
                }
                truncated = Some(&msg[..binders_at]);
            }
            _ => continue,
        }
        d.end()?;
    }
    if !tls13 {
        return Err(fail(
            alert::HANDSHAKE_FAILURE,
            "the client does not offer TLS 1.3",
        ));
    }
    let truncated = truncated.ok_or_else(|| fail(alert::MISSING_EXTENSION, "no PSK offered"))?;
    if !dhe_ke {
        return Err(fail(
            alert::HANDSHAKE_FAILURE,
            "the client does not allow psk_dhe_ke",
        ));
    }
    let share = share.ok_or_else(|| {
        fail(
            alert::HANDSHAKE_FAILURE,
            "the client offers no x25519 key share",
        )
    })?;
    Ok(ClientHello {
        session_id,
        suites,
        share,
        psks,
        truncated,
    })
}

/// Checks PSK `i`'s binder of a parsed ClientHello against `psk`.
pub fn binder_ok(ch: &ClientHello<'_>, i: usize, suite: Suite, psk: &[u8]) -> bool {
    let early = early_secret(suite, psk);
    let want = binder(suite, &early, &suite.hash(ch.truncated));
    same(&want, ch.psks[i].1)
}

/// A ServerHello accepting PSK `index` with our x25519 `share`.
pub fn server_hello(
    suite: Suite,
    random: &[u8; 32],
    session_id: &[u8],
    share: &[u8; 32],
    index: u16,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    put16(&mut b, 0x0303);
    b.extend_from_slice(random);
    b.push(session_id.len() as u8);
    b.extend_from_slice(session_id);
    put16(&mut b, suite.id() as usize);
    b.push(0);
    let mut e = Vec::with_capacity(64);
    put_ext(&mut e, ext::SUPPORTED_VERSIONS, &TLS13.to_be_bytes());
    let mut ks = vec![0x00, 0x1d, 0, 32];
    ks.extend_from_slice(share);
    put_ext(&mut e, ext::KEY_SHARE, &ks);
    put_ext(&mut e, ext::PRE_SHARED_KEY, &index.to_be_bytes());
    put16(&mut b, e.len());
    b.extend_from_slice(&e);
    message(ty::SERVER_HELLO, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_round_trip_and_binders_verify() {
        let s = Suite::Aes128GcmSha256;
        let psk = [5u8; 32];
        let ch = client_hello(s, &[1; 32], &[2; 32], &[3; 32], b"NVMe0R01 h s", &psk);
        let p = parse_client_hello(&ch).unwrap();
        assert_eq!(p.session_id, &[2; 32]);
        assert_eq!(p.share, [3; 32]);
        assert_eq!(p.psks.len(), 1);
        assert_eq!(p.psks[0].0, b"NVMe0R01 h s");
        assert!(p.offers(s) && !p.offers(Suite::Aes256GcmSha384));
        assert!(binder_ok(&p, 0, s, &psk));
        assert!(!binder_ok(&p, 0, s, &[6u8; 32]));

        let sh = server_hello(s, &[4; 32], &[2; 32], &[9; 32], 0);
        let got = parse_server_hello(&sh[4..], s, &[2; 32]).unwrap();
        assert_eq!(got.share, [9; 32]);
        assert!(parse_server_hello(&sh[4..], s, &[7; 32]).is_err());
        assert!(parse_server_hello(&sh[4..], Suite::Aes256GcmSha384, &[2; 32]).is_err());
        let sh1 = server_hello(s, &[4; 32], &[2; 32], &[9; 32], 1);
        assert!(parse_server_hello(&sh1[4..], s, &[2; 32]).is_err());
        let mut hrr = sh.clone();
        hrr[6..38].copy_from_slice(&HRR_RANDOM);
        assert!(parse_server_hello(&hrr[4..], s, &[2; 32]).is_err());
        assert!(parse_encrypted_extensions(&[0, 0]).is_ok());
        assert!(parse_encrypted_extensions(&[0, 4, 0, 1, 0]).is_err());
    }

    /// Every truncation and every single-byte change of a ClientHello either parses or fails cleanly.
    #[test]
    fn forged_client_hellos_fail_cleanly() {
        let s = Suite::Aes256GcmSha384;
        let ch = client_hello(s, &[1; 32], &[2; 32], &[3; 32], b"id", &[5u8; 48]);
        for n in 4..ch.len() {
            let mut m = ch[..n].to_vec();
            let body = (n - 4) as u32;
            m[1..4].copy_from_slice(&body.to_be_bytes()[1..]);
            assert!(parse_client_hello(&m).is_err());
        }
        for i in 4..ch.len() {
            for v in [0u8, 0xff, ch[i] ^ 1] {
                let mut m = ch.clone();
                m[i] = v;
                if let Ok(p) = parse_client_hello(&m) {
                    let _ = binder_ok(&p, 0, s, &[5u8; 48]);
                }
            }
        }
    }
}
