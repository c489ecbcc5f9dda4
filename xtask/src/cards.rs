//! `cargo xtask cards`: four cards on one host, from the real template units under systemd as
//! PID 1. A Debian 12 tree made by debootstrap (cached in target/vm/nspawn/) boots with
//! `systemd-nspawn --boot` (read-only under a tmpfs overlay, its own network namespace); the
//! tree `cargo xtask dist --install --destdir` stages is copied in as an administrator would
//! install it, with one file per card in /etc/vhost-card/, and `systemctl daemon-reload` runs the
//! generator. Then, as on a host:
//!
//! ```text
//! systemctl enable --now vhost-card@vc1.socket vhost-card@vc2.socket ... vc4
//! ```
//!
//! Each card's file sets what differs (MTU, queues, MAC, features, metrics address, the user
//! the daemon drops to, the socket's path, group and mode); nothing else is written per card.
//! The container's /run/vhost-card is a host directory, so this process connects one
//! in-process vhost-user frontend (tests/'s harness) to each socket, as a VMM would; systemd
//! starts each daemon on that first connection. Every frontend sends and receives its own
//! number of frames; each card's metrics endpoint is scraped from inside the container's
//! network namespace and must show that card's own values (MTU, pairs, features, frames), and
//! every metric name of host-config's alert rules and dashboard.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use card_tests::card::HOST_MAC;
use card_tests::frontend::Control;
use card_tests::netdev::{Options as DevOptions, TxLayout, VirtioNet};
use card_tests::packet::{pattern, udp_frame, VnetHdr};

use crate::process::TempDir;
use crate::rig::container::Container;

#[derive(clap::Args)]
pub struct Options {
    /// Use target/release/{vhost-card,card-os} as they are instead of building them first.
    #[arg(long)]
    pub no_build: bool,
}

/// One card: its file's `[daemon]` table and what the test expects of it.
struct Spec {
    name: &'static str,
    mtu: u16,
    queues: u16,
    mac: Option<&'static str>,
    metrics: &'static str,
    /// The user the daemon drops to, and its uid in Debian.
    user: Option<(&'static str, &'static str, u32)>,
    /// The socket inside the container, when not the default.
    socket: Option<&'static str>,
    /// `socket-group`, `socket-mode`.
    access: Option<(&'static str, u32)>,
    disable: &'static [&'static str],
    /// Frames the frontend sends and the card sends back.
    tx: usize,
    rx: usize,
}

const CARDS: [Spec; 4] = [
    Spec {
        name: "vc1",
        mtu: 65520,
        queues: 1,
        mac: None,
        metrics: "127.0.0.1:10046",
        user: None,
        socket: None,
        access: None,
        disable: &[],
        tx: 11,
        rx: 3,
    },
    Spec {
        name: "vc2",
        mtu: 9000,
        queues: 2,
        mac: Some("52:54:00:00:0c:02"),
        metrics: "127.0.0.1:10047",
        user: Some(("nobody", "nogroup", 65534)),
        socket: None,
        access: None,
        disable: &[],
        tx: 22,
        rx: 5,
    },
    Spec {
        name: "vc3",
        mtu: 1500,
        queues: 1,
        mac: None,
        metrics: "127.0.0.1:10048",
        user: None,
        socket: None,
        access: Some(("adm", 0o640)),
        disable: &["guest-tso4", "guest-tso6", "host-tso4", "host-tso6"],
        tx: 33,
        rx: 7,
    },
    Spec {
        name: "vc4",
        mtu: 65535,
        queues: 3,
        mac: Some("52:54:00:00:0c:04"),
        metrics: "127.0.0.1:10049",
        user: None,
        socket: Some("/run/vhost-card/sockets/vc4.sock"),
        access: None,
        disable: &["mrg-rxbuf"],
        tx: 44,
        rx: 9,
    },
];

