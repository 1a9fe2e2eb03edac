//! Human-readable byte sizes (`4GiB`, `64MiB`, `8k`, `1048576`) for flags and config files.

use crate::error::{Error, ErrorKind, Result};

/// Parse a byte size. Accepts a plain number of bytes or a number followed by one of
/// `K/KB/KiB/k`, `M/MB/MiB`, `G/GB/GiB`, `T/TB/TiB` (all binary: 1K = 1024), case-insensitive.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || Error::new(ErrorKind::Config, format!("invalid size {s:?}: expected e.g. 4GiB, 64MiB, 8KiB or 4096"));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| Error::new(ErrorKind::Config, format!("size {s:?} overflows")))
}

/// Format a byte count with the largest binary unit that divides it evenly (`64MiB`, `1536KiB`, `7B`).
pub fn format_bytes(n: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
    for (shift, u) in UNITS {
        if n >= (1 << shift) && n.is_multiple_of(1 << shift) {
            return format!("{}{u}", n >> shift);
        }
    }
    format!("{n}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_bytes("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("8k").unwrap(), 8192);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes(" 2 G ").unwrap(), 2 << 30);
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("12XB").is_err());
        assert!(parse_bytes("99999999999T").is_err());
        assert_eq!(format_bytes(64 << 20), "64MiB");
        assert_eq!(format_bytes(7), "7B");
    }
}
