//! `xtask guest ...`: the helper commands the test VM runs for what busybox cannot do (UDP
//! datagrams of a chosen size, ethtool channels). This very program is the helper: the rig's
//! initramfs (`rig::image`) carries it as /bin/e2e-helper.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use rig::image::{pattern, HELPER, PAYLOAD};
use rig::nsnet::pmtu_discovery;

/// `xtask guest ...`: runs inside the VM.
#[derive(clap::Subcommand)]
pub enum Helper {
    /// Send one UDP datagram of SIZE bytes (the test pattern) to ADDR:PORT with fragmentation
    /// forbidden (IP_PMTUDISC_DO), so it leaves as one frame or not at all; print the path MTU
    /// the kernel had (`mtu_before`).
    UdpSend {
        addr: Ipv4Addr,
        port: u16,
        size: usize,
        /// DF clear instead (IP_PMTUDISC_DONT): routers may fragment it.
        #[arg(long, conflicts_with = "pmtu")]
        fragment: bool,
        /// After sending, wait for the path MTU to drop (an ICMP frag-needed came back), print
        /// it (`mtu_after`) and send again (`resend`).
        #[arg(long)]
        pmtu: bool,
    },
    /// Receive one UDP datagram on PORT (creating READY once bound) and
    /// print its size; fail after SECS seconds. With --hello ADDR:PORT, first
    /// send a small datagram there from PORT (so a firewall lets the answer in).
    UdpRecv {
        port: u16,
        ready: PathBuf,
        secs: u64,
        #[arg(long)]
        hello: Option<SocketAddrV4>,
    },
    /// Play a vhost-vdpa frontend on DEV (a VMM's part): one UDP datagram to CARD_MAC, one
    /// received after running SEND_CMD (MAC in it is replaced by the frontend's), ring bases.
    VdpaFrontend {
        dev: String,
        card_mac: String,
        send_cmd: String,
    },
    /// Accept one TCP connection on PORT (creating READY once listening) and copy what it
    /// carries to standard output until the sender closes.
    TcpSink { port: u16, ready: PathBuf },
    /// Ask the kernel's VDUSE which virtio-net feature bits it takes on top of the card's
    /// default offer (creating and destroying a device per bit); print `refused=` and
    /// `required=` bit lists.
    VduseProbe,
    /// Count UDP datagrams arriving on PORT (creating READY once bound) until SECS seconds
    /// pass without one; print `received=N`.
    UdpCount {
        port: u16,
        ready: PathBuf,
        secs: u64,
    },
    /// Send COUNT UDP datagrams from SRC to DST:PORT as raw Ethernet frames on DEV (to DST_MAC),
    /// with the right UDP checksum (`good`) or a wrong one (`bad`).
    UdpFrames {
        dev: String,
        dst_mac: String,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        port: u16,
        count: u32,
        kind: String,
    },
    /// Print DEV's combined channels (queue pairs) in use and the maximum, as
    /// `ethtool -l` does; with --set N first use N of them (`ethtool -L DEV combined N`).
    Channels {
        dev: String,
        #[arg(long)]
        set: Option<u32>,
    },
}

/// `struct ethtool_channels` of linux/ethtool.h.
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

const ETHTOOL_GCHANNELS: u32 = 0x3c;
const ETHTOOL_SCHANNELS: u32 = 0x3d;

