//! `cargo xtask demo --vduse`: the demo table of `cargo xtask demo`, with the host being the VM's
//! own kernel driving the card through VDUSE.

use std::time::Instant;

use anyhow::{bail, Result};

use super::host::{Host, CARD};
use crate::accel::Accel;

/// `cargo xtask demo --vduse`.
pub struct DemoOptions {
    pub mtu: u32,
    pub disable: String,
    pub mib: usize,
    pub accel: Option<Accel>,
    pub build: bool,
    pub verbose: bool,
}

pub fn demo(opts: &DemoOptions) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo needs root (VM assets, QEMU)");
    }
    let t0 = Instant::now();
    let logs = crate::vm_dir().join("logs/demo-vduse");
    println!(
        "demo --vduse: preparing (host packages, Debian 13 kernel, initramfs, daemon build) ..."
    );
    let mut host = Host::boot(opts.mib, opts.build, opts.accel, &logs, opts.verbose)?;
    let setup = t0.elapsed();
    let table = crate::card::feature_table()?;
    println!(
        "demo --vduse: {} up under {} in {:.1} s; starting the card",
        host.kernel_package,
        host.accel.name(),
        host.boot.as_secs_f64()
    );
    let t_vm = Instant::now();
    let mut args = format!("--mtu {}", opts.mtu);
    if !opts.disable.is_empty() {
        args += &format!(" --disable {}", opts.disable);
    }
    let up_in = host.start_card(&args)?;
    let b = host.binding()?;
    let pings = host.pings(3)?;
    println!("demo --vduse: sending {} MiB over TCP each way", opts.mib);
    let to_card = host.transfer(opts.mib, true)?;
    let to_host = host.transfer(opts.mib, false)?;
    let stats = host.stats()?;
    let (rc, gone) = host.stop_card_and_wait_gone()?;
    let cleaned = rc == 0 && gone;
    if let Ok(r) = host.sh("cat /run/vhc.log", 60) {
        std::fs::write(logs.join("daemon.log"), r.out).ok();
    }
    host.vm.shutdown().ok();
    let vm_time = t_vm.elapsed();

    let guest = b.guest.unwrap_or(0);
    let offered = b.offered.unwrap_or(0);
    println!();
    println!("==== vhost-card demo: the card as a VDUSE device of the host's own kernel ====");
    println!("card        vhost-card --vduse {CARD} --netns card --tap {CARD} {args}");
    println!(
        "            in network namespace card with {}/24 and {}/64 on {CARD}",
        crate::card::CARD4,
        crate::card::CARD6
    );
    println!(
        "host        {} ({} VM playing the bare-metal host): /dev/vduse/{CARD} -> vdpa device \
         {CARD} -> {} -> {} eth0, up {:.1} s after the daemon started",
        host.kernel_package,
        host.accel.name(),
        b.vdpa_driver,
        b.driver,
        up_in.as_secs_f64()
    );
    println!();
    println!("negotiated features (offered by the card, taken by the host's virtio_net):");
    println!(
        "  {:<16} {:>3}  {:<19} {:<8} {:<8}",
        "card name", "bit", "virtio name", "offered", "acked"
    );
    let mut rows: Vec<(String, u32)> = table.into_iter().collect();
    // The transport's own bits: the device gives the host its MAC, and VDUSE requires
    // ACCESS_PLATFORM (every buffer goes through the device's IOTLB).
    rows.push(("(vduse: mac)".into(), 5));
    rows.push(("(vduse: iommu)".into(), 33));
    rows.sort_by_key(|(_, bit)| *bit);
    for (name, bit) in rows {
        println!(
            "  {:<16} {:>3}  {:<19} {:<8} {:<8}",
            name,
            bit,
            crate::features::name(bit),
            crate::demo::yes(offered & 1 << bit != 0),
            crate::demo::yes(guest & 1 << bit != 0)
        );
    }
    println!(
        "  the host's word {guest:#x} {} the card's offer {offered:#x}",
        if guest == offered {
            "equals"
        } else {
            "DIFFERS FROM"
        }
    );
    println!();
    println!(
        "MTU         host eth0 reads {} (card --mtu {}), driver {}",
        b.mtu.map_or("?".into(), |m| m.to_string()),
        opts.mtu,
        b.driver
    );
    for (label, p) in &pings {
        println!("ping        {label} {}", p.describe());
    }
    println!(
        "transfer    host → card {} MiB TCP: {}",
        opts.mib,
        to_card.describe()
    );
    println!(
        "transfer    card → host {} MiB TCP: {}",
        opts.mib,
        to_host.describe()
    );
    let counters: Vec<String> = vhost_card::stats::COUNTERS
        .iter()
        .map(|c| (c.name, stats.total(c.name)))
        .filter(|(_, v)| *v != 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("counters    {}", counters.join(" "));
    println!(
        "daemon      SIGTERM: exit {rc}; host interface and /dev/vduse/{CARD} {}",
        if cleaned { "removed" } else { "NOT removed" }
    );
    println!(
        "timing      set-up {:.1} s, VM and tests {:.1} s, total {:.1} s",
        setup.as_secs_f64(),
        vm_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    println!("logs        {}", logs.display());
    let pass =
        b.ok(opts.mtu) && pings.iter().all(|(_, p)| p.ok()) && to_card.ok && to_host.ok && cleaned;
    if !pass {
        println!("RESULT: FAIL");
        bail!("the demo found a problem (see above)");
    }
    println!("RESULT: PASS");
    Ok(())
}
