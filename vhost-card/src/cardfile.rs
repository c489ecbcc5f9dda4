//! The card's file, `/etc/vhost-card/<card>.toml`: one file per card, the single source of
//! truth for the card's daemon (its `[daemon]` table, read here) and for its network node (the
//! other tables, read by `card-os`).
//!
//! `vhost-card --config FILE` reads `[daemon]`: every key is one of the daemon's long flags
//! without the dashes (`mtu = 65520`, `queues = 2`, `mac = "52:54:00:12:34:56"`,
//! `disable = ["guest-tso4"]`, `keep-tap = true`; `_` and `-` are the same; a flag whose value
//! may be left out takes `true` for the flag alone: `metrics-listen = true`). Each value goes
//! through the flag's own parser, so the file accepts exactly what the command line does, and
//! a bad value is reported with the file, the line and the key. Flags given on the command
//! line win over the file, and keys that conflict with them are left out (under `--fd 3` the
//! socket is systemd's: the file's `socket`, `socket-group` and `socket-mode` do not apply;
//! nor under `--vduse NAME`, where the card is a VDUSE device and has no socket).
//!
//! The card's name is the file's name without `.toml`. It names everything else, so that the
//! systemd units (instance = card name), `card-os` and the daemon agree on one table of paths
//! ([`CardPaths`]): the network namespace is the card's name, and unless the file says
//! otherwise the vhost-user socket is `/run/vhost-card/<card>.sock` (none for a VDUSE card:
//! `vduse = NAME` in the file or `--vduse NAME`) and the control socket
//! `/run/vhost-card/<card>.control`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use thiserror::Error;

use crate::config::Args;

/// Where the cards' files live.
pub const CONFIG_DIR: &str = "/etc/vhost-card";
/// Runtime files: sockets at the top, one directory per card below.
pub const RUN_DIR: &str = "/run/vhost-card";
/// State that survives a reboot (card-os's IPsec keys), one directory per card.
pub const STATE_DIR: &str = "/var/lib/vhost-card";

/// The paths of card `name`, as the units and card-os use them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardPaths {
    /// `/etc/vhost-card/<card>.toml`
    pub config: PathBuf,
    /// `/run/vhost-card/<card>.sock`: vhost-card@<card>.socket's ListenStream=.
    pub socket: PathBuf,
    /// `/run/vhost-card/<card>.control`: the daemon's counters.
    pub control: PathBuf,
    /// `/run/vhost-card/<card>/`: card-os's runtime files (generated configs, pid files,
    /// logs). card-os@<card>.service's RuntimeDirectory=.
    pub run_dir: PathBuf,
    /// `/run/vhost-card/<card>.daemon/`: the daemon's private directory, vhost-card@<card>'s
    /// RuntimeDirectory= (apart from card-os's, so a daemon restart never removes those).
    pub daemon_dir: PathBuf,
    /// `/var/lib/vhost-card/<card>/`: state that survives a reboot.
    pub state_dir: PathBuf,
}

impl CardPaths {
    pub fn of(name: &str) -> CardPaths {
        let run = Path::new(RUN_DIR);
        CardPaths {
            config: Path::new(CONFIG_DIR).join(format!("{name}.toml")),
            socket: run.join(format!("{name}.sock")),
            control: run.join(format!("{name}.control")),
            run_dir: run.join(name),
            daemon_dir: run.join(format!("{name}.daemon")),
            state_dir: Path::new(STATE_DIR).join(name),
        }
    }
}

#[derive(Debug, Error)]
pub enum FileError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: the file name must be <card>.toml with a card name of 1 to 15 letters, digits, '-' or '_' (it names the card's network namespace)")]
    Name { path: PathBuf },
    #[error("{path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("{path}:{line}: [daemon] {key}: {message}")]
    Key {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// The card's name: the file name without `.toml`.
pub fn card_name(path: &Path) -> Result<String, FileError> {
    let bad = || FileError::Name {
        path: path.to_path_buf(),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".toml"))
        .ok_or_else(bad)?;
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(name.to_string())
    } else {
        Err(bad())
    }
}

/// The 1-based line of byte offset `at` in `text`.
pub fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// Only the `[daemon]` table; the other tables are card-os's.
#[derive(serde::Deserialize)]
struct DaemonView {
    #[serde(default)]
    daemon: BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>>,
}

