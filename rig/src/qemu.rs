//! Launching the test VM, following its serial console and talking to the
//! guest agent on its second serial port.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::agent::{Channel, Reply};
use crate::netns::Netns;
use crate::process::{wait_for, Guarded};

/// The accelerator QEMU runs the VM with (`accel.rs` probes which one works).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// QEMU's `-machine accel=` value.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// QEMU's `-cpu` value.
    pub fn cpu(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }
}

/// Where the VM's NIC gets its packets from.
pub enum Nic<'a> {
    /// A vhost-user backend (the vhost-card daemon) listening on `socket`.
    VhostUser { socket: &'a Path },
    /// QEMU's own tap backend on an existing tap `ifname` in `netns`; QEMU
    /// runs inside that namespace. Reference setup without the daemon.
    Tap { netns: &'a Netns, ifname: &'a str },
    /// No NIC at boot (one is hot-plugged later through QMP).
    None,
}

/// The QEMU that runs a VM: Debian 12's from PATH, or one unpacked in a Debian root of its own
/// (`rootfs::ensure_suite_tree`), run through that root's dynamic loader and libraries.
#[derive(Clone, Debug, Default)]
pub struct Qemu {
    /// `None`: `qemu-system-x86_64` from PATH.
    root: Option<PathBuf>,
    /// A container's PID 1 (as the host sees it) whose namespaces QEMU runs in.
    container: Option<u32>,
}

impl Qemu {
    /// The machine's own QEMU (Debian 12: 7.2).
    pub fn system() -> Qemu {
        Qemu::default()
    }

    /// The QEMU of the Debian tree at `root` (its /usr/bin/qemu-system-x86_64, libraries and
    /// firmware), whatever the machine's own libraries are.
    pub fn rooted(root: &Path) -> Qemu {
        Qemu {
            root: Some(root.to_path_buf()),
            container: None,
        }
    }

    /// The `qemu-system-x86_64` installed in the container whose PID 1 is `init` (host pid),
    /// run inside it: `nsenter` puts QEMU in the container's mount (its own binary, libraries
    /// and firmware, its paths), network, IPC, UTS and cgroup namespaces and execs it, so the
    /// child the host holds is QEMU itself. Not its pid namespace: a process that setns(2)
    /// into one may not create threads (clone(CLONE_THREAD) fails with EINVAL), and entering
    /// it through a fork would leave nsenter, not QEMU, as the child. Every path in the VM's
    /// configuration must mean the same inside as outside (bind them at the same place).
    pub fn in_container(init: u32) -> Qemu {
        Qemu {
            root: None,
            container: Some(init),
        }
    }

    /// The command that starts this QEMU, before the VM's arguments.
    pub fn command(&self) -> Command {
        if let Some(init) = self.container {
            let mut cmd = Command::new("nsenter");
            cmd.args(["--mount", "--net", "--ipc", "--uts", "--cgroup"])
                .args(["--target", &init.to_string(), "--"])
                .arg("qemu-system-x86_64");
            return cmd;
        }
        let Some(root) = &self.root else {
            return Command::new("qemu-system-x86_64");
        };
        let lib = root.join("usr/lib/x86_64-linux-gnu");
        let mut cmd = Command::new(lib.join("ld-linux-x86-64.so.2"));
        cmd.arg("--library-path")
            .arg(&lib)
            .arg(root.join("usr/bin/qemu-system-x86_64"))
            .arg("-L")
            .arg(root.join("usr/share/qemu"))
            .arg("-L")
            .arg(root.join("usr/share/seabios"))
            .env("QEMU_MODULE_DIR", lib.join("qemu"));
        cmd
    }

    /// Whether a vhost-user NIC may use MSI-X under TCG: Debian 12's QEMU 7.2 segfaults when
    /// one starts (its NICs get `vectors=0`, legacy INTx); Debian 13's 10.0 does not.
    pub fn msix_with_vhost_user(&self) -> bool {
        self.root.is_some()
    }

    /// `qemu-system-x86_64 --version`'s first line.
    pub fn version(&self) -> Result<String> {
        let out = self.command().arg("--version").output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().next().unwrap_or("?").to_string())
    }
}

