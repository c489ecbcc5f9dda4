//! `cargo xtask e2e --vduse` and `cargo xtask demo --vduse`: the card as a device of the kernel
//! it runs on. A TCG VM boots Debian 13's unmodified cloud kernel as the "bare-metal host"; inside
//! it, `vhost-card --vduse` creates a VDUSE device and its vdpa device, and the VM's own
//! `virtio_vdpa` and `virtio_net` make the host interface eth0 of it, while the card's end (the
//! tap) sits in the VM's network namespace `card`. One PASS/FAIL line per check:
//!
//! 1. errors: without the vduse module the daemon names it and exits 1, having created nothing;
//! 2. binding: driver virtio_net, MTU 65520, the guest's feature bits equal the offer; the
//!    stats and metrics show the driver as the connected frontend, its acked word the host's;
//! 3. ping both ways over IPv4 and IPv6;
//! 4. 64 MiB of TCP each way, sha256 equal;
//! 5. checksum honesty: UDP datagrams with a wrong checksum sent from the card are dropped by the
//!    host's stack (Udp InCsumErrors), right ones delivered;
//! 6. toggles: `--disable mrg-rxbuf`, then a card file with `vduse` and `mtu = 1500`: bits and
//!    MTU follow, traffic passes;
//! 7. lifecycle: a second daemon on the same name is refused; SIGTERM removes the host interface
//!    and the device, a new daemon brings them back; after SIGKILL the restarted daemon takes the
//!    device back and the same interface carries traffic again;
//! 8. kernel limits, measured: the feature bits VDUSE refuses on top of the offer (CTRL_VQ) and
//!    those it requires, `--queues 2` refused by the daemon with the reason, MTU 65535 with
//!    65000-byte pings both ways;
//! 9. vdpa binding: with `--vduse-bind none` the user's own `vdpa dev add` gives the same host
//!    interface; with `--vduse-bind vhost` the device goes to `vhost_vdpa` (/dev/vhost-vdpa-N, for
//!    a VM) instead, and a vhost-vdpa frontend played by the test moves a datagram each way;
//! 10. driver reset: the host's virtio_net unbound and bound again, twice (a driver reload
//!     resets the device: the rings and the bounce mappings go and come back); the stats follow
//!     the driver; traffic after each.
//!
//! Logs: target/vm/logs/e2e-vduse/.
//!
//! Modules: [`host`] (the VM playing the bare-metal host and what the checks do in it),
//! [`guest`] (the helpers that run inside it), [`demo`] (`cargo xtask demo --vduse`).

mod demo;
mod guest;
mod host;

use std::time::Instant;

use anyhow::Result;

use crate::report::key_values;

pub use demo::{demo, DemoOptions};
pub use guest::{probe_features, tcp_sink, udp_count, udp_frames, vdpa_frontend};
use host::{Host, CARD};

use super::Line;

fn line(number: u32, name: &str, result: Result<(bool, String)>) -> Line {
    super::verdict(number, name, result)
}

