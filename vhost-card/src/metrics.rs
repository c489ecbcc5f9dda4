//! The Prometheus exposition, written by the `prometheus-client` crate from a collector that
//! reads the counters and the state when scraped (the workers only ever bump atomics).
//!
//! Families (every series exists, at 0, from start-up; `queue` is the queue pair, `direction`
//! is `tx` for host to card and `rx` for card to host, as virtio names the queues):
//! - one counter family per [`FAMILIES`] entry (and per single-member family of
//!   [`crate::stats::COUNTERS`]): `vhost_card_frames_total{queue,direction}`,
//!   `vhost_card_dropped_frames_total{queue,direction,reason}`, ...;
//! - state: `vhost_card_frontend_connected`, `vhost_card_frontend_sessions_total`,
//!   `vhost_card_queue_pairs`, `vhost_card_queue_pairs_in_use`, `vhost_card_queue_in_use{queue}`,
//!   `vhost_card_mtu_bytes`, `vhost_card_info{version,transport,features_offered,features_acked}`,
//!   `vhost_card_guest_memory_faults_total`;
//! - the process: `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//!   `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`, `process_threads`,
//!   `process_start_time_seconds`.

use std::fmt;
use std::sync::Arc;

use log::debug;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::procstat::ProcSelf;
use crate::stats::{Stats, COUNTERS};

/// Port `--metrics-listen` uses when the address has none. The Prometheus exporters' range
/// (9100-9999) is fully allocated; 10046 is outside it and is no well-known exporter's or
/// service's default.
pub const DEFAULT_PORT: u16 = 10046;

/// Prefix of every metric of the card.
const PREFIX: &str = "vhost_card_";

/// Descriptions of the counter families with several members; a family with one member is
/// described by its counter's own description.
pub const FAMILIES: &[(&str, &str)] = &[
    (
        "frames",
        "Frames moved: tx from the host to the card's tap, rx from the tap to the host.",
    ),
    ("bytes", "Bytes of those frames (vnet header excluded)."),
    (
        "dropped_frames",
        "Frames (or descriptor chains) dropped, by direction and reason.",
    ),
    (
        "rx_checksums",
        "RX frames whose checksum the card handled: verified (marked DATA_VALID), bad (passed up \
         unmarked), completed (partial checksum filled in for a host without GUEST_CSUM).",
    ),
    (
        "rx_unmarked_frames",
        "RX frames handed up with neither DATA_VALID nor NEEDS_CSUM, by reason: fragment, not_ip, \
         no_l4_csum (ESP, GRE, ...), malformed, bad_csum, passthrough (--rx-csum passthrough), \
         no_guest_csum (the host did not negotiate GUEST_CSUM).",
    ),
    (
        "rx_reassembly",
        "IP fragments going up reassembled by the card: fragments taken in, datagrams handed up \
         whole, datagrams above the host's MTU cut to it (split), duplicate fragments dropped, and \
         datagrams discarded (overlap, malformed, timeout, evicted from a full table).",
    ),
    (
        "neighbour_replies",
        "ARP requests and IPv6 neighbour solicitations from the host the card answered itself \
         (--link ip).",
    ),
    (
        "neighbour_ignored",
        "ARP and neighbour discovery packets from the host counted and not answered, by \
         protocol and reason: malformed, not_behind (an address that cannot be behind the link), \
         gratuitous (ARP announcements and probes), dad (IPv6 duplicate address detection).",
    ),
    (
        "kicks",
        "Kicks from the guest: on the TX queue (frames to send), on the RX queue (buffers posted).",
    ),
    (
        "ring_broken",
        "Times a ring's available index ran more than a ring ahead (queue ignored until reset).",
    ),
];

/// The counter families in declaration order, each with its description.
fn families() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for c in COUNTERS {
        if out.iter().any(|(f, _)| *f == c.family) {
            continue;
        }
        let help = FAMILIES
            .iter()
            .find(|(f, _)| *f == c.family)
            .map_or(c.help, |(_, h)| h);
        out.push((c.family, help));
    }
    out
}

/// The registry behind `GET /metrics`.
#[derive(Debug)]
pub struct Exporter {
    registry: Registry,
}

