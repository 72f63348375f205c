//! The rebuild process: copies an online raid1's data onto a new member, window by window, while I/O goes on.
//!
//! The target is attached to every channel as a write-only member at the start, so every write from then on
//! reaches it too. Each window `[w, w + size)` is then copied from an in-sync member:
//!
//! 1. every channel holds new writes into the window (reads are unaffected: they never go to the target),
//! 2. writes into the window that were already in flight drain
//!    (1 and 2 are the bdev layer's LBA range lock on the raid bdev),
//! 3. the window is read from an in-sync member and written to the target,
//! 4. the hold is lifted and the process moves on.
//!
//! A write either completed before step 3 read the window (so the copy carries it), or waits until step 4 and
//! then reaches the target itself: the target never ends up older than its mirrors. It serves reads only once
//! the last window is copied, and the superblock records it as a member after that.
//!
//! The process runs on the app thread; `process_window_size_kb` sets the window and
//! `process_max_bandwidth_mb_sec` throttles it (a token bucket checked before each window).

use std::sync::Arc;
use std::time::Instant;

use bdev::{Completion, Desc};
use reactor::dma::DmaBuf;

use crate::channel::BaseCh;
use crate::error::{err, ErrorKind, Result};
use crate::raid::{self, later, walk, Raid, RaidState};
use crate::sb::BaseState;

/// Bandwidth limit state.
struct Qos {
    bytes_per_sec: f64,
    available: f64,
    max: f64,
    last: Instant,
}

/// A running rebuild.
pub(crate) struct Process {
    /// Slot being rebuilt.
    pub target: usize,
    target_gen: u32,
    /// Blocks copied so far (the start of the next window).
    pub offset: u64,
    window: u64,
    /// The bdev layer's lock on the window being copied (writes into it are held meanwhile).
    lock: Option<u64>,
    stop: Option<i32>,
    /// Run once the process stopped (successfully or not).
    pub finish_actions: Vec<Box<dyn FnOnce() + Send>>,
    buf: Option<DmaBuf>,
    qos: Option<Qos>,
}

impl Process {
    /// Asks the process to stop after the current window, with `errno` as its status.
    pub(crate) fn request_stop(&mut self, errno: i32) {
        if self.stop.is_none() {
            self.stop = Some(errno);
        }
    }
}

/// Starts rebuilding slot `target` of an online raid1.
pub(crate) fn start_rebuild(raid: &Arc<Raid>, target: usize) -> Result<()> {
    let (opts, _) = raid::options();
    let (desc, offset, gen) = {
        let mut st = raid.lock();
        if st.process.is_some() {
            return err(
                ErrorKind::NotPermitted,
                format!("raid bdev '{}' is in process", raid.name),
            );
        }
        if st.state != RaidState::Online {
            return err(ErrorKind::Invalid, "raid bdev is not online");
        }
        let bs = st.block_size as u64;
        let window = (opts.process_window_size_kb as u64 * 1024)
            .div_ceil(bs)
            .clamp(1, st.num_blocks.max(1));
        let buf = DmaBuf::alloc((window * bs) as usize)
            .map_err(|e| crate::RaidError::new(ErrorKind::NoMemory, e.to_string()))?;
        let b = &st.bases[target];
        let Some(desc) = b.desc.clone() else {
            return err(ErrorKind::NotFound, "rebuild target has no descriptor");
        };
        let (offset, gen) = (b.data_offset, b.gen);
        let qos = (opts.process_max_bandwidth_mb_sec != 0).then(|| {
            let rate = opts.process_max_bandwidth_mb_sec as f64 * 1024.0 * 1024.0;
            Qos {
                bytes_per_sec: rate,
                available: 0.0,
                max: rate / 1000.0,
                last: Instant::now(),
            }
        });
        st.process = Some(Process {
            target,
            target_gen: gen,
            offset: 0,
            window,
            lock: None,
            stop: None,
            finish_actions: Vec::new(),
            buf: Some(buf),
            qos,
        });
        (desc, offset, gen)
    };
    log::info!("Started rebuild on raid bdev {}", raid.name);
    let r = raid.clone();
    walk(
        raid,
        move |ch| {
            ch.st.borrow_mut().set_base(
                target,
                BaseCh {
                    ch: Some(desc.channel()),
                    offset,
                    readable: false,
                    gen,
                    outstanding: 0,
                },
            );
        },
        move || run(r),
    );
    Ok(())
}

