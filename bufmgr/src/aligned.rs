//! `AlignedBuf`: a byte buffer whose start is 4096-aligned, without unsafe code: a `Vec<u8>` over-allocated
//! by one alignment unit and sliced at the first aligned address. The heap block never moves while the
//! `Vec` is not resized, so the offset stays valid when the buffer itself is moved.
//! 4096 is the logical block size O_DIRECT needs on every Linux file system we target (and the x86-64
//! base page size); 512 would do on many devices, 4096 on all.

/// Alignment of the buffers, bytes.
pub const ALIGN: usize = 4096;

/// See the module docs.
#[derive(Debug)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes starting on a 4096-byte boundary.
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + ALIGN];
        let addr = raw.as_ptr() as usize;
        let start = (ALIGN - addr % ALIGN) % ALIGN;
        Self { raw, start, len }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_after_move() {
        for len in [4096, 8192, 12345] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
            b.as_mut_slice()[len - 1] = 7;
            let moved = Box::new(b);
            assert_eq!(moved.as_slice().as_ptr() as usize % ALIGN, 0);
            assert_eq!(moved.as_slice()[len - 1], 7);
            assert_eq!(moved.len(), len);
        }
    }
}
