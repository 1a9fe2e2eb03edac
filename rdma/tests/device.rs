//! Tests that need an RDMA device. They are `#[ignore]`d (nextest and `cargo test` count them as
//! skipped); run them where a device exists with `cargo test -p farpool-rdma --features rdma -- --ignored`.
//! Without a device they print `SKIPPED: no RDMA device (...)` and return. The qemu guest runs the same
//! scenarios through the `farpool-vm-rdma` binary (tests/vm/guest/40-rdma.sh).
#![cfg(feature = "rdma")]

use std::sync::Arc;

use farpool_core::ErrorKind;
use farpool_rdma::{Context, DeviceSelector, Endpoint, EndpointConfig, Remote};

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
    let mut client = Endpoint::new(ctx, EndpointConfig::new()).expect("client endpoint");
    let mut server = Endpoint::new(ctx, EndpointConfig::passive()).expect("server endpoint");
    let (ci, si) = (client.local_info().unwrap(), server.local_info().unwrap());
    server.connect(&ci).expect("server connect");
    client.connect(&si).expect("client connect");
    (client, server)
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
    let cfg = EndpointConfig::new().with_staging_bytes(64 << 10).with_inflight_max(8);
    let mut c = Endpoint::new(&ctx, cfg).expect("client endpoint");
    let mut s = Endpoint::new(&ctx, EndpointConfig::passive()).expect("server endpoint");
    let (ci, si) = (c.local_info().unwrap(), s.local_info().unwrap());
    s.connect(&ci).unwrap();
    c.connect(&si).unwrap();
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
