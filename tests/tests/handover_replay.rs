//! Live handover, the core of it (issue 12, `docs/handover.md`): a session set up by the
//! harness's frontend with one backend instance is stopped at the vhost-user stop point
//! (GET_VRING_BASE on each ring, as the old process's gate will send it), recorded as a
//! `handover::state::ProtocolState`, and rebuilt in a second, fresh backend instance by replaying
//! `handover::replay::rebuild` into its `vhost` crate handler, with duplicates of the same memory
//! file, kick and call eventfds and the same tap queue. The frontend never reconnects: the
//! driver keeps its rings and memory, and traffic goes on in both directions through the second
//! instance. No chain is completed twice (the driver refuses a used head it did not post) or
//! lost (every used index ends equal to what was made available).
//!
//! Both instances run in this process (the crate's daemon, the card's backend and data path, the
//! tap in a namespace of the test's own); the parts that move state between two processes
//! (the gate's recording, `handover::wire`) are tested on their own.

use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use card_tests::card::{self, Card, CARD_IP, HOST_IP, HOST_MAC, TAP};
use card_tests::frontend::Control;
use card_tests::netdev::{Options, TxLayout, VirtioNet};
use card_tests::packet::{pattern, udp_frame, VnetHdr};
use card_tests::TempDir;
use vhost::vhost_user::Listener;
use vhost_card::backend::{BackendConfig, CardBackend};
use vhost_card::handover::replay;
use vhost_card::handover::state::{ProtocolState, RegionState, RingAddr, RingState};
use vhost_card::stats::{DeviceInfo, Stats};
use vhost_card::tap::{Tap, TapConfig};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

type Daemon = VhostUserDaemon<Arc<CardBackend>>;

const MTU: u16 = 65520;

fn backend(tap: &Arc<Tap>) -> Result<Arc<CardBackend>> {
    let features = vhost_card::features::default_features();
    let stats = Arc::new(Stats::new(
        1,
        DeviceInfo {
            mtu: MTU,
            offered: features,
            transport: vhost_card::stats::VHOST_USER,
        },
    ));
    Ok(Arc::new(CardBackend::new(
        BackendConfig {
            pairs: 1,
            queue_size: 1024,
            mtu: MTU,
            features,
            rx_verify: false,
        },
        tap.clone(),
        stats,
        Box::new(|why| panic!("backend failed: {why}")),
    )?))
}

/// A backend instance serving one connection accepted on `path`; `connect` makes that
/// connection (before the daemon accepts it: the listener is already bound).
fn serve<T>(
    backend: &Arc<CardBackend>,
    path: &Path,
    connect: impl FnOnce(&Path) -> Result<T>,
) -> Result<(Daemon, T)> {
    let mut listener = Listener::new(path, true).map_err(|e| anyhow!("listener: {e}"))?;
    let mut daemon = VhostUserDaemon::new(
        "handover-test".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| anyhow!("daemon: {e}"))?;
    for (i, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        for (fd, ev, id) in backend.extra_listeners(i) {
            handler.register_listener(fd, ev, id)?;
        }
    }
    let peer = connect(path)?;
    daemon
        .start(&mut listener)
        .map_err(|e| anyhow!("start: {e}"))?;
    Ok((daemon, peer))
}

