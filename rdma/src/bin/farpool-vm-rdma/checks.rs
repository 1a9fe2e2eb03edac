//! The functional checks, each printing one `RESULT rdma-<case> PASS|FAIL <why>` line.

use std::collections::HashSet;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use farpool_core::{
    Credential, Epoch, ErrorKind, LeaseId, OpKind, RemoteAddr, Result, SlabGrant, SlabId, Token, Transport, WorkRequest,
};
use farpool_rdma::{
    Access, Context, EndpointConfig, EndpointState, LocalBuffer, Op, Output, RdmaTransport, Remote, RemoteRegion,
};

use crate::fail;
use crate::net::{Client, Server};

/// Sizes of the READ/WRITE round trips: 8 B .. 1 MiB.
pub const SIZES: [u32; 9] = [8, 64, 512, 4096, 8192, 65536, 262_144, 524_288, 1_048_576];

fn remote(r: &RemoteRegion, offset: u64) -> Remote {
    Remote { addr: r.addr + offset, rkey: r.rkey }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    farpool_core::sample::page_content(seed, 0, len)
}

fn ensure(cond: bool, why: impl FnOnce() -> String) -> Result<()> {
    if cond { Ok(()) } else { fail(ErrorKind::Internal, why()) }
}

/// Staged and zero-copy round trips of every size; an inline write is among them.
pub fn readwrite(ctx: &Arc<Context>, server: &Server) -> Result<String> {
    let mut c = Client::connect(ctx, server.addr(), EndpointConfig::new())?;
    let region = c.regions[1];
    let mut src = LocalBuffer::new(ctx, 1 << 20, Access::LOCAL)?;
    let mut dst = LocalBuffer::new(ctx, 1 << 20, Access::LOCAL)?;
    for (i, &len) in SIZES.iter().enumerate() {
        let data = pattern(len as usize, i as u64);
        c.ep.write(remote(&region, 0), &data)?;
        let back = c.ep.read(remote(&region, 0), len)?;
        ensure(back[..] == data[..], || format!("staged READ of {len} B differs from the WRITE"))?;
        let data2 = pattern(len as usize, 100 + i as u64);
        src.as_mut_slice()[..len as usize].copy_from_slice(&data2);
        c.ep.write_from(&src, 0, len, remote(&region, 4096))?;
        c.ep.read_into(&mut dst, 0, len, remote(&region, 4096))?;
        ensure(dst.as_slice()[..len as usize] == data2[..], || format!("zero-copy READ of {len} B differs"))?;
    }
    Ok(format!("{} sizes 8B..1MiB staged and zero-copy, inline writes up to {} B", SIZES.len(), c.ep.max_inline()))
}

/// Batches through post_ops/poll (selective signaling) and the core `Transport` trait.
pub fn batch(ctx: &Arc<Context>, server: &Server) -> Result<String> {
    let mut c = Client::connect(ctx, server.addr(), EndpointConfig::new().with_inflight_max(64))?;
    let region = c.regions[2];
    let n = 300u64;
    let mut ops: Vec<Op> = (0..n)
        .map(|i| Op {
            wr_id: i,
            remote: remote(&region, i * 4096),
            kind: OpKind::Write { data: Bytes::from(pattern(4096, 1000 + i)) },
        })
        .collect();
    ops.extend((0..n).map(|i| Op {
        wr_id: n + i,
        remote: remote(&region, i * 4096),
        kind: OpKind::Read { len: 4096 },
    }));
    let mut seen = HashSet::new();
    let mut done = Vec::new();
    while !ops.is_empty() || c.ep.inflight() > 0 {
        c.ep.post_ops(&mut ops)?;
        done.clear();
        c.ep.poll_completions(&mut done, 128, Duration::from_secs(5))?;
        for d in done.drain(..) {
            ensure(seen.insert(d.wr_id), || format!("wr_id {} completed twice", d.wr_id))?;
            match d.result? {
                Output::Write => ensure(d.wr_id < n, || "write completion for a read".into())?,
                Output::Read(b) => {
                    let want = pattern(4096, 1000 + d.wr_id - n);
                    ensure(b[..] == want[..], || format!("batched read {} differs", d.wr_id - n))?;
                }
                o => return fail(ErrorKind::Internal, format!("unexpected output {o:?}")),
            }
        }
    }
    ensure(seen.len() == 2 * n as usize, || format!("{} of {} completions", seen.len(), 2 * n))?;
    let t = transport_ops(c, &region)?;
    Ok(format!("{} ops in windows of 64 each completed once; {t}", 2 * n))
}

fn grant_of(r: &RemoteRegion, slab: u32) -> SlabGrant {
    let cred = Credential { lease: LeaseId(1), epoch: Epoch(1), token: Token(0), rkey: r.rkey, base_addr: r.addr };
    SlabGrant { slab: SlabId(slab), len: r.len, cred }
}

