//! Decoding RPC parameters into the option structs as SPDK's `spdk_json_decode_object()` does, with serde-style
//! messages naming the member (`-32602`):
//! - ``unknown field `x`, expected one of `a`, `b` `` (aliases not listed; ``... in `outer` `` when nested);
//! - ``invalid type: string "x", expected u32 for field `y` ``, ``invalid value: integer `-1`, expected u32 for
//!   field `y` `` (paths like `a.b` and `a[0]`);
//! - ``missing field `z` ``;
//! - ``unknown variant `v`, expected one of ...`` for names (see [`names!`](crate::names)).
//!
//! Absent or `null` params decode like `{}`; anything but an object is refused (an array with
//! ``invalid type: array, expected an object``). When a call has several faults, the one reported is the first
//! unknown member, else the first bad value among deprecated aliases, else the first bad value in the order
//! given, else the first missing member.
//!
//! Option structs are plain serde structs: `#[serde(deny_unknown_fields, expecting = "an object")]`, members in
//! SPDK's write order, SPDK's defaults through `Default` and `#[serde(default)]`, optional members that SPDK
//! writes only once set as `Option` with [`some`] (which, like SPDK, refuses `null` for them), nested objects
//! through [`object`] / [`object_some`] (which refuse arrays: serde would take them as positional members).

use std::fmt;

use jsonrpc::RpcError;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A parameters object of one method.
pub trait Params: DeserializeOwned {
    /// Deprecated member names SPDK still accepts, `(alias, member)`. Each is also declared on its member with
    /// `#[serde(alias = "...")]`; the member wins when both are given (both must be valid).
    const ALIASES: &'static [(&'static str, &'static str)] = &[];
    /// The required members in the order SPDK's decoder table checks them, when that is not the declaration
    /// (write) order: the first one absent is the one reported missing.
    const REQUIRED: &'static [&'static str] = &[];
}

/// Decodes `params` into `T` (see the module docs for the messages).
pub fn decode<T: Params>(params: Option<Value>) -> Result<T, RpcError> {
    let obj = match params {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        // Arrays and scalars: refused with the message of the shape.
        other => return decode_raw(other, T::ALIASES),
    };
    // A member given under both names: the alias is checked on its own (without the member), then dropped.
    for &(alias, member) in T::ALIASES {
        if obj.contains_key(alias) && obj.contains_key(member) {
            let mut only = obj.clone();
            only.remove(member);
            decode_raw::<T>(Some(Value::Object(ordered::<T>(only))), T::ALIASES)?;
        }
    }
    let mut obj = obj;
    for &(alias, member) in T::ALIASES {
        if obj.contains_key(member) {
            obj.remove(alias);
        }
    }
    let given: Vec<String> = obj.keys().cloned().collect();
    decode_raw::<T>(Some(Value::Object(ordered::<T>(obj))), T::ALIASES).map_err(|mut e| {
        if e.message.starts_with("missing field `") {
            if let Some(first) = T::REQUIRED.iter().find(|r| !given.iter().any(|g| g == *r)) {
                e.message = format!("missing field `{first}`");
            }
        }
        e
    })
}

/// [`decode`] as SPDK's `spdk_json_decode_object_relaxed()` does: top-level members `T` does not know are
/// ignored (SPDK hands such objects on to a transport, which takes its own members from them); nested objects
/// stay strict.
pub fn decode_relaxed<T: Params>(params: Option<Value>) -> Result<T, RpcError> {
    match params {
        Some(Value::Object(mut obj)) => {
            let known = fields_of::<T>();
            obj.retain(|k, _| known.contains(&k.as_str()));
            decode(Some(Value::Object(obj)))
        }
        other => decode(other),
    }
}

