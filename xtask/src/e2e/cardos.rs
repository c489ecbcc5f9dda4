//! `cargo xtask cardos-e2e`: the card-os network node (card-os/card.toml with IPsec and the
//! wire's test web server turned on, brought up by the `card_os` library, the same code as the
//! `card-os` command) between the stock kernel VM and an emulated 1500-byte wire. One VM, one card; the guest
//! applies host-config/card-link.sh. One PASS/FAIL/SKIP line each:
//!
//! 1. nat: the guest fetches the payload over HTTP from the wire's nginx
//!    through the card's masquerade;
//! 2. proxy: a wire client fetches it from the card's nginx reverse proxy,
//!    which pulls it from the guest's busybox httpd;
//! 3. fragments: a 60000-byte datagram from the guest crosses the wire as
//!    fragments (DF clear), frag-needed comes back with DF set, one from the
//!    wire reaches the guest reassembled by the card (UDP relay), and one
//!    forwarded from the wire (no service) reaches it whole too, reassembled
//!    by vhost-card, the guest's ReasmOKs unchanged;
//! 4. ipsec: guest traffic to the peer is ESP on the wire (kernel ESP, or
//!    ESP in UDP from strongSwan's userspace kernel-libipsec where the
//!    kernel has none), nothing in clear, and a `card-os reload` halfway
//!    through keeps the SAs;
//! 5. firewall: a new connection from the wire to the guest is dropped; the
//!    card's own HTTP server answers;
//! 6. reload: `card-os reload` with a changed config during a transfer;
//! 7. networkd: a second guest, Debian with systemd-networkd from
//!    debootstrap, configured by host-config/networkd/ alone, gets the
//!    card's MTU, addresses and routes and reaches the card and the wire
//!    (see `networkd.rs`);
//! 8. networkmanager: the same with NetworkManager and
//!    host-config/networkmanager/'s keyfile.
//!
//! The namespaces are private to the run (`vhc-<pid>-<n>` for the card,
//! `cosw-<pid>` for the wire); the rest comes from card-os/card.toml or the
//! file --config names. Logs: target/vm/logs/cardos/.
//!
//! Scenario 9, `installed`, is the product alone: `cargo xtask dist --install --destdir` into a
//! staging root, then the installed `card-os` and `vhost-card`, run from outside the checkout
//! with nothing of it on PATH, against the same VM (see `installed.rs`).

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::installed;
use super::networkd::{self, Flavour};
use super::{DEFAULT_MTU, MIB};
use crate::accel::Accel;
use card_os::cmd::in_ns;
use card_os::{ipsec as cos_ipsec, node as cardos, status as cos_status, Config};

use crate::card::{self, CardConfig};
use crate::nsnet;
use crate::payload::Hasher;
use crate::process::{Guarded, TempDir};
use crate::report::key_values;
use crate::rig::{self, Env, Plug, Rig};

#[derive(clap::Args)]
pub struct Options {
    /// Run only these scenarios (numbers 1-9, comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<u32>,
    /// The card-os config to run with (its namespace names, run directory
    /// and daemon are replaced by the run's own).
    #[arg(long, default_value_os_t = default_config())]
    pub config: std::path::PathBuf,
    /// MiB of each HTTP transfer.
    #[arg(long, default_value_t = 64)]
    pub mib: usize,
    /// Accelerator; by default a probe VM tries KVM and falls back to TCG.
    #[arg(long, value_enum)]
    pub accel: Option<Accel>,
    /// Use target/release/vhost-card as it is instead of building it first.
    #[arg(long)]
    pub no_build: bool,
    /// Echo the guest console.
    #[arg(long)]
    pub verbose: bool,
}

const DATAGRAM: usize = 60_000;

struct Verdict {
    number: u32,
    tag: &'static str,
    text: String,
}

impl Verdict {
    fn print(&self) {
        println!("{} {} {}", self.tag, self.number, self.text);
    }
}

/// The card-os config the run uses: card-os/card.toml with private names.
pub(super) struct Node {
    pub(super) cfg: Config,
    /// The Debian guests' images, of the scenarios that run.
    pub(super) guests: Vec<networkd::Prepared>,
    /// Which of them the rig's VM is, if any.
    pub(super) booted: Option<Flavour>,
    /// Who applies the config: this process's card_os library, or an installed `card-os`.
    pub(super) driver: Driver,
    pub(super) _run: Option<TempDir>,
}

/// How the scenarios reload and take down the node.
pub(super) enum Driver {
    Library,
    Installed(installed::Command),
}

