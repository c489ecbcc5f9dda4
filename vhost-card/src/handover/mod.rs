//! Live handover of a running session to a new vhost-card process (`docs/handover.md`):
//! [`state`] (the versioned blob and its checks), [`record`] (the gate's record of a session),
//! [`pause`] (pausing a running gate at the stop point, restarting or detaching it), [`replay`]
//! (the requests that stop, restart and rebuild a session in the `vhost` crate's handler),
//! [`wire`] (the blob and descriptors over the control socket) and [`fdcheck`] (what each
//! received descriptor is); [`steps`] (the conversation between the two processes), [`give`]
//! (the old process's side) and [`take`] (the new one's). [`fdstore`]: the same session kept in
//! systemd's file descriptor store, and taken back after a crash.

pub mod fdcheck;
pub mod fdstore;
pub mod give;
pub mod pause;
pub mod record;
pub mod replay;
pub mod state;
pub mod steps;
pub mod take;
pub mod wire;
