//! The daemon's life: open the tap, listen, serve one frontend connection at a time through the
//! gate and the `vhost-user-backend` daemon, listen again after a disconnect (keeping the tap and
//! so the card's addresses), and stop cleanly on SIGINT/SIGTERM.

use std::fs::DirBuilder;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use log::{error, info, warn};
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{BackendConfig, CardBackend};
use crate::config::{Config, Listen, Sandbox, TAP_MAX_MTU};
use crate::features::Negotiated;
use crate::gate::{Gate, GateConfig, Hooks};
use crate::handover::give::{self, Sources};
use crate::handover::record::Recorder;
use crate::handover::state::{DeviceState, ProtocolState};
use crate::handover::steps::Offer;
use crate::handover::take::{self, Incoming, Received};
use crate::sandbox::{self, SandboxError};
use crate::stats::{DeviceInfo, Stats};
use crate::tap::{Tap, TapConfig, TapError, TUN_F_CSUM, TUN_F_USO4, TUN_F_USO6};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot listen on {path}: {cause}")]
    Listen { path: PathBuf, cause: io::Error },
    #[error("{0} was requested but the card's kernel cannot hand USO frames to the host (needs Linux >= 6.2)")]
    UsoUnsupported(&'static str),
    #[error("cannot create control socket {path}: {cause}")]
    Control { path: PathBuf, cause: io::Error },
    #[error("cannot listen for metrics on {addr}: {cause}")]
    Metrics {
        addr: std::net::SocketAddr,
        cause: io::Error,
    },
    #[error("cannot give socket {path} its group or mode: {cause}")]
    SocketAccess { path: PathBuf, cause: io::Error },
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    #[error("{what}: {cause}")]
    Io {
        what: &'static str,
        cause: io::Error,
    },
    #[error("vhost-user daemon: {0}")]
    Vhost(String),
    #[error("{0}; stopping (restart the daemon to recreate it)")]
    Fatal(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Vduse(#[from] crate::vduse::VduseError),
    #[error("handover: {0}")]
    Handover(String),
}

/// Maps a failed step to [`DaemonError::Io`]; the OS's words come once, after `what`.
fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> DaemonError {
    move |cause| DaemonError::Io { what, cause }
}

/// How often the daemon checks that its network namespace still has its name.
const NETNS_WATCH_EVERY: Duration = Duration::from_secs(1);

/// Shared stop request: set by a signal, seen by the accept loop, the stats thread and the
/// connection being served.
pub struct Stop {
    flag: AtomicBool,
    cv: (Mutex<()>, Condvar),
    event: EventFd,
    frontend: Mutex<Option<UnixStream>>,
    fatal: Mutex<Option<String>>,
}

impl Stop {
    fn new() -> io::Result<Self> {
        Ok(Stop {
            flag: AtomicBool::new(false),
            cv: (Mutex::new(()), Condvar::new()),
            event: EventFd::new(EFD_NONBLOCK)?,
            frontend: Mutex::new(None),
            fatal: Mutex::new(None),
        })
    }

    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.event.write(1);
        if let Some(f) = self
            .frontend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = f.shutdown(std::net::Shutdown::Both);
        }
        self.cv.1.notify_all();
    }

    /// Ends the daemon after its session moved to another process: as [`Stop::request`], but
    /// the frontend's connection, which the new process serves, is not touched.
    fn leave(&self) {
        self.clear_frontend();
        self.request();
    }

    /// From now on a stop leaves the frontend's connection alone (`shutdown(2)` would act on
    /// the connection itself, which another process serves after a handover).
    fn clear_frontend(&self) {
        *self.frontend.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Stops the daemon because something it cannot do without is gone.
    pub fn fail(&self, why: String) {
        let mut f = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            error!("{why}");
            *f = Some(why);
        }
        drop(f);
        self.request();
    }

    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Sleeps up to `d`; returns true if a stop was requested.
    pub(crate) fn wait(&self, d: Duration) -> bool {
        let g = self.cv.0.lock().unwrap_or_else(|p| p.into_inner());
        if self.requested() {
            return true;
        }
        let _ = self.cv.1.wait_timeout(g, d);
        self.requested()
    }
}

/// Binds the listening socket, replacing a stale one but never a live one.
fn bind_socket(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(DaemonError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => DaemonError::SocketInUse(path.to_path_buf()),
        _ => DaemonError::Listen {
            path: path.to_path_buf(),
            cause: e,
        },
    })
}

/// Gives the vhost-user socket its `--socket-group` and `--socket-mode` (0660 with a group and
/// no mode, so the group can connect).
fn set_socket_access(
    path: &Path,
    group: Option<u32>,
    mode: Option<u32>,
) -> Result<(), DaemonError> {
    let err = |cause| DaemonError::SocketAccess {
        path: path.to_path_buf(),
        cause,
    };
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
    }
    if let Some(mode) = mode.or(group.map(|_| 0o660)) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    Ok(())
}

