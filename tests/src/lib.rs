//! Helpers for the integration tests: run real `farpool-memserver` processes on ephemeral ports.
//!
//! Owns: [`MemServer`], a child process started with `--listen 127.0.0.1:0` whose address is read
//! from its output (a `listening on ADDR` line on stdout, or the `farpool-memserver listening
//! addr=ADDR` log line on stderr), killed when dropped; plus small bounded-wait utilities.
//!
//! The binary is the one cargo built next to the running test (`target/<profile>/farpool-memserver`,
//! built by `cargo test --workspace`/`nextest --workspace`); when it is missing or older than the
//! sources of memserver/core/cxl/rdma (as with `cargo test -p farpool-tests`), `cargo build -p
//! farpool-memserver` is run once per test process, bounded in time.
//!
//! Invariants: every wait here is bounded; a server that does not come up within
//! [`STARTUP_TIMEOUT`] is an error that carries its last output lines; a child never outlives its
//! [`MemServer`].
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use crossbeam_channel::{RecvTimeoutError, Sender, bounded};
use farpool::{Pool, PoolBuilder};

/// How long a server may take to print its address.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long building the server binary may take when it is missing.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// Output lines kept per server for diagnostics.
const LOG_LINES_KEPT: usize = 200;

static BINARY: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();

/// The `farpool-memserver` binary of the running test's profile, built if missing.
pub fn memserver_binary() -> Result<PathBuf> {
    BINARY.get_or_init(|| locate_or_build().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!(e))
}

fn locate_or_build() -> Result<PathBuf> {
    // target/<profile>/deps/<test binary> -> target/<profile>/farpool-memserver
    let exe = std::env::current_exe().context("current_exe")?;
    let profile_dir = exe.parent().and_then(|d| d.parent()).context("test binary has no profile directory")?;
    let bin = profile_dir.join("farpool-memserver");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let sources = ["memserver", "core", "cxl", "rdma"].iter().filter_map(|c| newest_mtime(&root.join(c), 0)).max();
    match (built, sources) {
        (Some(b), Some(s)) if b >= s => return Ok(bin),
        (Some(_), None) => return Ok(bin),
        _ => {}
    }
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root).args(["build", "-p", "farpool-memserver", "--bin", "farpool-memserver"]);
    if release {
        cmd.arg("--release");
    }
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().context("running cargo build")?;
    let status = wait_child(&mut child, BUILD_TIMEOUT)?.context("cargo build of farpool-memserver timed out")?;
    if !status.success() || !bin.is_file() {
        bail!("cargo build of farpool-memserver failed ({status}); expected {}", bin.display());
    }
    Ok(bin)
}

/// Newest modification time of a crate's sources: Cargo.toml and src/ (without src/bin), at most 6 levels deep.
fn newest_mtime(dir: &std::path::Path, depth: usize) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let t = if path.is_dir() {
            // Other binaries (src/bin) are not part of the server.
            if depth >= 6 || (depth == 0 && name != "src") || (depth == 1 && name == "bin") {
                continue;
            }
            newest_mtime(&path, depth + 1)
        } else if depth > 0 || name == "Cargo.toml" {
            entry.metadata().and_then(|m| m.modified()).ok()
        } else {
            None
        };
        newest = newest.max(t);
    }
    newest
}

/// Wait for a child up to `timeout`; `None` if it is still running (it is then killed).
fn wait_child(child: &mut Child, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(None)
}

/// A running `farpool-memserver` child process. Killed (SIGKILL) and reaped on drop.
///
/// Unless its flags choose otherwise (`--shm-socket`, `--no-shm`), its shm socket lives in a directory
/// of its own, removed on drop: a server killed with SIGKILL cannot remove its socket, and the default
/// path (`/tmp/farpool-<port>.sock`) would leave one behind per killed server.
#[derive(Debug)]
pub struct MemServer {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
    /// Dropped after `child` (field order): the directory goes once the server is dead.
    _sock_dir: Option<tempfile::TempDir>,
}

fn parse_addr(line: &str) -> Option<SocketAddr> {
    if let Some(rest) = line.split("listening on ").nth(1) {
        return rest.split_whitespace().next()?.parse().ok();
    }
    if line.contains("listening") {
        let rest = line.split("addr=").nth(1)?;
        return rest.split_whitespace().next()?.trim_matches('"').parse().ok();
    }
    None
}

fn pump(
    stream: impl Read + Send + 'static,
    tag: &'static str,
    log: Arc<Mutex<VecDeque<String>>>,
    found: Sender<SocketAddr>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Some(a) = parse_addr(&line) {
                let _ = found.try_send(a);
            }
            let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
            if l.len() == LOG_LINES_KEPT {
                l.pop_front();
            }
            l.push_back(format!("[{tag}] {line}"));
        }
    });
}

impl MemServer {
    /// Start a server on an ephemeral port with a small pool (`--capacity 64MiB --slab-size 1MiB
    /// --log info`) and `extra` flags; a flag given in `extra` replaces its default.
    pub fn start(extra: &[&str]) -> Result<Self> {
        let defaults =
            [("--listen", "127.0.0.1:0"), ("--capacity", "64MiB"), ("--slab-size", "1MiB"), ("--log", "info")];
        let mut args: Vec<&str> = Vec::new();
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(extra);
        Self::start_raw(&args)
    }

