//! systemd's end of `sd_notify` and a service's file descriptor store, as systemd 252 (Debian
//! 12) keeps them (`src/core/service.c`: `service_notify_message`, `service_add_fd_store`,
//! `service_remove_fd_store`, `service_collect_fds`), for tests that play systemd's role around
//! a daemon process:
//!
//! - one datagram socket (`$NOTIFY_SOCKET`); a message is `KEY=VALUE` lines;
//! - `FDSTORE=1` keeps the message's descriptors under `FDNAME=` (default `stored`); a name
//!   longer than 255 characters, with a ':' or a control character refuses them all;
//!   descriptors sent without `FDSTORE=1` are closed;
//! - a descriptor whose open file the store already holds is closed and not added (systemd
//!   compares with `kcmp(KCMP_FILE)`); past `FileDescriptorStoreMax=` the rest are closed;
//! - `FDSTOREREMOVE=1` with `FDNAME=` closes every entry of that name;
//! - an entry that reports POLLHUP or POLLERR is dropped (systemd watches each one: a frontend
//!   that closed its end goes; a detached tap queue does not report POLLERR, its `tun` stays);
//! - on a restart the store is handed over after the socket unit's descriptors, newest first
//!   (`LIST_PREPEND`), as `LISTEN_FDS`/`LISTEN_FDNAMES`, and systemd keeps its own copies.
//!
//! Not modelled: `NotifyAccess=` (every sender is heard).

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// One entry of the store.
pub struct Entry {
    pub name: String,
    pub fd: OwnedFd,
}

#[derive(Default)]
struct Inner {
    /// Newest first.
    store: Vec<Entry>,
    max: usize,
    /// Every message received, in order (for failure reports).
    messages: Vec<String>,
    /// Descriptors refused (the store was full, or a bad name).
    refused: usize,
}

/// The notify socket and the fd store of one service.
pub struct Manager {
    path: PathBuf,
    inner: Arc<Mutex<Inner>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// systemd's `fdname_is_valid`.
fn fdname_is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

/// Whether two descriptors are the same open file (`kcmp(KCMP_FILE)`, as systemd's `same_fd`).
fn same_file(a: RawFd, b: RawFd) -> bool {
    const KCMP_FILE: libc::c_long = 0;
    let pid = libc::c_long::from(std::process::id());
    // SAFETY: kcmp compares two descriptors of this process; no memory is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            a as libc::c_long,
            b as libc::c_long,
        )
    };
    r == 0
}

fn hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: poll on one pollfd we own, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

impl Inner {
    fn message(&mut self, text: &str, fds: Vec<OwnedFd>) {
        self.messages.push(text.to_string());
        let mut fdstore = false;
        let mut remove = false;
        let mut name = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("FDSTORE", "1")) => fdstore = true,
                Some(("FDSTOREREMOVE", "1")) => remove = true,
                Some(("FDNAME", n)) => name = Some(n.to_string()),
                _ => {}
            }
        }
        if remove {
            match &name {
                Some(n) if fdname_is_valid(n) => self.store.retain(|e| e.name != *n),
                _ => self.refused += 1,
            }
        }
        if !fdstore || fds.is_empty() {
            return;
        }
        let name = name.unwrap_or_else(|| "stored".into());
        if !fdname_is_valid(&name) {
            self.refused += fds.len();
            return;
        }
        for fd in fds {
            if self
                .store
                .iter()
                .any(|e| same_file(e.fd.as_raw_fd(), fd.as_raw_fd()))
            {
                continue;
            }
            if self.store.len() >= self.max {
                self.refused += 1;
                continue;
            }
            self.store.insert(
                0,
                Entry {
                    name: name.clone(),
                    fd,
                },
            );
        }
    }
}

impl Manager {
    /// A notify socket at `dir/notify` for a service with `FileDescriptorStoreMax=max`.
    pub fn new(dir: &Path, max: usize) -> Result<Manager> {
        let path = dir.join("notify");
        let sock = UnixDatagram::bind(&path).context("binding the notify socket")?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let inner = Arc::new(Mutex::new(Inner {
            max,
            ..Inner::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (inner, stop) = (inner.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::SeqCst) {
                    let mut raw = [-1 as RawFd; 253];
                    let mut iov = [libc::iovec {
                        iov_base: buf.as_mut_ptr().cast(),
                        iov_len: buf.len(),
                    }];
                    // SAFETY: the iovec points into `buf`, which we own, for its length.
                    let Ok((n, nfds)) = (unsafe { sock.recv_with_fds(&mut iov, &mut raw) }) else {
                        continue;
                    };
                    // SAFETY: recvmsg gave us these descriptors; nothing else owns them.
                    let fds: Vec<OwnedFd> = raw[..nfds]
                        .iter()
                        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
                        .collect();
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    inner
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .message(&text, fds);
                }
            })
        };
        Ok(Manager {
            path,
            inner,
            stop,
            thread: Some(thread),
        })
    }

    /// `$NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The names in the store, newest first (after dropping hung-up entries).
    pub fn names(&self) -> Vec<String> {
        let mut inner = self.lock();
        inner.store.retain(|e| !hung_up(e.fd.as_raw_fd()));
        inner.store.iter().map(|e| e.name.clone()).collect()
    }

    /// Descriptors refused so far (bad names, a full store).
    pub fn refused(&self) -> usize {
        self.lock().refused
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<String> {
        self.lock().messages.clone()
    }

    /// Waits until the store holds every name of `want` and no message came for `quiet`.
    pub fn wait_for(&self, want: &[&str], quiet: Duration, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let mut seen = (0, Instant::now());
        loop {
            let names = self.names();
            let count = self.lock().messages.len();
            if count != seen.0 {
                seen = (count, Instant::now());
            }
            if want.iter().all(|w| names.iter().any(|n| n == w)) && seen.1.elapsed() >= quiet {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the fd store holds {names:?}, not all of {want:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What a restart hands the new process: copies of every entry, in systemd's order.
    pub fn handout(&self) -> Result<Vec<(String, OwnedFd)>> {
        let mut inner = self.lock();
        inner.store.retain(|e| !hung_up(e.fd.as_raw_fd()));
        inner
            .store
            .iter()
            .map(|e| Ok((e.name.clone(), e.fd.as_fd().try_clone_to_owned()?)))
            .collect()
    }

    /// Replaces the store's content (a test altering what systemd holds).
    pub fn set(&self, entries: Vec<(String, OwnedFd)>) {
        self.lock().store = entries
            .into_iter()
            .map(|(name, fd)| Entry { name, fd })
            .collect();
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Places `fds` at 3, 4, ... in a child about to exec (as systemd passes `LISTEN_FDS`):
/// a `pre_exec` hook for `Command`. Only async-signal-safe calls (fcntl, dup2).
pub fn place_fds(cmd: &mut std::process::Command, fds: Vec<OwnedFd>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls fcntl and dup2, which are
    // async-signal-safe; it owns `fds`, whose numbers stay valid in the child.
    unsafe {
        cmd.pre_exec(move || {
            // First above every target, so that no move overwrites a source.
            let mut moved = [0 as RawFd; 256];
            for (m, fd) in moved.iter_mut().zip(&fds) {
                *m = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 512);
                if *m < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (target, &m) in (3..).zip(&moved[..fds.len()]) {
                if libc::dup2(m, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(m);
            }
            Ok(())
        });
    }
}
