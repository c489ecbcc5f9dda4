//! The test rig shared by `cargo xtask` and the integration tests (`tests/`): one copy of each
//! thing they both need.
//!
//! * [`paths`]: the workspace's directories and the one `cargo build`; [`interrupt`]: Ctrl-C
//!   as a flag the wait loops check;
//! * [`process`]: checked commands, children stopped on drop ([`process::Guarded`]), temporary
//!   directories, polling; [`netns`]: network namespaces deleted on drop, threads and sockets
//!   inside them; [`nsnet`]: bulk TCP/UDP and captures from inside a namespace;
//! * [`daemon`]: the vhost-card daemon's command line, the one place it is launched from;
//!   [`card`]: the card of a VM test (namespace, daemon, its log and counters);
//! * [`qemu`]: the VM (QEMU with a vhost-user NIC, serial console, agent); [`accel`]: KVM or
//!   TCG; [`qmp`]: QMP; [`agent`]: the guest agent's protocol; [`image`]: what the initramfs
//!   carries for it; [`assets`], [`apt`], [`cpio`], [`rootfs`]: kernel, initramfs, Debian
//!   packages and root filesystems; [`container`]: a Debian tree booted by systemd-nspawn with
//!   systemd as PID 1;
//! * [`machine`]: a card plus a VM with its agent ([`Rig`], [`Env`]), and what scenarios do
//!   with them; [`payload`], [`report`], [`features`]: test data, output parsing, feature bits;
//!   [`progress`]: the progress bar (or plain step lines) of the long tasks;
//!   [`units`]: systemd units through `systemd-analyze verify`; [`monitoring`]: host-config's
//!   alert rules and dashboard against a real scrape.

pub mod accel;
pub mod agent;
pub mod apt;
pub mod assets;
pub mod card;
pub mod container;
pub mod cpio;
pub mod daemon;
pub mod features;
pub mod image;
pub mod interrupt;
pub mod machine;
pub mod monitoring;
pub mod netns;
pub mod nsnet;
pub mod paths;
pub mod payload;
pub mod process;
pub mod progress;
pub mod qemu;
pub mod qmp;
pub mod report;
pub mod rootfs;
pub mod units;

pub use machine::{
    guest_send_cmd, transfer_timeout, Checked, Env, FeatureCheck, Image, Pings, Plug, Rig,
};
