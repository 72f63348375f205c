//! `nvmf_create_transport` and `nvmf_get_transports` (lib/nvmf/nvmf_rpc.c, transport.c, tcp.c, rdma.c).
//!
//! A call gives some options; the others take the transport's defaults ([`TransportOpts::defaults`]), then
//! SPDK's checks refuse some values and adjust others ([`NvmfCreateTransport::options`]). The result is what
//! `nvmf_get_transports` and `save_config` write ([`TransportOpts`]'s `Serialize`).

use jsonrpc::RpcError;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use subsystems::iobuf::IobufOptions;
use subsystems::params::some;

use super::method;

/// `SPDK_NVMF_MAX_SGL_ENTRIES`: data buffers per request.
pub const MAX_SGL_ENTRIES: u32 = 16;
/// `SPDK_NVMF_MIN_ADMIN_MAX_SQ_SIZE`: smallest admin queue the spec allows.
pub const MIN_ADMIN_MAX_SQ_SIZE: u32 = 32;
/// `SPDK_NVMF_DEFAULT_ACCEPT_POLL_RATE_US`.
pub const DEFAULT_ACCEPT_POLL_RATE_US: u32 = 10_000;
/// `NVMF_TRANSPORT_DEFAULT_ASSOCIATION_TIMEOUT_IN_MS`.
pub const DEFAULT_ASSOCIATION_TIMEOUT_MS: u32 = 120_000;
/// `SPDK_NVMF_TCP_DEFAULT_MAX_SOCK_PRIORITY`: highest `sock_priority`.
pub const TCP_MAX_SOCK_PRIORITY: u32 = 16;
/// `SPDK_NVME_TCP_IN_CAPSULE_DATA_MAX_SIZE`: in-capsule data a TCP control message buffer holds.
pub const TCP_IN_CAPSULE_DATA_MAX_SIZE: u32 = 8192;

/// A transport type this crate knows (`spdk_nvmf_transport_ops.name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// NVMe/TCP.
    Tcp,
    /// NVMe/RDMA (SPDK builds it `--with-rdma` only).
    Rdma,
}

impl TransportKind {
    /// The name SPDK writes.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "TCP",
            TransportKind::Rdma => "RDMA",
        }
    }

    /// `nvmf_get_transport_ops()`: any case.
    pub fn from_name(s: &str) -> Option<TransportKind> {
        [TransportKind::Tcp, TransportKind::Rdma]
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
    }
}

