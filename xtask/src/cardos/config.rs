//! card-os/card.toml: the card's network node, declared. The file is a small
//! subset of TOML (sections, `[[port]]` tables, strings, integers, booleans
//! and arrays of those), read by a parser of our own so the xtask needs no
//! extra crate.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// One value of the subset.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    List(Vec<Value>),
}

/// A section: its name and keys. `[[port]]` sections repeat.
#[derive(Debug, Default)]
pub struct Table {
    pub name: String,
    pub keys: BTreeMap<String, Value>,
    /// Where the section starts, for error messages.
    pub line: usize,
}

/// Parses the TOML subset into its sections, in file order (keys before any
/// header land in a section named "").
pub fn parse(text: &str) -> Result<Vec<Table>> {
    let mut tables = vec![Table::default()];
    for (n, raw) in text.lines().enumerate() {
        let line = strip_comment(raw).trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("line {}: {raw:?}", n + 1);
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            tables.push(Table {
                name: name.trim().to_string(),
                keys: BTreeMap::new(),
                line: n + 1,
            });
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim().to_string();
            if tables.iter().any(|t| t.name == name) {
                bail!("{}: section [{name}] appears twice", at());
            }
            tables.push(Table {
                name,
                keys: BTreeMap::new(),
                line: n + 1,
            });
        } else {
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| anyhow!("{}: expected key = value", at()))?;
            let key = key.trim().to_string();
            let value = parse_value(value.trim()).with_context(at)?;
            let table = tables.last_mut().expect("always one table");
            if table.keys.insert(key.clone(), value).is_some() {
                bail!("{}: key {key} set twice", at());
            }
        }
    }
    Ok(tables)
}

/// The line without a `#` comment (a `#` inside a string is kept).
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

fn parse_value(text: &str) -> Result<Value> {
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        let mut items = Vec::new();
        for item in split_list(inner) {
            let item = item.trim();
            if !item.is_empty() {
                items.push(parse_value(item)?);
            }
        }
        return Ok(Value::List(items));
    }
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        if inner.contains(['"', '\\']) {
            bail!("escapes in strings are not supported");
        }
        return Ok(Value::Str(inner.to_string()));
    }
    match text {
        "true" => return Ok(Value::Bool(true)),
        "false" => return Ok(Value::Bool(false)),
        _ => {}
    }
    text.replace('_', "")
        .parse()
        .map(Value::Int)
        .map_err(|_| anyhow!("not a string, integer, boolean or list: {text}"))
}

/// Splits a list's inside at the commas outside strings.
fn split_list(inner: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut quoted, mut start) = (false, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&inner[start..]);
    out
}

/// Typed access to one section, remembering which keys were used so unknown
/// ones (typos) are reported.
struct Section<'a> {
    table: Option<&'a Table>,
    used: Vec<&'static str>,
}

impl<'a> Section<'a> {
    fn new(table: Option<&'a Table>) -> Self {
        Section {
            table,
            used: Vec::new(),
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.used.push(key);
        self.table.and_then(|t| t.keys.get(key))
    }

    fn what(&self, key: &str) -> String {
        match self.table {
            Some(t) if t.name.is_empty() => key.to_string(),
            Some(t) => format!("{}.{key} (section at line {})", t.name, t.line),
            None => key.to_string(),
        }
    }

    fn str_or(&mut self, key: &'static str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(Value::Str(s)) => Ok(s.clone()),
            Some(v) => bail!("{} must be a string, not {v:?}", self.what(key)),
        }
    }

    fn str(&mut self, key: &'static str) -> Result<String> {
        match self.get(key) {
            Some(Value::Str(s)) => Ok(s.clone()),
            Some(v) => bail!("{} must be a string, not {v:?}", self.what(key)),
            None => bail!("{} is missing", self.what(key)),
        }
    }

