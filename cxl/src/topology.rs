//! Memory topology discovery from sysfs: NUMA nodes, CPU-less (CXL / far-memory) nodes, distances,
//! memory tiers, HMAT access characteristics and device-dax devices.
//!
//! Owns: [`Topology`] and its parts, read from a sysfs root given as a parameter
//! ([`Topology::discover_at`]) so tests run on a fake tree; [`Topology::discover`] reads `/`.
//!
//! Sources (Linux ABI, `Documentation/ABI/`):
//! - `sys/devices/system/node/{online,has_cpu,has_memory}`: node lists (`0-1,3` syntax);
//!   `nodeN/{cpulist,meminfo,distance}`: CPUs, `Node N MemTotal: X kB`, SLIT distances.
//! - `nodeN/access0/initiators/{read,write}_{latency,bandwidth}`: HMAT values for the best initiator
//!   (latency in nanoseconds, bandwidth in MB/s), present only when firmware provides HMAT.
//! - `sys/devices/virtual/memory_tiering/memory_tierN/nodelist`: memory tiers (lower N = faster).
//! - `sys/bus/dax/devices/daxX.Y/{size,target_node,align}` and its `driver` link (`device_dax` =
//!   devdax mode, `kmem` = onlined as system RAM).
//!
//! No `hwloc` feature: the `hwlocality` crate needs libhwloc 2.x (`libhwloc-dev`), which this machine
//! and CI do not have, and its `vendored` build compiles hwloc's C sources (minutes on the shared
//! 2-core builders). Everything the pool decides on (CPU-less nodes, distances, tiers, HMAT, dax)
//! is in sysfs, read here directly. (The old `hwloc` crate returns wrong data with hwloc 2.x.)
//!
//! Invariant: discovery never fails because an optional file is missing or malformed: what cannot be
//! read is `None`/empty. Only a missing node directory is an error.

use std::fmt;
use std::path::{Path, PathBuf};

use farpool_core::size::format_bytes;
use farpool_core::{Error, ErrorKind, Result};

/// HMAT access characteristics of a node, from its best initiator (`access0`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hmat {
    /// Initiator nodes (those with the best access to this node).
    pub initiators: Vec<u32>,
    /// Read latency in nanoseconds.
    pub read_latency_ns: Option<u64>,
    /// Write latency in nanoseconds.
    pub write_latency_ns: Option<u64>,
    /// Read bandwidth in MB/s.
    pub read_bandwidth_mbps: Option<u64>,
    /// Write bandwidth in MB/s.
    pub write_bandwidth_mbps: Option<u64>,
}

/// One NUMA node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Node id.
    pub id: u32,
    /// CPUs of the node (empty for a CPU-less node).
    pub cpus: Vec<u32>,
    /// Total memory in bytes (`MemTotal`).
    pub mem_total_bytes: u64,
    /// Free memory in bytes (`MemFree`).
    pub mem_free_bytes: u64,
    /// SLIT distances to every node, in node order of `distance` (10 = local).
    pub distances: Vec<u32>,
    /// Memory tier the node is in, if tiering is exposed.
    pub tier: Option<u32>,
    /// HMAT data, if firmware provides it.
    pub hmat: Option<Hmat>,
}

impl Node {
    /// Whether the node has CPUs.
    pub fn has_cpu(&self) -> bool {
        !self.cpus.is_empty()
    }

    /// Whether the node has memory.
    pub fn has_memory(&self) -> bool {
        self.mem_total_bytes > 0
    }

    /// A CPU-less node with memory: how CXL Type-3 memory, or memory placed far on purpose, looks.
    pub fn is_far_memory_candidate(&self) -> bool {
        !self.has_cpu() && self.has_memory()
    }
}

/// A device-dax instance (`/dev/daxX.Y`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaxDevice {
    /// Name, e.g. `dax0.0`.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// NUMA node the memory becomes when onlined (`target_node`), if known.
    pub target_node: Option<i64>,
    /// Mapping alignment in bytes (`align`), if known.
    pub align_bytes: Option<u64>,
    /// Bound driver: `device_dax` (devdax, mappable) or `kmem` (system RAM), if bound.
    pub driver: Option<String>,
}

impl DaxDevice {
    /// The character device path.
    pub fn dev_path(&self) -> PathBuf {
        PathBuf::from("/dev").join(&self.name)
    }

