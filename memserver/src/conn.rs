//! One client connection: handshake, then a loop that reads every available frame, executes them in
//! order, and writes all replies with one write.
//!
//! Bounds: the input buffer holds at most one maximal frame plus one read chunk (the codec rejects a
//! length prefix above `MAX_FRAME_LEN` before buffering its body); the output buffer stops accepting
//! replies at [`OUT_HIGH_WATER_BYTES`], at which point the task writes before decoding more, and it does
//! not read from the socket while unwritten output remains (backpressure on a client that does not read).
//! A write that makes no progress for [`WRITE_STALL`] closes the connection.
//!
//! A protocol violation (garbage, oversized length, unknown tag, a frame a client may not send) closes
//! only this connection, after an `ErrorReply { req: 0, kind: Protocol }` when the socket still takes it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::BytesMut;
use farpool_core::wire::{self, FEATURE_RDMA, FEATURE_SHM, FEATURE_TCP, HelloOk, Msg};
use farpool_core::{ErrorKind, Result};
use farpool_cxl::gather::{self, Piece};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::dataplane;
use crate::server::Phase;
use crate::state::{ConnId, Shared, error_reply};
use crate::stats::BatchCounts;

/// Stop decoding requests once this many reply bytes are buffered, and write them first.
pub const OUT_HIGH_WATER_BYTES: usize = 2 << 20;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;
/// Output capacity kept between batches; a larger buffer (after big reads) is released.
const OUT_KEEP_BYTES: usize = 4 << 20;
/// READs whose data waits in pool memory for one `writev(2)` at most (two iovecs each, under `IOV_MAX`).
const MAX_DEFERRED: usize = 256;
/// Bound on a write that makes no progress.
pub const WRITE_STALL: Duration = Duration::from_secs(30);

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The peer closed cleanly between frames, or the server closed it on shutdown.
    Closed,
    /// The peer closed in the middle of a frame.
    MidFrame(usize),
    /// The peer broke the protocol (reply already attempted).
    Protocol(String),
    /// Socket error.
    Io(io::Error),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        End::Io(e)
    }
}

/// Decrements the connection count when the task ends, however it ends.
struct CountGuard(Arc<Shared>, ConnId);

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.unregister_conn(self.1);
        self.0.conn_count.fetch_sub(1, Relaxed);
    }
}

/// Serve one accepted connection until it closes. The caller already counted it in `conn_count`.
pub(crate) async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, phase: watch::Receiver<Phase>) {
    let (id, rx) = shared.register_conn();
    let _guard = CountGuard(shared.clone(), id);
    let _ = stream.set_nodelay(true);
    let mut c = Conn {
        shared,
        stream,
        id,
        rx,
        phase,
        inbuf: BytesMut::with_capacity(READ_CHUNK),
        out: BytesMut::new(),
        spare: BytesMut::new(),
    };
    match c.run().await {
        End::Closed => tracing::debug!(conn = id, %peer, "connection closed"),
        End::MidFrame(n) => tracing::info!(conn = id, %peer, "peer disconnected in the middle of a frame ({n} bytes)"),
        End::Protocol(m) => tracing::info!(conn = id, %peer, "closing connection on protocol error: {m}"),
        End::Io(e) => tracing::debug!(conn = id, %peer, "connection ended: {e}"),
    }
}

struct Conn {
    shared: Arc<Shared>,
    stream: TcpStream,
    id: ConnId,
    rx: mpsc::Receiver<Msg>,
    phase: watch::Receiver<Phase>,
    inbuf: BytesMut,
    out: BytesMut,
    /// A second output buffer, swapped with `out` after a vectored write (keeps its capacity).
    spare: BytesMut,
}

impl Conn {
    async fn run(&mut self) -> End {
        let timeout = Duration::from_millis(self.shared.cfg.handshake_timeout_ms);
        match tokio::time::timeout(timeout, self.handshake()).await {
            Ok(Ok(())) => {}
            Ok(Err(end)) => return end,
            Err(_) => return self.protocol_error(format!("no Hello within {} ms", timeout.as_millis())).await,
        }
        match self.serve_frames().await {
            Ok(()) => End::Closed,
            Err(end) => end,
        }
    }

