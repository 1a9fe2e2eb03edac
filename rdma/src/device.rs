//! Device discovery and the opened [`Context`] (device context + protection domain + chosen port/GID).

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use farpool_core::{Error, ErrorKind, Result};
use sideway::ibverbs::address::GidType;
use sideway::ibverbs::device::{DeviceInfo as _, DeviceList};
use sideway::ibverbs::device_context::DeviceContext;
use sideway::ibverbs::protection_domain::ProtectionDomain;

use crate::error::{no_device, verbs};
use crate::info::{DeviceInfo, DeviceSelector, GidInfo, GidKind, LinkLayer, PortInfo, PortState, select};
use crate::qp_info::mtu_bytes;

/// Scan bound for GID tables when `ibv_query_gid_table` is unavailable (rxe reports 1024 entries; the
/// used ones sit at the front).
const GID_SCAN_MAX: u32 = 64;

/// List the RDMA devices with their ports and GIDs. `Unsupported` ("no RDMA device: ...") when
/// libibverbs cannot be loaded, the kernel has no RDMA support, or the list is empty.
pub fn discover() -> Result<Vec<DeviceInfo>> {
    let list = device_list()?;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for dev in &list {
        let name = dev.name();
        match dev.open() {
            Ok(ctx) => out.push(describe(&name, &ctx)?),
            Err(e) => skipped.push(format!("{name}: cannot open ({e}: {})", source_text(&e))),
        }
    }
    if out.is_empty() {
        return Err(no_device(format!("no device could be opened: {}", skipped.join("; "))));
    }
    Ok(out)
}

fn device_list() -> Result<DeviceList> {
    let list = DeviceList::new().map_err(|e| {
        no_device(format!(
            "ibv_get_device_list failed ({}): libibverbs missing or no RDMA support in this kernel",
            source_text(&e)
        ))
    })?;
    if list.is_empty() {
        return Err(no_device(
            "ibv_get_device_list found none (no RDMA NIC, and no Soft-RoCE link: `rdma link add rxe0 type rxe netdev eth0`)",
        ));
    }
    Ok(list)
}

/// The innermost message of an error chain (sideway's top-level messages are generic).
fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(s) = cur.source() {
        cur = s;
    }
    cur.to_string()
}

fn describe(name: &str, ctx: &Arc<DeviceContext>) -> Result<DeviceInfo> {
    let attr = ctx.query_device().map_err(|e| verbs(ErrorKind::Io, format!("ibv_query_device on {name}"), e))?;
    let orig = &attr.attr.orig_attr;
    let mut ports = Vec::new();
    for port in 1..=orig.phys_port_cnt {
        let p =
            ctx.query_port(port).map_err(|e| verbs(ErrorKind::Io, format!("ibv_query_port {name} port {port}"), e))?;
        let a = &p.attr;
        ports.push(PortInfo {
            port,
            state: PortState::from_raw(a.state),
            active_mtu: mtu_bytes(a.active_mtu).unwrap_or(0),
            lid: a.lid,
            link_layer: LinkLayer::from_raw(a.link_layer),
            gids: port_gids(ctx, name, port, a.gid_tbl_len.max(0) as u32),
        });
    }
    Ok(DeviceInfo { name: name.to_string(), atomics: orig.atomic_cap != 0, max_mr_size: orig.max_mr_size, ports })
}

/// The non-zero GIDs of a port: one `ibv_query_gid_table` call when the library has it, else a bounded
/// scan with `ibv_query_gid` + `ibv_query_gid_type` (sysfs reads, slow under emulation).
fn port_gids(ctx: &DeviceContext, name: &str, port: u8, table_len: u32) -> Vec<GidInfo> {
    // sideway's table query unwraps internally on odd driver answers; a panic there must not take the
    // process down, so it is contained and the scan below is used instead.
    let table = catch_unwind(AssertUnwindSafe(|| {
        ctx.query_gid_table().map(|entries| {
            entries
                .iter()
                .filter(|e| e.port_num() == u32::from(port) && !e.gid().is_zero())
                .map(|e| GidInfo {
                    index: e.gid_index(),
                    gid: e.gid().raw,
                    kind: if e.gid_type() == GidType::RoceV2 { GidKind::RoceV2 } else { GidKind::IbOrRoceV1 },
                    netdev: netdev(name, port, e.gid_index()),
                })
                .collect::<Vec<_>>()
        })
    }));
    if let Ok(Ok(gids)) = table {
        return gids;
    }
    (0..table_len.min(GID_SCAN_MAX))
        .filter_map(|index| {
            let gid = ctx.query_gid(port, index).ok()?;
            if gid.is_zero() {
                return None;
            }
            let kind = match ctx.query_gid_type(port, index) {
                Ok(1) => GidKind::RoceV2,
                _ => GidKind::IbOrRoceV1,
            };
            Some(GidInfo { index, gid: gid.raw, kind, netdev: netdev(name, port, index) })
        })
        .collect()
}

