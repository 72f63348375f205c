//! Incremental JSON value splitter.
//!
//! JSON-RPC requests arrive on a stream socket with no framing: a read may
//! hold part of a request, or several requests back to back. [`Scanner`]
//! finds where the next complete top-level JSON value ends, resuming where it
//! stopped when more bytes arrive, so each byte is examined once no matter how
//! finely a request is split.
//!
//! It validates the full JSON grammar the way SPDK's `spdk_json_parse()` does
//! (strict RFC 8259: no comments, no trailing commas, UTF-8 checked inside
//! strings, `\u` surrogate pairs checked, at most [`MAX_DEPTH`] nested
//! containers), so malformed input is reported as soon as the offending byte
//! is seen rather than when the value would have ended.

/// Maximum nesting depth of arrays/objects (SPDK's `SPDK_JSON_MAX_NESTING_DEPTH`).
pub const MAX_DEPTH: usize = 64;

/// Result of [`Scanner::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// The buffer holds only a prefix of a value (or only whitespace).
    Incomplete,
    /// A complete value ends at this offset (exclusive) of the buffer. The
    /// value starts at the first non-whitespace byte of the buffer.
    Complete(usize),
    /// The bytes seen so far can never become a valid JSON value.
    Invalid,
}

/// What the grammar expects next (outside of a token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gram {
    /// A value (top level, after `:`, or after `,` in an array).
    Value,
    /// Right after `[`: a value or `]`.
    ValueOrClose,
    /// After `,` in an object: a member name.
    Key,
    /// Right after `{`: a member name or `}`.
    KeyOrClose,
    /// After a member name.
    Colon,
    /// After a value inside a container: `,` or the closing bracket.
    SepOrClose,
}

/// Number lexer states (RFC 8259 number grammar).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpInt,
}

impl Num {
    fn is_terminal(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpInt)
    }
}

/// Lexer state (inside a token or between tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Between,
    Str,
    Escape,
    /// `\u` escape: digits still needed and value so far.
    Hex {
        left: u8,
        acc: u16,
    },
    /// After a high surrogate escape: expecting `\`.
    LowBackslash,
    /// After a high surrogate escape and `\`: expecting `u`.
    LowU,
    /// Digits of the low surrogate escape.
    LowHex {
        left: u8,
        acc: u16,
    },
    /// Inside a multi-byte UTF-8 sequence: bytes left and the allowed range
    /// of the next byte.
    Utf8 {
        left: u8,
        lo: u8,
        hi: u8,
    },
    Num(Num),
    /// Literal `true`/`false`/`null`: which one and how many bytes matched.
    Lit {
        which: u8,
        matched: u8,
    },
}

const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// Outcome of feeding one byte.
enum Step {
    /// Byte consumed; value not finished.
    More,
    /// Byte consumed and it completed the value.
    DoneAfter,
    /// The value was already complete before this byte (a number ended);
    /// the byte belongs to whatever follows.
    DoneBefore,
    Invalid,
}

/// Resumable splitter for a stream of JSON values. See the module docs.
#[derive(Debug, Clone)]
pub struct Scanner {
    lex: Lex,
    gram: Gram,
    /// Nesting depth.
    depth: u8,
    /// Bit `i` set when container at depth `i` is an object.
    objects: u64,
    /// Whether the string being lexed is a member name.
    str_is_key: bool,
    /// Bytes of the current buffer already examined.
    pos: usize,
    /// Whether any non-whitespace byte of the current value was seen.
    started: bool,
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

impl Scanner {
    /// A scanner positioned at the start of a value.
    pub fn new() -> Self {
        Scanner {
            lex: Lex::Between,
            gram: Gram::Value,
            depth: 0,
            objects: 0,
            str_is_key: false,
            pos: 0,
            started: false,
        }
    }

    /// Forget all progress; the next [`scan`](Self::scan) starts a new value.
    pub fn reset(&mut self) {
        *self = Scanner::new();
    }

