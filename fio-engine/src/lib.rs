//! `spdk_bdev`: a fio external ioengine that runs fio jobs on this target's bdev layer, a drop-in for SPDK's
//! fio bdev plugin. Built as `libfio_spdk_bdev.so`; fio loads it either way SPDK's is loaded:
//!
//! - `fio --ioengine=external:/path/libfio_spdk_bdev.so ...` (or `ioengine=/path/libfio_spdk_bdev.so`);
//! - `LD_PRELOAD=/path/libfio_spdk_bdev.so fio --ioengine=spdk_bdev ...` (the library registers itself).
//!
//! Jobs need `thread=1`, name bdevs as files (`filename=Malloc0`, `filename=Nvme0n1:Raid0`), and take SPDK's
//! engine options: `spdk_json_conf` (or `spdk_conf`), `spdk_mem`, `spdk_single_seg`, `log_flags`,
//! `initial_zone_reset`, `zone_append`, `env_context`, `spdk_rpc_listen_addr`.
//!
//! The library speaks fio 3.33's ABI (Debian 12's fio) and refuses to load under another fio, saying so: the
//! `thread_data` layout it reads changes between releases even where the engine ABI version does not.
//!
//! Parts: [`abi`] (fio's structures, the crate's only unsafe memory access), `env` (the target runtime
//! started once per process, stopped at exit), `job` (each fio thread's bdev channels and completions).

pub mod abi;
mod env;
mod job;

use std::cell::{RefCell, UnsafeCell};
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::mem::offset_of;
use std::time::{Duration, Instant};

use abi::{FioOption, IoU, IoengineOps, Td};
use reactor::dma::DmaBuf;

/// The engine's name.
pub const ENGINE_NAME: &str = "spdk_bdev";

/// The engine options as fio stores them (`td->eo`): SPDK's `struct spdk_fio_options`.
#[repr(C)]
pub struct RawOptions {
    /// fio's own word (the job pointer while parsing).
    pad: *mut c_void,
    conf: *const c_char,
    json_conf: *const c_char,
    mem_mb: c_uint,
    /// `spdk_single_seg`: a DPDK hugepage-file layout choice; our DMA memory has no such files, so it is accepted
    /// and has no effect.
    _mem_single_seg: c_uint,
    log_flags: *const c_char,
    initial_zone_reset: c_uint,
    zone_append: c_uint,
    env_context: *const c_char,
    rpc_listen_addr: *const c_char,
}

/// The engine options of a job.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// `spdk_conf`: a JSON config (as in SPDK since v20.10).
    pub conf: String,
    /// `spdk_json_conf`: the JSON config that creates the bdevs.
    pub json_conf: String,
    /// `spdk_mem`: MiB of DMA memory (0: no cap).
    pub mem_mb: u32,
    /// `log_flags`: comma-separated log components, as `-L`.
    pub log_flags: String,
    /// `initial_zone_reset` (zoned bdevs only: refused when set).
    pub initial_zone_reset: u32,
    /// `zone_append` (zoned bdevs only: refused when set).
    pub zone_append: u32,
    /// `env_context`: DPDK arguments (ignored, with a notice).
    pub env_context: String,
    /// `spdk_rpc_listen_addr`: serve JSON-RPC on this socket while fio runs.
    pub rpc_listen_addr: String,
}

/// A static fio may write to (fio links its engine list through the ops and fills the option table).
#[repr(transparent)]
struct FioOwned<T>(UnsafeCell<T>);

// SAFETY: fio touches these tables from its main thread while loading engines, before any job thread runs;
// this library never writes them after building them.
unsafe impl<T> Sync for FioOwned<T> {}

