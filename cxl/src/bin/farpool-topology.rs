//! `farpool-topology [--root DIR]`: print the machine's memory topology (NUMA nodes, CPU-less
//! CXL/far-memory candidates, distances, tiers, HMAT, dax devices). `--root` reads a sysfs copy.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = match args.as_slice() {
        [] => std::path::PathBuf::from("/"),
        [flag, dir] if flag == "--root" => dir.into(),
        _ => anyhow::bail!("usage: farpool-topology [--root DIR]"),
    };
    let topo = farpool_cxl::Topology::discover_at(&root)?;
    println!("{topo}");
    Ok(())
}
