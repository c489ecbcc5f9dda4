//! `cargo xtask libvirt`: the domain in host-config/libvirt/vhost-card-vm.xml, unmodified,
//! under libvirt from apt: define it, start it, check that the guest's stock virtio_net binds
//! to the card and passes traffic both ways (reading the counters over the control socket and
//! the Prometheus endpoint while it does), then undefine it.
//!
//! The XML names fixed paths; this task provides them: the card's socket (the daemon, with its
//! tap in a fresh namespace, made writable by libvirt's QEMU user), and the guest's kernel
//! (Debian's cloud kernel from target/vm) and initrd (the busybox initramfs plus this task's
//! scenario). libvirt is installed if missing (no service is started by the install). If no
//! libvirtd answers on qemu:///system, the task starts one: through systemd when systemd is
//! PID 1, otherwise `virtlogd` and `libvirtd` directly, inside a network namespace of their
//! own so nothing libvirt's network driver might set up reaches the host, and stops it at
//! the end. Every command that the USAGE file shows is printed as it runs (`$ ...`).

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::netns::Netns;
use crate::process::{wait_for, Guarded, TempDir};

const URI: &str = "qemu:///system";
const TAP: &str = "card0";
const CARD4: &str = "10.77.0.1";
const GUEST4: &str = "10.77.0.2";
/// The group libvirt's QEMU user belongs to on Debian (user libvirt-qemu, groups kvm and
/// libvirt-qemu); the card's socket is handed to it, as vhost-card@.socket does.
const SOCKET_GROUP: &str = "kvm";
/// Marks a guest directory this task created, so a second run may reuse it and nothing else
/// is ever overwritten.
const MARKER: &str = ".created-by-cargo-xtask-libvirt";

#[derive(clap::Args)]
pub struct Options {
    /// Use target/release/vhost-card as it is instead of building it first.
    #[arg(long)]
    no_build: bool,
    /// Seconds allowed for the guest to boot and run its checks (TCG is slow).
    #[arg(long, default_value_t = 240)]
    timeout: u64,
    /// Do not echo the guest console (it is kept in target/vm/logs/libvirt/).
    #[arg(long)]
    quiet: bool,
}

/// What the task needs to know from the domain XML.
struct Domain {
    xml: PathBuf,
    name: String,
    kernel: PathBuf,
    initrd: PathBuf,
    console: PathBuf,
    socket: PathBuf,
    mtu: u32,
}

/// The text of the first `<tag>...</tag>`.
fn element(xml: &str, tag: &str) -> Result<String> {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .ok_or_else(|| anyhow!("no <{tag}> in the domain XML"))?
        + open.len();
    let end = xml[start..]
        .find(&format!("</{tag}>"))
        .ok_or_else(|| anyhow!("<{tag}> is not closed"))?;
    Ok(xml[start..start + end].trim().to_string())
}

/// The value of `attr='...'` in the first element starting with `prefix` after `after`.
fn attribute(xml: &str, after: &str, prefix: &str, attr: &str) -> Result<String> {
    let from = xml
        .find(after)
        .ok_or_else(|| anyhow!("no {after} in the domain XML"))?;
    let at = xml[from..]
        .find(prefix)
        .ok_or_else(|| anyhow!("no {prefix} after {after}"))?
        + from;
    let end = xml[at..].find('>').map_or(xml.len(), |e| at + e);
    let tag = &xml[at..end];
    let key = format!("{attr}='");
    let v = tag
        .find(&key)
        .ok_or_else(|| anyhow!("{prefix} has no {attr}"))?
        + key.len();
    let len = tag[v..]
        .find('\'')
        .ok_or_else(|| anyhow!("unterminated {attr}"))?;
    Ok(tag[v..v + len].to_string())
}