static OPTIONS: FioOwned<[FioOption; 10]> = FioOwned(UnsafeCell::new([
    FioOption::new(
        c"spdk_conf",
        c"SPDK configuration file",
        abi::FIO_OPT_STR_STORE,
        offset_of!(RawOptions, conf),
        c"A SPDK JSON configuration file",
        None,
    ),
    FioOption::new(
        c"spdk_json_conf",
        c"SPDK JSON configuration file",
        abi::FIO_OPT_STR_STORE,
        offset_of!(RawOptions, json_conf),
        c"A SPDK JSON configuration file",
        None,
    ),
    FioOption::new(
        c"spdk_mem",
        c"SPDK memory in MB",
        abi::FIO_OPT_INT,
        offset_of!(RawOptions, mem_mb),
        c"Amount of memory in MB to allocate for SPDK",
        None,
    ),
    FioOption::new(
        c"spdk_single_seg",
        c"SPDK switch to create just a single hugetlbfs file",
        abi::FIO_OPT_BOOL,
        offset_of!(RawOptions, _mem_single_seg),
        c"If set to 1, SPDK will use just a single hugetlbfs file",
        Some(c"0"),
    ),
    FioOption::new(
        c"log_flags",
        c"log_flags",
        abi::FIO_OPT_STR_STORE,
        offset_of!(RawOptions, log_flags),
        c"SPDK log flags to enable",
        None,
    ),
    FioOption::new(
        c"initial_zone_reset",
        c"Reset Zones on initialization",
        abi::FIO_OPT_INT,
        offset_of!(RawOptions, initial_zone_reset),
        c"Reset Zones on initialization (0=disable, 1=Reset All Zones)",
        Some(c"0"),
    ),
    FioOption::new(
        c"zone_append",
        c"Use zone append instead of write",
        abi::FIO_OPT_INT,
        offset_of!(RawOptions, zone_append),
        c"Use zone append instead of write (1=zone append, 0=write)",
        Some(c"0"),
    ),
    FioOption::new(
        c"env_context",
        c"Environment context options",
        abi::FIO_OPT_STR_STORE,
        offset_of!(RawOptions, env_context),
        c"Opaque context for use of the env implementation",
        None,
    ),
    FioOption::new(
        c"spdk_rpc_listen_addr",
        c"The address to listen the RPC operations",
        abi::FIO_OPT_STR_STORE,
        offset_of!(RawOptions, rpc_listen_addr),
        c"The address to listen the RPC operations",
        None,
    ),
    FioOption::end(),
]));

static OPS: FioOwned<IoengineOps> = FioOwned(UnsafeCell::new(IoengineOps {
    list: [std::ptr::null_mut(); 2],
    name: c"spdk_bdev".as_ptr(),
    version: abi::IOOPS_VERSION,
    flags: abi::FIO_RAWIO
        | abi::FIO_NOEXTEND
        | abi::FIO_NODISKUTIL
        | abi::FIO_MEMALIGN
        | abi::FIO_DISKLESSIO,
    dlhandle: std::ptr::null_mut(),
    setup: Some(setup),
    init: Some(init),
    post_init: None,
    prep: None,
    queue: Some(queue),
    commit: None,
    getevents: Some(getevents),
    event: Some(event),
    errdetails: None,
    cancel: None,
    cleanup: Some(cleanup),
    open_file: Some(open_file),
    close_file: Some(close_file),
    invalidate: Some(invalidate),
    unlink_file: None,
    get_file_size: None,
    prepopulate_file: None,
    terminate: None,
    iomem_alloc: Some(iomem_alloc),
    iomem_free: Some(iomem_free),
    io_u_init: None,
    io_u_free: None,
    get_zoned_model: None,
    report_zones: None,
    reset_wp: None,
    get_max_open_zones: None,
    option_struct_size: std::mem::size_of::<RawOptions>() as c_int,
    options: OPTIONS.0.get() as *mut FioOption,
}));

/// Why the running fio cannot use this build, if it cannot.
fn abi_mismatch() -> Option<String> {
    mismatch(abi::running_fio_version().as_deref())
}

/// Why a fio reporting `running` as its version cannot use this build (`None`: not loaded by fio).
fn mismatch(running: Option<&str>) -> Option<String> {
    match running {
        Some(v) if v == abi::FIO_VERSION => None,
        Some(v) => Some(format!(
            "spdk_bdev engine: built for {} (engine ABI {}), but this is {v}; its job layout differs, so the \
             engine refuses to load. Use {} or rebuild the engine for {v}.",
            abi::FIO_VERSION,
            abi::IOOPS_VERSION,
            abi::FIO_VERSION
        )),
        None => Some("spdk_bdev engine: not loaded by fio (no fio_version_string)".into()),
    }
}

/// fio's entry point for `ioengine=external:<this library>`: hands out the ops table, or none (fio then
/// fails to load the engine) under a fio whose layout this build does not know.
///
/// # Safety
/// `out` must be a valid pointer to write the table's address to (fio passes its local).
#[no_mangle]
pub unsafe extern "C" fn get_ioengine(out: *mut *mut IoengineOps) {
    if out.is_null() {
        return;
    }
    let ops = match abi_mismatch() {
        None => OPS.0.get(),
        Some(why) => {
            eprintln!("{why}");
            std::ptr::null_mut()
        }
    };
    // SAFETY: `out` is fio's non-null out-pointer (checked above).
    unsafe { *out = ops };
}

