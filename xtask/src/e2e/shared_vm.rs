//! Scenarios 1, 2, 4, 6 and 8, run one after the other on one VM with the
//! default card: binding, traffic, large frames, restart, device reset.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::{Options, MIB};
use crate::card;
use crate::features;
use crate::nsnet::{self, Progress};
use crate::report::key_values;
use crate::rig::{self, Env, Rig};

/// Scenario 1: the driver binds, the MTU is the card's, the bits are the offer.
pub fn binding(rig: &mut Rig, env: &Env, _: &Options) -> Result<(bool, String)> {
    let f = rig.features(env)?;
    let want_mtu = rig.card.cfg.mtu;
    let mut problems = f.problems();
    if f.driver != "virtio_net" {
        problems.push(format!("driver is {:?}, not virtio_net", f.driver));
    }
    if f.mtu != Some(want_mtu) {
        problems.push(format!("MTU {:?}, expected {want_mtu}", f.mtu));
    }
    let qemu_own = f.guest & !features::passthrough_mask();
    let text = format!(
        "driver {}, MTU {} (card --mtu {want_mtu}); \
         guest features {:#x}: its backend bits {} offered {:#x} ∩ QEMU 7.2 vhost-user \
         passthrough set{} [{}]; \
         QEMU's own: {}{}",
        f.driver,
        f.mtu.map_or("?".into(), |m| m.to_string()),
        f.guest,
        if f.guest_passthrough() == f.expected() {
            "equal"
        } else {
            "DIFFER FROM"
        },
        f.offered,
        if f.acked_device() & features::passthrough_mask() == f.guest_passthrough() {
            " and the daemon's logged ack"
        } else {
            ""
        },
        features::names(f.guest_passthrough()),
        features::names(qemu_own),
        if problems.is_empty() {
            String::new()
        } else {
            format!("; PROBLEMS: {}", problems.join("; "))
        }
    );
    Ok((problems.is_empty(), text))
}

/// Scenario 2: pings both ways, then the payload each way with equal SHA-256.
pub fn traffic(rig: &mut Rig, env: &Env, opts: &Options) -> Result<(bool, String)> {
    let pings = rig.pings(3)?;
    let len = opts.mib * MIB;
    let up = rig.send_to_card(env, len)?;
    let down = rig.send_to_guest(env, len)?;
    let pass = pings.ok() && up.ok && down.ok;
    Ok((
        pass,
        format!(
            "{}; {} MiB TCP guest→card {}, card→guest {}",
            pings.describe(),
            opts.mib,
            up.describe(),
            down.describe()
        ),
    ))
}

const BIG_DATAGRAM: usize = 65000;

