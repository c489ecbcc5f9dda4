//! Live migration (`vhost-user.rst`, "Migration"), driven like QEMU drives a vhost-user NIC
//! that migrates: SET_LOG_BASE with the log's memfd, SET_FEATURES with VHOST_F_LOG_ALL and
//! SET_VRING_ADDR with VHOST_VRING_F_LOG, then GET_VRING_BASE to stop the rings and
//! SET_VRING_BASE to start them where they stopped; SEND_RARP for the announcement.
//!
//! * With logging on, known RX and TX traffic marks exactly the pages the card wrote: the RX
//!   buffers a frame filled and the used rings (at `log_guest_addr`, which the TX ring sets
//!   apart from its own address here); with logging off, nothing.
//! * Bad log requests are refused with REPLY_ACK failure and the session goes on.
//! * GET_VRING_BASE leaves nothing in flight: every chain the card took is in the used ring.
//! * SEND_RARP puts the announcement on the card's tap.

use std::collections::BTreeSet;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use card_tests::card::*;
use card_tests::fds::{memfd, pipe};
use card_tests::frontend::{wanted_protocol, Control, FLAG_NEED_REPLY};
use card_tests::netdev::{Options, VirtioNet, F_LOG_ALL as LOG_ALL, RX, TX};
use card_tests::packet::{pattern, udp_frame};
use card_tests::vring::{poll_in, GuestMem, GUEST_BASE};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vm_memory::{Address, GuestAddress};

const VRING_F_LOG: u32 = 1;
const PAGE: u64 = 4096;
const REQ_SET_LOG_BASE: u32 = 6;
const REQ_SET_LOG_FD: u32 = 7;
const REQ_SEND_RARP: u32 = 19;

fn migrating_protocol() -> VhostUserProtocolFeatures {
    wanted_protocol() | VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::RARP
}

/// The frontend's log: a memfd with one bit per page of guest memory, from address 0.
struct Log {
    fd: OwnedFd,
    len: u64,
}

impl Log {
    /// A log covering `mem` (as QEMU sizes it: whole u64 words).
    fn for_mem(mem: &GuestMem) -> Result<Log> {
        let end = GUEST_BASE + mem.size();
        let len = (end / PAGE).div_ceil(64) * 8;
        Ok(Log {
            fd: memfd(len)?,
            len,
        })
    }

    fn region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: self.len,
            mmap_offset: 0,
            mmap_handle: self.fd.as_raw_fd(),
        }
    }

    fn bytes(&self) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.len as usize];
        // SAFETY: pread into our own buffer of that length from our own descriptor.
        let n = unsafe { libc::pread(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        ensure!(usize::try_from(n) == Ok(buf.len()), "short read of the log");
        Ok(buf)
    }

    /// Clears the log, as QEMU does when it syncs it.
    fn clear(&self) -> Result<()> {
        let zero = vec![0u8; self.len as usize];
        // SAFETY: pwrite from our own buffer to our own descriptor.
        let n = unsafe { libc::pwrite(self.fd.as_raw_fd(), zero.as_ptr().cast(), zero.len(), 0) };
        ensure!(
            usize::try_from(n) == Ok(zero.len()),
            "short write of the log"
        );
        Ok(())
    }

    /// Guest page numbers marked dirty.
    fn pages(&self) -> Result<BTreeSet<u64>> {
        let mut pages = BTreeSet::new();
        for (i, b) in self.bytes()?.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    pages.insert(i as u64 * 8 + bit);
                }
            }
        }
        Ok(pages)
    }
}

fn pages_of(addr: GuestAddress, len: u64) -> impl Iterator<Item = u64> {
    let first = addr.0 / PAGE;
    let last = (addr.0 + len.max(1) - 1) / PAGE;
    first..=last
}

/// A driver that negotiated LOG_SHMFD and RARP and acked every feature but LOG_ALL, as QEMU
/// runs a NIC before a migration.
fn migratable_driver(card: &Card) -> Result<VirtioNet> {
    let mut ctl = card.connect()?;
    let offer = ctl.handshake_with(migrating_protocol())?;
    ensure!(offer.features & LOG_ALL != 0, "VHOST_F_LOG_ALL not offered");
    ensure!(
        offer
            .protocol
            .contains(VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::RARP),
        "LOG_SHMFD and RARP not offered: {:?}",
        offer.protocol
    );
    let features = offer.features & !LOG_ALL;
    VirtioNet::start(ctl, features, &Options::for_features(features))
}