    fn int_or(&mut self, key: &'static str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Int(i)) => Ok(*i),
            Some(v) => bail!("{} must be an integer, not {v:?}", self.what(key)),
        }
    }

    fn bool_or(&mut self, key: &'static str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => bail!("{} must be true or false, not {v:?}", self.what(key)),
        }
    }

    fn strs(&mut self, key: &'static str) -> Result<Vec<String>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::List(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Str(s) => Ok(s.clone()),
                    v => bail!("{} must list strings, not {v:?}", self.what(key)),
                })
                .collect(),
            Some(v) => bail!("{} must be a list, not {v:?}", self.what(key)),
        }
    }

    fn ports(&mut self, key: &'static str) -> Result<Vec<u16>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::List(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Int(i) => u16::try_from(*i)
                        .map_err(|_| anyhow!("{}: {i} is not a port", self.what(key))),
                    v => bail!("{} must list port numbers, not {v:?}", self.what(key)),
                })
                .collect(),
            Some(v) => bail!("{} must be a list, not {v:?}", self.what(key)),
        }
    }

    /// Fails on keys nobody asked for.
    fn done(self) -> Result<()> {
        if let Some(table) = self.table {
            for key in table.keys.keys() {
                if !self.used.contains(&key.as_str()) {
                    bail!("unknown key {}", self.what(key));
                }
            }
        }
        Ok(())
    }
}

/// NAT (masquerade host traffic out of the ports) or plain routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nat,
    Routed,
}

/// An address with its prefix length, as `ip addr` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr> {
        let (addr, prefix) = text
            .split_once('/')
            .ok_or_else(|| anyhow!("{text:?}: expected ADDRESS/PREFIX"))?;
        let addr: IpAddr = addr
            .parse()
            .with_context(|| format!("{text:?}: bad address"))?;
        let prefix: u8 = prefix
            .parse()
            .with_context(|| format!("{text:?}: bad prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            bail!("{text:?}: prefix longer than {max}");
        }
        Ok(Cidr { addr, prefix })
    }

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

/// The vhost-card daemon, when `card up` starts it.
#[derive(Clone, Debug)]
pub struct Daemon {
    pub start: bool,
    /// Empty: target/release/vhost-card of this workspace.
    pub binary: String,
    pub socket: PathBuf,
    pub mtu: u32,
    pub args: Vec<String>,
}

/// The host link: the daemon's tap and the card's addresses on it.
#[derive(Clone, Debug)]
pub struct Link {
    pub dev: String,
    pub address4: Cidr,
    pub address6: Cidr,
    /// The host's addresses (reverse proxy and UDP relay upstream).
    pub host4: Ipv4Addr,
    pub host6: Ipv6Addr,
}

/// A network port: a veth pair from the card into a namespace that plays
/// the outside network.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: String,
    pub mtu: u32,
    pub address4: Cidr,
    pub address6: Cidr,
    pub wire_netns: String,
    pub wire_dev: String,
    /// The test hosts' addresses on the wire.
    pub wire_hosts: Vec<Cidr>,
}

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
    /// Who does ESP: the kernel (`ip xfrm`), strongSwan in userspace, or
    /// the kernel when it can.
    pub backend: IpsecBackend,
}

/// `[ipsec] backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpsecBackend {
    /// Kernel ESP if the kernel has it (probed), strongSwan otherwise.
    Auto,
    /// Kernel ESP with static keys (`ip xfrm`).
    Kernel,
    /// strongSwan's charon with kernel-libipsec: IKEv2, ESP in UDP, userspace.
    Strongswan,
}

#[derive(Clone, Debug)]
pub struct Services {
    /// The card's own HTTP server (its addresses), and its document root.
    pub http_port: u16,
    pub www: PathBuf,
    /// The reverse proxy for wire clients and its upstream on the host.
    pub proxy_port: u16,
    pub proxy_upstream_port: u16,
    /// UDP relay: wire datagrams to this port go, reassembled, to the host.
    pub relay_port: u16,
    pub relay_upstream_port: u16,
    /// The wire's test web server: port and rate of its /slow/ location.
    pub wire_http_port: u16,
    pub wire_slow_rate: String,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from; relative paths in it are relative to its folder.
    pub source: PathBuf,
    pub netns: String,
    pub run_dir: PathBuf,
    pub mode: Mode,
    pub daemon: Daemon,
    pub link: Link,
    pub ports: Vec<Port>,
    pub tcp_services: Vec<u16>,
    pub udp_services: Vec<u16>,
    pub ipsec: Option<Ipsec>,
    pub services: Services,
}

