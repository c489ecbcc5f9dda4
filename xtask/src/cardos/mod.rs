//! `cargo xtask card up|down|status|reload`: the card's network node from
//! card-os/ (card.toml and the templates next to it) on this machine.
//!
//! The card is a network namespace holding the tap of vhost-card (the host
//! link), its addresses, network ports (veth pairs into namespaces that play
//! the outside network, with test hosts), forwarding, an nftables ruleset,
//! an ESP tunnel (kernel `ip xfrm`, or strongSwan in userspace where the
//! kernel has no ESP: see ipsec.rs) and nginx (HTTP server, reverse
//! proxy, UDP relay). Every step checks what is there first, so `up` can run
//! again; `reload` is `up` on a changed file: it never touches the daemon or
//! the tap, replaces the ruleset atomically and reloads nginx gracefully.

pub mod config;
pub mod guest;
pub mod ipsec;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub use config::{Config, Mode};

use crate::process::{run, stdout, wait_for};

/// Debian packages the card's userland uses.
pub const PACKAGES: &[&str] = &[
    "nftables",
    "nginx",
    "libnginx-mod-stream",
    "iproute2",
    "ethtool",
];

/// Where Debian's nginx keeps its dynamic stream module.
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

#[derive(clap::Args)]
pub struct Options {
    #[command(subcommand)]
    pub action: Action,
    /// The card's description.
    #[arg(long, global = true, default_value_os_t = default_config())]
    pub config: PathBuf,
}

#[derive(clap::Subcommand)]
pub enum Action {
    /// Build the card from the config (idempotent): namespace, daemon,
    /// addresses, ports, forwarding, firewall/NAT, IPsec, services.
    Up,
    /// Take it all down again (what `up` made, and nothing else).
    Down,
    /// Show what is up: daemon, links, routes, ruleset counters, services.
    Status,
    /// Apply a changed config and restart the services, keeping the daemon,
    /// the tap and its addresses (the host link stays up).
    Reload,
}

pub fn default_config() -> PathBuf {
    crate::workspace_root().join("card-os/card.toml")
}

pub fn run_task(opts: &Options) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("card needs root (network namespaces, nftables)");
    }
    let cfg = Config::load(&opts.config)?;
    match opts.action {
        Action::Up => {
            ensure_packages()?;
            up(&cfg)?;
            print!("{}", status(&cfg)?);
        }
        Action::Reload => {
            let report = reload(&cfg)?;
            println!("card: reloaded ({report})");
        }
        Action::Down => down(&cfg)?,
        Action::Status => print!("{}", status(&cfg)?),
    }
    Ok(())
}

/// Installs the card's packages from apt if any is missing (without
/// letting their maintainer scripts start nginx on the machine).
pub fn ensure_packages() -> Result<()> {
    crate::apt::install(PACKAGES)
}

/// What `up` made, so `down` removes exactly that: lines `netns NAME`,
/// `daemon PID`.
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
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_file(cfg))?;
    writeln!(f, "{key} {value}")?;
    Ok(())
}

pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn ip(ns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(["-n", ns]).args(args))?;
    Ok(())
}

fn has_link(ns: &str, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", dev])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `ip netns exec NS PROGRAM ...` as a command.
pub fn in_ns(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]);
    cmd
}

fn ensure_netns(cfg: &Config, name: &str) -> Result<()> {
    if netns_exists(name) {
        return Ok(());
    }
    run(Command::new("ip").args(["netns", "add", name]))?;
    add_state(cfg, "netns", name)?;
    ip(name, &["link", "set", "lo", "up"])
}

fn sysctl(ns: &str, setting: &str) -> Result<()> {
    run(in_ns(ns, "sysctl").args(["-qw", setting]))?;
    Ok(())
}

