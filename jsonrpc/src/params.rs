//! Parameter decoding helpers for method handlers.

use std::fmt;

use serde::de::{self, DeserializeOwned, Visitor};
use serde::Deserializer;
use serde_json::{Map, Value};

use crate::RpcError;

/// Decode `params` into `T`, strictly, as SPDK's `spdk_json_decode_object()`
/// does.
///
/// `T` should be a serde struct with `#[serde(deny_unknown_fields)]`
/// (optional members with `#[serde(default)]`). Every failure is
/// `-32602` (invalid params) with serde's message naming the field:
/// - absent or `null` params decode like `{}`, so a required member gives
///   ``missing field `name` ``;
/// - ``unknown field `foo`, expected one of ...``;
/// - ``invalid type: string "x", expected u32 for field `size` `` (nested
///   paths look like `a.b[0].c`);
/// - an array where `T` is a struct or map: SPDK rejects positional
///   parameters, and so does this.
pub fn decode_params<T: DeserializeOwned>(params: Option<Value>) -> Result<T, RpcError> {
    let wants_object = matches!(probe::<T>(), Shape::Struct | Shape::Map);
    let value = match params {
        None | Some(Value::Null) if wants_object => Value::Object(Map::new()),
        None => Value::Null,
        Some(Value::Array(_)) if wants_object => {
            return Err(RpcError::invalid_params(
                "invalid type: array, expected an object",
            ))
        }
        Some(v) => v,
    };
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        RpcError::invalid_params(locate(inner, &path))
    })
}

/// Add the location of a decoding error to serde's message.
fn locate(msg: String, path: &str) -> String {
    if path.is_empty() || path == "." {
        return msg;
    }
    let (parent, last) = match path.rfind('.') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    };
    if msg.contains(&format!("`{last}`")) {
        // e.g. "unknown field `x`": the path ends with that field already.
        if parent.is_empty() {
            msg
        } else {
            format!("{msg} in `{parent}`")
        }
    } else if msg.starts_with("missing field") {
        format!("{msg} in `{path}`")
    } else {
        format!("{msg} for field `{path}`")
    }
}

/// For methods taking no parameters: `params` must be absent, `null`, `{}`
/// or `[]`; anything else is `-32602 "<method> requires no parameters"`.
pub fn no_params(params: &Option<Value>, method: &str) -> Result<(), RpcError> {
    match params {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(m)) if m.is_empty() => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(_) => Err(RpcError::invalid_params(format!(
            "{method} requires no parameters"
        ))),
    }
}

/// What a type asks its deserializer for first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Struct,
    Map,
    Other,
}

#[derive(Debug)]
struct ProbeDone(Shape);

impl fmt::Display for ProbeDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "probe: {:?}", self.0)
    }
}

impl std::error::Error for ProbeDone {}

impl de::Error for ProbeDone {
    fn custom<M: fmt::Display>(_msg: M) -> Self {
        ProbeDone(Shape::Other)
    }
}

/// A deserializer that only records which `deserialize_*` method is called.
struct Probe;

impl<'de> Deserializer<'de> for Probe {
    type Error = ProbeDone;

    fn deserialize_any<V: Visitor<'de>>(self, _v: V) -> Result<V::Value, ProbeDone> {
        Err(ProbeDone(Shape::Other))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        _v: V,
    ) -> Result<V::Value, ProbeDone> {
        Err(ProbeDone(Shape::Struct))
    }

    fn deserialize_map<V: Visitor<'de>>(self, _v: V) -> Result<V::Value, ProbeDone> {
        Err(ProbeDone(Shape::Map))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct enum identifier ignored_any
    }
}

fn probe<T: DeserializeOwned>() -> Shape {
    match T::deserialize(Probe) {
        Err(ProbeDone(shape)) => shape,
        Ok(_) => Shape::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::INVALID_PARAMS;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        size: u32,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct P {
        name: String,
        #[serde(default)]
        count: Option<u64>,
        #[serde(default)]
        inner: Vec<Inner>,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields)]
    struct AllOptional {
        #[serde(default)]
        flag: bool,
    }

    fn msg<T: DeserializeOwned + fmt::Debug>(p: Option<Value>) -> String {
        let e = decode_params::<T>(p).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        e.message
    }

    #[test]
    fn decodes() {
        let p: P = decode_params(Some(json!({"name": "a", "inner": [{"size": 3}]}))).unwrap();
        assert_eq!(
            p,
            P {
                name: "a".into(),
                count: None,
                inner: vec![Inner { size: 3 }]
            }
        );
        let o: AllOptional = decode_params(None).unwrap();
        assert_eq!(o, AllOptional::default());
        let o: AllOptional = decode_params(Some(Value::Null)).unwrap();
        assert!(!o.flag);
        let o: Option<AllOptional> = decode_params(None).unwrap();
        assert_eq!(o, None);
        let v: Vec<u32> = decode_params(Some(json!([1, 2]))).unwrap();
        assert_eq!(v, vec![1, 2]);
    }

    #[test]
    fn errors_name_the_field() {
        let m = msg::<P>(None);
        assert!(m.contains("missing field `name`"), "{m}");
        let m = msg::<P>(Some(json!({"name": "a", "foo": 1})));
        assert!(m.contains("unknown field `foo`"), "{m}");
        let m = msg::<P>(Some(json!({"name": 5})));
        assert!(m.contains("`name`") && m.contains("invalid type"), "{m}");
        let m = msg::<P>(Some(json!({"name": "a", "count": -1})));
        assert!(m.contains("`count`"), "{m}");
        let m = msg::<P>(Some(json!({"name": "a", "inner": [{"size": "big"}]})));
        assert!(m.contains("inner[0].size"), "{m}");
        let m = msg::<P>(Some(json!({"name": "a", "inner": [{"size": 1, "x": 0}]})));
        assert!(
            m.starts_with("unknown field `x`") && m.ends_with("in `inner[0]`"),
            "{m}"
        );
        let m = msg::<P>(Some(json!({"name": "a", "inner": [{}]})));
        assert_eq!(m, "missing field `size` in `inner[0]`");
        let m = msg::<P>(Some(json!(["a"])));
        assert!(m.contains("expected an object"), "{m}");
    }

    #[test]
    fn no_params_check() {
        assert!(no_params(&None, "m").is_ok());
        assert!(no_params(&Some(json!({})), "m").is_ok());
        assert!(no_params(&Some(json!([])), "m").is_ok());
        let e = no_params(&Some(json!({"a": 1})), "spdk_get_version").unwrap_err();
        assert_eq!(
            e,
            RpcError::invalid_params("spdk_get_version requires no parameters")
        );
    }
}
