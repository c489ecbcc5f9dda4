//! The vhost-card daemon as the tests run it: built once, started by [`command`] (the one place
//! that knows its environment: log level, private directory, output to a log file).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::process::{tail, wait_for, Guarded};

/// The release daemon that [`build`] makes.
pub fn release_binary() -> PathBuf {
    crate::paths::target_dir().join("release/vhost-card")
}

/// `cargo build [--release] -p vhost-card --bin vhost-card`; returns the binary.
pub fn build(release: bool) -> Result<PathBuf> {
    let dir =
        crate::paths::cargo_build(release, &["-q", "-p", "vhost-card", "--bin", "vhost-card"])?;
    Ok(dir.join("vhost-card"))
}

/// The daemon the in-process tests drive: `$VHOST_CARD_BIN`, or the debug build, made once per
/// test process.
pub fn test_binary() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let found = match std::env::var_os("VHOST_CARD_BIN") {
            Some(p) => {
                let p = PathBuf::from(p);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(anyhow!("VHOST_CARD_BIN={} is not a file", p.display()))
                }
            }
            None => build(false),
        };
        found.map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// The daemon `binary` with `args`, its output appended to `log`, `private` as its private
/// directory (`RUNTIME_DIRECTORY`: the socket between its gate and the vhost crate) and the
/// log level of `$VHOST_CARD_LOG` (else `$RUST_LOG`, else info).
pub fn command<S: AsRef<OsStr>>(
    binary: &Path,
    args: &[S],
    log: &Path,
    private: &Path,
) -> Result<Command> {
    command_via(&[], binary, args, log, private)
}

/// [`command`] through `wrapper`: a program and its arguments that end by running the rest of
/// their command line (`ip netns exec NS setpriv --reuid U ...`); none when empty.
pub fn command_via<S: AsRef<OsStr>>(
    wrapper: &[&str],
    binary: &Path,
    args: &[S],
    log: &Path,
    private: &Path,
) -> Result<Command> {
    if !binary.is_file() {
        bail!("{} does not exist (build it first)", binary.display());
    }
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let level = std::env::var("VHOST_CARD_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let mut cmd = match wrapper.split_first() {
        None => Command::new(binary),
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(binary);
            c
        }
    };
    cmd.args(args)
        .env("RUST_LOG", level)
        .env("RUNTIME_DIRECTORY", private)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    Ok(cmd)
}

/// What `binary stats --control <control> <extra>` prints (the state and counters of a
/// running daemon: a table, or with `--json` the snapshot).
pub fn stats<S: AsRef<OsStr>>(binary: &Path, control: &Path, extra: &[S]) -> Result<String> {
    let out = crate::process::run(
        Command::new(binary)
            .arg("stats")
            .arg("--control")
            .arg(control)
            .args(extra),
    )?;
    Ok(String::from_utf8(out.stdout)?)
}

/// The counters of queue pair `pair` in the last `stats pair <pair>:` line of `log` (the
/// periodic lines and the final one at exit keep that flat `name=value` form; `idle` stands for
/// all zero). None before the first such line; an error on a word that is not `name=number`.
pub fn last_stats(log: &str, pair: usize) -> Result<Option<BTreeMap<String, u64>>> {
    let tag = format!("stats pair {pair}:");
    let Some(rest) = log
        .lines()
        .rev()
        .find_map(|l| l.split_once(&tag).map(|(_, r)| r))
    else {
        return Ok(None);
    };
    let mut map = BTreeMap::new();
    for word in rest.split_whitespace().filter(|w| *w != "idle") {
        let (name, value) = word
            .split_once('=')
            .ok_or_else(|| anyhow!("bad counter '{word}' in `{rest}`"))?;
        let value = value
            .parse()
            .with_context(|| format!("bad counter '{word}' in `{rest}`"))?;
        map.insert(name.to_string(), value);
    }
    Ok(Some(map))
}

/// Starts the daemon ([`command`]) as a [`Guarded`] child and waits up to 20 s for `ready`
/// (its socket, its tap); fails with the end of its log if it exits first.
pub fn spawn<S: AsRef<OsStr>>(
    binary: &Path,
    args: &[S],
    log: &Path,
    private: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<Guarded> {
    let mut cmd = command(binary, args, log, private)?;
    let mut daemon = Guarded::spawn("the vhost-card daemon", &mut cmd, libc::SIGTERM)?;
    wait_for(
        "the daemon's socket and tap",
        Duration::from_secs(20),
        || {
            if let Some(status) = daemon.try_wait()? {
                bail!("the daemon exited early ({status}):\n{}", tail(log, 10));
            }
            Ok(ready().then_some(()))
        },
    )?;
    Ok(daemon)
}

/// The address the daemon's metrics endpoint bound (`--metrics-listen 127.0.0.1:0` lets the
/// kernel choose the port), from its log.
pub fn metrics_addr(log: &str) -> Result<String> {
    log.lines()
        .find_map(|l| l.split_once("metrics on http://")?.1.split('/').next())
        .map(String::from)
        .ok_or_else(|| anyhow!("the daemon logged no metrics address:\n{log}"))
}

/// GET `path` from `addr` over HTTP/1.0, with an Accept header if given: the status line, the
/// headers (lower case) and the body.
pub fn http_get(addr: &str, path: &str, accept: Option<&str>) -> Result<(String, String, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no header/body separator in the answer of {addr}: {text:?}"))?;
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Ok((status.to_string(), headers.to_lowercase(), body.to_string()))
}

/// `GET /metrics` from the daemon's endpoint at `addr`: the body of a 200 answer.
pub fn scrape(addr: &str) -> Result<String> {
    let (status, _, body) = http_get(addr, "/metrics", None)?;
    ensure!(
        status.contains(" 200"),
        "GET http://{addr}/metrics: {status}"
    );
    Ok(body)
}
