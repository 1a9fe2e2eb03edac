//! Backings: where a region's memory comes from.
//!
//! - `anon`: private anonymous memory; hugetlb (`MAP_HUGETLB`) when the machine has enough huge pages
//!   reserved (`/proc/sys/vm/nr_hugepages`), else transparent huge pages requested with
//!   `madvise(MADV_HUGEPAGE)`. The log says which.
//! - `memfd`: an anonymous file (`memfd_create`), shareable with same-host clients by passing the fd;
//!   `MFD_HUGETLB` when huge pages are available, else THP via madvise.
//! - `numa:N`: a memfd bound to NUMA node N with `mbind(MPOL_BIND)`, populated and its placement
//!   verified ([`crate::numa`]).
//! - `dax:/dev/daxX.Y`: a device-dax mapped with its 2 MiB alignment ([`crate::dax`]).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use farpool_core::{Error, ErrorKind, Result};

use crate::region::Region;

/// Size of a base page, from `sysconf(_SC_PAGESIZE)` (4 KiB on x86-64).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

/// Size of a huge page on x86-64 with the default hugetlb size: 2 MiB (`Hugepagesize` in /proc/meminfo).
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Which kind of huge pages a mapping got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePages {
    /// Reserved hugetlb pages (`MAP_HUGETLB` / `MFD_HUGETLB`).
    Hugetlb,
    /// Transparent huge pages requested with `madvise(MADV_HUGEPAGE)` (best effort).
    Thp,
    /// Base pages only.
    None,
}

/// Free hugetlb pages reported by /proc/meminfo (`HugePages_Free`).
pub fn free_huge_pages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("HugePages_Free:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Where pool memory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backing {
    /// Private anonymous memory.
    Anon,
    /// An anonymous shareable file.
    Memfd,
    /// A memfd bound to a NUMA node (CXL memory as a CPU-less node, or a remote socket).
    Numa(u32),
    /// A device-dax character device (`/dev/daxX.Y`).
    Dax(std::path::PathBuf),
}

impl std::str::FromStr for Backing {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "anon" => Ok(Self::Anon),
            "memfd" => Ok(Self::Memfd),
            other => {
                if let Some(n) = other.strip_prefix("numa:") {
                    let node = n.parse().map_err(|_| {
                        Error::new(
                            ErrorKind::Config,
                            format!("bad NUMA node {n:?} in backing {other:?}: expected numa:N"),
                        )
                    })?;
                    return Ok(Self::Numa(node));
                }
                match other.strip_prefix("dax:") {
                    Some(p) if p.starts_with('/') => Ok(Self::Dax(p.into())),
                    _ => Err(Error::new(
                        ErrorKind::Config,
                        format!("unknown backing {other:?}: expected anon, memfd, numa:N or dax:/dev/daxX.Y"),
                    )),
                }
            }
        }
    }
}

impl std::fmt::Display for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anon => f.write_str("anon"),
            Self::Memfd => f.write_str("memfd"),
            Self::Numa(n) => write!(f, "numa:{n}"),
            Self::Dax(p) => write!(f, "dax:{}", p.display()),
        }
    }
}

impl Backing {
    /// Map `len` bytes (rounded up to the page size). `name` labels a memfd (visible in /proc/PID/fd).
    pub fn map(&self, len: usize, name: &str) -> Result<Region> {
        if len == 0 {
            return Err(Error::new(ErrorKind::Config, "cannot map an empty region"));
        }
        match self {
            Self::Numa(node) => return crate::numa::map_pool(*node, len, name).map(|(r, _)| r),
            Self::Dax(path) => {
                let r = crate::dax::map(path, len)?;
                tracing::info!(backing = %self, len = r.len(), "mapped {}", r.description());
                return Ok(r);
            }
            Self::Anon | Self::Memfd => {}
        }
        let want_huge = len.is_multiple_of(HUGE_PAGE_SIZE) && free_huge_pages() * HUGE_PAGE_SIZE as u64 >= len as u64;
        let (region, huge) = match self {
            Self::Anon => map_anon(len, want_huge)?,
            Self::Memfd => map_memfd(len, name, want_huge)?,
            Self::Numa(_) | Self::Dax(_) => unreachable!("handled above"),
        };
        tracing::info!(backing = %self, len, huge_pages = ?huge, "mapped {}", region.description());
        Ok(region)
    }
}

