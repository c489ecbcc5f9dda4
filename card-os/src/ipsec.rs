//! The card's IPsec tunnel (`[ipsec]` in the card's file), both ends: the card and
//! the peer in the wire namespace. Two backends:
//!
//! - **kernel**: ESP in the kernel, `ip xfrm` states and policies with static
//!   keys (no IKE daemon). Needs `CONFIG_INET_ESP` (the `esp4` module).
//! - **strongswan**: ESP in userspace. strongSwan's charon with the
//!   kernel-libipsec plugin, one instance per namespace, IKEv2 with a
//!   pre-shared key. libipsec reads the traffic to protect from a TUN device
//!   (`ipsec0`) and only does ESP inside UDP (RFC 3948, port 4500); the
//!   kernel needs no XFRM/ESP support at all.
//!
//! `backend = "auto"` (the default) probes the kernel with a throw-away ESP
//! state and uses it when it works, strongSwan otherwise.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::error::{Context, Error, Result};
use crate::fail;

use crate::cmd::{has_link, in_ns, ip, netns_exists, run, stdout, tail, wait_for};
use crate::config::{Config, Ipsec, IpsecBackend};
use crate::prereq::{self, CHARON};
use crate::render::template as render;

/// The TUN device kernel-libipsec creates (the first in its namespace).
pub const TUN: &str = "ipsec0";

/// The routing table and rule priority of the peer's tunnel route (charon's
/// own defaults, which the card's charon uses).
const TABLE: &str = "220";

/// Which backend carries the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Kernel,
    Strongswan,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Kernel => "kernel",
            Backend::Strongswan => "strongswan",
        }
    }
}

fn status_file(cfg: &Config) -> PathBuf {
    cfg.run_dir.join("ipsec.status")
}

fn backend_file(cfg: &Config) -> PathBuf {
    cfg.run_dir.join("ipsec.backend")
}

/// Whether the tunnel is up (`up: ...`), or why not.
pub fn status(cfg: &Config) -> String {
    fs::read_to_string(status_file(cfg))
        .unwrap_or_else(|_| "unknown".into())
        .trim()
        .to_string()
}

/// The backend the last `up`/`reload` chose, if the tunnel is up.
pub fn backend(cfg: &Config) -> Option<Backend> {
    if !status(cfg).starts_with("up") {
        return None;
    }
    match fs::read_to_string(backend_file(cfg)).ok()?.trim() {
        "kernel" => Some(Backend::Kernel),
        "strongswan" => Some(Backend::Strongswan),
        _ => None,
    }
}

/// One end of the tunnel.
struct End<'a> {
    /// "card" or "peer": the folder under run_dir/ipsec and the connection.
    name: &'static str,
    ns: &'a str,
    /// Outer addresses (ours, theirs) and inner networks (ours, theirs).
    me: String,
    them: String,
    mine: String,
    theirs: String,
    /// The card initiates, forwards and installs its own routes.
    card: bool,
}

fn ends<'a>(cfg: &'a Config, s: &Ipsec, wire: &'a str) -> [End<'a>; 2] {
    let (local, peer) = (s.local.to_string(), s.peer.to_string());
    let (lnet, pnet) = (s.local_subnet.to_string(), s.peer_subnet.to_string());
    [
        End {
            name: "peer",
            ns: wire,
            me: peer.clone(),
            them: local.clone(),
            mine: pnet.clone(),
            theirs: lnet.clone(),
            card: false,
        },
        End {
            name: "card",
            ns: cfg.netns(),
            me: local,
            them: peer,
            mine: lnet,
            theirs: pnet,
            card: true,
        },
    ]
}

fn wire_ns<'a>(cfg: &'a Config, s: &Ipsec) -> Result<&'a str> {
    cfg.ports
        .iter()
        .find(|p| p.name == s.port)
        .map(|p| p.wire_netns.as_str())
        .ok_or_else(|| Error::Failed(format!("ipsec.port {} is not a port", s.port)))
}

/// Checks what can be checked without changing anything: the templates render, and the
/// algorithm has a strongSwan name where strongSwan is asked for.
pub fn validate(cfg: &Config) -> Result<()> {
    let Some(s) = &cfg.ipsec else {
        return Ok(());
    };
    if s.backend == IpsecBackend::Strongswan {
        proposals(s)?;
    }
    let mut vars = BTreeMap::new();
    vars.insert("INSTALL_ROUTES", "no".to_string());
    render(cfg, "strongswan.conf.in", &vars)?;
    let mut vars = BTreeMap::new();
    for k in [
        "NAME",
        "LOCAL",
        "REMOTE",
        "LOCAL_TS",
        "REMOTE_TS",
        "IKE_PROPOSAL",
        "ESP_PROPOSAL",
        "PSK",
        "DPD_ACTION",
        "CLOSE_ACTION",
    ] {
        vars.insert(k, "x".to_string());
    }
    render(cfg, "swanctl.conf.in", &vars)?;
    Ok(())
}

