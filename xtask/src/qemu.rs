//! Launching the test VM and following its serial console.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::process::{wait_for, Guarded};

/// Where the VM's NIC gets its packets from.
pub enum Nic<'a> {
    /// A vhost-user backend (the vhost-card daemon) listening on `socket`.
    VhostUser { socket: &'a Path },
    /// QEMU's own tap backend on an existing tap `ifname` in `netns`; QEMU
    /// runs inside that namespace. Reference setup without the daemon.
    Tap { netns: &'a Netns, ifname: &'a str },
}

pub struct VmConfig<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub nic: Nic<'a>,
    pub mac: &'a str,
    pub mtu: u32,
    /// Directory for the serial log and QEMU's stderr (qemu.log).
    pub log_dir: &'a Path,
    /// Directory for the QMP socket (short path: sockets have a length limit).
    pub run_dir: &'a Path,
    /// Echo the guest console to stdout as it arrives.
    pub echo: bool,
}

pub struct Vm {
    child: Guarded,
    console: Console,
    /// QMP socket (server, no wait) for tests that want to poke the VM.
    pub qmp: PathBuf,
    pub started: Instant,
}

impl Vm {
    pub fn start(cfg: &VmConfig) -> Result<Vm> {
        let serial_log = cfg.log_dir.join("serial.log");
        let qmp = cfg.run_dir.join("qmp.sock");
        std::fs::remove_file(&serial_log).ok();

        let mut cmd = match cfg.nic {
            Nic::VhostUser { .. } => Command::new("qemu-system-x86_64"),
            Nic::Tap { netns, .. } => netns.command("qemu-system-x86_64"),
        };
        cmd.args(["-machine", "q35,accel=tcg", "-cpu", "max"])
            .args(["-smp", "1", "-m", "512"])
            // vhost-user needs guest RAM in a shareable file descriptor.
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-numa", "node,memdev=mem"]);
        match cfg.nic {
            Nic::VhostUser { socket } => {
                let chardev = format!("socket,id=chr0,path={},reconnect=1", socket.display());
                cmd.args(["-chardev", &chardev])
                    .args(["-netdev", "vhost-user,id=net0,chardev=chr0"]);
            }
            Nic::Tap { ifname, .. } => {
                let netdev =
                    format!("tap,id=net0,ifname={ifname},script=no,downscript=no,vhost=off");
                cmd.args(["-netdev", &netdev]);
            }
        }
        // vectors=0: no MSI-X, legacy INTx only. Debian 12's QEMU 7.2
        // segfaults when a vhost-user NIC starts under TCG with MSI-X.
        let device = format!(
            "virtio-net-pci,netdev=net0,mac={},host_mtu={},vectors=0",
            cfg.mac, cfg.mtu
        );
        cmd.args(["-device", &device])
            .arg("-kernel")
            .arg(cfg.kernel)
            .arg("-initrd")
            .arg(cfg.initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .args(["-display", "none", "-no-reboot", "-nodefaults"])
            .arg("-serial")
            .arg(format!("file:{}", serial_log.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(cfg.log_dir.join("qemu.log"))?);
        let child = Guarded::spawn("QEMU", &mut cmd, libc::SIGTERM)?;
        Ok(Vm {
            child,
            console: Console::new(serial_log, cfg.echo),
            qmp,
            started: Instant::now(),
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

    /// Waits for the guest to power off.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let status = self.child.wait_timeout(timeout);
        self.console.poll()?;
        status
    }

    /// `RESULT name=value` lines the guest printed so far.
    pub fn results(&self) -> &BTreeMap<String, String> {
        &self.console.results
    }
}

/// Follows the serial log file QEMU writes, line by line.
struct Console {
    path: PathBuf,
    file: Option<File>,
    pending: Vec<u8>,
    echo: bool,
    results: BTreeMap<String, String>,
}

impl Console {
    fn new(path: PathBuf, echo: bool) -> Self {
        Console {
            path,
            file: None,
            pending: Vec::new(),
            echo,
            results: BTreeMap::new(),
        }
    }

    /// Complete lines written since the last call.
    fn poll(&mut self) -> Result<Vec<String>> {
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
