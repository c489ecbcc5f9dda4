//! The descriptor-chain-to-iovec path over mock guest memory: arbitrary descriptor tables,
//! indirect tables and ring indices; every iovec produced must lie inside guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_card::iov::{collect_chain, IOV_MAX};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    // Two adjacent regions and one after a hole.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x1_0000), 0x1_0000),
        (GuestAddress(0x4_0000), 0x1_0000),
    ])
    .unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    // The input is the descriptor table (16 x 16 bytes), then avail ring entries and index,
    // then an indirect area at 0x8000.
    let (table, rest) = data.split_at(data.len().min(256));
    mem.write_slice(table, vq.desc_table_addr()).unwrap();
    let (avail, indirect) = rest.split_at(rest.len().min(34));
    if avail.len() >= 2 {
        mem.write_slice(&avail[2..], vq.avail_addr().unchecked_add(4)).unwrap();
        mem.write_obj(u16::from_le_bytes([avail[0], avail[1]]), vq.avail_addr().unchecked_add(2))
            .unwrap();
    }
    let indirect = &indirect[..indirect.len().min(0x1000)];
    mem.write_slice(indirect, GuestAddress(0x8000)).unwrap();
    let writable = data[0] & 1 == 1;
    let mut iovs = Vec::with_capacity(IOV_MAX);
    for _ in 0..32 {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        iovs.clear();
        if collect_chain(chain, &mem, writable, &mut iovs, IOV_MAX).is_ok() {
            for iov in &iovs {
                let base = iov.iov_base as usize;
                assert!(mem.iter().any(|r| {
                    let start = r.as_ptr() as usize;
                    base >= start && base + iov.iov_len <= start + r.len() as usize
                }));
            }
        }
    }
});
