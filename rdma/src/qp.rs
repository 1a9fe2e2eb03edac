//! Completion queues and RC queue pairs: creation (extended verbs API when the provider has it, the
//! legacy one otherwise) and the RESET -> INIT -> RTR -> RTS walk.

use std::sync::Arc;

use farpool_core::{Error, ErrorKind, Result};
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{CreateCompletionQueueWorkCompletionFlags, GenericCompletionQueue};
use sideway::ibverbs::device_context::Mtu;
use sideway::ibverbs::queue_pair::{
    GenericQueuePair, QueuePair, QueuePairAttribute, QueuePairAttributeMask, QueuePairState, SendOperationFlags,
};

use crate::device::Context;
use crate::error::verbs;
use crate::info::LinkLayer;
use crate::qp_info::{MAX_24BIT, QpInfo};

/// Transport parameters of a queue pair (see `EndpointConfig` for meanings and defaults).
#[derive(Clone, Copy, Debug)]
pub(crate) struct QpParams {
    pub max_send_wr: u32,
    pub max_inline: u32,
    pub rd_atomic: u8,
    pub timeout_exp: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    /// Try the extended verbs API (`ibv_create_qp_ex` / `ibv_wr_*`, `ibv_create_cq_ex`) first.
    pub extended: bool,
}

/// A completion queue of `depth` entries: extended (`ibv_create_cq_ex`, polled without copying a
/// `struct ibv_wc`) when the provider supports it.
pub(crate) fn create_cq(ctx: &Context, depth: u32, extended: bool) -> Result<(GenericCompletionQueue, bool)> {
    let mut b = ctx.device_context().create_cq_builder();
    b.setup_cqe(depth).setup_wc_flags(CreateCompletionQueueWorkCompletionFlags::ByteLength);
    if extended {
        match b.build_ex() {
            Ok(cq) => return Ok((GenericCompletionQueue::from(cq), true)),
            Err(ex) => tracing::debug!(error = %ex, "ibv_create_cq_ex unavailable, using ibv_create_cq"),
        }
    }
    let cq = b.build().map_err(|e| verbs(ErrorKind::Io, format!("ibv_create_cq of depth {depth}"), e))?;
    Ok((GenericCompletionQueue::from(cq), false))
}

/// An RC queue pair and what was negotiated at creation.
pub(crate) struct Qp {
    pub qp: GenericQueuePair,
    pub extended: bool,
    pub max_inline: u32,
    pub psn: u32,
}

impl std::fmt::Debug for Qp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qp").field("qpn", &self.qp.qp_number()).field("extended", &self.extended).finish()
    }
}

impl Qp {
    /// Create the queue pair on `cq` and move it to INIT with remote READ/WRITE/atomic access allowed
    /// (the server side of a connection is passive: peers' one-sided ops need these rights on its QP).
    pub fn create(ctx: &Arc<Context>, cq: &GenericCompletionQueue, p: &QpParams) -> Result<Qp> {
        let (qp, extended, asked_inline) = Self::build(ctx, cq, p)?;
        let mut qp = Qp { qp, extended, max_inline: asked_inline, psn: rand::random::<u32>() & MAX_24BIT };
        qp.max_inline = qp.query_inline(asked_inline);
        let mut a = QueuePairAttribute::new();
        a.setup_state(QueuePairState::Init).setup_pkey_index(0).setup_port(ctx.port()).setup_access_flags(
            AccessFlags::LocalWrite | AccessFlags::RemoteRead | AccessFlags::RemoteWrite | AccessFlags::RemoteAtomic,
        );
        qp.qp.modify(&a).map_err(|e| verbs(ErrorKind::Io, "QP RESET -> INIT", e))?;
        Ok(qp)
    }

