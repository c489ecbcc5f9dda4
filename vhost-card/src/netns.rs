//! Running a piece of set-up inside a named network namespace.
//!
//! `setns(2)` changes the namespace of the calling thread only, so the work runs on a short-lived
//! thread; file descriptors it opens (a tap queue, a control socket) stay bound to the namespace
//! they were created in after the thread is gone.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("network namespace '{0}' does not exist (create it first: ip netns add {0})")]
    Missing(String),
    #[error(
        "permission denied entering network namespace '{0}' (needs CAP_SYS_ADMIN, run as root)"
    )]
    Permission(String),
    #[error("cannot enter network namespace '{name}': {cause}")]
    Enter { name: String, cause: io::Error },
}

/// The file that names namespace `name`: `/run/netns/NAME` as made by `ip netns add`, or a path
/// such as `/proc/PID/ns/net` when the name contains a slash.
pub fn path_of(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        PathBuf::from("/run/netns").join(name)
    }
}

/// Runs `f` in namespace `netns` (or in the caller's namespace for `None`).
pub fn run_in<T: Send, E: Send + From<NetnsError>>(
    netns: Option<&str>,
    f: impl FnOnce() -> Result<T, E> + Send,
) -> Result<T, E> {
    let Some(name) = netns else {
        return f();
    };
    let file = File::open(path_of(name)).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => NetnsError::Missing(name.to_string()),
        io::ErrorKind::PermissionDenied => NetnsError::Permission(name.to_string()),
        _ => NetnsError::Enter {
            name: name.to_string(),
            cause: e,
        },
    })?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns() on a namespace file we own; it only changes this thread's
            // namespace, and the thread ends when `f` returns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                return Err(match e.raw_os_error() {
                    Some(libc::EPERM) => NetnsError::Permission(name.to_string()),
                    _ => NetnsError::Enter {
                        name: name.to_string(),
                        cause: e,
                    },
                }
                .into());
            }
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
