//! [`Endpoint`]: one RC queue pair with its completion queue, its registered staging buffer and the
//! bookkeeping that turns verbs completions into one completion per operation.
//!
//! State and who touches it (one endpoint per thread; every method takes `&mut self`):
//! - `records`: operations posted to the send queue, in posting order (= completion order on an RC send
//!   queue). A record leaves only when a completion at or after it was polled, or after the queue pair
//!   was destroyed; it holds its staging span and, for zero-copy ops, an `Arc` of the target
//!   registration, so no memory the NIC may still touch is freed or reused.
//! - `staging`: the registered staging buffer and its ring (`lend.rs`). A span is taken at posting and
//!   given back when the record leaves, except the span of a staged READ of at least `lend_min_bytes`,
//!   which is lent to the caller as the completion's `Bytes` (zero copy) and returns when those are
//!   dropped. Every span of a record in `records` belongs to the current `staging` (it is replaced
//!   only while `records` is empty).
//! - `retired`: earlier staging buffers still holding lent spans, at most [`RETIRED_STAGING_MAX`]. A
//!   caller that keeps lent `Bytes` can block the ring (its tail cannot pass a span still lent); when an
//!   allocation fails with nothing in flight, the endpoint retires the buffer and registers a fresh one.
//!   While `RETIRED_STAGING_MAX` are retired it copies instead of lending, so the current buffer cannot
//!   block: progress never depends on the caller dropping data.
//! - staging bytes: written by the CPU only for a span not yet posted, read only for a span whose record
//!   has completed (or through a `Lent`); the NIC touches a span only while its record is in flight.
//! - `ready`: completions produced but not yet handed to the caller (including operations refused at
//!   posting time: every accepted operation completes exactly once).
//! - `scratch`: a small registered buffer used only by the depth-1 path of the blocking calls
//!   (`alone.rs`), which runs only while `records` is empty and keeps its one operation out of
//!   `records` unless it hands it over to the general path (then as a `Local::Scratch` record, which
//!   keeps `records` non-empty, so the buffer has one user at a time).
//!
//! Selective signaling: only every `signal_every`-th work request and the last of each batch ask for a
//! completion; an RC send queue completes in order, so one successful completion covers every earlier
//! record. Errors always produce a completion, and after the first one the queue pair is in the error
//! state: the rest are flushed (`Cancelled`), and the endpoint refuses new work until [`Endpoint::reconnect`].

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use farpool_core::{Error, ErrorKind, OpKind, Result};
use sideway::ibverbs::completion::GenericCompletionQueue;

use crate::device::Context;
use crate::error::OpClass;
use crate::lend::Staging;
use crate::mr::{Access, LocalBuffer, Registration};
use crate::qp::{Qp, QpParams, create_cq};
use crate::qp_info::QpInfo;
use crate::staging::{SPAN_ALIGN, Span};

/// Where an operation goes on the peer: a virtual address inside a registered region, and its rkey.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Remote {
    /// Remote virtual address of the first byte.
    pub addr: u64,
    /// Remote key of the region.
    pub rkey: u32,
}

/// One staged operation for [`Endpoint::post_ops`]: reads land in the endpoint's staging buffer and are
/// returned as `Bytes`; writes are sent inline or copied to staging first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// Caller's id, returned in the completion.
    pub wr_id: u64,
    /// Target.
    pub remote: Remote,
    /// What to do.
    pub kind: OpKind,
}

/// What a successful operation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Bytes read into staging: the staging span itself (lent, zero copy) for reads of at least
    /// `lend_min_bytes`, else a copy.
    Read(Bytes),
    /// A zero-copy read: the bytes are in the caller's registered memory.
    Placed,
    /// A write completed (the data is at the peer).
    Write,
    /// Old value of an atomic.
    Atomic(u64),
}

/// The outcome of one operation.
#[derive(Debug)]
pub struct RdmaCompletion {
    /// The caller's id.
    pub wr_id: u64,
    /// Result.
    pub result: Result<Output>,
}

/// Exchanges queue pair information with the peer over the control plane (TCP): sends `local`,
/// returns the peer's. Used by [`Endpoint::reconnect`]; any `FnMut(&QpInfo) -> Result<QpInfo>` is one.
pub trait QpExchange: Send {
    /// Send ours, receive theirs.
    fn exchange(&mut self, local: &QpInfo) -> Result<QpInfo>;
}

