//! Bad input: each case is answered with a clear error, and another client keeps working meanwhile.

mod common;

use std::net::Shutdown;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use farpool_core::wire::{self, MAX_FRAME_LEN, Msg, OpDone, OpResult, WireOp};
use farpool_core::{Credential, ErrorKind, LeaseId, RemoteAddr, SlabId, Token, Transport};

/// A server, a lease held by a well-behaved client, and its first slab's address.
fn setup() -> (farpool_memserver::ServerHandle, Raw, RemoteAddr) {
    let server = start(config());
    let mut ctl = Raw::connect(server.local_addr());
    let g = ctl.lease(2);
    let at = RemoteAddr::in_grant(&g.grants[0], 4096);
    (server, ctl, at)
}

fn expect_protocol_close(c: &mut Raw, needle: &str) {
    match c.recv() {
        Msg::ErrorReply { req: 0, kind: ErrorKind::Protocol, message } => {
            assert!(message.contains(needle), "message {message:?} should mention {needle:?}")
        }
        other => panic!("expected ErrorReply(Protocol), got {other:?}"),
    }
    assert!(c.closed_by_server(), "the server closes the offending connection");
}

#[test]
fn garbage_before_handshake_is_refused() {
    let (server, _ctl, at) = setup();
    let mut bad = Raw::connect_bare(server.local_addr());
    bad.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    expect_protocol_close(&mut bad, "exceeds the maximum");
    witness(server.local_addr(), at);
    assert!(server.stats().errors_of(ErrorKind::Protocol) >= 1);
}

#[test]
fn garbage_frame_after_handshake_is_refused() {
    let (server, _ctl, at) = setup();
    let mut bad = Raw::connect(server.local_addr());
    // A well-sized frame with an unknown tag.
    bad.send_bytes(&[5, 0, 0, 0, 0x7f, 1, 2, 3, 4]);
    expect_protocol_close(&mut bad, "unknown message tag");
    let mut bad = Raw::connect(server.local_addr());
    bad.send_bytes(&[0, 0, 0, 0]);
    expect_protocol_close(&mut bad, "empty frame");
    witness(server.local_addr(), at);
}

#[test]
fn oversized_length_prefix_is_refused() {
    let (server, _ctl, at) = setup();
    let mut bad = Raw::connect(server.local_addr());
    bad.send_bytes(&(MAX_FRAME_LEN + 1).to_le_bytes());
    expect_protocol_close(&mut bad, "exceeds the maximum");
    witness(server.local_addr(), at);
}

#[test]
fn wrong_version_and_magic_are_refused() {
    let (server, _ctl, at) = setup();
    let mut bad = Raw::connect_bare(server.local_addr());
    bad.send(&Msg::Hello { magic: wire::MAGIC, version: 99, host_id: String::new(), name: "old".into() });
    expect_protocol_close(&mut bad, "version 99");
    let mut bad = Raw::connect_bare(server.local_addr());
    bad.send(&Msg::Hello { magic: 0x1234, version: wire::VERSION, host_id: String::new(), name: "x".into() });
    expect_protocol_close(&mut bad, "bad magic");
    let mut bad = Raw::connect_bare(server.local_addr());
    bad.send(&Msg::Ping { req: 1 });
    expect_protocol_close(&mut bad, "expected Hello");
    witness(server.local_addr(), at);
}

#[test]
fn frames_a_client_may_not_send_are_refused() {
    let (server, _ctl, at) = setup();
    let mut bad = Raw::connect(server.local_addr());
    bad.send(&Msg::Pong { req: 3 });
    expect_protocol_close(&mut bad, "may not send Pong");
    let mut bad = Raw::connect(server.local_addr());
    bad.send(&Msg::Hello { magic: wire::MAGIC, version: wire::VERSION, host_id: String::new(), name: "again".into() });
    expect_protocol_close(&mut bad, "may not send Hello");
    witness(server.local_addr(), at);
}

