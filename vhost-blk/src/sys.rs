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

/// An anonymous shared memory file (`memfd_create`), as QEMU backs guest RAM for vhost-user.
pub fn memfd(name: &str, size: u64) -> std::io::Result<std::fs::File> {
    use std::os::unix::io::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size)?;
    Ok(f)
}

/// Lets the calling thread run on any CPU (threads inherit the affinity of their creator, and a control thread
/// started from a pinned reactor must not compete with it).
pub fn unpin_current_thread() {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it and affects the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in 0..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
