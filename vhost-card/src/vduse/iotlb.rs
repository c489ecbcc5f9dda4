//! The device's IOVA space as guest memory: every IOTLB entry the kernel reports
//! (`VDUSE_IOTLB_GET_FD`) is mapped from the file it names, at its offset, into the same
//! `GuestMemoryMmap` type the vhost-user mode builds from its memory table, so the data path
//! translates descriptor addresses the same way (and refuses anything outside the map).
//!
//! With `virtio_vdpa` the IOVA space is VDUSE's bounce domain: the streaming (bounce) range at
//! IOVA 0, which the kernel adds at the driver's first DMA mapping, and one coherent range per
//! ring. The map is read again at DRIVER_OK, on `VDUSE_UPDATE_IOTLB`, and on kicks until the
//! streaming range is there (see [`Iotlb::complete`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use log::{debug, info, warn};
use thiserror::Error;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
};

use super::uapi::{self, IotlbEntry, ACCESS_RO, ACCESS_RW, ACCESS_WO};

/// Most entries one map may hold (a bounce domain has one per ring and one streaming range).
pub const MAX_ENTRIES: usize = 1024;
/// Most bytes one map may cover (VDUSE's IOVA space is 1.125 GiB; a vhost-vdpa guest's RAM
/// can be larger).
pub const MAX_BYTES: u64 = 1 << 40;

#[derive(Debug, Error)]
pub enum IotlbError {
    #[error("VDUSE_IOTLB_GET_FD: {0}")]
    Query(io::Error),
    #[error("IOTLB entry [{start:#x}, {last:#x}] refused: {why}")]
    Bad {
        start: u64,
        last: u64,
        why: &'static str,
    },
    #[error("mapping IOTLB entry [{start:#x}, {last:#x}]: {cause}")]
    Map {
        start: u64,
        last: u64,
        cause: vm_memory::mmap::MmapRegionError,
    },
    #[error("the IOTLB holds more than {MAX_ENTRIES} entries or {MAX_BYTES} bytes")]
    TooBig,
}

/// What one sync found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub entries: usize,
    pub bytes: u64,
    /// Write-only entries, which cannot be mapped (mmap needs read access) and stay out.
    pub write_only: usize,
}

/// Checks one entry as the kernel returned it for a query starting at `from`.
pub fn check_entry(e: &IotlbEntry, from: u64) -> Result<u64, &'static str> {
    if e.start > e.last {
        return Err("start after last");
    }
    if e.last < from {
        return Err("entry before the queried range");
    }
    // The start and the file offset are page aligned (mmap needs it); a coherent allocation
    // may end inside its last page (that page is the device's, the rest of it unused).
    let page = 4096u64;
    let size = e
        .last
        .checked_sub(e.start)
        .and_then(|d| d.checked_add(1))
        .ok_or("covers the whole address space")?;
    if e.start % page != 0 || e.offset % page != 0 {
        return Err("not page aligned");
    }
    if e.offset.checked_add(size).is_none() {
        return Err("file offset wraps");
    }
    if !matches!(e.perm, ACCESS_RO | ACCESS_WO | ACCESS_RW) {
        return Err("unknown permission");
    }
    Ok(size)
}

/// The mapped IOVA space of one device.
pub struct Iotlb {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    complete: AtomicBool,
    /// The kernel has sent `VDUSE_UPDATE_IOTLB` (a vhost-vdpa frontend maps the IOVA space): it
    /// announces every change from then on.
    announced: AtomicBool,
    sync_lock: Mutex<()>,
}

impl Default for Iotlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Iotlb {
    pub fn new() -> Self {
        Iotlb {
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            complete: AtomicBool::new(false),
            announced: AtomicBool::new(false),
            sync_lock: Mutex::new(()),
        }
    }

    /// The memory handle the rings and the data path share; a sync replaces what it holds.
    pub fn memory(&self) -> GuestMemoryAtomic<GuestMemoryMmap> {
        self.mem.clone()
    }

    /// Whether the map needs no more reading on kicks: it holds the streaming range at IOVA 0
    /// (after that, only resets change a bounce domain), or the kernel announces every change
    /// with `VDUSE_UPDATE_IOTLB`.
    pub fn complete(&self) -> bool {
        self.complete.load(Ordering::Acquire) || self.announced.load(Ordering::Acquire)
    }

    /// Reads the map again after `VDUSE_UPDATE_IOTLB`.
    pub fn update(&self, dev: &impl AsRawFd) -> Result<Summary, IotlbError> {
        self.announced.store(true, Ordering::Release);
        self.sync(dev)
    }

    /// Forgets every mapping (device reset). Workers still holding the old map keep it until
    /// their pass ends.
    pub fn clear(&self) {
        let _g = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.complete.store(false, Ordering::Release);
        if let Ok(guard) = self.mem.lock() {
            guard.replace(GuestMemoryMmap::new());
        }
    }

