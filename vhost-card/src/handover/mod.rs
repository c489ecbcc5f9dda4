//! Live handover of a running session to a new vhost-card process (`docs/handover.md`):
//! [`state`] (the versioned blob and its checks), [`record`] (the gate's record of a session),
//! [`wire`] (the blob and descriptors over the
//! control socket), [`fdcheck`] (what each received descriptor is) and [`replay`] (the requests
//! that stop, restart and rebuild the session in the `vhost` crate's handler).

pub mod fdcheck;
pub mod record;
pub mod replay;
pub mod state;
pub mod wire;