    /// Receive `Hello`, answer `HelloOk` or a `Protocol` error.
    async fn handshake(&mut self) -> Result<(), End> {
        let msg = loop {
            match wire::decode(&mut self.inbuf) {
                Ok(Some(m)) => break m,
                Ok(None) => read_some(&self.stream, &mut self.inbuf).await?,
                Err(e) => return Err(self.protocol_error(e.message().to_owned()).await),
            }
        };
        let reply = match msg {
            Msg::Hello { magic, .. } if magic != wire::MAGIC => {
                return Err(self.protocol_error(format!("bad magic {magic:#010x}: not a farpool client")).await);
            }
            Msg::Hello { version, .. } if version != wire::VERSION => {
                let m = format!("protocol version {version} is not supported; this server speaks {}", wire::VERSION);
                return Err(self.protocol_error(m).await);
            }
            Msg::Hello { name, .. } => {
                tracing::debug!(conn = self.id, client = %name, "handshake");
                Msg::HelloOk(HelloOk {
                    version: wire::VERSION,
                    server_id: self.shared.server_id,
                    host_id: self.shared.host_id.clone(),
                    features: FEATURE_TCP
                        | if self.shared.shm.is_some() { FEATURE_SHM } else { 0 }
                        | if self.shared.rdma.offered() { FEATURE_RDMA } else { 0 },
                    shm_path: self.shared.shm.as_ref().map(|s| s.path()).unwrap_or_default(),
                    slab_size: self.shared.cfg.slab_size_bytes,
                })
            }
            other => return Err(self.protocol_error(format!("expected Hello, got {}", frame_name(&other))).await),
        };
        wire::encode(&reply, &mut self.out);
        self.flush().await
    }

    /// The main loop: execute buffered frames, deliver notices, write, then wait for more.
    async fn serve_frames(&mut self) -> Result<(), End> {
        let mut counts = BatchCounts::default();
        loop {
            let more = self.execute_buffered(&mut counts);
            self.shared.counters.flush(&mut counts);
            let more = match more {
                Ok(more) => more,
                Err(m) => return Err(self.protocol_error(m).await),
            };
            while let Ok(m) = self.rx.try_recv() {
                wire::encode(&m, &mut self.out);
            }
            self.flush().await?;
            if more {
                continue; // stopped at the output high-water mark: frames are still buffered
            }
            if *self.phase.borrow() >= Phase::Closing {
                return Ok(());
            }
            let Self { stream, inbuf, rx, phase, out, .. } = self;
            let closing = tokio::select! {
                r = read_some(stream, inbuf) => r.map(|()| false)?,
                m = rx.recv() => {
                    if let Some(m) = m {
                        wire::encode(&m, out);
                    }
                    false
                }
                () = crate::server::reached(phase, Phase::Closing) => true,
            };
            if closing {
                while let Ok(m) = self.rx.try_recv() {
                    wire::encode(&m, &mut self.out);
                }
                self.flush().await?;
                return Ok(());
            }
        }
    }

    /// Decode and execute whole frames until none is left or the output is at its high-water mark.
    /// Returns whether frames may remain; `Err` is a protocol violation.
    ///
    /// Data operations run under one [`GrantView`](crate::grants::GrantView) per stretch of them; their
    /// READ data stays in pool memory ([`dataplane::Deferred`]) and is written with the replies in one
    /// `writev(2)` before the view is dropped, whatever the socket did not take being copied into
    /// `out` then. A control frame ends the stretch first (it may take the grant table's write lock).
    fn execute_buffered(&mut self, counts: &mut BatchCounts) -> Result<bool, String> {
        let now = self.shared.now_ms();
        let shared = self.shared.clone();
        loop {
            let view = shared.grants.view();
            let mut deferred = Vec::new();
            let stop = loop {
                if self.out.len() >= OUT_HIGH_WATER_BYTES || deferred.len() >= MAX_DEFERRED {
                    break Stop::Full;
                }
                match wire::decode(&mut self.inbuf) {
                    Ok(Some(Msg::Op(op))) => {
                        dataplane::execute_in(&view, &op, now, &mut self.out, counts, Some(&mut deferred));
                    }
                    Ok(Some(m)) => break Stop::Control(m),
                    Ok(None) => break Stop::Drained,
                    Err(e) => break Stop::Bad(e.message().to_owned()),
                }
            };
            if !deferred.is_empty() {
                // Count the batch before its replies leave: a client that got them sees them in the stats.
                self.shared.counters.flush(counts);
                self.write_deferred(&deferred);
            }
            drop(view);
            match stop {
                Stop::Control(m) => {
                    let reply = self.control(m)?;
                    wire::encode(&reply, &mut self.out);
                }
                Stop::Drained => return Ok(false),
                Stop::Full => return Ok(true),
                Stop::Bad(e) => return Err(e),
            }
        }
    }

