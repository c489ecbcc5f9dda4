//! `cargo xtask soak`: sustained traffic both ways through the daemon, watched for leaks.
//!
//! A release `vhost-card` serves a fresh network namespace (`soak-<pid>-<n>`). `card-load bidi` is
//! the host: one vhost-user frontend that keeps its TX ring full of 64-, 1500- and 65000-byte
//! frames (interleaved) and recycles its RX buffers as they are used. In the namespace a UDP sink
//! receives the host-to-card traffic and a sender sends the same mix card to host, all at once,
//! for `--minutes`. Half-way through every interval the frontend disconnects and a new one
//! connects (new guest memory, new vhost-user session), so descriptors and threads are checked
//! across reconnects too; samples are taken while a frontend is connected.
//!
//! Every interval prints one line: elapsed time, the daemon's RSS, open descriptors and threads,
//! frames and bytes each way in the interval, and every drop counter that moved, by reason. At the
//! end the sources stop, the queues drain and every frame is accounted for in both directions;
//! then the verdict (`PASS soak: ...` / `FAIL soak: ...`, non-zero exit on FAIL). Results go to
//! `target/soak/` (`soak.json`, `soak.md`, `logs/`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::procs::Proc;
use crate::bench::{CARD_IP, HOST_IP, HOST_MAC, PORT};
use crate::netns::Netns;
use crate::process::{self, Guarded, TempDir};
use serde_json::{json, Value as Json};

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// How long traffic runs, in minutes (fractions allowed, e.g. 0.5); default 10.
    #[arg(long, conflicts_with = "seconds")]
    pub minutes: Option<f64>,
    /// How long traffic runs, in seconds (CI: --seconds 60).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Seconds between samples (default 60; runs under 5 minutes: a sixth of the run, at least 5).
    #[arg(long)]
    pub interval: Option<f64>,
    /// Seconds of warm-up: RSS, descriptors and threads are judged against the first sample at or
    /// after it (default: one interval).
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Frame sizes (Ethernet header included) interleaved in both directions.
    #[arg(long, value_delimiter = ',', default_value = "64,1500,65000")]
    pub sizes: Vec<usize>,
    /// Queue pairs.
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    /// Keep one frontend session for the whole run (default: a new one half-way through
    /// every interval).
    #[arg(long)]
    pub no_reconnect: bool,
    /// How far RSS may rise above its value after warm-up, in KiB.
    #[arg(long, default_value_t = RSS_BOUND_KIB)]
    pub rss_bound_kib: u64,
    /// Extra arguments for vhost-card (e.g. `--disable mrg-rxbuf`).
    #[arg(long, allow_hyphen_values = true)]
    pub card_args: Option<String>,
    /// Where results go (default target/soak).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Allowed RSS growth after warm-up. Once traffic flows the daemon's RSS is about 9 MiB and
/// fixed: 3.5 MiB of its binary, 0.7 MiB anonymous (per-queue bounce and scratch buffers, ring
/// state, thread stacks) and 4.75 MiB of guest memory it touches (the frontend's buffers, a
/// constant working set mapped again with each session). Nothing in the data path allocates per
/// frame, so after warm-up RSS may only move by allocator noise, tens of KiB. 2 MiB (a fifth of
/// the whole) is far above that noise and far below any per-frame leak: one byte per frame over
/// the 10^8 frames of a 10-minute run is 100 MiB. Leaks per session are caught first by the
/// descriptor and thread checks (a session's mappings, sockets and threads all come with one);
/// a heap leak of more than 200 KiB per session also exceeds the bound within 10 reconnects.
const RSS_BOUND_KIB: u64 = 2048;

/// Daemon counters that are backpressure, not loss: nothing is dropped when they move.
const BACKPRESSURE: &[(&str, &str)] = &[
    (
        "tx_tap_full",
        "the card's kernel was slower than the host: the tap said EAGAIN, the chains went back \
         to the ring and TX waited for EPOLLOUT; nothing is lost",
    ),
    (
        "rx_no_buffers",
        "the host was slower than the card: RX stopped reading the tap until the host posted \
         buffers; the frames wait in the tap's queue",
    ),
];

/// Daemon drops that the soak's reconnects explain.
const RECONNECT: &[(&str, &str)] = &[(
    "rx_drop_disconnect",
    "card to host, a frame waited in the bounce buffer for host buffers when the frontend \
     disconnected (the soak's reconnects); a NIC drops what it holds when its driver resets",
)];

/// Daemon counters that count neither frames nor drops.
const INFO: &[&str] = &[
    "rx_buffers",
    "rx_bounced",
    "rx_held",
    "rx_csum_verified",
    "rx_csum_completed",
    "rx_data_valid",
    // How frames went up (bad_csum and malformed stay out: they would be unexpected).
    "rx_needs_csum",
    "rx_unmarked_fragment",
    "rx_unmarked_not_ip",
    "rx_unmarked_no_l4_csum",
    "rx_unmarked_passthrough",
    "rx_unmarked_no_guest_csum",
    "reasm_fragments",
    "reasm_datagrams",
    "reasm_split",
    "arp_replies",
    "nd_replies",
    "rx_kicks",
    "tx_kicks",
    "notifications",
];

/// Daemon counters of traffic.
const TRAFFIC: &[&str] = &["tx_frames", "tx_bytes", "rx_frames", "rx_bytes"];