/// QEMU's vhost_dev_set_log: SET_FEATURES with or without LOG_ALL, then SET_VRING_ADDR with
/// or without VHOST_VRING_F_LOG for both rings; `log_addr` gives each ring's log address.
fn set_logging(dev: &mut VirtioNet, on: bool, log_addr: [u64; 2]) -> Result<()> {
    let features = dev.features | if on { LOG_ALL } else { 0 };
    dev.ctl.set_features(features)?;
    for (i, q) in [(RX, &dev.rx), (TX, &dev.tx)] {
        let mut c = q.config(&dev.mem)?;
        if on {
            c.flags = VRING_F_LOG;
            c.log_addr = Some(log_addr[i]);
        }
        dev.ctl.vu.set_vring_addr(i, &c).context("SET_VRING_ADDR")?;
    }
    Ok(())
}

/// One datagram each way: the card's frame lands in RX buffers, the host's leaves from TX.
/// Returns the guest memory the RX frame was written to.
fn one_each_way(card: &Card, dev: &mut VirtioNet, seed: u8) -> Result<Vec<(GuestAddress, u32)>> {
    // Card -> host: 3000 bytes of UDP (a frame over several pages).
    let frame = udp_frame(
        card.mac,
        HOST_MAC,
        SocketAddrV4::new(CARD_IP, 5555),
        SocketAddrV4::new(HOST_IP, 6000),
        &pattern(3000, seed),
    )?;
    card.ns.packet_socket(TAP)?.send(&frame)?;
    let got = dev.recv_matching(Duration::from_secs(5), |f| f.frame == frame)?;
    // Host -> card.
    card.check_host_to_card(dev, 7000 + u16::from(seed), seed)?;
    Ok(got.written)
}

#[test]
fn dirty_log_marks_exactly_what_the_card_wrote() -> Result<()> {
    let card = Card::start(&[])?;
    let mut dev = migratable_driver(&card)?;
    let log = Log::for_mem(&dev.mem)?;
    dev.ctl
        .vu
        .set_log_base(0, Some(log.region()))
        .context("SET_LOG_BASE")?;

    // Logging off (no LOG_ALL yet): traffic marks nothing.
    one_each_way(&card, &mut dev, 1)?;
    ensure!(
        log.pages()?.is_empty(),
        "pages marked with logging off: {:?}",
        log.pages()?
    );

    // Logging on. The RX ring is logged at its own address, the TX ring somewhere else
    // (log_guest_addr need not be the ring's address): its writes must be logged there.
    let tx_log = GUEST_BASE + dev.mem.size() - 16 * PAGE;
    let rx_log = dev.rx.used.0;
    set_logging(&mut dev, true, [rx_log, tx_log])?;
    log.clear()?;
    let written = one_each_way(&card, &mut dev, 2)?;
    // The pass that consumed the TX chain has ended once check_host_to_card saw the datagram
    // and the used entry; give the worker a moment to finish its notification.
    std::thread::sleep(Duration::from_millis(100));
    let mut expected: BTreeSet<u64> = written
        .iter()
        .flat_map(|&(a, n)| pages_of(a, u64::from(n)))
        .collect();
    expected.extend(pages_of(dev.rx.used, 6 + 8 * u64::from(dev.rx.size)));
    expected.extend(pages_of(
        GuestAddress(tx_log),
        6 + 8 * u64::from(dev.tx.size),
    ));
    let marked = log.pages()?;
    ensure!(
        marked == expected,
        "marked pages {marked:x?}, expected {expected:x?} (RX buffers {written:x?}, RX used \
         ring {:#x}, TX used ring logged at {tx_log:#x})",
        dev.rx.used.0
    );
    ensure!(
        !marked.contains(&(dev.tx.used.0 / PAGE)),
        "the TX used ring was logged at its own address, not at log_guest_addr"
    );

    // Logging off again (QEMU after a cancelled migration): nothing more is marked.
    set_logging(&mut dev, false, [0, 0])?;
    log.clear()?;
    one_each_way(&card, &mut dev, 3)?;
    ensure!(
        log.pages()?.is_empty(),
        "pages marked after logging stopped: {:?}",
        log.pages()?
    );
    Ok(())
}

