//! A frontend that shrinks guest memory after SET_MEM_TABLE. The daemon maps the memory files
//! shared; touching a page the file no longer has raises SIGBUS. The daemon seals the files
//! that allow it (they cannot shrink any more) and survives the others: the lost pages read as
//! zeros, are counted as `guest_memory_faults`, and the next frontend is served normally.

use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use card_tests::card::Card;
use card_tests::vring::{RawDesc, GUEST_BASE};

const PAGE: u64 = 4096;

/// A memfd that allows seals (as QEMU's memory-backend-memfd creates them) is sealed against
/// shrinking once the daemon accepted it: the frontend's own truncate fails.
#[test]
fn sealable_guest_memory_cannot_shrink() -> Result<()> {
    let card = Card::start(&[])?;
    let (mut dev, _) = card.driver_custom(|f| f, |o| o.allow_sealing = true)?;
    let file = dev.mem.file();
    // SAFETY: F_GET_SEALS on a descriptor the harness owns.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    ensure!(
        seals >= 0 && seals & libc::F_SEAL_SHRINK != 0,
        "seals after SET_MEM_TABLE: {seals:#x}"
    );
    let err = file
        .set_len(dev.mem.size() / 2)
        .expect_err("a sealed guest memfd shrank");
    ensure!(err.raw_os_error() == Some(libc::EPERM), "{err}");
    card.check_host_to_card(&mut dev, 7800, 1)?;
    card.check_card_to_host(&mut dev, 2)?;
    Ok(())
}

/// A memfd without sealing is truncated under a serving daemon: first the upper half (where a
/// TX buffer then points), then all of it (rings included). The daemon survives both, counts
/// the lost pages, and serves the next frontend.
#[test]
fn guest_memory_truncated_under_the_daemon() -> Result<()> {
    let mut card = Card::start(&[])?;
    let mut dev = card.driver()?;
    card.check_host_to_card(&mut dev, 7801, 1)?;
    let size = dev.mem.size();

    // The upper half (TX scratch) goes away; a TX buffer on its last page follows.
    dev.mem.file().set_len(size / 2)?;
    dev.send_raw_wait(&[RawDesc {
        addr: GUEST_BASE + size - PAGE,
        len: 1500,
        flags: 0,
        next: None,
    }])
    .context("a TX chain over a truncated page")?;
    card.daemon
        .wait_log("guest_memory_faults=", Duration::from_secs(5))
        .context("the daemon never counted the lost page")?;
    // RX buffers and rings live in the lower half: card to host still works.
    card.check_card_to_host(&mut dev, 3)?;

    // Now everything, rings included, and both queues kicked.
    dev.mem.file().set_len(0)?;
    dev.tx.kick()?;
    dev.rx.kick()?;
    std::thread::sleep(Duration::from_millis(500));
    card.daemon.check_running()?;
    // Dropping the harness's device only unmaps its memory and closes the session.
    drop(dev);

    // A new frontend with fresh memory gets a working link.
    let mut dev = card.driver().context("the next frontend")?;
    card.check_host_to_card(&mut dev, 7802, 4)?;
    card.check_card_to_host(&mut dev, 5)?;
    card.daemon.check_running()?;
    Ok(())
}
