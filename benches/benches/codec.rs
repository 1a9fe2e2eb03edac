//! Criterion: encode/decode of the data-plane frames (`Op` requests and `OpDone` completions) at 8 B
//! and 8 KiB, the hot path of the TCP transport on both sides.
#![forbid(unsafe_code)]

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use farpool_core::wire::{self, Msg, OpDone, OpResult, WireOp};
use farpool_core::{Credential, Epoch, LeaseId, RemoteAddr, SlabId, Token};

const SIZES: [usize; 2] = [8, 8192];

fn addr() -> RemoteAddr {
    let cred = Credential { lease: LeaseId(7), epoch: Epoch(3), token: Token(0xDEAD_BEEF), rkey: 0, base_addr: 0 };
    RemoteAddr { slab: SlabId(1), offset: 4096, cred }
}

fn ops(size: usize) -> [(&'static str, WireOp); 2] {
    [("read", WireOp::Read { len: size as u32 }), ("write", WireOp::Write { data: Bytes::from(vec![7u8; size]) })]
}

fn encode_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_op");
    let a = addr();
    for size in SIZES {
        for (name, op) in ops(size) {
            g.throughput(Throughput::Elements(1));
            g.bench_with_input(BenchmarkId::new(name, size), &op, |b, op| {
                let mut out = BytesMut::with_capacity(2 * size + 256);
                b.iter(|| {
                    out.clear();
                    wire::encode_op(&mut out, black_box(42), &a, black_box(op));
                    black_box(out.len())
                })
            });
        }
    }
    g.finish();
}

fn decode_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_op");
    let a = addr();
    for size in SIZES {
        for (name, op) in ops(size) {
            let mut frame = BytesMut::new();
            wire::encode_op(&mut frame, 42, &a, &op);
            let frame = frame.freeze();
            g.throughput(Throughput::Elements(1));
            g.bench_with_input(BenchmarkId::new(name, size), &frame, |b, frame| {
                // The copy into a fresh buffer is setup, not measured.
                b.iter_batched(
                    || BytesMut::from(&frame[..]),
                    |mut buf| {
                        let m = wire::decode(&mut buf).expect("valid frame").expect("whole frame");
                        assert!(matches!(m, Msg::Op(_)));
                        m
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

fn op_dones(size: usize) -> [(&'static str, OpDone); 2] {
    [
        ("read", OpDone { id: 42, result: Ok(OpResult::Data(Bytes::from(vec![9u8; size]))) }),
        ("write", OpDone { id: 42, result: Ok(OpResult::Done) }),
    ]
}

fn encode_op_dones(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_op_done");
    let src = vec![9u8; 8192];
    for size in SIZES {
        g.throughput(Throughput::Elements(1));
        // The server's path: payload copied from the pool straight into the frame.
        g.bench_function(BenchmarkId::new("read_in_place", size), |b| {
            let mut out = BytesMut::with_capacity(2 * size + 256);
            b.iter(|| {
                out.clear();
                wire::encode_op_done_read(&mut out, 42, size, |dst| {
                    dst.copy_from_slice(&src[..size]);
                    Ok::<(), ()>(())
                })
                .expect("fill succeeds");
                black_box(out.len())
            })
        });
        for (name, done) in op_dones(size) {
            let msg = Msg::OpDone(done);
            g.bench_with_input(BenchmarkId::new(name, size), &msg, |b, msg| {
                let mut out = BytesMut::with_capacity(2 * size + 256);
                b.iter(|| {
                    out.clear();
                    wire::encode(black_box(msg), &mut out);
                    black_box(out.len())
                })
            });
        }
    }
    g.finish();
}

fn decode_op_dones(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_op_done");
    for size in SIZES {
        for (name, done) in op_dones(size) {
            let mut frame = BytesMut::new();
            wire::encode(&Msg::OpDone(done), &mut frame);
            let frame = frame.freeze();
            g.throughput(Throughput::Elements(1));
            g.bench_with_input(BenchmarkId::new(name, size), &frame, |b, frame| {
                // The copy into a fresh buffer is setup, not measured.
                b.iter_batched(
                    || BytesMut::from(&frame[..]),
                    |mut buf| {
                        let m = wire::decode(&mut buf).expect("valid frame").expect("whole frame");
                        assert!(matches!(m, Msg::OpDone(_)));
                        m
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = codec;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1))
        .sample_size(30);
    targets = encode_ops, decode_ops, encode_op_dones, decode_op_dones
}
criterion_main!(codec);
