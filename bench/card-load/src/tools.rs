//! The card-side endpoints (UDP sink and sender inside the card's namespace), the raw tap
//! reference (a writer and a reader on a tap with a vnet header, no virtio), and the memcpy
//! reference.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use card_tests::packet::{make_partial, udp_frame_of_len, VnetHdr, UDP_OVERHEAD};
use vhost_card::netns::NetnsError;
use vhost_card::tap::{Tap, TapConfig};

use crate::driver::Counts;
use crate::{run_threads, HOST_MAC};

pub const GSO_UDP_L4: u8 = 5;
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;

/// `--gso`: how host-to-card frames are sent.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Gso {
    None,
    /// UDP segmentation offload (USO) with `--mss`-byte segments.
    Udp,
}

/// The host-to-card frame's options.
#[derive(clap::Args)]
pub struct FrameOpts {
    /// Frame size, Ethernet header included.
    #[arg(long, default_value_t = 1500)]
    pub size: usize,
    #[arg(long, value_enum, default_value_t = Gso::None)]
    pub gso: Gso,
    /// USO segment payload.
    #[arg(long, default_value_t = 1472)]
    pub mss: usize,
    #[arg(long, default_value_t = Ipv4Addr::new(10, 88, 0, 2))]
    pub src_ip: Ipv4Addr,
    #[arg(long, default_value_t = Ipv4Addr::new(10, 88, 0, 1))]
    pub dst_ip: Ipv4Addr,
    #[arg(long, default_value_t = 9000)]
    pub port: u16,
    /// The card's MAC address.
    #[arg(long, value_parser = vhost_card::tap::parse_mac)]
    pub dst_mac: [u8; 6],
}

/// `sink`'s options.
#[derive(clap::Args)]
pub struct SinkOpts {
    #[arg(long)]
    pub netns: String,
    #[arg(long)]
    pub addr: SocketAddrV4,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// `send`'s options.
#[derive(clap::Args)]
pub struct SendOpts {
    #[arg(long)]
    pub netns: String,
    #[arg(long, default_value_t = Ipv4Addr::new(10, 88, 0, 1))]
    pub src: Ipv4Addr,
    #[arg(long)]
    pub dst: SocketAddrV4,
    #[arg(long, default_value_t = 1)]
    pub flows: usize,
    /// 64 KiB UDP GSO sends of this segment size (0: plain datagrams).
    #[arg(long, default_value_t = 0)]
    pub gso_seg: usize,
    #[arg(long, default_value_t = 1500)]
    pub size: usize,
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
}

/// The raw tap's options.
#[derive(clap::Args)]
pub struct TapOpts {
    #[arg(long)]
    pub netns: String,
    #[arg(long)]
    pub tap: String,
    #[arg(long, default_value_t = 65520)]
    pub mtu: u16,
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
}

/// `memcpy`'s options.
#[derive(clap::Args)]
pub struct MemcpyOpts {
    #[arg(long, default_value_t = 1500)]
    pub size: usize,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
}

/// What a host-to-card frame looks like.
#[derive(Clone)]
pub struct FrameSpec {
    size: usize,
    /// UDP GSO (USO) with this segment payload size.
    gso: Option<usize>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    dst_mac: [u8; 6],
}

impl FrameSpec {
    pub fn from_opts(o: &FrameOpts) -> Result<Self> {
        if o.gso == Gso::Udp && o.mss == 0 {
            bail!("--mss 0");
        }
        Ok(FrameSpec {
            size: o.size,
            gso: (o.gso == Gso::Udp).then_some(o.mss),
            src: o.src_ip,
            dst: o.dst_ip,
            port: o.port,
            dst_mac: o.dst_mac,
        })
    }

    /// The same frame at another size.
    pub fn sized(&self, size: usize) -> FrameSpec {
        FrameSpec {
            size,
            ..self.clone()
        }
    }

    /// Segments of a GSO frame (1 otherwise).
    fn segments(&self) -> usize {
        match self.gso {
            Some(mss) => (65535 - 28) / mss,
            None => 1,
        }
    }

    /// Bytes the frame stands for on an Ethernet link (every segment with its headers).
    pub fn wire_bytes(&self) -> usize {
        match self.gso {
            Some(mss) => self.segments() * (mss + UDP_OVERHEAD),
            None => self.size,
        }
    }

