//! `--link ip`: the card's end is a TUN device (bare IP packets), and the daemon turns it into an
//! Ethernet link for the host: Ethernet headers added and stripped, ARP requests and neighbour
//! solicitations answered by the card for any address behind the link, partial checksums and
//! multicast and broadcast carried; bad input from either side counted and never answered wrongly.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use card_tests::card::{CARD_IP, HOST_IP, HOST_MAC, PEER_IP, TAP};
use card_tests::daemon::{Counters, Daemon};
use card_tests::netdev::{TxLayout, VirtioNet};
use card_tests::netns::{veth_pair, Netns};
use card_tests::packet::*;
use etherparse::PacketBuilder;

const CARD_MAC: [u8; 6] = [0x02, 0xca, 0x4d, 0, 0, 1];
const CARD6: &str = "fd99::1";
const HOST6: &str = "fd99::2";

struct IpCard {
    daemon: Daemon,
    _peer: Option<Netns>,
    ns: Netns,
}

impl IpCard {
    /// The daemon with `--link ip` on a tun in a fresh namespace (IPv6 on when `v6`), with the
    /// card's addresses; with `peer`, a namespace behind a veth whose card end computes no
    /// checksum in hardware (so forwarded partial checksums must be completed in software).
    fn start(extra: &[&str], v6: bool, peer: bool) -> Result<IpCard> {
        card_tests::require_root()?;
        let ns = Netns::new("c")?;
        if !v6 {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6=1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6=1")?;
        }
        let mac = card_tests::card::mac_str(&CARD_MAC);
        let args: Vec<&str> = ["--link", "ip", "--mac", &mac]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        let daemon = Daemon::start(ns.name(), &args)?;
        ns.ip(&["addr", "add", &format!("{CARD_IP}/24"), "dev", TAP])?;
        if v6 {
            ns.ip(&["addr", "add", &format!("{CARD6}/64"), "dev", TAP, "nodad"])?;
        }
        let peer = if peer {
            let p = Netns::new("p")?;
            veth_pair(&ns, "vc0", &p, "vp0")?;
            ns.ip(&["addr", "add", "10.99.1.1/24", "dev", "vc0"])?;
            ns.ip(&["link", "set", "vc0", "up"])?;
            ns.sysctl("net.ipv4.ip_forward=1")?;
            ns.exec("ethtool", &["-K", "vc0", "tx", "off"])?;
            p.ip(&["addr", "add", &format!("{PEER_IP}/24"), "dev", "vp0"])?;
            p.ip(&["link", "set", "vp0", "up"])?;
            p.ip(&["route", "add", "10.99.0.0/24", "via", "10.99.1.1"])?;
            Some(p)
        } else {
            None
        };
        Ok(IpCard {
            daemon,
            _peer: peer,
            ns,
        })
    }

    fn udp6(&self, port: u16) -> Result<UdpSocket> {
        let addr = SocketAddrV6::new(CARD6.parse()?, port, 0, 0);
        let s = self.ns.enter(move || Ok(UdpSocket::bind(addr)?))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(s)
    }

    fn counters(&mut self, what: &str, pred: impl Fn(&Counters) -> bool) -> Result<Counters> {
        self.daemon
            .wait_counters(Duration::from_secs(5), what, pred)
    }
}