/// `cargo xtask e2e --vduse`.
pub fn run(opts: &super::Options) -> Result<()> {
    let t0 = Instant::now();
    let logs = crate::vm_dir().join("logs/e2e-vduse");
    let mut host = Host::boot(opts.mib, !opts.no_build, opts.accel, &logs, opts.verbose)?;
    println!(
        "e2e --vduse: {} under {} ({}), up in {:.1} s; logs in {}",
        host.kernel_package,
        host.accel.name(),
        host.accel_why,
        host.boot.as_secs_f64(),
        logs.display()
    );
    let mut lines = Vec::new();
    let mut record = |l: Line| {
        println!("{}", l.render());
        lines.push(l);
    };
    let wanted = |n: u32| opts.only.is_empty() || opts.only.contains(&n);
    if wanted(1) {
        record(line(1, "errors", missing_module(&mut host)));
    }
    if let Ok(level) = std::env::var("VHC_LOG") {
        host.check(
            &format!("echo 'VHC_LOG={level}; export VHC_LOG' > /run/vhc.env"),
            10,
        )?;
    }
    let up = host.start_card("");
    let up_ok = up.is_ok();
    record(line(
        2,
        "binding",
        up.and_then(|t| {
            let b = host.binding()?;
            let (state_ok, state) = driver_state(&mut host, &b)?;
            Ok((
                b.ok(super::DEFAULT_MTU) && state_ok,
                format!(
                    "host interface up {:.1} s after start; {}; {state}",
                    t.as_secs_f64(),
                    b.describe()
                ),
            ))
        }),
    ));
    // Debugging aid: VHC_VDUSE_SCRIPT=FILE runs FILE in the guest once the card is up.
    if let (true, Some(file)) = (up_ok, std::env::var_os("VHC_VDUSE_SCRIPT")) {
        let script = std::fs::read_to_string(&file)?;
        let r = host.sh(&script, 600)?;
        println!("VHC_VDUSE_SCRIPT exit {}:\n{}", r.rc, r.out);
    }
    if up_ok {
        if wanted(3) {
            record(line(3, "ping", pings(&mut host)));
        }
        if wanted(4) {
            record(line(4, "traffic", traffic(&mut host, opts.mib)));
        }
        if wanted(5) {
            record(line(5, "checksum honesty", csum_honesty(&mut host)));
        }
        if wanted(6) {
            let mib = super::matrix_mib(opts).min(16);
            record(line(6, "toggles", toggles(&mut host, mib)));
        }
        if wanted(7) {
            record(line(7, "lifecycle", lifecycle(&mut host)));
        }
        if wanted(8) {
            record(line(8, "kernel limits", limits(&mut host)));
        }
        if wanted(9) {
            record(line(9, "vdpa binding", vdpa_binding(&mut host)));
        }
        if wanted(10) {
            record(line(10, "driver reset", driver_reset(&mut host)));
        }
    }
    let _ = host.sh("[ -e /run/vhc.rc ] || card_stop TERM", 60);
    if let Ok(r) = host.sh("cat /run/vhc.log", 60) {
        std::fs::write(logs.join("daemon.log"), r.out).ok();
    }
    if lines.iter().any(|l| !l.pass) {
        println!("daemon log (last lines):\n{}", host.daemon_log(40));
    }
    host.vm.shutdown().ok();
    super::summary(
        &format!(
            "cargo xtask e2e --vduse: {} under {}, {:.0} s",
            host.kernel_package,
            host.accel.name(),
            t0.elapsed().as_secs_f64()
        ),
        &mut lines,
        "VDUSE check(s)",
    )
}

/// Without the vduse module the daemon says which module is missing and exits 1, having
/// created nothing (no control socket, no tap): the kernel's VDUSE is checked first.
fn missing_module(host: &mut Host) -> Result<(bool, String)> {
    let out = host.check(
        "rmmod vduse
         vhost-card --vduse probe --netns $NS --tap probe0 --control /tmp/probe.ctl > /tmp/err.log 2>&1; echo rc=$?
         tail -n 1 /tmp/err.log | sed 's/^/message=/'
         [ -e /tmp/probe.ctl ] && echo left=control
         ip -n $NS link show probe0 > /dev/null 2>&1 && echo left=tap
         insmod /lib/modules/vduse.ko",
        30,
    )?;
    let kv = key_values(&out);
    let rc = kv.get("rc").cloned().unwrap_or_default();
    let msg = kv.get("message").cloned().unwrap_or_default();
    let left = kv.get("left").cloned();
    Ok((
        rc == "1" && msg.contains("modprobe vduse") && left.is_none(),
        format!(
            "no vduse module: exit status {rc}, \"{msg}\", {}",
            match left {
                None => "nothing created".to_string(),
                Some(what) => format!("left a {what} behind"),
            }
        ),
    ))
}

