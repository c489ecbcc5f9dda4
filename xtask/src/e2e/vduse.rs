//! `cargo xtask e2e --vduse` and `cargo xtask demo --vduse`: the card as a device of the kernel
//! it runs on. A TCG VM boots Debian 13's unmodified cloud kernel as the "bare-metal host"; inside
//! it, `vhost-card --vduse` creates a VDUSE device and its vdpa device, and the VM's own
//! `virtio_vdpa` and `virtio_net` make the host interface eth0 of it, while the card's end (the
//! tap) sits in the VM's network namespace `card`. One PASS/FAIL line per check:
//!
//! 1. errors: without the vduse module the daemon names it and exits 1;
//! 2. binding: driver virtio_net, MTU 65520, the guest's feature bits equal the offer;
//! 3. ping both ways over IPv4 and IPv6;
//! 4. 64 MiB of TCP each way, sha256 equal;
//! 5. checksum honesty: UDP datagrams with a wrong checksum sent from the card are dropped by the
//!    host's stack (Udp InCsumErrors), right ones delivered;
//! 6. toggles: `--disable mrg-rxbuf`, then `--mtu 1500`: bits and MTU follow, traffic passes;
//! 7. lifecycle: a second daemon on the same name is refused; SIGTERM removes the host interface
//!    and the device, a new daemon brings them back; after SIGKILL the restarted daemon takes the
//!    device back and the same interface carries traffic again;
//! 8. kernel limits, measured: the feature bits VDUSE refuses on top of the offer (CTRL_VQ) and
//!    those it requires, `--queues 2` refused by the daemon with the reason, MTU 65535 with
//!    65000-byte pings both ways;
//! 9. vdpa binding: with `--vduse-bind none` the user's own `vdpa dev add` gives the same host
//!    interface; with `--vduse-bind vhost` the device goes to `vhost_vdpa` (/dev/vhost-vdpa-N, for
//!    a VM) instead.
//!
//! Logs: target/vm/logs/e2e-vduse/.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::accel::Accel;
use crate::assets::KernelSource;
use crate::payload::Payload;
use crate::process::TempDir;
use crate::qemu::{Nic, Vm, VmConfig};
use crate::report::{key_values, Ping};

use super::{Line, MIB};

/// Debian 13's cloud kernel, from a private apt sources list (the machine's own stay as they
/// are), with what the bare-metal host needs: the card's tap and namespace links, VDUSE with the
/// vdpa bus and its virtio driver, and virtio_net.
const SUITE: &str = "trixie";
const MIRROR: &str = "http://deb.debian.org/debian";
const MODULES: &[&str] = &[
    "tun",
    "veth",
    "vduse",
    "virtio_vdpa",
    "virtio_net",
    "vhost_vdpa",
];

/// Guest RAM: the payload in the initramfs and a received copy in /tmp, with room to spare.
const GUEST_MIB: u32 = 1536;

/// The VDUSE device and tap name, the card's namespace.
const CARD: &str = "card0";

/// Shell functions sourced before every guest command (the agent's own library, /lib/e2e.sh,
/// provides net helpers for eth0).
const LIB: &str = r#"
export PATH=/usr/local/sbin:/bin:/sbin:/usr/bin:/usr/sbin
# busybox's shell runs its own applets before PATH: iproute2 by full path.
ip() { /usr/local/sbin/ip "$@"; }
CARD=card0
NS=card
# card_start ARGS...: starts vhost-card --vduse with ARGS; its exit status goes to /run/vhc.rc.
card_start() {
    [ -e /run/vhc.env ] && . /run/vhc.env
    rm -f /run/vhc.rc /run/vhc.pid
    RUST_LOG=${VHC_LOG:-info} sh -c 'vhost-card --vduse $0 --netns card --tap $0 --control /run/vhc.ctl "$@" >> /run/vhc.log 2>&1 &
           echo $! > /run/vhc.pid; wait $!; echo $? > /run/vhc.rc' $CARD "$@" &
    n=0
    until [ -s /run/vhc.pid ]; do sleep 0.05; done
}
# wait_eth0_gone SECS / wait_host SECS: the host interface goes away / comes up with addresses.
wait_eth0_gone() {
    n=0
    while [ -e /sys/class/net/eth0 ]; do
        n=$((n + 1)); [ $n -gt $(($1 * 10)) ] && { echo "eth0 still there after $1 s"; return 1; }
        sleep 0.1
    done
}
wait_host() {
    n=0
    until [ -e /sys/class/net/eth0 ]; do
        n=$((n + 1))
        if [ $n -gt $(($1 * 10)) ]; then echo "no eth0 after $1 s"; tail -n 20 /run/vhc.log; return 1; fi
        if [ -e /run/vhc.rc ]; then echo "the daemon exited ($(cat /run/vhc.rc))"; tail -n 20 /run/vhc.log; return 1; fi
        sleep 0.1
    done
    echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
    ip addr add $GUEST4/24 dev eth0 2>/dev/null
    ip addr add $GUEST6/64 dev eth0 nodad 2>/dev/null
    ip link set eth0 up
    ip -n $NS addr add $CARD4/24 dev $CARD 2>/dev/null
    ip -n $NS addr add $CARD6/64 dev $CARD nodad 2>/dev/null
    ip -n $NS link set $CARD up
    n=0
    while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ]; do
        n=$((n + 1)); [ $n -gt 100 ] && { echo "eth0 has no carrier"; return 1; }
        sleep 0.1
    done
}
# card_stop SIGNAL: signals the daemon and prints its exit status.
card_stop() {
    kill -$1 $(cat /run/vhc.pid)
    n=0
    until [ -e /run/vhc.rc ]; do
        n=$((n + 1)); [ $n -gt 300 ] && { echo "the daemon did not exit"; return 1; }
        sleep 0.1
    done
    echo "rc=$(cat /run/vhc.rc)"
}
incard() { ip netns exec $NS "$@"; }
# now_cs: centiseconds since boot.
now_cs() { t=$(cut -d' ' -f1 /proc/uptime); echo "${t%.*}${t#*.}"; }
"#;

