//! The data path in-process: TX and RX over guest memory with driver-side split rings and a UNIX
//! datagram socketpair standing in for the tap (it keeps frame boundaries like a tap).
//!
//! * No allocation per frame: under a counting global allocator, after a warm-up, thousands of
//!   frames each way cause zero allocations, with and without the io_uring TX path.
//! * Backpressure: when the "tap" is full (EAGAIN), the frames not written go back to the ring
//!   in order and TX waits; once it drains, every frame arrives, in order, exactly once.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use etherparse::PacketBuilder;
use vhost_card::datapath::{preopen_tx_rings, Pair, PairConfig};
use vhost_card::features::{default_features, Negotiated};
use vhost_card::link::IpLink;
use vhost_card::stats::PairStats;
use vhost_card::vnet::RxCsum;
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

/// Counts allocations made by threads that asked for it.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if COUNTING.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by this thread while running `f`.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCS.load(Ordering::Relaxed) - before
}

const QSIZE: u16 = 256;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const HDR: usize = 12;

/// The driver's side of one split ring in guest memory.
struct Driver {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    last_used: u16,
}

impl Driver {
    fn new(base: u64) -> Self {
        Driver {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            avail_idx: 0,
            last_used: 0,
        }
    }

    fn set_desc(&self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(i));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add_(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add_(12)).unwrap();
        mem.write_obj(next, at.unchecked_add_(14)).unwrap();
    }

    fn push(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.store(
            self.avail_idx,
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )
        .unwrap();
    }

    fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let idx: u16 = mem
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .unwrap();
        if idx == self.last_used {
            return None;
        }
        let at = GuestAddress(self.used + 4 + 8 * u64::from(self.last_used % QSIZE));
        let id: u32 = mem.read_obj(at).unwrap();
        let len: u32 = mem.read_obj(at.unchecked_add_(4)).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }
}

trait AddrExt {
    fn unchecked_add_(self, n: u64) -> GuestAddress;
}

impl AddrExt for GuestAddress {
    fn unchecked_add_(self, n: u64) -> GuestAddress {
        GuestAddress(self.0 + n)
    }
}

fn vring(mem: &GuestMemoryAtomic<GuestMemoryMmap>, d: &Driver) -> VringRwLock {
    let v = VringRwLock::new(mem.clone(), QSIZE).unwrap();
    v.set_queue_info(d.desc, d.avail, d.used).unwrap();
    v.set_queue_size(QSIZE);
    v.set_queue_ready(true);
    v.set_enabled(true);
    v
}

/// A datagram socketpair: (the data path's end, the "card kernel's" end).
fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, which we then own.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A queue pair's data path on `fd` (the "tap"), MTU 1500, on the IP-only link or not.
fn pair_on(fd: std::os::fd::RawFd, ip_link: bool) -> Pair {
    Pair::new(
        fd,
        &PairConfig {
            mtu: 1500,
            rx_csum: RxCsum::Verify,
            queue_size: usize::from(QSIZE),
            link: ip_link.then(|| Arc::new(IpLink::new([2, 0, 0, 0, 0, 2]))),
        },
    )
}

/// A UDP frame with valid checksums (so RX verifies it and marks it DATA_VALID).
fn udp_frame(payload: usize) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .udp(1000, 2000);
    let mut v = Vec::new();
    b.write(&mut v, &vec![0x5a; payload]).unwrap();
    v
}

