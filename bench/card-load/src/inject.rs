//! `card-load inject`: the cheapest producer into the card's tap, for the bench's overhead group
//! (card to host). An `AF_PACKET` socket bound to the tap in the card's namespace sends
//! pre-built Ethernet frames with `sendmmsg`, past the qdisc (`PACKET_QDISC_BYPASS`): no socket
//! layer, no IP output, no routing, no neighbour lookup; each frame goes straight to the tap's
//! transmit (its queue picked by the tap's flow hash, so frames of several flows spread over the
//! queues). What remains behind the tap is the reader: the backend, or `tapr` for the ceiling.

use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use card_tests::packet::udp_frame_of_len;

use crate::driver::Counts;
use crate::tools::{in_netns, mmsghdrs, setsockopt_int};
use crate::{run_threads, HOST_MAC};

/// `PACKET_QDISC_BYPASS` (linux/if_packet.h).
const PACKET_QDISC_BYPASS: libc::c_int = 20;
/// Frames per `sendmmsg`.
const BATCH: usize = 64;
/// The source MAC of injected frames (locally administered; nothing checks it).
const SRC_MAC: [u8; 6] = [0x02, 0xca, 0x4d, 0x00, 0x00, 0x01];

/// `inject`'s options.
#[derive(clap::Args)]
pub struct InjectOpts {
    #[arg(long)]
    pub netns: String,
    /// The tap to transmit on.
    #[arg(long)]
    pub tap: String,
    /// Frame size, Ethernet header included.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Sending threads (one socket each).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Distinct UDP flows (source ports) per batch, so a multiqueue tap spreads them.
    #[arg(long, default_value_t = 16)]
    pub flows: usize,
    #[arg(long, default_value = "10.88.0.1:9000")]
    pub src: SocketAddrV4,
    #[arg(long, default_value = "10.88.0.2:9000")]
    pub dst: SocketAddrV4,
}

/// An `AF_PACKET` raw socket in `ns`, bound to `dev`, that receives nothing (protocol 0).
fn packet_tx_socket(ns: &str, dev: &str) -> Result<OwnedFd> {
    let dev = std::ffi::CString::new(dev)?;
    in_netns(ns, move || {
        // SAFETY: `dev` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
        if ifindex == 0 {
            bail!("no device {dev:?}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: plain socket(2); the result is checked and owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid before the fields are set.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = i32::try_from(ifindex)?;
        // SAFETY: `sa` is a valid sockaddr_ll for the duration of the call.
        let rc = unsafe {
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!("bind to {dev:?}: {}", std::io::Error::last_os_error());
        }
        setsockopt_int(fd, libc::SOL_PACKET, PACKET_QDISC_BYPASS, 1)?;
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 8 << 20);
        Ok(sock)
    })
}

/// Sends `--size`-byte UDP frames to the host's MAC on `--tap` until `quit`, `--flows` source
/// ports in turn; counts what the socket accepted (the tap drops what its queues cannot hold;
/// the reader's count is the figure).
pub fn inject(o: &InjectOpts) -> Result<()> {
    if o.flows == 0 || o.threads == 0 {
        bail!("--flows and --threads must be at least 1");
    }
    let mut socks = Vec::new();
    for _ in 0..o.threads {
        socks.push(packet_tx_socket(&o.netns, &o.tap)?);
    }
    let mut frames = Vec::new();
    for i in 0..o.flows {
        let src = SocketAddrV4::new(*o.src.ip(), o.src.port() + u16::try_from(i)?);
        let mut f = udp_frame_of_len(SRC_MAC, HOST_MAC, src, o.dst, o.size, 7)
            .context("building the frame")?;
        // No UDP checksum, as the host-to-card frames.
        f[40] = 0;
        f[41] = 0;
        frames.push(f);
    }
    let frames = Arc::new(frames);
    let size = o.size as u64;
    let counts: Vec<Arc<Counts>> = (0..o.threads).map(|_| Arc::default()).collect();
    run_threads(socks, &counts, move |s, c, stop| {
        let mut iovs: Vec<libc::iovec> = (0..BATCH)
            .map(|j| {
                let f = &frames[j % frames.len()];
                libc::iovec {
                    iov_base: f.as_ptr() as *mut libc::c_void,
                    iov_len: f.len(),
                }
            })
            .collect();
        let mut msgs = mmsghdrs(&mut iovs);
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: every header points at its own iovec in `iovs`, which points into
            // `frames`; all of them outlive the call.
            let n = unsafe {
                libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), BATCH as libc::c_uint, 0)
            };
            if n > 0 {
                let n = u64::from(n.unsigned_abs());
                c.frames.fetch_add(n, Ordering::Relaxed);
                c.bytes.fetch_add(n * size, Ordering::Relaxed);
            } else {
                std::thread::yield_now();
            }
        }
        Ok(())
    })
}
