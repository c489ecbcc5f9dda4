//! `cargo xtask`: automation for the vhost-card workspace.
//!
//! The interesting tasks boot a real VM (unmodified Debian cloud kernel,
//! busybox initramfs, QEMU under KVM when a probe VM boots, TCG otherwise)
//! whose virtio-net NIC is served by the vhost-card daemon: `smoke` checks
//! what the guest sees, `e2e` runs the end-to-end scenarios (traffic, feature
//! toggles, large frames, hot-plug, card restart) and `demo` shows it all to
//! a person. Everything they fetch or build is cached under `target/vm/`.

mod accel;
mod agent;
mod apt;
mod assets;
mod bench;
mod card;
mod cardos;
mod cpio;
mod demo;
mod dist;
mod e2e;
mod features;
mod fuzz;
mod guest;
mod json;
mod libvirt;
mod netns;
mod nsnet;
mod payload;
mod process;
mod qemu;
mod qmp;
mod report;
mod rig;
mod rootfs;
mod schema;
mod smoke;
mod soak;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Automation tasks for vhost-card")]
struct Cli {
    #[command(subcommand)]
    task: Option<Task>,
}

#[derive(Subcommand)]
enum Task {
    /// Install the host packages, fetch the Debian cloud kernel and build the
    /// base initramfs (all cached under target/vm/).
    VmAssets(assets::Options),
    /// Boot a VM against the vhost-card daemon and show what a person wants
    /// to see: negotiated features, MTU, pings and transfer rates both ways.
    Demo(demo::Options),
    /// Boot a VM against the daemon, check MTU, driver and pings both ways;
    /// exits non-zero on FAIL.
    Smoke(smoke::Options),
    /// The end-to-end scenarios (binding, traffic, feature toggles, large
    /// frames, hot-plug, card restart); one PASS/FAIL line each, exits
    /// non-zero if any fails. With --vduse: the card as a VDUSE device of a
    /// VM's own kernel (Debian 13) instead.
    E2e(e2e::Options),
    /// Runs the cargo-fuzz targets in fuzz/ for a time budget (--smoke: 20 s each).
    Fuzz(fuzz::Options),
    /// Data-path throughput without a VM: vhost-card against DPDK's vhost+tap pair, the
    /// raw tap and memcpy, driven by card-load and dpdk-testpmd (--smoke: short; --vm: TCP
    /// through a guest). Table, JSON and PNG in target/bench/.
    Bench(bench::Options),
    /// Sustained traffic both ways (mixed frame sizes, periodic reconnects) through vhost-card
    /// for --minutes N (default 10): RSS, descriptors, threads and drops by reason every
    /// interval; fails on growth after warm-up or unexplained drops. Results in target/soak/.
    Soak(soak::Options),
    /// Runs inside the test VM (the guest's helper binary).
    #[command(subcommand, hide = true)]
    Guest(guest::Helper),
    /// The card's network node from card-os/card.toml: up, down, status, reload.
    Card(cardos::Options),
    /// The card-os end-to-end scenarios (NAT, proxy, fragments, IPsec, firewall, reload, the
    /// networkd guest).
    CardosE2e(e2e::cardos::Options),
    /// Runs inside the test VM (the card-os scenarios' guest helper).
    #[command(subcommand, hide = true)]
    CardGuest(cardos::guest::Helper),
    /// The host install in target/dist/ (release binary, man pages, shell completions,
    /// 50-vhost-card.json, systemd units, libvirt XML), checked; --install puts it in place.
    Dist(dist::Options),
    /// The libvirt domain in host-config/libvirt/ under libvirt from apt: define, start,
    /// traffic both ways with the card's counters, undefine.
    Libvirt(libvirt::Options),
    /// Every test, as CI runs them: `cargo test --workspace` (unit tests and the in-process
    /// vhost-user frontend against the real daemon), then the VM smoke test and `e2e`.
    Test(smoke::Options),
}

fn main() {
    let cli = Cli::parse();
    let Some(task) = cli.task else {
        // No task given: list them.
        Cli::command().print_help().ok();
        return;
    };
    install_signal_handlers();
    let result = match task {
        Task::VmAssets(opts) => assets::ensure(&opts).map(|_| ()),
        Task::Demo(opts) => demo::run(&opts),
        Task::Smoke(opts) => smoke::run(&opts),
        Task::E2e(opts) => e2e::run(&opts),
        Task::Fuzz(opts) => fuzz::run(&opts),
        Task::Bench(opts) => bench::run(&opts),
        Task::Soak(opts) => soak::run(&opts),
        Task::Guest(cmd) => guest::helper(&cmd),
        Task::Card(opts) => cardos::run_task(&opts),
        Task::CardosE2e(opts) => e2e::cardos::run(&opts),
        Task::CardGuest(cmd) => cardos::guest::helper(&cmd),
        Task::Dist(opts) => dist::run(&opts),
        Task::Libvirt(opts) => libvirt::run(&opts),
        Task::Test(opts) => run_tests(&opts),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

/// `cargo xtask test`: host packages first (the tests use ip, ethtool and QEMU), then the
/// cargo test suites, then the VM smoke test and the e2e suite.
fn run_tests(opts: &smoke::Options) -> Result<()> {
    assets::ensure(&assets::Options { refresh: false })?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["test", "--workspace"])
        .current_dir(workspace_root())
        .status()?;
    if !status.success() {
        bail!("cargo test --workspace failed ({status})");
    }
    check_interrupted()?;
    smoke::run(opts)?;
    check_interrupted()?;
    // The e2e suite with its defaults, as `cargo xtask e2e` runs it.
    #[derive(Parser)]
    struct E2eDefaults {
        #[command(flatten)]
        opts: e2e::Options,
    }
    e2e::run(&E2eDefaults::parse_from(["e2e"]).opts)?;
    check_interrupted()?;
    // The card as a VDUSE device of a bare-metal host's own kernel.
    e2e::run(&E2eDefaults::parse_from(["e2e", "--vduse", "--no-build"]).opts)?;
    check_interrupted()?;
    // The card-os scenarios, as `cargo xtask cardos-e2e` runs them.
    #[derive(Parser)]
    struct CardosDefaults {
        #[command(flatten)]
        opts: e2e::cardos::Options,
    }
    e2e::cardos::run(&CardosDefaults::parse_from(["cardos-e2e"]).opts)
}

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

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// On Ctrl-C (or SIGTERM/SIGHUP) only raise a flag: the wait loops notice it
/// and return an error, so every RAII guard runs and nothing is left behind.
fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `on_signal` is an `extern "C"` function that only stores to
        // an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Fails once the user asked us to stop.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}
