//! `cargo xtask dist`: what a host installation needs, in target/dist/, checked; and with
//! `--install`, put where QEMU, libvirt, systemd, man and the shells look for it.
//!
//! ```text
//! target/dist/vhost-card, card-os                 the release binaries
//! target/dist/man/vhost-card*.1, card-os*.1       man pages (clap_mangen, from their clap definitions)
//! target/dist/completions/vhost-card.bash, _vhost-card, vhost-card.fish, and card-os's (clap_complete)
//! target/dist/50-vhost-card.json                  vhost-user backend discovery file
//! target/dist/systemd/vhost-card@.{service,socket}, card-os@.service, vhost-card-vduse@.service
//! target/dist/vhost-card-generator                the systemd generator (each card's socket settings from its file)
//! target/dist/prometheus/vhost-card.rules.yml      alert rules (promtool check rules + test rules)
//! target/dist/grafana/vhost-card.json             the Grafana dashboard
//! target/dist/card.toml                           the example card (/etc/vhost-card/card.toml, never overwritten)
//! target/dist/share/templates/*.in, share/www/    card-os's templates and web pages (<prefix>/share/vhost-card/)
//! target/dist/host-config/...                    the VM side's files (<prefix>/share/vhost-card/host-config/)
//! target/dist/libvirt/vhost-card-vm.xml
//! target/dist/USAGE.md, card-os.md
//! ```
//!
//! The man pages and completions come from `vhost_card::config::Args` and `card_os::cli::Cli`
//! (the programs' own command lines), so they cannot drift from `--help`. The paths inside the
//! JSON file and the service units follow `--prefix`, and so do the system directories: with
//! `--prefix /usr` (a distribution's package) the units and the generator go to
//! `/usr/lib/systemd/system{,-generators}` and the discovery file to `/usr/share/qemu/vhost-user`;
//! with any other prefix (`/usr/local`, `/opt/...`: the administrator's own install) to
//! `/etc/systemd/system{,-generators}` and `/etc/qemu/vhost-user`, the places systemd and QEMU's
//! `docs/interop/vhost-user.json` give the system administrator.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::process::{self, stdout};
use crate::schema;

/// The binaries' directory written in the checked-in JSON file and service units.
const DEFAULT_BIN_DIR: &str = "/usr/local/bin/";
/// The system directories a prefix installs into (relative to DESTDIR).
pub struct SystemDirs {
    /// systemd units.
    pub units: PathBuf,
    /// systemd generators.
    pub generators: PathBuf,
    /// vhost-user backend discovery files (QEMU's docs/interop/vhost-user.json).
    pub vhost_user: PathBuf,
}

impl SystemDirs {
    /// A distribution's directories for `--prefix /usr`, the administrator's (/etc) otherwise.
    pub fn of(prefix: &Path) -> SystemDirs {
        let (units, generators, vhost_user) = if prefix == Path::new("/usr") {
            (
                "usr/lib/systemd/system",
                "usr/lib/systemd/system-generators",
                "usr/share/qemu/vhost-user",
            )
        } else {
            (
                "etc/systemd/system",
                "etc/systemd/system-generators",
                "etc/qemu/vhost-user",
            )
        };
        SystemDirs {
            units: units.into(),
            generators: generators.into(),
            vhost_user: vhost_user.into(),
        }
    }
}
const UNITS: [&str; 4] = [
    "vhost-card@.service",
    "vhost-card@.socket",
    "card-os@.service",
    "vhost-card-vduse@.service",
];
/// The programs, built with `cargo build --release -p NAME`.
const PROGRAMS: [&str; 2] = ["vhost-card", "card-os"];
/// The systemd generator (built with vhost-card).
const GENERATOR: &str = "vhost-card-generator";
/// The operators' files: alert rules (with their promtool test) and the Grafana dashboard,
/// installed in <prefix>/share/vhost-card/.
const MONITORING: [&str; 2] = ["prometheus/vhost-card.rules.yml", "grafana/vhost-card.json"];
/// The alert rules' unit test (`promtool test rules`), checked here, not installed.
const RULES_TEST: &str = "prometheus/vhost-card.rules.test.yml";
/// host-config's files for the VM side, installed in <prefix>/share/vhost-card/host-config/.
const HOST_CONFIG: [(&str, u32); 5] = [
    ("README.md", 0o644),
    ("card-link.sh", 0o755),
    ("networkd/10-vhost-card.link", 0o644),
    ("networkd/10-vhost-card.network", 0o644),
    ("networkmanager/vhost-card.nmconnection", 0o644),
];
/// The example card: installed once, never overwritten.
const EXAMPLE: &str = "etc/vhost-card/card.toml";

