//! The control connection to one memory server.
//!
//! Owns one TCP connection after its handshake, a background reader thread, and the table of callers
//! waiting for replies. Requests carry a fresh request id; the reader thread routes each reply to the
//! waiter registered under its id (a bounded, one-slot channel) and hands unsolicited frames (revoke
//! notices, revocations, goodbye) to the connection's sink. When the connection breaks, the reader marks
//! it down *before* dropping the waiters, so every waiter fails at once with the cause, and a request
//! registered after that sees the mark: no caller waits longer than its own bound.
//!
//! Invariants: a [`PendingReply`] removes its table entry when dropped (no leak on timeout); writes are
//! serialised by one mutex and bounded by the op timeout; a failed write shuts the socket down, so the
//! reader reports the connection down exactly once; a connection closed by [`ControlConn::close`]
//! reports nothing.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, bounded};
use farpool_core::tcp::{client_handshake, connect_bounded};
use farpool_core::wire::{self, FrameReader, HelloOk, Msg};
use farpool_core::{Error, ErrorKind, Result};
use parking_lot::Mutex;

/// What a control connection reports to its owner.
#[derive(Debug)]
pub(crate) enum ConnEvent {
    /// A frame the server pushed on its own (`RevokeNotice`, `Revoked`, `Goodbye`, `ErrorReply{req: 0}`).
    Notice(Msg),
    /// The connection broke; sent once.
    Down(Error),
}

/// Receives a connection's events on its reader thread; must not block for long.
pub(crate) type ConnSink = Box<dyn Fn(ConnEvent) + Send + 'static>;

#[derive(Default)]
struct Shared {
    pending: Mutex<HashMap<u64, Sender<Msg>>>,
    down: OnceLock<Arc<Error>>,
    closing: AtomicBool,
}

impl Shared {
    fn down_error(&self, what: &str) -> Error {
        match self.down.get() {
            Some(e) => Error::new(e.kind(), format!("{what}: control connection is down: {e}")),
            None => Error::new(ErrorKind::Unreachable, format!("{what}: control connection is down")),
        }
    }
}

/// A live control connection. See the module docs.
pub(crate) struct ControlConn {
    addr: String,
    hello: HelloOk,
    writer: Mutex<TcpStream>,
    shared: Arc<Shared>,
    next_req: AtomicU64,
    op_timeout: Duration,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for ControlConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlConn").field("addr", &self.addr).field("down", &self.is_down()).finish_non_exhaustive()
    }
}

