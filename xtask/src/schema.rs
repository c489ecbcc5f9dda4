//! Validation against host-config/qemu/vhost-user.schema.json (our JSON Schema rendering of
//! QEMU's docs/interop/vhost-user.json) with Python's `jsonschema`, installed from apt
//! (python3-jsonschema) when missing.

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Debian's interpreter, the one apt's python3-jsonschema belongs to (not whatever `python3`
/// comes first in PATH).
const PYTHON: &str = "/usr/bin/python3";

/// Checks the document on stdin against `$defs/<argv[2]>` of the schema file `argv[1]`;
/// prints every error and exits 1 if there is one.
const VALIDATE: &str = r##"
import json, sys
from jsonschema import Draft202012Validator
schema = json.load(open(sys.argv[1]))
Draft202012Validator.check_schema(schema)
definition = sys.argv[2]
if definition not in schema["$defs"]:
    sys.exit("no definition " + definition)
root = {"$defs": schema["$defs"], "$ref": "#/$defs/" + definition}
doc = json.loads(sys.stdin.read())
errors = sorted(Draft202012Validator(root).iter_errors(doc), key=lambda e: list(e.path))
for e in errors:
    print("/".join(str(p) for p in e.path) or "(root)", ":", e.message)
sys.exit(1 if errors else 0)
"##;

fn have_jsonschema() -> bool {
    Command::new(PYTHON)
        .args(["-c", "import jsonschema"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs python3-jsonschema from apt unless Debian's python3 already has it.
pub fn ensure_validator() -> Result<()> {
    if have_jsonschema() {
        return Ok(());
    }
    println!("xtask: installing python3-jsonschema (apt) to validate against QEMU's schema");
    crate::apt::install(&["python3-jsonschema"])?;
    if !have_jsonschema() {
        bail!("{PYTHON} cannot import jsonschema even after installing python3-jsonschema");
    }
    Ok(())
}

/// Validates the JSON text `doc` against the schema's definition `definition`.
pub fn validate(definition: &str, doc: &str) -> Result<()> {
    ensure_validator()?;
    let schema = rig::paths::workspace_root().join("host-config/qemu/vhost-user.schema.json");
    let mut child = Command::new(PYTHON)
        .arg("-c")
        .arg(VALIDATE)
        .arg(&schema)
        .arg(definition)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {PYTHON}"))?;
    child
        .stdin
        .take()
        .context("python's stdin")?
        .write_all(doc.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "not a valid {definition}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
