//! The passthru bdev, stacked, under load, through real reactors; and the RPC-level behaviour SPDK defines
//! (deferred creation until the base arrives, delete, hot-remove).

mod common;
use common::*;

use std::cell::RefCell;
use std::rc::Rc;

use bdev::modules::passthru;
use bdev::{IoStatus, IoType};

fn make_pt(base: &str, name: &str) {
    let (b, n) = (base.to_string(), name.to_string());
    app(move || passthru::create(&b, &n, None).map_err(|e| e.to_string())).expect("passthru");
}

/// Verify load state: each task owns slot `task` and writes, then reads back and compares, round after round.
struct Load {
    name: String,
    rounds_left: Vec<u32>,
    mismatches: u32,
    failures: u32,
    done_ios: u32,
    resets_ok: u32,
    /// I/Os a reset aborted (submitted while the channels were frozen), each retried, as a host does.
    aborted: u32,
    in_flight: u32,
    finish: Option<Reply<Outcome>>,
}

/// What a load ends with: I/Os done, mismatches, failures, resets completed, I/Os aborted by resets.
type Outcome = (u32, u32, u32, u32, u32);

const SLOT_BLOCKS: u64 = 8;

fn slot_data(task: usize, round: u32) -> Vec<u8> {
    pattern(task as u32 * 7919 + round, (SLOT_BLOCKS * 512) as usize)
}

fn start_write(load: &Rc<RefCell<Load>>, task: usize) {
    let (name, round) = {
        let l = load.borrow();
        (l.name.clone(), l.rounds_left[task])
    };
    load.borrow_mut().in_flight += 1;
    let l2 = load.clone();
    submit(
        &chan(&name, true),
        IoType::Write,
        task as u64 * SLOT_BLOCKS,
        SLOT_BLOCKS,
        Some(slot_data(task, round)),
        Box::new(move |(st, _)| {
            l2.borrow_mut().in_flight -= 1;
            match st {
                IoStatus::Success => start_read(&l2, task),
                IoStatus::Aborted => {
                    l2.borrow_mut().aborted += 1;
                    start_write(&l2, task)
                }
                _ => {
                    l2.borrow_mut().failures += 1;
                    start_read(&l2, task)
                }
            }
        }),
    );
}

fn start_read(load: &Rc<RefCell<Load>>, task: usize) {
    let name = load.borrow().name.clone();
    load.borrow_mut().in_flight += 1;
    let l2 = load.clone();
    submit(
        &chan(&name, true),
        IoType::Read,
        task as u64 * SLOT_BLOCKS,
        SLOT_BLOCKS,
        None,
        Box::new(move |(st, data)| {
            if st == IoStatus::Aborted {
                {
                    let mut l = l2.borrow_mut();
                    l.in_flight -= 1;
                    l.aborted += 1;
                }
                return start_read(&l2, task);
            }
            let again = {
                let mut l = l2.borrow_mut();
                l.in_flight -= 1;
                l.done_ios += 2;
                let round = l.rounds_left[task];
                if st != IoStatus::Success {
                    l.failures += 1;
                } else if data != slot_data(task, round) {
                    l.mismatches += 1;
                }
                l.rounds_left[task] -= 1;
                // A reset in the middle of the load, every 50 I/Os.
                if l.done_ios.is_multiple_of(50) {
                    l.in_flight += 1;
                    let l3 = l2.clone();
                    let name = l.name.clone();
                    submit(
                        &chan(&name, true),
                        IoType::Reset,
                        0,
                        0,
                        None,
                        Box::new(move |(st, _)| {
                            let mut l = l3.borrow_mut();
                            l.in_flight -= 1;
                            if st == IoStatus::Success {
                                l.resets_ok += 1;
                            } else {
                                l.failures += 1;
                            }
                            maybe_finish(&mut l);
                        }),
                    );
                }
                l.rounds_left[task] > 0
            };
            if again {
                start_write(&l2, task);
            } else {
                maybe_finish(&mut l2.borrow_mut());
            }
        }),
    );
}

