//! Dirty-page logging for live migration (QEMU's `docs/interop/vhost-user.rst`, "Migration").
//!
//! While a VM migrates, its memory is copied to the destination while it runs, and the frontend
//! copies again every page written since. It knows the pages the guest wrote; the pages the card
//! writes (received frames, used rings) it learns from a shared bitmap, the log: one bit per
//! 4 KiB page of guest physical memory, `log[page / 8] |= 1 << page % 8`, set with atomic ORs.
//!
//! * The frontend hands the log over with `VHOST_USER_SET_LOG_BASE` (its memory file and the
//!   area's size and offset, `VHOST_USER_PROTOCOL_F_LOG_SHMFD`); the gate checks it and maps it
//!   here ([`LogArea`]).
//! * Data writes are logged while `VHOST_F_LOG_ALL` is acked ([`DirtyLog::active`]): the data
//!   path marks the bytes of every frame it puts in guest buffers ([`DirtyLog::mark_iovs`]),
//!   after writing them and before the used entry that hands them to the guest.
//! * Used-ring writes are logged for rings whose `SET_VRING_ADDR` carried `VHOST_VRING_F_LOG`, at
//!   the ring's `log_guest_addr` as the spec says. They happen inside `virtio-queue` through
//!   vm-memory: while the frontend logs, the data path hands `virtio-queue` a second view of
//!   guest memory ([`LoggedMem`], the same mappings) whose regions report each write, right
//!   after making it, to a [`RegionBitmap`]: the used element is marked before the used index
//!   that publishes it is stored.
//!
//! With logging off the data path uses guest memory as before, without a bitmap (vm-memory's
//! code for `()` compiles to nothing), at the cost of one relaxed load of
//! [`DirtyLog::active`] per pass and per received frame.
//!
//! vhost-user-backend 0.24 has its own log handling (`BitmapMmapRegion`), which we do not use:
//! it marks used-ring writes at the ring's address rather than at `log_guest_addr`, ignores
//! `VHOST_VRING_F_LOG`, keeps logging after `VHOST_F_LOG_ALL` is cleared, ends the session when
//! the log cannot be mapped, and takes a lock for every guest write even with logging off. A
//! bitmap on guest memory itself also costs the data path about 10 % more CPU per frame,
//! logging or not (measured, see bench/README.md).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use log::warn;
use thiserror::Error;
use vm_memory::bitmap::{Bitmap, BitmapSlice, RefSlice, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

/// Size of a page in the log (`VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 0x1000;

/// Guest memory as the card maps it.
pub type GuestMem = GuestMemoryMmap;

/// A view of guest memory over the same mappings whose writes are logged (see [`RegionBitmap`]).
pub type LoggedMem = GuestMemoryMmap<RegionBitmap>;

/// Why a log area was refused.
#[derive(Debug, Error)]
pub enum LogError {
    #[error("the log area is empty")]
    Empty,
    #[error("the log area ({size} bytes at offset {offset}) reaches past the end of its file ({file} bytes)")]
    PastEnd { size: u64, offset: u64, file: u64 },
    #[error("cannot map the log area: {0}")]
    Map(io::Error),
}

/// The frontend's log, mapped shared.
pub struct LogArea {
    /// The mapping (from the page-aligned offset below the log's start).
    map: *mut libc::c_void,
    map_len: usize,
    /// Byte 0 of the log (guest page 0).
    log: *const AtomicU8,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only ever accessed through atomic byte
// operations, from any thread; it is unmapped once, when the last owner drops it.
unsafe impl Send for LogArea {}
// SAFETY: as above: shared access is atomic.
unsafe impl Sync for LogArea {}

impl LogArea {
    /// Maps `size` bytes of `fd` from `offset` (where guest page 0's bit lives). Refuses an
    /// empty area, one past the end of the file (touching it would raise SIGBUS) and what mmap
    /// refuses (a descriptor that is not a mappable file).
    pub fn map(fd: BorrowedFd<'_>, size: u64, offset: u64) -> Result<LogArea, LogError> {
        if size == 0 {
            return Err(LogError::Empty);
        }
        // SAFETY: fstat on a descriptor we borrow, into a zeroed stat buffer we own.
        let st = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
                return Err(LogError::Map(io::Error::last_os_error()));
            }
            st
        };
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFREG {
            return Err(LogError::Map(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular (memory) file",
            )));
        }
        let file = u64::try_from(st.st_size).unwrap_or(0);
        if offset.checked_add(size).is_none_or(|end| end > file) {
            return Err(LogError::PastEnd { size, offset, file });
        }
        let page = page_size();
        let start = offset - offset % page;
        let delta = offset - start;
        let map_len = usize::try_from(delta + size)
            .map_err(|_| LogError::Map(io::ErrorKind::InvalidInput.into()))?;
        let start = libc::off_t::try_from(start)
            .map_err(|_| LogError::Map(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: a new shared mapping chosen by the kernel (no MAP_FIXED), of a range of the
        // file that exists (checked above); nothing else refers to it yet.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                start,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(LogError::Map(io::Error::last_os_error()));
        }
        // A log file that the frontend truncates later must not end the daemon.
        if crate::memguard::seal_shrink(fd) == crate::memguard::Seal::Unsealable {
            crate::memguard::register(map as usize, map_len);
        }
        let delta = delta as usize;
        Ok(LogArea {
            map,
            map_len,
            // SAFETY: `delta < page <= map_len`: still inside the mapping.
            log: unsafe { map.cast::<u8>().add(delta) }.cast(),
            len: map_len - delta,
        })
    }

    /// Bytes in the log.
    pub fn bytes(&self) -> u64 {
        self.len as u64
    }

    /// Whether the log has a bit for every page of `[addr, addr + len)`.
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        len == 0
            || addr
                .checked_add(len - 1)
                .is_some_and(|last| last / LOG_PAGE / 8 < self.bytes())
    }

    /// Sets the bits of every page of `[addr, addr + len)` (guest physical addresses), one
    /// atomic OR per log byte. Returns false, marking nothing, for a range the log does not
    /// cover.
    pub fn mark(&self, addr: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        if !self.covers(addr, len) {
            return false;
        }
        let first = addr / LOG_PAGE;
        let last = (addr + (len - 1)) / LOG_PAGE;
        let mut byte = first / 8;
        let mut bits = 0u8;
        for page in first..=last {
            if page / 8 != byte {
                self.or(byte, bits);
                byte = page / 8;
                bits = 0;
            }
            bits |= 1 << (page % 8);
        }
        self.or(byte, bits);
        true
    }

    fn or(&self, byte: u64, bits: u8) {
        // `covers` checked that every byte index is below `len`.
        let i = byte as usize;
        debug_assert!(i < self.len);
        // SAFETY: `i < len`: inside the mapping, which lives as long as `self`; every access to
        // it is atomic. Release: the write being logged happens before its bit is seen.
        unsafe { &*self.log.add(i) }.fetch_or(bits, Ordering::Release);
    }

    /// Whether the page holding `addr` is marked (tests and checks).
    pub fn is_marked(&self, addr: u64) -> bool {
        let page = addr / LOG_PAGE;
        let i = page / 8;
        if i >= self.bytes() {
            return false;
        }
        // SAFETY: `i < len`, as in `or`.
        let b = unsafe { &*self.log.add(i as usize) }.load(Ordering::Acquire);
        b & (1 << (page % 8)) != 0
    }
}

