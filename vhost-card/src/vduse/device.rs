//! The VDUSE device itself: /dev/vduse/control, creating /dev/vduse/NAME with the card's feature
//! offer and virtio-net configuration space, taking back a device a crashed daemon left, and
//! destroying it at the end.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::info;
use thiserror::Error;

use super::uapi::{self, DevConfig};

/// `VIRTIO_ID_NET`.
const VIRTIO_ID_NET: u32 = 1;
/// Ring alignment the driver is asked for (a page, as virtio-pci legacy used).
const VQ_ALIGN: u32 = 4096;

const CONTROL: &str = "/dev/vduse/control";

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("{CONTROL} is missing: this kernel has no VDUSE, or its module is not loaded (modprobe vduse; kernel option CONFIG_VDPA_USER, with CONFIG_VDPA)")]
    NoVduse,
    #[error("cannot open {CONTROL}: {0} (run as root)")]
    Control(io::Error),
    #[error("the kernel's VDUSE (API version {0}) refuses API version {need}, the one this daemon speaks", need = uapi::API_VERSION)]
    ApiVersion(u64),
    #[error("VDUSE device name '{0}': 1 to 255 characters, no '/', whitespace or NUL")]
    BadName(String),
    #[error("creating a VDUSE net device needs CAP_NET_ADMIN (run as root)")]
    Permission,
    #[error("the kernel refused VDUSE device {name} with features {features:#x} (VDUSE_CREATE_DEV: EINVAL); Linux 6.12's VDUSE takes net devices only with VERSION_1 and ACCESS_PLATFORM and without CTRL_VQ")]
    Refused { name: String, features: u64 },
    #[error("VDUSE device {0} is in use by another process (another vhost-card serving it?)")]
    InUse(String),
    #[error("{what} VDUSE device {name}: {cause}")]
    Io {
        what: &'static str,
        name: String,
        cause: io::Error,
    },
}

/// Maps a failed step on device `name` to [`DeviceError::Io`]; the OS's words come once.
fn io_err(what: &'static str, name: &str) -> impl FnOnce(io::Error) -> DeviceError {
    let name = name.to_string();
    move |cause| DeviceError::Io { what, name, cause }
}

/// What the device offers and shows.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    /// The virtio feature word offered (ACCESS_PLATFORM included).
    pub features: u64,
    /// The virtio-net configuration space.
    pub config: Vec<u8>,
    pub queues: u32,
    pub queue_size: u16,
    /// The kernel's bounce buffer, MiB (set before a vdpa device exists).
    pub bounce_mib: u32,
}

/// How the daemon came by its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Created now.
    Created,
    /// Left by an earlier daemon; taken back as it is (its vdpa device and host interface kept).
    TakenBack,
    /// Left by an earlier daemon, destroyed and created again (the reason).
    Recreated(String),
}

/// An open VDUSE device.
pub struct Device {
    pub name: String,
    control: File,
    /// /dev/vduse/NAME, opened non-blocking.
    pub file: File,
}

/// A name the kernel takes for /dev/vduse/NAME (checked before anything is created).
pub fn check_name(name: &str) -> Result<(), DeviceError> {
    let ok = !name.is_empty()
        && name.len() < uapi::NAME_MAX
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c == '\0');
    if ok {
        Ok(())
    } else {
        Err(DeviceError::BadName(name.to_string()))
    }
}

/// Opens /dev/vduse/control and agrees on the API version.
pub fn open_control() -> Result<File, DeviceError> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(CONTROL)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => DeviceError::NoVduse,
            _ => DeviceError::Control(e),
        })?;
    let version = uapi::get_api_version(&control).map_err(DeviceError::Control)?;
    // Every kernel with VDUSE speaks version 0; a newer one must agree to speak it.
    uapi::set_api_version(&control, uapi::API_VERSION)
        .map_err(|_| DeviceError::ApiVersion(version))?;
    log::debug!("VDUSE API version {version} (using {})", uapi::API_VERSION);
    Ok(control)
}

fn node(name: &str) -> PathBuf {
    Path::new("/dev/vduse").join(name)
}

/// Opens /dev/vduse/NAME; devtmpfs may take a moment to show a new node.
fn open_node(name: &str) -> Result<File, DeviceError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(node(name))
        {
            Ok(f) => return Ok(f),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(DeviceError::InUse(name.to_string()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io_err("opening", name)(e)),
        }
    }
}

