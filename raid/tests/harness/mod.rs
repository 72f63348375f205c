//! Starts the real `spdk_tgt` / `bdevperf` binaries (workspace `target/debug`) on private sockets and drives them
//! with the official client, `spdk-rpc` (pip package `spdk`).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

static BUILD: Once = Once::new();

/// Path of a workspace binary in `target/debug`, built first if it is missing.
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let p = target.join("debug").join(name);
    BUILD.call_once(|| {
        if p.exists() {
            return;
        }
        let st = Command::new(env!("CARGO"))
            .current_dir(workspace())
            .args(["build", "-p", "spdk-tgt", "-p", "benches"])
            .status()
            .expect("run cargo build");
        assert!(st.success(), "building spdk_tgt and bdevperf failed");
    });
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p spdk-tgt -p benches`",
        p.display()
    );
    p
}

/// A directory on a disk-backed file system (O_DIRECT works there, unlike tmpfs), removed on drop.
pub struct TmpDir(pub PathBuf);

impl TmpDir {
    pub fn new(tag: &str) -> TmpDir {
        let d = PathBuf::from(format!(
            "/var/tmp/spdk-rs-raid-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TmpDir(d)
    }

    pub fn file(&self, name: &str, len: u64) -> PathBuf {
        let p = self.0.join(name);
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        p
    }

    /// Writes a JSON config with one `bdev` subsystem holding `entries` (then `bdev_wait_for_examine`).
    pub fn bdev_config(&self, name: &str, entries: &[Value]) -> PathBuf {
        let mut cfg = entries.to_vec();
        cfg.push(serde_json::json!({"method": "bdev_wait_for_examine"}));
        let doc = serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": cfg}]});
        let p = self.0.join(name);
        std::fs::write(&p, doc.to_string()).unwrap();
        p
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Targets' output goes to the test's output with `RAID_TEST_LOGS=1`.
fn out_stdio() -> Stdio {
    if std::env::var_os("RAID_TEST_LOGS").is_some() {
        Stdio::inherit()
    } else {
        Stdio::piped()
    }
}

/// A running target (spdk_tgt or bdevperf) on its own socket; killed on drop.
pub struct Tgt {
    pub child: Option<Child>,
    pub sock: PathBuf,
    _dir: TmpDir,
}

impl Tgt {
    /// Starts `binary` with `args` plus `-r <socket>`; waits for init to finish (`framework_wait_init`).
    pub fn start(binary: &str, tag: &str, args: &[&str]) -> Tgt {
        let dir = TmpDir::new(&format!("sock-{tag}"));
        let sock = dir.0.join("spdk.sock");
        let child = Command::new(bin(binary))
            .args(args)
            .arg("-r")
            .arg(&sock)
            .stdout(out_stdio())
            .stderr(out_stdio())
            .spawn()
            .expect("spawn target");
        let mut t = Tgt {
            child: Some(child),
            sock,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&t.sock).is_err() {
            if let Some(c) = t.child.as_mut() {
                if c.try_wait().unwrap().is_some() {
                    let o = t.child.take().unwrap().wait_with_output().unwrap();
                    panic!(
                        "{binary} exited early:\n{}\n{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "{binary} did not open its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if binary == "spdk_tgt" {
            t.ok(&["framework_wait_init"]);
        }
        t
    }

    pub fn spdk_tgt(tag: &str, args: &[&str]) -> Tgt {
        let mut a = vec!["--interrupt-mode"];
        a.extend_from_slice(args);
        Tgt::start("spdk_tgt", tag, &a)
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

    /// One raw JSON-RPC request; the response object.
    pub fn call(&self, method: &str, params: Value) -> Value {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let req =
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        s.write_all(req.to_string().as_bytes()).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                return v;
            }
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The `bdev_raid_get_bdevs all` entry of `name`.
    pub fn raid(&self, name: &str) -> Option<Value> {
        let v = self.ok(&["bdev_raid_get_bdevs", "all"]);
        v.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
    }

    /// Polls until `cond` holds.
    pub fn wait(&self, what: &str, secs: u64, mut cond: impl FnMut(&Tgt) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status and output.
    pub fn stop(mut self) -> (std::process::ExitStatus, String, String) {
        let c = self.child.take().unwrap();
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut c = c;
        loop {
            if c.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("target did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = c.wait_with_output().unwrap();
        (
            o.status,
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `perform_tests` of a `bdevperf -z` instance in the background (our bdevperf.py client).
pub fn perform_tests(sock: &Path) -> Child {
    let script = workspace().join("benches").join("bdevperf.py");
    Command::new("python3")
        .arg(script)
        .arg("-s")
        .arg(sock)
        .args(["-t", "120", "perform_tests"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bdevperf.py")
}

/// Waits for `perform_tests`; its results JSON, or the failure text.
pub fn results(c: Child) -> Result<Value, String> {
    let o = c.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    if !o.status.success() {
        return Err(format!("{out}{}", String::from_utf8_lossy(&o.stderr)));
    }
    serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
}
