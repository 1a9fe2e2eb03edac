//! Starting and stopping a server: worker runtimes, the acceptor, the housekeeping tick, shutdown.
//!
//! Threads: `workers` OS threads, each running a current-thread tokio runtime (no work stealing, no
//! cross-thread wake-ups on the data path); accepted connections are dealt to them round-robin.
//! Worker 0 also runs the acceptor, the housekeeping tick (lease expiry, due revocations, metrics) and
//! the metrics endpoint.
//!
//! Shutdown walks [`Phase`] forward: `Goodbye` (stop accepting, send `Goodbye { grace_ms }` to every
//! connection, keep serving until they leave or the grace ends), then every lease is revoked,
//! `Closing` (connections flush their last frames and close), `Stopped` (runtimes end, threads joined).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use farpool_core::size::format_bytes;
use farpool_core::wire::{self, Msg};
use farpool_core::{Error, ErrorKind, Result, ServerId};
use parking_lot::{Condvar, Mutex};
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::config::ServerConfig;
use crate::metrics::Exporter;
use crate::state::{Shared, error_reply};
use crate::stats::ServerStats;

/// Lifecycle of a server; only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Accepting and serving.
    Running,
    /// Not accepting; clients were told to leave.
    Goodbye,
    /// Connections flush and close.
    Closing,
    /// Runtimes stop.
    Stopped,
}

/// Wait until the phase reaches `at` (the watch guard is dropped before returning, keeping futures `Send`).
pub(crate) async fn reached(rx: &mut watch::Receiver<Phase>, at: Phase) {
    let _ = rx.wait_for(|p| *p >= at).await;
}

/// Entry point: `Server::start(config)`.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Validate `cfg`, reserve the pool, bind the listener (and the metrics endpoint), start the worker
    /// threads, and return once the server is listening.
    pub fn start(cfg: ServerConfig) -> Result<ServerHandle> {
        cfg.validate()?;
        let listener = std::net::TcpListener::bind(cfg.listen)
            .map_err(|e| Error::io(format!("cannot listen on {}", cfg.listen), e))?;
        listener.set_nonblocking(true).map_err(|e| Error::io("set_nonblocking", e))?;
        let local_addr = listener.local_addr().map_err(|e| Error::io("local_addr", e))?;
        let metrics_listener = match cfg.metrics {
            Some(a) => {
                let l = std::net::TcpListener::bind(a)
                    .map_err(|e| Error::io(format!("cannot listen for metrics on {a}"), e))?;
                l.set_nonblocking(true).map_err(|e| Error::io("set_nonblocking", e))?;
                Some(l)
            }
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().and_then(crate::metrics::bound);
        // The resolved address (port 0 -> the real port): it names the default shm socket.
        let shared = Arc::new(Shared::new(ServerConfig { listen: local_addr, ..cfg })?);
        let (phase_tx, phase_rx) = watch::channel(Phase::Running);
        let (threads, handles) = spawn_workers(shared.cfg.resolved_workers(), &phase_rx)?;
        let inner = Arc::new(Inner {
            shared: shared.clone(),
            phase: phase_tx,
            threads: Mutex::new(threads),
            stopped: Mutex::new(false),
            stopped_cv: Condvar::new(),
            shutting_down: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        });
        let h0 = handles[0].clone();
        let listener = {
            let _enter = h0.enter();
            TcpListener::from_std(listener).map_err(|e| Error::io("registering the listener", e))?
        };
        let exporter = metrics_listener.map(|l| {
            let _enter = h0.enter();
            let ex = Arc::new(Exporter::new());
            match TcpListener::from_std(l) {
                Ok(l) => drop(h0.spawn(crate::metrics::serve_http(l, ex.clone(), phase_rx.clone()))),
                Err(e) => tracing::error!("metrics endpoint not started: {e}"),
            }
            ex
        });
        h0.spawn(housekeeping(shared.clone(), exporter, phase_rx.clone()));
        h0.spawn(accept_loop(shared.clone(), listener, handles, phase_rx));
        let s = shared.stats();
        tracing::info!(
            addr = %local_addr,
            server_id = %shared.server_id,
            backing = %shared.cfg.backing,
            capacity = %format_bytes(s.slabs_total * s.slab_size_bytes),
            slab = %format_bytes(s.slab_size_bytes),
            slabs = s.slabs_total,
            lease_ms = shared.cfg.lease_ms,
            workers = shared.cfg.resolved_workers(),
            max_connections = shared.cfg.max_connections,
            metrics = ?metrics_addr,
            "farpool-memserver listening"
        );
        Ok(ServerHandle { inner, local_addr, metrics_addr })
    }
}

