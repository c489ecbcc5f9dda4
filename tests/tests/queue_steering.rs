//! A card with several queue pairs whose frontend uses fewer of them, as the stock virtio_net
//! does when the guest has fewer vCPUs than queue pairs (it enables min(pairs, CPUs)). The
//! tap's kernel side spreads card-to-host flows over every attached tap queue; a flow steered
//! to the queue of a pair the frontend never enabled would be lost. The card detaches the tap
//! queues of disabled pairs (`TUNSETQUEUE`), as QEMU's own tap backend does.

use std::collections::BTreeSet;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use card_tests::card::*;
use card_tests::frontend::F_PROTOCOL_FEATURES;
use card_tests::packet::*;

const FLOWS: u16 = 32;

/// Sends one frame per UDP flow from the card and returns the ports that reached the driver.
fn flows_delivered(
    card: &Card,
    dev: &mut card_tests::netdev::VirtioNet,
    base: u16,
) -> Result<BTreeSet<u16>> {
    let pkt = card.ns.packet_socket(TAP)?;
    for i in 0..FLOWS {
        let frame = udp_frame(
            card.mac,
            HOST_MAC,
            SocketAddrV4::new(CARD_IP, 5000 + i),
            SocketAddrV4::new(HOST_IP, base + i),
            &pattern(100, i as u8),
        )?;
        pkt.send(&frame)?;
    }
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while got.len() < usize::from(FLOWS) && Instant::now() < deadline {
        let Ok(f) = dev.recv(Duration::from_millis(500)) else {
            continue;
        };
        // IPv4 UDP to the host: destination port at 14 + 20 + 2.
        if f.frame.len() >= 38 && f.frame[12..14] == [0x08, 0x00] && f.frame[23] == 17 {
            let port = u16::from_be_bytes([f.frame[36], f.frame[37]]);
            if (base..base + FLOWS).contains(&port) {
                got.insert(port);
            }
        }
    }
    Ok(got)
}

/// `--queues 2`, a frontend that sets up and enables pair 0 only: every flow arrives on it.
#[test]
fn flows_reach_the_only_enabled_pair() -> Result<()> {
    let card = Card::start(&["--queues", "2"])?;
    let mut dev = card.driver()?;
    let got = flows_delivered(&card, &mut dev, 6000)?;
    ensure!(
        got.len() == usize::from(FLOWS),
        "{} of {FLOWS} card-to-host flows reached the enabled queue pair (ports {got:?}); \
         the rest went to the tap queue of the pair the frontend never enabled",
        got.len()
    );
    card.check_host_to_card(&mut dev, 7730, 1)?;
    Ok(())
}

/// The same without PROTOCOL_FEATURES: SET_FEATURES then enables every ring at once (no
/// SET_VRING_ENABLE), but the frontend starts only pair 0 (it could not even ask how many
/// pairs there are); a pair counts as used only once its ring is started, so every flow still
/// arrives.
#[test]
fn flows_reach_the_only_started_pair_without_protocol_features() -> Result<()> {
    let card = Card::start(&["--queues", "2"])?;
    let (mut dev, _) =
        card.driver_custom(|f| f & !F_PROTOCOL_FEATURES, |o| o.enable_rings = false)?;
    let got = flows_delivered(&card, &mut dev, 6100)?;
    ensure!(
        got.len() == usize::from(FLOWS),
        "{} of {FLOWS} card-to-host flows reached the started queue pair (ports {got:?})",
        got.len()
    );
    card.check_host_to_card(&mut dev, 7731, 2)?;
    Ok(())
}