/// `Content-Type` of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// `Content-Type` of the OpenMetrics text format.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Exporter {
    /// `proc_self`: the process figures (`None` leaves the `process_*` metrics out).
    pub fn new(stats: Arc<Stats>, proc_self: Option<ProcSelf>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(CardCollector { stats }));
        if let Some(p) = proc_self {
            registry.register_collector(Box::new(ProcessCollector(p)));
        }
        Exporter { registry }
    }

    /// The exposition and its content type: OpenMetrics when `accept` (the request's Accept
    /// header) asks for it, as Prometheus does, the Prometheus text format otherwise.
    pub fn render(&self, accept: &str) -> Result<(String, &'static str), fmt::Error> {
        let mut s = String::new();
        if accept.contains("application/openmetrics-text") {
            prometheus_client::encoding::text::encode(&mut s, &self.registry)?;
            Ok((s, OPENMETRICS_TEXT))
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut s, &self.registry)?;
            Ok((s, PROMETHEUS_TEXT))
        }
    }
}

#[derive(Debug)]
struct CardCollector {
    stats: Arc<Stats>,
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge<T>(enc: &mut DescriptorEncoder, name: &str, help: &str, value: T) -> fmt::Result
where
    ConstGauge<T>: EncodeMetric,
{
    let g = ConstGauge::new(value);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for CardCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let snap = self.stats.snapshot();
        let queues: Vec<String> = snap.pairs.iter().map(|p| p.pair.to_string()).collect();
        for (family, help) in families() {
            let name = format!("{PREFIX}{family}");
            let mut m = enc.encode_descriptor(&name, help, None, MetricType::Counter)?;
            for (pair, queue) in snap.pairs.iter().zip(&queues) {
                for (k, c) in COUNTERS.iter().enumerate() {
                    if c.family != family {
                        continue;
                    }
                    let mut labels: Vec<(&str, &str)> = vec![("queue", queue)];
                    labels.extend_from_slice(c.labels);
                    let v = pair.counters.0.get(k).map_or(0, |(_, v)| *v);
                    ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                }
            }
        }

        let st = &snap.state;
        gauge(
            &mut enc,
            "vhost_card_frontend_connected",
            "1 while a frontend is connected: a VMM to the vhost-user socket, or (VDUSE) this \
             host's driver with the device running (DRIVER_OK).",
            i64::from(st.connected),
        )?;
        counter(
            &mut enc,
            "vhost_card_frontend_sessions",
            "Frontend sessions since the daemon started: vhost-user connections accepted, or \
             (VDUSE) driver starts.",
            st.sessions,
        )?;
        gauge(
            &mut enc,
            "vhost_card_queue_pairs",
            "Queue pairs the device offers (--queues).",
            i64::try_from(st.queue_pairs).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut enc,
            "vhost_card_queue_pairs_in_use",
            "Queue pairs the frontend uses (RX ring started and enabled).",
            i64::try_from(st.pairs_in_use).unwrap_or(i64::MAX),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "vhost_card_queue_in_use",
                "1 for a queue pair the frontend uses (RX ring started and enabled).",
                None,
                MetricType::Gauge,
            )?;
            for (pair, queue) in snap.pairs.iter().zip(&queues) {
                let labels = [("queue", queue.as_str())];
                ConstGauge::new(i64::from(pair.in_use)).encode(m.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut enc,
            "vhost_card_mtu_bytes",
            "MTU offered to the host (VIRTIO_NET_F_MTU, --mtu).",
            i64::from(st.mtu),
        )?;
        let offered = st.features.offered.names.join(",");
        let acked = st
            .features
            .acked
            .as_ref()
            .map(|a| a.names.join(","))
            .unwrap_or_default();
        let info = Info::new(vec![
            ("version", snap.version.as_str()),
            ("transport", st.transport.as_str()),
            ("features_offered", offered.as_str()),
            ("features_acked", acked.as_str()),
        ]);
        info.encode(enc.encode_descriptor(
            "vhost_card",
            "The daemon's version, its transport (vhost-user or vduse) and the virtio features \
             offered and acked (empty while no frontend has acked).",
            None,
            info.metric_type(),
        )?)?;
        counter(
            &mut enc,
            "vhost_card_guest_memory_faults",
            "Guest memory pages the frontend truncated under the daemon, replaced by zero pages.",
            snap.guest_memory_faults,
        )
    }
}

/// The conventional `process_*` metrics.
#[derive(Debug)]
struct ProcessCollector(ProcSelf);

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = match self.0.sample() {
            Ok(s) => s,
            Err(e) => {
                debug!("process metrics: {e}");
                return Ok(());
            }
        };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(enc.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            cpu.metric_type(),
        )?)?;
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                int(s.resident_bytes),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                int(s.virtual_bytes),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                int(s.open_fds),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                int(s.max_fds),
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                int(s.threads),
            ),
        ];
        for (name, help, v) in gauges {
            gauge(&mut enc, name, help, v)?;
        }
        gauge(
            &mut enc,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            s.start_time,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{add, DeviceInfo};

    fn exporter() -> (Arc<Stats>, Exporter) {
        let stats = Arc::new(Stats::new(
            2,
            DeviceInfo {
                mtu: 9000,
                offered: crate::features::default_features(),
                transport: crate::stats::VHOST_USER,
            },
        ));
        let e = Exporter::new(stats.clone(), ProcSelf::open().ok());
        (stats, e)
    }

    #[test]
    fn every_series_is_there_from_the_start() {
        let (_, e) = exporter();
        let (text, ct) = e.render("").unwrap();
        assert_eq!(ct, PROMETHEUS_TEXT);
        for q in ["0", "1"] {
            for c in COUNTERS {
                let mut labels = format!("queue=\"{q}\"");
                for (k, v) in c.labels {
                    labels.push_str(&format!(",{k}=\"{v}\""));
                }
                let line = format!("{PREFIX}{}_total{{{labels}}} 0", c.family);
                assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
            }
        }
        for reason in ["bad_chain", "short_header", "runt", "oversize", "tap_error"] {
            assert!(text.contains(&format!(
                "vhost_card_dropped_frames_total{{queue=\"1\",direction=\"tx\",reason=\"{reason}\"}} 0"
            )));
        }
        assert!(text.contains("# TYPE vhost_card_dropped_frames_total counter"));
        assert!(text.contains("vhost_card_frontend_connected 0\n"));
        assert!(text.contains("vhost_card_mtu_bytes 9000\n"));
        assert!(text.contains("vhost_card_queue_pairs 2\n"));
        assert!(text.contains("vhost_card_queue_in_use{queue=\"1\"} 0\n"));
        assert!(text.contains("vhost_card_info{version=\""));
        assert!(text.contains("features_acked=\"\"} 1\n"), "{text}");
        for p in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.lines().any(|l| l.starts_with(p)), "no {p} in\n{text}");
        }
    }

    #[test]
    fn values_state_and_openmetrics() {
        let (stats, e) = exporter();
        add(&stats.pairs[1].rx_drop_truncated, 7);
        add(&stats.pairs[0].tx_bytes, 1500);
        stats.set_connected(true);
        stats.set_acked(1 << 32 | 1);
        stats.set_in_use(0, true);
        let (text, ct) = e
            .render("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
            .unwrap();
        assert_eq!(ct, OPENMETRICS_TEXT);
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("# TYPE vhost_card_dropped_frames counter"));
        assert!(text.contains(
            "vhost_card_dropped_frames_total{queue=\"1\",direction=\"rx\",reason=\"truncated\"} 7"
        ));
        assert!(text.contains("vhost_card_bytes_total{queue=\"0\",direction=\"tx\"} 1500"));
        assert!(text.contains("vhost_card_frontend_connected 1\n"));
        assert!(text.contains("vhost_card_queue_pairs_in_use 1\n"));
        assert!(text.contains("vhost_card_frontend_sessions_total 1\n"));
        assert!(
            text.contains("features_acked=\"csum,version-1\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn families_are_described() {
        for (f, _) in FAMILIES {
            assert!(
                COUNTERS.iter().filter(|c| c.family == *f).count() > 1,
                "{f} needs no entry in FAMILIES"
            );
        }
        for (f, help) in families() {
            assert!(!help.trim().is_empty(), "{f}");
            let many = COUNTERS.iter().filter(|c| c.family == f).count() > 1;
            assert!(
                !many || FAMILIES.iter().any(|(g, _)| *g == f),
                "{f} has several counters and needs a description in FAMILIES"
            );
        }
    }
}
