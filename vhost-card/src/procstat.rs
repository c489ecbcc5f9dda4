//! The daemon's own process figures for the conventional `process_*` metrics: CPU time,
//! resident and virtual memory, threads, open and allowed descriptors, start time.
//!
//! The sandbox forbids opening files once the daemon serves, so `/proc/self/stat` and
//! `/proc/self/fd` are opened at start-up and read again (from offset 0) at each scrape.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Descriptors on `/proc/self`, opened before the sandbox.
#[derive(Debug)]
pub struct ProcSelf {
    stat: File,
    fd_dir: File,
    boot_time: f64,
}

/// One reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    /// Seconds since the Unix epoch.
    pub start_time: f64,
    pub open_fds: u64,
    pub max_fds: u64,
}

impl ProcSelf {
    pub fn open() -> io::Result<Self> {
        let stat = File::open("/proc/self/stat")?;
        let fd_dir = File::open("/proc/self/fd")?;
        let boot_time = std::fs::read_to_string("/proc/stat")?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no btime in /proc/stat"))?;
        Ok(ProcSelf {
            stat,
            fd_dir,
            boot_time,
        })
    }

    pub fn sample(&self) -> io::Result<Sample> {
        let mut buf = [0u8; 1024];
        let n = pread(&self.stat, &mut buf)?;
        let text = std::str::from_utf8(&buf[..n])
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "/proc/self/stat"))?;
        let mut s = parse_stat(text, clock_ticks(), page_size())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "odd /proc/self/stat"))?;
        s.start_time += self.boot_time;
        s.open_fds = count_entries(&self.fd_dir)?;
        s.max_fds = max_fds()?;
        Ok(s)
    }
}

/// Parses `/proc/PID/stat` (proc(5)); `start_time` is relative to boot.
fn parse_stat(text: &str, ticks: f64, page: u64) -> Option<Sample> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = text.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    Some(Sample {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        threads: field(20)?,
        start_time: field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
        open_fds: 0,
        max_fds: 0,
    })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096)
}

fn pread(f: &File, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: pread64 writes at most `buf.len()` bytes into `buf`, which is valid for the call.
    let n = unsafe { libc::pread64(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Entries of an open directory, `.` and `..` left out (read with getdents64 from the start).
fn count_entries(dir: &File) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor we own.
    if unsafe { libc::lseek(dir.as_raw_fd(), 0, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    let mut count = 0u64;
    loop {
        // SAFETY: getdents64 writes at most `buf.len()` bytes of dirent records into `buf`.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        if n == 0 {
            return Ok(count);
        }
        count += count_dirents(&buf[..n]);
    }
}

/// Records in a getdents64 buffer (`struct linux_dirent64`: ino u64, off i64, reclen u16,
/// type u8, name), `.` and `..` left out.
fn count_dirents(buf: &[u8]) -> u64 {
    let mut at = 0;
    let mut count = 0;
    while at + 19 <= buf.len() {
        let reclen = usize::from(u16::from_ne_bytes([buf[at + 16], buf[at + 17]]));
        if reclen == 0 || at + reclen > buf.len() {
            break;
        }
        let name = &buf[at + 19..at + reclen];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        if name != b"." && name != b".." {
            count += 1;
        }
        at += reclen;
    }
    count
}

fn max_fds() -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        let line = "4242 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 7 0 1000 123456789 300 \
                    18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line, 100.0, 4096).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_time, 10.0);
        assert_eq!(s.virtual_bytes, 123456789);
        assert_eq!(s.resident_bytes, 300 * 4096);
        assert!(parse_stat("4242 (x) S 1", 100.0, 4096).is_none());
    }

    #[test]
    fn reads_this_process() {
        let p = ProcSelf::open().unwrap();
        // Other tests of this process open and close descriptors too (one passes 253 at once):
        // open eight, expect at least half of them to show, in one of a few tries.
        let (a, b) = (0..5)
            .map(|_| {
                let a = p.sample().unwrap();
                let extra: Vec<File> = (0..8)
                    .map(|_| File::open("/proc/self/stat").unwrap())
                    .collect();
                let b = p.sample().unwrap();
                drop(extra);
                (a, b)
            })
            .find(|(a, b)| b.open_fds >= a.open_fds + 4)
            .expect("the eight descriptors opened never showed");
        assert!(a.resident_bytes > 0 && a.threads >= 1 && a.max_fds >= a.open_fds);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(a.start_time > now - 86400.0 * 365.0 && a.start_time <= now + 1.0);
        assert!(b.cpu_seconds >= a.cpu_seconds);
    }
}
