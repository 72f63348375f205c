//! The polled Unix-socket server (SPDK's `jsonrpc_server_tcp.c` and
//! `spdk_rpc_server_listen()`).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Instant;

use crate::request::{self, Item, Parsed};
use crate::responder::{Completion, Responder};
use crate::scanner::{Scan, Scanner};
use crate::{Registry, RpcError};

/// Maximum simultaneous connections (`SPDK_JSONRPC_MAX_CONNS`). A client that
/// arrives at the cap takes the place of the longest-idle connection (nothing
/// outstanding, nothing half-received or unsent); with none idle it waits (as in
/// SPDK's listen backlog) until one goes or falls idle.
pub const MAX_CONNECTIONS: usize = 64;
/// Clients accepted while every connection was busy, served as places free.
const MAX_WAITING: usize = 64;
/// Largest accepted request (one top-level JSON value, batches included).
/// A connection whose pending request grows past this gets a parse error
/// and is closed. (SPDK's receive buffer is 256 KiB; its largest response
/// is 32 MiB. This is deliberately as generous as the latter.)
pub const MAX_REQUEST_SIZE: usize = 32 << 20;
/// While more than this much output is queued for a connection, its
/// requests are not read (backpressure against clients that never read).
pub const MAX_PENDING_OUTPUT: usize = 64 << 20;
/// Bytes read per `read()` call.
const READ_CHUNK: usize = 64 << 10;
/// Bytes read from one connection per poll, for fairness.
const READ_BUDGET: usize = 1 << 20;
/// Small responses are merged into one buffer up to this size.
const COALESCE_LIMIT: usize = 64 << 10;
/// `sizeof(sockaddr_un.sun_path)`.
const SUN_PATH_LEN: usize = 108;

struct Conn {
    id: u64,
    stream: UnixStream,
    recv: Vec<u8>,
    /// Start of the unparsed data in `recv`.
    recv_start: usize,
    scanner: Scanner,
    out: VecDeque<Vec<u8>>,
    /// Bytes of `out.front()` already sent.
    out_off: usize,
    out_bytes: usize,
    /// Requests dispatched whose responder has not completed yet.
    outstanding: usize,
    /// No more reading: the peer shut down its side, or a parse error.
    read_closed: bool,
    /// Close once `out` is flushed (after a parse error).
    close_after_flush: bool,
    /// Socket failed: drop now.
    dead: bool,
    /// When it last received or sent anything.
    last_active: Instant,
}

impl Conn {
    fn new(id: u64, stream: UnixStream) -> Conn {
        Conn {
            id,
            stream,
            recv: Vec::new(),
            recv_start: 0,
            scanner: Scanner::new(),
            out: VecDeque::new(),
            out_off: 0,
            out_bytes: 0,
            outstanding: 0,
            read_closed: false,
            close_after_flush: false,
            dead: false,
            last_active: Instant::now(),
        }
    }

    /// Nothing outstanding, half-received or unsent: closing it loses nothing.
    fn idle(&self) -> bool {
        self.outstanding == 0
            && self.out.is_empty()
            && self.recv_start >= self.recv.len()
            && !self.scanner.started()
    }

    fn queue(&mut self, bytes: Vec<u8>) {
        self.out_bytes += bytes.len();
        // Merge into the last buffer unless it is partially sent.
        let back_in_flight = self.out.len() == 1 && self.out_off > 0;
        if let Some(back) = self.out.back_mut() {
            if !back_in_flight && back.len() + bytes.len() <= COALESCE_LIMIT {
                back.extend_from_slice(&bytes);
                return;
            }
        }
        self.out.push_back(bytes);
    }

    fn finished(&self) -> bool {
        self.dead
            || (self.close_after_flush && self.out.is_empty())
            || (self.read_closed && self.outstanding == 0 && self.out.is_empty())
    }

