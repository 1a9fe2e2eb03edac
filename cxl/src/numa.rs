//! The `numa:N` backing: a memfd whose pages are bound to NUMA node N with `mbind(MPOL_BIND)`.
//!
//! This is how the pool lives on CXL memory exposed as a CPU-less node (or on a remote socket, to
//! emulate it). Steps: check the node exists and has memory (a clear `Config` error otherwise), create
//! and map a memfd, `mbind` the mapping (for shmem the policy is stored with the file, so every other
//! mapping of the memfd, e.g. a same-host client's, allocates on node N too), populate it
//! (`MADV_POPULATE_WRITE`, else one store per page), then verify placement by asking the kernel where
//! a sample of pages live (`move_pages(2)` with `nodes == NULL` only queries).
//!
//! Invariant: pages are only touched through the [`Region`]'s checked accessors; the raw pointers
//! handed to `mbind`/`move_pages` are in-bounds addresses of the live mapping.

use std::collections::BTreeMap;
use std::fmt;

use farpool_core::{Error, ErrorKind, Result};

use crate::backing::{memfd, page_size};
use crate::region::Region;
use crate::topology::Topology;

/// `MPOL_BIND` from `<linux/mempolicy.h>`: allocate only on the nodes of the mask.
const MPOL_BIND: libc::c_int = 2;
/// Bits in the node mask we pass: 1024 nodes (the kernel's `MAX_NUMNODES` upper bound on x86-64).
const NODEMASK_BITS: usize = 1024;
/// Default bound on pages queried by [`verify_placement`]: 65 536 (256 MiB of 4 KiB pages are all
/// checked; larger regions are sampled evenly).
pub const PLACEMENT_SAMPLE_MAX: usize = 65_536;

/// Where the sampled pages of a region live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The node the pages should be on.
    pub node: u32,
    /// Pages queried.
    pub sampled: usize,
    /// Pages found on `node`.
    pub on_node: usize,
    /// Pages per node (negative keys are `-errno`, e.g. -2 = `ENOENT`, not populated).
    pub per_node: BTreeMap<i32, usize>,
}

impl Placement {
    /// Whether every sampled page is on the expected node.
    pub fn all_on_node(&self) -> bool {
        self.sampled > 0 && self.on_node == self.sampled
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "numa placement: {}/{} sampled pages on node {} (per node:", self.on_node, self.sampled, self.node)?;
        for (n, c) in &self.per_node {
            write!(f, " {n}={c}")?;
        }
        write!(f, ")")
    }
}

/// Check that node `node` exists and has memory, reading sysfs at `root` (`/` normally).
pub fn check_node_at(root: &std::path::Path, node: u32) -> Result<()> {
    let topo = Topology::discover_at(root)
        .map_err(|e| Error::new(ErrorKind::Config, format!("numa:{node}: cannot read the NUMA topology: {e}")))?;
    let ids: Vec<u32> = topo.nodes.iter().map(|n| n.id).collect();
    match topo.node(node) {
        None => Err(Error::new(
            ErrorKind::Config,
            format!("numa:{node}: NUMA node {node} does not exist (online: {ids:?})"),
        )),
        Some(n) if !n.has_memory() => {
            Err(Error::new(ErrorKind::Config, format!("numa:{node}: NUMA node {node} has no memory")))
        }
        Some(_) => Ok(()),
    }
}

/// Bind the whole region to `node` with `MPOL_BIND`.
pub fn bind(region: &Region, node: u32) -> Result<()> {
    let node = node as usize;
    if node >= NODEMASK_BITS {
        return Err(Error::new(ErrorKind::Config, format!("numa:{node}: node ids above {NODEMASK_BITS} unsupported")));
    }
    let mut mask = [0 as libc::c_ulong; NODEMASK_BITS / 64];
    mask[node / 64] |= 1 << (node % 64);
    // SAFETY: addr/len describe our live mapping; the mask array outlives the call and holds
    // NODEMASK_BITS bits (the kernel reads maxnode - 1 bits).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            region.as_ptr(),
            region.len(),
            MPOL_BIND,
            mask.as_ptr(),
            NODEMASK_BITS + 1,
            0 as libc::c_uint,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::new(ErrorKind::Config, format!("mbind(MPOL_BIND) to node {node} failed")).with_source(e));
    }
    Ok(())
}

/// Fault every page in (`MADV_POPULATE_WRITE`, else one zero store per page: the region is new, so
/// its bytes are zero already).
pub fn populate(region: &Region) -> Result<()> {
    // SAFETY: advice on our own live mapping; POPULATE_WRITE only faults pages in, keeping contents.
    let rc = unsafe { libc::madvise(region.as_ptr().cast(), region.len(), libc::MADV_POPULATE_WRITE) };
    if rc == 0 {
        return Ok(());
    }
    let page = page_size();
    for off in (0..region.len()).step_by(page) {
        // Adding 0 atomically faults the page in for writing without changing it.
        region.fetch_add_u64(off as u64, 0)?;
    }
    Ok(())
}