impl<F: FnMut(&QpInfo) -> Result<QpInfo> + Send> QpExchange for F {
    fn exchange(&mut self, local: &QpInfo) -> Result<QpInfo> {
        self(local)
    }
}

/// Endpoint configuration. `EndpointConfig::new()` gives the defaults below; `Endpoint::new` validates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointConfig {
    pub(crate) inflight_max: usize,
    pub(crate) staging_bytes: usize,
    pub(crate) max_inline: u32,
    pub(crate) signal_every: usize,
    pub(crate) rd_atomic: u8,
    pub(crate) timeout_exp: u8,
    pub(crate) retry_cnt: u8,
    pub(crate) rnr_retry: u8,
    pub(crate) op_timeout: Duration,
    pub(crate) spin_polls: u32,
    pub(crate) extended_verbs: bool,
    pub(crate) lend_min_bytes: usize,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl EndpointConfig {
    /// The defaults of every setter.
    pub fn new() -> Self {
        Self {
            inflight_max: 256,
            staging_bytes: 4 << 20,
            max_inline: 64,
            signal_every: 16,
            rd_atomic: 16,
            timeout_exp: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            op_timeout: Duration::from_secs(5),
            spin_polls: 2048,
            extended_verbs: true,
            lend_min_bytes: 1024,
        }
    }

    /// For the passive (memory server) side of a connection: it never posts, so a small send queue and
    /// the minimum staging buffer.
    pub fn passive() -> Self {
        Self { inflight_max: 16, staging_bytes: 4096, ..Self::new() }
    }

    /// Operations in flight at most (send queue depth). Default 256, capped by the device's `max_qp_wr`.
    #[must_use]
    pub fn with_inflight_max(mut self, n: usize) -> Self {
        self.inflight_max = n;
        self
    }

    /// Registered staging buffer for staged reads, atomics and non-inline writes. Default 4 MiB; the
    /// largest staged operation is this size (a multiple of 64, at least 4096).
    #[must_use]
    pub fn with_staging_bytes(mut self, n: usize) -> Self {
        self.staging_bytes = n;
        self
    }

    /// Writes up to this many bytes are sent inline (no staging copy, no DMA read of the payload).
    /// Default 64; the provider may grant less (see [`Endpoint::max_inline`]).
    #[must_use]
    pub fn with_max_inline(mut self, n: u32) -> Self {
        self.max_inline = n;
        self
    }

    /// Ask for a completion every this many work requests (and always for the last of a batch). Default 16.
    #[must_use]
    pub fn with_signal_every(mut self, n: usize) -> Self {
        self.signal_every = n;
        self
    }

    /// Outstanding READ/atomic operations per queue pair, as initiator and responder. Default 16,
    /// capped by the device; both sides of a connection should use the same value.
    #[must_use]
    pub fn with_rd_atomic(mut self, n: u8) -> Self {
        self.rd_atomic = n;
        self
    }

    /// Local ACK timeout exponent: 4.096 us * 2^n per try (IBTA 9.7.6.1.3). Default 14 (67 ms).
    #[must_use]
    pub fn with_timeout_exp(mut self, n: u8) -> Self {
        self.timeout_exp = n;
        self
    }

    /// Transport retries before `Unreachable` (0..=7). Default 7.
    #[must_use]
    pub fn with_retry_cnt(mut self, n: u8) -> Self {
        self.retry_cnt = n;
        self
    }

    /// An operation still in flight after this long fails with `Timeout` (the queue pair is moved to the
    /// error state to flush it). Default 5 s.
    #[must_use]
    pub fn with_op_timeout(mut self, t: Duration) -> Self {
        self.op_timeout = t;
        self
    }

    /// Empty completion-queue polls a waiting call spins through before it starts yielding the CPU
    /// between polls. Default 2048 (a few hundred microseconds). Software RDMA (rxe) does its work in
    /// kernel threads that may need this very CPU, so spinning forever can delay the completion it waits
    /// for; 0 yields after every empty poll.
    #[must_use]
    pub fn with_spin_polls(mut self, n: u32) -> Self {
        self.spin_polls = n;
        self
    }

    /// Use the extended verbs API (`ibv_wr_*` posting, `ibv_start_poll` polling) when the provider has
    /// it, else the legacy `ibv_post_send` / `ibv_poll_cq`. Default true; false forces the legacy API.
    #[must_use]
    pub fn with_extended_verbs(mut self, on: bool) -> Self {
        self.extended_verbs = on;
        self
    }

    /// Staged READs of at least this many bytes complete with the staging span itself as their `Bytes`
    /// (zero copy; the span returns to the staging ring when those `Bytes` are dropped); smaller ones
    /// are copied out (for a few bytes a copy costs less than the shared bookkeeping). Default 1024;
    /// `usize::MAX` always copies.
    #[must_use]
    pub fn with_lend_min_bytes(mut self, n: usize) -> Self {
        self.lend_min_bytes = n;
        self
    }

    fn validate(&self, ctx: &Context) -> Result<(EndpointConfig, QpParams)> {
        let bad = |what: String| Err(Error::new(ErrorKind::Config, format!("endpoint config: {what}")));
        let lim = ctx.limits();
        let mut c = self.clone();
        if c.inflight_max == 0 || c.inflight_max > lim.max_qp_wr as usize {
            return bad(format!("inflight_max {} outside 1..={}", c.inflight_max, lim.max_qp_wr));
        }
        if c.staging_bytes < 4096 || !c.staging_bytes.is_multiple_of(SPAN_ALIGN) {
            return bad(format!("staging_bytes {} must be >= 4096 and a multiple of {SPAN_ALIGN}", c.staging_bytes));
        }
        if c.signal_every == 0 || c.retry_cnt > 7 || c.rnr_retry > 7 || c.timeout_exp > 31 || c.rd_atomic == 0 {
            return bad(format!("signal_every, retry_cnt, rnr_retry, timeout_exp or rd_atomic out of range: {c:?}"));
        }
        c.rd_atomic = c.rd_atomic.min(lim.max_qp_rd_atom).min(lim.max_qp_init_rd_atom);
        let p = QpParams {
            max_send_wr: c.inflight_max as u32,
            max_inline: c.max_inline,
            rd_atomic: c.rd_atomic,
            timeout_exp: c.timeout_exp,
            retry_cnt: c.retry_cnt,
            rnr_retry: c.rnr_retry,
            extended: c.extended_verbs,
        };
        Ok((c, p))
    }
}

