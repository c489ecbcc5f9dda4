//! `cargo xtask bench`: throughput of the card's data path, without a VM.
//!
//! Two frontends drive each backend over vhost-user: the project's own (`card-load`, the test
//! harness grown into a load generator) and DPDK's `dpdk-testpmd` with a `net_virtio_user` port
//! (txonly / rxonly). The backends: `vhost-card`, and DPDK's vhost PMD forwarding to DPDK's tap
//! PMD (`--forward-mode=io`) in the card's namespace. References in the same run: the raw tap
//! (`card-load tapw`/`tapr`: a tap with a vnet header and no virtio at all) and memcpy over the
//! same bytes. Host to card ends in a UDP sink in the card's namespace, whose count is the
//! figure; card to host starts at a UDP sender there and the frontend counts what arrives.
//!
//! Every figure is the median of `--reps` runs with the backends alternated (A B A B ...); the
//! table, a JSON file and a PNG plot land in `target/bench/`. `--smoke` is the short version CI
//! runs; `--vm` measures TCP through a real guest instead (see `vm.rs`).

mod plot;
pub mod procs;
mod report;
mod setup;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use procs::{cpu_seconds, wait_until, Proc};
use rig::netns::Netns;

/// What bench and soak build (release): the daemon and the load generator (bench/card-load).
pub const BINARIES: &[&str] = &[
    "--quiet",
    "-p",
    "vhost-card",
    "--bin",
    "vhost-card",
    "-p",
    "card-load",
    "--bin",
    "card-load",
];
pub const CARD_IP: &str = "10.88.0.1";
pub const HOST_IP: &str = "10.88.0.2";
/// The host's MAC as `card-load` uses it.
pub const HOST_MAC: &str = "52:54:00:be:4c:01";
pub const PORT: u16 = 9000;
/// Whether the daemon's extra arguments ask for the IP-only link.
fn link_ip(args: &[String]) -> bool {
    args.windows(2).any(|w| w[0] == "--link" && w[1] == "ip")
}

/// The card's MAC toward the host when the bench runs `--link ip`.
pub const IP_LINK_MAC: &str = "02:ca:4d:be:4c:02";
/// UDP GSO segment payload at a card MTU of 1500.
pub const USO_SEG: usize = 1472;

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// The short version (about 2 minutes): one run per figure, queue pair 1, a few cases.
    #[arg(long)]
    pub smoke: bool,
    /// TCP through a VM (stock kernel, QEMU TCG): vhost-card against QEMU's own tap backend.
    #[arg(long)]
    pub vm: bool,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Measurement window per run, in seconds.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Only cases whose label contains this (e.g. `h2c 64B`).
    #[arg(long)]
    pub only: Option<String>,
    /// Only the overhead group: the least kernel work behind the tap (host to card: frames the
    /// card's kernel drops on entry; card to host: an AF_PACKET producer), so what remains is
    /// the backend's own cost; the raw tap in the same condition is the ceiling.
    #[arg(long, conflicts_with = "delivered")]
    pub overhead: bool,
    /// Only the delivered-to-sink cases (frames counted at a UDP sink in the card's namespace,
    /// or at the frontend), without the overhead group.
    #[arg(long)]
    pub delivered: bool,
    /// Leave DPDK out (no testpmd frontend, no DPDK pair).
    #[arg(long)]
    pub no_dpdk: bool,
    /// Extra arguments for every vhost-card started (e.g. `--tx-uring`).
    #[arg(long, allow_hyphen_values = true)]
    pub card_args: Option<String>,
    /// The vhost-card binary to run instead of the release build (e.g. a copy of an older
    /// build, to measure before and after a change).
    #[arg(long)]
    pub card_bin: Option<PathBuf>,
    /// Also run this vhost-card binary (e.g. a copy of the build before a change), as rows of
    /// their own named "vhost-card before", in turn with the others: a before/after measured in
    /// the same run. The report adds, per case, the median of the runs' after ÷ before ratios.
    #[arg(long, value_name = "PATH")]
    pub baseline_bin: Option<PathBuf>,
    /// Where results go (default target/bench).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Measure nothing: redraw bench.png in --out from this results.json (e.g.
    /// `--replot bench/results.json --out bench`).
    #[arg(long, value_name = "RESULTS_JSON")]
    pub replot: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    H2c,
    C2h,
}

/// One traffic pattern.
#[derive(Debug, Clone)]
pub struct Case {
    pub dir: Dir,
    /// Frame length (Ethernet header included); for USO the GSO frame.
    pub size: usize,
    /// 64 KiB UDP GSO frames at a card MTU of 1500.
    pub uso: bool,
    pub queues: usize,
    /// The overhead group: nothing behind the tap but the kernel's cheapest path.
    pub overhead: bool,
}

