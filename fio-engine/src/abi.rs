//! fio 3.33's external-engine ABI on x86_64, as Debian 12's `fio` 3.33-3 binary lays it out: the structs fio
//! hands an engine, and the fields of `thread_data`, `fio_file` and `io_u` the engine reads or writes, at that
//! build's offsets. fio's headers are configure-dependent, so the offsets were taken from the tag's headers
//! configured on Debian 12 and checked against the Debian binary with a probe engine; nothing here is portable
//! to another fio version, which is why the engine refuses to load under one (see [`running_fio_version`]).
//!
//! This is the only module of the crate that touches fio's memory. fio gives every entry point pointers to
//! live objects of its own; the wrappers below are built from those pointers only, once, at the entry point.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

/// `FIO_IOOPS_VERSION`: fio refuses an engine with another.
pub const IOOPS_VERSION: c_int = 31;
/// The fio release whose structure layout this build reads.
pub const FIO_VERSION: &str = "fio-3.33";

/// `enum fio_ioengine_flags` bits the engine sets (as SPDK's engine does).
pub const FIO_RAWIO: c_int = 1 << 1;
/// No real files: fio must not stat, create or extend the names it is given.
pub const FIO_DISKLESSIO: c_int = 1 << 2;
/// Never extend a file.
pub const FIO_NOEXTEND: c_int = 1 << 3;
/// No disk-utilisation statistics (there is no block device to read them from).
pub const FIO_NODISKUTIL: c_int = 1 << 4;
/// Buffers come from the engine's `iomem_alloc`.
pub const FIO_MEMALIGN: c_int = 1 << 9;

/// `enum fio_q_status`: done at once.
pub const FIO_Q_COMPLETED: c_int = 0;
/// Queued; reaped through `getevents`.
pub const FIO_Q_QUEUED: c_int = 1;
/// No room now; fio reaps and tries again.
pub const FIO_Q_BUSY: c_int = 2;

/// `enum fio_ddir` values.
pub const DDIR_READ: c_int = 0;
/// Write.
pub const DDIR_WRITE: c_int = 1;
/// Trim (unmap).
pub const DDIR_TRIM: c_int = 2;
/// fsync.
pub const DDIR_SYNC: c_int = 3;
/// fdatasync.
pub const DDIR_DATASYNC: c_int = 4;

/// `td_ddir` bits (`enum td_ddir`).
pub const TD_DDIR_WRITE: c_uint = 1 << 1;
/// Trim bit of `td_ddir`.
pub const TD_DDIR_TRIM: c_uint = 1 << 3;

/// `enum fio_opt_type` values used.
pub const FIO_OPT_STR_STORE: c_int = 6;
/// An `unsigned int` option.
pub const FIO_OPT_INT: c_int = 8;
/// A 0/1 option stored as an int.
pub const FIO_OPT_BOOL: c_int = 10;
/// `FIO_OPT_C_ENGINE`: the option category of engine options.
pub const FIO_OPT_C_ENGINE: u64 = 1 << 6;
/// `FIO_OPT_G_INVALID` (1 << 40 in 3.33: `__FIO_OPT_G_NR` sits inside the enum), the group SPDK's engine uses.
pub const FIO_OPT_G_INVALID: u64 = 1 << 40;

/// `enum fio_zone_mode`: ZBD (real zoned block devices).
pub const ZONE_MODE_ZBD: c_uint = 3;

/// `FIO_TYPE_BLOCK`.
pub const FIO_TYPE_BLOCK: c_uint = 2;
/// `FIO_FILE_size_known`.
const FIO_FILE_SIZE_KNOWN: c_uint = 1 << 4;

/// An engine callback taking the job.
pub type TdFn = Option<unsafe extern "C" fn(*mut c_void) -> c_int>;
/// An engine callback taking the job and an I/O unit or file.
pub type TdPtrFn = Option<unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int>;
type AnyFn = Option<unsafe extern "C" fn()>;