/// Lifecycle of an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointState {
    /// Created (queue pair in INIT): hand [`Endpoint::local_info`] to the peer, then `connect`.
    Unconnected,
    /// Connected: operations can be posted.
    Ready,
    /// The queue pair hit an error (the cause); only `reconnect` helps.
    Broken(String),
}

/// Local side of an operation's data.
#[derive(Debug)]
pub(crate) enum Local {
    /// Nothing (zero-length operation: completes at once).
    Empty,
    /// A span of the staging buffer.
    Staged(Span),
    /// Sent inline from the caller's data.
    Inline,
    /// Caller's registered memory (zero-copy).
    Direct { reg: Arc<Registration>, offset: usize },
    /// The endpoint's scratch buffer (depth-1 operations only: nothing else is in flight meanwhile).
    Scratch,
}

/// The remote operation of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Cas { expect: u64, new: u64 },
    Faa { add: u64 },
}

impl Kind {
    pub(crate) fn class(self) -> OpClass {
        match self {
            Kind::Read => OpClass::Read,
            Kind::Write => OpClass::Write,
            Kind::Cas { .. } | Kind::Faa { .. } => OpClass::Atomic,
        }
    }
}

/// One posted operation.
#[derive(Debug)]
pub(crate) struct Record {
    pub seq: u64,
    pub wr_id: u64,
    pub kind: Kind,
    pub remote: Remote,
    pub len: u32,
    pub local: Local,
    /// Index of the caller's op (inline data source) within the current `post` call.
    pub src: usize,
    /// Flushed because it stayed at the head of the queue longer than `op_timeout`.
    pub overdue: bool,
    /// A blocking helper's own operation: its completion goes to `sync_done`.
    pub sync: bool,
    /// Never reached the NIC (posting failed): completes with this error when it reaches the front.
    pub failed: Option<Error>,
}

