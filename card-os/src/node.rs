//! `up`, `reload` and `down`: the node built from the card's file, and taken down again.
//!
//! The card is a network namespace (named after the card) holding the daemon's tap (the host
//! link) with the card's addresses, network ports (veth pairs into namespaces that play the
//! outside network), forwarding, an nftables ruleset, an ESP tunnel and nginx. `up` first
//! renders and checks every generated file (as `card-os check` does), so a bad config changes
//! nothing; a step that fails afterwards (a service port already taken, a missing program)
//! takes down what this `up` made, so the system is as it was. Every step checks what is there
//! first, so `up` can run again. `reload` is `up` on a changed file for a running card: it
//! never touches the daemon or the tap, replaces the ruleset atomically and reloads nginx
//! gracefully.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::error::{Context, Result};
use crate::fail;

use crate::cmd::{has_link, in_ns, ip, netns_exists, quiet, run, stdout, sysctl, wait_for};
use crate::config::{Config, Port};
use crate::daemon::{self, Server as SocketServer};
use crate::link::{self, State};
use crate::render::{self, Server};
use crate::{check, ipsec, prereq};

/// Sysctls set in the card's namespace. `ip_nonlocal_bind`: the services bind the card's
/// link addresses before the tap (and so the addresses) exist, as under socket activation.
const CARD_SYSCTLS: &[&str] = &[
    "net.ipv4.ip_forward=1",
    "net.ipv6.conf.all.forwarding=1",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv4.ip_nonlocal_bind=1",
    "net.ipv6.ip_nonlocal_bind=1",
];

/// What `up` made, so `down` removes exactly that: lines `netns NAME`, `port NAME`,
/// `sysctl NS KEY OLD`.
fn state_file(cfg: &Config) -> PathBuf {
    cfg.run_dir.join("state")
}

fn read_state(cfg: &Config) -> Vec<(String, String)> {
    fs::read_to_string(state_file(cfg))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn add_state(cfg: &Config, key: &str, value: &str) -> Result<()> {
    use std::io::Write;
    if read_state(cfg).contains(&(key.to_string(), value.to_string())) {
        return Ok(());
    }
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_file(cfg))?;
    writeln!(f, "{key} {value}")?;
    Ok(())
}

/// Whether `up` ran (and `down` did not): the state file and the namespace exist.
pub fn is_up(cfg: &Config) -> bool {
    state_file(cfg).exists() && netns_exists(cfg.netns())
}

fn ensure_netns(cfg: &Config, name: &str) -> Result<()> {
    if netns_exists(name) {
        return Ok(());
    }
    run(Command::new("ip").args(["netns", "add", name]))?;
    add_state(cfg, "netns", name)?;
    ip(name, &["link", "set", "lo", "up"])
}

/// Sets `setting` (KEY=VALUE) in `ns`, remembering the old value for `down`.
fn set_sysctl(cfg: &Config, ns: &str, setting: &str) -> Result<()> {
    let (key, _) = setting.split_once('=').context("KEY=VALUE")?;
    let old = stdout(in_ns(ns, "sysctl").args(["-n", key]))?;
    if !read_state(cfg)
        .iter()
        .any(|(k, v)| k == "sysctl" && v.split(' ').nth(1) == Some(key) && v.starts_with(ns))
    {
        add_state(cfg, "sysctl", &format!("{ns} {key} {old}"))?;
    }
    sysctl(ns, setting)
}

/// What `up` did, in a few lines.
pub struct Report {
    pub lines: Vec<String>,
}

/// Brings the card up as `cfg` describes; safe to run again. On failure, what this call made
/// is taken down again.
pub fn up(cfg: &Config) -> Result<Report> {
    let fresh = !state_file(cfg).exists();
    prereq::check(&prereq::for_config(cfg))?;
    check::validate(cfg)?;
    let result = build(cfg);
    if result.is_err() && fresh {
        down(cfg).ok();
    }
    result
}

fn build(cfg: &Config) -> Result<Report> {
    let mut lines = Vec::new();
    fs::create_dir_all(&cfg.run_dir)
        .with_context(|| format!("creating {}", cfg.run_dir.display()))?;
    // The state file exists from here on: `down` after a failed `up` cleans up.
    add_state(cfg, "card", &cfg.name)?;
    ensure_netns(cfg, cfg.netns())?;
    let daemon = match daemon::server(cfg) {
        SocketServer::Nobody if !cfg.card.daemon.is_empty() => {
            let pid = daemon::start(cfg)?;
            format!("started {} (pid {pid})", cfg.card.daemon)
        }
        SocketServer::Nobody => format!(
            "nothing serves the {} and [card] daemon is empty: start vhost-card --config {}",
            cfg.daemon.endpoint.describe(),
            cfg.source.display()
        ),
        SocketServer::Ours { pid } => format!("running (pid {pid}, started by card-os)"),
        SocketServer::Other => format!(
            "the {} is served by another process (systemd's vhost-card@{}.socket or \
             vhost-card-vduse@{}?): not starting one",
            cfg.daemon.endpoint.describe(),
            cfg.name,
            cfg.name
        ),
    };
    lines.push(format!("daemon: {daemon}"));
    lines.extend(apply(cfg)?.lines);
    Ok(Report { lines })
}