/// `struct ioengine_ops` (264 bytes).
#[repr(C)]
pub struct IoengineOps {
    /// `struct flist_head`: fio links registered engines through it.
    pub list: [*mut c_void; 2],
    /// Engine name fio prints.
    pub name: *const c_char,
    /// [`IOOPS_VERSION`].
    pub version: c_int,
    /// `FIO_*` flags.
    pub flags: c_int,
    /// Written by fio after `dlopen`.
    pub dlhandle: *mut c_void,
    /// Once per job, in the process that parses the job (files are sized here).
    pub setup: TdFn,
    /// Once per job, on the job's thread.
    pub init: TdFn,
    /// After init.
    pub post_init: TdFn,
    /// Before queue.
    pub prep: TdPtrFn,
    /// Submits one I/O unit; returns an `FIO_Q_*` value.
    pub queue: TdPtrFn,
    /// Submits queued units (we submit in `queue`).
    pub commit: TdFn,
    /// Reaps between min and max completions, waiting at most the timespec.
    pub getevents:
        Option<unsafe extern "C" fn(*mut c_void, c_uint, c_uint, *const libc::timespec) -> c_int>,
    /// The i-th unit reaped by the last getevents.
    pub event: Option<unsafe extern "C" fn(*mut c_void, c_int) -> *mut c_void>,
    /// Error text of a unit.
    pub errdetails: AnyFn,
    /// Cancels a unit.
    pub cancel: TdPtrFn,
    /// Frees the job's engine state.
    pub cleanup: Option<unsafe extern "C" fn(*mut c_void)>,
    /// Opens a file (mandatory: fio asserts on it).
    pub open_file: TdPtrFn,
    /// Closes a file.
    pub close_file: TdPtrFn,
    /// Drops a file's cache.
    pub invalidate: TdPtrFn,
    /// Removes a file.
    pub unlink_file: TdPtrFn,
    /// Sizes a file.
    pub get_file_size: TdPtrFn,
    /// Lays a file out.
    pub prepopulate_file: TdPtrFn,
    /// Stops a job early.
    pub terminate: Option<unsafe extern "C" fn(*mut c_void)>,
    /// Allocates the job's I/O buffers into `td->orig_buffer`; nonzero fails the job.
    pub iomem_alloc: Option<unsafe extern "C" fn(*mut c_void, usize) -> c_int>,
    /// Frees them.
    pub iomem_free: Option<unsafe extern "C" fn(*mut c_void)>,
    /// Per unit set-up.
    pub io_u_init: TdPtrFn,
    /// Per unit tear-down.
    pub io_u_free: AnyFn,
    /// Zoned-device hooks (unused).
    pub get_zoned_model: AnyFn,
    /// Zoned-device hooks (unused).
    pub report_zones: AnyFn,
    /// Zoned-device hooks (unused).
    pub reset_wp: AnyFn,
    /// Zoned-device hooks (unused).
    pub get_max_open_zones: AnyFn,
    /// Size of the engine's option struct (`td->eo`).
    pub option_struct_size: c_int,
    /// The engine's options, ended by an all-zero entry.
    pub options: *mut FioOption,
}

/// `struct value_pair` (40 bytes), embedded 32 times in every option.
#[repr(C)]
pub struct ValuePair {
    ival: *const c_char,
    oval: u64,
    help: *const c_char,
    orval: c_int,
    cb: *mut c_void,
}

