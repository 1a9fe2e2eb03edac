//! In-process tests of the shm transport: registry + Unix-socket server + client + transport.

use std::sync::Arc;
use std::time::Duration;

use farpool_core::{Credential, Epoch, ErrorKind, LeaseId, RemoteAddr, SlabGrant, SlabId, Token, Transport};

use super::*;
use crate::coherence::Coherence;

const SLAB: u64 = 1 << 20;

struct Fixture {
    grants: Arc<ShmGrants>,
    server: ShmServer,
    _dir: crate::topology::tests::TempDir,
}

fn fixture() -> Fixture {
    let dir = crate::topology::tests::TempDir::new("shm");
    let grants = ShmGrants::new(GrantMemory::Memfd);
    let server = ShmServer::bind(&dir.0.join("s.sock"), grants.clone(), ShmServerOptions::default()).unwrap();
    Fixture { grants, server, _dir: dir }
}

fn grant(f: &Fixture, lease: u64, slab: u32, epoch: u64, token: u64) -> SlabGrant {
    f.grants.create(LeaseId(lease), SlabId(slab), Epoch(epoch), Token(token), SLAB).unwrap();
    let cred = Credential { lease: LeaseId(lease), epoch: Epoch(epoch), token: Token(token), rkey: 0, base_addr: 0 };
    SlabGrant { slab: SlabId(slab), len: SLAB, cred }
}

fn client(f: &Fixture) -> ShmClient {
    ShmClient::connect(f.server.path(), Duration::from_secs(5)).unwrap()
}

fn endpoint(maps: &[ShmMapping], c: Coherence) -> ShmTransport {
    let mut t = ShmTransport::new(ShmOptions::default().with_coherence(c));
    maps.iter().for_each(|m| t.insert(m.clone()));
    t
}

#[test]
fn ops_round_trip_and_server_sees_client_writes() {
    let f = fixture();
    let g = grant(&f, 1, 0, 1, 42);
    let m = client(&f).attach(&g).unwrap();
    for c in [Coherence::Coherent, Coherence::Flush] {
        let mut t = endpoint(std::slice::from_ref(&m), c);
        let a = RemoteAddr::in_grant(&g, 4096 + 3);
        t.write(a, b"far memory").unwrap();
        let mut back = [0u8; 10];
        t.read(a, &mut back).unwrap();
        assert_eq!(&back, b"far memory");
        let server_side = f.grants.region(LeaseId(1), SlabId(0)).unwrap();
        server_side.read_at(4096 + 3, &mut back).unwrap();
        assert_eq!(&back, b"far memory", "server region and client mapping are the same memory");
        let w = RemoteAddr::in_grant(&g, 64);
        let base = t.fetch_add(w, 5).unwrap();
        assert_eq!(t.compare_swap(w, base + 5, 100).unwrap(), base + 5);
        assert_eq!(t.compare_swap(w, 1, 2).unwrap(), 100, "failed CAS returns the current value");
        t.write(w, &0u64.to_le_bytes()).unwrap();
    }
}

