//! Controllers: creation (socket, lightweight thread, bdev claim), the registry, deletion, coalescing settings.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bdev::Bdev;
use reactor::{lock, CpuMask, ThreadHandle};

use crate::config::BlkInfo;
use crate::device::Dev;
use crate::error::{Error, ErrorKind, Result};

/// SPDK's default `delay_base_us` (coalescing off).
pub const DEFAULT_DELAY_BASE_US: u32 = 0;
/// SPDK's default `iops_threshold`.
pub const DEFAULT_IOPS_THRESHOLD: u32 = 60000;
/// The only transport (SPDK's default, `vhost_user_blk`).
pub const TRANSPORT: &str = "vhost_user_blk";

/// A connected front end, as `vhost_get_controllers` lists it.
#[derive(Clone, Debug, Default)]
pub struct Session {
    /// Connection number (SPDK's `vid`).
    pub vid: u32,
    /// Whether any queue runs.
    pub started: bool,
    /// Highest started queue + 1.
    pub max_queues: u32,
}

/// A vhost-user-blk controller.
pub struct Ctrlr {
    /// Process-unique id.
    pub id: u64,
    /// Name (and socket file name).
    pub name: String,
    /// The exported bdev's name.
    pub bdev_name: String,
    /// Writes fail with IOERR (and VIRTIO_BLK_F_RO is offered).
    pub readonly: bool,
    /// Packed rings offered.
    pub packed: bool,
    /// The cores the controller's thread may run on.
    pub cpumask: CpuMask,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The controller's lightweight thread (its queues are polled there).
    pub thread: ThreadHandle,
    /// The bdev while it is there (`None` after hot-remove).
    pub bdev: Mutex<Option<Bdev>>,
    /// What the guest is told about the disk.
    pub info: BlkInfo,
    /// Interrupt coalescing: base delay.
    pub delay_base_us: AtomicU32,
    /// Interrupt coalescing: IOPS threshold.
    pub iops_threshold: AtomicU32,
    /// The connected front end, if any.
    pub session: Mutex<Option<Session>>,
    /// I/O in flight (updated by the poller).
    pub inflight: AtomicU64,
    /// Set by delete: the control thread exits.
    pub shutdown: AtomicBool,
    /// The current connection (to cut it on delete).
    pub conn: Mutex<Option<UnixStream>>,
    /// The back-end request channel the front end gave (`SET_BACKEND_REQ_FD`): where a configuration change
    /// (a resize) is announced.
    pub backend_req: Mutex<Option<UnixStream>>,
    pub(crate) next_vid: AtomicU32,
}

impl Ctrlr {
    /// The virtio features offered.
    pub fn features(&self) -> u64 {
        crate::config::features(&self.info, self.readonly, self.packed)
    }

    /// The config space (a zero-sized disk once the bdev is gone, as SPDK).
    pub fn config_space(&self) -> [u8; crate::config::CONFIG_LEN] {
        let mut info = self.info.clone();
        match &*lock(&self.bdev) {
            Some(b) => info.num_blocks = b.num_blocks(),
            None => {
                info.num_blocks = 0;
                info.block_size = 0;
            }
        }
        crate::config::config_space(&info)
    }

    /// Tells the front end the configuration space changed (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the
    /// back-end request channel): QEMU reads it again and interrupts the guest, which sees the new capacity.
    /// Written from a thread of its own: the channel is QEMU's, and a reactor must never wait on it.
    pub fn notify_config_change(self: &Arc<Self>) {
        let Some(ch) = lock(&self.backend_req)
            .as_ref()
            .and_then(|c| c.try_clone().ok())
        else {
            log::info!(
                "vhost {}: configuration changed; no front end to tell",
                self.name
            );
            return;
        };
        let name = self.name.clone();
        std::thread::spawn(move || {
            // Request 2, flags: version 1, no reply asked, no payload.
            let mut msg = [0u8; 12];
            msg[0..4].copy_from_slice(&2u32.to_le_bytes());
            msg[4..8].copy_from_slice(&1u32.to_le_bytes());
            match std::io::Write::write_all(&mut &ch, &msg) {
                Ok(()) => log::info!("vhost {name}: configuration change sent to the front end"),
                Err(e) => log::warn!("vhost {name}: configuration change not sent: {e}"),
            }
        });
    }