impl Case {
    pub fn label(&self) -> String {
        let d = match self.dir {
            Dir::H2c => "h2c",
            Dir::C2h => "c2h",
        };
        let group = if self.overhead { "overhead " } else { "" };
        if self.uso {
            format!("{group}{d} 64K-USO q{}", self.queues)
        } else {
            format!("{group}{d} {}B q{}", self.size, self.queues)
        }
    }

    pub fn mtu(&self) -> u16 {
        if self.uso {
            1500
        } else {
            65520
        }
    }

    /// The bytes one frame stands for (what memcpy copies per frame).
    pub fn frame_bytes(&self) -> usize {
        if self.uso {
            42 + (65535 - 28) / USO_SEG * USO_SEG
        } else {
            self.size
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Frontend {
    Own,
    Testpmd,
    /// References (raw tap, memcpy) have no frontend.
    None,
}

impl Frontend {
    pub fn name(self) -> &'static str {
        match self {
            Frontend::Own => "card-load",
            Frontend::Testpmd => "testpmd",
            Frontend::None => "-",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backend {
    Card,
    /// vhost-card with one `writev` per TX frame instead of io_uring batches.
    CardWritev,
    /// Another vhost-card binary (`--baseline-bin`), the "before" of a before/after.
    CardBefore,
    Pair,
    RawTap,
    Memcpy,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Card => "vhost-card",
            Backend::CardWritev => "vhost-card writev",
            Backend::CardBefore => "vhost-card before",
            Backend::Pair => "dpdk vhost+tap",
            Backend::RawTap => "raw tap",
            Backend::Memcpy => "memcpy",
        }
    }
}

/// One run's rates.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub pps: f64,
    /// Bytes per second (Ethernet frames; GSO frames count as their segments would).
    pub bps: f64,
    /// CPU seconds of the backend per second.
    pub cpu: f64,
    /// Overhead group, host to card: the frames the tap received over the frames the frontend
    /// saw taken from its ring, both counted from the start to the end of the window
    /// (cumulative, so the two counters need not be read at the same instant: only the frames
    /// in flight, at most a ring, separate them). Speed bought by dropping shows here.
    pub reached: Option<f64>,
}

/// All runs of one (case, frontend, backend).
#[derive(Debug, Clone)]
pub struct Row {
    pub case: Case,
    pub frontend: Frontend,
    pub backend: Backend,
    pub samples: Vec<Sample>,
    /// Why there is no figure.
    pub na: Option<String>,
}

impl Row {
    pub fn median(&self) -> Option<Sample> {
        if self.samples.is_empty() {
            return None;
        }
        let med = |f: fn(&Sample) -> f64| {
            let mut v: Vec<f64> = self.samples.iter().map(f).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            let n = v.len();
            if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            }
        };
        let reached = self.samples.iter().filter(|s| s.reached.is_some()).count();
        Some(Sample {
            pps: med(|s| s.pps),
            bps: med(|s| s.bps),
            cpu: med(|s| s.cpu),
            reached: (reached == self.samples.len()).then(|| med(|s| s.reached.unwrap_or(0.0))),
        })
    }

    /// CPU seconds per GB moved.
    pub fn cpu_per_gb(&self) -> Option<f64> {
        let m = self.median()?;
        (m.bps > 0.0).then(|| m.cpu / (m.bps / 1e9))
    }
}

pub struct Ctx {
    pub bin: PathBuf,
    /// The vhost-card binary.
    pub card: PathBuf,
    /// The binary of the "vhost-card before" rows (`--baseline-bin`).
    pub baseline: Option<PathBuf>,
    pub logs: PathBuf,
    pub run_dir: PathBuf,
    pub huge: bool,
    pub warm: Duration,
    pub window: Duration,
    pub card_args: Vec<String>,
    runs: u32,
}

pub fn run(opts: &Options) -> Result<()> {
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| rig::paths::target_dir().join("bench"));
    std::fs::create_dir_all(&out)?;
    if let Some(results) = &opts.replot {
        return report::replot(results, &out);
    }
    if opts.vm {
        return vm::run(opts, &out);
    }
    let started = Instant::now();
    let env = setup::prepare(!opts.no_dpdk)?;
    let steal0 = steal();
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let run_dir = std::env::temp_dir().join(format!("bench-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let card = match &opts.card_bin {
        Some(p) => {
            std::fs::canonicalize(p).with_context(|| format!("--card-bin {}", p.display()))?
        }
        None => env.bin.join("vhost-card"),
    };
    let baseline = match &opts.baseline_bin {
        Some(p) => Some(
            std::fs::canonicalize(p).with_context(|| format!("--baseline-bin {}", p.display()))?,
        ),
        None => None,
    };
    let mut ctx = Ctx {
        card,
        baseline,
        bin: env.bin,
        logs,
        run_dir: run_dir.clone(),
        huge: env.huge,
        warm: Duration::from_secs_f64(if opts.smoke { 0.7 } else { 1.0 }),
        window: Duration::from_secs_f64(opts.seconds.unwrap_or(if opts.smoke { 1.5 } else { 3.0 })),
        card_args: opts
            .card_args
            .as_deref()
            .map(|s| s.split_whitespace().map(String::from).collect())
            .unwrap_or_default(),
        runs: 0,
    };
    let reps = if opts.smoke { 1 } else { opts.reps.max(1) };
    let groups = match (opts.overhead, opts.delivered) {
        (true, _) => Groups::Overhead,
        (_, true) => Groups::Delivered,
        _ => Groups::Both,
    };
    let mut cases = cases(opts.smoke, groups);
    if let Some(f) = &opts.only {
        cases.retain(|c| c.label().contains(f.as_str()));
    }
    if cases.is_empty() {
        bail!("no case matches --only");
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "bench: {} case(s), {reps} run(s) each, {:.1} s windows; load average {}",
        cases.len(),
        ctx.window.as_secs_f64(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let frontends: Vec<Frontend> = if opts.no_dpdk || opts.smoke {
        vec![Frontend::Own]
    } else {
        vec![Frontend::Own, Frontend::Testpmd]
    };
    let mut backends: Vec<Backend> = if opts.no_dpdk {
        vec![Backend::Card]
    } else {
        vec![Backend::Card, Backend::Pair]
    };
    if ctx.baseline.is_some() {
        backends.insert(1, Backend::CardBefore);
    }
    let mut rows: Vec<Row> = Vec::new();
    // Each case's rows, as (case, first row, end).
    let mut groups = Vec::new();
    for case in &cases {
        let mut combos: Vec<(Frontend, Backend)> = Vec::new();
        for &f in &frontends {
            for &b in &backends {
                combos.push((f, b));
            }
        }
        if case.dir == Dir::H2c && frontends.contains(&Frontend::Own) && !case.overhead {
            // The io_uring evaluation: the same daemon writing one frame per system call.
            combos.insert(1, (Frontend::Own, Backend::CardWritev));
        }
        combos.push((Frontend::None, Backend::RawTap));
        if !case.overhead {
            combos.push((Frontend::None, Backend::Memcpy));
        }
        let first = rows.len();
        for &(f, b) in &combos {
            rows.push(Row {
                case: case.clone(),
                frontend: f,
                backend: b,
                samples: Vec::new(),
                na: not_applicable(case, f, b),
            });
        }
        groups.push((case, first, rows.len()));
    }
    let runs = rows.iter().filter(|r| r.na.is_none()).count() * reps;
    // A run: the backend's start, the warm-up and the window, the teardown.
    let per_run = (ctx.warm + ctx.window).as_secs() + 2;
    let mut progress = rig::progress::Progress::new("bench", runs, runs as u64 * per_run);
    for (case, first, end) in groups {
        for rep in 0..reps {
            for row in rows[first..end].iter_mut() {
                if row.na.is_some() {
                    continue;
                }
                rig::interrupt::check_interrupted()?;
                progress.start(
                    &format!(
                        "{} {} {} run {}",
                        case.label(),
                        row.frontend.name(),
                        row.backend.name(),
                        rep + 1
                    ),
                    per_run,
                );
                let t = Instant::now();
                match measure(&mut ctx, case, row.frontend, row.backend) {
                    Ok(s) => {
                        progress.println(format!(
                            "  {:<18} {:<9} {:<15} run {}: {:>8.3} Mpps {:>7.2} Gbit/s  cpu {:.2}  ({:.1} s)",
                            case.label(),
                            row.frontend.name(),
                            row.backend.name(),
                            rep + 1,
                            s.pps / 1e6,
                            s.bps * 8.0 / 1e9,
                            s.cpu,
                            t.elapsed().as_secs_f64()
                        ));
                        row.samples.push(s);
                    }
                    Err(e) => {
                        rig::interrupt::check_interrupted()?;
                        progress.println(format!(
                            "  {:<18} {:<9} {:<15} run {}: FAILED: {e:#}",
                            case.label(),
                            row.frontend.name(),
                            row.backend.name(),
                            rep + 1
                        ));
                        if rep + 1 == reps && row.samples.is_empty() {
                            row.na = Some(format!("failed: {}", first_line(&format!("{e:#}"))));
                        }
                    }
                }
            }
        }
    }
    progress.finish();
    let _ = std::fs::remove_dir_all(&run_dir);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let steal = match (steal0, steal()) {
        (Some((s0, t0)), Some((s1, t1))) if t1 > t0 => Some(100.0 * (s1 - s0) / (t1 - t0)),
        _ => None,
    };
    let meta = report::Meta {
        steal,
        smoke: opts.smoke,
        reps,
        window: ctx.window.as_secs_f64(),
        load: load
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        minutes: started.elapsed().as_secs_f64() / 60.0,
        huge: ctx.huge,
        card_args: ctx.card_args.join(" "),
        card_bin: opts.card_bin.as_ref().map(|p| p.display().to_string()),
        baseline_bin: ctx.baseline.as_ref().map(|p| p.display().to_string()),
    };
    report::write(&out, &rows, &meta)?;
    if opts.smoke {
        // CI: every vhost-card figure must exist (ratios are noise on a shared machine).
        let missing: Vec<String> = rows
            .iter()
            .filter(|r| r.backend == Backend::Card && r.na.is_none() && r.samples.is_empty())
            .map(|r| r.case.label())
            .collect();
        if !missing.is_empty()
            || !rows
                .iter()
                .any(|r| r.backend == Backend::Card && r.median().is_some())
        {
            bail!("vhost-card carried nothing in: {}", missing.join(", "));
        }
        // Every frame taken from the ring must reach the tap (the overhead group counts both).
        // The frames in flight at the end of a window (a ring at most) are well under 5 %.
        let lost: Vec<String> = rows
            .iter()
            .filter(|r| r.backend == Backend::Card)
            .filter_map(|r| Some((r, r.median()?.reached?)))
            .filter(|(_, reached)| *reached < 0.95)
            .map(|(r, reached)| format!("{} ({reached:.3})", r.case.label()))
            .collect();
        if !lost.is_empty() {
            bail!(
                "frames taken from the ring did not reach the tap in: {}",
                lost.join(", ")
            );
        }
    }
    Ok(())
}

/// (steal, total) CPU ticks of the whole machine: time the hypervisor gave to someone else.
fn steal() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = cpu
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    Some((*v.get(7)?, v.iter().take(8).sum()))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(120).collect()
}

/// Which groups of cases a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Groups {
    /// The delivered-to-sink cases, then the overhead group.
    Both,
    /// Only the delivered-to-sink cases (`--delivered`).
    Delivered,
    /// Only the overhead group (`--overhead`).
    Overhead,
}

/// The cases: the delivered-to-sink group (every size both ways at 1 and 2 queue pairs, USO
/// included; `--smoke`: 64 and 65000 B at 1 queue pair), then the overhead group (64, 1500 and
/// 65000 B both ways at 1 and 2 queue pairs; `--smoke`: 64 B at 1 queue pair, one case per
/// direction), as `groups` says.
pub fn cases(smoke: bool, groups: Groups) -> Vec<Case> {
    let qs: &[usize] = if smoke { &[1] } else { &[1, 2] };
    let mut v = Vec::new();
    for overhead in [false, true] {
        let wanted = match groups {
            Groups::Both => true,
            Groups::Delivered => !overhead,
            Groups::Overhead => overhead,
        };
        if !wanted {
            continue;
        }
        let sizes: &[usize] = match (smoke, overhead) {
            (true, false) => &[64, 65000],
            (true, true) => &[64],
            (false, _) => &[64, 1500, 65000],
        };
        for &queues in qs {
            for dir in [Dir::H2c, Dir::C2h] {
                for &size in sizes {
                    v.push(Case {
                        dir,
                        size,
                        uso: false,
                        queues,
                        overhead,
                    });
                }
                if !smoke && !overhead {
                    v.push(Case {
                        dir,
                        size: 0,
                        uso: true,
                        queues,
                        overhead,
                    });
                }
            }
        }
    }
    v
}

/// Cases a frontend or backend cannot carry, and why (checked once by hand; see bench/README.md).
fn not_applicable(case: &Case, f: Frontend, b: Backend) -> Option<String> {
    match (f, b) {
        (Frontend::Testpmd, _) if case.uso => {
            Some("testpmd txonly/rxonly neither build nor accept GSO frames".into())
        }
        (Frontend::Testpmd, _) if case.dir == Dir::C2h && case.size > 9712 => {
            Some("DPDK 22.11 virtio PMD: max MTU 9698, larger frames are RX errors".into())
        }
        (_, Backend::Pair) if case.dir == Dir::H2c && case.uso => {
            Some("DPDK vhost PMD does not offer HOST_USO".into())
        }
        (_, Backend::Pair) if case.dir == Dir::H2c && case.size > 1522 => {
            Some("DPDK 22.11 tap PMD: max frame 1522 B, larger frames are TX errors".into())
        }
        _ => None,
    }
}

/// The two snapshots of one counter.
struct Snap {
    frames: f64,
    bytes: f64,
    secs: f64,
}

fn parse_snap(line: &str) -> Result<Snap> {
    let num = |k: &str| -> Result<f64> {
        let pat = format!("\"{k}\":");
        let at = line
            .find(&pat)
            .with_context(|| format!("no {k} in `{line}`"))?
            + pat.len();
        let digits: String = line[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        Ok(digits.parse::<f64>()?)
    };
    Ok(Snap {
        frames: num("frames")?,
        bytes: num("bytes")?,
        secs: num("ns")? / 1e9,
    })
}

/// Something that yields cumulative (frames, bytes, seconds).
enum Counter<'a> {
    Load(&'a mut Proc),
    /// testpmd's port 0 since the instant, TX counters when the flag is set (RX otherwise).
    Testpmd(&'a mut Proc, Instant, bool),
}

/// A frame the card's tap receives but the card's kernel drops on entry (not the tap's MAC).
pub const OTHER_MAC: &str = "02:ca:4d:be:4c:99";

/// Longest a timed read of the tap's counters may take (see [`tap_rx`]).
const READ_SLACK: Duration = Duration::from_millis(100);

/// The card tap's receive counters (what was written into it) in `ns`, seconds since `t0`,
/// timed at the middle of the `ip` call that read them. When both
/// CPUs are saturated (2 queue pairs), the kernel's deferred work (the teardown of the previous
/// run's namespace) can stall a fork for seconds, and a count read at one end of such a call
/// would be charged to the other end's time (an impossible 36 Mpps was seen): a read that took
/// longer than [`READ_SLACK`] is taken again, and after five of them the run fails.
fn tap_rx(ns: &Netns, t0: Instant) -> Result<Snap> {
    let mut tries = 0;
    let (out, secs) = loop {
        let before = t0.elapsed().as_secs_f64();
        let out = ns.ip(&["-s", "-j", "link", "show", "dev", "card0"])?;
        let after = t0.elapsed().as_secs_f64();
        if after - before <= READ_SLACK.as_secs_f64() {
            break (out, (before + after) / 2.0);
        }
        tries += 1;
        if tries == 5 {
            bail!(
                "reading the tap's counters took {:.1} s (over {} ms) five times: the machine \
                 is too busy to time them",
                after - before,
                READ_SLACK.as_millis()
            );
        }
    };
    let doc: serde_json::Value = serde_json::from_str(&out).context("ip -s -j link")?;
    let rx = &doc[0]["stats64"]["rx"];
    let num = |k: &str| {
        rx[k]
            .as_f64()
            .with_context(|| format!("no stats64.rx.{k} in `{out}`"))
    };
    Ok(Snap {
        frames: num("packets")?,
        bytes: num("bytes")?,
        secs,
    })
}

impl Counter<'_> {
    fn snap(&mut self) -> Result<Snap> {
        match self {
            Counter::Load(p) => {
                p.drain();
                p.send("snap")?;
                let l = p.expect(Duration::from_secs(5), |l| l.starts_with('{'))?;
                parse_snap(&l)
            }
            Counter::Testpmd(p, t0, tx) => {
                let (packets, bytes) = if *tx {
                    ("TX-packets:", "TX-bytes:")
                } else {
                    ("RX-packets:", "RX-bytes:")
                };
                p.drain();
                p.send("show port stats 0")?;
                let l = p.expect(Duration::from_secs(5), |l| l.contains(bytes))?;
                let secs = t0.elapsed().as_secs_f64();
                let field = |k: &str| -> Result<f64> {
                    let at = l.find(k).with_context(|| format!("no {k} in `{l}`"))? + k.len();
                    Ok(l[at..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("0")
                        .parse::<f64>()?)
                };
                Ok(Snap {
                    frames: field(packets)?,
                    bytes: field(bytes)?,
                    secs,
                })
            }
        }
    }
}

fn dpdk_mem(ctx: &Ctx) -> Vec<String> {
    let mut v: Vec<String> = [
        "--in-memory",
        "--single-file-segments",
        "-m",
        "512",
        "--no-pci",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !ctx.huge {
        v.push("--no-huge".into());
    }
    v
}

/// One run: sets everything up in a fresh namespace, measures, tears it down.
fn measure(ctx: &mut Ctx, case: &Case, f: Frontend, b: Backend) -> Result<Sample> {
    ctx.runs += 1;
    let tag = format!("r{}", ctx.runs);
    if b == Backend::Memcpy {
        let mut p = Proc::spawn(
            "memcpy",
            Command::new(ctx.bin.join("card-load")).args([
                "memcpy",
                "--size",
                &case.frame_bytes().to_string(),
                "--threads",
                &case.queues.to_string(),
                "--seconds",
                &ctx.window.as_secs_f64().to_string(),
            ]),
            &ctx.logs.join(format!("{tag}-memcpy.log")),
        )?;
        let l = p.expect(ctx.window + Duration::from_secs(10), |l| l.starts_with('{'))?;
        let s = parse_snap(&l)?;
        let mut bps = s.bytes / s.secs;
        let mut pps = s.frames / s.secs;
        if case.uso {
            // Count like the other rows: the segments' Ethernet frames.
            let segs = ((65535 - 28) / USO_SEG) as f64;
            pps *= segs;
            bps = pps * (USO_SEG + 42) as f64;
        }
        return Ok(Sample {
            pps,
            bps,
            cpu: case.queues as f64,
            reached: None,
        });
    }
    let ns = Netns::new("bench")?;
    for s in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        ns.sysctl(s)?;
    }
    let sock = ctx.run_dir.join(format!("{tag}.sock"));
    let q = case.queues.to_string();
    let mtu = case.mtu().to_string();
    let log = |what: &str| ctx.logs.join(format!("{tag}-{what}.log"));

    // The backend and the card's tap.
    let mut backend = match b {
        Backend::Card | Backend::CardWritev | Backend::CardBefore => {
            let mut args: Vec<String> = vec!["--socket".into(), sock.display().to_string()];
            for a in [
                "--netns",
                ns.name(),
                "--tap",
                "card0",
                "--queues",
                &q,
                "--mtu",
                &mtu,
            ] {
                args.push(a.into());
            }
            if case.uso {
                args.extend(["--enable".into(), "host-uso,guest-uso4,guest-uso6".into()]);
            }
            args.extend(ctx.card_args.iter().cloned());
            if link_ip(&ctx.card_args) {
                args.extend(["--mac".into(), IP_LINK_MAC.into()]);
            }
            let private = ctx.run_dir.join(format!("{tag}.private"));
            std::fs::create_dir_all(&private)?;
            let bin = match (&ctx.baseline, b) {
                (Some(before), Backend::CardBefore) => before,
                _ => &ctx.card,
            };
            let mut cmd = rig::daemon::command(bin, &args, &log("vhost-card"), &private)?;
            if b == Backend::CardWritev {
                cmd.env("VHOST_CARD_TX_URING", "0");
            }
            cmd.env("RUST_LOG", "warn");
            let p = Proc::spawn("vhost-card", &mut cmd, &log("vhost-card"))?;
            wait_until("the vhost-card socket", Duration::from_secs(10), || {
                sock.exists()
            })?;
            Some(p)
        }
        Backend::Pair => {
            let lcores = if case.queues > 1 {
                "0@0,1@1,2@0"
            } else {
                "0@0,1@1"
            };
            // Line-buffered output, so its answers arrive as they are printed.
            let mut cmd = ns.command("stdbuf");
            cmd.args(["-oL", "dpdk-testpmd", "--lcores", lcores])
                .args(dpdk_mem(ctx))
                .arg(format!("--file-prefix=pair{}", ctx.runs))
                .arg("--vdev")
                .arg(format!("net_vhost0,iface={},queues={q}", sock.display()))
                .args([
                    "--vdev",
                    "net_tap0,iface=card0",
                    "--",
                    "-i",
                    "--forward-mode=io",
                ])
                .arg(format!("--rxq={q}"))
                .arg(format!("--txq={q}"))
                .arg(format!("--nb-cores={q}"));
            let mut p = Proc::spawn("dpdk pair", &mut cmd, &log("pair"))?;
            wait_until("the DPDK vhost socket", Duration::from_secs(30), || {
                sock.exists() || !p.alive()
            })?;
            p.expect(Duration::from_secs(30), |l| l.trim() == "Done")?;
            // Frames above one mbuf need scatter on the tap port's RX (card to host).
            for c in [
                "port stop 1",
                "port config 1 rx_offload scatter on",
                "port start 1",
            ] {
                p.send(c)?;
            }
            p.expect(Duration::from_secs(20), |l| l.trim() == "Done")?;
            p.send("start")?;
            Some(p)
        }
        Backend::RawTap => {
            let mut a = vec!["tuntap", "add", "dev", "card0", "mode", "tap", "vnet_hdr"];
            if case.queues > 1 {
                a.push("multi_queue");
            }
            ns.ip(&a)?;
            None
        }
        Backend::Memcpy => unreachable!(),
    };
    wait_until("card0", Duration::from_secs(10), || {
        ns.ip(&["link", "show", "dev", "card0"]).is_ok()
    })?;
    ns.ip(&["link", "set", "card0", "mtu", &mtu, "up"])?;
    // `--card-args "--link ip"`: card0 is a tun without neighbours or a MAC of its own; the
    // daemon answers for the card with IP_LINK_MAC.
    let ip_link = matches!(b, Backend::Card | Backend::CardWritev | Backend::CardBefore)
        && link_ip(&ctx.card_args);
    let mac = if case.overhead && case.dir == Dir::H2c {
        // Not the tap's address: the card's kernel drops each frame as PACKET_OTHERHOST at the
        // start of IP receive, right after the tap counted it.
        ns.card_address("card0", &format!("{CARD_IP}/24"), HOST_IP, HOST_MAC)?;
        OTHER_MAC.to_string()
    } else if ip_link {
        ns.ip(&["addr", "add", &format!("{CARD_IP}/24"), "dev", "card0"])?;
        IP_LINK_MAC.to_string()
    } else {
        ns.card_address("card0", &format!("{CARD_IP}/24"), HOST_IP, HOST_MAC)?;
        ns.exec("cat", &["/sys/class/net/card0/address"])?
            .trim()
            .to_string()
    };
    let load = |args: &[&str]| {
        let mut c = Command::new(ctx.bin.join("card-load"));
        c.args(args);
        c
    };
    let size = case.size.to_string();
    let gso = if case.uso { "udp" } else { "none" };
    let dst = format!("{HOST_IP}:{PORT}");
    let card_addr = format!("{CARD_IP}:{PORT}");

    // Traffic: the far end first (sink, or frontend for card to host), then the source.
    let mut procs: Vec<Proc> = Vec::new();
    let counter_idx;
    let mut testpmd_t0 = None;
    let mut cpu_pid = backend.as_ref().map(|p| p.pid());
    match case.dir {
        Dir::H2c if case.overhead => {}
        Dir::H2c => {
            let mut sink = Proc::spawn(
                "sink",
                &mut load(&[
                    "sink",
                    "--netns",
                    ns.name(),
                    "--addr",
                    &card_addr,
                    "--threads",
                    &q,
                ]),
                &log("sink"),
            )?;
            sink.expect(Duration::from_secs(10), |l| l == "ready")?;
            procs.push(sink);
        }
        Dir::C2h => {}
    }
    match case.dir {
        Dir::H2c => {
            let src = match (b, f) {
                (Backend::RawTap, _) => {
                    let mut p = Proc::spawn(
                        "tapw",
                        &mut load(&[
                            "tapw",
                            "--netns",
                            ns.name(),
                            "--tap",
                            "card0",
                            "--queues",
                            &q,
                            "--mtu",
                            &mtu,
                            "--size",
                            &size,
                            "--gso",
                            gso,
                            "--dst-mac",
                            &mac,
                        ]),
                        &log("tapw"),
                    )?;
                    p.expect(Duration::from_secs(10), |l| l == "ready")?;
                    cpu_pid = Some(p.pid());
                    p
                }
                (_, Frontend::Own) => {
                    let sock_s = sock.display().to_string();
                    let mut p = Proc::spawn(
                        "card-load h2c",
                        &mut load(&[
                            "h2c",
                            "--socket",
                            &sock_s,
                            "--queues",
                            &q,
                            "--size",
                            &size,
                            "--gso",
                            gso,
                            "--dst-mac",
                            &mac,
                        ]),
                        &log("h2c"),
                    )?;
                    p.expect(Duration::from_secs(20), |l| l == "ready")?;
                    p
                }
                (_, Frontend::Testpmd) => {
                    let p = testpmd(ctx, case, &sock, &mac, &log("testpmd"))?;
                    // testpmd counts only where nothing behind the tap does (the overhead
                    // group); otherwise the sink, which runs before it, is the counter.
                    if case.overhead {
                        testpmd_t0 = Some(Instant::now());
                    }
                    p
                }
                (_, Frontend::None) => unreachable!(),
            };
            procs.push(src);
            counter_idx = 0;
        }
        Dir::C2h => {
            let counter = match (b, f) {
                (Backend::RawTap, _) => {
                    let mut p = Proc::spawn(
                        "tapr",
                        &mut load(&[
                            "tapr",
                            "--netns",
                            ns.name(),
                            "--tap",
                            "card0",
                            "--queues",
                            &q,
                            "--mtu",
                            &mtu,
                        ]),
                        &log("tapr"),
                    )?;
                    p.expect(Duration::from_secs(10), |l| l == "ready")?;
                    cpu_pid = Some(p.pid());
                    p
                }
                (_, Frontend::Own) => {
                    let sock_s = sock.display().to_string();
                    let mut p = Proc::spawn(
                        "card-load c2h",
                        &mut load(&["c2h", "--socket", &sock_s, "--queues", &q]),
                        &log("c2h"),
                    )?;
                    p.expect(Duration::from_secs(20), |l| l == "ready")?;
                    p
                }
                (_, Frontend::Testpmd) => {
                    let p = testpmd(ctx, case, &sock, &mac, &log("testpmd"))?;
                    testpmd_t0 = Some(Instant::now());
                    p
                }
                (_, Frontend::None) => unreachable!(),
            };
            procs.push(counter);
            counter_idx = 0;
            let flows = if case.queues > 1 { "4" } else { "1" };
            let (threads, flows16) = (q.clone(), "16");
            let mut args = if case.overhead {
                vec![
                    "inject",
                    "--netns",
                    ns.name(),
                    "--tap",
                    "card0",
                    "--size",
                    &size,
                    "--threads",
                    &threads,
                    "--flows",
                    flows16,
                ]
            } else {
                vec![
                    "send",
                    "--netns",
                    ns.name(),
                    "--src",
                    CARD_IP,
                    "--dst",
                    &dst,
                    "--size",
                    &size,
                    "--flows",
                    flows,
                ]
            };
            let seg = USO_SEG.to_string();
            if case.uso {
                args.extend(["--gso-seg", &seg]);
            }
            let mut s = Proc::spawn("send", &mut load(&args), &log("send"))?;
            s.expect(Duration::from_secs(10), |l| l == "ready")?;
            procs.push(s);
        }
    }

    std::thread::sleep(ctx.warm);
    let cpu_pid = cpu_pid.context("no process to charge CPU to")?;
    // Overhead group, host to card: the figure is what entered the tap (its rx counters), and
    // the frontend's count of frames taken from its ring is the check against it.
    let at_tap = case.overhead && case.dir == Dir::H2c;
    let t_start = Instant::now();
    let (s0, c0, s1, c1, tap) = {
        let p = &mut procs[counter_idx];
        let mut counter = match testpmd_t0 {
            Some(t0) => Counter::Testpmd(p, t0, case.dir == Dir::H2c),
            None => Counter::Load(p),
        };
        let c0 = cpu_seconds(cpu_pid)?;
        let s0 = counter.snap()?;
        let t0 = at_tap.then(|| tap_rx(&ns, t_start)).transpose()?;
        std::thread::sleep(ctx.window);
        let c1 = cpu_seconds(cpu_pid)?;
        let s1 = counter.snap()?;
        let t1 = at_tap.then(|| tap_rx(&ns, t_start)).transpose()?;
        (s0, c0, s1, c1, t0.zip(t1))
    };
    let dt = s1.secs - s0.secs;
    if dt <= 0.0 {
        bail!("no time passed between snapshots");
    }
    let rate = |a: &Snap, b: &Snap| -> Result<(f64, f64)> {
        let dt = b.secs - a.secs;
        if dt <= 0.0 {
            bail!("no time passed between snapshots");
        }
        Ok(((b.frames - a.frames) / dt, (b.bytes - a.bytes) / dt))
    };
    let (front_pps, front_bps) = rate(&s0, &s1)?;
    let sample = match tap {
        Some((t0, t1)) => {
            let (pps, bps) = rate(&t0, &t1)?;
            Sample {
                pps,
                bps,
                cpu: (c1 - c0) / dt,
                reached: (s1.frames > 0.0).then(|| t1.frames / s1.frames),
            }
        }
        None => Sample {
            pps: front_pps,
            bps: front_bps,
            cpu: (c1 - c0) / dt,
            reached: None,
        },
    };
    // Tear down: sources first.
    for p in procs.iter_mut().rev() {
        p.stop(Some("quit"));
    }
    drop(procs);
    if let Some(mut p) = backend.take() {
        if p.name == "dpdk pair" {
            p.stop(Some("quit"));
        } else {
            p.stop(None);
        }
    }
    drop(ns);
    if sample.pps <= 0.0 {
        bail!("nothing arrived (logs in {})", ctx.logs.display());
    }
    Ok(sample)
}

/// dpdk-testpmd with a virtio-user port on `sock`: txonly (host to card, frames to the card's
/// MAC and address) or rxonly (card to host); returns once forwarding has started.
fn testpmd(ctx: &Ctx, case: &Case, sock: &Path, mac: &str, log: &Path) -> Result<Proc> {
    let q = case.queues;
    let lcores = if q > 1 { "0@1,1@0,2@1" } else { "0@1,1@0" };
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", "dpdk-testpmd", "--lcores", lcores])
        .args(dpdk_mem(ctx))
        .arg(format!("--file-prefix=fe{}", ctx.runs))
        .arg("--vdev")
        .arg(format!(
            "net_virtio_user0,path={},queues={q},queue_size=1024",
            sock.display()
        ))
        .args(["--", "-i"])
        .arg(format!("--rxq={q}"))
        .arg(format!("--txq={q}"))
        .arg(format!("--nb-cores={q}"));
    match case.dir {
        Dir::H2c => {
            cmd.arg("--forward-mode=txonly");
            if case.size > 2000 {
                // Must come before --txpkts.
                cmd.args(["--mbuf-size=65535", "--total-num-mbufs=4096"]);
            }
            cmd.arg(format!("--txpkts={}", case.size))
                .arg(format!("--tx-ip={HOST_IP},{CARD_IP}"))
                .arg(format!("--tx-udp={PORT},{PORT}"))
                .arg(format!("--eth-peer=0,{mac}"));
            if q > 1 {
                cmd.arg("--txonly-multi-flow");
            }
        }
        Dir::C2h => {
            cmd.arg("--forward-mode=rxonly");
        }
    }
    let mut p = Proc::spawn("testpmd", &mut cmd, log)?;
    p.expect(Duration::from_secs(30), |l| l.trim() == "Done")?;
    p.send("start")?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(p)
}
