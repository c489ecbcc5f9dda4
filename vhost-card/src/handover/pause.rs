//! Pausing a running gate for a handover: the requests the gate sends the crate's handler on its
//! own (GET_VRING_BASE to stop each ring, GET_FEATURES as a barrier, and the restart), and how
//! their answers are told apart from the frontend's on the one socket both share.
//!
//! The handler answers in order, and of the requests the gate sends on its own only
//! GET_VRING_BASE and GET_FEATURES are answered. So the gate counts the frontend's requests of
//! those two kinds still unanswered ([`Inflight`]): an answer of that kind while none of the
//! frontend's is outstanding is the gate's own.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::eventfd::EventFd;

use super::record::Recorder;
use super::replay::{self, Request};
use crate::gate::{send_msg, Hdr};

/// How long the handler may take to answer the gate's own requests (it waits for a worker's
/// pass over a ring, a few microseconds to a millisecond).
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// The frontend's answered requests of the kinds the gate also sends, still unanswered.
#[derive(Debug, Default)]
pub struct Inflight {
    features: u32,
    vring_base: Vec<u32>,
}

fn ring_of(body: &[u8]) -> Option<usize> {
    body.get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

impl Inflight {
    pub fn new(num_rings: usize) -> Self {
        Inflight {
            features: 0,
            vring_base: vec![0; num_rings],
        }
    }

    /// Counts a request forwarded for the frontend.
    pub fn forwarded(&mut self, request: u32, body: &[u8]) {
        if request == FrontendReq::GET_FEATURES as u32 {
            self.features += 1;
        } else if request == FrontendReq::GET_VRING_BASE as u32 {
            if let Some(n) = ring_of(body).and_then(|i| self.vring_base.get_mut(i)) {
                *n += 1;
            }
        }
    }

    /// Whether an answer from the handler is for the gate's own request; an answer for the
    /// frontend is counted off.
    pub fn is_own(&mut self, request: u32, body: &[u8]) -> bool {
        let n = if request == FrontendReq::GET_FEATURES as u32 {
            &mut self.features
        } else if request == FrontendReq::GET_VRING_BASE as u32 {
            match ring_of(body).and_then(|i| self.vring_base.get_mut(i)) {
                Some(n) => n,
                None => return false,
            }
        } else {
            return false;
        };
        if *n == 0 {
            return true;
        }
        *n -= 1;
        false
    }
}

/// Sends the gate's own requests and waits for their answers, which the reply thread passes on
/// through `answers`.
fn exchange(
    backend: &UnixStream,
    reqs: &[Request],
    fds: &[RawFd],
    answers: &Receiver<(u32, Vec<u8>)>,
) -> Result<Vec<Vec<u8>>, String> {
    let mut got = Vec::new();
    for r in reqs {
        let raw: Vec<RawFd> = r.fds.iter().filter_map(|&i| fds.get(i).copied()).collect();
        if raw.len() != r.fds.len() {
            return Err(format!(
                "{:?} names a descriptor the record lacks",
                r.request
            ));
        }
        let hdr = Hdr {
            request: r.request as u32,
            flags: 0x1,
            size: r.body.len() as u32,
        };
        send_msg(backend, &hdr, &r.body, &raw)
            .map_err(|e| format!("sending {:?} to the handler: {e}", r.request))?;
    }
    for r in reqs.iter().filter(|r| r.reply) {
        match answers.recv_timeout(ANSWER_WITHIN) {
            Ok((req, body)) if req == r.request as u32 => got.push(body),
            Ok((req, _)) => {
                return Err(format!("answer to request {req}, expected {:?}", r.request))
            }
            Err(_) => {
                return Err(format!(
                    "no answer to {:?}: the handler ended the session",
                    r.request
                ))
            }
        }
    }
    Ok(got)
}

/// Waits until the handler has taken every request forwarded before (it answers in order):
/// one GET_FEATURES of the gate's own.
pub fn barrier(backend: &UnixStream, answers: &Receiver<(u32, Vec<u8>)>) -> Result<(), String> {
    exchange(backend, &[replay::barrier()], &[], answers).map(|_| ())
}

/// Stops every started ring (the stop point, see `docs/handover.md`) and records where each
/// stopped; the final GET_FEATURES answer means every request forwarded before is answered.
pub fn stop(
    record: &mut Recorder,
    backend: &UnixStream,
    answers: &Receiver<(u32, Vec<u8>)>,
) -> Result<(), String> {
    let (state, _) = record.export(0);
    let stops = replay::stop(&state);
    let mut reqs: Vec<Request> = stops.iter().map(|(_, r)| r.clone()).collect();
    reqs.push(replay::barrier());
    let got = exchange(backend, &reqs, &[], answers)?;
    for ((ring, _), body) in stops.iter().zip(&got) {
        // VhostUserVringState: index, num.
        let base = body
            .get(4..8)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or("short GET_VRING_BASE answer")?;
        record.stopped_at(*ring, base as u16);
        // The handler dropped its kick and call; the record keeps its own for the restart.
    }
    Ok(())
}

/// Starts again the rings [`stop`] stopped, from where they stopped.
pub fn restart(
    record: &Recorder,
    backend: &UnixStream,
    answers: &Receiver<(u32, Vec<u8>)>,
) -> Result<(), String> {
    let (state, fds) = record.export(0);
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    exchange(backend, &replay::restart(&state), &raw, answers).map(|_| ())
}

/// The record's descriptors as owned duplicates, numbered from `first`, for a handover.
pub fn export_owned(
    record: &Recorder,
    first: usize,
) -> std::io::Result<(super::state::ProtocolState, Vec<OwnedFd>)> {
    let (state, fds) = record.export(first);
    let owned = fds
        .iter()
        .map(|f| f.try_clone_to_owned())
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok((state, owned))
}

/// A paused gate's session: the record with the rings stopped and duplicates of its
/// descriptors (numbered from 0: regions, then kick, call, err of each ring). Tell the gate what
/// next with [`Paused::restart`] or [`Paused::detach`]; dropping it restarts.
pub struct Paused {
    pub state: super::state::ProtocolState,
    pub fds: Vec<OwnedFd>,
    resume: Sender<Resume>,
    detached: Arc<AtomicBool>,
}

impl Paused {
    /// The handover failed: the gate starts the rings again from where they stopped and goes
    /// on relaying.
    pub fn restart(self) {
        let _ = self.resume.send(Resume::Restart);
    }

    /// The session moved to another process: the gate's request thread ends without closing
    /// the frontend's connection (the new process serves it), and the gate never closes it.
    pub fn detach(self) {
        // Set here, before the gate can be shut down, not when the request thread gets to it.
        self.detached.store(true, Ordering::SeqCst);
        let _ = self.resume.send(Resume::Detach);
    }
}

pub(crate) enum Resume {
    Restart,
    Detach,
}

/// What the handover asks of a running gate.
pub(crate) struct PauseRequest(pub Sender<Result<Paused, String>>);

/// The handover's link into a gate's request thread.
pub(crate) struct Link {
    /// Written to wake the request thread between two requests.
    pub wake: EventFd,
    pub requests: Receiver<PauseRequest>,
    /// The answers to the gate's own requests, passed on by the reply thread.
    pub answers: Receiver<(u32, Vec<u8>)>,
    pub inflight: Arc<Mutex<Inflight>>,
    pub detached: Arc<AtomicBool>,
}

/// What the request thread does once woken: `Ok(true)` when the session was detached.
pub(crate) fn serve(
    link: &Link,
    record: &mut Recorder,
    backend: &UnixStream,
) -> Result<bool, String> {
    let _ = link.wake.read();
    let Ok(PauseRequest(reply)) = link.requests.try_recv() else {
        return Ok(false);
    };
    if let Some(why) = record.state().logging() {
        // Refused before anything stops: the session goes on as it was.
        let _ = reply.send(Err(format!("cannot hand over now: {why}")));
        return Ok(false);
    }
    if let Err(why) = stop(record, backend, &link.answers) {
        // Some rings may be stopped and where they stopped unknown: the session cannot go on.
        let _ = reply.send(Err(why.clone()));
        return Err(why);
    }
    let (resume, next) = mpsc::channel();
    match export_owned(record, 0) {
        Ok((state, fds)) => {
            let detached = link.detached.clone();
            let _ = reply.send(Ok(Paused {
                state,
                fds,
                resume,
                detached,
            }));
        }
        Err(e) => {
            let _ = reply.send(Err(format!("duplicating the session's descriptors: {e}")));
        }
    }
    match next.recv() {
        Ok(Resume::Detach) => Ok(true),
        Ok(Resume::Restart) | Err(_) => restart(record, backend, &link.answers).map(|()| false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gates_answers_are_told_from_the_frontends() {
        let mut f = Inflight::new(2);
        let ring1 = [1, 0, 0, 0, 0, 0, 0, 0];
        let gf = FrontendReq::GET_FEATURES as u32;
        let gb = FrontendReq::GET_VRING_BASE as u32;
        f.forwarded(gf, &[]);
        f.forwarded(gb, &ring1);
        // The frontend's come first (the handler answers in order), then the gate's.
        assert!(!f.is_own(gf, &[]));
        assert!(!f.is_own(gb, &ring1));
        assert!(f.is_own(gb, &ring1));
        assert!(f.is_own(gf, &[]));
        // Other answers always go to the frontend; a ring out of range is not the gate's.
        assert!(!f.is_own(FrontendReq::GET_PROTOCOL_FEATURES as u32, &[]));
        assert!(!f.is_own(gb, &[9, 0, 0, 0]));
    }
}
