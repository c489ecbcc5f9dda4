//! The protocol gate: a thin relay between the frontend (QEMU) and the `vhost` crate's request
//! handler that answers the two requests QEMU sends before the crate is ready for them.
//!
//! QEMU 7.2 and later send `VHOST_USER_SET_VRING_ENABLE` (for every queue) and
//! `VHOST_USER_NET_SET_MTU` while realizing the device, before `VHOST_USER_SET_FEATURES`. The
//! vhost-user spec lets them: PROTOCOL_FEATURES was offered and the protocol features were set.
//! The `vhost` crate's `BackendReqHandler` (0.18) rejects SET_VRING_ENABLE until
//! PROTOCOL_FEATURES is acked and has no handler for NET_SET_MTU; either error ends the session.
//!
//! The gate reads each message (header, body and attached file descriptors) and forwards it
//! unchanged, except:
//! * `NET_SET_MTU`: checked against the card's MTU and answered here (REPLY_ACK when asked).
//! * `SET_VRING_ENABLE` before PROTOCOL_FEATURES is acked: remembered, acked when asked, and
//!   replayed to the crate right after a `SET_FEATURES` that acks PROTOCOL_FEATURES, so the
//!   rings end up in the state the frontend asked for.
//!
//! Replies from the crate are relayed back unchanged. Cost: one thread and one socket hop per
//! control message; the data path (rings, kicks, calls) never passes through here.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{debug, info, warn};
use thiserror::Error;
use vhost::vhost_user::message::{FrontendReq, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::features::VHOST_USER_F_PROTOCOL_FEATURES;
use crate::handover::fdstore::Ledger;
use crate::handover::pause::{self, Inflight, Link, PauseRequest, Paused};
use crate::handover::record::Recorder;
use crate::migrate::{Migration, Negotiation, RarpHook, Verdict};

const HDR_SIZE: usize = 12;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

#[derive(Debug, Error)]
pub enum GateError {
    #[error("vhost-user message of {0} bytes exceeds the protocol's limit")]
    TooBig(u32),
    #[error("vhost-user socket: {0}")]
    Io(#[from] io::Error),
    #[error("bad memory table: {0}")]
    BadMemTable(&'static str),
    #[error("handover: {0}")]
    Handover(String),
    #[error("the protocol handler did not answer the gate: {0}")]
    Barrier(String),
    #[error("refused a request the frontend cannot be told about (no REPLY_ACK): {0}")]
    Refused(&'static str),
}

/// Most regions one SET_MEM_TABLE may carry (QEMU's VHOST_MEMORY_BASELINE_NREGIONS).
pub const MAX_MEM_REGIONS: usize = 8;

/// One region of a SET_MEM_TABLE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    pub mmap_offset: u64,
}

/// Parses and checks a SET_MEM_TABLE body: a region count, padding, then 32 bytes per region.
/// Refuses empty or overlapping regions, sizes that wrap, and offsets mmap cannot take.
pub fn parse_mem_table(body: &[u8]) -> Result<Vec<MemRegion>, &'static str> {
    let word = |i: usize| -> Option<u64> {
        body.get(i..i + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let n = body
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as usize)
        .ok_or("short body")?;
    if n == 0 || n > MAX_MEM_REGIONS {
        return Err("region count out of range");
    }
    if body.len() != 8 + 32 * n {
        return Err("body size does not match the region count");
    }
    let mut regions = Vec::with_capacity(n);
    for i in 0..n {
        let at = 8 + 32 * i;
        let r = MemRegion {
            guest_phys_addr: word(at).ok_or("short body")?,
            memory_size: word(at + 8).ok_or("short body")?,
            userspace_addr: word(at + 16).ok_or("short body")?,
            mmap_offset: word(at + 24).ok_or("short body")?,
        };
        if r.memory_size == 0 {
            return Err("zero-sized region");
        }
        if r.mmap_offset % 4096 != 0 {
            return Err("mmap offset not page aligned");
        }
        if r.guest_phys_addr.checked_add(r.memory_size).is_none()
            || r.userspace_addr.checked_add(r.memory_size).is_none()
            || r.mmap_offset.checked_add(r.memory_size).is_none()
        {
            return Err("region wraps around the address space");
        }
        regions.push(r);
    }
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            let overlap = a.guest_phys_addr < b.guest_phys_addr + b.memory_size
                && b.guest_phys_addr < a.guest_phys_addr + a.memory_size;
            if overlap {
                return Err("regions overlap in guest memory");
            }
        }
    }
    Ok(regions)
}

/// Checks a SET_MEM_TABLE request with its descriptors: one descriptor per region, each file
/// long enough for its mapping (a mapping past the end of a file would fault with SIGBUS on
/// first touch).
pub fn check_mem_table(body: &[u8], fds: &[OwnedFd]) -> Result<(), &'static str> {
    let regions = parse_mem_table(body)?;
    if regions.len() != fds.len() {
        return Err("not one file descriptor per region");
    }
    for (r, fd) in regions.iter().zip(fds) {
        // SAFETY: fstat on a descriptor we own, into a zeroed stat buffer we own.
        let size = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
                return Err("cannot stat a region's file");
            }
            st.st_size
        };
        let size = u64::try_from(size).unwrap_or(0);
        if r.mmap_offset + r.memory_size > size {
            return Err("region extends past the end of its file");
        }
    }
    // Accepted: make the files unable to shrink where they allow it (see `memguard`).
    for fd in fds {
        if crate::memguard::seal_shrink(fd.as_fd()) == crate::memguard::Seal::Unsealable {
            debug!("a guest memory file cannot be sealed; the SIGBUS guard covers it");
        }
    }
    Ok(())
}