impl ControlConn {
    /// Connect and shake hands within `connect_timeout`, then start the reader thread.
    pub(crate) fn connect(
        addr: &str,
        name: &str,
        connect_timeout: Duration,
        op_timeout: Duration,
        sink: ConnSink,
    ) -> Result<Self> {
        let mut stream = connect_bounded(addr, connect_timeout)?;
        let mut frames = FrameReader::new();
        let hello = client_handshake(&mut stream, &mut frames, name, connect_timeout)
            .map_err(|e| Error::new(e.kind(), format!("handshake with {addr}: {e}")))?;
        let io = |e| Error::io(format!("configuring the connection to {addr}"), e);
        stream.set_read_timeout(None).map_err(io)?;
        stream.set_write_timeout(Some(op_timeout)).map_err(io)?;
        let read_half = stream.try_clone().map_err(io)?;
        let shared = Arc::new(Shared::default());
        let reader = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("farpool-ctl-{addr}"))
                .spawn(move || reader_loop(read_half, frames, &shared, &sink))
                .map_err(|e| Error::io("spawning the control reader thread", e))?
        };
        Ok(Self {
            addr: addr.to_owned(),
            hello,
            writer: Mutex::new(stream),
            shared,
            next_req: AtomicU64::new(1),
            op_timeout,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// The server's handshake reply.
    pub(crate) fn hello(&self) -> &HelloOk {
        &self.hello
    }

    /// Whether the connection has broken.
    pub(crate) fn is_down(&self) -> bool {
        self.shared.down.get().is_some()
    }

    /// The bound used by [`PendingReply::wait_op`].
    pub(crate) fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// Send the request built by `make(req_id)` and return the handle of its reply.
    pub(crate) fn send(&self, what: &'static str, make: impl FnOnce(u64) -> Msg) -> Result<PendingReply> {
        if self.is_down() {
            return Err(self.shared.down_error(what));
        }
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = bounded(1);
        self.shared.pending.lock().insert(req, tx);
        let reply = PendingReply { req, what, rx, shared: self.shared.clone(), sent_at: Instant::now() };
        if self.is_down() {
            return Err(self.shared.down_error(what)); // raced with the reader's teardown
        }
        let mut out = BytesMut::with_capacity(64);
        wire::encode(&make(req), &mut out);
        let mut w = self.writer.lock();
        if let Err(e) = w.write_all(&out) {
            let _ = w.shutdown(Shutdown::Both); // the reader reports the connection down
            return Err(Error::io(format!("{what}: sending to {}", self.addr), e));
        }
        Ok(reply)
    }

    /// Send a request and wait for its reply within the op timeout.
    pub(crate) fn call(&self, what: &'static str, make: impl FnOnce(u64) -> Msg) -> Result<Msg> {
        self.send(what, make)?.wait(self.op_timeout)
    }

    /// Shut the connection down without reporting it, and join the reader thread.
    pub(crate) fn close(&self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        let _ = self.writer.lock().shutdown(Shutdown::Both);
        let reader = self.reader.lock().take();
        if let Some(t) = reader.filter(|t| t.thread().id() != std::thread::current().id()) {
            let _ = t.join(); // prompt: the socket is shut down, so the reader's read returns
        }
    }

    /// Send a frame that expects no reply (best effort, bounded by the write timeout).
    pub(crate) fn send_oneway(&self, msg: &Msg) -> Result<()> {
        let mut out = BytesMut::with_capacity(64);
        wire::encode(msg, &mut out);
        self.writer.lock().write_all(&out).map_err(|e| Error::io(format!("sending to {}", self.addr), e))
    }

    /// A fresh request id (for [`ControlConn::send_oneway`] frames that carry one).
    pub(crate) fn next_req(&self) -> u64 {
        self.next_req.fetch_add(1, Ordering::Relaxed)
    }
}

impl Drop for ControlConn {
    fn drop(&mut self) {
        self.close();
    }
}

/// A request in flight: wait for it, or poll it. Dropping it forgets the request.
#[derive(Debug)]
pub(crate) struct PendingReply {
    req: u64,
    what: &'static str,
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    sent_at: Instant,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("down", &self.down.get()).finish_non_exhaustive()
    }
}

impl PendingReply {
    /// When the request was sent.
    pub(crate) fn sent_at(&self) -> Instant {
        self.sent_at
    }

    /// Wait up to `timeout` for the reply; an `ErrorReply` becomes an `Err` of its kind.
    pub(crate) fn wait(self, timeout: Duration) -> Result<Msg> {
        match self.rx.recv_timeout(timeout) {
            Ok(m) => reply_result(self.what, m),
            Err(RecvTimeoutError::Timeout) => Err(Error::new(
                ErrorKind::Timeout,
                format!("{}: no reply within {} ms", self.what, timeout.as_millis()),
            )),
            Err(RecvTimeoutError::Disconnected) => Err(self.shared.down_error(self.what)),
        }
    }

    /// The reply if it has arrived: `None` while still waiting.
    pub(crate) fn try_take(&self) -> Option<Result<Msg>> {
        match self.rx.try_recv() {
            Ok(m) => Some(reply_result(self.what, m)),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(self.shared.down_error(self.what))),
        }
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        self.shared.pending.lock().remove(&self.req);
    }
}

fn reply_result(what: &str, m: Msg) -> Result<Msg> {
    match m {
        Msg::ErrorReply { kind, message, .. } => Err(Error::new(kind, format!("{what}: server refused: {message}"))),
        m => Ok(m),
    }
}

fn reader_loop(mut stream: TcpStream, mut frames: FrameReader, shared: &Shared, sink: &ConnSink) {
    let err = loop {
        let m = match frames.next(&mut stream) {
            Ok(m) => m,
            Err(e) => break e,
        };
        let routed = match (&m, m.req_id()) {
            (Msg::ErrorReply { req: 0, .. }, _) | (_, None) => None,
            (_, Some(req)) => Some(req),
        };
        match routed {
            Some(req) => match shared.pending.lock().remove(&req) {
                Some(tx) => {
                    let _ = tx.try_send(m);
                }
                None => tracing::debug!(req, "reply for a request nobody waits for any more"),
            },
            None => sink(ConnEvent::Notice(m)),
        }
    };
    let _ = shared.down.set(Arc::new(err.duplicate()));
    shared.pending.lock().clear();
    if !shared.closing.load(Ordering::SeqCst) {
        sink(ConnEvent::Down(err));
    }
}
