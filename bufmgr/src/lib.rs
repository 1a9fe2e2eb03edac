//! farpool-bufmgr: a small but honest database buffer manager that uses the farpool page tier.
//!
//! Owns: a fixed pool of page frames ([`BufferManager`]), CLOCK replacement, pin/unpin, and the data
//! file ([`DataFile`]) read and written with `O_DIRECT` through 4096-aligned buffers ([`AlignedBuf`]),
//! falling back to buffered I/O plus `posix_fadvise(DONTNEED)` (said in the log) where the file system
//! refuses `O_DIRECT`.
//!
//! Invariants:
//! - Every page starts with its LSN (u64, bytes 0..8) and its id (bytes 8..16); an update bumps the LSN.
//!   The manager remembers the newest LSN of every page, and a page read from the far tier or the disk
//!   older than that is never used (the far tier is asked for `min_version = newest LSN`; a disk read
//!   that is older means its write-back is still in flight, and is retried, bounded).
//! - A dirty page is written to the file before its frame is reused; a clean page leaving the frames is
//!   offered to the far tier; a miss asks the far tier before the disk.
//! - A frame is reused only when unpinned; pins are taken under the frame-table lock.
#![forbid(unsafe_code)]

mod aligned;
mod file;
mod manager;

pub use aligned::AlignedBuf;
pub use file::DataFile;
pub use manager::{BufferManager, BufferStats, PinnedPage, Source};

/// Errors of the buffer manager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The data file failed.
    #[error("data file {op} of page {page}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Which page.
        page: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A page id beyond the data file.
    #[error("page {0} is beyond the data file ({1} pages)")]
    OutOfRange(u64, u64),
    /// Every frame is pinned.
    #[error("all {0} frames are pinned")]
    NoFrame(usize),
    /// A page read back is not the page asked for, or older than its last write after retries.
    #[error("page {page}: {what}")]
    Corrupt {
        /// Which page.
        page: u64,
        /// What was wrong.
        what: String,
    },
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Bytes of the page header the manager keeps in every page (LSN, page id).
pub const PAGE_HEADER_LEN: usize = 16;
