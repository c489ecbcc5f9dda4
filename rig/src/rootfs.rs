//! The root file systems of the Debian guests (networkd, NetworkManager): a
//! small Debian made by `debootstrap` from apt (systemd, udev, iproute2,
//! iputils-ping and the network manager), with that manager enabled and
//! nothing else configured, packed as an uncompressed cpio archive the
//! kernel unpacks as its initramfs (no disk, no loop mount). Cached in
//! target/vm/networkd/<name>-<key>/, where the key covers the suite,
//! mirror, package list and this recipe, so changing any of them builds
//! anew. [`ensure_tree`] keeps the same kind of Debian as a directory
//! (target/vm/nspawn/<name>-<key>/root/) for `systemd-nspawn --boot`.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cpio::Archive;
use crate::process::{run, stdout};

pub const SUITE: &str = "bookworm";
pub const MIRROR: &str = "http://deb.debian.org/debian";
/// What `debootstrap --variant=minbase --include=` adds to Debian's required
/// packages for every guest: the init system with systemd-networkd and
/// udev, `ip` and `ping` for the checks, kmod for module autoloading.
pub const BASE_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "iproute2",
    "iputils-ping",
    "kmod",
];
/// Bump when what [`build`] does to the tree changes.
const RECIPE: u32 = 1;

/// One guest's rootfs.
pub struct Recipe {
    /// Cache directory prefix.
    pub name: &'static str,
    /// Added to [`BASE_PACKAGES`].
    pub packages: &'static [&'static str],
    /// `systemctl enable`d, as the host's administrator would ("": nothing).
    pub enable: &'static str,
}

impl Recipe {
    fn packages(&self) -> String {
        BASE_PACKAGES
            .iter()
            .chain(self.packages)
            .copied()
            .collect::<Vec<_>>()
            .join(",")
    }
}
/// Time allowed for debootstrap (about 40 s on a fresh machine).
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(900);

/// Left out of the image: documentation, translations and apt's downloads.
const TRIM: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt",
    "var/lib/apt/lists",
];

pub struct Rootfs {
    /// The uncompressed newc archive ([`ensure`]), or the tree's root ([`ensure_tree`]).
    pub path: PathBuf,
    /// `package version` lines of what dpkg installed.
    pub versions: String,
    /// How long debootstrap and packing took, when this call built it.
    pub built_in: Option<Duration>,
}

impl Rootfs {
    /// The installed version of `package`, or "?".
    pub fn version(&self, package: &str) -> &str {
        self.versions
            .lines()
            .find_map(|l| l.strip_prefix(package)?.strip_prefix(' '))
            .unwrap_or("?")
    }
}

/// FNV-1a: a stable hash for the cache key (std's hasher may change).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn key(recipe: &Recipe) -> String {
    format!(
        "{}-{SUITE}-{:016x}",
        recipe.name,
        fnv1a(&format!(
            "{SUITE} {MIRROR} minbase {} enable {} recipe {RECIPE}",
            recipe.packages(),
            recipe.enable
        ))
    )
}

/// The cached rootfs, built first if it is missing or its key changed.
pub fn ensure(recipe: &Recipe) -> Result<Rootfs> {
    ensure_as(recipe, Form::Cpio)
}

/// The cached tree of `recipe` (a directory to boot with `systemd-nspawn`; never written to:
/// boot it with `--volatile=overlay`), made first if it is missing or its key changed.
pub fn ensure_tree(recipe: &Recipe) -> Result<Rootfs> {
    ensure_as(recipe, Form::Tree)
}

/// What is kept of a debootstrap.
#[derive(Clone, Copy, PartialEq)]
enum Form {
    /// An initramfs: target/vm/networkd/<key>/rootfs.cpio.
    Cpio,
    /// The directory: target/vm/nspawn/<key>/root/.
    Tree,
}

