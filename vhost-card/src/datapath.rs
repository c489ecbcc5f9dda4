//! The per-queue-pair data path: TX (host to card) and RX (card to host) between a pair of
//! virtqueues and one tap queue.
//!
//! * TX: a descriptor chain becomes an iovec array over guest memory; the vnet header is copied
//!   out once, checked (`vnet::check_tx`) and written to the tap with the frame in one `writev`.
//!   Up to [`TX_BATCH`] frames go to the kernel in one `io_uring_enter` when the worker has an
//!   io_uring (see [`preopen_tx_rings`]); one `writev` system call per frame otherwise.
//! * RX: enough host buffers for the largest possible frame become one iovec array and the tap is
//!   read straight into them with one `readv`; with MRG_RXBUF one frame may fill several buffers.
//!   The header the kernel wrote is then fixed up in place (flags, checksum verification or
//!   completion, `num_buffers`) and the frame counted by how it went up (`rxmark`). A frame
//!   that may be an IP fragment is offered to the reassembly table (`reasm`) instead of going
//!   up; whole datagrams and the card's own answers wait in `local` and go up through the
//!   bounce buffer.
//! * The IP-only link (`link`): TX strips the Ethernet header by starting the iovecs 14 bytes
//!   later (ARP and ND are answered instead of written); RX reads the tun into the guest's
//!   buffers after room for the Ethernet header, then writes it there.
//!
//! Every guest-controlled value is checked; a bad chain is returned to the guest with length 0 and
//! counted, and the worker keeps serving.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, warn};
use vhost_user_backend::VringState;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::csum::{self, Verdict};
use crate::dirtylog::{LoggedMem, LOG};
use crate::features::Negotiated;
use crate::interrupt::Interrupt;
use crate::iov::{self, Access, ChainError, IovBuf, IOV_MAX};
use crate::link::{self, Ignored, IpLink, Proto, TxClass};
use crate::localq::LocalFrames;
use crate::poll::signal_eventfd;
use crate::reasm::{self, Discard, Outcome, Reassembler};
use crate::rxmark::{Mark, Unmarked};
use crate::stats::{add, PairStats};
use crate::used::Used;
use crate::vnet::{
    self, RxAction, RxCsum, TxDrop, VnetHdr, ETH_HLEN, GSO_MAX_FRAME, HDR_MAX, VLAN_HLEN,
};

type Mem = GuestMemoryMmap;
type State = VringState<GuestMemoryAtomic<Mem>>;

/// Bytes of an IP packet from the card's kernel read to choose its Ethernet header.
const IP_PEEK: usize = 40;

/// Frames handled per queue per wake-up before yielding to the other events of the worker.
pub const BUDGET: usize = 256;

/// Bytes of a frame, after its header, whose cache lines are asked for as its chain is
/// collected (see [`iov::prefetch_iovs`]): a TX frame's to be read, an RX buffer's to be written.
const PREFETCH: usize = 128;

/// Frames written to the tap per io_uring submission (and TX chains popped per batch).
pub const TX_BATCH: usize = 64;

/// What a processing pass ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Nothing more to do until the next event.
    Idle,
    /// The budget ran out with work left: the caller re-arms itself.
    More,
}

/// What a queue pair's worker is configured with, fixed for the daemon's life.
#[derive(Debug, Clone)]
pub struct PairConfig {
    pub mtu: usize,
    pub rx_csum: RxCsum,
    pub queue_size: usize,
    /// The IP-only link (`--link ip`): Ethernet headers added and stripped here, ARP and ND
    /// answered here; `None` for an Ethernet tap.
    pub link: Option<Arc<IpLink>>,
}

/// Bytes of frames the card makes for the host that may wait for RX buffers (replies and
/// reassembled datagrams: room for two of 64 KiB).
const LOCAL_BYTES: usize = 2 * (GSO_MAX_FRAME + HDR_MAX) + 16384;
const LOCAL_FRAMES: usize = 64;

/// State of one queue pair, owned by its worker thread.
pub struct Pair {
    pub tap_fd: RawFd,
    pub neg: Negotiated,
    pub mtu: usize,
    pub rx_csum: RxCsum,
    /// The tap may have frames to read (edge seen, EAGAIN not yet).
    pub rx_pending: bool,
    /// TX is waiting for EPOLLOUT on the tap.
    pub tx_blocked: bool,
    /// The tap device was deleted under us (its queue reads and writes fail with EBADFD).
    pub tap_gone: bool,
    /// How the RX and TX queues signal the driver when the transport has no call eventfd.
    pub irq: [Option<Arc<dyn Interrupt>>; 2],
    /// One slot per frame of a TX batch (only slot 0 without an io_uring).
    tx: Vec<TxSlot>,
    uring: Option<txring::TxRing>,
    rx: RxStash,
    /// Room for one frame when its checksum must be verified or completed.
    scratch: Vec<u8>,
    /// Room for one frame read while the guest has few buffers posted.
    bounce: Vec<u8>,
    /// Length of a frame waiting in `bounce` for the guest to post enough buffers (0: none).
    rx_held: usize,
    /// The frame in `bounce` was made by the card (from `local`), not read from the tap.
    rx_local: bool,
    /// Frames the card made for the host, waiting for the bounce buffer.
    local: LocalFrames,
    link: Option<Arc<IpLink>>,
    /// The RX iovecs minus the room for the Ethernet header (IP-only link).
    gap: IovBuf,
    /// IP fragments going up, put together before they cross (see `reasm`).
    reasm: Reassembler,
    /// The ring's available index ran more than a ring ahead of us: the queue is ignored until
    /// the driver puts it right (virtio 1.2, 2.7.13.1: the device needs a reset).
    tx_ring_broken: bool,
    rx_ring_broken: bool,
    /// While the frontend logs: the logged view of guest memory this pass writes used rings
    /// through (see `dirtylog`).
    logged: Option<Arc<LoggedMem>>,
    /// Signal the next used buffers of each queue (RX, TX) whatever EVENT_IDX says, as Linux's
    /// vhost does after a ring (re)starts (`signalled_used_valid`): the guest may be waiting for
    /// a notification a previous backend sent and that was lost on the way, e.g. across a
    /// live migration, and EVENT_IDX would otherwise skip it for good.
    signal_next: [bool; 2],
    /// A signal was due on each queue (RX, TX) while it had no call eventfd: QEMU sends
    /// `SET_VRING_CALL` after `SET_VRING_KICK`, and the driver's first kick may reach this worker
    /// before the handler has the call; a frontend may also poll for a while (no call at all).
    /// Sent when the call arrives (`CardBackend::call_installed`), not lost.
    call_owed: [bool; 2],
    /// What the current pass moved, added to the shared counters when it ends.
    tally: Tally,
    /// Each queue's (RX, TX) used elements written past the index the driver sees; published
    /// at the end of every TX batch and every pass (see `used`).
    used: [Used; 2],
}

/// The per-frame counters of a pass, kept here and added to the shared (atomic) counters once
/// per pass instead of once per frame: a pass moves up to [`BUDGET`] frames, and every atomic
/// add is a locked instruction on a cache line the metrics reader also touches.
#[derive(Debug, Default)]
struct Tally {
    tx_frames: u64,
    tx_bytes: u64,
    rx_frames: u64,
    rx_bytes: u64,
    rx_buffers: u64,
    rx_data_valid: u64,
    rx_needs_csum: u64,
    rx_csum_verified: u64,
}

impl Tally {
    /// Adds what was counted to `stats` and starts again from zero.
    fn flush(&mut self, stats: &PairStats) {
        let t = std::mem::take(self);
        for (c, n) in [
            (&stats.tx_frames, t.tx_frames),
            (&stats.tx_bytes, t.tx_bytes),
            (&stats.rx_frames, t.rx_frames),
            (&stats.rx_bytes, t.rx_bytes),
            (&stats.rx_buffers, t.rx_buffers),
            (&stats.rx_data_valid, t.rx_data_valid),
            (&stats.rx_needs_csum, t.rx_needs_csum),
            (&stats.rx_csum_verified, t.rx_csum_verified),
        ] {
            if n > 0 {
                add(c, n);
            }
        }
    }
}

/// Whether the driver's available index is at most one ring ahead of what the device consumed
/// (virtio 1.2, 2.7.6: the driver never makes more than a ring's worth of buffers available).
fn ring_sane(vring: &State, mem: &Mem) -> bool {
    let q = vring.get_queue();
    match q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) => idx.0.wrapping_sub(q.next_avail()) <= q.size(),
        Err(_) => false,
    }
}