/// Brings the card up as `cfg` describes; safe to run again.
pub fn up(cfg: &Config) -> Result<()> {
    fs::create_dir_all(&cfg.run_dir)
        .with_context(|| format!("creating {}", cfg.run_dir.display()))?;
    ensure_netns(cfg, &cfg.netns)?;
    let ns = cfg.netns.as_str();
    if !has_link(ns, &cfg.link.dev) {
        if !cfg.daemon.start {
            bail!(
                "no {} in namespace {ns} and daemon.start is false: start vhost-card \
                 --netns {ns} --tap {} first",
                cfg.link.dev,
                cfg.link.dev
            );
        }
        start_daemon(cfg)?;
    }
    apply(cfg)
}

/// Everything but the namespace and the daemon; what `reload` re-runs.
fn apply(cfg: &Config) -> Result<()> {
    let ns = cfg.netns.as_str();
    for setting in [
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv6.conf.default.accept_dad=0",
    ] {
        sysctl(ns, setting)?;
    }
    let link = &cfg.link;
    ip(ns, &["link", "set", &link.dev, "up"])?;
    ip(
        ns,
        &[
            "addr",
            "replace",
            &link.address4.to_string(),
            "dev",
            &link.dev,
        ],
    )?;
    ip(
        ns,
        &[
            "addr",
            "replace",
            &link.address6.to_string(),
            "dev",
            &link.dev,
            "nodad",
        ],
    )?;
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
    ipsec::apply(cfg)?;
    start_or_reload_nginx(cfg, Server::Wire)?;
    start_or_reload_nginx(cfg, Server::Card)?;
    Ok(())
}

fn apply_port(cfg: &Config, port: &config::Port) -> Result<()> {
    let ns = cfg.netns.as_str();
    let wire = port.wire_netns.as_str();
    ensure_netns(cfg, wire)?;
    let mtu = port.mtu.to_string();
    if !has_link(ns, &port.name) {
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
        if !read_state(cfg).contains(&("port".into(), port.name.clone())) {
            add_state(cfg, "port", &port.name)?;
        }
    }
    // A real 1500-byte wire: no segmentation or aggregation offloads, so
    // what a capture shows is what a cable would carry.
    for (n, dev) in [(ns, port.name.as_str()), (wire, port.wire_dev.as_str())] {
        ip(n, &["link", "set", dev, "mtu", &mtu, "up"])?;
        run(in_ns(n, "ethtool").args(["-K", dev, "tso", "off", "gso", "off", "gro", "off"]))?;
    }
    sysctl(wire, "net.ipv6.conf.default.accept_dad=0")?;
    ip(
        ns,
        &[
            "addr",
            "replace",
            &port.address4.to_string(),
            "dev",
            &port.name,
        ],
    )?;
    ip(
        ns,
        &[
            "addr",
            "replace",
            &port.address6.to_string(),
            "dev",
            &port.name,
            "nodad",
        ],
    )?;
    for host in &port.wire_hosts {
        let mut args = vec!["addr", "replace"];
        let host = host.to_string();
        args.extend([host.as_str(), "dev", &port.wire_dev]);
        if host.contains(':') {
            args.push("nodad");
        }
        ip(wire, &args)?;
    }
    // The wire knows the host link's prefixes are behind the card: in routed
    // mode that is how replies find the host; in NAT mode it lets the tests
    // show that the firewall, not a missing route, stops new connections.
    let via4 = port.address4.addr.to_string();
    let via6 = port.address6.addr.to_string();
    ip(
        wire,
        &[
            "route",
            "replace",
            &cfg.link.address4.network().to_string(),
            "via",
            &via4,
        ],
    )?;
    ip(
        wire,
        &[
            "-6",
            "route",
            "replace",
            &cfg.link.address6.network().to_string(),
            "via",
            &via6,
        ],
    )?;
    Ok(())
}

/// Fills `@NAME@` fields of `template` (a file in the config's folder).
pub fn render(cfg: &Config, template: &str, vars: &BTreeMap<&str, String>) -> Result<String> {
    let path = cfg.dir().join(template);
    let mut text =
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    for (name, value) in vars {
        text = text.replace(&format!("@{name}@"), value);
    }
    if let Some(at) = text.find('@') {
        let rest = &text[at + 1..];
        if let Some(end) = rest.find('@') {
            let name = &rest[..end];
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                bail!("{}: no value for @{name}@", path.display());
            }
        }
    }
    Ok(text)
}

