//! `iscsi` subsystem options: `iscsi_set_options` (lib/iscsi/iscsi_rpc.c, `iscsi_opts_verify()` of
//! lib/iscsi/iscsi_subsystem.c). Portal and initiator groups and target nodes are not options and are not here.

use jsonrpc::RpcError;
use serde::{Deserialize, Serialize};

use crate::params::{some, Params};

/// `iscsi_set_options` parameters and the iSCSI target's options (`struct spdk_iscsi_opts`), in SPDK's write
/// order. Members not given keep SPDK's defaults; the call is accepted once only (a second one is `-32603
/// "Must not call more than once"`). The deprecated `no_discovery_auth`, `req_discovery_auth`,
/// `req_discovery_auth_mutual` and `discovery_auth_group` name `disable_chap`, `require_chap`, `mutual_chap` and
/// `chap_group`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct IscsiOptions {
    /// CHAP secrets file; written once set.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub auth_file: Option<String>,
    /// Prefix of target node names.
    pub node_base: String,
    /// MaxSessions (1..=65535).
    pub max_sessions: u32,
    /// MaxConnectionsPerSession (1..=65535).
    pub max_connections_per_session: u32,
    /// MaxQueueDepth (1..=256).
    pub max_queue_depth: u32,
    /// DefaultTime2Wait (at most 3600).
    pub default_time2wait: u32,
    /// DefaultTime2Retain (at most 3600).
    pub default_time2retain: u32,
    /// FirstBurstLength (512..=MaxBurstLength).
    pub first_burst_length: u32,
    /// ImmediateData.
    pub immediate_data: bool,
    /// Allow a session with an ISID already in use.
    pub allow_duplicated_isid: bool,
    /// ErrorRecoveryLevel (0..=2).
    pub error_recovery_level: u32,
    /// NOP-Out timeout in seconds (not negative).
    pub nop_timeout: i32,
    /// NOP-In interval in seconds (0..=60).
    pub nop_in_interval: i32,
    /// No CHAP for discovery sessions.
    #[serde(alias = "no_discovery_auth")]
    pub disable_chap: bool,
    /// CHAP required for discovery sessions.
    #[serde(alias = "req_discovery_auth")]
    pub require_chap: bool,
    /// Mutual CHAP for discovery sessions (needs `require_chap`).
    #[serde(alias = "req_discovery_auth_mutual")]
    pub mutual_chap: bool,
    /// CHAP group of discovery sessions (not negative).
    #[serde(alias = "discovery_auth_group")]
    pub chap_group: i32,
    /// MaxLargeDataInPerConnection.
    pub max_large_datain_per_connection: u32,
    /// MaxR2TPerConnection.
    pub max_r2t_per_connection: u32,
    /// PDUs in the pool.
    pub pdu_pool_size: u32,
    /// Immediate data buffers in the pool.
    pub immediate_data_pool_size: u32,
    /// Data-Out buffers in the pool.
    pub data_out_pool_size: u32,
}

impl Params for IscsiOptions {
    const ALIASES: &'static [(&'static str, &'static str)] = &[
        ("no_discovery_auth", "disable_chap"),
        ("req_discovery_auth", "require_chap"),
        ("req_discovery_auth_mutual", "mutual_chap"),
        ("discovery_auth_group", "chap_group"),
    ];
}

impl Default for IscsiOptions {
    /// `iscsi_opts_init()`: the pool sizes derive from the default MaxSessions (128), MaxQueueDepth (64),
    /// MaxLargeDataInPerConnection (64) and MaxR2TPerConnection (4).
    fn default() -> Self {
        IscsiOptions {
            auth_file: None,
            node_base: "iqn.2016-06.io.spdk".into(),
            max_sessions: 128,
            max_connections_per_session: 2,
            max_queue_depth: 64,
            default_time2wait: 2,
            default_time2retain: 20,
            first_burst_length: 8192,
            immediate_data: true,
            allow_duplicated_isid: false,
            error_recovery_level: 0,
            nop_timeout: 60,
            nop_in_interval: 30,
            disable_chap: false,
            require_chap: false,
            mutual_chap: false,
            chap_group: 0,
            max_large_datain_per_connection: 64,
            max_r2t_per_connection: 4,
            pdu_pool_size: 36864,
            immediate_data_pool_size: 16384,
            data_out_pool_size: 2048,
        }
    }
}

/// `SPDK_ISCSI_MAX_BURST_LENGTH`.
pub const MAX_BURST_LENGTH: u32 = 65536 * 16;

impl IscsiOptions {
    /// `iscsi_opts_verify()`, which SPDK runs at iSCSI subsystem init (failing the init); here the RPC fails
    /// with `-32602 "iscsi_set_options: <SPDK's log text>"`.
    pub fn check(&self) -> Result<(), RpcError> {
        let err = |msg: String| {
            Err(RpcError::invalid_params(format!(
                "iscsi_set_options: {msg}"
            )))
        };
        if self.max_sessions == 0 || self.max_sessions > 65535 {
            return err(format!(
                "{} is invalid. MaxSessions must be more than 0 and no more than 65535",
                self.max_sessions
            ));
        }
        let conns = self.max_connections_per_session;
        if conns == 0 || conns > 65535 {
            return err(format!(
                "{conns} is invalid. MaxConnectionsPerSession must be more than 0 and no more than 65535"
            ));
        }
        if self.max_queue_depth == 0 || self.max_queue_depth > 256 {
            return err(format!(
                "{} is invalid. MaxQueueDepth must be more than 0 and no more than 256",
                self.max_queue_depth
            ));
        }
        for (v, name) in [
            (self.default_time2wait, "DefaultTime2Wait"),
            (self.default_time2retain, "DefaultTime2Retain"),
        ] {
            if v > 3600 {
                return err(format!("{v} is invalid. {name} must be no more than 3600"));
            }
        }
        let fbl = self.first_burst_length;
        if fbl < 512 {
            return err(format!("FirstBurstLength {fbl} shall be no less than 512"));
        }
        if fbl > MAX_BURST_LENGTH {
            return err(format!(
                "FirstBurstLength {fbl} shall not exceed MaxBurstLength {MAX_BURST_LENGTH}"
            ));
        }
        if self.error_recovery_level > 2 {
            return err(format!(
                "ErrorRecoveryLevel {} is not supported.",
                self.error_recovery_level
            ));
        }
        if self.nop_timeout < 0 {
            return err(format!(
                "{} is invalid. timeout must not be less than 0",
                self.nop_timeout
            ));
        }
        if !(0..=60).contains(&self.nop_in_interval) {
            return err(format!(
                "{} is invalid. nopinterval must be between 0 and 60",
                self.nop_in_interval
            ));
        }
        let chap_ok = self.chap_group >= 0
            && matches!(
                (self.disable_chap, self.require_chap, self.mutual_chap),
                (false, false, false)
                    | (true, false, false)
                    | (false, true, false)
                    | (false, true, true)
            );
        if !chap_ok {
            return err("CHAP params in opts are illegal combination".into());
        }
        for (v, name) in [
            (
                self.max_large_datain_per_connection,
                "MaxLargeDataInPerConnection",
            ),
            (self.max_r2t_per_connection, "MaxR2TPerConnection"),
            (self.pdu_pool_size, "pdu_pool_size"),
            (self.immediate_data_pool_size, "immediate_data_pool_size"),
            (self.data_out_pool_size, "data_out_pool_size"),
        ] {
            if v == 0 {
                return err(format!("0 is invalid. {name} must be more than 0"));
            }
        }
        Ok(())
    }
}
