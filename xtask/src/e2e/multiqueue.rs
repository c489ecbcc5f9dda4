//! Scenario 7: two queue pairs. `vhost-card --queues 2`, QEMU's vhost-user netdev with
//! `queues=2`, `virtio-net-pci` with `mq=on` and a guest with two vCPUs: the stock driver
//! brings both pairs up, a TCP stream sent from each vCPU leaves on that vCPU's TX queue (the
//! driver's XPS map), and every stream keeps its sha256.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;

use super::{matrix_mib, Options, DEFAULT_MTU, MIB};
use crate::card::CardConfig;
use crate::rig::{Env, Plug, Rig};

const PAIRS: usize = 2;

/// The card of both scenarios: the default card with `--queues 2`.
fn two_pairs() -> CardConfig {
    CardConfig {
        mtu: DEFAULT_MTU,
        disable: String::new(),
        queues: PAIRS as u16,
        args: Vec::new(),
    }
}

pub fn run(env: &Env, opts: &Options) -> Result<(bool, String)> {
    let cfg = two_pairs();
    let mut rig = Rig::boot(env, "multiqueue", &cfg, Plug::Boot)?;
    let result = steps(&mut rig, env, opts);
    rig.finish(result)
}

fn counters(rig: &Rig) -> Result<Vec<BTreeMap<String, u64>>> {
    rig.card.fresh_stats()?;
    (0..PAIRS).map(|p| rig.card.pair_stats(p)).collect()
}

fn delta(a: &[BTreeMap<String, u64>], b: &[BTreeMap<String, u64>], key: &str) -> Vec<u64> {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            b.get(key)
                .copied()
                .unwrap_or(0)
                .saturating_sub(a.get(key).copied().unwrap_or(0))
        })
        .collect()
}

fn steps(rig: &mut Rig, env: &Env, opts: &Options) -> Result<(bool, String)> {
    let queues = rig.vm.check(
        "ls /sys/class/net/eth0/queues | tr '\\n' ' '; echo; grep -c ^processor /proc/cpuinfo",
        Duration::from_secs(20),
    )?;
    let want = ["rx-0", "rx-1", "tx-0", "tx-1"];
    let queues_ok = want.iter().all(|q| queues.contains(q));
    let features = rig.features(env)?;
    let len = matrix_mib(opts) * MIB;
    let before = counters(rig)?;
    let mut streams = Vec::new();
    for cpu in 0..PAIRS {
        let pin = format!("busybox taskset {}", 1u32 << cpu);
        streams.push((cpu, rig.send_to_card_via(env, len, &pin)?));
    }
    let mid = counters(rig)?;
    let down = rig.send_to_guest(env, len)?;
    let after = counters(rig)?;
    let tx = delta(&before, &mid, "tx_frames");
    let rx = delta(&mid, &after, "rx_frames");
    let streams_ok = streams.iter().all(|(_, c)| c.ok) && down.ok;
    let spread = tx.iter().all(|&n| n > 0);
    let pass = queues_ok && features.ok() && streams_ok && spread;
    let text = format!(
        "guest queues [{}], features {}; {} MiB TCP guest→card from vCPU 0 {} and vCPU 1 {}; \
         card→guest {}; frames per queue pair guest→card {tx:?}{}, card→guest {rx:?}",
        queues.lines().next().unwrap_or("").trim(),
        if features.ok() {
            "as offered".to_string()
        } else {
            features.problems().join("; ")
        },
        len / MIB,
        streams[0].1.describe(),
        streams[1].1.describe(),
        down.describe(),
        if spread { "" } else { " (one pair idle)" },
    );
    Ok((pass, text))
}

/// Scenario 9: more queue pairs than the guest uses. `vhost-card --queues 2` and QEMU
/// `queues=2`, but a guest with one CPU (`nr_cpus=1`): the stock driver enables one pair
/// (min(pairs, CPUs)), and the card must still deliver every card-to-guest flow, whichever tap
/// queue the card's kernel would have hashed it to. Then the guest turns the second pair on
/// (`ethtool -L eth0 combined 2`, here through the guest helper) and off again; traffic passes
/// in each state.
pub fn fewer_pairs(env: &Env, opts: &Options) -> Result<(bool, String)> {
    let cfg = two_pairs();
    let image = crate::rig::Image {
        initrd: &env.initrd,
        append: "nr_cpus=1",
        host_mtu: true,
    };
    let mut rig = Rig::boot_image(env, "fewer-pairs", &cfg, Plug::Boot, &image)?;
    let result = rig
        .vm
        .check("net_up", Duration::from_secs(30))
        .and_then(|_| fewer_pairs_steps(&mut rig, env, opts));
    rig.finish(result)
}

/// Card-to-guest flows per state: each TCP connection from the card's namespace has its own
/// source port, so the card's kernel would spread them over the tap's queues.
const FLOWS: usize = 4;

fn fewer_pairs_steps(rig: &mut Rig, env: &Env, opts: &Options) -> Result<(bool, String)> {
    let len = (matrix_mib(opts) / FLOWS).max(1) * MIB;
    let mut pass = true;
    let mut parts = Vec::new();
    for set in [None, Some(2), Some(1)] {
        let cmd = match set {
            None => format!("{} guest channels eth0", crate::guest::HELPER),
            Some(n) => format!("{} guest channels eth0 --set {n}", crate::guest::HELPER),
        };
        let ch = crate::report::key_values(&rig.vm.check(&cmd, Duration::from_secs(20))?);
        let combined = ch.get("combined").cloned().unwrap_or_default();
        let want = set.unwrap_or(1).to_string();
        let pings = rig.pings(2)?;
        let before = counters(rig)?;
        let mut flows_ok = 0;
        let mut rates = Vec::new();
        for _ in 0..FLOWS {
            let down = rig.send_to_guest(env, len)?;
            flows_ok += usize::from(down.ok);
            rates.push(format!("{:.1}", down.transfer.mb_per_s()));
        }
        let up = rig.send_to_card(env, len)?;
        let after = counters(rig)?;
        let rx = delta(&before, &after, "rx_frames");
        let ok = combined == want && pings.ok() && flows_ok == FLOWS && up.ok;
        pass &= ok;
        parts.push(format!(
            "{} pair(s) in use (max {}): {}; {flows_ok}/{FLOWS} card→guest TCP flows of {} MiB \
             whole [{} MB/s], card→guest frames per pair {rx:?}; guest→card {}",
            combined,
            ch.get("max_combined").map_or("?", String::as_str),
            pings.describe(),
            len / MIB,
            rates.join(", "),
            up.describe()
        ));
    }
    Ok((pass, parts.join(" | ")))
}
