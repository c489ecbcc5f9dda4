//! The vdpa device on top of a VDUSE device, over the kernel's `vdpa` generic-netlink family (what
//! `vdpa dev add name NAME mgmtdev vduse` and `vdpa dev del NAME` send), and the choice of the
//! vdpa bus driver that takes it (`virtio_vdpa`: a host interface; `vhost_vdpa`: a
//! /dev/vhost-vdpa-N for a VMM).
//!
//! Adding and deleting a vdpa device needs CAP_NET_ADMIN, which the sandboxed daemon no longer
//! has. So a small manager process is forked at start-up, before anything else is open, and
//! keeps the privileges for exactly these two requests ([`Manager`]); the daemon asks it over a
//! socket pair. It ignores SIGINT/SIGTERM (the daemon decides when the device goes) and exits
//! when the daemon's end of the socket closes, touching nothing: after a crash the device stays
//! for the restarted daemon to take back.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use clap::ValueEnum;
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NetlinkMessage, NetlinkPayload, NlasIterator, Parseable,
    ParseableParametrized, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

/// Which vdpa bus driver the daemon binds the device to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Bind {
    /// `virtio_vdpa`: the host kernel's own virtio_net drives the card (a host interface).
    Virtio,
    /// `vhost_vdpa`: a /dev/vhost-vdpa-N character device for QEMU's `-netdev vhost-vdpa`.
    Vhost,
    /// No vdpa device: add it yourself with `vdpa dev add name NAME mgmtdev vduse`.
    None,
}

impl Bind {
    /// The kernel's name of the driver.
    pub fn driver(self) -> Option<&'static str> {
        match self {
            Bind::Virtio => Some("virtio_vdpa"),
            Bind::Vhost => Some("vhost_vdpa"),
            Bind::None => None,
        }
    }
}

const VDPA_GENL_NAME: &str = "vdpa";
const VDPA_GENL_VERSION: u8 = 1;
const VDPA_CMD_DEV_NEW: u8 = 3;
const VDPA_CMD_DEV_DEL: u8 = 4;
const VDPA_ATTR_MGMTDEV_DEV_NAME: u16 = 2;
const VDPA_ATTR_DEV_NAME: u16 = 4;
/// VDUSE's management device (no bus name).
const MGMTDEV: &str = "vduse";

/// One message of the `vdpa` family: a command and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VdpaMsg {
    cmd: u8,
    nlas: Vec<DefaultNla>,
}

impl GenlFamily for VdpaMsg {
    fn family_name() -> &'static str {
        VDPA_GENL_NAME
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        VDPA_GENL_VERSION
    }
}

impl Emitable for VdpaMsg {
    fn buffer_len(&self) -> usize {
        self.nlas.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.nlas.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for VdpaMsg {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let nlas = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|nla| DefaultNla::parse(&nla)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VdpaMsg {
            cmd: header.cmd,
            nlas,
        })
    }
}

fn string_nla(kind: u16, s: &str) -> DefaultNla {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    DefaultNla::new(kind, v)
}

/// A generic-netlink socket with the `vdpa` family resolved.
pub struct Vdpa {
    socket: Socket,
    family: u16,
}

impl Vdpa {
    pub fn open() -> io::Result<Vdpa> {
        let mut socket = Socket::new(NETLINK_GENERIC)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let mut v = Vdpa { socket, family: 0 };
        v.family = v.resolve().map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "the kernel has no 'vdpa' netlink family: load the vdpa module (modprobe vdpa; CONFIG_VDPA)",
                )
            } else {
                e
            }
        })?;
        Ok(v)
    }

    /// Sends one request with NLM_F_ACK.
    fn send<F>(&self, g: GenlMessage<F>) -> io::Result<()>
    where
        F: GenlFamily + Emitable + std::fmt::Debug,
    {
        let mut m = NetlinkMessage::from(g);
        m.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        self.socket.send(&buf, 0).map(|_| ())
    }

    /// Reads replies until the acknowledgement, handing every other message to `each`.
    fn until_ack<F>(&self, mut each: impl FnMut(F)) -> io::Result<()>
    where
        F: GenlFamily + ParseableParametrized<[u8], GenlHeader> + Emitable + std::fmt::Debug,
    {
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut at = 0;
            while at < data.len() {
                let msg = NetlinkMessage::<GenlMessage<F>>::deserialize(&data[at..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::InnerMessage(g) => each(g.payload),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                at += len;
            }
        }
    }

    fn resolve(&self) -> io::Result<u16> {
        let mut g = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(VDPA_GENL_NAME.into())],
        });
        g.finalize();
        self.send(g)?;
        let mut family = None;
        self.until_ack(|c: GenlCtrl| {
            family = family.or(c.nlas.iter().find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            }));
        })?;
        family.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&self, cmd: u8, nlas: Vec<DefaultNla>) -> io::Result<()> {
        let mut g = GenlMessage::from_payload(VdpaMsg { cmd, nlas });
        g.set_resolved_family_id(self.family);
        g.finalize();
        self.send(g)?;
        self.until_ack(|_: VdpaMsg| {})
    }

    /// `vdpa dev add name NAME mgmtdev vduse`.
    pub fn dev_add(&self, name: &str) -> io::Result<()> {
        self.request(
            VDPA_CMD_DEV_NEW,
            vec![
                string_nla(VDPA_ATTR_MGMTDEV_DEV_NAME, MGMTDEV),
                string_nla(VDPA_ATTR_DEV_NAME, name),
            ],
        )
    }

    /// `vdpa dev del NAME`.
    pub fn dev_del(&self, name: &str) -> io::Result<()> {
        self.request(VDPA_CMD_DEV_DEL, vec![string_nla(VDPA_ATTR_DEV_NAME, name)])
    }
}

