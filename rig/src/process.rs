//! Small helpers around `std::process`: checked commands, children that are stopped on drop,
//! temporary directories, unique names and polling with a timeout.

use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Runs `cmd`, failing (with its output) unless it exits with status 0.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    crate::interrupt::check_interrupted()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Runs `program args...` to completion; its standard output, or an error with its stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A name unique to this process and call: `<prefix><pid>x<counter>`.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

/// Fails with a clear message unless we run as root (namespaces, taps and veths need it).
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "this needs root (network namespaces, tap and veth devices); run it with sudo -E \
             (euid is {euid})"
        );
    }
    Ok(())
}

/// Runs `cmd` and returns its trimmed standard output.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Polls `check` every 50 ms until it yields a value, failing after `timeout`
/// or on Ctrl-C.
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
        crate::interrupt::check_interrupted()?;
        if Instant::now() > deadline {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        sleep(Duration::from_millis(50));
    }
}

/// A child process that is stopped (signal, grace period, then SIGKILL) when
/// dropped, so no daemon or VM outlives the task.
pub struct Guarded {
    name: String,
    child: Child,
    stop_signal: libc::c_int,
    status: Option<ExitStatus>,
}

impl Guarded {
    /// Spawns `cmd` in its own process group (so the terminal's Ctrl-C reaches
    /// only xtask, which then tears down in order) and asks the kernel to kill
    /// it should xtask die without running its destructors.
    pub fn spawn(name: &str, cmd: &mut Command, stop_signal: libc::c_int) -> Result<Self> {
        cmd.process_group(0);
        // SAFETY: the closure runs between fork and exec and only makes the
        // async-signal-safe prctl(2) system call.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Guarded {
            name: name.to_string(),
            child,
            stop_signal,
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's piped standard input and output, if it was spawned with them.
    pub fn take_stdio(&mut self) -> (Option<ChildStdin>, Option<ChildStdout>) {
        (self.child.stdin.take(), self.child.stdout.take())
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("cannot wait for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let what = format!("{} to exit", self.name);
        wait_for(&what, timeout, || self.try_wait())
    }

    /// Sends the stop signal, waits up to 5 s, then kills. Returns the exit
    /// status and whether the process had to be killed.
    pub fn stop(&mut self) -> Result<(ExitStatus, bool)> {
        self.stop_within(Duration::from_secs(5))
    }

    /// [`Guarded::stop`] with a grace period of `grace`.
    pub fn stop_within(&mut self, grace: Duration) -> Result<(ExitStatus, bool)> {
        if let Some(status) = self.try_wait()? {
            return Ok((status, false));
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: plain kill(2) on our own child, which has not been reaped
        // yet (try_wait above returned None), so the pid is still ours.
        unsafe {
            libc::kill(pid, self.stop_signal);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok((status, false));
            }
            sleep(Duration::from_millis(50));
        }
        eprintln!("rig: {} ignored its stop signal, killing it", self.name);
        self.child.kill().ok();
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok((status, true))
    }
}

impl Guarded {
    /// SIGKILL at once (no grace period) and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.child
            .kill()
            .with_context(|| format!("cannot kill {}", self.name))?;
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("rig: cannot stop {}: {err:#}", self.name);
        }
    }
}

/// A directory removed (with its contents) on Drop: `<tmp>/<prefix>-<pid>x<n>`.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(unique(&format!("{prefix}-")));
        if path.exists() {
            std::fs::remove_dir_all(&path).ok();
        }
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// The last `n` lines of a log file, for error reports.
pub fn tail(path: &std::path::Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}
