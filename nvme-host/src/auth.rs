//! DH-HMAC-CHAP on the host side (NVMe in-band authentication), as SPDK's host and Linux's run it on every
//! queue pair after its Fabrics Connect: AUTH_Negotiate, the controller's Challenge, our Reply (response R1,
//! and for bidirectional authentication our own challenge C2), the controller's Success1 (with R2, which we
//! check), and Success2. The messages are in `nvme_proto::auth`; this module holds the secrets, the hashes,
//! the finite-field Diffie-Hellman groups of RFC 7919 and the transaction's steps. Control path only: it runs
//! once per queue pair connect.

use std::sync::{Arc, OnceLock};

use hmac::{Hmac, Mac};
use num_bigint::BigUint;
use nvme_proto::auth::{self as msg, dhgroup_id, hash_id, rce, Challenge, Received, Success1};
use nvme_proto::cmd::{Cqe, Sqe};
use nvme_proto::host::Dir;
use nvme_proto::keytext::{base64_decode, base64_encode, crc32_ieee};
use sha2::{Digest, Sha256, Sha384, Sha512};

use errors::{Error, ErrorKind, Result};

/// What a controller authenticates with: the keys are read when a queue pair authenticates (SPDK reads its
/// key files each time too), by the callback that looks them up.
#[derive(Clone)]
pub struct AuthOpts {
    /// The host's and (for bidirectional authentication) the controller's `DHHC-1:` secrets.
    pub keys: Arc<dyn Fn() -> Result<(String, Option<String>)> + Send + Sync>,
    /// Hash functions offered, in `hash_id` values.
    pub digests: Vec<u8>,
    /// DH groups offered, in `dhgroup_id` values.
    pub dhgroups: Vec<u8>,
    /// A controller key is given: the controller must prove it holds it, even when it does not ask for
    /// authentication itself.
    pub bidirectional: bool,
}

impl std::fmt::Debug for AuthOpts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthOpts")
            .field("digests", &self.digests)
            .field("dhgroups", &self.dhgroups)
            .field("bidirectional", &self.bidirectional)
            .finish_non_exhaustive()
    }
}

fn auth_err(why: impl Into<String>) -> Error {
    Error::new(ErrorKind::Io(libc::EACCES), why)
}

fn key_err(why: impl Into<String>) -> Error {
    Error::new(ErrorKind::Invalid, why)
}

/// A `DHHC-1:XX:<base64 of secret and CRC-32>:` secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    /// The secret bytes (32, 48 or 64).
    pub key: Vec<u8>,
    /// The hash that transforms it before use (`hash_id`; 0: used as it is).
    pub transform: u8,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret itself (it would end up in logs).
        write!(
            f,
            "Secret({} bytes, transform {})",
            self.key.len(),
            self.transform
        )
    }
}

impl Secret {
    /// Parses the text of a key file (anything after the closing `:`, a newline say, is ignored).
    pub fn parse(text: &str) -> Result<Secret> {
        let rest = text
            .trim_start()
            .strip_prefix("DHHC-1:")
            .ok_or_else(|| key_err("Invalid key format: not a DHHC-1 secret"))?;
        let (xx, rest) = rest
            .split_once(':')
            .ok_or_else(|| key_err("Invalid key format"))?;
        let transform = u8::from_str_radix(xx, 16)
            .ok()
            .filter(|t| *t <= hash_id::SHA512 && xx.len() == 2)
            .ok_or_else(|| key_err(format!("Invalid key format: hash {xx}")))?;
        let (b64, _) = rest
            .split_once(':')
            .ok_or_else(|| key_err("Invalid key format: no closing ':'"))?;
        let raw = base64_decode(b64).ok_or_else(|| key_err("Invalid key format: bad base64"))?;
        if ![36, 52, 68].contains(&raw.len()) {
            return Err(key_err(format!(
                "Invalid key length: {} bytes",
                raw.len().saturating_sub(4)
            )));
        }
        let (key, crc) = raw.split_at(raw.len() - 4);
        if crc32_ieee(key).to_le_bytes() != crc {
            return Err(key_err("Invalid key: CRC mismatch"));
        }
        Ok(Secret {
            key: key.to_vec(),
            transform,
        })
    }