/// Where sysfs shows the vdpa device `name`.
pub fn sysfs_dev(name: &str) -> std::path::PathBuf {
    Path::new("/sys/bus/vdpa/devices").join(name)
}

/// The vdpa bus driver bound to `name`, if any.
pub fn bound_driver(name: &str) -> Option<String> {
    let link = std::fs::read_link(sysfs_dev(name).join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Makes `driver` the one bound to vdpa device `name` (unbinding another one first).
fn bind_driver(name: &str, driver: &str) -> io::Result<()> {
    if bound_driver(name).as_deref() == Some(driver) {
        return Ok(());
    }
    let drivers = Path::new("/sys/bus/vdpa/drivers");
    if !drivers.join(driver).exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("the {driver} driver is not loaded (modprobe {driver})"),
        ));
    }
    if let Some(other) = bound_driver(name) {
        std::fs::write(drivers.join(other).join("unbind"), name)?;
    }
    std::fs::write(sysfs_dev(name).join("driver_override"), driver)?;
    std::fs::write(drivers.join(driver).join("bind"), name)?;
    Ok(())
}

/// The daemon's end of the manager process.
pub struct Manager {
    stream: BufReader<UnixStream>,
    pub pid: libc::pid_t,
}

/// How long one request to the manager may take (a vdpa device add probes the driver, which
/// waits for the daemon's answers to its status writes).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl Manager {
    /// Forks the manager for vdpa device `name` and `bind`'s driver, both fixed here: the
    /// sandboxed daemon can only ask it to add, delete or look at that one device, so a daemon
    /// taken over cannot steer its privileges anywhere else. Call while the process is
    /// single-threaded, before the device, the tap or any other descriptor the manager must not
    /// hold is open.
    pub fn spawn(name: &str, bind: Bind) -> io::Result<Manager> {
        let (ours, theirs) = UnixStream::pair()?;
        // SAFETY: the process is single-threaded here (the caller's contract), so the child may
        // run ordinary code; it only ever runs `manager_main`, which never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            drop(ours);
            manager_main(theirs, name, bind);
        }
        drop(theirs);
        ours.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        Ok(Manager {
            stream: BufReader::new(ours),
            pid,
        })
    }

    fn ask(&mut self, line: &str) -> io::Result<String> {
        writeln!(self.stream.get_mut(), "{line}")?;
        let mut reply = String::new();
        if self.stream.read_line(&mut reply)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the vdpa manager process is gone",
            ));
        }
        let reply = reply.trim_end();
        match reply.strip_prefix("ok") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => Err(io::Error::other(
                reply.strip_prefix("err ").unwrap_or(reply).to_string(),
            )),
        }
    }

    /// Adds the vdpa device and binds the driver; returns the driver bound.
    pub fn add(&mut self) -> io::Result<String> {
        self.ask("add")
    }

    /// Deletes the vdpa device (nothing when there is none).
    pub fn del(&mut self) -> io::Result<()> {
        self.ask("del").map(|_| ())
    }

    /// Whether the vdpa device exists, as the manager sees sysfs.
    pub fn exists(&mut self) -> io::Result<bool> {
        self.ask("exists").map(|r| r == "yes")
    }
}

