//! Crash recovery through systemd's file descriptor store (`docs/handover.md`, "Crash
//! recovery"): while a frontend is served, the session's descriptors and a state blob sit in the
//! store of the daemon's unit ([`FdStore::save`], on every request that changes the session,
//! never per frame), so that after a SIGKILL the restarted daemon gets them back through
//! `LISTEN_FDS`/`LISTEN_FDNAMES` and resumes the session on the same connection
//! ([`recover`]), each ring from the used index in guest memory, as a vhost-user reconnect
//! does.
//!
//! Each descriptor is stored under its role's name (`frontend`, `tap-N`, `region-N`,
//! `kick-N`/`call-N`/`err-N`, ring N) and replaced by name (`FDSTOREREMOVE=1` then
//! `FDSTORE=1`): systemd keeps one entry per open file and drops a second copy of a file it
//! already holds, so two roles never share a name except memory regions of one file (QEMU maps
//! guest RAM around the VGA hole as two regions of one memfd), which are stored once. The state
//! is a sealed memfd named `state`, written last: the blob a live handover sends
//! ([`SessionState`]) plus the name of each of its descriptors. The vhost-user listener is not
//! stored (the socket unit holds it, or the daemon binds its path again); the state names it
//! `listener` and the restarted daemon puts its own there. A [`Ledger`] (`replies`) says
//! whether the frontend waits for an answer, in which case the session is not resumed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use sd_notify::NotifyState;
use serde::{Deserialize, Serialize};
use vhost::vhost_user::message::FrontendReq;

use super::fdcheck;
use super::record::Recorder;
use super::state::{
    DeviceState, FdKind, ProtocolState, SessionState, Sockets, MAGIC, MAX_BLOB, VERSION,
};
use super::take::Received;
use crate::stats::Stats;
use crate::tap::Tap;

/// Identifies a stored state among other memfds.
pub const STORE_MAGIC: &str = "vhost-card-fdstore";
/// The stored state's own version (the handover state inside has its own).
pub const STORE_VERSION: u32 = 1;
/// The state memfd's name in the store.
pub const STATE: &str = "state";
/// The reply ledger's name in the store ([`Ledger`]).
pub const REPLIES: &str = "replies";
/// The name the state gives the vhost-user listener, which is not stored.
pub const LISTENER: &str = "listener";
/// systemd 254 and later set `$FDSTORE` to the unit's `FileDescriptorStoreMax=`.
const FDSTORE_ENV: &str = "FDSTORE";

/// What is in the state memfd.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    magic: String,
    version: u32,
    /// The store name of each descriptor of `state`, by position.
    names: Vec<String>,
    /// A handover state ([`SessionState`]), checked as one.
    state: serde_json::Value,
}

/// Whether a name is one this daemon stores (and so one it may remove or take back).
pub fn is_ours(name: &str) -> bool {
    if name == STATE || name == REPLIES || name == "frontend" {
        return true;
    }
    ["tap-", "region-", "kick-", "call-", "err-"]
        .iter()
        .any(|p| name.strip_prefix(p).is_some_and(index_like))
}

fn index_like(s: &str) -> bool {
    !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit())
}

/// Every name a session of `pairs` queue pairs may store.
fn all_names(pairs: usize) -> Vec<String> {
    let mut v = vec![
        "frontend".to_string(),
        STATE.to_string(),
        REPLIES.to_string(),
    ];
    v.extend((0..pairs).map(|i| format!("tap-{i}")));
    v.extend((0..crate::gate::MAX_MEM_REGIONS).map(|i| format!("region-{i}")));
    for r in 0..pairs * 2 {
        v.extend(["kick", "call", "err"].map(|k| format!("{k}-{r}")));
    }
    v
}

/// Whether this process keeps its session in the fd store: asked for (`--fd-store`, or
/// systemd 254+ saying the unit has a store with `$FDSTORE`) and a notify socket to talk to.
pub fn wanted(flag: bool) -> bool {
    let asked = flag
        || std::env::var(FDSTORE_ENV)
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|n| n > 0);
    let socket = std::env::var_os("NOTIFY_SOCKET").is_some();
    if flag && !socket {
        warn!("--fd-store: no $NOTIFY_SOCKET (not started by systemd); crash recovery is off");
    }
    asked && socket
}