impl Node {
    /// `reload` of the (possibly changed) config.
    fn reload(&self, cfg: &Config) -> Result<String> {
        match &self.driver {
            Driver::Library => Ok(cardos::reload(cfg)?),
            Driver::Installed(cmd) => cmd.reload(cfg),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let result = match &self.driver {
            Driver::Library => cardos::down(&self.cfg).map(drop).map_err(Into::into),
            Driver::Installed(cmd) => cmd.run(&["down"]).map(drop),
        };
        if let Err(err) = result {
            eprintln!("cardos-e2e: card down: {err:#}");
        }
    }
}

pub fn run(opts: &Options) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cardos-e2e needs root (network namespaces, nftables)");
    }
    if opts.only.iter().any(|n| !(1..=9).contains(n)) {
        bail!("scenarios are numbered 1 to 9");
    }
    let wanted = |n: u32| opts.only.is_empty() || opts.only.contains(&n);
    // Scenarios 1-6 share the busybox guest; 7 and 8 boot their own after
    // them.
    let busybox = (1..=6).any(wanted) || wanted(9);
    let t0 = Instant::now();
    crate::apt::install(&card_os::prereq::all_packages())?;
    crate::apt::install(&["tcpdump"])?;
    let logs = crate::vm_dir().join("logs/cardos");
    let env = Env::prepare(
        opts.mib * MIB,
        !opts.no_build,
        opts.accel,
        &logs,
        opts.verbose,
    )?;
    println!(
        "cardos-e2e: {} under {}; payload {} MiB, sha256 {}",
        env.kernel_package,
        env.accel.name(),
        opts.mib,
        env.payload.sha256
    );
    let node_text = std::fs::read_to_string(&opts.config)
        .with_context(|| format!("reading {}", opts.config.display()))?;
    let node_daemon = Config::parse(&node_text, &opts.config)?.daemon;
    let cfg = CardConfig {
        mtu: u32::from(node_daemon.mtu),
        disable: String::new(),
        queues: 1,
        // The rig's daemon is the card's: `[daemon] link = "ip"` makes its end a tun.
        args: match node_daemon.link {
            vhost_card::config::Link::Ip => vec!["--link".into(), "ip".into()],
            vhost_card::config::Link::Ethernet => Vec::new(),
        },
    };
    let mut guests = Vec::new();
    for (number, flavour) in DEBIAN_GUESTS {
        if wanted(number) {
            guests.push(networkd::prepare(&env, flavour)?);
        }
    }
    let mut rig = match guests.first() {
        Some(p) if !busybox => Rig::boot_image(&env, "cardos", &cfg, Plug::Boot, &p.image())?,
        _ => Rig::boot(&env, "cardos", &cfg, Plug::Boot)?,
    };
    println!("cardos-e2e: VM up in {:.1} s", rig.boot.as_secs_f64());
    let mut node = node_for(&rig, &node_text)?;
    if !busybox {
        node.booted = guests.first().map(|p| p.flavour);
    }
    node.guests = guests;
    let t_up = Instant::now();
    cardos::up(&node.cfg)?;
    println!(
        "cardos-e2e: card up in {:.1} s (namespaces {} and {}); ipsec: {}",
        t_up.elapsed().as_secs_f64(),
        node.cfg.netns(),
        node.cfg.ports[0].wire_netns,
        cos_ipsec::status(&node.cfg)
    );
    // The wire's web server serves the payload.
    std::fs::copy(&env.payload.path, node.cfg.run_dir.join("wire/www/payload"))?;
    if busybox {
        guest_setup(&mut rig, &node.cfg)?;
    }

    let mut verdicts = Vec::new();
    type Scenario = fn(&mut Rig, &Env, &mut Node, &Options) -> Result<(Option<bool>, String)>;
    let scenarios: [(u32, &str, Scenario); 9] = [
        (1, "nat", nat),
        (5, "firewall", firewall),
        (3, "fragments", fragments),
        (2, "proxy", proxy),
        (6, "reload", reload),
        (4, "ipsec", ipsec),
        // After the others on the busybox guest: it moves the VM to the installed card.
        (9, "installed", installed::scenario),
        // Last: they replace the busybox guest.
        (7, "networkd", networkd_guest),
        (8, "networkmanager", networkmanager_guest),
    ];
    for (number, name, scenario) in scenarios {
        if !wanted(number) {
            continue;
        }
        let t = Instant::now();
        let result = scenario(&mut rig, &env, &mut node, opts);
        let secs = t.elapsed().as_secs_f64();
        let (tag, text) = match result {
            Ok((Some(true), text)) => ("PASS", text),
            Ok((Some(false), text)) => ("FAIL", text),
            Ok((None, text)) => ("SKIP", text),
            Err(err) => ("FAIL", format!("{err:#}")),
        };
        let v = Verdict {
            number,
            tag,
            text: format!("{name}: {text} [{secs:.1} s]"),
        };
        v.print();
        verdicts.push(v);
        crate::check_interrupted()?;
    }
    drop(node);
    if let Err(err) = rig.vm.shutdown() {
        eprintln!("cardos-e2e: VM: {err:#}");
    }
    verdicts.sort_by_key(|v| v.number);
    println!();
    println!(
        "==== cargo xtask cardos-e2e: {} under {}, {:.0} s ====",
        env.kernel_package,
        env.accel.name(),
        t0.elapsed().as_secs_f64()
    );
    for v in &verdicts {
        v.print();
    }
    let failed = verdicts.iter().filter(|v| v.tag == "FAIL").count();
    let skipped = verdicts.iter().filter(|v| v.tag == "SKIP").count();
    println!(
        "{} passed, {failed} failed, {skipped} skipped",
        verdicts.len() - failed - skipped
    );
    if failed > 0 {
        bail!("{failed} cardos-e2e scenario(s) failed");
    }
    Ok(())
}

/// The shipped example: card-os/card.toml.
pub fn default_config() -> std::path::PathBuf {
    crate::workspace_root().join("card-os/card.toml")
}

/// The card-os config of the run: `text` (a card's file) with IPsec and the wire's test web
/// server on, the rig's namespace as the card (the file is named after it; its daemon is the
/// rig's, so card-os starts none), a private wire namespace, run and state directories, and
/// the templates of this checkout.
fn node_for(rig: &Rig, text: &str) -> Result<Node> {
    let run = TempDir::new("vhc-cardos-node")?;
    let wire = format!("cosw-{}", std::process::id());
    let mut file: toml::Table = toml::from_str(text)?;
    let table = |file: &mut toml::Table, name: &str| -> Result<toml::Table> {
        Ok(file
            .remove(name)
            .unwrap_or(toml::Value::Table(Default::default()))
            .try_into()?)
    };
    let mut daemon = table(&mut file, "daemon")?;
    daemon.insert(
        "socket".into(),
        rig.card.socket.display().to_string().into(),
    );
    daemon.insert("tap".into(), card::TAP.into());
    file.insert("daemon".into(), daemon.into());
    let mut card = table(&mut file, "card")?;
    card.insert("daemon".into(), "".into());
    for (key, dir) in [
        ("run_dir", run.path().join("card")),
        ("state_dir", run.path().join("state")),
        ("share_dir", crate::workspace_root().join("card-os")),
    ] {
        card.insert(key.into(), dir.display().to_string().into());
    }
    file.insert("card".into(), card.into());
    if let Some(toml::Value::Array(ports)) = file.get_mut("port") {
        for port in ports.iter_mut().filter_map(toml::Value::as_table_mut) {
            port.insert("wire_netns".into(), wire.clone().into());
        }
    }
    let mut ipsec = table(&mut file, "ipsec")?;
    ipsec.insert("enable".into(), true.into());
    file.insert("ipsec".into(), ipsec.into());
    let mut services = table(&mut file, "services")?;
    services.insert("wire_http_port".into(), 80.into());
    file.insert("services".into(), services.into());
    let path = run.path().join(format!("{}.toml", rig.card.ns.name()));
    std::fs::write(&path, toml::to_string(&file)?)?;
    let cfg = Config::load(&path)?;
    Ok(Node {
        cfg,
        guests: Vec::new(),
        booted: None,
        driver: Driver::Library,
        _run: Some(run),
    })
}

