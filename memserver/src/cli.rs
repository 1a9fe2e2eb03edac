//! Command line and config file of the `farpool-memserver` binary (kept in the library so that tests
//! can check parsing and merging).
//!
//! Precedence: a flag beats the TOML file (`--config FILE`), which beats the built-in default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use farpool_core::wire::AdminCmd;
use farpool_core::{Error, ErrorKind, Result};
use farpool_cxl::Backing;
use serde::Deserialize;

use crate::config::{self, ServerConfig};

const LONG_ABOUT: &str = "\
The farpool memory server lends its memory to farpool clients.

At start it reserves its whole capacity once, cuts it into slabs and grants them to clients as leases \
(renewed by heartbeat, reclaimed on expiry, zeroed before reuse). Clients read and write leased memory \
with one-sided operations; over TCP the server executes them after checking the lease, token, epoch and \
bounds of every operation.

Run `farpool-memserver` to serve, or `farpool-memserver admin --server ADDR stats|shrink N|drain|grow SIZE` \
to manage a running server. SIGTERM/SIGINT: clients get a Goodbye, leases are revoked, the process exits 0 \
within --shutdown-grace.";

/// `farpool-memserver`: serve (no subcommand) or `admin`.
#[derive(Debug, Parser)]
#[command(name = "farpool-memserver", version, about = "The farpool memory server", long_about = LONG_ABOUT)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Manage a running server instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server settings.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send an admin command to a running server and print its answer.
    Admin(AdminArgs),
    /// Print this machine's memory topology: NUMA nodes, CPU-less (CXL/far-memory) nodes, distances,
    /// memory tiers, HMAT latency/bandwidth, dax devices.
    Topology,
}

/// Server settings as flags; each one overrides the config file.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of: listen, capacity, slab_size, backing, lease_ms, metrics, log, max_connections,
    /// shutdown_grace, workers, shm (bool), shm_socket, rdma (bool), rdma_device, rdma_gid_index.
    /// Flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7070]; port 0 picks a free port.
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<SocketAddr>,
    /// Pool capacity, e.g. 4GiB, reserved once at start [default: 1GiB].
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub capacity: Option<u64>,
    /// Slab size, a multiple of the page size [default: 64MiB].
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub slab_size: Option<u64>,
    /// Where pool memory comes from: anon (private, hugetlb/THP), memfd (shareable), numa:N (memfd bound
    /// to NUMA node N, placement verified) or dax:/dev/daxX.Y (device-dax) [default: anon].
    #[arg(long, value_name = "BACKING", value_parser = backing_arg)]
    pub backing: Option<Backing>,
    /// Lease duration in milliseconds; a lease not renewed in time expires [default: 10000].
    #[arg(long, value_name = "MS")]
    pub lease_ms: Option<u64>,
    /// Serve Prometheus metrics on http://ADDR/metrics, e.g. 127.0.0.1:9100 [default: off].
    #[arg(long, value_name = "IP:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log: Option<String>,
    /// Bound on concurrent connections; further ones are refused and logged [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Grace given to clients on SIGTERM/SIGINT, e.g. 2s or 500ms [default: 2s].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pub shutdown_grace: Option<Duration>,
    /// I/O worker threads, 0 = one per CPU [default: 0].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Unix socket of the shared-memory transport for same-host clients
    /// [default: $XDG_RUNTIME_DIR or /tmp, + farpool-<port>.sock].
    #[arg(long, value_name = "PATH")]
    pub shm_socket: Option<PathBuf>,
    /// Do not offer the shared-memory transport.
    #[arg(long, conflicts_with = "shm_socket")]
    pub no_shm: bool,
    /// RDMA device to offer one-sided access on, e.g. mlx5_0 or rxe_lo [default: the first device with
    /// an active port; RDMA is offered only when it opens and the pool registers with it].
    #[arg(long, value_name = "NAME")]
    pub rdma_device: Option<String>,
    /// GID index of the RDMA port (RoCE) [default: the RoCE v2 IPv4-mapped GID].
    #[arg(long, value_name = "N")]
    pub rdma_gid_index: Option<u32>,
    /// Do not offer RDMA.
    #[arg(long, conflicts_with_all = ["rdma_device", "rdma_gid_index"])]
    pub no_rdma: bool,
}

/// `admin` arguments.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The server to manage.
    #[arg(long, value_name = "IP:PORT", default_value = config::DEFAULT_LISTEN)]
    pub server: SocketAddr,
    /// Bound on connecting and on waiting for the answer.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration_arg)]
    pub timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub action: AdminAction,
}

