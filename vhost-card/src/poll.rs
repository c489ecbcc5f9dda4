//! Blocking until a descriptor has something for us or a stop eventfd is written: the accept
//! loop (the vhost-user socket) and the VDUSE message loop (the device file) both wait this way.
//! And the other way: signalling an eventfd the frontend gave us, without ever blocking on it.

use std::io;
use std::os::fd::RawFd;

/// What ended the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// The stop eventfd is readable (checked first: a stop wins over pending input).
    Stop,
    /// The descriptor has events: its `revents` (POLLIN, or POLLERR/POLLHUP).
    Ready(i16),
}

/// Waits without a timeout until `fd` is readable (or in error) or `stop` is readable;
/// retries when a signal interrupts the wait.
pub fn readable_or_stop(fd: RawFd, stop: RawFd) -> io::Result<Woke> {
    loop {
        let mut fds = [fd, stop].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(Woke::Stop);
        }
        if fds[0].revents != 0 {
            return Ok(Woke::Ready(fds[0].revents));
        }
    }
}

/// Whether `fd` takes a write without blocking right now (and has a reader).
fn writable_now(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd that outlives the call; a zero timeout never sleeps.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1
        && pfd.revents & libc::POLLOUT != 0
        && pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) == 0
}

/// Adds 1 to the eventfd `fd` (a call, kick or log notifier the frontend gave us) if that takes
/// the write now. The frontend's descriptor may be in blocking mode: a write to an eventfd at its
/// limit, or to a pipe in its place, would hang the caller, so it is skipped; false then.
pub fn signal_eventfd(fd: RawFd) -> bool {
    if !writable_now(fd) {
        return false;
    }
    let one = 1u64.to_ne_bytes();
    // SAFETY: an 8-byte write from a buffer we own; `fd` is a descriptor the caller holds.
    let n = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    n == 8
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn stop_wins_and_input_is_reported() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        b.write_all(b"x").unwrap();
        assert!(matches!(
            readable_or_stop(a.as_raw_fd(), stop.as_raw_fd()).unwrap(),
            Woke::Ready(r) if r & libc::POLLIN != 0
        ));
        stop.write(1).unwrap();
        assert_eq!(
            readable_or_stop(a.as_raw_fd(), stop.as_raw_fd()).unwrap(),
            Woke::Stop
        );
    }

    #[test]
    fn an_eventfd_at_its_limit_is_not_written() {
        let efd = EventFd::new(0).unwrap();
        assert!(signal_eventfd(efd.as_raw_fd()));
        assert_eq!(efd.read().unwrap(), 1);
        // A blocking eventfd one below its limit: a write would sleep, so none is made.
        efd.write(u64::MAX - 1).unwrap();
        assert!(!signal_eventfd(efd.as_raw_fd()));
        assert_eq!(efd.read().unwrap(), u64::MAX - 1);
    }
}