    /// Whether the scanner has seen the first byte of a value yet.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Continue scanning `buf`, which must start where the previous call's
    /// buffer started and extend it (the same bytes plus possibly more).
    ///
    /// After [`Scan::Complete`] or [`Scan::Invalid`], call
    /// [`reset`](Self::reset) before scanning the next value.
    pub fn scan(&mut self, buf: &[u8]) -> Scan {
        while self.pos < buf.len() {
            let b = buf[self.pos];
            match self.step(b) {
                Step::More => self.pos += 1,
                Step::DoneAfter => return Scan::Complete(self.pos + 1),
                Step::DoneBefore => return Scan::Complete(self.pos),
                Step::Invalid => return Scan::Invalid,
            }
        }
        // Like SPDK, a top-level number in a valid end state is complete at
        // the end of the available data.
        if self.depth == 0 {
            if let Lex::Num(n) = self.lex {
                if n.is_terminal() {
                    return Scan::Complete(self.pos);
                }
            }
        }
        Scan::Incomplete
    }

    /// Mark the end of a value (scalar or container); returns whether the
    /// top-level value is now complete.
    fn after_value(&mut self) -> bool {
        self.lex = Lex::Between;
        if self.depth == 0 {
            true
        } else {
            self.gram = Gram::SepOrClose;
            false
        }
    }

    fn top_is_object(&self) -> bool {
        self.depth > 0 && (self.objects >> (self.depth - 1)) & 1 == 1
    }

    fn push(&mut self, object: bool) -> bool {
        if self.depth as usize == MAX_DEPTH {
            return false;
        }
        let bit = 1u64 << self.depth;
        if object {
            self.objects |= bit;
        } else {
            self.objects &= !bit;
        }
        self.depth += 1;
        true
    }