/// The private apt setup for the Debian 13 kernel, under target/vm/apt-trixie/.
fn kernel_source() -> Result<KernelSource> {
    let dir = crate::vm_dir().join(format!("apt-{SUITE}"));
    for sub in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let list = dir.join("sources.list");
    std::fs::write(
        &list,
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} {SUITE} main\n"
        ),
    )?;
    let opt = |k: &str, v: &Path| vec!["-o".to_string(), format!("{k}={}", v.display())];
    let mut apt_options = Vec::new();
    apt_options.extend(opt("Dir::Etc::SourceList", &list));
    apt_options.extend(opt("Dir::Etc::SourceParts", Path::new("/dev/null")));
    apt_options.extend(opt("Dir::State::Lists", &dir.join("lists")));
    apt_options.extend(opt("Dir::Cache", &dir.join("cache")));
    Ok(KernelSource {
        dir: "kernel-trixie",
        meta: "linux-image-cloud-amd64",
        modules: MODULES,
        apt_options,
    })
}

/// The bare-metal host: a VM with Debian 13's kernel, vhost-card, iproute2 and the agent.
pub struct Host {
    pub vm: Vm,
    pub kernel_package: String,
    pub accel: Accel,
    pub accel_why: String,
    pub payload: Payload,
    pub boot: Duration,
    _work: TempDir,
}

impl Host {
    /// Fetches and builds what is missing, boots the VM and waits for its agent.
    pub fn boot(
        payload_mib: usize,
        build: bool,
        accel: Option<Accel>,
        log_dir: &Path,
        echo: bool,
    ) -> Result<Host> {
        let src = kernel_source()?;
        let assets = crate::assets::ensure_source(&src, false)?;
        if build {
            crate::card::build()?;
        }
        if log_dir.exists() {
            std::fs::remove_dir_all(log_dir)?;
        }
        std::fs::create_dir_all(log_dir)?;
        let (accel, accel_why) = match accel {
            Some(a) => crate::accel::force(a),
            None => crate::accel::detect(&assets.kernel, &assets.initramfs, log_dir)?,
        };
        let payload = crate::payload::ensure(payload_mib * MIB)?;
        let work = TempDir::new("vhc-vduse")?;
        let initrd = work.path().join("initrd");
        let card = crate::card::binary();
        let ip = which("ip")?;
        let vdpa = which("vdpa")?;
        crate::guest::build_initrd_with(
            &assets.initramfs,
            Some(&payload.path),
            &[
                (&card, "/usr/local/sbin/vhost-card"),
                (&ip, "/usr/local/sbin/ip"),
                (&vdpa, "/usr/local/sbin/vdpa"),
            ],
            work.path(),
            &initrd,
        )?;
        let mut vm = Vm::start(&VmConfig {
            kernel: &assets.kernel,
            initrd: &initrd,
            nic: Nic::None,
            mac: "",
            mtu: 0,
            append: "",
            log_dir,
            run_dir: work.path(),
            echo,
            accel,
            memory_mib: GUEST_MIB,
            hotplug_port: false,
            agent: true,
            queues: 1,
        })?;
        let boot = vm.wait_agent(Duration::from_secs(240))?;
        let mut host = Host {
            vm,
            kernel_package: assets.kernel_package,
            accel,
            accel_why,
            payload,
            boot,
            _work: work,
        };
        host.check(
            "mount -t tmpfs tmpfs /run && mkdir -p /var && ln -sfn /run /var/run
             ip netns add $NS && ip -n $NS link set lo up",
            30,
        )?;
        Ok(host)
    }

    /// Runs `script` with [`LIB`] in the guest.
    pub fn sh(&mut self, script: &str, secs: u64) -> Result<crate::agent::Reply> {
        self.vm
            .sh(&format!("{LIB}\n{script}"), Duration::from_secs(secs))
    }

    /// As [`Host::sh`], failing unless it exits 0; returns the output.
    pub fn check(&mut self, script: &str, secs: u64) -> Result<String> {
        let r = self.sh(script, secs)?;
        if r.rc != 0 {
            bail!(
                "guest command `{}` failed ({}):\n{}",
                script.lines().next().unwrap_or("").trim(),
                r.rc,
                r.out.trim_end()
            );
        }
        Ok(r.out)
    }

    /// Starts the daemon with `args` and waits for the host interface with its addresses.
    pub fn start_card(&mut self, args: &str) -> Result<Duration> {
        let t0 = Instant::now();
        self.check(&format!("card_start {args}\nwait_host 30"), 60)?;
        Ok(t0.elapsed())
    }

    /// Sends `signal` to the daemon; returns its exit status.
    pub fn stop_card(&mut self, signal: &str) -> Result<i32> {
        let out = self.check(&format!("card_stop {signal}"), 60)?;
        key_values(&out)
            .get("rc")
            .and_then(|r| r.parse().ok())
            .context("no exit status")
    }

    /// The last `n` lines of the daemon's log.
    pub fn daemon_log(&mut self, n: usize) -> String {
        self.sh(&format!("tail -n {n} /run/vhc.log"), 10)
            .map(|r| r.out)
            .unwrap_or_default()
    }