/// Checks a ring before a pass; a broken ring is counted and logged once per breakage.
fn ring_ok(broken: &mut bool, vring: &State, mem: &Mem, counter: &AtomicU64, what: &str) -> bool {
    let sane = ring_sane(vring, mem);
    if !sane && !*broken {
        add(counter, 1);
        warn!(
            "{what} ring broken: available index more than a ring ahead; ignored until the driver resets it"
        );
    } else if sane && *broken {
        debug!("{what} ring usable again");
    }
    *broken = !sane;
    sane
}

impl Pair {
    pub fn new(tap_fd: RawFd, cfg: &PairConfig) -> Self {
        let (mtu, queue_size) = (cfg.mtu, cfg.queue_size);
        Pair {
            tap_fd,
            neg: Negotiated::default(),
            mtu,
            rx_csum: cfg.rx_csum,
            rx_pending: true,
            tx_blocked: false,
            tap_gone: false,
            irq: [None, None],
            tx: Vec::new(),
            uring: txring::take(),
            rx: RxStash::new(queue_size),
            scratch: vec![0; GSO_MAX_FRAME.max(mtu + ETH_HLEN + VLAN_HLEN)],
            bounce: vec![0; HDR_MAX + GSO_MAX_FRAME.max(mtu + ETH_HLEN + VLAN_HLEN)],
            rx_held: 0,
            rx_local: false,
            local: LocalFrames::new(LOCAL_BYTES, LOCAL_FRAMES),
            link: cfg.link.clone(),
            gap: IovBuf::with_capacity(IOV_MAX),
            reasm: Reassembler::new(),
            tx_ring_broken: false,
            rx_ring_broken: false,
            logged: None,
            signal_next: [true; 2],
            call_owed: [false; 2],
            tally: Tally::default(),
            used: [Used::default(); 2],
        }
        .with_tx_slots()
    }

    fn with_tx_slots(mut self) -> Self {
        let n = if self.uring.is_some() { TX_BATCH } else { 1 };
        self.tx = (0..n).map(|_| TxSlot::new()).collect();
        self
    }

    /// Whether TX batches go through an io_uring.
    pub fn tx_uring(&self) -> bool {
        self.uring.is_some()
    }

    /// Closes the TX io_uring (which lets go of the tap it holds); TX writes one `writev` per
    /// frame from now on.
    pub fn drop_tx_ring(&mut self) {
        self.uring = None;
        self.tx.truncate(1);
    }

    /// Forgets everything tied to a frontend connection. A frame held for the host's buffers
    /// is dropped (counted): it was read with that connection's header and offloads.
    pub fn reset(&mut self, stats: &PairStats) {
        if self.rx_held > 0 {
            add(&stats.rx_drop_disconnect, 1);
        }
        self.neg = Negotiated::default();
        self.rx_pending = true;
        self.tx_blocked = false;
        self.rx.clear();
        self.rx_held = 0;
        self.rx_local = false;
        self.local.clear();
        self.reasm.clear();
        self.tx_ring_broken = false;
        self.rx_ring_broken = false;
        self.rings_started();
        self.call_owed = [false; 2];
        self.used = [Used::default(); 2];
        for t in &mut self.tx {
            t.iovs.0.clear();
        }
    }

    /// The frame held for the host's buffers (vnet header included), taken out: a handover
    /// carries it to the process that takes the session over.
    pub fn take_held(&mut self) -> Option<Vec<u8>> {
        if self.rx_held == 0 {
            return None;
        }
        let frame = self.bounce[..self.rx_held].to_vec();
        self.rx_held = 0;
        self.rx_local = false;
        Some(frame)
    }

    /// Holds `frame` (vnet header included) for the host's buffers, as if read from the tap:
    /// the frame a handover carried. False if one is held already or it does not fit.
    pub fn hold(&mut self, frame: &[u8]) -> bool {
        if self.rx_held != 0 || frame.is_empty() || frame.len() > self.bounce.len() {
            return false;
        }
        self.bounce[..frame.len()].copy_from_slice(frame);
        self.rx_held = frame.len();
        self.rx_pending = true;
        true
    }

    /// The pair's rings (re)started: their next used buffers are signalled unconditionally.
    pub fn rings_started(&mut self) {
        self.signal_next = [true; 2];
    }

    /// Whether queue `q` (0 RX, 1 TX) owed a signal while it had no call eventfd; the debt is
    /// cleared (the caller sends it on the call that came).
    pub fn take_owed(&mut self, q: usize) -> bool {
        self.call_owed.get_mut(q).is_some_and(std::mem::take)
    }

    /// Queue `q` owes a signal (see [`CardBackend::owe_call`](crate::backend::CardBackend)).
    pub fn owe(&mut self, q: usize) {
        if let Some(o) = self.call_owed.get_mut(q) {
            *o = true;
        }
    }

    /// Largest frame (header included) the tap may hand over, given what was negotiated.
    fn rx_need(&self) -> usize {
        let frame = if self.neg.guest_gso() {
            GSO_MAX_FRAME
        } else {
            self.mtu + ETH_HLEN + VLAN_HLEN
        };
        self.neg.hdr_len() + frame
    }

