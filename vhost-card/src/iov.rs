//! Descriptor chains to iovecs over guest memory, and the few header-sized copies the data path
//! makes between those iovecs and its own buffers.
//!
//! The iovecs point straight into the guest's memory regions, so frames move between the guest and
//! the tap with a single `readv`/`writev` and no intermediate copy. Every address is translated
//! through `GuestMemory::get_slices`, which refuses anything outside the guest's regions and splits
//! a buffer that straddles two regions.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

/// Most iovecs one `readv`/`writev` takes (Linux `UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// Why a descriptor chain was refused.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("buffer outside guest memory")]
    BadAddress,
    #[error("buffer in the wrong direction")]
    WrongDirection,
    #[error("chain is empty, loops, or has a broken indirect table")]
    Malformed,
    #[error("chain has more than {IOV_MAX} segments")]
    TooLong,
}

/// A reusable iovec array. The pointers are only meaningful while the guest-memory guard they
/// were translated under is held; every user clears the array before filling it again.
#[derive(Default)]
pub struct IovBuf(pub Vec<libc::iovec>);

// SAFETY: the raw pointers are never dereferenced outside the worker call that filled them while
// holding the guest-memory guard; the buffer only moves between threads as empty storage.
unsafe impl Send for IovBuf {}

impl IovBuf {
    pub fn with_capacity(n: usize) -> Self {
        IovBuf(Vec::with_capacity(n))
    }
}

/// Appends the host ranges of every descriptor of `chain` to `iovs`. All descriptors must be
/// device-writable (`writable`) or all device-readable. Returns the chain's byte length. On error
/// `iovs` may hold part of the chain: callers truncate it back.
pub fn collect_chain<M>(
    chain: DescriptorChain<M>,
    mem: &M::Target,
    writable: bool,
    iovs: &mut Vec<libc::iovec>,
    max_iovs: usize,
) -> Result<usize, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mut total = 0usize;
    let mut last_has_next = true;
    let mut count = 0usize;
    for desc in chain {
        count += 1;
        if desc.is_write_only() != writable {
            return Err(ChainError::WrongDirection);
        }
        push_guest(
            mem,
            desc.addr(),
            desc.len() as usize,
            writable,
            iovs,
            max_iovs,
        )?;
        total += desc.len() as usize;
        last_has_next = desc.has_next();
    }
    // The iterator stops silently on a loop (its TTL runs out), on a descriptor index beyond the
    // table and on a bad indirect table; in each case the last descriptor it returned still says
    // NEXT, or it returned none.
    if count == 0 || last_has_next {
        return Err(ChainError::Malformed);
    }
    Ok(total)
}

/// Appends the host ranges backing `[addr, addr + len)` of guest memory.
pub fn push_guest<G: GuestMemory + ?Sized>(
    mem: &G,
    addr: GuestAddress,
    len: usize,
    writable: bool,
    iovs: &mut Vec<libc::iovec>,
    max_iovs: usize,
) -> Result<(), ChainError> {
    let access = if writable {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let slices = mem
        .get_slices(addr, len, access)
        .map_err(|_| ChainError::BadAddress)?;
    for slice in slices {
        let slice = slice.map_err(|_| ChainError::BadAddress)?;
        if iovs.len() >= max_iovs {
            return Err(ChainError::TooLong);
        }
        iovs.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
    }
    Ok(())
}

/// Copies up to `dst.len()` bytes starting `offset` bytes into `iovs`; returns how many.
///
/// # Safety
/// Every iovec must describe memory that is mapped and readable for the duration of the call.
pub unsafe fn read_iovs(iovs: &[libc::iovec], mut offset: usize, dst: &mut [u8]) -> usize {
    let mut done = 0;
    for iov in iovs {
        if done == dst.len() {
            break;
        }
        if offset >= iov.iov_len {
            offset -= iov.iov_len;
            continue;
        }
        let n = (iov.iov_len - offset).min(dst.len() - done);
        // SAFETY: the caller guarantees the iovec is mapped; `offset + n <= iov_len` and
        // `done + n <= dst.len()`. Guest memory may change under us; u8 has no invalid values,
        // so a racing write only changes the bytes we read.
        unsafe {
            std::ptr::copy_nonoverlapping(
                iov.iov_base.cast::<u8>().add(offset),
                dst.as_mut_ptr().add(done),
                n,
            );
        }
        done += n;
        offset = 0;
    }
    done
}

/// Copies `src` into `iovs` starting `offset` bytes in; returns how many bytes fitted.
///
/// # Safety
/// Every iovec must describe memory that is mapped and writable for the duration of the call.
pub unsafe fn write_iovs(iovs: &[libc::iovec], mut offset: usize, src: &[u8]) -> usize {
    let mut done = 0;
    for iov in iovs {
        if done == src.len() {
            break;
        }
        if offset >= iov.iov_len {
            offset -= iov.iov_len;
            continue;
        }
        let n = (iov.iov_len - offset).min(src.len() - done);
        // SAFETY: as in `read_iovs`, with the caller guaranteeing the memory is writable.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr().add(done),
                iov.iov_base.cast::<u8>().add(offset),
                n,
            );
        }
        done += n;
        offset = 0;
    }
    done
}

