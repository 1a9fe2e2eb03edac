//! Deterministic byte patterns for tests, simulations, benchmarks and the guest checks: one generator
//! instead of a copy in each of them.

/// `len` bytes that depend on both `page` and `version` (an xorshift stream seeded by both): a page
/// served for the wrong id or version, or a torn copy mixing two versions, differs from it, so a
/// checker can compare a hit byte for byte.
pub fn page_content(page: u64, version: u64, len: usize) -> Vec<u8> {
    let mut x = page.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
