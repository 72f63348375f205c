//! Buffers as callers hand them: misaligned buffers reach a bdev that requires alignment through a bounce
//! buffer, and reads and writes that break a module's limits (optimal I/O boundary, transfer size, segment size
//! and count) reach it in pieces that keep them. The modules here refuse anything else, and the bytes that
//! land, and come back, are the same as through plain I/O.

mod common;
use common::*;

use std::sync::{Arc, Mutex};

use bdev::{
    Bdev, BdevOps, BdevParams, Completion, IoHandle, IoStatus, IoType, IoVec, ModuleChannel,
};

const ALIGN: u32 = 4096;
const BS: u64 = 512;

/// A RAM disk that refuses (EFAULT) any I/O breaking its limits, as a device would misbehave.
struct Strict(Arc<Mutex<Vec<u8>>>, Limits);

/// What a `Strict` disk accepts.
#[derive(Clone, Copy, Default)]
struct Limits {
    align: usize,
    boundary: u64,
    max_blocks: u64,
    max_seg: usize,
    max_segs: usize,
    /// Most blocks per unmap / write-zeroes.
    max_unmap: u64,
    max_write_zeroes: u64,
}

impl Limits {
    fn breaks(&self, io: &IoHandle) -> bool {
        let iovs = io.iovs();
        (self.align > 0
            && iovs
                .iter()
                .any(|v| !(v.base as usize).is_multiple_of(self.align)))
            || (self.boundary > 0
                && io.offset_blocks() / self.boundary
                    != (io.offset_blocks() + io.num_blocks() - 1) / self.boundary)
            || (self.max_blocks > 0 && io.num_blocks() > self.max_blocks)
            || (self.max_seg > 0 && iovs.iter().any(|v| v.len > self.max_seg))
            || (self.max_segs > 0 && iovs.len() > self.max_segs)
            || (io.io_type() == IoType::Unmap
                && self.max_unmap > 0
                && io.num_blocks() > self.max_unmap)
            || (io.io_type() == IoType::WriteZeroes
                && self.max_write_zeroes > 0
                && io.num_blocks() > self.max_write_zeroes)
    }
}

impl BdevOps for Strict {
    fn module_name(&self) -> &'static str {
        "strict"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(
            t,
            IoType::Read | IoType::Write | IoType::Unmap | IoType::WriteZeroes
        )
    }
    fn create_channel(&self, _b: &Bdev) -> Box<dyn ModuleChannel> {
        Box::new(StrictCh(self.0.clone(), self.1))
    }
}

struct StrictCh(Arc<Mutex<Vec<u8>>>, Limits);

impl ModuleChannel for StrictCh {
    fn submit(&mut self, mut io: IoHandle) {
        if self.1.breaks(&io) {
            return io.complete(IoStatus::Failed(libc::EFAULT));
        }
        let off = io.offset_bytes() as usize;
        let len = io.len_bytes() as usize;
        let mut disk = self.0.lock().unwrap();
        match io.io_type() {
            IoType::Write => io.copy_out(&mut disk[off..off + len]),
            IoType::Unmap | IoType::WriteZeroes => disk[off..off + len].fill(0),
            _ => {
                let data = disk[off..off + len].to_vec();
                drop(disk);
                io.copy_in(&data)
            }
        }
        io.complete(IoStatus::Success)
    }
}

/// Caller memory at a chosen misalignment, kept alive (and not touched) until the I/O completes.
struct Mem {
    raw: Vec<u8>,
    skew: usize,
}

impl Mem {
    fn new(len: usize, skew: usize) -> Self {
        // Over-allocate so the start can be placed `skew` bytes past a 4 KiB boundary.
        let raw = vec![0u8; len + 2 * ALIGN as usize];
        let base = raw.as_ptr() as usize;
        let first = base.next_multiple_of(ALIGN as usize) - base;
        Mem {
            raw,
            skew: first + skew,
        }
    }
    fn slice(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.skew..self.skew + len]
    }
}

/// Runs one read or write on `name` over `iovs` (cut from `mem` at the given lengths) and waits for it.
fn rw(name: &str, t: IoType, offset: u64, mem: &mut Mem, cuts: &[usize]) -> IoStatus {
    let total: usize = cuts.iter().sum();
    let base = mem.slice(total).as_mut_ptr();
    let mut iovs = Vec::new();
    let mut at = 0;
    for &c in cuts {
        // SAFETY: `at + c <= total`, inside the slice just taken.
        let piece = unsafe { base.add(at) };
        iovs.push(IoVec {
            base: piece,
            len: c,
        });
        at += c;
    }
    let blocks = total as u64 / BS;
    let name = name.to_string();
    let iovs_addr = iovs.as_ptr() as usize;
    let n = iovs.len();
    let st = on_app(move |reply| {
        let ch = chan(&name, true);
        // SAFETY: the iovecs point into `mem`, which the test thread keeps and does not touch until this
        // reply arrives, i.e. until the I/O completed; `iovs` lives on the waiting test thread as well.
        let iovs = unsafe { std::slice::from_raw_parts(iovs_addr as *const IoVec, n) };
        let cb = Completion::Closure(Box::new(move |io: IoHandle| reply(io.status())));
        // SAFETY: as above.
        let r = unsafe {
            match t {
                IoType::Read => ch.readv(iovs, offset, blocks, cb, 0),
                _ => ch.writev(iovs, offset, blocks, cb, 0),
            }
        };
        r.expect("submit");
    });
    drop(iovs);
    st
}

