//! The atomics the lock-free parts of the tier use, switched to loom's under `--cfg farpool_loom`.
//!
//! Only [`super::slot`] goes through this shim: it is the piece whose interleavings loom explores.
//! Run the loom tests with:
//! `RUSTFLAGS="--cfg farpool_loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p farpool --release --lib tier::slot`

#[cfg(farpool_loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(farpool_loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