    /// The daemon's counters (summed over queue pairs), from its control socket.
    pub fn stats(&mut self) -> Result<BTreeMap<String, u64>> {
        let out = self.check("vhost-card stats --control /run/vhc.ctl", 20)?;
        let v: serde_json::Value = serde_json::from_str(&out).context("stats JSON")?;
        let mut sums = BTreeMap::new();
        let pairs = v
            .get("pairs")
            .and_then(|p| p.as_array())
            .cloned()
            .unwrap_or_default();
        for pair in pairs {
            if let Some(obj) = pair.as_object() {
                for (k, v) in obj {
                    if let Some(n) = v.as_u64() {
                        *sums.entry(k.clone()).or_insert(0) += n;
                    }
                }
            }
        }
        Ok(sums)
    }

    /// The host interface as the guest sees it, and the daemon's offer.
    pub fn binding(&mut self) -> Result<Binding> {
        let out = self.check(
            "d=/sys/class/net/eth0
             echo mtu=$(cat $d/mtu)
             echo driver=$(basename $(readlink $d/device/driver))
             echo bus=$(basename $(readlink $d/device/subsystem))
             echo features=$(cat $d/device/features)
             echo vdpa_driver=$(basename $(readlink /sys/bus/vdpa/devices/$CARD/driver))
             echo offer=$(sed -n 's/.*offers features \\(0x[0-9a-f]*\\).*/\\1/p' /run/vhc.log | tail -n 1)",
            20,
        )?;
        let kv = key_values(&out);
        let get = |k: &str| kv.get(k).cloned().unwrap_or_default();
        let offer = get("offer");
        Ok(Binding {
            mtu: get("mtu").parse().ok(),
            driver: get("driver"),
            bus: get("bus"),
            vdpa_driver: get("vdpa_driver"),
            guest: crate::features::parse_sysfs(&get("features")),
            offered: u64::from_str_radix(offer.trim_start_matches("0x"), 16).ok(),
        })
    }

    /// Pings `count` times each way over IPv4 and IPv6: (label, result) pairs.
    pub fn pings(&mut self, count: u32) -> Result<Vec<(String, Ping)>> {
        let mut out = Vec::new();
        for (label, cmd) in [
            ("host→card IPv4", format!("ping -c {count} -W 5 $CARD4")),
            ("host→card IPv6", format!("ping -c {count} -W 5 $CARD6")),
            (
                "card→host IPv4",
                format!("incard ping -c {count} -W 5 $GUEST4"),
            ),
            (
                "card→host IPv6",
                format!("incard ping -c {count} -W 5 $GUEST6"),
            ),
        ] {
            let r = self.sh(&cmd, 60)?;
            out.push((label.to_string(), Ping::parse(&r.out)));
        }
        Ok(out)
    }

    /// `mib` MiB of the payload over TCP, host → card (`to_card`) or card → host: whether the
    /// bytes and sha256 are equal, and MB/s.
    pub fn transfer(&mut self, mib: usize, to_card: bool) -> Result<Transfer> {
        let (listen_in, send_in, dst, port) = if to_card {
            ("incard", "", "$CARD4", 5001)
        } else {
            ("", "incard", "$GUEST4", 5002)
        };
        let len = mib * MIB;
        // busybox nc sends a file; the receiver is the helper (busybox nc as a listener ends
        // its connection when its own input ends, and with an endless input, not at all).
        let source = if len == self.payload.data.len() {
            crate::guest::PAYLOAD.to_string()
        } else {
            format!("/tmp/tx-{mib}")
        };
        let prepare = if len == self.payload.data.len() {
            String::new()
        } else {
            format!(
                "[ -e {source} ] || head -c {len} {} > {source}",
                crate::guest::PAYLOAD
            )
        };
        let out = self.check(
            &format!(
                "rm -f /tmp/rx /tmp/rx.rc /tmp/rx.ready
                 {prepare}
                 ({listen_in} {helper} guest tcp-sink {port} /tmp/rx.ready > /tmp/rx; echo $? > /tmp/rx.rc) &
                 until [ -e /tmp/rx.ready ]; do sleep 0.05; done
                 t0=$(now_cs)
                 {send_in} nc {dst} {port} < {source} || echo send_failed=1
                 n=0
                 until [ -e /tmp/rx.rc ]; do
                     n=$((n + 1)); [ $n -gt 300 ] && {{ echo 'the receiver did not finish'; exit 1; }}
                     sleep 0.1
                 done
                 t1=$(now_cs)
                 echo ms=$(( (t1 - t0) * 10 ))
                 echo bytes=$(wc -c < /tmp/rx)
                 echo sha=$(sha256sum /tmp/rx | cut -d' ' -f1)
                 rm -f /tmp/rx",
                helper = crate::guest::HELPER,
            ),
            60 + (len / 200_000) as u64,
        )?;
        let kv = key_values(&out);
        let bytes: u64 = kv.get("bytes").and_then(|b| b.parse().ok()).unwrap_or(0);
        let ms: u64 = kv.get("ms").and_then(|b| b.parse().ok()).unwrap_or(0);
        let sha = kv.get("sha").cloned().unwrap_or_default();
        let expected = if len == self.payload.data.len() {
            self.payload.sha256.clone()
        } else {
            let mut h = crate::payload::Hasher::new()?;
            h.update(&self.payload.data[..len])?;
            h.finish()?
        };
        Ok(Transfer {
            ok: bytes == len as u64 && sha == expected && !kv.contains_key("send_failed"),
            bytes,
            mb_per_s: if ms > 0 {
                bytes as f64 / 1e6 / (ms as f64 / 1e3)
            } else {
                0.0
            },
        })
    }

