//! Checksum work the card does for the host: verifying IPv4/IPv6 TCP/UDP/ICMP checksums of frames
//! going up (so they can be marked DATA_VALID) and completing a partial checksum
//! (`NEEDS_CSUM`). Pure functions on byte slices; parsing is etherparse's, summing is
//! etherparse's 16-bit one's complement adder.

// etherparse sums in native byte order; `ones_complement` returns the field as a native u16,
// so wire bytes come from `to_ne_bytes`.
use etherparse::checksum::u64_16bit_word as sum16;
use etherparse::{IpNumber, LaxNetSlice, LaxSlicedPacket, LenSource, NetSlice, SlicedPacket};
use thiserror::Error;

/// Outcome of checking a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every checksum the frame carries (IPv4 header and the L4 one) is correct.
    Valid,
    /// A checksum is wrong.
    Invalid,
    /// Nothing the card can vouch for, and why.
    NotApplicable(Unchecked),
}

/// Why a frame's checksums cannot be vouched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unchecked {
    /// An IP fragment: its L4 checksum covers the whole datagram.
    Fragment,
    /// Not IP (ARP, another EtherType).
    NotIp,
    /// An L4 protocol without a checksum the card knows (ESP, GRE, SCTP, ...).
    NoL4Csum,
    /// IP, but its headers do not parse (or their lengths disagree).
    Malformed,
}

/// EtherTypes of IPv4, IPv6 and the VLAN tags that may precede them.
fn claims_ip(frame: &[u8]) -> bool {
    matches!(
        frame.get(12..14),
        Some([0x08, 0x00] | [0x86, 0xdd] | [0x81, 0x00] | [0x88, 0xa8])
    )
}

/// Verifies the IPv4 header checksum and the TCP, UDP, ICMP or ICMPv6 checksum of an Ethernet
/// frame (optionally VLAN-tagged).
pub fn verify(frame: &[u8]) -> Verdict {
    use Unchecked::*;
    let Ok(pkt) = SlicedPacket::from_ethernet(frame) else {
        return Verdict::NotApplicable(if claims_ip(frame) { Malformed } else { NotIp });
    };
    let Some(ip) = pkt.ip_payload() else {
        return Verdict::NotApplicable(NotIp);
    };
    if ip.fragmented {
        return Verdict::NotApplicable(Fragment);
    }
    let l4 = ip.payload;
    let proto = ip.ip_number;
    let pseudo = match &pkt.net {
        Some(NetSlice::Ipv4(v4)) => {
            let h = v4.header();
            if sum16::ones_complement(sum16::add_slice(0, h.slice())) != 0 {
                return Verdict::Invalid;
            }
            if proto == IpNumber::ICMP {
                0
            } else {
                let s = sum16::add_4bytes(0, h.source());
                let s = sum16::add_4bytes(s, h.destination());
                let Ok(len) = u16::try_from(l4.len()) else {
                    return Verdict::NotApplicable(Malformed);
                };
                sum16::add_4bytes(s, [0, proto.0, len.to_be_bytes()[0], len.to_be_bytes()[1]])
            }
        }
        Some(NetSlice::Ipv6(v6)) => {
            let h = v6.header();
            let s = sum16::add_slice(0, &h.source());
            let s = sum16::add_slice(s, &h.destination());
            let Ok(len) = u32::try_from(l4.len()) else {
                return Verdict::NotApplicable(Malformed);
            };
            let s = sum16::add_4bytes(s, len.to_be_bytes());
            sum16::add_4bytes(s, [0, 0, 0, proto.0])
        }
        _ => return Verdict::NotApplicable(NotIp),
    };
    let is_v4 = matches!(pkt.net, Some(NetSlice::Ipv4(_)));
    l4_verdict(proto, is_v4, l4, l4.len(), || {
        Some(sum16::add_slice(pseudo, l4))
    })
}

