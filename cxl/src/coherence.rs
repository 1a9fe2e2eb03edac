//! Coherence modes for memory shared through a mapping.
//!
//! - [`Coherence::Coherent`] (default): loads and stores need nothing extra. Applies to memory the
//!   hardware keeps coherent for every reader: same-host shared memory (memfd, NUMA node, a CXL Type-3
//!   device attached to this host, all behind this host's cache hierarchy) and CXL 3.x shared memory
//!   with hardware back-invalidation.
//! - [`Coherence::Flush`]: for memory shared between hosts *without* coherence (CXL 2.0 pooled memory
//!   mapped by two hosts: each host's caches can hold stale or dirty copies of the other's lines).
//!   After a write the writer writes each touched cache line back to memory (`clwb`, else
//!   `clflushopt`, else `clflush`) and fences with `sfence`, so the bytes are in the device before the
//!   write is reported complete. Before a read the reader evicts the lines it is about to read
//!   (`clflushopt`, else `clflush`) and fences with `mfence`, so the loads miss the cache and see the
//!   device. Atomics in this mode are local read-modify-writes between an invalidate and a write-back:
//!   CXL 2.0 offers no cross-host atomicity, so concurrent atomics from two hosts on one word can lose
//!   updates (use one writer per word, or CXL 3 coherent sharing).
//!
//! Line size: the granularity of `clflush`/`clflushopt`/`clwb` is the CLFLUSH line size that CPUID
//! reports in leaf 1, EBX bits 15:8, in units of 8 bytes (Intel SDM Vol. 2A, CPUID, "CLFLUSH line
//! size"; 8 x 8 = 64 bytes on every x86-64 so far). [`flush_line_bytes`] reads it at run time and falls
//! back to 64. The CXL.mem transfer granularity is also 64 bytes (one flit slot carries a 64-byte line).
//!
//! Invariant: flushing never changes memory contents, only where they live; every range is bounds
//! checked against the [`Region`] before an address is formed.

use std::sync::OnceLock;

use farpool_core::Result;

use crate::region::Region;

/// Fallback line size when CPUID is unavailable: 64 bytes (x86-64 and the CXL.mem line).
pub const DEFAULT_LINE_BYTES: usize = 64;

/// How shared memory is kept coherent. See the module docs for where each applies.
///
/// ```
/// use farpool_cxl::{Backing, Coherence};
/// let r = Backing::Memfd.map(1 << 20, "doc").unwrap();
/// let c: Coherence = "flush".parse().unwrap();
/// r.write_at(100, b"pooled").unwrap();
/// c.after_write(&r, 100, 6).unwrap(); // clwb/clflushopt each line + sfence
/// c.before_read(&r, 100, 6).unwrap(); // invalidate + mfence
/// let mut b = [0u8; 6];
/// r.read_at(100, &mut b).unwrap();
/// assert_eq!(&b, b"pooled");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Coherence {
    /// Hardware-coherent: nothing extra (same host, CXL 3 sharing). The default.
    #[default]
    Coherent,
    /// Not coherent (CXL 2.0 pooling across hosts): write back after writes, invalidate before reads.
    Flush,
}

impl std::str::FromStr for Coherence {
    type Err = farpool_core::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "coherent" => Ok(Self::Coherent),
            "flush" => Ok(Self::Flush),
            other => Err(farpool_core::Error::new(
                farpool_core::ErrorKind::Config,
                format!("unknown coherence mode {other:?}: expected coherent or flush"),
            )),
        }
    }
}

impl std::fmt::Display for Coherence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Coherent => "coherent",
            Self::Flush => "flush",
        })
    }
}

/// The cache-line instruction used to write lines back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushInstr {
    /// `clwb`: write back, the line may stay cached (best for writers).
    Clwb,
    /// `clflushopt`: write back and invalidate, weakly ordered (needs a fence).
    Clflushopt,
    /// `clflush`: write back and invalidate, strongly ordered (slowest; every x86-64 has it).
    Clflush,
    /// Not x86-64: only fences are issued.
    None,
}

#[derive(Clone, Copy, Debug)]
struct Cpu {
    line: usize,
    write_back: FlushInstr,
    invalidate: FlushInstr,
}

