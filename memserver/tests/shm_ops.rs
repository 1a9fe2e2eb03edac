//! The shared-memory transport against a real memory server: handshake, per-grant memfds shared with
//! the TCP path, checks (bounds, forged token, stale epoch, unaligned atomic), concurrent atomics.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use farpool_core::tcp::client_handshake;
use farpool_core::wire::{self, FEATURE_SHM, HelloOk, LEASE_FLAG_SHM, LeaseGrant, Msg};
use farpool_core::{Credential, Epoch, ErrorKind, RemoteAddr, SlabGrant, Token, Transport};
use farpool_cxl::{ShmClient, ShmOptions, ShmTransport};

/// A control connection plus the server's handshake reply.
fn control(addr: SocketAddr) -> (Raw, HelloOk) {
    let mut r = Raw::connect_bare(addr);
    let hello = client_handshake(&mut r.stream, &mut r.reader, "shm-test", STEP).unwrap();
    r.stream.set_read_timeout(Some(STEP)).unwrap();
    (r, hello)
}

fn shm_lease(ctl: &mut Raw, n: u32) -> LeaseGrant {
    let req = ctl.req();
    match ctl.call(Msg::LeaseRequest { req, slabs: n, flags: LEASE_FLAG_SHM }) {
        Msg::LeaseGranted(g) => g,
        other => panic!("expected an shm lease, got {other:?}"),
    }
}

fn endpoint(hello: &HelloOk, grants: &[SlabGrant]) -> ShmTransport {
    let mut c = ShmClient::connect(hello.shm_path.as_ref(), STEP).unwrap();
    let mut t = ShmTransport::new(ShmOptions::default());
    for g in grants {
        t.insert(c.attach(g).unwrap());
    }
    t
}

#[test]
fn the_server_offers_shm_and_refuses_it_when_disabled() {
    let server = start(config());
    let (mut ctl, hello) = control(server.local_addr());
    assert_ne!(hello.features & FEATURE_SHM, 0);
    assert!(std::path::Path::new(&hello.shm_path).exists(), "{}", hello.shm_path);
    assert!(hello.shm_path.ends_with(&format!("farpool-{}.sock", server.local_addr().port())));
    assert_eq!(shm_lease(&mut ctl, 2).grants.len(), 2);

    let off = start(config().with_shm(false));
    let (mut ctl, hello) = control(off.local_addr());
    assert_eq!((hello.features & FEATURE_SHM, hello.shm_path.as_str()), (0, ""));
    let req = ctl.req();
    let r = ctl.call(Msg::LeaseRequest { req, slabs: 1, flags: LEASE_FLAG_SHM });
    assert!(matches!(r, Msg::ErrorReply { kind: ErrorKind::Unsupported, .. }), "{r:?}");
}

#[test]
fn shm_and_tcp_reach_the_same_grant_memory() {
    let server = start(config());
    let (mut ctl, hello) = control(server.local_addr());
    let lease = shm_lease(&mut ctl, 1);
    let g = lease.grants[0];
    let mut shm = endpoint(&hello, &[g]);
    let mut tcp = transport(server.local_addr());
    shm.write(RemoteAddr::in_grant(&g, 100), b"written over shm").unwrap();
    let mut back = [0u8; 16];
    tcp.read(RemoteAddr::in_grant(&g, 100), &mut back).unwrap();
    assert_eq!(&back, b"written over shm");
    tcp.write(RemoteAddr::in_grant(&g, 4096), b"written over tcp").unwrap();
    shm.read(RemoteAddr::in_grant(&g, 4096), &mut back).unwrap();
    assert_eq!(&back, b"written over tcp");
    assert_eq!(tcp.fetch_add(RemoteAddr::in_grant(&g, 8192), 5).unwrap(), 0);
    assert_eq!(shm.fetch_add(RemoteAddr::in_grant(&g, 8192), 1).unwrap(), 5);
    assert_eq!(tcp.compare_swap(RemoteAddr::in_grant(&g, 8192), 6, 9).unwrap(), 6);
    assert_eq!(shm.compare_swap(RemoteAddr::in_grant(&g, 8192), 9, 1).unwrap(), 9);
}

