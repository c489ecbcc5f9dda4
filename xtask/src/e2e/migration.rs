//! Scenario 12: live migration of a VM that uses the card.
//!
//! Two QEMU processes on this machine, the source and the destination (`-incoming`), each with
//! its own vhost-card daemon in the same card namespace. Each daemon has its own tap, and both
//! taps are ports of a Linux bridge that carries the card's addresses: after the move, the
//! announcement (the guest's gratuitous ARP with GUEST_ANNOUNCE, or the card's RARP when QEMU
//! asks for one with SEND_RARP) is what teaches the bridge the guest's new port.
//!
//! ```text
//!   QEMU source  ── vhost-user ── vhost-card A ── tap mig0 ─┐
//!        │ migrate (unix socket)                             br0 10.77.0.1  (card namespace)
//!   QEMU dest    ── vhost-user ── vhost-card B ── tap mig1 ─┘
//! ```
//!
//! While a 64 MiB TCP transfer runs each way, QMP `migrate` moves the guest; both transfers
//! must finish with their sha256 equal, the switchover must fall inside them, the guest's
//! interface must never go down (carrier changes unchanged), and the bridge must learn the
//! guest's MAC on the destination's tap. Reported: QEMU's downtime (`query-migrate`) and the
//! longest gap between the guest's frames arriving at the bridge (AF_PACKET, kernel
//! timestamps). Round 1 (one queue pair, GUEST_ANNOUNCE) goes there and back; round 2
//! (`--queues 2` with both pairs in use, guest-announce disabled, so the card sends the RARP)
//! goes once.
//!
//! The guest has one vCPU in both rounds. With two, QEMU 7.2 under TCG breaks a migrated guest
//! whatever its vhost-user backend: on the destination the NIC goes silent (no announcement,
//! traffic stops) or the guest's kernel finds its memory corrupted (list corruption, a smashed
//! stack, a panic). Measured on this machine with vhost-card and with DPDK's vhost PMD
//! (testpmd forwarding to its tap PMD) as the backend, both ways; QEMU's own tap backend
//! migrated the same two-vCPU guest cleanly twice under the same load, but a later RAM
//! comparison (both sides `pmemsave`d after `completed`) caught it carrying 26 stale,
//! guest-written pages in 1 hop of 6 with a one-vCPU guest, which then crashed as ours did:
//! QEMU 7.2's TCG dirty tracking, not the backend (vhost-card: 0 differing pages in 66 hops).

use std::fs::File;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use super::{Options, DEFAULT_MTU, MIB};
use crate::card::{self, CardConfig};
use crate::netns::Netns;
use crate::nsnet::{self, Progress, Transfer};
use crate::process::{Guarded, TempDir};
use crate::qemu::{Nic, Vm, VmConfig};
use crate::qmp::Qmp;
use crate::report::key_values;
use crate::rig::Env;
use serde_json::{json, Value as Json};

const BRIDGE: &str = "br0";
const TAPS: [&str; 2] = ["mig0", "mig1"];
const SIDES: [&str; 2] = ["A", "B"];
/// Guest RAM, as the other scenarios' VMs have.
const GUEST_MIB: u32 = 1024;
/// Migration bandwidth (bytes/s): a local socket takes much more than QEMU's 32 MiB/s default.
const MAX_BANDWIDTH: u64 = 4_000_000_000;

pub fn run(env: &Env, opts: &Options) -> Result<(bool, String)> {
    let mut pass = true;
    let mut text = Vec::new();
    for round in [
        Round {
            name: "migration",
            cfg: CardConfig {
                mtu: DEFAULT_MTU,
                disable: String::new(),
                queues: 1,
                args: Vec::new(),
            },
            hops: &[(0, 1), (1, 0)],
        },
        Round {
            name: "migration-mq",
            cfg: CardConfig {
                mtu: DEFAULT_MTU,
                disable: "guest-announce".into(),
                queues: 2,
                args: Vec::new(),
            },
            hops: &[(0, 1)],
        },
    ] {
        let (ok, line) = round.run(env, opts).unwrap_or_else(|err| {
            let logs = env.logs.join(round.name);
            let text = format!("{}: {err:#} (logs in {})", round.name, logs.display());
            (false, text)
        });
        pass &= ok;
        text.push(line);
        crate::check_interrupted()?;
    }
    Ok((pass, text.join("\n       ")))
}

