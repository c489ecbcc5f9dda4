//! The card's end of the test traffic: sockets opened by threads that have
//! entered the card's network namespace (setns(2) moves only the calling
//! thread), so the traffic never leaves the namespaces we created. Every
//! blocking call has a deadline.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::payload::Hasher;

/// Runs `f` on a new thread inside network namespace `ns` (a name from
/// `ip netns add`).
pub fn spawn_in<T, F>(ns: &str, what: &str, f: F) -> Result<JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let file = crate::netns::open(ns)?;
    std::thread::Builder::new()
        .name(what.to_string())
        .spawn(move || {
            crate::netns::enter_thread(&file)?;
            drop(file);
            f()
        })
        .with_context(|| format!("spawning the {what} thread"))
}

/// Waits for a thread started by [`spawn_in`].
pub fn join<T>(handle: JoinHandle<Result<T>>) -> Result<T> {
    match handle.join() {
        Ok(result) => result,
        Err(_) => bail!("a card-side thread panicked"),
    }
}

/// One bulk transfer as the card saw it.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub bytes: u64,
    pub sha256: String,
    /// From the first byte to the last (receiver) or from connect to the
    /// peer's acknowledgement of the last byte (sender).
    pub elapsed: Duration,
}

impl Transfer {
    /// Megabytes (10^6 bytes) per second.
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Progress of a receive, shared with whoever watches it.
#[derive(Default)]
pub struct Progress {
    pub bytes: AtomicU64,
    /// Milliseconds since the receive started at which the last data arrived.
    pub last_data_ms: AtomicU64,
}

/// Accepts one TCP connection on `bind` inside `ns`, reads to EOF and hashes
/// what arrived. Returns once the socket listens; the handle yields the
/// result. `idle` bounds the wait for the connection and any pause in the
/// data; `deadline` the whole transfer.
pub fn tcp_receive(
    ns: &str,
    bind: SocketAddrV4,
    idle: Duration,
    total: Duration,
    progress: Arc<Progress>,
) -> Result<JoinHandle<Result<Transfer>>> {
    let (tx, rx) = mpsc::channel();
    let handle = spawn_in(ns, "card-tcp-rx", move || {
        let listener = match TcpListener::bind(bind) {
            Ok(l) => l,
            Err(e) => {
                tx.send(Err(format!("bind {bind}: {e}"))).ok();
                return Err(e).context("binding the card's TCP listener");
            }
        };
        tx.send(Ok(())).ok();
        let start = Instant::now();
        let mut stream = accept_within(&listener, idle)?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        let deadline = start + total;
        let mut hasher = Hasher::new()?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut bytes = 0u64;
        let mut first: Option<Instant> = None;
        let mut last = Instant::now();
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                    bytes += n as u64;
                    hasher.update(&buf[..n])?;
                    progress.bytes.store(bytes, Ordering::SeqCst);
                    let ms = now.duration_since(start).as_millis() as u64;
                    progress.last_data_ms.store(ms, Ordering::SeqCst);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context(format!("receiving after {bytes} bytes")),
            }
            crate::interrupt::check_interrupted()?;
            let now = Instant::now();
            if now > deadline {
                bail!(
                    "transfer not finished after {} s ({bytes} bytes)",
                    total.as_secs()
                );
            }
            if now.duration_since(last) > idle && now.duration_since(start) > idle {
                bail!("no data for {} s after {bytes} bytes", idle.as_secs());
            }
        }
        Ok(Transfer {
            bytes,
            sha256: hasher.finish()?,
            elapsed: first.map_or(Duration::ZERO, |f| last.duration_since(f)),
        })
    })?;
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(msg)) => {
            join(handle).ok();
            bail!("{msg}")
        }
        Err(_) => {
            // The thread failed before listening: report its error.
            join(handle)?;
            bail!("the card's TCP receiver did not start")
        }
    }
}

fn accept_within(listener: &TcpListener, timeout: Duration) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("accept"),
        }
        crate::interrupt::check_interrupted()?;
        if Instant::now() > deadline {
            bail!("no connection within {} s", timeout.as_secs());
        }
        sleep(Duration::from_millis(20));
    }
}