impl Drop for Manager {
    /// Closing the socket ends the manager (not waited for: the sandbox allows no wait4, and
    /// the daemon exits right after).
    fn drop(&mut self) {
        let _ = self.stream.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

/// The manager process: answers `add`, `del` and `exists` for its one device until the
/// daemon's end closes, then exits.
fn manager_main(stream: UnixStream, name: &str, bind: Bind) -> ! {
    // SAFETY: dup2 onto descriptor 3 and closing everything above it, in the child, which owns
    // nothing else it needs; then ignoring the stop signals (the daemon decides) and naming
    // the process.
    unsafe {
        let fd = stream.as_raw_fd();
        if fd != 3 {
            libc::dup2(fd, 3);
        }
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::prctl(libc::PR_SET_NAME, c"vdpa-manager".as_ptr());
    }
    std::mem::forget(stream);
    // SAFETY: descriptor 3 is the socket duplicated above and nothing else owns it.
    let stream = unsafe { UnixStream::from_raw_fd(3) };
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => exit(1),
    };
    let mut vdpa: Option<Vdpa> = None;
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let reply = match line.trim() {
            "add" => netlink(&mut vdpa).and_then(|v| {
                v.dev_add(name).map_err(|e| describe_add_error(name, e))?;
                if let Some(driver) = bind.driver() {
                    bind_driver(name, driver)?;
                }
                Ok(bound_driver(name).unwrap_or_else(|| "none".into()))
            }),
            "del" if !sysfs_dev(name).exists() => Ok(String::new()),
            "del" => netlink(&mut vdpa).and_then(|v| v.dev_del(name).map(|_| String::new())),
            "exists" => Ok(if sysfs_dev(name).exists() {
                "yes"
            } else {
                "no"
            }
            .into()),
            _ => Err(io::Error::other("bad request")),
        };
        let text = match reply {
            Ok(r) => format!("ok {r}\n"),
            Err(e) => format!("err {e}\n"),
        };
        if out.write_all(text.as_bytes()).is_err() {
            break;
        }
    }
    exit(0)
}

fn netlink(v: &mut Option<Vdpa>) -> io::Result<&Vdpa> {
    if v.is_none() {
        *v = Some(Vdpa::open()?);
    }
    v.as_ref()
        .ok_or_else(|| io::Error::other("no netlink socket"))
}

fn describe_add_error(name: &str, e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EEXIST) => io::Error::other(format!("a vdpa device {name} exists already")),
        Some(libc::EPERM) => {
            io::Error::other("adding a vdpa device needs CAP_NET_ADMIN (run as root)")
        }
        Some(libc::ENODEV) => {
            io::Error::other("the kernel has no 'vduse' vdpa management device (modprobe vduse)")
        }
        _ => io::Error::other(format!("vdpa dev add {name}: {e}")),
    }
}

fn exit(code: i32) -> ! {
    // SAFETY: _exit ends the forked child without running the parent's atexit handlers or
    // destructors, which belong to the daemon.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_request_bytes() {
        let mut g = GenlMessage::from_payload(VdpaMsg {
            cmd: VDPA_CMD_DEV_NEW,
            nlas: vec![
                string_nla(VDPA_ATTR_MGMTDEV_DEV_NAME, MGMTDEV),
                string_nla(VDPA_ATTR_DEV_NAME, "card"),
            ],
        });
        g.set_resolved_family_id(0x1d);
        g.finalize();
        let mut m = NetlinkMessage::from(g);
        m.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        // nlmsghdr: length, type = family id, flags; genlmsghdr: cmd 3, version 1.
        assert_eq!(
            u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize,
            buf.len()
        );
        assert_eq!(u16::from_ne_bytes(buf[4..6].try_into().unwrap()), 0x1d);
        assert_eq!(buf[16], VDPA_CMD_DEV_NEW);
        assert_eq!(buf[17], 1);
        // First attribute: length 4 + "vduse\0" (10), type 2.
        assert_eq!(u16::from_ne_bytes(buf[20..22].try_into().unwrap()), 10);
        assert_eq!(u16::from_ne_bytes(buf[22..24].try_into().unwrap()), 2);
        assert_eq!(&buf[24..30], b"vduse\0");
    }

    #[test]
    fn bind_names_the_driver() {
        assert_eq!(Bind::Virtio.driver(), Some("virtio_vdpa"));
        assert_eq!(Bind::Vhost.driver(), Some("vhost_vdpa"));
        assert_eq!(Bind::None.driver(), None);
    }
}
