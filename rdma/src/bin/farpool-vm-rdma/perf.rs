//! Latency and bandwidth modes, shaped like perftest's `ib_read_lat` / `ib_read_bw`: one client
//! endpoint against the in-process server (or another process's, `--connect`), zero-copy operations on a registered buffer, busy polling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use farpool_core::ids::{Credential, Epoch, LeaseId, RemoteAddr, SlabGrant, SlabId, Token};
use farpool_core::{ErrorKind, OpKind, Result, Transport, WorkRequest};
use farpool_rdma::{
    Access, Context, CycleClock, DirectOp, Direction, EndpointConfig, LocalBuffer, RdmaTransport, Remote,
};

use crate::fail;
use std::net::SocketAddr;

use crate::net::Client;

/// Which operation to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PerfOp {
    Read,
    /// READ through the endpoint's staging (`Endpoint::read`: the bytes come back copied, as the
    /// `Transport` path does).
    ReadStaged,
    /// READ through `RdmaTransport::run_one` (the `Transport` layer the client library uses, here without
    /// a memory server or pool around it).
    ReadTransport,
    /// READ through `post_direct` + `poll_completions` (the batched zero-copy path); also reports the
    /// time spent posting.
    ReadDirect,
    /// Diagnostic floor, `probe` builds only: perftest's own loop (`ibv_post_send` + `ibv_poll_cq`
    /// spin) on the endpoint's queue pair, none of the endpoint's bookkeeping
    /// (`Endpoint::probe_raw_reads`).
    ReadRaw,
    /// The READ variants (`read`, `read-placed`, `read-staged`, `read-transport`) on one endpoint in one
    /// process, in alternating blocks: differences between them are the per-operation cost of each layer,
    /// free of what differs between processes (perftest's own minimum moves by ~10 us from run to run).
    Mix,
    Write,
    FetchAdd,
    CompareSwap,
}

