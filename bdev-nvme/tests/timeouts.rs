//! Command timeouts (`bdev_nvme_set_options` `timeout_us` / `action_on_timeout`) against this project's own
//! target, in one process: a namespace on an error bdev that holds a read (`pending`) until it is aborted or the
//! bdev reset. With `abort`, the host sends an Abort for the timed-out read: it fails as aborted, the controller
//! stays as it was and serves on. With `reset`, the controller is reset and the read, sent again on the new
//! connection, succeeds.

mod common;

use std::time::{Duration, Instant};

use bdev::modules::error::{self, ErrorType, InjectOpts};
use bdev::{IoStatus, IoType};
use common::*;
use nvmf::mgmt;
use nvmf::params::NamespaceParams;
use reactor::testing::{app, on_app};
use subsystems::bdev_nvme::{ActionOnTimeout, NvmeOptions};

#[test]
fn timed_out_reads_are_aborted_or_reset() {
    run(body);
}

fn set_timeouts(action: ActionOnTimeout) {
    app(move || {
        bdev_nvme::set_options(&NvmeOptions {
            timeout_us: 300_000,
            action_on_timeout: action,
            ..Default::default()
        })
    });
}

fn hold_next_read() {
    app(|| error::inject_error("EE_OwnM2", InjectOpts::new("read", ErrorType::Pending)).unwrap());
}

fn cntlid() -> u64 {
    let v = app(|| bdev_nvme::controllers_json(Some("Nvme0")).unwrap());
    v[0]["ctrlrs"][0]["cntlid"].as_u64().unwrap()
}

fn body() {
    let port = target();
    // Namespace 3: an error bdev over the third malloc bdev.
    let r: Result<(), String> = on_app(|reply| {
        error::create("OwnM2", None).unwrap();
        mgmt::add_ns(NQN, NamespaceParams::new("EE_OwnM2"), move |r| {
            reply(r.map(|_| ()).map_err(|e| e.to_string()))
        });
    });
    r.unwrap();
    set_timeouts(ActionOnTimeout::Abort);
    let names = attach(params("Nvme0", port)).expect("attach");
    assert_eq!(names, vec!["Nvme0n1", "Nvme0n2", "Nvme0n3"]);
    let before = cntlid();

    // Abort: the held read fails as aborted after the timeout; the controller is untouched.
    hold_next_read();
    let t0 = Instant::now();
    let (st, _) = io("Nvme0n3", IoType::Read, 0, 8, None);
    let took = t0.elapsed();
    assert_eq!(st, IoStatus::Aborted, "after {took:?}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert_eq!(cntlid(), before, "an abort must not reset the controller");
    assert_eq!(io("Nvme0n3", IoType::Read, 0, 8, None).0, IoStatus::Success);
    assert_eq!(io("Nvme0n1", IoType::Read, 0, 8, None).0, IoStatus::Success);

    // Reset: the controller is made again and the read, sent again, succeeds.
    set_timeouts(ActionOnTimeout::Reset);
    hold_next_read();
    let t0 = Instant::now();
    let (st, _) = io("Nvme0n3", IoType::Read, 8, 8, None);
    let took = t0.elapsed();
    assert_eq!(st, IoStatus::Success, "after {took:?}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert_ne!(cntlid(), before, "the controller was not reset");
    // The first connection's read is still held on the target: a reset of the error bdev lets it go.
    assert_eq!(
        io("EE_OwnM2", IoType::Reset, 0, 0, None).0,
        IoStatus::Success
    );

    // None: the read just waits; released by the target-side reset, it completes.
    set_timeouts(ActionOnTimeout::None);
    hold_next_read();
    let waiter = std::thread::spawn(|| io("Nvme0n3", IoType::Read, 16, 8, None).0);
    std::thread::sleep(Duration::from_millis(700));
    assert!(!waiter.is_finished(), "the read did not wait");
    let after = cntlid();
    assert_eq!(
        io("EE_OwnM2", IoType::Reset, 0, 0, None).0,
        IoStatus::Success
    );
    // Failed by the error bdev's reset, then retried by the host (not Do Not Retry): it reads.
    assert_eq!(waiter.join().unwrap(), IoStatus::Success);
    assert_eq!(cntlid(), after);
    detach("Nvme0");
    app(|| bdev_nvme::set_options(&NvmeOptions::default()));
}
