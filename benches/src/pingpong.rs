//! Baseline 1: raw TCP ping-pong on 127.0.0.1, the floor any TCP-based remote memory can reach.
//!
//! Owns: [`EchoServer`], a tiny thread-per-connection server, and [`PingPongEndpoint`], its client.
//! A request is a 16-byte header (`resp_len: u32 LE`, `payload_len: u32 LE`, 8 bytes reserved) followed
//! by `payload_len` bytes; the answer is `resp_len` bytes. A READ of SIZE is a 16-byte request answered
//! by SIZE bytes; a WRITE of SIZE is 16 + SIZE bytes answered by 16; an atomic is 16 + 16 answered by 8.
//!
//! Invariants: lengths above [`MAX_MSG_LEN`] close the connection; the server accepts at most
//! [`MAX_CONNS`] connections at once; every blocking read has a timeout so each thread notices shutdown
//! within [`POLL_MS`]; dropping the server stops and joins the accept thread.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;

use crate::driver::Endpoint;
use crate::op::BenchOp;

/// Bytes asked of the socket per read of a ping-pong connection.
const READ_CHUNK: usize = 256 * 1024;

/// Largest request payload or response the echo server accepts: 1 MiB + 4 KiB.
pub const MAX_MSG_LEN: usize = (1 << 20) + 4096;
/// Connections served at once, at most.
pub const MAX_CONNS: usize = 256;
/// How often blocked server threads check for shutdown, in milliseconds.
pub const POLL_MS: u64 = 200;
const HEADER_LEN: usize = 16;

/// The echo server; stops when dropped.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Bind 127.0.0.1:0 and serve in background threads.
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the ping-pong server")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let accept = std::thread::Builder::new()
            .name("pingpong-accept".into())
            .spawn(move || accept_loop(listener, stop2))
            .context("spawning the ping-pong accept thread")?;
        Ok(Self { addr, stop, accept: Some(accept) })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, stop: Arc<AtomicBool>) {
    let live = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = conn else { continue };
        if live.load(Ordering::SeqCst) >= MAX_CONNS {
            continue; // dropped: the client sees the connection closed
        }
        live.fetch_add(1, Ordering::SeqCst);
        let (stop, live) = (stop.clone(), live.clone());
        let spawned = std::thread::Builder::new().name("pingpong-conn".into()).spawn(move || {
            let _ = serve(stream, &stop);
            live.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            tracing::warn!("ping-pong server could not spawn a connection thread");
        }
    }
}

/// Serve one connection: answer requests in order, flushing when no further request is buffered.
fn serve(stream: TcpStream, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(POLL_MS)))?;
    let mut rd = BufReader::with_capacity(256 * 1024, stream.try_clone()?);
    let mut wr = BufWriter::with_capacity(256 * 1024, stream);
    let response = vec![0x5Au8; MAX_MSG_LEN];
    let mut sink = vec![0u8; 64 * 1024];
    let mut header = [0u8; HEADER_LEN];
    loop {
        if !read_exact_or_stop(&mut rd, &mut header, stop)? {
            return Ok(());
        }
        let resp_len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let mut payload = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        if resp_len > MAX_MSG_LEN || payload > MAX_MSG_LEN {
            return Ok(()); // protocol violation: close
        }
        while payload > 0 {
            let n = payload.min(sink.len());
            if !read_exact_or_stop(&mut rd, &mut sink[..n], stop)? {
                return Ok(());
            }
            payload -= n;
        }
        wr.write_all(&response[..resp_len])?;
        if rd.buffer().is_empty() {
            wr.flush()?;
        }
    }
}

