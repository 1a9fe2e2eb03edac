//! Failure of a real server under load: SIGKILL, SIGSTOP (hung) and SIGTERM (goodbye). Clients get
//! errors within the configured bound: no hang, no panic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use crossbeam_channel::Receiver;
use farpool::{ErrorKind, PoolEvent};
use farpool_tests::{MemServer, within};

const CONNECT_MS: u64 = 500;
const OP_MS: u64 = 1000;
/// Slack for scheduling on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);
const WORKERS: usize = 4;

fn wait_for(rx: &Receiver<PoolEvent>, what: &str, within: Duration, pred: impl Fn(&PoolEvent) -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ev) if pred(&ev) => return Ok(()),
            Ok(_) => {}
            Err(_) => bail!("no {what} event within {within:?}"),
        }
    }
}

/// Workers hammering one lease until their first error; returns (ops done, error kind, when).
fn load(
    pool: &Arc<farpool::Pool>,
    lease: &Arc<farpool::Lease>,
) -> Vec<std::thread::JoinHandle<(u64, ErrorKind, Instant)>> {
    (0..WORKERS)
        .map(|w| {
            let (pool, lease) = (pool.clone(), lease.clone());
            std::thread::spawn(move || {
                let mut ep = pool.endpoint(0).expect("endpoint");
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut ops = 0u64;
                let page = vec![w as u8; 4096];
                let mut buf = vec![0u8; 4096];
                while Instant::now() < deadline {
                    let off = (w as u64) * 65536 + (ops % 8) * 4096;
                    let r = ep
                        .write(&lease, 0, off, &page)
                        .and_then(|()| ep.read(&lease, 0, off, &mut buf))
                        .and_then(|()| ep.fetch_add(&lease, 0, 8 * w as u64, 1).map(drop));
                    if let Err(e) = r {
                        return (ops, e.kind(), Instant::now());
                    }
                    ops += 1;
                }
                panic!("worker {w} saw no error for 60 s");
            })
        })
        .collect()
}

#[test]
fn kill_9_under_load_yields_errors_within_the_bound() -> Result<()> {
    let mut server = MemServer::start(&[])?;
    let pool = Arc::new(server.pool_builder().with_connect_timeout_ms(CONNECT_MS).with_op_timeout_ms(OP_MS).build()?);
    let events = pool.events();
    let lease = Arc::new(pool.lease(0, 1)?);
    let workers = load(&pool, &lease);
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    server.kill9()?;
    let results = within(Duration::from_millis(OP_MS) * 2 + SLACK, move || {
        workers.into_iter().map(|h| h.join()).collect::<Vec<_>>()
    })?;
    for r in results {
        let Ok((ops, kind, at)) = r else { bail!("a worker panicked") };
        assert!(ops > 0, "the worker made progress before the kill");
        let after = at.saturating_duration_since(killed);
        assert!(after <= Duration::from_millis(OP_MS) + SLACK, "error {after:?} after the kill");
        assert!(
            matches!(
                kind,
                ErrorKind::Unreachable | ErrorKind::Closed | ErrorKind::Io | ErrorKind::Timeout | ErrorKind::Revoked
            ),
            "{kind}"
        );
    }
    wait_for(&events, "server down", SLACK, |e| matches!(e, PoolEvent::ServerDown { server: 0, .. }))?;
    wait_for(&events, "lease lost", SLACK, |e| matches!(e, PoolEvent::LeaseLost { .. }))?;
    let t = Instant::now();
    let e = pool.lease(0, 1).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::Closed | ErrorKind::Timeout), "{e}");
    assert_eq!(lease.write(0, 0, b"x").unwrap_err().kind(), ErrorKind::Revoked, "the lease is lost");
    assert!(pool.endpoint(0).is_err());
    assert!(t.elapsed() < Duration::from_millis(CONNECT_MS) + SLACK);
    Ok(())
}

/// Wait (bounded) until the kernel reports the process stopped: SIGSTOP is asynchronous, and a server
/// thread may still answer a request or two after `kill` returns.
fn wait_stopped(pid: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let stopped = |stat: &str| stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()) == Some("T");
    while Instant::now() < deadline {
        // Every thread's state (field 3, after the parenthesised command name) must be `T`.
        let mut all = true;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let stat = std::fs::read_to_string(task?.path().join("stat")).unwrap_or_default();
            all &= stopped(&stat);
        }
        if all {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("process {pid} did not stop")
}

#[test]
fn a_hung_server_times_out_within_the_bound() -> Result<()> {
    use nix::sys::signal::{Signal, kill};
    let server = MemServer::start(&[])?;
    let pool = Arc::new(server.pool_builder().with_op_timeout_ms(OP_MS).build()?);
    let lease = Arc::new(pool.lease(0, 1)?);
    let mut ep = pool.endpoint(0)?;
    ep.write(&lease, 0, 0, b"warm")?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(server.pid())?);
    kill(pid, Signal::SIGSTOP)?;
    wait_stopped(server.pid())?;
    let t = Instant::now();
    let (p2, l2) = (pool.clone(), lease.clone());
    let outcome = within(Duration::from_millis(OP_MS) * 4 + SLACK, move || {
        let data = ep.write(&l2, 0, 0, b"stuck").map_err(|e| e.kind());
        let control = p2.ping(0).map_err(|e| e.kind());
        (data, control)
    });
    kill(pid, Signal::SIGCONT)?;
    let (data, control) = outcome?;
    assert_eq!(data.unwrap_err(), ErrorKind::Timeout);
    assert_eq!(control.unwrap_err(), ErrorKind::Timeout);
    assert!(t.elapsed() < Duration::from_millis(OP_MS) * 3 + SLACK, "{:?}", t.elapsed());
    assert!(pool.ping(0).is_ok(), "the control connection survives a slow answer");
    Ok(())
}

#[test]
fn sigterm_says_goodbye_and_the_server_exits_cleanly() -> Result<()> {
    let mut server = MemServer::start(&["--shutdown-grace", "300ms"])?;
    let pool = server.pool()?;
    let events = pool.events();
    let lease = pool.lease(0, 1)?;
    lease.write(0, 0, b"bye")?;
    let status = server.terminate(Duration::from_secs(10))?;
    assert!(status.success(), "exit status {status}\n{}", server.output());
    wait_for(&events, "goodbye", SLACK, |e| matches!(e, PoolEvent::ServerGoodbye { .. }))?;
    wait_for(&events, "server down", SLACK, |e| matches!(e, PoolEvent::ServerDown { .. }))?;
    assert!(lease.write(0, 0, b"x").is_err());
    Ok(())
}
