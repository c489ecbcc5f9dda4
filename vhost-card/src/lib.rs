//! vhost-card: the "ultimate TOE card" PCI function as a virtio-net device, served over
//! vhost-user to a VMM or over VDUSE to the kernel the daemon runs on.
//!
//! Layout:
//! * pure logic: [`features`] (feature bits and the spec's dependency rules), [`vnet`] (the
//!   virtio-net header rules per direction), [`csum`] (checksum verification and completion),
//!   [`rxmark`] (how each frame went up), [`reasm`] (IP fragment reassembly), [`link`] (the
//!   IP-only link: ARP/ND answers and Ethernet headers), [`localq`] (frames the card makes for
//!   the host);
//! * guest memory and I/O: [`iov`] (descriptor chains to iovecs), [`memguard`] (guest memory
//!   files that shrink under the daemon), [`tap`] and [`netns`] (the
//!   card's end of the link), [`datapath`] (TX/RX per queue pair);
//! * vhost-user: [`backend`] (the `VhostUserBackend`), [`gate`] (answers QEMU's early requests
//!   in front of the `vhost` crate's handler), [`daemon`] (listen, serve, reconnect, stop),
//!   [`poll`] (waiting on a descriptor or the stop eventfd);
//! * VDUSE: [`vduse`] (the same backend as a device of this host's kernel) and [`interrupt`]
//!   (how a queue notifies the driver without a call eventfd);
//! * [`config`] (the command line), [`cardfile`] (the card's TOML file, `--config`), [`stats`]
//!   (counters), [`metrics`] and [`procstat`] (Prometheus exposition) and [`control`] (counters
//!   over a control socket as JSON and over HTTP for Prometheus).

pub mod announce;
pub mod backend;
pub mod cardfile;
pub mod config;
pub mod control;
pub mod csum;
pub mod daemon;
pub mod datapath;
pub mod dirtylog;
pub mod features;
pub mod gate;
pub mod generator;
pub mod handover;
pub mod interrupt;
pub mod iov;
pub mod link;
pub mod localq;
pub mod memguard;
pub mod metrics;
pub mod migrate;
pub mod netns;
pub mod poll;
pub mod procstat;
pub mod reasm;
pub mod rxmark;
pub mod sandbox;
pub mod stats;
pub mod tap;
pub mod upgrade;
pub mod used;
pub mod vduse;
pub mod vnet;
