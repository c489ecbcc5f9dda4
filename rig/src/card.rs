//! The card: its network namespace with its addresses, and the vhost-card
//! daemon serving it, with what its log says (offered and acked features,
//! per-queue counters).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::Netns;
use crate::process::{stdout, wait_for, Guarded};

pub const TAP: &str = "card0";
pub const CARD4: &str = "10.77.0.1";
pub const GUEST4: &str = "10.77.0.2";
pub const CARD6: &str = "fd77::1";
pub const GUEST6: &str = "fd77::2";
pub const MAC: &str = "52:54:00:12:34:56";

/// Path of the daemon binary (built by [`build`]).
pub fn binary() -> PathBuf {
    crate::daemon::release_binary()
}

/// Builds the release daemon.
pub fn build() -> Result<()> {
    crate::daemon::build(true).map(drop)
}

/// The daemon's feature names and bit numbers, from `vhost-card features`.
pub fn feature_table() -> Result<BTreeMap<String, u32>> {
    let text = stdout(Command::new(binary()).arg("features"))?;
    let mut table = BTreeMap::new();
    for line in text.lines().skip(1) {
        let mut cols = line.split_whitespace();
        let (Some(name), Some(bit)) = (cols.next(), cols.next()) else {
            continue;
        };
        if let Ok(bit) = bit.parse() {
            if !name.starts_with('(') {
                table.insert(name.to_string(), bit);
            }
        }
    }
    if table.is_empty() {
        bail!("`vhost-card features` listed no features:\n{text}");
    }
    Ok(table)
}

#[derive(Clone, Debug)]
pub struct CardConfig {
    pub mtu: u32,
    /// `--disable` list (comma-separated names), empty for the defaults.
    pub disable: String,
    /// `--queues`: queue pairs (1 for the default single pair).
    pub queues: u16,
    /// More daemon arguments (e.g. `--link ip`, `--rx-csum complete`).
    pub args: Vec<String>,
}

/// The card's namespace and daemon. Drop order: daemon, then namespace.
pub struct Card {
    daemon: Option<Guarded>,
    pub ns: Netns,
    pub socket: PathBuf,
    run_dir: PathBuf,
    pub cfg: CardConfig,
    log: PathBuf,
    /// Where in the log the current daemon's lines start.
    log_start: u64,
    pub restarts: u32,
}

impl Card {
    /// Creates the namespace, starts the daemon (logging to `log`), waits
    /// for its socket and tap, and gives the card its addresses.
    pub fn start(cfg: &CardConfig, run_dir: &Path, log: &Path) -> Result<Card> {
        let ns = Netns::new("vhc-")?;
        let mut card = Card {
            daemon: None,
            ns,
            socket: run_dir.join("card.sock"),
            run_dir: run_dir.to_path_buf(),
            cfg: cfg.clone(),
            log: log.to_path_buf(),
            log_start: 0,
            restarts: 0,
        };
        File::create(log).with_context(|| format!("creating {}", log.display()))?;
        card.spawn()?;
        // The card's own addresses, which only exist inside its namespace.
        for args in address_args() {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            card.ns.ip(&args)?;
        }
        Ok(card)
    }

    fn args(&self) -> Vec<String> {
        daemon_args(&self.cfg, &self.socket, self.ns.name(), TAP)
    }

    /// The daemon's command line, for reports.
    pub fn command_line(&self) -> String {
        format!("vhost-card {}", self.args().join(" "))
    }

    fn spawn(&mut self) -> Result<()> {
        self.log_start = std::fs::metadata(&self.log)?.len();
        // The daemon's private directory goes with our run directory, also after a SIGKILL.
        let (socket, ns) = (&self.socket, &self.ns);
        let daemon =
            crate::daemon::spawn(&binary(), &self.args(), &self.log, &self.run_dir, || {
                socket.exists() && ns.has_link(TAP)
            })?;
        self.daemon = Some(daemon);
        Ok(())
    }

