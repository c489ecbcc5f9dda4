//! cardos-e2e scenario 9: the installed product alone. `cargo xtask dist --install --destdir`
//! puts vhost-card and card-os, their templates, web pages, units and the example card into a
//! staging root outside the checkout; then, from a directory in that staging root, with an
//! environment holding nothing but `PATH=<root>/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`:
//!
//! 1. the installed example, unedited, under the run's own card name (`vci<pid>.toml`: the
//!    file's name is the card's name, so its namespaces are the run's), is checked and brought
//!    up by the installed `card-os`, which starts the installed `vhost-card --config` itself;
//!    the VM is booted again on that daemon's socket (`/run/vhost-card/<card>.sock`, the paths
//!    table's default); 64 MiB from the guest to a host on the 1500-byte wire pass through the
//!    card's NAT (sha256, the masquerade rule counting), the card's web server answers, and
//!    the installed `vhost-card stats --json` on the paths table's control socket shows the
//!    guest connected at the file's MTU with frames both ways;
//! 2. the file edited as a user would (IPsec on, the wire's test web server on) and
//!    `card-os reload`: 64 MiB through the IPsec tunnel, with the installed `card-os reload`
//!    again mid-transfer;
//! 3. `card-os down`, and nothing of the card is left.
//!
//! Every command and its output goes to `logs/cardos/installed.txt`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use card_os::Config;

use super::cardos::{self, guest_setup, Driver, Node, Options};
use crate::process::TempDir;
use crate::rig::{Env, Rig};

/// The installed `card-os` with the run's card file, run as a user would: from the staging
/// directory, with nothing but PATH in the environment. Each run is added to the transcript.
#[derive(Clone)]
pub struct Command {
    bin: PathBuf,
    file: PathBuf,
    cwd: PathBuf,
    path_env: String,
    transcript: Arc<Mutex<String>>,
}

impl Command {
    /// `card-os --config FILE ARGS`: exit status and output; fails on a status other than 0
    /// (or 3 for `status`).
    pub fn run(&self, args: &[&str]) -> Result<(i32, String)> {
        let out = std::process::Command::new(&self.bin)
            .arg("--config")
            .arg(&self.file)
            .args(args)
            .current_dir(&self.cwd)
            .env_clear()
            .env("PATH", &self.path_env)
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let code = out.status.code().unwrap_or(-1);
        let mut t = self.transcript.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(
            t,
            "$ card-os --config {} {}\n{}[exit status {code}]\n",
            self.file.display(),
            args.join(" "),
            text
        )?;
        let ok = code == 0 || (args.first() == Some(&"status") && code == 3);
        ensure!(ok, "card-os {} exited with {code}:\n{text}", args.join(" "));
        Ok((code, text))
    }

    /// The installed `vhost-card ARGS`, in the same environment, into the transcript.
    pub fn daemon(&self, args: &[&str]) -> Result<String> {
        let bin = self.bin.with_file_name("vhost-card");
        let out = std::process::Command::new(&bin)
            .args(args)
            .current_dir(&self.cwd)
            .env_clear()
            .env("PATH", &self.path_env)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let mut t = self.transcript.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(
            t,
            "$ vhost-card {}\n{}[exit status {}]\n",
            args.join(" "),
            text,
            out.status.code().unwrap_or(-1)
        )?;
        ensure!(
            out.status.success(),
            "vhost-card {} failed:\n{text}",
            args.join(" ")
        );
        Ok(text)
    }

    /// The installed `card-os reload` (the file on disk is the config).
    pub fn reload(&self, _cfg: &Config) -> Result<String> {
        self.run(&["reload"])
            .map(|(_, text)| text.trim().to_string())
    }
}