    /// Whether it is in devdax mode (mappable through `/dev/daxX.Y`).
    pub fn is_devdax(&self) -> bool {
        self.driver.as_deref() == Some("device_dax")
    }
}

/// A memory tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tier {
    /// Tier number (`memory_tierN`; lower is faster).
    pub id: u32,
    /// Nodes in the tier.
    pub nodes: Vec<u32>,
}

/// What the machine's memory looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// The sysfs root this was read from (`/` normally).
    pub root: PathBuf,
    /// Online NUMA nodes, by id.
    pub nodes: Vec<Node>,
    /// Memory tiers, by id.
    pub tiers: Vec<Tier>,
    /// Device-dax instances, by name.
    pub dax: Vec<DaxDevice>,
}

/// Parse a kernel list like `0-3,8,10-11` (empty string = empty list).
///
/// ```
/// use farpool_cxl::topology::parse_list;
/// assert_eq!(parse_list("0-2,5"), Some(vec![0, 1, 2, 5]));
/// assert_eq!(parse_list(""), Some(vec![]));
/// assert_eq!(parse_list("2-1"), None);
/// ```
pub fn parse_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 65_536 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

fn read_u64(p: &Path) -> Option<u64> {
    let s = read_trim(p)?;
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `Node N MemTotal:   123 kB` -> bytes.
fn meminfo_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        let (_node, _n, name, val) = (w.next()?, w.next()?, w.next()?, w.next()?);
        (name.strip_suffix(':') == Some(field)).then(|| val.parse::<u64>().ok().map(|kb| kb * 1024))?
    })
}

fn read_hmat(node_dir: &Path) -> Option<Hmat> {
    let d = node_dir.join("access0/initiators");
    if !d.is_dir() {
        return None;
    }
    let mut initiators: Vec<u32> = std::fs::read_dir(&d)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("node")?.parse().ok())
        .collect();
    initiators.sort_unstable();
    let h = Hmat {
        initiators,
        read_latency_ns: read_u64(&d.join("read_latency")),
        write_latency_ns: read_u64(&d.join("write_latency")),
        read_bandwidth_mbps: read_u64(&d.join("read_bandwidth")),
        write_bandwidth_mbps: read_u64(&d.join("write_bandwidth")),
    };
    Some(h)
}

fn read_tiers(root: &Path) -> Vec<Tier> {
    let d = root.join("sys/devices/virtual/memory_tiering");
    let Ok(rd) = std::fs::read_dir(&d) else { return Vec::new() };
    let mut tiers: Vec<Tier> = rd
        .filter_map(|e| {
            let e = e.ok()?;
            let id = e.file_name().to_str()?.strip_prefix("memory_tier")?.parse().ok()?;
            let nodes = parse_list(&read_trim(&e.path().join("nodelist"))?)?;
            Some(Tier { id, nodes })
        })
        .collect();
    tiers.sort_by_key(|t| t.id);
    tiers
}

