//! Socket activation (`--fd 3`), the way host-config/systemd/vhost-card@.{socket,service} use
//! it: the command line comes from the units themselves (ExecStart, ListenStream, with the
//! instance name and /run/vhost-card moved to the test's namespace and directory), and
//! `systemd-socket-activate` stands in for systemd: it holds the listening socket and starts
//! the daemon on the first connection, passing the socket as descriptor 3. A vhost-user
//! frontend then negotiates, traffic flows both ways, the counters are read with
//! `vhost-card stats --control`, and a second connection is served by the same inherited
//! socket. `systemd-analyze verify` checks the units.

use std::fs::File;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use card_tests::card::{CARD_IP, HOST_IP, HOST_MAC, TAP};
use card_tests::daemon::{binary, stats_cmd};
use card_tests::frontend::{Control, F_PROTOCOL_FEATURES};
use card_tests::netdev::{Options, TxLayout, VirtioNet, F_MTU};
use card_tests::netns::Netns;
use card_tests::packet::{pattern, udp_frame, VnetHdr};
use card_tests::TempDir;
use rig::process::have;
use vhost_card::stats::Snapshot;

fn unit_file(name: &str) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../host-config/systemd")
        .join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The value of `key=` in a unit file (the last one wins, as in systemd).
fn unit_value(text: &str, key: &str) -> Result<String> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| anyhow!("no {key}= in the unit"))
}

/// The units' convention, made concrete for `instance` with `/run/vhost-card/` and
/// `/etc/vhost-card/` moved to `run`: the socket, the daemon's command line, and the card's file
/// it reads (`--config /etc/vhost-card/<instance>.toml`), written here with the card's tap and
/// its control socket in `run` (by default it would be /run/vhost-card/<instance>.control).
struct Activation {
    socket: PathBuf,
    control: PathBuf,
    exec: Vec<String>,
}

fn from_units(instance: &str, run: &Path) -> Result<Activation> {
    let socket_unit = unit_file("vhost-card@.socket")?;
    let service_unit = unit_file("vhost-card@.service")?;
    let concrete = |s: &str| {
        s.replace("%i", instance)
            .replace("/run/vhost-card/", &format!("{}/", run.display()))
            .replace("/etc/vhost-card/", &format!("{}/", run.display()))
    };
    let socket = PathBuf::from(concrete(&unit_value(&socket_unit, "ListenStream")?));
    ensure!(
        unit_value(&socket_unit, "Accept")? == "no",
        "the socket unit must pass the listening socket (Accept=no)"
    );
    let exec: Vec<String> = unit_value(&service_unit, "ExecStart")?
        .split_whitespace()
        .map(concrete)
        .collect();
    ensure!(
        exec.windows(2).any(|w| w[0] == "--fd" && w[1] == "3"),
        "ExecStart does not serve descriptor 3: {exec:?}"
    );
    let card_file = exec
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| PathBuf::from(&w[1]))
        .ok_or_else(|| anyhow!("ExecStart has no --config: {exec:?}"))?;
    let control = run.join(format!("{instance}.control"));
    std::fs::write(
        &card_file,
        format!(
            "[daemon]\ntap = \"{TAP}\"\ncontrol = \"{}\"\n",
            control.display()
        ),
    )?;
    Ok(Activation {
        socket,
        control,
        exec,
    })
}

/// The activator and the daemon it becomes (same process: it execs on the first connection).
struct Activated {
    child: Option<Child>,
    log: PathBuf,
}