    /// Moves frames from the TX queue to the tap: chains are popped and checked in batches of
    /// up to [`TX_BATCH`], written (one io_uring submission per batch, or one `writev` each),
    /// then completed in ring order; the guest is signalled once per pass.
    pub fn process_tx(&mut self, vring: &mut State, mem: &Mem, stats: &PairStats) -> Pass {
        if self.tx_blocked
            || !ring_ok(
                &mut self.tx_ring_broken,
                vring,
                mem,
                &stats.tx_ring_broken,
                "TX",
            )
        {
            return Pass::Idle;
        }
        self.begin_logging(mem);
        let mut used = false;
        let mut done = 0;
        let batch = self.tx.len();
        let pass = 'outer: loop {
            let _ = set_notification(vring, mem, self.logged.as_deref(), false);
            loop {
                let mut n = 0;
                // One read of the available index per batch (pop_descriptor_chain reads it for
                // every chain); `iter` checks it is at most a ring ahead, as ring_sane did.
                if let Ok(mut avail) = vring.get_queue_mut().iter(mem) {
                    while n < batch && done + n < BUDGET {
                        let Some(chain) = avail.next() else {
                            break;
                        };
                        self.tx[n].head = chain.head_index();
                        self.tx[n].verdict = match self.tx_collect(n, chain, mem) {
                            // For now the chain's bytes; tx_check makes it the verdict.
                            Ok(total) => TxVerdict::Frame(total),
                            Err(kind) => TxVerdict::Drop(kind),
                        };
                        n += 1;
                    }
                }
                // The headers are read once the whole batch's first lines were asked for.
                for k in 0..n {
                    if let TxVerdict::Frame(total) = self.tx[k].verdict {
                        self.tx[k].verdict = self.tx_check(k, total);
                    }
                }
                if n == 0 {
                    break;
                }
                used = true;
                let flushed = self.tx_flush(n, vring, mem, stats);
                done += flushed;
                if self.tx_blocked || flushed < n {
                    break 'outer Pass::Idle;
                }
                if done >= BUDGET {
                    break 'outer Pass::More;
                }
            }
            match set_notification(vring, mem, self.logged.as_deref(), true) {
                // More arrived while notifications were off (unless the index is garbage).
                Ok(true) if ring_sane(vring, mem) => continue,
                _ => break Pass::Idle,
            }
        };
        self.end_pass(1, vring, mem, stats, used);
        pass
    }

    /// Ends a pass over queue `q` (0 RX, 1 TX): the logged writes and the counters are settled,
    /// and the guest is signalled if the pass used buffers.
    fn end_pass(&mut self, q: usize, vring: &mut State, mem: &Mem, stats: &PairStats, used: bool) {
        if publish_used(&mut self.used[q], vring, mem, self.logged.as_deref()).is_err() {
            warn!("a used ring is outside guest memory");
        }
        self.end_logging();
        self.tally.flush(stats);
        if used {
            let due = self.used[q]
                .needs_notification(vring.get_queue(), mem)
                .unwrap_or(true);
            notify(
                due,
                vring,
                self.irq[q].as_deref(),
                stats,
                &mut self.signal_next[q],
                &mut self.call_owed[q],
            );
        }
    }

    /// Puts a TX chain's buffers in slot `k` (after a free entry for our copy of the header)
    /// and starts loading its header and first bytes into the cache (see
    /// [`iov::prefetch_iovs`]). Returns the chain's length, header included.
    fn tx_collect(
        &mut self,
        k: usize,
        chain: DescriptorChain<&Mem>,
        mem: &Mem,
    ) -> Result<usize, TxDropKind> {
        let hdr_len = self.neg.hdr_len();
        let slot = &mut self.tx[k];
        let iovs = &mut slot.iovs.0;
        iovs.clear();
        // Entry 0 is kept for our copy of the header when the guest's header fills one buffer.
        iovs.push(libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        });
        let total = match iov::collect_chain(chain, mem, false, iovs, IOV_MAX + 1) {
            Ok(n) => n,
            Err(e) => {
                debug!("TX chain dropped: {e}");
                return Err(TxDropKind::BadChain);
            }
        };
        if total < hdr_len {
            return Err(TxDropKind::ShortHeader);
        }
        iov::prefetch_iovs(&iovs[1..], hdr_len + PREFETCH, Access::Read);
        Ok(total)
    }

    /// Turns slot `k`, which [`Pair::tx_collect`] filled with a chain of `total` bytes, into the
    /// frame's iovecs with our checked copy of the header in front, or the reason it is dropped.
    fn tx_check(&mut self, k: usize, total: usize) -> TxVerdict {
        let hdr_len = self.neg.hdr_len();
        let slot = &mut self.tx[k];
        let iovs = &mut slot.iovs.0;
        let mut raw = [0u8; HDR_MAX];
        // SAFETY: the iovecs were translated from guest memory under the `mem` that
        // `process_tx` holds for the whole pass, this call included.
        unsafe { iov::read_iovs(&iovs[1..], 0, &mut raw[..hdr_len]) };
        let frame_len = total - hdr_len;
        let hdr = match vnet::check_tx(&VnetHdr::decode(&raw), frame_len, self.mtu, &self.neg) {
            Ok(h) => h,
            Err(e) => {
                debug!("TX frame dropped: {e}");
                return TxVerdict::Drop(match e {
                    TxDrop::Runt => TxDropKind::Runt,
                    TxDrop::Oversize => TxDropKind::Oversize,
                    _ => TxDropKind::BadVnetHdr,
                });
            }
        };
        let mut hdr = hdr;
        let mut strip = 0;
        if let Some(link) = &self.link {
            let mut peek = [0u8; link::PEEK];
            let mut n = frame_len.min(link::SNIFF);
            // SAFETY: as above.
            unsafe { iov::read_iovs(&iovs[1..], hdr_len, &mut peek[..n]) };
            if link::is_neighbour_solicitation(&peek[..n]) {
                n = frame_len.min(link::PEEK);
                // SAFETY: as above.
                unsafe { iov::read_iovs(&iovs[1..], hdr_len, &mut peek[..n]) };
            }
            match link.classify_tx(&peek[..n], frame_len, &mut slot.reply) {
                TxClass::Ip => {
                    strip = ETH_HLEN;
                    hdr = hdr.without_ethernet();
                }
                TxClass::Reply(proto, len) => return TxVerdict::Reply(proto, len),
                TxClass::Ignored(why) => return TxVerdict::Drop(TxDropKind::Ignored(why)),
                TxClass::NotIp => return TxVerdict::Drop(TxDropKind::NotIp),
                TxClass::Malformed => return TxVerdict::Drop(TxDropKind::Malformed),
            }
        }
        slot.hdr = hdr.encode();
        let first = iov::advance(iovs, 1, hdr_len + strip);
        // `first >= 2` whenever the header filled whole iovecs; otherwise entry 0 is free.
        let hdr_at = first - 1;
        iovs[hdr_at] = libc::iovec {
            iov_base: slot.hdr.as_mut_ptr().cast(),
            iov_len: hdr_len,
        };
        if iovs.len() - hdr_at > IOV_MAX {
            return TxVerdict::Drop(TxDropKind::BadChain);
        }
        slot.first = hdr_at;
        TxVerdict::Frame(frame_len)
    }

    /// Writes the frames of slots `..n` and completes the slots in order. Returns how many
    /// slots were completed; the others (from a full tap on) went back to the ring.
    fn tx_flush(&mut self, n: usize, vring: &mut State, mem: &Mem, stats: &PairStats) -> usize {
        let ran = match &mut self.uring {
            Some(ring) => ring.write_batch(self.tap_fd, &mut self.tx[..n]),
            None => {
                let mut full = false;
                for t in &mut self.tx[..n] {
                    if let TxVerdict::Frame(_) = t.verdict {
                        // Behind a full tap, nothing more is tried.
                        t.result = if full {
                            -libc::EAGAIN
                        } else {
                            t.writev(self.tap_fd)
                        };
                        full |= t.result == -libc::EAGAIN;
                    }
                }
                Ok(())
            }
        };
        if let Err(e) = ran {
            warn!("io_uring submission failed: {e}; writing frames one by one from now on");
            self.drop_tx_ring();
            // Nothing of this batch was completed: give it back whole.
            let q = vring.get_queue_mut();
            q.set_next_avail(q.next_avail().wrapping_sub(n as u16));
            return 0;
        }
        // A full tap (EAGAIN, in practice only with a limited TUNSETSNDBUF) normally refuses
        // every frame from some point on: those chains go back to the ring, in order, and TX
        // waits for EPOLLOUT. Should a later frame of the batch have gone through after all,
        // the refused ones before it are dropped instead (counted), so nothing is reordered.
        let frame_at = |t: &TxSlot| matches!(t.verdict, TxVerdict::Frame(_));
        let again = |t: &TxSlot| frame_at(t) && t.result == -libc::EAGAIN;
        let mut end = n;
        if let Some(i) = self.tx[..n].iter().position(again) {
            self.tx_blocked = true;
            add(&stats.tx_tap_full, 1);
            if self.tx[i..n].iter().all(|t| !frame_at(t) || again(t)) {
                end = i;
            }
        }
        for t in &self.tx[..end] {
            match t.verdict {
                TxVerdict::Drop(kind) => add(kind.counter(stats), 1),
                TxVerdict::Reply(proto, len) => {
                    let reply = &t.reply[..len];
                    if self.local.push_with(len, |b| b.copy_from_slice(reply)) {
                        add(
                            match proto {
                                Proto::Arp => &stats.arp_replies,
                                Proto::Nd => &stats.nd_replies,
                            },
                            1,
                        );
                    } else {
                        add(&stats.rx_drop_local_full, 1);
                    }
                }
                TxVerdict::Frame(len) if t.result >= 0 => {
                    self.tally.tx_frames += 1;
                    self.tally.tx_bytes += len as u64;
                }
                TxVerdict::Frame(_) => {
                    let e = io::Error::from_raw_os_error(-t.result);
                    debug!("tap write failed: {e}");
                    add(&stats.tx_drop_tap_error, 1);
                    if -t.result == libc::EBADFD {
                        self.tap_gone = true;
                    }
                }
            }
            let logged = self.logged.as_deref();
            if push_used(&mut self.used[1], vring, mem, logged, t.head, 0).is_err() {
                warn!("TX used ring is outside guest memory");
                return n;
            }
        }
        // The driver gets this batch's buffers back now (one store of the used index).
        if publish_used(&mut self.used[1], vring, mem, self.logged.as_deref()).is_err() {
            warn!("TX used ring is outside guest memory");
            return n;
        }
        if end < n {
            let q = vring.get_queue_mut();
            q.set_next_avail(q.next_avail().wrapping_sub((n - end) as u16));
        }
        end
    }

    /// Moves frames from the tap to the RX queue.
    pub fn process_rx(&mut self, vring: &mut State, mem: &Mem, stats: &PairStats) -> Pass {
        if !ring_ok(
            &mut self.rx_ring_broken,
            vring,
            mem,
            &stats.rx_ring_broken,
            "RX",
        ) {
            return Pass::Idle;
        }
        self.begin_logging(mem);
        let mut used = false;
        let mut frames = 0;
        let _ = set_notification(vring, mem, self.logged.as_deref(), false);
        self.rx.clear();
        let pass = loop {
            if !self.rx_pending && self.local.is_empty() {
                break Pass::Idle;
            }
            if frames == BUDGET {
                break Pass::More;
            }
            match self.rx_one(vring, mem, stats) {
                Rx::Frame | Rx::Consumed => {
                    used = true;
                    frames += 1;
                }
                Rx::Retry => frames += 1,
                Rx::NoBuffers => {
                    // rx_one enabled notifications: the guest kicks when it posts buffers.
                    add(&stats.rx_no_buffers, 1);
                    break Pass::Idle;
                }
                Rx::Empty => {
                    self.rx_pending = false;
                    break Pass::Idle;
                }
                Rx::Broken => break Pass::Idle,
            }
        };
        // Buffers gathered but not filled go back to the guest before the pass ends.
        used |= self
            .rx
            .release(&mut self.used[0], vring, mem, self.logged.as_deref());
        self.end_pass(0, vring, mem, stats, used);
        pass
    }

    /// Tops the stash of host buffers up to the largest possible frame. Returns whether any
    /// malformed chain was consumed on the way, or `None` if the used ring is unreachable.
    fn rx_gather(
        &mut self,
        vring: &mut State,
        mem: &Mem,
        stats: &PairStats,
    ) -> Option<(bool, bool)> {
        let hdr_len = self.neg.hdr_len();
        let need = self.rx_need();
        let mut consumed_bad = false;
        let mut iov_full = false;
        while self.rx.cap < need && (self.neg.mrg_rxbuf || self.rx.live().is_empty()) {
            let Some(chain) = vring.get_queue_mut().pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let before = self.rx.iovs.0.len();
            let limit = self.rx.iov_first + IOV_MAX;
            match iov::collect_chain(chain, mem, true, &mut self.rx.iovs.0, limit) {
                Ok(len) if len >= hdr_len => {
                    // The frame that lands here is written by the kernel's readv.
                    let new = &self.rx.iovs.0[before..];
                    iov::prefetch_iovs(new, hdr_len + PREFETCH, Access::Write);
                    self.rx.push(head, len);
                }
                Err(ChainError::TooLong) if !self.rx.live().is_empty() => {
                    // This good chain does not fit one readv; leave it for a later frame.
                    self.rx.iovs.0.truncate(before);
                    let q = vring.get_queue_mut();
                    q.set_next_avail(q.next_avail().wrapping_sub(1));
                    iov_full = true;
                    break;
                }
                other => {
                    debug!("RX chain dropped: {other:?}");
                    self.rx.iovs.0.truncate(before);
                    add(&stats.rx_drop_bad_chain, 1);
                    let logged = self.logged.as_deref();
                    push_used(&mut self.used[0], vring, mem, logged, head, 0).ok()?;
                    consumed_bad = true;
                    self.rx.barrier = self.rx.chains.len();
                }
            }
        }
        Some((consumed_bad, iov_full))
    }

    /// What a failed tap read means for the RX loop.
    fn tap_read_error(&mut self, e: io::Error, stats: &PairStats) -> Rx {
        if e.kind() == io::ErrorKind::WouldBlock {
            return Rx::Empty;
        }
        if e.kind() == io::ErrorKind::Interrupted {
            return Rx::Retry;
        }
        // EFAULT means the kernel dropped a frame that did not fit; anything else is a tap
        // problem reported once per edge.
        if e.raw_os_error() == Some(libc::EFAULT) {
            add(&stats.rx_drop_truncated, 1);
            return Rx::Retry;
        }
        warn!("tap read failed: {e}");
        add(&stats.rx_tap_error, 1);
        if e.raw_os_error() == Some(libc::EBADFD) {
            self.tap_gone = true;
        }
        self.rx_pending = false;
        Rx::Broken
    }

    fn rx_one(&mut self, vring: &mut State, mem: &Mem, stats: &PairStats) -> Rx {
        let hdr_len = self.neg.hdr_len();
        let need = self.rx_need();
        let Some((consumed_bad, iov_full)) = self.rx_gather(vring, mem, stats) else {
            return Rx::Broken;
        };
        // Room for the largest frame means one readv straight into the guest's buffers. With
        // less (the guest is slow to refill), the frame is read into the bounce buffer and
        // copied if it fits, or held until the guest posts more: a driver that keeps few
        // buffers posted still gets every frame, and waiting never starts while one would do.
        // When the whole ring is ours or the iovec array is full no more room can come, so a
        // frame that does not fit is dropped.
        let queue_size = usize::from(vring.get_queue().size());
        let can_wait = self.neg.mrg_rxbuf && !iov_full && self.rx.live().len() < queue_size;
        // A frame the card made goes up like a held one once the bounce buffer is free and the
        // host has buffers (without any, it waits in `local` for the host's kick).
        if self.rx_held == 0 && !self.rx.live().is_empty() {
            if let Some(f) = self.local.front() {
                let n = hdr_len + f.len();
                if n <= self.bounce.len() {
                    self.bounce[..hdr_len].fill(0);
                    self.bounce[hdr_len..n].copy_from_slice(f);
                    self.rx_held = n;
                    self.rx_local = true;
                }
                self.local.pop();
            }
        }
        if self.rx_held > self.rx.cap && !can_wait {
            self.rx_held = 0;
            self.rx_local = false;
            add(&stats.rx_drop_truncated, 1);
            return Rx::Retry;
        }
        if self.rx.live().is_empty() || self.rx_held > self.rx.cap {
            // Every available chain is popped at this point, so enabling notifications now
            // asks for a kick when the guest posts more.
            let more = set_notification(vring, mem, self.logged.as_deref(), true).unwrap_or(false)
                && ring_sane(vring, mem);
            let logged = self.logged.as_deref();
            self.rx.release(&mut self.used[0], vring, mem, logged);
            return if more {
                Rx::Retry
            } else if consumed_bad {
                Rx::Consumed
            } else {
                Rx::NoBuffers
            };
        }
        let cap = self.rx.cap;
        let iovs = self.rx.live_iovs();
        let (n, bounced) = if self.rx_held > 0 {
            (std::mem::take(&mut self.rx_held), true)
        } else if cap < need && can_wait {
            let n = match &self.link {
                None => {
                    // SAFETY: reads into our own bounce buffer, valid for its whole length.
                    unsafe {
                        libc::read(
                            self.tap_fd,
                            self.bounce.as_mut_ptr().cast(),
                            self.bounce.len(),
                        )
                    }
                }
                Some(_) => {
                    // The IP packet goes after room for the Ethernet header.
                    let (head, rest) = self.bounce.split_at_mut(hdr_len);
                    let segs = [
                        libc::iovec {
                            iov_base: head.as_mut_ptr().cast(),
                            iov_len: hdr_len,
                        },
                        libc::iovec {
                            iov_base: rest[ETH_HLEN..].as_mut_ptr().cast(),
                            iov_len: rest.len() - ETH_HLEN,
                        },
                    ];
                    // SAFETY: both iovecs lie in our own bounce buffer.
                    unsafe { tap_readv(self.tap_fd, &segs) }
                }
            };
            if n < 0 {
                return self.tap_read_error(io::Error::last_os_error(), stats);
            }
            let mut n = n.unsigned_abs();
            if let Some(link) = &self.link {
                if n <= hdr_len {
                    add(&stats.rx_drop_runt, 1);
                    return Rx::Retry;
                }
                let ip = &self.bounce[hdr_len + ETH_HLEN..(n + ETH_HLEN).min(self.bounce.len())];
                let Some(eth) = link.eth_header(&ip[..ip.len().min(IP_PEEK)]) else {
                    add(&stats.rx_drop_not_ip, 1);
                    return Rx::Retry;
                };
                self.bounce[hdr_len..hdr_len + ETH_HLEN].copy_from_slice(&eth);
                n += ETH_HLEN;
            }
            if n > self.bounce.len() {
                add(&stats.rx_drop_truncated, 1);
                return Rx::Retry;
            }
            if n > cap {
                self.rx_held = n;
                add(&stats.rx_held, 1);
                return Rx::Retry;
            }
            (n, true)
        } else {
            let n = match &self.link {
                // SAFETY: the iovecs point into guest memory held by `mem` for this call, all
                // device-writable buffers of chains we popped and own until they are used or
                // released.
                None => {
                    // The same bytes with adjacent buffers merged: fewer iovecs for the kernel
                    // to import (up to 8 stay off its heap).
                    let segs = self.rx.read_iovs();
                    // SAFETY: as above; `segs` covers the same bytes as those iovecs.
                    unsafe { tap_readv(self.tap_fd, segs) }
                }
                Some(_) => {
                    // Zero-copy on the IP-only link too: the packet lands after room for the
                    // Ethernet header, written below.
                    iov::with_gap(iovs, hdr_len, ETH_HLEN, &mut self.gap.0, IOV_MAX);
                    let segs = &self.gap.0;
                    // SAFETY: as above; `gap` is a subset of those iovecs.
                    unsafe { tap_readv(self.tap_fd, segs) }
                }
            };
            if n < 0 {
                return self.tap_read_error(io::Error::last_os_error(), stats);
            }
            let mut n = n.unsigned_abs();
            if let Some(link) = &self.link {
                if n <= hdr_len {
                    add(&stats.rx_drop_runt, 1);
                    return Rx::Retry;
                }
                let mut ip = [0u8; IP_PEEK];
                let len = (n - hdr_len).min(IP_PEEK);
                // SAFETY: see the readv above.
                unsafe { iov::read_iovs(iovs, hdr_len + ETH_HLEN, &mut ip[..len]) };
                let Some(eth) = link.eth_header(&ip[..len]) else {
                    add(&stats.rx_drop_not_ip, 1);
                    return Rx::Retry;
                };
                // SAFETY: see the readv above.
                unsafe { iov::write_iovs(iovs, hdr_len, &eth) };
                n += ETH_HLEN;
            }
            (n, false)
        };
        let local = std::mem::take(&mut self.rx_local);
        if bounced {
            // SAFETY: the iovecs point into guest memory held by `mem`; `n <= cap` bytes fit.
            unsafe { iov::write_iovs(iovs, 0, &self.bounce[..n.min(cap)]) };
            add(&stats.rx_bounced, 1);
        }
        if n > cap {
            // The tap reports the full length of a frame it could only partly copy.
            add(&stats.rx_drop_truncated, 1);
            return Rx::Retry;
        }
        if n < hdr_len + ETH_HLEN {
            add(&stats.rx_drop_runt, 1);
            return Rx::Retry;
        }
        let frame_len = n - hdr_len;
        if !local {
            let mut sniff = [0u8; reasm::SNIFF];
            // SAFETY: see the readv above.
            let got = unsafe { iov::read_iovs(iovs, hdr_len, &mut sniff) };
            if reasm::may_be_fragment(&sniff[..got]) {
                let (reasm, local, mtu) = (&mut self.reasm, &mut self.local, self.mtu);
                // SAFETY: the iovecs stay valid for the call (see the readv above).
                let taken =
                    unsafe { reassemble(reasm, local, mtu, iovs, hdr_len, frame_len, stats) };
                if let Some(rx) = taken {
                    return rx;
                }
            }
        }
        let mut raw = [0u8; HDR_MAX];
        // SAFETY: see the readv above.
        unsafe { iov::read_iovs(iovs, 0, &mut raw[..hdr_len]) };
        let mut hdr = VnetHdr::decode(&raw);
        if self.link.is_some() && !local {
            // The kernel's offsets count from the IP header.
            hdr = hdr.with_ethernet();
        }
        let mut why = if self.neg.guest_csum {
            Unmarked::Passthrough
        } else {
            Unmarked::NoGuestCsum
        };
        match vnet::rx_action(&mut hdr, &self.neg, self.rx_csum) {
            RxAction::Deliver => {
                if hdr.gso_type != vnet::GSO_NONE {
                    why = Unmarked::Malformed;
                }
            }
            RxAction::DropGso => {
                add(&stats.rx_drop_gso, 1);
                return Rx::Retry;
            }
            RxAction::Verify => {
                // Checked where the frame lies: its head copied out, the L4 bytes summed in
                // place; only a frame the head cannot decide is copied whole.
                let mut head = [0u8; csum::HEAD];
                let h = frame_len.min(csum::HEAD);
                // SAFETY: see the readv above.
                unsafe { iov::read_iovs(iovs, hdr_len, &mut head[..h]) };
                let sum = |from: usize, len: usize| {
                    // SAFETY: see the readv above.
                    unsafe { iov::sum_iovs(iovs, hdr_len + from, len) }
                };
                let verdict = csum::verify_split(&head[..h], frame_len, sum).unwrap_or_else(|| {
                    // SAFETY: see the readv above.
                    unsafe { iov::read_iovs(iovs, hdr_len, &mut self.scratch[..frame_len]) };
                    csum::verify(&self.scratch[..frame_len])
                });
                match verdict {
                    Verdict::Valid => {
                        hdr.flags = vnet::F_DATA_VALID;
                        self.tally.rx_csum_verified += 1;
                    }
                    Verdict::Invalid => {
                        add(&stats.rx_csum_bad, 1);
                        why = Unmarked::BadCsum;
                    }
                    Verdict::NotApplicable(u) => why = u.into(),
                }
            }
            RxAction::Complete | RxAction::CompleteAndMark => {
                let mark = hdr.flags & vnet::F_NEEDS_CSUM != 0;
                // SAFETY: see the readv above.
                let done = unsafe { complete_in_place(iovs, hdr_len, frame_len, &hdr) };
                if done {
                    add(&stats.rx_csum_completed, 1);
                }
                hdr.flags = if done && mark { vnet::F_DATA_VALID } else { 0 };
                if !done {
                    why = Unmarked::Malformed;
                }
            }
        }
        // Which chains the frame filled.
        let live = self.rx.live();
        let mut left = n;
        let mut k = 0;
        while left > 0 && k < live.len() {
            left = left.saturating_sub(live[k].len);
            k += 1;
        }
        hdr.num_buffers = u16::try_from(k).unwrap_or(u16::MAX);
        let mark = Mark::of(hdr.flags, why);
        // SAFETY: see the readv above.
        unsafe { iov::write_iovs(iovs, 0, &hdr.encode()[..hdr_len]) };
        log_written(mem, iovs, n);
        let mut left = n;
        for c in &live[..k] {
            let this = left.min(c.len);
            left -= this;
            // `this` is at most one chain's length, which the chain iterator keeps below 2^32.
            let this = u32::try_from(this).unwrap_or(u32::MAX);
            let logged = self.logged.as_deref();
            if push_used(&mut self.used[0], vring, mem, logged, c.head, this).is_err() {
                return Rx::Broken;
            }
        }
        // The frame's buffers all at once, when enough are pending (see `used`).
        if self.used[0].many()
            && publish_used(&mut self.used[0], vring, mem, self.logged.as_deref()).is_err()
        {
            return Rx::Broken;
        }
        log::trace!(
            "rx: {n} bytes into {k} buffer(s) {:?}{}",
            live[..k].iter().map(|c| c.head).collect::<Vec<_>>(),
            if bounced { " (bounced)" } else { "" }
        );
        self.rx.consume_front(k);
        let t = &mut self.tally;
        t.rx_frames += 1;
        t.rx_bytes += frame_len as u64;
        t.rx_buffers += k as u64;
        match mark {
            Mark::DataValid => t.rx_data_valid += 1,
            Mark::NeedsCsum => t.rx_needs_csum += 1,
            Mark::Unmarked(_) => add(mark.counter(stats), 1),
        }
        Rx::Frame
    }
}

