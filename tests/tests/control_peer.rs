//! The control socket serves root and the user the daemon runs as, and nobody else, whatever the
//! socket file's mode lets connect: the daemon checks the peer's credentials (SO_PEERCRED) on
//! every connection, since the same socket will hand a running session over (issue 12).

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use card_tests::card::Card;
use card_tests::daemon::{binary, stats_cmd};
use card_tests::TempDir;

#[test]
fn only_root_and_the_daemons_user_may_use_the_control_socket() -> Result<()> {
    let dir = TempDir::new("control-peer")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let control = dir.path().join("card.control");
    let mut card = Card::start(&["--control", &control.to_string_lossy()])?;
    // A careless mode lets everyone connect: the daemon's own check must refuse them.
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o777))?;

    let out = stats_cmd(&control, &["--json"])?;
    ensure!(out.contains("\"pairs\""), "root got: {out}");

    let nobody = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(binary()?)
        .arg("stats")
        .arg("--control")
        .arg(&control)
        .output()?;
    let stdout = String::from_utf8_lossy(&nobody.stdout);
    ensure!(
        !nobody.status.success() && !stdout.contains("pairs"),
        "uid 65534 read the control socket: {stdout}"
    );
    card.daemon
        .wait_log("control socket: refused", Duration::from_secs(5))?;
    ensure!(
        card.daemon
            .log()
            .contains("uid 65534: only root and uid 0 may use it"),
        "the refusal does not name the peer:\n{}",
        card.daemon.log()
    );

    // Root still gets its answer after a refusal.
    let out = stats_cmd(&control, &["--json"])?;
    ensure!(out.contains("\"pairs\""), "root got: {out}");
    Ok(())
}

/// The daemon's own user may read the snapshot, but only root may ask for the session: it
/// carries the guest's memory, the frontend's connection and the tap, and the daemon's user
/// (`nobody`, say) is often shared with other services.
#[test]
fn only_root_may_ask_for_a_handover() -> Result<()> {
    let dir = TempDir::new("control-handover")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let control = dir.path().join("card.control");
    let mut card = Card::start(&["--control", &control.to_string_lossy(), "--user", "65534"])?;
    card.daemon
        .wait_log("control socket on", Duration::from_secs(5))?;

    // The daemon's own uid asks for a handover (and would start `vhost-card --version` as the
    // new process): it gets the snapshot, and the daemon does not read its request.
    let upgrade = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(binary()?)
        .args(["upgrade", "--control"])
        .arg(&control)
        .args(["--", "--version"])
        .output()?;
    ensure!(
        !upgrade.status.success(),
        "uid 65534 upgraded the daemon: {}",
        String::from_utf8_lossy(&upgrade.stdout)
    );
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        !card.daemon.log().contains("handover requested"),
        "the daemon took a handover request from uid 65534:\n{}",
        card.daemon.log()
    );
    card.daemon.check_running()?;
    let out = stats_cmd(&control, &["--json"])?;
    ensure!(out.contains("\"pairs\""), "root got: {out}");
    Ok(())
}
