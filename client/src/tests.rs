//! Control-plane and data-path tests against the in-process fake server ([`crate::fake`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use farpool_core::wire::{AdminCmd, FEATURE_SHM, Msg};

use crate::fake::{FakeServer, SLAB_LEN};
use crate::*;

const EVENT_WAIT: Duration = Duration::from_secs(3);

fn pool(fake: &FakeServer) -> PoolBuilder {
    PoolBuilder::new([fake.addr]).with_connect_timeout_ms(500).with_op_timeout_ms(1000)
}

fn next_event(rx: &crossbeam_channel::Receiver<PoolEvent>, pred: impl Fn(&PoolEvent) -> bool) -> PoolEvent {
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = rx.recv_timeout(left).expect("expected event did not arrive in time");
        if pred(&ev) {
            return ev;
        }
    }
}

#[test]
fn negotiates_tcp_and_reports_why() {
    let fake = FakeServer::start(60_000);
    let p = pool(&fake).build().unwrap();
    let n = p.transport_of(0).unwrap();
    assert_eq!(n.kind, TransportKind::Tcp);
    assert!(n.reason.starts_with("auto: tcp"), "{}", n.reason);
    assert_eq!(p.server_hello(0).unwrap().slab_size, SLAB_LEN);
    assert!(p.ping(0).unwrap() < Duration::from_secs(1));
    assert_eq!(p.transport_of(1).unwrap_err().kind(), ErrorKind::Config);
}

#[test]
fn forced_unavailable_transports_fail_with_unsupported() {
    let fake = FakeServer::start(60_000);
    fake.shared.features.store(u64::from(FEATURE_SHM), Ordering::SeqCst);
    for t in [TransportChoice::Shm, TransportChoice::Rdma, TransportChoice::Tcp] {
        let e = pool(&fake).with_transport(t).build().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{t}: {e}");
        assert!(e.to_string().contains("forced"), "{e}");
    }
}