struct Round {
    name: &'static str,
    cfg: CardConfig,
    /// (from, to) sides, in order.
    hops: &'static [(usize, usize)],
}

impl Round {
    fn run(&self, env: &Env, opts: &Options) -> Result<(bool, String)> {
        let site = Site::start(env, self.name, &self.cfg)?;
        let mut vm = site.vm(env, 0, "boot", None)?;
        vm.wait_agent(Duration::from_secs(240))?;
        vm.check("net_up", Duration::from_secs(30))?;
        if self.cfg.queues > 1 {
            // A one-vCPU guest's driver starts with one pair: use them all.
            let set = format!(
                "{} guest channels eth0 --set {}",
                crate::guest::HELPER,
                self.cfg.queues
            );
            let out = key_values(&vm.check(&set, Duration::from_secs(20))?);
            if out.get("combined") != Some(&self.cfg.queues.to_string()) {
                bail!(
                    "the guest's driver did not take {} queue pairs: {out:?}",
                    self.cfg.queues
                );
            }
        }
        let mut pass = true;
        let mut lines = vec![format!(
            "{} ({}):",
            if self.cfg.queues > 1 {
                "--queues 2, no guest-announce (the card's RARP)"
            } else {
                "one queue pair, GUEST_ANNOUNCE"
            },
            site.command_line()
        )];
        for (n, &(from, to)) in self.hops.iter().enumerate() {
            let (next, hop) = match migrate(&site, env, opts, vm, n, from, to) {
                Ok(done) => done,
                Err(err) => {
                    lines.push(format!(
                        "{}→{}: {err:#} (logs in {})",
                        SIDES[from],
                        SIDES[to],
                        site.log_dir.display()
                    ));
                    return Ok((false, lines.join("\n         ")));
                }
            };
            vm = next;
            pass &= hop.ok;
            lines.push(hop.text);
            if !hop.ok {
                break;
            }
        }
        vm.shutdown().ok();
        if !pass {
            lines.push(format!("logs in {}", site.log_dir.display()));
        }
        Ok((pass, lines.join("\n         ")))
    }
}

/// The card namespace with its bridge, and one daemon (and tap) per side.
struct Site {
    /// Dropped first: the daemons, then the namespace, then the run directory.
    daemons: Vec<Guarded>,
    ns: Netns,
    run: TempDir,
    sockets: Vec<PathBuf>,
    logs: Vec<PathBuf>,
    log_dir: PathBuf,
    cfg: CardConfig,
}

