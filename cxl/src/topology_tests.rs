//! Topology discovery on a fake sysfs tree shaped like the qemu guest's (tests/vm/run.sh): node 0 with
//! 2 CPUs, CPU-less node 1 with HMAT, tiers 4 and 22, one CXL dax device in devdax mode.

use std::path::{Path, PathBuf};

use super::*;

pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("farpool-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn put(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// Build the guest's tree under `root`.
pub(crate) fn guest_tree(root: &Path) {
    let n = "sys/devices/system/node";
    put(root, &format!("{n}/online"), "0-1\n");
    put(root, &format!("{n}/has_cpu"), "0\n");
    put(root, &format!("{n}/has_memory"), "0-1\n");
    put(root, &format!("{n}/node0/cpulist"), "0-1\n");
    put(root, &format!("{n}/node0/distance"), "10 24\n");
    put(root, &format!("{n}/node0/meminfo"), "Node 0 MemTotal:        2014864 kB\nNode 0 MemFree:  1800000 kB\n");
    put(root, &format!("{n}/node1/cpulist"), "\n");
    put(root, &format!("{n}/node1/distance"), "24 10\n");
    put(root, &format!("{n}/node1/meminfo"), "Node 1 MemTotal:        2022768 kB\nNode 1 MemFree:  2000000 kB\n");
    let a = format!("{n}/node1/access0/initiators");
    put(root, &format!("{a}/read_latency"), "250\n");
    put(root, &format!("{a}/write_latency"), "250\n");
    put(root, &format!("{a}/read_bandwidth"), "10240\n");
    put(root, &format!("{a}/write_bandwidth"), "10240\n");
    std::fs::create_dir_all(root.join(format!("{a}/node0"))).unwrap();
    put(root, "sys/devices/virtual/memory_tiering/memory_tier4/nodelist", "0\n");
    put(root, "sys/devices/virtual/memory_tiering/memory_tier22/nodelist", "1\n");
    let d = "sys/bus/dax/devices/dax0.0";
    put(root, &format!("{d}/size"), "536870912\n");
    put(root, &format!("{d}/target_node"), "2\n");
    put(root, &format!("{d}/align"), "2097152\n");
    std::fs::create_dir_all(root.join("sys/bus/dax/drivers/device_dax")).unwrap();
    std::os::unix::fs::symlink("../../drivers/device_dax", root.join(format!("{d}/driver"))).unwrap();
}

#[test]
fn parses_lists() {
    assert_eq!(parse_list("0-3,8,10-11"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
    assert_eq!(parse_list(""), Some(vec![]));
    assert_eq!(parse_list("\n"), Some(vec![]));
    assert_eq!(parse_list("3-1"), None);
    assert_eq!(parse_list("x"), None);
}

#[test]
fn discovers_the_guest_tree() {
    let t = TempDir::new("topo");
    guest_tree(&t.0);
    let topo = Topology::discover_at(&t.0).unwrap();
    assert_eq!(topo.nodes.len(), 2);
    let n0 = topo.node(0).unwrap();
    assert_eq!((n0.cpus.clone(), n0.distances.clone(), n0.tier), (vec![0, 1], vec![10, 24], Some(4)));
    assert_eq!(n0.mem_total_bytes, 2_014_864 * 1024);
    assert!(n0.hmat.is_none());
    let n1 = topo.node(1).unwrap();
    assert!(!n1.has_cpu() && n1.has_memory() && n1.is_far_memory_candidate());
    assert_eq!(n1.tier, Some(22));
    let h = n1.hmat.as_ref().unwrap();
    assert_eq!((h.initiators.clone(), h.read_latency_ns, h.read_bandwidth_mbps), (vec![0], Some(250), Some(10240)));
    assert_eq!(topo.far_memory_candidates().map(|n| n.id).collect::<Vec<_>>(), vec![1]);
    let dax = topo.dax_device("/dev/dax0.0").unwrap();
    assert_eq!((dax.size_bytes, dax.target_node, dax.align_bytes), (512 << 20, Some(2), Some(2 << 20)));
    assert!(dax.is_devdax());
    let text = topo.to_string();
    assert!(text.contains("node 1: no CPUs"), "{text}");
    assert!(text.contains("CXL/far-memory candidate"), "{text}");
    assert!(text.contains("dax dax0.0: 512MiB, target node 2, align 2MiB, mode devdax"), "{text}");
    assert!(text.contains("far-memory candidates (CPU-less nodes): [1]"), "{text}");
}

#[test]
fn missing_files_are_tolerated_but_missing_numa_is_an_error() {
    let t = TempDir::new("topo-min");
    put(&t.0, "sys/devices/system/node/online", "0\n");
    std::fs::create_dir_all(t.0.join("sys/devices/system/node/node0")).unwrap();
    let topo = Topology::discover_at(&t.0).unwrap();
    assert_eq!(topo.nodes[0].mem_total_bytes, 0);
    assert!(topo.dax.is_empty() && topo.tiers.is_empty());
    let empty = TempDir::new("topo-empty");
    assert_eq!(Topology::discover_at(&empty.0).unwrap_err().kind(), ErrorKind::Unsupported);
    put(&empty.0, "sys/devices/system/node/online", "0-1\n");
    assert_eq!(Topology::discover_at(&empty.0).unwrap_err().kind(), ErrorKind::Config);
}

#[test]
fn discovers_this_host() {
    let topo = Topology::discover().unwrap();
    assert!(!topo.nodes.is_empty());
    assert!(topo.nodes.iter().any(|n| n.has_cpu() && n.has_memory()), "{topo}");
}