fn transport_ops(c: Client, region: &RemoteRegion) -> Result<String> {
    let mut t = RdmaTransport::new(c.ep);
    let g = grant_of(region, 2);
    t.add_grant(&g);
    let at = RemoteAddr::in_grant(&g, 1 << 20);
    let data = pattern(100_000, 7);
    t.write(at, &data)?;
    let mut back = vec![0u8; data.len()];
    t.read(at, &mut back)?;
    ensure(back == data, || "Transport::read differs from Transport::write".into())?;
    let a = RemoteAddr::in_grant(&g, 2 << 20);
    t.write(a, &5u64.to_le_bytes())?;
    let old = t.fetch_add(a, 3)?;
    let cas = t.compare_swap(a, 8, 100)?;
    ensure(old == 5 && cas == 8, || format!("fetch_add old {old} (want 5), cas old {cas} (want 8)"))?;
    let reads: Vec<WorkRequest> = (0..64)
        .map(|i| WorkRequest {
            wr_id: i,
            addr: RemoteAddr::in_grant(&g, (1 << 20) + i * 64),
            op: OpKind::Read { len: 64 },
        })
        .collect();
    let out = t.execute(reads)?;
    ensure(out.len() == 64 && out.iter().all(|c| c.result.is_ok()), || "execute of 64 reads".into())?;
    Ok("Transport read/write/fetch_add/compare_swap/execute ok".into())
}