/// Preloaded into fio (`LD_PRELOAD`): registers `spdk_bdev` in fio's engine list before fio parses jobs, as
/// SPDK's plugin does. A library `dlopen`ed through `external:` must not register (fio would find the table
/// twice), so only a preloaded one does.
extern "C" fn register_if_preloaded() {
    let preloaded = std::env::var("LD_PRELOAD")
        .is_ok_and(|v| v.split([' ', ':']).any(|p| p.contains("fio_spdk_bdev")));
    if !preloaded || abi::running_fio_version().is_none() {
        return;
    }
    if let Some(why) = abi_mismatch() {
        eprintln!("{why}");
        return;
    }
    // SAFETY: `OPS` is a static this library never writes after building it.
    unsafe { abi::register_with_fio(OPS.0.get()) };
}

#[used]
#[link_section = ".init_array"]
static REGISTER: extern "C" fn() = register_if_preloaded;

/// Runs an entry point's body on the job fio passed (`None`: fio passed none), turning a missing job or a
/// panic into `fail` (a panic must not unwind into fio).
fn entry<R>(td: Option<Td>, fail: R, body: impl FnOnce(Td) -> R) -> R {
    let Some(td) = td else {
        return fail;
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(td))).unwrap_or_else(|_| {
        eprintln!("spdk_bdev engine: internal error (panic); failing the call");
        fail
    })
}

/// Prints an engine error the way fio prints its own (fio says nothing itself when `setup` fails).
fn report(td: Td, msg: &str) {
    eprintln!("fio: spdk_bdev ({}): {msg}", td.name());
}

/// Starts the environment from the job's options (first job of the process only).
fn ensure_env(td: Td) -> Result<(), String> {
    // SAFETY: `td->eo` of a live job of this engine (or NULL).
    let o = unsafe { abi::read_options(td.eo()) }.unwrap_or_default();
    env::ensure(&o)
}

unsafe extern "C" fn setup(td: *mut c_void) -> c_int {
    // SAFETY: fio passes its live job.
    entry(unsafe { Td::from_fio(td) }, 1, |td| {
        if !td.use_thread() {
            report(td, "must set thread=1 when using the spdk_bdev engine");
            return 1;
        }
        if td.zone_mode() == abi::ZONE_MODE_ZBD {
            report(
                td,
                "zonemode=zbd needs zoned bdevs, which this target does not have",
            );
            return 1;
        }
        if let Err(e) = ensure_env(td) {
            report(td, &e);
            return 1;
        }
        for f in td.files() {
            let name = f.name();
            match bdev::get(&name) {
                Some(b) => f.set_size(b.num_blocks() * b.block_size() as u64),
                None => {
                    report(td, &format!("Unable to find bdev with name {name}"));
                    return 1;
                }
            }
        }
        0
    })
}

unsafe extern "C" fn init(td: *mut c_void) -> c_int {
    // SAFETY: fio passes its live job.
    entry(unsafe { Td::from_fio(td) }, 1, |td| {
        if let Err(e) = ensure_env(td) {
            report(td, &e);
            return 1;
        }
        match job::Job::new(td) {
            Ok(j) => {
                td.set_engine_data(Box::into_raw(Box::new(RefCell::new(j))) as usize);
                0
            }
            Err(e) => {
                report(td, &e);
                1
            }
        }
    })
}

/// The job's state, as `init` left it.
fn job_of(td: Td) -> Option<&'static RefCell<job::Job>> {
    let p = td.engine_data() as *const RefCell<job::Job>;
    // SAFETY: `io_ops_data` is NULL or the box `init` leaked for this job, freed only by `cleanup`, after
    // which fio calls no other entry point of the job.
    unsafe { p.as_ref() }
}

unsafe extern "C" fn queue(td: *mut c_void, u: *mut c_void) -> c_int {
    // SAFETY: fio passes its live job.
    entry(unsafe { Td::from_fio(td) }, abi::FIO_Q_COMPLETED, |td| {
        // SAFETY: fio hands us a live unit until we return it through `event`.
        let Some(u) = (unsafe { IoU::from_fio(u) }) else {
            return abi::FIO_Q_COMPLETED;
        };
        match job_of(td) {
            Some(j) => j.borrow().queue(u),
            None => {
                u.set_result(libc::EINVAL as u32, u.buf().1);
                abi::FIO_Q_COMPLETED
            }
        }
    })
}