/// Decodes `params` over `current`: the members given replace the current ones (one level deep for nested
/// objects), the others keep their values, as SPDK decodes into a struct filled with its current options.
/// Errors are those of [`decode`] for `params` alone.
pub fn decode_over<T: Params + Serialize>(
    current: &T,
    params: Option<Value>,
) -> Result<T, RpcError> {
    decode::<T>(params.clone())?;
    let mut given = match params {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    for &(alias, member) in T::ALIASES {
        if let Some(v) = given.remove(alias) {
            given.entry(member).or_insert(v);
        }
    }
    let mut merged = match serde_json::to_value(current) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    for (k, v) in given {
        match (merged.get_mut(&k), v) {
            (Some(Value::Object(cur)), Value::Object(new)) => cur.extend(new),
            (_, v) => {
                merged.insert(k, v);
            }
        }
    }
    decode_raw(Some(Value::Object(merged)), T::ALIASES)
}

fn decode_raw<T: DeserializeOwned>(
    params: Option<Value>,
    aliases: &[(&str, &str)],
) -> Result<T, RpcError> {
    let value = match params {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::Array(_)) => {
            return Err(RpcError::invalid_params(
                "invalid type: array, expected an object",
            ))
        }
        Some(v) => v,
    };
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let hidden: Vec<&str> = aliases.iter().map(|(a, _)| *a).collect();
        RpcError::invalid_params(locate(one_of(&e.into_inner().to_string(), &hidden), &path))
    })
}

/// Adds where a decoding error is to serde's message: ``... for field `a.b` ``; for an unknown member (the path
/// ends with it) ``... in `a` `` when nested; for a missing one ``... in `a` `` when nested.
fn locate(msg: String, path: &str) -> String {
    if path.is_empty() || path == "." {
        return msg;
    }
    if msg.starts_with("unknown field `") || msg.starts_with("duplicate field `") {
        match path.rfind('.') {
            Some(i) => format!("{msg} in `{}`", &path[..i]),
            None => msg,
        }
    } else if msg.starts_with("missing field") {
        format!("{msg} in `{path}`")
    } else {
        format!("{msg} for field `{path}`")
    }
}

/// `obj` with its unknown members first, then the aliases, then the others, each group in the order given: the
/// order in which faults are reported.
fn ordered<T: Params>(obj: Map<String, Value>) -> Map<String, Value> {
    let known = fields_of::<T>();
    let is_alias = |k: &str| T::ALIASES.iter().any(|(a, _)| *a == k);
    let (unknown, rest): (Vec<_>, Vec<_>) = obj
        .into_iter()
        .map(|(k, v)| match v {
            // A nested object's own unknown members come first in it too.
            Value::Object(m) => {
                let inner = nested_fields_of::<T>(&k);
                let (u, r): (Vec<_>, Vec<_>) = m
                    .into_iter()
                    .partition(|(k, _)| !inner.contains(&k.as_str()));
                (k, Value::Object(u.into_iter().chain(r).collect()))
            }
            v => (k, v),
        })
        .partition(|(k, _)| !known.contains(&k.as_str()));
    let (aliases, direct): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(k, _)| is_alias(k));
    unknown.into_iter().chain(aliases).chain(direct).collect()
}

/// Rewrites serde's list of expected names the way this target words it: always ``one of `a`, `b` `` (serde
/// says `` `a` `` or `` `a` or `b` `` for one or two), without the names in `hidden`.
fn one_of(msg: &str, hidden: &[&str]) -> String {
    let Some(at) = msg
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.find("`, expected "))
    else {
        return msg.to_string();
    };
    let head_len = "unknown field `".len() + at + "`, expected ".len();
    let (head, mut rest) = msg.split_at(head_len);
    rest = rest.strip_prefix("one of ").unwrap_or(rest);
    let mut names = Vec::new();
    while let Some(r) = rest.strip_prefix('`') {
        let Some(end) = r.find('`') else { break };
        names.push(&r[..end]);
        rest = &r[end + 1..];
        match rest
            .strip_prefix(", ")
            .or_else(|| rest.strip_prefix(" or "))
        {
            Some(r) if r.starts_with('`') => rest = r,
            _ => break,
        }
    }
    let list: Vec<String> = names
        .iter()
        .filter(|n| !hidden.contains(n))
        .map(|n| format!("`{n}`"))
        .collect();
    format!("{head}one of {}{rest}", list.join(", "))
}