/// `nvmf_create_transport` parameters (`nvmf_rpc_create_transport_decoder` and the transports' own decoders),
/// decoded relaxed: SPDK ignores members no decoder knows, so configs written by later SPDK versions load. A
/// member not given takes the transport's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct NvmfCreateTransport {
    /// Transport type, any case (`TCP`); kept as given for the messages.
    pub trtype: String,
    /// Target name.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tgt_name: Option<String>,
    /// Queue depth of an I/O queue.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_queue_depth: Option<u16>,
    /// I/O queues per controller (SPDK keeps one more, for the admin queue, in a `u16`).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_io_qpairs_per_ctrlr: Option<u16>,
    /// In-capsule data size.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub in_capsule_data_size: Option<u32>,
    /// Largest I/O (0 or a power of 2 of at least 8 KiB).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_io_size: Option<u32>,
    /// Size of a data buffer.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub io_unit_size: Option<u32>,
    /// Queue depth of the admin queue.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_aq_depth: Option<u32>,
    /// Data buffers of the transport.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub num_shared_buffers: Option<u32>,
    /// Data buffers cached per poll group (`u32::MAX`: chosen by the transport).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub buf_cache_size: Option<u32>,
    /// Insert/strip protection information.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub dif_insert_or_strip: Option<bool>,
    /// Seconds an abort may take.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub abort_timeout_sec: Option<u32>,
    /// Zero-copy through the bdev layer.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub zcopy: Option<bool>,
    /// Microseconds between polls of the acceptor (not written back by SPDK).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub acceptor_poll_rate: Option<u32>,
    /// ACK timeout in milliseconds (0: the system's).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub ack_timeout: Option<u32>,
    /// RDMA data work requests in the pool.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub data_wr_pool_size: Option<u32>,
    /// TCP: C2H success optimization (no response capsule after the last data PDU).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub c2h_success: Option<bool>,
    /// TCP: control message buffers per poll group (not written back by SPDK).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub control_msg_num: Option<u16>,
    /// TCP: `SO_PRIORITY` of the sockets (0 to 16).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub sock_priority: Option<u32>,
    /// RDMA: completion queue entries, with `no_srq`.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub num_cqe: Option<i32>,
    /// RDMA: shared receive queue depth.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_srq_depth: Option<u32>,
    /// RDMA: no shared receive queue.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub no_srq: Option<bool>,
    /// RDMA: no work request batching.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub no_wr_batching: Option<bool>,
    /// RDMA: `listen()` backlog.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub acceptor_backlog: Option<i32>,
    /// SPDK 24.09+: small iobuf buffers cached per poll group. This and the members below are taken (later
    /// versions write them) but, as SPDK v24.05 ignores them, neither kept in [`TransportOpts`] nor written.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub iobuf_small_cache_size: Option<u32>,
    /// SPDK 24.09+: large iobuf buffers cached per poll group.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub iobuf_large_cache_size: Option<u32>,
    /// SPDK 25.x+: no passthrough of unknown I/O opcodes to the bdev.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub disable_command_passthru: Option<bool>,
    /// SPDK 25.x+: keep alive support (KAS, in 100 ms units).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub kas: Option<u16>,
    /// SPDK 25.x+: smallest keep alive timeout, in milliseconds.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_kato: Option<u32>,
}

method!(NvmfCreateTransport, "nvmf_create_transport", relaxed);

/// Where the checks of [`NvmfCreateTransport::options`] read the application's state.
#[derive(Debug, Clone)]
pub struct TransportEnv {
    /// The iobuf pools (`io_unit_size` must fit a large buffer).
    pub iobuf: IobufOptions,
    /// Cores of the application (each poll group caches `buf_cache_size` buffers).
    pub cores: u32,
}

impl Default for TransportEnv {
    /// Default iobuf pools, one core.
    fn default() -> Self {
        TransportEnv {
            iobuf: IobufOptions::default(),
            cores: 1,
        }
    }
}

impl NvmfCreateTransport {
    /// The transport type, or `-32602 "Invalid transport type 'X'"` (`X` as given) for a name no transport
    /// has (`spdk_nvmf_transport_opts_init()` fails). `supported` is the build's transports: SPDK v24.05
    /// without `--with-rdma` refuses `RDMA` so.
    pub fn kind(&self, supported: &[TransportKind]) -> Result<TransportKind, RpcError> {
        TransportKind::from_name(&self.trtype)
            .filter(|k| supported.contains(k))
            .ok_or_else(|| {
                log::error!("Invalid transport type '{}'", self.trtype);
                RpcError::invalid_params(format!("Invalid transport type '{}'", self.trtype))
            })
    }

    /// `-32603 "Transport type 'X' already exists"` (`X` as given), the answer when a transport of that type
    /// exists; SPDK checks this after [`kind`](Self::kind) and before [`options`](Self::options).
    pub fn exists_error(&self) -> RpcError {
        log::error!("Transport type '{}' already exists", self.trtype);
        RpcError::internal(format!("Transport type '{}' already exists", self.trtype))
    }

