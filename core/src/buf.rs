//! Reading into and filling the spare capacity of a `BytesMut` without zeroing it first.
//!
//! The only module of farpool-core with `unsafe`: two places on the data path where zero-filling a
//! buffer that is about to be overwritten cost a full extra pass over every page (found by profiling
//! `farbench tcp`). Both hand the spare capacity to something that only writes it (the kernel's
//! `read(2)`, or a raw `copy_nonoverlapping` behind [`bytes::buf::UninitSlice`]) and advance the length
//! by exactly what was written.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use bytes::BufMut;
use bytes::BytesMut;
use bytes::buf::UninitSlice;

/// `read(2)` from `fd` into the spare capacity of `buf` (at least `want` bytes are reserved first);
/// returns the number of bytes read (0 at end of stream). Retries on `EINTR`.
pub fn read_fd_into(fd: BorrowedFd<'_>, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
    fill_spare(fd, buf, want, false)
}

/// `recv(2)` with `MSG_DONTWAIT` from socket `fd` into the spare capacity of `buf` (at least `want` bytes
/// reserved first): never blocks. Returns `Ok(None)` when nothing is available, `Ok(Some(0))` at end of
/// stream. Retries on `EINTR`.
pub fn recv_nowait_into(fd: BorrowedFd<'_>, buf: &mut BytesMut, want: usize) -> io::Result<Option<usize>> {
    match fill_spare(fd, buf, want, true) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// The body of both: `read(2)`, or `recv(2)` with `MSG_DONTWAIT` when `nowait`, into the spare capacity.
fn fill_spare(fd: BorrowedFd<'_>, buf: &mut BytesMut, want: usize, nowait: bool) -> io::Result<usize> {
    buf.reserve(want);
    let spare = buf.chunk_mut();
    let len = spare.len();
    let ptr = spare.as_mut_ptr();
    loop {
        // SAFETY: `ptr..ptr+len` is the spare capacity of `buf`, valid for writes and not aliased by
        // any reference; the kernel only writes to it. `fd` is a live borrowed descriptor.
        let n = unsafe {
            if nowait {
                libc::recv(fd.as_raw_fd(), ptr.cast(), len, libc::MSG_DONTWAIT)
            } else {
                libc::read(fd.as_raw_fd(), ptr.cast(), len)
            }
        };
        if n >= 0 {
            let n = n as usize;
            assert!(n <= len);
            // SAFETY: the kernel initialized exactly `n` bytes of the spare capacity.
            unsafe { buf.advance_mut(n) };
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Append `len` bytes to `out`, written in place by `fill`, which must write every byte of the slice
/// it is given when it returns `Ok` (on `Err` nothing is appended).
pub fn put_filled<E>(
    out: &mut BytesMut,
    len: usize,
    fill: impl FnOnce(&mut UninitSlice) -> Result<(), E>,
) -> Result<(), E> {
    out.reserve(len);
    let spare = &mut out.chunk_mut()[..len];
    fill(spare)?;
    // SAFETY: `fill` wrote all `len` bytes of the spare capacity (its contract); on error we return
    // before advancing, so uninitialized bytes never become part of `out`.
    unsafe { out.advance_mut(len) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn reads_into_spare_capacity_and_fills_in_place() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.write_all(b"hello").unwrap();
        let mut buf = BytesMut::from(&b"x"[..]);
        assert_eq!(read_fd_into(b.as_fd(), &mut buf, 16).unwrap(), 5);
        assert_eq!(&buf[..], b"xhello");
        put_filled::<()>(&mut buf, 3, |d| {
            d.copy_from_slice(b"abc");
            Ok(())
        })
        .unwrap();
        assert!(put_filled(&mut buf, 3, |_| Err(())).is_err());
        assert_eq!(&buf[..], b"xhelloabc");
        assert_eq!(recv_nowait_into(b.as_fd(), &mut buf, 16).unwrap(), None, "nothing sent: would block");
        a.write_all(b"z").unwrap();
        assert_eq!(recv_nowait_into(b.as_fd(), &mut buf, 16).unwrap(), Some(1));
        assert_eq!(&buf[..], b"xhelloabcz");
        drop(a);
        assert_eq!(recv_nowait_into(b.as_fd(), &mut buf, 16).unwrap(), Some(0));
        assert_eq!(read_fd_into(b.as_fd(), &mut buf, 16).unwrap(), 0);
    }
}
