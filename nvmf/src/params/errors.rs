//! SPDK v24.05's answers to failed NVMe-oF target calls, as captured from `nvmf_tgt` (see
//! `tests/fixtures/spdk-v24.05/calls.json`). Decoding faults (wrong types, unknown members of strict methods,
//! missing members) are `-32602` for SPDK, with `"Invalid parameters"`; this target words those as
//! [`subsystems::params`] does. The rest:
//!
//! | call | fault | code | message |
//! | --- | --- | --- | --- |
//! | any | `tgt_name` not the target's | -32603 | see [`target_not_found`] |
//! | `nvmf_create_transport` | `trtype` not a transport of the build (`PCIE`, `foo`; `RDMA` without RDMA) | -32602 | `Invalid transport type 'X'` (as given) |
//! | | that transport exists (any case) | -32603 | `Transport type 'X' already exists` (as given) |
//! | | generic option checks (`max_io_size`, `io_unit_size`) | -32603 | `Transport type 'X' create failed` |
//! | | transport option checks (`sock_priority`, SGL count, buffer cache) | -32603 | `Failed to create transport.` |
//! | `nvmf_get_transports` | no transport of that `trtype` | -19 | `No such device` |
//! | `nvmf_create_subsystem` | NQN exists, is invalid, or no subsystem ID is free | -32603 | `Unable to create subsystem NQN` |
//! | | serial number over 20 bytes or not printable ASCII | -32602 | `Invalid SN X` |
//! | | model number over 40 bytes or not printable ASCII | -32602 | `Invalid MN X` |
//! | | cntlid range not within 1..=0xffef, or min > max | -32602 | `Invalid cntlid range [MIN-MAX]` |
//! | | `max_write_zeroes_size_kib` neither 0 nor a power of 2 above 2 | -32602 | `Invalid max_write_zeroes_size_kib N\n` (sic) |
//! | `nvmf_get_subsystems` | no subsystem of that NQN | -19 | `No such device` |
//! | `nvmf_delete_subsystem`, `nvmf_subsystem_add_ns`, `_remove_ns`, `_add_listener`, `_remove_listener`, `_add_host`, `_remove_host`, `_allow_any_host`, `_get_controllers`, `_get_qpairs`, `_get_listeners`, `nvmf_ns_add_host`, `nvmf_ns_remove_host` | no subsystem of that NQN | -32602 | `Invalid parameters` |
//! | `nvmf_subsystem_listener_set_ana_state` | no subsystem of that NQN | -32602 | `Unable to find subsystem with NQN X` |
//! | `nvmf_subsystem_add_ns` | bdev missing (ENODEV), already claimed, NSID taken or above `max_namespaces`, ANA group above it, bad NGUID/EUI-64/UUID | -32602 | `Invalid parameters` |
//! | `nvmf_subsystem_remove_ns` | no such NSID | -32602 | `Invalid parameters` |
//! | `nvmf_subsystem_add_listener` | bad address, listener exists, no transport of that type, listen fails, bad `ana_state` | -32602 | `Invalid parameters` |
//! | | `secure_channel` on a subsystem that allows any host | -32603 | `Cannot establish secure channel, when 'allow_any_host' is set` |
//! | `nvmf_subsystem_remove_listener` | bad address, no transport, no such listener | -32602 | `Invalid parameters` |
//! | `nvmf_subsystem_listener_set_ana_state` | bad address, `ana_state` not `optimized`/`non_optimized`/`inaccessible` | -32602 | `Invalid parameters` |
//! | | ANA reporting off, `anagrpid` above `max_namespaces`, no such listener | -32603 | `error setting ANA state: -22` |
//! | `nvmf_subsystem_add_host` | `dhchap_key` / `dhchap_ctrlr_key` not in the keyring | -32602 | `Invalid parameters` |
//! | | invalid host NQN, ctrlr key without host key, PSK unusable | -32603 | `Internal error` |
//! | | host already allowed | | `true` (nothing changes, keys included) |
//! | `nvmf_subsystem_remove_host` | host not allowed | -32603 | `Internal error` |
//! | `nvmf_discovery_add_referral` | bad address | -32602 | `Invalid parameters` |
//! | | `subnqn` of 224 bytes or more | -32602 | `Invalid subsystem NQN` |
//! | | TCP or RDMA without `trsvcid` | -32603 | `Service ID is required.` |
//! | | `subnqn` invalid | -32603 | `Internal error` |
//! | | referral exists | | `true` (nothing changes) |
//! | `nvmf_discovery_remove_referral` | no such referral | -32603 | `Unable to remove a referral.` |
//! | any that pauses a subsystem | subsystem changing state | -32603 | `subsystem busy, retry later.\n` (sic) |

