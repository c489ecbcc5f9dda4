//! Scenario 13: live handover (issue 12). While the payload crosses by TCP each way between the
//! stock guest and the card, `vhost-card upgrade` makes a new process of the daemon's binary
//! take the session over, again and again ([`HANDOVERS`] in all, half during each transfer).
//! Bounds: sha256 equal, no carrier change in the guest, no reconnect (the daemon's session
//! count and log), and the longest gap between consecutive frames on card0 during each
//! transfer at most [`MAX_GAP_MS`], from a capture with the kernel's receive times. Reported:
//! the outage each upgrade printed and the gap around each handover, median and worst.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use super::{Options, DEFAULT_MTU, MIB};
use crate::card::{self, CardConfig};
use crate::nsnet;
use crate::rig::{Env, Plug, Rig};

/// Handovers in one run, half during each transfer.
const HANDOVERS: usize = 20;
/// Time between two handovers: spread over a transfer of some seconds under TCG.
const EVERY: Duration = Duration::from_millis(100);
/// The bound on the longest gap between frames on the tap (issue 12).
const MAX_GAP_MS: f64 = 50.0;

/// One `vhost-card upgrade`: when it ran (ns since the epoch), the new pid, the outage it
/// printed.
struct Upgrade {
    start: u64,
    end: u64,
    pid: u32,
    outage_ms: f64,
}

pub(super) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Runs `vhost-card upgrade --control PATH`, its stderr (and the new daemon's log) appended to
/// the card's log.
fn upgrade(control: &Path, log: &Path) -> Result<Upgrade> {
    let start = now_ns();
    let out = Command::new(card::binary())
        .args(["upgrade", "--control"])
        .arg(control)
        .stdin(Stdio::null())
        .stderr(std::fs::OpenOptions::new().append(true).open(log)?)
        .output()?;
    let end = now_ns();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "upgrade failed ({}): {text}",
        out.status
    );
    let (pid, outage_ms) = rig::card::parse_upgrade(&text)?;
    Ok(Upgrade {
        start,
        end,
        pid,
        outage_ms,
    })
}

/// Runs `transfer` while a thread hands the session over up to `n` times, one every
/// [`EVERY`] from [`EVERY`] after the start until the transfer ends; returns the transfer's
/// result, its window (ns since the epoch) and the upgrades.
fn with_handovers<T>(
    control: &Path,
    log: &Path,
    n: usize,
    transfer: impl FnOnce() -> Result<T>,
) -> Result<(T, (u64, u64), Vec<Upgrade>)> {
    let done = Arc::new(AtomicBool::new(false));
    let (control, log, flag) = (control.to_path_buf(), log.to_path_buf(), done.clone());
    let upgrader = std::thread::spawn(move || -> Result<Vec<Upgrade>> {
        let mut done = Vec::new();
        while done.len() < n && !flag.load(Ordering::SeqCst) {
            std::thread::sleep(EVERY);
            if flag.load(Ordering::SeqCst) {
                break;
            }
            done.push(upgrade(&control, &log)?);
        }
        Ok(done)
    });
    let t0 = now_ns();
    let result = transfer();
    let t1 = now_ns();
    done.store(true, Ordering::SeqCst);
    let upgrades = upgrader
        .join()
        .map_err(|_| anyhow::anyhow!("the upgrade thread panicked"))??;
    Ok((result?, (t0, t1), upgrades))
}

/// The longest interval between consecutive frames (ms) among those in `[from, to]`, with the
/// frames just outside on either side (so a gap that begins before the window counts).
fn longest_gap(times: &[u64], from: u64, to: u64) -> f64 {
    let first = times.partition_point(|&t| t < from).saturating_sub(1);
    let last = (times.partition_point(|&t| t <= to) + 1).min(times.len());
    times[first..last]
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0) as f64
        / 1e6
}

/// The longest interval between consecutive frames (ms) of those in the window `w` (ns since
/// the epoch, both ends in), i.e. between a transfer's first and last frame; `times` sorted.
pub(super) fn longest_gap_within(times: &[u64], w: (u64, u64)) -> f64 {
    let (a, b) = (
        times.partition_point(|&t| t < w.0),
        times.partition_point(|&t| t <= w.1),
    );
    times[a..b]
        .windows(2)
        .map(|p| p[1] - p[0])
        .max()
        .unwrap_or(0) as f64
        / 1e6
}