impl Drop for LogArea {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; no reference into it outlives `self`.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// The log state of one used ring, from its `SET_VRING_ADDR`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingLog {
    /// Guest physical address and length of the used ring.
    pub used_gpa: u64,
    pub used_len: u64,
    /// `log_guest_addr`: where the used ring's first byte is logged.
    pub log_addr: u64,
    /// `VHOST_VRING_F_LOG`: writes to this used ring are logged.
    pub log: bool,
}

#[derive(Default)]
struct State {
    area: Option<Arc<LogArea>>,
    log_all: bool,
    rings: Vec<RingLog>,
    /// `VHOST_USER_SET_LOG_FD`: told (eventfd write) when the log changed.
    notify: Option<OwnedFd>,
    /// The logged view of the current guest memory.
    view: Option<Arc<LoggedMem>>,
}

/// The daemon's log: one frontend session at a time, set by the gate, read by the data path
/// and by vm-memory's write reports.
pub struct DirtyLog {
    /// `VHOST_F_LOG_ALL` acked and a log mapped: writes are logged.
    active: AtomicBool,
    state: RwLock<State>,
    /// Log calls that marked pages (for the stats).
    marks: AtomicU64,
    /// Writes the log did not cover (counted, never written outside the log).
    misses: AtomicU64,
}

