//! `spdk_dd`: SPDK's copy tool (`app/spdk_dd`), same flags, messages and exit codes: copies between files and
//! bdevs (file to bdev, bdev to file, bdev to bdev, file to file) through the bdev layer, in I/O units of `--bs`
//! bytes with `--qd` of them in flight, `--skip`/`--seek`/`--count` in I/O units, printing a progress line while
//! it runs. The bdevs come from the `--json` config; the common SPDK app options (`-m`, `--no-huge`, `-s`, `-L`,
//! ...) apply.
//!
//! File I/O goes through io_uring on the app thread (`--aio`: a helper thread of positioned reads and writes;
//! see `dd_files.rs`), so bdev and file I/O flow side by side; each I/O unit's buffer travels with its request
//! and comes back with the result. `--sparse` skips the holes of an input file (SEEK_DATA) without reading them,
//! and writes no all-zero unit.
//!
//! Exit codes as SPDK's: a bad command line 2 (`Invalid arguments`) or 22 (EINVAL, the option checks); a copy
//! that fails stops the app with the negative errno, so the process exits with it modulo 256 (e.g. 228 for
//! `--count value too big`, -ENOSPC).

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bdev::{Completion, Desc, IoChannel, IoHandle, IoStatus};
use reactor::dma::DmaBuf;
use reactor::Poller;

mod dd_files;
use dd_files::FileIo;

const USAGE: &str = "\
spdk_dd [options]

[--------- DD Options ---------]
 --if Input file. Must specify either --if or --ib.
 --ib Input bdev. Must specifier either --if or --ib
 --of Output file. Must specify either --of or --ob.
 --ob Output bdev. Must specify either --of or --ob.
 --iflag Input file flags.
 --oflag Output file flags.
 --bs I/O unit size (default: 4096)
 --qd Queue depth (default: 2)
 --count I/O unit count. The number of I/O units to copy. (default: all)
 --skip Skip this many I/O units at start of input. (default: 0)
 --seek Skip this many I/O units at start of output. (default: 0)
 --aio Force usage of AIO. (by default io_uring is used if available)
 --sparse Enable hole skipping in input target
 Available iflag and oflag values:
  append - append mode
  direct - use direct I/O for data
  directory - fail unless a directory
  dsync - use synchronized I/O for data
  noatime - do not update access time
  noctty - do not assign controlling terminal from file
  nofollow - do not follow symlinks
  nonblock - use non-blocking I/O
  sync - use synchronized I/O for data and metadata

plus the common SPDK app options (--json, -m, --no-huge, -s, -L, ...); see spdk_tgt --help
";

/// The copy's options (SPDK's `g_opts`).
#[derive(Clone, Debug)]
struct DdOpts {
    input_file: Option<String>,
    output_file: Option<String>,
    input_bdev: Option<String>,
    output_bdev: Option<String>,
    iflag: Option<String>,
    oflag: Option<String>,
    bs: i64,
    qd: u32,
    count: i64,
    skip: u64,
    seek: u64,
    sparse: bool,
    /// `--aio`: file I/O on a helper thread instead of io_uring.
    aio: bool,
}

/// The flags `--iflag`/`--oflag` take, as open(2) flags.
const FLAGS: &[(&str, i32)] = &[
    ("append", libc::O_APPEND),
    ("direct", libc::O_DIRECT),
    ("directory", libc::O_DIRECTORY),
    ("dsync", libc::O_DSYNC),
    ("noatime", libc::O_NOATIME),
    ("noctty", libc::O_NOCTTY),
    ("nofollow", libc::O_NOFOLLOW),
    ("nonblock", libc::O_NONBLOCK),
    ("sync", libc::O_SYNC),
];

/// SPDK's `spdk_strtol` for the numeric options: a non-negative decimal, or a negative errno-like value that
/// the checks then refuse.
fn number(v: &str) -> i64 {
    v.parse::<i64>().ok().filter(|n| *n >= 0).unwrap_or(-1)
}