/// The `[daemon]` table of `text` (the file at `path`) as command-line arguments, each value
/// checked by its flag's own parser. `skip(id)` says which flags (by clap id) not to take from
/// the file, because the command line sets them or conflicts with them.
pub fn daemon_args(
    path: &Path,
    text: &str,
    skip: impl Fn(&str) -> bool,
) -> Result<Vec<OsString>, FileError> {
    let view: DaemonView = toml::from_str(text).map_err(|e| FileError::Toml {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let cmd = Args::command();
    let mut out = Vec::new();
    for (key, value) in &view.daemon {
        let line = line_of(text, key.span().start);
        let err = |message: String| FileError::Key {
            path: path.to_path_buf(),
            line,
            key: key.get_ref().clone(),
            message,
        };
        let id = key.get_ref().replace('-', "_");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id().as_str() == id && a.get_long().is_some())
            .filter(|_| !matches!(id.as_str(), "config" | "print_capabilities" | "fd"))
            .ok_or_else(|| err(format!("unknown key (the keys are {})", known_keys(&cmd))))?;
        if skip(&id) {
            continue;
        }
        let long = format!("--{}", arg.get_long().unwrap_or_default());
        let takes_value = arg.get_action().takes_values();
        // A flag whose value may be left out (`--metrics-listen [ADDR]`): `true` is the flag
        // alone.
        let optional_value = arg.get_num_args().is_some_and(|n| n.min_values() == 0);
        let values: Vec<String> = match (value.get_ref(), takes_value) {
            (toml::Value::Boolean(b), false) => {
                if *b {
                    out.push(OsString::from(&long));
                }
                continue;
            }
            (toml::Value::Boolean(b), true) if optional_value => {
                if *b {
                    out.push(OsString::from(&long));
                }
                continue;
            }
            (_, false) => return Err(err("must be true or false".into())),
            (toml::Value::String(s), true) => vec![s.clone()],
            (toml::Value::Integer(i), true) => vec![i.to_string()],
            (toml::Value::Array(items), true) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    other => Err(err(format!("cannot take {other} in a list"))),
                })
                .collect::<Result<_, _>>()?,
            (other, true) => return Err(err(format!("must be a string or a number, not {other}"))),
        };
        if values.len() > 1 && !matches!(arg.get_action(), clap::ArgAction::Append) {
            return Err(err("takes one value, not a list".into()));
        }
        for v in values {
            // The flag's own parser, alone on a command line (other rules, such as --group
            // requiring --user, are checked with the whole command line later).
            let alone = ["vhost-card", "--print-capabilities", &long, &v];
            if let Err(e) = cmd.clone().try_get_matches_from(alone) {
                use clap::error::ErrorKind::{InvalidValue, ValueValidation};
                if matches!(e.kind(), InvalidValue | ValueValidation) {
                    return Err(err(first_line(&e.to_string())));
                }
            }
            out.push(OsString::from(&long));
            out.push(OsString::from(v));
        }
    }
    Ok(out)
}