/// An eventfd of the driver's, borrowed for as long as the driver holds it.
fn borrow(fd: &impl AsRawFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor stays open while `fd`, which owns it, is borrowed.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

fn stop(mut daemon: Daemon) {
    daemon.request_shutdown();
    let _ = daemon.wait();
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
}

fn host_to_card(
    ns: &card_tests::netns::Netns,
    mac: [u8; 6],
    dev: &mut VirtioNet,
    n: u8,
) -> Result<()> {
    let port = 7600 + u16::from(n);
    let sock = ns.udp_socket(SocketAddrV4::new(CARD_IP, port))?;
    for seed in 0..n {
        let payload = pattern(200 + usize::from(seed), seed);
        let frame = udp_frame(
            HOST_MAC,
            mac,
            SocketAddrV4::new(HOST_IP, 40000),
            SocketAddrV4::new(CARD_IP, port),
            &payload,
        )?;
        dev.send_wait(&VnetHdr::default(), &frame, &TxLayout::Split)?;
        let mut buf = [0u8; 2048];
        let (len, _) = sock
            .recv_from(&mut buf)
            .context("nothing reached the card")?;
        ensure!(buf[..len] == payload[..], "payload {seed} corrupted");
    }
    Ok(())
}

fn card_to_host(
    ns: &card_tests::netns::Netns,
    mac: [u8; 6],
    dev: &mut VirtioNet,
    n: u8,
) -> Result<()> {
    let pkt = ns.packet_socket(TAP)?;
    for seed in 0..n {
        let frame = udp_frame(
            mac,
            HOST_MAC,
            SocketAddrV4::new(CARD_IP, 5555),
            SocketAddrV4::new(HOST_IP, 6000 + u16::from(seed)),
            &pattern(300, seed),
        )?;
        pkt.send(&frame)?;
        dev.recv_matching(Duration::from_secs(5), |f| f.frame == frame)?;
    }
    Ok(())
}

/// What the old process's gate will have recorded for this session.
fn recorded(dev: &VirtioNet, acked_protocol: u64, bases: [u32; 2]) -> Result<ProtocolState> {
    let region = dev.mem.region_info()?;
    let mut rings = Vec::new();
    for (i, q) in [&dev.rx, &dev.tx].into_iter().enumerate() {
        let c = q.config(&dev.mem)?;
        rings.push(RingState {
            num: Some(q.size),
            addr: Some(RingAddr {
                flags: 0,
                desc: c.desc_table_addr,
                used: c.used_ring_addr,
                avail: c.avail_ring_addr,
                log: 0,
            }),
            base: u16::try_from(bases[i])?,
            started: true,
            enabled: true,
            // Descriptors: 0 the memory file, then kick and call of each ring.
            kick: Some(1 + 2 * i),
            call: Some(2 + 2 * i),
            err: None,
        });
    }
    Ok(ProtocolState {
        owner: true,
        features: Some(dev.features),
        protocol_features: Some(acked_protocol),
        mtu: None,
        held_enables: Vec::new(),
        regions: vec![RegionState {
            guest_phys_addr: region.guest_phys_addr,
            memory_size: region.memory_size,
            userspace_addr: region.userspace_addr,
            mmap_offset: region.mmap_offset,
            fd: 0,
        }],
        rings,
    })
}

#[test]
fn a_session_moves_to_a_fresh_backend_and_traffic_goes_on() -> Result<()> {
    let ns = Card::namespace()?;
    let tap = Arc::new(Tap::open(&TapConfig {
        name: TAP.into(),
        netns: Some(ns.name().into()),
        mtu: MTU,
        mac: None,
        queues: 1,
    })?);
    let mac = card::address(&ns)?;
    let dir = TempDir::new("handover")?;

    // The old instance, and a session set up by the harness as QEMU would.
    let old = backend(&tap)?;
    let (old_daemon, mut ctl) = serve(&old, &dir.path().join("old.sock"), Control::connect)?;
    let offer = ctl.handshake()?;
    let mut dev = VirtioNet::start(ctl, offer.features, &Options::for_features(offer.features))?;
    for i in 0..2 {
        old.pair_enabled(0, true);
        host_to_card(&ns, mac, &mut dev, 3 + i)?;
        card_to_host(&ns, mac, &mut dev, 2 + i)?;
    }

    // The stop point: GET_VRING_BASE on each ring. Nothing in flight: each next available index
    // equals the used index published in guest memory.
    let bases = dev.get_vring_bases()?;
    let used = [dev.rx.used_idx(&dev.mem)?, dev.tx.used_idx(&dev.mem)?];
    ensure!(
        bases == used.map(u32::from),
        "stopped at next available {bases:?} but used {used:?}: chains in flight"
    );
    ensure!(bases[1] == 7, "TX stopped at {} after 7 frames", bases[1]);
    let state = recorded(&dev, offer.acked_protocol.bits(), bases)?;

    // The new instance, rebuilt from the state alone with duplicates of the same descriptors.
    let new = backend(&tap)?;
    let (new_daemon, sock) = serve(&new, &dir.path().join("new.sock"), |p| {
        Ok(UnixStream::connect(p)?)
    })?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    // Duplicates, as SCM_RIGHTS would give the new process.
    let owned = [
        dev.mem.file().as_fd().try_clone_to_owned()?,
        borrow(&dev.rx.kick).try_clone_to_owned()?,
        borrow(&dev.rx.call).try_clone_to_owned()?,
        borrow(&dev.tx.kick).try_clone_to_owned()?,
        borrow(&dev.tx.call).try_clone_to_owned()?,
    ];
    let fds: Vec<BorrowedFd> = owned.iter().map(|f| f.as_fd()).collect();
    let answers = replay::send(&sock, &replay::rebuild(&state), &fds)?;
    ensure!(answers.len() == 3, "answers: {answers:?}");
    new.pair_enabled(0, true);
    // The old instance is gone for good, as the old process will be.
    stop(old_daemon);

    // Traffic goes on where it stopped, through the new instance only.
    host_to_card(&ns, mac, &mut dev, 5)?;
    card_to_host(&ns, mac, &mut dev, 4)?;
    let tx_used = dev.tx.used_idx(&dev.mem)?;
    ensure!(tx_used == 12, "TX used index {tx_used} after 12 frames");
    let new_stats = new.stats().pairs[0].snapshot();
    let count = |name: &str| {
        new_stats
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    };
    ensure!(
        count("tx_frames") == 5 && count("rx_frames") == 4,
        "the new instance moved {} TX and {} RX frames, expected 5 and 4",
        count("tx_frames"),
        count("rx_frames")
    );

    // A replay the handler refuses (a ring larger than the queue size) ends that session with
    // an error naming the request.
    let mut bad = state.clone();
    bad.rings[0].num = Some(4096);
    let refused = backend(&tap)?;
    let (refused_daemon, sock) = serve(&refused, &dir.path().join("bad.sock"), |p| {
        Ok(UnixStream::connect(p)?)
    })?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let err = replay::send(&sock, &replay::rebuild(&bad), &fds)
        .expect_err("a ring beyond the queue size was taken");
    ensure!(
        matches!(err, replay::ReplayError::Ended { .. }),
        "unexpected error: {err}"
    );
    stop(refused_daemon);
    stop(new_daemon);
    Ok(())
}
