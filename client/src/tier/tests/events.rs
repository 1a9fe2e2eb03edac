//! Backend events: they name grants, not slab ids (a late event about an old grant of a slab id leaves a
//! newer grant of it alone), in the tier and in the pool adapter (fed a fake event stream); and the tier
//! hears of what happens while it is being built.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use farpool_core::{Error, ErrorKind, LeaseId, Result, ServerId, Transport};

use super::super::backend::{BackendEvent, FarBackend, FarSlab, GrantRef};
use super::super::mem::MemBackend;
use super::super::pool_backend::PoolBackend;
use super::super::{Lookup, PageTier};
use super::{FLUSH, PS, assert_no_leak, content};
use crate::PoolEvent;
use crate::fake::FakeServer;

const WAIT: Duration = Duration::from_secs(5);

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Bytes of one slab holding `slots` slots.
fn slab_bytes(slots: u64) -> u64 {
    slots * super::super::layout::slot_size(PS) as u64
}

#[test]
fn late_revoke_of_an_old_grant_leaves_the_new_grant_of_the_slab() {
    let b = Arc::new(MemBackend::new(1, 1, slab_bytes(8)));
    let t = PageTier::builder(b.clone())
        .with_page_size(PS)
        .with_capacity_bytes(slab_bytes(8), slab_bytes(8))
        .build()
        .unwrap();
    let server = b.server_ids()[0];
    let old = b.grants(server);
    assert_eq!(old.len(), 1, "the one slab is leased at build");
    assert_eq!(b.revoke(server, &old), 1);
    wait_until("the tier to lose the revoked grant", || t.stats().slabs_lost == 1);
    // The maintenance thread tops the tier up again: the same slab id, a new lease.
    wait_until("the tier to lease the slab again", || t.leased_bytes() == slab_bytes(8));
    let new = b.grants(server);
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].slab, old[0].slab);
    assert_ne!(new[0].lease, old[0].lease, "a new grant has a new lease id");
    t.put(1, 1, &content(1, 1));
    t.flush(FLUSH).unwrap();
    // The old grant's revocation again, late, then a notice about it: neither touches the new grant.
    b.send_event(BackendEvent::Revoked { server, grants: old.clone() });
    b.send_event(BackendEvent::RevokeNotice { server, grants: old, grace: Duration::ZERO });
    std::thread::sleep(Duration::from_millis(200));
    let mut buf = vec![0; PS];
    assert_eq!(t.get(1, 1, &mut buf), Lookup::Hit { version: 1 }, "{:?}", t.stats());
    assert_eq!(buf, content(1, 1));
    assert_eq!(t.stats().slabs_lost, 1, "{:?}", t.stats());
    assert_eq!(b.grants(server), new, "the new grant is neither revoked nor given back");
    assert_eq!(t.leased_bytes(), slab_bytes(8));
    // The new grant's own revocation does take it.
    assert_eq!(b.revoke(server, &new), 1);
    wait_until("the new grant to be lost", || t.stats().slabs_lost == 2);
    assert!(matches!(t.get(1, 1, &mut buf), Lookup::Miss(_)));
    assert_no_leak(&t, "late revoke");
}

/// A backend that, on its first lease, sends a revoke notice for the server of the slabs it grants
/// (before returning them): the notice is emitted while the tier is being built.
#[derive(Debug)]
struct NoticeDuringBuild {
    inner: Arc<MemBackend>,
    armed: AtomicBool,
}

impl FarBackend for NoticeDuringBuild {
    fn lease(&self, slabs: usize) -> Result<Vec<FarSlab>> {
        let got = self.inner.lease(slabs)?;
        if let Some(first) = got.first()
            && self.armed.swap(false, Ordering::AcqRel)
        {
            self.inner.notice(first.server, Duration::from_millis(100));
        }
        Ok(got)
    }
    fn release(&self, slab: &FarSlab) -> Result<()> {
        self.inner.release(slab)
    }
    fn endpoint(&self, server: ServerId) -> Result<Box<dyn Transport>> {
        self.inner.endpoint(server)
    }
    fn events(&self) -> Receiver<BackendEvent> {
        self.inner.events()
    }
}

