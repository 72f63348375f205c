//! A bare NVMe/TCP target without the RPC layer: one malloc namespace at 127.0.0.1:PORT (default 4420) under
//! nqn.2016-06.io.spdk:cnode1, any host allowed. For poking the transport with other initiators by hand.

use std::time::Duration;

use nvmf::mgmt;
use nvmf::params::{AnaState, ListenerConfig, NamespaceParams, NvmfCreateSubsystem, Trid};

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
        let opts = nvmf::params::TransportOpts::defaults(nvmf::params::TransportKind::Tcp);
        mgmt::create_transport(opts, None, move |r| {
            r.expect("transport");
            let nqn = "nqn.2016-06.io.spdk:cnode1";
            let mut sub = NvmfCreateSubsystem::new(nqn);
            sub.allow_any_host = true;
            sub.serial_number = "SPDK00000000000001".into();
            sub.normalize(false, 1, 1024).expect("subsystem options");
            mgmt::create_subsystem(sub);
            let trid = Trid::tcp("127.0.0.1", &port);
            let config = |nqn: &str| ListenerConfig {
                nqn: nqn.into(),
                listen_address: trid.clone(),
                secure_channel: false,
                sock_impl: None,
            };
            mgmt::add_listener(nqn, trid.clone(), AnaState::Optimized, config(nqn))
                .expect("listener");
            let d = nvme_proto::fabrics::DISCOVERY_NQN;
            mgmt::add_listener(d, trid.clone(), AnaState::Optimized, config(d))
                .expect("discovery listener");
            mgmt::add_ns(nqn, NamespaceParams::new("Malloc0"), |r| {
                println!("namespace {:?}; serving", r.map_err(|e| e.to_string()))
            });
        });
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
