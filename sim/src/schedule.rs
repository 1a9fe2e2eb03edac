//! The cluster-event schedule of a run: crashes, restarts, drains, shrinks, revokes, growth, each at a
//! workload op index, all drawn from the run's seed before the run starts.
//!
//! Events are applied in schedule order whatever thread reaches their op index first (under one lock,
//! all events due by the op index drawn), so the sequence of cluster states is the same for a given seed.
//! A revoke refers to the incarnation and slabs its notice named; if that incarnation is gone by then,
//! the revoke does nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use farpool::tier::GrantRef;
use farpool_core::ServerId;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::clock::mix;
use crate::cluster::SimCluster;

/// One scheduled cluster event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Crash a server slot (never the last live one), announced or not.
    Crash {
        /// Slot.
        slot: usize,
        /// Send `ServerDown`.
        announce: bool,
    },
    /// Restart a crashed or drained slot as a new incarnation.
    Restart {
        /// Slot.
        slot: usize,
    },
    /// Revoke notice for a whole server (notice `id`), revoked by the matching [`Event::Revoke`].
    Drain {
        /// Notice id.
        id: u32,
        /// Slot.
        slot: usize,
        /// Grace given to the tier.
        grace: Duration,
    },
    /// Retire some slabs of a server (notice `id`).
    Shrink {
        /// Notice id.
        id: u32,
        /// Slot.
        slot: usize,
        /// Slabs to retire.
        slabs: usize,
        /// Grace given to the tier.
        grace: Duration,
    },
    /// Revoke what notice `id` named.
    Revoke {
        /// Notice id.
        id: u32,
        /// Wait (wall time) until the notice's grace has passed before revoking; otherwise revoke at
        /// once, as a server that breaks its promise (or a crash during the grace) would.
        honor_grace: bool,
    },
    /// Bring retired slabs back.
    Grow {
        /// Slot.
        slot: usize,
        /// Slabs.
        slabs: usize,
    },
}

/// A notice waiting for its revoke: the incarnation, the grants noticed, and when the grace ends (wall time).
type Noticed = (ServerId, Vec<GrantRef>, Instant);

#[derive(Debug, Default)]
struct Progress {
    next: usize,
    noticed: HashMap<u32, Noticed>,
    log: Vec<Applied>,
}

/// An event as applied: the op index it was due at, the event (decided by the seed) and its effect (which
/// may depend on what the tier did, e.g. which slabs it held when a notice came).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Op index the event was due at.
    pub op: u64,
    /// The event.
    pub event: Event,
    /// What it did.
    pub effect: String,
}

/// See the module docs.
#[derive(Debug)]
pub struct Schedule {
    events: Vec<(u64, Event)>,
    progress: Mutex<Progress>,
}

impl Schedule {
    /// A schedule for `ops` workload ops over `servers` slots, about one event per `every` ops
    /// (`every == 0`: no events).
    pub fn generate(seed: u64, ops: u64, servers: usize, every: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(mix(seed, 0x5C4E_D01E));
        let mut events = Vec::new();
        let mut next_id = 0u32;
        if every > 0 && servers > 0 && ops > 0 {
            let mut at = rng.random_range(0..every.min(ops));
            while at < ops {
                let slot = rng.random_range(0..servers);
                let later = |rng: &mut SmallRng| at + rng.random_range(3..every.max(4) * 2);
                let grace = Duration::from_millis(rng.random_range(2..40));
                match rng.random_range(0..10) {
                    0..3 => {
                        events.push((at, Event::Crash { slot, announce: rng.random_bool(0.5) }));
                        events.push((later(&mut rng), Event::Restart { slot }));
                    }
                    3..5 => {
                        events.push((at, Event::Drain { id: next_id, slot, grace }));
                        events
                            .push((later(&mut rng), Event::Revoke { id: next_id, honor_grace: rng.random_bool(0.6) }));
                        events.push((later(&mut rng) + every, Event::Restart { slot }));
                        next_id += 1;
                    }
                    5..8 => {
                        let slabs = rng.random_range(1..4);
                        events.push((at, Event::Shrink { id: next_id, slot, slabs, grace }));
                        events
                            .push((later(&mut rng), Event::Revoke { id: next_id, honor_grace: rng.random_bool(0.6) }));
                        next_id += 1;
                    }
                    _ => events.push((at, Event::Grow { slot, slabs: rng.random_range(1..4) })),
                }
                at += rng.random_range(1..every * 2);
            }
        }
        events.sort_by_key(|e| e.0);
        Self { events, progress: Mutex::new(Progress::default()) }
    }

