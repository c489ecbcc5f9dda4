//! What the daemon gives up once its socket and tap exist: another user and group
//! (`--user`/`--group`), every capability, and every system call it does not need
//! (`--sandbox seccomp`, an allow-list built with `seccompiler`).
//!
//! After this point the daemon can still serve frontends (accept, map guest memory, move
//! frames, answer the control socket) but cannot open a file (that fails with EACCES), create
//! a non-Unix socket, enter a namespace or start a program. Any other call off the list raises
//! SIGSYS; the handler names the call on stderr and the process exits with status 159
//! (128 + SIGSYS).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("unknown user '{0}'")]
    NoUser(String),
    #[error("unknown group '{0}'")]
    NoGroup(String),
    #[error("cannot switch to uid {uid} gid {gid}: {cause}")]
    Switch {
        uid: u32,
        gid: u32,
        cause: io::Error,
    },
    #[error("cannot drop capabilities: {0}")]
    Caps(String),
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
    #[error("cannot install the seccomp filter: {0}")]
    Install(String),
}

/// Looks up a user by name or number; returns its uid and primary gid.
pub fn lookup_user(name: &str) -> Result<(u32, u32), SandboxError> {
    let c = CString::new(name).map_err(|_| SandboxError::NoUser(name.into()))?;
    // SAFETY: getpwnam reads a NUL-terminated string; the result points to static storage that
    // we copy from before any other call could overwrite it (set-up is single-threaded here).
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if !pw.is_null() {
        // SAFETY: non-null result of getpwnam, valid until the next getpw* call.
        return Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) });
    }
    match name.parse::<u32>() {
        Ok(uid) => Ok((uid, uid)),
        Err(_) => Err(SandboxError::NoUser(name.into())),
    }
}

/// Looks up a group by name or number.
pub fn lookup_group(name: &str) -> Result<u32, SandboxError> {
    let c = CString::new(name).map_err(|_| SandboxError::NoGroup(name.into()))?;
    // SAFETY: as in `lookup_user`, for getgrnam.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if !gr.is_null() {
        // SAFETY: non-null result of getgrnam.
        return Ok(unsafe { (*gr).gr_gid });
    }
    name.parse::<u32>()
        .map_err(|_| SandboxError::NoGroup(name.into()))
}