/// An RC connection to one peer. See the module docs for the state rules.
///
/// ```no_run
/// # fn demo(send: impl Fn(&[u8]) -> Vec<u8>) -> farpool_core::Result<()> {
/// use farpool_rdma::{Context, DeviceSelector, Endpoint, EndpointConfig, QpInfo, Remote};
///
/// let ctx = Context::open(&DeviceSelector::new())?;
/// let mut ep = Endpoint::new(&ctx, EndpointConfig::new())?;
/// // The control plane carries our QpInfo to the server and brings back its own.
/// let theirs = QpInfo::from_bytes(&send(&ep.local_info()?.to_bytes()))?;
/// ep.connect(&theirs)?;
/// let slab = Remote { addr: 0x7f00_0000_0000, rkey: 0x1234 }; // from the grant's credential
/// ep.write(slab, b"hello")?;
/// assert_eq!(&ep.read(slab, 5)?[..], b"hello");
/// let old = ep.fetch_add(Remote { addr: slab.addr + 64, ..slab }, 1)?;
/// # let _ = old; Ok(()) }
/// ```
pub struct Endpoint {
    // Field order is drop order: the queue pair is destroyed before anything it may still DMA into.
    pub(crate) qp: Option<Qp>,
    pub(crate) cq: GenericCompletionQueue,
    pub(crate) records: VecDeque<Record>,
    pub(crate) ready: VecDeque<RdmaCompletion>,
    pub(crate) sync_done: Option<RdmaCompletion>,
    pub(crate) staging: Arc<Staging>,
    /// The depth-1 path's buffer (`alone.rs`): small staged operations use it without touching the
    /// staging ring. Only one operation uses it at a time: the depth-1 path runs only when nothing else
    /// is in flight, and an operation that leaves it for the general path keeps `records` non-empty.
    pub(crate) scratch: LocalBuffer,
    pub(crate) retired: Vec<Arc<Staging>>,
    pub(crate) next_seq: u64,
    pub(crate) since_signal: usize,
    pub(crate) state: EndpointState,
    pub(crate) remote: Option<QpInfo>,
    pub(crate) params: QpParams,
    pub(crate) cfg: EndpointConfig,
    pub(crate) ctx: Arc<Context>,
    pub(crate) cqes: Vec<(u64, u32, u32)>,
    /// `op_timeout` watch: the record at the head of the queue and since when it has been seen there.
    pub(crate) watch: Option<(u64, Instant)>,
    /// Empty CQ polls since the last completion (the watch is checked every `WATCH_EVERY` of them).
    pub(crate) empty_polls: u32,
}

/// Size of an endpoint's scratch buffer (see `alone.rs`): covers atomics, small writes and reads up to
/// a 16 KiB page copied into the caller's buffer.
pub const SCRATCH_BYTES: usize = 16 << 10;

/// Empty polls between two looks at the clock for `op_timeout`: a clock read per poll would slow the
/// busy loop (and under emulation it is not cheap).
pub(crate) const WATCH_EVERY: u32 = 256;

/// Retired staging buffers (blocked by lent spans, see the module docs) kept at most; while this many
/// are still lent from, READs are copied out instead of lent. Bounds the registered memory of one
/// endpoint to `(1 + RETIRED_STAGING_MAX) * staging_bytes`.
pub const RETIRED_STAGING_MAX: usize = 2;

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("device", &self.ctx.name())
            .field("qp", &self.qp)
            .field("state", &self.state)
            .field("inflight", &self.records.len())
            .field("remote", &self.remote)
            .finish()
    }
}

