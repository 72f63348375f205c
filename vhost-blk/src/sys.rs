//! The few OS calls the std library does not wrap.

use std::os::unix::io::RawFd;

/// Sets `O_NONBLOCK` on `fd` (a kick eventfd: QEMU creates them non-blocking already, so sharing the open file
/// description with QEMU changes nothing for it).
pub fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; F_GETFL/F_SETFL touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An anonymous shared memory file (`memfd_create`), as QEMU backs guest RAM for vhost-user; on 2 MiB
/// hugepages when `huge` (`size` a multiple of 2 MiB).
pub fn memfd(name: &str, size: u64, huge: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::io::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    let flags = if huge {
        libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB
    } else {
        libc::MFD_CLOEXEC
    };
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size)?;
    Ok(f)
}
