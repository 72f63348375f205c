//! Where a store's bytes come from: anything that reads at an offset. The loader only reads; a short read is an
//! error, never zero fill, so a truncated image shows up as such.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// A readable device.
pub trait ReadAt {
    /// Fills `buf` from byte `offset`; fails when the range is not all on the device.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Size of the device in bytes.
    fn size(&self) -> u64;
}

fn out_of_range(offset: u64, len: usize, size: u64) -> Error {
    Error::new(
        ErrorKind::Io(libc::EIO),
        format!("read of {len} bytes at {offset} is past the end of the device ({size} bytes)"),
    )
}

/// A file or block device, read with `pread`.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    size: u64,
}

impl FileDevice {
    /// Opens `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<FileDevice> {
        let path = path.as_ref();
        let file =
            File::open(path).map_err(|e| Error::io(e, format!("open {}", path.display())))?;
        FileDevice::new(file).map_err(|e| e.context(path.display()))
    }

    /// Wraps an open file; its size is where a seek to the end lands (which also works for block devices).
    pub fn new(file: File) -> Result<FileDevice> {
        use std::io::{Seek, SeekFrom};
        let mut f = &file;
        let size = f.seek(SeekFrom::End(0)).map_err(|e| Error::io(e, "size"))?;
        Ok(FileDevice { file, size })
    }
}

impl ReadAt for FileDevice {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(out_of_range(offset, buf.len(), self.size));
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(e, format!("read of {} bytes at {offset}", buf.len())))
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// A device held in memory (tests, images built by hand).
#[derive(Clone, Debug, Default)]
pub struct MemDevice(pub Vec<u8>);

impl ReadAt for MemDevice {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.as_slice().read_at(offset, buf)
    }

    fn size(&self) -> u64 {
        self.0.len() as u64
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.len() as u64;
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= size => {
                buf.copy_from_slice(&self[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(out_of_range(offset, buf.len(), size)),
        }
    }

    fn size(&self) -> u64 {
        self.len() as u64
    }
}
