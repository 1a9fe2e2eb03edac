//! The reference model and its checks.
//!
//! Page `p` is written (put, invalidated) only by its owner thread `p % threads`; any thread reads it.
//! The bytes of `(page, version)` are a pure function of both ([`content`]), so a hit can be checked
//! without storing pages: any mix-up of pages or versions, a torn copy or a stray byte changes them.
//!
//! Checks on every hit, by any thread (the tier's contract):
//! - the version is >= the minimum asked (never stale);
//! - the version was really put (<= the newest version ever offered for the page);
//! - the bytes are exactly `content(page, version)` (never torn, never foreign).
//!
//! The owner also knows, from the statuses its own calls returned, the only version the tier may still
//! hold for each of its pages ([`Owned::current`]): `Queued(v)` makes it `v`; `Dropped` and `invalidate`
//! make it nothing; `Rejected` leaves it; `Unchanged` requires it to be >= the version offered. The tier
//! may always lose a page (it is a cache), so a miss is always allowed, but the owner's hit must return
//! exactly `current`, a `Stale` miss requires an older `current`, and `invalidate` may report a removal
//! only if `current` was set.

use std::sync::atomic::{AtomicU64, Ordering};

use farpool::tier::{MissReason, PutStatus};

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// A hit older than the minimum asked.
    #[error("page {page}: hit returned version {version} below the minimum {min} asked (stale)")]
    OlderThanAsked {
        /// Page.
        page: u64,
        /// Version returned.
        version: u64,
        /// Minimum asked.
        min: u64,
    },
    /// A hit of a version nobody put.
    #[error("page {page}: hit returned version {version}, never put (newest put {newest})")]
    NeverPut {
        /// Page.
        page: u64,
        /// Version returned.
        version: u64,
        /// Newest version ever offered.
        newest: u64,
    },
    /// A hit whose bytes differ from what was put for that (page, version).
    #[error(
        "page {page} v{version}: hit returned bytes that differ from what was put (first at byte {offset}; {what})"
    )]
    WrongBytes {
        /// Page.
        page: u64,
        /// Version claimed.
        version: u64,
        /// First differing byte.
        offset: usize,
        /// What the bytes look like.
        what: String,
    },
    /// The owner got a version the tier can no longer hold.
    #[error("page {page}: owner's hit returned version {version}, but the tier may only hold {allowed:?}")]
    NotCurrent {
        /// Page.
        page: u64,
        /// Version returned.
        version: u64,
        /// What the model allows.
        allowed: Option<u64>,
    },
    /// A `Stale` miss for a page the tier cannot hold at an older version.
    #[error("page {page}: miss reported Stale for minimum {min}, but the tier may only hold {allowed:?}")]
    BogusStale {
        /// Page.
        page: u64,
        /// Minimum asked.
        min: u64,
        /// What the model allows.
        allowed: Option<u64>,
    },
    /// A put reported `Unchanged` although the tier cannot hold that version or a newer one.
    #[error("page {page}: put of v{version} reported Unchanged, but the tier may only hold {allowed:?}")]
    BogusUnchanged {
        /// Page.
        page: u64,
        /// Version offered.
        version: u64,
        /// What the model allows.
        allowed: Option<u64>,
    },
    /// `invalidate` reported removing a page the tier cannot hold.
    #[error("page {page}: invalidate reported a removal, but the page was not in the tier")]
    BogusInvalidate {
        /// Page.
        page: u64,
    },
    /// Slots, slabs or table disagree after quiescence.
    #[error("accounting after quiescence: {0}")]
    Accounting(String),
    /// Counters do not add up, or disagree with what the workload saw.
    #[error("stats: {0}")]
    Stats(String),
}

/// The bytes of `page` at `version`, `len` long.
pub fn content(page: u64, version: u64, len: usize) -> Vec<u8> {
    farpool::tier::page_content(page, version, len)
}

/// What the owner of a page knows about it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owned {
    /// The only version the tier may hold (`None`: the tier must not return the page).
    pub current: Option<u64>,
    /// The last version the owner offered (versions offered never decrease).
    pub last: u64,
}

/// The shared part of the model: the newest version ever offered per page.
#[derive(Debug)]
pub struct Model {
    page_size: usize,
    threads: usize,
    newest: Vec<AtomicU64>,
}

