//! The command line as an operator meets it: each error printed once with the system's own
//! words, every flag checked before anything is created (no tap or socket left by a start that
//! fails), hints that name the real problem, an unprivileged daemon on a tap made beforehand for
//! its user, the vhost-user socket's group and mode, SIGHUP, and the log level.

use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use card_tests::card::{Card, Traffic, TAP};
use card_tests::daemon::{binary, binary_in, run_to_exit, Daemon};
use card_tests::netns::Netns;
use card_tests::TempDir;

/// The unprivileged user and group the tests run the daemon as.
const USER: &str = "nobody";
const GROUP: &str = "nogroup";
const NOBODY: u32 = 65534;

/// Runs the daemon to its exit with `args`, expects status `code`, and returns its one error
/// line (stderr must hold exactly one line with `error:`).
fn one_error(args: &[&str], code: i32) -> Result<String> {
    let (status, stderr) = run_to_exit(args, Duration::from_secs(10))?;
    ensure!(
        status.code() == Some(code),
        "vhost-card {} exited with {status}, expected {code}:\n{stderr}",
        args.join(" ")
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    ensure!(errors.len() == 1, "expected one error line:\n{stderr}");
    Ok(errors[0].to_string())
}

/// Fails unless `words` occur exactly once in `line`.
fn once(line: &str, words: &str) -> Result<()> {
    ensure!(
        line.matches(words).count() == 1,
        "`{words}` should appear once in: {line}"
    );
    Ok(())
}

fn has_link(ns: &Netns, dev: &str) -> Result<bool> {
    Ok(ns
        .ip(&["-o", "link", "show"])?
        .lines()
        .any(|l| l.split(": ").nth(1).map(|n| n.split('@').next()) == Some(Some(dev))))
}

#[test]
fn errors_are_printed_once_with_the_systems_words() -> Result<()> {
    let ns = Card::namespace()?;
    let dir = TempDir::new("card-tests")?;
    let socket = dir.path().join("s.sock");
    let sock = socket.to_string_lossy().into_owned();
    let missing = dir.path().join("missing");
    let base = ["--netns", ns.name(), "--tap", TAP];

    // The vhost-user socket in a directory that does not exist.
    let bad_sock = missing.join("s.sock").to_string_lossy().into_owned();
    let e = one_error(&[&["--socket", &bad_sock], &base[..]].concat(), 1)?;
    ensure!(
        e == format!(
            "vhost-card: error: cannot listen on {bad_sock}: No such file or directory (os error 2)"
        ),
        "{e}"
    );

    // The control socket there.
    let bad_control = missing.join("c").to_string_lossy().into_owned();
    let e = one_error(
        &[&["--socket", &sock, "--control", &bad_control], &base[..]].concat(),
        1,
    )?;
    ensure!(
        e.ends_with(&format!(
            "cannot create control socket {bad_control}: No such file or directory (os error 2)"
        )),
        "{e}"
    );
    once(&e, "No such file or directory")?;

    // A metrics port someone else holds.
    let busy = TcpListener::bind("127.0.0.1:0")?;
    let addr = busy.local_addr()?.to_string();
    let e = one_error(
        &[&["--socket", &sock, "--metrics-listen", &addr], &base[..]].concat(),
        1,
    )?;
    ensure!(
        e.ends_with(&format!(
            "cannot listen for metrics on {addr}: Address already in use (os error 98)"
        )),
        "{e}"
    );
    once(&e, "Address already in use")?;
    ensure!(!socket.exists(), "the socket was left behind");
    ensure!(!has_link(&ns, TAP)?, "a tap was left behind");

    // A tun device where the tap should be.
    ns.ip(&["tuntap", "add", TAP, "mode", "tun"])?;
    let e = one_error(&[&["--socket", &sock], &base[..]].concat(), 1)?;
    ensure!(
        e.ends_with("'card0' exists and is not a tap (a tun device or another kind of link): choose another --tap name"),
        "{e}"
    );
    // ... and a tap where --link ip wants a tun.
    ns.ip(&["link", "del", TAP])?;
    ns.ip(&["tuntap", "add", TAP, "mode", "tap"])?;
    let e = one_error(
        &[&["--socket", &sock, "--link", "ip"], &base[..]].concat(),
        1,
    )?;
    ensure!(
        e.ends_with(
            "'card0' exists and is not a tun device (a tap or another kind of link), which \
             --link ip needs: choose another --tap name"
        ),
        "{e}"
    );
    ns.ip(&["link", "del", TAP])?;

    // A multi-queue tap with --queues 1, and a single-queue one with --queues 2: the hint says
    // which, not "busy".
    ns.ip(&["tuntap", "add", TAP, "mode", "tap", "multi_queue"])?;
    let e = one_error(
        &[&["--socket", &sock, "--queues", "1"], &base[..]].concat(),
        1,
    )?;
    ensure!(
        e.contains("tap 'card0' is a multi-queue tap and --queues 1 opens a single-queue one")
            && !e.contains("busy"),
        "{e}"
    );
    ns.ip(&["link", "del", TAP])?;
    ns.ip(&["tuntap", "add", TAP, "mode", "tap"])?;
    let e = one_error(
        &[&["--socket", &sock, "--queues", "2"], &base[..]].concat(),
        1,
    )?;
    ensure!(
        e.contains("tap 'card0' is a single-queue tap and --queues 2 needs a multi-queue one"),
        "{e}"
    );
    // Both taps were made by hand: the daemon leaves them.
    ensure!(
        has_link(&ns, TAP)?,
        "the daemon deleted a tap it did not create"
    );

    // A single-queue tap another daemon serves.
    let first = Daemon::start(ns.name(), &[])?;
    let e = one_error(&[&["--socket", &sock], &base[..]].concat(), 1)?;
    ensure!(
        e.ends_with(
            "tap 'card0' is held by another process, still after 3 s (a single-queue tap takes \
             one reader: is another vhost-card or a QEMU using it?)"
        ),
        "{e}"
    );
    drop(first);
    Ok(())
}

#[test]
fn a_bad_flag_leaves_nothing_behind() -> Result<()> {
    let ns = Card::namespace()?;
    let dir = TempDir::new("card-tests")?;
    let socket = dir.path().join("s.sock");
    let control = dir.path().join("c.sock");
    let (sock, ctl) = (
        socket.to_string_lossy().into_owned(),
        control.to_string_lossy().into_owned(),
    );
    let base = ["--socket", &sock, "--control", &ctl, "--keep-tap"];
    let in_ns = ["--netns", ns.name()];
    let busy = TcpListener::bind("127.0.0.1:0")?;
    let addr = busy.local_addr()?.to_string();
    let cases: [(&[&str], i32, &str); 6] = [
        // Checked by the argument parser (usage error, status 2).
        (&["--metrics-listen", "nonsense"], 2, "is not an IP address"),
        (&["--socket-mode", "999"], 2, "is not a file mode"),
        // Checked before anything is created.
        (
            &["--socket-group", "no-such-group-here"],
            1,
            "unknown group",
        ),
        (&["--user", "no-such-user-here"], 1, "unknown user"),
        (&["--tap", "x/y"], 1, "invalid tap name 'x/y'"),
        // Found when binding, before the tap is opened.
        (&["--metrics-listen", &addr], 1, "Address already in use"),
    ];
    let e = one_error(&[&base[..], &["--netns", "no-such-netns-here"]].concat(), 1)?;
    ensure!(
        e.contains("network namespace 'no-such-netns-here' does not exist"),
        "{e}"
    );
    ensure!(
        !socket.exists() && !control.exists(),
        "a socket was left behind"
    );
    for (flags, code, words) in cases {
        let e = one_error(&[&base[..], &in_ns[..], flags].concat(), code)?;
        ensure!(e.contains(words), "{flags:?}: {e}");
        ensure!(!has_link(&ns, TAP)?, "{flags:?} left a tap behind");
        ensure!(
            !socket.exists() && !control.exists(),
            "{flags:?} left a socket behind"
        );
    }
    Ok(())
}

/// A `/dev/net/tun` node with the mode a stock Debian host gives it (0666), for a daemon that
/// runs unprivileged: this machine's is 0600, so the tests bind a node of their own over it in
/// a private mount namespace. Returns the node's path.
fn open_tun_node(dir: &Path) -> Result<String> {
    let node = dir.join("tun");
    rig::process::sh("mknod", &[&node.to_string_lossy(), "c", "10", "200"])?;
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o666))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(node.to_string_lossy().into_owned())
}

