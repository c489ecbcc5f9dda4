//! The card's end of the link: a Linux tap device opened with `IFF_VNET_HDR` (and
//! `IFF_MULTI_QUEUE` for several queue pairs), in the card's network namespace.
//!
//! Every ioctl sits in a small function here with its SAFETY argument; the data path only sees
//! raw queue descriptors.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use thiserror::Error;

use crate::netns::{self, NetnsError};

/// Offload bits a tap reader can accept (`TUNSETOFFLOAD`).
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
pub const TUN_F_TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
pub const TUN_F_UFO: u32 = libc::TUN_F_UFO;
pub const TUN_F_USO4: u32 = libc::TUN_F_USO4;
pub const TUN_F_USO6: u32 = libc::TUN_F_USO6;

#[derive(Debug, Error)]
pub enum TapError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("invalid tap name '{0}': 1 to 15 characters, no '/', ':' or whitespace")]
    BadName(String),
    #[error(
        "creating {mode} '{name}' needs CAP_NET_ADMIN: run as root, or have root create it once \
         for this user: ip tuntap add {name} mode {mode} user {uid} vnet_hdr{mq}"
    )]
    CannotCreate {
        name: String,
        uid: u32,
        mq: &'static str,
        /// `tap`, or `tun` for `--link ip`.
        mode: &'static str,
    },
    #[error(
        "{mode} '{name}' belongs to another user (this process runs as uid {uid} without \
         CAP_NET_ADMIN): run as its owner, or have root give it to this user: \
         ip tuntap del {name} mode {mode}{mq}; ip tuntap add {name} mode {mode} user {uid} \
         vnet_hdr{mq}"
    )]
    NotOwner {
        name: String,
        uid: u32,
        mq: &'static str,
        mode: &'static str,
    },
    #[error("permission denied opening /dev/net/tun (its mode or a device cgroup forbids it)")]
    TunPermission,
    #[error(
        "tap '{0}' is held by another process, still after 3 s (a single-queue tap takes one \
         reader: is another vhost-card or a QEMU using it?)"
    )]
    Busy(String),
    #[error(
        "tap '{name}' is a multi-queue tap and --queues 1 opens a single-queue one: give \
         --queues N (N >= 2), or delete it (ip link del {name}) so the daemon creates its own"
    )]
    MultiQueueTap { name: String },
    #[error(
        "tap '{name}' is a single-queue tap and --queues {queues} needs a multi-queue one: \
         delete it (ip link del {name}) so the daemon creates its own, or create it with \
         ip tuntap add {name} mode tap multi_queue vnet_hdr"
    )]
    SingleQueueTap { name: String, queues: usize },
    #[error("'{0}' exists and is not a tap (a tun device or another kind of link): choose another --tap name")]
    NotATap(String),
    #[error("'{0}' exists and is not a tun device (a tap or another kind of link), which --link ip needs: choose another --tap name")]
    NotATun(String),
    #[error(
        "tap '{name}' is not as the card needs it and this process may not change it (no \
         CAP_NET_ADMIN in its namespace): {differs}; fix it once as root: ip link set {name} {fix}"
    )]
    NotAsNeeded {
        name: String,
        differs: String,
        fix: String,
    },
    #[error("/dev/net/tun is missing (load the tun module: modprobe tun)")]
    NoTunDevice,
    #[error("{op} on tap '{name}' failed: {cause}")]
    Io {
        op: &'static str,
        name: String,
        cause: io::Error,
    },
}

/// What the daemon asks of its tap.
#[derive(Debug, Clone)]
pub struct TapConfig {
    pub name: String,
    pub netns: Option<String>,
    pub mtu: u16,
    pub mac: Option<[u8; 6]>,
    pub queues: usize,
    /// A TUN device (IFF_TUN: bare IP packets, `--link ip`) instead of a tap.
    pub tun: bool,
}