    /// Start a server with exactly these flags (must include `--listen 127.0.0.1:0` or a port).
    pub fn start_raw(args: &[&str]) -> Result<Self> {
        let bin = memserver_binary()?;
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let sock_dir = if args.iter().any(|a| a == "--shm-socket" || a == "--no-shm") {
            None
        } else {
            let dir =
                tempfile::Builder::new().prefix("farpool-test-").tempdir().context("creating a socket directory")?;
            args.extend(["--shm-socket".to_string(), dir.path().join("shm.sock").to_string_lossy().into_owned()]);
            Some(dir)
        };
        let mut child = Command::new(&bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = bounded(2);
        pump(child.stdout.take().context("stdout")?, "out", log.clone(), tx.clone());
        pump(child.stderr.take().context("stderr")?, "err", log.clone(), tx);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let addr = loop {
            if let Ok(a) = rx.recv_timeout(Duration::from_millis(50)) {
                break a;
            }
            if let Some(status) = child.try_wait()? {
                let s = Self::render(&log);
                bail!("farpool-memserver exited ({status}) before listening:\n{s}");
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "farpool-memserver did not report its address within {STARTUP_TIMEOUT:?}:\n{}",
                    Self::render(&log)
                );
            }
        };
        Ok(Self { child, addr, log, _sock_dir: sock_dir })
    }

    fn render(log: &Mutex<VecDeque<String>>) -> String {
        let l = log.lock().unwrap_or_else(|e| e.into_inner());
        l.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its last output lines (stdout and stderr), for failure messages.
    pub fn output(&self) -> String {
        Self::render(&self.log)
    }

    /// A pool builder for this server with short, test-friendly bounds (connect 1 s, ops 2 s), forcing
    /// the TCP transport: these tests check what the server does with each operation (a hung server,
    /// connection counts), which shm bypasses by design. shm has its own suites in memserver/tests/shm_*.rs;
    /// use [`MemServer::pool_builder_auto`] for negotiation.
    pub fn pool_builder(&self) -> PoolBuilder {
        self.pool_builder_auto().with_transport(farpool::TransportChoice::Tcp)
    }

    /// Like [`MemServer::pool_builder`] but with the default `auto` transport negotiation.
    pub fn pool_builder_auto(&self) -> PoolBuilder {
        PoolBuilder::new([self.addr]).with_connect_timeout_ms(1000).with_op_timeout_ms(2000)
    }

    /// A pool for this server with [`MemServer::pool_builder`]'s settings.
    pub fn pool(&self) -> Result<Pool> {
        Ok(self.pool_builder().build()?)
    }

    /// Resident set size of the server process in bytes (from `/proc/PID/status`).
    pub fn rss_bytes(&self) -> Result<u64> {
        rss_bytes_of(self.pid())
    }

    /// SIGKILL the process and reap it.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill().context("SIGKILL")?;
        self.child.wait().context("reaping")?;
        Ok(())
    }

    /// Send SIGTERM and wait (bounded) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("SIGTERM")?;
        wait_child(&mut self.child, timeout)?
            .ok_or_else(|| anyhow!("server did not exit within {timeout:?} of SIGTERM"))
    }
}

impl Drop for MemServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// VmRSS of a process, in bytes.
pub fn rss_bytes_of(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS line")?;
    let kib: u64 = line.split_whitespace().nth(1).context("VmRSS value")?.parse()?;
    Ok(kib * 1024)
}

/// Raise this process's soft open-file limit to at least `want` (up to the hard limit); returns the
/// new soft limit. Children spawned afterwards inherit it.
pub fn raise_nofile(want: u64) -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= want {
        return Ok(soft);
    }
    let new = want.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, new, hard)?;
    Ok(new)
}

/// Run `f` on a thread and wait at most `timeout` for it: `Err` if it did not finish (the thread is
/// left to end on its own) or panicked.
pub fn within<T: Send + 'static>(timeout: Duration, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (tx, rx) = bounded(1);
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(timeout) {
        Ok(v) => {
            let _ = t.join();
            Ok(v)
        }
        Err(RecvTimeoutError::Disconnected) => bail!("the task panicked"),
        Err(RecvTimeoutError::Timeout) => bail!("the task did not finish within {timeout:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_address_announcements() {
        assert_eq!(parse_addr("listening on 127.0.0.1:4242"), Some("127.0.0.1:4242".parse().unwrap()));
        let log = "2025-01-01T00:00:00Z  INFO farpool_memserver::server: farpool-memserver listening \
                   addr=127.0.0.1:5151 server_id=9";
        assert_eq!(parse_addr(log), Some("127.0.0.1:5151".parse().unwrap()));
        assert_eq!(parse_addr("addr=127.0.0.1:1 connection accepted"), None);
    }

    #[test]
    fn within_bounds_a_hang() {
        assert_eq!(within(Duration::from_secs(1), || 7).unwrap(), 7);
        let e = within(Duration::from_millis(50), || std::thread::sleep(Duration::from_millis(500))).unwrap_err();
        assert!(e.to_string().contains("did not finish"));
    }
}