/// The one's complement sum (see `csum::finish`) of `len` bytes starting `offset` bytes into
/// `iovs`, summed where they lie (no copy); `None` if the iovecs hold fewer bytes.
///
/// # Safety
/// Every iovec must describe memory that is mapped and readable for the duration of the call.
pub unsafe fn sum_iovs(iovs: &[libc::iovec], mut offset: usize, len: usize) -> Option<u64> {
    let mut sum = 0u64;
    let mut done = 0;
    for iov in iovs {
        if done == len {
            break;
        }
        if offset >= iov.iov_len {
            offset -= iov.iov_len;
            continue;
        }
        let n = (iov.iov_len - offset).min(len - done);
        // SAFETY: the caller guarantees the iovec is mapped and readable; `offset + n <= iov_len`.
        // Guest memory may change under us: u8 has no invalid values, so a racing write only
        // changes the sum (the host then gets the checksum of what it wrote).
        let part = unsafe {
            std::slice::from_raw_parts(iov.iov_base.cast::<u8>().add(offset).cast_const(), n)
        };
        sum = crate::csum::add_part(sum, crate::csum::sum_slice(part), done % 2 == 1);
        done += n;
        offset = 0;
    }
    (done == len).then_some(sum)
}

/// Appends `[base, base + len)` to `dst`, as a longer last entry where it continues that one in
/// host memory: the same bytes in fewer iovecs (a guest's buffers carved one after another from
/// one page, as Linux's `virtio_net` posts mergeable buffers, become one).
pub fn push_merged(dst: &mut Vec<libc::iovec>, base: *mut u8, len: usize) {
    if len == 0 {
        return;
    }
    if let Some(last) = dst.last_mut() {
        if last.iov_base.cast::<u8>().wrapping_add(last.iov_len) == base {
            last.iov_len += len;
            return;
        }
    }
    dst.push(libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    });
}

/// Fills `dst` with the iovecs of `src` minus the bytes `[at, at + gap)`: a `readv` into `dst`
/// leaves that range of `src` untouched (where the IP-only link writes the Ethernet header).
/// Returns how many bytes `dst` covers. `dst` keeps at most `max` entries.
pub fn with_gap(
    src: &[libc::iovec],
    at: usize,
    gap: usize,
    dst: &mut Vec<libc::iovec>,
    max: usize,
) -> usize {
    dst.clear();
    let mut pos = 0usize;
    let mut total = 0usize;
    let mut push = |dst: &mut Vec<libc::iovec>, base: *mut u8, len: usize| {
        if len > 0 && dst.len() < max {
            push_merged(dst, base, len);
            total += len;
        }
    };
    for iov in src {
        let (start, end) = (pos, pos + iov.iov_len);
        pos = end;
        let base = iov.iov_base.cast::<u8>();
        // The parts of [start, end) before `at` and after `at + gap`.
        let before = at.clamp(start, end) - start;
        push(dst, base, before);
        let after = (at + gap).clamp(start, end) - start;
        // SAFETY: `after <= iov_len`: pointer arithmetic within the iovec's own range.
        push(dst, unsafe { base.add(after) }, iov.iov_len - after);
    }
    total
}