/// Admin actions.
#[derive(Clone, Debug, Subcommand)]
pub enum AdminAction {
    /// Print slab, lease, connection and operation counters.
    Stats,
    /// Remove N slabs of capacity: free ones at once, granted ones after a revoke notice and the grace.
    Shrink {
        /// Number of slabs to remove.
        slabs: u32,
        /// Time the holders of affected slabs get before revocation.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration_arg)]
        grace: Duration,
    },
    /// Stop granting and revoke everything after the grace (e.g. a spot VM being reclaimed).
    Drain {
        /// Time the holders get before revocation.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration_arg)]
        grace: Duration,
    },
    /// Add capacity (rounded down to whole slabs), e.g. 1GiB.
    Grow {
        /// Bytes to add.
        #[arg(value_name = "SIZE", value_parser = size_arg)]
        size: u64,
    },
}

impl AdminAction {
    /// The wire command.
    pub fn to_cmd(&self) -> AdminCmd {
        match *self {
            Self::Stats => AdminCmd::Stats,
            Self::Shrink { slabs, grace } => AdminCmd::Shrink { slabs, grace_ms: grace.as_millis() as u64 },
            Self::Drain { grace } => AdminCmd::Drain { grace_ms: grace.as_millis() as u64 },
            Self::Grow { size } => AdminCmd::Grow { bytes: size },
        }
    }
}

fn size_arg(s: &str) -> std::result::Result<u64, String> {
    config::parse_size(s).map_err(|e| e.message().to_owned())
}

fn backing_arg(s: &str) -> std::result::Result<Backing, String> {
    config::parse_backing(s).map_err(|e| e.message().to_owned())
}

fn duration_arg(s: &str) -> std::result::Result<Duration, String> {
    config::parse_duration(s).map_err(|e| e.message().to_owned())
}

/// A size in the config file: `capacity = "4GiB"` or `capacity = 4294967296`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn bytes(&self) -> Result<u64> {
        match self {
            Self::Bytes(n) => Ok(*n),
            Self::Text(s) => config::parse_size(s),
        }
    }
}

/// The config file's contents; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    capacity: Option<SizeValue>,
    slab_size: Option<SizeValue>,
    backing: Option<String>,
    lease_ms: Option<u64>,
    metrics: Option<String>,
    log: Option<String>,
    max_connections: Option<usize>,
    shutdown_grace: Option<String>,
    workers: Option<usize>,
    shm: Option<bool>,
    shm_socket: Option<PathBuf>,
    rdma: Option<bool>,
    rdma_device: Option<String>,
    rdma_gid_index: Option<u32>,
}

impl ServeArgs {
    /// Merge defaults, the config file and the flags; returns the config and the log filter.
    pub fn resolve(&self) -> Result<(ServerConfig, String)> {
        let file = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    Error::new(ErrorKind::Config, format!("cannot read {}", p.display())).with_source(e)
                })?;
                parse_file(&text)
                    .map_err(|e| Error::new(ErrorKind::Config, format!("{}: {}", p.display(), e.message())))?
            }
            None => FileConfig::default(),
        };
        let mut cfg = ServerConfig::default();
        apply_file(&mut cfg, &file)?;
        let a = self;
        cfg.listen = a.listen.unwrap_or(cfg.listen);
        cfg.capacity_bytes = a.capacity.unwrap_or(cfg.capacity_bytes);
        cfg.slab_size_bytes = a.slab_size.unwrap_or(cfg.slab_size_bytes);
        cfg.backing = a.backing.clone().unwrap_or(cfg.backing);
        cfg.lease_ms = a.lease_ms.unwrap_or(cfg.lease_ms);
        cfg.metrics = a.metrics.or(cfg.metrics);
        cfg.max_connections = a.max_connections.unwrap_or(cfg.max_connections);
        cfg.shutdown_grace = a.shutdown_grace.unwrap_or(cfg.shutdown_grace);
        cfg.workers = a.workers.unwrap_or(cfg.workers);
        cfg.shm_socket = a.shm_socket.clone().or(cfg.shm_socket);
        cfg.shm_enabled = cfg.shm_enabled && !a.no_shm;
        cfg.rdma_device = a.rdma_device.clone().or(cfg.rdma_device);
        cfg.rdma_gid_index = a.rdma_gid_index.or(cfg.rdma_gid_index);
        cfg.rdma_enabled = cfg.rdma_enabled && !a.no_rdma;
        cfg.validate()?;
        let log = a.log.clone().or(file.log).unwrap_or_else(|| "info".to_owned());
        Ok((cfg, log))
    }
}

fn parse_file(text: &str) -> Result<FileConfig> {
    toml::from_str(text).map_err(|e| Error::new(ErrorKind::Config, e.to_string()))
}

