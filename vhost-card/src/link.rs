//! The IP-only link (`--link ip`): the card's end is a TUN device, so its kernel sends and
//! receives bare IP packets, while the host's stock `virtio_net` sees an ordinary Ethernet link.
//! This module is the pure logic of that translation, on byte slices:
//!
//! * host to card: which frames go to the card (IPv4 and IPv6, their 14-byte Ethernet header
//!   stripped), which the card answers itself (ARP requests, IPv6 neighbour solicitations: for
//!   every address behind the link, as passt does), and which are counted and dropped (other
//!   EtherTypes, frames too short for their headers, bad or gratuitous ARP/ND);
//! * card to host: the Ethernet header put in front of each IP packet: the card's MAC as source,
//!   as destination the host's MAC (learned from the frames it sends; broadcast until then),
//!   the IPv4/IPv6 multicast MAC of a multicast destination (RFC 1112, RFC 2464), or broadcast
//!   for 255.255.255.255.
//!
//! What the host's own addresses are is learned from its ARP and ND packets (sender addresses,
//! the targets of its duplicate address detection), so the card never claims one of them.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::vnet::ETH_HLEN;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
const ICMPV6: u8 = 58;
const ND_NS: u8 = 135;
const ND_NA: u8 = 136;
const ARP_LEN: usize = 28;
const IPV6_HLEN: usize = 40;

/// Bytes of a host frame the classifier looks at (an NS with a few options fits).
pub const PEEK: usize = 256;
/// Bytes of a host frame that tell what it is (an ARP packet, or an IPv6 header and the
/// ICMPv6 type); only a neighbour solicitation needs more ([`PEEK`]).
pub const SNIFF: usize = ETH_HLEN + IPV6_HLEN + 10;

/// Whether a frame starting with `b` is an ICMPv6 neighbour solicitation (the classifier then
/// needs up to [`PEEK`] bytes).
pub fn is_neighbour_solicitation(b: &[u8]) -> bool {
    b.len() > ETH_HLEN + IPV6_HLEN
        && be16(b, 12) == ETHERTYPE_IPV6
        && b[ETH_HLEN + 6] == ICMPV6
        && b[ETH_HLEN + IPV6_HLEN] == ND_NS
}
/// Largest reply the card makes (an NA with its target link-layer address option).
pub const REPLY_MAX: usize = ETH_HLEN + IPV6_HLEN + 32;
/// How many host addresses of each family are remembered.
const HOST_ADDRS: usize = 16;

/// Why an ARP or ND packet from the host got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Not a well-formed request (lengths, types, hop limit, checksum, options).
    ArpMalformed,
    /// For an address that cannot be behind the link (the host's own, unspecified, broadcast,
    /// multicast, loopback).
    ArpNotBehind,
    /// Gratuitous ARP, an ARP probe, or an unsolicited reply: the host announcing itself.
    ArpGratuitous,
    NdMalformed,
    NdNotBehind,
    /// A duplicate address detection probe (source ::): the host testing its own address.
    NdDad,
}

/// What to do with a frame from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxClass {
    /// An IP packet: strip the Ethernet header and hand it to the card's kernel.
    Ip,
    /// Answered by the card: a reply of this many bytes was written.
    Reply(Proto, usize),
    /// An ARP/ND packet counted and not answered.
    Ignored(Ignored),
    /// An EtherType the link cannot carry (VLAN tags, LLDP, ...).
    NotIp,
    /// Too short for the headers it claims, or an IP version that contradicts its EtherType.
    Malformed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Arp,
    Nd,
}

/// The link's state shared by the queue pairs: the card's MAC, and what was learned about
/// the host.
#[derive(Debug)]
pub struct IpLink {
    card_mac: [u8; 6],
    /// The host's MAC in the low 48 bits, bit 63 set once learned.
    host_mac: AtomicU64,
    host: Mutex<HostAddrs>,
}

