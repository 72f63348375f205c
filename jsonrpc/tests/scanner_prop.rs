//! Property tests of the request scanner over arbitrary byte streams: reads split anywhere give the same
//! requests (and the same parse error) as one read, nothing panics, and a single value is accepted exactly when
//! serde_json accepts it.
//!
//! Bounded: every property runs a fixed, small number of cases in `cargo test`; `PROPTEST_CASES=100000` runs
//! more by hand.

use jsonrpc::{Scan, Scanner};
use proptest::prelude::*;

/// Cases per property: `ci` unless `PROPTEST_CASES` says otherwise.
fn cases(ci: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci)
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// What a connection makes of a stream.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// The requests, in order.
    values: Vec<Vec<u8>>,
    /// Whether it ended in a parse error (the server answers it and closes).
    invalid: bool,
    /// Bytes of an unfinished value at the end of the stream.
    tail: Vec<u8>,
}

/// Feeds `stream` to a scanner the way the server's input loop does: each read (cut at `cuts`) is appended,
/// whitespace between values skipped, every complete value taken off the front; the first invalid value ends
/// the connection.
fn run(stream: &[u8], cuts: &[usize]) -> Outcome {
    let mut out = Outcome {
        values: Vec::new(),
        invalid: false,
        tail: Vec::new(),
    };
    let mut buf = Vec::new();
    let mut sc = Scanner::new();
    let mut fed = 0;
    for end in cuts.iter().copied().chain([stream.len()]) {
        buf.extend_from_slice(&stream[fed..end]);
        fed = end;
        loop {
            if !sc.started() {
                let ws = buf.iter().take_while(|b| is_ws(**b)).count();
                buf.drain(..ws);
            }
            if buf.is_empty() {
                break;
            }
            match sc.scan(&buf) {
                Scan::Complete(n) => {
                    assert!(n > 0 && n <= buf.len(), "Complete({n}) of {}", buf.len());
                    out.values.push(buf.drain(..n).collect());
                    sc.reset();
                }
                Scan::Incomplete => break,
                Scan::Invalid => {
                    out.invalid = true;
                    return out;
                }
            }
        }
    }
    out.tail = buf;
    out
}

/// Where each top-level value starts, in the one-read run.
fn value_starts(stream: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0;
    let mut sc = Scanner::new();
    loop {
        while at < stream.len() && is_ws(stream[at]) {
            at += 1;
        }
        if at == stream.len() {
            return starts;
        }
        starts.push(at);
        match sc.scan(&stream[at..]) {
            Scan::Complete(n) => at += n,
            Scan::Incomplete | Scan::Invalid => return starts,
        }
        sc.reset();
    }
}

/// Whether a read ending at `cut` may change the outcome by design: a top-level number is complete wherever the
/// data ends (as in SPDK, which cannot wait for a delimiter that may never come), so a read ending inside one
/// splits it. True for cuts strictly inside a run of number bytes that starts a top-level value.
fn inside_top_level_number(stream: &[u8], cut: usize) -> bool {
    let is_num = |b: u8| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E');
    value_starts(stream).into_iter().any(|s| {
        let mut end = s;
        while end < stream.len() && is_num(stream[end]) {
            end += 1;
        }
        s < cut && cut < end
    })
}

/// Bytes JSON is made of, plus some that break it.
const ALPHABET: &[u8] =
    b"{}[]\":,\\ \t\r\n0123456789-+.eEtrufalsnu\x00\x1f\x7f\xc3\xa9\xed\xa0\xf0\x9f\xff";

fn ws() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "", " ", "\n", "\r\n\t "])
}

fn string_token() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-zA-Z0-9 ]{1,4}",
        // Any character JSON allows unescaped.
        "[^\"\\\\\\x00-\\x1f]",
        prop::sample::select(vec![
            "\\\"",
            "\\\\",
            "\\/",
            "\\b",
            "\\f",
            "\\n",
            "\\r",
            "\\t",
            "\\u00e9",
            "\\u0000",
            "\\uFFFF",
            "\\ud83d\\ude00",
            "\\uDBFF\\uDFFF",
        ])
        .prop_map(String::from),
    ];
    proptest::collection::vec(piece, 0..5).prop_map(|p| format!("\"{}\"", p.concat()))
}

fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["true", "false", "null"]).prop_map(String::from),
        "-?(0|[1-9][0-9]{0,5})(\\.[0-9]{1,4})?([eE][+-]?[0-9]{1,3})?",
        string_token(),
    ]
}