/// The wrapper that runs the daemon as `nobody` inside `ns`, with `node` as /dev/net/tun.
fn as_nobody<'a>(node: &'a str, ns: &'a str) -> Vec<&'a str> {
    vec![
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        "mount --bind \"$0\" /dev/net/tun && exec \"$@\"",
        node,
        "ip",
        "netns",
        "exec",
        ns,
        "setpriv",
        "--reuid",
        USER,
        "--regid",
        GROUP,
        "--clear-groups",
        "--",
    ]
}

/// Runs the daemon through `wrapper` (as another user) to its exit: (status code, stderr).
fn run_wrapped(wrapper: &[&str], dir: &Path, args: &[&str]) -> Result<(Option<i32>, String)> {
    let bin = binary_in(dir)?;
    let out = Command::new(wrapper[0])
        .args(&wrapper[1..])
        .arg(&bin)
        .args(args)
        .env("RUNTIME_DIRECTORY", dir)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    ))
}

#[test]
fn runs_unprivileged_on_a_tap_made_for_its_user() -> Result<()> {
    let ns = Card::namespace()?;
    let dir = TempDir::new("card-tests")?;
    let node = open_tun_node(dir.path())?;
    let wrapper = as_nobody(&node, ns.name());
    let run = TempDir::new("card-tests")?;
    std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o777))?;
    let sock = run.path().join("s.sock").to_string_lossy().into_owned();

    // A tap its user may open but not configure: the daemon says what differs and how to fix
    // it, and changes nothing.
    ns.ip(&[
        "tuntap", "add", TAP, "mode", "tap", "user", USER, "vnet_hdr",
    ])?;
    let (code, stderr) = run_wrapped(&wrapper, run.path(), &["--socket", &sock, "--tap", TAP])?;
    ensure!(code == Some(1), "status {code:?}:\n{stderr}");
    ensure!(
        stderr.trim_end()
            == "vhost-card: error: tap 'card0' is not as the card needs it and this process may \
                not change it (no CAP_NET_ADMIN in its namespace): its MTU is 1500, the card \
                needs 65520; it is down; fix it once as root: ip link set card0 mtu 65520 up",
        "{stderr}"
    );
    ensure!(ns.ip(&["link", "show", TAP])?.contains("mtu 1500"));

    // A tap of another user.
    ns.ip(&["tuntap", "add", "card1", "mode", "tap", "user", "root"])?;
    let (code, stderr) = run_wrapped(&wrapper, run.path(), &["--socket", &sock, "--tap", "card1"])?;
    ensure!(
        code == Some(1) && stderr.contains("tap 'card1' belongs to another user"),
        "{stderr}"
    );
    // No tap at all: creating one needs the capability, and the hint makes it for this user.
    let (code, stderr) = run_wrapped(&wrapper, run.path(), &["--socket", &sock, "--tap", "card2"])?;
    ensure!(
        code == Some(1)
            && stderr.contains(&format!(
                "ip tuntap add card2 mode tap user {NOBODY} vnet_hdr"
            )),
        "{stderr}"
    );
    ensure!(!has_link(&ns, "card2")?);

    // Made as needed: the daemon runs as nobody, changes nothing and serves.
    ns.ip(&["link", "set", TAP, "mtu", "65520", "up"])?;
    let daemon = Daemon::start_via(&wrapper, None, &[])?;
    let log = daemon.log();
    ensure!(
        log.contains("tap card0 attached") && log.contains("(already as needed: nothing changed)"),
        "{log}"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid()?))?;
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .context("no Uid line")?;
    ensure!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == NOBODY.to_string()),
        "the daemon runs as {uid_line}"
    );
    let mut card = Card::around(ns, daemon)?;
    let mut dev = card.driver()?;
    card.check_host_to_card(&mut dev, 7600, 1)?;
    card.check_card_to_host(&mut dev, 2)?;
    drop(dev);
    let (status, counters) = card.daemon.stop()?;
    ensure!(status.success(), "{status}");
    ensure!(counters.get("tx_frames") == 1 && counters.get("rx_frames") == 1);
    // It was not the daemon's tap: it stays.
    ensure!(has_link(&card.ns, TAP)?, "the user's tap is gone");
    Ok(())
}