    /// Reads every IOTLB entry of `dev` and replaces the map with them.
    pub fn sync(&self, dev: &impl AsRawFd) -> Result<Summary, IotlbError> {
        let _g = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut regions = Vec::new();
        let mut sum = Summary::default();
        let mut from = 0u64;
        let mut at_zero = false;
        loop {
            let (e, fd) = match uapi::iotlb_get_fd(dev, from, u64::MAX) {
                Ok(got) => got,
                // No entry at or after `from`.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) => return Err(IotlbError::Query(e)),
            };
            let bad = |why| IotlbError::Bad {
                start: e.start,
                last: e.last,
                why,
            };
            let size = check_entry(&e, from).map_err(bad)?;
            sum.entries += 1;
            if sum.entries > MAX_ENTRIES {
                return Err(IotlbError::TooBig);
            }
            sum.bytes = sum.bytes.saturating_add(size);
            if sum.bytes > MAX_BYTES {
                return Err(IotlbError::TooBig);
            }
            at_zero |= e.start == 0;
            if e.perm == ACCESS_WO {
                sum.write_only += 1;
            } else {
                let len = usize::try_from(size).map_err(|_| IotlbError::TooBig)?;
                // A read-only entry is mapped private: a descriptor that asks the card to write
                // there changes a private copy, never the driver's memory, and never faults.
                let flags = if e.perm == ACCESS_RW {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                } | libc::MAP_NORESERVE;
                let mapping = MmapRegionBuilder::new(len)
                    .with_file_offset(FileOffset::new(File::from(fd), e.offset))
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(flags)
                    .build()
                    .map_err(|cause| IotlbError::Map {
                        start: e.start,
                        last: e.last,
                        cause,
                    })?;
                let region = GuestRegionMmap::new(mapping, GuestAddress(e.start))
                    .ok_or(bad("wraps the address space"))?;
                if let Ok(p) = region.get_host_address(MemoryRegionAddress(0)) {
                    crate::memguard::register(p as usize, len);
                }
                debug!(
                    "IOTLB [{:#x}, {:#x}] perm {} offset {:#x}",
                    e.start, e.last, e.perm, e.offset
                );
                regions.push(region);
            }
            if e.last == u64::MAX {
                break;
            }
            from = e.last + 1;
        }
        let map = if regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            GuestMemoryMmap::from_regions(regions).map_err(|_| IotlbError::Bad {
                start: 0,
                last: u64::MAX,
                why: "entries overlap",
            })?
        };
        if sum.write_only > 0 {
            warn!(
                "{} write-only IOTLB entr(y/ies) left unmapped: buffers there are refused",
                sum.write_only
            );
        }
        let was = self.complete.swap(at_zero, Ordering::AcqRel);
        if at_zero && !was {
            info!(
                "IOVA space mapped: {} entries, {} KiB",
                sum.entries,
                sum.bytes / 1024
            );
        }
        match self.mem.lock() {
            Ok(guard) => guard.replace(map),
            Err(p) => p.into_inner().replace(map),
        }
        Ok(sum)
    }

    /// Total bytes mapped now.
    pub fn mapped_bytes(&self) -> u64 {
        use vm_memory::GuestAddressSpace;
        self.mem.memory().iter().map(|r| r.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, last: u64, offset: u64, perm: u8) -> IotlbEntry {
        IotlbEntry {
            offset,
            start,
            last,
            perm,
        }
    }

    #[test]
    fn entries_are_checked() {
        assert_eq!(check_entry(&entry(0, 0xfff, 0, ACCESS_RW), 0), Ok(0x1000));
        assert!(check_entry(&entry(0x2000, 0xfff, 0, ACCESS_RW), 0).is_err());
        assert!(check_entry(&entry(0, 0xfff, 0, ACCESS_RW), 0x1000).is_err());
        assert!(check_entry(&entry(0x10, 0x100f, 0, ACCESS_RW), 0).is_err());
        // A coherent ring allocation ends where its size says.
        assert_eq!(
            check_entry(&entry(0x47ff_0000, 0x47ff_7005, 0x47ff_0000, ACCESS_RW), 0),
            Ok(0x7006)
        );
        assert!(check_entry(&entry(0, u64::MAX, 0, ACCESS_RW), 0).is_err());
        assert!(check_entry(&entry(0, 0xfff, 0x10, ACCESS_RW), 0).is_err());
        assert!(check_entry(&entry(0, 0xfff, 0, 0), 0).is_err());
        assert!(check_entry(&entry(0, 0xfff, u64::MAX - 0xfff, ACCESS_RO), 0).is_err());
        assert_eq!(
            check_entry(
                &entry(0x4000_0000, 0x4000_ffff, 0x4000_0000, ACCESS_RO),
                0x1000
            ),
            Ok(0x10000)
        );
    }
}
