//! Rendezvous between a host test and its running guest script, for tests that act on the host in the middle of
//! a guest run (change the target's configuration, freeze QEMU, ...) and need the guest to wait meanwhile.
//!
//! The guest calls `host_sync NAME` (`/lab/lib.sh`): it prints `LAB-SYNC NAME` on the console, connects to the
//! host's [`Handshake`] port through the user-mode NIC (busybox `nc` to 10.0.2.2), sends `NAME` and waits for
//! the host's one-line answer, which it leaves in `$HOST_SYNC_REPLY`. The host's [`Handshake::wait`] returns
//! once the guest is there; the guest stays blocked until [`SyncPoint::reply`] (and `host_sync` fails when the
//! host drops the [`SyncPoint`] without answering). Since the guest is blocked in `nc` for the whole exchange,
//! the host may even stop QEMU in between ([`RunningGuest::pause`]).
//!
//! ```no_run
//! let Some(lab) = lab::Lab::get_or_skip("my_test") else { return };
//! let hs = lab::sync::Handshake::new().unwrap();
//! let mut cfg = lab::GuestConfig::new("sync", ". /lab/lib.sh\nhost_sync ready || fail sync\necho GOT=$HOST_SYNC_REPLY\n");
//! hs.apply(&mut cfg);
//! let guest = lab.spawn(&cfg).unwrap();
//! let at = hs.wait(&guest, "ready", std::time::Duration::from_secs(60)).unwrap();
//! // ... act on the host while the guest waits ...
//! at.reply("go").unwrap();
//! guest.wait().unwrap().assert_success();
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::{GuestConfig, LabError, RunningGuest};

/// The host's end: a listening socket on 127.0.0.1 the guest reaches as 10.0.2.2 (`$LAB_SYNC_PORT`).
pub struct Handshake {
    listener: TcpListener,
    port: u16,
}

/// A guest waiting in `host_sync NAME` for the host's answer.
pub struct SyncPoint {
    stream: TcpStream,
    name: String,
}

impl Handshake {
    /// Listens on a free port of 127.0.0.1.
    pub fn new() -> std::io::Result<Handshake> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        Ok(Handshake { listener, port })
    }

    /// The port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Gives `cfg` a NIC and `LAB_SYNC_PORT`.
    pub fn apply(&self, cfg: &mut GuestConfig) {
        cfg.net = true;
        cfg.env
            .push(("LAB_SYNC_PORT".into(), self.port.to_string()));
    }

    /// Waits until the guest calls `host_sync name`. Fails when it calls it with another name, when the script
    /// ends or QEMU exits first, or after `timeout`.
    pub fn wait(
        &self,
        guest: &RunningGuest,
        name: &str,
        timeout: Duration,
    ) -> Result<SyncPoint, LabError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(LabError::Qemu(format!("sync {name:?}: accept: {e}"))),
            }
            if guest.finished() {
                return Err(LabError::Timeout(format!(
                    "sync {name:?}: the guest script ended first"
                )));
            }
            if Instant::now() >= deadline {
                return Err(LabError::Timeout(format!(
                    "sync {name:?}: the guest did not get there in {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let io = |e: std::io::Error| LabError::Qemu(format!("sync {name:?}: {e}"));
        stream.set_nonblocking(false).map_err(io)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).map_err(io)?;
        let got = line.trim();
        if got != name {
            return Err(LabError::Timeout(format!(
                "sync: the guest is at {got:?}, the host waited for {name:?}"
            )));
        }
        Ok(SyncPoint {
            stream,
            name: name.to_string(),
        })
    }
}

impl SyncPoint {
    /// The name the guest gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Lets the guest go on; `answer` (one line) becomes its `$HOST_SYNC_REPLY`.
    pub fn reply(mut self, answer: &str) -> Result<(), LabError> {
        let line = format!("{}\n", answer.replace('\n', " "));
        self.stream
            .write_all(line.as_bytes())
            .and_then(|_| self.stream.shutdown(std::net::Shutdown::Both))
            .map_err(|e| LabError::Qemu(format!("sync {:?}: reply: {e}", self.name)))
    }
}