/// Offers a frame that may be a fragment to the reassembly table: `None` if it goes up as it
/// is, else what the RX loop does next (the frame was taken in; a completed datagram waits in
/// `local`, cut to `mtu` if larger). The frame's chains stay with the stash for the next frame.
///
/// # Safety
/// `iovs` must be mapped and readable for the call.
unsafe fn reassemble(
    reasm: &mut Reassembler,
    local: &mut LocalFrames,
    mtu: usize,
    iovs: &[libc::iovec],
    hdr_len: usize,
    frame_len: usize,
    stats: &PairStats,
) -> Option<Rx> {
    let mut head = [0u8; reasm::HEAD];
    let h = frame_len.min(reasm::HEAD);
    // SAFETY: the caller's guarantee.
    unsafe { iov::read_iovs(iovs, hdr_len, &mut head[..h]) };
    let outcome = reasm.offer(Instant::now(), &head[..h], frame_len, |from, dst| {
        // SAFETY: the caller's guarantee.
        unsafe { iov::read_iovs(iovs, hdr_len + from, dst) };
    });
    let lost = reasm.take_lost();
    add(&stats.reasm_timeout, lost.timed_out);
    add(&stats.reasm_evicted, lost.evicted);
    match outcome {
        Outcome::NotFragment => return None,
        Outcome::Held => add(&stats.reasm_fragments, 1),
        Outcome::Duplicate => add(&stats.reasm_duplicate, 1),
        Outcome::Discarded(Discard::Overlap) => add(&stats.reasm_overlap, 1),
        Outcome::Discarded(Discard::Malformed) => add(&stats.reasm_malformed, 1),
        Outcome::Complete(slot) => {
            add(&stats.reasm_fragments, 1);
            let dgram = reasm.datagram(slot);
            let queued = if dgram.len() - ETH_HLEN <= mtu {
                local.push_with(dgram.len(), |b| b.copy_from_slice(dgram))
            } else {
                let n = reasm.split(slot, mtu, |len, fill| local.push_with(len, |b| fill(b)));
                add(&stats.reasm_split, 1);
                n >= 2
            };
            reasm.release(slot);
            if queued {
                add(&stats.reasm_datagrams, 1);
            } else {
                add(&stats.rx_drop_local_full, 1);
            }
        }
    }
    Some(Rx::Retry)
}