    /// The options the transport runs with and writes back: the defaults of `kind`, the members given, then
    /// `nvmf_transport_create()`'s checks (`-32603 "Transport type 'X' create failed"`) and the transport's
    /// own (`-32603 "Failed to create transport."`), with the adjustments SPDK makes and logs.
    pub fn options(
        &self,
        kind: TransportKind,
        env: &TransportEnv,
    ) -> Result<TransportOpts, RpcError> {
        let mut o = TransportOpts::defaults(kind);
        macro_rules! given {
            ($($f:ident),*) => { $(if let Some(v) = self.$f { o.$f = v; })* };
        }
        given!(
            max_queue_depth,
            max_io_qpairs_per_ctrlr,
            in_capsule_data_size,
            max_io_size,
            io_unit_size,
            max_aq_depth,
            num_shared_buffers,
            buf_cache_size,
            dif_insert_or_strip,
            abort_timeout_sec,
            zcopy,
            acceptor_poll_rate,
            ack_timeout,
            data_wr_pool_size
        );
        match &mut o.specific {
            TransportSpecific::Tcp(t) => {
                t.c2h_success = self.c2h_success.unwrap_or(t.c2h_success);
                t.control_msg_num = self.control_msg_num.unwrap_or(t.control_msg_num);
                t.sock_priority = self.sock_priority.unwrap_or(t.sock_priority);
            }
            TransportSpecific::Rdma(r) => {
                r.num_cqe = self.num_cqe.unwrap_or(r.num_cqe);
                r.max_srq_depth = self.max_srq_depth.unwrap_or(r.max_srq_depth);
                r.no_srq = self.no_srq.unwrap_or(r.no_srq);
                r.no_wr_batching = self.no_wr_batching.unwrap_or(r.no_wr_batching);
                r.acceptor_backlog = self.acceptor_backlog.unwrap_or(r.acceptor_backlog);
            }
        }
        self.generic_checks(&mut o, env)?;
        match kind {
            TransportKind::Tcp => tcp_checks(&mut o, env),
            TransportKind::Rdma => rdma_checks(&mut o, env),
        }
        .map_err(|detail| {
            log::error!("{detail}");
            log::error!("Failed to create transport.");
            RpcError::internal("Failed to create transport.")
        })?;
        Ok(o)
    }

    /// `nvmf_transport_create()`: `max_io_size` 0 or a power of 2 of at least 8 KiB, `max_aq_depth` raised to
    /// the spec's minimum, `io_unit_size` non-zero and within a large iobuf buffer.
    fn generic_checks(&self, o: &mut TransportOpts, env: &TransportEnv) -> Result<(), RpcError> {
        let failed = |detail: String| {
            log::error!("{detail}");
            log::error!("Transport type '{}' create failed", self.trtype);
            RpcError::internal(format!("Transport type '{}' create failed", self.trtype))
        };
        if o.max_io_size != 0 && (!o.max_io_size.is_power_of_two() || o.max_io_size < 8192) {
            return Err(failed(format!(
                "max_io_size {} must be a power of 2 and be greater than or equal 8KB",
                o.max_io_size
            )));
        }
        if o.max_aq_depth < MIN_ADMIN_MAX_SQ_SIZE {
            log::error!(
                "max_aq_depth {} is less than minimum defined by NVMf spec, use min value",
                o.max_aq_depth
            );
            o.max_aq_depth = MIN_ADMIN_MAX_SQ_SIZE;
        }
        if o.io_unit_size == 0 {
            return Err(failed("io_unit_size cannot be 0".into()));
        }
        if o.io_unit_size > env.iobuf.large_bufsize {
            return Err(failed(format!(
                "io_unit_size {} is larger than iobuf pool large buffer size {}",
                o.io_unit_size, env.iobuf.large_bufsize
            )));
        }
        let count = if o.io_unit_size <= env.iobuf.small_bufsize {
            env.iobuf.small_pool_count
        } else {
            env.iobuf.small_pool_count.min(env.iobuf.large_pool_count)
        };
        if u64::from(o.num_shared_buffers) > count {
            log::warn!(
                "The num_shared_buffers value ({}) is larger than the available iobuf pool size ({count}). \
                 Please increase the iobuf pool sizes.",
                o.num_shared_buffers
            );
        }
        Ok(())
    }
}

