//! Shared harness for the integration tests.
//!
//! The tests drive the real `vhost-card` binary the way QEMU would: a vhost-user frontend over a
//! Unix socket, guest memory in a memfd, split virtqueues written from the driver's side, and
//! the card's end of the link (a tap) in a network namespace created for each test.
//!
//! * [`netns`]: RAII network namespaces, commands and sockets inside them;
//! * [`daemon`]: building, starting and stopping the daemon, reading its log and counters;
//! * [`vring`]: guest memory (memfd) and the driver side of a split virtqueue;
//! * [`frontend`]: the vhost-user control plane (the `vhost` crate's frontend plus raw messages);
//! * [`netdev`]: a minimal virtio-net driver on top: vnet headers, TX chains, RX buffers;
//! * [`packet`]: frames, checksums and vnet headers;
//! * [`card`]: one test's whole set-up (namespaces, addresses, daemon) in one value.

pub mod card;
pub mod daemon;
pub mod fds;
pub mod frontend;
pub mod netdev;
pub mod netns;
pub mod packet;
pub mod vring;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// Fails with a clear message unless the tests run as root (namespaces, taps and veths need it).
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "the card-tests integration tests need root (network namespaces, tap and veth \
             devices); run `sudo -E cargo test -p card-tests` (euid is {euid})"
        );
    }
    Ok(())
}

/// A name unique to this process and call: `<prefix><pid>x<counter>`.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

/// Runs a command to completion; fails with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A directory removed (with its contents) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("card-tests-"));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
