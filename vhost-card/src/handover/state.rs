//! The session state one vhost-card process hands to the next: what the frontend negotiated,
//! the memory table, each ring, and which descriptor is which. Serialised as JSON next to the
//! descriptors themselves (see `wire`), and checked field by field before anything is used: the
//! blob comes from another process and is untrusted like any frontend message.
//!
//! Descriptors are not in the blob: it names them by their position in the list that travels
//! with it (`fds`), and says what kind each one must be. Every position is used exactly once.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::features::VHOST_USER_F_PROTOCOL_FEATURES;
use crate::gate::{parse_mem_table, MemRegion, MAX_MEM_REGIONS};
use crate::stats::Snapshot;

/// Identifies a handover blob among other JSON.
pub const MAGIC: &str = "vhost-card-handover";

/// The state version this binary writes and the only one it reads. Any change to the meaning of
/// a field, or a new field a reader must not ignore, takes a new number; a reader refuses every
/// version it does not know (the old process then keeps serving).
pub const VERSION: u32 = 1;

/// Largest blob a reader accepts (a full blob with 16 queue pairs is under 16 KiB).
pub const MAX_BLOB: usize = 1 << 20;

/// Largest number of descriptors one handover carries (the kernel's SCM_MAX_FD).
pub const MAX_FDS: usize = 253;

/// Most queue pairs a card has (the `--queues` limit).
pub const MAX_PAIRS: u16 = 16;

/// What kind of descriptor sits at one position of the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FdKind {
    /// A listening Unix stream socket (the vhost-user socket or the control socket).
    UnixListener,
    /// A connected Unix stream socket (the frontend's connection).
    UnixStream,
    /// A listening TCP socket (the metrics endpoint).
    TcpListener,
    /// An eventfd (a ring's kick, call or err descriptor).
    EventFd,
    /// A file that can be mapped: one guest memory region.
    GuestMemory,
    /// A queue of the card's tap (`/dev/net/tun` attached to the tap).
    TapQueue,
}

/// The card the state belongs to; a new process serves the same card or refuses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    pub tap: String,
    pub pairs: u16,
    pub queue_size: u16,
    pub mtu: u16,
    /// The virtio feature word offered (without the vhost-user protocol bit).
    pub features: u64,
}

/// Where the daemon's sockets are in the descriptor list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sockets {
    /// The vhost-user listening socket.
    pub listener: usize,
    /// The frontend's connection, if one is being served.
    pub frontend: Option<usize>,
    pub control: Option<usize>,
    pub metrics: Option<usize>,
}

/// One SET_MEM_TABLE region and its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionState {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    pub mmap_offset: u64,
    pub fd: usize,
}

impl RegionState {
    pub fn region(&self) -> MemRegion {
        MemRegion {
            guest_phys_addr: self.guest_phys_addr,
            memory_size: self.memory_size,
            userspace_addr: self.userspace_addr,
            mmap_offset: self.mmap_offset,
        }
    }
}

/// A SET_VRING_ADDR request: the frontend's virtual addresses of the three ring parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingAddr {
    pub flags: u32,
    pub desc: u64,
    pub used: u64,
    pub avail: u64,
    pub log: u64,
}

/// One virtqueue as the frontend set it up and as the old process left it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingState {
    /// SET_VRING_NUM.
    pub num: Option<u16>,
    pub addr: Option<RingAddr>,
    /// The next available index: what SET_VRING_BASE set, or, for a ring that ran, what
    /// GET_VRING_BASE returned when the old process stopped it. The used index is not carried:
    /// the ring's used index in guest memory is the truth (nothing is in flight at the stop point),
    /// and SET_VRING_ADDR reads it from there.
    pub base: u16,
    /// Given a kick and not stopped by the frontend since.
    pub started: bool,
    pub enabled: bool,
    pub kick: Option<usize>,
    pub call: Option<usize>,
    pub err: Option<usize>,
}

