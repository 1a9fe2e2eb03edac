//! The far side of the bufferpool workload: which configurations exist and how each gets its backend
//! (an embedded memory server on 127.0.0.1 with a memfd pool, unless `--server` names one).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use farpool::tier::mem::MemBackend;
use farpool::tier::{FarBackend, PoolBackend};
use farpool::{Pool, PoolBuilder, TransportChoice, TransportKind};
use farpool_memserver::{Server, ServerConfig, ServerHandle};

/// Slab size of the embedded server (and of the in-process reference).
const SLAB_BYTES: u64 = 16 << 20;

/// A configuration of the buffer manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// No far tier: misses go to the data file.
    Ssd,
    /// Far tier over TCP.
    Tcp,
    /// Far tier over shared memory.
    Shm,
    /// Far tier over RDMA.
    Rdma,
    /// Far tier over in-process memory: an upper bound for the tier's own overhead, not a transport.
    Mem,
}

impl Mode {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ssd => "ssd",
            Self::Tcp => "tcp",
            Self::Shm => "shm",
            Self::Rdma => "rdma",
            Self::Mem => "mem",
        }
    }

    /// The throughput bar vs SSD-only under Zipf, if any (ARCHITECTURE.md, "Performance bars").
    pub fn bar(self) -> Option<f64> {
        match self {
            Self::Shm => Some(3.0),
            Self::Tcp => Some(1.0),
            _ => None,
        }
    }

    fn choice(self) -> Option<(TransportChoice, TransportKind)> {
        match self {
            Self::Tcp => Some((TransportChoice::Tcp, TransportKind::Tcp)),
            Self::Shm => Some((TransportChoice::Shm, TransportKind::Shm)),
            Self::Rdma => Some((TransportChoice::Rdma, TransportKind::Rdma)),
            Self::Ssd | Self::Mem => None,
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "ssd" => Self::Ssd,
            "tcp" => Self::Tcp,
            "shm" => Self::Shm,
            "rdma" => Self::Rdma,
            "mem" => Self::Mem,
            other => bail!("unknown configuration {other:?} (ssd, tcp, shm, rdma, mem)"),
        })
    }
}

/// Memory servers and pools for the runs.
#[derive(Debug)]
pub struct FarSetup {
    external: Option<String>,
    far_max: u64,
    server_workers: usize,
    embedded: Option<ServerHandle>,
    pools: HashMap<Mode, Arc<Pool>>,
}

impl FarSetup {
    /// Use `external` if given, else start an embedded server (with `server_workers` I/O threads) when
    /// first needed.
    pub fn new(external: Option<String>, far_max: u64, server_workers: usize) -> Result<Self> {
        Ok(Self { external, far_max, server_workers, embedded: None, pools: HashMap::new() })
    }

    fn addr(&mut self) -> Result<String> {
        if let Some(a) = &self.external {
            return Ok(a.clone());
        }
        if self.embedded.is_none() {
            let capacity = self.far_max.div_ceil(SLAB_BYTES) * SLAB_BYTES + 4 * SLAB_BYTES;
            let cfg = ServerConfig::default()
                .with_listen("127.0.0.1:0".parse().expect("address"))
                .with_capacity_bytes(capacity)
                .with_slab_size_bytes(SLAB_BYTES)
                .with_backing(farpool_cxl::backing::Backing::Memfd)
                .with_workers(self.server_workers);
            let h = Server::start(cfg).context("start the embedded memory server")?;
            eprintln!(
                "embedded memory server on {} ({} memfd pool)",
                h.local_addr(),
                farpool_core::size::format_bytes(capacity)
            );
            self.embedded = Some(h);
        }
        Ok(self.embedded.as_ref().expect("started").local_addr().to_string())
    }

    /// The far backend of `mode` (`None` for SSD only); `Err` says why the mode is unavailable here.
    pub fn backend(&mut self, mode: Mode) -> Result<Option<Arc<dyn FarBackend>>> {
        if mode == Mode::Ssd {
            return Ok(None);
        }
        if mode == Mode::Mem {
            let slabs = self.far_max.div_ceil(SLAB_BYTES) as usize;
            return Ok(Some(Arc::new(MemBackend::new(1, slabs, SLAB_BYTES))));
        }
        let (choice, kind) = mode.choice().expect("a transport mode");
        if !self.pools.contains_key(&mode) {
            let addr = self.addr()?;
            let pool = PoolBuilder::new([addr.as_str()])
                .with_transport(choice)
                .with_op_timeout_ms(5_000)
                .build()
                .with_context(|| format!("{} pool", mode.name()))?;
            let neg = pool.transport_of(0).with_context(|| format!("{} transport", mode.name()))?;
            if neg.kind != kind {
                bail!("negotiated {} instead of {}", neg.kind, mode.name());
            }
            self.pools.insert(mode, Arc::new(pool));
        }
        let pool = self.pools[&mode].clone();
        Ok(Some(Arc::new(PoolBackend::new(pool))))
    }
}

impl Drop for FarSetup {
    fn drop(&mut self) {
        self.pools.clear();
        if let Some(h) = self.embedded.take() {
            h.shutdown(Duration::from_millis(100));
            let _ = h.join();
        }
    }
}