    /// The vnet header (`hdr_len` bytes) and the frame, from source port 40000 + `q`.
    pub fn build_with_hdr(&self, hdr_len: usize, q: u16) -> Result<Vec<u8>> {
        let src = SocketAddrV4::new(self.src, 40000 + q);
        let dst = SocketAddrV4::new(self.dst, self.port);
        let (mut frame, hdr) = match self.gso {
            None => {
                let mut f = udp_frame_of_len(HOST_MAC, self.dst_mac, src, dst, self.size, 7)?;
                // No UDP checksum (as DPDK's txonly sends): nothing to verify on either side.
                f[40] = 0;
                f[41] = 0;
                (f, VnetHdr::default())
            }
            Some(mss) => {
                let total = UDP_OVERHEAD + self.segments() * mss;
                let mut f = udp_frame_of_len(HOST_MAC, self.dst_mac, src, dst, total, 7)?;
                let mut h = make_partial(&mut f)?;
                h.gso_type = GSO_UDP_L4;
                h.gso_size = u16::try_from(mss)?;
                h.hdr_len = u16::try_from(UDP_OVERHEAD)?;
                (f, h)
            }
        };
        let mut out = hdr.encode()[..hdr_len].to_vec();
        out.append(&mut frame);
        Ok(out)
    }
}

/// `--sizes N,N,...` (frame sizes, Ethernet header included), or `--size N` alone.
pub fn sizes(size: usize, sizes: &[usize]) -> Result<Vec<usize>> {
    let sizes = if sizes.is_empty() {
        vec![size]
    } else {
        sizes.to_vec()
    };
    if sizes.iter().any(|&n| n < UDP_OVERHEAD) {
        bail!("{sizes:?}: every frame needs at least {UDP_OVERHEAD} bytes");
    }
    Ok(sizes)
}

pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    vhost_card::netns::run_in(Some(ns), || f().map_err(Wrap)).map_err(|Wrap(e)| e)
}

/// anyhow::Error with the `From<NetnsError>` that `run_in` wants.
struct Wrap(anyhow::Error);

impl From<NetnsError> for Wrap {
    fn from(e: NetnsError) -> Self {
        Wrap(e.into())
    }
}

