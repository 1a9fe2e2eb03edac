//! 1,000 concurrent client connections to one server: all served, server memory bounded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use farpool::{AdminCmd, Endpoint};
use farpool_tests::{MemServer, raise_nofile, within};

const CONNECTIONS: usize = 1000;
const THREADS: usize = 8;
/// Server memory allowed per open connection. Measured about 10 KiB (debug build, tokio server); the
/// bound leaves room for one 64 KiB read buffer per connection plus slack, and still catches a server
/// that buffers per operation or per frame without bound.
const RSS_PER_CONNECTION_MAX: u64 = 128 * 1024;

#[test]
fn a_thousand_concurrent_connections_are_all_served_with_bounded_memory() -> Result<()> {
    let limit = raise_nofile(4 * CONNECTIONS as u64)?;
    ensure!(limit >= 2 * CONNECTIONS as u64 + 64, "open-file limit {limit} too low for {CONNECTIONS} connections");
    let server = MemServer::start(&["--max-connections", "4096"])?;
    let pool = Arc::new(server.pool_builder().with_connect_timeout_ms(5000).with_op_timeout_ms(10_000).build()?);
    let lease = Arc::new(pool.lease(0, 1)?);
    lease.write(0, 0, &[0u8; 16])?; // settle the pool's own endpoint before measuring
    let rss_before = server.rss_bytes()?;

    let t = Instant::now();
    let mut endpoints: Vec<Endpoint> = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        endpoints.push(pool.endpoint(0)?);
    }
    let connect_time = t.elapsed();
    let stats = pool.admin(0, AdminCmd::Stats)?;
    let open = stats.stat("connections").unwrap_or(0);
    ensure!(open >= CONNECTIONS as u64, "server reports {open} open connections");

    // Every connection, all open at once, does a write, a read-back and an increment.
    let t = Instant::now();
    let still_open = serve_all(endpoints, &lease)?;
    let ops_time = t.elapsed();
    ensure!(still_open.len() == CONNECTIONS);
    ensure!(lease.fetch_add(0, 0, 0)? == CONNECTIONS as u64, "every connection's increment landed");
    let items: Vec<(usize, u64, usize)> = (0..CONNECTIONS).map(|i| (0, 4096 + 8 * i as u64, 8)).collect();
    for (i, v) in lease.read_many(&items)?.iter().enumerate() {
        ensure!(u64::from_le_bytes(v[..].try_into()?) == i as u64 + 1, "connection {i}'s write");
    }
    let rss_open = server.rss_bytes()?;
    drop(still_open);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.admin(0, AdminCmd::Stats)?.stat("connections").unwrap_or(u64::MAX) > 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss_closed = server.rss_bytes()?;
    let growth = rss_open.saturating_sub(rss_before);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "{CONNECTIONS} connections: connect {connect_time:?}, ops {ops_time:?}; server RSS before {:.1} MiB, \
         all open {:.1} MiB (+{:.1} KiB/conn), after close {:.1} MiB",
        mib(rss_before),
        mib(rss_open),
        growth as f64 / 1024.0 / CONNECTIONS as f64,
        mib(rss_closed)
    );
    ensure!(
        growth <= RSS_PER_CONNECTION_MAX * CONNECTIONS as u64,
        "server RSS grew by {:.1} MiB for {CONNECTIONS} connections",
        mib(growth)
    );
    Ok(())
}

/// Spread the endpoints over `THREADS` threads; each does a write, a read-back and an increment on
/// every endpoint it holds. Returns the endpoints (still open).
fn serve_all(endpoints: Vec<Endpoint>, lease: &Arc<farpool::Lease>) -> Result<Vec<(usize, Endpoint)>> {
    let mut chunks: Vec<Vec<(usize, Endpoint)>> = (0..THREADS).map(|_| Vec::new()).collect();
    for (i, ep) in endpoints.into_iter().enumerate() {
        chunks[i % THREADS].push((i, ep));
    }
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|mut mine| {
            let lease = lease.clone();
            std::thread::spawn(move || -> farpool::Result<Vec<(usize, Endpoint)>> {
                for (i, ep) in &mut mine {
                    let off = 4096 + 8 * *i as u64;
                    ep.write(&lease, 0, off, &(*i as u64 + 1).to_le_bytes())?;
                    let mut back = [0u8; 8];
                    ep.read(&lease, 0, off, &mut back)?;
                    assert_eq!(u64::from_le_bytes(back), *i as u64 + 1);
                    ep.fetch_add(&lease, 0, 0, 1)?;
                }
                Ok(mine)
            })
        })
        .collect();
    let served = within(Duration::from_secs(120), move || handles.into_iter().map(|h| h.join()).collect::<Vec<_>>())?;
    let mut still_open = Vec::new();
    for r in served {
        still_open.extend(r.map_err(|_| anyhow::anyhow!("worker panicked"))??);
    }
    Ok(still_open)
}
