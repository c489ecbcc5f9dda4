//! Live handover, the core of it (issue 12, `docs/handover.md`), in one process: a session the
//! harness's frontend sets up (on the first of two queue pairs) through a gate in front of one
//! backend instance; the gate pauses
//! at the stop point (rings stopped with GET_VRING_BASE, every request answered) and hands back
//! its record of the session with duplicated descriptors. The state blob and every descriptor
//! (memory, eventfds, the listening socket, the frontend's connection, the tap queues) go through
//! `handover::wire` on a socket pair, and the receiving side parses and checks the blob, its
//! device and each descriptor's kind.
//!
//! First the handover fails (the frontend's connection and the tap queue arrive swapped, and the
//! receiver refuses them) and the gate restarts the rings where they stopped, then 20 times more
//! without leaking a descriptor; then the session
//! is rebuilt in a second, fresh instance from what was received alone, by replaying
//! `handover::replay::rebuild` into its `vhost` crate handler; the old gate detaches and a new
//! gate resumes from the record on the received frontend connection. The frontend never
//! reconnects: traffic goes on both ways, the connection still answers, and a ring disabled and
//! enabled again after the handover behaves as the new gate must. No chain is completed twice
//! (the driver refuses a used head it did not post) or lost (used indices end at what was made
//! available).
//!
//! What this leaves to the daemon: the two ends in two processes (the control socket request,
//! starting the new binary, the two-phase commit).

use std::net::SocketAddrV4;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use card_tests::card::{self, Card, CARD_IP, HOST_IP, HOST_MAC, TAP};
use card_tests::frontend::Control;
use card_tests::netdev::{Options, TxLayout, VirtioNet, F_LOG_ALL};
use card_tests::packet::{pattern, udp_frame, VnetHdr};
use card_tests::TempDir;
use vhost::vhost_user::Listener;
use vhost::vhost_user::VhostUserFrontend;
use vhost_card::backend::{BackendConfig, CardBackend};
use vhost_card::gate::{Gate, GateConfig, Hooks};
use vhost_card::handover::pause::Paused;
use vhost_card::handover::record::Recorder;
use vhost_card::handover::state::{DeviceState, FdKind, SessionState, Sockets, MAGIC, VERSION};
use vhost_card::handover::{fdcheck, replay, wire};
use vhost_card::stats::{DeviceInfo, Stats};
use vhost_card::tap::{Tap, TapConfig};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

type Daemon = VhostUserDaemon<Arc<CardBackend>>;

const MTU: u16 = 65520;
/// Two queue pairs, of which the harness's driver uses the first: the second's tap queue is
/// detached when the session moves.
const PAIRS: usize = 2;
/// Pauses and restarts in a row before the handover.
const CYCLES: u16 = 20;