/// Connects from `ns` to `to` (retrying until `connect_timeout`: the peer
/// may still be starting its listener), sends `data` and closes, waiting
/// until the peer has acknowledged every byte (SO_LINGER).
pub fn tcp_send(
    ns: &str,
    to: SocketAddrV4,
    data: Arc<Vec<u8>>,
    connect_timeout: Duration,
    total: Duration,
) -> Result<JoinHandle<Result<Transfer>>> {
    spawn_in(ns, "card-tcp-tx", move || {
        let deadline = Instant::now() + connect_timeout;
        let mut stream = loop {
            match TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    if !matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::TimedOut) {
                        bail!("connecting to {to}: {e}");
                    }
                    crate::interrupt::check_interrupted()?;
                    sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e).context(format!("connecting to {to}")),
            }
        };
        let start = Instant::now();
        let secs = libc::c_int::try_from(total.as_secs()).unwrap_or(libc::c_int::MAX);
        stream.set_write_timeout(Some(total))?;
        set_linger(&stream, secs)?;
        stream
            .write_all(&data)
            .with_context(|| format!("sending {} bytes to {to}", data.len()))?;
        // With SO_LINGER, close blocks until the peer acknowledged the data.
        drop(stream);
        let elapsed = start.elapsed();
        Ok(Transfer {
            bytes: data.len() as u64,
            sha256: String::new(),
            elapsed,
        })
    })
}

fn set_linger(stream: &TcpStream, secs: libc::c_int) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: secs,
    };
    // SAFETY: setsockopt on an open socket with a pointer to a struct linger
    // and its size, as SO_LINGER expects.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_LINGER");
    }
    Ok(())
}

/// One IPv4 UDP frame seen on the card's interface.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Length of the whole Ethernet frame.
    pub len: usize,
    /// IPv4 total length.
    pub ip_len: usize,
    /// More-fragments flag set, or a non-zero fragment offset.
    pub fragment: bool,
    pub dont_fragment: bool,
    pub outgoing: bool,
}

/// What the card saw of one large datagram.
#[derive(Debug)]
pub struct DatagramCapture {
    /// Size of the datagram the card's socket received (receive direction).
    pub received: Option<usize>,
    pub intact: bool,
    /// Every IPv4 UDP frame between the two addresses on the interface.
    pub frames: Vec<Frame>,
    /// Every other frame on the interface meanwhile, in a few words, with
    /// "out " or "in " in front.
    pub others: Vec<String>,
}

/// Listens in `ns` with an AF_PACKET socket on `ifname` for IPv4 UDP frames
/// between `a` and `b` (either direction), and, if `port` is given, with a
/// UDP socket for one datagram. Stops after the datagram plus a short grace
/// period, or after `timeout`. Returns once both sockets are open.
pub fn capture_udp(
    ns: &str,
    ifname: &str,
    (a, b): (Ipv4Addr, Ipv4Addr),
    port: Option<u16>,
    timeout: Duration,
) -> Result<JoinHandle<Result<DatagramCapture>>> {
    let (tx, rx) = mpsc::channel();
    let ifname = ifname.to_string();
    let handle = spawn_in(ns, "card-capture", move || {
        let opened = (|| -> Result<(OwnedFd, Option<UdpSocket>)> {
            let packet = packet_socket(&ifname)?;
            let udp = match port {
                Some(port) => {
                    let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
                    s.set_nonblocking(true)?;
                    Some(s)
                }
                None => None,
            };
            Ok((packet, udp))
        })();
        let (packet, udp) = match opened {
            Ok(ok) => {
                tx.send(Ok(())).ok();
                ok
            }
            Err(e) => {
                tx.send(Err(format!("{e:#}"))).ok();
                return Err(e);
            }
        };
        let start = Instant::now();
        let mut frames = Vec::new();
        let mut others = Vec::new();
        let mut received = None;
        let mut intact = false;
        let mut done_at: Option<Instant> = None;
        let mut buf = vec![0u8; 70_000];
        loop {
            while let Some((len, outgoing, bare_ip)) = recv_frame(&packet, &mut buf)? {
                let mut data = &buf[..len.min(buf.len())];
                // A tun (the IP-only link) carries bare IP packets: seen with the Ethernet
                // header the host receives them with.
                let with_eth;
                let len = if bare_ip {
                    let ethertype: [u8; 2] = match data.first().map(|b| b >> 4) {
                        Some(6) => [0x86, 0xdd],
                        _ => [0x08, 0x00],
                    };
                    with_eth = [&[0u8; 12][..], &ethertype, data].concat();
                    data = &with_eth;
                    len + 14
                } else {
                    len
                };
                if let Some(frame) = parse_frame(data, len, a, b, outgoing) {
                    frames.push(frame);
                    if port.is_none() {
                        done_at.get_or_insert(Instant::now());
                    }
                } else {
                    let dir = if outgoing { "out" } else { "in" };
                    others.push(format!("{dir} {}", frame_kind(data)));
                }
            }
            if let Some(sock) = &udp {
                match sock.recv_from(&mut buf) {
                    Ok((n, _)) => {
                        received = Some(n);
                        intact = buf[..n] == crate::image::pattern(n)[..];
                        done_at.get_or_insert(Instant::now());
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e).context("recvfrom on the card"),
                }
            }
            crate::interrupt::check_interrupted()?;
            // Half a second more for stray fragments after the datagram.
            if done_at.is_some_and(|t| t.elapsed() > Duration::from_millis(500)) {
                break;
            }
            if start.elapsed() > timeout {
                break;
            }
            sleep(Duration::from_millis(10));
        }
        Ok(DatagramCapture {
            received,
            intact,
            frames,
            others,
        })
    })?;
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(msg)) => {
            join(handle).ok();
            bail!("opening the card's capture: {msg}")
        }
        Err(_) => {
            join(handle)?;
            bail!("the card's capture did not start")
        }
    }
}

