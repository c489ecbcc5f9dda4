//! The vhost-user requests of a live migration, screened and answered in the gate (`gate.rs`);
//! the log itself is `dirtylog`.
//!
//! * `SET_LOG_BASE` (with `VHOST_USER_PROTOCOL_F_LOG_SHMFD`): the log's memory file, size and
//!   offset. Checked (one descriptor, a mappable file long enough, a log covering every region of
//!   the memory table and every logged used ring), mapped, and answered. With LOG_SHMFD the
//!   request solicits a reply of its own, so REPLY_ACK does not apply (the spec: NEED_REPLY
//!   "brings no behavioural change" there), and the spec leaves its payload open: the card sends
//!   the log description back when the log is in place (what the `vhost` crate's frontend
//!   expects; QEMU only checks the request code) and a zero-sized one when it refused it, which
//!   the `vhost` crate's frontend reports as an error. The `vhost` crate's handler would end the
//!   session on a log it cannot map.
//! * `SET_LOG_FD`: an eventfd the card writes when it changed the log.
//! * `SET_FEATURES` with `VHOST_F_LOG_ALL` is passed on; logging follows the bit (`backend.rs`),
//!   and happens once a log is in place.
//! * `SET_VRING_ADDR` with `VHOST_VRING_F_LOG`: refused without `VHOST_F_LOG_ALL` acked, or
//!   with a `log_guest_addr` the mapped log does not cover; recorded for the log otherwise.
//! * `SEND_RARP` (with `VHOST_USER_PROTOCOL_F_RARP`): the backend writes the announcement into
//!   the tap (`announce.rs`). The `vhost` crate has no handler for it (it would end the session).
//!
//! Every refusal is logged with its reason; the session goes on without migration.

use std::os::fd::{AsFd, OwnedFd};

use log::{info, warn};
use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures};

use crate::dirtylog::{LogArea, RingLog, LOG};
use crate::features::VHOST_F_LOG_ALL;
use crate::gate::{le_u32, le_u64, MemRegion};

/// `VHOST_VRING_F_LOG` in SET_VRING_ADDR's flags.
const VRING_F_LOG: u32 = 1;
/// Size of SET_VRING_ADDR's body: index, flags, then four addresses.
const VRING_ADDR_SIZE: usize = 40;

/// What the gate does with a migration request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it on to the `vhost` crate's handler.
    Forward,
    /// Answered here with this REPLY_ACK value when the frontend asked for one.
    Answer(u64),
    /// SET_LOG_BASE's own reply: the log is in place (true) or refused.
    LogReply(bool),
    /// Refused; a frontend that cannot be told (no REPLY_ACK) loses the session.
    Refuse(&'static str),
}

/// What the frontend has negotiated, as the gate follows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Negotiation {
    pub features: u64,
    pub protocol: u64,
}

impl Negotiation {
    fn protocol(&self, f: VhostUserProtocolFeatures) -> bool {
        self.protocol & f.bits() != 0
    }

    fn log_all(&self) -> bool {
        self.features & 1 << VHOST_F_LOG_ALL != 0
    }

    fn event_idx(&self) -> bool {
        self.features & 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX != 0
    }
}

/// Sends the announcement for a guest MAC (the backend's tap write).
pub type RarpHook = Box<dyn Fn([u8; 6]) -> std::io::Result<()> + Send>;

/// The migration state of one frontend session.
///
/// `SET_VRING_ADDR` on a started ring that changes nothing but its logging is answered here
/// (see `vring_addr`).
pub struct Migration {
    /// The last memory table accepted.
    regions: Vec<MemRegion>,
    /// Each ring's size (SET_VRING_NUM).
    ring_num: Vec<u32>,
    /// Each ring's used-ring log parameters (SET_VRING_ADDR).
    rings: Vec<Option<RingLog>>,
    /// Each ring's descriptor table, used ring and available ring addresses, as last passed on.
    addrs: Vec<Option<[u64; 3]>>,
    max_queue_size: u32,
    rarp: Option<RarpHook>,
}