/// A 0700 directory for the socket between the gate and the crate's handler.
fn private_dir() -> io::Result<PathBuf> {
    let base = std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    for n in 0..100u32 {
        let dir = base.join(format!("vhost-card.{}.{n}", std::process::id()));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free private directory name",
    ))
}

/// The socket between the gate and the `vhost` crate's handler, in the private directory.
const HANDLER_SOCKET: &str = "handler.sock";

/// Files the daemon created and removes when it ends, however it ends.
struct Cleanup {
    paths: Vec<PathBuf>,
    dir: Option<PathBuf>,
    /// Whether `paths` are removed (not before a process taking a session over serves).
    remove_paths: Arc<AtomicBool>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.remove_paths.load(Ordering::SeqCst) {
            for p in &self.paths {
                let _ = std::fs::remove_file(p);
            }
        }
        if let Some(d) = &self.dir {
            // The directory only ever holds the handler socket; no directory walk (which the
            // sandbox would refuse: it opens the directory).
            let _ = std::fs::remove_file(d.join(HANDLER_SOCKET));
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Runs the daemon until SIGINT/SIGTERM.
///
/// The order is the security design: everything that needs privileges first (sockets, the
/// tap in its namespace), then, while the process is still single-threaded, the switch to
/// `--user`/`--group`, the capability drop and the seccomp filter; only then threads start and
/// frontends are served.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    log::debug!("{cfg:?}");
    // VDUSE: the process that keeps the right to add and delete the vdpa device is forked before
    // anything else is open (it must hold none of the daemon's descriptors), and the kernel's
    // VDUSE is checked before anything is created.
    let vduse_start = match &cfg.listen {
        Listen::Vduse(v) => Some(crate::vduse::start(v)?),
        _ => None,
    };
    // The command line, for a handover to start the next binary with (`vhost-card upgrade`).
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    // SAFETY: geteuid cannot fail.
    let own_uid = cfg
        .identity
        .map_or_else(|| unsafe { libc::geteuid() }, |(uid, _)| uid);
    // Started by `vhost-card upgrade`: take the running daemon's session over, receiving the
    // sockets, the tap and the session instead of opening them. Until the go, any failure is
    // a refusal the old process hears of (it then serves on).
    let mut taking = Taking(take::incoming().map_err(DaemonError::Handover)?);
    let taken = match taking.0.as_mut() {
        Some(inc) => match handover_unavailable(&cfg) {
            Some(why) => {
                inc.refuse(&why);
                return Err(DaemonError::Handover(why));
            }
            None => Some(
                inc.receive(&device_of(&cfg), own_uid)
                    .map_err(DaemonError::Handover)?,
            ),
        },
        None => None,
    };
    let stop = Arc::new(Stop::new().map_err(io_err("eventfd"))?);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(DaemonError::Signals)?;
    // Guest memory files a frontend shrinks later must not end the daemon.
    crate::memguard::install().map_err(io_err("SIGBUS handler"))?;

    // 1. What needs privileges: the sockets first, the tap last, so that a start that fails
    // leaves nothing behind (the files are removed, a tap the daemon created goes with it).
    let mut cleanup = Cleanup {
        paths: Vec::new(),
        dir: None,
        // A process taking over removes the socket files only once it serves: the old one
        // still serves on them until then.
        remove_paths: Arc::new(AtomicBool::new(taken.is_none())),
    };
    let received = |i: usize, what: &'static str| -> Result<OwnedFd, DaemonError> {
        let r = taken
            .as_ref()
            .ok_or(DaemonError::Handover("nothing received".into()))?;
        r.take(i).map_err(io_err(what))
    };
    let listener = match (&taken, &cfg.listen) {
        (Some(r), listen) => {
            if let Listen::Path(p) = listen {
                cleanup.paths.push(p.clone());
            }
            Some(UnixListener::from(received(
                r.state.sockets.listener,
                "handover: the listening socket",
            )?))
        }
        (None, Listen::Path(p)) => {
            let l = bind_socket(p)?;
            cleanup.paths.push(p.clone());
            set_socket_access(p, cfg.socket_group, cfg.socket_mode)?;
            Some(l)
        }
        // SAFETY: the configuration checked that this descriptor is a listening Unix socket
        // handed to us by our parent; we take ownership of it.
        (None, Listen::Fd(fd)) => Some(unsafe { UnixListener::from_raw_fd(*fd) }),
        (None, Listen::Vduse(_)) => None,
    };
    let taken_control = taken.as_ref().and_then(|r| r.state.sockets.control);
    let control = match (&cfg.control, taken_control) {
        (Some(p), Some(i)) => {
            cleanup.paths.push(p.clone());
            Some(UnixListener::from(received(
                i,
                "handover: the control socket",
            )?))
        }
        (Some(p), None) => {
            let l = crate::control::bind_control(p).map_err(|cause| DaemonError::Control {
                path: p.clone(),
                cause,
            })?;
            cleanup.paths.push(p.clone());
            Some(l)
        }
        (None, _) => None,
    };
    let taken_metrics = taken.as_ref().and_then(|r| r.state.sockets.metrics);
    let metrics = match (cfg.metrics_listen, taken_metrics) {
        (Some(_), Some(i)) => Some(std::net::TcpListener::from(received(
            i,
            "handover: the metrics listener",
        )?)),
        (Some(addr), None) => Some(
            crate::control::bind_metrics(addr)
                .map_err(|cause| DaemonError::Metrics { addr, cause })?,
        ),
        (None, _) => None,
    };
    // The process figures for the metrics, opened while opening files is still allowed.
    let proc_self = metrics.as_ref().and_then(|_| {
        crate::procstat::ProcSelf::open()
            .map_err(|e| warn!("no process metrics: /proc/self: {e}"))
            .ok()
    });
    let private = private_dir().map_err(io_err("creating a private directory"))?;
    cleanup.dir = Some(private.clone());
    // Restarted by systemd after a crash: the session kept in its fd store, if any is valid.
    // (A process taking a session over by a live handover keeps it in the store too.)
    let fd_store =
        handover_unavailable(&cfg).is_none() && crate::handover::fdstore::wanted(cfg.fd_store);
    let (mut recovered, discarded) = match taken.is_none() && handover_unavailable(&cfg).is_none() {
        true => crate::handover::fdstore::recover(
            listener.as_ref().map(|l| l.as_fd()),
            &device_of(&cfg),
            fd_store,
        ),
        false => (None, false),
    };
    let tap = match (&taken, &recovered) {
        (Some(r), _) => adopt_tap(r)?,
        (None, Some(rc)) => match adopt_tap(&rc.received) {
            Ok(tap) => tap,
            Err(e) => {
                error!("crash recovery refused: {e}; starting fresh");
                if let Some(rc) = recovered.take() {
                    rc.discard();
                }
                open_tap_after_discard(&cfg)?
            }
        },
        (None, None) if discarded => open_tap_after_discard(&cfg)?,
        (None, None) => open_tap(&cfg)?,
    };
    let vduse = match (&cfg.listen, vduse_start) {
        (Listen::Vduse(v), Some(start)) => {
            let spec = crate::vduse::spec(v, cfg.features, cfg.mtu, cfg.queues, cfg.queue_size);
            Some(crate::vduse::prepare(v, spec, start)?)
        }
        _ => None,
    };
    // The identity of the named namespace the tap lives in, watched while serving.
    let netns_watch = cfg
        .netns
        .as_deref()
        .filter(|n| !n.contains('/'))
        .and_then(|n| {
            let path = crate::netns::path_of(n);
            let meta = std::fs::metadata(&path).ok()?;
            Some((n.to_string(), path, (meta.dev(), meta.ino())))
        });

