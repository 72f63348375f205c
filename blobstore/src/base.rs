//! The base bdev as the metadata path sees it: byte-addressed async reads, writes, write-zeroes and unmaps
//! through the metadata thread's channel, each a future (see [`crate::exec`]). Buffers are [`DmaBuf`]s moved
//! into the I/O and handed back. Control path: every call allocates a little (a completion closure).

use bdev::{Completion, IoChannel, IoHandle, IoStatus, IoType};
use reactor::dma::DmaBuf;

use crate::error::{Error, ErrorKind, Result};
use crate::exec::oneshot;

/// Largest write-zeroes or unmap sent as one I/O, and the chunk of a write-zeroes emulated with writes.
const MAX_NODATA: u64 = 64 << 20;
const ZERO_CHUNK: usize = 1 << 20;

/// The metadata thread's handle on the base bdev.
#[derive(Clone)]
pub struct Base {
    ch: IoChannel,
    block_size: u64,
    write_zeroes: bool,
    unmap: bool,
}

fn status_err(st: IoStatus, what: impl std::fmt::Display) -> Error {
    let errno = match st {
        IoStatus::Failed(e) => e,
        IoStatus::Aborted => libc::ECANCELED,
        IoStatus::Miscompare => libc::EILSEQ,
        _ => libc::EIO,
    };
    Error::errno_io(errno, what)
}

impl Base {
    /// Wraps this thread's channel to the base.
    pub fn new(ch: IoChannel) -> Base {
        let b = ch.bdev();
        Base {
            block_size: b.block_size() as u64,
            write_zeroes: b.io_type_supported(IoType::WriteZeroes),
            unmap: b.io_type_supported(IoType::Unmap),
            ch,
        }
    }

    /// The channel (for I/O the metadata path does not wait on).
    pub fn channel(&self) -> &IoChannel {
        &self.ch
    }

    /// Block size of the base.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Size of the base in bytes.
    pub fn size(&self) -> u64 {
        self.ch.bdev().num_blocks() * self.block_size
    }

    fn blocks(&self, off: u64, len: u64, what: &str) -> Result<(u64, u64)> {
        if !off.is_multiple_of(self.block_size) || !len.is_multiple_of(self.block_size) {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "{what} of {len} bytes at {off} is not in whole blocks of {}",
                    self.block_size
                ),
            ));
        }
        Ok((off / self.block_size, len / self.block_size))
    }

    /// Submits one I/O built by `submit` and waits for it; the buffer comes back with the status.
    async fn run(
        &self,
        what: String,
        submit: impl FnOnce(&IoChannel, Completion) -> bdev::Result<()>,
    ) -> Result<Option<DmaBuf>> {
        // Make sure a descriptor is free first, so that the submission cannot fail for want of one (and take
        // the buffer down with it): a descriptor taken and given back is the one the submission gets.
        while bdev::alloc_io().is_none() {
            let (tx, rx) = oneshot::<()>();
            bdev::queue_io_wait(move || tx.send(()));
            rx.await;
        }
        let (tx, rx) = oneshot::<(IoStatus, Option<DmaBuf>)>();
        let cb = Completion::Closure(Box::new(move |mut io: IoHandle| {
            let st = io.status();
            tx.send((st, io.take_buf()));
        }));
        submit(&self.ch, cb)
            .map_err(|e| Error::new(ErrorKind::Io(libc::EIO), format!("{what}: {e}")))?;
        match rx.await {
            Some((IoStatus::Success, buf)) => Ok(buf),
            Some((st, _)) => Err(status_err(st, what)),
            None => Err(Error::errno_io(libc::EIO, format!("{what}: no completion"))),
        }
    }

    /// Reads `len` bytes at byte `off`.
    pub async fn read(&self, off: u64, len: usize) -> Result<DmaBuf> {
        let (ob, nb) = self.blocks(off, len as u64, "read")?;
        let buf = DmaBuf::alloc(len).map_err(|e| Error::io(e, "read buffer"))?;
        let what = format!("read of {len} bytes at {off}");
        let got = self
            .run(what.clone(), |ch, cb| ch.read(buf, ob, nb, cb, 0))
            .await?;
        got.ok_or_else(|| Error::errno_io(libc::EIO, format!("{what}: buffer not returned")))
    }

    /// Writes `buf` at byte `off`.
    pub async fn write(&self, off: u64, buf: DmaBuf) -> Result<()> {
        let (ob, nb) = self.blocks(off, buf.len() as u64, "write")?;
        let what = format!("write of {} bytes at {off}", buf.len());
        self.run(what, |ch, cb| ch.write(buf, ob, nb, cb, 0))
            .await
            .map(|_| ())
    }

    /// Makes `len` bytes at `off` read as zeroes: write-zeroes where the base has it, else zero writes.
    pub async fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.blocks(off, len, "write zeroes")?;
        let mut at = off;
        let end = off + len;
        while at < end {
            let n = if self.write_zeroes {
                (end - at).min(MAX_NODATA)
            } else {
                (end - at).min(ZERO_CHUNK as u64)
            };
            if self.write_zeroes {
                let (ob, nb) = (at / self.block_size, n / self.block_size);
                self.run(format!("write zeroes of {n} bytes at {at}"), |ch, cb| {
                    ch.submit_nodata(IoType::WriteZeroes, ob, nb, cb, 0)
                })
                .await?;
            } else {
                let z = DmaBuf::alloc(n as usize).map_err(|e| Error::io(e, "zero buffer"))?;
                self.write(at, z).await?;
            }
            at += n;
        }
        Ok(())
    }

    /// Unmaps `len` bytes at `off`; nothing when the base cannot (an unmap is advisory).
    pub async fn unmap(&self, off: u64, len: u64) -> Result<()> {
        self.blocks(off, len, "unmap")?;
        if !self.unmap {
            return Ok(());
        }
        let mut at = off;
        let end = off + len;
        while at < end {
            let n = (end - at).min(MAX_NODATA);
            let (ob, nb) = (at / self.block_size, n / self.block_size);
            self.run(format!("unmap of {n} bytes at {at}"), |ch, cb| {
                ch.submit_nodata(IoType::Unmap, ob, nb, cb, 0)
            })
            .await?;
            at += n;
        }
        Ok(())
    }
}
