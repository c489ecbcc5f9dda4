//! A test rig: the card (namespace + daemon) and a VM whose virtio-net NIC
//! it serves, with the guest agent up; plus what the scenarios do with it
//! (feature check, pings, bulk transfers). Shared by `e2e` and `demo`.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::accel::Accel;
use crate::card::{self, Card, CardConfig};
use crate::features;
use crate::nsnet::{self, Progress, Transfer};
use crate::payload::{Hasher, Payload};
use crate::process::TempDir;
use crate::qemu::{Nic, Vm, VmConfig};
use crate::report::{key_values, Ping};

/// What every rig of a run shares.
pub struct Env {
    pub kernel: PathBuf,
    pub kernel_package: String,
    /// `uname -r` of the kernel and its virtio-net modules (.ko files).
    pub kernel_release: String,
    pub modules: Vec<PathBuf>,
    /// The e2e initramfs (agent, helper, payload).
    pub initrd: PathBuf,
    pub accel: Accel,
    pub accel_why: String,
    pub payload: Payload,
    pub payload_arc: Arc<Vec<u8>>,
    /// `vhost-card features`: name -> bit.
    pub table: BTreeMap<String, u32>,
    /// Logs of each rig go to a directory under this one.
    pub logs: PathBuf,
    pub echo: bool,
    /// SHA-256 of payload prefixes, by length.
    prefix_sums: std::sync::Mutex<BTreeMap<usize, String>>,
    _work: TempDir,
}

/// Guest RAM: the payload lives in the initramfs and a received copy in
/// /tmp, with room to spare.
pub const GUEST_MIB: u32 = 1024;

impl Env {
    /// Assets, daemon build, accelerator probe, payload and the e2e initramfs.
    pub fn prepare(
        payload_size: usize,
        build: bool,
        accel: Option<Accel>,
        logs: &Path,
        echo: bool,
    ) -> Result<Env> {
        let assets = crate::assets::ensure(&crate::assets::Options { refresh: false })?;
        if build {
            card::build()?;
        }
        std::fs::create_dir_all(logs)?;
        let (accel, accel_why) = match accel {
            Some(a) => crate::accel::force(a),
            None => crate::accel::detect(&assets.kernel, &assets.initramfs, logs)?,
        };
        let payload = crate::payload::ensure(payload_size)?;
        let work = TempDir::new("vhost-card-e2e-work")?;
        let initrd = work.path().join("initrd");
        crate::image::build_initrd(&assets.initramfs, Some(&payload.path), work.path(), &initrd)?;
        let table = card::feature_table()?;
        Ok(Env {
            kernel: assets.kernel,
            kernel_package: assets.kernel_package,
            kernel_release: assets.release,
            modules: assets.modules,
            initrd,
            accel,
            accel_why,
            payload_arc: Arc::new(payload.data.clone()),
            payload,
            table,
            logs: logs.to_path_buf(),
            echo,
            prefix_sums: Default::default(),
            _work: work,
        })
    }

    /// The first `len` bytes of the payload, to send.
    pub fn prefix(&self, len: usize) -> Arc<Vec<u8>> {
        if len == self.payload_arc.len() {
            self.payload_arc.clone()
        } else {
            Arc::new(self.payload_arc[..len].to_vec())
        }
    }

    /// SHA-256 of the first `len` bytes of the payload.
    pub fn sha_prefix(&self, len: usize) -> Result<String> {
        if len == self.payload.data.len() {
            return Ok(self.payload.sha256.clone());
        }
        let mut sums = self.prefix_sums.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sum) = sums.get(&len) {
            return Ok(sum.clone());
        }
        let mut hasher = Hasher::new()?;
        hasher.update(&self.payload.data[..len])?;
        let sum = hasher.finish()?;
        sums.insert(len, sum.clone());
        Ok(sum)
    }
}

/// Where the NIC comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Plug {
    /// `-netdev vhost-user` on the command line.
    Boot,
    /// No NIC at boot; a PCIe root port `rp1` to hot-plug one into.
    Later,
}