/// Sets up (or keeps) the tunnel as `[ipsec]` says; returns its status line (also in
/// `run_dir/ipsec.status`). A tunnel that cannot be set up is an error.
pub fn apply(cfg: &Config) -> Result<String> {
    let Some(s) = &cfg.ipsec else {
        stop(cfg);
        fs::write(status_file(cfg), "disabled\n")?;
        fs::remove_file(backend_file(cfg)).ok();
        return Ok("disabled".into());
    };
    let wire = wire_ns(cfg, s)?;
    ip(
        wire,
        &["addr", "replace", &s.peer_inner.to_string(), "dev", "lo"],
    )?;
    let probe = kernel_esp(cfg.netns(), s);
    let (backend, why) = match (s.backend, &probe) {
        (IpsecBackend::Kernel, _) => (Backend::Kernel, String::new()),
        (IpsecBackend::Auto, Ok(())) => (Backend::Kernel, String::new()),
        (IpsecBackend::Strongswan, _) => (
            Backend::Strongswan,
            "backend = \"strongswan\" in the card's file".to_string(),
        ),
        (IpsecBackend::Auto, Err(err)) => (Backend::Strongswan, err.clone()),
    };
    fs::write(backend_file(cfg), format!("{}\n", backend.name()))?;
    // A backend switch (changed file) removes the other one first.
    let result = match backend {
        Backend::Kernel => {
            stop_strongswan(cfg, s);
            apply_kernel(cfg, s, wire, probe).map(|()| {
                format!(
                    "up: kernel ESP (ip xfrm, static keys, {}), {} <-> {}",
                    s.aead, s.local, s.peer
                )
            })
        }
        Backend::Strongswan => {
            for ns in [cfg.netns(), wire] {
                flush_xfrm(ns);
            }
            fs::remove_file(cfg.run_dir.join("ipsec.kernel")).ok();
            apply_strongswan(cfg, s, wire).map(|esp| {
                format!(
                    "up: userspace ESP in UDP/4500 (strongSwan charon + kernel-libipsec, \
                     IKEv2 PSK, {esp}), {} <-> {}; not kernel ESP: {why}",
                    s.local, s.peer
                )
            })
        }
    };
    let line = match &result {
        Ok(line) => line.clone(),
        Err(err) => format!("unavailable ({} backend): {err:#}", backend.name()),
    };
    fs::write(status_file(cfg), format!("{line}\n"))?;
    result.with_context(|| format!("IPsec ({} backend)", backend.name()))
}

/// Takes the tunnel down in both namespaces (charons, xfrm states and
/// policies, the peer's route rule); quiet about what is not there.
pub fn stop(cfg: &Config) {
    let wire = cfg
        .ipsec
        .as_ref()
        .and_then(|s| wire_ns(cfg, s).ok())
        .or(cfg.ports.first().map(|p| p.wire_netns.as_str()));
    let dirs = ["card", "peer"].map(|n| cfg.run_dir.join("ipsec").join(n));
    for dir in &dirs {
        stop_charon(dir);
    }
    for ns in [Some(cfg.netns()), wire].into_iter().flatten() {
        if netns_exists(ns) {
            // Charons in our namespaces whose pid file is gone.
            for pid in ns_charons(ns) {
                kill_and_wait(pid);
            }
            flush_xfrm(ns);
        }
    }
    if let Some(wire) = wire.filter(|w| netns_exists(w)) {
        del_peer_rule(wire);
    }
}

fn stop_strongswan(cfg: &Config, s: &Ipsec) {
    for dir in ["card", "peer"] {
        stop_charon(&cfg.run_dir.join("ipsec").join(dir));
    }
    if let Ok(wire) = wire_ns(cfg, s) {
        del_peer_rule(wire);
    }
}

fn flush_xfrm(ns: &str) {
    for what in ["policy", "state"] {
        in_ns(ns, "ip").args(["xfrm", what, "flush"]).output().ok();
    }
}

// ---------------------------------------------------------------- kernel ESP

