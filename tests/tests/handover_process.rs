//! Live handover between two real processes (issue 12): the harness's frontend runs a session
//! with the real daemon and its tap in a private namespace; `vhost-card upgrade` makes a new
//! process of the binary take it over on the same connection, 20 times in a row. Traffic goes
//! on each way, no chain is completed twice or lost (the used indices count every frame, and
//! at the end the rings stop with nothing in flight), the counters go on, and the serving
//! process holds as many descriptors and about as much memory after the 20th handover as after
//! the first. Refusals leave the old process serving: a peer that answers the state with
//! garbage, and a real new process given a state of another version or descriptors of the wrong
//! kind (the test sits between the two processes and alters what passes).

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use card_tests::card::{Card, Traffic};
use card_tests::daemon::{binary, rss_kib_of as rss_kib};
use card_tests::netdev::F_LOG_ALL;
use card_tests::TempDir;
use vhost_card::control::read_line;
use vhost_card::handover::state::SessionState;
use vhost_card::handover::steps::{self, Offer, Step, CONNECTION_ENV, REQUEST};
use vhost_card::handover::wire;

const UPGRADES: usize = 20;

/// A daemon process the test did not start as its child (the upgrade did): SIGTERM on drop.
struct Serving(u32);

impl Drop for Serving {
    fn drop(&mut self) {
        // SAFETY: kill has no memory effects; the pid is the daemon this test made serve.
        unsafe { libc::kill(self.0.cast_signed(), libc::SIGTERM) };
        let _ = wait_gone(self.0, Duration::from_secs(10));
    }
}

/// Waits until process `pid` has exited (gone, or a zombie).
fn wait_gone(pid: u32, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return Ok(()),
            Ok(s) if s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')) => return Ok(()),
            Ok(_) if Instant::now() >= deadline => bail!("process {pid} still runs"),
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The log file, opened to append (the new processes log where the first one does).
fn log_file(log: &Path) -> Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new().append(true).open(log)?)
}

/// Runs `vhost-card upgrade`: the new process's pid and the outage it printed (ms).
fn upgrade(control: &Path, log: &Path) -> Result<(u32, f64)> {
    let out = Command::new(binary()?)
        .args(["upgrade", "--control"])
        .arg(control)
        .stdin(Stdio::null())
        .stderr(log_file(log)?)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "upgrade failed ({}): {text}\nlog:\n{}",
        out.status,
        std::fs::read_to_string(log).unwrap_or_default()
    );
    rig::card::parse_upgrade(&text)
}

/// Opens a handover request on the control socket: the snapshot's offer and the connection.
fn request(control: &Path) -> Result<(Offer, UnixStream)> {
    let mut c = UnixStream::connect(control)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let snap: serde_json::Value = serde_json::from_str(&read_line(&mut c, 1 << 20)?)?;
    let offer: Offer = serde_json::from_value(snap["handover"].clone())?;
    c.write_all(format!("{REQUEST}\n").as_bytes())?;
    Ok((offer, c))
}

/// Starts the binary as `upgrade` does, its end of the connection being `theirs`.
fn start_new(offer: &Offer, theirs: &UnixStream, log: &Path) -> Result<std::process::Child> {
    // SAFETY: dup of a descriptor we hold; the copy (inherited by the child) is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(libc::dup(theirs.as_raw_fd())) };
    let child = Command::new(binary()?)
        .args(&offer.args)
        .env(CONNECTION_ENV, fd.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(log)?)
        .spawn()?;
    Ok(child)
}