/// A vhost-user message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hdr {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

impl Hdr {
    fn decode(b: &[u8; HDR_SIZE]) -> Self {
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Hdr {
            request: w(0),
            flags: w(4),
            size: w(8),
        }
    }

    fn encode(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }
}

/// The body and file descriptors of one message, reused from message to message.
#[derive(Debug, Default)]
pub struct Msg {
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Reads one message into `msg` and returns its header; `Ok(None)` on a clean end of stream
/// before a header.
pub fn recv_msg(sock: &UnixStream, msg: &mut Msg) -> Result<Option<Hdr>, GateError> {
    let mut hdr = [0u8; HDR_SIZE];
    let mut raw_fds = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR_SIZE,
    }];
    msg.fds.clear();
    // SAFETY: the iovec points to `hdr`, which is writable and outlives the call.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    for &fd in &raw_fds[..nfds] {
        // SAFETY: recvmsg just gave us these descriptors; nothing else owns them.
        msg.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    if n == 0 {
        return Ok(None);
    }
    (&*sock).read_exact(&mut hdr[n..])?;
    let h = Hdr::decode(&hdr);
    if h.size as usize > MAX_MSG_SIZE {
        return Err(GateError::TooBig(h.size));
    }
    msg.body.resize(h.size as usize, 0);
    (&*sock).read_exact(&mut msg.body)?;
    Ok(Some(h))
}

