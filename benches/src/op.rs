//! The operations a perftest-style run measures, and the size lists they run over.

use std::fmt;

use anyhow::{Result, bail};
use clap::ValueEnum;
use serde::Serialize;

/// One-sided operation kind (perftest's `ib_read_*`, `ib_write_*`, `ib_atomic_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchOp {
    /// READ of SIZE bytes (Redis: GET of a SIZE-byte value).
    Read,
    /// WRITE of SIZE bytes (Redis: SET of a SIZE-byte value).
    Write,
    /// 8-byte compare-and-swap (Redis: no equivalent, baseline skipped).
    Cas,
    /// 8-byte fetch-and-add (Redis: INCRBY).
    Faa,
}

impl BenchOp {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Cas => "cas",
            Self::Faa => "faa",
        }
    }

    /// Whether it is an 8-byte atomic (the size list does not apply).
    pub fn is_atomic(self) -> bool {
        matches!(self, Self::Cas | Self::Faa)
    }

    /// Payload bytes one operation of `size` moves (atomics: 8).
    pub fn payload_len(self, size: usize) -> usize {
        if self.is_atomic() { 8 } else { size }
    }
}

impl fmt::Display for BenchOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Largest size one operation may move (the wire protocol's per-op maximum, 1 MiB).
pub const MAX_SIZE: usize = farpool_core::wire::MAX_OP_LEN as usize;

/// clap value parser for one size flag (`256MiB`, `8KiB`, `4096`).
pub fn size_arg(s: &str) -> std::result::Result<u64, String> {
    farpool_core::size::parse_bytes(s).map_err(|e| e.to_string())
}

/// One read of a baseline's reply bytes into `buf` (at least `chunk` bytes of room), as farpool's client
/// reads: straight into the spare capacity, no bounce copy. A zero `timeout` never blocks; otherwise the
/// read waits up to `timeout` (at least 1 ms; `cache` holds the socket's current timeout so that it is set
/// once per change, not once per read). `Ok(None)`: the wait ran out; `Ok(Some(0))`: end of stream.
pub fn read_some(
    stream: &std::net::TcpStream,
    cache: &mut Option<std::time::Duration>,
    timeout: std::time::Duration,
    buf: &mut bytes::BytesMut,
    chunk: usize,
) -> std::io::Result<Option<usize>> {
    use std::os::fd::AsFd;
    if timeout.is_zero() {
        return farpool_core::buf::recv_nowait_into(stream.as_fd(), buf, chunk);
    }
    let t = Some(timeout.max(std::time::Duration::from_millis(1)));
    if *cache != t {
        stream.set_read_timeout(t)?;
        *cache = t;
    }
    match farpool_core::buf::read_fd_into(stream.as_fd(), buf, chunk) {
        Ok(n) => Ok(Some(n)),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parse a comma-separated size list (`8,64,512,4K,8K,64K,1M`): sorted, deduplicated, each 1..=1 MiB.
pub fn parse_sizes(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n = farpool_core::size::parse_bytes(part).map_err(|e| anyhow::anyhow!("{e}"))?;
        let n = usize::try_from(n)?;
        if n == 0 || n > MAX_SIZE {
            bail!("size {part:?} must be between 1 byte and 1MiB (the per-operation maximum)");
        }
        out.push(n);
    }
    if out.is_empty() {
        bail!("empty size list");
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// A size as people write it: `8B`, `4KiB`, `1MiB`, `1536B`.
pub fn size_label(n: usize) -> String {
    farpool_core::size::format_bytes(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_sort_and_bound() {
        assert_eq!(parse_sizes("8,64,512,4K,8K,64K,1M").unwrap(), vec![8, 64, 512, 4096, 8192, 65536, 1 << 20]);
        assert_eq!(parse_sizes("8K, 8, 8k").unwrap(), vec![8, 8192]);
        assert!(parse_sizes("2M").is_err());
        assert!(parse_sizes("0").is_err());
        assert!(parse_sizes(",").is_err());
        assert!(parse_sizes("abc").is_err());
        assert_eq!(size_label(8192), "8KiB");
    }
}
