//! `cargo xtask demo`: the card against a VM running Debian's stock kernel,
//! shown the way a person wants to see it: the negotiated features, the MTU
//! the guest reads, ping times and transfer rates both ways.

use std::time::Instant;

use anyhow::{bail, Result};

use crate::accel::Accel;
use crate::card::{self, CardConfig};
use crate::features;
use crate::rig::{Env, Plug, Rig};

const MIB: usize = 1 << 20;

#[derive(clap::Args)]
pub struct Options {
    /// MTU of the card (vhost-card --mtu and QEMU's host_mtu).
    #[arg(long, default_value_t = 65520)]
    mtu: u32,
    /// Feature bits not to offer (vhost-card --disable), comma-separated.
    #[arg(long, default_value = "")]
    disable: String,
    /// MiB sent each way over TCP.
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Accelerator; by default a probe VM tries KVM and falls back to TCG.
    #[arg(long, value_enum)]
    accel: Option<Accel>,
    /// Use target/release/vhost-card as it is instead of building it first.
    #[arg(long)]
    no_build: bool,
    /// Echo the guest console.
    #[arg(long)]
    verbose: bool,
    /// The card as a VDUSE device of a bare-metal host's own kernel instead (a TCG VM with
    /// Debian 13's stock kernel plays the host; see e2e/vduse.rs).
    #[arg(long)]
    vduse: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo needs root (network namespaces, tap devices)");
    }
    if opts.vduse {
        return crate::e2e::vduse::demo(&crate::e2e::vduse::DemoOptions {
            mtu: opts.mtu,
            disable: opts.disable.clone(),
            mib: opts.mib,
            accel: opts.accel,
            build: !opts.no_build,
            verbose: opts.verbose,
        });
    }
    let t0 = Instant::now();
    let logs = rig::paths::vm_dir().join("logs");
    println!("demo: preparing (host packages, kernel, initramfs, daemon build) ...");
    let env = Env::prepare(
        opts.mib * MIB,
        !opts.no_build,
        opts.accel,
        &logs,
        opts.verbose,
    )?;
    let setup = t0.elapsed();
    let cfg = CardConfig {
        mtu: opts.mtu,
        disable: opts.disable.clone(),
        queues: 1,
        args: Vec::new(),
    };
    println!(
        "demo: booting {} under {} ({}) against {}",
        env.kernel_package,
        env.accel.name(),
        env.accel_why,
        card::binary().display()
    );
    let t_boot = Instant::now();
    let mut rig = Rig::boot(&env, "demo", &cfg, Plug::Boot)?;
    println!(
        "demo: the guest's virtio_net is up after {:.1} s; pinging both ways",
        rig.boot.as_secs_f64()
    );
    let command_line = rig.card.command_line();
    let f = rig.features(&env)?;
    let pings = rig.pings(3)?;
    let len = opts.mib * MIB;
    println!("demo: sending {} MiB over TCP each way", opts.mib);
    let up = rig.send_to_card(&env, len)?;
    let down = rig.send_to_guest(&env, len)?;
    let stats = rig.card.fresh_stats()?;
    rig.vm.shutdown()?;
    let (stopped, stop_ok) = rig.card.stop()?;
    let vm_time = t_boot.elapsed();
    drop(rig);

    println!();
    println!("==== vhost-card demo ====");
    println!("card        {command_line}");
    println!(
        "            in network namespace with {}/24 and {}/64 on {}",
        card::CARD4,
        card::CARD6,
        card::TAP
    );
    println!(
        "host VM     {} ({}), virtio-net-pci over vhost-user",
        env.kernel_package,
        env.accel.name()
    );
    println!();
    println!("negotiated features (offered by the card, taken by the guest's virtio_net):");
    println!(
        "  {:<14} {:>3}  {:<19} {:<8} {:<8}",
        "card name", "bit", "virtio name", "offered", "acked"
    );
    let mut card_bits = 0u64;
    let mut rows: Vec<(&String, &u32)> = env.table.iter().collect();
    rows.sort_by_key(|(_, bit)| **bit);
    for (name, bit) in rows {
        card_bits |= 1 << bit;
        let offered = f.offered & 1 << bit != 0;
        let acked = f.guest & 1 << bit != 0;
        println!(
            "  {:<14} {:>3}  {:<19} {:<8} {:<8}",
            name,
            bit,
            features::name(*bit),
            yes(offered),
            yes(acked)
        );
    }
    let qemu_own = f.guest & !card_bits;
    println!(
        "  QEMU's own device bits the guest also took: {}",
        features::names(qemu_own)
    );
    println!(
        "  the guest's word {:#x} {} the card's offer as QEMU 7.2 passes it through; \
         the daemon logged ack {:#x}",
        f.guest,
        if f.ok() { "matches" } else { "DOES NOT match" },
        f.acked
    );
    for problem in f.problems() {
        println!("  PROBLEM: {problem}");
    }
    println!();
    println!(
        "MTU         guest eth0 reads {} (card --mtu {}), driver {}",
        f.mtu.map_or("?".into(), |m| m.to_string()),
        opts.mtu,
        f.driver
    );
    for (who, list) in [
        ("guest → card", &pings.guest),
        ("card → guest", &pings.card),
    ] {
        for (label, ping) in list.iter() {
            println!("ping        {who} {label:<5} {}", ping.describe());
        }
    }
    println!(
        "transfer    guest → card {} MiB TCP: {}",
        opts.mib,
        up.describe()
    );
    println!(
        "transfer    card → guest {} MiB TCP: {}",
        opts.mib,
        down.describe()
    );
    let counters: Vec<String> = stats.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("counters    {}", counters.join(" "));
    println!("daemon      {stopped}");
    println!(
        "timing      set-up {:.1} s, VM and tests {:.1} s, total {:.1} s",
        setup.as_secs_f64(),
        vm_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    println!("logs        {}", logs.join("demo").display());
    let pass = f.ok() && f.mtu == Some(opts.mtu) && pings.ok() && up.ok && down.ok && stop_ok;
    if !pass {
        println!("RESULT: FAIL");
        bail!("the demo found a problem (see above)");
    }
    println!("RESULT: PASS");
    Ok(())
}

pub fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "-"
    }
}