#[test]
fn bounds_tokens_epochs_and_alignment_are_checked() {
    let f = fixture();
    let g = grant(&f, 2, 1, 7, 99);
    let mut cl = client(&f);
    let forged = SlabGrant { cred: Credential { token: Token(98), ..g.cred }, ..g };
    assert_eq!(cl.attach(&forged).unwrap_err().kind(), ErrorKind::Unauthorized);
    let stale = SlabGrant { cred: Credential { epoch: Epoch(6), ..g.cred }, ..g };
    assert_eq!(cl.attach(&stale).unwrap_err().kind(), ErrorKind::Revoked);
    let other = SlabGrant { slab: SlabId(5), ..g };
    assert_eq!(cl.attach(&other).unwrap_err().kind(), ErrorKind::Revoked);
    let m = cl.attach(&g).unwrap();
    let mut t = endpoint(&[m], Coherence::Coherent);
    let mut buf = [0u8; 16];
    assert_eq!(t.read(RemoteAddr::in_grant(&g, SLAB - 8), &mut buf).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(t.write(RemoteAddr::in_grant(&g, u64::MAX), b"x").unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(t.fetch_add(RemoteAddr::in_grant(&g, 12), 1).unwrap_err().kind(), ErrorKind::Unaligned);
    assert_eq!(t.fetch_add(RemoteAddr::in_grant(&forged, 16), 1).unwrap_err().kind(), ErrorKind::Unauthorized);
    assert_eq!(t.read(RemoteAddr::in_grant(&stale, 0), &mut buf).unwrap_err().kind(), ErrorKind::Revoked);
    assert_eq!(t.read(RemoteAddr::in_grant(&other, 0), &mut buf).unwrap_err().kind(), ErrorKind::Revoked);
    t.read(RemoteAddr::in_grant(&g, SLAB - 16), &mut buf).unwrap();
}

#[test]
fn posted_batches_complete_once_each_within_the_bound() {
    let f = fixture();
    let g = grant(&f, 3, 0, 1, 5);
    let m = client(&f).attach(&g).unwrap();
    let mut t = ShmTransport::new(ShmOptions::default().with_inflight_max(4));
    t.insert(m);
    let mut batch: Vec<_> = (0..10u64)
        .map(|i| farpool_core::WorkRequest {
            wr_id: i,
            addr: RemoteAddr::in_grant(&g, i * 8 + if i == 3 { 1 } else { 0 }),
            op: farpool_core::OpKind::FetchAdd { add: 1 },
        })
        .collect();
    assert_eq!(t.post(&mut batch).unwrap(), 4);
    assert_eq!((t.inflight(), batch.len()), (4, 6));
    assert_eq!(t.post(&mut batch).unwrap(), 0, "window full");
    let mut out = Vec::new();
    assert_eq!(t.poll(&mut out, 100, Duration::ZERO).unwrap(), 4);
    let done = t.execute(batch).unwrap();
    out.extend(done);
    let mut ids: Vec<u64> = out.iter().map(|c| c.wr_id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..10).collect::<Vec<_>>());
    let bad = out.iter().find(|c| c.wr_id == 3).unwrap();
    assert_eq!(bad.result.as_ref().unwrap_err().kind(), ErrorKind::Unaligned);
}

#[test]
fn atomics_from_several_threads_sum_exactly() {
    let f = fixture();
    let g = grant(&f, 4, 0, 1, 11);
    let m = client(&f).attach(&g).unwrap();
    let (threads, per) = (4u64, 5_000u64);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let m = m.clone();
            s.spawn(move || {
                let mut t = endpoint(&[m], Coherence::Coherent);
                for _ in 0..per {
                    t.fetch_add(RemoteAddr::in_grant(&g, 0), 1).unwrap();
                    loop {
                        let cur = t.fetch_add(RemoteAddr::in_grant(&g, 8), 0).unwrap();
                        if t.compare_swap(RemoteAddr::in_grant(&g, 8), cur, cur + 2).unwrap() == cur {
                            break;
                        }
                    }
                }
            });
        }
    });
    let r = m.region();
    assert_eq!(r.load_u64(0).unwrap(), threads * per);
    assert_eq!(r.load_u64(8).unwrap(), threads * per * 2);
}

#[test]
fn revoked_mapping_reads_zeros_even_after_the_slab_is_regranted() {
    let f = fixture();
    let g = grant(&f, 5, 2, 1, 1234);
    let m = client(&f).attach(&g).unwrap();
    let mut t = endpoint(std::slice::from_ref(&m), Coherence::Coherent);
    t.write(RemoteAddr::in_grant(&g, 0), &[0xAA; 8192]).unwrap();
    assert!(f.grants.revoke(LeaseId(5), SlabId(2)));
    assert!(!f.grants.revoke(LeaseId(5), SlabId(2)), "revoke is idempotent");
    // The same slab, re-granted to another tenant who writes a secret.
    let g2 = grant(&f, 6, 2, 2, 777);
    let m2 = client(&f).attach(&g2).unwrap();
    let mut t2 = endpoint(&[m2], Coherence::Coherent);
    t2.write(RemoteAddr::in_grant(&g2, 0), &[0x5E; 8192]).unwrap();
    let mut old = vec![1u8; 8192];
    t.read(RemoteAddr::in_grant(&g, 0), &mut old).unwrap();
    assert!(old.iter().all(|&b| b == 0), "a revoked mapping must read zeros, never the new tenant's bytes");
    // The old credential can no longer attach.
    assert_eq!(client(&f).attach(&g).unwrap_err().kind(), ErrorKind::Revoked);
    assert_eq!(f.grants.revoke_lease(LeaseId(6)), 1);
    assert!(f.grants.is_empty());
}

