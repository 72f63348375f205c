//! `nvmf_get_stats` and the results of `nvmf_subsystem_get_controllers` and `nvmf_subsystem_get_qpairs`
//! (lib/nvmf/nvmf_rpc.c, `spdk_nvmf_poll_group_dump_stat()`).

use serde::{Deserialize, Serialize};
use subsystems::params::some;
use uuid::Uuid;

use super::address::Trid;
use super::method;

/// `nvmf_get_stats` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfGetStats {
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
}

method!(NvmfGetStats, "nvmf_get_stats");

/// `nvmf_get_stats`' result: the tick rate, then one entry per poll group (one per core, named
/// `nvmf_tgt_poll_group_000` and up: their threads' names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Ticks per second (`spdk_get_ticks_hz()`).
    pub tick_rate: u64,
    /// The poll groups.
    pub poll_groups: Vec<PollGroupStat>,
}

/// A poll group's counters (`struct spdk_nvmf_poll_group_stat`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PollGroupStat {
    /// The poll group's thread name.
    pub name: String,
    /// Admin queues connected since start.
    pub admin_qpairs: u32,
    /// I/O queues connected since start.
    pub io_qpairs: u32,
    /// Admin queues connected now.
    pub current_admin_qpairs: u32,
    /// I/O queues connected now.
    pub current_io_qpairs: u32,
    /// I/Os waiting for a bdev I/O.
    pub pending_bdev_io: u64,
    /// NVMe commands completed.
    pub completed_nvme_io: u64,
    /// One entry per transport, in creation order.
    pub transports: Vec<TransportPollGroupStat>,
}

/// A transport's part of a poll group's counters: TCP writes only its name (RDMA adds device counters, not
/// modelled here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransportPollGroupStat {
    /// The transport's name (`TCP`): SPDK calls it `trtype`.
    pub trtype: String,
}

/// The name SPDK gives the poll group thread of core index `i` (`nvmf_tgt_poll_group_%03u`).
pub fn poll_group_name(i: u32) -> String {
    format!("nvmf_tgt_poll_group_{i:03}")
}

/// A controller of `nvmf_subsystem_get_controllers` (`dump_nvmf_ctrlr()`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControllerInfo {
    /// Controller ID.
    pub cntlid: u16,
    /// The host's NQN.
    pub hostnqn: String,
    /// The host's ID.
    pub hostid: Uuid,
    /// SPDK counts the bits of the controller's queue mask, where the admin queue has one: a host with one I/O
    /// queue shows 2 (see the fixture).
    pub num_io_qpairs: u32,
}

/// A queue pair's state (`nvmf_qpair_state_str()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QpairState {
    /// Not yet connected.
    Uninitialized,
    /// Connect command under way.
    Connecting,
    /// Connected.
    Enabled,
    /// Disconnecting.
    Deactivating,
    /// Failed.
    Error,
}

/// A queue pair's authentication state (`nvmf_qpair_auth_dump()`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QpairAuth {
    /// State name.
    pub state: String,
    /// Hash function (`unknown` when not negotiated).
    pub digest: String,
    /// Diffie-Hellman group (`unknown` when not negotiated).
    pub dhgroup: String,
}

/// A queue pair of `nvmf_subsystem_get_qpairs` (`dump_nvmf_qpair()`): per poll group, in connection order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QpairInfo {
    /// Its controller's ID.
    pub cntlid: u16,
    /// Queue ID (0: admin).
    pub qid: u16,
    /// State.
    pub state: QpairState,
    /// The listener it connected through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_address: Option<Trid>,
    /// The host's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_address: Option<Trid>,
    /// DH-HMAC-CHAP state, for queues that authenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<QpairAuth>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shapes() {
        let s = Stats {
            tick_rate: 1000,
            poll_groups: vec![PollGroupStat {
                name: poll_group_name(0),
                transports: vec![TransportPollGroupStat {
                    trtype: "TCP".into(),
                }],
                ..Default::default()
            }],
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"tick_rate": 1000, "poll_groups": [{"name": "nvmf_tgt_poll_group_000",
                   "admin_qpairs": 0, "io_qpairs": 0, "current_admin_qpairs": 0, "current_io_qpairs": 0,
                   "pending_bdev_io": 0, "completed_nvme_io": 0, "transports": [{"trtype": "TCP"}]}]})
        );
        assert_eq!(
            serde_json::to_value(QpairState::Deactivating).unwrap(),
            json!("deactivating")
        );
    }
}
