//! Scenarios 7 and 8 of `cargo xtask cardos-e2e`: the Debian guests. A
//! Debian rootfs from debootstrap (see `rootfs.rs`) with systemd-networkd
//! (7) or NetworkManager (8) enabled and host-config/networkd/ or
//! host-config/networkmanager/ copied in verbatim boots with the card as its
//! NIC. QEMU offers no MTU (`host_mtu` unset), so the stock virtio_net
//! starts at 1500 and only the files can bring it to the card's MTU. The
//! guest agent starts after `network-online.target` and only reads: nothing
//! configures the network but udev and the manager with those files.
//!
//! Checked: the interface matched the files (udev's ID_NET_LINK_FILE,
//! networkd's NETWORK_FILE or NetworkManager's connection FILENAME) and
//! kept its predictable name, its MTU in /sys, the manager's state, the
//! addresses and every route of the file in the routing tables,
//! pings to the card's IPv4 and IPv6 addresses (also 65000-byte ones with
//! DF), and the default route through the card to the wire: a ping and an
//! HTTP transfer with its SHA-256.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::card;
use crate::cpio::Archive;
use crate::process::{run, TempDir};
use crate::report::Ping;
use crate::rig::{Env, Image, Rig};
use crate::rootfs::{self, Rootfs};
use card_os::Config;

/// Which network manager the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Networkd,
    NetworkManager,
}

impl Flavour {
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Networkd => "networkd",
            Flavour::NetworkManager => "networkmanager",
        }
    }

    /// The host-config folder the guest gets, verbatim.
    fn files(self) -> &'static str {
        match self {
            Flavour::Networkd => "host-config/networkd",
            Flavour::NetworkManager => "host-config/networkmanager",
        }
    }

    /// Where the files go, and their mode (NetworkManager ignores keyfiles
    /// others can read).
    fn install(self) -> (&'static str, u32) {
        match self {
            Flavour::Networkd => ("etc/systemd/network", 0o644),
            Flavour::NetworkManager => ("etc/NetworkManager/system-connections", 0o600),
        }
    }

    /// The file that configures the link: its extension.
    fn config_ext(self) -> &'static str {
        match self {
            Flavour::Networkd => ".network",
            Flavour::NetworkManager => ".nmconnection",
        }
    }

    fn recipe(self) -> rootfs::Recipe {
        match self {
            Flavour::Networkd => rootfs::Recipe {
                name: "networkd",
                packages: &[],
                enable: "systemd-networkd.service",
            },
            Flavour::NetworkManager => rootfs::Recipe {
                name: "networkmanager",
                // debootstrap does not pick providers of virtual packages
                // (dbus-system-bus, polkitd's logind).
                packages: &["network-manager", "dbus", "polkitd", "libpam-systemd"],
                enable: "NetworkManager.service",
            },
        }
    }

    fn online_unit(self) -> &'static str {
        match self {
            Flavour::Networkd => "systemd-networkd-wait-online.service",
            Flavour::NetworkManager => "NetworkManager-wait-online.service",
        }
    }

    /// What the manager says of a configured link.
    fn configured(self) -> &'static str {
        match self {
            Flavour::Networkd => "routable (configured)",
            Flavour::NetworkManager => "100 (connected)",
        }
    }

    /// Report lines `network_file=` and `state=` for `$dev`.
    fn state_script(self) -> &'static str {
        match self {
            Flavour::Networkd => {
                r#"# networkd's own record of the link (networkctl would need D-Bus).
state=/run/systemd/netif/links/$(cat /sys/class/net/$dev/ifindex)
echo "network_file=$(sed -n 's/^NETWORK_FILE=//p' $state)"
echo "state=$(sed -n 's/^OPER_STATE=//p' $state) ($(sed -n 's/^ADMIN_STATE=//p' $state))"
echo "-- $state"
cat $state
"#
            }
            Flavour::NetworkManager => {
                r#"c=$(nmcli -g GENERAL.CONNECTION device show "$dev")
echo "network_file=$(nmcli -g NAME,FILENAME connection show | sed -n "s|^$c:||p")"
echo "state=$(nmcli -g GENERAL.STATE device show "$dev")"
echo "-- nmcli device show"
nmcli device show "$dev"
"#
            }
        }
    }
}

