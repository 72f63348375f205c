//! Options of the NVMe bdev module (module/bdev/nvme/bdev_nvme_rpc.c): `bdev_nvme_set_options` and
//! `bdev_nvme_set_hotplug`. Both are saved in the `bdev` subsystem, after `bdev_set_options`.

use jsonrpc::RpcError;
use serde::{Deserialize, Serialize};

use crate::dhchap::{DhGroup, Digest};
use crate::params::{einval, object_some, some, Name, NameSet, Params};

crate::names! {
    /// What to do when an I/O times out.
    pub enum ActionOnTimeout {
        /// Nothing.
        None = "none",
        /// Reset the controller.
        Reset = "reset",
        /// Abort the command.
        Abort = "abort",
    }
}

crate::names! {
    /// Multipath policy (SPDK 25.01+ `multipath_opts`).
    pub enum MultipathPolicy {
        /// One path at a time.
        ActivePassive = "active_passive",
        /// All optimized paths.
        ActiveActive = "active_active",
    }
}

crate::names! {
    /// Path selector of the active-active policy.
    pub enum MultipathSelector {
        /// In turn.
        RoundRobin = "round_robin",
        /// The least busy.
        QueueDepth = "queue_depth",
    }
}

/// `multipath_opts` (SPDK 25.01+): defaults for new NVMe bdevs. Each member is written once set; a call changes
/// the members it gives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct MultipathOpts {
    /// Policy.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub policy: Option<MultipathPolicy>,
    /// Selector.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub selector: Option<MultipathSelector>,
    /// I/Os per path before the round-robin selector moves on.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub min_io: Option<u32>,
}

/// `bdev_nvme_set_options` parameters and the module's options (`struct spdk_bdev_nvme_opts`), in SPDK
/// v24.05's write order; members added later are written only once set. A call changes the members it gives
/// (`retry_count` is the deprecated name of `transport_retry_count`) and must leave options that
/// [`check`](Self::check) accepts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct NvmeOptions {
    /// What to do when an I/O times out.
    pub action_on_timeout: ActionOnTimeout,
    /// I/O timeout in microseconds (0: none).
    pub timeout_us: u64,
    /// Admin command timeout in microseconds (0: `timeout_us`); needs `timeout_us`.
    pub timeout_admin_us: u64,
    /// Keep-alive timeout in milliseconds.
    pub keep_alive_timeout_ms: u32,
    /// Arbitration burst (weighted round robin).
    pub arbitration_burst: u32,
    /// Low priority weight.
    pub low_priority_weight: u32,
    /// Medium priority weight.
    pub medium_priority_weight: u32,
    /// High priority weight.
    pub high_priority_weight: u32,
    /// Admin queue poll period in microseconds.
    pub nvme_adminq_poll_period_us: u64,
    /// I/O queue poll period in microseconds (0: every reactor iteration).
    pub nvme_ioq_poll_period_us: u64,
    /// I/O requests per queue (0: the driver's default).
    pub io_queue_requests: u32,
    /// Batch command submission.
    pub delay_cmd_submit: bool,
    /// Transport retries of an I/O.
    #[serde(alias = "retry_count")]
    pub transport_retry_count: u32,
    /// bdev-level retries of a failed I/O (-1: unlimited).
    pub bdev_retry_count: i32,
    /// Transport ACK timeout exponent (RDMA, TCP).
    pub transport_ack_timeout: u8,
    /// Seconds to keep reconnecting a lost controller (-1: forever, 0: never).
    pub ctrlr_loss_timeout_sec: i32,
    /// Seconds between reconnect attempts.
    pub reconnect_delay_sec: u32,
    /// Seconds after which I/O fails while reconnecting (0: not before the controller is given up).
    pub fast_io_fail_timeout_sec: u32,
    /// Do not fail back to the preferred path automatically.
    pub disable_auto_failback: bool,
    /// Generate UUIDs for namespaces that have none.
    pub generate_uuids: bool,
    /// IP type of service of the transport.
    pub transport_tos: u8,
    /// Keep NVMe error statistics.
    pub nvme_error_stat: bool,
    /// RDMA shared receive queue size (0: none).
    pub rdma_srq_size: u32,
    /// Keep per-path I/O statistics.
    pub io_path_stat: bool,
    /// Allow accel sequences to reach the controller.
    pub allow_accel_sequence: bool,
    /// RDMA completion queue size (0: automatic).
    pub rdma_max_cq_size: u32,
    /// RDMA CM event timeout in milliseconds (0: the driver's).
    pub rdma_cm_event_timeout_ms: u16,
    /// DH-HMAC-CHAP digests allowed (all by default).
    pub dhchap_digests: NameSet<Digest>,
    /// DH-HMAC-CHAP groups allowed (all by default).
    pub dhchap_dhgroups: NameSet<DhGroup>,
    /// SPDK 25.01+: memory registration per I/O (RDMA).
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub rdma_umr_per_io: Option<bool>,
    /// SPDK 25.01+: TCP connect timeout in milliseconds.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub tcp_connect_timeout_ms: Option<u32>,
    /// SPDK 25.01+: report flush support.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub enable_flush: Option<bool>,
    /// SPDK 25.01+: multipath defaults.
    #[serde(
        deserialize_with = "object_some",
        skip_serializing_if = "Option::is_none"
    )]
    pub multipath_opts: Option<MultipathOpts>,
}

