//! `vhost-card upgrade --control PATH [--binary PATH]`: makes a newly installed binary take the
//! running daemon's session over without the frontend noticing (`docs/handover.md`). Asks the
//! daemon on its control socket, starts the new binary (this one, or `--binary`) with the
//! command line after `--` (or the daemon's own, if it is as confined) and the connection, and
//! waits for it to serve.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use thiserror::Error;

use crate::handover::steps::{Offer, Step, CONNECTION_ENV, REQUEST, STATUS_ENV};

#[derive(Debug, Error)]
pub enum UpgradeError {
    #[error("cannot reach the daemon at {path}: {cause}")]
    Connect { path: PathBuf, cause: io::Error },
    #[error("the daemon at {0} sent no snapshot (is it a vhost-card control socket?)")]
    NoSnapshot(PathBuf),
    #[error("the daemon at {path} (vhost-card {version}) cannot hand its session over: it predates live handover; restart it instead (the frontend reconnects)")]
    TooOld { path: PathBuf, version: String },
    #[error("the daemon cannot hand its session over: {0}")]
    Unavailable(String),
    #[error("the command line the daemon reports would start a less confined process ({0}); give the new process's command line after `--` (the unit's ExecStart= arguments)")]
    Unconfined(String),
    #[error("cannot start {binary}: {cause}")]
    Spawn { binary: PathBuf, cause: io::Error },
    #[error("refused, the old process keeps serving: {0}")]
    Refused(String),
    #[error("the new process ({binary}) {how} before serving; the old process keeps serving unless it had already let the session go (see its log)")]
    Died { binary: PathBuf, how: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The new process serves.
#[derive(Debug)]
pub struct Upgraded {
    pub pid: u32,
    pub outage: Duration,
    pub binary: PathBuf,
}

/// A duplicate of `fd` that a started program inherits (no close-on-exec).
fn inheritable(fd: &impl AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: dup of a descriptor we hold; the new one (without FD_CLOEXEC) is ours.
    let n = unsafe { libc::dup(fd.as_raw_fd()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `n` was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Checks that `args`, a command line the daemon reported, starts a process at least as
/// confined as the daemon, which runs as `uid`: the seccomp sandbox on, and (unless the daemon
/// runs as root) `--user` naming that uid. A compromised daemon must not get a root-run
/// `upgrade` to start anything looser.
fn check_confined(args: &[String], uid: u32) -> Result<(), UpgradeError> {
    let argv = std::iter::once("vhost-card".into())
        .chain(args.iter().map(Into::into))
        .collect();
    let a = crate::cardfile::resolve(argv)
        .map_err(|e| UpgradeError::Unconfined(format!("it does not parse: {e}")))?;
    if a.command.is_some() {
        return Err(UpgradeError::Unconfined("a subcommand".into()));
    }
    if a.sandbox != crate::config::Sandbox::Seccomp {
        return Err(UpgradeError::Unconfined(
            "without the seccomp sandbox".into(),
        ));
    }
    if uid != 0 {
        let user_uid = match &a.user {
            Some(u) => crate::sandbox::lookup_user(u)
                .map(|(id, _)| id)
                .map_err(|e| UpgradeError::Unconfined(e.to_string()))?,
            None => 0,
        };
        if user_uid != uid {
            return Err(UpgradeError::Unconfined(format!(
                "as uid {user_uid}, where the daemon runs as uid {uid}"
            )));
        }
    }
    Ok(())
}

/// Runs the upgrade of the daemon whose control socket is `control`: starts `binary` (default:
/// this program) with `args` (default: the daemon's command line, if [`check_confined`]).
pub fn upgrade(
    control: &Path,
    binary: Option<&Path>,
    args: &[String],
) -> Result<Upgraded, UpgradeError> {
    let mut c = UnixStream::connect(control).map_err(|cause| UpgradeError::Connect {
        path: control.to_path_buf(),
        cause,
    })?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let line = crate::control::read_line(&mut c, 1 << 20)?;
    let snap: serde_json::Value =
        serde_json::from_str(&line).map_err(|_| UpgradeError::NoSnapshot(control.into()))?;
    let Some(offer) = snap.get("handover") else {
        return Err(UpgradeError::TooOld {
            path: control.into(),
            version: snap["version"].as_str().unwrap_or("?").to_string(),
        });
    };
    let offer: Offer = serde_json::from_value(offer.clone())
        .map_err(|_| UpgradeError::NoSnapshot(control.into()))?;
    if let Some(why) = offer.unavailable {
        return Err(UpgradeError::Unavailable(why));
    }
    // Never the path the daemon reports: it faces the guest, and this command may run as root.
    let binary = match binary {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe()?,
    };
    let args = if args.is_empty() {
        let daemon = crate::control::peer_credentials(&c)?;
        check_confined(&offer.args, daemon.uid)?;
        offer.args
    } else {
        args.to_vec()
    };
    c.write_all(format!("{REQUEST}\n").as_bytes())?;

    let (status_r, status_w) = pipe()?;
    let conn_fd = inheritable(&c)?;
    let status_fd = inheritable(&status_w)?;
    let child = Command::new(&binary)
        .args(&args)
        .env(CONNECTION_ENV, conn_fd.as_raw_fd().to_string())
        .env(STATUS_ENV, status_fd.as_raw_fd().to_string())
        // Its log goes where this command's stderr goes (the unit's journal under
        // `systemctl reload`); it writes nothing else.
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Its own process group: a Ctrl-C meant for this command does not reach the daemon.
        .process_group(0)
        .spawn();
    let mut child = child.map_err(|cause| UpgradeError::Spawn {
        binary: binary.clone(),
        cause,
    })?;
    // Only the new process holds them now: its end closing is how the old one and this command
    // learn that it died.
    drop((conn_fd, status_fd, status_w, c));

    // One line, then the new process closes its end (or dies, which closes it too; every
    // step before has its own time limit in the two processes).
    let mut status = String::new();
    let mut r = status_r;
    let mut buf = [0u8; 4096];
    while !status.contains('\n') {
        match r.read(&mut buf)? {
            0 => break,
            n => status.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    match serde_json::from_str::<Step>(status.trim()) {
        Ok(Step::Serving { pid, outage_us }) => Ok(Upgraded {
            pid,
            outage: Duration::from_micros(outage_us),
            binary,
        }),
        Ok(Step::Refused { why }) => {
            let _ = child.wait();
            Err(UpgradeError::Refused(why))
        }
        _ => {
            let how = match child.wait() {
                Ok(s) => format!("ended ({s})"),
                Err(e) => format!("is gone ({e})"),
            };
            Err(UpgradeError::Died { binary, how })
        }
    }
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe() -> io::Result<(File, File)> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which we own from then on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just created and nothing else owns them.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_reported_command_line_must_keep_the_daemon_confined() {
        let base = ["--socket", "/tmp/x.sock", "--tap", "card0"];
        // Root daemon: the sandbox must stay on.
        assert!(check_confined(&args(&base), 0).is_ok());
        let mut loose = args(&base);
        loose.extend(args(&["--sandbox", "none"]));
        assert!(check_confined(&loose, 0).is_err());
        // A daemon running as 65534: the new process must drop to 65534 too.
        assert!(check_confined(&args(&base), 65534).is_err());
        let mut same = args(&base);
        same.extend(args(&["--user", "65534"]));
        assert!(check_confined(&same, 65534).is_ok());
        let mut other = args(&base);
        other.extend(args(&["--user", "0"]));
        assert!(check_confined(&other, 65534).is_err());
        // Not a daemon's command line at all.
        assert!(check_confined(&args(&["stats", "--control", "/x"]), 0).is_err());
        assert!(check_confined(&args(&["--no-such-flag"]), 0).is_err());
    }
}
