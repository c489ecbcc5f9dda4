//! One queue pair's worker thread in VDUSE mode: an epoll loop over the pair's kick eventfds, the
//! backend's tap and re-arm descriptors and an exit eventfd, driving `CardBackend::handle_event`
//! exactly as vhost-user-backend's workers do.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::{error, warn};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::iotlb::Iotlb;
use crate::backend::CardBackend;

/// Epoll id of a worker's exit event (the others are the backend's event ids).
const EXIT_ID: u64 = u64::MAX;

/// What one pair's worker thread owns.
pub struct WorkerCtx {
    pub pair: usize,
    pub backend: Arc<CardBackend>,
    pub vrings: Arc<Vec<VringRwLock>>,
    pub iotlb: Arc<Iotlb>,
    pub dev: Arc<File>,
    /// The RX and TX kick eventfds the kernel signals.
    pub kicks: [EventFd; 2],
    pub exit: EventFd,
}

impl WorkerCtx {
    pub fn run(self) {
        if let Err(e) = self.serve() {
            error!("VDUSE worker of pair {}: {e}", self.pair);
        }
    }

    /// Until the driver's first DMA mapping the streaming range is not in the IOTLB; buffers
    /// posted (a kick, or a worker starting after the driver did) mean it may be there now.
    fn refresh_iotlb(&self) {
        if !self.iotlb.complete() {
            if let Err(e) = self.iotlb.sync(&*self.dev) {
                warn!("IOTLB: {e}");
            }
        }
    }

    fn serve(&self) -> io::Result<()> {
        let epoll = Epoll::new()?;
        let add = |fd: i32, ev: EventSet, id: u64| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, id))
        };
        add(self.kicks[0].as_raw_fd(), EventSet::IN, 0)?;
        add(self.kicks[1].as_raw_fd(), EventSet::IN, 1)?;
        for (fd, ev, id) in self.backend.extra_listeners(self.pair) {
            add(fd, ev, id)?;
        }
        add(self.exit.as_raw_fd(), EventSet::IN, EXIT_ID)?;
        let rings = &self.vrings[2 * self.pair..2 * self.pair + 2];
        // One pass first: the driver may have posted buffers and the card sent frames before the
        // worker existed.
        self.refresh_iotlb();
        self.backend
            .handle_event(self.backend.wake_event(), EventSet::IN, rings, self.pair)?;
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                let id = ev.data();
                if id == EXIT_ID {
                    return Ok(());
                }
                if id < 2 {
                    let _ = self.kicks[id as usize].read();
                    self.refresh_iotlb();
                }
                let evset = EventSet::from_bits_truncate(ev.events);
                let Ok(id) = u16::try_from(id) else { continue };
                self.backend.handle_event(id, evset, rings, self.pair)?;
            }
        }
    }
}
