//! The host's end of the guest agent: a line protocol on the VM's second
//! serial port (ttyS1), which QEMU exposes as a Unix socket.
//!
//! The host sends `<id> <seconds> <shell script>` on one line; the agent (see
//! `guest::AGENT`) runs the script under `timeout`, sends back every output
//! line as `<id>| <line>` and ends with `<id>= <exit status>`. The serial
//! port does not depend on the NIC under test, so the guest stays reachable
//! while the card is unplugged or restarting.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What a guest command printed (stdout and stderr) and its exit status.
#[derive(Debug)]
pub struct Reply {
    pub rc: i32,
    pub out: String,
    /// From sending the command to its status line.
    pub elapsed: Duration,
}

pub struct Channel {
    stream: UnixStream,
    pending: Vec<u8>,
    ready: bool,
    next_id: u32,
    /// The command in flight: id, when it was sent, output so far.
    current: Option<(u32, Instant, String)>,
    log: File,
}

impl Channel {
    /// Connects to QEMU's socket; `Ok(None)` while it does not exist yet.
    pub fn connect(path: &Path, log: &Path) -> Result<Option<Channel>> {
        let stream = match UnixStream::connect(path) {
            Ok(stream) => stream,
            Err(err)
                if matches!(
                    err.kind(),
                    ErrorKind::NotFound | ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None)
            }
            Err(err) => return Err(err).with_context(|| format!("connecting {}", path.display())),
        };
        stream.set_nonblocking(true)?;
        Ok(Some(Channel {
            stream,
            pending: Vec::new(),
            ready: false,
            next_id: 1,
            current: None,
            log: File::create(log).with_context(|| format!("creating {}", log.display()))?,
        }))
    }

    /// Whether the agent has said `AGENT-READY`.
    pub fn ready(&mut self) -> Result<bool> {
        self.read_lines()?;
        Ok(self.ready)
    }

    /// Takes the agent as ready without its `AGENT-READY` line (it was said to another QEMU
    /// before the guest migrated here).
    pub fn assume_ready(&mut self) {
        self.ready = true;
    }

    /// Sends a command; the guest kills it after `timeout` (whole seconds,
    /// rounded up). Returns its id.
    pub fn send(&mut self, script: &str, timeout: Duration) -> Result<u32> {
        if !self.ready {
            bail!("the guest agent is not ready");
        }
        if let Some((id, _, _)) = &self.current {
            bail!("guest command {id} is still running");
        }
        let id = self.next_id;
        self.next_id += 1;
        // The agent reads lines: the script travels base64-encoded, so it may
        // span lines and hold any character.
        let encoded = base64(script.as_bytes());
        let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        let line = format!("{id} {secs} {encoded}\n");
        writeln!(self.log, ">>> {id} ({secs} s) {}", script.trim_end()).ok();
        self.stream.set_nonblocking(false)?;
        let written = self.stream.write_all(line.as_bytes());
        self.stream.set_nonblocking(true)?;
        written.context("writing to the guest agent")?;
        self.current = Some((id, Instant::now(), String::new()));
        Ok(id)
    }

    /// The reply to command `id` once it is complete.
    pub fn reply(&mut self, id: u32) -> Result<Option<Reply>> {
        for (line_id, kind, text) in self.read_lines()? {
            let Some((cur, started, out)) = self.current.as_mut() else {
                continue;
            };
            if line_id != *cur {
                continue; // a late line of a command we gave up on
            }
            if kind == '|' {
                out.push_str(&text);
                out.push('\n');
                continue;
            }
            let rc = text.trim().parse().unwrap_or(-1);
            let reply = Reply {
                rc,
                out: std::mem::take(out),
                elapsed: started.elapsed(),
            };
            writeln!(
                self.log,
                "<<< {line_id} exit {rc} after {:?}",
                reply.elapsed
            )
            .ok();
            self.current = None;
            if line_id == id {
                return Ok(Some(reply));
            }
        }
        Ok(None)
    }

    /// Complete lines received since the last call, as (id, '|' or '=', text).
    fn read_lines(&mut self) -> Result<Vec<(u32, char, String)>> {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => bail!("QEMU closed the guest agent's socket"),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => return Err(err).context("reading from the guest agent"),
            }
        }
        let mut lines = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            writeln!(self.log, "{line}").ok();
            if line.contains("AGENT-READY") {
                self.ready = true;
                continue;
            }
            if let Some(parsed) = parse_line(&line) {
                lines.push(parsed);
            }
        }
        Ok(lines)
    }
}

/// Standard base64 with padding (what busybox `base64 -d` reads).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `12| text` or `12= 0`.
fn parse_line(line: &str) -> Option<(u32, char, String)> {
    let at = line.find(['|', '='])?;
    let id = line[..at].trim().parse().ok()?;
    let kind = line[at..].chars().next()?;
    let text = line[at + 1..].strip_prefix(' ').unwrap_or(&line[at + 1..]);
    Some((id, kind, text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::{base64, parse_line};

    #[test]
    fn base64_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(b"ip a\n"), "aXAgYQo=");
    }

    #[test]
    fn lines() {
        assert_eq!(parse_line("3| a=b"), Some((3, '|', "a=b".into())));
        assert_eq!(parse_line("3= 1"), Some((3, '=', "1".into())));
        assert_eq!(parse_line("3|"), Some((3, '|', String::new())));
        assert_eq!(parse_line("noise"), None);
    }
}