fn cpu() -> Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    *CPU.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Cpu {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // CPUID leaves 0 and 1 exist on every x86-64 processor.
    let (max_leaf, ebx1) = (__cpuid(0).eax, __cpuid(1).ebx);
    let line = (((ebx1 >> 8) & 0xff) as usize) * 8;
    let line = if line.is_power_of_two() && line >= 16 { line } else { DEFAULT_LINE_BYTES };
    // Leaf 7 subleaf 0, EBX bit 23 = CLFLUSHOPT, bit 24 = CLWB (Intel SDM Vol. 2A, CPUID).
    // Leaf 7 is queried only when the maximum basic leaf reaches it.
    let ebx7 = if max_leaf >= 7 { __cpuid_count(7, 0).ebx } else { 0 };
    let opt = ebx7 & (1 << 23) != 0;
    let write_back = if ebx7 & (1 << 24) != 0 {
        FlushInstr::Clwb
    } else if opt {
        FlushInstr::Clflushopt
    } else {
        FlushInstr::Clflush
    };
    let invalidate = if opt { FlushInstr::Clflushopt } else { FlushInstr::Clflush };
    Cpu { line, write_back, invalidate }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Cpu {
    Cpu { line: DEFAULT_LINE_BYTES, write_back: FlushInstr::None, invalidate: FlushInstr::None }
}

/// The cache-line flush granularity in bytes (CPUID leaf 1 EBX[15:8] x 8; 64 if unknown).
pub fn flush_line_bytes() -> usize {
    cpu().line
}

/// Instructions this CPU uses for (write-back, invalidate).
pub fn flush_instrs() -> (FlushInstr, FlushInstr) {
    let c = cpu();
    (c.write_back, c.invalidate)
}

/// Issue `instr` on one line.
///
/// # Safety
/// `p` must point into a live mapping.
#[inline]
unsafe fn line_op(instr: FlushInstr, p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller guarantees `p` is inside a live mapping; these instructions only move the
    // line between cache and memory and never change its contents. Support was detected at run time.
    unsafe {
        match instr {
            FlushInstr::Clwb => std::arch::asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags)),
            FlushInstr::Clflushopt => {
                std::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags))
            }
            FlushInstr::Clflush => std::arch::asm!("clflush [{0}]", in(reg) p, options(nostack, preserves_flags)),
            FlushInstr::None => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (instr, p);
}

fn for_each_line(region: &Region, offset: u64, len: usize, instr: FlushInstr) -> Result<()> {
    let o = region.check(offset, len)?;
    if len == 0 {
        return Ok(());
    }
    let line = flush_line_bytes();
    let first = o / line * line;
    let end = o + len;
    let mut at = first;
    while at < end {
        // SAFETY: `first` rounds a checked in-bounds offset down to a line boundary; the region's start
        // is page-aligned so every line we touch from `first` up to `end` lies in the mapping (the
        // last line may extend past `end` but not past the page, hence not past the region).
        unsafe { line_op(instr, region.as_ptr().add(at)) };
        at += line;
    }
    Ok(())
}

impl Coherence {
    /// Make the bytes just written at `offset..offset+len` visible in memory (write back + `sfence`).
    /// A no-op when coherent.
    pub fn after_write(self, region: &Region, offset: u64, len: usize) -> Result<()> {
        if self == Self::Coherent {
            return Ok(());
        }
        for_each_line(region, offset, len, cpu().write_back)?;
        store_fence();
        Ok(())
    }

    /// Drop cached copies of `offset..offset+len` before reading them (invalidate + `mfence`).
    /// A no-op when coherent.
    pub fn before_read(self, region: &Region, offset: u64, len: usize) -> Result<()> {
        if self == Self::Coherent {
            return Ok(());
        }
        for_each_line(region, offset, len, cpu().invalidate)?;
        full_fence();
        Ok(())
    }
}

fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence has no operands and no memory-safety preconditions (SSE is baseline on x86-64).
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
}

fn full_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: mfence has no operands and no memory-safety preconditions (SSE2 is baseline on x86-64).
    unsafe {
        std::arch::x86_64::_mm_mfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::Backing;

    #[test]
    fn line_size_is_a_sane_power_of_two() {
        let l = flush_line_bytes();
        assert!(l.is_power_of_two() && (16..=256).contains(&l), "line {l}");
        #[cfg(target_arch = "x86_64")]
        assert_ne!(flush_instrs().0, FlushInstr::None);
    }

    #[test]
    fn flush_mode_round_trips_data() {
        let r = Backing::Memfd.map(1 << 20, "coherence-test").unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        // Unaligned offset and length so first and last lines are partial.
        for (off, c) in
            [(13u64, Coherence::Flush), (4096 + 61, Coherence::Coherent), ((1 << 20) - 10_000, Coherence::Flush)]
        {
            r.write_at(off, &data).unwrap();
            c.after_write(&r, off, data.len()).unwrap();
            c.before_read(&r, off, data.len()).unwrap();
            let mut back = vec![0; data.len()];
            r.read_at(off, &mut back).unwrap();
            assert_eq!(back, data, "{c} at {off}");
        }
        assert_eq!(
            Coherence::Flush.before_read(&r, 1 << 20, 1).unwrap_err().kind(),
            farpool_core::ErrorKind::OutOfRange
        );
    }

    #[test]
    fn parse_and_display() {
        for c in [Coherence::Coherent, Coherence::Flush] {
            assert_eq!(c.to_string().parse::<Coherence>().unwrap(), c);
        }
        assert!("nope".parse::<Coherence>().is_err());
    }
}
