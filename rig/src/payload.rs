//! The bulk test data: deterministic pseudo-random bytes (seeded xorshift),
//! cached under target/vm/, with their SHA-256 from coreutils' `sha256sum`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use anyhow::{bail, Context, Result};

pub struct Payload {
    pub path: PathBuf,
    pub data: Vec<u8>,
    pub sha256: String,
}

/// Fixed, so every run sends the same bytes.
const SEED: u64 = 0x7643_6172_6430_0001;

/// `size` bytes, written to (or read back from) target/vm/payload-<size>.bin.
pub fn ensure(size: usize) -> Result<Payload> {
    let path = crate::paths::vm_dir().join(format!("payload-{size}.bin"));
    let data = generate(size);
    let cached = std::fs::read(&path).is_ok_and(|old| old == data);
    if !cached {
        std::fs::write(&path, &data).with_context(|| format!("writing {}", path.display()))?;
    }
    let sha256 = sha256_file(&path)?;
    Ok(Payload { path, data, sha256 })
}

fn generate(size: usize) -> Vec<u8> {
    let mut state = SEED;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(size);
    out
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let out = crate::process::stdout(Command::new("sha256sum").arg(path))?;
    parse_sum(&out)
}

/// The hex digest at the start of a `sha256sum` line.
pub fn parse_sum(line: &str) -> Result<String> {
    let hex = line.split_whitespace().next().unwrap_or("");
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("not a sha256sum line: {line:?}");
    }
    Ok(hex.to_string())
}

/// A running `sha256sum` fed through a pipe, for data arriving in pieces.
pub struct Hasher {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Hasher {
    pub fn new() -> Result<Self> {
        let mut child = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sha256sum")?;
        let stdin = child.stdin.take();
        Ok(Hasher { child, stdin })
    }

    pub fn update(&mut self, data: &[u8]) -> Result<()> {
        match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(data).context("feeding sha256sum"),
            None => bail!("sha256sum already finished"),
        }
    }

    pub fn finish(mut self) -> Result<String> {
        drop(self.stdin.take());
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        let status = self.child.wait()?;
        if !status.success() {
            bail!("sha256sum failed ({status})");
        }
        parse_sum(&out)
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        // Closing its input ends it; reap it so no zombie is left.
        drop(self.stdin.take());
        self.child.wait().ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic() {
        let a = generate(1000);
        assert_eq!(a, generate(1000));
        assert_eq!(&generate(2000)[..1000], &a[..]);
        assert_ne!(a[..8], a[8..16]);
    }
}
