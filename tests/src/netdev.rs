//! A minimal virtio-net driver over [`Control`] and two [`Vq`]s: RX queue 0, TX queue 1.
//!
//! TX frames are written as chains of device-readable buffers in one of several layouts (header
//! and frame together, apart, scattered, or behind an indirect table). RX buffers are posted up
//! front, either many small single-descriptor buffers (MRG_RXBUF) or a few big chains laid out
//! like Linux's "big packets" mode (a 12-byte header descriptor and 17 pages); used buffers are
//! read back and posted again.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vm_memory::GuestAddress;

use crate::frontend::Control;
use crate::packet::VnetHdr;
use crate::vring::{Buf, GuestMem, RawDesc, Vq, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};

pub const RX: usize = 0;
pub const TX: usize = 1;

/// virtio-net feature bits the tests look at.
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MTU: u64 = 1 << 3;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_UFO: u64 = 1 << 14;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_GUEST_ANNOUNCE: u64 = 1 << 21;
/// vhost's VHOST_F_LOG_ALL (live migration's dirty log).
pub const F_LOG_ALL: u64 = 1 << 26;
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// How the RX queue is filled.
#[derive(Debug, Clone)]
pub struct RxLayout {
    /// Descriptor lengths of one buffer chain.
    pub chain: Vec<u32>,
    /// Number of chains posted.
    pub chains: usize,
}

impl RxLayout {
    /// Single-descriptor buffers of `len` bytes, as a driver with MRG_RXBUF posts them.
    pub fn mergeable(len: u32, chains: usize) -> Self {
        RxLayout {
            chain: vec![len],
            chains,
        }
    }

    /// One device-writable buffer of `len` bytes per chain.
    pub fn single(len: u32, chains: usize) -> Self {
        RxLayout {
            chain: vec![len],
            chains,
        }
    }

    /// Chains of a 12-byte header descriptor and 17 pages (room for a 64 KiB GSO frame), as a
    /// driver without MRG_RXBUF posts them.
    pub fn big(chains: usize) -> Self {
        let mut chain = vec![VnetHdr::LEN as u32];
        chain.extend(std::iter::repeat_n(4096, 17));
        RxLayout { chain, chains }
    }
}

/// How a TX frame is spread over descriptors.
#[derive(Debug, Clone)]
pub enum TxLayout {
    /// Header and frame in one descriptor.
    Combined,
    /// Header in one descriptor, frame in the next.
    Split,
    /// Header and frame cut into pieces of these lengths (the rest goes into a last piece).
    Pieces(Vec<usize>),
    /// Like `Pieces`, behind one indirect descriptor.
    Indirect(Vec<usize>),
}

/// Driver options.
#[derive(Debug, Clone)]
pub struct Options {
    pub mem_size: usize,
    pub queue_size: u16,
    pub rx: RxLayout,
    /// Send SET_VRING_ENABLE for both queues after setting them up (QEMU does).
    pub enable_rings: bool,
    /// Create the guest memfd with `MFD_ALLOW_SEALING` (QEMU's memfd backend does).
    pub allow_sealing: bool,
    /// Hand the device kick eventfds in blocking mode (QEMU's are non-blocking).
    pub blocking_kicks: bool,
    /// Describe guest memory as two regions of the one memfd, its two halves (QEMU sends RAM
    /// around the VGA hole as two regions of one file).
    pub split_memory: bool,
    /// Leave SET_VRING_CALL out of the set-up: the test sends it when it wants (QEMU sends it
    /// after SET_VRING_KICK, so a kick may be served before the call is there).
    pub withhold_calls: bool,
}

impl Options {
    /// What suits the feature word: small buffers with MRG_RXBUF, big chains without.
    pub fn for_features(features: u64) -> Self {
        Options {
            mem_size: 64 << 20,
            queue_size: 256,
            rx: if features & F_MRG_RXBUF != 0 {
                RxLayout::mergeable(1536, 128)
            } else {
                RxLayout::big(12)
            },
            enable_rings: true,
            allow_sealing: false,
            blocking_kicks: false,
            split_memory: false,
            withhold_calls: false,
        }
    }
}

/// One received frame.
#[derive(Debug, Clone)]
pub struct RxFrame {
    pub hdr: VnetHdr,
    pub frame: Vec<u8>,
    /// Lengths the device wrote into each buffer the frame used.
    pub used_lens: Vec<u32>,
    /// Heads of the buffers the frame used, in order.
    pub heads: Vec<u16>,
    /// The guest memory the device wrote: (address, bytes) of every buffer segment it filled.
    pub written: Vec<(GuestAddress, u32)>,
}