fn median_worst(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => (0.0, 0.0),
        n => (s[n / 2], s[n - 1]),
    }
}

/// The daemon's session count, from its control socket.
pub(super) fn sessions(control: &Path) -> Result<u64> {
    let out = Command::new(card::binary())
        .args(["stats", "--json", "--control"])
        .arg(control)
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("stats: {}", String::from_utf8_lossy(&out.stderr)))?;
    v["state"]["sessions"]
        .as_u64()
        .context("no session count in the snapshot")
}

pub fn run(env: &Env, opts: &Options) -> Result<(bool, String)> {
    let control = std::env::temp_dir().join(format!("vhc-e2e-{}.control", std::process::id()));
    let cfg = CardConfig {
        mtu: DEFAULT_MTU,
        disable: String::new(),
        queues: 1,
        args: vec!["--control".into(), control.display().to_string()],
    };
    let mut rig = Rig::boot(env, "handover", &cfg, Plug::Boot)?;
    let mut serving = None;
    let result = scenario(&mut rig, env, opts, &control, &mut serving);
    // The last process to take over is nobody's child: stopped by its pid, before the rig
    // (and the card's namespace) goes.
    if let Some(pid) = serving {
        // SAFETY: kill has no memory effects; `pid` is the daemon this scenario made serve.
        unsafe { libc::kill(i32::try_from(pid).unwrap_or(0), libc::SIGTERM) };
    }
    let result = rig.finish(result);
    let _ = std::fs::remove_file(&control);
    result
}

/// The scenario: one measurement, and a second one only when the first failed while the same
/// transfers without a handover already crossed the bound (the machine's own gaps: TCG on a
/// loaded machine stalls the guest for more than the bound now and then). Both are reported.
fn scenario(
    rig: &mut Rig,
    env: &Env,
    opts: &Options,
    control: &Path,
    serving: &mut Option<u32>,
) -> Result<(bool, String)> {
    let first = measure(rig, env, opts, control, serving)?;
    if first.pass || first.baseline_within_bound {
        return Ok((first.pass, first.text));
    }
    let again = measure(rig, env, opts, control, serving)?;
    Ok((
        again.pass,
        format!(
            "{}\n  (measured again: the first run failed while its transfers without a handover \
             already crossed the bound, so the machine's own gaps could not be told from the \
             handovers': {})",
            again.text, first.text
        ),
    ))
}

/// One run of the measurement.
struct Measured {
    pass: bool,
    /// The same transfers without a handover stayed within [`MAX_GAP_MS`].
    baseline_within_bound: bool,
    text: String,
}

