//! The daemon's counters and state: per-queue-pair counters (frames, bytes, every drop by
//! reason), bumped by the worker that owns the pair with one relaxed atomic add, and the device
//! state (frontend connected, features, pairs in use). Whoever reports them (the log line, the
//! control socket's JSON, the Prometheus endpoint in `metrics.rs`) reads them when asked.
//!
//! A counter is one line in [`counters!`]: its flat name (the log line's `name=value`, the
//! JSON key), the Prometheus family it belongs to with its labels, and its description.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One counter: its flat name, where it goes in Prometheus, and what it counts.
#[derive(Debug, Clone, Copy)]
pub struct CounterDef {
    /// Flat name: `tx_frames`, `rx_drop_runt`, ...
    pub name: &'static str,
    /// Prometheus family, without the `vhost_card_` prefix and the `_total` suffix.
    pub family: &'static str,
    /// Labels besides `queue` (the queue pair), e.g. `[("direction", "tx"), ("reason", "runt")]`.
    pub labels: &'static [(&'static str, &'static str)],
    /// What it counts.
    pub help: &'static str,
}

macro_rules! counters {
    ($( $(#[doc = $doc:literal])*
        $name:ident => $family:ident [ $( $k:ident = $v:literal ),* ] ),* $(,)?) => {
        /// Counters of one queue pair. Aligned so two pairs' workers never share a cache line.
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub struct PairStats {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
        }

        impl PairStats {
            /// Every counter with its name, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$( (stringify!($name), self.$name.load(Ordering::Relaxed)), )*]
            }

            /// Adds counts another process had (a live handover), by name; names this binary
            /// does not know are ignored.
            pub fn carry_over(&self, counts: &[(String, u64)]) {
                for (name, v) in counts {
                    match name.as_str() {
                        $( stringify!($name) => {
                            self.$name.fetch_add(*v, Ordering::Relaxed);
                        } )*
                        _ => {}
                    }
                }
            }
        }

        /// Every counter, in declaration order.
        pub const COUNTERS: &[CounterDef] = &[$( CounterDef {
            name: stringify!($name),
            family: stringify!($family),
            labels: &[$( (stringify!($k), $v) ),*],
            help: concat!($($doc),*),
        }, )*];
    };
}