/// What the frontend negotiated and set up, as the gate saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolState {
    pub owner: bool,
    /// SET_FEATURES; `None` before the first one.
    pub features: Option<u64>,
    /// SET_PROTOCOL_FEATURES; `None` before the first one.
    pub protocol_features: Option<u64>,
    /// NET_SET_MTU, as accepted.
    pub mtu: Option<u16>,
    /// SET_VRING_ENABLE requests the gate holds until SET_FEATURES: (ring, enable).
    pub held_enables: Vec<(u32, u32)>,
    pub regions: Vec<RegionState>,
    /// One entry per ring, RX of pair i at 2i, TX at 2i + 1.
    pub rings: Vec<RingState>,
}

/// Everything that moves from the old process to the new one, besides the descriptors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionState {
    pub magic: String,
    pub version: u32,
    /// The old process's version, for the log.
    pub sender: String,
    pub device: DeviceState,
    /// The kind of each descriptor that travels with the blob, in order.
    pub fds: Vec<FdKind>,
    pub sockets: Sockets,
    /// The tap's queues, one per pair, in order.
    pub taps: Vec<usize>,
    /// The old process created the tap (rather than attaching to one that existed), so the tap
    /// goes when the daemon ends, unless `--keep-tap` (`Tap::adopt`).
    pub tap_created: bool,
    /// Absent when no frontend is connected.
    pub session: Option<ProtocolState>,
    /// The pairs with a frame read from the tap and held for the guest's buffers at the stop
    /// point, in order; each frame (vnet header included) follows the state as one message.
    #[serde(default)]
    pub held: Vec<u16>,
    /// The counters, so they continue rather than restart at zero.
    pub counters: Snapshot,
}

/// Why a blob is refused. Each message names the field, so the operator sees what differs.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    #[error("handover state is not valid JSON of the expected shape: {0}")]
    Parse(String),
    #[error("handover state is larger than {MAX_BLOB} bytes")]
    TooBig,
    #[error("not a vhost-card handover state (magic {0:?})")]
    Magic(String),
    #[error("handover state version {found}; this binary reads version {VERSION} only")]
    Version { found: u32 },
    #[error("handover state is for {what} {theirs}, this daemon serves {ours}")]
    Device {
        what: &'static str,
        theirs: String,
        ours: String,
    },
    #[error("handover state: {0}")]
    Invalid(String),
}

fn invalid(why: impl Into<String>) -> StateError {
    StateError::Invalid(why.into())
}

impl SessionState {
    /// Serialises the state.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a blob and checks it on its own (see [`SessionState::check`]); the device is then
    /// checked against the receiving daemon with [`SessionState::check_device`].
    pub fn parse(blob: &[u8]) -> Result<SessionState, StateError> {
        if blob.len() > MAX_BLOB {
            return Err(StateError::TooBig);
        }
        // Magic and version first, on a loose reading, so a blob of another version is refused
        // for its version and not for a field this binary does not know.
        #[derive(Deserialize)]
        struct Head {
            magic: String,
            version: u32,
        }
        let head: Head =
            serde_json::from_slice(blob).map_err(|e| StateError::Parse(e.to_string()))?;
        if head.magic != MAGIC {
            return Err(StateError::Magic(head.magic));
        }
        if head.version != VERSION {
            return Err(StateError::Version {
                found: head.version,
            });
        }
        let state: SessionState =
            serde_json::from_slice(blob).map_err(|e| StateError::Parse(e.to_string()))?;
        state.check()?;
        Ok(state)
    }

