//! The VDUSE user API (`include/uapi/linux/vduse.h`, API version 0 as Linux 6.12 has it): the
//! structures the ioctls and the device's messages carry, and one function per ioctl with its
//! SAFETY argument. No crate has these bindings.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// The API version this daemon speaks (the layouts below).
pub const API_VERSION: u64 = 0;
/// `VDUSE_NAME_MAX`: device names are NUL-terminated within this many bytes.
pub const NAME_MAX: usize = 256;

const VDUSE_BASE: u32 = 0x81;

ioctl_ior_nr!(VDUSE_GET_API_VERSION, VDUSE_BASE, 0x00, u64);
ioctl_iow_nr!(VDUSE_SET_API_VERSION, VDUSE_BASE, 0x01, u64);
ioctl_iow_nr!(VDUSE_CREATE_DEV, VDUSE_BASE, 0x02, DevConfig);
ioctl_iow_nr!(VDUSE_DESTROY_DEV, VDUSE_BASE, 0x03, [u8; NAME_MAX]);
ioctl_iowr_nr!(VDUSE_IOTLB_GET_FD, VDUSE_BASE, 0x10, IotlbEntry);
ioctl_ior_nr!(VDUSE_DEV_GET_FEATURES, VDUSE_BASE, 0x11, u64);
ioctl_iow_nr!(VDUSE_VQ_SETUP, VDUSE_BASE, 0x14, VqConfig);
ioctl_iowr_nr!(VDUSE_VQ_GET_INFO, VDUSE_BASE, 0x15, VqInfo);
ioctl_iow_nr!(VDUSE_VQ_SETUP_KICKFD, VDUSE_BASE, 0x16, VqEventfd);
ioctl_iow_nr!(VDUSE_VQ_INJECT_IRQ, VDUSE_BASE, 0x17, u32);

/// The ioctl numbers the daemon issues once it is serving (for the seccomp allow-list).
pub fn serving_ioctls() -> [u64; 6] {
    [
        VDUSE_IOTLB_GET_FD(),
        VDUSE_DEV_GET_FEATURES(),
        VDUSE_VQ_GET_INFO(),
        VDUSE_VQ_SETUP_KICKFD(),
        VDUSE_VQ_INJECT_IRQ(),
        VDUSE_DESTROY_DEV(),
    ]
    .map(u64::from)
}

/// `struct vduse_dev_config` without its trailing config bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DevConfig {
    pub name: [u8; NAME_MAX],
    pub vendor_id: u32,
    pub device_id: u32,
    pub features: u64,
    pub vq_num: u32,
    pub vq_align: u32,
    pub reserved: [u32; 13],
    pub config_size: u32,
}

/// `struct vduse_iotlb_entry`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IotlbEntry {
    pub offset: u64,
    pub start: u64,
    pub last: u64,
    pub perm: u8,
}

pub const ACCESS_RO: u8 = 0x1;
pub const ACCESS_WO: u8 = 0x2;
pub const ACCESS_RW: u8 = 0x3;

/// `struct vduse_vq_config` (API 0: index, max size, the rest reserved).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VqConfig {
    pub index: u32,
    pub max_size: u16,
    pub reserved: [u16; 13],
}

/// `struct vduse_vq_info` for a split ring (the union holds `avail_index` first).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VqInfo {
    pub index: u32,
    pub num: u32,
    pub desc_addr: u64,
    pub driver_addr: u64,
    pub device_addr: u64,
    pub avail_index: u16,
    pub packed_rest: [u16; 3],
    pub ready: u8,
}

/// `struct vduse_vq_eventfd`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VqEventfd {
    pub index: u32,
    pub fd: i32,
}

/// `VDUSE_EVENTFD_DEASSIGN`.
pub const EVENTFD_DEASSIGN: i32 = -1;

/// Size of `struct vduse_dev_request` and of `struct vduse_dev_response`.
pub const MSG_SIZE: usize = 152;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `VDUSE_GET_API_VERSION` on /dev/vduse/control.
pub fn get_api_version(control: &impl AsRawFd) -> io::Result<u64> {
    let mut v = 0u64;
    // SAFETY: the ioctl writes one u64 into `v`, which outlives the call.
    check(unsafe { ioctl_with_mut_ref(control, VDUSE_GET_API_VERSION(), &mut v) })?;
    Ok(v)
}

/// `VDUSE_SET_API_VERSION` on /dev/vduse/control.
pub fn set_api_version(control: &impl AsRawFd, v: u64) -> io::Result<()> {
    // SAFETY: the ioctl reads one u64 from `v`, which outlives the call.
    check(unsafe { ioctl_with_ref(control, VDUSE_SET_API_VERSION(), &v) }).map(|_| ())
}