fn netdev(name: &str, port: u8, index: u32) -> Option<String> {
    let path = format!("/sys/class/infiniband/{name}/ports/{port}/gid_attrs/ndevs/{index}");
    let s = fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// An opened device: its context, one protection domain (every MR and QP of this crate lives in it, so
/// any endpoint can reach any registration), and the port and GID chosen for connections.
pub struct Context {
    pd: Arc<ProtectionDomain>,
    dev: Arc<DeviceContext>,
    info: DeviceInfo,
    port: u8,
    gid: Option<GidInfo>,
    link_layer: LinkLayer,
    lid: u16,
    active_mtu: u16,
    limits: Limits,
}

/// Device limits this crate sizes things by (from `ibv_query_device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `max_qp_wr`: send queue depth bound.
    pub max_qp_wr: u32,
    /// `max_cqe`: completion queue depth bound.
    pub max_cqe: u32,
    /// `max_qp_rd_atom`: READ/atomic ops a QP may have outstanding as responder.
    pub max_qp_rd_atom: u8,
    /// `max_qp_init_rd_atom`: ... as initiator.
    pub max_qp_init_rd_atom: u8,
    /// `max_mr_size`.
    pub max_mr_size: u64,
    /// `atomic_cap != IBV_ATOMIC_NONE`.
    pub atomics: bool,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.info.name)
            .field("port", &self.port)
            .field("gid", &self.gid.as_ref().map(|g| (g.index, g.addr())))
            .field("mtu", &self.active_mtu)
            .finish()
    }
}

impl Context {
    /// Open the device, port and GID `sel` asks for (see [`DeviceSelector`] for the automatic choice).
    /// `Unsupported` ("no RDMA device: ...") when there is none.
    pub fn open(sel: &DeviceSelector) -> Result<Arc<Context>> {
        let list = device_list()?;
        let infos = discover()?;
        let chosen = select(&infos, sel)?;
        let info = infos[chosen.device].clone();
        let dev = list
            .iter()
            .find(|d| d.name() == info.name)
            .ok_or_else(|| no_device(format!("{} disappeared while opening it", info.name)))?
            .open()
            .map_err(|e| verbs(ErrorKind::Unsupported, format!("no RDMA device: cannot open {}", info.name), e))?;
        let pd = dev.alloc_pd().map_err(|e| verbs(ErrorKind::Io, format!("ibv_alloc_pd on {}", info.name), e))?;
        let a = dev.query_device().map_err(|e| verbs(ErrorKind::Io, "ibv_query_device", e))?;
        let o = &a.attr.orig_attr;
        let limits = Limits {
            max_qp_wr: o.max_qp_wr.max(1) as u32,
            max_cqe: o.max_cqe.max(1) as u32,
            max_qp_rd_atom: o.max_qp_rd_atom.clamp(1, 255) as u8,
            max_qp_init_rd_atom: o.max_qp_init_rd_atom.clamp(1, 255) as u8,
            max_mr_size: o.max_mr_size,
            atomics: o.atomic_cap != 0,
        };
        let port = info.ports.iter().find(|p| p.port == chosen.port).cloned().ok_or_else(|| {
            Error::new(ErrorKind::Internal, format!("selected port {} missing from {}", chosen.port, info.name))
        })?;
        let active_mtu = if port.active_mtu == 0 { 1024 } else { port.active_mtu };
        tracing::info!(
            device = %info.name, port = chosen.port,
            gid = ?chosen.gid.as_ref().map(|g| (g.index, g.addr())), mtu = active_mtu, "RDMA device opened"
        );
        Ok(Arc::new(Context {
            pd,
            dev,
            port: chosen.port,
            gid: chosen.gid,
            link_layer: port.link_layer,
            lid: port.lid,
            active_mtu,
            limits,
            info,
        }))
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// What discovery found about this device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Port used for connections.
    pub fn port(&self) -> u8 {
        self.port
    }

    /// GID used as source address (`None`: InfiniBand LID addressing).
    pub fn gid(&self) -> Option<&GidInfo> {
        self.gid.as_ref()
    }

    /// Link layer of the port.
    pub fn link_layer(&self) -> LinkLayer {
        self.link_layer
    }

    /// LID of the port (InfiniBand).
    pub fn lid(&self) -> u16 {
        self.lid
    }

    /// Active MTU of the port, bytes.
    pub fn active_mtu(&self) -> u16 {
        self.active_mtu
    }

    /// Device limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub(crate) fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    pub(crate) fn device_context(&self) -> &Arc<DeviceContext> {
        &self.dev
    }
}