/// The L4 part of [`verify`]: `l4` holds at least the first 8 bytes of the `l4_len`-byte L4
/// segment (all of it when shorter), `sum` is the pseudo-header sum plus the whole segment's.
fn l4_verdict(
    proto: IpNumber,
    is_v4: bool,
    l4: &[u8],
    l4_len: usize,
    sum: impl FnOnce() -> Option<u64>,
) -> Verdict {
    match proto {
        IpNumber::TCP if l4_len >= 20 => {}
        IpNumber::UDP if l4_len >= 8 => {
            if is_v4 && l4[6] == 0 && l4[7] == 0 {
                // IPv4 UDP without a checksum: nothing to verify, and valid by RFC 768.
                return Verdict::Valid;
            }
        }
        IpNumber::ICMP if is_v4 && l4_len >= 4 => {}
        IpNumber::IPV6_ICMP if !is_v4 && l4_len >= 4 => {}
        IpNumber::TCP | IpNumber::UDP | IpNumber::ICMP | IpNumber::IPV6_ICMP => {
            return Verdict::Invalid
        }
        _ => return Verdict::NotApplicable(Unchecked::NoL4Csum),
    }
    match sum() {
        Some(s) if sum16::ones_complement(s) == 0 => Verdict::Valid,
        Some(_) => Verdict::Invalid,
        None => Verdict::NotApplicable(Unchecked::Malformed),
    }
}

/// Bytes of a frame's head that [`verify_split`] parses: Ethernet with two VLAN tags, IPv6 with
/// a few extension headers, and the L4 header fit.
pub const HEAD: usize = 256;

/// [`verify`] for a frame that is not in one slice (the host's RX buffers): `head` holds its
/// first bytes (up to [`HEAD`]), `len` is its whole length and `sum(from, n)` sums `n` of its
/// bytes from `from` where they lie (etherparse's accumulator, as `sum_slice` would). The same
/// verdict as `verify` over the whole frame, without copying it. `None` when the head does not
/// decide it cheaply (headers beyond the head, lengths that disagree): then the caller runs
/// `verify` over a copy, so odd frames get exactly the full check.
pub fn verify_split(
    head: &[u8],
    len: usize,
    sum: impl FnOnce(usize, usize) -> Option<u64>,
) -> Option<Verdict> {
    if len <= head.len() {
        return Some(verify(&head[..len]));
    }
    let pkt = LaxSlicedPacket::from_ethernet(head).ok()?;
    // The L4 parse may stop at the head's end (a UDP length past it, say); nothing of it is
    // used here. Anything that stopped earlier goes to the full check.
    if let Some((_, layer)) = &pkt.stop_err {
        use etherparse::err::Layer;
        if !matches!(
            layer,
            Layer::UdpHeader | Layer::UdpPayload | Layer::TcpHeader | Layer::Icmpv4 | Layer::Icmpv6
        ) {
            return None;
        }
    }
    let at = |p: *const u8| (p as usize).wrapping_sub(head.as_ptr() as usize);
    let (ip, ip_end, pseudo_of, is_v4) = match pkt.net.as_ref()? {
        LaxNetSlice::Ipv4(v4) => {
            let h = v4.header();
            let ip = v4.payload();
            // Cut by the head's end (incomplete), or whole by the header's length field.
            if !ip.incomplete && ip.len_source != LenSource::Ipv4HeaderTotalLen {
                return None;
            }
            let s = sum16::add_4bytes(0, h.source());
            let s = sum16::add_4bytes(s, h.destination());
            let end = at(h.slice().as_ptr()) + usize::from(h.total_len());
            (ip, end, s, true)
        }
        LaxNetSlice::Ipv6(v6) => {
            let h = v6.header();
            let ip = v6.payload();
            // Cut by the head's end (incomplete), or whole by the header's length field.
            if !ip.incomplete && ip.len_source != LenSource::Ipv6HeaderPayloadLen {
                return None;
            }
            let s = sum16::add_slice(0, &h.source());
            let s = sum16::add_slice(s, &h.destination());
            let end = at(h.slice().as_ptr()) + 40 + usize::from(h.payload_length());
            (ip, end, s, false)
        }
        LaxNetSlice::Arp(_) => return None,
    };
    let l4_at = at(ip.payload.as_ptr());
    // The L4 header must be in the head, and the IP lengths must fit the frame.
    if l4_at + 8 > head.len() || ip_end > len || ip_end < l4_at {
        return None;
    }
    let l4_len = ip_end - l4_at;
    let proto = ip.ip_number;
    // The L4 header's own length, as the full parse checks it; anything unusual goes there.
    let l4 = &head[l4_at..];
    let consistent = match proto {
        IpNumber::UDP => usize::from(u16::from_be_bytes([l4[4], l4[5]])) == l4_len,
        IpNumber::TCP => l4
            .get(12)
            .is_some_and(|&d| (20..=l4_len).contains(&(usize::from(d >> 4) * 4))),
        IpNumber::ICMP | IpNumber::IPV6_ICMP => l4_len >= 8,
        _ => false,
    };
    if !consistent && !ip.fragmented {
        return None;
    }
    // Parsed as the full check would; now its verdicts, in its order.
    if ip.fragmented {
        return Some(Verdict::NotApplicable(Unchecked::Fragment));
    }
    if let LaxNetSlice::Ipv4(v4) = pkt.net.as_ref()? {
        if sum16::ones_complement(sum16::add_slice(0, v4.header().slice())) != 0 {
            return Some(Verdict::Invalid);
        }
    }

    let pseudo = if is_v4 {
        if proto == IpNumber::ICMP {
            0
        } else {
            let l = u16::try_from(l4_len).ok()?.to_be_bytes();
            sum16::add_4bytes(pseudo_of, [0, proto.0, l[0], l[1]])
        }
    } else {
        let s = sum16::add_4bytes(pseudo_of, u32::try_from(l4_len).ok()?.to_be_bytes());
        sum16::add_4bytes(s, [0, 0, 0, proto.0])
    };
    Some(l4_verdict(proto, is_v4, l4, l4_len, || {
        Some(add_part(pseudo, sum(l4_at, l4_len)?, false))
    }))
}

