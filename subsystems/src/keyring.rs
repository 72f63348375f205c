//! `keyring` subsystem: `keyring_file_add_key`, `keyring_file_remove_key` (module/keyring/file) and
//! `keyring_linux_set_options` (module/keyring/linux, builds `--with-keyutils`).

use jsonrpc::RpcError;
use serde::{Deserialize, Serialize};

use crate::params::Params;

/// `keyring_file_add_key` parameters, saved as given, one entry per key in the order added.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct KeyringFileAddKey {
    /// Key name; a `:` past the first character names another keyring, which does not exist (`-EINVAL`).
    pub name: String,
    /// Absolute path of the key file, owned by us and readable by us only.
    pub path: String,
}

impl Params for KeyringFileAddKey {}

impl KeyringFileAddKey {
    /// `spdk_keyring_add_key()` and `keyring_file_check_path()`: the name, then that no key of `existing` has
    /// it (`-EEXIST`), then the file (see [`check_key_file`]).
    pub fn check(&self, existing: &[KeyringFileAddKey]) -> Result<(), RpcError> {
        let name = &self.name;
        if name.find(':').is_some_and(|i| i != 0) {
            log::error!("Couldn't add key '{name}' to the keyring: keyring doesn't exist");
            return Err(RpcError::errno(libc::EINVAL));
        }
        if existing.iter().any(|k| k.name == *name) {
            log::error!("Key '{name}' already exists");
            return Err(RpcError::errno(libc::EEXIST));
        }
        check_key_file(&self.path)
    }
}

/// `keyring_file_remove_key` parameters (an unknown name is not an error).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct KeyringFileRemoveKey {
    /// Key name.
    pub name: String,
}

impl Params for KeyringFileRemoveKey {}

/// `keyring_linux_set_options` parameters and options; a call changes the members it gives. Saved only once
/// set (the module is build-optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "an object")]
pub struct KeyringLinuxOptions {
    /// Look keys up in the Linux kernel keyring (off by default).
    pub enable: bool,
}

impl Params for KeyringLinuxOptions {}

/// `keyring_file_check_path()`: an absolute path (`-EPERM`) to a file that exists (its `stat` errno) and is
/// ours and readable by us only (`-EPERM`).
pub fn check_key_file(path: &str) -> Result<(), RpcError> {
    use std::os::unix::fs::MetadataExt;
    if !path.starts_with('/') {
        log::error!("Non-absolute paths are not allowed: {path}");
        return Err(RpcError::errno(libc::EPERM));
    }
    let md = std::fs::metadata(path).map_err(|e| {
        log::error!("Could not stat key file '{path}': {e}");
        RpcError::errno(e.raw_os_error().unwrap_or(libc::EIO))
    })?;
    // SAFETY: getuid() has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if md.mode() & 0o077 != 0 || md.uid() != uid {
        log::error!(
            "Invalid permissions for key file '{path}': 0{:o}",
            md.mode()
        );
        return Err(RpcError::errno(libc::EPERM));
    }
    Ok(())
}

/// A key of the file keyring: what `keyring_file_add_key` registered, shared by its users (an attached
/// controller holds its DH-HMAC-CHAP keys). Its file is read, and checked again, at every use, as SPDK does.
#[derive(Debug)]
pub struct FileKey {
    /// Key name.
    pub name: String,
    /// Absolute path of the key file.
    pub path: String,
    removed: std::sync::atomic::AtomicBool,
}

/// Longest key text SPDK reads from a key file.
const MAX_KEY_LEN: usize = 256;

impl FileKey {
    /// The key's text (the file's contents), or the errno of why not: ENOKEY once the key was removed.
    pub fn read(&self) -> Result<String, i32> {
        if self.removed.load(std::sync::atomic::Ordering::Acquire) {
            log::error!("Key '{}' was removed", self.name);
            return Err(libc::ENOKEY);
        }
        check_key_file(&self.path).map_err(|e| -e.code)?;
        let text = std::fs::read_to_string(&self.path).map_err(|e| {
            log::error!("Could not read key file '{}': {e}", self.path);
            e.raw_os_error().unwrap_or(libc::EIO)
        })?;
        if text.len() > MAX_KEY_LEN {
            log::error!("Key '{}' is longer than {MAX_KEY_LEN} bytes", self.name);
            return Err(libc::ENOBUFS);
        }
        Ok(text)
    }