#[test]
fn garbage_requests_are_refused_and_the_server_keeps_serving() {
    use std::io::{Read, Write};
    let f = fixture();
    let mut raw = std::os::unix::net::UnixStream::connect(f.server.path()).unwrap();
    raw.write_all(&[0x55; REQ_LEN]).unwrap();
    let mut rep = [0u8; REP_LEN];
    raw.read_exact(&mut rep).unwrap();
    assert_eq!(rep[4], ErrorKind::Protocol.code());
    let g = grant(&f, 8, 0, 1, 3);
    client(&f).attach(&g).unwrap();
}

#[test]
fn connections_beyond_the_bound_are_refused() {
    let dir = crate::topology::tests::TempDir::new("shm-bound");
    let grants = ShmGrants::new(GrantMemory::Memfd);
    let opts = ShmServerOptions { max_conns: 1, ..ShmServerOptions::default() };
    let server = ShmServer::bind(&dir.0.join("s.sock"), grants.clone(), opts).unwrap();
    grants.create(LeaseId(1), SlabId(0), Epoch(1), Token(1), SLAB).unwrap();
    let g = SlabGrant {
        slab: SlabId(0),
        len: SLAB,
        cred: Credential { lease: LeaseId(1), epoch: Epoch(1), token: Token(1), rkey: 0, base_addr: 0 },
    };
    let mut first = ShmClient::connect(server.path(), Duration::from_secs(5)).unwrap();
    first.attach(&g).unwrap();
    let mut second = ShmClient::connect(server.path(), Duration::from_secs(5)).unwrap();
    assert_eq!(second.attach(&g).unwrap_err().kind(), ErrorKind::NoSpace);
    drop(first);
    // The slot frees once the first connection's thread notices the close (bounded wait).
    let ok = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        ShmClient::connect(server.path(), Duration::from_secs(5)).and_then(|mut c| c.attach(&g)).is_ok()
    });
    assert!(ok, "a freed connection slot is reused");
}

#[test]
fn bind_refuses_a_live_socket_and_a_regular_file() {
    let f = fixture();
    let g = ShmGrants::new(GrantMemory::Memfd);
    let e = ShmServer::bind(f.server.path(), g.clone(), ShmServerOptions::default()).unwrap_err();
    assert_eq!(e.kind(), farpool_core::ErrorKind::Config);
    let file = f._dir.0.join("plain");
    std::fs::write(&file, b"x").unwrap();
    assert!(ShmServer::bind(&file, g, ShmServerOptions::default()).is_err());
    assert!(default_socket_path(7000).to_string_lossy().ends_with("farpool-7000.sock"));
}

#[test]
fn dropping_the_server_closes_connections_and_removes_the_socket() {
    let f = fixture();
    let g = grant(&f, 9, 0, 1, 4);
    let mut c = client(&f);
    let m = c.attach(&g).unwrap();
    let path = f.server.path().to_owned();
    let Fixture { grants, server, _dir } = f;
    drop(server);
    assert!(!path.exists(), "socket file removed");
    assert!(c.attach(&g).is_err(), "an open connection is shut down");
    // The mapping itself stays valid: it is the client's until the grant is revoked.
    m.region().write_at(0, b"ok").unwrap();
    assert!(grants.revoke(LeaseId(9), SlabId(0)));
}
