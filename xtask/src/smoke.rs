//! The VM scenario behind `cargo xtask smoke`: a Debian kernel sees the card
//! as a virtio-net NIC, reports MTU, driver and features, and pings the
//! card's stack in its namespace, which pings back. A fixed script in the
//! initramfs does the guest's part; `e2e` and `demo` drive the guest through
//! its agent instead (see `guest.rs`).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::process::{self, Guarded, TempDir};
use crate::qemu::{Nic, Vm, VmConfig};
use crate::report::Ping;
use crate::{accel, assets, features};

const TAP: &str = "card0";
const MAC: &str = "52:54:00:12:34:56";
const CARD4: &str = "10.77.0.1";
const GUEST4: &str = "10.77.0.2";
const CARD6: &str = "fd77::1";
const GUEST6: &str = "fd77::2";

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The vhost-card daemon over vhost-user (the real thing).
    VhostUser,
    /// QEMU's own tap backend, no daemon: reference for the boot path.
    QemuTap,
}

#[derive(clap::Args)]
pub struct Options {
    /// What serves the VM's NIC.
    #[arg(long, value_enum, default_value_t = Backend::VhostUser)]
    backend: Backend,
    /// MTU of the card (host_mtu seen by the guest).
    #[arg(long, default_value_t = 65520)]
    mtu: u32,
    /// Seconds allowed for the boot and the guest's own checks (TCG is slow).
    #[arg(long, default_value_t = 180)]
    timeout: u64,
    /// Use target/release/vhost-card as it is instead of building it first.
    #[arg(long)]
    no_build: bool,
    /// Do not echo the guest console (it is still in target/vm/logs/).
    #[arg(long)]
    quiet: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the VM scenario needs root (network namespaces, tap devices)");
    }
    let log_dir = rig::paths::vm_dir().join("logs");
    fs::create_dir_all(&log_dir)?;
    for old in ["serial.log", "qemu.log", "daemon.log"] {
        fs::remove_file(log_dir.join(old)).ok();
    }
    let result = scenario(opts, &log_dir);
    if result.is_err() {
        for log in ["daemon.log", "qemu.log", "serial.log"] {
            let path = log_dir.join(log);
            if path.exists() {
                eprintln!("---- last lines of {} ----", path.display());
                eprintln!("{}", process::tail(&path, 40));
            }
        }
    }
    result
}

