//! The card's file, `/etc/vhost-card/<card>.toml`, as card-os reads it (serde + toml). Every
//! table and key is documented in card-os/README.md (a test checks that the two agree). The
//! `[daemon]` table belongs to vhost-card (`vhost-card --config`); card-os checks it with the
//! daemon's own rules and takes the tap, the socket and the MTU from it.
//!
//! Errors name the file, the line and the key: toml's own messages carry the line and the
//! offending text, and the checks across keys look the key's line up.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use thiserror::Error;
use vhost_card::cardfile::{self, CardPaths, DaemonSettings};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("{path}:{line}: {key}: {message}")]
    Key {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    #[error(transparent)]
    Daemon(#[from] cardfile::ResolveError),
    #[error(transparent)]
    File(#[from] cardfile::FileError),
}

/// NAT (masquerade host traffic out of the ports) or plain routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Nat,
    Routed,
}

/// An address with its prefix length, as `ip addr` takes it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?}: expected ADDRESS/PREFIX"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?}: {addr:?} is not an IP address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{text:?}: bad prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("{text:?}: prefix longer than {max}"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Cidr, String> {
        s.parse()
    }
}

impl Cidr {
    /// The network, host bits cleared: 10.77.0.1/24 -> 10.77.0.0/24.
    pub fn network(&self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `[card]`: the node as a whole.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Card {
    #[serde(default = "Card::default_mode")]
    pub mode: Mode,
    /// The program `up` starts as the card's daemon when nothing serves its socket (found on
    /// PATH unless it is a path); empty: never start one.
    #[serde(default = "Card::default_daemon")]
    pub daemon: String,
    /// Runtime files; default /run/vhost-card/<card>/.
    pub run_dir: Option<PathBuf>,
    /// State kept across reboots (IPsec keys); default /var/lib/vhost-card/<card>/.
    pub state_dir: Option<PathBuf>,
    /// Templates and www/; default <prefix>/share/vhost-card/ next to the card-os binary.
    pub share_dir: Option<PathBuf>,
}

impl Card {
    fn default_mode() -> Mode {
        Mode::Nat
    }
    fn default_daemon() -> String {
        "vhost-card".into()
    }
}

impl Default for Card {
    fn default() -> Self {
        Card {
            mode: Mode::Nat,
            daemon: Card::default_daemon(),
            run_dir: None,
            state_dir: None,
            share_dir: None,
        }
    }
}

/// `[link]`: the card's addresses on the host link (the daemon's tap).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub address4: Cidr,
    pub address6: Cidr,
    /// The host's addresses: upstream of the proxy and relay, next hop of `routes`.
    pub host4: Ipv4Addr,
    pub host6: Ipv6Addr,
    /// Networks behind the host, routed via host4/host6.
    #[serde(default)]
    pub routes: Vec<Cidr>,
}

/// `[[port]]`: a network port, a veth pair from the card into a namespace that plays the
/// outside network.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    pub name: String,
    #[serde(default = "Port::default_mtu")]
    pub mtu: u32,
    pub address4: Cidr,
    pub address6: Cidr,
    /// The outside network's namespace; default `<card>-wire`.
    #[serde(default)]
    pub wire_netns: String,
    #[serde(default = "Port::default_wire_dev")]
    pub wire_dev: String,
    /// Addresses of the hosts on the wire (one namespace stands for them all).
    #[serde(default)]
    pub wire_hosts: Vec<Cidr>,
}

impl Port {
    fn default_mtu() -> u32 {
        1500
    }
    fn default_wire_dev() -> String {
        "eth0".into()
    }
}

/// `[firewall]`: what the ports may reach on the card itself.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Firewall {
    #[serde(default)]
    pub tcp_services: Vec<u16>,
    #[serde(default)]
    pub udp_services: Vec<u16>,
}

/// `[ipsec] backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpsecBackend {
    /// Kernel ESP if the kernel has it (probed), strongSwan otherwise.
    Auto,
    /// Kernel ESP with static keys (`ip xfrm`).
    Kernel,
    /// strongSwan's charon with kernel-libipsec: IKEv2, ESP in UDP, userspace.
    Strongswan,
}

/// `[ipsec]` as written (every key optional while `enable = false`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IpsecTable {
    #[serde(default)]
    enable: bool,
    port: Option<String>,
    local: Option<Ipv4Addr>,
    peer: Option<Ipv4Addr>,
    local_subnet: Option<Cidr>,
    peer_subnet: Option<Cidr>,
    peer_inner: Option<Cidr>,
    aead: Option<String>,
    key_bits: Option<u32>,
    backend: Option<IpsecBackend>,
}

