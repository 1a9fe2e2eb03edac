//! Plain descriptions of RDMA devices, ports and GIDs, and the pure logic that picks one. Compiled with
//! and without the `rdma` feature, so selection is unit-tested without a device.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use farpool_core::Result;

use crate::error::no_device;

/// Logical state of a port (`enum ibv_port_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortState {
    /// Link down.
    Down,
    /// Link up, not configured by the subnet manager yet.
    Init,
    /// Configured, not active yet.
    Armed,
    /// Usable.
    Active,
    /// Was active, link recovering.
    ActiveDefer,
    /// A value this crate does not know.
    Other(u32),
}

impl PortState {
    /// From the raw `ibv_port_state` value.
    pub fn from_raw(v: u32) -> Self {
        match v {
            1 => Self::Down,
            2 => Self::Init,
            3 => Self::Armed,
            4 => Self::Active,
            5 => Self::ActiveDefer,
            o => Self::Other(o),
        }
    }
}

/// Link layer of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkLayer {
    /// InfiniBand: addressed by LID, GRH optional.
    InfiniBand,
    /// Ethernet (RoCE, Soft-RoCE, iWARP): addressed by GID, GRH required.
    Ethernet,
    /// Not reported (old drivers: treat as InfiniBand).
    Unspecified,
}

impl LinkLayer {
    /// From the raw `IBV_LINK_LAYER_*` value.
    pub fn from_raw(v: u8) -> Self {
        match v {
            1 => Self::InfiniBand,
            2 => Self::Ethernet,
            _ => Self::Unspecified,
        }
    }
}

/// The wire format a GID entry stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GidKind {
    /// InfiniBand, or RoCE v1 on an Ethernet port (sysfs type "IB/RoCE v1").
    IbOrRoceV1,
    /// RoCE v2 (UDP/IP encapsulation, routable; what rxe uses for 127.0.0.1).
    RoceV2,
}

/// One entry of a port's GID table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GidInfo {
    /// Index in the port's table (the `sgid_index` of an address vector).
    pub index: u32,
    /// The GID.
    pub gid: [u8; 16],
    /// Its type.
    pub kind: GidKind,
    /// The network device it belongs to (RoCE), if known.
    pub netdev: Option<String>,
}

impl GidInfo {
    /// As an IPv6 address.
    pub fn addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.gid)
    }

    /// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`).
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.addr().to_ipv4_mapped()
    }

    /// `fe80::/10`.
    pub fn is_link_local(&self) -> bool {
        self.gid[0] == 0xfe && self.gid[1] & 0xc0 == 0x80
    }
}

/// One port of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// Port number (from 1).
    pub port: u8,
    /// Logical state.
    pub state: PortState,
    /// Active MTU in bytes (0 if the driver reported a value outside 256..=4096).
    pub active_mtu: u16,
    /// LID (InfiniBand).
    pub lid: u16,
    /// Link layer.
    pub link_layer: LinkLayer,
    /// Non-zero GID entries.
    pub gids: Vec<GidInfo>,
}

/// One RDMA device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Name (`mlx5_0`, `rxe_lo`).
    pub name: String,
    /// Whether the device executes remote atomics (`atomic_cap` is not `IBV_ATOMIC_NONE`).
    pub atomics: bool,
    /// Largest memory region it registers, in bytes.
    pub max_mr_size: u64,
    /// Its ports.
    pub ports: Vec<PortInfo>,
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (atomics {})", self.name, if self.atomics { "yes" } else { "no" })?;
        for p in &self.ports {
            write!(f, "; port {} {:?} {:?} mtu {} lid {}", p.port, p.state, p.link_layer, p.active_mtu, p.lid)?;
            for g in &p.gids {
                write!(f, " gid[{}]={} {:?}", g.index, g.addr(), g.kind)?;
            }
        }
        Ok(())
    }
}

/// Which device, port and GID to use. Every field defaults to automatic choice.
///
/// ```
/// use farpool_core::ErrorKind;
/// use farpool_rdma::{DeviceSelector, open};
///
/// let sel = DeviceSelector::new().with_device("rxe_lo").with_gid_index(1);
/// match open(&sel) {
///     Ok(ctx) => println!("using {ctx:?}"),
///     // no device, no libibverbs, no kernel support, or built without the `rdma` feature
///     Err(e) => assert_eq!(e.kind(), ErrorKind::Unsupported),
/// }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeviceSelector {
    device: Option<String>,
    port: Option<u8>,
    gid_index: Option<u32>,
}