/// `--link ip` unprivileged, as with a tap: a tun made beforehand for the daemon's user, with
/// the MTU and up, needs no capability.
#[test]
fn runs_unprivileged_on_a_tun_made_for_its_user() -> Result<()> {
    let ns = Card::namespace()?;
    let dir = TempDir::new("card-tests")?;
    let node = open_tun_node(dir.path())?;
    let wrapper = as_nobody(&node, ns.name());
    ns.ip(&[
        "tuntap", "add", TAP, "mode", "tun", "user", USER, "vnet_hdr",
    ])?;
    // Creating a tun needs the capability; the hint makes a tun for this user.
    let run = TempDir::new("card-tests")?;
    std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o777))?;
    let sock = run.path().join("s.sock").to_string_lossy().into_owned();
    let (code, stderr) = run_wrapped(
        &wrapper,
        run.path(),
        &["--socket", &sock, "--tap", "card2", "--link", "ip"],
    )?;
    ensure!(
        code == Some(1)
            && stderr.contains(&format!(
                "creating tun 'card2' needs CAP_NET_ADMIN: run as root, or have root create it \
                 once for this user: ip tuntap add card2 mode tun user {NOBODY} vnet_hdr"
            )),
        "{stderr}"
    );
    ns.ip(&["link", "set", TAP, "mtu", "65520", "up"])?;
    let mut daemon = Daemon::start_via(&wrapper, None, &["--link", "ip"])?;
    let log = daemon.log();
    ensure!(
        log.contains("tun card0 attached") && log.contains("(already as needed: nothing changed)"),
        "{log}"
    );
    let (status, _) = daemon.stop()?;
    ensure!(status.success(), "{status}");
    ensure!(has_link(&ns, TAP)?, "the user's tun is gone");
    Ok(())
}

