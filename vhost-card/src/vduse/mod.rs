//! VDUSE: the card as a virtio-net device of the kernel the daemon runs on (`vhost-card --vduse
//! NAME`), driven by that kernel's own `virtio_net` through `virtio_vdpa` (or handed to a VM
//! through `vhost_vdpa`).
//!
//! The transport is a layer around the same backend and data path as vhost-user mode:
//! * [`uapi`]: the kernel's VDUSE interface, one function per ioctl;
//! * [`device`]: /dev/vduse/control, creating, taking back and destroying /dev/vduse/NAME;
//! * [`netcfg`] and [`msg`]: the configuration space and the device's messages, pure;
//! * [`iotlb`]: the IOVA space mapped into the data path's guest-memory type;
//! * [`session`]: answers to the kernel's messages, rings from `VDUSE_VQ_GET_INFO`, interrupts
//!   by `VDUSE_VQ_INJECT_IRQ`; [`messages`]: the device's request channel; [`worker`]: one
//!   epoll worker per queue pair driving `CardBackend::handle_event`;
//! * [`vdpa`]: the vdpa device on top (generic netlink), through a small privileged process.

pub mod device;
pub mod iotlb;
pub mod messages;
pub mod msg;
pub mod netcfg;
pub mod session;
pub mod uapi;
pub mod vdpa;
pub mod worker;

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use serde_json::json;
use thiserror::Error;
use virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MAC};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::device::{Device, DeviceError, Origin, Spec};
use self::netcfg::NetConfig;
use self::vdpa::{Bind, Manager};
use crate::backend::CardBackend;
use crate::features::VHOST_F_LOG_ALL;

/// What `--vduse` and its companions ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VduseConfig {
    pub name: String,
    pub bind: Bind,
    /// MAC of the host's interface (VIRTIO_NET_F_MAC); default derived from the name.
    pub host_mac: Option<[u8; 6]>,
    /// The kernel's bounce buffer in MiB; default from the features (see [`bounce_mib`]).
    pub bounce_mib: Option<u32>,
}

/// The kernel's default bounce buffer (VDUSE_BOUNCE_SIZE).
pub const DEFAULT_BOUNCE_MIB: u32 = 64;

/// The bounce buffer a device needs. The driver maps every buffer it posts through it and a
/// mapping that does not fit fails (the frame is dropped: `tx_fifo_errors` on the host). With
/// MRG_RXBUF, RX buffers are a page or two and the kernel's 64 MiB serve a 1024-entry ring;
/// without it, every RX chain is a 64 KiB+ "big packet" (18 pages), so a full RX ring alone
/// takes `queue_size` x 72 KiB: 72 MiB at 1024, more than the default.
pub fn bounce_mib(features: u64, queue_size: usize) -> u32 {
    let mrg = features & 1u64 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF != 0;
    if mrg {
        DEFAULT_BOUNCE_MIB
    } else {
        let ring = (queue_size as u64 * 72 * 1024).div_ceil(1 << 20);
        u32::try_from(u64::from(DEFAULT_BOUNCE_MIB) + ring)
            .unwrap_or(1024)
            .min(1024)
    }
}

#[derive(Debug, Error)]
pub enum VduseError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("the vdpa manager process: {0}")]
    Manager(io::Error),
    #[error("vdpa device {name}: {cause}")]
    Vdpa { name: String, cause: io::Error },
    #[error("VDUSE device {name}: {what}: {cause}")]
    Io {
        name: String,
        what: &'static str,
        cause: io::Error,
    },
    #[error("serving VDUSE device {0} stopped: {1}")]
    Serve(String, String),
}

/// Maps a failed step on device `name` to [`VduseError::Io`]; the OS's words come once.
fn io_err(name: &str, what: &'static str) -> impl FnOnce(io::Error) -> VduseError {
    let name = name.to_string();
    move |cause| VduseError::Io { name, what, cause }
}