/// `struct fio_option` (1512 bytes).
#[repr(C)]
pub struct FioOption {
    /// Option name (`--name=`).
    pub name: *const c_char,
    /// Long name (fio insists on one).
    pub lname: *const c_char,
    alias: *const c_char,
    /// `FIO_OPT_*` type.
    pub kind: c_int,
    /// Offset in the engine's option struct (0: not stored).
    pub off: [c_uint; 6],
    /// Largest accepted value (0: none).
    pub maxval: u64,
    minval: c_int,
    maxfp: f64,
    minfp: f64,
    interval: c_uint,
    maxlen: c_uint,
    neg: c_int,
    prio: c_int,
    cb: *mut c_void,
    /// Help text.
    pub help: *const c_char,
    /// Default value, parsed as if given.
    pub def: *const c_char,
    posval: [ValuePair; 32],
    parent: *const c_char,
    hide: c_int,
    hide_on_set: c_int,
    inverse: *const c_char,
    inv_opt: *mut c_void,
    verify: *mut c_void,
    prof_name: *const c_char,
    prof_opts: *mut c_void,
    /// `FIO_OPT_C_*`.
    pub category: u64,
    /// `FIO_OPT_G_*`.
    pub group: u64,
    gui_data: *mut c_void,
    is_seconds: c_int,
    is_time: c_int,
    no_warn_def: c_int,
    pow2: c_int,
    no_free: c_int,
}

impl FioOption {
    /// An engine option; `name` and the texts are NUL-terminated statics.
    pub const fn new(
        name: &'static CStr,
        lname: &'static CStr,
        kind: c_int,
        off: usize,
        help: &'static CStr,
        def: Option<&'static CStr>,
    ) -> FioOption {
        // SAFETY: every field of `fio_option` is an integer, a float or a raw pointer, for which all-zero bytes
        // are a valid value (null pointers, 0): the state fio's own static tables leave unset fields in.
        let mut o: FioOption = unsafe { std::mem::zeroed() };
        o.name = name.as_ptr();
        o.lname = lname.as_ptr();
        o.kind = kind;
        o.off[0] = off as c_uint;
        o.help = help.as_ptr();
        o.def = match def {
            Some(d) => d.as_ptr(),
            None => std::ptr::null(),
        };
        o.category = FIO_OPT_C_ENGINE;
        o.group = FIO_OPT_G_INVALID;
        o
    }

    /// The all-zero entry that ends an option table.
    pub const fn end() -> FioOption {
        // SAFETY: as in `new`: all-zero is a valid `fio_option`, and it is fio's end marker.
        unsafe { std::mem::zeroed() }
    }
}

const _: () = {
    assert!(std::mem::size_of::<IoengineOps>() == 264);
    assert!(std::mem::offset_of!(IoengineOps, queue) == 72);
    assert!(std::mem::offset_of!(IoengineOps, iomem_alloc) == 184);
    assert!(std::mem::offset_of!(IoengineOps, option_struct_size) == 248);
    assert!(std::mem::offset_of!(IoengineOps, options) == 256);
    assert!(std::mem::size_of::<ValuePair>() == 40);
    assert!(std::mem::size_of::<FioOption>() == 1512);
    assert!(std::mem::offset_of!(FioOption, kind) == 24);
    assert!(std::mem::offset_of!(FioOption, maxval) == 56);
    assert!(std::mem::offset_of!(FioOption, cb) == 104);
    assert!(std::mem::offset_of!(FioOption, posval) == 128);
    assert!(std::mem::offset_of!(FioOption, parent) == 1408);
    assert!(std::mem::offset_of!(FioOption, category) == 1464);
    assert!(std::mem::offset_of!(FioOption, no_free) == 1504);
};

/// `struct thread_data` offsets (absolute; `td->o` starts at 24).
mod td_off {
    pub const NAME: usize = 24 + 80;
    pub const TD_DDIR: usize = 176;
    pub const IODEPTH: usize = 208;
    pub const USE_THREAD: usize = 1256;
    pub const ZONE_MODE: usize = 1652;
    pub const EO: usize = 4216;
    pub const FILES: usize = 188832;
    pub const FILES_INDEX: usize = 188852;
    pub const ORIG_BUFFER: usize = 189056;
    pub const IO_OPS_DATA: usize = 189968;
}

/// `struct fio_file` offsets.
mod file_off {
    pub const FILETYPE: usize = 16;
    pub const FILE_NAME: usize = 40;
    pub const REAL_FILE_SIZE: usize = 48;
    pub const ENGINE_DATA: usize = 176;
    pub const FLAGS: usize = 364;
}

