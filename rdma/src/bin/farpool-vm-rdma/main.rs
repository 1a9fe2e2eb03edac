//! farpool-vm-rdma: the RDMA checks and measurements run in the qemu guest over Soft-RoCE (`rxe_lo`).
//!
//! A memory server and its clients live in this one process (threads); queue pair information and the
//! slab table travel over TCP on 127.0.0.1, as they will on the real control plane.
//!
//! ```text
//! farpool-vm-rdma [--device rxe_lo] [--gid-index 1] [--require-device] [--atomic-ops N] [--case NAME]...
//! farpool-vm-rdma --list
//! farpool-vm-rdma --lat read|read-staged|read-transport|read-direct|read-raw|mix|write|faa|cas [--size 8] [--iters 1000] [--depth 1] [--spin POLLS]
//!                 [--legacy-verbs] [--clock-instant]
//! farpool-vm-rdma --bw read|write [--size 65536] [--iters 2000] [--depth 16]
//! farpool-vm-rdma --listen PORT       (server only; then --lat/--bw ... --connect 127.0.0.1:PORT elsewhere)
//! ```
//! Checks print `RESULT rdma-<case> PASS|FAIL|SKIP <why>`; exit status 1 if any failed. Without a device
//! the run prints `RESULT rdma-device SKIP no RDMA device (...)` and exits 0, or FAIL with
//! `--require-device`.

mod checks;
mod net;
mod perf;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use farpool_core::{Error, ErrorKind, Result};
use farpool_rdma::{Context, DeviceSelector, discover};

use crate::net::Server;
use crate::perf::{PerfArgs, PerfOp};

/// Pool of the in-process server: 4 slabs of 4 MiB (a 1 MiB transfer plus offsets fits in one slab).
const SLABS: usize = 4;
const SLAB_LEN: u64 = 4 << 20;