    /// SIGKILLs the daemon (a crash, or a firmware update that does not say
    /// goodbye). Returns when it is gone.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let daemon = self.daemon.as_mut().context("no daemon running")?;
        daemon.kill()
    }

    /// Starts the daemon again with the same arguments.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(daemon) = self.daemon.as_mut() {
            if daemon.try_wait()?.is_none() {
                bail!("the daemon is still running");
            }
        }
        self.restarts += 1;
        self.spawn()
    }

    /// Whether the daemon is still running.
    pub fn alive(&mut self) -> Result<bool> {
        match self.daemon.as_mut() {
            Some(daemon) => Ok(daemon.try_wait()?.is_none()),
            None => Ok(false),
        }
    }

    /// Stops the daemon with SIGTERM: a description and whether it went
    /// well (it exited by itself within 5 s).
    pub fn stop(&mut self) -> Result<(String, bool)> {
        let Some(daemon) = self.daemon.as_mut() else {
            return Ok(("not running".into(), false));
        };
        if let Some(status) = daemon.try_wait()? {
            return Ok((format!("had exited ({status})"), false));
        }
        Ok(match daemon.stop()? {
            (status, false) => (format!("stopped on SIGTERM ({status})"), status.success()),
            (status, true) => (format!("ignored SIGTERM for 5 s, killed ({status})"), false),
        })
    }

    /// The file the daemon logs to (processes that take its session over log there too).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The current daemon's log lines.
    pub fn log_lines(&self) -> Result<Vec<String>> {
        let bytes = std::fs::read(&self.log)?;
        let start = usize::try_from(self.log_start)?.min(bytes.len());
        Ok(String::from_utf8_lossy(&bytes[start..])
            .lines()
            .map(String::from)
            .collect())
    }

    /// The feature names of the daemon's "listening on ... features: ..." line.
    pub fn offered_names(&self) -> Result<Vec<String>> {
        let lines = self.log_lines()?;
        let line = lines
            .iter()
            .find(|l| l.contains("listening on"))
            .ok_or_else(|| anyhow!("the daemon logged no \"listening on\" line"))?;
        let list = line
            .split_once("features: ")
            .map(|(_, rest)| rest.trim_end_matches(')'))
            .ok_or_else(|| anyhow!("no feature list in {line:?}"))?;
        Ok(list.split_whitespace().map(String::from).collect())
    }

    /// The offered feature word, from the log line and `vhost-card features`.
    pub fn offered(&self, table: &BTreeMap<String, u32>) -> Result<u64> {
        let mut word = 0;
        for name in self.offered_names()? {
            let bit = table
                .get(&name)
                .ok_or_else(|| anyhow!("`vhost-card features` has no feature {name:?}"))?;
            word |= 1 << bit;
        }
        Ok(word)
    }

    /// The last word of "frontend acked features 0x...", if any yet.
    pub fn acked(&self) -> Result<Option<u64>> {
        Ok(self.log_lines()?.iter().rev().find_map(|l| {
            let rest = l.split_once("frontend acked features 0x")?.1;
            let hex = rest.split(|c: char| !c.is_ascii_hexdigit()).next()?;
            u64::from_str_radix(hex, 16).ok()
        }))
    }

    /// Waits until the current daemon logs that the frontend acked features;
    /// returns the word.
    pub fn wait_acked(&self, timeout: Duration) -> Result<u64> {
        wait_for("the frontend to ack the card's features", timeout, || {
            self.acked()
        })
    }

    /// Queue pair 0's counters from the current daemon's last stats line
    /// (logged every second).
    pub fn stats(&self) -> Result<BTreeMap<String, u64>> {
        self.pair_stats(0)
    }

    /// Queue pair `pair`'s counters from the current daemon's last stats line.
    pub fn pair_stats(&self, pair: usize) -> Result<BTreeMap<String, u64>> {
        let log = self.log_lines()?.join("\n");
        Ok(crate::daemon::last_stats(&log, pair)?.unwrap_or_default())
    }

    /// Waits for the next stats line, so counters include everything so far.
    pub fn fresh_stats(&self) -> Result<BTreeMap<String, u64>> {
        let count = |lines: &[String]| lines.iter().filter(|l| l.contains("stats pair 0:")).count();
        let before = count(&self.log_lines()?);
        let t0 = Instant::now();
        wait_for(
            "a fresh stats line from the daemon",
            Duration::from_secs(5),
            || {
                Ok(
                    (count(&self.log_lines()?) > before || t0.elapsed() > Duration::from_secs(3))
                        .then_some(()),
                )
            },
        )?;
        self.stats()
    }

    /// Pings from the card's namespace with busybox's ping (bounded by -w).
    pub fn ping(&self, args: &[&str]) -> Result<crate::report::Ping> {
        let out = self
            .ns
            .command("busybox")
            .args(["ping", "-W", "5", "-w", "20"])
            .args(args)
            .output()
            .context("running ping in the namespace")?;
        crate::interrupt::check_interrupted()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        Ok(crate::report::Ping::parse(&text))
    }
}

/// The `ip` arguments (after `-n NS`) that give the card's tap [`TAP`] its addresses: [`CARD4`]
/// and [`CARD6`] (no duplicate address detection).
pub fn address_args() -> [Vec<String>; 2] {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect();
    [
        args(&["addr", "add", &format!("{CARD4}/24"), "dev", TAP]),
        args(&["addr", "add", &format!("{CARD6}/64"), "dev", TAP, "nodad"]),
    ]
}

/// The new process's pid and the outage in ms from what `vhost-card upgrade` prints when it
/// succeeds: "vhost-card: process N (PATH) serves the session; outage X ms".
pub fn parse_upgrade(text: &str) -> Result<(u32, f64)> {
    let pid = text
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no pid in {text:?}"))?;
    let ms = text
        .rsplit_once("outage ")
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no outage in {text:?}"))?;
    Ok((pid, ms))
}

/// The daemon's arguments for `cfg`, serving `socket` with tap `tap` in namespace `ns`.
pub fn daemon_args(cfg: &CardConfig, socket: &Path, ns: &str, tap: &str) -> Vec<String> {
    let mut args = vec![
        "--socket".to_string(),
        socket.display().to_string(),
        "--netns".into(),
        ns.into(),
        "--tap".into(),
        tap.into(),
        "--mtu".into(),
        cfg.mtu.to_string(),
        "--stats-interval".into(),
        "1".into(),
    ];
    if !cfg.disable.is_empty() {
        args.push("--disable".into());
        args.push(cfg.disable.clone());
    }
    if cfg.queues > 1 {
        args.push("--queues".into());
        args.push(cfg.queues.to_string());
    }
    args.extend(cfg.args.iter().cloned());
    args
}
