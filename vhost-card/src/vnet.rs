//! The virtio-net header (`struct virtio_net_hdr_v1`, virtio spec 5.1.6) and the rules that apply
//! to it on each queue. Pure functions over byte arrays: the data path copies the 10 or 12 header
//! bytes out of guest memory once, decides here, and never looks at the guest's copy again.

use thiserror::Error;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4,
};

use crate::features::Negotiated;

/// Largest header (virtio 1.x, or legacy with MRG_RXBUF).
pub const HDR_MAX: usize = 12;
/// Ethernet header length; no frame may be shorter.
pub const ETH_HLEN: usize = 14;
/// Room for one 802.1Q tag on top of the MTU.
pub const VLAN_HLEN: usize = 4;
/// Largest frame a GSO packet may form (a 64 KiB IP packet, an Ethernet and a VLAN header).
pub const GSO_MAX_FRAME: usize = 65535 + ETH_HLEN + VLAN_HLEN;

pub const F_NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
pub const F_DATA_VALID: u8 = VIRTIO_NET_HDR_F_DATA_VALID as u8;
pub const GSO_NONE: u8 = VIRTIO_NET_HDR_GSO_NONE as u8;
pub const GSO_TCPV4: u8 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
pub const GSO_UDP: u8 = VIRTIO_NET_HDR_GSO_UDP as u8;
pub const GSO_TCPV6: u8 = VIRTIO_NET_HDR_GSO_TCPV6 as u8;
pub const GSO_UDP_L4: u8 = VIRTIO_NET_HDR_GSO_UDP_L4 as u8;
pub const GSO_ECN: u8 = VIRTIO_NET_HDR_GSO_ECN as u8;

/// Decoded virtio-net header. Multi-byte fields are little endian in virtio 1.x; a legacy guest
/// on x86 is little endian too, which is the only host this daemon builds for.
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
    /// Decodes a 10- or 12-byte header; bytes past `len` read as zero.
    pub fn decode(b: &[u8; HDR_MAX]) -> Self {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        }
    }

    /// The header for the same frame without its Ethernet header (IP-only link, host to card):
    /// the offsets count from the IP header. `check_tx` made sure `csum_start >= ETH_HLEN`.
    pub fn without_ethernet(&self) -> VnetHdr {
        self.offsets_moved(|v| v.saturating_sub(ETH_HLEN as u16))
    }

    /// The header for the same frame with an Ethernet header put in front (IP-only link, card
    /// to host).
    pub fn with_ethernet(&self) -> VnetHdr {
        self.offsets_moved(|v| v.saturating_add(ETH_HLEN as u16))
    }

    /// `csum_start` (with NEEDS_CSUM) and `hdr_len` (with GSO) moved by `f`.
    fn offsets_moved(&self, f: impl Fn(u16) -> u16) -> VnetHdr {
        let mut h = *self;
        if h.flags & F_NEEDS_CSUM != 0 {
            h.csum_start = f(h.csum_start);
        }
        if h.gso_type != GSO_NONE {
            h.hdr_len = f(h.hdr_len);
        }
        h
    }

    pub fn encode(&self) -> [u8; HDR_MAX] {
        let mut b = [0u8; HDR_MAX];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }
}

/// Why a frame from the host (TX) was dropped. Each one has a counter.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum TxDrop {
    #[error("frame shorter than an Ethernet header")]
    Runt,
    #[error("frame longer than the MTU allows")]
    Oversize,
    #[error("NEEDS_CSUM without the csum feature")]
    CsumNotNegotiated,
    #[error("csum_start/csum_offset outside the frame")]
    CsumOutOfRange,
    #[error("gso_type not negotiated")]
    GsoNotNegotiated,
    #[error("unknown gso_type")]
    GsoUnknown,
    #[error("gso_size of 0 or beyond the frame")]
    GsoBadSize,
    #[error("GSO without NEEDS_CSUM")]
    GsoWithoutCsum,
    #[error("hdr_len beyond the frame")]
    BadHdrLen,
}

