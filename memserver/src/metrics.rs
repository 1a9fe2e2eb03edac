//! Prometheus metrics: a per-server recorder fed from stats snapshots by the housekeeping tick (never
//! from the data path), served as text on `GET /metrics` by a minimal HTTP/1.0 endpoint.
//!
//! The recorder is local to the server (not the process-global one), so several servers embedded in one
//! process (tests, benches) each export their own figures. Requests are bounded: at most
//! [`MAX_REQUEST_BYTES`] of request head, read within [`REQUEST_TIMEOUT`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Key, Label, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::server::Phase;
use crate::stats::ServerStats;

/// Largest request head read from a scraper.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Bound on reading a request and writing its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The server's metrics recorder.
pub(crate) struct Exporter {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exporter")
    }
}

const METADATA: metrics::Metadata<'static> = metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);

impl Exporter {
    pub(crate) fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        Self { recorder, handle }
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &'static str)], v: u64) {
        let key = Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, *v)).collect::<Vec<_>>());
        self.recorder.register_counter(&key, &METADATA).absolute(v);
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &'static str)], v: u64) {
        let key = Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, *v)).collect::<Vec<_>>());
        self.recorder.register_gauge(&key, &METADATA).set(v as f64);
    }

    /// Publish a snapshot.
    pub(crate) fn update(&self, s: &ServerStats) {
        for (op, v) in
            [("read", s.ops_read), ("write", s.ops_write), ("cas", s.ops_cas), ("fetch_add", s.ops_fetch_add)]
        {
            self.counter("farpool_ops_total", &[("op", op)], v);
        }
        self.counter("farpool_bytes_read_total", &[], s.bytes_read);
        self.counter("farpool_bytes_written_total", &[], s.bytes_written);
        for (kind, v) in &s.errors {
            self.counter("farpool_errors_total", &[("kind", kind.as_str())], *v);
        }
        self.counter("farpool_leases_granted_total", &[], s.leases_granted);
        self.counter("farpool_leases_expired_total", &[], s.leases_expired);
        self.counter("farpool_leases_released_total", &[], s.leases_released);
        self.counter("farpool_slabs_revoked_total", &[], s.slabs_revoked);
        self.counter("farpool_connections_accepted_total", &[], s.connections_accepted);
        self.counter("farpool_connections_refused_total", &[], s.connections_refused);
        self.gauge("farpool_leases_active", &[], s.leases_active);
        for (state, v) in [("free", s.slabs_free), ("used", s.slabs_granted), ("retiring", s.slabs_retiring)] {
            self.gauge("farpool_slabs", &[("state", state)], v);
        }
        self.gauge("farpool_slabs_total", &[], s.slabs_total);
        self.gauge("farpool_slab_size_bytes", &[], s.slab_size_bytes);
        self.gauge("farpool_connections", &[], s.connections);
        self.gauge("farpool_draining", &[], u64::from(s.draining));
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        self.handle.render()
    }
}

/// Serve `GET /metrics` on `listener` until the server stops.
pub(crate) async fn serve_http(listener: TcpListener, exporter: Arc<Exporter>, mut phase: watch::Receiver<Phase>) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let ex = exporter.clone();
                    tokio::spawn(async move {
                        if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &ex)).await {
                            tracing::debug!("metrics request timed out: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = crate::server::reached(&mut phase, Phase::Closing) => return,
        }
    }
}

async fn answer(mut stream: TcpStream, exporter: &Exporter) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let (status, body) = if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET / ") {
        ("200 OK", exporter.render())
    } else {
        ("404 Not Found", "try GET /metrics\n".to_owned())
    };
    let resp = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The address a metrics listener is bound to (for logs and `ServerHandle::metrics_addr`).
pub(crate) fn bound(listener: &std::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