// `direction`: `tx` is the host's transmit queue (host to card), `rx` its receive queue (card
// to host), as virtio names them.
counters! {
    /// Frames from the host written to the tap.
    tx_frames => frames[direction = "tx"],
    /// Bytes of those frames (vnet header excluded).
    tx_bytes => bytes[direction = "tx"],
    /// TX descriptor chains that were malformed (bad address, loop, wrong direction, too long).
    tx_drop_bad_chain => dropped_frames[direction = "tx", reason = "bad_chain"],
    /// TX frames whose vnet header was shorter than negotiated.
    tx_drop_short_header => dropped_frames[direction = "tx", reason = "short_header"],
    /// TX frames with an invalid vnet header field (see `vnet::TxDrop`).
    tx_drop_bad_vnet_hdr => dropped_frames[direction = "tx", reason = "bad_vnet_hdr"],
    /// TX frames shorter than an Ethernet header.
    tx_drop_runt => dropped_frames[direction = "tx", reason = "runt"],
    /// TX frames larger than the MTU (or 64 KiB for GSO) allows.
    tx_drop_oversize => dropped_frames[direction = "tx", reason = "oversize"],
    /// TX frames the tap refused.
    tx_drop_tap_error => dropped_frames[direction = "tx", reason = "tap_error"],
    /// TX frames an IP-only link cannot carry: neither IPv4, IPv6 nor ARP (`--link ip`).
    tx_drop_not_ip => dropped_frames[direction = "tx", reason = "not_ip"],
    /// TX frames too short for the IP header they claim, or whose IP version contradicts their
    /// EtherType (`--link ip`).
    tx_drop_malformed => dropped_frames[direction = "tx", reason = "malformed"],
    /// Times the tap said EAGAIN and TX waited for EPOLLOUT.
    tx_tap_full => tx_tap_full[],
    /// Frames from the card written to the host.
    rx_frames => frames[direction = "rx"],
    /// Bytes of those frames (vnet header excluded).
    rx_bytes => bytes[direction = "rx"],
    /// Host buffers used by those frames (num_buffers summed).
    rx_buffers => rx_buffers[],
    /// RX descriptor chains that were malformed (bad address, loop, wrong direction, too short).
    rx_drop_bad_chain => dropped_frames[direction = "rx", reason = "bad_chain"],
    /// RX frames larger than the buffers the host posted.
    rx_drop_truncated => dropped_frames[direction = "rx", reason = "truncated"],
    /// RX frames with a GSO type the host did not negotiate.
    rx_drop_gso => dropped_frames[direction = "rx", reason = "gso"],
    /// RX frames shorter than an Ethernet header.
    rx_drop_runt => dropped_frames[direction = "rx", reason = "runt"],
    /// RX frames waiting in the bounce buffer for host buffers when the host disconnected.
    rx_drop_disconnect => dropped_frames[direction = "rx", reason = "disconnect"],
    /// Packets from the card's kernel of a protocol an IP-only link cannot carry (neither IPv4
    /// nor IPv6), or too short for one (`--link ip`).
    rx_drop_not_ip => dropped_frames[direction = "rx", reason = "not_ip"],
    /// Frames the card made for the host (replies, reassembled datagrams) with no room left in
    /// its queue.
    rx_drop_local_full => dropped_frames[direction = "rx", reason = "local_full"],
    /// IP fragments from the card's kernel taken into the reassembly table.
    reasm_fragments => rx_reassembly[event = "fragment"],
    /// Datagrams reassembled from those fragments and handed up whole.
    reasm_datagrams => rx_reassembly[event = "datagram"],
    /// Reassembled datagrams larger than the host's MTU, handed up cut to it.
    reasm_split => rx_reassembly[event = "split"],
    /// Exact duplicate fragments dropped (their datagram kept).
    reasm_duplicate => rx_reassembly[event = "duplicate"],
    /// Datagrams discarded because fragments overlapped (RFC 5722, and the same for IPv4).
    reasm_overlap => rx_reassembly[event = "overlap"],
    /// Datagrams discarded for bad fragments (lengths, offsets, size, count, ECN).
    reasm_malformed => rx_reassembly[event = "malformed"],
    /// Datagrams still incomplete after 30 s (IPv4) or 60 s (IPv6), discarded.
    reasm_timeout => rx_reassembly[event = "timeout"],
    /// Incomplete datagrams discarded to make room in a full table.
    reasm_evicted => rx_reassembly[event = "evicted"],
    /// ARP requests from the host the card answered (`--link ip`).
    arp_replies => neighbour_replies[protocol = "arp"],
    /// Neighbour solicitations from the host the card answered (`--link ip`).
    nd_replies => neighbour_replies[protocol = "nd"],
    /// ARP packets from the host that were malformed (not Ethernet/IPv4, bad lengths or
    /// opcode, a multicast sender), counted and not answered.
    arp_ignored_malformed => neighbour_ignored[protocol = "arp", reason = "malformed"],
    /// ARP requests for an address that cannot be behind the link (the host's own, unspecified,
    /// broadcast, multicast, loopback), not answered.
    arp_ignored_not_behind => neighbour_ignored[protocol = "arp", reason = "not_behind"],
    /// Gratuitous ARP, ARP probes and unsolicited ARP replies from the host, not answered.
    arp_ignored_gratuitous => neighbour_ignored[protocol = "arp", reason = "gratuitous"],
    /// Neighbour solicitations failing RFC 4861's checks (hop limit, checksum, code, length,
    /// options, multicast target), not answered.
    nd_ignored_malformed => neighbour_ignored[protocol = "nd", reason = "malformed"],
    /// Neighbour solicitations for an address that cannot be behind the link, not answered.
    nd_ignored_not_behind => neighbour_ignored[protocol = "nd", reason = "not_behind"],
    /// Duplicate address detection probes from the host (source ::), not answered.
    nd_ignored_dad => neighbour_ignored[protocol = "nd", reason = "dad"],
    /// RX reads that failed with an error other than EAGAIN.
    rx_tap_error => rx_tap_errors[],
    /// Times RX stopped reading the tap because the host had no buffers.
    rx_no_buffers => rx_no_buffers[],
    /// RX frames read through the bounce buffer because the host had few buffers posted.
    rx_bounced => rx_bounced_frames[],
    /// RX frames held in the bounce buffer until the host posted enough buffers.
    rx_held => rx_held_frames[],
    /// RX frames whose checksums the card verified and marked DATA_VALID.
    rx_csum_verified => rx_checksums[result = "verified"],
    /// RX frames with a bad checksum, passed up unmarked.
    rx_csum_bad => rx_checksums[result = "bad"],
    /// RX frames with a partial checksum the card completed for a host without GUEST_CSUM.
    rx_csum_completed => rx_checksums[result = "completed"],
    /// RX frames handed up marked DATA_VALID (verified or completed here, or vouched for by the
    /// card's kernel). Every frame handed up counts once in exactly one of `rx_data_valid`,
    /// `rx_needs_csum` and the `rx_unmarked_*` counters, which add up to `rx_frames`.
    rx_data_valid => rx_data_valid_frames[],
    /// RX frames handed up with NEEDS_CSUM: a partial checksum left for the host (every GSO
    /// frame; with `--rx-csum verify` also the card's kernel's partial checksums).
    rx_needs_csum => rx_needs_csum_frames[],
    /// RX frames handed up unmarked because they are IP fragments (not reassembled).
    rx_unmarked_fragment => rx_unmarked_frames[reason = "fragment"],
    /// RX frames handed up unmarked because they are not IP (ARP, other EtherTypes).
    rx_unmarked_not_ip => rx_unmarked_frames[reason = "not_ip"],
    /// RX frames handed up unmarked because their L4 protocol has no checksum the card knows
    /// (ESP, GRE, SCTP, ...).
    rx_unmarked_no_l4_csum => rx_unmarked_frames[reason = "no_l4_csum"],
    /// RX frames handed up unmarked because their IP or L4 header does not parse.
    rx_unmarked_malformed => rx_unmarked_frames[reason = "malformed"],
    /// RX frames handed up unmarked because a checksum is wrong (the host drops them).
    rx_unmarked_bad_csum => rx_unmarked_frames[reason = "bad_csum"],
    /// RX frames handed up unmarked, unchecked, because of `--rx-csum passthrough`.
    rx_unmarked_passthrough => rx_unmarked_frames[reason = "passthrough"],
    /// RX frames handed up unmarked because the host did not negotiate GUEST_CSUM (the spec
    /// then forbids every flag; partial checksums were completed by the card).
    rx_unmarked_no_guest_csum => rx_unmarked_frames[reason = "no_guest_csum"],
    /// Kicks from the guest on the RX queue (buffers posted).
    rx_kicks => kicks[direction = "rx"],
    /// Kicks from the guest on the TX queue (frames to send).
    tx_kicks => kicks[direction = "tx"],
    /// Guest notifications sent (used-ring interrupts), both queues.
    notifications => notifications[],
    /// Guest notifications skipped because the frontend's call descriptor could not take a write
    /// without blocking (a full pipe, an eventfd at its limit, a pipe nobody reads).
    notifications_blocked => notifications_blocked[],
    /// Times the TX ring's available index ran more than a ring ahead (queue ignored until reset).
    tx_ring_broken => ring_broken[direction = "tx"],
    /// Times the RX ring's available index ran more than a ring ahead (queue ignored until reset).
    rx_ring_broken => ring_broken[direction = "rx"],
    /// RARP announcements written to the tap for the frontend (`VHOST_USER_SEND_RARP`, after a
    /// live migration).
    rarp_sent => rarp_announcements[],
}

