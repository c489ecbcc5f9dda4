use vhost_card::config::{capabilities_json, Command, Config};
use vhost_card::{control, daemon, features};

fn main() {
    let args = vhost_card::cardfile::parse_args();
    // --log-level (or the card file's log-level), else RUST_LOG, else info.
    let mut log = match args.log_level {
        Some(level) => {
            let mut b = env_logger::Builder::new();
            b.filter_level(level.into());
            b
        }
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")),
    };
    log.format_timestamp_millis().init();
    match &args.command {
        Some(Command::Features) => {
            print!("{}", features::table());
            return;
        }
        Some(Command::Stats { control, json }) => match control::query_snapshot(control) {
            Ok(snap) => {
                if *json {
                    match serde_json::to_string_pretty(&snap) {
                        Ok(text) => println!("{text}"),
                        Err(e) => {
                            eprintln!("vhost-card: error: {e}");
                            std::process::exit(1);
                        }
                    }
                } else {
                    print!("{}", snap.table());
                }
                return;
            }
            Err(e) => {
                eprintln!("vhost-card: error: cannot read {}: {e}", control.display());
                std::process::exit(1);
            }
        },
        Some(Command::Upgrade {
            control,
            binary,
            args,
        }) => match vhost_card::upgrade::upgrade(control, binary.as_deref(), args) {
            Ok(u) => {
                println!(
                    "vhost-card: process {} ({}) serves the session; outage {:.1} ms",
                    u.pid,
                    u.binary.display(),
                    u.outage.as_secs_f64() * 1000.0
                );
                return;
            }
            Err(e) => {
                eprintln!("vhost-card: upgrade: {e}");
                std::process::exit(1);
            }
        },
        None => {}
    }
    if args.print_capabilities {
        println!("{}", capabilities_json());
        return;
    }
    let result = Config::try_from(args)
        .map_err(anyhow::Error::from)
        .and_then(|cfg| daemon::run(cfg).map_err(anyhow::Error::from));
    if let Err(e) = result {
        eprintln!("vhost-card: error: {e:#}");
        std::process::exit(1);
    }
}