#[derive(clap::Args)]
pub struct Options {
    /// Also install: vhost-card and card-os, their man pages and completions under --prefix,
    /// card-os's templates and www/, the alert rules and the Grafana dashboard in
    /// <prefix>/share/vhost-card, 50-vhost-card.json in /etc/qemu/vhost-user, the units in
    /// /etc/systemd/system and the generator in /etc/systemd/system-generators (with --prefix
    /// /usr: /usr/share/qemu/vhost-user, /usr/lib/systemd/system and system-generators), the
    /// example card /etc/vhost-card/card.toml (never overwritten), host-config's files for the
    /// VM in <prefix>/share/vhost-card/host-config, the libvirt XML and the docs in
    /// <prefix>/share/doc/vhost-card.
    #[arg(long)]
    pub install: bool,
    /// Root to install under (a staging directory for packaging; default: the system).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub destdir: PathBuf,
    /// Installation prefix for the binary, man pages, completions and docs.
    #[arg(long, value_name = "DIR", default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Use target/release/{vhost-card,card-os} as they are instead of building them first.
    #[arg(long)]
    pub no_build: bool,
}

/// One file of the distribution: where it is in target/dist, where `--install` puts it
/// (relative to DESTDIR) and its mode.
struct Entry {
    rel: String,
    dest: PathBuf,
    mode: u32,
}

/// The man pages clap_mangen writes for `cmd`: NAME.1 and NAME-SUB.1 for each subcommand.
fn man_pages(cmd: &clap::Command) -> Vec<String> {
    let name = cmd.get_name().to_string();
    std::iter::once(format!("{name}.1"))
        .chain(
            cmd.get_subcommands()
                .filter(|s| s.get_name() != "help")
                .map(|s| format!("{name}-{}.1", s.get_name())),
        )
        .collect()
}

