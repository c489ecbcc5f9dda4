//! `VhostUserBackend` for the card: feature and protocol offer, per-pair worker state, and the
//! event dispatch that drives the data path. One worker thread per queue pair (RX queue `2i`,
//! TX queue `2i + 1`), each also watching its tap queue.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex, RwLock};

use log::{debug, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::datapath::{signal_call, tap_offload, Pair, PairConfig, Pass};
use crate::dirtylog;
use crate::features::{self, Negotiated, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES};
use crate::interrupt::Interrupt;
use crate::stats::{add, Stats};
use crate::tap::Tap;

/// What the backend serves, fixed for the life of the daemon.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub pairs: usize,
    pub queue_size: usize,
    pub mtu: u16,
    /// The virtio feature word offered (without the vhost-user protocol bit).
    pub features: u64,
    /// What the card does about checksums of frames going up (`--rx-csum`).
    pub rx_csum: crate::vnet::RxCsum,
    /// The IP-only link's state (`--link ip`), shared by the queue pairs; `None` on Ethernet.
    pub link: Option<Arc<crate::link::IpLink>>,
}

/// The protocol features this daemon handles: MQ (several queue pairs), REPLY_ACK (answered by
/// the `vhost` crate), and NET_MTU, LOG_SHMFD (live migration's dirty log) and RARP (the
/// announcement after a migration), answered by the gate in front of it (see `gate.rs`).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::RARP
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MTU
}

struct Worker {
    pair: Mutex<Pair>,
    /// Written when a pass ends with work left, so the worker comes back after other events.
    wake: (EventConsumer, EventNotifier),
    /// The worker thread's exit event, the same eventfd for every session (see `exit_event`).
    exit: (EventConsumer, EventNotifier),
}

/// Called once when the card's end of the link is gone for good.
pub type FatalHook = Box<dyn Fn(String) + Send + Sync>;

/// The card's vhost-user backend.
pub struct CardBackend {
    cfg: BackendConfig,
    fatal: FatalHook,
    tap: Arc<Tap>,
    workers: Vec<Worker>,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    stats: Arc<Stats>,
}

impl CardBackend {
    pub fn new(
        cfg: BackendConfig,
        tap: Arc<Tap>,
        stats: Arc<Stats>,
        fatal: FatalHook,
    ) -> io::Result<Self> {
        let mut workers = Vec::with_capacity(cfg.pairs);
        for i in 0..cfg.pairs {
            workers.push(Worker {
                pair: Mutex::new(Pair::new(
                    tap.queue_fd(i),
                    &PairConfig {
                        mtu: usize::from(cfg.mtu),
                        rx_csum: cfg.rx_csum,
                        queue_size: cfg.queue_size,
                        link: cfg.link.clone(),
                    },
                )),
                wake: new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?,
                exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?,
            });
        }
        Ok(CardBackend {
            cfg,
            fatal,
            tap,
            workers,
            mem: RwLock::new(None),
            stats,
        })
    }

    /// Event id of the tap queue in each worker's epoll set.
    pub fn tap_event(&self) -> u16 {
        (self.num_queues() + 1) as u16
    }

    /// Event id of the worker's re-arm eventfd.
    pub fn wake_event(&self) -> u16 {
        (self.num_queues() + 2) as u16
    }

    /// Descriptors a worker must watch besides its vrings: (fd, events, id).
    pub fn extra_listeners(&self, worker: usize) -> Vec<(i32, EventSet, u64)> {
        vec![
            (
                self.tap.queue_fd(worker),
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                u64::from(self.tap_event()),
            ),
            (
                self.workers[worker].wake.0.as_raw_fd(),
                EventSet::IN,
                u64::from(self.wake_event()),
            ),
        ]
    }

    /// Forgets the state of the last frontend connection.
    pub fn reset_connection(&self) {
        for (w, stats) in self.workers.iter().zip(&self.stats.pairs) {
            w.pair
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .reset(stats);
        }
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = None;
        dirtylog::LOG.reset();
        let _ = self.tap.set_offload(0);
        self.tap.attach_all();
    }

