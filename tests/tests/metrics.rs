//! Counters and state while the daemon runs: the JSON on `--control PATH` (and `vhost-card stats
//! [--json]`) and the Prometheus exposition on `--metrics-listen ADDR` (bound to 127.0.0.1, port
//! chosen by the kernel and read from the daemon's log).
//!
//! - Before any frontend: every series of every counter family, for every queue pair, is there
//!   at 0 (each drop `reason`), the state says not connected, the process metrics are there.
//! - With traffic: a thread scrapes both endpoints while the driver sends and receives frames;
//!   the counters move, never go backwards, and end at what was sent, with the same values in
//!   the JSON, the table, and the labelled series; a runt frame shows up as
//!   `reason="runt"`; the state follows the frontend (connected, acked features, pairs in use).

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use card_tests::card::*;
use card_tests::daemon::stats_cmd;
use card_tests::netdev::TxLayout;
use card_tests::packet::{pattern, udp_frame, VnetHdr};
use card_tests::TempDir;
use rig::daemon::{http_get, metrics_addr, scrape};
use vhost_card::stats::{Snapshot, COUNTERS};

/// The drop reasons by direction, spelled out so a renamed or lost reason fails here.
const REASONS: &[(&str, &[&str])] = &[
    (
        "tx",
        &[
            "bad_chain",
            "short_header",
            "bad_vnet_hdr",
            "runt",
            "oversize",
            "tap_error",
            "not_ip",
            "malformed",
        ],
    ),
    (
        "rx",
        &[
            "bad_chain",
            "truncated",
            "gso",
            "runt",
            "disconnect",
            "not_ip",
            "local_full",
        ],
    ),
];

fn read_control(path: &Path) -> Result<Snapshot> {
    Ok(vhost_card::control::query_snapshot(path)?)
}

/// Counter `name` of queue pair `pair` in a snapshot.
fn json_counter(snap: &Snapshot, pair: usize, name: &str) -> Result<u64> {
    snap.pairs
        .get(pair)
        .and_then(|p| p.counters.get(name))
        .ok_or_else(|| anyhow!("no {name} for pair {pair} in {snap:?}"))
}

/// The series of flat counter `name` of queue pair `pair`, as Prometheus names it:
/// `vhost_card_<family>_total{queue="<pair>",<labels>}`.
fn series(name: &str, pair: usize) -> Result<String> {
    let c = COUNTERS
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| anyhow!("no counter {name}"))?;
    let mut labels = format!("queue=\"{pair}\"");
    for (k, v) in c.labels {
        labels.push_str(&format!(",{k}=\"{v}\""));
    }
    Ok(format!("vhost_card_{}_total{{{labels}}}", c.family))
}

/// The value of the sample `series` (name and labels, exactly) in an exposition.
fn sample(text: &str, series: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .ok_or_else(|| anyhow!("no `{series}` in the scrape:\n{text}"))?
        .trim()
        .parse()
        .with_context(|| format!("value of {series}"))
}

fn prom_counter(text: &str, name: &str, pair: usize) -> Result<u64> {
    Ok(sample(text, &series(name, pair)?)? as u64)
}