    /// Checks that the blob is coherent: every descriptor position used once and with the kind
    /// its use needs, the memory table as the gate checks a SET_MEM_TABLE, rings within the
    /// device's limits and inside the memory table, features within what a card offers.
    pub fn check(&self) -> Result<(), StateError> {
        let d = &self.device;
        crate::tap::check_name(&d.tap).map_err(|e| invalid(format!("tap: {e}")))?;
        if d.pairs == 0 || d.pairs > MAX_PAIRS {
            return Err(invalid(format!("{} queue pairs", d.pairs)));
        }
        if !d.queue_size.is_power_of_two() || d.queue_size < 64 {
            return Err(invalid(format!("queue size {}", d.queue_size)));
        }
        if d.mtu < 68 {
            return Err(invalid(format!("MTU {}", d.mtu)));
        }
        if self.fds.len() > MAX_FDS {
            return Err(invalid(format!("{} descriptors", self.fds.len())));
        }
        let mut uses = Uses::new(&self.fds);
        uses.take(self.sockets.listener, FdKind::UnixListener, "listener")?;
        if let Some(i) = self.sockets.control {
            uses.take(i, FdKind::UnixListener, "control socket")?;
        }
        if let Some(i) = self.sockets.metrics {
            uses.take(i, FdKind::TcpListener, "metrics listener")?;
        }
        if self.taps.len() != usize::from(d.pairs) {
            return Err(invalid(format!(
                "{} tap queues for {} pairs",
                self.taps.len(),
                d.pairs
            )));
        }
        for &i in &self.taps {
            uses.take(i, FdKind::TapQueue, "tap queue")?;
        }
        match (&self.session, self.sockets.frontend) {
            (None, None) => {}
            (Some(s), Some(i)) => {
                uses.take(i, FdKind::UnixStream, "frontend connection")?;
                s.check(d, &mut uses)?;
            }
            (Some(_), None) => return Err(invalid("a session without a frontend connection")),
            (None, Some(_)) => return Err(invalid("a frontend connection without a session")),
        }
        uses.all_used()?;
        if !self.held.is_empty() && self.session.is_none() {
            return Err(invalid("held frames without a session"));
        }
        if !self.held.windows(2).all(|w| w[0] < w[1]) || self.held.iter().any(|&p| p >= d.pairs) {
            return Err(invalid(format!("held frames for pairs {:?}", self.held)));
        }
        if self.counters.pairs.len() != usize::from(d.pairs) {
            return Err(invalid("counters for another number of queue pairs"));
        }
        Ok(())
    }

    /// Checks that the state is for the card this daemon serves: same tap, queue pairs, queue
    /// size and MTU; the features the frontend acked must still be offered.
    pub fn check_device(&self, ours: &DeviceState) -> Result<(), StateError> {
        let theirs = &self.device;
        let differ = |what: &'static str, t: String, o: String| {
            Err(StateError::Device {
                what,
                theirs: t,
                ours: o,
            })
        };
        if theirs.tap != ours.tap {
            return differ("tap", theirs.tap.clone(), ours.tap.clone());
        }
        if theirs.pairs != ours.pairs {
            return differ(
                "queue pairs",
                theirs.pairs.to_string(),
                ours.pairs.to_string(),
            );
        }
        if theirs.queue_size != ours.queue_size {
            return differ(
                "queue size",
                theirs.queue_size.to_string(),
                ours.queue_size.to_string(),
            );
        }
        if theirs.mtu != ours.mtu {
            return differ("MTU", theirs.mtu.to_string(), ours.mtu.to_string());
        }
        let offered = ours.features | 1 << VHOST_USER_F_PROTOCOL_FEATURES;
        if let Some(acked) = self.session.as_ref().and_then(|s| s.features) {
            if acked & !offered != 0 {
                return differ(
                    "acked features",
                    format!("{acked:#x}"),
                    format!("an offer of {offered:#x}"),
                );
            }
        }
        Ok(())
    }
}

impl ProtocolState {
    /// Whether VHOST_USER_F_PROTOCOL_FEATURES was acked (rings then keep their enabled state).
    pub fn protocol_acked(&self) -> bool {
        self.features
            .is_some_and(|f| f & (1 << VHOST_USER_F_PROTOCOL_FEATURES) != 0)
    }

