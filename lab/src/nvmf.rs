//! NVMe-oF over TCP with the Linux kernel as the host: the target's JSON config (SPDK's format, for SPDK's
//! `nvmf_tgt` and ours alike) and the guest's side, whose helpers live in `/lab/nvmf.sh` (`lab/guest/nvmf.sh`,
//! baked into every image; it needs [`ImageSpec::nvme_tcp_host`](crate::ImageSpec::nvme_tcp_host)).
//!
//! The target listens on the host's loopback; the guest's user-mode NIC (slirp) reaches the host's `127.0.0.1:P`
//! as [`HOST_FROM_GUEST`]`:P`, so the target needs no address of its own and no traffic leaves the machine.
//!
//! ```no_run
//! use lab::nvmf::{NvmfGuest, Subsystem, TcpConfig};
//! let port = lab::nvmf::free_port().unwrap();
//! let mut cfg = TcpConfig::new(port);
//! cfg.bdevs.push(lab::nvmf::malloc_bdev("Malloc0", 32768, 512));
//! let mut s = Subsystem::new("nqn.2016-06.io.spdk:cnode1");
//! s.namespaces.push((1, "Malloc0".into()));
//! cfg.subsystems.push(s);
//! std::fs::write("/var/tmp/nvmf.json", cfg.to_json().to_string()).unwrap();
//! // ... start the target with --json /var/tmp/nvmf.json, then:
//! let guest = NvmfGuest::new(port, "nqn.2016-06.io.spdk:cnode1");
//! let mut g = lab::GuestConfig::new("nvmf", ". /lab/nvmf.sh\nnvmf_setup\nnvmf_connect || fail connect\n");
//! guest.apply(&mut g);
//! ```

use std::path::Path;

use serde_json::{json, Value};

use crate::{GuestConfig, ImageSpec};

/// The host's loopback as the guest sees it through QEMU's user-mode network.
pub const HOST_FROM_GUEST: &str = "10.0.2.2";

/// The well-known discovery subsystem NQN.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// A TCP port on 127.0.0.1 that was free a moment ago (bound and released; fine for tests on one machine).
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The host NQN form the kernel and nvme-cli use for a host ID: `nqn.2014-08.org.nvmexpress:uuid:<id>`.
pub fn host_nqn(hostid: &str) -> String {
    format!("nqn.2014-08.org.nvmexpress:uuid:{hostid}")
}

/// A `bdev_malloc_create` config entry.
pub fn malloc_bdev(name: &str, num_blocks: u64, block_size: u32) -> Value {
    json!({"method": "bdev_malloc_create",
           "params": {"name": name, "num_blocks": num_blocks, "block_size": block_size}})
}

/// A `bdev_aio_create` config entry: `file` served as a bdev (SPDK's aio module; ours serves it through io_uring
/// under the same method). The file must be on a file system with O_DIRECT (not tmpfs).
pub fn aio_bdev(name: &str, file: &Path, block_size: u32) -> Value {
    json!({"method": "bdev_aio_create",
           "params": {"name": name, "filename": file.display().to_string(), "block_size": block_size}})
}

/// One NVM subsystem of a [`TcpConfig`].
#[derive(Clone, Debug)]
pub struct Subsystem {
    /// Its NQN.
    pub nqn: String,
    /// Serial number (Identify Controller SN).
    pub serial: String,
    /// Model number (Identify Controller MN).
    pub model: String,
    /// Whether any host may connect; when false only [`hosts`](Self::hosts) may.
    pub allow_any_host: bool,
    /// Allowed host NQNs.
    pub hosts: Vec<String>,
    /// Namespaces: (NSID, bdev name).
    pub namespaces: Vec<(u32, String)>,
    /// `max_namespaces` (0: the target's default).
    pub max_namespaces: u32,
}