fn ensure_as(recipe: &Recipe, form: Form) -> Result<Rootfs> {
    let (base, product) = match form {
        Form::Cpio => (crate::paths::vm_dir().join("networkd"), "rootfs.cpio"),
        Form::Tree => (crate::paths::vm_dir().join("nspawn"), "root"),
    };
    let dir = base.join(key(recipe));
    let path = dir.join(product);
    let versions_file = dir.join("VERSIONS");
    if path.exists() && versions_file.exists() {
        return Ok(Rootfs {
            path,
            versions: fs::read_to_string(&versions_file)?,
            built_in: None,
        });
    }
    let t0 = Instant::now();
    // Older keys of this guest: another package list or recipe.
    if base.exists() {
        for entry in fs::read_dir(&base)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{}-", recipe.name)) && entry.path() != dir {
                remove(&entry.path());
            }
        }
    }
    remove(&dir);
    crate::apt::install(match form {
        Form::Cpio => &["debootstrap"][..],
        Form::Tree => &["debootstrap", "systemd-container"],
    })?;
    let build_dir = base.join(format!("build-{}-{}", recipe.name, std::process::id()));
    let root = build_dir.join("root");
    let result = bootstrap(recipe, &root, &dir).and_then(|versions| {
        fs::create_dir_all(&dir)?;
        match form {
            Form::Cpio => {
                let bytes = pack(&root)?;
                let tmp = dir.join("rootfs.cpio.tmp");
                fs::write(&tmp, &bytes)?;
                fs::rename(&tmp, &path)?;
                println!(
                    "{}: rootfs {} MB in {}",
                    recipe.name,
                    bytes.len() / 1_000_000,
                    dir.display()
                );
            }
            Form::Tree => {
                fs::rename(&root, &path)?;
                println!("{}: tree in {}", recipe.name, path.display());
            }
        }
        fs::write(&versions_file, versions + "\n")?;
        Ok(())
    });
    remove(&build_dir);
    result?;
    Ok(Rootfs {
        path,
        versions: fs::read_to_string(&versions_file)?,
        built_in: Some(t0.elapsed()),
    })
}

fn remove(path: &Path) {
    if path.is_dir() {
        fs::remove_dir_all(path).ok();
    } else {
        fs::remove_file(path).ok();
    }
}

/// debootstrap of `recipe` into `root`, its unit enabled, trimmed; the installed versions.
fn bootstrap(recipe: &Recipe, root: &Path, dir: &Path) -> Result<String> {
    fs::create_dir_all(root)?;
    println!(
        "{}: debootstrap --variant=minbase --include={} {SUITE} (cached in {})",
        recipe.name,
        recipe.packages(),
        dir.display()
    );
    let log = fs::File::create(root.with_file_name("debootstrap.log"))?;
    let status = Command::new("timeout")
        .arg(DEBOOTSTRAP_TIMEOUT.as_secs().to_string())
        .args(["debootstrap", "--variant=minbase"])
        .arg(format!("--include={}", recipe.packages()))
        .arg(SUITE)
        .arg(root)
        .arg(MIRROR)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running debootstrap")?;
    crate::interrupt::check_interrupted()?;
    if !status.success() {
        bail!(
            "debootstrap failed ({status}):\n{}",
            crate::process::tail(&root.with_file_name("debootstrap.log"), 20)
        );
    }
    // As a host's administrator would (networkd's Also= brings its socket
    // and wait-online).
    if !recipe.enable.is_empty() {
        run(Command::new("systemctl")
            .arg(format!("--root={}", root.display()))
            .args(["enable", recipe.enable]))?;
    }
    fs::write(
        root.join("etc/hostname"),
        format!("{}-guest\n", recipe.name),
    )?;
    for trim in TRIM {
        let path = root.join(trim);
        if path.is_dir() {
            fs::remove_dir_all(&path)?;
            fs::create_dir(&path)?;
        }
    }
    stdout(
        Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                root.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f=${Package} ${Version}\\n"]),
    )
}

/// The tree as a newc archive with owners and modes; /dev, /proc, /sys and
/// /run stay empty (systemd mounts them) but for /dev/console.
fn pack(root: &Path) -> Result<Vec<u8>> {
    let mut archive = Archive::new();
    walk(root, root, &mut archive)?;
    archive.char_dev("dev/console", 0o600, 5, 1);
    Ok(archive.finish())
}

fn walk(root: &Path, dir: &Path, archive: &mut Archive) -> Result<()> {
    let mut entries = fs::read_dir(dir)?
        .map(|e| Ok(e?.path()))
        .collect::<Result<Vec<_>>>()?;
    entries.sort();
    for path in entries {
        let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
        let meta = fs::symlink_metadata(&path)?;
        let owner = (meta.uid(), meta.gid());
        let ft = meta.file_type();
        if ft.is_dir() {
            archive.node(&rel, meta.mode(), owner, b"");
            if !["dev", "proc", "sys", "run"].contains(&rel.as_str()) {
                walk(root, &path, archive)?;
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(&path)?;
            archive.node(
                &rel,
                meta.mode(),
                owner,
                target.to_string_lossy().as_bytes(),
            );
        } else if ft.is_file() {
            let data = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            archive.node(&rel, meta.mode(), owner, &data);
        }
        // Device nodes, fifos and sockets: none outside /dev in a fresh
        // debootstrap.
    }
    Ok(())
}