/// Whether the frontend is owed an answer: a shared memfd (kept in the store as `replies`) with
/// two counters, the number of requests forwarded that the handler answers (`owed`, counted by
/// the gate before it forwards one) and the value `owed` had when the last answer was relayed to
/// the frontend (`answered`). After a crash, `owed != answered` means the frontend (QEMU, which
/// waits for each answer before its next request) waits for an answer the restarted daemon
/// cannot give: recovery is refused, the connection closes and the frontend reconnects, rather
/// than wait for ever. Plain memory writes: nothing per request but two atomic operations.
pub struct Ledger {
    fd: OwnedFd,
    counters: std::ptr::NonNull<[std::sync::atomic::AtomicU64; 2]>,
}

// SAFETY: the mapping is shared memory used only through atomics, valid until `drop`.
unsafe impl Send for Ledger {}
// SAFETY: as above; every access is an atomic operation.
unsafe impl Sync for Ledger {}

const LEDGER_SIZE: usize = 4096;

impl Ledger {
    pub fn new() -> std::io::Result<Ledger> {
        let fd = sealed_or_plain(None)?;
        // Written rather than ftruncate'd: the sandbox has write, not ftruncate. The mapping's
        // one page holds the file's end, so its first 16 bytes are the file's.
        std::fs::File::from(fd.try_clone()?).write_all(&[0; 16])?;
        // SAFETY: a fresh shared mapping of our memfd, one page (checked); nothing else in
        // this process maps it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEDGER_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let counters = std::ptr::NonNull::new(p.cast()).ok_or(std::io::Error::other("mmap"))?;
        Ok(Ledger { fd, counters })
    }

    fn counters(&self) -> &[std::sync::atomic::AtomicU64; 2] {
        // SAFETY: mapped, page-aligned, its 16 bytes zero at creation and inside the file,
        // alive as long as `self`.
        unsafe { self.counters.as_ref() }
    }

    /// The gate is about to forward a request the handler answers.
    pub fn owe(&self) {
        self.counters()[0].fetch_add(1, Ordering::SeqCst);
    }

