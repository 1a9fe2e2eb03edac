//! Pool configuration: [`PoolBuilder`] and the [`TransportChoice`] a user can force.
//!
//! Owns: every knob of a [`crate::Pool`] and its validation. Invariants: a built [`PoolConfig`] has at
//! least one server, non-zero timeouts and a non-zero in-flight bound; nothing is read from the
//! environment.

use std::fmt;
use std::time::Duration;

use farpool_core::{Error, ErrorKind, Result};
use farpool_rdma::DeviceSelector;

use crate::Pool;

/// Address of the embedded default server.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7070";

/// Which transport the pool uses for data access.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TransportChoice {
    /// Pick per server: shm when the server shares our host and offers it, else rdma when both sides
    /// have a device, else tcp. See [`crate::negotiate`].
    #[default]
    Auto,
    /// TCP: the server executes each one-sided operation.
    Tcp,
    /// Shared memory; an error (`Unsupported`) where unavailable, never a fallback.
    Shm,
    /// RDMA; an error (`Unsupported`) where unavailable, never a fallback.
    Rdma,
}

impl fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Tcp => "tcp",
            Self::Shm => "shm",
            Self::Rdma => "rdma",
        })
    }
}

/// A validated pool configuration (what [`PoolBuilder::build`] uses).
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Server addresses (`host:port`), in index order.
    pub servers: Vec<String>,
    /// Transport policy.
    pub transport: TransportChoice,
    /// Bound on connect + handshake.
    pub connect_timeout: Duration,
    /// Bound on every control request and data operation.
    pub op_timeout: Duration,
    /// Operations in flight per data endpoint.
    pub inflight_max: usize,
    /// Fixed renew interval; `None` renews each lease at a third of its duration.
    pub renew_interval: Option<Duration>,
    /// Whether the heartbeat thread renews leases at all.
    pub heartbeat: bool,
    /// Capacity of each event subscriber's channel.
    pub event_capacity: usize,
    /// Idle data endpoints kept per server for the [`crate::Lease`] conveniences.
    pub idle_endpoints_max: usize,
    /// Minimum time between two reconnect attempts to a server that is down.
    pub reconnect_backoff: Duration,
    /// Name sent in the handshake (server logs).
    pub name: String,
    /// The RDMA device, port and GID (when rdma is negotiated or forced); default automatic: the first
    /// device with an active port and its RoCE v2 IPv4-mapped GID. A device is opened once per process
    /// per distinct selection.
    pub rdma: DeviceSelector,
    /// Create RDMA queue pairs and completion queues with the extended verbs API (`ibv_create_qp_ex`,
    /// `ibv_wr_*` posting, `ibv_start_poll`) when the provider has it (default true); false uses the
    /// legacy API throughout. See `farpool_rdma::EndpointConfig::with_extended_verbs`.
    pub rdma_extended_verbs: bool,
}

/// Builds a [`Pool`]: `PoolBuilder::new(servers).with_x(..).build()`.
#[derive(Clone, Debug)]
pub struct PoolBuilder {
    cfg: PoolConfig,
}

impl Default for PoolBuilder {
    /// The embedded default: one server at [`DEFAULT_SERVER`].
    fn default() -> Self {
        Self::new([DEFAULT_SERVER])
    }
}

