//! Arrays following their members' size, as SPDK's raid does on a base bdev resize event: raid1 grows to its
//! smallest member in use (also degraded), raid0 to its smallest member rounded down to a strip times the
//! members, concat keeps its size; openers of the array are told; with a superblock the new size is written to
//! the members and an array assembled again from them comes up at that size.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bdev::modules::{null, uring};
use bdev::{BdevEvent, EventCb};
use common::*;
use raid::Level;

const MIB: u64 = 1024 * 1024;

fn null_bdev(name: &str, mib: u64) {
    let n = name.to_string();
    app_sync(move || {
        null::create(null::NullOpts {
            name: n,
            uuid: None,
            num_blocks: mib * MIB / 512,
            block_size: 512,
            physical_block_size: 0,
        })
        .map(|_| ())
    })
    .expect("null created");
}

fn null_resize(name: &str, mib: u64) {
    let n = name.to_string();
    app_sync(move || null::resize(&n, mib)).expect("null resized");
}

fn blocks(name: &str) -> u64 {
    let n = name.to_string();
    app_sync(move || bdev::get(&n).unwrap().num_blocks())
}

fn data_size(raid_name: &str, slot: usize) -> u64 {
    info(raid_name).unwrap()["base_bdevs_list"][slot]["data_size"]
        .as_u64()
        .unwrap()
}

/// Keeps `name` open and counts the resize events it gets.
struct Watch {
    resizes: Arc<AtomicUsize>,
    desc: Option<bdev::Desc>,
}

impl Watch {
    fn open(name: &str) -> Watch {
        let resizes = Arc::new(AtomicUsize::new(0));
        let r = resizes.clone();
        let cb: EventCb = Arc::new(move |ev, _| {
            if ev == BdevEvent::Resize {
                r.fetch_add(1, Ordering::SeqCst);
            }
        });
        let n = name.to_string();
        let desc = app_sync(move || bdev::open(&n, false, Some(cb))).expect("open");
        Watch {
            resizes,
            desc: Some(desc),
        }
    }

    fn count(&self) -> usize {
        self.resizes.load(Ordering::SeqCst)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let d = self.desc.take();
        app_sync(move || drop(d));
    }
}

#[test]
fn raid1_grows_with_its_smallest_member_also_degraded() {
    with_reactors("0x1", || {
        null_bdev("g1_n0", 16);
        null_bdev("g1_n1", 16);
        null_bdev("g1_n2", 16);
        raid_create("g1_r", Level::Raid1, &["g1_n0", "g1_n1", "g1_n2"], 0, false).unwrap();
        assert_eq!(blocks("g1_r"), 32768);
        let w = Watch::open("g1_r");
        // One member grown: the others still bound the mirror.
        null_resize("g1_n0", 32);
        null_resize("g1_n1", 32);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(blocks("g1_r"), 32768);
        assert_eq!(w.count(), 0);
        // The last one too: the mirror grows, and its opener hears of it.
        null_resize("g1_n2", 48);
        wait_for("raid1 grown", 5, || blocks("g1_r") == 65536);
        wait_for("resize event", 5, || w.count() == 1);
        for slot in 0..3 {
            assert_eq!(data_size("g1_r", slot), 65536);
        }
        // Degraded: the members left decide.
        remove_base("g1_n0").unwrap();
        null_resize("g1_n1", 40);
        null_resize("g1_n2", 64);
        wait_for("degraded raid1 grown", 5, || blocks("g1_r") == 40 * 2048);
        assert_eq!(info("g1_r").unwrap()["num_base_bdevs_operational"], 2);
        drop(w);
        raid_delete("g1_r", false).unwrap();
        for n in ["g1_n0", "g1_n1", "g1_n2"] {
            unregister(n);
        }
    });
}