#[derive(Debug, Default)]
struct HostAddrs {
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
}

fn remember<T: PartialEq + Copy>(list: &mut Vec<T>, a: T) {
    if !list.contains(&a) {
        if list.len() == HOST_ADDRS {
            list.remove(0);
        }
        list.push(a);
    }
}

const LEARNED: u64 = 1 << 63;

fn mac_u64(m: &[u8]) -> u64 {
    m.iter().take(6).fold(0, |a, &b| a << 8 | u64::from(b))
}

fn is_unicast_mac(m: &[u8]) -> bool {
    m.len() >= 6 && m[0] & 1 == 0 && m[..6] != [0; 6]
}

/// A locally administered unicast MAC derived from the tap's name (stable across restarts).
pub fn default_mac(name: &str) -> [u8; 6] {
    // FNV-1a over the name.
    let h = name
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
        .to_be_bytes();
    [0x02, 0xca, h[0], h[1], h[2], h[3]]
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The ICMPv6 checksum (RFC 8200, 8.1) of `msg` as a big-endian value: what goes in the field
/// when it holds zero, and 0 when the message's own checksum is right.
fn icmpv6_sum(src: &[u8], dst: &[u8], msg: &[u8]) -> u16 {
    use crate::csum::{add_part, complement, sum_slice};
    let len = u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes();
    let mut s = 0;
    for part in [src, dst, &len[..], &[0, 0, 0, ICMPV6][..], msg] {
        s = add_part(s, sum_slice(part), false);
    }
    u16::from_be_bytes(complement(s))
}

/// Whether an IPv4 address can be behind the link at all.
fn v4_routable(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback())
        && a.octets()[0] < 240
}

fn v6_routable(a: Ipv6Addr) -> bool {
    !(a.is_unspecified() || a.is_multicast() || a.is_loopback())
}

impl IpLink {
    pub fn new(card_mac: [u8; 6]) -> Self {
        IpLink {
            card_mac,
            host_mac: AtomicU64::new(0),
            host: Mutex::new(HostAddrs::default()),
        }
    }

    pub fn card_mac(&self) -> [u8; 6] {
        self.card_mac
    }

    /// The host's MAC, once a frame from it was seen.
    pub fn host_mac(&self) -> Option<[u8; 6]> {
        let v = self.host_mac.load(Ordering::Relaxed);
        (v & LEARNED != 0).then(|| {
            let b = v.to_be_bytes();
            [b[2], b[3], b[4], b[5], b[6], b[7]]
        })
    }

    fn learn_mac(&self, src: &[u8]) {
        if is_unicast_mac(src) {
            let v = mac_u64(src) | LEARNED;
            if self.host_mac.load(Ordering::Relaxed) != v {
                self.host_mac.store(v, Ordering::Relaxed);
            }
        }
    }

