//! farpool-bench: the `farbench` CLI (perftest-style runs of farpool against raw TCP and Redis) and the
//! pieces criterion benches and future workloads share.
//!
//! Owns: the load driver ([`driver`]), latency statistics ([`stats`]), the systems under test (farpool
//! [`target`], [`pingpong`], [`redis`]), the perftest suite ([`suite`]), its report, rendering, plot and
//! files ([`report`], [`render`], [`plot`], [`output`]), progress display ([`progress`]), and one module
//! per subcommand ([`tcp`], [`demo`]). A new workload adds a module with an `Args` struct and a `run`
//! function, and one variant in `main.rs`'s `Command`.
//!
//! Invariants: every measurement loop is bounded in operations and time; every figure comes from
//! operations that completed and were checked in this run; baselines run in the same process run as
//! farpool, on the same machine, with the same sizes and shapes.
#![forbid(unsafe_code)]

pub mod bufferpool;
pub mod cpu;
pub mod demo;
pub mod driver;
pub mod op;
pub mod output;
pub mod pingpong;
pub mod plot;
pub mod progress;
pub mod rdma;
pub mod redis;
pub mod render;
pub mod report;
pub mod shm;
pub mod stats;
pub mod suite;
pub mod target;
pub mod tcp;
