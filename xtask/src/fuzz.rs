//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` (vnet header and frame handling,
//! descriptor chains over mock guest memory, vhost-user and VDUSE messages) for a time budget, installing cargo-fuzz first if
//! it is missing. The stable toolchain builds them with `RUSTC_BOOTSTRAP=1`.
//!
//! New inputs go to a scratch corpus under `target/fuzz-corpus/`; the committed seeds in
//! `fuzz/corpus/` are read, never written.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const TARGETS: &[&str] = &[
    "vnet_frame",
    "desc_chain",
    "vhost_msg",
    "reasm",
    "vduse_msg",
    "handover_state",
];

#[derive(clap::Args)]
pub struct Options {
    /// Run each target for a short fixed time (20 s), as CI does.
    #[arg(long, conflicts_with = "minutes")]
    smoke: bool,
    /// Minutes per target.
    #[arg(long, default_value_t = 5)]
    minutes: u64,
    /// Only this target (default: all).
    #[arg(long)]
    target: Option<String>,
}

fn ensure_cargo_fuzz(cargo: &std::ffi::OsStr) -> Result<()> {
    let have = Command::new(cargo)
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if have {
        return Ok(());
    }
    println!("fuzz: installing cargo-fuzz from crates.io");
    let status = Command::new(cargo)
        .args(["install", "--locked", "cargo-fuzz"])
        .status()
        .context("cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed ({status})");
    }
    Ok(())
}

/// libFuzzer's closing line: "Done N runs in S second(s)".
fn executions(stderr: &str) -> Option<(u64, u64)> {
    let line = stderr.lines().rev().find(|l| l.starts_with("Done "))?;
    let mut w = line.split_whitespace();
    let runs = w.nth(1)?.parse().ok()?;
    let secs = w.nth(2)?.parse().ok()?;
    Some((runs, secs))
}

pub fn run(opts: &Options) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    ensure_cargo_fuzz(&cargo)?;
    let root = rig::paths::workspace_root();
    let fuzz_dir = root.join("fuzz");
    let seconds = if opts.smoke { 20 } else { opts.minutes * 60 };
    let targets: Vec<&str> = match &opts.target {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!("unknown fuzz target {t}; targets: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    let mut failed = 0;
    // Each target: the build (quick once cached) and its time budget.
    let mut progress =
        rig::progress::Progress::new("fuzz", targets.len(), targets.len() as u64 * (seconds + 10));
    for t in &targets {
        rig::interrupt::check_interrupted()?;
        progress.start(&format!("{t} for {seconds} s"), seconds + 10);
        let scratch = rig::paths::target_dir().join("fuzz-corpus").join(t);
        std::fs::create_dir_all(&scratch)?;
        let seeds = fuzz_dir.join("corpus").join(t);
        let started = Instant::now();
        let out = Command::new(&cargo)
            .current_dir(&fuzz_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", "-O", t])
            .arg(&scratch)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // One input that runs this long is a hang: reported as a failure with its input in
            // fuzz/artifacts/, instead of outliving the budget (libFuzzer's default is 20 min).
            .arg("-timeout=10")
            .arg("-print_final_stats=1")
            .output()
            .with_context(|| format!("cargo fuzz run {t}"))?;
        let stderr = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let took = started.elapsed().as_secs();
        match (out.status.success(), executions(&stderr)) {
            (true, Some((runs, secs))) => {
                progress.println(format!(
                    "PASS fuzz {t}: {runs} executions in {secs} s, no crash"
                ));
            }
            (true, None) => {
                progress.println(format!("PASS fuzz {t}: finished in {took} s, no crash"))
            }
            (false, _) => {
                failed += 1;
                let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
                progress.suspend(|| {
                    eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
                    println!("FAIL fuzz {t}: see the output above and fuzz/artifacts/{t}/");
                });
            }
        }
    }
    progress.finish();
    println!("{} passed, {failed} failed", targets.len() - failed);
    if failed > 0 {
        bail!("{failed} fuzz target(s) failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_totals() {
        let s =
            "#1024 pulse\nDone 917825 runs in 41 second(s)\nstat::number_of_executed_units: 1\n";
        assert_eq!(executions(s), Some((917825, 41)));
        assert_eq!(executions("nothing"), None);
    }
}
