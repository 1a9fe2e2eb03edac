//! The heartbeat thread: renews every active lease before it expires.
//!
//! Owns: the renewals in flight (at most one per lease). Each tick it harvests answers without
//! blocking, declares lost the leases whose renewal was refused (`Revoked`, `Unauthorized`, ...) or
//! whose local expiry passed without a successful renewal, and sends `Renew` for the leases that are
//! due: at a third of their duration by default, or at the configured interval. A renewal that fails
//! in a retryable way (no answer within the op timeout, connection trouble) is retried after a tenth
//! of the lease's duration.
//!
//! Invariants: the thread never waits on a server (so a hung server cannot delay the renewals of
//! another); it holds the pool only weakly and exits when the pool is dropped; a tick lasts between
//! [`MIN_TICK`] and [`MAX_TICK`].

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use farpool_core::wire::Msg;
use farpool_core::{Error, ErrorKind, LeaseId, Result};

use crate::control::PendingReply;
use crate::lease::LeaseState;
use crate::pool::Core;

/// Shortest pause between two heartbeat ticks.
pub(crate) const MIN_TICK: Duration = Duration::from_millis(5);
/// Longest pause between two heartbeat ticks.
pub(crate) const MAX_TICK: Duration = Duration::from_millis(100);

type InFlight = HashMap<(usize, LeaseId), PendingReply>;

/// Start the thread; dropping the returned sender stops it.
pub(crate) fn start(core: Weak<Core>) -> Result<(Sender<()>, JoinHandle<()>)> {
    let (tx, rx) = bounded::<()>(1);
    let t = std::thread::Builder::new()
        .name("farpool-heartbeat".into())
        .spawn(move || run(&core, &rx))
        .map_err(|e| Error::io("spawning the heartbeat thread", e))?;
    Ok((tx, t))
}

fn run(core: &Weak<Core>, stop: &Receiver<()>) {
    let mut inflight = InFlight::new();
    loop {
        let tick = match core.upgrade() {
            Some(core) => step(&core, &mut inflight),
            None => return,
        };
        match stop.recv_timeout(tick) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

fn retry_after(l: &LeaseState) -> Duration {
    (l.duration() / 10).max(Duration::from_millis(10))
}

/// One pass over the leases; returns how long to sleep.
pub(crate) fn step(core: &Core, inflight: &mut InFlight) -> Duration {
    let leases = core.active_leases();
    inflight.retain(|k, _| leases.iter().any(|l| (l.server, l.id) == *k));
    let mut tick = MAX_TICK;
    for l in &leases {
        tick = tick.min(l.duration() / 10).max(MIN_TICK);
        harvest(core, l, inflight);
        if !l.is_active() {
            continue;
        }
        let now = Instant::now();
        if now >= l.expiry() {
            let e = Error::new(ErrorKind::Timeout, format!("lease {} expired before it could be renewed", l.id));
            core.lose_lease(l, Arc::new(e));
            continue;
        }
        let key = (l.server, l.id);
        if !inflight.contains_key(&key) && now >= l.next_renew() {
            let sent = core
                .current_conn(l.server)
                .and_then(|c| c.send("renew", |req| Msg::Renew { req, lease: l.id, secret: l.secret }));
            match sent {
                Ok(p) => {
                    inflight.insert(key, p);
                }
                Err(e) => {
                    tracing::debug!(lease = %l.id, "renewal not sent: {e}");
                    l.retry_renew_after(retry_after(l));
                }
            }
        }
    }
    tick
}

/// Take the answer of the lease's renewal in flight, if any.
fn harvest(core: &Core, l: &Arc<LeaseState>, inflight: &mut InFlight) {
    let key = (l.server, l.id);
    let Some(p) = inflight.get(&key) else { return };
    let outcome = match p.try_take() {
        None if p.sent_at().elapsed() < core.cfg.op_timeout => return,
        None => Err(Error::new(ErrorKind::Timeout, "renewal not answered within the op timeout")),
        Some(r) => r,
    };
    let sent_at = p.sent_at();
    inflight.remove(&key);
    match outcome {
        Ok(Msg::Renewed { expires_in_ms, .. }) => {
            l.renewed(sent_at, expires_in_ms, core.cfg.renew_interval);
        }
        Ok(other) => {
            let e = Error::new(ErrorKind::Protocol, format!("renew answered with {other:?}"));
            core.lose_lease(l, Arc::new(e));
        }
        Err(e) if e.is_retryable() => {
            tracing::warn!(lease = %l.id, "renewal failed, will retry: {e}");
            l.retry_renew_after(retry_after(l));
        }
        Err(e) => core.lose_lease(l, Arc::new(e)),
    }
}