    /// The key file text of this secret (`DHHC-1:XX:<base64 of the secret and its CRC-32>:`), as
    /// `nvme gen-dhchap-key` writes it.
    pub fn to_text(&self) -> String {
        let mut raw = self.key.clone();
        raw.extend(crc32_ieee(&self.key).to_le_bytes());
        format!("DHHC-1:{:02x}:{}:", self.transform, base64_encode(&raw))
    }

    /// The key the responses are keyed with: HMAC(transform hash, secret, NQN || "NVMe-over-Fabrics"), or the
    /// secret itself when it asks for no transformation. `nqn` is the host NQN for the host's secret and the
    /// subsystem NQN for the controller's.
    pub fn transformed(&self, nqn: &str) -> Vec<u8> {
        if self.transform == 0 {
            return self.key.clone();
        }
        hmac(
            self.transform,
            &self.key,
            &[nqn.as_bytes(), b"NVMe-over-Fabrics"],
        )
    }
}

fn hmac_of<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m =
        <M as hmac::digest::KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

/// HMAC with hash `id` over the concatenation of `parts`.
fn hmac(id: u8, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    match id {
        hash_id::SHA256 => hmac_of::<Hmac<Sha256>>(key, parts),
        hash_id::SHA384 => hmac_of::<Hmac<Sha384>>(key, parts),
        _ => hmac_of::<Hmac<Sha512>>(key, parts),
    }
}

/// Hash `id` of `data`.
fn hash(id: u8, data: &[u8]) -> Vec<u8> {
    match id {
        hash_id::SHA256 => Sha256::digest(data).to_vec(),
        hash_id::SHA384 => Sha384::digest(data).to_vec(),
        _ => Sha512::digest(data).to_vec(),
    }
}

/// The prime of RFC 7919 group `id`, built from the RFC's formula (appendix A):
/// p = 2^b - 2^(b-64) + 2^64 * (floor(2^(b-130) * e) + X) - 1, with the RFC's X per size. Computed once.
fn ffdhe_prime(id: u8) -> Option<&'static BigUint> {
    static PRIMES: [OnceLock<BigUint>; 5] = [const { OnceLock::new() }; 5];
    let (bits, x): (u64, u64) = match id {
        dhgroup_id::FFDHE2048 => (2048, 560_316),
        dhgroup_id::FFDHE3072 => (3072, 2_625_351),
        dhgroup_id::FFDHE4096 => (4096, 5_736_041),
        dhgroup_id::FFDHE6144 => (6144, 15_705_020),
        dhgroup_id::FFDHE8192 => (8192, 10_965_728),
        _ => return None,
    };
    Some(PRIMES[id as usize - 1].get_or_init(|| {
        let one = BigUint::from(1u32);
        let e = e_scaled(bits - 130);
        (&one << bits) - (&one << (bits - 64)) + ((e + BigUint::from(x)) << 64u32) - one
    }))
}

/// floor(e * 2^k), exactly: e = sum of 1/n!, summed in fixed point with guard bits well past the rounding of
/// the terms (each term truncated loses less than one unit of 2^-guard).
fn e_scaled(k: u64) -> BigUint {
    let guard = 64;
    let mut term = BigUint::from(1u32) << (k + guard);
    let mut sum = BigUint::default();
    let mut n = 1u32;
    while term > BigUint::default() {
        sum += &term;
        term /= n;
        n += 1;
    }
    sum >> guard
}

/// Random bytes from the kernel (control path: a few per authentication).
fn random(n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::os(e, "reading random bytes"))?;
    Ok(b)
}

/// Our DH key pair in group `id`: the secret exponent and the public value 2^x mod p (big-endian, padded to
/// the prime's length). The exponent is about twice the group's strength, as OpenSSL picks it.
fn dh_keypair(id: u8) -> Result<(BigUint, Vec<u8>)> {
    let p = ffdhe_prime(id).ok_or_else(|| auth_err("unknown DH group"))?;
    let bits: usize = match id {
        dhgroup_id::FFDHE2048 => 225,
        dhgroup_id::FFDHE3072 => 275,
        dhgroup_id::FFDHE4096 => 325,
        dhgroup_id::FFDHE6144 => 375,
        _ => 400,
    };
    let mut r = random(bits.div_ceil(8))?;
    r[0] |= 0x80; // a full-size exponent
    let x = BigUint::from_bytes_be(&r);
    let pubv = BigUint::from(2u32).modpow(&x, p);
    Ok((x, padded(&pubv, p)))
}