/// Checks a header the host wrote for a frame of `frame_len` bytes (header excluded) and returns
/// the header to hand to the card's kernel. Flags the driver must not set on transmit
/// (DATA_VALID, RSC_INFO) and `num_buffers` are cleared: the card never trusts the host's claim
/// that a checksum is good.
pub fn check_tx(
    hdr: &VnetHdr,
    frame_len: usize,
    mtu: usize,
    neg: &Negotiated,
) -> Result<VnetHdr, TxDrop> {
    if frame_len < ETH_HLEN {
        return Err(TxDrop::Runt);
    }
    let mut out = VnetHdr {
        flags: hdr.flags & F_NEEDS_CSUM,
        ..VnetHdr::default()
    };
    if out.flags & F_NEEDS_CSUM != 0 {
        if !neg.csum {
            return Err(TxDrop::CsumNotNegotiated);
        }
        let start = usize::from(hdr.csum_start);
        let end = start + usize::from(hdr.csum_offset) + 2;
        if start < ETH_HLEN || end > frame_len {
            return Err(TxDrop::CsumOutOfRange);
        }
        out.csum_start = hdr.csum_start;
        out.csum_offset = hdr.csum_offset;
    }
    let base = hdr.gso_type & !GSO_ECN;
    if base == GSO_NONE {
        if hdr.gso_type & GSO_ECN != 0 {
            return Err(TxDrop::GsoUnknown);
        }
        if frame_len > mtu + ETH_HLEN + VLAN_HLEN {
            return Err(TxDrop::Oversize);
        }
        return Ok(out);
    }
    let allowed = match base {
        GSO_TCPV4 => neg.host_tso4,
        GSO_TCPV6 => neg.host_tso6,
        GSO_UDP => neg.host_ufo,
        GSO_UDP_L4 => neg.host_uso,
        _ => return Err(TxDrop::GsoUnknown),
    };
    if !allowed || (hdr.gso_type & GSO_ECN != 0 && !neg.host_ecn) {
        return Err(TxDrop::GsoNotNegotiated);
    }
    if out.flags & F_NEEDS_CSUM == 0 {
        return Err(TxDrop::GsoWithoutCsum);
    }
    if frame_len > GSO_MAX_FRAME {
        return Err(TxDrop::Oversize);
    }
    if hdr.gso_size == 0 || usize::from(hdr.gso_size) >= frame_len {
        return Err(TxDrop::GsoBadSize);
    }
    if usize::from(hdr.hdr_len) > frame_len {
        return Err(TxDrop::BadHdrLen);
    }
    out.gso_type = hdr.gso_type;
    out.gso_size = hdr.gso_size;
    out.hdr_len = hdr.hdr_len;
    Ok(out)
}

/// What the card does about checksums of frames going up (`--rx-csum`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RxCsum {
    /// Frames without flags are verified and marked DATA_VALID when good; the kernel's partial
    /// checksums and GSO frames go up with NEEDS_CSUM.
    #[default]
    Verify,
    /// As `Verify`, and every partial checksum is completed and marked DATA_VALID; the tap is
    /// told to hand over no GSO frame (the spec wants NEEDS_CSUM on every GSO frame).
    Complete,
    /// Frames without flags go up untouched.
    Passthrough,
}

/// What the RX path must do with a header the card's kernel wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxAction {
    /// Deliver as is (flags already fit the negotiated features).
    Deliver,
    /// Flags are empty and the host accepts DATA_VALID: verify the checksums and mark.
    Verify,
    /// The kernel left a partial checksum the host cannot take: complete it, clear flags.
    Complete,
    /// `--rx-csum complete`: complete the partial checksum and mark the frame DATA_VALID.
    CompleteAndMark,
    /// A GSO type the host did not negotiate: drop.
    DropGso,
}

