//! The TCP data plane end to end: pipelining, large operations, concurrent atomics, and a latency probe.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use farpool_core::wire::MAX_OP_LEN;
use farpool_core::{Completion, OpKind, OpOutput, RemoteAddr, Transport, WorkRequest};

#[test]
fn atomics_from_many_threads_sum_exactly() {
    let (server, _ctl, g) = one_slab(config());
    let counter = RemoteAddr::in_grant(&g.grants[0], 64);
    let lock = RemoteAddr::in_grant(&g.grants[0], 128);
    const THREADS: u64 = 4;
    const OPS: u64 = 300;
    let addr = server.local_addr();
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            std::thread::spawn(move || {
                let mut t = transport(addr);
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
    let swaps: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let mut t = transport(addr);
    assert_eq!(t.fetch_add(counter, 0).unwrap(), THREADS * OPS * 3);
    assert_eq!(t.fetch_add(lock, 0).unwrap(), swaps, "every successful CAS incremented exactly once");
    let s = server.stats();
    assert_eq!(s.ops_fetch_add, THREADS * OPS * 2 + 2);
    assert_eq!(s.ops_cas, THREADS * OPS);
}

#[test]
fn pipelined_batches_complete_in_order_with_the_right_data() {
    let (server, _ctl, g) = one_slab(config());
    let base = RemoteAddr::in_grant(&g.grants[0], 0);
    let mut t = transport(server.local_addr());
    let writes: Vec<WorkRequest> = (0..64u64)
        .map(|i| WorkRequest {
            wr_id: i,
            addr: base.offset_by(i * 512),
            op: OpKind::Write { data: Bytes::from(vec![i as u8; 512]) },
        })
        .collect();
    let done = t.execute(writes).unwrap();
    assert_eq!(done.len(), 64);
    assert!(done.iter().all(|c| matches!(c.result, Ok(OpOutput::Write))));
    let reads: Vec<WorkRequest> = (0..64u64)
        .map(|i| WorkRequest { wr_id: 1000 + i, addr: base.offset_by(i * 512), op: OpKind::Read { len: 512 } })
        .collect();
    let done: Vec<Completion> = t.execute(reads).unwrap();
    let ids: Vec<u64> = done.iter().map(|c| c.wr_id).collect();
    assert_eq!(ids, (1000..1064).collect::<Vec<_>>(), "completions in posting order");
    for c in done {
        let Ok(OpOutput::Read(d)) = c.result else { panic!("{:?}", c.result) };
        assert!(d.iter().all(|b| u64::from(*b) == c.wr_id - 1000));
    }
    let s = server.stats();
    assert_eq!((s.ops_write, s.ops_read, s.bytes_written, s.bytes_read), (64, 64, 64 * 512, 64 * 512));
}

/// `poll` with a zero timeout never blocks, and one thread can wait on several endpoints' `wait_fd`.
#[test]
fn zero_timeout_poll_never_blocks_and_wait_fds_multiplex_endpoints() {
    let (server, _ctl, g) = one_slab(config());
    let base = RemoteAddr::in_grant(&g.grants[0], 0);
    let mut eps: Vec<_> = (0..3).map(|_| transport(server.local_addr())).collect();
    eps[0].write(base, &[5u8; 4096]).unwrap();
    let mut out = Vec::new();
    assert_eq!(eps[1].poll(&mut out, 16, Duration::ZERO).unwrap(), 0, "nothing in flight");
    let mut batch: Vec<WorkRequest> = Vec::new();
    for (i, ep) in eps.iter_mut().enumerate() {
        batch.extend((0..8u64).map(|k| WorkRequest {
            wr_id: i as u64 * 100 + k,
            addr: base.offset_by(k * 512),
            op: OpKind::Read { len: 512 },
        }));
        assert_eq!(ep.post(&mut batch).unwrap(), 8);
    }
    // Wait on all three sockets with poll(2), reaping with zero-timeout polls, until every op is back.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = [0usize; 3];
    while got.iter().sum::<usize>() < 24 {
        assert!(Instant::now() < deadline, "completions missing after 10 s: {got:?}");
        let mut progressed = false;
        for (i, ep) in eps.iter_mut().enumerate() {
            let before = out.len();
            let t = Instant::now();
            let k = ep.poll(&mut out, usize::MAX, Duration::ZERO).unwrap();
            assert!(t.elapsed() < Duration::from_millis(500), "a zero-timeout poll blocked for {:?}", t.elapsed());
            for c in &out[before..] {
                assert_eq!(c.wr_id / 100, i as u64, "completion on the wrong endpoint");
                let Ok(OpOutput::Read(d)) = &c.result else { panic!("{:?}", c.result) };
                assert!(d.iter().all(|b| *b == 5));
            }
            got[i] += k;
            progressed |= k > 0;
        }
        if !progressed {
            use nix::poll::{PollFd, PollFlags, PollTimeout};
            let mut fds: Vec<PollFd<'_>> =
                eps.iter().map(|e| PollFd::new(e.wait_fd().expect("tcp has a wait fd"), PollFlags::POLLIN)).collect();
            nix::poll::poll(&mut fds, PollTimeout::from(100u8)).expect("poll(2)");
        }
    }
    assert_eq!(got, [8, 8, 8]);
}

/// Maximal reads in flight push the server's output past its high-water mark: it must write and keep going.
#[test]
fn maximal_operations_pass_the_output_high_water_mark() {
    let (server, _ctl, g) = one_slab(config().with_slab_size_bytes(4 << 20));
    let base = RemoteAddr::in_grant(&g.grants[0], 0);
    let mut t = transport(server.local_addr());
    let pattern: Vec<u8> = (0..(4usize << 20)).map(|i| (i % 251) as u8).collect();
    t.write(base, &pattern).unwrap();
    let reads: Vec<WorkRequest> = (0..12u64)
        .map(|i| WorkRequest {
            wr_id: i,
            addr: base.offset_by((i % 4) * u64::from(MAX_OP_LEN)),
            op: OpKind::Read { len: MAX_OP_LEN },
        })
        .collect();
    let done = t.execute(reads).unwrap();
    for c in done {
        let Ok(OpOutput::Read(d)) = c.result else { panic!("{:?}", c.result) };
        let off = ((c.wr_id % 4) * u64::from(MAX_OP_LEN)) as usize;
        assert!(d[..] == pattern[off..off + MAX_OP_LEN as usize]);
    }
}

/// 8 KiB reads over one connection; prints p50/p99. The bound is loose (debug builds, a busy CI box);
/// run `cargo test -p farpool-memserver --release --test ops -- --nocapture latency` for the figure.
#[test]
fn latency_probe_8k_reads() {
    let (server, _ctl, g) = one_slab(config());
    let base = RemoteAddr::in_grant(&g.grants[0], 0);
    let mut t = transport(server.local_addr());
    let mut buf = vec![0u8; 8192];
    let n = if cfg!(debug_assertions) { 2000 } else { 10_000 };
    for i in 0..200 {
        t.read(base.offset_by((i % 64) * 8192), &mut buf).unwrap();
    }
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n as u64 {
        let t0 = Instant::now();
        t.read(base.offset_by((i % 64) * 8192), &mut buf).unwrap();
        lat.push(t0.elapsed());
    }
    let total = start.elapsed();
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    println!(
        "tcp 8KiB read, 1 connection, {n} ops: p50 {:?} p99 {:?} p999 {:?}, {:.0} ops/s",
        p(0.5),
        p(0.99),
        p(0.999),
        n as f64 / total.as_secs_f64()
    );
    assert!(p(0.5) < Duration::from_millis(5), "p50 of {:?} is far off a loopback round trip", p(0.5));
}

/// 16 connections x 16 reads of 8 KiB in flight; prints the throughput. Bounded: 2,000 batches in all.
#[test]
fn throughput_probe_16_connections_pipeline_16() {
    let (server, _ctl, g) = one_slab(config());
    let base = RemoteAddr::in_grant(&g.grants[0], 0);
    let addr = server.local_addr();
    let batches = if cfg!(debug_assertions) { 30 } else { 300 };
    let start = Instant::now();
    let handles: Vec<_> = (0..16u64)
        .map(|c| {
            std::thread::spawn(move || {
                let mut t = transport(addr);
                for b in 0..batches {
                    let wrs = (0..16u64)
                        .map(|i| WorkRequest {
                            wr_id: i,
                            addr: base.offset_by(((c * 16 + i + b) % 128) * 8192),
                            op: OpKind::Read { len: 8192 },
                        })
                        .collect();
                    let done = t.execute(wrs).unwrap();
                    assert!(done.iter().all(|c| c.result.is_ok()));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let ops = 16 * 16 * batches;
    let secs = start.elapsed().as_secs_f64();
    println!("tcp 8KiB read, 16 connections x pipeline 16: {ops} ops in {secs:.3}s, {:.0} ops/s", ops as f64 / secs);
    assert_eq!(server.stats().ops_read, ops);
}
