//! Baseline 2: Redis, started by the bench on a free 127.0.0.1 port and driven by our own RESP client.
//!
//! Owns: [`RedisServer`] (the `redis-server` child process: `--save "" --appendonly no`, stopped when
//! dropped: SIGTERM, a bounded wait, then SIGKILL) and [`RedisEndpoint`] (one connection issuing GET, SET
//! or INCRBY, pipelined up to the driver's depth).
//!
//! Invariants: waiting for the server to come up is bounded ([`START_TIMEOUT`]), so is waiting for it to
//! exit; every reply is checked (a GET must return exactly SIZE bytes, a SET `+OK`, an INCRBY an integer).

mod resp;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;

pub use resp::{Reply, encode_command, parse_reply};

use crate::driver::Endpoint;
use crate::op::BenchOp;

/// Bytes asked of the socket per read of a Redis connection.
const READ_CHUNK: usize = 256 * 1024;

/// Bound on waiting for `redis-server` to answer PING after spawning it.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for it to exit after SIGTERM, before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// Keys the bench rotates over (`fb:<size>:<i>`), like farpool rotates over slots.
pub const KEYS: usize = 16;

/// Why the Redis baseline cannot run.
#[derive(Debug)]
pub enum Unavailable {
    /// `redis-server` is not on PATH.
    NotFound,
    /// It is there but did not start; the message says why.
    Failed(anyhow::Error),
}

/// Find an executable on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// A running `redis-server` child; killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    addr: SocketAddr,
    version: String,
}

impl RedisServer {
    /// Start `redis-server` on a free 127.0.0.1 port without persistence, and wait until it answers.
    pub fn start() -> std::result::Result<Self, Unavailable> {
        let bin = which("redis-server").ok_or(Unavailable::NotFound)?;
        Self::start_bin(&bin).map_err(Unavailable::Failed)
    }

    fn start_bin(bin: &PathBuf) -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = std::env::temp_dir().join(format!("farbench-redis-{}-{port}.log", std::process::id()));
        let logf = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--protected-mode", "yes", "--logfile", ""])
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut srv = Self { child, addr, version: String::new() };
        if let Err(e) = srv.wait_ready() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            return Err(e.context(format!("redis-server log: {tail}")));
        }
        let _ = std::fs::remove_file(&log);
        srv.version = version_of(bin);
        Ok(srv)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!("redis-server exited at start with {st}");
            }
            if let Ok(r) = self.command(&[b"PING"])
                && r == Reply::Simple("PONG".into())
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("redis-server did not answer PING within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Process id of the child.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `redis-server --version`, e.g. `v=7.0.15`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Run one command on a fresh connection (setup, checks).
    pub fn command(&self, args: &[&[u8]]) -> Result<Reply> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut out = Vec::new();
        encode_command(&mut out, args);
        s.write_all(&out)?;
        let mut buf = BytesMut::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some(r) = parse_reply(&mut buf)? {
                return Ok(r);
            }
            let n = s.read(&mut chunk)?;
            if n == 0 {
                bail!("redis closed the connection");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Store the `KEYS` values of `size` bytes the GET phase reads.
    pub fn populate(&self, size: usize) -> Result<()> {
        let value = vec![b'v'; size];
        for i in 0..KEYS {
            let key = key_name(size, i);
            match self.command(&[b"SET", key.as_bytes(), &value])? {
                Reply::Simple(s) if s == "OK" => {}
                other => bail!("SET {key} answered {other:?}"),
            }
        }
        Ok(())
    }
}

fn version_of(bin: &PathBuf) -> String {
    let out = Command::new(bin).arg("--version").stdin(Stdio::null()).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.split_whitespace().find(|w| w.starts_with("v=")).unwrap_or("v=unknown").to_owned()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn key_name(size: usize, i: usize) -> String {
    format!("fb:{size}:{i}")
}

/// One pipelined connection issuing the Redis equivalent of `op` at `size` bytes.
#[derive(Debug)]
pub struct RedisEndpoint {
    stream: TcpStream,
    commands: Vec<Vec<u8>>,
    next: usize,
    batch: Vec<u8>,
    rbuf: BytesMut,
    expect: Expect,
    read_timeout: Option<Duration>,
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    Bulk(usize),
    Ok,
    Integer,
}

impl RedisEndpoint {
    /// Connect; GET needs [`RedisServer::populate`] first. CAS has no Redis equivalent: an error.
    pub fn connect(addr: SocketAddr, op: BenchOp, size: usize) -> Result<Self> {
        let value = vec![b'w'; size];
        let (commands, expect) = match op {
            BenchOp::Read => (per_key(size, |k, o| encode_command(o, &[b"GET", k])), Expect::Bulk(size)),
            BenchOp::Write => (per_key(size, |k, o| encode_command(o, &[b"SET", k, &value])), Expect::Ok),
            BenchOp::Faa => {
                (per_key(size, |_, o| encode_command(o, &[b"INCRBY", b"fb:counter", b"1"])), Expect::Integer)
            }
            BenchOp::Cas => bail!("Redis has no compare-and-swap command"),
        };
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).context("connecting to redis")?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            commands,
            next: 0,
            batch: Vec::new(),
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            expect,
            read_timeout: None,
        })
    }

    fn check(&self, r: Reply) -> Result<()> {
        match (self.expect, r) {
            (Expect::Bulk(n), Reply::Bulk(Some(b))) if b.len() == n => Ok(()),
            (Expect::Ok, Reply::Simple(s)) if s == "OK" => Ok(()),
            (Expect::Integer, Reply::Integer(_)) => Ok(()),
            (want, got) => bail!("redis answered {got:?}, expected {want:?}"),
        }
    }
}