/// `struct io_u` offsets.
mod io_u_off {
    pub const FILE: usize = 32;
    pub const DDIR: usize = 44;
    pub const OFFSET: usize = 72;
    pub const XFER_BUF: usize = 104;
    pub const XFER_BUFLEN: usize = 112;
    pub const RESID: usize = 136;
    pub const ERROR: usize = 144;
}

/// Reads a `T` at `off` bytes into the object at `base`.
///
/// # Safety
/// `base + off` must hold a live, initialised `T` of fio's (a field at its documented offset).
unsafe fn get<T: Copy>(base: *mut u8, off: usize) -> T {
    // SAFETY: the caller names a field of a live fio object; unaligned reads tolerate any placement.
    unsafe { std::ptr::read_unaligned(base.add(off) as *const T) }
}

/// Writes a `T` at `off` bytes into the object at `base`.
///
/// # Safety
/// `base + off` must be a field of type `T` of a live fio object that fio lets the engine write.
unsafe fn set<T>(base: *mut u8, off: usize, v: T) {
    // SAFETY: as in `get`, for a field the engine owns at this point of fio's protocol.
    unsafe { std::ptr::write_unaligned(base.add(off) as *mut T, v) }
}

/// Copies a C string fio owns (NULL: empty).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that lives for this call.
unsafe fn string(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated per the caller.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// A fio job (`struct thread_data *`).
#[derive(Clone, Copy)]
pub struct Td(*mut u8);

impl Td {
    /// Wraps the job pointer fio passed to an engine entry point.
    ///
    /// # Safety
    /// `p` must be the `struct thread_data *` fio passed, live for as long as the wrapper is used (the call).
    pub unsafe fn from_fio(p: *mut c_void) -> Option<Td> {
        (!p.is_null()).then_some(Td(p as *mut u8))
    }

    /// Job name.
    pub fn name(self) -> String {
        // SAFETY: `o.name` is a `char *` fio keeps for the job's life (`from_fio`'s contract).
        unsafe { string(get(self.0, td_off::NAME)) }
    }

    /// `iodepth`.
    pub fn iodepth(self) -> u32 {
        // SAFETY: `o.iodepth` is an unsigned int of the live job.
        unsafe { get(self.0, td_off::IODEPTH) }
    }

    /// `td_ddir` bits (`TD_DDIR_*`).
    pub fn ddir(self) -> u32 {
        // SAFETY: `o.td_ddir` is an unsigned int of the live job.
        unsafe { get(self.0, td_off::TD_DDIR) }
    }

    /// `thread=1`.
    pub fn use_thread(self) -> bool {
        // SAFETY: `o.use_thread` is an unsigned int of the live job.
        unsafe { get::<c_uint>(self.0, td_off::USE_THREAD) != 0 }
    }

    /// `zonemode`.
    pub fn zone_mode(self) -> u32 {
        // SAFETY: `o.zone_mode` is an enum (int) of the live job.
        unsafe { get(self.0, td_off::ZONE_MODE) }
    }

    /// The engine's option struct (`td->eo`), NULL before fio made it.
    pub fn eo(self) -> *const u8 {
        // SAFETY: `eo` is a pointer field of the live job.
        unsafe { get(self.0, td_off::EO) }
    }

    /// The job's files.
    pub fn files(self) -> Vec<FioFile> {
        // SAFETY: `files` is an array of `files_index` live `struct fio_file *` (fio grows it while parsing
        // and only reads it while the job runs).
        unsafe {
            let files: *mut *mut u8 = get(self.0, td_off::FILES);
            let n: c_uint = get(self.0, td_off::FILES_INDEX);
            if files.is_null() {
                return vec![];
            }
            (0..n as usize)
                .map(|i| *files.add(i))
                .filter(|f| !f.is_null())
                .map(FioFile)
                .collect()
        }
    }

    /// Points fio at the job's I/O buffer memory (`td->orig_buffer`), by address (0: none).
    pub fn set_orig_buffer(self, addr: usize) {
        // SAFETY: `orig_buffer` is the job's buffer pointer, which `iomem_alloc` is asked to set.
        unsafe { set(self.0, td_off::ORIG_BUFFER, addr) }
    }

    /// The engine's per-job state (`td->io_ops_data`), as an address.
    pub fn engine_data(self) -> usize {
        // SAFETY: `io_ops_data` is a pointer field reserved for the engine.
        unsafe { get(self.0, td_off::IO_OPS_DATA) }
    }

    /// Sets the engine's per-job state (an address; 0: none).
    pub fn set_engine_data(self, addr: usize) {
        // SAFETY: as in `engine_data`.
        unsafe { set(self.0, td_off::IO_OPS_DATA, addr) }
    }
}

/// A fio file (`struct fio_file *`): for this engine, a bdev name.
#[derive(Clone, Copy)]
pub struct FioFile(*mut u8);

impl FioFile {
    /// Wraps a file pointer fio passed.
    ///
    /// # Safety
    /// `p` must be a live `struct fio_file *` of the job.
    pub unsafe fn from_fio(p: *mut c_void) -> Option<FioFile> {
        (!p.is_null()).then_some(FioFile(p as *mut u8))
    }

    /// `file_name`: the bdev's name.
    pub fn name(self) -> String {
        // SAFETY: `file_name` is a `char *` of the live file.
        unsafe { string(get(self.0, file_off::FILE_NAME)) }
    }

    /// Tells fio the file's size and that it is a block device (what `setup` must do for diskless names).
    pub fn set_size(self, bytes: u64) {
        // SAFETY: fields of the live file that an engine's `setup` sets.
        unsafe {
            set(self.0, file_off::REAL_FILE_SIZE, bytes);
            set(self.0, file_off::FILETYPE, FIO_TYPE_BLOCK);
            let flags: c_uint = get(self.0, file_off::FLAGS);
            set(self.0, file_off::FLAGS, flags | FIO_FILE_SIZE_KNOWN);
        }
    }

    /// The engine's per-file word.
    pub fn engine_data(self) -> usize {
        // SAFETY: `engine_data` is a pointer-sized field reserved for the engine.
        unsafe { get(self.0, file_off::ENGINE_DATA) }
    }

    /// Sets the engine's per-file word.
    pub fn set_engine_data(self, v: usize) {
        // SAFETY: as in `engine_data`.
        unsafe { set(self.0, file_off::ENGINE_DATA, v) }
    }
}

/// An I/O unit (`struct io_u *`).
#[derive(Clone, Copy)]
pub struct IoU(*mut u8);

impl IoU {
    /// Wraps a unit pointer fio passed to `queue`.
    ///
    /// # Safety
    /// `p` must be a live `struct io_u *` that stays live until the engine hands it back through `event`.
    pub unsafe fn from_fio(p: *mut c_void) -> Option<IoU> {
        (!p.is_null()).then_some(IoU(p as *mut u8))
    }

    /// Rebuilds a wrapper from [`IoU::addr`] (in the completion of the I/O it names).
    ///
    /// # Safety
    /// `addr` must come from `addr()` of a unit the engine still holds.
    pub unsafe fn from_addr(addr: u64) -> IoU {
        IoU(addr as *mut u8)
    }

    /// The unit's address (a completion's context word).
    pub fn addr(self) -> u64 {
        self.0 as u64
    }

    /// The unit's raw pointer, for `event`.
    pub fn as_ptr(self) -> *mut c_void {
        self.0 as *mut c_void
    }

    /// Its file.
    pub fn file(self) -> Option<FioFile> {
        // SAFETY: `file` is a `struct fio_file *` of the live unit (NULL for none).
        let f: *mut u8 = unsafe { get(self.0, io_u_off::FILE) };
        (!f.is_null()).then_some(FioFile(f))
    }

    /// `ddir`.
    pub fn ddir(self) -> c_int {
        // SAFETY: `ddir` is an enum (int) of the live unit.
        unsafe { get(self.0, io_u_off::DDIR) }
    }

    /// Byte offset on the file.
    pub fn offset(self) -> u64 {
        // SAFETY: `offset` is an unsigned long long of the live unit.
        unsafe { get(self.0, io_u_off::OFFSET) }
    }

    /// The data buffer and its length.
    pub fn buf(self) -> (*mut u8, u64) {
        // SAFETY: `xfer_buf`/`xfer_buflen` of the live unit.
        unsafe {
            (
                get(self.0, io_u_off::XFER_BUF),
                get(self.0, io_u_off::XFER_BUFLEN),
            )
        }
    }

    /// Sets the result: an errno (0: success) and the bytes not transferred.
    pub fn set_result(self, error: u32, resid: u64) {
        // SAFETY: `error` and `resid` are the fields an engine reports a unit's result in.
        unsafe {
            set(self.0, io_u_off::ERROR, error);
            set(self.0, io_u_off::RESID, resid);
        }
    }
}

/// The `fio_version_string` of the fio this library was loaded into (`None`: not loaded by fio).
pub fn running_fio_version() -> Option<String> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks the symbol up.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"fio_version_string".as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: fio defines `const char fio_version_string[]`, a NUL-terminated string that lives as long as
    // the process.
    Some(unsafe { string(p as *const c_char) })
}

