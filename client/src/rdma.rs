//! The RDMA transport inside the client (feature `rdma` of this crate, which enables `farpool-rdma/rdma`).
//!
//! Owns: the process's opened RDMA device (opened once, on first use, with automatic selection: the
//! first active port and its RoCE v2 GID), the per-server [`GrantBook`] of RDMA grants (rkey -> slab
//! length, fed by the pool as leases come and go), and the data endpoint: an `RdmaTransport` whose
//! queue pair is exchanged with the server over a TCP connection of its own (`Hello`, then
//! `RdmaConnect { info }` -> `RdmaAccepted { info }`). The server keeps its side of the queue pair for
//! as long as that connection lives, so dropping the endpoint tears both sides down; after a queue-pair
//! error the transport reconnects at its next `post` by sending another `RdmaConnect` on it.
//!
//! Invariants: every wait is bounded (connect timeout for TCP, op timeout for the exchange and for each
//! operation); an access beyond a known grant fails with `OutOfRange` before it reaches the NIC (a NIC
//! access error would cost the queue pair), so a NIC rejection of an in-bounds access means `Revoked`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use farpool_core::{Result, SlabGrant, Transport};
use parking_lot::Mutex;

use farpool_rdma::DeviceSelector;

use crate::config::PoolConfig;

/// The RDMA grants of one server's leases, shared by the pool and that server's RDMA endpoints.
#[derive(Debug, Default)]
pub(crate) struct GrantBook {
    generation: AtomicU64,
    grants: Mutex<HashMap<u32, SlabGrant>>,
}

