//! The real `vhost-card` binary: built once per test process, started with its stderr in a file,
//! stopped with SIGTERM, killed on drop. Its counters come from the `stats pair 0: ...` lines it
//! logs every second (`--stats-interval 1`) and the `final stats pair 0: ...` line at exit.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use rig::process::Guarded;

use crate::TempDir;

/// Path of the daemon binary: `$VHOST_CARD_BIN`, or `<target>/debug/vhost-card` built once
/// (the rig's one `cargo build`).
pub fn binary() -> Result<PathBuf> {
    rig::daemon::test_binary()
}

/// Counters of queue pair 0 from one stats line. Counters the daemon leaves out are zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters(pub BTreeMap<String, u64>);

impl Counters {
    /// Parses the part after `pair 0:` (`tx_frames=3 tx_bytes=120` or `idle`).
    /// Checks the names of counters read from a stats line.
    fn checked(map: BTreeMap<String, u64>) -> Result<Self> {
        for name in map.keys() {
            check_name(name)?;
        }
        Ok(Counters(map))
    }

    /// The value of a counter; panics on a name the daemon does not have, so a typo cannot make
    /// an assertion on "0" pass.
    pub fn get(&self, name: &str) -> u64 {
        if let Err(e) = check_name(name) {
            panic!("{e}");
        }
        self.0.get(name).copied().unwrap_or(0)
    }
}

fn check_name(name: &str) -> Result<()> {
    let known = vhost_card::stats::PairStats::default().snapshot();
    if known.iter().any(|(n, _)| *n == name) {
        Ok(())
    } else {
        bail!("the daemon has no counter '{name}'")
    }
}

/// A running daemon.
pub struct Daemon {
    child: Option<Guarded>,
    log: PathBuf,
    socket: PathBuf,
    // Last: removed after the child is gone.
    _dir: TempDir,
}

impl Daemon {
    /// Starts `vhost-card --socket <tmp>/s.sock --netns <ns> --tap card0 --stats-interval 1
    /// <extra>` and waits until it listens (its tap exists by then).
    pub fn start(netns: &str, extra: &[&str]) -> Result<Daemon> {
        Self::start_via(&[], Some(netns), extra)
    }

    /// Like [`Daemon::start`], through `wrapper` (a program and its arguments that ends by
    /// running the rest of its command line, e.g. `ip netns exec NS setpriv --reuid U ...`),
    /// without `--netns` when `netns` is `None`. With a wrapper the daemon may run as another
    /// user: its directory is open to all and it runs a copy of the binary in it.
    pub fn start_via(wrapper: &[&str], netns: Option<&str>, extra: &[&str]) -> Result<Daemon> {
        let dir = TempDir::new("card-tests")?;
        let socket = dir.path().join("s.sock");
        let log = dir.path().join("daemon.log");
        let bin = if wrapper.is_empty() {
            binary()?
        } else {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
            binary_in(dir.path())?
        };
        let mut args: Vec<&OsStr> = vec!["--socket".as_ref(), socket.as_os_str()];
        if let Some(ns) = netns {
            args.extend::<[&OsStr; 2]>(["--netns".as_ref(), ns.as_ref()]);
        }
        for a in ["--tap", "card0", "--stats-interval", "1"]
            .iter()
            .chain(extra)
        {
            args.push(a.as_ref());
        }
        let cmd = rig::daemon::command_via(wrapper, &bin, &args, &log, dir.path())?;
        Self::spawn(cmd, socket, dir)
    }

    /// Starts `cmd` (from `rig::daemon::command_via`, logging to `dir/daemon.log`), a daemon
    /// serving `socket`, and waits until it listens.
    pub fn spawn(mut cmd: std::process::Command, socket: PathBuf, dir: TempDir) -> Result<Daemon> {
        let log = dir.path().join("daemon.log");
        let child = Guarded::spawn("vhost-card", &mut cmd, libc::SIGTERM)?;
        let mut d = Daemon {
            child: Some(child),
            log,
            socket,
            _dir: dir,
        };
        d.wait_log("listening on", Duration::from_secs(10))?;
        Ok(d)
    }

    /// SIGKILL (a crash), then reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("daemon already stopped")?;
        child.kill()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Result<u32> {
        Ok(self.child.as_ref().context("daemon already stopped")?.pid())
    }