#[test]
fn data_ops_round_trip_and_are_bounds_checked() {
    let fake = FakeServer::start(60_000);
    let p = pool(&fake).build().unwrap();
    let lease = p.lease(Target::Auto, 2).unwrap();
    assert_eq!((lease.grants().len(), lease.len_bytes()), (2, 2 * SLAB_LEN));
    lease.write(1, 100, b"far").unwrap();
    let mut buf = [0u8; 3];
    lease.read(1, 100, &mut buf).unwrap();
    assert_eq!(&buf, b"far");
    assert_eq!(lease.compare_swap(0, 8, 0, 5).unwrap(), 0);
    assert_eq!(lease.compare_swap(0, 8, 0, 9).unwrap(), 5, "failed CAS returns the current value");
    assert_eq!(lease.fetch_add(0, 8, 10).unwrap(), 5);
    assert_eq!(lease.fetch_add(0, 8, 0).unwrap(), 15);
    assert_eq!(lease.fetch_add(0, 3, 1).unwrap_err().kind(), ErrorKind::Unaligned);
    assert_eq!(lease.read(0, SLAB_LEN - 2, &mut buf).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(lease.write(2, 0, b"x").unwrap_err().kind(), ErrorKind::OutOfRange);

    let mut ep = p.endpoint(0).unwrap();
    let items: Vec<(usize, u64, Vec<u8>)> = (0..40).map(|i| (i % 2, (i as u64) * 512, vec![i as u8; 300])).collect();
    let refs: Vec<(usize, u64, &[u8])> = items.iter().map(|(g, o, d)| (*g, *o, d.as_slice())).collect();
    ep.write_many(&lease, &refs).unwrap();
    let reads: Vec<(usize, u64, usize)> = items.iter().map(|(g, o, d)| (*g, *o, d.len())).collect();
    let got = ep.read_many(&lease, &reads).unwrap();
    for (want, have) in items.iter().zip(&got) {
        assert_eq!(&want.2[..], &have[..]);
    }
    let bad = [(0, 0, 8), (0, SLAB_LEN, 1)];
    assert_eq!(ep.read_many(&lease, &bad).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert!(ep.is_healthy(), "a client-side refusal does not break the endpoint");
}

#[test]
fn endpoint_refuses_a_lease_of_another_server() {
    let (a, b) = (FakeServer::start(60_000), FakeServer::start(60_000));
    let p = PoolBuilder::new([a.addr, b.addr]).build().unwrap();
    let l0 = p.lease(0, 1).unwrap();
    let l1 = p.lease(1, 1).unwrap();
    assert_eq!((l0.server(), l1.server()), (0, 1));
    let mut ep = p.endpoint(1).unwrap();
    assert_eq!(ep.write(&l0, 0, 0, b"x").unwrap_err().kind(), ErrorKind::Config);
    ep.write(&l1, 0, 0, b"x").unwrap();
    let servers: Vec<usize> = (0..4).map(|_| p.lease(Target::Auto, 1).unwrap().server()).collect();
    assert!(servers.contains(&0) && servers.contains(&1), "auto spreads leases: {servers:?}");
}

#[test]
fn heartbeat_keeps_a_short_lease_alive() {
    let fake = FakeServer::start(600);
    let p = pool(&fake).build().unwrap();
    let lease = p.lease(0, 1).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    lease.write(0, 0, b"alive").unwrap();
    assert!(lease.is_active());
    let renews = fake.shared.renews.load(Ordering::SeqCst);
    assert!((3..=20).contains(&renews), "renewed every ~200 ms (a third of 600 ms) over 1.5 s: {renews}");
}

#[test]
fn without_heartbeat_a_lease_expires_and_access_is_denied() {
    let fake = FakeServer::start(200);
    let p = pool(&fake).with_heartbeat(false).build().unwrap();
    let lease = p.lease(0, 1).unwrap();
    let addr = lease.addr(0, 0, 8).unwrap();
    lease.write(0, 0, b"x").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lease.write(0, 0, b"x").unwrap_err().kind(), ErrorKind::Revoked, "client-side check");
    let mut ep = p.endpoint(0).unwrap();
    let e = ep.transport().write(addr, b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Revoked, "the server refuses too: {e}");
    assert_eq!(lease.renew().unwrap_err().kind(), ErrorKind::Revoked);
}

#[test]
fn revoke_notice_arrives_before_the_deadline_and_access_stops_after() {
    let fake = FakeServer::start(60_000);
    let p = pool(&fake).build().unwrap();
    let events = p.events();
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    p.on_event(move |_| {
        s2.fetch_add(1, Ordering::SeqCst);
    });
    let lease = p.lease(0, 2).unwrap();
    let sent = Instant::now();
    fake.revoke(lease.id(), 500);
    let ev = next_event(&events, |e| matches!(e, PoolEvent::RevokeNotice { .. }));
    let PoolEvent::RevokeNotice { lease: id, slabs, deadline, server } = ev else { unreachable!() };
    assert!(Instant::now() < sent + Duration::from_millis(500), "notice delivered before the server's deadline");
    assert!(deadline >= sent + Duration::from_millis(500) && deadline <= Instant::now() + Duration::from_millis(500));
    assert_eq!((id, server, slabs.len()), (lease.id(), 0, 2));
    lease.write(0, 0, b"still mine").unwrap();
    next_event(&events, |e| matches!(e, PoolEvent::Revoked { .. }));
    assert!(Instant::now() >= sent + Duration::from_millis(500));
    assert_eq!(lease.write(0, 0, b"x").unwrap_err().kind(), ErrorKind::Revoked);
    assert!(matches!(lease.status(), LeaseStatus::Revoked));
    assert_eq!(p.active_lease_count(), 0);
    // Callbacks run after the channels are fed, on the dispatcher thread: wait for them (bounded).
    let deadline = Instant::now() + EVENT_WAIT;
    while seen.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "callback saw the notice and the revocation");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn killed_server_yields_events_and_errors_within_the_bound() {
    let mut fake = FakeServer::start(60_000);
    let p = pool(&fake).build().unwrap();
    let events = p.events();
    let lease = p.lease(0, 1).unwrap();
    lease.write(0, 0, b"x").unwrap();
    fake.kill();
    next_event(&events, |e| matches!(e, PoolEvent::ServerDown { server: 0, .. }));
    let ev = next_event(&events, |e| matches!(e, PoolEvent::LeaseLost { .. }));
    assert!(matches!(ev, PoolEvent::LeaseLost { lease: id, .. } if id == lease.id()));
    let t = Instant::now();
    assert_eq!(lease.write(0, 0, b"x").unwrap_err().kind(), ErrorKind::Revoked);
    let e = p.lease(0, 1).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::Closed), "{e}");
    let e = p.lease(0, 1).unwrap_err();
    assert!(e.to_string().contains("down"), "within the back-off the last error is returned: {e}");
    assert!(p.endpoint(0).is_err());
    assert!(t.elapsed() < Duration::from_millis(2000), "fails fast, not after a timeout: {:?}", t.elapsed());
}

