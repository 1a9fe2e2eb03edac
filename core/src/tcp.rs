//! The TCP transport: the server executes each one-sided operation for the client.
//!
//! One [`TcpTransport`] is one connection, used by one thread. Operations are pipelined: `post` encodes
//! a batch into one buffer and writes it with one syscall; the server answers in order, so completions
//! are matched against the queue of in-flight ids (a reply out of order is a protocol violation).
//! Failure handling: if the connection breaks or an operation outlives [`TcpOptions::op_timeout`],
//! the endpoint is marked broken and every operation in flight completes with `Unreachable` or
//! `Timeout`: every posted `wr_id` completes exactly once, and nothing waits longer than the bound.

use std::collections::VecDeque;
use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::error::{Error, ErrorKind, Result};
use crate::transport::{Completion, OpOutput, Transport, TransportKind, WorkRequest};
use crate::wire::{self, FrameReader, HelloOk, Msg, OpDone, OpResult};

/// Options of a TCP endpoint.
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// Bound on connecting and on the handshake. Default 2 s.
    pub connect_timeout: Duration,
    /// Bound on any one operation; past it the endpoint is broken and ops fail with `Timeout`. Default 5 s.
    pub op_timeout: Duration,
    /// Operations in flight at most. Default 64.
    pub inflight_max: usize,
    /// Name sent in the handshake, for the server's logs. Default `farpool`.
    pub name: String,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            op_timeout: Duration::from_secs(5),
            inflight_max: 64,
            name: "farpool".into(),
        }
    }
}

/// This host's identity: the kernel boot id (two processes with the same boot id share the host).
pub fn local_host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// Resolve `addr` and connect with a bound.
pub fn connect_bounded(addr: impl ToSocketAddrs, timeout: Duration) -> Result<TcpStream> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| Error::new(ErrorKind::Config, "cannot resolve server address").with_source(e))?
        .collect();
    let mut last = Error::new(ErrorKind::Config, "server address resolved to nothing");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                s.set_nodelay(true).map_err(|e| Error::io("set TCP_NODELAY", e))?;
                return Ok(s);
            }
            Err(e) => last = Error::io(format!("connect to {a}"), e),
        }
    }
    Err(last)
}

/// Client side of the handshake on a fresh connection: send `Hello`, expect `HelloOk`.
pub fn client_handshake(
    stream: &mut TcpStream,
    reader: &mut FrameReader,
    name: &str,
    timeout: Duration,
) -> Result<HelloOk> {
    stream.set_read_timeout(Some(timeout)).map_err(|e| Error::io("set timeout", e))?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| Error::io("set timeout", e))?;
    let mut out = BytesMut::new();
    let hello = Msg::Hello { magic: wire::MAGIC, version: wire::VERSION, host_id: local_host_id(), name: name.into() };
    wire::encode(&hello, &mut out);
    stream.write_all(&out).map_err(|e| Error::io("sending handshake", e))?;
    match reader.next(stream)? {
        Msg::HelloOk(h) if h.version == wire::VERSION => Ok(h),
        Msg::HelloOk(h) => Err(Error::new(
            ErrorKind::Protocol,
            format!("server speaks protocol version {}, we speak {}", h.version, wire::VERSION),
        )),
        Msg::ErrorReply { kind, message, .. } => Err(Error::new(kind, format!("handshake refused: {message}"))),
        other => Err(Error::new(ErrorKind::Protocol, format!("expected HelloOk, got {other:?}"))),
    }
}

/// A pipelined TCP endpoint. See the module docs.
#[derive(Debug)]
pub struct TcpTransport {
    stream: TcpStream,
    reader: FrameReader,
    out: BytesMut,
    /// In-flight ids in posting order, with their posting time.
    inflight: VecDeque<(u64, Instant)>,
    /// Completions produced locally (failed checks, broken endpoint), delivered by the next poll.
    ready: VecDeque<Completion>,
    broken: Option<ErrorKind>,
    hello: HelloOk,
    opts: TcpOptions,
    /// The socket's current SO_RCVTIMEO, to skip the setsockopt when it is unchanged.
    read_timeout: Duration,
}

impl TcpTransport {
    /// Connect to a memory server and shake hands, within `opts.connect_timeout`.
    pub fn connect(addr: impl ToSocketAddrs, opts: TcpOptions) -> Result<Self> {
        let mut stream = connect_bounded(addr, opts.connect_timeout)?;
        let mut reader = FrameReader::new();
        let hello = client_handshake(&mut stream, &mut reader, &opts.name, opts.connect_timeout)?;
        stream.set_write_timeout(Some(opts.op_timeout)).map_err(|e| Error::io("set timeout", e))?;
        Ok(Self {
            stream,
            reader,
            out: BytesMut::with_capacity(64 * 1024),
            inflight: VecDeque::with_capacity(opts.inflight_max),
            ready: VecDeque::new(),
            broken: None,
            hello,
            opts,
            read_timeout: Duration::ZERO,
        })
    }

    /// The server's handshake reply.
    pub fn hello(&self) -> &HelloOk {
        &self.hello
    }