pub struct VmConfig<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub nic: Nic<'a>,
    pub mac: &'a str,
    /// The MTU QEMU offers the guest (`host_mtu`, VIRTIO_NET_F_MTU); 0 offers
    /// none, so the guest's driver starts at 1500.
    pub mtu: u32,
    /// More kernel command line, after [`CMDLINE`].
    pub append: &'a str,
    /// Directory for the serial log, QEMU's stderr (qemu.log) and the agent
    /// transcript (agent.log).
    pub log_dir: &'a Path,
    /// Directory for the QMP and agent sockets (short path: sockets have a
    /// length limit).
    pub run_dir: &'a Path,
    /// Echo the guest console to stdout as it arrives.
    pub echo: bool,
    pub accel: Accel,
    /// Guest RAM, in MiB (all of it in a shared memfd).
    pub memory_mib: u32,
    /// Add a PCIe root port `rp1` a NIC can be hot-plugged into.
    pub hotplug_port: bool,
    /// Add a second serial port (ttyS1) on a socket for the guest agent.
    pub agent: bool,
    /// Queue pairs of the NIC; above 1 the guest gets as many vCPUs and the NIC `mq=on`.
    pub queues: u16,
}

pub struct Vm {
    child: Guarded,
    console: Console,
    agent: Option<Channel>,
    /// QEMU's stderr, for the error when it goes away.
    qemu_log: PathBuf,
    /// QMP socket (server, no wait) for tests that want to poke the VM.
    pub qmp: PathBuf,
    pub started: Instant,
}

/// `err` from the agent's socket, with QEMU's exit status and the end of its stderr when it
/// went away (it closes the socket as it exits: give it a moment).
fn gone(child: &mut Guarded, qemu_log: &Path, err: anyhow::Error) -> anyhow::Error {
    match child.wait_timeout(Duration::from_secs(2)) {
        Ok(status) => err.context(format!(
            "QEMU exited ({status}):\n{}",
            crate::process::tail(qemu_log, 10)
        )),
        Err(_) => err,
    }
}

/// Kernel command line. `mitigations=off` only spares the emulated CPU the
/// speculation workarounds (page-table isolation on every system call is
/// very slow under TCG); `no_timer_check` skips the boot-time test that the
/// IO-APIC delivers timer ticks, which an emulated CPU on a loaded host can
/// miss ("IO-APIC + timer doesn't work!", a panic before any driver loads).
/// The kernel itself is Debian's, unmodified.
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet mitigations=off no_timer_check";

impl Vm {
    pub fn start(cfg: &VmConfig) -> Result<Vm> {
        Vm::start_with(cfg, &[])
    }

    /// [`Vm::start`] with more QEMU arguments (e.g. `-incoming URI` for the destination of a
    /// live migration, which starts paused until the guest arrives).
    pub fn start_with(cfg: &VmConfig, extra: &[String]) -> Result<Vm> {
        Vm::start_on(&Qemu::system(), cfg, extra)
    }

