//! Lifecycle: shutdown with Goodbye, SIGTERM of the binary, the connection bound, metrics, many clients.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use farpool_core::wire::Msg;
use farpool_core::{ErrorKind, RemoteAddr, Transport};

#[test]
fn shutdown_says_goodbye_revokes_and_closes() {
    let server = start(config());
    let mut ctl = Raw::connect(server.local_addr());
    let g = ctl.lease(2);
    let mut data = Raw::connect(server.local_addr());
    let t0 = Instant::now();
    let trigger = server.trigger();
    let stopper = std::thread::spawn(move || trigger.shutdown(Duration::from_millis(300)));
    match ctl.recv() {
        Msg::Goodbye { grace_ms, reason } => {
            assert_eq!(grace_ms, 300);
            assert!(reason.contains("shutting down"));
        }
        other => panic!("expected Goodbye, got {other:?}"),
    }
    assert!(matches!(data.recv(), Msg::Goodbye { .. }));
    // Still served during the grace.
    let req = ctl.req();
    assert_eq!(ctl.call(Msg::Ping { req }), Msg::Pong { req });
    match ctl.recv() {
        Msg::Revoked { lease, slabs } => assert_eq!((lease, slabs.len()), (g.lease, 2)),
        other => panic!("expected Revoked, got {other:?}"),
    }
    assert!(ctl.closed_by_server());
    stopper.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "shutdown took {:?}", t0.elapsed());
    assert!(TcpStream::connect(server.local_addr()).is_err(), "no longer accepting");
    server.join().unwrap();
}

#[test]
fn shutdown_ends_early_when_clients_leave() {
    let server = start(config());
    let ctl = Raw::connect(server.local_addr());
    drop(ctl);
    let t0 = Instant::now();
    server.shutdown(Duration::from_secs(30));
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn sigterm_stops_the_binary_cleanly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_farpool-memserver"))
        .args(["--listen", "127.0.0.1:0", "--capacity", "8MiB", "--slab-size", "1MiB", "--shutdown-grace", "500ms"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut log = String::new();
    for _ in 0..50 {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        log.push_str(&line);
        if let Some(i) = line.find("addr=") {
            addr = line[i + 5..].split_whitespace().next().map(|s| s.parse::<std::net::SocketAddr>().unwrap());
            break;
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("no listen address in the log:\n{log}"));
    assert!(log.contains("huge_pages"), "the log says which huge pages were chosen:\n{log}");
    let mut ctl = Raw::connect(addr);
    ctl.lease(1);
    let t0 = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert!(matches!(ctl.recv(), Msg::Goodbye { grace_ms: 500, .. }));
    assert!(matches!(ctl.recv(), Msg::Revoked { .. }));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "the server did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "exit status {status}");
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("SIGTERM received") && rest.contains("server stopped"), "{rest}");
}

#[test]
fn connection_bound_refuses_with_an_error_and_recovers() {
    let server = start(config().with_max_connections(3));
    let mut held: Vec<Raw> = (0..3).map(|_| Raw::connect(server.local_addr())).collect();
    let mut extra = Raw::connect_bare(server.local_addr());
    match extra.recv() {
        Msg::ErrorReply { kind: ErrorKind::NoSpace, message, .. } => assert!(message.contains("connection limit")),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.stats().connections_refused, 1);
    let req = held[0].req();
    assert_eq!(held[0].call(Msg::Ping { req }), Msg::Pong { req }, "admitted connections keep working");
    held.pop();
    assert!(eventually(STEP, || server.stats().connections == 2));
    let mut again = Raw::connect(server.local_addr());
    assert_eq!(again.call(Msg::Ping { req: 9 }), Msg::Pong { req: 9 });
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let server = start(config().with_metrics(Some("127.0.0.1:0".parse().unwrap())));
    let maddr = server.metrics_addr().expect("metrics enabled");
    let mut ctl = Raw::connect(server.local_addr());
    let g = ctl.lease(1);
    let mut t = transport(server.local_addr());
    let at = RemoteAddr::in_grant(&g.grants[0], 0);
    t.write(at, &[1u8; 100]).unwrap();
    let mut buf = [0u8; 100];
    for _ in 0..3 {
        t.read(at, &mut buf).unwrap();
    }
    assert_eq!(err_kind(t.read(at.offset_by(1 << 20), &mut buf[..8])), ErrorKind::OutOfRange);
    let scrape = || {
        let mut s = TcpStream::connect(maddr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let needles = [
        "farpool_ops_total{op=\"read\"} 3",
        "farpool_bytes_read_total 300",
        "farpool_bytes_written_total 100",
        "farpool_errors_total{kind=\"out_of_range\"} 1",
        "farpool_leases_active 1",
        "farpool_slabs{state=\"free\"} 15",
        "farpool_slabs{state=\"used\"} 1",
        "farpool_slabs_total 16",
        "farpool_connections 2",
    ];
    let mut body = String::new();
    // The exporter is fed by the housekeeping tick: wait for a tick after the last operation.
    let ok = eventually(STEP, || {
        body = scrape();
        needles.iter().all(|n| body.contains(n))
    });
    assert!(ok, "missing some of {needles:?} in\n{body}");
    assert!(body.starts_with("HTTP/1.0 200 OK"));
    let mut s = TcpStream::connect(maddr).unwrap();
    s.write_all(b"GET /nope HTTP/1.1\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.0 404"));
}

#[test]
fn many_concurrent_clients_are_all_served() {
    let (server, _ctl, g) = one_slab(config().with_capacity_bytes(64 << 20));
    let base = RemoteAddr::in_grant(&g.grants[0], 0);
    let mut conns: Vec<_> = (0..200).map(|_| transport(server.local_addr())).collect();
    for (i, t) in conns.iter_mut().enumerate() {
        t.write(base.offset_by(i as u64 * 8), &(i as u64).to_le_bytes()).unwrap();
    }
    assert_eq!(server.stats().connections, 201);
    for (i, t) in conns.iter_mut().enumerate().rev() {
        let mut b = [0u8; 8];
        t.read(base.offset_by(i as u64 * 8), &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), i as u64);
    }
}