    // io_uring instances for batched tap writes, while io_uring_setup is still allowed.
    crate::datapath::preopen_tx_rings(cfg.queues);

    // What a handover of this process would hand over besides the session.
    let dup = |fd: Option<BorrowedFd>| fd.map(|f| f.try_clone_to_owned()).transpose();
    let sources = Arc::new(Sources::new(
        dup(listener.as_ref().map(|l| l.as_fd())).map_err(io_err("listener"))?,
        dup(control.as_ref().map(|l| l.as_fd())).map_err(io_err("control socket"))?,
        dup(metrics.as_ref().map(|l| l.as_fd())).map_err(io_err("metrics listener"))?,
        tap.clone(),
        tap.created(),
        device_of(&cfg),
        handover_unavailable(&cfg),
    ));

    // 2. Give up what is no longer needed.
    let mut owned: Vec<&Path> = cleanup.paths.iter().map(PathBuf::as_path).collect();
    owned.push(&private);
    confine(&cfg, &owned)?;
    // Everything is in place: accept what was received, and wait for the go. From the go on
    // the session is this process's.
    let mut recovered_names = None;
    let resume = match taking.0.take() {
        Some(mut inc) => {
            let paused_at = inc.accept().map_err(DaemonError::Handover)?;
            let r = taken.expect("received with the connection");
            let session = match (r.state.session.clone(), r.state.sockets.frontend) {
                (Some(state), Some(i)) => Some(Resume {
                    frontend: UnixStream::from(r.take(i).map_err(io_err("handover"))?),
                    state,
                    held: r.held,
                    fds: r.fds,
                    incoming: Some(inc),
                    paused_at,
                    armed: cleanup.remove_paths.clone(),
                }),
                _ => {
                    // No session: serving as soon as the listener is.
                    let outage = inc.serving(paused_at);
                    cleanup.remove_paths.store(true, Ordering::SeqCst);
                    info!("handover: took over without a session ({outage} µs)");
                    None
                }
            };
            Some((r.state.counters, session))
        }
        None => match recovered.take() {
            Some(rc) => {
                let r = rc.received;
                let (Some(state), Some(i)) = (r.state.session.clone(), r.state.sockets.frontend)
                else {
                    return Err(DaemonError::Handover(
                        "crash recovery: a stored state without a session".into(),
                    ));
                };
                let session = Resume {
                    frontend: UnixStream::from(r.take(i).map_err(io_err("crash recovery"))?),
                    state,
                    held: r.held,
                    fds: r.fds,
                    incoming: None,
                    paused_at: crate::handover::steps::now_us(),
                    armed: cleanup.remove_paths.clone(),
                };
                recovered_names = Some(rc.names);
                Some((r.state.counters, Some(session)))
            }
            None => None,
        },
    };