#[test]
fn misaligned_buffers_are_bounced_and_match_aligned_io() {
    with_reactors("0x1", || {
        let disk = Arc::new(Mutex::new(vec![0u8; 64 * BS as usize]));
        let d2 = disk.clone();
        app(move || {
            let mut p = BdevParams::new("strict0", BS as u32, 64);
            p.required_alignment = ALIGN;
            let limits = Limits {
                align: ALIGN as usize,
                ..Default::default()
            };
            bdev::register(p, Box::new(Strict(d2, limits))).map(|_| ())
        })
        .unwrap();
        let len = 8 * BS as usize;
        let data = pattern(99, len);

        // Aligned: straight through.
        let mut a = Mem::new(len, 0);
        a.slice(len).copy_from_slice(&data);
        assert_eq!(
            rw("strict0", IoType::Write, 0, &mut a, &[len]),
            IoStatus::Success
        );
        // Misaligned, in three pieces: bounced for the write, at another offset.
        let mut m = Mem::new(len, 7);
        m.slice(len).copy_from_slice(&data);
        let cuts = [1000, 2000, len - 3000];
        assert_eq!(
            rw("strict0", IoType::Write, 16, &mut m, &cuts),
            IoStatus::Success
        );
        {
            let d = disk.lock().unwrap();
            assert_eq!(&d[..len], &data[..], "aligned write");
            assert_eq!(
                &d[16 * BS as usize..16 * BS as usize + len],
                &data[..],
                "bounced write"
            );
        }
        // Read both back through misaligned buffers (bounced reads copy back into the caller's pieces).
        for off in [0u64, 16] {
            let mut r = Mem::new(len, 3);
            assert_eq!(
                rw("strict0", IoType::Read, off, &mut r, &[512, len - 512]),
                IoStatus::Success
            );
            assert_eq!(r.slice(len), &data[..], "bounced read at {off}");
        }
        // And through an aligned buffer, for comparison.
        let mut r = Mem::new(len, 0);
        assert_eq!(
            rw("strict0", IoType::Read, 16, &mut r, &[len]),
            IoStatus::Success
        );
        assert_eq!(r.slice(len), &data[..]);
        // A length that does not match the blocks is still refused, bounced or not.
        let mut bad = Mem::new(len, 5);
        let st = rw("strict0", IoType::Write, 0, &mut bad, &[len - 8]);
        assert_eq!(st, IoStatus::Failed(libc::EINVAL));
    });
}

fn strict_disk(
    name: &str,
    blocks: u64,
    limits: Limits,
    p: impl FnOnce(&mut BdevParams),
) -> Arc<Mutex<Vec<u8>>> {
    let disk = Arc::new(Mutex::new(vec![0u8; (blocks * BS) as usize]));
    let d2 = disk.clone();
    let mut params = BdevParams::new(name, BS as u32, blocks);
    p(&mut params);
    app(move || bdev::register(params, Box::new(Strict(d2, limits))).map(|_| ())).unwrap();
    disk
}

#[test]
fn io_breaking_module_limits_is_split_and_matches_unsplit_io() {
    with_reactors("0x1", || {
        let limits = Limits {
            boundary: 8,
            max_blocks: 4,
            max_seg: 1024,
            max_segs: 3,
            ..Default::default()
        };
        let split = strict_disk("split0", 256, limits, |p| {
            p.optimal_io_boundary = 8;
            p.split_on_optimal_io_boundary = true;
            p.max_rw_size = 4;
            p.max_segment_size = 1024;
            p.max_num_segments = 3;
        });
        let plain = strict_disk("plain0", 256, Limits::default(), |_| {});
        // 37 blocks from block 5: crosses boundaries, far over 4 blocks; odd pieces cross blocks and segments.
        let len = 37 * BS as usize;
        let data = pattern(7, len);
        let cuts = [700, 3000, 1, 5000, len - 8701];
        for name in ["split0", "plain0"] {
            let mut m = Mem::new(len, 0);
            m.slice(len).copy_from_slice(&data);
            assert_eq!(
                rw(name, IoType::Write, 5, &mut m, &cuts),
                IoStatus::Success,
                "{name}"
            );
        }
        let (a, b) = (split.lock().unwrap().clone(), plain.lock().unwrap().clone());
        assert!(a == b, "split and unsplit writes differ");
        assert_eq!(&a[5 * BS as usize..5 * BS as usize + len], &data[..]);
        // Read back in pieces through other cuts, misaligned too.
        let mut r = Mem::new(len, 3);
        assert_eq!(
            rw("split0", IoType::Read, 5, &mut r, &[len - 100, 100]),
            IoStatus::Success
        );
        assert_eq!(r.slice(len), &data[..]);
        // Statistics count the I/Os submitted, not their pieces.
        let st = on_app(|reply| bdev::get("split0").unwrap().get_iostat(reply));
        assert_eq!((st.write.ops, st.read.ops), (1, 1));
        assert_eq!(st.write.bytes, len as u64);
        // A failing piece fails the whole I/O (beyond the disk: caught before splitting; so fail one piece by
        // making a segment smaller than a block impossible to cut under max_segs).
        let mut tiny = Mem::new(len, 0);
        let crumbs: Vec<usize> = std::iter::repeat_n(100, 5).chain([len - 500]).collect();
        let st = rw("split0", IoType::Write, 5, &mut tiny, &crumbs);
        assert_eq!(st, IoStatus::Failed(libc::EINVAL));
    });
}

