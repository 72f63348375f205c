//! Test harness: a server polled on its own thread, and a tiny blocking client.

#![allow(dead_code)]

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use jsonrpc::{Registry, Scan, Scanner, Server};
use serde_json::Value;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh socket path under the temp dir.
pub fn sock_path(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("jrpc-{}-{n}-{tag}.sock", std::process::id()))
}

/// A server polled in a loop on a dedicated thread until dropped.
pub struct TestServer {
    pub path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Connection count, published by the poll thread.
    pub conns: Arc<AtomicUsize>,
    /// [`Server::busy`], published by the poll thread.
    pub busy: Arc<AtomicBool>,
}

impl TestServer {
    /// `build` runs on the server thread (the registry is not `Send`).
    pub fn start<F>(tag: &str, build: F) -> TestServer
    where
        F: FnOnce() -> Registry + Send + 'static,
    {
        Self::start_shared(tag, move || Rc::new(RefCell::new(build())))
    }

    /// Like [`start`](Self::start), for handlers that need the shared registry.
    pub fn start_shared<F>(tag: &str, build: F) -> TestServer
    where
        F: FnOnce() -> Rc<RefCell<Registry>> + Send + 'static,
    {
        let path = sock_path(tag);
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let path = path.clone();
            let stop = Arc::clone(&stop);
            let conns = Arc::clone(&conns);
            let busy = Arc::clone(&busy);
            std::thread::spawn(move || {
                let registry = build();
                let mut server = Server::listen(&path, registry).expect("listen");
                ready_tx.send(()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let work = server.poll();
                    conns.store(server.connection_count(), Ordering::Relaxed);
                    busy.store(server.busy(), Ordering::Relaxed);
                    if work == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                server.close();
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server ready");
        TestServer {
            path,
            stop,
            thread: Some(thread),
            conns,
            busy,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.path)
    }

    /// Wait until the server reports [`Server::busy`] as `b`.
    pub fn wait_busy(&self, b: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.busy.load(Ordering::Relaxed) != b {
            assert!(Instant::now() < deadline, "server never became busy={b}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Wait until the server reports `n` connections.
    pub fn wait_conns(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.conns.load(Ordering::Relaxed) != n {
            assert!(
                Instant::now() < deadline,
                "expected {n} connections, have {}",
                self.conns.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !std::thread::panicking() {
                r.expect("server thread panicked");
            }
        }
    }
}

/// Blocking client reading whole JSON values off the stream.
pub struct Client {
    pub stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
            next_id: 0,
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    pub fn send(&mut self, v: &Value) {
        let mut b = serde_json::to_vec(v).unwrap();
        b.push(b'\n');
        self.send_raw(&b);
    }

    /// Next complete JSON value, or `None` at EOF. Panics on timeout.
    pub fn recv(&mut self) -> Option<Value> {
        self.recv_raw()
            .map(|b| serde_json::from_slice(&b).expect("server sent valid JSON"))
    }

    /// Next complete JSON value's bytes (trailing newline excluded).
    pub fn recv_raw(&mut self) -> Option<Vec<u8>> {
        let mut scanner = Scanner::new();
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let ws = self
                .buf
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            if ws > 0 && !scanner.started() {
                self.buf.drain(..ws);
            }
            if !self.buf.is_empty() {
                match scanner.scan(&self.buf) {
                    Scan::Complete(end) => {
                        let v: Vec<u8> = self.buf.drain(..end).collect();
                        return Some(v);
                    }
                    Scan::Invalid => panic!(
                        "server sent invalid JSON: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ),
                    Scan::Incomplete => {}
                }
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    assert!(
                        self.buf.iter().all(|b| b.is_ascii_whitespace()),
                        "EOF mid-response"
                    );
                    return None;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Linux reports ECONNRESET instead of EOF when the server
                // closed with unread request bytes still queued.
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionReset
                        && self.buf.iter().all(|b| b.is_ascii_whitespace()) =>
                {
                    return None;
                }
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// Send a request with a fresh numeric id and return the whole response.
    pub fn call_raw(&mut self, method: &str, params: Option<Value>) -> Value {
        self.next_id += 1;
        let mut req = serde_json::json!({"jsonrpc": "2.0", "method": method, "id": self.next_id});
        if let Some(p) = params {
            req["params"] = p;
        }
        self.send(&req);
        let resp = self.recv().expect("response");
        assert_eq!(resp["id"], serde_json::json!(self.next_id), "{resp}");
        resp
    }

    /// `Ok(result)` or `Err((code, message))`.
    pub fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, (i64, String)> {
        let resp = self.call_raw(method, params);
        assert_eq!(resp["jsonrpc"], "2.0");
        if let Some(e) = resp.get("error") {
            assert!(resp.get("result").is_none());
            Err((
                e["code"].as_i64().unwrap(),
                e["message"].as_str().unwrap().to_string(),
            ))
        } else {
            Ok(resp["result"].clone())
        }
    }

    /// Whether the server closed the connection (EOF) with nothing more sent.
    pub fn at_eof(&mut self) -> bool {
        self.recv().is_none()
    }
}
