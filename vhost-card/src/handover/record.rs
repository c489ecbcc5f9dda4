//! What the gate records of a session as the frontend sets it up, so it can be handed over: the
//! protocol state the `vhost` crate's handler holds, mirrored request by request, with
//! duplicates of every descriptor the handler keeps (memory regions, kick, call, err).
//!
//! The gate calls [`Recorder::observe`] for each request it took: forwarded to the handler, or
//! answered with success itself (NET_SET_MTU, an early SET_VRING_ENABLE). A forwarded request
//! the handler refuses ends the session, so what is recorded is what the handler holds. The
//! mirror follows vhost-user-backend 0.24 (`handler.rs`): SET_FEATURES without PROTOCOL_FEATURES
//! enables every ring; SET_VRING_KICK with a descriptor starts a ring; GET_VRING_BASE stops it
//! and drops its kick and call; RESET_OWNER forgets the negotiation.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use log::warn;
use vhost::vhost_user::message::FrontendReq;

use super::state::{ProtocolState, RegionState, RingAddr, RingState};
use crate::features::VHOST_USER_F_PROTOCOL_FEATURES;
use crate::gate::{parse_mem_table, Hdr};

/// SET_VRING_KICK/CALL/ERR: the ring index is the low byte, this bit says "no descriptor".
const VRING_NOFD: u64 = 1 << 8;

/// One ring's descriptors, owned by the recorder.
#[derive(Debug, Default)]
struct RingFds {
    kick: Option<OwnedFd>,
    call: Option<OwnedFd>,
    err: Option<OwnedFd>,
}

/// The recorded session.
#[derive(Debug)]
pub struct Recorder {
    state: ProtocolState,
    regions: Vec<OwnedFd>,
    rings: Vec<RingFds>,
}

impl Recorder {
    pub fn new(num_rings: usize) -> Self {
        Recorder {
            state: ProtocolState {
                rings: vec![RingState::default(); num_rings],
                ..ProtocolState::default()
            },
            regions: Vec::new(),
            rings: (0..num_rings).map(|_| RingFds::default()).collect(),
        }
    }