/// The card's bits a VDUSE device never offers: VIRTIO_NET_F_GUEST_ANNOUNCE needs the control
/// virtqueue VDUSE refuses (virtio_net fails the device that offers it without CTRL_VQ: "driver
/// status FAILED" before DRIVER_OK), and VHOST_F_LOG_ALL is vhost-user's dirty-log bit, not a
/// virtio feature (bit 26 is reserved in the virtio spec; migration is the VMM's business).
const NOT_OVER_VDUSE: u64 = 1u64 << VIRTIO_NET_F_GUEST_ANNOUNCE | 1u64 << VHOST_F_LOG_ALL;

/// The feature word a VDUSE device offers: the card's offer without [`NOT_OVER_VDUSE`], plus
/// VIRTIO_F_ACCESS_PLATFORM (VDUSE requires it: the driver maps every buffer through the
/// device's IOTLB) and VIRTIO_NET_F_MAC (the device, not a VMM, gives the host its address).
pub fn offer(card_features: u64) -> u64 {
    card_features & !NOT_OVER_VDUSE | 1u64 << VIRTIO_F_ACCESS_PLATFORM | 1u64 << VIRTIO_NET_F_MAC
}

/// The device's specification from the daemon's configuration.
pub fn spec(v: &VduseConfig, features: u64, mtu: u16, pairs: usize, queue_size: usize) -> Spec {
    let bounce = v
        .bounce_mib
        .unwrap_or_else(|| bounce_mib(features, queue_size));
    let config = NetConfig {
        mac: v.host_mac.unwrap_or_else(|| netcfg::mac_for(&v.name)),
        status: netcfg::STATUS_LINK_UP,
        max_virtqueue_pairs: u16::try_from(pairs).unwrap_or(1),
        mtu,
    };
    Spec {
        name: v.name.clone(),
        features: offer(features),
        config: config.encode().to_vec(),
        queues: u32::try_from(2 * pairs).unwrap_or(2),
        queue_size: u16::try_from(queue_size).unwrap_or(1024),
        bounce_mib: bounce,
    }
}

/// Where the daemon records what it created a device with, so that a restarted daemon knows
/// whether the device it finds is the one it would create.
fn record_path(name: &str) -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/vhost-card"))
        .join(format!("vduse-{name}.json"))
}

fn record_of(spec: &Spec) -> serde_json::Value {
    json!({
        "features": spec.features,
        "config": spec.config,
        "queues": spec.queues,
        "queue_size": spec.queue_size,
        "bounce_mib": spec.bounce_mib,
    })
}

fn write_record(spec: &Spec) {
    let path = record_path(&spec.name);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&path, record_of(spec).to_string()) {
        warn!(
            "cannot record the device's configuration in {}: {e}",
            path.display()
        );
    }
}

fn read_record(name: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(record_path(name)).ok()?).ok()
}

/// The device and the manager of its vdpa device, ready to serve.
pub struct Prepared {
    device: Device,
    origin: Origin,
    manager: Manager,
    spec: Spec,
    bind: Bind,
}

impl Prepared {
    pub fn origin(&self) -> &Origin {
        &self.origin
    }
}

/// What the daemon holds of VDUSE before it creates anything.
pub struct Start {
    manager: Manager,
    control: File,
}

/// Forks the process that adds and deletes the vdpa device (first, while the process is
/// single-threaded and holds no descriptor the manager must not keep), then opens
/// /dev/vduse/control: that the kernel has VDUSE, that this process may use it and that the API
/// version agrees is known before the daemon creates anything.
pub fn start(v: &VduseConfig) -> Result<Start, VduseError> {
    let manager = Manager::spawn(&v.name, v.bind).map_err(VduseError::Manager)?;
    let control = device::open_control()?;
    Ok(Start { manager, control })
}