/// Completes the partial checksum of the frame that follows a `hdr_len`-byte header in `iovs`,
/// where it lies: one pass over the bytes from `csum_start` on, no copy. False when the header's
/// range does not fit the frame.
///
/// # Safety
/// Every iovec must describe memory that is mapped, readable and writable for the call.
unsafe fn complete_in_place(
    iovs: &[libc::iovec],
    hdr_len: usize,
    frame_len: usize,
    hdr: &VnetHdr,
) -> bool {
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if field + 2 > frame_len {
        return false;
    }
    // SAFETY: the caller's guarantee, passed on.
    let Some(sum) = (unsafe { iov::sum_iovs(iovs, hdr_len + start, frame_len - start) }) else {
        return false;
    };
    // SAFETY: as above; the field lies inside the frame.
    unsafe { iov::write_iovs(iovs, hdr_len + field, &csum::finish(sum)) };
    true
}

/// One RX chain held for frames to come.
#[derive(Debug, Clone, Copy)]
struct Stashed {
    head: u16,
    len: usize,
    /// End of its segments in `RxStash::iovs`.
    iov_end: usize,
}

/// Host RX buffers popped from the ring during one pass and not filled yet, so a burst of small
/// frames does not gather buffers for a 64 KiB frame again for every frame. Emptied at the end
/// of every pass: nothing refers to guest memory between passes.
struct RxStash {
    iovs: IovBuf,
    iov_first: usize,
    /// The live iovecs' bytes with adjacent ranges merged (`iov::push_merged`): what a `readv`
    /// gets. Kept as chains come and go, so a frame costs no rebuild.
    merged: IovBuf,
    merged_first: usize,
    chains: Vec<Stashed>,
    first: usize,
    /// `chains[..barrier]` were popped before a malformed chain that was consumed: they can
    /// only be returned empty, since rewinding past a consumed chain would hand it out twice.
    barrier: usize,
    /// Bytes in the live chains.
    cap: usize,
}

