use clap::Parser;
use vhost_card::config::{Args, Command, Config};
use vhost_card::{daemon, features};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = Args::parse();
    if let Some(Command::Features) = args.command {
        print!("{}", features::table());
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