/// The Debian guests' scenarios.
const DEBIAN_GUESTS: [(u32, Flavour); 2] = [(7, Flavour::Networkd), (8, Flavour::NetworkManager)];

/// Scenarios 7 and 8: a Debian guest (booted now unless it is the rig's VM
/// already) configured by host-config alone.
fn debian_guest(
    rig: &mut Rig,
    env: &Env,
    node: &mut Node,
    opts: &Options,
    flavour: Flavour,
) -> Result<(Option<bool>, String)> {
    let prepared = node
        .guests
        .iter()
        .find(|p| p.flavour == flavour)
        .context("no image for this guest")?;
    if node.booted != Some(flavour) {
        rig.replace_vm(env, flavour.name(), &prepared.image())?;
        node.booted = Some(flavour);
    }
    networkd::check(rig, prepared, &node.cfg, env, opts.mib * MIB)
}

fn networkd_guest(
    rig: &mut Rig,
    env: &Env,
    node: &mut Node,
    opts: &Options,
) -> Result<(Option<bool>, String)> {
    debian_guest(rig, env, node, opts, Flavour::Networkd)
}

fn networkmanager_guest(
    rig: &mut Rig,
    env: &Env,
    node: &mut Node,
    opts: &Options,
) -> Result<(Option<bool>, String)> {
    debian_guest(rig, env, node, opts, Flavour::NetworkManager)
}

/// The guest applies host-config/card-link.sh (routes via the card) and
/// starts busybox httpd for the proxy.
pub(super) fn guest_setup(rig: &mut Rig, cfg: &Config) -> Result<()> {
    let script = std::fs::read_to_string(crate::workspace_root().join("host-config/card-link.sh"))?;
    let out = rig.vm.check(
        &format!("cat > /tmp/card-link.sh <<'CARD_LINK_EOF'\n{script}CARD_LINK_EOF\nsh /tmp/card-link.sh && ip route && ip -6 route"),
        Duration::from_secs(30),
    )?;
    if !out.contains(&format!("default via {}", cfg.link.address4.addr)) {
        bail!("the guest has no default route via the card after card-link.sh:\n{out}");
    }
    rig.vm.check(
        &format!(
            "httpd -p {} -h / && echo httpd started",
            cfg.services.proxy_upstream_port
        ),
        Duration::from_secs(10),
    )?;
    Ok(())
}

fn wire(node: &Node) -> &str {
    &node.cfg.ports[0].wire_netns
}

fn wire_host(node: &Node, n: usize) -> String {
    node.cfg.ports[0].wire_hosts[n].addr.to_string()
}

/// The guest fetches `url` with busybox wget into sha256sum; returns the
/// digest, bytes and seconds.
pub(super) fn guest_fetch(rig: &mut Rig, url: &str, len: usize) -> Result<(String, u64, f64)> {
    let reply = rig.vm.sh(
        &format!("wget -q -O - {url} | sha256sum"),
        rig::transfer_timeout(len),
    )?;
    if reply.rc != 0 {
        bail!(
            "guest wget {url} failed ({}): {}",
            reply.rc,
            reply.out.trim()
        );
    }
    let sha = crate::payload::parse_sum(reply.out.trim()).unwrap_or_default();
    Ok((sha, len as u64, reply.elapsed.as_secs_f64()))
}

pub(super) fn mbs(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs.max(1e-6)
}

/// Scenario 1: guest → wire HTTP through the card's NAT.
pub(super) fn nat(
    rig: &mut Rig,
    env: &Env,
    node: &mut Node,
    opts: &Options,
) -> Result<(Option<bool>, String)> {
    let len = opts.mib * MIB;
    let mtu = rig.nic_info()?.get("mtu").cloned().unwrap_or_default();
    let wire_mtu = port_mtu(node);
    let c0 = cos_status::counters(&node.cfg)?;
    let url = format!("http://{}/payload", wire_host(node, 0));
    let (sha, bytes, secs) = guest_fetch(rig, &url, len)?;
    let c1 = cos_status::counters(&node.cfg)?;
    let log = std::fs::read_to_string(node.cfg.run_dir.join("wire/access.log")).unwrap_or_default();
    let seen_from = log
        .lines()
        .rev()
        .find(|l| l.contains("GET /payload"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("-")
        .to_string();
    let masq = c1.get("host IPv4").unwrap_or(&0) - c0.get("host IPv4").unwrap_or(&0);
    let port_addr = node.cfg.ports[0].address4.addr.to_string();
    let pass = sha == env.payload.sha256
        && mtu == DEFAULT_MTU.to_string()
        && wire_mtu == "1500"
        && seen_from == port_addr
        && masq >= 1;
    Ok((
        Some(pass),
        format!(
            "guest wget {url}: {} MiB in {secs:.1} s ({:.1} MB/s), sha256 {}; guest MTU {mtu}, \
             wire MTU {wire_mtu}; the wire server saw the client as {seen_from} \
             (masquerade rule +{masq} connection(s))",
            bytes / MIB as u64,
            mbs(bytes, secs),
            if sha == env.payload.sha256 {
                format!("equal ({}…)", &sha[..12.min(sha.len())])
            } else {
                format!("{sha} != {}", env.payload.sha256)
            }
        ),
    ))
}

fn port_mtu(node: &Node) -> String {
    let p = &node.cfg.ports[0];
    crate::process::stdout(
        in_ns(wire(node), "cat").arg(format!("/sys/class/net/{}/mtu", p.wire_dev)),
    )
    .unwrap_or_default()
}

/// Fetches `url` from inside `ns` with busybox wget, hashing what arrives.
fn ns_fetch(ns: &str, url: &str) -> Result<(String, u64, f64)> {
    let t0 = Instant::now();
    let mut child = in_ns(ns, "busybox")
        .args(["wget", "-q", "-O", "-", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().context("wget stdout")?;
    let mut hasher = Hasher::new()?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buf[..n])?;
    }
    let status = child.wait()?;
    let secs = t0.elapsed().as_secs_f64();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut err).ok();
        }
        bail!(
            "wget {url} in {ns} failed ({status}) after {bytes} bytes: {}",
            err.trim()
        );
    }
    Ok((hasher.finish()?, bytes, secs))
}