impl Activated {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().context("stopped")?.try_wait()? {
                bail!(
                    "exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no {needle:?} in the log within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: kill(2) on our own child, which has not been reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("ignored SIGTERM for 10 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        eprintln!("---- activator + daemon log ----\n{}", self.log());
    }
}

/// Counter `name` of queue pair 0 in `vhost-card stats --json`.
fn stat(snap: &Snapshot, name: &str) -> Result<u64> {
    snap.pairs
        .first()
        .and_then(|p| p.counters.get(name))
        .ok_or_else(|| anyhow!("no {name} in {snap:?}"))
}

/// `vhost-card stats --json --control PATH`.
fn stats(control: &Path) -> Result<Snapshot> {
    Ok(Snapshot::parse(&stats_cmd(control, &["--json"])?)?)
}

#[test]
fn units_are_valid_for_systemd() -> Result<()> {
    if !have("systemd-analyze") {
        bail!("systemd-analyze is missing (apt-get install systemd)");
    }
    let bin = binary()?;
    let mut units = Vec::new();
    for unit in ["vhost-card@.service", "vhost-card@.socket"] {
        let text = unit_file(unit)?.replace("/usr/local/bin/vhost-card", &bin.to_string_lossy());
        // card-os@.service is verified with card-os's own tests.
        units.push((unit, text.replace(" card-os@%i.service", "")));
    }
    rig::units::verify(
        &units,
        &["vhost-card@card.service", "vhost-card@card.socket"],
    )
}

#[test]
fn socket_activation_serves_the_inherited_socket() -> Result<()> {
    card_tests::require_root()?;
    if !have("systemd-socket-activate") {
        bail!("systemd-socket-activate is missing (apt-get install systemd)");
    }
    let ns = Netns::new("sa")?;
    ns.sysctl("net.ipv6.conf.all.disable_ipv6=1")?;
    ns.sysctl("net.ipv6.conf.default.disable_ipv6=1")?;
    let run = TempDir::new("card-tests")?;
    let act = from_units(ns.name(), run.path())?;
    let runtime = run.path().join("rt");
    std::fs::create_dir(&runtime)?;

    // systemd-socket-activate -l SOCKET vhost-card --fd 3 --config RUN/NS.toml
    let log = run.path().join("log");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l")
        .arg(&act.socket)
        .arg("-E")
        .arg(format!(
            "RUST_LOG={}",
            std::env::var("VHOST_CARD_LOG").unwrap_or_else(|_| "info".into())
        ))
        .arg("-E")
        .arg(format!("RUNTIME_DIRECTORY={}", runtime.display()))
        .arg(binary()?)
        .args(&act.exec[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log)?);
    eprintln!("{cmd:?}");
    let mut daemon = Activated {
        child: Some(cmd.spawn().context("starting systemd-socket-activate")?),
        log,
    };
    daemon.wait_log("Listening on", Duration::from_secs(10))?;
    ensure!(act.socket.exists(), "no socket at {}", act.socket.display());
    // Nothing runs until someone connects: no daemon, so no tap.
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        !ns.ip(&["-o", "link"])?.contains(TAP),
        "the tap exists before the first connection"
    );

    // The first connection starts the daemon; it negotiates over the inherited socket.
    let mut ctl = Control::connect(&act.socket)?;
    let offer = ctl.handshake()?;
    ensure!(
        offer.features & F_PROTOCOL_FEATURES != 0 && offer.features & F_MTU != 0,
        "offer {:#x}",
        offer.features
    );
    let mut dev = VirtioNet::start(ctl, offer.features, &Options::for_features(offer.features))?;
    daemon.wait_log("listening on inherited fd 3", Duration::from_secs(5))?;
    daemon.wait_log("frontend acked features", Duration::from_secs(5))?;

    // The card's address, and the host's MAC so no ARP is needed.
    let card_mac = card_tests::card::address(&ns)?;

    // Host -> card: UDP datagrams reach a socket on the card.
    let port = 7300;
    let sock = ns.udp_socket(SocketAddrV4::new(CARD_IP, port))?;
    let sent = 5u64;
    for i in 0..sent {
        let payload = pattern(300, i as u8);
        let frame = udp_frame(
            HOST_MAC,
            card_mac,
            SocketAddrV4::new(HOST_IP, 40000),
            SocketAddrV4::new(CARD_IP, port),
            &payload,
        )?;
        dev.send_wait(&VnetHdr::default(), &frame, &TxLayout::Split)?;
        let mut buf = [0u8; 2048];
        let n = sock.recv(&mut buf).context("nothing reached the card")?;
        ensure!(buf[..n] == payload[..], "datagram {i} corrupted");
    }
    // Card -> host: frames sent on card0 reach the driver.
    let pkt = ns.packet_socket(TAP)?;
    for i in 0..5u8 {
        let frame = udp_frame(
            card_mac,
            HOST_MAC,
            SocketAddrV4::new(CARD_IP, 5555),
            SocketAddrV4::new(HOST_IP, 6000 + u16::from(i)),
            &pattern(200, i),
        )?;
        pkt.send(&frame)?;
        dev.recv_matching(Duration::from_secs(5), |f| f.frame == frame)?;
    }

    // The counters, through the control socket the unit names.
    let json = stats(&act.control)?;
    eprintln!(
        "vhost-card stats --control {}:\n{}",
        act.control.display(),
        json.table()
    );
    ensure!(stat(&json, "tx_frames")? == sent, "tx_frames in {json:?}");
    ensure!(stat(&json, "rx_frames")? >= 5, "rx_frames in {json:?}");
    ensure!(stat(&json, "tx_drop_bad_vnet_hdr")? == 0, "{json:?}");

    // A second session on the same inherited socket (QEMU reconnecting).
    drop(dev);
    daemon.wait_log("listening again", Duration::from_secs(5))?;
    let again = Control::connect(&act.socket)?.handshake()?;
    ensure!(again.features == offer.features, "second offer differs");

    let status = daemon.stop()?;
    ensure!(status.success(), "exit status {status}");
    ensure!(
        daemon.log().contains("final stats pair 0:"),
        "no final stats"
    );
    // The socket belongs to whoever activated the daemon (systemd): it stays.
    ensure!(
        act.socket.exists(),
        "the daemon removed the inherited socket"
    );
    Ok(())
}
