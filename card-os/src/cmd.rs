//! Running the programs the node is made of (`ip`, `nft`, `nginx`, `swanctl`, ...), inside
//! the card's or the wire's network namespace, with their output in the error when they fail.

use std::path::Path;
use std::process::{Command, Output};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Runs `cmd`, failing (with its output) unless it exits with status 0.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().map_err(|cause| Error::Spawn {
        command: describe(cmd),
        cause,
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: describe(cmd),
            status: out.status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr).trim_end()
            ),
        });
    }
    Ok(out)
}

/// `program arg arg ...`, as a person would type it.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` and returns its trimmed standard output.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs `cmd`, ignoring how it ends (clean-up of what may not be there).
pub fn quiet(cmd: &mut Command) {
    cmd.output().ok();
}

/// Polls `check` every 50 ms until it yields a value, failing after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                secs: timeout.as_secs(),
            });
        }
        sleep(Duration::from_millis(50));
    }
}

pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// `ip -n NS ARGS`.
pub fn ip(ns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(["-n", ns]).args(args))?;
    Ok(())
}

pub fn has_link(ns: &str, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", dev])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `ip netns exec NS PROGRAM ...` as a command.
pub fn in_ns(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]);
    cmd
}

pub fn sysctl(ns: &str, setting: &str) -> Result<()> {
    run(in_ns(ns, "sysctl").args(["-qw", setting]))?;
    Ok(())
}

/// The last `n` lines of a log file, for error reports.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// Sends `signal` to `pid` if `is_it(pid)` still holds, and waits up to `secs` for it to end;
/// SIGKILL after that. Quiet about a process already gone.
pub fn stop_process(pid: i32, signal: libc::c_int, secs: u64, is_it: impl Fn(i32) -> bool) {
    for (sig, wait) in [(signal, secs), (libc::SIGKILL, 5)] {
        if !is_it(pid) {
            return;
        }
        // SAFETY: kill(2) on a pid just checked (`is_it`: its command line or executable) to be
        // the process we mean.
        unsafe {
            libc::kill(pid, sig);
        }
        let gone = wait_for("a process to exit", Duration::from_secs(wait), || {
            Ok((!is_it(pid)).then_some(()))
        });
        if gone.is_ok() {
            return;
        }
    }
    eprintln!("card-os: process {pid} does not exit");
}

/// Whether process `pid` runs a program whose command line contains `needle`.
pub fn cmdline_has(pid: i32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
}
