//! Admin commands on the server side (stats, shrink, drain, grow) and a small blocking admin client
//! (used by `farpool-memserver admin` and by tests).
//!
//! Shrink and drain never pull memory from under a client without warning: free slabs leave capacity at
//! once (their pages are given back to the OS), granted ones are marked retiring, their holders receive
//! `RevokeNotice { grace_ms }`, and the housekeeping tick revokes them when the grace is over (grant
//! invalid, memory zeroed, slab removed from capacity, `Revoked` sent to the holder).

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use farpool_core::size::format_bytes;
use farpool_core::wire::{self, AdminCmd, FrameReader, Msg};
use farpool_core::{Error, ErrorKind, LeaseId, Result, SlabId};

use crate::state::{Control, Outbox, PendingRevoke, Shared, error_reply};

impl Shared {
    /// Handle an `Admin` frame.
    pub(crate) fn admin(&self, req: u64, cmd: AdminCmd) -> Msg {
        let mut outbox = Outbox::new();
        let result = match cmd {
            AdminCmd::Stats => Ok("ok".to_owned()),
            AdminCmd::Shrink { slabs, grace_ms } => self.shrink(slabs, grace_ms, &mut outbox),
            AdminCmd::Drain { grace_ms } => self.drain(grace_ms, &mut outbox),
            AdminCmd::Grow { bytes } => self.grow(bytes),
        };
        self.deliver(outbox);
        match result {
            Ok(text) => {
                tracing::info!(?cmd, "admin: {text}");
                Msg::AdminReply { req, stats: self.stats().to_pairs(), text }
            }
            Err(e) => {
                tracing::info!(?cmd, "admin command refused: {e}");
                error_reply(req, e.kind(), e.message())
            }
        }
    }

    fn shrink(&self, n: u32, grace_ms: u64, outbox: &mut Outbox) -> Result<String> {
        let mut ctl = self.control.lock();
        let c = ctl.alloc.counts();
        let removable = c.free + c.granted - c.retiring;
        if n == 0 || u64::from(n) > removable {
            let m = format!("cannot shrink by {n} slabs: {removable} can be removed");
            return Err(Error::new(ErrorKind::Config, m));
        }
        let freed = self.remove_free(&mut ctl, n as usize);
        let victims: Vec<SlabId> =
            ctl.alloc.granted_not_retiring().into_iter().take(n as usize - freed).map(|(s, _)| s).collect();
        let noticed = self.schedule_revoke(&mut ctl, &victims, grace_ms, outbox);
        Ok(format!(
            "shrinking by {n} slabs ({}): {freed} free slabs removed now, {} granted slabs of {noticed} leases \
             revoked in {grace_ms} ms",
            format_bytes(u64::from(n) * self.cfg.slab_size_bytes),
            victims.len()
        ))
    }

    fn drain(&self, grace_ms: u64, outbox: &mut Outbox) -> Result<String> {
        let mut ctl = self.control.lock();
        ctl.draining = true;
        let freed = self.remove_free(&mut ctl, usize::MAX);
        let victims: Vec<SlabId> = ctl.alloc.granted_not_retiring().into_iter().map(|(s, _)| s).collect();
        let noticed = self.schedule_revoke(&mut ctl, &victims, grace_ms, outbox);
        Ok(format!(
            "draining: no new leases; {freed} free slabs removed now, {} granted slabs of {noticed} leases revoked \
             in {grace_ms} ms",
            victims.len()
        ))
    }

    fn grow(&self, bytes: u64) -> Result<String> {
        let slabs = bytes / self.cfg.slab_size_bytes;
        if slabs == 0 {
            let m =
                format!("{} is less than one slab of {}", format_bytes(bytes), format_bytes(self.cfg.slab_size_bytes));
            return Err(Error::new(ErrorKind::Config, m));
        }
        let mut ctl = self.control.lock();
        if ctl.draining {
            return Err(Error::new(ErrorKind::Config, "server is draining: cannot grow"));
        }
        if ctl.alloc.len() as u64 + slabs > u64::from(u32::MAX) {
            return Err(Error::new(ErrorKind::Config, "slab ids exhausted"));
        }
        self.add_region(&mut ctl, slabs)?;
        Ok(format!(
            "grew by {slabs} slabs ({}) in region {}; {} slabs in capacity",
            format_bytes(slabs * self.cfg.slab_size_bytes),
            ctl.regions.len() - 1,
            ctl.alloc.counts().total()
        ))
    }

