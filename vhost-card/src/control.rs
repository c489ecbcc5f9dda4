//! Counters while the daemon runs: a Unix control socket that answers with JSON
//! (`vhost-card stats --control PATH`) and an HTTP endpoint in the Prometheus text format
//! (`--metrics-listen ADDR`, served by `tiny_http`).

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, warn};

use crate::stats::Stats;

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

/// Serves the JSON snapshot to every connection on `listener`.
pub fn serve_control(listener: UnixListener, stats: Arc<Stats>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(mut c) => {
                        let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                        let mut body = stats.to_json().to_string();
                        body.push('\n');
                        if let Err(e) = c.write_all(body.as_bytes()) {
                            debug!("control client: {e}");
                        }
                    }
                    Err(e) => warn!("control socket: {e}"),
                }
            }
        })?;
    Ok(())
}

/// Reads the JSON snapshot from a running daemon's control socket.
pub fn query(path: &Path) -> io::Result<String> {
    let mut c = UnixStream::connect(path)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut s = String::new();
    c.read_to_string(&mut s)?;
    Ok(s)
}

/// Binds the metrics listener on `addr` (host:port).
pub fn bind_metrics(addr: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))
}

/// Serves `GET /metrics` (and `/`) in the Prometheus text format on `listener`.
pub fn serve_metrics(listener: TcpListener, stats: Arc<Stats>) -> io::Result<()> {
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|e| io::Error::other(format!("metrics server: {e}")))?;
    info!("metrics on http://{}/metrics", server.server_addr());
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let content_type = tiny_http::Header::from_bytes(
                &b"Content-Type"[..],
                &b"text/plain; version=0.0.4; charset=utf-8"[..],
            )
            .ok();
            for req in server.incoming_requests() {
                let path = req.url().split('?').next().unwrap_or("");
                let resp = if matches!(path, "/metrics" | "/") {
                    let mut r = tiny_http::Response::from_string(stats.to_prometheus());
                    if let Some(h) = content_type.clone() {
                        r = r.with_header(h);
                    }
                    r
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