/// Unmap and write-zeroes larger than the module takes reach it in pieces within its limits, covering exactly
/// the range asked (as SPDK splits them on `max_unmap` / `max_write_zeroes`).
#[test]
fn unmap_and_write_zeroes_are_split_on_the_modules_limits() {
    with_reactors("0x1", || {
        let limits = Limits {
            max_unmap: 16,
            max_write_zeroes: 24,
            ..Default::default()
        };
        let disk = strict_disk("zsplit", 256, limits, |p| {
            p.max_unmap = 16;
            p.max_write_zeroes = 24;
        });
        disk.lock().unwrap().fill(0xab);
        let nodata = |t: IoType, off: u64, n: u64| -> IoStatus {
            on_app(move |reply| {
                submit(
                    &chan("zsplit", true),
                    t,
                    off,
                    n,
                    None,
                    Box::new(move |(st, _)| reply(st)),
                )
            })
        };
        assert_eq!(nodata(IoType::WriteZeroes, 3, 100), IoStatus::Success);
        assert_eq!(nodata(IoType::Unmap, 150, 70), IoStatus::Success);
        let d = disk.lock().unwrap().clone();
        let b = BS as usize;
        assert!(d[..3 * b].iter().all(|&x| x == 0xab), "before the range");
        assert!(
            d[3 * b..103 * b].iter().all(|&x| x == 0),
            "write-zeroes range"
        );
        assert!(d[103 * b..150 * b].iter().all(|&x| x == 0xab), "between");
        assert!(d[150 * b..220 * b].iter().all(|&x| x == 0), "unmap range");
        assert!(d[220 * b..].iter().all(|&x| x == 0xab), "after");
        // Statistics count the I/Os asked for, not their pieces.
        let st = on_app(|reply| bdev::get("zsplit").unwrap().get_iostat(reply));
        assert_eq!(st.unmap.ops, 1);
    });
}

/// A malloc disk much larger than the cache takes writes with streaming stores (`reactor::stream`): whatever the
/// buffers' alignment and cuts, exactly the written bytes land, the neighbours stay as they were, and reads give
/// them back.
#[test]
fn large_malloc_writes_stream_exactly() {
    // The smallest size that streams here (LLC-dependent), within reason.
    let Some(bytes) = (26..=30)
        .map(|s| 1u64 << s)
        .find(|&b| reactor::stream::worth_streaming(b))
    else {
        eprintln!("SKIPPED: this machine's cache is too large for a test-sized streaming malloc");
        return;
    };
    with_reactors("0x1", move || {
        create_malloc("mstream", bytes / BS);
        let len = 16 * BS as usize;
        let data = pattern(41, len);
        let cases: [(u64, usize, &[usize]); 4] = [
            (16, 0, &[len]),
            (64, 7, &[1000, 2000, len - 3000]),
            (bytes / BS - 16, 3, &[1, 255, 256, len - 512]),
            (100, 16, &[64, 100, len - 164]),
        ];
        for (offset, skew, cuts) in cases {
            let mut w = Mem::new(len, skew);
            w.slice(len).copy_from_slice(&data);
            assert_eq!(
                rw("mstream", IoType::Write, offset, &mut w, cuts),
                IoStatus::Success
            );
            let mut r = Mem::new(len, 0);
            assert_eq!(
                rw("mstream", IoType::Read, offset, &mut r, &[len]),
                IoStatus::Success
            );
            assert_eq!(r.slice(len), &data[..], "write at {offset} cut {cuts:?}");
        }
        // The blocks around the first write were never written: still zero.
        for offset in [0u64, 32] {
            let mut r = Mem::new(len, 0);
            assert_eq!(
                rw("mstream", IoType::Read, offset, &mut r, &[len]),
                IoStatus::Success
            );
            assert!(
                r.slice(len).iter().all(|&b| b == 0),
                "neighbour at {offset}"
            );
        }
    });
}