fn elements<T: ToString>(items: &[T], quote: bool) -> String {
    if items.is_empty() {
        return String::new();
    }
    let list: Vec<String> = items
        .iter()
        .map(|i| {
            if quote {
                format!("\"{}\"", i.to_string())
            } else {
                i.to_string()
            }
        })
        .collect();
    format!("elements = {{ {} }}", list.join(", "))
}

fn ruleset(cfg: &Config) -> Result<String> {
    let ports: Vec<&str> = cfg.ports.iter().map(|p| p.name.as_str()).collect();
    let nat: &[&str] = if cfg.mode == Mode::Nat { &ports } else { &[] };
    let wire_mtu = cfg.ports.iter().map(|p| p.mtu).min().unwrap_or(1500);
    let mut vars = BTreeMap::new();
    vars.insert("PORT_ELEMENTS", elements(&ports, true));
    vars.insert("NAT_ELEMENTS", elements(nat, true));
    vars.insert("TCP_ELEMENTS", elements(&cfg.tcp_services, false));
    vars.insert("UDP_ELEMENTS", elements(&cfg.udp_services, false));
    vars.insert("LINK", cfg.link.dev.clone());
    vars.insert("WIRE_MTU", wire_mtu.to_string());
    vars.insert("HOST_NET4", cfg.link.address4.network().to_string());
    vars.insert("HOST_NET6", cfg.link.address6.network().to_string());
    let (input, forward, nonat) = match &cfg.ipsec {
        Some(s) => (
            // Kernel ESP, or IKE and ESP in UDP (strongSwan).
            [
                format!(
                    "ip saddr {} meta l4proto esp accept comment \"ESP from the IPsec peer\"",
                    s.peer
                ),
                format!(
                    "ip saddr {} udp dport {{ 500, 4500 }} accept comment \"IKE and ESP-in-UDP from the IPsec peer\"",
                    s.peer
                ),
            ]
            .join("\n        "),
            // The userspace backend's TUN device (kernel ESP goes out of
            // and comes in through the port itself).
            [
                format!(
                    "iifname \"{}\" oifname \"{}\" ip daddr {} counter accept comment \"host into the tunnel\"",
                    cfg.link.dev,
                    ipsec::TUN,
                    s.peer_subnet
                ),
                format!(
                    "iifname \"{}\" oifname \"{}\" ip saddr {} counter accept comment \"from the IPsec peer (userspace ESP)\"",
                    ipsec::TUN,
                    cfg.link.dev,
                    s.peer_subnet
                ),
            ]
            .join("\n        "),
            format!(
                "ip saddr {} ip daddr {} accept comment \"into the tunnel\"",
                s.local_subnet, s.peer_subnet
            ),
        ),
        None => (String::new(), String::new(), String::new()),
    };
    vars.insert("IPSEC_INPUT", input);
    vars.insert("IPSEC_FORWARD", forward);
    vars.insert("IPSEC_NONAT", nonat);
    render(cfg, "nftables.nft.in", &vars)
}

fn load_ruleset(cfg: &Config) -> Result<()> {
    let path = cfg.run_dir.join("nftables.nft");
    fs::write(&path, ruleset(cfg)?)?;
    run(in_ns(&cfg.netns, "nft").arg("-f").arg(&path))
        .with_context(|| format!("loading {}", path.display()))?;
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Card,
    Wire,
}

impl Server {
    fn dir(self, cfg: &Config) -> PathBuf {
        cfg.run_dir.join(match self {
            Server::Card => "nginx",
            Server::Wire => "wire",
        })
    }

    fn netns(self, cfg: &Config) -> &str {
        match self {
            Server::Card => &cfg.netns,
            Server::Wire => &cfg.ports[0].wire_netns,
        }
    }

