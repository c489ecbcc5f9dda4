//! The old process's side of a handover: what it hands over besides the gate's session
//! ([`Sources`]), where its serve loop stands ([`Sources::accept`], [`Sources::running`],
//! [`Sources::after_session`]), and the conversation itself ([`give`], see `steps`).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use log::{info, warn};

use super::pause::Paused;
use super::state::{DeviceState, FdKind, SessionState, Sockets, MAGIC, VERSION};
use super::steps::{self, Step};
use super::wire;
use crate::gate::Pauser;
use crate::stats::Stats;
use crate::tap::Tap;

/// How long the new process may take to start and say hello, and to check what it got (after
/// the go there is no limit: see `finish`). Generous: a loaded machine starts a binary slowly, and the
/// session is paused only between the hello and the go.
const HELLO_WITHIN: Duration = Duration::from_secs(30);
const VERDICT_WITHIN: Duration = Duration::from_secs(10);
/// How long the gate may take to reach the stop point.
const PAUSE_WITHIN: Duration = Duration::from_secs(5);

/// The frontend session the serve loop runs, as a handover sees it.
enum Session {
    Idle,
    /// Accepted, its gate not started yet: a handover waits for it.
    Starting,
    Running {
        pauser: Pauser,
        frontend: UnixStream,
    },
}

/// Where a handover stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// No handover, or one that was refused: serving.
    Serving,
    /// One is under way: the serve loop accepts no connection.
    Handing,
    /// The go was sent: the session is the new process's.
    Committed,
    /// The new process serves: this one ends.
    Done,
}

struct Slot {
    session: Session,
    outcome: Outcome,
}

/// What the daemon hands over besides the session: the sockets, the tap, the device it serves
/// and its counters, and the serve loop's state.
pub struct Sources {
    pub listener: Option<OwnedFd>,
    pub control: Option<OwnedFd>,
    pub metrics: Option<OwnedFd>,
    pub tap: Arc<Tap>,
    /// The tap goes when the daemon ends (the daemon created it and `--keep-tap` is off).
    pub tap_created: bool,
    pub device: DeviceState,
    stats: std::sync::OnceLock<Arc<Stats>>,
    backend: std::sync::OnceLock<Arc<crate::backend::CardBackend>>,
    /// Why this daemon cannot hand over, if it cannot.
    pub unavailable: Option<String>,
    slot: Mutex<Slot>,
    cv: Condvar,
}

impl Sources {
    pub fn new(
        listener: Option<OwnedFd>,
        control: Option<OwnedFd>,
        metrics: Option<OwnedFd>,
        tap: Arc<Tap>,
        tap_created: bool,
        device: DeviceState,
        unavailable: Option<String>,
    ) -> Self {
        Sources {
            listener,
            control,
            metrics,
            tap,
            tap_created,
            device,
            stats: std::sync::OnceLock::new(),
            backend: std::sync::OnceLock::new(),
            unavailable,
            slot: Mutex::new(Slot {
                session: Session::Idle,
                outcome: Outcome::Serving,
            }),
            cv: Condvar::new(),
        }
    }

    /// The backend whose held frames a handover carries.
    pub fn set_backend(&self, backend: Arc<crate::backend::CardBackend>) {
        let _ = self.backend.set(backend);
    }

    /// Each pair's held frame, taken out of the stopped backend.
    fn take_held(&self) -> Vec<(u16, Vec<u8>)> {
        self.backend.get().map_or_else(Vec::new, |b| {
            b.take_held()
                .into_iter()
                .enumerate()
                .filter_map(|(i, f)| Some((i as u16, f?)))
                .collect()
        })
    }

    /// Puts held frames back after a refused handover.
    fn put_back(&self, held: Vec<(u16, Vec<u8>)>) {
        if let Some(b) = self.backend.get() {
            for (pair, frame) in held {
                b.hold(usize::from(pair), &frame);
            }
        }
    }