#[test]
fn bounds_forged_tokens_stale_epochs_and_unaligned_atomics_are_refused() {
    let server = start(config());
    let (mut ctl, hello) = control(server.local_addr());
    let g = shm_lease(&mut ctl, 1).grants[0];
    let tcp_only = ctl.lease(1).grants[0];
    let mut c = ShmClient::connect(hello.shm_path.as_ref(), STEP).unwrap();
    let forged = SlabGrant { cred: Credential { token: Token(g.cred.token.0 ^ 1), ..g.cred }, ..g };
    assert_eq!(c.attach(&forged).unwrap_err().kind(), ErrorKind::Unauthorized);
    let stale = SlabGrant { cred: Credential { epoch: Epoch(g.cred.epoch.0 + 1), ..g.cred }, ..g };
    assert_eq!(c.attach(&stale).unwrap_err().kind(), ErrorKind::Revoked);
    assert!(c.attach(&tcp_only).is_err(), "a TCP lease has no memfd to hand out");
    let mut t = ShmTransport::new(ShmOptions::default());
    t.insert(c.attach(&g).unwrap());
    let mut buf = [0u8; 64];
    let end = RemoteAddr::in_grant(&g, g.len - 32);
    assert_eq!(t.read(end, &mut buf).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(t.write(RemoteAddr::in_grant(&g, u64::MAX - 1), b"xy").unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(t.fetch_add(RemoteAddr::in_grant(&g, 3), 1).unwrap_err().kind(), ErrorKind::Unaligned);
    assert_eq!(t.compare_swap(RemoteAddr::in_grant(&g, 12), 0, 1).unwrap_err().kind(), ErrorKind::Unaligned);
    assert_eq!(t.read(RemoteAddr::in_grant(&forged, 0), &mut buf).unwrap_err().kind(), ErrorKind::Unauthorized);
    assert_eq!(t.read(RemoteAddr::in_grant(&tcp_only, 0), &mut buf).unwrap_err().kind(), ErrorKind::Revoked);
    t.read(RemoteAddr::in_grant(&g, g.len - 64), &mut buf).unwrap();
    witness(server.local_addr(), RemoteAddr::in_grant(&tcp_only, 0));
}

#[test]
fn atomics_from_several_threads_sum_exactly() {
    let server = start(config());
    let (mut ctl, hello) = control(server.local_addr());
    let g = shm_lease(&mut ctl, 1).grants[0];
    let (counter, lock) = (RemoteAddr::in_grant(&g, 64), RemoteAddr::in_grant(&g, 128));
    const THREADS: u64 = 4;
    const OPS: u64 = 5_000;
    let swaps: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|_| {
                let hello = hello.clone();
                s.spawn(move || {
                    // Each thread maps the grant through its own socket connection.
                    let mut t = endpoint(&hello, &[g]);
                    let mut swaps = 0;
                    for _ in 0..OPS {
                        t.fetch_add(counter, 3).unwrap();
                        let cur = t.fetch_add(lock, 0).unwrap();
                        if t.compare_swap(lock, cur, cur + 1).unwrap() == cur {
                            swaps += 1;
                        }
                    }
                    swaps
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let mut t = transport(server.local_addr());
    assert_eq!(t.fetch_add(counter, 0).unwrap(), THREADS * OPS * 3);
    assert_eq!(t.fetch_add(lock, 0).unwrap(), swaps, "every successful CAS incremented exactly once");
    assert!(swaps > 0);
}

#[test]
fn garbage_on_the_shm_socket_does_not_stop_the_server() {
    use std::io::{Read, Write};
    let server = start(config());
    let (mut ctl, hello) = control(server.local_addr());
    let mut raw = std::os::unix::net::UnixStream::connect(&hello.shm_path).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(&[0xFF; farpool_cxl::shm::REQ_LEN]).unwrap();
    let mut rep = [0u8; farpool_cxl::shm::REP_LEN];
    raw.read_exact(&mut rep).unwrap();
    assert_eq!(rep[4], ErrorKind::Protocol.code());
    let g = shm_lease(&mut ctl, 1).grants[0];
    let mut t = endpoint(&hello, &[g]);
    t.write(RemoteAddr::in_grant(&g, 0), b"still serving").unwrap();
    assert_eq!(wire::VERSION, hello.version);
}