/// Switches every thread to `uid`/`gid` with no supplementary groups. glibc applies set*id to
/// all threads of the process.
pub fn switch_identity(uid: u32, gid: u32) -> Result<(), SandboxError> {
    let err = |cause| SandboxError::Switch { uid, gid, cause };
    // SAFETY: plain system calls with scalar arguments or a valid one-element array.
    unsafe {
        if libc::setgroups(1, &gid) != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        if libc::setgid(gid) != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        if libc::setuid(uid) != 0 {
            return Err(err(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Empties the capability bounding set, so no thread or child can ever regain a capability.
/// Needs CAP_SETPCAP; without it (a daemon started unprivileged) there is nothing to drop.
pub fn drop_bounding_set() -> Result<(), SandboxError> {
    use caps::{CapSet, Capability};
    if !caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        return Ok(());
    }
    caps::clear(None, CapSet::Bounding).map_err(|e| SandboxError::Caps(e.to_string()))
}

/// Clears the effective, permitted, inheritable and ambient sets of the calling thread; threads
/// started afterwards inherit the empty sets. Call it while the process is single-threaded.
pub fn drop_capabilities() -> Result<(), SandboxError> {
    use caps::CapSet;
    let e = |e: caps::errors::CapsError| SandboxError::Caps(e.to_string());
    caps::clear(None, CapSet::Ambient).map_err(e)?;
    caps::clear(None, CapSet::Inheritable).map_err(e)?;
    caps::clear(None, CapSet::Effective).map_err(e)?;
    caps::clear(None, CapSet::Permitted).map_err(e)?;
    Ok(())
}

fn eq(arg: u8, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
        .expect("argument index below 6")
}

/// The allow-list: system calls the daemon makes after start-up, with argument checks where
/// a call could do much more than we need (ioctl, socket, prctl, prlimit).
pub fn filter() -> Result<BpfProgram, SandboxError> {
    filter_with(&[])
}

/// [`filter`] with more ioctl request numbers allowed (a VDUSE device's, see
/// `vduse::uapi::serving_ioctls`).
pub fn filter_with(extra_ioctls: &[u64]) -> Result<BpfProgram, SandboxError> {
    let plain: &[libc::c_long] = &[
        // I/O on the tap, the vhost-user sockets, eventfds and the control sockets.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        // Batched tap writes (rings set up before the sandbox, restricted to WRITEV and the
        // FILES_UPDATE that puts the tap in the ring's one file slot).
        libc::SYS_io_uring_enter,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_close,
        libc::SYS_shutdown,
        // The process metrics: /proc/self/stat and /proc/self/fd, opened before the sandbox,
        // read again at each scrape (procstat.rs).
        libc::SYS_pread64,
        libc::SYS_getdents64,
        libc::SYS_fcntl,
        libc::SYS_lseek,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        // The session's state for systemd's fd store (`--fd-store`): a new sealed memfd for
        // each change, sent with sendmsg on a Unix datagram socket like any sd_notify.
        libc::SYS_memfd_create,
        // A new frontend: the gate's inner Unix socket, and accepting on the listeners.
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_connect,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_rmdir,
        // Let through here, refused with EACCES by the second filter (`open_filter`).
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_statx,
        // Guest memory (SET_MEM_TABLE) and the allocator.
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_brk,
        // Worker threads per connection.
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_futex,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_yield,
        libc::SYS_getrandom,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_restart_syscall,
        libc::SYS_tgkill,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        plain.iter().map(|&n| (n, Vec::new())).collect();
    let one_of = |arg: u8, values: &[u64]| -> Result<Vec<SeccompRule>, SandboxError> {
        values
            .iter()
            .map(|&v| {
                SeccompRule::new(vec![eq(arg, v)]).map_err(|e| SandboxError::Build(e.to_string()))
            })
            .collect()
    };
    // The tap ioctls the data path needs after start-up, and std's descriptor flags.
    let ioctls: Vec<u64> = [
        libc::TUNSETOFFLOAD,
        libc::TUNSETVNETHDRSZ,
        libc::TUNSETPERSIST,
        libc::TUNSETQUEUE,
        libc::FIONBIO,
        libc::FIOCLEX,
        libc::FIONCLEX,
        libc::TCGETS,
    ]
    .into_iter()
    .chain(extra_ioctls.iter().copied())
    .collect();
    rules.insert(libc::SYS_ioctl, one_of(1, &ioctls)?);
    // Only Unix sockets: the gate's link to the protocol handler.
    rules.insert(libc::SYS_socket, one_of(0, &[libc::AF_UNIX as u64])?);
    // Thread names, and no-new-privileges (which only ever restricts).
    rules.insert(
        libc::SYS_prctl,
        one_of(
            0,
            &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
        )?,
    );
    // Reading limits (the thread library), never setting them.
    rules.insert(libc::SYS_prlimit64, one_of(2, &[0])?);
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SandboxError::Build(e.to_string()))?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Build(e.to_string()))
}

/// Installs the filter on every thread of the process, with a SIGSYS handler that names the
/// forbidden call before exiting.
pub fn install_seccomp() -> Result<(), SandboxError> {
    install_seccomp_with(&[])
}

/// [`install_seccomp`] with more ioctl request numbers allowed.
pub fn install_seccomp_with(extra_ioctls: &[u64]) -> Result<(), SandboxError> {
    let prog = filter_with(extra_ioctls)?;
    let opens = open_filter()?;
    install_sigsys_handler();
    // glibc reads /sys/devices/system/cpu/online the first time it needs a ninth malloc arena;
    // a fixed arena limit keeps it from trying (the open would fail with EACCES, and glibc
    // copes, but there is no reason to take that path).
    // SAFETY: mallopt with a valid parameter and value; the process is single-threaded here.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 4) };
    let install = |p: &BpfProgram| {
        seccompiler::apply_filter_all_threads(p).map_err(|e| SandboxError::Install(e.to_string()))
    };
    install(&opens)?;
    install(&prog)
}

/// A second filter, stacked on the allow-list: opening a file fails with EACCES instead of
/// ending the daemon, so a library that looks at a file now and then (glibc, std) degrades
/// rather than crashes, while the daemon still cannot read or create anything. The kernel
/// applies the most restrictive answer of all filters, so this only softens `open`/`openat`,
/// which the allow-list lets through for this purpose.
pub fn open_filter() -> Result<BpfProgram, SandboxError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        [libc::SYS_open, libc::SYS_openat, libc::SYS_openat2]
            .into_iter()
            .map(|n| (n, Vec::new()))
            .collect();
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| SandboxError::Build(e.to_string()))?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Build(e.to_string()))
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // For SIGSYS the kernel puts the system call number after the faulting address in the
    // siginfo union (`si_syscall`, byte offset 24 on x86_64).
    // SAFETY: `info` is the siginfo the kernel passed to this SA_SIGINFO handler; reading an
    // i32 inside its 128 bytes is in bounds.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let mut digits = [0u8; 10];
    let mut n = nr.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    let parts: [&[u8]; 3] = [
        b"vhost-card: sandbox: forbidden system call ",
        &digits[i..],
        b" (run with --sandbox none to debug)\n",
    ];
    // SAFETY: write(2) and _exit(2) are async-signal-safe; every buffer is on the stack or
    // static and valid for its length.
    unsafe {
        for p in parts {
            libc::write(2, p.as_ptr().cast(), p.len());
        }
        libc::_exit(128 + libc::SIGSYS);
    }
}

fn install_sigsys_handler() {
    // SAFETY: installs an SA_SIGINFO handler with an empty mask; the handler only writes to
    // stderr and exits.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_builds() {
        let prog = filter().unwrap();
        assert!(prog.len() > 60);
    }

    #[test]
    fn users_and_groups_resolve() {
        assert_eq!(lookup_user("root").unwrap().0, 0);
        assert_eq!(lookup_user("4242").unwrap(), (4242, 4242));
        assert!(lookup_user("no-such-user-here").is_err());
        assert_eq!(lookup_group("root").unwrap(), 0);
        assert!(lookup_group("no-such-group-here").is_err());
    }

    /// Runs the filter in a child process: allowed calls work, a forbidden one (openat) ends
    /// the child with the sandbox's message and status.
    #[test]
    fn forbidden_call_is_fatal() {
        if std::env::var_os("VHOST_CARD_SANDBOX_CHILD").is_some() {
            install_seccomp().unwrap();
            // Allowed: an eventfd, written and read.
            let e = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
            e.write(1).unwrap();
            assert_eq!(e.read().unwrap(), 1);
            // Opening a file fails cleanly.
            let e = std::fs::File::open("/etc/hostname").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EACCES));
            eprintln!("allowed calls done");
            // Forbidden: an Internet socket.
            let _ = std::net::UdpSocket::bind("127.0.0.1:0");
            std::process::exit(0);
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "sandbox::tests::forbidden_call_is_fatal",
                "--nocapture",
            ])
            .env("VHOST_CARD_SANDBOX_CHILD", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(128 + libc::SIGSYS), "{err}");
        assert!(err.contains("allowed calls done"), "{err}");
        let socket = format!("forbidden system call {}", libc::SYS_socket);
        assert!(err.contains(&socket), "{err}");
    }
}