impl DeviceSelector {
    /// Automatic choice: the first device with an active port, its first active port, and the GID that
    /// [`choose_gid`] prefers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Use the device with this name (default: the first one with an active port).
    #[must_use]
    pub fn with_device(mut self, name: impl Into<String>) -> Self {
        self.device = Some(name.into());
        self
    }

    /// Use this port number, from 1 (default: the first active port).
    #[must_use]
    pub fn with_port(mut self, port: u8) -> Self {
        self.port = Some(port);
        self
    }

    /// Use this GID index (default: see [`choose_gid`]; rxe on `lo` gives 1 = `::ffff:127.0.0.1`).
    #[must_use]
    pub fn with_gid_index(mut self, index: u32) -> Self {
        self.gid_index = Some(index);
        self
    }

    /// The device name asked for, if any.
    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// The port asked for, if any.
    pub fn port(&self) -> Option<u8> {
        self.port
    }

    /// The GID index asked for, if any.
    pub fn gid_index(&self) -> Option<u32> {
        self.gid_index
    }
}

impl std::fmt::Display for DeviceSelector {
    /// `automatic`, or what was asked for: `rxe_lo, port 1, gid index 1`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Self::default() {
            return f.write_str("automatic");
        }
        f.write_str(self.device.as_deref().unwrap_or("first active device"))?;
        if let Some(p) = self.port {
            write!(f, ", port {p}")?;
        }
        if let Some(g) = self.gid_index {
            write!(f, ", gid index {g}")?;
        }
        Ok(())
    }
}

/// What [`select`] chose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Index into the device list.
    pub device: usize,
    /// Port number.
    pub port: u8,
    /// GID index, `None` on an InfiniBand port with an empty GID table (LID addressing).
    pub gid: Option<GidInfo>,
}

/// The GID to use on a port: on Ethernet, a RoCE v2 IPv4-mapped GID first (rxe on `lo`: index 1,
/// `::ffff:127.0.0.1`), then another RoCE v2 GID that is not link-local, then any RoCE v2, then any
/// entry; on InfiniBand, index 0 (the port GID).
pub fn choose_gid(link_layer: LinkLayer, gids: &[GidInfo]) -> Option<&GidInfo> {
    if link_layer != LinkLayer::Ethernet {
        return gids.iter().find(|g| g.index == 0).or_else(|| gids.first());
    }
    let v2 = |g: &&GidInfo| g.kind == GidKind::RoceV2;
    gids.iter()
        .filter(v2)
        .find(|g| g.ipv4().is_some())
        .or_else(|| gids.iter().filter(v2).find(|g| !g.is_link_local()))
        .or_else(|| gids.iter().find(v2))
        .or_else(|| gids.first())
}

/// Pick device, port and GID from what [`crate::discover`] found. Fails with `Unsupported`
/// ("no RDMA device: ...") when nothing usable matches.
pub fn select(devices: &[DeviceInfo], sel: &DeviceSelector) -> Result<Selection> {
    if devices.is_empty() {
        return Err(no_device("the device list is empty"));
    }
    let candidates: Vec<usize> = match &sel.device {
        Some(name) => match devices.iter().position(|d| &d.name == name) {
            Some(i) => vec![i],
            None => {
                let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
                return Err(no_device(format!("no device named {name:?} (found {names:?})")));
            }
        },
        None => (0..devices.len()).collect(),
    };
    let mut why = Vec::new();
    for i in candidates {
        match select_port(&devices[i], sel) {
            Ok((port, gid)) => return Ok(Selection { device: i, port, gid }),
            Err(e) => why.push(e),
        }
    }
    Err(no_device(why.join("; ")))
}

fn select_port(dev: &DeviceInfo, sel: &DeviceSelector) -> std::result::Result<(u8, Option<GidInfo>), String> {
    let port = match sel.port {
        Some(p) => dev.ports.iter().find(|q| q.port == p).ok_or_else(|| format!("{} has no port {p}", dev.name))?,
        None => dev
            .ports
            .iter()
            .find(|p| p.state == PortState::Active)
            .ok_or_else(|| format!("{} has no active port", dev.name))?,
    };
    if port.state != PortState::Active {
        return Err(format!("{} port {} is {:?}, not active", dev.name, port.port, port.state));
    }
    let gid = match sel.gid_index {
        Some(i) => Some(
            port.gids
                .iter()
                .find(|g| g.index == i)
                .cloned()
                .ok_or_else(|| format!("{} port {} has no GID at index {i}", dev.name, port.port))?,
        ),
        None => choose_gid(port.link_layer, &port.gids).cloned(),
    };
    if gid.is_none() && port.link_layer == LinkLayer::Ethernet {
        return Err(format!("{} port {} (Ethernet) has no GID: no IP address on its netdev?", dev.name, port.port));
    }
    Ok((port.port, gid))
}

