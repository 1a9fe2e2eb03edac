//! Several clients at once against one real server; atomics from many threads sum exactly.

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use anyhow::Result;
use farpool::{Lease, Pool, Target};
use farpool_tests::{MemServer, within};

const THREADS: usize = 8;
const OPS: u64 = 1000;
const BOUND: Duration = Duration::from_secs(120);

/// Run `f(thread, endpoint)` on `THREADS` threads, each with its own data endpoint.
fn on_threads<T: Send + 'static>(
    pool: &Arc<Pool>,
    lease: &Arc<Lease>,
    f: impl Fn(usize, &mut farpool::Endpoint, &Lease) -> T + Send + Sync + 'static,
) -> Result<Vec<T>> {
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (pool, lease, f, barrier) = (pool.clone(), lease.clone(), f.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut ep = pool.endpoint(lease.server()).expect("endpoint");
                barrier.wait();
                f(t, &mut ep, &lease)
            })
        })
        .collect();
    let joined = within(BOUND, move || handles.into_iter().map(|h| h.join()).collect::<Vec<_>>())?;
    joined.into_iter().map(|r| r.map_err(|_| anyhow::anyhow!("a worker panicked"))).collect()
}

#[test]
fn fetch_add_from_many_threads_sums_exactly_and_old_values_are_unique() -> Result<()> {
    let server = MemServer::start(&[])?;
    let pool = Arc::new(server.pool()?);
    let lease = Arc::new(pool.lease(0, 1)?);
    let olds = on_threads(&pool, &lease, |_, ep, lease| {
        (0..OPS).map(|_| ep.fetch_add(lease, 0, 64, 1).expect("fetch_add")).collect::<Vec<u64>>()
    })?;
    let total = THREADS as u64 * OPS;
    assert_eq!(lease.fetch_add(0, 64, 0)?, total);
    let unique: HashSet<u64> = olds.into_iter().flatten().collect();
    assert_eq!(unique.len() as u64, total, "every increment saw a distinct old value");
    assert_eq!(unique.iter().max().copied(), Some(total - 1));
    Ok(())
}

#[test]
fn compare_swap_increments_from_many_threads_sum_exactly() -> Result<()> {
    let server = MemServer::start(&[])?;
    let pool = Arc::new(server.pool()?);
    let lease = Arc::new(pool.lease(0, 1)?);
    let retries = on_threads(&pool, &lease, |_, ep, lease| {
        let mut retries = 0u64;
        let mut cur = 0u64;
        for _ in 0..OPS {
            loop {
                let old = ep.compare_swap(lease, 0, 128, cur, cur + 1).expect("cas");
                if old == cur {
                    cur += 1;
                    break;
                }
                retries += 1;
                cur = old;
            }
        }
        retries
    })?;
    assert_eq!(lease.fetch_add(0, 128, 0)?, THREADS as u64 * OPS);
    println!("CAS retries under contention: {}", retries.iter().sum::<u64>());
    Ok(())
}

#[test]
fn several_clients_at_once_see_their_own_data_and_a_shared_counter() -> Result<()> {
    const CLIENTS: usize = 4;
    let server = MemServer::start(&[])?;
    let addr = server.addr();
    let counter_pool = server.pool()?;
    let counter = counter_pool.lease(0, 1)?;
    let shared_addr = counter.addr(0, 0, 8)?;
    let handles: Vec<_> = (0..CLIENTS)
        .map(|c| {
            std::thread::spawn(move || -> Result<()> {
                let pool = farpool::PoolBuilder::new([addr])
                    .with_transport(farpool::TransportChoice::Tcp)
                    .with_op_timeout_ms(2000)
                    .build()?;
                let lease = pool.lease(Target::Auto, 2)?;
                let page: Vec<u8> = (0..8192).map(|i| (i as u8) ^ (c as u8)).collect();
                let items: Vec<(usize, u64, &[u8])> = (0..16).map(|k| (k % 2, (k as u64) * 8192, &page[..])).collect();
                lease.write_many(&items)?;
                let reads: Vec<(usize, u64, usize)> = items.iter().map(|&(g, o, d)| (g, o, d.len())).collect();
                for got in lease.read_many(&reads)? {
                    assert_eq!(&got[..], &page[..], "client {c} reads back its own bytes");
                }
                // Every client bumps one counter held by another client's lease (raw transport).
                let mut ep = pool.endpoint(0)?;
                for _ in 0..100 {
                    ep.transport().fetch_add(shared_addr, 1)?;
                }
                lease.release()?;
                Ok(())
            })
        })
        .collect();
    let results = within(BOUND, move || handles.into_iter().map(|h| h.join()).collect::<Vec<_>>())?;
    for r in results {
        r.map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    assert_eq!(counter.fetch_add(0, 0, 0)?, CLIENTS as u64 * 100);
    Ok(())
}
