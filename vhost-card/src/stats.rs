//! Per-queue-pair counters: frames, bytes and every drop by reason. Lock-free, shared between the
//! worker that bumps them and whoever reports them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $name:ident ),* $(,)?) => {
        /// Counters of one queue pair.
        #[derive(Debug, Default)]
        pub struct PairStats {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
        }

        impl PairStats {
            /// Every counter with its name, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$( (stringify!($name), self.$name.load(Ordering::Relaxed)), )*]
            }
        }

        /// Every counter's name with its description.
        pub const HELP: &[(&str, &str)] = &[$( (stringify!($name), concat!($($doc),*)), )*];
    };
}

counters! {
    /// Frames from the host written to the tap.
    tx_frames,
    /// Bytes of those frames (vnet header excluded).
    tx_bytes,
    /// TX descriptor chains that were malformed (bad address, loop, wrong direction, too long).
    tx_drop_bad_chain,
    /// TX frames whose vnet header was shorter than negotiated.
    tx_drop_short_header,
    /// TX frames with an invalid vnet header field (see `vnet::TxDrop`).
    tx_drop_bad_vnet_hdr,
    /// TX frames shorter than an Ethernet header.
    tx_drop_runt,
    /// TX frames larger than the MTU (or 64 KiB for GSO) allows.
    tx_drop_oversize,
    /// TX frames the tap refused.
    tx_drop_tap_error,
    /// Times the tap said EAGAIN and TX waited for EPOLLOUT.
    tx_tap_full,
    /// Frames from the card written to the host.
    rx_frames,
    /// Bytes of those frames (vnet header excluded).
    rx_bytes,
    /// Host buffers used by those frames (num_buffers summed).
    rx_buffers,
    /// RX descriptor chains that were malformed (bad address, loop, wrong direction, too short).
    rx_drop_bad_chain,
    /// RX frames larger than the buffers the host posted.
    rx_drop_truncated,
    /// RX frames with a GSO type the host did not negotiate.
    rx_drop_gso,
    /// RX frames shorter than an Ethernet header.
    rx_drop_runt,
    /// RX frames waiting in the bounce buffer for host buffers when the host disconnected.
    rx_drop_disconnect,
    /// RX reads that failed with an error other than EAGAIN.
    rx_tap_error,
    /// Times RX stopped reading the tap because the host had no buffers.
    rx_no_buffers,
    /// RX frames read through the bounce buffer because the host had few buffers posted.
    rx_bounced,
    /// RX frames held in the bounce buffer until the host posted enough buffers.
    rx_held,
    /// RX frames whose checksums the card verified and marked DATA_VALID.
    rx_csum_verified,
    /// RX frames with a bad checksum, passed up unmarked.
    rx_csum_bad,
    /// RX frames with a partial checksum the card completed for a host without GUEST_CSUM.
    rx_csum_completed,
    /// RX frames handed up marked DATA_VALID (verified here or by the card's kernel).
    rx_data_valid,
    /// Kicks from the guest on the RX queue (buffers posted).
    rx_kicks,
    /// Kicks from the guest on the TX queue (frames to send).
    tx_kicks,
    /// Guest notifications sent (used-ring interrupts), both queues.
    notifications,
    /// Guest notifications skipped because the frontend's call descriptor could not take a write
    /// without blocking (a full pipe, an eventfd at its limit, a pipe nobody reads).
    notifications_blocked,
    /// Times the TX ring's available index ran more than a ring ahead (queue ignored until reset).
    tx_ring_broken,
    /// Times the RX ring's available index ran more than a ring ahead (queue ignored until reset).
    rx_ring_broken,
    /// RARP announcements written to the tap for the frontend (`VHOST_USER_SEND_RARP`, after a
    /// live migration).
    rarp_sent,
}

/// Counters of every queue pair.
#[derive(Debug)]
pub struct Stats {
    pub pairs: Vec<PairStats>,
}

impl Stats {
    pub fn new(pairs: usize) -> Self {
        Stats {
            pairs: (0..pairs).map(|_| PairStats::default()).collect(),
        }
    }

