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
