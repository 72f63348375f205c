//! The primitives TLS 1.3 needs for the two cipher suites NVMe/TCP uses: the hash, HMAC, HKDF with TLS 1.3's
//! labels (RFC 8446 section 7.1), a running transcript hash, and AES-GCM record protection.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes128Gcm, Aes256Gcm, KeyInit, Nonce, Tag};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha384};

/// A TLS 1.3 cipher suite NVMe/TCP may use (NVMe TCP transport specification, section 3.6.1.3): the suite
/// follows the configured PSK's length, 32 bytes for SHA-256 and 48 for SHA-384.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// `TLS_AES_128_GCM_SHA256` (0x1301).
    Aes128GcmSha256,
    /// `TLS_AES_256_GCM_SHA384` (0x1302).
    Aes256GcmSha384,
}

impl Suite {
    /// The suite's code point in ClientHello / ServerHello.
    pub fn id(self) -> u16 {
        match self {
            Suite::Aes128GcmSha256 => 0x1301,
            Suite::Aes256GcmSha384 => 0x1302,
        }
    }

    /// The suite with code point `id`, if it is one of ours.
    pub fn from_id(id: u16) -> Option<Suite> {
        match id {
            0x1301 => Some(Suite::Aes128GcmSha256),
            0x1302 => Some(Suite::Aes256GcmSha384),
            _ => None,
        }
    }

    /// OpenSSL's name of the suite (what SPDK logs and takes in `tls_cipher_suites`).
    pub fn name(self) -> &'static str {
        match self {
            Suite::Aes128GcmSha256 => "TLS_AES_128_GCM_SHA256",
            Suite::Aes256GcmSha384 => "TLS_AES_256_GCM_SHA384",
        }
    }

    /// The hash's output length.
    pub fn hash_len(self) -> usize {
        match self {
            Suite::Aes128GcmSha256 => 32,
            Suite::Aes256GcmSha384 => 48,
        }
    }

    /// The AEAD key length.
    fn key_len(self) -> usize {
        match self {
            Suite::Aes128GcmSha256 => 16,
            Suite::Aes256GcmSha384 => 32,
        }
    }

    /// The hash of `data`.
    pub fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            Suite::Aes128GcmSha256 => Sha256::digest(data).to_vec(),
            Suite::Aes256GcmSha384 => Sha384::digest(data).to_vec(),
        }
    }

    /// HMAC keyed with `key` over the concatenation of `parts`.
    pub fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        fn of<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            // HMAC takes keys of any length: this cannot fail.
            let mut m = <M as KeyInit>::new_from_slice(key).expect("HMAC key of any length");
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        }
        match self {
            Suite::Aes128GcmSha256 => of::<Hmac<Sha256>>(key, parts),
            Suite::Aes256GcmSha384 => of::<Hmac<Sha384>>(key, parts),
        }
    }

    /// HKDF-Extract (RFC 5869); an empty salt is a string of zeros, as HMAC pads it.
    pub fn extract(self, salt: &[u8], ikm: &[u8]) -> Vec<u8> {
        self.hmac(salt, &[ikm])
    }

    /// HKDF-Expand (RFC 5869) to `len` bytes (at most 255 hash lengths).
    pub fn expand(self, prk: &[u8], info: &[u8], len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut t = Vec::new();
        let mut i = 1u8;
        while out.len() < len {
            t = self.hmac(prk, &[&t, info, &[i]]);
            let n = (len - out.len()).min(t.len());
            out.extend_from_slice(&t[..n]);
            i += 1;
        }
        out
    }

    /// HKDF-Expand-Label: `HkdfLabel` is the output length, `"tls13 " + label` and `context`, each with its length.
    pub fn expand_label(self, secret: &[u8], label: &str, context: &[u8], len: usize) -> Vec<u8> {
        let mut info = Vec::with_capacity(4 + 6 + label.len() + context.len());
        info.extend_from_slice(&(len as u16).to_be_bytes());
        info.push((6 + label.len()) as u8);
        info.extend_from_slice(b"tls13 ");
        info.extend_from_slice(label.as_bytes());
        info.push(context.len() as u8);
        info.extend_from_slice(context);
        self.expand(secret, &info, len)
    }

    /// Derive-Secret with the transcript hash already taken.
    pub fn derive_secret(self, secret: &[u8], label: &str, transcript_hash: &[u8]) -> Vec<u8> {
        self.expand_label(secret, label, transcript_hash, self.hash_len())
    }

    /// A new running hash of the handshake messages.
    pub fn transcript(self) -> Transcript {
        match self {
            Suite::Aes128GcmSha256 => Transcript::S256(Sha256::new()),
            Suite::Aes256GcmSha384 => Transcript::S384(Sha384::new()),
        }
    }
}