/// Scenario 9.
pub fn scenario(
    rig: &mut Rig,
    env: &Env,
    _library_node: &mut Node,
    opts: &Options,
) -> Result<(Option<bool>, String)> {
    let staging = TempDir::new("vhc-installed")?;
    let root = staging.path().join("root");
    crate::dist::run(&crate::dist::Options {
        install: true,
        destdir: root.clone(),
        prefix: PathBuf::from("/usr/local"),
        no_build: false,
    })?;
    let bin = root.join("usr/local/bin");
    let etc = root.join("etc/vhost-card");
    let pid = std::process::id();
    let name = format!("vci{pid}");
    // The installed example, unedited: only its name (the card's name) is the run's.
    let example = etc.join("card.toml");
    let file = etc.join(format!("{name}.toml"));
    std::fs::copy(&example, &file)?;
    let cmd = Command {
        bin: bin.join("card-os"),
        file: file.clone(),
        cwd: staging.path().to_path_buf(),
        path_env: format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display()),
        transcript: Arc::new(Mutex::new(String::new())),
    };
    let transcript = rig
        .log_dir
        .parent()
        .unwrap_or(&rig.log_dir)
        .join("installed.txt");
    let result = run(rig, env, opts, &cmd, &file, &name);
    let state = Path::new("/var/lib/vhost-card").join(&name);
    std::fs::remove_dir_all(&state).ok();
    std::fs::write(
        &transcript,
        cmd.transcript.lock().map(|t| t.clone()).unwrap_or_default(),
    )?;
    result.map(|(ok, text)| {
        (
            Some(ok),
            format!("{text}; transcript {}", transcript.display()),
        )
    })
}

fn run(
    rig: &mut Rig,
    env: &Env,
    opts: &Options,
    cmd: &Command,
    file: &Path,
    name: &str,
) -> Result<(bool, String)> {
    cmd.run(&["check"])?;
    cmd.run(&["up"])?;
    let (status, _) = cmd.run(&["status"])?;
    let mut node = Node {
        cfg: Config::load(file)?,
        guests: Vec::new(),
        booted: None,
        driver: Driver::Installed(cmd.clone()),
        _run: None,
    };
    let daemon = match card_os::daemon::server(&node.cfg) {
        card_os::daemon::Server::Ours { pid } => {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
            ensure!(
                exe.starts_with(cmd.bin.parent().context("bin")?),
                "the daemon is {}, not the installed one",
                exe.display()
            );
            format!("installed {} (pid {pid})", exe.display())
        }
        other => bail!("card-os up did not start the installed daemon: {other:?}"),
    };
    let socket = node.cfg.daemon.endpoint.path();
    ensure!(
        socket == Path::new("/run/vhost-card").join(format!("{name}.sock")),
        "the socket is {}, not the paths table's",
        socket.display()
    );
    rig.replace_vm_on(env, "installed", &socket, u32::from(node.cfg.daemon.mtu))?;
    guest_setup(rig, &node.cfg)?;

    // 1. The unedited example: NAT to a host on the wire, the card's web server.
    let (nat_ok, nat) = nat_to_wire(rig, env, &node.cfg, opts)?;
    let page = rig.vm.sh(
        &format!("wget -q -O - http://{}/", node.cfg.link.address4.addr),
        Duration::from_secs(30),
    )?;
    let page_ok = page.rc == 0 && page.out.contains("the card's own web server");
    // The daemon's state and counters, on the control socket the paths table gives the card:
    // the table for the transcript, the JSON (schema 1) checked: the guest connected at the
    // file's MTU, frames both ways.
    let control = format!("/run/vhost-card/{name}.control");
    cmd.daemon(&["stats", "--control", &control])?;
    let snap = vhost_card::stats::Snapshot::parse(&cmd.daemon(&[
        "stats",
        "--json",
        "--control",
        &control,
    ])?)?;
    let frames = |name: &str| {
        snap.pairs
            .iter()
            .filter_map(|p| p.counters.get(name))
            .sum::<u64>()
    };
    let stats_ok = snap.schema == vhost_card::stats::SCHEMA_VERSION
        && snap.state.connected
        && snap.state.mtu == node.cfg.daemon.mtu
        && frames("tx_frames") > 0
        && frames("rx_frames") > 0;
    let stats = format!(
        "schema {}, {}, MTU {}, tx_frames {}, rx_frames {}",
        snap.schema,
        if snap.state.connected {
            "connected"
        } else {
            "NOT CONNECTED"
        },
        snap.state.mtu,
        frames("tx_frames"),
        frames("rx_frames")
    );

    // 2. Edited as a user would, and reloaded: IPsec.
    let text = std::fs::read_to_string(file)?;
    let mut edited = text.clone();
    for (old, new) in [
        ("enable = false", "enable = true"),
        ("wire_http_port = 0", "wire_http_port = 80"),
    ] {
        ensure!(edited.contains(old), "the installed example has no {old:?}");
        edited = edited.replacen(old, new, 1);
    }
    std::fs::write(file, edited)?;
    cmd.run(&["reload"])?;
    node.cfg = Config::load(file)?;
    std::fs::copy(&env.payload.path, node.cfg.run_dir.join("wire/www/payload"))?;
    let (ipsec_ok, ipsec) = cardos::ipsec(rig, env, &mut node, opts)?;
    let (json_rc, json) = cmd.run(&["status", "--json"])?;
    let json: serde_json::Value = serde_json::from_str(json.trim())?;
    let up_ok =
        status == 0 && json_rc == 0 && json["up"] == true && json["link"]["present"] == true;

    // 3. Down through the installed command: nothing of the card stays.
    drop(node);
    let (after, _) = cmd.run(&["status"])?;
    let gone = after == 3
        && !Path::new("/run/netns").join(name).exists()
        && !Path::new("/run/netns")
            .join(format!("{name}-wire"))
            .exists()
        && !socket.exists()
        && !Path::new("/run/vhost-card").join(name).exists();
    let ok = nat_ok && page_ok && stats_ok && ipsec_ok == Some(true) && up_ok && gone;
    Ok((
        ok,
        format!(
            "the installed example unedited ({}), card-os up started the {daemon}, status \
             {status}; NAT: {nat}; card web server from the guest: {}; vhost-card stats \
             --json --control {control}: {stats}{}; IPsec and the wire's web \
             server turned on, card-os reload: {ipsec}; card-os down: status {after}, \
             namespaces, socket and run directory {}",
            file.display(),
            if page_ok { "served" } else { "NOT served" },
            if stats_ok { "" } else { " (WRONG)" },
            if gone { "gone" } else { "LEFT BEHIND" }
        ),
    ))
}

