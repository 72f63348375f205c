//! `spdk_dd`'s file I/O. By default through io_uring on the app thread, as SPDK's spdk_dd does: each unit's
//! read or write is queued on the ring and reaped by a poller, so files and bdevs run side by side on one
//! thread, `--qd` units deep. `--aio` (or a kernel without io_uring) takes the other path: a helper thread of
//! positioned reads and writes, one unit at a time.
//!
//! Either way a unit's buffer travels with its request and comes back with the result; a result is the bytes
//! moved (a read is short only at the end of the file) or a negative errno.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use reactor::dma::DmaBuf;

/// A finished request: slot, whether it wrote, bytes moved or -errno, the unit's buffer.
pub type Done = (usize, bool, i64, DmaBuf);

/// One request (fields private to this module).
pub struct Req {
    slot: usize,
    file: Arc<File>,
    write: bool,
    off: u64,
    len: usize,
    /// Bytes moved so far (a short transfer is continued from here).
    done: usize,
    buf: DmaBuf,
}

/// Where file requests go.
pub enum FileIo {
    /// io_uring on the calling thread; requests indexed by slot (one per slot at a time).
    Ring {
        /// Boxed: the ring's state is large next to the thread variant's two channel ends.
        ring: Box<IoUring>,
        reqs: Vec<Option<Req>>,
        /// Requests that did not fit the submission queue yet.
        waiting: VecDeque<usize>,
    },
    /// The helper thread.
    Thread {
        tx: mpsc::Sender<Req>,
        rx: mpsc::Receiver<Done>,
    },
}

impl FileIo {
    /// File I/O for `slots` units in flight: io_uring unless `aio` asks for the thread (or io_uring is missing).
    pub fn new(slots: usize, aio: bool) -> std::io::Result<FileIo> {
        if !aio {
            match IoUring::new(slots.next_power_of_two().max(2) as u32) {
                Ok(ring) => {
                    return Ok(FileIo::Ring {
                        ring: Box::new(ring),
                        reqs: (0..slots).map(|_| None).collect(),
                        waiting: VecDeque::new(),
                    })
                }
                Err(e) => {
                    log::warn!("io_uring is not available ({e}): file I/O on a helper thread")
                }
            }
        }
        let (tx, rx) = mpsc::channel::<Req>();
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        std::thread::Builder::new()
            .name("spdk_dd_files".into())
            .spawn(move || {
                while let Ok(mut r) = rx.recv() {
                    let res = blocking(&mut r);
                    if done_tx.send((r.slot, r.write, res, r.buf)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(FileIo::Thread { tx, rx: done_rx })
    }

    /// Reads (`write` false) or writes `len` bytes of `buf` at byte `off` of `file`, for unit `slot`.
    pub fn submit(
        &mut self,
        file: &Arc<File>,
        slot: usize,
        write: bool,
        off: u64,
        len: usize,
        buf: DmaBuf,
    ) -> Result<(), i32> {
        let req = Req {
            slot,
            file: file.clone(),
            write,
            off,
            len,
            done: 0,
            buf,
        };
        match self {
            FileIo::Ring { reqs, waiting, .. } => {
                let Some(s) = reqs.get_mut(slot) else {
                    return Err(-libc::EINVAL);
                };
                *s = Some(req);
                waiting.push_back(slot);
                self.push_waiting();
                Ok(())
            }
            FileIo::Thread { tx, .. } => tx.send(req).map_err(|_| -libc::EIO),
        }
    }

    /// Queues what waits and tells the kernel.
    fn push_waiting(&mut self) {
        let FileIo::Ring {
            ring,
            reqs,
            waiting,
        } = self
        else {
            return;
        };
        while let Some(&slot) = waiting.front() {
            let Some(r) = reqs[slot].as_mut() else {
                waiting.pop_front();
                continue;
            };
            let fd = types::Fd(r.file.as_raw_fd());
            let rest = (r.len - r.done) as u32;
            // SAFETY: the buffer is `len` bytes we own; `done < len`, so the range stays inside it.
            let at = unsafe { r.buf.as_ptr().add(r.done) };
            let pos = r.off + r.done as u64;
            let sqe = if r.write {
                opcode::Write::new(fd, at, rest).offset(pos).build()
            } else {
                opcode::Read::new(fd, at, rest).offset(pos).build()
            }
            .user_data(slot as u64);
            // SAFETY: the buffer and the file stay in `reqs[slot]` until the completion for this entry is
            // reaped (`reap` takes them out only then), so the kernel's access stays within live memory.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                break;
            }
            waiting.pop_front();
        }
        if !ring.submission().is_empty() {
            if let Err(e) = ring.submit() {
                log::error!("io_uring submit: {e}");
            }
        }
    }

    /// Finished requests, appended to `out`. A short transfer is sent again for the rest, except a read that
    /// found the end of the file.
    pub fn reap(&mut self, out: &mut Vec<Done>) {
        match self {
            FileIo::Thread { rx, .. } => out.extend(rx.try_iter()),
            FileIo::Ring {
                ring,
                reqs,
                waiting,
            } => {
                if ring.completion().is_empty() {
                    return;
                }
                for c in ring.completion() {
                    let (slot, res) = (c.user_data() as usize, c.result());
                    let Some(r) = reqs.get_mut(slot).and_then(Option::as_mut) else {
                        continue;
                    };
                    if res == -libc::EINTR || res == -libc::EAGAIN {
                        waiting.push_back(slot);
                        continue;
                    }
                    let end = match res {
                        e if e < 0 => Some(e as i64),
                        // A write that moves nothing would never finish.
                        0 if r.write => Some(-libc::EIO as i64),
                        0 => Some(r.done as i64),
                        n => {
                            r.done += n as usize;
                            (r.done >= r.len).then_some(r.done as i64)
                        }
                    };
                    match end {
                        Some(v) => {
                            if let Some(r) = reqs[slot].take() {
                                out.push((slot, r.write, v, r.buf));
                            }
                        }
                        None => waiting.push_back(slot),
                    }
                }
                self.push_waiting();
            }
        }
    }
}

/// The helper thread's transfer: positioned, continued until done or the end of the file. Answers the bytes
/// moved or -errno.
fn blocking(r: &mut Req) -> i64 {
    let len = r.len;
    let res = if r.write {
        r.file
            .write_all_at(&r.buf.as_slice()[..len], r.off)
            .map(|()| len)
    } else {
        let mut got = 0;
        loop {
            if got == len {
                break Ok(got);
            }
            match r
                .file
                .read_at(&mut r.buf.as_mut_slice()[got..len], r.off + got as u64)
            {
                Ok(0) => break Ok(got),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        }
    };
    res.map_or_else(
        |e| -(e.raw_os_error().unwrap_or(libc::EIO) as i64),
        |n| n as i64,
    )
}
