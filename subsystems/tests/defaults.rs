//! Every option struct's defaults, serialized, are what SPDK v24.05's `save_config` writes for an untouched
//! target (member order included), and SPDK's value checks hold for them.

use serde::Serialize;
use subsystems::accel::AccelOptions;
use subsystems::bdev_iscsi::BdevIscsiOptions;
use subsystems::bdev_nvme::{NvmeHotplug, NvmeOptions};
use subsystems::fsdev::FsdevOptions;
use subsystems::iobuf::IobufOptions;
use subsystems::iscsi::IscsiOptions;
use subsystems::keyring::KeyringLinuxOptions;
use subsystems::nvmf::{NvmfConfig, NvmfCrdt, NvmfMaxSubsystems};
use subsystems::scheduler::Scheduler;
use subsystems::sock::{SockImplOptions, SockSetDefaultImpl};

fn text<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

#[test]
fn defaults_are_spdk_v24_05s() {
    let mut sched = Scheduler::default();
    sched.on_init();
    assert_eq!(text(&sched.saved()), r#"{"name":"static"}"#);
    assert_eq!(
        text(&SockSetDefaultImpl::default()),
        r#"{"impl_name":"posix"}"#
    );
    assert_eq!(
        text(&SockImplOptions::new("ssl")),
        concat!(
            r#"{"impl_name":"ssl","recv_buf_size":4096,"send_buf_size":4096,"enable_recv_pipe":true,"#,
            r#""enable_quickack":false,"enable_placement_id":0,"enable_zerocopy_send_server":true,"#,
            r#""enable_zerocopy_send_client":false,"zerocopy_threshold":0,"tls_version":0,"enable_ktls":false}"#
        )
    );
    assert_eq!(
        text(&SockImplOptions::new("uring")),
        concat!(
            r#"{"impl_name":"uring","recv_buf_size":2097152,"send_buf_size":2097152,"enable_recv_pipe":true,"#,
            r#""enable_quickack":false,"enable_placement_id":0,"enable_zerocopy_send_server":false,"#,
            r#""enable_zerocopy_send_client":false,"zerocopy_threshold":0,"tls_version":0,"enable_ktls":false}"#
        )
    );
    assert_eq!(
        text(&IobufOptions::default()),
        r#"{"small_pool_count":8192,"large_pool_count":1024,"small_bufsize":8192,"large_bufsize":135168}"#
    );
    assert_eq!(
        text(&AccelOptions::default()),
        r#"{"small_cache_size":128,"large_cache_size":16,"task_count":2048,"sequence_count":2048,"buf_count":2048}"#
    );
    assert_eq!(
        text(&NvmeOptions::default()),
        concat!(
            r#"{"action_on_timeout":"none","timeout_us":0,"timeout_admin_us":0,"keep_alive_timeout_ms":10000,"#,
            r#""arbitration_burst":0,"low_priority_weight":0,"medium_priority_weight":0,"high_priority_weight":0,"#,
            r#""nvme_adminq_poll_period_us":10000,"nvme_ioq_poll_period_us":0,"io_queue_requests":0,"#,
            r#""delay_cmd_submit":true,"transport_retry_count":4,"bdev_retry_count":3,"transport_ack_timeout":0,"#,
            r#""ctrlr_loss_timeout_sec":0,"reconnect_delay_sec":0,"fast_io_fail_timeout_sec":0,"#,
            r#""disable_auto_failback":false,"generate_uuids":false,"transport_tos":0,"nvme_error_stat":false,"#,
            r#""rdma_srq_size":0,"io_path_stat":false,"allow_accel_sequence":false,"rdma_max_cq_size":0,"#,
            r#""rdma_cm_event_timeout_ms":0,"dhchap_digests":["sha256","sha384","sha512"],"#,
            r#""dhchap_dhgroups":["null","ffdhe2048","ffdhe3072","ffdhe4096","ffdhe6144","ffdhe8192"]}"#
        )
    );
    assert_eq!(
        text(&NvmeHotplug::default()),
        r#"{"period_us":100000,"enable":false}"#
    );
    assert_eq!(text(&BdevIscsiOptions::default()), r#"{"timeout_sec":30}"#);
    assert_eq!(text(&KeyringLinuxOptions::default()), r#"{"enable":false}"#);
    assert_eq!(
        text(&NvmfConfig::default()),
        r#"{"discovery_filter":"match_any","admin_cmd_passthru":{"identify_ctrlr":false}}"#
    );
    assert_eq!(
        text(&NvmfMaxSubsystems::default().effective()),
        r#"{"max_subsystems":1024}"#
    );
    assert_eq!(
        text(&NvmfCrdt::default()),
        r#"{"crdt1":0,"crdt2":0,"crdt3":0}"#
    );
    assert_eq!(
        text(&IscsiOptions::default()),
        concat!(
            r#"{"node_base":"iqn.2016-06.io.spdk","max_sessions":128,"max_connections_per_session":2,"#,
            r#""max_queue_depth":64,"default_time2wait":2,"default_time2retain":20,"first_burst_length":8192,"#,
            r#""immediate_data":true,"allow_duplicated_isid":false,"error_recovery_level":0,"nop_timeout":60,"#,
            r#""nop_in_interval":30,"disable_chap":false,"require_chap":false,"mutual_chap":false,"chap_group":0,"#,
            r#""max_large_datain_per_connection":64,"max_r2t_per_connection":4,"pdu_pool_size":36864,"#,
            r#""immediate_data_pool_size":16384,"data_out_pool_size":2048}"#
        )
    );
    assert_eq!(
        text(&FsdevOptions::default()),
        r#"{"fsdev_io_pool_size":65535,"fsdev_io_cache_size":256}"#
    );

    assert!(IobufOptions::default().check().is_ok());
    assert!(NvmeOptions::default().check().is_ok());
    assert!(IscsiOptions::default().check().is_ok());
    let mut n = NvmfConfig::default();
    n.normalize(None).unwrap();
    assert_eq!(n, NvmfConfig::default());
}

#[test]
fn calls_apply_over_current_options() {
    use serde_json::json;
    use subsystems::{decode, decode_over};
    let cur = decode_over(
        &NvmeOptions::default(),
        Some(json!({"retry_count": 7, "multipath_opts": {"policy": "active_active"}})),
    )
    .unwrap();
    assert_eq!(cur.transport_retry_count, 7);
    let next = decode_over(&cur, Some(json!({"multipath_opts": {"min_io": 2}}))).unwrap();
    assert_eq!(
        serde_json::to_value(&next.multipath_opts).unwrap(),
        json!({"policy": "active_active", "min_io": 2})
    );
    assert_eq!(next.transport_retry_count, 7);
    // A setting that SPDK's checks refuse.
    let bad = decode_over(&cur, Some(json!({"ctrlr_loss_timeout_sec": 5}))).unwrap();
    assert_eq!(bad.check().unwrap_err().code, -22);
    let h: NvmeHotplug = decode(Some(json!({"enable": true, "period_us": 0}))).unwrap();
    assert_eq!(
        h.normalized(),
        NvmeHotplug {
            period_us: 100_000,
            enable: true
        }
    );
}
