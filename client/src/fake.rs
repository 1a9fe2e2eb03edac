//! A tiny in-process memory server speaking the wire protocol, for the client's unit tests.
//!
//! One thread accepts (non-blocking, polled every few ms until stopped); one thread per connection
//! reads frames and answers them. Memory is a `Vec<u8>` per slab; leases carry a token checked on every
//! op, an expiry and a revoked set, so denial paths can be exercised. Knobs: lease duration, feature
//! bits, "silent" (read requests, never answer), and `kill` (close everything, refuse new connections).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use farpool_core::wire::{self, FEATURE_TCP, FrameReader, HelloOk, LeaseGrant, Msg, OpDone, OpReq, OpResult, WireOp};
use farpool_core::{Credential, Epoch, ErrorKind, LeaseId, ServerId, SlabGrant, SlabId, Token};
use parking_lot::Mutex;

pub(crate) const SLAB_LEN: u64 = 64 * 1024;

struct FakeLease {
    slabs: Vec<u32>,
    token: u64,
    expiry: Instant,
    revoked: HashSet<u32>,
    owner: Arc<Mutex<TcpStream>>,
}

pub(crate) struct Shared {
    pub(crate) lease_ms: AtomicU64,
    pub(crate) features: AtomicU64,
    pub(crate) silent: AtomicBool,
    pub(crate) renews: AtomicU64,
    stop: AtomicBool,
    leases: Mutex<HashMap<u64, FakeLease>>,
    mem: Mutex<HashMap<u32, Vec<u8>>>,
    conns: Mutex<Vec<Arc<Mutex<TcpStream>>>>,
    next: AtomicU64,
}

