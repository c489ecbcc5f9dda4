//! `cargo xtask`: automation for the vhost-card workspace.
//!
//! The interesting tasks boot a real VM (unmodified Debian cloud kernel,
//! busybox initramfs, QEMU under KVM when a probe VM boots, TCG otherwise)
//! whose virtio-net NIC is served by the vhost-card daemon: `smoke` checks
//! what the guest sees, `e2e` runs the end-to-end scenarios (traffic, feature
//! toggles, large frames, hot-plug, card restart) and `demo` shows it all to
//! a person. Everything they fetch or build is cached under `target/vm/`.
//!
//! What the tasks share with the integration tests (the VM, the daemon, namespaces, processes)
//! is the `rig` crate; the card's node is the `card-os` crate. Nothing here is product code.

mod bench;
mod cards;
mod demo;
mod dist;
mod e2e;
mod fuzz;
mod guest;
mod libvirt;
mod schema;
mod smoke;
mod soak;

use anyhow::{bail, Result};
use clap::{CommandFactory, Parser, Subcommand};
// The shared test rig (rig/): daemon launch, namespaces, processes, VMs, QMP, the guest agent.
// Its modules are re-exported at the root so the e2e scenarios name them as they always have
// (`crate::qemu::Vm`, `crate::rig::Rig`, `crate::workspace_root()`).
#[allow(clippy::single_component_path_imports)]
use ::rig;
pub use rig::interrupt::check_interrupted;
use rig::interrupt::install_signal_handlers;
pub use rig::paths::{target_dir, vm_dir, workspace_root};
use rig::{
    accel, apt, assets, card, cpio, features, netns, nsnet, payload, process, qemu, qmp, report,
    rootfs,
}; // `crate::rig::{Env, Rig, ...}`

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
    /// frames, hot-plug, card restart, multiqueue, device reset, fewer pairs,
    /// checksum honesty, IP-only link; live migration with --only 12); one
    /// PASS/FAIL line each, exits non-zero if any fails.
    /// With --vduse: the card as a VDUSE device of a VM's own kernel (Debian
    /// 13) instead.
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
    /// The card-os end-to-end scenarios (NAT, proxy, fragments, IPsec, firewall, reload, the
    /// networkd and NetworkManager guests, the installed product alone).
    CardosE2e(e2e::cardos::Options),
    /// The host install in target/dist/ (vhost-card and card-os, man pages, shell
    /// completions, 50-vhost-card.json, systemd units, the example card, card-os's templates,
    /// libvirt XML), checked; --install puts it in place.
    Dist(dist::Options),
    /// Four cards from the installed template units under systemd as PID 1 (a debootstrapped
    /// Debian 12 booted by systemd-nspawn): one file per card, four frontends, four metrics
    /// endpoints, each with its own settings and values.
    Cards(cards::Options),
    /// The libvirt domain in host-config/libvirt/ under libvirt from apt: define, start,
    /// traffic both ways with the card's counters, undefine.
    Libvirt(libvirt::Options),
    /// Every test, as CI runs them: `cargo test --workspace` (unit tests and the in-process
    /// vhost-user frontend against the real daemon, card-os against the real programs), then
    /// the VM smoke test, `e2e`, `cardos-e2e` and `cards`.
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
        Task::CardosE2e(opts) => e2e::cardos::run(&opts),
        Task::Dist(opts) => dist::run(&opts),
        Task::Libvirt(opts) => libvirt::run(&opts),
        Task::Cards(opts) => cards::run(&opts),
        Task::Test(opts) => run_tests(&opts),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

/// `cargo xtask test`: host packages first (the tests use ip, ethtool and QEMU), then the
/// cargo test suites, then the VM smoke test, the e2e suites and the four cards under systemd.
fn run_tests(opts: &smoke::Options) -> Result<()> {
    assets::ensure(&assets::Options { refresh: false })?;
    // card-os's tests (in `cargo test --workspace`) run its programs: nft, nginx, strongSwan.
    apt::install(&card_os::prereq::all_packages())?;
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
    e2e::cardos::run(&CardosDefaults::parse_from(["cardos-e2e"]).opts)?;
    check_interrupted()?;
    // Four cards from the installed units under systemd as PID 1.
    cards::run(&cards::Options { no_build: false })
}
