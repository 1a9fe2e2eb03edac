//! [`QpInfo`]: what one side of an RC connection tells the other, carried as bytes by the control plane.
//!
//! Wire format (36 bytes, little-endian), versioned so a peer with another layout is refused, never
//! misread:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `b"FPQP"` |
//! | 4 | version (1) |
//! | 5 | reserved, 0 |
//! | 6..8 | path MTU in bytes (256, 512, 1024, 2048 or 4096) |
//! | 8..12 | QP number (24 bits) |
//! | 12..16 | first packet sequence number (24 bits) |
//! | 16..18 | LID (InfiniBand; 0 on RoCE) |
//! | 18..20 | reserved, 0 |
//! | 20..36 | GID (RoCE: the IPv6 or IPv4-mapped address of the port) |

use std::fmt;
use std::net::Ipv6Addr;

use farpool_core::{Error, ErrorKind, Result};

/// The MTUs verbs allows (`enum ibv_mtu`: 256 << (code - 1)).
pub const MTUS: [u16; 5] = [256, 512, 1024, 2048, 4096];

/// The largest QP number and PSN: both are 24-bit fields in the InfiniBand transport header
/// (IBTA spec vol. 1, 9.2 "Base Transport Header").
pub const MAX_24BIT: u32 = (1 << 24) - 1;

/// Connection parameters of one RC queue pair.
///
/// ```
/// use farpool_rdma::QpInfo;
///
/// let gid = "::ffff:127.0.0.1".parse::<std::net::Ipv6Addr>().unwrap().octets();
/// let mine = QpInfo { qpn: 0x11, psn: 0x1234, gid, lid: 0, mtu: 1024 };
/// let wire = mine.to_bytes(); // what the control plane carries
/// assert_eq!(QpInfo::from_bytes(&wire).unwrap(), mine);
/// assert!(QpInfo::from_bytes(&wire[..10]).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QpInfo {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number this side sends with.
    pub psn: u32,
    /// Port GID (RoCE address).
    pub gid: [u8; 16],
    /// Port LID (InfiniBand only; 0 on RoCE).
    pub lid: u16,
    /// Active path MTU of the port, in bytes.
    pub mtu: u16,
}

impl QpInfo {
    /// Encoded length in bytes.
    pub const WIRE_LEN: usize = 36;
    const MAGIC: [u8; 4] = *b"FPQP";
    const VERSION: u8 = 1;

    /// Encode (see the module docs for the layout).
    ///
    /// Panics if the value could not have come from a queue pair (qpn or psn wider than 24 bits, MTU not
    /// one of [`MTUS`]): that is a bug in the caller, not a runtime condition.
    pub fn to_bytes(&self) -> [u8; Self::WIRE_LEN] {
        assert!(self.validate().is_ok(), "encoding an invalid QpInfo {self:?}");
        let mut b = [0u8; Self::WIRE_LEN];
        b[0..4].copy_from_slice(&Self::MAGIC);
        b[4] = Self::VERSION;
        b[6..8].copy_from_slice(&self.mtu.to_le_bytes());
        b[8..12].copy_from_slice(&self.qpn.to_le_bytes());
        b[12..16].copy_from_slice(&self.psn.to_le_bytes());
        b[16..18].copy_from_slice(&self.lid.to_le_bytes());
        b[20..36].copy_from_slice(&self.gid);
        b
    }

    /// Decode and validate; any deviation is a `Protocol` error.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = |why: String| Error::new(ErrorKind::Protocol, format!("bad QP info: {why}"));
        if b.len() != Self::WIRE_LEN {
            return Err(bad(format!("{} bytes, expected {}", b.len(), Self::WIRE_LEN)));
        }
        if b[0..4] != Self::MAGIC {
            return Err(bad(format!("magic {:02x?}", &b[0..4])));
        }
        if b[4] != Self::VERSION {
            return Err(bad(format!("version {} (this side speaks {})", b[4], Self::VERSION)));
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[20..36]);
        let info = Self { mtu: u16_at(6), qpn: u32_at(8), psn: u32_at(12), lid: u16_at(16), gid };
        info.validate().map_err(bad)?;
        Ok(info)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if !MTUS.contains(&self.mtu) {
            return Err(format!("MTU {} is not one of {MTUS:?}", self.mtu));
        }
        if self.qpn > MAX_24BIT || self.qpn == 0 {
            return Err(format!("QP number {:#x} is not a 24-bit value above 0", self.qpn));
        }
        if self.psn > MAX_24BIT {
            return Err(format!("PSN {:#x} is wider than 24 bits", self.psn));
        }
        Ok(())
    }

    /// The GID as an IPv6 address (`::ffff:a.b.c.d` for an IPv4 RoCE v2 GID).
    pub fn gid_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.gid)
    }
}