/// card-os's templates and web pages, relative to card-os/ (templates/*.in, www/...).
fn card_os_share() -> Result<Vec<String>> {
    let root = rig::paths::workspace_root().join("card-os");
    let mut files = Vec::new();
    for dir in ["templates", "www"] {
        for entry in fs::read_dir(root.join(dir))? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                files.push(format!("{dir}/{}", entry.file_name().to_string_lossy()));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Every file of the distribution.
fn layout(prefix: &Path) -> Result<Vec<Entry>> {
    let p = |rel: &str| prefix.strip_prefix("/").unwrap_or(prefix).join(rel);
    let doc = |name: &str| p("share/doc/vhost-card").join(name);
    let e = |rel: &str, dest: PathBuf, mode: u32| Entry {
        rel: rel.to_string(),
        dest,
        mode,
    };
    let dirs = SystemDirs::of(prefix);
    let mut out = Vec::new();
    for program in PROGRAMS {
        out.push(e(program, p(&format!("bin/{program}")), 0o755));
        out.push(e(
            &format!("completions/{program}.bash"),
            p(&format!("share/bash-completion/completions/{program}")),
            0o644,
        ));
        out.push(e(
            &format!("completions/_{program}"),
            p(&format!("share/zsh/site-functions/_{program}")),
            0o644,
        ));
        out.push(e(
            &format!("completions/{program}.fish"),
            p(&format!("share/fish/vendor_completions.d/{program}.fish")),
            0o644,
        ));
    }
    for cmd in [
        vhost_card::config::Args::command(),
        card_os::cli::Cli::command(),
    ] {
        for page in man_pages(&cmd) {
            out.push(e(
                &format!("man/{page}"),
                p(&format!("share/man/man1/{page}")),
                0o644,
            ));
        }
    }
    out.push(e(
        "50-vhost-card.json",
        dirs.vhost_user.join("50-vhost-card.json"),
        0o644,
    ));
    for unit in UNITS {
        out.push(e(&format!("systemd/{unit}"), dirs.units.join(unit), 0o644));
    }
    out.push(e(GENERATOR, dirs.generators.join(GENERATOR), 0o755));
    for file in MONITORING {
        out.push(e(file, p(&format!("share/vhost-card/{file}")), 0o644));
    }
    out.push(e("card.toml", PathBuf::from(EXAMPLE), 0o644));
    for file in card_os_share()? {
        out.push(e(
            &format!("share/{file}"),
            p(&format!("share/vhost-card/{file}")),
            0o644,
        ));
    }
    // host-config: what the VM (the host of the card's link) needs, to copy into it.
    for (file, mode) in HOST_CONFIG {
        out.push(e(
            &format!("host-config/{file}"),
            p(&format!("share/vhost-card/host-config/{file}")),
            mode,
        ));
    }
    out.push(e(
        "libvirt/vhost-card-vm.xml",
        doc("vhost-card-vm.xml"),
        0o644,
    ));
    out.push(e("USAGE.md", doc("USAGE.md"), 0o644));
    out.push(e("card-os.md", doc("card-os.md"), 0o644));
    Ok(out)
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
    let release = rig::paths::target_dir().join("release");
    for program in PROGRAMS {
        ensure!(
            release.join(program).is_file(),
            "{} does not exist (build it, or drop --no-build)",
            release.join(program).display()
        );
    }
    let out = rig::paths::target_dir().join("dist");
    build_dist(&release, &out, &opts.prefix)?;
    check_dist(&out, &opts.prefix)?;
    let layout = layout(&opts.prefix)?;
    println!(
        "dist: {} files in {}, checked:",
        layout.len(),
        out.display()
    );
    for entry in &layout {
        let len = fs::metadata(out.join(&entry.rel))?.len();
        println!("dist:   {:<40} {len:>10} bytes", entry.rel);
    }
    if opts.install {
        install(&out, &opts.destdir, &opts.prefix)?;
    }
    Ok(())
}

fn build_release() -> Result<()> {
    rig::paths::cargo_build(true, &["-p", "vhost-card", "-p", "card-os"]).map(drop)
}

/// The checked-in host configuration (host-config/).
fn host_config(rel: &str) -> PathBuf {
    rig::paths::workspace_root().join("host-config").join(rel)
}

/// Reads a checked-in file and points its binaries (`/usr/local/bin/...`) at `<prefix>/bin/`.
fn with_prefix(src: &Path, prefix: &Path) -> Result<String> {
    let text = fs::read_to_string(src).with_context(|| format!("reading {}", src.display()))?;
    ensure!(
        text.contains(DEFAULT_BIN_DIR),
        "{} does not mention {DEFAULT_BIN_DIR}",
        src.display()
    );
    let bin = format!("{}/", prefix.join("bin").display());
    Ok(text.replace(DEFAULT_BIN_DIR, &bin))
}

fn build_dist(release: &Path, out: &Path, prefix: &Path) -> Result<()> {
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    for dir in [
        "man",
        "completions",
        "systemd",
        "libvirt",
        "share",
        "prometheus",
        "grafana",
    ] {
        fs::create_dir_all(out.join(dir))?;
    }
    for program in PROGRAMS {
        fs::copy(release.join(program), out.join(program))
            .with_context(|| format!("copying {program}"))?;
        fs::set_permissions(out.join(program), fs::Permissions::from_mode(0o755))?;
    }
    fs::copy(release.join(GENERATOR), out.join(GENERATOR))
        .with_context(|| format!("copying {GENERATOR}"))?;
    for file in MONITORING.into_iter().chain([RULES_TEST]) {
        fs::copy(host_config(file), out.join(file)).with_context(|| format!("copying {file}"))?;
    }

    write_man_pages(&out.join("man"))?;
    for (mut cmd, name) in [
        (vhost_card::config::Args::command(), "vhost-card"),
        (card_os::cli::Cli::command(), "card-os"),
    ] {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            clap_complete::generate_to(shell, &mut cmd, name, out.join("completions"))
                .with_context(|| format!("{name}: {shell} completions"))?;
        }
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
    let card_os = rig::paths::workspace_root().join("card-os");
    fs::copy(card_os.join("card.toml"), out.join("card.toml"))?;
    for file in card_os_share()? {
        let dest = out.join("share").join(&file);
        fs::create_dir_all(dest.parent().context("no parent")?)?;
        fs::copy(card_os.join(&file), dest)?;
    }
    fs::copy(card_os.join("README.md"), out.join("card-os.md"))?;
    for (file, _) in HOST_CONFIG {
        let dest = out.join("host-config").join(file);
        fs::create_dir_all(dest.parent().context("no parent")?)?;
        fs::copy(host_config(file), dest)?;
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
    for (cmd, name, extra) in [
        (vhost_card::config::Args::command(), "vhost-card", MAN_EXTRA),
        (card_os::cli::Cli::command(), "card-os", CARD_OS_MAN_EXTRA),
    ] {
        // Pages for the subcommands (vhost-card-stats.1, card-os-up.1, ...); the main page is
        // written again below with the extra sections.
        clap_mangen::generate_to(cmd.clone(), dir).context("man pages")?;
        let man = clap_mangen::Man::new(cmd.disable_help_subcommand(true));
        let mut page = Vec::new();
        man.render(&mut page)?;
        page.extend_from_slice(extra.as_bytes());
        fs::write(dir.join(format!("{name}.1")), page)?;
        fs::remove_file(dir.join(format!("{name}-help.1"))).ok();
    }
    Ok(())
}

/// Hand-written roff appended to card-os.1.
const CARD_OS_MAN_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/vhost\-card/<card>.toml\fR
The card: its daemon's settings ([daemon], read by \fBvhost\-card \-\-config\fR) and its
node (every other table). The file name is the card's name and network namespace.
.TP
\fI<prefix>/share/vhost\-card/templates/\fR, \fIwww/\fR
The templates of the generated files (nftables, nginx, strongSwan) and the card's web pages.
.TP
\fI/run/vhost\-card/<card>/\fR
Runtime files: generated configs, pid files, logs, what \fBup\fR made.
.TP
\fI/var/lib/vhost\-card/<card>/\fR
State kept across reboots: the IPsec keys.
.TP
\fI/etc/systemd/system/card\-os@.service\fR (\fI/usr/lib/systemd/system/\fR when installed with prefix /usr)
\fBcard\-os run\fR for card \fIN\fR, with \fBvhost\-card@N.socket\fR.
.SH EXAMPLES
.nf
card\-os check
card\-os up
card\-os status \-\-json
card\-os \-\-config /etc/vhost\-card/card2.toml reload
systemctl enable \-\-now vhost\-card@card.socket card\-os@card.service
.fi
.SH SEE ALSO
\fBvhost\-card\fR(1), \fBnft\fR(8), \fBnginx\fR(8), \fBswanctl\fR(8), \fBip\-netns\fR(8)
"#;

/// Hand-written roff appended to vhost-card.1.
const MAN_EXTRA: &str = r#".SH EXIT STATUS
0 after SIGINT or SIGTERM (SIGHUP is logged and ignored); 1 with a one-line error on stderr
that names the cause once, in the system's words where the system refused (socket in use,
namespace missing, tap busy or not as needed, permission denied, invalid feature selection);
2 for a malformed command line; 159 when the seccomp sandbox stopped a forbidden system call
(named on stderr).
.SH FILES
.TP
\fI/etc/qemu/vhost\-user/50\-vhost\-card.json\fR
vhost\-user backend discovery file (QEMU's docs/interop/vhost\-user.json);
\fI/usr/share/qemu/vhost\-user/\fR when installed with prefix /usr.
.TP
\fI/etc/systemd/system/vhost\-card@.socket\fR, \fIvhost\-card@.service\fR
Socket activation: instance \fIN\fR listens on \fI/run/vhost\-card/N.sock\fR and runs
\fBvhost\-card \-\-fd 3 \-\-config /etc/vhost\-card/N.toml\fR on the first connection; the
socket's group and mode are the socket unit's (group kvm, mode 0660) unless the card's file
sets socket, socket\-group or socket\-mode, which \fBvhost\-card\-generator\fR (in
\fI/etc/systemd/system\-generators/\fR) turns into a drop\-in for that card's socket unit at
every \fBsystemctl daemon\-reload\fR. With prefix /usr both are under \fI/usr/lib/systemd/\fR.
.TP
\fI/etc/vhost\-card/<card>.toml\fR
The card's file: \fB\-\-config\fR reads its [daemon] table (keys: the long options, without
dashes; \fBtrue\fR for an option whose value may be left out, as \fBmetrics\-listen = true\fR);
its name gives the namespace and \fI/run/vhost\-card/<card>.{sock,control}\fR. Under
\fB\-\-fd\fR its socket, socket\-group and socket\-mode do not apply.
.TP
\fI<prefix>/share/doc/vhost\-card/vhost\-card\-vm.xml\fR
A libvirt domain with a vhostuser interface on \fI/run/vhost\-card/card.sock\fR.
.SH EXAMPLES
.nf
ip netns add card
vhost\-card \-\-socket /run/vhost\-card/card.sock \-\-netns card \-\-tap card0 \\
    \-\-control /run/vhost\-card/card.control \-\-metrics\-listen 127.0.0.1:10046
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
    let layout = layout(prefix)?;
    for entry in &layout {
        ensure!(
            out.join(&entry.rel).is_file(),
            "target/dist/{} was not written",
            entry.rel
        );
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
    let pages = layout.iter().filter_map(|e| e.rel.strip_prefix("man/"));
    for page in pages {
        let path = out.join("man").join(page);
        let text = fs::read_to_string(&path)?;
        ensure!(text.contains(".TH "), "{page} has no .TH header");
        if process::have("groff") {
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
        "config",
        "socket\\-group",
        "socket\\-mode",
        "log\\-level",
    ] {
        ensure!(
            main.contains(&format!("\\-\\-{flag}")),
            "vhost-card.1 does not document --{flag}"
        );
    }

    // Completion scripts parse in their shells (those that are installed).
    for (program, needle) in [("vhost-card", "socket-path"), ("card-os", "status")] {
        for (shell, file) in [
            ("bash", format!("{program}.bash")),
            ("zsh", format!("_{program}")),
            ("fish", format!("{program}.fish")),
        ] {
            let path = out.join("completions").join(&file);
            let text = fs::read_to_string(&path)?;
            ensure!(
                text.contains(needle) && text.contains("config"),
                "{file} lacks {program}'s flags"
            );
            if process::have(shell) {
                process::run(Command::new(shell).arg("-n").arg(&path))
                    .with_context(|| format!("{shell} -n {file}"))?;
            }
        }
    }

    // The example card reads as a card-os config (and its [daemon] as vhost-card's).
    let example = out.join("card.toml");
    card_os::Config::parse(
        &fs::read_to_string(&example)?,
        Path::new("/etc/vhost-card/card.toml"),
    )
    .with_context(|| format!("{}", example.display()))?;

    check_monitoring(out)?;

    // systemd units: `systemd-analyze verify` with ExecStart pointing at the dist binaries
    // (the prefix path need not exist yet).
    if process::have("systemd-analyze") {
        let installed_bin = format!("{}/", prefix.join("bin").display());
        let dist_bin = format!("{}/", out.display());
        let mut units = Vec::new();
        for unit in UNITS {
            let text = fs::read_to_string(out.join("systemd").join(unit))?
                .replace(&installed_bin, &dist_bin);
            units.push((unit, text));
        }
        let instances = [
            "vhost-card@card.service",
            "vhost-card@card.socket",
            "card-os@card.service",
            "vhost-card-vduse@card.service",
        ];
        rig::units::verify(&units, &instances)?;
        println!(
            "dist: systemd-analyze verify {}: the units are valid",
            instances.join(" ")
        );
    }
    Ok(())
}

/// The alert rules through `promtool check rules` and `promtool test rules` (Debian's
/// `prometheus` package ships promtool; installed when missing), the dashboard as JSON.
fn check_monitoring(out: &Path) -> Result<()> {
    if !process::have("promtool") {
        ensure!(
            rig::process::require_root().is_ok(),
            "promtool is missing: apt-get install prometheus (or run dist as root, which does)"
        );
        rig::apt::install(&["prometheus"])?;
    }
    let dir = out.join("prometheus");
    for args in [
        ["check", "rules", "vhost-card.rules.yml"],
        ["test", "rules", "vhost-card.rules.test.yml"],
    ] {
        let o = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        ensure!(
            o.status.success(),
            "promtool {} failed:\n{text}",
            args.join(" ")
        );
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            println!("dist: promtool {}: {}", args[0], line.trim());
        }
    }
    let dashboard = out.join("grafana/vhost-card.json");
    let doc: serde_json::Value = serde_json::from_str(&fs::read_to_string(&dashboard)?)
        .with_context(|| format!("{} is not JSON", dashboard.display()))?;
    let panels = doc["panels"].as_array().map_or(0, Vec::len);
    ensure!(panels > 0, "{} has no panels", dashboard.display());
    let names = rig::monitoring::dashboard_names(&fs::read_to_string(&dashboard)?)?;
    println!(
        "dist: grafana/vhost-card.json: {panels} panels over {} metrics (checked against a real \
         scrape by tests/tests/metrics.rs)",
        names.len()
    );
    Ok(())
}

fn install(out: &Path, destdir: &Path, prefix: &Path) -> Result<()> {
    for entry in layout(prefix)? {
        let dest = destdir.join(&entry.dest);
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // The card's file is the user's once installed.
        if entry.dest == Path::new(EXAMPLE) && dest.exists() {
            println!("dist: kept {} (never overwritten)", dest.display());
            continue;
        }
        // Through a temporary name, so a running binary is replaced, not overwritten.
        let tmp = dest.with_extension("dist-tmp");
        fs::copy(out.join(&entry.rel), &tmp)
            .with_context(|| format!("installing {}", dest.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(entry.mode))?;
        fs::rename(&tmp, &dest)?;
        println!("dist: installed {}", dest.display());
    }
    // What QEMU and libvirt find there is what we checked.
    let installed = destdir
        .join(SystemDirs::of(prefix).vhost_user)
        .join("50-vhost-card.json");
    schema::validate("VhostUserBackend", &fs::read_to_string(&installed)?)
        .with_context(|| format!("{}", installed.display()))?;
    if destdir == Path::new("/") && Path::new("/run/systemd/system").exists() {
        process::run(Command::new("systemctl").arg("daemon-reload"))?;
        println!("dist: systemctl daemon-reload done");
    }
    println!(
        "dist: enable card \"card\" (/etc/vhost-card/card.toml) with: \
         systemctl enable --now vhost-card@card.socket card-os@card.service"
    );
    println!(
        "dist: or, the card as a device of this host (VDUSE): \
         systemctl enable --now vhost-card-vduse@card.service"
    );
    Ok(())
}