fn steady_state(uring: bool, ip_link: bool) {
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap(),
    );
    let m = mem.memory();
    let mut rxd = Driver::new(0x1_0000);
    let mut txd = Driver::new(0x2_0000);
    let rx_vring = vring(&mem, &rxd);
    let tx_vring = vring(&mem, &txd);
    let (dp, peer) = socketpair();
    if uring {
        preopen_tx_rings(1);
    }
    let mut pair = pair_on(dp.as_raw_fd(), ip_link);
    pair.neg = Negotiated::from_word(default_features());
    let stats = PairStats::default();

    // TX: every descriptor pair is a header and a 1000-byte frame, posted once.
    let frame = udp_frame(958);
    for i in 0..QSIZE / 2 {
        let hdr = 0x10_0000 + u64::from(i) * 2048;
        m.write_slice(&[0u8; HDR], GuestAddress(hdr)).unwrap();
        m.write_slice(&frame, GuestAddress(hdr + 64)).unwrap();
        txd.set_desc(&m, 2 * i, hdr, HDR as u32, F_NEXT, 2 * i + 1);
        txd.set_desc(&m, 2 * i + 1, hdr + 64, frame.len() as u32, 0, 0);
    }
    // RX: single 1536-byte buffers (MRG_RXBUF).
    for i in 0..QSIZE {
        rxd.set_desc(&m, i, 0x40_0000 + u64::from(i) * 2048, 1536, F_WRITE, 0);
    }
    for i in 0..QSIZE {
        rxd.push(&m, i);
    }
    let mut rx_frame = vec![0u8; HDR];
    // A tun hands over the IP packet alone.
    rx_frame.extend(&udp_frame(500)[if ip_link { 14 } else { 0 }..]);
    let mut sink = vec![0u8; 4096];
    // Two fragments of a 1400-byte datagram, reassembled by the card each round.
    let whole = udp_frame(1400 - 28);
    let frag = |first: bool, id: u16| {
        let mut f = vec![0u8; HDR];
        let eth_ip = &whole[..34];
        let payload = if first {
            &whole[34..34 + 800]
        } else {
            &whole[34 + 800..]
        };
        let mut h = eth_ip.to_vec();
        h[16..18].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        h[18..20].copy_from_slice(&id.to_be_bytes());
        h[20..22].copy_from_slice(&(if first { 0x2000u16 } else { 800 / 8 }).to_be_bytes());
        h[24] = 0;
        h[25] = 0;
        let c = etherparse::checksum::u64_16bit_word::ones_complement(
            etherparse::checksum::u64_16bit_word::add_slice(0, &h[14..34]),
        );
        h[24..26].copy_from_slice(&c.to_ne_bytes());
        f.extend(&h[if ip_link { 14 } else { 0 }..]);
        f.extend(payload);
        f
    };
    // Built once: the same identification again is a new datagram once the last one completed.
    let frags = [frag(true, 7), frag(false, 7)];

    let mut round = |n: usize| {
        for _ in 0..n {
            // Host to card: post 64 frames, move them, drain the "tap".
            for k in 0..64u16 {
                txd.push(&m, 2 * (k % (QSIZE / 2)));
            }
            pair.process_tx(&mut tx_vring.get_mut(), &m, &stats);
            while txd.pop_used(&m).is_some() {}
            loop {
                // SAFETY: `sink` is valid for writes of its length.
                let r = unsafe {
                    libc::recv(peer.as_raw_fd(), sink.as_mut_ptr().cast(), sink.len(), 0)
                };
                if r <= 0 {
                    break;
                }
            }
            // Card to host: 32 frames from the "tap" into the posted buffers.
            for _ in 0..32 {
                // SAFETY: `rx_frame` is valid for reads of its length.
                let r = unsafe {
                    libc::send(
                        peer.as_raw_fd(),
                        rx_frame.as_ptr().cast(),
                        rx_frame.len(),
                        0,
                    )
                };
                assert_eq!(r as usize, rx_frame.len());
            }
            for f in &frags {
                // SAFETY: `f` is valid for reads of its length.
                let r = unsafe { libc::send(peer.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
                assert_eq!(r as usize, f.len());
            }
            pair.rx_pending = true;
            pair.process_rx(&mut rx_vring.get_mut(), &m, &stats);
            // Used buffers are posted again (the others went back to the ring unused).
            while let Some((head, _)) = rxd.pop_used(&m) {
                rxd.push(&m, head);
            }
        }
    };
    round(20);
    let tx0 = stats.tx_frames.load(Ordering::Relaxed);
    let rx0 = stats.rx_frames.load(Ordering::Relaxed);
    let n = allocations(|| round(100));
    let tx = stats.tx_frames.load(Ordering::Relaxed) - tx0;
    let rx = stats.rx_frames.load(Ordering::Relaxed) - rx0;
    assert_eq!(tx, 6400, "TX frames moved: {:?}", stats.snapshot());
    assert_eq!(rx, 3300, "RX frames moved: {:?}", stats.snapshot());
    assert!(stats.reasm_datagrams.load(Ordering::Relaxed) >= 100);
    assert!(stats.rx_csum_verified.load(Ordering::Relaxed) > 0);
    eprintln!(
        "{tx} TX and {rx} RX frames, {n} allocations (TX through io_uring: {}, IP-only link: \
         {ip_link})",
        pair.tx_uring()
    );
    assert_eq!(
        n,
        0,
        "{n} allocations for {tx} TX and {rx} RX frames (io_uring: {})",
        pair.tx_uring()
    );
}

/// Tests take turns: an io_uring one test sets up must not be taken by another's worker.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn no_allocation_per_frame() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    // The counter sees an allocation when there is one.
    assert_eq!(allocations(|| drop(std::hint::black_box(vec![1u8; 10]))), 1);
    steady_state(false, false);
    steady_state(true, false);
    steady_state(false, true);
    steady_state(true, true);
}