    // 3. Threads, then serve.
    {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if sig == signal_hook::consts::SIGHUP {
                        // The daemon writes its log to stderr (the journal, a pipe or a file
                        // its caller opened): it has no file of its own to reopen.
                        info!("SIGHUP: ignored (the log goes to stderr; nothing to reopen)");
                        continue;
                    }
                    info!("signal {sig}: stopping");
                    stop.request();
                    break;
                }
            })
            .map_err(io_err("spawning the signal thread"))?;
    }
    let stats = Arc::new(Stats::new(
        cfg.queues,
        match &cfg.listen {
            // As the VDUSE device offers it (ACCESS_PLATFORM and MAC added).
            Listen::Vduse(_) => DeviceInfo {
                mtu: cfg.mtu,
                offered: crate::vduse::offer(cfg.features),
                transport: crate::stats::VDUSE,
            },
            // As the backend offers it (`CardBackend::features`), so acked is a subset.
            Listen::Path(_) | Listen::Fd(_) => DeviceInfo {
                mtu: cfg.mtu,
                offered: cfg.features | 1 << crate::features::VHOST_USER_F_PROTOCOL_FEATURES,
                transport: crate::stats::VHOST_USER,
            },
        },
    ));
    let resume = resume.map(|(counters, session)| {
        stats.carry_over(&counters);
        session
    });
    sources.set_stats(stats.clone());
    let fd_store = fd_store.then(|| {
        let store = crate::handover::fdstore::FdStore::new(crate::handover::fdstore::Card {
            tap: tap.clone(),
            device: device_of(&cfg),
            tap_created: tap.created(),
            stats: stats.clone(),
        });
        if let Some(names) = recovered_names.take() {
            store.adopt(names);
        }
        info!("fd store: the live session is kept in systemd's file descriptor store");
        Arc::new(store)
    });
    if let Some(l) = control {
        let hook = crate::control::HandoverHook {
            offer: serde_json::to_value(Offer {
                state_version: crate::handover::state::VERSION,
                exe,
                args,
                unavailable: handover_unavailable(&cfg),
            })
            .unwrap_or_default(),
            run: {
                let (sources, stop) = (sources.clone(), stop.clone());
                Box::new(move |conn| {
                    match give::give(&conn, &sources, &|| stop.clear_frontend()) {
                        Ok(pid) => {
                            // Under systemd the new process is the service's main process now.
                            if let Err(e) =
                                sd_notify::notify(&[sd_notify::NotifyState::MainPid(pid)])
                            {
                                warn!("handover: cannot tell systemd MAINPID={pid}: {e}");
                            }
                            stop.leave();
                            true
                        }
                        Err(why) => {
                            warn!("handover refused: {why}; this process serves on");
                            sources.handed_over()
                        }
                    }
                })
            },
        };
        crate::control::serve_control(l, stats.clone(), own_uid, Some(hook))
            .map_err(io_err("control socket"))?;
    }
    if let Some(l) = metrics {
        let exporter = crate::metrics::Exporter::new(stats.clone(), proc_self);
        crate::control::serve_metrics(l, exporter).map_err(io_err("metrics listener"))?;
    }
    let backend = Arc::new(
        CardBackend::new(
            BackendConfig {
                pairs: cfg.queues,
                queue_size: cfg.queue_size,
                mtu: cfg.mtu,
                features: cfg.features,
                rx_csum: cfg.rx_csum,
                link: (cfg.link == crate::config::Link::Ip).then(|| {
                    let mac = cfg
                        .mac
                        .unwrap_or_else(|| crate::link::default_mac(&cfg.tap));
                    info!(
                        "IP-only link: the card answers ARP and neighbour solicitations as {}",
                        crate::tap::mac_string(&mac)
                    );
                    Arc::new(crate::link::IpLink::new(mac))
                }),
            },
            tap.clone(),
            stats.clone(),
            {
                let stop = stop.clone();
                Box::new(move |why| stop.fail(why))
            },
        )
        .map_err(io_err("creating the backend"))?,
    );
    sources.set_backend(backend.clone());
    if let Some(Some(r)) = &resume {
        // Before the rings start again: these frames go up first, as they would have.
        for (pair, frame) in &r.held {
            if !backend.hold(usize::from(*pair), frame) {
                warn!(
                    "handover: pair {pair}'s held frame of {} bytes does not fit; dropped",
                    frame.len()
                );
            }
        }
    }
    if cfg.stats_interval > 0 {
        let (stop, stats, every) = (
            stop.clone(),
            stats.clone(),
            Duration::from_secs(cfg.stats_interval),
        );
        let _ = std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || {
                while !stop.wait(every) {
                    for line in stats.report().lines() {
                        info!("stats {line}");
                    }
                }
            });
    }
    if let Some((name, path, id)) = netns_watch {
        let tap_name = cfg.tap.clone();
        // `ip netns del` only removes the name: the tap's open queues keep the namespace alive,
        // unnamed, where nothing can reach the card's side any more. Say so and stop, as when
        // the tap is deleted.
        let stop = stop.clone();
        let _ = std::thread::Builder::new()
            .name("netns-watch".into())
            .spawn(move || {
                while !stop.wait(NETNS_WATCH_EVERY) {
                    match std::fs::metadata(&path) {
                        Ok(m) if (m.dev(), m.ino()) == id => {}
                        Ok(_) => {
                            stop.fail(format!(
                                "the card's network namespace {name} was deleted and another \
                                 one made under its name; tap {tap_name} stays in the old one: \
                                 exiting"
                            ));
                            break;
                        }
                        Err(_) => {
                            stop.fail(format!(
                                "the card's network namespace {name} was deleted ({} is \
                                 gone); tap {tap_name} is unreachable in what is left of it: \
                                 exiting",
                                path.display()
                            ));
                            break;
                        }
                    }
                }
            });
    }
    // Started: from now on a clean exit keeps the tap if asked to (a process taking a session
    // over: once it serves it).
    if !matches!(resume, Some(Some(_))) {
        tap.keep_when_done(cfg.keep_tap);
    }
    info!(
        "listening on {} (MTU {}, {} queue pair(s), features: {})",
        match &cfg.listen {
            Listen::Path(p) => p.display().to_string(),
            Listen::Fd(fd) => format!("inherited fd {fd}"),
            Listen::Vduse(v) => format!("VDUSE device /dev/vduse/{}", v.name),
        },
        cfg.mtu,
        cfg.queues,
        crate::features::names(match &cfg.listen {
            Listen::Vduse(_) => crate::vduse::offer(cfg.features),
            _ => cfg.features,
        })
        .join(" ")
    );

    let gate_cfg = GateConfig {
        mtu: cfg.mtu,
        num_queues: (cfg.queues * 2) as u32,
        queue_size: cfg.queue_size as u32,
    };
    let result = match (vduse, &listener) {
        (Some(prepared), _) => {
            crate::vduse::serve(prepared, backend.clone(), cfg.queues, &|d| stop.wait(d))
                .map_err(DaemonError::from)
        }
        (None, Some(listener)) => {
            let ctx = Ctx {
                backend: &backend,
                private: &private,
                gate_cfg,
                stop: &stop,
                sources: &sources,
                keep_tap: cfg.keep_tap,
                fd_store: fd_store.as_ref(),
            };
            serve(listener, &ctx, resume.flatten())
        }
        (None, None) => Ok(()),
    };
    if sources.handed_over() {
        // The new process serves on these: nothing is removed, the tap stays.
        cleanup.paths.clear();
        tap.keep_when_done(true);
        info!("handed over; exiting");
    } else if let Some(store) = &fd_store {
        store.clear();
    }
    backend.release_tx_rings();
    tap.release();
    drop(cleanup);
    for line in stats.report().lines() {
        info!("final stats {line}");
    }
    if let Some(why) = stop.fatal.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(DaemonError::Fatal(why));
    }
    result
}

