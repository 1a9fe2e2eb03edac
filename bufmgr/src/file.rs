//! `DataFile`: the pages on disk, read and written whole with positional I/O.
//!
//! Opened with `O_DIRECT` so the kernel page cache cannot hide the device: every miss really reads the
//! disk. Where the file system refuses `O_DIRECT` (`EINVAL` at open or on the first aligned read, e.g.
//! older tmpfs), the file is reopened buffered and every read and write is followed by
//! `posix_fadvise(DONTNEED)` on its range, and a warning says so; [`DataFile::is_direct`] tells which.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};

use crate::aligned::{ALIGN, AlignedBuf};
use crate::{Error, PAGE_HEADER_LEN, Result};

/// See the module docs.
#[derive(Debug)]
pub struct DataFile {
    file: File,
    direct: bool,
    page_size: usize,
    pages: u64,
}

fn open(path: &Path, direct: bool, create: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(create);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

impl DataFile {
    /// Create (or overwrite) a file of `pages` pages, each initialised with LSN 0 and its page id.
    pub fn create(path: &Path, pages: u64, page_size: usize) -> Result<Self> {
        if page_size == 0 || !page_size.is_multiple_of(ALIGN) {
            return Err(Error::Config(format!("page size {page_size} is not a multiple of {ALIGN}")));
        }
        let f = open(path, false, true).map_err(|e| Error::Io { op: "create", page: 0, source: e })?;
        f.set_len(0).and_then(|_| f.set_len(pages * page_size as u64)).map_err(|e| Error::Io {
            op: "size",
            page: 0,
            source: e,
        })?;
        drop(f);
        let df = Self::open(path, page_size)?;
        let per_chunk = (1 << 20) / page_size;
        let mut chunk = AlignedBuf::new(per_chunk * page_size);
        let mut p = 0;
        while p < pages {
            let n = per_chunk.min((pages - p) as usize);
            for i in 0..n {
                let page = &mut chunk.as_mut_slice()[i * page_size..(i + 1) * page_size];
                page[..8].copy_from_slice(&0u64.to_le_bytes());
                page[8..PAGE_HEADER_LEN].copy_from_slice(&(p + i as u64).to_le_bytes());
            }
            let off = p * page_size as u64;
            df.file.write_all_at(&chunk.as_slice()[..n * page_size], off).map_err(|e| Error::Io {
                op: "initialise",
                page: p,
                source: e,
            })?;
            df.drop_cache(off, n * page_size);
            p += n as u64;
        }
        Ok(df)
    }

    /// Open an existing data file of pages of `page_size` bytes.
    pub fn open(path: &Path, page_size: usize) -> Result<Self> {
        let io = |e| Error::Io { op: "open", page: 0, source: e };
        let len = std::fs::metadata(path).map_err(io)?.len();
        let pages = len / page_size as u64;
        let direct = match open(path, true, false) {
            Ok(f) => {
                let mut probe = AlignedBuf::new(page_size);
                match f.read_at(probe.as_mut_slice(), 0) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
                    _ => Some(f),
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
            Err(e) => return Err(io(e)),
        };
        let (file, direct) = match direct {
            Some(f) => (f, true),
            None => {
                tracing::warn!(path = %path.display(), "O_DIRECT refused by the file system: buffered I/O with posix_fadvise(DONTNEED) after every access");
                (open(path, false, false).map_err(io)?, false)
            }
        };
        Ok(Self { file, direct, page_size, pages })
    }

    /// Whether the file is open with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Pages in the file.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Page size.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    fn check(&self, page: u64, buf: &[u8]) -> Result<u64> {
        if page >= self.pages {
            return Err(Error::OutOfRange(page, self.pages));
        }
        assert_eq!(buf.len(), self.page_size, "a page buffer must be one page");
        assert_eq!(buf.as_ptr() as usize % ALIGN, 0, "page buffers must be {ALIGN}-aligned for O_DIRECT");
        Ok(page * self.page_size as u64)
    }

    fn drop_cache(&self, off: u64, len: usize) {
        if !self.direct {
            let _ = posix_fadvise(&self.file, off as i64, len as i64, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
        }
    }

    /// Read page `page` into `buf` (one page, 4096-aligned).
    pub fn read_page(&self, page: u64, buf: &mut [u8]) -> Result<()> {
        let off = self.check(page, buf)?;
        self.file.read_exact_at(buf, off).map_err(|e| Error::Io { op: "read", page, source: e })?;
        self.drop_cache(off, buf.len());
        Ok(())
    }

    /// Write page `page` from `buf` (one page, 4096-aligned).
    pub fn write_page(&self, page: u64, buf: &[u8]) -> Result<()> {
        let off = self.check(page, buf)?;
        self.file.write_all_at(buf, off).map_err(|e| Error::Io { op: "write", page, source: e })?;
        self.drop_cache(off, buf.len());
        Ok(())
    }
}