fn read_dax(root: &Path) -> Vec<DaxDevice> {
    let d = root.join("sys/bus/dax/devices");
    let Ok(rd) = std::fs::read_dir(&d) else { return Vec::new() };
    let mut out: Vec<DaxDevice> = rd
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_str()?.to_owned();
            name.starts_with("dax").then_some(())?;
            let p = e.path();
            let driver = std::fs::read_link(p.join("driver"))
                .ok()
                .and_then(|l| l.file_name().and_then(|n| n.to_str()).map(str::to_owned));
            Some(DaxDevice {
                size_bytes: read_u64(&p.join("size")).unwrap_or(0),
                target_node: read_trim(&p.join("target_node")).and_then(|s| s.parse().ok()),
                align_bytes: read_u64(&p.join("align")),
                driver,
                name,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn read_node(nodes_dir: &Path, id: u32, tiers: &[Tier]) -> Result<Node> {
    let d = nodes_dir.join(format!("node{id}"));
    if !d.is_dir() {
        return Err(Error::new(ErrorKind::Config, format!("{} does not exist", d.display())));
    }
    let meminfo = std::fs::read_to_string(d.join("meminfo")).unwrap_or_default();
    let distances = read_trim(&d.join("distance"))
        .map(|s| s.split_whitespace().filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default();
    Ok(Node {
        id,
        cpus: read_trim(&d.join("cpulist")).and_then(|s| parse_list(&s)).unwrap_or_default(),
        mem_total_bytes: meminfo_field(&meminfo, "MemTotal").unwrap_or(0),
        mem_free_bytes: meminfo_field(&meminfo, "MemFree").unwrap_or(0),
        distances,
        tier: tiers.iter().find(|t| t.nodes.contains(&id)).map(|t| t.id),
        hmat: read_hmat(&d),
    })
}

impl Topology {
    /// Discover the running machine's topology (sysfs at `/sys`).
    pub fn discover() -> Result<Self> {
        Self::discover_at(Path::new("/"))
    }

    /// Discover from a tree rooted at `root` (which holds `sys/...`): a fake tree in tests.
    pub fn discover_at(root: &Path) -> Result<Self> {
        let nodes_dir = root.join("sys/devices/system/node");
        let online = read_trim(&nodes_dir.join("online")).ok_or_else(|| {
            Error::new(ErrorKind::Unsupported, format!("{} has no NUMA information", nodes_dir.display()))
        })?;
        let ids = parse_list(&online)
            .ok_or_else(|| Error::new(ErrorKind::Protocol, format!("cannot parse online node list {online:?}")))?;
        let tiers = read_tiers(root);
        let nodes = ids.into_iter().map(|id| read_node(&nodes_dir, id, &tiers)).collect::<Result<Vec<_>>>()?;
        Ok(Self { root: root.to_owned(), nodes, tiers, dax: read_dax(root) })
    }

    /// A node by id.
    pub fn node(&self, id: u32) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// CPU-less nodes with memory: CXL / far-memory candidates.
    pub fn far_memory_candidates(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.is_far_memory_candidate())
    }

    /// A dax device by name (`dax0.0`) or path (`/dev/dax0.0`).
    pub fn dax_device(&self, name_or_path: &str) -> Option<&DaxDevice> {
        let name = name_or_path.rsplit('/').next().unwrap_or(name_or_path);
        self.dax.iter().find(|d| d.name == name)
    }
}

/// Bytes in MiB with one decimal (memory sizes are rarely round).
fn human(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20))
}

fn fmt_hmat(f: &mut fmt::Formatter<'_>, h: &Hmat) -> fmt::Result {
    let v = |o: Option<u64>| o.map_or("?".to_owned(), |v| v.to_string());
    write!(
        f,
        ", hmat from {:?}: read {} ns {} MB/s, write {} ns {} MB/s",
        h.initiators,
        v(h.read_latency_ns),
        v(h.read_bandwidth_mbps),
        v(h.write_latency_ns),
        v(h.write_bandwidth_mbps)
    )
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "memory topology ({} NUMA nodes, sysfs at {}):", self.nodes.len(), self.root.display())?;
        for n in &self.nodes {
            let cpus = if n.has_cpu() { format!("cpus {:?}", n.cpus) } else { "no CPUs".to_owned() };
            write!(f, "  node {}: {cpus}, memory {}", n.id, human(n.mem_total_bytes))?;
            write!(f, " (free {}), distances {:?}", human(n.mem_free_bytes), n.distances)?;
            if let Some(t) = n.tier {
                write!(f, ", tier {t}")?;
            }
            if let Some(h) = &n.hmat {
                fmt_hmat(f, h)?;
            }
            if n.is_far_memory_candidate() {
                write!(f, "  <- CPU-less: CXL/far-memory candidate")?;
            }
            writeln!(f)?;
        }
        for t in &self.tiers {
            writeln!(f, "  memory tier {}: nodes {:?}", t.id, t.nodes)?;
        }
        if self.dax.is_empty() {
            writeln!(f, "  dax devices: none")?;
        }
        for d in &self.dax {
            let node = d.target_node.map_or("?".to_owned(), |n| n.to_string());
            let align = d.align_bytes.map_or("?".to_owned(), format_bytes);
            let mode = match d.driver.as_deref() {
                Some("device_dax") => "devdax",
                Some("kmem") => "system-ram",
                Some(other) => other,
                None => "unbound",
            };
            writeln!(
                f,
                "  dax {}: {}, target node {node}, align {align}, mode {mode}",
                d.name,
                format_bytes(d.size_bytes)
            )?;
        }
        let far: Vec<u32> = self.far_memory_candidates().map(|n| n.id).collect();
        write!(f, "  far-memory candidates (CPU-less nodes): {far:?}")
    }
}

#[cfg(test)]
#[path = "topology_tests.rs"]
pub(crate) mod tests;