unsafe extern "C" fn getevents(
    td: *mut c_void,
    min: c_uint,
    _max: c_uint,
    t: *const libc::timespec,
) -> c_int {
    // SAFETY: `t` is NULL or fio's live timespec for this call.
    let deadline = unsafe { t.as_ref() }.map(|t| {
        Instant::now()
            + Duration::new(
                t.tv_sec.max(0) as u64,
                t.tv_nsec.clamp(0, 999_999_999) as u32,
            )
    });
    // SAFETY: fio passes its live job.
    entry(unsafe { Td::from_fio(td) }, -1, |td| match job_of(td) {
        Some(j) => j.borrow_mut().getevents(min as usize, deadline) as c_int,
        None => -1,
    })
}

unsafe extern "C" fn event(td: *mut c_void, i: c_int) -> *mut c_void {
    // SAFETY: fio passes its live job.
    entry(unsafe { Td::from_fio(td) }, std::ptr::null_mut(), |td| {
        job_of(td)
            .and_then(|j| j.borrow().event(i.max(0) as usize))
            .map_or(std::ptr::null_mut(), IoU::as_ptr)
    })
}

unsafe extern "C" fn cleanup(td: *mut c_void) {
    // SAFETY: fio passes its live job.
    entry(unsafe { Td::from_fio(td) }, (), |td| {
        let p = td.engine_data() as *mut RefCell<job::Job>;
        if p.is_null() {
            return;
        }
        td.set_engine_data(0);
        // SAFETY: the box `init` leaked for this job; the pointer was cleared above, so it is freed once.
        let j = unsafe { Box::from_raw(p) };
        j.into_inner().close();
    })
}

// Files are bdevs opened for the whole job in `init`, as SPDK's engine does: open and close have nothing
// left to do (fio insists on having them).
unsafe extern "C" fn open_file(_td: *mut c_void, _f: *mut c_void) -> c_int {
    0
}

unsafe extern "C" fn close_file(_td: *mut c_void, _f: *mut c_void) -> c_int {
    0
}

unsafe extern "C" fn invalidate(_td: *mut c_void, _f: *mut c_void) -> c_int {
    0
}

thread_local! {
    /// The job's I/O buffer memory (`iomem_alloc`/`iomem_free` run on the job's own thread).
    static IOMEM: RefCell<Option<DmaBuf>> = const { RefCell::new(None) };
}

/// Gives fio DMA memory for the job's buffers, so every bdev (NVMe PCIe included) takes them without a copy.
unsafe extern "C" fn iomem_alloc(td: *mut c_void, size: usize) -> c_int {
    // SAFETY: fio passes its live job.
    entry(unsafe { Td::from_fio(td) }, 1, |td| {
        // With create_serialize=0 fio allocates before `setup`: the memory options must be in force first.
        if let Err(e) = ensure_env(td) {
            report(td, &e);
            return 1;
        }
        match DmaBuf::alloc(size.max(1)) {
            Ok(b) => {
                td.set_orig_buffer(b.as_ptr() as usize);
                IOMEM.with(|m| *m.borrow_mut() = Some(b));
                0
            }
            Err(e) => {
                report(
                    td,
                    &format!("cannot allocate {size} bytes of I/O buffers: {e}"),
                );
                1
            }
        }
    })
}

unsafe extern "C" fn iomem_free(td: *mut c_void) {
    // SAFETY: fio passes its live job.
    if let Some(td) = unsafe { Td::from_fio(td) } {
        td.set_orig_buffer(0);
    }
    IOMEM.with(|m| m.borrow_mut().take());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_fio_it_was_built_for_is_accepted() {
        assert_eq!(mismatch(Some("fio-3.33")), None);
        let why = mismatch(Some("fio-3.36")).unwrap();
        assert!(
            why.contains("built for fio-3.33 (engine ABI 31), but this is fio-3.36"),
            "{why}"
        );
        assert!(mismatch(None).unwrap().contains("not loaded by fio"));
    }

    #[test]
    fn option_table_is_spdks() {
        // SAFETY: the table is only read here (no fio in this process writes it).
        let opts = unsafe { &*OPTIONS.0.get() };
        let names: Vec<String> = opts
            .iter()
            .take_while(|o| !o.name.is_null())
            .map(|o| {
                // SAFETY: every entry's name is a NUL-terminated static.
                unsafe { std::ffi::CStr::from_ptr(o.name) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "spdk_conf",
                "spdk_json_conf",
                "spdk_mem",
                "spdk_single_seg",
                "log_flags",
                "initial_zone_reset",
                "zone_append",
                "env_context",
                "spdk_rpc_listen_addr"
            ]
        );
        assert!(opts.last().unwrap().name.is_null(), "table not terminated");
        assert_eq!(std::mem::size_of::<RawOptions>(), 64);
    }
}
