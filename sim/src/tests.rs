//! Unit tests of the simulated cluster and its endpoints: the server-side checks a real server makes,
//! and the endpoint's contract (every op completes once, reordered, seeded).

use std::time::Duration;

use bytes::Bytes;
use farpool::tier::{BackendEvent, FarBackend, FarSlab};
use farpool_core::{Completion, ErrorKind, OpKind, OpOutput, RemoteAddr, Transport, WorkRequest};

use crate::cluster::{ClusterConfig, SimCluster};
use crate::faults::SimFaults;

fn cluster(faults: SimFaults) -> SimCluster {
    SimCluster::new(ClusterConfig::new(2, 4, 4096), faults, 11)
}

fn write(id: u64, slab: &FarSlab, offset: u64, byte: u8) -> WorkRequest {
    let addr = RemoteAddr::in_grant(&slab.grant, offset);
    WorkRequest { wr_id: id, addr, op: OpKind::Write { data: Bytes::from(vec![byte; 64]) } }
}

fn read(id: u64, slab: &FarSlab, offset: u64) -> WorkRequest {
    WorkRequest { wr_id: id, addr: RemoteAddr::in_grant(&slab.grant, offset), op: OpKind::Read { len: 64 } }
}

fn one(c: &SimCluster, slab: &FarSlab, wr: WorkRequest) -> farpool_core::Result<OpOutput> {
    let mut ep = c.endpoint(slab.server)?;
    ep.run_one(wr)
}

#[test]
fn grants_are_checked_zeroed_and_revocable() {
    let c = cluster(SimFaults::calm());
    let got = c.lease(3).unwrap();
    assert_eq!(got.len(), 3);
    assert_ne!(got[0].server, got[1].server, "grants spread over servers");
    let s = got[0];
    one(&c, &s, write(1, &s, 0, 0xAB)).unwrap();
    assert_eq!(one(&c, &s, read(2, &s, 0)).unwrap(), OpOutput::Read(Bytes::from(vec![0xAB; 64])));
    assert_eq!(one(&c, &s, read(3, &s, 4096 - 32)).unwrap_err().kind(), ErrorKind::OutOfRange);
    let mut forged = s;
    forged.grant.cred.token.0 ^= 1;
    assert_eq!(one(&c, &s, read(4, &forged, 0)).unwrap_err().kind(), ErrorKind::Unauthorized);
    // Release, then a new grant of the same slab: new epoch, zeroed memory, old credential refused.
    c.release(&s).unwrap();
    assert_eq!(c.release(&s).unwrap_err().kind(), ErrorKind::Revoked, "released twice");
    let again = c.lease(4).unwrap().into_iter().find(|g| g.server == s.server && g.grant.slab == s.grant.slab);
    let again = again.expect("the slab is granted again");
    assert!(again.grant.cred.epoch > s.grant.cred.epoch);
    assert_eq!(one(&c, &again, read(5, &again, 0)).unwrap(), OpOutput::Read(Bytes::from(vec![0; 64])));
    assert_eq!(one(&c, &s, read(6, &s, 0)).unwrap_err().kind(), ErrorKind::Revoked, "stale epoch");
}

#[test]
fn notices_revokes_crashes_and_restarts() {
    let c = cluster(SimFaults::calm());
    let events = c.events();
    let got = c.lease(8).unwrap();
    let slot0 = c.server_ids()[0];
    let mine: Vec<_> = got.iter().filter(|g| g.server == slot0).copied().collect();
    let (server, slabs) = c.shrink(0, 1, Duration::from_millis(5)).unwrap();
    assert_eq!((server, slabs.len()), (slot0, 1), "shrink takes a granted slab first");
    let gone = mine.iter().find(|g| g.grant.slab == slabs[0].slab).unwrap();
    assert_eq!(slabs, vec![gone.grant_ref()], "the notice names the grant (slab and lease)");
    let ev = events.try_recv().unwrap();
    assert!(matches!(ev, BackendEvent::RevokeNotice { ref grants, .. } if *grants == slabs), "{ev:?}");
    assert_eq!(c.revoke(server, &slabs), 1);
    assert_eq!(events.try_recv().unwrap(), BackendEvent::Revoked { server, grants: slabs.clone() });
    assert_eq!(one(&c, gone, read(1, gone, 0)).unwrap_err().kind(), ErrorKind::Revoked);
    assert_eq!(c.grow(0, 1), 0, "a slab revoked from a tenant is not granted again (by default)");
    assert_eq!(c.crash(0, true), Some(slot0));
    assert_eq!(events.try_recv().unwrap(), BackendEvent::ServerDown { server: slot0 });
    assert_eq!(c.endpoint(slot0).err().map(|e| e.kind()), Some(ErrorKind::Unreachable));
    assert_eq!(c.granted_bytes_alive(), 4 * 4096, "the other server's grants only");
    let new = c.restart(0).unwrap();
    assert_ne!(new, slot0, "a restarted server has a new id");
    assert_eq!(c.restart(0), None, "running");
    assert!(c.lease(4).unwrap().iter().all(|g| g.server == new), "only the new incarnation has room");
    assert_eq!(c.announce_down(), 0, "the crash was announced already");
}