enum Step {
    Finish(i32),
    Wait(u64),
    Lock(u64, u64),
}

/// Next step of the process (app thread).
fn run(raid: Arc<Raid>) {
    let step = {
        let mut st = raid.lock();
        let num_blocks = st.num_blocks;
        let Some(p) = st.process.as_mut() else { return };
        if let Some(e) = p.stop {
            Step::Finish(e)
        } else if p.offset >= num_blocks {
            Step::Finish(0)
        } else {
            let size = p.window.min(num_blocks - p.offset);
            let bs = st.block_size as f64;
            let p = st.process.as_mut().expect("checked");
            match p.qos.as_mut() {
                Some(q) => {
                    let now = Instant::now();
                    let dt = now.duration_since(q.last).as_secs_f64();
                    q.last = now;
                    q.available = (q.available + dt * q.bytes_per_sec).min(q.max);
                    if q.available > 0.0 {
                        q.available -= size as f64 * bs;
                        Step::Lock(p.offset, p.offset + size)
                    } else {
                        let us = (-q.available / q.bytes_per_sec * 1e6) as u64 + 1;
                        Step::Wait(us)
                    }
                }
                None => Step::Lock(p.offset, p.offset + size),
            }
        }
    };
    match step {
        Step::Finish(status) => finish(raid, status),
        Step::Wait(us) => {
            reactor::timer(us, move || run(raid)).detach();
        }
        Step::Lock(a, b) => {
            // The bdev layer holds new writes into the window on every channel and waits for those in flight
            // (a mirror write parked until a failed member is recorded does not count: its data is in place).
            let Some(bdev) = raid.lock().bdev.clone() else {
                return finish(raid, libc::ENODEV);
            };
            let r = raid.clone();
            bdev.lock_lba_range(a, b - a, move |id| {
                if let Some(p) = r.lock().process.as_mut() {
                    p.lock = Some(id);
                }
                copy(r, (a, b), 0)
            });
        }
    }
}

/// Copies one window: read from an in-sync member (another one if that fails), write to the target.
fn copy(raid: Arc<Raid>, range: (u64, u64), tried: u64) {
    let picked = {
        let mut st = raid.lock();
        let Some(p) = st.process.as_ref() else { return };
        let target = p.target;
        let src = st.bases.iter().enumerate().find(|(i, b)| {
            *i != target
                && b.is_configured
                && !b.is_process_target
                && !b.remove_scheduled
                && !b.detached
                && b.desc.is_some()
                && tried & (1 << i) == 0
        });
        let src = src.map(|(i, b)| (i, b.desc.clone().expect("checked"), b.data_offset));
        let t = &st.bases[target];
        let tgt = t.desc.clone().map(|d| (d, t.data_offset));
        let buf = st.process.as_mut().and_then(|p| p.buf.take());
        (src, tgt, buf)
    };
    let (Some((si, src, soff)), Some((tgt, toff)), Some(buf)) = picked else {
        log::error!("rebuild of {}: no member to copy from", raid.name);
        return unlock(raid, range, false, Some(libc::EIO));
    };
    let n = range.1 - range.0;
    let r = raid.clone();
    let res = src.channel().read(
        buf,
        soff + range.0,
        n,
        Completion::Closure(Box::new(move |mut io| {
            let buf = io.take_buf().expect("window buffer");
            if !io.success() {
                log::warn!("rebuild of {}: read from member {si} failed", r.name);
                put_buf(&r, buf);
                return copy(r, range, tried | (1 << si));
            }
            write_target(r, range, tgt, toff, buf);
        })),
        0,
    );
    if let Err(e) = res {
        log::error!("rebuild of {}: {e}", raid.name);
        unlock(raid, range, false, Some(libc::ENOMEM));
    }
}

fn put_buf(raid: &Raid, buf: DmaBuf) {
    if let Some(p) = raid.lock().process.as_mut() {
        p.buf = Some(buf);
    }
}

