//! SPDK's official RPC client, `spdk-rpc` (pip package `spdk`), as the tests drive `spdk_tgt` with it: an
//! operator's exact command lines, with the JSON results or JSON-RPC errors they print.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// Runs `spdk-rpc -s SOCK args...`.
pub fn run(sock: &Path, args: &[&str]) -> Output {
    Command::new("spdk-rpc")
        .arg("-s")
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spdk-rpc is installed (pip install spdk)")
}

/// Runs an RPC that must succeed; returns its JSON output (Null when it prints nothing, a string when it prints
/// something that is not JSON).
///
/// # Panics
/// When the call fails, with the client's output.
pub fn ok(sock: &Path, args: &[&str]) -> Value {
    let o = run(sock, args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "spdk-rpc {args:?} failed: {}{}",
        out,
        String::from_utf8_lossy(&o.stderr)
    );
    if out.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&out).unwrap_or(Value::String(out.trim().to_string()))
    }
}

/// Runs an RPC that must fail; returns the JSON-RPC error object (`code`, `message`) the client printed.
///
/// # Panics
/// When the call succeeds, or its output holds no error object.
pub fn err(sock: &Path, args: &[&str]) -> Value {
    let o = run(sock, args);
    assert!(
        !o.status.success(),
        "spdk-rpc {args:?} unexpectedly succeeded"
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    error_of(&text).unwrap_or_else(|| panic!("no JSON-RPC error in: {text}"))
}

/// Pulls the `{"code": .., "message": ..}` object out of spdk-rpc's error output.
pub fn error_of(text: &str) -> Option<Value> {
    let start = text.rfind("response:")?;
    let rest = &text[start + "response:".len()..];
    let open = rest.find('{')?;
    serde_json::Deserializer::from_str(&rest[open..])
        .into_iter::<Value>()
        .next()?
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_error_object_in_client_output() {
        let text = "request:\n{\"method\": \"x\"}\nGot JSON-RPC error response\nresponse:\n{\n  \"code\": -17,\n  \"message\": \"File exists\"\n}\n";
        let e = super::error_of(text).unwrap();
        assert_eq!(e["code"], -17);
        assert_eq!(e["message"], "File exists");
        assert!(super::error_of("no error here").is_none());
    }
}
