//! Guest memory and the driver's side of a split virtqueue (virtio 1.x, section 2.7).
//!
//! Guest memory is one memfd mapped shared at guest physical address [`GUEST_BASE`]; the daemon
//! maps the same memfd after SET_MEM_TABLE. A [`Vq`] lays out its descriptor table, available
//! ring and used ring in that memory and plays the driver: it writes chains, publishes them,
//! kicks, and collects used buffers, waiting on the call eventfd.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vhost::{VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest physical address of the first byte of guest memory (not 0, so that a frontend or
/// daemon mixing up guest and host addresses fails loudly).
pub const GUEST_BASE: u64 = 0x4000_0000;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

/// Guest memory backed by a memfd, with two bump allocators: one for things that live as long
/// as the memory (rings, RX buffers), one that wraps around for TX buffers.
pub struct GuestMem {
    pub mem: GuestMemoryMmap,
    /// Keeps the memfd open (the mapping holds its own reference too).
    _file: File,
    size: u64,
    next_static: u64,
    scratch_start: u64,
    next_scratch: u64,
}

impl GuestMem {
    /// `size` bytes; the upper half is the TX scratch area. The memfd does not allow seals.
    pub fn new(size: usize) -> Result<Self> {
        Self::with_sealing(size, false)
    }

    /// As [`GuestMem::new`]; `allow_sealing` creates the memfd with `MFD_ALLOW_SEALING`, as
    /// QEMU's `memory-backend-memfd` does.
    pub fn with_sealing(size: usize, allow_sealing: bool) -> Result<Self> {
        let name = CString::new("card-tests-guest")?;
        let flags = libc::MFD_CLOEXEC
            | if allow_sealing {
                libc::MFD_ALLOW_SEALING
            } else {
                0
            };
        // SAFETY: memfd_create reads a NUL-terminated name that outlives the call.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if fd < 0 {
            bail!("memfd_create: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        let region = MmapRegion::from_file(FileOffset::new(file.try_clone()?, 0), size)
            .map_err(|e| anyhow!("mapping guest memory: {e}"))?;
        let region = GuestRegionMmap::new(region, GuestAddress(GUEST_BASE))
            .context("guest region overflows")?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| anyhow!("guest memory: {e}"))?;
        let size = size as u64;
        Ok(GuestMem {
            mem,
            _file: file,
            size,
            next_static: 0,
            scratch_start: size / 2,
            next_scratch: size / 2,
        })
    }

    /// The memfd behind guest memory (a hostile frontend may truncate it).
    pub fn file(&self) -> &File {
        &self._file
    }

    /// Size of guest memory in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The region as SET_MEM_TABLE describes it (memfd, and this process's mapping address as
    /// the frontend's "userspace" address).
    pub fn region_info(&self) -> Result<VhostUserMemoryRegionInfo> {
        let region = self.mem.iter().next().context("no guest memory region")?;
        VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(|e| anyhow!("region info: {e}"))
    }

    /// This process's address of guest address `gpa` (what SET_VRING_ADDR carries).
    pub fn host_addr(&self, gpa: GuestAddress) -> Result<u64> {
        let p = self
            .mem
            .get_host_address(gpa)
            .map_err(|e| anyhow!("{gpa:?}: {e}"))?;
        Ok(p as u64)
    }

    /// Zeroed memory that stays allocated.
    pub fn alloc(&mut self, len: usize, align: u64) -> Result<GuestAddress> {
        let start = self.next_static.next_multiple_of(align);
        let end = start + len as u64;
        if end > self.scratch_start {
            bail!("guest memory exhausted ({len} bytes more)");
        }
        self.next_static = end;
        let gpa = GuestAddress(GUEST_BASE + start);
        self.mem.write_slice(&vec![0u8; len], gpa)?;
        Ok(gpa)
    }

    /// Memory for a TX buffer; reused after the scratch area wraps around, so it must be
    /// consumed by the device long before then.
    pub fn scratch(&mut self, len: usize) -> Result<GuestAddress> {
        let len = len as u64;
        if len > self.size - self.scratch_start {
            bail!("TX buffer of {len} bytes is larger than the scratch area");
        }
        let mut start = self.next_scratch.next_multiple_of(64);
        if start + len > self.size {
            start = self.scratch_start;
        }
        self.next_scratch = start + len;
        Ok(GuestAddress(GUEST_BASE + start))
    }

    pub fn write(&self, gpa: GuestAddress, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, gpa)
            .map_err(|e| anyhow!("write {gpa:?}: {e}"))
    }

    pub fn read(&self, gpa: GuestAddress, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, gpa)
            .map_err(|e| anyhow!("read {gpa:?}: {e}"))?;
        Ok(v)
    }
}

/// One descriptor as written into a table. `next` is an index into the list of descriptors being
/// written (the ring translates it to the table slot it allocated).
#[derive(Debug, Clone, Copy)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: Option<usize>,
}

/// A buffer of a chain: guest address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    pub write: bool,
}

/// The driver side of one split virtqueue.
pub struct Vq {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    free: Vec<u16>,
    /// Table slots each outstanding head holds.
    outstanding: Vec<Option<Vec<u16>>>,
    avail_idx: u16,
    last_used: u16,
    /// While set, new chains are written but the available index is not updated.
    batching: bool,
    pub kick: EventFd,
    pub call: EventFd,
}