fn scenario(opts: &Options, log_dir: &Path) -> Result<()> {
    let t0 = Instant::now();
    let assets = assets::ensure(&assets::Options { refresh: false })?;
    if opts.backend == Backend::VhostUser && !opts.no_build {
        crate::card::build()?;
    }
    let (accel, accel_why) = accel::detect(&assets.kernel, &assets.initramfs, log_dir)?;

    // Declaration order matters: guards drop in reverse, so the VM stops
    // first, then the daemon, then the namespace and the temporary files.
    let tmp = TempDir::new("vhost-card-xtask")?;
    let ns = Netns::new("vhc-")?;
    let socket = tmp.path().join("card.sock");
    let mut daemon = match opts.backend {
        Backend::VhostUser => Some(start_daemon(&ns, &socket, opts.mtu, log_dir)?),
        Backend::QemuTap => {
            ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"])?;
            ns.ip(&["link", "set", TAP, "mtu", &opts.mtu.to_string(), "up"])?;
            None
        }
    };
    // The card's own addresses, which only exist inside its namespace.
    ns.ip(&["addr", "add", &format!("{CARD4}/24"), "dev", TAP])?;
    ns.ip(&["addr", "add", &format!("{CARD6}/64"), "dev", TAP, "nodad"])?;

    let initrd = tmp.path().join("initrd");
    assets::initrd_with_scenario(&assets.initramfs, &guest_script(opts.mtu), &initrd)?;
    let nic = match opts.backend {
        Backend::VhostUser => Nic::VhostUser { socket: &socket },
        Backend::QemuTap => Nic::Tap {
            netns: &ns,
            ifname: TAP,
        },
    };
    let mut vm = Vm::start(&VmConfig {
        kernel: &assets.kernel,
        initrd: &initrd,
        nic,
        mac: MAC,
        mtu: opts.mtu,
        append: "",
        log_dir,
        run_dir: tmp.path(),
        echo: !opts.quiet,
        accel,
        memory_mib: 512,
        hotplug_port: false,
        agent: false,
        queues: 1,
    })?;
    println!(
        "smoke: VM started ({}: {accel_why}), QMP at {}",
        accel.name(),
        vm.qmp.display()
    );
    let timeout = Duration::from_secs(opts.timeout);
    vm.wait_for_line("the guest scenario to start", timeout, |l| {
        l.contains("SCENARIO-START")
    })?;
    let boot_time = vm.started.elapsed();
    let remaining = timeout
        .saturating_sub(boot_time)
        .max(Duration::from_secs(30));
    let line = vm.wait_for_line("the guest's pings", remaining, |l| {
        l.contains("HOST-PING-NOW") || l.contains("SCENARIO-EXIT")
    })?;

    // The guest stays up (up to 60 s) until our echo requests stop coming.
    let mut host_pings = Vec::new();
    let exit_line = if line.contains("SCENARIO-EXIT") {
        println!("smoke: the guest scenario ended early, no pings from the card");
        line
    } else {
        let jumbo = (opts.mtu - 28).to_string();
        for (label, args) in [
            ("card -> guest IPv4", vec!["-c", "3", GUEST4]),
            ("card -> guest IPv6", vec!["-6", "-c", "3", GUEST6]),
            (
                "card -> guest IPv4 jumbo",
                vec!["-c", "2", "-s", &jumbo, GUEST4],
            ),
        ] {
            host_pings.push((label, host_ping(&ns, &args, !opts.quiet)?));
        }
        vm.wait_for_line("the guest to finish", Duration::from_secs(90), |l| {
            l.contains("SCENARIO-EXIT")
        })?
    };
    let qemu_status = vm.wait_exit(Duration::from_secs(30))?;
    let total_time = vm.started.elapsed();
    let daemon = daemon.as_mut().map(stop_daemon).transpose()?;

    let report = Report {
        opts,
        results: vm.results(),
        host_pings: &host_pings,
        exit_line: &exit_line,
        qemu_status,
        daemon,
    };
    let (text, pass) = report.render();
    println!();
    println!(
        "==== vhost-card VM smoke test, backend {} ====",
        backend_name(opts.backend)
    );
    println!("kernel      {}", assets.kernel_package);
    println!(
        "timing      {:.1} s boot to scenario ({}), {:.1} s VM total, {:.1} s task",
        boot_time.as_secs_f64(),
        accel.name(),
        total_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    print!("{text}");
    println!("logs        {}", log_dir.display());
    if !pass {
        println!("RESULT: FAIL");
        bail!("smoke test failed");
    }
    println!("RESULT: PASS");
    Ok(())
}

/// Starts the daemon (logging to daemon.log) and waits until it listens on
/// `socket` and has created its tap in `ns`.
fn start_daemon(ns: &Netns, socket: &Path, mtu: u32, log_dir: &Path) -> Result<Guarded> {
    let args = [
        "--socket".to_string(),
        socket.display().to_string(),
        "--netns".into(),
        ns.name().into(),
        "--tap".into(),
        TAP.into(),
        "--mtu".into(),
        mtu.to_string(),
    ];
    println!("smoke: starting vhost-card {}", args.join(" "));
    rig::daemon::spawn(
        &crate::card::binary(),
        &args,
        &log_dir.join("daemon.log"),
        &std::env::temp_dir(),
        || socket.exists() && ns.has_link(TAP),
    )
}

/// Stops the daemon with SIGTERM; fine unless it had to be killed.
fn stop_daemon(daemon: &mut Guarded) -> Result<(String, bool)> {
    if let Some(status) = daemon.try_wait()? {
        return Ok((
            format!("exited by itself when the VM went away ({status})"),
            true,
        ));
    }
    Ok(match daemon.stop()? {
        (status, false) => (format!("stopped on SIGTERM ({status})"), true),
        (status, true) => (format!("ignored SIGTERM for 5 s, killed ({status})"), false),
    })
}

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::VhostUser => "vhost-user (vhost-card daemon)",
        Backend::QemuTap => "qemu-tap (reference, no daemon)",
    }
}

/// Pings from the card's namespace with busybox's ping (bounded by -w).
fn host_ping(ns: &Netns, args: &[&str], echo: bool) -> Result<Ping> {
    let out = ns
        .command("busybox")
        .args(["ping", "-W", "5", "-w", "20"])
        .args(args)
        .output()
        .context("running ping in the namespace")?;
    rig::interrupt::check_interrupted()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for line in text.lines().filter(|_| echo) {
        println!("host | {line}");
    }
    Ok(Ping::parse(&text))
}