#[test]
fn growth_regrants_revoked_slabs_only_when_asked() {
    let regrant = SimCluster::new(
        ClusterConfig { regrant_revoked: true, ..ClusterConfig::new(1, 2, 4096) },
        SimFaults::calm(),
        1,
    );
    let g = regrant.lease(1).unwrap()[0];
    let (sid, s) = regrant.shrink(0, 2, Duration::ZERO).unwrap();
    assert_eq!((sid, s.clone()), (g.server, vec![g.grant_ref()]), "only the granted one is noticed");
    assert_eq!(regrant.grow(0, 2), 1, "a slab still granted does not come back");
    assert_eq!(regrant.revoke(sid, &s), 1);
    assert_eq!(regrant.grow(0, 2), 1, "a revoked slab comes back with regrant_revoked");
    let again = regrant.lease(2).unwrap().into_iter().find(|n| n.grant.slab == g.grant.slab);
    let again = again.expect("the revoked slab id is granted again");
    assert_ne!(again.grant_ref(), g.grant_ref(), "under a new lease");
    assert_eq!(regrant.revoke(sid, &s), 0, "a second revoke of the old grant leaves the new one alone");
    one(&regrant, &again, write(1, &again, 0, 7)).unwrap();
}

fn drain_all(ep: &mut dyn Transport, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        if out.len() >= n {
            break;
        }
        ep.poll(&mut out, n, Duration::from_millis(50)).unwrap();
    }
    out
}

#[test]
fn every_op_completes_once_reordered_and_the_same_for_a_seed() {
    let faults = SimFaults {
        error_before: 0.1,
        error_after: 0.1,
        torn_write: 0.1,
        drop: 0.05,
        late_landing: 0.1,
        tail: 0.1,
        ..SimFaults::calm()
    };
    let run = || {
        let c = cluster(faults.clone());
        let s = c.lease(1).unwrap()[0];
        let mut ep = c.endpoint(s.server).unwrap();
        let mut batch: Vec<WorkRequest> = (0..60).map(|i| write(i, &s, i * 64, i as u8)).collect();
        let mut posted = 0;
        let mut done = Vec::new();
        while posted < 60 {
            posted += ep.post(&mut batch).unwrap();
            done.extend(drain_all(&mut *ep, 1));
        }
        done.extend(drain_all(&mut *ep, 60 - done.len()));
        assert_eq!(ep.inflight(), 0);
        let order: Vec<(u64, bool)> = done.iter().map(|c| (c.wr_id, c.result.is_ok())).collect();
        (order, c.stats())
    };
    let (order, stats) = run();
    let mut ids: Vec<u64> = order.iter().map(|x| x.0).collect();
    assert_ne!(ids, (0..60).collect::<Vec<_>>(), "completions must be reordered");
    ids.sort_unstable();
    assert_eq!(ids, (0..60).collect::<Vec<_>>(), "every op completes exactly once");
    let failed = order.iter().filter(|x| !x.1).count() as u64;
    assert_eq!(failed, stats.injected(), "each injected fault fails exactly its op: {stats:?}");
    assert!(stats.injected() > 0 && stats.tail_delays > 0, "{stats:?}");
    assert_eq!(run(), (order, stats), "same seed, same fates and order");
}

#[test]
fn a_dead_server_breaks_posts_and_in_flight_ops() {
    let c = cluster(SimFaults::calm());
    let s = c.lease(1).unwrap()[0];
    let mut ep = c.endpoint(s.server).unwrap();
    let mut batch = vec![read(1, &s, 0), read(2, &s, 64)];
    assert_eq!(ep.post(&mut batch).unwrap(), 2);
    let slot = c.server_ids().iter().position(|&id| id == s.server).unwrap();
    c.crash(slot, false);
    let done = drain_all(&mut *ep, 2);
    assert!(done.iter().all(|c| c.result.as_ref().unwrap_err().kind() == ErrorKind::Unreachable));
    assert_eq!(ep.post(&mut vec![read(3, &s, 0)]).unwrap_err().kind(), ErrorKind::Unreachable);
    assert_eq!(c.announce_down(), 1);
}