    /// Sends `count` UDP datagrams from the card to the host, with right or wrong checksums;
    /// returns how many the host's stack delivered and how many it counted as checksum errors.
    pub fn udp_from_card(&mut self, count: u32, bad: bool) -> Result<(u64, u64)> {
        let out = self.check(
            &format!(
                "rm -f /tmp/udp.ready /tmp/udp.out
                 e0=$(snmp Udp InCsumErrors); d0=$(snmp Udp InDatagrams)
                 {helper} guest udp-count 6000 /tmp/udp.ready 5 > /tmp/udp.out 2>&1 &
                 until [ -e /tmp/udp.ready ]; do sleep 0.05; done
                 mac=$(cat /sys/class/net/eth0/address)
                 incard {helper} guest udp-frames $CARD $mac $CARD4 $GUEST4 6000 {count} {bad}
                 wait
                 cat /tmp/udp.out
                 echo csum_errors=$(( $(snmp Udp InCsumErrors) - e0 ))
                 echo datagrams=$(( $(snmp Udp InDatagrams) - d0 ))",
                helper = crate::guest::HELPER,
                bad = if bad { "bad" } else { "good" },
            ),
            60,
        )?;
        let kv = key_values(&out);
        let get = |k: &str| kv.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok((get("received"), get("csum_errors")))
    }
}

/// What the host's kernel made of the device.
pub struct Binding {
    pub mtu: Option<u32>,
    pub driver: String,
    pub bus: String,
    pub vdpa_driver: String,
    pub guest: Option<u64>,
    pub offered: Option<u64>,
}

impl Binding {
    pub fn ok(&self, mtu: u32) -> bool {
        self.mtu == Some(mtu)
            && self.driver == "virtio_net"
            && self.vdpa_driver == "virtio_vdpa"
            && self.guest.is_some()
            && self.guest == self.offered
    }

    pub fn describe(&self) -> String {
        format!(
            "driver {} on the {} bus (vdpa: {}), MTU {}, features {} (offered {})",
            self.driver,
            self.bus,
            self.vdpa_driver,
            self.mtu.map_or("?".into(), |m| m.to_string()),
            self.guest.map_or("?".into(), crate::features::describe),
            if self.guest.is_some() && self.guest == self.offered {
                "the same".to_string()
            } else {
                self.offered.map_or("?".into(), |o| format!("{o:#x}"))
            }
        )
    }
}

pub struct Transfer {
    pub ok: bool,
    pub bytes: u64,
    pub mb_per_s: f64,
}

impl Transfer {
    pub fn describe(&self) -> String {
        if self.ok {
            format!("{:.1} MB/s, sha256 equal", self.mb_per_s)
        } else {
            format!("{} bytes, sha256 differs", self.bytes)
        }
    }
}

fn which(program: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(program);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{program} not found (apt-get install iproute2)")
}

fn line(number: u32, name: &str, result: Result<(bool, String)>) -> Line {
    super::verdict(number, name, result)
}

/// `cargo xtask e2e --vduse`.
pub fn run(opts: &super::Options) -> Result<()> {
    let t0 = Instant::now();
    let logs = crate::vm_dir().join("logs/e2e-vduse");
    let mut host = Host::boot(opts.mib, !opts.no_build, opts.accel, &logs, opts.verbose)?;
    println!(
        "e2e --vduse: {} under {} ({}), up in {:.1} s; logs in {}",
        host.kernel_package,
        host.accel.name(),
        host.accel_why,
        host.boot.as_secs_f64(),
        logs.display()
    );
    let mut lines = Vec::new();
    let mut record = |l: Line| {
        l.print();
        lines.push(l);
    };
    let wanted = |n: u32| opts.only.is_empty() || opts.only.contains(&n);
    if wanted(1) {
        record(line(1, "errors", missing_module(&mut host)));
    }
    if let Ok(level) = std::env::var("VHC_LOG") {
        host.check(
            &format!("echo 'VHC_LOG={level}; export VHC_LOG' > /run/vhc.env"),
            10,
        )?;
    }
    let up = host.start_card("");
    let up_ok = up.is_ok();
    record(line(
        2,
        "binding",
        up.and_then(|t| {
            let b = host.binding()?;
            Ok((
                b.ok(super::DEFAULT_MTU),
                format!(
                    "host interface up {:.1} s after start; {}",
                    t.as_secs_f64(),
                    b.describe()
                ),
            ))
        }),
    ));
    // Debugging aid: VHC_VDUSE_SCRIPT=FILE runs FILE in the guest once the card is up.
    if let (true, Some(file)) = (up_ok, std::env::var_os("VHC_VDUSE_SCRIPT")) {
        let script = std::fs::read_to_string(&file)?;
        let r = host.sh(&script, 600)?;
        println!("VHC_VDUSE_SCRIPT exit {}:\n{}", r.rc, r.out);
    }
    if up_ok {
        if wanted(3) {
            record(line(3, "ping", pings(&mut host)));
        }
        if wanted(4) {
            record(line(4, "traffic", traffic(&mut host, opts.mib)));
        }
        if wanted(5) {
            record(line(5, "checksum honesty", csum_honesty(&mut host)));
        }
        if wanted(6) {
            let mib = super::matrix_mib(opts).min(16);
            record(line(6, "toggles", toggles(&mut host, mib)));
        }
        if wanted(7) {
            record(line(7, "lifecycle", lifecycle(&mut host)));
        }
        if wanted(8) {
            record(line(8, "kernel limits", limits(&mut host)));
        }
        if wanted(9) {
            record(line(9, "vdpa binding", vdpa_binding(&mut host)));
        }
    }
    let _ = host.sh("[ -e /run/vhc.rc ] || card_stop TERM", 60);
    if let Ok(r) = host.sh("cat /run/vhc.log", 60) {
        std::fs::write(logs.join("daemon.log"), r.out).ok();
    }
    if lines.iter().any(|l| !l.pass) {
        println!("daemon log (last lines):\n{}", host.daemon_log(40));
    }
    host.vm.shutdown().ok();
    super::summary(
        &format!(
            "cargo xtask e2e --vduse: {} under {}, {:.0} s",
            host.kernel_package,
            host.accel.name(),
            t0.elapsed().as_secs_f64()
        ),
        &mut lines,
        "VDUSE check(s)",
    )
}