/// Sends one message with its descriptors.
pub fn send_msg(sock: &UnixStream, hdr: &Hdr, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let h = hdr.encode();
    let mut bytes = Vec::with_capacity(HDR_SIZE + body.len());
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(body);
    let n = sock
        .send_with_fds(&[&bytes[..]], fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    (&*sock).write_all(&bytes[n..])
}

/// The little-endian u32 at `at` in a message body, if the body is that long.
pub(crate) fn le_u32(body: &[u8], at: usize) -> Option<u32> {
    body.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The little-endian u64 at `at` in a message body, if the body is that long.
pub(crate) fn le_u64(body: &[u8], at: usize) -> Option<u64> {
    let b: [u8; 8] = body.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

/// What the gate knows of the card.
#[derive(Debug, Clone, Copy)]
pub struct GateConfig {
    pub mtu: u16,
    pub num_queues: u32,
    /// Largest ring size the card takes (the size of a ring the frontend did not size).
    pub queue_size: u32,
}

/// What the gate tells the backend.
pub struct Hooks {
    /// Whether each queue pair is in use, after every change of ring state.
    pub pair: PairHook,
    /// `SEND_RARP`: announce a guest MAC into the card's network.
    pub rarp: RarpHook,
    /// After each request the gate took (forwarded or answered with success), with the record
    /// it changed: the fd store keeps a crash-proof copy (`handover::fdstore`).
    pub record: Option<RecordHook>,
    /// Counts the answers the frontend is owed, for the fd store (`fdstore::Ledger`).
    pub ledger: Option<Arc<Ledger>>,
    /// After the handler took a started ring's new call eventfd (`SET_VRING_CALL`): the
    /// ring's index and the descriptor (see `CardBackend::call_installed`).
    pub call: Option<CallHook>,
}

/// Told of a started ring's new call eventfd, once the handler holds it.
pub type CallHook = Box<dyn Fn(usize, RawFd) + Send>;

/// Told of each request taken, with the gate's record after it.
pub type RecordHook = Box<dyn FnMut(&Hdr, &[u8], &Recorder) + Send>;

/// A running gate.
pub struct Gate {
    frontend: UnixStream,
    backend: UnixStream,
    threads: Vec<JoinHandle<()>>,
    /// Pause requests for a handover, and the eventfd that wakes the request thread for them.
    pauses: Sender<PauseRequest>,
    wake: EventFd,
    /// Set once the session moved to another process: the frontend's connection is then never
    /// shut down from here.
    detached: Arc<AtomicBool>,
}

impl Gate {
    /// Starts relaying between `frontend` and `backend` (the crate's end).
    pub fn start(
        frontend: UnixStream,
        backend: UnixStream,
        cfg: GateConfig,
        hooks: Hooks,
    ) -> io::Result<Gate> {
        Self::start_from(frontend, backend, cfg, hooks, ReqState::new(cfg), false)
    }

    /// Starts relaying for a session taken over from another process, whose handler was rebuilt
    /// from `record` (`handover::replay::rebuild`); the hook learns the pairs in use at once.
    pub fn resume(
        frontend: UnixStream,
        backend: UnixStream,
        cfg: GateConfig,
        hooks: Hooks,
        record: Recorder,
    ) -> io::Result<Gate> {
        Self::start_from(
            frontend,
            backend,
            cfg,
            hooks,
            ReqState::restored(cfg, record),
            true,
        )
    }

    fn start_from(
        frontend: UnixStream,
        backend: UnixStream,
        cfg: GateConfig,
        hooks: Hooks,
        mut st: ReqState,
        resumed: bool,
    ) -> io::Result<Gate> {
        st.on_pair = Some(hooks.pair);
        st.on_record = hooks.record;
        st.on_call = hooks.call;
        st.ledger = hooks.ledger.clone();
        let ledger = hooks.ledger;
        st.migration.set_rarp(hooks.rarp);
        if resumed {
            // Before this returns: the pairs in use are known when the caller goes on.
            st.sync_pairs();
        }
        let f_writer = Arc::new(Mutex::new(frontend.try_clone()?));
        let detached = Arc::new(AtomicBool::new(false));
        let closer = || -> io::Result<_> {
            let f = frontend.try_clone()?;
            let b = backend.try_clone()?;
            let detached = detached.clone();
            Ok(move || {
                if !detached.load(Ordering::SeqCst) {
                    let _ = f.shutdown(Shutdown::Both);
                }
                let _ = b.shutdown(Shutdown::Both);
            })
        };
        let (pauses, requests) = mpsc::channel();
        let (answers_tx, answers) = mpsc::channel();
        let inflight = Arc::new(Mutex::new(Inflight::new(cfg.num_queues as usize)));
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let link = Link {
            wake: wake.try_clone()?,
            requests,
            answers,
            inflight: inflight.clone(),
            detached: detached.clone(),
        };
        let (down, down2) = (closer()?, closer()?);
        let (f_in, b_out) = (frontend.try_clone()?, backend.try_clone()?);
        let writer = f_writer.clone();
        let requests = std::thread::Builder::new()
            .name("vhost-gate-req".into())
            .spawn(move || {
                st.link = Some(link);
                if let Err(e) = st.run(&f_in, &b_out, &writer) {
                    debug!("gate: frontend side ended: {e}");
                }
                down();
            })?;
        let (b_in, writer) = (backend.try_clone()?, f_writer);
        let replies = std::thread::Builder::new()
            .name("vhost-gate-rep".into())
            .spawn(move || {
                let mut msg = Msg::default();
                while let Ok(Some(hdr)) = recv_msg(&b_in, &mut msg) {
                    let own = inflight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_own(hdr.request, &msg.body);
                    if own {
                        let _ = answers_tx.send((hdr.request, std::mem::take(&mut msg.body)));
                        continue;
                    }
                    let fds: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
                    let w = writer.lock().unwrap_or_else(|p| p.into_inner());
                    if send_msg(&w, &hdr, &msg.body, &fds).is_err() {
                        break;
                    }
                    if let Some(l) = &ledger {
                        l.answered();
                    }
                }
                down2();
            })?;
        Ok(Gate {
            frontend,
            backend,
            threads: vec![requests, replies],
            pauses,
            wake,
            detached,
        })
    }

    /// Pauses the gate between two requests for a handover: the rings are stopped, every request
    /// forwarded so far is answered, and the session comes back with duplicates of its
    /// descriptors (`docs/handover.md`, the stop point).
    pub fn pause(&self, within: std::time::Duration) -> Result<Paused, String> {
        self.pauser().map_err(|e| e.to_string())?.pause(within)
    }

    /// A handle that pauses this gate from another thread (the control socket's).
    pub fn pauser(&self) -> io::Result<Pauser> {
        Ok(Pauser {
            pauses: self.pauses.clone(),
            wake: self.wake.try_clone()?,
        })
    }

    /// Closes both sides (the frontend's only if the session was not handed over); the relay
    /// threads end.
    pub fn shutdown(&self) {
        if !self.detached.load(Ordering::SeqCst) {
            let _ = self.frontend.shutdown(Shutdown::Both);
        }
        let _ = self.backend.shutdown(Shutdown::Both);
    }

    /// A handle that can close the frontend connection from another thread.
    pub fn frontend_handle(&self) -> io::Result<UnixStream> {
        self.frontend.try_clone()
    }

    pub fn join(mut self) {
        self.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Pauses a gate from another thread ([`Gate::pause`]); a gate that ended answers that the
/// session has ended.
pub struct Pauser {
    pauses: Sender<PauseRequest>,
    wake: EventFd,
}

impl Pauser {
    /// As [`Gate::pause`].
    pub fn pause(&self, within: std::time::Duration) -> Result<Paused, String> {
        let (tx, rx) = mpsc::channel();
        self.pauses
            .send(PauseRequest(tx))
            .map_err(|_| "the session has ended".to_string())?;
        self.wake.write(1).map_err(|e| e.to_string())?;
        rx.recv_timeout(within)
            .map_err(|_| "the gate did not pause".to_string())?
    }
}

/// Told, after every change of ring state, whether each queue pair is in use (its RX ring
/// started and enabled); repeats of the same state are the hook's to ignore.
pub type PairHook = Box<dyn Fn(usize, bool) + Send>;

struct ReqState {
    cfg: GateConfig,
    acked_features: u64,
    acked_protocol: u64,
    /// SET_VRING_ENABLE requests held back until PROTOCOL_FEATURES is acked: (index, enable).
    pending: Vec<(u32, u32)>,
    /// Each ring's enabled state as the frontend set it (rings start disabled when
    /// PROTOCOL_FEATURES is acked).
    enabled: Vec<bool>,
    /// Each ring started: given a kick (`SET_VRING_KICK`) and not stopped since
    /// (`GET_VRING_BASE`).
    started: Vec<bool>,
    on_pair: Option<PairHook>,
    on_record: Option<RecordHook>,
    on_call: Option<CallHook>,
    ledger: Option<Arc<Ledger>>,
    /// The session as the handler holds it, for a handover (`handover::record`).
    record: Recorder,
    /// Pause requests for a handover (none in `screen_stream`).
    link: Option<Link>,
    /// Live migration's requests (dirty log, announcement).
    migration: Migration,
}

impl ReqState {
    fn new(cfg: GateConfig) -> Self {
        ReqState {
            cfg,
            acked_features: 0,
            acked_protocol: 0,
            pending: Vec::new(),
            enabled: vec![false; cfg.num_queues as usize],
            started: vec![false; cfg.num_queues as usize],
            on_pair: None,
            on_record: None,
            on_call: None,
            ledger: None,
            record: Recorder::new(cfg.num_queues as usize),
            link: None,
            migration: Migration::new(cfg.num_queues, cfg.queue_size, None),
        }
    }

    /// The gate's state for a session taken over from another process: what was acked, the
    /// held enables and each ring's state, from the record.
    fn restored(cfg: GateConfig, record: Recorder) -> Self {
        let mut st = ReqState::new(cfg);
        let p = record.state();
        st.acked_features = p.features.unwrap_or(0);
        st.acked_protocol = p.protocol_features.unwrap_or(0);
        st.pending = p.held_enables.clone();
        for (i, r) in p.rings.iter().enumerate().take(cfg.num_queues as usize) {
            st.enabled[i] = r.enabled;
            st.started[i] = r.started;
        }
        let rings: Vec<_> = p
            .rings
            .iter()
            .map(|r| (r.num, r.addr.map(|a| [a.desc, a.used, a.avail])))
            .collect();
        st.migration
            .resume(p.regions.iter().map(|r| r.region()).collect(), &rings);
        st.record = record;
        st
    }

    /// Tells the hook whether each queue pair is in use: its RX ring (the even index) both
    /// started and enabled. A frontend that never sets up a pair (fewer vCPUs, no MQ) leaves
    /// it unused whether or not it enables the rings. The hook acts on changes only.
    fn sync_pairs(&self) {
        if let Some(hook) = &self.on_pair {
            let rx = self.enabled.iter().zip(&self.started).step_by(2);
            for (pair, (enabled, started)) in rx.enumerate() {
                hook(pair, *enabled && *started);
            }
        }
    }

    fn ring_enabled(&mut self, index: u32, enabled: bool) {
        if let Some(e) = self.enabled.get_mut(index as usize) {
            *e = enabled;
        }
    }

    fn ring_started(&mut self, index: u32, started: bool) {
        if let Some(s) = self.started.get_mut(index as usize) {
            *s = started;
        }
    }

    fn protocol_acked(&self) -> bool {
        self.acked_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES) != 0
    }

    fn run(
        &mut self,
        frontend: &UnixStream,
        backend: &UnixStream,
        writer: &Mutex<UnixStream>,
    ) -> Result<(), GateError> {
        let mut msg = Msg::default();
        loop {
            if let Some(link) = &self.link {
                // Between two requests: a handover may pause the gate here.
                let woke =
                    crate::poll::readable_or_stop(frontend.as_raw_fd(), link.wake.as_raw_fd())?;
                if woke == crate::poll::Woke::Stop {
                    match pause::serve(link, &mut self.record, backend) {
                        Ok(true) => return Ok(()),
                        Ok(false) => continue,
                        Err(why) => return Err(GateError::Handover(why)),
                    }
                }
            }
            let Some(hdr) = recv_msg(frontend, &mut msg)? else {
                break;
            };
            let neg = Negotiation {
                features: self.acked_features,
                protocol: self.acked_protocol,
            };
            let screened =
                self.migration
                    .request(hdr.request, &msg.body, &mut msg.fds, neg, &self.started);
            let action = if let Some(verdict) = screened {
                match verdict {
                    Verdict::Forward => self.filter(&hdr, &msg.body),
                    Verdict::Answer(v) => Action::Answer(v),
                    Verdict::LogReply(ok) => Action::LogReply(ok),
                    Verdict::Refuse(_) if self.can_reply(&hdr) => Action::Answer(1),
                    Verdict::Refuse(why) => return Err(GateError::Refused(why)),
                }
            } else if hdr.request == FrontendReq::SET_MEM_TABLE as u32 {
                match check_mem_table(&msg.body, &msg.fds) {
                    Ok(()) => {
                        if let Ok(regions) = parse_mem_table(&msg.body) {
                            self.migration.mem_table(regions);
                        }
                        Action::Forward
                    }
                    Err(why) => {
                        warn!("refused SET_MEM_TABLE: {why}");
                        if !self.can_reply(&hdr) {
                            // The frontend expects no answer: end the session rather than let
                            // it believe the memory was set.
                            return Err(GateError::BadMemTable(why));
                        }
                        Action::Answer(1)
                    }
                }
            } else {
                if hdr.request == FrontendReq::SET_VRING_KICK as u32 {
                    msg.fds.iter().for_each(set_nonblocking);
                }
                self.filter(&hdr, &msg.body)
            };
            // Taken: forwarded, or answered with success here. Recorded for a handover, and
            // kept (the fd store) before the handler or the frontend sees it: a crash in between
            // leaves a record one request ahead, which a rebuild applies as the frontend meant.
            let taken = matches!(action, Action::Forward | Action::Answer(0));
            if taken {
                self.record.observe(&hdr, &msg.body, &msg.fds);
                if let Some(hook) = &mut self.on_record {
                    hook(&hdr, &msg.body, &self.record);
                }
            }
            match action {
                Action::Forward => {
                    let fds: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
                    if let Some(link) = &self.link {
                        // Counted before it is sent: its answer may come back at once.
                        let mut inflight = link.inflight.lock().unwrap_or_else(|p| p.into_inner());
                        inflight.forwarded(hdr.request, &msg.body);
                    }
                    if let Some(l) = self.ledger.as_ref().filter(|_| self.answered(&hdr)) {
                        l.owe();
                    }
                    send_msg(backend, &hdr, &msg.body, &fds)?;
                    self.track_rings(&hdr, &msg.body);
                    if hdr.request == FrontendReq::SET_VRING_CALL as u32 {
                        self.call_set(&msg.body, &msg.fds, backend)?;
                    }
                }
                Action::Answer(value) => {
                    if self.can_reply(&hdr) {
                        reply_u64(writer, &hdr, value)?;
                    }
                }
                Action::LogReply(ok) => {
                    // The log description back, or a zero-sized one (see `migrate`).
                    let body = if ok { msg.body.clone() } else { vec![0u8; 16] };
                    let reply = Hdr {
                        request: hdr.request,
                        flags: FLAG_VERSION | FLAG_REPLY,
                        size: body.len() as u32,
                    };
                    let w = writer.lock().unwrap_or_else(|p| p.into_inner());
                    send_msg(&w, &reply, &body, &[])?;
                }
            }
            if hdr.request == FrontendReq::SET_FEATURES as u32 && matches!(action, Action::Forward)
            {
                self.after_set_features(backend)?;
            }
        }
        Ok(())
    }

    /// Whether the handler answers this request (vhost-user: the requests with a reply, and any
    /// other with NEED_REPLY once REPLY_ACK is acked).
    fn answered(&self, hdr: &Hdr) -> bool {
        use FrontendReq as R;
        const WITH_REPLY: [FrontendReq; 12] = [
            R::GET_FEATURES,
            R::GET_PROTOCOL_FEATURES,
            R::GET_VRING_BASE,
            R::GET_QUEUE_NUM,
            R::GET_CONFIG,
            R::GET_INFLIGHT_FD,
            R::GET_MAX_MEM_SLOTS,
            R::GET_SHARED_OBJECT,
            R::CHECK_DEVICE_STATE,
            R::POSTCOPY_ADVISE,
            R::SET_LOG_BASE,
            R::SET_DEVICE_STATE_FD,
        ];
        WITH_REPLY.iter().any(|&r| r as u32 == hdr.request) || self.can_reply(hdr)
    }

    /// Whether the frontend asked for a REPLY_ACK on this request and may get one.
    fn can_reply(&self, hdr: &Hdr) -> bool {
        hdr.flags & FLAG_NEED_REPLY != 0 && self.acked_protocol & PROTOCOL_F_REPLY_ACK != 0
    }

    /// Decides what to do with one request from the frontend.
    fn filter(&mut self, hdr: &Hdr, body: &[u8]) -> Action {
        let u64_body = || {
            body.get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        };
        match hdr.request {
            r if r == FrontendReq::SET_FEATURES as u32 => {
                if let Some(v) = u64_body() {
                    self.acked_features = v;
                }
                Action::Forward
            }
            r if r == FrontendReq::SET_PROTOCOL_FEATURES as u32 => {
                if let Some(v) = u64_body() {
                    self.acked_protocol = v;
                }
                Action::Forward
            }
            r if r == FrontendReq::NET_SET_MTU as u32 => {
                let mtu = u64_body().unwrap_or(0);
                if (68..=u64::from(self.cfg.mtu)).contains(&mtu) {
                    info!("frontend set the host MTU to {mtu}");
                    Action::Answer(0)
                } else {
                    warn!(
                        "frontend asked for MTU {mtu}, outside 68..={} that the card serves; refused",
                        self.cfg.mtu
                    );
                    Action::Answer(1)
                }
            }
            r if r == FrontendReq::SET_VRING_ENABLE as u32 && !self.protocol_acked() => {
                let (Some(index), Some(num)) = (le_u32(body, 0), le_u32(body, 4)) else {
                    return Action::Answer(1);
                };
                if index >= self.cfg.num_queues || num > 1 {
                    return Action::Answer(1);
                }
                debug!("gate: holding SET_VRING_ENABLE({index}, {num}) until features are set");
                self.pending.retain(|&(i, _)| i != index);
                self.pending.push((index, num));
                Action::Answer(0)
            }
            _ => Action::Forward,
        }
    }

    /// Follows the ring state a forwarded request sets: SET_VRING_ENABLE (once PROTOCOL_FEATURES
    /// is acked; the crate refuses anything but 0 and 1), SET_VRING_KICK, which starts a ring,
    /// and GET_VRING_BASE, which stops it.
    fn track_rings(&mut self, hdr: &Hdr, body: &[u8]) {
        let word = |at: usize| le_u32(body, at);
        match hdr.request {
            r if r == FrontendReq::SET_VRING_ENABLE as u32 && self.protocol_acked() => {
                if let (Some(index), Some(num @ (0 | 1))) = (word(0), word(4)) {
                    self.ring_enabled(index, num == 1);
                }
            }
            // The index is the low byte of the u64 body (the rest are flags).
            r if r == FrontendReq::SET_VRING_KICK as u32 => {
                if let Some(w) = word(0) {
                    self.ring_started(w & 0xff, true);
                }
            }
            r if r == FrontendReq::GET_VRING_BASE as u32 => {
                if let Some(index) = word(0) {
                    self.ring_started(index, false);
                }
            }
            _ => return,
        }
        self.sync_pairs();
    }

    /// A started ring got a call eventfd. QEMU sends SET_VRING_CALL after SET_VRING_KICK, so a
    /// worker may have used buffers while the ring had none: once the handler holds the new
    /// one (a barrier: it answers in order), the hook sends the signal that was owed. A handler
    /// that does not answer ends the session, as in a handover's pause: its late answer would
    /// be taken for the next barrier's.
    fn call_set(
        &self,
        body: &[u8],
        fds: &[OwnedFd],
        backend: &UnixStream,
    ) -> Result<(), GateError> {
        let (Some(hook), Some(link), Some(word), [fd]) =
            (&self.on_call, &self.link, le_u32(body, 0), fds)
        else {
            return Ok(());
        };
        let ring = (word & 0xff) as usize;
        if !self.started.get(ring).copied().unwrap_or(false) {
            return Ok(());
        }
        pause::barrier(backend, &link.answers).map_err(|e| {
            warn!("gate: ring {ring}'s new call eventfd: {e}; ending the session");
            GateError::Barrier(format!("ring {ring}'s new call eventfd: {e}"))
        })?;
        hook(ring, fd.as_raw_fd());
        Ok(())
    }

    /// Replays held SET_VRING_ENABLE requests once PROTOCOL_FEATURES is acked.
    fn after_set_features(&mut self, backend: &UnixStream) -> Result<(), GateError> {
        if !self.protocol_acked() {
            // Without PROTOCOL_FEATURES every ring is enabled at SET_FEATURES; nothing to replay.
            self.pending.clear();
            self.enabled.iter_mut().for_each(|e| *e = true);
            self.sync_pairs();
            return Ok(());
        }
        // With it, rings keep their state, which the held requests now set.
        let pending = std::mem::take(&mut self.pending);
        for &(index, num) in &pending {
            self.ring_enabled(index, num == 1);
        }
        self.sync_pairs();
        for (index, num) in pending {
            let hdr = Hdr {
                request: FrontendReq::SET_VRING_ENABLE as u32,
                flags: FLAG_VERSION,
                size: 8,
            };
            let mut body = [0u8; 8];
            body[..4].copy_from_slice(&index.to_le_bytes());
            body[4..].copy_from_slice(&num.to_le_bytes());
            send_msg(backend, &hdr, &body, &[])?;
        }
        Ok(())
    }
}

/// Runs the gate's request loop over `input`, taken as the byte stream a frontend sends (no
/// descriptors), with what it sends to the protocol handler and to the frontend read and dropped:
/// the entry point of the `vhost_msg` fuzz target. Input beyond 64 KiB is ignored (it would only fill
/// socket buffers).
pub fn screen_stream(input: &[u8], cfg: GateConfig) -> Result<(), GateError> {
    let input = &input[..input.len().min(64 << 10)];
    let (frontend, mut frontend_peer) = UnixStream::pair()?;
    let (backend, backend_peer) = UnixStream::pair()?;
    let (writer, writer_peer) = UnixStream::pair()?;
    frontend_peer.write_all(input)?;
    drop(frontend_peer);
    // What the gate forwards and answers is read and dropped, as the crate's handler and the
    // frontend read it: with nobody reading, thousands of small messages fill the socket
    // buffers and the gate blocks in sendmsg for good.
    let drain = |mut peer: UnixStream| {
        std::thread::spawn(move || {
            let _ = io::copy(&mut peer, &mut io::sink());
        })
    };
    let drains = [drain(backend_peer), drain(writer_peer)];
    let writer = Mutex::new(writer);
    let result = ReqState::new(cfg).run(&frontend, &backend, &writer);
    drop((backend, writer));
    for d in drains {
        let _ = d.join();
    }
    result
}

/// Puts a kick descriptor in non-blocking mode. The card reads it only after epoll said it is
/// readable, but a frontend that drains it in between would leave a blocking read hanging the
/// queue pair's worker. The frontend only writes kicks, so this changes nothing on its side
/// (QEMU's and DPDK's are non-blocking already).
fn set_nonblocking(fd: &OwnedFd) {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL touch only its status flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

enum Action {
    Forward,
    /// Answer here with this REPLY_ACK value (0 is success) when the frontend asked for one.
    Answer(u64),
    /// SET_LOG_BASE's own reply: whether the log is in place (see `migrate`).
    LogReply(bool),
}

/// Sends the frontend a reply to `req` carrying one u64.
fn reply_u64(writer: &Mutex<UnixStream>, req: &Hdr, value: u64) -> io::Result<()> {
    let reply = Hdr {
        request: req.request,
        flags: FLAG_VERSION | FLAG_REPLY,
        size: 8,
    };
    let w = writer.lock().unwrap_or_else(|p| p.into_inner());
    send_msg(&w, &reply, &value.to_le_bytes(), &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GateConfig {
        GateConfig {
            mtu: 65520,
            num_queues: 2,
            queue_size: 256,
        }
    }

    fn hdr(req: FrontendReq) -> Hdr {
        Hdr {
            request: req as u32,
            flags: FLAG_VERSION | FLAG_NEED_REPLY,
            size: 8,
        }
    }

    #[test]
    fn early_enable_is_held_and_mtu_is_answered() {
        let mut st = ReqState::new(cfg());
        let body = [1, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            st.filter(&hdr(FrontendReq::SET_VRING_ENABLE), &body),
            Action::Answer(0)
        ));
        assert_eq!(st.pending, vec![(1, 0)]);
        let mtu = 65520u64.to_le_bytes();
        assert!(matches!(
            st.filter(&hdr(FrontendReq::NET_SET_MTU), &mtu),
            Action::Answer(0)
        ));
        let mtu = 65535u64.to_le_bytes();
        assert!(matches!(
            st.filter(&hdr(FrontendReq::NET_SET_MTU), &mtu),
            Action::Answer(1)
        ));
        let bad = [9, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            st.filter(&hdr(FrontendReq::SET_VRING_ENABLE), &bad),
            Action::Answer(1)
        ));
        let feats = (1u64 << 30 | 1 << 32).to_le_bytes();
        assert!(matches!(
            st.filter(&hdr(FrontendReq::SET_FEATURES), &feats),
            Action::Forward
        ));
        // Once PROTOCOL_FEATURES is acked the crate handles SET_VRING_ENABLE itself.
        assert!(matches!(
            st.filter(&hdr(FrontendReq::SET_VRING_ENABLE), &body),
            Action::Forward
        ));
    }

    fn table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
        let mut b = (regions.len() as u32).to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        for &(g, s, u, o) in regions {
            for v in [g, s, u, o] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    #[test]
    fn memory_tables_are_checked() {
        let mib = 1u64 << 20;
        assert_eq!(
            parse_mem_table(&table(&[(0, mib, 0x1000_0000, 0)]))
                .unwrap()
                .len(),
            1
        );
        let good = table(&[(0, mib, 0x1000_0000, 0), (mib, mib, 0x2000_0000, mib)]);
        assert!(parse_mem_table(&good).is_ok());
        for (bad, why) in [
            (table(&[]), "region count out of range"),
            (table(&[(0, 0, 0, 0)]), "zero-sized region"),
            (table(&[(0, mib, 0, 16)]), "mmap offset not page aligned"),
            (
                table(&[(u64::MAX - 10, mib, 0, 0)]),
                "region wraps around the address space",
            ),
            (
                table(&[(0, mib, 0, 0), (mib / 2, mib, 0, 0)]),
                "regions overlap in guest memory",
            ),
            (
                good[..good.len() - 1].to_vec(),
                "body size does not match the region count",
            ),
            (vec![1, 0], "short body"),
        ] {
            assert_eq!(parse_mem_table(&bad), Err(why));
        }
        // A file shorter than its mapping is refused.
        let f = std::fs::File::open("/dev/null").unwrap();
        let fds = vec![OwnedFd::from(f)];
        assert_eq!(
            check_mem_table(&table(&[(0, mib, 0, 0)]), &fds),
            Err("region extends past the end of its file")
        );
        assert_eq!(
            check_mem_table(&table(&[(0, mib, 0, 0)]), &[]),
            Err("not one file descriptor per region")
        );
    }

    /// One request as bytes on the wire.
    fn msg(req: FrontendReq, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Hdr {
            request: req as u32,
            flags,
            size: body.len() as u32,
        }
        .encode()
        .to_vec();
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn screen_stream_runs_a_qemu_sequence_and_garbage() {
        let mut s = Vec::new();
        s.extend(msg(
            FrontendReq::SET_PROTOCOL_FEATURES,
            1,
            &(1u64 << 3).to_le_bytes(),
        ));
        s.extend(msg(
            FrontendReq::SET_VRING_ENABLE,
            9,
            &[0, 0, 0, 0, 1, 0, 0, 0],
        ));
        s.extend(msg(FrontendReq::NET_SET_MTU, 9, &1500u64.to_le_bytes()));
        s.extend(msg(FrontendReq::SET_MEM_TABLE, 9, &[0u8; 8]));
        s.extend(msg(
            FrontendReq::SET_FEATURES,
            1,
            &(1u64 << 30).to_le_bytes(),
        ));
        assert!(screen_stream(&s, cfg()).is_ok());
        // A truncated body and an oversized header end the stream with an error, not a panic.
        assert!(screen_stream(&s[..s.len() - 3], cfg()).is_err());
        let huge = Hdr {
            request: 1,
            flags: 1,
            size: u32::MAX,
        }
        .encode();
        assert!(screen_stream(&huge, cfg()).is_err());
    }

    /// 64 KiB of tiny requests, each forwarded or answered: more messages than the socket
    /// buffers hold, so screen_stream must read what the gate sends (it once blocked for good).
    #[test]
    fn screen_stream_survives_a_flood_of_small_requests() {
        let mut s = Vec::new();
        let set_reply_ack = Hdr {
            request: FrontendReq::SET_PROTOCOL_FEATURES as u32,
            flags: 1,
            size: 8,
        };
        s.extend(set_reply_ack.encode());
        s.extend((1u64 << 3).to_le_bytes());
        while s.len() + 40 < 64 << 10 {
            let get = Hdr {
                request: FrontendReq::GET_FEATURES as u32,
                flags: 1,
                size: 0,
            };
            s.extend(get.encode());
            let mtu = Hdr {
                request: FrontendReq::NET_SET_MTU as u32,
                flags: 9,
                size: 8,
            };
            s.extend(mtu.encode());
            s.extend(1500u64.to_le_bytes());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(screen_stream(&s, cfg()).is_ok());
        });
        let done = rx.recv_timeout(std::time::Duration::from_secs(20));
        assert_eq!(done, Ok(true), "screen_stream blocked or failed");
    }

    /// The gate records what it took for a handover: forwarded requests and those it answered
    /// with success (an MTU in range, an early enable), not those it refused.
    #[test]
    fn the_gate_records_what_it_took() {
        let mut s = Vec::new();
        s.extend(msg(
            FrontendReq::SET_PROTOCOL_FEATURES,
            1,
            &PROTOCOL_F_REPLY_ACK.to_le_bytes(),
        ));
        s.extend(msg(FrontendReq::NET_SET_MTU, 9, &1500u64.to_le_bytes()));
        s.extend(msg(FrontendReq::NET_SET_MTU, 9, &65535u64.to_le_bytes()));
        s.extend(msg(
            FrontendReq::SET_VRING_ENABLE,
            9,
            &[1, 0, 0, 0, 1, 0, 0, 0],
        ));
        s.extend(msg(FrontendReq::SET_MEM_TABLE, 9, &[0u8; 8]));
        let (frontend, mut peer) = UnixStream::pair().unwrap();
        let (backend, _backend_peer) = UnixStream::pair().unwrap();
        let (writer, _writer_peer) = UnixStream::pair().unwrap();
        peer.write_all(&s).unwrap();
        drop(peer);
        let mut st = ReqState::new(cfg());
        st.run(&frontend, &backend, &Mutex::new(writer)).unwrap();
        let (p, fds) = st.record.export(0);
        assert_eq!(p.protocol_features, Some(PROTOCOL_F_REPLY_ACK));
        assert_eq!(p.mtu, Some(1500), "the refused MTU was recorded");
        assert_eq!(p.held_enables, vec![(1, 1)]);
        assert!(p.regions.is_empty() && fds.is_empty());
    }

    #[test]
    fn messages_roundtrip_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let h = hdr(FrontendReq::SET_VRING_KICK);
        send_msg(&a, &h, &[0u8; 8], &[file.as_raw_fd()]).unwrap();
        let mut m = Msg::default();
        assert_eq!(recv_msg(&b, &mut m).unwrap(), Some(h));
        assert_eq!(m.fds.len(), 1);
        drop(a);
        assert_eq!(recv_msg(&b, &mut m).unwrap(), None);
    }

    #[test]
    fn oversized_message_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let h = Hdr {
            request: 1,
            flags: 1,
            size: 1 << 20,
        };
        (&a).write_all(&h.encode()).unwrap();
        let mut m = Msg::default();
        assert!(matches!(recv_msg(&b, &mut m), Err(GateError::TooBig(_))));
    }
}