/// The member names serde knows for `T` (aliases included), as its derived code hands them to
/// `deserialize_struct`.
fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    match T::deserialize(FieldsProbe) {
        Err(Probed(Some(fields))) => fields,
        _ => &[],
    }
}

/// The member names of the struct in `T`'s member `member` (empty when it is not a struct): `T` is given a map
/// with that one key, whose value is the probe.
fn nested_fields_of<T: DeserializeOwned>(member: &str) -> &'static [&'static str] {
    match T::deserialize(MemberProbe(Some(member.to_string()))) {
        Err(Probed(Some(fields))) => fields,
        _ => &[],
    }
}

#[derive(Debug)]
struct Probed(Option<&'static [&'static str]>);

impl fmt::Display for Probed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("fields probe")
    }
}

impl std::error::Error for Probed {}

impl de::Error for Probed {
    fn custom<M: fmt::Display>(_msg: M) -> Self {
        Probed(None)
    }
}

/// A deserializer that only records the member names a struct asks for.
struct FieldsProbe;

impl<'de> Deserializer<'de> for FieldsProbe {
    type Error = Probed;

    fn deserialize_any<V: Visitor<'de>>(self, _v: V) -> Result<V::Value, Probed> {
        Err(Probed(None))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _v: V,
    ) -> Result<V::Value, Probed> {
        Err(Probed(Some(fields)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// A struct deserializer whose only member is the key it holds, valued with a [`FieldsProbe`].
struct MemberProbe(Option<String>);

impl<'de> Deserializer<'de> for MemberProbe {
    type Error = Probed;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Probed> {
        v.visit_map(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de> de::MapAccess<'de> for MemberProbe {
    type Error = Probed;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Probed> {
        match self.0.take() {
            Some(k) => seed
                .deserialize(de::value::StringDeserializer::<Probed>::new(k))
                .map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Probed> {
        seed.deserialize(FieldsProbe)
    }
}

/// For `Option` members: present means `Some` (a `null` is refused like any value of the wrong type, as SPDK's
/// decoders do); absent is `None` with `#[serde(default)]`.
pub fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// For nested objects: a JSON object only (serde's derived structs would also take an array, positionally).
pub fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    T::deserialize(MapOnly(d))
}

/// [`object`] for an `Option` member (see [`some`]).
pub fn object_some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    object(d).map(Some)
}

/// Passes a struct's visitor on with [`NoSeq`].
struct MapOnly<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for MapOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(v)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_struct(name, fields, NoSeq(v))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// A struct visitor that takes maps only.
struct NoSeq<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for NoSeq<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(map)
    }
}

/// A set of names SPDK keeps as a bitmask: written once each, in SPDK's order.
pub type NameSet<T> = std::collections::BTreeSet<T>;

/// Names SPDK takes as strings: see [`names!`](crate::names).
pub trait Name: Sized + Copy + 'static {
    /// Every value, in SPDK's order.
    const ALL: &'static [Self];
    /// The name SPDK reads and writes.
    fn name(self) -> &'static str;

    /// The value called `s`.
    fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == s)
    }
}

/// Deserializes a [`Name`] from a JSON string, refusing other names with
/// ``unknown variant `x`, expected one of `a`, `b` ``.
pub fn deserialize_name<'de, D: Deserializer<'de>, T: Name>(d: D) -> Result<T, D::Error> {
    struct V<T>(std::marker::PhantomData<T>);
    impl<T: Name> Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            T::from_name(s).ok_or_else(|| {
                let names: Vec<String> = T::ALL.iter().map(|v| format!("`{}`", v.name())).collect();
                E::custom(format_args!(
                    "unknown variant `{s}`, expected one of {}",
                    names.join(", ")
                ))
            })
        }
    }
    d.deserialize_str(V(std::marker::PhantomData))
}