/// A card with a control socket and a metrics endpoint on a kernel-chosen port.
fn start(dir: &TempDir, extra: &[&str]) -> Result<(Card, PathBuf, String)> {
    let control = dir.path().join("card.control");
    let control_s = control.to_string_lossy().into_owned();
    let mut args = vec!["--control", &control_s, "--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let card = Card::start(&args)?;
    let metrics = metrics_addr(&card.daemon.log())?;
    ensure!(
        metrics.starts_with("127.0.0.1:"),
        "metrics bound to {metrics}"
    );
    Ok((card, control, metrics))
}

#[test]
fn every_series_is_exported_at_zero_before_a_frontend_connects() -> Result<()> {
    let dir = TempDir::new("card-tests")?;
    let (card, control, metrics) = start(&dir, &["--queues", "2"])?;

    let (status, headers, prom) = http_get(&metrics, "/metrics", None)?;
    ensure!(status.contains(" 200"), "GET /metrics: {status}");
    ensure!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "Prometheus content type missing: {headers}"
    );
    for pair in 0..2 {
        for c in COUNTERS {
            ensure!(
                prom_counter(&prom, c.name, pair)? == 0,
                "{} of pair {pair} not 0",
                c.name
            );
        }
        for (direction, reasons) in REASONS {
            for reason in *reasons {
                let s = format!(
                    "vhost_card_dropped_frames_total{{queue=\"{pair}\",direction=\"{direction}\",\
                     reason=\"{reason}\"}}"
                );
                ensure!(sample(&prom, &s)? == 0.0, "{s} not 0");
            }
        }
    }
    ensure!(prom.contains("# TYPE vhost_card_dropped_frames_total counter"));
    // One counter for the drop reasons, not a metric name per reason.
    ensure!(
        !prom.contains("vhost_card_tx_drop_") && !prom.contains("queue_pair="),
        "old metric names are back:\n{prom}"
    );
    for (s, v) in [
        ("vhost_card_frontend_connected", 0.0),
        ("vhost_card_frontend_sessions_total", 0.0),
        ("vhost_card_queue_pairs", 2.0),
        ("vhost_card_queue_pairs_in_use", 0.0),
        ("vhost_card_queue_in_use{queue=\"1\"}", 0.0),
        ("vhost_card_mtu_bytes", 65520.0),
        ("vhost_card_guest_memory_faults_total", 0.0),
    ] {
        ensure!(sample(&prom, s)? == v, "{s} is not {v}");
    }
    let version = env!("CARGO_PKG_VERSION");
    ensure!(
        prom.lines().any(|l| l.starts_with(&format!(
            "vhost_card_info{{version=\"{version}\",transport=\"vhost-user\",features_offered=\"csum,"
        )) && l.ends_with(",features_acked=\"\"} 1")),
        "no info metric:\n{prom}"
    );
    // The process, read from /proc under the sandbox.
    let pid_start = std::fs::metadata(format!("/proc/{}", card.daemon.pid()?))?
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let start_time = sample(&prom, "process_start_time_seconds")?;
    ensure!(
        (start_time - pid_start).abs() < 5.0,
        "process_start_time_seconds {start_time}, /proc says {pid_start}"
    );
    ensure!(sample(&prom, "process_resident_memory_bytes")? > 1e6);
    ensure!(sample(&prom, "process_threads")? >= 2.0);
    let fds = sample(&prom, "process_open_fds")?;
    let real = std::fs::read_dir(format!("/proc/{}/fd", card.daemon.pid()?))?.count() as f64;
    ensure!(
        (fds - real).abs() <= 2.0,
        "process_open_fds {fds}, /proc has {real}"
    );
    ensure!(sample(&prom, "process_max_fds")? >= fds);
    ensure!(sample(&prom, "process_cpu_seconds_total")? >= 0.0);

    // The same state through the control socket.
    let snap = read_control(&control)?;
    ensure!(!snap.state.connected && snap.state.features.acked.is_none());
    ensure!(snap.state.queue_pairs == 2 && snap.pairs.len() == 2);
    let table = stats_cmd(&control, &[])?;
    eprintln!("vhost-card stats (no frontend yet):\n{table}");
    ensure!(
        table.contains("not connected (0 sessions so far)"),
        "{table}"
    );
    ensure!(table.contains("0 in use of 2"), "{table}");
    ensure!(table.contains("none yet"), "{table}");
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    json_tx: u64,
    json_rx: u64,
    prom_tx: u64,
    prom_rx: u64,
}

fn take_sample(control: &Path, metrics: &str) -> Result<Sample> {
    let json = read_control(control)?;
    let prom = scrape(metrics)?;
    Ok(Sample {
        json_tx: json_counter(&json, 0, "tx_frames")?,
        json_rx: json_counter(&json, 0, "rx_frames")?,
        prom_tx: prom_counter(&prom, "tx_frames", 0)?,
        prom_rx: prom_counter(&prom, "rx_frames", 0)?,
    })
}