/// Kernel drops in the card's namespace that the load explains: the card's Linux stack dropping
/// what it could not queue, as a NIC drops on a full ring, after the daemon's backpressure.
const KERNEL_EXPLAINED: &[(&str, &str)] = &[
    (
        "card0 tx_dropped",
        "card to host, the card's kernel dropped a frame because the tap's queue (txqueuelen \
         1000) was full: the sender in the namespace produces faster than the host takes \
         (rx_no_buffers), or no frontend was connected (reconnect)",
    ),
    (
        "qdisc drops",
        "card to host, the tap's qdisc was full (same cause as card0 tx_dropped)",
    ),
    (
        "udp RcvbufErrors",
        "host to card, the sink's socket buffer was full: the sink is slower than the card",
    ),
];

/// Kernel counters that our well-formed traffic must never move: a frame the daemon wrote that
/// the card's stack refused or found corrupt, or traffic to nobody.
const KERNEL_UNEXPECTED: &[&str] = &[
    "card0 rx_dropped",
    "card0 rx_errors",
    "card0 tx_errors",
    "ip InDiscards",
    "ip InHdrErrors",
    "ip InAddrErrors",
    "udp NoPorts",
    "udp InCsumErrors",
    "udp other InErrors",
];

/// Why a daemon drop counter fails the soak.
fn unexpected_why(name: &str) -> String {
    let help = vhost_card::stats::HELP
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, h)| h.trim().trim_end_matches('.'))
        .unwrap_or("an unknown counter");
    format!("{help}: malformed input or an internal error, never caused by load")
}

/// Every daemon counter that is a drop or an error (everything that is not traffic,
/// backpressure or information; a counter added later lands here until classified).
fn daemon_unexpected() -> Vec<&'static str> {
    vhost_card::stats::HELP
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| {
            !TRAFFIC.contains(n)
                && !INFO.contains(n)
                && !BACKPRESSURE.iter().chain(RECONNECT).any(|(b, _)| b == n)
        })
        .collect()
}

/// One look at the daemon and the namespace.
#[derive(Debug, Clone, Default)]
struct Sample {
    /// Seconds since traffic started.
    t: f64,
    /// KiB, from /proc/PID/status.
    rss: u64,
    anon: u64,
    file: u64,
    shmem: u64,
    fds: u64,
    threads: u64,
    /// Frontend sessions so far (the current one included).
    sessions: u64,
    /// The daemon's counters, summed over queue pairs.
    daemon: BTreeMap<String, u64>,
    /// Counters of the card's kernel (card0, its qdisc, IP and UDP in the namespace).
    kernel: BTreeMap<String, u64>,
    /// Host to card frames/bytes the sink received; card to host frames/bytes the frontend did.
    sink: (u64, u64),
    host_rx: (u64, u64),
}

impl Sample {
    fn d(&self, k: &str) -> u64 {
        self.daemon.get(k).copied().unwrap_or(0)
    }
    /// Every drop-like counter (daemon and kernel) by name.
    fn drops(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for (n, v) in &self.daemon {
            if !TRAFFIC.contains(&n.as_str()) && !INFO.contains(&n.as_str()) {
                m.insert(n.clone(), *v);
            }
        }
        for (n, v) in &self.kernel {
            if KERNEL_EXPLAINED.iter().any(|(e, _)| e == n)
                || KERNEL_UNEXPECTED.contains(&n.as_str())
            {
                m.insert(n.clone(), *v);
            }
        }
        m
    }
}

/// How a counter is judged.
fn class(name: &str) -> &'static str {
    if BACKPRESSURE.iter().any(|(b, _)| *b == name) {
        "backpressure"
    } else if RECONNECT.iter().any(|(b, _)| *b == name) {
        "reconnect"
    } else if KERNEL_EXPLAINED.iter().any(|(e, _)| *e == name) {
        "kernel"
    } else {
        "UNEXPECTED"
    }
}

/// The run's timing.
struct Plan {
    duration: f64,
    interval: f64,
    warmup: f64,
    /// When samples are taken (seconds since traffic started; 0 is the start).
    samples: Vec<f64>,
}

impl Plan {
    fn new(opts: &Options) -> Result<Plan> {
        let duration = match (opts.seconds, opts.minutes) {
            (Some(s), _) => s,
            (None, Some(m)) => m * 60.0,
            (None, None) => 600.0,
        };
        if !(duration.is_finite() && duration > 0.0) {
            bail!("the duration must be positive");
        }
        let interval = opts.interval.unwrap_or(if duration >= 300.0 {
            60.0
        } else {
            (duration / 6.0).clamp(5.0, 60.0)
        });
        if !(interval.is_finite() && interval >= 1.0) {
            bail!("--interval must be at least 1 s");
        }
        let warmup = opts.warmup.unwrap_or(interval).max(0.0);
        let mut samples = vec![0.0];
        let mut k = 1.0;
        while k * interval <= duration + 1e-6 {
            samples.push(k * interval);
            k += 1.0;
        }
        if duration - samples[samples.len() - 1] > 0.5 {
            samples.push(duration);
        }
        let judged = samples.iter().filter(|&&t| t >= warmup - 1e-6).count();
        if judged < 2 {
            bail!(
                "{duration} s with {interval} s intervals and {warmup} s of warm-up leaves \
                 fewer than two samples after warm-up; run longer or sample more often"
            );
        }
        Ok(Plan {
            duration,
            interval,
            warmup,
            samples,
        })
    }

    /// Index of the baseline sample (the first at or after warm-up).
    fn baseline(&self) -> usize {
        self.samples
            .iter()
            .position(|&t| t >= self.warmup - 1e-6)
            .unwrap_or(0)
    }
}

