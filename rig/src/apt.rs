//! Installing Debian packages for the rig and the tasks, without letting their
//! maintainer scripts start services (libvirtd would otherwise start in the host's network
//! namespace during the install).

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::process::run;

/// Whether dpkg has `package` installed.
pub fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .output()
        .is_ok_and(|out| out.stdout == b"installed")
}

/// `apt-get` without questions.
pub fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// `policy-rc.d` that forbids starting services, present while it lives (unless the system
/// already has one, which is left alone).
struct NoServiceStarts(bool);

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl NoServiceStarts {
    fn new() -> Result<Self> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(NoServiceStarts(false));
        }
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# Written by cargo xtask while it installs packages.\nexit 101\n",
        )?;
        std::fs::set_permissions(
            POLICY_RC_D,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        Ok(NoServiceStarts(true))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.0 {
            std::fs::remove_file(POLICY_RC_D).ok();
        }
    }
}

/// Installs whichever of `packages` are missing (no recommends, no service starts).
pub fn install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: apt-get install {}", missing.join(" "));
    let _guard = NoServiceStarts::new()?;
    let install = || {
        run(apt_get()
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))
    };
    if install().is_err() {
        run(apt_get().args(["update", "-q"]))?;
        install()?;
    }
    Ok(())
}