fn known_keys(cmd: &clap::Command) -> String {
    cmd.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| {
            !matches!(
                *l,
                "config" | "print-capabilities" | "fd" | "help" | "version"
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// clap's message without its "error: " tag and usage lines.
fn first_line(msg: &str) -> String {
    msg.lines()
        .next()
        .unwrap_or(msg)
        .trim_start_matches("error: ")
        .to_string()
}

/// The daemon's arguments with `--config FILE` applied: the file's `[daemon]` table and the
/// card's implied paths ([`CardPaths`]: namespace, socket, control socket) under the flags
/// given on the command line (`argv`, program name first).
pub fn resolve(argv: Vec<OsString>) -> Result<Args, ResolveError> {
    resolve_with(argv, None)
}

/// [`resolve`] with the file's text given instead of read (the systemd generator, card-os).
pub fn resolve_text(argv: Vec<OsString>, text: &str) -> Result<Args, ResolveError> {
    resolve_with(argv, Some(text))
}

/// [`resolve`], with the file's text given (`None`: read the file).
fn resolve_with(argv: Vec<OsString>, text: Option<&str>) -> Result<Args, ResolveError> {
    let cmd = Args::command();
    let matches = cmd.clone().try_get_matches_from(&argv)?;
    let args = Args::from_arg_matches(&matches)?;
    let Some(path) = args.config.clone() else {
        return Ok(args);
    };
    let text = match text {
        Some(t) => t.to_string(),
        None => std::fs::read_to_string(&path).map_err(|cause| FileError::Read {
            path: path.clone(),
            cause,
        })?,
    };
    let name = card_name(&path)?;
    let on_command_line = |id: &str| {
        matches.try_contains_id(id).unwrap_or(false)
            && matches.value_source(id) == Some(ValueSource::CommandLine)
    };
    let skip = |id: &str| given_or_conflicting(&cmd, &on_command_line, id);
    let mut file = daemon_args(&path, &text, skip)?;
    // The card's paths, where neither the file nor the command line says otherwise (or sets
    // a flag that excludes them: no socket for a VDUSE card).
    let paths = CardPaths::of(&name);
    for (id, value) in [
        ("netns", OsString::from(&name)),
        ("socket", paths.socket.into_os_string()),
        ("control", paths.control.into_os_string()),
    ] {
        let in_file = |id: &str| {
            let long = format!("--{}", id.replace('_', "-"));
            file.iter().any(|a| a.to_str() == Some(long.as_str()))
        };
        if !skip(id) && !given_or_conflicting(&cmd, &in_file, id) {
            file.push(format!("--{id}").into());
            file.push(value);
        }
    }
    let mut all = vec![argv[0].clone()];
    all.extend(file);
    all.extend(argv.into_iter().skip(1));
    let matches = cmd.try_get_matches_from(all)?;
    Ok(Args::from_arg_matches(&matches)?)
}

/// Whether the flag `id` was `given`, or conflicts with one that was.
fn given_or_conflicting(cmd: &clap::Command, given: &dyn Fn(&str) -> bool, id: &str) -> bool {
    if given(id) {
        return true;
    }
    // Conflicts are declared on one of the two flags (`--fd` conflicts with `--socket`).
    let conflicts = |a: &str, b: &str| {
        cmd.get_arguments()
            .find(|x| x.get_id().as_str() == a)
            .is_some_and(|x| {
                cmd.get_arg_conflicts_with(x)
                    .iter()
                    .any(|y| y.get_id() == b)
            })
    };
    cmd.get_arguments().any(|other| {
        let o = other.get_id().as_str();
        given(o) && (conflicts(id, o) || conflicts(o, id))
    })
}

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error(transparent)]
    File(#[from] FileError),
}

/// Parses the process's command line, `--config FILE` applied; exits with a message on error,
/// as `Args::parse` does.
pub fn parse_args() -> Args {
    match resolve(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(ResolveError::Cli(e)) => e.exit(),
        Err(ResolveError::File(e)) => {
            eprintln!("vhost-card: error: {e}");
            std::process::exit(1);
        }
    }
}

/// How the host reaches the card's daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The vhost-user socket a VMM connects to.
    Socket(PathBuf),
    /// `vduse = NAME`: the VDUSE device /dev/vduse/NAME of the daemon's own host.
    Vduse(String),
}

impl Endpoint {
    /// The socket, or the VDUSE device node.
    pub fn path(&self) -> PathBuf {
        match self {
            Endpoint::Socket(p) => p.clone(),
            Endpoint::Vduse(name) => Path::new("/dev/vduse").join(name),
        }
    }

    /// `socket PATH` or `VDUSE device /dev/vduse/NAME`.
    pub fn describe(&self) -> String {
        match self {
            Endpoint::Socket(p) => format!("socket {}", p.display()),
            Endpoint::Vduse(_) => format!("VDUSE device {}", self.path().display()),
        }
    }
}

/// What card-os needs of the daemon's settings in a card's file: the same resolution the
/// daemon does with `vhost-card --config FILE`.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    pub netns: String,
    pub tap: String,
    pub endpoint: Endpoint,
    pub control: Option<PathBuf>,
    pub mtu: u16,
    /// `link = "ip"`: the card's end is a TUN device (the IP-only link).
    pub link: crate::config::Link,
}