/// The log of this daemon.
pub static LOG: DirtyLog = DirtyLog::new();

impl DirtyLog {
    pub const fn new() -> Self {
        DirtyLog {
            active: AtomicBool::new(false),
            state: RwLock::new(State {
                area: None,
                log_all: false,
                rings: Vec::new(),
                notify: None,
                view: None,
            }),
            marks: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Whether writes are being logged now.
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        f(&mut st);
        self.active
            .store(st.log_all && st.area.is_some(), Ordering::Release);
    }

    /// Installs (or, with `None`, drops) the log area.
    pub fn set_area(&self, area: Option<LogArea>) {
        self.update(|st| st.area = area.map(Arc::new));
    }

    /// Follows `VHOST_F_LOG_ALL` in the acked features.
    pub fn set_log_all(&self, on: bool) {
        self.update(|st| st.log_all = on);
    }

    /// Records ring `index`'s used-ring log parameters.
    pub fn set_ring(&self, index: usize, ring: RingLog) {
        self.update(|st| {
            if st.rings.len() <= index {
                st.rings.resize(index + 1, RingLog::default());
            }
            st.rings[index] = ring;
        });
    }

    /// `VHOST_USER_SET_LOG_FD`: an eventfd to tell when the log changed.
    pub fn set_notify(&self, fd: Option<OwnedFd>) {
        self.update(|st| st.notify = fd);
    }

    /// Forgets everything of the last session.
    pub fn reset(&self) {
        self.update(|st| *st = State::default());
    }

    /// Whether the current log covers `[addr, addr + len)`; true without a log.
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        st.area.as_ref().is_none_or(|a| a.covers(addr, len))
    }

