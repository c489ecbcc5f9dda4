//! The used ring of a split virtqueue, written the way the spec lets a device batch it: each used
//! element goes to its slot when its chain is done, and the used index is stored once for a batch
//! of them (virtio 1.2, 2.7.8.2: the device updates `idx` after the elements it covers).
//!
//! `virtio_queue::Queue::add_used` stores the index after every element. A driver that polls the
//! index from another CPU (DPDK's virtio PMD does, all the time) then takes the index's cache line
//! away after every element, and the device pays a cross-CPU miss per frame to get it back. Here
//! the index is stored at the end of every TX batch, after the RX frame that brings the pending
//! elements to [`PUBLISH_EVERY`] or more, and at the end of every pass (the data path publishes
//! before it lets go of the queue), so the driver sees the same elements in the same order, a
//! little later within a pass and never after it. The index only ever moves at a frame's end:
//! a mergeable RX frame's buffers (its `num_buffers`) become visible together, as Linux's
//! `virtio_net` needs (it drops a frame whose buffers are not all used yet).
//!
//! Since the crate's own notification check counts the elements its `add_used` added,
//! [`Used::needs_notification`] makes the same EVENT_IDX decision from what was published here.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Error, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Elements written before the index is stored anyway, so that a long pass hands buffers back to
/// a driver waiting for them (as Linux's vhost-net signals every 64 on RX).
pub const PUBLISH_EVERY: u16 = 64;

/// Offset of the ring of elements in the used ring (after `flags` and `idx`).
const USED_RING_HEADER: u64 = 4;
/// Bytes of one used element (`id`, `len`).
const USED_ELEMENT: u64 = 8;
/// Offset of the available ring's entries (after `flags` and `idx`).
const AVAIL_RING_HEADER: u64 = 4;
/// Bytes of one available ring entry.
const AVAIL_ELEMENT: u64 = 2;

/// What one queue has written to its used ring past the index the driver sees.
#[derive(Debug, Default, Clone, Copy)]
pub struct Used {
    /// Elements written after the published index.
    pending: u16,
    /// Elements published since the last notification decision (what `num_added` is to the
    /// crate's `needs_notification`).
    unsignalled: u16,
}