    /// Closes every worker's TX io_uring as the daemon exits (their writes fall back to
    /// `writev`): a ring's file table holds the tap's queue, and the threads that may outlive the
    /// serve loop keep the backend, so the tap would otherwise go only when the kernel tears the
    /// rings down, some time after the process ends.
    pub fn release_tx_rings(&self) {
        for w in &self.workers {
            w.pair
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drop_tx_ring();
        }
    }

    /// Each pair's frame held for the host's buffers, taken out for a handover (its rings are
    /// stopped, so no worker holds another meanwhile).
    pub fn take_held(&self) -> Vec<Option<Vec<u8>>> {
        self.workers
            .iter()
            .map(|w| w.pair.lock().unwrap_or_else(|p| p.into_inner()).take_held())
            .collect()
    }

    /// Holds `frame` for pair `pair`'s host buffers (a frame a handover carried, or one put
    /// back after a refused handover).
    pub fn hold(&self, pair: usize, frame: &[u8]) -> bool {
        self.workers
            .get(pair)
            .is_some_and(|w| w.pair.lock().unwrap_or_else(|p| p.into_inner()).hold(frame))
    }

    /// Called by the gate with whether the frontend uses queue pair `pair`: the pair's tap
    /// queue follows (see `Tap::set_pair_enabled`).
    pub fn pair_enabled(&self, pair: usize, enabled: bool) {
        self.stats.set_in_use(pair, enabled);
        self.tap.set_pair_enabled(pair, enabled);
        if enabled {
            if let Some(w) = self.workers.get(pair) {
                w.pair
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .rings_started();
            }
        }
    }

    /// Called by the gate once the handler holds ring `ring`'s new call eventfd `call`
    /// (`SET_VRING_CALL` on a started ring): a signal the ring owed since it had none goes out,
    /// written after the pair's lock is released (the descriptor is the frontend's).
    pub fn call_installed(&self, ring: usize, call: RawFd) {
        let (pair, q) = (ring / 2, ring % 2);
        let (Some(w), Some(stats)) = (self.workers.get(pair), self.stats.pairs.get(pair)) else {
            return;
        };
        let owed = w
            .pair
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_owed(q);
        if !owed {
            return;
        }
        if signal_call(call, stats) {
            debug!("ring {ring}: signalled what was used before its call eventfd came");
        }
    }

    /// Ring `ring` was started without a call eventfd in a session taken over (a handover or a
    /// crash between the frontend's SET_VRING_KICK and SET_VRING_CALL): the process before may
    /// have owed a signal it could not send, so the call, when it comes, gets one (at worst a
    /// spurious interrupt).
    pub fn owe_call(&self, ring: usize) {
        if let Some(w) = self.workers.get(ring / 2) {
            w.pair
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .owe(ring % 2);
        }
    }

    /// `VHOST_USER_SEND_RARP`: announces the guest's MAC to the card's network after a live
    /// migration (for a guest without GUEST_ANNOUNCE), as QEMU's own announcement does: a RARP
    /// "reverse request" from `mac` to everyone, written into the tap, so the card's switch or
    /// bridge learns the port behind which the guest now lives.
    pub fn send_rarp(&self, mac: [u8; 6]) -> io::Result<()> {
        self.tap.inject(&crate::announce::rarp_frame(mac))?;
        add(&self.stats.pairs[0].rarp_sent, 1);
        Ok(())
    }

    /// Gives queue pair `pair` its own way to signal the driver (RX, TX), for a transport without
    /// call eventfds (VDUSE).
    pub fn set_interrupts(&self, pair: usize, irq: [Option<Arc<dyn Interrupt>>; 2]) {
        if let Some(w) = self.workers.get(pair) {
            w.pair.lock().unwrap_or_else(|p| p.into_inner()).irq = irq;
        }
    }