/// Without the vduse module the daemon says which module is missing and exits 1.
fn missing_module(host: &mut Host) -> Result<(bool, String)> {
    let out = host.check(
        "rmmod vduse
         vhost-card --vduse probe --netns $NS --tap probe0 > /tmp/err.log 2>&1; echo rc=$?
         tail -n 1 /tmp/err.log | sed 's/^/message=/'
         insmod /lib/modules/vduse.ko",
        30,
    )?;
    let kv = key_values(&out);
    let rc = kv.get("rc").cloned().unwrap_or_default();
    let msg = kv.get("message").cloned().unwrap_or_default();
    Ok((
        rc == "1" && msg.contains("modprobe vduse"),
        format!("no vduse module: exit status {rc}, \"{msg}\""),
    ))
}

fn pings(host: &mut Host) -> Result<(bool, String)> {
    let p = host.pings(3)?;
    let ok = p.iter().all(|(_, p)| p.ok());
    let text = p
        .iter()
        .map(|(l, p)| match (p.ok(), p.avg()) {
            (true, Some(avg)) => format!("{l} {avg} ms"),
            _ => format!("{l} {}", p.describe()),
        })
        .collect::<Vec<_>>()
        .join(", ");
    Ok((ok, text))
}

fn traffic(host: &mut Host, mib: usize) -> Result<(bool, String)> {
    let up = host.transfer(mib, true)?;
    let down = host.transfer(mib, false)?;
    Ok((
        up.ok && down.ok,
        format!(
            "{mib} MiB host→card {}; card→host {}",
            up.describe(),
            down.describe()
        ),
    ))
}

fn csum_honesty(host: &mut Host) -> Result<(bool, String)> {
    let before = host.stats()?;
    let (bad_rx, bad_err) = host.udp_from_card(5, true)?;
    let (good_rx, good_err) = host.udp_from_card(5, false)?;
    let after = host.stats()?;
    let delta = |k: &str| after.get(k).unwrap_or(&0) - before.get(k).unwrap_or(&0);
    let ok = bad_rx == 0 && bad_err == 5 && good_rx == 5 && good_err == 0;
    Ok((
        ok,
        format!(
            "5 wrong: {bad_rx} delivered, {bad_err} InCsumErrors; 5 right: {good_rx} delivered, \
             {good_err} InCsumErrors; card counted {} bad, {} verified",
            delta("rx_csum_bad"),
            delta("rx_csum_verified")
        ),
    ))
}

/// Two configurations, each on a fresh daemon: the bits and MTU follow, traffic passes.
fn toggles(host: &mut Host, mib: usize) -> Result<(bool, String)> {
    let mut ok = true;
    let mut parts = Vec::new();
    for (args, mtu, off) in [
        ("--disable mrg-rxbuf", 65520u32, Some(15u32)),
        ("--mtu 1500", 1500, None),
    ] {
        let rc = host.stop_card("TERM")?;
        host.check("wait_eth0_gone 20", 30)?;
        host.start_card(args)?;
        let b = host.binding()?;
        let bit_ok = off.is_none_or(|bit| b.guest.is_some_and(|g| g & 1 << bit == 0));
        let p = host.pings(2)?;
        let up = host.transfer(mib, true)?;
        let down = host.transfer(mib, false)?;
        let this =
            rc == 0 && b.ok(mtu) && bit_ok && p.iter().all(|(_, p)| p.ok()) && up.ok && down.ok;
        ok &= this;
        parts.push(format!(
            "[{args}: {} MTU {}, {mib} MiB up {} down {}{}]",
            if bit_ok {
                "bits follow,"
            } else {
                "bits WRONG,"
            },
            b.mtu.unwrap_or(0),
            up.describe(),
            down.describe(),
            if this { "" } else { " FAILED" }
        ));
    }
    Ok((ok, parts.join(" ")))
}

