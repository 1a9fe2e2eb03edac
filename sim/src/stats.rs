//! Counters of what the simulated cluster did and injected (for reports and for tests that assert a
//! fault really happened: a fault mode that never fires proves nothing).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! sim_counters {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        #[derive(Debug, Default)]
        pub(crate) struct SimCounters { $(pub(crate) $name: AtomicU64,)* }

        /// A snapshot of the cluster's counters.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct SimStats { $($(#[$m])* pub $name: u64,)* }

        impl SimCounters {
            pub(crate) fn snapshot(&self) -> SimStats {
                SimStats { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

sim_counters! {
    /// Data-plane operations posted.
    ops,
    /// Operations executed against server memory (including late landings).
    executed,
    /// Injected: failed before execution.
    error_before,
    /// Injected: executed, reported failed.
    error_after,
    /// Injected: writes of which only a prefix landed.
    torn_writes,
    /// Injected: dropped (timed out, never executed).
    drops,
    /// Injected: writes reported timed out that landed later.
    late_landings,
    /// Operations given a long-tail latency.
    tail_delays,
    /// Reads whose returned bytes were corrupted (corruption modes only).
    corruptions,
    /// Operations refused because the server was down.
    unreachable,
    /// Operations refused for a stale or wrong credential (revoked, re-granted, other tenant).
    refused_credential,
    /// Slabs granted.
    grants,
    /// Slabs released by the client.
    releases,
    /// Server crashes.
    crashes,
    /// Server restarts (each a new incarnation with a new id).
    restarts,
    /// Revoke notices sent.
    notices,
    /// Slabs revoked.
    revoked_slabs,
    /// Slabs added back by growth.
    grown_slabs,
    /// Slabs retired by shrinking.
    shrunk_slabs,
}

impl SimCounters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}

impl SimStats {
    /// Faults injected on the data plane, all kinds.
    pub fn injected(&self) -> u64 {
        self.error_before + self.error_after + self.torn_writes + self.drops + self.late_landings
    }
}