/// Scenario 2: wire client → card reverse proxy → guest httpd.
fn proxy(
    _rig: &mut Rig,
    env: &Env,
    node: &mut Node,
    _: &Options,
) -> Result<(Option<bool>, String)> {
    let url = format!(
        "http://{}:{}{}",
        node.cfg.ports[0].address4.addr,
        node.cfg.services.proxy_port,
        crate::guest::PAYLOAD
    );
    let (sha, bytes, secs) = ns_fetch(wire(node), &url)?;
    let ok = sha == env.payload.sha256 && bytes == env.payload.data.len() as u64;
    Ok((
        Some(ok),
        format!(
            "wire wget {url} (card nginx → http://{}:{}{} on the guest): {} bytes in {secs:.1} s \
             ({:.1} MB/s), sha256 {}",
            node.cfg.link.host4,
            node.cfg.services.proxy_upstream_port,
            crate::guest::PAYLOAD,
            bytes,
            mbs(bytes, secs),
            if ok {
                format!("equal ({}…)", &sha[..12])
            } else {
                format!("{sha} != {}", env.payload.sha256)
            }
        ),
    ))
}

/// Sends one datagram of `size` pattern bytes from `ns` to `to` with DF
/// clear, so it leaves in fragments if it must.
fn udp_send_fragmentable(ns: &str, to: SocketAddrV4, size: usize) -> Result<usize> {
    nsnet::join(nsnet::spawn_in(ns, "wire-udp-tx", move || {
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        nsnet::pmtu_discovery(&sock, libc::IP_PMTUDISC_DONT)?;
        Ok(sock.send_to(&crate::guest::pattern(size), to)?)
    })?)
}

fn snmp(ns: &str, group: &str, field: &str) -> i64 {
    let text = crate::process::stdout(in_ns(ns, "cat").arg("/proc/net/snmp")).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{group}:")))
        .collect();
    if let [head, values] = lines[..] {
        if let Some(i) = head.split_whitespace().position(|h| h == field) {
            return values
                .split_whitespace()
                .nth(i)
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1);
        }
    }
    -1
}

