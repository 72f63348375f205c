//! On malloc bdevs: compare (both copies made through raw pointers, never a slice over the backing memory), the
//! per-channel statistics of `bdev_get_iostat` (SPDK's `per_channel`), and the `memory_domains` SPDK prints for
//! malloc bdevs only.

mod common;
use common::*;

use std::cell::RefCell;
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use bdev::{Desc, IoChannel, IoStatus, IoType};
use jsonrpc::{Registry, Responder, RpcError};
use serde_json::{json, Value};

thread_local! {
    /// Descriptors and channels a test keeps open on a worker thread.
    static HELD: RefCell<Vec<(Desc, IoChannel)>> = const { RefCell::new(Vec::new()) };
}

fn create(name: &str, blocks: u64) {
    create_malloc(name, blocks)
}

/// One I/O on the app thread's channel, waited for: (status, data read back).
fn io(name: &str, t: IoType, offset: u64, data: Vec<u8>) -> IoStatus {
    let name = name.to_string();
    let blocks = data.len() as u64 / 512;
    on_app(move |reply: Reply<(IoStatus, Vec<u8>)>| {
        submit(
            &chan(&name, true),
            t,
            offset,
            blocks,
            Some(data),
            reply as Box<dyn FnOnce(_)>,
        )
    })
    .0
}

/// Calls a bdev method as a client would (on the app thread) and waits for the answer.
fn call(method: &'static str, params: Value) -> Result<Value, RpcError> {
    let rx: Receiver<Result<Value, RpcError>> = app(move || {
        let mut reg = Registry::new();
        bdev::rpc::register_rpcs(&mut reg);
        reg.set_state(jsonrpc::STATE_RUNTIME);
        let (r, rx) = Responder::local(method);
        reg.dispatch(method, Some(params), r);
        rx
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("no answer")
}

#[test]
fn compare_matches_and_miscompares() {
    with_reactors("0x1", || {
        create("M_cmp", 64);
        let d = pattern(7, 4096);
        assert_eq!(io("M_cmp", IoType::Write, 8, d.clone()), IoStatus::Success);
        assert_eq!(
            io("M_cmp", IoType::Compare, 8, d.clone()),
            IoStatus::Success
        );
        let mut last = d.clone();
        last[4095] ^= 1;
        assert_eq!(
            io("M_cmp", IoType::Compare, 8, last),
            IoStatus::Miscompare,
            "the last byte differs"
        );
        let mut first = d;
        first[0] ^= 0x80;
        assert_eq!(
            io("M_cmp", IoType::Compare, 8, first),
            IoStatus::Miscompare,
            "the first byte differs"
        );
        assert_eq!(
            io("M_cmp", IoType::Compare, 32, vec![0; 8192]),
            IoStatus::Success,
            "never written: zeroes"
        );
    });
}

#[test]
fn per_channel_iostat_lists_each_thread_channel() {
    with_reactors("0x1", || {
        create("M_ch", 64);
        assert_eq!(
            io("M_ch", IoType::Write, 0, pattern(1, 4096)),
            IoStatus::Success
        );
        let app_id = reactor::app_thread().unwrap().id();
        let v = call(
            "bdev_get_iostat",
            json!({"name": "M_ch", "per_channel": true}),
        )
        .expect("per-channel iostat");
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["tick_rate", "ticks", "name", "channels"]);
        assert!(v["tick_rate"].as_u64().unwrap() > 0);
        assert_eq!(v["name"], "M_ch");
        let chans = v["channels"].as_array().unwrap();
        assert_eq!(chans.len(), 1, "{v}");
        let c = &chans[0];
        assert_eq!(c.as_object().unwrap().keys().next().unwrap(), "thread_id");
        assert_eq!(c["thread_id"], app_id);
        assert_eq!(c["num_write_ops"], 1);
        assert_eq!(c["bytes_written"], 4096);
        assert!(c.get("min_copy_latency_ticks").is_some(), "{c}");
        // reset_mode clears what was read, on the channel's thread.
        let v = call(
            "bdev_get_iostat",
            json!({"names": ["M_ch"], "per_channel": true, "reset_mode": "all"}),
        )
        .unwrap();
        assert_eq!(v["channels"][0]["num_write_ops"], 1);
        let v = call(
            "bdev_get_iostat",
            json!({"names": ["M_ch"], "per_channel": true}),
        )
        .unwrap();
        assert_eq!(v["channels"][0]["num_write_ops"], 0);
        // A second thread's channel is listed with its own thread id and counters.
        let worker = app(|| reactor::spawn_thread("iostat_worker", None).unwrap());
        let worker_id = worker.id();
        let (tx, rx) = mpsc::channel();
        worker.send(move || {
            let desc = bdev::open("M_ch", false, None).unwrap();
            let ch = desc.channel();
            HELD.with(|h| h.borrow_mut().push((desc, ch.clone())));
            let tx2 = tx.clone();
            submit(
                &ch,
                IoType::Read,
                0,
                2,
                None,
                Box::new(move |(st, _)| tx2.send(st).unwrap()),
            );
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            IoStatus::Success
        );
        let v = call(
            "bdev_get_iostat",
            json!({"names": ["M_ch"], "per_channel": true}),
        )
        .unwrap();
        let mut seen: Vec<(u64, u64, u64)> = v["channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let n = |k: &str| c[k].as_u64().unwrap();
                (n("thread_id"), n("num_read_ops"), n("bytes_read"))
            })
            .collect();
        seen.sort();
        let mut want = vec![(app_id, 0, 0), (worker_id, 1, 1024)];
        want.sort();
        assert_eq!(seen, want, "{v}");
        let (tx, rx) = mpsc::channel();
        worker.send(move || {
            HELD.with(|h| h.borrow_mut().clear());
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        worker.request_exit();
        // One bdev exactly, and an existing one.
        for p in [
            json!({"per_channel": true}),
            json!({"names": ["M_ch", "M_ch"], "per_channel": true}),
        ] {
            let e = call("bdev_get_iostat", p).unwrap_err();
            assert_eq!((e.code, e.message.as_str()), (-22, "Invalid argument"));
        }
        let e = call(
            "bdev_get_iostat",
            json!({"name": "nope", "per_channel": true}),
        )
        .unwrap_err();
        assert_eq!(e.code, -19);
    });
}

#[test]
fn bdev_get_bdevs_prints_malloc_memory_domains_as_spdk() {
    with_reactors("0x1", || {
        create("M_md", 16);
        let v = call("bdev_get_bdevs", json!({"name": "M_md"})).unwrap();
        let b = &v[0];
        let keys: Vec<&str> = b.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "name",
                "aliases",
                "product_name",
                "block_size",
                "num_blocks",
                "uuid",
                "assigned_rate_limits",
                "claimed",
                "zoned",
                "supported_io_types",
                "memory_domains",
                "driver_specific"
            ]
        );
        assert_eq!(
            b["memory_domains"],
            json!([
                {"dma_device_id": "system", "dma_device_type": 1},
                {"dma_device_id": "SPDK_ACCEL_DMA_DEVICE", "dma_device_type": 2}
            ])
        );
        // A null bdev has none, and SPDK then leaves the member out.
        app(|| {
            bdev::modules::null::create(bdev::modules::null::NullOpts {
                name: "N_md".into(),
                num_blocks: 16,
                block_size: 512,
                ..Default::default()
            })
            .map(|_| ())
            .unwrap()
        });
        let v = call("bdev_get_bdevs", json!({"name": "N_md"})).unwrap();
        assert!(v[0].get("memory_domains").is_none(), "{v}");
    });
}
