//! Tests that need an RDMA device. They are `#[ignore]`d (nextest and `cargo test` count them as
//! skipped); run them where a device exists with `cargo test -p farpool-rdma --features rdma -- --ignored`.
//! Without a device they print `SKIPPED: no RDMA device (...)` and return. The qemu guest runs the same
//! scenarios through the `farpool-vm-rdma` binary (tests/vm/guest/40-rdma.sh).
#![cfg(feature = "rdma")]

use std::sync::Arc;

use farpool_core::ErrorKind;
use farpool_core::ids::{Credential, Epoch, LeaseId, SlabGrant, SlabId, Token};
use farpool_rdma::{Context, DeviceSelector, Endpoint, EndpointConfig, RdmaTransport, Remote, SlabMr};

fn device_or_skip() -> Option<Arc<Context>> {
    match Context::open(&DeviceSelector::new()) {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
            println!("SKIPPED: no RDMA device ({e})");
            None
        }
    }
}

/// A client endpoint and a passive server endpoint connected to each other in this process.
fn pair(ctx: &Arc<Context>) -> (Endpoint, Endpoint) {
    pair_with(ctx, EndpointConfig::new())
}

/// [`pair`] with the client's configuration.
fn pair_with(ctx: &Arc<Context>, cfg: EndpointConfig) -> (Endpoint, Endpoint) {
    let mut client = Endpoint::new(ctx, cfg).expect("client endpoint");
    let mut server = Endpoint::new(ctx, EndpointConfig::passive()).expect("server endpoint");
    let (ci, si) = (client.local_info().unwrap(), server.local_info().unwrap());
    server.connect(&ci).expect("server connect");
    client.connect(&si).expect("client connect");
    (client, server)
}

/// An `RdmaTransport` on a fresh pair (the peer endpoint is returned to keep it alive) that knows
/// `grant` (1 MiB) as slab 0 of lease 1, and that grant as the transport addresses it.
fn transport_over(ctx: &Arc<Context>, grant: &SlabMr) -> (RdmaTransport, SlabGrant, Endpoint) {
    let (c, s) = pair(ctx);
    let cred =
        Credential { lease: LeaseId(1), epoch: Epoch(1), token: Token(0), rkey: grant.rkey(), base_addr: grant.addr() };
    let g = SlabGrant { slab: SlabId(0), len: 1 << 20, cred };
    let mut t = RdmaTransport::new(c);
    t.add_grant(&g);
    (t, g, s)
}

#[test]
#[ignore = "needs an RDMA device; run in tests/vm"]
fn loopback_read_write_atomics_and_revoke() {
    let Some(ctx) = device_or_skip() else { return };
    let pool = ctx.register_pool_owned(vec![0u8; 1 << 20].into_boxed_slice()).unwrap();
    let grant = pool.grant(4096, 65536).unwrap();
    let (mut c, _s) = pair(&ctx);
    let (base, rkey) = (grant.addr(), grant.rkey());
    let at = |off: u64| Remote { addr: base + off, rkey };
    let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
    c.write(at(0), &data).unwrap();
    assert_eq!(&c.read(at(0), data.len() as u32).unwrap()[..], &data[..]);
    c.write(at(512), &41u64.to_le_bytes()).unwrap();
    assert_eq!(c.fetch_add(at(512), 1).unwrap(), 41);
    assert_eq!(c.compare_swap(at(512), 42, 7).unwrap(), 42);
    assert_eq!(c.compare_swap(at(512), 0, 0).unwrap(), 7);
    let e = c.fetch_add(at(4), 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unaligned, "{e}");
    grant.deregister();
    let e = c.read(at(0), 8).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Revoked, "{e}");
}