impl Spec {
    /// The card's file, as an administrator writes it.
    fn file(&self) -> String {
        let mut t = format!(
            "# Card {0}: written by cargo xtask cards.\n[daemon]\ntap = \"card0\"\n\
             mtu = {1}\nqueues = {2}\nmetrics-listen = \"{3}\"\n",
            self.name, self.mtu, self.queues, self.metrics
        );
        if let Some(mac) = self.mac {
            let _ = writeln!(t, "mac = \"{mac}\"");
        }
        if let Some((user, group, _)) = self.user {
            let _ = writeln!(t, "user = \"{user}\"\ngroup = \"{group}\"");
        }
        if let Some(socket) = self.socket {
            let _ = writeln!(t, "socket = \"{socket}\"");
        }
        if let Some((group, mode)) = self.access {
            let _ = writeln!(
                t,
                "socket-group = \"{group}\"\nsocket-mode = \"{mode:04o}\""
            );
        }
        if !self.disable.is_empty() {
            let list: Vec<String> = self.disable.iter().map(|d| format!("\"{d}\"")).collect();
            let _ = writeln!(t, "disable = [{}]", list.join(", "));
        }
        t
    }

    /// The socket inside the container.
    fn socket(&self) -> String {
        self.socket
            .map_or(format!("/run/vhost-card/{}.sock", self.name), String::from)
    }

    /// The socket as this process reaches it, through the bound directory.
    fn host_socket(&self, run: &Path) -> PathBuf {
        run.join(self.socket().trim_start_matches("/run/vhost-card/"))
    }
}