#[test]
fn unknown_lease_and_forged_token_are_unauthorized() {
    let (server, _ctl, at) = setup();
    let mut t = transport(server.local_addr());
    let unknown = RemoteAddr { cred: Credential { lease: LeaseId(0xdead_beef), ..at.cred }, ..at };
    assert_eq!(err_kind(t.fetch_add(unknown, 1)), ErrorKind::Unauthorized);
    let forged = RemoteAddr { cred: Credential { token: Token(at.cred.token.0 ^ 1), ..at.cred }, ..at };
    assert_eq!(err_kind(t.fetch_add(forged, 1)), ErrorKind::Unauthorized);
    let mut buf = [0u8; 16];
    assert_eq!(err_kind(t.read(forged, &mut buf)), ErrorKind::Unauthorized);
    assert_eq!(err_kind(t.write(forged, b"nope")), ErrorKind::Unauthorized);
    let no_slab = RemoteAddr { slab: SlabId(10_000), ..at };
    assert_eq!(err_kind(t.read(no_slab, &mut buf)), ErrorKind::Unauthorized);
    // The same endpoint keeps working, and the forged write left no trace.
    t.read(at, &mut buf).unwrap();
    assert_eq!(buf, [0; 16]);
    assert_eq!(t.fetch_add(at, 5).unwrap(), 0);
    witness(server.local_addr(), at.offset_by(64));
    assert!(server.stats().errors_of(ErrorKind::Unauthorized) >= 5);
}

#[test]
fn out_of_range_offsets_are_refused() {
    let (server, _ctl, at) = setup();
    let mut t = transport(server.local_addr());
    let end = RemoteAddr { offset: (1 << 20) - 8, ..at };
    let mut buf = [0u8; 16];
    assert_eq!(err_kind(t.read(end, &mut buf)), ErrorKind::OutOfRange);
    assert_eq!(err_kind(t.write(RemoteAddr { offset: u64::MAX - 2, ..at }, b"abcd")), ErrorKind::OutOfRange);
    assert_eq!(err_kind(t.fetch_add(RemoteAddr { offset: 1 << 20, ..at }, 1)), ErrorKind::OutOfRange);
    // The last 8 bytes are in range.
    t.read(end, &mut buf[..8]).unwrap();
    witness(server.local_addr(), at);
}

/// The client library refuses unaligned atomics before sending, so this speaks raw frames.
#[test]
fn unaligned_atomic_is_refused_by_the_server() {
    let (server, _ctl, at) = setup();
    let mut c = Raw::connect(server.local_addr());
    let mut out = BytesMut::new();
    wire::encode_op(&mut out, 11, &at.offset_by(4), &WireOp::FetchAdd { add: 1 });
    wire::encode_op(&mut out, 12, &at.offset_by(3), &WireOp::CompareSwap { expect: 0, new: 1 });
    wire::encode_op(&mut out, 13, &at, &WireOp::FetchAdd { add: 2 });
    c.send_bytes(&out);
    for id in [11, 12] {
        match c.recv() {
            Msg::OpDone(OpDone { id: got, result: Err((ErrorKind::Unaligned, _)) }) => assert_eq!(got, id),
            other => panic!("expected Unaligned, got {other:?}"),
        }
    }
    assert_eq!(c.recv(), Msg::OpDone(OpDone { id: 13, result: Ok(OpResult::Value(0)) }));
    witness(server.local_addr(), at.offset_by(64));
    assert_eq!(server.stats().errors_of(ErrorKind::Unaligned), 2);
}

#[test]
fn connection_dropped_mid_frame_is_cleaned_up() {
    let (server, _ctl, at) = setup();
    let before = server.stats().connections;
    let mut c = Raw::connect(server.local_addr());
    let mut out = BytesMut::new();
    wire::encode_op(&mut out, 1, &at, &WireOp::Write { data: bytes(&[7u8; 1000]) });
    c.send_bytes(&out[..out.len() / 2]);
    c.stream.shutdown(Shutdown::Both).unwrap();
    drop(c);
    assert!(eventually(STEP, || server.stats().connections == before), "the half-frame connection is gone");
    let mut t = transport(server.local_addr());
    let mut buf = [0u8; 8];
    t.read(at, &mut buf).unwrap();
    assert_eq!(buf, [0; 8], "the half-received write was not applied");
    witness(server.local_addr(), at);
}

