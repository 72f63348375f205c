//! End-to-end tests: a real server on a Unix socket, real socket clients.

mod common;

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use common::{Client, TestServer};
use jsonrpc::{
    decode_params, no_params, Registry, Responder, RpcError, Server, INTERNAL_ERROR,
    INVALID_PARAMS, INVALID_REQUEST, INVALID_STATE, METHOD_NOT_FOUND, MSG_ONLY_AFTER_INIT,
    MSG_ONLY_BEFORE_INIT, PARSE_ERROR, STATE_RUNTIME, STATE_STARTUP,
};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Typed {
    name: String,
    #[serde(default)]
    size: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Deferred {
    ms: u64,
    value: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Big {
    bytes: usize,
}

const BOTH: u32 = STATE_STARTUP | STATE_RUNTIME;

/// The registry used by most tests, in the given state.
fn registry(state: u32) -> Registry {
    let mut reg = Registry::new();
    reg.register(
        "echo",
        BOTH,
        Rc::new(|p: Option<Value>, r: Responder| r.ok(p.unwrap_or(Value::Null))),
    );
    reg.register(
        "startup_only",
        STATE_STARTUP,
        Rc::new(|_p, r: Responder| r.ok(json!("startup"))),
    );
    reg.register(
        "runtime_only",
        STATE_RUNTIME,
        Rc::new(|_p, r: Responder| r.ok(json!("runtime"))),
    );
    reg.register_alias("old_echo", "echo");
    reg.register(
        "typed",
        BOTH,
        Rc::new(|p, r: Responder| match decode_params::<Typed>(p) {
            Ok(t) => r.ok(json!({"name": t.name, "size": t.size})),
            Err(e) => r.err(e),
        }),
    );
    reg.register(
        "nothing",
        BOTH,
        Rc::new(|p, r: Responder| match no_params(&p, r.method()) {
            Ok(()) => r.ok(json!(true)),
            Err(e) => r.err(e),
        }),
    );
    // Answered from another thread after `ms` milliseconds.
    reg.register(
        "deferred",
        BOTH,
        Rc::new(|p, r: Responder| match decode_params::<Deferred>(p) {
            Ok(d) => {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(d.ms));
                    r.ok(d.value);
                });
            }
            Err(e) => r.err(e),
        }),
    );
    reg.register("drop", BOTH, Rc::new(|_p, r: Responder| drop(r)));
    reg.register(
        "errno",
        BOTH,
        Rc::new(|_p, r: Responder| r.err(RpcError::from_errno(libc::EEXIST, "already there"))),
    );
    reg.register(
        "big",
        BOTH,
        Rc::new(|p, r: Responder| match decode_params::<Big>(p) {
            Ok(b) => {
                let s: String = (0..b.bytes)
                    .map(|i| (b'a' + (i % 26) as u8) as char)
                    .collect();
                r.ok_with(&s);
            }
            Err(e) => r.err(e),
        }),
    );
    reg.set_state(state);
    reg
}

fn runtime_server(tag: &str) -> TestServer {
    TestServer::start(tag, || registry(STATE_RUNTIME))
}

fn err_of(resp: &Value) -> (i64, &str) {
    (
        resp["error"]["code"].as_i64().expect("error code"),
        resp["error"]["message"].as_str().expect("error message"),
    )
}