/// Kernel command line: systemd's progress on the console (serial.log).
const APPEND: &str = "systemd.show_status=1";

/// Units a test VM does without (speed; no console logins).
const MASKED: &[&str] = &[
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "getty-static.service",
    "e2scrub_reap.service",
    "systemd-tmpfiles-clean.timer",
];

/// The agent of the e2e guest, as a service that starts once the network is
/// online (or wait-online gave up: it is ordered after, not bound to it).
const AGENT_UNIT: &str = "[Unit]
Description=xtask guest agent on ttyS1 (reads the network, configures nothing)
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/bin/sh /usr/local/sbin/xtask-agent
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
";

/// A shorter give-up than the default 120 s, so a failure is reported sooner.
const WAIT_ONLINE_DROPIN: &str = "[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --timeout=90
";

/// A Debian guest's image, built before any VM boots.
pub struct Prepared {
    pub flavour: Flavour,
    pub initrd: PathBuf,
    pub rootfs: Rootfs,
    /// The installed host-config files (names).
    pub files: Vec<String>,
    expect: Expect,
    _work: TempDir,
}

impl Prepared {
    pub fn image(&self) -> Image<'_> {
        Image {
            initrd: &self.initrd,
            append: APPEND,
            host_mtu: false,
        }
    }
}

/// What the .network file says the guest gets.
#[derive(Debug)]
struct Expect {
    file: String,
    mac: String,
    mtu: u32,
    addresses: Vec<String>,
    /// (destination, gateway); destination "default" when unset.
    routes: Vec<(String, String)>,
}

/// Sections of a systemd unit-style file, in order, with their keys
/// (repeated sections and keys kept).
fn sections(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            out.push((name.to_string(), Vec::new()));
        } else if let (Some((k, v)), Some(last)) = (line.split_once('='), out.last_mut()) {
            last.1.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

fn expect(flavour: Flavour, name: &str, text: &str) -> Result<Expect> {
    match flavour {
        Flavour::Networkd => expect_network(name, text),
        Flavour::NetworkManager => expect_keyfile(name, text),
    }
}

/// From a NetworkManager keyfile: `[ethernet] mtu=`, `mac-address=`,
/// `[ipv4]`/`[ipv6]` `addressN=ADDR/PREFIX[,GATEWAY]` and `gateway=`.
fn expect_keyfile(name: &str, text: &str) -> Result<Expect> {
    let secs = sections(text);
    let mut e = Expect {
        file: name.to_string(),
        mac: String::new(),
        mtu: 0,
        addresses: Vec::new(),
        routes: Vec::new(),
    };
    for (section, kv) in &secs {
        for (k, v) in kv {
            match (section.as_str(), k.as_str()) {
                ("ethernet", "mtu") => e.mtu = v.parse().with_context(|| format!("{name}: mtu"))?,
                ("ethernet", "mac-address") => e.mac = v.to_lowercase(),
                ("ipv4" | "ipv6", "gateway") => e.routes.push(("default".into(), v.clone())),
                ("ipv4" | "ipv6", k) if k.starts_with("address") => {
                    let mut parts = v.split(',');
                    if let Some(addr) = parts.next() {
                        e.addresses.push(addr.trim().to_string());
                    }
                    if let Some(gw) = parts.next() {
                        e.routes.push(("default".into(), gw.trim().to_string()));
                    }
                }
                _ => {}
            }
        }
    }
    if e.mtu == 0 {
        bail!("{name} sets no [ethernet] mtu=");
    }
    Ok(e)
}

/// From a systemd-networkd .network file.
fn expect_network(name: &str, text: &str) -> Result<Expect> {
    let secs = sections(text);
    let get = |section: &str, key: &str| -> Vec<String> {
        secs.iter()
            .filter(|(s, _)| s == section)
            .flat_map(|(_, kv)| kv.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()))
            .collect()
    };
    let mtu = get("Link", "MTUBytes")
        .last()
        .ok_or_else(|| anyhow!("{name} sets no [Link] MTUBytes="))?
        .parse()
        .with_context(|| format!("{name}: MTUBytes"))?;
    let mut routes = Vec::new();
    for (section, kv) in &secs {
        if section != "Route" {
            continue;
        }
        let value = |key: &str| kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let gateway =
            value("Gateway").ok_or_else(|| anyhow!("{name}: [Route] without Gateway="))?;
        let dest = value("Destination").unwrap_or_else(|| "default".into());
        routes.push((dest, gateway));
    }
    Ok(Expect {
        file: name.to_string(),
        mac: get("Match", "MACAddress").join(" ").to_lowercase(),
        mtu,
        addresses: get("Network", "Address"),
        routes,
    })
}

