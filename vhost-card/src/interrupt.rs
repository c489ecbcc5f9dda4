//! How a queue tells the driver that it has used buffers.
//!
//! vhost-user hands each ring a call eventfd (the VMM's irqfd), which the data path writes itself;
//! that stays the default and costs nothing here. A transport without such a descriptor (VDUSE
//! raises interrupts with an ioctl on its device) gives each queue an [`Interrupt`] instead. The
//! data path decides *whether* to notify (EVENT_IDX, suppression flags); the transport decides *how*.

use std::io;

/// Raises one queue's interrupt in the driver.
pub trait Interrupt: Send + Sync {
    fn raise(&self) -> io::Result<()>;
}
