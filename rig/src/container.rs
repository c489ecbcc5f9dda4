//! A Debian tree booted with systemd as PID 1: `systemd-nspawn --boot --register=no
//! --keep-unit`, the tree read-only under a tmpfs overlay (`--volatile=overlay`, so the cached
//! tree is never written), its own network namespace (`--private-network`: loopback only, and
//! CAP_NET_ADMIN inside), `/dev/net/tun` and the host directories given bound in. Commands run
//! inside with `nsenter --all` into the container's init; its files are reached through
//! `/proc/<init>/root`. Stopped (a clean shutdown, then SIGKILL) when dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::{tail, wait_for, Guarded};

pub struct Container {
    nspawn: Guarded,
    /// The container's PID 1, as the host sees it.
    init: u32,
    machine: String,
    log: PathBuf,
    /// How long systemd took to reach `running` (or `degraded`).
    pub boot: Duration,
}

impl Container {
    /// Boots `root` with `binds` (host path, path inside) bound read-write; the console goes
    /// to `log`. Returns once `systemctl is-system-running` says running or degraded.
    pub fn boot(root: &Path, binds: &[(&Path, &str)], log: &Path) -> Result<Container> {
        crate::process::require_root()?;
        let machine = crate::process::unique("rig");
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args(["--boot", "--register=no", "--keep-unit", "--quiet"])
            .arg(format!("--machine={machine}"))
            .arg("--directory")
            .arg(root)
            .args([
                "--volatile=overlay",
                "--private-network",
                "--console=passive",
                "--bind=/dev/net/tun",
            ]);
        for (host, inside) in binds {
            cmd.arg(format!("--bind={}:{inside}", host.display()));
        }
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let t0 = Instant::now();
        let mut nspawn = Guarded::spawn("systemd-nspawn", &mut cmd, libc::SIGTERM)?;
        let pid = nspawn.pid();
        let init = wait_for("the container's init", Duration::from_secs(30), || {
            if let Some(status) = nspawn.try_wait()? {
                bail!("systemd-nspawn exited ({status}):\n{}", tail(log, 30));
            }
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            Ok(children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok()))
        })?;
        let mut container = Container {
            nspawn,
            init,
            machine,
            log: log.to_path_buf(),
            boot: Duration::ZERO,
        };
        let state = wait_for("systemd in the container", Duration::from_secs(120), || {
            if let Some(status) = container.nspawn.try_wait()? {
                bail!("systemd-nspawn exited ({status}):\n{}", tail(log, 30));
            }
            let out = container.exec(&["systemctl", "is-system-running"])?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok(matches!(state.as_str(), "running" | "degraded").then_some(state))
        })?;
        container.boot = t0.elapsed();
        if state == "degraded" {
            let failed = container.sh(&["systemctl", "--failed", "--no-legend", "--plain"])?;
            eprintln!("rig: container {} is degraded: {failed}", container.machine);
        }
        Ok(container)
    }

    /// The container's PID 1 as the host sees it.
    pub fn init_pid(&self) -> u32 {
        self.init
    }

    /// `path` inside the container, as a host path (through `/proc/<init>/root`).
    pub fn path(&self, path: &str) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.init)).join(path.trim_start_matches('/'))
    }

    /// The container's network namespace.
    pub fn netns(&self) -> Result<File> {
        let path = format!("/proc/{}/ns/net", self.init);
        File::open(&path).with_context(|| format!("opening {path}"))
    }

    /// The host's pid of the container's process `pid` (as the container sees it: systemd's
    /// MainPID), from the `NSpid` lines of the processes in the container's pid namespace.
    pub fn host_pid(&self, pid: u32) -> Result<u32> {
        let ns = std::fs::read_link(format!("/proc/{}/ns/pid", self.init))?;
        for entry in std::fs::read_dir("/proc")? {
            let name = entry?.file_name();
            let Some(host) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{host}/ns/pid"))
                .ok()
                .as_ref()
                != Some(&ns)
            {
                continue;
            }
            let status =
                std::fs::read_to_string(format!("/proc/{host}/status")).unwrap_or_default();
            let inner = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|p| p.parse::<u32>().ok());
            if inner == Some(pid) {
                return Ok(host);
            }
        }
        bail!("no process {pid} in container {}", self.machine)
    }

    /// The container's network namespace `name` (its `/run/netns/NAME`, made by `ip netns add`
    /// inside) under a new name in the host's /run/netns, so that host code reaches it by
    /// name (`ip -n`, `nsnet`); removed when the guard drops.
    pub fn share_netns(&self, name: &str) -> Result<SharedNetns> {
        let host = crate::process::unique(&format!("{name}-"));
        let path = PathBuf::from(format!("/run/netns/{host}"));
        std::fs::create_dir_all("/run/netns")?;
        File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let shared = SharedNetns { name: host, path };
        crate::process::run(
            Command::new("mount")
                .arg("--bind")
                .arg(self.path(&format!("/run/netns/{name}")))
                .arg(&shared.path),
        )?;
        Ok(shared)
    }

    /// Runs `args` inside the container (every namespace of its init); its output, whatever
    /// the exit status.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        Command::new("nsenter")
            .args(["--all", "--target", &self.init.to_string(), "--"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("nsenter {args:?}"))
    }

    /// Runs `args` inside the container; its standard output, or an error with both outputs
    /// when it fails.
    pub fn sh(&self, args: &[&str]) -> Result<String> {
        let out = self.exec(args)?;
        if !out.status.success() {
            bail!(
                "in the container: {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The console log so far (last `n` lines).
    pub fn console(&self, n: usize) -> String {
        tail(&self.log, n)
    }

    /// Shuts the container down (SIGTERM to nspawn: systemd powers off), waiting up to 60 s.
    pub fn stop(&mut self) -> Result<()> {
        let (status, killed) = self.nspawn.stop_within(Duration::from_secs(60))?;
        // nspawn leaves its mount propagation directory behind without systemd as PID 1.
        std::fs::remove_dir_all(format!("/run/systemd/nspawn/propagate/{}", self.machine)).ok();
        if killed {
            bail!(
                "the container did not power off within 60 s:\n{}",
                self.console(20)
            );
        }
        if !status.success() {
            bail!("systemd-nspawn exited with {status}:\n{}", self.console(20));
        }
        Ok(())
    }
}

/// A container's network namespace bound into the host's /run/netns ([`Container::share_netns`]).
pub struct SharedNetns {
    name: String,
    path: PathBuf,
}

impl SharedNetns {
    /// Its name in the host's /run/netns.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for SharedNetns {
    fn drop(&mut self) {
        Command::new("umount")
            .arg(&self.path)
            .stderr(Stdio::null())
            .status()
            .ok();
        std::fs::remove_file(&self.path).ok();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("rig: container {}: {e:#}", self.machine);
        }
    }
}