impl Domain {
    fn load() -> Result<Domain> {
        let xml_path = rig::paths::workspace_root().join("host-config/libvirt/vhost-card-vm.xml");
        let xml = fs::read_to_string(&xml_path)
            .with_context(|| format!("reading {}", xml_path.display()))?;
        // Comments may quote elements; only the markup counts.
        let mut markup = String::new();
        let mut rest = xml.as_str();
        while let Some(start) = rest.find("<!--") {
            markup.push_str(&rest[..start]);
            let end = rest[start..]
                .find("-->")
                .ok_or_else(|| anyhow!("unterminated comment"))?;
            rest = &rest[start + end + 3..];
        }
        markup.push_str(rest);
        let xml = markup;
        let mtu = attribute(
            &xml,
            "<qemu:override>",
            "<qemu:property name='host_mtu'",
            "value",
        )?
        .parse()
        .context("host_mtu")?;
        Ok(Domain {
            name: element(&xml, "name")?,
            kernel: element(&xml, "kernel")?.into(),
            initrd: element(&xml, "initrd")?.into(),
            console: attribute(&xml, "<serial type='file'>", "<source", "path")?.into(),
            socket: attribute(&xml, "<interface type='vhostuser'>", "<source", "path")?.into(),
            mtu,
            xml: xml_path,
        })
    }
}

/// Prints and runs `virsh -c qemu:///system <args>`; fails unless it succeeds.
fn virsh(args: &[&str]) -> Result<String> {
    println!("$ virsh {}", args.join(" "));
    let out = virsh_quiet(args)?;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        println!("  {line}");
    }
    Ok(out)
}

/// `virsh start`, which returns only once QEMU has connected to the card: fails at once if
/// the daemon dies meanwhile (QEMU would wait for it forever).
fn virsh_start(name: &str, daemon: &mut Guarded, log_dir: &Path) -> Result<()> {
    println!("$ virsh start {name}");
    let mut child = Command::new("virsh")
        .args(["-c", URI, "start", name])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running virsh start")?;
    let waited = wait_for("virsh start", Duration::from_secs(120), || {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if let Some(status) = daemon.try_wait()? {
            bail!(
                "the daemon exited ({status}) while QEMU was connecting:\n{}",
                crate::process::tail(&log_dir.join("daemon.log"), 5)
            );
        }
        Ok(None)
    });
    let status = match waited {
        Ok(status) => status,
        Err(e) => {
            child.kill().ok();
            child.wait().ok();
            return Err(e);
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out).ok();
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).ok();
    }
    if !status.success() {
        bail!("virsh start {name} failed ({status}): {}", err.trim());
    }
    print_indented(out.trim_end());
    Ok(())
}

