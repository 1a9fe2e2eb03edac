//! `farpool-vm-cxl`: the CXL/NUMA checks the qemu guest runs (tests/vm/guest/30-cxl.sh), and a tiny
//! farpool client. Every mode prints what it saw and exits non-zero with a reason on failure.
//!
//! ```text
//! farpool-vm-cxl topology [--cpuless N] [--dax NAME]   discovery sees node N without CPUs / dax device NAME
//! farpool-vm-cxl numa NODE BYTES                       numa:NODE backing: every page on NODE, data round-trips
//! farpool-vm-cxl dax /dev/daxX.Y BYTES                 dax backing maps and round-trips BYTES
//! farpool-vm-cxl client HOST:PORT BYTES [tcp|shm [N]]  lease a slab, write BYTES, read back, verify, release;
//!                                                      with N: the shm mapping's pages must all be on node N
//! farpool-vm-cxl hold HOST:PORT                        lease one slab over shm, map it, print HOLDING, sleep
//! ```

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::BytesMut;
use farpool_core::size::parse_bytes;
use farpool_core::tcp::{TcpOptions, TcpTransport, client_handshake, connect_bounded};
use farpool_core::wire::{self, FrameReader, HelloOk, LEASE_FLAG_SHM, LeaseGrant, Msg};
use farpool_core::{RemoteAddr, SlabGrant, Transport};
use farpool_cxl::{Backing, ShmClient, ShmOptions, ShmTransport, Topology};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A control-plane connection: handshake, lease, release.
struct Ctrl {
    stream: TcpStream,
    reader: FrameReader,
    hello: HelloOk,
    next_req: u64,
}

impl Ctrl {
    fn connect(addr: &str) -> anyhow::Result<Self> {
        let mut stream = connect_bounded(addr, TIMEOUT)?;
        let mut reader = FrameReader::new();
        let hello = client_handshake(&mut stream, &mut reader, "farpool-vm-cxl", TIMEOUT)?;
        Ok(Self { stream, reader, hello, next_req: 1 })
    }

    /// Send `build(req)` and wait for the reply carrying `req` (other frames are skipped, bounded).
    fn call(&mut self, build: impl FnOnce(u64) -> Msg) -> anyhow::Result<Msg> {
        let req = self.next_req;
        self.next_req += 1;
        let mut out = BytesMut::new();
        wire::encode(&build(req), &mut out);
        self.stream.write_all(&out)?;
        for _ in 0..1000 {
            let m = self.reader.next(&mut self.stream)?;
            match m {
                Msg::ErrorReply { req: r, kind, message } if r == req || r == 0 => bail!("server: {kind}: {message}"),
                m if m.req_id() == Some(req) => return Ok(m),
                _ => continue,
            }
        }
        bail!("no reply to request {req}")
    }

    fn lease(&mut self, flags: u32) -> anyhow::Result<LeaseGrant> {
        match self.call(|req| Msg::LeaseRequest { req, slabs: 1, flags })? {
            Msg::LeaseGranted(g) if !g.grants.is_empty() => Ok(g),
            other => bail!("lease refused: {other:?}"),
        }
    }

    fn release(&mut self, g: &LeaseGrant) -> anyhow::Result<()> {
        self.call(|req| Msg::Release { req, lease: g.lease, secret: g.secret })?;
        Ok(())
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64).map(|i| ((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed) >> 24) as u8).collect()
}