/// Scenario 4: one 65000-byte UDP datagram each way crosses as a single frame.
pub fn large_frames(rig: &mut Rig, _env: &Env, _: &Options) -> Result<(bool, String)> {
    let guest4: Ipv4Addr = card::GUEST4.parse()?;
    let card4: Ipv4Addr = card::CARD4.parse()?;
    let ns = rig.card.ns.name().to_string();

    // Guest -> card: the card's socket gets the datagram, AF_PACKET on card0
    // counts the frames it came in.
    let before = rig.card.fresh_stats()?;
    let cap = nsnet::capture_udp(
        &ns,
        card::TAP,
        (guest4, card4),
        Some(5003),
        Duration::from_secs(30),
    )?;
    let sent = rig.vm.sh(
        &format!(
            "{} guest udp-send {} 5003 {BIG_DATAGRAM}",
            crate::guest::HELPER,
            card::CARD4
        ),
        Duration::from_secs(30),
    );
    let up = nsnet::join(cap)?;
    let sent = sent?;
    let after = rig.card.fresh_stats()?;
    let delta = |k: &str| after.get(k).unwrap_or(&0) - before.get(k).unwrap_or(&0);
    let up_frames: Vec<_> = up.frames.iter().filter(|f| !f.outgoing).collect();
    let up_ok = sent.rc == 0
        && up.received == Some(BIG_DATAGRAM)
        && up.intact
        && up_frames.len() == 1
        && !up_frames[0].fragment;
    let up_text = format!(
        "guest→card: card received {} B{} in {} frame(s) on card0 [{}]{}, \
         daemon tx_frames +{} tx_bytes +{}{}",
        up.received.map_or("nothing".into(), |n| n.to_string()),
        if up.intact { " intact" } else { " CORRUPT" },
        up_frames.len(),
        describe_frames(&up_frames),
        if up.others.is_empty() {
            String::new()
        } else {
            format!(" and meanwhile {}", up.others.join(", "))
        },
        delta("tx_frames"),
        delta("tx_bytes"),
        if sent.rc != 0 {
            format!(", guest send failed: {}", sent.out.trim())
        } else {
            String::new()
        }
    );

    // Card -> guest: the guest helper receives; the guest's counters show
    // one packet and no reassembly; AF_PACKET shows what card0 sent.
    rig.vm.check(
        &format!(
            "rm -f /tmp/udp.ready /tmp/udp.out
             {} guest udp-recv 5004 /tmp/udp.ready 30 > /tmp/udp.out 2>&1 &
             n=0
             until [ -e /tmp/udp.ready ]; do
                 n=$((n + 1)); [ $n -gt 100 ] && {{ cat /tmp/udp.out; exit 1; }}
                 sleep 0.1
             done",
            crate::guest::HELPER
        ),
        Duration::from_secs(20),
    )?;
    // The daemon's counter window encloses the guest's.
    let before = rig.card.fresh_stats()?;
    let counters = "echo rx_packets=$(stat rx_packets); echo reasm=$(snmp Ip ReasmReqds)";
    let g0 = key_values(&rig.vm.check(counters, Duration::from_secs(10))?);
    let cap = nsnet::capture_udp(
        &ns,
        card::TAP,
        (card4, guest4),
        None,
        Duration::from_secs(10),
    )?;
    let sent = nsnet::udp_send(&ns, SocketAddrV4::new(guest4, 5004), BIG_DATAGRAM);
    let down = nsnet::join(cap)?;
    let sent = sent?;
    let got = key_values(&rig.vm.check(
        &format!(
            "n=0
             until grep -q -e intact= -e Error /tmp/udp.out; do
                 n=$((n + 1)); [ $n -gt 100 ] && break
                 sleep 0.1
             done
             cat /tmp/udp.out
             {counters}"
        ),
        Duration::from_secs(20),
    )?);
    let after = rig.card.fresh_stats()?;
    let delta = |k: &str| after.get(k).unwrap_or(&0) - before.get(k).unwrap_or(&0);
    let num = |kv: &std::collections::BTreeMap<String, String>, k: &str| -> i64 {
        kv.get(k).and_then(|v| v.parse().ok()).unwrap_or(-1)
    };
    let rx_packets = num(&got, "rx_packets") - num(&g0, "rx_packets");
    let reasm = num(&got, "reasm") - num(&g0, "reasm");
    let down_frames: Vec<_> = down.frames.iter().filter(|f| f.outgoing).collect();
    let received = got
        .get("received")
        .cloned()
        .unwrap_or_else(|| "nothing".into());
    let down_ok = sent == BIG_DATAGRAM
        && received == BIG_DATAGRAM.to_string()
        && got.get("intact").map(String::as_str) == Some("true")
        && reasm == 0
        && rx_packets >= 1
        && down_frames.len() == 1
        && !down_frames[0].fragment;
    let down_text = format!(
        "card→guest: guest received {received} B{}, eth0 rx_packets +{rx_packets}, \
         IP reassemblies +{reasm}, card0 sent {} frame(s) [{}]{}, \
         daemon rx_frames +{} rx_bytes +{}",
        if got.get("intact").map(String::as_str) == Some("true") {
            " intact"
        } else {
            ""
        },
        down_frames.len(),
        describe_frames(&down_frames),
        if down.others.is_empty() {
            String::new()
        } else {
            format!(" and meanwhile {}", down.others.join(", "))
        },
        delta("rx_frames"),
        delta("rx_bytes"),
    );
    Ok((up_ok && down_ok, format!("{up_text}; {down_text}")))
}

