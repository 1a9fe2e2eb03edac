//! A mapped memory region with bounds-checked access.
//!
//! # Concurrency
//! A region is shared memory: many server threads (and, for memfd/dax, other processes) read and write
//! it at once, exactly like a MAP_SHARED file. Byte copies therefore use raw `copy_nonoverlapping` on
//! memory no Rust reference ever covers, and 8-byte atomics use `AtomicU64` views of aligned words.
//! Concurrent plain writes to the same bytes give unspecified bytes (as on real remote memory), never UB
//! in our code: no `&`/`&mut` to region memory is ever created.

use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use farpool_core::{Error, ErrorKind, Result};

/// A mapping of `len` bytes. Unmapped on drop.
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    /// The file behind the mapping (memfd, dax), if any.
    fd: Option<OwnedFd>,
    /// What backs it, for logs.
    desc: String,
}

// SAFETY: the region is a plain mapping; all access is through raw pointers with bounds checks, and
// concurrent access is the documented shared-memory model (module docs). No thread-local state.
unsafe impl Send for Region {}
// SAFETY: as above: `&Region` only allows checked raw copies and atomics on the mapping.
unsafe impl Sync for Region {}

// SAFETY: a `Region` owns its mapping (the contract of `Region::from_raw`) and unmaps it only in
// `Drop`; moving the struct does not move the mapping, `as_ptr`/`len` never change, and `Region` hands
// out no references to its bytes (its accessors copy through raw pointers or use atomics), so a device
// writing into it concurrently is sound. This is what the memory server registers with the RDMA NIC.
unsafe impl farpool_core::PinnedMemory for Region {
    fn as_raw(&self) -> (NonNull<u8>, usize) {
        (self.ptr, self.len)
    }
}

impl Region {
    /// Take ownership of a mapping.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be a live mapping created by `mmap` that nothing else unmaps, readable and
    /// writable, and `len > 0`. The region unmaps it on drop.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize, fd: Option<OwnedFd>, desc: String) -> Self {
        assert!(len > 0);
        Self { ptr, len, fd, desc }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never: regions have `len > 0`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What backs the region (for logs).
    pub fn description(&self) -> &str {
        &self.desc
    }

    /// The file descriptor behind the mapping, if any (memfd, dax).
    pub fn fd(&self) -> Option<&OwnedFd> {
        self.fd.as_ref()
    }

