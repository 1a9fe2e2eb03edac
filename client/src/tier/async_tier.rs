//! `AsyncPageTier`: the tier's calls for tokio code. Each runs the blocking call on tokio's blocking
//! pool (far reads wait on completions), so no runtime worker is stalled. Puts only enqueue and are
//! cheap, but go through the same path for uniformity of errors.

use farpool_core::{Error, ErrorKind, Result};

use super::{Lookup, PageTier, PutStatus, TierStats};

/// See the module docs.
#[derive(Clone, Debug)]
pub struct AsyncPageTier {
    tier: PageTier,
}

impl AsyncPageTier {
    /// Wrap a tier.
    pub fn new(tier: PageTier) -> Self {
        Self { tier }
    }

    /// The blocking tier.
    pub fn blocking(&self) -> &PageTier {
        &self.tier
    }

    async fn run<R: Send + 'static>(&self, f: impl FnOnce(&PageTier) -> R + Send + 'static) -> Result<R> {
        let t = self.tier.clone();
        tokio::task::spawn_blocking(move || f(&t))
            .await
            .map_err(|e| Error::new(ErrorKind::Cancelled, "page tier task failed").with_source(e))
    }

    /// [`PageTier::get`]; returns the lookup and the page (empty on a miss).
    pub async fn get(&self, page_id: u64, min_version: u64) -> Result<(Lookup, Vec<u8>)> {
        self.run(move |t| {
            let mut buf = vec![0; t.page_size()];
            let r = t.get(page_id, min_version, &mut buf);
            if !r.is_hit() {
                buf.clear();
            }
            (r, buf)
        })
        .await
    }

    /// [`PageTier::get_many`]; returns the lookups and the pages, back to back.
    pub async fn get_many(&self, reqs: Vec<(u64, u64)>) -> Result<(Vec<Lookup>, Vec<u8>)> {
        self.run(move |t| {
            let mut out = vec![0; reqs.len() * t.page_size()];
            (t.get_many(&reqs, &mut out), out)
        })
        .await
    }

    /// [`PageTier::put`].
    pub async fn put(&self, page_id: u64, version: u64, page: bytes::Bytes) -> Result<PutStatus> {
        self.run(move |t| t.put(page_id, version, &page)).await
    }

    /// [`PageTier::invalidate`].
    pub async fn invalidate(&self, page_id: u64) -> Result<bool> {
        self.run(move |t| t.invalidate(page_id)).await
    }

    /// [`PageTier::prefetch`].
    pub async fn prefetch(&self, pages: Vec<u64>) -> Result<()> {
        self.run(move |t| t.prefetch(&pages)).await
    }

    /// [`PageTier::flush`].
    pub async fn flush(&self, timeout: std::time::Duration) -> Result<()> {
        self.run(move |t| t.flush(timeout)).await?
    }

    /// [`PageTier::stats`].
    pub fn stats(&self) -> TierStats {
        self.tier.stats()
    }
}
