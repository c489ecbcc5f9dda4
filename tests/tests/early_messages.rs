//! QEMU 7.2's early requests: SET_VRING_ENABLE for each queue and VHOST_USER_NET_SET_MTU, sent
//! after SET_PROTOCOL_FEATURES but before SET_FEATURES. The daemon must ack them and end up with
//! the rings in the state they asked for.

use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use card_tests::card::Card;
use card_tests::frontend::Control;
use card_tests::netdev::{Options, TxLayout, VirtioNet, RX, TX};
use card_tests::packet::VnetHdr;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures as P};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

/// QEMU's opening, then the early requests; returns the session and the feature offer.
fn open_with_early_requests(card: &Card, enable: bool, mtu: u64) -> Result<(Control, u64)> {
    let mut ctl = card.connect()?;
    let offer = ctl.handshake()?;
    ensure!(
        offer.acked_protocol.contains(P::REPLY_ACK | P::MTU),
        "REPLY_ACK and NET_MTU must be negotiated first: {:?}",
        offer.acked_protocol
    );
    for q in [RX, TX] {
        let ack = ctl.raw_set_vring_enable(q as u32, enable)?;
        ensure!(
            ack == 0,
            "early SET_VRING_ENABLE({q}, {enable}) acked {ack}"
        );
    }
    let ack = ctl.raw_net_set_mtu(mtu)?;
    ensure!(ack == 0, "NET_SET_MTU({mtu}) acked {ack}");
    Ok((ctl, offer.features))
}

/// Rings enabled early and never again: the daemon must apply the held requests once the
/// features are set, so traffic flows in both directions.
#[test]
fn early_enable_and_mtu_then_traffic() -> Result<()> {
    let card = Card::start(&[])?;
    let (ctl, features) = open_with_early_requests(&card, true, 65520)?;
    let opts = Options {
        enable_rings: false,
        ..Options::for_features(features)
    };
    let mut dev = VirtioNet::start(ctl, features, &opts)?;
    card.check_host_to_card(&mut dev, 7400, 1)?;
    card.check_card_to_host(&mut dev, 2)?;
    dev.ping()?;
    Ok(())
}

/// The QEMU 7.2 sequence exactly: early enables without NEED_REPLY (no reply may come back, or
/// every later reply would be off by one), NET_SET_MTU with NEED_REPLY, then the usual start
/// with SET_VRING_ENABLE after the rings are set up, no NEED_REPLY on anything else.
#[test]
fn qemu_sequence_with_late_enable_too() -> Result<()> {
    let card = Card::start(&[])?;
    let mut ctl = card.connect()?;
    let offer = ctl.handshake()?;
    ctl.vu.set_hdr_flags(VhostUserHeaderFlag::empty());
    for q in [RX, TX] {
        ctl.raw_set_vring_enable_noreply(q as u32, true)?;
    }
    // `raw_request` checks that this reply is NET_SET_MTU's, not a stray SET_VRING_ENABLE ack.
    let ack = ctl.raw_net_set_mtu(1500)?;
    ensure!(ack == 0, "NET_SET_MTU(1500) acked {ack}");
    let features = offer.features;
    ensure!(
        ctl.vu.get_features()? == features,
        "GET_FEATURES answered wrongly"
    );
    let mut dev = VirtioNet::start(ctl, features, &Options::for_features(features))?;
    card.check_host_to_card(&mut dev, 7410, 3)?;
    card.check_card_to_host(&mut dev, 4)?;
    dev.ping()?;
    Ok(())
}

/// QEMU sends SET_VRING_CALL after SET_VRING_KICK, without waiting for an answer, and the
/// driver's first kick may reach the worker before the handler has the call. What the worker used
/// meanwhile must be signalled once the call comes, not lost (a stalled TX queue in the guest).
#[test]
fn a_call_that_comes_after_the_first_used_buffer_is_signalled() -> Result<()> {
    let card = Card::start(&[])?;
    let mut ctl = card.connect()?;
    let features = ctl.handshake()?.features;
    let opts = Options {
        withhold_calls: true,
        ..Options::for_features(features)
    };
    let mut dev = VirtioNet::start(ctl, features, &opts)?;
    let frame = card.frame_to(
        std::net::SocketAddrV4::new(card_tests::card::CARD_IP, 9),
        40001,
        b"before the call",
    )?;
    let head = dev.send(&VnetHdr::default(), &frame, &TxLayout::Combined)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while dev.tx.used_idx(&dev.mem)? == 0 {
        ensure!(
            std::time::Instant::now() < deadline,
            "the TX frame was not used without a call eventfd"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    ensure!(
        !card_tests::vring::poll_in(dev.tx.call.as_raw_fd(), Duration::ZERO)?,
        "the call eventfd the device does not have yet was written"
    );
    for q in [RX, TX] {
        let call = if q == RX { &dev.rx.call } else { &dev.tx.call };
        dev.ctl.vu.set_vring_call(q, call)?;
    }
    ensure!(
        card_tests::vring::poll_in(dev.tx.call.as_raw_fd(), Duration::from_secs(2))?,
        "the frame used before SET_VRING_CALL was never signalled"
    );
    dev.wait_tx(head)?;
    card.check_host_to_card(&mut dev, 7430, 7)?;
    card.check_card_to_host(&mut dev, 8)?;
    Ok(())
}

/// Rings disabled early: after SET_FEATURES they must stay disabled (a TX frame waits), until
/// the frontend enables them.
#[test]
fn early_disable_holds_the_rings() -> Result<()> {
    let mut card = Card::start(&[])?;
    let (ctl, features) = open_with_early_requests(&card, false, 65520)?;
    let opts = Options {
        enable_rings: false,
        ..Options::for_features(features)
    };
    let mut dev = VirtioNet::start(ctl, features, &opts)?;
    let frame = card.frame_to(
        std::net::SocketAddrV4::new(card_tests::card::CARD_IP, 9),
        40000,
        b"held",
    )?;
    let head = dev.send(&VnetHdr::default(), &frame, &TxLayout::Combined)?;
    std::thread::sleep(Duration::from_millis(500));
    if dev.tx.used_idx(&dev.mem)? != 0 {
        bail!("a disabled TX ring was processed");
    }
    for q in [RX, TX] {
        dev.ctl.vu.set_vring_enable(q, true)?;
    }
    dev.wait_tx(head)?;
    card.daemon
        .wait_counters(Duration::from_secs(4), "tx_frames=1", |c| {
            c.get("tx_frames") == 1
        })?;
    card.check_host_to_card(&mut dev, 7420, 5)?;
    card.check_card_to_host(&mut dev, 6)?;
    Ok(())
}

/// NET_SET_MTU above the card's --mtu gets a non-zero ack; the session goes on.
#[test]
fn net_set_mtu_above_card_mtu_is_refused() -> Result<()> {
    let card = Card::start(&["--mtu", "9000"])?;
    let mut ctl = card.connect()?;
    let offer = ctl.handshake()?;
    ensure!(offer.acked_protocol.contains(P::REPLY_ACK | P::MTU));
    ensure!(ctl.raw_net_set_mtu(9000)? == 0, "NET_SET_MTU(9000) refused");
    for mtu in [9001, 65520, 67] {
        let ack = ctl.raw_net_set_mtu(mtu)?;
        ensure!(
            ack != 0,
            "NET_SET_MTU({mtu}) acked 0 by a card with --mtu 9000"
        );
    }
    // Still serving: the rest of the session works.
    let mut dev = VirtioNet::start(ctl, offer.features, &Options::for_features(offer.features))?;
    card.check_host_to_card(&mut dev, 7430, 7)?;
    Ok(())
}
