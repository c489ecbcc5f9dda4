//! Crash recovery through systemd's file descriptor store (issue 12, part 2), with this test
//! in systemd's role (`card_tests::sdnotify`: the notify socket and the store as systemd 252
//! keeps them, `FileDescriptorStoreMax=` and the command line's `--fd 3 --fd-store` read from
//! host-config/systemd/vhost-card@.service): the daemon is started with the socket unit's
//! listener as descriptor 3 and `$NOTIFY_SOCKET`; the harness's frontend runs a session; the
//! daemon is killed with SIGKILL while the frontend keeps its connection; a new daemon process
//! is started with `LISTEN_FDS`/`LISTEN_FDNAMES`/`LISTEN_PID` set to what the store holds, as
//! `Restart=always`, `RestartSec=0` does. Frames then flow each way on the same connection
//! (nothing reconnects: the listener never sees a connection), the used indices count every
//! frame, and the time from the kill to the first frame through is printed. Hostile stores
//! (garbage or truncated state, descriptors of the wrong kind, a missing name, another version)
//! make the daemon start fresh, with every stored descriptor closed and removed from the store.

use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use card_tests::card::{Card, Traffic, CARD_IP};
use card_tests::daemon::{binary, Daemon};
use card_tests::netdev::TxLayout;
use card_tests::netdev::{VirtioNet, F_LOG_ALL};
use card_tests::packet::{pattern, VnetHdr};
use card_tests::sdnotify::{place_fds, Manager};
use card_tests::TempDir;

/// The service unit's value of `key=` (the last one wins, as in systemd).
fn unit_value(key: &str) -> Result<String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../host-config/systemd/vhost-card@.service");
    let text = std::fs::read_to_string(&path)?;
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {key}= in {}", path.display()))
}

/// systemd around one card: the socket unit's listener, the notify socket and fd store.
struct Systemd {
    _dir: TempDir,
    socket: PathBuf,
    listener: UnixListener,
    notify: Manager,
    /// The daemon's flags besides the ones every test daemon gets.
    flags: Vec<String>,
}

impl Systemd {
    fn new(extra: &[&str]) -> Result<Systemd> {
        ensure!(
            unit_value("Restart")? == "always",
            "the unit must restart after a crash"
        );
        ensure!(
            unit_value("RestartSec")? == "0",
            "the unit must restart at once"
        );
        let exec = unit_value("ExecStart")?;
        ensure!(
            exec.contains("--fd 3") && exec.contains("--fd-store"),
            "ExecStart does not keep the session in the store: {exec}"
        );
        let max: usize = unit_value("FileDescriptorStoreMax")?.parse()?;
        let dir = TempDir::new("fdstore")?;
        let socket = dir.path().join("card.sock");
        let listener = UnixListener::bind(&socket)?;
        listener.set_nonblocking(true)?;
        let notify = Manager::new(dir.path(), max)?;
        let mut flags: Vec<String> = ["--fd", "3", "--fd-store"].map(String::from).to_vec();
        flags.extend(extra.iter().map(|s| s.to_string()));
        Ok(Systemd {
            _dir: dir,
            socket,
            listener,
            notify,
            flags,
        })
    }

    /// Starts the daemon as systemd does: the listener as descriptor 3, then `stored` (as
    /// handed out by the store), `LISTEN_PID` the daemon's own.
    fn start(&self, netns: &str, stored: Stored) -> Result<Daemon> {
        self.start_with(netns, stored, &self.flags)
    }

    fn start_with(&self, netns: &str, stored: Stored, flags: &[String]) -> Result<Daemon> {
        let dir = TempDir::new("fdstore-d")?;
        let mut names = vec!["vhost-card@t.socket".to_string()];
        let mut fds = vec![self.listener.as_fd().try_clone_to_owned()?];
        for (name, fd) in stored {
            names.push(name);
            fds.push(fd);
        }
        let mut args: Vec<String> = flags.to_vec();
        args.extend(
            ["--netns", netns, "--tap", "card0", "--stats-interval", "1"].map(String::from),
        );
        // `sh` sets LISTEN_PID to its own pid, which the daemon keeps through exec.
        let mut cmd = rig::daemon::command_via(
            &["sh", "-c", "export LISTEN_PID=$$; exec \"$0\" \"$@\""],
            &binary()?,
            &args,
            &dir.path().join("daemon.log"),
            dir.path(),
        )?;
        cmd.env("NOTIFY_SOCKET", self.notify.path())
            .env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        place_fds(&mut cmd, fds);
        Daemon::spawn(cmd, self.socket.clone(), dir)
    }