impl Site {
    fn start(env: &Env, name: &str, cfg: &CardConfig) -> Result<Site> {
        let log_dir = env.logs.join(name);
        if log_dir.exists() {
            std::fs::remove_dir_all(&log_dir)?;
        }
        std::fs::create_dir_all(&log_dir)?;
        let run = TempDir::new("vhc-mig")?;
        let ns = Netns::new("vhm")?;
        ns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        let mut site = Site {
            daemons: Vec::new(),
            ns,
            sockets: Vec::new(),
            logs: Vec::new(),
            log_dir,
            run,
            cfg: cfg.clone(),
        };
        for (side, tap) in TAPS.iter().enumerate() {
            site.spawn_daemon(side, tap)?;
            site.ns.ip(&["link", "set", tap, "master", BRIDGE])?;
        }
        let mtu = cfg.mtu.min(65521).to_string();
        let ns = &site.ns;
        ns.ip(&["link", "set", BRIDGE, "mtu", &mtu])?;
        ns.ip(&["addr", "add", &format!("{}/24", card::CARD4), "dev", BRIDGE])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/64", card::CARD6),
            "dev",
            BRIDGE,
            "nodad",
        ])?;
        ns.ip(&["link", "set", BRIDGE, "up"])?;
        Ok(site)
    }

    fn spawn_daemon(&mut self, side: usize, tap: &str) -> Result<()> {
        let socket = self.run.path().join(format!("card-{side}.sock"));
        let log = self.log_dir.join(format!("daemon-{}.log", SIDES[side]));
        File::create(&log)?;
        let args = card::daemon_args(&self.cfg, &socket, self.ns.name(), tap);
        let ns = &self.ns;
        let daemon = rig::daemon::spawn(&card::binary(), &args, &log, self.run.path(), || {
            socket.exists() && ns.has_link(tap)
        })
        .with_context(|| format!("daemon {}", SIDES[side]))?;
        self.daemons.push(daemon);
        self.sockets.push(socket);
        self.logs.push(log);
        Ok(())
    }

    fn command_line(&self) -> String {
        let args = card::daemon_args(&self.cfg, Path::new("S"), "NS", "mig0|mig1");
        format!("vhost-card {}", args.join(" "))
    }

    /// A VM on side `side`'s daemon; with `incoming`, a migration destination.
    fn vm(&self, env: &Env, side: usize, name: &str, incoming: Option<&str>) -> Result<Vm> {
        let log_dir = self.log_dir.join(format!("vm-{name}"));
        let run_dir = self.run.path().join(name);
        std::fs::create_dir_all(&log_dir)?;
        std::fs::create_dir_all(&run_dir)?;
        let mut extra: Vec<String> = incoming
            .map(|uri| vec!["-incoming".to_string(), uri.to_string()])
            .unwrap_or_default();
        // One vCPU whatever the queue pairs (QEMU takes the last -smp; see the module docs).
        extra.extend(["-smp".to_string(), "1".to_string()]);
        Vm::start_with(
            &VmConfig {
                kernel: &env.kernel,
                initrd: &env.initrd,
                nic: Nic::VhostUser {
                    socket: &self.sockets[side],
                },
                mac: card::MAC,
                mtu: self.cfg.mtu,
                append: "",
                log_dir: &log_dir,
                run_dir: &run_dir,
                echo: env.echo,
                accel: env.accel,
                memory_mib: GUEST_MIB,
                hotplug_port: false,
                agent: true,
                queues: self.cfg.queues,
            },
            &extra,
        )
    }

    /// The bridge port behind which it has learned the guest's MAC, if any.
    fn guest_port(&self) -> Result<Option<String>> {
        let out = crate::process::stdout(Command::new("bridge").args([
            "-n",
            self.ns.name(),
            "fdb",
            "show",
            "br",
            BRIDGE,
        ]))?;
        Ok(out
            .lines()
            .filter(|l| l.starts_with(card::MAC) && !l.contains("permanent"))
            .find_map(|l| l.split_once(" dev ").map(|(_, r)| r))
            .and_then(|r| r.split_whitespace().next())
            .map(String::from))
    }

    /// Counter `key` of each queue pair of side `side`'s daemon, less `since`.
    fn pair_frames(&self, side: usize, key: &str, since: &[u64]) -> Vec<u64> {
        (0..usize::from(self.cfg.queues))
            .map(|p| {
                let now = self.counters(side, &format!("pair {p}"));
                let now = now.get(key).copied().unwrap_or(0);
                now.saturating_sub(since.get(p).copied().unwrap_or(0))
            })
            .collect()
    }

    /// A daemon's last logged counters of a `stats <what>:` line (`pair N`, `device`).
    fn counters(&self, side: usize, what: &str) -> std::collections::BTreeMap<String, u64> {
        let text = std::fs::read_to_string(&self.logs[side]).unwrap_or_default();
        let tag = format!("stats {what}:");
        let line = text
            .lines()
            .rev()
            .find_map(|l| l.split_once(&tag).map(|(_, r)| r));
        line.unwrap_or("")
            .split_whitespace()
            .filter_map(|w| {
                let (k, v) = w.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }
}

struct Hop {
    ok: bool,
    text: String,
}

/// Moves the guest from side `from` (running in `src`) to side `to` while a TCP transfer runs
/// each way; returns the destination VM.
fn migrate(
    site: &Site,
    env: &Env,
    opts: &Options,
    mut src: Vm,
    n: usize,
    from: usize,
    to: usize,
) -> Result<(Vm, Hop)> {
    let label = format!("{}-to-{}", SIDES[from], SIDES[to]).to_lowercase();
    let uri = format!(
        "unix:{}",
        site.run.path().join(format!("{label}.mig")).display()
    );
    let before = key_values(&src.check(
        "echo carrier_changes=$(cat /sys/class/net/eth0/carrier_changes)",
        Duration::from_secs(20),
    )?);
    let mut dst = site.vm(env, to, &label, Some(&uri))?;
    let dest_before = (
        site.pair_frames(to, "tx_frames", &[]),
        site.pair_frames(to, "rx_frames", &[]),
    );
    let len = opts.mib * MIB;
    // TCG moves at least 1 MB/s even while migrating; a stalled transfer fails in bounded time.
    let timeout = Duration::from_secs(60 + (len / 1_000_000) as u64);
    let (up_port, down_port) = (5101 + 2 * n as u16, 5102 + 2 * n as u16);

    let watch = FrameWatch::start(site.ns.name(), BRIDGE)?;
    // Guest → card: the card listens, the guest sends in the background.
    let progress = Arc::new(Progress::default());
    let up = nsnet::tcp_receive(
        site.ns.name(),
        SocketAddrV4::new(card::CARD4.parse()?, up_port),
        Duration::from_secs(60),
        timeout,
        progress.clone(),
    )?;
    // Card → guest: the guest listens in the background and hashes what arrives as it arrives
    // (wc counts it): the guest's memory is not where the 64 MiB go, so the migration copies
    // the guest while it receives instead of chasing 64 MiB of freshly written pages.
    src.check(
        &format!(
            "rm -f /tmp/rx.* /tmp/up.rc
             mkfifo /tmp/rx.fifo
             (wc -c < /tmp/rx.fifo > /tmp/rx.len) > /dev/null 2>&1 &
             ({{ nc -l -p {down_port}; echo $? > /tmp/rx.nc; }} | tee /tmp/rx.fifo |
                 sha256sum > /tmp/rx.sha; echo 0 > /tmp/rx.rc) > /dev/null 2>&1 &
             n=0
             until netstat -ltn | grep -q ':{down_port} '; do
                 n=$((n + 1)); [ $n -gt 100 ] && {{ echo 'nc is not listening'; exit 1; }}
                 sleep 0.1
             done
             (nc {card4} {up_port} < {payload}; echo $? > /tmp/up.rc) > /dev/null 2>&1 &",
            card4 = card::CARD4,
            payload = crate::guest::PAYLOAD,
        ),
        Duration::from_secs(20),
    )?;
    let down = nsnet::tcp_send(
        site.ns.name(),
        SocketAddrV4::new(card::GUEST4.parse()?, down_port),
        env.prefix(len),
        Duration::from_secs(10),
        timeout,
    )?;
    // Both are flowing: move the guest.
    let started = progress_at_least(&progress, (len / 16) as u64, Duration::from_secs(60));
    let mut qmp = Qmp::connect(&src.qmp)?;
    // Auto-converge (as `virsh migrate --auto-converge`): a guest writing its received 64 MiB
    // to memory under TCG can dirty pages faster than a loaded host sends them, and the
    // switchover would wait for the transfers to end. Throttling its vCPU lets the migration
    // finish while they run.
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({
            "capabilities": [{ "capability": "auto-converge", "state": true }]
        })),
    )?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({
            "max-bandwidth": MAX_BANDWIDTH,
            "cpu-throttle-initial": 30,
            "cpu-throttle-increment": 20,
        })),
    )?;
    let t0 = now_us();
    qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    let stats = wait_migrated(&mut qmp, Duration::from_secs(300))?;
    let t_done = now_us();
    let up_at_switch = progress.bytes.load(Ordering::Relaxed);
    let down_in_flight = !down.is_finished();
    // The source is paused for good: quit it, as a management layer would.
    let _ = qmp.execute("quit", None);
    drop(qmp);
    drop(src);

    dst.adopt_agent()?;
    let guest = key_values(&dst.check(
        "n=0
         while [ ! -e /tmp/up.rc ] || [ ! -e /tmp/rx.rc ] || [ ! -s /tmp/rx.len ]; do
             n=$((n + 1)); [ $n -gt 600 ] && break
             sleep 0.1
         done
         echo up_rc=$(cat /tmp/up.rc 2>/dev/null)
         echo rx_rc=$(cat /tmp/rx.nc 2>/dev/null)
         echo bytes=$(cat /tmp/rx.len)
         echo sha=$(cut -d' ' -f1 /tmp/rx.sha)
         echo carrier_changes=$(cat /sys/class/net/eth0/carrier_changes)
         echo operstate=$(cat /sys/class/net/eth0/operstate)",
        Duration::from_secs(120),
    )?);
    // A transfer the guest side did not finish may hang on for minutes (TCP timeouts): its
    // thread is left to end by itself.
    let up_result = join_within(up, Duration::from_secs(20));
    let down_sent = join_within(down, Duration::from_secs(20));
    // Announcements go on for a while after the switchover (QEMU repeats them); the daemons
    // log their counters every second.
    sleep(Duration::from_millis(1200));
    let frames = watch.stop()?;
    let port = site.guest_port()?;

    let expected_sha = env.sha_prefix(len)?;
    let up_ok = match &up_result {
        Ok(t) => t.bytes == len as u64 && t.sha256 == expected_sha,
        Err(_) => false,
    } && guest.get("up_rc").map(String::as_str) == Some("0");
    let down_ok = down_sent.is_ok()
        && guest.get("bytes").and_then(|b| b.parse::<usize>().ok()) == Some(len)
        && guest.get("sha") == Some(&expected_sha)
        && guest.get("rx_rc").map(String::as_str) == Some("0");
    let carrier = (
        before.get("carrier_changes").cloned().unwrap_or_default(),
        guest.get("carrier_changes").cloned().unwrap_or_default(),
    );
    let carrier_ok = !carrier.0.is_empty() && carrier.0 == carrier.1;
    let operstate_ok = guest.get("operstate").map(String::as_str) == Some("up");
    let in_flight = started && up_at_switch < len as u64 && down_in_flight;
    let announce = frames.announcements();
    let announced = announce.rarp + announce.garp > 0;
    let port_ok = port.as_deref() == Some(TAPS[to]);
    let gap = frames.longest_gap_from_guest(t0, t_done.max(t0) + 5_000_000);
    let (dest_tx, dest_rx) = (
        site.pair_frames(to, "tx_frames", &dest_before.0),
        site.pair_frames(to, "rx_frames", &dest_before.1),
    );
    let marks = site
        .counters(from, "device")
        .get("dirty_log_marks")
        .copied()
        .unwrap_or(0);
    let ok = stats.completed
        && up_ok
        && down_ok
        && carrier_ok
        && operstate_ok
        && in_flight
        && announced
        && port_ok;
    let text = format!(
        "{}→{}: {} in {} ms, downtime {} ms (QEMU), longest gap in the guest's frames {}; \
         {} MiB TCP guest→card {}, card→guest {}{}; carrier changes {} → {}{}; announced by \
         {}; bridge learned {} on {} (dest tap {}); source daemon logged {marks} dirty-page \
         marks; frames per queue pair at the destination guest→card {dest_tx:?}, card→guest \
         {dest_rx:?}",
        SIDES[from],
        SIDES[to],
        stats.status,
        stats.total_ms,
        stats.downtime_ms,
        gap.map_or("-".into(), |(g, at)| format!(
            "{:.1} ms ({:.0} ms after `migrate`)",
            g as f64 / 1000.0,
            at as f64 / 1000.0
        )),
        opts.mib,
        describe(&up_result, up_ok, &expected_sha),
        if down_ok {
            format!("sha256 equal ({}…)", &expected_sha[..12])
        } else {
            format!(
                "{} bytes, sha256 {} ({})",
                guest.get("bytes").map_or("?", String::as_str),
                guest.get("sha").map_or("-", String::as_str),
                down_sent.err().map_or("sent".into(), |e| format!("{e:#}"))
            )
        },
        if in_flight {
            format!(
                ", both in flight at the switchover ({} of {} MiB up)",
                up_at_switch / MIB as u64,
                opts.mib
            )
        } else {
            ", NOT both in flight at the switchover".into()
        },
        carrier.0,
        carrier.1,
        if operstate_ok {
            ", eth0 up"
        } else {
            ", eth0 NOT up"
        },
        announce.describe(),
        card::MAC,
        port.as_deref().unwrap_or("no port"),
        TAPS[to]
    );
    let text = if ok {
        text
    } else {
        format!("{text}\n           {}", evidence(&mut dst))
    };
    Ok((dst, Hop { ok, text }))
}