/// A started virtio-net device.
pub struct VirtioNet {
    pub ctl: Control,
    pub mem: GuestMem,
    pub rx: Vq,
    pub tx: Vq,
    pub features: u64,
    rx_bufs: HashMap<u16, Vec<Buf>>,
    /// Heads of malformed RX chains posted with [`VirtioNet::post_rx_raw`] not yet given back.
    rx_bad: HashSet<u16>,
    /// Malformed RX chains the device gave back: (head, length it claimed to write).
    pub rx_bad_returned: Vec<(u16, u32)>,
    /// Good RX buffers the device gave back empty (length 0).
    pub rx_empty_returned: usize,
}

impl VirtioNet {
    /// QEMU's vhost_dev_start: SET_FEATURES, SET_MEM_TABLE, then per queue SET_VRING_NUM,
    /// SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL; then (optionally)
    /// SET_VRING_ENABLE; then RX buffers are posted.
    pub fn start(mut ctl: Control, features: u64, opts: &Options) -> Result<Self> {
        ctl.set_features(features)?;
        let mut mem = GuestMem::with_sealing(opts.mem_size, opts.allow_sealing)?;
        let whole = mem.region_info()?;
        let regions = if opts.split_memory {
            let half = whole.memory_size / 2;
            vec![
                VhostUserMemoryRegionInfo {
                    memory_size: half,
                    ..whole
                },
                VhostUserMemoryRegionInfo {
                    guest_phys_addr: whole.guest_phys_addr + half,
                    memory_size: whole.memory_size - half,
                    userspace_addr: whole.userspace_addr + half,
                    mmap_offset: whole.mmap_offset + half,
                    ..whole
                },
            ]
        } else {
            vec![whole]
        };
        ctl.vu.set_mem_table(&regions).context("SET_MEM_TABLE")?;
        let mut rx = Vq::new(&mut mem, opts.queue_size)?;
        let mut tx = Vq::new(&mut mem, opts.queue_size)?;
        if opts.blocking_kicks {
            rx.kick = vmm_sys_util::eventfd::EventFd::new(0)?;
            tx.kick = vmm_sys_util::eventfd::EventFd::new(0)?;
        }
        for (i, q) in [(RX, &rx), (TX, &tx)] {
            ctl.vu.set_vring_num(i, q.size).context("SET_VRING_NUM")?;
            ctl.vu.set_vring_base(i, 0).context("SET_VRING_BASE")?;
            ctl.vu
                .set_vring_addr(i, &q.config(&mem)?)
                .context("SET_VRING_ADDR")?;
            ctl.vu
                .set_vring_kick(i, &q.kick)
                .context("SET_VRING_KICK")?;
            if !opts.withhold_calls {
                ctl.vu
                    .set_vring_call(i, &q.call)
                    .context("SET_VRING_CALL")?;
            }
        }
        if opts.enable_rings {
            for i in [RX, TX] {
                ctl.vu
                    .set_vring_enable(i, true)
                    .context("SET_VRING_ENABLE")?;
            }
        }
        let mut dev = VirtioNet {
            ctl,
            mem,
            rx,
            tx,
            features,
            rx_bufs: HashMap::new(),
            rx_bad: HashSet::new(),
            rx_bad_returned: Vec::new(),
            rx_empty_returned: 0,
        };
        dev.post_rx(&opts.rx)?;
        Ok(dev)
    }

    /// Posts (more) RX buffers laid out as `layout` says, and kicks; returns their heads.
    pub fn post_rx(&mut self, layout: &RxLayout) -> Result<Vec<u16>> {
        let heads = self.post_rx_nokick(layout)?;
        self.rx.kick()?;
        Ok(heads)
    }

