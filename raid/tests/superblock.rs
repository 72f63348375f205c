//! Superblocks on real reactors: what is written, re-assembly through examine in any arrival order, a stale
//! member (older sequence number) left out, a re-appearing stale member rebuilt, and `clear_sb`.
//!
//! A "restart" is simulated by deleting the array (superblocks stay) and re-registering its members: error bdevs
//! stacked on mallocs, re-created with the same UUIDs, so examine sees them arrive anew.

mod common;

use common::*;
use raid::sb::BaseState;
use raid::Level;

const BS: usize = 512;

struct Pair {
    m: [String; 2],
    ee: [String; 2],
    uuid: [uuid::Uuid; 2],
}

fn pair(p: &str, blocks: u64) -> Pair {
    let m = [format!("{p}_m0"), format!("{p}_m1")];
    malloc(&m[0], blocks, 512);
    malloc(&m[1], blocks, 512);
    let ee = [error_bdev(&m[0]), error_bdev(&m[1])];
    let uuid = [uuid_of(&ee[0]), uuid_of(&ee[1])];
    Pair { m, ee, uuid }
}

impl Pair {
    /// Unregisters the error bdevs (the "shutdown").
    fn down(&self) {
        for e in &self.ee {
            if bdev_exists(e) {
                unregister(e);
            }
        }
    }
    /// Registers member `i` again (it "comes back" after the restart).
    fn up(&self, i: usize) {
        error_bdev_uuid(&self.m[i], self.uuid[i]);
    }
}

#[test]
fn superblock_layout_and_reassembly_in_any_order() {
    with_reactors("0x1", || {
        let p = pair("sa", 4096);
        raid_create("sa_r", Level::Raid1, &[&p.ee[0], &p.ee[1]], 0, true).unwrap();
        let v = info("sa_r").unwrap();
        assert_eq!(v["superblock"], true);
        assert_eq!(v["base_bdevs_list"][0]["data_offset"], 2048);
        assert_eq!(v["base_bdevs_list"][0]["data_size"], 2048);
        let raid_uuid: uuid::Uuid = v["uuid"].as_str().unwrap().parse().unwrap();
        assert!(app_sync(|| bdev::get("sa_r").unwrap().num_blocks()) == 2048);
        // Not in save_config: the superblock is the configuration.
        assert!(app_sync(|| bdev::get("sa_r").unwrap().write_config()).is_none());

        let s = superblock_of(&p.m[0]).expect("superblock on member 0");
        assert_eq!(s.name, "sa_r");
        assert_eq!(s.uuid, raid_uuid);
        assert_eq!(s.level, 1);
        assert_eq!(s.block_size, 512);
        assert_eq!(s.raid_size, 2048);
        assert_eq!(s.num_base_bdevs, 2);
        assert!(s.seq_number >= 1);
        assert_eq!(s.base_bdevs.len(), 2);
        assert_eq!(s.base_bdevs[1].uuid, p.uuid[1]);
        assert_eq!(s.base_bdevs[1].state, BaseState::Configured);
        assert_eq!(s.base_bdevs[1].data_offset, 2048);
        assert_eq!(superblock_of(&p.m[1]), Some(s.clone()));

        let data = pattern_vec(BS, 5, 32, 11);
        assert_eq!(write("sa_r", 5, data.clone()), bdev::IoStatus::Success);
        assert_eq!(read(&p.m[1], 2048 + 5, 32).unwrap(), data);

        for order in [[1, 0], [0, 1]] {
            raid_delete("sa_r", false).unwrap();
            p.down();
            p.up(order[0]);
            wait_for("configuring from superblock", 5, || {
                info("sa_r").is_some_and(|v| v["num_base_bdevs_discovered"] == 1)
            });
            let v = info("sa_r").unwrap();
            assert_eq!(v["state"], "configuring");
            assert_eq!(v["superblock"], true);
            assert_eq!(v["uuid"], raid_uuid.to_string());
            p.up(order[1]);
            wait_for("online again", 5, || state("sa_r") == "online");
            assert_eq!(uuid_of("sa_r"), raid_uuid);
            assert_eq!(read("sa_r", 5, 32).unwrap(), data);
        }

        // clear_sb wipes the superblocks.
        raid_delete("sa_r", true).unwrap();
        assert!(superblock_of(&p.m[0]).is_none());
        assert!(superblock_of(&p.m[1]).is_none());
        p.down();
        p.up(0);
        p.up(1);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(info("sa_r").is_none());
        p.down();
        unregister(&p.m[0]);
        unregister(&p.m[1]);
    });
}

