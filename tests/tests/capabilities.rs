//! QEMU's vhost-user backend program conventions (docs/interop/vhost-user.rst): what
//! `--print-capabilities` prints and the discovery file host-config/qemu/50-vhost-card.json
//! are valid against vhost-user.json (our JSON Schema rendering of it,
//! host-config/qemu/vhost-user.schema.json, checked with Debian's python3-jsonschema), and the
//! daemon takes the conventional `--socket-path` and stops cleanly on SIGTERM.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use card_tests::daemon::binary;
use card_tests::netns::Netns;
use card_tests::TempDir;

/// Debian's interpreter, which python3-jsonschema from apt belongs to.
const PYTHON: &str = "/usr/bin/python3";

const VALIDATE: &str = r##"
import json, sys
from jsonschema import Draft202012Validator
schema = json.load(open(sys.argv[1]))
Draft202012Validator.check_schema(schema)
root = {"$defs": schema["$defs"], "$ref": "#/$defs/" + sys.argv[2]}
errors = list(Draft202012Validator(root).iter_errors(json.loads(sys.stdin.read())))
for e in errors:
    print("/".join(str(p) for p in e.path) or "(root)", ":", e.message)
sys.exit(1 if errors else 0)
"##;

fn host_config(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../host-config")
        .join(rel)
}

/// Whether `doc` is a valid `definition` of the schema; Err if the validator cannot run.
fn valid(definition: &str, doc: &str) -> Result<(bool, String)> {
    let ok = Command::new(PYTHON)
        .args(["-c", "import jsonschema"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "{PYTHON} cannot import jsonschema: apt-get install python3-jsonschema \
             (`cargo xtask dist` installs it)"
        );
    }
    let mut child = Command::new(PYTHON)
        .arg("-c")
        .arg(VALIDATE)
        .arg(host_config("qemu/vhost-user.schema.json"))
        .arg(definition)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(doc.as_bytes())?;
    let out = child.wait_with_output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => Ok((true, text)),
        Some(1) if out.stderr.is_empty() => Ok((false, text)),
        _ => bail!("the validator failed ({}): {text}", out.status),
    }
}

fn print_capabilities(extra: &[&str]) -> Result<String> {
    let out = Command::new(binary()?)
        .arg("--print-capabilities")
        .args(extra)
        .output()?;
    ensure!(
        out.status.success(),
        "--print-capabilities {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn print_capabilities_is_a_valid_net_backend() -> Result<()> {
    let caps = print_capabilities(&[])?;
    let (ok, why) = valid("VHostUserBackendCapabilities", &caps)?;
    ensure!(ok, "--print-capabilities printed {caps:?}: {why}");
    ensure!(caps.trim() == r#"{"type":"net"}"#, "printed {caps:?}");
    // "Other options and arguments should be ignored" (nothing is opened or created).
    for extra in [&["--socket-path=/nonexistent/dir/s"][..], &["--fd=3"]] {
        ensure!(
            print_capabilities(extra)? == caps,
            "the output changed with {extra:?}"
        );
    }
    Ok(())
}

#[test]
fn discovery_file_is_valid_and_matches_the_binary() -> Result<()> {
    let path = host_config("qemu/50-vhost-card.json");
    let doc = std::fs::read_to_string(&path)?;
    let (ok, why) = valid("VhostUserBackend", &doc)?;
    ensure!(ok, "{}: {why}", path.display());
    let caps = print_capabilities(&[])?;
    ensure!(
        doc.contains(r#""type": "net""#) && caps.contains(r#""type":"net""#),
        "type differs between {} and --print-capabilities ({caps})",
        path.display()
    );
    ensure!(
        doc.contains(r#""binary": "/usr/local/bin/vhost-card""#),
        "the discovery file should name the binary `cargo xtask dist --install` installs"
    );
    Ok(())
}

/// The schema is not vacuous: it refuses what QEMU's QAPI definitions refuse.
#[test]
fn schema_refuses_invalid_documents() -> Result<()> {
    let caps = [
        (r#"{"type":"net"}"#, true),
        (
            r#"{"type":"input","features":["evdev-path","no-grab"]}"#,
            true,
        ),
        (r#"{"type":"gpu","features":["virgl"]}"#, true),
        (r#"{"type":"nett"}"#, false),
        (r#"{}"#, false),
        (r#"{"type":"net","features":[]}"#, false),
        (r#"{"type":"input"}"#, false),
        (r#"{"type":"gpu","features":["no-grab"]}"#, false),
        (r#"{"type":"net","mtu":65520}"#, false),
    ];
    for (doc, want) in caps {
        let (ok, why) = valid("VHostUserBackendCapabilities", doc)?;
        ensure!(ok == want, "{doc}: valid={ok}, expected {want} ({why})");
    }
    let files = [
        (
            r#"{"description":"d","type":"net","binary":"/usr/bin/x","tags":["a"]}"#,
            true,
        ),
        (r#"{"description":"d","type":"net"}"#, false),
        (r#"{"description":"d","type":"net","binary":"x"}"#, false),
        (r#"{"description":"d","type":"nic","binary":"/x"}"#, false),
        (
            r#"{"description":"d","type":"net","binary":"/x","socket":"/s"}"#,
            false,
        ),
    ];
    for (doc, want) in files {
        let (ok, why) = valid("VhostUserBackend", doc)?;
        ensure!(ok == want, "{doc}: valid={ok}, expected {want} ({why})");
    }
    Ok(())
}

/// `--socket-path=PATH` (the conventions' name) serves like --socket, and SIGTERM ends the
/// daemon at once, removing the socket.
#[test]
fn socket_path_option_and_sigterm() -> Result<()> {
    card_tests::require_root()?;
    let ns = Netns::new("cap")?;
    let dir = TempDir::new("card-tests")?;
    let sock = dir.path().join("conv.sock");
    let args = [
        format!("--socket-path={}", sock.display()),
        "--netns".into(),
        ns.name().into(),
        "--tap".into(),
        "card0".into(),
    ];
    let log = dir.path().join("daemon.log");
    let mut child = rig::daemon::command(&binary()?, &args, &log, dir.path())?.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("the daemon exited ({status}) before listening");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no socket at {} after 10 s", sock.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let offer = card_tests::frontend::Control::connect(&sock)?.handshake()?;
    ensure!(offer.features & (1 << 32) != 0, "no VERSION_1 in the offer");
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the daemon did not end within 5 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(status.success(), "exit status after SIGTERM: {status}");
    ensure!(!sock.exists(), "the socket was left behind");
    Ok(())
}
