//! One VDUSE device being served: the answers to the kernel's messages (status, queue state,
//! IOTLB changes), the rings set up from `VDUSE_VQ_GET_INFO` when the driver is ready, and one
//! epoll worker thread per queue pair (`worker.rs`) that drives the same
//! `CardBackend::handle_event` as the vhost-user workers.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, error, info, warn};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::iotlb::Iotlb;
use super::msg::{self, status, Request, RESULT_FAILED, RESULT_OK};
use super::uapi::{self, MSG_SIZE};
use super::worker::WorkerCtx;
use crate::backend::CardBackend;
use crate::interrupt::Interrupt;

/// Raises one virtqueue's interrupt with `VDUSE_VQ_INJECT_IRQ`.
struct VduseIrq {
    dev: Arc<File>,
    index: u32,
}

impl Interrupt for VduseIrq {
    fn raise(&self) -> io::Result<()> {
        uapi::vq_inject_irq(&*self.dev, self.index)
    }
}

struct Worker {
    exit: EventFd,
    thread: JoinHandle<()>,
}

/// The rings and workers while the driver is running (DRIVER_OK).
struct Running {
    vrings: Arc<Vec<VringRwLock>>,
    workers: Vec<Worker>,
}

/// Why a request was refused, for the log.
type Refusal = String;

pub struct Session {
    dev: Arc<File>,
    backend: Arc<CardBackend>,
    iotlb: Arc<Iotlb>,
    pairs: usize,
    queue_size: u16,
    offer: u64,
    status: u8,
    running: Option<Running>,
    pending: Option<Pending>,
    release_due: bool,
}

/// Checks a queue as `VDUSE_VQ_GET_INFO` reported it: a split ring of a power-of-two size no
/// larger than what was set up.
pub fn check_queue(num: u32, max: u16) -> Result<u16, &'static str> {
    let n = u16::try_from(num).map_err(|_| "queue size above 65535")?;
    if n == 0 || !n.is_power_of_two() {
        return Err("queue size not a power of two");
    }
    if n > max {
        return Err("queue size above the device's maximum");
    }
    Ok(n)
}