fn os_err(what: &str) -> Error {
    let e = std::io::Error::last_os_error();
    let kind = if e.raw_os_error() == Some(libc::ENOMEM) { ErrorKind::NoSpace } else { ErrorKind::Io };
    Error::new(kind, what.to_owned()).with_source(e)
}

/// mmap with the given flags and fd, returning the pointer.
fn mmap(len: usize, flags: libc::c_int, fd: libc::c_int) -> Option<NonNull<u8>> {
    // SAFETY: a fresh mapping at a kernel-chosen address; no existing memory is affected.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
    if p == libc::MAP_FAILED { None } else { NonNull::new(p.cast()) }
}

fn advise_thp(p: NonNull<u8>, len: usize) -> HugePages {
    // SAFETY: advice on a mapping we just created; it does not change memory contents.
    let rc = unsafe { libc::madvise(p.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
    if rc == 0 { HugePages::Thp } else { HugePages::None }
}

fn round_up(len: usize, to: usize) -> usize {
    len.div_ceil(to) * to
}

fn map_anon(len: usize, want_huge: bool) -> Result<(Region, HugePages)> {
    let len = round_up(len, page_size());
    let base = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if want_huge {
        if let Some(p) = mmap(len, base | libc::MAP_HUGETLB, -1) {
            // SAFETY: fresh mapping of `len` bytes, owned by the region from here on.
            let r = unsafe { Region::from_raw(p, len, None, format!("anon hugetlb {len} bytes")) };
            return Ok((r, HugePages::Hugetlb));
        }
        tracing::info!("hugetlb mapping failed, falling back to THP");
    }
    let p = mmap(len, base, -1).ok_or_else(|| os_err("mmap of the anonymous pool failed"))?;
    let huge = advise_thp(p, len);
    // SAFETY: fresh mapping of `len` bytes, owned by the region from here on.
    Ok((unsafe { Region::from_raw(p, len, None, format!("anon {len} bytes ({huge:?})")) }, huge))
}

/// Create a memfd of `len` bytes.
pub fn memfd(name: &str, len: usize, hugetlb: bool) -> Result<OwnedFd> {
    let cname = CString::new(name).map_err(|_| Error::new(ErrorKind::Config, "memfd name has a NUL byte"))?;
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if hugetlb {
        flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB;
    }
    // SAFETY: valid NUL-terminated name; the returned fd is new and owned by us.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(os_err("memfd_create failed"));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall on our fd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(os_err("ftruncate of memfd failed"));
    }
    Ok(fd)
}

fn map_memfd(len: usize, name: &str, want_huge: bool) -> Result<(Region, HugePages)> {
    if want_huge {
        let len = round_up(len, HUGE_PAGE_SIZE);
        if let Ok(fd) = memfd(name, len, true)
            && let Some(p) = mmap(len, libc::MAP_SHARED, fd.as_raw_fd())
        {
            let desc = format!("memfd {name:?} hugetlb {len} bytes");
            // SAFETY: fresh shared mapping of `len` bytes of our memfd, owned by the region.
            return Ok((unsafe { Region::from_raw(p, len, Some(fd), desc) }, HugePages::Hugetlb));
        }
        tracing::info!("hugetlb memfd failed, falling back to THP");
    }
    let len = round_up(len, page_size());
    let fd = memfd(name, len, false)?;
    let p = mmap(len, libc::MAP_SHARED, fd.as_raw_fd()).ok_or_else(|| os_err("mmap of memfd failed"))?;
    let huge = advise_thp(p, len);
    let desc = format!("memfd {name:?} {len} bytes ({huge:?})");
    // SAFETY: fresh shared mapping of `len` bytes of our memfd, owned by the region.
    Ok((unsafe { Region::from_raw(p, len, Some(fd), desc) }, huge))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_every_backing() {
        for s in ["anon", "memfd", "numa:1", "dax:/dev/dax0.0"] {
            assert_eq!(s.parse::<Backing>().unwrap().to_string(), s);
        }
        assert_eq!("numa:3".parse::<Backing>().unwrap(), Backing::Numa(3));
        for bad in ["numa:", "numa:x", "numa:-1", "dax:", "dax:dax0.0", "pmem"] {
            assert_eq!(bad.parse::<Backing>().unwrap_err().kind(), ErrorKind::Config, "{bad}");
        }
        assert_eq!(Backing::Numa(4000).map(1 << 20, "x").unwrap_err().kind(), ErrorKind::Config);
        assert_eq!(Backing::Dax("/dev/dax7.7".into()).map(1 << 20, "x").unwrap_err().kind(), ErrorKind::Config);
    }
}