type Workers = (Vec<JoinHandle<()>>, Vec<Handle>);

fn spawn_workers(n: usize, phase: &watch::Receiver<Phase>) -> Result<Workers> {
    let mut threads = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    for i in 0..n.max(1) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("building a tokio runtime", e))?;
        handles.push(rt.handle().clone());
        let mut phase = phase.clone();
        let t = std::thread::Builder::new()
            .name(format!("farpool-io-{i}"))
            .spawn(move || {
                rt.block_on(reached(&mut phase, Phase::Stopped));
                rt.shutdown_timeout(Duration::from_millis(200));
            })
            .map_err(|e| Error::io("spawning a worker thread", e))?;
        threads.push(t);
    }
    Ok((threads, handles))
}

/// Accept connections, enforce the bound, deal them to workers.
async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    workers: Vec<Handle>,
    mut phase: watch::Receiver<Phase>,
) {
    let next = AtomicUsize::new(0);
    let mut last_warn: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = reached(&mut phase, Phase::Goodbye) => return,
        };
        let open = shared.conn_count.load(Relaxed);
        if open >= shared.cfg.max_connections {
            refuse(&shared, &stream, peer, open, &mut last_warn);
            continue;
        }
        shared.conn_count.fetch_add(1, Relaxed);
        shared.counters.connections_accepted.fetch_add(1, Relaxed);
        let w = &workers[next.fetch_add(1, Relaxed) % workers.len()];
        let (sh, ph) = (shared.clone(), phase.clone());
        match stream.into_std() {
            Ok(std_stream) => drop(w.spawn(async move {
                match tokio::net::TcpStream::from_std(std_stream) {
                    Ok(s) => crate::conn::serve(sh, s, peer, ph).await,
                    Err(e) => {
                        sh.conn_count.fetch_sub(1, Relaxed);
                        tracing::warn!(%peer, "cannot register connection: {e}");
                    }
                }
            })),
            Err(e) => {
                shared.conn_count.fetch_sub(1, Relaxed);
                tracing::warn!(%peer, "cannot hand over connection: {e}");
            }
        }
    }
}

/// Refuse a connection at the bound: a best-effort `ErrorReply { NoSpace }`, then close. Logged at most
/// once a second.
fn refuse(shared: &Shared, stream: &tokio::net::TcpStream, peer: SocketAddr, open: usize, last: &mut Option<Instant>) {
    shared.counters.connections_refused.fetch_add(1, Relaxed);
    let limit = shared.cfg.max_connections;
    let mut out = bytes::BytesMut::new();
    let m = format!("connection limit reached ({limit} connections)");
    wire::encode(&error_reply(0, ErrorKind::NoSpace, m), &mut out);
    let _ = stream.try_write(&out);
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
        *last = Some(Instant::now());
        let refused = shared.counters.connections_refused.load(Relaxed);
        tracing::warn!(%peer, open, limit, refused, "refusing connection: connection limit reached");
    }
}