/// Every counter's name with its description.
pub const HELP: &[(&str, &str)] = &{
    let mut out = [("", ""); COUNTERS.len()];
    let mut i = 0;
    while i < COUNTERS.len() {
        out[i] = (COUNTERS[i].name, COUNTERS[i].help);
        i += 1;
    }
    out
};

/// What the daemon serves, fixed at start-up.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// MTU offered to the host (VIRTIO_NET_F_MTU).
    pub mtu: u16,
    /// The virtio feature word offered.
    pub offered: u64,
    /// How the host reaches the device: [`VHOST_USER`] or [`VDUSE`].
    pub transport: &'static str,
}

/// [`DeviceInfo::transport`] of a vhost-user backend: the frontend is the VMM on the socket.
pub const VHOST_USER: &str = "vhost-user";
/// [`DeviceInfo::transport`] of a VDUSE device: the frontend is the kernel's own driver, and a
/// session lasts from the driver's DRIVER_OK to its reset.
pub const VDUSE: &str = "vduse";

/// The device's state: fixed facts and what the current frontend did.
#[derive(Debug)]
struct Device {
    info: DeviceInfo,
    started: Instant,
    started_unix: f64,
    connected: AtomicBool,
    sessions: AtomicU64,
    /// The feature word the current frontend acked; 0 before SET_FEATURES.
    acked: AtomicU64,
}