    /// [`Vm::start_with`] on the QEMU `qemu`.
    pub fn start_on(qemu: &Qemu, cfg: &VmConfig, extra: &[String]) -> Result<Vm> {
        let serial_log = cfg.log_dir.join("serial.log");
        let qmp = cfg.run_dir.join("qmp.sock");
        let agent_sock = cfg.run_dir.join("agent.sock");
        std::fs::remove_file(&serial_log).ok();

        let mut cmd = qemu.command();
        if let Nic::Tap { netns, .. } = cfg.nic {
            cmd = netns.wrap(cmd);
        }
        let mem = format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            cfg.memory_mib
        );
        cmd.args(["-machine", &format!("q35,accel={}", cfg.accel.name())])
            .args(["-cpu", cfg.accel.cpu()])
            .args(["-smp", &cfg.queues.max(1).to_string()])
            .args(["-m", &cfg.memory_mib.to_string()])
            // vhost-user needs guest RAM in a shareable file descriptor.
            .args(["-object", &mem])
            .args(["-numa", "node,memdev=mem"]);
        if cfg.hotplug_port {
            cmd.args(["-device", "pcie-root-port,id=rp1,chassis=1,slot=1"]);
        }
        let netdev = match cfg.nic {
            Nic::VhostUser { socket } => {
                let chardev = format!("socket,id=chr0,path={},reconnect=1", socket.display());
                cmd.args(["-chardev", &chardev]);
                Some(format!(
                    "vhost-user,id=net0,chardev=chr0,queues={}",
                    cfg.queues.max(1)
                ))
            }
            Nic::Tap { ifname, .. } => Some(format!(
                "tap,id=net0,ifname={ifname},script=no,downscript=no,vhost=off"
            )),
            Nic::None => None,
        };
        if let Some(netdev) = netdev {
            // vectors=0: no MSI-X, legacy INTx only. Debian 12's QEMU 7.2
            // segfaults when a vhost-user NIC starts under TCG with MSI-X.
            let mut device = format!("virtio-net-pci,netdev=net0,mac={}", cfg.mac);
            if !qemu.msix_with_vhost_user() {
                device.push_str(",vectors=0");
            }
            if cfg.mtu != 0 {
                device += &format!(",host_mtu={}", cfg.mtu);
            }
            if cfg.queues > 1 {
                device.push_str(",mq=on");
            }
            cmd.args(["-netdev", &netdev]).args(["-device", &device]);
        }
        cmd.arg("-kernel")
            .arg(cfg.kernel)
            .arg("-initrd")
            .arg(cfg.initrd)
            .args(["-append", &format!("{CMDLINE} {}", cfg.append)])
            .args(["-display", "none", "-no-reboot", "-nodefaults"])
            .arg("-serial")
            .arg(format!("file:{}", serial_log.display()));
        if cfg.agent {
            std::fs::remove_file(&agent_sock).ok();
            let chardev = format!(
                "socket,id=agent,path={},server=on,wait=off",
                agent_sock.display()
            );
            cmd.args(["-chardev", &chardev])
                .args(["-serial", "chardev:agent"]);
        }
        cmd.args(extra)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(cfg.log_dir.join("qemu.log"))?);
        // SAFETY: the closure runs between fork and exec and only makes the
        // async-signal-safe setrlimit(2) system call on a valid struct.
        unsafe {
            cmd.pre_exec(|| {
                // No core dumps: a failing KVM probe aborts, and a core of a
                // VM is as large as its RAM.
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = Guarded::spawn("QEMU", &mut cmd, libc::SIGTERM)?;
        let started = Instant::now();
        let agent = if cfg.agent {
            let log = cfg.log_dir.join("agent.log");
            let channel = wait_for("QEMU's agent socket", Duration::from_secs(20), || {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "QEMU exited ({status}) at start:\n{}",
                        crate::process::tail(&cfg.log_dir.join("qemu.log"), 10)
                    );
                }
                Channel::connect(&agent_sock, &log)
            })?;
            Some(channel)
        } else {
            None
        };
        Ok(Vm {
            child,
            console: Console::new(serial_log, cfg.echo),
            agent,
            qemu_log: cfg.log_dir.join("qemu.log"),
            qmp,
            started,
        })
    }

    /// Waits until a console line satisfies `pred`, failing on timeout, on
    /// Ctrl-C or if QEMU exits first.
    pub fn wait_for_line(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        wait_for(what, timeout, || {
            let exited = self.child.try_wait()?;
            // Read after try_wait, so nothing QEMU wrote before exiting is missed.
            for line in self.console.poll()? {
                if pred(&line) {
                    return Ok(Some(line));
                }
            }
            match exited {
                Some(status) => bail!("QEMU exited ({status}) before {what}"),
                None => Ok(None),
            }
        })
    }

    /// Waits until the guest agent announces itself on its serial port.
    pub fn wait_agent(&mut self, timeout: Duration) -> Result<Duration> {
        self.until_agent(
            "the guest agent",
            timeout,
            |agent| Ok(agent.ready()?.then_some(())),
            |status| format!("QEMU exited ({status}) before the guest agent started"),
        )?;
        Ok(self.started.elapsed())
    }

    /// Polls the guest agent with `poll` (and the console, to keep its log current) until it
    /// answers `Some`, QEMU exits (the error is `exited`'s message) or `timeout` passes.
    fn until_agent<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut poll: impl FnMut(&mut Channel) -> Result<Option<T>>,
        exited: impl Fn(ExitStatus) -> String,
    ) -> Result<T> {
        let Vm {
            child,
            console,
            agent,
            qemu_log,
            ..
        } = self;
        let agent = agent.as_mut().context("this VM has no agent port")?;
        wait_for(what, timeout, || {
            let status = child.try_wait()?;
            console.poll()?;
            if let Some(v) = poll(agent).map_err(|e| gone(child, qemu_log, e))? {
                return Ok(Some(v));
            }
            match status {
                Some(status) => bail!(exited(status)),
                None => Ok(None),
            }
        })
    }

    /// Talks to a guest agent that is already running, which does not announce itself again:
    /// the guest arrived here by live migration.
    pub fn adopt_agent(&mut self) -> Result<()> {
        self.agent
            .as_mut()
            .context("this VM has no agent port")?
            .assume_ready();
        Ok(())
    }

    /// Runs `script` in the guest (through the agent, with the helpers of
    /// the e2e shell library) and returns its status and output. The guest
    /// kills it after `timeout`; we give up a little later.
    pub fn sh(&mut self, script: &str, timeout: Duration) -> Result<Reply> {
        let Vm {
            child,
            agent,
            qemu_log,
            ..
        } = self;
        let agent = agent.as_mut().context("this VM has no agent port")?;
        let id = agent
            .send(script, timeout)
            .map_err(|e| gone(child, qemu_log, e))?;
        // TCG can be slow to even start the command: allow a margin.
        let what = format!("the guest to run `{}`", first_line(script));
        self.until_agent(
            &what,
            timeout + Duration::from_secs(30),
            |agent| agent.reply(id),
            |status| format!("QEMU exited ({status}) while the guest ran `{script}`"),
        )
    }

    /// Like [`Vm::sh`], but fails unless the command exits with status 0;
    /// returns its output.
    pub fn check(&mut self, script: &str, timeout: Duration) -> Result<String> {
        let reply = self.sh(script, timeout)?;
        if reply.rc != 0 {
            bail!(
                "guest command `{}` failed with status {}:\n{}",
                first_line(script),
                reply.rc,
                reply.out.trim_end()
            );
        }
        Ok(reply.out)
    }

    /// QEMU's pid (as this process sees it).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The inodes of the sockets QEMU holds: one that appears is a connection QEMU made (or
    /// accepted) since the last look, e.g. a vhost-user reconnect.
    pub fn sockets(&self) -> Result<std::collections::BTreeSet<u64>> {
        let dir = format!("/proc/{}/fd", self.pid());
        let mut inodes = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            let Ok(target) = std::fs::read_link(entry?.path()) else {
                continue;
            };
            let text = target.to_string_lossy();
            if let Some(inode) = text
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse().ok())
            {
                inodes.insert(inode);
            }
        }
        Ok(inodes)
    }

    /// Waits for the guest to power off.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let status = self.child.wait_timeout(timeout);
        self.console.poll()?;
        status
    }

    /// Asks the guest to power off and waits for QEMU to exit; kills it if
    /// that takes too long.
    pub fn shutdown(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        if let Some(agent) = self.agent.as_mut() {
            agent.send("poweroff -f", Duration::from_secs(5)).ok();
        }
        match self.child.wait_timeout(Duration::from_secs(20)) {
            Ok(status) => Ok(status),
            Err(_) => Ok(self.child.stop()?.0),
        }
    }

    /// `RESULT name=value` lines the guest printed so far.
    pub fn results(&self) -> &BTreeMap<String, String> {
        &self.console.results
    }
}

