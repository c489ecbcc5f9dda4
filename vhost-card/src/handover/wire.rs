//! One handover message on the control socket: a 16-byte header (magic `VCHO`, wire version,
//! payload length, descriptor count) carrying the descriptors as `SCM_RIGHTS`, then the payload
//! (JSON). The receiver refuses a message whose header, length or descriptor count is wrong and
//! closes every descriptor it got with it.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::state::{MAX_BLOB, MAX_FDS};

const MAGIC: [u8; 4] = *b"VCHO";
/// The framing's version; the blob inside has its own (`state::VERSION`).
const WIRE_VERSION: u32 = 1;
const HEADER: usize = 16;

#[derive(Debug, Error)]
pub enum WireError {
    #[error("handover channel: {0}")]
    Io(#[from] io::Error),
    #[error("handover channel closed by the peer")]
    Closed,
    #[error("not a handover message (bad magic)")]
    Magic,
    #[error("handover framing version {0}; this binary speaks version {WIRE_VERSION}")]
    Version(u32),
    #[error("handover message of {0} bytes is over the {MAX_BLOB}-byte limit")]
    TooBig(u32),
    #[error("handover message announces {announced} descriptors but carries {got}")]
    FdCount { announced: u32, got: usize },
    #[error("too many descriptors: {0} (at most {MAX_FDS})")]
    TooManyFds(usize),
}

/// Sends one message with `fds` attached.
pub fn send(sock: &UnixStream, payload: &[u8], fds: &[BorrowedFd]) -> Result<(), WireError> {
    if payload.len() > MAX_BLOB {
        return Err(WireError::TooBig(payload.len() as u32));
    }
    if fds.len() > MAX_FDS {
        return Err(WireError::TooManyFds(fds.len()));
    }
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(&MAGIC);
    header[4..8].copy_from_slice(&WIRE_VERSION.to_le_bytes());
    header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[12..].copy_from_slice(&(fds.len() as u32).to_le_bytes());
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let n = sock
        .send_with_fds(&[&header[..]], &raw)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    (&*sock).write_all(&header[n..])?;
    (&*sock).write_all(payload)?;
    Ok(())
}

/// Receives one message: its payload and descriptors, in the order they were sent.
pub fn recv(sock: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
    let mut header = [0u8; HEADER];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER,
    }];
    // SAFETY: the iovec points to `header`, writable and alive for the call.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<OwnedFd> = raw[..nfds]
        .iter()
        // SAFETY: recvmsg just installed these descriptors in this process; nothing else owns
        // them, and they are closed when dropped, on every error path below.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(WireError::Closed);
    }
    (&*sock)
        .read_exact(&mut header[n..])
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => WireError::Closed,
            _ => WireError::Io(e),
        })?;
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    if header[..4] != MAGIC {
        return Err(WireError::Magic);
    }
    if word(4) != WIRE_VERSION {
        return Err(WireError::Version(word(4)));
    }
    let len = word(8);
    if len as usize > MAX_BLOB {
        return Err(WireError::TooBig(len));
    }
    if word(12) as usize != fds.len() {
        return Err(WireError::FdCount {
            announced: word(12),
            got: fds.len(),
        });
    }
    let mut payload = vec![0u8; len as usize];
    (&*sock)
        .read_exact(&mut payload)
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => WireError::Closed,
            _ => WireError::Io(e),
        })?;
    Ok((payload, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_message_and_its_descriptors_arrive_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<std::fs::File> = (0..3)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let fds: Vec<BorrowedFd> = files.iter().map(|f| f.as_fd()).collect();
        send(&a, b"{\"x\":1}", &fds).unwrap();
        let (payload, got) = recv(&b).unwrap();
        assert_eq!(payload, b"{\"x\":1}");
        assert_eq!(got.len(), 3);
        for (sent, got) in files.iter().zip(&got) {
            let (s, g) = (stat(sent.as_raw_fd()), stat(got.as_raw_fd()));
            assert_eq!((s.st_dev, s.st_ino), (g.st_dev, g.st_ino));
        }
        drop(a);
        assert!(matches!(recv(&b), Err(WireError::Closed)));
    }

    /// The most descriptors one message can carry arrive; one more is refused by the sender.
    #[test]
    fn up_to_scm_max_fd_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let fds = vec![f.as_fd(); MAX_FDS];
        send(&a, b"{}", &fds).unwrap();
        assert_eq!(recv(&b).unwrap().1.len(), MAX_FDS);
        let fds = vec![f.as_fd(); MAX_FDS + 1];
        assert!(matches!(
            send(&a, b"{}", &fds),
            Err(WireError::TooManyFds(_))
        ));
    }

    /// Sends `bytes` raw with the write end of a pipe attached, runs `recv`, and checks that the
    /// receiver closed the descriptor it got (the read end then sees end of file).
    fn refused(bytes: &[u8]) -> WireError {
        let (a, b) = UnixStream::pair().unwrap();
        let mut p = [-1; 2];
        // SAFETY: pipe2 fills the two-element array we own.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just created both descriptors; each is owned once.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        a.send_with_fds(&[bytes], &[w.as_raw_fd()]).unwrap();
        drop((a, w));
        let err = recv(&b).expect_err("a bad frame was accepted");
        let mut pfd = libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
        assert!(
            n == 1 && pfd.revents & libc::POLLHUP != 0,
            "the refused message's descriptor is still open"
        );
        err
    }

    fn header(magic: &[u8; 4], version: u32, len: u32, nfds: u32) -> Vec<u8> {
        let mut h = magic.to_vec();
        for w in [version, len, nfds] {
            h.extend_from_slice(&w.to_le_bytes());
        }
        h
    }

    #[test]
    fn bad_frames_are_refused_and_their_descriptors_closed() {
        assert!(matches!(
            refused(&header(b"XXXX", 1, 0, 1)),
            WireError::Magic
        ));
        assert!(matches!(
            refused(&header(b"VCHO", 2, 0, 1)),
            WireError::Version(2)
        ));
        assert!(matches!(
            refused(&header(b"VCHO", 1, u32::MAX, 1)),
            WireError::TooBig(_)
        ));
        assert!(matches!(
            refused(&header(b"VCHO", 1, 0, 2)),
            WireError::FdCount {
                announced: 2,
                got: 1
            }
        ));
        // Truncated: a header announcing a payload that never comes, a half header.
        assert!(matches!(
            refused(&header(b"VCHO", 1, 10, 1)),
            WireError::Closed
        ));
        assert!(matches!(refused(b"VCH"), WireError::Closed));
    }

    fn stat(fd: RawFd) -> libc::stat {
        // SAFETY: fstat into a zeroed buffer we own, on a descriptor the caller keeps open.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            assert_eq!(libc::fstat(fd, &mut st), 0);
            st
        }
    }
}
