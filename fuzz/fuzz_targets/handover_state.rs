//! The handover state a new vhost-card process receives from the old one (`docs/handover.md`):
//! arbitrary bytes through the blob's parser and checks, and, for a blob that passes, the
//! vhost-user requests that would rebuild its session.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_card::handover::{replay, state::SessionState};

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = SessionState::parse(data) {
        let _ = state.check_device(&state.device);
        if let Some(p) = &state.session {
            let _ = replay::rebuild(p);
            let _ = replay::stop(p);
            let _ = replay::restart(p);
        }
    }
});
