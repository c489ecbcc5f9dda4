//! Reconnect: after the frontend goes away the daemon listens again on the same socket, keeps
//! the tap and its address, and a new frontend (with new guest memory) negotiates again and
//! passes traffic, and no descriptor is left behind by the old session. Finally SIGTERM stops it
//! cleanly.

use std::time::Duration;

use anyhow::{ensure, Result};
use card_tests::card::{Card, TAP};
use card_tests::frontend::F_PROTOCOL_FEATURES;
use card_tests::netdev::{F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1};

#[test]
fn new_frontend_after_disconnect() -> Result<()> {
    let mut card = Card::start(&[])?;
    let socket = card.daemon.socket().to_path_buf();
    // Each session negotiates something else: everything; no EVENT_IDX nor INDIRECT_DESC;
    // the bare minimum (no offloads, no MRG_RXBUF).
    let keeps: [fn(u64) -> u64; 3] = [
        |f| f,
        |f| f & !(F_EVENT_IDX | F_INDIRECT_DESC),
        |f| f & (F_VERSION_1 | F_PROTOCOL_FEATURES),
    ];
    let rounds = keeps.len() as u64;
    let pid = card.daemon.pid()?;
    let mut fds = Vec::new();
    for (round, keep) in (0..rounds).zip(keeps) {
        let seed = round as u8;
        let (mut dev, _) = card.driver_with(keep)?;
        card.check_host_to_card(&mut dev, 7500 + round as u16, seed)?;
        card.check_card_to_host(&mut dev, seed + 10)?;
        if round == 1 {
            // Stop the rings the way QEMU does before it disconnects: every chain the daemon
            // took must have been given back.
            let [rx_base, tx_base] = dev.get_vring_bases()?;
            ensure!(tx_base == 1, "TX base {tx_base} after one frame");
            let rx_used = u32::from(dev.rx.used_idx(&dev.mem)?);
            ensure!(
                rx_base == rx_used,
                "RX base {rx_base} but {rx_used} buffers used: chains lost in flight"
            );
        }
        drop(dev);
        card.daemon.wait_log_count(
            "frontend disconnected",
            round as usize + 1,
            Duration::from_secs(5),
        )?;
        ensure!(
            card.tap_has_address()?,
            "round {round}: card0 lost its address"
        );
        ensure!(
            card.ns.mac_of(TAP)? == card.mac,
            "round {round}: card0 changed its MAC"
        );
        ensure!(socket.exists(), "round {round}: the socket is gone");
        fds.push(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count());
    }
    // Between sessions the daemon holds the same descriptors every time (a session used to
    // leak its workers' exit eventfds).
    ensure!(
        fds.iter().all(|&n| n == fds[0]),
        "open descriptors after each session: {fds:?}"
    );

    let (status, c) = card.daemon.stop()?;
    ensure!(status.success(), "exit status {status} after SIGTERM");
    ensure!(!socket.exists(), "the socket was left behind");
    ensure!(c.get("tx_frames") == rounds, "{c:?}");
    ensure!(c.get("rx_frames") == rounds, "{c:?}");
    Ok(())
}
