//! `card-os status`: what is up, for a person or (`--json`) for a program. Up means `up` ran
//! and the namespace and the ruleset are there (exit status 0); anything else is down (3).

use std::collections::BTreeMap;

use crate::error::Result;
use serde::Serialize;

use crate::cmd::{has_link, in_ns, netns_exists, stdout};
use crate::config::{Config, Mode};
use crate::daemon::{self, Server as SocketServer};
use crate::render::Server;
use crate::{ipsec, node};
use vhost_card::cardfile::Endpoint;

#[derive(Serialize)]
pub struct Status {
    pub card: String,
    pub config: String,
    pub up: bool,
    pub netns: String,
    pub mode: Mode,
    pub run_dir: String,
    pub daemon: Daemon,
    pub link: Link,
    pub ports: Vec<Port>,
    pub forwarding: Option<Forwarding>,
    /// The ruleset's commented counters: rule comment -> packets.
    pub firewall: BTreeMap<String, u64>,
    pub ipsec: String,
    pub nginx: BTreeMap<String, Option<i32>>,
}

#[derive(Serialize)]
pub struct Daemon {
    /// The vhost-user socket, or for a VDUSE card its device (/dev/vduse/NAME).
    pub socket: String,
    /// `vhost-user` or `vduse`.
    pub transport: &'static str,
    pub server: SocketServer,
    pub control: Option<String>,
}

#[derive(Serialize)]
pub struct Link {
    pub dev: String,
    /// `tap` (Ethernet frames), or `tun` for the IP-only link (`[daemon] link = "ip"`).
    pub kind: &'static str,
    pub present: bool,
    /// `ip -br addr show dev TAP`.
    pub addresses: Vec<String>,
    pub routes: Vec<String>,
}

#[derive(Serialize)]
pub struct Port {
    pub name: String,
    pub present: bool,
    pub addresses: Vec<String>,
    pub wire_netns: String,
}

#[derive(Serialize)]
pub struct Forwarding {
    pub ipv4: bool,
    pub ipv6: bool,
}

fn addresses(ns: &str, dev: &str) -> Vec<String> {
    stdout(in_ns(ns, "ip").args(["-br", "addr", "show", "dev", dev]))
        .map(|l| l.split_whitespace().skip(2).map(String::from).collect())
        .unwrap_or_default()
}

pub fn status(cfg: &Config) -> Status {
    let ns = cfg.netns();
    let exists = netns_exists(ns);
    let up = node::is_up(cfg) && counters(cfg).is_ok();
    let tap = cfg.tap();
    let present = exists && has_link(ns, tap);
    let sysctl = |key: &str| stdout(in_ns(ns, "sysctl").args(["-n", key])).is_ok_and(|v| v == "1");
    Status {
        card: cfg.name.clone(),
        config: cfg.source.display().to_string(),
        up,
        netns: ns.to_string(),
        mode: cfg.card.mode,
        run_dir: cfg.run_dir.display().to_string(),
        daemon: Daemon {
            socket: cfg.daemon.endpoint.path().display().to_string(),
            transport: match cfg.daemon.endpoint {
                Endpoint::Socket(_) => vhost_card::stats::VHOST_USER,
                Endpoint::Vduse(_) => vhost_card::stats::VDUSE,
            },
            server: daemon::server(cfg),
            control: cfg.daemon.control.as_ref().map(|c| c.display().to_string()),
        },
        link: Link {
            dev: tap.to_string(),
            kind: match cfg.daemon.link {
                vhost_card::config::Link::Ethernet => "tap",
                vhost_card::config::Link::Ip => "tun",
            },
            present,
            addresses: if present {
                addresses(ns, tap)
            } else {
                Vec::new()
            },
            routes: if present {
                stdout(in_ns(ns, "ip").args(["route", "show", "dev", tap]))
                    .map(|t| t.lines().map(String::from).collect())
                    .unwrap_or_default()
            } else {
                Vec::new()
            },
        },
        ports: cfg
            .ports
            .iter()
            .map(|p| Port {
                name: p.name.clone(),
                present: exists && has_link(ns, &p.name),
                addresses: if exists {
                    addresses(ns, &p.name)
                } else {
                    Vec::new()
                },
                wire_netns: p.wire_netns.clone(),
            })
            .collect(),
        forwarding: exists.then(|| Forwarding {
            ipv4: sysctl("net.ipv4.ip_forward"),
            ipv6: sysctl("net.ipv6.conf.all.forwarding"),
        }),
        firewall: counters(cfg).unwrap_or_default(),
        ipsec: ipsec::status(cfg),
        nginx: [Server::Card, Server::Wire]
            .into_iter()
            .map(|s| (s.name().to_string(), node::nginx_pid(cfg, s)))
            .collect(),
    }
}

impl Status {
    /// For a person.
    pub fn text(&self) -> String {
        let mut out = Vec::new();
        out.push(format!(
            "card {}: {} (namespace {}, mode {:?}, {})",
            self.card,
            if self.up { "up" } else { "down" },
            self.netns,
            self.mode,
            self.config
        ));
        out.push(format!(
            "daemon: {} {} {}",
            if self.daemon.transport == vhost_card::stats::VDUSE {
                "VDUSE device"
            } else {
                "socket"
            },
            self.daemon.socket,
            match self.daemon.server {
                SocketServer::Nobody => "(nothing listens)".to_string(),
                SocketServer::Ours { pid } =>
                    format!("served by vhost-card pid {pid} (started by card-os)"),
                SocketServer::Other =>
                    "held by another process (systemd's socket unit or a daemon started by hand)"
                        .into(),
            }
        ));
        out.push(format!(
            "host link: {} ({}) {}",
            self.link.dev,
            if self.link.kind == "tun" {
                "tun, IP-only link"
            } else {
                "tap"
            },
            if self.link.present {
                format!(
                    "{}{}",
                    self.link.addresses.join(" "),
                    if self.link.routes.is_empty() {
                        String::new()
                    } else {
                        format!("; routes: {}", self.link.routes.join("; "))
                    }
                )
            } else {
                "absent (the daemon creates it when the VMM connects)".into()
            }
        ));
        for p in &self.ports {
            out.push(format!(
                "port {}: {} (wire namespace {})",
                p.name,
                if p.present {
                    p.addresses.join(" ")
                } else {
                    "absent".into()
                },
                p.wire_netns
            ));
        }
        if let Some(f) = &self.forwarding {
            out.push(format!("forwarding: ipv4 {} ipv6 {}", f.ipv4, f.ipv6));
        }
        out.push("firewall (packets):".into());
        for (k, v) in &self.firewall {
            out.push(format!("  {k}: {v}"));
        }
        out.push(format!("ipsec: {}", self.ipsec));
        for (k, v) in &self.nginx {
            out.push(format!(
                "{k}: {}",
                v.map_or("not running".into(), |p| format!("master pid {p}"))
            ));
        }
        out.join("\n") + "\n"
    }
}

/// The ruleset's commented counters: comment -> packets.
pub fn counters(cfg: &Config) -> Result<BTreeMap<String, u64>> {
    let text = stdout(in_ns(cfg.netns(), "nft").args(["list", "table", "inet", "card"]))?;
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
