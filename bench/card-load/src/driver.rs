//! The load generator's virtio-net device: the test harness's vhost-user control plane
//! ([`Control`]) and memfd guest memory, with [`Ring`]s that keep the queues full.
//!
//! * TX (host to card): every descriptor points at its own copy of the frame, written once; the
//!   loop only recycles used heads into the available ring, kicking when EVENT_IDX says so.
//! * RX (card to host): single-buffer descriptors (MRG_RXBUF) are posted once and recycled as
//!   soon as they are used; frames and bytes are counted from the used lengths and `num_buffers`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use card_tests::frontend::Control;
use card_tests::netdev::{
    F_CSUM, F_EVENT_IDX, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6,
    F_HOST_UFO, F_MRG_RXBUF, F_MTU, F_VERSION_1,
};
use card_tests::vring::GuestMem;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::ring::{Ring, F_WRITE};

pub const F_MQ: u64 = 1 << 22;
pub const F_HOST_USO: u64 = 1 << 56;
pub const F_GUEST_USO4: u64 = 1 << 54;
pub const F_GUEST_USO6: u64 = 1 << 55;
const F_PROTOCOL: u64 = 1 << 30;

/// Features this driver can use; the rest of an offer is not acked.
const UNDERSTOOD: u64 = F_VERSION_1
    | F_MRG_RXBUF
    | F_EVENT_IDX
    | F_CSUM
    | F_GUEST_CSUM
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_UFO
    | F_HOST_USO
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_USO4
    | F_GUEST_USO6
    | F_MTU
    | F_MQ
    | F_PROTOCOL;

/// Counters shared with the thread that reports them.
#[derive(Default)]
pub struct Counts {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
}

/// A connected device with `pairs` queue pairs.
pub struct Device {
    /// The control connection: closing it ends the session.
    pub _ctl: Control,
    pub mem: GuestMem,
    pub features: u64,
    pub rings: Vec<Ring>,
}

impl Device {
    /// Connects and starts `pairs` queue pairs of `size` descriptors; `mem_mib` of guest memory.
    pub fn start(socket: &Path, pairs: usize, size: u16, mem_mib: usize) -> Result<Self> {
        let mut ctl = Control::connect(socket)?;
        let offer = ctl.handshake()?;
        if (offer.queue_num as usize) < 2 * pairs {
            bail!(
                "the backend serves {} queues, {pairs} pairs wanted",
                offer.queue_num
            );
        }
        let features = offer.features & UNDERSTOOD;
        ctl.set_features(features)?;
        let mut mem = GuestMem::new(mem_mib << 20)?;
        ctl.vu
            .set_mem_table(&[mem.region_info()?])
            .context("SET_MEM_TABLE")?;
        let event_idx = features & F_EVENT_IDX != 0;
        let mut rings = Vec::with_capacity(2 * pairs);
        for i in 0..2 * pairs {
            let r = Ring::new(&mut mem, size, event_idx)?;
            ctl.vu.set_vring_num(i, size).context("SET_VRING_NUM")?;
            ctl.vu.set_vring_base(i, 0).context("SET_VRING_BASE")?;
            ctl.vu
                .set_vring_addr(i, &r.config(&mem)?)
                .context("SET_VRING_ADDR")?;
            ctl.vu
                .set_vring_kick(i, &r.kick)
                .context("SET_VRING_KICK")?;
            ctl.vu
                .set_vring_call(i, &r.call)
                .context("SET_VRING_CALL")?;
            rings.push(r);
        }
        if features & F_PROTOCOL != 0 {
            for i in 0..2 * pairs {
                ctl.vu
                    .set_vring_enable(i, true)
                    .context("SET_VRING_ENABLE")?;
            }
        }
        Ok(Device {
            _ctl: ctl,
            mem,
            features,
            rings,
        })
    }

    pub fn hdr_len(&self) -> usize {
        if self.features & (F_VERSION_1 | F_MRG_RXBUF) != 0 {
            12
        } else {
            10
        }
    }

