//! Server side of the shm transport: the per-grant memfd registry and the Unix-socket listener.
//!
//! [`ShmGrants`] owns one memfd-backed [`Region`] per (lease, slab) grant. Invariants:
//! - every [`ShmGrants::create`] makes a *new* memfd; a memfd is never reused for another grant;
//! - [`ShmGrants::revoke`] punches all of the grant's pages out before dropping the server's
//!   reference, so any mapping left in a client reads zeros from then on;
//! - the listener hands out an fd only for a request whose (lease, slab, epoch, token) match a live
//!   grant exactly.
//!
//! [`ShmServer`] runs one accept thread and one thread per connection, at most
//! [`ShmServerOptions::max_conns`]; each connection is bounded by an idle timeout, and dropping the
//! server shuts every open connection down.

use std::collections::HashMap;
use std::io::{IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use farpool_core::{Epoch, Error, ErrorKind, LeaseId, Result, SlabId, Token};
use parking_lot::Mutex;

use super::proto::{self, GrantId, REQ_LEN};
use crate::backing::Backing;
use crate::region::Region;

/// What per-grant memfds are made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantMemory {
    /// A plain memfd (hugetlb when available, else THP).
    Memfd,
    /// A memfd bound to a NUMA node (the `numa:N` pool backing).
    Numa(u32),
}

impl GrantMemory {
    /// The grant memory matching a pool backing: `anon`/`memfd` -> memfd, `numa:N` -> memfd on node N.
    /// A `dax` pool cannot be handed out per grant (an fd of the device reaches all of it): `Unsupported`.
    pub fn for_backing(b: &Backing) -> Result<Self> {
        match b {
            Backing::Numa(n) => Ok(Self::Numa(*n)),
            Backing::Dax(p) => Err(Error::new(
                ErrorKind::Unsupported,
                format!("shm grants cannot isolate tenants on dax:{} (one fd maps the whole device)", p.display()),
            )),
            _ => Ok(Self::Memfd),
        }
    }
}

#[derive(Debug)]
struct Entry {
    epoch: Epoch,
    token: Token,
    region: Arc<Region>,
}

/// The registry of per-grant memfds. See the module docs.
#[derive(Debug)]
pub struct ShmGrants {
    memory: GrantMemory,
    grants: Mutex<HashMap<(LeaseId, SlabId), Entry>>,
}

impl ShmGrants {
    /// An empty registry making grant memory of kind `memory`.
    pub fn new(memory: GrantMemory) -> Arc<Self> {
        Arc::new(Self { memory, grants: Mutex::new(HashMap::new()) })
    }

    /// Create the memfd of a new grant (`len` bytes, rounded up to the page or huge-page size) and
    /// return its region, which the server's TCP path must use for this grant too. An existing entry
    /// for (lease, slab) is revoked first.
    pub fn create(&self, lease: LeaseId, slab: SlabId, epoch: Epoch, token: Token, len: u64) -> Result<Arc<Region>> {
        let len = usize::try_from(len).map_err(|_| Error::new(ErrorKind::Config, "grant length overflows usize"))?;
        let name = format!("farpool-l{lease}-s{slab}-e{epoch}");
        let region = Arc::new(match self.memory {
            GrantMemory::Memfd => Backing::Memfd.map(len, &name)?,
            GrantMemory::Numa(n) => crate::numa::map_bound(n, len, &name)?,
        });
        let old = self.grants.lock().insert((lease, slab), Entry { epoch, token, region: region.clone() });
        if let Some(old) = old {
            punch(&old.region);
        }
        Ok(region)
    }

    /// The region of a live grant (for the server's own data path).
    pub fn region(&self, lease: LeaseId, slab: SlabId) -> Option<Arc<Region>> {
        self.grants.lock().get(&(lease, slab)).map(|e| e.region.clone())
    }

    /// Revoke one grant: punch its pages out, forget it. Returns whether it existed.
    pub fn revoke(&self, lease: LeaseId, slab: SlabId) -> bool {
        let e = self.grants.lock().remove(&(lease, slab));
        e.map(|e| punch(&e.region)).is_some()
    }

    /// Revoke every grant of a lease; returns how many there were.
    pub fn revoke_lease(&self, lease: LeaseId) -> usize {
        let gone: Vec<Entry> = {
            let mut g = self.grants.lock();
            let keys: Vec<_> = g.keys().filter(|k| k.0 == lease).copied().collect();
            keys.iter().filter_map(|k| g.remove(k)).collect()
        };
        gone.iter().for_each(|e| punch(&e.region));
        gone.len()
    }

    /// Live grants.
    pub fn len(&self) -> usize {
        self.grants.lock().len()
    }

    /// Whether there are no live grants.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The region of the grant named by a full credential, or why not.
    fn lookup(&self, id: &GrantId) -> Result<Arc<Region>> {
        let g = self.grants.lock();
        let e = g.get(&(id.lease, id.slab)).ok_or_else(|| {
            Error::new(ErrorKind::Revoked, format!("no shm grant for lease {} slab {}", id.lease, id.slab))
        })?;
        if e.epoch != id.epoch {
            return Err(Error::new(ErrorKind::Revoked, format!("epoch {} is stale (now {})", id.epoch, e.epoch)));
        }
        if e.token != id.token {
            return Err(Error::new(
                ErrorKind::Unauthorized,
                format!("bad token for lease {} slab {}", id.lease, id.slab),
            ));
        }
        Ok(e.region.clone())
    }
}

fn punch(region: &Region) {
    if let Err(e) = region.discard(0, region.len()) {
        tracing::error!("punching out a revoked shm grant failed: {e}");
    }
}

