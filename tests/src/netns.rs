//! Network namespaces owned by a test: created with `ip netns add`, deleted on drop (also when
//! the test panics), plus the few things the tests do inside them: `ip` commands, sysctls, and
//! sockets created by a thread that entered the namespace (a socket stays in the namespace it
//! was created in, whichever thread uses it later).

use std::fs::File;
use std::net::{SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::{require_root, run, unique};

/// A network namespace that lives as long as this value.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `ct<pid>x<n><tag>` with its loopback up.
    pub fn new(tag: &str) -> Result<Self> {
        require_root()?;
        let name = format!("{}{tag}", unique("ct"));
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME args...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec NAME program args...`
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
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

    /// Runs `f` on a thread that entered this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        let name = self.name.as_str();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns(2) on a namespace file we hold open; it only changes the network
                // namespace of this thread, which ends when `f` returns.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    bail!("setns({name}): {}", std::io::Error::last_os_error());
                }
                f()
            })
            .join()
            .map_err(|_| anyhow!("thread inside namespace {name} panicked"))?
        })
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
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}

/// Creates a veth pair with one end (`a_dev`) in `a` and the other (`b_dev`) in `b`.
pub fn veth_pair(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    a.ip(&[
        "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", &b.name,
    ])
    .map(drop)
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
        if !crate::vring::poll_in(self.fd.as_raw_fd(), timeout)? {
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