/// Why a partial checksum could not be completed.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
#[error("csum_start {start} + csum_offset {offset} does not fit a {len}-byte frame")]
pub struct CsumRangeError {
    pub start: usize,
    pub offset: usize,
    pub len: usize,
}

/// The value that completes a partial checksum: the one's complement of the sum from
/// `start` to the end of `frame`, with the checksum field holding the pseudo-header sum as the
/// kernel leaves it for CHECKSUM_PARTIAL. Returns the byte position of the field too.
pub fn partial_checksum(
    frame: &[u8],
    start: usize,
    offset: usize,
) -> Result<(usize, [u8; 2]), CsumRangeError> {
    let err = CsumRangeError {
        start,
        offset,
        len: frame.len(),
    };
    let field = start.checked_add(offset).ok_or(err)?;
    if field.checked_add(2).is_none_or(|end| end > frame.len()) {
        return Err(err);
    }
    Ok((field, finish(sum16::add_slice(0, &frame[start..]))))
}

/// The two bytes that complete a partial checksum whose bytes (from `csum_start` to the end,
/// the pseudo-header sum in the field included) add up to `sum` (etherparse's accumulator).
pub fn finish(sum: u64) -> [u8; 2] {
    sum16::ones_complement_with_no_zero(sum).to_ne_bytes()
}

/// The one's complement of `sum` as wire bytes: a checksum field's value (0 over data whose
/// checksum is right).
pub fn complement(sum: u64) -> [u8; 2] {
    sum16::ones_complement(sum).to_ne_bytes()
}

/// Adds a 16-bit partial sum of bytes that start at an odd position of the summed range:
/// one's complement sums commute with byte swaps (RFC 1071), so it goes in swapped.
pub fn add_part(sum: u64, part: u64, odd: bool) -> u64 {
    let folded = !sum16::ones_complement(part);
    let folded = if odd { folded.swap_bytes() } else { folded };
    sum16::add_2bytes(sum, folded.to_ne_bytes())
}

/// Sums a slice with etherparse's adder (native byte order, a trailing odd byte padded).
pub fn sum_slice(bytes: &[u8]) -> u64 {
    sum16::add_slice(0, bytes)
}