/// The housekeeping tick: lease expiry, due revocations, metrics.
async fn housekeeping(shared: Arc<Shared>, exporter: Option<Arc<Exporter>>, mut phase: watch::Receiver<Phase>) {
    let tick = Duration::from_millis((shared.cfg.lease_ms / 10).clamp(5, 100));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = reached(&mut phase, Phase::Closing) => return,
        }
        shared.housekeeping();
        if let Some(ex) = &exporter {
            ex.update(&shared.stats());
        }
    }
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    phase: watch::Sender<Phase>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopped: Mutex<bool>,
    stopped_cv: Condvar,
    shutting_down: AtomicBool,
    panicked: AtomicBool,
}

impl Inner {
    fn shutdown(&self, grace: Duration) {
        if self.shutting_down.swap(true, Relaxed) {
            self.wait_stopped();
            return;
        }
        let grace_ms = grace.as_millis() as u64;
        tracing::info!(grace_ms, "shutting down: no new connections, telling clients goodbye");
        self.phase.send_replace(Phase::Goodbye);
        self.shared.broadcast(&Msg::Goodbye { reason: "server shutting down".into(), grace_ms });
        wait_until(grace, || self.shared.conn_count.load(Relaxed) == 0);
        self.shared.revoke_all();
        self.phase.send_replace(Phase::Closing);
        wait_until(Duration::from_millis(500), || self.shared.conn_count.load(Relaxed) == 0);
        self.phase.send_replace(Phase::Stopped);
        for t in self.threads.lock().drain(..) {
            if t.join().is_err() {
                self.panicked.store(true, Relaxed);
            }
        }
        tracing::info!("server stopped");
        *self.stopped.lock() = true;
        self.stopped_cv.notify_all();
    }

    fn wait_stopped(&self) {
        let mut s = self.stopped.lock();
        while !*s {
            self.stopped_cv.wait(&mut s);
        }
    }
}

/// Poll `done` every 5 ms for at most `bound`.
fn wait_until(bound: Duration, done: impl Fn() -> bool) {
    let end = Instant::now() + bound;
    while !done() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5).min(end.saturating_duration_since(Instant::now())));
    }
}

/// A running server. Dropping it shuts the server down with no grace.
#[derive(Debug)]
pub struct ServerHandle {
    inner: Arc<Inner>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
}

/// Stops a server from another thread (e.g. a signal handler). Cheap to clone.
#[derive(Clone, Debug)]
pub struct ShutdownTrigger {
    inner: Arc<Inner>,
}

impl ShutdownTrigger {
    /// Same as [`ServerHandle::shutdown`].
    pub fn shutdown(&self, grace: Duration) {
        self.inner.shutdown(grace);
    }
}

impl ServerHandle {
    /// The address the server listens on (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The metrics endpoint's address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The server's random id (as sent in `HelloOk`).
    pub fn server_id(&self) -> ServerId {
        self.inner.shared.server_id
    }

    /// A snapshot of slabs, leases, connections and counters.
    pub fn stats(&self) -> ServerStats {
        self.inner.shared.stats()
    }

    /// Graceful shutdown: stop accepting, send `Goodbye { grace_ms }` to every connection, keep serving
    /// until all clients left or `grace` passed, revoke every lease (holders get `Revoked`), close the
    /// connections and stop the threads. Blocks until done; idempotent (later calls wait for the first).
    pub fn shutdown(&self, grace: Duration) {
        self.inner.shutdown(grace);
    }

    /// A handle that can start the shutdown from another thread.
    pub fn trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger { inner: self.inner.clone() }
    }

    /// Block until the server has stopped (a shutdown through a [`ShutdownTrigger`] or `shutdown`).
    /// `Err(Internal)` if a worker thread panicked.
    pub fn join(self) -> Result<()> {
        self.inner.wait_stopped();
        if self.inner.panicked.load(Relaxed) {
            return Err(Error::new(ErrorKind::Internal, "a server worker thread panicked"));
        }
        Ok(())
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.inner.shutdown(Duration::ZERO);
    }
}