/// `nvmf_tcp_create()`'s checks and adjustments; `Err` is the detail of a refusal.
fn tcp_checks(o: &mut TransportOpts, env: &TransportEnv) -> Result<(), String> {
    let TransportSpecific::Tcp(t) = &mut o.specific else {
        return Ok(());
    };
    if t.sock_priority > TCP_MAX_SOCK_PRIORITY {
        return Err(format!(
            "Unsupported socket_priority={}, the current range is: 0 to {TCP_MAX_SOCK_PRIORITY}",
            t.sock_priority
        ));
    }
    if t.control_msg_num == 0 && o.in_capsule_data_size < TCP_IN_CAPSULE_DATA_MAX_SIZE {
        log::warn!("TCP param control_msg_num can't be 0 if ICD is less than {TCP_IN_CAPSULE_DATA_MAX_SIZE} bytes. Using default value 32");
        t.control_msg_num = TCP_DEFAULT_CONTROL_MSG_NUM;
    }
    if o.io_unit_size > o.max_io_size {
        log::warn!(
            "TCP param io_unit_size {} can't be larger than max_io_size {}. Using max_io_size as io_unit_size",
            o.io_unit_size,
            o.max_io_size
        );
        o.io_unit_size = o.max_io_size;
    }
    if o.in_capsule_data_size > o.max_io_size {
        log::warn!(
            "TCP param ICD size {} can't be larger than max_io_size {}. Using max_io_size as ICD size",
            o.in_capsule_data_size,
            o.max_io_size
        );
        o.in_capsule_data_size = o.max_io_size;
    }
    if o.max_queue_depth < 2 {
        log::warn!(
            "TCP param max_queue_depth {} can't be smaller than 2 or larger than 65535. Using default value 128",
            o.max_queue_depth
        );
        o.max_queue_depth = 128;
    }
    if !(2..=4096).contains(&o.max_aq_depth) {
        log::warn!(
            "TCP param max_aq_depth {} can't be smaller than 2 or larger than 4096. Using default value 128",
            o.max_aq_depth
        );
        o.max_aq_depth = 128;
    }
    // SPDK divides by zero here (max_io_size 0 makes io_unit_size 0); refused instead.
    if o.io_unit_size == 0 || o.max_io_size / o.io_unit_size > MAX_SGL_ENTRIES {
        return Err(format!(
            "Unsupported IO Unit size specified, {} bytes",
            o.io_unit_size
        ));
    }
    buffer_cache_check(o, env)
}

/// `nvmf_rdma_create()`'s checks and adjustments that do not depend on the devices.
fn rdma_checks(o: &mut TransportOpts, env: &TransportEnv) -> Result<(), String> {
    let TransportSpecific::Rdma(r) = &mut o.specific else {
        return Ok(());
    };
    if o.io_unit_size > o.max_io_size {
        o.io_unit_size = o.max_io_size;
    }
    if r.acceptor_backlog <= 0 {
        log::error!(
            "The acceptor backlog cannot be less than 1, setting to the default value of (100)."
        );
        r.acceptor_backlog = RDMA_DEFAULT_ACCEPTOR_BACKLOG;
    }
    if o.num_shared_buffers < MAX_SGL_ENTRIES * 2 {
        return Err(format!(
            "The number of shared data buffers ({}) is less than the minimum number required to guarantee \
             that forward progress can be made ({})",
            o.num_shared_buffers,
            MAX_SGL_ENTRIES * 2
        ));
    }
    buffer_cache_check(o, env)?;
    if o.io_unit_size == 0 || o.max_io_size / o.io_unit_size > MAX_SGL_ENTRIES {
        return Err(format!(
            "Unsupported IO Unit size specified, {} bytes",
            o.io_unit_size
        ));
    }
    // An SGL descriptor (16 bytes) per data buffer must fit in the capsule.
    let min_icd = 16 * MAX_SGL_ENTRIES;
    if o.in_capsule_data_size < min_icd {
        log::warn!("In capsule data size is set to {min_icd}, this is minimum size required to support msdbd=16");
        o.in_capsule_data_size = min_icd;
    }
    Ok(())
}