/// Before the sandbox: creates the device, or takes back one a crashed daemon left if it was
/// created with the same offer and configuration (recorded next to it), or destroys and
/// recreates it.
pub fn prepare(v: &VduseConfig, spec: Spec, start: Start) -> Result<Prepared, VduseError> {
    let Start {
        mut manager,
        control,
    } = start;
    let name = v.name.clone();
    let attached = || vdpa::sysfs_dev(&name).exists();
    let (mut device, mut origin) = Device::open(&spec, control, attached)?;
    if origin == Origin::TakenBack {
        let same = read_record(&name).is_some_and(|r| r == record_of(&spec));
        // A request that timed out while no daemon answered (30 s) left the device broken:
        // every ioctl on it fails with EPERM from then on.
        let broken = uapi::dev_get_features(&device.file)
            .is_err_and(|e| e.raw_os_error() == Some(libc::EPERM));
        if !same || broken {
            let why = if broken {
                "the kernel marked it broken: a request timed out while no daemon answered"
            } else if read_record(&name).is_none() {
                "no record of what it was created with"
            } else {
                "it was created with another offer or configuration"
            };
            detach(&device, &mut manager)?;
            device = device.recreate(&spec)?;
            origin = Origin::Recreated(why.into());
            info!("VDUSE device /dev/vduse/{name}: destroyed and created again ({why})");
        }
    }
    if origin != Origin::TakenBack {
        write_record(&spec);
    }
    info!(
        "VDUSE device {name} offers features {:#x}: {} mac access-platform",
        spec.features,
        crate::features::names(spec.features).join(" ")
    );
    Ok(Prepared {
        device,
        origin,
        manager,
        spec,
        bind: v.bind,
    })
}

/// Deletes the vdpa device on a device being taken apart, answering the kernel's messages
/// meanwhile (the driver's removal resets the device and waits for the answer).
fn detach(device: &Device, manager: &mut Manager) -> Result<(), VduseError> {
    let io_err = |what| io_err(&device.name, what);
    let file = Arc::new(device.file.try_clone().map_err(io_err("duplicating"))?);
    // A bare session: no rings are set up, every status is acknowledged.
    let exit = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    let responder = {
        let (file, exit) = (file.clone(), exit.try_clone().map_err(io_err("eventfd"))?);
        std::thread::spawn(move || messages::answer_all(&file, &exit))
    };
    let result = manager.del().map_err(|cause| VduseError::Vdpa {
        name: device.name.clone(),
        cause,
    });
    let _ = exit.write(1);
    let _ = responder.join();
    result
}

/// Keeps the first error of a teardown as the result (printed once, by the caller); a later
/// one is logged here, once, instead of being lost.
fn first_error(result: &mut Result<(), VduseError>, e: VduseError) {
    if result.is_ok() {
        *result = Err(e);
    } else {
        warn!("{e}");
    }
}