/// The IPsec tunnel, when `[ipsec] enable = true`.
#[derive(Clone, Debug)]
pub struct Ipsec {
    pub port: String,
    /// Outer addresses: the card's (on `port`) and the peer's (in the wire).
    pub local: Ipv4Addr,
    pub peer: Ipv4Addr,
    /// Inner networks: the host link's and the one behind the peer.
    pub local_subnet: Cidr,
    pub peer_subnet: Cidr,
    /// An address of the peer's inside network (on the wire's lo).
    pub peer_inner: Cidr,
    /// `ip xfrm` AEAD algorithm and key length in bits (with the salt).
    pub aead: String,
    pub key_bits: u32,
    pub backend: IpsecBackend,
}

/// `[services]`: nginx on the card, and the wire's test web server.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Services {
    /// The card's own HTTP server (its addresses); 0: none.
    pub http_port: u16,
    /// Its document root; relative: to the share directory.
    pub www: PathBuf,
    /// The reverse proxy for wire clients (0: none) and its upstream on the host.
    pub proxy_port: u16,
    pub proxy_upstream_port: u16,
    /// UDP relay: wire datagrams to this port go, reassembled, to the host (0: none).
    pub relay_port: u16,
    pub relay_upstream_port: u16,
    /// The wire's test web server (0: none), and the rate of its /slow/ location.
    pub wire_http_port: u16,
    pub wire_slow_rate: String,
}

impl Default for Services {
    fn default() -> Self {
        Services {
            http_port: 80,
            www: PathBuf::from("www"),
            proxy_port: 8080,
            proxy_upstream_port: 8000,
            relay_port: 5006,
            relay_upstream_port: 5006,
            wire_http_port: 0,
            wire_slow_rate: "8m".into(),
        }
    }
}

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// vhost-card's table: checked by the daemon's own rules (see [`cardfile`]).
    #[serde(default)]
    #[allow(dead_code)]
    daemon: toml::Table,
    #[serde(default)]
    card: Card,
    link: Link,
    #[serde(default)]
    port: Vec<Port>,
    #[serde(default)]
    firewall: Firewall,
    #[serde(default)]
    ipsec: IpsecTable,
    #[serde(default)]
    services: Services,
}

/// A card's node, read and checked.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from.
    pub source: PathBuf,
    /// The card's name: the file's name; also its network namespace.
    pub name: String,
    /// The daemon's settings as `vhost-card --config` resolves them.
    pub daemon: DaemonSettings,
    pub card: Card,
    pub link: Link,
    pub ports: Vec<Port>,
    pub firewall: Firewall,
    pub ipsec: Option<Ipsec>,
    pub services: Services,
    /// Resolved directories.
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    pub share_dir: PathBuf,
}

