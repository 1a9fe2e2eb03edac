//! Counters and the stats snapshot.
//!
//! The data plane counts into a connection-local [`BatchCounts`] and adds it to the shared [`Counters`]
//! once per frame batch, so the per-op path does no shared-memory writes for accounting. The stats
//! snapshot ([`ServerStats`]) combines those counters with the slab and lease gauges; the Prometheus
//! exporter is fed from snapshots by the housekeeping tick, off the data path entirely.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use farpool_core::ErrorKind;

/// Number of error kinds tracked (wire codes 1..=15).
const KINDS: usize = ErrorKind::ALL.len();

/// Counts of one batch of operations on one connection.
#[derive(Debug, Default)]
pub struct BatchCounts {
    /// READ operations executed.
    pub reads: u64,
    /// WRITE operations executed.
    pub writes: u64,
    /// CAS operations executed.
    pub cas: u64,
    /// FETCH_ADD operations executed.
    pub fetch_adds: u64,
    /// Bytes returned by reads.
    pub bytes_read: u64,
    /// Bytes stored by writes.
    pub bytes_written: u64,
    /// Refused operations by error kind (index = wire code - 1).
    pub errors: [u64; KINDS],
}

impl BatchCounts {
    /// Count a refused operation.
    pub fn error(&mut self, kind: ErrorKind) {
        self.errors[usize::from(kind.code()) - 1] += 1;
    }
}

/// Server-wide monotonic counters.
#[derive(Debug, Default)]
pub struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    cas: AtomicU64,
    fetch_adds: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: [AtomicU64; KINDS],
    /// Connections accepted.
    pub connections_accepted: AtomicU64,
    /// Connections refused at the connection bound.
    pub connections_refused: AtomicU64,
    /// Leases granted.
    pub leases_granted: AtomicU64,
    /// Leases reclaimed because they expired.
    pub leases_expired: AtomicU64,
    /// Leases released by their holder.
    pub leases_released: AtomicU64,
    /// Slabs revoked by shrink, drain or shutdown.
    pub slabs_revoked: AtomicU64,
}

impl Counters {
    /// Add a batch and reset it.
    pub fn flush(&self, b: &mut BatchCounts) {
        fn add(c: &AtomicU64, v: u64) {
            if v != 0 {
                c.fetch_add(v, Relaxed);
            }
        }
        add(&self.reads, b.reads);
        add(&self.writes, b.writes);
        add(&self.cas, b.cas);
        add(&self.fetch_adds, b.fetch_adds);
        add(&self.bytes_read, b.bytes_read);
        add(&self.bytes_written, b.bytes_written);
        for (c, v) in self.errors.iter().zip(b.errors) {
            add(c, v);
        }
        *b = BatchCounts::default();
    }

    /// Count an error outside a batch (protocol errors, refused leases).
    pub fn error(&self, kind: ErrorKind) {
        self.errors[usize::from(kind.code()) - 1].fetch_add(1, Relaxed);
    }
}

/// A point-in-time view of the server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Slabs in capacity (free + granted).
    pub slabs_total: u64,
    /// Free slabs (zeroed, grantable).
    pub slabs_free: u64,
    /// Granted slabs.
    pub slabs_granted: u64,
    /// Granted slabs scheduled for removal by shrink/drain.
    pub slabs_retiring: u64,
    /// Slabs removed from capacity.
    pub slabs_removed: u64,
    /// Slab size in bytes.
    pub slab_size_bytes: u64,
    /// Leases alive.
    pub leases_active: u64,
    /// Leases granted since start.
    pub leases_granted: u64,
    /// Leases reclaimed on expiry since start.
    pub leases_expired: u64,
    /// Leases released since start.
    pub leases_released: u64,
    /// Slabs revoked (shrink, drain, shutdown) since start.
    pub slabs_revoked: u64,
    /// Open connections.
    pub connections: u64,
    /// Connections accepted since start.
    pub connections_accepted: u64,
    /// Connections refused at the bound since start.
    pub connections_refused: u64,
    /// READ operations.
    pub ops_read: u64,
    /// WRITE operations.
    pub ops_write: u64,
    /// CAS operations.
    pub ops_cas: u64,
    /// FETCH_ADD operations.
    pub ops_fetch_add: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Errors by kind (only kinds that occurred), in wire-code order.
    pub errors: Vec<(ErrorKind, u64)>,
    /// Whether the server is draining (grants nothing).
    pub draining: bool,
}