    /// The counters handed over with the session.
    pub fn set_stats(&self, stats: Arc<Stats>) {
        let _ = self.stats.set(stats);
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts a connection with `accept` unless a handover is under way (then waits for its
    /// end; `None` once this process has handed over).
    pub fn accept(&self, accept: impl FnOnce() -> Option<UnixStream>) -> Option<UnixStream> {
        let mut slot = self.lock();
        while slot.outcome == Outcome::Handing {
            slot = self.cv.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
        if slot.outcome != Outcome::Serving {
            return None;
        }
        let got = accept();
        if got.is_some() {
            slot.session = Session::Starting;
        }
        got
    }

    /// The accepted connection's gate runs.
    pub fn running(&self, pauser: Pauser, frontend: UnixStream) {
        self.lock().session = Session::Running { pauser, frontend };
        self.cv.notify_all();
    }

    /// The session ended (or moved): whether this process handed over and must end, without
    /// touching the tap or the connection. While a committed handover is not done yet, waits
    /// for it; a handover that failed after the go leaves the process serving (the session is
    /// lost: the frontend reconnects).
    pub fn after_session(&self) -> bool {
        let mut slot = self.lock();
        slot.session = Session::Idle;
        self.cv.notify_all();
        while slot.outcome == Outcome::Committed {
            slot = self.cv.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
        slot.outcome == Outcome::Done
    }

    /// Whether this process handed over its session.
    pub fn handed_over(&self) -> bool {
        self.lock().outcome == Outcome::Done
    }

    fn set_outcome(&self, outcome: Outcome) {
        self.lock().outcome = outcome;
        self.cv.notify_all();
    }

    /// The state blob for `paused` (or no session) and the descriptors that go with it, in
    /// the blob's order: the session's (regions, then each ring's eventfds), the listener,
    /// the frontend's connection, the control socket, the metrics listener, the tap queues.
    fn blob<'a>(
        &'a self,
        paused: Option<&'a Paused>,
        frontend: Option<&'a UnixStream>,
        held: &[(u16, Vec<u8>)],
    ) -> Result<(SessionState, Vec<BorrowedFd<'a>>), String> {
        let mut kinds = Vec::new();
        let mut fds: Vec<BorrowedFd<'a>> = Vec::new();
        if let Some(p) = paused {
            let regions = p.state.regions.len();
            kinds.extend(vec![FdKind::GuestMemory; regions]);
            kinds.extend(vec![FdKind::EventFd; p.fds.len() - regions]);
            fds.extend(p.fds.iter().map(|f| f.as_fd()));
        }
        let mut add = |fd: BorrowedFd<'a>, kind| {
            kinds.push(kind);
            fds.push(fd);
            fds.len() - 1
        };
        let listener = self
            .listener
            .as_ref()
            .ok_or("no vhost-user listening socket to hand over")?;
        let listener = add(listener.as_fd(), FdKind::UnixListener);
        let frontend = frontend.map(|f| add(f.as_fd(), FdKind::UnixStream));
        let control = self
            .control
            .as_ref()
            .map(|f| add(f.as_fd(), FdKind::UnixListener));
        let metrics = self
            .metrics
            .as_ref()
            .map(|f| add(f.as_fd(), FdKind::TcpListener));
        let taps = (0..self.tap.num_queues())
            .map(|i| {
                add(
                    // SAFETY: the tap's queues stay open as long as `self.tap`, borrowed for as
                    // long.
                    unsafe { BorrowedFd::borrow_raw(self.tap.queue_fd(i)) },
                    FdKind::TapQueue,
                )
            })
            .collect();
        let blob = SessionState {
            magic: MAGIC.into(),
            version: VERSION,
            sender: format!("vhost-card {}", env!("CARGO_PKG_VERSION")),
            device: self.device.clone(),
            fds: kinds,
            sockets: Sockets {
                listener,
                frontend,
                control,
                metrics,
            },
            taps,
            tap_created: self.tap_created,
            session: paused.map(|p| p.state.clone()),
            held: held.iter().map(|(p, _)| *p).collect(),
            counters: self
                .stats
                .get()
                .ok_or("the daemon has no counters yet")?
                .snapshot(),
        };
        Ok((blob, fds))
    }
}

/// Runs a handover on `conn` (its request line read): the new process's hello, the pause, the
/// state and descriptors, its verdict, then the go and its "serving". `commit` runs just before
/// the go (the daemon then stops acting on the frontend's connection). Returns the new
/// process's pid once it serves; on an error before the go the session was restarted where it
/// stopped and this process serves on.
pub fn give(conn: &UnixStream, src: &Sources, commit: &dyn Fn()) -> Result<u32, String> {
    if let Some(why) = &src.unavailable {
        return Err(why.clone());
    }
    conn.set_read_timeout(Some(HELLO_WITHIN))
        .map_err(|e| e.to_string())?;
    let pid = match steps::recv(conn)? {
        Step::Hello { pid } => pid,
        other => return Err(format!("expected the new process's hello, got {other:?}")),
    };
    info!("handover: process {pid} asks for the session");
    let mut slot = src.lock();
    if slot.outcome != Outcome::Serving {
        return Err("another handover is under way".into());
    }
    slot.outcome = Outcome::Handing;
    while matches!(slot.session, Session::Starting) {
        slot = src.cv.wait(slot).unwrap_or_else(|p| p.into_inner());
    }
    let paused_at = steps::now_us();
    let (paused, frontend) = match &slot.session {
        Session::Running { pauser, frontend } => {
            // Duplicated before the pause: a failure here leaves nothing to restart.
            let frontend = match frontend.try_clone() {
                Ok(f) => f,
                Err(e) => {
                    drop(slot);
                    src.set_outcome(Outcome::Serving);
                    return Err(format!("cannot duplicate the frontend's connection: {e}"));
                }
            };
            match pauser.pause(PAUSE_WITHIN) {
                Ok(p) => (Some(p), Some(frontend)),
                Err(why) => {
                    drop(slot);
                    src.set_outcome(Outcome::Serving);
                    return Err(format!("cannot pause the session: {why}"));
                }
            }
        }
        _ => (None, None),
    };
    drop(slot);
    // Frames read from the tap and held for the guest's buffers go with the session.
    let held = if paused.is_some() {
        src.take_held()
    } else {
        Vec::new()
    };
    let result = offer(conn, src, paused.as_ref(), frontend.as_ref(), &held);
    let Some(paused) = paused else {
        // No session: nothing to restart or detach.
        return finish(conn, src, result, commit, paused_at, pid);
    };
    match result {
        Ok(()) => {
            // Committed before the gate lets go: the serve loop then waits for the outcome
            // instead of resetting the tap for a session that ended.
            commit();
            src.set_outcome(Outcome::Committed);
            paused.detach();
            finish(conn, src, Ok(()), &|| {}, paused_at, pid)
        }
        Err(why) => {
            src.put_back(held);
            paused.restart();
            src.set_outcome(Outcome::Serving);
            Err(why)
        }
    }
}

/// Sends the state and reads the new process's verdict.
fn offer(
    conn: &UnixStream,
    src: &Sources,
    paused: Option<&Paused>,
    frontend: Option<&UnixStream>,
    held: &[(u16, Vec<u8>)],
) -> Result<(), String> {
    let (blob, fds) = src.blob(paused, frontend, held)?;
    wire::send(conn, &blob.to_json(), &fds).map_err(|e| e.to_string())?;
    for (_, frame) in held {
        wire::send(conn, frame, &[]).map_err(|e| e.to_string())?;
    }
    conn.set_read_timeout(Some(VERDICT_WITHIN))
        .map_err(|e| e.to_string())?;
    match steps::recv(conn) {
        Ok(Step::Valid) => Ok(()),
        Ok(Step::Refused { why }) => Err(format!("the new process refused: {why}")),
        Ok(other) => Err(format!("expected a verdict, got {other:?}")),
        Err(e) => Err(format!("no verdict from the new process: {e}")),
    }
}

/// After a valid verdict: the go, then the new process's "serving".
fn finish(
    conn: &UnixStream,
    src: &Sources,
    verdict: Result<(), String>,
    commit: &dyn Fn(),
    paused_at: u64,
    pid: u32,
) -> Result<u32, String> {
    if let Err(why) = verdict {
        src.set_outcome(Outcome::Serving);
        return Err(why);
    }
    commit();
    src.set_outcome(Outcome::Committed);
    let served = steps::send(
        conn,
        &Step::Go {
            paused_at_us: paused_at,
        },
    )
    .and_then(|()| {
        // No time limit once the go is out: the new process owns the session and the tap
        // from then on, so this one must not take them back while it lives. It answers, or
        // it dies and its end of `conn` closes (only it holds that end).
        conn.set_read_timeout(None).map_err(|e| e.to_string())?;
        steps::recv(conn)
    });
    match served {
        Ok(Step::Serving { outage_us, .. }) => {
            info!(
                "handover: process {pid} serves the session ({} µs without service); exiting",
                outage_us
            );
            src.set_outcome(Outcome::Done);
            Ok(pid)
        }
        Ok(other) => lost(src, format!("expected serving, got {other:?}")),
        Err(e) => lost(src, e),
    }
}

fn lost(src: &Sources, why: String) -> Result<u32, String> {
    warn!(
        "handover: the new process failed after taking the session ({why}); the session is \
         lost, the frontend reconnects; serving on"
    );
    src.set_outcome(Outcome::Serving);
    Err(why)
}