impl RxStash {
    fn new(queue_size: usize) -> Self {
        RxStash {
            iovs: IovBuf::with_capacity(2 * IOV_MAX),
            iov_first: 0,
            merged: IovBuf::with_capacity(2 * IOV_MAX),
            merged_first: 0,
            chains: Vec::with_capacity(2 * queue_size),
            first: 0,
            barrier: 0,
            cap: 0,
        }
    }

    fn clear(&mut self) {
        self.iovs.0.clear();
        self.merged.0.clear();
        self.chains.clear();
        self.iov_first = 0;
        self.merged_first = 0;
        self.first = 0;
        self.barrier = 0;
        self.cap = 0;
    }

    fn live(&self) -> &[Stashed] {
        &self.chains[self.first..]
    }

    fn live_iovs(&self) -> &[libc::iovec] {
        &self.iovs.0[self.iov_first..]
    }

    /// The live bytes as one `readv` takes them (adjacent ranges merged).
    fn read_iovs(&self) -> &[libc::iovec] {
        &self.merged.0[self.merged_first..]
    }

    /// Adds the chain whose iovecs were just appended to `iovs`.
    fn push(&mut self, head: u16, len: usize) {
        let from = self.chains.last().map_or(self.iov_first, |c| c.iov_end);
        for v in &self.iovs.0[from..] {
            iov::push_merged(&mut self.merged.0, v.iov_base.cast(), v.iov_len);
        }
        self.chains.push(Stashed {
            head,
            len,
            iov_end: self.iovs.0.len(),
        });
        self.cap += len;
    }

    /// Drops the first `k` live chains, which a frame filled.
    fn consume_front(&mut self, k: usize) {
        if k == 0 {
            return;
        }
        let last = self.chains[self.first + k - 1];
        let bytes = self.chains[self.first..self.first + k]
            .iter()
            .map(|c| c.len)
            .sum::<usize>();
        self.cap -= bytes;
        self.first += k;
        self.iov_first = last.iov_end;
        self.merged_first = iov::advance(&mut self.merged.0, self.merged_first, bytes);
        if self.merged_first == self.merged.0.len() {
            // All read: a chain that comes next must not extend a consumed entry.
            self.merged.0.clear();
            self.merged_first = 0;
        }
        // Compact now and then so the arrays stay small.
        if self.first >= 64 {
            let (dc, di) = (self.first, self.iov_first);
            self.chains.drain(..dc);
            self.iovs.0.drain(..di);
            self.merged.0.drain(..self.merged_first);
            self.merged_first = 0;
            for c in &mut self.chains {
                c.iov_end -= di;
            }
            self.barrier = self.barrier.saturating_sub(dc);
            self.first = 0;
            self.iov_first = 0;
        }
    }

    /// Gives every live chain back: rewinds the ring over the ones after the barrier and
    /// returns the others empty. Returns whether the used ring changed.
    fn release(
        &mut self,
        used_ring: &mut Used,
        vring: &mut State,
        mem: &Mem,
        logged: Option<&LoggedMem>,
    ) -> bool {
        log::trace!(
            "rx: releasing {:?} (barrier {})",
            self.live().iter().map(|c| c.head).collect::<Vec<_>>(),
            self.barrier
        );
        let mut rewind = 0u16;
        let mut used = false;
        for (i, c) in self.chains.iter().enumerate().skip(self.first) {
            if i < self.barrier {
                let _ = push_used(used_ring, vring, mem, logged, c.head, 0);
                used = true;
            } else {
                rewind = rewind.wrapping_add(1);
            }
        }
        let q = vring.get_queue_mut();
        q.set_next_avail(q.next_avail().wrapping_sub(rewind));
        self.clear();
        used
    }
}

/// What a popped TX chain turned out to be.
#[derive(Debug, Clone, Copy)]
enum TxVerdict {
    /// A good frame of this many bytes (header excluded).
    Frame(usize),
    Drop(TxDropKind),
    /// An ARP or ND request the card answers (IP-only link): the reply, this long, is in the
    /// slot's `reply`.
    Reply(Proto, usize),
}

#[derive(Debug, Clone, Copy)]
enum TxDropKind {
    BadChain,
    ShortHeader,
    Runt,
    Oversize,
    BadVnetHdr,
    NotIp,
    Malformed,
    Ignored(Ignored),
}

impl TxDropKind {
    fn counter(self, stats: &PairStats) -> &std::sync::atomic::AtomicU64 {
        match self {
            TxDropKind::BadChain => &stats.tx_drop_bad_chain,
            TxDropKind::ShortHeader => &stats.tx_drop_short_header,
            TxDropKind::Runt => &stats.tx_drop_runt,
            TxDropKind::Oversize => &stats.tx_drop_oversize,
            TxDropKind::BadVnetHdr => &stats.tx_drop_bad_vnet_hdr,
            TxDropKind::NotIp => &stats.tx_drop_not_ip,
            TxDropKind::Malformed => &stats.tx_drop_malformed,
            TxDropKind::Ignored(why) => match why {
                Ignored::ArpMalformed => &stats.arp_ignored_malformed,
                Ignored::ArpNotBehind => &stats.arp_ignored_not_behind,
                Ignored::ArpGratuitous => &stats.arp_ignored_gratuitous,
                Ignored::NdMalformed => &stats.nd_ignored_malformed,
                Ignored::NdNotBehind => &stats.nd_ignored_not_behind,
                Ignored::NdDad => &stats.nd_ignored_dad,
            },
        }
    }
}

/// One frame of a TX batch: its iovecs (into guest memory and `hdr`), our copy of its header,
/// and the outcome of the write. Reused for the life of the worker.
struct TxSlot {
    iovs: IovBuf,
    hdr: [u8; HDR_MAX],
    /// The card's answer to an ARP or ND request (IP-only link).
    reply: [u8; link::REPLY_MAX],
    head: u16,
    /// First iovec of the frame (our header).
    first: usize,
    verdict: TxVerdict,
    /// Bytes written, or a negative errno.
    result: i32,
}