/// What the destination's guest and QEMU say of the NIC's queues, for a FAIL line: the
/// guest's virtio interrupt counts and each queue's indices as QEMU sees them.
fn evidence(dst: &mut Vm) -> String {
    let irqs = dst
        .sh(
            "for i in 1 2; do grep -i virtio /proc/interrupts | tr -s ' ' | tr '\n' ';'; \
             [ $i = 1 ] && echo -n ' then 2 s later: ' && sleep 2; done",
            Duration::from_secs(15),
        )
        .map(|r| r.out.trim().to_string())
        .unwrap_or_else(|e| format!("{e:#}"));
    let mut queues = Vec::new();
    if let Ok(mut qmp) = Qmp::connect(&dst.qmp) {
        let path = "/machine/peripheral-anon/device[0]/virtio-backend";
        for queue in 0..2 {
            let args = json!({ "path": path, "queue": queue });
            match qmp.execute("x-query-virtio-queue-status", Some(args)) {
                Ok(st) => {
                    let n = |k: &str| st.get(k).map_or("?".into(), |v| v.to_string());
                    queues.push(format!(
                        "queue {queue}: last-avail {} shadow-avail {} used {} inuse {}",
                        n("last-avail-idx"),
                        n("shadow-avail-idx"),
                        n("used-idx"),
                        n("inuse")
                    ));
                }
                Err(e) => queues.push(format!("queue {queue}: {e:#}")),
            }
        }
    }
    format!(
        "destination guest interrupts: {irqs}; QEMU: {}",
        queues.join("; ")
    )
}