impl Endpoint {
    /// Create the queue pair (in INIT) with its completion queue and staging buffer.
    pub fn new(ctx: &Arc<Context>, cfg: EndpointConfig) -> Result<Endpoint> {
        let (cfg, params) = cfg.validate(ctx)?;
        // Every work request may come back with an error or flush completion: one CQ entry each.
        let depth = (cfg.inflight_max as u32 + 1).min(ctx.limits().max_cqe);
        let (cq, _extended) = create_cq(ctx, depth, params.extended)?;
        let qp = Qp::create(ctx, &cq, &params)?;
        let staging = Staging::new(ctx, cfg.staging_bytes)?;
        let scratch = LocalBuffer::new(ctx, SCRATCH_BYTES, Access::LOCAL)?;
        tracing::debug!(qp = ?qp, inline = qp.max_inline, "RDMA endpoint created");
        Ok(Endpoint {
            qp: Some(qp),
            cq,
            records: VecDeque::with_capacity(cfg.inflight_max),
            ready: VecDeque::new(),
            sync_done: None,
            staging,
            scratch,
            retired: Vec::new(),
            next_seq: 1,
            since_signal: 0,
            state: EndpointState::Unconnected,
            remote: None,
            params,
            ctx: ctx.clone(),
            cqes: Vec::with_capacity(64),
            watch: None,
            empty_polls: 0,
            cfg,
        })
    }

    /// What the peer needs to connect to us (send it over the control plane).
    pub fn local_info(&self) -> Result<QpInfo> {
        match &self.qp {
            Some(qp) => Ok(qp.info(&self.ctx)),
            None => Err(Error::new(ErrorKind::Closed, "endpoint has no queue pair (reconnect it)")),
        }
    }

    /// Connect to the peer's queue pair (INIT -> RTR -> RTS).
    pub fn connect(&mut self, remote: &QpInfo) -> Result<()> {
        match &self.state {
            EndpointState::Unconnected => {}
            EndpointState::Ready => return Err(Error::new(ErrorKind::Config, "endpoint already connected")),
            EndpointState::Broken(c) => {
                return Err(Error::new(ErrorKind::Closed, format!("endpoint broken ({c}): use reconnect")));
            }
        }
        let qp = self.qp.as_mut().ok_or_else(|| Error::new(ErrorKind::Closed, "endpoint has no queue pair"))?;
        qp.connect(&self.ctx, &self.params, remote)?;
        tracing::debug!(local = %qp.info(&self.ctx), remote = %remote, "RDMA endpoint connected");
        self.remote = Some(*remote);
        self.state = EndpointState::Ready;
        Ok(())
    }

    /// Tear the queue pair down (in-flight operations complete as `Cancelled`, or `Timeout` when
    /// overdue), create a new one, swap `QpInfo` with the peer through `exchange`, and connect.
    /// On failure the endpoint stays `Broken`, so it can be retried.
    pub fn reconnect(&mut self, exchange: &mut dyn QpExchange) -> Result<()> {
        self.teardown();
        let qp = Qp::create(&self.ctx, &self.cq, &self.params)?;
        let local = qp.info(&self.ctx);
        self.qp = Some(qp);
        self.state = EndpointState::Unconnected;
        let result = exchange.exchange(&local).and_then(|remote| self.connect(&remote));
        if let Err(e) = &result {
            self.state = EndpointState::Broken(format!("reconnect failed: {e}"));
        }
        result
    }

    /// Move the queue pair to the error state, collect the flushes (bounded), destroy it, and complete
    /// whatever is left. Afterwards nothing can DMA into staging or caller memory.
    pub(crate) fn teardown(&mut self) {
        if let Some(qp) = self.qp.as_mut()
            && let Err(e) = qp.enter_error()
        {
            tracing::debug!(error = %e, "QP -> ERR during teardown");
        }
        if !matches!(self.state, EndpointState::Broken(_)) {
            self.state = EndpointState::Broken("torn down".into());
        }
        // Flush completions normally follow within microseconds; 1 s bounds a wedged device.
        let deadline = Instant::now() + Duration::from_secs(1);
        while !self.records.is_empty() && Instant::now() < deadline {
            if self.reap().is_err() {
                break;
            }
        }
        self.qp = None; // ibv_destroy_qp: the NIC stops touching our memory for it
        while let Some(mut rec) = self.records.pop_front() {
            let err = rec.failed.take().unwrap_or_else(|| {
                let kind = if rec.overdue { ErrorKind::Timeout } else { ErrorKind::Cancelled };
                Error::new(kind, format!("RDMA op {} dropped when its queue pair was destroyed", rec.wr_id))
            });
            if let Local::Staged(span) = rec.local {
                self.staging.free(span); // the queue pair is gone: the NIC no longer writes it
            }
            self.deliver(rec, Err(err));
        }
        self.since_signal = 0;
        self.watch = None;
        self.empty_polls = 0;
    }