    fn step(&mut self, b: u8) -> Step {
        match self.lex {
            Lex::Between => self.step_between(b),
            Lex::Str => match b {
                b'"' => {
                    if self.str_is_key {
                        self.lex = Lex::Between;
                        self.gram = Gram::Colon;
                        Step::More
                    } else if self.after_value() {
                        Step::DoneAfter
                    } else {
                        Step::More
                    }
                }
                b'\\' => {
                    self.lex = Lex::Escape;
                    Step::More
                }
                0x00..=0x1f => Step::Invalid,
                0x20..=0x7f => Step::More,
                0xc2..=0xdf => self.utf8(1, 0x80, 0xbf),
                0xe0 => self.utf8(2, 0xa0, 0xbf),
                0xe1..=0xec | 0xee..=0xef => self.utf8(2, 0x80, 0xbf),
                0xed => self.utf8(2, 0x80, 0x9f),
                0xf0 => self.utf8(3, 0x90, 0xbf),
                0xf1..=0xf3 => self.utf8(3, 0x80, 0xbf),
                0xf4 => self.utf8(3, 0x80, 0x8f),
                _ => Step::Invalid,
            },
            Lex::Utf8 { left, lo, hi } => {
                if b < lo || b > hi {
                    return Step::Invalid;
                }
                self.lex = if left == 1 {
                    Lex::Str
                } else {
                    Lex::Utf8 {
                        left: left - 1,
                        lo: 0x80,
                        hi: 0xbf,
                    }
                };
                Step::More
            }
            Lex::Escape => match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                    self.lex = Lex::Str;
                    Step::More
                }
                b'u' => {
                    self.lex = Lex::Hex { left: 4, acc: 0 };
                    Step::More
                }
                _ => Step::Invalid,
            },
            Lex::Hex { left, acc } => {
                let Some(d) = hex(b) else {
                    return Step::Invalid;
                };
                let acc = (acc << 4) | d;
                if left > 1 {
                    self.lex = Lex::Hex {
                        left: left - 1,
                        acc,
                    };
                } else if (0xd800..=0xdbff).contains(&acc) {
                    self.lex = Lex::LowBackslash;
                } else if (0xdc00..=0xdfff).contains(&acc) {
                    // Low surrogate without a preceding high one.
                    return Step::Invalid;
                } else {
                    self.lex = Lex::Str;
                }
                Step::More
            }
            Lex::LowBackslash => {
                if b != b'\\' {
                    return Step::Invalid;
                }
                self.lex = Lex::LowU;
                Step::More
            }
            Lex::LowU => {
                if b != b'u' {
                    return Step::Invalid;
                }
                self.lex = Lex::LowHex { left: 4, acc: 0 };
                Step::More
            }
            Lex::LowHex { left, acc } => {
                let Some(d) = hex(b) else {
                    return Step::Invalid;
                };
                let acc = (acc << 4) | d;
                if left > 1 {
                    self.lex = Lex::LowHex {
                        left: left - 1,
                        acc,
                    };
                } else if (0xdc00..=0xdfff).contains(&acc) {
                    self.lex = Lex::Str;
                } else {
                    return Step::Invalid;
                }
                Step::More
            }
            Lex::Num(n) => self.step_number(n, b),
            Lex::Lit { which, matched } => {
                let lit = LITERALS[which as usize];
                if lit[matched as usize] != b {
                    return Step::Invalid;
                }
                let matched = matched + 1;
                if matched as usize == lit.len() {
                    if self.after_value() {
                        Step::DoneAfter
                    } else {
                        Step::More
                    }
                } else {
                    self.lex = Lex::Lit { which, matched };
                    Step::More
                }
            }
        }
    }

    fn utf8(&mut self, left: u8, lo: u8, hi: u8) -> Step {
        self.lex = Lex::Utf8 { left, lo, hi };
        Step::More
    }

    fn step_number(&mut self, n: Num, b: u8) -> Step {
        let next = match (n, b) {
            (Num::Minus, b'0') => Some(Num::Zero),
            (Num::Minus, b'1'..=b'9') => Some(Num::Int),
            (Num::Int, b'0'..=b'9') => Some(Num::Int),
            (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
            (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::Exp),
            (Num::Exp, b'+' | b'-') => Some(Num::ExpSign),
            (Num::Exp | Num::ExpSign | Num::ExpInt, b'0'..=b'9') => Some(Num::ExpInt),
            _ => None,
        };
        if let Some(next) = next {
            self.lex = Lex::Num(next);
            return Step::More;
        }
        if !n.is_terminal() {
            return Step::Invalid;
        }
        // The number ended just before `b`; `b` is examined as the next token.
        if self.after_value() {
            return Step::DoneBefore;
        }
        self.step_between(b)
    }

    fn step_between(&mut self, b: u8) -> Step {
        if is_ws(b) {
            return Step::More;
        }
        self.started = true;
        let expecting_value = matches!(self.gram, Gram::Value | Gram::ValueOrClose);
        match b {
            b'{' | b'[' => {
                if !expecting_value || !self.push(b == b'{') {
                    return Step::Invalid;
                }
                self.gram = if b == b'{' {
                    Gram::KeyOrClose
                } else {
                    Gram::ValueOrClose
                };
                Step::More
            }
            b'}' | b']' => {
                let ok_state = if b == b'}' {
                    matches!(self.gram, Gram::KeyOrClose | Gram::SepOrClose)
                } else {
                    matches!(self.gram, Gram::ValueOrClose | Gram::SepOrClose)
                };
                if !ok_state || self.depth == 0 || self.top_is_object() != (b == b'}') {
                    return Step::Invalid;
                }
                self.depth -= 1;
                if self.after_value() {
                    Step::DoneAfter
                } else {
                    Step::More
                }
            }
            b',' => {
                if self.gram != Gram::SepOrClose {
                    return Step::Invalid;
                }
                self.gram = if self.top_is_object() {
                    Gram::Key
                } else {
                    Gram::Value
                };
                Step::More
            }
            b':' => {
                if self.gram != Gram::Colon {
                    return Step::Invalid;
                }
                self.gram = Gram::Value;
                Step::More
            }
            b'"' => {
                self.str_is_key = match self.gram {
                    Gram::Value | Gram::ValueOrClose => false,
                    Gram::Key | Gram::KeyOrClose => true,
                    _ => return Step::Invalid,
                };
                self.lex = Lex::Str;
                Step::More
            }
            b'-' | b'0'..=b'9' if expecting_value => {
                self.lex = Lex::Num(match b {
                    b'-' => Num::Minus,
                    b'0' => Num::Zero,
                    _ => Num::Int,
                });
                Step::More
            }
            b't' | b'f' | b'n' if expecting_value => {
                let which = match b {
                    b't' => 0,
                    b'f' => 1,
                    _ => 2,
                };
                self.lex = Lex::Lit { which, matched: 1 };
                Step::More
            }
            _ => Step::Invalid,
        }
    }
}