pub fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> Result<()> {
    // SAFETY: `v` is a valid c_int for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "setsockopt({level}, {opt}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// One `mmsghdr` per iovec of `iovs`, each pointing at its own (for sendmmsg/recvmmsg); the
/// headers hold pointers into `iovs`, which must outlive their use.
pub fn mmsghdrs(iovs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iovs.iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain old data; all-zero is valid before the fields are set.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect()
}

/// A UDP socket created inside `ns` (with SO_REUSEPORT when `reuse`).
fn udp_in(ns: &str, addr: SocketAddrV4, reuse: bool) -> Result<UdpSocket> {
    in_netns(ns, move || {
        // SAFETY: plain socket(2); the result is checked and owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let sock = unsafe { <UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        if reuse {
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        }
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `sa` is a valid sockaddr_in for the duration of the call.
        let rc = unsafe {
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!("bind {addr}: {}", std::io::Error::last_os_error());
        }
        Ok(sock)
    })
}

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; the libc crate has it only for Android).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Picks the socket of a SO_REUSEPORT group for each datagram by its IPv4 source address and
/// UDP source port, `(saddr ^ sport) % n`, instead of the kernel's hash, which is salted per
/// network namespace: every bench run builds a new namespace, so with the kernel's choice two
/// flows shared one socket in about half the runs (one sink thread doing all the work while the
/// other idled) and the h2c rows at 2 queue pairs were bimodal. card-load's flows come from
/// ports 40000 + queue, so queue q always lands on socket q; testpmd's multi-flow traffic varies
/// the source address and spreads as well. (The filter runs with the UDP payload at offset 0;
/// the headers are reached relative to the network header, SKF_NET_OFF.)
fn steer_by_flow(fd: RawFd, n: u32) -> Result<()> {
    let op = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    // Negative offsets are how classic BPF reaches the headers: two's complement in `k`.
    let net = libc::SKF_NET_OFF.cast_unsigned();
    let prog = [
        op(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            net.wrapping_add(12),
        ), // A = saddr
        op(libc::BPF_MISC | libc::BPF_TAX, 0), // X = A
        op(
            libc::BPF_LD | libc::BPF_H | libc::BPF_ABS,
            net.wrapping_add(20),
        ), // A = UDP sport (no IP options)
        op(libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X, 0), // A ^= X
        op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, n), // A %= n
        op(libc::BPF_RET | libc::BPF_A, 0),    // socket index A
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `prog`, both alive for the duration of the call, which copies
    // the program into the kernel.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "SO_ATTACH_REUSEPORT_CBPF: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// UDP sink: `--threads` sockets sharing `--addr` (SO_REUSEPORT, steered by flow, see
/// [`steer_by_flow`]), recvmmsg with MSG_TRUNC (the payload is not copied out; only lengths are
/// counted). Bytes count each datagram with its Ethernet, IPv4 and UDP headers, so a GSO frame
/// split by the card counts as its segments.
pub fn sink(o: &SinkOpts) -> Result<()> {
    let ns = o.netns.as_str();
    let addr = o.addr;
    let threads = o.threads;
    let mut socks = Vec::new();
    for _ in 0..threads {
        let s = udp_in(ns, addr, true)?;
        let _ = setsockopt_int(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            32 << 20,
        );
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        socks.push(s);
    }
    if threads > 1 {
        steer_by_flow(socks[0].as_raw_fd(), threads as u32)?;
    }
    let counts: Vec<Arc<Counts>> = (0..threads).map(|_| Arc::default()).collect();
    let each = counts.clone();
    run_threads(socks, &counts, |s, c, stop| {
        const BATCH: usize = 64;
        let mut bufs = vec![[0u8; 64]; BATCH];
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut msgs = mmsghdrs(&mut iovs);
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: `msgs` holds BATCH headers whose iovecs point into `bufs`, alive here.
            let n = unsafe {
                libc::recvmmsg(
                    s.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_TRUNC | libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                continue;
            }
            let n = n as usize;
            let bytes: u64 = msgs[..n]
                .iter()
                .map(|m| u64::from(m.msg_len) + UDP_OVERHEAD as u64)
                .sum();
            c.frames.fetch_add(n as u64, Ordering::Relaxed);
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        Ok(())
    })?;
    // Which socket of the SO_REUSEPORT group got what, in the log (see `steer_by_flow`).
    let per: Vec<String> = each
        .iter()
        .map(|c| c.frames.load(Ordering::Relaxed).to_string())
        .collect();
    eprintln!("sink: datagrams per socket: {}", per.join(" "));
    Ok(())
}

/// UDP sender inside the card's namespace: `--flows` sockets (one thread each, source ports
/// 50000+i) sending to `--dst`, with sendmmsg batches of frames of `--size` bytes (or of every
/// size of `--sizes` in turn within each batch), or with `--gso-seg G` 64 KiB UDP GSO sends of
/// G-byte segments.
pub fn send(o: &SendOpts) -> Result<()> {
    let ns = o.netns.as_str();
    let (src, dst, flows, gso) = (o.src, o.dst, o.flows, o.gso_seg);
    let mut socks = Vec::new();
    for i in 0..flows {
        let s = udp_in(ns, SocketAddrV4::new(src, 50000 + u16::try_from(i)?), false)?;
        s.connect(dst)?;
        let _ = setsockopt_int(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            8 << 20,
        );
        if gso > 0 {
            setsockopt_int(
                s.as_raw_fd(),
                SOL_UDP,
                UDP_SEGMENT,
                libc::c_int::try_from(gso)?,
            )?;
        }
        socks.push(s);
    }
    // Each kind of send: (payload bytes, frames it makes, wire bytes of those frames).
    let kinds: Vec<(usize, u64, u64)> = if let Some(segs) = (65535 - 28usize).checked_div(gso) {
        vec![(
            segs * gso,
            segs as u64,
            segs as u64 * (gso + UDP_OVERHEAD) as u64,
        )]
    } else {
        sizes(o.size, &o.sizes)?
            .into_iter()
            .map(|size| (size - UDP_OVERHEAD, 1, size as u64))
            .collect()
    };
    let counts: Vec<Arc<Counts>> = (0..flows).map(|_| Arc::default()).collect();
    run_threads(socks, &counts, move |s, c, stop| {
        const BATCH: usize = 64;
        let batch = if gso > 0 { 4 } else { BATCH };
        let longest = kinds.iter().map(|k| k.0).max().unwrap_or(0);
        let data = vec![0x5au8; longest];
        // Message j of a batch is of kind j % kinds; `done[n]` what the first n messages count.
        let mut iovs: Vec<libc::iovec> = (0..batch)
            .map(|j| libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: kinds[j % kinds.len()].0,
            })
            .collect();
        let mut done = vec![(0u64, 0u64)];
        for j in 0..batch {
            let (f, b) = done[j];
            let k = kinds[j % kinds.len()];
            done.push((f + k.1, b + k.2));
        }
        let mut msgs = mmsghdrs(&mut iovs);
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: every header points at its own iovec in `iovs`, which points into `data`;
            // all of them outlive the call.
            let n = unsafe {
                libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), batch as libc::c_uint, 0)
            };
            if n > 0 {
                let (f, b) = done[n.unsigned_abs() as usize];
                c.frames.fetch_add(f, Ordering::Relaxed);
                c.bytes.fetch_add(b, Ordering::Relaxed);
            } else {
                std::thread::yield_now();
            }
        }
        Ok(())
    })
}