/// Where the templates and www/ are: `[card] share_dir`, else `<prefix>/share/vhost-card`
/// for a binary in `<prefix>/bin`.
pub fn default_share_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let prefix = exe.parent()?.parent()?.to_path_buf();
            Some(prefix.join("share/vhost-card"))
        })
        .unwrap_or_else(|| PathBuf::from("/usr/local/share/vhost-card"))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Toml {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let name = cardfile::card_name(path)?;
        let daemon = cardfile::daemon_settings(path, text)?;
        let key_err = |table: &str, key: &str, message: String| ConfigError::Key {
            path: path.to_path_buf(),
            line: key_line(text, table, key),
            key: format!("{table}.{key}"),
            message,
        };
        if file.port.is_empty() {
            return Err(ConfigError::Toml {
                path: path.to_path_buf(),
                message: "no [[port]]: the card needs at least one network port".into(),
            });
        }
        for p in &file.port {
            for (key, dev) in [("name", &p.name), ("wire_dev", &p.wire_dev)] {
                if !is_device_name(dev) {
                    return Err(key_err(
                        "port",
                        key,
                        format!("{dev:?} is not a device name (1 to 15 of a-z A-Z 0-9 - _ .)"),
                    ));
                }
            }
            if !p.wire_netns.is_empty() && !is_device_name(&p.wire_netns) {
                return Err(key_err(
                    "port",
                    "wire_netns",
                    format!(
                        "{:?} is not a namespace name (1 to 15 of a-z A-Z 0-9 - _ .)",
                        p.wire_netns
                    ),
                ));
            }
            if !(68..=65535).contains(&p.mtu) {
                return Err(key_err(
                    "port",
                    "mtu",
                    format!("{} is not an MTU (68 to 65535)", p.mtu),
                ));
            }
        }
        for (key, v4) in [("address4", true), ("address6", false), ("host4", true)] {
            let addr = match key {
                "address4" => file.link.address4.addr,
                "address6" => file.link.address6.addr,
                _ => IpAddr::V4(file.link.host4),
            };
            if addr.is_ipv4() != v4 {
                return Err(key_err(
                    "link",
                    key,
                    format!("{addr} is not an IPv{}", if v4 { 4 } else { 6 }),
                ));
            }
        }
        // Paths and values that go into generated configs (nginx): nothing that could end a
        // directive there.
        for (table, key, path) in [
            ("card", "run_dir", file.card.run_dir.as_deref()),
            ("card", "state_dir", file.card.state_dir.as_deref()),
            ("card", "share_dir", file.card.share_dir.as_deref()),
            ("services", "www", Some(file.services.www.as_path())),
        ] {
            if let Some(path) = path.filter(|p| !is_plain_path(p)) {
                return Err(key_err(
                    table,
                    key,
                    format!(
                        "{} has characters a generated config cannot hold (whitespace or any of \
                         ; {{ }} \" ' # $ \\)",
                        path.display()
                    ),
                ));
            }
        }
        let rate = &file.services.wire_slow_rate;
        let digits = rate.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G']);
        if digits.is_empty()
            || !digits.chars().all(|c| c.is_ascii_digit())
            || rate.len() - digits.len() > 1
        {
            return Err(key_err(
                "services",
                "wire_slow_rate",
                format!("{rate:?} is not a rate (a number, then k, m or g: nginx's limit_rate)"),
            ));
        }
        let ipsec = match file.ipsec.enable {
            false => None,
            true => Some(ipsec(&file.ipsec, &file.port, &key_err)?),
        };
        let mut ports = file.port;
        for p in ports.iter_mut().filter(|p| p.wire_netns.is_empty()) {
            p.wire_netns = format!("{name}-wire");
        }
        let paths = CardPaths::of(&name);
        let card = file.card;
        let share_dir = card.share_dir.clone().unwrap_or_else(default_share_dir);
        Ok(Config {
            source: path.to_path_buf(),
            run_dir: card.run_dir.clone().unwrap_or(paths.run_dir),
            state_dir: card.state_dir.clone().unwrap_or(paths.state_dir),
            share_dir,
            name,
            daemon,
            card,
            link: file.link,
            ports,
            firewall: file.firewall,
            ipsec,
            services: file.services,
        })
    }

    /// The card's network namespace.
    pub fn netns(&self) -> &str {
        &self.daemon.netns
    }

    /// The host link: the daemon's tap.
    pub fn tap(&self) -> &str {
        &self.daemon.tap
    }

    /// A template or www path: relative ones are in the share directory.
    pub fn shared(&self, rel: &Path) -> PathBuf {
        if rel.is_absolute() {
            rel.to_path_buf()
        } else {
            self.share_dir.join(rel)
        }
    }
}

fn ipsec(
    t: &IpsecTable,
    ports: &[Port],
    key_err: &dyn Fn(&str, &str, String) -> ConfigError,
) -> Result<Ipsec, ConfigError> {
    let need = |key: &str| key_err("ipsec", key, "missing (needed with enable = true)".into());
    let s = Ipsec {
        port: t.port.clone().ok_or_else(|| need("port"))?,
        local: t.local.ok_or_else(|| need("local"))?,
        peer: t.peer.ok_or_else(|| need("peer"))?,
        local_subnet: t
            .local_subnet
            .clone()
            .ok_or_else(|| need("local_subnet"))?
            .network(),
        peer_subnet: t
            .peer_subnet
            .clone()
            .ok_or_else(|| need("peer_subnet"))?
            .network(),
        peer_inner: t.peer_inner.clone().ok_or_else(|| need("peer_inner"))?,
        aead: t.aead.clone().unwrap_or_else(|| "rfc4106(gcm(aes))".into()),
        key_bits: t.key_bits.unwrap_or(160),
        backend: t.backend.unwrap_or(IpsecBackend::Auto),
    };
    if !ports.iter().any(|p| p.name == s.port) {
        return Err(key_err(
            "ipsec",
            "port",
            format!("{:?} is not a [[port]] name", s.port),
        ));
    }
    if s.key_bits % 8 != 0 || s.key_bits == 0 || s.key_bits > 512 {
        return Err(key_err(
            "ipsec",
            "key_bits",
            format!("{} is not a positive multiple of 8 up to 512", s.key_bits),
        ));
    }
    Ok(s)
}

