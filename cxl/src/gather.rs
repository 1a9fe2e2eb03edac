//! Vectored socket writes that take bytes straight from pool memory.
//!
//! A TCP READ reply is a small head plus the data. Copying the data from the pool into an output buffer
//! and then into the socket passes over every byte twice; `writev(2)` with an iovec that points into the
//! [`Region`] lets the kernel copy it once, straight into the socket buffer (the memory server's READ
//! path, see `farpool-memserver`'s `conn` module).
//!
//! Owns: [`Span`] (a bounds-checked range of a region, borrowed for as long as the caller can vouch that
//! the range stays granted) and [`write_pieces`]. Invariants: a `Span` is checked against the region's
//! length when it is made; no Rust reference to pool memory is ever formed (the kernel reads it through a
//! raw iovec, as a NIC would by DMA); the kernel has copied every byte it reports written before
//! `writev` returns, so nothing refers to pool memory afterwards.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use bytes::BytesMut;
use farpool_core::Result;

use crate::region::Region;

/// Pieces per [`write_pieces`] call at most (Linux's `IOV_MAX` is 1024).
pub const MAX_PIECES: usize = 1024;

/// `len` bytes at `start` of a region, checked in bounds.
#[derive(Clone, Copy, Debug)]
pub struct Span<'a> {
    region: &'a Region,
    start: usize,
    len: usize,
}

impl Region {
    /// The range `offset..offset+len` as a [`Span`] for [`write_pieces`]; `OutOfRange` if it is not
    /// inside the region.
    pub fn span(&self, offset: u64, len: usize) -> Result<Span<'_>> {
        let start = self.check(offset, len)?;
        Ok(Span { region: self, start, len })
    }
}

impl Span<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the span is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The span without its first `n` bytes (`n` is clamped to the length).
    #[must_use]
    pub fn skip(&self, n: usize) -> Self {
        let n = n.min(self.len);
        Self { region: self.region, start: self.start + n, len: self.len - n }
    }

    /// Append a copy of the span's bytes to `out`.
    pub fn copy_into(&self, out: &mut BytesMut) {
        farpool_core::buf::put_filled(out, self.len, |dst| self.region.read_uninit(self.start as u64, dst))
            .expect("a span is in bounds by construction");
    }
}

/// One piece of a vectored write.
#[derive(Clone, Copy, Debug)]
pub enum Piece<'a> {
    /// Bytes of the caller.
    Bytes(&'a [u8]),
    /// Bytes of pool memory.
    Pool(Span<'a>),
}

impl Piece<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Piece::Bytes(b) => b.len(),
            Piece::Pool(s) => s.len,
        }
    }

    /// Whether the piece is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One `writev(2)` of `pieces` (at most [`MAX_PIECES`]) to `fd`; returns the bytes written, which may
/// be fewer than asked (a non-blocking socket with little room). `EINTR` is retried.
pub fn write_pieces(fd: BorrowedFd<'_>, pieces: &[Piece<'_>]) -> io::Result<usize> {
    if pieces.len() > MAX_PIECES {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} pieces > {MAX_PIECES}", pieces.len())));
    }
    let iov: Vec<libc::iovec> = pieces.iter().map(iovec_of).collect();
    loop {
        // SAFETY: every iovec describes memory valid for reads for the whole call: caller slices borrowed
        // for `'_`, or checked ranges of mappings borrowed for `'_`. The kernel only reads them, and
        // `iov.len()` is at most MAX_PIECES (fits c_int).
        let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn iovec_of(p: &Piece<'_>) -> libc::iovec {
    match p {
        Piece::Bytes(b) => libc::iovec { iov_base: b.as_ptr().cast_mut().cast(), iov_len: b.len() },
        Piece::Pool(s) => {
            // SAFETY: `start + len <= region.len()` was checked when the span was made, so the pointer
            // stays inside (or one past the end of) the live mapping that `s.region` borrows.
            let base = unsafe { s.region.as_ptr().add(s.start) };
            libc::iovec { iov_base: base.cast(), iov_len: s.len }
        }
    }
}

/// Append to `out` every byte of `pieces` after the first `written` (what a short write left over).
pub fn copy_rest(pieces: &[Piece<'_>], mut written: usize, out: &mut BytesMut) {
    for p in pieces {
        let skip = written.min(p.len());
        written -= skip;
        match p {
            Piece::Bytes(b) => out.extend_from_slice(&b[skip..]),
            Piece::Pool(s) => s.skip(skip).copy_into(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::Backing;

    #[test]
    fn spans_are_checked_and_pieces_are_written_in_order() {
        let r = Backing::Anon.map(1 << 16, "gather").unwrap();
        r.write_at(100, b"POOLDATA").unwrap();
        assert!(r.span((1 << 16) - 4, 8).is_err(), "a span past the end is refused");
        assert!(r.span(u64::MAX, 1).is_err());
        let s = r.span(100, 8).unwrap();
        assert_eq!((s.len(), s.skip(3).len(), s.skip(99).len()), (8, 5, 0));
        let (a, mut b) = UnixStream::pair().unwrap();
        let pieces = [Piece::Bytes(b"head:"), Piece::Pool(s), Piece::Bytes(b":tail")];
        assert_eq!(write_pieces(a.as_fd(), &pieces).unwrap(), 18);
        let mut got = [0u8; 18];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"head:POOLDATA:tail");
        for written in [0, 3, 5, 9, 13, 18] {
            let mut rest = BytesMut::new();
            copy_rest(&pieces, written, &mut rest);
            assert_eq!(&rest[..], &b"head:POOLDATA:tail"[written..], "after {written} bytes");
        }
        let too_many = vec![Piece::Bytes(b"x"); MAX_PIECES + 1];
        assert_eq!(write_pieces(a.as_fd(), &too_many).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_full_nonblocking_socket_takes_part_and_the_rest_is_copied() {
        let r = Backing::Anon.map(1 << 20, "gather").unwrap();
        let pattern: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 253) as u8).collect();
        r.write_at(0, &pattern).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let s = r.span(0, 1 << 20).unwrap();
        let pieces = [Piece::Bytes(b"h"), Piece::Pool(s)];
        let n = write_pieces(a.as_fd(), &pieces).unwrap();
        assert!(n < (1 << 20) + 1, "a unix socket buffer does not take a whole MiB at once");
        let mut rest = BytesMut::new();
        copy_rest(&pieces, n, &mut rest);
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            b.read_to_end(&mut all).unwrap();
            all
        });
        a.set_nonblocking(false).unwrap();
        std::io::Write::write_all(&mut &a, &rest).unwrap();
        drop(a);
        let all = reader.join().unwrap();
        assert_eq!(all.len(), (1 << 20) + 1);
        assert_eq!(all[0], b'h');
        assert!(all[1..] == pattern[..]);
    }
}