/// The hash of the handshake messages so far.
#[derive(Clone)]
pub enum Transcript {
    /// For SHA-256 suites.
    S256(Sha256),
    /// For SHA-384 suites.
    S384(Sha384),
}

impl Transcript {
    /// Adds a whole handshake message (header included).
    pub fn update(&mut self, msg: &[u8]) {
        match self {
            Transcript::S256(h) => h.update(msg),
            Transcript::S384(h) => h.update(msg),
        }
    }

    /// The hash of what was added so far (the running hash goes on).
    pub fn current(&self) -> Vec<u8> {
        match self {
            Transcript::S256(h) => h.clone().finalize().to_vec(),
            Transcript::S384(h) => h.clone().finalize().to_vec(),
        }
    }
}

/// AES-GCM keyed for one direction.
enum Aead {
    A128(Box<Aes128Gcm>),
    A256(Box<Aes256Gcm>),
}

/// The length of the authentication tag AES-GCM appends to each record.
pub const TAG_LEN: usize = 16;

/// One direction's record protection: the key and IV from a traffic secret, and the record sequence number
/// (RFC 8446 section 5.3), which makes each record's nonce.
pub struct Keys {
    suite: Suite,
    aead: Aead,
    iv: [u8; 12],
    seq: u64,
    /// The traffic secret, for KeyUpdate.
    secret: Vec<u8>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys (they would end up in logs).
        f.debug_struct("Keys")
            .field("suite", &self.suite)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// A record failed authentication: forged, corrupted, or keyed otherwise.
#[derive(Debug)]
pub struct BadRecord;

impl Keys {
    /// The keys of traffic secret `secret`.
    pub fn new(suite: Suite, secret: Vec<u8>) -> Keys {
        let key = suite.expand_label(&secret, "key", &[], suite.key_len());
        let iv = suite.expand_label(&secret, "iv", &[], 12);
        let aead = match suite {
            Suite::Aes128GcmSha256 => Aead::A128(Box::new(
                Aes128Gcm::new_from_slice(&key).expect("16-byte key"),
            )),
            Suite::Aes256GcmSha384 => Aead::A256(Box::new(
                Aes256Gcm::new_from_slice(&key).expect("32-byte key"),
            )),
        };
        Keys {
            suite,
            aead,
            iv: iv.try_into().expect("12-byte IV"),
            seq: 0,
            secret,
        }
    }

    /// The next generation's keys (KeyUpdate): the secret moves on with "traffic upd", the sequence restarts.
    pub fn updated(&self) -> Keys {
        let s = self.suite;
        Keys::new(
            s,
            s.expand_label(&self.secret, "traffic upd", &[], s.hash_len()),
        )
    }

    /// Records sealed or opened with these keys so far.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn nonce(&mut self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        // A connection would need 2^64 records to wrap; TLS forbids reuse, so the caller rekeys long before.
        self.seq += 1;
        n
    }