impl PerfOp {
    pub fn parse(s: &str) -> Option<PerfOp> {
        Some(match s {
            "read" => PerfOp::Read,
            "read-staged" => PerfOp::ReadStaged,
            "read-transport" => PerfOp::ReadTransport,
            "read-direct" => PerfOp::ReadDirect,
            "read-raw" => PerfOp::ReadRaw,
            "mix" => PerfOp::Mix,
            "write" => PerfOp::Write,
            "faa" | "fetch_add" | "atomic" => PerfOp::FetchAdd,
            "cas" | "compare_swap" => PerfOp::CompareSwap,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            PerfOp::Read => "read",
            PerfOp::ReadStaged => "read-staged",
            PerfOp::ReadTransport => "read-transport",
            PerfOp::ReadDirect => "read-direct",
            PerfOp::ReadRaw => "read-raw",
            PerfOp::Mix => "mix",
            PerfOp::Write => "write",
            PerfOp::FetchAdd => "faa",
            PerfOp::CompareSwap => "cas",
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Options of the latency and bandwidth modes.
#[derive(Clone, Copy, Debug)]
pub struct PerfArgs {
    pub op: PerfOp,
    pub size: u32,
    pub iters: usize,
    pub depth: usize,
    /// `EndpointConfig::with_spin_polls`, default if `None`.
    pub spin: Option<u32>,
    /// Force the legacy verbs API.
    pub legacy: bool,
    /// Time with the cycle counter (x86_64), as perftest does; else `Instant`.
    pub tsc: bool,
}

impl PerfArgs {
    fn config(&self) -> EndpointConfig {
        let mut cfg = EndpointConfig::new().with_extended_verbs(!self.legacy);
        if let Some(n) = self.spin {
            cfg = cfg.with_spin_polls(n);
        }
        cfg
    }
}

/// One operation at a time on a send queue of `depth` (perftest's latency tests use 1); prints `lat op=.. size=.. iters=.. p50_us=.. p99_us=..`.
pub fn latency(ctx: &Arc<Context>, server: SocketAddr, a: &PerfArgs) -> Result<()> {
    let (op, size) = (a.op, a.size);
    let mut c = Client::connect(ctx, server, a.config().with_inflight_max(a.depth.max(1)))?;
    let r = c.regions[0];
    if u64::from(size) > r.len {
        return fail(ErrorKind::Config, format!("--size {size} exceeds the slab of {} bytes", r.len));
    }
    let mut buf = LocalBuffer::new(ctx, size.max(8) as usize, Access::LOCAL)?;
    let at = Remote { addr: r.addr, rkey: r.rkey };
    let mut ops = Vec::with_capacity(1);
    let mut done = Vec::with_capacity(1);
    if matches!(op, PerfOp::ReadTransport | PerfOp::Mix) {
        let (ep, _stream) = c.into_endpoint();
        let cred = Credential { lease: LeaseId(1), epoch: Epoch(1), token: Token(0), rkey: r.rkey, base_addr: r.addr };
        let g = SlabGrant { slab: SlabId(0), len: r.len, cred };
        let mut t = RdmaTransport::new(ep);
        t.add_grant(&g);
        let addr = RemoteAddr::in_grant(&g, 0);
        if op == PerfOp::Mix {
            return mix(a, &mut t, &mut buf, at, addr);
        }
        let (stamps, mhz) =
            timed(a, |i| t.run_one(WorkRequest { wr_id: i as u64, addr, op: OpKind::Read { len: size } }).map(drop))?;
        report(a, &stamps, mhz);
        return Ok(());
    }
    if op == PerfOp::ReadRaw {
        return raw(a, &mut c.ep, &buf, at);
    }
    let (stamps, mhz) = timed(a, |i| {
        match op {
            PerfOp::Read => c.ep.read_into(&mut buf, 0, size, at)?,
            PerfOp::ReadStaged => drop(c.ep.read(at, size)?),
            PerfOp::ReadTransport | PerfOp::Mix | PerfOp::ReadRaw => unreachable!("handled above"),
            PerfOp::ReadDirect => {
                let local = buf.registration().clone();
                ops.push(DirectOp { wr_id: i as u64, dir: Direction::Read, local, offset: 0, len: size, remote: at });
                // SAFETY: `buf` is not touched by the CPU until the completion below has been polled.
                unsafe { c.ep.post_direct(&mut ops)? };
                while c.ep.poll_completions(&mut done, 1, Duration::from_secs(5))? == 0 {}
                done.pop().map(|d| d.result).transpose()?;
            }
            PerfOp::Write => c.ep.write_from(&buf, 0, size, at)?,
            PerfOp::FetchAdd => drop(c.ep.fetch_add(at, 1)?),
            PerfOp::CompareSwap => drop(c.ep.compare_swap(at, 0, 0)?),
        }
        Ok(())
    })?;
    report(a, &stamps, mhz);
    Ok(())
}

/// `PerfOp::ReadRaw`: warm-up and timed loop inside `Endpoint::probe_raw_reads`, one clock read per
/// iteration as `timed` does.
#[cfg(feature = "probe")]
fn raw(a: &PerfArgs, ep: &mut farpool_rdma::Endpoint, buf: &LocalBuffer, at: Remote) -> Result<()> {
    let (iters, warmup) = (a.iters, (a.iters / 10).clamp(10, 1000));
    let reg = buf.registration();
    ep.probe_raw_reads(reg, 0, a.size, at, warmup, |_| {})?;
    let clock = CycleClock::start(a.tsc);
    let mut stamps = Vec::with_capacity(iters + 1);
    ep.probe_raw_reads(reg, 0, a.size, at, iters, |_| stamps.push(clock.now()))?;
    let mhz = clock.mhz();
    clock.to_ns(&mut stamps);
    report(a, &stamps, mhz);
    Ok(())
}

#[cfg(not(feature = "probe"))]
fn raw(_: &PerfArgs, _: &mut farpool_rdma::Endpoint, _: &LocalBuffer, _: Remote) -> Result<()> {
    fail(ErrorKind::Config, "--lat read-raw needs a build with the `probe` feature (a diagnostic)")
}

/// `PerfOp::Mix`: 10 blocks of each READ variant in turn, `a.iters / 10` operations per block, on one
/// endpoint; one `lat` line per variant over all its blocks.
fn mix(a: &PerfArgs, t: &mut RdmaTransport, buf: &mut LocalBuffer, at: Remote, addr: RemoteAddr) -> Result<()> {
    const BLOCKS: usize = 10;
    const NAMES: [&str; 4] = ["read", "read-placed", "read-staged", "read-transport"];
    let size = a.size;
    let block = PerfArgs { iters: (a.iters / BLOCKS).max(10), ..*a };
    let mut placed = vec![0u8; size as usize];
    let mut samples: [Vec<u64>; 4] = Default::default();
    let mut mhz = None;
    for _ in 0..BLOCKS {
        for (v, out) in samples.iter_mut().enumerate() {
            let (stamps, rate) = timed(&block, |i| {
                match v {
                    0 => t.endpoint_mut().read_into(buf, 0, size, at)?,
                    1 => t.read(addr, &mut placed)?,
                    2 => drop(t.endpoint_mut().read(at, size)?),
                    _ => drop(t.run_one(WorkRequest { wr_id: i as u64, addr, op: OpKind::Read { len: size } })?),
                }
                Ok(())
            })?;
            out.extend(stamps.windows(2).map(|w| w[1] - w[0]));
            mhz = rate;
        }
    }
    for (name, s) in NAMES.iter().zip(samples) {
        report_samples(&format!("mix:{name}"), a, s.into_iter().map(|ns| ns as f64 / 1e3).collect(), mhz);
    }
    Ok(())
}

/// Run `op(i)` for a warm-up and then `a.iters` times, one at a time. As perftest does: one
/// cycle-counter read per iteration (`CycleClock`; `--clock-instant` for `Instant`), before the
/// operation; a sample is the distance between two consecutive reads (the whole post + wait loop).
/// Returns the `a.iters + 1` readings of the measured part, in nanoseconds.
fn timed(a: &PerfArgs, mut op: impl FnMut(usize) -> Result<()>) -> Result<(Vec<u64>, Option<f64>)> {
    let (iters, warmup) = (a.iters, (a.iters / 10).clamp(10, 1000));
    let mut stamps = Vec::with_capacity(iters + 1);
    let clock = CycleClock::start(a.tsc);
    for i in 0..=warmup + iters {
        if i >= warmup {
            stamps.push(clock.now());
        }
        if i == warmup + iters {
            break;
        }
        op(i)?;
    }
    let mhz = clock.mhz();
    clock.to_ns(&mut stamps);
    Ok((stamps, mhz))
}

/// Print the `lat ...` line of one latency run from its per-iteration clock readings.
fn report(a: &PerfArgs, stamps_ns: &[u64], mhz: Option<f64>) {
    report_samples(a.op.name(), a, stamps_ns.windows(2).map(|w| (w[1] - w[0]) as f64 / 1e3).collect(), mhz);
}

/// Print one `lat op=NAME ...` line from samples in microseconds.
/// With the cycle counter, `tsc_mhz=` ends the line: its rate against the monotonic clock.
fn report_samples(name: &str, a: &PerfArgs, mut samples: Vec<f64>, mhz: Option<f64>) {
    let gap = match mhz.and_then(farpool_rdma::probe::take_p50_us) {
        Some(us) => format!(" post_gap_p50_us={us:.2}"),
        None => String::new(),
    };
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    println!(
        "lat op={} size={} iters={} spin={} verbs={} clock={} min_us={:.2} p50_us={:.2} p99_us={:.2} max_us={:.2} mean_us={mean:.2}{}",
        name,
        a.size,
        samples.len(),
        a.spin.map_or_else(|| "default".to_string(), |n| n.to_string()),
        if a.legacy { "legacy" } else { "extended" },
        if a.tsc && CycleClock::start(true).is_cycles() { "tsc" } else { "instant" },
        samples[0],
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1],
        mhz.map(|m| format!(" tsc_mhz={m:.1}")).unwrap_or_default(),
    );
    if !gap.is_empty() {
        println!("probe op={name}{gap}");
    }
}

/// `depth` zero-copy operations kept in flight; prints `bw op=.. size=.. MiB_s=.. ops_s=..`.
pub fn bandwidth(ctx: &Arc<Context>, server: SocketAddr, a: &PerfArgs) -> Result<()> {
    let (op, size, iters, depth) = (a.op, a.size, a.iters, a.depth);
    let dir = match op {
        PerfOp::Read => Direction::Read,
        PerfOp::Write => Direction::Write,
        _ => return fail(ErrorKind::Config, "--bw measures read or write"),
    };
    let cfg = a.config().with_inflight_max(depth.max(1));
    let mut c = Client::connect(ctx, server, cfg)?;
    let r = c.regions[0];
    if u64::from(size) > r.len {
        return fail(ErrorKind::Config, format!("--size {size} exceeds the slab of {} bytes", r.len));
    }
    let buf = LocalBuffer::new(ctx, size.max(8) as usize, Access::LOCAL)?;
    let at = Remote { addr: r.addr, rkey: r.rkey };
    let (mut posted, mut completed) = (0usize, 0usize);
    let mut ops = Vec::with_capacity(depth);
    let mut done = Vec::with_capacity(depth);
    let t0 = Instant::now();
    while completed < iters {
        while posted < iters && ops.len() + c.ep.inflight() < depth {
            let local = buf.registration().clone();
            ops.push(DirectOp { wr_id: posted as u64, dir, local, offset: 0, len: size, remote: at });
            posted += 1;
        }
        // SAFETY: nothing reads or writes `buf` from the CPU while this loop runs; its contents are
        // meaningless for a bandwidth run, and it outlives the endpoint's use of it (the last
        // completion is polled before the function returns).
        unsafe { c.ep.post_direct(&mut ops)? };
        done.clear();
        c.ep.poll_completions(&mut done, depth, Duration::from_secs(5))?;
        for d in done.drain(..) {
            d.result?;
            completed += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let bytes = size as f64 * iters as f64;
    println!(
        "bw op={} size={size} iters={iters} depth={depth} secs={secs:.3} MiB_s={:.1} ops_s={:.0}",
        op.name(),
        bytes / secs / (1 << 20) as f64,
        iters as f64 / secs
    );
    Ok(())
}
