//! `cargo xtask e2e`: the card against an unmodified Debian kernel in a VM,
//! end to end, one PASS/FAIL line per scenario:
//!
//! 1. binding: virtio_net binds, reads the card's MTU, and its feature bits
//!    are the card's offer as far as QEMU passes it through;
//! 2. traffic: pings and 64 MiB of TCP each way with equal SHA-256;
//! 3. toggles: each offload switched off on the daemon's command line, at
//!    MTU 1500 and 65520: the bits follow and traffic still passes;
//! 4. large frames: one 65000-byte UDP datagram each way, as one frame;
//! 5. hot-plug: the card plugged into a running VM through QMP, used, and
//!    unplugged cleanly;
//! 6. restart: the daemon SIGKILLed mid-transfer and started again; QEMU
//!    reconnects and the transfer completes;
//! 7. multiqueue: `--queues 2` with a two-vCPU guest: both pairs up, a TCP
//!    stream from each vCPU on its own TX queue, sha256 equal;
//! 8. device reset: the guest's driver unbound and bound again twice (as a
//!    driver reload or a reboot resets the device) on the same vhost-user
//!    session; traffic both ways after each;
//! 9. fewer pairs: `--queues 2` with a one-CPU guest that enables one pair,
//!    then two, then one again: every card→guest flow arrives in each state;
//! 10. checksum honesty, with `--rx-csum verify`, `complete` and `passthrough`:
//!     N bad and N good datagrams from the card to a closed port show up in the
//!     guest's InCsumErrors and NoPorts; a card→guest transfer's frames counted
//!     by how they went up (no NEEDS_CSUM frame with `complete`);
//! 11. the IP-only link (`--link ip`) at MTU 65520 and 1500: binding, pings
//!     both ways over IPv4 and IPv6, the payload each way, honesty;
//! 12. migration: the VM live-migrated between two QEMU processes, each with
//!     its own daemon and tap on one bridge in the card namespace, while TCP
//!     runs both ways; there and back, then once with `--queues 2`; the
//!     destination resumed with `cont` after `completed` (see `migration.rs`).
//! 13. handover: `vhost-card upgrade` hands the session to a new process 20 times, one every
//!     100 ms, during 64 MiB of TCP each way; sha256 equal, no carrier change, no reconnect,
//!     longest gap between frames on the tap at most 50 ms (see `handover.rs`).
//! 14. crash: the daemon SIGKILLed half way through 64 MiB of TCP each way, under systemd as
//!     PID 1 in a container with QEMU inside (the installed units, the session kept in
//!     systemd's fd store; sha256 equal, no carrier change, no reconnect, longest gap between
//!     frames on the tap at most 200 ms) and as the plain daemon on the host restarted by the
//!     harness (QEMU's `reconnect=1`; sha256 equal, gap reported); see `crash.rs`.
//!
//! Scenarios 1, 2, 4, 6 and 8 share one VM; 3 boots one per configuration, 5,
//! 7, 9, 12 and 13 their own, 14 a container and a VM, 10 one per `--rx-csum` mode and 11
//! one per MTU. Logs:
//! target/vm/logs/e2e/<rig>/.

pub mod cardos;
mod crash;
mod handover;
mod honesty;
mod hotplug;
mod installed;
mod iplink;
mod migration;
mod multiqueue;
mod networkd;
mod shared_vm;
mod toggles;
pub mod vduse;

use std::time::Instant;

use anyhow::{bail, Result};

use crate::accel::Accel;
use crate::card::CardConfig;
use crate::rig::{Env, Plug, Rig};

pub const MIB: usize = 1 << 20;
pub const DEFAULT_MTU: u32 = 65520;

#[derive(clap::Args)]
pub struct Options {
    /// Run only these scenarios (numbers 1-14, comma-separated; without it all of them but
    /// OPT_IN's;
    /// with --vduse its checks 1-10). Scenario 12's diagnostics, from the environment:
    /// VHC_MIGRATION_AUTOSTART=1 lets the destination run by itself (no -S and cont),
    /// VHC_MIGRATION_QEMU=trixie runs both sides on Debian 13's QEMU (debootstrapped once).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<u32>,
    /// MiB sent each way in scenarios 2, 6, 12, 13 and 14.
    #[arg(long, default_value_t = 64)]
    pub mib: usize,
    /// MiB sent each way per configuration of the toggle matrix (3), in the
    /// hot-plug scenario (5) and per stream in the multiqueue scenario (7);
    /// default: as --mib.
    #[arg(long)]
    pub matrix_mib: Option<usize>,
    /// Accelerator; by default a probe VM tries KVM and falls back to TCG.
    #[arg(long, value_enum)]
    pub accel: Option<Accel>,
    /// Use target/release/vhost-card as it is instead of building it first.
    #[arg(long)]
    pub no_build: bool,
    /// Echo the guest consoles (they are in target/vm/logs/e2e/ anyway).
    #[arg(long)]
    pub verbose: bool,
    /// Instead: the card as a VDUSE device of a bare-metal host's own kernel (a TCG VM with
    /// Debian 13's stock kernel; see e2e/vduse.rs): binding, pings, TCP, checksum honesty,
    /// toggles, stop/restart.
    #[arg(long)]
    pub vduse: bool,
}