/// Each core's poll group caches `buf_cache_size` buffers (unless `u32::MAX`): they must exist.
fn buffer_cache_check(o: &TransportOpts, env: &TransportEnv) -> Result<(), String> {
    if o.buf_cache_size < u32::MAX {
        let needed = u64::from(env.cores) * u64::from(o.buf_cache_size);
        if needed > u64::from(o.num_shared_buffers) {
            return Err(format!(
                "There are not enough buffers to satisfy per-poll group caches for each thread. ({}) supplied. \
                 ({needed}) required",
                o.num_shared_buffers
            ));
        }
    }
    Ok(())
}

/// `SPDK_NVMF_TCP_DEFAULT_CONTROL_MSG_NUM`.
pub const TCP_DEFAULT_CONTROL_MSG_NUM: u16 = 32;
/// `SPDK_NVMF_RDMA_ACCEPTOR_BACKLOG`.
pub const RDMA_DEFAULT_ACCEPTOR_BACKLOG: i32 = 100;

/// A transport's options (`struct spdk_nvmf_transport_opts` and the transport's own), written by
/// `nvmf_get_transports` and `save_config` in `nvmf_transport_dump_opts()`'s order: the generic ones, the
/// transport's, then `abort_timeout_sec`, `ack_timeout`, `data_wr_pool_size`. `acceptor_poll_rate`,
/// `association_timeout` and TCP's `control_msg_num` are not written (SPDK loses them on reload);
/// `max_io_qpairs_per_ctrlr` is the I/O queue count (SPDK keeps one more). Options of later SPDK versions
/// are not kept (see [`NvmfCreateTransport`]): v24.05 ignores them, and writing them would change its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportOpts {
    /// I/O queue depth.
    pub max_queue_depth: u16,
    /// I/O queues per controller.
    pub max_io_qpairs_per_ctrlr: u16,
    /// In-capsule data size.
    pub in_capsule_data_size: u32,
    /// Largest I/O.
    pub max_io_size: u32,
    /// Data buffer size.
    pub io_unit_size: u32,
    /// Admin queue depth.
    pub max_aq_depth: u32,
    /// Data buffers of the transport.
    pub num_shared_buffers: u32,
    /// Data buffers cached per poll group (`u32::MAX`: chosen by the transport).
    pub buf_cache_size: u32,
    /// Insert/strip protection information.
    pub dif_insert_or_strip: bool,
    /// Zero-copy.
    pub zcopy: bool,
    /// Seconds an abort may take.
    pub abort_timeout_sec: u32,
    /// ACK timeout in milliseconds.
    pub ack_timeout: u32,
    /// RDMA data work request pool (0 for TCP).
    pub data_wr_pool_size: u32,
    /// Microseconds between acceptor polls; not written.
    pub acceptor_poll_rate: u32,
    /// Milliseconds a controller's association outlives its admin queue; not settable, not written.
    pub association_timeout: u32,
    /// The transport's own options (and so its type).
    pub specific: TransportSpecific,
}

/// A transport's own options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportSpecific {
    /// TCP's.
    Tcp(TcpOpts),
    /// RDMA's.
    Rdma(RdmaOpts),
}

/// TCP's options (`struct tcp_transport_opts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpOpts {
    /// C2H success optimization.
    pub c2h_success: bool,
    /// `SO_PRIORITY` of the sockets.
    pub sock_priority: u32,
    /// Control message buffers per poll group; not written.
    pub control_msg_num: u16,
}

