//! Blocking conveniences on [`Endpoint`]: post one operation and wait for it. Other operations in flight
//! are unaffected (their completions stay queued for `poll_completions`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use farpool_core::{Error, ErrorKind, Result};

use crate::alone::Alone;
use crate::endpoint::{Endpoint, Kind, Output, Remote, WATCH_EVERY};
use crate::mr::LocalBuffer;
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
    pub fn read_into(&mut self, buf: &mut LocalBuffer, offset: usize, len: u32, remote: Remote) -> Result<()> {
        let reg = buf.registration();
        if let Some(r) = self.run_alone(Kind::Read, remote, len, Alone::Direct { reg, offset }, None) {
            return match r? {
                Output::Placed => Ok(()),
                o => Err(unexpected("read_into", &o)),
            };
        }
        let op = DirectOp { wr_id: 0, dir: Direction::Read, local: buf.registration().clone(), offset, len, remote };
        match self.run_sync(|ep| ep.admit_direct(&op, Kind::Read, 0, true), &[])? {
            Output::Placed => Ok(()),
            o => Err(unexpected("read_into", &o)),
        }
    }

    /// Zero-copy RDMA WRITE of `buf[offset..offset + len]`.
    pub fn write_from(&mut self, buf: &LocalBuffer, offset: usize, len: u32, remote: Remote) -> Result<()> {
        let reg = buf.registration();
        if let Some(r) = self.run_alone(Kind::Write, remote, len, Alone::Direct { reg, offset }, None) {
            return match r? {
                Output::Write => Ok(()),
                o => Err(unexpected("write_from", &o)),
            };
        }
        let op = DirectOp { wr_id: 0, dir: Direction::Write, local: buf.registration().clone(), offset, len, remote };
        match self.run_sync(|ep| ep.admit_direct(&op, Kind::Write, 0, true), &[])? {
            Output::Write => Ok(()),
            o => Err(unexpected("write_from", &o)),
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

fn unexpected(what: &str, o: &Output) -> Error {
    Error::new(ErrorKind::Internal, format!("{what} completed as {o:?}"))
}
