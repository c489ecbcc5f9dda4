//! The generated files: the templates of `<share>/templates/` with their `@NAME@` fields
//! filled in from the config. Pure: nothing here touches the system.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Context, Result};
use crate::fail;

use crate::config::{Config, Mode};
use crate::ipsec;

/// Fills the `@NAME@` fields of `template` (a file in `<share>/templates/`); a field without a
/// value is an error.
pub fn template(cfg: &Config, template: &str, vars: &BTreeMap<&str, String>) -> Result<String> {
    let path = cfg.share_dir.join("templates").join(template);
    let mut text = fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read the template {} (the share directory is {}; set [card] share_dir)",
            path.display(),
            cfg.share_dir.display()
        )
    })?;
    for (name, value) in vars {
        text = text.replace(&format!("@{name}@"), value);
    }
    let mut rest = text.as_str();
    while let Some(at) = rest.find('@') {
        rest = &rest[at + 1..];
        if let Some(end) = rest.find('@') {
            let name = &rest[..end];
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                fail!("{}: no value for @{name}@", path.display());
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

/// The nftables ruleset (table `inet card`).
pub fn ruleset(cfg: &Config) -> Result<String> {
    let ports: Vec<&str> = cfg.ports.iter().map(|p| p.name.as_str()).collect();
    let nat: &[&str] = if cfg.card.mode == Mode::Nat {
        &ports
    } else {
        &[]
    };
    let wire_mtu = cfg.ports.iter().map(|p| p.mtu).min().unwrap_or(1500);
    let tap = cfg.tap();
    let mut vars = BTreeMap::new();
    vars.insert("PORT_ELEMENTS", elements(&ports, true));
    vars.insert("NAT_ELEMENTS", elements(nat, true));
    vars.insert("TCP_ELEMENTS", elements(&cfg.firewall.tcp_services, false));
    vars.insert("UDP_ELEMENTS", elements(&cfg.firewall.udp_services, false));
    vars.insert("LINK", tap.to_string());
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
            // The userspace backend's TUN device (kernel ESP goes out of and comes in through
            // the port itself).
            [
                format!(
                    "iifname \"{tap}\" oifname \"{}\" ip daddr {} counter accept comment \"host into the tunnel\"",
                    ipsec::TUN,
                    s.peer_subnet
                ),
                format!(
                    "iifname \"{}\" oifname \"{tap}\" ip saddr {} counter accept comment \"from the IPsec peer (userspace ESP)\"",
                    ipsec::TUN,
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
    template(cfg, "nftables.nft.in", &vars)
}

/// The two nginx instances: the card's services and the wire's test web server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Server {
    Card,
    Wire,
}

impl Server {
    /// Its directory (config, pid, logs, temp files) under the run directory.
    pub fn dir(self, cfg: &Config) -> PathBuf {
        cfg.run_dir.join(match self {
            Server::Card => "nginx",
            Server::Wire => "wire",
        })
    }

    pub fn netns(self, cfg: &Config) -> &str {
        match self {
            Server::Card => cfg.netns(),
            Server::Wire => &cfg.ports[0].wire_netns,
        }
    }

    /// Whether the config has anything for it to serve.
    pub fn wanted(self, cfg: &Config) -> bool {
        let sv = &cfg.services;
        match self {
            Server::Card => sv.http_port != 0 || sv.proxy_port != 0 || sv.relay_port != 0,
            Server::Wire => sv.wire_http_port != 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Server::Card => "card nginx",
            Server::Wire => "wire nginx",
        }
    }
}

/// nginx.conf of `server`, with its paths under `run_dir`.
pub fn nginx_conf(cfg: &Config, server: Server, run_dir: &Path) -> Result<String> {
    let mut vars = BTreeMap::new();
    let dir = run_dir.join(match server {
        Server::Card => "nginx",
        Server::Wire => "wire",
    });
    vars.insert("DIR", dir.display().to_string());
    vars.insert("NETNS", server.netns(cfg).to_string());
    let sv = &cfg.services;
    let listen = |port: u16, addrs: &mut dyn Iterator<Item = String>, extra: &str| {
        if port == 0 {
            return String::new();
        }
        addrs
            .map(|a| format!("listen {a}:{port}{extra};"))
            .collect::<Vec<_>>()
            .join("\n        ")
    };
    match server {
        Server::Wire => {
            vars.insert("WIRE_HTTP_PORT", sv.wire_http_port.to_string());
            vars.insert("WIRE_SLOW_RATE", sv.wire_slow_rate.clone());
            template(cfg, "nginx-wire.conf.in", &vars)
        }
        Server::Card => {
            let ports = || {
                cfg.ports.iter().flat_map(|p| {
                    [
                        p.address4.addr.to_string(),
                        format!("[{}]", p.address6.addr),
                    ]
                })
            };
            let link = [
                cfg.link.address4.addr.to_string(),
                format!("[{}]", cfg.link.address6.addr),
            ];
            let server_block = |listen: String, body: &str| {
                if listen.is_empty() {
                    String::new()
                } else {
                    format!("server {{\n        {listen}\n        {body}\n    }}")
                }
            };
            let http = listen(sv.http_port, &mut link.iter().cloned().chain(ports()), "");
            let www = cfg.shared(&sv.www);
            vars.insert(
                "HTTP_SERVER",
                server_block(http, &format!("root {};", www.display())),
            );
            let proxy = listen(sv.proxy_port, &mut ports(), "");
            vars.insert(
                "PROXY_SERVER",
                server_block(
                    proxy,
                    &format!(
                        "location / {{\n            proxy_pass http://{}:{};\n            \
                         proxy_http_version 1.1;\n            proxy_buffering off;\n        }}",
                        cfg.link.host4, sv.proxy_upstream_port
                    ),
                ),
            );
            let relay = listen(
                sv.relay_port,
                &mut cfg.ports.iter().map(|p| p.address4.addr.to_string()),
                " udp",
            );
            let (load, stream) = if relay.is_empty() {
                (String::new(), String::new())
            } else {
                (
                    format!("load_module {};", crate::prereq::STREAM_MODULE),
                    format!(
                        "stream {{\n    server {{\n        {relay}\n        \
                         proxy_pass {}:{};\n        proxy_responses 0;\n        \
                         proxy_timeout 5s;\n        proxy_buffer_size 65535;\n    }}\n}}",
                        cfg.link.host4, sv.relay_upstream_port
                    ),
                )
            };
            vars.insert("LOAD_STREAM", load);
            vars.insert("RELAY", stream);
            template(cfg, "nginx-card.conf.in", &vars)
        }
    }
}
