//! `card-os check`, and the first step of `up` and `reload`: the config and every file made
//! from it, checked by the programs that will read them (`nft -c`, `nginx -t`), without
//! changing anything on the system.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Context, Result};
use crate::fail;

use crate::cmd::run;
use crate::config::Config;
use crate::render::{self, Server};
use crate::{ipsec, prereq};

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("card-os-check-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        fs::remove_dir_all(&self.0).ok();
    }
}

/// Checks everything `up` would generate; one line per check.
pub fn validate(cfg: &Config) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    let scratch = Scratch::new()?;
    let dir = scratch.0.as_path();

    let www = cfg.shared(&cfg.services.www);
    if Server::Card.wanted(cfg) && cfg.services.http_port != 0 && !www.is_dir() {
        fail!(
            "services.www: {} is not a directory (the share directory is {})",
            www.display(),
            cfg.share_dir.display()
        );
    }

    let ruleset = render::ruleset(cfg)?;
    let path = dir.join("nftables.nft");
    fs::write(&path, &ruleset)?;
    nft_check(&path)?;
    lines.push(format!(
        "nftables: the ruleset ({} lines) passes `nft -c`",
        ruleset.lines().count()
    ));

    for server in [Server::Card, Server::Wire] {
        if !server.wanted(cfg) {
            continue;
        }
        let conf = render::nginx_conf(cfg, server, dir)?;
        let sdir = dir.join(match server {
            Server::Card => "nginx",
            Server::Wire => "wire",
        });
        fs::create_dir_all(&sdir)?;
        let path = sdir.join("nginx.conf");
        fs::write(&path, conf)?;
        nginx_test(&path, &sdir).with_context(|| server.name())?;
        lines.push(format!(
            "{}: its nginx.conf passes `nginx -t`",
            server.name()
        ));
    }

    ipsec::validate(cfg)?;
    lines.push(match &cfg.ipsec {
        Some(s) => format!(
            "ipsec: {} <-> {} ({} <-> {}), backend {:?}: the templates render",
            s.local, s.peer, s.local_subnet, s.peer_subnet, s.backend
        ),
        None => "ipsec: disabled".into(),
    });
    Ok(lines)
}

fn nft_check(path: &Path) -> Result<()> {
    run(Command::new("nft").arg("-c").arg("-f").arg(path)).context("nft -c")?;
    Ok(())
}

/// `nginx -t` binds the listening sockets it tests: it runs in a network namespace of its own
/// (gone when it exits) where the card's addresses may be bound without existing.
fn nginx_test(conf: &Path, prefix: &Path) -> Result<()> {
    run(Command::new("unshare")
        .args(["--net", "--", "sh", "-c"])
        .arg(
            "sysctl -qw net.ipv4.ip_nonlocal_bind=1 net.ipv6.ip_nonlocal_bind=1 && \
             ip link set lo up && exec nginx -t -q -c \"$0\" -p \"$1\"",
        )
        .arg(conf)
        .arg(prefix))
    .context("nginx -t")?;
    Ok(())
}

/// `card-os check`: the programs, then [`validate`].
pub fn check(cfg: &Config) -> Result<Vec<String>> {
    let mut lines = vec![format!(
        "config: {} (card {}, namespace {}, tap {}, {}): read",
        cfg.source.display(),
        cfg.name,
        cfg.netns(),
        cfg.tap(),
        cfg.daemon.endpoint.describe()
    )];
    prereq::check(&prereq::for_config(cfg))?;
    lines.push("programs: all there".into());
    lines.extend(validate(cfg)?);
    Ok(lines)
}
