//! Card to host (RX queue): frames injected on card0 in the card's namespace arrive in the
//! driver's buffers intact, with DATA_VALID when their checksums are good and the right
//! num_buffers, with and without MRG_RXBUF.

use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use card_tests::card::*;
use card_tests::netdev::{RxFrame, RxLayout, VirtioNet, F_MRG_RXBUF};
use card_tests::packet::*;

const MRG_BUF: usize = 1536;

fn inject_and_receive(card: &Card, dev: &mut VirtioNet, frame: &[u8]) -> Result<RxFrame> {
    let pkt = card.ns.packet_socket(TAP)?;
    pkt.send(frame)?;
    dev.recv_matching(Duration::from_secs(5), |f| {
        f.frame.len() == frame.len() && f.frame == frame
    })
    .with_context(|| format!("{}-byte frame", frame.len()))
}

fn check_rx(mrg: bool, layout: RxLayout) -> Result<()> {
    let extra: &[&str] = if mrg {
        &[]
    } else {
        &["--disable", "mrg-rxbuf"]
    };
    let card = Card::start(extra)?;
    let (mut dev, offer) = card.driver_custom(|f| f, |o| o.rx = layout)?;
    ensure!(
        (offer.features & F_MRG_RXBUF != 0) == mrg,
        "MRG_RXBUF offered: {:#x}",
        offer.features
    );
    ensure!(dev.mrg_rxbuf() == mrg);
    let src = SocketAddrV4::new(CARD_IP, 5353);
    let dst = SocketAddrV4::new(HOST_IP, 6363);

    let sizes = [64usize, 1500, 65520];
    for (i, &len) in sizes.iter().enumerate() {
        let frame = udp_frame_of_len(card.mac, HOST_MAC, src, dst, len, i as u8)?;
        ensure!(checksums_valid(&frame)?);
        let got = inject_and_receive(&card, &mut dev, &frame)?;
        ensure!(
            got.hdr.flags == F_DATA_VALID,
            "{len}-byte frame: flags {:#x}, expected DATA_VALID only",
            got.hdr.flags
        );
        ensure!(
            got.hdr.gso_type == GSO_NONE,
            "{len}: gso_type {}",
            got.hdr.gso_type
        );
        let total: u32 = got.used_lens.iter().sum();
        ensure!(
            total as usize == len + VnetHdr::LEN,
            "{len}: buffers hold {total} bytes ({:?})",
            got.used_lens
        );
        let expected_buffers = if mrg {
            (len + VnetHdr::LEN).div_ceil(MRG_BUF)
        } else {
            1
        };
        ensure!(
            usize::from(got.hdr.num_buffers) == expected_buffers
                && got.used_lens.len() == expected_buffers,
            "{len}: num_buffers {} with {} buffers used, expected {expected_buffers}",
            got.hdr.num_buffers,
            got.used_lens.len()
        );
    }

    // A bad UDP checksum: delivered, but not marked DATA_VALID, and counted.
    let mut frame = udp_frame_of_len(card.mac, HOST_MAC, src, dst, 1000, 77)?;
    break_checksum(&mut frame)?;
    let got = inject_and_receive(&card, &mut dev, &frame)?;
    ensure!(
        got.hdr.flags & F_DATA_VALID == 0,
        "a frame with a bad checksum was marked DATA_VALID (flags {:#x})",
        got.hdr.flags
    );

    let mut d = card.daemon;
    let c = d.wait_counters(Duration::from_secs(4), "rx_csum_bad=1, 4 RX frames", |c| {
        c.get("rx_csum_bad") == 1 && c.get("rx_frames") >= 4
    })?;
    ensure!(c.get("rx_frames") == 4, "{c:?}");
    ensure!(c.get("rx_csum_verified") == 3, "{c:?}");
    ensure!(c.get("rx_data_valid") == 3, "{c:?}");
    ensure!(c.get("rx_drop_truncated") == 0, "{c:?}");
    Ok(())
}

/// MRG_RXBUF: 1536-byte buffers; a 65520-byte frame spreads over 43 of them.
#[test]
fn rx_frames_with_mergeable_buffers() -> Result<()> {
    check_rx(true, RxLayout::mergeable(MRG_BUF as u32, 128))
}