    /// A record taken over from another process: `state` as checked by `SessionState::parse`,
    /// with `fds` the handover's descriptors (positions as the state names them). Takes
    /// duplicates of those the state uses.
    pub fn restore(state: &ProtocolState, fds: &[BorrowedFd]) -> std::io::Result<Self> {
        let dup = |i: usize| -> std::io::Result<OwnedFd> {
            fds.get(i)
                .ok_or_else(|| std::io::Error::other(format!("no descriptor {i}")))?
                .try_clone_to_owned()
        };
        let opt = |i: Option<usize>| i.map(dup).transpose();
        let regions = state
            .regions
            .iter()
            .map(|r| dup(r.fd))
            .collect::<std::io::Result<Vec<_>>>()?;
        let rings = state
            .rings
            .iter()
            .map(|r| {
                Ok(RingFds {
                    kick: opt(r.kick)?,
                    call: opt(r.call)?,
                    err: opt(r.err)?,
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Recorder {
            state: state.clone(),
            regions,
            rings,
        })
    }

    /// The recorded state without its descriptors.
    pub fn state(&self) -> &ProtocolState {
        &self.state
    }

    /// Records one request the gate took. `fds` are the request's descriptors; the recorder
    /// keeps duplicates of those the handler keeps.
    pub fn observe(&mut self, hdr: &Hdr, body: &[u8], fds: &[OwnedFd]) {
        let word = |at: usize| -> Option<u64> {
            body.get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        };
        let half = |at: usize| -> Option<u32> {
            body.get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
        };
        let s = &mut self.state;
        let req = hdr.request;
        let is = |r: FrontendReq| req == r as u32;
        if is(FrontendReq::SET_OWNER) {
            s.owner = true;
        } else if is(FrontendReq::RESET_OWNER) {
            s.owner = false;
            s.features = None;
            s.protocol_features = None;
        } else if is(FrontendReq::SET_FEATURES) {
            let Some(v) = word(0) else { return };
            s.features = Some(v);
            if v & (1 << VHOST_USER_F_PROTOCOL_FEATURES) == 0 {
                s.held_enables.clear();
                s.rings.iter_mut().for_each(|r| r.enabled = true);
            } else {
                for (i, num) in std::mem::take(&mut s.held_enables) {
                    if let Some(r) = s.rings.get_mut(i as usize) {
                        r.enabled = num == 1;
                    }
                }
            }
        } else if is(FrontendReq::SET_PROTOCOL_FEATURES) {
            s.protocol_features = word(0);
        } else if is(FrontendReq::NET_SET_MTU) {
            s.mtu = word(0).and_then(|m| u16::try_from(m).ok());
        } else if is(FrontendReq::SET_MEM_TABLE) {
            self.mem_table(body, fds);
        } else if is(FrontendReq::SET_VRING_ENABLE) {
            let (Some(i), Some(num)) = (half(0), half(4)) else {
                return;
            };
            if s.protocol_acked() {
                if let Some(r) = s.rings.get_mut(i as usize) {
                    r.enabled = num == 1;
                }
            } else {
                // Held by the gate until SET_FEATURES.
                s.held_enables.retain(|&(j, _)| j != i);
                s.held_enables.push((i, num));
            }
        } else if is(FrontendReq::SET_VRING_NUM) {
            if let (Some(i), Some(num)) = (half(0), half(4)) {
                if let (Some(r), Ok(num)) = (s.rings.get_mut(i as usize), u16::try_from(num)) {
                    r.num = Some(num);
                }
            }
        } else if is(FrontendReq::SET_VRING_BASE) {
            if let (Some(i), Some(base)) = (half(0), half(4)) {
                if let (Some(r), Ok(base)) = (s.rings.get_mut(i as usize), u16::try_from(base)) {
                    r.base = base;
                }
            }
        } else if is(FrontendReq::SET_VRING_ADDR) {
            let (Some(i), Some(flags), Some(desc), Some(used), Some(avail), Some(log)) =
                (half(0), half(4), word(8), word(16), word(24), word(32))
            else {
                return;
            };
            if let Some(r) = s.rings.get_mut(i as usize) {
                r.addr = Some(RingAddr {
                    flags,
                    desc,
                    used,
                    avail,
                    log,
                });
            }
        } else if is(FrontendReq::GET_VRING_BASE) {
            let Some(i) = half(0) else { return };
            if let (Some(r), Some(f)) =
                (s.rings.get_mut(i as usize), self.rings.get_mut(i as usize))
            {
                r.started = false;
                f.kick = None;
                f.call = None;
            }
        } else if is(FrontendReq::SET_VRING_KICK)
            || is(FrontendReq::SET_VRING_CALL)
            || is(FrontendReq::SET_VRING_ERR)
        {
            let Some(v) = word(0) else { return };
            let i = (v & 0xff) as usize;
            let fd = match (v & VRING_NOFD, fds.first()) {
                (0, Some(fd)) => fd
                    .try_clone()
                    .map_err(|e| warn!("handover record: {e}"))
                    .ok(),
                _ => None,
            };
            let (Some(r), Some(f)) = (s.rings.get_mut(i), self.rings.get_mut(i)) else {
                return;
            };
            if is(FrontendReq::SET_VRING_KICK) {
                r.started = fd.is_some();
                f.kick = fd;
            } else if is(FrontendReq::SET_VRING_CALL) {
                f.call = fd;
            } else {
                f.err = fd;
            }
        }
    }

    fn mem_table(&mut self, body: &[u8], fds: &[OwnedFd]) {
        let Ok(regions) = parse_mem_table(body) else {
            return;
        };
        let dups: Result<Vec<OwnedFd>, _> = fds.iter().map(OwnedFd::try_clone).collect();
        match dups {
            Ok(dups) if dups.len() == regions.len() => {
                self.state.regions = regions
                    .iter()
                    .map(|r| RegionState {
                        guest_phys_addr: r.guest_phys_addr,
                        memory_size: r.memory_size,
                        userspace_addr: r.userspace_addr,
                        mmap_offset: r.mmap_offset,
                        fd: 0,
                    })
                    .collect();
                self.regions = dups;
            }
            Ok(_) => {}
            Err(e) => warn!("handover record: memory table: {e}"),
        }
    }

    /// Sets a ring's next available index from the answer to the GET_VRING_BASE that stopped it.
    pub fn stopped_at(&mut self, ring: usize, base: u16) {
        if let Some(r) = self.state.rings.get_mut(ring) {
            r.base = base;
        }
    }

    /// The recorded state, with its descriptors numbered from `first` in the order of the
    /// returned list: memory regions, then kick, call and err of each ring.
    pub fn export(&self, first: usize) -> (ProtocolState, Vec<BorrowedFd<'_>>) {
        let mut state = self.state.clone();
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        fn take<'a>(fds: &mut Vec<BorrowedFd<'a>>, first: usize, fd: &'a OwnedFd) -> usize {
            fds.push(fd.as_fd());
            first + fds.len() - 1
        }
        for (r, fd) in state.regions.iter_mut().zip(&self.regions) {
            r.fd = take(&mut fds, first, fd);
        }
        for (r, f) in state.rings.iter_mut().zip(&self.rings) {
            r.kick = f.kick.as_ref().map(|fd| take(&mut fds, first, fd));
            r.call = f.call.as_ref().map(|fd| take(&mut fds, first, fd));
            r.err = f.err.as_ref().map(|fd| take(&mut fds, first, fd));
        }
        (state, fds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handover::replay;
    use crate::handover::state::{sample, FdKind, SessionState};
    use std::os::fd::FromRawFd;

    fn hdr(req: FrontendReq, body: &[u8]) -> Hdr {
        Hdr {
            request: req as u32,
            flags: 1,
            size: body.len() as u32,
        }
    }

    fn ring_body(i: u32, v: u32) -> Vec<u8> {
        let mut b = i.to_le_bytes().to_vec();
        b.extend_from_slice(&v.to_le_bytes());
        b
    }

    fn eventfd() -> OwnedFd {
        // SAFETY: eventfd returns a new descriptor (checked) that nothing else owns.
        unsafe {
            let fd = libc::eventfd(0, libc::EFD_CLOEXEC);
            assert!(fd >= 0);
            OwnedFd::from_raw_fd(fd)
        }
    }

    fn memfd(size: i64) -> OwnedFd {
        // SAFETY: memfd_create with a static name returns a new descriptor (checked) that
        // nothing else owns; ftruncate sizes it.
        unsafe {
            let fd = libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, size), 0);
            OwnedFd::from_raw_fd(fd)
        }
    }

    const USER: u64 = 0x7f00_0000_0000;

    /// QEMU's order: protocol features, early enable and MTU, features, memory, rings.
    fn qemu_session(r: &mut Recorder, features: u64) {
        let u64b = |v: u64| v.to_le_bytes().to_vec();
        let send = |r: &mut Recorder, req, body: Vec<u8>, fds: &[OwnedFd]| {
            r.observe(&hdr(req, &body), &body, fds)
        };
        send(r, FrontendReq::SET_OWNER, vec![], &[]);
        let p = crate::backend::protocol_features().bits();
        send(r, FrontendReq::SET_PROTOCOL_FEATURES, u64b(p), &[]);
        send(r, FrontendReq::SET_VRING_ENABLE, ring_body(0, 1), &[]);
        send(r, FrontendReq::NET_SET_MTU, u64b(1500), &[]);
        send(r, FrontendReq::SET_FEATURES, u64b(features), &[]);
        let mut table = 1u32.to_le_bytes().to_vec();
        table.extend_from_slice(&[0; 4]);
        for v in [0, 1 << 20, USER, 0] {
            table.extend_from_slice(&u64::to_le_bytes(v));
        }
        send(r, FrontendReq::SET_MEM_TABLE, table, &[memfd(1 << 20)]);
        for i in 0..2u32 {
            send(r, FrontendReq::SET_VRING_NUM, ring_body(i, 256), &[]);
            send(r, FrontendReq::SET_VRING_BASE, ring_body(i, 0), &[]);
            let mut addr = ring_body(i, 0);
            let at = USER + u64::from(i) * 0x10000;
            for v in [at, at + 0x2000, at + 0x1000, 0] {
                addr.extend_from_slice(&v.to_le_bytes());
            }
            send(r, FrontendReq::SET_VRING_ADDR, addr, &[]);
            send(
                r,
                FrontendReq::SET_VRING_KICK,
                u64b(u64::from(i)),
                &[eventfd()],
            );
            send(
                r,
                FrontendReq::SET_VRING_CALL,
                u64b(u64::from(i)),
                &[eventfd()],
            );
        }
        send(r, FrontendReq::SET_VRING_ENABLE, ring_body(1, 1), &[]);
    }

    /// The recorded session in a whole state: the sample's sockets and tap (descriptors 0-4),
    /// then the recorder's.
    fn whole(r: &Recorder) -> (SessionState, usize) {
        let mut s = sample();
        s.fds.truncate(5);
        let (p, fds) = r.export(5);
        s.fds.push(FdKind::GuestMemory);
        s.fds
            .extend(std::iter::repeat_n(FdKind::EventFd, fds.len() - 1));
        s.session = Some(p);
        (s, fds.len())
    }

    #[test]
    fn a_qemu_session_is_recorded_as_the_handler_holds_it() {
        let features =
            crate::handover::state::running_features() | 1 << VHOST_USER_F_PROTOCOL_FEATURES;
        let mut r = Recorder::new(2);
        qemu_session(&mut r, features);
        let (s, nfds) = whole(&r);
        assert_eq!(nfds, 5, "one region and kick and call of two rings");
        let p = s.session.as_ref().unwrap();
        assert!(p.owner);
        assert_eq!(p.features, Some(features));
        assert_eq!(p.mtu, Some(1500));
        assert!(
            p.held_enables.is_empty(),
            "held enables applied at SET_FEATURES"
        );
        assert!(p
            .rings
            .iter()
            .all(|r| r.started && r.enabled && r.num == Some(256)));
        assert_eq!(p.rings[1].addr.unwrap().avail, USER + 0x11000);
        assert_eq!((p.rings[0].kick, p.rings[0].call), (Some(6), Some(7)));
        assert_eq!(p.regions[0].fd, 5);
        // The state is coherent as a whole, survives the round trip, and rebuilds both rings.
        let back = SessionState::parse(&s.to_json()).unwrap();
        let kicks = replay::rebuild(back.session.as_ref().unwrap())
            .iter()
            .filter(|q| q.request == FrontendReq::SET_VRING_KICK)
            .count();
        assert_eq!(kicks, 2);
    }

    #[test]
    fn stops_resets_and_odd_requests() {
        let features =
            crate::handover::state::running_features() | 1 << VHOST_USER_F_PROTOCOL_FEATURES;
        let mut r = Recorder::new(2);
        qemu_session(&mut r, features);
        // The stop point: GET_VRING_BASE, then the index it answered.
        let body = ring_body(1, 0);
        r.observe(&hdr(FrontendReq::GET_VRING_BASE, &body), &body, &[]);
        r.stopped_at(1, 9);
        let (s, nfds) = whole(&r);
        assert_eq!(nfds, 3, "ring 1's kick and call are dropped");
        let ring = &s.session.as_ref().unwrap().rings[1];
        assert!(!ring.started && ring.kick.is_none() && ring.call.is_none());
        assert_eq!(ring.base, 9);
        assert!(SessionState::parse(&s.to_json()).is_ok());
        // A kick without a descriptor (NOFD) does not start a ring.
        let nofd = (1u64 | VRING_NOFD).to_le_bytes();
        r.observe(&hdr(FrontendReq::SET_VRING_KICK, &nofd), &nofd, &[]);
        assert!(!r.export(0).0.rings[1].started);
        // Short bodies and indices out of range change nothing and do not panic.
        let before = r.export(0).0;
        for req in [
            FrontendReq::SET_FEATURES,
            FrontendReq::SET_VRING_NUM,
            FrontendReq::SET_VRING_ADDR,
            FrontendReq::SET_VRING_KICK,
            FrontendReq::SET_MEM_TABLE,
        ] {
            r.observe(&hdr(req, &[1, 2]), &[1, 2], &[]);
        }
        let far = ring_body(40, 8);
        r.observe(&hdr(FrontendReq::SET_VRING_NUM, &far), &far, &[]);
        assert_eq!(r.export(0).0, before);
        // RESET_OWNER forgets the negotiation, as the handler does.
        r.observe(&hdr(FrontendReq::RESET_OWNER, &[]), &[], &[]);
        let p = r.export(0).0;
        assert!(!p.owner && p.features.is_none() && p.protocol_features.is_none());
    }

    /// Without PROTOCOL_FEATURES, SET_FEATURES enables every ring (the handler does).
    #[test]
    fn features_without_protocol_features_enable_every_ring() {
        let mut r = Recorder::new(2);
        let f = crate::features::default_features().to_le_bytes();
        r.observe(&hdr(FrontendReq::SET_FEATURES, &f), &f, &[]);
        assert!(r.export(0).0.rings.iter().all(|r| r.enabled));
    }
}