/// Whether the kernel takes an ESP state with the configured AEAD: adds a
/// throw-away one (documentation addresses) and deletes it again.
fn kernel_esp(ns: &str, s: &Ipsec) -> std::result::Result<(), String> {
    let key = format!("0x{}", "00".repeat(s.key_bits as usize / 8));
    let (src, dst, spi) = ("192.0.2.1", "192.0.2.2", "0x7fff77ff");
    let out = in_ns(ns, "ip")
        .args(["xfrm", "state", "add", "src", src, "dst", dst])
        .args(["proto", "esp", "spi", spi, "mode", "tunnel"])
        .args(["aead", &s.aead, &key, "128"])
        .output()
        .map_err(|e| format!("cannot run ip xfrm: {e}"))?;
    if out.status.success() {
        in_ns(ns, "ip")
            .args(["xfrm", "state", "delete", "src", src, "dst", dst])
            .args(["proto", "esp", "spi", spi])
            .output()
            .ok();
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    // Tell a missing algorithm from a kernel without ESP at all.
    let probe = in_ns(ns, "ip")
        .args(["xfrm", "state", "add", "src", src, "dst", dst])
        .args(["proto", "esp", "spi", spi, "mode", "tunnel"])
        .args(["enc", "cbc(aes)", &format!("0x{}", "00".repeat(16))])
        .args(["auth", "hmac(sha256)", &format!("0x{}", "00".repeat(32))])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();
    if probe.contains("type not found") {
        Err(format!(
            "`ip xfrm state add ... proto esp` fails with `{probe}` \
             (no CONFIG_INET_ESP / esp4)"
        ))
    } else {
        in_ns(ns, "ip")
            .args(["xfrm", "state", "delete", "src", src, "dst", dst])
            .args(["proto", "esp", "spi", spi])
            .output()
            .ok();
        Err(format!(
            "`ip xfrm state add ... aead {}` fails with `{err}`",
            s.aead
        ))
    }
}

/// The static keys: generated once (at the first `up`), kept in the state directory (they
/// survive a reboot) so `reload` keeps the security associations as they are.
fn kernel_keys(cfg: &Config, bits: u32) -> Result<(String, String)> {
    let path = cfg.state_dir.join("ipsec.keys");
    if let Ok(text) = fs::read_to_string(&path) {
        let keys: Vec<&str> = text.split_whitespace().collect();
        if let [a, b] = keys[..] {
            if a.len() == 2 + bits as usize / 4 {
                return Ok((a.to_string(), b.to_string()));
            }
        }
    }
    let random = random_hex(2 * bits as usize / 8)?;
    let (a, b) = random.split_at(bits as usize / 4);
    let keys = (format!("0x{a}"), format!("0x{b}"));
    write_private(&path, &format!("{} {}\n", keys.0, keys.1))?;
    Ok(keys)
}

fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut random = vec![0u8; bytes];
    fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    Ok(random.iter().map(|x| format!("{x:02x}")).collect())
}