/// Counters of every queue pair and the device's state.
#[derive(Debug)]
pub struct Stats {
    pub pairs: Vec<PairStats>,
    in_use: Vec<AtomicBool>,
    device: Device,
}

impl Stats {
    pub fn new(pairs: usize, info: DeviceInfo) -> Self {
        Stats {
            pairs: (0..pairs).map(|_| PairStats::default()).collect(),
            in_use: (0..pairs).map(|_| AtomicBool::new(false)).collect(),
            device: Device {
                info,
                started: Instant::now(),
                started_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
                connected: AtomicBool::new(false),
                sessions: AtomicU64::new(0),
                acked: AtomicU64::new(0),
            },
        }
    }

    /// A frontend connected (`true`) or its session ended (`false`: acked features and pairs
    /// in use are forgotten). Over VDUSE a session is the driver's: from DRIVER_OK to a reset.
    pub fn set_connected(&self, connected: bool) {
        if connected {
            self.device.sessions.fetch_add(1, Ordering::Relaxed);
        } else {
            self.device.acked.store(0, Ordering::Relaxed);
            for p in &self.in_use {
                p.store(false, Ordering::Relaxed);
            }
        }
        self.device.connected.store(connected, Ordering::Release);
    }

    /// A session handed over from another process is connected here: not a new session (its
    /// count came with [`Stats::carry_over`]).
    pub fn set_resumed(&self) {
        self.device.connected.store(true, Ordering::Release);
    }

    /// The frontend acked this feature word.
    pub fn set_acked(&self, word: u64) {
        self.device.acked.store(word, Ordering::Relaxed);
    }

    /// Whether the frontend uses queue pair `pair` (RX ring started and enabled).
    pub fn set_in_use(&self, pair: usize, in_use: bool) {
        if let Some(p) = self.in_use.get(pair) {
            p.store(in_use, Ordering::Relaxed);
        }
    }

    /// When the daemon started, in seconds since the Unix epoch.
    pub fn started_unix(&self) -> f64 {
        self.device.started_unix
    }

    /// One line per queue pair with the non-zero counters (the daemon's `stats pair N: ...`
    /// log lines).
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

    /// Continues the counters of the process a session was handed over from: its per-pair
    /// counters and its session count are added to this one's.
    pub fn carry_over(&self, from: &Snapshot) {
        for (p, theirs) in self.pairs.iter().zip(&from.pairs) {
            p.carry_over(&theirs.counters.0);
        }
        self.device
            .sessions
            .fetch_add(from.state.sessions, Ordering::Relaxed);
    }

    /// Everything, as `vhost-card stats` and the control socket show it.
    pub fn snapshot(&self) -> Snapshot {
        let d = &self.device;
        // `connected` first, with Acquire: a session's end clears the acked features and the
        // pairs in use before it clears `connected` (Release, `set_connected`), so a snapshot
        // that says "not connected" never shows the ended session's pairs or features.
        let connected = d.connected.load(Ordering::Acquire);
        let acked = d.acked.load(Ordering::Relaxed);
        let pairs: Vec<PairSnapshot> = self
            .pairs
            .iter()
            .zip(&self.in_use)
            .enumerate()
            .map(|(i, (p, in_use))| PairSnapshot {
                pair: i,
                in_use: in_use.load(Ordering::Relaxed),
                counters: Counters(
                    p.snapshot()
                        .into_iter()
                        .map(|(n, v)| (n.to_string(), v))
                        .collect(),
                ),
            })
            .collect();
        Snapshot {
            schema: SCHEMA_VERSION,
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_seconds: d.started.elapsed().as_secs(),
            state: State {
                transport: d.info.transport.to_string(),
                connected,
                sessions: d.sessions.load(Ordering::Relaxed),
                mtu: d.info.mtu,
                queue_pairs: self.pairs.len(),
                pairs_in_use: pairs.iter().filter(|p| p.in_use).count(),
                features: FeatureState {
                    offered: Features::of(d.info.offered),
                    acked: (acked != 0).then(|| Features::of(acked)),
                },
            },
            pairs,
            guest_memory_faults: crate::memguard::faults(),
        }
    }
}

