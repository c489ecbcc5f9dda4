//! Where things are in the workspace, and the one way to build its binaries.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Cargo's target directory for the workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Where the VM assets and logs live.
pub fn vm_dir() -> PathBuf {
    target_dir().join("vm")
}

/// `cargo build [--release] ARGS` in the workspace (`$CARGO`, as cargo runs us); returns the
/// profile's directory (target/release or target/debug).
pub fn cargo_build(release: bool, args: &[&str]) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    cmd.args(args).current_dir(workspace_root());
    println!(
        "rig: cargo build{} {}",
        if release { " --release" } else { "" },
        args.join(" ")
    );
    let status = cmd
        .status()
        .with_context(|| format!("running {} build", cargo.to_string_lossy()))?;
    crate::interrupt::check_interrupted()?;
    if !status.success() {
        bail!("cargo build {} failed ({status})", args.join(" "));
    }
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}