/// Splits the dd options off the command line; the rest goes to the app's parser. `Err(msg)`: a dd option
/// without its value.
fn parse(args: Vec<String>) -> Result<(DdOpts, Vec<String>), String> {
    let mut o = DdOpts {
        input_file: None,
        output_file: None,
        input_bdev: None,
        output_bdev: None,
        iflag: None,
        oflag: None,
        bs: 4096,
        qd: 2,
        count: 0,
        skip: 0,
        seek: 0,
        sparse: false,
        aio: false,
    };
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let Some(long) = a.strip_prefix("--") else {
            rest.push(a);
            continue;
        };
        let (name, inline) = match long.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (long.to_string(), None),
        };
        match name.as_str() {
            "aio" => {
                o.aio = true;
                continue;
            }
            "sparse" => {
                o.sparse = true;
                continue;
            }
            "if" | "of" | "ib" | "ob" | "iflag" | "oflag" | "bs" | "qd" | "count" | "skip"
            | "seek" => {}
            _ => {
                rest.push(a);
                continue;
            }
        }
        let v = match inline {
            Some(v) => v,
            None => it
                .next()
                .ok_or_else(|| format!("option '--{name}' requires an argument"))?,
        };
        match name.as_str() {
            "if" => o.input_file = Some(v),
            "of" => o.output_file = Some(v),
            "ib" => o.input_bdev = Some(v),
            "ob" => o.output_bdev = Some(v),
            "iflag" => o.iflag = Some(v),
            "oflag" => o.oflag = Some(v),
            "bs" => o.bs = number(&v),
            "qd" => o.qd = number(&v).clamp(0, u32::MAX as i64) as u32,
            "count" => o.count = number(&v),
            "skip" => o.skip = number(&v).max(0) as u64,
            "seek" => o.seek = number(&v).max(0) as u64,
            _ => unreachable!("matched above"),
        }
    }
    Ok((o, rest))
}

/// SPDK's checks before the app starts; the message and `EINVAL`.
fn check(o: &DdOpts) -> Result<(), &'static str> {
    if o.input_file.is_some() && o.input_bdev.is_some() {
        return Err("You may specify either --if or --ib, but not both.");
    }
    if o.output_file.is_some() && o.output_bdev.is_some() {
        return Err("You may specify either --of or --ob, but not both.");
    }
    if o.input_file.is_none() && o.input_bdev.is_none() {
        return Err("You must specify either --if or --ib");
    }
    if o.output_file.is_none() && o.output_bdev.is_none() {
        return Err("You must specify either --of or --ob");
    }
    if o.bs <= 0 {
        return Err("Invalid --bs value");
    }
    if o.count < 0 {
        return Err("Invalid --count value");
    }
    if o.output_file.is_none() && o.oflag.is_some() {
        return Err("--oflags may be used only with --of");
    }
    if o.input_file.is_none() && o.iflag.is_some() {
        return Err("--iflags may be used only with --if");
    }
    if o.qd == 0 {
        return Err("Invalid --qd value");
    }
    Ok(())
}

/// One side of the copy.
enum Side {
    File { file: Arc<File> },
    Bdev { _desc: Desc, ch: IoChannel },
}

struct End {
    side: Side,
    block_size: u32,
    total: u64,
    /// Byte offset the copy starts at.
    pos: u64,
}

/// One I/O unit in flight: its buffer (absent while the bdev layer or the file thread has it) and where it goes.
struct Unit {
    buf: Option<DmaBuf>,
    /// Bytes of the unit (the last may be short).
    len: usize,
    /// Offset within the copy.
    at: u64,
}

struct Job {
    input: End,
    output: End,
    output_file: bool,
    units: Vec<Unit>,
    bs: u64,
    copy_size: u64,
    next: u64,
    outstanding: usize,
    /// Copied so far, and since the last progress line.
    total_bytes: u64,
    incremental: u64,
    error: i32,
    /// The input file ended before the copy size (reads past it give 0 bytes).
    eof: bool,
    sparse: bool,
    started: Instant,
    /// File I/O, when a side is a file.
    files: Option<FileIo>,
    finish: Option<Box<dyn FnOnce(i32)>>,
    _pollers: Vec<Poller>,
}

thread_local! {
    static JOB: RefCell<Option<Job>> = const { RefCell::new(None) };
}

/// The exit code the app should end with (a negative errno, 0 when the copy worked).
static RESULT: AtomicI32 = AtomicI32::new(0);