#[test]
fn counters_and_state_follow_the_traffic() -> Result<()> {
    let dir = TempDir::new("card-tests")?;
    let (card, control, metrics) = start(&dir, &[])?;
    let control_s = control.to_string_lossy().into_owned();
    let (status, _, _) = http_get(&metrics, "/nothing-here", None)?;
    ensure!(status.contains(" 404"), "GET /nothing-here: {status}");

    let mut dev = card.driver()?;
    let port = 7400;
    let sock = card.ns.udp_socket(SocketAddrV4::new(CARD_IP, port))?;
    let pkt = card.ns.packet_socket(TAP)?;

    // Scrape both endpoints continuously while the traffic flows.
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (stop, control, metrics) = (stop.clone(), control.clone(), metrics.clone());
        std::thread::spawn(move || -> Result<Vec<Sample>> {
            let mut samples = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                samples.push(take_sample(&control, &metrics)?);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(samples)
        })
    };

    let (rounds, tx_per_round, rx_per_round) = (5u64, 20u64, 10u64);
    let mut tx_bytes = 0u64;
    for round in 0..rounds {
        for i in 0..tx_per_round {
            let payload = pattern(100 + i as usize * 10, (round * 31 + i) as u8);
            let frame = card.frame_to(SocketAddrV4::new(CARD_IP, port), 41000, &payload)?;
            tx_bytes += frame.len() as u64;
            dev.send_wait(&VnetHdr::default(), &frame, &TxLayout::Split)?;
            let mut buf = [0u8; 2048];
            let n = sock.recv(&mut buf).context("nothing reached the card")?;
            ensure!(buf[..n] == payload[..], "payload corrupted");
        }
        for i in 0..rx_per_round {
            let frame = udp_frame(
                card.mac,
                HOST_MAC,
                SocketAddrV4::new(CARD_IP, 5555),
                SocketAddrV4::new(HOST_IP, 6000 + i as u16),
                &pattern(256, (round + i) as u8),
            )?;
            pkt.send(&frame)?;
            dev.recv_matching(Duration::from_secs(5), |f| f.frame == frame)?;
        }
        // Time for the scraper to see this round's counts even on a loaded machine (it
        // failed once with 100 ms while a VM suite ran beside it).
        std::thread::sleep(Duration::from_millis(300));
    }
    // Two runts (shorter than an Ethernet header): dropped, counted by reason.
    for _ in 0..2 {
        dev.send_wait(&VnetHdr::default(), &[0u8; 6], &TxLayout::Split)?;
    }
    stop.store(true, Ordering::SeqCst);
    let samples = scraper
        .join()
        .map_err(|_| anyhow!("the scraper panicked"))??;

    // Never backwards, and seen in between: the counters moved while the daemon served.
    ensure!(samples.len() >= 10, "only {} scrapes", samples.len());
    for w in samples.windows(2) {
        let (a, b) = (w[0], w[1]);
        ensure!(
            b.json_tx >= a.json_tx
                && b.json_rx >= a.json_rx
                && b.prom_tx >= a.prom_tx
                && b.prom_rx >= a.prom_rx,
            "a counter went backwards: {a:?} then {b:?}"
        );
    }
    let total_tx = rounds * tx_per_round;
    let distinct = |f: fn(&Sample) -> u64| {
        let mut v: Vec<u64> = samples.iter().map(f).collect();
        v.dedup();
        v.len()
    };
    let intermediate = samples
        .iter()
        .filter(|s| s.json_tx > 0 && s.json_tx < total_tx)
        .count();
    ensure!(
        intermediate > 0 && distinct(|s| s.json_tx) >= 3 && distinct(|s| s.prom_tx) >= 3,
        "the counters did not move during the traffic: {samples:?}"
    );
    ensure!(
        distinct(|s| s.json_rx) >= 3 && distinct(|s| s.prom_rx) >= 3,
        "rx counters did not move during the traffic"
    );

    // The end state, identical in the JSON, `vhost-card stats --json`, the table and the
    // labelled series. A pass adds its counts as it ends, a moment after the frontend may have
    // seen its last used buffer: wait for them first.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut json = read_control(&control)?;
    while (json_counter(&json, 0, "tx_frames")? < total_tx
        || json_counter(&json, 0, "rx_frames")? < rounds * rx_per_round)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
        json = read_control(&control)?;
    }
    let prom = scrape(&metrics)?;
    let table = stats_cmd(&control, &[])?;
    let cli_json_text = stats_cmd(&control, &["--json"])?;
    let cli_json = Snapshot::parse(&cli_json_text)?;
    eprintln!("vhost-card stats --control {control_s}:\n{table}");
    eprintln!(
        "GET http://{metrics}/metrics (frames, bytes, drops, state):\n{}",
        prom.lines()
            .filter(|l| l.starts_with("vhost_card_frames_total")
                || l.starts_with("vhost_card_bytes_total")
                || l.starts_with("vhost_card_dropped_frames_total{queue=\"0\",direction=\"tx\"")
                || l.starts_with("vhost_card_frontend")
                || l.starts_with("vhost_card_queue_pairs")
                || l.starts_with("vhost_card_info"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for c in COUNTERS {
        let j = json_counter(&json, 0, c.name)?;
        let row = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(c.name))
            .ok_or_else(|| anyhow!("no row {} in\n{table}", c.name))?;
        // Counters that move on their own (kicks, notifications) may differ between two reads;
        // the rest must be equal everywhere.
        if ["rx_kicks", "tx_kicks", "notifications", "rx_no_buffers"].contains(&c.name) {
            continue;
        }
        ensure!(
            prom_counter(&prom, c.name, 0)? == j
                && json_counter(&cli_json, 0, c.name)? == j
                && row.split_whitespace().nth(1) == Some(&j.to_string()),
            "{} differs: JSON {j}, scrape {}, table `{row}`",
            c.name,
            prom_counter(&prom, c.name, 0)?
        );
    }
    ensure!(json_counter(&json, 0, "tx_frames")? == total_tx, "{json:?}");
    ensure!(json_counter(&json, 0, "tx_bytes")? == tx_bytes, "{json:?}");
    ensure!(
        json_counter(&json, 0, "rx_frames")? >= rounds * rx_per_round,
        "{json:?}"
    );
    ensure!(json_counter(&json, 0, "tx_kicks")? > 0, "{json:?}");
    ensure!(
        sample(
            &prom,
            "vhost_card_dropped_frames_total{queue=\"0\",direction=\"tx\",reason=\"runt\"}"
        )? == 2.0,
        "the runts are not counted by reason"
    );
    ensure!(
        sample(
            &prom,
            "vhost_card_dropped_frames_total{queue=\"0\",direction=\"tx\",reason=\"oversize\"}"
        )? == 0.0
    );

    // The state while the frontend is connected.
    ensure!(sample(&prom, "vhost_card_frontend_connected")? == 1.0);
    ensure!(sample(&prom, "vhost_card_frontend_sessions_total")? == 1.0);
    ensure!(sample(&prom, "vhost_card_queue_pairs_in_use")? == 1.0);
    ensure!(sample(&prom, "vhost_card_queue_in_use{queue=\"0\"}")? == 1.0);
    let acked = json
        .state
        .features
        .acked
        .as_ref()
        .ok_or_else(|| anyhow!("no acked features while connected: {json:?}"))?;
    ensure!(
        acked.names.iter().any(|n| n == "version-1"),
        "acked: {acked:?}"
    );
    let info = format!("features_acked=\"{}\"}} 1", acked.names.join(","));
    ensure!(
        prom.lines()
            .any(|l| l.starts_with("vhost_card_info{") && l.ends_with(&info)),
        "no `{info}` in the info metric:\n{prom}"
    );
    ensure!(
        table.contains("connected (1 session so far)") && table.contains(&acked.bits),
        "{table}"
    );
    ensure!(json.state.connected && json.state.pairs_in_use == 1 && json.pairs[0].in_use);

    // OpenMetrics for a scraper that asks for it.
    let (status, headers, om) = http_get(
        &metrics,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )?;
    ensure!(status.contains(" 200"));
    ensure!(
        headers.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{headers}"
    );
    ensure!(om.ends_with("# EOF\n") && om.contains("# TYPE vhost_card_frames counter"));
    ensure!(om.contains(&format!(
        "vhost_card_frames_total{{queue=\"0\",direction=\"tx\"}} {total_tx}"
    )));

    // The frontend goes: the state says so, the counters stay.
    drop(dev);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let prom = scrape(&metrics)?;
        if sample(&prom, "vhost_card_frontend_connected")? == 0.0 {
            ensure!(sample(&prom, "vhost_card_queue_pairs_in_use")? == 0.0);
            ensure!(prom_counter(&prom, "tx_frames", 0)? == total_tx);
            ensure!(prom.contains("features_acked=\"\"} 1"));
            break;
        }
        if Instant::now() > deadline {
            bail!("still connected after the frontend went:\n{prom}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// host-config's alert rules (prometheus/vhost-card.rules.yml) and Grafana dashboard
/// (grafana/vhost-card.json) use only metric names a running daemon exports, with a frontend
/// connected and frames both ways.
#[test]
fn alert_rules_and_dashboard_use_real_metric_names() -> Result<()> {
    let dir = TempDir::new("card-tests")?;
    let (card, _control, metrics) = start(&dir, &["--queues", "2"])?;
    let mut dev = card.driver()?;
    card.check_host_to_card(&mut dev, 7001, 1)?;
    card.check_card_to_host(&mut dev, 2)?;
    let prom = scrape(&metrics)?;
    let (rules, dashboard) = rig::monitoring::check_against(&prom)?;
    eprintln!("alert rules: {rules} metric names, dashboard: {dashboard}, all in the scrape");
    Ok(())
}
