//! The handover state a new vhost-card process receives from the old one (`docs/handover.md`),
//! and the state a restarted one finds in systemd's fd store (`handover::fdstore`): arbitrary
//! bytes through each parser and its checks, and, for a blob that passes, the vhost-user
//! requests that would rebuild its session.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_card::handover::{fdstore, replay, state::SessionState};

fuzz_target!(|data: &[u8]| {
    let stored = fdstore::parse_stored(data).ok().map(|(s, _)| s);
    for state in SessionState::parse(data).ok().into_iter().chain(stored) {
        let _ = state.check_device(&state.device);
        if let Some(p) = &state.session {
            let _ = replay::rebuild(p);
            let _ = replay::stop(p);
            let _ = replay::restart(p);
        }
    }
});