/// One SIOCETHTOOL request on `dev` with `ch` as its data.
fn ethtool_channels(dev: &str, ch: &mut EthtoolChannels) -> Result<()> {
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes().take(15)) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    ifr.ifr_ifru.ifru_data = (ch as *mut EthtoolChannels).cast();
    // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_channels it points to, both valid
    // and exclusively ours for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) };
    if rc != 0 {
        bail!("SIOCETHTOOL on {dev}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn helper(cmd: &Helper) -> Result<()> {
    match cmd {
        Helper::UdpSend {
            addr,
            port,
            size,
            fragment,
            pmtu,
        } => udp_send(*addr, *port, *size, *fragment, *pmtu)?,
        Helper::UdpRecv {
            port,
            ready,
            secs,
            hello,
        } => {
            let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, *port))?;
            if let Some(to) = hello {
                sock.send_to(b"hello", to).context("sending the hello")?;
            }
            std::fs::write(ready, b"")?;
            let deadline = Instant::now() + Duration::from_secs(*secs);
            let mut buf = vec![0u8; 70_000];
            sock.set_read_timeout(Some(Duration::from_millis(200)))?;
            let (n, from) = loop {
                match sock.recv_from(&mut buf) {
                    Ok(got) => break got,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        if Instant::now() > deadline {
                            bail!("no datagram on port {port} within {secs} s");
                        }
                    }
                    Err(e) => return Err(e).context("recvfrom"),
                }
            };
            println!("received={n}");
            println!("from={from}");
            println!("intact={}", buf[..n] == pattern(n)[..]);
        }
        Helper::VduseProbe => crate::e2e::vduse::probe_features()?,
        Helper::VdpaFrontend {
            dev,
            card_mac,
            send_cmd,
        } => crate::e2e::vduse::vdpa_frontend(dev, card_mac, send_cmd)?,
        Helper::TcpSink { port, ready } => crate::e2e::vduse::tcp_sink(*port, ready)?,
        Helper::UdpCount { port, ready, secs } => {
            crate::e2e::vduse::udp_count(*port, ready, Duration::from_secs(*secs))?
        }
        Helper::UdpFrames {
            dev,
            dst_mac,
            src,
            dst,
            port,
            count,
            kind,
        } => crate::e2e::vduse::udp_frames(dev, dst_mac, *src, *dst, *port, *count, kind == "bad")?,
        Helper::Channels { dev, set } => {
            let mut ch = EthtoolChannels {
                cmd: ETHTOOL_GCHANNELS,
                ..Default::default()
            };
            ethtool_channels(dev, &mut ch)?;
            if let Some(n) = set {
                ch.cmd = ETHTOOL_SCHANNELS;
                ch.combined_count = *n;
                ethtool_channels(dev, &mut ch)?;
                ch.cmd = ETHTOOL_GCHANNELS;
                ethtool_channels(dev, &mut ch)?;
            }
            println!("combined={}", ch.combined_count);
            println!("max_combined={}", ch.max_combined);
        }
    }
    Ok(())
}

/// `guest udp-send`.
fn udp_send(addr: Ipv4Addr, port: u16, size: usize, fragment: bool, pmtu: bool) -> Result<()> {
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    sock.connect(SocketAddrV4::new(addr, port))?;
    let mode = if fragment {
        libc::IP_PMTUDISC_DONT
    } else {
        libc::IP_PMTUDISC_DO
    };
    pmtu_discovery(&sock, mode)?;
    let data = pattern(size);
    let before = ip_mtu(&sock)?;
    let sent = sock.send(&data).context("send")?;
    println!("sent={sent}");
    println!("mtu_before={before}");
    if pmtu {
        // The card answers with frag-needed; the kernel lowers the route's MTU, which IP_MTU on
        // the connected socket shows.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut mtu = before;
        while mtu >= before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            mtu = ip_mtu(&sock)?;
        }
        println!("mtu_after={mtu}");
        let again = sock.send(&data);
        println!(
            "resend={}",
            match again {
                Ok(n) => format!("sent {n}"),
                Err(e) => format!("{e}"),
            }
        );
    }
    if sent != size {
        bail!("sent {sent} of {size} bytes");
    }
    Ok(())
}

/// The path MTU the kernel has for a connected socket (IP_MTU).
fn ip_mtu(sock: &UdpSocket) -> Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on an open socket into a c_int we own, with its
    // size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("IP_MTU");
    }
    Ok(value)
}