/// What `vhost-card stats --json` and the metrics say while the host's driver runs the device:
/// transport vduse, the frontend (the driver) connected, the acked word the host's own.
fn driver_state(host: &mut Host, b: &host::Binding) -> Result<(bool, String)> {
    let snap = host.stats()?;
    let st = &snap.state;
    let acked = st
        .features
        .acked
        .as_ref()
        .and_then(|a| u64::from_str_radix(a.bits.trim_start_matches("0x"), 16).ok());
    let prom = host.scrape()?;
    let connected_metric = prom.lines().any(|l| l == "vhost_card_frontend_connected 1");
    let transport_metric = prom
        .lines()
        .any(|l| l.starts_with("vhost_card_info{") && l.contains("transport=\"vduse\""));
    let ok = st.transport == "vduse"
        && st.connected
        && st.pairs_in_use == 1
        && acked.is_some()
        && acked == b.guest
        && connected_metric
        && transport_metric;
    Ok((
        ok,
        format!(
            "stats: transport {}, {} ({} session(s)), acked {} the host's word; metrics: \
             frontend_connected {}, info transport {}",
            st.transport,
            if st.connected {
                "driver running"
            } else {
                "NO driver running"
            },
            st.sessions,
            if acked.is_some() && acked == b.guest {
                "equals"
            } else {
                "DIFFERS FROM"
            },
            if connected_metric { "1" } else { "NOT 1" },
            if transport_metric { "vduse" } else { "MISSING" }
        ),
    ))
}

fn pings(host: &mut Host) -> Result<(bool, String)> {
    let p = host.pings(3)?;
    let ok = p.iter().all(|(_, p)| p.ok());
    let text = p
        .iter()
        .map(|(l, p)| match (p.ok(), p.avg()) {
            (true, Some(avg)) => format!("{l} {avg} ms"),
            _ => format!("{l} {}", p.describe()),
        })
        .collect::<Vec<_>>()
        .join(", ");
    Ok((ok, text))
}

fn traffic(host: &mut Host, mib: usize) -> Result<(bool, String)> {
    let up = host.transfer(mib, true)?;
    let down = host.transfer(mib, false)?;
    Ok((
        up.ok && down.ok,
        format!(
            "{mib} MiB host→card {}; card→host {}",
            up.describe(),
            down.describe()
        ),
    ))
}

fn csum_honesty(host: &mut Host) -> Result<(bool, String)> {
    let before = host.stats()?;
    let (bad_rx, bad_err) = host.udp_from_card(5, true)?;
    let (good_rx, good_err) = host.udp_from_card(5, false)?;
    let after = host.stats()?;
    let delta = |k: &str| after.total(k).saturating_sub(before.total(k));
    let ok = bad_rx == 0 && bad_err == 5 && good_rx == 5 && good_err == 0;
    Ok((
        ok,
        format!(
            "5 wrong: {bad_rx} delivered, {bad_err} InCsumErrors; 5 right: {good_rx} delivered, \
             {good_err} InCsumErrors; card counted {} bad, {} verified",
            delta("rx_csum_bad"),
            delta("rx_csum_verified")
        ),
    ))
}

/// Two configurations, each on a fresh daemon: the bits and MTU follow, traffic passes.
fn toggles(host: &mut Host, mib: usize) -> Result<(bool, String)> {
    let mut ok = true;
    let mut parts = Vec::new();
    // The second from the card's file (/run/card.toml: card "card"), as
    // vhost-card-vduse@.service and card-os start it: no socket, the namespace from the name.
    let file = "[daemon]\nvduse = \"card0\"\ncontrol = \"/run/vhc.ctl\"\nmetrics-listen = true\n\
                mtu = 1500\n";
    for (args, mtu, off) in [
        ("--disable mrg-rxbuf", 65520u32, Some(15u32)),
        ("--config card.toml: mtu = 1500", 1500, None),
    ] {
        let rc = host.stop_card("TERM")?;
        host.check("wait_eth0_gone 20", 30)?;
        if args.starts_with("--config") {
            host.start_card_file(file)?;
        } else {
            host.start_card(args)?;
        }
        let b = host.binding()?;
        let bit_ok = off.is_none_or(|bit| b.guest.is_some_and(|g| g & 1 << bit == 0));
        let p = host.pings(2)?;
        let up = host.transfer(mib, true)?;
        let down = host.transfer(mib, false)?;
        let this =
            rc == 0 && b.ok(mtu) && bit_ok && p.iter().all(|(_, p)| p.ok()) && up.ok && down.ok;
        ok &= this;
        parts.push(format!(
            "[{args}: {} MTU {}, {mib} MiB up {} down {}{}]",
            if bit_ok {
                "bits follow,"
            } else {
                "bits WRONG,"
            },
            b.mtu.unwrap_or(0),
            up.describe(),
            down.describe(),
            if this { "" } else { " FAILED" }
        ));
    }
    Ok((ok, parts.join(" ")))
}