/// Field order is drop order: the VM goes first, then the daemon and the
/// namespace, then the socket directory.
pub struct Rig {
    pub vm: Vm,
    pub card: Card,
    _run: TempDir,
    pub log_dir: PathBuf,
    /// QEMU start to agent ready.
    pub boot: Duration,
}

/// What a rig's VM boots: the e2e initramfs by default, or another image
/// (the networkd guest) whose agent speaks the same protocol.
pub struct Image<'a> {
    pub initrd: &'a Path,
    /// More kernel command line.
    pub append: &'a str,
    /// Whether QEMU offers the card's MTU to the guest (`host_mtu`).
    pub host_mtu: bool,
}

impl Rig {
    /// Starts the card with `cfg`, boots the VM and waits for its agent; with
    /// [`Plug::Boot`] also brings eth0 up with the guest's addresses.
    pub fn boot(env: &Env, name: &str, cfg: &CardConfig, plug: Plug) -> Result<Rig> {
        let image = Image {
            initrd: &env.initrd,
            append: "",
            host_mtu: true,
        };
        let mut rig = Rig::boot_image(env, name, cfg, plug, &image)?;
        if plug == Plug::Boot {
            rig.vm.check("net_up", Duration::from_secs(30))?;
        }
        Ok(rig)
    }

    /// Starts the card with `cfg`, boots `image` and waits for its agent;
    /// configures nothing in the guest.
    pub fn boot_image(
        env: &Env,
        name: &str,
        cfg: &CardConfig,
        plug: Plug,
        image: &Image,
    ) -> Result<Rig> {
        let log_dir = env.logs.join(name);
        if log_dir.exists() {
            std::fs::remove_dir_all(&log_dir)?;
        }
        std::fs::create_dir_all(&log_dir)?;
        let run = TempDir::new(&format!("vhc-{name}"))?;
        let card = Card::start(cfg, run.path(), &log_dir.join("daemon.log"))?;
        let (vm, boot) = start_vm(env, &card, run.path(), &log_dir, plug, image)?;
        Ok(Rig {
            vm,
            card,
            _run: run,
            log_dir,
            boot,
        })
    }

    /// Powers the VM off and boots `image` on the same card (the daemon
    /// listens again once QEMU is gone); its logs go to `<log_dir>/<name>`.
    pub fn replace_vm(&mut self, env: &Env, name: &str, image: &Image) -> Result<()> {
        self.vm.shutdown()?;
        let log_dir = self.log_dir.join(name);
        std::fs::create_dir_all(&log_dir)?;
        let (vm, boot) = start_vm(
            env,
            &self.card,
            self._run.path(),
            &log_dir,
            Plug::Boot,
            image,
        )?;
        self.vm = vm;
        self.boot = boot;
        Ok(())
    }

    /// Powers the VM off and boots the e2e initramfs with its NIC on another backend's
    /// vhost-user `socket` offering `mtu` (an installed daemon), eth0 up with the guest's
    /// addresses; logs in `<log_dir>/<name>`.
    pub fn replace_vm_on(&mut self, env: &Env, name: &str, socket: &Path, mtu: u32) -> Result<()> {
        self.vm.shutdown()?;
        let log_dir = self.log_dir.join(name);
        std::fs::create_dir_all(&log_dir)?;
        let mut vm = Vm::start(&VmConfig {
            kernel: &env.kernel,
            initrd: &env.initrd,
            nic: Nic::VhostUser { socket },
            mac: card::MAC,
            mtu,
            append: "",
            log_dir: &log_dir,
            run_dir: self._run.path(),
            echo: env.echo,
            accel: env.accel,
            memory_mib: GUEST_MIB,
            hotplug_port: false,
            agent: true,
            queues: 1,
        })?;
        self.boot = vm.wait_agent(Duration::from_secs(240))?;
        vm.check("net_up", Duration::from_secs(30))?;
        self.vm = vm;
        Ok(())
    }