fn maybe_finish(l: &mut Load) {
    if l.in_flight == 0 && l.rounds_left.iter().all(|r| *r == 0) {
        if let Some(f) = l.finish.take() {
            f((l.done_ios, l.mismatches, l.failures, l.resets_ok, l.aborted));
        }
    }
}

#[test]
fn three_deep_stack_under_verify_load_with_resets() {
    with_reactors("0x1", || {
        create_malloc("m0", 4096);
        // Created top-down: each waits for its base, then appears when the one below registers.
        make_pt("pt2", "pt3");
        make_pt("pt1", "pt2");
        make_pt("m0", "pt1");
        let names: Vec<String> =
            app(|| bdev::list().iter().map(|b| b.name().to_string()).collect());
        for n in ["pt1", "pt2", "pt3"] {
            assert!(names.contains(&n.to_string()), "{n} missing: {names:?}");
        }
        assert_eq!(
            app(|| bdev::get("pt2").unwrap().claimed_by()),
            Some("passthru".to_string())
        );
        let (ios, mismatches, failures, resets, aborted) = on_app(|reply| {
            let tasks = 32;
            let load = Rc::new(RefCell::new(Load {
                name: "pt3".into(),
                rounds_left: vec![20; tasks],
                mismatches: 0,
                failures: 0,
                done_ios: 0,
                resets_ok: 0,
                aborted: 0,
                in_flight: 0,
                finish: Some(reply),
            }));
            for t in 0..tasks {
                start_write(&load, t);
            }
        });
        assert_eq!(ios, 32 * 20 * 2);
        assert_eq!((mismatches, failures), (0, 0));
        assert!(resets >= 20, "only {resets} resets");
        // Resets froze the stack: I/O submitted meanwhile was aborted (and retried), as SPDK's reset does.
        assert!(aborted > 0, "no I/O was aborted by {resets} resets");
        // What the top wrote is on the base, at the same blocks.
        let top = on_app(|reply| {
            submit(
                &chan("m0", false),
                IoType::Read,
                5 * SLOT_BLOCKS,
                SLOT_BLOCKS,
                None,
                Box::new(move |(_, d)| reply(d)),
            )
        });
        assert_eq!(top, slot_data(5, 1));
        // Every layer counted the reads: the bdev layer ran for each.
        for n in ["pt3", "pt2", "pt1", "m0"] {
            let n2 = n.to_string();
            let st = on_app(move |reply| bdev::get(&n2).unwrap().get_iostat(reply));
            assert!(st.read.ops >= 32 * 20, "{n}: {} reads", st.read.ops);
        }
    });
}

#[test]
fn delete_and_hot_remove_follow_spdk() {
    with_reactors("0x1", || {
        create_malloc("pb0", 1024);
        make_pt("pb0", "pp0");
        // Same name again: EEXIST, whatever the base.
        let e = app(|| passthru::create("pb0", "pp0", None).map_err(|e| e.errno()));
        assert_eq!(e, Err(libc::EEXIST));
        // Hot-remove of the base takes the passthru with it, and it comes back with a new base of that name.
        on_app(|reply| {
            bdev::get("pb0")
                .unwrap()
                .unregister(move |r| reply(r.is_ok()))
        });
        assert!(app(|| bdev::get("pp0").is_none()));
        create_malloc("pb0", 1024);
        assert!(app(|| bdev::get("pp0").is_some()));
        // Delete forgets it: the base no longer brings it back.
        let ok = on_app(|reply| passthru::delete("pp0", move |r| reply(r.is_ok())));
        assert!(ok);
        assert!(app(|| bdev::get("pb0").unwrap().claimed_by().is_none()));
        on_app(|reply| {
            bdev::get("pb0")
                .unwrap()
                .unregister(move |r| reply(r.is_ok()))
        });
        create_malloc("pb0", 1024);
        assert!(app(|| bdev::get("pp0").is_none()));
        let gone =
            on_app(|reply| passthru::delete("pp0", move |r| reply(r.map_err(|e| e.errno()))));
        assert_eq!(gone, Err(libc::ENODEV));
    });
}
