//! NVMe/TCP's pre-shared keys (NVMe TCP transport specification 1.0, section 3.6.1): the configured PSK in its
//! interchange format, the retained PSK derived from it with the host NQN, the PSK identity, and the TLS PSK
//! derived from the retained PSK and the identity, as SPDK v24.05 derives them.

use errors::{Error, ErrorKind, Result};
use nvme_proto::keytext::{base64_decode, base64_encode, crc32_ieee};

use crate::crypto::Suite;

/// A configured PSK: `NVMeTLSkey-1:XX:<base64 of the key and its CRC-32>:`, XX the hash that derives the retained
/// PSK (`00`: none, the key is the retained PSK; `01`: SHA-256; `02`: SHA-384).
#[derive(Clone, PartialEq, Eq)]
pub struct ConfiguredPsk {
    key: Vec<u8>,
    hash: u8,
}

impl std::fmt::Debug for ConfiguredPsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        write!(
            f,
            "ConfiguredPsk({} bytes, hash {:02})",
            self.key.len(),
            self.hash
        )
    }
}

fn invalid(why: impl Into<String>) -> Error {
    Error::new(ErrorKind::Invalid, why)
}

/// What a TLS connection needs from a PSK: the identity it is offered under, the key, and the cipher suite.
#[derive(Clone)]
pub struct TlsPsk {
    /// `NVMe0R0X <hostnqn> <subnqn>`.
    pub identity: String,
    /// The TLS PSK (the suite's hash length).
    pub key: Vec<u8>,
    /// The suite the key is for.
    pub suite: Suite,
}

impl std::fmt::Debug for TlsPsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPsk")
            .field("identity", &self.identity)
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

impl ConfiguredPsk {
    /// Parses the interchange text (leading blanks and a trailing newline are allowed, as key files have
    /// them). The hash fixes the key length (`01`: 32 bytes, `02`: 48); with `00` it may be either.
    pub fn parse(text: &str) -> Result<ConfiguredPsk> {
        let t = text.trim();
        let rest = t
            .strip_prefix("NVMeTLSkey-1:")
            .ok_or_else(|| invalid("Invalid format of PSK interchange"))?;
        let (xx, rest) = rest
            .split_once(':')
            .ok_or_else(|| invalid("Invalid format of PSK interchange"))?;
        let hash = match xx {
            "00" => 0,
            "01" => 1,
            "02" => 2,
            _ => return Err(invalid(format!("Invalid PSK hash {xx}"))),
        };
        let b64 = rest
            .strip_suffix(':')
            .filter(|b| !b.contains(':'))
            .ok_or_else(|| invalid("Invalid format of PSK interchange: no closing ':'"))?;
        let raw = base64_decode(b64).ok_or_else(|| invalid("Could not decode base64 PSK"))?;
        let want: &[usize] = match hash {
            1 => &[36],
            2 => &[52],
            _ => &[36, 52],
        };
        if !want.contains(&raw.len()) {
            return Err(invalid("Invalid key: unsupported key length"));
        }
        let (key, crc) = raw.split_at(raw.len() - 4);
        if crc32_ieee(key).to_le_bytes() != crc {
            return Err(invalid("Invalid key: CRC-32 checksums do not match"));
        }
        Ok(ConfiguredPsk {
            key: key.to_vec(),
            hash,
        })
    }

    /// A configured PSK from its parts (`hash` 0, 1 or 2 and a key of 32 or 48 bytes as it requires).
    pub fn new(key: Vec<u8>, hash: u8) -> Result<ConfiguredPsk> {
        let ok = matches!((hash, key.len()), (0 | 1, 32) | (0 | 2, 48));
        if !ok {
            return Err(invalid("Invalid key: unsupported key length"));
        }
        Ok(ConfiguredPsk { key, hash })
    }

    /// The interchange text, as `nvme gen-tls-key` writes it.
    pub fn to_text(&self) -> String {
        let mut raw = self.key.clone();
        raw.extend(crc32_ieee(&self.key).to_le_bytes());
        format!("NVMeTLSkey-1:{:02x}:{}:", self.hash, base64_encode(&raw))
    }

    /// The cipher suite this key is used with: its length chooses.
    pub fn suite(&self) -> Suite {
        if self.key.len() == 48 {
            Suite::Aes256GcmSha384
        } else {
            Suite::Aes128GcmSha256
        }
    }

    /// The retained PSK: HKDF (the key's hash) of the configured PSK with info `len || "tls13 HostNQN" ||
    /// hostnqn`, or the key itself when its hash is `00`.
    pub fn retained(&self, hostnqn: &str) -> Vec<u8> {
        let h = match self.hash {
            0 => return self.key.clone(),
            1 => Suite::Aes128GcmSha256,
            _ => Suite::Aes256GcmSha384,
        };
        let info = hkdf_info(self.key.len(), "tls13 HostNQN", hostnqn);
        h.expand(&h.extract(&[], &self.key), &info, h.hash_len())
    }

    /// The PSK identity, the TLS PSK and suite a host `hostnqn` uses towards subsystem `subnqn`.
    pub fn tls_psk(&self, hostnqn: &str, subnqn: &str) -> Result<TlsPsk> {
        let suite = self.suite();
        let identity = identity(hostnqn, subnqn, suite);
        if identity.len() > 255 {
            return Err(invalid("Invalid PSK identity: too long"));
        }
        let retained = self.retained(hostnqn);
        let info = hkdf_info(retained.len(), "tls13 nvme-tls-psk", &identity);
        let key = suite.expand(&suite.extract(&[], &retained), &info, suite.hash_len());
        Ok(TlsPsk {
            identity,
            key,
            suite,
        })
    }
}

