//! The bench's output: a table on stdout and in `results.md`, every run in `results.json`, a
//! plot in `bench.png` (plot.rs), and the targets checked against the figures.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use super::vm::median;
use super::{Backend, Dir, Frontend, Row};

pub struct Meta {
    /// Percentage of CPU time stolen by the hypervisor during the run.
    pub steal: Option<f64>,
    pub smoke: bool,
    pub reps: usize,
    pub window: f64,
    pub load: String,
    pub minutes: f64,
    pub huge: bool,
    pub card_args: String,
    /// `--card-bin`, when given.
    pub card_bin: Option<String>,
    /// `--baseline-bin`, when given.
    pub baseline_bin: Option<String>,
}

/// With `--baseline-bin`: for each case and frontend, vhost-card against "vhost-card before",
/// run by run (the two ran next to each other in every round, so the machine's load hit both
/// alike), the median of those ratios: frames per second, and CPU time per frame.
pub fn before_after(rows: &[Row]) -> String {
    let mut t = String::new();
    for before in rows.iter().filter(|r| r.backend == Backend::CardBefore) {
        let Some(after) = find(rows, before, before.frontend, Backend::Card) else {
            continue;
        };
        let pairs = || after.samples.iter().zip(&before.samples);
        let pps: Vec<f64> = pairs()
            .filter(|(a, b)| a.pps > 0.0 && b.pps > 0.0)
            .map(|(a, b)| a.pps / b.pps)
            .collect();
        let cpu: Vec<f64> = pairs()
            .filter(|(a, b)| a.pps > 0.0 && b.pps > 0.0 && b.cpu > 0.0)
            .map(|(a, b)| (a.cpu / a.pps) / (b.cpu / b.pps))
            .collect();
        let n = pps.len();
        if let Some(p) = median(&pps) {
            let _ = writeln!(
                t,
                "| {} | {} | {p:.3} | {} | {n} |",
                before.case.label(),
                before.frontend.name(),
                fmt_ratio(median(&cpu)),
            );
        }
    }
    if t.is_empty() {
        return t;
    }
    format!(
        "\nvhost-card ÷ vhost-card before, run by run (medians of the per-run ratios):\n\n\
         | case | frontend | Mpps after ÷ before | CPU per frame after ÷ before | runs |\n\
         |---|---|---:|---:|---:|\n{t}"
    )
}

fn find<'a>(rows: &'a [Row], r: &Row, f: Frontend, b: Backend) -> Option<&'a Row> {
    rows.iter()
        .find(|x| x.case.label() == r.case.label() && x.frontend == f && x.backend == b)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}"))
}

/// The markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::new();
    t.push_str("| case | frontend | backend | Mpps | Gbit/s | CPU s/GB | ÷ DPDK pair | ÷ memcpy | ÷ raw tap |\n");
    t.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|\n");
    for r in rows.iter().filter(|r| !r.case.overhead) {
        let m = r.median();
        let (pps, gbps) = match m {
            Some(m) => (
                format!("{:.3}", m.pps / 1e6),
                format!("{:.2}", m.bps * 8.0 / 1e9),
            ),
            None => ("n/a".into(), "n/a".into()),
        };
        let bps = m.map(|m| m.bps);
        let of =
            |f: Frontend, b: Backend| find(rows, r, f, b).and_then(|x| x.median()).map(|m| m.bps);
        let (vs_pair, vs_mem, vs_tap) = match r.backend {
            Backend::Card
            | Backend::CardWritev
            | Backend::CardBefore
            | Backend::Pair
            | Backend::RawTap => (
                if matches!(
                    r.backend,
                    Backend::Card | Backend::CardWritev | Backend::CardBefore
                ) {
                    fmt_ratio(ratio(bps, of(r.frontend, Backend::Pair)))
                } else {
                    "-".into()
                },
                fmt_ratio(ratio(bps, of(Frontend::None, Backend::Memcpy))),
                if r.backend == Backend::RawTap {
                    "-".into()
                } else {
                    fmt_ratio(ratio(bps, of(Frontend::None, Backend::RawTap)))
                },
            ),
            Backend::Memcpy => ("-".into(), "-".into(), "-".into()),
        };
        let cpu = r.cpu_per_gb().map_or("-".into(), |c| format!("{c:.3}"));
        let backend = match &r.na {
            Some(why) => format!("{} — {why}", r.backend.name()),
            None => r.backend.name().to_string(),
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {pps} | {gbps} | {cpu} | {vs_pair} | {vs_mem} | {vs_tap} |",
            r.case.label(),
            r.frontend.name(),
            backend
        );
    }
    t
}

