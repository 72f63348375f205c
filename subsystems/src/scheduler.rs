//! `scheduler` subsystem: `framework_set_scheduler` (lib/event/scheduler_*.c, `app_rpc.c`).

use jsonrpc::RpcError;
use serde::{Deserialize, Serialize};

use crate::params::{some, Params};

/// Schedulers SPDK v24.05 registers: `static` (the default), `dynamic` and `gscheduler`.
pub const SCHEDULERS: &[&str] = &["static", "dynamic", "gscheduler"];

/// `spdk_scheduler_set_period()`'s default when no period was ever set: 1 s.
pub const DEFAULT_PERIOD_US: u64 = 1_000_000;

/// `framework_set_scheduler` parameters.
///
/// SPDK saves only `name` and `period`; the scheduler-specific members are accepted and kept (see
/// [`SchedulerTuning`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct FrameworkSetScheduler {
    /// Scheduler name, one of [`SCHEDULERS`] (else the RPC fails with `spdk_strerror(-EINVAL)`).
    pub name: String,
    /// Scheduling period in microseconds; absent or 0 keeps the current one (1 s when none was set).
    #[serde(default)]
    pub period: u64,
    /// `dynamic`: core load (%) under which a core's threads are moved away.
    #[serde(default, deserialize_with = "some", skip_serializing)]
    pub load_limit: Option<u8>,
    /// `dynamic`: core load (%) over which no more threads are moved to a core.
    #[serde(default, deserialize_with = "some", skip_serializing)]
    pub core_limit: Option<u8>,
    /// `dynamic`: core load (%) over which the main core is considered busy.
    #[serde(default, deserialize_with = "some", skip_serializing)]
    pub core_busy: Option<u8>,
    /// `static` (SPDK 25.x+): thread-to-core mappings.
    #[serde(default, deserialize_with = "some", skip_serializing)]
    pub mappings: Option<String>,
}

impl Params for FrameworkSetScheduler {}

/// Scheduler-specific options that SPDK does not save; later calls override the members they give.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SchedulerTuning {
    /// See [`FrameworkSetScheduler::load_limit`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_limit: Option<u8>,
    /// See [`FrameworkSetScheduler::core_limit`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core_limit: Option<u8>,
    /// See [`FrameworkSetScheduler::core_busy`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core_busy: Option<u8>,
    /// See [`FrameworkSetScheduler::mappings`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mappings: Option<String>,
}

/// The framework's scheduler state as `framework_set_scheduler` changes it and `save_config` writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scheduler {
    /// The selected scheduler; `None` until the RPC or subsystem init selects one.
    pub name: Option<String>,
    /// The period in microseconds (0: none, as with `static`).
    pub period: u64,
    /// What was given for the scheduler's own options.
    pub tuning: SchedulerTuning,
}

impl Scheduler {
    /// Subsystem init: `static` is selected when nothing was (its init clears the period).
    pub fn on_init(&mut self) {
        if self.name.is_none() {
            self.name = Some("static".into());
            self.period = 0;
        }
    }

    /// `rpc_framework_set_scheduler()`: the period is set (or defaulted) before the name is looked up, so it
    /// changes even when the name is refused.
    pub fn set(&mut self, p: FrameworkSetScheduler) -> Result<(), RpcError> {
        if p.name == "static" && self.name.as_deref().is_some_and(|s| s != "static") {
            return Err(RpcError::invalid_params(
                "Static scheduler cannot be re-enabled after a different scheduler was selected",
            ));
        }
        match p.period {
            0 if self.period == 0 => self.period = DEFAULT_PERIOD_US,
            0 => {}
            n => self.period = n,
        }
        if !SCHEDULERS.contains(&p.name.as_str()) {
            log::error!("Requested scheduler is missing");
            // spdk_strerror(-EINVAL): glibc's text for a negative errno.
            return Err(RpcError::internal(format!(
                "Unknown error {}",
                -libc::EINVAL
            )));
        }
        if self.name.as_deref() != Some(p.name.as_str()) {
            if p.name == "static" {
                // The static scheduler's init clears the period.
                self.period = 0;
            }
            self.name = Some(p.name);
        }
        let t = &mut self.tuning;
        t.load_limit = p.load_limit.or(t.load_limit);
        t.core_limit = p.core_limit.or(t.core_limit);
        t.core_busy = p.core_busy.or(t.core_busy);
        t.mappings = p.mappings.or(t.mappings.take());
        Ok(())
    }

    /// The saved params: `{"name": ..}` plus `period` when non-zero (written with
    /// `spdk_json_write_named_uint32()` from a `uint64_t`, so truncated to 32 bits).
    pub fn saved(&self) -> SavedScheduler {
        SavedScheduler {
            name: self.name.clone().unwrap_or_else(|| "static".into()),
            period: (self.period != 0).then_some(self.period as u32),
        }
    }
}

/// What `save_config` writes for `framework_set_scheduler`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SavedScheduler {
    /// Scheduler name.
    pub name: String,
    /// Period in microseconds, when non-zero.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<u32>,
}