    fn host_addrs(&self) -> std::sync::MutexGuard<'_, HostAddrs> {
        self.host.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Classifies a frame from the host of `frame_len` bytes whose first bytes are `peek` (at
    /// least `min(frame_len, PEEK)` of them); an answer goes into `reply`.
    pub fn classify_tx(
        &self,
        peek: &[u8],
        frame_len: usize,
        reply: &mut [u8; REPLY_MAX],
    ) -> TxClass {
        if frame_len < ETH_HLEN || peek.len() < ETH_HLEN {
            return TxClass::Malformed;
        }
        self.learn_mac(&peek[6..12]);
        let body = &peek[ETH_HLEN..];
        let body_len = frame_len - ETH_HLEN;
        match be16(peek, 12) {
            ETHERTYPE_IPV4 => {
                if body_len < 20 || body[0] >> 4 != 4 || usize::from(body[0] & 0xf) < 5 {
                    return TxClass::Malformed;
                }
                TxClass::Ip
            }
            ETHERTYPE_IPV6 => {
                if body_len < IPV6_HLEN || body[0] >> 4 != 6 {
                    return TxClass::Malformed;
                }
                if body[6] == ICMPV6 && body.get(IPV6_HLEN) == Some(&ND_NS) {
                    return match self.answer_ns(peek, frame_len, reply) {
                        Ok(n) => TxClass::Reply(Proto::Nd, n),
                        Err(why) => TxClass::Ignored(why),
                    };
                }
                TxClass::Ip
            }
            ETHERTYPE_ARP => match self.answer_arp(peek, frame_len, reply) {
                Ok(n) => TxClass::Reply(Proto::Arp, n),
                Err(why) => TxClass::Ignored(why),
            },
            _ => TxClass::NotIp,
        }
    }

    /// Answers an ARP request (RFC 826) for any address behind the link with the card's MAC.
    fn answer_arp(
        &self,
        f: &[u8],
        frame_len: usize,
        out: &mut [u8; REPLY_MAX],
    ) -> Result<usize, Ignored> {
        if frame_len < ETH_HLEN + ARP_LEN || f.len() < ETH_HLEN + ARP_LEN {
            return Err(Ignored::ArpMalformed);
        }
        let a = &f[ETH_HLEN..ETH_HLEN + ARP_LEN];
        // Ethernet, IPv4, 6-byte and 4-byte addresses.
        if a[..6] != [0, 1, 8, 0, 6, 4] || !is_unicast_mac(&a[8..14]) {
            return Err(Ignored::ArpMalformed);
        }
        let op = be16(a, 6);
        let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
        let tpa = Ipv4Addr::new(a[24], a[25], a[26], a[27]);
        if op == 2 {
            // Nobody asked (the card never sends a request): an announcement.
            if v4_routable(spa) {
                remember(&mut self.host_addrs().v4, spa);
            }
            return Err(Ignored::ArpGratuitous);
        }
        if op != 1 {
            return Err(Ignored::ArpMalformed);
        }
        if spa.is_unspecified() || spa == tpa {
            // A probe (RFC 5227) or a gratuitous request: the host's own address, never ours.
            if v4_routable(tpa) {
                remember(&mut self.host_addrs().v4, tpa);
            }
            return Err(Ignored::ArpGratuitous);
        }
        if !v4_routable(spa) {
            return Err(Ignored::ArpMalformed);
        }
        let mut host = self.host_addrs();
        remember(&mut host.v4, spa);
        if !v4_routable(tpa) || host.v4.contains(&tpa) {
            return Err(Ignored::ArpNotBehind);
        }
        drop(host);
        let n = ETH_HLEN + ARP_LEN;
        out[..6].copy_from_slice(&a[8..14]);
        out[6..12].copy_from_slice(&self.card_mac);
        out[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        let r = &mut out[ETH_HLEN..n];
        r[..6].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
        r[6..8].copy_from_slice(&2u16.to_be_bytes());
        r[8..14].copy_from_slice(&self.card_mac);
        r[14..18].copy_from_slice(&tpa.octets());
        r[18..24].copy_from_slice(&a[8..14]);
        r[24..28].copy_from_slice(&spa.octets());
        Ok(n)
    }

    /// Answers a neighbour solicitation (RFC 4861, 7.1.1 checks) for any address behind the link
    /// with a solicited neighbour advertisement carrying the card's MAC.
    fn answer_ns(
        &self,
        f: &[u8],
        frame_len: usize,
        out: &mut [u8; REPLY_MAX],
    ) -> Result<usize, Ignored> {
        let ip = &f[ETH_HLEN..];
        let payload = usize::from(be16(ip, 4));
        if frame_len > f.len()
            || ETH_HLEN + IPV6_HLEN + payload > frame_len
            || payload < 24
            || ip[7] != 255
        {
            return Err(Ignored::NdMalformed);
        }
        let src: [u8; 16] = ip[8..24].try_into().unwrap_or_default();
        let dst: [u8; 16] = ip[24..40].try_into().unwrap_or_default();
        let msg = &ip[IPV6_HLEN..IPV6_HLEN + payload];
        if msg[1] != 0 || icmpv6_sum(&src, &dst, msg) != 0 {
            return Err(Ignored::NdMalformed);
        }
        let target = Ipv6Addr::from(<[u8; 16]>::try_from(&msg[8..24]).unwrap_or_default());
        let src = Ipv6Addr::from(src);
        // Options: type, length in 8-byte units (never 0).
        let mut sllao = None;
        let mut opts = &msg[24..];
        while !opts.is_empty() {
            if opts.len() < 2 || opts[1] == 0 || usize::from(opts[1]) * 8 > opts.len() {
                return Err(Ignored::NdMalformed);
            }
            let len = usize::from(opts[1]) * 8;
            if opts[0] == 1 {
                sllao = Some(&opts[2..8]);
            }
            opts = &opts[len..];
        }
        if target.is_multicast() {
            return Err(Ignored::NdMalformed);
        }
        if src.is_unspecified() {
            let d = Ipv6Addr::from(dst).octets();
            let solicited_node = d[..13] == [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff];
            if !solicited_node || sllao.is_some() {
                return Err(Ignored::NdMalformed);
            }
            if v6_routable(target) {
                remember(&mut self.host_addrs().v6, target);
            }
            return Err(Ignored::NdDad);
        }
        let mut host = self.host_addrs();
        remember(&mut host.v6, src);
        if !v6_routable(target) || host.v6.contains(&target) {
            return Err(Ignored::NdNotBehind);
        }
        drop(host);
        let dst_mac: [u8; 6] = match sllao {
            Some(m) if is_unicast_mac(m) => m.try_into().unwrap_or_default(),
            Some(_) => return Err(Ignored::NdMalformed),
            None => f[6..12].try_into().unwrap_or_default(),
        };
        let n = ETH_HLEN + IPV6_HLEN + 32;
        out[..6].copy_from_slice(&dst_mac);
        out[6..12].copy_from_slice(&self.card_mac);
        out[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        let (h, m) = out[ETH_HLEN..n].split_at_mut(IPV6_HLEN);
        h[..4].copy_from_slice(&[0x60, 0, 0, 0]);
        h[4..6].copy_from_slice(&32u16.to_be_bytes());
        h[6] = ICMPV6;
        h[7] = 255;
        h[8..24].copy_from_slice(&target.octets());
        h[24..40].copy_from_slice(&src.octets());
        m[0] = ND_NA;
        m[1] = 0;
        m[2..4].copy_from_slice(&[0, 0]);
        // Router (the card forwards), Solicited, Override.
        m[4..8].copy_from_slice(&[0xe0, 0, 0, 0]);
        m[8..24].copy_from_slice(&target.octets());
        // Target link-layer address option.
        m[24] = 2;
        m[25] = 1;
        m[26..32].copy_from_slice(&self.card_mac);
        let c = icmpv6_sum(&target.octets(), &src.octets(), m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        Ok(n)
    }

    /// The Ethernet header for an IP packet from the card's kernel whose first bytes are `ip`
    /// (at least 40, or the whole packet); `None` for anything but IPv4 and IPv6.
    pub fn eth_header(&self, ip: &[u8]) -> Option<[u8; ETH_HLEN]> {
        let host = self.host_mac().unwrap_or([0xff; 6]);
        let (dst, ethertype) = match ip.first()? >> 4 {
            4 if ip.len() >= 20 => {
                let d = &ip[16..20];
                let mac = if d[0] & 0xf0 == 0xe0 {
                    [0x01, 0x00, 0x5e, d[1] & 0x7f, d[2], d[3]]
                } else if d == [255; 4] {
                    [0xff; 6]
                } else {
                    host
                };
                (mac, ETHERTYPE_IPV4)
            }
            6 if ip.len() >= IPV6_HLEN => {
                let d = &ip[24..40];
                let mac = if d[0] == 0xff {
                    [0x33, 0x33, d[12], d[13], d[14], d[15]]
                } else {
                    host
                };
                (mac, ETHERTYPE_IPV6)
            }
            _ => return None,
        };
        let mut h = [0u8; ETH_HLEN];
        h[..6].copy_from_slice(&dst);
        h[6..12].copy_from_slice(&self.card_mac);
        h[12..14].copy_from_slice(&ethertype.to_be_bytes());
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const CARD: [u8; 6] = [0x02, 0xca, 1, 2, 3, 4];

    fn arp(op: u16, spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend(HOST);
        f.extend(ETHERTYPE_ARP.to_be_bytes());
        f.extend([0, 1, 8, 0, 6, 4]);
        f.extend(op.to_be_bytes());
        f.extend(HOST);
        f.extend(spa);
        f.extend([0; 6]);
        f.extend(tpa);
        f
    }

    fn ns(src: Ipv6Addr, dst: Ipv6Addr, target: Ipv6Addr, sllao: bool) -> Vec<u8> {
        let mut m = vec![ND_NS, 0, 0, 0, 0, 0, 0, 0];
        m.extend(target.octets());
        if sllao {
            m.extend([1, 1]);
            m.extend(HOST);
        }
        let c = icmpv6_sum(&src.octets(), &dst.octets(), &m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = vec![0x33, 0x33, 0xff, 0, 0, 1];
        f.extend(HOST);
        f.extend(ETHERTYPE_IPV6.to_be_bytes());
        f.extend([0x60, 0, 0, 0]);
        f.extend((m.len() as u16).to_be_bytes());
        f.extend([ICMPV6, 255]);
        f.extend(src.octets());
        f.extend(dst.octets());
        f.extend(m);
        f
    }

    fn classify(link: &IpLink, f: &[u8]) -> (TxClass, Vec<u8>) {
        assert_eq!(
            is_neighbour_solicitation(&f[..f.len().min(SNIFF)]),
            f.len() > 54 && f[12..14] == [0x86, 0xdd] && f[20] == ICMPV6 && f[54] == ND_NS
        );
        let mut out = [0u8; REPLY_MAX];
        let c = link.classify_tx(&f[..f.len().min(PEEK)], f.len(), &mut out);
        let n = if let TxClass::Reply(_, n) = c { n } else { 0 };
        (c, out[..n].to_vec())
    }

    #[test]
    fn arp_requests_for_addresses_behind_the_link_are_answered() {
        let link = IpLink::new(CARD);
        let (c, r) = classify(&link, &arp(1, [10, 77, 0, 2], [10, 77, 0, 1]));
        assert_eq!(c, TxClass::Reply(Proto::Arp, 42));
        assert_eq!(&r[..6], &HOST);
        assert_eq!(&r[6..12], &CARD);
        assert_eq!(be16(&r, 20), 2);
        assert_eq!(&r[22..28], &CARD);
        assert_eq!(&r[28..32], &[10, 77, 0, 1]);
        assert_eq!(&r[32..38], &HOST);
        assert_eq!(&r[38..42], &[10, 77, 0, 2]);
        assert_eq!(link.host_mac(), Some(HOST));
        // Any address behind the link: a host beyond the card too.
        let (c, _) = classify(&link, &arp(1, [10, 77, 0, 2], [8, 8, 8, 8]));
        assert!(matches!(c, TxClass::Reply(Proto::Arp, _)));
    }

    #[test]
    fn arp_the_card_must_not_answer() {
        let link = IpLink::new(CARD);
        let host = [10, 77, 0, 2];
        let cases = [
            (arp(1, [0; 4], host), Ignored::ArpGratuitous),
            (arp(1, host, host), Ignored::ArpGratuitous),
            (arp(2, host, host), Ignored::ArpGratuitous),
            (arp(1, [10, 77, 0, 3], host), Ignored::ArpNotBehind),
            (arp(1, host, [224, 0, 0, 1]), Ignored::ArpNotBehind),
            (arp(1, host, [255; 4]), Ignored::ArpNotBehind),
            (arp(1, host, [127, 0, 0, 1]), Ignored::ArpNotBehind),
            (arp(1, host, [0; 4]), Ignored::ArpNotBehind),
            (arp(3, host, [10, 77, 0, 1]), Ignored::ArpMalformed),
            (arp(1, [255; 4], [10, 77, 0, 1]), Ignored::ArpMalformed),
        ];
        for (f, why) in cases {
            assert_eq!(classify(&link, &f).0, TxClass::Ignored(why), "{f:?}");
        }
        let mut f = arp(1, host, [10, 77, 0, 1]);
        f[15] = 6; // hardware type 6
        assert_eq!(
            classify(&link, &f).0,
            TxClass::Ignored(Ignored::ArpMalformed)
        );
        let f = arp(1, host, [10, 77, 0, 1]);
        assert_eq!(
            classify(&link, &f[..40]).0,
            TxClass::Ignored(Ignored::ArpMalformed)
        );
    }

    #[test]
    fn neighbour_solicitations_are_answered_with_a_valid_advertisement() {
        let link = IpLink::new(CARD);
        let host: Ipv6Addr = "fd77::2".parse().unwrap();
        let card: Ipv6Addr = "fd77::1".parse().unwrap();
        let snm: Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
        for sllao in [true, false] {
            let (c, r) = classify(&link, &ns(host, snm, card, sllao));
            assert_eq!(c, TxClass::Reply(Proto::Nd, 86));
            assert_eq!(&r[..6], &HOST);
            let ip = &r[ETH_HLEN..];
            assert_eq!(ip[7], 255);
            assert_eq!(&ip[8..24], &card.octets());
            assert_eq!(&ip[24..40], &host.octets());
            let m = &ip[40..];
            assert_eq!(m[0], ND_NA);
            assert_eq!(icmpv6_sum(&ip[8..24], &ip[24..40], m), 0, "checksum");
            assert_eq!(&m[8..24], &card.octets());
            assert_eq!(&m[26..32], &CARD);
        }
    }

    #[test]
    fn neighbour_solicitations_the_card_must_not_answer() {
        let link = IpLink::new(CARD);
        let host: Ipv6Addr = "fd77::2".parse().unwrap();
        let card: Ipv6Addr = "fd77::1".parse().unwrap();
        let snm: Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
        let any = Ipv6Addr::UNSPECIFIED;
        assert_eq!(
            classify(&link, &ns(any, snm, card, false)).0,
            TxClass::Ignored(Ignored::NdDad)
        );
        // DAD with a source link-layer option, or not to the solicited-node group.
        assert_eq!(
            classify(&link, &ns(any, snm, card, true)).0,
            TxClass::Ignored(Ignored::NdMalformed)
        );
        assert_eq!(
            classify(&link, &ns(any, "ff02::1".parse().unwrap(), card, false)).0,
            TxClass::Ignored(Ignored::NdMalformed)
        );
        // A DAD target is the host's own address: never answered afterwards.
        assert_eq!(
            classify(&link, &ns(host, snm, card, false)).0,
            TxClass::Ignored(Ignored::NdNotBehind)
        );
        let link = IpLink::new(CARD);
        assert_eq!(
            classify(&link, &ns(host, snm, card, false)).0,
            TxClass::Reply(Proto::Nd, 86)
        );
        assert_eq!(
            classify(&link, &ns(host, snm, host, false)).0,
            TxClass::Ignored(Ignored::NdNotBehind)
        );
        let mut f = ns(host, snm, card, true);
        f[ETH_HLEN + 7] = 64; // hop limit
        assert_eq!(
            classify(&link, &f).0,
            TxClass::Ignored(Ignored::NdMalformed)
        );
        let mut f = ns(host, snm, card, true);
        f[ETH_HLEN + 40 + 10] ^= 1; // checksum
        assert_eq!(
            classify(&link, &f).0,
            TxClass::Ignored(Ignored::NdMalformed)
        );
        let mut f = ns(host, snm, card, true);
        f[ETH_HLEN + 40 + 25] = 0; // option of length 0
        assert_eq!(
            classify(&link, &f).0,
            TxClass::Ignored(Ignored::NdMalformed)
        );
        let f = ns(host, snm, card, true);
        assert_eq!(
            classify(&link, &f[..f.len() - 3]).0,
            TxClass::Ignored(Ignored::NdMalformed)
        );
        let f = ns(host, snm, "ff02::1".parse().unwrap(), false);
        assert_eq!(
            classify(&link, &f).0,
            TxClass::Ignored(Ignored::NdMalformed)
        );
    }

    #[test]
    fn other_frames_are_forwarded_or_refused() {
        let link = IpLink::new(CARD);
        let mut v4 = vec![0u8; 34];
        v4[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        v4[14] = 0x45;
        assert_eq!(classify(&link, &v4).0, TxClass::Ip);
        assert_eq!(classify(&link, &v4[..33]).0, TxClass::Malformed);
        v4[14] = 0x65;
        assert_eq!(classify(&link, &v4).0, TxClass::Malformed);
        let mut v6 = vec![0u8; 54];
        v6[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        v6[14] = 0x60;
        assert_eq!(classify(&link, &v6).0, TxClass::Ip);
        assert_eq!(classify(&link, &v6[..50]).0, TxClass::Malformed);
        let mut vlan = v4.clone();
        vlan[12..14].copy_from_slice(&[0x81, 0]);
        assert_eq!(classify(&link, &vlan).0, TxClass::NotIp);
        assert_eq!(classify(&link, &[0u8; 10]).0, TxClass::Malformed);
    }

    #[test]
    fn ethernet_headers_toward_the_host() {
        let link = IpLink::new(CARD);
        let mut v4 = vec![0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&[10, 77, 0, 2]);
        // Broadcast until the host's MAC is known.
        assert_eq!(link.eth_header(&v4).unwrap()[..6], [0xff; 6]);
        classify(&link, &arp(1, [10, 77, 0, 2], [10, 77, 0, 1]));
        let h = link.eth_header(&v4).unwrap();
        assert_eq!(h[..6], HOST);
        assert_eq!(h[6..12], CARD);
        assert_eq!(h[12..14], [8, 0]);
        v4[16..20].copy_from_slice(&[239, 129, 2, 3]);
        assert_eq!(link.eth_header(&v4).unwrap()[..6], [1, 0, 0x5e, 1, 2, 3]);
        v4[16..20].copy_from_slice(&[255; 4]);
        assert_eq!(link.eth_header(&v4).unwrap()[..6], [0xff; 6]);
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[24..40].copy_from_slice(&"ff02::1:ff00:2".parse::<Ipv6Addr>().unwrap().octets());
        let h = link.eth_header(&v6).unwrap();
        assert_eq!(h[..6], [0x33, 0x33, 0xff, 0, 0, 2]);
        assert_eq!(h[12..14], [0x86, 0xdd]);
        assert!(link.eth_header(&[0x50; 40]).is_none());
        assert!(link.eth_header(&[0x45; 10]).is_none());
        assert!(link.eth_header(&[]).is_none());
    }

    #[test]
    fn default_macs_are_local_unicast_and_stable() {
        let m = default_mac("card0");
        assert_eq!(m[0] & 3, 2);
        assert_eq!(m, default_mac("card0"));
        assert_ne!(m, default_mac("card1"));
    }
}
