//! uring / aio bdevs on real files, driven through real reactors.
//!
//! Each test body runs on a plain OS thread and hands work to the app thread with `on_app`, waiting for the
//! reply, so the test reads top to bottom while I/O runs (and completes) on the reactor.

mod common;
use common::*;

use std::cell::{Cell, RefCell};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use bdev::modules::uring::{self, UringOpts, MODULE_AIO, MODULE_URING};
use bdev::{Completion, ErrorKind, IoHandle, IoStatus, IoType, IoVec};
use reactor::dma::DmaBuf;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------------------------
// Harness

/// Submits one I/O on the app thread and waits for it: (status, data read back).
fn io(
    name: &str,
    t: IoType,
    offset: u64,
    blocks: u64,
    data: Option<Vec<u8>>,
) -> (IoStatus, Vec<u8>) {
    let name = name.to_string();
    on_app(move |reply| submit(&chan(&name, true), t, offset, blocks, data, reply))
}

fn write(name: &str, offset: u64, data: &[u8]) -> IoStatus {
    let bs = block_size(name) as u64;
    io(
        name,
        IoType::Write,
        offset,
        data.len() as u64 / bs,
        Some(data.to_vec()),
    )
    .0
}

fn read(name: &str, offset: u64, blocks: u64) -> Vec<u8> {
    let (st, d) = io(name, IoType::Read, offset, blocks, None);
    assert_eq!(
        st,
        IoStatus::Success,
        "read of {blocks} blocks at {offset} on {name}"
    );
    d
}

fn block_size(name: &str) -> u32 {
    bdev::get(name).expect("bdev exists").block_size()
}

fn create(opts: UringOpts) -> bdev::Result<bdev::Bdev> {
    app(move || uring::create(opts))
}

fn delete(name: &str, module: &'static str) -> bdev::Result<()> {
    let name = name.to_string();
    on_app(move |reply| uring::delete(&name, module, reply))
}

