//! An SPDK-style application (SPDK's `nvmf_tgt` or `spdk_tgt`, or ours) run as a child process for a guest test:
//! started with a JSON config (`--json`) and its own RPC socket (`-r`), output to a log file, driven with raw
//! JSON-RPC calls, and always killed when dropped (and, through `PR_SET_PDEATHSIG`, when the test process dies).
//!
//! ```no_run
//! # use std::path::Path;
//! let dir = Path::new("/var/tmp/my-test");
//! let mut t = lab::target::Target::start(Path::new("/path/to/spdk_tgt"), &["-m", "0x1"], dir).unwrap();
//! t.wait_ready(std::time::Duration::from_secs(30)).unwrap();
//! let subsystems = t.call("nvmf_get_subsystems", serde_json::Value::Null).unwrap();
//! t.stop(std::time::Duration::from_secs(10)).unwrap();
//! # let _ = subsystems;
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A running target process; dropping it kills the process (SIGKILL) and reaps it.
pub struct Target {
    child: Option<Child>,
    binary: PathBuf,
    sock: PathBuf,
    log: PathBuf,
}

impl Target {
    /// Starts `binary args... -r DIR/spdk.sock` with stdout and stderr in `DIR/target.log` (`dir` is created).
    /// Does not wait for it: see [`wait_ready`](Self::wait_ready).
    pub fn start(binary: &Path, args: &[&str], dir: &Path) -> Result<Target, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let sock = dir.join("spdk.sock");
        let _ = std::fs::remove_file(&sock);
        let log = dir.join("target.log");
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .arg("-r")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it makes the kernel kill the
        // target when the thread that started it dies, so a crashed or killed test leaves no target behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        Ok(Target {
            child: Some(child),
            binary: binary.to_path_buf(),
            sock,
            log,
        })
    }

    /// The RPC socket.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// The process id (None once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the target printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until the RPC socket accepts connections and `framework_wait_init` answers (the JSON config is then
    /// fully applied). Fails early, with the log, when the process exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.alive() {
                return Err(format!(
                    "{} exited during start-up; log:\n{}",
                    self.binary.display(),
                    self.log()
                ));
            }
            if UnixStream::connect(&self.sock).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not open {} in {timeout:?}; log:\n{}",
                    self.binary.display(),
                    self.sock.display(),
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.call("framework_wait_init", Value::Null)
            .map(|_| ())
            .map_err(|e| format!("framework_wait_init: {e}; log:\n{}", self.log()))
    }

    /// One JSON-RPC call; `Ok(result)` or `Err(error object)` (an `{"message": ...}` object for a transport
    /// failure). `params` Null sends no params.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, Value> {
        let fail = |m: String| json!({ "message": m });
        let mut s = UnixStream::connect(&self.sock)
            .map_err(|e| fail(format!("connect {}: {e}", self.sock.display())))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| fail(e.to_string()))?;
        let mut req = json!({"jsonrpc": "2.0", "id": 1, "method": method});
        if !params.is_null() {
            req["params"] = params;
        }
        s.write_all(req.to_string().as_bytes())
            .map_err(|e| fail(format!("send: {e}")))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        let resp: Value = loop {
            if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                break v;
            }
            match s.read(&mut chunk) {
                Ok(0) => return Err(fail(format!("{method}: connection closed"))),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(fail(format!("{method}: {e}"))),
            }
        };
        match resp.get("error") {
            Some(e) => Err(e.clone()),
            None => Ok(resp.get("result").cloned().unwrap_or(Value::Null)),
        }
    }

    /// Kills the target at once (SIGKILL: a crash, nothing more reaches its disks) and returns its exit status.
    pub fn kill(&mut self) -> Result<ExitStatus, String> {
        let Some(mut c) = self.child.take() else {
            return Err("already stopped".into());
        };
        let _ = c.kill();
        let st = c.wait().map_err(|e| e.to_string());
        remove_leftovers(&self.binary, c.id());
        st
    }

    /// Waits for the target to exit by itself (after `spdk_kill_instance`, say) and returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let Some(c) = self.child.as_mut() else {
            return Err("already stopped".into());
        };
        let deadline = Instant::now() + timeout;
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    let pid = c.id();
                    self.child = None;
                    remove_leftovers(&self.binary, pid);
                    return Ok(st);
                }
                Ok(None) if Instant::now() >= deadline => {
                    return Err(format!(
                        "{} did not exit in {timeout:?}",
                        self.binary.display()
                    ))
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Stops the target the way an operator does (SIGTERM; SIGKILL after `grace`) and returns its exit status.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, String> {
        let Some(mut c) = self.child.take() else {
            return Err("already stopped".into());
        };
        // SAFETY: signals our own child process, which has not been reaped yet (its pid is still ours).
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    remove_leftovers(&self.binary, c.id());
                    return Ok(st);
                }
                Ok(None) if Instant::now() >= deadline => {
                    let _ = c.kill();
                    let _ = c.wait();
                    remove_leftovers(&self.binary, c.id());
                    return Err(format!(
                        "{} ignored SIGTERM for {grace:?} (killed)",
                        self.binary.display()
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// Removes what an SPDK app leaves behind for process `pid`, killed or not: DPDK's runtime directory
/// (`/var/run/dpdk/spdk_pid<pid>`, empty after a run without hugepages; a non-empty one is left alone) and the
/// trace shared memory named after the app.
pub fn remove_leftovers(binary: &Path, pid: u32) {
    let _ = std::fs::remove_dir(format!("/var/run/dpdk/spdk_pid{pid}"));
    if let Some(app) = binary.file_name().and_then(|n| n.to_str()) {
        let _ = std::fs::remove_file(format!("/dev/shm/{app}_trace.pid{pid}"));
    }
}

/// SPDK's peer build (`../shared/tools/spdk-peer/build.sh`): `SPDK_PEER`, else `/root/spdk-peer`, if its
/// `spdk_tgt` is there.
pub fn spdk_peer() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var("SPDK_PEER").unwrap_or_else(|_| "/root/spdk-peer".into()));
    p.join("build/bin/spdk_tgt").is_file().then_some(p)
}

/// Starts SPDK's own `spdk_tgt` from the peer build `peer` on one core without hugepages (`-c config`), in
/// `dir`, and waits until its configuration is applied. Panics with its log if it does not come up (tests).
pub fn start_spdk_tgt(peer: &Path, dir: &Path, config: &Path) -> Target {
    let bin = peer.join("build/bin/spdk_tgt");
    let args = [
        "-m",
        "0x1",
        "--no-huge",
        "-s",
        "1024",
        "--disable-cpumask-locks",
        "-c",
    ];
    let mut args: Vec<&str> = args.to_vec();
    let config = config.to_string_lossy();
    args.push(&config);
    let mut t = Target::start(&bin, &args, dir).unwrap_or_else(|e| panic!("{e}"));
    t.wait_ready(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("SPDK's spdk_tgt: {e}"));
    t
}

/// SPDK's own `spdk_tgt` from the peer build ([`spdk_peer`]) as tests drive it: `DIR/config.json` as its
/// config, calls that must succeed, a clean stop or a crash.
pub struct SpdkTgt(pub Target);

impl SpdkTgt {
    /// Starts it in `dir/tag` with `dir/config.json` (panics without a peer build: tests check first).
    pub fn start(dir: &Path, tag: &str) -> SpdkTgt {
        let peer = spdk_peer().expect("an SPDK peer build (tests check spdk_peer() first)");
        SpdkTgt(start_spdk_tgt(
            &peer,
            &dir.join(tag),
            &dir.join("config.json"),
        ))
    }

    /// One call; `Err` carries SPDK's error object.
    pub fn try_call(&self, method: &str, params: Value) -> Result<Value, Value> {
        self.0.call(method, params)
    }

    /// One call that must succeed: its result, or a panic naming the method, its params and the error.
    pub fn call(&self, method: &str, params: Value) -> Value {
        self.try_call(method, params.clone())
            .unwrap_or_else(|e| panic!("SPDK {method} {params}: {e}"))
    }

    /// Clean shutdown as SPDK's scripts do it (`spdk_kill_instance SIGTERM`): blobstores unloaded, etc.
    pub fn stop(mut self) {
        self.call("spdk_kill_instance", json!({"sig_name": "SIGTERM"}));
        self.0.wait_exit(Duration::from_secs(30)).unwrap();
    }

    /// A crash (SIGKILL): nothing more reaches its disks.
    pub fn crash(mut self) {
        self.0.kill().unwrap();
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            remove_leftovers(&self.binary, c.id());
        }
    }
}
