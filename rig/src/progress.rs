//! Progress of a long task (`bench`, `soak`, `e2e`, `fuzz`): which step runs, the time spent and
//! an estimate of the time left. On a terminal it is an `indicatif` bar redrawn every second;
//! otherwise (CI logs, a pipe) one plain line when each step starts:
//!
//! ```text
//! e2e: [4/9] restart (3m12s elapsed, about 4m left)
//! ```
//!
//! Steps carry a weight, the seconds they usually take; the estimate is the time left by those
//! weights, scaled by how fast this run has been so far. Result lines (`PASS ...`, tables) go
//! through [`Progress::println`], which prints them above the bar, or plainly without one.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// The state the bar's estimate is drawn from.
struct Steps {
    /// Sum of the weights of the finished steps.
    done: u64,
    /// Weight of the running step and when it started.
    current: Option<(u64, Instant)>,
    /// Sum of all weights.
    total: u64,
    t0: Instant,
}

impl Steps {
    /// Seconds left: the weights not yet done, scaled by this run's pace (elapsed time over
    /// the weight done so far, a running step counting for the part of its weight its time
    /// covers).
    fn left(&self) -> Option<Duration> {
        let elapsed = self.t0.elapsed().as_secs_f64();
        let running = self.current.map_or(0.0, |(w, t)| {
            (t.elapsed().as_secs_f64()).min(w as f64 * 0.95)
        });
        let done = self.done as f64 + running;
        if self.total == 0 || (self.done == 0 && self.current.is_none()) {
            return None;
        }
        // Until a step has finished, the weights alone; then this run's pace.
        let pace = if self.done > 0 && done > 0.0 {
            elapsed / done
        } else {
            1.0
        };
        let left = (self.total as f64 - done).max(0.0) * pace;
        Some(Duration::from_secs_f64(left))
    }
}

/// `1h02m`, `3m12s`, `45s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

pub struct Progress {
    task: String,
    steps: usize,
    step: usize,
    state: Arc<Mutex<Steps>>,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A task of `steps` steps whose weights add up to `total` (seconds, roughly). Draws a bar
    /// when standard output is a terminal.
    pub fn new(task: &str, steps: usize, total: u64) -> Progress {
        let tty = std::io::stdout().is_terminal();
        Progress::with_bar(task, steps, total, tty)
    }

    fn with_bar(task: &str, steps: usize, total: u64, tty: bool) -> Progress {
        let state = Arc::new(Mutex::new(Steps {
            done: 0,
            current: None,
            total,
            t0: Instant::now(),
        }));
        let bar = tty.then(|| {
            let bar = ProgressBar::with_draw_target(
                Some(steps as u64),
                ProgressDrawTarget::stdout_with_hz(4),
            );
            let for_eta = Arc::clone(&state);
            let style = ProgressStyle::with_template(
                "{prefix:.bold} [{pos}/{len}] {wide_msg} {elapsed_precise} {left}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key(
                "left",
                move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let left = for_eta.lock().ok().and_then(|s| s.left());
                    let _ = match left {
                        Some(l) => write!(w, "(about {} left)", human(l)),
                        None => write!(w, ""),
                    };
                },
            );
            bar.set_style(style);
            bar.set_prefix(task.to_string());
            bar.enable_steady_tick(Duration::from_secs(1));
            bar
        });
        Progress {
            task: task.to_string(),
            steps,
            step: 0,
            state,
            bar,
        }
    }

    /// Step `name` starts (the previous one, if any, is done); it usually takes `weight`
    /// seconds.
    pub fn start(&mut self, name: &str, weight: u64) {
        let (elapsed, left) = {
            let Ok(mut s) = self.state.lock() else {
                return;
            };
            if let Some((w, _)) = s.current.take() {
                s.done += w;
            }
            let left = s.left();
            s.current = Some((weight, Instant::now()));
            (s.t0.elapsed(), left)
        };
        self.step += 1;
        match &self.bar {
            Some(bar) => {
                bar.set_position((self.step - 1) as u64);
                bar.set_message(name.to_string());
            }
            None => {
                let left = left.map_or(String::new(), |l| format!(", about {} left", human(l)));
                println!(
                    "{}: [{}/{}] {name} ({} elapsed{left})",
                    self.task,
                    self.step,
                    self.steps,
                    human(elapsed)
                );
            }
        }
    }

    /// Prints `line` (above the bar on a terminal).
    pub fn println(&self, line: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{}", line.as_ref())),
            None => println!("{}", line.as_ref()),
        }
    }

    /// Runs `f` with the bar hidden, for output the caller prints itself.
    pub fn suspend<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    /// Time since the task started.
    pub fn elapsed(&self) -> Duration {
        self.state.lock().map_or(Duration::ZERO, |s| s.t0.elapsed())
    }

    /// The task is over: the bar goes away.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_follows_the_weights_and_the_pace() {
        let s = Steps {
            done: 0,
            current: None,
            total: 100,
            t0: Instant::now(),
        };
        assert_eq!(s.left(), None);
        // 30 of 100 weight done in 60 s: twice as slow as the weights say, 140 s left.
        let s = Steps {
            done: 30,
            current: None,
            total: 100,
            t0: Instant::now() - Duration::from_secs(60),
        };
        let left = s.left().unwrap().as_secs_f64();
        assert!((139.0..=141.0).contains(&left), "{left}");
        assert_eq!(human(Duration::from_secs(3725)), "1h02m");
        assert_eq!(human(Duration::from_secs(192)), "3m12s");
        assert_eq!(human(Duration::from_secs(45)), "45s");
    }

    #[test]
    fn plain_mode_counts_steps() {
        let mut p = Progress::with_bar("t", 2, 10, false);
        p.start("one", 5);
        p.start("two", 5);
        assert_eq!(p.step, 2);
        assert_eq!(p.state.lock().unwrap().done, 5);
        p.println("PASS 1 one");
        p.finish();
    }
}