/// Scenario 3: fragments both ways, and frag-needed with DF.
fn fragments(
    rig: &mut Rig,
    _env: &Env,
    node: &mut Node,
    _: &Options,
) -> Result<(Option<bool>, String)> {
    let cns = node.cfg.netns().to_string();
    let wns = wire(node).to_string();
    let port = node.cfg.ports[0].clone();
    let port4: Ipv4Addr = port.address4.addr.to_string().parse()?;
    let server: Ipv4Addr = wire_host(node, 0).parse()?;
    let peer: Ipv4Addr = wire_host(node, 1).parse()?;
    let guest4: Ipv4Addr = node.cfg.link.host4;
    let card4: Ipv4Addr = node.cfg.link.address4.addr.to_string().parse()?;
    let helper = crate::guest::HELPER;

    // (a) guest → wire, DF clear: one frame on card0, fragments on the wire.
    let on_link = nsnet::capture_udp(
        &cns,
        card::TAP,
        (guest4, server),
        None,
        Duration::from_secs(20),
    )?;
    let on_wire = nsnet::capture_udp(
        &wns,
        &port.wire_dev,
        (port4, server),
        Some(5005),
        Duration::from_secs(30),
    )?;
    let sent = rig.vm.sh(
        &format!("{helper} guest udp-send {server} 5005 {DATAGRAM} --fragment"),
        Duration::from_secs(30),
    )?;
    let wire_cap = nsnet::join(on_wire)?;
    let link_cap = nsnet::join(on_link)?;
    let link_in = link_cap.frames.iter().filter(|f| !f.outgoing).count();
    let frags: Vec<_> = wire_cap.frames.iter().filter(|f| !f.outgoing).collect();
    let biggest = frags.iter().map(|f| f.len).max().unwrap_or(0);
    let a_ok = sent.rc == 0
        && wire_cap.received == Some(DATAGRAM)
        && wire_cap.intact
        && link_in == 1
        && frags.len() > 1
        && frags.iter().all(|f| f.fragment && f.len <= 1514);
    let a = format!(
        "guest→wire DF clear: card0 carried {link_in} frame(s) ({} B), the wire {} fragments \
         (largest frame {biggest} B), receiver got {} B{}",
        link_cap.frames.first().map_or(0, |f| f.len),
        frags.len(),
        wire_cap
            .received
            .map_or("nothing".into(), |n| n.to_string()),
        if wire_cap.intact {
            " intact"
        } else {
            " CORRUPT"
        },
    );

    // (b) DF set: the card answers frag-needed; the guest's path MTU drops.
    let icmp0 = snmp(&cns, "Icmp", "OutDestUnreachs");
    let out = rig.vm.sh(
        &format!("{helper} guest udp-send {peer} 5007 {DATAGRAM} --pmtu"),
        Duration::from_secs(30),
    )?;
    let icmp1 = snmp(&cns, "Icmp", "OutDestUnreachs");
    let kv = key_values(&out.out);
    let mtu_after = kv.get("mtu_after").cloned().unwrap_or_default();
    let b_ok = out.rc == 0 && icmp1 > icmp0 && mtu_after == port.mtu.to_string();
    let b = format!(
        "guest→wire DF set: card sent {} ICMP dest-unreachable (frag-needed), guest path MTU \
         {} → {mtu_after}, resend: {}",
        icmp1 - icmp0,
        kv.get("mtu_before").map_or("?", String::as_str),
        kv.get("resend").map_or("?", String::as_str)
    );

    // (c) wire → guest through the card's UDP relay: fragments on the wire,
    // one whole frame on card0, no reassembly in the guest.
    let relay = node.cfg.services.relay_port;
    rig.vm.check(
        &format!(
            "rm -f /tmp/u.ready /tmp/u.out
             {helper} guest udp-recv {} /tmp/u.ready 30 > /tmp/u.out 2>&1 &
             n=0; until [ -e /tmp/u.ready ]; do n=$((n + 1)); [ $n -gt 100 ] && exit 1; sleep 0.1; done",
            node.cfg.services.relay_upstream_port
        ),
        Duration::from_secs(20),
    )?;
    let reasm0 = key_values(
        &rig.vm
            .check("echo r=$(snmp Ip ReasmReqds)", Duration::from_secs(10))?,
    );
    let card_reasm0 = snmp(&cns, "Ip", "ReasmOKs");
    let on_link = nsnet::capture_udp(
        &cns,
        card::TAP,
        (card4, guest4),
        None,
        Duration::from_secs(20),
    )?;
    let on_wire = nsnet::capture_udp(
        &wns,
        &port.wire_dev,
        (server, port4),
        None,
        Duration::from_secs(10),
    )?;
    let sent = udp_send_fragmentable(&wns, SocketAddrV4::new(port4, relay), DATAGRAM)?;
    let wire_cap = nsnet::join(on_wire)?;
    let link_cap = nsnet::join(on_link)?;
    let got = key_values(&rig.vm.check(
        "n=0; until grep -q -e intact= -e rror /tmp/u.out; do n=$((n + 1)); [ $n -gt 100 ] && break; sleep 0.1; done
         cat /tmp/u.out; echo r=$(snmp Ip ReasmReqds)",
        Duration::from_secs(20),
    )?);
    let card_reasm = snmp(&cns, "Ip", "ReasmOKs") - card_reasm0;
    let guest_reasm = got
        .get("r")
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(-1)
        - reasm0
            .get("r")
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
    let wire_frags = wire_cap
        .frames
        .iter()
        .filter(|f| f.outgoing && f.fragment)
        .count();
    let link_frames: Vec<_> = link_cap.frames.iter().filter(|f| f.outgoing).collect();
    let c_ok = sent == DATAGRAM
        && got.get("received").map(String::as_str) == Some("60000")
        && got.get("intact").map(String::as_str) == Some("true")
        && wire_frags > 1
        && link_frames.len() == 1
        && !link_frames[0].fragment
        && card_reasm >= 1
        && guest_reasm == 0;
    let c = format!(
        "wire→guest via the card's UDP relay: {wire_frags} fragments on the wire, card \
         reassembled {card_reasm}, card0 carried {} frame(s) ({} B), guest got {} B{}, guest \
         reassemblies +{guest_reasm}",
        link_frames.len(),
        link_frames.first().map_or(0, |f| f.len),
        got.get("received").map_or("nothing", String::as_str),
        if got.get("intact").map(String::as_str) == Some("true") {
            " intact"
        } else {
            ""
        },
    );
    let (d_ok, d) = forwarded(rig, node, server)?;
    Ok((
        Some(a_ok && b_ok && c_ok && d_ok),
        format!("{a}; {b}; {c}; {d}"),
    ))
}