/// Ask the kernel which node each of (at most `sample_max`, evenly spread) pages of `region` is on.
pub fn verify_placement(region: &Region, node: u32, sample_max: usize) -> Result<Placement> {
    let page = page_size();
    let pages = region.len() / page;
    let n = pages.min(sample_max.max(1));
    let stride = pages.div_ceil(n).max(1);
    // SAFETY (for the pointers formed below): i * stride < pages, so each address is in the mapping.
    let addrs: Vec<*mut libc::c_void> =
        (0..pages).step_by(stride).map(|i| region.as_ptr().wrapping_add(i * page).cast()).collect();
    let mut status = vec![0 as libc::c_int; addrs.len()];
    // SAFETY: `addrs` and `status` have the same length, passed as count; nodes == NULL makes
    // move_pages a pure query of our own process (pid 0); no page is moved.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0 as libc::c_int,
            addrs.len() as libc::c_ulong,
            addrs.as_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0 as libc::c_int,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::new(ErrorKind::Io, "move_pages query failed").with_source(e));
    }
    let mut per_node = BTreeMap::new();
    for s in &status {
        *per_node.entry(*s).or_insert(0) += 1;
    }
    let on_node = per_node.get(&(node as i32)).copied().unwrap_or(0);
    Ok(Placement { node, sampled: status.len(), on_node, per_node })
}

/// Map `len` bytes of a memfd bound to `node` (no populate): the per-grant memfds of the shm transport.
pub fn map_bound(node: u32, len: usize, name: &str) -> Result<Region> {
    check_node_at(std::path::Path::new("/"), node)?;
    let len = len.div_ceil(page_size()) * page_size();
    let fd = memfd(name, len, false)?;
    let region = crate::dax::map_fd(fd, len, format!("memfd {name:?} {len} bytes bound to node {node}"))?;
    bind(&region, node)?;
    // SAFETY: advice on our own live mapping; it does not change contents. Best effort (THP).
    unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
    Ok(region)
}

/// The `numa:N` pool backing: check, map, bind, populate, verify. Fails unless every sampled page is
/// on `node`.
pub fn map_pool(node: u32, len: usize, name: &str) -> Result<(Region, Placement)> {
    let region = map_bound(node, len, name)?;
    populate(&region)?;
    let placement = verify_placement(&region, node, PLACEMENT_SAMPLE_MAX)?;
    tracing::info!(node, sampled = placement.sampled, on_node = placement.on_node, "{placement}");
    if !placement.all_on_node() {
        return Err(Error::new(ErrorKind::Config, format!("numa:{node}: pages not where bound: {placement}")));
    }
    Ok((region, placement))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_node_with_memory() -> u32 {
        Topology::discover().unwrap().nodes.iter().find(|n| n.has_memory()).unwrap().id
    }

    #[test]
    fn binds_populates_and_verifies_on_a_real_node() {
        let node = first_node_with_memory();
        let (r, p) = map_pool(node, 4 << 20, "numa-test").unwrap();
        assert_eq!(p.sampled, (4 << 20) / page_size());
        assert!(p.all_on_node(), "{p}");
        r.write_at(100, b"abc").unwrap();
        let p2 = verify_placement(&r, node + 1, 16).unwrap();
        assert_eq!((p2.sampled, p2.on_node), (16, 0));
        assert!(!p2.all_on_node());
    }

    #[test]
    fn unpopulated_pages_are_reported_as_absent() {
        let node = first_node_with_memory();
        let r = map_bound(node, 1 << 20, "numa-lazy").unwrap();
        let p = verify_placement(&r, node, 1024).unwrap();
        assert_eq!(p.on_node, 0, "{p}");
        assert_eq!(p.per_node.get(&-libc::ENOENT), Some(&256), "{p}");
    }

    #[test]
    fn missing_or_memoryless_node_is_a_config_error() {
        let e = map_pool(999, 1 << 20, "x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("does not exist"), "{e}");
        let t = crate::topology::tests::TempDir::new("numa-nomem");
        crate::topology::tests::guest_tree(&t.0);
        std::fs::write(t.0.join("sys/devices/system/node/node1/meminfo"), "Node 1 MemTotal: 0 kB\n").unwrap();
        let e = check_node_at(&t.0, 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("has no memory"), "{e}");
        check_node_at(&t.0, 0).unwrap();
    }
}
