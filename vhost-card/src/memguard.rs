//! Guest memory that shrinks under the daemon.
//!
//! Guest RAM arrives as file descriptors in SET_MEM_TABLE, and the daemon maps them shared. The
//! gate refuses a table whose regions reach past the end of their files, but the frontend keeps
//! the files: if it truncates one later, the next access to a lost page raises SIGBUS, which
//! would end the daemon. Two defences:
//!
//! * [`seal_shrink`]: the gate adds `F_SEAL_SHRINK` to every region file that allows sealing
//!   (a memfd created with `MFD_ALLOW_SEALING` and not yet sealed against further seals). After
//!   that the kernel refuses to shrink the file. QEMU's `memory-backend-memfd` already seals its
//!   memfds this way (`seal=on`, its default).
//! * [`install`]: for files that cannot be sealed (plain files, hugetlbfs, memfds without
//!   sealing), a SIGBUS handler. A fault inside a registered guest region gets a private zero
//!   page (or huge page) mapped over the faulting page, is counted, and the access completes on
//!   that page: the frontend that broke its memory loses the data of those pages, the daemon
//!   keeps serving. A SIGBUS anywhere else is not ours and keeps its default action.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// How many guest regions the handler knows at once (mappings of earlier tables included).
const SLOTS: usize = 64;

static START: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LEN: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static NEXT: AtomicUsize = AtomicUsize::new(0);
static FAULTS: AtomicU64 = AtomicU64::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// Pages of guest memory replaced by zero pages after the frontend shrank their file.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

/// What sealing a region file achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seal {
    /// The file cannot shrink any more (sealed now or before).
    Sealed,
    /// The file does not allow the seal; the SIGBUS handler covers it.
    Unsealable,
}

/// Adds `F_SEAL_SHRINK` to a region file if it allows it.
pub fn seal_shrink(fd: BorrowedFd<'_>) -> Seal {
    // SAFETY: F_GET_SEALS on a descriptor we borrow; no memory is passed.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
        return Seal::Sealed;
    }
    // SAFETY: F_ADD_SEALS with a constant flag on a descriptor we borrow.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    if r == 0 {
        Seal::Sealed
    } else {
        Seal::Unsealable
    }
}

/// Makes `[start, start + len)` a guest region the SIGBUS handler may repair. Regions of
/// earlier tables stay known until the slots run out (a worker may still be reading an old
/// mapping); a stale entry is harmless, since only file mappings raise SIGBUS.
pub fn register(start: usize, len: usize) {
    if len == 0 {
        return;
    }
    for i in 0..SLOTS {
        if START[i].load(Ordering::Acquire) == start && LEN[i].load(Ordering::Acquire) == len {
            return;
        }
    }
    let i = NEXT.fetch_add(1, Ordering::AcqRel) % SLOTS;
    LEN[i].store(0, Ordering::Release);
    START[i].store(start, Ordering::Release);
    LEN[i].store(len, Ordering::Release);
}

fn in_region(addr: usize) -> bool {
    (0..SLOTS).any(|i| {
        let start = START[i].load(Ordering::Acquire);
        let len = LEN[i].load(Ordering::Acquire);
        len != 0 && addr >= start && addr - start < len
    })
}

/// Maps a private zero page over the page holding `addr`: the normal page size first, then
/// the huge page sizes (a hugetlbfs mapping can only be replaced a whole huge page at a time).
/// Only async-signal-safe calls.
fn patch(addr: usize) -> bool {
    let page = PAGE.load(Ordering::Relaxed);
    for size in [page, 2 << 20, 1 << 30] {
        let base = addr & !(size - 1);
        // SAFETY: replaces one page-aligned range inside a guest mapping (checked by the
        // caller) with anonymous memory of the same size; nothing else owns those addresses,
        // and the faulting access resumes on the new page.
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return true;
        }
    }
    false
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler; si_addr is the
    // faulting address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    if in_region(addr) && patch(addr) {
        FAULTS.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Not a guest page: the default action (returning re-runs the access, which faults again
    // and now ends the process with a core, as without this handler).
    // SAFETY: resetting a signal disposition is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

/// Installs the SIGBUS handler (once, at start-up, before any guest memory is mapped).
pub fn install() -> std::io::Result<()> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if let Ok(page) = usize::try_from(page) {
        if page.is_power_of_two() {
            PAGE.store(page, Ordering::Relaxed);
        }
    }
    // SAFETY: a zeroed sigaction is valid; the handler is an extern "C" fn with the
    // SA_SIGINFO signature that only makes async-signal-safe calls.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    fn memfd(flags: libc::c_uint) -> OwnedFd {
        let name = CString::new("memguard-test").unwrap();
        // SAFETY: NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn sealable_files_are_sealed_and_cannot_shrink() {
        let fd = memfd(libc::MFD_ALLOW_SEALING);
        let f = std::fs::File::from(fd);
        f.set_len(1 << 20).unwrap();
        assert_eq!(seal_shrink(f.as_fd()), Seal::Sealed);
        assert_eq!(seal_shrink(f.as_fd()), Seal::Sealed);
        assert!(f.set_len(4096).is_err(), "a sealed memfd shrank");
        f.set_len(2 << 20).unwrap();
        let plain = memfd(0);
        assert_eq!(seal_shrink(plain.as_fd()), Seal::Unsealable);
    }

    #[test]
    fn a_truncated_guest_page_reads_as_zeros() {
        install().unwrap();
        let f = std::fs::File::from(memfd(0));
        let len = 4 * 4096;
        f.set_len(len as u64).unwrap();
        // SAFETY: a fresh shared mapping of a file we own, unmapped at the end.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as *mut u8;
        // SAFETY: inside the mapping, whose pages exist.
        unsafe { base.add(3 * 4096).write_volatile(7) };
        register(base as usize, len);
        let before = faults();
        f.set_len(4096).unwrap();
        // SAFETY: inside the mapping; the page is gone from the file, so this faults and the
        // handler maps a zero page there.
        let v = unsafe { base.add(3 * 4096).read_volatile() };
        assert_eq!(v, 0);
        // SAFETY: as above, now on the private page.
        unsafe { base.add(3 * 4096 + 1).write_volatile(9) };
        assert!(faults() > before);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
    }
}