    /// CPU seconds (user + system) the daemon has used.
    pub fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()?))?;
        let after = stat.rsplit_once(')').context("odd stat")?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime) are the 12th and 13th after the ')'.
        ensure!(f.len() > 12, "short stat: {stat}");
        let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(ticks / hz)
    }

    /// Resident memory of the daemon in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib_of(self.pid()?)
    }

    /// Waits for the daemon to exit on its own; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("daemon already stopped")?;
        match child.wait_timeout(timeout) {
            Ok(status) => {
                self.child = None;
                Ok(status)
            }
            Err(e) => bail!("{e:#}; log:\n{}", self.log()),
        }
    }

    /// The file the daemon logs to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the daemon has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let child = self.child.as_mut().context("daemon already stopped")?;
        if let Some(status) = child.try_wait()? {
            bail!("vhost-card exited ({status}); log:\n{}", self.log());
        }
        Ok(())
    }

    /// Waits until the log contains `needle` (counting from the start of the log).
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_log_count(needle, 1, timeout)
    }

    /// Waits until the log contains `needle` at least `count` times.
    pub fn wait_log_count(&mut self, needle: &str, count: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= count {
                return Ok(());
            }
            self.check_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "vhost-card did not log '{needle}' {count} time(s) within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Counters from the last stats line logged (all zero before the first one).
    pub fn counters(&self) -> Result<Counters> {
        last_counters(&self.log())
    }

    /// Waits (up to `timeout`) for a stats line whose counters satisfy `pred`; returns them.
    pub fn wait_counters(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Counters) -> bool,
    ) -> Result<Counters> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.counters()?;
            if pred(&c) {
                return Ok(c);
            }
            self.check_running()?;
            if Instant::now() >= deadline {
                bail!("counters never showed {what} within {timeout:?}; last: {c:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits for the exit; returns the status and the final counters.
    pub fn stop(&mut self) -> Result<(ExitStatus, Counters)> {
        let mut child = self.child.take().context("daemon already stopped")?;
        let (status, killed) = child.stop_within(Duration::from_secs(10))?;
        if killed {
            bail!("vhost-card ignored SIGTERM for 10 s; log:\n{}", self.log());
        }
        let log = self.log();
        if !log.contains("final stats pair 0:") {
            bail!("no final stats line; log:\n{log}");
        }
        Ok((status, last_counters(&log)?))
    }
}

/// Resident memory of process `pid` in KiB.
pub fn rss_kib_of(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// Counters of the last `stats pair 0:` line (periodic or final) in a log.
pub fn last_counters(log: &str) -> Result<Counters> {
    Counters::checked(rig::daemon::last_stats(log, 0)?.unwrap_or_default())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
        }
        // Shown by the test runner only when the test fails.
        eprintln!(
            "---- vhost-card log ----\n{}------------------------",
            self.log()
        );
    }
}

/// A copy of the daemon binary in `dir` (once), for a daemon run as another user who may not
/// reach the build directory.
pub fn binary_in(dir: &Path) -> Result<PathBuf> {
    let copy = dir.join("vhost-card");
    if !copy.exists() {
        // By cp, not by this process: a writable descriptor of ours would be inherited by the
        // children other test threads fork meanwhile, and exec would fail with ETXTBSY.
        rig::process::sh(
            "cp",
            &[&binary()?.to_string_lossy(), &copy.to_string_lossy()],
        )?;
    }
    Ok(copy)
}

/// `vhost-card stats --control PATH <extra>`: what it prints.
pub fn stats_cmd(control: &Path, extra: &[&str]) -> Result<String> {
    rig::daemon::stats(&binary()?, control, extra)
}

/// Runs the daemon with `args` (no defaults added) and expects it to exit by itself within
/// `timeout`; returns its status and stderr. A daemon still running is killed and reported.
pub fn run_to_exit(args: &[&str], timeout: Duration) -> Result<(ExitStatus, String)> {
    let dir = TempDir::new("card-tests")?;
    let log = dir.path().join("stderr");
    let mut cmd = rig::daemon::command(&binary()?, args, &log, dir.path())?;
    let mut child = Guarded::spawn("vhost-card", &mut cmd, libc::SIGTERM)?;
    match child.wait_timeout(timeout) {
        Ok(status) => Ok((status, std::fs::read_to_string(&log)?)),
        Err(_) => {
            child.kill().ok();
            bail!(
                "vhost-card {} kept running for {timeout:?} instead of exiting; log:\n{}",
                args.join(" "),
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        }
    }
}
