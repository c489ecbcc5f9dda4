//! Checks that each received descriptor is what the blob says it is, before any is used: a
//! socket of the right family, type and listening state, an eventfd, a mappable file long enough
//! for its region, a queue of the card's own tap.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::state::{FdKind, SessionState, StateError};

/// Checks every descriptor against the blob (which [`SessionState::parse`] already checked).
pub fn check_all(state: &SessionState, fds: &[OwnedFd]) -> Result<(), StateError> {
    if fds.len() != state.fds.len() {
        return Err(StateError::Invalid(format!(
            "{} descriptors received, the state names {}",
            fds.len(),
            state.fds.len()
        )));
    }
    for (i, (fd, &kind)) in fds.iter().zip(&state.fds).enumerate() {
        check(fd.as_raw_fd(), kind)
            .map_err(|why| StateError::Invalid(format!("descriptor {i} ({kind:?}): {why}")))?;
    }
    for &i in &state.taps {
        let (name, flags) = crate::tap::queue_identity(fds[i].as_raw_fd())
            .map_err(|e| StateError::Invalid(format!("descriptor {i}: TUNGETIFF: {e}")))?;
        if name != state.device.tap {
            return Err(StateError::Invalid(format!(
                "descriptor {i} is a queue of tap {name}, not {}",
                state.device.tap
            )));
        }
        let want = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        if flags & want != want {
            return Err(StateError::Invalid(format!(
                "descriptor {i}: tap flags {flags:#x} lack TAP, NO_PI or VNET_HDR"
            )));
        }
    }
    if let Some(s) = &state.session {
        for r in &s.regions {
            let size = u64::try_from(stat(fds[r.fd].as_raw_fd())?.st_size).unwrap_or(0);
            if r.mmap_offset + r.memory_size > size {
                return Err(StateError::Invalid(format!(
                    "descriptor {}: a region of {:#x} bytes at offset {:#x} extends past the end of its {size:#x}-byte file",
                    r.fd, r.memory_size, r.mmap_offset
                )));
            }
        }
    }
    Ok(())
}

fn stat(fd: RawFd) -> Result<libc::stat, StateError> {
    // SAFETY: fstat on a descriptor the caller owns, into a zeroed buffer we own.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(StateError::Invalid(format!(
                "fstat: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(st)
    }
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> Result<libc::c_int, String> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(format!("getsockopt: {}", std::io::Error::last_os_error()));
    }
    Ok(v)
}

/// Checks one descriptor.
pub fn check(fd: RawFd, kind: FdKind) -> Result<(), String> {
    let st = stat(fd).map_err(|e| e.to_string())?;
    let ty = st.st_mode & libc::S_IFMT;
    match kind {
        FdKind::UnixListener | FdKind::UnixStream | FdKind::TcpListener => {
            if ty != libc::S_IFSOCK {
                return Err("not a socket".into());
            }
            let domain = sockopt(fd, libc::SO_DOMAIN)?;
            let family_ok = match kind {
                FdKind::TcpListener => domain == libc::AF_INET || domain == libc::AF_INET6,
                _ => domain == libc::AF_UNIX,
            };
            if !family_ok {
                return Err(format!("socket of family {domain}"));
            }
            if sockopt(fd, libc::SO_TYPE)? != libc::SOCK_STREAM {
                return Err("not a stream socket".into());
            }
            let listening = sockopt(fd, libc::SO_ACCEPTCONN)? != 0;
            if listening != (kind != FdKind::UnixStream) {
                return Err(if listening {
                    "a listening socket".into()
                } else {
                    "not a listening socket".into()
                });
            }
        }
        FdKind::EventFd => {
            // An eventfd is an anonymous inode; /proc names it.
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map_err(|e| format!("cannot name it: {e}"))?;
            if link.as_os_str() != "anon_inode:[eventfd]" {
                return Err(format!("{} is not an eventfd", link.display()));
            }
        }
        FdKind::GuestMemory => {
            if ty != libc::S_IFREG {
                return Err("not a regular file (memfd, hugetlbfs or shared memory)".into());
            }
        }
        FdKind::TapQueue => {
            // /dev/net/tun is the misc character device 10:200.
            if ty != libc::S_IFCHR || st.st_rdev != libc::makedev(10, 200) {
                return Err("not /dev/net/tun".into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn each_kind_is_told_apart() {
        let dir = std::env::temp_dir().join(format!("vc-fdcheck-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let listener = UnixListener::bind(dir.join("s")).unwrap();
        let (stream, _) = UnixStream::pair().unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let event = EventFd::new(0).unwrap();
        let file = std::fs::File::create(dir.join("f")).unwrap();
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let fds: [(RawFd, Option<FdKind>); 6] = [
            (listener.as_raw_fd(), Some(FdKind::UnixListener)),
            (stream.as_raw_fd(), Some(FdKind::UnixStream)),
            (tcp.as_raw_fd(), Some(FdKind::TcpListener)),
            (event.as_raw_fd(), Some(FdKind::EventFd)),
            (file.as_raw_fd(), Some(FdKind::GuestMemory)),
            // A character device, but not the tun one.
            (devnull.as_raw_fd(), None),
        ];
        let kinds = [
            FdKind::UnixListener,
            FdKind::UnixStream,
            FdKind::TcpListener,
            FdKind::EventFd,
            FdKind::GuestMemory,
            FdKind::TapQueue,
        ];
        for (fd, is) in fds {
            for kind in kinds {
                let r = check(fd, kind);
                assert_eq!(
                    r.is_ok(),
                    is == Some(kind),
                    "fd of kind {is:?} as {kind:?}: {r:?}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