#[test]
fn socket_group_and_mode_are_applied() -> Result<()> {
    let mode_and_group = |extra: &[&str]| -> Result<(u32, u32, u32)> {
        let ns = Card::namespace()?;
        let d = Daemon::start(ns.name(), extra)?;
        let m = std::fs::metadata(d.socket())?;
        Ok((m.mode() & 0o777, m.gid(), m.uid()))
    };
    let (mode, gid, _) = mode_and_group(&["--socket-group", GROUP])?;
    ensure!(mode == 0o660 && gid == NOBODY, "{mode:o} gid {gid}");
    let (mode, gid, _) = mode_and_group(&["--socket-mode", "0600"])?;
    ensure!(mode == 0o600 && gid == 0, "{mode:o} gid {gid}");
    let (mode, gid, _) = mode_and_group(&["--socket-group", "4242", "--socket-mode", "0666"])?;
    ensure!(mode == 0o666 && gid == 4242, "{mode:o} gid {gid}");
    // With --user the socket goes to the user and keeps its group.
    let (mode, gid, uid) = mode_and_group(&["--socket-group", "4242", "--user", USER])?;
    ensure!(
        mode == 0o660 && gid == 4242 && uid == NOBODY,
        "{mode:o} uid {uid} gid {gid}"
    );
    // An inherited socket's access is its creator's business.
    let e = one_error(&["--fd", "3", "--socket-group", GROUP], 2)?;
    ensure!(e.contains("cannot be used with"), "{e}");
    Ok(())
}

#[test]
fn sighup_is_ignored() -> Result<()> {
    let mut card = Card::start(&[])?;
    let pid = i32::try_from(card.daemon.pid()?)?;
    // Two, one after the other (two at once may merge into one pending signal).
    for n in 1..=2 {
        // SAFETY: kill(2) with a valid signal number; the pid is our child.
        ensure!(unsafe { libc::kill(pid, libc::SIGHUP) } == 0);
        card.daemon.wait_log_count(
            "SIGHUP: ignored (the log goes to stderr; nothing to reopen)",
            n,
            Duration::from_secs(5),
        )?;
    }
    card.daemon.check_running()?;
    let mut dev = card.driver()?;
    card.check_host_to_card(&mut dev, 7601, 3)?;
    drop(dev);
    let (status, _) = card.daemon.stop()?;
    ensure!(status.success(), "{status}");
    Ok(())
}

