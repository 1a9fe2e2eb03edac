//! CPU time consumed by a server under test, read from /proc (Linux), to report server CPU per operation.
//!
//! Owns: [`CpuSource`] and [`CpuSource::seconds`]. The embedded farpool server's I/O threads are found by
//! name in `/proc/self/task/*/comm` (`farpool-io-*`); Redis is a child process read by pid. Resolution is
//! one clock tick (`sysconf(_SC_CLK_TCK)`, 10 ms on Debian kernels): figures are only meaningful over
//! phases of hundreds of milliseconds. Where /proc is unreadable the figure is absent, never zero.

use std::path::Path;

/// Whose CPU time to read.
#[derive(Clone, Debug)]
pub enum CpuSource {
    /// Threads of this process whose name starts with the prefix.
    Threads(&'static str),
    /// A whole process.
    Process(u32),
}

/// Prefix of the embedded memory server's I/O worker threads.
pub const FARPOOL_IO_THREADS: &str = "farpool-io";

fn clock_ticks_per_s() -> Option<f64> {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => Some(t as f64),
        _ => None,
    }
}

/// utime + stime, in clock ticks, of a `/proc/.../stat` file.
fn stat_ticks(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command name start at field 3 (state); utime and stime are fields 14 and 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

impl CpuSource {
    /// CPU seconds (user + system) consumed so far, or `None` when /proc does not tell.
    pub fn seconds(&self) -> Option<f64> {
        let ticks = match self {
            Self::Process(pid) => stat_ticks(&Path::new("/proc").join(pid.to_string()).join("stat"))?,
            Self::Threads(prefix) => {
                let mut sum = 0;
                let mut found = false;
                for e in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
                    let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                    if comm.trim_end().starts_with(prefix) {
                        sum += stat_ticks(&e.path().join("stat")).unwrap_or(0);
                        found = true;
                    }
                }
                if !found {
                    return None;
                }
                sum
            }
        };
        Some(ticks as f64 / clock_ticks_per_s()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cpu_of_named_threads_and_processes() {
        // Spin until the thread has *used* 150 ms of CPU (not 150 ms of wall time: on a loaded machine
        // a thread may get a small share of a core), bounded by 20 s of wall time.
        let (tx, rx) = std::sync::mpsc::channel();
        let spin = std::thread::Builder::new()
            .name("cpu-test-spin".into())
            .spawn(move || {
                let t = std::time::Instant::now();
                let mut x = 0u64;
                while t.elapsed() < std::time::Duration::from_secs(20) {
                    for _ in 0..1_000_000 {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                    if CpuSource::Threads("cpu-test-spin").seconds().unwrap_or(0.0) >= 0.15 {
                        break;
                    }
                }
                tx.send(()).unwrap();
                // Stay alive (idle) long enough for the reading below.
                std::thread::sleep(std::time::Duration::from_millis(500));
                x
            })
            .unwrap();
        rx.recv().unwrap();
        let s = CpuSource::Threads("cpu-test-spin").seconds().expect("thread found");
        assert!(s >= 0.1, "a thread that spun 300 ms shows {s} s");
        spin.join().unwrap();
        assert!(CpuSource::Threads("no-such-thread-name").seconds().is_none());
        assert!(CpuSource::Process(std::process::id()).seconds().unwrap() >= s);
    }
}