/// The processes of one soak; dropped in reverse order of declaration (sources first).
struct Soak {
    bin: PathBuf,
    logs: PathBuf,
    sock: PathBuf,
    control: PathBuf,
    queues: String,
    sizes: String,
    mac: String,
    // Fields drop in declaration order: sources first, then the sink, the daemon, the
    // namespace and the run directory.
    send: Option<Proc>,
    host: Option<Proc>,
    sink: Option<Proc>,
    daemon: Guarded,
    daemon_log: PathBuf,
    ns: Netns,
    _dir: TempDir,
    /// Frames/bytes the frontends before the current one received and sent.
    host_base: Snap,
    sessions: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Snap {
    tx: (u64, u64),
    rx: (u64, u64),
}

/// `"key":digits` out of a `snap` answer.
fn field(line: &str, key: &str) -> Result<u64> {
    let pat = format!("\"{key}\":");
    let at = line
        .find(&pat)
        .with_context(|| format!("no {key} in `{line}`"))?
        + pat.len();
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Ok(digits.parse()?)
}

fn snap(p: &mut Proc) -> Result<String> {
    p.drain();
    p.send("snap")?;
    p.expect(Duration::from_secs(5), |l| l.starts_with('{'))
}

impl Soak {
    fn load(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join("card-load"));
        c.args(args);
        c
    }

    fn start_sink(&mut self) -> Result<()> {
        let addr = format!("{CARD_IP}:{PORT}");
        let mut cmd = self.load(&[
            "sink",
            "--netns",
            self.ns.name(),
            "--addr",
            &addr,
            "--threads",
            &self.queues,
        ]);
        let mut p = Proc::spawn("sink", &mut cmd, &self.logs.join("sink.log"))?;
        p.expect(Duration::from_secs(10), |l| l == "ready")?;
        self.sink = Some(p);
        Ok(())
    }

    fn start_host(&mut self) -> Result<()> {
        let sock = self.sock.display().to_string();
        let mut cmd = self.load(&[
            "bidi",
            "--socket",
            &sock,
            "--queues",
            &self.queues,
            "--sizes",
            &self.sizes,
            "--dst-mac",
            &self.mac,
        ]);
        // One log for every session: it is truncated when the next one starts.
        let mut p = Proc::spawn("card-load bidi", &mut cmd, &self.logs.join("frontend.log"))?;
        p.expect(Duration::from_secs(20), |l| l == "ready")?;
        self.host = Some(p);
        self.sessions += 1;
        Ok(())
    }

    fn start_send(&mut self) -> Result<()> {
        let dst = format!("{HOST_IP}:{PORT}");
        let mut cmd = self.load(&[
            "send",
            "--netns",
            self.ns.name(),
            "--src",
            CARD_IP,
            "--dst",
            &dst,
            "--sizes",
            &self.sizes,
            "--flows",
            &self.queues,
        ]);
        let mut p = Proc::spawn("send", &mut cmd, &self.logs.join("send.log"))?;
        p.expect(Duration::from_secs(10), |l| l == "ready")?;
        self.send = Some(p);
        Ok(())
    }

    /// What the frontend has sent and received, over every session so far.
    fn host_snap(&mut self) -> Result<Snap> {
        let Some(p) = self.host.as_mut() else {
            return Ok(self.host_base);
        };
        let l = snap(p)?;
        let b = self.host_base;
        Ok(Snap {
            tx: (
                b.tx.0 + field(&l, "tx_frames")?,
                b.tx.1 + field(&l, "tx_bytes")?,
            ),
            rx: (
                b.rx.0 + field(&l, "rx_frames")?,
                b.rx.1 + field(&l, "rx_bytes")?,
            ),
        })
    }

    fn sink_snap(&mut self) -> Result<(u64, u64)> {
        let p = self.sink.as_mut().context("no sink")?;
        let l = snap(p)?;
        Ok((field(&l, "frames")?, field(&l, "bytes")?))
    }

    /// Ends the frontend's session (its counts are kept).
    fn stop_host(&mut self) -> Result<()> {
        if self.host.is_some() {
            self.host_base = self.host_snap()?;
        }
        if let Some(mut p) = self.host.take() {
            p.stop(Some("quit"));
        }
        Ok(())
    }

    /// A new frontend session: the old one disconnects, a new one connects with new guest memory.
    fn reconnect(&mut self) -> Result<()> {
        self.stop_host()?;
        self.start_host()
    }

    fn daemon_alive(&mut self) -> bool {
        matches!(self.daemon.try_wait(), Ok(None))
    }

    fn sample(&mut self, t: f64) -> Result<Sample> {
        let pid = self.daemon.pid();
        // Descriptors first: the control query below opens (and closes) one in the daemon.
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("listing /proc/{pid}/fd"))?
            .count() as u64;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let st = |k: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        let daemon = daemon_counters(&self.control)?;
        let kernel = kernel_counters(&self.ns)?;
        let sink = self.sink_snap()?;
        let host_rx = self.host_snap()?.rx;
        Ok(Sample {
            t,
            rss: st("VmRSS"),
            anon: st("RssAnon"),
            file: st("RssFile"),
            shmem: st("RssShmem"),
            fds,
            threads: st("Threads"),
            sessions: self.sessions,
            daemon,
            kernel,
            sink,
            host_rx,
        })
    }
}

