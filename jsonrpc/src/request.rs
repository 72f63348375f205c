//! Interpretation of one complete JSON value as a JSON-RPC request, following
//! SPDK's `jsonrpc_parse_request()` / `parse_single_request()`. A batch array
//! is answered `-32600` as SPDK answers it ("not currently supported"): one
//! error, however many elements, so a large batch cannot make the server
//! build a large reply.

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::encode;

/// One request object (or what could be made of it).
#[derive(Debug, PartialEq)]
pub(crate) enum Item {
    /// A well-formed call. `id` is the JSON text to echo (`None`: no id).
    Call {
        method: String,
        params: Option<Value>,
        id: Option<String>,
    },
    /// Not a valid request object: answered with -32600. `id` is echoed
    /// only where SPDK had already captured it (bad `params` type).
    Invalid { id: Option<String> },
    /// Well-formed, but `params` cannot be held in a `serde_json::Value`
    /// (e.g. a number beyond `f64`): answered with -32602.
    BadParams { method: String, id: Option<String> },
}

/// A complete top-level JSON value.
#[derive(Debug)]
pub(crate) enum Parsed {
    Single(Item),
    /// Not an object (a batch array, a scalar), or unusable: -32600 with
    /// `id: null`.
    Invalid,
}

/// Captures a member even when its value is `null` (plain `Option` would
/// turn `null` into `None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// The members SPDK's decoder accepts; any other member, or a duplicate,
/// makes the request invalid.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    jsonrpc: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    method: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    params: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

fn as_string(raw: &RawValue) -> Option<String> {
    if raw.get().starts_with('"') {
        serde_json::from_str(raw.get()).ok()
    } else {
        None
    }
}

/// Interpret `bytes` (one complete, syntactically valid JSON value).
pub(crate) fn parse(bytes: &[u8]) -> Parsed {
    let Some(first) = bytes.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Parsed::Invalid;
    };
    match first {
        b'{' => Parsed::Single(parse_object(bytes)),
        _ => Parsed::Invalid,
    }
}

fn parse_object(bytes: &[u8]) -> Item {
    let invalid = Item::Invalid { id: None };
    let Ok(env) = serde_json::from_slice::<Envelope>(bytes) else {
        return invalid;
    };
    if let Some(v) = env.jsonrpc {
        if as_string(v).as_deref() != Some("2.0") {
            return invalid;
        }
    }
    let Some(method) = env.method.and_then(as_string) else {
        return invalid;
    };
    let id = match env.id {
        None => None,
        Some(raw) => {
            let text = raw.get();
            match text.as_bytes()[0] {
                b'"' => match as_string(raw) {
                    // Re-encode so the echo uses SPDK's escaping.
                    Some(s) => Some(
                        String::from_utf8(encode::to_ascii_json(&s).expect("string encodes"))
                            .expect("ASCII"),
                    ),
                    None => return invalid,
                },
                b'-' | b'0'..=b'9' => Some(text.to_string()),
                b'n' => Some("null".to_string()),
                _ => return invalid,
            }
        }
    };
    let params = match env.params {
        None => None,
        Some(raw) => match raw.get().as_bytes()[0] {
            b'n' => None,
            b'{' | b'[' => match serde_json::from_str::<Value>(raw.get()) {
                Ok(v) => Some(v),
                Err(_) => return Item::BadParams { method, id },
            },
            // SPDK has captured the id by now, so it is echoed.
            _ => return Item::Invalid { id },
        },
    };
    Item::Call { method, params, id }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn single(s: &str) -> Item {
        match parse(s.as_bytes()) {
            Parsed::Single(i) => i,
            other => panic!("{other:?}"),
        }
    }

    fn call(method: &str, params: Option<Value>, id: Option<&str>) -> Item {
        Item::Call {
            method: method.into(),
            params,
            id: id.map(String::from),
        }
    }

    #[test]
    fn valid_requests() {
        assert_eq!(
            single(r#"{"jsonrpc":"2.0","method":"m","params":{"a":1},"id":1}"#),
            call("m", Some(json!({"a": 1})), Some("1"))
        );
        // jsonrpc member optional (as in current SPDK), params null = absent.
        assert_eq!(
            single(r#"{"method":"m","params":null,"id":"x\u00e9"}"#),
            call("m", None, Some(r#""x\u00E9""#))
        );
        // Number ids echoed verbatim.
        assert_eq!(
            single(r#"{"method":"m","id":1.50e3}"#),
            call("m", None, Some("1.50e3"))
        );
        assert_eq!(
            single(r#"{"method":"m","id":null,"params":[1]}"#),
            call("m", Some(json!([1])), Some("null"))
        );
        assert_eq!(single(r#"{"method":"n"}"#), call("n", None, None));
        assert_eq!(single(r#"{"method":"\u006d"}"#), call("m", None, None));
    }

    #[test]
    fn invalid_requests() {
        for s in [
            r#"{}"#,
            r#"{"jsonrpc":"1.0","method":"m","id":1}"#,
            r#"{"jsonrpc":2.0,"method":"m","id":1}"#,
            r#"{"jsonrpc":null,"method":"m","id":1}"#,
            r#"{"method":1,"id":1}"#,
            r#"{"method":null,"id":1}"#,
            r#"{"method":"m","id":{}}"#,
            r#"{"method":"m","id":true}"#,
            r#"{"method":"m","id":1,"extra":1}"#,
            r#"{"method":"m","method":"m","id":1}"#,
        ] {
            assert_eq!(single(s), Item::Invalid { id: None }, "{s}");
        }
        // Bad params type: id already captured.
        assert_eq!(
            single(r#"{"method":"m","id":5,"params":"x"}"#),
            Item::Invalid {
                id: Some("5".into())
            }
        );
        assert!(matches!(parse(b"1"), Parsed::Invalid));
        assert!(matches!(parse(b"\"s\""), Parsed::Invalid));
        assert!(matches!(parse(b"null"), Parsed::Invalid));
    }

    #[test]
    fn unrepresentable_params() {
        assert_eq!(
            single(r#"{"method":"m","id":1,"params":[1e999]}"#),
            Item::BadParams {
                method: "m".into(),
                id: Some("1".into())
            }
        );
    }

    #[test]
    fn batch_arrays_are_invalid() {
        for text in [
            &br#"[{"method":"a","id":1}, 3]"#[..],
            b" [ ] ",
            b"3",
            b"\"x\"",
        ] {
            assert!(matches!(parse(text), Parsed::Invalid), "{text:?}");
        }
    }
}