    /// The gate relayed an answer to the frontend.
    pub fn answered(&self) {
        let c = self.counters();
        c[1].store(c[0].load(Ordering::SeqCst), Ordering::SeqCst);
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`; no reference to it outlives `self`.
        unsafe { libc::munmap(self.counters.as_ptr().cast(), LEDGER_SIZE) };
    }
}

/// Whether a stored ledger says an answer is owed (unreadable: as if one were).
fn owed(fd: BorrowedFd) -> bool {
    let mut b = [0u8; 16];
    if pread_exact(fd, &mut b, 0).is_err() {
        return true;
    }
    b[..8] != b[8..]
}

/// The card's side of a stored session: what the state names besides the gate's record.
pub struct Card {
    pub tap: Arc<Tap>,
    pub device: DeviceState,
    pub tap_created: bool,
    pub stats: Arc<Stats>,
}

/// The daemon's end of the store.
pub struct FdStore {
    card: Card,
    /// The names this process knows to be in the store; `None` when it does not know (a
    /// process that took a session over by a live handover): every other name is removed then.
    known: Mutex<Option<BTreeSet<String>>>,
}

/// Which stored descriptors a request replaces (their names stay).
enum Refresh {
    Nothing,
    Regions,
    Ring(&'static str, u64),
}

fn refresh_of(request: u32, body: &[u8]) -> Refresh {
    let ring = || {
        body.get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) & 0xff)
            .unwrap_or(u64::MAX)
    };
    match request {
        r if r == FrontendReq::SET_MEM_TABLE as u32 => Refresh::Regions,
        r if r == FrontendReq::SET_VRING_KICK as u32 => Refresh::Ring("kick", ring()),
        r if r == FrontendReq::SET_VRING_CALL as u32 => Refresh::Ring("call", ring()),
        r if r == FrontendReq::SET_VRING_ERR as u32 => Refresh::Ring("err", ring()),
        _ => Refresh::Nothing,
    }
}

/// Whether a request changes what is stored (the control plane: the negotiation, the memory
/// table, a ring's setup); the others (GET_*, SEND_RARP, the dirty log's) are not saved.
pub fn changes_session(request: u32) -> bool {
    use FrontendReq as R;
    [
        R::SET_OWNER,
        R::RESET_OWNER,
        R::SET_FEATURES,
        R::SET_PROTOCOL_FEATURES,
        R::NET_SET_MTU,
        R::SET_MEM_TABLE,
        R::SET_VRING_NUM,
        R::SET_VRING_BASE,
        R::SET_VRING_ADDR,
        R::SET_VRING_KICK,
        R::SET_VRING_CALL,
        R::SET_VRING_ERR,
        R::SET_VRING_ENABLE,
        R::GET_VRING_BASE,
    ]
    .iter()
    .any(|&r| r as u32 == request)
}

fn store(name: &str, fd: BorrowedFd) {
    if let Err(e) =
        sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], &[fd])
    {
        warn!("fd store: cannot store {name}: {e}");
    }
}

fn remove(name: &str) {
    if let Err(e) = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]) {
        warn!("fd store: cannot remove {name}: {e}");
    }
}

fn file_id(fd: BorrowedFd) -> Option<(u64, u64)> {
    // SAFETY: fstat on a borrowed open descriptor into a zeroed buffer we own.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd.as_raw_fd(), &mut st) == 0).then_some((st.st_dev, st.st_ino))
    }
}

/// A new memfd; with `bytes`, holding them and sealed against any change.
fn sealed_or_plain(bytes: Option<&[u8]>) -> std::io::Result<OwnedFd> {
    // SAFETY: memfd_create with a static name; the descriptor (checked) is ours alone.
    let fd = unsafe {
        let fd = libc::memfd_create(
            c"vhost-card-state".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd)
    };
    let Some(bytes) = bytes else {
        return Ok(fd);
    };
    std::fs::File::from(fd.try_clone()?).write_all(bytes)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on our own descriptor; no memory is passed.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

impl FdStore {
    pub fn new(card: Card) -> Self {
        FdStore {
            card,
            known: Mutex::new(None),
        }
    }

    /// The names a recovered session left in the store (they are this process's now).
    pub fn adopt(&self, names: BTreeSet<String>) {
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = Some(names);
    }

    /// The state and the named descriptors of a session: `(state, names by position,
    /// descriptors to store by name)`.
    fn snapshot<'a>(
        &'a self,
        frontend: BorrowedFd<'a>,
        ledger: &'a Ledger,
        rec: &'a Recorder,
    ) -> (SessionState, Vec<String>, BTreeMap<String, BorrowedFd<'a>>) {
        let mut kinds = vec![FdKind::UnixListener, FdKind::UnixStream];
        let mut names = vec![LISTENER.to_string(), "frontend".to_string()];
        let mut fds = BTreeMap::new();
        fds.insert("frontend".to_string(), frontend);
        fds.insert(REPLIES.to_string(), ledger.fd());
        let pairs = self.card.tap.num_queues();
        for i in 0..pairs {
            let name = format!("tap-{i}");
            kinds.push(FdKind::TapQueue);
            // SAFETY: the tap's queues stay open as long as `self.card.tap`, borrowed as long.
            fds.insert(name.clone(), unsafe {
                BorrowedFd::borrow_raw(self.card.tap.queue_fd(i))
            });
            names.push(name);
        }
        let (p, session_fds) = rec.export(names.len());
        // Regions of one file are stored once, under the first one's name.
        let mut files: Vec<((u64, u64), String)> = Vec::new();
        let mut at = session_fds.iter();
        for (i, _) in p.regions.iter().enumerate() {
            let Some(&fd) = at.next() else { break };
            let id = file_id(fd);
            let name = match files.iter().find(|(f, _)| Some(*f) == id) {
                Some((_, n)) => n.clone(),
                None => {
                    let n = format!("region-{i}");
                    if let Some(id) = id {
                        files.push((id, n.clone()));
                    }
                    fds.insert(n.clone(), fd);
                    n
                }
            };
            kinds.push(FdKind::GuestMemory);
            names.push(name);
        }
        for (r, ring) in p.rings.iter().enumerate() {
            for (kind, present) in [
                ("kick", ring.kick.is_some()),
                ("call", ring.call.is_some()),
                ("err", ring.err.is_some()),
            ] {
                if !present {
                    continue;
                }
                let Some(&fd) = at.next() else { break };
                let name = format!("{kind}-{r}");
                fds.insert(name.clone(), fd);
                kinds.push(FdKind::EventFd);
                names.push(name);
            }
        }
        let state = SessionState {
            magic: MAGIC.into(),
            version: VERSION,
            sender: format!("vhost-card {}", env!("CARGO_PKG_VERSION")),
            device: self.card.device.clone(),
            fds: kinds,
            sockets: Sockets {
                listener: 0,
                frontend: Some(1),
                control: None,
                metrics: None,
            },
            taps: (2..2 + pairs).collect(),
            tap_created: self.card.tap_created,
            session: Some(p),
            held: Vec::new(),
            counters: self.card.stats.snapshot(),
        };
        (state, names, fds)
    }

    /// Stores the session as `rec` holds it after the frontend's `request` (with `body`):
    /// the descriptors the request replaced or that are not stored yet, then a new state;
    /// descriptors no longer used are removed. `request` `None`: everything is stored again
    /// (a session this process resumed).
    pub fn save(
        &self,
        frontend: BorrowedFd,
        ledger: &Ledger,
        rec: &Recorder,
        request: Option<(u32, &[u8])>,
    ) {
        let (state, names, fds) = self.snapshot(frontend, ledger, rec);
        let blob = Stored {
            magic: STORE_MAGIC.into(),
            version: STORE_VERSION,
            names,
            state: serde_json::to_value(&state).unwrap_or_default(),
        };
        let memfd = match sealed_or_plain(Some(&serde_json::to_vec(&blob).unwrap_or_default())) {
            Ok(m) => m,
            Err(e) => {
                warn!("fd store: cannot write the state: {e}");
                return;
            }
        };
        let refresh = request.map_or(Refresh::Nothing, |(r, b)| refresh_of(r, b));
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        // Not knowing what is stored, every name that may be is removed and all is stored.
        let (before, all) = match known.take() {
            Some(k) => (k, false),
            None => (
                all_names(self.card.tap.num_queues()).into_iter().collect(),
                true,
            ),
        };
        for stale in before
            .iter()
            .filter(|n| !fds.contains_key(*n) && *n != STATE)
        {
            remove(stale);
        }
        for (name, fd) in &fds {
            let replaced = all
                || match refresh {
                    Refresh::Nothing => request.is_none(),
                    Refresh::Regions => name.starts_with("region-"),
                    Refresh::Ring(kind, r) => *name == format!("{kind}-{r}"),
                };
            if replaced || !before.contains(name) {
                remove(name);
                store(name, *fd);
            }
        }
        remove(STATE);
        store(STATE, memfd.as_fd());
        let mut now: BTreeSet<String> = fds.into_keys().collect();
        now.insert(STATE.into());
        *known = Some(now);
    }

    /// Empties the store: the session ended (the frontend left, or the daemon stops), so a
    /// later start must not resume it.
    pub fn clear(&self) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let names = match known.take() {
            Some(k) => k.into_iter().collect(),
            None => all_names(self.card.tap.num_queues()),
        };
        // The state first: a crash halfway leaves descriptors without a state, which a restart
        // discards.
        remove(STATE);
        for n in names.iter().filter(|n| *n != STATE) {
            remove(n);
        }
        *known = Some(BTreeSet::new());
    }
}