/// Version of the JSON schema below; bumped only when a field changes meaning or goes away
/// (new fields and new counters keep it).
pub const SCHEMA_VERSION: u32 = 1;

/// What `vhost-card stats --json` prints and the control socket serves: one JSON object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`SCHEMA_VERSION`].
    pub schema: u32,
    /// The daemon's version.
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub state: State,
    /// One entry per queue pair, in order.
    pub pairs: Vec<PairSnapshot>,
    /// Guest pages lost to a frontend that shrank a memory file (device-wide).
    pub guest_memory_faults: u64,
}

/// The device as the current frontend set it up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// `vhost-user` or `vduse` (absent from daemons before VDUSE: vhost-user).
    #[serde(default = "vhost_user")]
    pub transport: String,
    /// A frontend is connected: a VMM to the vhost-user socket, or over VDUSE the kernel's
    /// driver has the device running (DRIVER_OK).
    pub connected: bool,
    /// Frontend sessions since the daemon started (VDUSE: driver starts).
    pub sessions: u64,
    /// MTU offered to the host.
    pub mtu: u16,
    /// Queue pairs the device has.
    pub queue_pairs: usize,
    /// Queue pairs the frontend uses (RX ring started and enabled).
    pub pairs_in_use: usize,
    pub features: FeatureState,
}

fn vhost_user() -> String {
    VHOST_USER.to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeatureState {
    pub offered: Features,
    /// `null` until the frontend acks (SET_FEATURES).
    pub acked: Option<Features>,
}

/// A virtio feature word, as a hex string and by name (`vhost-card features`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Features {
    /// `0x...`
    pub bits: String,
    pub names: Vec<String>,
}

impl Features {
    fn of(word: u64) -> Self {
        Features {
            bits: format!("{word:#x}"),
            names: crate::features::names(word)
                .into_iter()
                .map(String::from)
                .collect(),
        }
    }
}

/// One queue pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairSnapshot {
    pub pair: usize,
    /// The frontend uses this pair.
    pub in_use: bool,
    /// Every counter of [`COUNTERS`] by its flat name, in that order.
    pub counters: Counters,
}

/// Counters by name, kept in the daemon's order (a JSON object).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters(pub Vec<(String, u64)>);

impl Counters {
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

impl Serialize for Counters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Counters {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Counters;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of counter names to numbers")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Counters, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = a.next_entry::<String, u64>()? {
                    v.push(e);
                }
                Ok(Counters(v))
            }
        }
        d.deserialize_map(V)
    }
}

