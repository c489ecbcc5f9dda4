//! The programs the node needs, and the Debian packages that have them. card-os installs
//! nothing: `up` and `check` stop with one error that names what to install.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::fail;

use crate::config::Config;

/// Where Debian's nginx keeps its dynamic stream module (the UDP relay needs it).
pub const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// strongSwan's IKE daemon (userspace IPsec backend).
pub const CHARON: &str = "/usr/lib/ipsec/charon";

/// A program (a name looked up on PATH, or an absolute path) and its package.
pub struct Need {
    pub program: &'static str,
    pub package: &'static str,
}

const fn need(program: &'static str, package: &'static str) -> Need {
    Need { program, package }
}

/// What every node needs.
pub const BASE: &[Need] = &[
    need("ip", "iproute2"),
    need("nft", "nftables"),
    need("ethtool", "ethtool"),
    need("sysctl", "procps"),
    need("unshare", "util-linux"),
];

/// The card's and the wire's web servers.
pub const NGINX: &[Need] = &[need("nginx", "nginx")];

/// The UDP relay (nginx's stream module).
pub const STREAM: &[Need] = &[need(STREAM_MODULE, "libnginx-mod-stream")];

/// The userspace IPsec backend.
pub const STRONGSWAN: &[Need] = &[
    need(CHARON, "strongswan-charon"),
    need("swanctl", "strongswan-swanctl"),
    need(
        "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so",
        "libcharon-extra-plugins",
    ),
    need(
        "/usr/lib/ipsec/plugins/libstrongswan-openssl.so",
        "libstrongswan-standard-plugins",
    ),
];

/// Every Debian package card-os may use (what a test machine installs).
pub fn all_packages() -> Vec<&'static str> {
    let mut p: Vec<&str> = [BASE, NGINX, STREAM, STRONGSWAN]
        .iter()
        .flat_map(|n| n.iter().map(|n| n.package))
        .collect();
    p.sort_unstable();
    p.dedup();
    p
}

/// `program` on PATH (or the path itself, if absolute).
pub fn find(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = Path::new(program);
        return p.exists().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Fails with one message naming every missing program and its package.
pub fn check(needs: &[&[Need]]) -> Result<()> {
    let missing: Vec<&Need> = needs
        .iter()
        .flat_map(|n| n.iter())
        .filter(|n| find(n.program).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|n| n.package).collect();
    packages.dedup();
    fail!(
        "missing {}: install the Debian package{} with `apt-get install {}`",
        missing
            .iter()
            .map(|n| n.program)
            .collect::<Vec<_>>()
            .join(", "),
        if packages.len() > 1 { "s" } else { "" },
        packages.join(" ")
    )
}

/// What `cfg` needs before anything else (IPsec's backend is known only once the kernel was
/// asked; see `ipsec.rs`).
pub fn for_config(cfg: &Config) -> Vec<&'static [Need]> {
    let mut needs = vec![BASE];
    let sv = &cfg.services;
    if sv.http_port != 0 || sv.proxy_port != 0 || sv.relay_port != 0 || sv.wire_http_port != 0 {
        needs.push(NGINX);
    }
    if sv.relay_port != 0 {
        needs.push(STREAM);
    }
    if cfg
        .ipsec
        .as_ref()
        .is_some_and(|s| s.backend == crate::config::IpsecBackend::Strongswan)
    {
        needs.push(STRONGSWAN);
    }
    needs
}