    /// One line per queue pair with the non-zero counters.
    pub fn report(&self) -> String {
        let mut s = String::new();
        for (i, p) in self.pairs.iter().enumerate() {
            let _ = write!(s, "pair {i}:");
            let mut any = false;
            for (name, v) in p.snapshot() {
                if v != 0 {
                    let _ = write!(s, " {name}={v}");
                    any = true;
                }
            }
            if !any {
                s.push_str(" idle");
            }
            s.push('\n');
        }
        let faults = crate::memguard::faults();
        if faults != 0 {
            let _ = writeln!(s, "device: guest_memory_faults={faults}");
        }
        let (marks, misses) = crate::dirtylog::LOG.counts();
        if marks + misses != 0 {
            let _ = writeln!(
                s,
                "device: dirty_log_marks={marks} dirty_log_misses={misses}"
            );
        }
        s
    }
}

impl Stats {
    /// The counters as JSON: `{"pairs": [{"pair": 0, "tx_frames": 1, ...}, ...]}`.
    pub fn to_json(&self) -> serde_json::Value {
        let pairs: Vec<serde_json::Value> = self
            .pairs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut m = serde_json::Map::new();
                m.insert("pair".into(), i.into());
                for (name, v) in p.snapshot() {
                    m.insert(name.into(), v.into());
                }
                serde_json::Value::Object(m)
            })
            .collect();
        serde_json::json!({
            "pairs": pairs,
            "guest_memory_faults": crate::memguard::faults(),
        })
    }

    /// The counters in the Prometheus text exposition format (version 0.0.4).
    pub fn to_prometheus(&self) -> String {
        let snaps: Vec<Vec<(&'static str, u64)>> =
            self.pairs.iter().map(PairStats::snapshot).collect();
        let mut s = String::new();
        for (k, (name, help)) in HELP.iter().enumerate() {
            let help = help.trim();
            let _ = writeln!(s, "# HELP vhost_card_{name}_total {help}");
            let _ = writeln!(s, "# TYPE vhost_card_{name}_total counter");
            for (i, snap) in snaps.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "vhost_card_{name}_total{{queue_pair=\"{i}\"}} {}",
                    snap[k].1
                );
            }
        }
        let _ = writeln!(
            s,
            "# HELP vhost_card_{GUEST_MEMORY_FAULTS}_total {FAULTS_HELP}"
        );
        let _ = writeln!(s, "# TYPE vhost_card_{GUEST_MEMORY_FAULTS}_total counter");
        let _ = writeln!(
            s,
            "vhost_card_{GUEST_MEMORY_FAULTS}_total {}",
            crate::memguard::faults()
        );
        s
    }
}

/// The device-wide counter of guest pages lost to a frontend that shrank a memory file.
pub const GUEST_MEMORY_FAULTS: &str = "guest_memory_faults";
const FAULTS_HELP: &str = "Guest memory pages the frontend truncated under the daemon, replaced by zero pages (see memguard).";

/// Adds `n` to a counter.
#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lists_nonzero_counters() {
        let s = Stats::new(2);
        add(&s.pairs[1].rx_frames, 3);
        let r = s.report();
        assert!(r.contains("pair 0: idle"));
        assert!(r.contains("pair 1: rx_frames=3"));
    }

    #[test]
    fn json_and_prometheus_carry_every_counter() {
        let s = Stats::new(2);
        add(&s.pairs[0].tx_bytes, 1500);
        let j = s.to_json();
        assert_eq!(j["pairs"][0]["tx_bytes"], 1500);
        assert_eq!(j["pairs"][1]["pair"], 1);
        let p = s.to_prometheus();
        assert!(p.contains("# TYPE vhost_card_tx_bytes_total counter"));
        assert!(p.contains("vhost_card_tx_bytes_total{queue_pair=\"0\"} 1500"));
        assert!(p.contains("vhost_card_rx_frames_total{queue_pair=\"1\"} 0"));
        for (name, help) in HELP {
            assert!(!help.trim().is_empty(), "{name} has no description");
        }
    }
}