/// Decides what the RX path does with `hdr` (from the tap) and rewrites it for the host.
pub fn rx_action(hdr: &mut VnetHdr, neg: &Negotiated, mode: RxCsum) -> RxAction {
    let base = hdr.gso_type & !GSO_ECN;
    if base != GSO_NONE {
        let ok = neg.guest_csum
            && match base {
                GSO_TCPV4 => neg.guest_tso4,
                GSO_TCPV6 => neg.guest_tso6,
                GSO_UDP => neg.guest_ufo,
                GSO_UDP_L4 => neg.guest_uso4 || neg.guest_uso6,
                _ => false,
            }
            && (hdr.gso_type & GSO_ECN == 0 || neg.guest_ecn);
        if !ok {
            return RxAction::DropGso;
        }
    } else {
        hdr.gso_size = 0;
        hdr.hdr_len = 0;
    }
    if !neg.guest_csum {
        let partial = hdr.flags & F_NEEDS_CSUM != 0;
        hdr.flags = 0;
        return if partial {
            RxAction::Complete
        } else {
            RxAction::Deliver
        };
    }
    hdr.flags &= F_NEEDS_CSUM | F_DATA_VALID;
    match mode {
        _ if base != GSO_NONE => RxAction::Deliver,
        RxCsum::Verify | RxCsum::Complete if hdr.flags == 0 => RxAction::Verify,
        RxCsum::Complete if hdr.flags & F_NEEDS_CSUM != 0 => RxAction::CompleteAndMark,
        _ => RxAction::Deliver,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{default_features, Negotiated};

    fn neg() -> Negotiated {
        Negotiated::from_word(default_features())
    }

    fn tcp_gso(size: u16) -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: size,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    }

    #[test]
    fn ethernet_header_moves_the_offsets() {
        let h = tcp_gso(1448);
        let ip = h.without_ethernet();
        assert_eq!((ip.csum_start, ip.hdr_len), (20, 40));
        assert_eq!(ip.with_ethernet(), h);
        // Without NEEDS_CSUM or GSO the fields mean nothing and stay as they are.
        let plain = VnetHdr {
            csum_start: 3,
            hdr_len: 5,
            ..Default::default()
        };
        assert_eq!(plain.without_ethernet(), plain);
        assert_eq!(plain.with_ethernet(), plain);
    }

    #[test]
    fn encode_decode_roundtrip() {
        let h = tcp_gso(1448);
        assert_eq!(VnetHdr::decode(&h.encode()), h);
        assert_eq!(h.encode()[6..8], 34u16.to_le_bytes());
    }

    #[test]
    fn tx_accepts_valid_gso_and_clears_driver_only_bits() {
        let mut h = tcp_gso(1448);
        h.flags |= F_DATA_VALID;
        h.num_buffers = 7;
        let out = check_tx(&h, 65000, 1500, &neg()).unwrap();
        assert_eq!(out.flags, F_NEEDS_CSUM);
        assert_eq!(out.num_buffers, 0);
        assert_eq!(out.gso_size, 1448);
    }

    #[test]
    fn tx_rejects_each_bad_field() {
        let n = neg();
        assert_eq!(
            check_tx(&VnetHdr::default(), 13, 1500, &n),
            Err(TxDrop::Runt)
        );
        assert_eq!(
            check_tx(&VnetHdr::default(), 1519, 1500, &n),
            Err(TxDrop::Oversize)
        );
        assert!(check_tx(&VnetHdr::default(), 1518, 1500, &n).is_ok());
        let mut h = tcp_gso(1448);
        h.csum_start = 64990;
        assert_eq!(check_tx(&h, 65000, 1500, &n), Err(TxDrop::CsumOutOfRange));
        h = tcp_gso(1448);
        h.csum_start = 4;
        assert_eq!(check_tx(&h, 65000, 1500, &n), Err(TxDrop::CsumOutOfRange));
        h = tcp_gso(1448);
        h.csum_offset = u16::MAX;
        assert_eq!(check_tx(&h, 65000, 1500, &n), Err(TxDrop::CsumOutOfRange));
        assert_eq!(
            check_tx(&tcp_gso(0), 65000, 1500, &n),
            Err(TxDrop::GsoBadSize)
        );
        assert_eq!(
            check_tx(&tcp_gso(65000), 65000, 1500, &n),
            Err(TxDrop::GsoBadSize)
        );
        h = tcp_gso(1448);
        h.gso_type = 9;
        assert_eq!(check_tx(&h, 65000, 1500, &n), Err(TxDrop::GsoUnknown));
        h.gso_type = GSO_UDP;
        assert_eq!(check_tx(&h, 65000, 1500, &n), Err(TxDrop::GsoNotNegotiated));
        h.gso_type = GSO_TCPV4 | GSO_ECN;
        assert_eq!(check_tx(&h, 65000, 1500, &n), Err(TxDrop::GsoNotNegotiated));
        h = tcp_gso(1448);
        h.flags = 0;
        assert_eq!(check_tx(&h, 65000, 1500, &n), Err(TxDrop::GsoWithoutCsum));
        h = tcp_gso(1448);
        h.hdr_len = 65001;
        assert_eq!(check_tx(&h, 65000, 1500, &n), Err(TxDrop::BadHdrLen));
        assert_eq!(
            check_tx(&tcp_gso(1448), 70000, 1500, &n),
            Err(TxDrop::Oversize)
        );
    }

    #[test]
    fn tx_without_csum_feature_rejects_partial_checksums() {
        let n = Negotiated::from_word(1 << 32);
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..Default::default()
        };
        assert_eq!(check_tx(&h, 100, 1500, &n), Err(TxDrop::CsumNotNegotiated));
    }

    #[test]
    fn rx_actions() {
        let n = neg();
        let mut h = VnetHdr::default();
        assert_eq!(rx_action(&mut h, &n, RxCsum::Verify), RxAction::Verify);
        assert_eq!(rx_action(&mut h, &n, RxCsum::Complete), RxAction::Verify);
        assert_eq!(
            rx_action(&mut h, &n, RxCsum::Passthrough),
            RxAction::Deliver
        );
        // A partial checksum: left to the host, or completed and marked.
        let partial = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..Default::default()
        };
        let mut h = partial;
        assert_eq!(rx_action(&mut h, &n, RxCsum::Verify), RxAction::Deliver);
        let mut h = partial;
        assert_eq!(
            rx_action(&mut h, &n, RxCsum::Complete),
            RxAction::CompleteAndMark
        );
        // GSO frames keep NEEDS_CSUM whatever the mode.
        let mut h = tcp_gso(1448);
        assert_eq!(rx_action(&mut h, &n, RxCsum::Complete), RxAction::Deliver);
        let mut h = VnetHdr {
            flags: F_DATA_VALID,
            ..Default::default()
        };
        assert_eq!(rx_action(&mut h, &n, RxCsum::Verify), RxAction::Deliver);
        let mut h = tcp_gso(1448);
        assert_eq!(rx_action(&mut h, &n, RxCsum::Verify), RxAction::Deliver);
        h.gso_type = GSO_UDP;
        assert_eq!(rx_action(&mut h, &n, RxCsum::Verify), RxAction::DropGso);
        // Without GUEST_CSUM the flags must be zero and partial checksums completed.
        let n = Negotiated::from_word(1 << 32);
        let mut h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..Default::default()
        };
        assert_eq!(rx_action(&mut h, &n, RxCsum::Verify), RxAction::Complete);
        assert_eq!(h.flags, 0);
        let mut h = VnetHdr {
            flags: F_DATA_VALID,
            ..Default::default()
        };
        assert_eq!(rx_action(&mut h, &n, RxCsum::Verify), RxAction::Deliver);
        assert_eq!(h.flags, 0);
    }
}
