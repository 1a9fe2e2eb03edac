//! `farbench shm`: the shared-memory transport against a raw memcpy, side by side in one run.
//!
//! Setup: an shm grant registry and its Unix-socket server in this process (the same code the memory
//! server hosts), a client that attaches one grant over the socket (memfd passed with SCM_RIGHTS) and
//! maps it, and a [`ShmTransport`] over that mapping: the exact client data path. The baseline is a
//! plain `copy_from_slice` between a private buffer of the same working-set size and an op-sized
//! buffer, at the same random, size-aligned offsets (one precomputed sequence for every phase).
//!
//! Phases: latency (each op timed, `--iters` ops) for raw read, shm read, raw write, shm write; then
//! single-thread bandwidth (`--bw-ms` each) for raw read, shm read, shm write. Bars (ARCHITECTURE.md):
//! shm read p50 <= 1.5x raw p50; shm read bandwidth >= 70% of raw. Data is checked before and after.
//!
//! Invariants: every loop is bounded in operations and time; figures come from completed operations.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Args;
use farpool_core::size::format_bytes;
use farpool_core::{Credential, Epoch, LeaseId, RemoteAddr, SlabGrant, SlabId, Token, Transport};
use farpool_cxl::coherence::Coherence;
use farpool_cxl::shm::{GrantMemory, ShmClient, ShmGrants, ShmOptions, ShmServer, ShmServerOptions, ShmTransport};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::stats::LatencyHist;

/// Bar: shm 8 KiB read p50 at most this multiple of the raw memcpy p50.
pub const READ_P50_RATIO_MAX: f64 = 1.5;
/// Bar: single-thread shm read bandwidth at least this fraction of raw.
pub const READ_BW_RATIO_MIN: f64 = 0.70;

/// Arguments of `farbench shm`.
#[derive(Args, Debug, Clone)]
pub struct ShmArgs {
    /// Bytes per operation.
    #[arg(long, default_value = "8KiB", value_parser = crate::op::size_arg)]
    pub size: u64,
    /// Working set: the grant size, and the raw buffer size (larger than the LLC for random access).
    #[arg(long, default_value = "64MiB", value_parser = crate::op::size_arg)]
    pub working_set: u64,
    /// Timed operations per latency phase (after 10% warm-up).
    #[arg(long, default_value_t = 200_000)]
    pub iters: u64,
    /// Duration of each bandwidth phase, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub bw_ms: u64,
    /// Coherence mode of the shm endpoint: coherent or flush.
    #[arg(long, default_value = "coherent")]
    pub coherence: Coherence,
    /// Seed of the offset sequence.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Report bars but exit 0 even when one fails.
    #[arg(long)]
    pub no_check: bool,
}

/// One phase's figures.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    /// Phase name.
    pub name: String,
    /// Latency p50 in microseconds (latency phases).
    pub p50_us: Option<f64>,
    /// Latency p99 in microseconds (latency phases).
    pub p99_us: Option<f64>,
    /// Bandwidth in MiB/s (bandwidth phases).
    pub mib_s: Option<f64>,
}

/// Everything one run produced.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Bytes per op.
    pub size: u64,
    /// Working set in bytes.
    pub working_set: u64,
    /// Coherence mode.
    pub coherence: String,
    /// Phases in run order.
    pub phases: Vec<Phase>,
    /// shm read p50 / raw read p50.
    pub read_p50_ratio: f64,
    /// shm read bandwidth / raw read bandwidth.
    pub read_bw_ratio: f64,
}

/// The shm endpoint under test plus the server side keeping it alive.
struct Rig {
    _server: ShmServer,
    _grants: std::sync::Arc<ShmGrants>,
    grant: SlabGrant,
    t: ShmTransport,
}