/// No MRG_RXBUF (not offered, not acked): one big buffer per frame, of the size the virtio
/// spec requires with GUEST_TSO4/6 (65562 bytes).
#[test]
fn rx_frames_without_mergeable_buffers() -> Result<()> {
    check_rx(false, RxLayout::single(65562, 16))
}

/// No MRG_RXBUF, buffers laid out like Linux's "big packets" mode: a header descriptor and 17
/// pages per chain.
#[test]
fn rx_frames_without_mergeable_buffers_in_page_chains() -> Result<()> {
    check_rx(false, RxLayout::big(12))
}

/// A driver that keeps fewer buffers posted than one 64 KiB frame needs still receives every
/// frame: frames that fit go up through the bounce buffer at once, a larger one waits until the
/// driver posts more, and nothing is dropped.
#[test]
fn rx_with_few_buffers_posted() -> Result<()> {
    let card = Card::start(&[])?;
    let (mut dev, _) =
        card.driver_custom(|f| f, |o| o.rx = RxLayout::mergeable(MRG_BUF as u32, 8))?;
    ensure!(dev.mrg_rxbuf());
    let src = SocketAddrV4::new(CARD_IP, 5353);
    let dst = SocketAddrV4::new(HOST_IP, 6363);
    for (i, &len) in [64usize, 1500, 9000].iter().enumerate() {
        let frame = udp_frame_of_len(card.mac, HOST_MAC, src, dst, len, i as u8)?;
        let got = inject_and_receive(&card, &mut dev, &frame)?;
        ensure!(
            usize::from(got.hdr.num_buffers) == (len + VnetHdr::LEN).div_ceil(MRG_BUF),
            "{len}: num_buffers {}",
            got.hdr.num_buffers
        );
        ensure!(
            got.hdr.flags == F_DATA_VALID,
            "{len}: flags {:#x}",
            got.hdr.flags
        );
    }
    // 20000 bytes need 14 buffers and only 8 are posted: the frame must wait, not be dropped.
    let big = udp_frame_of_len(card.mac, HOST_MAC, src, dst, 20000, 9)?;
    card.ns.packet_socket(TAP)?.send(&big)?;
    ensure!(
        dev.recv(Duration::from_millis(700)).is_err(),
        "a 20000-byte frame was delivered into 8 buffers of {MRG_BUF} bytes"
    );
    dev.post_rx(&RxLayout::mergeable(MRG_BUF as u32, 16))?;
    let got = dev
        .recv_matching(Duration::from_secs(5), |f| f.frame == big)
        .context("the held frame after more buffers were posted")?;
    ensure!(
        usize::from(got.hdr.num_buffers) == (20000 + VnetHdr::LEN).div_ceil(MRG_BUF),
        "num_buffers {}",
        got.hdr.num_buffers
    );
    let mut d = card.daemon;
    let c = d.wait_counters(Duration::from_secs(4), "4 RX frames", |c| {
        c.get("rx_frames") >= 4
    })?;
    ensure!(c.get("rx_held") == 1, "{c:?}");
    ensure!(c.get("rx_bounced") == 4, "{c:?}");
    ensure!(c.get("rx_drop_truncated") == 0, "{c:?}");
    Ok(())
}

/// A frame waiting for buffers when the driver goes away is dropped and counted
/// (`rx_drop_disconnect`): it was read with that session's header and offloads.
#[test]
fn rx_frame_held_at_disconnect_is_counted() -> Result<()> {
    let mut card = Card::start(&[])?;
    let (dev, _) = card.driver_custom(|f| f, |o| o.rx = RxLayout::mergeable(MRG_BUF as u32, 8))?;
    ensure!(dev.mrg_rxbuf());
    let src = SocketAddrV4::new(CARD_IP, 5353);
    let dst = SocketAddrV4::new(HOST_IP, 6363);
    let big = udp_frame_of_len(card.mac, HOST_MAC, src, dst, 20000, 9)?;
    card.ns.packet_socket(TAP)?.send(&big)?;
    std::thread::sleep(Duration::from_millis(500));
    drop(dev);
    let c = card.daemon.wait_counters(
        Duration::from_secs(5),
        "the held frame counted at disconnect",
        |c| c.get("rx_drop_disconnect") == 1,
    )?;
    ensure!(c.get("rx_held") == 1, "{c:?}");
    Ok(())
}