/// Whether a raw SET_LOG_BASE was accepted: its reply is the log description back, or a
/// zero-sized one when refused.
fn set_log_base_raw(ctl: &mut Control, size: u64, offset: u64, fds: &[i32]) -> Result<bool> {
    let mut body = size.to_le_bytes().to_vec();
    body.extend_from_slice(&offset.to_le_bytes());
    let reply = ctl.raw_request_reply(REQ_SET_LOG_BASE, 0, &body, fds)?;
    ensure!(
        reply.len() == 16,
        "SET_LOG_BASE reply of {} bytes",
        reply.len()
    );
    Ok(reply == body)
}

#[test]
fn bad_log_requests_are_refused_and_the_session_goes_on() -> Result<()> {
    let card = Card::start(&[])?;

    // Without LOG_SHMFD negotiated the request solicits no reply of its own: REPLY_ACK
    // failure.
    let mut dev = card.driver()?;
    let log = Log::for_mem(&dev.mem)?;
    let mut body = log.len.to_le_bytes().to_vec();
    body.extend_from_slice(&0u64.to_le_bytes());
    let ack = dev
        .ctl
        .raw_request_fds(
            REQ_SET_LOG_BASE,
            FLAG_NEED_REPLY,
            &body,
            &[log.fd.as_raw_fd()],
        )?
        .context("no REPLY_ACK to SET_LOG_BASE")?;
    ensure!(ack != 0, "SET_LOG_BASE accepted without LOG_SHMFD");
    card.check_host_to_card(&mut dev, 7100, 1)?;
    drop(dev);

    let mut dev = migratable_driver(&card)?;
    let log = Log::for_mem(&dev.mem)?;
    // A log too small for the memory table (it covers 64 KiB of guest memory).
    ensure!(
        !set_log_base_raw(&mut dev.ctl, 2, 0, &[log.fd.as_raw_fd()])?,
        "a 2-byte log was accepted"
    );
    // Descriptors that cannot be mapped: a pipe, and a memfd shorter than the log.
    let (r, _w) = pipe()?;
    ensure!(!set_log_base_raw(
        &mut dev.ctl,
        log.len,
        0,
        &[r.as_raw_fd()]
    )?);
    let short = memfd(16)?;
    ensure!(!set_log_base_raw(
        &mut dev.ctl,
        log.len,
        0,
        &[short.as_raw_fd()]
    )?);
    // No descriptor at all.
    ensure!(!set_log_base_raw(&mut dev.ctl, log.len, 0, &[])?);
    // SET_LOG_FD without its descriptor.
    let ack = dev
        .ctl
        .raw_request_fds(REQ_SET_LOG_FD, FLAG_NEED_REPLY, &[], &[])?
        .context("no reply to SET_LOG_FD")?;
    ensure!(ack != 0, "SET_LOG_FD without a descriptor was accepted");
    // Used-ring logging without VHOST_F_LOG_ALL negotiated.
    let mut c = dev.tx.config(&dev.mem)?;
    c.flags = VRING_F_LOG;
    c.log_addr = Some(dev.tx.used.0);
    ensure!(
        dev.ctl.vu.set_vring_addr(TX, &c).is_err(),
        "VHOST_VRING_F_LOG accepted without VHOST_F_LOG_ALL"
    );
    // SEND_RARP with a multicast address.
    let ack = dev
        .ctl
        .raw_request(REQ_SEND_RARP, FLAG_NEED_REPLY, &[1, 0, 0, 0, 0, 0, 0, 0])?
        .context("no reply to SEND_RARP")?;
    ensure!(ack != 0, "SEND_RARP with a multicast MAC was accepted");

    // The session goes on: traffic both ways, and a good log is still taken.
    card.check_host_to_card(&mut dev, 7101, 2)?;
    card.check_card_to_host(&mut dev, 3)?;
    ensure!(set_log_base_raw(
        &mut dev.ctl,
        log.len,
        0,
        &[log.fd.as_raw_fd()]
    )?);
    let text = card.daemon.log();
    for why in [
        "VHOST_USER_PROTOCOL_F_LOG_SHMFD was not negotiated",
        "the memory table reaches",
        "cannot map the log area",
        "reaches past the end of its file",
        "expected the log's",
        "VHOST_F_LOG_ALL was not negotiated",
    ] {
        ensure!(text.contains(why), "no log line saying {why:?}:\n{text}");
    }
    Ok(())
}