/// Options of the Unix-socket listener.
#[derive(Clone, Debug)]
pub struct ShmServerOptions {
    /// Connections served at once; more are refused with `NoSpace`. Default 256.
    pub max_conns: usize,
    /// A connection idle this long is closed. Default 300 s.
    pub idle_timeout: Duration,
    /// Bound on writing one reply. Default 5 s.
    pub io_timeout: Duration,
}

impl Default for ShmServerOptions {
    fn default() -> Self {
        Self { max_conns: 256, idle_timeout: Duration::from_secs(300), io_timeout: Duration::from_secs(5) }
    }
}

/// Open connections by id, so that dropping the server can shut them down (their threads then end).
type ConnRegistry = Arc<Mutex<HashMap<u64, UnixStream>>>;

/// The Unix-socket listener handing out grant memfds. Stops on drop: no new connections, open ones are
/// shut down, the socket file is removed.
#[derive(Debug)]
pub struct ShmServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: ConnRegistry,
}

impl ShmServer {
    /// Bind `path` (a stale socket file there is replaced) and start serving `grants`.
    pub fn bind(path: &Path, grants: Arc<ShmGrants>, opts: ShmServerOptions) -> Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                return Err(Error::new(ErrorKind::Config, format!("{} exists and is not a socket", path.display())));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(Error::new(ErrorKind::Config, format!("{} is in use by a live server", path.display())));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| Error::new(ErrorKind::Config, format!("cannot bind {}", path.display())).with_source(e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = ConnRegistry::default();
        let (s, c) = (stop.clone(), conns.clone());
        let accept = std::thread::Builder::new()
            .name("farpool-shm-accept".into())
            .spawn(move || accept_loop(&listener, &grants, &opts, &s, &c))
            .map_err(|e| Error::new(ErrorKind::Io, "cannot spawn the shm accept thread").with_source(e))?;
        tracing::info!(path = %path.display(), "shm transport listening");
        Ok(Self { path: path.to_owned(), stop, accept: Some(accept), conns })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ShmServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; it sees the flag and returns. If the socket file is gone the wake-up
        // cannot happen: leave the thread (it ends with the process) rather than block here.
        let woke = UnixStream::connect(&self.path).is_ok();
        if let Some(t) = self.accept.take()
            && woke
        {
            let _ = t.join();
        }
        for (_, c) in self.conns.lock().drain() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: &UnixListener,
    grants: &Arc<ShmGrants>,
    opts: &ShmServerOptions,
    stop: &AtomicBool,
    conns: &ConnRegistry,
) {
    let live = Arc::new(AtomicUsize::new(0));
    for (id, conn) in (0u64..).zip(listener.incoming()) {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        if live.fetch_add(1, Ordering::SeqCst) >= opts.max_conns {
            live.fetch_sub(1, Ordering::SeqCst);
            let none = GrantId { lease: LeaseId(0), slab: SlabId(0), epoch: Epoch(0), token: Token(0) };
            let _ = conn.set_write_timeout(Some(opts.io_timeout));
            let _ = conn.write_all(&proto::encode_rep(Some(ErrorKind::NoSpace), "too many shm connections", &none, 0));
            continue;
        }
        if let Ok(c) = conn.try_clone() {
            conns.lock().insert(id, c);
        }
        let (g, o, l, r) = (grants.clone(), opts.clone(), live.clone(), conns.clone());
        let spawned = std::thread::Builder::new().name("farpool-shm-conn".into()).spawn(move || {
            if let Err(e) = serve_conn(conn, &g, &o) {
                tracing::debug!("shm connection ended: {e}");
            }
            r.lock().remove(&id);
            l.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            conns.lock().remove(&id);
            live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve_conn(mut conn: UnixStream, grants: &ShmGrants, opts: &ShmServerOptions) -> Result<()> {
    conn.set_read_timeout(Some(opts.idle_timeout)).map_err(|e| Error::io("set timeout", e))?;
    conn.set_write_timeout(Some(opts.io_timeout)).map_err(|e| Error::io("set timeout", e))?;
    loop {
        let mut req = [0u8; REQ_LEN];
        match conn.read_exact(&mut req) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(Error::io("reading shm request", e)),
        }
        let id = match proto::decode_req(&req) {
            Ok(id) => id,
            Err(e) => {
                let zero = GrantId { lease: LeaseId(0), slab: SlabId(0), epoch: Epoch(0), token: Token(0) };
                let _ = conn.write_all(&proto::encode_rep(Some(e.kind()), e.message(), &zero, 0));
                return Err(e);
            }
        };
        match grants.lookup(&id) {
            Ok(region) => send_fd(&conn, &id, &region)?,
            Err(e) => {
                tracing::info!(lease = %id.lease, slab = %id.slab, "shm attach refused: {e}");
                conn.write_all(&proto::encode_rep(Some(e.kind()), e.message(), &id, 0))
                    .map_err(|e| Error::io("writing shm reply", e))?;
            }
        }
    }
}

fn send_fd(conn: &UnixStream, id: &GrantId, region: &Region) -> Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fd = region.fd().ok_or_else(|| Error::new(ErrorKind::Internal, "shm grant region has no fd"))?;
    let rep = proto::encode_rep(None, "", id, region.len() as u64);
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(conn.as_raw_fd(), &[IoSlice::new(&rep)], &cmsg, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(|e| Error::io("sending shm grant fd", std::io::Error::from(e)))?;
    if sent < rep.len() {
        // The fd went with the first bytes; the rest is plain data.
        (&*conn).write_all(&rep[sent..]).map_err(|e| Error::io("sending shm reply", e))?;
    }
    Ok(())
}