#[test]
fn simple_call_and_wire_format() {
    let srv = runtime_server("simple");
    let mut c = srv.client();
    c.send_raw(br#"{"jsonrpc":"2.0","method":"echo","params":{"a":[1,"x"]},"id":1}"#);
    // Compact JSON, members in SPDK's order, one newline after each response.
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        let mut buf = [0u8; 256];
        let n = c.stream.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        String::from_utf8(got).unwrap(),
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"a\":[1,\"x\"]}}\n"
    );
    // Non-ASCII is escaped like SPDK does; string and odd numeric ids are echoed verbatim.
    c.send_raw("{\"method\":\"echo\",\"params\":[\"é😀\"],\"id\":\"ü\"}".as_bytes());
    let raw = c.recv_raw().unwrap();
    assert_eq!(
        String::from_utf8(raw).unwrap(),
        r#"{"jsonrpc":"2.0","id":"\u00FC","result":["\u00E9\uD83D\uDE00"]}"#
    );
    c.send_raw(br#"{"method":"echo","id":1.50e3}"#);
    let raw = c.recv_raw().unwrap();
    assert_eq!(
        String::from_utf8(raw).unwrap(),
        r#"{"jsonrpc":"2.0","id":1.50e3,"result":null}"#
    );
    assert_eq!(
        c.call("errno", None),
        Err((-17, "already there".to_string()))
    );
}

#[test]
fn request_split_byte_by_byte() {
    let srv = runtime_server("split");
    let mut c = srv.client();
    let req = br#"  {"jsonrpc" : "2.0", "method":"echo", "params": {"k": "v\u00e9\ud83d\ude00", "n": -12.5e-1}, "id": 77}"#;
    for b in req.iter() {
        c.send_raw(&[*b]);
        std::thread::sleep(Duration::from_micros(300));
    }
    let resp = c.recv().unwrap();
    assert_eq!(resp["id"], 77);
    assert_eq!(resp["result"], json!({"k": "vé😀", "n": -1.25}));
    // Split multi-byte UTF-8 across writes too.
    let req = "{\"method\":\"echo\",\"params\":[\"ü€😀\"],\"id\":78}".as_bytes();
    for chunk in req.chunks(3) {
        c.send_raw(chunk);
        std::thread::sleep(Duration::from_micros(300));
    }
    assert_eq!(c.recv().unwrap()["result"], json!(["ü€😀"]));
}

#[test]
fn two_requests_in_one_write() {
    let srv = runtime_server("two");
    let mut c = srv.client();
    c.send_raw(
        br#"{"method":"echo","params":[1],"id":1}{"method":"echo","params":[2],"id":2}
{"method":"echo","params":[3],"id":3}"#,
    );
    for i in 1..=3 {
        let r = c.recv().unwrap();
        assert_eq!(r["id"], i);
        assert_eq!(r["result"], json!([i]));
    }
}

#[test]
fn python_client_style_requests() {
    // SPDK's rpc.py sends indented JSON, several requests joined by "\n".
    let srv = runtime_server("py");
    let mut c = srv.client();
    let reqs: Vec<String> = (1..=3)
        .map(|i| {
            serde_json::to_string_pretty(
                &json!({"jsonrpc": "2.0", "method": "echo", "id": i, "params": {"i": i}}),
            )
            .unwrap()
        })
        .collect();
    c.send_raw(reqs.join("\n").as_bytes());
    for i in 1..=3 {
        assert_eq!(c.recv().unwrap()["result"]["i"], i);
    }
}

#[test]
fn batch_arrays_are_refused_as_spdk_refuses_them() {
    let srv = runtime_server("batch");
    let mut c = srv.client();
    // SPDK answers a batch array with one -32600 ("not currently supported") and runs none of its elements.
    c.send_raw(
        br#"[
            {"jsonrpc":"2.0","method":"echo","params":{"x":1},"id":"a"},
            {"jsonrpc":"2.0","method":"deferred","params":{"ms":20,"value":"late"},"id":5}
        ]"#,
    );
    let resp = c.recv().unwrap();
    assert_eq!(resp["id"], Value::Null, "{resp}");
    assert_eq!(err_of(&resp), (INVALID_REQUEST as i64, "Invalid request"));
    c.send_raw(b"[]");
    let resp = c.recv().unwrap();
    assert_eq!(err_of(&resp), (INVALID_REQUEST as i64, "Invalid request"));
    // A huge batch costs one small answer, whatever it holds.
    let mut big = b"[".to_vec();
    for i in 0..20_000 {
        if i > 0 {
            big.push(b',');
        }
        big.extend_from_slice(br#"{"jsonrpc":"2.0","method":"echo","params":[1],"id":1}"#);
    }
    big.push(b']');
    c.send_raw(&big);
    let resp = c.recv().unwrap();
    assert_eq!(err_of(&resp), (INVALID_REQUEST as i64, "Invalid request"));
    // Nothing of the batches ran: the next answer is the next call's (the deferred element never answers).
    assert_eq!(c.call("echo", Some(json!([9]))), Ok(json!([9])));
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(c.call("echo", Some(json!([10]))), Ok(json!([10])));
}

#[test]
fn notifications() {
    let srv = runtime_server("notif");
    let mut c = srv.client();
    // Results for notifications (no id, or id null) are not sent.
    c.send_raw(br#"{"jsonrpc":"2.0","method":"echo","params":[1]}"#);
    c.send_raw(br#"{"jsonrpc":"2.0","method":"echo","params":[2],"id":null}"#);
    c.send_raw(br#"{"jsonrpc":"2.0","method":"deferred","params":{"ms":10,"value":1}}"#);
    assert_eq!(c.call("echo", Some(json!(["after"]))), Ok(json!(["after"])));
    // Errors are sent even for notifications, with id null (as SPDK does).
    c.send_raw(br#"{"jsonrpc":"2.0","method":"no_such_method"}"#);
    let resp = c.recv().unwrap();
    assert_eq!(resp["id"], Value::Null);
    assert_eq!(err_of(&resp).0, METHOD_NOT_FOUND as i64);
}

#[test]
fn malformed_json_gets_parse_error_and_close() {
    let srv = runtime_server("parse");
    let mut other = srv.client();
    assert!(other.call("echo", None).is_ok());
    for bad in [
        &br#"{"jsonrpc":"2.0","method":"echo","id":1,}"#[..],
        b"}",
        b"{\"method\": nope}",
        b"\"\xff\"",
        b"{\"a\":[1}",
    ] {
        let mut c = srv.client();
        // A valid request before the garbage in the same write is still answered.
        let mut data = br#"{"method":"echo","params":[0],"id":0}"#.to_vec();
        data.extend_from_slice(bad);
        c.send_raw(&data);
        assert_eq!(c.recv().unwrap()["result"], json!([0]));
        let resp = c.recv().unwrap();
        assert_eq!(
            resp,
            json!({"jsonrpc":"2.0","id":null,"error":{"code":PARSE_ERROR,"message":"Parse error"}})
        );
        assert!(c.at_eof(), "connection closed after a parse error");
    }
    // The server keeps serving others.
    assert_eq!(other.call("echo", Some(json!([1]))), Ok(json!([1])));
}

#[test]
fn oversized_request_gets_parse_error_and_close() {
    let srv = runtime_server("huge");
    let mut c = srv.client();
    let mut w = c.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(b"{\"method\":\"echo\",\"params\":[\"");
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..(jsonrpc::MAX_REQUEST_SIZE >> 20) + 2 {
            if w.write_all(&chunk).is_err() {
                break; // server closed: EPIPE, not SIGPIPE
            }
        }
    });
    let resp = c.recv().unwrap();
    assert_eq!(err_of(&resp), (PARSE_ERROR as i64, "Parse error"));
    assert!(c.at_eof());
    writer.join().unwrap();
    let mut c2 = srv.client();
    assert!(c2.call("echo", None).is_ok());
}

#[test]
fn invalid_requests() {
    let srv = runtime_server("invalid");
    let mut c = srv.client();
    for bad in [
        r#"{"jsonrpc":"1.0","method":"echo","id":1}"#,
        r#"{"jsonrpc":2,"method":"echo","id":1}"#,
        r#"{"jsonrpc":"2.0","id":1}"#,
        r#"{"jsonrpc":"2.0","method":7,"id":1}"#,
        r#"{"jsonrpc":"2.0","method":"echo","id":[1]}"#,
        r#"{"jsonrpc":"2.0","method":"echo","id":1,"bogus":true}"#,
        r#"{"jsonrpc":"2.0","method":"echo","method":"echo","id":1}"#,
        r#"42 "#,
        r#""just a string""#,
        r#"null"#,
    ] {
        c.send_raw(bad.as_bytes());
        let resp = c.recv().unwrap();
        assert_eq!(resp["id"], Value::Null, "{bad}");
        assert_eq!(
            err_of(&resp),
            (INVALID_REQUEST as i64, "Invalid request"),
            "{bad}"
        );
    }
    // A params member of the wrong type: SPDK has captured the id by then.
    c.send_raw(br#"{"jsonrpc":"2.0","method":"echo","id":3,"params":"str"}"#);
    let resp = c.recv().unwrap();
    assert_eq!(resp["id"], 3);
    assert_eq!(err_of(&resp).0, INVALID_REQUEST as i64);
    // The connection stays usable.
    assert_eq!(c.call("echo", Some(json!([5]))), Ok(json!([5])));
    // Missing "jsonrpc" member is accepted (current SPDK).
    c.send_raw(br#"{"method":"echo","params":[6],"id":6}"#);
    assert_eq!(c.recv().unwrap()["result"], json!([6]));
}

#[test]
fn unknown_method() {
    let srv = runtime_server("unknown");
    let mut c = srv.client();
    assert_eq!(
        c.call("does_not_exist", None),
        Err((METHOD_NOT_FOUND as i64, "Method not found".into()))
    );
}

#[test]
fn state_checks_and_start_init() {
    let srv = TestServer::start_shared("state", || {
        let reg = Rc::new(RefCell::new(registry(STATE_STARTUP)));
        let weak: Weak<RefCell<Registry>> = Rc::downgrade(&reg);
        reg.borrow_mut().register(
            "framework_start_init",
            STATE_STARTUP,
            Rc::new(move |_p, r: Responder| {
                // The server holds no registry borrow while a handler runs.
                weak.upgrade()
                    .unwrap()
                    .borrow_mut()
                    .set_state(STATE_RUNTIME);
                r.ok(json!(true));
            }),
        );
        reg
    });
    let mut c = srv.client();
    assert_eq!(c.call("startup_only", None), Ok(json!("startup")));
    assert_eq!(
        c.call("runtime_only", None),
        Err((INVALID_STATE as i64, MSG_ONLY_AFTER_INIT.into()))
    );
    assert_eq!(
        MSG_ONLY_AFTER_INIT,
        "Method may only be called after framework is initialized using framework_start_init RPC."
    );
    let current = c
        .call("rpc_get_methods", Some(json!({"current": true})))
        .unwrap();
    let current: Vec<&str> = current
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(current.contains(&"startup_only") && !current.contains(&"runtime_only"));
    assert_eq!(c.call("framework_start_init", None), Ok(json!(true)));
    assert_eq!(c.call("runtime_only", None), Ok(json!("runtime")));
    assert_eq!(
        c.call("startup_only", None),
        Err((INVALID_STATE as i64, MSG_ONLY_BEFORE_INIT.into()))
    );
    assert_eq!(
        MSG_ONLY_BEFORE_INIT,
        "Method may only be called before framework is initialized. Use --wait-for-rpc command \
         line parameter and then issue this RPC before the framework_start_init RPC."
    );
    let all = c.call("rpc_get_methods", None).unwrap();
    let all: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(all.contains(&"startup_only") && all.contains(&"runtime_only"));
    assert!(!all.contains(&"old_echo"));
    let with_aliases = c
        .call("rpc_get_methods", Some(json!({"include_aliases": true})))
        .unwrap();
    assert!(with_aliases
        .as_array()
        .unwrap()
        .contains(&json!("old_echo")));
    assert_eq!(c.call("old_echo", Some(json!([1]))), Ok(json!([1])));
    assert_eq!(
        c.call("rpc_get_methods", Some(json!({"bogus": true}))),
        Err((INVALID_PARAMS as i64, "Invalid parameters".into()))
    );
}

#[test]
fn rpcs_allowed() {
    let srv = TestServer::start("allowed", || {
        let mut reg = registry(STATE_RUNTIME);
        reg.set_allowed(Some(vec!["echo".into(), "rpc_get_methods".into()]));
        reg
    });
    let mut c = srv.client();
    assert_eq!(c.call("echo", Some(json!([1]))), Ok(json!([1])));
    assert_eq!(
        c.call("typed", Some(json!({"name": "x"}))),
        Err((METHOD_NOT_FOUND as i64, "Method not found".into()))
    );
    // An alias is checked under its own name.
    assert_eq!(
        c.call("old_echo", None).unwrap_err().0,
        METHOD_NOT_FOUND as i64
    );
    assert_eq!(
        c.call("rpc_get_methods", Some(json!({"include_aliases": true}))),
        Ok(json!(["echo", "rpc_get_methods"]))
    );
}

/// `busy` tells the poller (the app's, which then polls faster) that an answer is still coming.
#[test]
fn busy_while_an_answer_is_outstanding() {
    let srv = runtime_server("busy");
    let mut c = srv.client();
    srv.wait_busy(false);
    c.send_raw(br#"{"method":"deferred","params":{"ms":300,"value":"v"},"id":1}"#);
    srv.wait_busy(true);
    assert_eq!(c.recv().unwrap()["result"], "v");
    srv.wait_busy(false);
}

#[test]
fn deferred_response_from_another_thread() {
    let srv = runtime_server("deferred");
    let mut c = srv.client();
    let t = Instant::now();
    assert_eq!(
        c.call(
            "deferred",
            Some(json!({"ms": 100, "value": {"done": true}}))
        ),
        Ok(json!({"done": true}))
    );
    assert!(t.elapsed() >= Duration::from_millis(100));
    // Responses go out in completion order; ids tell them apart.
    c.send_raw(br#"{"method":"deferred","params":{"ms":300,"value":"slow"},"id":1}"#);
    c.send_raw(br#"{"method":"echo","params":["fast"],"id":2}"#);
    let first = c.recv().unwrap();
    let second = c.recv().unwrap();
    assert_eq!(first, json!({"jsonrpc":"2.0","id":2,"result":["fast"]}));
    assert_eq!(second, json!({"jsonrpc":"2.0","id":1,"result":"slow"}));
}

#[test]
fn dropped_responder_sends_internal_error() {
    let srv = runtime_server("drop");
    let mut c = srv.client();
    assert_eq!(
        c.call("drop", None),
        Err((INTERNAL_ERROR as i64, "Internal error: no response".into()))
    );
}

#[test]
fn deferred_answer_after_client_left_is_discarded() {
    let srv = runtime_server("gone");
    {
        let mut c = srv.client();
        c.send_raw(br#"{"method":"deferred","params":{"ms":100,"value":1},"id":1}"#);
        c.stream.shutdown(Shutdown::Both).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut c = srv.client();
    assert_eq!(c.call("echo", Some(json!([1]))), Ok(json!([1])));
    drop(c);
    srv.wait_conns(0);
}

#[test]
fn half_closed_client_still_gets_responses() {
    let srv = runtime_server("half");
    let mut c = srv.client();
    c.send_raw(
        br#"{"method":"deferred","params":{"ms":50,"value":"x"},"id":1}{"method":"echo","id":2}"#,
    );
    c.stream.shutdown(Shutdown::Write).unwrap();
    let mut ids = vec![
        c.recv().unwrap()["id"].as_i64().unwrap(),
        c.recv().unwrap()["id"].as_i64().unwrap(),
    ];
    ids.sort();
    assert_eq!(ids, vec![1, 2]);
    // All answered: the server closes its side.
    assert!(c.at_eof());
}

#[test]
fn decode_params_errors_name_the_field() {
    let srv = runtime_server("params");
    let mut c = srv.client();
    assert_eq!(
        c.call("typed", Some(json!({"name": "n", "size": 4}))),
        Ok(json!({"name": "n", "size": 4}))
    );
    let cases = [
        (Some(json!({"name": "n", "foo": 1})), "unknown field `foo`"),
        (Some(json!({"name": "n", "size": "big"})), "`size`"),
        (Some(json!({"name": 5})), "`name`"),
        (Some(json!({"size": 1})), "missing field `name`"),
        (None, "missing field `name`"),
    ];
    for (params, needle) in cases {
        let (code, msg) = c.call("typed", params.clone()).unwrap_err();
        assert_eq!(code, INVALID_PARAMS as i64);
        assert!(msg.contains(needle), "{params:?}: {msg}");
    }
    assert_eq!(c.call("nothing", None), Ok(json!(true)));
    assert_eq!(c.call("nothing", Some(json!({}))), Ok(json!(true)));
    assert_eq!(
        c.call("nothing", Some(json!({"x": 1}))),
        Err((
            INVALID_PARAMS as i64,
            "nothing requires no parameters".into()
        ))
    );
}

#[test]
fn many_clients_concurrently() {
    const CLIENTS: usize = 8;
    const REQUESTS: usize = 125;
    let srv = runtime_server("many");
    let threads: Vec<_> = (0..CLIENTS)
        .map(|ci| {
            let path = srv.path.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&path);
                // Half pipelined in one write, half one at a time.
                let mut batch = Vec::new();
                for ri in 0..REQUESTS / 2 {
                    let method = if ri % 10 == 0 { "deferred" } else { "echo" };
                    let params = if method == "deferred" {
                        json!({"ms": (ri % 3) as u64, "value": [ci, ri]})
                    } else {
                        json!([ci, ri])
                    };
                    let req = json!({"jsonrpc":"2.0","method":method,"params":params,"id":ri});
                    batch.extend(serde_json::to_vec(&req).unwrap());
                }
                c.send_raw(&batch);
                let mut seen = [false; REQUESTS / 2];
                for _ in 0..REQUESTS / 2 {
                    let r = c.recv().unwrap();
                    let ri = r["id"].as_u64().unwrap() as usize;
                    assert_eq!(r["result"], json!([ci, ri]));
                    assert!(!seen[ri], "duplicate response");
                    seen[ri] = true;
                }
                for ri in REQUESTS / 2..REQUESTS {
                    assert_eq!(c.call("echo", Some(json!([ci, ri]))), Ok(json!([ci, ri])));
                }
                REQUESTS
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, CLIENTS * REQUESTS);
    srv.wait_conns(0);
}

#[test]
fn large_response_and_client_vanishing_mid_response() {
    const SIZE: usize = 8 << 20;
    let srv = runtime_server("large");
    // A client that takes the whole 8 MiB response (written over many polls).
    let mut full = srv.client();
    let resp = full.call("big", Some(json!({"bytes": SIZE}))).unwrap();
    let s = resp.as_str().unwrap();
    assert_eq!(s.len(), SIZE);
    assert!(s.starts_with("abcdefghijklmnopqrstuvwxyzabc"));

    // A client that leaves after reading a little, while another is served.
    let mut quitter = srv.client();
    quitter.send_raw(br#"{"method":"big","params":{"bytes":8388608},"id":1}"#);
    let mut some = vec![0u8; 64 << 10];
    quitter.stream.read_exact(&mut some).unwrap();
    let mut steady = srv.client();
    assert_eq!(steady.call("echo", Some(json!([1]))), Ok(json!([1])));
    drop(quitter);
    for i in 0..50 {
        assert_eq!(steady.call("echo", Some(json!([i]))), Ok(json!([i])));
    }
    drop(steady);
    drop(full);
    srv.wait_conns(0);
    let mut after = srv.client();
    assert!(after.call("echo", None).is_ok());
}

#[test]
fn at_64_connections_the_longest_idle_one_makes_room() {
    let srv = runtime_server("limit");
    let mut clients: Vec<Client> = (0..jsonrpc::MAX_CONNECTIONS)
        .map(|_| srv.client())
        .collect();
    for c in clients.iter_mut() {
        assert!(c.call("echo", None).is_ok());
    }
    srv.wait_conns(jsonrpc::MAX_CONNECTIONS);
    // A 65th client is served at once: the longest-idle connection (the first) is closed for it.
    let mut extra = srv.client();
    assert_eq!(
        extra.call("echo", Some(json!(["extra"]))),
        Ok(json!(["extra"]))
    );
    let first = &mut clients[0];
    first
        .stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        first.stream.read(&mut byte).unwrap(),
        0,
        "closed for the newcomer"
    );
    // The others still work.
    assert!(clients[1].call("echo", None).is_ok());
}

#[test]
fn at_64_busy_connections_a_new_client_waits_for_a_place() {
    let srv = runtime_server("busy");
    let mut clients: Vec<Client> = (0..jsonrpc::MAX_CONNECTIONS)
        .map(|_| srv.client())
        .collect();
    // Every connection has a call outstanding: none is idle, none can be closed.
    for c in clients.iter_mut() {
        c.send_raw(br#"{"method":"deferred","params":{"ms":700,"value":1},"id":1}"#);
    }
    srv.wait_conns(jsonrpc::MAX_CONNECTIONS);
    let mut extra = srv.client();
    extra.send_raw(br#"{"method":"echo","params":["extra"],"id":1}"#);
    extra
        .stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    let r = extra.stream.read(&mut byte);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "{r:?}"
    );
    extra
        .stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Once the busy ones answered, one is idle and the newcomer is served.
    for c in clients.iter_mut() {
        assert_eq!(c.recv().unwrap()["result"], json!(1));
    }
    assert_eq!(extra.recv().unwrap()["result"], json!(["extra"]));
}

#[test]
fn socket_lock_file() {
    let path = common::sock_path("lock");
    let lock = {
        let mut p = path.clone().into_os_string();
        p.push(".lock");
        std::path::PathBuf::from(p)
    };
    // A stale socket file from a dead server is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let reg = Rc::new(RefCell::new(Registry::new()));
    let server = Server::listen(&path, Rc::clone(&reg)).expect("stale socket replaced");
    assert!(lock.exists());
    // A second server on the same path is refused while the first lives.
    let err = Server::listen(&path, Rc::clone(&reg)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(
        err.to_string().contains("in use. Specify another."),
        "{err}"
    );
    assert!(
        path.exists() && lock.exists(),
        "the refused server removed nothing"
    );
    assert_eq!(server.path(), path.as_path());
    server.close();
    assert!(
        !path.exists() && !lock.exists(),
        "close removes socket and lock file"
    );
    // And the path can be reused.
    let again = Server::listen(&path, reg).expect("listen again");
    drop(again);
    assert!(!path.exists());
    // Too long for sun_path.
    let long = std::env::temp_dir().join("x".repeat(120));
    assert!(Server::listen(&long, Rc::new(RefCell::new(Registry::new()))).is_err());
}

#[test]
fn poll_is_nonblocking_and_reports_idle() {
    let path = common::sock_path("idle");
    let mut server = Server::listen(&path, Rc::new(RefCell::new(registry(STATE_RUNTIME)))).unwrap();
    let t = Instant::now();
    for _ in 0..1000 {
        assert_eq!(server.poll(), 0);
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    // Drive a client from this same thread: connect, write, poll, read.
    let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
    c.write_all(br#"{"method":"echo","params":[1],"id":1}"#)
        .unwrap();
    c.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        server.poll();
        let mut buf = [0u8; 256];
        match c.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
        }
        assert!(Instant::now() < deadline, "no response");
    }
    assert_eq!(got, b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":[1]}\n");
    assert_eq!(server.connection_count(), 1);
    drop(c);
    while server.connection_count() > 0 {
        server.poll();
        assert!(Instant::now() < deadline);
    }
    // Idle again.
    assert_eq!(server.poll(), 0);
}