/// A non-blocking AF_PACKET socket bound to `ifname` (all protocols, both
/// directions).
pub fn packet_socket(ifname: &str) -> Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::c_int::from(proto),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: `fd` is a socket we just opened and own exclusively.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error()).context(format!("no interface {ifname}"));
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = libc::c_int::try_from(index)?;
    // SAFETY: bind(2) with a valid sockaddr_ll and its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("binding the AF_PACKET socket");
    }
    Ok(fd)
}

/// The next frame: its real length (MSG_TRUNC), whether we sent it, and whether it is a bare IP
/// packet (a tun has no link-layer header).
pub fn recv_frame(fd: &OwnedFd, buf: &mut [u8]) -> Result<Option<(usize, bool, bool)>> {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: recvfrom(2) into a buffer we own, with its length, and a
    // sockaddr_ll with its size.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
            (&mut from as *mut libc::sockaddr_ll).cast(),
            &mut from_len,
        )
    };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) {
            return Ok(None);
        }
        return Err(err).context("receiving from the AF_PACKET socket");
    }
    let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
    let bare_ip = from.sll_hatype == libc::ARPHRD_NONE;
    Ok(Some((usize::try_from(n)?, outgoing, bare_ip)))
}

/// An IPv4 UDP frame (or fragment) between `a` and `b`, if `data` is one.
fn parse_frame(data: &[u8], len: usize, a: Ipv4Addr, b: Ipv4Addr, outgoing: bool) -> Option<Frame> {
    let ip = data.get(14..34)?;
    if data[12..14] != [0x08, 0x00] || ip[0] >> 4 != 4 || ip[9] != 17 {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    if !((src == a && dst == b) || (src == b && dst == a)) {
        return None;
    }
    let flags_offset = u16::from_be_bytes([ip[6], ip[7]]);
    Some(Frame {
        len,
        ip_len: usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        fragment: flags_offset & 0x2000 != 0 || flags_offset & 0x1fff != 0,
        dont_fragment: flags_offset & 0x4000 != 0,
        outgoing,
    })
}

/// What a frame is, in a few words (for frames that are not the test's).
fn frame_kind(data: &[u8]) -> String {
    match data.get(12..14) {
        Some([0x08, 0x06]) => "ARP".into(),
        Some([0x86, 0xdd]) => match data.get(20) {
            Some(58) => format!("ICMPv6 type {}", data.get(54).copied().unwrap_or(0)),
            Some(n) => format!("IPv6 next header {n}"),
            None => "IPv6".into(),
        },
        Some([0x08, 0x00]) => format!("IPv4 protocol {}", data.get(23).copied().unwrap_or(0)),
        Some([hi, lo]) => format!("ethertype {:#06x}", u16::from_be_bytes([*hi, *lo])),
        _ => "runt".into(),
    }
}

/// Sends one UDP datagram of `size` bytes (the test pattern) from `ns` to
/// `to`, with fragmentation forbidden.
pub fn udp_send(ns: &str, to: SocketAddrV4, size: usize) -> Result<usize> {
    join(spawn_in(ns, "card-udp-tx", move || {
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        forbid_fragments(&sock)?;
        Ok(sock.send_to(&crate::image::pattern(size), to)?)
    })?)
}

/// IP_MTU_DISCOVER on a UDP socket: `IP_PMTUDISC_DO` (the kernel sets DF and refuses to
/// fragment, EMSGSIZE instead) or `IP_PMTUDISC_DONT` (DF clear: routers may fragment).
pub fn pmtu_discovery(sock: &UdpSocket, value: libc::c_int) -> Result<()> {
    // SAFETY: setsockopt on an open socket with a pointer to a c_int and
    // its size, as IP_MTU_DISCOVER expects.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("IP_MTU_DISCOVER");
    }
    Ok(())
}

