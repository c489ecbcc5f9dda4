//! Scenario 3: the toggle matrix. Each offload switched off on the daemon's
//! command line, at MTU 1500 and 65520, one VM per configuration.

use std::time::Instant;

use anyhow::{Context, Result};

use super::{matrix_mib, Line, Options, DEFAULT_MTU, MIB};
use crate::card::CardConfig;
use crate::features;
use crate::rig::{Env, Plug, Rig};

/// The toggle matrix: a name and the `--disable` list.
const TOGGLES: &[(&str, &str)] = &[
    ("csum", "csum,host-tso4,host-tso6"),
    ("guest-csum", "guest-csum,guest-tso4,guest-tso6"),
    ("host-tso", "host-tso4,host-tso6"),
    ("guest-tso", "guest-tso4,guest-tso6"),
    ("mrg-rxbuf", "mrg-rxbuf"),
];

/// Scenario 3: each toggle at both MTUs: bits follow the offer, traffic passes.
pub fn run(env: &Env, opts: &Options) -> Line {
    let t0 = Instant::now();
    let len = matrix_mib(opts) * MIB;
    let mut passed = 0;
    let mut failures = Vec::new();
    let mut total = 0;
    'matrix: for mtu in [1500, DEFAULT_MTU] {
        for (name, disable) in TOGGLES {
            total += 1;
            let cfg = CardConfig {
                mtu,
                disable: disable.to_string(),
                queues: 1,
                args: Vec::new(),
            };
            let rig_name = format!("toggle-{name}-{mtu}");
            let result = toggle_one(env, &rig_name, &cfg, len);
            let (ok, text) = match result {
                Ok(r) => r,
                Err(err) => (
                    false,
                    format!("{err:#} (logs in {})", env.logs.join(&rig_name).display()),
                ),
            };
            println!(
                "  3.{total:<2} {} --disable {disable} --mtu {mtu}: {text}",
                if ok { "ok  " } else { "FAIL" }
            );
            if ok {
                passed += 1;
            } else {
                failures.push(format!("--disable {disable} --mtu {mtu}"));
            }
            if crate::check_interrupted().is_err() {
                break 'matrix;
            }
        }
    }
    let size_note = if matrix_mib(opts) < opts.mib {
        format!(
            " ({} MiB rather than {} keeps the 10-VM matrix within ~15 min under TCG)",
            matrix_mib(opts),
            opts.mib
        )
    } else {
        String::new()
    };
    Line {
        number: 3,
        pass: passed == total && total == 2 * TOGGLES.len(),
        text: format!(
            "toggles: {passed}/{total} configurations (5 toggles × MTU 1500 and 65520) \
             bound with the expected bits and MTU, \
             pinged both ways and moved {} MiB each way with equal sha256{size_note}; \
             {:.0} s{}",
            matrix_mib(opts),
            t0.elapsed().as_secs_f64(),
            if failures.is_empty() {
                String::new()
            } else {
                format!("; failed: {}", failures.join(", "))
            }
        ),
    }
}

fn toggle_one(env: &Env, name: &str, cfg: &CardConfig, len: usize) -> Result<(bool, String)> {
    let mut rig = Rig::boot(env, name, cfg, Plug::Boot)?;
    let f = rig.features(env)?;
    let mut problems = f.problems();
    // The disabled bits must be gone from the guest's word.
    let mut removed = Vec::new();
    for feature in cfg.disable.split(',') {
        let bit = *env
            .table
            .get(feature)
            .with_context(|| format!("vhost-card has no feature {feature}"))?;
        removed.push(features::name(bit));
        if f.guest & 1 << bit != 0 {
            problems.push(format!("guest still has {}", features::name(bit)));
        }
    }
    if f.mtu != Some(cfg.mtu) || f.driver != "virtio_net" {
        problems.push(format!("driver {} MTU {:?}", f.driver, f.mtu));
    }
    let pings = rig.pings(2)?;
    if !pings.ok() {
        problems.push(pings.describe());
    }
    let up = rig.send_to_card(env, len)?;
    let down = rig.send_to_guest(env, len)?;
    if !up.ok {
        problems.push(format!("guest→card {}", up.describe()));
    }
    if !down.ok {
        problems.push(format!("card→guest {}", down.describe()));
    }
    rig.vm.shutdown().ok();
    let (stopped, stop_ok) = rig.card.stop()?;
    if !stop_ok {
        problems.push(format!("daemon {stopped}"));
    }
    let text = format!(
        "guest {:#x} (-{}), MTU {}, ping {}/{} ms, TCP {:.1}/{:.1} MB/s up/down{}",
        f.guest,
        removed.join(" -"),
        f.mtu.unwrap_or(0),
        pings.guest[0].1.avg().unwrap_or("?"),
        pings.card[0].1.avg().unwrap_or("?"),
        up.transfer.mb_per_s(),
        down.transfer.mb_per_s(),
        if problems.is_empty() {
            String::new()
        } else {
            format!("; PROBLEMS: {}; {}", problems.join("; "), rig.evidence())
        }
    );
    Ok((problems.is_empty(), text))
}
