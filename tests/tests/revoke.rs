//! Revocation and expiry against a real server: notices arrive before their deadline, access is denied
//! after it (client-side and by the server), and an unrenewed lease expires.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use crossbeam_channel::Receiver;
use farpool::{AdminCmd, ErrorKind, LeaseStatus, PoolEvent};
use farpool_tests::MemServer;

const EVENT_WAIT: Duration = Duration::from_secs(10);

fn wait_for(rx: &Receiver<PoolEvent>, what: &str, pred: impl Fn(&PoolEvent) -> bool) -> Result<PoolEvent> {
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ev) if pred(&ev) => return Ok(ev),
            Ok(_) => {}
            Err(_) => bail!("no {what} event within {EVENT_WAIT:?}"),
        }
    }
}

fn denied(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Revoked | ErrorKind::Unauthorized)
}

#[test]
fn drain_sends_a_notice_before_the_deadline_and_denies_access_after() -> Result<()> {
    const GRACE_MS: u64 = 1000;
    let server = MemServer::start(&[])?;
    let pool = server.pool()?;
    let events = pool.events();
    let lease = pool.lease(0, 2)?;
    lease.write(1, 0, b"before")?;
    let stale = lease.addr(1, 0, 8)?;
    let admin = server.pool()?;
    let sent = Instant::now();
    admin.admin(0, AdminCmd::Drain { grace_ms: GRACE_MS })?;
    let ev = wait_for(&events, "revoke notice", |e| matches!(e, PoolEvent::RevokeNotice { .. }))?;
    let PoolEvent::RevokeNotice { lease: id, slabs, deadline, .. } = ev else { unreachable!() };
    let arrived = Instant::now();
    let server_deadline = sent + Duration::from_millis(GRACE_MS);
    assert!(arrived < server_deadline, "notice arrived {:?} after the server's deadline", arrived - server_deadline);
    assert!(arrived < deadline);
    assert_eq!(id, lease.id());
    assert_eq!(slabs.len(), 2);
    assert!(deadline <= arrived + Duration::from_millis(GRACE_MS));
    assert!(deadline >= sent + Duration::from_millis(GRACE_MS / 2), "deadline honours the grace");
    lease.write(1, 0, b"during")?; // still ours within the grace

    wait_for(&events, "revoked", |e| matches!(e, PoolEvent::Revoked { .. }))?;
    assert!(Instant::now() >= sent + Duration::from_millis(GRACE_MS / 2));
    let e = lease.write(1, 0, b"after").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Revoked, "client-side check: {e}");
    assert!(matches!(lease.status(), LeaseStatus::Revoked));
    let mut ep = pool.endpoint(0)?;
    let e = ep.transport().write(stale, b"after").unwrap_err();
    assert!(denied(e.kind()), "the server denies the old credential: {e}");
    let e = pool.lease(0, 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "a draining server grants nothing: {e}");
    Ok(())
}

#[test]
fn shrink_revokes_only_the_affected_slab() -> Result<()> {
    let server = MemServer::start(&["--capacity", "4MiB"])?;
    let pool = server.pool()?;
    let events = pool.events();
    let lease = pool.lease(0, 4)?; // the whole pool: shrinking must take a granted slab
    let stale: Vec<_> = (0..4).map(|g| lease.addr(g, 0, 8)).collect::<farpool::Result<_>>()?;
    pool.admin(0, AdminCmd::Shrink { slabs: 1, grace_ms: 300 })?;
    let ev = wait_for(&events, "revoke notice", |e| matches!(e, PoolEvent::RevokeNotice { .. }))?;
    let PoolEvent::RevokeNotice { slabs, deadline, .. } = ev else { unreachable!() };
    assert!(Instant::now() < deadline);
    assert_eq!(slabs.len(), 1);
    let ev = wait_for(&events, "revoked", |e| matches!(e, PoolEvent::Revoked { .. }))?;
    let PoolEvent::Revoked { slabs: gone, .. } = ev else { unreachable!() };
    assert_eq!(gone, slabs);
    let victim = lease.grants().iter().position(|g| g.slab == gone[0]).expect("revoked slab is ours");
    let mut ep = pool.endpoint(0)?;
    for (g, addr) in stale.iter().enumerate() {
        let client = lease.fetch_add(g, 0, 1);
        let raw = ep.transport().fetch_add(*addr, 1);
        if g == victim {
            assert_eq!(client.unwrap_err().kind(), ErrorKind::Revoked);
            assert!(denied(raw.unwrap_err().kind()));
        } else {
            assert_eq!(client?, 0);
            assert_eq!(raw?, 1, "other slabs keep working");
        }
    }
    assert!(lease.is_active());
    Ok(())
}

#[test]
fn an_unrenewed_lease_expires_and_the_server_denies_access() -> Result<()> {
    let server = MemServer::start(&["--lease-ms", "300"])?;
    let pool = server.pool_builder().with_heartbeat(false).build()?;
    let events = pool.events();
    let lease = pool.lease(0, 1)?;
    let addr = lease.addr(0, 0, 8)?;
    lease.write(0, 0, b"fresh")?;
    std::thread::sleep(Duration::from_millis(700));
    let mut ep = pool.endpoint(0)?;
    let e = ep.transport().write(addr, b"late").unwrap_err();
    assert!(denied(e.kind()), "server refuses an expired lease: {e}");
    assert_eq!(lease.write(0, 0, b"late").unwrap_err().kind(), ErrorKind::Revoked);
    assert!(lease.renew().is_err(), "an expired lease cannot be renewed");
    wait_for(&events, "revoked (expiry)", |e| matches!(e, PoolEvent::Revoked { .. }))?;
    Ok(())
}

#[test]
fn the_heartbeat_keeps_a_short_lease_alive() -> Result<()> {
    // 1 s leases renewed every ~333 ms, watched for 3 s: several renewals must succeed in a row, with
    // enough margin that a loaded 2-core machine does not starve a renewal past the expiry.
    let server = MemServer::start(&["--lease-ms", "1000"])?;
    let pool = server.pool()?;
    let events = pool.events();
    let lease = pool.lease(0, 1)?;
    for i in 0..10u64 {
        std::thread::sleep(Duration::from_millis(300));
        lease.write(0, 8 * i, &i.to_le_bytes())?;
    }
    assert!(lease.is_active());
    assert!(lease.expiry() > Instant::now());
    let lost: Vec<_> = events.try_iter().filter(|e| matches!(e, PoolEvent::LeaseLost { .. })).collect();
    assert!(lost.is_empty(), "{lost:?}");
    Ok(())
}