/// The rootfs (cached, debootstrap on the first run) and a per-run archive
/// on top: the host-config files, the kernel's virtio modules with
/// depmod's index, the agent and its unit.
pub fn prepare(env: &Env, flavour: Flavour) -> Result<Prepared> {
    let rootfs = rootfs::ensure(&flavour.recipe())?;
    if let Some(t) = rootfs.built_in {
        println!(
            "cardos-e2e: {} guest rootfs built in {:.0} s",
            flavour.name(),
            t.as_secs_f64()
        );
    }
    let work = TempDir::new(&format!("vhc-{}", flavour.name()))?;
    let mut overlay = Archive::new();
    let mut dirs = Vec::<String>::new();
    let mut dir = |archive: &mut Archive, path: &str| {
        let mut chain = Vec::new();
        let mut p = Some(Path::new(path));
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            chain.push(d.to_string_lossy().into_owned());
            p = d.parent();
        }
        for d in chain.into_iter().rev() {
            if !dirs.contains(&d) {
                archive.dir(&d);
                dirs.push(d);
            }
        }
    };

    // The host-config folder, verbatim.
    let files = flavour.files();
    let (install, mode) = flavour.install();
    let src = crate::workspace_root().join(files);
    let mut names = std::fs::read_dir(&src)
        .with_context(|| format!("reading {}", src.display()))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>>>()?;
    names.sort();
    dir(&mut overlay, install);
    let mut network = None;
    for name in &names {
        let text = std::fs::read_to_string(src.join(name))?;
        if name.ends_with(flavour.config_ext()) {
            if network.is_some() {
                bail!("{files} has more than one {} file", flavour.config_ext());
            }
            network = Some(expect(flavour, name, &text)?);
        }
        overlay.file(&format!("{install}/{name}"), mode, text.as_bytes());
    }
    let expect = network.ok_or_else(|| anyhow!("{files} has no {} file", flavour.config_ext()))?;

    // The kernel's modules where kmod finds them, indexed by depmod so udev
    // loads them by modalias as on any Debian host.
    let release = &env.kernel_release;
    let stage = work.path().join("modules");
    let kdir = stage.join("lib/modules").join(release).join("kernel");
    std::fs::create_dir_all(&kdir)?;
    for module in &env.modules {
        let name = module.file_name().context("module file name")?;
        std::fs::copy(module, kdir.join(name))?;
    }
    run(Command::new("depmod").arg("-b").arg(&stage).arg(release))?;
    let mod_root = stage.join("lib/modules").join(release);
    dir(&mut overlay, &format!("usr/lib/modules/{release}/kernel"));
    for entry in walk_files(&mod_root)? {
        let rel = entry
            .strip_prefix(&mod_root)?
            .to_string_lossy()
            .into_owned();
        overlay.file(
            &format!("usr/lib/modules/{release}/{rel}"),
            0o644,
            &std::fs::read(&entry)?,
        );
    }

    // The agent, started by systemd once the network is online.
    dir(&mut overlay, "usr/local/sbin");
    overlay.file(
        "usr/local/sbin/xtask-agent",
        0o755,
        rig::image::AGENT.as_bytes(),
    );
    overlay.file("usr/lib/e2e.sh", 0o644, rig::image::LIBRARY.as_bytes());
    dir(&mut overlay, "etc/systemd/system/multi-user.target.wants");
    overlay.file(
        "etc/systemd/system/xtask-agent.service",
        0o644,
        AGENT_UNIT.as_bytes(),
    );
    overlay.symlink(
        "etc/systemd/system/multi-user.target.wants/xtask-agent.service",
        "/etc/systemd/system/xtask-agent.service",
    );
    dir(
        &mut overlay,
        "etc/systemd/system/systemd-networkd-wait-online.service.d",
    );
    overlay.file(
        "etc/systemd/system/systemd-networkd-wait-online.service.d/xtask.conf",
        0o644,
        WAIT_ONLINE_DROPIN.as_bytes(),
    );
    for unit in MASKED {
        overlay.symlink(&format!("etc/systemd/system/{unit}"), "/dev/null");
    }
    // The kernel runs /init from an initramfs.
    overlay.symlink("init", "/sbin/init");

    let mut bytes = std::fs::read(&rootfs.path)
        .with_context(|| format!("reading {}", rootfs.path.display()))?;
    while bytes.len() % 4 != 0 {
        bytes.push(0);
    }
    bytes.extend(overlay.finish());
    let initrd = work.path().join(format!("{}.cpio", flavour.name()));
    std::fs::write(&initrd, bytes)?;
    Ok(Prepared {
        flavour,
        initrd,
        rootfs,
        files: names,
        expect,
        _work: work,
    })
}

fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk_files(&path)?);
        } else {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// What the guest reports about its network, without changing anything.
fn report_script(flavour: Flavour, mac: &str) -> String {
    format!(
        r#"dev=
for d in /sys/class/net/*; do [ "$(cat $d/address)" = "{mac}" ] && dev=${{d##*/}}; done
[ -n "$dev" ] || {{ echo "no interface with MAC {mac}"; ip link; exit 1; }}
echo "dev=$dev"
echo "mtu=$(cat /sys/class/net/$dev/mtu)"
echo "driver=$(basename "$(readlink /sys/class/net/$dev/device/driver)")"
echo "features=$(cat /sys/class/net/$dev/device/features)"
udevadm info -q property -p /sys/class/net/$dev | sed -n 's/^ID_NET_LINK_FILE=/link_file=/p; s/^ID_NET_NAME_\(ONBOARD\|SLOT\|PATH\)=/name_\1=/p'
echo "wait_online=$(systemctl is-active {online})"
echo "online_us=$(systemctl show -P ActiveEnterTimestampMonotonic {online})"
echo "failed_units=$(systemctl list-units --failed --no-legend --plain | cut -d' ' -f1 | tr '\n' ' ')"
{state}echo "-- ip -d link"
ip -d link show dev "$dev"
echo "-- addr"
ip -o addr show dev "$dev" | sed 's/^/addr /'
echo "-- routes"
ip -4 route | sed 's/^/route4 /'
ip -6 route | sed 's/^/route6 /'
"#,
        online = flavour.online_unit(),
        state = flavour.state_script(),
    )
}

/// A `name=value` line's value.
fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or("")
        .trim()
}

/// Runs ping in the guest; the summary.
fn ping(rig: &mut Rig, args: &str) -> Result<Ping> {
    let reply = rig.vm.sh(
        &format!("ping -c 3 -W 5 -w 20 {args}"),
        Duration::from_secs(40),
    )?;
    Ok(Ping::parse(&reply.out))
}

fn rtt(p: &Ping) -> String {
    match (p.ok(), p.avg()) {
        (true, Some(avg)) => format!("{avg} ms"),
        _ => p.describe(),
    }
}