fn describe(result: &Result<Transfer>, ok: bool, sha: &str) -> String {
    match result {
        Ok(t) if ok => format!("{:.1} MB/s, sha256 equal ({}…)", t.mb_per_s(), &sha[..12]),
        Ok(t) => format!("{} bytes, sha256 {}", t.bytes, t.sha256),
        Err(e) => format!("failed: {e:#}"),
    }
}

/// Joins a card-side transfer thread if it ends within `timeout`.
fn join_within(handle: JoinHandle<Result<Transfer>>, timeout: Duration) -> Result<Transfer> {
    let t0 = Instant::now();
    while !handle.is_finished() {
        if t0.elapsed() > timeout {
            bail!("still running {timeout:?} after the guest's side ended");
        }
        sleep(Duration::from_millis(50));
    }
    nsnet::join(handle)
}

/// Waits until `progress` shows `bytes`; false on timeout.
fn progress_at_least(progress: &Progress, bytes: u64, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while progress.bytes.load(Ordering::Relaxed) < bytes {
        if t0.elapsed() > timeout {
            return false;
        }
        sleep(Duration::from_millis(20));
    }
    true
}

/// What `query-migrate` said at the end.
struct Migrated {
    completed: bool,
    status: String,
    total_ms: u64,
    downtime_ms: u64,
}

