//! raid0 and concat on real reactors: geometry, data placement on the members, I/O crossing strips and
//! members, unmap, and losing a member (the array goes offline and stays listed until deleted).

mod common;

use bdev::IoStatus;
use common::*;
use raid::Level;

const BS: usize = 512;

/// Writes distinct patterns over the whole array in chunks of varying size, reads them back, and checks each
/// block landed where `place(lba) -> (member, member lba)` says.
fn check_placement(
    raid_name: &str,
    members: &[&str],
    blocks: u64,
    place: impl Fn(u64) -> (usize, u64),
) {
    let mut lba = 0;
    let mut k = 1;
    while lba < blocks {
        let n = (k % 23 + 1).min(blocks - lba);
        assert_eq!(
            write(raid_name, lba, pattern_vec(BS, lba, n, 5)),
            bdev::IoStatus::Success
        );
        lba += n;
        k += 7;
    }
    assert_eq!(
        read(raid_name, 0, blocks).unwrap(),
        pattern_vec(BS, 0, blocks, 5)
    );
    let dumps: Vec<Vec<u8>> = members
        .iter()
        .map(|m| {
            let n = app_sync({
                let m = m.to_string();
                move || bdev::get(&m).unwrap().num_blocks()
            });
            read(m, 0, n).unwrap()
        })
        .collect();
    for b in 0..blocks {
        let (m, mlba) = place(b);
        let o = mlba as usize * BS;
        assert_eq!(
            decode(&dumps[m][o..o + BS]),
            (b, 5),
            "raid block {b} on member {m} at {mlba}"
        );
    }
}

#[test]
fn raid0_geometry_placement_and_unmap() {
    with_reactors("0x1", || {
        malloc("s0_m0", 1030, 512);
        malloc("s0_m1", 1024, 512);
        malloc("s0_m2", 1100, 512);
        raid_create("s0_r", Level::Raid0, &["s0_m0", "s0_m1", "s0_m2"], 4, false).unwrap();
        let v = info("s0_r").unwrap();
        assert_eq!(v["state"], "online");
        assert_eq!(v["raid_level"], "raid0");
        assert_eq!(v["strip_size_kb"], 4);
        assert_eq!(v["base_bdevs_list"][0]["data_size"], 1024);
        let (n, boundary) = app_sync(|| {
            let b = bdev::get("s0_r").unwrap();
            (b.num_blocks(), b.params().optimal_io_boundary)
        });
        assert_eq!(n, 3072);
        assert_eq!(boundary, 8);
        let cfg = app_sync(|| bdev::get("s0_r").unwrap().write_config()).unwrap();
        assert_eq!(cfg["params"]["strip_size_kb"], 4);
        check_placement("s0_r", &["s0_m0", "s0_m1", "s0_m2"], n, |b| {
            let strip = b / 8;
            ((strip % 3) as usize, (strip / 3) * 8 + b % 8)
        });
        // Unmap across strips and members zeroes exactly that range.
        let st = app(|tx| {
            let d = bdev::open("s0_r", true, None).unwrap();
            let ch = d.channel();
            let d = std::sync::Arc::new(d);
            ch.submit_nodata(
                bdev::IoType::Unmap,
                5,
                30,
                bdev::Completion::Closure(Box::new(move |io| {
                    drop(d);
                    let _ = tx.send(io.status());
                })),
                0,
            )
            .unwrap();
        });
        assert_eq!(st, bdev::IoStatus::Success);
        let all = read("s0_r", 0, 64).unwrap();
        for b in 0..64u64 {
            let blk = &all[b as usize * BS..(b as usize + 1) * BS];
            if (5..35).contains(&b) {
                assert!(blk.iter().all(|x| *x == 0), "block {b} not unmapped");
            } else {
                assert_eq!(decode(blk), (b, 5));
            }
        }
        raid_delete("s0_r", false).unwrap();
        for m in ["s0_m0", "s0_m1", "s0_m2"] {
            unregister(m);
        }
    });
}

#[test]
fn concat_placement_and_verify_load() {
    with_reactors("0x3", || {
        malloc("cc_m0", 1000, 512);
        malloc("cc_m1", 2005, 512);
        raid_create("cc_r", Level::Concat, &["cc_m0", "cc_m1"], 4, false).unwrap();
        let n = app_sync(|| bdev::get("cc_r").unwrap().num_blocks());
        assert_eq!(n, 1000 + 2000);
        assert_eq!(
            info("cc_r").unwrap()["base_bdevs_list"][1]["data_size"],
            2000
        );
        check_placement("cc_r", &["cc_m0", "cc_m1"], n, |b| {
            if b < 1000 {
                (0, b)
            } else {
                (1, b - 1000)
            }
        });
        let t = io_thread("cc_io");
        let load = Load::start(&t, "cc_r", 12, 16, 42);
        load.wait_writes(500);
        let s = load.stop();
        assert_eq!(s.writes_failed + s.reads_failed, 0, "{s:?}");
        assert!(s.mismatches.is_empty(), "{:?}", s.mismatches);
        assert!(verify_against(&load.shared, "cc_r", 0, BS).is_empty());
        drop(load);
        raid_delete("cc_r", false).unwrap();
        unregister("cc_m0");
        unregister("cc_m1");
    });
}