impl ServerStats {
    /// Fill the counter fields from `c`.
    pub(crate) fn with_counters(mut self, c: &Counters) -> Self {
        self.ops_read = c.reads.load(Relaxed);
        self.ops_write = c.writes.load(Relaxed);
        self.ops_cas = c.cas.load(Relaxed);
        self.ops_fetch_add = c.fetch_adds.load(Relaxed);
        self.bytes_read = c.bytes_read.load(Relaxed);
        self.bytes_written = c.bytes_written.load(Relaxed);
        self.leases_granted = c.leases_granted.load(Relaxed);
        self.leases_expired = c.leases_expired.load(Relaxed);
        self.leases_released = c.leases_released.load(Relaxed);
        self.slabs_revoked = c.slabs_revoked.load(Relaxed);
        self.connections_accepted = c.connections_accepted.load(Relaxed);
        self.connections_refused = c.connections_refused.load(Relaxed);
        self.errors =
            ErrorKind::ALL.iter().zip(&c.errors).map(|(k, v)| (*k, v.load(Relaxed))).filter(|(_, v)| *v > 0).collect();
        self
    }

    /// Errors of one kind.
    pub fn errors_of(&self, kind: ErrorKind) -> u64 {
        self.errors.iter().find(|(k, _)| *k == kind).map_or(0, |(_, v)| *v)
    }

    /// Named counters, as carried by `AdminReply` (`errors_<kind>` for each kind that occurred).
    pub fn to_pairs(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = [
            ("slabs_total", self.slabs_total),
            ("slabs_free", self.slabs_free),
            ("slabs_granted", self.slabs_granted),
            ("slabs_retiring", self.slabs_retiring),
            ("slabs_removed", self.slabs_removed),
            ("slab_size_bytes", self.slab_size_bytes),
            ("leases_active", self.leases_active),
            ("leases_granted", self.leases_granted),
            ("leases_expired", self.leases_expired),
            ("leases_released", self.leases_released),
            ("slabs_revoked", self.slabs_revoked),
            ("connections", self.connections),
            ("connections_accepted", self.connections_accepted),
            ("connections_refused", self.connections_refused),
            ("ops_read", self.ops_read),
            ("ops_write", self.ops_write),
            ("ops_cas", self.ops_cas),
            ("ops_fetch_add", self.ops_fetch_add),
            ("bytes_read", self.bytes_read),
            ("bytes_written", self.bytes_written),
            ("draining", u64::from(self.draining)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        v.extend(self.errors.iter().map(|(k, n)| (format!("errors_{k}"), *n)));
        v
    }

    /// Look a counter up in `AdminReply` pairs (client side of [`ServerStats::to_pairs`]).
    pub fn lookup(pairs: &[(String, u64)], name: &str) -> Option<u64> {
        pairs.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_add_up_and_reset() {
        let c = Counters::default();
        let mut b = BatchCounts { reads: 3, bytes_read: 300, ..Default::default() };
        b.error(ErrorKind::Unaligned);
        c.flush(&mut b);
        assert_eq!(b.reads, 0);
        c.error(ErrorKind::Protocol);
        let s = ServerStats::default().with_counters(&c);
        assert_eq!((s.ops_read, s.bytes_read), (3, 300));
        assert_eq!(s.errors, vec![(ErrorKind::Protocol, 1), (ErrorKind::Unaligned, 1)]);
        let pairs = s.to_pairs();
        assert_eq!(ServerStats::lookup(&pairs, "errors_unaligned"), Some(1));
        assert_eq!(ServerStats::lookup(&pairs, "ops_read"), Some(3));
    }
}