use jsonrpc::{RpcError, INTERNAL_ERROR, INVALID_PARAMS};

/// `-32602 "Invalid parameters"`, SPDK's answer to most refusals.
pub fn invalid_params() -> RpcError {
    RpcError::invalid_params("Invalid parameters")
}

/// `-32603 "Internal error"`.
pub fn internal_error() -> RpcError {
    RpcError::internal("Internal error")
}

/// `-19 "No such device"` (`-ENODEV` with `spdk_strerror()`).
pub fn no_such_device() -> RpcError {
    RpcError::errno(libc::ENODEV)
}

/// The answer to a `tgt_name` that is not the target's, which differs per method: `-32603` with
/// `Unable to find target NAME` (`nvmf_create_subsystem`), `Unable to find a target` (`nvmf_discovery_get_referrals`
/// and the `nvmf_subsystem_get_*` queries), `Unable to find a target.\n` (`nvmf_subsystem_listener_set_ana_state`)
/// or `Unable to find a target.` (the others).
pub fn target_not_found(method: &str, tgt_name: Option<&str>) -> RpcError {
    let message = match method {
        "nvmf_create_subsystem" => {
            format!("Unable to find target {}", tgt_name.unwrap_or("(null)"))
        }
        "nvmf_discovery_get_referrals"
        | "nvmf_subsystem_get_controllers"
        | "nvmf_subsystem_get_qpairs"
        | "nvmf_subsystem_get_listeners" => "Unable to find a target".into(),
        "nvmf_subsystem_listener_set_ana_state" => "Unable to find a target.\n".into(),
        _ => "Unable to find a target.".into(),
    };
    RpcError::new(INTERNAL_ERROR, message)
}

/// The answer to an NQN that names no subsystem, which differs per method: `-19 "No such device"`
/// (`nvmf_get_subsystems`), `-32602 "Unable to find subsystem with NQN X"`
/// (`nvmf_subsystem_listener_set_ana_state`) or `-32602 "Invalid parameters"` (the others).
pub fn subsystem_not_found(method: &str, nqn: &str) -> RpcError {
    match method {
        "nvmf_get_subsystems" => {
            log::error!("subsystem '{nqn}' does not exist");
            no_such_device()
        }
        "nvmf_subsystem_listener_set_ana_state" => {
            log::error!("Unable to find subsystem with NQN {nqn}");
            RpcError::new(
                INVALID_PARAMS,
                format!("Unable to find subsystem with NQN {nqn}"),
            )
        }
        _ => {
            log::error!("Unable to find subsystem with NQN {nqn}");
            invalid_params()
        }
    }
}

/// `-32603 "subsystem busy, retry later.\n"`: the subsystem is changing state (pause/resume under way).
pub fn subsystem_busy() -> RpcError {
    RpcError::internal("subsystem busy, retry later.\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(no_such_device().code, -19);
        assert_eq!(no_such_device().message, "No such device");
        assert_eq!(
            target_not_found("nvmf_create_subsystem", Some("none")).message,
            "Unable to find target none"
        );
        assert_eq!(
            target_not_found("nvmf_get_stats", Some("none")).message,
            "Unable to find a target."
        );
        assert_eq!(
            subsystem_not_found("nvmf_subsystem_add_ns", "x").message,
            "Invalid parameters"
        );
    }
}