fn backend(tap: &Arc<Tap>) -> Result<Arc<CardBackend>> {
    let features = vhost_card::features::default_features();
    let stats = Arc::new(Stats::new(
        PAIRS,
        DeviceInfo {
            mtu: MTU,
            offered: features,
            transport: vhost_card::stats::VHOST_USER,
        },
    ));
    Ok(Arc::new(CardBackend::new(
        BackendConfig {
            pairs: PAIRS,
            queue_size: 1024,
            mtu: MTU,
            features,
            rx_csum: vhost_card::vnet::RxCsum::default(),
            link: None,
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

/// A gate between a frontend connection and a backend instance's handler, steering its tap
/// queues as the daemon does; with a record, a gate for a session taken over.
fn gate(
    frontend: UnixStream,
    handler: UnixStream,
    backend: &Arc<CardBackend>,
    record: Option<Recorder>,
) -> Result<Gate> {
    let steer = backend.clone();
    let cfg = GateConfig {
        mtu: MTU,
        num_queues: 2 * PAIRS as u32,
        queue_size: 1024,
    };
    let (announce, calls) = (backend.clone(), backend.clone());
    let hooks = || Hooks {
        pair: Box::new(move |pair, on| steer.pair_enabled(pair, on)),
        rarp: Box::new(move |mac| announce.send_rarp(mac)),
        record: None,
        ledger: None,
        call: Some(Box::new(move |ring, fd| calls.call_installed(ring, fd))),
    };
    Ok(match record {
        None => Gate::start(frontend, handler, cfg, hooks())?,
        Some(r) => Gate::resume(frontend, handler, cfg, hooks(), r)?,
    })
}

/// The state blob the old process sends and the descriptors that go with it: the gate's record
/// (memory, eventfds), then the listening socket, the frontend's connection and the tap queue.
fn handover_blob<'a>(
    paused: &'a Paused,
    old: &CardBackend,
    front: &'a std::os::unix::net::UnixListener,
    moving: &'a UnixStream,
    tap: &'a Tap,
) -> (SessionState, Vec<BorrowedFd<'a>>) {
    let n = paused.fds.len();
    let regions = paused.state.regions.len();
    let mut kinds = vec![FdKind::GuestMemory; regions];
    kinds.extend(vec![FdKind::EventFd; n - regions]);
    kinds.extend([FdKind::UnixListener, FdKind::UnixStream]);
    kinds.extend(vec![FdKind::TapQueue; PAIRS]);
    let blob = SessionState {
        magic: MAGIC.into(),
        version: VERSION,
        sender: "test".into(),
        device: DeviceState {
            tap: TAP.into(),
            pairs: PAIRS as u16,
            queue_size: 1024,
            mtu: MTU,
            features: vhost_card::features::default_features(),
        },
        fds: kinds,
        sockets: Sockets {
            listener: n,
            frontend: Some(n + 1),
            control: None,
            metrics: None,
        },
        taps: (n + 2..n + 2 + PAIRS).collect(),
        tap_created: true,
        session: Some(paused.state.clone()),
        held: Vec::new(),
        counters: old.stats().snapshot(),
    };
    let mut sent: Vec<BorrowedFd> = paused.fds.iter().map(|f| f.as_fd()).collect();
    sent.extend([front.as_fd(), moving.as_fd()]);
    // SAFETY: the tap's queues stay open while `tap`, borrowed for as long, lives.
    sent.extend((0..PAIRS).map(|i| unsafe { BorrowedFd::borrow_raw(tap.queue_fd(i)) }));
    (blob, sent)
}

#[test]
fn a_session_moves_to_a_fresh_backend_and_traffic_goes_on() -> Result<()> {
    let ns = Card::namespace()?;
    let tap = Arc::new(Tap::open(&TapConfig {
        name: TAP.into(),
        netns: Some(ns.name().into()),
        mtu: MTU,
        mac: None,
        queues: PAIRS,
        tun: false,
    })?);
    let mac = card::address(&ns)?;
    let dir = TempDir::new("handover")?;

    // The old instance behind its gate, and a session set up through it by the harness as QEMU
    // would.
    let front = std::os::unix::net::UnixListener::bind(dir.path().join("card.sock"))?;
    let ctl = Control::connect(&dir.path().join("card.sock"))?;
    let (frontend, _) = front.accept()?;
    let moving = frontend.try_clone()?;
    let old = backend(&tap)?;
    let (old_daemon, handler) = serve(&old, &dir.path().join("old.sock"), |p| {
        Ok(UnixStream::connect(p)?)
    })?;
    let old_gate = gate(frontend, handler, &old, None)?;
    let mut ctl = ctl;
    let offer = ctl.handshake()?;
    // As QEMU: the dirty log only while migrating (a handover is refused then).
    let acked = offer.features & !F_LOG_ALL;
    let mut dev = VirtioNet::start(ctl, acked, &Options::for_features(acked))?;
    host_to_card(&ns, mac, &mut dev, 3)?;
    card_to_host(&ns, mac, &mut dev, 2)?;

    // A handover that fails: paused at the stop point, then restarted where it stopped.
    let paused = old_gate
        .pause(Duration::from_secs(5))
        .map_err(|e| anyhow!(e))?;
    let used = [dev.rx.used_idx(&dev.mem)?, dev.tx.used_idx(&dev.mem)?];
    let bases = [paused.state.rings[0].base, paused.state.rings[1].base];
    ensure!(
        bases == used,
        "stopped at next available {bases:?} but used {used:?}: chains in flight"
    );
    ensure!(bases[1] == 3, "TX stopped at {} after 3 frames", bases[1]);
    // The new side refuses what it got: the frontend's connection and the tap queue swapped.
    let (blob, mut sent) = handover_blob(&paused, &old, &front, &moving, &tap);
    let n = paused.fds.len();
    sent.swap(n + 1, n + 2);
    let (old_end, new_end) = UnixStream::pair()?;
    wire::send(&old_end, &blob.to_json(), &sent)?;
    let (payload, got) = wire::recv(&new_end)?;
    let why = fdcheck::check_all(&SessionState::parse(&payload)?, &got)
        .expect_err("a tap queue was taken for the frontend's connection")
        .to_string();
    ensure!(why.contains("not a socket"), "refused for: {why}");
    drop(got);
    paused.restart();
    host_to_card(&ns, mac, &mut dev, 4)?;
    card_to_host(&ns, mac, &mut dev, 3)?;
    dev.ping()?;

    // Paused and restarted again and again, a frame each way in between: nothing leaks (the
    // test process holds the same descriptors) and nothing is completed twice or lost.
    let fds_before = std::fs::read_dir("/proc/self/fd")?.count();
    for _ in 0..CYCLES {
        let paused = old_gate
            .pause(Duration::from_secs(5))
            .map_err(|e| anyhow!(e))?;
        let used = [dev.rx.used_idx(&dev.mem)?, dev.tx.used_idx(&dev.mem)?];
        let bases = [paused.state.rings[0].base, paused.state.rings[1].base];
        ensure!(bases == used, "stopped at {bases:?} but used {used:?}");
        paused.restart();
        host_to_card(&ns, mac, &mut dev, 1)?;
        card_to_host(&ns, mac, &mut dev, 1)?;
    }
    let fds_after = std::fs::read_dir("/proc/self/fd")?.count();
    ensure!(
        fds_after == fds_before,
        "{fds_before} descriptors before {CYCLES} pauses, {fds_after} after"
    );

    // The handover: paused again, the session rebuilt in a new instance from the gate's record
    // and its duplicated descriptors alone, the old gate detached.
    let paused = old_gate
        .pause(Duration::from_secs(5))
        .map_err(|e| anyhow!(e))?;
    ensure!(
        paused.state.rings[1].base == 7 + CYCLES,
        "TX stopped at {}",
        paused.state.rings[1].base
    );
    // What the old process sends: the state blob with every descriptor, over a socket pair
    // here (the control socket between two processes in the daemon).
    let (blob, sent) = handover_blob(&paused, &old, &front, &moving, &tap);
    let device = blob.device.clone();
    let n = paused.fds.len();
    let (old_end, new_end) = UnixStream::pair()?;
    wire::send(&old_end, &blob.to_json(), &sent)?;
    drop(moving);

    // What the new process does with it: parse and check the blob, its device against its own,
    // every descriptor's kind; then rebuild the session from that alone.
    let (payload, got) = wire::recv(&new_end)?;
    let received = SessionState::parse(&payload)?;
    received.check_device(&device)?;
    fdcheck::check_all(&received, &got)?;
    let state = received.session.clone().context("no session in the blob")?;
    // The new instance's tap is the received queue, not one it opens.
    let queues = received
        .taps
        .iter()
        .map(|&i| got[i].try_clone())
        .collect::<std::io::Result<Vec<_>>>()?;
    ensure!(
        Tap::adopt(TAP, vec![got[0].try_clone()?], false).is_err(),
        "a memory file was adopted as a tap queue"
    );
    // Not `received.tap_created`: the test's own `tap` removes the device at the end.
    let adopted = Arc::new(Tap::adopt(&received.device.tap, queues, false)?);
    ensure!(
        adopted.queue_attached(0) && !adopted.queue_attached(1),
        "the adopted tap does not know pair 1's queue is detached"
    );
    let new = backend(&adopted)?;
    new.stats().carry_over(&received.counters);
    let fds: Vec<BorrowedFd> = got.iter().map(|f| f.as_fd()).collect();
    let (new_daemon, handler) = serve(&new, &dir.path().join("new.sock"), |p| {
        Ok(UnixStream::connect(p)?)
    })?;
    handler.set_read_timeout(Some(Duration::from_secs(5)))?;
    let answers = replay::send(&handler, &replay::rebuild(&state), &fds)?;
    ensure!(answers.len() == 3, "answers: {answers:?}");
    handler.set_read_timeout(None)?;
    paused.detach();
    // The new gate takes the same frontend connection with the record; the old instance goes
    // away.
    let frontend = UnixStream::from(got[n + 1].try_clone()?);
    let new_gate = gate(
        frontend,
        handler,
        &new,
        Some(Recorder::restore(&state, &fds)?),
    )?;
    ensure!(
        new.stats().snapshot().state.pairs_in_use == 1,
        "the new gate did not tell the backend the pair is in use"
    );
    old_gate.join();
    stop(old_daemon);

    // Traffic goes on where it stopped, through the new instance only, on the same connection.
    host_to_card(&ns, mac, &mut dev, 5)?;
    card_to_host(&ns, mac, &mut dev, 4)?;
    dev.ping()?;
    // The new gate knows PROTOCOL_FEATURES was acked: SET_VRING_ENABLE goes to the handler (a
    // gate that thought features were not set yet would hold it and RX would go on).
    dev.ctl.vu.set_vring_enable(0, false)?;
    let pkt = ns.packet_socket(TAP)?;
    let late = udp_frame(
        mac,
        HOST_MAC,
        SocketAddrV4::new(CARD_IP, 5555),
        SocketAddrV4::new(HOST_IP, 6999),
        &pattern(100, 9),
    )?;
    pkt.send(&late)?;
    ensure!(
        dev.recv(Duration::from_millis(300)).is_err(),
        "a frame reached a disabled RX ring"
    );
    dev.ctl.vu.set_vring_enable(0, true)?;
    dev.rx.kick()?;
    dev.recv_matching(Duration::from_secs(5), |f| f.frame == late)?;
    let tx_used = dev.tx.used_idx(&dev.mem)?;
    ensure!(
        tx_used == 12 + CYCLES,
        "TX used index {tx_used} after {} frames",
        12 + CYCLES
    );
    // The counters go on from the old instance's. A pass adds its counts when it ends, a moment
    // after the guest may have seen the last used buffer: wait for them.
    let before = u64::from(CYCLES);
    let want = (12 + before, 10 + before);
    let count = |name: &str| {
        new.stats().pairs[0]
            .snapshot()
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut got = (count("tx_frames"), count("rx_frames"));
    while got != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        got = (count("tx_frames"), count("rx_frames"));
    }
    ensure!(
        got == want,
        "the new instance counts {} TX and {} RX frames, expected {} and {}",
        got.0,
        got.1,
        want.0,
        want.1
    );

    // A replay the handler refuses (a ring larger than the queue size) ends that session with
    // an error naming the request.
    let mut bad = state;
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
    new_gate.join();
    stop(new_daemon);
    Ok(())
}