    /// Lifecycle state.
    #[inline]
    pub fn state(&self) -> &EndpointState {
        &self.state
    }

    /// The device context.
    #[inline]
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The peer's queue pair, once connected.
    pub fn remote_info(&self) -> Option<&QpInfo> {
        self.remote.as_ref()
    }

    /// Operations accepted and not yet handed back by `poll_completions`.
    pub fn inflight(&self) -> usize {
        self.records.len() + self.ready.len()
    }

    /// Bound on operations in flight on the queue pair.
    pub fn inflight_max(&self) -> usize {
        self.cfg.inflight_max
    }

    /// Largest write sent inline, as granted by the provider.
    pub fn max_inline(&self) -> u32 {
        self.qp.as_ref().map_or(0, |q| q.max_inline)
    }

    /// Largest staged operation (the staging buffer size).
    pub fn max_staged(&self) -> usize {
        self.staging.capacity()
    }

    /// Configured operation timeout.
    pub fn op_timeout(&self) -> Duration {
        self.cfg.op_timeout
    }

    /// Move up to `max` completions into `out`, busy-polling up to `timeout` for the first one (the
    /// clock starts at the 64th empty poll, so a ready completion costs no clock read).
    /// Returns how many were added (0 on timeout or when nothing is in flight).
    pub fn poll_completions(&mut self, out: &mut Vec<RdmaCompletion>, max: usize, timeout: Duration) -> Result<usize> {
        let mut deadline: Option<Option<Instant>> = None;
        let mut spins = 0u32;
        loop {
            if self.ready.is_empty() {
                self.reap()?;
            }
            if !self.ready.is_empty() || max == 0 {
                let n = max.min(self.ready.len());
                out.extend(self.ready.drain(..n));
                return Ok(n);
            }
            if self.records.is_empty() || timeout.is_zero() {
                return Ok(0);
            }
            // The first clock read comes after 64 empty polls, not before the first: a completion that
            // is already there (the common case at depth 1) costs no clock read at all.
            if spins > 0 && spins.is_multiple_of(64) {
                let now = Instant::now();
                if deadline.get_or_insert_with(|| now.checked_add(timeout)).is_some_and(|d| now >= d) {
                    return Ok(0);
                }
            }
            spins = spins.wrapping_add(1);
            self.backoff(spins);
        }
    }

    /// One look at the clock: fail the head of the queue if it has been there for `op_timeout`.
    pub(crate) fn check_overdue(&mut self) {
        let Some(seq) = self.records.front().map(|r| r.seq) else {
            self.watch = None;
            return;
        };
        let now = Instant::now();
        match self.watch {
            Some((s, since)) if s == seq => {
                if now.duration_since(since) >= self.cfg.op_timeout && !self.records[0].overdue {
                    self.records[0].overdue = true;
                    let limit = self.cfg.op_timeout;
                    self.mark_broken(format!("operation {seq} was in flight longer than {limit:?}"));
                }
            }
            _ => self.watch = Some((seq, now)),
        }
    }

    /// Between two empty polls of a waiting call: poll again at once (the NIC answers in microseconds),
    /// then yield the CPU (to other threads, and to kernel work a software RDMA device needs on this
    /// CPU). No `spin_loop` hint: polling the CQ is itself the pause, and under qemu TCG the x86 `pause`
    /// instruction leaves the translated-code loop, which made each poll several times slower.
    pub(crate) fn backoff(&self, spins: u32) {
        if spins >= self.cfg.spin_polls {
            std::thread::yield_now();
        }
    }

    pub(crate) fn deliver(&mut self, rec: Record, result: Result<Output>) {
        let c = RdmaCompletion { wr_id: rec.wr_id, result };
        if rec.sync {
            self.sync_done = Some(c);
        } else {
            self.ready.push_back(c);
        }
    }

    pub(crate) fn ensure_ready(&self) -> Result<()> {
        match &self.state {
            EndpointState::Ready => Ok(()),
            EndpointState::Unconnected => Err(Error::new(ErrorKind::Config, "endpoint not connected yet")),
            EndpointState::Broken(c) => Err(Error::new(
                ErrorKind::Closed,
                format!("queue pair is in the error state ({c}); reconnect the endpoint"),
            )),
        }
    }
}