#[derive(Debug)]
struct Args {
    device: Option<String>,
    gid_index: Option<u32>,
    require_device: bool,
    list: bool,
    lat: Option<PerfOp>,
    bw: Option<PerfOp>,
    size: Option<u32>,
    iters: Option<usize>,
    depth: Option<usize>,
    spin: Option<u32>,
    legacy: bool,
    clock_instant: bool,
    listen: Option<u16>,
    connect: Option<std::net::SocketAddr>,
    atomic_ops: u64,
    cases: Vec<String>,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        device: None,
        gid_index: None,
        require_device: false,
        list: false,
        lat: None,
        bw: None,
        size: None,
        iters: None,
        depth: None,
        spin: None,
        legacy: false,
        clock_instant: false,
        listen: None,
        connect: None,
        atomic_ops: 500,
        cases: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|_| format!("bad number {v:?}"));
        match flag.as_str() {
            "--device" => a.device = Some(val()?),
            "--gid-index" => a.gid_index = Some(num(val()?)? as u32),
            "--require-device" => a.require_device = true,
            "--list" => a.list = true,
            "--lat" => {
                a.lat = Some(
                    PerfOp::parse(&val()?)
                        .ok_or("--lat read|read-staged|read-transport|read-direct|read-raw|mix|write|faa|cas")?,
                )
            }
            "--bw" => a.bw = Some(PerfOp::parse(&val()?).ok_or("--bw read|write")?),
            "--size" => a.size = Some(num(val()?)? as u32),
            "--iters" => a.iters = Some(num(val()?)? as usize),
            "--depth" => a.depth = Some(num(val()?)? as usize),
            "--spin" => a.spin = Some(num(val()?)? as u32),
            "--legacy-verbs" => a.legacy = true,
            "--clock-instant" => a.clock_instant = true,
            "--listen" => a.listen = Some(num(val()?)? as u16),
            "--connect" => a.connect = Some(val()?.parse().map_err(|_| "--connect 127.0.0.1:PORT")?),
            "--atomic-ops" => a.atomic_ops = num(val()?)?,
            "--case" => a.cases.push(val()?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

/// `Err(Error::new(kind, message))`.
pub fn fail<T>(kind: ErrorKind, message: impl Into<String>) -> Result<T> {
    Err(Error::new(kind, message))
}

fn usage() -> &'static str {
    "usage: farpool-vm-rdma [--device NAME] [--gid-index N] [--require-device] [--atomic-ops N] [--case NAME]...\n\
     \x20      farpool-vm-rdma --list\n\
     \x20      farpool-vm-rdma --lat read|read-staged|read-transport|read-direct|read-raw|mix|write|faa|cas [--size 8] [--iters 1000] [--depth 1] [--spin POLLS] [--legacy-verbs] [--clock-instant]\n\
     \x20      farpool-vm-rdma --bw read|write [--size 65536] [--iters 2000] [--depth 16] [--connect ADDR]\n\
     \x20      farpool-vm-rdma --listen PORT\n\
     cases: readwrite batch atomics revoke out-of-range peer-gone"
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("farpool-vm-rdma: {e}");
            }
            eprintln!("{}", usage());
            std::process::exit(2);
        }
    };
    let code = match run(&args) {
        Ok(failed) => i32::from(failed),
        Err(e) => {
            eprintln!("farpool-vm-rdma: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// Returns whether any check failed.
fn run(args: &Args) -> Result<bool> {
    if args.list {
        for d in discover()? {
            println!("{d}");
        }
        return Ok(false);
    }
    let mut sel = DeviceSelector::new();
    if let Some(d) = &args.device {
        sel = sel.with_device(d);
    }
    let ctx = match Context::open(&sel) {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::Unsupported && !args.require_device => {
            println!("RESULT rdma-device SKIP {e}");
            return Ok(false);
        }
        Err(e) => {
            println!("RESULT rdma-device FAIL {e}");
            return Ok(true);
        }
    };
    let perf_mode = args.lat.is_some() || args.bw.is_some();
    // A client of another process's server (`--connect`) starts no server of its own: the process then
    // has one thread, as perftest's client has.
    if let (Some(addr), None, true) = (args.connect, args.listen, perf_mode) {
        return perf_run(args, &ctx, addr);
    }
    let server = Server::start(&ctx, SLABS, SLAB_LEN, args.listen.unwrap_or(0))?;
    if args.listen.is_some() {
        println!("listening on {}", server.addr());
        loop {
            std::thread::park();
        }
    }
    if perf_mode {
        return perf_run(args, &ctx, args.connect.unwrap_or(server.addr()));
    }
    Ok(run_checks(args, &ctx, &server))
}

/// `--lat` or `--bw` against the server at `target`.
fn perf_run(args: &Args, ctx: &Arc<Context>, target: std::net::SocketAddr) -> Result<bool> {
    let perf = |op, size, iters, depth| PerfArgs {
        op,
        size,
        iters,
        depth,
        spin: args.spin,
        legacy: args.legacy,
        tsc: !args.clock_instant,
    };
    if let Some(op) = args.lat {
        // Send queue depth 1 by default, as perftest's latency tests (ib_read_lat: "TX depth: 1").
        let a = perf(op, args.size.unwrap_or(8), args.iters.unwrap_or(1000), args.depth.unwrap_or(1));
        perf::latency(ctx, target, &a)?;
    } else if let Some(op) = args.bw {
        let a = perf(op, args.size.unwrap_or(65536), args.iters.unwrap_or(2000), args.depth.unwrap_or(16));
        perf::bandwidth(ctx, target, &a)?;
    }
    Ok(false)
}

fn device_check(args: &Args, ctx: &Context) -> Result<String> {
    let gid = ctx.gid().ok_or_else(|| Error::new(ErrorKind::Config, "no source GID chosen"))?;
    let what = format!(
        "{} port {} gid[{}] {} {:?} mtu {} atomics {}",
        ctx.name(),
        ctx.port(),
        gid.index,
        gid.addr(),
        gid.kind,
        ctx.active_mtu(),
        ctx.limits().atomics
    );
    match args.gid_index {
        Some(want) if want != gid.index => {
            Err(Error::new(ErrorKind::Internal, format!("auto-selected {what}, expected GID index {want}")))
        }
        _ => Ok(what),
    }
}

fn run_checks(args: &Args, ctx: &Arc<Context>, server: &Server) -> bool {
    type Check<'a> = Box<dyn Fn() -> Result<String> + 'a>;
    let checks: Vec<(&str, Check<'_>)> = vec![
        ("device", Box::new(|| device_check(args, ctx))),
        ("readwrite", Box::new(|| checks::readwrite(ctx, server))),
        ("batch", Box::new(|| checks::batch(ctx, server))),
        ("atomics", Box::new(|| checks::atomics(ctx, server, args.atomic_ops))),
        ("revoke", Box::new(|| checks::revoke(ctx, server))),
        ("out-of-range", Box::new(|| checks::out_of_range(ctx, server))),
        // last: it destroys the server's endpoints
        ("peer-gone", Box::new(|| checks::peer_gone(ctx, server))),
    ];
    let mut failed = false;
    for (name, check) in checks {
        if !args.cases.is_empty() && name != "device" && !args.cases.iter().any(|c| c == name) {
            continue;
        }
        let t0 = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(check)).unwrap_or_else(|p| {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(Error::new(ErrorKind::Internal, format!("panicked: {}", msg.unwrap_or_default())))
        });
        let secs = t0.elapsed().as_secs_f64();
        match outcome {
            Ok(why) => println!("RESULT rdma-{name} PASS {why} ({secs:.2}s)"),
            Err(e) => {
                failed = true;
                println!("RESULT rdma-{name} FAIL {e} ({secs:.2}s)");
            }
        }
    }
    failed
}