fn hex(b: u8) -> Option<u16> {
    (b as char).to_digit(16).map(|d| d as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(s: &str) -> Scan {
        Scanner::new().scan(s.as_bytes())
    }

    /// Split `input` into consecutive values, feeding `chunk` bytes at a time.
    fn split(input: &[u8], chunk: usize) -> Result<Vec<Vec<u8>>, usize> {
        let mut out = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut sc = Scanner::new();
        let mut fed = 0;
        while fed < input.len() {
            let end = (fed + chunk).min(input.len());
            buf.extend_from_slice(&input[fed..end]);
            fed = end;
            loop {
                if !sc.started() {
                    let ws = buf.iter().take_while(|b| is_ws(**b)).count();
                    buf.drain(..ws);
                }
                match sc.scan(&buf) {
                    Scan::Incomplete => break,
                    Scan::Complete(e) => {
                        out.push(buf.drain(..e).collect());
                        sc.reset();
                    }
                    Scan::Invalid => return Err(out.len()),
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn complete_values() {
        assert_eq!(whole("{}"), Scan::Complete(2));
        assert_eq!(whole("  {} "), Scan::Complete(4));
        assert_eq!(whole("[]"), Scan::Complete(2));
        let s = r#"{"a":[1,2.5e-3,-0,true,false,null,"x\u00e9\ud83d\ude00"]}"#;
        assert_eq!(whole(&format!("{s}x")), Scan::Complete(s.len()));
        assert_eq!(whole(r#""str""#), Scan::Complete(5));
        assert_eq!(whole("true"), Scan::Complete(4));
        assert_eq!(whole("12 "), Scan::Complete(2));
        assert_eq!(whole("12"), Scan::Complete(2));
        let s = "{\"é\":\"ü€😀\"}";
        assert_eq!(whole(s), Scan::Complete(s.len()));
    }

    #[test]
    fn incomplete_values() {
        for s in [
            "",
            "   ",
            "{",
            "{\"a\"",
            "{\"a\":",
            "{\"a\":1",
            "{\"a\":1,",
            "[",
            "[1,",
            "\"ab",
            "\"\\",
            "\"\\u12",
            "tru",
            "-",
            "1.",
            "1e",
            "1e+",
            "[1",
            "\"\\ud83d",
            "\"\\ud83d\\",
        ] {
            assert_eq!(whole(s), Scan::Incomplete, "{s:?}");
        }
        // Truncated multi-byte UTF-8.
        assert_eq!(
            Scanner::new().scan(&"\"é".as_bytes()[..2]),
            Scan::Incomplete
        );
    }

    #[test]
    fn invalid_values() {
        for s in [
            "}",
            "]",
            ",",
            ":",
            "x",
            "{1:2}",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "[1,]",
            "[1 2]",
            "{]",
            "[}",
            "01",
            "-a",
            "1.e",
            "1e+x",
            "\"\\x\"",
            "\"\\u12g4\"",
            "truex",
            "nul1",
            "{\"a\":1]",
            "[,1]",
            "{,}",
            "\"\x01\"",
            "\"\\udc00\"",
            "\"\\ud800x\"",
            "\"\\ud800\\u0041\"",
            "/* c */{}",
            "NaN",
            "{\"a\"::1}",
            "[1]]",
        ] {
            let r = split(s.as_bytes(), usize::MAX);
            assert!(
                r.is_err() || r.as_ref().unwrap().len() != 1,
                "{s:?} -> {r:?}"
            );
        }
        for bytes in [
            &b"\"\xff\""[..],
            b"\"\xc0\x80\"",
            b"\"\xed\xa0\x80\"",
            b"\"\xf4\x90\x80\x80\"",
            b"\xc3\xa9",
        ] {
            assert_eq!(Scanner::new().scan(bytes), Scan::Invalid, "{bytes:?}");
        }
    }

    #[test]
    fn top_level_number_completes_at_end_of_data() {
        let mut sc = Scanner::new();
        assert_eq!(sc.scan(b"1"), Scan::Complete(1));
        let mut sc = Scanner::new();
        assert_eq!(sc.scan(b"-"), Scan::Incomplete);
        assert_eq!(sc.scan(b"-1."), Scan::Incomplete);
        assert_eq!(sc.scan(b"-1.5"), Scan::Complete(4));
    }

    #[test]
    fn depth_limit() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(whole(&ok), Scan::Complete(ok.len()));
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(whole(&deep), Scan::Invalid);
        let mixed = format!("{}1{}", "{\"k\":[".repeat(32), "]}".repeat(32));
        assert_eq!(whole(&mixed), Scan::Complete(mixed.len()));
    }

    #[test]
    fn stream_of_values_byte_by_byte() {
        let stream = b" {\"a\":1}\n[1,{\"b\":\"}\"}]  \"s\" true{}[]";
        let expect: Vec<&[u8]> = vec![
            b"{\"a\":1}",
            b"[1,{\"b\":\"}\"}]",
            b"\"s\"",
            b"true",
            b"{}",
            b"[]",
        ];
        for chunk in [1, 2, 3, 7, usize::MAX] {
            let got = split(stream, chunk).unwrap();
            let got: Vec<&[u8]> = got.iter().map(|v| v.as_slice()).collect();
            assert_eq!(got, expect, "chunk {chunk}");
        }
    }

    /// Tiny deterministic PRNG (xorshift64*), so the fuzz tests need no crates.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn gen_value(r: &mut Rng, depth: u32, out: &mut String) {
        let pick = if depth > 4 { r.below(5) } else { r.below(7) };
        match pick {
            0 => out.push_str(["true", "false", "null"][r.below(3) as usize]),
            1 => {
                let n = [
                    "0",
                    "-1",
                    "12.5",
                    "1e10",
                    "-0.25E-3",
                    "123456789012345678901234",
                ];
                out.push_str(n[r.below(n.len() as u64) as usize]);
            }
            2..=4 => {
                let s = [
                    "",
                    "a",
                    "é",
                    "\\n\\\"\\\\",
                    "\\u00e9\\ud83d\\ude00",
                    "}]{[,:",
                    "😀 x",
                ];
                out.push('"');
                out.push_str(s[r.below(s.len() as u64) as usize]);
                out.push('"');
            }
            5 => {
                out.push('[');
                for i in 0..r.below(4) {
                    if i > 0 {
                        out.push(',');
                    }
                    gen_value(r, depth + 1, out);
                }
                out.push(']');
            }
            _ => {
                out.push('{');
                for i in 0..r.below(4) {
                    if i > 0 {
                        out.push_str(" , ");
                    }
                    out.push_str(&format!("\"k{i}\" : "));
                    gen_value(r, depth + 1, out);
                }
                out.push('}');
            }
        }
    }

    /// Any split of a stream of valid values yields the same values, each of
    /// which serde_json agrees is valid JSON.
    #[test]
    fn fuzz_random_splits_parse_identically() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..300 {
            let mut stream = String::new();
            let mut values = Vec::new();
            for _ in 0..1 + r.below(5) {
                let mut v = String::new();
                if r.below(2) == 0 {
                    gen_value(&mut r, 0, &mut v);
                    // A top-level number is complete wherever the data ends
                    // (as in SPDK), so keep numbers inside containers here.
                    if v.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
                        v = format!("[{v}]");
                    }
                } else {
                    v.push('{');
                    v.push_str("\"method\":");
                    gen_value(&mut r, 1, &mut v);
                    v.push('}');
                }
                stream.push_str(["", " ", "\n", "\r\n\t"][r.below(4) as usize]);
                stream.push_str(&v);
                values.push(v);
            }
            let bytes = stream.as_bytes();
            let whole = split(bytes, usize::MAX).unwrap();
            let whole: Vec<String> = whole
                .into_iter()
                .map(|v| String::from_utf8(v).unwrap())
                .collect();
            assert_eq!(whole, values);
            for v in &whole {
                serde_json::from_str::<serde_json::Value>(v).unwrap();
            }
            // Random chunk sizes, including 1.
            for _ in 0..5 {
                let mut buf = Vec::new();
                let mut sc = Scanner::new();
                let mut got = Vec::new();
                let mut fed = 0;
                while fed < bytes.len() {
                    let n = 1 + r.below(8) as usize;
                    let end = (fed + n).min(bytes.len());
                    buf.extend_from_slice(&bytes[fed..end]);
                    fed = end;
                    loop {
                        if !sc.started() {
                            let ws = buf.iter().take_while(|b| is_ws(**b)).count();
                            buf.drain(..ws);
                        }
                        match sc.scan(&buf) {
                            Scan::Complete(e) => {
                                got.push(String::from_utf8(buf.drain(..e).collect()).unwrap());
                                sc.reset();
                            }
                            Scan::Incomplete => break,
                            Scan::Invalid => panic!("invalid: {stream:?}"),
                        }
                    }
                }
                assert_eq!(got, values, "{stream:?}");
            }
        }
    }

    /// Random garbage and random mutations of valid input never panic, and
    /// whatever the scanner accepts, serde_json accepts too.
    #[test]
    fn fuzz_garbage_never_panics() {
        let mut r = Rng(0x1234_5678_9abc_def1);
        let alphabet = b"{}[]\":,\\ \n0123456789-+.eEtrufalsn\x00\x1f\x7f\xc3\xa9\xed\xf0\xff";
        for _ in 0..20_000 {
            let mut input: Vec<u8> = if r.below(2) == 0 {
                let mut s = String::new();
                gen_value(&mut r, 0, &mut s);
                s.into_bytes()
            } else {
                (0..r.below(40))
                    .map(|_| alphabet[r.below(alphabet.len() as u64) as usize])
                    .collect()
            };
            for _ in 0..r.below(4) {
                if input.is_empty() {
                    break;
                }
                let i = r.below(input.len() as u64) as usize;
                match r.below(3) {
                    0 => input[i] = alphabet[r.below(alphabet.len() as u64) as usize],
                    1 => {
                        input.remove(i);
                    }
                    _ => input.insert(i, alphabet[r.below(alphabet.len() as u64) as usize]),
                }
            }
            let mut sc = Scanner::new();
            let mut start = 0;
            loop {
                while start < input.len() && !sc.started() && is_ws(input[start]) {
                    start += 1;
                }
                match sc.scan(&input[start..]) {
                    Scan::Complete(e) => {
                        assert!(e > 0);
                        let v = &input[start..start + e];
                        // Syntax agrees with serde_json; only f64 overflow
                        // (valid JSON syntax) may be refused by it.
                        if let Err(err) = serde_json::from_slice::<serde_json::Value>(v) {
                            assert!(
                                err.to_string().contains("number out of range"),
                                "scanner accepted {v:?} but serde says {err}"
                            );
                        }
                        start += e;
                        sc.reset();
                    }
                    Scan::Incomplete | Scan::Invalid => break,
                }
            }
        }
    }
}
