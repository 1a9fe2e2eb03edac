//! Revocation over shared memory against a real memory server: a mapping that outlives its lease reads
//! zeros, never the next tenant's bytes; a client process killed while holding mappings is reclaimed
//! on lease expiry and the server keeps serving.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use farpool_core::tcp::client_handshake;
use farpool_core::wire::{HelloOk, LEASE_FLAG_SHM, LeaseGrant, Msg};
use farpool_core::{RemoteAddr, SlabGrant, Transport};
use farpool_cxl::{ShmClient, ShmMapping, ShmOptions, ShmTransport};

fn control(addr: SocketAddr) -> (Raw, HelloOk) {
    let mut r = Raw::connect_bare(addr);
    let hello = client_handshake(&mut r.stream, &mut r.reader, "shm-test", STEP).unwrap();
    r.stream.set_read_timeout(Some(STEP)).unwrap();
    (r, hello)
}

fn shm_lease(ctl: &mut Raw) -> LeaseGrant {
    let req = ctl.req();
    match ctl.call(Msg::LeaseRequest { req, slabs: 1, flags: LEASE_FLAG_SHM }) {
        Msg::LeaseGranted(g) => g,
        other => panic!("expected an shm lease, got {other:?}"),
    }
}

fn map(hello: &HelloOk, g: &SlabGrant) -> ShmMapping {
    ShmClient::connect(hello.shm_path.as_ref(), STEP).unwrap().attach(g).unwrap()
}

fn all_zero(m: &ShmMapping, len: usize) -> bool {
    let mut buf = vec![0xEEu8; len];
    m.region().read_at(0, &mut buf).unwrap();
    buf.iter().all(|&b| b == 0)
}

/// One slab of 1 MiB: every new lease necessarily gets the slab the previous tenant had.
fn one_slab() -> farpool_memserver::ServerConfig {
    config().with_capacity_bytes(1 << 20)
}

#[test]
fn a_released_mapping_reads_zeros_not_the_next_tenants_data() {
    let server = start(one_slab());
    let (mut ctl, hello) = control(server.local_addr());
    let a = shm_lease(&mut ctl);
    let old = map(&hello, &a.grants[0]);
    old.region().write_at(0, &[0xA1; 8192]).unwrap();
    let req = ctl.req();
    assert!(matches!(ctl.call(Msg::Release { req, lease: a.lease, secret: a.secret }), Msg::Ack { .. }));
    assert!(all_zero(&old, 8192), "revoke punched the grant's pages out");

    // The same slab, re-granted over shm to another tenant who writes a secret.
    let (mut ctl2, hello2) = control(server.local_addr());
    let b = shm_lease(&mut ctl2);
    assert_eq!(b.grants[0].slab, a.grants[0].slab, "one slab: the re-grant reuses it");
    let mut t = ShmTransport::new(ShmOptions::default());
    t.insert(map(&hello2, &b.grants[0]));
    t.write(RemoteAddr::in_grant(&b.grants[0], 0), &[0x5E; 8192]).unwrap();
    assert!(all_zero(&old, 8192), "the old mapping must not see the new tenant's bytes");
    let mut fresh = vec![0u8; 8192];
    t.read(RemoteAddr::in_grant(&b.grants[0], 0), &mut fresh).unwrap();
    assert!(fresh.iter().all(|&x| x == 0x5E));
    // The old credential cannot attach any more.
    assert!(ShmClient::connect(hello.shm_path.as_ref(), STEP).unwrap().attach(&a.grants[0]).is_err());

    // And re-granted over TCP (the pool region): still zeros through the old mapping.
    let req = ctl2.req();
    assert!(matches!(ctl2.call(Msg::Release { req, lease: b.lease, secret: b.secret }), Msg::Ack { .. }));
    let c = ctl2.lease(1);
    transport(server.local_addr()).write(RemoteAddr::in_grant(&c.grants[0], 0), &[0x77; 8192]).unwrap();
    assert!(all_zero(&old, 8192));
}

#[test]
fn an_expired_lease_leaves_a_mapping_of_zeros() {
    let server = start(one_slab().with_lease_ms(200));
    let (mut ctl, hello) = control(server.local_addr());
    let a = shm_lease(&mut ctl);
    let old = map(&hello, &a.grants[0]);
    old.region().write_at(0, b"soon gone").unwrap();
    assert!(eventually(Duration::from_secs(5), || server.stats().leases_active == 0), "lease expires");
    assert!(all_zero(&old, 4096));
    let b = shm_lease(&mut ctl);
    assert_eq!(b.grants[0].slab, a.grants[0].slab);
}

/// Not a test on its own: the child process of `a_killed_client_is_reclaimed_and_the_server_serves_on`.
/// It leases one slab over shm, maps it, writes, prints `HOLDING`, and sleeps until killed (at most 60 s).
#[test]
#[ignore = "helper process spawned by a_killed_client_is_reclaimed_and_the_server_serves_on"]
fn shm_holder_child() {
    let addr: SocketAddr = std::env::var("FARPOOL_SHM_HOLD_ADDR").expect("run by the parent test").parse().unwrap();
    let (mut ctl, hello) = control(addr);
    let g = shm_lease(&mut ctl);
    let m = map(&hello, &g.grants[0]);
    m.region().write_at(0, &[0xC4; 4096]).unwrap();
    println!("HOLDING {}", g.grants[0].slab);
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_killed_client_is_reclaimed_and_the_server_serves_on() {
    let server = start(one_slab().with_lease_ms(300));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["shm_holder_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("FARPOOL_SHM_HOLD_ADDR", server.local_addr().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let holding = lines.by_ref().take(50).map_while(Result::ok).find(|l| l.contains("HOLDING"));
    assert!(holding.is_some(), "child never mapped its grant");
    assert_eq!(server.stats().leases_active, 1);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || server.stats().leases_active == 0),
        "the dead client's lease expires"
    );
    let (mut ctl, hello) = control(server.local_addr());
    let g = shm_lease(&mut ctl);
    let m = map(&hello, &g.grants[0]);
    assert!(all_zero(&m, 4096), "the next tenant starts from zeros");
    let mut t = ShmTransport::new(ShmOptions::default());
    t.insert(m);
    t.write(RemoteAddr::in_grant(&g.grants[0], 0), b"serving").unwrap();
    witness(server.local_addr(), RemoteAddr::in_grant(&g.grants[0], 4096));
}