/// RDMA's options (`struct rdma_transport_opts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaOpts {
    /// Shared receive queue depth.
    pub max_srq_depth: u32,
    /// No shared receive queue.
    pub no_srq: bool,
    /// Completion queue entries (written only with `no_srq`).
    pub num_cqe: i32,
    /// `listen()` backlog.
    pub acceptor_backlog: i32,
    /// No work request batching.
    pub no_wr_batching: bool,
}

impl TransportOpts {
    /// `spdk_nvmf_transport_opts_init()`: the transport's defaults (`SPDK_NVMF_TCP_DEFAULT_*`,
    /// `SPDK_NVMF_RDMA_DEFAULT_*`) and its own options' defaults.
    pub fn defaults(kind: TransportKind) -> TransportOpts {
        let common = TransportOpts {
            max_queue_depth: 128,
            max_io_qpairs_per_ctrlr: 127,
            in_capsule_data_size: 4096,
            max_io_size: 131_072,
            io_unit_size: 131_072,
            max_aq_depth: 128,
            num_shared_buffers: 511,
            buf_cache_size: u32::MAX,
            dif_insert_or_strip: false,
            zcopy: false,
            abort_timeout_sec: 1,
            ack_timeout: 0,
            data_wr_pool_size: 0,
            acceptor_poll_rate: DEFAULT_ACCEPT_POLL_RATE_US,
            association_timeout: DEFAULT_ASSOCIATION_TIMEOUT_MS,
            specific: TransportSpecific::Tcp(TcpOpts {
                c2h_success: true,
                sock_priority: 0,
                control_msg_num: TCP_DEFAULT_CONTROL_MSG_NUM,
            }),
        };
        match kind {
            TransportKind::Tcp => common,
            TransportKind::Rdma => TransportOpts {
                // SPDK_NVMF_RDMA_MIN_IO_BUFFER_SIZE: max_io_size / SPDK_NVMF_MAX_SGL_ENTRIES.
                io_unit_size: 131_072 / MAX_SGL_ENTRIES,
                num_shared_buffers: 4095,
                data_wr_pool_size: 4095,
                specific: TransportSpecific::Rdma(RdmaOpts {
                    max_srq_depth: 4096,
                    no_srq: false,
                    num_cqe: 4096,
                    acceptor_backlog: RDMA_DEFAULT_ACCEPTOR_BACKLOG,
                    no_wr_batching: false,
                }),
                ..common
            },
        }
    }

    /// The transport type.
    pub fn kind(&self) -> TransportKind {
        match self.specific {
            TransportSpecific::Tcp(_) => TransportKind::Tcp,
            TransportSpecific::Rdma(_) => TransportKind::Rdma,
        }
    }

    /// I/O queues plus the admin queue, as SPDK keeps it (`max_qpairs_per_ctrlr`, wrapping like its `u16`).
    pub fn max_qpairs_per_ctrlr(&self) -> u16 {
        self.max_io_qpairs_per_ctrlr.wrapping_add(1)
    }
}