/// A second daemon on the same name is refused; SIGTERM takes the interface and the device
/// away and a new daemon brings them back; SIGKILL leaves them, and the restarted daemon takes
/// the device back.
fn lifecycle(host: &mut Host) -> Result<(bool, String)> {
    // Back to the defaults first.
    let rc = host.stop_card("TERM")?;
    host.check("wait_eth0_gone 20", 30)?;
    let gone = host.check(
        "[ -e /dev/vduse/$CARD ] && echo dev=present || echo dev=gone",
        10,
    )?;
    let removed = rc == 0 && gone.contains("dev=gone");
    let t = host.start_card("")?;
    let second = host.check(
        "vhost-card --vduse $CARD --netns $NS --tap other0 > /tmp/second.log 2>&1; echo rc=$?
         tail -n 1 /tmp/second.log | sed 's/^/message=/'",
        30,
    )?;
    let kv = key_values(&second);
    let refused = kv.get("rc").map(String::as_str) == Some("1")
        && kv.get("message").is_some_and(|m| m.contains("in use"));
    let ifindex = host.check("cat /sys/class/net/eth0/ifindex", 10)?;
    // Crash: the device and the interface stay; the restarted daemon takes the device back.
    let killed = host.stop_card("KILL")?;
    host.check("sleep 1; [ -e /sys/class/net/eth0 ]", 10)?;
    host.start_card("")?;
    let ifindex_after = host.check("cat /sys/class/net/eth0/ifindex", 10)?;
    let log = host.daemon_log(30);
    let taken_back = log.contains("taken back");
    let p = host.pings(2)?;
    let pinged = p.iter().all(|(_, p)| p.ok());
    let up = host.transfer(4, true)?;
    let down = host.transfer(4, false)?;
    // Crash again, and restart with another MTU: the device left is not the one this daemon
    // would create, so it is taken apart and created again, and the host sees the new MTU.
    let killed_again = host.stop_card("KILL")?;
    host.check("sleep 1; [ -e /sys/class/net/eth0 ]", 10)?;
    host.check(
        "old=$(cat /sys/class/net/eth0/ifindex)
         card_start --mtu 9000
         n=0
         while [ \"$(cat /sys/class/net/eth0/ifindex 2>/dev/null)\" = \"$old\" ]; do
             n=$((n + 1)); [ $n -gt 300 ] && { echo 'eth0 was not replaced'; exit 1; }
             sleep 0.1
         done
         wait_host 30",
        90,
    )?;
    let recreated = host
        .daemon_log(30)
        .contains("created again (it was created with another");
    let mtu_after = host.binding()?.mtu;
    let p2 = host.pings(2)?.iter().all(|(_, p)| p.ok());
    host.stop_card("TERM")?;
    host.check("wait_eth0_gone 20", 30)?;
    host.start_card("")?;
    let recreate_ok = killed_again == 137 && recreated && mtu_after == Some(9000) && p2;
    let ok = removed
        && refused
        && killed == 137
        && taken_back
        && ifindex.trim() == ifindex_after.trim()
        && pinged
        && up.ok
        && down.ok
        && recreate_ok;
    Ok((
        ok,
        format!(
            "SIGTERM: exit {rc}, eth0 and /dev/vduse/{CARD} {}; restart: eth0 back in {:.1} s; \
             second daemon: {}; SIGKILL then restart: {}, eth0 {}, ping {}, 4 MiB up {} down {}; \
             SIGKILL then restart with --mtu 9000: {}",
            if removed { "removed" } else { "NOT removed" },
            t.as_secs_f64(),
            if refused {
                "refused (in use)"
            } else {
                "NOT refused"
            },
            if taken_back {
                "device taken back"
            } else {
                "device NOT taken back"
            },
            if ifindex.trim() == ifindex_after.trim() {
                "kept"
            } else {
                "replaced"
            },
            if pinged { "ok" } else { "FAILED" },
            up.describe(),
            down.describe(),
            if recreate_ok {
                "device destroyed and created again, eth0 back at MTU 9000, ping ok".to_string()
            } else {
                format!("FAILED (recreated: {recreated}, MTU {mtu_after:?}, ping {p2})")
            }
        ),
    ))
}

/// `cargo xtask demo --vduse`.
pub struct DemoOptions {
    pub mtu: u32,
    pub disable: String,
    pub mib: usize,
    pub accel: Option<Accel>,
    pub build: bool,
    pub verbose: bool,
}

pub fn demo(opts: &DemoOptions) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo needs root (VM assets, QEMU)");
    }
    let t0 = Instant::now();
    let logs = crate::vm_dir().join("logs/demo-vduse");
    println!(
        "demo --vduse: preparing (host packages, Debian 13 kernel, initramfs, daemon build) ..."
    );
    let mut host = Host::boot(opts.mib, opts.build, opts.accel, &logs, opts.verbose)?;
    let setup = t0.elapsed();
    let table = crate::card::feature_table()?;
    println!(
        "demo --vduse: {} up under {} in {:.1} s; starting the card",
        host.kernel_package,
        host.accel.name(),
        host.boot.as_secs_f64()
    );
    let t_vm = Instant::now();
    let mut args = format!("--mtu {}", opts.mtu);
    if !opts.disable.is_empty() {
        args += &format!(" --disable {}", opts.disable);
    }
    let up_in = host.start_card(&args)?;
    let b = host.binding()?;
    let pings = host.pings(3)?;
    println!("demo --vduse: sending {} MiB over TCP each way", opts.mib);
    let to_card = host.transfer(opts.mib, true)?;
    let to_host = host.transfer(opts.mib, false)?;
    let stats = host.stats()?;
    let rc = host.stop_card("TERM")?;
    let gone = host.check(
        "wait_eth0_gone 20; [ -e /dev/vduse/$CARD ] && echo dev=present || echo dev=gone",
        30,
    )?;
    let cleaned = rc == 0 && gone.contains("dev=gone");
    if let Ok(r) = host.sh("cat /run/vhc.log", 60) {
        std::fs::write(logs.join("daemon.log"), r.out).ok();
    }
    host.vm.shutdown().ok();
    let vm_time = t_vm.elapsed();

    let guest = b.guest.unwrap_or(0);
    let offered = b.offered.unwrap_or(0);
    println!();
    println!("==== vhost-card demo: the card as a VDUSE device of the host's own kernel ====");
    println!("card        vhost-card --vduse {CARD} --netns card --tap {CARD} {args}");
    println!(
        "            in network namespace card with {}/24 and {}/64 on {CARD}",
        crate::card::CARD4,
        crate::card::CARD6
    );
    println!(
        "host        {} ({} VM playing the bare-metal host): /dev/vduse/{CARD} -> vdpa device \
         {CARD} -> {} -> {} eth0, up {:.1} s after the daemon started",
        host.kernel_package,
        host.accel.name(),
        b.vdpa_driver,
        b.driver,
        up_in.as_secs_f64()
    );
    println!();
    println!("negotiated features (offered by the card, taken by the host's virtio_net):");
    println!(
        "  {:<16} {:>3}  {:<19} {:<8} {:<8}",
        "card name", "bit", "virtio name", "offered", "acked"
    );
    let mut rows: Vec<(String, u32)> = table.into_iter().collect();
    // The transport's own bits: the device gives the host its MAC, and VDUSE requires
    // ACCESS_PLATFORM (every buffer goes through the device's IOTLB).
    rows.push(("(vduse: mac)".into(), 5));
    rows.push(("(vduse: iommu)".into(), 33));
    rows.sort_by_key(|(_, bit)| *bit);
    for (name, bit) in rows {
        println!(
            "  {:<16} {:>3}  {:<19} {:<8} {:<8}",
            name,
            bit,
            crate::features::name(bit),
            crate::demo::yes(offered & 1 << bit != 0),
            crate::demo::yes(guest & 1 << bit != 0)
        );
    }
    println!(
        "  the host's word {guest:#x} {} the card's offer {offered:#x}",
        if guest == offered {
            "equals"
        } else {
            "DIFFERS FROM"
        }
    );
    println!();
    println!(
        "MTU         host eth0 reads {} (card --mtu {}), driver {}",
        b.mtu.map_or("?".into(), |m| m.to_string()),
        opts.mtu,
        b.driver
    );
    for (label, p) in &pings {
        println!("ping        {label} {}", p.describe());
    }
    println!(
        "transfer    host → card {} MiB TCP: {}",
        opts.mib,
        to_card.describe()
    );
    println!(
        "transfer    card → host {} MiB TCP: {}",
        opts.mib,
        to_host.describe()
    );
    let counters: Vec<String> = stats
        .iter()
        .filter(|(_, v)| **v != 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("counters    {}", counters.join(" "));
    println!(
        "daemon      SIGTERM: exit {rc}; host interface and /dev/vduse/{CARD} {}",
        if cleaned { "removed" } else { "NOT removed" }
    );
    println!(
        "timing      set-up {:.1} s, VM and tests {:.1} s, total {:.1} s",
        setup.as_secs_f64(),
        vm_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    println!("logs        {}", logs.display());
    let pass =
        b.ok(opts.mtu) && pings.iter().all(|(_, p)| p.ok()) && to_card.ok && to_host.ok && cleaned;
    if !pass {
        println!("RESULT: FAIL");
        bail!("the demo found a problem (see above)");
    }
    println!("RESULT: PASS");
    Ok(())
}

/// What this kernel's VDUSE and virtio_net take: feature bits, several queue pairs, the largest
/// MTU.
fn limits(host: &mut Host) -> Result<(bool, String)> {
    let probe = host.check(&format!("{} guest vduse-probe", crate::guest::HELPER), 60)?;
    let kv = key_values(&probe);
    let refused = kv.get("refused").cloned().unwrap_or_default();
    let required = kv.get("required").cloned().unwrap_or_default();
    let mq = host.check(
        "vhost-card --vduse mq0 --netns $NS --tap mq0 --queues 2 > /tmp/mq.log 2>&1; echo rc=$?
         tail -n 1 /tmp/mq.log | sed 's/^/message=/'",
        30,
    )?;
    let mq = key_values(&mq);
    let mq_refused = mq.get("rc").map(String::as_str) == Some("1")
        && mq.get("message").is_some_and(|m| m.contains("CTRL_VQ"));
    host.stop_card("TERM")?;
    host.check("wait_eth0_gone 20", 30)?;
    host.start_card("--mtu 65535")?;
    let b = host.binding()?;
    let big = host.sh(
        "ping -c 2 -W 5 -s 65000 $CARD4 && incard ping -c 2 -W 5 -s 65000 $GUEST4",
        60,
    )?;
    host.stop_card("TERM")?;
    host.check("wait_eth0_gone 20", 30)?;
    host.start_card("")?;
    let ok = refused == "17:CTRL_VQ"
        && required.contains("ACCESS_PLATFORM")
        && mq_refused
        && b.mtu == Some(65535)
        && big.rc == 0;
    Ok((
        ok,
        format!(
            "VDUSE refuses {refused} on top of the offer and requires {required}; --queues 2 {}; \
             MTU 65535: host reads {}, 65000-byte pings both ways {}",
            if mq_refused {
                "refused (needs CTRL_VQ)"
            } else {
                "NOT refused"
            },
            b.mtu.map_or("?".into(), |m| m.to_string()),
            if big.rc == 0 { "pass" } else { "FAIL" }
        ),
    ))
}

/// The vdpa device made by the user (`--vduse-bind none`), and bound to vhost_vdpa.
fn vdpa_binding(host: &mut Host) -> Result<(bool, String)> {
    host.stop_card("TERM")?;
    host.check("wait_eth0_gone 20", 30)?;
    host.check(
        "card_start --vduse-bind none
         until [ -e /dev/vduse/$CARD ]; do sleep 0.1; done; sleep 1",
        30,
    )?;
    let before = host.check(
        "[ -e /sys/class/net/eth0 ] && echo eth0=yes || echo eth0=no",
        10,
    )?;
    let t = Instant::now();
    host.check("vdpa dev add name $CARD mgmtdev vduse && wait_host 30", 60)?;
    let added = t.elapsed();
    let user_ok = before.contains("eth0=no") && host.binding()?.ok(super::DEFAULT_MTU);
    let pinged = host.pings(2)?.iter().all(|(_, p)| p.ok());
    let rc = host.stop_card("TERM")?;
    let gone = host.check(
        "wait_eth0_gone 20; [ -e /dev/vduse/$CARD ] && echo dev=present || echo dev=gone",
        30,
    )?;
    let user_cleaned = rc == 0 && gone.contains("dev=gone");
    let vhost = host.check(
        "card_start --vduse-bind vhost
         n=0; until [ -e /sys/bus/vdpa/devices/$CARD/driver ]; do n=$((n + 1)); [ $n -gt 300 ] && break; sleep 0.1; done
         sleep 1
         echo driver=$(basename $(readlink /sys/bus/vdpa/devices/$CARD/driver))
         echo chardev=$(ls /sys/bus/vdpa/devices/$CARD/ | grep vhost-vdpa)
         [ -e /sys/class/net/eth0 ] && echo eth0=yes || echo eth0=no",
        60,
    )?;
    let kv = key_values(&vhost);
    let chardev = kv.get("chardev").cloned().unwrap_or_default();
    let vhost_ok = kv.get("driver").map(String::as_str) == Some("vhost_vdpa")
        && chardev.starts_with("vhost-vdpa-")
        && kv.get("eth0").map(String::as_str) == Some("no");
    let rc2 = host.stop_card("TERM")?;
    host.check("[ ! -e /dev/vduse/$CARD ]", 10)?;
    host.start_card("")?;
    let ok = user_ok && pinged && user_cleaned && vhost_ok && rc2 == 0;
    Ok((
        ok,
        format!(
            "--vduse-bind none: no interface until `vdpa dev add name {CARD} mgmtdev vduse`, then \
             eth0 in {:.1} s, virtio_net, pings {}, SIGTERM {}; --vduse-bind vhost: driver {}, \
             /dev/{chardev}, no host interface",
            added.as_secs_f64(),
            if pinged { "pass" } else { "FAIL" },
            if user_cleaned {
                "removed it all"
            } else {
                "did NOT clean up"
            },
            kv.get("driver").cloned().unwrap_or_default(),
        ),
    ))
}

/// Guest helper: which feature bits the kernel's VDUSE refuses on top of the card's default
/// offer, and which of the offer it requires (each tried with VDUSE_CREATE_DEV).
pub fn probe_features() -> Result<()> {
    use vhost_card::vduse::{device, netcfg, uapi};
    let control = device::open_control()?;
    let base = vhost_card::vduse::offer(vhost_card::features::default_features());
    let config = netcfg::NetConfig {
        mac: [2, 0, 0, 0, 0, 1],
        status: netcfg::STATUS_LINK_UP,
        max_virtqueue_pairs: 1,
        mtu: 1500,
    }
    .encode();
    let try_create = |features: u64| -> bool {
        let name = format!("probe{}", std::process::id());
        let cfg = uapi::DevConfig {
            name: uapi::name_bytes(&name),
            vendor_id: 0,
            device_id: 1,
            features,
            vq_num: 2,
            vq_align: 4096,
            reserved: [0; 13],
            config_size: 0,
        };
        let ok = uapi::create_dev(&control, &cfg, &config).is_ok();
        if ok {
            let _ = uapi::destroy_dev(&control, &name);
        }
        ok
    };
    if !try_create(base) {
        bail!("the kernel refuses the card's own offer {base:#x}");
    }
    let refused: Vec<String> = (0..64)
        .filter(|b| base & 1u64 << b == 0 && !try_create(base | 1u64 << b))
        .map(|b| format!("{b}:{}", crate::features::name(b)))
        .collect();
    let required: Vec<String> = (0..64)
        .filter(|b| base & 1u64 << b != 0 && !try_create(base & !(1u64 << b)))
        .map(|b| format!("{b}:{}", crate::features::name(b)))
        .collect();
    println!("refused={}", refused.join(","));
    println!("required={}", required.join(","));
    Ok(())
}

/// Guest helper: one TCP connection on `port`, copied to standard output.
pub fn tcp_sink(port: u16, ready: &Path) -> Result<()> {
    let listener = std::net::TcpListener::bind(std::net::SocketAddrV6::new(
        std::net::Ipv6Addr::UNSPECIFIED,
        port,
        0,
        0,
    ))
    .or_else(|_| {
        std::net::TcpListener::bind(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::UNSPECIFIED,
            port,
        ))
    })?;
    std::fs::write(ready, b"")?;
    let (mut conn, _) = listener.accept()?;
    let stdout = std::io::stdout();
    std::io::copy(&mut conn, &mut stdout.lock())?;
    Ok(())
}