    /// Write queued output; returns bytes written.
    fn flush(&mut self) -> usize {
        let mut written = 0;
        while let Some(front) = self.out.front() {
            match send_nosignal(&self.stream, &front[self.out_off..]) {
                Ok(0) => break,
                Ok(n) => {
                    written += n;
                    self.last_active = Instant::now();
                    self.out_off += n;
                    self.out_bytes -= n;
                    if self.out_off == front.len() {
                        self.out.pop_front();
                        self.out_off = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("RPC connection {}: send failed: {e}", self.id);
                    self.dead = true;
                    break;
                }
            }
        }
        written
    }
}

/// `send(2)` with `MSG_NOSIGNAL`: a vanished peer yields `EPIPE`, never
/// `SIGPIPE`.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live slice readable for `buf.len()` bytes during the
    // call, and the descriptor is an open socket owned by `stream`.
    let rc = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Try to take an exclusive, non-blocking `flock` on `file`.
fn flock_exclusive(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on a descriptor owned by `file`, which
        // outlives the call; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// State the request path needs besides the connection.
struct Ctx<'a> {
    registry: &'a Rc<RefCell<Registry>>,
    tx: &'a Sender<Completion>,
    work: usize,
}

/// JSON-RPC 2.0 server on a Unix stream socket, driven by [`poll`](Self::poll).
///
/// It owns no thread and never blocks: the application calls `poll()`
/// repeatedly (e.g. from a reactor poller). Handlers run inside `poll()`;
/// responses answered elsewhere are written on a later `poll()`.
///
/// The socket path is guarded by an `flock` on `<path>.lock`, as in SPDK.
/// Dropping the server (or [`close`](Self::close)) closes all connections
/// and removes the socket and the lock file.
pub struct Server {
    path: PathBuf,
    lock_path: PathBuf,
    /// Held (and locked) for the server's lifetime.
    _lock: File,
    listener: UnixListener,
    registry: Rc<RefCell<Registry>>,
    conns: Vec<Conn>,
    /// Clients accepted at the cap with no idle connection to close; served in order.
    waiting: VecDeque<UnixStream>,
    next_conn_id: u64,
    tx: Sender<Completion>,
    rx: Receiver<Completion>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("path", &self.path)
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl Server {
    /// Listen on the Unix socket `path`.
    ///
    /// Like SPDK, takes an exclusive `flock` on `<path>.lock` first: if
    /// another live server holds it, fails with `AddrInUse` ("RPC Unix
    /// domain socket path ... in use. Specify another."); otherwise a stale
    /// socket file left at `path` is removed and the socket is bound.
    pub fn listen(path: &Path, registry: Rc<RefCell<Registry>>) -> io::Result<Server> {
        if path.as_os_str().as_bytes().len() >= SUN_PATH_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "RPC Listen address Unix socket path too long",
            ));
        }
        let mut lock_path = OsString::from(path.as_os_str());
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("Cannot open lock file {}: {e}", lock_path.display()),
                )
            })?;
        if let Err(e) = flock_exclusive(&lock) {
            let kind = if e.kind() == io::ErrorKind::WouldBlock {
                io::ErrorKind::AddrInUse
            } else {
                e.kind()
            };
            return Err(io::Error::new(
                kind,
                format!(
                    "RPC Unix domain socket path {} in use. Specify another.",
                    path.display()
                ),
            ));
        }
        // We hold the lock, so any socket file there is stale.
        let _ = fs::remove_file(path);
        let listener = match UnixListener::bind(path).and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        }) {
            Ok(l) => l,
            Err(e) => {
                let _ = fs::remove_file(&lock_path);
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel();
        Ok(Server {
            path: path.to_path_buf(),
            lock_path,
            _lock: lock,
            listener,
            registry,
            conns: Vec::new(),
            waiting: VecDeque::new(),
            next_conn_id: 1,
            tx,
            rx,
            scratch: vec![0; READ_CHUNK],
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The method table this server dispatches to.
    pub fn registry(&self) -> &Rc<RefCell<Registry>> {
        &self.registry
    }

    /// Whether a request is being answered or an answer is still unsent: the caller should poll again soon.
    pub fn busy(&self) -> bool {
        self.conns
            .iter()
            .any(|c| c.outstanding > 0 || !c.out.is_empty())
    }

    /// Number of open connections (including ones finishing their output).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Do all work that is ready, without blocking: accept connections,
    /// read and parse requests, run handlers, route responses completed
    /// elsewhere, write pending output, and drop finished connections.
    ///
    /// Returns a count of work items done (0 when idle), for busy/idle
    /// poller accounting.
    pub fn poll(&mut self) -> usize {
        let mut work = self.route_completions();
        work += self.accept();
        for i in 0..self.conns.len() {
            work += usize::from(self.conns[i].flush() > 0);
            work += self.read_conn(i);
        }
        if self.route_completions() > 0 {
            work += 1;
            for conn in &mut self.conns {
                conn.flush();
            }
        }
        self.conns.retain(|c| {
            let done = c.finished();
            if done {
                log::debug!("RPC connection {} closed", c.id);
            }
            !done
        });
        work
    }

    /// Close all connections and remove the socket and lock files
    /// (same as dropping the server).
    pub fn close(self) {}

    fn accept(&mut self) -> usize {
        let mut n = 0;
        loop {
            // Clients that waited for a place come first: a place that freed, or a connection gone idle.
            if !self.waiting.is_empty()
                && (self.conns.len() < MAX_CONNECTIONS || self.reclaim_idle())
            {
                let stream = self.waiting.pop_front().expect("not empty");
                self.add_conn(stream);
                n += 1;
                continue;
            }
            if self.conns.len() >= MAX_CONNECTIONS && self.waiting.len() >= MAX_WAITING {
                break;
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::error!("RPC: cannot make connection non-blocking: {e}");
                        continue;
                    }
                    n += 1;
                    if self.conns.len() < MAX_CONNECTIONS || self.reclaim_idle() {
                        self.add_conn(stream);
                    } else {
                        self.waiting.push_back(stream);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        // e.g. EMFILE: retried on the next poll, so keep it quiet.
                        log::debug!("RPC: accept failed: {e}");
                    }
                    break;
                }
            }
        }
        n
    }

    fn add_conn(&mut self, stream: UnixStream) {
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        log::debug!("RPC connection {id} accepted");
        self.conns.push(Conn::new(id, stream));
    }

    /// At the cap, closes the longest-idle connection so that a new client is served: idle clients never lock
    /// management out. False when every connection is busy.
    fn reclaim_idle(&mut self) -> bool {
        let Some(i) = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.idle())
            .min_by_key(|(_, c)| c.last_active)
            .map(|(i, _)| i)
        else {
            return false;
        };
        let c = self.conns.swap_remove(i);
        log::warn!(
            "RPC: {MAX_CONNECTIONS} connections open; closing connection {} (idle for {:?}) to serve a new client",
            c.id,
            c.last_active.elapsed()
        );
        true
    }

    /// Move completed responses into their connections' output.
    fn route_completions(&mut self) -> usize {
        let mut n = 0;
        while let Ok(c) = self.rx.try_recv() {
            n += 1;
            let Some(conn) = self.conns.iter_mut().find(|x| x.id == c.conn) else {
                // Connection gone: discard, as SPDK does.
                continue;
            };
            conn.outstanding -= 1;
            if let Some(mut bytes) = c.bytes {
                log_response(&bytes);
                bytes.push(b'\n');
                conn.queue(bytes);
            }
            if c.close_after {
                conn.close_after_flush = true;
            }
        }
        n
    }

    /// Read and dispatch what connection `i` has sent.
    fn read_conn(&mut self, i: usize) -> usize {
        let Server {
            conns,
            registry,
            tx,
            scratch,
            ..
        } = self;
        let conn = &mut conns[i];
        let mut ctx = Ctx {
            registry,
            tx,
            work: 0,
        };
        let mut total = 0;
        while !conn.read_closed
            && !conn.dead
            && conn.out_bytes <= MAX_PENDING_OUTPUT
            && total < READ_BUDGET
        {
            match (&conn.stream).read(&mut scratch[..]) {
                Ok(0) => {
                    log::debug!("RPC connection {}: remote closed connection", conn.id);
                    conn.read_closed = true;
                }
                Ok(n) => {
                    total += n;
                    ctx.work += 1;
                    conn.last_active = Instant::now();
                    conn.recv.extend_from_slice(&scratch[..n]);
                    process_input(conn, &mut ctx);
                    if n < scratch.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("RPC connection {}: recv failed: {e}", conn.id);
                    conn.dead = true;
                }
            }
        }
        ctx.work
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.conns.clear();
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_file(&self.lock_path);
    }
}