/// [`pmtu_discovery`] with `IP_PMTUDISC_DO`: the datagram leaves as one frame or not at all.
pub fn forbid_fragments(sock: &UdpSocket) -> Result<()> {
    pmtu_discovery(sock, libc::IP_PMTUDISC_DO)
}

/// `SIOCGSTAMPNS` (asm-generic sockios.h): the kernel's receive time of the last frame read
/// from a socket, as a timespec on CLOCK_REALTIME.
const SIOCGSTAMPNS: libc::c_ulong = 0x8907;

/// The TCP ports of an IPv4 frame (Ethernet header first), if it is one.
fn tcp_ports(data: &[u8]) -> Option<(u16, u16)> {
    let ip = data.get(14..)?;
    if data.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let tcp = ip.get(usize::from(ip[0] & 0x0f) * 4..)?;
    Some((
        u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]),
        u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]),
    ))
}

/// Records the kernel's receive time (ns since the Unix epoch) of every IPv4 TCP frame to or
/// from one of `ports` crossing `ifname` in `ns`, either way, until `stop` is set; for the
/// gaps in a transfer.
pub fn capture_times(
    ns: &str,
    ifname: &str,
    ports: Vec<u16>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<JoinHandle<Result<Vec<u64>>>> {
    let frames = capture_frames(ns, ifname, ports, stop, Arc::default())?;
    Ok(std::thread::spawn(move || {
        Ok(join(frames)?.into_iter().map(|f| f.at).collect())
    }))
}

/// One frame of [`capture_frames`]: the kernel's receive time (ns since the Unix epoch) and
/// whether the card's side sent it (outgoing on the tap, towards the guest) or it came from
/// the guest (written to the tap by the backend).
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub at: u64,
    pub outgoing: bool,
}

/// As [`capture_times`], each frame with its direction, and `bytes` counting the captured
/// frames' lengths as they come (to act at a point of a transfer).
pub fn capture_frames(
    ns: &str,
    ifname: &str,
    ports: Vec<u16>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    bytes: Arc<AtomicU64>,
) -> Result<JoinHandle<Result<Vec<Seen>>>> {
    let ifname = ifname.to_string();
    spawn_in(ns, "card-capture", move || {
        let fd = packet_socket(&ifname)?;
        let size: libc::c_int = 64 << 20;
        // SAFETY: setsockopt on our socket with a c_int and its size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let mut seen = Vec::with_capacity(1 << 20);
        let mut buf = vec![0u8; 128];
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own, for the call.
            unsafe { libc::poll(&mut pfd, 1, 20) };
            while let Some((n, outgoing, _)) = recv_frame(&fd, &mut buf)? {
                let ours = tcp_ports(&buf[..n.min(buf.len())])
                    .is_some_and(|(a, b)| ports.contains(&a) || ports.contains(&b));
                if !ours {
                    continue;
                }
                bytes.fetch_add(n as u64, Ordering::SeqCst);
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: SIOCGSTAMPNS writes one timespec into `ts`, which we own.
                if unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSTAMPNS, &mut ts) } == 0 {
                    seen.push(Seen {
                        at: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
                        outgoing,
                    });
                }
            }
        }
        Ok(seen)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        let a = Ipv4Addr::new(10, 77, 0, 2);
        let b = Ipv4Addr::new(10, 77, 0, 1);
        let mut f = vec![0u8; 42];
        f[12] = 0x08;
        f[14] = 0x45;
        f[16..18].copy_from_slice(&65028u16.to_be_bytes());
        f[20] = 0x40; // DF
        f[23] = 17;
        f[26..30].copy_from_slice(&a.octets());
        f[30..34].copy_from_slice(&b.octets());
        let frame = parse_frame(&f, 65042, a, b, false).unwrap();
        assert_eq!(frame.ip_len, 65028);
        assert!(frame.dont_fragment && !frame.fragment);
        f[20] = 0x20; // MF
        assert!(parse_frame(&f, 1514, a, b, false).unwrap().fragment);
        f[23] = 6;
        assert!(parse_frame(&f, 1514, a, b, false).is_none());
    }
}