    /// Whether a front end is connected.
    pub fn connected(&self) -> bool {
        lock(&self.session).is_some()
    }
}

static REGISTRY: Mutex<Vec<Arc<Ctrlr>>> = Mutex::new(Vec::new());
static SOCK_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Sets the directory sockets are created in (`spdk_tgt -S`); `None` = the current directory, as SPDK.
pub fn set_socket_dir(dir: Option<PathBuf>) {
    *lock(&SOCK_DIR) = dir;
}

fn socket_dir() -> PathBuf {
    lock(&SOCK_DIR)
        .clone()
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Every controller, in creation order.
pub fn list() -> Vec<Arc<Ctrlr>> {
    lock(&REGISTRY).clone()
}

/// A controller by name.
pub fn get(name: &str) -> Option<Arc<Ctrlr>> {
    lock(&REGISTRY).iter().find(|c| c.name == name).cloned()
}

/// `vhost_create_blk_controller` options.
#[derive(Clone, Debug, Default)]
pub struct CreateOpts {
    /// Controller name.
    pub ctrlr: String,
    /// Bdev to export.
    pub dev_name: String,
    /// Core mask for the controller's thread (default: all reactor cores).
    pub cpumask: Option<String>,
    /// Read-only.
    pub readonly: bool,
    /// Offer packed rings.
    pub packed_ring: bool,
    /// Transport (only `vhost_user_blk`).
    pub transport: Option<String>,
}

/// Creates a controller; `done` runs (on the controller's thread) once its bdev is open and claimed.
pub fn create(opts: CreateOpts, done: impl FnOnce(Result<()>) + Send + 'static) {
    match prepare(&opts) {
        Ok((ctrlr, listener)) => {
            let c = ctrlr.clone();
            ctrlr.thread.send(move || {
                let res = Dev::open(c.clone());
                match res {
                    Ok(()) => {
                        let c2 = c.clone();
                        let spawned = std::thread::Builder::new()
                            .name(format!("vhost_{}", c.name))
                            .spawn(move || crate::backend::serve(c2, listener));
                        match spawned {
                            Ok(_) => {
                                log::info!(
                                    "vhost controller {} on {} exports bdev {}",
                                    c.name,
                                    c.socket.display(),
                                    c.bdev_name
                                );
                                done(Ok(()));
                            }
                            Err(e) => {
                                Dev::close(c.id);
                                unregister(&c);
                                done(Err(Error::new(ErrorKind::Os(libc::EAGAIN), e.to_string())));
                            }
                        }
                    }
                    Err(e) => {
                        unregister(&c);
                        done(Err(e));
                    }
                }
            });
        }
        Err(e) => done(Err(e)),
    }
}

fn unregister(c: &Arc<Ctrlr>) {
    lock(&REGISTRY).retain(|x| !Arc::ptr_eq(x, c));
    let _ = std::fs::remove_file(&c.socket);
    c.thread.request_exit();
}

fn prepare(opts: &CreateOpts) -> Result<(Arc<Ctrlr>, UnixListener)> {
    let name = opts.ctrlr.as_str();
    if name.is_empty() || name.contains('/') {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("invalid controller name '{name}'"),
        ));
    }
    if let Some(t) = &opts.transport {
        if t != TRANSPORT {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("Transport type '{t}' unavailable."),
            ));
        }
    }
    let cores = reactor::cores();
    let cpumask = match &opts.cpumask {
        Some(s) => CpuMask::parse(s).map_err(|e| Error::new(ErrorKind::Invalid, e.to_string()))?,
        None => {
            let mut m = CpuMask::new();
            for c in &cores {
                m.set(*c);
            }
            m
        }
    };
    if cpumask.cores().any(|c| !cores.contains(&c)) {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("cpumask {cpumask} is not a subset of the reactor cores"),
        ));
    }
    let bdev = bdev::get(&opts.dev_name).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("{name}: could not open bdev '{}'", opts.dev_name),
        )
    })?;
    let socket = socket_dir().join(name);
    if socket.as_os_str().len() >= 108 {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("socket path {} is too long", socket.display()),
        ));
    }
    let mut reg = lock(&REGISTRY);
    if reg.iter().any(|c| c.name == name) {
        return Err(Error::new(
            ErrorKind::Exists,
            format!("vhost controller {name} already exists"),
        ));
    }
    // A stale socket of an earlier run is replaced, as SPDK does; any other file is left alone.
    if let Ok(md) = std::fs::symlink_metadata(&socket) {
        if md.file_type().is_socket() {
            let _ = std::fs::remove_file(&socket);
        }
    }
    let listener = UnixListener::bind(&socket)
        .map_err(|e| Error::os(&e, format!("cannot create socket {}", socket.display())))?;
    let thread = reactor::spawn_thread(name, Some(&cpumask)).ok_or_else(|| {
        let _ = std::fs::remove_file(&socket);
        Error::new(
            ErrorKind::Invalid,
            format!("no reactor runs on cpumask {cpumask}"),
        )
    })?;
    let ctrlr = Arc::new(Ctrlr {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        name: name.to_string(),
        bdev_name: bdev.name().to_string(),
        readonly: opts.readonly,
        packed: opts.packed_ring,
        cpumask,
        socket,
        thread,
        info: BlkInfo::of(&bdev),
        bdev: Mutex::new(Some(bdev)),
        delay_base_us: AtomicU32::new(DEFAULT_DELAY_BASE_US),
        iops_threshold: AtomicU32::new(DEFAULT_IOPS_THRESHOLD),
        session: Mutex::new(None),
        inflight: AtomicU64::new(0),
        shutdown: AtomicBool::new(false),
        conn: Mutex::new(None),
        backend_req: Mutex::new(None),
        next_vid: AtomicU32::new(0),
    });
    reg.push(ctrlr.clone());
    Ok((ctrlr, listener))
}

