//! Shared harness for the integration tests.
//!
//! The tests drive the real `vhost-card` binary the way QEMU would: a vhost-user frontend over a
//! Unix socket, guest memory in a memfd, split virtqueues written from the driver's side, and
//! the card's end of the link (a tap) in a network namespace created for each test.
//!
//! * [`netns`] (the rig's): RAII network namespaces, commands and sockets inside them;
//! * [`daemon`]: starting and stopping the daemon (built and launched by the rig), reading its
//!   log and counters;
//! * [`vring`]: guest memory (memfd) and the driver side of a split virtqueue;
//! * [`frontend`]: the vhost-user control plane (the `vhost` crate's frontend plus raw messages);
//! * [`netdev`]: a minimal virtio-net driver on top: vnet headers, TX chains, RX buffers;
//! * [`packet`]: frames, checksums and vnet headers;
//! * [`sdnotify`]: systemd's notify socket and fd store, for tests that play systemd;
//! * [`card`]: one test's whole set-up (namespaces, addresses, daemon) in one value.

pub mod card;
pub mod daemon;
pub mod fds;
pub mod frontend;
pub mod netdev;
pub mod packet;
pub mod sdnotify;
pub mod vring;

// The shared rig (rig/): namespaces, processes, the daemon's launch; one copy for the tests
// and xtask.
pub use rig::netns;
pub use rig::process::{require_root, unique, TempDir};