impl Migration {
    pub fn new(num_queues: u32, max_queue_size: u32, rarp: Option<RarpHook>) -> Self {
        Migration {
            regions: Vec::new(),
            ring_num: vec![0; num_queues as usize],
            rings: vec![None; num_queues as usize],
            addrs: vec![None; num_queues as usize],
            max_queue_size,
            rarp,
        }
    }

    /// Sets the announcement hook (the gate's hooks arrive after its state).
    pub fn set_rarp(&mut self, rarp: RarpHook) {
        self.rarp = Some(rarp);
    }

    /// The state of a session taken over from another process (`handover`), which handed over
    /// with logging off: the memory table, each ring's size and addresses. A migration after the
    /// handover then starts from them as it would on the old process.
    pub fn resume(&mut self, regions: Vec<MemRegion>, rings: &[(Option<u16>, Option<[u64; 3]>)]) {
        self.regions = regions;
        for (i, (num, addrs)) in rings.iter().enumerate().take(self.ring_num.len()) {
            self.ring_num[i] = num.map_or(0, u32::from);
            self.addrs[i] = *addrs;
        }
    }

    /// A memory table the gate accepted.
    pub fn mem_table(&mut self, regions: Vec<MemRegion>) {
        let end = mem_end(&regions);
        if !LOG.covers(0, end) {
            warn!(
                "the new memory table reaches {end:#x}, past what the dirty log covers; writes \
                 beyond it are not logged (counted as dirty_log_misses)"
            );
        }
        self.regions = regions;
    }

    /// Screens one request; `None` for requests that are none of migration's business.
    pub fn request(
        &mut self,
        request: u32,
        body: &[u8],
        fds: &mut Vec<OwnedFd>,
        neg: Negotiation,
        started: &[bool],
    ) -> Option<Verdict> {
        Some(match request {
            r if r == FrontendReq::SET_LOG_BASE as u32 => self.log_base(body, fds, neg),
            r if r == FrontendReq::SET_LOG_FD as u32 => log_fd(fds),
            r if r == FrontendReq::SEND_RARP as u32 => self.send_rarp(body, neg),
            r if r == FrontendReq::SET_VRING_NUM as u32 => {
                if let (Some(i), Some(n)) = (le_u32(body, 0), le_u32(body, 4)) {
                    if let Some(slot) = self.ring_num.get_mut(i as usize) {
                        *slot = n;
                    }
                }
                return None;
            }
            r if r == FrontendReq::SET_VRING_ADDR as u32 => self.vring_addr(body, neg, started)?,

            _ => return None,
        })
    }

    fn log_base(&mut self, body: &[u8], fds: &[OwnedFd], neg: Negotiation) -> Verdict {
        if !neg.protocol(VhostUserProtocolFeatures::LOG_SHMFD) {
            warn!(
                "refused SET_LOG_BASE: VHOST_USER_PROTOCOL_F_LOG_SHMFD was not negotiated; \
                 this session cannot migrate"
            );
            return Verdict::Answer(1);
        }
        let refuse = |why: String| {
            warn!("refused SET_LOG_BASE: {why}; this session cannot migrate");
            Verdict::LogReply(false)
        };
        let (Some(size), Some(offset), 16) = (le_u64(body, 0), le_u64(body, 8), body.len()) else {
            return refuse(format!("body of {} bytes, expected 16", body.len()));
        };
        if fds.len() != 1 {
            return refuse(format!(
                "{} file descriptors attached, expected the log's",
                fds.len()
            ));
        }
        let area = match LogArea::map(fds[0].as_fd(), size, offset) {
            Ok(area) => area,
            Err(e) => return refuse(e.to_string()),
        };
        let end = mem_end(&self.regions);
        if !area.covers(0, end) {
            return refuse(format!(
                "a log of {size} bytes covers guest memory below {:#x}, the memory table \
                 reaches {end:#x}",
                covered(area.bytes())
            ));
        }
        for (i, ring) in self.rings.iter().enumerate() {
            if let Some(r) = ring.filter(|r| r.log) {
                if !area.covers(r.log_addr, r.used_len) {
                    return refuse(format!(
                        "ring {i}'s used ring is logged at {:#x}+{}, beyond the log",
                        r.log_addr, r.used_len
                    ));
                }
            }
        }
        info!(
            "dirty log: {size} bytes at offset {offset} (guest memory below {:#x})",
            covered(size)
        );
        LOG.set_area(Some(area));
        Verdict::LogReply(true)
    }

