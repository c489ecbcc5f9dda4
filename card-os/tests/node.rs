//! The `card-os` command against the real programs (ip, nft, nginx, the vhost-card daemon), as
//! root, in namespaces named after this process:
//! - `card-os run` puts the card's addresses and routes back when the daemon recreates its
//!   tap, reloads on SIGHUP and takes the node down on SIGTERM;
//! - under socket activation (`systemd-socket-activate` holding the card's socket, as
//!   `vhost-card@.socket` does) card-os starts no daemon and needs no tap, and sets the link
//!   up when the first connection starts the daemon;
//! - a bad config, a missing template or a service port already taken leave the system as it
//!   was, and `down` after a failed `up` is quiet;
//! - the units follow the paths table.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use card_tests::daemon::{binary, Daemon};
use card_tests::netns::Netns;
use card_tests::TempDir;
use rig::process::have;
use vhost_card::cardfile::CardPaths;

const CARD_OS: &str = env!("CARGO_BIN_EXE_card-os");

fn share_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A card's file for namespace `ns` (the file is named after it) in `dir`, from the example
/// with private paths; `extra` replaces lines of the example (`(old, new)`).
fn card_file(dir: &Path, ns: &str, daemon: &str, extra: &[(&str, &str)]) -> Result<PathBuf> {
    let mut text = std::fs::read_to_string(share_dir().join("card.toml"))?;
    let edits = [
        (
            "[card]\n",
            format!(
                "[card]\nrun_dir = \"{}\"\nstate_dir = \"{}\"\nshare_dir = \"{}\"\n",
                dir.join("run").display(),
                dir.join("state").display(),
                share_dir().display()
            ),
        ),
        ("daemon = \"vhost-card\"", format!("daemon = \"{daemon}\"")),
        (
            "queues = 1\n",
            format!(
                "queues = 1\nsocket = \"{}\"\ncontrol = \"{}\"\n",
                dir.join("card.sock").display(),
                dir.join("card.control").display()
            ),
        ),
    ];
    for (old, new) in edits
        .iter()
        .map(|(o, n)| (*o, n.as_str()))
        .chain(extra.iter().copied())
    {
        ensure!(text.contains(old), "the example has no {old:?}");
        text = text.replacen(old, new, 1);
    }
    let path = dir.join(format!("{ns}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

fn card_os(config: &Path, args: &[&str]) -> Result<Output> {
    Command::new(CARD_OS)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .context("running card-os")
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// `ip -n NS ARGS` output, or "" if it fails.
fn ip(ns: &str, args: &[&str]) -> String {
    Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn wait(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    while !ok() {
        if t0.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(t0.elapsed())
}

/// The card's link has its addresses and the route to a network behind the host.
fn link_set(ns: &str) -> bool {
    let addrs = ip(ns, &["addr", "show", "dev", "card0"]);
    let routes = ip(ns, &["route", "show", "dev", "card0"]);
    addrs.contains("10.77.0.1/24")
        && addrs.contains("fd77::1/64")
        && routes.contains("10.80.0.0/24 via 10.77.0.2")
}

fn ruleset(ns: &str) -> String {
    Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "ruleset"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn signal(child: &Child, sig: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: kill(2) on our own child, not reaped yet.
    ensure!(unsafe { libc::kill(pid, sig) } == 0, "kill");
    Ok(())
}

/// A `card-os run` child, stopped with SIGKILL on drop if it still runs.
struct Run {
    child: Child,
    log: PathBuf,
}

impl Run {
    fn start(config: &Path, dir: &Path, path_env: Option<&str>) -> Result<Run> {
        let log = dir.join("card-os.log");
        let mut cmd = Command::new(CARD_OS);
        cmd.arg("--config")
            .arg(config)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(File::create(&log)?)
            .stderr(File::create(dir.join("card-os.err"))?);
        if let Some(p) = path_env {
            cmd.env("PATH", p);
        }
        Ok(Run {
            child: cmd.spawn()?,
            log,
        })
    }

    fn log(&self) -> String {
        let err = self.log.with_file_name("card-os.err");
        std::fs::read_to_string(&self.log).unwrap_or_default()
            + &std::fs::read_to_string(err).unwrap_or_default()
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("card-os run exited ({status}):\n{}", self.log());
        }
        Ok(())
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if t0.elapsed() > timeout {
                bail!(
                    "card-os run still running after {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
        eprintln!("---- card-os run log ----\n{}", self.log());
    }
}

#[test]
fn run_puts_the_link_back_reloads_on_sighup_and_goes_down_on_sigterm() -> Result<()> {
    card_tests::require_root()?;
    let ns = Netns::new("co")?;
    let dir = TempDir::new("card-tests")?;
    let mut daemon = Daemon::start(ns.name(), &[])?;
    let routes = ("routes = []", "routes = [\"10.80.0.0/24\", \"fd80::/64\"]");
    let config = card_file(dir.path(), ns.name(), "", &[routes])?;
    let mut run = Run::start(&config, dir.path(), None)?;
    let took = wait(
        "card-os run to set the link up",
        Duration::from_secs(30),
        || link_set(ns.name()),
    )
    .with_context(|| run.log())?;
    eprintln!("link set up {took:?} after card-os run started");
    wait("card-os run to be up", Duration::from_secs(30), || {
        card_os(&config, &["status"]).is_ok_and(|o| o.status.code() == Some(0))
    })
    .with_context(|| run.log())?;
    let status = card_os(&config, &["status", "--json"])?;
    ensure!(status.status.code() == Some(0), "status: {status:?}");
    let json: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    ensure!(
        json["up"] == true && json["link"]["present"] == true,
        "{json}"
    );

    // The daemon exits cleanly (its tap goes with it) and starts again: a new tap, bare.
    daemon.stop()?;
    wait("the tap to go", Duration::from_secs(10), || {
        !ip(ns.name(), &["link"]).contains("card0")
    })?;
    let daemon2 = Daemon::start(ns.name(), &[])?;
    let back = wait(
        "the addresses and routes back",
        Duration::from_secs(10),
        || link_set(ns.name()),
    )
    .with_context(|| run.log())?;
    eprintln!("addresses and routes back {back:?} after the new tap appeared");
    run.check_running()?;
    ensure!(run.log().contains("appeared"), "{}", run.log());

    // SIGHUP: the edited file is applied (one more TCP service in the ruleset).
    let text = std::fs::read_to_string(&config)?;
    std::fs::write(
        &config,
        text.replace(
            "tcp_services = [80, 8080]",
            "tcp_services = [80, 8080, 8443]",
        ),
    )?;
    ensure!(
        !ruleset(ns.name()).contains("8443"),
        "8443 before the reload"
    );
    signal(&run.child, libc::SIGHUP)?;
    wait("the reloaded ruleset", Duration::from_secs(20), || {
        ruleset(ns.name()).contains("8443")
    })
    .with_context(|| run.log())?;
    run.check_running()?;
    ensure!(
        link_set(ns.name()),
        "the link lost its addresses in the reload"
    );

    // SIGTERM: down, exit 0; what card-os made is gone, the daemon (not card-os's) runs on.
    signal(&run.child, libc::SIGTERM)?;
    let status = run.wait_exit(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "card-os run ended with {status}:\n{}",
        run.log()
    );
    ensure!(
        !ruleset(ns.name()).contains("table inet card"),
        "ruleset left behind"
    );
    ensure!(
        !netns_exists(&format!("{}-wire", ns.name())),
        "wire namespace left behind"
    );
    ensure!(
        !ip(ns.name(), &["addr"]).contains("10.77.0.1"),
        "address left behind"
    );
    ensure!(
        !dir.path().join("run").exists(),
        "run directory left behind"
    );
    ensure!(
        ip(ns.name(), &["link"]).contains("card0"),
        "the daemon's tap is gone"
    );
    drop(daemon2);
    Ok(())
}

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .contains(needle)
        {
            out.push(pid);
        }
    }
    out
}

#[test]
fn socket_activation_no_second_daemon_no_tap_needed() -> Result<()> {
    card_tests::require_root()?;
    ensure!(
        have("systemd-socket-activate"),
        "systemd-socket-activate is missing (apt-get install systemd)"
    );
    let ns = Netns::new("sa")?;
    let dir = TempDir::new("card-tests")?;
    // card-os could start a daemon ([card] daemon = "vhost-card", on PATH): it must not.
    let bin = binary()?;
    let bin_dir = bin.parent().context("binary dir")?.to_path_buf();
    let path_env = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let config = card_file(
        dir.path(),
        ns.name(),
        "vhost-card",
        &[("routes = []", "routes = [\"10.80.0.0/24\"]")],
    )?;
    let socket = dir.path().join("card.sock");
    // systemd-socket-activate holds the socket and runs `vhost-card --fd 3 --config FILE` on
    // the first connection, as vhost-card@.socket/.service do.
    let act_log = dir.path().join("activate.log");
    let mut act = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg("-E")
        .arg(format!("RUNTIME_DIRECTORY={}", dir.path().display()))
        .arg(&bin)
        .args(["--fd", "3", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&act_log)?)
        .spawn()?;
    let result = (|| -> Result<()> {
        wait("the activator's socket", Duration::from_secs(10), || {
            socket.exists()
        })?;
        let mut run = Run::start(&config, dir.path(), Some(&path_env))?;
        wait("card-os run to be up", Duration::from_secs(30), || {
            card_os(&config, &["status"]).is_ok_and(|o| o.status.code() == Some(0))
        })
        .with_context(|| run.log())?;
        run.check_running()?;
        let config_s = config.display().to_string();
        ensure!(
            processes_with(&format!("vhost-card --config {config_s}")).is_empty(),
            "card-os started a daemon on a socket systemd holds"
        );
        ensure!(
            !ip(ns.name(), &["link"]).contains("card0"),
            "a tap before any connection"
        );
        let status = card_os(&config, &["status", "--json"])?;
        let json: serde_json::Value = serde_json::from_slice(&status.stdout)?;
        ensure!(json["daemon"]["server"]["kind"] == "other", "{json}");
        ensure!(ruleset(ns.name()).contains("table inet card"), "no ruleset");

        // The VMM connects: the activator starts the daemon, the tap appears, card-os sets it up.
        let _vmm = UnixStream::connect(&socket)?;
        let took = wait(
            "the link set up after activation",
            Duration::from_secs(20),
            || link_set(ns.name()),
        )
        .with_context(|| run.log() + &std::fs::read_to_string(&act_log).unwrap_or_default())?;
        eprintln!("addresses and route on the activated daemon's tap after {took:?}");
        let daemons: Vec<i32> = processes_with(&format!("--config {config_s}"))
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("vhost-card"))
            })
            .collect();
        ensure!(daemons.len() == 1, "daemons serving the card: {daemons:?}");
        signal(&run.child, libc::SIGTERM)?;
        ensure!(
            run.wait_exit(Duration::from_secs(30))?.success(),
            "{}",
            run.log()
        );
        // The namespace is not card-os's: it stays, with the daemon's tap, without the card's
        // addresses.
        ensure!(netns_exists(ns.name()), "namespace removed");
        ensure!(
            !ip(ns.name(), &["addr"]).contains("10.77.0.1"),
            "address left behind"
        );
        Ok(())
    })();
    act.kill().ok();
    act.wait().ok();
    result
}

/// What `card-os up` may leave behind in `ns`.
fn traces(ns: &str, dir: &Path) -> Vec<String> {
    let mut t = Vec::new();
    if netns_exists(ns) {
        if ruleset(ns).contains("table inet card") {
            t.push("ruleset".into());
        }
        if ip(ns, &["link"]).contains("wan0") {
            t.push("port wan0".into());
        }
        let fwd = Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-n", "net.ipv4.ip_forward"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        if fwd == "1" {
            t.push("ip_forward=1".into());
        }
    }
    if netns_exists(&format!("{ns}-wire")) {
        t.push("wire namespace".into());
    }
    for d in ["run", "state"] {
        if dir.join(d).exists() {
            t.push(format!("{d} directory"));
        }
    }
    let nginx = processes_with(&dir.join("run").display().to_string());
    if !nginx.is_empty() {
        t.push(format!("processes {nginx:?}"));
    }
    t
}

#[test]
fn bad_input_leaves_the_system_as_it_was() -> Result<()> {
    card_tests::require_root()?;
    let dir = TempDir::new("card-tests")?;
    let name = card_tests::unique("cb");

    // An unknown key, a bad address: refused before anything exists.
    for (edit, key) in [
        (("[link]", "[link]\ncolour = \"blue\""), "colour"),
        (("\"10.78.0.1/24\"", "\"10.78.0.300/24\""), "address4"),
    ] {
        let config = card_file(dir.path(), &name, "", &[edit])?;
        let out = card_os(&config, &["up"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(1), "up succeeded: {err}");
        ensure!(
            err.contains(&config.display().to_string())
                && err.contains(key)
                && err.contains("line"),
            "the error does not name the file, the line and {key}: {err}"
        );
        ensure!(!netns_exists(&name), "namespace created");
        ensure!(
            traces(&name, dir.path()).is_empty(),
            "{:?}",
            traces(&name, dir.path())
        );
    }

    // No daemon on PATH: one error naming it, and nothing made (the namespace was made before
    // the daemon was looked for: it goes again).
    let config = card_file(dir.path(), &name, "vhost-card", &[])?;
    let out = Command::new(CARD_OS)
        .arg("--config")
        .arg(&config)
        .arg("up")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && err.contains("\"vhost-card\" is not on PATH"),
        "{err}"
    );
    ensure!(!netns_exists(&name), "namespace left behind");
    ensure!(
        traces(&name, dir.path()).is_empty(),
        "{:?}",
        traces(&name, dir.path())
    );

    // A missing template: the share directory without templates.
    let empty = dir.path().join("empty-share");
    std::fs::create_dir_all(empty.join("www"))?;
    let config = card_file(dir.path(), &name, "", &[])?;
    let text = std::fs::read_to_string(&config)?.replace(
        &format!("share_dir = \"{}\"", share_dir().display()),
        &format!("share_dir = \"{}\"", empty.display()),
    );
    std::fs::write(&config, text)?;
    let out = card_os(&config, &["up"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && err.contains("template"),
        "{err}"
    );
    ensure!(!netns_exists(&name), "namespace created");

    // A service port already taken in the card's namespace (which exists already, as
    // vhost-card@'s ExecStartPre makes it): nginx cannot bind, `up` fails and takes down
    // everything it made; the namespace, not card-os's, stays.
    let ns = Netns::new("cp")?;
    let config = card_file(dir.path(), ns.name(), "", &[])?;
    let taken = ns.tcp_listener("0.0.0.0:80".parse()?)?;
    let out = card_os(&config, &["up"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1),
        "up succeeded with port 80 taken: {err}"
    );
    ensure!(
        err.contains("Address already in use"),
        "the error does not say why: {err}"
    );
    eprintln!("up with port 80 taken: {}", err.trim());
    ensure!(
        netns_exists(ns.name()),
        "the namespace card-os did not create was removed"
    );
    let left = traces(ns.name(), dir.path());
    ensure!(left.is_empty(), "a failed up left {left:?}");
    let out = card_os(&config, &["down"])?;
    ensure!(out.status.success(), "down after a failed up: {out:?}");
    let out = card_os(&config, &["status"])?;
    ensure!(
        out.status.code() == Some(3),
        "status after a failed up: {out:?}"
    );
    drop(taken);
    Ok(())
}

/// The value of `key=` in a unit file.
fn unit_value(text: &str, key: &str) -> Result<String> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {key}= in the unit"))
}

#[test]
fn units_follow_the_paths_table() -> Result<()> {
    let units = share_dir().join("../host-config/systemd");
    let read = |n: &str| std::fs::read_to_string(units.join(n)).with_context(|| n.to_string());
    let (socket, daemon, node) = (
        read("vhost-card@.socket")?,
        read("vhost-card@.service")?,
        read("card-os@.service")?,
    );
    let p = CardPaths::of("%i");
    let run = |dir: &str| PathBuf::from("/run").join(dir);
    ensure!(PathBuf::from(unit_value(&socket, "ListenStream")?) == p.socket);
    ensure!(run(&unit_value(&daemon, "RuntimeDirectory")?) == p.daemon_dir);
    ensure!(run(&unit_value(&node, "RuntimeDirectory")?) == p.run_dir);
    ensure!(PathBuf::from("/var/lib").join(unit_value(&node, "StateDirectory")?) == p.state_dir);
    for (unit, text) in [
        ("vhost-card@.service", &daemon),
        ("card-os@.service", &node),
    ] {
        let exec = unit_value(text, "ExecStart")?;
        ensure!(
            exec.contains(&format!("--config {}", p.config.display())),
            "{unit} does not read the card's file: {exec}"
        );
    }
    ensure!(unit_value(&daemon, "ExecStart")?.contains("--fd 3"));
    ensure!(unit_value(&node, "Type")? == "notify");
    ensure!(unit_value(&node, "Wants")?.contains("vhost-card@%i.socket"));
    // systemd-analyze verify, with the binaries of this build.
    if have("systemd-analyze") {
        let vhost = binary()?;
        let units: Vec<(&str, String)> = [
            ("vhost-card@.socket", &socket),
            ("vhost-card@.service", &daemon),
            ("card-os@.service", &node),
        ]
        .map(|(name, text)| {
            let text = text
                .replace("/usr/local/bin/vhost-card", &vhost.to_string_lossy())
                .replace("/usr/local/bin/card-os", CARD_OS);
            (name, text)
        })
        .into();
        rig::units::verify(
            &units,
            &[
                "vhost-card@card.service",
                "vhost-card@card.socket",
                "card-os@card.service",
            ],
        )?;
    }
    Ok(())
}