#[test]
fn stale_member_is_not_trusted_and_is_rebuilt_when_it_returns() {
    with_reactors("0x1", || {
        let p = pair("st", 4096);
        raid_create("st_r", Level::Raid1, &[&p.ee[0], &p.ee[1]], 0, true).unwrap();
        let v1 = pattern_vec(BS, 0, 64, 1);
        assert_eq!(write("st_r", 0, v1.clone()), bdev::IoStatus::Success);
        // Member 1 fails a write: it is removed and recorded as failed on member 0.
        inject(&p.ee[1], "write", 1);
        let v2 = pattern_vec(BS, 0, 64, 2);
        assert_eq!(write("st_r", 0, v2.clone()), bdev::IoStatus::Success);
        let v = info("st_r").unwrap();
        assert_eq!(v["num_base_bdevs_operational"], 1);
        let s0 = superblock_of(&p.m[0]).unwrap();
        let s1 = superblock_of(&p.m[1]).unwrap();
        assert!(s0.seq_number > s1.seq_number);
        assert_eq!(s0.base_bdevs[1].state, BaseState::Failed);
        assert_eq!(s1.base_bdevs[1].state, BaseState::Configured);
        // Member 1 holds the old data.
        assert_eq!(read(&p.m[1], 2048, 64).unwrap(), v1);

        // Restart; the stale member arrives first, then the good one: the newer superblock wins.
        raid_delete("st_r", false).unwrap();
        p.down();
        p.up(1);
        wait_for("assembling from the stale superblock", 5, || {
            info("st_r").is_some()
        });
        assert_eq!(state("st_r"), "configuring");
        p.up(0);
        wait_for("online degraded", 5, || state("st_r") == "online");
        let v = info("st_r").unwrap();
        assert_eq!(v["num_base_bdevs_discovered"], 1);
        assert_eq!(v["num_base_bdevs_operational"], 1);
        assert!(!claimed(&p.ee[1]), "stale member must not be used");
        assert_eq!(read("st_r", 0, 64).unwrap(), v2);

        // Restart again; the good member first: online degraded at once, and the stale one, when it shows up,
        // is rebuilt rather than trusted.
        raid_delete("st_r", false).unwrap();
        p.down();
        p.up(0);
        wait_for("online degraded", 5, || state("st_r") == "online");
        assert_eq!(info("st_r").unwrap()["num_base_bdevs_operational"], 1);
        p.up(1);
        wait_for("rebuilt", 20, || {
            info("st_r")
                .is_some_and(|v| v["num_base_bdevs_discovered"] == 2 && v.get("process").is_none())
        });
        assert_eq!(read(&p.m[1], 2048, 64).unwrap(), v2);
        wait_for("superblock records the rebuilt member", 5, || {
            superblock_of(&p.m[1]).is_some_and(|s| s.base_bdevs[1].state == BaseState::Configured)
        });
        let s0 = superblock_of(&p.m[0]).unwrap();
        assert_eq!(s0.base_bdevs[1].state, BaseState::Configured);
        assert_eq!(superblock_of(&p.m[1]).unwrap().seq_number, s0.seq_number);

        raid_delete("st_r", true).unwrap();
        p.down();
        unregister(&p.m[0]);
        unregister(&p.m[1]);
    });
}

#[test]
fn a_member_of_another_array_is_refused() {
    with_reactors("0x1", || {
        malloc("ot_m0", 4096, 512);
        malloc("ot_m1", 4096, 512);
        malloc("ot_m2", 4096, 512);
        raid_create("ot_a", Level::Raid1, &["ot_m0", "ot_m1"], 0, true).unwrap();
        raid_delete("ot_a", false).unwrap();
        // ot_m0 still carries ot_a's superblock.
        let e = raid_create("ot_b", Level::Raid1, &["ot_m2", "ot_m0"], 0, false).unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST);
        wait_for("failed array deleted", 5, || info("ot_b").is_none());
        assert!(!claimed("ot_m2"));
        for m in ["ot_m0", "ot_m1", "ot_m2"] {
            unregister(m);
        }
    });
}