/// The scenario, on a rig whose VM is the networkd guest.
pub fn check(
    rig: &mut Rig,
    prepared: &Prepared,
    cfg: &Config,
    env: &Env,
    len: usize,
) -> Result<(Option<bool>, String)> {
    let e = &prepared.expect;
    let mut problems = Vec::new();
    // The files against card-os/card.toml and the rig: a mismatch is a bug
    // in host-config.
    if e.mtu != u32::from(cfg.daemon.mtu) {
        problems.push(format!(
            "{} sets MTU {} but the card's is {}",
            e.file, e.mtu, cfg.daemon.mtu
        ));
    }
    if !e.mac.is_empty() && e.mac != card::MAC {
        problems.push(format!(
            "{} matches MAC {} but the VMM's is {}",
            e.file,
            e.mac,
            card::MAC
        ));
    }
    let host4 = format!("{}/{}", cfg.link.host4, cfg.link.address4.prefix);
    let host6 = format!("{}/{}", cfg.link.host6, cfg.link.address6.prefix);
    for want in [&host4, &host6] {
        if !e.addresses.contains(want) {
            problems.push(format!("{} lacks Address={want} (card.toml)", e.file));
        }
    }

    let flavour = prepared.flavour;
    let report = rig.log_dir.join(format!("{}-report.txt", flavour.name()));
    let out = rig
        .vm
        .check(&report_script(flavour, card::MAC), Duration::from_secs(60))?;
    std::fs::write(&report, &out).ok();
    let dev = field(&out, "dev").to_string();
    let mtu: u32 = field(&out, "mtu").parse().unwrap_or(0);
    let features = field(&out, "features");
    // Bit 3: VIRTIO_NET_F_MTU, which QEMU must not have offered here.
    let offered_mtu = features.as_bytes().get(3) == Some(&b'1');
    let link_file = field(&out, "link_file");
    let network_file = field(&out, "network_file");
    let state = field(&out, "state");
    let online_s = field(&out, "online_us").parse::<f64>().unwrap_or(0.0) / 1e6;
    let driver = field(&out, "driver");
    if driver != "virtio_net" {
        problems.push(format!("driver {driver:?}"));
    }
    if offered_mtu {
        problems.push("the device offered VIRTIO_NET_F_MTU (host_mtu set?)".into());
    }
    if mtu != u32::from(cfg.daemon.mtu) {
        problems.push(format!("MTU {mtu} in /sys, expected {}", cfg.daemon.mtu));
    }
    let (install, _) = flavour.install();
    let ours = |ext: &str, got: &str| {
        prepared
            .files
            .iter()
            .any(|f| f.ends_with(ext) && got == format!("/{install}/{f}"))
    };
    let mut matched = vec![network_file];
    // A .link file, if the folder has one, must be the one udev applied.
    if prepared.files.iter().any(|f| f.ends_with(".link")) {
        matched.insert(0, link_file);
        if !ours(".link", link_file) {
            problems.push(format!(
                "udev applied {link_file:?} to {dev}, not host-config's"
            ));
        }
    }
    if !ours(flavour.config_ext(), network_file) {
        problems.push(format!(
            "{dev} was configured by {network_file:?}, not host-config's"
        ));
    }
    if state != flavour.configured() {
        problems.push(format!("{}'s state {state:?}", flavour.name()));
    }
    if field(&out, "wait_online") != "active" {
        problems.push(format!(
            "{} is {}",
            flavour.online_unit(),
            field(&out, "wait_online")
        ));
    }
    let failed = field(&out, "failed_units");
    if !failed.is_empty() {
        problems.push(format!("failed units: {failed}"));
    }
    // The .link file must not cost the NIC its predictable name (only the
    // first matching .link file applies; systemd's 99-default.link names).
    let predictable = ["ONBOARD", "SLOT", "PATH"]
        .iter()
        .map(|k| field(&out, &format!("name_{k}")))
        .find(|n| !n.is_empty())
        .unwrap_or("");
    if dev != predictable {
        problems.push(format!(
            "the NIC is {dev}, not its predictable name {predictable:?} (NamePolicy)"
        ));
    }
    let addrs: Vec<&str> = out.lines().filter(|l| l.starts_with("addr ")).collect();
    for want in &e.addresses {
        if !addrs.iter().any(|l| l.contains(&format!(" {want} "))) {
            problems.push(format!("address {want} missing"));
        }
    }
    let mut routes = Vec::new();
    for (dest, gw) in &e.routes {
        let family = if gw.contains(':') { "route6" } else { "route4" };
        let want = format!("{family} {dest} via {gw} dev {dev} ");
        if out.lines().any(|l| format!("{l} ").starts_with(&want)) {
            routes.push(format!("{dest} via {gw}"));
        } else {
            problems.push(format!("route {dest} via {gw} missing"));
        }
    }

    // The link: the card's addresses, small and 65000-byte pings with DF.
    let card4 = cfg.link.address4.addr.to_string();
    let card6 = cfg.link.address6.addr.to_string();
    let mut pings = Vec::new();
    for (label, args) in [
        ("IPv4", card4.clone()),
        ("IPv6", card6.clone()),
        ("IPv4 65000 B DF", format!("-M do -s 65000 {card4}")),
        ("IPv6 65000 B DF", format!("-M do -s 65000 {card6}")),
    ] {
        let p = ping(rig, &args)?;
        if !p.ok() {
            problems.push(format!("ping {args}: {}", p.describe()));
        }
        pings.push(format!("{label} {}", rtt(&p)));
    }

    // Beyond the card by the file's routes: the wire's web server through
    // the card's NAT.
    let mut wire = String::new();
    if let Some(port) = cfg.ports.first() {
        let server = port.wire_hosts[0].addr.to_string();
        let p = ping(rig, &server)?;
        if !p.ok() {
            problems.push(format!("ping {server}: {}", p.describe()));
        }
        let (ok, text) = fetch(rig, env, &server, len)?;
        if !ok {
            problems.push(text.clone());
        }
        write!(
            wire,
            "; wire {server} via the card: ping {}, {text}",
            rtt(&p)
        )?;
    }

    let text = format!(
        "Debian {} {} guest up in {:.1} s (online {online_s:.1} s after kernel start); \
         {dev} ({driver}, no MTU offered) matched {}, {state}; \
         MTU {mtu}; routes {}; ping card {}{wire}",
        rootfs::SUITE,
        match flavour {
            Flavour::Networkd => format!("systemd {}", prepared.rootfs.version("systemd")),
            Flavour::NetworkManager => format!(
                "NetworkManager {}",
                prepared.rootfs.version("network-manager")
            ),
        },
        rig.boot.as_secs_f64(),
        matched.join(" and "),
        if routes.is_empty() {
            "none".to_string()
        } else {
            routes.join(", ")
        },
        pings.join(", "),
    );
    if problems.is_empty() {
        Ok((Some(true), text))
    } else {
        Ok((
            Some(false),
            format!(
                "{}; {text}; guest report: {}",
                problems.join("; "),
                report.display()
            ),
        ))
    }
}