fn create(control: &File, spec: &Spec) -> io::Result<()> {
    let cfg = DevConfig {
        name: uapi::name_bytes(&spec.name),
        vendor_id: 0,
        device_id: VIRTIO_ID_NET,
        features: spec.features,
        vq_num: spec.queues,
        vq_align: VQ_ALIGN,
        reserved: [0; 13],
        config_size: 0,
    };
    uapi::create_dev(control, &cfg, &spec.config)?;
    set_bounce(spec);
    Ok(())
}

/// Sets the bounce buffer through sysfs (the attribute exists from Linux 6.7 on and takes a
/// size until the vdpa device is added).
fn set_bounce(spec: &Spec) {
    let path = Path::new("/sys/class/vduse")
        .join(&spec.name)
        .join("bounce_size");
    let bytes = u64::from(spec.bounce_mib) << 20;
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match std::fs::write(&path, bytes.to_string()) {
            Ok(()) => {
                info!("VDUSE bounce buffer: {} MiB", spec.bounce_mib);
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                log::warn!(
                    "cannot set the bounce buffer to {} MiB ({}: {e}); the kernel's default applies",
                    spec.bounce_mib,
                    path.display()
                );
                return;
            }
        }
    }
}

impl Device {
    /// Creates the device, or deals with one of the same name left by an earlier daemon:
    /// `attached` says whether a vdpa device uses it. One that no vdpa device uses is destroyed
    /// and created again; one in use is taken back (the caller checks the driver's features and
    /// may still recreate it).
    /// `control` is /dev/vduse/control from [`open_control`].
    pub fn open(
        spec: &Spec,
        control: File,
        attached: impl Fn() -> bool,
    ) -> Result<(Device, Origin), DeviceError> {
        check_name(&spec.name)?;
        let io_err = |what| io_err(what, &spec.name);
        let origin = match create(&control, spec) {
            Ok(()) => Origin::Created,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                // Refuses a device someone holds open.
                let held = open_node(&spec.name)?;
                if attached() {
                    Origin::TakenBack
                } else {
                    drop(held);
                    uapi::destroy_dev(&control, &spec.name)
                        .map_err(io_err("destroying the stale"))?;
                    create(&control, spec).map_err(io_err("creating"))?;
                    Origin::Recreated("no vdpa device used it".into())
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => return Err(DeviceError::Permission),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(DeviceError::Refused {
                    name: spec.name.clone(),
                    features: spec.features,
                })
            }
            Err(e) => return Err(io_err("creating")(e)),
        };
        let file = open_node(&spec.name)?;
        for q in 0..spec.queues {
            uapi::vq_setup(&file, q, spec.queue_size)
                .map_err(io_err("setting up the queues of"))?;
        }
        info!(
            "VDUSE device /dev/vduse/{}: {}",
            spec.name,
            match &origin {
                Origin::Created => "created".to_string(),
                Origin::TakenBack => "left by an earlier daemon, taken back as it is".to_string(),
                Origin::Recreated(why) =>
                    format!("left by an earlier daemon, destroyed and created again ({why})"),
            }
        );
        Ok((
            Device {
                name: spec.name.clone(),
                control,
                file,
            },
            origin,
        ))
    }

    /// Closes the device file and destroys the device, retrying for up to `wait` while the
    /// kernel still holds it (EBUSY: the vdpa device is going away).
    pub fn destroy(self, wait: Duration) -> io::Result<()> {
        let Device {
            name,
            control,
            file,
        } = self;
        drop(file);
        let deadline = Instant::now() + wait;
        loop {
            match uapi::destroy_dev(&control, &name) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Destroys the device and creates it again from `spec` (a device taken back whose driver
    /// negotiated what this daemon does not serve).
    pub fn recreate(self, spec: &Spec) -> Result<Device, DeviceError> {
        let name = self.name.clone();
        let io_err = |what| io_err(what, &name);
        let control = open_control()?;
        self.destroy(Duration::from_secs(5))
            .map_err(io_err("destroying"))?;
        create(&control, spec).map_err(io_err("creating"))?;
        let file = open_node(&spec.name)?;
        for q in 0..spec.queues {
            uapi::vq_setup(&file, q, spec.queue_size)
                .map_err(io_err("setting up the queues of"))?;
        }
        Ok(Device {
            name,
            control,
            file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("card0").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("..").is_err());
        assert!(check_name(&"x".repeat(256)).is_err());
    }
}