/// The daemon's counters from its control socket, summed over queue pairs.
fn daemon_counters(control: &Path) -> Result<BTreeMap<String, u64>> {
    let snap = vhost_card::control::query_snapshot(control)
        .with_context(|| format!("querying {}", control.display()))?;
    if snap.pairs.is_empty() {
        bail!("no pairs in the daemon's counters: {snap:?}");
    }
    let mut sum = BTreeMap::new();
    for p in &snap.pairs {
        for (k, v) in &p.counters.0 {
            *sum.entry(k.clone()).or_insert(0) += *v;
        }
    }
    Ok(sum)
}

/// The card's kernel: card0's drops and errors, its qdisc's drops, and the IP, UDP and TCP
/// (retransmitted segments) counters of the namespace.
pub(crate) fn kernel_counters(ns: &Netns) -> Result<BTreeMap<String, u64>> {
    let mut m = BTreeMap::new();
    let num = |j: Option<&Json>| j.and_then(Json::as_u64).unwrap_or(0);
    let link = process::stdout(Command::new("ip").args([
        "-n",
        ns.name(),
        "-j",
        "-s",
        "link",
        "show",
        "dev",
        "card0",
    ]))?;
    let link: Json = serde_json::from_str(&link)?;
    let dev = link.as_array().and_then(|a| a.first());
    let stats = dev.and_then(|d| d.get("stats64"));
    for dir in ["rx", "tx"] {
        let s = stats.and_then(|s| s.get(dir));
        for what in ["dropped", "errors"] {
            m.insert(
                format!("card0 {dir}_{what}"),
                num(s.and_then(|s| s.get(what))),
            );
        }
    }
    let qdisc = process::stdout(Command::new("tc").args([
        "-n",
        ns.name(),
        "-s",
        "-j",
        "qdisc",
        "show",
        "dev",
        "card0",
    ]))?;
    let qdisc: Json = serde_json::from_str(&qdisc)?;
    let drops = qdisc
        .as_array()
        .map_or(0, |a| a.iter().map(|q| num(q.get("drops"))).sum());
    m.insert("qdisc drops".into(), drops);
    let snmp = process::stdout(ns.command("cat").arg("/proc/net/snmp"))?;
    let table = |proto: &str| -> BTreeMap<String, u64> {
        let rows: Vec<&str> = snmp
            .lines()
            .filter_map(|l| l.strip_prefix(proto)?.strip_prefix(':'))
            .collect();
        match rows.as_slice() {
            [names, values, ..] => names
                .split_whitespace()
                .zip(values.split_whitespace())
                .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
                .collect(),
            _ => BTreeMap::new(),
        }
    };
    let ip = table("Ip");
    let udp = table("Udp");
    let tcp = table("Tcp");
    let get = |t: &BTreeMap<String, u64>, k: &str| t.get(k).copied().unwrap_or(0);
    for k in ["InDiscards", "InHdrErrors", "InAddrErrors"] {
        m.insert(format!("ip {k}"), get(&ip, k));
    }
    for k in [
        "NoPorts",
        "RcvbufErrors",
        "InCsumErrors",
        "OutDatagrams",
        "InDatagrams",
    ] {
        m.insert(format!("udp {k}"), get(&udp, k));
    }
    m.insert("tcp RetransSegs".into(), get(&tcp, "RetransSegs"));
    // InErrors counts RcvbufErrors and InCsumErrors too.
    m.insert(
        "udp other InErrors".into(),
        get(&udp, "InErrors")
            .saturating_sub(get(&udp, "RcvbufErrors"))
            .saturating_sub(get(&udp, "InCsumErrors")),
    );
    Ok(m)
}

/// Card-to-host frames the daemon read from the tap and dropped (counted by reason).
fn rx_dropped(d: &BTreeMap<String, u64>) -> i128 {
    d.iter()
        .filter(|(n, _)| n.starts_with("rx_drop_") && n.as_str() != "rx_drop_bad_chain")
        .map(|(_, v)| i128::from(*v))
        .sum()
}

/// Card-to-host frames the card's kernel dropped before the tap's queue.
fn kernel_c2h(k: &BTreeMap<String, u64>) -> i128 {
    ["card0 tx_dropped", "qdisc drops"]
        .iter()
        .map(|n| i128::from(k.get(*n).copied().unwrap_or(0)))
        .sum()
}

/// Builds the release binaries the soak runs.
fn build() -> Result<PathBuf> {
    println!("soak: building vhost-card and card-load (release)");
    rig::paths::cargo_build(true, crate::bench::BINARIES)
}

fn mmss(t: f64) -> String {
    let s = t.round() as u64;
    format!("{}:{:02}", s / 60, s % 60)
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// What moved between two samples, for the line and the table.
struct Interval {
    h2c: (u64, u64),
    c2h: (u64, u64),
    sink: u64,
    host_rx: u64,
    /// (name, delta, total) of every drop-like counter that is non-zero.
    drops: Vec<(String, u64, u64)>,
}

fn interval(a: &Sample, b: &Sample) -> Interval {
    let before = a.drops();
    let drops = b
        .drops()
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(n, v)| {
            let d = v.saturating_sub(before.get(&n).copied().unwrap_or(0));
            (n, d, v)
        })
        .collect();
    Interval {
        h2c: (
            b.d("tx_frames") - a.d("tx_frames"),
            b.d("tx_bytes") - a.d("tx_bytes"),
        ),
        c2h: (
            b.d("rx_frames") - a.d("rx_frames"),
            b.d("rx_bytes") - a.d("rx_bytes"),
        ),
        sink: b.sink.0 - a.sink.0,
        host_rx: b.host_rx.0 - a.host_rx.0,
        drops,
    }
}