/// An open tap with one file descriptor per queue pair.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
    /// Whether each queue is attached to the device (`TUNSETQUEUE`); a new queue is.
    attached: Mutex<Vec<bool>>,
    /// The vnet header length the tap reads and writes (`TUNSETVNETHDRSZ`).
    hdr_len: AtomicUsize,
    created: bool,
    /// Keep a tap this daemon created when it is dropped (set once the daemon serves: a start
    /// that fails never leaves a tap behind).
    keep: std::sync::atomic::AtomicBool,
}

fn ifreq_with_name(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    ifr
}

/// Checks a tap name (`--tap`).
pub fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_string()))
    }
}

/// The name and flags of the tap a queue descriptor is attached to (TUNGETIFF): how a process
/// that received the descriptor checks what it is.
pub fn queue_identity(fd: RawFd) -> io::Result<(String, libc::c_short)> {
    let mut ifr = ifreq_with_name("");
    ifr_ioctl(fd, libc::TUNGETIFF, &mut ifr)?;
    let name: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c.to_ne_bytes()[0])
        .collect();
    // SAFETY: TUNGETIFF filled the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    Ok((String::from_utf8_lossy(&name).into_owned(), flags))
}

/// A datagram socket for interface ioctls, in the calling thread's namespace.
fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifr_ioctl(fd: RawFd, req: libc::Ioctl, ifr: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `req` is an interface ioctl that reads and/or writes one `ifreq`, which `ifr`
    // points to for the duration of the call.
    let rc = unsafe { libc::ioctl(fd, req, ifr as *mut libc::ifreq) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn val_ioctl(fd: RawFd, req: libc::Ioctl, val: libc::c_ulong) -> io::Result<()> {
    // SAFETY: `req` is a tun ioctl that takes its argument by value (TUNSETPERSIST,
    // TUNSETOFFLOAD); no memory is passed.
    let rc = unsafe { libc::ioctl(fd, req, val) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ifindex(ctl: RawFd, name: &str) -> Option<i32> {
    let mut ifr = ifreq_with_name(name);
    ifr_ioctl(ctl, libc::SIOCGIFINDEX, &mut ifr).ok()?;
    // SAFETY: SIOCGIFINDEX filled the ifindex member of the union.
    Some(unsafe { ifr.ifr_ifru.ifru_ifindex })
}

/// Maps a failed operation on tap `name` to [`TapError::Io`].
fn io_err<'a>(op: &'static str, name: &'a str) -> impl FnOnce(io::Error) -> TapError + 'a {
    move |cause| TapError::Io {
        op,
        name: name.to_string(),
        cause,
    }
}

/// Why a queue could not be attached.
enum Attach {
    Open(io::Error),
    SetIff(io::Error),
}

/// Opens one queue of tap `name` (creating the tap if there is none): `/dev/net/tun` and
/// `TUNSETIFF` with a vnet header, multi-queue or not.
fn attach(name: &str, multi_queue: bool, tun: bool) -> Result<File, Attach> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(Attach::Open)?;
    let mut ifr = ifreq_with_name(name);
    let kind = if tun { libc::IFF_TUN } else { libc::IFF_TAP };
    let mut flags = kind | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    ifr_ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr).map_err(Attach::SetIff)?;
    Ok(file)
}

/// How long [`attach_patiently`] waits for a tap held by a process that is gone.
const BUSY_GRACE: Duration = Duration::from_secs(3);

/// [`attach`], waiting up to [`BUSY_GRACE`] while the tap says it is held (EBUSY). A daemon
/// killed with SIGKILL leaves its tap queue in its TX io_uring's file table, and the kernel closes
/// it only when it tears the ring down, some time after the process is gone: a daemon restarted
/// at once (systemd's `Restart=`) takes the tap over when that is done. A tap another live
/// process holds is still refused, after the wait.
fn attach_patiently(name: &str, multi_queue: bool, tun: bool) -> Result<File, Attach> {
    let start = Instant::now();
    loop {
        match attach(name, multi_queue, tun) {
            Err(Attach::SetIff(e))
                if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < BUSY_GRACE =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(file) if start.elapsed() >= Duration::from_millis(10) => {
                info!(
                    "tap '{name}' was held by another process; free after {} ms",
                    start.elapsed().as_millis()
                );
                return Ok(file);
            }
            other => return other,
        }
    }
}

/// The error for a `TUNSETIFF` that failed, with what to do about it. The kernel says EINVAL
/// both for a link that is no tap and for a tap whose multi-queue flag differs: one attempt
/// with the other flag (closed at once) tells which.
fn why_not_attached(cfg: &TapConfig, existed: bool, e: io::Error) -> TapError {
    let name = cfg.name.clone();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mq = if cfg.queues > 1 { " multi_queue" } else { "" };
    let mode = if cfg.tun { "tun" } else { "tap" };
    match e.raw_os_error() {
        Some(libc::EBUSY) => TapError::Busy(name),
        Some(libc::EPERM | libc::EACCES) if existed => TapError::NotOwner {
            name,
            uid,
            mq,
            mode,
        },
        Some(libc::EPERM | libc::EACCES) => TapError::CannotCreate {
            name,
            uid,
            mq,
            mode,
        },
        Some(libc::EINVAL) if existed => {
            if !is_multi_queue_mismatch(&cfg.name, cfg.queues, cfg.tun) {
                if cfg.tun {
                    TapError::NotATun(name)
                } else {
                    TapError::NotATap(name)
                }
            } else if cfg.queues > 1 {
                TapError::SingleQueueTap {
                    name,
                    queues: cfg.queues,
                }
            } else {
                TapError::MultiQueueTap { name }
            }
        }
        _ => TapError::Io {
            op: "TUNSETIFF",
            name,
            cause: e,
        },
    }
}

/// Whether tap `name` takes the multi-queue flag opposite to what `queues` asks for: attaching
/// with it works, or fails with something other than EINVAL (a single-queue tap another process
/// holds says EBUSY).
fn is_multi_queue_mismatch(name: &str, queues: usize, tun: bool) -> bool {
    match attach(name, queues <= 1, tun) {
        Ok(_) => true,
        Err(Attach::SetIff(e)) => e.raw_os_error() != Some(libc::EINVAL),
        Err(Attach::Open(_)) => false,
    }
}

/// The link's MTU, flags and MAC address.
fn link_state(ctl: RawFd, name: &str) -> io::Result<(i32, libc::c_short, [u8; 6])> {
    let mut ifr = ifreq_with_name(name);
    ifr_ioctl(ctl, libc::SIOCGIFMTU, &mut ifr)?;
    // SAFETY: SIOCGIFMTU filled the mtu member of the union.
    let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
    let mut ifr = ifreq_with_name(name);
    ifr_ioctl(ctl, libc::SIOCGIFFLAGS, &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    let mut ifr = ifreq_with_name(name);
    ifr_ioctl(ctl, libc::SIOCGIFHWADDR, &mut ifr)?;
    let mut mac = [0u8; 6];
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member, plain data.
    let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
    for (m, d) in mac.iter_mut().zip(data) {
        *m = d.to_ne_bytes()[0];
    }
    Ok((mtu, flags, mac))
}

/// Gives the tap the MTU (and MAC) and brings it up, changing only what differs, so a tap made
/// beforehand as needed works without CAP_NET_ADMIN. Returns what it changed; when a change is
/// refused, the error says everything that differs and the command that fixes it.
fn set_link(ctl: RawFd, cfg: &TapConfig) -> Result<Vec<String>, TapError> {
    let name = &cfg.name;
    let io_err = |op| io_err(op, name);
    let (mtu, flags, mac) = link_state(ctl, name).map_err(io_err("reading the link state"))?;
    let up = flags & libc::IFF_UP as libc::c_short != 0;
    let want_mac = cfg.mac.filter(|m| *m != mac);
    let mut differs = Vec::new();
    let mut fix = Vec::new();
    if mtu != i32::from(cfg.mtu) {
        differs.push(format!("its MTU is {mtu}, the card needs {}", cfg.mtu));
        fix.push(format!("mtu {}", cfg.mtu));
    }
    if let Some(m) = want_mac {
        differs.push(format!(
            "its MAC address is {}, --mac asks for {}",
            mac_string(&mac),
            mac_string(&m)
        ));
        fix.push(format!("address {}", mac_string(&m)));
    }
    if !up {
        differs.push("it is down".to_string());
        fix.push("up".to_string());
    }
    let refused = |e: &io::Error| matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES));
    let not_as_needed = || TapError::NotAsNeeded {
        name: name.clone(),
        differs: differs.join("; "),
        fix: fix.join(" "),
    };
    let mut changed = Vec::new();
    if mtu != i32::from(cfg.mtu) {
        let mut ifr = ifreq_with_name(name);
        ifr.ifr_ifru.ifru_mtu = i32::from(cfg.mtu);
        match ifr_ioctl(ctl, libc::SIOCSIFMTU, &mut ifr) {
            Err(e) if refused(&e) => return Err(not_as_needed()),
            r => r.map_err(io_err("setting the MTU"))?,
        }
        changed.push(format!("MTU {mtu} -> {}", cfg.mtu));
    }
    if let Some(m) = want_mac {
        let mut ifr = ifreq_with_name(name);
        // SAFETY: writing the hwaddr member of the ifreq union, plain data.
        unsafe {
            ifr.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (d, s) in ifr.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(m) {
                *d = libc::c_char::from_ne_bytes([s]);
            }
        }
        match ifr_ioctl(ctl, libc::SIOCSIFHWADDR, &mut ifr) {
            Err(e) if refused(&e) => return Err(not_as_needed()),
            r => r.map_err(io_err("setting the MAC address"))?,
        }
        changed.push(format!("MAC {}", mac_string(&m)));
    }
    if !up {
        let mut ifr = ifreq_with_name(name);
        ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        match ifr_ioctl(ctl, libc::SIOCSIFFLAGS, &mut ifr) {
            Err(e) if refused(&e) => return Err(not_as_needed()),
            r => r.map_err(io_err("bringing the tap up"))?,
        }
        changed.push("up".to_string());
    }
    Ok(changed)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Tap {
    /// Creates the tap, or attaches to an existing one, in the configured namespace; gives it
    /// the MTU (and MAC) and brings it up where it is not so already.
    pub fn open(cfg: &TapConfig) -> Result<Tap, TapError> {
        check_name(&cfg.name)?;
        let cfg2 = cfg.clone();
        netns::run_in(cfg.netns.as_deref(), move || Self::open_here(&cfg2))
    }

    fn open_here(cfg: &TapConfig) -> Result<Tap, TapError> {
        let io_err = |op| io_err(op, &cfg.name);
        let ctl = ctl_socket().map_err(io_err("socket"))?;
        let existed = ifindex(ctl.as_raw_fd(), &cfg.name).is_some();
        let multi_queue = cfg.queues > 1;
        let mut queues = Vec::with_capacity(cfg.queues);
        for _ in 0..cfg.queues.max(1) {
            let file = attach_patiently(&cfg.name, multi_queue, cfg.tun).map_err(|e| match e {
                Attach::Open(e) => match e.kind() {
                    io::ErrorKind::NotFound => TapError::NoTunDevice,
                    io::ErrorKind::PermissionDenied => TapError::TunPermission,
                    _ => TapError::Io {
                        op: "open /dev/net/tun",
                        name: cfg.name.clone(),
                        cause: e,
                    },
                },
                Attach::SetIff(e) => why_not_attached(cfg, existed, e),
            })?;
            queues.push(file);
        }
        let tap = Tap {
            name: cfg.name.clone(),
            attached: Mutex::new(vec![true; queues.len()]),
            hdr_len: AtomicUsize::new(0),
            queues,
            created: !existed,
            keep: false.into(),
        };
        // Persistent while we run: a crash leaves the tap (and the card's addresses on it) in
        // place for the restarted daemon to attach to.
        val_ioctl(tap.queues[0].as_raw_fd(), libc::TUNSETPERSIST, 1)
            .map_err(io_err("TUNSETPERSIST"))?;
        tap.set_vnet_hdr_len(12)
            .map_err(io_err("TUNSETVNETHDRSZ"))?;
        tap.set_offload(0).map_err(io_err("TUNSETOFFLOAD"))?;
        let changed = set_link(ctl.as_raw_fd(), cfg)?;
        info!(
            "{} {} {} in {} with {} queue(s), MTU {}{}",
            if cfg.tun { "tun" } else { "tap" },
            cfg.name,
            if existed { "attached" } else { "created" },
            cfg.netns.as_deref().unwrap_or("the daemon's namespace"),
            tap.queues.len(),
            cfg.mtu,
            if existed && changed.is_empty() {
                " (already as needed: nothing changed)".to_string()
            } else if existed {
                format!(" (set: {})", changed.join(", "))
            } else {
                String::new()
            }
        );
        Ok(tap)
    }

    /// The tap whose queue descriptors another vhost-card process handed over (a live
    /// handover): the same device, nothing opened or changed. Each queue must be attached, or
    /// detached, to tap `name` (TUNGETIFF answers for a detached queue too and says so with
    /// IFF_DETACH_QUEUE, which gives each queue's attach state). `created`: the daemon created
    /// the tap, so it goes when the daemon ends (unless `--keep-tap`).
    pub fn adopt(name: &str, queues: Vec<OwnedFd>, created: bool) -> Result<Tap, TapError> {
        check_name(name)?;
        let mut attached = Vec::with_capacity(queues.len());
        for q in &queues {
            let (of, flags) = queue_identity(q.as_raw_fd()).map_err(io_err("TUNGETIFF", name))?;
            if of != name || i32::from(flags) & libc::IFF_TAP == 0 {
                return Err(TapError::NotATap(name.to_string()));
            }
            attached.push(i32::from(flags) & libc::IFF_DETACH_QUEUE == 0);
        }
        let Some(first) = queues.first() else {
            return Err(TapError::NotATap(name.to_string()));
        };
        let mut len: i32 = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one c_int to the pointer, valid for the call.
        let rc = unsafe { libc::ioctl(first.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut len) };
        if rc < 0 {
            return Err(io_err("TUNGETVNETHDRSZ", name)(io::Error::last_os_error()));
        }
        Ok(Tap {
            name: name.to_string(),
            attached: Mutex::new(attached),
            hdr_len: AtomicUsize::new(usize::try_from(len).unwrap_or(0)),
            queues: queues.into_iter().map(File::from).collect(),
            created,
            keep: false.into(),
        })
    }

    /// Whether this daemon created the tap (it then goes when the daemon ends, unless kept).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Keeps the tap this daemon created when it exits (`--keep-tap`), from now on.
    pub fn keep_when_done(&self, keep: bool) {
        self.keep.store(keep, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether queue pair `i`'s queue is attached to the device.
    pub fn queue_attached(&self, i: usize) -> bool {
        let attached = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        attached.get(i).copied().unwrap_or(false)
    }

    /// The descriptor of queue pair `i`.
    pub fn queue_fd(&self, i: usize) -> RawFd {
        self.queues[i].as_raw_fd()
    }

    /// Follows the frontend's use of queue pair `i`: the tap queue of a pair it does not use is
    /// detached from the device (`TUNSETQUEUE`); a repeat of the current state does nothing, so the card's kernel spreads
    /// card-to-host flows over the pairs the host really reads, as QEMU's tap backend does. A
    /// guest with fewer vCPUs than queue pairs enables only some. Pair 0 always stays attached:
    /// a tap without an attached queue drops everything.
    pub fn set_pair_enabled(&self, i: usize, enabled: bool) {
        if i == 0 || i >= self.queues.len() {
            return;
        }
        let mut attached = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        if attached[i] == enabled {
            return;
        }
        let mut ifr = ifreq_with_name("");
        let flag = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        ifr.ifr_ifru.ifru_flags = flag as libc::c_short;
        match ifr_ioctl(self.queues[i].as_raw_fd(), libc::TUNSETQUEUE, &mut ifr) {
            Ok(()) => {
                attached[i] = enabled;
                debug!(
                    "tap {} queue {i} {}",
                    self.name,
                    if enabled { "attached" } else { "detached" }
                );
            }
            Err(e) => warn!(
                "tap {} queue {i}: cannot {} it: {e}",
                self.name,
                if enabled { "attach" } else { "detach" }
            ),
        }
    }

    /// Attaches every queue again (between frontend sessions).
    pub fn attach_all(&self) {
        for i in 1..self.queues.len() {
            self.set_pair_enabled(i, true);
        }
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Sets the vnet header length the tap reads and writes (10 or 12).
    pub fn set_vnet_hdr_len(&self, len: i32) -> io::Result<()> {
        // SAFETY: TUNSETVNETHDRSZ reads one c_int from the pointer, valid for the call.
        let rc = unsafe {
            libc::ioctl(
                self.queues[0].as_raw_fd(),
                libc::TUNSETVNETHDRSZ,
                &len as *const i32,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            self.hdr_len
                .store(usize::try_from(len).unwrap_or(0), Ordering::Relaxed);
            Ok(())
        }
    }

    /// Writes one frame of the card's own (not the host's) into the card's network, as if the
    /// host had sent it: behind a vnet header with no offload requested.
    pub fn inject(&self, frame: &[u8]) -> io::Result<()> {
        let hdr = [0u8; crate::vnet::HDR_MAX];
        let hdr_len = self.hdr_len.load(Ordering::Relaxed).min(hdr.len());
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr_len,
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: two iovecs over buffers that outlive the call; the kernel only reads them.
        let n = unsafe { libc::writev(self.queues[0].as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Tells the kernel which partial-checksum and GSO frames the reader (the host) accepts.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        val_ioctl(
            self.queues[0].as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    }

    /// Whether the running kernel accepts these offload bits.
    pub fn supports_offload(&self, flags: u32) -> bool {
        let ok = self.set_offload(flags).is_ok();
        let _ = self.set_offload(0);
        ok
    }
}

impl Tap {
    /// Lets a tap this daemon created go when its last queue closes (the process ends), unless
    /// it is kept; once. The daemon calls it as it exits: threads that outlive the serve loop
    /// (the control socket's) may still hold the tap, so its drop would come too late.
    pub fn release(&self) {
        use std::sync::atomic::Ordering;
        if self.created && !self.keep.swap(true, Ordering::Relaxed) {
            match val_ioctl(self.queues[0].as_raw_fd(), libc::TUNSETPERSIST, 0) {
                // EBADFD: the device is already gone.
                Err(e) if e.raw_os_error() != Some(libc::EBADFD) => {
                    warn!("cannot release tap {}: {e}", self.name)
                }
                _ => {}
            }
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.release();
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("'{s}' is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(format!("'{s}' is not a MAC address (aa:bb:cc:dd:ee:ff)"));
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| format!("'{s}' is not a MAC address"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("'{s}' is a multicast address"));
    }
    // Linux refuses it for a tap, and virtio_net replaces it with a random one (VDUSE).
    if mac == [0; 6] {
        return Err(format!("'{s}' is the all-zero address"));
    }
    Ok(mac)
}

/// Keeps `CString` out of the public API while letting tests look a tap up by name.
pub fn exists_here(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:00:00:aa:bb:cc").unwrap(),
            [2, 0, 0, 0xaa, 0xbb, 0xcc]
        );
        assert!(parse_mac("02:00:00:aa:bb").is_err());
        assert!(parse_mac("01:00:00:aa:bb:cc").is_err());
        assert!(parse_mac("zz:00:00:aa:bb:cc").is_err());
        assert!(parse_mac("00:00:00:00:00:00").is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("card0").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a-very-long-name-x").is_err());
        assert!(check_name("a/b").is_err());
    }
}