pub(crate) struct FakeServer {
    pub(crate) addr: SocketAddr,
    pub(crate) shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FakeServer {
    pub(crate) fn start(lease_ms: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            lease_ms: AtomicU64::new(lease_ms),
            features: AtomicU64::new(u64::from(FEATURE_TCP)),
            silent: AtomicBool::new(false),
            renews: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            leases: Mutex::default(),
            mem: Mutex::default(),
            conns: Mutex::default(),
            next: AtomicU64::new(1),
        });
        let addr = listener.local_addr().unwrap();
        let s = shared.clone();
        let accept = std::thread::spawn(move || accept_loop(&listener, &s));
        Self { addr, shared, accept: Some(accept) }
    }

    /// Close every connection and stop accepting: a dead server.
    pub(crate) fn kill(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for c in self.shared.conns.lock().drain(..) {
            let _ = c.lock().shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            t.join().unwrap();
        }
    }

    /// Send a revoke notice for every slab of `lease` now, and revoke them after `grace_ms`.
    pub(crate) fn revoke(&self, lease: LeaseId, grace_ms: u64) {
        let (owner, slabs) = {
            let l = self.shared.leases.lock();
            let fl = l.get(&lease.0).expect("known lease");
            (fl.owner.clone(), fl.slabs.iter().map(|s| SlabId(*s)).collect::<Vec<_>>())
        };
        send(&owner, &Msg::RevokeNotice { lease, slabs: slabs.clone(), grace_ms });
        let shared = self.shared.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(grace_ms));
            if let Some(fl) = shared.leases.lock().get_mut(&lease.0) {
                fl.revoked.extend(slabs.iter().map(|s| s.0));
            }
            send(&owner, &Msg::Revoked { lease, slabs });
        });
    }

    /// Push a frame to every connection.
    pub(crate) fn broadcast(&self, m: &Msg) {
        for c in self.shared.conns.lock().iter() {
            send(c, m);
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn send(conn: &Mutex<TcpStream>, m: &Msg) {
    let mut out = BytesMut::new();
    wire::encode(m, &mut out);
    let _ = conn.lock().write_all(&out);
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                let w = Arc::new(Mutex::new(s.try_clone().unwrap()));
                shared.conns.lock().push(w.clone());
                let shared = shared.clone();
                std::thread::spawn(move || serve(s, &w, &shared));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn serve(mut s: TcpStream, w: &Arc<Mutex<TcpStream>>, shared: &Shared) {
    let mut frames = FrameReader::new();
    while !shared.stop.load(Ordering::SeqCst) {
        let m = match frames.try_next() {
            Ok(Some(m)) => m,
            Ok(None) => match frames.fill(&mut s) {
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Timeout => continue,
                Err(_) => return,
            },
            Err(_) => return,
        };
        if shared.silent.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(reply) = answer(m, w, shared) {
            send(w, &reply);
        }
    }
}

fn answer(m: Msg, w: &Arc<Mutex<TcpStream>>, shared: &Shared) -> Option<Msg> {
    let lease_ms = shared.lease_ms.load(Ordering::SeqCst);
    Some(match m {
        Msg::Hello { .. } => Msg::HelloOk(HelloOk {
            version: wire::VERSION,
            server_id: ServerId(42),
            host_id: "fake-host".into(),
            features: shared.features.load(Ordering::SeqCst) as u32,
            shm_path: String::new(),
            slab_size: SLAB_LEN,
        }),
        Msg::LeaseRequest { req, slabs, .. } => {
            let id = shared.next.fetch_add(1, Ordering::SeqCst);
            let token = id * 7919;
            let cred = Credential { lease: LeaseId(id), epoch: Epoch(1), token: Token(token), rkey: 0, base_addr: 0 };
            let ids: Vec<u32> = (0..slabs).map(|_| shared.next.fetch_add(1, Ordering::SeqCst) as u32).collect();
            let mut mem = shared.mem.lock();
            for s in &ids {
                mem.insert(*s, vec![0; SLAB_LEN as usize]);
            }
            let grants = ids.iter().map(|s| SlabGrant { slab: SlabId(*s), len: SLAB_LEN, cred }).collect();
            let expiry = Instant::now() + Duration::from_millis(lease_ms);
            let fl = FakeLease { slabs: ids, token, expiry, revoked: HashSet::new(), owner: w.clone() };
            shared.leases.lock().insert(id, fl);
            // The fake uses the grant token as the lease secret too.
            Msg::LeaseGranted(LeaseGrant { req, lease: LeaseId(id), expires_in_ms: lease_ms, secret: token, grants })
        }
        Msg::Renew { req, lease, secret } => {
            shared.renews.fetch_add(1, Ordering::SeqCst);
            match shared.leases.lock().get_mut(&lease.0) {
                Some(fl) if fl.expiry > Instant::now() && fl.token == secret => {
                    fl.expiry = Instant::now() + Duration::from_millis(lease_ms);
                    Msg::Renewed { req, lease, expires_in_ms: lease_ms }
                }
                _ => Msg::ErrorReply { req, kind: ErrorKind::Revoked, message: "unknown or expired lease".into() },
            }
        }
        Msg::Release { req, lease, secret } => {
            let mut leases = shared.leases.lock();
            match leases.get(&lease.0) {
                Some(fl) if fl.token == secret => {
                    leases.remove(&lease.0);
                    Msg::Ack { req }
                }
                _ => Msg::ErrorReply { req, kind: ErrorKind::Revoked, message: "unknown lease".into() },
            }
        }
        Msg::Ping { req } => Msg::Pong { req },
        Msg::Admin { req, .. } => {
            let n = shared.leases.lock().len() as u64;
            Msg::AdminReply { req, stats: vec![("leases".into(), n)], text: format!("{n} leases") }
        }
        Msg::Op(op) => Msg::OpDone(execute(op, shared)),
        _ => Msg::ErrorReply { req: 0, kind: ErrorKind::Protocol, message: "unexpected".into() },
    })
}

fn execute(op: OpReq, shared: &Shared) -> OpDone {
    let fail = |kind, msg: &str| OpDone { id: op.id, result: Err((kind, msg.to_owned())) };
    {
        let leases = shared.leases.lock();
        let Some(fl) = leases.get(&op.addr.cred.lease.0) else { return fail(ErrorKind::Revoked, "unknown lease") };
        if fl.token != op.addr.cred.token.0 || !fl.slabs.contains(&op.addr.slab.0) {
            return fail(ErrorKind::Unauthorized, "bad token or slab");
        }
        if fl.expiry <= Instant::now() || fl.revoked.contains(&op.addr.slab.0) {
            return fail(ErrorKind::Revoked, "expired or revoked");
        }
    }
    let mut mem = shared.mem.lock();
    let slab = mem.get_mut(&op.addr.slab.0).expect("granted slab has memory");
    let at = op.addr.offset as usize;
    let len = match &op.op {
        WireOp::Read { len } => *len as usize,
        WireOp::Write { data } => data.len(),
        _ => 8,
    };
    if at + len > slab.len() {
        return fail(ErrorKind::OutOfRange, "out of range");
    }
    let word = |s: &[u8]| u64::from_le_bytes(s[at..at + 8].try_into().unwrap());
    let result = match op.op {
        WireOp::Read { .. } => OpResult::Data(Bytes::copy_from_slice(&slab[at..at + len])),
        WireOp::Write { data } => {
            slab[at..at + len].copy_from_slice(&data);
            OpResult::Done
        }
        WireOp::CompareSwap { expect, new } => {
            let old = word(slab);
            if old == expect {
                slab[at..at + 8].copy_from_slice(&new.to_le_bytes());
            }
            OpResult::Value(old)
        }
        WireOp::FetchAdd { add } => {
            let old = word(slab);
            slab[at..at + 8].copy_from_slice(&old.wrapping_add(add).to_le_bytes());
            OpResult::Value(old)
        }
    };
    OpDone { id: op.id, result: Ok(result) }
}
