//! farpool-vm-pool: the pool-level RDMA checks run in the qemu guest (tests/vm/guest/50-rdma-pool.sh).
//!
//! Starts real `farpool-memserver` processes with `--rdma-device`, connects `farpool::Pool`s that force
//! (or auto-negotiate) the rdma transport, and prints one `RESULT pool-<case> PASS|FAIL|SKIP <why>`
//! line per check; exit status 1 if any failed.
//!
//! ```text
//! farpool-vm-pool [--memserver PATH] [--device rxe_lo] [--gid-index 1] [--case NAME]...
//! ```
//! Cases: offered readwrite atomics out-of-range revoke auto device-select forced-unavailable
//! shrink-frees-memory killed.
#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use farpool::{AdminCmd, ErrorKind, Pool, PoolBuilder, PoolEvent, Target, TransportChoice, TransportKind};
use farpool_core::wire::FEATURE_RDMA;
use farpool_core::{OpKind, OpOutput, RemoteAddr, Transport, WorkRequest};

/// Slab size of the test servers: a 1 MiB transfer plus offsets fits, and wiping one under TCG is quick.
const SLAB: u64 = 4 << 20;
/// Slabs per test server.
const SLABS: u64 = 16;

struct Args {
    memserver: String,
    device: String,
    gid_index: Option<String>,
    cases: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args { memserver: "farpool-memserver".into(), device: "rxe_lo".into(), gid_index: None, cases: vec![] };
    let mut it = std::env::args().skip(1);
    while let Some(f) = it.next() {
        let mut v = || it.next().ok_or_else(|| anyhow!("{f} needs a value"));
        match f.as_str() {
            "--memserver" => a.memserver = v()?,
            "--device" => a.device = v()?,
            "--gid-index" => a.gid_index = Some(v()?),
            "--case" => a.cases.push(v()?),
            other => bail!("unknown argument {other:?} (see the module docs)"),
        }
    }
    Ok(a)
}

/// A `farpool-memserver` child process, killed on drop.
struct MemServer {
    child: Child,
    addr: String,
    log: String,
}

impl MemServer {
    fn start(a: &Args, name: &str, extra: &[&str]) -> Result<MemServer> {
        Self::start_sized(a, name, SLAB, SLABS, extra)
    }

