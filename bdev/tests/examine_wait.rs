//! `bdev_wait_for_examine` waits for examine callbacks that continue asynchronously (they hold an
//! `ExamineGuard`), and answers at once when none is pending.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev::ExamineGuard;
use jsonrpc::{Registry, Responder};

#[test]
fn wait_for_examine_waits_for_guards() {
    let out = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    reactor::testing::run("0x1", Duration::from_secs(30), move || {
        let mut reg = Registry::new();
        bdev::rpc::register_rpcs(&mut reg);
        reg.set_state(jsonrpc::STATE_RUNTIME);
        let h = reg.lookup("bdev_wait_for_examine").unwrap();
        // Nothing pending: answered at once.
        let (r, rx) = Responder::local("bdev_wait_for_examine");
        h(None, r);
        o.lock()
            .unwrap()
            .push(format!("idle:{}", rx.try_recv().is_ok()));
        // A pending examine holds the answer back until its guard is dropped.
        let guard = ExamineGuard::new();
        let (r, rx) = Responder::local("bdev_wait_for_examine");
        h(None, r);
        o.lock()
            .unwrap()
            .push(format!("held:{}", rx.try_recv().is_ok()));
        let o2 = o.clone();
        reactor::timer(2000, move || {
            o2.lock()
                .unwrap()
                .push(format!("before-drop:{}", rx.try_recv().is_ok()));
            drop(guard);
            let o3 = o2.clone();
            reactor::timer(2000, move || {
                o3.lock()
                    .unwrap()
                    .push(format!("after-drop:{}", rx.try_recv().is_ok()));
                reactor::stop();
            })
            .detach();
        })
        .detach();
    });
    assert_eq!(
        *out.lock().unwrap(),
        [
            "idle:true",
            "held:false",
            "before-drop:false",
            "after-drop:true"
        ]
    );
}