impl Vq {
    pub fn new(mem: &mut GuestMem, size: u16) -> Result<Self> {
        let n = usize::from(size);
        let desc = mem.alloc(16 * n, 4096)?;
        let avail = mem.alloc(6 + 2 * n, 4096)?;
        let used = mem.alloc(6 + 8 * n, 4096)?;
        Ok(Vq {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            outstanding: vec![None; n],
            avail_idx: 0,
            last_used: 0,
            batching: false,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// SET_VRING_ADDR's payload: the rings' addresses in this process.
    pub fn config(&self, mem: &GuestMem) -> Result<VringConfigData> {
        Ok(VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: mem.host_addr(self.desc)?,
            used_ring_addr: mem.host_addr(self.used)?,
            avail_ring_addr: mem.host_addr(self.avail)?,
            log_addr: None,
        })
    }

    /// Writes a chain of ordinary buffers and makes it available; returns its head.
    pub fn add(&mut self, mem: &GuestMem, bufs: &[Buf]) -> Result<u16> {
        let descs: Vec<RawDesc> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| RawDesc {
                addr: b.addr.0,
                len: b.len,
                flags: if b.write { VRING_DESC_F_WRITE } else { 0 }
                    | if i + 1 < bufs.len() {
                        VRING_DESC_F_NEXT
                    } else {
                        0
                    },
                next: (i + 1 < bufs.len()).then_some(i + 1),
            })
            .collect();
        self.add_raw(mem, &descs)
    }

    /// Writes arbitrary descriptors (the first is the head) and makes the head available.
    /// Anything goes: bad addresses, loops, wrong directions.
    pub fn add_raw(&mut self, mem: &GuestMem, descs: &[RawDesc]) -> Result<u16> {
        if descs.is_empty() || descs.len() > self.free.len() {
            bail!(
                "{} descriptors wanted, {} free",
                descs.len(),
                self.free.len()
            );
        }
        let slots: Vec<u16> = (0..descs.len())
            .map(|_| self.free.pop().expect("checked above"))
            .collect();
        for (d, &slot) in descs.iter().zip(&slots) {
            let at = self.desc.unchecked_add(16 * u64::from(slot));
            let next = d.next.map_or(0, |i| slots[i]);
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write(at, &raw)?;
        }
        let head = slots[0];
        self.outstanding[usize::from(head)] = Some(slots);
        let entry = self
            .avail
            .unchecked_add(4 + 2 * u64::from(self.avail_idx % self.size));
        mem.write(entry, &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        if !self.batching {
            self.publish(mem)?;
        }
        Ok(head)
    }

    /// From now on chains are added without being published...
    pub fn begin_batch(&mut self) {
        self.batching = true;
    }

    /// ...until this publishes them all at once.
    pub fn end_batch(&mut self, mem: &GuestMem) -> Result<()> {
        self.batching = false;
        self.publish(mem)
    }

    fn publish(&self, mem: &GuestMem) -> Result<()> {
        // Release: the descriptors and the ring entries are visible before the new index.
        mem.mem.store(
            self.avail_idx,
            self.avail.unchecked_add(2),
            Ordering::Release,
        )?;
        Ok(())
    }

    /// Notifies the device (always; the device copes with spurious kicks).
    pub fn kick(&self) -> Result<()> {
        fence(Ordering::SeqCst);
        self.kick.write(1).context("kick")
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMem) -> Result<u16> {
        Ok(mem
            .mem
            .load::<u16>(self.used.unchecked_add(2), Ordering::Acquire)?)
    }

    /// Takes the next used element, if any: (head, length written).
    pub fn pop_used(&mut self, mem: &GuestMem) -> Result<Option<(u16, u32)>> {
        if self.used_idx(mem)? == self.last_used {
            return Ok(None);
        }
        let at = self
            .used
            .unchecked_add(4 + 8 * u64::from(self.last_used % self.size));
        let raw = mem.read(at, 8)?;
        let id = u32::from_le_bytes(raw[0..4].try_into()?);
        let len = u32::from_le_bytes(raw[4..8].try_into()?);
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id)
            .ok()
            .filter(|h| *h < self.size)
            .ok_or_else(|| anyhow!("device used id {id}, beyond the queue"))?;
        let slots = self.outstanding[usize::from(head)]
            .take()
            .ok_or_else(|| anyhow!("device used head {head}, which was not available"))?;
        self.free.extend(slots);
        // EVENT_IDX: ask for a notification as soon as the next buffer is used.
        self.write_used_event(mem)?;
        Ok(Some((head, len)))
    }

    fn write_used_event(&self, mem: &GuestMem) -> Result<()> {
        let at = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
        mem.mem.store(self.last_used, at, Ordering::Release)?;
        Ok(())
    }

    /// Waits for the next used element: checks the ring, then sleeps on the call eventfd.
    /// A ring that advanced without a notification is an error (a lost interrupt).
    pub fn wait_used(&mut self, mem: &GuestMem, timeout: Duration) -> Result<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(u) = self.pop_used(mem)? {
                return Ok(u);
            }
            self.write_used_event(mem)?;
            fence(Ordering::SeqCst);
            if let Some(u) = self.pop_used(mem)? {
                return Ok(u);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no used buffer within {timeout:?} (used idx {}, {} buffers outstanding)",
                    self.used_idx(mem)?,
                    self.size as usize - self.free.len()
                );
            }
            if poll_in(self.call.as_raw_fd(), left)? {
                let _ = self.call.read();
            } else if Instant::now() >= deadline {
                if let Some(u) = self.pop_used(mem)? {
                    bail!("the device used buffer {u:?} but never signalled the call eventfd");
                }
            }
        }
    }
}

/// Waits until `fd` is readable; false on timeout.
pub fn poll_in(fd: i32, timeout: Duration) -> Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        bail!("poll: {e}");
    }
    Ok(rc > 0)
}