    /// [`MemServer::start`] with `slabs` slabs of `slab` bytes.
    fn start_sized(a: &Args, name: &str, slab: u64, slabs: u64, extra: &[&str]) -> Result<MemServer> {
        // A free port: bind, read it, release (the server binds it right after; 127.0.0.1 only).
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let log = format!("/tmp/farpool-vm-pool-{name}.log");
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(&a.memserver);
        cmd.args(["--listen", &addr, "--capacity", &(slab * slabs).to_string(), "--slab-size", &slab.to_string()])
            .args(["--lease-ms", "5000", "--workers", "2", "--no-shm", "--log", "info"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(file);
        let child = cmd.spawn().with_context(|| format!("starting {}", a.memserver))?;
        let mut s = MemServer { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(&s.addr).is_err() {
            if let Some(st) = s.child.try_wait()? {
                bail!("memserver exited with {st}: {}", s.log_tail());
            }
            ensure!(Instant::now() < deadline, "memserver not listening after 60 s: {}", s.log_tail());
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
    }

    fn rdma_args(a: &Args) -> Vec<&str> {
        let mut v = vec!["--rdma-device", a.device.as_str()];
        if let Some(g) = &a.gid_index {
            v.extend(["--rdma-gid-index", g.as_str()]);
        }
        v
    }
}

impl Drop for MemServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pool(addr: &str, t: TransportChoice) -> farpool::Result<Pool> {
    PoolBuilder::new([addr]).with_transport(t).with_op_timeout_ms(3_000).with_connect_timeout_ms(5_000).build()
}

/// A pseudo-random pattern of `len` bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    farpool::tier::page_content(seed, 0, len)
}

fn check_offered(srv: &MemServer) -> Result<String> {
    let p = pool(&srv.addr, TransportChoice::Rdma)?;
    let hello = p.server_hello(0)?;
    ensure!(hello.features & FEATURE_RDMA != 0, "server does not advertise rdma: {}", srv.log_tail());
    let n = p.transport_of(0)?;
    ensure!(n.kind == TransportKind::Rdma, "negotiated {}", n.kind);
    let lease = p.lease(0, 1)?;
    let g = lease.grants()[0];
    ensure!(g.cred.rkey != 0 && g.cred.base_addr != 0, "grant has no rdma credential: {:?}", g.cred);
    Ok(format!(
        "features {:#x}, {}; grant rkey {:#x} addr {:#x}",
        hello.features, n.reason, g.cred.rkey, g.cred.base_addr
    ))
}

fn check_readwrite(srv: &MemServer) -> Result<String> {
    let p = pool(&srv.addr, TransportChoice::Rdma)?;
    let lease = p.lease(0, 1)?;
    let mut ep = p.endpoint(0)?;
    ensure!(ep.kind() == TransportKind::Rdma, "endpoint is {}", ep.kind());
    let sizes = [8usize, 64, 100, 512, 4096, 8192, 65536, 262_144, 1 << 20];
    for (i, &n) in sizes.iter().enumerate() {
        let off = (i as u64 * 4096 + 8).min(SLAB - n as u64);
        let data = pattern(n, i as u64 + 1);
        ep.write(&lease, 0, off, &data)?;
        let mut back = vec![0u8; n];
        ep.read(&lease, 0, off, &mut back)?;
        ensure!(back == data, "{n} B at {off}: read differs from write");
    }
    // The bytes really are in the server's pool: read them back over TCP with the same credential.
    let mut tcp = farpool_core::tcp::TcpTransport::connect(&srv.addr, Default::default())?;
    let data = pattern(4096, 99);
    lease.write(0, 12_288, &data)?;
    let mut back = vec![0u8; 4096];
    tcp.read(lease.addr(0, 12_288, 4096)?, &mut back)?;
    ensure!(back == data, "RDMA WRITE not visible to the server's TCP data path");
    let items: Vec<_> = (0..32).map(|k| (0usize, k * 8192, 8192usize)).collect();
    let pages = ep.read_many(&lease, &items)?;
    ensure!(pages.len() == 32 && pages.iter().all(|b| b.len() == 8192), "read_many shape");
    Ok(format!("{} sizes 8 B..1 MiB round trip over rdma, visible over tcp; 32 x 8 KiB batched", sizes.len()))
}

/// Registered arenas through the Pool API: frames written from and read straight into (sizes from 8 B
/// to 1.5 MiB, which the transport splits), the caller's own memory used in place and handed back,
/// and a read outside the grant refused with the arena unchanged.
fn check_arena(srv: &MemServer) -> Result<String> {
    let p = pool(&srv.addr, TransportChoice::Rdma)?;
    let lease = p.lease(0, 2)?;
    let mut ep = p.endpoint(0)?;
    ensure!(ep.kind() == TransportKind::Rdma, "endpoint is {}", ep.kind());
    let mut arena = p.arena(3 << 20)?;
    let device = arena.device().map(str::to_owned);
    ensure!(device.is_some(), "a forced-rdma pool's arena is not registered");
    for (i, n) in [8usize, 100, 4096, 8192, 65_536, 1_572_864].into_iter().enumerate() {
        let data = pattern(n, 50 + i as u64);
        let mut src = arena.slice_mut(0..n)?;
        src.copy_from_slice(&data);
        ep.write_from(&lease, 1, 4096, &src)?;
        let mut dst = arena.slice_mut((1 << 20) + 8..(1 << 20) + 8 + n)?;
        dst.fill(0);
        ep.read_into(&lease, 1, 4096, &mut dst)?;
        ensure!(dst[..] == data[..], "{n} B: the arena read back differs from what it wrote");
        let mut plain = vec![0u8; n];
        ep.read(&lease, 1, 4096, &mut plain)?;
        ensure!(plain == data, "{n} B: a plain read of what the arena wrote differs");
    }
    arena.as_mut_slice()[..8192].fill(0xA5);
    let e = ep.read_into(&lease, 1, SLAB - 4096, &mut arena.slice_mut(0..8192)?);
    ensure!(e.as_ref().is_err_and(|e| e.kind() == ErrorKind::OutOfRange), "read past the grant: {e:?}");
    ensure!(arena.as_slice()[..8192].iter().all(|&b| b == 0xA5), "a refused read changed the arena");
    let frames: Box<[u8]> = pattern(4 * 8192, 7).into_boxed_slice();
    let start = frames.as_ptr();
    let mut own = p.arena_from(frames)?;
    ensure!(own.device().is_some() && own.as_slice().as_ptr() == start, "the caller's memory is not used in place");
    for (k, frame) in own.chunks_mut(8192)?.enumerate() {
        lease.write_from(0, k as u64 * 8192, &frame)?;
    }
    for (k, mut frame) in own.chunks_mut(8192)?.enumerate() {
        lease.read_into(0, (3 - k as u64) * 8192, &mut frame)?;
    }
    let back = own.into_box().map_err(|_| anyhow!("the caller's memory did not come back"))?;
    ensure!(back.as_ptr() == start, "another allocation came back");
    let want = pattern(4 * 8192, 7);
    for k in 0..4 {
        ensure!(back[k * 8192..(k + 1) * 8192] == want[(3 - k) * 8192..(4 - k) * 8192], "frame {k} out of order");
    }
    Ok(format!(
        "arena registered on {}: 8 B..1.5 MiB written from / read into in place; caller frames used in place and returned",
        device.unwrap_or_default()
    ))
}

fn check_atomics(srv: &MemServer) -> Result<String> {
    const THREADS: u64 = 4;
    const OPS: u64 = 300;
    let p = Arc::new(pool(&srv.addr, TransportChoice::Rdma)?);
    let lease = Arc::new(p.lease(0, 1)?);
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let (p, lease) = (p.clone(), lease.clone());
            std::thread::spawn(move || -> farpool::Result<(Vec<u64>, u64)> {
                let mut ep = p.endpoint(0)?;
                let mut olds = Vec::with_capacity(OPS as usize);
                let mut retries = 0;
                for _ in 0..OPS {
                    olds.push(ep.fetch_add(&lease, 0, 0, 1)?);
                    let mut cur = ep.compare_swap(&lease, 0, 8, 0, 0)?;
                    loop {
                        let seen = ep.compare_swap(&lease, 0, 8, cur, cur + 1)?;
                        if seen == cur {
                            break;
                        }
                        retries += 1;
                        cur = seen;
                    }
                }
                Ok((olds, retries))
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut retries = 0;
    for w in workers {
        let (olds, r) = w.join().map_err(|_| anyhow!("worker panicked"))??;
        all.extend(olds);
        retries += r;
    }
    let faa = lease.fetch_add(0, 0, 0)?;
    let cas = lease.fetch_add(0, 8, 0)?;
    all.sort_unstable();
    all.dedup();
    let want = THREADS * OPS;
    ensure!(faa == want && cas == want, "FETCH_ADD sum {faa}, CAS sum {cas}, want {want}");
    ensure!(all.len() as u64 == want, "FETCH_ADD old values not distinct ({} distinct)", all.len());
    Ok(format!("{THREADS} threads x {OPS}: FETCH_ADD sum {faa}, CAS sum {cas} ({retries} CAS retries)"))
}

fn raw_read(t: &mut dyn Transport, addr: RemoteAddr, len: u32) -> farpool::Result<OpOutput> {
    t.run_one(WorkRequest { wr_id: 1, addr, op: OpKind::Read { len } })
}

fn check_out_of_range(srv: &MemServer) -> Result<String> {
    let p = pool(&srv.addr, TransportChoice::Rdma)?;
    let lease = p.lease(0, 1)?;
    let mut ep = p.endpoint(0)?;
    let mut buf = [0u8; 64];
    let e = ep.read(&lease, 0, SLAB - 8, &mut buf).unwrap_err();
    ensure!(e.kind() == ErrorKind::OutOfRange, "lease check: {e}");
    // Past the grant on the raw transport: refused before the NIC (the grant's length is known).
    let end = lease.addr(0, SLAB - 8, 8)?.offset_by(8);
    let e = raw_read(ep.transport(), end, 64).unwrap_err();
    ensure!(e.kind() == ErrorKind::OutOfRange, "raw transport: {e}");
    ep.read(&lease, 0, 0, &mut buf)?;
    // An address outside the MR that the client cannot check (a forged base address): the NIC refuses
    // it, the queue pair breaks and is re-established at the next post; the server is unharmed.
    let mut forged = lease.addr(0, 0, 64)?;
    forged.cred.base_addr -= 1 << 20;
    let nic = raw_read(ep.transport(), forged, 64).unwrap_err();
    ep.read(&lease, 0, 0, &mut buf).context("the same endpoint after the NIC refused an access")?;
    let other = pool(&srv.addr, TransportChoice::Rdma)?;
    let l2 = other.lease(0, 1)?;
    l2.write(0, 0, b"still serving")?;
    Ok(format!(
        "lease: out_of_range; raw: out_of_range before posting; NIC: {} ({}); endpoint reconnected, server serves a new client",
        nic.kind(),
        short(&nic)
    ))
}

fn short(e: &farpool::Error) -> String {
    e.to_string().chars().take(110).collect()
}

fn check_revoke(srv: &MemServer) -> Result<String> {
    let p = pool(&srv.addr, TransportChoice::Rdma)?;
    let events = p.events();
    let a = p.lease(0, 1)?;
    let b = p.lease(0, 1)?;
    a.write(0, 0, b"lease a")?;
    b.write(0, 0, b"lease b")?;
    let saved = [a.addr(0, 0, 64)?, b.addr(0, 0, 64)?];
    let mut ep = p.endpoint(0)?;
    let free = p.admin(0, AdminCmd::Stats)?.stat("slabs_free").ok_or_else(|| anyhow!("no slabs_free stat"))?;
    let t0 = Instant::now();
    p.admin(0, AdminCmd::Shrink { slabs: free as u32 + 1, grace_ms: 300 })?;
    let revoked = loop {
        ensure!(t0.elapsed() < Duration::from_secs(20), "no Revoked event within 20 s");
        if let Ok(PoolEvent::Revoked { lease, .. }) = events.recv_timeout(Duration::from_millis(200)) {
            break lease;
        }
    };
    let (gone, kept, kept_lease) = if revoked == a.id() { (saved[0], saved[1], &b) } else { (saved[1], saved[0], &a) };
    // The old rkey at the NIC: the raw transport posts it (the lease itself would refuse client-side).
    let e = raw_read(ep.transport(), gone, 64).unwrap_err();
    ensure!(e.kind() == ErrorKind::Revoked, "old rkey: expected revoked, got {e}");
    let mut buf = [0u8; 7];
    ep.read(kept_lease, 0, 0, &mut buf).context("the other lease after the revoke")?;
    ensure!(&buf == b"lease a" || &buf == b"lease b", "other lease reads {buf:?}");
    match raw_read(ep.transport(), kept, 7)? {
        OpOutput::Read(d) if d[..] == buf => {}
        other => bail!("other lease via raw transport: {other:?}"),
    }
    Ok(format!(
        "shrink by {} with 300 ms grace revoked a lease; old rkey -> {}; the other lease still served",
        free + 1,
        short(&e)
    ))
}

fn check_auto(srv: &MemServer) -> Result<String> {
    let p = pool(&srv.addr, TransportChoice::Auto)?;
    let n = p.transport_of(0)?;
    ensure!(n.kind == TransportKind::Rdma, "auto chose {} ({})", n.kind, n.reason);
    let l = p.lease(Target::Auto, 1)?;
    l.write(0, 0, b"auto")?;
    Ok(format!("auto chose {}: {}", n.kind, n.reason))
}

/// The client's device selection: the device (and GID index) named explicitly works; a name that does
/// not exist makes forced rdma fail with `Unsupported` naming it, and auto fall back to tcp saying why.
fn check_device_select(a: &Args, srv: &MemServer) -> Result<String> {
    let base = || PoolBuilder::new([srv.addr.as_str()]).with_op_timeout_ms(3_000).with_connect_timeout_ms(5_000);
    let mut named = base().with_transport(TransportChoice::Rdma).with_rdma_device(a.device.clone());
    if let Some(g) = &a.gid_index {
        named = named.with_rdma_gid_index(g.parse().context("--gid-index")?);
    }
    let p = named.build()?;
    let n = p.transport_of(0)?;
    ensure!(n.kind == TransportKind::Rdma, "named device: {}", n.reason);
    let l = p.lease(0, 1)?;
    l.write(0, 0, b"named")?;
    let mut back = [0u8; 5];
    l.read(0, 0, &mut back)?;
    ensure!(&back == b"named", "read back {back:?}");
    let bogus = "farpool-no-such-device";
    let e = base()
        .with_transport(TransportChoice::Rdma)
        .with_rdma_device(bogus)
        .build()
        .err()
        .ok_or_else(|| anyhow!("forced rdma on device {bogus:?} built a pool"))?;
    ensure!(e.kind() == ErrorKind::Unsupported && e.to_string().contains(bogus), "forced: {e}");
    let n = base().with_rdma_device(bogus).build()?.transport_of(0)?;
    ensure!(n.kind == TransportKind::Tcp && n.reason.contains(bogus), "auto chose {} ({})", n.kind, n.reason);
    Ok(format!("{} works; {bogus}: forced {}; auto {}", a.device, short(&e), n.reason))
}

/// The guest's free memory in bytes (`MemFree` of /proc/meminfo).
fn mem_free() -> Result<u64> {
    let m = std::fs::read_to_string("/proc/meminfo")?;
    let kb = m
        .lines()
        .find_map(|l| l.strip_prefix("MemFree:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow!("no MemFree in /proc/meminfo"))?;
    Ok(kb << 10)
}

/// With rdma on, a granted slab is pinned by its MR only: leasing slabs over rdma takes their memory,
/// and shrinking them away (revoke, MR deregistered, pages discarded) gives it back to the OS.
fn check_shrink_frees_memory(a: &Args) -> Result<String> {
    const BIG: u64 = 32 << 20;
    const N: u64 = 8;
    let total = BIG * N;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let srv = MemServer::start_sized(a, "shrink-mem", BIG, N, &MemServer::rdma_args(a))?;
    let p = pool(&srv.addr, TransportChoice::Rdma)?;
    let events = p.events();
    let before = mem_free()?;
    let lease = p.lease(0, N as u32)?;
    for g in 0..N as usize {
        lease.write(g, BIG - 8, b"farpool!")?;
    }
    let held = mem_free()?;
    ensure!(
        before.saturating_sub(held) >= total * 3 / 4,
        "leasing {} MiB over rdma took only {:.0} MiB of free memory (were the slabs pinned before?)",
        mib(total),
        mib(before.saturating_sub(held))
    );
    let t0 = Instant::now();
    p.admin(0, AdminCmd::Shrink { slabs: N as u32, grace_ms: 0 })?;
    loop {
        ensure!(t0.elapsed() < Duration::from_secs(20), "no Revoked event within 20 s");
        if let Ok(PoolEvent::Revoked { lease: l, .. }) = events.recv_timeout(Duration::from_millis(200))
            && l == lease.id()
        {
            break;
        }
    }
    let back = loop {
        let now = mem_free()?;
        if now.saturating_sub(held) >= total * 3 / 4 || t0.elapsed() > Duration::from_secs(20) {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        back.saturating_sub(held) >= total * 3 / 4,
        "shrinking away {} MiB of rdma-granted slabs gave back only {:.0} MiB",
        mib(total),
        mib(back.saturating_sub(held))
    );
    Ok(format!(
        "leasing {} MiB over rdma took {:.0} MiB; shrinking them away gave back {:.0} MiB in {:.2}s",
        mib(total),
        mib(before.saturating_sub(held)),
        mib(back.saturating_sub(held)),
        t0.elapsed().as_secs_f64()
    ))
}

fn check_forced_unavailable(a: &Args) -> Result<String> {
    let srv = MemServer::start(a, "nordma", &["--no-rdma"])?;
    let e = pool(&srv.addr, TransportChoice::Rdma)
        .err()
        .ok_or_else(|| anyhow!("forced rdma against --no-rdma built a pool"))?;
    ensure!(e.kind() == ErrorKind::Unsupported, "{e}");
    let n = pool(&srv.addr, TransportChoice::Auto)?.transport_of(0)?;
    ensure!(n.kind == TransportKind::Tcp, "auto chose {}", n.kind);
    Ok(format!("forced: {}; auto: {}", short(&e), n.reason))
}

fn check_killed(a: &Args) -> Result<String> {
    let mut srv = MemServer::start(a, "killed", &MemServer::rdma_args(a))?;
    let p = pool(&srv.addr, TransportChoice::Rdma)?;
    let lease = p.lease(0, 1)?;
    let mut ep = p.endpoint(0)?;
    let addr = lease.addr(0, 0, 4096)?;
    for _ in 0..50 {
        raw_read(ep.transport(), addr, 4096)?;
    }
    srv.child.kill()?;
    srv.child.wait()?;
    // The data path itself (the raw transport, not the lease, which the control connection's loss
    // marks lost at once): the queue pair's peer is gone.
    let t0 = Instant::now();
    let mut first = None;
    for i in 0..200 {
        if let Err(e) = raw_read(ep.transport(), addr, 4096) {
            first = Some((i, e, t0.elapsed()));
            break;
        }
    }
    let (ops, e, took) = first.ok_or_else(|| anyhow!("200 RDMA reads succeeded after kill -9"))?;
    ensure!(took < Duration::from_secs(15), "first error after {took:?}");
    let t1 = Instant::now();
    let again = raw_read(ep.transport(), addr, 4096).unwrap_err();
    let mut buf = [0u8; 8];
    let lease_err = lease.read(0, 0, &mut buf).unwrap_err();
    let fresh = p.endpoint(0).err().ok_or_else(|| anyhow!("a new endpoint to a dead server connected"))?;
    ensure!(t1.elapsed() < Duration::from_secs(15), "later calls took {:?}", t1.elapsed());
    Ok(format!(
        "after kill -9: {ops} more RDMA reads ok, then {} in {:.2}s ({}); next {}; lease {}; new endpoint {} ({:.2}s)",
        e.kind(),
        took.as_secs_f64(),
        short(&e),
        again.kind(),
        lease_err.kind(),
        fresh.kind(),
        t1.elapsed().as_secs_f64()
    ))
}

fn report(name: &str, r: Result<String>, failed: &mut bool) {
    match r {
        Ok(why) => println!("RESULT pool-{name} PASS {why}"),
        Err(e) => {
            *failed = true;
            println!("RESULT pool-{name} FAIL {}", format!("{e:#}").replace('\n', " "));
        }
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,farpool=info"))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let a = parse_args()?;
    let want = |c: &str| a.cases.is_empty() || a.cases.iter().any(|x| x == c);
    let mut failed = false;
    let srv = match MemServer::start(&a, "main", &MemServer::rdma_args(&a)) {
        Ok(s) => s,
        Err(e) => {
            println!("RESULT pool-server FAIL {e:#}");
            std::process::exit(1);
        }
    };
    type Case = fn(&MemServer) -> Result<String>;
    let cases: [(&str, Case); 7] = [
        ("offered", check_offered),
        ("readwrite", check_readwrite),
        ("arena", check_arena),
        ("atomics", check_atomics),
        ("out-of-range", check_out_of_range),
        ("auto", check_auto),
        ("revoke", check_revoke),
    ];
    for (name, f) in cases {
        if want(name) {
            let t = Instant::now();
            let r = f(&srv).map(|w| format!("{w} ({:.2}s)", t.elapsed().as_secs_f64()));
            report(name, r, &mut failed);
        }
    }
    if want("device-select") {
        let t = Instant::now();
        let r = check_device_select(&a, &srv).map(|w| format!("{w} ({:.2}s)", t.elapsed().as_secs_f64()));
        report("device-select", r, &mut failed);
    }
    if want("shrink-frees-memory") {
        report("shrink-frees-memory", check_shrink_frees_memory(&a), &mut failed);
    }
    if want("forced-unavailable") {
        report("forced-unavailable", check_forced_unavailable(&a), &mut failed);
    }
    if want("killed") {
        report("killed", check_killed(&a), &mut failed);
    }
    drop(srv);
    std::process::exit(i32::from(failed));
}