pub fn run(opts: &Options) -> Result<()> {
    crate::process::require_root()?;
    let t0 = Instant::now();
    let tree = crate::rootfs::ensure_tree(&crate::rootfs::Recipe {
        name: "nspawn",
        packages: &[],
        enable: "",
    })?;
    println!(
        "cards: Debian {} tree (systemd {}) in {}{}",
        crate::rootfs::SUITE,
        tree.version("systemd"),
        tree.path.display(),
        tree.built_in.map_or(" (cached)".into(), |d| format!(
            " (debootstrap {:.0} s)",
            d.as_secs_f64()
        ))
    );

    // The installed product, staged, with the four cards' files.
    let work = TempDir::new("xtask-cards")?;
    let stage = stage(work.path(), opts.no_build)?;
    for card in &CARDS {
        std::fs::write(
            stage.join(format!("etc/vhost-card/{}.toml", card.name)),
            card.file(),
        )?;
    }

    let run_dir = work.path().join("run");
    std::fs::create_dir_all(&run_dir)?;
    let logs = crate::vm_dir().join("logs/cards");
    std::fs::create_dir_all(&logs)?;
    let mut container = Container::boot(
        &tree.path,
        &[(run_dir.as_path(), "/run/vhost-card")],
        &logs.join("console.log"),
    )?;
    println!(
        "cards: systemd up in the container in {:.1} s (console: {})",
        container.boot.as_secs_f64(),
        logs.join("console.log").display()
    );
    let result = exercise(&container, &stage, &run_dir);
    if result.is_err() {
        for card in &CARDS {
            if let Ok(out) = container.exec(&[
                "journalctl",
                "--no-pager",
                "-n",
                "20",
                "-u",
                &format!("vhost-card@{}.service", card.name),
            ]) {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
    }
    let stopped = container.stop();
    let lines = result?;
    stopped?;
    println!();
    println!(
        "==== cargo xtask cards: four cards under systemd {} (nspawn), {:.0} s ====",
        tree.version("systemd"),
        t0.elapsed().as_secs_f64()
    );
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// The product as `cargo xtask dist --install --destdir` stages it (prefix /usr/local), in
/// `work`/root; returns that root.
pub fn stage(work: &Path, no_build: bool) -> Result<PathBuf> {
    let stage = work.join("root");
    crate::dist::run(&crate::dist::Options {
        install: true,
        destdir: stage.clone(),
        prefix: PathBuf::from("/usr/local"),
        no_build,
    })?;
    Ok(stage)
}

/// Installs the staged tree `stage` in the container as an administrator would: copied in,
/// then `systemctl daemon-reload` (which runs the generator).
pub fn install(container: &Container, stage: &Path) -> Result<()> {
    crate::process::run(
        std::process::Command::new("cp")
            .args(["-a", "--no-preserve=ownership"])
            .arg(stage.join("."))
            .arg(container.path("/")),
    )?;
    container.sh(&["systemctl", "daemon-reload"])?;
    Ok(())
}

/// Installs, enables, connects, checks; one line per card.
fn exercise(container: &Container, stage: &Path, run_dir: &Path) -> Result<Vec<String>> {
    install(container, stage)?;
    let sockets: Vec<String> = CARDS
        .iter()
        .map(|c| format!("vhost-card@{}.socket", c.name))
        .collect();
    let mut enable = vec!["systemctl", "enable", "--now"];
    enable.extend(sockets.iter().map(String::as_str));
    container.sh(&enable)?;
    println!("cards: systemctl enable --now {}", sockets.join(" "));

    for card in &CARDS {
        // The generator's drop-in: only where the file sets the socket's path or access.
        let unit = container.sh(&[
            "systemctl",
            "cat",
            &format!("vhost-card@{}.socket", card.name),
        ])?;
        let has_dropin = unit.contains("50-card-file.conf");
        ensure!(
            has_dropin == (card.socket.is_some() || card.access.is_some()),
            "{}: generator drop-in {} expected:\n{unit}",
            card.name,
            if has_dropin { "not" } else { "" }
        );
        let path = card.host_socket(run_dir);
        crate::process::wait_for(
            &format!("{} to listen", path.display()),
            Duration::from_secs(10),
            || Ok(path.exists().then_some(())),
        )?;
        let meta = std::fs::metadata(&path)?;
        let (group, mode) = card.access.unwrap_or(("kvm", 0o660));
        let gid: u32 = container
            .sh(&["getent", "group", group])?
            .split(':')
            .nth(2)
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("gid of {group}"))?;
        ensure!(
            meta.gid() == gid && meta.mode() & 0o777 == mode,
            "{}: socket {} has gid {} mode {:o}, the card's file wants {group} ({gid}) {mode:o}",
            card.name,
            card.socket(),
            meta.gid(),
            meta.mode() & 0o777
        );
    }

    // One frontend per card, as a VMM connects: the first connection starts the daemon.
    let mut devs = Vec::new();
    for card in &CARDS {
        let mut ctl = Control::connect(&card.host_socket(run_dir))?;
        let offer = ctl
            .handshake()
            .with_context(|| format!("{}: vhost-user handshake", card.name))?;
        // Everything offered but the dirty log, which a VMM acks only while it migrates.
        let dev = VirtioNet::start(
            ctl,
            offer.features & !card_tests::netdev::F_LOG_ALL,
            &DevOptions::for_features(offer.features),
        )
        .with_context(|| format!("{}: starting the device", card.name))?;
        devs.push((dev, offer));
    }
    let netns = container.netns()?;
    let mut lines = Vec::new();
    for (card, (dev, offer)) in CARDS.iter().zip(devs.iter_mut()) {
        lines.push(check_card(container, &netns, card, dev, offer.features)?);
    }
    // An update as an operator runs it: `systemctl reload` hands vc2's session (its daemon
    // runs as nobody) to a new process, which systemd must take as the unit's main process.
    lines.push(check_reload(container, &netns, &CARDS[1], &mut devs[1].0)?);
    let stats = container.sh(&[
        "/usr/local/bin/vhost-card",
        "stats",
        "--control",
        "/run/vhost-card/vc2.control",
    ])?;
    println!("cards: vhost-card stats --control /run/vhost-card/vc2.control (in the container):");
    for line in stats.lines().take(8) {
        println!("    {line}");
    }

    // The frontends go; each daemon stays, says so, and stops cleanly with its unit.
    drop(devs);
    for card in &CARDS {
        let addr = card.metrics;
        crate::process::wait_for(
            &format!("{}: frontend_connected 0", card.name),
            Duration::from_secs(10),
            || {
                let prom = scrape_in(&netns, addr)?;
                Ok(
                    (rig::monitoring::sample(&prom, "vhost_card_frontend_connected")? == 0.0)
                        .then_some(()),
                )
            },
        )?;
    }
    let services: Vec<String> = CARDS
        .iter()
        .map(|c| format!("vhost-card@{}.service", c.name))
        .collect();
    let mut stop = vec!["systemctl", "stop"];
    stop.extend(services.iter().map(String::as_str));
    container.sh(&stop)?;
    // After the reload vc2's main process is one systemd did not start. On the legacy or
    // hybrid cgroup hierarchy, inside a container, systemd 252 does not wait for such a
    // process after SIGTERM (unit_kill_context: an alien main PID, and no reliable cgroup
    // notification there) and sends SIGKILL at once; on the unified hierarchy it waits. This
    // machine's hierarchy is hybrid, so there the reloaded card may end killed: accepted for
    // it alone, and said.
    let unified = container.sh(&["stat", "-fc", "%T", "/sys/fs/cgroup"])? == "cgroup2fs";
    let reloaded = format!("vhost-card@{}.service", CARDS[1].name);
    let mut killed_after_reload = false;
    for s in &services {
        let result = container.sh(&["systemctl", "show", "-P", "Result", s])?;
        let status = container.sh(&["systemctl", "show", "-P", "ExecMainStatus", s])?;
        if !unified && *s == reloaded && result == "signal" && status == "9" {
            killed_after_reload = true;
            continue;
        }
        if result != "success" || status != "0" {
            let journal = container
                .sh(&[
                    "journalctl",
                    "--no-pager",
                    "-o",
                    "short-precise",
                    "-n",
                    "60",
                    "-u",
                    s,
                ])
                .unwrap_or_default();
            anyhow::bail!(
                "{s} stopped with result {result}, status {status}; its journal:\n{journal}"
            );
        }
    }
    lines.push(format!(
        "PASS the four daemons stopped ({}), their sockets still held by systemd; {}",
        services.join(" "),
        if killed_after_reload {
            format!(
                "all cleanly but {reloaded} (reloaded), which systemd killed with SIGKILL right \
                 after SIGTERM: on the hybrid cgroup hierarchy in a container it does not wait \
                 for a main process it did not start"
            )
        } else {
            "all cleanly".to_string()
        }
    ));
    Ok(lines)
}

/// Traffic both ways through `card`, then its metrics: the card's own values.
fn check_card(
    container: &Container,
    netns: &std::fs::File,
    card: &Spec,
    dev: &mut VirtioNet,
    acked: u64,
) -> Result<String> {
    let name = card.name;
    // The tap is in the card's namespace: read its MAC and MTU there.
    let (link, mac_text) = tap_link(container, name)?;
    if let Some(mac) = card.mac {
        ensure!(
            mac_text == mac,
            "{name}: card0 has MAC {mac_text}, the file says {mac}"
        );
    }
    ensure!(
        link.contains(&format!(" mtu {} ", card.mtu.min(65521))),
        "{name}: card0 is not at the card's MTU {}: {link}",
        card.mtu
    );
    let tap_mac = crate::netns::parse_mac(&mac_text)?;

    // Host to card: `tx` frames, each 100 + i bytes of payload.
    let mut tx_bytes = 0u64;
    for i in 0..card.tx {
        let frame = udp_frame(
            HOST_MAC,
            tap_mac,
            SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 2), 40000),
            SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 9),
            &pattern(100 + i, i as u8),
        )?;
        tx_bytes += frame.len() as u64;
        dev.send_wait(&VnetHdr::default(), &frame, &TxLayout::Split)?;
    }
    // Card to host: `rx` frames injected on card0 inside the container, each one received.
    let ns_file = std::fs::File::open(container.path(&format!("/run/netns/{name}")))?;
    let pkt = crate::netns::packet_socket_in(&ns_file, "card0")?;
    for i in 0..card.rx {
        let frame = udp_frame(
            tap_mac,
            HOST_MAC,
            SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 5555),
            SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 2), 6000 + i as u16),
            &pattern(300, i as u8),
        )?;
        pkt.send(&frame)?;
        dev.recv_matching(Duration::from_secs(5), |f| f.frame == frame)
            .with_context(|| format!("{name}: frame {i} to the host"))?;
    }

    // The card's own endpoint, from inside the container's network namespace.
    let prom = scrape_in(netns, card.metrics)?;
    let (rules, dashboard) =
        rig::monitoring::check_against(&prom).with_context(|| format!("{name}'s scrape"))?;
    let want: BTreeMap<&str, f64> = BTreeMap::from([
        ("vhost_card_frontend_connected", 1.0),
        ("vhost_card_mtu_bytes", f64::from(card.mtu)),
        ("vhost_card_queue_pairs", f64::from(card.queues)),
        ("vhost_card_queue_pairs_in_use", 1.0),
        (
            "vhost_card_frames_total{queue=\"0\",direction=\"tx\"}",
            card.tx as f64,
        ),
        (
            "vhost_card_bytes_total{queue=\"0\",direction=\"tx\"}",
            tx_bytes as f64,
        ),
    ]);
    for (series, value) in &want {
        let got = rig::monitoring::sample(&prom, series)?;
        ensure!(
            got == *value,
            "{name} ({}): {series} is {got}, expected {value}",
            card.metrics
        );
    }
    let rx = rig::monitoring::sample(
        &prom,
        "vhost_card_frames_total{queue=\"0\",direction=\"rx\"}",
    )?;
    ensure!(
        rx >= card.rx as f64,
        "{name}: {rx} frames to the host counted, {} received",
        card.rx
    );
    let info = prom
        .lines()
        .find(|l| l.starts_with("vhost_card_info{"))
        .context("no vhost_card_info")?;
    for off in card.disable {
        ensure!(
            !info.contains(&format!("{off},")) && !info.contains(&format!("{off}\"")),
            "{name}: {off} is offered although the file disables it: {info}"
        );
    }
    ensure!(
        acked & (1 << 22) != 0 || card.queues == 1,
        "{name}: MQ not offered with queues = {}",
        card.queues
    );

    // The daemon as systemd runs it: which user, which process.
    let pid = container.sh(&[
        "systemctl",
        "show",
        "-P",
        "MainPID",
        &format!("vhost-card@{name}.service"),
    ])?;
    let status = container.sh(&["cat", &format!("/proc/{pid}/status")])?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no Uid in /proc/PID/status")?
        .parse::<u32>()?;
    let (user, want_uid) = card.user.map_or(("root", 0), |(u, _, id)| (u, id));
    ensure!(
        uid == want_uid,
        "{name}: the daemon runs as uid {uid}, the file says {user} ({want_uid})"
    );
    Ok(format!(
        "PASS {name}: socket {} ({}), MTU {}, {} pair(s) ({} in use), MAC {mac_text}, user {user}, \
         metrics {}: tx {} frames / {tx_bytes} bytes, rx {rx} frames, connected 1; \
         {rules}+{dashboard} rule/dashboard metrics present",
        card.socket(),
        card.access.map_or("kvm 0660".into(), |(g, m)| format!("{g} {m:04o}")),
        card.mtu,
        card.queues,
        rig::monitoring::sample(&prom, "vhost_card_queue_pairs_in_use")?,
        card.metrics,
        card.tx,
    ))
}