fn drops_text(drops: &[(String, u64, u64)], md: bool) -> String {
    if drops.is_empty() {
        return "none".into();
    }
    drops
        .iter()
        .map(|(n, d, v)| {
            let mark = if class(n) == "UNEXPECTED" {
                if md {
                    " **UNEXPECTED**"
                } else {
                    " UNEXPECTED"
                }
            } else {
                ""
            };
            format!("{n} +{d} ({v}){mark}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn line(s: &Sample, iv: Option<&Interval>) -> String {
    let mut l = format!(
        "soak {:>6}  rss {} KiB (anon {}, guest {})  fds {}  threads {}  sessions {}",
        mmss(s.t),
        s.rss,
        s.anon,
        s.shmem,
        s.fds,
        s.threads,
        s.sessions
    );
    if let Some(iv) = iv {
        let _ = write!(
            l,
            "  h2c {} fr {}  c2h {} fr {}  drops: {}",
            iv.h2c.0,
            gb(iv.h2c.1),
            iv.c2h.0,
            gb(iv.c2h.1),
            drops_text(&iv.drops, false)
        );
    } else {
        l.push_str("  (start)");
    }
    l
}

/// One check of the verdict.
struct Check {
    what: &'static str,
    ok: bool,
    detail: String,
}

pub fn run(opts: &Options) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask soak needs root (network namespaces, taps)");
    }
    if opts.queues == 0 || opts.sizes.is_empty() {
        bail!("--queues and --sizes must not be empty");
    }
    if let Some(&s) = opts.sizes.iter().find(|&&s| !(42..=65520).contains(&s)) {
        bail!("--sizes: {s} is not a UDP frame size the card's MTU allows (42..=65520)");
    }
    let plan = Plan::new(opts)?;
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| rig::paths::target_dir().join("soak"));
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let bin = build()?;
    let command_line = std::env::args().skip(1).collect::<Vec<_>>().join(" ");

    // The daemon in a fresh namespace.
    let dir = TempDir::new("soak")?;
    let ns = Netns::new("soak-")?;
    for s in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        process::run(ns.command("sysctl").args(["-qw", s]))?;
    }
    let sock = dir.path().join("card.sock");
    let control = dir.path().join("control.sock");
    let daemon_log = logs.join("vhost-card.log");
    let queues = opts.queues.to_string();
    let mut args: Vec<String> = vec![
        "--socket".into(),
        sock.display().to_string(),
        "--control".into(),
        control.display().to_string(),
        "--netns".into(),
        ns.name().into(),
        "--tap".into(),
        "card0".into(),
        "--queues".into(),
        queues.clone(),
    ];
    args.extend(
        opts.card_args
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .map(String::from),
    );
    let daemon = rig::daemon::spawn(
        &bin.join("vhost-card"),
        &args,
        &daemon_log,
        dir.path(),
        || sock.exists() && control.exists() && ns.has_link("card0"),
    )?;

    ns.card_address("card0", &format!("{CARD_IP}/24"), HOST_IP, HOST_MAC)?;
    let mac = process::stdout(ns.command("cat").arg("/sys/class/net/card0/address"))?;
    let mut rig = Soak {
        bin,
        logs: logs.clone(),
        sock: sock.clone(),
        control: control.clone(),
        queues,
        sizes: opts
            .sizes
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        mac,
        send: None,
        host: None,
        sink: None,
        daemon,
        daemon_log: daemon_log.clone(),
        ns,
        _dir: dir,
        host_base: Snap::default(),
        sessions: 0,
    };

    println!(
        "soak: {} of traffic both ways ({} B frames interleaved, {} queue pair(s)), a sample every \
         {} s, warm-up {} s, {}; namespace {}; results in {}",
        mmss(plan.duration),
        rig.sizes,
        opts.queues,
        plan.interval,
        plan.warmup,
        if opts.no_reconnect {
            "one frontend session".to_string()
        } else {
            "a new frontend session half-way through every interval".to_string()
        },
        rig.ns.name(),
        out.display()
    );
    println!("soak: drops that load explains (anything else fails the soak):");
    for (n, why) in BACKPRESSURE.iter().chain(RECONNECT).chain(KERNEL_EXPLAINED) {
        println!("  {n}: {why}");
    }

    // Traffic: the far ends first, then the sources.
    rig.start_sink()?;
    // Before any frontend: what the daemon holds between sessions.
    let before = rig.sample(0.0)?;
    rig.start_host()?;
    rig.start_send()?;
    let t0 = Instant::now();
    let mut samples = vec![rig.sample(0.0)?];
    let steps = plan.samples.len().saturating_sub(1);
    let mut progress =
        rig::progress::Progress::new("soak", steps, (steps as f64 * plan.interval) as u64);
    progress.println(line(&samples[0], None));
    let mut died: Option<String> = None;
    let wait_until = |rig: &mut Soak, at: f64| -> Result<bool> {
        loop {
            rig::interrupt::check_interrupted()?;
            if !rig.daemon_alive() {
                return Ok(false);
            }
            let left = at - t0.elapsed().as_secs_f64();
            if left <= 0.0 {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_secs_f64(left.min(0.2)));
        }
    };
    for (i, w) in plan.samples.windows(2).enumerate() {
        let (from, to) = (w[0], w[1]);
        progress.start(
            &format!("interval {} of {steps}, until {}", i + 1, mmss(to)),
            (to - from) as u64,
        );
        if !opts.no_reconnect {
            if !wait_until(&mut rig, (from + to) / 2.0)? {
                break;
            }
            rig.reconnect()?;
        }
        if !wait_until(&mut rig, to)? {
            break;
        }
        let s = rig.sample(t0.elapsed().as_secs_f64())?;
        let prev = samples.last().context("no sample")?;
        progress.println(line(&s, Some(&interval(prev, &s))));
        samples.push(s);
    }
    progress.finish();
    if !rig.daemon_alive() {
        died = Some(format!(
            "vhost-card died ({:?}) at {}: {}",
            rig.daemon.try_wait().ok().flatten(),
            mmss(t0.elapsed().as_secs_f64()),
            process::tail(&rig.daemon_log, 10)
        ));
    }

    // The end: sources stop, queues drain, every frame is accounted for.
    let mut accounting: Vec<Check> = Vec::new();
    let mut last: Option<Sample> = None;
    let mut exit = None;
    if died.is_none() {
        if let Some(mut p) = rig.send.take() {
            p.stop(Some("quit"));
        }
        // Card to host: what the sender's stack sent is in the host's rings or dropped by
        // the card's kernel, once the tap's queue has drained into the host.
        let c2h_left = |d: &BTreeMap<String, u64>, k: &BTreeMap<String, u64>| -> i128 {
            let g = |m: &BTreeMap<String, u64>, n: &str| i128::from(m.get(n).copied().unwrap_or(0));
            g(k, "udp OutDatagrams") - g(d, "rx_frames") - rx_dropped(d) - kernel_c2h(k)
        };
        let mut prev = i128::MIN;
        for _ in 0..25 {
            let left = c2h_left(&daemon_counters(&rig.control)?, &kernel_counters(&rig.ns)?);
            if left == 0 || left == prev {
                break;
            }
            prev = left;
            std::thread::sleep(Duration::from_millis(200));
        }
        rig.stop_host()?;
        // Host to card: what the daemon wrote to the tap reached the sink or was dropped by
        // the card's kernel, once the sink has read everything.
        let mut prev = (u64::MAX, 0);
        for _ in 0..25 {
            let now = rig.sink_snap()?;
            if now == prev {
                break;
            }
            prev = now;
            std::thread::sleep(Duration::from_millis(200));
        }
        // The last session's descriptors and threads go once the daemon has noticed.
        let deadline = Instant::now() + Duration::from_secs(5);
        let s = loop {
            let s = rig.sample(t0.elapsed().as_secs_f64())?;
            if (s.fds, s.threads) == (before.fds, before.threads) || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if let Some(mut p) = rig.sink.take() {
            p.stop(Some("quit"));
        }
        let d = &s.daemon;
        let k = &s.kernel;
        let g = |m: &BTreeMap<String, u64>, n: &str| i128::from(m.get(n).copied().unwrap_or(0));
        let h2c_in = g(d, "tx_frames");
        let h2c_out = i128::from(s.sink.0);
        let h2c_kernel = g(k, "udp RcvbufErrors")
            + g(k, "udp InCsumErrors")
            + g(k, "udp other InErrors")
            + g(k, "udp NoPorts")
            + g(k, "card0 rx_dropped")
            + g(k, "ip InDiscards")
            + g(k, "ip InHdrErrors")
            + g(k, "ip InAddrErrors");
        let h2c_lost = h2c_in - h2c_out - h2c_kernel;
        accounting.push(Check {
            what: "host-to-card accounting",
            ok: h2c_lost == 0,
            detail: format!(
                "the daemon wrote {h2c_in} frames to the tap, the sink received {h2c_out}, the \
                 card's kernel dropped {h2c_kernel}: {h2c_lost} unaccounted"
            ),
        });
        let c2h_sent = g(k, "udp OutDatagrams");
        let c2h_in = g(d, "rx_frames");
        let c2h_daemon = rx_dropped(d);
        let c2h_kernel = kernel_c2h(k);
        let c2h_lost = c2h_sent - c2h_in - c2h_daemon - c2h_kernel;
        accounting.push(Check {
            what: "card-to-host accounting",
            ok: c2h_lost == 0,
            detail: format!(
                "the card's stack sent {c2h_sent} frames, the daemon delivered {c2h_in} to the \
                 host and dropped {c2h_daemon} (counted), the card's kernel dropped {c2h_kernel} \
                 (tap queue full): {c2h_lost} unaccounted"
            ),
        });
        last = Some(s);
        let (st, killed) = rig.daemon.stop()?;
        exit = Some((st, killed));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let log_text = std::fs::read_to_string(&rig.daemon_log).unwrap_or_default();
    let log_errors: Vec<&str> = log_text
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("sandbox: forbidden"))
        .collect();
    let log_warnings = log_text.lines().filter(|l| l.contains(" WARN ")).count();
    let sockets_left: Vec<String> = [&sock, &control]
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    drop(rig);

    // The verdict.
    let base_i = plan.baseline().min(samples.len() - 1);
    let base = &samples[base_i];
    let judged = &samples[base_i..];
    let end = samples.last().context("no sample")?;
    let mut checks = Vec::new();
    checks.push(Check {
        what: "daemon alive",
        ok: died.is_none()
            && samples.len() == plan.samples.len()
            && matches!(exit, Some((st, false)) if st.success())
            && sockets_left.is_empty(),
        detail: match (&died, exit) {
            (Some(why), _) => why.clone(),
            (None, Some((st, killed))) => format!(
                "served {} frontend session(s); exit after SIGTERM: {st}{}{}",
                end.sessions,
                if killed { " (had to be killed)" } else { "" },
                if sockets_left.is_empty() {
                    String::new()
                } else {
                    format!("; left behind: {}", sockets_left.join(" "))
                }
            ),
            (None, None) => "not stopped".into(),
        },
    });
    let max_rss = judged.iter().map(|s| s.rss).max().unwrap_or(0);
    let growth = i128::from(max_rss) - i128::from(base.rss);
    checks.push(Check {
        what: "RSS flat",
        ok: growth <= i128::from(opts.rss_bound_kib),
        detail: format!(
            "{} KiB at the start, {} KiB after warm-up ({}), {} KiB at the end, highest after \
             warm-up {max_rss} KiB ({growth:+} KiB; bound {} KiB); anonymous {} -> {} KiB",
            samples[0].rss,
            base.rss,
            mmss(base.t),
            end.rss,
            opts.rss_bound_kib,
            base.anon,
            end.anon
        ),
    });
    let fds: Vec<u64> = judged.iter().map(|s| s.fds).collect();
    let threads: Vec<u64> = judged.iter().map(|s| s.threads).collect();
    checks.push(Check {
        what: "descriptors and threads flat",
        ok: fds.iter().all(|&f| f == base.fds)
            && threads.iter().all(|&t| t == base.threads)
            && last
                .as_ref()
                .is_none_or(|l| (l.fds, l.threads) == (before.fds, before.threads)),
        detail: format!(
            "fds {} at the start, {} after warm-up, {} at the end (after warm-up: {}); threads \
             {} / {} / {}; with no frontend: {} fds and {} threads before the first session, {} \
             after the last",
            samples[0].fds,
            base.fds,
            end.fds,
            if fds.iter().all(|&f| f == base.fds) {
                "identical at every sample".to_string()
            } else {
                format!("{fds:?}")
            },
            samples[0].threads,
            base.threads,
            end.threads,
            before.fds,
            before.threads,
            last.as_ref().map_or("-".into(), |l| format!(
                "{} fds and {} threads",
                l.fds, l.threads
            )),
        ),
    });
    let intervals: Vec<Interval> = samples.windows(2).map(|w| interval(&w[0], &w[1])).collect();
    let idle: Vec<String> = samples
        .windows(2)
        .zip(&intervals)
        .filter(|(_, iv)| iv.h2c.0 == 0 || iv.c2h.0 == 0 || iv.sink == 0 || iv.host_rx == 0)
        .map(|(w, _)| format!("{}-{}", mmss(w[0].t), mmss(w[1].t)))
        .collect();
    let last_s = last.as_ref().unwrap_or(end);
    checks.push(Check {
        what: "traffic both ways in every interval",
        ok: idle.is_empty() && !intervals.is_empty(),
        detail: format!(
            "host to card {} frames ({}) written to the tap, {} received by the sink; card to \
             host {} frames ({}) delivered, {} received by the frontends{}",
            last_s.d("tx_frames"),
            gb(last_s.d("tx_bytes")),
            last_s.sink.0,
            last_s.d("rx_frames"),
            gb(last_s.d("rx_bytes")),
            last_s.host_rx.0,
            if idle.is_empty() {
                String::new()
            } else {
                format!("; no traffic in {}", idle.join(", "))
            }
        ),
    });
    let totals = last_s.drops();
    let unexpected: Vec<String> = totals
        .iter()
        .filter(|(n, v)| **v > 0 && class(n) == "UNEXPECTED")
        .map(|(n, v)| {
            if last_s.daemon.contains_key(n) {
                format!("{n}={v} ({})", unexpected_why(n))
            } else {
                format!("{n}={v}")
            }
        })
        .collect();
    let expected: Vec<String> = totals
        .iter()
        .filter(|(n, v)| **v > 0 && class(n) != "UNEXPECTED")
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    checks.push(Check {
        what: "no unexplained drops",
        ok: unexpected.is_empty(),
        detail: format!(
            "explained: {}; unexpected: {}",
            if expected.is_empty() {
                "none".into()
            } else {
                expected.join(" ")
            },
            if unexpected.is_empty() {
                "none".into()
            } else {
                unexpected.join(" ")
            }
        ),
    });
    checks.extend(accounting);
    checks.push(Check {
        what: "daemon log",
        ok: log_errors.is_empty(),
        detail: format!(
            "{} error line(s), {log_warnings} warning(s){}",
            log_errors.len(),
            log_errors
                .first()
                .map(|l| format!("; first: {l}"))
                .unwrap_or_default()
        ),
    });
    let pass = checks.iter().all(|c| c.ok);

    // Reports.
    for c in &checks {
        println!(
            "soak: {} {}: {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.what,
            c.detail
        );
    }
    let md = markdown(
        &command_line,
        &plan,
        opts,
        &before,
        &samples,
        &intervals,
        last.as_ref(),
        &checks,
        pass,
        elapsed,
    );
    std::fs::write(out.join("soak.md"), &md)?;
    let json = to_json(
        &command_line,
        &plan,
        opts,
        &before,
        &samples,
        last.as_ref(),
        &checks,
        pass,
    );
    std::fs::write(
        out.join("soak.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    let summary = format!(
        "{} ({} sessions); RSS {} KiB after warm-up, {} KiB at the end ({:+} KiB, bound {}); fds \
         {} -> {}; threads {} -> {}; h2c {} frames, c2h {} frames; unexpected drops: {}",
        mmss(elapsed),
        end.sessions,
        base.rss,
        end.rss,
        i128::from(end.rss) - i128::from(base.rss),
        opts.rss_bound_kib,
        base.fds,
        end.fds,
        base.threads,
        end.threads,
        last_s.d("tx_frames"),
        last_s.d("rx_frames"),
        if unexpected.is_empty() {
            "none".into()
        } else {
            unexpected.join(" ")
        }
    );
    println!("soak: table in {}", out.join("soak.md").display());
    if pass {
        println!("PASS soak: {summary}");
        Ok(())
    } else {
        let failed: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.what).collect();
        println!("FAIL soak: {}; {summary}", failed.join(", "));
        bail!("soak failed (logs in {})", logs.display())
    }
}