impl Params for NvmeOptions {
    const ALIASES: &'static [(&'static str, &'static str)] =
        &[("retry_count", "transport_retry_count")];
}

impl Default for NvmeOptions {
    /// `g_opts` of bdev_nvme.c.
    fn default() -> Self {
        NvmeOptions {
            action_on_timeout: ActionOnTimeout::None,
            timeout_us: 0,
            timeout_admin_us: 0,
            keep_alive_timeout_ms: 10_000,
            arbitration_burst: 0,
            low_priority_weight: 0,
            medium_priority_weight: 0,
            high_priority_weight: 0,
            nvme_adminq_poll_period_us: 10_000,
            nvme_ioq_poll_period_us: 0,
            io_queue_requests: 0,
            delay_cmd_submit: true,
            transport_retry_count: 4,
            bdev_retry_count: 3,
            transport_ack_timeout: 0,
            ctrlr_loss_timeout_sec: 0,
            reconnect_delay_sec: 0,
            fast_io_fail_timeout_sec: 0,
            disable_auto_failback: false,
            generate_uuids: false,
            transport_tos: 0,
            nvme_error_stat: false,
            rdma_srq_size: 0,
            io_path_stat: false,
            allow_accel_sequence: false,
            rdma_max_cq_size: 0,
            rdma_cm_event_timeout_ms: 0,
            dhchap_digests: Digest::ALL.iter().copied().collect(),
            dhchap_dhgroups: DhGroup::ALL.iter().copied().collect(),
            rdma_umr_per_io: None,
            tcp_connect_timeout_ms: None,
            enable_flush: None,
            multipath_opts: None,
        }
    }
}

impl NvmeOptions {
    /// `bdev_nvme_validate_opts()` and its reconnect checks; `-EINVAL` with SPDK's log text otherwise.
    pub fn check(&self) -> Result<(), RpcError> {
        if self.timeout_us == 0 && self.timeout_admin_us != 0 {
            return Err(einval(
                "Invalid options: Can't have (timeout_us == 0) with (timeout_admin_us > 0)",
            ));
        }
        if self.bdev_retry_count < -1 {
            return Err(einval(
                "Invalid option: bdev_retry_count can't be less than -1.",
            ));
        }
        let loss = self.ctrlr_loss_timeout_sec;
        let delay = self.reconnect_delay_sec;
        let fail = self.fast_io_fail_timeout_sec;
        let bad = if loss < -1 {
            Some("ctrlr_loss_timeout_sec can't be less than -1.")
        } else if loss == -1 {
            if delay == 0 {
                Some("reconnect_delay_sec can't be 0 if ctrlr_loss_timeout_sec is not 0.")
            } else if fail != 0 && fail < delay {
                Some("reconnect_delay_sec can't be more than fast_io-fail_timeout_sec.")
            } else {
                None
            }
        } else if loss != 0 {
            let loss = loss as u32;
            if delay == 0 {
                Some("reconnect_delay_sec can't be 0 if ctrlr_loss_timeout_sec is not 0.")
            } else if delay > loss {
                Some("reconnect_delay_sec can't be more than ctrlr_loss_timeout_sec.")
            } else if fail != 0 && fail < delay {
                Some("reconnect_delay_sec can't be more than fast_io_fail_timeout_sec.")
            } else if fail != 0 && fail > loss {
                Some("fast_io_fail_timeout_sec can't be more than ctrlr_loss_timeout_sec.")
            } else {
                None
            }
        } else if delay != 0 || fail != 0 {
            Some("Both reconnect_delay_sec and fast_io_fail_timeout_sec must be 0 if ctrlr_loss_timeout_sec is 0.")
        } else {
            None
        };
        match bad {
            Some(why) => Err(einval(why)),
            None => Ok(()),
        }
    }
}

/// Default hotplug poll period: 100 ms.
pub const HOTPLUG_PERIOD_DEFAULT_US: u64 = 100_000;
/// Longest hotplug poll period: 10 s (longer ones are cut to it).
pub const HOTPLUG_PERIOD_MAX_US: u64 = 10_000_000;

/// `bdev_nvme_set_hotplug` parameters and the hotplug poller's settings, saved as
/// [`normalized`](Self::normalized).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmeHotplug {
    /// Poll period in microseconds (absent or 0: the default, 100 ms; at most 10 s).
    #[serde(default)]
    pub period_us: u64,
    /// Whether to poll for hot-plugged PCIe controllers (required).
    pub enable: bool,
}

impl Params for NvmeHotplug {}

impl Default for NvmeHotplug {
    /// Off, 100 ms.
    fn default() -> Self {
        NvmeHotplug {
            period_us: HOTPLUG_PERIOD_DEFAULT_US,
            enable: false,
        }
    }
}

impl NvmeHotplug {
    /// The period as `bdev_nvme_set_hotplug()` keeps it: 0 is the default, longer than the maximum is cut.
    pub fn normalized(self) -> Self {
        let period_us = match self.period_us {
            0 => HOTPLUG_PERIOD_DEFAULT_US,
            n => n.min(HOTPLUG_PERIOD_MAX_US),
        };
        NvmeHotplug { period_us, ..self }
    }
}