fn rig(a: &ShmArgs) -> Result<Rig> {
    let path = std::env::temp_dir().join(format!("farbench-shm-{}.sock", std::process::id()));
    let grants = ShmGrants::new(GrantMemory::Memfd);
    let server = ShmServer::bind(&path, grants.clone(), ShmServerOptions::default())?;
    let cred =
        Credential { lease: LeaseId(1), epoch: Epoch(1), token: Token(rand::rng().random()), rkey: 0, base_addr: 0 };
    grants.create(cred.lease, SlabId(0), cred.epoch, cred.token, a.working_set)?;
    let grant = SlabGrant { slab: SlabId(0), len: a.working_set, cred };
    let m = ShmClient::connect(&path, Duration::from_secs(5))?.attach(&grant)?;
    let mut t = ShmTransport::new(ShmOptions::default().with_coherence(a.coherence));
    t.insert(m);
    Ok(Rig { _server: server, _grants: grants, grant, t })
}

fn offsets(a: &ShmArgs, n: usize) -> Vec<usize> {
    let slots = (a.working_set / a.size).max(1);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(a.seed);
    (0..n).map(|_| (rng.random_range(0..slots) * a.size) as usize).collect()
}

/// Time `op(offset)` for each offset; the first 10% are warm-up.
fn latency(offs: &[usize], mut op: impl FnMut(usize) -> Result<()>) -> Result<LatencyHist> {
    let mut h = LatencyHist::new();
    let warm = offs.len() / 10;
    for (i, &o) in offs.iter().enumerate() {
        let t0 = Instant::now();
        op(o)?;
        if i >= warm {
            h.record(t0.elapsed());
        }
    }
    ensure!(!h.is_empty(), "no operation completed");
    Ok(h)
}

/// Run `op` over the offsets (cycling) for `ms`; returns MiB/s.
fn bandwidth(offs: &[usize], size: u64, ms: u64, mut op: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    let limit = Duration::from_millis(ms.max(1));
    let (t0, mut ops) = (Instant::now(), 0u64);
    // Bounded by time (checked every 64 ops) and by a hard cap on operations.
    while ops < 1 << 34 {
        for _ in 0..64 {
            op(offs[(ops as usize) % offs.len()])?;
            ops += 1;
        }
        if t0.elapsed() >= limit {
            break;
        }
    }
    Ok((ops * size) as f64 / t0.elapsed().as_secs_f64() / f64::from(1u32 << 20))
}

fn lat_phase(name: &str, h: &LatencyHist) -> Phase {
    Phase { name: name.into(), p50_us: Some(h.quantile_us(0.5)), p99_us: Some(h.quantile_us(0.99)), mib_s: None }
}

fn bw_phase(name: &str, v: f64) -> Phase {
    Phase { name: name.into(), p50_us: None, p99_us: None, mib_s: Some(v) }
}

/// Write a pattern over shm, read it back raw from the mapping and over shm.
fn check_data(r: &mut Rig, size: usize) -> Result<()> {
    let pat: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
    let a = RemoteAddr::in_grant(&r.grant, r.grant.len - size as u64);
    r.t.write(a, &pat)?;
    let mut back = vec![0u8; size];
    r.t.read(a, &mut back)?;
    ensure!(back == pat, "shm data check failed");
    Ok(())
}