/// HTTP GET of /payload from `server` with bash's /dev/tcp (the rootfs has
/// no wget): whether the body's SHA-256 is the payload's, and a summary.
fn fetch(rig: &mut Rig, env: &Env, server: &str, len: usize) -> Result<(bool, String)> {
    let script = format!(
        r#"rm -f /tmp/p.http
bash -c 'exec 3<>/dev/tcp/{server}/80 && printf "GET /payload HTTP/1.0\r\nHost: {server}\r\n\r\n" >&3 && cat <&3' > /tmp/p.http
echo "status=$(head -1 /tmp/p.http | tr -d '\r')"
echo "bytes=$(wc -c < /tmp/p.http)"
echo "sha=$(tail -c {len} /tmp/p.http | sha256sum | cut -d' ' -f1)"
rm -f /tmp/p.http"#
    );
    let reply = rig.vm.sh(&script, crate::rig::transfer_timeout(len))?;
    let secs = reply.elapsed.as_secs_f64();
    let sha = field(&reply.out, "sha");
    let status = field(&reply.out, "status");
    let want = env.sha_prefix(len)?;
    let ok = reply.rc == 0 && status.contains(" 200 ") && sha == want;
    Ok((
        ok,
        format!(
            "HTTP GET /payload: {status:?}, {} MiB in {secs:.1} s ({:.1} MB/s), sha256 {}",
            len >> 20,
            len as f64 / 1e6 / secs.max(1e-6),
            if ok {
                format!("equal ({}…)", &want[..12])
            } else {
                format!("{sha:?} != {want}")
            }
        ),
    ))
}