fn cidr(s: &mut Section, key: &'static str) -> Result<Cidr> {
    let text = s.str(key)?;
    Cidr::parse(&text).with_context(|| s.what(key))
}

fn addr<T: std::str::FromStr>(s: &mut Section, key: &'static str) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let text = s.str(key)?;
    text.parse().with_context(|| s.what(key))
}

fn port_num(s: &mut Section, key: &'static str, default: u16) -> Result<u16> {
    let n = s.int_or(key, i64::from(default))?;
    u16::try_from(n).map_err(|_| anyhow!("{}: {n} is not a port", s.what(key)))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Config::parse(&text, path).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str, source: &Path) -> Result<Config> {
        let tables = parse(text)?;
        let known = [
            "", "card", "daemon", "link", "port", "firewall", "ipsec", "services",
        ];
        for t in &tables {
            if !known.contains(&t.name.as_str()) {
                bail!("unknown section [{}] at line {}", t.name, t.line);
            }
        }
        if tables[0].keys.keys().next().is_some() {
            bail!("keys before the first section");
        }
        let one = |name: &str| tables.iter().find(|t| t.name == name);
        let dir = source
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let rel = |p: String| -> PathBuf {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                dir.join(p)
            }
        };

        let mut s = Section::new(one("card"));
        let netns = s.str_or("netns", "card")?;
        let run_dir = PathBuf::from(s.str_or("run_dir", "/run/vhost-card")?);
        let mode = match s.str_or("mode", "nat")?.as_str() {
            "nat" => Mode::Nat,
            "routed" => Mode::Routed,
            other => bail!("card.mode must be \"nat\" or \"routed\", not {other:?}"),
        };
        s.done()?;

        let mut s = Section::new(one("daemon"));
        let daemon = Daemon {
            start: s.bool_or("start", true)?,
            binary: s.str_or("binary", "")?,
            socket: PathBuf::from(s.str_or("socket", "/run/vhost-card/card.sock")?),
            mtu: u32::try_from(s.int_or("mtu", 65520)?).context("daemon.mtu")?,
            args: s.strs("args")?,
        };
        s.done()?;

        let mut s = Section::new(one("link"));
        let link = Link {
            dev: s.str_or("dev", "card0")?,
            address4: cidr(&mut s, "address4")?,
            address6: cidr(&mut s, "address6")?,
            host4: addr(&mut s, "host4")?,
            host6: addr(&mut s, "host6")?,
        };
        s.done()?;

        let mut ports = Vec::new();
        for t in tables.iter().filter(|t| t.name == "port") {
            let mut s = Section::new(Some(t));
            let name = s.str("name")?;
            let wire_hosts = s
                .strs("wire_hosts")?
                .iter()
                .map(|h| Cidr::parse(h))
                .collect::<Result<_>>()?;
            ports.push(Port {
                mtu: u32::try_from(s.int_or("mtu", 1500)?).context("port.mtu")?,
                address4: cidr(&mut s, "address4")?,
                address6: cidr(&mut s, "address6")?,
                wire_netns: s.str_or("wire_netns", "wire")?,
                wire_dev: s.str_or("wire_dev", "eth0")?,
                wire_hosts,
                name,
            });
            s.done()?;
        }
        if ports.is_empty() {
            bail!("no [[port]]: the card needs at least one network port");
        }

        let mut s = Section::new(one("firewall"));
        let tcp_services = s.ports("tcp_services")?;
        let udp_services = s.ports("udp_services")?;
        s.done()?;

        let mut s = Section::new(one("ipsec"));
        let ipsec = if s.bool_or("enable", false)? {
            Some(Ipsec {
                port: s.str("port")?,
                local: addr(&mut s, "local")?,
                peer: addr(&mut s, "peer")?,
                local_subnet: cidr(&mut s, "local_subnet")?.network(),
                peer_subnet: cidr(&mut s, "peer_subnet")?.network(),
                peer_inner: cidr(&mut s, "peer_inner")?,
                aead: s.str_or("aead", "rfc4106(gcm(aes))")?,
                key_bits: u32::try_from(s.int_or("key_bits", 160)?).context("ipsec.key_bits")?,
                backend: match s.str_or("backend", "auto")?.as_str() {
                    "auto" => IpsecBackend::Auto,
                    "kernel" => IpsecBackend::Kernel,
                    "strongswan" => IpsecBackend::Strongswan,
                    other => bail!(
                        "ipsec.backend must be \"auto\", \"kernel\" or \"strongswan\", not {other:?}"
                    ),
                },
            })
        } else {
            for key in [
                "port",
                "local",
                "peer",
                "local_subnet",
                "peer_subnet",
                "peer_inner",
                "aead",
                "key_bits",
                "backend",
            ] {
                s.get(key);
            }
            None
        };
        s.done()?;
        if let Some(ipsec) = &ipsec {
            if !ports.iter().any(|p| p.name == ipsec.port) {
                bail!("ipsec.port {:?} is not a [[port]]", ipsec.port);
            }
            if ipsec.key_bits % 8 != 0 || ipsec.key_bits == 0 {
                bail!("ipsec.key_bits must be a positive multiple of 8");
            }
        }

        let mut s = Section::new(one("services"));
        let services = Services {
            http_port: port_num(&mut s, "http_port", 80)?,
            www: rel(s.str_or("www", "www")?),
            proxy_port: port_num(&mut s, "proxy_port", 8080)?,
            proxy_upstream_port: port_num(&mut s, "proxy_upstream_port", 8000)?,
            relay_port: port_num(&mut s, "relay_port", 5006)?,
            relay_upstream_port: port_num(&mut s, "relay_upstream_port", 5006)?,
            wire_http_port: port_num(&mut s, "wire_http_port", 80)?,
            wire_slow_rate: s.str_or("wire_slow_rate", "8m")?,
        };
        s.done()?;

        Ok(Config {
            source: source.to_path_buf(),
            netns,
            run_dir,
            mode,
            daemon,
            link,
            ports,
            tcp_services,
            udp_services,
            ipsec,
            services,
        })
    }

    /// The folder of the config file (templates are looked up there).
    pub fn dir(&self) -> PathBuf {
        self.source
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset() {
        let t = parse(
            "# c\n[a]\nx = \"s # not a comment\" # comment\nn = 1_500\nb = true\n\
             l = [1, 2]\n[[p]]\nname = \"w\"\n[[p]]\nname = \"v\"\nhosts = [\"a\", \"b\"]\n",
        )
        .unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t[1].keys["x"], Value::Str("s # not a comment".into()));
        assert_eq!(t[1].keys["n"], Value::Int(1500));
        assert_eq!(t[1].keys["b"], Value::Bool(true));
        assert_eq!(
            t[1].keys["l"],
            Value::List(vec![Value::Int(1), Value::Int(2)])
        );
        assert_eq!(t[3].keys["name"], Value::Str("v".into()));
        assert!(parse("[a]\n[a]\n").is_err());
        assert!(parse("[a]\nx\n").is_err());
    }

    #[test]
    fn networks() {
        let c = Cidr::parse("10.77.0.1/24").unwrap();
        assert_eq!(c.network().to_string(), "10.77.0.0/24");
        let c = Cidr::parse("fd77::1/64").unwrap();
        assert_eq!(c.network().to_string(), "fd77::/64");
        assert!(Cidr::parse("10.0.0.1/33").is_err());
    }

    #[test]
    fn shipped_config() {
        let path = crate::workspace_root().join("card-os/card.toml");
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.netns, "card");
        assert_eq!(cfg.ports[0].mtu, 1500);
        assert_eq!(cfg.mode, Mode::Nat);
        assert_eq!(cfg.ipsec.unwrap().backend, IpsecBackend::Auto);
    }
}