impl TxSlot {
    fn new() -> Self {
        TxSlot {
            iovs: IovBuf::with_capacity(IOV_MAX + 1),
            hdr: [0; HDR_MAX],
            reply: [0; link::REPLY_MAX],
            head: 0,
            first: 0,
            verdict: TxVerdict::Drop(TxDropKind::BadChain),
            result: 0,
        }
    }

    fn segs(&self) -> &[libc::iovec] {
        &self.iovs.0[self.first..]
    }

    /// One `writev`; bytes written or a negative errno.
    fn writev(&self, fd: RawFd) -> i32 {
        let segs = self.segs();
        // SAFETY: every iovec points into guest memory held by the caller's guard or into
        // `self.hdr`, all valid for the call; `segs.len() <= IOV_MAX` (checked when prepared).
        let n = unsafe { libc::writev(fd, segs.as_ptr(), iov_count(segs.len())) };
        if n < 0 {
            -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            i32::try_from(n).unwrap_or(i32::MAX)
        }
    }
}

/// Batched tap writes through io_uring: one `io_uring_enter` carries a whole TX batch (the
/// writes run inline, in order, on this thread). The requests are not linked: links cost about
/// 15 % of the frame rate at 64 B (each linked request is issued from task work). Each ring is
/// set up before the sandbox (which allows `io_uring_enter` only) and restricted to `WRITEV`,
/// so it cannot be used to get around the system-call filter.
mod txring {
    use std::io;
    use std::os::fd::RawFd;
    use std::sync::Mutex;

    use io_uring::{opcode, register::Restriction, squeue, types, IoUring};

    use super::{iov_count, TxSlot, TxVerdict, TX_BATCH};

    pub struct TxRing {
        ring: IoUring,
        /// The tap descriptor installed in the ring's file table (slot 0), so each write skips
        /// the kernel's descriptor lookup and file reference count (`IOSQE_FIXED_FILE`);
        /// `None` until the first batch, or for good if installing it failed.
        fixed: Option<RawFd>,
        /// Installing the tap failed: writes name the descriptor.
        unfixed: bool,
    }

    static POOL: Mutex<Vec<TxRing>> = Mutex::new(Vec::new());

