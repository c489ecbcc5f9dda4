//! The vhost-user requests that rebuild a session in a fresh `vhost` crate handler, and those that
//! stop and restart its rings.
//!
//! The crate's handler (vhost-user-backend 0.24, `VhostUserHandler`) can only be reached
//! through a vhost-user socket: `VhostUserDaemon` builds it privately and serves it from a
//! `Listener` (`start`) or a socket path (`start_client`). The daemon already talks to it over a
//! private socket behind the gate, so a new process rebuilds the session by sending it the
//! requests a frontend would have sent, from the recorded state, before the real frontend's
//! connection is attached to the gate. No frontend takes part.
//!
//! Two values are not requests of their own: the next available index is given by
//! SET_VRING_BASE, and the next used index is read from the ring in guest memory by
//! SET_VRING_ADDR (vhost-user-backend 0.24, `handler.rs`, `set_vring_addr`), which is right
//! because at the stop point every descriptor taken was completed and published.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;

use thiserror::Error;
use vhost::vhost_user::message::FrontendReq;

use super::state::{mem_table_body, ProtocolState, RingState};
use crate::gate::{recv_msg, send_msg, GateError, Hdr, Msg};

/// vhost-user header flags: protocol version 1, and the reply bit.
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("the handler ended the session at request {index} ({request:?}): it refused it or one before it")]
    Ended { index: usize, request: FrontendReq },
    #[error(
        "request {index} ({request:?}) names descriptor {fd}, which the handover does not carry"
    )]
    NoFd {
        index: usize,
        request: FrontendReq,
        fd: usize,
    },
    #[error("request {index} ({request:?}) got an answer of another request ({got}) or without the reply flag")]
    WrongReply {
        index: usize,
        request: FrontendReq,
        got: u32,
    },
    #[error(transparent)]
    Socket(#[from] GateError),
}

/// The answers to the requests that have one, in order: (request, body).
pub type Answers = Vec<(FrontendReq, Vec<u8>)>;

