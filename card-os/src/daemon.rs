//! The card's daemon (vhost-card) as card-os sees it. card-os starts one only when nothing
//! serves the card's vhost-user socket: under systemd, `vhost-card@<card>.socket` holds that
//! socket (and starts the daemon when the VMM connects), and card-os must never start a second
//! daemon on it. A VDUSE card (`[daemon] vduse = NAME`) is served while /dev/vduse/NAME exists
//! (`vhost-card-vduse@<card>.service`, or a daemon whose crash left the device for its restart).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::error::{Context, Error, Result};
use crate::fail;

use crate::cmd::{cmdline_has, has_link, tail, wait_for};
use crate::config::Config;
use vhost_card::cardfile::Endpoint;

/// Who serves the card's socket (or its VDUSE device).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Server {
    /// Nobody: no listening socket at that path (no VDUSE device of that name).
    Nobody,
    /// The daemon card-os started (its pid).
    Ours { pid: i32 },
    /// Someone else listens (systemd's socket unit, a daemon started by hand) or holds the
    /// VDUSE device.
    Other,
}

/// Whether a Unix stream socket listens at `path` in this network namespace (read from
/// /proc/net/unix, without connecting: a connection would start a socket-activated daemon).
pub fn listening(path: &Path) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = __SO_ACCEPTCON,
    // Type 0001 = SOCK_STREAM.
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[3] == "00010000" && f[4] == "0001" && f[7] == want
    })
}

/// Whether something serves `endpoint`: a listening socket, or an existing VDUSE device.
fn served(endpoint: &Endpoint) -> bool {
    match endpoint {
        Endpoint::Socket(path) => listening(path),
        Endpoint::Vduse(_) => endpoint.path().exists(),
    }
}

fn pid_file(cfg: &Config) -> PathBuf {
    cfg.run_dir.join("vhost-card.pid")
}

/// The daemon card-os started, if it still runs.
pub fn our_pid(cfg: &Config) -> Option<i32> {
    let pid: i32 = fs::read_to_string(pid_file(cfg))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_daemon(pid).then_some(pid)
}

fn is_daemon(pid: i32) -> bool {
    cmdline_has(pid, "vhost-card")
}

pub fn server(cfg: &Config) -> Server {
    match our_pid(cfg) {
        Some(pid) => Server::Ours { pid },
        None if served(&cfg.daemon.endpoint) => Server::Other,
        None => Server::Nobody,
    }
}

/// The daemon program: `[card] daemon`, looked up on PATH.
pub fn program(cfg: &Config) -> Result<PathBuf> {
    crate::prereq::find(&cfg.card.daemon).with_context(|| {
        format!(
            "the card's daemon {:?} is not on PATH ({}): install vhost-card \
             (`cargo xtask dist --install`) or set [card] daemon in {}",
            cfg.card.daemon,
            std::env::var("PATH").unwrap_or_default(),
            cfg.source.display()
        )
    })
}

/// Starts `vhost-card --config FILE` in its own session (it outlives card-os), logging to
/// the run directory, and waits for its tap. Returns its pid.
pub fn start(cfg: &Config) -> Result<i32> {
    let binary = program(cfg)?;
    let log_path = cfg.run_dir.join("vhost-card.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let private = cfg.run_dir.join("daemon");
    fs::create_dir_all(&private)?;
    let mut cmd = Command::new(&binary);
    cmd.arg("--config")
        .arg(&cfg.source)
        .env("RUNTIME_DIRECTORY", &private)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    if let Endpoint::Socket(socket) = &cfg.daemon.endpoint {
        if let Some(dir) = socket.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = i32::try_from(child.id()).map_err(|_| Error::Failed("pid out of range".into()))?;
    fs::write(pid_file(cfg), pid.to_string())?;
    let (ns, dev) = (cfg.netns().to_string(), cfg.tap().to_string());
    let started = wait_for("vhost-card's tap", Duration::from_secs(20), || {
        if let Some(status) = child.try_wait()? {
            fail!(
                "{} --config {} exited ({status}):\n{}",
                binary.display(),
                cfg.source.display(),
                tail(&log_path, 10)
            );
        }
        Ok(has_link(&ns, &dev).then_some(()))
    });
    // Reap it whenever it ends, while we live.
    std::thread::spawn(move || child.wait());
    started?;
    Ok(pid)
}

/// Stops the daemon card-os started (SIGTERM: it removes its socket and its tap).
pub fn stop(cfg: &Config) {
    if let Some(pid) = our_pid(cfg) {
        crate::cmd::stop_process(pid, libc::SIGTERM, 10, is_daemon);
    }
    fs::remove_file(pid_file(cfg)).ok();
}