#[allow(clippy::too_many_arguments)]
fn markdown(
    command_line: &str,
    plan: &Plan,
    opts: &Options,
    before: &Sample,
    samples: &[Sample],
    intervals: &[Interval],
    last: Option<&Sample>,
    checks: &[Check],
    pass: bool,
    elapsed: f64,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "`cargo xtask {command_line}`\n");
    let _ = writeln!(
        s,
        "{} of traffic both ways ({} B frames interleaved, {} queue pair(s)), a sample every {} \
         s, warm-up {} s, {}; {} in all.\n",
        mmss(plan.duration),
        opts.sizes
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("/"),
        opts.queues,
        plan.interval,
        plan.warmup,
        if opts.no_reconnect {
            "one frontend session"
        } else {
            "a new frontend session half-way through every interval"
        },
        mmss(elapsed)
    );
    let _ = writeln!(
        s,
        "| elapsed | RSS KiB | anon KiB | guest KiB | fds | threads | sessions | h2c frames | \
         h2c bytes | c2h frames | c2h bytes | drops in the interval: +delta (total) |"
    );
    let _ = writeln!(
        s,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    let _ = writeln!(
        s,
        "| before (no frontend) | {} | {} | {} | {} | {} | 0 | | | | | |",
        before.rss, before.anon, before.shmem, before.fds, before.threads
    );
    for (i, x) in samples.iter().enumerate() {
        let (h2c, c2h, drops) = match i.checked_sub(1).and_then(|j| intervals.get(j)) {
            Some(iv) => (
                (iv.h2c.0.to_string(), gb(iv.h2c.1)),
                (iv.c2h.0.to_string(), gb(iv.c2h.1)),
                drops_text(&iv.drops, true),
            ),
            None => (
                ("-".into(), "-".into()),
                ("-".into(), "-".into()),
                "(start)".into(),
            ),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            mmss(x.t),
            x.rss,
            x.anon,
            x.shmem,
            x.fds,
            x.threads,
            x.sessions,
            h2c.0,
            h2c.1,
            c2h.0,
            c2h.1,
            drops
        );
    }
    if let Some(l) = last {
        let _ = writeln!(
            s,
            "| end (drained, disconnected) | {} | {} | {} | {} | {} | {} | {} total | {} | {} \
             total | {} | |",
            l.rss,
            l.anon,
            l.shmem,
            l.fds,
            l.threads,
            l.sessions,
            l.d("tx_frames"),
            gb(l.d("tx_bytes")),
            l.d("rx_frames"),
            gb(l.d("rx_bytes"))
        );
    }
    let _ = writeln!(
        s,
        "\nh2c: frames the daemon wrote to the tap; c2h: frames it delivered to the host. \
         guest: guest memory the daemon has mapped and touched (RssShmem). Drops that load \
         explains:\n"
    );
    for (n, why) in BACKPRESSURE.iter().chain(RECONNECT).chain(KERNEL_EXPLAINED) {
        let _ = writeln!(s, "- `{n}`: {why}.");
    }
    let _ = writeln!(
        s,
        "- Any other daemon counter of drops or errors fails the soak ({}), as do \
         {}.\n",
        daemon_unexpected()
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", "),
        KERNEL_UNEXPECTED
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for c in checks {
        let _ = writeln!(
            s,
            "- {} {}: {}",
            if c.ok { "ok" } else { "**FAIL**" },
            c.what,
            c.detail
        );
    }
    let _ = writeln!(s, "\n**{}**", if pass { "PASS" } else { "FAIL" });
    s
}