/// A session taken back from the store: checked as a handover's, each started ring's next
/// available index set to its used index in guest memory.
pub struct Recovered {
    pub received: Received,
    /// The names in the store (the restarted process's to replace and remove).
    pub names: BTreeSet<String>,
}

impl Recovered {
    /// Refused after all (the tap could not be adopted): closed, and removed from the store.
    pub fn discard(self) {
        for name in &self.names {
            remove(name);
        }
    }
}

/// The descriptors systemd handed back with our names, and the store names to remove if they
/// are refused.
struct Handed {
    fds: BTreeMap<String, OwnedFd>,
}

impl Drop for Handed {
    fn drop(&mut self) {
        // Refused or discarded: out of the store too, or systemd would keep the frontend's
        // connection open and the frontend would never reconnect.
        for name in self.fds.keys() {
            remove(name);
        }
    }
}

/// Takes the stored session back, if `LISTEN_FDS`/`LISTEN_FDNAMES` hold one: checks the state
/// and every descriptor as a handover does, against this daemon's own device; `listener` takes
/// the listener's place. Anything invalid is logged, closed and removed from the store, and the
/// daemon starts fresh (the frontend reconnects on its own timer): then the second value is
/// true. With `keep` false (the store is off now) whatever was stored is discarded so.
pub fn recover(
    listener: Option<BorrowedFd>,
    ours: &DeviceState,
    keep: bool,
) -> (Option<Recovered>, bool) {
    let handed = match sd_notify::listen_fds_with_names() {
        Ok(fds) => fds,
        Err(e) => {
            warn!("fd store: {e}; nothing recovered");
            return (None, false);
        }
    };
    let mut fds = BTreeMap::new();
    let mut twice = Vec::new();
    for (fd, name) in handed {
        if !is_ours(&name) {
            continue;
        }
        // SAFETY: systemd handed this descriptor to this process (LISTEN_PID) under one of our
        // names; nothing else in the process owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        if fds.contains_key(&name) {
            twice.push(name.clone());
        }
        fds.insert(name, owned);
    }
    for v in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    if fds.is_empty() {
        return (None, false);
    }
    let mut handed = Handed { fds };
    if !keep {
        warn!(
            "fd store: {} stored descriptors, but the store is off (no --fd-store); discarded",
            handed.fds.len()
        );
        return (None, true);
    }
    if !handed.fds.contains_key(STATE) {
        warn!(
            "fd store: {} descriptors without a state (a session that was ending); discarded",
            handed.fds.len()
        );
        return (None, true);
    }
    if !twice.is_empty() {
        error!("crash recovery refused: the store holds {twice:?} twice; starting fresh");
        return (None, true);
    }
    match rebuild(&handed, listener, ours) {
        Ok(received) => {
            let names = std::mem::take(&mut handed.fds).into_keys().collect();
            (Some(Recovered { received, names }), false)
        }
        Err(why) => {
            error!("crash recovery refused: {why}; starting fresh (the frontend reconnects)");
            (None, true)
        }
    }
}