/// Checks the feature word the driver wrote against the offer.
pub fn check_features(driver: u64, offer: u64) -> Result<(), String> {
    if driver & !offer != 0 {
        return Err(format!(
            "the driver acked features {:#x} that were not offered",
            driver & !offer
        ));
    }
    for (bit, name) in [
        (VIRTIO_F_VERSION_1, "VERSION_1"),
        (VIRTIO_F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
    ] {
        if driver & (1u64 << bit) == 0 {
            return Err(format!("the driver did not ack {name}"));
        }
    }
    Ok(())
}

impl Session {
    pub fn new(
        dev: Arc<File>,
        backend: Arc<CardBackend>,
        pairs: usize,
        queue_size: u16,
        offer: u64,
    ) -> Session {
        for pair in 0..pairs {
            let irq = |q: usize| -> Option<Arc<dyn Interrupt>> {
                Some(Arc::new(VduseIrq {
                    dev: dev.clone(),
                    index: q as u32,
                }))
            };
            backend.set_interrupts(pair, [irq(2 * pair), irq(2 * pair + 1)]);
        }
        Session {
            dev,
            backend,
            iotlb: Arc::new(Iotlb::new()),
            pairs,
            queue_size,
            offer,
            status: 0,
            running: None,
            pending: None,
            release_due: false,
        }
    }

    /// Answers one request; returns the response bytes.
    pub fn handle(&mut self, req: Request) -> [u8; MSG_SIZE] {
        let id = req.id();
        match req {
            Request::SetStatus { status: s, .. } => {
                let result = self.set_status(s);
                if let Err(why) = &result {
                    warn!("status {} refused: {why}", status::describe(s));
                }
                msg::response(
                    id,
                    if result.is_ok() {
                        RESULT_OK
                    } else {
                        RESULT_FAILED
                    },
                    None,
                )
            }
            Request::GetVqState { index, .. } => match self.vq_state(index) {
                Some(avail) => msg::response(id, RESULT_OK, Some((index, avail))),
                None => {
                    warn!("GET_VQ_STATE for queue {index}, which does not exist");
                    msg::response(id, RESULT_FAILED, None)
                }
            },
            Request::UpdateIotlb { start, last, .. } => {
                debug!("IOTLB update [{start:#x}, {last:#x}]");
                match self.iotlb.update(&*self.dev) {
                    Ok(_) => msg::response(id, RESULT_OK, None),
                    Err(e) => {
                        warn!("IOTLB update refused: {e}");
                        msg::response(id, RESULT_FAILED, None)
                    }
                }
            }
            Request::Unknown { kind, .. } => {
                warn!("unknown VDUSE request type {kind}: refused");
                msg::response(id, RESULT_FAILED, None)
            }
        }
    }

    fn vq_state(&self, index: u32) -> Option<u16> {
        if index as usize >= 2 * self.pairs {
            return None;
        }
        if let Some(r) = &self.running {
            return Some(r.vrings[index as usize].queue_next_avail());
        }
        uapi::vq_get_info(&*self.dev, index)
            .ok()
            .map(|i| i.avail_index)
    }

    fn set_status(&mut self, s: u8) -> Result<(), Refusal> {
        let was = self.status;
        info!("driver status {}", status::describe(s));
        if s == 0 || s & status::FAILED != 0 {
            self.halt();
            self.status = s;
            return Ok(());
        }
        if s & status::FEATURES_OK != 0 && was & status::FEATURES_OK == 0 {
            let f = uapi::dev_get_features(&*self.dev).map_err(|e| e.to_string())?;
            check_features(f, self.offer)?;
        }
        if s & status::DRIVER_OK != 0 && self.running.is_none() {
            self.pending = Some(self.prepare(false)?);
        } else if s & status::DRIVER_OK == 0 && self.running.is_some() {
            self.halt();
        }
        self.status = s;
        Ok(())
    }

    /// What waits for the answer to the kernel's request to be written: the kernel may hold
    /// the RTNL lock while it waits (virtio_net sets DRIVER_OK under it), and the tap's ioctls
    /// take that lock. So the rings are checked and set up before the answer, and the tap is
    /// configured and the workers started after it; after a reset the tap is put back after it.
    pub fn after_reply(&mut self) {
        if let Some(p) = self.pending.take() {
            self.activate(p);
        }
        if self.release_due {
            self.release_due = false;
            self.backend.reset_connection();
            self.backend.stats().set_connected(false);
            self.iotlb.clear();
        }
    }

    /// Sets the driver's rings up now (a driver that was already running under an earlier
    /// daemon: each ring continues from its used index).
    pub fn resume(&mut self) -> Result<(), Refusal> {
        let p = self.prepare(true)?;
        self.activate(p);
        Ok(())
    }

    /// Checks and sets up the rings from what the kernel reports (no tap ioctl here). `resume`:
    /// each ring continues from its used index (every chain before it was completed; those
    /// after it are served again).
    fn prepare(&mut self, resume: bool) -> Result<Pending, Refusal> {
        self.halt();
        let features = uapi::dev_get_features(&*self.dev).map_err(|e| e.to_string())?;
        check_features(features, self.offer)?;
        let summary = self.iotlb.sync(&*self.dev).map_err(|e| e.to_string())?;
        debug!("IOTLB at DRIVER_OK: {summary:?}");
        let mem = self.iotlb.memory();
        let event_idx = features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut vrings = Vec::with_capacity(2 * self.pairs);
        let mut kicks = Vec::with_capacity(2 * self.pairs);
        let mut ready = Vec::with_capacity(2 * self.pairs);
        for q in 0..2 * self.pairs as u32 {
            let info = uapi::vq_get_info(&*self.dev, q).map_err(|e| e.to_string())?;
            let vring = VringRwLock::new(mem.clone(), self.queue_size)
                .map_err(|e| format!("queue {q}: {e}"))?;
            let kick = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
            let on = info.ready != 0;
            if on {
                let size = check_queue(info.num, self.queue_size)
                    .map_err(|why| format!("queue {q}: {why}"))?;
                vring.set_queue_size(size);
                vring
                    .set_queue_info(info.desc_addr, info.driver_addr, info.device_addr)
                    .map_err(|e| format!("queue {q}: ring addresses refused: {e}"))?;
                vring.set_queue_event_idx(event_idx);
                let next = if resume {
                    vring
                        .queue_used_idx()
                        .map_err(|e| format!("queue {q}: used index unreadable: {e}"))?
                } else {
                    info.avail_index
                };
                vring.set_queue_next_avail(next);
                vring.set_queue_next_used(next);
                vring.set_queue_ready(true);
                vring.set_enabled(true);
                if !vring.get_ref().get_queue().is_valid(&*mem.memory()) {
                    return Err(format!(
                        "queue {q}: rings at {:#x}/{:#x}/{:#x} (size {size}) lie outside the IOVA space",
                        info.desc_addr, info.driver_addr, info.device_addr
                    ));
                }
                uapi::vq_setup_kickfd(&*self.dev, q, kick.as_raw_fd())
                    .map_err(|e| format!("queue {q}: kick eventfd: {e}"))?;
                debug!(
                    "queue {q}: size {size}, desc {:#x} driver {:#x} device {:#x}, next {next}",
                    info.desc_addr, info.driver_addr, info.device_addr
                );
            }
            ready.push(on);
            vrings.push(vring);
            kicks.push(kick);
        }
        Ok(Pending {
            features,
            vrings,
            kicks,
            ready,
            resume,
        })
    }

    /// Configures the tap for the negotiated features and starts one worker per pair.
    fn activate(&mut self, p: Pending) {
        self.backend.acked_features(p.features);
        if let Err(e) = self.backend.update_memory(self.iotlb.memory()) {
            warn!("guest memory: {e}");
        }
        let vrings = Arc::new(p.vrings);
        let mut workers = Vec::with_capacity(self.pairs);
        let mut kicks = p.kicks.into_iter();
        for pair in 0..self.pairs {
            let (Some(rx), Some(tx)) = (kicks.next(), kicks.next()) else {
                break;
            };
            let spawned = EventFd::new(EFD_NONBLOCK).and_then(|exit| {
                let ctx = WorkerCtx {
                    pair,
                    backend: self.backend.clone(),
                    vrings: vrings.clone(),
                    iotlb: self.iotlb.clone(),
                    dev: self.dev.clone(),
                    kicks: [rx, tx],
                    exit: exit.try_clone()?,
                };
                let thread = std::thread::Builder::new()
                    .name(format!("vduse-pair{pair}"))
                    .spawn(move || ctx.run())?;
                Ok(Worker { exit, thread })
            });
            match spawned {
                Ok(w) => workers.push(w),
                Err(e) => error!("cannot start the worker of pair {pair}: {e}"),
            }
            self.backend.pair_enabled(pair, p.ready[2 * pair]);
        }
        info!(
            "driver running: {} of {} queues ready, {} KiB of IOVA space mapped{}",
            p.ready.iter().filter(|r| **r).count(),
            p.ready.len(),
            self.iotlb.mapped_bytes() / 1024,
            if p.resume {
                " (resumed from the used rings)"
            } else {
                ""
            }
        );
        self.running = Some(Running { vrings, workers });
        // The driver's session, as `vhost-card stats` and the metrics show it.
        self.backend.stats().set_connected(true);
    }

    /// Stops the workers and detaches the kick eventfds (no tap ioctl here); the tap is put
    /// back by [`Session::after_reply`].
    fn halt(&mut self) {
        self.pending = None;
        let Some(running) = self.running.take() else {
            return;
        };
        for w in &running.workers {
            let _ = w.exit.write(1);
        }
        for w in running.workers {
            if w.thread.join().is_err() {
                error!("a VDUSE worker thread panicked");
            }
        }
        for q in 0..running.vrings.len() as u32 {
            let _ = uapi::vq_setup_kickfd(&*self.dev, q, uapi::EVENTFD_DEASSIGN);
        }
        self.release_due = true;
        info!("driver stopped: rings released");
    }

    /// Stops everything now (the daemon is stopping).
    pub fn stop(&mut self) {
        self.halt();
        self.after_reply();
    }
}

/// Rings checked and set up, waiting for the answer to be written before they start.
struct Pending {
    features: u64,
    vrings: Vec<VringRwLock>,
    kicks: Vec<EventFd>,
    ready: Vec<bool>,
    resume: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_sizes() {
        assert_eq!(check_queue(256, 1024), Ok(256));
        assert!(check_queue(0, 1024).is_err());
        assert!(check_queue(100, 1024).is_err());
        assert!(check_queue(2048, 1024).is_err());
        assert!(check_queue(1 << 20, 1024).is_err());
    }

    #[test]
    fn features_are_a_subset_of_the_offer() {
        let offer = 1u64 << VIRTIO_F_VERSION_1 | 1u64 << VIRTIO_F_ACCESS_PLATFORM | 1 << 5;
        assert!(check_features(offer, offer).is_ok());
        assert!(check_features(offer & !(1 << 5), offer).is_ok());
        assert!(check_features(offer | 1 << 17, offer).is_err());
        assert!(check_features(1 << 5 | 1u64 << VIRTIO_F_VERSION_1, offer).is_err());
    }
}