    /// Take up to `n` free slabs out of capacity and give their pages back to the OS.
    fn remove_free(&self, ctl: &mut Control, n: usize) -> usize {
        let gone = ctl.alloc.remove_free(n);
        for s in &gone {
            let region = ctl.region_of(*s);
            if let Err(e) = region.0.discard(region.1, self.cfg.slab_size_bytes as usize) {
                tracing::warn!(slab = %s, "could not release the pages of a removed slab: {e}");
            }
        }
        gone.len()
    }

    /// Mark `victims` retiring, notify their holders, and schedule the revocation; returns the number of
    /// leases notified. A zero grace revokes at once (after the notice).
    fn schedule_revoke(&self, ctl: &mut Control, victims: &[SlabId], grace_ms: u64, outbox: &mut Outbox) -> usize {
        if victims.is_empty() {
            return 0;
        }
        let mut by_lease: HashMap<LeaseId, Vec<SlabId>> = HashMap::new();
        for (s, lease) in ctl.alloc.granted_not_retiring() {
            if victims.contains(&s) {
                by_lease.entry(lease).or_default().push(s);
            }
        }
        for s in victims {
            ctl.alloc.retire(*s);
        }
        let leases = by_lease.len();
        for (lease, slabs) in by_lease {
            let owner = ctl.leases[&lease].owner;
            outbox.push((owner, Msg::RevokeNotice { lease, slabs, grace_ms }));
        }
        let now = self.now_ms();
        // `now_ms` is rounded down: up to 1 ms has already passed, so the first whole millisecond at or after
        // `now + grace` is `now + grace + 1` (a revocation never comes before the full grace).
        let deadline_ms = now.saturating_add(grace_ms).saturating_add(u64::from(grace_ms > 0));
        ctl.pending.push(PendingRevoke { deadline_ms, slabs: victims.to_vec() });
        if grace_ms == 0 {
            self.run_due_revocations(ctl, now, outbox);
        }
        leases
    }
}

/// What an admin command returned.
#[derive(Clone, Debug)]
pub struct AdminOutcome {
    /// Named counters (see `ServerStats::to_pairs`).
    pub stats: Vec<(String, u64)>,
    /// Human-readable summary.
    pub text: String,
}

/// Send one admin command to the server at `addr` and wait (at most `timeout` for each step) for its
/// reply. Frames not addressed to this request (e.g. `Goodbye`) are skipped, at most 64 of them.
pub fn admin_request(addr: SocketAddr, cmd: AdminCmd, timeout: Duration) -> Result<AdminOutcome> {
    let mut stream = farpool_core::tcp::connect_bounded(addr, timeout)?;
    let mut reader = FrameReader::new();
    farpool_core::tcp::client_handshake(&mut stream, &mut reader, "farpool-admin", timeout)?;
    let req = 1;
    let mut out = BytesMut::new();
    wire::encode(&Msg::Admin { req, cmd }, &mut out);
    stream.write_all(&out).map_err(|e| Error::io("sending admin command", e))?;
    let deadline = Instant::now() + timeout;
    for _ in 0..64 {
        if Instant::now() >= deadline {
            break;
        }
        let _ = stream
            .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))));
        let frame = reader.next(&mut stream);
        match frame? {
            Msg::AdminReply { req: r, stats, text } if r == req => return Ok(AdminOutcome { stats, text }),
            Msg::ErrorReply { kind, message, .. } => return Err(Error::new(kind, message)),
            other => tracing::debug!("admin client skipping {other:?}"),
        }
    }
    Err(Error::new(ErrorKind::Timeout, "no admin reply in time"))
}

/// Render an admin reply for humans: the summary, then one counter per line (sizes in binary units).
pub fn format_outcome(o: &AdminOutcome) -> String {
    let mut s = format!("{}\n", o.text);
    let width = o.stats.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in &o.stats {
        let shown = if k.ends_with("_bytes") || k.starts_with("bytes_") { format_bytes(*v) } else { v.to_string() };
        s.push_str(&format!("  {k:<width$}  {shown}\n"));
    }
    s
}