/// `VDUSE_CREATE_DEV`: `config` followed by `config_space` in one buffer, as the kernel reads
/// `config_size` bytes after the structure.
pub fn create_dev(
    control: &impl AsRawFd,
    config: &DevConfig,
    config_space: &[u8],
) -> io::Result<()> {
    let mut head = *config;
    head.config_size = u32::try_from(config_space.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let size = std::mem::size_of::<DevConfig>();
    // u64 storage keeps the structure's alignment.
    let mut buf = vec![0u64; (size + config_space.len()).div_ceil(8)];
    // SAFETY: `buf` is 8-byte aligned and holds `size + config_space.len()` bytes: the plain-old-
    // data header goes at its start and the configuration bytes right after it.
    unsafe {
        let p = buf.as_mut_ptr().cast::<u8>();
        std::ptr::write(p.cast::<DevConfig>(), head);
        std::ptr::copy_nonoverlapping(config_space.as_ptr(), p.add(size), config_space.len());
    }
    // SAFETY: the kernel reads a `DevConfig` and then `config_size` bytes from the pointer; the
    // buffer holds both and outlives the call.
    check(unsafe {
        ioctl_with_ptr(
            control,
            VDUSE_CREATE_DEV(),
            buf.as_ptr().cast::<DevConfig>(),
        )
    })
    .map(|_| ())
}

/// A device name as the kernel's fixed-size, NUL-terminated array.
pub fn name_bytes(name: &str) -> [u8; NAME_MAX] {
    let mut out = [0u8; NAME_MAX];
    for (d, s) in out.iter_mut().zip(name.bytes().take(NAME_MAX - 1)) {
        *d = s;
    }
    out
}

/// `VDUSE_DESTROY_DEV` on /dev/vduse/control (EBUSY while a vdpa device or an open device
/// file holds it).
pub fn destroy_dev(control: &impl AsRawFd, name: &str) -> io::Result<()> {
    let n = name_bytes(name);
    // SAFETY: the kernel reads NAME_MAX bytes from `n`, which outlives the call.
    check(unsafe { ioctl_with_ref(control, VDUSE_DESTROY_DEV(), &n) }).map(|_| ())
}

/// `VDUSE_VQ_SETUP` on the device.
pub fn vq_setup(dev: &impl AsRawFd, index: u32, max_size: u16) -> io::Result<()> {
    let c = VqConfig {
        index,
        max_size,
        ..Default::default()
    };
    // SAFETY: the kernel reads one `VqConfig` from `c`, which outlives the call.
    check(unsafe { ioctl_with_ref(dev, VDUSE_VQ_SETUP(), &c) }).map(|_| ())
}

/// `VDUSE_VQ_GET_INFO` on the device.
pub fn vq_get_info(dev: &impl AsRawFd, index: u32) -> io::Result<VqInfo> {
    let mut info = VqInfo {
        index,
        ..Default::default()
    };
    // SAFETY: the kernel reads and writes one `VqInfo` in `info`, which outlives the call.
    check(unsafe { ioctl_with_mut_ref(dev, VDUSE_VQ_GET_INFO(), &mut info) })?;
    Ok(info)
}

/// `VDUSE_VQ_SETUP_KICKFD` on the device; `fd` [`EVENTFD_DEASSIGN`] removes it.
pub fn vq_setup_kickfd(dev: &impl AsRawFd, index: u32, fd: i32) -> io::Result<()> {
    let e = VqEventfd { index, fd };
    // SAFETY: the kernel reads one `VqEventfd` from `e`, which outlives the call, and takes its
    // own reference to the eventfd.
    check(unsafe { ioctl_with_ref(dev, VDUSE_VQ_SETUP_KICKFD(), &e) }).map(|_| ())
}

/// `VDUSE_VQ_INJECT_IRQ` on the device.
pub fn vq_inject_irq(dev: &impl AsRawFd, index: u32) -> io::Result<()> {
    // SAFETY: the kernel reads one u32 from `index`, which outlives the call.
    check(unsafe { ioctl_with_ref(dev, VDUSE_VQ_INJECT_IRQ(), &index) }).map(|_| ())
}

/// `VDUSE_DEV_GET_FEATURES`: what the driver wrote (valid from FEATURES_OK on).
pub fn dev_get_features(dev: &impl AsRawFd) -> io::Result<u64> {
    let mut v = 0u64;
    // SAFETY: the kernel writes one u64 into `v`, which outlives the call.
    check(unsafe { ioctl_with_mut_ref(dev, VDUSE_DEV_GET_FEATURES(), &mut v) })?;
    Ok(v)
}

/// `VDUSE_IOTLB_GET_FD`: the first IOTLB entry overlapping `[start, last]` and a descriptor of
/// the file that backs it (mmap it at `entry.offset`).
pub fn iotlb_get_fd(
    dev: &impl AsRawFd,
    start: u64,
    last: u64,
) -> io::Result<(IotlbEntry, OwnedFd)> {
    let mut e = IotlbEntry {
        start,
        last,
        ..Default::default()
    };
    // SAFETY: the kernel reads and writes one `IotlbEntry` in `e`, which outlives the call, and
    // returns a new descriptor.
    let fd = check(unsafe { ioctl_with_mut_ref(dev, VDUSE_IOTLB_GET_FD(), &mut e) })?;
    // SAFETY: a descriptor the kernel just installed for us; nothing else owns it.
    Ok((e, unsafe { OwnedFd::from_raw_fd(fd) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<DevConfig>(), 336);
        assert_eq!(std::mem::size_of::<IotlbEntry>(), 32);
        assert_eq!(std::mem::size_of::<VqConfig>(), 32);
        assert_eq!(std::mem::size_of::<VqInfo>(), 48);
        assert_eq!(std::mem::size_of::<VqEventfd>(), 8);
        // _IOR('\x81', 0, __u64) and _IOWR('\x81', 0x15, struct vduse_vq_info).
        assert_eq!(VDUSE_GET_API_VERSION(), 0x8008_8100);
        assert_eq!(VDUSE_VQ_GET_INFO(), 0xc030_8115);
        assert_eq!(VDUSE_CREATE_DEV(), 0x4150_8102);
        assert_eq!(VDUSE_DESTROY_DEV(), 0x4100_8103);
        assert_eq!(VDUSE_VQ_INJECT_IRQ(), 0x4004_8117);
    }

    #[test]
    fn names_are_nul_terminated() {
        let n = name_bytes("card");
        assert_eq!(&n[..5], b"card\0");
        let long = "x".repeat(400);
        assert_eq!(name_bytes(&long)[NAME_MAX - 1], 0);
    }
}
