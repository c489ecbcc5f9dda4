//! `cargo xtask dist`: what a host installation needs, in target/dist/, checked; and with
//! `--install`, put where QEMU, libvirt, systemd, man and the shells look for it.
//!
//! ```text
//! target/dist/vhost-card                          the release binary
//! target/dist/man/vhost-card.1, vhost-card-*.1    man pages (clap_mangen, from the daemon's clap Args)
//! target/dist/completions/vhost-card.bash, _vhost-card, vhost-card.fish   (clap_complete)
//! target/dist/50-vhost-card.json                  vhost-user backend discovery file
//! target/dist/systemd/vhost-card@.{service,socket}, vhost-card-vduse@.service
//! target/dist/libvirt/vhost-card-vm.xml
//! target/dist/USAGE.md
//! ```
//!
//! The man pages and completions come from `vhost_card::config::Args` (the daemon's own
//! command line), so they cannot drift from `vhost-card --help`. The paths inside the JSON file
//! and the service unit follow `--prefix`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::process::{self, stdout};
use crate::schema;

/// The binary path written in the checked-in JSON file and service unit.
const DEFAULT_BINARY: &str = "/usr/local/bin/vhost-card";
/// Where QEMU's vhost-user.json says packaged backends put their discovery files.
pub const VHOST_USER_DIR: &str = "usr/share/qemu/vhost-user";
const UNITS: [&str; 3] = [
    "vhost-card@.service",
    "vhost-card@.socket",
    "vhost-card-vduse@.service",
];

#[derive(clap::Args)]
pub struct Options {
    /// Also install: the binary, man pages and completions under --prefix,
    /// 50-vhost-card.json in /usr/share/qemu/vhost-user, the units in /etc/systemd/system,
    /// the libvirt XML and USAGE.md in <prefix>/share/doc/vhost-card.
    #[arg(long)]
    pub install: bool,
    /// Root to install under (a staging directory for packaging; default: the system).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub destdir: PathBuf,
    /// Installation prefix for the binary, man pages, completions and docs.
    #[arg(long, value_name = "DIR", default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Use target/release/vhost-card as it is instead of building it first.
    #[arg(long)]
    pub no_build: bool,
}

/// Every file of the distribution, relative to target/dist, with where `--install` puts it
/// (relative to DESTDIR) and its mode.
fn layout(prefix: &Path) -> Vec<(&'static str, PathBuf, u32)> {
    let p = |rel: &str| prefix.strip_prefix("/").unwrap_or(prefix).join(rel);
    let doc = |name: &str| p("share/doc/vhost-card").join(name);
    vec![
        ("vhost-card", p("bin/vhost-card"), 0o755),
        ("man/vhost-card.1", p("share/man/man1/vhost-card.1"), 0o644),
        (
            "man/vhost-card-features.1",
            p("share/man/man1/vhost-card-features.1"),
            0o644,
        ),
        (
            "man/vhost-card-stats.1",
            p("share/man/man1/vhost-card-stats.1"),
            0o644,
        ),
        (
            "completions/vhost-card.bash",
            p("share/bash-completion/completions/vhost-card"),
            0o644,
        ),
        (
            "completions/_vhost-card",
            p("share/zsh/site-functions/_vhost-card"),
            0o644,
        ),
        (
            "completions/vhost-card.fish",
            p("share/fish/vendor_completions.d/vhost-card.fish"),
            0o644,
        ),
        (
            "50-vhost-card.json",
            Path::new(VHOST_USER_DIR).join("50-vhost-card.json"),
            0o644,
        ),
        (
            "systemd/vhost-card@.service",
            PathBuf::from("etc/systemd/system/vhost-card@.service"),
            0o644,
        ),
        (
            "systemd/vhost-card@.socket",
            PathBuf::from("etc/systemd/system/vhost-card@.socket"),
            0o644,
        ),
        (
            "systemd/vhost-card-vduse@.service",
            PathBuf::from("etc/systemd/system/vhost-card-vduse@.service"),
            0o644,
        ),
        ("libvirt/vhost-card-vm.xml", doc("vhost-card-vm.xml"), 0o644),
        ("USAGE.md", doc("USAGE.md"), 0o644),
    ]
}

