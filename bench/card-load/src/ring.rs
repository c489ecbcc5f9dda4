//! The driver side of a split virtqueue, built for speed: descriptors are written once, the
//! steady state only moves heads between the used and the available ring, and notifications in
//! both directions follow EVENT_IDX (virtio 1.x, 2.7.7 and 2.7.10).

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::Duration;

use anyhow::{anyhow, Result};
use card_tests::vring::{poll_in, GuestMem};
use vhost::VringConfigData;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const F_WRITE: u16 = 2;
/// `VRING_USED_F_NO_NOTIFY`.
const USED_F_NO_NOTIFY: u16 = 1;

/// One split virtqueue in guest memory, seen from the driver.
pub struct Ring {
    pub size: u16,
    gpa: [GuestAddress; 3],
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    avail_idx: u16,
    /// Available index last made visible to the device.
    published: u16,
    last_used: u16,
    event_idx: bool,
    pub kick: EventFd,
    pub call: EventFd,
    pub kicks: u64,
    pub waits: u64,
}

// SAFETY: the raw pointers point into the guest memory mapping, which outlives every ring; a ring
// is used by one thread at a time.
unsafe impl Send for Ring {}

impl Ring {
    pub fn new(mem: &mut GuestMem, size: u16, event_idx: bool) -> Result<Self> {
        let n = usize::from(size);
        let desc = mem.alloc(16 * n, 4096)?;
        let avail = mem.alloc(6 + 2 * n, 4096)?;
        let used = mem.alloc(6 + 8 * n, 4096)?;
        let host = |g: GuestAddress| -> Result<*mut u8> {
            mem.mem
                .get_host_address(g)
                .map_err(|e| anyhow!("ring address {g:?}: {e}"))
        };
        Ok(Ring {
            size,
            gpa: [desc, avail, used],
            desc: host(desc)?,
            avail: host(avail)?,
            used: host(used)?,
            avail_idx: 0,
            published: 0,
            last_used: 0,
            event_idx,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            kicks: 0,
            waits: 0,
        })
    }

    /// SET_VRING_ADDR's payload.
    pub fn config(&self, mem: &GuestMem) -> Result<VringConfigData> {
        Ok(VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: mem.host_addr(self.gpa[0])?,
            used_ring_addr: mem.host_addr(self.gpa[2])?,
            avail_ring_addr: mem.host_addr(self.gpa[1])?,
            log_addr: None,
        })
    }

    /// Writes descriptor `i` (before it is made available).
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(i < self.size);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        // SAFETY: slot `i < size` of the descriptor table, inside guest memory.
        unsafe {
            std::ptr::copy_nonoverlapping(raw.as_ptr(), self.desc.add(16 * usize::from(i)), 16)
        };
    }

    fn u16_at(p: *mut u8) -> &'static AtomicU16 {
        // SAFETY: every ring field is 2-byte aligned inside the mapping, which outlives the ring.
        unsafe { AtomicU16::from_ptr(p.cast()) }
    }

    /// Puts `head` in the next available slot (not yet visible to the device).
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: inside the available ring.
        Self::u16_at(unsafe { self.avail.add(4 + 2 * slot) }).store(head, Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes every pushed head visible and kicks if the device asked for it.
    pub fn publish(&mut self) -> Result<()> {
        if self.avail_idx == self.published {
            return Ok(());
        }
        let old = self.published;
        // SAFETY: the available ring's idx field.
        Self::u16_at(unsafe { self.avail.add(2) }).store(self.avail_idx, Ordering::Release);
        self.published = self.avail_idx;
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let n = usize::from(self.size);
            // SAFETY: avail_event, right after the used ring's elements.
            let event = Self::u16_at(unsafe { self.used.add(4 + 8 * n) }).load(Ordering::Acquire);
            self.avail_idx.wrapping_sub(event).wrapping_sub(1) < self.avail_idx.wrapping_sub(old)
        } else {
            // SAFETY: the used ring's flags field.
            Self::u16_at(self.used).load(Ordering::Acquire) & USED_F_NO_NOTIFY == 0
        };
        if kick {
            self.kicks += 1;
            self.kick.write(1)?;
        }
        Ok(())
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: the used ring's idx field.
        Self::u16_at(unsafe { self.used.add(2) }).load(Ordering::Acquire)
    }

    /// The next used element: (head, length).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let slot = usize::from(self.last_used % self.size);
        let mut raw = [0u8; 8];
        // SAFETY: element `slot` of the used ring, published by the index read above (Acquire).
        unsafe { std::ptr::copy_nonoverlapping(self.used.add(4 + 8 * slot), raw.as_mut_ptr(), 8) };
        self.last_used = self.last_used.wrapping_add(1);
        let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        Some((id as u16, len))
    }

    /// Sleeps until the device has used at least `want` more elements (or `timeout` passes),
    /// asking for a notification at that point.
    pub fn wait_used(&mut self, want: u16, timeout: Duration) -> Result<()> {
        let n = usize::from(self.size);
        let target = self.last_used.wrapping_add(want.max(1)).wrapping_sub(1);
        // SAFETY: used_event, right after the available ring's elements.
        Self::u16_at(unsafe { self.avail.add(4 + 2 * n) }).store(target, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.used_idx().wrapping_sub(self.last_used) >= want.max(1) {
            return Ok(());
        }
        self.waits += 1;
        if poll_in(self.call.as_raw_fd(), timeout)? {
            let _ = self.call.read();
        }
        Ok(())
    }
}