fn info(name: &str) -> Value {
    bdev::get(name).expect("bdev exists").info_json()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(under: &str) -> TempDir {
        let p = Path::new(under).join(format!(
            "bdev-uring-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A sparse file of `size` bytes.
    fn file(&self, name: &str, size: u64) -> String {
        let p = self.0.join(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p.to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn opts(name: &str, filename: &str) -> UringOpts {
    UringOpts {
        name: name.into(),
        filename: filename.into(),
        ..Default::default()
    }
}

fn file_bytes(path: &str, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, offset).unwrap();
    v
}

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------------------------
// Tests

#[test]
fn uring_read_write_flush_and_file_contents() {
    with_reactors("0x1", || {
        let dir = TempDir::new("/var/tmp");
        let path = dir.file("disk", 8 * MIB);
        let b = create(opts("uring_rw", &path)).unwrap();
        assert_eq!(b.block_size(), 512);
        assert_eq!(b.num_blocks(), 8 * MIB / 512);
        assert_eq!(b.module_name(), MODULE_URING);
        assert_eq!(b.params().product_name, "URING bdev");
        assert_eq!(b.params().required_alignment, 512);

        let i = info("uring_rw");
        assert_eq!(i["driver_specific"]["uring"]["filename"], path.as_str());
        let st = &i["supported_io_types"];
        for t in ["read", "write", "flush", "reset", "unmap", "write_zeroes"] {
            assert_eq!(st[t], true, "{t} supported on a file");
        }
        assert_eq!(st["compare"], false);
        let cfg = b.write_config().unwrap();
        assert_eq!(cfg["method"], "bdev_uring_create");
        assert_eq!(cfg["params"]["name"], "uring_rw");
        assert_eq!(cfg["params"]["filename"], path.as_str());
        assert_eq!(cfg["params"]["block_size"], 512);
        assert_eq!(cfg["params"]["uuid"], b.uuid().to_string());

        // Writes at the start, the middle and the very end, read back through the bdev and from the file.
        let last = b.num_blocks() - 1;
        for (seed, off, blocks) in [
            (1u32, 0u64, 8u64),
            (2, 1000, 64),
            (3, last, 1),
            (4, 4096, 256),
        ] {
            let data = pattern(seed, (blocks * 512) as usize);
            assert_eq!(write("uring_rw", off, &data), IoStatus::Success);
            assert_eq!(
                read("uring_rw", off, blocks),
                data,
                "bdev read-back at {off}"
            );
            assert_eq!(
                file_bytes(&path, off * 512, data.len()),
                data,
                "file contents at {off}"
            );
        }
        assert_eq!(
            io("uring_rw", IoType::Flush, 0, b.num_blocks(), None).0,
            IoStatus::Success
        );
        assert_eq!(
            io("uring_rw", IoType::Reset, 0, 0, None).0,
            IoStatus::Success
        );

        // Out of range is refused by the layer, never reaches the file.
        assert_eq!(
            io("uring_rw", IoType::Read, last, 2, None).0,
            IoStatus::Failed(libc::EINVAL)
        );

        delete("uring_rw", MODULE_URING).unwrap();
        assert!(bdev::get("uring_rw").is_none());
    });
}

#[test]
fn uring_scattered_buffers_and_more_iovecs_than_one_syscall_takes() {
    with_reactors("0x1", || {
        let dir = TempDir::new("/var/tmp");
        let path = dir.file("disk", 4 * MIB);
        create(opts("uring_iov", &path)).unwrap();

        // 3 iovecs of 512, 1024 and 2048 bytes from one buffer, written and read zero-copy.
        let data = pattern(7, 3584);
        let d2 = data.clone();
        let st = on_app(move |reply| {
            let ch = chan("uring_iov", true);
            let mut buf = DmaBuf::alloc(3584).unwrap();
            buf.as_mut_slice().copy_from_slice(&d2);
            let p = buf.as_ptr();
            // SAFETY: the three elements are disjoint parts of `buf`, which the callback keeps alive.
            let iovs = unsafe {
                [
                    IoVec { base: p, len: 512 },
                    IoVec {
                        base: p.add(512),
                        len: 1024,
                    },
                    IoVec {
                        base: p.add(1536),
                        len: 2048,
                    },
                ]
            };
            let cb = Completion::Closure(Box::new(move |io: IoHandle| {
                drop(buf);
                reply(io.status());
            }));
            // SAFETY: `buf` outlives the I/O (moved into the callback).
            unsafe { ch.writev(&iovs, 10, 7, cb, 0) }.unwrap();
        });
        assert_eq!(st, IoStatus::Success);
        assert_eq!(read("uring_iov", 10, 7), data);
        assert_eq!(file_bytes(&path, 10 * 512, data.len()), data);

        // 1100 one-block iovecs: more than UIO_MAXIOV, so the module continues after the first 1024.
        let n = 1100usize;
        let data = pattern(8, n * 512);
        let d2 = data.clone();
        let (st_w, back) = on_app(move |reply| {
            let ch = chan("uring_iov", true);
            let mut wbuf = DmaBuf::alloc(n * 512).unwrap();
            wbuf.as_mut_slice().copy_from_slice(&d2);
            let rbuf = DmaBuf::alloc(n * 512).unwrap();
            let split = |b: &DmaBuf| -> Vec<IoVec> {
                (0..n)
                    .map(|i| IoVec {
                        // SAFETY: i * 512 < n * 512, inside the buffer.
                        base: unsafe { b.as_ptr().add(i * 512) },
                        len: 512,
                    })
                    .collect()
            };
            let wiovs = split(&wbuf);
            let riovs = split(&rbuf);
            let ch2 = ch.clone();
            let cb = Completion::Closure(Box::new(move |io: IoHandle| {
                let st_w = io.status();
                drop(wbuf);
                let cb = Completion::Closure(Box::new(move |io: IoHandle| {
                    let st_r = io.status();
                    let back = if st_r == IoStatus::Success {
                        rbuf.as_slice().to_vec()
                    } else {
                        vec![]
                    };
                    reply((st_w, back));
                }));
                // SAFETY: `rbuf` is moved into the read's callback, so it outlives the read.
                unsafe { ch2.readv(&riovs, 3000, n as u64, cb, 0) }.unwrap();
            }));
            // SAFETY: `wbuf` is moved into the callback, so it outlives the write.
            unsafe { ch.writev(&wiovs, 3000, n as u64, cb, 0) }.unwrap();
        });
        assert_eq!(st_w, IoStatus::Success);
        assert!(back == data, "read-back of 1100 iovecs differs");
        assert_eq!(file_bytes(&path, 3000 * 512, data.len()), data);
        delete("uring_iov", MODULE_URING).unwrap();
    });
}

#[test]
fn uring_unmap_and_write_zeroes_read_back_zeroes() {
    with_reactors("0x1", || {
        for under in ["/var/tmp", "/dev/shm"] {
            if !Path::new(under).is_dir() {
                continue;
            }
            // tmpfs (/dev/shm) cannot FALLOC_FL_ZERO_RANGE: write_zeroes falls back to punching a hole.
            let dir = TempDir::new(under);
            let path = dir.file("disk", 2 * MIB);
            let name = format!("uring_zero{}", under.replace('/', "_"));
            create(opts(&name, &path)).unwrap();
            let data = pattern(9, 32 * 512);
            assert_eq!(write(&name, 2048, &data), IoStatus::Success);
            assert_eq!(
                io(&name, IoType::Unmap, 2048, 8, None).0,
                IoStatus::Success,
                "unmap on {under}"
            );
            assert_eq!(
                io(&name, IoType::WriteZeroes, 2056, 8, None).0,
                IoStatus::Success,
                "write_zeroes on {under}"
            );
            // Twice: the second goes straight to the fallback, if one was needed.
            assert_eq!(
                io(&name, IoType::WriteZeroes, 2064, 4, None).0,
                IoStatus::Success
            );
            let back = read(&name, 2048, 32);
            assert!(
                back[..20 * 512].iter().all(|b| *b == 0),
                "unmapped/zeroed range reads zeroes on {under}"
            );
            assert_eq!(
                back[20 * 512..],
                data[20 * 512..],
                "the rest is intact on {under}"
            );
            let f = file_bytes(&path, 2048 * 512, 32 * 512);
            assert!(f[..20 * 512].iter().all(|b| *b == 0));
            assert_eq!(f[20 * 512..], data[20 * 512..]);
            delete(&name, MODULE_URING).unwrap();
        }
    });
}

#[test]
fn aio_options_config_and_fallocate() {
    with_reactors("0x1", || {
        let dir = TempDir::new("/var/tmp");
        let path = dir.file("disk", 4 * MIB);
        let uuid = uuid::Uuid::new_v4();
        let b = create(UringOpts {
            name: "aio_fa".into(),
            filename: path.clone(),
            block_size: 4096,
            uuid: Some(uuid),
            readonly: false,
            fallocate: true,
            aio: true,
        })
        .unwrap();
        assert_eq!(b.module_name(), MODULE_AIO);
        assert_eq!(b.params().product_name, "AIO disk");
        assert_eq!(b.block_size(), 4096);
        assert_eq!(b.num_blocks(), 1024);
        assert_eq!(b.uuid(), uuid);
        assert!(b.params().write_cache);
        let ds = &info("aio_fa")["driver_specific"]["aio"];
        assert_eq!(ds["filename"], path.as_str());
        assert_eq!(ds["block_size_override"], true);
        assert_eq!(ds["readonly"], false);
        assert_eq!(ds["fallocate"], true);
        let cfg = b.write_config().unwrap();
        assert_eq!(cfg["method"], "bdev_aio_create");
        let p = &cfg["params"];
        assert_eq!(p["name"], "aio_fa");
        assert_eq!(p["filename"], path.as_str());
        assert_eq!(p["block_size"], 4096);
        assert_eq!(p["readonly"], false);
        assert_eq!(p["fallocate"], true);
        assert_eq!(p["uuid"], uuid.to_string());

        let data = pattern(11, 3 * 4096);
        assert_eq!(write("aio_fa", 5, &data), IoStatus::Success);
        assert_eq!(read("aio_fa", 5, 3), data);
        assert_eq!(io("aio_fa", IoType::Unmap, 5, 1, None).0, IoStatus::Success);
        assert_eq!(
            io("aio_fa", IoType::WriteZeroes, 7, 1, None).0,
            IoStatus::Success
        );
        let back = read("aio_fa", 5, 3);
        assert!(back[..4096].iter().all(|b| *b == 0));
        assert_eq!(back[4096..8192], data[4096..8192]);
        assert!(back[8192..].iter().all(|b| *b == 0));
        // The uring module name does not delete an aio bdev.
        assert_eq!(
            delete("aio_fa", MODULE_URING).unwrap_err().kind,
            ErrorKind::NotFound
        );
        delete("aio_fa", MODULE_AIO).unwrap();

        // Without fallocate: no unmap / write_zeroes; no block_size override is saved.
        let b = create(UringOpts {
            aio: true,
            ..opts("aio_plain", &path)
        })
        .unwrap();
        assert_eq!(b.block_size(), 512);
        assert!(!b.io_type_supported(IoType::Unmap));
        assert!(!b.io_type_supported(IoType::WriteZeroes));
        assert_eq!(
            io("aio_plain", IoType::Unmap, 0, 1, None).0,
            IoStatus::Failed(libc::ENOTSUP)
        );
        let cfg = b.write_config().unwrap();
        assert!(cfg["params"].get("block_size").is_none());
        assert_eq!(
            info("aio_plain")["driver_specific"]["aio"]["block_size_override"],
            false
        );
        // The data written through the first bdev is there.
        assert_eq!(read("aio_plain", 6 * 8, 8), data[4096..8192]);
        delete("aio_plain", MODULE_AIO).unwrap();
    });
}

#[test]
fn readonly_bdev_reads_and_refuses_writes() {
    with_reactors("0x1", || {
        let dir = TempDir::new("/var/tmp");
        let path = dir.file("disk", MIB);
        let data = pattern(12, 4096);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&data, 8192)
            .unwrap();
        let b = create(UringOpts {
            readonly: true,
            fallocate: true,
            aio: true,
            ..opts("aio_ro", &path)
        })
        .unwrap();
        for t in [IoType::Write, IoType::Unmap, IoType::WriteZeroes] {
            assert!(!b.io_type_supported(t), "{t:?} on a read-only bdev");
        }
        assert_eq!(info("aio_ro")["driver_specific"]["aio"]["readonly"], true);
        assert_eq!(read("aio_ro", 16, 8), data);
        assert_eq!(
            write("aio_ro", 16, &pattern(13, 4096)),
            IoStatus::Failed(libc::ENOTSUP)
        );
        assert_eq!(io("aio_ro", IoType::Flush, 0, 0, None).0, IoStatus::Success);
        assert_eq!(file_bytes(&path, 8192, 4096), data, "file unchanged");
        delete("aio_ro", MODULE_AIO).unwrap();
    });
}

#[test]
fn create_errors() {
    with_reactors("0x1", || {
        let dir = TempDir::new("/var/tmp");
        let good = dir.file("good", MIB);
        let kind = |o: UringOpts| create(o).map(|_| ()).unwrap_err().kind;

        let missing = dir.0.join("missing").to_str().unwrap().to_string();
        assert_eq!(
            kind(opts("e_missing", &missing)),
            ErrorKind::Os(libc::ENOENT)
        );
        for bs in [256u32, 1000, 1536, 520] {
            let o = UringOpts {
                block_size: bs,
                ..opts("e_bs", &good)
            };
            assert_eq!(kind(o), ErrorKind::Invalid, "block size {bs}");
        }
        let odd = dir.file("odd", 1000);
        assert_eq!(
            kind(opts("e_odd", &odd)),
            ErrorKind::Invalid,
            "size not a multiple of the block size"
        );
        let small = dir.file("small", 2048);
        let o = UringOpts {
            block_size: 4096,
            ..opts("e_small", &small)
        };
        assert_eq!(kind(o), ErrorKind::Invalid, "smaller than one block");
        let empty = dir.file("empty", 0);
        assert_eq!(
            kind(opts("e_empty", &empty)),
            ErrorKind::Invalid,
            "empty file"
        );
        assert_eq!(
            kind(opts("e_null", "/dev/null")),
            ErrorKind::Invalid,
            "character device"
        );
        assert_eq!(
            kind(opts("e_dir", dir.0.to_str().unwrap())),
            ErrorKind::Os(libc::EISDIR)
        );
        assert_eq!(kind(opts("", &good)), ErrorKind::Invalid);
        assert_eq!(kind(opts("e_nofile", "")), ErrorKind::Invalid);

        create(opts("e_dup", &good)).unwrap();
        assert_eq!(kind(opts("e_dup", &good)), ErrorKind::Exists);
        delete("e_dup", MODULE_URING).unwrap();
        assert_eq!(
            delete("e_dup", MODULE_URING).unwrap_err().kind,
            ErrorKind::NotFound
        );
        for n in [
            "e_missing",
            "e_bs",
            "e_odd",
            "e_small",
            "e_empty",
            "e_null",
            "e_dir",
            "e_nofile",
        ] {
            assert!(bdev::get(n).is_none(), "{n} left registered");
        }
    });
}

/// Submits `n` I/Os at once on the app thread (block `i * stride`, `blocks` each), writes carrying
/// `pattern(seed + i)`; returns how many succeeded and, for reads, how many returned the expected pattern.
fn burst(name: &str, t: IoType, n: usize, stride: u64, blocks: u64, seed: u32) -> (usize, usize) {
    let name = name.to_string();
    on_app(move |reply| {
        let ch = chan(&name, true);
        let bs = ch.bdev().block_size() as usize;
        let len = blocks as usize * bs;
        struct Tally {
            left: Cell<usize>,
            ok: Cell<usize>,
            matched: Cell<usize>,
            reply: RefCell<Option<Reply<(usize, usize)>>>,
        }
        let tally = Rc::new(Tally {
            left: Cell::new(n),
            ok: Cell::new(0),
            matched: Cell::new(0),
            reply: RefCell::new(Some(reply)),
        });
        for i in 0..n {
            let mut buf = DmaBuf::alloc(len).unwrap();
            if t == IoType::Write {
                buf.as_mut_slice()
                    .copy_from_slice(&pattern(seed + i as u32, len));
            }
            let tl = tally.clone();
            let cb = Completion::Closure(Box::new(move |mut io: IoHandle| {
                if io.success() {
                    tl.ok.set(tl.ok.get() + 1);
                    if t == IoType::Read {
                        let b = io.take_buf().unwrap();
                        if b.as_slice() == pattern(seed + i as u32, len).as_slice() {
                            tl.matched.set(tl.matched.get() + 1);
                        }
                    }
                }
                tl.left.set(tl.left.get() - 1);
                if tl.left.get() == 0 {
                    let r = tl.reply.borrow_mut().take().unwrap();
                    r((tl.ok.get(), tl.matched.get()));
                }
            }));
            let off = i as u64 * stride;
            let r = if t == IoType::Write {
                ch.write(buf, off, blocks, cb, 0)
            } else {
                ch.read(buf, off, blocks, cb, 0)
            };
            r.unwrap();
        }
    })
}

#[test]
fn many_ios_in_flight_all_complete() {
    with_reactors("0x1", || {
        let dir = TempDir::new("/var/tmp");
        let path = dir.file("disk", 16 * MIB);
        create(opts("uring_qd", &path)).unwrap();
        // 256 in flight: every write lands, every read returns its own pattern.
        assert_eq!(burst("uring_qd", IoType::Write, 256, 16, 8, 100), (256, 0));
        assert_eq!(burst("uring_qd", IoType::Read, 256, 16, 8, 100), (256, 256));
        // More than the ring's slots at once: the excess completes NOMEM inside the layer and is retried.
        assert_eq!(
            burst("uring_qd", IoType::Write, 3000, 8, 1, 5000),
            (3000, 0)
        );
        assert_eq!(
            burst("uring_qd", IoType::Read, 3000, 8, 1, 5000),
            (3000, 3000)
        );
        let ch_out = app(|| chan("uring_qd", true).outstanding());
        assert_eq!(ch_out, 0);
        delete("uring_qd", MODULE_URING).unwrap();
    });
}

#[test]
fn bdevs_share_a_thread_ring_and_threads_have_their_own() {
    with_reactors("0x3", || {
        let dir = TempDir::new("/var/tmp");
        let pa = dir.file("a", 4 * MIB);
        let pb = dir.file("b", 4 * MIB);
        create(opts("share_a", &pa)).unwrap();
        create(UringOpts {
            aio: true,
            ..opts("share_b", &pb)
        })
        .unwrap();

        // A completion of A submits to B from its callback (both channels use the same ring).
        let da = pattern(21, 4096);
        let db = pattern(22, 4096);
        let (d1, d2) = (da.clone(), db.clone());
        let (sa, sb) = on_app(move |reply| {
            let a = chan("share_a", true);
            let b = chan("share_b", true);
            let mut ba = DmaBuf::alloc(4096).unwrap();
            ba.as_mut_slice().copy_from_slice(&d1);
            let mut bb = DmaBuf::alloc(4096).unwrap();
            bb.as_mut_slice().copy_from_slice(&d2);
            let cb = Completion::Closure(Box::new(move |io: IoHandle| {
                let sa = io.status();
                let cb =
                    Completion::Closure(Box::new(move |io: IoHandle| reply((sa, io.status()))));
                b.write(bb, 40, 8, cb, 0).unwrap();
            }));
            a.write(ba, 80, 8, cb, 0).unwrap();
        });
        assert_eq!((sa, sb), (IoStatus::Success, IoStatus::Success));
        assert_eq!(read("share_a", 80, 8), da);
        assert_eq!(read("share_b", 40, 8), db);

        // Interleaved bursts on both, from the app thread and from a thread on the other reactor at once.
        let other = app(|| {
            reactor::spawn_thread("uring_worker", Some(&reactor::CpuMask::single(1))).unwrap()
        });
        let (tx, rx) = mpsc::channel();
        other.send(move || {
            let desc = bdev::open("share_b", true, None).unwrap();
            let ch = desc.channel();
            let left = Rc::new(Cell::new(200usize));
            let ok = Rc::new(Cell::new(0usize));
            let keep = Rc::new(RefCell::new(Some((desc, tx))));
            for i in 0..200u64 {
                let mut buf = DmaBuf::alloc(512).unwrap();
                buf.as_mut_slice()
                    .copy_from_slice(&pattern(300 + i as u32, 512));
                let (left, ok, keep) = (left.clone(), ok.clone(), keep.clone());
                let cb = Completion::Closure(Box::new(move |io: IoHandle| {
                    ok.set(ok.get() + io.success() as usize);
                    left.set(left.get() - 1);
                    if left.get() == 0 {
                        let (desc, tx) = keep.borrow_mut().take().unwrap();
                        drop(desc);
                        tx.send(ok.get()).unwrap();
                    }
                }));
                ch.write(buf, 4000 + i, 1, cb, 0).unwrap();
            }
        });
        assert_eq!(burst("share_a", IoType::Write, 200, 2, 2, 400), (200, 0));
        assert_eq!(burst("share_b", IoType::Write, 100, 4, 1, 500), (100, 0));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(60)).unwrap(),
            200,
            "writes from the other reactor"
        );
        other.request_exit();
        assert_eq!(burst("share_a", IoType::Read, 200, 2, 2, 400), (200, 200));
        assert_eq!(burst("share_b", IoType::Read, 100, 4, 1, 500), (100, 100));
        let back = read("share_b", 4000, 200);
        for i in 0..200usize {
            assert_eq!(
                back[i * 512..(i + 1) * 512],
                pattern(300 + i as u32, 512)[..],
                "block {i} written by the worker"
            );
        }
        delete("share_a", MODULE_URING).unwrap();
        delete("share_b", MODULE_AIO).unwrap();
    });
}

#[test]
fn rescan_picks_up_a_grown_file() {
    with_reactors("0x1", || {
        let dir = TempDir::new("/var/tmp");
        let path = dir.file("disk", MIB);
        create(opts("uring_grow", &path)).unwrap();
        assert_eq!(bdev::get("uring_grow").unwrap().num_blocks(), 2048);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(2 * MIB)
            .unwrap();
        app(|| uring::rescan("uring_grow")).unwrap();
        assert_eq!(bdev::get("uring_grow").unwrap().num_blocks(), 4096);
        // Shrinking is refused while the bdev is open (SPDK: EBUSY), and goes through once it is closed.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(MIB).unwrap();
        let desc = app(|| bdev::open("uring_grow", false, None)).unwrap();
        assert_eq!(
            app(|| uring::rescan("uring_grow")).unwrap_err().kind,
            ErrorKind::Busy
        );
        assert_eq!(bdev::get("uring_grow").unwrap().num_blocks(), 4096);
        app(move || drop(desc));
        app(|| uring::rescan("uring_grow")).unwrap();
        assert_eq!(bdev::get("uring_grow").unwrap().num_blocks(), 2048);
        file.set_len(2 * MIB).unwrap();
        app(|| uring::rescan("uring_grow")).unwrap();
        let data = pattern(31, 512);
        assert_eq!(write("uring_grow", 4095, &data), IoStatus::Success);
        assert_eq!(read("uring_grow", 4095, 1), data);
        assert_eq!(
            app(|| uring::rescan("nope")).unwrap_err().kind,
            ErrorKind::NotFound
        );
        delete("uring_grow", MODULE_URING).unwrap();
    });
}