    fn build(ctx: &Arc<Context>, cq: &GenericCompletionQueue, p: &QpParams) -> Result<(GenericQueuePair, bool, u32)> {
        let mut last = None;
        // Ask for the inline size we want, then smaller ones: providers refuse a QP whose max_inline_data
        // exceeds theirs instead of clamping it.
        for inline in [p.max_inline, p.max_inline.min(64), 0] {
            let mut b = ctx.pd().create_qp_builder();
            b.setup_max_send_wr(p.max_send_wr)
                .setup_max_recv_wr(1)
                .setup_max_send_sge(1)
                .setup_max_recv_sge(1)
                .setup_max_inline_data(inline)
                .setup_send_cq(cq.clone())
                .setup_recv_cq(cq.clone())
                .setup_send_ops_flags(
                    SendOperationFlags::Write
                        | SendOperationFlags::Read
                        | SendOperationFlags::AtomicCompareAndSwap
                        | SendOperationFlags::AtomicFetchAndAdd,
                );
            if p.extended {
                match b.build_ex() {
                    Ok(qp) => return Ok((qp.into(), true, inline)),
                    Err(e) => tracing::debug!(error = %e, inline, "ibv_create_qp_ex failed"),
                }
            }
            match b.build() {
                Ok(qp) => return Ok((qp.into(), false, inline)),
                Err(e) => last = Some(e),
            }
        }
        let e = last.map(|e| verbs(ErrorKind::Io, "ibv_create_qp (RC)", e));
        Err(e.unwrap_or_else(|| Error::new(ErrorKind::Internal, "no QP creation attempt ran")))
    }

    /// What the peer needs to connect to this queue pair.
    pub fn info(&self, ctx: &Context) -> QpInfo {
        QpInfo {
            qpn: self.qp.qp_number(),
            psn: self.psn,
            gid: ctx.gid().map(|g| g.gid).unwrap_or([0; 16]),
            lid: ctx.lid(),
            mtu: ctx.active_mtu(),
        }
    }

    /// INIT -> RTR -> RTS towards `remote`.
    pub fn connect(&mut self, ctx: &Context, p: &QpParams, remote: &QpInfo) -> Result<()> {
        let mtu = match ctx.active_mtu().min(remote.mtu) {
            256 => Mtu::Mtu256,
            512 => Mtu::Mtu512,
            1024 => Mtu::Mtu1024,
            2048 => Mtu::Mtu2048,
            _ => Mtu::Mtu4096,
        };
        let mut ah = AddressHandleAttribute::new();
        ah.setup_port(ctx.port()).setup_dest_lid(remote.lid).setup_service_level(0);
        match ctx.gid() {
            Some(g) => {
                let sgid = u8::try_from(g.index).map_err(|_| {
                    Error::new(ErrorKind::Config, format!("GID index {} does not fit an address vector", g.index))
                })?;
                // hop limit 64: the usual IP TTL; RoCE v2 packets are routed like IP.
                ah.setup_grh_src_gid_index(sgid).setup_grh_dest_gid(&Gid { raw: remote.gid }).setup_grh_hop_limit(64);
            }
            None if ctx.link_layer() == LinkLayer::Ethernet => {
                return Err(Error::new(ErrorKind::Config, "Ethernet port without a source GID"));
            }
            None => {}
        }
        let mut rtr = QueuePairAttribute::new();
        rtr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu)
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(p.rd_atomic)
            .setup_min_rnr_timer(12) // 0.64 ms (IBTA table 45); only SENDs (unused here) meet RNR
            .setup_address_vector(&ah);
        self.qp
            .modify(&rtr)
            .map_err(|e| verbs(ErrorKind::Unreachable, format!("QP INIT -> RTR towards {remote}"), e))?;
        let mut rts = QueuePairAttribute::new();
        rts.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(p.timeout_exp)
            .setup_retry_cnt(p.retry_cnt)
            .setup_rnr_retry(p.rnr_retry)
            .setup_max_read_atomic(p.rd_atomic);
        self.qp.modify(&rts).map_err(|e| verbs(ErrorKind::Io, "QP RTR -> RTS", e))?;
        Ok(())
    }

    /// Move to the error state: every outstanding work request is flushed with a completion.
    pub fn enter_error(&mut self) -> Result<()> {
        let mut a = QueuePairAttribute::new();
        a.setup_state(QueuePairState::Error);
        self.qp.modify(&a).map_err(|e| verbs(ErrorKind::Io, "QP -> ERR", e))
    }

    /// The inline capacity the provider actually granted (`ibv_query_qp`), `asked` if it won't say.
    pub fn query_inline(&self, asked: u32) -> u32 {
        match self.qp.query(QueuePairAttributeMask::Capabilities) {
            Ok((_, init)) => init.max_inline_data(),
            Err(_) => asked,
        }
    }
}