#[test]
fn raid0_grows_by_whole_strips_and_concat_keeps_its_size() {
    with_reactors("0x1", || {
        null_bdev("g0_n0", 8);
        null_bdev("g0_n1", 8);
        // 2 MiB strips (4096 blocks): 8 MiB members hold 4 strips each.
        raid_create("g0_r", Level::Raid0, &["g0_n0", "g0_n1"], 2048, false).unwrap();
        assert_eq!(blocks("g0_r"), 2 * 4 * 4096);
        // 9 MiB is still 4 whole strips: no change.
        null_resize("g0_n0", 10);
        null_resize("g0_n1", 9);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(blocks("g0_r"), 2 * 4 * 4096);
        // 10 MiB holds 5.
        null_resize("g0_n1", 11);
        wait_for("raid0 grown", 5, || blocks("g0_r") == 2 * 5 * 4096);
        assert_eq!(data_size("g0_r", 0), 5 * 4096);
        assert_eq!(data_size("g0_r", 1), 5 * 4096);
        raid_delete("g0_r", false).unwrap();

        null_bdev("gc_n0", 4);
        null_bdev("gc_n1", 4);
        raid_create("gc_r", Level::Concat, &["gc_n0", "gc_n1"], 64, false).unwrap();
        let before = blocks("gc_r");
        null_resize("gc_n1", 8);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(blocks("gc_r"), before);
        raid_delete("gc_r", false).unwrap();
        for n in ["g0_n0", "g0_n1", "gc_n0", "gc_n1"] {
            unregister(n);
        }
    });
}

/// Files under /var/tmp, removed when dropped.
struct Files(Vec<std::path::PathBuf>);

impl Drop for Files {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn uring_bdev(name: &str, path: &std::path::Path, uuid: Option<uuid::Uuid>) {
    let o = uring::UringOpts {
        name: name.into(),
        filename: path.to_string_lossy().into_owned(),
        uuid,
        ..Default::default()
    };
    app_sync(move || uring::create(o).map(|_| ())).expect("uring created");
}

fn grow(path: &std::path::Path, name: &str, mib: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(mib * MIB)
        .unwrap();
    let n = name.to_string();
    app_sync(move || uring::rescan(&n)).expect("rescan");
}

#[test]
fn raid1_resize_is_written_to_the_superblock_and_survives_reassembly() {
    with_reactors("0x1", || {
        let files = Files(
            (0..2)
                .map(|i| {
                    let p = std::path::PathBuf::from(format!(
                        "/var/tmp/raid-resize-{}-{i}",
                        std::process::id()
                    ));
                    std::fs::File::create(&p).unwrap().set_len(4 * MIB).unwrap();
                    p
                })
                .collect(),
        );
        uring_bdev("gs_u0", &files.0[0], None);
        uring_bdev("gs_u1", &files.0[1], None);
        let uuids = [uuid_of("gs_u0"), uuid_of("gs_u1")];
        raid_create("gs_r", Level::Raid1, &["gs_u0", "gs_u1"], 0, true).unwrap();
        let offset = info("gs_r").unwrap()["base_bdevs_list"][0]["data_offset"]
            .as_u64()
            .unwrap();
        assert_eq!(blocks("gs_r"), 8192 - offset);
        let seq = superblock_of("gs_u0").unwrap().seq_number;
        grow(&files.0[0], "gs_u0", 8);
        grow(&files.0[1], "gs_u1", 6);
        let size = 12288 - offset;
        wait_for("raid1 grown", 5, || blocks("gs_r") == size);
        for m in ["gs_u0", "gs_u1"] {
            wait_for("superblock rewritten", 5, || {
                superblock_of(m).is_some_and(|s| s.seq_number > seq)
            });
            let sb = superblock_of(m).unwrap();
            assert_eq!(sb.raid_size, size, "{m}");
            assert!(sb.base_bdevs.iter().all(|b| b.data_size == size), "{m}");
        }
        // Data written past the old end is there after the array is assembled again from its superblocks.
        let tail = pattern_vec(512, size - 4, 4, 9);
        assert_eq!(
            write("gs_r", size - 4, tail.clone()),
            bdev::IoStatus::Success
        );
        raid_delete("gs_r", false).unwrap();
        unregister("gs_u0");
        unregister("gs_u1");
        uring_bdev("gs_u1", &files.0[1], Some(uuids[1]));
        uring_bdev("gs_u0", &files.0[0], Some(uuids[0]));
        wait_for("reassembled", 5, || state("gs_r") == "online");
        assert_eq!(blocks("gs_r"), size);
        assert_eq!(read("gs_r", size - 4, 4).unwrap(), tail);
        raid_delete("gs_r", true).unwrap();
        unregister("gs_u0");
        unregister("gs_u1");
    });
}