fn first_line(script: &str) -> &str {
    script.lines().next().unwrap_or(script)
}

/// Follows a serial log file (QEMU's, or virtlogd's for a libvirt domain), line by line,
/// collecting the guest's `RESULT key=value` lines.
pub struct Console {
    path: PathBuf,
    file: Option<File>,
    pending: Vec<u8>,
    echo: bool,
    /// The `RESULT key=value` lines seen so far.
    pub results: BTreeMap<String, String>,
}

impl Console {
    /// Follows `path` (it may not exist yet); `echo` prints each line as `guest| ...`.
    pub fn new(path: PathBuf, echo: bool) -> Self {
        Console {
            path,
            file: None,
            pending: Vec::new(),
            echo,
            results: BTreeMap::new(),
        }
    }

    /// Complete lines written since the last call.
    pub fn poll(&mut self) -> Result<Vec<String>> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(_) => return Ok(Vec::new()), // QEMU has not created it yet
            }
        }
        if let Some(file) = &mut self.file {
            file.read_to_end(&mut self.pending)
                .with_context(|| format!("reading {}", self.path.display()))?;
        }
        let mut lines = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw).trim_end().to_string();
            if self.echo {
                println!("guest| {line}");
            }
            // Kernel messages may share a line with ours: look anywhere.
            if let Some(at) = line.find("RESULT ") {
                if let Some((key, value)) = line[at + 7..].split_once('=') {
                    self.results
                        .insert(key.trim().to_string(), value.trim().to_string());
                }
            }
            lines.push(line);
        }
        Ok(lines)
    }
}
