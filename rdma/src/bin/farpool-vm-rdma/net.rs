//! An in-process memory server (pool, one MR per slab, passive endpoints) and its client, exchanging
//! `QpInfo` and the slab table over TCP on 127.0.0.1 (rdma_cm does not work over rxe on lo).
//!
//! Control frames: `u32` little-endian length, then the body (at most `MAX_FRAME` bytes).
//! client -> server: `QpInfo` (36 bytes). server -> client: `QpInfo`, `u32` slab count, then one
//! `RemoteRegion` (20 bytes) per slab (rkey 0 for a revoked slab).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use farpool_core::{Error, ErrorKind, Result};
use farpool_rdma::{Context, Endpoint, EndpointConfig, PoolRegistration, QpInfo, RemoteRegion, SlabMr};

const MAX_FRAME: usize = 64 << 10;

fn io(what: &str, e: std::io::Error) -> Error {
    Error::io(what.to_string(), e)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn send_frame(s: &mut TcpStream, body: &[u8]) -> Result<()> {
    assert!(body.len() <= MAX_FRAME, "control frame of {} bytes", body.len());
    s.write_all(&(body.len() as u32).to_le_bytes()).map_err(|e| io("send frame", e))?;
    s.write_all(body).map_err(|e| io("send frame", e))
}

pub fn recv_frame(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| io("receive frame", e))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(Error::new(ErrorKind::Protocol, format!("control frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| io("receive frame", e))?;
    Ok(body)
}

/// The memory server of the checks.
pub struct Server {
    ctx: Arc<Context>,
    pool: PoolRegistration,
    slab_len: u64,
    slabs: Mutex<Vec<Option<SlabMr>>>,
    endpoints: Mutex<Vec<Endpoint>>,
    addr: SocketAddr,
}

impl Server {
    /// Register a zeroed pool of `nslabs * slab_len` bytes, grant every slab, listen on 127.0.0.1:`port`
    /// (0: any free port).
    pub fn start(ctx: &Arc<Context>, nslabs: usize, slab_len: u64, port: u16) -> Result<Arc<Server>> {
        let mem = vec![0u8; nslabs * slab_len as usize].into_boxed_slice();
        let pool = ctx.register_pool_owned(mem)?;
        let mut slabs = Vec::new();
        for i in 0..nslabs as u64 {
            slabs.push(Some(pool.grant(i * slab_len, slab_len)?));
        }
        let listener = TcpListener::bind(("127.0.0.1", port)).map_err(|e| io("bind 127.0.0.1", e))?;
        let addr = listener.local_addr().map_err(|e| io("local_addr", e))?;
        let server = Arc::new(Server {
            ctx: ctx.clone(),
            pool,
            slab_len,
            slabs: Mutex::new(slabs),
            endpoints: Mutex::new(Vec::new()),
            addr,
        });
        let s = server.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                thread::spawn(move || {
                    if let Err(e) = s.serve(conn)
                        && e.kind() != ErrorKind::Closed
                    {
                        eprintln!("server: connection ended: {e}");
                    }
                });
            }
        });
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pool_len(&self) -> usize {
        self.pool.len()
    }

    /// One client connection: every QpInfo received gets a fresh passive endpoint and an answer.
    fn serve(&self, mut conn: TcpStream) -> Result<()> {
        conn.set_nodelay(true).map_err(|e| io("nodelay", e))?;
        loop {
            let body = recv_frame(&mut conn)?;
            let remote = QpInfo::from_bytes(&body)?;
            let mut ep = Endpoint::new(&self.ctx, EndpointConfig::passive())?;
            ep.connect(&remote)?;
            let mut reply = ep.local_info()?.to_bytes().to_vec();
            let regions = self.regions();
            reply.extend_from_slice(&(regions.len() as u32).to_le_bytes());
            for r in regions {
                reply.extend_from_slice(&r.to_bytes());
            }
            lock(&self.endpoints).push(ep);
            send_frame(&mut conn, &reply)?;
        }
    }

    /// The slab table as clients see it.
    pub fn regions(&self) -> Vec<RemoteRegion> {
        lock(&self.slabs)
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Some(mr) => mr.remote(),
                None => RemoteRegion { addr: self.pool.addr() + i as u64 * self.slab_len, len: self.slab_len, rkey: 0 },
            })
            .collect()
    }

    /// Destroy every passive endpoint (the peers' queue pairs vanish, as when a server dies).
    pub fn drop_endpoints(&self) {
        lock(&self.endpoints).clear();
    }

    /// Deregister slab `i`'s MR: its rkey dies at the NIC.
    pub fn revoke(&self, i: usize) {
        if let Some(mr) = lock(&self.slabs)[i].take() {
            mr.deregister();
        }
    }

    /// Grant slab `i` again (a new MR, a new rkey).
    pub fn regrant(&self, i: usize) -> Result<RemoteRegion> {
        let mr = self.pool.grant(i as u64 * self.slab_len, self.slab_len)?;
        let r = mr.remote();
        lock(&self.slabs)[i] = Some(mr);
        Ok(r)
    }
}