    /// Guest memory for one queue's buffers (zeroed).
    pub fn alloc(&mut self, len: usize) -> Result<GuestAddress> {
        self.mem.alloc(len, 64)
    }
}

/// Host to card: keeps TX ring `ring` full of `frames` (each with its header, and the wire bytes
/// it stands for), descriptor `i` carrying frame `i % frames.len()`, so several sizes interleave.
/// Distinct buffers for every descriptor, up to `max_bytes` of them, then they repeat. Returns
/// the wire bytes of each descriptor, for [`tx_loop`].
pub fn tx_setup(
    dev: &mut Device,
    ring: usize,
    frames: &[(Vec<u8>, u64)],
    max_bytes: usize,
) -> Result<Vec<u64>> {
    if frames.is_empty() {
        bail!("no frame to send");
    }
    let size = usize::from(dev.rings[ring].size);
    let kinds = frames.len();
    let mut addrs: Vec<Vec<GuestAddress>> = Vec::with_capacity(kinds);
    for (frame, _) in frames {
        let copies = (max_bytes / kinds / frame.len().max(1)).clamp(1, size.div_ceil(kinds));
        let mut these = Vec::with_capacity(copies);
        for _ in 0..copies {
            let a = dev.alloc(frame.len())?;
            dev.mem.mem.write_slice(frame, a)?;
            these.push(a);
        }
        addrs.push(these);
    }
    let r = &mut dev.rings[ring];
    let mut wire = Vec::with_capacity(size);
    for i in 0..size {
        let k = i % kinds;
        let a = addrs[k][(i / kinds) % addrs[k].len()];
        r.set_desc(
            u16::try_from(i)?,
            a.0,
            u32::try_from(frames[k].0.len())?,
            0,
            0,
        );
        wire.push(frames[k].1);
    }
    Ok(wire)
}

/// Recycles TX heads until `stop`; `wire[head]` is what a frame of descriptor `head` counts for.
pub fn tx_loop(r: &mut Ring, wire: &[u64], c: &Counts, stop: &AtomicBool) -> Result<()> {
    for i in 0..r.size {
        r.push(i);
    }
    r.publish()?;
    let quarter = (r.size / 4).max(1);
    let mut free = 0u16;
    while !stop.load(Ordering::Relaxed) {
        let (mut n, mut bytes) = (0u64, 0u64);
        while let Some((head, _)) = r.pop_used() {
            r.push(head);
            n += 1;
            bytes += wire.get(usize::from(head)).copied().unwrap_or(0);
            free += 1;
            if free >= quarter {
                r.publish()?;
                free = 0;
            }
        }
        if n > 0 {
            c.frames.fetch_add(n, Ordering::Relaxed);
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
            r.publish()?;
            free = 0;
        } else {
            r.wait_used(quarter, Duration::from_millis(50))?;
        }
    }
    Ok(())
}

/// Card to host: posts `size` buffers of `buf_len` bytes on RX ring `ring`.
pub fn rx_setup(dev: &mut Device, ring: usize, buf_len: u32) -> Result<Vec<GuestAddress>> {
    let size = dev.rings[ring].size;
    let mut addrs = Vec::with_capacity(usize::from(size));
    for _ in 0..size {
        addrs.push(dev.alloc(buf_len as usize)?);
    }
    let r = &mut dev.rings[ring];
    for (i, a) in addrs.iter().enumerate() {
        r.set_desc(u16::try_from(i)?, a.0, buf_len, F_WRITE, 0);
    }
    Ok(addrs)
}