pub fn matrix_mib(opts: &Options) -> usize {
    opts.matrix_mib.unwrap_or(opts.mib)
}

/// One scenario's verdict line.
pub struct Line {
    pub number: u32,
    pub pass: bool,
    pub text: String,
}

impl Line {
    pub fn render(&self) -> String {
        let tag = if self.pass { "PASS" } else { "FAIL" };
        format!("{tag} {} {}", self.number, self.text)
    }
}

/// The scenarios' progress (a bar on a terminal, a line per scenario otherwise) and their
/// verdict lines.
pub struct Runner {
    progress: rig::progress::Progress,
    lines: Vec<Line>,
}

impl Runner {
    /// Step `name` starts; it usually takes `seconds` under TCG.
    pub fn start(&mut self, name: &str, seconds: u64) {
        self.progress.start(name, seconds);
    }

    /// Scenario `number` starts (its name and weight from [`SCENARIOS`]).
    pub fn scenario(&mut self, number: u32) {
        let (name, seconds) = SCENARIOS
            .iter()
            .find(|(n, _, _)| *n == number)
            .map_or(("", 60), |(_, name, s)| (*name, *s));
        self.start(&format!("scenario {number} {name}"), seconds);
    }

    /// A scenario's verdict, printed as it comes.
    pub fn record(&mut self, line: Line) {
        self.progress.println(line.render());
        self.lines.push(line);
    }

    /// A line of the run's own (above the bar on a terminal).
    pub fn say(&self, text: impl AsRef<str>) {
        self.progress.println(text);
    }
}

/// Seconds the main VM usually takes to boot under TCG.
const MAIN_BOOT: u64 = 8;

/// Scenario numbers, names and the seconds each usually takes under TCG (the progress
/// estimate, from a run on the 2-core CI machine; scenarios 1, 2, 4, 6 and 8 share the main
/// VM, whose boot is a step of its own).
const SCENARIOS: [(u32, &str, u64); 14] = [
    (1, "binding", 2),
    (2, "traffic", 25),
    (3, "toggles", 240),
    (4, "large frames", 5),
    (5, "hotplug", 25),
    (6, "restart", 10),
    (7, "multiqueue", 30),
    (8, "device reset", 30),
    (9, "fewer pairs", 60),
    // Three VMs, one per --rx-csum mode (47 to 112 s on this machine, depending on its load).
    (10, "checksum honesty", 70),
    // Two VMs (MTU 65520 and 1500), 64 MiB each way in each (about 124 s).
    (11, "IP-only link", 120),
    (12, "migration", 130),
    // One VM, 64 MiB each way with 20 handovers.
    (13, "handover", 60),
    // A container with QEMU and a VM in it, then a VM on the host; 64 MiB each way in each
    // (54 to 75 s in all on this machine once the tree is cached).
    (14, "crash", 60),
];

/// Scenarios run only when `--only` names them (none today).
const OPT_IN: &[u32] = &[];

pub fn run(opts: &Options) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("e2e needs root (network namespaces, tap devices)");
    }
    if opts.vduse {
        return vduse::run(opts);
    }
    if let Some(n) = opts
        .only
        .iter()
        .find(|n| !SCENARIOS.iter().any(|(s, _, _)| s == *n))
    {
        let numbers: Vec<u32> = SCENARIOS.iter().map(|(s, _, _)| *s).collect();
        bail!("no scenario {n}: scenarios are numbered {numbers:?}");
    }
    let wanted = |n: u32| {
        if opts.only.is_empty() {
            !OPT_IN.contains(&n)
        } else {
            opts.only.contains(&n)
        }
    };
    let t0 = Instant::now();
    let logs = crate::vm_dir().join("logs/e2e");
    let env = Env::prepare(
        opts.mib * MIB,
        !opts.no_build,
        opts.accel,
        &logs,
        opts.verbose,
    )?;
    println!(
        "e2e: {} under {} ({}); payload {} MiB, sha256 {}",
        env.kernel_package,
        env.accel.name(),
        env.accel_why,
        opts.mib,
        env.payload.sha256
    );
    println!("e2e: logs in {}", logs.display());

    let planned: Vec<_> = SCENARIOS.iter().filter(|(n, _, _)| wanted(*n)).collect();
    let main_vm = [1, 2, 4, 6, 8].into_iter().any(wanted);
    let mut runner = Runner {
        progress: rig::progress::Progress::new(
            "e2e",
            planned.len() + usize::from(main_vm),
            planned.iter().map(|(_, _, s)| s).sum::<u64>() + if main_vm { MAIN_BOOT } else { 0 },
        ),
        lines: Vec::new(),
    };

    if main_vm {
        main_rig(&env, opts, &wanted, &mut runner);
    }
    crate::check_interrupted()?;
    if wanted(3) {
        runner.scenario(3);
        let line = toggles::run(&env, opts);
        runner.record(line);
    }
    crate::check_interrupted()?;
    if wanted(5) {
        runner.scenario(5);
        runner.record(verdict(5, "hotplug", hotplug::run(&env, opts)));
    }
    crate::check_interrupted()?;
    if wanted(7) {
        runner.scenario(7);
        runner.record(verdict(7, "multiqueue", multiqueue::run(&env, opts)));
    }
    crate::check_interrupted()?;
    if wanted(9) {
        runner.scenario(9);
        runner.record(verdict(
            9,
            "fewer pairs",
            multiqueue::fewer_pairs(&env, opts),
        ));
    }

    crate::check_interrupted()?;
    if wanted(10) {
        runner.scenario(10);
        runner.record(verdict(10, "checksum honesty", honesty::run(&env, opts)));
    }
    crate::check_interrupted()?;
    if wanted(11) {
        runner.scenario(11);
        runner.record(verdict(11, "IP-only link", iplink::run(&env, opts)));
    }
    crate::check_interrupted()?;
    if wanted(12) {
        runner.scenario(12);
        runner.record(verdict(12, "migration", migration::run(&env, opts)));
    }
    crate::check_interrupted()?;
    if wanted(13) {
        runner.scenario(13);
        runner.record(verdict(13, "handover", handover::run(&env, opts)));
    }
    crate::check_interrupted()?;
    if wanted(14) {
        runner.scenario(14);
        runner.record(verdict(14, "crash", crash::run(&env, opts)));
    }

    runner.progress.finish();
    summary(
        &format!(
            "cargo xtask e2e: {} under {}, {:.0} s",
            env.kernel_package,
            env.accel.name(),
            t0.elapsed().as_secs_f64()
        ),
        &mut runner.lines,
        "e2e scenario(s)",
    )
}

