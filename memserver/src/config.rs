//! Server configuration: [`ServerConfig`] with documented defaults, and the parsers shared by the
//! command line and the TOML file (sizes, durations, backings).
//!
//! Backing names are parsed in exactly one place, [`parse_backing`], which defers to
//! [`Backing::from_str`](std::str::FromStr): a new backing variant in `farpool-cxl` (e.g. `numa:N`,
//! `dax:PATH`) becomes available to the flag and the file without touching this crate.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use farpool_core::size::{format_bytes, parse_bytes};
use farpool_core::{Error, ErrorKind, Result};
use farpool_cxl::Backing;

/// Default listen address of the control and TCP data plane.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default pool capacity: 1 GiB.
pub const DEFAULT_CAPACITY_BYTES: u64 = 1 << 30;
/// Default slab size: 64 MiB.
pub const DEFAULT_SLAB_SIZE_BYTES: u64 = 64 << 20;
/// Default lease duration without renewal: 10 s.
pub const DEFAULT_LEASE_MS: u64 = 10_000;
/// Default bound on concurrent client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default grace given to clients on shutdown: 2 s.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Default bound on the handshake of a new connection: 10 s.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Shortest lease accepted (the reaper's tick is derived from it).
pub const MIN_LEASE_MS: u64 = 10;

/// Everything [`crate::Server::start`] needs. Build it with `ServerConfig::default().with_...()`; each
/// setter documents its default. [`ServerConfig::validate`] is called by `Server::start`.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to listen on (port 0: ephemeral, see `ServerHandle::local_addr`).
    pub listen: SocketAddr,
    /// Pool capacity in bytes, rounded down to whole slabs.
    pub capacity_bytes: u64,
    /// Slab size in bytes (a multiple of the page size).
    pub slab_size_bytes: u64,
    /// Where pool memory comes from.
    pub backing: Backing,
    /// Lease duration: a lease not renewed within this many milliseconds expires.
    pub lease_ms: u64,
    /// Prometheus `/metrics` HTTP endpoint, off when `None`.
    pub metrics: Option<SocketAddr>,
    /// Bound on concurrent client connections; more are refused (and the refusal is logged).
    pub max_connections: usize,
    /// Grace given to clients by `Goodbye` when the server shuts down on a signal.
    pub shutdown_grace: Duration,
    /// Number of I/O worker threads (one current-thread tokio runtime each); 0 = one per CPU.
    pub workers: usize,
    /// Bound on receiving the `Hello` of a new connection, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// Whether to offer the shared-memory transport to same-host clients (not with a `dax` backing).
    pub shm_enabled: bool,
    /// Unix socket of the shm transport; `None` = `$XDG_RUNTIME_DIR` or `/tmp` + `farpool-<port>.sock`.
    pub shm_socket: Option<std::path::PathBuf>,
    /// Whether to try to offer RDMA (it is offered only when the device opens and the pool registers).
    pub rdma_enabled: bool,
    /// RDMA device name (e.g. `mlx5_0`, `rxe_lo`); `None` = the first device with an active port.
    pub rdma_device: Option<String>,
    /// GID table index for RoCE; `None` = the RoCE v2 IPv4-mapped GID, else the first usable one.
    pub rdma_gid_index: Option<u32>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("default listen address parses"),
            capacity_bytes: DEFAULT_CAPACITY_BYTES,
            slab_size_bytes: DEFAULT_SLAB_SIZE_BYTES,
            backing: Backing::Anon,
            lease_ms: DEFAULT_LEASE_MS,
            metrics: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            workers: 0,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            shm_enabled: true,
            shm_socket: None,
            rdma_enabled: true,
            rdma_device: None,
            rdma_gid_index: None,
        }
    }
}