    /// The running master's pid, if any.
    pub fn pid(self, cfg: &Config) -> Option<i32> {
        let text = fs::read_to_string(self.dir(cfg).join("nginx.pid")).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains("nginx")
            .then_some(pid)
    }
}

fn nginx_conf(cfg: &Config, server: Server) -> Result<String> {
    let mut vars = BTreeMap::new();
    let dir = server.dir(cfg);
    vars.insert("RUN", cfg.run_dir.display().to_string());
    vars.insert("NETNS", cfg.netns.clone());
    vars.insert("WIRE_NETNS", cfg.ports[0].wire_netns.clone());
    let sv = &cfg.services;
    match server {
        Server::Wire => {
            fs::create_dir_all(dir.join("www"))?;
            vars.insert("WIRE_HTTP_PORT", sv.wire_http_port.to_string());
            vars.insert("WIRE_SLOW_RATE", sv.wire_slow_rate.clone());
            render(cfg, "nginx-wire.conf.in", &vars)
        }
        Server::Card => {
            let port4 = cfg.ports[0].address4.addr.to_string();
            let mut http = vec![
                format!("listen {}:{};", cfg.link.address4.addr, sv.http_port),
                format!("listen [{}]:{};", cfg.link.address6.addr, sv.http_port),
            ];
            for p in &cfg.ports {
                http.push(format!("listen {}:{};", p.address4.addr, sv.http_port));
                http.push(format!("listen [{}]:{};", p.address6.addr, sv.http_port));
            }
            let mut proxy = Vec::new();
            for p in &cfg.ports {
                proxy.push(format!("listen {}:{};", p.address4.addr, sv.proxy_port));
                proxy.push(format!("listen [{}]:{};", p.address6.addr, sv.proxy_port));
            }
            vars.insert("HTTP_LISTEN", http.join("\n        "));
            vars.insert("PROXY_LISTEN", proxy.join("\n        "));
            vars.insert("WWW", sv.www.display().to_string());
            vars.insert("HOST4", cfg.link.host4.to_string());
            vars.insert("PORT4", port4);
            vars.insert("PROXY_UPSTREAM_PORT", sv.proxy_upstream_port.to_string());
            vars.insert("RELAY_PORT", sv.relay_port.to_string());
            vars.insert("RELAY_UPSTREAM_PORT", sv.relay_upstream_port.to_string());
            vars.insert(
                "LOAD_STREAM",
                if Path::new(STREAM_MODULE).exists() {
                    format!("load_module {STREAM_MODULE};")
                } else {
                    String::new()
                },
            );
            render(cfg, "nginx-card.conf.in", &vars)
        }
    }
}

fn start_or_reload_nginx(cfg: &Config, server: Server) -> Result<()> {
    let dir = server.dir(cfg);
    fs::create_dir_all(&dir)?;
    let conf = dir.join("nginx.conf");
    fs::write(&conf, nginx_conf(cfg, server)?)?;
    let ns = server.netns(cfg);
    let nginx = |extra: &[&str]| {
        let mut cmd = in_ns(ns, "nginx");
        cmd.arg("-c").arg(&conf).arg("-p").arg(&dir).args(extra);
        cmd
    };
    run(&mut nginx(&["-t", "-q"])).context("nginx -t")?;
    match server.pid(cfg) {
        Some(_) => {
            run(&mut nginx(&["-s", "reload"]))?;
        }
        None => {
            // nginx daemonizes; the master lives on after we exit.
            run(&mut nginx(&[]))?;
            wait_for("nginx to write its pid", Duration::from_secs(10), || {
                Ok(server.pid(cfg))
            })?;
        }
    }
    Ok(())
}

fn stop_nginx(cfg: &Config, server: Server) {
    if let Some(pid) = server.pid(cfg) {
        // SAFETY: kill(2) with a pid read from nginx's pid file, checked
        // above to be an nginx process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let gone = wait_for("nginx to exit", Duration::from_secs(10), || {
            Ok(server.pid(cfg).is_none().then_some(()))
        });
        if let Err(err) = gone {
            eprintln!("card: {err:#}");
        }
    }
}