/// The closing block: the lines in order under `title`, the count, an error if any failed.
pub fn summary(title: &str, lines: &mut [Line], what: &str) -> Result<()> {
    lines.sort_by_key(|l| l.number);
    println!();
    println!("==== {title} ====");
    for line in lines.iter() {
        println!("{}", line.render());
    }
    let failed = lines.iter().filter(|l| !l.pass).count();
    println!("{} passed, {failed} failed", lines.len() - failed);
    if failed > 0 {
        bail!("{failed} {what} failed");
    }
    Ok(())
}

/// A scenario's result as its line: Err becomes FAIL with the error.
pub fn verdict(number: u32, name: &str, result: Result<(bool, String)>) -> Line {
    match result {
        Ok((pass, text)) => Line {
            number,
            pass,
            text: format!("{name}: {text}"),
        },
        Err(err) => Line {
            number,
            pass: false,
            text: format!("{name}: {err:#}"),
        },
    }
}

/// A scenario run on the shared VM.
type Scenario = fn(&mut Rig, &Env, &Options) -> Result<(bool, String)>;

/// Scenarios 1, 2, 4, 6 and 8 on one VM with the default card.
fn main_rig(env: &Env, opts: &Options, wanted: &dyn Fn(u32) -> bool, runner: &mut Runner) {
    let cfg = CardConfig {
        mtu: DEFAULT_MTU,
        disable: String::new(),
        queues: 1,
        args: Vec::new(),
    };
    runner.start("main VM boot", MAIN_BOOT);
    let mut rig = match Rig::boot(env, "main", &cfg, Plug::Boot) {
        Ok(rig) => rig,
        Err(err) => {
            let text = format!(
                "boot failed: {err:#} (logs in {})",
                env.logs.join("main").display()
            );
            for (number, name) in [
                (1, "binding"),
                (2, "traffic"),
                (4, "large frames"),
                (6, "restart"),
                (8, "device reset"),
            ] {
                if wanted(number) {
                    runner.record(Line {
                        number,
                        pass: false,
                        text: format!("{name}: {text}"),
                    });
                }
            }
            return;
        }
    };
    runner.say(format!(
        "e2e: main VM up in {:.1} s",
        rig.boot.as_secs_f64()
    ));
    let mut last = 1;
    let scenarios: [(u32, &str, Scenario); 5] = [
        (1, "binding", shared_vm::binding),
        (2, "traffic", shared_vm::traffic),
        (4, "large frames", shared_vm::large_frames),
        (6, "restart", shared_vm::restart),
        (8, "device reset", shared_vm::driver_reset),
    ];
    for (number, name, scenario) in scenarios {
        if !wanted(number) {
            continue;
        }
        runner.scenario(number);
        let result = scenario(&mut rig, env, opts);
        let mut line = verdict(number, name, result);
        if !line.pass {
            line.text = format!("{}\n       {}", line.text, rig.evidence());
        }
        runner.record(line);
        last = number;
        if crate::check_interrupted().is_err() {
            break;
        }
    }
    if let Err(err) = rig.vm.shutdown() {
        eprintln!("e2e: main VM: {err:#}");
    }
    let (stopped, ok) = rig
        .card
        .stop()
        .unwrap_or_else(|e| (format!("{e:#}"), false));
    if !ok {
        runner.record(Line {
            number: last,
            pass: false,
            text: format!(
                "daemon after the main VM: {stopped}\n       {}",
                rig.evidence()
            ),
        });
    }
}
