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

pub fn run(env: &Env, opts: &Options) -> Result<(bool, String)> {
    let cfg = CardConfig {
        mtu: DEFAULT_MTU,
        disable: String::new(),
        queues: PAIRS as u16,
    };
    let mut rig = Rig::boot(env, "multiqueue", &cfg, Plug::Boot)?;
    let result = steps(&mut rig, env, opts);
    let result = result.map(|(ok, text)| {
        if ok {
            (ok, text)
        } else {
            (ok, format!("{text}\n       {}", rig.evidence()))
        }
    });
    rig.vm.shutdown().ok();
    result
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