#[test]
fn rings_stop_with_nothing_in_flight_and_restart_where_they_stopped() -> Result<()> {
    let card = Card::start(&[])?;
    let mut dev = migratable_driver(&card)?;
    for seed in 1..=4 {
        one_each_way(&card, &mut dev, seed)?;
    }
    // Frames keep arriving while the source stops: they stay in the tap or are dropped, never
    // half-delivered.
    let pkt = card.ns.packet_socket(TAP)?;
    for i in 0..32u8 {
        let frame = udp_frame(
            card.mac,
            HOST_MAC,
            SocketAddrV4::new(CARD_IP, 5555),
            SocketAddrV4::new(HOST_IP, 6001),
            &pattern(1000, i),
        )?;
        pkt.send(&frame)?;
    }
    let bases = dev.get_vring_bases()?;
    for (i, q) in [(RX, &dev.rx), (TX, &dev.tx)] {
        let used = q.used_idx(&dev.mem)?;
        ensure!(
            bases[i] == u32::from(used),
            "ring {i}: GET_VRING_BASE says {} chains were taken, the used index is {used}",
            bases[i]
        );
    }
    // What the destination does: SET_VRING_BASE with those, addresses, kick, call, enable.
    for (i, q) in [(RX, &dev.rx), (TX, &dev.tx)] {
        let base = u16::try_from(bases[i])?;
        dev.ctl
            .vu
            .set_vring_base(i, base)
            .context("SET_VRING_BASE")?;
        dev.ctl
            .vu
            .set_vring_addr(i, &q.config(&dev.mem)?)
            .context("SET_VRING_ADDR")?;
        dev.ctl
            .vu
            .set_vring_kick(i, &q.kick)
            .context("SET_VRING_KICK")?;
        dev.ctl
            .vu
            .set_vring_call(i, &q.call)
            .context("SET_VRING_CALL")?;
        dev.ctl
            .vu
            .set_vring_enable(i, true)
            .context("SET_VRING_ENABLE")?;
    }
    dev.rx.kick()?;
    // The guest's used_event says a notification for what is in the used ring already went out
    // (the previous backend sent it; it was lost on the way): a device that only follows
    // EVENT_IDX would never signal again. After a restart the first used buffer is signalled.
    let used = dev.rx.used_idx(&dev.mem)?;
    let used_event = dev.rx.avail.unchecked_add(4 + 2 * u64::from(dev.rx.size));
    dev.mem
        .write(used_event, &used.wrapping_sub(1).to_le_bytes())?;
    while dev.rx.call.read().is_ok() {}
    let frame = udp_frame(
        card.mac,
        HOST_MAC,
        SocketAddrV4::new(CARD_IP, 5555),
        SocketAddrV4::new(HOST_IP, 6002),
        &pattern(500, 99),
    )?;
    pkt.send(&frame)?;
    ensure!(
        poll_in(dev.rx.call.as_raw_fd(), Duration::from_secs(3))?,
        "no notification for the first frame after the rings restarted (used_event {})",
        used.wrapping_sub(1)
    );
    dev.recv_matching(Duration::from_secs(5), |f| f.frame == frame)?;
    // Traffic goes on from there, both ways.
    for seed in 10..=12 {
        one_each_way(&card, &mut dev, seed)?;
    }
    Ok(())
}

#[test]
fn send_rarp_announces_the_guest_on_the_tap() -> Result<()> {
    let mut card = Card::start(&[])?;
    let mut dev = migratable_driver(&card)?;
    let watch = card.ns.packet_listener(TAP, 0x8035)?;
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let mut body = mac.to_vec();
    body.extend_from_slice(&[0, 0]);
    let ack = dev
        .ctl
        .raw_request(REQ_SEND_RARP, FLAG_NEED_REPLY, &body)?
        .context("no reply to SEND_RARP")?;
    ensure!(ack == 0, "SEND_RARP refused ({ack})");
    let frame = watch
        .recv(Duration::from_secs(3))?
        .context("no RARP frame on the card's tap")?;
    ensure!(frame.len() >= 42, "RARP frame of {} bytes", frame.len());
    ensure!(frame[..6] == [0xff; 6], "not broadcast: {:x?}", &frame[..6]);
    ensure!(frame[6..12] == mac, "source {:x?}", &frame[6..12]);
    ensure!(
        frame[12..14] == [0x80, 0x35],
        "EtherType {:x?}",
        &frame[12..14]
    );
    ensure!(
        frame[20..22] == [0, 3],
        "RARP operation {:x?}",
        &frame[20..22]
    );
    ensure!(frame[22..28] == mac && frame[32..38] == mac);
    card.check_host_to_card(&mut dev, 7200, 1)?;
    card.daemon
        .wait_counters(Duration::from_secs(5), "rarp_sent=1", |c| {
            c.get("rarp_sent") >= 1
        })?;
    Ok(())
}
