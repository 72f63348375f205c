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