fn virsh_quiet(args: &[&str]) -> Result<String> {
    let out = Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running virsh")?;
    rig::interrupt::check_interrupted()?;
    if !out.status.success() {
        bail!(
            "virsh {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn libvirt_answers() -> bool {
    virsh_quiet(&["version"]).is_ok()
}

/// The libvirt daemon the task talks to, stopped on drop if the task started it.
enum Libvirtd {
    /// Already running (a system service, socket-activated, or started by hand).
    Existing,
    /// `systemctl start libvirtd` by this task.
    Systemd,
    /// virtlogd and libvirtd started by this task in their own network namespace.
    Own {
        libvirtd: Guarded,
        virtlogd: Guarded,
        _ns: Netns,
    },
}

impl Libvirtd {
    fn ensure(log_dir: &Path) -> Result<Libvirtd> {
        if libvirt_answers() {
            println!("libvirt: using the libvirtd that answers on {URI}");
            return Ok(Libvirtd::Existing);
        }
        let started = Instant::now();
        let daemon = if Path::new("/run/systemd/system").exists() {
            println!("libvirt: systemd is PID 1: systemctl start libvirtd");
            crate::process::run(Command::new("systemctl").args(["start", "libvirtd.service"]))?;
            Libvirtd::Systemd
        } else {
            // No systemd to start it: run the daemons directly, in a namespace of their own.
            let ns = Netns::new("vhclibvirt-")?;
            println!(
                "libvirt: systemd is not PID 1; starting virtlogd and libvirtd in network \
                 namespace {}",
                ns.name()
            );
            let spawn = |name: &str, program: &str| -> Result<Guarded> {
                let log = File::create(log_dir.join(format!("{program}.log")))?;
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{}", ns.name()))
                    .arg(program)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log);
                Guarded::spawn(name, &mut cmd, libc::SIGTERM)
            };
            let virtlogd = spawn("virtlogd", "virtlogd")?;
            let mut libvirtd = spawn("libvirtd", "libvirtd")?;
            wait_for("libvirtd to answer", Duration::from_secs(90), || {
                if let Some(status) = libvirtd.try_wait()? {
                    bail!(
                        "libvirtd exited ({status}):\n{}",
                        crate::process::tail(&log_dir.join("libvirtd.log"), 20)
                    );
                }
                Ok(libvirt_answers().then_some(()))
            })?;
            Libvirtd::Own {
                libvirtd,
                virtlogd,
                _ns: ns,
            }
        };
        wait_for("libvirtd to answer", Duration::from_secs(90), || {
            Ok(libvirt_answers().then_some(()))
        })?;
        println!(
            "libvirt: libvirtd answers after {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(daemon)
    }

    fn describe(&self) -> &'static str {
        match self {
            Libvirtd::Existing => "the running libvirtd",
            Libvirtd::Systemd => "libvirtd.service, started and stopped by this task",
            Libvirtd::Own { .. } => "libvirtd + virtlogd started by this task (no systemd)",
        }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        match self {
            Libvirtd::Existing => {}
            Libvirtd::Systemd => {
                Command::new("systemctl")
                    .args(["stop", "libvirtd.service"])
                    .status()
                    .ok();
            }
            Libvirtd::Own {
                libvirtd, virtlogd, ..
            } => {
                // libvirtd first: it talks to virtlogd while it shuts down.
                libvirtd.stop().ok();
                virtlogd.stop().ok();
            }
        }
    }
}

/// The defined domain: destroyed and undefined on drop unless the task did it already.
struct Defined {
    name: String,
    defined: bool,
}

impl Drop for Defined {
    fn drop(&mut self) {
        if self.defined {
            virsh_quiet(&["destroy", &self.name]).ok();
            virsh_quiet(&["undefine", &self.name]).ok();
        }
    }
}

/// Files and directories the task created for the domain, removed on drop.
#[derive(Default)]
struct Created {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Created {
    /// Creates `dir` (0755) and its missing parents, remembering what it created.
    fn dir(&mut self, dir: &Path) -> Result<()> {
        let mut missing = Vec::new();
        let mut d = Some(dir);
        while let Some(p) = d.filter(|p| !p.exists()) {
            missing.push(p.to_path_buf());
            d = p.parent();
        }
        // QEMU runs as libvirt-qemu: every existing parent must let others through.
        for p in d.into_iter().flat_map(Path::ancestors) {
            let mode = fs::metadata(p)?.permissions().mode();
            ensure!(
                mode & 0o001 != 0,
                "{} has mode {:o}: libvirt's QEMU (another user) cannot reach {} through it \
                 (chmod o+x {})",
                p.display(),
                mode & 0o7777,
                dir.display(),
                p.display()
            );
        }
        for p in missing.into_iter().rev() {
            fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
            self.dirs.push(p);
        }
        Ok(())
    }

    fn file(&mut self, path: &Path, data: &[u8]) -> Result<()> {
        fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
        self.files.push(path.to_path_buf());
        Ok(())
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        for f in &self.files {
            fs::remove_file(f).ok();
        }
        for d in self.dirs.iter().rev() {
            // Only if empty: something else may have put files there meanwhile.
            fs::remove_dir(d).ok();
        }
    }
}

pub fn run(opts: &Options) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the libvirt test needs root (libvirt's system instance, namespaces, taps)");
    }
    let log_dir = rig::paths::vm_dir().join("logs/libvirt");
    fs::create_dir_all(&log_dir)?;
    for old in [
        "daemon.log",
        "console.log",
        "qemu.log",
        "libvirtd.log",
        "virtlogd.log",
    ] {
        fs::remove_file(log_dir.join(old)).ok();
    }
    let t0 = Instant::now();
    let result = scenario(opts, &log_dir, t0);
    if result.is_err() {
        for log in ["daemon.log", "console.log", "qemu.log", "libvirtd.log"] {
            let path = log_dir.join(log);
            if path.exists() {
                eprintln!("---- last lines of {} ----", path.display());
                eprintln!("{}", crate::process::tail(&path, 30));
            }
        }
    }
    println!("libvirt: task took {:.1} s", t0.elapsed().as_secs_f64());
    result
}

fn scenario(opts: &Options, log_dir: &Path, t0: Instant) -> Result<()> {
    let dom = Domain::load()?;
    println!(
        "libvirt: domain {} from {}: kernel {}, initrd {}, console {}, card socket {}",
        dom.name,
        dom.xml.display(),
        dom.kernel.display(),
        dom.initrd.display(),
        dom.console.display(),
        dom.socket.display()
    );
    let assets = crate::assets::ensure(&crate::assets::Options { refresh: false })?;
    crate::apt::install(&["libvirt-daemon-system", "libvirt-clients"])?;
    if !opts.no_build {
        rig::daemon::build(true)?;
    }
    let binary = rig::paths::target_dir().join("release/vhost-card");

    // Declaration order is teardown order reversed: the domain goes first, then the guest
    // files, the daemon, the card's namespace, and libvirt last.
    let libvirtd = Libvirtd::ensure(log_dir)?;
    if virsh_quiet(&["dominfo", &dom.name]).is_ok() {
        bail!(
            "a domain named {} is already defined; this test defines its own (virsh undefine {} \
             if it is a leftover)",
            dom.name,
            dom.name
        );
    }
    let ns = Netns::new("vhclv-")?;
    let mut created = Created::default();
    let run_dir = dom
        .socket
        .parent()
        .context("the socket path has no directory")?
        .to_path_buf();
    created.dir(&run_dir)?;
    let control = run_dir.join(format!(
        "{}.control",
        dom.socket
            .file_stem()
            .map_or("card".into(), |s| s.to_string_lossy())
    ));
    let private = TempDir::new("vhost-card-libvirt")?;
    let mut daemon = start_daemon(&binary, &ns, &dom.socket, &control, private.path(), log_dir)?;
    // Ours now: removed at the end even if the daemon cannot remove them itself.
    created.files.push(dom.socket.clone());
    created.files.push(control.clone());
    println!("$ ip -n {} addr add {CARD4}/24 dev {TAP}", ns.name());
    ns.ip(&["addr", "add", &format!("{CARD4}/24"), "dev", TAP])?;

    // The guest: Debian's kernel and the initramfs with this task's scenario.
    let vm_dir = dom
        .kernel
        .parent()
        .context("the kernel path has no directory")?
        .to_path_buf();
    ensure!(
        dom.initrd.parent() == Some(vm_dir.as_path())
            && dom.console.parent() == Some(vm_dir.as_path()),
        "expected kernel, initrd and console log in one directory"
    );
    if vm_dir.exists() && !vm_dir.join(MARKER).exists() {
        bail!(
            "{} exists and was not created by this task; not touching it",
            vm_dir.display()
        );
    }
    created.dir(&vm_dir)?;
    created.file(&vm_dir.join(MARKER), b"")?;
    created.file(&dom.kernel, &fs::read(&assets.kernel)?)?;
    let initrd_tmp = private.path().join("initrd.img");
    crate::assets::initrd_with_scenario(&assets.initramfs, &guest_script(dom.mtu), &initrd_tmp)?;
    created.file(&dom.initrd, &fs::read(&initrd_tmp)?)?;
    fs::remove_file(&dom.console).ok();
    created.files.push(dom.console.clone());
    let _save_logs = SaveLogs {
        console: dom.console.clone(),
        domain: dom.name.clone(),
        log_dir: log_dir.to_path_buf(),
    };

    let mut defined = Defined {
        name: dom.name.clone(),
        defined: false,
    };
    virsh(&["define", &dom.xml.to_string_lossy()])?;
    defined.defined = true;
    let qemu_log = PathBuf::from(format!("/var/log/libvirt/qemu/{}.log", dom.name));
    let qemu_log_start = fs::metadata(&qemu_log).map_or(0, |m| m.len());
    let started = Instant::now();
    virsh_start(&dom.name, &mut daemon, log_dir)?;
    virsh(&["domstate", &dom.name])?;
    let qemu_cmdline = qemu_command_line(&qemu_log, qemu_log_start);

    let mut console = Console::new(&dom.console, &dom.name, !opts.quiet);
    let timeout = Duration::from_secs(opts.timeout);
    console.wait("the guest scenario to start", timeout, &mut daemon, |l| {
        l.contains("SCENARIO-START")
    })?;
    let boot = started.elapsed();
    console.wait("the guest's pings", timeout, &mut daemon, |l| {
        l.contains("HOST-PING-NOW") || l.contains("SCENARIO-EXIT")
    })?;

    // The card pings the guest; the counters are read while those pings flow.
    let metrics = rig::daemon::metrics_addr(&fs::read_to_string(log_dir.join("daemon.log"))?)?;
    let before = Snapshot::take(&binary, &control, &metrics)?;
    let mut pinger = ns.command("busybox");
    pinger
        .args(["ping", "-c", "8", "-W", "5", "-w", "30", GUEST4])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    println!("$ ip netns exec {} busybox ping -c 8 {GUEST4}", ns.name());
    let child = pinger.spawn().context("starting ping")?;
    std::thread::sleep(Duration::from_secs(3));
    let during = Snapshot::take(&binary, &control, &metrics)?;
    let out = child.wait_with_output()?;
    let ping_text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    print_indented(&ping_text);
    let host_ping = ping_loss(&ping_text);
    let jumbo_len = (dom.mtu - 28).to_string();
    println!(
        "$ ip netns exec {} busybox ping -c 2 -s {jumbo_len} {GUEST4}",
        ns.name()
    );
    let jumbo_text = {
        let o = ns
            .command("busybox")
            .args([
                "ping", "-c", "2", "-s", &jumbo_len, "-W", "5", "-w", "30", GUEST4,
            ])
            .output()?;
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    };
    print_indented(&jumbo_text);
    let host_jumbo = ping_loss(&jumbo_text);
    let after = Snapshot::take(&binary, &control, &metrics)?;

    let exit = console.wait(
        "the guest to finish",
        Duration::from_secs(120),
        &mut daemon,
        |l| l.contains("SCENARIO-EXIT"),
    )?;
    wait_for("the domain to shut off", Duration::from_secs(60), || {
        Ok(virsh_quiet(&["domstate", &dom.name])?
            .trim()
            .eq("shut off")
            .then_some(()))
    })?;
    let vm_time = started.elapsed();
    virsh(&["domstate", &dom.name])?;
    virsh(&["undefine", &dom.name])?;
    defined.defined = false;
    let listed = virsh_quiet(&["list", "--all", "--name"])?;
    let undefined = !listed.lines().any(|l| l.trim() == dom.name);
    let (daemon_stop, daemon_ok) = match daemon.stop()? {
        (status, false) => (format!("stopped on SIGTERM ({status})"), status.success()),
        (status, true) => (format!("ignored SIGTERM, killed ({status})"), false),
    };

    // The report.
    let results = &console.console.results;
    let get = |k: &str| results.get(k).map_or("(missing)", String::as_str);
    let mut pass = true;
    let mut rows = Vec::new();
    let mut row = |ok: Option<bool>, label: &str, value: String| {
        pass &= ok != Some(false);
        let tag = match ok {
            Some(true) => "[ ok ]",
            Some(false) => "[FAIL]",
            None => "[info]",
        };
        rows.push(format!("{tag} {label:<28} {value}"));
    };
    row(None, "libvirt", libvirtd.describe().to_string());
    row(
        Some(qemu_cmdline.contains("\"vectors\":0") && qemu_cmdline.contains("\"host_mtu\":")),
        "QEMU device (from libvirt)",
        qemu_cmdline
            .lines()
            .find(|l| l.starts_with("-device ") && l.contains("\"virtio-net-pci\""))
            .map_or("(not found in the domain log)".into(), |l| {
                l.trim_start_matches("-device ")
                    .trim_end_matches('\\')
                    .trim()
                    .trim_matches('\'')
                    .to_string()
            }),
    );
    row(
        Some(get("mtu") == dom.mtu.to_string()),
        "guest MTU",
        format!("{} (expected {})", get("mtu"), dom.mtu),
    );
    row(
        Some(get("driver") == "virtio_net"),
        "guest driver",
        get("driver").to_string(),
    );
    row(None, "negotiated features", sysfs_features(get("features")));
    row(
        Some(get("ping4") == "0"),
        "guest -> card ping",
        format!("exit {}", get("ping4")),
    );
    row(
        Some(get("jumbo4") == "0"),
        "guest -> card jumbo ping",
        format!("exit {} ({} B payload)", get("jumbo4"), dom.mtu - 28),
    );
    row(
        Some(host_ping == Some(0.0)),
        "card -> guest ping",
        describe_loss(host_ping),
    );
    row(
        Some(host_jumbo == Some(0.0)),
        "card -> guest jumbo ping",
        describe_loss(host_jumbo),
    );
    let moved = |name: &str| after.json(name) > before.json(name);
    row(
        Some(
            moved("tx_frames")
                && moved("rx_frames")
                && during.json("rx_frames") > before.json("rx_frames"),
        ),
        "counters while pinging",
        format!(
            "rx_frames {} -> {} -> {}, tx_frames {} -> {} -> {} (control socket)",
            before.json("rx_frames"),
            during.json("rx_frames"),
            after.json("rx_frames"),
            before.json("tx_frames"),
            during.json("tx_frames"),
            after.json("tx_frames")
        ),
    );
    row(
        Some(
            after.prom_frames("rx") >= during.json("rx_frames")
                && after.prom_frames("tx") >= during.json("tx_frames"),
        ),
        "Prometheus endpoint",
        format!(
            "http://{metrics}/metrics: vhost_card_frames_total rx {}, tx {}",
            after.prom_frames("rx"),
            after.prom_frames("tx")
        ),
    );
    let exit_code = exit.split_whitespace().last().unwrap_or("?").to_string();
    row(Some(exit_code == "0"), "guest scenario exit", exit_code);
    row(
        Some(undefined),
        "virsh undefine",
        format!("{} gone: {undefined}", dom.name),
    );
    row(Some(daemon_ok), "daemon", daemon_stop);

    println!();
    println!("==== vhost-card under libvirt ({}) ====", dom.xml.display());
    println!("kernel      {}", assets.kernel_package);
    println!(
        "timing      {:.1} s start to scenario, {:.1} s domain total, {:.1} s task so far",
        boot.as_secs_f64(),
        vm_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    for r in rows {
        println!("{r}");
    }
    println!(
        "---- vhost-card stats --control {} (while pinging) ----",
        control.display()
    );
    print!("{}", during.stats.table());
    println!("---- GET http://{metrics}/metrics (after): traffic, drops, state, process ----");
    let shown = [
        "vhost_card_frames_total",
        "vhost_card_bytes_total",
        "vhost_card_dropped_frames_total",
        "vhost_card_rx_checksums_total",
        "vhost_card_frontend_",
        "vhost_card_queue_pairs",
        "vhost_card_mtu_bytes",
        "vhost_card_info",
        "process_",
    ];
    for line in after
        .prom_text
        .lines()
        .filter(|l| shown.iter().any(|p| l.starts_with(p)))
    {
        println!("{line}");
    }
    println!("logs        {}", log_dir.display());
    if !pass {
        println!("RESULT: FAIL");
        bail!("libvirt test failed");
    }
    println!("RESULT: PASS");
    Ok(())
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("  {line}");
    }
}

/// Starts the daemon on the domain's socket and hands the socket to libvirt's QEMU user.
fn start_daemon(
    binary: &Path,
    ns: &Netns,
    socket: &Path,
    control: &Path,
    private: &Path,
    log_dir: &Path,
) -> Result<Guarded> {
    let args = [
        "--socket".to_string(),
        socket.display().to_string(),
        "--netns".into(),
        ns.name().into(),
        "--tap".into(),
        TAP.into(),
        "--control".into(),
        control.display().to_string(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
        // libvirt's QEMU runs as libvirt-qemu in group kvm.
        "--socket-group".into(),
        SOCKET_GROUP.into(),
    ];
    println!("$ vhost-card {} &", args.join(" "));
    let daemon = rig::daemon::spawn(binary, &args, &log_dir.join("daemon.log"), private, || {
        socket.exists() && control.exists() && ns.has_link(TAP)
    })?;
    Ok(daemon)
}

/// The counters from both endpoints at one moment.
struct Snapshot {
    stats: vhost_card::stats::Snapshot,
    prom_text: String,
}

impl Snapshot {
    fn take(binary: &Path, control: &Path, metrics: &str) -> Result<Snapshot> {
        let json_text = crate::process::stdout(
            Command::new(binary)
                .args(["stats", "--json", "--control"])
                .arg(control),
        )?;
        Ok(Snapshot {
            stats: vhost_card::stats::Snapshot::parse(&json_text)
                .with_context(|| format!("`vhost-card stats --json` printed {json_text}"))?,
            prom_text: rig::daemon::scrape(metrics)?,
        })
    }

    /// Queue pair 0's counter `name` from `vhost-card stats --json`.
    fn json(&self, name: &str) -> u64 {
        self.stats
            .pairs
            .first()
            .and_then(|p| p.counters.get(name))
            .unwrap_or(0)
    }

    /// Queue pair 0's sample of `vhost_card_frames_total` in `direction`.
    fn prom_frames(&self, direction: &str) -> u64 {
        let prefix = format!("vhost_card_frames_total{{queue=\"0\",direction=\"{direction}\"}} ");
        self.prom_text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Packet loss in percent from a busybox ping summary.
fn ping_loss(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains("packet loss"))?;
    let pct = line.split(',').find(|p| p.contains("packet loss"))?;
    pct.trim().split('%').next()?.trim().parse().ok()
}

fn describe_loss(loss: Option<f64>) -> String {
    loss.map_or("no ping summary".into(), |l| format!("{l}% loss"))
}

/// The feature names of sysfs' bit string ('0'/'1' per bit, bit 0 first).
fn sysfs_features(bits: &str) -> String {
    let word = bits
        .chars()
        .take(64)
        .enumerate()
        .filter(|(_, c)| *c == '1')
        .fold(0u64, |w, (i, _)| w | (1u64 << i));
    if word == 0 {
        return bits.to_string();
    }
    vhost_card::features::names(word).join(" ")
}

/// The command line libvirt gave QEMU this time: the domain's log from `start` on.
fn qemu_command_line(log: &Path, start: u64) -> String {
    let bytes = fs::read(log).unwrap_or_default();
    let from = usize::try_from(start).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// Keeps the guest console and libvirt's QEMU log in target/vm/logs/libvirt when the task
/// ends, however it ends (the console file itself is removed with the guest files).
struct SaveLogs {
    console: PathBuf,
    domain: String,
    log_dir: PathBuf,
}

impl Drop for SaveLogs {
    fn drop(&mut self) {
        fs::copy(&self.console, self.log_dir.join("console.log")).ok();
        fs::copy(
            format!("/var/log/libvirt/qemu/{}.log", self.domain),
            self.log_dir.join("qemu.log"),
        )
        .ok();
    }
}

/// The console file virtlogd writes for the domain's serial port.
struct Console {
    console: rig::qemu::Console,
    domain: String,
}

impl Console {
    fn new(path: &Path, domain: &str, echo: bool) -> Console {
        Console {
            console: rig::qemu::Console::new(path.to_path_buf(), echo),
            domain: domain.to_string(),
        }
    }

    fn poll(&mut self) -> Result<Vec<String>> {
        self.console.poll()
    }

    /// Waits for a console line matching `pred`; fails if the daemon dies or the domain
    /// stops running first.
    fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        daemon: &mut Guarded,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        let mut last_state = Instant::now();
        wait_for(what, timeout, || {
            if let Some(line) = self.poll()?.into_iter().find(|l| pred(l)) {
                return Ok(Some(line));
            }
            if let Some(status) = daemon.try_wait()? {
                bail!("the daemon exited ({status}) before {what}");
            }
            if last_state.elapsed() > Duration::from_secs(2) {
                last_state = Instant::now();
                if let Ok(state) = virsh_quiet(&["domstate", &self.domain]) {
                    if state.trim() == "shut off" {
                        self.poll()?;
                        bail!("the domain shut off before {what}");
                    }
                }
            }
            Ok(None)
        })
    }
}

/// The guest half, run by the initramfs' /init as /scenario.sh.
fn guest_script(mtu: u32) -> String {
    let jumbo = mtu - 28;
    let nic_report = rig::assets::SCENARIO_NIC_REPORT;
    let await_pings = rig::assets::SCENARIO_AWAIT_HOST_PINGS;
    format!(
        r#"#!/bin/sh
# Guest half of `cargo xtask libvirt` (generated by xtask/src/libvirt.rs).
{nic_report}ip addr add {GUEST4}/24 dev eth0
ip link set eth0 up
sleep 1
check() {{  # name, command...
    name=$1
    shift
    "$@" > /tmp/out 2>&1
    rc=$?
    sed "s/^/[$name] /" /tmp/out
    echo "RESULT $name=$rc"
}}
check ping4 ping -c 3 -W 5 -w 30 {CARD4}
check jumbo4 ping -c 2 -s {jumbo} -W 5 -w 30 {CARD4}

{await_pings}await_host_pings 90 5
exit 0
"#
    )
}
