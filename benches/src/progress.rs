//! Progress reporting for runs longer than a few seconds.
//!
//! Owns: [`Progress`]. When stdout is a terminal it draws an indicatif bar (on stderr) with the current
//! step; otherwise (CI logs, pipes) it prints one plain line on stderr at most every [`PLAIN_EVERY`],
//! plus one for the last step. Runs expected to take under [`QUIET_BELOW`] show nothing.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Runs expected to be shorter than this show no progress.
pub const QUIET_BELOW: Duration = Duration::from_secs(3);
/// Minimum interval between two plain progress lines.
pub const PLAIN_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug)]
enum Mode {
    Quiet,
    Bar(ProgressBar),
    Plain { last: Instant },
}

/// Step-based progress: `total` steps, each with a label.
#[derive(Debug)]
pub struct Progress {
    mode: Mode,
    total: u64,
    done: u64,
    label: String,
    start: Instant,
}

impl Progress {
    /// Progress over `total` steps expected to take `expected` in all.
    pub fn new(total: u64, expected: Duration) -> Self {
        let mode = if expected < QUIET_BELOW {
            Mode::Quiet
        } else if std::io::stdout().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg}")
                .expect("static template is valid")
                .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            Mode::Bar(bar)
        } else {
            Mode::Plain { last: Instant::now() }
        };
        Self { mode, total, done: 0, label: String::new(), start: Instant::now() }
    }

    /// A step begins.
    pub fn start_step(&mut self, label: impl Into<String>) {
        self.label = label.into();
        if let Mode::Bar(b) = &self.mode {
            b.set_message(self.label.clone());
        }
    }

    /// The current step ended.
    pub fn finish_step(&mut self) {
        self.done = (self.done + 1).min(self.total);
        match &mut self.mode {
            Mode::Quiet => {}
            Mode::Bar(b) => b.set_position(self.done),
            Mode::Plain { last } => {
                if last.elapsed() >= PLAIN_EVERY || self.done == self.total {
                    *last = Instant::now();
                    eprintln!(
                        "farbench: [{}/{}] {:.0}s {} done",
                        self.done,
                        self.total,
                        self.start.elapsed().as_secs_f64(),
                        self.label
                    );
                }
            }
        }
    }

    /// Print a line without garbling the bar.
    pub fn note(&self, msg: &str) {
        match &self.mode {
            Mode::Bar(b) => b.println(msg),
            _ => eprintln!("{msg}"),
        }
    }

    /// Steps completed so far.
    pub fn done(&self) -> u64 {
        self.done
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Mode::Bar(b) = &self.mode {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_steps_and_caps_at_total() {
        let mut p = Progress::new(2, Duration::from_secs(10));
        for i in 0..3 {
            p.start_step(format!("step {i}"));
            p.finish_step();
        }
        assert_eq!(p.done(), 2);
    }
}
