//! Aborts that name their target, range locks that wait only for the I/O they cover, copies (the module's own
//! and the layer's emulation) and NVMe commands passed through virtual bdevs, on real reactors.

mod common;
use common::*;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bdev::modules::error::{self, ErrorType, InjectOpts};
use bdev::modules::{passthru, uring};
use bdev::{
    Bdev, BdevOps, BdevParams, Completion, IoHandle, IoStatus, IoType, ModuleChannel, NvmeCmd,
    NvmeStatus,
};
use reactor::dma::DmaBuf;

type Log = Arc<Mutex<Vec<(String, IoStatus)>>>;

/// A completion that notes `what` and the status in `log`.
fn rec(log: &Log, what: &str) -> Completion {
    let (log, what) = (log.clone(), what.to_string());
    Completion::Closure(Box::new(move |io: IoHandle| {
        log.lock().unwrap().push((what, io.status()))
    }))
}

/// Waits until `log` holds `n` entries and returns them sorted (completions of one abort may come in either
/// order).
fn wait_for(log: &Log, n: usize) -> Vec<(String, IoStatus)> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        {
            let l = log.lock().unwrap();
            if l.len() >= n {
                let mut v = l.clone();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                return v;
            }
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {n} completions: {:?}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn entry(what: &str, st: IoStatus) -> (String, IoStatus) {
    (what.to_string(), st)
}

fn inject_pending(bdev: &str, io_type: &str, num: u32) {
    let (bdev, io_type) = (bdev.to_string(), io_type.to_string());
    app(move || {
        error::inject_error(
            &bdev,
            InjectOpts {
                num,
                ..InjectOpts::new(&io_type, ErrorType::Pending)
            },
        )
        .map_err(|e| e.to_string())
    })
    .unwrap();
}

/// Submits a read (owned buffer) of `blocks` at `offset` on `name` with context `ctx`.
fn read_ctx(name: &str, offset: u64, blocks: u64, ctx: u64, log: &Log, what: &str) {
    let (name, log, what) = (name.to_string(), log.clone(), what.to_string());
    app(move || {
        let cb = rec(&log, &what);
        let ch = chan(&name, true);
        let buf = DmaBuf::alloc((blocks * ch.bdev().block_size() as u64) as usize).unwrap();
        ch.read(buf, offset, blocks, cb, ctx).unwrap();
    });
}

fn write_ctx(name: &str, offset: u64, data: Vec<u8>, ctx: u64, log: &Log, what: &str) {
    let (name, log, what) = (name.to_string(), log.clone(), what.to_string());
    app(move || {
        let cb = rec(&log, &what);
        let ch = chan(&name, true);
        let blocks = data.len() as u64 / ch.bdev().block_size() as u64;
        let mut buf = DmaBuf::alloc(data.len()).unwrap();
        buf.as_mut_slice().copy_from_slice(&data);
        ch.write(buf, offset, blocks, cb, ctx).unwrap();
    });
}

fn abort(name: &str, target: u64, log: &Log, what: &str) {
    let (name, log, what) = (name.to_string(), log.clone(), what.to_string());
    app(move || {
        chan(&name, true)
            .abort(target, rec(&log, &what), 0)
            .unwrap()
    });
}

fn read_bytes(name: &str, offset: u64, blocks: u64) -> Vec<u8> {
    let (st, data) = io_wait(name, IoType::Read, offset, blocks, None);
    assert_eq!(st, IoStatus::Success);
    data
}

fn io_wait(
    name: &str,
    t: IoType,
    offset: u64,
    blocks: u64,
    data: Option<Vec<u8>>,
) -> (IoStatus, Vec<u8>) {
    let name = name.to_string();
    on_app(move |reply| {
        submit(
            &chan(&name, true),
            t,
            offset,
            blocks,
            data,
            reply as Box<dyn FnOnce(_)>,
        )
    })
}

/// Asks for a range lock (quiescing reads too with `quiesce`); the id lands in the returned slot once taken.
fn lock(name: &str, offset: u64, len: u64, quiesce: bool) -> Arc<Mutex<Option<u64>>> {
    let got = Arc::new(Mutex::new(None));
    let (g, name) = (got.clone(), name.to_string());
    app(move || {
        let b = bdev::get(&name).unwrap();
        let done = move |id| *g.lock().unwrap() = Some(id);
        if quiesce {
            b.quiesce_lba_range(offset, len, done);
        } else {
            b.lock_lba_range(offset, len, done);
        }
    });
    got
}

fn wait_locked(l: &Arc<Mutex<Option<u64>>>) -> u64 {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(id) = *l.lock().unwrap() {
            return id;
        }
        assert!(Instant::now() < end, "range lock not taken");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn unlock(name: &str, id: u64) {
    let name = name.to_string();
    on_app(move |reply| {
        bdev::get(&name)
            .unwrap()
            .unlock_lba_range(id, move || reply(()))
    })
}

#[test]
fn abort_names_its_target_through_stacked_bdevs() {
    with_reactors("0x1", || {
        // passthru -> error -> error (holds reads pending) -> malloc: the passthru forwards its descriptor,
        // the outer error bdev sends a child of its own, so the abort has to be carried across both kinds.
        create_malloc("AbM", 1024);
        app(|| {
            error::create("AbM", None)?;
            error::create("EE_AbM", None)?;
            passthru::create("EE_EE_AbM", "AbP", None)
        })
        .unwrap();
        inject_pending("EE_AbM", "read", 2);
        let log: Log = Arc::default();
        read_ctx("AbP", 0, 8, 7, &log, "read7");
        read_ctx("AbP", 8, 8, 8, &log, "read8");
        std::thread::sleep(Duration::from_millis(50));
        assert!(log.lock().unwrap().is_empty(), "the reads are held pending");

        abort("AbP", 7, &log, "abort7");
        assert_eq!(
            wait_for(&log, 2),
            vec![
                entry("abort7", IoStatus::Success),
                entry("read7", IoStatus::Aborted)
            ]
        );
        // Nothing has context 99: the abort fails and read 8 is left alone.
        abort("AbP", 99, &log, "abort99");
        assert_eq!(
            wait_for(&log, 3)[1],
            entry("abort99", IoStatus::Failed(libc::ENOENT))
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(log.lock().unwrap().len(), 3);

        abort("AbP", 8, &log, "abort8");
        let got = wait_for(&log, 5);
        assert!(got.contains(&entry("abort8", IoStatus::Success)));
        assert!(got.contains(&entry("read8", IoStatus::Aborted)));
        // The stack serves on.
        read_bytes("AbP", 0, 8);
    });
}

#[test]
fn abort_reaches_io_waiting_for_a_range_lock() {
    with_reactors("0x1", || {
        create_malloc("AlM", 64);
        let before = pattern(1, 4096);
        assert_eq!(
            io_wait("AlM", IoType::Write, 0, 8, Some(before.clone())).0,
            IoStatus::Success
        );
        let id = wait_locked(&lock("AlM", 0, 8, false));
        let log: Log = Arc::default();
        write_ctx("AlM", 0, pattern(2, 4096), 5, &log, "write5");
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            log.lock().unwrap().is_empty(),
            "the write waits for the lock"
        );
        abort("AlM", 5, &log, "abort5");
        assert_eq!(
            wait_for(&log, 2),
            vec![
                entry("abort5", IoStatus::Success),
                entry("write5", IoStatus::Aborted)
            ]
        );
        unlock("AlM", id);
        assert_eq!(
            read_bytes("AlM", 0, 8),
            before,
            "the aborted write never ran"
        );
    });
}

#[test]
fn range_locks_wait_only_for_the_io_they_cover() {
    with_reactors("0x1", || {
        create_malloc("RlM", 1024);
        app(|| error::create("RlM", None).map(|_| ())).unwrap();
        let e = "EE_RlM";
        // One write and one read held by the error bdev: the write at 100..108, the read at 200..208.
        inject_pending(e, "write", 1);
        let log: Log = Arc::default();
        write_ctx(e, 100, pattern(3, 4096), 1, &log, "write");
        inject_pending(e, "read", 1);
        read_ctx(e, 200, 8, 2, &log, "read");

        // Elsewhere on the bdev a lock is taken at once, and I/O flows meanwhile.
        let id = wait_locked(&lock(e, 0, 8, false));
        assert_eq!(io_wait(e, IoType::Read, 500, 8, None).0, IoStatus::Success);
        unlock(e, id);
        // A write lock over the held read does not wait for it; a quiesce does.
        let id = wait_locked(&lock(e, 200, 8, false));
        unlock(e, id);
        let q = lock(e, 204, 8, true);
        let w = lock(e, 96, 8, false);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            q.lock().unwrap().is_none(),
            "the quiesce waits for the held read"
        );
        assert!(
            w.lock().unwrap().is_none(),
            "the lock waits for the held write"
        );
        // A read elsewhere still goes through while both wait.
        assert_eq!(io_wait(e, IoType::Read, 600, 8, None).0, IoStatus::Success);

        // A reset of the error bdev fails what it holds: both locks are taken.
        assert_eq!(io_wait(e, IoType::Reset, 0, 0, None).0, IoStatus::Success);
        let (qid, wid) = (wait_locked(&q), wait_locked(&w));
        let got = wait_for(&log, 2);
        assert_eq!(got[0], entry("read", IoStatus::Failed(libc::EIO)));
        assert_eq!(got[1], entry("write", IoStatus::Failed(libc::EIO)));
        // Held by the quiesce: a read of its range waits until it goes.
        read_ctx(e, 206, 2, 3, &log, "read_in_quiesce");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(log.lock().unwrap().len(), 2);
        unlock(e, qid);
        assert_eq!(
            wait_for(&log, 3)[1],
            entry("read_in_quiesce", IoStatus::Success)
        );
        unlock(e, wid);
    });
}

/// What copying `n` blocks of `bs` bytes from `src` to `dst` leaves in `disk`, as through a whole buffer.
fn expected_copy(disk: &[u8], bs: usize, dst: usize, src: usize, n: usize) -> Vec<u8> {
    let mut out = disk.to_vec();
    out.copy_within(src * bs..(src + n) * bs, dst * bs);
    out
}

fn copy(name: &str, dst: u64, src: u64, n: u64, writable: bool) -> IoStatus {
    let name = name.to_string();
    on_app(move |reply| {
        let cb = Completion::Closure(Box::new(move |io: IoHandle| reply(io.status())));
        chan(&name, writable).copy(dst, src, n, cb, 0).unwrap();
    })
}

/// Copies on `name` (blocks of 512 bytes, at least 640 of them) in both directions with overlap, and checks
/// each against the same copy done in memory.
fn check_copies(name: &str) {
    let bs = 512usize;
    let mut disk = pattern(9, 640 * bs);
    assert_eq!(
        io_wait(name, IoType::Write, 0, 640, Some(disk.clone())).0,
        IoStatus::Success
    );
    // Forward with overlap (a naive piecewise copy would re-read what it wrote), backward with overlap, apart,
    // larger than one emulation piece, in place, empty.
    for (dst, src, n) in [
        (16, 0, 300),
        (0, 40, 500),
        (600, 3, 40),
        (7, 7, 9),
        (5, 1, 0),
    ] {
        assert_eq!(
            copy(name, dst, src, n, true),
            IoStatus::Success,
            "copy {src}->{dst} x{n}"
        );
        disk = expected_copy(&disk, bs, dst as usize, src as usize, n as usize);
        assert_eq!(
            read_bytes(name, 0, 640),
            disk,
            "after copy {src}->{dst} x{n}"
        );
    }
    // Bad copies fail with SPDK's errnos and change nothing.
    assert_eq!(copy(name, 0, 639, 2, true), IoStatus::Failed(libc::EINVAL));
    assert_eq!(copy(name, 639, 0, 2, true), IoStatus::Failed(libc::EINVAL));
    assert_eq!(copy(name, 0, 8, 8, false), IoStatus::Failed(libc::EBADF));
    assert_eq!(read_bytes(name, 0, 640), disk);
}

#[test]
fn copies_native_and_emulated_match_a_copy_in_memory() {
    let dir = std::env::temp_dir().join(format!("bdev-copy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("disk");
    std::fs::write(&file, vec![0u8; 640 * 512]).unwrap();
    let path = file.to_string_lossy().to_string();
    with_reactors("0x1", move || {
        // malloc copies itself; a passthru over it hands the copy down with its source.
        create_malloc("CpM", 640);
        app(|| passthru::create("CpM", "CpP", None)).unwrap();
        let supported =
            app(|| ["CpM", "CpP"].map(|n| bdev::get(n).unwrap().io_type_supported(IoType::Copy)));
        assert_eq!(supported, [true, true]);
        check_copies("CpP");
        // A file bdev has no copy of its own: the layer reads and writes.
        let p = path.clone();
        app(move || {
            uring::create(uring::UringOpts {
                name: "CpU".into(),
                filename: p,
                ..Default::default()
            })
            .map(|b| b.io_type_supported(IoType::Copy))
        })
        .map(|native| assert!(!native))
        .unwrap();
        check_copies("CpU");
        let iostat = app(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            bdev::get("CpU")
                .unwrap()
                .get_iostat(move |s| tx.send(s).unwrap());
            rx
        })
        .recv_timeout(Duration::from_secs(5))
        .unwrap();
        assert!(
            iostat.read.ops > 1 && iostat.write.ops > 1,
            "the emulated copies read and wrote"
        );
    });
    let _ = std::fs::remove_dir_all(dir);
}

/// A bdev that answers NVMe commands as a drive would: dword 0 echoes CDW10, the status comes from CDW11
/// (status code type in bits 8..11, code in bits 0..8), and a read-type command fills its buffer.
struct FakeNvme;
struct FakeNvmeCh;

impl BdevOps for FakeNvme {
    fn module_name(&self) -> &'static str {
        "fake_nvme"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(t, IoType::Read | IoType::NvmeIo | IoType::NvmeAdmin)
    }
    fn create_channel(&self, _b: &Bdev) -> Box<dyn ModuleChannel> {
        Box::new(FakeNvmeCh)
    }
}

impl ModuleChannel for FakeNvmeCh {
    fn submit(&mut self, mut io: IoHandle) {
        let Some(cmd) = io.nvme_cmd().copied() else {
            io.complete(IoStatus::Success);
            return;
        };
        let fill = vec![cmd.opcode(); io.iovs().iter().map(|v| v.len).sum()];
        io.copy_in(&fill);
        let st = NvmeStatus::new((cmd.0[11] >> 8) as u8 & 7, cmd.0[11] as u8);
        io.complete_nvme(cmd.0[10], st);
    }
}

#[test]
fn nvme_commands_pass_through_virtual_bdevs_unchanged() {
    with_reactors("0x1", || {
        app(|| {
            bdev::register(BdevParams::new("FkN", 512, 1024), Box::new(FakeNvme))?;
            bdev::register(BdevParams::new("FkN2", 512, 1024), Box::new(FakeNvme))?;
            error::create("FkN2", None)?;
            passthru::create("EE_FkN2", "FkP", None)
        })
        .unwrap();
        // Straight to the module, and through a passthru (forwards its descriptor) over an error bdev (sends
        // a child of its own).
        for name in ["FkN", "FkP"] {
            for (admin, sct, sc) in [
                (false, 0u32, 0u32),
                (true, 0, 0),
                (false, 2, 0x81),
                (true, 1, 0x0b),
            ] {
                let n = name.to_string();
                let (st, cdw0, data) = on_app(move |reply| {
                    let mut cmd = NvmeCmd::default();
                    cmd.0[0] = if admin { 0x06 } else { 0x02 };
                    cmd.0[1] = 1;
                    cmd.0[10] = 0xfeed_0000 | sc;
                    cmd.0[11] = sct << 8 | sc;
                    let buf = DmaBuf::alloc(4096).unwrap();
                    let iov = [bdev::IoVec {
                        base: buf.as_ptr(),
                        len: 4096,
                    }];
                    let cb = Completion::Closure(Box::new(move |io: IoHandle| {
                        let data = buf.as_slice()[..8].to_vec();
                        reply((io.status(), io.nvme_cdw0(), data))
                    }));
                    let ch = chan(&n, true);
                    // SAFETY: `buf` lives in the callback, which runs once the command is done.
                    unsafe {
                        if admin {
                            ch.nvme_admin_passthru(&cmd, &iov, cb, 0)
                        } else {
                            ch.nvme_io_passthru(&cmd, &iov, cb, 0)
                        }
                    }
                    .unwrap();
                });
                let want = if sct == 0 && sc == 0 {
                    IoStatus::Success
                } else {
                    IoStatus::Nvme(NvmeStatus::new(sct as u8, sc as u8))
                };
                assert_eq!(st, want, "{name} admin={admin}");
                assert_eq!(cdw0, 0xfeed_0000 | sc, "{name}: dword 0");
                assert_eq!(
                    data,
                    vec![if admin { 0x06 } else { 0x02 }; 8],
                    "{name}: data"
                );
            }
        }
        // A read-only descriptor cannot pass commands (they are not decoded).
        let st = on_app(|reply| {
            let cb = Completion::Closure(Box::new(move |io: IoHandle| reply(io.status())));
            // SAFETY: no buffers.
            unsafe { chan("FkP", false).nvme_io_passthru(&NvmeCmd::default(), &[], cb, 0) }
                .unwrap();
        });
        assert_eq!(st, IoStatus::Failed(libc::EBADF));
        let types = app(|| bdev::get("FkP").unwrap().info_json()["supported_io_types"].clone());
        assert_eq!(
            (types["nvme_io"].as_bool(), types["nvme_admin"].as_bool()),
            (Some(true), Some(true))
        );
    });
}
