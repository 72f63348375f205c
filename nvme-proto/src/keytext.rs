//! The text forms of NVMe secrets: DH-HMAC-CHAP's `DHHC-1:XX:<base64>:` and NVMe/TCP's
//! `NVMeTLSkey-1:XX:<base64>:`, both base64 (standard alphabet, padded) of the key followed by its CRC-32
//! (little-endian).

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(if i <= c.len() {
                BASE64[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// Standard base64 with padding (the key files' alphabet).
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| BASE64.iter().position(|x| *x == c).map(|v| v as u32);
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (i, q) in b.chunks(4).enumerate() {
        let last = i == b.len() / 4 - 1;
        let pad = q.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for c in &q[..4 - pad] {
            n = n << 6 | val(*c)?;
        }
        n <<= 6 * pad as u32;
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    Some(out)
}

/// CRC-32 (IEEE 802.3, as zlib's): the check value of both key formats.
pub fn crc32_ieee(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in data {
        crc ^= *b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                crc >> 1 ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_crc_matches_zlib() {
        assert_eq!(crc32_ieee(b"123456789"), 0xcbf4_3926);
        for n in 0..8 {
            let d: Vec<u8> = (0..n as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&d)).unwrap(), d);
        }
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert!(base64_decode("YWI").is_none());
        assert!(base64_decode("Y=I=").is_none());
    }
}