fn log_response(bytes: &[u8]) {
    log::trace!("response: {}", String::from_utf8_lossy(bytes));
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Split the connection's received bytes into requests and dispatch them.
fn process_input(conn: &mut Conn, ctx: &mut Ctx<'_>) {
    loop {
        if !conn.scanner.started() {
            while conn.recv_start < conn.recv.len() && is_ws(conn.recv[conn.recv_start]) {
                conn.recv_start += 1;
            }
        }
        let buf = &conn.recv[conn.recv_start..];
        if buf.is_empty() {
            break;
        }
        match conn.scanner.scan(buf) {
            Scan::Complete(end) => {
                let req = &buf[..end];
                log::trace!("request: {}", String::from_utf8_lossy(req));
                handle_value(req, conn.id, &mut conn.outstanding, ctx);
                conn.recv_start += end;
                conn.scanner.reset();
            }
            Scan::Incomplete => {
                if buf.len() > MAX_REQUEST_SIZE {
                    log::error!(
                        "RPC connection {}: request larger than {MAX_REQUEST_SIZE} bytes",
                        conn.id
                    );
                    parse_error(conn, ctx);
                }
                break;
            }
            Scan::Invalid => {
                log::debug!("RPC connection {}: JSON parse error", conn.id);
                parse_error(conn, ctx);
                break;
            }
        }
    }
    // Compact the buffer.
    if conn.recv_start == conn.recv.len() {
        conn.recv.clear();
        if conn.recv.capacity() > 4 * READ_CHUNK {
            conn.recv.shrink_to(READ_CHUNK);
        }
    } else if conn.recv_start > 0 {
        conn.recv.drain(..conn.recv_start);
    }
    conn.recv_start = 0;
}

/// Answer `-32700 "Parse error"` (id null) and close the connection once it
/// is sent: there is no resynchronization point in a JSON stream.
fn parse_error(conn: &mut Conn, ctx: &mut Ctx<'_>) {
    conn.read_closed = true;
    conn.recv.clear();
    conn.recv_start = 0;
    conn.outstanding += 1;
    Responder::for_conn(ctx.tx.clone(), conn.id, None, String::new(), true)
        .err(RpcError::parse_error());
}

/// Dispatch one complete top-level JSON value.
fn handle_value(req: &[u8], conn_id: u64, outstanding: &mut usize, ctx: &mut Ctx<'_>) {
    match request::parse(req) {
        Parsed::Single(item) => dispatch_item(item, conn_id, outstanding, ctx),
        Parsed::Invalid => dispatch_item(Item::Invalid { id: None }, conn_id, outstanding, ctx),
    }
}

fn dispatch_item(item: Item, conn_id: u64, outstanding: &mut usize, ctx: &mut Ctx<'_>) {
    *outstanding += 1;
    ctx.work += 1;
    let tx = ctx.tx.clone();
    match item {
        Item::Invalid { id } => Responder::for_conn(tx, conn_id, id, String::new(), false)
            .err(RpcError::invalid_request()),
        Item::BadParams { method, id } => Responder::for_conn(tx, conn_id, id, method, false)
            .err(RpcError::invalid_params("Invalid parameters")),
        Item::Call { method, params, id } => {
            // Resolve, then release the registry borrow before running the
            // handler: it may change the registry (e.g. the RPC state).
            let found = ctx.registry.borrow().lookup(&method);
            let responder = Responder::for_conn(tx, conn_id, id, method, false);
            match found {
                Ok(handler) => handler(params, responder),
                Err(e) => responder.err(e),
            }
        }
    }
}
