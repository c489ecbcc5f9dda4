//! systemd units as the tests check them: `systemd-analyze verify` on instances of template
//! units whose binaries point into the build.

use anyhow::{ensure, Result};

use crate::process::TempDir;

/// Writes `units` (file name, text) into a scratch directory and runs `systemd-analyze verify
/// --man=no` on `instances` of them (`vhost-card@card.service`); fails on any complaint.
pub fn verify(units: &[(&str, String)], instances: &[&str]) -> Result<()> {
    let dir = TempDir::new("rig-units")?;
    for (name, text) in units {
        std::fs::write(dir.path().join(name), text)?;
    }
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(instances.iter().map(|i| dir.path().join(i)))
        .output()?;
    let msg = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && msg.trim().is_empty(),
        "systemd-analyze verify {}:\n{msg}",
        instances.join(" ")
    );
    Ok(())
}