fn arp_request(spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(HOST_MAC);
    f.extend([0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend(HOST_MAC);
    f.extend(spa);
    f.extend([0; 6]);
    f.extend(tpa);
    f
}

fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, msg: &[u8]) -> u16 {
    let mut s = ones_sum(0, &src.octets());
    s = ones_sum(s, &dst.octets());
    s = ones_sum(s, &(msg.len() as u32).to_be_bytes());
    s = ones_sum(s, &[0, 0, 0, 58]);
    !fold(ones_sum(s, msg))
}

fn ns_frame(src: Ipv6Addr, target: Ipv6Addr, hop: u8) -> Vec<u8> {
    let t = target.octets();
    let dst: Ipv6Addr = format!("ff02::1:ff{:02x}:{:02x}{:02x}", t[13], t[14], t[15])
        .parse()
        .unwrap();
    let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
    m.extend(t);
    if !src.is_unspecified() {
        m.extend([1, 1]);
        m.extend(HOST_MAC);
    }
    let c = icmpv6_checksum(&src, &dst, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0x33, 0x33, 0xff, t[13], t[14], t[15]];
    f.extend(HOST_MAC);
    f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend((m.len() as u16).to_be_bytes());
    f.extend([58, hop]);
    f.extend(src.octets());
    f.extend(dst.octets());
    f.extend(m);
    f
}

fn udp6_frame(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Result<Vec<u8>> {
    let b = PacketBuilder::ethernet2(HOST_MAC, CARD_MAC)
        .ipv6(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port());
    let mut v = Vec::new();
    b.write(&mut v, payload)?;
    Ok(v)
}

fn is_arp_reply(f: &[u8]) -> bool {
    f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]
}

fn is_na(f: &[u8]) -> bool {
    f.len() >= 62 && f[12..14] == [0x86, 0xdd] && f[20] == 58 && f[54] == 136
}

fn send(dev: &mut VirtioNet, frame: &[u8]) -> Result<()> {
    dev.send_wait(&VnetHdr::default(), frame, &TxLayout::Split)
}

#[test]
fn ip_link_carries_ipv4_and_ipv6_both_ways() -> Result<()> {
    let mut card = IpCard::start(&["--rx-csum", "complete"], true, true)?;
    let mut dev = card.daemon_driver()?;

    // ARP: the card answers for its own address and for one beyond it.
    for target in [CARD_IP.octets(), [10, 99, 1, 2]] {
        send(&mut dev, &arp_request(HOST_IP.octets(), target))?;
        let r = dev
            .recv_matching(Duration::from_secs(5), |f| is_arp_reply(&f.frame))
            .context("ARP reply")?;
        let f = &r.frame;
        ensure!(f[..6] == HOST_MAC && f[6..12] == CARD_MAC, "{f:02x?}");
        ensure!(f[22..28] == CARD_MAC && f[28..32] == target, "{f:02x?}");
        ensure!(f[32..38] == HOST_MAC && f[38..42] == HOST_IP.octets());
    }

    // IPv4 UDP host -> card, card -> host.
    let sock = card.ns.udp_socket(SocketAddrV4::new(CARD_IP, 7000))?;
    let payload = pattern(1000, 1);
    let frame = udp_frame(
        HOST_MAC,
        CARD_MAC,
        SocketAddrV4::new(HOST_IP, 7001),
        SocketAddrV4::new(CARD_IP, 7000),
        &payload,
    )?;
    send(&mut dev, &frame)?;
    let mut buf = vec![0u8; 70000];
    let (n, from) = sock.recv_from(&mut buf).context("IPv4 to the card")?;
    ensure!(buf[..n] == payload[..] && from.port() == 7001);
    for len in [1usize, 1472, 60000] {
        let p = pattern(len, len as u8);
        sock.send_to(&p, SocketAddrV4::new(HOST_IP, 7001))?;
        let r = dev
            .recv_matching(Duration::from_secs(5), |f| f.frame.ends_with(&p))
            .with_context(|| format!("{len}-byte datagram from the card"))?;
        let f = &r.frame;
        ensure!(f[..6] == HOST_MAC && f[6..12] == CARD_MAC && f[12..14] == [8, 0]);
        ensure!(f.len() == UDP_OVERHEAD + len, "{} bytes", f.len());
        ensure!(r.hdr.flags == F_DATA_VALID, "flags {:#x}", r.hdr.flags);
        ensure!(checksums_valid(f)?, "{len}: checksum");
    }

    // A partial checksum from the host, forwarded by the card to a peer whose veth computes
    // none: it arrives only if csum_start was moved to count from the IP header.
    let psock = card
        ._peer
        .as_ref()
        .context("peer")?
        .udp_socket(SocketAddrV4::new(PEER_IP, 7100))?;
    let p = pattern(777, 7);
    let mut fwd = udp_frame(
        HOST_MAC,
        CARD_MAC,
        SocketAddrV4::new(HOST_IP, 7101),
        SocketAddrV4::new(PEER_IP, 7100),
        &p,
    )?;
    let hdr = make_partial(&mut fwd)?;
    dev.send_wait(&hdr, &fwd, &TxLayout::Pieces(vec![5, 20, 40]))?;
    let n = psock
        .recv(&mut buf)
        .context("partial checksum forwarded to the peer")?;
    ensure!(buf[..n] == p[..]);

    // IPv6: neighbour solicitation for the card's address, UDP both ways.
    let host6: Ipv6Addr = HOST6.parse()?;
    let card6: Ipv6Addr = CARD6.parse()?;
    send(&mut dev, &ns_frame(host6, card6, 255))?;
    let r = dev
        .recv_matching(Duration::from_secs(5), |f| is_na(&f.frame))
        .context("neighbour advertisement")?;
    let f = &r.frame;
    ensure!(f[..6] == HOST_MAC && f[6..12] == CARD_MAC);
    ensure!(
        f[62..78] == card6.octets() && f[80..86] == CARD_MAC,
        "{f:02x?}"
    );
    let sock6 = card.udp6(7200)?;
    let p = pattern(3000, 3);
    send(
        &mut dev,
        &udp6_frame(
            SocketAddrV6::new(host6, 7201, 0, 0),
            SocketAddrV6::new(card6, 7200, 0, 0),
            &p,
        )?,
    )?;
    let (n, from) = sock6.recv_from(&mut buf).context("IPv6 to the card")?;
    ensure!(buf[..n] == p[..]);
    ensure!(matches!(from, SocketAddr::V6(a) if *a.ip() == host6));
    let p = pattern(5000, 5);
    sock6.send_to(&p, SocketAddrV6::new(host6, 7201, 0, 0))?;
    let r = dev
        .recv_matching(Duration::from_secs(5), |f| f.frame.ends_with(&p))
        .context("IPv6 from the card")?;
    ensure!(r.frame[..6] == HOST_MAC && r.frame[12..14] == [0x86, 0xdd]);
    ensure!(r.hdr.flags == F_DATA_VALID);

    // Multicast and broadcast from the card: the group's MAC, and ff:ff:ff:ff:ff:ff.
    let b = card.ns.udp_socket(SocketAddrV4::new(CARD_IP, 7300))?;
    b.set_broadcast(true)?;
    b.send_to(b"to everyone", "255.255.255.255:7301")?;
    let r = dev.recv_matching(Duration::from_secs(5), |f| {
        f.frame.ends_with(b"to everyone")
    })?;
    ensure!(r.frame[..6] == [0xff; 6], "{:02x?}", &r.frame[..6]);
    card.ns.ip(&["route", "add", "239.0.0.0/8", "dev", TAP])?;
    b.send_to(b"to a group", "239.1.2.3:7301")?;
    let r = dev.recv_matching(Duration::from_secs(5), |f| f.frame.ends_with(b"to a group"))?;
    ensure!(
        r.frame[..6] == [1, 0, 0x5e, 1, 2, 3],
        "{:02x?}",
        &r.frame[..6]
    );
    // IPv6 multicast from the card: 33:33 and the group's last 32 bits (RFC 2464).
    sock6.send_to(b"v6 group", "[ff0e::1:123]:7301")?;
    let r = dev.recv_matching(Duration::from_secs(5), |f| f.frame.ends_with(b"v6 group"))?;
    ensure!(
        r.frame[..6] == [0x33, 0x33, 0, 1, 1, 0x23],
        "{:02x?}",
        &r.frame[..6]
    );
    // Broadcast from the host (DHCP's way) reaches a socket of the card.
    let any = card
        .ns
        .udp_socket(SocketAddrV4::new("0.0.0.0".parse()?, 7400))?;
    let bc = udp_frame(
        HOST_MAC,
        [0xff; 6],
        SocketAddrV4::new("0.0.0.0".parse()?, 7401),
        SocketAddrV4::new("255.255.255.255".parse()?, 7400),
        b"discover",
    )?;
    send(&mut dev, &bc)?;
    let n = any.recv(&mut buf).context("broadcast from the host")?;
    ensure!(&buf[..n] == b"discover");

    let c = card.counters("replies counted", |c| {
        c.get("arp_replies") == 2 && c.get("nd_replies") == 1
    })?;
    ensure!(c.get("rx_needs_csum") == 0, "{c:?}");
    ensure!(c.get("tx_drop_not_ip") == 0 && c.get("tx_drop_malformed") == 0);
    Ok(())
}

#[test]
fn ip_link_bad_input_is_counted_and_never_answered() -> Result<()> {
    let mut card = IpCard::start(&[], false, false)?;
    let mut dev = card.daemon_driver()?;
    let host = HOST_IP.octets();
    // Learn the host's address first (a normal request), then the bad ones.
    send(&mut dev, &arp_request(host, CARD_IP.octets()))?;
    dev.recv_matching(Duration::from_secs(5), |f| is_arp_reply(&f.frame))?;

    let mut bad_hw = arp_request(host, CARD_IP.octets());
    bad_hw[18] = 8; // hardware address length 8
    let short_arp = arp_request(host, CARD_IP.octets())[..30].to_vec();
    let arps = [
        bad_hw,
        short_arp,
        arp_request([0; 4], host),          // probe
        arp_request(host, host),            // gratuitous
        arp_request(host, [10, 99, 0, 77]), // fine, answered (control)
        arp_request([10, 99, 0, 77], host), // for the host's own address
        arp_request(host, [224, 0, 0, 5]),  // multicast target
    ];
    for f in &arps {
        send(&mut dev, f)?;
    }
    let host6: Ipv6Addr = HOST6.parse()?;
    let card6: Ipv6Addr = CARD6.parse()?;
    let mut bad_sum = ns_frame(host6, card6, 255);
    let last = bad_sum.len() - 1;
    bad_sum[last] ^= 0xff;
    let nds = [
        ns_frame(host6, card6, 64),                  // hop limit not 255
        bad_sum,                                     // checksum
        ns_frame(Ipv6Addr::UNSPECIFIED, host6, 255), // DAD
        ns_frame(host6, host6, 255),                 // the host's own
    ];
    for f in &nds {
        send(&mut dev, f)?;
    }
    // Not IP, too short, IP version against the EtherType.
    let mut lldp = vec![0u8; 60];
    lldp[12..14].copy_from_slice(&[0x88, 0xcc]);
    let mut v4 = udp_frame(
        HOST_MAC,
        CARD_MAC,
        SocketAddrV4::new(HOST_IP, 1),
        SocketAddrV4::new(CARD_IP, 2),
        b"x",
    )?;
    let mut vlan = v4.clone();
    vlan[12..14].copy_from_slice(&[0x81, 0x00]);
    let short = v4[..30].to_vec();
    v4[14] = 0x65;
    for f in [&lldp, &vlan, &short, &v4] {
        send(&mut dev, f)?;
    }
    // A router solicitation (router discovery) is no neighbour solicitation: it goes to the
    // card's kernel (the one frame written to the tun here).
    let mut rs = ns_frame(host6, card6, 255);
    rs[54] = 133;
    send(&mut dev, &rs)?;
    // From the card's kernel: a packet that is neither IPv4 nor IPv6.
    let pkt = card.ns.packet_socket(TAP)?;
    let mut junk = vec![0u8; 64];
    junk[0] = 0x50;
    junk[..6].copy_from_slice(&[0x50, 0, 0, 0, 0, 0]);
    pkt.send(&junk)?;

    let c = card.counters("every bad input counted", |c| {
        c.get("rx_drop_not_ip") == 1 && c.get("nd_ignored_not_behind") == 1
    })?;
    let want = [
        ("arp_replies", 2),
        ("arp_ignored_malformed", 2),
        ("arp_ignored_gratuitous", 2),
        ("arp_ignored_not_behind", 2),
        ("nd_replies", 0),
        ("nd_ignored_malformed", 2),
        ("nd_ignored_dad", 1),
        ("nd_ignored_not_behind", 1),
        ("tx_drop_not_ip", 2),
        ("tx_drop_malformed", 2),
        ("rx_drop_not_ip", 1),
        ("tx_frames", 1),
    ];
    for (name, v) in want {
        ensure!(
            c.get(name) == v,
            "{name} is {}, expected {v}: {c:?}",
            c.get(name)
        );
    }
    // Exactly the two good requests were answered, with the right addresses.
    let mut replies = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(800) {
        if let Ok(f) = dev.recv(Duration::from_millis(200)) {
            replies.push(f.frame);
        }
    }
    ensure!(
        replies.iter().all(|f| !is_na(f)),
        "a neighbour advertisement was sent"
    );
    let arp: Vec<&Vec<u8>> = replies.iter().filter(|f| is_arp_reply(f)).collect();
    ensure!(arp.len() == 1, "{} further ARP replies", arp.len());
    ensure!(arp[0][28..32] == [10, 99, 0, 77] && arp[0][38..42] == host);
    Ok(())
}

/// Without MRG_RXBUF (one big buffer per frame) the card's answers go up too, also when they
/// were made while the host had no buffer posted.
#[test]
fn answers_go_up_without_mergeable_buffers() -> Result<()> {
    let card = IpCard::start(&["--disable", "mrg-rxbuf"], false, false)?;
    let mut dev = card.driver_with(|f| f)?;
    for i in 0..3u8 {
        send(
            &mut dev,
            &arp_request(HOST_IP.octets(), [10, 99, 0, 10 + i]),
        )?;
        let r = dev
            .recv_matching(Duration::from_secs(5), |f| is_arp_reply(&f.frame))
            .with_context(|| format!("ARP reply {i}"))?;
        ensure!(r.frame[28..32] == [10, 99, 0, 10 + i]);
    }
    Ok(())
}

/// A multi-queue tun (`--queues 2`): the daemon opens it and pair 0 carries the link.
#[test]
fn multi_queue_tun() -> Result<()> {
    let card = IpCard::start(&["--queues", "2"], false, false)?;
    let mut dev = card.daemon_driver()?;
    send(&mut dev, &arp_request(HOST_IP.octets(), CARD_IP.octets()))?;
    dev.recv_matching(Duration::from_secs(5), |f| is_arp_reply(&f.frame))?;
    let sock = card.ns.udp_socket(SocketAddrV4::new(CARD_IP, 7500))?;
    sock.send_to(b"over pair 0", SocketAddrV4::new(HOST_IP, 7501))?;
    let r = dev.recv_matching(Duration::from_secs(5), |f| {
        f.frame.ends_with(b"over pair 0")
    })?;
    ensure!(r.frame[..6] == HOST_MAC);
    ensure!(
        card.daemon.log().contains("tun card0 created"),
        "{}",
        card.daemon.log()
    );
    Ok(())
}

impl IpCard {
    fn daemon_driver(&self) -> Result<VirtioNet> {
        self.driver_with(|f| f)
    }

    fn driver_with(&self, keep: impl Fn(u64) -> u64) -> Result<VirtioNet> {
        let mut ctl = card_tests::frontend::Control::connect(self.daemon.socket())?;
        let offer = ctl.handshake()?;
        let features = keep(offer.features);
        let opts = card_tests::netdev::Options::for_features(features);
        VirtioNet::start(ctl, features, &opts)
    }
}