    /// No frontend connected again (a reconnect would show as a pending connection).
    fn no_reconnect(&self) -> Result<()> {
        match self.listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Ok(_) => anyhow::bail!("a frontend connected again"),
            Err(e) => Err(e.into()),
        }
    }
}

/// What the store holds, as it hands it out: (name, descriptor).
type Stored = Vec<(String, OwnedFd)>;

/// What a session of one queue pair stores (two regions of one memfd: stored once).
const SESSION: &[&str] = &[
    "state", "replies", "frontend", "tap-0", "region-0", "kick-0", "kick-1", "call-0", "call-1",
];

/// The inode of a socket descriptor, as /proc/PID/fd names it (`socket:[N]`).
fn socket_link(fd: &OwnedFd) -> Result<String> {
    Ok(
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?
            .display()
            .to_string(),
    )
}

/// The targets of every descriptor of process `pid`.
fn fd_links(pid: u32) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        if let Ok(l) = std::fs::read_link(e?.path()) {
            v.push(l.display().to_string());
        }
    }
    Ok(v)
}

/// Whether an eventfd has a count (without taking it).
fn readable(fd: &impl AsRawFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one pollfd we own, no wait.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// A memfd holding `bytes` (a forged state).
fn memfd_with(bytes: &[u8]) -> Result<OwnedFd> {
    let fd = card_tests::fds::memfd(0)?;
    use std::io::Write;
    std::fs::File::from(fd.try_clone()?).write_all(bytes)?;
    Ok(fd)
}

fn read_all(fd: &OwnedFd) -> Result<Vec<u8>> {
    use std::io::{Read, Seek};
    let mut f = std::fs::File::from(fd.try_clone()?);
    f.rewind()?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

/// A card whose daemon systemd started (flags `extra`), a driver with a session on it (guest
/// memory as two regions of one memfd, as QEMU sends it), one frame each way, and the session
/// in the store.
fn session(extra: &[&str]) -> Result<(Systemd, Card, VirtioNet, Traffic)> {
    let ns = Card::namespace()?;
    let sd = Systemd::new(extra)?;
    let first = sd.start(ns.name(), Vec::new())?;
    let card = Card::around(ns, first)?;
    let (mut dev, _) = card.driver_custom(|f| f & !F_LOG_ALL, |o| o.split_memory = true)?;
    let mut traffic = Traffic::default();
    traffic.round(&card, &mut dev)?;
    sd.notify
        .wait_for(SESSION, Duration::from_millis(300), Duration::from_secs(10))?;
    Ok((sd, card, dev, traffic))
}

#[test]
fn a_killed_daemon_resumes_the_session_on_the_same_connection() -> Result<()> {
    let (sd, mut card, mut dev, mut traffic) = session(&[])?;
    let names = sd.notify.names();
    ensure!(names.len() == SESSION.len(), "stored: {names:?}");
    ensure!(sd.notify.refused() == 0, "systemd refused descriptors");

    for crash in 0..3 {
        let killed_at = Instant::now();
        let status = card.daemon.kill()?;
        ensure!(!status.success(), "{status}");
        let next = sd.start(card.ns.name(), sd.notify.handout()?)?;
        let started = killed_at.elapsed();
        // The old Daemon's drop prints its log (shown only on failure).
        card.daemon = next;
        let seed = (traffic.rounds % 200) as u8;
        card.check_host_to_card(&mut dev, 8000 + traffic.rounds, seed)?;
        let first_frame = killed_at.elapsed();
        card.check_card_to_host(&mut dev, seed)?;
        traffic.rounds += 1;
        let tx = dev.tx.used_idx(&dev.mem)?;
        ensure!(
            tx == traffic.rounds,
            "TX used index {tx} after {} frames",
            traffic.rounds
        );
        traffic.round(&card, &mut dev)?;
        card.daemon.wait_log(
            "crash recovery: serving the session on the same connection",
            Duration::from_secs(5),
        )?;
        sd.no_reconnect()?;
        println!(
            "crash {crash}: kill -> new process listening {:.1} ms, kill -> first frame host->card {:.1} ms",
            started.as_secs_f64() * 1000.0,
            first_frame.as_secs_f64() * 1000.0
        );
    }
    // Signals the crashed process may have owed: a chain it completed and did not signal. The
    // restarted daemon signals each started ring once (here the only source: nothing moves).
    card.daemon.kill()?;
    for q in [&dev.rx, &dev.tx] {
        while readable(&q.call) {
            q.call.read()?;
        }
    }
    card.daemon = sd.start(card.ns.name(), sd.notify.handout()?)?;
    card.daemon
        .wait_log("crash recovery: serving", Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_millis(50));
    ensure!(
        readable(&dev.rx.call) && readable(&dev.tx.call),
        "the restarted daemon did not signal the started rings"
    );
    // A kick the crashed process read and never acted on (a TX chain announced, its kick
    // consumed): taken all the same.
    card.daemon.kill()?;
    let port = 9000;
    let sock = card.ns.udp_socket(SocketAddrV4::new(CARD_IP, port))?;
    let payload = pattern(200, 77);
    let frame = card.frame_to(SocketAddrV4::new(CARD_IP, port), 40000, &payload)?;
    let head = dev.send(&VnetHdr::default(), &frame, &TxLayout::Split)?;
    dev.tx.kick.read()?;
    card.daemon = sd.start(card.ns.name(), sd.notify.handout()?)?;
    dev.wait_tx(head)?;
    let mut buf = [0u8; 2048];
    let (n, _) = sock
        .recv_from(&mut buf)
        .context("the frame whose kick was consumed never reached the card")?;
    ensure!(buf[..n] == payload[..], "payload corrupted");
    traffic.rounds += 1;
    traffic.round(&card, &mut dev)?;
    // A request the frontend sends while no daemon runs waits in the socket and is answered
    // by the restarted one (the frontend blocks on the answer meanwhile, as QEMU does). The
    // daemon is started from this thread (its parent-death signal follows the thread).
    card.daemon.kill()?;
    let ctl = &mut dev.ctl;
    let (next, features) = std::thread::scope(|s| {
        let ask = s.spawn(|| ctl.raw_request_reply(1, 0, &[], &[]));
        std::thread::sleep(Duration::from_millis(100));
        let next = sd.start(card.ns.name(), sd.notify.handout()?);
        let features = ask
            .join()
            .map_err(|_| anyhow::anyhow!("GET_FEATURES panicked"))?;
        anyhow::Ok((next, features))
    })?;
    card.daemon = next?;
    let features = u64::from_le_bytes(features?[..8].try_into()?);
    ensure!(
        features & (1 << 32) != 0,
        "GET_FEATURES answered {features:#x}"
    );
    traffic.round(&card, &mut dev)?;
    // The store still describes the session, now the new process's.
    sd.notify
        .wait_for(SESSION, Duration::from_millis(100), Duration::from_secs(5))?;
    // The rings stop where the used indices say: nothing in flight, nothing completed twice.
    let bases = dev.get_vring_bases()?;
    let rx_used = dev.rx.used_idx(&dev.mem)?;
    let tx_used = dev.tx.used_idx(&dev.mem)?;
    ensure!(
        bases[1] == u32::from(tx_used) && tx_used == traffic.rounds,
        "TX stopped at {}, used index {tx_used}, {} frames",
        bases[1],
        traffic.rounds
    );
    ensure!(
        bases[0] == u32::from(rx_used),
        "RX stopped at {}, used {rx_used}",
        bases[0]
    );
    // A stop empties the store: a later start does not resume a dead session.
    card.daemon.stop()?;
    let left = sd.notify.names();
    ensure!(
        left.is_empty(),
        "the store still holds {left:?} after a stop"
    );
    Ok(())
}

/// Hostile stores make the daemon start fresh: every stored descriptor closed (the frontend's
/// connection is not among the new process's) and removed from the store; then the untouched
/// store still recovers (two queue pairs, the second one unused: its tap queue is detached, and
/// stored and adopted as such).
#[test]
fn a_hostile_store_is_refused_and_the_daemon_starts_fresh() -> Result<()> {
    let (sd, mut card, mut dev, mut traffic) = session(&["--queues", "2"])?;
    card.daemon.kill()?;
    let pristine = sd.notify.handout()?;
    let frontend = &pristine
        .iter()
        .find(|(n, _)| n == "frontend")
        .context("no frontend stored")?
        .1;
    let frontend_link = socket_link(frontend)?;
    let state_bytes = read_all(
        &pristine
            .iter()
            .find(|(n, _)| n == "state")
            .context("no state")?
            .1,
    )?;
    let copy = |alter: &dyn Fn(&mut Stored) -> Result<()>| -> Result<Stored> {
        let mut v = pristine
            .iter()
            .map(|(n, f)| Ok((n.clone(), f.try_clone()?)))
            .collect::<Result<Vec<_>>>()?;
        alter(&mut v)?;
        Ok(v)
    };
    let set_state = |v: &mut Stored, bytes: &[u8]| -> Result<()> {
        let fd = memfd_with(bytes)?;
        for e in v.iter_mut().filter(|(n, _)| n == "state") {
            e.1 = fd.try_clone()?;
        }
        Ok(())
    };
    let mut versioned: serde_json::Value = serde_json::from_slice(&state_bytes)?;
    versioned["state"]["version"] = 2.into();
    let versioned = serde_json::to_vec(&versioned)?;
    let cases: Vec<(&str, Stored, &str)> = vec![
        (
            "garbage state",
            copy(&|v| set_state(v, b"\x00garbage{"))?,
            "not a stored state",
        ),
        (
            "truncated state",
            copy(&|v| set_state(v, &state_bytes[..state_bytes.len() / 2]))?,
            "not a stored state",
        ),
        (
            "state of version 2",
            copy(&|v| set_state(v, &versioned))?,
            "version 2",
        ),
        (
            "wrong kinds (tap-0 and kick-0 swapped)",
            copy(&|v| {
                let t = v.iter().position(|(n, _)| n == "tap-0").context("tap-0")?;
                let k = v
                    .iter()
                    .position(|(n, _)| n == "kick-0")
                    .context("kick-0")?;
                v[t].0 = "kick-0".into();
                v[k].0 = "tap-0".into();
                Ok(())
            })?,
            "descriptor",
        ),
        (
            "an answer owed",
            copy(&|v| {
                let owed = memfd_with(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])?;
                for e in v.iter_mut().filter(|(n, _)| n == "replies") {
                    e.1 = owed.try_clone()?;
                }
                Ok(())
            })?,
            "waits for the answer",
        ),
        (
            "missing frontend",
            copy(&|v| {
                v.retain(|(n, _)| n != "frontend");
                Ok(())
            })?,
            "no descriptor \"frontend\"",
        ),
    ];
    for (what, store, why) in cases {
        sd.notify.set(store);
        let mut d = sd.start(card.ns.name(), sd.notify.handout()?)?;
        let log = d.log();
        ensure!(
            log.contains("crash recovery refused") && log.contains(why),
            "{what}: not refused for '{why}':\n{log}"
        );
        d.check_running()?;
        let links = fd_links(d.pid()?)?;
        ensure!(
            !links.contains(&frontend_link),
            "{what}: the daemon kept the frontend's connection"
        );
        let left = sd.notify.names();
        ensure!(left.is_empty(), "{what}: the store still holds {left:?}");
        println!("{what}: refused, started fresh, store emptied");
        d.kill()?;
    }
    // A daemon started without --fd-store (the unit changed since) discards what is stored.
    sd.notify.set(copy(&|_| Ok(()))?);
    let flags: Vec<String> = sd
        .flags
        .iter()
        .filter(|f| *f != "--fd-store")
        .cloned()
        .collect();
    let mut d = sd.start_with(card.ns.name(), sd.notify.handout()?, &flags)?;
    d.wait_log(
        "the store is off (no --fd-store); discarded",
        Duration::from_secs(5),
    )?;
    ensure!(
        !fd_links(d.pid()?)?.contains(&frontend_link),
        "kept the frontend's connection"
    );
    ensure!(
        sd.notify.names().is_empty(),
        "the store still holds {:?}",
        sd.notify.names()
    );
    d.kill()?;
    // The untouched store recovers.
    sd.notify.set(copy(&|_| Ok(()))?);
    drop(pristine);
    let next = sd.start(card.ns.name(), sd.notify.handout()?)?;
    card.daemon = next;
    traffic.round(&card, &mut dev)?;
    card.daemon
        .wait_log("crash recovery: serving", Duration::from_secs(5))?;
    sd.no_reconnect()?;
    ensure!(
        !sd.notify.messages().is_empty() && sd.notify.refused() == 0,
        "systemd refused descriptors"
    );
    Ok(())
}

/// A live handover (`vhost-card upgrade`, as `systemctl reload` runs it with the unit's
/// `$NOTIFY_SOCKET`) with the store on: the new process takes the store over (it stores the
/// session again as its own), and a SIGKILL of the new process is recovered from it.
#[test]
fn after_a_live_handover_the_new_process_keeps_the_store() -> Result<()> {
    let control_dir = TempDir::new("fdstore-ctl")?;
    let control = control_dir.path().join("card.control");
    let (sd, mut card, mut dev, mut traffic) = session(&["--control", &control.to_string_lossy()])?;
    let log = card.daemon.log_path().to_path_buf();
    let before = sd.notify.messages().len();

    let out = std::process::Command::new(binary()?)
        .args(["upgrade", "--control"])
        .arg(&control)
        .env("NOTIFY_SOCKET", sd.notify.path())
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::OpenOptions::new().append(true).open(&log)?)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "upgrade failed: {text}\n{}",
        card.daemon.log()
    );
    let (pid, _) = rig::card::parse_upgrade(&text)?;
    let status = card.daemon.wait_exit(Duration::from_secs(10))?;
    ensure!(status.success(), "the old process ended with {status}");
    traffic.round(&card, &mut dev)?;
    // The new process stored the whole session again (its first save removes every name it
    // may have and stores all), and nothing was refused.
    sd.notify
        .wait_for(SESSION, Duration::from_millis(300), Duration::from_secs(10))?;
    let msgs = sd.notify.messages();
    ensure!(
        msgs[before..]
            .iter()
            .any(|m| m.contains("FDNAME=frontend") && m.contains("FDSTORE=1")),
        "the new process did not store the frontend's connection"
    );
    ensure!(
        msgs[before..]
            .iter()
            .any(|m| m.contains(&format!("MAINPID={pid}"))),
        "the old process did not hand systemd the new main PID"
    );
    ensure!(sd.notify.refused() == 0, "systemd refused descriptors");

    // SIGKILL the new process (not this test's child): recovered from what it stored.
    let killed_at = Instant::now();
    // SAFETY: kill has no memory effects; the pid is the daemon the upgrade started.
    ensure!(unsafe { libc::kill(pid.cast_signed(), libc::SIGKILL) } == 0);
    while std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
    {
        ensure!(
            killed_at.elapsed() < Duration::from_secs(10),
            "{pid} survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    card.daemon = sd.start(card.ns.name(), sd.notify.handout()?)?;
    traffic.round(&card, &mut dev)?;
    println!(
        "after a handover: kill -> frames both ways {:.1} ms",
        killed_at.elapsed().as_secs_f64() * 1000.0
    );
    card.daemon
        .wait_log("crash recovery: serving", Duration::from_secs(5))?;
    sd.no_reconnect()?;
    // The frontend leaves: the session is over, and so is what the store holds.
    drop(dev);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sd.notify.names().is_empty() {
        ensure!(
            Instant::now() < deadline,
            "the store still holds {:?} after the frontend left",
            sd.notify.names()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    card.daemon.check_running()?;
    Ok(())
}
