//! Scenario 5: the card plugged into a running VM through QMP, used, and
//! unplugged cleanly.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::{matrix_mib, Options, DEFAULT_MTU, MIB};
use crate::card::{self, CardConfig};
use crate::qmp::Qmp;
use crate::rig::{Env, Plug, Rig};
use serde_json::{json, Value as Json};

/// Scenario 5: plug the card into a running VM through QMP, use it, unplug it.
pub fn run(env: &Env, opts: &Options) -> Result<(bool, String)> {
    let cfg = CardConfig {
        mtu: DEFAULT_MTU,
        disable: String::new(),
        queues: 1,
        args: Vec::new(),
    };
    let mut rig = Rig::boot(env, "hotplug", &cfg, Plug::Later)?;
    let result = hotplug_steps(&mut rig, env, opts);
    rig.finish(result)
}

fn hotplug_steps(rig: &mut Rig, env: &Env, opts: &Options) -> Result<(bool, String)> {
    let before = rig.vm.check(
        "[ -e /sys/class/net/eth0 ] && echo eth0=present || echo eth0=absent",
        Duration::from_secs(10),
    )?;
    if !before.contains("eth0=absent") {
        bail!("the guest has an eth0 before the card is plugged in");
    }
    let mut qmp = Qmp::connect(&rig.vm.qmp)?;
    let socket = rig.card.socket.display().to_string();
    let t_plug = Instant::now();
    qmp.execute(
        "chardev-add",
        Some(json!({
            "id": "card-chr",
            "backend": {
                "type": "socket",
                "data": {
                    "addr": { "type": "unix", "data": { "path": socket } },
                    "server": false,
                    "reconnect": 1,
                },
            },
        })),
    )?;
    qmp.execute(
        "netdev_add",
        Some(json!({ "type": "vhost-user", "id": "card-net", "chardev": "card-chr" })),
    )?;
    qmp.execute(
        "device_add",
        Some(json!({
            "driver": "virtio-net-pci",
            "id": "card-nic",
            "netdev": "card-net",
            "bus": "rp1",
            "mac": card::MAC,
            "host_mtu": DEFAULT_MTU,
            "vectors": 0,
        })),
    )?;
    rig.vm.check("wait_eth0 60", Duration::from_secs(70))?;
    let t_bound = t_plug.elapsed();
    rig.vm.check("net_up", Duration::from_secs(30))?;
    let f = rig.features(env)?;
    let mut problems = f.problems();
    if f.mtu != Some(DEFAULT_MTU) || f.driver != "virtio_net" {
        problems.push(format!("driver {} MTU {:?}", f.driver, f.mtu));
    }
    let pings = rig.pings(2)?;
    if !pings.ok() {
        problems.push(pings.describe());
    }
    let len = matrix_mib(opts) * MIB;
    let up = rig.send_to_card(env, len)?;
    let down = rig.send_to_guest(env, len)?;
    if !up.ok {
        problems.push(format!("guest→card {}", up.describe()));
    }
    if !down.ok {
        problems.push(format!("card→guest {}", down.describe()));
    }
    // Which guest driver serves the slot: QEMU 7.2's q35 hands root-port
    // hot-plug to ACPI by default (acpiphp); native PCIe (pciehp) is used
    // only when the firmware grants it through _OSC.
    let how = rig.vm.check(
        "dmesg | grep -i -E 'pciehp|acpiphp|_OSC' | tail -n 5
         for m in pciehp acpiphp; do [ -d /sys/module/$m ] && echo builtin=$m; done; true",
        Duration::from_secs(10),
    )?;
    let builtin: Vec<&str> = how
        .lines()
        .filter_map(|l| l.strip_prefix("builtin="))
        .collect();
    let driver = if how.contains("acpiphp: Slot") {
        "ACPI hot-plug (acpiphp)"
    } else if how.contains("pciehp") {
        "native PCIe hot-plug (pciehp)"
    } else {
        "its PCI hot-plug driver"
    };
    let driver = format!(
        "{driver}; built into the Debian kernel: {}",
        if builtin.is_empty() {
            "?".into()
        } else {
            builtin.join(", ")
        }
    );

    // Unplug: the guest releases the device, then the backend goes.
    let t_unplug = Instant::now();
    qmp.execute("device_del", Some(json!({ "id": "card-nic" })))?;
    qmp.wait_event("DEVICE_DELETED", Duration::from_secs(60), |data| {
        data.get("device").and_then(Json::as_str) == Some("card-nic")
    })?;
    let t_deleted = t_unplug.elapsed();
    qmp.execute("netdev_del", Some(json!({ "id": "card-net" })))?;
    // QEMU deletes a vhost-user netdev's chardev along with it; remove it
    // ourselves only if it is still there.
    let chardev_gone = if chardev_exists(&mut qmp, "card-chr")? {
        qmp.execute("chardev-remove", Some(json!({ "id": "card-chr" })))?;
        "chardev-remove"
    } else {
        "chardev gone with the netdev"
    };
    if chardev_exists(&mut qmp, "card-chr")? {
        problems.push("chardev card-chr still exists".into());
    }
    let gone = rig.vm.check(
        "n=0; while [ -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do n=$((n + 1)); sleep 0.1; done
         [ -e /sys/class/net/eth0 ] && echo eth0=present || echo eth0=absent",
        Duration::from_secs(20),
    )?;
    if !gone.contains("eth0=absent") {
        problems.push("eth0 still there after DEVICE_DELETED".into());
    }
    let saw_disconnect = crate::process::wait_for(
        "the daemon to see the disconnect",
        Duration::from_secs(10),
        || {
            Ok(rig
                .card
                .log_lines()?
                .iter()
                .any(|l| l.contains("frontend disconnected") || l.contains("session ended"))
                .then_some(()))
        },
    )
    .is_ok();
    if !saw_disconnect {
        problems.push("the daemon did not log the disconnect".into());
    }
    if !rig.card.alive()? {
        problems.push("the daemon exited".into());
    }
    let text = format!(
        "q35 + pcie-root-port rp1, \
         guest uses {driver}: chardev-add/netdev_add/device_add → eth0 bound after {:.1} s, \
         {} MTU {}, {}; {} MiB guest→card {}, card→guest {}; \
         device_del → DEVICE_DELETED after {:.1} s, netdev_del, {chardev_gone}, eth0 gone, \
         daemon saw the disconnect and keeps listening{}",
        t_bound.as_secs_f64(),
        f.driver,
        f.mtu.unwrap_or(0),
        pings.describe(),
        matrix_mib(opts),
        up.describe(),
        down.describe(),
        t_deleted.as_secs_f64(),
        if problems.is_empty() {
            String::new()
        } else {
            format!("; PROBLEMS: {}", problems.join("; "))
        }
    );
    Ok((problems.is_empty(), text))
}

/// Whether QEMU has a chardev with this id.
fn chardev_exists(qmp: &mut Qmp, id: &str) -> Result<bool> {
    let list = qmp.execute("query-chardev", None)?;
    Ok(match list {
        Json::Array(items) => items
            .iter()
            .any(|c| c.get("label").and_then(Json::as_str) == Some(id)),
        _ => false,
    })
}