/// The overhead group's table: the ceiling is the raw tap in the same condition; "ns added" is
/// what each frame costs beyond it (1/rate - 1/ceiling); "at tap ÷ taken" (host to card) is the
/// tap's received frames over the frames the frontend saw taken from its ring, both counted
/// from the start of the run (see `Sample::reached`).
pub fn overhead_table(rows: &[Row]) -> String {
    let mut t = String::new();
    t.push_str("| case | frontend | backend | Mpps | Gbit/s | ns/frame added | CPU s/GB | ÷ ceiling | ÷ DPDK pair | at tap ÷ taken |\n");
    t.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows.iter().filter(|r| r.case.overhead) {
        let backend = match &r.na {
            Some(why) => format!("{} — {why}", r.backend.name()),
            None => r.backend.name().to_string(),
        };
        let Some(m) = r.median() else {
            let _ = writeln!(
                t,
                "| {} | {} | {backend} | n/a | n/a | - | - | - | - | - |",
                r.case.label(),
                r.frontend.name()
            );
            continue;
        };
        let of = |f: Frontend, b: Backend| find(rows, r, f, b).and_then(|x| x.median());
        let ceiling = of(Frontend::None, Backend::RawTap).map(|c| c.pps);
        let is_card = matches!(r.backend, Backend::Card | Backend::CardBefore);
        let added = match ceiling {
            Some(c) if r.backend != Backend::RawTap && c > 0.0 && m.pps > 0.0 => {
                format!("{:.0}", (1.0 / m.pps - 1.0 / c) * 1e9)
            }
            _ => "-".into(),
        };
        let vs_ceiling = if r.backend == Backend::RawTap {
            "-".into()
        } else {
            fmt_ratio(ratio(Some(m.pps), ceiling))
        };
        let vs_pair = if is_card {
            fmt_ratio(ratio(
                Some(m.pps),
                of(r.frontend, Backend::Pair).map(|p| p.pps),
            ))
        } else {
            "-".into()
        };
        let honest = m.reached.map_or("-".into(), |r| format!("{r:.4}"));
        let cpu = r.cpu_per_gb().map_or("-".into(), |c| format!("{c:.3}"));
        let _ = writeln!(
            t,
            "| {} | {} | {backend} | {:.3} | {:.2} | {added} | {cpu} | {vs_ceiling} | {vs_pair} | {honest} |",
            r.case.label(),
            r.frontend.name(),
            m.pps / 1e6,
            m.bps * 8.0 / 1e9,
        );
    }
    t
}

/// The issue-15 targets the overhead group can decide (vhost-card against the raw tap ceiling
/// and the DPDK pair, in pps).
pub fn overhead_targets(rows: &[Row]) -> String {
    let mut t = String::new();
    let pps = |label: &str, f: Frontend, b: Backend| {
        rows.iter()
            .find(|r| r.case.label() == label && r.frontend == f && r.backend == b)
            .and_then(|r| r.median())
            .map(|m| m.pps)
    };
    let mut check = |what: String, r: Option<f64>, goal: f64| {
        if let Some(r) = r {
            let _ = writeln!(
                t,
                "- {what}: {r:.2} (target ≥ {goal}): {}",
                if r >= goal { "met" } else { "NOT met" }
            );
        }
    };
    for (dir, f) in [
        ("h2c", Frontend::Testpmd),
        ("c2h", Frontend::Own),
        ("c2h", Frontend::Testpmd),
    ] {
        for size in [64, 65000] {
            let label = format!("overhead {dir} {size}B q1");
            let card = pps(&label, f, Backend::Card);
            check(
                format!("{label} ({}): vhost-card ÷ raw tap ceiling", f.name()),
                ratio(card, pps(&label, Frontend::None, Backend::RawTap)),
                0.9,
            );
            if dir == "h2c" {
                check(
                    format!("{label} ({}): vhost-card ÷ DPDK pair", f.name()),
                    ratio(card, pps(&label, f, Backend::Pair)),
                    if size == 64 { 1.0 } else { 3.0 },
                );
            }
        }
    }
    t
}

/// The targets of the issue that this run can decide.
pub fn targets(rows: &[Row]) -> String {
    let mut t = String::new();
    let get = |label: &str, f: Frontend, b: Backend| {
        rows.iter()
            .find(|r| r.case.label() == label && r.frontend == f && r.backend == b)
            .and_then(|r| {
                r.median()
                    .map(|m| (m, r.na.clone()))
                    .or(Some((Default::default(), r.na.clone())))
            })
    };
    for dir in ["h2c", "c2h"] {
        let label = format!("{dir} 65000B q1");
        let card = get(&label, Frontend::Own, Backend::Card);
        let pair = get(&label, Frontend::Own, Backend::Pair);
        let tap = get(&label, Frontend::None, Backend::RawTap);
        if let Some((c, _)) = card {
            match pair {
                Some((p, None)) if p.bps > 0.0 => {
                    let r = c.bps / p.bps;
                    let _ = writeln!(
                        t,
                        "- P2 {label}: vhost-card ÷ DPDK pair = {r:.2} (target ≥ 3): {}",
                        if r >= 3.0 { "met" } else { "NOT met" }
                    );
                }
                Some((_, Some(why))) => {
                    let _ = writeln!(t, "- P2 {label}: DPDK pair cannot carry it ({why}); vhost-card carries {:.2} Gbit/s", c.bps * 8.0 / 1e9);
                }
                _ => {}
            }
            if let Some((tp, None)) = tap {
                if tp.bps > 0.0 {
                    let r = c.bps / tp.bps;
                    let _ = writeln!(
                        t,
                        "- P2 {label}: vhost-card ÷ raw tap = {r:.2} (target ≥ 0.8): {}",
                        if r >= 0.8 { "met" } else { "NOT met" }
                    );
                }
            }
        }
        let label = format!("{dir} 64B q1");
        for f in [Frontend::Own, Frontend::Testpmd] {
            let card = get(&label, f, Backend::Card);
            let pair = get(&label, f, Backend::Pair);
            if let (Some((c, None)), Some((p, None))) = (card, pair) {
                if p.pps > 0.0 {
                    let r = c.pps / p.pps;
                    let _ = writeln!(t, "- P3 {label} ({}): vhost-card ÷ DPDK pair = {r:.2} Mpps/Mpps (target ≥ 1): {}", f.name(), if r >= 1.0 { "met" } else { "NOT met" });
                }
            }
        }
    }
    t
}