#[cfg(test)]
mod tests {
    use farpool_core::ErrorKind;

    use super::*;

    fn gid(index: u32, addr: &str, kind: GidKind) -> GidInfo {
        GidInfo { index, gid: addr.parse::<Ipv6Addr>().unwrap().octets(), kind, netdev: Some("lo".into()) }
    }

    /// The GID table of rxe on lo in the test guest.
    fn rxe_lo() -> DeviceInfo {
        DeviceInfo {
            name: "rxe_lo".into(),
            atomics: true,
            max_mr_size: u64::MAX,
            ports: vec![PortInfo {
                port: 1,
                state: PortState::Active,
                active_mtu: 4096,
                lid: 0,
                link_layer: LinkLayer::Ethernet,
                gids: vec![
                    gid(0, "::ffff:127.0.0.1", GidKind::IbOrRoceV1),
                    gid(1, "::ffff:127.0.0.1", GidKind::RoceV2),
                    gid(2, "::1", GidKind::IbOrRoceV1),
                    gid(3, "::1", GidKind::RoceV2),
                ],
            }],
        }
    }

    #[test]
    fn rxe_on_lo_picks_roce_v2_ipv4_gid_index_1() {
        let s = select(&[rxe_lo()], &DeviceSelector::new()).unwrap();
        assert_eq!((s.device, s.port), (0, 1));
        assert_eq!(s.gid.unwrap().index, 1);
    }

    #[test]
    fn gid_preference_order() {
        let g = [gid(0, "fe80::1", GidKind::RoceV2), gid(1, "fd00::5", GidKind::RoceV2)];
        assert_eq!(choose_gid(LinkLayer::Ethernet, &g).unwrap().index, 1);
        let g = [gid(0, "fe80::1", GidKind::IbOrRoceV1), gid(4, "fe80::1", GidKind::RoceV2)];
        assert_eq!(choose_gid(LinkLayer::Ethernet, &g).unwrap().index, 4);
        let ib = [gid(0, "fe80::2", GidKind::IbOrRoceV1)];
        assert_eq!(choose_gid(LinkLayer::InfiniBand, &ib).unwrap().index, 0);
        assert!(choose_gid(LinkLayer::Ethernet, &[]).is_none());
    }

    #[test]
    fn explicit_choices_and_failures_are_unsupported_with_reasons() {
        let mut down = rxe_lo();
        down.name = "mlx5_0".into();
        down.ports[0].state = PortState::Down;
        let devs = [down, rxe_lo()];
        let s = select(&devs, &DeviceSelector::new()).unwrap();
        assert_eq!(s.device, 1, "skips the device whose port is down");
        let s = select(&devs, &DeviceSelector::new().with_device("rxe_lo").with_gid_index(3)).unwrap();
        assert_eq!(s.gid.unwrap().addr(), "::1".parse::<Ipv6Addr>().unwrap());
        for (sel, needle) in [
            (DeviceSelector::new().with_device("mlx5_0"), "no active port"),
            (DeviceSelector::new().with_device("mlx5_0").with_port(1), "is Down, not active"),
            (DeviceSelector::new().with_device("nope"), "no device named \"nope\""),
            (DeviceSelector::new().with_device("rxe_lo").with_port(2), "has no port 2"),
            (DeviceSelector::new().with_device("rxe_lo").with_gid_index(9), "no GID at index 9"),
        ] {
            let e = select(&devs, &sel).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            assert!(e.to_string().contains("no RDMA device: ") && e.to_string().contains(needle), "{e}");
        }
        let e = select(&[], &DeviceSelector::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let mut no_gid = rxe_lo();
        no_gid.ports[0].gids.clear();
        let e = select(&[no_gid], &DeviceSelector::new()).unwrap_err();
        assert!(e.to_string().contains("has no GID"), "{e}");
    }

    #[test]
    fn raw_values() {
        assert_eq!(PortState::from_raw(4), PortState::Active);
        assert_eq!(PortState::from_raw(77), PortState::Other(77));
        assert_eq!(LinkLayer::from_raw(2), LinkLayer::Ethernet);
        assert_eq!(LinkLayer::from_raw(9), LinkLayer::Unspecified);
        assert_eq!(rxe_lo().ports[0].gids[1].ipv4(), Some(Ipv4Addr::LOCALHOST));
        assert!(rxe_lo().to_string().contains("gid[1]=::ffff:127.0.0.1 RoceV2"));
    }
}