impl Subsystem {
    /// A subsystem with SPDK's example serial and model, open to any host, without namespaces.
    pub fn new(nqn: &str) -> Self {
        Subsystem {
            nqn: nqn.to_string(),
            serial: "SPDK00000000000001".into(),
            model: "SPDK bdev Controller".into(),
            allow_any_host: true,
            hosts: vec![],
            namespaces: vec![],
            max_namespaces: 0,
        }
    }
}

/// A target config in SPDK's JSON format: bdevs, a TCP transport, subsystems each listening on
/// `addr:port`, and (unless disabled) the discovery subsystem listening there too.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// `bdev` subsystem entries (see [`malloc_bdev`], [`aio_bdev`]); `bdev_wait_for_examine` is appended.
    pub bdevs: Vec<Value>,
    /// Extra `nvmf_create_transport` params (an object; `trtype` is set).
    pub transport: Value,
    /// The subsystems.
    pub subsystems: Vec<Subsystem>,
    /// Listen address (127.0.0.1).
    pub addr: String,
    /// Listen port.
    pub port: u16,
    /// Also add the listener to the discovery subsystem (SPDK deprecates discovery on listeners that were only
    /// added to other subsystems).
    pub discovery_listener: bool,
}

impl TcpConfig {
    /// An empty config listening on 127.0.0.1:`port`.
    pub fn new(port: u16) -> Self {
        TcpConfig {
            bdevs: vec![],
            transport: json!({}),
            subsystems: vec![],
            addr: "127.0.0.1".into(),
            port,
            discovery_listener: true,
        }
    }

    fn listen_address(&self) -> Value {
        json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": self.addr,
               "trsvcid": self.port.to_string()})
    }

    /// The JSON document for `--json`.
    pub fn to_json(&self) -> Value {
        let mut bdev = self.bdevs.clone();
        bdev.push(json!({"method": "bdev_wait_for_examine"}));
        let mut transport = if self.transport.is_object() {
            self.transport.clone()
        } else {
            json!({})
        };
        transport["trtype"] = json!("TCP");
        let mut nvmf = vec![json!({"method": "nvmf_create_transport", "params": transport})];
        for s in &self.subsystems {
            let mut p = json!({"nqn": s.nqn, "serial_number": s.serial, "model_number": s.model,
                               "allow_any_host": s.allow_any_host});
            if s.max_namespaces > 0 {
                p["max_namespaces"] = json!(s.max_namespaces);
            }
            nvmf.push(json!({"method": "nvmf_create_subsystem", "params": p}));
            for (nsid, bdev) in &s.namespaces {
                nvmf.push(json!({"method": "nvmf_subsystem_add_ns", "params": {
                    "nqn": s.nqn, "namespace": {"bdev_name": bdev, "nsid": nsid}}}));
            }
            for h in &s.hosts {
                nvmf.push(json!({"method": "nvmf_subsystem_add_host",
                                 "params": {"nqn": s.nqn, "host": h}}));
            }
            nvmf.push(json!({"method": "nvmf_subsystem_add_listener", "params": {
                "nqn": s.nqn, "listen_address": self.listen_address()}}));
        }
        if self.discovery_listener {
            nvmf.push(json!({"method": "nvmf_subsystem_add_listener", "params": {
                "nqn": DISCOVERY_NQN, "listen_address": self.listen_address()}}));
        }
        json!({"subsystems": [
            {"subsystem": "bdev", "config": bdev},
            {"subsystem": "nvmf", "config": nvmf},
        ]})
    }
}

/// The guest's side of one target: what `/lab/nvmf.sh` needs to reach it.
#[derive(Clone, Debug)]
pub struct NvmfGuest {
    /// Target port (on [`HOST_FROM_GUEST`]).
    pub port: u16,
    /// Subsystem NQN (`NVMF_NQN`).
    pub nqn: String,
    /// The guest's host ID (`NVMF_HOSTID`, a UUID).
    pub hostid: String,
    /// The guest's host NQN (`NVMF_HOSTNQN`).
    pub hostnqn: String,
}

