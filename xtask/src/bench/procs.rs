//! Processes of one measurement: children whose output lines arrive on a channel (so a command
//! can be sent and its answer awaited), stopped on drop; CPU time from /proc.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rig::process::{tail, Guarded};

/// A child process talking over stdin/stdout lines; stderr goes to a log file. The process
/// itself is the rig's [`Guarded`] (own process group, killed with us, stopped on drop).
pub struct Proc {
    pub name: String,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub log: PathBuf,
    child: Guarded,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let err = std::fs::File::create(log)?;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(err);
        let mut child = Guarded::spawn(name, cmd, libc::SIGTERM)?;
        let (stdin, out) = child.take_stdio();
        let out = out.context("no stdout")?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Proc {
            name: name.to_string(),
            stdin,
            child,
            lines: rx,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{line}").with_context(|| format!("writing to {}", self.name))?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits for an output line satisfying `pred`; other lines are dropped.
    pub fn expect(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            rig::interrupt::check_interrupted()?;
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(l) if pred(&l) => return Ok(l),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        bail!("{} exited ({st}) early: {}", self.name, tail(&self.log, 15));
                    }
                    if Instant::now() >= deadline {
                        bail!(
                            "{}: no expected output within {timeout:?}: {}",
                            self.name,
                            tail(&self.log, 15)
                        );
                    }
                }
            }
        }
    }

    /// Drops the lines read so far.
    pub fn drain(&mut self) {
        while self.lines.try_recv().is_ok() {}
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `quit` on stdin (when `polite`), then SIGTERM, then SIGKILL.
    pub fn stop(&mut self, polite: Option<&str>) {
        if let Some(q) = polite {
            let _ = self.send(q);
            if self.child.wait_timeout(Duration::from_secs(3)).is_ok() {
                return;
            }
        }
        self.stdin = None;
        if let Err(e) = self.child.stop() {
            eprintln!("bench: stopping {}: {e:#}", self.name);
        }
    }
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it are fixed.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (ut, st): (f64, f64) = (f[11].parse()?, f[12].parse()?);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ut + st) / hz)
}

/// Polls `f` every 50 ms until it is true.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        rig::interrupt::check_interrupted()?;
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