/// The test between the daemon (`old`) and a real new process: the hellos pass, the state is
/// altered by `alter` on its way, and the new process's verdict goes back to the daemon.
fn through_the_middle(
    control: &Path,
    log: &Path,
    alter: impl FnOnce(&mut serde_json::Value, &mut Vec<OwnedFd>),
) -> Result<String> {
    let (offer, old) = request(control)?;
    let (mine, theirs) = UnixStream::pair()?;
    let mut child = start_new(&offer, &theirs, log)?;
    drop(theirs);
    mine.set_read_timeout(Some(Duration::from_secs(30)))?;
    let hello = steps::recv(&mine).map_err(anyhow::Error::msg)?;
    ensure!(matches!(hello, Step::Hello { .. }), "{hello:?}");
    steps::send(&old, &hello).map_err(anyhow::Error::msg)?;
    let (payload, mut fds) = wire::recv(&old)?;
    let mut blob: serde_json::Value = serde_json::from_slice(&payload)?;
    alter(&mut blob, &mut fds);
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    wire::send(&mine, &serde_json::to_vec(&blob)?, &borrowed)?;
    let verdict = steps::recv(&mine).map_err(anyhow::Error::msg)?;
    steps::send(&old, &verdict).map_err(anyhow::Error::msg)?;
    let status = child.wait()?;
    ensure!(!status.success(), "the new process accepted: {verdict:?}");
    match verdict {
        Step::Refused { why } => Ok(why),
        other => bail!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_running_session_moves_to_new_processes_without_the_frontend_noticing() -> Result<()> {
    let dir = TempDir::new("handover-proc")?;
    let control = dir.path().join("card.control");
    let mut card = Card::start(&["--control", &control.to_string_lossy()])?;
    let log = card.daemon.log_path().to_path_buf();
    // As QEMU: the dirty log only while migrating.
    let (mut dev, _) = card.driver_with(|f| f & !F_LOG_ALL)?;
    let mut traffic = Traffic { rounds: 0 };
    traffic.round(&card, &mut dev)?;

    // A peer that takes the state and answers garbage: the old process serves on.
    let (_, c) = request(&control)?;
    steps::send(&c, &Step::Hello { pid: 1 }).map_err(anyhow::Error::msg)?;
    let (payload, fds) = wire::recv(&c)?;
    let state = SessionState::parse(&payload)?;
    ensure!(state.session.is_some(), "no session in the state");
    ensure!(fds.len() == state.fds.len(), "descriptors: {}", fds.len());
    wire::send(&c, b"{\"serving\":42}", &[])?;
    drop((c, fds));
    card.daemon
        .wait_log("handover refused", Duration::from_secs(10))?;
    traffic.round(&card, &mut dev)?;

    // A real new process given a state of another version refuses it for its version.
    let why = through_the_middle(&control, &log, |blob, _| blob["version"] = 2.into())?;
    ensure!(why.contains("version 2"), "refused for: {why}");
    traffic.round(&card, &mut dev)?;
    // ... and descriptors of the wrong kind (the listener and the first tap queue swapped).
    let why = through_the_middle(&control, &log, |blob, fds| {
        let l = blob["sockets"]["listener"].as_u64().unwrap_or(0) as usize;
        let t = blob["taps"][0].as_u64().unwrap_or(0) as usize;
        fds.swap(l, t);
    })?;
    ensure!(why.contains("descriptor"), "refused for: {why}");
    traffic.round(&card, &mut dev)?;
    card.daemon.check_running()?;

    // The handovers, one after the other.
    let mut outages = Vec::new();
    let mut fds = Vec::new();
    let mut rss = Vec::new();
    let (pid, ms) = upgrade(&control, &log)?;
    let status = card.daemon.wait_exit(Duration::from_secs(10))?;
    ensure!(status.success(), "the first process ended with {status}");
    let mut serving = Serving(pid);
    outages.push(ms);
    for i in 0..UPGRADES {
        traffic.round(&card, &mut dev)?;
        dev.ping()?;
        fds.push(fd_count(serving.0)?);
        rss.push(rss_kib(serving.0)?);
        if i + 1 == UPGRADES {
            break;
        }
        let (pid, ms) = upgrade(&control, &log)?;
        let old = std::mem::replace(&mut serving, Serving(pid));
        wait_gone(old.0, Duration::from_secs(10))?;
        std::mem::forget(old);
        outages.push(ms);
    }
    eprintln!("outages (ms): {outages:?}");
    eprintln!("descriptors of the serving process: {fds:?}");
    eprintln!("RSS of the serving process (KiB): {rss:?}");

    // The counters went on from process to process, and it is still one session.
    // (A pass adds its counts as it ends, a moment after the frontend saw the used buffer.)
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut snap = vhost_card::control::query_snapshot(&control)?;
    while snap.total("tx_frames") < u64::from(traffic.rounds) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        snap = vhost_card::control::query_snapshot(&control)?;
    }
    ensure!(
        snap.total("tx_frames") == u64::from(traffic.rounds),
        "tx_frames {} after {} frames",
        snap.total("tx_frames"),
        traffic.rounds
    );
    ensure!(
        snap.state.sessions == 1,
        "sessions: {}",
        snap.state.sessions
    );
    ensure!(snap.state.connected, "not connected");
    ensure!(
        fds.iter().all(|&n| n == fds[0]),
        "descriptors of each serving process: {fds:?}"
    );
    let (first, last) = (rss[1], rss[rss.len() - 1]);
    ensure!(
        last <= first + first / 5,
        "RSS grew from {first} to {last} KiB over {UPGRADES} handovers: {rss:?}"
    );
    // The rings stop with nothing in flight: every chain taken was completed once.
    let [rx_base, tx_base] = dev.get_vring_bases()?;
    ensure!(
        tx_base == u32::from(traffic.rounds),
        "TX stopped at {tx_base} after {} frames",
        traffic.rounds
    );
    let rx_used = u32::from(dev.rx.used_idx(&dev.mem)?);
    ensure!(
        rx_base == rx_used,
        "RX stopped at {rx_base}, used {rx_used}"
    );
    ensure!(card.tap_has_address()?, "card0 lost its address");
    drop(serving);
    Ok(())
}