    fn send_rarp(&self, body: &[u8], neg: Negotiation) -> Verdict {
        if !neg.protocol(VhostUserProtocolFeatures::RARP) {
            warn!("refused SEND_RARP: VHOST_USER_PROTOCOL_F_RARP was not negotiated");
            return Verdict::Answer(1);
        }
        let Some(mac) = crate::announce::rarp_mac(body) else {
            warn!("refused SEND_RARP: no unicast MAC address in its body");
            return Verdict::Answer(1);
        };
        let mac_text = mac.map(|b| format!("{b:02x}")).join(":");
        match self.rarp.as_ref().map(|send| send(mac)) {
            Some(Ok(())) => {
                info!("announced {mac_text} to the card's network (RARP)");
                Verdict::Answer(0)
            }
            Some(Err(e)) => {
                warn!("cannot send the RARP for {mac_text}: {e}");
                Verdict::Answer(1)
            }
            None => Verdict::Answer(1),
        }
    }

    fn vring_addr(&mut self, body: &[u8], neg: Negotiation, started: &[bool]) -> Option<Verdict> {
        if body.len() != VRING_ADDR_SIZE {
            return None; // the crate refuses it
        }
        let (index, flags) = (le_u32(body, 0)?, le_u32(body, 4)?);
        let (used_va, log_addr) = (le_u64(body, 16)?, le_u64(body, 32)?);
        let slot = index as usize;
        if slot >= self.rings.len() {
            return None;
        }
        let log = flags & VRING_F_LOG != 0;
        if log && !neg.log_all() {
            warn!(
                "refused SET_VRING_ADDR({index}): it asks to log the used ring, but \
                 VHOST_F_LOG_ALL was not negotiated"
            );
            return Some(Verdict::Refuse("used-ring logging without VHOST_F_LOG_ALL"));
        }
        let num = match self.ring_num[slot] {
            0 => self.max_queue_size,
            n => n,
        };
        let used_len = 4 + 8 * u64::from(num) + if neg.event_idx() { 2 } else { 0 };
        let used_gpa = self.regions.iter().find_map(|r| {
            let off = used_va.checked_sub(r.userspace_addr)?;
            (off < r.memory_size).then_some(r.guest_phys_addr + off)
        });
        let Some(used_gpa) = used_gpa else {
            return Some(Verdict::Forward); // the crate refuses an address outside the table
        };
        if log && !LOG.covers(log_addr, used_len) {
            warn!(
                "refused SET_VRING_ADDR({index}): its used ring is logged at {log_addr:#x}+\
                 {used_len}, beyond the dirty log of {} bytes",
                LOG.area_len().unwrap_or(0)
            );
            return Some(Verdict::Refuse("used-ring log address beyond the log"));
        }
        let ring = RingLog {
            used_gpa,
            used_len,
            log_addr,
            log,
        };
        self.rings[slot] = Some(ring);
        LOG.set_ring(slot, ring);
        // The rings' own addresses: descriptor table, used ring, available ring.
        let addrs = [le_u64(body, 8)?, used_va, le_u64(body, 24)?];
        let same = self.addrs[slot] == Some(addrs);
        self.addrs[slot] = Some(addrs);
        if same && started.get(slot).copied().unwrap_or(false) {
            // A running ring whose addresses stay: only its logging changes (QEMU starting or
            // stopping a migration's log), which is ours. Not passed on: vhost-user-backend
            // 0.24 re-reads the used index from guest memory on every SET_VRING_ADDR, in a
            // step apart from the worker's pass, and a completion made in between would be
            // lost from the device's count.
            return Some(Verdict::Answer(0));
        }
        Some(Verdict::Forward)
    }
}

fn log_fd(fds: &mut Vec<OwnedFd>) -> Verdict {
    if fds.len() != 1 {
        warn!(
            "refused SET_LOG_FD: {} file descriptors attached, expected one",
            fds.len()
        );
        return Verdict::Answer(1);
    }
    LOG.set_notify(fds.pop());
    Verdict::Answer(0)
}

