//! Every frame handed to the host is counted once by how it went up: `rx_data_valid`,
//! `rx_needs_csum` or `rx_unmarked_<reason>`, and these add up to `rx_frames`, in each
//! `--rx-csum` mode and without GUEST_CSUM. With `--rx-csum complete` the card's kernel's partial
//! checksums arrive computed and marked DATA_VALID.

use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use card_tests::card::*;
use card_tests::daemon::Counters;
use card_tests::netdev::{VirtioNet, F_GUEST_CSUM};
use card_tests::packet::*;

/// The counters that must add up to `rx_frames`.
fn accounted(c: &Counters) -> u64 {
    vhost_card::rxmark::accounting_counters()
        .map(|n| c.get(n))
        .sum()
}

/// Fixes the IPv4 header checksum of an untagged frame.
fn fix_ip_header(frame: &mut [u8]) {
    let ihl = usize::from(frame[ETH_HLEN] & 0xf) * 4;
    frame[ETH_HLEN + 10] = 0;
    frame[ETH_HLEN + 11] = 0;
    let c = !fold(ones_sum(0, &frame[ETH_HLEN..ETH_HLEN + ihl]));
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
}

/// Injects frames of every kind on card0 and sends datagrams from a socket of the card's
/// kernel (a partial checksum). Returns how many frames should reach the host.
fn varied_traffic(card: &Card, dev: &mut VirtioNet) -> Result<u64> {
    let pkt = card.ns.packet_socket(TAP)?;
    let src = SocketAddrV4::new(CARD_IP, 5353);
    let dst = SocketAddrV4::new(HOST_IP, 6363);
    let mut frames: Vec<Vec<u8>> = Vec::new();
    // Good UDP, bad UDP.
    frames.push(udp_frame_of_len(card.mac, HOST_MAC, src, dst, 300, 1)?);
    let mut bad = udp_frame_of_len(card.mac, HOST_MAC, src, dst, 300, 2)?;
    break_checksum(&mut bad)?;
    frames.push(bad);
    // ARP (not IP).
    let mut arp = vec![0u8; 60];
    arp[..6].copy_from_slice(&HOST_MAC);
    arp[6..12].copy_from_slice(&card.mac);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    frames.push(arp);
    // ESP (an L4 protocol without a checksum the card knows).
    let mut esp = udp_frame_of_len(card.mac, HOST_MAC, src, dst, 200, 3)?;
    esp[ETH_HLEN + 9] = 50;
    fix_ip_header(&mut esp);
    frames.push(esp);
    // IPv4 whose header claims more than the frame holds.
    let mut malformed = udp_frame_of_len(card.mac, HOST_MAC, src, dst, 100, 4)?;
    malformed[ETH_HLEN] = 0x4f;
    frames.push(malformed);
    for f in &frames {
        pkt.send(f)?;
        dev.recv_matching(Duration::from_secs(5), |r| r.frame == *f)
            .with_context(|| format!("{}-byte injected frame", f.len()))?;
    }
    // The card's kernel's own datagrams: partial checksums with GUEST_CSUM.
    let sock = card.ns.udp_socket(SocketAddrV4::new(CARD_IP, 7000))?;
    for i in 0..3u8 {
        let payload = pattern(1000 + usize::from(i) * 500, i);
        sock.send_to(&payload, SocketAddrV4::new(HOST_IP, 7001))?;
        dev.recv_matching(Duration::from_secs(5), |r| {
            r.frame.len() == UDP_OVERHEAD + payload.len() && r.frame.ends_with(&payload)
        })
        .context("a datagram from the card's socket")?;
    }
    Ok(frames.len() as u64 + 3)
}

fn settle(card: &mut Card, frames: u64) -> Result<Counters> {
    card.daemon
        .wait_counters(Duration::from_secs(5), "every frame counted", |c| {
            c.get("rx_frames") >= frames && accounted(c) == c.get("rx_frames")
        })
}

#[test]
fn verify_mode_accounts_for_every_frame() -> Result<()> {
    let mut card = Card::start(&[])?;
    let mut dev = card.driver()?;
    let n = varied_traffic(&card, &mut dev)?;
    let c = settle(&mut card, n)?;
    ensure!(accounted(&c) == c.get("rx_frames"), "{c:?}");
    ensure!(c.get("rx_data_valid") >= 1, "{c:?}");
    ensure!(c.get("rx_unmarked_bad_csum") == 1, "{c:?}");
    ensure!(
        c.get("rx_unmarked_bad_csum") == c.get("rx_csum_bad"),
        "{c:?}"
    );
    ensure!(c.get("rx_unmarked_not_ip") == 1, "{c:?}");
    ensure!(c.get("rx_unmarked_no_l4_csum") == 1, "{c:?}");
    ensure!(c.get("rx_unmarked_malformed") == 1, "{c:?}");
    ensure!(
        c.get("rx_needs_csum") == 3,
        "the card's kernel's partial checksums: {c:?}"
    );
    Ok(())
}