fn apply_file(cfg: &mut ServerConfig, f: &FileConfig) -> Result<()> {
    if let Some(s) = &f.listen {
        cfg.listen = config::parse_addr("listen", s)?;
    }
    if let Some(s) = &f.capacity {
        cfg.capacity_bytes = s.bytes()?;
    }
    if let Some(s) = &f.slab_size {
        cfg.slab_size_bytes = s.bytes()?;
    }
    if let Some(s) = &f.backing {
        cfg.backing = config::parse_backing(s)?;
    }
    if let Some(s) = &f.metrics {
        cfg.metrics = Some(config::parse_addr("metrics", s)?);
    }
    if let Some(s) = &f.shutdown_grace {
        cfg.shutdown_grace = config::parse_duration(s)?;
    }
    cfg.lease_ms = f.lease_ms.unwrap_or(cfg.lease_ms);
    cfg.max_connections = f.max_connections.unwrap_or(cfg.max_connections);
    cfg.workers = f.workers.unwrap_or(cfg.workers);
    cfg.shm_enabled = f.shm.unwrap_or(cfg.shm_enabled);
    cfg.shm_socket = f.shm_socket.clone().or_else(|| cfg.shm_socket.clone());
    cfg.rdma_enabled = f.rdma.unwrap_or(cfg.rdma_enabled);
    cfg.rdma_device = f.rdma_device.clone().or_else(|| cfg.rdma_device.clone());
    cfg.rdma_gid_index = f.rdma_gid_index.or(cfg.rdma_gid_index);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_override_file_over_defaults() {
        let dir = std::env::temp_dir().join(format!("farpool-memserver-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("server.toml");
        let toml = "capacity = \"256MiB\"\nslab_size = 1048576\nlease_ms = 500\nbacking = \"memfd\"\nlog = \"debug\"\n";
        std::fs::write(&path, toml).unwrap();
        let cli = Cli::try_parse_from([
            "farpool-memserver",
            "--config",
            path.to_str().unwrap(),
            "--lease-ms",
            "700",
            "--listen",
            "127.0.0.1:0",
        ])
        .unwrap();
        let (cfg, log) = cli.serve.resolve().unwrap();
        assert_eq!(cfg.capacity_bytes, 256 << 20);
        assert_eq!(cfg.slab_size_bytes, 1 << 20);
        assert_eq!(cfg.lease_ms, 700, "the flag wins");
        assert_eq!(cfg.backing, Backing::Memfd);
        assert_eq!(cfg.listen.port(), 0);
        assert_eq!(log, "debug");
        std::fs::write(&path, "capacty = 1\n").unwrap();
        let e = cli.serve.resolve().unwrap_err();
        assert!(e.message().contains("unknown field"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shm_settings_come_from_file_and_flags() {
        let dir = std::env::temp_dir().join(format!("farpool-memserver-cli-shm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("server.toml");
        std::fs::write(&path, "shm_socket = \"/tmp/from-file.sock\"\n").unwrap();
        let args = |extra: &[&str]| {
            let mut v = vec!["farpool-memserver", "--config", path.to_str().unwrap()];
            v.extend_from_slice(extra);
            Cli::try_parse_from(v).unwrap().serve.resolve().unwrap().0
        };
        let cfg = args(&[]);
        assert!(cfg.shm_enabled && cfg.shm_socket.as_deref() == Some(std::path::Path::new("/tmp/from-file.sock")));
        let cfg = args(&["--shm-socket", "/tmp/flag.sock"]);
        assert_eq!(cfg.shm_socket.as_deref(), Some(std::path::Path::new("/tmp/flag.sock")));
        assert!(!args(&["--no-shm"]).shm_enabled);
        std::fs::write(&path, "shm = false\n").unwrap();
        assert!(!args(&[]).shm_enabled);
        assert!(Cli::try_parse_from(["farpool-memserver", "--no-shm", "--shm-socket", "/x"]).is_err());
        assert!(matches!(
            Cli::try_parse_from(["farpool-memserver", "topology"]).unwrap().command,
            Some(Command::Topology)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn admin_subcommands_parse() {
        let cli = Cli::try_parse_from([
            "farpool-memserver",
            "admin",
            "--server",
            "127.0.0.1:9",
            "shrink",
            "3",
            "--grace",
            "500ms",
        ])
        .unwrap();
        let Some(Command::Admin(a)) = cli.command else { panic!("admin expected") };
        assert_eq!(a.action.to_cmd(), AdminCmd::Shrink { slabs: 3, grace_ms: 500 });
        let cli = Cli::try_parse_from(["farpool-memserver", "admin", "grow", "1GiB"]).unwrap();
        let Some(Command::Admin(a)) = cli.command else { panic!("admin expected") };
        assert_eq!(a.action.to_cmd(), AdminCmd::Grow { bytes: 1 << 30 });
        assert!(Cli::try_parse_from(["farpool-memserver", "--capacity", "lots"]).is_err());
        assert!(Cli::try_parse_from(["farpool-memserver", "--backing", "floppy"]).is_err());
    }
}
