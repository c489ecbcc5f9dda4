//! card-os: the card's network node, from the card's file (`/etc/vhost-card/<card>.toml`).
//!
//! * [`config`]: the file (serde + toml), errors with file, line and key;
//! * [`render`]: the generated files (nftables ruleset, nginx, strongSwan) from the templates
//!   in `<share>/templates/`; pure;
//! * [`check`]: those files checked by their programs (`nft -c`, `nginx -t`), nothing changed;
//! * [`node`]: `up`, `reload`, `down`, with roll-back of a failed `up`;
//! * [`link`]: the host link (addresses, routes) over netlink; [`supervise`]: `card-os run`;
//! * [`daemon`]: who serves the card's socket, and starting vhost-card when nobody does;
//! * [`ipsec`]: the tunnel (kernel ESP or strongSwan); [`status`]; [`prereq`]: the programs
//!   needed and their Debian packages; [`cmd`]: running them; [`cli`]: the command line;
//!   [`error`]: what failed, in words.

pub mod check;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod daemon;
pub mod error;
pub mod ipsec;
pub mod link;
pub mod node;
pub mod prereq;
pub mod render;
pub mod status;
pub mod supervise;

pub use config::Config;
pub use error::{Error, Result};