/// Drops the first `skip` bytes from `iovs[from..]` in place and returns the index of the first
/// iovec that still holds data (`iovs.len()` if none does).
pub fn advance(iovs: &mut [libc::iovec], from: usize, mut skip: usize) -> usize {
    let mut i = from;
    while skip > 0 && i < iovs.len() {
        if iovs[i].iov_len <= skip {
            skip -= iovs[i].iov_len;
            i += 1;
        } else {
            // SAFETY: pointer arithmetic within the iovec's own range (skip < iov_len).
            iovs[i].iov_base = unsafe { iovs[i].iov_base.cast::<u8>().add(skip) }.cast();
            iovs[i].iov_len -= skip;
            skip = 0;
        }
    }
    i
}

/// What the data path is about to do with the bytes it asks the CPU to load (see
/// [`prefetch_iovs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read them (a TX frame: our header copy, then the kernel's copy into its skb).
    Read,
    /// Write them (an RX buffer: the kernel's copy of the frame, then our header).
    Write,
}

/// Asks the CPU to start loading the cache lines of the first `bytes` bytes of `iovs` (at most
/// [`PREFETCH_LINES`] lines), for `access`, so that the accesses that follow (ours, or the
/// kernel's in the system call that takes the iovecs) find them loaded. The frontend on another
/// CPU touched those bytes last: without this, each frame's lines come one miss after the other;
/// with it, the misses of a batch overlap. A prefetch never faults and changes nothing but the
/// cache, whatever the address.
#[inline]
pub fn prefetch_iovs(iovs: &[libc::iovec], bytes: usize, access: Access) {
    const LINE: usize = 64;
    let mut left = PREFETCH_LINES;
    let mut want = bytes;
    for iov in iovs {
        let base = iov.iov_base as usize;
        let end = base.saturating_add(iov.iov_len.min(want));
        let mut line = base & !(LINE - 1);
        while line < end && left > 0 {
            prefetch(line as *const u8, access);
            line += LINE;
            left -= 1;
        }
        want = want.saturating_sub(iov.iov_len);
        if want == 0 || left == 0 {
            break;
        }
    }
}

/// Lines [`prefetch_iovs`] asks for per call.
pub const PREFETCH_LINES: usize = 4;