    /// Posts RX buffers without kicking (to build a batch with [`Vq::begin_batch`]).
    pub fn post_rx_nokick(&mut self, layout: &RxLayout) -> Result<Vec<u16>> {
        let mut heads = Vec::with_capacity(layout.chains);
        for _ in 0..layout.chains {
            let bufs = layout
                .chain
                .iter()
                .map(|&len| {
                    Ok(Buf {
                        addr: self.mem.alloc(len as usize, 64)?,
                        len,
                        write: true,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let head = self.rx.add(&self.mem, &bufs)?;
            self.rx_bufs.insert(head, bufs);
            heads.push(head);
        }
        Ok(heads)
    }

    /// Posts a malformed RX chain (no kick). When the device gives it back, [`VirtioNet::recv`]
    /// records it in `rx_bad_returned` instead of reading it.
    pub fn post_rx_raw(&mut self, descs: &[RawDesc]) -> Result<u16> {
        let head = self.rx.add_raw(&self.mem, descs)?;
        self.rx_bad.insert(head);
        Ok(head)
    }

    pub fn mrg_rxbuf(&self) -> bool {
        self.features & F_MRG_RXBUF != 0
    }

    /// Places header + frame in guest memory as `layout` says and makes the chain available.
    pub fn send(&mut self, hdr: &VnetHdr, frame: &[u8], layout: &TxLayout) -> Result<u16> {
        let mut bytes = hdr.encode().to_vec();
        bytes.extend_from_slice(frame);
        let lens: Vec<usize> = match layout {
            TxLayout::Combined => vec![bytes.len()],
            TxLayout::Split => vec![VnetHdr::LEN, frame.len()],
            TxLayout::Pieces(p) | TxLayout::Indirect(p) => {
                // Pieces past the end of a short frame are cut (empty ones dropped).
                let mut v = Vec::with_capacity(p.len() + 1);
                let mut left = bytes.len();
                for &len in p {
                    let len = len.min(left);
                    if len > 0 {
                        v.push(len);
                    }
                    left -= len;
                }
                if left > 0 {
                    v.push(left);
                }
                v
            }
        };
        let mut bufs = Vec::with_capacity(lens.len());
        let mut at = 0;
        for len in lens {
            let addr = self.mem.scratch(len)?;
            self.mem.write(addr, &bytes[at..at + len])?;
            at += len;
            bufs.push(Buf {
                addr,
                len: u32::try_from(len)?,
                write: false,
            });
        }
        let head = if let TxLayout::Indirect(_) = layout {
            let table = self.mem.scratch(16 * bufs.len())?;
            for (i, b) in bufs.iter().enumerate() {
                let last = i + 1 == bufs.len();
                let mut raw = [0u8; 16];
                raw[0..8].copy_from_slice(&b.addr.0.to_le_bytes());
                raw[8..12].copy_from_slice(&b.len.to_le_bytes());
                let flags = if last { 0 } else { VRING_DESC_F_NEXT };
                raw[12..14].copy_from_slice(&flags.to_le_bytes());
                let next = if last { 0 } else { u16::try_from(i + 1)? };
                raw[14..16].copy_from_slice(&next.to_le_bytes());
                self.mem
                    .write(GuestAddress(table.0 + 16 * i as u64), &raw)?;
            }
            self.tx.add_raw(
                &self.mem,
                &[RawDesc {
                    addr: table.0,
                    len: u32::try_from(16 * bufs.len())?,
                    flags: VRING_DESC_F_INDIRECT,
                    next: None,
                }],
            )?
        } else {
            self.tx.add(&self.mem, &bufs)?
        };
        self.tx.kick()?;
        Ok(head)
    }

    /// Waits until the device gives TX chain `head` back.
    pub fn wait_tx(&mut self, head: u16) -> Result<()> {
        let (used, _) = self
            .tx
            .wait_used(&self.mem, Duration::from_secs(5))
            .context("waiting for a TX chain to come back")?;
        ensure!(used == head, "TX chain {used} came back, expected {head}");
        Ok(())
    }

    /// Sends a frame and waits until the device has consumed it.
    pub fn send_wait(&mut self, hdr: &VnetHdr, frame: &[u8], layout: &TxLayout) -> Result<()> {
        let head = self.send(hdr, frame, layout)?;
        self.wait_tx(head)
    }

    /// Makes an arbitrary (possibly malformed) TX chain available and waits for it to come back.
    pub fn send_raw_wait(&mut self, descs: &[RawDesc]) -> Result<()> {
        let head = self.tx.add_raw(&self.mem, descs)?;
        self.tx.kick()?;
        self.wait_tx(head)
    }

    /// Receives the next frame (all the buffers it used), posting the buffers again.
    pub fn recv(&mut self, timeout: Duration) -> Result<RxFrame> {
        let deadline = Instant::now() + timeout;
        let (head, len) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (head, len) = self
                .rx
                .wait_used(&self.mem, left)
                .context("waiting for an RX frame")?;
            if self.rx_bad.remove(&head) {
                self.rx_bad_returned.push((head, len));
                continue;
            }
            if len == 0 {
                // A good buffer handed back unused: post it again.
                self.rx_empty_returned += 1;
                self.repost(head)?;
                self.rx.kick()?;
                continue;
            }
            break (head, len);
        };
        let mut used = vec![(head, len)];
        let mut data = self.read_rx(head, len)?;
        ensure!(
            data.len() >= VnetHdr::LEN,
            "RX buffer holds {} bytes, less than a vnet header",
            data.len()
        );
        let hdr = VnetHdr::decode(&data)?;
        let buffers = if self.mrg_rxbuf() {
            usize::from(hdr.num_buffers)
        } else {
            1
        };
        for _ in 1..buffers {
            let (h, l) = self
                .rx
                .wait_used(&self.mem, Duration::from_secs(2))
                .with_context(|| format!("frame announced {buffers} buffers"))?;
            data.extend(self.read_rx(h, l)?);
            used.push((h, l));
        }
        // Take every used chain's buffers out before posting any again: a descriptor freed by
        // one of them may become the head of a reposted chain.
        let bufs = used
            .iter()
            .map(|&(h, _)| {
                self.rx_bufs
                    .remove(&h)
                    .with_context(|| format!("RX head {h} not posted"))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut written = Vec::new();
        for (chain, &(_, len)) in bufs.iter().zip(&used) {
            let mut left = len;
            for b in chain {
                if left == 0 {
                    break;
                }
                written.push((b.addr, left.min(b.len)));
                left -= left.min(b.len);
            }
        }
        for b in bufs {
            let nh = self.rx.add(&self.mem, &b)?;
            self.rx_bufs.insert(nh, b);
        }
        self.rx.kick()?;
        Ok(RxFrame {
            hdr,
            frame: data.split_off(VnetHdr::LEN),
            used_lens: used.iter().map(|&(_, l)| l).collect(),
            heads: used.iter().map(|&(h, _)| h).collect(),
            written,
        })
    }

    fn repost(&mut self, head: u16) -> Result<()> {
        let bufs = self
            .rx_bufs
            .remove(&head)
            .with_context(|| format!("RX head {head} not posted"))?;
        let nh = self.rx.add(&self.mem, &bufs)?;
        self.rx_bufs.insert(nh, bufs);
        Ok(())
    }

    fn read_rx(&self, head: u16, len: u32) -> Result<Vec<u8>> {
        let bufs = self
            .rx_bufs
            .get(&head)
            .with_context(|| format!("device used RX head {head}, which is not posted"))?;
        let cap: u32 = bufs.iter().map(|b| b.len).sum();
        ensure!(
            len <= cap,
            "device wrote {len} bytes into a {cap}-byte buffer"
        );
        let mut out = Vec::with_capacity(len as usize);
        let mut left = len as usize;
        for b in bufs {
            if left == 0 {
                break;
            }
            let n = left.min(b.len as usize);
            out.extend(self.mem.read(b.addr, n)?);
            left -= n;
        }
        Ok(out)
    }

    /// Receives frames until one satisfies `pred` (others, like stray ARP, are skipped).
    pub fn recv_matching(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&RxFrame) -> bool,
    ) -> Result<RxFrame> {
        let deadline = Instant::now() + timeout;
        let mut skipped = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no matching RX frame within {timeout:?} ({skipped} others skipped)");
            }
            let f = self.recv(left)?;
            if pred(&f) {
                return Ok(f);
            }
            skipped += 1;
        }
    }

    /// Tells the daemon the session is over the way QEMU stops a device: GET_VRING_BASE on
    /// each queue. Not needed before a disconnect; used to check the daemon answers it.
    pub fn get_vring_bases(&mut self) -> Result<[u32; 2]> {
        Ok([
            self.ctl
                .vu
                .get_vring_base(RX)
                .context("GET_VRING_BASE rx")?,
            self.ctl
                .vu
                .get_vring_base(TX)
                .context("GET_VRING_BASE tx")?,
        ])
    }

    /// Checks the control connection still answers (GET_FEATURES).
    pub fn ping(&self) -> Result<u64> {
        self.ctl.vu.get_features().context("GET_FEATURES")
    }
}