    /// Whether the key was removed from the keyring (users still holding it can no longer read it).
    pub fn removed(&self) -> bool {
        self.removed.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The keys, added ones and removed ones that users still hold (removed ones nobody holds are dropped here).
fn registry() -> std::sync::MutexGuard<'static, Vec<std::sync::Arc<FileKey>>> {
    static KEYS: std::sync::Mutex<Vec<std::sync::Arc<FileKey>>> = std::sync::Mutex::new(Vec::new());
    let mut r = KEYS.lock().unwrap_or_else(|e| e.into_inner());
    r.retain(|e| !e.removed() || std::sync::Arc::strong_count(e) > 1);
    r
}

/// A TLS PSK's text as SPDK's NVMe/TCP code finds it (`bdev_nvme_load_psk`, `tcp_load_psk`): the keyring's key
/// `name`, or else, SPDK's deprecated form, the file at path `name`, which only its owner may use. An error
/// carries SPDK's errno and why: the keyring's errno for a key it has; for a file EACCES when it cannot be looked
/// at, EPERM when group or others may use it (or its owner run it), EINVAL when it is too long or unreadable.
pub fn read_psk(name: &str) -> Result<String, (i32, String)> {
    use std::os::unix::fs::MetadataExt;
    /// SPDK's `SPDK_TLS_PSK_MAX_LEN`: a key file must be shorter.
    const MAX_PSK_FILE: u64 = 200;
    if let Some(k) = get(name) {
        return k
            .read()
            .map_err(|errno| (errno, format!("key '{name}' could not be read")));
    }
    log::warn!("PSK {name} is not a key in the keyring: read as a file path (deprecated in SPDK)");
    let md = std::fs::metadata(name).map_err(|e| (libc::EACCES, e.to_string()))?;
    if md.mode() & 0o177 != 0 {
        return Err((libc::EPERM, "Incorrect permissions for PSK file".into()));
    }
    if md.len() >= MAX_PSK_FILE {
        return Err((libc::EINVAL, "Invalid PSK: too long".into()));
    }
    std::fs::read_to_string(name).map_err(|e| (libc::EINVAL, e.to_string()))
}

/// Registers a key `keyring_file_add_key` accepted ([`KeyringFileAddKey::check`] first).
pub fn add(k: &KeyringFileAddKey) {
    registry().push(std::sync::Arc::new(FileKey {
        name: k.name.trim_start_matches(':').to_string(),
        path: k.path.clone(),
        removed: false.into(),
    }));
}

/// Removes key `name` (`keyring_file_remove_key`): users that hold it can no longer read it.
pub fn remove(name: &str) {
    let name = name.trim_start_matches(':');
    for e in registry().iter().filter(|e| e.name == name && !e.removed()) {
        e.removed.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// The key called `name` (`key0` and `:key0` are the same key), for a user to hold.
pub fn get(name: &str) -> Option<std::sync::Arc<FileKey>> {
    let name = name.trim_start_matches(':');
    registry()
        .iter()
        .find(|e| e.name == name && !e.removed())
        .cloned()
}

/// `keyring_get_keys`: every key with SPDK's fields (a removed key is listed while users hold it).
pub fn list() -> Vec<serde_json::Value> {
    registry()
        .iter()
        .map(|e| {
            let users = std::sync::Arc::strong_count(e) - 1;
            let mut v = serde_json::json!({
                "name": e.name,
                "module": "keyring_file",
                "removed": e.removed(),
                "probed": false,
                // The keyring's own reference while the key is in it, plus one per user.
                "refcnt": users + usize::from(!e.removed()),
            });
            if !e.removed() {
                v["path"] = serde_json::json!(e.path);
            }
            v
        })
        .collect()
}
