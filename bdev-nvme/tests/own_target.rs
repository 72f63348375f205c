//! `bdev_nvme` against this project's own NVMe-oF/TCP target, in one process over loopback: attach (one bdev per
//! namespace), data written through the NVMe bdev checked on the target's malloc bdevs and back, unmap and write
//! zeroes, the RPC answers, detach and attach again, and refused attaches.

mod common;

use std::time::Duration;

use bdev::{IoStatus, IoType};
use bdev_nvme::AttachParams;
use common::*;
use nvmf::mgmt;
use nvmf::params::NamespaceParams;
use reactor::testing::{app, on_app};

#[test]
fn attach_io_detach_against_own_target() {
    run(body);
}

fn body() {
    let started = std::time::Instant::now();
    let port = target();
    let names = attach(params("Nvme0", port)).expect("attach");
    assert_eq!(names, vec!["Nvme0n1", "Nvme0n2"]);
    let info =
        app(|| bdev::get("Nvme0n1").map(|b| (b.block_size(), b.num_blocks(), b.module_name())));
    assert_eq!(info, Some((BS, BLOCKS, "nvme")));

    // Data: a 64 KiB write (R2T path) and a 4 KiB one (in-capsule), read back through NVMe and on the target's
    // malloc bdev itself.
    let big = pattern(7, 128 * BS as usize);
    assert_eq!(
        io("Nvme0n1", IoType::Write, 100, 128, Some(big.clone())).0,
        IoStatus::Success
    );
    let small = pattern(9, 8 * BS as usize);
    assert_eq!(
        io("Nvme0n2", IoType::Write, 5, 8, Some(small.clone())).0,
        IoStatus::Success
    );
    assert_eq!(
        io("Nvme0n1", IoType::Read, 100, 128, None),
        (IoStatus::Success, big.clone())
    );
    assert_eq!(
        io("OwnM0", IoType::Read, 100, 128, None).1,
        big,
        "on the target's bdev"
    );
    assert_eq!(
        io("OwnM1", IoType::Read, 5, 8, None).1,
        small,
        "namespace 2"
    );
    // Unmap and write zeroes reach the target (malloc reads zeroes after either).
    assert_eq!(
        io("Nvme0n1", IoType::Unmap, 100, 8, None).0,
        IoStatus::Success
    );
    assert_eq!(
        io("Nvme0n1", IoType::WriteZeroes, 108, 8, None).0,
        IoStatus::Success
    );
    let after = io("OwnM0", IoType::Read, 100, 24, None).1;
    assert!(after[..16 * BS as usize].iter().all(|&b| b == 0));
    assert_eq!(
        after[16 * BS as usize..],
        big[16 * BS as usize..24 * BS as usize]
    );
    assert_eq!(
        io("Nvme0n1", IoType::Flush, 0, BLOCKS, None).0,
        IoStatus::Success
    );
    // Out of range: the bdev layer refuses it before the wire.
    assert_eq!(
        io("Nvme0n1", IoType::Read, BLOCKS, 1, None).0,
        IoStatus::Failed(libc::EINVAL)
    );

    // RPC answers.
    let c = app(|| bdev_nvme::controllers_json(None).unwrap());
    let c0 = &c[0];
    assert_eq!(c0["name"], "Nvme0");
    let ctrlr = &c0["ctrlrs"][0];
    assert_eq!(ctrlr["state"], "enabled");
    assert_eq!(ctrlr["trid"]["trtype"], "TCP");
    assert_eq!(ctrlr["trid"]["adrfam"], "IPv4");
    assert_eq!(ctrlr["trid"]["trsvcid"], port.to_string());
    assert_eq!(ctrlr["trid"]["subnqn"], NQN);
    assert!(ctrlr["cntlid"].as_u64().unwrap() > 0);
    assert!(app(|| bdev_nvme::controllers_json(Some("Nope")).is_err()));
    let cfg = app(bdev_nvme::config_entries);
    assert_eq!(cfg[0]["method"], "bdev_nvme_attach_controller");
    assert_eq!(cfg[0]["params"]["name"], "Nvme0");
    assert_eq!(cfg[0]["params"]["traddr"], "127.0.0.1");
    // The saved entry attaches again (parameters SPDK's decoder would take).
    let again: AttachParams = serde_json::from_value(cfg[0]["params"].clone()).unwrap();

    // A reset: the connection is made again, a second reset meanwhile is refused, I/O goes on after it.
    let (first, second): (Result<(), String>, Result<(), String>) = on_app(|reply| {
        let got = std::rc::Rc::new(std::cell::RefCell::new(None));
        let g = got.clone();
        bdev_nvme::reset("Nvme0", None, move |r| {
            let second = g.borrow_mut().take().unwrap_or(Ok(()));
            reply((r.map_err(|e| e.to_string()), second));
        });
        bdev_nvme::reset("Nvme0", None, move |r| {
            *got.borrow_mut() = Some(r.map_err(|e| e.to_string()));
        });
    });
    first.unwrap();
    assert!(second.unwrap_err().contains("being reset"));
    assert_eq!(
        io("Nvme0n1", IoType::Read, 120, 8, None).1,
        big[20 * BS as usize..28 * BS as usize]
    );
    let r: Result<(), String> = on_app(|reply| {
        bdev_nvme::reset("Nope", None, move |r| reply(r.map_err(|e| e.to_string())))
    });
    assert!(r.is_err());

    // Refusals: the same name again (multipath disabled), nobody listening, an unknown subsystem.
    let e = attach(params("Nvme0", port)).unwrap_err();
    assert!(e.contains("already exists"), "{e}");
    let e = attach(params("Nvme1", free_port())).unwrap_err();
    assert!(!e.is_empty());
    let mut p = params("Nvme2", port);
    p.subnqn = Some("nqn.2016-06.io.spdk:nobody".into());
    let e = attach(p).unwrap_err();
    assert!(e.contains("Connect"), "{e}");
    assert_eq!(
        app(|| bdev_nvme::controllers_json(None).unwrap())
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Detach: the bdevs go; attach again from the saved entry and the data is still there.
    detach("Nvme0");
    assert!(app(
        || bdev::get("Nvme0n1").is_none() && bdev::get("Nvme0n2").is_none()
    ));
    assert_eq!(attach(again).unwrap(), vec!["Nvme0n1", "Nvme0n2"]);
    assert_eq!(
        io("Nvme0n2", IoType::Read, 5, 8, None),
        (IoStatus::Success, small)
    );
    detach("Nvme0");
    eprintln!("attach/io/detach done in {:?}", started.elapsed());

    // The path goes away and comes back within ctrlr_loss_timeout_sec: I/O issued meanwhile waits and then
    // succeeds, no error reaches the submitter, and the controller reads enabled again.
    let mut p = params("Nvme0", port);
    p.ctrlr_loss_timeout_sec = Some(20);
    p.reconnect_delay_sec = Some(1);
    assert_eq!(attach(p).unwrap(), vec!["Nvme0n1", "Nvme0n2"]);
    listener(port, false);
    let during = pattern(3, 16 * BS as usize);
    let d = during.clone();
    let writer = std::thread::spawn(move || io("Nvme0n1", IoType::Write, 300, 16, Some(d)).0);
    wait_state("Nvme0", &["resetting", "reconnect_is_delayed"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!writer.is_finished(), "the write waits for the controller");
    listener(port, true);
    assert_eq!(writer.join().unwrap(), IoStatus::Success);
    wait_state("Nvme0", &["enabled"]);
    assert_eq!(io("OwnM0", IoType::Read, 300, 16, None).1, during);
    assert_eq!(io("Nvme0n1", IoType::Read, 300, 16, None).1, during);
    detach("Nvme0");

    // Gone for longer: I/O fails once fast_io_fail_timeout_sec has passed, and after ctrlr_loss_timeout_sec
    // the controller and its bdevs are deleted (a RAID above would see its base go).
    let mut p = params("Nvme0", port);
    p.ctrlr_loss_timeout_sec = Some(3);
    p.reconnect_delay_sec = Some(1);
    p.fast_io_fail_timeout_sec = Some(1);
    assert_eq!(attach(p).unwrap(), vec!["Nvme0n1", "Nvme0n2"]);
    listener(port, false);
    let t0 = std::time::Instant::now();
    assert_eq!(
        io("Nvme0n1", IoType::Read, 0, 8, None).0,
        IoStatus::Failed(libc::ENXIO)
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "failed fast, not at once: {:?}",
        t0.elapsed()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while app(|| bdev::get("Nvme0n1").is_some()) {
        assert!(
            std::time::Instant::now() < deadline,
            "controller never deleted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        t0.elapsed() >= Duration::from_secs(3),
        "deleted before the loss timeout"
    );
    assert!(app(|| bdev_nvme::controllers_json(None).unwrap())
        .as_array()
        .unwrap()
        .is_empty());
    // A bad knob combination is refused as SPDK refuses it.
    let mut p = params("Nvme0", port);
    p.ctrlr_loss_timeout_sec = Some(5);
    assert!(attach(p).unwrap_err().contains("do not fit"));
    listener(port, true);

    // A namespace added on the target later becomes a bdev (Asynchronous Event, rescan); one removed stops
    // being one.
    assert_eq!(
        attach(params("Nvme0", port)).unwrap(),
        vec!["Nvme0n1", "Nvme0n2"]
    );
    let nsid: Result<u32, String> = on_app(|reply| {
        mgmt::add_ns(NQN, NamespaceParams::new("OwnM2"), move |r| {
            reply(r.map_err(|e| e.to_string()))
        })
    });
    assert_eq!(nsid.unwrap(), 3);
    wait_bdev("Nvme0n3", true);
    let big = pattern(11, 64 * BS as usize);
    assert_eq!(
        io("Nvme0n3", IoType::Write, 0, 64, Some(big.clone())).0,
        IoStatus::Success
    );
    assert_eq!(io("OwnM2", IoType::Read, 0, 64, None).1, big);
    let r: Result<(), String> =
        on_app(|reply| mgmt::remove_ns(NQN, 3, move |r| reply(r.map_err(|e| e.to_string()))));
    r.unwrap();
    wait_bdev("Nvme0n3", false);
    assert!(app(|| bdev::get("Nvme0n1").is_some()));
    detach("Nvme0");
    eprintln!("body done in {:?}", started.elapsed());
}
