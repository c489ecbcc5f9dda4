//! A QMP client: commands with their replies, and the events in between.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use serde_json::{json, Value as Json};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received and not yet taken.
    events: Vec<Json>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation.
    pub fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("connecting to QMP at {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = qmp.read_message(Instant::now() + Duration::from_secs(10))?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` and returns its "return" value; fails on "error".
    pub fn execute(&mut self, command: &str, arguments: Option<Json>) -> Result<Json> {
        let mut request = json!({ "execute": command });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        writeln!(self.writer, "{request}").context("writing to QMP")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let msg = self.read_message(deadline)?;
            if msg.get("event").is_some() {
                self.events.push(msg);
            } else if let Some(value) = msg.get("return") {
                return Ok(value.clone());
            } else if let Some(err) = msg.get("error") {
                let desc = err.get("desc").and_then(Json::as_str).unwrap_or("?");
                bail!("QMP {command} failed: {desc}");
            }
        }
    }

    /// Waits for an event named `name` whose data satisfies `pred`.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Json) -> bool,
    ) -> Result<Json> {
        let deadline = Instant::now() + timeout;
        let matches = |e: &Json| {
            e.get("event").and_then(Json::as_str) == Some(name)
                && pred(e.get("data").unwrap_or(&Json::Null))
        };
        loop {
            if let Some(i) = self.events.iter().position(matches) {
                return Ok(self.events.remove(i));
            }
            let msg = self
                .read_message(deadline)
                .with_context(|| format!("waiting for the QMP event {name}"))?;
            if msg.get("event").is_some() {
                self.events.push(msg);
            }
        }
    }

    fn read_message(&mut self, deadline: Instant) -> Result<Json> {
        let mut line = String::new();
        loop {
            match self.reader.read_line(&mut line) {
                Ok(0) => bail!("QEMU closed the QMP socket"),
                Ok(_) if line.ends_with('\n') => {
                    return serde_json::from_str(line.trim())
                        .with_context(|| format!("bad QMP message {line:?}"));
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e).context("reading from QMP"),
            }
            crate::interrupt::check_interrupted()?;
            if Instant::now() > deadline {
                bail!("QMP: no answer in time");
            }
        }
    }
}
