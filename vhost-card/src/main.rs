use vhost_card::config::{capabilities_json, Command, Config};
use vhost_card::{control, daemon, features};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = vhost_card::cardfile::parse_args();
    match &args.command {
        Some(Command::Features) => {
            print!("{}", features::table());
            return;
        }
        Some(Command::Stats { control }) => match control::query(control) {
            Ok(json) => {
                print!("{json}");
                return;
            }
            Err(e) => {
                eprintln!("vhost-card: error: cannot read {}: {e}", control.display());
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