/// A stored state's bytes, parsed and checked on their own: the handover state (a session with
/// its frontend's connection, no control or metrics socket) and the store name of each of its
/// descriptors (`listener` for the listener; only memory regions share a name).
pub fn parse_stored(bytes: &[u8]) -> Result<(SessionState, Vec<String>), String> {
    let stored: Stored =
        serde_json::from_slice(bytes).map_err(|e| format!("state: not a stored state: {e}"))?;
    if stored.magic != STORE_MAGIC {
        return Err(format!("state: magic {:?}", stored.magic));
    }
    if stored.version != STORE_VERSION {
        return Err(format!(
            "state: version {}; this binary reads version {STORE_VERSION} only",
            stored.version
        ));
    }
    let blob = serde_json::to_vec(&stored.state).unwrap_or_default();
    let state = SessionState::parse(&blob).map_err(|e| e.to_string())?;
    if state.sockets.control.is_some() || state.sockets.metrics.is_some() {
        return Err("state: a stored state names no control or metrics socket".into());
    }
    if state.session.is_none() {
        return Err("state: no session".into());
    }
    if stored.names.len() != state.fds.len() {
        return Err(format!(
            "state: {} names for {} descriptors",
            stored.names.len(),
            state.fds.len()
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, (name, kind)) in stored.names.iter().zip(&state.fds).enumerate() {
        if (i == state.sockets.listener) != (name == LISTENER) {
            return Err(format!("state: descriptor {i} is named {name:?}"));
        }
        if i != state.sockets.listener && (!is_ours(name) || name == STATE || name == REPLIES) {
            return Err(format!("state: descriptor name {name:?}"));
        }
        // Only regions of one file share a name.
        if !seen.insert(name.as_str()) && *kind != FdKind::GuestMemory {
            return Err(format!("state: descriptor name {name:?} used twice"));
        }
    }
    Ok((state, stored.names))
}

fn rebuild(
    handed: &Handed,
    listener: Option<BorrowedFd>,
    ours: &DeviceState,
) -> Result<Received, String> {
    let ledger = handed
        .fds
        .get(REPLIES)
        .ok_or("the store has no reply ledger")?;
    if owed(ledger.as_fd()) {
        return Err(
            "the frontend waits for the answer to a request the crashed process took \
                    (it would wait for ever on a resumed session)"
                .into(),
        );
    }
    let (mut state, names) = parse_stored(&read_state(handed.fds[STATE].as_fd())?)?;
    state.check_device(ours).map_err(|e| e.to_string())?;
    let mut fds = Vec::with_capacity(state.fds.len());
    for (i, name) in names.iter().enumerate() {
        let fd = if i == state.sockets.listener {
            listener.ok_or("no listener of this process's own to resume on")?
        } else {
            handed
                .fds
                .get(name)
                .ok_or_else(|| format!("the store has no descriptor {name:?}"))?
                .as_fd()
        };
        fds.push(fd.try_clone_to_owned().map_err(|e| e.to_string())?);
    }
    fdcheck::check_all(&state, &fds).map_err(|e| e.to_string())?;
    // Where each started ring resumes: its used index, as a vhost-user reconnect does; the
    // chains taken and not completed are taken again.
    let session = state.session.as_mut().ok_or("no session")?;
    let regions = session.regions.clone();
    for (i, ring) in session.rings.iter_mut().enumerate() {
        let (true, Some(addr)) = (ring.started, ring.addr) else {
            continue;
        };
        let at = addr.used.checked_add(2).ok_or("used ring address")?;
        let region = regions
            .iter()
            .find(|r| {
                at >= r.userspace_addr
                    && (at - r.userspace_addr)
                        .checked_add(2)
                        .is_some_and(|end| end <= r.memory_size)
            })
            .ok_or_else(|| format!("ring {i}: used index at {at:#x} outside guest memory"))?;
        let offset = region.mmap_offset + (at - region.userspace_addr);
        let mut idx = [0u8; 2];
        pread_exact(fds[region.fd].as_fd(), &mut idx, offset)
            .map_err(|e| format!("ring {i}: reading the used index: {e}"))?;
        ring.base = u16::from_le_bytes(idx);
    }
    info!(
        "crash recovery: state from {} checked ({} descriptors); rings resume at used indices {:?}",
        state.sender,
        fds.len(),
        state
            .session
            .as_ref()
            .map(|s| s.rings.iter().map(|r| r.base).collect::<Vec<_>>())
            .unwrap_or_default()
    );
    Ok(Received {
        state,
        fds,
        held: Vec::new(),
    })
}

/// After a recovered session's rings started: one kick and one call on each started ring. The
/// crashed process may have read a kick and not taken the chains it announced, or completed
/// chains and not signalled them; a spurious kick or interrupt costs one look at the ring.
pub fn wake(state: &ProtocolState, fds: &[OwnedFd]) {
    for ring in state.rings.iter().filter(|r| r.started) {
        for i in [ring.kick, ring.call].into_iter().flatten() {
            if let Some(fd) = fds.get(i) {
                crate::poll::signal_eventfd(fd.as_raw_fd());
            }
        }
    }
}

fn pread_exact(fd: BorrowedFd, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(|_| std::io::Error::other("offset"))?;
    // SAFETY: pread writes at most `buf.len()` bytes into `buf`, which we own.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off) };
    match n {
        n if n < 0 => Err(std::io::Error::last_os_error()),
        n if n as usize == buf.len() => Ok(()),
        _ => Err(std::io::Error::other("short read")),
    }
}

/// The state memfd's bytes: a regular file of at most [`MAX_BLOB`] bytes.
fn read_state(fd: BorrowedFd) -> Result<Vec<u8>, String> {
    // SAFETY: fstat on a borrowed open descriptor into a zeroed buffer we own.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err(format!("state: fstat: {}", std::io::Error::last_os_error()));
        }
        st
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err("state: not a memfd or regular file".into());
    }
    let size = usize::try_from(st.st_size).unwrap_or(usize::MAX);
    if size == 0 || size > MAX_BLOB {
        return Err(format!("state: {size} bytes"));
    }
    let mut buf = vec![0u8; size];
    pread_exact(fd, &mut buf, 0).map_err(|e| format!("state: {e}"))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_ours_or_not() {
        for n in ["state", "frontend", "tap-0", "region-7", "kick-31", "err-2"] {
            assert!(is_ours(n), "{n}");
        }
        for n in [
            "vhost-card@x.socket",
            "tap-",
            "kick-1234",
            "call-x",
            "",
            "stored",
        ] {
            assert!(!is_ours(n), "{n}");
        }
        // systemd's rules: at most 255 characters, no ':'.
        assert!(all_names(16)
            .iter()
            .all(|n| is_ours(n) && n.len() <= 255 && !n.contains(':')));
    }

    #[test]
    fn a_session_changing_request_says_what_it_replaces() {
        assert!(matches!(
            refresh_of(FrontendReq::SET_VRING_CALL as u32, &3u64.to_le_bytes()),
            Refresh::Ring("call", 3)
        ));
        assert!(matches!(
            refresh_of(FrontendReq::SET_VRING_KICK as u32, &[1]),
            Refresh::Ring("kick", u64::MAX)
        ));
        assert!(changes_session(FrontendReq::SET_MEM_TABLE as u32));
        assert!(!changes_session(FrontendReq::GET_FEATURES as u32));
    }

    #[test]
    fn the_ledger_says_whether_an_answer_is_owed() {
        let l = Ledger::new().unwrap();
        assert!(!owed(l.fd()));
        l.owe();
        assert!(owed(l.fd()), "a request forwarded, its answer not relayed");
        l.answered();
        assert!(!owed(l.fd()));
        // A request whose answer never came (a frontend's odd flags) is forgotten at the next
        // answer.
        l.owe();
        l.owe();
        l.answered();
        assert!(!owed(l.fd()));
    }

    #[test]
    fn a_stored_state_is_checked_on_its_own() {
        for bad in [
            &b""[..],
            b"{}",
            b"{\"magic\":\"vhost-card-fdstore\",\"version\":2,\"names\":[],\"state\":{}}",
            b"{\"magic\":\"x\",\"version\":1,\"names\":[],\"state\":{}}",
            b"{\"magic\":\"vhost-card-fdstore\",\"version\":1,\"names\":[],\"state\":{}}",
        ] {
            assert!(
                parse_stored(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let e = parse_stored(
            b"{\"magic\":\"vhost-card-fdstore\",\"version\":2,\"names\":[],\"state\":{}}",
        )
        .unwrap_err();
        assert!(e.contains("version 2"), "{e}");
    }

    #[test]
    fn a_sealed_state_cannot_be_changed() {
        let fd = sealed_or_plain(Some(b"{}")).unwrap();
        assert_eq!(read_state(fd.as_fd()).unwrap(), b"{}");
        let mut f = std::fs::File::from(fd);
        assert!(f.write_all(b"x").is_err());
    }
}