    /// Reports a vanished tap once per event; the daemon then stops with that message.
    fn tap_is_gone(&self, pair: &Pair) -> bool {
        if pair.tap_gone {
            (self.fatal)(format!(
                "tap {} was deleted (or its namespace went away) under the daemon",
                self.tap.name()
            ));
        }
        pair.tap_gone
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
}

impl VhostUserBackend for CardBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.cfg.pairs * 2
    }

    fn max_queue_size(&self) -> usize {
        self.cfg.queue_size
    }

    fn features(&self) -> u64 {
        self.cfg.features | 1 << VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn acked_features(&self, word: u64) {
        let neg = Negotiated::from_word(word);
        self.stats.set_acked(word);
        info!(
            "frontend acked features {:#x}: {}",
            word,
            features::names(word).join(" ")
        );
        dirtylog::LOG.set_log_all(word & 1 << VHOST_F_LOG_ALL != 0);
        let hdr_len = if neg.hdr_len() == 12 { 12 } else { 10 };
        if let Err(e) = self.tap.set_vnet_hdr_len(hdr_len) {
            warn!("cannot set the tap's vnet header length to {hdr_len}: {e}");
        }
        let offload = tap_offload(&neg, self.cfg.rx_csum);
        if let Err(e) = self.tap.set_offload(offload) {
            warn!("cannot set tap offloads {offload:#x}: {e}; the card's kernel will segment and checksum instead");
            let _ = self.tap.set_offload(0);
        }
        for w in &self.workers {
            w.pair.lock().unwrap_or_else(|p| p.into_inner()).neg = neg;
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The queues apply EVENT_IDX themselves (`VringT::set_queue_event_idx`).
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        dirtylog::LOG.set_memory(&mem.memory());
        for region in mem.memory().iter() {
            if let Ok(p) = region.get_host_address(MemoryRegionAddress(0)) {
                crate::memguard::register(p as usize, region.len() as usize);
            }
        }
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.cfg.pairs).map(|i| 0b11u64 << (2 * i)).collect()
    }

    /// The crate asks for this once per worker and session. It takes the consumer's descriptor
    /// with `into_raw_fd()` into the worker's epoll set and never closes it (vhost-user-backend
    /// 0.24, `VringEpollHandler::new`): a fresh eventfd per session leaked one descriptor per
    /// queue pair and reconnect. So every session gets the worker's own eventfd, which lives as
    /// long as the daemon; the notifier is a duplicate the crate owns and closes.
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = &self.workers.get(thread_index)?.exit;
        // The crate never reads the exit event: the last session's stop request is still
        // pending and would end the new worker at once. The eventfd is non-blocking.
        while consumer.consume().is_ok() {}
        let notifier = notifier.try_clone().ok()?;
        // SAFETY: the descriptor is open (owned by `self.workers`, which outlives every session)
        // and the crate only turns this value back into a raw descriptor without closing it
        // (see above), so it is never closed twice; nothing else reads it.
        let consumer = unsafe { EventConsumer::from_raw_fd(consumer.as_raw_fd()) };
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(worker) = self.workers.get(thread_id) else {
            return Ok(());
        };
        let mut pair = worker.pair.lock().unwrap_or_else(|p| p.into_inner());
        let stats = &self.stats.pairs[thread_id];
        match device_event {
            0 => add(&stats.rx_kicks, 1),
            1 => add(&stats.tx_kicks, 1),
            e if e == self.tap_event() => {
                if evset.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    // A tun queue polls as an error once its device is unregistered.
                    pair.tap_gone = true;
                }
                if evset.contains(EventSet::IN) {
                    pair.rx_pending = true;
                }
                if evset.contains(EventSet::OUT) {
                    pair.tx_blocked = false;
                }
            }
            e if e == self.wake_event() => {
                let _ = worker.wake.0.consume();
            }
            _ => return Ok(()),
        }
        if self.tap_is_gone(&pair) {
            return Ok(());
        }
        let Some(atomic) = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Ok(());
        };
        let mut more = false;
        {
            let mut tx = tx.get_mut();
            if tx.get_queue().ready() && tx.is_enabled() {
                more |= pair.process_tx(&mut tx, &mem, stats) == Pass::More;
            }
        }
        {
            let mut rx = rx.get_mut();
            if rx.get_queue().ready() && rx.is_enabled() {
                more |= pair.process_rx(&mut rx, &mem, stats) == Pass::More;
            }
        }
        if self.tap_is_gone(&pair) {
            return Ok(());
        }
        if more {
            let _ = worker.wake.1.notify();
        }
        Ok(())
    }
}