/// Writes a file only root may read.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        // The state directory appears with the first key; only root may enter it. Its
        // parents (/var/lib/vhost-card, which other cards and the libvirt example's guest files
        // share) are made as any directory: 0700 there would lock QEMU's user out.
        if !dir.exists() {
            if let Some(up) = dir.parent() {
                fs::create_dir_all(up).with_context(|| format!("creating {}", up.display()))?;
            }
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Both ends' states and policies. Static SPIs; states are added or updated
/// and policies updated in place, so a `reload` never leaves a moment
/// without policy (in which traffic would leave in clear). Only a changed
/// tunnel (addresses, networks, algorithm) flushes first.
fn apply_kernel(
    cfg: &Config,
    s: &Ipsec,
    wire: &str,
    probe: std::result::Result<(), String>,
) -> Result<()> {
    if let Err(why) = probe {
        fail!("{why}");
    }
    let (out_key, in_key) = kernel_keys(cfg, s.key_bits)?;
    let tunnel = format!(
        "{} {} {} {} {} {}\n",
        s.local, s.peer, s.local_subnet, s.peer_subnet, s.aead, s.key_bits
    );
    let marker = cfg.run_dir.join("ipsec.kernel");
    let same = fs::read_to_string(&marker).is_ok_and(|t| t == tunnel);
    let icv = "128";
    for end in ends(cfg, s, wire) {
        if !same {
            flush_xfrm(end.ns);
        }
        let (kout, kin, spi_out, spi_in) = if end.card {
            (&out_key, &in_key, "0x7701", "0x7702")
        } else {
            (&in_key, &out_key, "0x7702", "0x7701")
        };
        for (src, dst, spi, key) in [
            (&end.me, &end.them, spi_out, kout),
            (&end.them, &end.me, spi_in, kin),
        ] {
            let state = |verb: &str| {
                let mut cmd = in_ns(end.ns, "ip");
                cmd.args(["xfrm", "state", verb, "src", src, "dst", dst])
                    .args(["proto", "esp", "spi", spi, "reqid", "77", "mode", "tunnel"])
                    .args(["aead", &s.aead, key, icv]);
                cmd
            };
            let added = state("add").output()?;
            if !added.status.success() {
                let err = String::from_utf8_lossy(&added.stderr);
                if !err.contains("File exists") {
                    fail!("ip xfrm state add in {}: {}", end.ns, err.trim());
                }
                run(&mut state("update"))?;
            }
        }
        let mut dirs = vec![
            ("out", &end.mine, &end.theirs, &end.me, &end.them),
            ("in", &end.theirs, &end.mine, &end.them, &end.me),
        ];
        if end.card {
            dirs.push(("fwd", &end.theirs, &end.mine, &end.them, &end.me));
        }
        for (dir, src, dst, tsrc, tdst) in dirs {
            run(in_ns(end.ns, "ip")
                .args([
                    "xfrm", "policy", "update", "src", src, "dst", dst, "dir", dir,
                ])
                .args(["tmpl", "src", tsrc, "dst", tdst])
                .args(["proto", "esp", "reqid", "77", "mode", "tunnel"]))?;
        }
    }
    fs::write(&marker, tunnel)?;
    Ok(())
}

// ------------------------------------------------------- strongSwan userspace

/// strongSwan's names for the configured AEAD: (IKE proposal, ESP proposal).
fn proposals(s: &Ipsec) -> Result<(String, String)> {
    if s.aead != "rfc4106(gcm(aes))" {
        fail!(
            "ipsec.aead {:?} has no strongSwan equivalent here (only rfc4106(gcm(aes)))",
            s.aead
        );
    }
    let aes = match s.key_bits {
        160 => 128,
        224 => 192,
        288 => 256,
        n => fail!("ipsec.key_bits {n}: AES-GCM takes 160, 224 or 288 (key + 32-bit salt)"),
    };
    Ok((
        format!("aes{aes}gcm16-prfsha256-x25519"),
        format!("aes{aes}gcm16"),
    ))
}

/// The pre-shared key: generated at the first `up`, kept in the state directory (mode 0600).
fn psk(cfg: &Config) -> Result<String> {
    let path = cfg.state_dir.join("ipsec.psk");
    if let Ok(text) = fs::read_to_string(&path) {
        let text = text.trim();
        if text.len() == 66 && text.starts_with("0x") {
            return Ok(text.to_string());
        }
    }
    let key = format!("0x{}", random_hex(32)?);
    write_private(&path, &format!("{key}\n"))?;
    Ok(key)
}

/// Writes `text` to `path` unless it already holds exactly that; whether it
/// changed.
fn write_if_changed(path: &Path, text: &str, private: bool) -> Result<bool> {
    if fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    if private {
        write_private(path, text)?;
    } else {
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(true)
}

/// Both charons, the peer's route and the card's SA. Idempotent: running
/// charons with unchanged configs are left alone, and with them the SAs
/// (a `reload` does not disturb a transfer); a changed config restarts
/// them. Returns the ESP proposal.
fn apply_strongswan(cfg: &Config, s: &Ipsec, wire: &str) -> Result<String> {
    prereq::check(&[prereq::STRONGSWAN])?;
    if !Path::new("/dev/net/tun").exists() {
        fail!("/dev/net/tun is missing: kernel-libipsec needs TUN devices");
    }
    let (ike, esp) = proposals(s)?;
    let psk = psk(cfg)?;
    let mut peer_started = false;
    for end in ends(cfg, s, wire) {
        let dir = cfg.run_dir.join("ipsec").join(end.name);
        fs::create_dir_all(&dir)?;
        let socket = dir.join("charon.vici");
        if socket.as_os_str().len() > 100 {
            fail!("{} is too long for a unix socket", socket.display());
        }
        let mut vars = BTreeMap::new();
        vars.insert(
            "INSTALL_ROUTES",
            if end.card { "yes" } else { "no" }.to_string(),
        );
        let sconf = render(cfg, "strongswan.conf.in", &vars)?;
        let mut vars = BTreeMap::new();
        vars.insert("NAME", end.name.to_string());
        vars.insert("LOCAL", end.me.clone());
        vars.insert("REMOTE", end.them.clone());
        vars.insert("LOCAL_TS", end.mine.clone());
        vars.insert("REMOTE_TS", end.theirs.clone());
        vars.insert("IKE_PROPOSAL", ike.clone());
        vars.insert("ESP_PROPOSAL", esp.clone());
        vars.insert("PSK", psk.clone());
        vars.insert(
            "DPD_ACTION",
            if end.card { "restart" } else { "clear" }.to_string(),
        );
        vars.insert(
            "CLOSE_ACTION",
            if end.card { "start" } else { "none" }.to_string(),
        );
        let wconf = render(cfg, "swanctl.conf.in", &vars)?;
        let sconf_changed = write_if_changed(&dir.join("strongswan.conf"), &sconf, false)?;
        let wconf_changed = write_if_changed(&dir.join("swanctl.conf"), &wconf, true)?;
        // A changed tunnel starts afresh; so does the card when the peer
        // did (a new peer knows none of the card's SAs).
        let restart = sconf_changed || wconf_changed || (end.card && peer_started);
        if restart {
            stop_charon(&dir);
        }
        if charon_pid(&dir).is_none() {
            // One whose run directory is gone would hold the IKE ports.
            for stray in ns_charons(end.ns) {
                kill_and_wait(stray);
            }
            start_charon(end.ns, &dir)?;
            swanctl(
                &dir,
                &["--load-all", "--file"],
                Some(&dir.join("swanctl.conf")),
            )?;
            peer_started |= !end.card;
        }
        if !end.card {
            peer_route(wire, &end)?;
        }
        if end.card && !sa_installed(&dir) {
            swanctl(
                &dir,
                &[
                    "--initiate",
                    "--ike",
                    "card",
                    "--child",
                    "card",
                    "--timeout",
                    "30",
                ],
                None,
            )
            .context("initiating the tunnel")?;
            if !sa_installed(&dir) {
                fail!(
                    "no CHILD_SA installed after initiating:\n{}",
                    tail(&dir.join("charon.log"), 15)
                );
            }
        }
    }
    Ok(esp)
}

/// `swanctl ARGS [FILE]` against the charon of `dir`.
fn swanctl(dir: &Path, args: &[&str], file: Option<&Path>) -> Result<String> {
    let mut cmd = Command::new("swanctl");
    cmd.args(args);
    if let Some(file) = file {
        cmd.arg(file);
    }
    cmd.arg("--uri")
        .arg(format!("unix://{}", dir.join("charon.vici").display()))
        .env("STRONGSWAN_CONF", dir.join("strongswan.conf"));
    let out = run(&mut cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The card's `swanctl --list-sas`, if its charon answers.
pub fn list_sas(cfg: &Config) -> Option<String> {
    let dir = cfg.run_dir.join("ipsec/card");
    charon_pid(&dir)?;
    swanctl(&dir, &["--list-sas"], None).ok()
}

fn sa_installed(dir: &Path) -> bool {
    swanctl(dir, &["--list-sas"], None).is_ok_and(|o| o.contains("INSTALLED"))
}

/// The card's CHILD_SA SPIs ("in X out Y"), to tell whether a reload kept
/// the SAs; the kernel backend's SPIs are static.
pub fn child_spis(cfg: &Config) -> Option<String> {
    match backend(cfg)? {
        Backend::Kernel => Some("in 0x7702 out 0x7701 (static)".into()),
        Backend::Strongswan => {
            let sas = list_sas(cfg)?;
            let spi = |dir: &str| {
                sas.lines()
                    .map(str::trim)
                    .find(|l| l.starts_with(dir))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .map(|s| s.trim_end_matches(',').to_string())
            };
            Some(format!("in {} out {}", spi("in ")?, spi("out ")?))
        }
    }
}

/// The pid of the charon whose run directory is `dir`, if it runs.
fn charon_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(dir.join("charon.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_charon(pid).then_some(pid)
}

fn is_charon(pid: i32) -> bool {
    fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == Path::new(CHARON))
}

/// Charons running in namespace `ns`.
fn ns_charons(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|&p| is_charon(p))
                .collect()
        })
        .unwrap_or_default()
}

/// Starts charon in `ns` with the config in `dir`, in a private mount
/// namespace whose /run is `dir` (charon's pid file is fixed at
/// /run/charon.pid; the vici socket is in `dir` too), in its own session so
/// it outlives us. Waits for its vici socket.
fn start_charon(ns: &str, dir: &Path) -> Result<()> {
    for stale in ["charon.pid", "charon.vici"] {
        fs::remove_file(dir.join(stale)).ok();
    }
    let out_path = dir.join("charon.out");
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out_path)?;
    let mut cmd = in_ns(ns, "unshare");
    cmd.args(["--mount", "--propagation", "private", "--"])
        .args(["sh", "-c", "mount --bind \"$0\" /run && exec \"$1\""])
        .arg(dir)
        .arg(CHARON)
        .env("STRONGSWAN_CONF", "/run/strongswan.conf")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0);
    let mut child = cmd.spawn().context("starting charon")?;
    let socket = dir.join("charon.vici");
    let log = dir.join("charon.log");
    let ready = wait_for("charon's vici socket", Duration::from_secs(20), || {
        if let Some(status) = child.try_wait()? {
            fail!(
                "charon in {ns} exited ({status}):\n{}\n{}",
                tail(&out_path, 10),
                tail(&log, 10)
            );
        }
        Ok(socket.exists().then_some(()))
    });
    // Reap it whenever it ends (`card-os down`), while we live.
    std::thread::spawn(move || child.wait());
    ready?;
    wait_for("charon's pid file", Duration::from_secs(5), || {
        Ok(charon_pid(dir))
    })?;
    Ok(())
}