impl GrantBook {
    /// Record the grants of a lease taken for rdma (those with an rkey).
    pub(crate) fn add(&self, grants: &[SlabGrant]) {
        let mut m = self.grants.lock();
        for g in grants.iter().filter(|g| g.cred.rkey != 0) {
            m.insert(g.cred.rkey, *g);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Forget grants (revoked, released, lost).
    pub(crate) fn remove(&self, grants: &[SlabGrant]) {
        let mut m = self.grants.lock();
        let before = m.len();
        for g in grants {
            if m.get(&g.cred.rkey).is_some_and(|x| x.slab == g.slab && x.cred.epoch == g.cred.epoch) {
                m.remove(&g.cred.rkey);
            }
        }
        if m.len() != before {
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    #[inline]
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    fn snapshot(&self) -> HashMap<u32, SlabGrant> {
        self.grants.lock().clone()
    }
}

/// Why this process cannot use RDMA with the device `sel` selects, or `None` when it opened.
pub(crate) fn unavailable(sel: &DeviceSelector) -> Option<String> {
    imp::device(sel).err()
}

/// The opened device `sel` selects (once per process), or why it cannot open.
#[cfg(feature = "rdma")]
pub(crate) use imp::device;

/// The client's RDMA data transport (the `RdmaTransport` and the server's grant book).
#[cfg(feature = "rdma")]
pub(crate) use imp::RdmaLink;
/// Without the `rdma` feature no RDMA link is ever made ([`connect`] fails).
#[cfg(not(feature = "rdma"))]
pub(crate) type RdmaLink = dyn Transport;

/// Connect an RDMA data endpoint, on the device `cfg.rdma` selects, to the server at `addr`.
pub(crate) fn connect(addr: &str, cfg: &PoolConfig, book: Arc<GrantBook>) -> Result<Box<RdmaLink>> {
    imp::connect(addr, cfg, book)
}

#[cfg(feature = "rdma")]
mod imp {
    use std::io::Write;
    use std::net::TcpStream;
    use std::sync::OnceLock;
    use std::time::Duration;

    use bytes::{Bytes, BytesMut};
    use farpool_core::tcp::{client_handshake, connect_bounded};
    use farpool_core::wire::MAX_OP_LEN;
    use farpool_core::wire::{self, FrameReader, Msg};
    use farpool_core::{Completion, Error, ErrorKind, OpOutput, RemoteAddr, TransportKind, WorkRequest};
    use farpool_rdma::{Context, Endpoint, EndpointConfig, QpExchange, QpInfo, RdmaTransport, Registration, Remote};

    use super::*;

    /// Frames other than the answer (e.g. a `Goodbye`) skipped while waiting for `RdmaAccepted`.
    const SKIP_FRAMES_MAX: usize = 16;

    /// Opened devices (or why not), one per distinct selection, for the life of the process.
    type Opened = HashMap<DeviceSelector, std::result::Result<Arc<Context>, String>>;

    /// The device `sel` selects, opened once per process (a failure is remembered too: discovery
    /// does not change while a process runs, and `auto` negotiation asks on every connect).
    pub(crate) fn device(sel: &DeviceSelector) -> std::result::Result<Arc<Context>, String> {
        static DEVICES: OnceLock<Mutex<Opened>> = OnceLock::new();
        let mut opened = DEVICES.get_or_init(Default::default).lock();
        opened
            .entry(sel.clone())
            .or_insert_with(|| {
                let r = Context::open(sel).map_err(|e| e.to_string());
                match &r {
                    Ok(c) => tracing::info!(
                        device = c.name(), port = c.port(), gid_index = ?c.gid().map(|g| g.index), selection = %sel,
                        "rdma device opened"
                    ),
                    Err(e) => tracing::info!(selection = %sel, "rdma unavailable in this client: {e}"),
                }
                r
            })
            .clone()
    }

    /// The queue-pair exchange over the endpoint's own TCP connection.
    struct TcpExchange {
        stream: TcpStream,
        reader: FrameReader,
        timeout: Duration,
        next_req: u64,
    }

    impl QpExchange for TcpExchange {
        fn exchange(&mut self, local: &QpInfo) -> Result<QpInfo> {
            self.next_req += 1;
            let req = self.next_req;
            let mut out = BytesMut::new();
            wire::encode(&Msg::RdmaConnect { req, info: Bytes::copy_from_slice(&local.to_bytes()) }, &mut out);
            self.stream.set_write_timeout(Some(self.timeout)).map_err(|e| Error::io("set timeout", e))?;
            self.stream.set_read_timeout(Some(self.timeout)).map_err(|e| Error::io("set timeout", e))?;
            self.stream.write_all(&out).map_err(|e| Error::io("sending RdmaConnect", e))?;
            for _ in 0..SKIP_FRAMES_MAX {
                match self.reader.next(&mut self.stream)? {
                    Msg::RdmaAccepted { req: r, info } if r == req => return QpInfo::from_bytes(&info),
                    Msg::ErrorReply { req: r, kind, message } if r == req || r == 0 => {
                        return Err(Error::new(kind, format!("server refused the rdma connection: {message}")));
                    }
                    other => tracing::debug!("rdma exchange skipping {other:?}"),
                }
            }
            Err(Error::new(ErrorKind::Protocol, "no RdmaAccepted among the server's frames"))
        }
    }

    pub(crate) fn connect(addr: &str, cfg: &PoolConfig, book: Arc<GrantBook>) -> Result<Box<RdmaLink>> {
        let (name, connect_timeout, op_timeout, inflight_max) =
            (&cfg.name, cfg.connect_timeout, cfg.op_timeout, cfg.inflight_max);
        let ctx = device(&cfg.rdma).map_err(|why| Error::new(ErrorKind::Unsupported, why))?;
        let mut stream = connect_bounded(addr, connect_timeout)?;
        let mut reader = FrameReader::new();
        client_handshake(&mut stream, &mut reader, name, connect_timeout)?;
        let inflight_max = inflight_max.min(ctx.limits().max_qp_wr as usize).max(1);
        let cfg = EndpointConfig::new()
            .with_inflight_max(inflight_max)
            .with_op_timeout(op_timeout)
            .with_extended_verbs(cfg.rdma_extended_verbs);
        let mut ep = Endpoint::new(&ctx, cfg)?;
        let mut x = TcpExchange { stream, reader, timeout: op_timeout.max(connect_timeout), next_req: 0 };
        let remote = x.exchange(&ep.local_info()?)?;
        ep.connect(&remote)?;
        tracing::debug!(server = addr, remote = %remote, "rdma endpoint connected");
        let t = RdmaTransport::new(ep).with_exchange(Box::new(x));
        Ok(Box::new(RdmaLink { t, book, seen: u64::MAX, known: HashMap::new() }))
    }

    /// `RdmaTransport` plus the server's grant book, synced into the transport before each post.
    pub(crate) struct RdmaLink {
        t: RdmaTransport,
        book: Arc<GrantBook>,
        seen: u64,
        known: HashMap<u32, SlabGrant>,
    }

    impl RdmaLink {
        /// A READ of `buf.len()` bytes at `offset` of grant `g` into `buf`, registered as `reg`, with
        /// `check` run while it is in flight (see `RdmaTransport::read_registered_checked`). The lease
        /// has checked the range against `g`, so a READ that goes zero-copy in one operation skips the
        /// transport's own grant lookup (`RdmaTransport::read_at_checked`).
        #[inline]
        pub(crate) fn read_checked(
            &mut self,
            g: &SlabGrant,
            offset: u64,
            buf: &mut [u8],
            reg: &Arc<Registration>,
            check: impl FnMut() -> Result<()>,
        ) -> Result<()> {
            if buf.len() <= MAX_OP_LEN as usize
                && g.cred.rkey != 0
                && Arc::ptr_eq(reg.context(), self.t.endpoint().context())
                && let Some(addr) = g.cred.base_addr.checked_add(offset)
            {
                return self.t.read_at_checked(Remote { addr, rkey: g.cred.rkey }, buf, reg, check);
            }
            self.sync();
            self.t.read_registered_checked(RemoteAddr::in_grant(g, offset), buf, reg, check)
        }

        /// Bring the transport's grants up to the book's (a generation compare when nothing changed).
        #[inline]
        fn sync(&mut self) {
            let generation = self.book.generation();
            if generation != self.seen {
                self.sync_from(generation);
            }
        }

        #[cold]
        fn sync_from(&mut self, generation: u64) {
            let now = self.book.snapshot();
            for (rkey, g) in &self.known {
                if now.get(rkey) != Some(g) {
                    self.t.remove_grant(g);
                }
            }
            for g in now.values() {
                self.t.add_grant(g);
            }
            self.known = now;
            self.seen = generation;
        }
    }

    impl Transport for RdmaLink {
        fn kind(&self) -> TransportKind {
            TransportKind::Rdma
        }
        fn post(&mut self, batch: &mut Vec<WorkRequest>) -> Result<usize> {
            self.sync();
            self.t.post(batch)
        }
        fn poll(&mut self, out: &mut Vec<Completion>, max: usize, timeout: Duration) -> Result<usize> {
            self.t.poll(out, max, timeout)
        }
        fn inflight(&self) -> usize {
            self.t.inflight()
        }
        fn inflight_max(&self) -> usize {
            self.t.inflight_max()
        }
        fn op_timeout(&self) -> Duration {
            self.t.op_timeout()
        }
        // The blocking calls go to the transport's own (its depth-1 path when nothing is in flight),
        // not to the trait's defaults, which would batch them through `execute`.
        fn run_one(&mut self, wr: WorkRequest) -> Result<OpOutput> {
            self.sync();
            self.t.run_one(wr)
        }
        fn read(&mut self, addr: RemoteAddr, buf: &mut [u8]) -> Result<()> {
            self.sync();
            self.t.read(addr, buf)
        }
        fn write(&mut self, addr: RemoteAddr, data: &[u8]) -> Result<()> {
            self.sync();
            self.t.write(addr, data)
        }
        fn read_registered(&mut self, addr: RemoteAddr, buf: &mut [u8], reg: &dyn std::any::Any) -> Result<()> {
            self.sync();
            self.t.read_registered(addr, buf, reg)
        }
        fn write_registered(&mut self, addr: RemoteAddr, data: &[u8], reg: &dyn std::any::Any) -> Result<()> {
            self.sync();
            self.t.write_registered(addr, data, reg)
        }
    }
}

#[cfg(not(feature = "rdma"))]
mod imp {
    use farpool_core::{Error, ErrorKind};

    use super::*;

    const NOT_BUILT: &str = "no RDMA device: the farpool client was built without the `rdma` feature";

    pub(super) fn device(_sel: &DeviceSelector) -> std::result::Result<(), String> {
        Err(NOT_BUILT.to_owned())
    }

    pub(super) fn connect(_addr: &str, _cfg: &PoolConfig, _book: Arc<GrantBook>) -> Result<Box<dyn Transport>> {
        Err(Error::new(ErrorKind::Unsupported, NOT_BUILT))
    }
}

#[cfg(test)]
mod tests {
    use farpool_core::{Credential, Epoch, LeaseId, SlabId, Token};

    use super::*;

    fn grant(slab: u32, rkey: u32) -> SlabGrant {
        let cred = Credential { lease: LeaseId(1), epoch: Epoch(1), token: Token(1), rkey, base_addr: 4096 };
        SlabGrant { slab: SlabId(slab), len: 1 << 20, cred }
    }

    #[test]
    fn the_book_tracks_rdma_grants_and_bumps_its_generation() {
        let b = GrantBook::default();
        let g0 = b.generation();
        b.add(&[grant(0, 7), grant(1, 0)]);
        assert_eq!(b.snapshot().len(), 1, "a grant without an rkey is not an rdma grant");
        assert!(b.generation() > g0);
        let g1 = b.generation();
        b.remove(&[grant(3, 7)]);
        assert_eq!((b.snapshot().len(), b.generation()), (1, g1), "another slab with a reused rkey stays");
        b.remove(&[grant(0, 7)]);
        assert!(b.snapshot().is_empty() && b.generation() > g1);
    }

    /// Against a real memory server on a host without RDMA: forced rdma is an `Unsupported` error
    /// naming the reason, never a fallback; auto moves on and says why.
    #[test]
    fn forced_rdma_without_a_device_fails_and_auto_moves_on() {
        if unavailable(&DeviceSelector::new()).is_none() {
            println!("SKIPPED: an RDMA device is present; the no-device path is not reachable");
            return;
        }
        let cfg = farpool_memserver::ServerConfig::default()
            .with_listen("127.0.0.1:0".parse().unwrap())
            .with_capacity_bytes(4 << 20)
            .with_slab_size_bytes(1 << 20)
            .with_workers(1)
            .with_shm(false);
        let server = farpool_memserver::Server::start(cfg).unwrap();
        let addr = server.local_addr().to_string();
        let e = crate::PoolBuilder::new([addr.as_str()])
            .with_transport(crate::TransportChoice::Rdma)
            .build()
            .expect_err("forced rdma without a device must fail");
        assert_eq!(e.kind(), farpool_core::ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("forced") && e.to_string().contains("rdma"), "{e}");
        let pool = crate::PoolBuilder::new([addr.as_str()]).build().unwrap();
        let n = pool.transport_of(0).unwrap();
        assert_eq!(n.kind, farpool_core::TransportKind::Tcp);
        assert!(n.reason.contains("no rdma: this client has no RDMA transport or device"), "{}", n.reason);
    }

    #[test]
    fn without_a_device_rdma_is_unavailable_with_a_reason() {
        match unavailable(&DeviceSelector::new()) {
            Some(why) => {
                assert!(why.contains("no RDMA device"), "{why}");
                let cfg = crate::PoolBuilder::default().with_connect_timeout_ms(50).with_op_timeout_ms(50);
                let e = connect("127.0.0.1:1", cfg.validate().unwrap(), Arc::default())
                    .err()
                    .expect("no device: connect fails");
                assert_eq!(e.kind(), farpool_core::ErrorKind::Unsupported);
            }
            None => println!("SKIPPED: an RDMA device is present; the no-device path is not reachable"),
        }
    }

    /// A device asked for by a name that does not exist is unavailable, whatever else the host has,
    /// and the reason says so (on a host with devices, it names the one asked for and those found).
    #[test]
    fn a_device_named_but_absent_is_unavailable() {
        let sel = DeviceSelector::new().with_device("farpool-no-such-device");
        let why = unavailable(&sel).expect("a device that does not exist cannot open");
        assert!(why.contains("no RDMA device"), "{why}");
        if unavailable(&DeviceSelector::new()).is_none() {
            assert!(why.contains("farpool-no-such-device"), "{why}");
        }
        assert_eq!(unavailable(&sel), Some(why), "the outcome is remembered per selection");
    }
}