/// The daemon's settings as `vhost-card --config path` would resolve them, `text` being the
/// file's content.
pub fn daemon_settings(path: &Path, text: &str) -> Result<DaemonSettings, ResolveError> {
    let argv = vec!["vhost-card".into(), "--config".into(), path.into()];
    let args = resolve_with(argv, Some(text))?;
    let endpoint = match (&args.vduse, &args.socket) {
        (Some(name), _) => Endpoint::Vduse(name.clone()),
        (None, Some(socket)) => Endpoint::Socket(socket.clone()),
        (None, None) => {
            return Err(FileError::Key {
                path: path.to_path_buf(),
                line: 1,
                key: "socket".into(),
                message: "no socket".into(),
            }
            .into())
        }
    };
    Ok(DaemonSettings {
        netns: args.netns.clone().unwrap_or_default(),
        tap: args.tap.clone(),
        endpoint,
        control: args.control.clone(),
        mtu: args.mtu,
        link: args.link,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("vhc-cardfile-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn argv(extra: &[&str]) -> Vec<OsString> {
        std::iter::once("vhost-card")
            .chain(extra.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn the_file_sets_flags_and_the_command_line_wins() {
        let (dir, path) = write(
            "c1.toml",
            "[card]\nmode = \"nat\"\n[daemon]\nmtu = 9000\nqueues = 2\nkeep-tap = true\n\
             disable = [\"guest-tso4\", \"guest-tso6\"]\nmac = \"52:54:00:00:00:01\"\n",
        );
        let p = path.to_str().unwrap();
        let a = resolve(argv(&["--config", p])).unwrap();
        assert_eq!(a.mtu, 9000);
        assert_eq!(a.queues, 2);
        assert!(a.keep_tap);
        assert_eq!(a.disable, vec!["guest-tso4", "guest-tso6"]);
        assert_eq!(a.netns.as_deref(), Some("c1"));
        assert_eq!(a.socket, Some(PathBuf::from("/run/vhost-card/c1.sock")));
        assert_eq!(a.control, Some(PathBuf::from("/run/vhost-card/c1.control")));
        assert_eq!(a.metrics_listen, None);
        let a = resolve(argv(&["--config", p, "--mtu", "1500", "--disable", "csum"])).unwrap();
        assert_eq!(a.mtu, 1500);
        assert_eq!(a.disable, vec!["csum"]);
        // --fd replaces the socket (the socket unit's descriptor).
        let a = resolve(argv(&["--fd", "3", "--config", p])).unwrap();
        assert_eq!(a.socket, None);
        assert_eq!(a.fd, Some(3));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn metrics_socket_access_and_log_level_keys() {
        let (dir, path) = write(
            "c3.toml",
            "[daemon]\nmetrics-listen = true\nsocket-group = \"0\"\nsocket-mode = \"0660\"\n\
             log-level = \"debug\"\n",
        );
        let p = path.to_str().unwrap();
        let a = resolve(argv(&["--config", p])).unwrap();
        assert_eq!(a.metrics_listen, Some(([127, 0, 0, 1], 10046).into()));
        assert_eq!(a.socket_group.as_deref(), Some("0"));
        assert_eq!(a.socket_mode, Some(0o660));
        assert_eq!(a.log_level, Some(crate::config::LogLevel::Debug));
        // Under socket activation the socket is systemd's: its group and mode are the socket
        // unit's, not the file's.
        let a = resolve(argv(&["--fd", "3", "--config", p])).unwrap();
        assert_eq!((a.socket_group, a.socket_mode), (None, None));
        assert_eq!(a.metrics_listen, Some(([127, 0, 0, 1], 10046).into()));
        std::fs::write(&path, "[daemon]\nmetrics-listen = \"[::1]:9000\"\n").unwrap();
        let a = resolve(argv(&["--config", p])).unwrap();
        assert_eq!(a.metrics_listen, Some("[::1]:9000".parse().unwrap()));
        std::fs::write(&path, "[daemon]\nmetrics-listen = false\n").unwrap();
        let a = resolve(argv(&["--config", p])).unwrap();
        assert_eq!(a.metrics_listen, None);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn bad_keys_and_values_name_file_line_and_key() {
        for (text, want) in [
            ("[daemon]\nmtu = 70000\n", ":2: [daemon] mtu: "),
            ("[daemon]\n\nwarp = 9\n", ":3: [daemon] warp: unknown key"),
            (
                "[daemon]\nmac = \"01:00:00:00:00:00\"\n",
                ":2: [daemon] mac: ",
            ),
            (
                "[daemon]\nkeep-tap = 1\n",
                "keep-tap: must be true or false",
            ),
            ("[daemon]\nmtu = [1, 2]\n", "mtu: takes one value"),
            (
                "[daemon]\nmetrics-listen = \"x:1\"\n",
                ":2: [daemon] metrics-listen: ",
            ),
            (
                "[daemon]\nsocket-mode = \"0800\"\n",
                ":2: [daemon] socket-mode: ",
            ),
            (
                "[daemon]\nlog-level = \"loud\"\n",
                ":2: [daemon] log-level: ",
            ),
            ("[daemon]\nfd = 3\n", "fd: unknown key"),
            ("[daemon\n", "TOML parse error at line 1"),
        ] {
            let (dir, path) = write("c2.toml", text);
            let e = resolve(argv(&["--config", path.to_str().unwrap()]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("c2.toml"), "{text:?}: {e}");
            std::fs::remove_dir_all(dir).ok();
        }
        assert!(card_name(Path::new("/etc/vhost-card/a b.toml")).is_err());
        assert!(card_name(Path::new("/etc/vhost-card/much-too-long-name.toml")).is_err());
        assert_eq!(card_name(Path::new("/x/card.toml")).unwrap(), "card");
    }

    #[test]
    fn a_vduse_card_has_no_socket() {
        let (dir, path) = write(
            "c4.toml",
            "[daemon]\nvduse = \"c4\"\nvduse-bind = \"vhost\"\nhost-mac = \"02:00:00:00:00:04\"\n\
             vduse-bounce-mib = 128\nmtu = 9000\n",
        );
        let p = path.to_str().unwrap();
        let a = resolve(argv(&["--config", p])).unwrap();
        assert_eq!(a.vduse.as_deref(), Some("c4"));
        assert_eq!(a.socket, None);
        assert_eq!(a.vduse_bounce_mib, Some(128));
        assert_eq!(a.netns.as_deref(), Some("c4"));
        assert_eq!(a.control, Some(PathBuf::from("/run/vhost-card/c4.control")));
        let text = std::fs::read_to_string(&path).unwrap();
        let d = daemon_settings(&path, &text).unwrap();
        assert_eq!(d.endpoint, Endpoint::Vduse("c4".into()));
        assert_eq!(d.endpoint.path(), Path::new("/dev/vduse/c4"));
        // The file makes it a VDUSE card: its companions may come from the command line.
        let a = resolve(argv(&[
            "--config",
            p,
            "--vduse-bind",
            "none",
            "--host-mac",
            "02:00:00:00:00:05",
            "--vduse-bounce-mib",
            "96",
        ]))
        .unwrap();
        assert_eq!(a.vduse_bind, Some(crate::vduse::vdpa::Bind::None));
        assert_eq!(a.host_mac, Some([2, 0, 0, 0, 0, 5]));
        assert_eq!(a.vduse_bounce_mib, Some(96));
        // A card whose file names a socket, run as a VDUSE device from the command line (as
        // vhost-card-vduse@.service does): the file's socket settings do not apply.
        std::fs::write(
            &path,
            "[daemon]\nsocket = \"/run/x.sock\"\nsocket-mode = \"0600\"\nmtu = 1500\n",
        )
        .unwrap();
        let a = resolve(argv(&["--config", p, "--vduse", "c4"])).unwrap();
        assert_eq!((a.socket, a.socket_mode, a.mtu), (None, None, 1500));
        // Without --vduse, the VDUSE-only keys are refused (by the daemon's configuration).
        std::fs::write(&path, "[daemon]\nhost-mac = \"02:00:00:00:00:04\"\n").unwrap();
        let a = resolve(argv(&["--config", p])).unwrap();
        let e = crate::config::Config::try_from(a).unwrap_err().to_string();
        assert!(e.contains("only with --vduse"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn paths_table() {
        let p = CardPaths::of("card");
        assert_eq!(p.config, Path::new("/etc/vhost-card/card.toml"));
        assert_eq!(p.socket, Path::new("/run/vhost-card/card.sock"));
        assert_eq!(p.run_dir, Path::new("/run/vhost-card/card"));
        assert_eq!(p.daemon_dir, Path::new("/run/vhost-card/card.daemon"));
        assert_eq!(p.state_dir, Path::new("/var/lib/vhost-card/card"));
    }
}