/// Staged READs of at least `lend_min_bytes` complete with the staging span itself (zero copy). A
/// caller that holds them, drops them out of order or on another thread must never see its bytes
/// change (no span is reused while lent), and holding more than the staging buffer must not stall
/// the endpoint (it retires the blocked buffer, then copies instead of lending).
#[test]
#[ignore = "needs an RDMA device; run in tests/vm"]
fn lent_reads_stay_intact_while_held_and_never_block() {
    let Some(ctx) = device_or_skip() else { return };
    let pool = ctx.register_pool_owned(vec![0u8; 1 << 20].into_boxed_slice()).unwrap();
    let grant = pool.grant(0, 1 << 20).unwrap();
    let (mut c, _s) = pair_with(&ctx, EndpointConfig::new().with_staging_bytes(64 << 10).with_inflight_max(8));
    let at = |off: u64| Remote { addr: grant.addr() + off, rkey: grant.rkey() };
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for off in (0..data.len()).step_by(32 << 10) {
        c.write(at(off as u64), &data[off..off + (32 << 10)]).unwrap();
    }
    // 96 reads of 8 KiB held at once: 768 KiB, 12x the staging buffer.
    let len = 8 << 10;
    let mut held = Vec::new();
    for i in 0..96usize {
        let off = (i * 7919 * 64) % (data.len() - len);
        let b = c.read(at(off as u64), len as u32).unwrap();
        assert_eq!(&b[..], &data[off..off + len], "read {i} at {off}");
        held.push((off, b));
    }
    for (i, (off, b)) in held.iter().enumerate() {
        assert_eq!(&b[..], &data[*off..*off + len], "held read {i} at {off} changed under the caller");
    }
    // Drop them out of order, half on another thread, then keep reading (small ones are copied).
    let odd: Vec<_> = held.iter().skip(1).step_by(2).cloned().collect();
    held = held.into_iter().step_by(2).collect();
    std::thread::spawn(move || drop(odd)).join().unwrap();
    while let Some((off, b)) = held.pop() {
        assert_eq!(&b[..], &data[off..off + len]);
    }
    for i in 0..64usize {
        let (off, n) = ((i * 4096) % (data.len() - 40_000), [8usize, 512, 4096, 40_000][i % 4]);
        assert_eq!(&c.read(at(off as u64), n as u32).unwrap()[..], &data[off..off + n], "read {i} after");
    }
}