fn open_flags(list: Option<&str>) -> Result<i32, String> {
    let mut f = 0;
    for name in list.into_iter().flat_map(|l| l.split(',')) {
        match FLAGS.iter().find(|(n, _)| *n == name) {
            Some((_, v)) => f |= v,
            None => return Err(format!("Unknown file flag: {name}")),
        }
    }
    Ok(f)
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The C library's text for errno `e` (as SPDK prints it, without Rust's "(os error N)").
fn strerror(e: i32) -> String {
    let s = std::io::Error::from_raw_os_error(e).to_string();
    match s.rfind(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Opens a file side as SPDK does: read-write, an output created (unless a directory is asked for) and truncated
/// (unless appending); its size 0 (a pipe, /dev/zero) means `bs * count`.
fn open_file(path: &str, flags: i32, input: bool, o: &DdOpts) -> Result<End, i32> {
    let mut oo = OpenOptions::new();
    oo.read(true).write(true).mode(0o600);
    let mut custom = flags;
    if !input && flags & libc::O_DIRECTORY == 0 {
        oo.create(true);
    }
    if !input && flags & libc::O_APPEND == 0 {
        oo.truncate(true);
    }
    if flags & libc::O_APPEND != 0 {
        oo.append(true);
        custom &= !libc::O_APPEND;
    }
    oo.custom_flags(custom);
    let f = oo.open(path).map_err(|e| {
        log::error!("Could not open file {path}: {}", strerror(errno_of(&e)));
        -errno_of(&e)
    })?;
    let meta = f.metadata().map_err(|e| -errno_of(&e))?;
    let mut total = meta.len();
    if total == 0 {
        total = o.bs as u64 * o.count as u64;
    }
    Ok(End {
        side: Side::File { file: Arc::new(f) },
        block_size: 1,
        total,
        pos: 0,
    })
}

fn open_bdev(name: &str) -> Result<End, i32> {
    let desc = bdev::open(name, true, None).map_err(|e| {
        let errno = e.errno();
        log::error!("Could not open bdev {name}: {}", strerror(errno));
        -errno
    })?;
    let (bs, blocks) = (desc.bdev().block_size(), desc.bdev().num_blocks());
    let ch = desc.channel();
    Ok(End {
        side: Side::Bdev { _desc: desc, ch },
        block_size: bs,
        total: blocks * bs as u64,
        pos: 0,
    })
}

/// Sets the job up as SPDK's `dd_run` does (same checks, same messages); a negative errno when it cannot run.
fn setup(o: &DdOpts, finish: Box<dyn FnOnce(i32)>) -> Result<(), i32> {
    let mut input = match (&o.input_file, &o.input_bdev) {
        (Some(p), _) => {
            let flags = open_flags(o.iflag.as_deref()).map_err(|m| {
                log::error!("{m}");
                -libc::EINVAL
            })?;
            open_file(p, flags, true, o).inspect_err(|e| {
                log::error!("{p}: {}", strerror(-e));
            })?
        }
        (None, Some(b)) => open_bdev(b).inspect_err(|e| log::error!("{b}: {}", strerror(-e)))?,
        _ => return Err(-libc::EINVAL),
    };
    let bs = o.bs as u64;
    let write_size = o.count as u64 * bs;
    input.pos = o.skip * bs;
    if o.input_bdev.is_some() && input.pos > input.total {
        log::error!(
            "--skip value too big ({}) - only {} blocks available in input",
            o.skip,
            input.total / bs
        );
        return Err(-libc::ENOSPC);
    }
    if o.count != 0 && o.input_bdev.is_some() && write_size + input.pos > input.total {
        log::error!(
            "--count value too big ({}) - only {} blocks available from input",
            o.count,
            (input.total - input.pos) / bs
        );
        return Err(-libc::ENOSPC);
    }
    let copy_size = if o.count != 0 {
        write_size
    } else {
        input.total.saturating_sub(input.pos)
    };
    let mut output = match (&o.output_file, &o.output_bdev) {
        (Some(p), _) => {
            let flags = open_flags(o.oflag.as_deref()).map_err(|m| {
                log::error!("{m}");
                -libc::EINVAL
            })?;
            open_file(p, flags, false, o).inspect_err(|e| {
                log::error!("{p}: {}", strerror(-e));
            })?
        }
        (None, Some(b)) => open_bdev(b).inspect_err(|e| log::error!("{b}: {}", strerror(-e)))?,
        _ => return Err(-libc::EINVAL),
    };
    output.pos = o.seek * bs;
    if o.output_bdev.is_some() {
        if output.pos > output.total {
            log::error!(
                "--seek value too big ({}) - only {} blocks available in output",
                o.seek,
                output.total / bs
            );
            return Err(-libc::ENOSPC);
        }
        if o.count != 0 && write_size + output.pos > output.total {
            log::error!(
                "--count value too big ({}) - only {} blocks available in output",
                o.count,
                (output.total - output.pos) / bs
            );
            return Err(-libc::ENOSPC);
        }
        if o.count == 0 && copy_size + output.pos > output.total {
            log::error!(
                "the input ({copy_size} bytes) does not fit in the output from --seek on ({} bytes)",
                output.total - output.pos
            );
            return Err(-libc::ENOSPC);
        }
    }
    if output.block_size as u64 > bs || input.block_size as u64 > bs {
        log::error!(
            "--bs value cannot be less than input ({}) neither output ({}) native block size",
            input.block_size,
            output.block_size
        );
        return Err(-libc::EINVAL);
    }
    if !bs.is_multiple_of(input.block_size as u64) {
        log::error!(
            "--bs value must be a multiple of input native block size ({})",
            input.block_size
        );
        return Err(-libc::EINVAL);
    }
    // As SPDK: no more units in flight than there are to copy.
    let qd = (o.qd as u64).min(copy_size.div_ceil(bs)).max(1) as usize;
    let mut units = Vec::with_capacity(qd);
    for _ in 0..qd {
        let buf = DmaBuf::alloc(bs as usize).map_err(|_| {
            log::error!("{} - try smaller block size value", strerror(libc::ENOMEM));
            -libc::ENOMEM
        })?;
        units.push(Unit {
            buf: Some(buf),
            len: 0,
            at: 0,
        });
    }
    let files = if o.input_file.is_some() || o.output_file.is_some() {
        Some(FileIo::new(qd, o.aio).map_err(|e| -errno_of(&e))?)
    } else {
        None
    };
    // Kept across polls: reaping allocates nothing once it has held `qd` answers.
    let mut done = Vec::with_capacity(qd);
    let files_poller = Poller::register("spdk_dd_files", 0, move || {
        JOB.with(|j| {
            if let Some(f) = j.borrow_mut().as_mut().and_then(|j| j.files.as_mut()) {
                f.reap(&mut done);
            }
        });
        let any = !done.is_empty();
        for (slot, write, n, buf) in done.drain(..) {
            file_done(slot, write, n, buf);
        }
        any
    });
    let progress = Poller::register("spdk_dd_status", 1_000_000, || {
        JOB.with(|j| {
            if let Some(j) = j.borrow_mut().as_mut() {
                show_progress(j, false);
            }
        });
        false
    });
    let job = Job {
        input,
        output,
        output_file: o.output_file.is_some(),
        units,
        bs,
        copy_size,
        next: 0,
        outstanding: 0,
        total_bytes: 0,
        incremental: 0,
        error: 0,
        eof: false,
        sparse: o.sparse,
        started: Instant::now(),
        files,
        finish: Some(finish),
        _pollers: vec![files_poller, progress],
    };
    JOB.with(|j| *j.borrow_mut() = Some(job));
    for slot in 0..qd {
        start(slot);
    }
    maybe_finish();
    Ok(())
}

/// Starts the next unit in `slot`: its read.
fn start(slot: usize) {
    let go = JOB.with(|j| {
        let mut j = j.borrow_mut();
        let j = j.as_mut()?;
        if j.sparse {
            skip_hole(j);
        }
        if j.error != 0 || j.eof || j.next >= j.copy_size {
            return None;
        }
        let len = (j.copy_size - j.next).min(j.bs) as usize;
        let at = j.next;
        j.next += len as u64;
        let u = &mut j.units[slot];
        u.len = len;
        u.at = at;
        let buf = u.buf.take()?;
        j.outstanding += 1;
        Some(submit(
            &j.input,
            j.files.as_mut(),
            slot,
            false,
            j.input.pos + at,
            len,
            buf,
        ))
    });
    if let Some(Err(e)) = go {
        fail(e);
    }
}

/// `--sparse` from a file: moves the next unit past the input's hole, if it starts in one (whole units only: a
/// unit holding any data is read, and written unless it is all zeroes). The output gets the holes: a skipped
/// unit is never written, and the output file is given its full length at the end.
fn skip_hole(j: &mut Job) {
    let Side::File { file } = &j.input.side else {
        return;
    };
    let at = j.input.pos + j.next;
    // SAFETY: lseek on a descriptor we own moves no memory; SEEK_DATA only reports where data starts.
    let data = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
    let data = if data >= 0 {
        data as u64
    } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
        // No data past `at`: the rest of the input is a hole.
        u64::MAX
    } else {
        // The file system cannot say (or seeking failed): read everything, as without holes.
        return;
    };
    let rel = data.saturating_sub(j.input.pos).min(j.copy_size);
    let unit_start = rel - rel % j.bs;
    if unit_start > j.next {
        let skipped = unit_start - j.next;
        j.next = unit_start;
        j.incremental += skipped;
    }
}

/// Sends one read or write of `len` bytes at byte `off` of `end`; a bdev write of a short last unit covers whole
/// blocks (the tail of the buffer zeroed).
fn submit(
    end: &End,
    files: Option<&mut FileIo>,
    slot: usize,
    write: bool,
    off: u64,
    len: usize,
    mut buf: DmaBuf,
) -> Result<(), i32> {
    match &end.side {
        Side::File { file } => match files {
            Some(f) => f.submit(file, slot, write, off, len, buf),
            None => Err(-libc::EIO),
        },
        Side::Bdev { ch, .. } => {
            let bs = end.block_size as u64;
            let blocks = (len as u64).div_ceil(bs);
            if write && len < buf.len() {
                let whole = (blocks * bs) as usize;
                buf.as_mut_slice()[len..whole].fill(0);
            }
            let cb = if write {
                Completion::Fn(bdev_write_done)
            } else {
                Completion::Fn(bdev_read_done)
            };
            let r = if write {
                ch.write(buf, off / bs, blocks, cb, slot as u64)
            } else {
                ch.read(buf, off / bs, blocks, cb, slot as u64)
            };
            r.map_err(|e| -e.errno())
        }
    }
}

fn bdev_read_done(mut io: IoHandle) {
    let slot = io.ctx as usize;
    let ok = io.status() == IoStatus::Success;
    let buf = io.take_buf();
    drop(io);
    match (ok, buf) {
        (true, Some(b)) => read_done(slot, None, b),
        (_, b) => {
            JOB.with(|j| {
                if let (Some(j), Some(b)) = (j.borrow_mut().as_mut(), b) {
                    j.units[slot].buf = Some(b);
                }
            });
            fail(-libc::EIO)
        }
    }
}

fn bdev_write_done(mut io: IoHandle) {
    let slot = io.ctx as usize;
    let ok = io.status() == IoStatus::Success;
    let buf = io.take_buf();
    drop(io);
    JOB.with(|j| {
        if let (Some(j), Some(b)) = (j.borrow_mut().as_mut(), buf) {
            j.units[slot].buf = Some(b);
        }
    });
    if ok {
        write_done(slot)
    } else {
        fail(-libc::EIO)
    }
}

/// A file request came back: a read (maybe short at the end of the file) or a write.
fn file_done(slot: usize, write: bool, n: i64, buf: DmaBuf) {
    if n < 0 || write {
        JOB.with(|j| {
            if let Some(j) = j.borrow_mut().as_mut() {
                j.units[slot].buf = Some(buf);
            }
        });
        return if n < 0 {
            fail(n as i32)
        } else {
            write_done(slot)
        };
    }
    read_done(slot, Some(n as usize), buf)
}

/// A unit's data is in: written out (skipped when sparse and all zeroes).
fn read_done(slot: usize, got: Option<usize>, buf: DmaBuf) {
    let go = JOB.with(|j| {
        let mut j = j.borrow_mut();
        let j = j.as_mut()?;
        let u = &mut j.units[slot];
        if let Some(n) = got {
            if n < u.len {
                // The input file ended: this is the last unit.
                u.len = n;
                j.eof = true;
                j.copy_size = u.at + n as u64;
            }
        }
        let (len, at) = (u.len, u.at);
        if len == 0 || (j.sparse && buf.as_slice()[..len].iter().all(|b| *b == 0)) {
            j.units[slot].buf = Some(buf);
            return Some(None);
        }
        Some(Some(submit(
            &j.output,
            j.files.as_mut(),
            slot,
            true,
            j.output.pos + at,
            len,
            buf,
        )))
    });
    match go {
        Some(None) => write_done(slot),
        Some(Some(Err(e))) => fail(e),
        _ => {}
    }
}

/// A unit is copied: the next one goes in its slot.
fn write_done(slot: usize) {
    JOB.with(|j| {
        if let Some(j) = j.borrow_mut().as_mut() {
            j.outstanding -= 1;
            let len = j.units[slot].len as u64;
            j.incremental += len;
        }
    });
    start(slot);
    maybe_finish();
}

/// A unit failed with `errno` (negative): the copy stops once nothing is in flight.
fn fail(errno: i32) {
    JOB.with(|j| {
        if let Some(j) = j.borrow_mut().as_mut() {
            log::error!("{}", strerror(-errno));
            if j.error == 0 {
                j.error = errno;
            }
            j.outstanding = j.outstanding.saturating_sub(1);
        }
    });
    maybe_finish();
}

/// Once nothing is in flight and nothing is left: an output file gets its full length (a sparse copy may end
/// in a hole), the last progress line is printed, and the app stops with the result.
fn maybe_finish() {
    let finished = JOB.with(|j| {
        let mut j = j.borrow_mut();
        let jb = j.as_mut()?;
        let left = jb.error == 0 && !jb.eof && jb.next < jb.copy_size;
        if jb.outstanding > 0 || left {
            return None;
        }
        let mut err = jb.error;
        if err == 0 && jb.output_file {
            if let Side::File { file, .. } = &jb.output.side {
                let want = jb.copy_size + jb.output.pos;
                match file.metadata() {
                    Ok(m) if m.len() < want => {
                        if let Err(e) = file.set_len(want) {
                            log::error!(
                                "Could not truncate output file for finalize: {}",
                                strerror(errno_of(&e))
                            );
                            err = -errno_of(&e);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        log::error!(
                            "Could not seek output file for finalize: {}",
                            strerror(errno_of(&e))
                        );
                        err = -errno_of(&e);
                    }
                }
            }
        }
        if err == 0 {
            show_progress(jb, true);
            println!("\n");
        }
        let finish = jb.finish.take();
        let job = j.take();
        Some((finish, err, job))
    });
    if let Some((Some(f), err, job)) = finished {
        drop(job);
        f(err);
    }
}

/// SPDK's progress line: copied / total in a unit that keeps the numbers short, and the speed (the average
/// over the whole copy at the end).
fn show_progress(j: &mut Job, finish: bool) {
    let units = ["", "k", "M", "G", "T"];
    let mut size = j.incremental;
    j.incremental = 0;
    j.total_bytes += size;
    let ms = if finish {
        size = j.total_bytes;
        (j.started.elapsed().as_millis() as u64).max(1)
    } else {
        1000
    };
    let scale = |v: u64| {
        let (mut t, mut unit, mut i) = (v, 1u64, 0);
        while t > 1024 * 10 && i < 4 {
            t >>= 10;
            unit <<= 10;
            i += 1;
        }
        (unit, units[i])
    };
    let (su, sname) = scale(size);
    let speed = size * 1000 / ms;
    let (vu, vname) = scale(speed);
    use std::io::Write;
    print!(
        "\x1b[2K\rCopying: {}/{} [{sname}B] ({}{} {vname}Bps)",
        j.total_bytes / su,
        j.copy_size / su,
        if finish { "average " } else { "" },
        speed / vu
    );
    let _ = std::io::stdout().flush();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{USAGE}");
        return;
    }
    let (dd, rest) = match parse(args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("spdk_dd: {e}");
            eprintln!("spdk_dd: Invalid arguments");
            std::process::exit(2);
        }
    };
    let mut app_opts = match app::cli::parse(rest) {
        Ok(app::cli::Action::Run(a)) => *a,
        Ok(_) => {
            print!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("spdk_dd: {}", e.0);
            eprintln!("spdk_dd: Invalid arguments");
            std::process::exit(2);
        }
    };
    if let Err(m) = check(&dd) {
        eprintln!("spdk_dd: {m}");
        std::process::exit(libc::EINVAL);
    }
    app_opts.no_rpc_server = true;
    let hooks = app::Hooks {
        register: None,
        on_ready: Some(Box::new(move |t: Rc<app::Target>| {
            let t2 = t.clone();
            let done = Box::new(move |rc: i32| {
                RESULT.store(rc, Ordering::SeqCst);
                t2.shutdown();
            });
            if let Err(rc) = setup(&dd, done) {
                RESULT.store(rc, Ordering::SeqCst);
                JOB.with(|j| j.borrow_mut().take());
                t.shutdown();
            }
        })),
    };
    if let Err(e) = app::run_with(app_opts, app::bdev_subsystems(), hooks) {
        eprintln!("spdk_dd: {e}");
        eprintln!("spdk_dd: Error occurred while performing copy");
        std::process::exit(1);
    }
    let rc = RESULT.load(Ordering::SeqCst);
    if rc != 0 {
        eprintln!("spdk_dd: Error occurred while performing copy");
        // As SPDK's main returns the app's negative result: the exit status is it modulo 256.
        std::process::exit(rc & 0xff);
    }
}
