//! `vhost-card upgrade --control PATH [--binary PATH]`: makes a newly installed binary take the
//! running daemon's session over without the frontend noticing (`docs/handover.md`). Asks the
//! daemon on its control socket, starts the new binary with the daemon's own command line and
//! the connection, and waits for it to serve.

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

/// Runs the upgrade of the daemon whose control socket is `control`.
pub fn upgrade(control: &Path, binary: Option<&Path>) -> Result<Upgraded, UpgradeError> {
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
    let binary = binary.map_or_else(|| PathBuf::from(&offer.exe), Path::to_path_buf);
    c.write_all(format!("{REQUEST}\n").as_bytes())?;

    let (status_r, status_w) = pipe()?;
    let conn_fd = inheritable(&c)?;
    let status_fd = inheritable(&status_w)?;
    let child = Command::new(&binary)
        .args(&offer.args)
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
