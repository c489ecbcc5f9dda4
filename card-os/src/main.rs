use card_os::cli::{Cli, Command};
use card_os::{check, node, status, supervise, Config};
use clap::Parser;

fn fail(e: impl std::fmt::Display, code: i32) -> ! {
    eprintln!("card-os: error: {e}");
    std::process::exit(code);
}

fn main() {
    let cli = Cli::parse();
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && !matches!(cli.command, Command::Status { .. }) {
        fail(
            "card-os needs root (network namespaces, nftables, nginx)",
            1,
        );
    }
    if let Command::Run = cli.command {
        if let Err(e) = supervise::run(&cli.config) {
            fail(format!("{e}"), 1);
        }
        return;
    }
    let cfg = match Config::load(&cli.config) {
        Ok(cfg) => cfg,
        // LSB: status 4 is "unknown".
        Err(e) => fail(
            e,
            if matches!(cli.command, Command::Status { .. }) {
                4
            } else {
                1
            },
        ),
    };
    let result = match cli.command {
        Command::Up => node::up(&cfg).map(|r| {
            for line in r.lines {
                println!("card-os: {line}");
            }
            print!("{}", status::status(&cfg).text());
        }),
        Command::Down => node::down(&cfg).map(|how| println!("card-os: card {}: {how}", cfg.name)),
        Command::Reload => node::reload(&cfg).map(|r| println!("card-os: reloaded ({r})")),
        Command::Check => check::check(&cfg).map(|lines| {
            for line in lines {
                println!("check: {line}");
            }
            println!("check: {} is good", cfg.source.display());
        }),
        Command::Status { json } => {
            let s = status::status(&cfg);
            if json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            } else {
                print!("{}", s.text());
            }
            std::process::exit(if s.up { 0 } else { 3 });
        }
        Command::Run => unreachable!(),
    };
    if let Err(e) = result {
        fail(format!("{e}"), 1);
    }
}
