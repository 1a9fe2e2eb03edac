//! farpool-cxl: memory the pool is made of, and how it is found.
//!
//! Owns: [`region::Region`], a mapping with bounds-checked safe accessors (the only place where pool
//! memory is touched through raw pointers), and the backings it is made from ([`backing`]). Later
//! modules: topology discovery (NUMA, CPU-less nodes, dax), NUMA-bound and devdax backings, the
//! shared-memory transport.
//!
//! Invariant: every access goes through [`region::Region`]'s checked methods: `offset + len <= len()`
//! and atomics 8-byte aligned, checked in safe code before any pointer is formed.

pub mod backing;
pub mod region;

pub use backing::{Backing, HugePages};
pub use region::Region;