    /// Why the session cannot be handed over while a live migration logs its writes, if it
    /// does: the dirty log (its area, the rings' log addresses) is not carried, so a handover
    /// would lose the writes the new process makes from the migration's log.
    pub fn logging(&self) -> Option<&'static str> {
        if self
            .features
            .is_some_and(|f| f & (1 << crate::features::VHOST_F_LOG_ALL) != 0)
        {
            return Some(
                "dirty logging is on (VHOST_F_LOG_ALL acked: a live migration is under way)",
            );
        }
        if self
            .rings
            .iter()
            .any(|r| r.addr.is_some_and(|a| a.flags & 1 != 0))
        {
            return Some(
                "a used ring is logged (VHOST_VRING_F_LOG: a live migration is under way)",
            );
        }
        None
    }

    fn check(&self, d: &DeviceState, uses: &mut Uses) -> Result<(), StateError> {
        let offered = d.features | 1 << VHOST_USER_F_PROTOCOL_FEATURES;
        if let Some(f) = self.features {
            if f & !offered != 0 {
                return Err(invalid(format!(
                    "acked features {f:#x} beyond the offer {offered:#x}"
                )));
            }
            if !self.held_enables.is_empty() {
                return Err(invalid("held ring enables after SET_FEATURES"));
            }
        }
        if let Some(why) = self.logging() {
            return Err(invalid(why));
        }
        if let Some(p) = self.protocol_features {
            let ours = crate::backend::protocol_features().bits();
            if p & !ours != 0 {
                return Err(invalid(format!(
                    "acked protocol features {p:#x} beyond the offer {ours:#x}"
                )));
            }
        }
        if let Some(m) = self.mtu {
            if !(68..=d.mtu).contains(&m) {
                return Err(invalid(format!("frontend MTU {m}")));
            }
        }
        let rings = usize::from(d.pairs) * 2;
        for &(i, num) in &self.held_enables {
            if i as usize >= rings || num > 1 {
                return Err(invalid(format!("held enable ({i}, {num})")));
            }
        }
        if self.regions.len() > MAX_MEM_REGIONS {
            return Err(invalid(format!("{} memory regions", self.regions.len())));
        }
        if !self.regions.is_empty() {
            let regions: Vec<MemRegion> = self.regions.iter().map(RegionState::region).collect();
            parse_mem_table(&mem_table_body(&regions))
                .map_err(|why| invalid(format!("memory table: {why}")))?;
        }
        for r in &self.regions {
            uses.take(r.fd, FdKind::GuestMemory, "memory region")?;
        }
        if self.rings.len() != rings {
            return Err(invalid(format!(
                "{} rings for {} queue pairs",
                self.rings.len(),
                d.pairs
            )));
        }
        for (i, ring) in self.rings.iter().enumerate() {
            ring.check(i, d, &self.regions, uses)?;
        }
        Ok(())
    }
}

impl RingState {
    fn check(
        &self,
        i: usize,
        d: &DeviceState,
        regions: &[RegionState],
        uses: &mut Uses,
    ) -> Result<(), StateError> {
        let bad = |why: String| invalid(format!("ring {i}: {why}"));
        if let Some(num) = self.num {
            if num == 0 || num > d.queue_size {
                return Err(bad(format!("size {num}")));
            }
        }
        if let Some(a) = &self.addr {
            if regions.is_empty() {
                return Err(bad("addresses without a memory table".into()));
            }
            for (what, at) in [
                ("descriptor table", a.desc),
                ("available ring", a.avail),
                ("used ring", a.used),
            ] {
                let inside = regions
                    .iter()
                    .any(|r| at >= r.userspace_addr && at - r.userspace_addr < r.memory_size);
                if !inside {
                    return Err(bad(format!("{what} at {at:#x} is outside guest memory")));
                }
            }
        }
        if self.started && (self.num.is_none() || self.addr.is_none() || self.kick.is_none()) {
            return Err(bad("started without a size, addresses and a kick".into()));
        }
        if !self.started && self.kick.is_some() {
            // GET_VRING_BASE stops a ring and the handler drops its kick.
            return Err(bad("a kick on a stopped ring".into()));
        }
        for (fd, what) in [(self.kick, "kick"), (self.call, "call"), (self.err, "err")] {
            if let Some(fd) = fd {
                uses.take(fd, FdKind::EventFd, what)
                    .map_err(|e| bad(e.to_string()))?;
            }
        }
        Ok(())
    }
}

