//! A bare NVMe/TCP target without the RPC layer: one malloc namespace at 127.0.0.1:PORT (default 4420) under
//! nqn.2016-06.io.spdk:cnode1, any host allowed. For poking the transport with other initiators by hand.

use std::time::Duration;

use nvmf::mgmt;
use nvmf::tgt::{SubsysOpts, Trid};
use nvmf::transport::TransportOpts;

fn main() {
    let port = std::env::args().nth(1).unwrap_or_else(|| "4420".into());
    let mask = std::env::args().nth(2).unwrap_or_else(|| "0x1".into());
    let _ = env_logger_init();
    let opts = reactor::Options {
        cpumask: reactor::CpuMask::parse(&mask).expect("cpumask"),
        main_core: None,
        idle_backoff: false,
        pin: false,
    };
    reactor::run(opts, move || {
        bdev::modules::malloc::create(bdev::modules::malloc::MallocOpts {
            name: Some("Malloc0".into()),
            num_blocks: 131072,
            block_size: 512,
            ..Default::default()
        })
        .expect("malloc");
        mgmt::create_transport(
            "tcp",
            TransportOpts::default(),
            serde_json::json!({}),
            10_000,
            move |r| {
                r.expect("transport");
                let nqn = "nqn.2016-06.io.spdk:cnode1";
                mgmt::create_subsystem(&SubsysOpts {
                    nqn: nqn.into(),
                    serial_number: "SPDK00000000000001".into(),
                    model_number: "SPDK bdev Controller".into(),
                    allow_any_host: true,
                    ana_reporting: false,
                    max_namespaces: 32,
                    min_cntlid: 1,
                    max_cntlid: 0xffef,
                })
                .expect("subsystem");
                let trid = Trid {
                    trtype: "TCP".into(),
                    adrfam: "IPv4".into(),
                    traddr: "127.0.0.1".into(),
                    trsvcid: port.clone(),
                };
                mgmt::add_listener(nqn, trid.clone(), None, false).expect("listener");
                mgmt::add_listener(nvme_proto::fabrics::DISCOVERY_NQN, trid, None, false)
                    .expect("discovery listener");
                mgmt::add_ns(
                    nqn,
                    mgmt::NsOpts {
                        bdev_name: "Malloc0".into(),
                        ..Default::default()
                    },
                    |r| println!("namespace {:?}; serving", r.map_err(|e| e.to_string())),
                );
            },
        );
    })
    .expect("reactors");
    std::thread::sleep(Duration::from_millis(10));
}

fn env_logger_init() -> Option<()> {
    struct L;
    impl log::Log for L {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= log::Level::Info
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                eprintln!("[{}] {}", r.level(), r.args());
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: L = L;
    log::set_logger(&LOGGER).ok()?;
    log::set_max_level(log::LevelFilter::Info);
    Some(())
}