/// Scenario 3 (d): a datagram *forwarded* from the wire to the guest, no service in between.
/// The guest says hello to the wire's host from its port (so the firewall lets the answer in,
/// NAT'd back); the answer, 60000 bytes with DF clear, crosses the wire as fragments; the card's
/// kernel forwards them as fragments (Linux refragments a forwarded datagram to the sizes it
/// came in, conntrack or not), and vhost-card reassembles them before the host's ring: the
/// guest receives one whole datagram and its ReasmOKs/ReasmReqds do not move.
fn forwarded(rig: &mut Rig, node: &Node, server: Ipv4Addr) -> Result<(bool, String)> {
    const PORT: u16 = 5009;
    const GUEST_PORT: u16 = 5010;
    let wns = wire(node).to_string();
    let helper = crate::guest::HELPER;
    let (tx, rx) = std::sync::mpsc::channel();
    let answer = nsnet::spawn_in(&wns, "wire-answer", move || {
        let sock = UdpSocket::bind(SocketAddrV4::new(server, PORT))?;
        sock.set_read_timeout(Some(Duration::from_secs(40)))?;
        tx.send(()).ok();
        let mut buf = [0u8; 64];
        let (_, from) = sock
            .recv_from(&mut buf)
            .context("no hello from the guest")?;
        nsnet::pmtu_discovery(&sock, libc::IP_PMTUDISC_DONT)?;
        Ok(sock.send_to(&crate::guest::pattern(DATAGRAM), from)?)
    })?;
    rx.recv_timeout(Duration::from_secs(10))
        .context("the wire's UDP socket did not open")?;
    let counters = "echo ok=$(snmp Ip ReasmOKs); echo reqds=$(snmp Ip ReasmReqds)";
    let g0 = key_values(&rig.vm.check(counters, Duration::from_secs(10))?);
    let d0 = rig.card.fresh_stats()?;
    rig.vm.check(
        &format!(
            "rm -f /tmp/f.ready /tmp/f.out
             {helper} guest udp-recv {GUEST_PORT} /tmp/f.ready 30 --hello {server}:{PORT} > /tmp/f.out 2>&1 &
             n=0; until [ -e /tmp/f.ready ]; do n=$((n + 1)); [ $n -gt 100 ] && exit 1; sleep 0.1; done"
        ),
        Duration::from_secs(20),
    )?;
    let sent = nsnet::join(answer)?;
    let got = key_values(&rig.vm.check(
        &format!(
            "n=0; until grep -q -e intact= -e rror /tmp/f.out; do n=$((n + 1)); [ $n -gt 100 ] && break; sleep 0.1; done
             cat /tmp/f.out; {counters}"
        ),
        Duration::from_secs(20),
    )?);
    let d1 = rig.card.fresh_stats()?;
    let num = |kv: &std::collections::BTreeMap<String, String>, k: &str| -> i64 {
        kv.get(k).and_then(|v| v.parse().ok()).unwrap_or(-1)
    };
    let dd = |k: &str| i128::from(*d1.get(k).unwrap_or(&0)) - i128::from(*d0.get(k).unwrap_or(&0));
    let (ok0, ok1) = (num(&g0, "ok"), num(&got, "ok"));
    let (req0, req1) = (num(&g0, "reqds"), num(&got, "reqds"));
    let whole = sent == DATAGRAM
        && got.get("received").map(String::as_str) == Some("60000")
        && got.get("intact").map(String::as_str) == Some("true");
    let pass = whole && ok1 == ok0 && req1 == req0 && dd("reasm_datagrams") >= 1;
    Ok((
        pass,
        format!(
            "wire→guest forwarded (no service): guest got {} B{}; guest ReasmOKs {ok0} before, \
             {ok1} after, ReasmReqds {req0} → {req1}; vhost-card reassembled {} datagram(s) from \
             {} fragment(s) the card's kernel forwarded",
            got.get("received").map_or("nothing", String::as_str),
            if got.get("intact").map(String::as_str) == Some("true") {
                " intact"
            } else {
                ""
            },
            dd("reasm_datagrams"),
            dd("reasm_fragments"),
        ),
    ))
}

/// Scenario 5: the wire cannot open connections to the guest; the card's
/// own HTTP server answers.
fn firewall(
    rig: &mut Rig,
    _env: &Env,
    node: &mut Node,
    _: &Options,
) -> Result<(Option<bool>, String)> {
    let guest4 = node.cfg.link.host4;
    rig.vm.check(
        "rm -f /tmp/l.out
         (nc -l -p 7000 > /tmp/l.out 2>&1 &)
         n=0; until netstat -ltn | grep -q ':7000 '; do n=$((n + 1)); [ $n -gt 100 ] && exit 1; sleep 0.1; done",
        Duration::from_secs(20),
    )?;
    let c0 = cos_status::counters(&node.cfg)?;
    let to = SocketAddr::V4(SocketAddrV4::new(guest4, 7000));
    let from_wire = nsnet::join(nsnet::spawn_in(wire(node), "wire-connect", move || {
        Ok(TcpStream::connect_timeout(&to, Duration::from_secs(3)).map(|_| ()))
    })?)?;
    let c1 = cos_status::counters(&node.cfg)?;
    let dropped =
        c1.get("new from the wire").unwrap_or(&0) - c0.get("new from the wire").unwrap_or(&0);
    // The listener is there: the card itself reaches it.
    let from_card = nsnet::join(nsnet::spawn_in(
        node.cfg.netns(),
        "card-connect",
        move || {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
            std::io::Write::write_all(&mut s, b"hello from the card\n")?;
            Ok(())
        },
    )?);
    let heard = rig
        .vm
        .check("sleep 0.5; cat /tmp/l.out", Duration::from_secs(10))?;
    let url = format!(
        "http://{}:{}/",
        node.cfg.ports[0].address4.addr, node.cfg.services.http_port
    );
    let page =
        crate::process::stdout(in_ns(wire(node), "busybox").args(["wget", "-q", "-O", "-", &url]));
    let page_ok = page
        .as_ref()
        .is_ok_and(|p| p.contains("the card's own web server"));
    let wire_refused = match &from_wire {
        Ok(()) => "CONNECTED".to_string(),
        Err(e) => format!("failed ({e})"),
    };
    let pass = from_wire.is_err()
        && dropped >= 1
        && from_card.is_ok()
        && heard.contains("hello from the card")
        && page_ok;
    Ok((
        Some(pass),
        format!(
            "wire→guest {to} new TCP connection {wire_refused}, card's \"new from the wire\" drop \
             rule +{dropped} packet(s); card→guest same port {}; wire GET {url}: {}",
            if from_card.is_ok() && heard.contains("hello") {
                "connected, guest got the data".to_string()
            } else {
                format!("{from_card:?}")
            },
            match &page {
                Ok(p) if page_ok => format!("card page ({} bytes)", p.len()),
                Ok(p) => format!("unexpected page {p:?}"),
                Err(e) => format!("{e:#}"),
            }
        ),
    ))
}

