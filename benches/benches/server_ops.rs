//! Criterion: the memory server's op path, end to end in-process: an embedded `farpool-memserver` on
//! 127.0.0.1:0, a lease from `farpool::Pool`, and 8 KiB READ / WRITE round trips (and a pipelined batch
//! of 16 READs) over one `TcpTransport` endpoint. The server's handler (`dataplane::execute`) is private
//! to the memserver crate, so it is measured through the loopback round trip; the codec share of it is in
//! `benches/codec.rs`.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use farpool::{PoolBuilder, TransportChoice};
use farpool_core::{OpKind, OpOutput, WorkRequest};
use farpool_memserver::{Server, ServerConfig};

const SIZE: usize = 8192;
const BATCH: usize = 16;

fn server_ops(c: &mut Criterion) {
    let cfg = ServerConfig::default()
        .with_listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .with_capacity_bytes(64 << 20)
        .with_slab_size_bytes(16 << 20);
    let server = Server::start(cfg).expect("embedded memory server starts");
    let pool = PoolBuilder::new([server.local_addr()])
        .with_transport(TransportChoice::Tcp)
        .with_name("criterion")
        .build()
        .expect("pool connects");
    let lease = pool.lease(0, 1).expect("one slab leased");
    let mut ep = pool.endpoint(0).expect("data endpoint");
    let addr = lease.addr(0, 0, SIZE as u64).expect("address in grant");
    let payload = Bytes::from(vec![0xABu8; SIZE]);

    let mut g = c.benchmark_group("server_ops_8KiB");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("write_round_trip", |b| {
        b.iter(|| {
            let wr = WorkRequest { wr_id: 1, addr, op: OpKind::Write { data: payload.clone() } };
            assert_eq!(ep.transport().run_one(wr).expect("write"), OpOutput::Write);
        })
    });
    g.bench_function("read_round_trip", |b| {
        b.iter(|| {
            let wr = WorkRequest { wr_id: 2, addr, op: OpKind::Read { len: SIZE as u32 } };
            match ep.transport().run_one(wr).expect("read") {
                OpOutput::Read(d) => assert_eq!(d.len(), SIZE),
                other => panic!("read completed as {other:?}"),
            }
        })
    });
    g.throughput(Throughput::Bytes((SIZE * BATCH) as u64));
    g.bench_function("read_batch_of_16", |b| {
        b.iter(|| {
            let batch = (0..BATCH as u64)
                .map(|i| WorkRequest { wr_id: i, addr, op: OpKind::Read { len: SIZE as u32 } })
                .collect();
            let done = ep.transport().execute(batch).expect("batch");
            assert_eq!(done.len(), BATCH);
            assert!(done.iter().all(|c| c.result.is_ok()));
        })
    });
    g.finish();
    drop(ep);
    drop(lease);
    drop(pool);
    server.shutdown(Duration::from_millis(100));
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = server_ops
}
criterion_main!(benches);