/// Switches identity and installs the sandbox, as configured. `owned` are the files the
/// daemon created and must still be able to remove as the new user.
fn confine(cfg: &Config, owned: &[&Path]) -> Result<(), DaemonError> {
    let seccomp = cfg.sandbox == Sandbox::Seccomp;
    if seccomp {
        sandbox::drop_bounding_set()?;
    }
    if let Some((uid, gid)) = cfg.identity {
        let socket = match &cfg.listen {
            Listen::Path(p) => Some(p.as_path()),
            Listen::Fd(_) | Listen::Vduse(_) => None,
        };
        for p in owned {
            // The vhost-user socket keeps its --socket-group.
            let group = cfg
                .socket_group
                .filter(|_| socket == Some(*p))
                .unwrap_or(gid);
            std::os::unix::fs::chown(p, Some(uid), Some(group))
                .map_err(io_err("handing the daemon's files to --user"))?;
        }
        sandbox::switch_identity(uid, gid)?;
        info!("running as uid {uid} gid {gid}");
    }
    if seccomp {
        sandbox::drop_capabilities()?;
        let extra = match &cfg.listen {
            Listen::Vduse(_) => crate::vduse::uapi::serving_ioctls().to_vec(),
            _ => Vec::new(),
        };
        sandbox::install_seccomp_with(&extra)?;
        info!("sandbox: capabilities cleared, seccomp allow-list installed");
    }
    Ok(())
}