impl Used {
    /// Writes the used element (`head`, `len`) in the next free slot, after the ones pending.
    /// The driver does not see it until [`Used::publish`] stores the index.
    pub fn push<M: GuestMemory>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), Error> {
        let size = q.size();
        if head >= size || size == 0 {
            return Err(Error::InvalidDescriptorIndex);
        }
        let slot = u64::from(q.next_used().wrapping_add(self.pending) % size);
        let addr = GuestAddress(q.used_ring())
            .checked_add(USED_RING_HEADER + slot * USED_ELEMENT)
            .ok_or(Error::AddressOverflow)?;
        // virtq_used_elem: le32 id, le32 len.
        let elem = u64::from(head) | (u64::from(len) << 32);
        mem.write_obj(elem.to_le(), addr)
            .map_err(Error::GuestMemory)?;
        self.pending += 1;
        Ok(())
    }

    /// Whether [`PUBLISH_EVERY`] elements or more wait for [`Used::publish`]: the data path asks
    /// at the end of every RX frame, so that a long pass hands buffers back as it goes.
    pub fn many(&self) -> bool {
        self.pending >= PUBLISH_EVERY
    }

    /// Stores the used index over every element written so far (one release store: the
    /// elements, and the buffers' contents before them, are visible to the driver first).
    pub fn publish<M: GuestMemory>(&mut self, q: &mut Queue, mem: &M) -> Result<(), Error> {
        let n = std::mem::take(&mut self.pending);
        if n == 0 {
            return Ok(());
        }
        let next = q.next_used().wrapping_add(n);
        let addr = GuestAddress(q.used_ring())
            .checked_add(2)
            .ok_or(Error::AddressOverflow)?;
        mem.store(u16::to_le(next), addr, Ordering::Release)
            .map_err(Error::GuestMemory)?;
        q.set_next_used(next);
        self.unsignalled = self.unsignalled.wrapping_add(n);
        Ok(())
    }

    /// Whether the driver asked to be notified of what was published since the last call: with
    /// EVENT_IDX, when its `used_event` lies among those elements (the same inequality as the
    /// crate's `needs_notification` and Linux's `vring_need_event`); always without it.
    pub fn needs_notification<M: GuestMemory>(
        &mut self,
        q: &Queue,
        mem: &M,
    ) -> Result<bool, Error> {
        let added = Wrapping(std::mem::take(&mut self.unsignalled));
        // The index store above before the read of used_event (the driver does the reverse).
        fence(Ordering::SeqCst);
        if !q.event_idx_enabled() {
            return Ok(true);
        }
        let addr = GuestAddress(q.avail_ring())
            .checked_add(AVAIL_RING_HEADER + u64::from(q.size()) * AVAIL_ELEMENT)
            .ok_or(Error::AddressOverflow)?;
        let used_event = Wrapping(u16::from_le(
            mem.load::<u16>(addr, Ordering::Relaxed)
                .map_err(Error::GuestMemory)?,
        ));
        let new = Wrapping(q.next_used());
        let old = new - added;
        Ok(new - used_event - Wrapping(1) < new - old)
    }

    /// Forgets what was written and not published (a queue reset or restart).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryMmap, GuestRegionMmap};

    const SIZE: u16 = 256;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x3000;
    const USED: u64 = 0x4000;

    fn setup(event_idx: bool) -> (Queue, GuestMemoryMmap) {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_regions(vec![GuestRegionMmap::from_range(
                GuestAddress(0),
                0x10000,
                None,
            )
            .unwrap()])
            .unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        (q, mem)
    }

    fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap()
    }

    fn elem(mem: &GuestMemoryMmap, slot: u64) -> (u32, u32) {
        let a = GuestAddress(USED + 4 + slot * 8);
        (
            mem.read_obj::<u32>(a).unwrap(),
            mem.read_obj::<u32>(a.unchecked_add(4)).unwrap(),
        )
    }

    #[test]
    fn elements_land_where_add_used_puts_them_and_the_index_moves_once() {
        let (mut q, mem) = setup(false);
        let (mut reference, ref_mem) = setup(false);
        // Start near the wrap of the 16-bit index and of the ring.
        q.set_next_used(u16::MAX - 2);
        reference.set_next_used(u16::MAX - 2);
        let mut used = Used::default();
        for i in 0..5u16 {
            used.push(&mut q, &mem, i * 7, u32::from(i) * 100).unwrap();
            reference
                .add_used(&ref_mem, i * 7, u32::from(i) * 100)
                .unwrap();
        }
        assert_eq!(used_idx(&mem), 0, "nothing published before publish()");
        used.publish(&mut q, &mem).unwrap();
        assert_eq!(used_idx(&mem), used_idx(&ref_mem));
        assert_eq!(q.next_used(), reference.next_used());
        for slot in 0..u64::from(SIZE) {
            assert_eq!(elem(&mem, slot), elem(&ref_mem, slot), "slot {slot}");
        }
    }

    #[test]
    fn the_index_moves_only_when_asked_and_at_most_every_so_many_elements() {
        let (mut q, mem) = setup(false);
        let mut used = Used::default();
        // A frame's buffers are never published in part: push alone never moves the index.
        for i in 0..PUBLISH_EVERY + 3 {
            used.push(&mut q, &mem, i % SIZE, 0).unwrap();
        }
        assert_eq!(used_idx(&mem), 0);
        assert!(used.many());
        used.publish(&mut q, &mem).unwrap();
        assert_eq!(used_idx(&mem), PUBLISH_EVERY + 3);
        used.push(&mut q, &mem, 1, 0).unwrap();
        assert!(!used.many(), "one element is not many");
        used.publish(&mut q, &mem).unwrap();
        assert_eq!(used_idx(&mem), PUBLISH_EVERY + 4);
    }

    #[test]
    fn a_head_outside_the_ring_or_a_ring_outside_memory_is_refused() {
        let (mut q, mem) = setup(false);
        let mut used = Used::default();
        assert!(used.push(&mut q, &mem, SIZE, 0).is_err());
        q.set_used_ring_address(Some(0xffff_fff0), Some(0));
        assert!(used.push(&mut q, &mem, 0, 0).is_err());
        assert_eq!(q.next_used(), 0);
    }

    #[test]
    fn event_idx_decisions_match_the_crate() {
        // For every used_event around the batch, the decision after a batch of n elements is
        // the crate's after n add_used calls.
        for n in [1u16, 3, 64, 65] {
            for start in [0u16, 10, u16::MAX - 1] {
                for off in -3i16..=70 {
                    let ev = start.wrapping_add_signed(off);
                    let (mut q, mem) = setup(true);
                    let (mut reference, ref_mem) = setup(true);
                    q.set_next_used(start);
                    reference.set_next_used(start);
                    let ev_addr = GuestAddress(AVAIL + 4 + u64::from(SIZE) * 2);
                    mem.write_obj(ev.to_le(), ev_addr).unwrap();
                    ref_mem.write_obj(ev.to_le(), ev_addr).unwrap();
                    let mut used = Used::default();
                    for i in 0..n {
                        used.push(&mut q, &mem, i % SIZE, 0).unwrap();
                        reference.add_used(&ref_mem, i % SIZE, 0).unwrap();
                    }
                    used.publish(&mut q, &mem).unwrap();
                    assert_eq!(
                        used.needs_notification(&q, &mem).unwrap(),
                        reference.needs_notification(&ref_mem).unwrap(),
                        "n {n} start {start} used_event {ev}"
                    );
                    // Asked again with nothing new: no notification, as the crate.
                    assert!(!used.needs_notification(&q, &mem).unwrap());
                }
            }
        }
    }
}