fn topology(args: &[String]) -> anyhow::Result<()> {
    let topo = Topology::discover()?;
    println!("{topo}");
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().context("flag without a value")?;
        match flag.as_str() {
            "--cpuless" => {
                let n: u32 = v.parse()?;
                ensure!(topo.far_memory_candidates().any(|x| x.id == n), "node {n} is not a CPU-less node with memory");
                println!("check: node {n} is CPU-less with memory: ok");
            }
            "--dax" => {
                let d = topo.dax_device(v).with_context(|| format!("dax device {v} not discovered"))?;
                println!("check: dax {} ({} bytes, devdax={}) discovered: ok", d.name, d.size_bytes, d.is_devdax());
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(())
}

fn round_trip_region(backing: &Backing, bytes: usize) -> anyhow::Result<()> {
    let r = backing.map(bytes, "farpool-vm-cxl")?;
    let data = pattern(bytes, 0xC0FFEE);
    r.write_at(0, &data)?;
    let mut back = vec![0u8; bytes];
    r.read_at(0, &mut back)?;
    ensure!(back == data, "{backing}: data read back differs");
    println!("{backing}: {} mapped, {bytes} bytes written and read back: ok", r.description());
    if let Backing::Numa(node) = backing {
        let p = farpool_cxl::numa::verify_placement(&r, *node, usize::MAX)?;
        println!("{p}");
        ensure!(p.all_on_node(), "not every page is on node {node}");
    }
    Ok(())
}

fn client(addr: &str, bytes: usize, mode: &str, node: Option<u32>) -> anyhow::Result<()> {
    let mut ctrl = Ctrl::connect(addr)?;
    let flags = if mode == "shm" { LEASE_FLAG_SHM } else { 0 };
    let lease = ctrl.lease(flags)?;
    let g: SlabGrant = lease.grants[0];
    ensure!(g.len as usize >= bytes, "slab of {} bytes is smaller than {bytes}", g.len);
    let mut t: Box<dyn Transport> = match mode {
        "tcp" => Box::new(TcpTransport::connect(addr, TcpOptions::default())?),
        "shm" => {
            ensure!(!ctrl.hello.shm_path.is_empty(), "server does not offer shm");
            let m = ShmClient::connect(ctrl.hello.shm_path.as_ref(), TIMEOUT)?.attach(&g)?;
            if let Some(n) = node {
                // Touch every page of the grant, then ask where the pages of our mapping live.
                m.region().zero(0, g.len as usize)?;
                let p = farpool_cxl::numa::verify_placement(m.region(), n, usize::MAX)?;
                println!("shm grant {p}");
                ensure!(p.all_on_node(), "the shm grant's pages are not all on node {n}");
            }
            let mut t = ShmTransport::new(ShmOptions::default());
            t.insert(m);
            Box::new(t)
        }
        other => bail!("unknown transport {other}"),
    };
    let data = pattern(bytes, lease.lease.0);
    t.write(RemoteAddr::in_grant(&g, 0), &data)?;
    let mut back = vec![0u8; bytes];
    t.read(RemoteAddr::in_grant(&g, 0), &mut back)?;
    ensure!(back == data, "data read back over {mode} differs");
    let old = t.fetch_add(RemoteAddr::in_grant(&g, 0), 1)?;
    ensure!(old == u64::from_le_bytes(data[..8].try_into()?), "fetch_add saw the wrong value");
    ctrl.release(&lease)?;
    println!("client: {bytes} bytes written and read back over {mode} (lease {} slab {}): ok", lease.lease, g.slab);
    Ok(())
}

fn hold(addr: &str) -> anyhow::Result<()> {
    let mut ctrl = Ctrl::connect(addr)?;
    let lease = ctrl.lease(LEASE_FLAG_SHM)?;
    let g = lease.grants[0];
    let m = ShmClient::connect(ctrl.hello.shm_path.as_ref(), TIMEOUT)?.attach(&g)?;
    m.region().write_at(0, b"held")?;
    println!("HOLDING lease {} slab {} epoch {} token {}", lease.lease, g.slab, g.cred.epoch, g.cred.token);
    std::io::stdout().flush()?;
    // Bounded: a holder nobody kills exits after 10 minutes.
    std::thread::sleep(Duration::from_secs(600));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["topology", ..] => topology(&args[1..]),
        ["numa", node, bytes] => round_trip_region(&Backing::Numa(node.parse()?), parse_bytes(bytes)? as usize),
        ["dax", dev, bytes] => round_trip_region(&Backing::Dax(dev.into()), parse_bytes(bytes)? as usize),
        ["client", addr, bytes] => client(addr, parse_bytes(bytes)? as usize, "tcp", None),
        ["client", addr, bytes, mode] => client(addr, parse_bytes(bytes)? as usize, mode, None),
        ["client", addr, bytes, "shm", node] => client(addr, parse_bytes(bytes)? as usize, "shm", Some(node.parse()?)),
        ["hold", addr] => hold(addr),
        _ => bail!("usage: see `//!` docs of farpool-vm-cxl (topology | numa | dax | client | hold)"),
    }
}