/// Scenario 6: `card-os reload` with a changed config while the guest fetches
/// from the wire; the transfer ends whole and the host link never drops.
fn reload(
    rig: &mut Rig,
    env: &Env,
    node: &mut Node,
    opts: &Options,
) -> Result<(Option<bool>, String)> {
    let len = opts.mib * MIB;
    let url = format!("http://{}/slow/payload", wire_host(node, 0));
    let carrier0 = rig.nic_info()?;
    let daemon_alive0 = rig.card.alive()?;
    rig.vm.check(
        &format!(
            "rm -f /tmp/r.sum /tmp/r.rc
             ((wget -q -O - {url} | sha256sum > /tmp/r.sum); echo $? > /tmp/r.rc) > /dev/null 2>&1 &"
        ),
        Duration::from_secs(10),
    )?;
    // Wait for the transfer to be under way.
    let wns = wire(node).to_string();
    let established = || -> Result<bool> {
        let out = crate::process::stdout(in_ns(&wns, "ss").args([
            "-Htn",
            "state",
            "established",
            "( sport = :80 )",
        ]))?;
        Ok(!out.trim().is_empty())
    };
    crate::process::wait_for("the transfer to start", Duration::from_secs(30), || {
        Ok(established()?.then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(2));
    // The changed config: one more TCP service on the card.
    node.cfg.firewall.tcp_services.push(8443);
    let t = Instant::now();
    let report = node.reload(&node.cfg)?;
    let reload_ms = t.elapsed().as_millis();
    let during = established()?;
    let applied = crate::process::stdout(in_ns(node.cfg.netns(), "nft").args([
        "list",
        "set",
        "inet",
        "card",
        "tcp_services",
    ]))?
    .contains("8443");
    let out = rig.vm.check(
        "n=0; while [ ! -e /tmp/r.rc ]; do n=$((n + 1)); [ $n -gt 3000 ] && break; sleep 0.1; done
         echo rc=$(cat /tmp/r.rc); echo sha=$(cut -d' ' -f1 /tmp/r.sum)",
        rig::transfer_timeout(len),
    )?;
    let kv = key_values(&out);
    let sha = kv.get("sha").cloned().unwrap_or_default();
    let carrier1 = rig.nic_info()?;
    let changes = |kv: &std::collections::BTreeMap<String, String>| {
        kv.get("carrier_changes").cloned().unwrap_or_default()
    };
    let link_kept =
        changes(&carrier0) == changes(&carrier1) && daemon_alive0 && rig.card.alive()?;
    let pass = sha == env.payload.sha256 && during && applied && link_kept;
    Ok((
        Some(pass),
        format!(
            "reload (+tcp service 8443) took {reload_ms} ms, during a {} MiB guest wget of {url}: {report}; \
             transfer {} during the reload; new rule {}; sha256 {}; guest carrier changes {} → {}, \
             daemon {}",
            opts.mib,
            if during { "still running" } else { "NOT running" },
            if applied { "in force" } else { "MISSING" },
            if sha == env.payload.sha256 {
                format!("equal ({}…)", &sha[..12])
            } else {
                format!("{sha} != {}", env.payload.sha256)
            },
            changes(&carrier0),
            changes(&carrier1),
            if rig.card.alive()? { "still running" } else { "GONE" }
        ),
    ))
}

/// Scenario 4: guest → IPsec peer; the wire sees only ESP (or IKE), and a
/// `card-os reload` halfway through keeps the tunnel and its SAs.
pub(super) fn ipsec(
    rig: &mut Rig,
    env: &Env,
    node: &mut Node,
    opts: &Options,
) -> Result<(Option<bool>, String)> {
    let Some(s) = node.cfg.ipsec.clone() else {
        return Ok((None, "[ipsec] is disabled".into()));
    };
    let status = cos_ipsec::status(&node.cfg);
    let Some(backend) = cos_ipsec::backend(&node.cfg) else {
        return Ok((Some(false), format!("the tunnel is not up: {status}")));
    };
    let spis0 = cos_ipsec::child_spis(&node.cfg).unwrap_or_default();
    let pcap = node.cfg.run_dir.join("esp.pcap");
    let dev = node.cfg.ports[0].wire_dev.clone();
    let mut cmd = in_ns(wire(node), "tcpdump");
    cmd.args(["-i", &dev, "-n", "-s", "0", "-U", "-w"])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut dump = Guarded::spawn("tcpdump", &mut cmd, libc::SIGINT)?;
    std::thread::sleep(Duration::from_secs(2));
    // `card-os reload` as soon as the transfer runs, from another thread:
    // (seconds it took, whether the transfer still ran when it was done).
    let cfg = node.cfg.clone();
    let reload = match &node.driver {
        Driver::Library => None,
        Driver::Installed(cmd) => Some(cmd.clone()),
    };
    let wns = wire(node).to_string();
    let filter = format!(
        "( sport = :{} and dst {} )",
        node.cfg.services.wire_http_port, s.local_subnet
    );
    let reloader = std::thread::spawn(move || -> Result<(Duration, bool)> {
        let running = || -> Result<bool> {
            let out = crate::process::stdout(in_ns(&wns, "ss").args([
                "-Htn",
                "state",
                "established",
                &filter,
            ]))?;
            Ok(!out.trim().is_empty())
        };
        crate::process::wait_for(
            "the transfer through the tunnel",
            Duration::from_secs(60),
            || Ok(running()?.then_some(())),
        )?;
        let t = Instant::now();
        match reload {
            None => cardos::reload(&cfg)?,
            Some(cmd) => cmd.reload(&cfg)?,
        };
        Ok((t.elapsed(), running()?))
    });
    let url = format!("http://{}/payload", s.peer_inner.addr);
    let fetched = guest_fetch(rig, &url, opts.mib * MIB);
    let reloaded = reloader.join().expect("the reload thread panicked");
    std::thread::sleep(Duration::from_millis(500));
    dump.stop()?;
    let (sha, bytes, secs) = fetched?;
    let spis1 = cos_ipsec::child_spis(&node.cfg).unwrap_or_default();

    let wire = classify(&pcap, &s, &env.payload.data)?;
    let reload_ok = match &reloaded {
        Ok(_) => spis0 == spis1 && !spis0.is_empty(),
        Err(_) => false,
    };
    let mid = reloaded.as_ref().is_ok_and(|(_, during)| *during);
    let sha_ok = sha == env.payload.sha256;
    // At least one ESP packet per full-sized segment of the transfer.
    let ok = sha_ok
        && wire.clear == 0
        && wire.plaintext.is_empty()
        && wire.esp as u64 > bytes / 1500
        && reload_ok;
    let mode = match backend {
        cos_ipsec::Backend::Kernel => "kernel ESP (ip xfrm)".to_string(),
        cos_ipsec::Backend::Strongswan => format!(
            "userspace ESP-in-UDP/4500 (strongSwan kernel-libipsec; {})",
            if status.contains("no CONFIG_INET_ESP") {
                "this kernel has no ESP"
            } else {
                "kernel ESP not used"
            }
        ),
    };
    Ok((
        Some(ok),
        format!(
            "{mode}: guest wget {url}: {bytes} bytes in {secs:.1} s ({:.1} MB/s), sha256 {}; \
             wire capture: {} packets, {} ESP {}↔{}, {} IKE, {} other (ARP/ND), {} plaintext \
             (cleartext {}↔{} packets, inner addresses {} {}, HTTP or payload bytes){}; \
             card reload {}",
            mbs(bytes, secs),
            if sha_ok { "equal" } else { "DIFFERENT" },
            wire.total,
            wire.esp,
            s.local,
            s.peer,
            wire.ike,
            wire.other,
            wire.clear + wire.plaintext.len(),
            s.local,
            s.peer,
            s.local_subnet,
            s.peer_subnet,
            if wire.plaintext.is_empty() {
                String::new()
            } else {
                format!(" [{}]", wire.plaintext.join(", "))
            },
            match &reloaded {
                Ok((took, _)) => format!(
                    "during the transfer took {} ms, transfer {} when it was done, SAs {}",
                    took.as_millis(),
                    if mid { "still running" } else { "already over" },
                    if spis0 == spis1 {
                        format!("kept ({spis1})")
                    } else {
                        format!("CHANGED ({spis0} → {spis1})")
                    }
                ),
                Err(e) => format!("FAILED: {e:#}"),
            }
        ),
    ))
}

/// What a capture on the wire held.
struct WireCapture {
    total: usize,
    /// ESP (kernel) or ESP in UDP (tcpdump decodes both) between the ends.
    esp: usize,
    /// IKE (UDP 500, or 4500 with the non-ESP marker) between the ends.
    ike: usize,
    /// Anything else between the ends: cleartext.
    clear: usize,
    /// Not between the ends (ARP, IPv6 neighbour discovery, ...).
    other: usize,
    /// Inner traffic anywhere in the capture: what was found.
    plaintext: Vec<String>,
}

/// Sorts every packet of `pcap` by tcpdump's own decoding, and looks for
/// inner traffic in it: inner addresses in any header tcpdump decodes, HTTP
/// and bytes of the payload anywhere in the raw capture.
fn classify(
    pcap: &std::path::Path,
    s: &card_os::config::Ipsec,
    payload: &[u8],
) -> Result<WireCapture> {
    let out = Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(pcap)
        .stderr(Stdio::null())
        .output()
        .context("tcpdump -r")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (local, peer) = (s.local.to_string(), s.peer.to_string());
    let between = |l: &str| {
        let ends = |a: &str, b: &str| {
            l.contains(&format!(" {a}.")) && l.contains(&format!("> {b}."))
                || l.contains(&format!(" {a} > {b}:"))
        };
        ends(&local, &peer) || ends(&peer, &local)
    };
    let mut w = WireCapture {
        total: 0,
        esp: 0,
        ike: 0,
        clear: 0,
        other: 0,
        plaintext: Vec::new(),
    };
    for l in text.lines() {
        w.total += 1;
        if !between(l) {
            w.other += 1;
        } else if l.contains("ESP(spi=") && !l.contains("NONESP") {
            w.esp += 1;
        } else if l.contains("isakmp") || l.contains("NONESP-encap") {
            w.ike += 1;
        } else {
            w.clear += 1;
        }
    }
    // Inner addresses in any header tcpdump can read.
    let inner = Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(pcap)
        .arg(format!("net {} or net {}", s.local_subnet, s.peer_subnet))
        .stderr(Stdio::null())
        .output()
        .context("tcpdump -r")?;
    let inner_seen = String::from_utf8_lossy(&inner.stdout).lines().count();
    if inner_seen > 0 {
        w.plaintext
            .push(format!("{inner_seen} packets naming inner addresses"));
    }
    // HTTP and slices of the payload anywhere in the raw capture: grep -F
    // (fast where a scan in this debug build would not be), with slices that
    // hold no newline since grep matches within lines.
    let mut needles: Vec<Vec<u8>> = vec![b"HTTP/1.".to_vec(), b"GET /".to_vec()];
    for i in 1..=8 {
        let mut at = payload.len() * i / 10;
        while at + 32 <= payload.len() && payload[at..at + 32].contains(&b'\n') {
            at += 1;
        }
        if at + 32 <= payload.len() {
            needles.push(payload[at..at + 32].to_vec());
        }
    }
    let patterns = pcap.with_extension("needles");
    std::fs::write(&patterns, needles.join(&b'\n'))?;
    let grep = Command::new("grep")
        .args(["-a", "-c", "-F", "-f"])
        .arg(&patterns)
        .arg(pcap)
        .env("LC_ALL", "C")
        .output()
        .context("grep")?;
    let lines: u64 = String::from_utf8_lossy(&grep.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    if grep.status.code() == Some(0) && lines > 0 {
        w.plaintext.push(format!(
            "HTTP or payload bytes in {lines} stretch(es) of the raw capture"
        ));
    } else if grep.status.code() != Some(1) {
        bail!(
            "grep on the capture failed: {}",
            String::from_utf8_lossy(&grep.stderr).trim()
        );
    }
    Ok(w)
}