/// Everything but the namespace and the daemon; what `reload` re-runs.
fn apply(cfg: &Config) -> Result<Report> {
    let ns = cfg.netns();
    for setting in CARD_SYSCTLS {
        set_sysctl(cfg, ns, setting)?;
    }
    let link = match link::apply_blocking(cfg)? {
        State::Ready { index } => format!(
            "host link: {} (index {index}) up with {} {}{}",
            cfg.tap(),
            cfg.link.address4,
            cfg.link.address6,
            if cfg.link.routes.is_empty() {
                String::new()
            } else {
                format!(
                    ", routes {} via the host",
                    cfg.link
                        .routes
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            }
        ),
        State::Absent => format!(
            "host link: no {} yet (the daemon creates it when the VMM connects); \
             `card-os run` sets it up when it appears",
            cfg.tap()
        ),
    };
    for port in &cfg.ports {
        apply_port(cfg, port)?;
    }
    // Ports that a previous config had and this one has not.
    for (key, old) in read_state(cfg) {
        if key == "port" && !cfg.ports.iter().any(|p| p.name == old) && has_link(ns, &old) {
            ip(ns, &["link", "del", &old])?;
        }
    }
    load_ruleset(cfg)?;
    let ipsec = ipsec::apply(cfg)?;
    for server in [Server::Wire, Server::Card] {
        if server.wanted(cfg) {
            start_or_reload_nginx(cfg, server)?;
        } else {
            stop_nginx(cfg, server);
        }
    }
    Ok(Report {
        lines: vec![link, format!("ipsec: {ipsec}")],
    })
}

fn apply_port(cfg: &Config, port: &Port) -> Result<()> {
    let ns = cfg.netns();
    let wire = port.wire_netns.as_str();
    ensure_netns(cfg, wire)?;
    let mtu = port.mtu.to_string();
    if !has_link(ns, &port.name) {
        if has_link(wire, &port.wire_dev) {
            fail!(
                "[[port]] {}: the wire namespace {wire} already has a {} (wire_dev)",
                port.name,
                port.wire_dev
            );
        }
        run(Command::new("ip").args([
            "link",
            "add",
            &port.name,
            "netns",
            ns,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            &port.wire_dev,
            "netns",
            wire,
            "mtu",
            &mtu,
        ]))?;
        add_state(cfg, "port", &port.name)?;
    }
    // A real 1500-byte wire: no segmentation or aggregation offloads, so what a capture shows
    // is what a cable would carry.
    for (n, dev) in [(ns, port.name.as_str()), (wire, port.wire_dev.as_str())] {
        ip(n, &["link", "set", dev, "mtu", &mtu, "up"])?;
        run(in_ns(n, "ethtool").args(["-K", dev, "tso", "off", "gso", "off", "gro", "off"]))?;
    }
    set_sysctl(cfg, wire, "net.ipv6.conf.default.accept_dad=0")?;
    let a4 = port.address4.to_string();
    let a6 = port.address6.to_string();
    ip(ns, &["addr", "replace", &a4, "dev", &port.name])?;
    ip(ns, &["addr", "replace", &a6, "dev", &port.name, "nodad"])?;
    for host in &port.wire_hosts {
        let host = host.to_string();
        let mut args = vec!["addr", "replace", host.as_str(), "dev", &port.wire_dev];
        if host.contains(':') {
            args.push("nodad");
        }
        ip(wire, &args)?;
    }
    // The wire knows the host link's prefixes are behind the card: in routed mode that is
    // how replies find the host; in NAT mode it lets the firewall, not a missing route, stop
    // new connections.
    let net4 = cfg.link.address4.network().to_string();
    let net6 = cfg.link.address6.network().to_string();
    let via4 = port.address4.addr.to_string();
    let via6 = port.address6.addr.to_string();
    ip(wire, &["route", "replace", &net4, "via", &via4])?;
    ip(wire, &["-6", "route", "replace", &net6, "via", &via6])?;
    Ok(())
}

fn load_ruleset(cfg: &Config) -> Result<()> {
    let path = cfg.run_dir.join("nftables.nft");
    fs::write(&path, render::ruleset(cfg)?)?;
    run(in_ns(cfg.netns(), "nft").arg("-f").arg(&path))
        .with_context(|| format!("loading {}", path.display()))?;
    Ok(())
}

/// The running master's pid, if any.
pub fn nginx_pid(cfg: &Config, server: Server) -> Option<i32> {
    let text = fs::read_to_string(server.dir(cfg).join("nginx.pid")).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    crate::cmd::cmdline_has(pid, "nginx").then_some(pid)
}

fn start_or_reload_nginx(cfg: &Config, server: Server) -> Result<()> {
    let dir = server.dir(cfg);
    fs::create_dir_all(dir.join("www"))?;
    let conf = dir.join("nginx.conf");
    fs::write(&conf, render::nginx_conf(cfg, server, &cfg.run_dir)?)?;
    let ns = server.netns(cfg);
    let nginx = |extra: &[&str]| {
        let mut cmd = in_ns(ns, "nginx");
        cmd.arg("-c").arg(&conf).arg("-p").arg(&dir).args(extra);
        cmd
    };
    run(&mut nginx(&["-t", "-q"])).with_context(|| format!("{}: nginx -t", server.name()))?;
    match nginx_pid(cfg, server) {
        Some(_) => {
            run(&mut nginx(&["-s", "reload"]))?;
        }
        None => {
            // nginx daemonizes; the master lives on after we exit. A port already taken ends
            // here, with nginx's own words.
            run(&mut nginx(&[])).with_context(|| format!("starting the {}", server.name()))?;
            wait_for("nginx to write its pid", Duration::from_secs(10), || {
                Ok(nginx_pid(cfg, server))
            })?;
        }
    }
    Ok(())
}

fn stop_nginx(cfg: &Config, server: Server) {
    if let Some(pid) = nginx_pid(cfg, server) {
        crate::cmd::stop_process(pid, libc::SIGTERM, 10, |p| {
            crate::cmd::cmdline_has(p, "nginx")
        });
    }
}

/// Applies a changed config to a running card: everything but the daemon and the namespace.
/// Returns what it did, in a few words.
pub fn reload(cfg: &Config) -> Result<String> {
    if !is_up(cfg) {
        fail!(
            "card {} is not up (no {} or no namespace {}): use `card-os up`",
            cfg.name,
            state_file(cfg).display(),
            cfg.netns()
        );
    }
    prereq::check(&prereq::for_config(cfg))?;
    check::validate(cfg)?;
    let before = nginx_pid(cfg, Server::Card);
    apply(cfg)?;
    Ok(format!(
        "ruleset replaced, nginx {} (master {}), daemon {}",
        if before.is_some() {
            "reloaded"
        } else {
            "started"
        },
        nginx_pid(cfg, Server::Card).map_or("-".into(), |p| p.to_string()),
        match daemon::server(cfg) {
            SocketServer::Ours { pid } => format!("{pid} untouched"),
            _ => "not card-os's, untouched".into(),
        }
    ))
}

/// Takes down what `up` made, and only that; quiet about what is already gone. A namespace
/// card-os created stays when a daemon it did not start still has its tap there (systemd's):
/// only the card's addresses go.
pub fn down(cfg: &Config) -> Result<String> {
    let state = read_state(cfg);
    let ns = cfg.netns();
    for server in [Server::Card, Server::Wire] {
        stop_nginx(cfg, server);
    }
    ipsec::stop(cfg);
    if netns_exists(ns) {
        quiet(in_ns(ns, "nft").args(["delete", "table", "inet", "card"]));
        for (key, port) in &state {
            if key == "port" && has_link(ns, port) {
                ip(ns, &["link", "del", port]).ok();
            }
        }
    }
    daemon::stop(cfg);
    let foreign_tap = netns_exists(ns) && has_link(ns, cfg.tap());
    let mut kept = Vec::new();
    for (key, name) in state.iter().rev() {
        if key != "netns" || !netns_exists(name) {
            continue;
        }
        if name == ns && foreign_tap {
            kept.push(name.clone());
            continue;
        }
        run(Command::new("ip").args(["netns", "del", name]))?;
    }
    // In a namespace that stays: the card's addresses and the sysctls as they were.
    if netns_exists(ns) {
        for cidr in [&cfg.link.address4, &cfg.link.address6] {
            quiet(Command::new("ip").args([
                "-n",
                ns,
                "addr",
                "del",
                &cidr.to_string(),
                "dev",
                cfg.tap(),
            ]));
        }
        for (key, v) in &state {
            let f: Vec<&str> = v.split(' ').collect();
            if key == "sysctl" && f.len() == 3 && netns_exists(f[0]) {
                sysctl(f[0], &format!("{}={}", f[1], f[2])).ok();
            }
        }
    }
    if cfg.run_dir.exists() {
        fs::remove_dir_all(&cfg.run_dir).ok();
    }
    Ok(if kept.is_empty() {
        "down".into()
    } else {
        format!(
            "down (namespace {} kept: the daemon's tap {} is in it, the daemon is not card-os's)",
            kept.join(" "),
            cfg.tap()
        )
    })
}
