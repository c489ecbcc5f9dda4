//! IP fragments going up are reassembled by the card: datagrams forwarded from a 1500-byte link
//! reach the host whole (one frame, DATA_VALID when their checksum is right), on the Ethernet
//! and the IP-only link, IPv4 and IPv6; overlapping fragments discard the datagram; a datagram
//! above the host's MTU is cut to it; every event is counted.

use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use card_tests::card::*;
use card_tests::netdev::VirtioNet;
use card_tests::packet::*;
use etherparse::PacketBuilder;

/// A UDP datagram as one Ethernet frame, from the peer to the host, checksums right.
fn udp4(len: usize, id: u16, src_mac: [u8; 6]) -> Result<Vec<u8>> {
    let mut f = udp_frame(
        src_mac,
        HOST_MAC,
        SocketAddrV4::new(PEER_IP, 5006),
        SocketAddrV4::new(HOST_IP, 5006),
        &pattern(len, id as u8),
    )?;
    f[18..20].copy_from_slice(&id.to_be_bytes());
    f[20] = 0;
    ip4_checksum(&mut f);
    Ok(f)
}

fn ip4_checksum(f: &mut [u8]) {
    f[24] = 0;
    f[25] = 0;
    let c = !fold(ones_sum(0, &f[14..34]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Cuts an IPv4 frame (no options) into fragments of `size` payload bytes.
fn frag4(whole: &[u8], size: usize) -> Vec<Vec<u8>> {
    let payload = &whole[34..];
    let mut out = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let n = size.min(payload.len() - at);
        let more = at + n < payload.len();
        let mut f = whole[..34].to_vec();
        f.extend(&payload[at..at + n]);
        f[16..18].copy_from_slice(&((20 + n) as u16).to_be_bytes());
        let v = (at / 8) as u16 | if more { 0x2000 } else { 0 };
        f[20..22].copy_from_slice(&v.to_be_bytes());
        ip4_checksum(&mut f);
        out.push(f);
        at += n;
    }
    out
}

fn udp6(len: usize, src_mac: [u8; 6]) -> Result<Vec<u8>> {
    let b = PacketBuilder::ethernet2(src_mac, HOST_MAC)
        .ipv6(
            [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            64,
        )
        .udp(5006, 5006);
    let mut v = Vec::new();
    b.write(&mut v, &pattern(len, 6))?;
    Ok(v)
}

fn frag6(whole: &[u8], size: usize, id: u32) -> Vec<Vec<u8>> {
    let payload = &whole[54..];
    let mut out = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let n = size.min(payload.len() - at);
        let more = at + n < payload.len();
        let mut f = whole[..54].to_vec();
        f[18..20].copy_from_slice(&((8 + n) as u16).to_be_bytes());
        f[20] = 44;
        f.extend([17, 0]);
        f.extend(((at as u16) | u16::from(more)).to_be_bytes());
        f.extend(id.to_be_bytes());
        f.extend(&payload[at..at + n]);
        out.push(f);
        at += n;
    }
    out
}

fn expect_whole(dev: &mut VirtioNet, whole: &[u8]) -> Result<()> {
    let got = dev
        .recv_matching(Duration::from_secs(5), |f| f.frame.len() > 1600)
        .context("the reassembled datagram")?;
    ensure!(
        got.frame.len() == whole.len(),
        "{} bytes, expected {}",
        got.frame.len(),
        whole.len()
    );
    ensure!(got.frame[12..] == whole[12..], "datagram differs");
    ensure!(got.hdr.flags == F_DATA_VALID, "flags {:#x}", got.hdr.flags);
    Ok(())
}

#[test]
fn injected_fragments_go_up_whole() -> Result<()> {
    let mut card = Card::start(&[])?;
    let mut dev = card.driver()?;
    let pkt = card.ns.packet_socket(TAP)?;
    // IPv4, in order and out of order.
    let whole = udp4(60000, 11, card.mac)?;
    let mut frags = frag4(&whole, 1480);
    ensure!(frags.len() == 41);
    for f in &frags {
        pkt.send(f)?;
    }
    expect_whole(&mut dev, &whole)?;
    frags.reverse();
    for f in &frags {
        pkt.send(f)?;
    }
    expect_whole(&mut dev, &whole)?;
    // IPv6.
    let w6 = udp6(30000, card.mac)?;
    for f in frag6(&w6, 1448, 99) {
        pkt.send(&f)?;
    }
    expect_whole(&mut dev, &w6)?;
    // Overlap: nothing goes up.
    let w = udp4(3000, 12, card.mac)?;
    let a = frag4(&w, 1480);
    let b = frag4(&w, 800);
    for f in [&a[0], &b[1], &a[1], &a[2]] {
        pkt.send(f)?;
    }
    // Too big for the host's MTU (65535 > 65520): cut to it, two fragments go up.
    let big = udp4(65507, 13, card.mac)?;
    for f in frag4(&big, 1480) {
        pkt.send(&f)?;
    }
    let p1 = dev.recv_matching(Duration::from_secs(5), |f| f.frame.len() > 1600)?;
    let p2 = dev.recv_matching(Duration::from_secs(5), |f| f.frame.len() > 12)?;
    ensure!(p1.frame.len() - 14 <= 65520 && p2.frame.len() - 14 <= 65520);
    ensure!(
        p1.frame.len() + p2.frame.len() - 34 == big.len(),
        "pieces cover the datagram"
    );

    let c = card
        .daemon
        .wait_counters(Duration::from_secs(5), "reassembly", |c| {
            c.get("reasm_split") == 1
        })?;
    ensure!(c.get("reasm_datagrams") == 4, "{c:?}");
    ensure!(c.get("reasm_overlap") == 1, "{c:?}");
    ensure!(
        c.get("rx_unmarked_fragment") == 2,
        "the split pieces: {c:?}"
    );
    ensure!(c.get("rx_data_valid") >= 3, "{c:?}");
    Ok(())
}

#[test]
fn forwarded_datagrams_reach_the_host_whole() -> Result<()> {
    for link in [&[][..], &["--link", "ip"][..]] {
        let card = if link.is_empty() {
            Card::start_with_peer(&[])?
        } else {
            ip_card_with_peer()?
        };
        let mut dev = card.driver()?;
        // Let the card learn the host's MAC on the IP-only link.
        if !link.is_empty() {
            card.check_host_to_card(&mut dev, 7777, 1)?;
        }
        let peer = card.peer()?;
        let sock = peer.udp_socket(SocketAddrV4::new(PEER_IP, 5007))?;
        let payload = pattern(40000, 40);
        sock.send_to(&payload, SocketAddrV4::new(HOST_IP, 5008))?;
        let got = dev
            .recv_matching(Duration::from_secs(5), |f| f.frame.len() > 1600)
            .with_context(|| format!("{link:?}: the forwarded datagram, whole"))?;
        ensure!(got.frame.len() == 14 + 20 + 8 + payload.len(), "{link:?}");
        ensure!(got.frame.ends_with(&payload), "{link:?}");
        ensure!(
            got.hdr.flags == F_DATA_VALID,
            "{link:?}: {:#x}",
            got.hdr.flags
        );
        let mut d = card.daemon;
        let c = d.wait_counters(Duration::from_secs(5), "reassembled", |c| {
            c.get("reasm_datagrams") == 1
        })?;
        ensure!(c.get("reasm_fragments") == 28, "{link:?}: {c:?}");
        ensure!(c.get("rx_unmarked_fragment") == 0, "{link:?}: {c:?}");
    }
    Ok(())
}

/// A card on the IP-only link with a peer, as `Card::start_with_peer` for a tap.
fn ip_card_with_peer() -> Result<Card> {
    let ns = Card::namespace()?;
    let mac = [0x02, 0xca, 0x4d, 0, 0, 9];
    let daemon =
        card_tests::daemon::Daemon::start(ns.name(), &["--link", "ip", "--mac", &mac_str(&mac)])?;
    ns.ip(&["addr", "add", &format!("{CARD_IP}/24"), "dev", TAP])?;
    let mut card = Card {
        daemon,
        peer: None,
        ns,
        mac,
    };
    card.add_peer()?;
    Ok(card)
}