#[test]
fn complete_mode_leaves_no_partial_checksum_to_the_host() -> Result<()> {
    let mut card = Card::start(&["--rx-csum", "complete"])?;
    let mut dev = card.driver()?;
    let n = varied_traffic(&card, &mut dev)?;
    // A large datagram too, one frame at MTU 65520.
    let sock = card.ns.udp_socket(SocketAddrV4::new(CARD_IP, 7100))?;
    let payload = pattern(60000, 9);
    sock.send_to(&payload, SocketAddrV4::new(HOST_IP, 7101))?;
    let got = dev
        .recv_matching(Duration::from_secs(5), |r| r.frame.ends_with(&payload))
        .context("60000-byte datagram")?;
    ensure!(got.hdr.flags == F_DATA_VALID, "flags {:#x}", got.hdr.flags);
    ensure!(
        checksums_valid(&got.frame)?,
        "the card marked a frame whose checksum it did not complete"
    );
    let c = settle(&mut card, n + 1)?;
    ensure!(c.get("rx_needs_csum") == 0, "{c:?}");
    ensure!(c.get("rx_csum_completed") == 4, "{c:?}");
    ensure!(c.get("rx_unmarked_bad_csum") == 1, "{c:?}");
    Ok(())
}

#[test]
fn complete_mode_checksums_are_right_for_every_length() -> Result<()> {
    let card = Card::start(&["--rx-csum", "complete"])?;
    let mut dev = card.driver()?;
    let sock = card.ns.udp_socket(SocketAddrV4::new(CARD_IP, 7200))?;
    // Odd and even lengths, across the driver's 1536-byte buffers.
    for len in [1usize, 2, 3, 1471, 1472, 1473, 1518, 3001, 9000, 20001] {
        let payload = pattern(len, len as u8);
        sock.send_to(&payload, SocketAddrV4::new(HOST_IP, 7201))?;
        let got = dev
            .recv_matching(Duration::from_secs(5), |r| {
                r.frame.len() == UDP_OVERHEAD + len && r.frame.ends_with(&payload)
            })
            .with_context(|| format!("{len}-byte datagram"))?;
        ensure!(got.hdr.flags == F_DATA_VALID, "{len}: {:#x}", got.hdr.flags);
        ensure!(checksums_valid(&got.frame)?, "{len}: bad checksum");
    }
    Ok(())
}

#[test]
fn passthrough_and_no_guest_csum_are_counted_as_such() -> Result<()> {
    let src = SocketAddrV4::new(CARD_IP, 5353);
    let dst = SocketAddrV4::new(HOST_IP, 6363);
    let mut card = Card::start(&["--rx-csum", "passthrough"])?;
    let mut dev = card.driver()?;
    let f = udp_frame_of_len(card.mac, HOST_MAC, src, dst, 400, 5)?;
    card.ns.packet_socket(TAP)?.send(&f)?;
    let got = dev.recv_matching(Duration::from_secs(5), |r| r.frame == f)?;
    ensure!(got.hdr.flags == 0);
    let c = settle(&mut card, 1)?;
    ensure!(c.get("rx_unmarked_passthrough") == 1, "{c:?}");

    let mut card = Card::start(&[])?;
    let (mut dev, _) = card.driver_with(|f| f & !F_GUEST_CSUM & !(3 << 7))?;
    let f = udp_frame_of_len(card.mac, HOST_MAC, src, dst, 400, 6)?;
    card.ns.packet_socket(TAP)?.send(&f)?;
    dev.recv_matching(Duration::from_secs(5), |r| r.frame == f)?;
    let sock = card.ns.udp_socket(SocketAddrV4::new(CARD_IP, 7300))?;
    sock.send_to(b"completed by the card", SocketAddrV4::new(HOST_IP, 7301))?;
    let got = dev.recv_matching(Duration::from_secs(5), |r| {
        r.frame.ends_with(b"completed by the card")
    })?;
    ensure!(got.hdr.flags == 0 && checksums_valid(&got.frame)?);
    let c = settle(&mut card, 2)?;
    ensure!(c.get("rx_unmarked_no_guest_csum") == 2, "{c:?}");
    Ok(())
}