fn measure(a: &ShmArgs, r: &mut Rig) -> Result<Vec<Phase>> {
    let size = usize::try_from(a.size)?;
    let offs = offsets(a, usize::try_from(a.iters)? * 11 / 10);
    let mut raw = vec![1u8; usize::try_from(a.working_set)?];
    let mut buf = vec![0u8; size];
    let src = vec![0x5Au8; size];
    r.t.write(RemoteAddr::in_grant(&r.grant, 0), &raw)?; // populate the grant like the raw buffer
    let g = r.grant;
    let mut phases = Vec::new();
    let h = latency(&offs, |o| {
        buf.copy_from_slice(&raw[o..o + size]);
        Ok(())
    })?;
    phases.push(lat_phase("raw memcpy read", &h));
    let h = latency(&offs, |o| Ok(r.t.read(RemoteAddr::in_grant(&g, o as u64), &mut buf)?))?;
    phases.push(lat_phase("shm read", &h));
    let h = latency(&offs, |o| {
        raw[o..o + size].copy_from_slice(&src);
        Ok(())
    })?;
    phases.push(lat_phase("raw memcpy write", &h));
    let h = latency(&offs, |o| Ok(r.t.write(RemoteAddr::in_grant(&g, o as u64), &src)?))?;
    phases.push(lat_phase("shm write", &h));
    let bw = bandwidth(&offs, a.size, a.bw_ms, |o| {
        buf.copy_from_slice(&raw[o..o + size]);
        Ok(())
    })?;
    phases.push(bw_phase("raw memcpy read bw", bw));
    let bw = bandwidth(&offs, a.size, a.bw_ms, |o| Ok(r.t.read(RemoteAddr::in_grant(&g, o as u64), &mut buf)?))?;
    phases.push(bw_phase("shm read bw", bw));
    let bw = bandwidth(&offs, a.size, a.bw_ms, |o| Ok(r.t.write(RemoteAddr::in_grant(&g, o as u64), &src)?))?;
    phases.push(bw_phase("shm write bw", bw));
    std::hint::black_box((&raw, &buf));
    let mut back = vec![0u8; size];
    r.t.read(RemoteAddr::in_grant(&g, offs[0] as u64), &mut back)?;
    ensure!(back == src, "shm write phase left wrong data");
    Ok(phases)
}

fn find(phases: &[Phase], name: &str) -> Result<Phase> {
    phases.iter().find(|p| p.name == name).cloned().with_context(|| format!("phase {name} missing"))
}

fn print(rep: &Report) {
    println!(
        "farbench shm: {} ops, working set {}, coherence {}",
        format_bytes(rep.size),
        format_bytes(rep.working_set),
        rep.coherence
    );
    println!("{:<22} {:>9} {:>9} {:>12}", "phase", "p50 us", "p99 us", "MiB/s (1 th)");
    let f = |v: Option<f64>, p: usize| v.map_or("-".to_owned(), |v| format!("{v:.p$}"));
    for p in &rep.phases {
        println!("{:<22} {:>9} {:>9} {:>12}", p.name, f(p.p50_us, 2), f(p.p99_us, 2), f(p.mib_s, 0));
    }
}

/// Run `farbench shm`.
pub fn run(a: &ShmArgs) -> Result<ExitCode> {
    ensure!(a.size > 0 && a.size <= a.working_set, "--size must be in 1..=--working-set");
    ensure!(a.iters >= 10, "--iters must be at least 10");
    let mut r = rig(a)?;
    check_data(&mut r, usize::try_from(a.size)?)?;
    let phases = measure(a, &mut r)?;
    let (raw_l, shm_l) = (find(&phases, "raw memcpy read")?, find(&phases, "shm read")?);
    let (raw_b, shm_b) = (find(&phases, "raw memcpy read bw")?, find(&phases, "shm read bw")?);
    let rep = Report {
        size: a.size,
        working_set: a.working_set,
        coherence: a.coherence.to_string(),
        read_p50_ratio: shm_l.p50_us.unwrap_or(f64::NAN) / raw_l.p50_us.unwrap_or(f64::NAN),
        read_bw_ratio: shm_b.mib_s.unwrap_or(f64::NAN) / raw_b.mib_s.unwrap_or(f64::NAN),
        phases,
    };
    print(&rep);
    let p50_ok = rep.read_p50_ratio <= READ_P50_RATIO_MAX;
    let bw_ok = rep.read_bw_ratio >= READ_BW_RATIO_MIN;
    let v = |ok: bool| if ok { "PASS" } else { "FAIL" };
    println!("bar: shm read p50 / raw = {:.2} (<= {READ_P50_RATIO_MAX}): {}", rep.read_p50_ratio, v(p50_ok));
    println!("bar: shm read bw / raw = {:.2} (>= {READ_BW_RATIO_MIN}): {}", rep.read_bw_ratio, v(bw_ok));
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&rep)?).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(if p50_ok && bw_ok || a.no_check { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