#[test]
fn raid0_losing_a_member_goes_offline() {
    with_reactors("0x3", || {
        malloc("ro_m0", 4096, 512);
        malloc("ro_m1", 4096, 512);
        raid_create("ro_r", Level::Raid0, &["ro_m0", "ro_m1"], 8, true).unwrap();
        let t = io_thread("ro_io");
        let load = Load::start(&t, "ro_r", 8, 8, 5);
        load.wait_writes(200);
        let s = load.stop();
        assert!(s.mismatches.is_empty() && s.writes_failed == 0, "{s:?}");
        drop(load);
        unregister("ro_m0");
        let v = info("ro_r").unwrap();
        assert_eq!(v["state"], "offline");
        assert_eq!(v["num_base_bdevs_discovered"], 1);
        assert_eq!(v["num_base_bdevs_operational"], 1);
        assert!(!bdev_exists("ro_r"));
        assert_eq!(
            app_sync(|| raid::get_bdevs(Some(raid::RaidState::Offline)).len()),
            1
        );
        raid_delete("ro_r", false).unwrap();
        assert!(info("ro_r").is_none());
        assert!(!claimed("ro_m1"));
        unregister("ro_m1");
    });
}

/// A disk whose reads past its first 64 blocks fail with one NVMe status (an unrecovered read error, with
/// retry hints), as an NVMe namespace's would; the first blocks read as zeroes (where a raid looks for a
/// superblock).
struct NvmeFail;

const READ_ERROR: bdev::NvmeStatus = bdev::NvmeStatus {
    sct: 2,
    sc: 0x81,
    dnr: true,
    crd: 1,
};

impl bdev::BdevOps for NvmeFail {
    fn module_name(&self) -> &'static str {
        "nvme_fail"
    }
    fn io_type_supported(&self, t: bdev::IoType) -> bool {
        matches!(t, bdev::IoType::Read | bdev::IoType::Write)
    }
    fn create_channel(&self, _b: &bdev::Bdev) -> Box<dyn bdev::ModuleChannel> {
        Box::new(NvmeFailCh)
    }
}

struct NvmeFailCh;

impl bdev::ModuleChannel for NvmeFailCh {
    fn submit(&mut self, mut io: bdev::IoHandle) {
        let st = match io.io_type() {
            bdev::IoType::Read if io.offset_blocks() >= 64 => bdev::IoStatus::from_nvme(READ_ERROR),
            bdev::IoType::Read => {
                io.zero_iovs();
                bdev::IoStatus::Success
            }
            _ => bdev::IoStatus::Success,
        };
        io.complete(st);
    }
}

#[test]
fn nvme_status_passes_through_passthru_and_raid_unchanged() {
    with_reactors("0x1", || {
        for n in ["nv0", "nv1"] {
            let n = n.to_string();
            app_sync(move || {
                bdev::register(bdev::BdevParams::new(&n, 512, 2048), Box::new(NvmeFail)).map(|_| ())
            })
            .unwrap();
        }
        app_sync(|| bdev::modules::passthru::create("nv0", "nvpt0", None)).unwrap();
        let want = Err(IoStatus::Nvme(READ_ERROR));
        assert_eq!(read("nv0", 103, 2), want, "the disk itself");
        assert_eq!(read("nvpt0", 103, 2), want, "through passthru");
        // concat over the passthru and the other disk: a read inside one member is forwarded to it.
        raid_create("nvcat", Level::Concat, &["nvpt0", "nv1"], 64, false).unwrap();
        assert_eq!(read("nvcat", 103, 2), want, "through concat and passthru");
        assert_eq!(
            read("nvcat", 2048 + 105, 1),
            want,
            "through concat, second member"
        );
        raid_delete("nvcat", false).unwrap();
        // raid1: every mirror fails the read; the host sees the drive's status, not a made-up one.
        raid_create("nvr1", Level::Raid1, &["nvpt0", "nv1"], 0, false).unwrap();
        assert_eq!(read("nvr1", 107, 1), want, "through raid1");
        // The layer's translation for hosts of other statuses, as SPDK's spdk_bdev_io_get_nvme_status.
        assert_eq!(IoStatus::Miscompare.nvme(), bdev::NvmeStatus::new(2, 0x85));
        assert_eq!(
            IoStatus::Failed(libc::EIO).nvme(),
            bdev::NvmeStatus::new(0, 0x06)
        );
        assert_eq!(
            IoStatus::from_nvme(bdev::NvmeStatus::new(0, 0)),
            IoStatus::Success
        );
        assert_eq!(
            IoStatus::from_nvme(bdev::NvmeStatus::new(0, 7)),
            IoStatus::Aborted
        );
    });
}