/// A client: one endpoint connected to the server, and the control connection.
pub struct Client {
    pub ep: Endpoint,
    pub regions: Vec<RemoteRegion>,
    stream: TcpStream,
}

impl Client {
    /// The endpoint, and the control connection (keep it open while the endpoint is used).
    pub fn into_endpoint(self) -> (Endpoint, TcpStream) {
        (self.ep, self.stream)
    }
}

/// Send our QpInfo, receive the server's and the slab table.
pub fn exchange(stream: &mut TcpStream, local: &QpInfo) -> Result<(QpInfo, Vec<RemoteRegion>)> {
    send_frame(stream, &local.to_bytes())?;
    let reply = recv_frame(stream)?;
    let bad = || Error::new(ErrorKind::Protocol, format!("server reply of {} bytes", reply.len()));
    if reply.len() < QpInfo::WIRE_LEN + 4 {
        return Err(bad());
    }
    let info = QpInfo::from_bytes(&reply[..QpInfo::WIRE_LEN])?;
    let n = u32::from_le_bytes(reply[36..40].try_into().map_err(|_| bad())?) as usize;
    let rest = &reply[40..];
    if rest.len() != n * RemoteRegion::WIRE_LEN {
        return Err(bad());
    }
    let regions = rest.chunks(RemoteRegion::WIRE_LEN).map(RemoteRegion::from_bytes).collect::<Result<Vec<_>>>()?;
    Ok((info, regions))
}

impl Client {
    pub fn connect(ctx: &Arc<Context>, server: SocketAddr, cfg: EndpointConfig) -> Result<Client> {
        let mut ep = Endpoint::new(ctx, cfg)?;
        let mut stream = TcpStream::connect(server).map_err(|e| io("connect to the server", e))?;
        stream.set_nodelay(true).map_err(|e| io("nodelay", e))?;
        let (info, regions) = exchange(&mut stream, &ep.local_info()?)?;
        ep.connect(&info)?;
        Ok(Client { ep, regions, stream })
    }

    /// Tear down and re-establish the queue pair (refreshes the slab table).
    pub fn reconnect(&mut self) -> Result<()> {
        let stream = &mut self.stream;
        let mut got = Vec::new();
        let mut x = |local: &QpInfo| {
            let (info, regions) = exchange(stream, local)?;
            got = regions;
            Ok(info)
        };
        self.ep.reconnect(&mut x)?;
        self.regions = got;
        Ok(())
    }

    /// A second handle on the control connection, for `RdmaTransport::with_exchange`.
    pub fn exchanger(&self) -> Result<impl FnMut(&QpInfo) -> Result<QpInfo> + Send + 'static> {
        let mut s = self.stream.try_clone().map_err(|e| io("clone control stream", e))?;
        Ok(move |local: &QpInfo| exchange(&mut s, local).map(|(info, _)| info))
    }
}