    /// The log's size in bytes, if one is mapped.
    pub fn area_len(&self) -> Option<u64> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        st.area.as_ref().map(|a| a.bytes())
    }

    /// Runs `f` on the log area if writes are logged now.
    fn with_area(&self, f: impl FnOnce(&State, &LogArea)) {
        if !self.active() {
            return;
        }
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        if let (true, Some(area)) = (st.log_all, st.area.as_deref()) {
            f(&st, area);
        }
    }

    fn mark_in(&self, area: &LogArea, addr: u64, len: u64) {
        if area.mark(addr, len) {
            self.marks.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Logs a data write of `len` bytes at guest physical address `gpa`.
    pub fn mark(&self, gpa: u64, len: u64) {
        self.with_area(|_, area| self.mark_in(area, gpa, len));
    }

    /// Logs the first `n` bytes of `iovs`, host addresses in guest memory `mem` the card wrote
    /// through its own mapping (a frame read from the tap straight into guest buffers).
    pub fn mark_iovs(&self, mem: &GuestMem, iovs: &[libc::iovec], mut n: usize) {
        self.with_area(|_, area| {
            for iov in iovs {
                if n == 0 {
                    break;
                }
                let len = iov.iov_len.min(n);
                n -= len;
                let at = iov.iov_base as usize;
                // Each iovec lies inside one region (`iov::push_guest` splits the others).
                let region = mem.iter().find(|r| {
                    let base = r.as_ptr() as usize;
                    at >= base && at - base < r.len() as usize
                });
                match region {
                    Some(r) => {
                        let gpa = r.start_addr().0 + (at - r.as_ptr() as usize) as u64;
                        self.mark_in(area, gpa, len as u64);
                    }
                    None => {
                        self.misses.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }

    /// Logs a write vm-memory made at guest physical address `gpa` through the logged view
    /// (the used rings: the data path writes nothing else through it). Inside a used ring with
    /// `VHOST_VRING_F_LOG` it is logged at the ring's `log_guest_addr`; inside one without, not
    /// at all; anywhere else at its own address.
    fn mark_ring_write(&self, gpa: u64, len: u64) {
        self.with_area(|st, area| {
            let ring = st
                .rings
                .iter()
                .find(|r| gpa >= r.used_gpa && gpa - r.used_gpa < r.used_len);
            match ring {
                Some(r) if r.log => self.mark_in(area, r.log_addr + (gpa - r.used_gpa), len),
                Some(_) => {}
                None => self.mark_in(area, gpa, len),
            }
        });
    }

    /// Marks every logged used ring whole: for a pass that wrote them without the logged view
    /// (guest memory changed under it), after those writes.
    pub fn mark_logged_rings(&self) {
        self.with_area(|st, area| {
            for r in st.rings.iter().filter(|r| r.log) {
                self.mark_in(area, r.log_addr, r.used_len);
            }
        });
    }

    /// Builds the logged view of `mem` (a new memory table).
    pub fn set_memory(&self, mem: &GuestMem) {
        let view = logged_view(mem);
        if view.is_none() {
            warn!("cannot build the logged view of guest memory; used rings are marked whole");
        }
        self.update(|st| st.view = view.map(Arc::new));
    }

    /// What a pass writes used rings through while writes are logged: the logged view if it
    /// is the view of `mem`, or `None` (the pass then calls [`DirtyLog::mark_logged_rings`]).
    pub fn view_for(&self, mem: &GuestMem) -> Option<Arc<LoggedMem>> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        st.view
            .as_ref()
            .filter(|view| same_regions(view, mem))
            .cloned()
    }

    /// Tells the frontend the log changed, if it gave a descriptor for that
    /// (`VHOST_USER_SET_LOG_FD`); a descriptor that would block is skipped.
    pub fn notify(&self) {
        self.with_area(|st, _| {
            if let Some(fd) = &st.notify {
                crate::poll::signal_eventfd(fd.as_raw_fd());
            }
        });
    }

    /// (log calls that marked pages, writes outside the log).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.marks.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

impl Default for DirtyLog {
    fn default() -> Self {
        Self::new()
    }
}

/// The vm-memory bitmap of one region of the logged view: passes the region's writes, as
/// guest physical addresses, to [`LOG`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RegionBitmap {
    /// Guest physical address of the region's first byte.
    gpa: u64,
}

impl<'a> WithBitmapSlice<'a> for RegionBitmap {
    type S = RefSlice<'a, RegionBitmap>;
}

impl Bitmap for RegionBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        LOG.mark_ring_write(self.gpa.wrapping_add(offset as u64), len as u64);
    }

    /// The log is the frontend's to read; vm-memory never asks.
    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, RegionBitmap> {
        RefSlice::new(self, offset)
    }
}

// Makes sure `RefSlice<RegionBitmap>` is a valid slice type.
const _: fn() = || {
    fn slice<T: BitmapSlice>() {}
    slice::<RefSlice<'static, RegionBitmap>>();
};

/// A second view of `mem`'s mappings, each region with its [`RegionBitmap`]. The view owns
/// nothing: it is only used while `mem` (or memory with the very same regions, see
/// [`same_regions`]) is held.
fn logged_view(mem: &GuestMem) -> Option<LoggedMem> {
    let mut regions = Vec::new();
    for r in mem.iter() {
        let bitmap = RegionBitmap {
            gpa: r.start_addr().0,
        };
        let size = usize::try_from(r.len()).ok()?;
        // SAFETY: the pointer and size are those of a live mapping of `mem`; the view's region
        // does not own it (no munmap on drop) and is used only while a memory with the same
        // mappings is held (`view_for`).
        let region = unsafe {
            MmapRegionBuilder::new_with_bitmap(size, bitmap)
                .with_raw_mmap_pointer(r.as_ptr())
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
                .build()
        }
        .ok()?;
        regions.push(GuestRegionMmap::new(region, r.start_addr())?);
    }
    LoggedMem::from_regions(regions).ok()
}

/// Whether `view` has exactly `mem`'s regions (host mapping, length, guest address).
fn same_regions(view: &LoggedMem, mem: &GuestMem) -> bool {
    view.num_regions() == mem.num_regions()
        && view.iter().zip(mem.iter()).all(|(v, m)| {
            v.as_ptr() == m.as_ptr() && v.len() == m.len() && v.start_addr() == m.start_addr()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd};

    fn memfd(size: u64) -> OwnedFd {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"log".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a descriptor we just created and own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let size = libc::off_t::try_from(size).unwrap();
        // SAFETY: ftruncate on our own descriptor.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), size) };
        assert_eq!(rc, 0);
        fd
    }

    #[test]
    fn marks_pages_as_the_spec_says() {
        let fd = memfd(8192);
        let area = LogArea::map(fd.as_fd(), 16, 4096 + 8).unwrap();
        assert_eq!(area.bytes(), 16);
        // 16 bytes: 128 pages, 512 KiB of guest memory.
        assert!(area.covers(0, 128 * LOG_PAGE));
        assert!(!area.covers(0, 128 * LOG_PAGE + 1));
        assert!(area.mark(0x3fff, 2)); // pages 3 and 4
        assert!(area.mark(9 * LOG_PAGE, 1)); // page 9
        assert!(!area.mark(128 * LOG_PAGE, 1));
        let marked: Vec<u64> = (0..128).filter(|p| area.is_marked(p * LOG_PAGE)).collect();
        assert_eq!(marked, [3, 4, 9]);
        // The bits land in the file at the offset given: byte 0 = pages 0-7, byte 1 = 8-15.
        let mut buf = [0u8; 2];
        // SAFETY: pread into a local buffer from our own descriptor.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                2,
                (4096 + 8) as libc::off_t,
            )
        };
        assert_eq!(n, 2);
        assert_eq!(buf, [0b0001_1000, 0b0000_0010]);
    }

    #[test]
    fn bad_areas_are_refused() {
        let fd = memfd(4096);
        assert!(matches!(
            LogArea::map(fd.as_fd(), 0, 0),
            Err(LogError::Empty)
        ));
        assert!(matches!(
            LogArea::map(fd.as_fd(), 4096, 8),
            Err(LogError::PastEnd { .. })
        ));
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            LogArea::map(null.as_fd(), 8, 0),
            Err(LogError::Map(_))
        ));
    }

    #[test]
    fn the_logged_view_marks_what_is_written_through_it() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = GuestMem::from_ranges(&[(GuestAddress(0x10_0000), 0x10_0000)]).unwrap();
        let fd = memfd(4096);
        let log = &LOG;
        log.set_area(Some(LogArea::map(fd.as_fd(), 256, 0).unwrap()));
        log.set_memory(&mem);
        log.set_log_all(true);
        let view = log.view_for(&mem).unwrap();
        view.write_obj(7u64, GuestAddress(0x10_3008)).unwrap();
        // The same memory, and the page marked.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x10_3008)).unwrap(), 7);
        let area = log.state.read().unwrap().area.clone().unwrap();
        assert!(area.is_marked(0x10_3000));
        assert!(!area.is_marked(0x10_4000));
        // Writes through the memory itself are not reported (the data path marks its own).
        mem.write_obj(7u64, GuestAddress(0x10_5000)).unwrap();
        assert!(!area.is_marked(0x10_5000));
        // Another memory (a new table) has no view until it is set.
        let other = GuestMem::from_ranges(&[(GuestAddress(0x10_0000), 0x10_0000)]).unwrap();
        assert!(log.view_for(&other).is_none());
        log.reset();
        assert!(!log.active());
    }

    #[test]
    fn ring_writes_go_to_log_guest_addr() {
        let log = DirtyLog::new();
        let fd = memfd(4096);
        log.set_area(Some(LogArea::map(fd.as_fd(), 256, 0).unwrap()));
        log.set_ring(
            1,
            RingLog {
                used_gpa: 0x10_0000,
                used_len: 0x1006,
                log_addr: 0x20_0000,
                log: true,
            },
        );
        // Not active until LOG_ALL.
        log.mark_ring_write(0x10_0004, 8);
        log.mark(0x5000, 1);
        let st = log.state.read().unwrap();
        let area = st.area.clone().unwrap();
        drop(st);
        assert!(!area.is_marked(0x5000));
        log.set_log_all(true);
        log.mark_ring_write(0x10_1000, 2);
        log.mark_ring_write(0x30_0000, 8);
        log.mark(0x5000, 1);
        assert!(area.is_marked(0x20_1000));
        assert!(!area.is_marked(0x10_1000));
        assert!(area.is_marked(0x30_0000));
        assert!(area.is_marked(0x5000));
        // A pass without the logged view: the whole logged ring.
        log.mark_logged_rings();
        assert!(area.is_marked(0x20_0000));
        log.set_log_all(false);
        log.mark(0x7000, 1);
        assert!(!area.is_marked(0x7000));
    }
}