/// The body of a SET_MEM_TABLE request for `regions`: the count, padding, 32 bytes a region.
pub fn mem_table_body(regions: &[MemRegion]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 32 * regions.len());
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    for r in regions {
        for v in [
            r.guest_phys_addr,
            r.memory_size,
            r.userspace_addr,
            r.mmap_offset,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

/// Which descriptor positions have been claimed, and for what.
struct Uses<'a> {
    kinds: &'a [FdKind],
    used: Vec<bool>,
}

impl<'a> Uses<'a> {
    fn new(kinds: &'a [FdKind]) -> Self {
        Uses {
            kinds,
            used: vec![false; kinds.len()],
        }
    }

    fn take(&mut self, i: usize, kind: FdKind, what: &str) -> Result<(), StateError> {
        let Some(&k) = self.kinds.get(i) else {
            return Err(invalid(format!("{what}: no descriptor {i}")));
        };
        if k != kind {
            return Err(invalid(format!(
                "{what}: descriptor {i} is a {k:?}, not a {kind:?}"
            )));
        }
        if std::mem::replace(&mut self.used[i], true) {
            return Err(invalid(format!("{what}: descriptor {i} is used twice")));
        }
        Ok(())
    }

    fn all_used(&self) -> Result<(), StateError> {
        match self.used.iter().position(|u| !u) {
            Some(i) => Err(invalid(format!("descriptor {i} is not used"))),
            None => Ok(()),
        }
    }
}

/// What a frontend that does not migrate acks of the default offer, for tests.
#[cfg(test)]
pub(crate) fn running_features() -> u64 {
    crate::features::default_features() & !(1 << crate::features::VHOST_F_LOG_ALL)
}

/// A coherent state for tests: one queue pair, a frontend connected, both rings running in one
/// 1 MiB region at user address 0x7f00_0000_0000.
#[cfg(test)]
pub(crate) fn sample() -> SessionState {
    use crate::stats::{DeviceInfo, Stats};
    let features = crate::features::default_features();
    let user = 0x7f00_0000_0000u64;
    let ring = |n: u64, fds: [usize; 3]| RingState {
        num: Some(256),
        addr: Some(RingAddr {
            flags: 0,
            desc: user + n * 0x10000,
            used: user + n * 0x10000 + 0x2000,
            avail: user + n * 0x10000 + 0x1000,
            log: 0,
        }),
        base: 7,
        started: true,
        enabled: true,
        kick: Some(fds[0]),
        call: Some(fds[1]),
        err: Some(fds[2]),
    };
    use FdKind::*;
    SessionState {
        magic: MAGIC.into(),
        version: VERSION,
        sender: "test".into(),
        device: DeviceState {
            tap: "card0".into(),
            pairs: 1,
            queue_size: 1024,
            mtu: 65520,
            features,
        },
        fds: vec![
            UnixListener,
            UnixStream,
            UnixListener,
            TcpListener,
            TapQueue,
            GuestMemory,
            EventFd,
            EventFd,
            EventFd,
            EventFd,
            EventFd,
            EventFd,
        ],
        sockets: Sockets {
            listener: 0,
            frontend: Some(1),
            control: Some(2),
            metrics: Some(3),
        },
        taps: vec![4],
        tap_created: true,
        session: Some(ProtocolState {
            owner: true,
            features: Some(running_features() | 1 << VHOST_USER_F_PROTOCOL_FEATURES),
            protocol_features: Some(crate::backend::protocol_features().bits()),
            mtu: Some(65520),
            held_enables: Vec::new(),
            regions: vec![RegionState {
                guest_phys_addr: 0,
                memory_size: 1 << 20,
                userspace_addr: user,
                mmap_offset: 0,
                fd: 5,
            }],
            rings: vec![ring(0, [6, 7, 8]), ring(1, [9, 10, 11])],
        }),
        held: Vec::new(),
        counters: Stats::new(
            1,
            DeviceInfo {
                mtu: 65520,
                offered: features,
                transport: crate::stats::VHOST_USER,
            },
        )
        .snapshot(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reparse(s: &SessionState) -> Result<SessionState, StateError> {
        SessionState::parse(&s.to_json())
    }

    fn refused(change: impl FnOnce(&mut SessionState)) -> String {
        let mut s = sample();
        change(&mut s);
        match reparse(&s) {
            Ok(_) => panic!("accepted: {:?}", s),
            Err(e) => e.to_string(),
        }
    }

    fn session(s: &mut SessionState) -> &mut ProtocolState {
        s.session.as_mut().unwrap()
    }

    #[test]
    fn a_state_survives_the_round_trip() {
        let s = sample();
        let back = reparse(&s).unwrap();
        assert_eq!(back.device, s.device);
        assert_eq!(back.session, s.session);
        assert_eq!(back.fds, s.fds);
        assert_eq!(back.taps, s.taps);
        assert!(back.check_device(&s.device).is_ok());
        // An idle daemon (no frontend) hands over too.
        let mut idle = sample();
        idle.session = None;
        idle.sockets.frontend = None;
        idle.fds.truncate(5);
        idle.fds.remove(1);
        idle.sockets.control = Some(1);
        idle.sockets.metrics = Some(2);
        idle.taps = vec![3];
        assert!(reparse(&idle).is_ok(), "{:?}", reparse(&idle));
    }

    #[test]
    fn other_versions_and_other_json_are_refused() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["version"] = 2.into();
        let e = SessionState::parse(v.to_string().as_bytes()).unwrap_err();
        assert_eq!(e, StateError::Version { found: 2 });
        // Version 2 with a field version 1 does not know: still refused for its version.
        v["new_field"] = 1.into();
        let e = SessionState::parse(v.to_string().as_bytes()).unwrap_err();
        assert_eq!(e, StateError::Version { found: 2 });
        // Version 1 with an unknown field is not version 1.
        v["version"] = 1.into();
        let e = SessionState::parse(v.to_string().as_bytes()).unwrap_err();
        assert!(matches!(e, StateError::Parse(_)), "{e}");
        v["magic"] = "x".into();
        let e = SessionState::parse(v.to_string().as_bytes()).unwrap_err();
        assert_eq!(e, StateError::Magic("x".into()));
        let blob = sample().to_json();
        for cut in [0, 1, blob.len() / 2, blob.len() - 1] {
            assert!(matches!(
                SessionState::parse(&blob[..cut]),
                Err(StateError::Parse(_))
            ));
        }
        assert_eq!(
            SessionState::parse(&vec![b' '; MAX_BLOB + 1]).unwrap_err(),
            StateError::TooBig
        );
        let stats = br#"{"schema":1,"version":"0.1.0"}"#;
        assert!(SessionState::parse(stats).is_err());
    }

    #[test]
    fn incoherent_states_are_refused_with_the_field_named() {
        type Change = Box<dyn FnOnce(&mut SessionState)>;
        let cases: Vec<(&str, Change)> = vec![
            ("tap", Box::new(|s| s.device.tap = "a/b".into())),
            ("0 queue pairs", Box::new(|s| s.device.pairs = 0)),
            ("queue size 100", Box::new(|s| s.device.queue_size = 100)),
            ("no descriptor 99", Box::new(|s| s.sockets.listener = 99)),
            ("is used twice", Box::new(|s| s.sockets.control = Some(0))),
            ("not a UnixListener", Box::new(|s| s.sockets.listener = 1)),
            (
                "descriptor 11 is not used",
                Box::new(|s| {
                    session(s).rings[1].err = None;
                }),
            ),
            ("2 tap queues", Box::new(|s| s.taps.push(4))),
            (
                "without a frontend",
                Box::new(|s| s.sockets.frontend = None),
            ),
            ("without a session", Box::new(|s| s.session = None)),
            (
                "beyond the offer",
                Box::new(|s| session(s).features = Some(u64::MAX)),
            ),
            ("held frames for pairs", Box::new(|s| s.held = vec![1])),
            (
                "VHOST_F_LOG_ALL acked",
                Box::new(|s| {
                    session(s).features = Some(crate::features::default_features());
                }),
            ),
            (
                "VHOST_VRING_F_LOG",
                Box::new(|s| {
                    if let Some(a) = session(s).rings[0].addr.as_mut() {
                        a.flags = 1;
                    }
                }),
            ),
            (
                "acked protocol features",
                Box::new(|s| {
                    session(s).protocol_features = Some(1 << 20);
                }),
            ),
            (
                "frontend MTU 65521",
                Box::new(|s| session(s).mtu = Some(65521)),
            ),
            (
                "held ring enables after",
                Box::new(|s| {
                    session(s).held_enables = vec![(0, 1)];
                }),
            ),
            (
                "memory table: zero-sized region",
                Box::new(|s| {
                    session(s).regions[0].memory_size = 0;
                }),
            ),
            (
                "3 rings",
                Box::new(|s| {
                    session(s).rings.push(RingState::default());
                }),
            ),
            (
                "ring 0: size 2048",
                Box::new(|s| session(s).rings[0].num = Some(2048)),
            ),
            (
                "ring 1: used ring at",
                Box::new(|s| {
                    session(s).rings[1].addr.as_mut().unwrap().used = 0x1000;
                }),
            ),
            (
                "ring 0: started without",
                Box::new(|s| {
                    let r = &mut session(s).rings[0];
                    r.kick = None;
                    r.call = None;
                    r.err = None;
                    s.fds.truncate(6);
                    let p = session(s);
                    p.rings[1].kick = Some(6);
                    p.rings[1].call = Some(7);
                    p.rings[1].err = Some(8);
                    s.fds.extend([FdKind::EventFd; 3]);
                }),
            ),
            (
                "ring 1: a kick on a stopped ring",
                Box::new(|s| {
                    session(s).rings[1].started = false;
                }),
            ),
            (
                "counters for another",
                Box::new(|s| s.counters.pairs.clear()),
            ),
        ];
        for (want, change) in cases {
            let got = refused(change);
            assert!(got.contains(want), "wanted {want:?}, got {got:?}");
        }
    }

    /// The fuzz target's seeds stay what their names say as the state evolves.
    #[test]
    fn the_fuzz_seeds_parse_as_named() {
        let seed = |name: &str| {
            let path = format!(
                "{}/../fuzz/corpus/handover_state/{name}",
                env!("CARGO_MANIFEST_DIR")
            );
            std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        assert!(SessionState::parse(&seed("running-session.json")).is_ok());
        assert_eq!(
            SessionState::parse(&seed("version-2.json")).unwrap_err(),
            StateError::Version { found: 2 }
        );
        let e = SessionState::parse(&seed("session-without-frontend-fds.json")).unwrap_err();
        assert!(e.to_string().contains("is not used"), "{e}");
    }

    #[test]
    fn a_state_for_another_card_is_refused() {
        let s = sample();
        let mut ours = s.device.clone();
        ours.pairs = 2;
        assert!(matches!(
            s.check_device(&ours),
            Err(StateError::Device {
                what: "queue pairs",
                ..
            })
        ));
        let mut ours = s.device.clone();
        ours.tap = "card1".into();
        assert!(s.check_device(&ours).is_err());
        let mut ours = s.device.clone();
        ours.mtu = 1500;
        assert!(s.check_device(&ours).is_err());
        // A new binary that stops offering an acked feature cannot take the session over.
        let mut ours = s.device.clone();
        ours.features &= !(1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF);
        let e = s.check_device(&ours).unwrap_err().to_string();
        assert!(e.contains("acked features"), "{e}");
    }
}