impl Snapshot {
    /// Reads the JSON the control socket serves (and `vhost-card stats --json` prints).
    pub fn parse(text: &str) -> std::io::Result<Snapshot> {
        serde_json::from_str(text).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a vhost-card snapshot ({e})"),
            )
        })
    }

    /// Counter `name` summed over the queue pairs (0 for a name the daemon does not have).
    pub fn total(&self, name: &str) -> u64 {
        self.pairs.iter().filter_map(|p| p.counters.get(name)).sum()
    }

    /// The table `vhost-card stats` prints: the state, then one row per counter and one
    /// column per queue pair.
    pub fn table(&self) -> String {
        let st = &self.state;
        let mut s = String::new();
        let row = |s: &mut String, k: &str, v: &str| {
            let _ = writeln!(s, "{k:<20} {v}");
        };
        row(
            &mut s,
            "daemon",
            &format!(
                "vhost-card {} (pid {}), up {}",
                self.version,
                self.pid,
                duration(self.uptime_seconds)
            ),
        );
        let vduse = st.transport == VDUSE;
        row(
            &mut s,
            "frontend",
            &format!(
                "{} ({} session{} so far){}",
                match (st.connected, vduse) {
                    (true, false) => "connected",
                    (false, false) => "not connected",
                    (true, true) => "driver running",
                    (false, true) => "no driver running",
                },
                st.sessions,
                if st.sessions == 1 { "" } else { "s" },
                if vduse {
                    "; VDUSE: this host's kernel drives the device"
                } else {
                    ""
                }
            ),
        );
        row(&mut s, "mtu", &st.mtu.to_string());
        let in_use: Vec<String> = self
            .pairs
            .iter()
            .filter(|p| p.in_use)
            .map(|p| p.pair.to_string())
            .collect();
        row(
            &mut s,
            "queue pairs",
            &format!(
                "{} in use of {}{}",
                st.pairs_in_use,
                st.queue_pairs,
                if in_use.is_empty() {
                    String::new()
                } else {
                    format!(" (pair {})", in_use.join(", "))
                }
            ),
        );
        let offered = &st.features.offered;
        row(
            &mut s,
            "features offered",
            &format!("{} {}", offered.bits, offered.names.join(" ")),
        );
        row(
            &mut s,
            "features acked",
            &match &st.features.acked {
                Some(a) => format!("{} {}", a.bits, a.names.join(" ")),
                None => "none yet".to_string(),
            },
        );
        row(
            &mut s,
            "guest memory faults",
            &self.guest_memory_faults.to_string(),
        );
        s.push('\n');
        // Counter rows in the daemon's order; a name only some pairs have still gets a row.
        let mut names: Vec<&str> = Vec::new();
        for p in &self.pairs {
            for (n, _) in &p.counters.0 {
                if !names.contains(&n.as_str()) {
                    names.push(n);
                }
            }
        }
        let width = names.iter().map(|n| n.len()).max().unwrap_or(0).max(7);
        let cols: Vec<String> = self
            .pairs
            .iter()
            .map(|p| format!("pair {}", p.pair))
            .collect();
        let col_w: Vec<usize> = self
            .pairs
            .iter()
            .zip(&cols)
            .map(|(p, c)| {
                p.counters
                    .0
                    .iter()
                    .map(|(_, v)| v.to_string().len())
                    .max()
                    .unwrap_or(1)
                    .max(c.len())
            })
            .collect();
        let _ = write!(s, "{:<width$}", "COUNTER");
        for (c, w) in cols.iter().zip(&col_w) {
            let _ = write!(s, "  {c:>w$}");
        }
        s.push('\n');
        for n in names {
            let _ = write!(s, "{n:<width$}");
            for (p, w) in self.pairs.iter().zip(&col_w) {
                let v = p.counters.get(n).map_or("-".to_string(), |v| v.to_string());
                let _ = write!(s, "  {v:>w$}");
            }
            s.push('\n');
        }
        s
    }
}

/// `1d 2h 3m 4s`, leading zero units left out.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    for (v, unit) in [(d, "d"), (h, "h"), (m, "m")] {
        if v != 0 || !out.is_empty() {
            let _ = write!(out, "{v}{unit} ");
        }
    }
    let _ = write!(out, "{s}s");
    out
}