fn measure(
    rig: &mut Rig,
    env: &Env,
    opts: &Options,
    control: &Path,
    serving: &mut Option<u32>,
) -> Result<Measured> {
    let len = opts.mib * MIB;
    let log: PathBuf = rig.card.log_path().to_path_buf();
    let carrier = |rig: &mut Rig| -> Result<i64> {
        Ok(rig
            .nic_info()?
            .get("carrier_changes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1))
    };
    let carrier0 = carrier(rig)?;
    let sessions0 = sessions(control)?;
    let stop = Arc::new(AtomicBool::new(false));
    // The transfers' frames: guest→card on port 5001, card→guest on 5002 (`rig`).
    let cap = nsnet::capture_times(
        rig.card.ns.name(),
        card::TAP,
        vec![5001, 5002],
        stop.clone(),
    )?;
    // The card's kernel around each phase: what the tap's queue dropped and what TCP resent.
    let kernel = |rig: &Rig| crate::soak::kernel_counters(&rig.card.ns);
    let k0 = kernel(rig)?;
    // The same transfers without a handover first: the gaps this machine makes on its own.
    let base_up = with_handovers(control, &log, 0, || rig.send_to_card(env, len))?;
    let base_down = with_handovers(control, &log, 0, || rig.send_to_guest(env, len))?;
    let k1 = kernel(rig)?;
    let half = HANDOVERS / 2;
    let up = with_handovers(control, &log, half, || rig.send_to_card(env, len));
    let up = up.and_then(|(up, w_up, h_up)| {
        let down = with_handovers(control, &log, HANDOVERS - half, || {
            rig.send_to_guest(env, len)
        })?;
        Ok(((up, w_up, h_up), down))
    });
    stop.store(true, Ordering::SeqCst);
    let times = nsnet::join(cap);
    let ((up, w_up, h_up), (down, w_down, h_down)) = up?;
    let mut times = times?;
    times.sort_unstable();
    *serving = h_down.last().or(h_up.last()).map(|u| u.pid);

    let carrier1 = carrier(rig)?;
    let sessions1 = sessions(control)?;
    let k2 = kernel(rig)?;
    let moved = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
        ["card0 tx_dropped", "qdisc drops", "tcp RetransSegs"]
            .iter()
            .map(|k| {
                let v = |m: &BTreeMap<String, u64>| m.get(*k).copied();
                format!(
                    "{k} +{}",
                    v(b).unwrap_or(0).saturating_sub(v(a).unwrap_or(0))
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    // A transfer's first and last frame.
    let span = |w: (u64, u64)| -> Option<(u64, u64)> {
        let (a, b) = (
            times.partition_point(|&t| t < w.0),
            times.partition_point(|&t| t <= w.1),
        );
        Some((*times.get(a)?, *times.get(b.checked_sub(1)?)?))
    };
    // The longest gap between a transfer's first and last frame.
    let inside = |w: (u64, u64)| longest_gap_within(&times, w);
    let (gap_up, gap_down) = (inside(w_up), inside(w_down));
    let (base_gap_up, base_gap_down) = (inside(base_up.1), inside(base_down.1));
    // The handovers that ran while a transfer's frames crossed, each with the longest gap
    // overlapping its run; the others (before the first frame, after the last) are listed
    // apart.
    let during = |w: (u64, u64), h: &'_ [Upgrade]| -> Vec<(f64, f64, bool)> {
        let s = span(w);
        h.iter()
            .map(|u| {
                let inside = s.is_some_and(|(first, last)| u.start > first && u.end < last);
                (u.outage_ms, longest_gap(&times, u.start, u.end), inside)
            })
            .collect()
    };
    let all: Vec<(f64, f64, bool)> = during(w_up, &h_up)
        .into_iter()
        .chain(during(w_down, &h_down))
        .collect();
    let in_up = during(w_up, &h_up).iter().filter(|d| d.2).count();
    let in_down = during(w_down, &h_down).iter().filter(|d| d.2).count();
    let outages: Vec<f64> = all.iter().map(|d| d.0).collect();
    let gaps: Vec<f64> = all.iter().filter(|d| d.2).map(|d| d.1).collect();
    let (out_med, out_worst) = median_worst(&outages);
    let (gap_med, gap_worst) = median_worst(&gaps);
    let still_one = sessions1 == sessions0;
    let pass = up.ok
        && down.ok
        && base_up.0.ok
        && base_down.0.ok
        && carrier1 == carrier0
        && still_one
        && in_up > 0
        && in_down > 0
        && gap_up <= MAX_GAP_MS
        && gap_down <= MAX_GAP_MS;
    Ok(Measured {
        pass,
        baseline_within_bound: base_gap_up <= MAX_GAP_MS && base_gap_down <= MAX_GAP_MS,
        text: format!(
            "{} handovers by `vhost-card upgrade` ({in_up} during {} MiB guest→card {}, \
             {in_down} during card→guest {}); outage printed: median {out_med:.1} ms, worst \
             {out_worst:.1} ms; longest gap between frames on {} around a handover during a transfer: median \
             {gap_med:.1} ms, worst {gap_worst:.1} ms; longest gap during the transfers: \
             guest→card {gap_up:.1} ms, card→guest {gap_down:.1} ms (bound {MAX_GAP_MS} ms, \
             {} frames captured; the same transfers without a handover: {base_gap_up:.1} ms \
             and {base_gap_down:.1} ms); guest carrier changes +{}; sessions {sessions0} → \
             {sessions1} ({} reconnect(s)); the card's kernel without handovers: {}, with \
             them: {}; each handover's outage / gap (ms): {}",
            all.len(),
            opts.mib,
            up.describe(),
            down.describe(),
            card::TAP,
            times.len(),
            carrier1 - carrier0,
            sessions1.saturating_sub(sessions0),
            moved(&k0, &k1),
            moved(&k1, &k2),
            all.iter()
                .map(|(o, g, inside)| if *inside {
                    format!("{o:.1}/{g:.1}")
                } else {
                    format!("{o:.1}/(no transfer)")
                })
                .collect::<Vec<_>>()
                .join(" "),
        ),
    })
}