/// `v` big-endian, left-padded with zeroes to the length of `p`.
fn padded(v: &BigUint, p: &BigUint) -> Vec<u8> {
    let len = (p.bits() as usize).div_ceil(8);
    let b = v.to_bytes_be();
    let mut out = vec![0u8; len.saturating_sub(b.len())];
    out.extend_from_slice(&b);
    out
}

/// The shared secret with the controller's value `y` (checked to be in 2..p-2), padded to the prime's length.
fn dh_shared(id: u8, x: &BigUint, y: &[u8]) -> std::result::Result<Vec<u8>, u8> {
    let p = ffdhe_prime(id).ok_or(rce::DHGROUP)?;
    let y = BigUint::from_bytes_be(y);
    let one = BigUint::from(1u32);
    if y <= one || y >= p - &one {
        return Err(rce::PAYLOAD);
    }
    Ok(padded(&y.modpow(x, p), p))
}

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Whose response: the host's R1 or the controller's R2 (the role's string, and which NQN comes first).
#[derive(Clone, Copy)]
enum Role {
    Host,
    Controller,
}

/// A response: HMAC over the (augmented) challenge, the sequence number, the transaction id, SC_C (0), the
/// role ("HostHost" or "Controller") and the two NQNs, the role's own first. `nqns` is (host, subsystem).
fn response(
    hash_id: u8,
    key: &[u8],
    challenge: &[u8],
    seqnum: u32,
    tid: u16,
    role: Role,
    nqns: (&str, &str),
) -> Vec<u8> {
    let (tag, first, second): (&[u8], _, _) = match role {
        Role::Host => (b"HostHost", nqns.0, nqns.1),
        Role::Controller => (b"Controller", nqns.1, nqns.0),
    };
    hmac(
        hash_id,
        key,
        &[
            challenge,
            &seqnum.to_le_bytes(),
            &tid.to_le_bytes(),
            &[0],
            tag,
            first.as_bytes(),
            &[0],
            second.as_bytes(),
        ],
    )
}

/// What to do after a message went out.
#[derive(Debug)]
enum After {
    RecvChallenge,
    RecvSuccess1,
    Done,
    /// A Failure2 went out: the transaction fails with this.
    Fail(Error),
}

#[derive(Debug)]
enum Step {
    /// Send this message, then go on.
    Send(Vec<u8>, After),
    /// Receive the Challenge (false) or Success1 (true).
    Recv(bool),
    Done,
}

/// One authentication transaction on one queue pair. Drive it with [`Transaction::command`] and
/// [`Transaction::completed`] until `completed` says it is done.
#[derive(Debug)]
pub struct Transaction {
    tid: u16,
    hostnqn: String,
    subnqn: String,
    host: Secret,
    ctrlr: Option<Secret>,
    digests: Vec<u8>,
    dhgroups: Vec<u8>,
    /// The controller's response we expect (bidirectional).
    expect_r2: Option<Vec<u8>>,
    hash: u8,
    step: Step,
}

/// The command a transaction wants sent next.
pub struct Command<'a> {
    /// The Authentication Send or Receive command.
    pub sqe: Sqe,
    /// Data direction.
    pub dir: Dir,
    /// The message to send (empty for a receive).
    pub data: &'a [u8],
    /// Bytes sent, or the room given to receive.
    pub len: usize,
}

impl Transaction {
    /// A transaction `tid` for host `hostnqn` with subsystem `subnqn`, its keys read now.
    pub fn new(opts: &AuthOpts, tid: u16, hostnqn: &str, subnqn: &str) -> Result<Transaction> {
        let (h, c) = (opts.keys)()?;
        let host = Secret::parse(&h)?;
        let ctrlr = c.as_deref().map(Secret::parse).transpose()?;
        Ok(Transaction {
            tid,
            hostnqn: hostnqn.into(),
            subnqn: subnqn.into(),
            host,
            ctrlr,
            digests: opts.digests.clone(),
            dhgroups: opts.dhgroups.clone(),
            expect_r2: None,
            hash: 0,
            step: Step::Send(
                msg::negotiate(tid, &opts.digests, &opts.dhgroups),
                After::RecvChallenge,
            ),
        })
    }