/// Adds `n` to a counter.
#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(pairs: usize) -> Stats {
        Stats::new(
            pairs,
            DeviceInfo {
                mtu: 65520,
                offered: crate::features::default_features(),
                transport: VHOST_USER,
            },
        )
    }

    #[test]
    fn report_lists_nonzero_counters() {
        let s = stats(2);
        add(&s.pairs[1].rx_frames, 3);
        let r = s.report();
        assert!(r.contains("pair 0: idle"));
        assert!(r.contains("pair 1: rx_frames=3"));
    }

    #[test]
    fn every_counter_is_described_and_placed() {
        assert_eq!(COUNTERS.len(), PairStats::default().snapshot().len());
        for c in COUNTERS {
            assert!(!c.help.trim().is_empty(), "{} has no description", c.name);
            // Counters of one family carry the same label names, so every series of the
            // family has the same shape.
            for o in COUNTERS.iter().filter(|o| o.family == c.family) {
                let keys = |d: &CounterDef| d.labels.iter().map(|(k, _)| *k).collect::<Vec<_>>();
                assert_eq!(keys(c), keys(o), "{} and {} differ", c.name, o.name);
                assert!(
                    o.name == c.name || o.labels != c.labels,
                    "{} and {} are the same series",
                    c.name,
                    o.name
                );
            }
        }
        assert_eq!(HELP.len(), COUNTERS.len());
        assert_eq!(HELP[0], ("tx_frames", COUNTERS[0].help));
    }

    #[test]
    fn snapshot_carries_state_and_every_counter() {
        let s = stats(2);
        add(&s.pairs[0].tx_bytes, 1500);
        let j = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(j["schema"], SCHEMA_VERSION);
        assert_eq!(j["state"]["connected"], false);
        assert_eq!(j["state"]["features"]["acked"], serde_json::Value::Null);
        assert_eq!(j["pairs"][0]["counters"]["tx_bytes"], 1500);
        assert_eq!(j["pairs"][1]["pair"], 1);
        assert_eq!(
            j["pairs"][1]["counters"].as_object().unwrap().len(),
            COUNTERS.len()
        );

        s.set_connected(true);
        s.set_acked(1 << 32 | 1);
        s.set_in_use(1, true);
        let snap = s.snapshot();
        assert!(snap.state.connected);
        assert_eq!(snap.state.sessions, 1);
        assert_eq!(snap.state.pairs_in_use, 1);
        assert!(snap.pairs[1].in_use && !snap.pairs[0].in_use);
        let acked = snap.state.features.acked.as_ref().unwrap();
        assert_eq!(acked.bits, "0x100000001");
        assert!(acked.names.iter().any(|n| n == "csum"), "{acked:?}");

        // The JSON reads back into the same thing, counters in the daemon's order.
        let text = serde_json::to_string(&snap).unwrap();
        let back: Snapshot = serde_json::from_str(&text).unwrap();
        assert_eq!(back.pairs[0].counters, snap.pairs[0].counters);
        assert_eq!(back.pairs[0].counters.0[0].0, "tx_frames");

        s.set_connected(false);
        let snap = s.snapshot();
        assert!(!snap.state.connected && snap.state.features.acked.is_none());
        assert_eq!(snap.state.pairs_in_use, 0);
    }

    #[test]
    fn table_shows_state_and_counters_by_pair() {
        let s = stats(2);
        s.set_connected(true);
        add(&s.pairs[1].rx_frames, 12345);
        let t = s.snapshot().table();
        assert!(
            t.contains("frontend             connected (1 session so far)"),
            "{t}"
        );
        assert!(t.contains("queue pairs          0 in use of 2"), "{t}");
        let row = t.lines().find(|l| l.starts_with("rx_frames ")).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["rx_frames", "0", "12345"]);
        assert!(t
            .lines()
            .any(|l| l.starts_with("COUNTER") && l.ends_with("pair 1")));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(3605), "1h 0m 5s");
        assert_eq!(duration(90061), "1d 1h 1m 1s");
    }

    /// A handover carries the counters over: the new process's start where the old one's ended.
    #[test]
    fn counters_carry_over_a_handover() {
        let info = || DeviceInfo {
            mtu: 1500,
            offered: 0,
            transport: VHOST_USER,
        };
        let old = Stats::new(2, info());
        add(&old.pairs[0].tx_frames, 5);
        add(&old.pairs[1].rx_drop_runt, 2);
        old.set_connected(true);
        let mut snap = old.snapshot();
        snap.pairs[0]
            .counters
            .0
            .push(("a_counter_of_a_newer_binary".into(), 9));
        let new = Stats::new(2, info());
        add(&new.pairs[0].tx_frames, 1);
        new.carry_over(&snap);
        let now = new.snapshot();
        assert_eq!(now.pairs[0].counters.get("tx_frames"), Some(6));
        assert_eq!(now.pairs[1].counters.get("rx_drop_runt"), Some(2));
        assert_eq!(now.state.sessions, 1);
    }
}
