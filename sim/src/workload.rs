//! The random workload one thread runs against the tier, checking every result against the model.
//!
//! Each thread draws its ops from its own generator (seeded from the run's seed and its index): single
//! gets, `get_many` batches, short sequential scans (which feed the tier's scan detector), puts and
//! `put_many` of its own pages (versions only grow), invalidations of its own pages and prefetch hints.
//! Page choice is skewed (a hot quarter), so the tier evicts, admits and rejects. Before each op the
//! thread applies the cluster events due by the op's index (see [`crate::schedule`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use farpool::tier::{Lookup, MissReason, PageTier, PutStatus};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::cluster::SimCluster;
use crate::model::{Model, Owned, Violation, content};
use crate::schedule::Schedule;

/// What the workload saw, to compare with the tier's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Pages looked up (each page of a `get_many` once).
    pub gets: u64,
    /// Hits.
    pub hits: u64,
    /// Misses by reason, in [`MissReason::ALL`] order.
    pub misses: [u64; 5],
    /// Puts.
    pub puts: u64,
    /// Puts answered `Queued`.
    pub queued: u64,
    /// Puts answered `Unchanged`.
    pub unchanged: u64,
    /// Puts answered `Rejected`.
    pub rejected: u64,
    /// Puts answered `Dropped`.
    pub dropped: u64,
    /// Invalidations that removed a page.
    pub invalidated: u64,
}

impl Tally {
    pub(crate) fn merge(&mut self, o: &Tally) {
        self.gets += o.gets;
        self.hits += o.hits;
        self.misses.iter_mut().zip(o.misses).for_each(|(a, b)| *a += b);
        self.puts += o.puts;
        self.queued += o.queued;
        self.unchanged += o.unchanged;
        self.rejected += o.rejected;
        self.dropped += o.dropped;
        self.invalidated += o.invalidated;
    }

    fn put(&mut self, s: PutStatus) {
        self.puts += 1;
        match s {
            PutStatus::Queued => self.queued += 1,
            PutStatus::Unchanged => self.unchanged += 1,
            PutStatus::Rejected => self.rejected += 1,
            PutStatus::Dropped => self.dropped += 1,
        }
    }
}

/// Index of a miss reason in [`Tally::misses`].
pub fn reason_index(r: MissReason) -> usize {
    MissReason::ALL.iter().position(|&x| x == r).expect("listed")
}

/// What every worker shares.
#[derive(Debug)]
pub(crate) struct Ctx<'a> {
    pub(crate) tier: &'a PageTier,
    pub(crate) model: &'a Model,
    pub(crate) schedule: &'a Schedule,
    pub(crate) cluster: &'a SimCluster,
    pub(crate) stop: &'a AtomicBool,
    pub(crate) next_op: &'a AtomicU64,
    pub(crate) ops: u64,
}

/// A violation and where it happened.
#[derive(Debug)]
pub(crate) struct OpFailure {
    pub(crate) op: u64,
    pub(crate) thread: usize,
    pub(crate) violation: Violation,
}

/// One workload thread.
#[derive(Debug)]
pub(crate) struct Worker {
    thread: usize,
    rng: SmallRng,
    own: Vec<u64>,
    pub(crate) owned: HashMap<u64, Owned>,
    pub(crate) tally: Tally,
    buf: Vec<u8>,
}

impl Worker {
    pub(crate) fn new(thread: usize, seed: u64, model: &Model, page_size: usize, threads: usize) -> Self {
        let own = (thread as u64..model.pages()).step_by(threads.max(1)).collect();
        let rng = SmallRng::seed_from_u64(seed);
        Self { thread, rng, own, owned: HashMap::new(), tally: Tally::default(), buf: vec![0; page_size * 8] }
    }

    /// Run ops until the shared budget is spent or another thread failed.
    pub(crate) fn run(&mut self, ctx: &Ctx<'_>) -> Result<(), OpFailure> {
        loop {
            let op = ctx.next_op.fetch_add(1, Ordering::AcqRel);
            if op >= ctx.ops || ctx.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            ctx.schedule.advance(op, ctx.cluster);
            if let Err(violation) = self.step(ctx) {
                ctx.stop.store(true, Ordering::Release);
                return Err(OpFailure { op, thread: self.thread, violation });
            }
        }
    }

    /// A skewed pick: half of the pages get most of the traffic (more than the tier holds).
    fn skewed(&mut self, n: u64) -> u64 {
        let hot = (n / 2).max(1);
        if self.rng.random_bool(0.7) { self.rng.random_range(0..hot) } else { self.rng.random_range(0..n) }
    }

    fn own_page(&mut self) -> u64 {
        let i = self.skewed(self.own.len() as u64);
        self.own[i as usize]
    }

    fn any_page(&mut self, model: &Model) -> u64 {
        self.skewed(model.pages())
    }

