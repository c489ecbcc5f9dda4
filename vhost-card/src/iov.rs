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

#[cfg(test)]
mod tests {
    use super::*;

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