impl PoolBuilder {
    /// A builder for a pool over `servers` (`"host:port"` strings or `SocketAddr`s). Server `i` of the
    /// pool is the `i`-th address given.
    pub fn new<I, S>(servers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: ToString,
    {
        Self {
            cfg: PoolConfig {
                servers: servers.into_iter().map(|s| s.to_string()).collect(),
                transport: TransportChoice::Auto,
                connect_timeout: Duration::from_millis(2000),
                op_timeout: Duration::from_millis(5000),
                inflight_max: 64,
                renew_interval: None,
                heartbeat: true,
                event_capacity: 1024,
                idle_endpoints_max: 16,
                reconnect_backoff: Duration::from_millis(500),
                name: "farpool-client".into(),
                rdma: DeviceSelector::new(),
                rdma_extended_verbs: true,
            },
        }
    }

    /// Transport policy. Default [`TransportChoice::Auto`].
    #[must_use]
    pub fn with_transport(mut self, t: TransportChoice) -> Self {
        self.cfg.transport = t;
        self
    }

    /// Bound on connecting and shaking hands with one server. Default 2000 ms.
    #[must_use]
    pub fn with_connect_timeout_ms(mut self, ms: u64) -> Self {
        self.cfg.connect_timeout = Duration::from_millis(ms);
        self
    }

    /// Bound on every control request (lease, renew, release, admin, ping) and every data operation;
    /// past it the call fails with `Timeout`. Default 5000 ms.
    #[must_use]
    pub fn with_op_timeout_ms(mut self, ms: u64) -> Self {
        self.cfg.op_timeout = Duration::from_millis(ms);
        self
    }

    /// Operations in flight per data endpoint (the pipelining window of batched calls). Default 64.
    #[must_use]
    pub fn with_inflight_max(mut self, n: usize) -> Self {
        self.cfg.inflight_max = n;
        self
    }

    /// Renew every lease each `ms` milliseconds instead of at a third of its duration. `0` restores the
    /// default (a third of each lease's duration, as granted by the server).
    #[must_use]
    pub fn with_renew_interval_ms(mut self, ms: u64) -> Self {
        self.cfg.renew_interval = (ms > 0).then(|| Duration::from_millis(ms));
        self
    }

    /// Whether leases are renewed in the background. Default `true`; with `false` every lease expires
    /// when the server says it does (useful to test expiry, or to renew by hand with [`crate::Lease::renew`]).
    #[must_use]
    pub fn with_heartbeat(mut self, on: bool) -> Self {
        self.cfg.heartbeat = on;
        self
    }

    /// Capacity of each [`Pool::events`] channel; when a subscriber falls this far behind, further
    /// events for it are dropped (and counted in the log) rather than block the pool. Default 1024.
    #[must_use]
    pub fn with_event_capacity(mut self, n: usize) -> Self {
        self.cfg.event_capacity = n;
        self
    }

    /// Idle data endpoints kept per server for the [`crate::Lease`] conveniences. Default 16.
    #[must_use]
    pub fn with_idle_endpoints_max(mut self, n: usize) -> Self {
        self.cfg.idle_endpoints_max = n;
        self
    }

    /// Minimum time between reconnect attempts to a server that is down; calls in between fail at once
    /// with the last error. Default 500 ms.
    #[must_use]
    pub fn with_reconnect_backoff_ms(mut self, ms: u64) -> Self {
        self.cfg.reconnect_backoff = Duration::from_millis(ms);
        self
    }

    /// Client name sent in the handshake, for the servers' logs. Default `farpool-client`.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.cfg.name = name.into();
        self
    }

    /// The RDMA device to use, by name (e.g. `mlx5_0`, `rxe_lo`; see `ibv_devices`). Default: the
    /// first device with an active port. A name that does not open makes rdma unavailable: `Auto`
    /// moves on to tcp and says why, a forced `Rdma` fails with `Unsupported`.
    #[must_use]
    pub fn with_rdma_device(mut self, name: impl Into<String>) -> Self {
        self.cfg.rdma = std::mem::take(&mut self.cfg.rdma).with_device(name);
        self
    }

    /// The RDMA port, from 1. Default: the device's first active port.
    #[must_use]
    pub fn with_rdma_port(mut self, port: u8) -> Self {
        self.cfg.rdma = std::mem::take(&mut self.cfg.rdma).with_port(port);
        self
    }

    /// The GID index of the RDMA port (RoCE; `show_gids` lists them). Default: the RoCE v2
    /// IPv4-mapped GID, else the first usable one.
    #[must_use]
    pub fn with_rdma_gid_index(mut self, index: u32) -> Self {
        self.cfg.rdma = std::mem::take(&mut self.cfg.rdma).with_gid_index(index);
        self
    }