    /// Start of the mapping, for registering it with a device (RDMA). Dereferencing it is the caller's
    /// responsibility; prefer the checked accessors.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Check that `offset..offset+len` lies in the region.
    pub fn check(&self, offset: u64, len: usize) -> Result<usize> {
        let o = usize::try_from(offset).ok();
        match o.and_then(|o| o.checked_add(len)) {
            Some(end) if end <= self.len => Ok(end - len),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!("range {offset}+{len} is outside the region of {} bytes", self.len),
            )),
        }
    }

    fn atomic(&self, offset: u64) -> Result<&AtomicU64> {
        if !offset.is_multiple_of(8) {
            return Err(Error::new(ErrorKind::Unaligned, format!("atomic at offset {offset} is not 8-byte aligned")));
        }
        let o = self.check(offset, 8)?;
        // SAFETY: in bounds (checked), 8-aligned (mapping is page-aligned and offset % 8 == 0), and the
        // mapping lives as long as `&self`. AtomicU64 has the layout of u64 and all bit patterns are valid.
        Ok(unsafe { &*(self.ptr.as_ptr().add(o) as *const AtomicU64) })
    }

    /// Copy `dst.len()` bytes at `offset` into `dst`.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let o = self.check(offset, dst.len())?;
        // SAFETY: source range checked in bounds of the live mapping; `dst` is a distinct Rust buffer,
        // so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(o), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copy `dst.len()` bytes at `offset` into possibly uninitialized memory (a socket buffer's spare
    /// capacity): every byte of `dst` is written on `Ok`.
    pub fn read_uninit(&self, offset: u64, dst: &mut bytes::buf::UninitSlice) -> Result<()> {
        let o = self.check(offset, dst.len())?;
        // SAFETY: source range checked in bounds of the live mapping; `dst` is a buffer outside the
        // mapping, valid for `dst.len()` writes; copy_nonoverlapping never reads the destination.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(o), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copy `src` to `offset`.
    pub fn write_at(&self, offset: u64, src: &[u8]) -> Result<()> {
        let o = self.check(offset, src.len())?;
        // SAFETY: destination range checked in bounds of the live, writable mapping; `src` is a Rust
        // buffer outside the mapping's reference-free memory, so no overlap and no aliasing reference.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(o), src.len()) };
        Ok(())
    }

    /// Fill `offset..offset+len` with zeros.
    pub fn zero(&self, offset: u64, len: usize) -> Result<()> {
        let o = self.check(offset, len)?;
        // SAFETY: range checked in bounds of the live, writable mapping.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(o), 0, len) };
        Ok(())
    }

    /// 8-byte compare-and-swap at an aligned offset; returns the previous value.
    pub fn compare_swap_u64(&self, offset: u64, expect: u64, new: u64) -> Result<u64> {
        let a = self.atomic(offset)?;
        Ok(match a.compare_exchange(expect, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(v) | Err(v) => v,
        })
    }

    /// 8-byte fetch-and-add (wrapping) at an aligned offset; returns the previous value.
    pub fn fetch_add_u64(&self, offset: u64, add: u64) -> Result<u64> {
        Ok(self.atomic(offset)?.fetch_add(add, Ordering::AcqRel))
    }

    /// 8-byte atomic load at an aligned offset.
    pub fn load_u64(&self, offset: u64) -> Result<u64> {
        Ok(self.atomic(offset)?.load(Ordering::Acquire))
    }

    /// Give the pages of `offset..offset+len` back to the OS so they read as zeros afterwards:
    /// `fallocate(PUNCH_HOLE)` for file-backed regions, `madvise(MADV_DONTNEED)` for private anonymous
    /// ones, explicit zeroing where neither applies (dax). `offset` and `len` must be page-aligned.
    pub fn discard(&self, offset: u64, len: usize) -> Result<()> {
        let o = self.check(offset, len)?;
        let page = crate::backing::page_size();
        assert!(o.is_multiple_of(page) && len.is_multiple_of(page), "discard of {o}+{len} is not page-aligned");
        if let Some(fd) = &self.fd {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: plain syscall on an fd we own; no memory is passed.
            let rc = unsafe { libc::fallocate(fd.as_raw_fd(), mode, o as libc::off_t, len as libc::off_t) };
            if rc == 0 {
                return Ok(());
            }
            // devdax and some filesystems do not punch holes: zero explicitly.
            return self.zero(offset, len);
        }
        // SAFETY: range in bounds of our private anonymous mapping; after DONTNEED it reads as zeros.
        let rc = unsafe { libc::madvise(self.ptr.as_ptr().add(o).cast(), len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return self.zero(offset, len);
        }
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: we own the mapping (from_raw contract) and nothing can use it after drop.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::Backing;

    #[test]
    fn bounds_alignment_and_atomics() {
        for b in [Backing::Anon, Backing::Memfd] {
            let r = b.map(1 << 20, "t").unwrap();
            r.write_at(10, b"hello").unwrap();
            let mut buf = [0u8; 5];
            r.read_at(10, &mut buf).unwrap();
            assert_eq!(&buf, b"hello");
            assert_eq!(r.read_at((1 << 20) - 2, &mut buf).unwrap_err().kind(), ErrorKind::OutOfRange);
            assert_eq!(r.write_at(u64::MAX, b"x").unwrap_err().kind(), ErrorKind::OutOfRange);
            assert_eq!(r.fetch_add_u64(4, 1).unwrap_err().kind(), ErrorKind::Unaligned);
            assert_eq!(r.fetch_add_u64(64, 5).unwrap(), 0);
            assert_eq!(r.compare_swap_u64(64, 5, 9).unwrap(), 5);
            assert_eq!(r.compare_swap_u64(64, 5, 11).unwrap(), 9);
            assert_eq!(r.load_u64(64).unwrap(), 9);
            r.discard(0, 1 << 20).unwrap();
            r.read_at(10, &mut buf).unwrap();
            assert_eq!(buf, [0; 5], "{b:?}: discarded pages must read as zeros");
        }
    }
}