#[test]
fn notice_sent_during_build_is_handled() {
    let inner = Arc::new(MemBackend::new(2, 1, slab_bytes(8)));
    let b = Arc::new(NoticeDuringBuild { inner: inner.clone(), armed: AtomicBool::new(true) });
    let t = PageTier::builder(b.clone())
        .with_page_size(PS)
        .with_capacity_bytes(slab_bytes(8), 2 * slab_bytes(8))
        .build()
        .unwrap();
    assert!(!b.armed.load(Ordering::Acquire), "the build leased");
    let [first, second] = inner.server_ids()[..] else { panic!("two servers") };
    let noticed = if inner.granted(first).is_empty() { second } else { first };
    let other = if noticed == first { second } else { first };
    // A notice lost during the build would leave the slab on the drained server held for ever.
    wait_until("the tier to drain the noticed server and move to the other", || {
        inner.granted(noticed).is_empty() && inner.granted(other).len() == 1
    });
    assert_eq!(t.stats().slabs_lost, 1, "{:?}", t.stats());
    assert_eq!(t.leased_bytes(), slab_bytes(8));
    t.put(3, 1, &content(3, 1));
    t.flush(FLUSH).unwrap();
    let mut buf = vec![0; PS];
    assert_eq!(t.get(3, 1, &mut buf), Lookup::Hit { version: 1 });
    assert_no_leak(&t, "notice during build");
}

fn next(rx: &Receiver<BackendEvent>) -> BackendEvent {
    rx.recv_timeout(WAIT).expect("a translated event")
}

#[test]
fn pool_backend_matches_events_by_lease() {
    let fake = FakeServer::start(60_000);
    let pool = crate::PoolBuilder::new([fake.addr]).with_connect_timeout_ms(500).with_op_timeout_ms(1000).build();
    let pool = Arc::new(pool.unwrap());
    let backend = PoolBackend::new(pool.clone());
    let got = backend.lease(2).unwrap();
    let [a, b] = got[..] else { panic!("two slabs: {got:?}") };
    assert_ne!(a.grant.cred.lease, b.grant.cred.lease, "one lease per slab");
    assert_eq!(pool.active_lease_count(), 2);
    let (tx, from) = crossbeam_channel::bounded(16);
    let events = backend.events_from(from);
    let s0 = ServerId(0);
    // A late revocation of an older lease of `a`'s slab id: translated with that lease, `a` is kept.
    let old = LeaseId(a.grant.cred.lease.0 ^ 0x5A5A);
    tx.send(PoolEvent::Revoked { server: 0, lease: old, slabs: vec![a.grant.slab] }).unwrap();
    let old_ref = GrantRef { slab: a.grant.slab, lease: old };
    assert_eq!(next(&events), BackendEvent::Revoked { server: s0, grants: vec![old_ref] });
    assert_ne!(old_ref, a.grant_ref(), "the tier's match on the grant fails for it");
    assert_eq!(pool.active_lease_count(), 2, "the current lease of the slab is still held");
    let deadline = Instant::now() + Duration::from_secs(60);
    tx.send(PoolEvent::RevokeNotice { server: 0, lease: b.grant.cred.lease, slabs: vec![b.grant.slab], deadline })
        .unwrap();
    assert!(matches!(next(&events), BackendEvent::RevokeNotice { server, grants, .. }
        if server == s0 && grants == vec![b.grant_ref()]));
    // `a`'s own revocation: it leaves the registry.
    tx.send(PoolEvent::Revoked { server: 0, lease: a.grant.cred.lease, slabs: vec![a.grant.slab] }).unwrap();
    assert_eq!(next(&events), BackendEvent::Revoked { server: s0, grants: vec![a.grant_ref()] });
    wait_until("the revoked lease to be dropped", || pool.active_lease_count() == 1);
    backend.release(&a).unwrap();
    // A goodbye notices every grant still held on the server, each under its own lease.
    tx.send(PoolEvent::ServerGoodbye { server: 0, reason: "test".into(), deadline }).unwrap();
    assert!(matches!(next(&events), BackendEvent::RevokeNotice { grants, .. } if grants == vec![b.grant_ref()]));
    // A lease lost for a reason other than a broken connection: its grant is revoked; a second loss is moot.
    for _ in 0..2 {
        let error = Arc::new(Error::new(ErrorKind::Revoked, "renewal refused"));
        tx.send(PoolEvent::LeaseLost { server: 0, lease: b.grant.cred.lease, error }).unwrap();
    }
    assert_eq!(next(&events), BackendEvent::Revoked { server: s0, grants: vec![b.grant_ref()] });
    tx.send(PoolEvent::ServerDown { server: 0, error: Arc::new(Error::new(ErrorKind::Closed, "test")) }).unwrap();
    assert_eq!(next(&events), BackendEvent::ServerDown { server: s0 }, "nothing translated for the moot loss");
    wait_until("every lease to be dropped", || pool.active_lease_count() == 0);
    drop(tx);
    assert!(events.recv_timeout(WAIT).is_err(), "the translation ends with its source");
}