/// Guest helper: counts the datagrams arriving on `port` until `quiet` passes without one.
pub fn udp_count(port: u16, ready: &Path, quiet: Duration) -> Result<()> {
    let sock = std::net::UdpSocket::bind(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::UNSPECIFIED,
        port,
    ))?;
    sock.set_read_timeout(Some(quiet))?;
    std::fs::write(ready, b"")?;
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while sock.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    println!("received={n}");
    Ok(())
}

/// Guest helper: `count` UDP datagrams as raw frames on `dev`, with a wrong UDP checksum when
/// `bad` (the IP header stays right, so only the UDP check can catch them).
pub fn udp_frames(
    dev: &str,
    dst_mac: &str,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    port: u16,
    count: u32,
    bad: bool,
) -> Result<()> {
    let mac = |s: &str| -> Result<[u8; 6]> {
        let v: Vec<u8> = s
            .trim()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16))
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad MAC {s}"))?;
        v.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s}"))
    };
    let src_mac = mac(&std::fs::read_to_string(format!(
        "/sys/class/net/{dev}/address"
    ))?)?;
    let dst_mac = mac(dst_mac)?;
    let payload = b"vhost-card checksum honesty";
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(40000, port)
        .write(&mut frame, payload)
        .context("building the frame")?;
    if bad {
        // Ethernet 14 + IPv4 20, then the UDP checksum at offset 6; never 0 (which means "no
        // checksum" over IPv4).
        let at = 14 + 20 + 6;
        let wrong = (u16::from_be_bytes([frame[at], frame[at + 1]]) ^ 0x5a5a).max(1);
        frame[at..at + 2].copy_from_slice(&wrong.to_be_bytes());
    }
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {dev}");
    }
    // SAFETY: plain socket(2); the result is checked and closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = i32::try_from(ifindex)?;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst_mac);
    let mut result = Ok(());
    for _ in 0..count {
        // SAFETY: sends `frame` (valid for its length) to the address above, both outliving the
        // call.
        let n = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            result = Err(anyhow::anyhow!(
                "sendto: {}",
                std::io::Error::last_os_error()
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: closes the socket opened above.
    unsafe { libc::close(fd) };
    result
}