fn kill_and_wait(pid: i32) {
    for (signal, secs) in [(libc::SIGTERM, 10), (libc::SIGKILL, 5)] {
        // SAFETY: kill(2) on a pid checked (exe) to be charon.
        unsafe {
            libc::kill(pid, signal);
        }
        if wait_for("charon to exit", Duration::from_secs(secs), || {
            Ok((!is_charon(pid)).then_some(()))
        })
        .is_ok()
        {
            return;
        }
    }
    eprintln!("card-os: charon {pid} does not exit");
}

/// Stops the charon of `dir` (it removes its TUN device, routes and rule).
fn stop_charon(dir: &Path) {
    if let Some(pid) = charon_pid(dir) {
        kill_and_wait(pid);
    }
}

/// The peer's way into the tunnel: only traffic from its inner network to
/// the card's goes to ipsec0 (a rule `from PEER_NET to CARD_NET`), so the
/// wire's other hosts keep reaching the card's networks directly, as in
/// kernel mode, where the xfrm policy selects by source too.
fn peer_route(ns: &str, end: &End) -> Result<()> {
    wait_for("the peer's ipsec0", Duration::from_secs(10), || {
        Ok(has_link(ns, TUN).then_some(()))
    })?;
    ip(
        ns,
        &["route", "replace", &end.theirs, "dev", TUN, "table", TABLE],
    )?;
    let rules = stdout(Command::new("ip").args(["-n", ns, "rule", "show", "pref", TABLE]))?;
    let want = format!("from {} to {} lookup {TABLE}", end.mine, end.theirs);
    if !rules.contains(&want) {
        del_peer_rule(ns);
        ip(
            ns,
            &[
                "rule",
                "add",
                "from",
                &end.mine,
                "to",
                &end.theirs,
                "lookup",
                TABLE,
                "pref",
                TABLE,
            ],
        )?;
    }
    Ok(())
}