#[allow(clippy::too_many_arguments)]
fn to_json(
    command_line: &str,
    plan: &Plan,
    opts: &Options,
    before: &Sample,
    samples: &[Sample],
    last: Option<&Sample>,
    checks: &[Check],
    pass: bool,
) -> Json {
    let sample = |s: &Sample| {
        json!({
            "t": (s.t * 10.0).round() / 10.0,
            "rss_kib": s.rss,
            "rss_anon_kib": s.anon,
            "rss_file_kib": s.file,
            "rss_shmem_kib": s.shmem,
            "fds": s.fds,
            "threads": s.threads,
            "sessions": s.sessions,
            "sink_frames": s.sink.0,
            "sink_bytes": s.sink.1,
            "host_rx_frames": s.host_rx.0,
            "host_rx_bytes": s.host_rx.1,
            "daemon": s.daemon,
            "kernel": s.kernel,
        })
    };
    json!({
        "command": format!("cargo xtask {command_line}"),
        "seconds": plan.duration,
        "interval": plan.interval,
        "warmup": plan.warmup,
        "sizes": opts.sizes,
        "queues": opts.queues,
        "reconnect": !opts.no_reconnect,
        "rss_bound_kib": opts.rss_bound_kib,
        "before": sample(before),
        "samples": samples.iter().map(sample).collect::<Vec<_>>(),
        "end": last.map(sample),
        "checks": checks
            .iter()
            .map(|c| json!({ "what": c.what, "ok": c.ok, "detail": c.detail }))
            .collect::<Vec<_>>(),
        "pass": pass,
    })
}
