//! Counters and state while the daemon runs: a Unix control socket that answers with the JSON
//! snapshot (`stats::Snapshot`, read by `vhost-card stats --control PATH`) and an HTTP endpoint
//! for Prometheus (`--metrics-listen ADDR`, served by `tiny_http`, written by `metrics.rs`).

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, warn};

use crate::metrics::Exporter;
use crate::stats::{Snapshot, Stats};

/// Binds the control socket at `path`, replacing a stale socket file but never a live one.
pub fn bind_control(path: &Path) -> io::Result<UnixListener> {
    if std::fs::symlink_metadata(path).is_ok() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("control socket {} is in use", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    info!("control socket on {}", path.display());
    Ok(listener)
}

/// The credentials (pid, uid, gid) of the process at the other end of a Unix socket, as the
/// kernel recorded them when it connected (SO_PEERCRED).
pub fn peer_credentials(sock: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// Who may use the control socket, whatever its file mode says: root and the user the daemon
/// runs as. The socket will also hand the running session over to a new process (issue 12),
/// so it is checked on every connection, not left to the file's permissions alone.
pub fn may_control(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_uid
}

/// What the control socket offers besides the snapshot: a live handover (`handover::steps`).
pub struct HandoverHook {
    /// Added to the snapshot line as its `handover` field.
    pub offer: serde_json::Value,
    /// Runs a handover on a connection whose request line was read: whether the session
    /// moved (this process then answers no more connections: the new one does).
    pub run: Box<dyn Fn(UnixStream) -> bool + Send>,
}

/// How long the control socket waits for a request line after the snapshot line. `stats`
/// closes after the snapshot line (no wait); `upgrade` answers at once, but a loaded machine
/// may not run it for a while (200 ms was seen to be too short under TCG load).
const REQUEST_WITHIN: Duration = Duration::from_secs(2);

/// Serves the JSON snapshot line to every connection on `listener` from root or `own_uid` (the
/// user the daemon runs as); others are refused (logged, connection closed). With a hook and a
/// root peer, it then waits up to 2 s for one request line: `{"request":"handover"}` runs the
/// hook.
pub fn serve_control(
    listener: UnixListener,
    stats: Arc<Stats>,
    own_uid: u32,
    handover: Option<HandoverHook>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let conn = conn.and_then(|c| Ok((peer_credentials(&c)?, c)));
                match conn {
                    Ok((peer, _)) if !may_control(peer.uid, own_uid) => warn!(
                        "control socket: refused pid {} uid {}: only root and uid {own_uid} may use it",
                        peer.pid, peer.uid
                    ),
                    Ok((peer, mut c)) => {
                        let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                        let mut line = serde_json::to_value(stats.snapshot()).unwrap_or_default();
                        if let (Some(h), Some(map)) = (&handover, line.as_object_mut()) {
                            map.insert("handover".into(), h.offer.clone());
                        }
                        let mut body = line.to_string();
                        body.push('\n');
                        if let Err(e) = c.write_all(body.as_bytes()) {
                            debug!("control client: {e}");
                            continue;
                        }
                        // Only root may ask for the session (it carries the guest's memory,
                        // the frontend's connection and the tap): another process of the
                        // daemon's user (`nobody`, say, shared with other services) may not.
                        let Some(h) = handover.as_ref().filter(|_| peer.uid == 0) else {
                            continue;
                        };
                        let _ = c.set_read_timeout(Some(REQUEST_WITHIN));
                        match read_line(&mut c, 256) {
                            Ok(req) if req.trim() == crate::handover::steps::REQUEST => {
                                info!("control socket: handover requested");
                                if (h.run)(c) {
                                    // The listener is shared with the new process: a
                                    // connection this one took now would die with it.
                                    break;
                                }
                            }
                            Ok(req) if req.is_empty() => {}
                            Ok(req) => warn!("control socket: unknown request {req:?}"),
                            Err(_) => {}
                        }
                    }
                    Err(e) => warn!("control socket: {e}"),
                }
            }
        })?;
    Ok(())
}

/// Reads one line of at most `max` bytes, byte by byte: nothing past it is consumed (a
/// handover goes on on the same connection).
pub fn read_line(c: &mut UnixStream, max: usize) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < max {
        if c.read(&mut b)? == 0 || b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Reads the JSON snapshot line from a running daemon's control socket (one line, then it
/// closes: the daemon then stops waiting for a request).
pub fn query(path: &Path) -> io::Result<String> {
    let mut c = UnixStream::connect(path)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    read_line(&mut c, 1 << 20)
}

/// Reads and parses the snapshot from a running daemon's control socket.
pub fn query_snapshot(path: &Path) -> io::Result<Snapshot> {
    Snapshot::parse(&query(path)?)
}

/// Binds the metrics listener on `addr`.
pub fn bind_metrics(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// Serves `GET /metrics` (and `/`) on `listener`: OpenMetrics when the request's Accept header
/// asks for it (as Prometheus does), the Prometheus text format otherwise.
pub fn serve_metrics(listener: TcpListener, exporter: Exporter) -> io::Result<()> {
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|e| io::Error::other(format!("metrics server: {e}")))?;
    info!("metrics on http://{}/metrics", server.server_addr());
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let path = req.url().split('?').next().unwrap_or("");
                let resp = if matches!(path, "/metrics" | "/") {
                    let accept = req
                        .headers()
                        .iter()
                        .find(|h| h.field.equiv("Accept"))
                        .map(|h| h.value.as_str().to_string())
                        .unwrap_or_default();
                    match exporter.render(&accept) {
                        Ok((body, content_type)) => {
                            let mut r = tiny_http::Response::from_string(body);
                            if let Ok(h) =
                                tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type)
                            {
                                r = r.with_header(h);
                            }
                            r
                        }
                        Err(_) => tiny_http::Response::from_string("encoding failed\n")
                            .with_status_code(500),
                    }
                } else {
                    tiny_http::Response::from_string("not found\n").with_status_code(404)
                };
                if let Err(e) = req.respond(resp) {
                    debug!("metrics client: {e}");
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_the_daemons_user_only() {
        assert!(may_control(0, 1000));
        assert!(may_control(1000, 1000));
        assert!(!may_control(1001, 1000));
        assert!(may_control(0, 0));
        assert!(!may_control(65534, 0));
    }

    #[test]
    fn credentials_of_the_peer() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = peer_credentials(&a).unwrap();
        // SAFETY: getuid and getpid cannot fail.
        let (uid, pid) = unsafe { (libc::getuid(), libc::getpid()) };
        assert_eq!((c.uid, c.pid), (uid, pid));
    }
}