/// An interface or namespace name `ip` takes: 1 to 15 of `a-z A-Z 0-9 - _ .`.
fn is_device_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A path that can stand in nginx's configuration as it is.
fn is_plain_path(path: &Path) -> bool {
    path.to_str().is_some_and(|p| {
        !p.is_empty()
            && !p
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || ";{}\"'#$\\".contains(c))
    })
}

/// The line of `key` in table `table` (`[table]` or `[[table]]`), or of the table, or 1.
pub fn key_line(text: &str, table: &str, key: &str) -> usize {
    let mut in_table = false;
    let mut table_line = None;
    for (n, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            let name = l.trim_matches(|c| c == '[' || c == ']').trim();
            in_table = name == table;
            if in_table && table_line.is_none() {
                table_line = Some(n + 1);
            }
        } else if in_table {
            if let Some((k, _)) = l.split_once('=') {
                if k.trim().trim_matches('"') == key {
                    return n + 1;
                }
            }
        }
    }
    table_line.unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost_card::cardfile::Endpoint;

    fn example() -> (String, PathBuf) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("card.toml");
        (std::fs::read_to_string(&path).unwrap(), path)
    }

    #[test]
    fn networks() {
        let c: Cidr = "10.77.0.1/24".parse().unwrap();
        assert_eq!(c.network().to_string(), "10.77.0.0/24");
        let c: Cidr = "fd77::1/64".parse().unwrap();
        assert_eq!(c.network().to_string(), "fd77::/64");
        assert!("10.0.0.1/33".parse::<Cidr>().is_err());
        assert!("10.0.0.300/24".parse::<Cidr>().is_err());
    }

    #[test]
    fn shipped_config() {
        let (text, path) = example();
        let cfg = Config::parse(&text, &path).unwrap();
        assert_eq!(cfg.name, "card");
        assert_eq!(cfg.netns(), "card");
        assert_eq!(cfg.tap(), "card0");
        assert_eq!(
            cfg.daemon.endpoint,
            Endpoint::Socket("/run/vhost-card/card.sock".into())
        );
        assert_eq!(cfg.run_dir, Path::new("/run/vhost-card/card"));
        assert_eq!(cfg.state_dir, Path::new("/var/lib/vhost-card/card"));
        assert_eq!(cfg.ports[0].mtu, 1500);
        assert_eq!(cfg.card.mode, Mode::Nat);
        assert_eq!(cfg.card.daemon, "vhost-card");
        assert_eq!(cfg.ports[0].wire_netns, "card-wire");
    }

    fn error_of(edit: impl Fn(&str) -> String) -> String {
        let (text, path) = example();
        Config::parse(&edit(&text), &path).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = error_of(|t| t.replace("[link]", "[link]\ncolour = \"red\""));
        assert!(
            e.contains("card.toml") && e.contains("colour") && e.contains("line"),
            "{e}"
        );
        let e = error_of(|t| t.replace("\"10.77.0.1/24\"", "\"10.77.0.300/24\""));
        assert!(
            e.contains("card.toml") && e.contains("address4") && e.contains("line"),
            "{e}"
        );
        let e = error_of(|t| t.replace("address4 = \"10.77.0.1/24\"", "address4 = \"fd00::1/64\""));
        assert!(
            e.contains("card.toml:") && e.contains("link.address4"),
            "{e}"
        );
        let e = error_of(|t| t.replace("mtu = 65520", "mtu = 70000"));
        assert!(
            e.contains("card.toml:") && e.contains("[daemon] mtu"),
            "{e}"
        );
        let e = error_of(|t| t.replace("[services]", "[servces]"));
        assert!(e.contains("servces") && e.contains("line"), "{e}");
        let e = error_of(|t| t.replace("name = \"wan0\"", "name = \"wan0; reboot\""));
        assert!(e.contains("card.toml:") && e.contains("port.name"), "{e}");
        let e = error_of(|t| t.replace("www = \"www\"", "www = \"www; include /etc\""));
        assert!(e.contains("services.www"), "{e}");
        let e = error_of(|t| t.replace("wire_slow_rate = \"8m\"", "wire_slow_rate = \"8m; x\""));
        assert!(e.contains("services.wire_slow_rate"), "{e}");
    }
}
