//! The far slot layout: a 32-byte header, then the page, the slot rounded up to 64 bytes.
//!
//! ```text
//! 0..4 magic "FPTG" | 4..8 crc32 | 8..16 page id | 16..24 version | 24..28 page length | 28..32 zero | page
//! ```
//! The CRC-32 (IEEE, `crc32fast`, hardware-accelerated where the CPU has it) covers bytes 8..32 and the
//! page. A slot is read whole (header + page) in one operation; it is accepted only if the magic, the
//! page id, the version and the page length are the ones the local page table expects and the CRC
//! matches: a torn, stale or foreign slot is a miss, never data.
//! Slots are multiples of 64 bytes, the cache-line size of x86-64 and of most Arm server cores (and the
//! write-combining granularity of CXL.mem), so no two slots share a line.

use bytes::{BufMut, Bytes, BytesMut};

/// Header bytes before the page.
pub const HEADER_LEN: usize = 32;
/// Slot alignment: one cache line.
pub const SLOT_ALIGN: usize = 64;
const MAGIC: u32 = u32::from_le_bytes(*b"FPTG");

/// Bytes one far slot takes for pages of `page_size` bytes.
pub fn slot_size(page_size: usize) -> usize {
    (HEADER_LEN + page_size).div_ceil(SLOT_ALIGN) * SLOT_ALIGN
}

/// Why a slot image was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// Too short, bad magic or length: not a slot of ours.
    Malformed,
    /// A slot of another page or version (reused, or never written).
    Mismatch,
    /// The bytes do not match their checksum (torn or corrupted).
    Checksum,
}

fn crc(tail_of_header: &[u8], page: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(tail_of_header);
    h.update(page);
    h.finalize()
}

/// The slot image (header + page) to write for `page`.
pub(crate) fn encode(page_id: u64, version: u64, page: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_LEN + page.len());
    b.put_u32_le(MAGIC);
    b.put_u32_le(0);
    b.put_u64_le(page_id);
    b.put_u64_le(version);
    b.put_u32_le(page.len() as u32);
    b.put_u32_le(0);
    b.extend_from_slice(page);
    let c = crc(&b[8..HEADER_LEN], page);
    b[4..8].copy_from_slice(&c.to_le_bytes());
    b.freeze()
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Check a slot image read back; returns the page bytes.
pub(crate) fn verify(img: &[u8], page_id: u64, version: u64, page_len: usize) -> Result<&[u8], Rejected> {
    if img.len() < HEADER_LEN + page_len || le_u32(img, 0) != MAGIC || le_u32(img, 24) as usize != page_len {
        return Err(Rejected::Malformed);
    }
    if le_u64(img, 8) != page_id || le_u64(img, 16) != version {
        return Err(Rejected::Mismatch);
    }
    let page = &img[HEADER_LEN..HEADER_LEN + page_len];
    if crc(&img[8..HEADER_LEN], page) != le_u32(img, 4) {
        return Err(Rejected::Checksum);
    }
    Ok(page)
}

/// The page bytes of an image built by [`encode`].
pub(crate) fn payload(img: &[u8]) -> &[u8] {
    &img[HEADER_LEN..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_line_multiples() {
        assert_eq!(slot_size(4096), 4160);
        assert_eq!(slot_size(8192), 8256);
        assert_eq!(slot_size(16384), 16448);
    }

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let page: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let img = encode(42, 7, &page);
        assert_eq!(verify(&img, 42, 7, 4096).unwrap(), &page[..]);
        assert_eq!(payload(&img), &page[..]);
        assert_eq!(verify(&img, 43, 7, 4096), Err(Rejected::Mismatch));
        assert_eq!(verify(&img, 42, 8, 4096), Err(Rejected::Mismatch));
        assert_eq!(verify(&img[..100], 42, 7, 4096), Err(Rejected::Malformed));
        assert_eq!(verify(&vec![0; img.len()], 42, 7, 4096), Err(Rejected::Malformed));
        for at in [4usize, 9, 30, 32, 2000, img.len() - 1] {
            let mut bad = img.to_vec();
            bad[at] ^= 0x10;
            assert!(verify(&bad, 42, 7, 4096).is_err(), "flip at {at} not caught");
        }
        // A torn write: the first half of a new version over the second half of the old one.
        let newer = encode(42, 8, &vec![9u8; 4096]);
        let mut torn = newer.to_vec();
        torn[2048..].copy_from_slice(&img[2048..]);
        assert_eq!(verify(&torn, 42, 8, 4096), Err(Rejected::Checksum));
    }
}