/// A second daemon on the same name is refused; SIGTERM takes the interface and the device
/// away and a new daemon brings them back; SIGKILL leaves them, and the restarted daemon takes
/// the device back.
fn lifecycle(host: &mut Host) -> Result<(bool, String)> {
    // Back to the defaults first.
    let (rc, gone) = host.stop_card_and_wait_gone()?;
    let removed = rc == 0 && gone;
    let t = host.start_card("")?;
    let (second_rc, message) = host.refusal("--vduse $CARD --netns $NS --tap other0")?;
    let refused = second_rc == "1" && message.contains("in use");
    let ifindex = host.check("cat /sys/class/net/eth0/ifindex", 10)?;
    // Crash: the device and the interface stay; the restarted daemon takes the device back.
    let killed = host.stop_card("KILL")?;
    host.check("sleep 1; [ -e /sys/class/net/eth0 ]", 10)?;
    host.start_card("")?;
    let ifindex_after = host.check("cat /sys/class/net/eth0/ifindex", 10)?;
    let log = host.daemon_log(30);
    let taken_back = log.contains("taken back");
    let p = host.pings(2)?;
    let pinged = p.iter().all(|(_, p)| p.ok());
    let up = host.transfer(4, true)?;
    let down = host.transfer(4, false)?;
    // Crash again, and restart with another MTU: the device left is not the one this daemon
    // would create, so it is taken apart and created again, and the host sees the new MTU.
    let killed_again = host.stop_card("KILL")?;
    host.check("sleep 1; [ -e /sys/class/net/eth0 ]", 10)?;
    host.check(
        "old=$(cat /sys/class/net/eth0/ifindex)
         card_start --mtu 9000
         n=0
         while [ \"$(cat /sys/class/net/eth0/ifindex 2>/dev/null)\" = \"$old\" ]; do
             n=$((n + 1)); [ $n -gt 300 ] && { echo 'eth0 was not replaced'; exit 1; }
             sleep 0.1
         done
         wait_host 30",
        90,
    )?;
    let recreated = host
        .daemon_log(30)
        .contains("created again (it was created with another");
    let mtu_after = host.binding()?.mtu;
    let p2 = host.pings(2)?.iter().all(|(_, p)| p.ok());
    host.stop_card("TERM")?;
    host.check("wait_eth0_gone 20", 30)?;
    host.start_card("")?;
    let recreate_ok = killed_again == 137 && recreated && mtu_after == Some(9000) && p2;
    let ok = removed
        && refused
        && killed == 137
        && taken_back
        && ifindex.trim() == ifindex_after.trim()
        && pinged
        && up.ok
        && down.ok
        && recreate_ok;
    Ok((
        ok,
        format!(
            "SIGTERM: exit {rc}, eth0 and /dev/vduse/{CARD} {}; restart: eth0 back in {:.1} s; \
             second daemon: {}; SIGKILL then restart: {}, eth0 {}, ping {}, 4 MiB up {} down {}; \
             SIGKILL then restart with --mtu 9000: {}",
            if removed { "removed" } else { "NOT removed" },
            t.as_secs_f64(),
            if refused {
                "refused (in use)"
            } else {
                "NOT refused"
            },
            if taken_back {
                "device taken back"
            } else {
                "device NOT taken back"
            },
            if ifindex.trim() == ifindex_after.trim() {
                "kept"
            } else {
                "replaced"
            },
            if pinged { "ok" } else { "FAILED" },
            up.describe(),
            down.describe(),
            if recreate_ok {
                "device destroyed and created again, eth0 back at MTU 9000, ping ok".to_string()
            } else {
                format!("FAILED (recreated: {recreated}, MTU {mtu_after:?}, ping {p2})")
            }
        ),
    ))
}

/// What this kernel's VDUSE and virtio_net take: feature bits, several queue pairs, the largest
/// MTU.
fn limits(host: &mut Host) -> Result<(bool, String)> {
    let probe = host.check(&format!("{} guest vduse-probe", crate::guest::HELPER), 60)?;
    let kv = key_values(&probe);
    let refused = kv.get("refused").cloned().unwrap_or_default();
    let required = kv.get("required").cloned().unwrap_or_default();
    let (mq_rc, message) = host.refusal("--vduse mq0 --netns $NS --tap mq0 --queues 2")?;
    let mq_refused = mq_rc == "1" && message.contains("CTRL_VQ");
    host.stop_card("TERM")?;
    host.check("wait_eth0_gone 20", 30)?;
    host.start_card("--mtu 65535")?;
    let b = host.binding()?;
    let big = host.sh(
        "ping -c 2 -W 5 -s 65000 $CARD4 && incard ping -c 2 -W 5 -s 65000 $GUEST4",
        60,
    )?;
    host.stop_card("TERM")?;
    host.check("wait_eth0_gone 20", 30)?;
    host.start_card("")?;
    let ok = refused == "17:CTRL_VQ"
        && required.contains("ACCESS_PLATFORM")
        && mq_refused
        && b.mtu == Some(65535)
        && big.rc == 0;
    Ok((
        ok,
        format!(
            "VDUSE refuses {refused} on top of the offer and requires {required}; --queues 2 {}; \
             MTU 65535: host reads {}, 65000-byte pings both ways {}",
            if mq_refused {
                "refused (needs CTRL_VQ)"
            } else {
                "NOT refused"
            },
            b.mtu.map_or("?".into(), |m| m.to_string()),
            if big.rc == 0 { "pass" } else { "FAIL" }
        ),
    ))
}

/// The host's driver unbound and bound again (a reset of the device), twice; traffic after each.
fn driver_reset(host: &mut Host) -> Result<(bool, String)> {
    let mut ok = true;
    let mut parts = Vec::new();
    for round in 1..=2 {
        let sessions = host.stats()?.state.sessions;
        let t = Instant::now();
        host.check(
            "dev=$(basename $(readlink /sys/class/net/eth0/device))
             echo $dev > /run/vhc.dev
             echo $dev > /sys/bus/virtio/drivers/virtio_net/unbind
             wait_eth0_gone 20",
            60,
        )?;
        // Unbound: the driver reset the device, and the counters say so.
        let unbound = host.stats()?.state;
        host.check(
            "echo $(cat /run/vhc.dev) > /sys/bus/virtio/drivers/virtio_net/bind
             wait_host 30",
            60,
        )?;
        let back = t.elapsed();
        let bound = host.stats()?.state;
        let state_ok = !unbound.connected
            && unbound.features.acked.is_none()
            && bound.connected
            && bound.sessions == sessions + 1;
        let b = host.binding()?;
        let p = host.pings(2)?.iter().all(|(_, p)| p.ok());
        let up = host.transfer(4, true)?;
        let down = host.transfer(4, false)?;
        let this = b.ok(super::DEFAULT_MTU) && p && up.ok && down.ok && state_ok;
        ok &= this;
        parts.push(format!(
            "reset {round}: {}, eth0 back in {:.1} s, MTU {}, ping {}, 4 MiB up {} down {}",
            if state_ok {
                format!(
                    "stats: no driver while unbound, session {} after",
                    bound.sessions
                )
            } else {
                format!(
                    "stats WRONG (unbound: connected {}, after: connected {} sessions {} of {})",
                    unbound.connected,
                    bound.connected,
                    bound.sessions,
                    sessions + 1
                )
            },
            back.as_secs_f64(),
            b.mtu.map_or("?".into(), |m| m.to_string()),
            if p { "ok" } else { "FAILED" },
            up.describe(),
            down.describe()
        ));
    }
    Ok((ok, parts.join("; ")))
}

/// The vdpa device made by the user (`--vduse-bind none`), and bound to vhost_vdpa.
fn vdpa_binding(host: &mut Host) -> Result<(bool, String)> {
    host.stop_card("TERM")?;
    host.check("wait_eth0_gone 20", 30)?;
    host.check(
        "card_start --vduse-bind none
         until [ -e /dev/vduse/$CARD ]; do sleep 0.1; done; sleep 1",
        30,
    )?;
    let before = host.check(
        "[ -e /sys/class/net/eth0 ] && echo eth0=yes || echo eth0=no",
        10,
    )?;
    let t = Instant::now();
    host.check("vdpa dev add name $CARD mgmtdev vduse && wait_host 30", 60)?;
    let added = t.elapsed();
    let user_ok = before.contains("eth0=no") && host.binding()?.ok(super::DEFAULT_MTU);
    let pinged = host.pings(2)?.iter().all(|(_, p)| p.ok());
    let (rc, gone) = host.stop_card_and_wait_gone()?;
    let user_cleaned = rc == 0 && gone;
    let vhost = host.check(
        "card_start --vduse-bind vhost
         n=0; until [ -e /sys/bus/vdpa/devices/$CARD/driver ]; do n=$((n + 1)); [ $n -gt 300 ] && break; sleep 0.1; done
         sleep 1
         echo driver=$(basename $(readlink /sys/bus/vdpa/devices/$CARD/driver))
         echo chardev=$(ls /sys/bus/vdpa/devices/$CARD/ | grep vhost-vdpa)
         [ -e /sys/class/net/eth0 ] && echo eth0=yes || echo eth0=no",
        60,
    )?;
    let kv = key_values(&vhost);
    let chardev = kv.get("chardev").cloned().unwrap_or_default();
    let vhost_ok = kv.get("driver").map(String::as_str) == Some("vhost_vdpa")
        && chardev.starts_with("vhost-vdpa-")
        && kv.get("eth0").map(String::as_str) == Some("no");
    // A VMM's part, played by the helper: memory through the IOTLB, one datagram each way, the
    // ring bases read back through the daemon.
    let frontend = host.sh(
        &format!(
            "ip -n $NS addr add $CARD4/24 dev $CARD 2>/dev/null; ip -n $NS link set $CARD up
             rm -f /tmp/v.ready /tmp/v.out
             incard {helper} guest udp-count 7000 /tmp/v.ready 3 > /tmp/v.out 2>&1 &
             until [ -e /tmp/v.ready ]; do sleep 0.05; done
             {helper} guest vdpa-frontend /dev/{chardev} $(incard cat /sys/class/net/$CARD/address) \
                 \"/usr/local/sbin/ip netns exec $NS {helper} guest udp-frames $CARD MAC $CARD4 10.77.0.9 7001 1 good\"
             echo frontend_rc=$?
             wait
             sed 's/received=/card_received=/' /tmp/v.out",
            helper = crate::guest::HELPER
        ),
        60,
    )?;
    let fk = key_values(&frontend.out);
    let fget = |k: &str| fk.get(k).cloned().unwrap_or_default();
    let frontend_ok = fget("frontend_rc") == "0"
        && fget("tx_used") == "1"
        && fget("card_received") == "1"
        && fget("rx_payload_ok") == "1"
        && fget("base_tx") == "1"
        && fget("base_rx") == fget("rx_used");
    let rc2 = host.stop_card("TERM")?;
    host.check("[ ! -e /dev/vduse/$CARD ]", 10)?;
    host.start_card("")?;
    let ok = user_ok && pinged && user_cleaned && vhost_ok && frontend_ok && rc2 == 0;
    Ok((
        ok,
        format!(
            "--vduse-bind none: no interface until `vdpa dev add name {CARD} mgmtdev vduse`, then \
             eth0 in {:.1} s, virtio_net, pings {}, SIGTERM {}; --vduse-bind vhost: driver {}, \
             /dev/{chardev}, no host interface; a vhost-vdpa frontend on it (memory through the \
             IOTLB): {}",
            added.as_secs_f64(),
            if pinged { "pass" } else { "FAIL" },
            if user_cleaned {
                "removed it all"
            } else {
                "did NOT clean up"
            },
            kv.get("driver").cloned().unwrap_or_default(),
            if frontend_ok {
                format!(
                    "1 datagram each way (RX {} bytes, after {} other frame(s) from the \
                     card's stack), ring bases read back TX {} RX {}",
                    fget("rx_len"),
                    fget("rx_used")
                        .parse::<u32>()
                        .unwrap_or(1)
                        .saturating_sub(1),
                    fget("base_tx"),
                    fget("base_rx")
                )
            } else {
                format!("FAILED: {}", frontend.out.trim().replace('\n', "; "))
            }
        ),
    ))
}