fn daemon_binary(cfg: &Config) -> PathBuf {
    if cfg.daemon.binary.is_empty() {
        crate::card::binary()
    } else {
        PathBuf::from(&cfg.daemon.binary)
    }
}

fn daemon_pid(cfg: &Config) -> Option<i32> {
    let pid: i32 = fs::read_to_string(cfg.run_dir.join("vhost-card.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains("vhost-card")
        .then_some(pid)
}

/// Starts vhost-card in the background (its own session, so it outlives
/// us), logging to the run directory, and waits for its tap.
fn start_daemon(cfg: &Config) -> Result<()> {
    let binary = daemon_binary(cfg);
    if !binary.exists() {
        bail!(
            "{} does not exist: run `cargo build --release -p vhost-card` \
             or set daemon.binary",
            binary.display()
        );
    }
    let log_path = cfg.run_dir.join("vhost-card.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mut cmd = Command::new(&binary);
    cmd.arg("--socket")
        .arg(&cfg.daemon.socket)
        .args(["--netns", &cfg.netns, "--tap", &cfg.link.dev])
        .args(["--mtu", &cfg.daemon.mtu.to_string()])
        .args(&cfg.daemon.args)
        .env("RUNTIME_DIRECTORY", &cfg.run_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    fs::write(cfg.run_dir.join("vhost-card.pid"), child.id().to_string())?;
    add_state(cfg, "daemon", &child.id().to_string())?;
    let (ns, dev) = (cfg.netns.clone(), cfg.link.dev.clone());
    wait_for("vhost-card's tap", Duration::from_secs(20), || {
        if let Some(status) = child.try_wait()? {
            bail!(
                "vhost-card exited ({status}):\n{}",
                crate::process::tail(&log_path, 10)
            );
        }
        Ok(has_link(&ns, &dev).then_some(()))
    })?;
    Ok(())
}

/// Applies a changed config to a running card: everything but the daemon
/// and the namespace. Returns what it did, in a few words.
pub fn reload(cfg: &Config) -> Result<String> {
    if !netns_exists(&cfg.netns) || !has_link(&cfg.netns, &cfg.link.dev) {
        bail!(
            "the card is not up (no {} in namespace {}): use `card up`",
            cfg.link.dev,
            cfg.netns
        );
    }
    let before = (Server::Card.pid(cfg), daemon_pid(cfg));
    apply(cfg)?;
    Ok(format!(
        "ruleset replaced, nginx {} (master {}), daemon {}",
        if before.0.is_some() {
            "reloaded"
        } else {
            "started"
        },
        Server::Card.pid(cfg).map_or("-".into(), |p| p.to_string()),
        match before.1 {
            Some(pid) => format!("{pid} untouched"),
            None => "not ours, untouched".into(),
        }
    ))
}

/// Takes down what `up` made; quiet about what is already gone.
pub fn down(cfg: &Config) -> Result<()> {
    stop_nginx(cfg, Server::Card);
    if cfg
        .ports
        .first()
        .is_some_and(|p| netns_exists(&p.wire_netns))
    {
        stop_nginx(cfg, Server::Wire);
    }
    // Both charons (userspace IPsec) and the kernel's xfrm states.
    ipsec::stop(cfg);
    let state = read_state(cfg);
    let ns = cfg.netns.as_str();
    if netns_exists(ns) {
        let quiet = |args: &[&str]| {
            in_ns(ns, args[0]).args(&args[1..]).output().ok();
        };
        quiet(&["nft", "delete", "table", "inet", "card"]);
        for (key, port) in &state {
            if key == "port" && has_link(ns, port) {
                ip(ns, &["link", "del", port]).ok();
            }
        }
    }
    if let Some(pid) = daemon_pid(cfg) {
        // SAFETY: kill(2) on the daemon we started (pid file, command line
        // checked to be vhost-card).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        wait_for("vhost-card to exit", Duration::from_secs(10), || {
            Ok(daemon_pid(cfg).is_none().then_some(()))
        })?;
    }
    for (key, name) in state.iter().rev() {
        if key == "netns" && netns_exists(name) {
            run(Command::new("ip").args(["netns", "del", name]))?;
        }
    }
    if cfg.run_dir.exists() {
        fs::remove_dir_all(&cfg.run_dir).ok();
    }
    println!("card: down");
    Ok(())
}

/// What is up, for a person.
pub fn status(cfg: &Config) -> Result<String> {
    let ns = cfg.netns.as_str();
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    if !netns_exists(ns) {
        line(format!("card: down (no namespace {ns})"));
        return Ok(out);
    }
    line(format!(
        "card: namespace {ns}, mode {:?}, run directory {}",
        cfg.mode,
        cfg.run_dir.display()
    ));
    line(format!(
        "daemon: {}",
        match daemon_pid(cfg) {
            Some(pid) => format!("vhost-card pid {pid} (started by card up)"),
            None if has_link(ns, &cfg.link.dev) =>
                format!("{} present, daemon not started by card up", cfg.link.dev),
            None => format!("no {} (host link down)", cfg.link.dev),
        }
    ));
    let sh = |ns: &str, args: &[&str]| {
        stdout(in_ns(ns, args[0]).args(&args[1..])).unwrap_or_else(|e| format!("{e:#}"))
    };
    line(format!(
        "host link: {} {} {} (host {} {})",
        cfg.link.dev, cfg.link.address4, cfg.link.address6, cfg.link.host4, cfg.link.host6
    ));
    line(format!("links:\n{}", sh(ns, &["ip", "-br", "addr"])));
    line(format!("routes:\n{}", sh(ns, &["ip", "route"])));
    line(format!(
        "forwarding: ipv4 {} ipv6 {}",
        sh(ns, &["sysctl", "-n", "net.ipv4.ip_forward"]),
        sh(ns, &["sysctl", "-n", "net.ipv6.conf.all.forwarding"])
    ));
    for port in &cfg.ports {
        let wire = &port.wire_netns;
        if netns_exists(wire) {
            line(format!(
                "wire {wire}:\n{}",
                sh(wire, &["ip", "-br", "addr"])
            ));
        }
    }
    line(format!(
        "firewall (counters):\n{}",
        counters(cfg)
            .map(|c| c
                .iter()
                .map(|(k, v)| format!("  {k}: {v} packets"))
                .collect::<Vec<_>>()
                .join("\n"))
            .unwrap_or_else(|e| format!("  {e:#}"))
    ));
    line(format!("ipsec: {}", ipsec::status(cfg)));
    if let Some(sas) = ipsec::list_sas(cfg) {
        line(format!(
            "ipsec SAs (swanctl --list-sas, card):\n{}",
            sas.trim_end()
        ));
    }
    for (name, server) in [("card nginx", Server::Card), ("wire nginx", Server::Wire)] {
        line(format!(
            "{name}: {}",
            server
                .pid(cfg)
                .map_or("not running".into(), |p| format!("master pid {p}"))
        ));
    }
    Ok(out)
}

/// The ruleset's commented counters: comment -> packets.
pub fn counters(cfg: &Config) -> Result<BTreeMap<String, u64>> {
    let text = stdout(in_ns(&cfg.netns, "nft").args(["list", "table", "inet", "card"]))?;
    let mut out = BTreeMap::new();
    for l in text.lines() {
        let (Some(c), Some(comment)) = (l.find("counter packets "), l.find("comment \"")) else {
            continue;
        };
        let packets = l[c + 16..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let name = l[comment + 9..]
            .trim_end()
            .trim_end_matches('"')
            .to_string();
        out.insert(name, packets);
    }
    Ok(out)
}

/// Whether the IPsec tunnel is up, or why not.
pub fn ipsec_status(cfg: &Config) -> String {
    ipsec::status(cfg)
}