pub fn run(opts: &Options) -> Result<()> {
    ensure!(
        opts.prefix.is_absolute(),
        "--prefix must be absolute: {}",
        opts.prefix.display()
    );
    if !opts.no_build {
        build_release()?;
    }
    let release = crate::target_dir().join("release/vhost-card");
    ensure!(
        release.is_file(),
        "{} does not exist (build it, or drop --no-build)",
        release.display()
    );
    let out = crate::target_dir().join("dist");
    build_dist(&release, &out, &opts.prefix)?;
    check_dist(&out, &opts.prefix)?;
    println!(
        "dist: {} files in {}, checked:",
        layout(&opts.prefix).len(),
        out.display()
    );
    for (rel, _, _) in layout(&opts.prefix) {
        let len = fs::metadata(out.join(rel))?.len();
        println!("dist:   {rel:<32} {len:>10} bytes");
    }
    if opts.install {
        install(&out, &opts.destdir, &opts.prefix)?;
    }
    Ok(())
}

fn build_release() -> Result<()> {
    println!("dist: cargo build --release -p vhost-card");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "vhost-card"])
        .current_dir(crate::workspace_root())
        .status()?;
    crate::check_interrupted()?;
    if !status.success() {
        bail!("cargo build --release -p vhost-card failed ({status})");
    }
    Ok(())
}

/// The checked-in host configuration (host-config/).
fn host_config(rel: &str) -> PathBuf {
    crate::workspace_root().join("host-config").join(rel)
}

/// Reads a checked-in file and points its binary path at `<prefix>/bin/vhost-card`.
fn with_prefix(src: &Path, prefix: &Path) -> Result<String> {
    let text = fs::read_to_string(src).with_context(|| format!("reading {}", src.display()))?;
    ensure!(
        text.contains(DEFAULT_BINARY),
        "{} does not mention {DEFAULT_BINARY}",
        src.display()
    );
    let binary = prefix.join("bin/vhost-card");
    Ok(text.replace(DEFAULT_BINARY, &binary.to_string_lossy()))
}

fn build_dist(release: &Path, out: &Path, prefix: &Path) -> Result<()> {
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    for dir in ["man", "completions", "systemd", "libvirt"] {
        fs::create_dir_all(out.join(dir))?;
    }
    fs::copy(release, out.join("vhost-card")).context("copying the binary")?;
    fs::set_permissions(out.join("vhost-card"), fs::Permissions::from_mode(0o755))?;

    write_man_pages(&out.join("man"))?;
    let mut cmd = vhost_card::config::Args::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "vhost-card", out.join("completions"))
            .with_context(|| format!("{shell} completions"))?;
    }

    fs::write(
        out.join("50-vhost-card.json"),
        with_prefix(&host_config("qemu/50-vhost-card.json"), prefix)?,
    )?;
    for unit in UNITS {
        let text = if unit.ends_with(".service") {
            with_prefix(&host_config(&format!("systemd/{unit}")), prefix)?
        } else {
            fs::read_to_string(host_config(&format!("systemd/{unit}")))?
        };
        fs::write(out.join("systemd").join(unit), text)?;
    }
    fs::copy(
        host_config("libvirt/vhost-card-vm.xml"),
        out.join("libvirt/vhost-card-vm.xml"),
    )?;
    fs::copy(host_config("USAGE.md"), out.join("USAGE.md"))?;
    Ok(())
}

