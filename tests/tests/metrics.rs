//! Counters while the daemon runs: the JSON on `--control PATH` (also through
//! `vhost-card stats --control PATH`) and the Prometheus text on `--metrics-listen ADDR`
//! (bound to 127.0.0.1, port chosen by the kernel and read from the daemon's log). A thread
//! scrapes both endpoints continuously while the driver sends and receives frames; the
//! counters must move during the traffic, never go backwards, and end at what was sent.

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use card_tests::card::*;
use card_tests::daemon::binary;
use card_tests::netdev::TxLayout;
use card_tests::packet::{pattern, udp_frame, VnetHdr};
use card_tests::TempDir;

/// Counter `name` of queue pair 0 in the control socket's JSON.
fn json_counter(json: &str, name: &str) -> Result<u64> {
    let key = format!("\"{name}\":");
    let at = json
        .find(&key)
        .ok_or_else(|| anyhow!("no {name} in {json}"))?
        + key.len();
    let digits: String = json[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Ok(digits.parse()?)
}

/// Sample of `vhost_card_<name>_total{queue_pair="0"}` in the Prometheus text.
fn prom_counter(text: &str, name: &str) -> Result<u64> {
    let prefix = format!("vhost_card_{name}_total{{queue_pair=\"0\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .ok_or_else(|| anyhow!("no {prefix} in the scrape"))?
        .trim()
        .parse()
        .context("sample value")
}

fn read_control(path: &Path) -> Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// GET `path` over HTTP/1.0: (status line, headers, body).
fn http_get(addr: &str, path: &str) -> Result<(String, String, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no header/body separator in {text:?}"))?;
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Ok((status.to_string(), headers.to_lowercase(), body.to_string()))
}

/// The address the daemon's metrics endpoint bound, from its log.
fn metrics_addr(log: &str) -> Result<String> {
    log.lines()
        .find_map(|l| l.split_once("metrics on http://")?.1.split('/').next())
        .map(String::from)
        .ok_or_else(|| anyhow!("the daemon logged no metrics address:\n{log}"))
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    json_tx: u64,
    json_rx: u64,
    prom_tx: u64,
    prom_rx: u64,
}

fn sample(control: &Path, metrics: &str) -> Result<Sample> {
    let json = read_control(control)?;
    let (status, _, prom) = http_get(metrics, "/metrics")?;
    ensure!(status.contains(" 200"), "GET /metrics: {status}");
    Ok(Sample {
        json_tx: json_counter(&json, "tx_frames")?,
        json_rx: json_counter(&json, "rx_frames")?,
        prom_tx: prom_counter(&prom, "tx_frames")?,
        prom_rx: prom_counter(&prom, "rx_frames")?,
    })
}

#[test]
fn control_socket_and_prometheus_follow_the_traffic() -> Result<()> {
    let dir = TempDir::new("card-tests")?;
    let control: PathBuf = dir.path().join("card.control");
    let control_s = control.to_string_lossy().into_owned();
    let card = Card::start(&["--control", &control_s, "--metrics-listen", "127.0.0.1:0"])?;
    let metrics = metrics_addr(&card.daemon.log())?;
    ensure!(
        metrics.starts_with("127.0.0.1:"),
        "metrics bound to {metrics}"
    );

    // Before any traffic: every counter is on both endpoints, at zero.
    let json = read_control(&control)?;
    let (status, headers, prom) = http_get(&metrics, "/metrics")?;
    ensure!(status.contains(" 200"), "GET /metrics: {status}");
    ensure!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "Prometheus content type missing: {headers}"
    );
    for (name, _) in vhost_card::stats::HELP {
        ensure!(json_counter(&json, name)? == 0, "{name} not 0 at start");
        ensure!(prom_counter(&prom, name)? == 0, "{name} not 0 at start");
        ensure!(
            prom.contains(&format!("# TYPE vhost_card_{name}_total counter")),
            "no TYPE line for {name}"
        );
    }
    let (status, _, _) = http_get(&metrics, "/nothing-here")?;
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
                samples.push(sample(&control, &metrics)?);
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
        std::thread::sleep(Duration::from_millis(100));
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

    // The end state, identical on both endpoints and in `vhost-card stats`.
    let json = read_control(&control)?;
    let (_, _, prom) = http_get(&metrics, "/metrics")?;
    let out = std::process::Command::new(binary()?)
        .args(["stats", "--control", &control_s])
        .output()?;
    ensure!(out.status.success(), "vhost-card stats failed");
    let stats = String::from_utf8(out.stdout)?;
    eprintln!("vhost-card stats --control {control_s}:\n{stats}");
    eprintln!(
        "GET http://{metrics}/metrics (frames, bytes):\n{}",
        prom.lines()
            .filter(|l| !l.starts_with('#')
                && (l.contains("_frames_total") || l.contains("_bytes_total")))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for name in ["tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "tx_kicks"] {
        let j = json_counter(&json, name)?;
        ensure!(
            prom_counter(&prom, name)? == j && json_counter(&stats, name)? == j,
            "{name} differs between the endpoints"
        );
    }
    ensure!(json_counter(&json, "tx_frames")? == total_tx, "{json}");
    ensure!(json_counter(&json, "tx_bytes")? == tx_bytes, "{json}");
    ensure!(
        json_counter(&json, "rx_frames")? >= rounds * rx_per_round,
        "{json}"
    );
    ensure!(json_counter(&json, "tx_kicks")? > 0, "{json}");
    Ok(())
}
