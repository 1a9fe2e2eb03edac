//! Leases: expiry denies access, renewal keeps it, release and expiry return slabs zeroed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use farpool_core::wire::Msg;
use farpool_core::{ErrorKind, RemoteAddr, Transport};
use farpool_cxl::Backing;

#[test]
fn expired_lease_denies_access_and_is_reclaimed() {
    let server = start(config().with_lease_ms(300));
    let mut ctl = Raw::connect(server.local_addr());
    let g = ctl.lease(3);
    assert_eq!(g.expires_in_ms, 300);
    let at = RemoteAddr::in_grant(&g.grants[1], 0);
    let mut t = transport(server.local_addr());
    t.write(at, b"mine").unwrap();
    let s = server.stats();
    assert_eq!((s.slabs_granted, s.slabs_free, s.leases_active), (3, 13, 1));
    std::thread::sleep(Duration::from_millis(360));
    let mut buf = [0u8; 4];
    assert_eq!(err_kind(t.read(at, &mut buf)), ErrorKind::Revoked);
    // The reaper reclaims it and tells the holder.
    match ctl.recv() {
        Msg::Revoked { lease, slabs } => {
            assert_eq!(lease, g.lease);
            assert_eq!(slabs.len(), 3);
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
    let s = server.stats();
    assert_eq!((s.slabs_granted, s.slabs_free, s.slabs_total, s.leases_active), (0, 16, 16, 0));
    assert_eq!(s.leases_expired, 1);
    let req = ctl.req();
    let r = ctl.call(Msg::Renew { req, lease: g.lease, secret: g.secret });
    assert!(matches!(r, Msg::ErrorReply { kind: ErrorKind::Revoked, .. }), "renewing an ended lease: {r:?}");
    assert_eq!(err_kind(t.read(at, &mut buf)), ErrorKind::Revoked, "still denied after reclaim");
}

#[test]
fn renewal_keeps_a_lease_alive() {
    let (server, mut ctl, g) = one_slab(config().with_lease_ms(300));
    let at = RemoteAddr::in_grant(&g.grants[0], 8);
    let mut t = transport(server.local_addr());
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(600) {
        let req = ctl.req();
        match ctl.call(Msg::Renew { req, lease: g.lease, secret: g.secret }) {
            Msg::Renewed { req: r, lease, expires_in_ms } => {
                assert_eq!((r, lease, expires_in_ms), (req, g.lease, 300));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.fetch_add(at, 1).unwrap(), n);
        n += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.stats().leases_expired, 0);
}

fn regranted_slab_reads_zeros(backing: Backing) {
    let server = start(config().with_capacity_bytes(2 << 20).with_backing(backing.clone()));
    let mut a = Raw::connect(server.local_addr());
    let ga = a.lease(2);
    let mut t = transport(server.local_addr());
    let secret = vec![0xA5u8; 1 << 20];
    for g in &ga.grants {
        t.write(RemoteAddr::in_grant(g, 0), &secret).unwrap();
    }
    let req = a.req();
    assert_eq!(a.call(Msg::Release { req, lease: ga.lease, secret: ga.secret }), Msg::Ack { req });
    let mut b = Raw::connect(server.local_addr());
    let gb = b.lease(2);
    let mut back = vec![1u8; 1 << 20];
    for g in &gb.grants {
        let old = ga.grants.iter().find(|o| o.slab == g.slab).expect("the same slabs come back");
        assert!(g.cred.epoch > old.cred.epoch, "a re-grant has a newer epoch");
        assert_ne!(g.cred.token, old.cred.token);
        t.read(RemoteAddr::in_grant(g, 0), &mut back).unwrap();
        assert!(back.iter().all(|b| *b == 0), "{backing}: a re-granted slab must read as zeros");
        // The previous tenant's credential no longer works.
        assert_eq!(err_kind(t.read(RemoteAddr::in_grant(old, 0), &mut back[..8])), ErrorKind::Revoked);
    }
    let req = a.req();
    let r = a.call(Msg::Release { req, lease: ga.lease, secret: ga.secret });
    assert!(matches!(r, Msg::ErrorReply { kind: ErrorKind::Revoked, .. }), "double release: {r:?}");
    assert_eq!(server.stats().leases_released, 1);
}

#[test]
fn regranted_slab_reads_zeros_anon() {
    regranted_slab_reads_zeros(Backing::Anon);
}

#[test]
fn regranted_slab_reads_zeros_memfd() {
    regranted_slab_reads_zeros(Backing::Memfd);
}

#[test]
fn expired_slabs_return_to_the_free_pool_and_stats_add_up() {
    let server = start(config().with_lease_ms(400));
    let mut keep = Raw::connect(server.local_addr());
    let kept = keep.lease(4);
    let mut lose = Raw::connect(server.local_addr());
    for _ in 0..3 {
        lose.lease(2);
    }
    let s = server.stats();
    assert_eq!((s.slabs_free, s.slabs_granted, s.leases_active, s.leases_granted), (6, 10, 4, 4));
    let deadline = Instant::now() + Duration::from_millis(1000);
    while Instant::now() < deadline {
        let req = keep.req();
        assert!(matches!(keep.call(Msg::Renew { req, lease: kept.lease, secret: kept.secret }), Msg::Renewed { .. }));
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = server.stats();
    assert_eq!((s.slabs_free, s.slabs_granted, s.leases_active, s.leases_expired), (12, 4, 1, 3));
    assert_eq!(s.slabs_free + s.slabs_granted, s.slabs_total);
    // All of the free capacity can be granted again.
    let again = lose.lease(12);
    assert_eq!(again.grants.len(), 12);
    let req = lose.req();
    assert!(matches!(
        lose.call(Msg::LeaseRequest { req, slabs: 1, flags: 0 }),
        Msg::ErrorReply { kind: ErrorKind::NoSpace, .. }
    ));
}