/// results.json: the run's conditions and every row with its runs and median.
fn json(rows: &[Row], meta: &Meta) -> serde_json::Value {
    let round = |x: f64, places: i32| {
        let f = 10f64.powi(places);
        (x * f).round() / f
    };
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            json!({
                "case": r.case.label(),
                "direction": match r.case.dir {
                    Dir::H2c => "host-to-card",
                    Dir::C2h => "card-to-host",
                },
                "frame": r.case.frame_bytes(),
                "uso": r.case.uso,
                "queues": r.case.queues,
                "frontend": r.frontend.name(),
                "backend": r.backend.name(),
                "median": r.median().map(|m| json!({
                    "mpps": round(m.pps / 1e6, 4),
                    "gbit_s": round(m.bps * 8.0 / 1e9, 3),
                    "cpu_s_per_gb": r.cpu_per_gb().map(|c| round(c, 4)),
                })),
                "runs": r.samples.iter().map(|s| json!({
                    "pps": s.pps.round(),
                    "bytes_per_s": s.bps.round(),
                    "cpu": round(s.cpu, 3),
                })).collect::<Vec<_>>(),
                "overhead": r.case.overhead,
                "reached_tap": r.samples.iter().map(|s| s.reached.map(|x| round(x, 5))).collect::<Vec<_>>(),
                "not_applicable": r.na,
            })
        })
        .collect();
    json!({
        "steal_percent": meta.steal.map(|s| round(s, 2)),
        "smoke": meta.smoke,
        "reps": meta.reps,
        "window_s": meta.window,
        "load_average": meta.load,
        "minutes": round(meta.minutes, 1),
        "hugepages": meta.huge,
        "card_args": meta.card_args,
        "card_bin": meta.card_bin,
        "baseline_bin": meta.baseline_bin,
        "rows": rows,
    })
}

/// Redraws `dir`/bench.png from the results.json at `results`.
pub fn replot(results: &Path, dir: &Path) -> Result<()> {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(results)
            .with_context(|| format!("reading {}", results.display()))?,
    )?;
    super::plot::draw(&doc, dir)?;
    println!("bench: plot(s) in {}", dir.display());
    Ok(())
}

pub fn write(dir: &Path, rows: &[Row], meta: &Meta) -> Result<()> {
    let mut table = table(rows);
    let mut targets = targets(rows);
    if rows.iter().any(|r| r.case.overhead) {
        if rows.iter().all(|r| r.case.overhead) {
            table.clear();
        }
        let _ = write!(
            table,
            "\nOverhead group (nothing behind the tap; the ceiling is the raw tap in the same \
             condition):\n\n{}",
            overhead_table(rows)
        );
        targets.push_str(&overhead_targets(rows));
    }
    table.push_str(&before_after(rows));
    let md = format!(
        "Medians of {} run(s), {:.1} s windows, backends alternated; load average at the end: {} \
         (the bench's own busy-polling DPDK threads count in it); CPU stolen by the hypervisor \
         during the run: {}; {:.1} minutes; DPDK hugepages: {}{}.\n\n{table}\n{targets}",
        meta.reps,
        meta.window,
        meta.load,
        meta.steal.map_or("unknown".into(), |s| format!("{s:.1} %")),
        meta.minutes,
        if meta.huge { "yes" } else { "no (--no-huge)" },
        if meta.card_args.is_empty() {
            String::new()
        } else {
            format!("; vhost-card {}", meta.card_args)
        } + &meta
            .card_bin
            .as_ref()
            .map_or(String::new(), |b| format!("; vhost-card binary {b}"))
            + &meta
                .baseline_bin
                .as_ref()
                .map_or(String::new(), |b| format!("; vhost-card before: {b}"))
    );
    std::fs::write(dir.join("results.md"), &md)?;
    let doc = json(rows, meta);
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    println!("\n{md}");
    match super::plot::draw(&doc, dir) {
        Ok(()) => println!(
            "bench: table in {0}/results.md, runs in {0}/results.json, plots in {0}/*.png",
            dir.display()
        ),
        Err(e) => println!(
            "bench: no plot ({e:#}); table in {}/results.md",
            dir.display()
        ),
    }
    Ok(())
}