impl NvmfGuest {
    /// A guest with a fixed host ID (`…-000000000001`) and the host NQN derived from it.
    pub fn new(port: u16, nqn: &str) -> Self {
        let hostid = "00000000-0000-4000-8000-000000000001".to_string();
        NvmfGuest {
            port,
            nqn: nqn.to_string(),
            hostnqn: host_nqn(&hostid),
            hostid,
        }
    }

    /// The variables `/lab/nvmf.sh` reads.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("NVMF_ADDR".into(), HOST_FROM_GUEST.into()),
            ("NVMF_PORT".into(), self.port.to_string()),
            ("NVMF_NQN".into(), self.nqn.clone()),
            ("NVMF_HOSTNQN".into(), self.hostnqn.clone()),
            ("NVMF_HOSTID".into(), self.hostid.clone()),
        ]
    }

    /// Gives `cfg` a NIC, the NVMe/TCP host image (unless it already has `nvme_tcp`) and the variables.
    pub fn apply(&self, cfg: &mut GuestConfig) {
        cfg.net = true;
        if !cfg.image.modules.iter().any(|m| m == "nvme_tcp") {
            let base = std::mem::take(&mut cfg.image);
            let host = ImageSpec::nvme_tcp_host();
            cfg.image = ImageSpec {
                modules: merge(base.modules, host.modules),
                binaries: merge(base.binaries, host.binaries),
                packages: merge(base.packages, host.packages),
                ..base
            };
        }
        cfg.env.extend(self.env());
    }
}

fn merge<T: PartialEq>(mut a: Vec<T>, b: Vec<T>) -> Vec<T> {
    for x in b {
        if !a.contains(&x) {
            a.push(x);
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_spdk_methods_in_order() {
        let mut c = TcpConfig::new(4420);
        c.bdevs.push(malloc_bdev("M0", 8, 512));
        let mut s = Subsystem::new("nqn.x:1");
        s.allow_any_host = false;
        s.hosts.push(host_nqn("h"));
        s.namespaces.push((1, "M0".into()));
        c.subsystems.push(s);
        let v = c.to_json();
        let bdev = v["subsystems"][0]["config"].as_array().unwrap();
        assert_eq!(bdev[0]["params"]["num_blocks"], 8);
        assert_eq!(bdev[1]["method"], "bdev_wait_for_examine");
        let methods: Vec<&str> = v["subsystems"][1]["config"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["method"].as_str().unwrap())
            .collect();
        assert_eq!(
            methods,
            [
                "nvmf_create_transport",
                "nvmf_create_subsystem",
                "nvmf_subsystem_add_ns",
                "nvmf_subsystem_add_host",
                "nvmf_subsystem_add_listener",
                "nvmf_subsystem_add_listener"
            ]
        );
        let n = &v["subsystems"][1]["config"];
        assert_eq!(n[0]["params"]["trtype"], "TCP");
        assert_eq!(n[1]["params"]["allow_any_host"], false);
        assert_eq!(n[3]["params"]["host"], "nqn.2014-08.org.nvmexpress:uuid:h");
        assert_eq!(n[4]["params"]["listen_address"]["trsvcid"], "4420");
        assert_eq!(n[5]["params"]["nqn"], DISCOVERY_NQN);
    }

    #[test]
    fn guest_apply_adds_nic_image_and_env() {
        let mut g = GuestConfig::new("t", "true");
        g.image = ImageSpec::default().with_binaries(&["/usr/bin/fio"]);
        NvmfGuest::new(4421, "nqn.x:1").apply(&mut g);
        assert!(g.net);
        assert!(g.image.modules.iter().any(|m| m == "nvme_tcp"));
        assert!(g.image.binaries.iter().any(|b| b.ends_with("fio")));
        assert!(g.image.binaries.iter().any(|b| b.ends_with("nvme")));
        assert!(g.env.contains(&("NVMF_PORT".into(), "4421".into())));
    }
}
