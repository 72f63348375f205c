//! Starts the real `spdk_tgt` and drives it with the official client, `spdk-rpc` (pip package `spdk`).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running target on its own socket and temp dir; killed on drop.
pub struct Tgt {
    pub child: Option<Child>,
    pub sock: PathBuf,
    pub dir: PathBuf,
}

fn unique_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "spdk-rs-{tag}-{}-{:?}",
        std::process::id(),
        Instant::now()
    ));
    let d = PathBuf::from(d.to_string_lossy().replace([' ', '{', '}', ':', ','], ""));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spdk_tgt")
}

impl Tgt {
    /// Starts `spdk_tgt` with `args` plus a private socket; waits until it answers a call.
    pub fn start(tag: &str, args: &[&str]) -> Tgt {
        Self::try_start(tag, args).expect("spdk_tgt started")
    }

    /// Like `start`, but returns the child's output if it exits before it answers (a start-up or config
    /// error: the socket listens before the config loads, but nothing is answered until the load is over).
    pub fn try_start(tag: &str, args: &[&str]) -> Result<Tgt, Output> {
        Self::spawn(tag, args).ready(answers)
    }

    /// Starts `spdk_tgt` and returns once its socket accepts a connection, before it may answer anything.
    pub fn start_listening(tag: &str, args: &[&str]) -> Tgt {
        Self::spawn(tag, args)
            .ready(|_, _| true)
            .expect("spdk_tgt listening")
    }

    fn spawn(tag: &str, args: &[&str]) -> Tgt {
        let dir = unique_dir(tag);
        let sock = dir.join("spdk.sock");
        let child = Command::new(bin())
            .args(args)
            .arg("-r")
            .arg(&sock)
            .arg("--interrupt-mode")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn spdk_tgt");
        Tgt {
            child: Some(child),
            sock,
            dir,
        }
    }

    /// Waits until a connection to the socket passes `check` (or the child exits: its output).
    fn ready(mut self, check: impl Fn(&mut UnixStream, Instant) -> bool) -> Result<Tgt, Output> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = UnixStream::connect(&self.sock) {
                if check(&mut s, deadline) {
                    return Ok(self);
                }
            }
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().unwrap().is_some() {
                    let c = self.child.take().unwrap();
                    return Err(c.wait_with_output().unwrap());
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("spdk_tgt did not become ready on {}", self.sock.display());
    }

    /// Runs `spdk-rpc -s SOCK args...`.
    pub fn rpc(&self, args: &[&str]) -> Output {
        lab::spdk_rpc::run(&self.sock, args)
    }

    /// Runs an RPC that must succeed; returns its JSON output (or Null when it prints nothing).
    pub fn ok(&self, args: &[&str]) -> Value {
        lab::spdk_rpc::ok(&self.sock, args)
    }

    /// Runs an RPC that must fail; returns the JSON-RPC error object the client printed.
    pub fn err(&self, args: &[&str]) -> Value {
        lab::spdk_rpc::err(&self.sock, args)
    }

    /// Sends one raw JSON-RPC call over the socket and returns the response object.
    pub fn call(&self, method: &str, params: Value) -> Value {
        raw_call(
            &self.sock,
            &serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
                .to_string(),
        )
    }

    /// Stops with SIGTERM and returns the exit status and stderr.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let mut c = self.child.take().unwrap();
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let st = wait_timeout(&mut c, Duration::from_secs(20));
        let mut err = String::new();
        if let Some(mut e) = c.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (st, err)
    }
}

pub fn wait_timeout(c: &mut Child, d: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + d;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("process did not exit in {d:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One request over a fresh connection; reads until a whole JSON value arrived.
pub fn raw_call(sock: &Path, req: &str) -> Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    read_value(&mut s)
}

pub fn read_value(s: &mut UnixStream) -> Value {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        // The first complete value; more may follow (e.g. a parse error after a good response).
        if let Some(Ok(v)) = serde_json::Deserializer::from_slice(&buf)
            .into_iter::<Value>()
            .next()
        {
            return v;
        }
        let n = s.read(&mut chunk).expect("response");
        assert!(
            n > 0,
            "connection closed before a full response: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether the target behind `s` answers `spdk_get_version` before `deadline` (false when the connection
/// closes first: the target exited).
fn answers(s: &mut UnixStream, deadline: Instant) -> bool {
    let wait = deadline.saturating_duration_since(Instant::now());
    let mut b = [0u8; 1];
    !wait.is_zero()
        && s.set_read_timeout(Some(wait)).is_ok()
        && s.write_all(br#"{"jsonrpc":"2.0","id":0,"method":"spdk_get_version"}"#)
            .is_ok()
        && matches!(s.read(&mut b), Ok(n) if n > 0)
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A fresh directory `dir` holding a sparse 64 MiB `lvs.img`, and the `bdev_aio_create` parameters for it
/// (`aio0`, 512-byte blocks): the base the lvol tests put their lvstores on.
pub fn aio_image(dir: &Path) -> (PathBuf, Value) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let image = dir.join("lvs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let aio = serde_json::json!({"name": "aio0", "filename": image, "block_size": 512});
    (image, aio)
}

/// The `config` entries of `subsystem` in a saved config, and their method names in order.
pub fn subsystem_config(cfg: &Value, subsystem: &str) -> (Value, Vec<String>) {
    let entries = cfg["subsystems"]
        .as_array()
        .expect("a subsystems array")
        .iter()
        .find(|s| s["subsystem"] == subsystem)
        .unwrap_or_else(|| panic!("no {subsystem} subsystem in {cfg}"))["config"]
        .clone();
    let methods = entries
        .as_array()
        .expect("a config array")
        .iter()
        .map(|e| e["method"].as_str().unwrap_or_default().to_string())
        .collect();
    (entries, methods)
}

/// The workspace's `bdevperf` (the benches package's binary, which this package's tests cannot name), brought up
/// to date first so a guest never runs one older than the code under test.
pub fn bdevperf() -> PathBuf {
    let st = Command::new(env!("CARGO"))
        .args(["build", "-p", "benches", "--bin", "bdevperf"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .expect("cargo build");
    assert!(st.success(), "building bdevperf failed");
    Path::new(bin()).with_file_name("bdevperf")
}