impl fmt::Display for QpInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "qpn {:#x} psn {:#x} gid {} lid {} mtu {}", self.qpn, self.psn, self.gid_addr(), self.lid, self.mtu)
    }
}

/// MTU in bytes -> `enum ibv_mtu` code (1..=5).
#[cfg(test)]
fn mtu_code(mtu: u16) -> Option<u32> {
    MTUS.iter().position(|&m| m == mtu).map(|i| i as u32 + 1)
}

/// `enum ibv_mtu` code -> MTU in bytes.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) fn mtu_bytes(code: u32) -> Option<u16> {
    MTUS.get((code as usize).wrapping_sub(1)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> QpInfo {
        let gid = "::ffff:127.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        QpInfo { qpn: 0x11, psn: 0xabcdef, gid, lid: 0, mtu: 1024 }
    }

    #[test]
    fn round_trip() {
        let q = sample();
        let b = q.to_bytes();
        assert_eq!(b.len(), QpInfo::WIRE_LEN);
        assert_eq!(QpInfo::from_bytes(&b).unwrap(), q);
        for mtu in MTUS {
            let q = QpInfo { mtu, lid: 7, qpn: MAX_24BIT, psn: 0, ..sample() };
            assert_eq!(QpInfo::from_bytes(&q.to_bytes()).unwrap(), q);
        }
        assert_eq!(sample().to_string(), "qpn 0x11 psn 0xabcdef gid ::ffff:127.0.0.1 lid 0 mtu 1024");
    }

    #[test]
    fn rejects_malformed_input_as_protocol_errors() {
        let good = sample().to_bytes();
        let mut cases: Vec<Vec<u8>> = vec![vec![], good[..35].to_vec(), [&good[..], &[0]].concat()];
        let mut m = good;
        m[0] = b'X';
        cases.push(m.to_vec());
        let mut v = good;
        v[4] = 2;
        cases.push(v.to_vec());
        let mut mtu = good;
        mtu[6..8].copy_from_slice(&1500u16.to_le_bytes());
        cases.push(mtu.to_vec());
        let mut qpn = good;
        qpn[8..12].copy_from_slice(&(1u32 << 24).to_le_bytes());
        cases.push(qpn.to_vec());
        let mut zero_qpn = good;
        zero_qpn[8..12].copy_from_slice(&0u32.to_le_bytes());
        cases.push(zero_qpn.to_vec());
        let mut psn = good;
        psn[15] = 1;
        cases.push(psn.to_vec());
        for c in cases {
            let e = QpInfo::from_bytes(&c).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{c:02x?}: {e}");
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        // A cheap deterministic fuzz: every single-byte corruption of a valid encoding either decodes to
        // a valid value or is refused.
        let good = sample().to_bytes();
        for i in 0..good.len() {
            for x in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = good;
                b[i] = x;
                if let Ok(q) = QpInfo::from_bytes(&b) {
                    assert_eq!(QpInfo::from_bytes(&q.to_bytes()).unwrap(), q);
                }
            }
        }
    }

    #[test]
    fn mtu_codes() {
        assert_eq!(mtu_code(256), Some(1));
        assert_eq!(mtu_code(4096), Some(5));
        assert_eq!(mtu_code(1500), None);
        assert_eq!(mtu_bytes(3), Some(1024));
        assert_eq!(mtu_bytes(0), None);
        assert_eq!(mtu_bytes(6), None);
    }
}
