//! Shared helpers of the memserver integration tests: an embedded server on an ephemeral port, a raw
//! protocol client, and a data endpoint.
#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use farpool_core::tcp::{TcpOptions, TcpTransport};
use farpool_core::wire::{self, FrameReader, LeaseGrant, Msg};
use farpool_core::{ErrorKind, RemoteAddr, Transport};
use farpool_memserver::{Server, ServerConfig, ServerHandle};

/// A server from `cfg`, a raw control connection, and a one-slab lease held on it (keep the `Raw`
/// alive as long as the lease is used).
pub fn one_slab(cfg: ServerConfig) -> (ServerHandle, Raw, LeaseGrant) {
    let server = start(cfg);
    let mut ctl = Raw::connect(server.local_addr());
    let g = ctl.lease(1);
    (server, ctl, g)
}

/// A small server: 16 slabs of 1 MiB, 2 workers, on 127.0.0.1:0.
pub fn config() -> ServerConfig {
    ServerConfig::default()
        .with_listen("127.0.0.1:0".parse().unwrap())
        .with_capacity_bytes(16 << 20)
        .with_slab_size_bytes(1 << 20)
        .with_workers(2)
}

pub fn start(cfg: ServerConfig) -> ServerHandle {
    Server::start(cfg).expect("server starts")
}

pub const STEP: Duration = Duration::from_secs(5);

/// A client speaking the raw protocol over a blocking socket.
pub struct Raw {
    pub stream: TcpStream,
    pub reader: FrameReader,
    next_req: u64,
    /// Unsolicited frames (RevokeNotice, Revoked, Goodbye) skipped while waiting for a reply.
    pub notices: Vec<Msg>,
}

impl Raw {
    /// Connect without a handshake.
    pub fn connect_bare(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(STEP)).unwrap();
        Self { stream, reader: FrameReader::new(), next_req: 1, notices: Vec::new() }
    }

    /// Connect and shake hands.
    pub fn connect(addr: SocketAddr) -> Self {
        let mut r = Self::connect_bare(addr);
        let hello = farpool_core::tcp::client_handshake(&mut r.stream, &mut r.reader, "test", STEP).unwrap();
        assert_eq!(hello.version, wire::VERSION);
        assert_ne!(hello.features & wire::FEATURE_TCP, 0);
        r.stream.set_read_timeout(Some(STEP)).unwrap();
        r
    }

    pub fn send(&mut self, m: &Msg) {
        let mut out = BytesMut::new();
        wire::encode(m, &mut out);
        self.stream.write_all(&out).unwrap();
    }

    pub fn send_bytes(&mut self, b: &[u8]) {
        self.stream.write_all(b).unwrap();
    }

    pub fn recv(&mut self) -> Msg {
        self.reader.next(&mut self.stream).expect("a frame from the server")
    }

    /// Receive the next frame within `t`, `None` on timeout.
    /// The next reply, setting aside unsolicited notices.
    pub fn reply(&mut self) -> Msg {
        for _ in 0..1000 {
            match self.recv() {
                m @ (Msg::RevokeNotice { .. } | Msg::Revoked { .. } | Msg::Goodbye { .. }) => self.notices.push(m),
                m => return m,
            }
        }
        panic!("no reply among 1000 notices");
    }

    pub fn recv_within(&mut self, t: Duration) -> Option<Msg> {
        self.stream.set_read_timeout(Some(t)).unwrap();
        let r = self.reader.next(&mut self.stream);
        self.stream.set_read_timeout(Some(STEP)).unwrap();
        match r {
            Ok(m) => Some(m),
            Err(e) if e.kind() == ErrorKind::Timeout => None,
            Err(e) => panic!("connection failed: {e}"),
        }
    }

    /// Whether the server closed the connection (EOF or reset) within `STEP`.
    pub fn closed_by_server(&mut self) -> bool {
        match self.reader.next(&mut self.stream) {
            Ok(m) => panic!("expected the connection to close, got {m:?}"),
            Err(e) => matches!(e.kind(), ErrorKind::Closed | ErrorKind::Unreachable),
        }
    }

    pub fn req(&mut self) -> u64 {
        self.next_req += 1;
        self.next_req
    }

    /// Ask for a lease of `n` slabs; panics unless granted.
    pub fn lease(&mut self, n: u32) -> LeaseGrant {
        let req = self.req();
        self.send(&Msg::LeaseRequest { req, slabs: n, flags: 0 });
        match self.reply() {
            Msg::LeaseGranted(g) if g.req == req => g,
            other => panic!("expected LeaseGranted, got {other:?}"),
        }
    }

    /// Send a request and return the reply (skipping unsolicited notices, which are returned apart).
    pub fn call(&mut self, m: Msg) -> Msg {
        self.send(&m);
        self.reply()
    }
}

/// A data endpoint.
pub fn transport(addr: SocketAddr) -> TcpTransport {
    let opts = TcpOptions { op_timeout: Duration::from_secs(5), ..TcpOptions::default() };
    TcpTransport::connect(addr, opts).expect("data endpoint connects")
}

/// Write then read back a pattern through a fresh endpoint: proof that the server still serves.
pub fn witness(addr: SocketAddr, at: RemoteAddr) {
    let mut t = transport(addr);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    t.write(at, &data).expect("witness write");
    let mut back = vec![0; data.len()];
    t.read(at, &mut back).expect("witness read");
    assert_eq!(back, data);
}

/// The error kind of a one-op failure.
pub fn err_kind<T: std::fmt::Debug>(r: farpool_core::Result<T>) -> ErrorKind {
    r.expect_err("operation should fail").kind()
}

/// Poll `f` until true, at most `bound`.
pub fn eventually(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + bound;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

pub fn bytes(b: &[u8]) -> Bytes {
    Bytes::copy_from_slice(b)
}