/// After the sandbox: serves the device until `stopped()` says so, adding the vdpa device when
/// asked to; then deletes the vdpa device and destroys the VDUSE device.
pub fn serve(
    p: Prepared,
    backend: Arc<CardBackend>,
    pairs: usize,
    wait_stop: &dyn Fn(Duration) -> bool,
) -> Result<(), VduseError> {
    let Prepared {
        device,
        origin,
        mut manager,
        spec,
        bind,
    } = p;
    let name = device.name.clone();
    let io_err = |what| io_err(&name, what);
    let dev: Arc<File> = Arc::new(device.file.try_clone().map_err(io_err("duplicating"))?);
    let session = Arc::new(Mutex::new(session::Session::new(
        dev.clone(),
        backend.clone(),
        pairs,
        spec.queue_size,
        spec.features,
    )));
    if origin == Origin::TakenBack {
        let running = (0..spec.queues).any(|q| {
            uapi::vq_get_info(&*dev, q)
                .map(|i| i.ready != 0)
                .unwrap_or(false)
        });
        if running {
            if let Err(why) = session.lock().unwrap_or_else(|p| p.into_inner()).resume() {
                warn!("cannot resume the running driver: {why}");
            }
        }
    }
    let exit = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    let messages = {
        let (session, dev) = (session.clone(), dev.clone());
        let exit = exit.try_clone().map_err(io_err("eventfd"))?;
        std::thread::Builder::new()
            .name("vduse-messages".into())
            .spawn(move || messages::message_loop(&session, &dev, &exit))
            .map_err(io_err("spawning the message thread"))?
    };
    let vdpa_err = |cause| VduseError::Vdpa {
        name: name.clone(),
        cause,
    };
    let mut result = Ok(());
    if bind != Bind::None {
        match manager.exists() {
            Ok(true) => info!("vdpa device {name} exists; kept"),
            Ok(false) => match manager.add() {
                Ok(driver) => info!("vdpa device {name} added, bound to {driver}"),
                Err(e) => result = Err(vdpa_err(e)),
            },
            Err(e) => result = Err(vdpa_err(e)),
        }
    } else {
        info!("no vdpa device added (--vduse-bind none): `vdpa dev add name {name} mgmtdev vduse` binds it");
    }
    if result.is_ok() {
        while !wait_stop(Duration::from_millis(250)) {
            if messages.is_finished() {
                break;
            }
        }
    }
    // The kernel cannot destroy a VDUSE device a vdpa device still uses, and the driver's
    // removal resets the device: the message thread keeps answering meanwhile.
    match manager.exists() {
        Ok(true) => match manager.del() {
            Ok(()) => info!("vdpa device {name} deleted"),
            Err(e) => first_error(&mut result, vdpa_err(e)),
        },
        Ok(false) => {}
        Err(e) => warn!("vdpa manager: {e}"),
    }
    let _ = exit.write(1);
    let served = messages
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the message thread panicked")));
    session.lock().unwrap_or_else(|p| p.into_inner()).stop();
    for pair in 0..pairs {
        backend.set_interrupts(pair, [None, None]);
    }
    drop(session);
    drop(dev);
    if let Err(e) = served {
        first_error(&mut result, VduseError::Serve(name.clone(), e.to_string()));
    }
    match device.destroy(Duration::from_secs(5)) {
        Ok(()) => {
            let _ = std::fs::remove_file(record_path(&name));
            info!("VDUSE device /dev/vduse/{name} destroyed");
        }
        Err(e) => first_error(&mut result, io_err("destroying")(e)),
    }
    drop(manager);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offer_adds_access_platform_and_mac() {
        let o = offer(crate::features::default_features());
        assert_ne!(o & 1u64 << 33, 0);
        assert_ne!(o & 1u64 << 5, 0);
    }

    #[test]
    fn offer_drops_what_needs_a_control_queue_or_a_vmm() {
        let card = crate::features::default_features();
        // The card's default offer has both; the device's has neither.
        assert_ne!(card & NOT_OVER_VDUSE, 0);
        let o = offer(card);
        assert_eq!(o & 1u64 << 21, 0, "GUEST_ANNOUNCE without CTRL_VQ: {o:#x}");
        assert_eq!(o & 1u64 << 26, 0, "VHOST_F_LOG_ALL: {o:#x}");
        // Everything else of the card's offer stays.
        assert_eq!(o & card, card & !NOT_OVER_VDUSE);
    }

    #[test]
    fn bounce_buffer_fits_the_rx_ring() {
        let f = crate::features::default_features();
        assert_eq!(bounce_mib(f, 1024), 64);
        let no_mrg = f & !(1u64 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF);
        assert_eq!(bounce_mib(no_mrg, 1024), 136);
        assert_eq!(bounce_mib(no_mrg, 256), 82);
        assert_eq!(bounce_mib(no_mrg, 32768), 1024);
    }

    #[test]
    fn spec_holds_the_config_space() {
        let v = VduseConfig {
            name: "card".into(),
            bind: Bind::Virtio,
            host_mac: Some([2, 0, 0, 0, 0, 9]),
            bounce_mib: None,
        };
        let s = spec(&v, crate::features::default_features(), 1500, 1, 256);
        assert_eq!(s.queues, 2);
        assert_eq!(&s.config[..6], &[2, 0, 0, 0, 0, 9]);
        assert_eq!(u16::from_le_bytes([s.config[10], s.config[11]]), 1500);
        assert_eq!(record_of(&s), record_of(&s.clone()));
    }
}