    /// Whether the endpoint broke (further posts fail at once; reconnect to continue).
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    fn break_with(&mut self, kind: ErrorKind, why: &str) {
        if self.broken.is_none() {
            tracing::warn!(kind = %kind, "tcp endpoint broken: {why}");
        }
        self.broken = Some(kind);
        for (id, _) in self.inflight.drain(..) {
            let e = Error::new(kind, format!("operation lost: {why}"));
            self.ready.push_back(Completion { wr_id: id, result: Err(e) });
        }
    }

    fn complete(&mut self, d: OpDone) -> Result<Completion> {
        match self.inflight.pop_front() {
            Some((id, _)) if id == d.id => {}
            Some((id, _)) => {
                self.inflight.push_front((id, Instant::now()));
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("completion {} out of order (expected {id})", d.id),
                ));
            }
            None => {
                return Err(Error::new(ErrorKind::Protocol, format!("completion {} for nothing in flight", d.id)));
            }
        }
        let result = match d.result {
            Ok(OpResult::Done) => Ok(OpOutput::Write),
            Ok(OpResult::Data(b)) => Ok(OpOutput::Read(b)),
            Ok(OpResult::Value(v)) => Ok(OpOutput::Atomic(v)),
            Err((kind, msg)) => Err(Error::new(kind, msg)),
        };
        Ok(Completion { wr_id: d.id, result })
    }

    /// Handle one frame from the server; returns a completion if it was one.
    fn on_frame(&mut self, m: Msg) -> Result<Option<Completion>> {
        match m {
            Msg::OpDone(d) => self.complete(d).map(Some),
            Msg::Goodbye { reason, grace_ms } => {
                tracing::info!(grace_ms, "server says goodbye: {reason}");
                Ok(None)
            }
            Msg::ErrorReply { kind, message, .. } => {
                Err(Error::new(kind, format!("server closed the endpoint: {message}")))
            }
            other => Err(Error::new(ErrorKind::Protocol, format!("unexpected frame on a data endpoint: {other:?}"))),
        }
    }

    fn oldest_age(&self) -> Duration {
        self.inflight.front().map(|(_, t)| t.elapsed()).unwrap_or_default()
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn post(&mut self, batch: &mut Vec<WorkRequest>) -> Result<usize> {
        if let Some(kind) = self.broken {
            return Err(Error::new(kind, "endpoint is broken; reconnect"));
        }
        let room = self.opts.inflight_max.saturating_sub(self.inflight.len());
        let n = room.min(batch.len());
        let now = Instant::now();
        self.out.clear();
        for wr in batch.drain(..n) {
            if let Err(e) = wr.op.check(&wr.addr) {
                self.ready.push_back(Completion { wr_id: wr.wr_id, result: Err(e) });
                continue;
            }
            wire::encode_op(&mut self.out, wr.wr_id, &wr.addr, &wr.op);
            self.inflight.push_back((wr.wr_id, now));
        }
        if !self.out.is_empty()
            && let Err(e) = self.stream.write_all(&self.out)
        {
            let e = Error::io("sending operations", e);
            self.break_with(e.kind(), &e.to_string());
        }
        Ok(n)
    }

    fn poll(&mut self, out: &mut Vec<Completion>, max: usize, timeout: Duration) -> Result<usize> {
        let start = out.len();
        while out.len() - start < max {
            if let Some(c) = self.ready.pop_front() {
                out.push(c);
                continue;
            }
            if self.inflight.is_empty() {
                break;
            }
            match self.reader.try_next() {
                Ok(Some(m)) => match self.on_frame(m) {
                    Ok(Some(c)) => out.push(c),
                    Ok(None) => {}
                    Err(e) => self.break_with(e.kind(), &e.to_string()),
                },
                Err(e) => self.break_with(e.kind(), &e.to_string()),
                Ok(None) => {
                    if out.len() > start {
                        break; // deliver what we have rather than block for more
                    }
                    let left = self.opts.op_timeout.saturating_sub(self.oldest_age());
                    if left.is_zero() {
                        self.break_with(ErrorKind::Timeout, "server did not answer within op_timeout");
                        continue;
                    }
                    if timeout.is_zero() {
                        match self.reader.try_fill_fd(&self.stream) {
                            Ok(Some(_)) => continue,
                            Ok(None) => break, // nothing on the socket: never block
                            Err(e) => {
                                self.break_with(e.kind(), &e.to_string());
                                continue;
                            }
                        }
                    }
                    // Whole milliseconds, so the common case (the caller's constant wait) hits the cache.
                    let wait = Duration::from_millis(timeout.min(left).as_millis().max(1) as u64);
                    if wait != self.read_timeout && self.stream.set_read_timeout(Some(wait)).is_ok() {
                        self.read_timeout = wait;
                    }
                    match self.reader.fill_fd(&self.stream) {
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::Timeout => {
                            if timeout <= left {
                                break; // the caller's wait is over; ops are still within their bound
                            }
                        }
                        Err(e) => self.break_with(e.kind(), &e.to_string()),
                    }
                }
            }
        }
        Ok(out.len() - start)
    }

    fn wait_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(&self.stream))
    }

    fn inflight(&self) -> usize {
        self.inflight.len() + self.ready.len()
    }

    fn inflight_max(&self) -> usize {
        self.opts.inflight_max
    }

    fn op_timeout(&self) -> Duration {
        self.opts.op_timeout
    }
}