fn describe_frames(frames: &[&nsnet::Frame]) -> String {
    frames
        .iter()
        .map(|f| {
            format!(
                "{} B, IP length {}{}{}",
                f.len,
                f.ip_len,
                if f.dont_fragment { " DF" } else { "" },
                if f.fragment { " FRAGMENT" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Scenario 6: SIGKILL the daemon mid-transfer and start it again: the transfer
/// still ends whole.
pub fn restart(rig: &mut Rig, env: &Env, opts: &Options) -> Result<(bool, String)> {
    let len = opts.mib * MIB;
    let timeout = rig::transfer_timeout(len) + Duration::from_secs(60);
    let carrier0 = rig.nic_info()?;
    let progress = Arc::new(Progress::default());
    let rx = nsnet::tcp_receive(
        rig.card.ns.name(),
        SocketAddrV4::new(card::CARD4.parse()?, 5001),
        Duration::from_secs(60),
        timeout,
        progress.clone(),
    )?;
    // The sender runs in the background in the guest.
    rig.vm.check(
        &format!(
            "rm -f /tmp/tx.rc; ({} > /tmp/tx.out 2>&1; echo $? > /tmp/tx.rc) > /dev/null 2>&1 &",
            rig::guest_send_cmd(env, len, 5001)
        ),
        Duration::from_secs(10),
    )?;
    // Kill at a quarter of the way.
    let at = (len / 4) as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while progress.bytes.load(Ordering::SeqCst) < at {
        crate::check_interrupted()?;
        if rx.is_finished() || Instant::now() > deadline {
            let got = progress.bytes.load(Ordering::SeqCst);
            nsnet::join(rx).ok();
            bail!("the transfer did not reach {at} bytes (got {got})");
        }
        sleep(Duration::from_millis(2));
    }
    let killed_at_bytes = progress.bytes.load(Ordering::SeqCst);
    let t_kill = Instant::now();
    let status = rig.card.kill()?;
    rig.card.restart()?;
    let t_listen = t_kill.elapsed();
    rig.card.wait_acked(Duration::from_secs(60))?;
    let t_ack = t_kill.elapsed();
    // First data after the new daemon is serving.
    let base = progress.bytes.load(Ordering::SeqCst);
    let resume = loop {
        if progress.bytes.load(Ordering::SeqCst) > base {
            break Some(t_kill.elapsed());
        }
        if rx.is_finished() {
            break None;
        }
        crate::check_interrupted()?;
        if t_kill.elapsed() > Duration::from_secs(120) {
            break None;
        }
        sleep(Duration::from_millis(1));
    };
    let got = nsnet::join(rx)?;
    let out = rig.vm.check(
        "n=0
         while [ ! -e /tmp/tx.rc ]; do
             n=$((n + 1)); [ $n -gt 300 ] && { echo 'nc did not finish'; exit 1; }
             sleep 0.1
         done
         echo rc=$(cat /tmp/tx.rc); cat /tmp/tx.out",
        Duration::from_secs(60),
    )?;
    let carrier1 = rig.nic_info()?;
    let changes = |kv: &std::collections::BTreeMap<String, String>| -> i64 {
        kv.get("carrier_changes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1)
    };
    let expected = env.sha_prefix(len)?;
    let whole = got.bytes == len as u64 && got.sha256 == expected;
    let guest_rc = key_values(&out).get("rc").cloned().unwrap_or_default();
    let attached = rig
        .card
        .log_lines()?
        .iter()
        .any(|l| l.contains(&format!("tap {} attached", card::TAP)));
    let pass = whole && guest_rc == "0" && resume.is_some() && attached && rig.card.alive()?;
    let text = format!(
        "SIGKILL ({status}) at {:.1} of {} MiB; restarted daemon listening after {} ms{}, \
         QEMU reconnected and acked after {} ms, data flowing again after {} → outage {}; \
         {} MiB guest→card {}; guest carrier changes +{}",
        killed_at_bytes as f64 / MIB as f64,
        opts.mib,
        t_listen.as_millis(),
        if attached {
            " (re-attached the persistent tap)"
        } else {
            " (did NOT re-attach the tap)"
        },
        t_ack.as_millis(),
        resume.map_or("never".into(), |r| format!("{} ms", r.as_millis())),
        resume.map_or("unbounded".into(), |r| format!("{} ms", r.as_millis())),
        opts.mib,
        if whole {
            format!("arrived whole, sha256 equal ({}…)", &expected[..12])
        } else {
            format!(
                "got {} bytes, sha256 {} (expected {expected})",
                got.bytes, got.sha256
            )
        },
        changes(&carrier1) - changes(&carrier0),
    );
    Ok((pass, text))
}

/// Scenario 8: the guest resets the device twice, as a driver reload or a guest reboot does:
/// virtio_net is unbound (QEMU stops the rings with GET_VRING_BASE on the same vhost-user
/// connection) and bound again (features, memory and rings set anew), then the link must
/// carry pings and the payload each way. The daemon must see no disconnect.
pub fn driver_reset(rig: &mut Rig, env: &Env, opts: &Options) -> Result<(bool, String)> {
    let len = super::matrix_mib(opts) * MIB;
    let connects0 = count_lines(rig, "frontend connected")?;
    let acks0 = count_lines(rig, "frontend acked features")?;
    let mut pass = true;
    let mut rounds = Vec::new();
    for round in 1..=2 {
        let t0 = Instant::now();
        rig.vm.check(
            "dev=$(basename \"$(readlink /sys/class/net/eth0/device)\")
             d=/sys/bus/virtio/drivers/virtio_net
             echo \"$dev\" > $d/unbind || exit 1
             if [ -e /sys/class/net/eth0 ]; then echo 'eth0 still there after unbind'; exit 1; fi
             echo \"$dev\" > $d/bind || exit 1
             net_up",
            Duration::from_secs(60),
        )?;
        let back = t0.elapsed();
        let info = rig.nic_info()?;
        let pings = rig.pings(2)?;
        let up = rig.send_to_card(env, len)?;
        let down = rig.send_to_guest(env, len)?;
        let mtu_ok =
            info.get("mtu").map(String::as_str) == Some(rig.card.cfg.mtu.to_string().as_str());
        pass &= mtu_ok && pings.ok() && up.ok && down.ok;
        rounds.push(format!(
            "reset {round}: eth0 back in {} ms (MTU {}), {}; {} MiB guest→card {}, card→guest {}",
            back.as_millis(),
            info.get("mtu").map_or("?", String::as_str),
            pings.describe(),
            len / MIB,
            up.describe(),
            down.describe()
        ));
    }
    let reconnects = count_lines(rig, "frontend connected")? - connects0;
    // Each reset makes QEMU stop the rings and negotiate again: one more SET_FEATURES each.
    let acks = count_lines(rig, "frontend acked features")? - acks0;
    let alive = rig.card.alive()?;
    pass &= reconnects == 0 && acks == 2 && alive;
    Ok((
        pass,
        format!(
            "{}; features negotiated anew {acks} time(s) on the same vhost-user session \
             ({reconnects} reconnect(s)), daemon {}",
            rounds.join("; "),
            if alive { "running" } else { "GONE" }
        ),
    ))
}

fn count_lines(rig: &Rig, needle: &str) -> Result<usize> {
    Ok(rig
        .card
        .log_lines()?
        .iter()
        .filter(|l| l.contains(needle))
        .count())
}