/// Deletes a controller (`vhost_delete_controller`). Refused with EBUSY while a front end is connected, as SPDK
/// does; `done` runs once the bdev is released.
pub fn delete(name: &str, done: impl FnOnce(Result<()>) + Send + 'static) {
    let Some(c) = get(name) else {
        return done(Err(Error::new(
            ErrorKind::NotFound,
            format!("vhost controller {name} not found"),
        )));
    };
    if c.connected() {
        return done(Err(Error::new(
            ErrorKind::Busy,
            format!("Controller {name} has still valid connection."),
        )));
    }
    c.shutdown.store(true, Ordering::SeqCst);
    if let Some(s) = lock(&c.conn).take() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    lock(&REGISTRY).retain(|x| !Arc::ptr_eq(x, &c));
    let _ = std::fs::remove_file(&c.socket);
    let c2 = c.clone();
    c.thread.send(move || close_when_idle(c2, Box::new(done)));
}

type Done = Box<dyn FnOnce(Result<()>) + Send>;

fn close_when_idle(c: Arc<Ctrlr>, done: Done) {
    let busy = crate::device::with_dev(c.id, |d| d.running_queues() > 0).unwrap_or(false);
    if busy || c.connected() {
        reactor::timer(10_000, move || close_when_idle(c, done)).detach();
        return;
    }
    Dev::close(c.id);
    c.thread.request_exit();
    log::info!("vhost controller {} deleted", c.name);
    done(Ok(()));
}

/// `vhost_controller_set_coalescing`, with SPDK's limits.
pub fn set_coalescing(name: &str, delay_base_us: u32, iops_threshold: u32) -> Result<()> {
    let c = get(name).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("vhost controller {name} not found"),
        )
    })?;
    let delay_ticks = reactor::ticks::from_us(delay_base_us as u64);
    if delay_ticks >= u32::MAX as u64 {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("Delay time of {delay_base_us} is to big"),
        ));
    }
    if iops_threshold as u64 * 10 / 1000 == 0 {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("IOPS rate of {iops_threshold} is too low. Min is 100"),
        ));
    }
    c.delay_base_us.store(delay_base_us, Ordering::Relaxed);
    c.iops_threshold.store(iops_threshold, Ordering::Relaxed);
    Ok(())
}