    fn owned_of(&mut self, model: &Model, page: u64) -> Option<Owned> {
        (model.owner(page) == self.thread).then(|| *self.owned.entry(page).or_default())
    }

    /// A minimum version to ask for: usually satisfiable, sometimes newer than anything held.
    fn min_for(&mut self, model: &Model, page: u64) -> u64 {
        match self.owned_of(model, page) {
            Some(o) => match self.rng.random_range(0..4) {
                0 => 0,
                1 => o.current.unwrap_or(o.last),
                2 => o.last,
                _ => o.last + 1,
            },
            None => self.rng.random_range(0..=model.newest(page) + 1),
        }
    }

    fn step(&mut self, ctx: &Ctx<'_>) -> Result<(), Violation> {
        match self.rng.random_range(0..100) {
            0..30 => {
                let page = self.any_page(ctx.model);
                self.get(ctx, &[page])
            }
            30..42 => {
                let n = self.rng.random_range(2..=8);
                let pages: Vec<u64> = (0..n).map(|_| self.any_page(ctx.model)).collect();
                self.get(ctx, &pages)
            }
            42..48 => {
                let start = self.rng.random_range(0..ctx.model.pages().saturating_sub(8).max(1));
                (start..(start + 6).min(ctx.model.pages())).try_for_each(|p| self.get(ctx, &[p]))
            }
            48..80 => {
                let page = self.own_page();
                self.put(ctx, &[page])
            }
            80..86 => {
                let n = self.rng.random_range(2..=4);
                let mut pages: Vec<u64> = (0..n).map(|_| self.own_page()).collect();
                pages.sort_unstable();
                pages.dedup();
                self.put(ctx, &pages)
            }
            86..95 => {
                let page = self.own_page();
                let removed = ctx.tier.invalidate(page);
                self.tally.invalidated += u64::from(removed);
                let o = self.owned.entry(page).or_default();
                ctx.model.after_invalidate(page, removed, o)
            }
            _ => {
                let n = self.rng.random_range(1..=8);
                let pages: Vec<u64> = (0..n).map(|_| self.any_page(ctx.model)).collect();
                ctx.tier.prefetch(&pages);
                Ok(())
            }
        }
    }

    /// Look `pages` up (one `get`, or one `get_many` for several) and check every answer.
    fn get(&mut self, ctx: &Ctx<'_>, pages: &[u64]) -> Result<(), Violation> {
        let ps = ctx.tier.page_size();
        let reqs: Vec<(u64, u64)> = pages.iter().map(|&p| (p, self.min_for(ctx.model, p))).collect();
        let mut buf = std::mem::take(&mut self.buf);
        let out = &mut buf[..ps * reqs.len()];
        let res = if reqs.len() == 1 {
            vec![ctx.tier.get(reqs[0].0, reqs[0].1, &mut out[..ps])]
        } else {
            ctx.tier.get_many(&reqs, out)
        };
        let checked = reqs.iter().zip(&res).enumerate().try_for_each(|(i, (&(page, min), r))| {
            self.check_lookup(ctx.model, page, min, *r, &out[i * ps..(i + 1) * ps])
        });
        self.buf = buf;
        checked
    }

    pub(crate) fn check_lookup(
        &mut self,
        model: &Model,
        page: u64,
        min: u64,
        r: Lookup,
        bytes: &[u8],
    ) -> Result<(), Violation> {
        self.tally.gets += 1;
        let owned = self.owned_of(model, page);
        match r {
            Lookup::Hit { version } => {
                self.tally.hits += 1;
                model.check_hit(page, min, version, bytes, owned)
            }
            Lookup::Miss(reason) => {
                self.tally.misses[reason_index(reason)] += 1;
                owned.map_or(Ok(()), |o| model.check_owner_miss(page, min, reason, o))
            }
        }
    }

    /// Put new versions of own `pages` (one `put`, or one `put_many` for several) and check the statuses.
    fn put(&mut self, ctx: &Ctx<'_>, pages: &[u64]) -> Result<(), Violation> {
        let ps = ctx.tier.page_size();
        let mut items = Vec::with_capacity(pages.len());
        for &page in pages {
            let last = self.owned.entry(page).or_default().last;
            let version = if last > 0 && self.rng.random_bool(0.15) { last } else { last + 1 };
            ctx.model.offer(page, version);
            items.push((page, version, content(page, version, ps)));
        }
        let statuses = if items.len() == 1 {
            vec![ctx.tier.put(items[0].0, items[0].1, &items[0].2)]
        } else {
            let refs: Vec<(u64, u64, &[u8])> = items.iter().map(|(p, v, d)| (*p, *v, d.as_slice())).collect();
            ctx.tier.put_many(&refs)
        };
        for ((page, version, _), status) in items.iter().zip(statuses) {
            self.tally.put(status);
            let o = self.owned.entry(*page).or_default();
            ctx.model.after_put(*page, *version, status, o)?;
        }
        Ok(())
    }
}
