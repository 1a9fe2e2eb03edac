//! What the simulated data plane does wrong, per operation, and the corruption modes used to prove the
//! checker can fail.
//!
//! Each operation's fate is drawn from its endpoint's seeded generator at `post`:
//! - **error before**: fails with `Io`, never executed;
//! - **error after**: executed, reported failed with `Io` (a write that landed but whose ack was lost);
//! - **torn write**: only a prefix of the write lands, reported failed with `Io` (a crash mid-transfer);
//! - **drop**: never executed, completes with `Timeout` after `op_timeout` of virtual time;
//! - **late landing**: reported failed with `Timeout`, but the write still executes later in virtual time,
//!   after the client gave up on it (the hazard of every timeout-based transport);
//! - **latency**: every op completes after a random virtual delay (with a rare long tail), so completions
//!   of one batch, and of different endpoints, arrive in a different order than posted.
//!
//! [`Corruption`] changes what successful reads return: `Torn` keeps a valid header over a page whose
//! second half is garbage (the tier must turn it into a checksum miss); `Forged` rewrites a page byte and
//! recomputes the checksum, a corruption no header check can see (the reference model must catch it).

use farpool::tier::layout::HEADER_LEN;
use rand::Rng;
use rand::rngs::SmallRng;

/// Corrupting mode for successful reads (tests of the checker; `None` in every real run).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Corruption {
    /// Reads return what is in memory.
    #[default]
    None,
    /// Valid header, torn page: the checksum no longer matches.
    Torn,
    /// Valid header, one page byte changed, checksum recomputed: undetectable by the tier.
    Forged,
}

impl std::str::FromStr for Corruption {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "torn" => Ok(Self::Torn),
            "forged" => Ok(Self::Forged),
            other => Err(format!("unknown corruption mode {other:?} (none, torn, forged)")),
        }
    }
}

/// Per-operation fault probabilities (0.0..=1.0) and virtual latencies. See the module docs.
#[derive(Clone, Debug)]
pub struct SimFaults {
    /// Fails with `Io` before execution.
    pub error_before: f64,
    /// Executed, then reported failed with `Io`.
    pub error_after: f64,
    /// A write of which only a prefix lands, reported failed.
    pub torn_write: f64,
    /// Never executed; completes with `Timeout` after the op timeout (virtual).
    pub drop: f64,
    /// A write reported as timed out that still lands later (virtual time).
    pub late_landing: f64,
    /// Base virtual latency range of an operation, nanoseconds.
    pub latency_ns: (u64, u64),
    /// Probability of a long-tail latency instead.
    pub tail: f64,
    /// Long-tail virtual latency range, nanoseconds.
    pub tail_ns: (u64, u64),
    /// What successful reads return.
    pub corruption: Corruption,
    /// Probability that a successful read of a slot is corrupted (when `corruption` is not `None`).
    pub corrupt: f64,
}

impl SimFaults {
    /// No faults; latencies still vary, so completions are still reordered.
    pub fn calm() -> Self {
        Self {
            error_before: 0.0,
            error_after: 0.0,
            torn_write: 0.0,
            drop: 0.0,
            late_landing: 0.0,
            latency_ns: (1_000, 20_000),
            tail: 0.0,
            tail_ns: (100_000, 5_000_000),
            corruption: Corruption::None,
            corrupt: 0.0,
        }
    }

    /// A fault mix drawn from `rng`: from calm to heavy (a few percent of operations failing each way).
    pub fn random(rng: &mut SmallRng) -> Self {
        let level = rng.random_range(0..4u32);
        let p = |rng: &mut SmallRng, max: f64| if level == 0 { 0.0 } else { rng.random_range(0.0..max) };
        let scale = f64::from(level) / 3.0;
        Self {
            error_before: p(rng, 0.04 * scale),
            error_after: p(rng, 0.04 * scale),
            torn_write: p(rng, 0.03 * scale),
            drop: p(rng, 0.01 * scale),
            late_landing: p(rng, 0.02 * scale),
            latency_ns: (500, rng.random_range(2_000..50_000)),
            tail: p(rng, 0.05),
            tail_ns: (100_000, 20_000_000),
            corruption: Corruption::None,
            corrupt: 0.0,
        }
    }
}

/// Apply `mode` to a slot image read back (only images that carry the tier's header are touched).
/// Returns whether the image was changed.
pub(crate) fn corrupt_image(mode: Corruption, img: &mut [u8], rng: &mut SmallRng) -> bool {
    if img.len() <= HEADER_LEN || img[0..4] != *b"FPTG" {
        return false;
    }
    let page_len = u32::from_le_bytes(img[24..28].try_into().expect("4 bytes")) as usize;
    if img.len() < HEADER_LEN + page_len || page_len == 0 {
        return false;
    }
    match mode {
        Corruption::None => false,
        Corruption::Torn => {
            let half = HEADER_LEN + page_len / 2;
            img[half..HEADER_LEN + page_len].iter_mut().for_each(|b| *b = b.wrapping_add(0x5B));
            true
        }
        Corruption::Forged => {
            let at = HEADER_LEN + rng.random_range(0..page_len);
            img[at] ^= 0x24;
            let mut h = crc32fast::Hasher::new();
            h.update(&img[8..HEADER_LEN]);
            h.update(&img[HEADER_LEN..HEADER_LEN + page_len]);
            img[4..8].copy_from_slice(&h.finalize().to_le_bytes());
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn image() -> Vec<u8> {
        let page = vec![7u8; 64];
        let mut img = Vec::new();
        img.extend_from_slice(b"FPTG");
        img.extend_from_slice(&[0; 4]);
        img.extend_from_slice(&1u64.to_le_bytes());
        img.extend_from_slice(&2u64.to_le_bytes());
        img.extend_from_slice(&64u32.to_le_bytes());
        img.extend_from_slice(&[0; 4]);
        img.extend_from_slice(&page);
        img
    }

    #[test]
    fn modes_change_only_real_slots() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut zero = vec![0u8; 200];
        assert!(!corrupt_image(Corruption::Torn, &mut zero, &mut rng), "zeroed memory is not a slot");
        let mut torn = image();
        assert!(corrupt_image(Corruption::Torn, &mut torn, &mut rng));
        assert_eq!(torn[..HEADER_LEN], image()[..HEADER_LEN], "torn keeps the header");
        assert_ne!(torn, image());
        let mut forged = image();
        assert!(corrupt_image(Corruption::Forged, &mut forged, &mut rng));
        assert_eq!(forged[8..HEADER_LEN], image()[8..HEADER_LEN], "forged keeps page id and version");
        assert_ne!(forged[HEADER_LEN..], image()[HEADER_LEN..]);
    }
}