    pub fn create() -> io::Result<TxRing> {
        let ring: IoUring = IoUring::builder()
            .setup_r_disabled()
            .build(u32::try_from(TX_BATCH).unwrap_or(64))?;
        // One empty file slot, filled with the worker's tap by an IORING_OP_FILES_UPDATE
        // request (through io_uring_enter, the one io_uring call the sandbox allows). Without
        // it the ring still works, naming the tap by its descriptor.
        let unfixed = ring.submitter().register_files_sparse(1).is_err();
        let mut allow = [
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::FilesUpdate::CODE),
            Restriction::sqe_flags_allowed(squeue::Flags::FIXED_FILE.bits()),
        ];
        ring.submitter().register_restrictions(&mut allow)?;
        ring.submitter().register_enable_rings()?;
        Ok(TxRing {
            ring,
            fixed: None,
            unfixed,
        })
    }

    /// Creates `n` rings for workers to take.
    pub fn fill(n: usize) -> io::Result<usize> {
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..n {
            pool.push(create()?);
        }
        Ok(pool.len())
    }

    pub fn take() -> Option<TxRing> {
        POOL.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    impl TxRing {
        /// Puts `fd` in the ring's file slot 0 (or empties it with -1); waits for the answer.
        fn install(&mut self, fd: RawFd) -> io::Result<()> {
            let fds = [fd];
            let e = opcode::FilesUpdate::new(fds.as_ptr(), 1)
                .offset(0)
                .build()
                .user_data(u64::MAX);
            // SAFETY: `fds` outlives the request, which is reaped below before returning.
            unsafe { self.ring.submission().push(&e) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            loop {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let mut res = Err(io::Error::other("no completion for the file update"));
            for c in self.ring.completion() {
                res = match c.result() {
                    1 => Ok(()),
                    r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                    r => Err(io::Error::other(format!("file update answered {r}"))),
                };
            }
            res
        }

        /// The tap as the writes name it: the ring's fixed slot once `fd` is installed there.
        fn target(&mut self, fd: RawFd) -> Result<types::Fixed, types::Fd> {
            if self.unfixed {
                return Err(types::Fd(fd));
            }
            if self.fixed != Some(fd) {
                match self.install(fd) {
                    Ok(()) => self.fixed = Some(fd),
                    Err(e) => {
                        log::debug!("tap not installed in the io_uring ({e}); writes name it");
                        self.fixed = None;
                        self.unfixed = true;
                        return Err(types::Fd(fd));
                    }
                }
            }
            Ok(types::Fixed(0))
        }

        /// Writes every frame slot in order and waits for all of them; sets each slot's
        /// `result`.
        pub fn write_batch(&mut self, fd: RawFd, slots: &mut [TxSlot]) -> io::Result<()> {
            let frames = slots
                .iter()
                .filter(|t| matches!(t.verdict, TxVerdict::Frame(_)))
                .count();
            if frames == 0 {
                return Ok(());
            }
            let target = self.target(fd);
            {
                let mut sq = self.ring.submission();
                for (i, t) in slots.iter().enumerate() {
                    if !matches!(t.verdict, TxVerdict::Frame(_)) {
                        continue;
                    }
                    let segs = t.segs();
                    let n = iov_count(segs.len()).unsigned_abs();
                    // RWF_NOWAIT: a full tap answers EAGAIN (as `writev` on the O_NONBLOCK
                    // descriptor does) instead of io_uring waiting for room on our thread.
                    let e = match target {
                        Ok(fixed) => opcode::Writev::new(fixed, segs.as_ptr(), n),
                        Err(fd) => opcode::Writev::new(fd, segs.as_ptr(), n),
                    }
                    .rw_flags(libc::RWF_NOWAIT)
                    .build()
                    .user_data(i as u64);
                    // SAFETY: the iovec array and the buffers it points to (guest memory under
                    // the caller's guard, and the slot's header) stay valid and unmoved until
                    // the completions are reaped below, before this function returns.
                    unsafe { sq.push(&e) }
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                }
            }
            let mut reaped = 0;
            while reaped < frames {
                match self.ring.submit_and_wait(frames - reaped) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                for c in self.ring.completion() {
                    if let Some(t) = usize::try_from(c.user_data())
                        .ok()
                        .and_then(|i| slots.get_mut(i))
                    {
                        t.result = c.result();
                    }
                    reaped += 1;
                }
            }
            Ok(())
        }
    }

    impl Drop for TxRing {
        /// Lets go of the tap now: the ring itself is torn down by the kernel some time after
        /// it is closed, and until then its file table would keep the tap's queue open.
        fn drop(&mut self) {
            if self.fixed.take().is_some() {
                let _ = self.install(-1);
            }
        }
    }
}

/// Sets up `pairs` io_uring instances for batched tap writes, one per worker; call before the
/// sandbox is installed (it forbids `io_uring_setup`). Workers created later take one each and
/// fall back to one `writev` per frame when none is left. `VHOST_CARD_TX_URING=0` turns it off
/// (for comparisons). Returns how many rings are ready.
pub fn preopen_tx_rings(pairs: usize) -> usize {
    if std::env::var_os("VHOST_CARD_TX_URING").is_some_and(|v| v == "0") {
        return 0;
    }
    match txring::fill(pairs) {
        Ok(n) => n,
        Err(e) => {
            warn!("io_uring unavailable ({e}); TX writes one frame per system call");
            0
        }
    }
}

enum Rx {
    Frame,
    /// Only malformed chains were consumed.
    Consumed,
    /// A frame was dropped, the read interrupted, or buffers arrived meanwhile; try again.
    Retry,
    /// Not enough buffers; notifications are enabled so the guest kicks when it posts more.
    NoBuffers,
    Empty,
    Broken,
}

/// An iovec count for readv/writev (at most `IOV_MAX`, so it always fits).
fn iov_count(n: usize) -> libc::c_int {
    libc::c_int::try_from(n.min(IOV_MAX)).unwrap_or(0)
}

/// Live migration: logs the `n` bytes a frame took in the guest's buffers, after writing them
/// and before the used entries that hand them over (see `dirtylog`). One relaxed load when the
/// frontend is not logging.
#[inline]
fn log_written(mem: &Mem, iovs: &[libc::iovec], n: usize) {
    if LOG.active() {
        LOG.mark_iovs(mem, iovs, n);
    }
}

impl Pair {
    /// Live migration: while the frontend logs, this pass writes used rings through the logged
    /// view of guest memory (see `dirtylog`). One relaxed load otherwise.
    fn begin_logging(&mut self, mem: &Mem) {
        self.logged = None;
        if LOG.active() {
            self.logged = LOG.view_for(mem);
        }
    }

    /// Ends a pass's logging; a pass that could not use the logged view marks the used rings
    /// it wrote now, after writing them.
    fn end_logging(&mut self) {
        if self.logged.take().is_none() && LOG.active() {
            LOG.mark_logged_rings();
        }
    }
}

/// `readv(2)` of the tap through `syscall(2)`. glibc's `readv` is a cancellation point: in a
/// process with threads its wrapper switches asynchronous cancellation on and off around every
/// call (about 3 % of the worker at card to host, 64 B frames); nothing here uses cancellation.
/// The same system call, so the sandbox allows it as before.
///
/// # Safety
/// `segs` must describe memory writable for the duration of the call.
unsafe fn tap_readv(fd: RawFd, segs: &[libc::iovec]) -> isize {
    // SAFETY: the caller vouches for the iovecs; readv takes a descriptor, an array of
    // `segs.len()` iovecs and its length, and writes nothing else.
    let n = unsafe {
        libc::syscall(
            libc::SYS_readv,
            libc::c_long::from(fd),
            segs.as_ptr(),
            libc::c_long::from(iov_count(segs.len())),
        )
    };
    n as isize
}

/// Writes a used element (see [`Used::push`]) through the logged view of guest memory while the
/// frontend logs, through `mem` otherwise (the same memory).
#[inline]
fn push_used(
    used: &mut Used,
    vring: &mut State,
    mem: &Mem,
    logged: Option<&LoggedMem>,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    match logged {
        Some(view) => used.push(vring.get_queue_mut(), view, head, len),
        None => used.push(vring.get_queue_mut(), mem, head, len),
    }
}

/// Stores the used index over what [`push_used`] wrote (see [`Used::publish`]), logged the same
/// way.
#[inline]
fn publish_used(
    used: &mut Used,
    vring: &mut State,
    mem: &Mem,
    logged: Option<&LoggedMem>,
) -> Result<(), virtio_queue::Error> {
    match logged {
        Some(view) => used.publish(vring.get_queue_mut(), view),
        None => used.publish(vring.get_queue_mut(), mem),
    }
}

/// Enables or disables the guest's notifications (used flags or avail_event, in the used ring),
/// like `VringState::{enable,disable}_notification`, through the logged view while the frontend
/// logs. Returns whether more buffers arrived (when enabling).
#[inline]
fn set_notification(
    vring: &mut State,
    mem: &Mem,
    logged: Option<&LoggedMem>,
    enable: bool,
) -> Result<bool, virtio_queue::Error> {
    let q = vring.get_queue_mut();
    match (logged, enable) {
        (Some(view), true) => q.enable_notification(view),
        (Some(view), false) => q.disable_notification(view).map(|()| false),
        (None, true) => q.enable_notification(mem),
        (None, false) => q.disable_notification(mem).map(|()| false),
    }
}

/// Signals used buffers to the guest when `due` (EVENT_IDX asks for it, see
/// [`Used::needs_notification`]), or when `unconditional` (cleared once a signal went out; see
/// `Pair::signal_next`). A signal due while the ring has no call eventfd sets `owed` (see
/// `Pair::call_owed`).
fn notify(
    due: bool,
    vring: &mut State,
    irq: Option<&dyn Interrupt>,
    stats: &PairStats,
    unconditional: &mut bool,
    owed: &mut bool,
) {
    LOG.notify();
    if !due && !*unconditional {
        return;
    }
    if let Some(irq) = irq {
        match irq.raise() {
            Ok(()) => {
                *unconditional = false;
                add(&stats.notifications, 1);
            }
            Err(e) => {
                debug!("cannot notify the driver: {e}");
                add(&stats.notifications_blocked, 1);
            }
        }
        return;
    }
    let Some(call) = vring.get_call() else {
        *owed = true;
        return;
    };
    if signal_call(call.as_raw_fd(), stats) {
        *unconditional = false;
    }
}

/// Writes the frontend's call eventfd `call` and counts it in `stats` (a notification, or a
/// blocked one). The descriptor is the frontend's and may be in blocking mode: a write to a full
/// pipe or to an eventfd at its limit would hang the caller (a worker: both queues of the pair
/// and every later session with it), so it is written only when it takes the write now.
pub fn signal_call(call: RawFd, stats: &PairStats) -> bool {
    let sent = signal_eventfd(call);
    if sent {
        add(&stats.notifications, 1);
    } else {
        add(&stats.notifications_blocked, 1);
    }
    sent
}

/// The `TUNSETOFFLOAD` bits for what the host accepts on its RX queue. With `--rx-csum complete`
/// only partial checksums (which the card completes): no GSO frame, since the spec wants
/// NEEDS_CSUM on each.
pub fn tap_offload(neg: &Negotiated, mode: RxCsum) -> u32 {
    use crate::tap::*;
    if !neg.guest_csum {
        return 0;
    }
    let mut f = TUN_F_CSUM;
    if mode == RxCsum::Complete {
        return f;
    }
    if neg.guest_tso4 {
        f |= TUN_F_TSO4;
    }
    if neg.guest_tso6 {
        f |= TUN_F_TSO6;
    }
    if neg.guest_ecn && (neg.guest_tso4 || neg.guest_tso6) {
        f |= TUN_F_TSO_ECN;
    }
    if neg.guest_ufo {
        f |= TUN_F_UFO;
    }
    // The kernel accepts USO4 and USO6 only together (one alone is EINVAL, which would lose
    // every offload): with one of them negotiated, USO frames are segmented by the card instead.
    if neg.guest_uso4 && neg.guest_uso6 {
        f |= TUN_F_USO4 | TUN_F_USO6;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::default_features;
    use crate::tap::*;

    /// The host addresses a list of iovecs covers, byte by byte, in order.
    fn bytes_of(iovs: &[libc::iovec]) -> Vec<usize> {
        iovs.iter()
            .flat_map(|v| (v.iov_base as usize)..(v.iov_base as usize + v.iov_len))
            .collect()
    }

    #[test]
    fn the_merged_read_iovecs_cover_exactly_the_live_chains() {
        let mut mem = vec![0u8; 1 << 16];
        let base = mem.as_mut_ptr();
        let mut stash = RxStash::new(256);
        // A fixed pseudo-random walk: chains of 1-3 buffers, mostly adjacent, sometimes not,
        // consumed 0-3 at a time, now and then released whole.
        let mut seed = 0x2545_f491_u32;
        let mut rnd = |n: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed % n
        };
        let mut at = 0usize;
        for round in 0..5000 {
            if rnd(50) == 0 {
                stash.clear();
            }
            let bufs = 1 + rnd(3) as usize;
            let mut len = 0;
            for _ in 0..bufs {
                let n = 1 + rnd(300) as usize;
                if rnd(4) == 0 {
                    at += rnd(64) as usize;
                }
                if at + n > mem.len() {
                    at = 0;
                }
                stash.iovs.0.push(libc::iovec {
                    // SAFETY: within `mem`.
                    iov_base: unsafe { base.add(at) }.cast(),
                    iov_len: n,
                });
                at += n;
                len += n;
            }
            stash.push(round as u16, len);
            let live = stash.live().len();
            stash.consume_front((rnd(4) as usize).min(live));
            assert_eq!(
                bytes_of(stash.read_iovs()),
                bytes_of(stash.live_iovs()),
                "round {round}"
            );
            assert!(stash.read_iovs().len() <= stash.live_iovs().len());
            assert_eq!(stash.cap, stash.live().iter().map(|c| c.len).sum::<usize>());
        }
    }

    #[test]
    fn offload_bits_follow_guest_features() {
        let n = Negotiated::from_word(default_features());
        assert_eq!(
            tap_offload(&n, RxCsum::Verify),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        );
        assert_eq!(tap_offload(&n, RxCsum::Complete), TUN_F_CSUM);
        let mut n2 = n;
        n2.guest_csum = false;
        assert_eq!(tap_offload(&n2, RxCsum::Verify), 0);
        n2 = n;
        n2.guest_tso4 = false;
        n2.guest_tso6 = false;
        n2.guest_ecn = true;
        assert_eq!(tap_offload(&n2, RxCsum::Verify), TUN_F_CSUM);
    }
}