#[test]
fn bad_lease_requests_get_errors_and_the_connection_stays() {
    let (server, mut ctl, at) = setup();
    let req = ctl.req();
    match ctl.call(Msg::LeaseRequest { req, slabs: 1000, flags: 0 }) {
        Msg::ErrorReply { req: r, kind: ErrorKind::NoSpace, message } => {
            assert_eq!(r, req);
            assert!(message.contains("1000 slabs requested"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let req = ctl.req();
    assert!(matches!(
        ctl.call(Msg::LeaseRequest { req, slabs: 0, flags: 0 }),
        Msg::ErrorReply { kind: ErrorKind::Config, .. }
    ));
    let req = ctl.req();
    let r = ctl.call(Msg::LeaseRequest { req, slabs: 1, flags: wire::LEASE_FLAG_RDMA });
    assert!(matches!(r, Msg::ErrorReply { kind: ErrorKind::Unsupported, .. }), "{r:?}");
    let req = ctl.req();
    let r = ctl.call(Msg::Renew { req, lease: LeaseId(42), secret: 0 });
    assert!(matches!(r, Msg::ErrorReply { kind: ErrorKind::Unauthorized, .. }), "{r:?}");
    let req = ctl.req();
    let r = ctl.call(Msg::Release { req, lease: LeaseId(42), secret: 0 });
    assert!(matches!(r, Msg::ErrorReply { kind: ErrorKind::Unauthorized, .. }), "{r:?}");
    let req = ctl.req();
    assert_eq!(ctl.call(Msg::Ping { req }), Msg::Pong { req });
    witness(server.local_addr(), at);
}

#[test]
fn silent_client_is_closed_after_the_handshake_timeout() {
    let (server, _ctl, g) = one_slab(config().with_handshake_timeout_ms(100));
    let mut silent = Raw::connect_bare(server.local_addr());
    expect_protocol_close(&mut silent, "no Hello within 100 ms");
    witness(server.local_addr(), RemoteAddr::in_grant(&g.grants[0], 0));
}

/// `Renew` and `Release` must carry the lease's secret. With a wrong one, from another client or from
/// the owner, they are answered exactly like an unknown lease, counted, and change nothing: the lease
/// lives on, its notices still go to its owner, and the owner can renew and release it.
#[test]
fn a_wrong_lease_secret_is_refused_like_an_unknown_lease() {
    let (server, mut owner, g) = one_slab(config().with_lease_ms(400));
    let mut other = Raw::connect(server.local_addr());
    for (who, ctl) in [("another client", &mut other), ("the owner", &mut owner)] {
        let req = ctl.req();
        let renew = ctl.call(Msg::Renew { req, lease: g.lease, secret: g.secret ^ 1 });
        let req = ctl.req();
        let release = ctl.call(Msg::Release { req, lease: g.lease, secret: g.secret.wrapping_add(7) });
        for r in [renew, release] {
            match r {
                Msg::ErrorReply { kind: ErrorKind::Unauthorized, message, .. } => {
                    assert_eq!(message, format!("unknown lease {}", g.lease), "{who}: must not reveal the lease");
                }
                other => panic!("{who}: a wrong secret must be refused, got {other:?}"),
            }
        }
    }
    assert_eq!(server.stats().errors_of(ErrorKind::Unauthorized), 4);
    let at = RemoteAddr::in_grant(&g.grants[0], 0);
    let mut t = transport(server.local_addr());
    // Still live past its first duration, renewed by its owner with the right secret.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(200));
        let req = owner.req();
        let r = owner.call(Msg::Renew { req, lease: g.lease, secret: g.secret });
        assert!(matches!(r, Msg::Renewed { .. }), "{r:?}");
    }
    assert_eq!(t.fetch_add(at, 1).unwrap(), 0, "the lease outlived its first 400 ms");
    // Its notices still go to the owner: the wrong-secret renewal from `other` did not take it over.
    let req = other.req();
    let r = other.call(Msg::Admin { req, cmd: wire::AdminCmd::Shrink { slabs: 16, grace_ms: 60_000 } });
    assert!(matches!(r, Msg::AdminReply { .. }), "{r:?}");
    let notice = owner.recv_within(Duration::from_secs(5));
    assert!(
        matches!(notice, Some(Msg::RevokeNotice { lease, .. }) if lease == g.lease),
        "the owner's notice: {notice:?}"
    );
    assert!(other.recv_within(Duration::from_millis(200)).is_none(), "another client got a notice");
    let req = owner.req();
    assert_eq!(owner.call(Msg::Release { req, lease: g.lease, secret: g.secret }), Msg::Ack { req });
    assert_eq!(err_kind(t.fetch_add(at, 1)), ErrorKind::Revoked);
}