/// The blocking calls run on the depth-1 path (`alone.rs`) when nothing else is in flight, and on the
/// general path otherwise; both give the same bytes. Checks the depth-1 path refuses to take are
/// answered by the general path with the precise error, and an error completion on the depth-1 path
/// breaks the endpoint exactly as on the general path.
#[test]
#[ignore = "needs an RDMA device; run in tests/vm"]
fn depth_one_path_matches_the_general_path_and_hands_over_errors() {
    use farpool_core::ids::RemoteAddr;
    use farpool_core::{OpKind, Transport, WorkRequest};
    use farpool_rdma::{Access, LocalBuffer, Op};
    use std::time::Duration;

    let Some(ctx) = device_or_skip() else { return };
    let pool = ctx.register_pool_owned(vec![0u8; 1 << 20].into_boxed_slice()).unwrap();
    let grant = pool.grant(0, 1 << 20).unwrap();
    let (mut c, _s) = pair(&ctx);
    let (base, rkey) = (grant.addr(), grant.rkey());
    let at = |off: u64| Remote { addr: base + off, rkey };
    let pattern =
        |n: usize, seed: u32| (0..n as u32).map(|i| (i.wrapping_mul(31).wrapping_add(seed)) as u8).collect::<Vec<u8>>();

    // Zero-copy and staged round trips of every size class (inline, staged, lent).
    let mut src = LocalBuffer::new(&ctx, 1 << 16, Access::LOCAL).unwrap();
    let mut dst = LocalBuffer::new(&ctx, 1 << 16, Access::LOCAL).unwrap();
    for (k, n) in [1usize, 8, 100, 4096, 1 << 16].into_iter().enumerate() {
        let data = pattern(n, k as u32);
        src.as_mut_slice()[..n].copy_from_slice(&data);
        c.write_from(&src, 0, n as u32, at(0)).unwrap();
        c.read_into(&mut dst, 0, n as u32, at(0)).unwrap();
        assert_eq!(&dst.as_slice()[..n], &data[..], "zero-copy round trip of {n} bytes");
        let data = pattern(n, 99 + k as u32);
        c.write(at(4096), &data).unwrap();
        assert_eq!(&c.read(at(4096), n as u32).unwrap()[..], &data[..], "staged round trip of {n} bytes");
    }
    assert_eq!(c.inflight(), 0);

    // With operations in flight, a blocking call takes the general path; everything still completes.
    let mut ops: Vec<Op> =
        (0..3).map(|i| Op { wr_id: 10 + i, remote: at(4096), kind: OpKind::Read { len: 8 } }).collect();
    assert_eq!(c.post_ops(&mut ops).unwrap(), 3);
    c.write(at(8192), b"general!").unwrap();
    assert_eq!(&c.read(at(8192), 8).unwrap()[..], b"general!");
    let mut done = Vec::new();
    while done.len() < 3 {
        assert!(c.poll_completions(&mut done, 3, Duration::from_secs(5)).unwrap() > 0, "async reads lost");
    }
    let mut ids: Vec<u64> = done.iter().map(|d| d.wr_id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [10, 11, 12]);
    assert!(done.iter().all(|d| d.result.is_ok()));

    // Refused locally (the depth-1 path declines, the general path answers): nothing breaks.
    let e = c.read_into(&mut dst, (1 << 16) - 4, 8, at(0)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
    let e = c.compare_swap(at(3), 0, 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unaligned, "{e}");
    assert_eq!(c.fetch_add(at(200_000), 5).unwrap(), 0);
    assert_eq!(c.compare_swap(at(200_000), 5, 9).unwrap(), 5);

    // The transport's blocking calls take the same path, with its grant checks first.
    let (mut t, g, _s2) = transport_over(&ctx, &grant);
    let data = pattern(3000, 5);
    t.write(RemoteAddr::in_grant(&g, 20_000), &data).unwrap();
    let mut back = vec![0u8; data.len()];
    t.read(RemoteAddr::in_grant(&g, 20_000), &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(t.fetch_add(RemoteAddr::in_grant(&g, 200_000), 1).unwrap(), 9);
    let e = t.read(RemoteAddr::in_grant(&g, (1 << 20) - 4), &mut [0u8; 8]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
    let out = t.run_one(WorkRequest { wr_id: 7, addr: RemoteAddr::in_grant(&g, 200_000), op: OpKind::Read { len: 8 } });
    assert_eq!(out.unwrap(), farpool_core::OpOutput::Read(bytes::Bytes::copy_from_slice(&10u64.to_le_bytes())));

    let data = pattern(40_000, 6);
    t.write(RemoteAddr::in_grant(&g, 300_000), &data).unwrap();
    let mut back = vec![0u8; data.len()];
    t.read(RemoteAddr::in_grant(&g, 300_000), &mut back).unwrap();
    assert_eq!(back, data, "larger than the scratch buffer: through a staging span");

    // Completions slower than `spin_polls` polls (1 here: nearly all) leave the depth-1 path midway;
    // the general path then finishes them, scratch buffer and staging spans included.
    let (mut slow, _peer) = pair_with(&ctx, EndpointConfig::new().with_spin_polls(1));
    for (k, n) in [8usize, 200, 3000, 20_000].into_iter().enumerate() {
        let data = pattern(n, 40 + k as u32);
        slow.write(at(400_000), &data).unwrap();
        assert_eq!(&slow.read(at(400_000), n as u32).unwrap()[..], &data[..], "slow round trip of {n} bytes");
    }
    let base = slow.fetch_add(at(200_000), 0).unwrap();
    for i in 0..20 {
        assert_eq!(slow.fetch_add(at(200_000), 1).unwrap(), base + i);
    }
    assert_eq!(slow.compare_swap(at(200_000), base + 20, 1).unwrap(), base + 20);
    assert_eq!(slow.inflight(), 0);

    // An error completion on the depth-1 path: Revoked, then the endpoint is broken (Closed).
    grant.deregister();
    let e = c.read_into(&mut dst, 0, 8, at(0)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Revoked, "{e}");
    let e = c.read(at(0), 8).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    assert_eq!(c.inflight(), 0, "nothing left behind");
}

/// The caller's own memory, registered: reads land in and writes leave from any slice of it with no
/// copy (`read_to`/`write_of`, and the transport's `read_registered`), a slice outside the registration
/// is refused before the NIC sees it, and the memory comes back whole once nothing holds it.
#[test]
#[ignore = "needs an RDMA device; run in tests/vm"]
fn caller_memory_is_read_into_and_written_from_in_place() {
    use farpool_core::Transport;
    use farpool_core::ids::RemoteAddr;
    use farpool_rdma::{Access, LocalBuffer};

    let Some(ctx) = device_or_skip() else { return };
    let pool = ctx.register_pool_owned(vec![0u8; 1 << 20].into_boxed_slice()).unwrap();
    let grant = pool.grant(0, 1 << 20).unwrap();
    let (mut c, _s) = pair(&ctx);
    let at = |off: u64| Remote { addr: grant.addr() + off, rkey: grant.rkey() };

    let frames: Box<[u8]> = (0..4 * 8192u32).map(|i| (i % 251) as u8).collect();
    let start = frames.as_ptr();
    let mut arena = LocalBuffer::from_box(&ctx, frames, Access::LOCAL).unwrap();
    let reg = arena.registration().clone();
    // Frame 1 out, frame 3 back in from there: the frames themselves, no staging.
    let (sent, rest) = arena.as_mut_slice().split_at_mut(2 * 8192);
    c.write_of(&reg, &sent[8192..], at(65536)).unwrap();
    c.read_to(&reg, &mut rest[8192..], at(65536)).unwrap();
    let bytes = arena.as_slice();
    assert_eq!(&bytes[3 * 8192..], &bytes[8192..2 * 8192], "frame 3 now holds frame 1's bytes");
    for n in [1usize, 8, 300, 5000] {
        c.read_to(&reg, &mut arena.as_mut_slice()[..n], at(65536)).unwrap();
    }

    // A check run while the READ is in flight: once on the depth-1 path; its error comes back after
    // the READ landed, and the endpoint keeps working.
    let mut runs = 0;
    c.read_to_checked(&reg, &mut arena.as_mut_slice()[..8], at(0), &mut || {
        runs += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(runs, 1);
    arena.as_mut_slice()[..8].fill(0xee);
    let e = c
        .read_to_checked(&reg, &mut arena.as_mut_slice()[..8], at(65536), &mut || {
            Err(farpool_core::Error::new(ErrorKind::Revoked, "lease expired meanwhile"))
        })
        .unwrap_err();
    assert_eq!((e.kind(), e.message()), (ErrorKind::Revoked, "lease expired meanwhile"), "{e}");
    assert_eq!(&arena.as_slice()[..8], &arena.as_slice()[8192..8192 + 8], "the READ itself completed");
    c.read_to(&reg, &mut arena.as_mut_slice()[..8], at(0)).unwrap();
    // An operation error comes before the check's: a READ past the grant fails at the NIC (on an
    // endpoint of its own, whose queue pair that error ends).
    let (mut doomed, _s) = pair(&ctx);
    let e = doomed
        .read_to_checked(&reg, &mut arena.as_mut_slice()[..8], at(1 << 20), &mut || {
            Err(farpool_core::Error::new(ErrorKind::Revoked, "not this one"))
        })
        .unwrap_err();
    assert_ne!(e.message(), "not this one", "{e}");

    // Memory that is not inside the registration: refused, and the endpoint keeps working.
    let mut elsewhere = vec![0u8; 64];
    let e = c.read_to(&reg, &mut elsewhere, at(0)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
    c.read_to(&reg, &mut arena.as_mut_slice()[..8], at(0)).unwrap();

    // Through the transport: its token is the registration's Arc; any other token reads by copying.
    let (mut t, g, _s2) = transport_over(&ctx, &grant);
    t.write_registered(RemoteAddr::in_grant(&g, 100_000), &arena.as_slice()[..8192], &reg).unwrap();
    t.read_registered(RemoteAddr::in_grant(&g, 100_000), &mut arena.as_mut_slice()[8192..2 * 8192], &reg).unwrap();
    let mut copy = vec![0u8; 8192];
    t.read_registered(RemoteAddr::in_grant(&g, 100_000), &mut copy, &"not a registration").unwrap();
    assert_eq!(&copy[..], &arena.as_slice()[..8192]);
    assert_eq!(&arena.as_slice()[8192..2 * 8192], &arena.as_slice()[..8192]);
    let e =
        t.read_registered(RemoteAddr::in_grant(&g, (1 << 20) - 8), &mut arena.as_mut_slice()[..16], &reg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
    let mut runs = 0;
    let mut count = || {
        runs += 1;
        Ok(())
    };
    t.read_registered_checked(RemoteAddr::in_grant(&g, 100_000), &mut arena.as_mut_slice()[..8192], &reg, &mut count)
        .unwrap();
    t.read_registered_checked(RemoteAddr::in_grant(&g, 0), &mut arena.as_mut_slice()[..(1 << 15)], &reg, &mut count)
        .unwrap();
    assert_eq!(runs, 2, "once per call");
    let e = t
        .read_registered_checked(RemoteAddr::in_grant(&g, 100_000), &mut arena.as_mut_slice()[..8], &reg, &mut || {
            Err(farpool_core::Error::new(ErrorKind::Revoked, "expired"))
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Revoked);
    t.read_registered(RemoteAddr::in_grant(&g, 100_000), &mut arena.as_mut_slice()[..8], &reg).unwrap();
    // Resolved by the caller (a lease): the same bytes, the check once, its error after the READ.
    let at = Remote { addr: g.cred.base_addr + 100_000, rkey: g.cred.rkey };
    let mut want = vec![0u8; 8192];
    t.read_registered(RemoteAddr::in_grant(&g, 100_000), &mut want, &"not a registration").unwrap();
    arena.as_mut_slice()[3 * 8192..].fill(0);
    runs = 0;
    let mut count = || {
        runs += 1;
        Ok(())
    };
    t.read_at_checked(at, &mut arena.as_mut_slice()[3 * 8192..], &reg, &mut count).unwrap();
    assert_eq!(runs, 1, "once");
    assert!(arena.as_slice()[3 * 8192..] == want[..], "read_at_checked reads what a copying read reads");
    let e = t
        .read_at_checked(at, &mut arena.as_mut_slice()[..8], &reg, || {
            Err(farpool_core::Error::new(ErrorKind::Revoked, "expired"))
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Revoked);

    // The memory back: refused while a clone of the registration lives, then the same allocation.
    let arena = arena.into_box().expect_err("a clone of the registration is alive");
    drop(reg);
    let back = arena.into_box().expect("nothing holds the registration any more");
    assert_eq!(back.as_ptr(), start, "the caller's own allocation comes back");
    assert_eq!(back.len(), 4 * 8192);
    let (e, empty) = LocalBuffer::from_box(&ctx, Box::new([]), Access::LOCAL).unwrap_err();
    assert_eq!((e.kind(), empty.len()), (ErrorKind::Config, 0), "refused, and the memory comes back: {e}");
    let own = LocalBuffer::new(&ctx, 4096, Access::LOCAL).unwrap();
    assert!(own.into_box().is_err(), "a buffer this crate allocated has no caller box to give back");
}