fn wait_migrated(qmp: &mut Qmp, timeout: Duration) -> Result<Migrated> {
    let t0 = Instant::now();
    loop {
        let info = qmp.execute("query-migrate", None)?;
        let status = info
            .get("status")
            .and_then(Json::as_str)
            .unwrap_or("?")
            .to_string();
        let num = |k: &str| info.get(k).and_then(Json::as_u64).unwrap_or(0);
        // A QEMU that arrived by migration reports its incoming migration ("completed", no
        // times) until its outgoing one shows up.
        let outgoing = info.get("total-time").is_some() || status != "completed";
        match status.as_str() {
            "completed" if outgoing => {
                return Ok(Migrated {
                    completed: true,
                    status,
                    total_ms: num("total-time"),
                    downtime_ms: num("downtime"),
                })
            }
            "failed" | "cancelled" => {
                let why = info
                    .get("error-desc")
                    .and_then(Json::as_str)
                    .unwrap_or("no reason given");
                bail!("migration {status}: {why}");
            }
            _ => {}
        }
        if t0.elapsed() > timeout {
            bail!("migration still {status} after {timeout:?}");
        }
        crate::check_interrupted()?;
        sleep(Duration::from_millis(50));
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One frame seen on the bridge.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Kernel receive time, µs since the epoch (SIOCGSTAMP).
    at_us: u64,
    /// Arrived at the bridge (from a tap), rather than sent by the card's stack.
    incoming: bool,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// RARP from the guest's MAC (the card's announcement).
    Rarp,
    /// Gratuitous ARP from the guest's MAC (the guest's announcement).
    Garp,
    Other,
}

/// AF_PACKET on the bridge, in the card namespace, until stopped.
struct FrameWatch {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Vec<Seen>>>,
}

/// `SIOCGSTAMP`: the receive time of the last packet read from a socket.
const SIOCGSTAMP: libc::Ioctl = 0x8906;

impl FrameWatch {
    fn start(ns: &str, dev: &str) -> Result<FrameWatch> {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, dev) = (stop.clone(), dev.to_string());
        let mac = parse_mac(card::MAC)?;
        let handle = nsnet::spawn_in(ns, "frame-watch", move || {
            let fd = nsnet::packet_socket(&dev)?;
            let size: libc::c_int = 16 << 20;
            // SAFETY: setsockopt on our socket with a c_int and its size.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            let mut seen = Vec::new();
            let mut buf = [0u8; 64];
            while !flag.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 20) };
                while let Some((len, outgoing, _)) = nsnet::recv_frame(&fd, &mut buf)? {
                    let mut tv = libc::timeval {
                        tv_sec: 0,
                        tv_usec: 0,
                    };
                    // SAFETY: SIOCGSTAMP writes one timeval into `tv`, which we own.
                    unsafe {
                        libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), SIOCGSTAMP, &mut tv)
                    };
                    let at_us = tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
                    seen.push(Seen {
                        at_us,
                        incoming: !outgoing,
                        kind: classify(&buf[..len.min(buf.len())], &mac),
                    });
                }
            }
            Ok(seen)
        })?;
        Ok(FrameWatch { stop, handle })
    }

    fn stop(self) -> Result<Frames> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(Frames(nsnet::join(self.handle)?))
    }
}

