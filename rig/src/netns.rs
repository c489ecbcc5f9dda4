//! Network namespaces that exist for as long as their guard does (deleted on drop, also when a
//! test panics or the task is interrupted), the things done inside them (`ip` commands,
//! sysctls, commands) and sockets created by a thread that entered the namespace (a socket
//! stays in the namespace it was created in, whichever thread uses it later).

use std::fs::File;
use std::net::{SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::process::{require_root, sh, unique};

/// A network namespace that lives as long as this value.
pub struct Netns {
    name: String,
}

/// Moves the calling thread into the namespace of `file` (setns(2) changes only that thread).
pub fn enter_thread(file: &File) -> Result<()> {
    // SAFETY: setns(2) with an open namespace file descriptor; it changes only this thread's
    // network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

/// The namespace file of `name` (from `ip netns add`).
pub fn open(name: &str) -> Result<File> {
    let path = format!("/run/netns/{name}");
    File::open(&path).with_context(|| format!("opening {path}"))
}

impl Netns {
    /// Creates a fresh namespace named `<prefix><pid>x<n>` with `lo` up.
    pub fn new(prefix: &str) -> Result<Self> {
        require_root()?;
        let name = unique(prefix);
        sh("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME args...`; its output.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Whether `dev` exists in the namespace.
    pub fn has_link(&self, dev: &str) -> bool {
        self.ip(&["link", "show", "dev", dev]).is_ok()
    }

    /// The card's address `cidr` on `dev` and a permanent neighbour entry for the host (`host`
    /// at `host_mac`), so no ARP is needed before the first frame.
    pub fn card_address(&self, dev: &str, cidr: &str, host: &str, host_mac: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", dev])?;
        self.ip(&[
            "neigh",
            "replace",
            host,
            "lladdr",
            host_mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
        Ok(())
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// `ip netns exec NAME program args...`
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Sets a sysctl inside the namespace (`net.ipv4.ip_forward=1`).
    pub fn sysctl(&self, setting: &str) -> Result<()> {
        self.exec("sysctl", &["-q", "-w", setting]).map(drop)
    }

    /// The MAC address of `dev` in this namespace.
    pub fn mac_of(&self, dev: &str) -> Result<[u8; 6]> {
        let out = self.ip(&["-o", "link", "show", "dev", dev])?;
        let text = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .ok_or_else(|| anyhow!("no link/ether in `{out}`"))?;
        parse_mac(text)
    }

    /// Runs `f` on a thread that entered this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let file = open(&self.name)?;
        in_namespace(&file, f).with_context(|| format!("inside namespace {}", self.name))
    }

    /// A UDP socket bound to `addr` inside the namespace, with a receive timeout.
    pub fn udp_socket(&self, addr: SocketAddrV4) -> Result<UdpSocket> {
        let sock = self.enter(|| UdpSocket::bind(addr).with_context(|| format!("bind {addr}")))?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(sock)
    }

    /// A non-blocking TCP listener on `addr` inside the namespace.
    pub fn tcp_listener(&self, addr: SocketAddrV4) -> Result<TcpListener> {
        let l = self.enter(|| TcpListener::bind(addr).with_context(|| format!("listen {addr}")))?;
        l.set_nonblocking(true)?;
        Ok(l)
    }

    /// An AF_PACKET socket that sends raw Ethernet frames out of `dev` in this namespace.
    pub fn packet_socket(&self, dev: &str) -> Result<PacketSocket> {
        let dev = dev.to_string();
        self.enter(move || PacketSocket::open(&dev))
    }

    /// An AF_PACKET socket that receives the frames of EtherType `ethertype` arriving on `dev`
    /// in this namespace (from the time it is opened).
    pub fn packet_listener(&self, dev: &str, ethertype: u16) -> Result<PacketListener> {
        let dev = dev.to_string();
        self.enter(move || PacketListener::open(&dev, ethertype))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Not through anything that checks for Ctrl-C: this is exactly what must still happen
        // then.
        if let Err(e) = sh("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: {e:#}");
        }
    }
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC '{text}'");
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC '{text}'"))?;
    }
    Ok(mac)
}

/// Creates a veth pair with one end (`a_dev`) in `a` and the other (`b_dev`) in `b`.
pub fn veth_pair(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    a.ip(&[
        "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", &b.name,
    ])
    .map(drop)
}

/// An AF_PACKET socket that sends out of `dev` in the namespace of `ns` (a namespace file
/// opened by the caller, e.g. another mount namespace's `/run/netns/NAME` through
/// `/proc/PID/root`).
pub fn packet_socket_in(ns: &File, dev: &str) -> Result<PacketSocket> {
    in_namespace(ns, || PacketSocket::open(dev))
}

/// Runs `f` on a thread that entered the namespace of `ns` (an open namespace file).
pub fn in_namespace<T: Send>(ns: &File, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_thread(ns)?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread inside a namespace panicked"))?
    })
}

/// A raw AF_PACKET socket bound to one interface, for injecting frames.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    fn open(dev: &str) -> Result<Self> {
        let cdev = std::ffi::CString::new(dev)?;
        // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(cdev.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {dev}: {}", std::io::Error::last_os_error());
        }
        // Protocol 0: this socket only sends, it never receives.
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(PacketSocket {
            fd,
            ifindex: i32::try_from(ifindex)?,
        })
    }

    /// Sends one complete Ethernet frame.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `sll` are valid for reads of the lengths passed for the whole call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            bail!(
                "sending a {}-byte frame: {}",
                frame.len(),
                std::io::Error::last_os_error()
            );
        }
        if n as usize != frame.len() {
            bail!("short send: {n} of {} bytes", frame.len());
        }
        Ok(())
    }
}

/// A raw AF_PACKET socket bound to one interface and one EtherType, for watching frames.
pub struct PacketListener {
    fd: OwnedFd,
}

impl PacketListener {
    fn open(dev: &str, ethertype: u16) -> Result<Self> {
        let cdev = std::ffi::CString::new(dev)?;
        // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(cdev.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {dev}: {}", std::io::Error::last_os_error());
        }
        let proto = i32::from(ethertype.to_be());
        // SAFETY: plain socket(2); the result is checked before use.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ethertype.to_be();
        sll.sll_ifindex = i32::try_from(ifindex)?;
        // SAFETY: binds our socket to a sockaddr_ll that outlives the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!("binding to {dev}: {}", std::io::Error::last_os_error());
        }
        Ok(PacketListener { fd })
    }

    /// The next frame, or `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 2048];
        // SAFETY: reads into our own buffer of the length given.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            bail!("recv: {}", std::io::Error::last_os_error());
        }
        buf.truncate(n.unsigned_abs());
        Ok(Some(buf))
    }
}
