//! One logging facade for every crate (the `log` crate), printed as SPDK prints: a timestamp, the component,
//! the level. Debug records are gated per component by `-L`/`log_set_flag` flags, as SPDK's `SPDK_DEBUGLOG`.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

/// SPDK's log levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    /// Nothing.
    Disabled = 0,
    /// Errors.
    Error = 1,
    /// Warnings.
    Warning = 2,
    /// Notices (default).
    Notice = 3,
    /// Information.
    Info = 4,
    /// Debug.
    Debug = 5,
}

impl Level {
    /// Parses SPDK's names, case-insensitively.
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s.to_ascii_uppercase().as_str() {
            "DISABLED" => Level::Disabled,
            "ERROR" => Level::Error,
            "WARNING" | "WARN" => Level::Warning,
            "NOTICE" => Level::Notice,
            "INFO" => Level::Info,
            "DEBUG" => Level::Debug,
            _ => return None,
        })
    }

    /// SPDK's name.
    pub fn name(self) -> &'static str {
        match self {
            Level::Disabled => "DISABLED",
            Level::Error => "ERROR",
            Level::Warning => "WARNING",
            Level::Notice => "NOTICE",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }

    fn from_u8(v: u8) -> Level {
        match v {
            0 => Level::Disabled,
            1 => Level::Error,
            2 => Level::Warning,
            3 => Level::Notice,
            4 => Level::Info,
            _ => Level::Debug,
        }
    }
}

/// Components that `-L` can enable, with the module-path prefixes that belong to each (longest first).
const COMPONENTS: &[(&str, &str)] = &[
    ("bdev::modules::malloc", "bdev_malloc"),
    ("bdev::modules::null", "bdev_null"),
    ("bdev::modules::uring", "uring"),
    ("bdev::modules::error", "vbdev_error"),
    ("bdev", "bdev"),
    ("reactor", "reactor"),
    ("jsonrpc", "rpc"),
    ("app::config", "json_util"),
    ("app", "app_rpc"),
    ("raid", "bdev_raid"),
    ("vhost_blk", "vhost_blk"),
    ("blobstore", "blob"),
    ("nvmf", "nvmf"),
    ("nvme_pcie", "nvme"),
];

/// Every flag name, sorted.
pub const FLAGS: &[&str] = &[
    "app_rpc",
    "bdev",
    "bdev_malloc",
    "bdev_null",
    "bdev_raid",
    "blob",
    "json_util",
    "nvme",
    "nvmf",
    "reactor",
    "rpc",
    "uring",
    "vbdev_error",
    "vhost_blk",
];

static PRINT_LEVEL: AtomicU8 = AtomicU8::new(Level::Notice as u8);
static LOG_LEVEL: AtomicU8 = AtomicU8::new(Level::Notice as u8);
static ENABLED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

fn enabled_flags() -> std::sync::MutexGuard<'static, Vec<&'static str>> {
    reactor::lock(&ENABLED)
}

/// Enables a flag (`all` enables every flag). Unknown names are refused.
pub fn set_flag(name: &str) -> Result<(), String> {
    let mut e = enabled_flags();
    if name == "all" {
        *e = FLAGS.to_vec();
        return Ok(());
    }
    let f = FLAGS
        .iter()
        .find(|f| **f == name)
        .ok_or_else(|| format!("unknown flag {name}"))?;
    if !e.contains(f) {
        e.push(f);
    }
    Ok(())
}

/// Disables a flag (`all` disables every flag).
pub fn clear_flag(name: &str) -> Result<(), String> {
    let mut e = enabled_flags();
    if name == "all" {
        e.clear();
        return Ok(());
    }
    if !FLAGS.contains(&name) {
        return Err(format!("unknown flag {name}"));
    }
    e.retain(|f| *f != name);
    Ok(())
}

/// Every flag and whether it is on.
pub fn flags() -> Vec<(&'static str, bool)> {
    let e = enabled_flags();
    FLAGS.iter().map(|f| (*f, e.contains(f))).collect()
}

/// Sets the level printed to stderr.
pub fn set_print_level(l: Level) {
    PRINT_LEVEL.store(l as u8, Ordering::Relaxed);
}
/// The level printed to stderr.
pub fn print_level() -> Level {
    Level::from_u8(PRINT_LEVEL.load(Ordering::Relaxed))
}
/// Sets the log (syslog) level; kept and reported (there is no syslog sink).
pub fn set_level(l: Level) {
    LOG_LEVEL.store(l as u8, Ordering::Relaxed);
}
/// The log (syslog) level.
pub fn level() -> Level {
    Level::from_u8(LOG_LEVEL.load(Ordering::Relaxed))
}

fn component(target: &str) -> Option<&'static str> {
    COMPONENTS
        .iter()
        .find(|(prefix, _)| target == *prefix || target.starts_with(&format!("{prefix}::")))
        .map(|(_, f)| *f)
}

fn spdk_level(l: log::Level) -> Level {
    match l {
        log::Level::Error => Level::Error,
        log::Level::Warn => Level::Warning,
        log::Level::Info => Level::Notice,
        log::Level::Debug | log::Level::Trace => Level::Debug,
    }
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        let l = spdk_level(m.level());
        if l > print_level() {
            return false;
        }
        if l == Level::Debug {
            // Debug output is per component, as SPDK_DEBUGLOG.
            return component(m.target()).is_some_and(|c| enabled_flags().contains(&c));
        }
        true
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let comp = component(r.target()).unwrap_or("app");
        let line = format!(
            "[{}] {}: *{}*: {}\n",
            timestamp(),
            comp,
            spdk_level(r.level()).name(),
            r.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// `YYYY-MM-DD HH:MM:SS.uuuuuu` in UTC.
fn timestamp() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Installs the logger once; `flags` are `-L` values. `-L` also raises the print level to DEBUG, as SPDK does.
pub fn init(flags: &[String], silence_notice: bool) -> Result<(), String> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let _ = log::set_logger(&Logger);
        log::set_max_level(log::LevelFilter::Trace);
    });
    for f in flags {
        set_flag(f)?;
    }
    if !flags.is_empty() {
        set_print_level(Level::Debug);
    } else if silence_notice {
        set_print_level(Level::Warning);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_levels_and_components() {
        assert_eq!(component("bdev::modules::malloc"), Some("bdev_malloc"));
        assert_eq!(component("bdev::channel"), Some("bdev"));
        assert_eq!(component("jsonrpc::server"), Some("rpc"));
        assert_eq!(component("bdevperf"), None);
        set_flag("bdev").unwrap();
        assert!(flags().contains(&("bdev", true)));
        assert!(set_flag("nope").is_err());
        clear_flag("bdev").unwrap();
        assert!(flags().contains(&("bdev", false)));
        assert_eq!(Level::parse("warning"), Some(Level::Warning));
        assert_eq!(Level::parse("x"), None);
        assert_eq!(timestamp().len(), 26);
    }
}