fn del_peer_rule(ns: &str) {
    while Command::new("ip")
        .args(["-n", ns, "rule", "del", "pref", TABLE])
        .output()
        .is_ok_and(|o| o.status.success())
    {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strongswan_proposals() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("card.toml");
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("enable = false", "enable = true");
        let mut s = Config::parse(&text, &path).unwrap().ipsec.unwrap();
        assert_eq!(
            proposals(&s).unwrap(),
            (
                "aes128gcm16-prfsha256-x25519".to_string(),
                "aes128gcm16".to_string()
            )
        );
        s.key_bits = 288;
        assert_eq!(proposals(&s).unwrap().1, "aes256gcm16");
        s.key_bits = 128;
        assert!(proposals(&s).is_err());
        s.aead = "rfc7539esp(chacha20,poly1305)".into();
        assert!(proposals(&s).is_err());
    }

    #[test]
    fn only_the_state_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("card-os-private-{}", std::process::id()));
        let key = base.join("lib/card/ipsec.keys");
        write_private(&key, "k").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&base.join("lib/card")), 0o700);
        // The shared parent stays open to others (QEMU's user reads guest files below it).
        assert_eq!(mode(&base.join("lib")) & 0o001, 0o001);
        fs::remove_dir_all(&base).unwrap();
    }
}