/// 4 threads x `n` FETCH_ADDs and CAS increments on two shared counters.
pub fn atomics(ctx: &Arc<Context>, server: &Server, n: u64) -> Result<String> {
    let threads = 4u64;
    let mut setup = Client::connect(ctx, server.addr(), EndpointConfig::new())?;
    let r = setup.regions[0];
    setup.ep.write(remote(&r, 0), &[0u8; 16])?;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (ctx, addr) = (ctx.clone(), server.addr());
            thread::spawn(move || -> Result<(Vec<u64>, u64)> {
                let mut c = Client::connect(&ctx, addr, EndpointConfig::new())?;
                let (mut olds, mut retries) = (Vec::with_capacity(n as usize), 0);
                for _ in 0..n {
                    olds.push(c.ep.fetch_add(remote(&r, 0), 1)?);
                    let mut cur = c.ep.compare_swap(remote(&r, 8), 0, 0)?;
                    loop {
                        let seen = c.ep.compare_swap(remote(&r, 8), cur, cur + 1)?;
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
    let (mut olds, mut retries) = (Vec::new(), 0);
    for h in handles {
        let (o, r) = h.join().map_err(|_| farpool_core::Error::new(ErrorKind::Internal, "thread panicked"))??;
        olds.extend(o);
        retries += r;
    }
    let faa = u64::from_le_bytes(setup.ep.read(remote(&r, 0), 8)?[..].try_into().unwrap_or_default());
    let cas = setup.ep.compare_swap(remote(&r, 8), 0, 0)?;
    olds.sort_unstable();
    let total = threads * n;
    ensure(faa == total && cas == total, || format!("FETCH_ADD counter {faa}, CAS counter {cas}, want {total}"))?;
    ensure(olds.iter().copied().eq(0..total), || "FETCH_ADD old values are not exactly 0..N".into())?;
    Ok(format!(
        "{threads} threads x {n}: FETCH_ADD sum {faa}, CAS sum {cas} ({retries} CAS retries), old values distinct"
    ))
}

fn expect_kind<T: std::fmt::Debug>(r: Result<T>, want: ErrorKind, what: &str) -> Result<String> {
    match r {
        Err(e) if e.kind() == want => Ok(e.to_string()),
        Err(e) => fail(ErrorKind::Internal, format!("{what}: want {want}, got {e}")),
        Ok(v) => fail(ErrorKind::Internal, format!("{what}: want {want}, succeeded with {v:?}")),
    }
}

/// Deregistering a slab's MR kills its rkey at the NIC; the endpoint recovers by reconnecting.
pub fn revoke(ctx: &Arc<Context>, server: &Server) -> Result<String> {
    let mut c = Client::connect(ctx, server.addr(), EndpointConfig::new())?;
    let (old, good) = (c.regions[3], c.regions[1]);
    c.ep.write(remote(&old, 0), b"before revoke")?;
    ensure(&c.ep.read(remote(&old, 0), 13)?[..] == b"before revoke", || "read before revoke".into())?;
    server.revoke(3);
    let revoked = expect_kind(c.ep.read(remote(&old, 0), 64), ErrorKind::Revoked, "READ with a deregistered rkey")?;
    ensure(matches!(c.ep.state(), EndpointState::Broken(_)), || "endpoint not broken after the error".into())?;
    expect_kind(c.ep.read(remote(&good, 0), 8), ErrorKind::Closed, "READ on a broken endpoint")?;
    c.reconnect()?;
    c.ep.read(remote(&good, 0), 64)?;
    let new = server.regrant(3)?;
    ensure(new.rkey != old.rkey, || format!("regranted slab kept rkey {:#x}", old.rkey))?;
    c.ep.write(remote(&new, 0), b"after regrant")?;
    // Flush semantics: a failing op followed by good ones; every wr_id completes exactly once.
    let mut ops = vec![Op { wr_id: 1, remote: remote(&old, 0), kind: OpKind::Read { len: 64 } }];
    ops.extend((2..6).map(|i| Op { wr_id: i, remote: remote(&good, 0), kind: OpKind::Read { len: 64 } }));
    c.ep.post_ops(&mut ops)?;
    let mut done = Vec::new();
    while c.ep.inflight() > 0 {
        if c.ep.poll_completions(&mut done, 16, Duration::from_secs(5))? == 0 {
            return fail(ErrorKind::Timeout, format!("only {} of 5 completions", done.len()));
        }
    }
    let ids: HashSet<u64> = done.iter().map(|d| d.wr_id).collect();
    ensure(done.len() == 5 && ids.len() == 5, || format!("{} completions for 5 ops", done.len()))?;
    let kinds: Vec<String> =
        done.iter().map(|d| d.result.as_ref().map_or_else(|e| e.kind().to_string(), |_| "ok".into())).collect();
    let first = done.iter().find(|d| d.wr_id == 1).map(|d| d.result.as_ref().map_err(|e| e.kind()));
    ensure(matches!(first, Some(Err(ErrorKind::Revoked))), || format!("batch with revoked rkey: {kinds:?}"))?;
    // The Transport reconnects by itself when given the control connection.
    c.reconnect()?;
    let x = c.exchanger()?;
    let mut t = RdmaTransport::new(c.ep).with_exchange(Box::new(x));
    let g_old = grant_of(&old, 3);
    let mut b = [0u8; 16];
    expect_kind(t.read(RemoteAddr::in_grant(&g_old, 0), &mut b), ErrorKind::Revoked, "Transport read, old rkey")?;
    t.read(RemoteAddr::in_grant(&grant_of(&new, 3), 0), &mut b)?;
    ensure(&b[..13] == b"after regrant", || "read through the new grant after auto-reconnect".into())?;
    Ok(format!("old rkey -> {revoked}; batch after it: {kinds:?}; reconnect + regrant ok"))
}

/// Out-of-range READs: refused by the NIC (queue pair dies, server unaffected) or, when the grant's
/// length is known, by the transport before posting.
pub fn out_of_range(ctx: &Arc<Context>, server: &Server) -> Result<String> {
    let mut bystander = Client::connect(ctx, server.addr(), EndpointConfig::new())?;
    let mut c = Client::connect(ctx, server.addr(), EndpointConfig::new())?;
    let r = c.regions[1];
    let across_end = Remote { addr: r.addr + r.len - 8, rkey: r.rkey };
    let nic = c.ep.read(across_end, 64).err().map(|e| (e.kind(), e.to_string()));
    let Some((kind, msg)) = nic else { return fail(ErrorKind::Internal, "READ across the end of the MR succeeded") };
    ensure(msg.contains("remote access error"), || format!("READ across the MR end: {msg}"))?;
    bystander.ep.read(remote(&r, 0), 64)?;
    bystander.ep.fetch_add(remote(&bystander.regions[0], 64), 1)?;
    c.reconnect()?;
    c.ep.read(remote(&r, 0), 64)?;
    let beyond_pool = Remote { addr: r.addr + (server.pool_len() as u64) * 4, rkey: r.rkey };
    ensure(c.ep.read(beyond_pool, 8).is_err(), || "READ beyond the pool succeeded".into())?;
    bystander.ep.read(remote(&r, 0), 64)?;
    c.reconnect()?;
    let g = grant_of(&r, 1);
    let mut t = RdmaTransport::new(c.ep);
    t.add_grant(&g);
    let mut buf = [0u8; 64];
    let sw = expect_kind(t.read(RemoteAddr::in_grant(&g, r.len - 8), &mut buf), ErrorKind::OutOfRange, "checked READ")?;
    ensure(*t.endpoint().state() == EndpointState::Ready, || "a refused op broke the endpoint".into())?;
    t.read(RemoteAddr::in_grant(&g, 0), &mut buf)?;
    Ok(format!("NIC refused the READ across the MR end ({kind}), server kept serving; with the grant known: {sw}"))
}

/// The server's queue pair disappears: the client's next operation fails with `Unreachable` once the
/// transport retries are exhausted, without hanging.
pub fn peer_gone(ctx: &Arc<Context>, server: &Server) -> Result<String> {
    let cfg = EndpointConfig::new().with_timeout_exp(12).with_retry_cnt(3);
    let mut c = Client::connect(ctx, server.addr(), cfg)?;
    let r = c.regions[1];
    c.ep.read(remote(&r, 0), 64)?;
    server.drop_endpoints();
    let t0 = std::time::Instant::now();
    let e = expect_kind(c.ep.read(remote(&r, 0), 64), ErrorKind::Unreachable, "READ after the server QP vanished")?;
    Ok(format!("{e} after {:.2}s", t0.elapsed().as_secs_f64()))
}