/// vhost-card.1 with a FILES and a SEE ALSO section, and one page per subcommand.
fn write_man_pages(dir: &Path) -> Result<()> {
    let cmd = vhost_card::config::Args::command();
    // Pages for the subcommands (vhost-card-features.1, vhost-card-stats.1); the main page
    // is written again below with the extra sections.
    clap_mangen::generate_to(cmd.clone(), dir).context("man pages")?;
    let man = clap_mangen::Man::new(cmd.disable_help_subcommand(true));
    let mut page = Vec::new();
    man.render(&mut page)?;
    page.extend_from_slice(MAN_EXTRA.as_bytes());
    fs::write(dir.join("vhost-card.1"), page)?;
    Ok(())
}

/// Hand-written roff appended to vhost-card.1.
const MAN_EXTRA: &str = r#".SH EXIT STATUS
0 after SIGINT or SIGTERM; 1 with a one-line error on stderr (socket in use, namespace
missing, tap busy, permission denied, invalid feature selection); 159 when the seccomp
sandbox stopped a forbidden system call (named on stderr).
.SH FILES
.TP
\fI/usr/share/qemu/vhost\-user/50\-vhost\-card.json\fR
vhost\-user backend discovery file (QEMU's docs/interop/vhost\-user.json).
.TP
\fI/etc/systemd/system/vhost\-card@.socket\fR, \fIvhost\-card@.service\fR
Socket activation: instance \fIN\fR listens on \fI/run/vhost\-card/N.sock\fR and runs
\fBvhost\-card \-\-fd 3 \-\-netns N \-\-tap card0 \-\-control /run/vhost\-card/N.control\fR
on the first connection.
.TP
\fI<prefix>/share/doc/vhost\-card/vhost\-card\-vm.xml\fR
A libvirt domain with a vhostuser interface on \fI/run/vhost\-card/card.sock\fR.
.SH EXAMPLES
.nf
ip netns add card
vhost\-card \-\-socket /run/vhost\-card/card.sock \-\-netns card \-\-tap card0 \\
    \-\-control /run/vhost\-card/card.control \-\-metrics\-listen 127.0.0.1:9101
vhost\-card stats \-\-control /run/vhost\-card/card.control
systemd\-socket\-activate \-l /run/vhost\-card/card.sock vhost\-card \-\-fd 3 \-\-netns card
systemctl enable \-\-now vhost\-card@card.socket
.fi
.SH SEE ALSO
\fBqemu\-system\-x86_64\fR(1), \fBvirsh\fR(1), \fBsystemd.socket\fR(5),
\fBsystemd\-socket\-activate\fR(1), \fBip\-netns\fR(8)
"#;

/// Checks every file: schema, man page syntax, shell syntax, systemd unit syntax.
fn check_dist(out: &Path, prefix: &Path) -> Result<()> {
    for (rel, _, _) in layout(prefix) {
        ensure!(out.join(rel).is_file(), "target/dist/{rel} was not written");
    }

    // The discovery file and what the binary prints, against QEMU's schema.
    let json_path = out.join("50-vhost-card.json");
    let json = fs::read_to_string(&json_path)?;
    schema::validate("VhostUserBackend", &json)
        .with_context(|| format!("{} against the schema", json_path.display()))?;
    let binary = prefix.join("bin/vhost-card");
    ensure!(
        json.contains(&format!("\"binary\": \"{}\"", binary.display())),
        "50-vhost-card.json does not name {}",
        binary.display()
    );
    let caps = stdout(Command::new(out.join("vhost-card")).arg("--print-capabilities"))?;
    schema::validate("VHostUserBackendCapabilities", &caps)
        .context("`vhost-card --print-capabilities` against the schema")?;
    ensure!(
        json.contains("\"type\": \"net\"") && caps.contains("\"type\":\"net\""),
        "the discovery file and --print-capabilities disagree on the type: {json} / {caps}"
    );
    println!(
        "dist: 50-vhost-card.json and --print-capabilities ({caps}) match QEMU's vhost-user schema"
    );

    // Man pages: groff must read them without a warning.
    for page in [
        "vhost-card.1",
        "vhost-card-features.1",
        "vhost-card-stats.1",
    ] {
        let path = out.join("man").join(page);
        let text = fs::read_to_string(&path)?;
        ensure!(text.contains(".TH "), "{page} has no .TH header");
        if which("groff") {
            let o = Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(&path)
                .output()?;
            let warnings = String::from_utf8_lossy(&o.stderr);
            ensure!(
                o.status.success() && warnings.trim().is_empty(),
                "groff complains about {page}:\n{warnings}"
            );
        }
    }
    let main = fs::read_to_string(out.join("man/vhost-card.1"))?;
    for flag in [
        "socket",
        "fd",
        "print\\-capabilities",
        "control",
        "metrics\\-listen",
    ] {
        ensure!(
            main.contains(&format!("\\-\\-{flag}")),
            "vhost-card.1 does not document --{flag}"
        );
    }

    // Completion scripts parse in their shells (those that are installed).
    for (shell, file) in [
        ("bash", "vhost-card.bash"),
        ("zsh", "_vhost-card"),
        ("fish", "vhost-card.fish"),
    ] {
        let path = out.join("completions").join(file);
        let text = fs::read_to_string(&path)?;
        ensure!(
            text.contains("print-capabilities") && text.contains("socket-path"),
            "{file} lacks the daemon's flags"
        );
        if which(shell) {
            process::run(Command::new(shell).arg("-n").arg(&path))
                .with_context(|| format!("{shell} -n {file}"))?;
        }
    }

    // systemd units: `systemd-analyze verify` with ExecStart pointing at the dist binary
    // (the prefix path need not exist yet).
    if which("systemd-analyze") {
        let tmp = process::TempDir::new("vhost-card-units")?;
        let bin = out.join("vhost-card");
        for unit in UNITS {
            let text = fs::read_to_string(out.join("systemd").join(unit))?.replace(
                &binary.to_string_lossy().into_owned(),
                &bin.to_string_lossy(),
            );
            fs::write(tmp.path().join(unit), text)?;
        }
        let o = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(tmp.path().join("vhost-card@card.service"))
            .arg(tmp.path().join("vhost-card@card.socket"))
            .arg(tmp.path().join("vhost-card-vduse@card.service"))
            .output()?;
        let msg = String::from_utf8_lossy(&o.stderr);
        ensure!(
            o.status.success() && msg.trim().is_empty(),
            "systemd-analyze verify vhost-card@card.service vhost-card@card.socket \
             vhost-card-vduse@card.service:\n{msg}"
        );
        println!("dist: systemd-analyze verify: the units are valid");
    }
    Ok(())
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn install(out: &Path, destdir: &Path, prefix: &Path) -> Result<()> {
    for (rel, dest, mode) in layout(prefix) {
        let dest = destdir.join(dest);
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Through a temporary name, so a running binary is replaced, not overwritten.
        let tmp = dest.with_extension("dist-tmp");
        fs::copy(out.join(rel), &tmp).with_context(|| format!("installing {}", dest.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, &dest)?;
        println!("dist: installed {}", dest.display());
    }
    // What QEMU and libvirt find there is what we checked.
    let installed = destdir.join(VHOST_USER_DIR).join("50-vhost-card.json");
    schema::validate("VhostUserBackend", &fs::read_to_string(&installed)?)
        .with_context(|| format!("{}", installed.display()))?;
    if destdir == Path::new("/") && Path::new("/run/systemd/system").exists() {
        process::run(Command::new("systemctl").arg("daemon-reload"))?;
        println!("dist: systemctl daemon-reload done");
    }
    println!("dist: enable a card with: systemctl enable --now vhost-card@card.socket");
    println!(
        "dist: or, as a device of this host (VDUSE): systemctl enable --now vhost-card-vduse@card"
    );
    Ok(())
}