/// Sends `reqs` to the crate's handler on `sock` (the gate's private socket to it), attaching
/// `fds[i]` for each position `i` a request names, and reads the answer of each request that
/// has one. The handler takes its own duplicates of what is attached.
pub fn send(
    sock: &UnixStream,
    reqs: &[Request],
    fds: &[BorrowedFd],
) -> Result<Answers, ReplayError> {
    let mut answers = Vec::new();
    let mut msg = Msg::default();
    for (index, r) in reqs.iter().enumerate() {
        let request = r.request;
        let raw: Vec<RawFd> = r
            .fds
            .iter()
            .map(|&fd| {
                fds.get(fd)
                    .map(|f| f.as_raw_fd())
                    .ok_or(ReplayError::NoFd { index, request, fd })
            })
            .collect::<Result<_, _>>()?;
        let hdr = Hdr {
            request: request as u32,
            flags: FLAG_VERSION,
            size: r.body.len() as u32,
        };
        let ended = |_| ReplayError::Ended { index, request };
        send_msg(sock, &hdr, &r.body, &raw).map_err(ended)?;
        if !r.reply {
            continue;
        }
        match recv_msg(sock, &mut msg) {
            Ok(Some(h)) if h.request == request as u32 && h.flags & FLAG_REPLY != 0 => {
                answers.push((request, std::mem::take(&mut msg.body)));
            }
            Ok(Some(h)) => {
                return Err(ReplayError::WrongReply {
                    index,
                    request,
                    got: h.request,
                })
            }
            Ok(None) | Err(GateError::Io(_)) => return Err(ReplayError::Ended { index, request }),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(answers)
}

/// One request to send to the crate's handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub request: FrontendReq,
    pub body: Vec<u8>,
    /// Positions in the handover's descriptor list to attach.
    pub fds: Vec<usize>,
    /// The handler answers it (the caller reads and checks the answer).
    pub reply: bool,
}

impl Request {
    fn new(request: FrontendReq, body: Vec<u8>) -> Self {
        Request {
            request,
            body,
            fds: Vec::new(),
            reply: false,
        }
    }

    fn get(request: FrontendReq) -> Self {
        Request {
            reply: true,
            ..Request::new(request, Vec::new())
        }
    }

    fn u64(request: FrontendReq, v: u64) -> Self {
        Request::new(request, v.to_le_bytes().to_vec())
    }

    /// The vring-state body (index, value), as SET_VRING_NUM/BASE/ENABLE and GET_VRING_BASE take.
    fn ring(request: FrontendReq, index: usize, value: u32) -> Self {
        let mut body = (index as u32).to_le_bytes().to_vec();
        body.extend_from_slice(&value.to_le_bytes());
        Request::new(request, body)
    }

    /// A ring's descriptor request (SET_VRING_KICK/CALL/ERR): the index in a u64, the descriptor
    /// attached.
    fn ring_fd(request: FrontendReq, index: usize, fd: usize) -> Self {
        Request {
            fds: vec![fd],
            ..Request::u64(request, index as u64)
        }
    }
}

/// Rebuilds a session in a fresh handler. The handler learns the offer first (GET_FEATURES; the
/// `vhost` crate enables REPLY_ACK only once it has seen it), then the negotiation, the memory
/// table and each ring; a ring that ran is started last, by its kick. Ends with GET_FEATURES as a
/// barrier: the crate ends the session on the first request it refuses, so an answer to the
/// last request means every one before it was taken.
pub fn rebuild(p: &ProtocolState) -> Vec<Request> {
    let mut out = vec![Request::get(FrontendReq::GET_FEATURES)];
    if p.owner {
        out.push(Request::new(FrontendReq::SET_OWNER, Vec::new()));
    }
    if let Some(pf) = p.protocol_features {
        out.push(Request::get(FrontendReq::GET_PROTOCOL_FEATURES));
        out.push(Request::u64(FrontendReq::SET_PROTOCOL_FEATURES, pf));
    }
    if let Some(f) = p.features {
        out.push(Request::u64(FrontendReq::SET_FEATURES, f));
    }
    if !p.regions.is_empty() {
        let regions: Vec<_> = p.regions.iter().map(|r| r.region()).collect();
        out.push(Request {
            fds: p.regions.iter().map(|r| r.fd).collect(),
            ..Request::new(FrontendReq::SET_MEM_TABLE, mem_table_body(&regions))
        });
    }
    for (i, ring) in p.rings.iter().enumerate() {
        if let Some(num) = ring.num {
            out.push(Request::ring(FrontendReq::SET_VRING_NUM, i, u32::from(num)));
        }
        if ring.num.is_some() || ring.addr.is_some() || ring.base != 0 {
            position(i, ring, &mut out);
        }
        if let Some(fd) = ring.err {
            out.push(Request::ring_fd(FrontendReq::SET_VRING_ERR, i, fd));
        }
        if let Some(fd) = ring.call {
            out.push(Request::ring_fd(FrontendReq::SET_VRING_CALL, i, fd));
        }
        if p.protocol_acked() {
            out.push(Request::ring(
                FrontendReq::SET_VRING_ENABLE,
                i,
                u32::from(ring.enabled),
            ));
        }
        out.extend(start(i, ring));
    }
    out.push(barrier());
    out
}

/// Stops every started ring: the vhost-user stop point. The crate's GET_VRING_BASE marks the
/// ring not ready, takes it out of its worker's epoll set and waits for the worker's pass over it
/// to end (it takes the ring's lock, which a pass holds throughout); it answers with the next
/// available index and drops its kick and call descriptors.
pub fn stop(p: &ProtocolState) -> Vec<(usize, Request)> {
    p.rings
        .iter()
        .enumerate()
        .filter(|(_, r)| r.started)
        .map(|(i, _)| {
            let mut r = Request::ring(FrontendReq::GET_VRING_BASE, i, 0);
            r.reply = true;
            (i, r)
        })
        .collect()
}

/// Starts again, in the same handler, the rings [`stop`] stopped (the old process keeps serving
/// when a handover fails): base, addresses (which re-read the used index), call and kick.
pub fn restart(p: &ProtocolState) -> Vec<Request> {
    let mut out = Vec::new();
    for (i, ring) in p.rings.iter().enumerate().filter(|(_, r)| r.started) {
        position(i, ring, &mut out);
        if let Some(fd) = ring.call {
            out.push(Request::ring_fd(FrontendReq::SET_VRING_CALL, i, fd));
        }
        out.extend(start(i, ring));
    }
    out.push(barrier());
    out
}

/// Where a ring resumes: SET_VRING_BASE (the next available index) and, when set,
/// SET_VRING_ADDR, which makes the crate read the next used index from guest memory.
fn position(i: usize, ring: &RingState, out: &mut Vec<Request>) {
    out.push(Request::ring(
        FrontendReq::SET_VRING_BASE,
        i,
        u32::from(ring.base),
    ));
    if let Some(a) = ring.addr {
        out.push(addr(i, &a));
    }
}

/// GET_FEATURES, answered whatever was negotiated: its answer means every request sent before
/// it was handled.
pub fn barrier() -> Request {
    Request::get(FrontendReq::GET_FEATURES)
}

/// SET_VRING_KICK for a ring that ran.
fn start(i: usize, ring: &RingState) -> Option<Request> {
    match (ring.started, ring.kick) {
        (true, Some(fd)) => Some(Request::ring_fd(FrontendReq::SET_VRING_KICK, i, fd)),
        _ => None,
    }
}

/// SET_VRING_ADDR: index, flags, then the descriptor, used, available and log addresses.
fn addr(i: usize, a: &super::state::RingAddr) -> Request {
    let mut body = (i as u32).to_le_bytes().to_vec();
    body.extend_from_slice(&a.flags.to_le_bytes());
    for v in [a.desc, a.used, a.avail, a.log] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    Request::new(FrontendReq::SET_VRING_ADDR, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handover::state::sample;

    fn codes(reqs: &[Request]) -> Vec<FrontendReq> {
        reqs.iter().map(|r| r.request).collect()
    }

    #[test]
    fn a_running_session_is_rebuilt_in_a_frontends_order() {
        let s = sample();
        let p = s.session.as_ref().unwrap();
        let reqs = rebuild(p);
        use FrontendReq::*;
        let per_ring = [
            SET_VRING_NUM,
            SET_VRING_BASE,
            SET_VRING_ADDR,
            SET_VRING_ERR,
            SET_VRING_CALL,
            SET_VRING_ENABLE,
            SET_VRING_KICK,
        ];
        let mut want = vec![
            GET_FEATURES,
            SET_OWNER,
            GET_PROTOCOL_FEATURES,
            SET_PROTOCOL_FEATURES,
            SET_FEATURES,
            SET_MEM_TABLE,
        ];
        want.extend(per_ring);
        want.extend(per_ring);
        want.push(GET_FEATURES);
        assert_eq!(codes(&reqs), want);
        // Exactly the gets are answered; every descriptor of the state is attached once.
        assert!(reqs
            .iter()
            .all(|r| r.reply == matches!(r.request, GET_FEATURES | GET_PROTOCOL_FEATURES)));
        let mut fds: Vec<usize> = reqs.iter().flat_map(|r| r.fds.clone()).collect();
        fds.sort();
        assert_eq!(fds, (5..12).collect::<Vec<_>>());
        // SET_VRING_BASE carries the stop point's next available index; SET_VRING_ADDR the
        // recorded addresses in the crate's layout.
        let base = reqs.iter().find(|r| r.request == SET_VRING_BASE).unwrap();
        assert_eq!(base.body, [0, 0, 0, 0, 7, 0, 0, 0]);
        let addr = reqs.iter().rfind(|r| r.request == SET_VRING_ADDR).unwrap();
        let a = p.rings[1].addr.unwrap();
        assert_eq!(addr.body.len(), 40);
        assert_eq!(addr.body[..4], 1u32.to_le_bytes());
        assert_eq!(addr.body[8..16], a.desc.to_le_bytes());
        assert_eq!(addr.body[16..24], a.used.to_le_bytes());
        assert_eq!(addr.body[24..32], a.avail.to_le_bytes());
        let kick = reqs.iter().rfind(|r| r.request == SET_VRING_KICK).unwrap();
        assert_eq!(kick.body, 1u64.to_le_bytes());
        assert_eq!(kick.fds, vec![9]);
    }

    #[test]
    fn a_session_still_negotiating_sends_only_what_was_set() {
        let mut s = sample();
        let p = s.session.as_mut().unwrap();
        p.features = None;
        p.regions.clear();
        p.held_enables = vec![(1, 1)];
        for r in &mut p.rings {
            *r = Default::default();
        }
        let reqs = rebuild(p);
        use FrontendReq::*;
        // Held enables stay in the gate, which replays them after SET_FEATURES; rings without
        // anything set are left alone.
        assert_eq!(
            codes(&reqs),
            [
                GET_FEATURES,
                SET_OWNER,
                GET_PROTOCOL_FEATURES,
                SET_PROTOCOL_FEATURES,
                GET_FEATURES
            ]
        );
        assert!(stop(p).is_empty());
    }

    #[test]
    fn stopping_and_restarting_touch_the_running_rings_only() {
        let mut s = sample();
        let p = s.session.as_mut().unwrap();
        p.rings[0].started = false;
        p.rings[0].kick = None;
        let stops = stop(p);
        assert_eq!(stops.len(), 1);
        assert_eq!(stops[0].0, 1);
        assert_eq!(stops[0].1.request, FrontendReq::GET_VRING_BASE);
        assert!(stops[0].1.reply);
        use FrontendReq::*;
        assert_eq!(
            codes(&restart(p)),
            [
                SET_VRING_BASE,
                SET_VRING_ADDR,
                SET_VRING_CALL,
                SET_VRING_KICK,
                GET_FEATURES
            ]
        );
    }
}