/// A valid JSON text with whitespace here and there.
fn json_value() -> impl Strategy<Value = String> {
    scalar().prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            proptest::collection::vec((ws(), inner.clone(), ws()), 0..4).prop_map(|items| {
                let items: Vec<String> = items
                    .into_iter()
                    .map(|(a, v, b)| format!("{a}{v}{b}"))
                    .collect();
                format!("[{}]", items.join(","))
            }),
            proptest::collection::vec((string_token(), ws(), inner, ws()), 0..4).prop_map(
                |members| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(k, a, v, b)| format!("{a}{k}{b}:{a}{v}{b}"))
                        .collect();
                    format!("{{{}}}", members.join(","))
                }
            ),
        ]
    })
}

/// Values back to back, separated by optional whitespace (always some after a number, which would otherwise
/// run into the next value).
fn valid_stream() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec((ws(), json_value()), 1..6).prop_map(|vs| {
        let mut s = String::new();
        for (w, v) in vs {
            if s.ends_with(|c: char| c.is_ascii_digit()) && w.is_empty() {
                s.push(' ');
            }
            s.push_str(w);
            s.push_str(&v);
        }
        s.into_bytes()
    })
}

/// Valid streams with a few bytes replaced, inserted or removed.
fn mutated(s: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let edit = (
        0u8..3,
        any::<prop::sample::Index>(),
        prop::sample::select(ALPHABET),
    );
    (s, proptest::collection::vec(edit, 1..4)).prop_map(|(mut s, edits)| {
        for (kind, at, b) in edits {
            if s.is_empty() {
                s.push(b);
                continue;
            }
            let i = at.index(s.len());
            match kind {
                0 => s[i] = b,
                1 => s.insert(i, b),
                _ => {
                    s.remove(i);
                }
            }
        }
        s
    })
}

/// Any kind of input: valid, nearly valid, JSON-ish noise and plain random bytes.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        valid_stream(),
        mutated(valid_stream()),
        proptest::collection::vec(prop::sample::select(ALPHABET), 0..80),
        proptest::collection::vec(any::<u8>(), 0..80),
    ]
}

/// Read boundaries: a few anywhere, or one per byte.
fn cuts(len: usize) -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        4 => proptest::collection::vec(0..=len, 0..12).prop_map(|mut c| {
            c.sort_unstable();
            c.dedup();
            c
        }),
        1 => Just((0..=len).collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1500)))]

    /// However a stream is split into reads, the requests, the parse error and the unfinished tail are the
    /// ones a single read gives (reads ending inside a top-level number aside, see
    /// [`inside_top_level_number`]).
    #[test]
    fn split_reads_scan_like_one_read(
        (stream, cuts) in stream().prop_flat_map(|s| {
            let n = s.len();
            (Just(s), cuts(n))
        })
    ) {
        let whole = run(&stream, &[]);
        let cuts: Vec<usize> = cuts
            .into_iter()
            .filter(|&c| !inside_top_level_number(&stream, c))
            .collect();
        prop_assert_eq!(run(&stream, &cuts), whole);
    }

    /// A valid stream yields exactly its values, in one read or byte by byte (top-level numbers whole).
    #[test]
    fn valid_streams_yield_their_values(vs in proptest::collection::vec(json_value(), 1..6)) {
        // Newline-separated, so the split values are exactly the generated texts.
        let stream = vs.join("\n").into_bytes();
        let want: Vec<Vec<u8>> = vs.iter().map(|v| v.as_bytes().to_vec()).collect();
        let every: Vec<usize> = (0..=stream.len())
            .filter(|&c| !inside_top_level_number(&stream, c))
            .collect();
        for cuts in [&[][..], &every[..]] {
            let got = run(&stream, cuts);
            prop_assert!(!got.invalid && got.tail.is_empty(), "{:?}", got);
            prop_assert_eq!(&got.values, &want);
        }
    }

    /// A single text is taken as exactly one value when serde_json parses it, and only then (serde_json
    /// refuses numbers beyond f64's range, which are valid JSON).
    #[test]
    fn one_value_exactly_when_serde_json_agrees(
        text in prop_oneof![json_value().prop_map(String::into_bytes), mutated(json_value().prop_map(String::into_bytes)), stream()]
    ) {
        let got = run(&text, &[]);
        let trimmed = text.trim_ascii();
        let one = !got.invalid && got.tail.is_empty() && got.values == [trimmed];
        match serde_json::from_slice::<serde_json::Value>(&text) {
            Ok(_) => prop_assert!(one, "serde_json accepts {:?}, scanner: {:?}", String::from_utf8_lossy(&text), got),
            Err(e) => prop_assert!(
                !one || e.to_string().contains("number out of range"),
                "scanner accepts {:?}, serde_json: {}", String::from_utf8_lossy(&text), e
            ),
        }
    }
}