    /// Whether RDMA endpoints use the extended verbs API where the provider has it (default true).
    #[must_use]
    pub fn with_rdma_extended_verbs(mut self, on: bool) -> Self {
        self.cfg.rdma_extended_verbs = on;
        self
    }

    /// Check the configuration without connecting.
    pub fn validate(&self) -> Result<&PoolConfig> {
        let c = &self.cfg;
        let bad = |m: &str| Err(Error::new(ErrorKind::Config, m.to_owned()));
        if c.servers.is_empty() {
            return bad("a pool needs at least one server address");
        }
        if c.servers.iter().any(|s| s.trim().is_empty()) {
            return bad("empty server address");
        }
        if c.connect_timeout.is_zero() || c.op_timeout.is_zero() {
            return bad("connect and op timeouts must be non-zero");
        }
        if c.inflight_max == 0 || c.event_capacity == 0 {
            return bad("inflight_max and event_capacity must be non-zero");
        }
        if c.rdma.device().is_some_and(|d| d.trim().is_empty()) {
            return bad("empty RDMA device name");
        }
        if c.rdma.port() == Some(0) {
            return bad("RDMA ports are numbered from 1");
        }
        Ok(c)
    }

    /// Validate, connect to the servers and start the background threads.
    ///
    /// Succeeds when at least one server answers the handshake; the others are reported as
    /// [`crate::PoolEvent::ServerDown`] and retried on use. Fails with `Config` for a bad configuration,
    /// with `Unsupported` when a forced transport is unavailable for a reachable server, and with the
    /// last server's error (`Unreachable`, `Timeout`, ...) when none can be reached, within
    /// `connect_timeout` per server.
    pub fn build(self) -> Result<Pool> {
        self.validate()?;
        Pool::start(self.cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let b = PoolBuilder::default();
        let c = b.validate().unwrap();
        assert_eq!(c.servers, vec![DEFAULT_SERVER.to_owned()]);
        assert_eq!(c.transport, TransportChoice::Auto);
        assert_eq!(c.op_timeout, Duration::from_secs(5));
        assert!(c.heartbeat && c.renew_interval.is_none());
        let none: Vec<String> = Vec::new();
        assert_eq!(PoolBuilder::new(none).validate().unwrap_err().kind(), ErrorKind::Config);
        let e = PoolBuilder::default().with_inflight_max(0).build().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        let e = PoolBuilder::default().with_op_timeout_ms(0).build().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        let b = PoolBuilder::new(["127.0.0.1:1".parse::<std::net::SocketAddr>().unwrap()]).with_renew_interval_ms(7);
        assert_eq!(b.validate().unwrap().renew_interval, Some(Duration::from_millis(7)));
        assert_eq!(b.validate().unwrap().servers[0], "127.0.0.1:1");
    }

    #[test]
    fn rdma_selection_is_validated_and_printed() {
        let c = PoolBuilder::default();
        assert_eq!(c.validate().unwrap().rdma, DeviceSelector::new());
        assert!(c.validate().unwrap().rdma_extended_verbs, "extended verbs by default");
        assert!(!PoolBuilder::default().with_rdma_extended_verbs(false).validate().unwrap().rdma_extended_verbs);
        assert_eq!(c.validate().unwrap().rdma.to_string(), "automatic");
        let b = PoolBuilder::default().with_rdma_device("rxe_lo").with_rdma_port(1).with_rdma_gid_index(1);
        assert_eq!(b.validate().unwrap().rdma.to_string(), "rxe_lo, port 1, gid index 1");
        assert_eq!(
            PoolBuilder::default().with_rdma_gid_index(3).validate().unwrap().rdma.to_string(),
            "first active device, gid index 3"
        );
        let e = PoolBuilder::default().with_rdma_device(" ").build().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("device name"), "{e}");
        let e = PoolBuilder::default().with_rdma_port(0).build().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
    }
}
