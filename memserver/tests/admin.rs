//! Admin commands: shrink, drain and grow over the protocol and through the CLI.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use farpool_core::wire::{AdminCmd, Msg};
use farpool_core::{ErrorKind, RemoteAddr, SlabId, Transport};
use farpool_memserver::{ServerStats, admin_request};

fn admin(addr: std::net::SocketAddr, cmd: AdminCmd) -> farpool_memserver::AdminOutcome {
    admin_request(addr, cmd, STEP).expect("admin command succeeds")
}

#[test]
fn shrink_notifies_then_revokes_after_the_grace() {
    let server = start(config().with_capacity_bytes(8 << 20));
    let mut ctl = Raw::connect(server.local_addr());
    let g = ctl.lease(6);
    let mut t = transport(server.local_addr());
    let sent = Instant::now();
    let out = admin(server.local_addr(), AdminCmd::Shrink { slabs: 4, grace_ms: 400 });
    assert!(out.text.contains("2 free slabs removed now"), "{}", out.text);
    assert_eq!(ServerStats::lookup(&out.stats, "slabs_retiring"), Some(2));
    let (notice_slabs, grace) = match ctl.recv() {
        Msg::RevokeNotice { lease, slabs, grace_ms } => {
            assert_eq!(lease, g.lease);
            (slabs, grace_ms)
        }
        other => panic!("expected RevokeNotice, got {other:?}"),
    };
    assert!(sent.elapsed() < Duration::from_millis(400), "the notice arrives before the deadline");
    assert_eq!((notice_slabs.len(), grace), (2, 400));
    let grant_of = |s: SlabId| *g.grants.iter().find(|x| x.slab == s).unwrap();
    let doomed = RemoteAddr::in_grant(&grant_of(notice_slabs[0]), 0);
    t.write(doomed, b"still mine").unwrap();
    match ctl.recv() {
        Msg::Revoked { lease, slabs } => {
            assert_eq!(lease, g.lease);
            assert_eq!(slabs.len(), 2);
            assert!(sent.elapsed() >= Duration::from_millis(400), "not revoked before the deadline");
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
    let mut buf = [0u8; 8];
    assert_eq!(err_kind(t.read(doomed, &mut buf)), ErrorKind::Revoked);
    let kept = g.grants.iter().find(|x| !notice_slabs.contains(&x.slab)).unwrap();
    t.write(RemoteAddr::in_grant(kept, 0), b"kept").unwrap();
    let s = server.stats();
    assert_eq!((s.slabs_total, s.slabs_removed, s.slabs_granted, s.slabs_free, s.slabs_revoked), (4, 4, 4, 0, 2));
    let e = admin_request(server.local_addr(), AdminCmd::Shrink { slabs: 5, grace_ms: 0 }, STEP).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
}

#[test]
fn drain_stops_granting_and_revokes_everything() {
    let server = start(config().with_capacity_bytes(4 << 20));
    let mut ctl = Raw::connect(server.local_addr());
    let g = ctl.lease(2);
    let at = RemoteAddr::in_grant(&g.grants[0], 0);
    let mut t = transport(server.local_addr());
    let out = admin(server.local_addr(), AdminCmd::Drain { grace_ms: 200 });
    assert!(out.text.contains("draining"), "{}", out.text);
    assert!(matches!(ctl.recv(), Msg::RevokeNotice { grace_ms: 200, .. }));
    let req = ctl.req();
    match ctl.call(Msg::LeaseRequest { req, slabs: 1, flags: 0 }) {
        Msg::ErrorReply { kind: ErrorKind::NoSpace, message, .. } => assert!(message.contains("draining")),
        other => panic!("{other:?}"),
    }
    t.fetch_add(at, 1).unwrap();
    assert!(matches!(ctl.recv(), Msg::Revoked { .. }));
    assert_eq!(err_kind(t.fetch_add(at, 1)), ErrorKind::Revoked);
    let s = server.stats();
    assert_eq!((s.slabs_total, s.leases_active, s.draining), (0, 0, true));
}

#[test]
fn grow_adds_a_region_of_usable_slabs() {
    let server = start(config().with_capacity_bytes(2 << 20));
    let out = admin(server.local_addr(), AdminCmd::Grow { bytes: (3 << 20) + 5 });
    assert!(out.text.contains("grew by 3 slabs"), "{}", out.text);
    assert_eq!(ServerStats::lookup(&out.stats, "slabs_total"), Some(5));
    let mut ctl = Raw::connect(server.local_addr());
    let g = ctl.lease(5);
    let mut t = transport(server.local_addr());
    for (i, gr) in g.grants.iter().enumerate() {
        let at = RemoteAddr::in_grant(gr, (1 << 20) - 8);
        t.write(at, &(i as u64).to_le_bytes()).unwrap();
        assert_eq!(t.fetch_add(at, 0).unwrap(), i as u64);
    }
    let e = admin_request(server.local_addr(), AdminCmd::Grow { bytes: 1000 }, STEP).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
}

#[test]
fn admin_cli_prints_results() {
    let server = start(config());
    let addr = server.local_addr().to_string();
    let bin = env!("CARGO_BIN_EXE_farpool-memserver");
    let run = |args: &[&str]| {
        let o = Command::new(bin).args(["admin", "--server", &addr]).args(args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&["stats"]);
    assert!(ok, "{err}");
    assert!(out.contains("slabs_total") && out.contains("16"), "{out}");
    let (ok, out, _) = run(&["grow", "2MiB"]);
    assert!(ok && out.contains("grew by 2 slabs"), "{out}");
    let (ok, out, _) = run(&["shrink", "3", "--grace", "0"]);
    assert!(ok && out.contains("3 free slabs removed"), "{out}");
    assert_eq!(server.stats().slabs_total, 15);
    let (ok, _, err) = run(&["shrink", "100"]);
    assert!(!ok && err.contains("cannot shrink"), "{err}");
}