/// Declares an enum of names SPDK takes as JSON strings: `Name`, `Serialize`, `Deserialize` (see
/// [`deserialize_name`]) and an order (SPDK's, for [`NameSet`]).
#[macro_export]
macro_rules! names {
    ($(#[$m:meta])* pub enum $ty:ident { $($(#[$vm:meta])* $var:ident = $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $ty {
            $($(#[$vm])* $var,)*
        }

        impl $crate::params::Name for $ty {
            const ALL: &'static [Self] = &[$($ty::$var,)*];
            fn name(self) -> &'static str {
                match self {
                    $($ty::$var => $s,)*
                }
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str($crate::params::Name::name(*self))
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::params::deserialize_name(d)
            }
        }
    };
}

/// `-22 "Invalid argument"` (`-EINVAL` with `spdk_strerror()`), the detail logged as SPDK does.
pub fn einval(detail: &str) -> RpcError {
    log::error!("{detail}");
    RpcError::errno(libc::EINVAL)
}

/// The JSON object of `v` (for writing a struct as an entry's `params`).
pub fn to_object<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or_else(|_| Value::Object(Map::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    crate::names! {
        /// Test names.
        pub enum Color {
            /// Red.
            Red = "red",
            /// Blue.
            Blue = "blue",
        }
    }

    #[derive(Debug, Default, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields, default, expecting = "an object")]
    struct Inner {
        a: bool,
        #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
        b: Option<u8>,
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields, default, expecting = "an object")]
    struct Opts {
        #[serde(alias = "old_count")]
        count: u32,
        colors: NameSet<Color>,
        #[serde(deserialize_with = "object")]
        inner: Inner,
        #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
        color: Option<Color>,
    }

    impl Default for Opts {
        fn default() -> Self {
            Opts {
                count: 3,
                colors: [Color::Blue].into(),
                inner: Inner::default(),
                color: None,
            }
        }
    }

    impl Params for Opts {
        const ALIASES: &'static [(&'static str, &'static str)] = &[("old_count", "count")];
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, expecting = "an object")]
    struct Two {
        #[allow(dead_code)]
        x: String,
        #[allow(dead_code)]
        y: String,
    }

    impl Params for Two {
        const REQUIRED: &'static [&'static str] = &["y", "x"];
    }

    fn msg<T: Params + std::fmt::Debug>(p: Value) -> String {
        let e = decode::<T>(Some(p)).unwrap_err();
        assert_eq!(e.code, jsonrpc::INVALID_PARAMS);
        e.message
    }

    #[test]
    fn decodes_with_defaults_and_aliases() {
        let o: Opts = decode(None).unwrap();
        assert_eq!(o, Opts::default());
        let o: Opts = decode(Some(
            json!({"old_count": 5, "colors": ["red", "blue", "red"]}),
        ))
        .unwrap();
        assert_eq!(o.count, 5);
        assert_eq!(
            serde_json::to_value(&o.colors).unwrap(),
            json!(["red", "blue"])
        );
        let o: Opts = decode(Some(json!({"old_count": 5, "count": 6}))).unwrap();
        assert_eq!(o.count, 6);
    }

    #[test]
    fn messages() {
        assert_eq!(
            msg::<Opts>(json!({"x": 1})),
            "unknown field `x`, expected one of `count`, `colors`, `inner`, `color`"
        );
        assert_eq!(
            msg::<Opts>(json!({"inner": {"z": 1}})),
            "unknown field `z`, expected one of `a`, `b` in `inner`"
        );
        assert_eq!(
            msg::<Opts>(json!({"inner": {"a": 1, "z": 1}})),
            "unknown field `z`, expected one of `a`, `b` in `inner`"
        );
        assert_eq!(nested_fields_of::<Opts>("inner"), ["a", "b"]);
        assert!(nested_fields_of::<Opts>("count").is_empty());
        assert_eq!(
            msg::<Opts>(json!({"inner": [true]})),
            "invalid type: sequence, expected an object for field `inner`"
        );
        assert_eq!(
            msg::<Opts>(json!({"inner": {"b": null}})),
            "invalid type: null, expected u8 for field `inner.b`"
        );
        assert_eq!(
            msg::<Opts>(json!({"color": "green"})),
            "unknown variant `green`, expected one of `red`, `blue` for field `color`"
        );
        assert_eq!(
            msg::<Opts>(json!({"colors": ["red", 1]})),
            "invalid type: integer `1`, expected a string for field `colors[1]`"
        );
        assert_eq!(
            msg::<Opts>(json!({"old_count": "x", "count": 1})),
            "invalid type: string \"x\", expected u32 for field `old_count`"
        );
        // The unknown member is reported first, then aliases, then the rest in the order given.
        assert_eq!(
            msg::<Opts>(json!({"count": -1, "x": 1})),
            "unknown field `x`, expected one of `count`, `colors`, `inner`, `color`"
        );
        assert_eq!(
            msg::<Opts>(json!({"count": -1, "old_count": "y"})),
            "invalid type: string \"y\", expected u32 for field `old_count`"
        );
        assert_eq!(
            msg::<Opts>(json!("s")),
            "invalid type: string \"s\", expected an object"
        );
        assert_eq!(
            msg::<Opts>(json!([1])),
            "invalid type: array, expected an object"
        );
        assert_eq!(msg::<Two>(json!({})), "missing field `y`");
        assert_eq!(msg::<Two>(json!({"y": "1"})), "missing field `x`");
        assert_eq!(
            msg::<Two>(json!({"y": "1", "z": 1})),
            "unknown field `z`, expected one of `x`, `y`"
        );
    }

    #[test]
    fn relaxed() {
        let o: Opts =
            decode_relaxed(Some(json!({"x": 1, "old_count": 4, "inner": {"a": true}}))).unwrap();
        assert_eq!(o.count, 4);
        assert!(o.inner.a);
        assert_eq!(
            decode_relaxed::<Opts>(Some(json!({"x": 1, "inner": {"z": 1}})))
                .unwrap_err()
                .message,
            "unknown field `z`, expected one of `a`, `b` in `inner`"
        );
        assert_eq!(
            decode_relaxed::<Opts>(Some(json!([1])))
                .unwrap_err()
                .message,
            "invalid type: array, expected an object"
        );
        assert_eq!(decode_relaxed::<Opts>(None).unwrap(), Opts::default());
    }

    #[test]
    fn over_current() {
        let cur: Opts = decode(Some(json!({"count": 9, "inner": {"b": 1}}))).unwrap();
        let o = decode_over(&cur, Some(json!({"inner": {"a": true}, "old_count": 4}))).unwrap();
        assert_eq!(o.count, 4);
        assert_eq!(
            o.inner,
            Inner {
                a: true,
                b: Some(1)
            }
        );
        assert_eq!(decode_over(&cur, None).unwrap(), cur);
        assert!(decode_over(&cur, Some(json!({"count": "x"}))).is_err());
    }

    #[test]
    fn one_of_wording() {
        assert_eq!(
            one_of("unknown field `x`, expected `a`", &[]),
            "unknown field `x`, expected one of `a`"
        );
        assert_eq!(
            one_of("unknown field `x`, expected `a` or `b` in `o`", &[]),
            "unknown field `x`, expected one of `a`, `b` in `o`"
        );
        assert_eq!(
            one_of("unknown field `x`, expected one of `a`, `h`, `b`", &["h"]),
            "unknown field `x`, expected one of `a`, `b`"
        );
        assert_eq!(one_of("missing field `a`", &["a"]), "missing field `a`");
        // A value that happens to be called like its member is still located.
        assert_eq!(
            locate(
                "unknown variant `color`, expected one of `red`".into(),
                "color"
            ),
            "unknown variant `color`, expected one of `red` for field `color`"
        );
        assert_eq!(
            locate("unknown field `z`".into(), "a.z"),
            "unknown field `z` in `a`"
        );
    }
}