impl Serialize for TransportOpts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("trtype", self.kind().name())?;
        m.serialize_entry("max_queue_depth", &self.max_queue_depth)?;
        // SPDK writes `max_qpairs_per_ctrlr - 1` as a u32: 65535 I/O queues wrap to 0 queues, written u32::MAX.
        let io_qpairs = u32::from(self.max_qpairs_per_ctrlr()).wrapping_sub(1);
        m.serialize_entry("max_io_qpairs_per_ctrlr", &io_qpairs)?;
        m.serialize_entry("in_capsule_data_size", &self.in_capsule_data_size)?;
        m.serialize_entry("max_io_size", &self.max_io_size)?;
        m.serialize_entry("io_unit_size", &self.io_unit_size)?;
        m.serialize_entry("max_aq_depth", &self.max_aq_depth)?;
        m.serialize_entry("num_shared_buffers", &self.num_shared_buffers)?;
        m.serialize_entry("buf_cache_size", &self.buf_cache_size)?;
        m.serialize_entry("dif_insert_or_strip", &self.dif_insert_or_strip)?;
        m.serialize_entry("zcopy", &self.zcopy)?;
        match &self.specific {
            TransportSpecific::Tcp(t) => {
                m.serialize_entry("c2h_success", &t.c2h_success)?;
                m.serialize_entry("sock_priority", &t.sock_priority)?;
            }
            TransportSpecific::Rdma(r) => {
                m.serialize_entry("max_srq_depth", &r.max_srq_depth)?;
                m.serialize_entry("no_srq", &r.no_srq)?;
                if r.no_srq {
                    m.serialize_entry("num_cqe", &r.num_cqe)?;
                }
                m.serialize_entry("acceptor_backlog", &r.acceptor_backlog)?;
                m.serialize_entry("no_wr_batching", &r.no_wr_batching)?;
            }
        }
        m.serialize_entry("abort_timeout_sec", &self.abort_timeout_sec)?;
        m.serialize_entry("ack_timeout", &self.ack_timeout)?;
        m.serialize_entry("data_wr_pool_size", &self.data_wr_pool_size)?;
        m.end()
    }
}

/// `nvmf_get_transports` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct NvmfGetTransports {
    /// Only the transport of this type (any case); none is `-19 "No such device"`.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub trtype: Option<String>,
    /// Target name.
    #[serde(deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub tgt_name: Option<String>,
}

method!(NvmfGetTransports, "nvmf_get_transports");

impl NvmfGetTransports {
    /// Whether `t` is listed: all without `trtype`, else the one whose name matches in any case
    /// (`spdk_nvmf_tgt_get_transport()`).
    pub fn selects(&self, t: &TransportOpts) -> bool {
        self.trtype
            .as_deref()
            .is_none_or(|n| t.kind().name().eq_ignore_ascii_case(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::decode_method;
    use serde_json::json;

    fn create(v: serde_json::Value) -> NvmfCreateTransport {
        decode_method(Some(v)).unwrap()
    }

    fn opts(v: serde_json::Value) -> Result<TransportOpts, RpcError> {
        let p = create(v);
        let kind = p.kind(&[TransportKind::Tcp, TransportKind::Rdma])?;
        p.options(kind, &TransportEnv::default())
    }

    #[test]
    fn decoding() {
        // Relaxed: unknown members (another transport's, a later version's) are ignored.
        let p = create(json!({"trtype": "tcp", "bogus": 1, "masked_oncs": ["x"]}));
        assert_eq!(p.trtype, "tcp");
        let e = decode_method::<NvmfCreateTransport>(Some(json!({}))).unwrap_err();
        assert_eq!(e.message, "missing field `trtype`");
        let e = decode_method::<NvmfCreateTransport>(Some(
            json!({"trtype": "TCP", "max_queue_depth": 70000}),
        ))
        .unwrap_err();
        assert_eq!(
            e.message,
            "invalid value: integer `70000`, expected u16 for field `max_queue_depth`"
        );
        let e = p.kind(&[TransportKind::Tcp]).unwrap();
        assert_eq!(e, TransportKind::Tcp);
        let e = create(json!({"trtype": "RDMA"}))
            .kind(&[TransportKind::Tcp])
            .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (-32602, "Invalid transport type 'RDMA'")
        );
        assert_eq!(
            create(json!({"trtype": "tcp"})).exists_error().message,
            "Transport type 'tcp' already exists"
        );
    }

    #[test]
    fn checks_and_adjustments() {
        let e = opts(json!({"trtype": "TCP", "max_io_size": 12288})).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (-32603, "Transport type 'TCP' create failed")
        );
        let e = opts(json!({"trtype": "TCP", "io_unit_size": 0})).unwrap_err();
        assert_eq!(e.message, "Transport type 'TCP' create failed");
        let e = opts(json!({"trtype": "TCP", "io_unit_size": 262144})).unwrap_err();
        assert_eq!(e.message, "Transport type 'TCP' create failed");
        let e = opts(json!({"trtype": "TCP", "sock_priority": 17})).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (-32603, "Failed to create transport.")
        );
        let e = opts(json!({"trtype": "TCP", "io_unit_size": 4096})).unwrap_err();
        assert_eq!(e.message, "Failed to create transport.");
        let e = opts(json!({"trtype": "TCP", "buf_cache_size": 512})).unwrap_err();
        assert_eq!(e.message, "Failed to create transport.");
        assert!(opts(json!({"trtype": "TCP", "buf_cache_size": 511})).is_ok());
        let o = opts(
            json!({"trtype": "TCP", "max_aq_depth": 8, "max_queue_depth": 1,
                            "max_io_size": 65536, "in_capsule_data_size": 131072}),
        )
        .unwrap();
        assert_eq!(o.max_aq_depth, 32);
        assert_eq!(o.max_queue_depth, 128);
        assert_eq!((o.io_unit_size, o.in_capsule_data_size), (65536, 65536));
        let o = opts(json!({"trtype": "TCP", "max_aq_depth": 5000})).unwrap();
        assert_eq!(o.max_aq_depth, 128);
        let o = opts(json!({"trtype": "TCP", "control_msg_num": 0})).unwrap();
        assert_eq!(
            o.specific,
            TransportSpecific::Tcp(TcpOpts {
                c2h_success: true,
                sock_priority: 0,
                control_msg_num: 32
            })
        );
        let o = opts(json!({"trtype": "rdma", "acceptor_backlog": 0, "in_capsule_data_size": 0}))
            .unwrap();
        assert_eq!(o.in_capsule_data_size, 256);
        assert!(matches!(
            o.specific,
            TransportSpecific::Rdma(RdmaOpts {
                acceptor_backlog: 100,
                ..
            })
        ));
        assert!(opts(json!({"trtype": "rdma", "num_shared_buffers": 31})).is_err());
    }

