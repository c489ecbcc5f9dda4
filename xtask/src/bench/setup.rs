//! What a bench run needs on a fresh machine: DPDK's testpmd and the plot's font from apt, 2 MiB
//! hugepages for the two DPDK processes, and release builds of the daemon and the load generator.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};

use rig::process::sh;

pub struct Env {
    /// Directory holding `vhost-card` and `card-load`.
    pub bin: PathBuf,
    /// Hugepages are there for DPDK (otherwise it runs with --no-huge, slower).
    pub huge: bool,
}

/// 2 MiB pages wanted: two DPDK processes with `-m 512` each, plus room.
const HUGEPAGES: u64 = 600;

pub fn prepare(dpdk: bool) -> Result<Env> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask bench needs root (network namespaces, taps, hugepages)");
    }
    let mut want = vec![
        // The plot's font (bench/plot.rs), found by path, not on PATH.
        (super::plot::FONT, "fonts-dejavu-core"),
        ("ip", "iproute2"),
        ("stdbuf", "coreutils"),
    ];
    if dpdk {
        // Debian 12 ships dpdk-testpmd in dpdk-dev (the drivers are in dpdk).
        want.push(("dpdk-testpmd", "dpdk-dev"));
    }
    let missing: Vec<&str> = want
        .iter()
        .filter(|(bin, _)| !on_path(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        println!("bench: installing {}", missing.join(" "));
        let apt = |args: &[&str]| {
            let st = Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()?;
            if !st.success() {
                bail!("apt-get {} failed", args.join(" "));
            }
            Ok(())
        };
        apt(&["update", "-q"])?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&missing);
        apt(&args)?;
    }
    let huge = dpdk && hugepages();
    if dpdk && !huge {
        println!("bench: no 2 MiB hugepages; DPDK runs with --no-huge (slower)");
    }
    println!("bench: building vhost-card and card-load (release)");
    rig::paths::cargo_build(true, super::BINARIES)?;
    Ok(Env {
        bin: rig::paths::target_dir().join("release"),
        huge,
    })
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Reserves 2 MiB pages and mounts hugetlbfs on /dev/hugepages if needed.
fn hugepages() -> bool {
    let path = "/proc/sys/vm/nr_hugepages";
    let have: u64 = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if have < HUGEPAGES {
        let _ = std::fs::write(path, HUGEPAGES.to_string());
    }
    let free: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"));
    if !mounted {
        let _ = std::fs::create_dir_all("/dev/hugepages");
        if sh("mount", &["-t", "hugetlbfs", "nodev", "/dev/hugepages"]).is_err() {
            return false;
        }
    }
    free >= 512
}