fn ping_from_results(results: &std::collections::BTreeMap<String, String>, name: &str) -> Ping {
    let get = |key: &str| {
        results
            .get(&format!("{name}_{key}"))
            .filter(|v| !v.is_empty())
    };
    Ping {
        loss: get("loss").and_then(|v| v.parse().ok()),
        rtt: get("rtt").cloned(),
    }
}

struct Report<'a> {
    opts: &'a Options,
    results: &'a std::collections::BTreeMap<String, String>,
    host_pings: &'a [(&'static str, Ping)],
    exit_line: &'a str,
    qemu_status: ExitStatus,
    daemon: Option<(String, bool)>,
}

impl Report<'_> {
    /// The summary table and whether every check passed.
    fn render(&self) -> (String, bool) {
        let mut out = String::new();
        let mut pass = true;
        let mut row = |ok: Option<bool>, label: &str, value: &str| {
            let tag = match ok {
                Some(true) => "[ ok ]",
                Some(false) => "[FAIL]",
                None => "[info]",
            };
            pass &= ok != Some(false);
            writeln!(out, "{tag} {label:<26} {value}").ok();
        };
        let get = |key: &str| self.results.get(key).map_or("(missing)", String::as_str);

        let mtu = get("mtu");
        let want = self.opts.mtu.to_string();
        row(
            Some(mtu == want),
            "guest MTU",
            &format!("{mtu} (expected {want})"),
        );
        let driver = get("driver");
        row(Some(driver == "virtio_net"), "guest driver", driver);
        row(None, "guest link state", get("operstate"));
        let features = get("features");
        row(None, "negotiated features", &describe_features(features));
        let jumbo = format!("{} B payload", self.opts.mtu - 28);
        for (name, label, target) in [
            ("ping4", "guest -> card IPv4", CARD4.to_string()),
            ("ping6", "guest -> card IPv6", CARD6.to_string()),
            (
                "jumbo4",
                "guest -> card IPv4 jumbo",
                format!("{CARD4}, {jumbo}"),
            ),
        ] {
            let ping = ping_from_results(self.results, name);
            row(
                Some(ping.ok()),
                label,
                &format!("{target}: {}", ping.describe()),
            );
        }
        if self.host_pings.is_empty() {
            row(
                Some(false),
                "card -> guest",
                "not run (the guest ended early)",
            );
        }
        for (label, ping) in self.host_pings {
            row(Some(ping.ok()), label, &ping.describe());
        }
        row(None, "guest saw host echo reqs", get("host_echo_requests"));
        let exit = self.exit_line.split_whitespace().last().unwrap_or("?");
        row(Some(exit == "0"), "guest scenario exit", exit);
        row(
            Some(self.qemu_status.success()),
            "QEMU exit",
            &self.qemu_status.to_string(),
        );
        if let Some((daemon, ok)) = &self.daemon {
            row(Some(*ok), "daemon", daemon);
        }
        (out, pass)
    }
}

/// Decodes sysfs' feature string ('0'/'1' per bit, bit 0 first).
fn describe_features(bits: &str) -> String {
    match features::parse_sysfs(bits) {
        Some(word) => features::describe(word),
        None => bits.to_string(),
    }
}

/// The guest half, run by the initramfs' /init as /scenario.sh.
fn guest_script(mtu: u32) -> String {
    let jumbo = mtu - 28;
    let nic_report = rig::assets::SCENARIO_NIC_REPORT;
    let await_pings = rig::assets::SCENARIO_AWAIT_HOST_PINGS;
    format!(
        r#"#!/bin/sh
# Guest half of `cargo xtask smoke` (generated by xtask/src/smoke.rs).
{nic_report}echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
ip addr add {GUEST4}/24 dev eth0
ip addr add {GUEST6}/64 dev eth0
ip link set eth0 up
sleep 1
echo "RESULT operstate=$(cat /sys/class/net/eth0/operstate)"
ip addr show dev eth0

ping_test() {{  # name, ping arguments...
    name=$1
    shift
    ping -W 5 -w 30 "$@" > /tmp/ping 2>&1
    rc=$?
    sed "s/^/[$name] /" /tmp/ping
    echo "RESULT ${{name}}_exit=$rc"
    echo "RESULT ${{name}}_loss=$(sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p' /tmp/ping)"
    echo "RESULT ${{name}}_rtt=$(sed -n 's#.*min/avg/max = \([0-9./]*\) ms.*#\1#p' /tmp/ping)"
}}
ping_test ping4 -c 3 {CARD4}
ping_test ping6 -c 3 {CARD6}
ping_test jumbo4 -c 2 -s {jumbo} {CARD4}

{await_pings}await_host_pings 60 4
exit 0
"#
    )
}
