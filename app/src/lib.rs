//! The `spdk_tgt` application: command line, logging, subsystem init order, JSON config load and save,
//! the RPC server on the app thread, signals and orderly shutdown.

pub mod cli;
pub mod compat;
pub mod config;
pub mod logging;
pub mod rpc;
pub mod signals;
mod target;

pub use target::{run, run_with, Hooks, Target, VERSION};