    /// Encrypts `buf` in place with `aad` (the record header) and returns the tag to append.
    pub fn seal(&mut self, aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        let n = self.nonce();
        let nonce = Nonce::from_slice(&n);
        let tag = match &self.aead {
            Aead::A128(a) => a.encrypt_in_place_detached(nonce, aad, buf),
            Aead::A256(a) => a.encrypt_in_place_detached(nonce, aad, buf),
        };
        // Only a buffer past GCM's 64 GiB limit fails; records are at most 16 KiB.
        tag.expect("record within AES-GCM's limit").into()
    }

    /// Checks and decrypts `buf` in place; `tag` is the record's last 16 bytes.
    pub fn open(&mut self, aad: &[u8], buf: &mut [u8], tag: &[u8]) -> Result<(), BadRecord> {
        let n = self.nonce();
        let nonce = Nonce::from_slice(&n);
        let tag = Tag::from_slice(tag);
        match &self.aead {
            Aead::A128(a) => a.decrypt_in_place_detached(nonce, aad, buf, tag),
            Aead::A256(a) => a.decrypt_in_place_detached(nonce, aad, buf, tag),
        }
        .map_err(|_| BadRecord)
    }
}

/// Constant-time comparison (Finished and binder values).
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 8448 section 3 (a simple 1-RTT handshake): the early secret with no PSK, the handshake secret, and
    /// the server's handshake traffic keys.
    #[test]
    fn key_schedule_matches_rfc_8448() {
        let s = Suite::Aes128GcmSha256;
        let early = s.extract(&[], &[0u8; 32]);
        assert_eq!(
            early,
            hex("33ad0a1c607ec03b09e6cd9893680ce210adf300aa1f2660e1b22e10f170f92a")
        );
        let derived = s.derive_secret(&early, "derived", &s.hash(&[]));
        assert_eq!(
            derived,
            hex("6f2615a108c702c5678f54fc9dbab69716c076189c48250cebeac3576c3611ba")
        );
        let shared = hex("8bd4054fb55b9d63fdfbacf9f04b9f0d35e6d63f537563efd46272900f89492d");
        let hs = s.extract(&derived, &shared);
        assert_eq!(
            hs,
            hex("1dc826e93606aa6fdc0aadc12f741b01046aa6b99f691ed221a9f0ca043fbeac")
        );
        // The server handshake traffic secret from the transcript hash of ClientHello..ServerHello.
        let th = hex("860c06edc07858ee8e78f0e7428c58edd6b43f2ca3e6e95f02ed063cf0e1cad8");
        let shts = s.derive_secret(&hs, "s hs traffic", &th);
        assert_eq!(
            shts,
            hex("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
        );
        assert_eq!(
            s.expand_label(&shts, "key", &[], 16),
            hex("3fce516009c21727d0f2e4e86ee403bc")
        );
        assert_eq!(
            s.expand_label(&shts, "iv", &[], 12),
            hex("5d313eb2671276ee13000b30")
        );
    }

    #[test]
    fn records_round_trip_and_forgeries_fail() {
        for s in [Suite::Aes128GcmSha256, Suite::Aes256GcmSha384] {
            let secret = vec![7u8; s.hash_len()];
            let (mut w, mut r) = (Keys::new(s, secret.clone()), Keys::new(s, secret));
            for i in 0..3u8 {
                let mut b = vec![i; 100];
                let tag = w.seal(b"hdr", &mut b);
                assert_ne!(b, vec![i; 100]);
                r.open(b"hdr", &mut b, &tag).unwrap();
                assert_eq!(b, vec![i; 100]);
            }
            let mut b = vec![1u8; 10];
            let tag = w.seal(b"hdr", &mut b);
            b[0] ^= 1;
            assert!(r.open(b"hdr", &mut b, &tag).is_err());
            // Updated keys on both sides agree again.
            let (mut w2, mut r2) = (w.updated(), r.updated());
            let mut b = vec![9u8; 5];
            let tag = w2.seal(b"", &mut b);
            r2.open(b"", &mut b, &tag).unwrap();
            assert_eq!(b, vec![9u8; 5]);
        }
    }
}
