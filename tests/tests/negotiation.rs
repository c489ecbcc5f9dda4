//! Feature and protocol negotiation: the default offer, the `--enable`/`--disable` toggles, and
//! the toggles the daemon must refuse.

use std::time::Duration;

use anyhow::{ensure, Result};
use card_tests::card::Card;
use card_tests::daemon::run_to_exit;
use card_tests::frontend::F_PROTOCOL_FEATURES;
use card_tests::netdev::*;
use card_tests::netns::Netns;
use vhost::vhost_user::message::VhostUserProtocolFeatures as P;

/// The documented default offer, written out bit by bit (not taken from the daemon's tables).
const DEFAULT_OFFER: u64 = F_VERSION_1
    | F_MTU
    | F_CSUM
    | F_GUEST_CSUM
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_MRG_RXBUF
    | F_EVENT_IDX
    | F_INDIRECT_DESC
    | F_GUEST_ANNOUNCE
    | F_LOG_ALL;

fn show(word: u64) -> String {
    let bits: Vec<String> = (0..64)
        .filter(|b| word & (1u64 << b) != 0)
        .map(|b| b.to_string())
        .collect();
    format!("{word:#x} (bits {})", bits.join(","))
}

#[test]
fn default_offer_protocol_features_and_queue_num() -> Result<()> {
    let card = Card::start(&[])?;
    let mut ctl = card.connect()?;
    let offer = ctl.handshake()?;
    let expected = DEFAULT_OFFER | F_PROTOCOL_FEATURES;
    ensure!(
        offer.features == expected,
        "offered {}, expected {}",
        show(offer.features),
        show(expected)
    );
    for p in [P::MQ, P::REPLY_ACK, P::MTU, P::LOG_SHMFD, P::RARP] {
        ensure!(
            offer.protocol.contains(p),
            "protocol features {:?} lack {p:?}",
            offer.protocol
        );
    }
    ensure!(
        offer.queue_num == 2,
        "GET_QUEUE_NUM = {}, expected 2",
        offer.queue_num
    );
    // Acking the whole offer is accepted (with REPLY_ACK, a refusal would be an error here).
    ctl.set_features(offer.features)?;
    let mut d = card.daemon;
    d.wait_log("frontend acked features", Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn toggles_change_the_offer() -> Result<()> {
    let card = Card::start(&["--disable", "mrg-rxbuf,guest-tso4", "--enable", "host-ufo"])?;
    let offer = card.connect()?.handshake()?;
    let expected =
        (DEFAULT_OFFER & !F_MRG_RXBUF & !F_GUEST_TSO4) | F_HOST_UFO | F_PROTOCOL_FEATURES;
    ensure!(
        offer.features == expected,
        "offered {}, expected {}",
        show(offer.features),
        show(expected)
    );
    ensure!(offer.features & (1 << 14) != 0, "host-ufo is bit 14");
    drop(card);

    // Two queue pairs: four virtqueues.
    let card = Card::start(&["--queues", "2"])?;
    let offer = card.connect()?.handshake()?;
    ensure!(
        offer.queue_num == 4,
        "GET_QUEUE_NUM = {} with --queues 2",
        offer.queue_num
    );
    // VIRTIO_NET_F_MQ (bit 22) is offered exactly when there is more than one pair.
    ensure!(
        offer.features & (1 << 22) != 0,
        "MQ not offered with --queues 2: {}",
        show(offer.features)
    );
    Ok(())
}

/// Starts the daemon with a bad feature selection; it must exit non-zero at once.
fn refused(ns: &Netns, flags: &[&str]) -> Result<String> {
    let sock = std::env::temp_dir().join(card_tests::unique("card-tests-refused-"));
    let sock_s = sock.to_string_lossy().into_owned();
    let mut args = vec![
        "--socket",
        sock_s.as_str(),
        "--netns",
        ns.name(),
        "--tap",
        "card0",
    ];
    args.extend_from_slice(flags);
    let (status, stderr) = run_to_exit(&args, Duration::from_secs(5))?;
    ensure!(
        !status.success(),
        "vhost-card {flags:?} started: {status}\n{stderr}"
    );
    ensure!(
        !sock.exists(),
        "a refused start left {} behind",
        sock.display()
    );
    ensure!(
        !ns.ip(&["-o", "link"])?.contains("card0"),
        "a refused start created the tap"
    );
    Ok(stderr)
}

#[test]
fn invalid_toggles_are_refused() -> Result<()> {
    card_tests::require_root()?;
    let ns = Netns::new("r")?;

    // host-tso4 and host-tso6 need csum (virtio spec 5.1.3.1).
    let e = refused(&ns, &["--disable", "csum"])?;
    ensure!(
        e.contains("host-tso4") && e.contains("'csum'"),
        "error does not name host-tso4 and csum:\n{e}"
    );

    let e = refused(&ns, &["--disable", "guest-csum"])?;
    ensure!(e.contains("guest-tso4") && e.contains("guest-csum"), "{e}");

    // Unknown names are rejected with the list of valid ones.
    let e = refused(&ns, &["--enable", "warp-drive"])?;
    ensure!(e.contains("warp-drive"), "{e}");
    for valid in [
        "csum",
        "guest-csum",
        "host-tso4",
        "mrg-rxbuf",
        "host-ufo",
        "event-idx",
    ] {
        ensure!(
            e.contains(valid),
            "the list of valid names lacks {valid}:\n{e}"
        );
    }
    let e = refused(&ns, &["--disable", "mrg-rxbuf,bogus"])?;
    ensure!(e.contains("bogus"), "{e}");

    // version-1 is always offered.
    let e = refused(&ns, &["--disable", "version-1"])?;
    ensure!(e.contains("version-1"), "{e}");
    Ok(())
}