    /// Events in the schedule.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether there are no events.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Apply, in order, every event due by op index `op`.
    pub fn advance(&self, op: u64, cluster: &SimCluster) {
        let mut p = self.progress.lock();
        while let Some((at, ev)) = self.events.get(p.next).filter(|(at, _)| *at <= op) {
            p.next += 1;
            let effect = apply(ev, cluster, &mut p.noticed);
            p.log.push(Applied { op: *at, event: ev.clone(), effect });
        }
    }

    /// Finish every notice still waiting for its revoke (before the final checks); returns how many.
    pub fn revoke_pending(&self, cluster: &SimCluster) -> usize {
        let mut p = self.progress.lock();
        let pending: Vec<Noticed> = p.noticed.drain().map(|(_, v)| v).collect();
        pending.iter().map(|(server, slabs, _)| cluster.revoke(*server, slabs)).sum()
    }

    /// What was applied so far, in order.
    pub fn log(&self) -> Vec<Applied> {
        self.progress.lock().log.clone()
    }
}

fn apply(ev: &Event, cluster: &SimCluster, noticed: &mut HashMap<u32, Noticed>) -> String {
    match *ev {
        Event::Crash { slot, announce } => {
            if cluster.alive() <= 1 {
                return format!("crash of slot {slot} skipped (last live server)");
            }
            match cluster.crash(slot, announce) {
                Some(id) => format!("crash slot {slot} (server {id}, announced {announce})"),
                None => format!("crash of slot {slot} skipped (down already)"),
            }
        }
        Event::Restart { slot } => match cluster.restart(slot) {
            Some(id) => format!("restart slot {slot} as server {id}"),
            None => format!("restart of slot {slot} skipped (running)"),
        },
        Event::Drain { id, slot, grace } => {
            if cluster.alive() <= 1 {
                return format!("drain of slot {slot} skipped (last live server)");
            }
            let r = cluster.drain(slot, grace);
            let what = format!("drain slot {slot}, grace {grace:?}: {r:?}");
            noticed.extend(r.map(|(s, v)| (id, (s, v, Instant::now() + grace))));
            what
        }
        Event::Shrink { id, slot, slabs, grace } => {
            let r = cluster.shrink(slot, slabs, grace);
            let what = format!("shrink slot {slot} by {slabs}, grace {grace:?}: {r:?}");
            noticed.extend(r.map(|(s, v)| (id, (s, v, Instant::now() + grace))));
            what
        }
        Event::Revoke { id, honor_grace } => match noticed.remove(&id) {
            Some((server, slabs, until)) => {
                if honor_grace {
                    // Bounded by the grace itself (at most 40 ms).
                    std::thread::sleep(until.saturating_duration_since(Instant::now()));
                }
                let n = cluster.revoke(server, &slabs);
                format!("revoke notice {id} (grace honored: {honor_grace}): {n} slabs")
            }
            None => format!("revoke notice {id}: nothing noticed"),
        },
        Event::Grow { slot, slabs } => format!("grow slot {slot}: {} slabs back", cluster.grow(slot, slabs)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_schedule_and_revokes_follow_notices() {
        let a = Schedule::generate(9, 2000, 3, 50);
        let b = Schedule::generate(9, 2000, 3, 50);
        assert_eq!(a.events, b.events);
        assert!(a.len() > 10, "{}", a.len());
        assert_ne!(a.events, Schedule::generate(10, 2000, 3, 50).events);
        for (at, ev) in &a.events {
            if let Event::Revoke { id, .. } = ev {
                let notice = a
                    .events
                    .iter()
                    .find(|(_, e)| matches!(e, Event::Drain { id: i, .. } | Event::Shrink { id: i, .. } if i == id));
                assert!(notice.is_some_and(|(n, _)| n < at), "revoke {id} before its notice");
            }
        }
        assert!(Schedule::generate(9, 2000, 3, 0).is_empty());
    }
}