/// End of the highest region of a memory table (0 without one).
fn mem_end(regions: &[MemRegion]) -> u64 {
    regions
        .iter()
        .map(|r| r.guest_phys_addr.saturating_add(r.memory_size))
        .max()
        .unwrap_or(0)
}

/// Guest memory a log of `len` bytes covers.
fn covered(len: u64) -> u64 {
    len.saturating_mul(8 * crate::dirtylog::LOG_PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG_SHMFD: u64 = 1 << 1;
    const RARP: u64 = 1 << 2;

    fn vring_addr(index: u32, flags: u32, used: u64, log: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&index.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        for v in [0x1000_0000u64, used, 0x1000_2000, log] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn table() -> Vec<MemRegion> {
        vec![MemRegion {
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            userspace_addr: 0x1000_0000,
            mmap_offset: 0,
        }]
    }

    #[test]
    fn used_ring_logging_needs_log_all() {
        let mut m = Migration::new(2, 256, None);
        m.mem_table(table());
        let req = FrontendReq::SET_VRING_ADDR as u32;
        let body = vring_addr(1, VRING_F_LOG, 0x1000_3000, 0x3000);
        let neg = Negotiation::default();
        assert!(matches!(
            m.request(req, &body, &mut Vec::new(), neg, &[false, false]),
            Some(Verdict::Refuse(_))
        ));
        let neg = Negotiation {
            features: 1 << VHOST_F_LOG_ALL,
            protocol: LOG_SHMFD,
        };
        assert_eq!(
            m.request(req, &body, &mut Vec::new(), neg, &[false, false]),
            Some(Verdict::Forward)
        );
    }

    #[test]
    fn a_running_ring_changing_only_its_logging_stays_with_the_gate() {
        let mut m = Migration::new(2, 256, None);
        m.mem_table(table());
        let req = FrontendReq::SET_VRING_ADDR as u32;
        let neg = Negotiation {
            features: 1 << VHOST_F_LOG_ALL,
            protocol: LOG_SHMFD,
        };
        let plain = vring_addr(0, 0, 0x1000_3000, 0);
        let logged = vring_addr(0, VRING_F_LOG, 0x1000_3000, 0x3000);
        let moved = vring_addr(0, VRING_F_LOG, 0x1000_5000, 0x5000);
        let started = [true, false];
        // First addresses of a ring, then the same with logging on a running ring.
        assert_eq!(
            m.request(req, &plain, &mut Vec::new(), neg, &[false, false]),
            Some(Verdict::Forward)
        );
        assert_eq!(
            m.request(req, &logged, &mut Vec::new(), neg, &started),
            Some(Verdict::Answer(0))
        );
        // New addresses go to the crate, running or not.
        assert_eq!(
            m.request(req, &moved, &mut Vec::new(), neg, &started),
            Some(Verdict::Forward)
        );
    }

    #[test]
    fn requests_of_features_not_negotiated_are_refused() {
        let mut m = Migration::new(2, 256, None);
        let neg = Negotiation::default();
        let log_base = FrontendReq::SET_LOG_BASE as u32;
        assert_eq!(
            m.request(log_base, &[0; 16], &mut Vec::new(), neg, &[]),
            Some(Verdict::Answer(1))
        );
        let rarp = FrontendReq::SEND_RARP as u32;
        let mac = [0x52, 0x54, 0, 1, 2, 3, 0, 0];
        assert_eq!(
            m.request(rarp, &mac, &mut Vec::new(), neg, &[]),
            Some(Verdict::Answer(1))
        );
        // Negotiated, but nobody to send it (the fuzz target's gate): refused, not a panic.
        let neg = Negotiation {
            features: 0,
            protocol: RARP | LOG_SHMFD,
        };
        assert_eq!(
            m.request(rarp, &mac, &mut Vec::new(), neg, &[]),
            Some(Verdict::Answer(1))
        );
        // With LOG_SHMFD, a log base without its descriptor gets its own (refusing) reply.
        assert_eq!(
            m.request(log_base, &[0; 16], &mut Vec::new(), neg, &[]),
            Some(Verdict::LogReply(false))
        );
    }
}
