//! Frames for the tests: the virtio-net header, IPv4 UDP/TCP frames (built with etherparse) and
//! an independent Internet-checksum implementation to check and to break checksums with.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, ensure, Result};
use etherparse::{PacketBuilder, TcpOptionElement};

pub const ETH_HLEN: usize = 14;
/// Ethernet + IPv4 (no options) + UDP headers.
pub const UDP_OVERHEAD: usize = ETH_HLEN + 20 + 8;

pub const F_NEEDS_CSUM: u8 = 1;
pub const F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;

/// `struct virtio_net_hdr_v1` (12 bytes, little endian).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHdr {
    pub const LEN: usize = 12;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        ensure!(b.len() >= Self::LEN, "vnet header of {} bytes", b.len());
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        })
    }
}

/// Adds `data` as big-endian 16-bit words to a one's complement sum (not yet folded).
pub fn ones_sum(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a sum to 16 bits (not complemented).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The IPv4 pseudo-header sum for an L4 segment of `len` bytes.
pub fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u64 {
    let s = ones_sum(0, &src.octets());
    let s = ones_sum(s, &dst.octets());
    s + u64::from(proto) + len as u64
}

/// Where the L4 header of an IPv4 frame starts and what it is.
#[derive(Debug, Clone, Copy)]
pub struct L4 {
    pub start: usize,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub len: usize,
}

/// Locates the TCP/UDP segment of an untagged IPv4 Ethernet frame.
pub fn l4_of(frame: &[u8]) -> Result<L4> {
    ensure!(frame.len() >= ETH_HLEN + 20, "frame too short for IPv4");
    ensure!(frame[12..14] == [0x08, 0x00], "not IPv4");
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    ensure!(
        total >= ihl && ETH_HLEN + total <= frame.len(),
        "bad IPv4 length"
    );
    Ok(L4 {
        start: ETH_HLEN + ihl,
        proto: ip[9],
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        len: total - ihl,
    })
}

/// Offset of the checksum field inside the L4 header.
fn csum_offset(proto: u8) -> Result<usize> {
    match proto {
        6 => Ok(16),
        17 => Ok(6),
        p => bail!("IP protocol {p} is neither TCP nor UDP"),
    }
}

/// Whether the IPv4 header checksum and the TCP/UDP checksum of `frame` are both correct.
pub fn checksums_valid(frame: &[u8]) -> Result<bool> {
    let l4 = l4_of(frame)?;
    if fold(ones_sum(0, &frame[ETH_HLEN..l4.start])) != 0xffff {
        return Ok(false);
    }
    let seg = &frame[l4.start..l4.start + l4.len];
    let sum = ones_sum(pseudo_v4(l4.src, l4.dst, l4.proto, l4.len), seg);
    Ok(fold(sum) == 0xffff)
}

/// Turns a frame with a complete TCP/UDP checksum into what a driver using checksum offload
/// hands over: the checksum field holds the folded pseudo-header sum only, and the header says
/// NEEDS_CSUM with csum_start/csum_offset. Fails if the result happens to be a valid checksum.
pub fn make_partial(frame: &mut [u8]) -> Result<VnetHdr> {
    let l4 = l4_of(frame)?;
    let off = csum_offset(l4.proto)?;
    let at = l4.start + off;
    let pseudo = fold(pseudo_v4(l4.src, l4.dst, l4.proto, l4.len));
    frame[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
    ensure!(
        !checksums_valid(frame)?,
        "a pseudo-header-only checksum happens to be valid for this frame; change its payload"
    );
    Ok(VnetHdr {
        flags: F_NEEDS_CSUM,
        csum_start: u16::try_from(l4.start)?,
        csum_offset: u16::try_from(off)?,
        ..VnetHdr::default()
    })
}

/// Makes the TCP/UDP checksum of a frame wrong (and never zero, which UDP reads as "none").
pub fn break_checksum(frame: &mut [u8]) -> Result<()> {
    let l4 = l4_of(frame)?;
    let at = l4.start + csum_offset(l4.proto)?;
    let old = u16::from_be_bytes([frame[at], frame[at + 1]]);
    let mut new = old ^ 0x0101;
    if new == 0 || new == 0xffff {
        new = 0x1234;
    }
    frame[at..at + 2].copy_from_slice(&new.to_be_bytes());
    ensure!(!checksums_valid(frame)?, "checksum still valid");
    Ok(())
}

/// Deterministic non-trivial payload bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// An IPv4 UDP frame with correct checksums.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Result<Vec<u8>> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port());
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)?;
    Ok(v)
}

/// A UDP frame of exactly `total` bytes (Ethernet header included).
pub fn udp_frame_of_len(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    total: usize,
    seed: u8,
) -> Result<Vec<u8>> {
    ensure!(
        total >= UDP_OVERHEAD,
        "{total} bytes cannot hold a UDP frame"
    );
    let f = udp_frame(
        src_mac,
        dst_mac,
        src,
        dst,
        &pattern(total - UDP_OVERHEAD, seed),
    )?;
    ensure!(f.len() == total);
    Ok(f)
}

/// TCP segment fields for [`tcp_frame`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Tcp {
    pub seq: u32,
    pub ack: Option<u32>,
    pub syn: bool,
    pub psh: bool,
    pub window: u16,
    pub mss: Option<u16>,
}

/// An IPv4 TCP frame with correct checksums.
pub fn tcp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    t: Tcp,
    payload: &[u8],
) -> Result<Vec<u8>> {
    let mut b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), t.seq, t.window);
    if t.syn {
        b = b.syn();
    }
    if t.psh {
        b = b.psh();
    }
    if let Some(a) = t.ack {
        b = b.ack(a);
    }
    if let Some(mss) = t.mss {
        b = b
            .options(&[TcpOptionElement::MaximumSegmentSize(mss)])
            .map_err(|e| anyhow::anyhow!("tcp options: {e:?}"))?;
    }
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)?;
    Ok(v)
}