    /// The next command to send (`None` once done).
    pub fn command(&self) -> Option<Command<'_>> {
        match &self.step {
            Step::Send(m, _) => Some(Command {
                sqe: msg::auth_send(m.len(), 0),
                dir: Dir::ToCtrl,
                data: m,
                len: m.len(),
            }),
            Step::Recv(_) => Some(Command {
                sqe: msg::auth_recv(msg::RECV_LEN, 0),
                dir: Dir::FromCtrl,
                data: &[],
                len: msg::RECV_LEN,
            }),
            Step::Done => None,
        }
    }

    /// The last command completed with `c` (and `received`, for a receive): whether the transaction is done
    /// (the queue pair is authenticated), or why it failed.
    pub fn completed(&mut self, c: &Cqe, received: &[u8]) -> Result<bool> {
        let step = std::mem::replace(&mut self.step, Step::Done);
        if !c.status.is_success() {
            let what = match step {
                Step::Recv(_) => "Authentication Receive",
                _ => "Authentication Send",
            };
            return Err(auth_err(format!("{what}: {}", c.status)));
        }
        match step {
            Step::Send(_, After::RecvChallenge) => self.step = Step::Recv(false),
            Step::Send(_, After::RecvSuccess1) => self.step = Step::Recv(true),
            Step::Send(_, After::Done) | Step::Done => return Ok(true),
            Step::Send(_, After::Fail(e)) => return Err(e),
            Step::Recv(false) => self.step = self.on_challenge(received)?,
            Step::Recv(true) => {
                self.step = self.on_success1(received)?;
                if matches!(self.step, Step::Done) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Sends AUTH_Failure2 with `explanation`, then fails with `why`.
    fn refuse(&self, explanation: u8, why: String) -> Step {
        log::error!("DH-HMAC-CHAP with {}: {why}", self.subnqn);
        Step::Send(
            msg::failure2(self.tid, explanation),
            After::Fail(auth_err(why)),
        )
    }

    /// A Failure1 from the controller ends the transaction at once (the controller drops the queue pair).
    fn failure1(m: &[u8]) -> Result<()> {
        match msg::received(m) {
            Received::Failure1(rce) => Err(auth_err(format!(
                "the controller refused authentication (reason {rce:#04x})"
            ))),
            _ => Ok(()),
        }
    }

    fn on_challenge(&mut self, m: &[u8]) -> Result<Step> {
        Self::failure1(m)?;
        let ch = match Challenge::parse(m) {
            Ok(c) => c,
            Err(rce) => return Ok(self.refuse(rce, "malformed challenge".into())),
        };
        if ch.tid != self.tid {
            return Ok(self.refuse(
                rce::PAYLOAD,
                format!("challenge for transaction {}", ch.tid),
            ));
        }
        if !self.digests.contains(&ch.hash) || !self.dhgroups.contains(&ch.dhgroup) {
            return Ok(self.refuse(
                rce::PAYLOAD,
                format!(
                    "hash {} / DH group {} were not offered",
                    ch.hash, ch.dhgroup
                ),
            ));
        }
        self.hash = ch.hash;
        // With a DH group, both challenges are augmented with the shared secret: HMAC(H(Z), C).
        let (dhv, zkey) = if ch.dhgroup == dhgroup_id::NULL {
            (Vec::new(), None)
        } else {
            let (x, pubv) = dh_keypair(ch.dhgroup)?;
            match dh_shared(ch.dhgroup, &x, &ch.dhv) {
                Ok(z) => (pubv, Some(hash(ch.hash, &z))),
                Err(rce) => return Ok(self.refuse(rce, "bad DH value".into())),
            }
        };
        let augment = |c: &[u8]| match &zkey {
            Some(k) => hmac(ch.hash, k, &[c]),
            None => c.to_vec(),
        };
        let kh = self.host.transformed(&self.hostnqn);
        let r1 = response(
            ch.hash,
            &kh,
            &augment(&ch.c1),
            ch.seqnum,
            self.tid,
            Role::Host,
            (&self.hostnqn, &self.subnqn),
        );
        let c2 = match &self.ctrlr {
            Some(k) => {
                let c2 = random(r1.len())?;
                let s2 = loop {
                    let b = random(4)?;
                    let s = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    if s != 0 {
                        break s;
                    }
                };
                let kc = k.transformed(&self.subnqn);
                self.expect_r2 = Some(response(
                    ch.hash,
                    &kc,
                    &augment(&c2),
                    s2,
                    self.tid,
                    Role::Controller,
                    (&self.hostnqn, &self.subnqn),
                ));
                Some((c2, s2))
            }
            None => None,
        };
        let reply = msg::reply(
            self.tid,
            &r1,
            c2.as_ref().map(|(c, s)| (c.as_slice(), *s)),
            &dhv,
        );
        Ok(Step::Send(reply, After::RecvSuccess1))
    }

    fn on_success1(&mut self, m: &[u8]) -> Result<Step> {
        Self::failure1(m)?;
        let s = match Success1::parse(m) {
            Ok(s) => s,
            Err(rce) => return Ok(self.refuse(rce, "malformed Success1".into())),
        };
        if s.tid != self.tid || s.hl as usize != msg::hash_len(self.hash) {
            return Ok(self.refuse(
                rce::PAYLOAD,
                "Success1 does not match the transaction".into(),
            ));
        }
        match (&self.expect_r2, &s.r2) {
            (None, _) => Ok(Step::Done),
            (Some(want), Some(got)) if same(want, got) => {
                Ok(Step::Send(msg::success2(self.tid), After::Done))
            }
            (Some(_), Some(_)) => Ok(self.refuse(
                rce::FAILED,
                "the controller's response is wrong: it does not hold the controller key".into(),
            )),
            (Some(_), None) => Ok(self.refuse(
                rce::PAYLOAD,
                "the controller did not answer our challenge".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
    const SUB: &str = "nqn.2024-03.io.spdk:cnode0";
    const KEY01: &str = "DHHC-1:01:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn counting(n: usize) -> Vec<u8> {
        (0..n as u8).collect()
    }

    /// R1 and R2 without DH for a key, as SPDK v24.05's host computes them (vectors from its own code).
    fn check(key: &str, hash_id: u8, r1: &str, r2: &str) {
        let k = Secret::parse(key).unwrap();
        let hl = nvme_proto::auth::hash_len(hash_id);
        let c = counting(hl);
        let got = response(
            hash_id,
            &k.transformed(HOST),
            &c,
            0x0102_0304,
            0x0a0b,
            Role::Host,
            (HOST, SUB),
        );
        assert_eq!(got, hex(r1), "R1 for {key}");
        let got = response(
            hash_id,
            &k.transformed(SUB),
            &c,
            0x1122_3344,
            0x0a0b,
            Role::Controller,
            (HOST, SUB),
        );
        assert_eq!(got, hex(r2), "R2 for {key}");
    }

    #[test]
    fn secrets_parse_and_transform_as_spdk() {
        let k = Secret::parse(&format!("{KEY01}\n")).unwrap();
        assert_eq!((k.key.clone(), k.transform), (counting(32), 1));
        assert_eq!(crc32_ieee(b"123456789"), 0xcbf4_3926);
        // And back to the same text (every length SPDK takes).
        assert_eq!(k.to_text(), KEY01);
        for (len, xx) in [(32, 1), (48, 2), (64, 3), (32, 0)] {
            let s = Secret {
                key: counting(len),
                transform: xx,
            };
            assert_eq!(Secret::parse(&s.to_text()).unwrap(), s);
        }
        assert_eq!(
            k.transformed(HOST),
            hex("6c7b81cb2a746f74454b1d7140f3153b51ca99459fcef7a86a17f27695b87cd8")
        );
        for bad in [
            "DHHC-1:01:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR",
            "DHHC-1:01:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaS:",
            "DHHC-1:04:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:",
            "DHHC-1:01:AAECAwQF:",
            "NVMeTLSkey-1:01:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:",
        ] {
            assert!(Secret::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn responses_match_spdk_vectors() {
        check(
            "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:",
            hash_id::SHA256,
            "294dfc8fe3f1460a97a1796a0f6e27949dd7a3f7333d5043c69e87472c63acde",
            "d36db019108c8adbfd6527e3e61b1d270429c2da6d5982fc0504ca7dfb028456",
        );
        check(
            KEY01,
            hash_id::SHA256,
            "23dd76e8de9ca014f6048886698b67a59858631e615ff7cf38ce144dc2ffe1aa",
            "4ffa0f961b34c6540ae0707d5c5aac8ea4c5f50f85623c3a490053f80a6fcc00",
        );
        check(
            "DHHC-1:02:ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoOEhYaHiImKi4yNjo+QkZKTvGwQfg==:",
            hash_id::SHA384,
            "f99660600fddfc79aa9cc6a31252765dde51130525fa921fe7fea65336bc05f6836ce65fe0a540b1555fe75b8c247e2d",
            "19e89c57626e9f0750c201acf2f2d49fb2addcb413d259afd069d774a90ee1b57263be2a6201c8dc617bfb491f19649e",
        );
        check(
            "DHHC-1:03:yMnKy8zNzs/Q0dLT1NXW19jZ2tvc3d7f4OHi4+Tl5ufo6err7O3u7/Dx8vP09fb3+Pn6+/z9/v8AAQIDBAUGB24FqBs=:",
            hash_id::SHA512,
            "3162283cd0ef7bb07540f47588dd313f546038cee59d542682b5124984575041bc4985ee379228d7939683131a7f44859afe2241088b5a04aa4f020ad7a40260",
            "ba449b9522fb97755ef05460eb8c291ba59ffea21f42dae8d4e11ba4918a5a178d44a11b66b9d4cf4ec7db641c642334f271fc39d101ea4a100ef09d2df557b0",
        );
    }

    #[test]
    fn ffdhe_primes_follow_rfc_7919() {
        let p = ffdhe_prime(dhgroup_id::FFDHE2048).unwrap();
        assert_eq!(
            p.to_bytes_be(),
            hex(concat!(
                "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695",
                "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A",
                "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
                "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A",
                "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4",
                "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
                "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005",
                "C58EF1837D1683B2C6F34A26C1B2EFFA886B423861285C97FFFFFFFFFFFFFFFF"
            ))
        );
        // Every group: the size the specification gives, 64 one bits at both ends (the RFC's construction).
        for id in 1..=5u8 {
            let p = ffdhe_prime(id).unwrap();
            let b = p.to_bytes_be();
            assert_eq!(Some(b.len()), nvme_proto::auth::dhgroup_len(id));
            assert!(b[..8].iter().chain(&b[b.len() - 8..]).all(|x| *x == 0xff));
        }
    }

    #[test]
    fn dh_augmented_response_matches_spdk() {
        let id = dhgroup_id::FFDHE2048;
        let p = ffdhe_prime(id).unwrap();
        let x = BigUint::from_bytes_be(&hex("1234567890abcdef1234567890abcdef"));
        let y = BigUint::from_bytes_be(&hex("fedcba0987654321fedcba0987654321"));
        let two = BigUint::from(2u32);
        let ours = padded(&two.modpow(&x, p), p);
        assert_eq!(&ours[..16], &hex("903234f8e6a5f76d3582be566bd79fb3")[..]);
        let theirs = padded(&two.modpow(&y, p), p);
        let z = dh_shared(id, &x, &theirs).unwrap();
        assert_eq!(&z[..16], &hex("6499a29d5967ba5d8efa94072e5e75af")[..]);
        let k = Secret::parse(KEY01).unwrap();
        for (h, want) in [
            (hash_id::SHA256, "fea4d04fe969d3d32fc20b77cfbe1292f33ab65a4449ab895278473db924f5d3"),
            (hash_id::SHA384, "8b7038070370160760c95742e2379f5bbe92d96d8faeb0b7639d655eca8c9b6bb8fada9114a81ed1edf3138d22323c79"),
        ] {
            let ca = hmac(h, &hash(h, &z), &[&counting(nvme_proto::auth::hash_len(h))]);
            let r1 = response(h, &k.transformed(HOST), &ca, 0x0102_0304, 0x0a0b, Role::Host, (HOST, SUB));
            assert_eq!(r1, hex(want));
        }
        // Values outside 2..p-2 are refused.
        assert_eq!(dh_shared(id, &x, &[1]), Err(rce::PAYLOAD));
        assert_eq!(
            dh_shared(id, &x, &(p - 1u32).to_bytes_be()),
            Err(rce::PAYLOAD)
        );
    }

    fn opts(ctrlr: Option<&str>) -> AuthOpts {
        let c = ctrlr.map(String::from);
        AuthOpts {
            keys: Arc::new(move || Ok((KEY01.to_string(), c.clone()))),
            digests: vec![1, 2, 3],
            dhgroups: vec![0, 1],
            bidirectional: ctrlr.is_some(),
        }
    }

    fn ok() -> Cqe {
        Cqe::default()
    }

    /// A whole bidirectional transaction with a controller played by the test (from the same rules), then the
    /// refusals: a group we did not offer, a wrong R2, a Failure1.
    #[test]
    fn transaction_steps_and_refusals() {
        let ckey = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:";
        let mut t = Transaction::new(&opts(Some(ckey)), 5, HOST, SUB).unwrap();
        let c = t.command().unwrap();
        assert_eq!((c.dir, c.len, c.sqe.0[4]), (Dir::ToCtrl, 72, 0x05));
        assert!(!t.completed(&ok(), &[]).unwrap());
        assert_eq!(t.command().unwrap().dir, Dir::FromCtrl);
        // The controller's challenge: SHA-256, null group.
        let mut ch = vec![1u8, 1, 0, 0, 5, 0, 32, 0, 1, 0, 0, 0, 9, 0, 0, 0];
        ch.extend(counting(32));
        assert!(!t.completed(&ok(), &ch).unwrap());
        let reply = t.command().unwrap().data.to_vec();
        assert_eq!(reply.len(), 16 + 64);
        let host = Secret::parse(KEY01).unwrap();
        let want = response(
            1,
            &host.transformed(HOST),
            &counting(32),
            9,
            5,
            Role::Host,
            (HOST, SUB),
        );
        assert_eq!(&reply[16..48], &want[..], "R1");
        assert_eq!(reply[8], 1, "CVALID");
        let s2 = u32::from_le_bytes(reply[12..16].try_into().unwrap());
        let ck = Secret::parse(ckey).unwrap();
        let r2 = response(
            1,
            &ck.transformed(SUB),
            &reply[48..80],
            s2,
            5,
            Role::Controller,
            (HOST, SUB),
        );
        assert!(!t.completed(&ok(), &[]).unwrap());
        let mut s1 = vec![1u8, 3, 0, 0, 5, 0, 32, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        s1.extend(&r2);
        assert!(!t.completed(&ok(), &s1).unwrap());
        assert_eq!(
            t.command().unwrap().data,
            &nvme_proto::auth::success2(5)[..]
        );
        assert!(t.completed(&ok(), &[]).unwrap(), "done after Success2");
        assert!(t.command().is_none());

        // A group we did not offer: Failure2 (incorrect payload), then the failure.
        let mut t = Transaction::new(&opts(None), 6, HOST, SUB).unwrap();
        t.completed(&ok(), &[]).unwrap();
        let mut ch = vec![1u8, 1, 0, 0, 6, 0, 32, 0, 1, 2, 0, 1, 9, 0, 0, 0];
        ch.extend(counting(32));
        ch.extend(vec![7u8; 256]);
        t.completed(&ok(), &ch).unwrap();
        let f = t.command().unwrap().data.to_vec();
        assert_eq!(f, nvme_proto::auth::failure2(6, rce::PAYLOAD));
        assert!(t.completed(&ok(), &[]).is_err());

        // A wrong R2: Failure2 (authentication failed).
        let mut t = Transaction::new(&opts(Some(ckey)), 7, HOST, SUB).unwrap();
        t.completed(&ok(), &[]).unwrap();
        let mut ch = vec![1u8, 1, 0, 0, 7, 0, 32, 0, 1, 0, 0, 0, 9, 0, 0, 0];
        ch.extend(counting(32));
        t.completed(&ok(), &ch).unwrap();
        t.completed(&ok(), &[]).unwrap();
        let mut s1 = vec![1u8, 3, 0, 0, 7, 0, 32, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        s1.extend([0u8; 32]);
        t.completed(&ok(), &s1).unwrap();
        assert_eq!(
            t.command().unwrap().data,
            &nvme_proto::auth::failure2(7, rce::FAILED)[..]
        );
        assert!(t.completed(&ok(), &[]).is_err());

        // The controller's Failure1 ends it at once.
        let mut t = Transaction::new(&opts(None), 8, HOST, SUB).unwrap();
        t.completed(&ok(), &[]).unwrap();
        let e = t
            .completed(&ok(), &[0, 0xf1, 0, 0, 8, 0, 1, 4])
            .unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
    }
}
