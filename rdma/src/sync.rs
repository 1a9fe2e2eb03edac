//! Blocking conveniences on [`Endpoint`]: post one operation and wait for it. Other operations in flight
//! are unaffected (their completions stay queued for `poll_completions`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use farpool_core::{Error, ErrorKind, Result};

use crate::alone::Alone;
use crate::endpoint::{Endpoint, Kind, Output, Remote, WATCH_EVERY};
use crate::mr::{LocalBuffer, Registration};
use crate::ops::{Admit, DirectOp, Direction};

/// Extra time past `op_timeout` for the flush of an overdue operation to arrive before the queue pair
/// is destroyed outright.
const FLUSH_GRACE: Duration = Duration::from_secs(1);

impl Endpoint {
    /// RDMA READ of `len` bytes (through the staging buffer).
    pub fn read(&mut self, remote: Remote, len: u32) -> Result<Bytes> {
        let alone = self.run_alone(Kind::Read, remote, len, Alone::Staged, None);
        match alone.unwrap_or_else(|| {
            self.run_sync(|ep| ep.admit(0, Kind::Read, remote, u64::from(len), None, 0, true), &[])
        })? {
            Output::Read(b) => Ok(b),
            o => Err(unexpected("read", &o)),
        }
    }

    /// RDMA WRITE of `data` (inline when small enough, else through the staging buffer).
    pub fn write(&mut self, remote: Remote, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let alone =
            u32::try_from(len).ok().and_then(|l| self.run_alone(Kind::Write, remote, l, Alone::Write(data), None));
        match alone
            .unwrap_or_else(|| self.run_sync(|ep| ep.admit(0, Kind::Write, remote, len, Some(data), 0, true), data))?
        {
            Output::Write => Ok(()),
            o => Err(unexpected("write", &o)),
        }
    }

    /// Atomic compare-and-swap of the u64 at `remote` (8-byte aligned); returns the old value.
    pub fn compare_swap(&mut self, remote: Remote, expect: u64, new: u64) -> Result<u64> {
        let kind = Kind::Cas { expect, new };
        let alone = self.run_alone(kind, remote, 8, Alone::Staged, None);
        match alone.unwrap_or_else(|| self.run_sync(|ep| ep.admit(0, kind, remote, 8, None, 0, true), &[]))? {
            Output::Atomic(v) => Ok(v),
            o => Err(unexpected("compare_swap", &o)),
        }
    }

    /// Atomic fetch-and-add on the u64 at `remote` (8-byte aligned); returns the old value.
    pub fn fetch_add(&mut self, remote: Remote, add: u64) -> Result<u64> {
        let kind = Kind::Faa { add };
        let alone = self.run_alone(kind, remote, 8, Alone::Staged, None);
        match alone.unwrap_or_else(|| self.run_sync(|ep| ep.admit(0, kind, remote, 8, None, 0, true), &[]))? {
            Output::Atomic(v) => Ok(v),
            o => Err(unexpected("fetch_add", &o)),
        }
    }

    /// Zero-copy RDMA READ of `len` bytes into `buf[offset..]`. Safe: `buf` stays borrowed until the NIC is
    /// done with it (on a timeout the queue pair is destroyed before this returns).
    #[inline]
    pub fn read_into(&mut self, buf: &mut LocalBuffer, offset: usize, len: u32, remote: Remote) -> Result<()> {
        self.direct(Kind::Read, buf.registration(), offset, len, remote, NO_CHECK)
    }

    /// Zero-copy RDMA WRITE of `buf[offset..offset + len]`.
    #[inline]
    pub fn write_from(&mut self, buf: &LocalBuffer, offset: usize, len: u32, remote: Remote) -> Result<()> {
        self.direct(Kind::Write, buf.registration(), offset, len, remote, NO_CHECK)
    }

    /// Zero-copy RDMA READ of `buf.len()` bytes into `buf`, a range of memory registered as `reg` with
    /// this endpoint's device (e.g. one frame of a buffer manager's registered arena). `OutOfRange` when
    /// `buf` does not lie inside `reg` or is longer than one operation, `Config` for a registration of
    /// another device. Safe for the same reason as [`read_into`](Self::read_into): the NIC writes
    /// only into `buf`, which this call borrows mutably until the NIC is done with it.
    #[inline]
    pub fn read_to(&mut self, reg: &Arc<Registration>, buf: &mut [u8], remote: Remote) -> Result<()> {
        let (offset, len) = place(reg, buf.as_ptr(), buf.len())?;
        self.direct(Kind::Read, reg, offset, len, remote, NO_CHECK)
    }

    /// [`read_to`](Self::read_to) with a check of the caller's that may run late: on the depth-1 path
    /// `check` runs right after the READ is posted, while the device works (so its cost is not between
    /// one completion and the next post); otherwise before the READ is posted. If it fails, the call
    /// returns its error once the device is done with `buf`, whose contents are then unspecified (the
    /// READ's own error, if it failed too, comes first). For checks that only decide whether the
    /// result may be used, e.g. a lease's expiry; a check that must keep the READ from being sent at
    /// all belongs before the call.
    #[inline]
    pub fn read_to_checked(
        &mut self,
        reg: &Arc<Registration>,
        buf: &mut [u8],
        remote: Remote,
        mut check: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let (offset, len) = place(reg, buf.as_ptr(), buf.len())?;
        self.direct(Kind::Read, reg, offset, len, remote, Some(&mut check))
    }