impl ServerConfig {
    /// Listen address. Default `127.0.0.1:7070`; use `127.0.0.1:0` for an ephemeral port.
    #[must_use]
    pub fn with_listen(mut self, listen: SocketAddr) -> Self {
        self.listen = listen;
        self
    }
    /// Pool capacity in bytes. Default 1 GiB.
    #[must_use]
    pub fn with_capacity_bytes(mut self, bytes: u64) -> Self {
        self.capacity_bytes = bytes;
        self
    }
    /// Slab size in bytes. Default 64 MiB.
    #[must_use]
    pub fn with_slab_size_bytes(mut self, bytes: u64) -> Self {
        self.slab_size_bytes = bytes;
        self
    }
    /// Backing of the pool. Default [`Backing::Anon`].
    #[must_use]
    pub fn with_backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }
    /// Lease duration in milliseconds. Default 10 000.
    #[must_use]
    pub fn with_lease_ms(mut self, ms: u64) -> Self {
        self.lease_ms = ms;
        self
    }
    /// Metrics endpoint address. Default off.
    #[must_use]
    pub fn with_metrics(mut self, addr: Option<SocketAddr>) -> Self {
        self.metrics = addr;
        self
    }
    /// Connection bound. Default 4096.
    #[must_use]
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }
    /// Shutdown grace. Default 2 s.
    #[must_use]
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }
    /// I/O worker threads. Default 0 (one per CPU).
    #[must_use]
    pub fn with_workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }
    /// Handshake bound in milliseconds. Default 10 000.
    #[must_use]
    pub fn with_handshake_timeout_ms(mut self, ms: u64) -> Self {
        self.handshake_timeout_ms = ms;
        self
    }

    /// Offer the shm transport. Default on.
    #[must_use]
    pub fn with_shm(mut self, enabled: bool) -> Self {
        self.shm_enabled = enabled;
        self
    }
    /// Socket path of the shm transport. Default `None`: `$XDG_RUNTIME_DIR` (else `/tmp`) +
    /// `farpool-<port>.sock`.
    #[must_use]
    pub fn with_shm_socket(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.shm_socket = path;
        self
    }

    /// Try to offer RDMA. Default on (offered only if a device opens and the pool registers with it).
    #[must_use]
    pub fn with_rdma(mut self, enabled: bool) -> Self {
        self.rdma_enabled = enabled;
        self
    }
    /// RDMA device by name. Default `None`: the first device with an active port.
    #[must_use]
    pub fn with_rdma_device(mut self, name: Option<String>) -> Self {
        self.rdma_device = name;
        self
    }
    /// RoCE GID index. Default `None`: chosen automatically (RoCE v2, IPv4-mapped first).
    #[must_use]
    pub fn with_rdma_gid_index(mut self, index: Option<u32>) -> Self {
        self.rdma_gid_index = index;
        self
    }

    /// Number of whole slabs the capacity holds.
    pub fn slab_count(&self) -> u64 {
        self.capacity_bytes / self.slab_size_bytes.max(1)
    }

    /// The worker count with 0 resolved to the number of CPUs.
    pub fn resolved_workers(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    /// Check the configuration; errors are of kind `Config` and say which setting is wrong.
    pub fn validate(&self) -> Result<()> {
        let page = farpool_cxl::backing::page_size() as u64;
        let bad = |m: String| Err(Error::new(ErrorKind::Config, m));
        if self.slab_size_bytes < page || !self.slab_size_bytes.is_multiple_of(page) {
            return bad(format!(
                "slab size {} must be a positive multiple of the page size ({page})",
                self.slab_size_bytes
            ));
        }
        if self.slab_size_bytes > u64::from(u32::MAX) + 1 {
            return bad(format!("slab size {} exceeds 4GiB", format_bytes(self.slab_size_bytes)));
        }
        if self.slab_count() == 0 {
            return bad(format!(
                "capacity {} holds no slab of {}",
                format_bytes(self.capacity_bytes),
                format_bytes(self.slab_size_bytes)
            ));
        }
        if self.slab_count() > u64::from(u32::MAX) {
            return bad("capacity holds more than 2^32 slabs".into());
        }
        if self.lease_ms < MIN_LEASE_MS {
            return bad(format!("lease of {} ms is shorter than the minimum of {MIN_LEASE_MS} ms", self.lease_ms));
        }
        if self.max_connections == 0 {
            return bad("max connections must be at least 1".into());
        }
        if self.handshake_timeout_ms == 0 {
            return bad("handshake timeout must be positive".into());
        }
        Ok(())
    }
}

/// Parse a backing name (`anon`, `memfd`, and whatever later variants [`Backing`] accepts).
pub fn parse_backing(s: &str) -> Result<Backing> {
    Backing::from_str(s.trim())
}

/// Parse a byte size such as `4GiB` (see [`farpool_core::size::parse_bytes`]).
pub fn parse_size(s: &str) -> Result<u64> {
    parse_bytes(s)
}

/// Parse a duration: a number followed by `ms`, `s`, `m` or `h` (`30s`, `500ms`, `2m`); `0` alone is zero.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let t = s.trim();
    let bad = || Error::new(ErrorKind::Config, format!("invalid duration {s:?}: expected e.g. 30s, 500ms or 2m"));
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms_per = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    let ms = n.checked_mul(ms_per).ok_or_else(bad)?;
    Ok(Duration::from_millis(ms))
}

/// Parse a socket address (`127.0.0.1:7070`), with a `Config` error naming the setting.
pub fn parse_addr(what: &str, s: &str) -> Result<SocketAddr> {
    s.trim().parse().map_err(|e| {
        Error::new(ErrorKind::Config, format!("invalid {what} address {s:?}: expected IP:PORT")).with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = ServerConfig::default();
        c.validate().unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.slab_count(), 16);
    }

    #[test]
    fn validation_names_the_problem() {
        let e = ServerConfig::default().with_slab_size_bytes(1000).validate().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.message().contains("page size"), "{e}");
        let e = ServerConfig::default().with_capacity_bytes(1 << 20).validate().unwrap_err();
        assert!(e.message().contains("holds no slab"), "{e}");
        let e = ServerConfig::default().with_lease_ms(1).validate().unwrap_err();
        assert!(e.message().contains("lease"), "{e}");
        assert!(ServerConfig::default().with_max_connections(0).validate().is_err());
    }

    #[test]
    fn parses_durations_backings_addresses() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "30", "s", "3x", "-1s", "99999999999999999999h"] {
            assert_eq!(parse_duration(bad).unwrap_err().kind(), ErrorKind::Config, "{bad}");
        }
        assert_eq!(parse_backing("memfd").unwrap(), Backing::Memfd);
        assert_eq!(parse_backing("floppy").unwrap_err().kind(), ErrorKind::Config);
        assert!(parse_addr("listen", "127.0.0.1:0").is_ok());
        assert!(parse_addr("listen", "nowhere").unwrap_err().message().contains("listen"));
    }
}
