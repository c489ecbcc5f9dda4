//! The conversation of a handover between the running daemon (old) and the process that takes
//! its session over (new), on the control connection `vhost-card upgrade` opened and passed on
//! to the new process (`docs/handover.md`):
//!
//! 1. `upgrade` reads the snapshot line (its `handover` field, [`Offer`]), sends the request line
//!    [`REQUEST`], starts the new binary with the connection as descriptor
//!    [`CONNECTION_ENV`] and a status pipe as [`STATUS_ENV`];
//! 2. new → old: [`Step::Hello`]; old pauses the session and sends the state and its descriptors
//!    (`wire`, `state`);
//! 3. new → old: [`Step::Valid`] or [`Step::Refused`]; on anything but `Valid` the old process
//!    restarts its session where it stopped and keeps serving;
//! 4. old → new: [`Step::Go`] (from then on the old process never touches the rings again);
//! 5. new → old: [`Step::Serving`]; the old process exits.
//!
//! Each step is one `wire` message without descriptors, its payload one JSON object.

use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};

use super::wire;

/// The line `upgrade` sends after the snapshot.
pub const REQUEST: &str = r#"{"request":"handover"}"#;
/// Environment variable naming the new process's descriptor of the control connection.
pub const CONNECTION_ENV: &str = "VHOST_CARD_HANDOVER_FD";
/// Environment variable naming the new process's status pipe to `upgrade`.
pub const STATUS_ENV: &str = "VHOST_CARD_HANDOVER_STATUS_FD";

/// What a daemon that can hand over adds to its snapshot line (field `handover`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Offer {
    /// The state version it writes (`state::VERSION`).
    pub state_version: u32,
    /// The binary it was started from, and its command line (without the program name).
    pub exe: String,
    pub args: Vec<String>,
    /// Why this daemon cannot hand over at all, if it cannot (a transport or link it does not
    /// carry over yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// One step of the conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// new → old: ready to receive.
    Hello { pid: u32 },
    /// new → old: the state and descriptors passed every check.
    Valid,
    /// new → old: refused, and why.
    Refused { why: String },
    /// old → new: take over; the session was paused at this CLOCK_MONOTONIC time (µs).
    Go { paused_at_us: u64 },
    /// new → old (and to `upgrade` on the status pipe): serving; the outage measured from the
    /// pause to the new gate's start.
    Serving { pid: u32, outage_us: u64 },
}

/// Sends one step.
pub fn send(conn: &UnixStream, step: &Step) -> Result<(), String> {
    let body = serde_json::to_vec(step).map_err(|e| e.to_string())?;
    wire::send(conn, &body, &[]).map_err(|e| e.to_string())
}

/// Receives one step; a message with descriptors, or that is not a step, is refused (its
/// descriptors closed).
pub fn recv(conn: &UnixStream) -> Result<Step, String> {
    let (body, fds) = wire::recv(conn).map_err(|e| e.to_string())?;
    if !fds.is_empty() {
        return Err(format!(
            "a handover step came with {} descriptors",
            fds.len()
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("not a handover step: {e}"))
}

/// CLOCK_MONOTONIC in microseconds: one clock for both processes.
pub fn now_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_and_strangers_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        for step in [
            Step::Hello { pid: 7 },
            Step::Valid,
            Step::Refused { why: "x".into() },
            Step::Go { paused_at_us: 9 },
            Step::Serving {
                pid: 7,
                outage_us: 3,
            },
        ] {
            send(&a, &step).unwrap();
            assert_eq!(recv(&b).unwrap(), step);
        }
        wire::send(&a, br#"{"go":{"paused_at_us":1,"extra":2}}"#, &[]).unwrap();
        assert!(recv(&b).unwrap_err().contains("not a handover step"));
        let (p, _q) = UnixStream::pair().unwrap();
        use std::os::fd::AsFd;
        wire::send(&a, br#""valid""#, &[p.as_fd()]).unwrap();
        assert!(recv(&b).unwrap_err().contains("descriptors"));
    }
}
