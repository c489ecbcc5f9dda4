//! Random vhost-user sessions against the real daemon: seeded sequences of requests with
//! plausible and hostile bodies (queue indices, sizes, ring addresses, memory tables, feature
//! words, truncated bodies) and descriptors of every kind (memfds, eventfds blocking or not,
//! pipe ends, /dev/null), sent without waiting for answers, then a hang-up. This reaches the
//! `vhost` crate's request handler behind the gate, which the `vhost_msg` fuzz target does
//! not. The daemon must survive every session, leak no descriptor or thread, and still serve
//! a well-behaved frontend both ways afterwards.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use card_tests::card::Card;
use card_tests::fds::{memfd, pipe};
use card_tests::frontend::{Control, FLAG_NEED_REPLY, FLAG_VERSION};

/// splitmix64: a small, seeded, reproducible generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    fn u32(&mut self) -> u32 {
        let r = self.next() as u32;
        self.pick(&[
            0,
            1,
            2,
            3,
            4,
            255,
            256,
            257,
            1024,
            32768,
            65535,
            u32::MAX,
            r,
            r & 0xff,
        ])
    }
    fn u64(&mut self) -> u64 {
        let r = self.next();
        self.pick(&[0, 1, 3, 0xffff, 1 << 32, 1 << 63, u64::MAX, r, r & 0xffff])
    }
    /// A queue index: mostly in range (4 queues with `--queues 2`), sometimes not.
    fn index(&mut self) -> u32 {
        if self.chance(85) {
            self.below(5) as u32
        } else {
            self.u32()
        }
    }
}

const MIB: u64 = 1 << 20;
const HVA: u64 = 0x7f00_0000_0000;

fn eventfd(nonblock: bool) -> Result<OwnedFd> {
    let flags = libc::EFD_CLOEXEC | if nonblock { libc::EFD_NONBLOCK } else { 0 };
    // SAFETY: eventfd(2) with valid flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, flags) };
    ensure!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: the descriptor was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A descriptor of some kind, as a frontend might attach to any request.
fn some_fd(rng: &mut Rng) -> Result<OwnedFd> {
    Ok(match rng.below(5) {
        0 => memfd(rng.pick(&[4096, MIB]))?,
        1 => eventfd(false)?,
        2 => {
            let (r, w) = pipe()?;
            if rng.chance(50) {
                r
            } else {
                w
            }
        }
        3 => File::options()
            .read(true)
            .write(true)
            .open("/dev/null")?
            .into(),
        _ => eventfd(true)?,
    })
}

/// One random request: (request, body, descriptors).
fn random_request(rng: &mut Rng) -> Result<(u32, Vec<u8>, Vec<OwnedFd>)> {
    // Every request number up to 44, the ones with structure more often.
    let req = if rng.chance(60) {
        rng.pick(&[2, 5, 8, 9, 10, 11, 12, 13, 14, 16, 18, 20, 24, 37, 38, 39])
    } else {
        rng.below(45) as u32
    };
    let mut fds = Vec::new();
    let mut body = Vec::new();
    match req {
        // Feature words, NET_SET_MTU, SET_LOG_BASE's size.
        2 | 6 | 16 | 20 | 39 => body.extend_from_slice(&rng.u64().to_le_bytes()),
        // Vring state: index, number.
        8 | 10 | 11 | 18 | 23 => {
            body.extend_from_slice(&rng.index().to_le_bytes());
            body.extend_from_slice(&rng.u32().to_le_bytes());
        }
        // SET_VRING_ADDR: index, flags, desc, used, avail, log.
        9 => {
            body.extend_from_slice(&rng.index().to_le_bytes());
            body.extend_from_slice(&(rng.u32() & 1).to_le_bytes());
            for _ in 0..4 {
                let a = if rng.chance(80) {
                    HVA + rng.pick(&[0, 0x1000, 0x2000, MIB - 16, MIB, 2 * MIB])
                        + rng.pick(&[0, 0, 1, 2])
                } else {
                    rng.u64()
                };
                body.extend_from_slice(&a.to_le_bytes());
            }
        }
        // SET_VRING_KICK/CALL/ERR: index, maybe the "no descriptor" bit.
        12..=14 => {
            let no_fd = rng.chance(20);
            let v = u64::from(rng.index()) | if no_fd { 0x100 } else { 0 };
            body.extend_from_slice(&v.to_le_bytes());
            if !no_fd {
                fds.push(some_fd(rng)?);
            }
        }
        // SET_MEM_TABLE and ADD_MEM_REG / REM_MEM_REG.
        5 | 37 | 38 => {
            let n = rng.pick(&[0u64, 1, 1, 2, 3, 8, 9]);
            let mut regions = Vec::new();
            for i in 0..n {
                let (a, b, c) = (rng.u64(), rng.u64(), rng.u64());
                for v in [
                    rng.pick(&[0, MIB, i * MIB, a]),
                    rng.pick(&[MIB, 4096, 0, b]),
                    HVA + i * MIB,
                    rng.pick(&[0, 0, 4096, 1, c]),
                ] {
                    regions.extend_from_slice(&v.to_le_bytes());
                }
            }
            if req == 5 {
                body.extend_from_slice(&(n as u32).to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                body.extend_from_slice(&regions);
            } else {
                body.extend_from_slice(&0u64.to_le_bytes());
                body.extend_from_slice(&regions[..regions.len().min(32)]);
            }
            let count = rng.pick(&[n, n, n.saturating_sub(1), n + 1]).min(8);
            for _ in 0..count {
                fds.push(memfd(rng.pick(&[MIB, 2 * MIB, 4096]))?);
            }
        }
        // Anything else: a short random body, sometimes a descriptor.
        _ => {
            let len = rng.pick(&[0usize, 4, 8, 12, 40, 64]);
            body.extend((0..len).map(|_| rng.next() as u8));
            if rng.chance(20) {
                fds.push(some_fd(rng)?);
            }
        }
    }
    if rng.chance(5) {
        let keep = rng.below(body.len() as u64 + 1) as usize;
        body.truncate(keep);
    }
    Ok((req, body, fds))
}

/// QEMU's opening (most sessions) and a memory table, all without waiting for answers.
fn opening(c: &mut Control, rng: &mut Rng, mem: &OwnedFd) -> Result<()> {
    c.raw_request(1, 0, &[])?; // GET_FEATURES
    c.raw_request(15, 0, &[])?; // GET_PROTOCOL_FEATURES
    c.raw_request(2, 0, &0x1_7000_998bu64.to_le_bytes())?; // SET_FEATURES: the default offer
    let protocol: u64 = rng.pick(&[0xb, 0x8, 0x1, 0]);
    c.raw_request(16, 0, &protocol.to_le_bytes())?;
    let mut table = Vec::new();
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    for v in [0, 4 * MIB, HVA, 0] {
        table.extend_from_slice(&v.to_le_bytes());
    }
    c.raw_request_fds(5, 0, &table, &[mem.as_raw_fd()])?;
    Ok(())
}

/// One session: maybe the opening, then up to 40 random requests, then a hang-up. Send errors
/// (the daemon closed the session) end it early; that is an allowed answer to bad input.
fn session(card: &Card, rng: &mut Rng) -> Result<()> {
    let mut c = card.connect()?;
    let mem = memfd(4 * MIB)?;
    if rng.chance(80) && opening(&mut c, rng, &mem).is_err() {
        return Ok(());
    }
    for _ in 0..1 + rng.below(40) {
        let (req, body, fds) = random_request(rng)?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = if raw.is_empty() {
            let flags = FLAG_VERSION | if rng.chance(50) { FLAG_NEED_REPLY } else { 0 };
            let mut msg = Vec::with_capacity(12 + body.len());
            msg.extend_from_slice(&req.to_le_bytes());
            msg.extend_from_slice(&flags.to_le_bytes());
            msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
            msg.extend_from_slice(&body);
            c.raw_bytes(&msg)
        } else {
            c.raw_request_fds(req, 0, &body, &raw).map(drop)
        };
        if sent.is_err() {
            break;
        }
    }
    Ok(())
}

fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// What the daemon's descriptors are, for a failure message.
fn fd_kinds(pid: u32) -> Result<Vec<String>> {
    let mut kinds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| e.ok())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let target = std::fs::read_link(e.path())
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{name}={target}")
        })
        .collect();
    kinds.sort();
    Ok(kinds)
}

