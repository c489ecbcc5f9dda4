//! cardos-e2e scenario 9: the installed product alone. `cargo xtask dist --install --destdir`
//! puts vhost-card and card-os, their templates, web pages, units and the example card into a
//! staging root outside the checkout; then, from a directory in that staging root, with an
//! environment holding nothing but `PATH=<root>/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,
//! the installed `card-os` checks and brings up a card made from the installed example (IPsec
//! and the wire's test web server turned on, a wire namespace of its own) and starts the
//! installed `vhost-card --config` itself. The VM is booted again on that daemon's socket
//! (`/run/vhost-card/<card>.sock`, the paths table's default) and the scenarios that matter
//! run against it: NAT to the 1500-byte wire, the card's web server, IPsec (with the installed
//! `card-os reload` mid-transfer). Then `card-os down`, and nothing of the card is left.
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
    let wire = format!("cowi{pid}");
    // The installed example, adapted as a user would.
    let example = std::fs::read_to_string(etc.join("card.toml"))?;
    let mut text = example.clone();
    for (old, new) in [
        ("enable = false", "enable = true".to_string()),
        ("wire_http_port = 0", "wire_http_port = 80".to_string()),
        ("wire_netns = \"wire\"", format!("wire_netns = \"{wire}\"")),
    ] {
        ensure!(text.contains(old), "the installed example has no {old:?}");
        text = text.replacen(old, &new, 1);
    }
    let file = etc.join(format!("{name}.toml"));
    std::fs::write(&file, text)?;
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
    let cfg = Config::load(file)?;
    let mut node = Node {
        cfg,
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
    let socket = node.cfg.daemon.socket.clone();
    ensure!(
        socket == Path::new("/run/vhost-card").join(format!("{name}.sock")),
        "the socket is {}, not the paths table's",
        socket.display()
    );
    rig.replace_vm_on(env, "installed", &socket, u32::from(node.cfg.daemon.mtu))?;
    guest_setup(rig, &node.cfg)?;
    std::fs::copy(&env.payload.path, node.cfg.run_dir.join("wire/www/payload"))?;

    let (nat_ok, nat) = cardos::nat(rig, env, &mut node, opts)?;
    let page = rig.vm.sh(
        &format!("wget -q -O - http://{}/", node.cfg.link.address4.addr),
        Duration::from_secs(30),
    )?;
    let page_ok = page.rc == 0 && page.out.contains("the card's own web server");
    let (ipsec_ok, ipsec) = cardos::ipsec(rig, env, &mut node, opts)?;
    let (json_rc, json) = cmd.run(&["status", "--json"])?;
    let json: serde_json::Value = serde_json::from_str(json.trim())?;
    let up_ok =
        status == 0 && json_rc == 0 && json["up"] == true && json["link"]["present"] == true;
    // Down through the installed command: nothing of the card stays.
    drop(node);
    let (after, _) = cmd.run(&["status"])?;
    let gone = after == 3
        && !Path::new("/run/netns").join(name).exists()
        && !socket.exists()
        && !Path::new("/run/vhost-card").join(name).exists();
    let ok = nat_ok == Some(true) && page_ok && ipsec_ok == Some(true) && up_ok && gone;
    Ok((
        ok,
        format!(
            "installed card-os up from {} with the installed example (ipsec on), daemon {daemon}, \
             status {status}; NAT: {nat}; card web server from the guest: {}; IPsec: {ipsec}; \
             card-os down: status {after}, namespace, socket and run directory {}",
            file.display(),
            if page_ok { "served" } else { "NOT served" },
            if gone { "gone" } else { "LEFT BEHIND" }
        ),
    ))
}