#[inline(always)]
fn prefetch(p: *const u8, access: Access) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0, _MM_HINT_T0};
        // SAFETY: SSE, which the intrinsic needs, is part of x86_64 (PREFETCHW, for writes, runs
        // as a no-op on a CPU without it); a prefetch of any address, valid or not, never
        // faults and has no effect but on the cache.
        unsafe {
            match access {
                Access::Read => _mm_prefetch::<_MM_HINT_T0>(p.cast()),
                Access::Write => _mm_prefetch::<_MM_HINT_ET0>(p.cast()),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, access);
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    fn iov_of(b: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        }
    }

    #[test]
    fn sums_over_iovecs_match_a_contiguous_sum() {
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 31 + i / 7) as u8).collect();
        for cuts in [[1usize, 2], [333, 334], [1000, 2999], [7, 1500]] {
            let mut a = data[..cuts[0]].to_vec();
            let mut b = data[cuts[0]..cuts[1]].to_vec();
            let mut c = data[cuts[1]..].to_vec();
            let iovs = [iov_of(&mut a), iov_of(&mut b), iov_of(&mut c)];
            for (off, len) in [(0, 3000), (1, 2999), (34, 1000), (2999, 1)] {
                let want = crate::csum::finish(crate::csum::sum_slice(&data[off..off + len]));
                // SAFETY: the iovecs point into the three live vectors above.
                let got = unsafe { sum_iovs(&iovs, off, len) }.unwrap();
                assert_eq!(
                    crate::csum::finish(got),
                    want,
                    "cuts {cuts:?} at {off}+{len}"
                );
            }
            // SAFETY: as above.
            assert!(unsafe { sum_iovs(&iovs, 10, 2991) }.is_none());
        }
    }

    #[test]
    fn adjacent_iovecs_are_merged_and_others_kept() {
        let mut buf = vec![0u8; 100];
        let p = buf.as_mut_ptr();
        let at = |off: usize, len: usize| libc::iovec {
            // SAFETY: offsets within `buf`.
            iov_base: unsafe { p.add(off) }.cast(),
            iov_len: len,
        };
        let mut dst = Vec::new();
        // Three adjacent, a jump back (overlap), an empty one, a gap, then adjacent again.
        let src = [
            at(0, 10),
            at(10, 5),
            at(15, 20),
            at(5, 10),
            at(15, 0),
            at(50, 10),
            at(60, 40),
        ];
        for v in &src {
            push_merged(&mut dst, v.iov_base.cast(), v.iov_len);
        }
        assert_eq!(dst.len(), 3);
        let got: Vec<(usize, usize)> = dst
            .iter()
            .map(|v| (v.iov_base as usize - p as usize, v.iov_len))
            .collect();
        assert_eq!(got, [(0, 35), (5, 10), (50, 50)]);
        // Same bytes either way.
        let marks: Vec<u8> = (0..95u8).collect();
        // SAFETY: every iovec lies in `buf`.
        unsafe { write_iovs(&dst, 0, &marks) };
        let merged = buf.clone();
        buf.fill(0);
        // SAFETY: as above.
        unsafe { write_iovs(&src, 0, &marks) };
        assert_eq!(buf, merged);
    }

    #[test]
    fn a_gap_is_left_out_of_the_iovecs() {
        let mut a = vec![0u8; 10];
        let mut b = vec![0u8; 10];
        let mut c = vec![0u8; 30];
        let src = [iov_of(&mut a), iov_of(&mut b), iov_of(&mut c)];
        let mut dst = Vec::new();
        for (at, gap) in [(12, 14), (0, 14), (10, 10), (5, 40), (45, 14)] {
            let total = with_gap(&src, at, gap, &mut dst, 16);
            assert_eq!(total, 50 - gap.min(50 - at), "{at}+{gap}");
            let mut marks = vec![1u8; total];
            // SAFETY: dst points into a, b and c.
            unsafe { write_iovs(&dst, 0, &marks) };
            let all: Vec<u8> = [&a[..], &b[..], &c[..]].concat();
            for (i, &v) in all.iter().enumerate() {
                assert_eq!(v == 0, (at..at + gap).contains(&i), "{at}+{gap}: byte {i}");
            }
            a.fill(0);
            b.fill(0);
            c.fill(0);
            marks.clear();
        }
    }

    /// Two adjacent regions, then a hole, then a third region.
    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x10_0000), 0x10_0000),
            (GuestAddress(0x40_0000), 0x10_0000),
        ])
        .unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Puts `descs` in the table as one available chain and collects it.
    fn collect(
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        writable: bool,
    ) -> Result<usize, ChainError> {
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(mem).unwrap();
        let mut iovs = Vec::new();
        let r = collect_chain(chain, mem, writable, &mut iovs, IOV_MAX);
        if r.is_ok() {
            for iov in &iovs {
                // Every segment lies inside one mapped region.
                let base = iov.iov_base as usize;
                assert!(mem.iter().any(|reg| {
                    let start = reg.as_ptr() as usize;
                    base >= start && base + iov.iov_len <= start + reg.len() as usize
                }));
            }
        }
        r
    }

    #[test]
    fn good_chains_and_region_straddling() {
        let mem = memory();
        assert_eq!(
            collect(
                &mem,
                &[desc(0x8000, 12, F_NEXT, 1), desc(0x9000, 1500, 0, 0)],
                false
            ),
            Ok(1512)
        );
        // Straddles the two adjacent regions: two segments, both inside guest memory.
        assert_eq!(
            collect(&mem, &[desc(0xf_fff0, 64, F_WRITE, 0)], true),
            Ok(64)
        );
    }

    #[test]
    fn malformed_chains_are_refused() {
        let mem = memory();
        // Outside every region, and across the hole after the second region.
        assert_eq!(
            collect(&mem, &[desc(0x90_0000, 64, 0, 0)], false),
            Err(ChainError::BadAddress)
        );
        assert_eq!(
            collect(&mem, &[desc(0x1f_fff0, 64, 0, 0)], false),
            Err(ChainError::BadAddress)
        );
        // A length that overflows the address space.
        assert_eq!(
            collect(&mem, &[desc(u64::MAX - 8, 64, 0, 0)], false),
            Err(ChainError::BadAddress)
        );
        // A loop: 0 -> 1 -> 0.
        assert_eq!(
            collect(
                &mem,
                &[desc(0x8000, 64, F_NEXT, 1), desc(0x9000, 64, F_NEXT, 0)],
                false
            ),
            Err(ChainError::Malformed)
        );
        // `next` beyond the table.
        assert_eq!(
            collect(&mem, &[desc(0x8000, 64, F_NEXT, 200)], false),
            Err(ChainError::Malformed)
        );
        // Wrong direction for each queue.
        assert_eq!(
            collect(&mem, &[desc(0x8000, 64, F_WRITE, 0)], false),
            Err(ChainError::WrongDirection)
        );
        assert_eq!(
            collect(&mem, &[desc(0x8000, 64, 0, 0)], true),
            Err(ChainError::WrongDirection)
        );
    }

    #[test]
    fn indirect_tables() {
        let mem = memory();
        // A good indirect table of two descriptors at 0x20000.
        mem.write_obj(desc(0x8000, 12, F_NEXT, 1), GuestAddress(0x2_0000))
            .unwrap();
        mem.write_obj(desc(0x9000, 100, 0, 0), GuestAddress(0x2_0010))
            .unwrap();
        assert_eq!(
            collect(&mem, &[desc(0x2_0000, 32, F_INDIRECT, 0)], false),
            Ok(112)
        );
        // A nested indirect descriptor is refused.
        mem.write_obj(desc(0x2_0000, 32, F_INDIRECT, 0), GuestAddress(0x3_0000))
            .unwrap();
        assert_eq!(
            collect(&mem, &[desc(0x3_0000, 16, F_INDIRECT, 0)], false),
            Err(ChainError::Malformed)
        );
        // A table whose length is not a multiple of 16, and one outside memory.
        assert_eq!(
            collect(&mem, &[desc(0x2_0000, 20, F_INDIRECT, 0)], false),
            Err(ChainError::Malformed)
        );
        assert_eq!(
            collect(&mem, &[desc(0x90_0000, 32, F_INDIRECT, 0)], false),
            Err(ChainError::Malformed)
        );
    }

    #[test]
    fn too_many_segments() {
        let mem = memory();
        let mut iovs = Vec::new();
        for i in 0..4u64 {
            push_guest(&mem, GuestAddress(0x8000 + i * 64), 64, false, &mut iovs, 4).unwrap();
        }
        assert_eq!(
            push_guest(&mem, GuestAddress(0x9000), 64, false, &mut iovs, 4),
            Err(ChainError::TooLong)
        );
    }

    fn iovs_over(bufs: &mut [Vec<u8>]) -> Vec<libc::iovec> {
        bufs.iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect()
    }

    #[test]
    fn copies_across_segments() {
        let mut bufs = vec![vec![0u8; 3], vec![0u8; 0], vec![0u8; 5], vec![0u8; 4]];
        let iovs = iovs_over(&mut bufs);
        let src: Vec<u8> = (1..=12).collect();
        // SAFETY: the iovecs point into `bufs`, alive and unaliased for these calls.
        assert_eq!(unsafe { write_iovs(&iovs, 0, &src) }, 12);
        let mut back = [0u8; 6];
        // SAFETY: as above.
        assert_eq!(unsafe { read_iovs(&iovs, 2, &mut back) }, 6);
        assert_eq!(back, [3, 4, 5, 6, 7, 8]);
        // SAFETY: as above.
        assert_eq!(unsafe { write_iovs(&iovs, 10, &[9, 9, 9]) }, 2);
        assert_eq!(bufs[3], vec![9, 10, 9, 9]);
    }

    #[test]
    fn advance_splits_an_iovec() {
        let mut bufs = vec![vec![0u8; 10], vec![1u8; 2], vec![2u8; 8]];
        let mut iovs = iovs_over(&mut bufs);
        assert_eq!(advance(&mut iovs, 0, 12), 2);
        let mut iovs = iovs_over(&mut bufs);
        let i = advance(&mut iovs, 0, 11);
        assert_eq!(i, 1);
        assert_eq!(iovs[1].iov_len, 1);
        let mut iovs = iovs_over(&mut bufs);
        assert_eq!(advance(&mut iovs, 0, 100), 3);
    }
}