fn attach_tap(o: &TapOpts) -> Result<Tap> {
    let cfg = TapConfig {
        name: o.tap.clone(),
        netns: Some(o.netns.clone()),
        mtu: o.mtu,
        mac: None,
        queues: o.queues,
        tun: false,
    };
    let tap = Tap::open(&cfg)?;
    tap.keep_when_done(true);
    tap.set_vnet_hdr_len(12)?;
    Ok(tap)
}

/// Raw tap writer: one thread per tap queue writing the frame (vnet header + frame) in a loop.
pub fn tap_write(o: &TapOpts, frame: &FrameOpts) -> Result<()> {
    let tap = Arc::new(attach_tap(o)?);
    let spec = FrameSpec::from_opts(frame)?;
    let wire = spec.wire_bytes() as u64;
    let queues = tap.num_queues();
    let frames: Vec<(Vec<u8>, usize)> = (0..queues)
        .map(|q| Ok((spec.build_with_hdr(12, u16::try_from(q)?)?, q)))
        .collect::<Result<_>>()?;
    let counts: Vec<Arc<Counts>> = (0..queues).map(|_| Arc::default()).collect();
    let t = tap.clone();
    run_threads(frames, &counts, move |(f, q), c, stop| {
        let fd = t.queue_fd(q);
        let mut done = 0u64;
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: `f` is a valid buffer of `f.len()` bytes for the call.
            let n = unsafe { libc::write(fd, f.as_ptr().cast(), f.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    return Err(anyhow!("tap write: {e}"));
                }
                continue;
            }
            done += 1;
            if done.is_multiple_of(16) {
                c.frames.fetch_add(16, Ordering::Relaxed);
                c.bytes.fetch_add(16 * wire, Ordering::Relaxed);
            }
        }
        Ok(())
    })
}

/// Raw tap reader: one thread per tap queue reading frames, with the offloads a guest that
/// accepts everything would set (so GSO frames come up whole).
pub fn tap_read(o: &TapOpts) -> Result<()> {
    use vhost_card::tap::*;
    let tap = Arc::new(attach_tap(o)?);
    let all = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6;
    if tap.set_offload(all).is_err() {
        tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)?;
    }
    let queues = tap.num_queues();
    let counts: Vec<Arc<Counts>> = (0..queues).map(|_| Arc::default()).collect();
    let t = tap.clone();
    run_threads((0..queues).collect(), &counts, move |q, c, stop| {
        let fd = t.queue_fd(q);
        let mut buf = vec![0u8; 65536 + 128];
        while !stop.load(Ordering::Relaxed) {
            let (mut f, mut b) = (0u64, 0u64);
            loop {
                // SAFETY: `buf` is valid for writes of its length.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 12 {
                    break;
                }
                // SAFETY: `buf` holds the `n` bytes just read (header and frame).
                let (segs, wire) =
                    unsafe { crate::driver::wire_of(buf.as_ptr(), 12, n as u64 - 12) };
                f += segs;
                b += wire;
                if f >= 256 {
                    break;
                }
            }
            if f > 0 {
                c.frames.fetch_add(f, Ordering::Relaxed);
                c.bytes.fetch_add(b, Ordering::Relaxed);
            } else {
                let _ = card_tests::vring::poll_in(fd, Duration::from_millis(50));
            }
        }
        Ok(())
    })
}

/// The physical reference: `--threads` threads each copying frames of `--size` bytes from one
/// set of buffers into another (32 MiB of each at most) for `--seconds`; prints one JSON line.
pub fn memcpy(o: &MemcpyOpts) -> Result<()> {
    let (size, threads, secs) = (o.size, o.threads, o.seconds);
    let copies = ((32usize << 20) / size.max(1)).clamp(1, 1024);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let src = vec![0xa5u8; copies * size];
                let mut dst = vec![0u8; copies * size];
                let deadline = Instant::now() + Duration::from_secs_f64(secs);
                let mut n = 0u64;
                'run: loop {
                    for i in 0..copies {
                        dst[i * size..(i + 1) * size]
                            .copy_from_slice(&src[i * size..(i + 1) * size]);
                        std::hint::black_box(&mut dst);
                        n += 1;
                        if n.is_multiple_of(64) && Instant::now() >= deadline {
                            break 'run;
                        }
                    }
                }
                n
            })
        })
        .collect();
    let mut frames = 0u64;
    for h in handles {
        frames += h.join().map_err(|_| anyhow!("memcpy thread panicked"))?;
    }
    let ns = start.elapsed().as_nanos();
    println!(
        "{{\"frames\":{frames},\"bytes\":{},\"ns\":{ns}}}",
        frames * size as u64
    );
    Ok(())
}
