//! `cargo xtask bench --vm`: TCP through a real guest (the stock Debian kernel that `xtask e2e`
//! boots), both directions, with the guest's NIC served by vhost-card or by QEMU's own tap
//! backend (`-netdev tap,vhost=off`), the same NIC options otherwise (`vectors=0`), at MTU 65520
//! and 1500. Backends alternate, figures are medians. Under TCG this mostly measures QEMU's CPU
//! emulation; the ratio is what counts.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

use super::Options;
use crate::card::{self, CardConfig};
use crate::netns::Netns;
use crate::process::TempDir;
use crate::qemu::{Nic, Vm, VmConfig};
use crate::rig::{Env, Plug, Rig};

const MIB: usize = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Nicb {
    Card,
    QemuTap,
}

impl Nicb {
    fn name(self) -> &'static str {
        match self {
            Nicb::Card => "vhost-card",
            Nicb::QemuTap => "QEMU tap (vhost=off)",
        }
    }
}

/// MB/s guest to card and card to guest, or why not.
type Run = Result<(f64, f64)>;

pub fn run(opts: &Options, out: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask bench --vm needs root");
    }
    let mib = if opts.smoke { 8 } else { 32 };
    let reps = if opts.smoke { 1 } else { opts.reps.max(1) };
    let logs = out.join("vm-logs");
    println!("bench --vm: preparing (assets, kernel, initramfs, daemon build)");
    let env = Env::prepare(mib * MIB, true, None, &logs, false)?;
    println!(
        "bench --vm: {} under {} ({}), {mib} MiB each way per run, {reps} run(s)",
        env.kernel_package,
        env.accel.name(),
        env.accel_why
    );
    let mut table = String::new();
    table.push_str("| MTU | direction | vhost-card MB/s | QEMU tap MB/s | ratio |\n|---:|---|---:|---:|---:|\n");
    let mut targets = String::new();
    for mtu in [65520u32, 1500] {
        let mut card = (Vec::new(), Vec::new());
        let mut tap = (Vec::new(), Vec::new());
        for rep in 0..reps {
            for b in [Nicb::Card, Nicb::QemuTap] {
                rig::interrupt::check_interrupted()?;
                let r = one(
                    &env,
                    b,
                    mtu,
                    mib * MIB,
                    &format!("vm-{mtu}-{rep}-{}", b as u8),
                );
                match &r {
                    Ok((up, down)) => {
                        println!(
                            "  MTU {mtu:<5} {:<22} run {}: guest→card {up:8.2} MB/s, card→guest {down:8.2} MB/s",
                            b.name(),
                            rep + 1
                        );
                        let v = if b == Nicb::Card { &mut card } else { &mut tap };
                        v.0.push(*up);
                        v.1.push(*down);
                    }
                    Err(e) => println!(
                        "  MTU {mtu:<5} {:<22} run {}: FAILED: {e:#}",
                        b.name(),
                        rep + 1
                    ),
                }
            }
        }
        for (dir, c, t) in [
            ("guest → card", &card.0, &tap.0),
            ("card → guest", &card.1, &tap.1),
        ] {
            let (mc, mt) = (median(c), median(t));
            let ratio = match (mc, mt) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            let f = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2}"));
            let _ = writeln!(
                table,
                "| {mtu} | {dir} | {} | {} | {} |",
                f(mc),
                f(mt),
                f(ratio)
            );
            if mtu == 65520 {
                if let Some(r) = ratio {
                    let _ = writeln!(
                        targets,
                        "- P1 {dir} at MTU 65520: vhost-card ÷ QEMU tap = {r:.2} (target ≥ 1.5): {}",
                        if r >= 1.5 { "met" } else { "NOT met" }
                    );
                }
            }
        }
    }
    let md = format!(
        "TCP through a {} guest under {}, {mib} MiB each way per run, medians of {reps} run(s), \
         backends alternated.\n\n{table}\n{targets}",
        env.kernel_package,
        env.accel.name()
    );
    std::fs::write(out.join("vm.md"), &md)?;
    println!(
        "\n{md}\nbench --vm: table in {}",
        out.join("vm.md").display()
    );
    Ok(())
}

/// The median of `v` (the mean of the middle two for an even count); `None` when empty.
pub(super) fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Boots one VM with backend `b` at `mtu` and moves `len` bytes each way.
fn one(env: &Env, b: Nicb, mtu: u32, len: usize, name: &str) -> Run {
    match b {
        Nicb::Card => {
            let cfg = CardConfig {
                mtu,
                disable: String::new(),
                queues: 1,
                args: Vec::new(),
            };
            let mut rig = Rig::boot(env, name, &cfg, Plug::Boot)?;
            let ns = rig.card.ns.name().to_string();
            let r = transfers(env, &mut rig.vm, &ns, len);
            let _ = rig.vm.shutdown();
            r
        }
        Nicb::QemuTap => {
            let log_dir = env.logs.join(name);
            std::fs::create_dir_all(&log_dir)?;
            // Drop order: the VM, then the namespace, then the run directory.
            let run = TempDir::new(&format!("vhb-{name}"))?;
            let ns = Netns::new("vhb-")?;
            ns.ip(&["tuntap", "add", "dev", card::TAP, "mode", "tap", "vnet_hdr"])?;
            ns.ip(&[
                "link",
                "set",
                card::TAP,
                "mtu",
                &mtu.min(65521).to_string(),
                "up",
            ])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", card::CARD4),
                "dev",
                card::TAP,
            ])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/64", card::CARD6),
                "dev",
                card::TAP,
                "nodad",
            ])?;
            let mut vm = Vm::start(&VmConfig {
                kernel: &env.kernel,
                initrd: &env.initrd,
                nic: Nic::Tap {
                    netns: &ns,
                    ifname: card::TAP,
                },
                mac: card::MAC,
                mtu,
                append: "",
                log_dir: &log_dir,
                run_dir: run.path(),
                echo: env.echo,
                accel: env.accel,
                memory_mib: 1024,
                hotplug_port: false,
                agent: true,
                queues: 1,
            })?;
            vm.wait_agent(Duration::from_secs(240))?;
            vm.check("net_up", Duration::from_secs(30))?;
            let r = transfers(env, &mut vm, ns.name(), len);
            let _ = vm.shutdown();
            drop(vm);
            drop(ns);
            drop(run);
            r
        }
    }
}

/// `len` payload bytes guest → card, then card → guest, over TCP; MB/s each way (only when the
/// data arrived whole).
fn transfers(env: &Env, vm: &mut Vm, ns: &str, len: usize) -> Run {
    let up = rig::machine::to_card(env, vm, ns, len, "")?;
    if !up.ok {
        bail!("guest → card transfer incomplete: {}", up.describe());
    }
    let down = rig::machine::to_guest(env, vm, ns, len)?;
    if !down.ok {
        bail!("card → guest transfer incomplete: {}", down.describe());
    }
    Ok((up.transfer.mb_per_s(), down.transfer.mb_per_s()))
}