#[test]
fn silent_server_times_out_within_the_bound() {
    let fake = FakeServer::start(60_000);
    let p = pool(&fake).with_op_timeout_ms(300).build().unwrap();
    let lease = p.lease(0, 1).unwrap();
    fake.shared.silent.store(true, Ordering::SeqCst);
    let t = Instant::now();
    assert_eq!(p.lease(0, 1).unwrap_err().kind(), ErrorKind::Timeout);
    assert_eq!(lease.write(0, 0, b"x").unwrap_err().kind(), ErrorKind::Timeout);
    assert_eq!(p.ping(0).unwrap_err().kind(), ErrorKind::Timeout);
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(4000), "three 300 ms bounds: {took:?}");
}

#[test]
fn unreachable_server_fails_build_fast() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let t = Instant::now();
    let e = PoolBuilder::new([format!("127.0.0.1:{port}")]).with_connect_timeout_ms(300).build().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable, "{e}");
    assert!(t.elapsed() < Duration::from_millis(1300), "{:?}", t.elapsed());
}

#[test]
fn one_dead_server_of_two_is_skipped() {
    let live = FakeServer::start(60_000);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let p = PoolBuilder::new([format!("127.0.0.1:{port}"), live.addr.to_string()])
        .with_connect_timeout_ms(300)
        .build()
        .unwrap();
    for _ in 0..3 {
        assert_eq!(p.lease(Target::Auto, 1).unwrap().server(), 1);
    }
    assert_eq!(p.lease(0, 1).unwrap_err().kind(), ErrorKind::Unreachable);
}

#[test]
fn goodbye_and_release_on_drop() {
    let fake = FakeServer::start(60_000);
    let p = pool(&fake).build().unwrap();
    let events = p.events();
    let a = p.lease(0, 1).unwrap();
    let b = p.lease(0, 1).unwrap();
    assert_eq!(p.admin(0, AdminCmd::Stats).unwrap().stat("leases"), Some(2));
    a.release().unwrap();
    drop(b);
    assert_eq!(p.active_lease_count(), 0);
    let deadline = Instant::now() + EVENT_WAIT;
    while p.admin(0, AdminCmd::Stats).unwrap().stat("leases") != Some(0) {
        assert!(Instant::now() < deadline, "dropped lease was never released");
        std::thread::sleep(Duration::from_millis(5));
    }
    fake.broadcast(&Msg::Goodbye { reason: "maintenance".into(), grace_ms: 1000 });
    let ev = next_event(&events, |e| matches!(e, PoolEvent::ServerGoodbye { .. }));
    assert!(matches!(ev, PoolEvent::ServerGoodbye { ref reason, .. } if reason == "maintenance"));
}

#[test]
fn dropping_the_pool_ends_the_event_stream_and_leases() {
    let fake = FakeServer::start(60_000);
    let p = pool(&fake).build().unwrap();
    let events = p.events();
    let lease = p.lease(0, 1).unwrap();
    let t = Instant::now();
    drop(p);
    assert!(t.elapsed() < Duration::from_secs(3), "shutdown is prompt: {:?}", t.elapsed());
    assert!(events.recv_timeout(Duration::from_millis(200)).is_err());
    assert_eq!(lease.write(0, 0, b"x").unwrap_err().kind(), ErrorKind::Revoked);
    assert_eq!(lease.renew().unwrap_err().kind(), ErrorKind::Closed);
}

#[test]
fn dropping_the_pool_from_its_own_callback_does_not_deadlock() {
    let fake = FakeServer::start(60_000);
    let p = pool(&fake).build().unwrap();
    let slot: Arc<parking_lot::Mutex<Option<Pool>>> = Arc::default();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let s2 = slot.clone();
    p.on_event(move |_| {
        let taken = s2.lock().take();
        drop(taken);
        let _ = tx.try_send(());
    });
    let lease = p.lease(0, 1).unwrap();
    *slot.lock() = Some(p);
    fake.revoke(lease.id(), 0);
    rx.recv_timeout(EVENT_WAIT).expect("the callback dropped the pool and returned");
    assert!(slot.lock().is_none());
}
