//! The VM playing the bare-metal host: Debian 13's kernel from a private apt sources list, the
//! host's vhost-card, iproute2 and the agent in its initramfs, and what the checks do in it
//! (start and stop the daemon, read the binding, ping, move TCP payloads, send UDP frames).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vhost_card::stats::Snapshot;

use crate::accel::Accel;
use crate::assets::KernelSource;
use crate::e2e::MIB;
use crate::payload::Payload;
use crate::process::TempDir;
use crate::qemu::{Nic, Vm, VmConfig};
use crate::report::{key_values, Ping};

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
pub const CARD: &str = "card0";

/// Shell functions sourced before every guest command (the agent's own library, /lib/e2e.sh,
/// provides net helpers for eth0).
const LIB: &str = r#"
export PATH=/usr/local/sbin:/bin:/sbin:/usr/bin:/usr/sbin
# busybox's shell runs its own applets before PATH: iproute2 by full path.
ip() { /usr/local/sbin/ip "$@"; }
CARD=card0
NS=card
# daemon_start ARGS...: starts vhost-card ARGS; its exit status goes to /run/vhc.rc.
daemon_start() {
    [ -e /run/vhc.env ] && . /run/vhc.env
    rm -f /run/vhc.rc /run/vhc.pid
    RUST_LOG=${VHC_LOG:-info} sh -c 'vhost-card "$@" >> /run/vhc.log 2>&1 &
           echo $! > /run/vhc.pid; wait $!; echo $? > /run/vhc.rc' vhost-card "$@" &
    until [ -s /run/vhc.pid ]; do sleep 0.05; done
}
# card_start ARGS...: vhost-card --vduse with ARGS, counters on /run/vhc.ctl and metrics on
# 127.0.0.1:10046.
card_start() {
    daemon_start --vduse $CARD --netns $NS --tap $CARD --control /run/vhc.ctl --metrics-listen "$@"
}
# card_start_file: vhost-card --config /run/card.toml (card "card": namespace card).
card_start_file() { daemon_start --config /run/card.toml; }
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
        rig::image::build_initrd_with(
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
    pub fn sh(&mut self, script: &str, secs: u64) -> Result<rig::agent::Reply> {
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

    /// Starts the daemon from a card file, /run/card.toml with `text` (the card "card", whose
    /// namespace is the one the checks use), and waits for the host interface.
    pub fn start_card_file(&mut self, text: &str) -> Result<Duration> {
        let t0 = Instant::now();
        self.check(
            &format!("cat > /run/card.toml <<'EOF'\n{text}EOF\ncard_start_file\nwait_host 30"),
            60,
        )?;
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

    /// SIGTERM to the daemon; returns its exit status and whether the host interface and
    /// /dev/vduse/$CARD went away with it.
    pub fn stop_card_and_wait_gone(&mut self) -> Result<(i32, bool)> {
        let rc = self.stop_card("TERM")?;
        let gone = self.check(
            "wait_eth0_gone 20 && echo eth0=gone
             [ -e /dev/vduse/$CARD ] && echo dev=present || echo dev=gone",
            30,
        )?;
        Ok((rc, gone.contains("eth0=gone") && gone.contains("dev=gone")))
    }

    /// Runs `vhost-card ARGS` expecting a refusal; returns its exit status and the last line
    /// it printed (the error).
    pub fn refusal(&mut self, args: &str) -> Result<(String, String)> {
        let out = self.check(
            &format!(
                "vhost-card {args} > /tmp/refusal.log 2>&1; echo rc=$?
                 tail -n 1 /tmp/refusal.log | sed 's/^/message=/'"
            ),
            30,
        )?;
        let kv = key_values(&out);
        let field = |k: &str| kv.get(k).cloned().unwrap_or_default();
        Ok((field("rc"), field("message")))
    }

    /// The last `n` lines of the daemon's log.
    pub fn daemon_log(&mut self, n: usize) -> String {
        self.sh(&format!("tail -n {n} /run/vhc.log"), 10)
            .map(|r| r.out)
            .unwrap_or_default()
    }

    /// The daemon's state and counters (`vhost-card stats --json`), from its control socket.
    pub fn stats(&mut self) -> Result<Snapshot> {
        let out = self.check("vhost-card stats --control /run/vhc.ctl --json", 20)?;
        Snapshot::parse(&out).context("vhost-card stats --json")
    }

    /// `GET /metrics` from the daemon started by `card_start` (busybox wget).
    pub fn scrape(&mut self) -> Result<String> {
        self.check("wget -q -O - http://127.0.0.1:10046/metrics", 20)
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
        // At most the payload (a short run's --mib may be smaller than a check's transfer).
        let len = (mib * MIB).min(self.payload.data.len());
        // busybox nc sends a file; the receiver is the helper (busybox nc as a listener ends
        // its connection when its own input ends, and with an endless input, not at all).
        let source = if len == self.payload.data.len() {
            crate::guest::PAYLOAD.to_string()
        } else {
            format!("/tmp/tx-{len}")
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
    card_os::prereq::find(program)
        .with_context(|| format!("{program} not found on PATH (apt-get install iproute2)"))
}