    /// Zero-copy RDMA WRITE of `data`, a range of memory registered as `reg` (see
    /// [`read_to`](Self::read_to)).
    #[inline]
    pub fn write_of(&mut self, reg: &Arc<Registration>, data: &[u8], remote: Remote) -> Result<()> {
        let (offset, len) = place(reg, data.as_ptr(), data.len())?;
        self.direct(Kind::Write, reg, offset, len, remote, NO_CHECK)
    }

    /// One blocking zero-copy operation on `reg[offset..offset + len]`: the depth-1 path when it is
    /// eligible, else the general one. `check`: see [`read_to_checked`](Self::read_to_checked).
    #[inline(always)]
    fn direct(
        &mut self,
        kind: Kind,
        reg: &Arc<Registration>,
        offset: usize,
        len: u32,
        remote: Remote,
        mut check: Option<&mut impl FnMut() -> Result<()>>,
    ) -> Result<()> {
        match self.direct_alone(kind, reg, offset, len, remote, check.as_deref_mut()) {
            Some(r) => r,
            None => {
                self.direct_general(kind, reg, offset, len, remote, check.map(|c| c as &mut dyn FnMut() -> Result<()>))
            }
        }
    }

    /// [`direct`](Self::direct) on the general path (the depth-1 one was not eligible and did nothing).
    #[inline(never)]
    fn direct_general(
        &mut self,
        kind: Kind,
        reg: &Arc<Registration>,
        offset: usize,
        len: u32,
        remote: Remote,
        check: Option<&mut dyn FnMut() -> Result<()>>,
    ) -> Result<()> {
        if let Some(check) = check {
            check()?;
        }
        let want_read = kind == Kind::Read;
        let dir = if want_read { Direction::Read } else { Direction::Write };
        let op = DirectOp { wr_id: 0, dir, local: reg.clone(), offset, len, remote };
        match self.run_sync(|ep| ep.admit_direct(&op, kind, 0, true), &[])? {
            Output::Placed if want_read => Ok(()),
            Output::Write if !want_read => Ok(()),
            o => Err(unexpected(if want_read { "read_into" } else { "write_from" }, &o)),
        }
    }

    fn run_sync(&mut self, mut admit: impl FnMut(&mut Self) -> Admit, inline: &[u8]) -> Result<Output> {
        self.ensure_ready()?;
        self.sync_done = None;
        let mut deadline: Option<Instant> = None;
        loop {
            let first = self.records.len();
            match admit(self) {
                Admit::Queued => {
                    self.submit(first, |_| inline);
                    break;
                }
                Admit::Immediate => break,
                Admit::NoRoom if !self.past_op_timeout(&mut deadline) => {
                    self.reap()?;
                    self.ensure_ready()?;
                }
                Admit::NoRoom => {
                    return Err(Error::new(ErrorKind::Timeout, "no room in the send queue or staging buffer"));
                }
            }
        }
        self.wait_sync()
    }

    pub(crate) fn wait_sync(&mut self) -> Result<Output> {
        let mut hard: Option<Instant> = None;
        let mut spins = 0u32;
        loop {
            if let Some(c) = self.sync_done.take() {
                return c.result;
            }
            self.reap()?;
            spins = spins.wrapping_add(1);
            if self.sync_done.is_none() && spins.is_multiple_of(WATCH_EVERY) && self.past(&mut hard) {
                // The flush never came: destroy the queue pair so nothing can still write into
                // caller memory, which completes every record, ours included.
                self.teardown();
                return match self.sync_done.take() {
                    Some(c) => c.result,
                    None => Err(Error::new(ErrorKind::Timeout, "operation did not complete")),
                };
            }
            self.backoff(spins);
        }
    }

    /// Whether `op_timeout` has passed since the first call with this `deadline` slot.
    fn past_op_timeout(&self, deadline: &mut Option<Instant>) -> bool {
        let now = Instant::now();
        now >= *deadline.get_or_insert(now + self.cfg.op_timeout)
    }

    /// Whether the hard bound of a blocking call (set at its first check) has passed.
    fn past(&self, hard: &mut Option<Instant>) -> bool {
        let now = Instant::now();
        now >= *hard.get_or_insert(now + self.cfg.op_timeout + FLUSH_GRACE)
    }
}

/// Offset and length of `ptr..ptr + len` inside `reg`, or `OutOfRange`.
#[inline]
fn place(reg: &Registration, ptr: *const u8, len: usize) -> Result<(usize, u32)> {
    let outside = || {
        Error::new(
            ErrorKind::OutOfRange,
            format!(
                "{len} bytes at {ptr:p} are not inside the registration at {:#x} of {} bytes",
                reg.addr(),
                reg.len()
            ),
        )
    };
    let offset = (ptr as u64).checked_sub(reg.addr()).ok_or_else(outside)?;
    let offset = usize::try_from(offset).map_err(|_| outside())?;
    if !reg.contains(offset, len) {
        return Err(outside());
    }
    let len = u32::try_from(len)
        .map_err(|_| Error::new(ErrorKind::OutOfRange, format!("{len} bytes is more than one operation carries")))?;
    Ok((offset, len))
}

/// No caller's check (the type of `direct`'s `None`).
const NO_CHECK: Option<&mut fn() -> Result<()>> = None;

fn unexpected(what: &str, o: &Output) -> Error {
    Error::new(ErrorKind::Internal, format!("{what} completed as {o:?}"))
}
