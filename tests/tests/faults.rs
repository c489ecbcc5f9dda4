//! Faults that must end with nothing lost: the frontend vanishing mid-transfer, a guest that
//! stops posting receive buffers, and the tap deleted under the daemon.

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use card_tests::card::*;
use card_tests::netdev::{RxLayout, TxLayout};
use card_tests::packet::*;

/// The frontend disconnects with TX frames queued and card-to-host frames in flight; the
/// daemon notices, listens again, and the next frontend gets a working link.
#[test]
fn frontend_disconnects_mid_transfer() -> Result<()> {
    let card = Card::start(&[])?;
    let mut dev = card.driver()?;
    let dst = SocketAddrV4::new(CARD_IP, 7700);
    let pkt = card.ns.packet_socket(TAP)?;
    let up = udp_frame(
        card.mac,
        HOST_MAC,
        SocketAddrV4::new(CARD_IP, 5555),
        SocketAddrV4::new(HOST_IP, 6000),
        &pattern(1200, 9),
    )?;
    for i in 0..100u8 {
        let frame = card.frame_to(dst, 40000, &pattern(1400, i))?;
        dev.send(&VnetHdr::default(), &frame, &TxLayout::Split)?;
        pkt.send(&up)?;
    }
    drop(dev);
    let mut d = card.daemon;
    d.wait_log("frontend disconnected", Duration::from_secs(5))?;
    let card = Card { daemon: d, ..card };
    let mut dev = card
        .driver()
        .context("a new frontend after the disconnect")?;
    card.check_host_to_card(&mut dev, 7701, 1)?;
    card.check_card_to_host(&mut dev, 2)?;
    ensure!(card.tap_has_address()?, "card0 lost its address");
    Ok(())
}

/// The guest posts 16 buffers and then stops for 10 s while the card keeps sending: the
/// daemon waits (no spinning, no growth) and traffic resumes once buffers come back.
#[test]
fn guest_stops_posting_rx_buffers_for_10s() -> Result<()> {
    let card = Card::start(&[])?;
    let (mut dev, _) = card.driver_custom(|f| f, |o| o.rx = RxLayout::mergeable(1536, 16))?;
    let rss0 = card.daemon.rss_kib()?;
    let cpu0 = card.daemon.cpu_seconds()?;
    let pkt = card.ns.packet_socket(TAP)?;
    let frame = udp_frame(
        card.mac,
        HOST_MAC,
        SocketAddrV4::new(CARD_IP, 5555),
        SocketAddrV4::new(HOST_IP, 6100),
        &pattern(1000, 5),
    )?;
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed() < Duration::from_secs(10) {
        for _ in 0..200 {
            // The tap's queue fills and the kernel drops the rest: that is the point.
            let _ = pkt.send(&frame);
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss1 = card.daemon.rss_kib()?;
    let cpu = card.daemon.cpu_seconds()? - cpu0;
    eprintln!("sent {sent} frames; daemon RSS {rss0} -> {rss1} KiB, {cpu:.2} CPU s in 10 s");
    ensure!(rss1 < rss0 + 4096, "RSS grew from {rss0} to {rss1} KiB");
    ensure!(
        cpu < 2.0,
        "the daemon used {cpu:.2} CPU seconds while waiting for buffers"
    );
    let c = card.daemon.counters()?;
    ensure!(c.get("rx_no_buffers") > 0, "{c:?}");
    ensure!(c.get("rx_frames") <= 16, "more frames than buffers: {c:?}");
    // Buffers again: the delivered frames are read and their buffers reposted, so the card
    // drains what its tap queue still holds (up to txqueuelen frames). Only once the queue is
    // empty can a new frame get in: the kernel drops sends into a full tap queue.
    let mut drained = 0u64;
    while dev.recv(Duration::from_secs(1)).is_ok() {
        drained += 1;
    }
    ensure!(
        drained >= c.get("rx_frames"),
        "read back {drained} frames, the card had delivered {}",
        c.get("rx_frames")
    );
    eprintln!("read back {drained} frames held while the guest posted nothing");
    card.check_card_to_host(&mut dev, 6)?;
    card.check_host_to_card(&mut dev, 7702, 7)?;
    Ok(())
}

/// Deleting card0 under a serving daemon ends it with status 1 and a message naming the tap.
#[test]
fn tap_deleted_under_the_daemon() -> Result<()> {
    let card = Card::start(&[])?;
    let mut dev = card.driver()?;
    card.check_host_to_card(&mut dev, 7703, 8)?;
    card.ns.ip(&["link", "del", TAP])?;
    let mut d = card.daemon;
    let status = d.wait_exit(Duration::from_secs(10))?;
    ensure!(status.code() == Some(1), "exit status {status}");
    let log = d.log();
    ensure!(log.contains("tap card0 was deleted"), "log:\n{log}");
    drop(dev);
    Ok(())
}

/// The card's namespace deleted under a serving daemon (`ip netns del`): the tap's open queues
/// keep the namespace alive without a name, where nothing reaches the card's side; the daemon
/// notices within a second or two and ends with status 1 and a message naming the namespace,
/// as when the tap alone is deleted.
#[test]
fn card_namespace_deleted_under_the_daemon() -> Result<()> {
    let card = Card::start(&[])?;
    let mut dev = card.driver()?;
    card.check_host_to_card(&mut dev, 7704, 9)?;
    let name = card.ns.name().to_string();
    let out = std::process::Command::new("ip")
        .args(["netns", "del", &name])
        .output()?;
    ensure!(out.status.success(), "ip netns del {name}: {out:?}");
    let mut d = card.daemon;
    let status = d.wait_exit(Duration::from_secs(10))?;
    ensure!(status.code() == Some(1), "exit status {status}");
    let log = d.log();
    ensure!(
        log.contains(&format!("the card's network namespace {name} was deleted")),
        "log:\n{log}"
    );
    drop(dev);
    Ok(())
}