impl Model {
    /// A model of `pages` pages of `page_size` bytes written by `threads` owners.
    pub fn new(pages: u64, page_size: usize, threads: usize) -> Self {
        Self { page_size, threads: threads.max(1), newest: (0..pages).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Pages in the model.
    pub fn pages(&self) -> u64 {
        self.newest.len() as u64
    }

    /// The thread that owns `page`.
    pub fn owner(&self, page: u64) -> usize {
        (page % self.threads as u64) as usize
    }

    /// Newest version ever offered for `page`.
    pub fn newest(&self, page: u64) -> u64 {
        self.newest[page as usize].load(Ordering::Acquire)
    }

    /// Record an offer (before the put is called, so concurrent readers may see its version).
    pub fn offer(&self, page: u64, version: u64) {
        self.newest[page as usize].fetch_max(version, Ordering::AcqRel);
    }

    /// Check a hit; `owned` is the owner's knowledge when the caller is the page's owner.
    pub fn check_hit(
        &self,
        page: u64,
        min: u64,
        version: u64,
        bytes: &[u8],
        owned: Option<Owned>,
    ) -> Result<(), Violation> {
        if version < min {
            return Err(Violation::OlderThanAsked { page, version, min });
        }
        let newest = self.newest(page);
        if version > newest {
            return Err(Violation::NeverPut { page, version, newest });
        }
        let want = content(page, version, self.page_size);
        if let Some(offset) = want.iter().zip(bytes).position(|(a, b)| a != b) {
            let what = self.describe(page, bytes, &want, offset);
            return Err(Violation::WrongBytes { page, version, offset, what });
        }
        match owned {
            Some(o) if o.current != Some(version) => Err(Violation::NotCurrent { page, version, allowed: o.current }),
            _ => Ok(()),
        }
    }

    fn describe(&self, page: u64, bytes: &[u8], want: &[u8], offset: usize) -> String {
        let newest = self.newest(page);
        if let Some(v) = (1..=newest.min(4096)).find(|&v| content(page, v, self.page_size) == bytes) {
            return format!("they are exactly version {v}");
        }
        if bytes.iter().all(|&b| b == 0) {
            return "all zero".into();
        }
        let differ = want.iter().zip(bytes).filter(|(a, b)| a != b).count();
        format!(
            "{differ} bytes differ from byte {offset} on, and they match no version put: torn, foreign or corrupted"
        )
    }

    /// Check a miss by the page's owner.
    pub fn check_owner_miss(&self, page: u64, min: u64, reason: MissReason, o: Owned) -> Result<(), Violation> {
        if reason == MissReason::Stale && !matches!(o.current, Some(v) if v < min) {
            return Err(Violation::BogusStale { page, min, allowed: o.current });
        }
        Ok(())
    }

    /// Apply a put's status to the owner's knowledge, checking it.
    pub fn after_put(&self, page: u64, version: u64, status: PutStatus, o: &mut Owned) -> Result<(), Violation> {
        o.last = o.last.max(version);
        match status {
            PutStatus::Queued => o.current = Some(version),
            PutStatus::Dropped => o.current = None,
            PutStatus::Rejected => {}
            PutStatus::Unchanged => {
                if !matches!(o.current, Some(v) if v >= version) {
                    return Err(Violation::BogusUnchanged { page, version, allowed: o.current });
                }
            }
        }
        Ok(())
    }

    /// Apply an invalidate's answer to the owner's knowledge, checking it.
    pub fn after_invalidate(&self, page: u64, removed: bool, o: &mut Owned) -> Result<(), Violation> {
        let allowed = o.current.take();
        if removed && allowed.is_none() {
            return Err(Violation::BogusInvalidate { page });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: usize = 256;

    #[test]
    fn hits_are_checked_for_version_and_bytes() {
        let m = Model::new(4, PS, 2);
        m.offer(1, 3);
        let good = content(1, 3, PS);
        assert_eq!(m.check_hit(1, 2, 3, &good, None), Ok(()));
        assert!(matches!(m.check_hit(1, 4, 3, &good, None), Err(Violation::OlderThanAsked { .. })));
        assert!(matches!(m.check_hit(1, 0, 5, &content(1, 5, PS), None), Err(Violation::NeverPut { .. })));
        let mut torn = good.clone();
        torn[PS / 2..].copy_from_slice(&content(1, 2, PS)[PS / 2..]);
        assert!(
            matches!(m.check_hit(1, 0, 3, &torn, None), Err(Violation::WrongBytes { offset, .. }) if offset >= PS / 2)
        );
        let older = content(1, 2, PS);
        let e = m.check_hit(1, 0, 3, &older, None).unwrap_err();
        assert!(e.to_string().contains("exactly version 2"), "{e}");
        let o = Owned { current: Some(2), last: 3 };
        assert!(matches!(m.check_hit(1, 0, 3, &good, Some(o)), Err(Violation::NotCurrent { .. })));
    }

    #[test]
    fn owner_knowledge_follows_statuses() {
        let m = Model::new(4, PS, 1);
        let mut o = Owned::default();
        assert!(m.after_put(0, 1, PutStatus::Unchanged, &mut o).is_err(), "nothing held: Unchanged is a lie");
        m.after_put(0, 1, PutStatus::Queued, &mut o).unwrap();
        assert_eq!(o.current, Some(1));
        m.after_put(0, 1, PutStatus::Unchanged, &mut o).unwrap();
        m.after_put(0, 2, PutStatus::Rejected, &mut o).unwrap();
        assert_eq!(o.current, Some(1));
        assert!(m.check_owner_miss(0, 2, MissReason::Stale, o).is_ok());
        assert!(m.check_owner_miss(0, 1, MissReason::Stale, o).is_err());
        m.after_invalidate(0, true, &mut o).unwrap();
        assert!(m.after_invalidate(0, true, &mut o).is_err(), "removed twice");
        m.after_put(0, 3, PutStatus::Dropped, &mut o).unwrap();
        assert_eq!(o, Owned { current: None, last: 3 });
    }
}
