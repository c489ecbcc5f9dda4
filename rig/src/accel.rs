//! KVM or TCG: a short probe VM decides, once per run.
//!
//! `/dev/kvm` can exist and still not work (nested virtualization often
//! fails: QEMU aborts setting an MSR, or the guest never gets going), so the
//! only honest test is to boot: the kernel and the base initramfs under
//! `accel=kvm`, which prints `SCENARIO-EXIT` and powers off within seconds
//! when KVM works. Anything else (QEMU failing, a timeout) means TCG.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::process::TempDir;
pub use crate::qemu::Accel;
use crate::qemu::{Nic, Vm, VmConfig};

/// The verdict and why, cached for the rest of the run.
static VERDICT: OnceLock<(Accel, String)> = OnceLock::new();

/// How long a KVM guest may take to boot the probe and power off.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// KVM if a probe VM boots under it, TCG otherwise; probed once per run.
/// Returns the accelerator and a one-line reason.
pub fn detect(kernel: &Path, initramfs: &Path, log_dir: &Path) -> Result<(Accel, String)> {
    if let Some(verdict) = VERDICT.get() {
        return Ok(verdict.clone());
    }
    let verdict = probe(kernel, initramfs, log_dir)?;
    Ok(VERDICT.get_or_init(|| verdict).clone())
}

/// Uses `accel` as given (no probe) for the rest of the run.
pub fn force(accel: Accel) -> (Accel, String) {
    VERDICT
        .get_or_init(|| (accel, "chosen on the command line".into()))
        .clone()
}

fn probe(kernel: &Path, initramfs: &Path, log_dir: &Path) -> Result<(Accel, String)> {
    if !Path::new("/dev/kvm").exists() {
        return Ok((Accel::Tcg, "no /dev/kvm".into()));
    }
    let dir = log_dir.join("kvm-probe");
    std::fs::create_dir_all(&dir)?;
    let run = TempDir::new("vhost-card-kvm-probe")?;
    let t0 = Instant::now();
    let vm = Vm::start(&VmConfig {
        kernel,
        initrd: initramfs,
        nic: Nic::None,
        mac: "52:54:00:00:00:01",
        mtu: 1500,
        append: "",
        log_dir: &dir,
        run_dir: run.path(),
        echo: false,
        accel: Accel::Kvm,
        memory_mib: 256,
        hotplug_port: false,
        agent: false,
        queues: 1,
    });
    let outcome = vm.and_then(|mut vm| {
        // The base initramfs has no scenario: init says so and powers off.
        vm.wait_for_line("the KVM probe guest", PROBE_TIMEOUT, |l| {
            l.contains("SCENARIO-EXIT")
        })
    });
    crate::interrupt::check_interrupted()?;
    Ok(match outcome {
        Ok(_) => (
            Accel::Kvm,
            format!(
                "a probe VM booted under KVM in {:.1} s",
                t0.elapsed().as_secs_f64()
            ),
        ),
        Err(err) => {
            let qemu_log = crate::process::tail(&dir.join("qemu.log"), 3);
            let why = qemu_log
                .lines()
                .find(|l| !l.trim().is_empty())
                .map_or_else(|| format!("{err:#}"), str::to_string);
            (Accel::Tcg, format!("KVM probe failed: {why}"))
        }
    })
}