/// `NVMe0R0X <hostnqn> <subnqn>`: TLS 1.3 (0), a retained PSK (R), the suite's hash (01 SHA-256, 02 SHA-384).
pub fn identity(hostnqn: &str, subnqn: &str, suite: Suite) -> String {
    let h = match suite {
        Suite::Aes128GcmSha256 => "01",
        Suite::Aes256GcmSha384 => "02",
    };
    format!("NVMe0R{h} {hostnqn} {subnqn}")
}

/// Parses an identity [`identity`] made: (suite, hostnqn, subnqn).
pub fn parse_identity(id: &[u8]) -> Option<(Suite, &str, &str)> {
    let s = std::str::from_utf8(id).ok()?;
    let rest = s.strip_prefix("NVMe0R")?;
    let (h, rest) = rest.split_at_checked(2)?;
    let suite = match h {
        "01" => Suite::Aes128GcmSha256,
        "02" => Suite::Aes256GcmSha384,
        _ => return None,
    };
    let (host, sub) = rest.strip_prefix(' ')?.split_once(' ')?;
    (!host.is_empty() && !sub.is_empty() && !sub.contains(' ')).then_some((suite, host, sub))
}

/// SPDK's HKDF info for both derivations: the input key's length (big-endian u16, as SPDK writes it), then
/// the label and the string, each after a one-byte length.
fn hkdf_info(len: usize, label: &str, s: &str) -> Vec<u8> {
    let mut info = Vec::with_capacity(4 + label.len() + s.len());
    info.extend_from_slice(&(len as u16).to_be_bytes());
    info.push(label.len() as u8);
    info.extend_from_slice(label.as_bytes());
    info.push(s.len() as u8);
    info.extend_from_slice(s.as_bytes());
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "nqn.2016-06.io.spdk:host1";
    const SUB: &str = "nqn.2016-06.io.spdk:cnode1";

    #[test]
    fn interchange_text_round_trips_and_bad_text_is_refused() {
        // SPDK's tests make keys from the ASCII of a hex string (test/nvmf/common.sh, format_interchange_psk).
        let k = ConfiguredPsk::new(b"00112233445566778899aabbccddeeff".to_vec(), 1).unwrap();
        let text = k.to_text();
        assert!(text.starts_with("NVMeTLSkey-1:01:MDAxMTIyMzM0NDU1NjY3Nzg4OTlhYWJiY2NkZGVlZmZ"));
        assert_eq!(ConfiguredPsk::parse(&format!("{text}\n")).unwrap(), k);
        assert_eq!(k.suite(), Suite::Aes128GcmSha256);
        let k48 = ConfiguredPsk::new(vec![3; 48], 2).unwrap();
        assert_eq!(
            ConfiguredPsk::parse(&k48.to_text()).unwrap().suite(),
            Suite::Aes256GcmSha384
        );
        assert!(
            ConfiguredPsk::parse(&ConfiguredPsk::new(vec![3; 48], 0).unwrap().to_text()).is_ok()
        );
        for bad in [
            "NVMeTLSkey-1:03:AAAA:",
            "NVMeTLSkey-2:01:AAAA:",
            "NVMeTLSkey-1:01:AAAA",
            "NVMeTLSkey-1:01:@@@@:",
            "DHHC-1:01:AAAA:",
        ] {
            assert!(ConfiguredPsk::parse(bad).is_err(), "{bad}");
        }
        // Hash 01 with a 48-byte key, and a broken CRC.
        let mut t = ConfiguredPsk::new(vec![3; 48], 2).unwrap().to_text();
        t.replace_range(13..15, "01");
        assert!(ConfiguredPsk::parse(&t).is_err());
        let mut raw = vec![1u8; 32];
        raw.extend([0, 0, 0, 0]);
        assert!(
            ConfiguredPsk::parse(&format!("NVMeTLSkey-1:01:{}:", base64_encode(&raw))).is_err()
        );
        assert!(ConfiguredPsk::new(vec![0; 31], 0).is_err());
    }

    #[test]
    fn identity_and_derivations() {
        assert_eq!(
            identity(HOST, SUB, Suite::Aes128GcmSha256),
            "NVMe0R01 nqn.2016-06.io.spdk:host1 nqn.2016-06.io.spdk:cnode1"
        );
        let id = identity(HOST, SUB, Suite::Aes256GcmSha384);
        assert_eq!(
            parse_identity(id.as_bytes()),
            Some((Suite::Aes256GcmSha384, HOST, SUB))
        );
        assert_eq!(parse_identity(b"NVMe0R03 a b"), None);
        assert_eq!(parse_identity(b"NVMe0R01 a"), None);
        assert_eq!(parse_identity(b"NVMe0R01 a b c"), None);

        let k = ConfiguredPsk::new(vec![0x11; 32], 1).unwrap();
        let r = k.retained(HOST);
        assert_eq!(r.len(), 32);
        assert_ne!(r, k.retained("nqn.2016-06.io.spdk:host2"));
        assert_eq!(
            ConfiguredPsk::new(vec![0x11; 32], 0)
                .unwrap()
                .retained(HOST),
            vec![0x11; 32]
        );
        let t = k.tls_psk(HOST, SUB).unwrap();
        assert_eq!((t.key.len(), t.suite), (32, Suite::Aes128GcmSha256));
        assert_ne!(t.key, k.tls_psk(HOST, "nqn.x").unwrap().key);
        let t = ConfiguredPsk::new(vec![0x11; 48], 2)
            .unwrap()
            .tls_psk(HOST, SUB)
            .unwrap();
        assert_eq!((t.key.len(), t.suite), (48, Suite::Aes256GcmSha384));
        assert!(!format!("{t:?}").contains("17"));
    }
}