fn thread_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count())
}

#[test]
fn random_hostile_sessions_leave_the_daemon_serving() -> Result<()> {
    let mut card = Card::start(&["--queues", "2"])?;
    let pid = card.daemon.pid()?;
    let mut rng = Rng(0x5eed_cafe);
    // Every session ends with "...; listening again" in the log once the daemon is done.
    let mut ended = 0;
    let mut run = |card: &mut Card, rng: &mut Rng| -> Result<()> {
        session(card, rng)?;
        ended += 1;
        card.daemon
            .wait_log_count("listening again", ended, Duration::from_secs(10))
    };
    // Warm-up, so lazily created state does not count as a leak.
    for _ in 0..20 {
        run(&mut card, &mut rng)?;
    }
    let (fds0, threads0) = (fd_count(pid)?, thread_count(pid)?);
    let kinds0 = fd_kinds(pid)?;
    const SESSIONS: usize = 300;
    for i in 0..SESSIONS {
        run(&mut card, &mut rng).with_context(|| format!("random session {i}"))?;
    }
    let (fds1, threads1) = (fd_count(pid)?, thread_count(pid)?);
    eprintln!(
        "{SESSIONS} random sessions: descriptors {fds0} -> {fds1}, threads {threads0} -> {threads1}"
    );
    ensure!(
        fds1 <= fds0,
        "descriptors grew from {fds0} to {fds1}: before {kinds0:?}, after {:?}",
        fd_kinds(pid)?
    );
    ensure!(
        threads1 <= threads0,
        "threads grew from {threads0} to {threads1}"
    );
    let mut dev = card.driver()?;
    card.check_host_to_card(&mut dev, 7740, 1)?;
    card.check_card_to_host(&mut dev, 2)?;
    Ok(())
}