/// `systemctl reload vhost-card@NAME` while `dev` stays connected: the unit's `ExecReload=`
/// runs `vhost-card upgrade`, the old process hands systemd the new main PID (`MAINPID=`) and
/// exits; the unit stays active, no new session starts (the sessions counter, carried over),
/// and a frame crosses each way through the new process. Run after [`check_card`].
fn check_reload(
    container: &Container,
    netns: &std::fs::File,
    card: &Spec,
    dev: &mut VirtioNet,
) -> Result<String> {
    let name = card.name;
    let service = format!("vhost-card@{name}.service");
    let show = |prop: &str| container.sh(&["systemctl", "show", "-P", prop, &service]);
    let before = show("MainPID")?;
    let t0 = std::time::Instant::now();
    if let Err(e) = container.sh(&["systemctl", "reload", &service]) {
        let journal = container
            .sh(&["journalctl", "--no-pager", "-n", "40", "-u", &service])
            .unwrap_or_default();
        anyhow::bail!("{e:#}\njournal of {service}:\n{journal}");
    }
    let took = t0.elapsed();
    let after = show("MainPID")?;
    let active = show("ActiveState")?;
    ensure!(
        after != before && after != "0" && active == "active",
        "{name}: after systemctl reload MainPID {before} -> {after}, ActiveState {active}"
    );
    let exe = container.sh(&["readlink", &format!("/proc/{after}/exe")])?;
    ensure!(
        exe == "/usr/local/bin/vhost-card",
        "{name}: the new main process runs {exe}"
    );
    // One frame each way through the new process.
    let tap_mac = crate::netns::parse_mac(&tap_link(container, name)?.1)?;
    let up = udp_frame(
        HOST_MAC,
        tap_mac,
        SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 2), 40000),
        SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 9),
        &pattern(200, 0x5a),
    )?;
    dev.send_wait(&VnetHdr::default(), &up, &TxLayout::Split)
        .with_context(|| format!("{name}: a frame to the card after the reload"))?;
    let ns_file = std::fs::File::open(container.path(&format!("/run/netns/{name}")))?;
    let pkt = crate::netns::packet_socket_in(&ns_file, "card0")?;
    let down = udp_frame(
        tap_mac,
        HOST_MAC,
        SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 5555),
        SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 2), 7000),
        &pattern(300, 0xa5),
    )?;
    pkt.send(&down)?;
    dev.recv_matching(Duration::from_secs(5), |f| f.frame == down)
        .with_context(|| format!("{name}: a frame to the host after the reload"))?;
    let prom = scrape_in(netns, card.metrics)?;
    let sessions = rig::monitoring::sample(&prom, "vhost_card_frontend_sessions_total")?;
    let tx = rig::monitoring::sample(
        &prom,
        "vhost_card_frames_total{queue=\"0\",direction=\"tx\"}",
    )?;
    ensure!(
        sessions == 1.0 && tx == (card.tx + 1) as f64,
        "{name}: after the reload {sessions} session(s), {tx} frames to the card counted \
         (expected 1 and {})",
        card.tx + 1
    );
    Ok(format!(
        "PASS {name}: systemctl reload {service} handed the session over (MainPID {before} -> \
         {after}, /usr/local/bin/vhost-card, active) in {} ms; still 1 session, the counters \
         carried ({tx} frames to the card), a frame each way through the new process",
        took.as_millis()
    ))
}

/// Card `name`'s tap in its namespace inside the container: `ip -o link` of card0, and its MAC.
fn tap_link(container: &Container, name: &str) -> Result<(String, String)> {
    let link = container.sh(&["ip", "-n", name, "-o", "link", "show", "dev", "card0"])?;
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .context("no MAC on card0")?
        .to_string();
    Ok((link, mac))
}

/// `GET /metrics` from `addr` inside the network namespace `netns`.
fn scrape_in(netns: &std::fs::File, addr: &str) -> Result<String> {
    crate::netns::in_namespace(netns, || rig::daemon::scrape(addr))
}