fn backpressure(uring: bool) {
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap(),
    );
    let m = mem.memory();
    let mut txd = Driver::new(0x2_0000);
    let tx_vring = vring(&mem, &txd);
    let (dp, peer) = socketpair();
    // A small send buffer: the socketpair says EAGAIN after a few frames, like a full tap.
    let small: libc::c_int = 4096;
    // SAFETY: `small` is a valid c_int for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            dp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    if uring {
        preopen_tx_rings(1);
    }
    let mut pair = pair_on(dp.as_raw_fd(), false);
    pair.neg = Negotiated::from_word(default_features());
    let stats = PairStats::default();
    // 100 frames, each numbered in its first payload byte.
    const N: u16 = 100;
    for i in 0..N {
        let at = 0x10_0000 + u64::from(i) * 2048;
        let mut f = udp_frame(200);
        f[42] = i as u8;
        m.write_slice(&[0u8; HDR], GuestAddress(at)).unwrap();
        m.write_slice(&f, GuestAddress(at + HDR as u64)).unwrap();
        txd.set_desc(&m, i, at, (HDR + f.len()) as u32, 0, 0);
        txd.push(&m, i);
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut blocked = 0;
    for _ in 0..1000 {
        pair.process_tx(&mut tx_vring.get_mut(), &m, &stats);
        if pair.tx_blocked {
            blocked += 1;
        }
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let r = unsafe { libc::recv(peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if r <= 0 {
                break;
            }
            got.push(buf[HDR + 42]);
        }
        // The "tap" drained: what EPOLLOUT tells the worker.
        pair.tx_blocked = false;
        if got.len() == usize::from(N) {
            break;
        }
    }
    let mut used = 0;
    while txd.pop_used(&m).is_some() {
        used += 1;
    }
    assert!(blocked > 0, "the socketpair never filled up");
    assert_eq!(stats.tx_tap_full.load(Ordering::Relaxed), blocked);
    assert_eq!(used, N, "every chain used once");
    let want: Vec<u8> = (0..N).map(|i| i as u8).collect();
    assert_eq!(
        got, want,
        "frames lost, duplicated or reordered (io_uring: {uring})"
    );
    assert_eq!(stats.tx_frames.load(Ordering::Relaxed), u64::from(N));
    eprintln!(
        "{N} frames through a full socketpair, {blocked} EAGAIN stops (TX through io_uring: {})",
        pair.tx_uring()
    );
}

#[test]
fn full_tap_rewinds_and_keeps_order() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    backpressure(false);
    backpressure(true);
}