/// fio's `register_ioengine`, when this library was preloaded into fio (`LD_PRELOAD`).
///
/// # Safety
/// `ops` must be a table that lives, and that nothing else writes, for the rest of the process.
pub unsafe fn register_with_fio(ops: *mut IoengineOps) -> bool {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks the symbol up.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"register_ioengine".as_ptr()) };
    if f.is_null() {
        return false;
    }
    // SAFETY: fio 3.33 defines `void register_ioengine(struct ioengine_ops *)`; `ops` is our static table,
    // which lives as long as the process and which fio may link into its engine list.
    unsafe {
        let register: unsafe extern "C" fn(*mut IoengineOps) = std::mem::transmute(f);
        register(ops);
    }
    true
}

/// Keeps this library mapped until the process exits, however often fio `dlclose`s it: the environment's
/// thread runs its code until then.
pub fn pin_library() {
    // SAFETY: `Dl_info` is four pointers; all-null is a valid value for dladdr to overwrite.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let me = pin_library as *const c_void;
    // SAFETY: dladdr fills `info` for an address of this library; `info` is a live local.
    if unsafe { libc::dladdr(me, &mut info) } == 0 || info.dli_fname.is_null() {
        return;
    }
    // SAFETY: `dli_fname` names this already loaded library; NOLOAD|NODELETE only marks it, never loads.
    let h = unsafe {
        libc::dlopen(
            info.dli_fname,
            libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
        )
    };
    if h.is_null() {
        log::warn!("spdk_bdev engine: could not pin the library in memory");
    }
}

/// Reads the engine's option struct (`td->eo`) as [`crate::EngineOptions`] lays it out.
///
/// # Safety
/// `eo` is NULL or `td->eo` of a live job of this engine (fio allocated `option_struct_size` bytes).
pub unsafe fn read_options(eo: *const u8) -> Option<crate::EngineOptions> {
    if eo.is_null() {
        return None;
    }
    // SAFETY: fio allocated and filled a `RawOptions` at `eo` (our `option_struct_size`); its strings are
    // fio's strdup'd copies, NULL when unset.
    unsafe {
        let raw = &*(eo as *const crate::RawOptions);
        Some(crate::EngineOptions {
            conf: string(raw.conf),
            json_conf: string(raw.json_conf),
            mem_mb: raw.mem_mb,
            log_flags: string(raw.log_flags),
            initial_zone_reset: raw.initial_zone_reset,
            zone_append: raw.zone_append,
            env_context: string(raw.env_context),
            rpc_listen_addr: string(raw.rpc_listen_addr),
        })
    }
}