fn write_target(raid: Arc<Raid>, range: (u64, u64), tgt: Arc<Desc>, toff: u64, buf: DmaBuf) {
    let n = range.1 - range.0;
    let r = raid.clone();
    let res = tgt.channel().write(
        buf,
        toff + range.0,
        n,
        Completion::Closure(Box::new(move |mut io| {
            if let Some(buf) = io.take_buf() {
                put_buf(&r, buf);
            }
            if io.success() {
                unlock(r, range, true, None);
            } else {
                log::error!("rebuild of {}: write to the target failed", r.name);
                let target = r.lock().process.as_ref().map(|p| p.target);
                if let Some(t) = target {
                    r.lock().bases[t].is_failed = true;
                }
                unlock(r, range, false, Some(libc::EIO));
            }
        })),
        0,
    );
    if let Err(e) = res {
        log::error!("rebuild of {}: {e}", raid.name);
        unlock(raid, range, false, Some(libc::ENOMEM));
    }
}

/// Lifts the hold on the window (advancing past it when copied) and continues.
fn unlock(raid: Arc<Raid>, range: (u64, u64), advance: bool, error: Option<i32>) {
    let held = {
        let mut st = raid.lock();
        let id = st.process.as_mut().and_then(|p| {
            if advance {
                p.offset = range.1;
            }
            if let Some(e) = error {
                p.request_stop(e);
            }
            p.lock.take()
        });
        id.zip(st.bdev.clone())
    };
    let r = raid.clone();
    match held {
        Some((id, bdev)) => bdev.unlock_lba_range(id, move || later(move || run(r))),
        None => later(move || run(r)),
    }
}

/// Ends the process: on success the target becomes readable everywhere and is recorded in the superblock; on
/// failure it is detached and removed.
fn finish(raid: Arc<Raid>, status: i32) {
    let (target, gen) = {
        let st = raid.lock();
        let Some(p) = st.process.as_ref() else { return };
        (p.target, p.target_gen)
    };
    let ok = status == 0;
    if ok {
        log::info!("Finished rebuild on raid bdev {}", raid.name);
    } else {
        log::warn!(
            "Finished rebuild on raid bdev {}: {}",
            raid.name,
            jsonrpc::strerror(status)
        );
    }
    let r = raid.clone();
    walk(
        &raid,
        move |ch| {
            let mut s = ch.st.borrow_mut();
            if ok {
                s.make_readable(target, gen);
            } else if s.base(target).gen == gen {
                s.detach(target);
            }
        },
        move || {
            let actions = {
                let mut st = r.lock();
                let p = st.process.take();
                let b = &mut st.bases[target];
                if b.gen == gen {
                    b.is_process_target = false;
                    if !ok {
                        b.detached = true;
                    }
                }
                p.map(|p| p.finish_actions).unwrap_or_default()
            };
            for a in actions {
                a();
            }
            if ok {
                let r2 = r.clone();
                raid::enqueue_op(&r, move |op| commit(r2, target, gen, op));
            } else {
                let _ = raid::remove_base_slot(&r, target, None);
            }
        },
    );
}

/// Records a rebuilt member as configured in the superblock.
fn commit(raid: Arc<Raid>, target: usize, gen: u32, op: raid::OpDone) {
    let write = {
        let mut st = raid.lock();
        let (configured, uuid, off) = {
            let b = &st.bases[target];
            (
                b.is_configured && !b.remove_scheduled && b.gen == gen,
                b.uuid,
                b.data_offset,
            )
        };
        match st.sb.as_mut() {
            Some(sb) if configured => {
                for e in &mut sb.base_bdevs {
                    if e.state != BaseState::Configured && e.slot as usize == target {
                        e.state = BaseState::Configured;
                        e.data_offset = off;
                        e.uuid = uuid;
                    }
                }
                true
            }
            _ => false,
        }
    };
    if write {
        let r = raid.clone();
        raid::write_superblock(&raid, move |res| {
            if let Err(e) = res {
                log::error!(
                    "Failed to write raid bdev '{}' superblock after background process finished: {e}",
                    r.name
                );
            }
            drop(op);
        });
    }
}
