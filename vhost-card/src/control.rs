//! Counters and state while the daemon runs: a Unix control socket that answers with the JSON
//! snapshot (`stats::Snapshot`, read by `vhost-card stats --control PATH`) and an HTTP endpoint
//! for Prometheus (`--metrics-listen ADDR`, served by `tiny_http`, written by `metrics.rs`).

use std::io::{self, Read, Write};
use std::net::TcpListener;
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

/// Serves the JSON snapshot to every connection on `listener`.
pub fn serve_control(listener: UnixListener, stats: Arc<Stats>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(mut c) => {
                        let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                        let mut body = serde_json::to_string(&stats.snapshot()).unwrap_or_default();
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
