//! Options of SPDK subsystems and bdev modules, as typed structs: SPDK's member names and write order, SPDK's
//! defaults (`Default`), and the value checks SPDK makes in the RPCs that set them.
//!
//! Each struct is the parameters object of one option method and, serialized, the `params` SPDK v24.05's
//! `save_config` writes for it (members added in later SPDK versions are `Option`s written only once set).
//! [`params::decode`] and [`params::decode_over`] decode a call's parameters as SPDK does, with serde-style
//! `-32602` messages naming the member; the structs' `check`/`normalize` methods answer SPDK's codes.
//!
//! The crate keeps no state and registers nothing: the application stores the options and wires the methods;
//! a crate that gives a subsystem meaning (an NVMe-oF target, the NVMe bdev module, the sock layer) takes its
//! struct over. See `DESIGN.md`.

pub mod framework;
pub mod params;

pub mod accel;
pub mod bdev_iscsi;
pub mod bdev_nvme;
pub mod cpuset;
pub mod dhchap;
pub mod fsdev;
pub mod iobuf;
pub mod iscsi;
pub mod keyring;
pub mod nvmf;
pub mod scheduler;
pub mod sock;
pub mod ublk;
pub mod vmd;

pub use params::{decode, decode_over, decode_relaxed, Params};