/// One encoded command per key, built by `make(key, out)`.
fn per_key(size: usize, make: impl Fn(&[u8], &mut Vec<u8>)) -> Vec<Vec<u8>> {
    (0..KEYS)
        .map(|i| {
            let mut out = Vec::new();
            make(key_name(size, i).as_bytes(), &mut out);
            out
        })
        .collect()
}

impl Endpoint for RedisEndpoint {
    fn submit(&mut self, n: usize) -> Result<()> {
        self.batch.clear();
        for _ in 0..n {
            self.batch.extend_from_slice(&self.commands[self.next]);
            self.next = (self.next + 1) % self.commands.len();
        }
        self.stream.write_all(&self.batch).context("redis send")
    }

    fn reap(&mut self, timeout: Duration) -> Result<usize> {
        loop {
            let mut k = 0;
            while let Some(r) = parse_reply(&mut self.rbuf)? {
                self.check(r)?;
                k += 1;
            }
            if k > 0 {
                return Ok(k);
            }
            let read = crate::op::read_some(&self.stream, &mut self.read_timeout, timeout, &mut self.rbuf, READ_CHUNK);
            match read.context("redis receive")? {
                Some(0) => bail!("redis closed the connection"),
                Some(_) => {}
                None => return Ok(0),
            }
        }
    }

    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{PhaseSpec, run_phase};

    /// Needs `redis-server` (Debian package `redis-server`, installed by .ci/run): fails loudly without it.
    fn server() -> RedisServer {
        match RedisServer::start() {
            Ok(s) => s,
            Err(Unavailable::NotFound) => panic!("redis-server not found: apt-get install redis-server"),
            Err(Unavailable::Failed(e)) => panic!("redis-server failed to start: {e:#}"),
        }
    }

    #[test]
    fn get_set_incr_through_the_driver() {
        let srv = server();
        assert!(srv.version().starts_with("v="));
        for size in [8usize, 8192, 1 << 20] {
            srv.populate(size).unwrap();
            for op in [BenchOp::Read, BenchOp::Write] {
                let spec = PhaseSpec::latency(2, 4, 40, Duration::from_secs(10));
                let f = run_phase(&spec, |_| Ok(Box::new(RedisEndpoint::connect(srv.addr(), op, size)?))).unwrap();
                assert_eq!(f.ops, 80, "{op} {size}");
            }
        }
        let spec = PhaseSpec::latency(1, 8, 100, Duration::from_secs(10));
        run_phase(&spec, |_| Ok(Box::new(RedisEndpoint::connect(srv.addr(), BenchOp::Faa, 8)?))).unwrap();
        // warm-up (10) + measured (100) increments, each counted exactly once
        assert_eq!(srv.command(&[b"GET", b"fb:counter"]).unwrap(), Reply::Bulk(Some("110".into())));
        assert!(RedisEndpoint::connect(srv.addr(), BenchOp::Cas, 8).is_err());
    }

    #[test]
    fn a_get_of_the_wrong_size_fails_the_phase() {
        let srv = server();
        srv.populate(64).unwrap();
        // Key names carry the size: the keys of size 65 were never stored, GET answers nil: an error.
        let spec = PhaseSpec::latency(1, 1, 10, Duration::from_secs(5));
        assert!(run_phase(&spec, |_| Ok(Box::new(RedisEndpoint::connect(srv.addr(), BenchOp::Read, 65)?))).is_err());
    }

    #[test]
    fn server_stops_on_drop() {
        let srv = server();
        let addr = srv.addr();
        drop(srv);
        assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err());
    }
}