/// Frames and wire bytes a received frame stands for: a GSO frame counts as the segments the
/// link would carry (each with its Ethernet, IP and L4 headers). `first` is the start of the
/// vnet header, `len` the frame's length without it.
///
/// # Safety
/// `first` must point to at least `hdr_len + 54` readable bytes when the frame is a GSO frame
/// (any frame the kernel hands over with a GSO type has its headers there), and `hdr_len`
/// bytes otherwise.
pub unsafe fn wire_of(first: *const u8, hdr_len: usize, len: u64) -> (u64, u64) {
    // SAFETY: the caller guarantees the header bytes are readable.
    let (gso_type, gso_size) = unsafe {
        (
            *first.add(1),
            u16::from_le_bytes([*first.add(4), *first.add(5)]),
        )
    };
    if gso_type & 0x7f == 0 || gso_size == 0 {
        return (1, len);
    }
    // SAFETY: as above; the frame's Ethernet and IPv4 headers follow the vnet header.
    let f = unsafe { first.add(hdr_len) };
    // SAFETY: as above.
    let (ihl, proto) = unsafe { (usize::from(*f.add(14) & 0xf) * 4, *f.add(23)) };
    let l4 = if proto == 6 {
        // SAFETY: as above (the TCP header's data offset byte).
        usize::from(unsafe { *f.add(14 + ihl + 12) } >> 4) * 4
    } else {
        8
    };
    let hdrs = (14 + ihl + l4) as u64;
    let segs = len
        .saturating_sub(hdrs)
        .div_ceil(u64::from(gso_size))
        .max(1);
    (segs, len + (segs - 1) * hdrs)
}

/// Counts what arrives on an RX ring whose buffers are at `hdrs` (host pointers to each buffer's
/// first bytes), recycling every buffer at once.
pub fn rx_loop(
    r: &mut Ring,
    hdrs: &[*const u8],
    hdr_len: usize,
    mrg: bool,
    spin: Duration,
    c: &Counts,
    stop: &AtomicBool,
) -> Result<()> {
    for i in 0..r.size {
        r.push(i);
    }
    r.publish()?;
    let mut left = 0u16;
    let mut first: *const u8 = std::ptr::null();
    let mut flen = 0u64;
    let mut idle_since: Option<std::time::Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let (mut frames, mut bytes, mut got) = (0u64, 0u64, 0u32);
        while let Some((head, len)) = r.pop_used() {
            let p = hdrs[usize::from(head)];
            if left == 0 {
                left = if mrg {
                    // SAFETY: the buffer's first bytes, written by the device before it used it.
                    let nb = unsafe { u16::from_le_bytes([*p.add(10), *p.add(11)]) };
                    nb.max(1)
                } else {
                    1
                };
                first = p;
                flen = 0;
            }
            left -= 1;
            flen += u64::from(len);
            if left == 0 {
                let len = flen.saturating_sub(hdr_len as u64);
                // SAFETY: the first buffer holds the vnet header and, for a GSO frame, the
                // frame's headers (buffers are at least 1 KiB); it is not reposted yet.
                let (f, b) = unsafe { wire_of(first, hdr_len, len) };
                frames += f;
                bytes += b;
            }
            r.push(head);
            got += 1;
            if got % 64 == 0 {
                r.publish()?;
            }
        }
        if got > 0 {
            c.frames.fetch_add(frames, Ordering::Relaxed);
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
            r.publish()?;
            idle_since = None;
        } else {
            // Poll the ring for a moment before sleeping, as a NAPI driver under load does:
            // a wake-up per burst costs more than the device's wait for buffers.
            let t = *idle_since.get_or_insert_with(std::time::Instant::now);
            if t.elapsed() < spin {
                std::hint::spin_loop();
                continue;
            }
            r.wait_used(1, Duration::from_millis(50))?;
        }
    }
    Ok(())
}

/// Host pointers of guest addresses (for reading RX headers without a copy).
pub fn host_ptrs(dev: &Device, addrs: &[GuestAddress]) -> Result<Vec<usize>> {
    addrs
        .iter()
        .map(|a| {
            dev.mem
                .mem
                .get_host_address(*a)
                .map(|p| p as usize)
                .map_err(|e| anyhow::anyhow!("{a:?}: {e}"))
        })
        .collect()
}