/// Fill `buf`, retrying read timeouts until `stop`; `Ok(false)` on EOF or stop.
fn read_exact_or_stop(rd: &mut BufReader<TcpStream>, buf: &mut [u8], stop: &AtomicBool) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match rd.read(&mut buf[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if stop.load(Ordering::SeqCst) {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Request and response sizes of `op` at `size` bytes: (request payload, response length).
pub fn shape(op: BenchOp, size: usize) -> (usize, usize) {
    match op {
        BenchOp::Read => (0, size),
        BenchOp::Write => (size, HEADER_LEN),
        BenchOp::Cas | BenchOp::Faa => (16, 8),
    }
}

/// A client connection to an [`EchoServer`].
#[derive(Debug)]
pub struct PingPongEndpoint {
    stream: TcpStream,
    request: Vec<u8>,
    batch: Vec<u8>,
    resp_len: usize,
    partial: usize,
    rbuf: BytesMut,
    read_timeout: Option<Duration>,
}

impl PingPongEndpoint {
    /// Connect; each operation will be `op` of `size` bytes.
    pub fn connect(addr: SocketAddr, op: BenchOp, size: usize) -> Result<Self> {
        let (payload, resp_len) = shape(op, size);
        if payload > MAX_MSG_LEN || resp_len > MAX_MSG_LEN || resp_len == 0 {
            bail!("ping-pong size {size} outside 1..={MAX_MSG_LEN}");
        }
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).context("connecting to ping-pong")?;
        stream.set_nodelay(true)?;
        let mut request = Vec::with_capacity(HEADER_LEN + payload);
        request.extend_from_slice(&(resp_len as u32).to_le_bytes());
        request.extend_from_slice(&(payload as u32).to_le_bytes());
        request.extend_from_slice(&[0; 8]);
        request.resize(HEADER_LEN + payload, 0xA5);
        Ok(Self {
            stream,
            request,
            batch: Vec::new(),
            resp_len,
            partial: 0,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            read_timeout: None,
        })
    }
}

impl Endpoint for PingPongEndpoint {
    fn submit(&mut self, n: usize) -> Result<()> {
        if n == 1 {
            return self.stream.write_all(&self.request).context("ping-pong send");
        }
        self.batch.clear();
        for _ in 0..n {
            self.batch.extend_from_slice(&self.request);
        }
        self.stream.write_all(&self.batch).context("ping-pong send")
    }

    fn reap(&mut self, timeout: Duration) -> Result<usize> {
        loop {
            self.rbuf.clear(); // only the byte count matters
            let read = crate::op::read_some(&self.stream, &mut self.read_timeout, timeout, &mut self.rbuf, READ_CHUNK);
            let n = match read.context("ping-pong receive")? {
                Some(0) => bail!("ping-pong server closed the connection"),
                Some(n) => n,
                None => return Ok(0),
            };
            self.partial += n;
            let k = self.partial / self.resp_len;
            self.partial %= self.resp_len;
            if k > 0 {
                return Ok(k);
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

    #[test]
    fn read_and_write_round_trips_of_every_size() {
        let srv = EchoServer::start().unwrap();
        for op in [BenchOp::Read, BenchOp::Write, BenchOp::Faa] {
            for size in [8usize, 8192, 1 << 20] {
                let spec = PhaseSpec::latency(1, 1, 20, Duration::from_secs(5));
                let f = run_phase(&spec, |_| Ok(Box::new(PingPongEndpoint::connect(srv.addr(), op, size)?))).unwrap();
                assert_eq!(f.ops, 20, "{op:?} {size}");
            }
        }
    }

    #[test]
    fn pipelined_connections() {
        let srv = EchoServer::start().unwrap();
        let spec = PhaseSpec::latency(4, 16, 500, Duration::from_secs(5));
        let f =
            run_phase(&spec, |_| Ok(Box::new(PingPongEndpoint::connect(srv.addr(), BenchOp::Read, 8192)?))).unwrap();
        assert_eq!(f.ops, 2000);
    }

    /// Six connections from two threads that wait in poll(2): every operation completes, both refills.
    #[test]
    fn multiplexed_connections() {
        use crate::driver::Refill;
        let srv = EchoServer::start().unwrap();
        for refill in [Refill::Batch, Refill::Window] {
            let spec = PhaseSpec::latency(6, 16, 300, Duration::from_secs(10)).with_threads(2).with_refill(refill);
            let f = run_phase(&spec, |_| Ok(Box::new(PingPongEndpoint::connect(srv.addr(), BenchOp::Read, 8192)?)))
                .unwrap();
            assert_eq!(f.ops, 1800, "{refill:?}");
        }
    }

    #[test]
    fn oversized_request_closes_only_that_connection() {
        let srv = EchoServer::start().unwrap();
        let mut bad = TcpStream::connect(srv.addr()).unwrap();
        bad.write_all(&[0xFF; 16]).unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(bad.read(&mut b).unwrap_or(0), 0, "server must close a connection that asks too much");
        let mut good = PingPongEndpoint::connect(srv.addr(), BenchOp::Read, 64).unwrap();
        good.submit(1).unwrap();
        assert_eq!(good.reap(Duration::from_secs(2)).unwrap(), 1);
    }
}
