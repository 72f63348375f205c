//! Response encoding, byte-compatible with SPDK's JSON writer.
//!
//! SPDK writes compact JSON and escapes every character outside printable
//! ASCII (`0x20..=0x7e`) as `\uXXXX` with upper-case hex (UTF-16 surrogate
//! pairs above the BMP). Besides matching byte for byte, ASCII-only output
//! keeps SPDK's python client safe: it decodes each 4 KiB `recv()` chunk as
//! UTF-8 on its own, which breaks on a multi-byte character split between
//! chunks.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};

use crate::RpcError;

/// serde_json formatter producing SPDK-style escapes (see module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct AsciiFormatter;

fn is_plain(b: u8) -> bool {
    (0x20..0x7f).contains(&b)
}

impl Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let bytes = fragment.as_bytes();
        if bytes.iter().all(|b| is_plain(*b)) {
            return writer.write_all(bytes);
        }
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() && is_plain(c as u8) {
                continue;
            }
            writer.write_all(&bytes[start..i])?;
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                write!(writer, "\\u{:04X}", u)?;
            }
            start = i + c.len_utf8();
        }
        writer.write_all(&bytes[start..])
    }

    fn write_char_escape<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        char_escape: CharEscape,
    ) -> io::Result<()> {
        let s: &[u8] = match char_escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(b) => return write!(writer, "\\u{:04X}", b),
        };
        writer.write_all(s)
    }
}

/// Append `value` to `out` as compact, ASCII-only JSON.
pub fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> serde_json::Result<()> {
    let mut ser = serde_json::Serializer::with_formatter(out, AsciiFormatter);
    value.serialize(&mut ser)
}

/// Encode `value` as compact, ASCII-only JSON text (SPDK's output style).
pub fn to_ascii_json<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    write_json(&mut out, value)?;
    Ok(out)
}

const PREFIX: &[u8] = b"{\"jsonrpc\":\"2.0\",\"id\":";

/// `{"jsonrpc":"2.0","id":<id>,"result":<result>}` (no trailing newline).
pub(crate) fn result_response<T: Serialize + ?Sized>(
    id: &str,
    result: &T,
) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64 + id.len());
    out.extend_from_slice(PREFIX);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b",\"result\":");
    write_json(&mut out, result)?;
    out.push(b'}');
    Ok(out)
}

/// `{"jsonrpc":"2.0","id":<id or null>,"error":{"code":..,"message":".."}}`
/// (no trailing newline).
pub(crate) fn error_response(id: Option<&str>, err: &RpcError) -> Vec<u8> {
    let id = id.unwrap_or("null");
    let mut out = Vec::with_capacity(96 + id.len() + err.message.len());
    out.extend_from_slice(PREFIX);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b",\"error\":{\"code\":");
    out.extend_from_slice(err.code.to_string().as_bytes());
    out.extend_from_slice(b",\"message\":");
    write_json(&mut out, err.message.as_str()).expect("writing a string to a Vec cannot fail");
    out.extend_from_slice(b"}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(v: &serde_json::Value) -> String {
        String::from_utf8(to_ascii_json(v).unwrap()).unwrap()
    }

    #[test]
    fn escapes_like_spdk() {
        assert_eq!(s(&json!("a/b")), r#""a/b""#);
        assert_eq!(s(&json!("q\"\\\n\r\t\u{8}\u{c}")), r#""q\"\\\n\r\t\b\f""#);
        assert_eq!(s(&json!("\u{1}\u{1f}\u{7f}")), r#""\u0001\u001F\u007F""#);
        assert_eq!(s(&json!("é€😀x")), r#""\u00E9\u20AC\uD83D\uDE00x""#);
        assert_eq!(
            s(&json!({"ké": [1, true, null]})),
            r#"{"k\u00E9":[1,true,null]}"#
        );
        // Round trip.
        let v = json!({"s": "é€😀\u{7f}\u{0}/\"", "n": -1.5});
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&s(&v)).unwrap(),
            v
        );
    }

    #[test]
    fn envelopes() {
        let r = result_response("7", &json!({"a": 1})).unwrap();
        assert_eq!(r, br#"{"jsonrpc":"2.0","id":7,"result":{"a":1}}"#);
        let e = error_response(None, &RpcError::method_not_found());
        assert_eq!(
            e,
            br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32601,"message":"Method not found"}}"#
        );
        let e = error_response(Some("\"x\""), &RpcError::from_errno(17, "é"));
        assert_eq!(
            e,
            br#"{"jsonrpc":"2.0","id":"x","error":{"code":-17,"message":"\u00E9"}}"#
        );
    }
}