/// The payload from the guest to a host on the wire (the first of `wire_hosts`, TCP port
/// 5010, a receiver in the wire's namespace) through the card's NAT.
fn nat_to_wire(rig: &mut Rig, env: &Env, cfg: &Config, opts: &Options) -> Result<(bool, String)> {
    let len = opts.mib * super::MIB;
    let port = &cfg.ports[0];
    let host = port.wire_hosts.first().context("no wire_hosts")?.addr;
    let std::net::IpAddr::V4(host) = host else {
        bail!("the first wire host {host} is not IPv4");
    };
    let before = card_os::status::counters(cfg)?;
    let rx = crate::nsnet::tcp_receive(
        &port.wire_netns,
        std::net::SocketAddrV4::new(host, 5010),
        Duration::from_secs(60),
        crate::rig::transfer_timeout(len),
        Default::default(),
    )?;
    let reply = rig.vm.sh(
        &format!("head -c {len} {} | nc {host} 5010", crate::guest::PAYLOAD),
        crate::rig::transfer_timeout(len),
    )?;
    let got = crate::nsnet::join(rx)?;
    let after = card_os::status::counters(cfg)?;
    let masq = after.get("host IPv4").unwrap_or(&0) - before.get("host IPv4").unwrap_or(&0);
    let ok =
        reply.rc == 0 && got.bytes == len as u64 && got.sha256 == env.sha_prefix(len)? && masq >= 1;
    Ok((
        ok,
        format!(
            "guest → {host}:5010 on the wire ({}): {} bytes at {:.1} MB/s, sha256 {}, \
             masquerade rule +{masq}",
            port.wire_netns,
            got.bytes,
            got.mb_per_s(),
            if got.sha256 == env.sha_prefix(len)? {
                "equal"
            } else {
                "DIFFERENT"
            }
        ),
    ))
}
