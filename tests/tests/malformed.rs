//! Malformed descriptor chains on both queues: each is given back, counted and dropped, and the
//! daemon keeps serving (a good frame gets through after every one).

use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use card_tests::card::{Card, CARD_IP, HOST_IP, HOST_MAC, TAP};
use card_tests::daemon::Counters;
use card_tests::netdev::{RxLayout, VirtioNet};
use card_tests::packet::{udp_frame_of_len, VnetHdr, F_DATA_VALID};
use card_tests::vring::{RawDesc, GUEST_BASE, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::GuestAddress;

/// A readable descriptor over `bytes` copied into guest memory.
fn desc_over(
    dev: &mut VirtioNet,
    bytes: &[u8],
    flags: u16,
    next: Option<usize>,
) -> Result<RawDesc> {
    let addr = dev.mem.scratch(bytes.len())?;
    dev.mem.write(addr, bytes)?;
    Ok(RawDesc {
        addr: addr.0,
        len: u32::try_from(bytes.len())?,
        flags,
        next,
    })
}

#[test]
fn malformed_tx_chains_are_counted_and_dropped() -> Result<()> {
    let mut card = Card::start(&[])?;
    let mut dev = card.driver()?;

    // A valid header and frame, for chains whose only defect is their shape.
    let payload = card_tests::packet::pattern(64, 1);
    let frame = card.frame_to(SocketAddrV4::new(CARD_IP, 7399), 40000, &payload)?;
    let mut hdr_frame = VnetHdr::default().encode().to_vec();
    hdr_frame.extend_from_slice(&frame);
    let (hdr, body) = hdr_frame.split_at(VnetHdr::LEN);

    card.check_host_to_card(&mut dev, 7301, 1)
        .context("baseline")?;

    let outside = |addr| RawDesc {
        addr,
        len: 100,
        flags: 0,
        next: None,
    };
    // Each case: what it is, its chain, the counter that must count it.
    let cases: Vec<(&str, Vec<RawDesc>, &str)> = vec![
        (
            "a buffer outside guest memory",
            vec![outside(0xdead_0000_0000)],
            "tx_drop_bad_chain",
        ),
        (
            "a buffer running past the end of memory",
            vec![outside(GUEST_BASE + (64 << 20) - 40)],
            "tx_drop_bad_chain",
        ),
        (
            // Both descriptors hold a valid header and frame: the loop is the only defect.
            "a descriptor loop",
            vec![
                desc_over(&mut dev, hdr, VRING_DESC_F_NEXT, Some(1))?,
                desc_over(&mut dev, body, VRING_DESC_F_NEXT, Some(0))?,
            ],
            "tx_drop_bad_chain",
        ),
        (
            "a chain shorter than the 12-byte header (two descriptors of 4 bytes)",
            vec![
                desc_over(&mut dev, &[0u8; 4], VRING_DESC_F_NEXT, Some(1))?,
                desc_over(&mut dev, &[0u8; 4], 0, None)?,
            ],
            "tx_drop_short_header",
        ),
        (
            "a device-writable descriptor in a TX chain",
            vec![
                desc_over(&mut dev, hdr, VRING_DESC_F_NEXT, Some(1))?,
                desc_over(&mut dev, body, VRING_DESC_F_WRITE, None)?,
            ],
            "tx_drop_bad_chain",
        ),
    ];

    let mut good = 1u64;
    let mut dropped = std::collections::BTreeMap::<&str, u64>::new();
    for (n, (what, chain, counter)) in cases.into_iter().enumerate() {
        dev.send_raw_wait(&chain)?;
        let want = *dropped.entry(counter).and_modify(|v| *v += 1).or_insert(1);
        card.daemon
            .wait_counters(
                Duration::from_secs(4),
                &format!("{counter}={want}"),
                |c: &Counters| c.get(counter) == want,
            )
            .with_context(|| format!("counting {what}"))?;
        let n = u8::try_from(n)?;
        card.check_host_to_card(&mut dev, 7302 + u16::from(n), n + 2)
            .with_context(|| format!("after {what}"))?;
        good += 1;
    }

    let c = card
        .daemon
        .wait_counters(Duration::from_secs(4), "all good frames sent", |c| {
            c.get("tx_frames") == good
        })?;
    ensure!(c.get("tx_drop_bad_chain") == 4, "{c:?}");
    ensure!(c.get("tx_drop_short_header") == 1, "{c:?}");
    card.daemon.check_running()?;
    ensure!(
        !card.daemon.log().contains("session ended with an error"),
        "the daemon dropped the session"
    );
    Ok(())
}

/// A device-writable buffer of `len` bytes in guest memory (for RX chains).
fn rx_desc(dev: &mut VirtioNet, len: u32, flags: u16, next: Option<usize>) -> Result<RawDesc> {
    let addr = dev.mem.alloc(len as usize, 64)?;
    Ok(RawDesc {
        addr: addr.0,
        len,
        flags,
        next,
    })
}

/// Posts two good 1536-byte buffers, a chain outside guest memory, then 60 good buffers, in one
/// batch and one kick; returns the heads of the good buffers before and after the bad chain.
fn post_good_bad_good(dev: &mut VirtioNet) -> Result<(Vec<u16>, Vec<u16>)> {
    dev.rx.begin_batch();
    let first = dev.post_rx_nokick(&RxLayout::mergeable(1536, 2))?;
    dev.post_rx_raw(&[RawDesc {
        addr: 0xdead_0000_0000,
        len: 1536,
        flags: VRING_DESC_F_WRITE,
        next: None,
    }])?;
    let rest = dev.post_rx_nokick(&RxLayout::mergeable(1536, 60))?;
    dev.rx.end_batch(&dev.mem)?;
    dev.rx.kick()?;
    Ok((first, rest))
}

/// Malformed RX chains (outside memory, device-readable, shorter than the header, a loop) are
/// given back empty and counted; frames go to the good buffers around them, also when a bad
/// chain sits between the buffers one frame spreads over; a good buffer stranded before a
/// consumed bad chain comes back empty exactly once (it cannot be handed out again).
#[test]
fn malformed_rx_chains_are_counted_and_skipped() -> Result<()> {
    let mut card = Card::start(&[])?;
    let src = SocketAddrV4::new(CARD_IP, 5353);
    let dst = SocketAddrV4::new(HOST_IP, 6363);
    let pkt = card.ns.packet_socket(TAP)?;

    // Session 1: the bad chains come first in the ring, good buffers after them.
    let (mut dev, _) = card.driver_custom(|f| f, |o| o.rx.chains = 0)?;
    let w = VRING_DESC_F_WRITE;
    let bad = [
        vec![RawDesc {
            addr: 0xdead_0000_0000,
            len: 2048,
            flags: w,
            next: None,
        }],
        vec![rx_desc(&mut dev, 2048, 0, None)?],
        vec![rx_desc(&mut dev, 4, w, None)?],
        vec![
            rx_desc(&mut dev, 2048, w | VRING_DESC_F_NEXT, Some(1))?,
            rx_desc(&mut dev, 2048, w | VRING_DESC_F_NEXT, Some(0))?,
        ],
    ];
    dev.rx.begin_batch();
    for b in &bad {
        dev.post_rx_raw(b)?;
    }
    dev.post_rx_nokick(&RxLayout::mergeable(1536, 64))?;
    dev.rx.end_batch(&dev.mem)?;
    dev.rx.kick()?;
    for (i, len) in [64usize, 1500, 65520].into_iter().enumerate() {
        let frame = udp_frame_of_len(card.mac, HOST_MAC, src, dst, len, i as u8)?;
        pkt.send(&frame)?;
        let got = dev.recv_matching(Duration::from_secs(5), |f| f.frame == frame)?;
        ensure!(
            got.hdr.flags == F_DATA_VALID,
            "{len}: flags {:#x}",
            got.hdr.flags
        );
        let want = (len + VnetHdr::LEN).div_ceil(1536);
        ensure!(
            usize::from(got.hdr.num_buffers) == want && got.heads.len() == want,
            "{len}: num_buffers {} over {} buffers, expected {want}",
            got.hdr.num_buffers,
            got.heads.len()
        );
    }
    ensure!(
        dev.rx_bad_returned.len() == bad.len(),
        "{} of {} bad chains given back: {:?}",
        dev.rx_bad_returned.len(),
        bad.len(),
        dev.rx_bad_returned
    );
    ensure!(
        dev.rx_bad_returned.iter().all(|&(_, len)| len == 0),
        "a bad chain came back with data: {:?}",
        dev.rx_bad_returned
    );
    card.daemon
        .wait_counters(Duration::from_secs(4), "rx_drop_bad_chain=4", |c| {
            c.get("rx_drop_bad_chain") == 4
        })?;
    drop(dev);
    card.daemon
        .wait_log("frontend disconnected", Duration::from_secs(5))?;

    // Between sessions a 4000-byte frame (3 buffers) waits in the tap. Session 2 posts two
    // good buffers, a bad chain, then more good ones, all at once: the frame must use the two
    // good buffers and the one after the bad chain.
    let frame = udp_frame_of_len(card.mac, HOST_MAC, src, dst, 4000, 9)?;
    pkt.send(&frame)?;
    let (mut dev, _) = card.driver_custom(|f| f, |o| o.rx.chains = 0)?;
    let (first, rest) = post_good_bad_good(&mut dev)?;
    let got = dev.recv_matching(Duration::from_secs(5), |f| f.frame == frame)?;
    ensure!(
        got.hdr.num_buffers == 3,
        "num_buffers {}",
        got.hdr.num_buffers
    );
    ensure!(
        got.heads == [first[0], first[1], rest[0]],
        "frame used buffers {:?}, expected {:?}",
        got.heads,
        [first[0], first[1], rest[0]]
    );
    ensure!(dev.rx_bad_returned.len() == 1, "{:?}", dev.rx_bad_returned);
    card.check_card_to_host(&mut dev, 3)?;
    card.check_host_to_card(&mut dev, 7310, 3)?;
    drop(dev);
    card.daemon
        .wait_log_count("frontend disconnected", 2, Duration::from_secs(5))?;

    // Session 3: the same ring, but a small frame waiting. It fills the first buffer; the
    // second good buffer sits before the consumed bad chain, so it cannot go back to the ring
    // and must come back empty, once; the next frame starts after the bad chain.
    let small = udp_frame_of_len(card.mac, HOST_MAC, src, dst, 100, 10)?;
    pkt.send(&small)?;
    let (mut dev, _) = card.driver_custom(|f| f, |o| o.rx.chains = 0)?;
    let (first, rest) = post_good_bad_good(&mut dev)?;
    let got = dev.recv_matching(Duration::from_secs(5), |f| f.frame == small)?;
    ensure!(got.heads == [first[0]], "small frame used {:?}", got.heads);
    let next = udp_frame_of_len(card.mac, HOST_MAC, src, dst, 200, 11)?;
    pkt.send(&next)?;
    let got = dev.recv_matching(Duration::from_secs(5), |f| f.frame == next)?;
    ensure!(
        got.heads == [rest[0]],
        "the frame after the bad chain used {:?}, expected [{}]",
        got.heads,
        rest[0]
    );
    ensure!(
        dev.rx_empty_returned == 1,
        "{} good buffers came back empty, expected 1 (buffer {})",
        dev.rx_empty_returned,
        first[1]
    );
    ensure!(dev.rx_bad_returned.len() == 1, "{:?}", dev.rx_bad_returned);
    let c = card
        .daemon
        .wait_counters(Duration::from_secs(4), "rx_drop_bad_chain=6", |c| {
            c.get("rx_drop_bad_chain") == 6
        })?;
    ensure!(c.get("rx_drop_truncated") == 0, "{c:?}");
    Ok(())
}

/// An available index more than a ring ahead of the device (virtio 1.2, 2.7.6 forbids it) on
/// either queue: the queue is counted broken and ignored without spinning, the other queue
/// keeps working, and the queue works again once the driver puts its index right.
#[test]
fn available_index_beyond_the_ring_is_ignored_without_spinning() -> Result<()> {
    let mut card = Card::start(&[])?;
    let mut dev = card.driver()?;
    card.check_host_to_card(&mut dev, 7310, 1)?;
    for (name, avail, size) in [
        ("tx", dev.tx.avail, dev.tx.size),
        ("rx", dev.rx.avail, dev.rx.size),
    ] {
        let idx_at = GuestAddress(avail.0 + 2);
        let good = dev.mem.read(idx_at, 2)?;
        let bad = u16::from_le_bytes([good[0], good[1]]).wrapping_add(size + 7);
        dev.mem.write(idx_at, &bad.to_le_bytes())?;
        let cpu0 = card.daemon.cpu_seconds()?;
        for _ in 0..20 {
            dev.tx.kick()?;
            dev.rx.kick()?;
            std::thread::sleep(Duration::from_millis(50));
        }
        let counter = format!("{name}_ring_broken");
        card.daemon
            .wait_counters(Duration::from_secs(4), &counter, |c| c.get(&counter) == 1)?;
        let cpu = card.daemon.cpu_seconds()? - cpu0;
        ensure!(cpu < 0.5, "{cpu:.2} CPU s in 1 s with a broken {name} ring");
        // The other direction still works.
        if name == "tx" {
            card.check_card_to_host(&mut dev, 3)?;
        } else {
            card.check_host_to_card(&mut dev, 7311, 4)?;
        }
        // The driver puts its index right: the queue serves again.
        dev.mem.write(idx_at, &good)?;
        card.check_host_to_card(&mut dev, 7312, 5)
            .with_context(|| format!("after repairing {name}"))?;
        card.check_card_to_host(&mut dev, 6)
            .with_context(|| format!("after repairing {name}"))?;
    }
    card.daemon.check_running()?;
    Ok(())
}
