//! `vhost-card-generator NORMAL_DIR [EARLY_DIR LATE_DIR]`: the systemd generator that gives each
//! card's socket unit the socket settings of its file (see `vhost_card::generator`). Installed
//! in systemd's system-generators directory; systemd runs it at boot and at daemon-reload.
//! Problems go to the kernel log (as generators' messages do) and never fail the boot.

use std::io::Write;
use std::path::{Path, PathBuf};

fn main() {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: vhost-card-generator NORMAL_DIR [EARLY_DIR LATE_DIR]");
        std::process::exit(1);
    };
    let config_dir = Path::new(vhost_card::cardfile::CONFIG_DIR);
    let report = |line: &str| {
        // systemd gives generators no journal: /dev/kmsg, else stderr.
        match std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
            Ok(mut k) => {
                let _ = writeln!(k, "<4>vhost-card-generator: {line}");
            }
            Err(_) => eprintln!("vhost-card-generator: {line}"),
        }
    };
    match vhost_card::generator::generate(config_dir, &out) {
        Ok(problems) => problems.iter().for_each(|p| report(p)),
        Err(e) => report(&format!("writing under {}: {e}", out.display())),
    }
}