    /// Write `out` with the deferred READ data spliced in, with one non-blocking `writev(2)`; leave in
    /// `out` (copied) whatever the socket did not take. A socket error leaves everything in `out`, for
    /// `flush` to meet the error again and end the connection.
    fn write_deferred(&mut self, deferred: &[dataplane::Deferred<'_>]) {
        let mut pieces = Vec::with_capacity(2 * deferred.len() + 1);
        let mut prev = 0;
        for d in deferred {
            pieces.push(Piece::Bytes(&self.out[prev..d.at]));
            pieces.push(Piece::Pool(d.span));
            prev = d.at;
        }
        pieces.push(Piece::Bytes(&self.out[prev..]));
        let fd = self.stream.as_fd();
        let written = self.stream.try_io(Interest::WRITABLE, || gather::write_pieces(fd, &pieces)).unwrap_or(0);
        let mut rest = std::mem::take(&mut self.spare);
        rest.clear();
        gather::copy_rest(&pieces, written, &mut rest);
        drop(pieces);
        self.spare = std::mem::replace(&mut self.out, rest);
        if self.spare.capacity() > OUT_KEEP_BYTES {
            self.spare = BytesMut::new();
        }
    }

    /// Answer a control-plane frame.
    fn control(&self, m: Msg) -> Result<Msg, String> {
        let s = &self.shared;
        Ok(match m {
            Msg::LeaseRequest { req, slabs, flags } => s.lease_request(self.id, req, slabs, flags),
            Msg::Renew { req, lease, secret } => s.renew(self.id, req, lease, secret),
            Msg::Release { req, lease, secret } => s.release(self.id, req, lease, secret),
            Msg::Ping { req } => Msg::Pong { req },
            Msg::Admin { req, cmd } => s.admin(req, cmd),
            Msg::RdmaConnect { req, info } => match s.rdma.connect(self.id, &info) {
                Ok(info) => Msg::RdmaAccepted { req, info },
                Err(e) => {
                    s.counters.error(e.kind());
                    tracing::info!(conn = self.id, "RdmaConnect refused: {e}");
                    error_reply(req, e.kind(), e.to_string())
                }
            },
            other => return Err(format!("a client may not send {}", frame_name(&other))),
        })
    }

    /// Write all buffered output; a write with no progress for `WRITE_STALL` fails.
    async fn flush(&mut self) -> Result<(), End> {
        let mut pos = 0;
        while pos < self.out.len() {
            match self.stream.try_write(&self.out[pos..]) {
                Ok(n) => pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match tokio::time::timeout(WRITE_STALL, self.stream.writable()).await {
                        Ok(r) => r?,
                        Err(_) => return Err(End::Io(io::Error::new(io::ErrorKind::TimedOut, "peer does not read"))),
                    }
                }
                Err(e) => return Err(End::Io(e)),
            }
        }
        if self.out.capacity() > OUT_KEEP_BYTES {
            self.out = BytesMut::new();
        } else {
            self.out.clear();
        }
        Ok(())
    }

    /// Send `ErrorReply { req: 0, Protocol }` (best effort, bounded) and return the end reason.
    async fn protocol_error(&mut self, message: String) -> End {
        self.shared.counters.error(ErrorKind::Protocol);
        self.out.clear();
        wire::encode(&error_reply(0, ErrorKind::Protocol, message.clone()), &mut self.out);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
        End::Protocol(message)
    }
}

/// Why a stretch of data operations under one grant view ended.
enum Stop {
    /// No whole frame left in the input.
    Drained,
    /// Output at its high-water mark, or [`MAX_DEFERRED`] READs deferred.
    Full,
    /// A control-plane frame, to answer outside the view.
    Control(Msg),
    /// A protocol violation.
    Bad(String),
}

/// Read what is available (at least one byte). EOF is `Closed` or `MidFrame`.
async fn read_some(stream: &TcpStream, inbuf: &mut BytesMut) -> Result<(), End> {
    if inbuf.capacity() - inbuf.len() < READ_CHUNK {
        inbuf.reserve(READ_CHUNK);
    }
    loop {
        stream.readable().await?;
        match stream.try_read_buf(inbuf) {
            Ok(0) if inbuf.is_empty() => return Err(End::Closed),
            Ok(0) => return Err(End::MidFrame(inbuf.len())),
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(End::Io(e)),
        }
    }
}

/// A short name of a frame for error messages (never the payload).
fn frame_name(m: &Msg) -> &'static str {
    match m {
        Msg::Hello { .. } => "Hello",
        Msg::LeaseRequest { .. } => "LeaseRequest",
        Msg::Renew { .. } => "Renew",
        Msg::Release { .. } => "Release",
        Msg::Op(_) => "Op",
        Msg::Admin { .. } => "Admin",
        Msg::Ping { .. } => "Ping",
        Msg::RdmaConnect { .. } => "RdmaConnect",
        Msg::HelloOk(_) => "HelloOk",
        Msg::LeaseGranted(_) => "LeaseGranted",
        Msg::Renewed { .. } => "Renewed",
        Msg::Ack { .. } => "Ack",
        Msg::OpDone(_) => "OpDone",
        Msg::RevokeNotice { .. } => "RevokeNotice",
        Msg::Revoked { .. } => "Revoked",
        Msg::AdminReply { .. } => "AdminReply",
        Msg::ErrorReply { .. } => "ErrorReply",
        Msg::Goodbye { .. } => "Goodbye",
        Msg::Pong { .. } => "Pong",
        Msg::RdmaAccepted { .. } => "RdmaAccepted",
    }
}