/// [`open_tap`] after a stored session was refused: systemd closes its copies of the tap's
/// queues when it handles the removal, which may come after this process tries to attach to a
/// single-queue tap (EBUSY until then).
fn open_tap_after_discard(cfg: &Config) -> Result<Arc<Tap>, DaemonError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match open_tap(cfg) {
            Err(DaemonError::Tap(crate::tap::TapError::Busy(_)))
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Opens the tap and checks that the kernel supports what is offered.
fn open_tap(cfg: &Config) -> Result<Arc<Tap>, DaemonError> {
    let ip_link = cfg.link == crate::config::Link::Ip;
    // A tun carries IP packets up to 65535 bytes; a tap adds its Ethernet header to that.
    let tap_mtu = if ip_link {
        cfg.mtu
    } else {
        cfg.mtu.min(TAP_MAX_MTU)
    };
    if tap_mtu != cfg.mtu {
        warn!("a tap takes at most MTU {TAP_MAX_MTU}; the card side uses {tap_mtu}, the host is offered {}", cfg.mtu);
    }
    let tap = Arc::new(Tap::open(&TapConfig {
        name: cfg.tap.clone(),
        netns: cfg.netns.clone(),
        mtu: tap_mtu,
        // On the IP-only link --mac is the card's MAC toward the host; a tun has none.
        mac: if ip_link { None } else { cfg.mac },
        queues: cfg.queues,
        tun: ip_link,
    })?);
    let offered = Negotiated::from_word(cfg.features);
    for (on, name) in [
        (offered.guest_uso4, "guest-uso4"),
        (offered.guest_uso6, "guest-uso6"),
    ] {
        // The kernel takes USO4 and USO6 only together (EINVAL for one alone).
        if on && !tap.supports_offload(TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6) {
            return Err(DaemonError::UsoUnsupported(name));
        }
    }

    Ok(tap)
}

/// Refuses, when dropped still holding it, the handover this process was started for: any
/// failure before the go (the old process then serves on).
struct Taking(Option<Incoming>);

impl Drop for Taking {
    fn drop(&mut self) {
        if let Some(mut inc) = self.0.take() {
            inc.refuse("the new process could not start (its log says why)");
        }
    }
}

/// A session a process taking over resumes: received, checked, and the go given.
struct Resume {
    frontend: UnixStream,
    state: ProtocolState,
    /// Frames the old process held for the guest's buffers: (pair, frame).
    held: Vec<(u16, Vec<u8>)>,
    /// Every received descriptor, in the blob's numbering.
    fds: Vec<OwnedFd>,
    /// The handover's connection to the old process; `None` for a session recovered from the
    /// fd store after a crash.
    incoming: Option<Incoming>,
    /// When the session stopped being served (a handover's pause, a recovery's start).
    paused_at: u64,
    /// Set once serving: from then on the socket files are this process's to remove.
    armed: Arc<AtomicBool>,
}

/// Why this configuration cannot hand its session over (yet), if it cannot.
fn handover_unavailable(cfg: &Config) -> Option<String> {
    if matches!(cfg.listen, Listen::Vduse(_)) {
        return Some("a VDUSE device is not handed over (the vhost-user transport is)".into());
    }
    if cfg.link == crate::config::Link::Ip {
        return Some("an IP-only link (--link ip, a tun device) is not handed over yet".into());
    }
    None
}

/// The card this configuration serves, as a handover's state names it.
fn device_of(cfg: &Config) -> DeviceState {
    DeviceState {
        tap: cfg.tap.clone(),
        pairs: cfg.queues as u16,
        queue_size: cfg.queue_size as u16,
        mtu: cfg.mtu,
        features: cfg.features,
    }
}

/// The tap of a session taken over: its received queues, kept whatever happens until this
/// process serves (the old process uses the same device until then).
fn adopt_tap(r: &Received) -> Result<Arc<Tap>, DaemonError> {
    let queues = r
        .state
        .taps
        .iter()
        .map(|&i| r.take(i))
        .collect::<io::Result<Vec<_>>>()
        .map_err(io_err("handover: the tap queues"))?;
    let tap = Tap::adopt(&r.state.device.tap, queues, r.state.tap_created)?;
    tap.keep_when_done(true);
    Ok(Arc::new(tap))
}

/// What serving frontends needs.
struct Ctx<'a> {
    backend: &'a Arc<CardBackend>,
    private: &'a Path,
    gate_cfg: GateConfig,
    stop: &'a Stop,
    sources: &'a Sources,
    keep_tap: bool,
    /// Where the live session is kept for a restart after a crash.
    fd_store: Option<&'a Arc<crate::handover::fdstore::FdStore>>,
}