    /// The guest's view of eth0 (mtu, driver, features, operstate, ...).
    pub fn nic_info(&mut self) -> Result<BTreeMap<String, String>> {
        Ok(key_values(
            &self.vm.check("nic_info", Duration::from_secs(20))?,
        ))
    }

    /// Compares the guest's feature bits with what the card offered and
    /// what QEMU passes through.
    pub fn features(&mut self, env: &Env) -> Result<FeatureCheck> {
        let info = self.nic_info()?;
        let raw = info.get("features").cloned().unwrap_or_default();
        let guest = features::parse_sysfs(&raw)
            .with_context(|| format!("cannot read the guest's features {raw:?}"))?;
        let offered = self.card.offered(&env.table)?;
        let acked = self.card.wait_acked(Duration::from_secs(10))?;
        Ok(FeatureCheck {
            guest,
            offered,
            acked,
            mtu: info.get("mtu").and_then(|m| m.parse().ok()),
            driver: info.get("driver").cloned().unwrap_or_default(),
        })
    }

    /// Pings both ways over IPv4 and IPv6, `count` each.
    pub fn pings(&mut self, count: u32) -> Result<Pings> {
        let n = count.to_string();
        let mut guest = Vec::new();
        for (label, target) in [("IPv4", card::CARD4), ("IPv6", card::CARD6)] {
            let reply = self.vm.sh(
                &format!("ping_summary -c {n} -W 5 -w 30 {target}"),
                Duration::from_secs(40),
            )?;
            guest.push((label, Ping::parse(&reply.out)));
        }
        let mut card = Vec::new();
        for (label, target) in [("IPv4", card::GUEST4), ("IPv6", card::GUEST6)] {
            card.push((label, self.card.ping(&["-c", &n, target])?));
        }
        Ok(Pings { guest, card })
    }

    /// `len` bytes of the payload from the guest to the card over TCP.
    pub fn send_to_card(&mut self, env: &Env, len: usize) -> Result<Checked> {
        self.send_to_card_via(env, len, "")
    }

    /// As [`Rig::send_to_card`], the guest's sender run under `wrapper` (e.g. a `taskset`
    /// command line; empty for none).
    pub fn send_to_card_via(&mut self, env: &Env, len: usize, wrapper: &str) -> Result<Checked> {
        to_card(env, &mut self.vm, self.card.ns.name(), len, wrapper)
    }

    /// `len` bytes of the payload from the card to the guest over TCP.
    pub fn send_to_guest(&mut self, env: &Env, len: usize) -> Result<Checked> {
        to_guest(env, &mut self.vm, self.card.ns.name(), len)
    }

    /// Ends a scenario that has its own VM: a FAIL line gets the evidence, then the VM is
    /// powered off (the daemon and namespace go with the rig).
    pub fn finish(mut self, result: Result<(bool, String)>) -> Result<(bool, String)> {
        let result = result.map(|(ok, text)| {
            if ok {
                (ok, text)
            } else {
                (ok, format!("{text}\n       {}", self.evidence()))
            }
        });
        self.vm.shutdown().ok();
        result
    }

