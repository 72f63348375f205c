//! A minimal `newc` cpio writer (the initramfs format the kernel unpacks).

use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Writes `newc` entries to a stream; [`finish`](Writer::finish) appends the trailer.
pub struct Writer<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Writer<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        Writer {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn header(&mut self, name: &str, mode: u32, size: u32, rdev: (u32, u32)) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        let mut h = String::from("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.header(name, 0o040000 | perm, 0, (0, 0))
    }

    /// A regular file with `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other(format!("{name}: too large for cpio")))?;
        self.header(name, 0o100000 | perm, size, (0, 0))?;
        self.put(data)?;
        self.pad()
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(name, 0o120777, target.len() as u32, (0, 0))?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    /// A character device node.
    pub fn chardev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(name, 0o020000 | perm, 0, (major, minor))
    }

    /// Adds everything under `root` (recursively, sorted), named relative to it.
    pub fn tree(&mut self, root: &Path) -> io::Result<()> {
        self.walk(root, root)
    }

    fn walk(&mut self, root: &Path, dir: &Path) -> io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .map_err(io::Error::other)?
                .to_string_lossy()
                .into_owned();
            let md = std::fs::symlink_metadata(&path)?;
            let perm = md.permissions().mode() & 0o7777;
            let ft = md.file_type();
            if ft.is_symlink() {
                let t = std::fs::read_link(&path)?;
                self.symlink(&rel, &t.to_string_lossy())?;
            } else if ft.is_dir() {
                self.dir(&rel, perm)?;
                self.walk(root, &path)?;
            } else if ft.is_file() {
                let data = std::fs::read(&path)?;
                debug_assert_eq!(data.len() as u64, md.size());
                self.file(&rel, perm, &data)?;
            }
        }
        Ok(())
    }

    /// Writes the trailer and returns the stream.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        // The kernel reads archives in 512-byte blocks; pad so a following archive starts cleanly.
        let n = (512 - (self.written % 512) as usize) % 512;
        self.put(&vec![0u8; n])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut w = Writer::new(Vec::new());
        w.dir("lab", 0o755).unwrap();
        w.file("lab/a", 0o644, b"hello").unwrap();
        w.symlink("bin", "usr/bin").unwrap();
        let v = w.finish().unwrap();
        assert!(v.starts_with(b"070701"));
        assert_eq!(v.len() % 512, 0);
        let s = String::from_utf8_lossy(&v);
        assert!(s.contains("lab/a\0"));
        assert!(s.contains("hello"));
        assert!(s.contains("TRAILER!!!"));
        // each header starts 4-byte aligned
        for (i, _) in s.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
    }
}
