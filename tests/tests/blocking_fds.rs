//! Descriptors from the frontend that could block the card: a kick or call "eventfd" that is
//! really a blocking pipe. QEMU and DPDK hand over non-blocking eventfds; a hostile or broken
//! frontend need not. A blocking `write` to a full pipe would hang the queue pair's worker
//! thread, and with it both directions of that pair and every later session.

use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use card_tests::card::*;
use card_tests::fds::pipe;
use card_tests::netdev::{TxLayout, F_EVENT_IDX, TX};
use card_tests::packet::*;
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;

/// A pipe with the smallest buffer the kernel allows (one page): (read end, write end).
fn small_pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe()?;
    // SAFETY: F_SETPIPE_SZ on a pipe we own; the kernel rounds up to one page.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    Ok((r, w))
}

/// The TX queue's call descriptor is a blocking pipe nobody reads (512 notifications fill it)
/// and notifications are not suppressed (no EVENT_IDX): the card must keep completing TX
/// chains, well past a full pipe, and keep serving the RX direction of the same pair.
#[test]
fn blocking_call_pipe_cannot_wedge_the_worker() -> Result<()> {
    let card = Card::start(&[])?;
    let (mut dev, _) = card.driver_custom(|f| f & !F_EVENT_IDX, |_| {})?;
    let (_reader, writer) = small_pipe()?;
    // SAFETY: the write end is ours; EventFd only reads and writes it and closes it on drop.
    let call = unsafe { EventFd::from_raw_fd(writer.into_raw_fd()) };
    dev.ctl.vu.set_vring_call(TX, &call)?;

    let dst = SocketAddrV4::new(CARD_IP, 7720);
    let sock = card.ns.udp_socket(dst)?;
    let frame = card.frame_to(dst, 40000, &pattern(64, 1))?;
    let mut buf = [0u8; 256];
    for i in 0..2000u32 {
        let head = dev.send(&VnetHdr::default(), &frame, &TxLayout::Split)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some((used, _)) = dev.tx.pop_used(&dev.mem)? {
                ensure!(used == head, "TX chain {used} came back, expected {head}");
                break;
            }
            if Instant::now() > deadline {
                bail!("TX frame {i} never came back: the worker is stuck on the call pipe");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        // Drain the card's socket so its receive buffer never drops a frame.
        sock.recv(&mut buf)?;
    }
    card.check_card_to_host(&mut dev, 11)?;
    let mut d = card.daemon;
    let c = d.wait_counters(Duration::from_secs(5), "notifications_blocked", |c| {
        c.get("notifications_blocked") > 0
    })?;
    eprintln!(
        "2000 TX frames completed; notifications sent {}, skipped on the full pipe {}",
        c.get("notifications"),
        c.get("notifications_blocked")
    );
    let card = Card { daemon: d, ..card };
    drop(dev);
    // The next session is served too.
    let mut dev = card.driver()?;
    card.check_host_to_card(&mut dev, 7721, 12)?;
    card.check_card_to_host(&mut dev, 13)?;
    Ok(())
}

/// Kick descriptors handed over in blocking mode are made non-blocking by the card (it only
/// ever reads them), and kicks through them still move frames both ways.
#[test]
fn blocking_kick_eventfds_are_made_non_blocking() -> Result<()> {
    let card = Card::start(&[])?;
    let (mut dev, _) = card.driver_custom(|f| f, |o| o.blocking_kicks = true)?;
    for (name, kick) in [("RX", &dev.rx.kick), ("TX", &dev.tx.kick)] {
        // SAFETY: F_GETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(kick.as_raw_fd(), libc::F_GETFL) };
        ensure!(
            flags >= 0 && flags & libc::O_NONBLOCK != 0,
            "{name} kick descriptor flags {flags:#x}: still blocking"
        );
    }
    card.check_host_to_card(&mut dev, 7722, 14)?;
    card.check_card_to_host(&mut dev, 15)?;
    Ok(())
}