    /// The daemon's counters and where the logs are, for FAIL reports.
    pub fn evidence(&self) -> String {
        let stats = self
            .card
            .stats()
            .map(|s| {
                s.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        format!(
            "daemon counters: {}\n       logs: {}",
            if stats.is_empty() {
                "(none logged)"
            } else {
                &stats
            },
            self.log_dir.display()
        )
    }
}

/// `len` bytes of the payload from the guest of `vm` to the card's namespace `ns` over TCP,
/// the guest's sender run under `wrapper` (a `taskset` command line; empty for none).
pub fn to_card(env: &Env, vm: &mut Vm, ns: &str, len: usize, wrapper: &str) -> Result<Checked> {
    let timeout = transfer_timeout(len);
    let progress = Arc::new(Progress::default());
    let rx = nsnet::tcp_receive(
        ns,
        SocketAddrV4::new(card::CARD4.parse()?, 5001),
        Duration::from_secs(60),
        timeout,
        progress,
    )?;
    let cmd = guest_send_cmd(env, len, 5001);
    let cmd = if wrapper.is_empty() {
        cmd
    } else {
        format!("{wrapper} sh -c '{cmd}'")
    };
    let reply = vm.sh(&cmd, timeout)?;
    let got = nsnet::join(rx)?;
    if reply.rc != 0 {
        bail!("guest nc failed ({}): {}", reply.rc, reply.out.trim());
    }
    Ok(Checked {
        ok: got.bytes == len as u64 && got.sha256 == env.sha_prefix(len)?,
        expected_sha: env.sha_prefix(len)?,
        transfer: got,
    })
}

/// `len` bytes of the payload from the card's namespace `ns` to the guest of `vm` over TCP.
pub fn to_guest(env: &Env, vm: &mut Vm, ns: &str, len: usize) -> Result<Checked> {
    let timeout = transfer_timeout(len);
    // Listen in the background, then come back to report.
    vm.check(
        "rm -f /tmp/rx /tmp/rx.rc
         (nc -l -p 5002 > /tmp/rx; echo $? > /tmp/rx.rc) > /dev/null 2>&1 &
         n=0
         until netstat -ltn | grep -q ':5002 '; do
             n=$((n + 1)); [ $n -gt 100 ] && { echo 'nc is not listening'; exit 1; }
             sleep 0.1
         done",
        Duration::from_secs(20),
    )?;
    let data = env.prefix(len);
    let tx = nsnet::tcp_send(
        ns,
        SocketAddrV4::new(card::GUEST4.parse()?, 5002),
        data,
        Duration::from_secs(10),
        timeout,
    )?;
    let sent = nsnet::join(tx);
    let out = vm.check(
        "n=0
         while [ ! -e /tmp/rx.rc ]; do
             n=$((n + 1)); [ $n -gt 300 ] && { echo 'nc did not finish'; killall nc; exit 1; }
             sleep 0.1
         done
         echo rc=$(cat /tmp/rx.rc)
         echo bytes=$(wc -c < /tmp/rx)
         echo sha=$(sha256sum /tmp/rx | cut -d' ' -f1)
         rm -f /tmp/rx",
        Duration::from_secs(120),
    )?;
    let sent = sent?;
    let kv = key_values(&out);
    let bytes: u64 = kv.get("bytes").and_then(|b| b.parse().ok()).unwrap_or(0);
    let sha = kv.get("sha").cloned().unwrap_or_default();
    let expected_sha = env.sha_prefix(len)?;
    Ok(Checked {
        ok: bytes == len as u64
            && sha == expected_sha
            && kv.get("rc").map(String::as_str) == Some("0"),
        expected_sha,
        transfer: Transfer {
            bytes,
            sha256: sha,
            elapsed: sent.elapsed,
        },
    })
}

/// Boots `image` with the card's NIC (or none, to hot-plug later) and waits
/// for the guest agent; returns the VM and QEMU start to agent ready.
fn start_vm(
    env: &Env,
    card: &Card,
    run_dir: &Path,
    log_dir: &Path,
    plug: Plug,
    image: &Image,
) -> Result<(Vm, Duration)> {
    let nic = match plug {
        Plug::Boot => Nic::VhostUser {
            socket: &card.socket,
        },
        Plug::Later => Nic::None,
    };
    let mut vm = Vm::start(&VmConfig {
        kernel: &env.kernel,
        initrd: image.initrd,
        nic,
        mac: card::MAC,
        mtu: if image.host_mtu { card.cfg.mtu } else { 0 },
        append: image.append,
        log_dir,
        run_dir,
        echo: env.echo,
        accel: env.accel,
        memory_mib: GUEST_MIB,
        hotplug_port: plug == Plug::Later,
        agent: true,
        queues: card.cfg.queues,
    })?;
    let boot = vm.wait_agent(Duration::from_secs(240))?;
    Ok((vm, boot))
}

/// The guest command that sends the first `len` payload bytes to the card's
/// TCP `port` (busybox nc half-closes at the end of its input and exits when
/// the card closes).
pub fn guest_send_cmd(env: &Env, len: usize, port: u16) -> String {
    let payload = crate::image::PAYLOAD;
    let to = format!("{} {port}", card::CARD4);
    if len == env.payload.data.len() {
        format!("nc {to} < {payload}")
    } else {
        format!("head -c {len} {payload} | nc {to}")
    }
}

/// Generous: TCG can be slow, but not slower than 200 kB/s.
pub fn transfer_timeout(len: usize) -> Duration {
    Duration::from_secs(60 + (len / 200_000) as u64)
}

/// A transfer and whether it arrived whole (length and SHA-256).
pub struct Checked {
    pub ok: bool,
    pub expected_sha: String,
    pub transfer: Transfer,
}

impl Checked {
    pub fn describe(&self) -> String {
        let t = &self.transfer;
        if self.ok {
            format!(
                "{:.1} MB/s, sha256 equal ({}…)",
                t.mb_per_s(),
                &self.expected_sha[..12]
            )
        } else {
            format!(
                "{} bytes at {:.1} MB/s, sha256 {} != expected {}",
                t.bytes,
                t.mb_per_s(),
                if t.sha256.is_empty() { "-" } else { &t.sha256 },
                self.expected_sha
            )
        }
    }
}

pub struct Pings {
    pub guest: Vec<(&'static str, Ping)>,
    pub card: Vec<(&'static str, Ping)>,
}

impl Pings {
    pub fn ok(&self) -> bool {
        self.guest.iter().chain(&self.card).all(|(_, p)| p.ok())
    }

    pub fn describe(&self) -> String {
        let side = |pings: &[(&str, Ping)]| {
            pings
                .iter()
                .map(|(label, p)| match (p.ok(), p.avg()) {
                    (true, Some(avg)) => format!("{label} {avg} ms"),
                    _ => format!("{label} {}", p.describe()),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "ping guest→card {}; card→guest {}",
            side(&self.guest),
            side(&self.card)
        )
    }
}

/// The guest's feature word against the card's offer and ack.
pub struct FeatureCheck {
    pub guest: u64,
    pub offered: u64,
    /// As the daemon logged it (includes PROTOCOL_FEATURES).
    pub acked: u64,
    pub mtu: Option<u32>,
    pub driver: String,
}

impl FeatureCheck {
    /// Bits QEMU takes from the backend, as the guest has them.
    pub fn guest_passthrough(&self) -> u64 {
        self.guest & features::passthrough_mask()
    }

    /// What the guest should have of the passthrough bits: the offer.
    pub fn expected(&self) -> u64 {
        self.offered & features::passthrough_mask()
    }

    pub fn acked_device(&self) -> u64 {
        self.acked & !(1 << features::PROTOCOL_FEATURES_BIT)
    }

    /// The guest has exactly the offered passthrough bits, and the daemon
    /// was acked exactly those.
    pub fn ok(&self) -> bool {
        self.guest_passthrough() == self.expected()
            && self.acked_device() & features::passthrough_mask() == self.guest_passthrough()
    }

    /// The mismatches, in words.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let (g, e) = (self.guest_passthrough(), self.expected());
        if g & !e != 0 {
            out.push(format!("guest has unoffered {}", features::names(g & !e)));
        }
        if e & !g != 0 {
            out.push(format!("guest lacks offered {}", features::names(e & !g)));
        }
        let a = self.acked_device() & features::passthrough_mask();
        if a != g {
            out.push(format!(
                "daemon acked {} but the guest has {}",
                features::describe(a),
                features::describe(g)
            ));
        }
        out
    }
}
