//! Channel creation that fails (SPDK's `spdk_get_io_channel` returning NULL): `Desc::try_channel` reports the
//! module's error, I/O through such a channel fails with its errno instead of reaching the module, and a later
//! attempt on the thread, once the failed channel is let go, tries the module again.

mod common;
use common::*;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bdev::{
    Bdev, BdevError, BdevOps, BdevParams, ErrorKind, IoHandle, IoStatus, IoType, ModuleChannel,
};

/// Refuses its first `fail` channels (ENOMEM: no queue pair), then makes working ones.
struct Flaky {
    fail: u32,
    tries: Arc<AtomicU32>,
}

struct Works;

impl ModuleChannel for Works {
    fn submit(&mut self, io: IoHandle) {
        io.complete(IoStatus::Success);
    }
}

impl BdevOps for Flaky {
    fn module_name(&self) -> &'static str {
        "flaky"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        t == IoType::Unmap
    }
    fn create_channel(&self, _b: &Bdev) -> Box<dyn ModuleChannel> {
        Box::new(Works)
    }
    fn try_create_channel(&self, b: &Bdev) -> bdev::Result<Box<dyn ModuleChannel>> {
        if self.tries.fetch_add(1, Ordering::SeqCst) < self.fail {
            return Err(BdevError::new(ErrorKind::NoMemory, "no queue pair"));
        }
        Ok(self.create_channel(b))
    }
}

fn unmap(ch: &bdev::IoChannel, reply: Reply<IoStatus>) {
    let cb = bdev::Completion::Closure(Box::new(move |io: IoHandle| reply(io.status())));
    ch.submit_nodata(IoType::Unmap, 0, 1, cb, 0).unwrap();
}

#[test]
fn a_channel_that_cannot_be_made_fails_its_io_and_is_tried_again() {
    with_reactors("0x1", || {
        let tries = Arc::new(AtomicU32::new(0));
        let t2 = tries.clone();
        app(move || {
            bdev::register(
                BdevParams::new("flaky0", 512, 64),
                Box::new(Flaky { fail: 2, tries: t2 }),
            )
            .map(|_| ())
        })
        .unwrap();
        let (kind, errno) = app(|| {
            let d = bdev::open("flaky0", true, None).unwrap();
            let e = d.try_channel().err().expect("the first channel fails");
            (e.kind, e.errno())
        });
        assert_eq!((kind, errno), (ErrorKind::NoMemory, libc::ENOMEM));
        // The infallible handle still works as an API: its I/O fails with the module's errno.
        let st = on_app(|reply| {
            let d = bdev::open("flaky0", true, None).unwrap();
            unmap(&d.channel(), reply)
        });
        assert_eq!(st, IoStatus::Failed(libc::ENOMEM));
        // Third attempt: the module makes it, I/O reaches the module.
        let st = on_app(|reply| {
            let d = bdev::open("flaky0", true, None).unwrap();
            let ch = d.try_channel().expect("made this time");
            unmap(&ch, reply)
        });
        assert_eq!(st, IoStatus::Success);
        assert_eq!(tries.load(Ordering::SeqCst), 3);
    });
}