/// Starts the daemon with `RUST_LOG=rust_log` and `flags`, waits for its socket, stops it and
/// returns what it logged.
fn log_with(rust_log: &str, flags: &[&str]) -> Result<String> {
    let ns = Card::namespace()?;
    let dir = TempDir::new("card-tests")?;
    let socket = dir.path().join("s.sock");
    let log = dir.path().join("log");
    let mut child = Command::new(binary()?)
        .arg("--socket")
        .arg(&socket)
        .args(["--netns", ns.name(), "--tap", TAP])
        .args(flags)
        .env("RUST_LOG", rust_log)
        .env("RUNTIME_DIRECTORY", dir.path())
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("no socket:\n{}", std::fs::read_to_string(&log)?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) with a valid signal number on our child.
    unsafe { libc::kill(i32::try_from(child.id())?, libc::SIGTERM) };
    ensure!(child.wait()?.success());
    Ok(std::fs::read_to_string(&log)?)
}

#[test]
fn log_level_flag_wins_over_rust_log() -> Result<()> {
    let quiet = log_with("warn", &[])?;
    ensure!(
        !quiet.contains(" INFO "),
        "RUST_LOG=warn logged INFO:\n{quiet}"
    );
    let info = log_with("warn", &["--log-level", "info"])?;
    ensure!(
        info.contains(" INFO ") && info.contains("listening on"),
        "{info}"
    );
    let debug = log_with("info", &["--log-level", "debug"])?;
    ensure!(
        debug.contains(" DEBUG "),
        "--log-level debug logged no DEBUG:\n{debug}"
    );
    let off = log_with("debug", &["--log-level", "off"])?;
    ensure!(off.trim().is_empty(), "--log-level off logged:\n{off}");
    Ok(())
}

/// SIGTERM takes down the tap the daemon created, also with a control socket (whose thread
/// outlives the serve loop and holds the tap) and after a session: a `card-os down` found it
/// left behind once.
#[test]
fn sigterm_removes_the_tap_the_daemon_created() -> Result<()> {
    let dir = TempDir::new("card-tests")?;
    let control = dir.path().join("c.control");
    let mut card = Card::start(&["--control", &control.to_string_lossy()])?;
    ensure!(has_link(&card.ns, TAP)?, "no tap at start");
    let mut dev = card.driver()?;
    card.check_host_to_card(&mut dev, 7611, 4)?;
    let (status, _) = card.daemon.stop()?;
    ensure!(status.success(), "{status}");
    drop(dev);
    ensure!(
        !has_link(&card.ns, TAP)?,
        "the daemon's tap was left behind"
    );
    Ok(())
}

/// A daemon SIGKILLed while frames crossed: one started again at once takes the persistent tap
/// back and serves. The dead daemon's tap queue stays in its TX io_uring's file table until the
/// kernel's deferred teardown of the ring, so the new daemon waits for it (`attach_patiently`);
/// without that wait it found the single-queue tap "held by another process" (e2e scenario 6
/// caught it once).
#[test]
fn a_daemon_started_right_after_a_sigkill_takes_the_tap_back() -> Result<()> {
    let mut card = Card::start(&[])?;
    let mut dev = card.driver()?;
    let mut traffic = Traffic { rounds: 0 };
    for _ in 0..8 {
        traffic.round(&card, &mut dev)?;
    }
    card.daemon.kill()?;
    drop(dev);
    ensure!(
        has_link(&card.ns, TAP)?,
        "the tap went with the killed daemon"
    );
    card.daemon =
        Daemon::start(card.ns.name(), &[]).context("a daemon started right after the SIGKILL")?;
    let mut dev = card.driver()?;
    let mut traffic = Traffic { rounds: 0 };
    traffic.round(&card, &mut dev)?;
    Ok(())
}
