//! The new process's side of a handover: the connection `upgrade` passed on ([`incoming`]),
//! the checks of what arrives on it ([`Incoming::receive`]), the verdict and the go, and the
//! "serving" that lets the old process go ([`Incoming::serving`]). `docs/handover.md`.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use log::info;

use super::fdcheck;
use super::state::{DeviceState, FdKind, SessionState};
use super::steps::{self, Step, CONNECTION_ENV, STATUS_ENV};
use super::wire;

/// How long the old process may take to pause and send, and to send the go.
const STATE_WITHIN: Duration = Duration::from_secs(10);

/// Largest held frame a state may carry: a vnet header and the largest GSO frame.
const MAX_HELD: usize = 64 + 65_550;

/// What arrived, checked: the blob and every descriptor, in the blob's order, and the frames
/// held for the guest's buffers (pair, frame).
pub struct Received {
    pub state: SessionState,
    pub fds: Vec<OwnedFd>,
    pub held: Vec<(u16, Vec<u8>)>,
}

impl Received {
    /// Takes descriptor `i` out of the list (a duplicate: the list keeps its numbering).
    pub fn take(&self, i: usize) -> std::io::Result<OwnedFd> {
        self.fds[i].try_clone()
    }
}

/// The control connection to the old process and the status pipe to `upgrade`.
pub struct Incoming {
    conn: UnixStream,
    status: Option<File>,
}

/// A descriptor number from the environment, checked to be open; the variable is removed so
/// that nothing this process starts inherits the claim.
fn env_fd(name: &str) -> Result<Option<RawFd>, String> {
    let Some(v) = std::env::var_os(name) else {
        return Ok(None);
    };
    std::env::remove_var(name);
    let fd: RawFd = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|&fd| fd > 2)
        .ok_or_else(|| format!("{name}={v:?} is not a descriptor number above 2"))?;
    // SAFETY: F_GETFD only reads the descriptor's flags; a bad number fails with EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("{name}={fd}: not an open descriptor"));
    }
    // SAFETY: as above; close-on-exec from now on.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(Some(fd))
}

/// The handover this process was started for, if any (`vhost-card upgrade` sets
/// [`CONNECTION_ENV`] and [`STATUS_ENV`]).
pub fn incoming() -> Result<Option<Incoming>, String> {
    let status = env_fd(STATUS_ENV)?;
    let Some(fd) = env_fd(CONNECTION_ENV)? else {
        return Ok(None);
    };
    fdcheck::check(fd, FdKind::UnixStream).map_err(|why| format!("{CONNECTION_ENV}: {why}"))?;
    // SAFETY: checked open and a connected Unix stream socket, handed to this process by
    // `upgrade` for it alone; owned from here on.
    let conn = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: checked open, the status pipe `upgrade` handed to this process alone.
    let status = status.map(|fd| unsafe { File::from_raw_fd(fd) });
    Ok(Some(Incoming { conn, status }))
}

/// Whether a handover is asked of this process (without taking it).
pub fn requested() -> bool {
    std::env::var_os(CONNECTION_ENV).is_some()
}

impl Incoming {
    /// Says hello to the old process (whose credentials must be root's or `own_uid`'s), then
    /// receives and checks the state and descriptors against this process's own device. A
    /// refusal is sent to the old process (which keeps serving) and to `upgrade`.
    pub fn receive(&mut self, ours: &DeviceState, own_uid: u32) -> Result<Received, String> {
        let r = self.try_receive(ours, own_uid);
        if let Err(why) = &r {
            self.refuse(why);
        }
        r
    }

    fn try_receive(&self, ours: &DeviceState, own_uid: u32) -> Result<Received, String> {
        let peer = crate::control::peer_credentials(&self.conn).map_err(|e| e.to_string())?;
        if !crate::control::may_control(peer.uid, own_uid) {
            return Err(format!(
                "the process handing over (pid {}) runs as uid {}, neither root nor {own_uid}",
                peer.pid, peer.uid
            ));
        }
        steps::send(
            &self.conn,
            &Step::Hello {
                pid: std::process::id(),
            },
        )?;
        self.conn
            .set_read_timeout(Some(STATE_WITHIN))
            .map_err(|e| e.to_string())?;
        let (payload, fds) = wire::recv(&self.conn).map_err(|e| e.to_string())?;
        let state = SessionState::parse(&payload).map_err(|e| e.to_string())?;
        state.check_device(ours).map_err(|e| e.to_string())?;
        fdcheck::check_all(&state, &fds).map_err(|e| e.to_string())?;
        let mut held = Vec::new();
        for &pair in &state.held {
            let (frame, extra) = wire::recv(&self.conn).map_err(|e| e.to_string())?;
            if !extra.is_empty() || frame.is_empty() || frame.len() > MAX_HELD {
                return Err(format!(
                    "held frame of pair {pair}: {} bytes with {} descriptors",
                    frame.len(),
                    extra.len()
                ));
            }
            held.push((pair, frame));
        }
        info!(
            "handover: state from {} checked ({} descriptors, {})",
            state.sender,
            fds.len(),
            if state.session.is_some() {
                "a running session"
            } else {
                "no session"
            }
        );
        Ok(Received { state, fds, held })
    }

    /// Tells the old process and `upgrade` why this process refuses.
    pub fn refuse(&mut self, why: &str) {
        let step = Step::Refused {
            why: why.to_string(),
        };
        let _ = steps::send(&self.conn, &step);
        self.status(&step);
    }

    /// Accepts what arrived and waits for the go: the time the session was paused at.
    pub fn accept(&mut self) -> Result<u64, String> {
        steps::send(&self.conn, &Step::Valid)?;
        match steps::recv(&self.conn) {
            Ok(Step::Go { paused_at_us }) => Ok(paused_at_us),
            Ok(other) => Err(format!("expected the go, got {other:?}")),
            Err(e) => Err(format!("no go from the old process: {e}")),
        }
    }

    /// Serving: the old process may go; `upgrade` learns the outage since `paused_at`.
    pub fn serving(mut self, paused_at: u64) -> u64 {
        let outage_us = steps::now_us().saturating_sub(paused_at);
        let step = Step::Serving {
            pid: std::process::id(),
            outage_us,
        };
        let _ = steps::send(&self.conn, &step);
        self.status(&step);
        outage_us
    }

    fn status(&mut self, step: &Step) {
        if let Some(mut f) = self.status.take() {
            let mut line = serde_json::to_vec(step).unwrap_or_default();
            line.push(b'\n');
            let _ = f.write_all(&line);
        }
    }
}