/// Completes a partial checksum in place.
pub fn complete(frame: &mut [u8], start: usize, offset: usize) -> Result<(), CsumRangeError> {
    let (at, value) = partial_checksum(frame, start, offset)?;
    frame[at..at + 2].copy_from_slice(&value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const SRC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const DST: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn udp4(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(SRC, DST)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1000, 2000);
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    fn tcp6(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(SRC, DST)
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .tcp(80, 4000, 1, 65535);
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    fn icmp4() -> Vec<u8> {
        let b = PacketBuilder::ethernet2(SRC, DST)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .icmpv4_echo_request(7, 1);
        let mut v = Vec::new();
        b.write(&mut v, b"ping payload").unwrap();
        v
    }

    fn icmp6() -> Vec<u8> {
        let b = PacketBuilder::ethernet2(SRC, DST)
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .icmpv6_echo_request(7, 1);
        let mut v = Vec::new();
        b.write(&mut v, b"ping6").unwrap();
        v
    }

    #[test]
    fn valid_frames_verify() {
        assert_eq!(verify(&udp4(b"hello")), Verdict::Valid);
        assert_eq!(verify(&udp4(&[0xab; 1471])), Verdict::Valid);
        assert_eq!(verify(&tcp6(&[1, 2, 3])), Verdict::Valid);
        assert_eq!(verify(&icmp4()), Verdict::Valid);
        assert_eq!(verify(&icmp6()), Verdict::Valid);
    }

    #[test]
    fn every_corruption_is_caught() {
        for frame in [udp4(b"hello world"), tcp6(b"abc"), icmp4(), icmp6()] {
            let v6 = frame[12] == 0x86;
            for i in 14..frame.len() {
                // IPv6 has no header checksum: version, traffic class, flow label and hop limit
                // are covered by nothing.
                if v6 && (i < 18 || i == 21) {
                    continue;
                }
                let mut f = frame.clone();
                f[i] ^= 0x10;
                // Flipping a length field may make the frame unparsable; it must never verify.
                assert_ne!(verify(&f), Verdict::Valid, "byte {i} of {frame:?}");
            }
        }
    }

    #[test]
    fn zero_udp4_checksum_is_valid_and_ipv4_header_is_checked() {
        let mut f = udp4(b"x");
        f[14 + 20 + 6] = 0;
        f[14 + 20 + 7] = 0;
        assert_eq!(verify(&f), Verdict::Valid);
        f[14 + 10] ^= 1; // IPv4 header checksum
        assert_eq!(verify(&f), Verdict::Invalid);
    }

    #[test]
    fn non_ip_and_fragments_are_not_applicable() {
        let mut arp = vec![0u8; 60];
        arp[12] = 0x08;
        arp[13] = 0x06;
        assert_eq!(verify(&arp), Verdict::NotApplicable(Unchecked::NotIp));
        assert_eq!(verify(&[0u8; 5]), Verdict::NotApplicable(Unchecked::NotIp));
        let mut bad = udp4(b"x");
        bad[14] = 0x4f; // IHL 15: longer than the packet
        assert_eq!(verify(&bad), Verdict::NotApplicable(Unchecked::Malformed));
        let mut esp = udp4(b"0123456789");
        esp[14 + 9] = 50;
        let c = sum16::ones_complement(sum16::add_slice(0, &{
            let mut h = esp[14..34].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        }));
        esp[24..26].copy_from_slice(&c.to_ne_bytes());
        assert_eq!(verify(&esp), Verdict::NotApplicable(Unchecked::NoL4Csum));
        let mut f = udp4(b"fragment");
        f[14 + 6] = 0x20; // more fragments
        assert_ne!(verify(&f), Verdict::Valid);
        f[24] = 0;
        f[25] = 0;
        let c = sum16::ones_complement(sum16::add_slice(0, &f[14..34]));
        f[24..26].copy_from_slice(&c.to_ne_bytes());
        assert_eq!(verify(&f), Verdict::NotApplicable(Unchecked::Fragment));
    }

    /// The pseudo-header sum the kernel leaves in the checksum field of a CHECKSUM_PARTIAL
    /// packet: folded, not complemented.
    fn pseudo_field(frame: &[u8]) -> (usize, usize, [u8; 2]) {
        let pkt = SlicedPacket::from_ethernet(frame).unwrap();
        let ip = pkt.ip_payload().unwrap();
        let len = ip.payload.len();
        let (sum, start, offset) = match &pkt.net {
            Some(NetSlice::Ipv4(v4)) => {
                let h = v4.header();
                let s = sum16::add_4bytes(0, h.source());
                let s = sum16::add_4bytes(s, h.destination());
                let l = (len as u16).to_be_bytes();
                (sum16::add_4bytes(s, [0, ip.ip_number.0, l[0], l[1]]), 34, 6)
            }
            Some(NetSlice::Ipv6(v6)) => {
                let h = v6.header();
                let s = sum16::add_slice(0, &h.source());
                let s = sum16::add_slice(s, &h.destination());
                let s = sum16::add_4bytes(s, (len as u32).to_be_bytes());
                (sum16::add_4bytes(s, [0, 0, 0, ip.ip_number.0]), 54, 16)
            }
            _ => unreachable!(),
        };
        (start, offset, (!sum16::ones_complement(sum)).to_ne_bytes())
    }

    #[test]
    fn completion_matches_a_full_checksum() {
        for good in [udp4(&[9u8; 333]), tcp6(&[7u8; 1000]), udp4(b"")] {
            let (start, offset, field) = pseudo_field(&good);
            let mut f = good.clone();
            f[start + offset..start + offset + 2].copy_from_slice(&field);
            assert_ne!(verify(&f), Verdict::Valid);
            complete(&mut f, start, offset).unwrap();
            assert_eq!(verify(&f), Verdict::Valid);
            assert_eq!(f, good);
        }
    }

    #[test]
    fn split_sums_equal_the_whole() {
        let data: Vec<u8> = (0..1001u32).map(|i| (i * 7 + i / 5) as u8).collect();
        let whole = finish(sum_slice(&data));
        for cuts in [
            [0, 1, 2],
            [1, 3, 999],
            [2, 500, 501],
            [7, 8, 1000],
            [13, 13, 600],
        ] {
            let mut sum = 0;
            let mut at = 0;
            for &end in cuts.iter().chain([data.len()].iter()) {
                sum = add_part(sum, sum_slice(&data[at..end]), at % 2 == 1);
                at = end;
            }
            assert_eq!(finish(sum), whole, "cuts {cuts:?}");
        }
    }

    /// `verify_split` over heads of several lengths, summing from the whole frame.
    fn split_verdict(f: &[u8], head: usize) -> Verdict {
        let h = &f[..head.min(f.len())];
        verify_split(h, f.len(), |from, n| f.get(from..from + n).map(sum_slice))
            .unwrap_or_else(|| verify(f))
    }

    #[test]
    fn split_verification_agrees_with_the_whole() {
        let mut zero = udp4(&[3; 2000]);
        zero[40] = 0;
        zero[41] = 0;
        let udp6 = {
            let b = PacketBuilder::ethernet2(SRC, DST)
                .ipv6([0xfd; 16], [0xfe; 16], 64)
                .udp(53, 5353);
            let mut v = Vec::new();
            b.write(&mut v, &[9; 1500]).unwrap();
            v
        };
        let big = [
            udp4(&[0x5a; 3000]),
            zero,
            udp6,
            tcp6(&[7; 4000]),
            udp4(&[1; 257]),
            icmp4(),
            icmp6(),
            udp4(b"x"),
        ];
        for frame in &big {
            for head in [14, 34, 41, 42, 60, 64, 74, 128, HEAD] {
                assert_eq!(split_verdict(frame, head), verify(frame), "head {head}");
            }
            // Every single-bit corruption, every byte: the same verdict either way.
            for (i, bits) in
                (0..frame.len().min(400)).flat_map(|i| [(i, 0x01), (i, 0x10), (i, 0x80), (i, 0xff)])
            {
                let mut f = frame.clone();
                f[i] ^= bits;
                assert_eq!(
                    split_verdict(&f, 64),
                    verify(&f),
                    "byte {i} len {}",
                    f.len()
                );
                assert_eq!(
                    split_verdict(&f, HEAD),
                    verify(&f),
                    "byte {i} len {} head",
                    f.len()
                );
            }
            // A frame cut short or with padding after the IP packet.
            for cut in [frame.len() - 1, frame.len() / 2, 60] {
                let f = &frame[..cut.min(frame.len())];
                assert_eq!(split_verdict(f, 64), verify(f), "cut at {cut}");
            }
            let mut padded = frame.clone();
            padded.extend_from_slice(&[0; 17]);
            assert_eq!(split_verdict(&padded, 64), verify(&padded));
        }
        // The cheap path decides the common frames (no fallback to a copy).
        for frame in &big[..5] {
            let h = &frame[..HEAD];
            assert!(verify_split(h, frame.len(), |from, n| frame
                .get(from..from + n)
                .map(sum_slice))
            .is_some());
        }
    }

    #[test]
    fn completion_range_is_checked() {
        let mut f = vec![0u8; 64];
        assert!(complete(&mut f, 60, 3).is_err());
        assert!(complete(&mut f, usize::MAX, 3).is_err());
        assert!(complete(&mut f, 34, usize::MAX).is_err());
        assert!(complete(&mut f, 34, 6).is_ok());
    }
}