fn serve(listener: &UnixListener, ctx: &Ctx, resume: Option<Resume>) -> Result<(), DaemonError> {
    let (backend, stop, sources) = (ctx.backend, ctx.stop, ctx.sources);
    listener.set_nonblocking(true).map_err(io_err("listener"))?;
    // After a session: whether this process handed it over and ends.
    let ended = |result: Result<(), DaemonError>| {
        if sources.after_session() {
            info!("the session is served by the new process");
            return true;
        }
        match result {
            Ok(()) => info!("frontend disconnected; listening again"),
            Err(e) => error!("frontend session ended with an error: {e}; listening again"),
        }
        if let Some(store) = ctx.fd_store {
            store.clear();
        }
        backend.reset_connection();
        backend.stats().set_connected(false);
        for line in backend.stats().report().lines() {
            info!("stats {line}");
        }
        false
    };
    if let Some(r) = resume {
        info!("frontend session taken over");
        backend.stats().set_resumed();
        let frontend = r.frontend.try_clone().map_err(io_err("frontend socket"))?;
        match serve_one(frontend, ctx, Some(r)) {
            // Rebuilding failed after the go: ending leaves the old process serving.
            Err(e @ DaemonError::Handover(_)) => return Err(e),
            result => {
                if ended(result) {
                    return Ok(());
                }
            }
        }
    }
    while !stop.requested() {
        crate::poll::readable_or_stop(listener.as_raw_fd(), stop.event.as_raw_fd())
            .map_err(io_err("poll"))?;
        if stop.requested() {
            break;
        }
        let stream = sources.accept(|| match listener.accept() {
            Ok((s, _)) => Some(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => {
                warn!("accept failed: {e}");
                None
            }
        });
        let Some(stream) = stream else {
            if sources.handed_over() {
                break;
            }
            continue;
        };
        if let Err(e) = stream.set_nonblocking(false) {
            warn!("frontend socket: {e}");
            sources.after_session();
            continue;
        }
        info!("frontend connected");
        backend.stats().set_connected(true);
        if ended(serve_one(stream, ctx, None)) {
            break;
        }
    }
    Ok(())
}

fn serve_one(frontend: UnixStream, ctx: &Ctx, resume: Option<Resume>) -> Result<(), DaemonError> {
    let (backend, stop) = (ctx.backend, ctx.stop);
    let vhost = |e: vhost_user_backend::Error| DaemonError::Vhost(e.to_string());
    let inner_path = ctx.private.join(HANDLER_SOCKET);
    let mut inner_listener = Listener::new(&inner_path, true)
        .map_err(|e| DaemonError::Vhost(format!("inner listener: {e}")))?;
    let gate_side = UnixStream::connect(&inner_path).map_err(io_err("connecting the gate"))?;
    let mut daemon = VhostUserDaemon::new(
        "vhost-card".to_string(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(vhost)?;
    for (i, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        for (fd, ev, id) in backend.extra_listeners(i) {
            handler
                .register_listener(fd, ev, id)
                .map_err(io_err("registering the tap with a worker"))?;
        }
    }
    daemon.start(&mut inner_listener).map_err(vhost)?;
    drop(inner_listener);

    let (steer, announce, calls) = (backend.clone(), backend.clone(), backend.clone());
    // The answers the frontend is owed, kept with the session in the fd store.
    let ledger = match ctx.fd_store {
        Some(_) => Some(Arc::new(
            crate::handover::fdstore::Ledger::new().map_err(io_err("the reply ledger"))?,
        )),
        None => None,
    };
    let hooks = Hooks {
        pair: Box::new(move |pair: usize, enabled: bool| steer.pair_enabled(pair, enabled)),
        rarp: Box::new(move |mac| announce.send_rarp(mac)),
        record: match ctx.fd_store {
            Some(store) => {
                let (store, f, ledger) = (
                    store.clone(),
                    frontend.try_clone().map_err(io_err("frontend socket"))?,
                    ledger.clone(),
                );
                Some(Box::new(
                    move |hdr: &crate::gate::Hdr, body: &[u8], rec: &Recorder| {
                        if let Some(l) = ledger
                            .as_ref()
                            .filter(|_| crate::handover::fdstore::changes_session(hdr.request))
                        {
                            store.save(f.as_fd(), l, rec, Some((hdr.request, body)));
                        }
                    },
                ))
            }
            None => None,
        },
        ledger: ledger.clone(),
        call: Some(Box::new(move |ring, fd| calls.call_installed(ring, fd))),
    };
    let gate = match resume {
        None => Gate::start(frontend, gate_side, ctx.gate_cfg, hooks)
            .map_err(io_err("starting the gate"))?,
        Some(r) => {
            let gate = resume_gate(frontend, gate_side, ctx, hooks, &r, ledger.as_deref())?;
            r.armed.store(true, Ordering::SeqCst);
            ctx.sources.tap.keep_when_done(ctx.keep_tap);
            let no_call = r.state.rings.iter().enumerate();
            for (ring, _) in no_call.filter(|(_, x)| x.started && x.call.is_none()) {
                backend.owe_call(ring);
            }
            match r.incoming {
                Some(inc) => {
                    let outage = inc.serving(r.paused_at);
                    info!(
                        "handover: serving the session taken over; {:.1} ms without service",
                        outage as f64 / 1000.0
                    );
                }
                None => {
                    crate::handover::fdstore::wake(&r.state, &r.fds);
                    info!(
                        "crash recovery: serving the session on the same connection, {:.1} ms \
                         after start-up",
                        crate::handover::steps::now_us().saturating_sub(r.paused_at) as f64
                            / 1000.0
                    );
                }
            }
            gate
        }
    };
    *stop.frontend.lock().unwrap_or_else(|p| p.into_inner()) = gate.frontend_handle().ok();
    match (gate.pauser(), gate.frontend_handle()) {
        (Ok(pauser), Ok(f)) => ctx.sources.running(pauser, f),
        _ => warn!("this session cannot be handed over (no pause handle)"),
    }
    if stop.requested() {
        gate.shutdown();
    }
    let result = daemon.wait();
    *stop.frontend.lock().unwrap_or_else(|p| p.into_inner()) = None;
    gate.join();
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // Dropping the daemon joins its worker threads before the next connection starts.
    drop(daemon);
    match result {
        Ok(()) => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) if stop.requested() => {
            log::debug!("session ended by stop: {e}");
            Ok(())
        }
        Err(e) => Err(vhost(e)),
    }
}

/// Rebuilds a session taken over in this process's handler (the requests a frontend would
/// have sent, `handover::replay::rebuild`) and starts a gate from its record.
fn resume_gate(
    frontend: UnixStream,
    gate_side: UnixStream,
    ctx: &Ctx,
    hooks: Hooks,
    r: &Resume,
    ledger: Option<&crate::handover::fdstore::Ledger>,
) -> Result<Gate, DaemonError> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| DaemonError::Handover(format!("{what}: {e}"));
    let fds: Vec<BorrowedFd> = r.fds.iter().map(|f| f.as_fd()).collect();
    gate_side
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| fail("handler socket", &e))?;
    crate::handover::replay::send(
        &gate_side,
        &crate::handover::replay::rebuild(&r.state),
        &fds,
    )
    .map_err(|e| fail("rebuilding the session", &e))?;
    gate_side
        .set_read_timeout(None)
        .map_err(|e| fail("handler socket", &e))?;
    let record = Recorder::restore(&r.state, &fds).map_err(|e| fail("the session's record", &e))?;
    if let (Some(store), Some(ledger)) = (ctx.fd_store, ledger) {
        // Resumed (a handover, a recovery): the store holds this process's view from now on.
        store.save(frontend.as_fd(), ledger, &record, None);
    }
    Gate::resume(frontend, gate_side, ctx.gate_cfg, hooks, record)
        .map_err(|e| fail("starting the gate", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every error that carries an OS error prints the OS's words once, also through anyhow's
    /// `{:#}` (which follows `source()`), as `main` prints it.
    #[test]
    fn causes_are_printed_once() {
        let os = || io::Error::from_raw_os_error(libc::ENOENT);
        let errors: Vec<DaemonError> = vec![
            DaemonError::Listen {
                path: "/x/s.sock".into(),
                cause: os(),
            },
            DaemonError::Io {
                what: "poll",
                cause: os(),
            },
            DaemonError::Control {
                path: "/x/c".into(),
                cause: os(),
            },
            DaemonError::Metrics {
                addr: "127.0.0.1:1".parse().unwrap(),
                cause: os(),
            },
            DaemonError::SocketAccess {
                path: "/x/s.sock".into(),
                cause: os(),
            },
            DaemonError::Tap(TapError::Io {
                op: "TUNSETIFF",
                name: "card0".into(),
                cause: os(),
            }),
            DaemonError::Tap(TapError::Netns(crate::netns::NetnsError::Enter {
                name: "card".into(),
                cause: os(),
            })),
            DaemonError::Sandbox(SandboxError::Switch {
                uid: 1,
                gid: 1,
                cause: os(),
            }),
        ];
        for e in errors {
            let text = format!("{:#}", anyhow::Error::from(e));
            assert_eq!(
                text.matches("No such file or directory (os error 2)")
                    .count(),
                1,
                "{text}"
            );
        }
    }
}