    #[test]
    fn written() {
        let o = opts(json!({"trtype": "RDMA", "no_srq": true, "num_cqe": 16, "kas": 10})).unwrap();
        assert_eq!(
            serde_json::to_value(&o).unwrap(),
            json!({"trtype": "RDMA", "max_queue_depth": 128, "max_io_qpairs_per_ctrlr": 127,
                   "in_capsule_data_size": 4096, "max_io_size": 131072, "io_unit_size": 8192,
                   "max_aq_depth": 128, "num_shared_buffers": 4095, "buf_cache_size": 4294967295u32,
                   "dif_insert_or_strip": false, "zcopy": false, "max_srq_depth": 4096, "no_srq": true,
                   "num_cqe": 16, "acceptor_backlog": 100, "no_wr_batching": false,
                   "abort_timeout_sec": 1, "ack_timeout": 0, "data_wr_pool_size": 4095})
        );
        let keys: Vec<String> = serde_json::to_value(&o)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys[12], "no_srq");
        assert_eq!(o.max_qpairs_per_ctrlr(), 128);
        let o = opts(json!({"trtype": "TCP", "max_io_qpairs_per_ctrlr": 65535})).unwrap();
        assert_eq!(
            serde_json::to_value(&o).unwrap()["max_io_qpairs_per_ctrlr"],
            json!(u32::MAX)
        );
    }

    #[test]
    fn get_transports() {
        let p: NvmfGetTransports = decode_method(Some(json!({"trtype": "tcp"}))).unwrap();
        assert!(p.selects(&TransportOpts::defaults(TransportKind::Tcp)));
        assert!(!p.selects(&TransportOpts::defaults(TransportKind::Rdma)));
        assert!(decode_method::<NvmfGetTransports>(Some(json!({"bogus": 1}))).is_err());
        assert!(decode_method::<NvmfGetTransports>(None)
            .unwrap()
            .selects(&TransportOpts::defaults(TransportKind::Rdma)));
    }
}