fn classify(frame: &[u8], mac: &[u8; 6]) -> Kind {
    let (Some(src), Some(ethertype)) = (frame.get(6..12), frame.get(12..14)) else {
        return Kind::Other;
    };
    if src != mac {
        return Kind::Other;
    }
    match ethertype {
        [0x80, 0x35] => Kind::Rarp,
        // ARP whose sender and target IPv4 addresses are the same: gratuitous.
        [0x08, 0x06] if frame.len() >= 42 && frame[28..32] == frame[38..42] => Kind::Garp,
        _ => Kind::Other,
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s}"))?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s}"))
}

struct Frames(Vec<Seen>);

struct Announcements {
    rarp: usize,
    garp: usize,
}

impl Announcements {
    fn describe(&self) -> String {
        match (self.rarp, self.garp) {
            (0, 0) => "NOTHING (no RARP or gratuitous ARP from the guest's MAC)".into(),
            (r, 0) => format!("the card ({r} RARP, SEND_RARP)"),
            (0, g) => format!("the guest ({g} gratuitous ARP, GUEST_ANNOUNCE)"),
            (r, g) => format!("{r} RARP and {g} gratuitous ARP"),
        }
    }
}

impl Frames {
    fn announcements(&self) -> Announcements {
        let count = |k| self.0.iter().filter(|s| s.incoming && s.kind == k).count();
        Announcements {
            rarp: count(Kind::Rarp),
            garp: count(Kind::Garp),
        }
    }

    /// The longest time between two frames arriving from the guest within `[from, to]`
    /// (µs since the epoch), and where it started relative to `from`.
    fn longest_gap_from_guest(&self, from: u64, to: u64) -> Option<(u64, u64)> {
        let mut at: Vec<u64> = self
            .0
            .iter()
            .filter(|s| s.incoming && s.at_us >= from && s.at_us <= to)
            .map(|s| s.at_us)
            .collect();
        at.sort_unstable();
        at.windows(2)
            .map(|w| (w[1] - w[0], w[0] - from))
            .max_by_key(|&(gap, _)| gap)
    }
}
