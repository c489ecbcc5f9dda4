//! The command line (clap); `cargo xtask dist` makes the man page and the shell completions
//! from it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "card-os",
    version,
    about = "The card's network node: addresses, forwarding, firewall and NAT, IPsec and \
             services in the card's network namespace, from /etc/vhost-card/<card>.toml",
    long_about = "card-os builds the network node of a vhost-card card from the card's file \
                  (/etc/vhost-card/<card>.toml; the file name is the card's name and its \
                  network namespace): the card's addresses and routes on the host link (the \
                  daemon's tap), network ports (veth pairs into a namespace that plays the \
                  outside network), forwarding, an nftables firewall with NAT and MSS clamping, \
                  an IPsec tunnel and nginx services. It starts the daemon (vhost-card \
                  --config FILE) only when nothing serves the card's socket; under systemd, \
                  vhost-card@<card>.socket does.\n\n\
                  Exit status: 0 on success; 1 on error; `status`: 0 when the node is up, 3 \
                  when it is down, 4 when the file cannot be read."
)]
pub struct Cli {
    /// The card's file.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = "/etc/vhost-card/card.toml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build the node (idempotent): namespace, daemon if nothing serves the socket, addresses,
    /// ports, forwarding, firewall and NAT, IPsec, services. Checks everything first; on
    /// failure, takes down what it made.
    Up,
    /// Take down what `up` made, and nothing else.
    Down,
    /// Show what is up; exit status 0 when the node is up, 3 when it is down.
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Apply a changed file to a running node, keeping the daemon, its tap and the card's
    /// addresses (the host link stays up).
    Reload,
    /// Check the file and every file made from it (nft -c, nginx -t) without changing anything.
    Check,
    /// Run as a service: `up`, then follow the card's link over netlink and put its addresses
    /// and routes back whenever the daemon creates its tap; SIGHUP reloads, SIGTERM takes the
    /// node down.
    Run,
}
