//! Command line (clap) and the validated configuration it turns into.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::features::{self, FeatureError};
use crate::tap::parse_mac;
use crate::vduse::vdpa::Bind;
use crate::vduse::VduseConfig;

/// Highest MTU a Linux tap accepts (65535 minus the Ethernet header).
pub const TAP_MAX_MTU: u16 = 65521;

#[derive(Debug, Parser)]
#[command(
    name = "vhost-card",
    version,
    about = "The TOE card's PCI function: a virtio-net device (vhost-user backend, or VDUSE device \
             of this host's kernel) whose far end is a tap in the card's network namespace",
    long_about = "vhost-card serves one vhost-user socket. A VMM (QEMU, cloud-hypervisor) turns it \
                  into a virtio-net PCI device that the host's stock virtio_net driver drives. \
                  Frames go to and from a tap device (with virtio-net headers) in the card's \
                  network namespace, where the card's Linux stack owns its own addresses.\n\n\
                  The daemon listens again after the VMM disconnects and keeps the tap. \
                  SIGINT/SIGTERM stop it and remove the socket; SIGHUP is logged and ignored \
                  (the log goes to stderr: nothing to reopen).\n\n\
                  With --vduse NAME it is instead a VDUSE device of the kernel it runs on \
                  (/dev/vduse/NAME, and the vdpa device NAME on it), driven by that kernel's own \
                  virtio_net: a network interface of this host. SIGINT/SIGTERM then remove the \
                  vdpa device and destroy the VDUSE device.",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Path of the vhost-user socket to listen on (the VMM connects as client).
    #[arg(long, visible_alias = "socket-path", value_name = "PATH",
          required_unless_present_any = ["fd", "vduse", "print_capabilities", "config"])]
    pub socket: Option<PathBuf>,

    /// The card's file (/etc/vhost-card/<card>.toml): its [daemon] table sets any of these
    /// flags (key = the long flag without dashes); the card's name (the file name) gives the
    /// namespace, and unless set /run/vhost-card/<card>.sock and <card>.control. Flags given
    /// here win over the file; with --fd or --vduse the file's socket, socket-group and
    /// socket-mode do not apply (a VDUSE card has no socket). `metrics-listen = true` is the
    /// flag alone.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Serve on an already listening Unix socket inherited as file descriptor N (socket
    /// activation, e.g. `systemd-socket-activate` or a `.socket` unit: use --fd 3), instead of
    /// --socket.
    #[arg(long, value_name = "N", conflicts_with = "socket")]
    pub fd: Option<i32>,

    /// Group (name or gid) of the vhost-user socket, so that a VMM running as another user of
    /// that group can connect (as virtiofsd's --socket-group); the socket's mode becomes 0660
    /// unless --socket-mode says otherwise.
    #[arg(long, value_name = "GROUP", conflicts_with_all = ["fd", "vduse"])]
    pub socket_group: Option<String>,

    /// Permissions of the vhost-user socket, in octal (e.g. 0600, 0660); connecting needs write
    /// permission. Default: from the umask (0660 with --socket-group).
    #[arg(long, value_name = "MODE", value_parser = parse_mode, conflicts_with_all = ["fd", "vduse"])]
    pub socket_mode: Option<u32>,

    /// Log level: error, warn, info, debug, trace or off. Without it the RUST_LOG environment
    /// variable is read (env_logger syntax, e.g. `info,vhost_card::gate=debug`); without either,
    /// info. The log goes to stderr.
    #[arg(long, value_name = "LEVEL", value_enum)]
    pub log_level: Option<LogLevel>,

    /// Be a device of this machine's own kernel instead of serving a VMM: create the VDUSE device
    /// /dev/vduse/NAME (needs Linux with CONFIG_VDPA_USER: modprobe vduse) and, with
    /// --vduse-bind, the vdpa device NAME on it, so the kernel's virtio_net drives the card.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["socket", "fd"])]
    pub vduse: Option<String>,

    /// With --vduse: the vdpa bus driver to bind. `virtio` (virtio_vdpa) gives this host a
    /// network interface, `vhost` (vhost_vdpa) a /dev/vhost-vdpa-N for QEMU's -netdev
    /// vhost-vdpa, `none` adds no vdpa device (run `vdpa dev add name NAME mgmtdev vduse`).
    /// Default: virtio.
    // No clap `requires`: `vduse` may come from the card file, read after this parse;
    // `Config::try_from` refuses the VDUSE-only flags without it, before anything is created.
    #[arg(long, value_enum, value_name = "DRIVER")]
    pub vduse_bind: Option<Bind>,

    /// With --vduse: the MAC address of the host's interface (VIRTIO_NET_F_MAC). Default: a
    /// locally administered address derived from the device name.
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    pub host_mac: Option<[u8; 6]>,

    /// With --vduse: the size of the kernel's bounce buffer in MiB (1 to 1024), through which
    /// the host's driver passes every buffer it gives the card. Default: 64 (the kernel's) with
    /// mrg-rxbuf; with it disabled, 64 plus room for a full RX ring of 64 KiB buffers.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub vduse_bounce_mib: Option<u32>,

    /// Print the vhost-user backend capabilities as JSON (QEMU's docs/interop/vhost-user.json)
    /// and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Serve the counters as JSON on this Unix socket (read with `vhost-card stats --control PATH`).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Serve the counters and state to Prometheus over HTTP (`GET /metrics`) on ADDR: an IP
    /// address with or without a port (default port 10046), e.g. `127.0.0.1:10046`, `[::1]`,
    /// `0.0.0.0:9000`; the flag alone means 127.0.0.1:10046. Port 0 lets the kernel choose (the
    /// daemon logs the address).
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1",
          value_parser = parse_metrics_addr)]
    pub metrics_listen: Option<SocketAddr>,

    /// Name of the tap device, created or attached to (up to 15 characters). Of an existing tap
    /// only what differs (MTU, MAC, up) is changed, so a tap made beforehand for this user, with
    /// the MTU and up, needs no privileges.
    #[arg(long, value_name = "NAME", default_value = "card0")]
    pub tap: String,

    /// Network namespace (from `ip netns add`, or a path like /proc/PID/ns/net) in which the
    /// tap lives; it must already exist. Default: the daemon's own namespace.
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,

    /// MTU of the link, offered to the host with VIRTIO_NET_F_MTU and set on the tap
    /// (a tap takes at most 65521; above that the tap is clamped).
    #[arg(long, value_name = "N", default_value_t = 65520,
          value_parser = clap::value_parser!(u16).range(68..=65535))]
    pub mtu: u16,

    /// MAC address of the card's end of the link (the tap). Default: kept, or chosen by the kernel.
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    pub mac: Option<[u8; 6]>,

    /// Number of queue pairs; more than one uses an IFF_MULTI_QUEUE tap and one worker thread
    /// per pair. Use the same number in QEMU's `-netdev vhost-user,queues=N`.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=16))]
    pub queues: u16,

    /// Largest virtqueue size accepted from the frontend (a power of two, 64 to 32768).
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Feature bits to offer on top of the defaults, by name, comma-separated (see
    /// `vhost-card features`).
    #[arg(long, value_name = "LIST")]
    pub enable: Vec<String>,

    /// Feature bits not to offer, by name, comma-separated (see `vhost-card features`).
    #[arg(long, value_name = "LIST")]
    pub disable: Vec<String>,

    /// Checksums of frames going up (card to host). `verify`: frames without flags get their
    /// IPv4/IPv6 TCP/UDP/ICMP checksums checked and good ones are marked DATA_VALID; partial
    /// checksums of the card's kernel and GSO frames go up with NEEDS_CSUM (the host's stack
    /// then needs none: a Linux host that ends the flow trusts them). `complete`: as verify, and
    /// every partial checksum is computed by the card and marked DATA_VALID, so the host gets no
    /// NEEDS_CSUM frame at all; the card's kernel is then told to hand over no GSO frame (it
    /// segments to the link's MTU itself). `passthrough`: frames without flags go up untouched.
    /// Each frame is counted as rx_data_valid, rx_needs_csum or rx_unmarked_<reason>.
    #[arg(long, value_enum, default_value_t = RxCsum::Verify)]
    pub rx_csum: RxCsum,

    /// What the card's end of the link is. `ethernet`: a tap (IFF_TAP), Ethernet frames both
    /// ways, ARP and neighbour discovery between the host and the card's kernel. `ip`: a TUN
    /// device (IFF_TUN) named by --tap, so the card's kernel sees bare IP packets; the daemon
    /// adds and strips the Ethernet header toward the host and itself answers the host's ARP
    /// requests and IPv6 neighbour solicitations for every address behind the link (with
    /// --mac, or a locally administered MAC derived from the tap's name).
    #[arg(long, value_enum, default_value_t = Link::Ethernet)]
    pub link: Link,

    /// Log per-queue counters every N seconds (0: only at exit).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub stats_interval: u64,

    /// Keep a tap this daemon created when it exits cleanly (a tap always survives a crash).
    #[arg(long)]
    pub keep_tap: bool,

    /// Keep the live session in systemd's file descriptor store (the unit's
    /// FileDescriptorStoreMax=, sd_notify FDSTORE=1), so that a restart after a crash resumes
    /// it on the same connection without the frontend reconnecting. Needs $NOTIFY_SOCKET; on by
    /// itself when systemd (254 and later) sets $FDSTORE.
    #[arg(long)]
    pub fd_store: bool,

    /// After the sockets and the tap exist: `seccomp` clears every capability and installs a
    /// system-call allow-list (a forbidden call ends the daemon with status 159 and names the
    /// call); `none` keeps the daemon's privileges (for debugging).
    #[arg(long, value_enum, default_value_t = Sandbox::Seccomp)]
    pub sandbox: Sandbox,

    /// Run as this user (name or uid) once the sockets and the tap exist.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Run with this group (name or gid); default: the --user's primary group.
    #[arg(long, value_name = "GROUP", requires = "user")]
    pub group: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
    Off,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(l: LogLevel) -> Self {
        match l {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
            LogLevel::Off => log::LevelFilter::Off,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sandbox {
    Seccomp,
    None,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print every feature bit with its number, its default and what it does.
    Features,
    /// Show a running daemon's state (frontend connected, MTU, queue pairs in use, features,
    /// uptime) and counters per queue pair, read from its --control socket.
    Stats {
        /// The daemon's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Print the snapshot as one JSON object (schema: README, "Metrics") instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Hand the running daemon's session over to a new process of the binary now installed,
    /// without the frontend noticing: same vhost-user connection, guest memory, rings, tap and
    /// counters; no reconnect, no carrier change in the guest. Starts the new process (with
    /// ARGS, or the daemon's own command line), waits until it serves, prints the outage it measured and
    /// exits 0; on a refusal prints why and exits 1, and the old process keeps serving.
    /// `systemctl reload vhost-card@CARD` runs it.
    Upgrade {
        /// The running daemon's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// The binary to start (default: this command's own binary, the one now installed).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// The new process's command line (what the unit's ExecStart= gives the daemon). Without
        /// it, the command line the daemon reports is used, only if it keeps the new process
        /// as confined as the old one (--sandbox seccomp, and --user naming the uid the daemon
        /// runs as): the daemon faces the guest, so what it says is not trusted further.
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RxCsum {
    Verify,
    Complete,
    Passthrough,
}

impl From<RxCsum> for crate::vnet::RxCsum {
    fn from(m: RxCsum) -> Self {
        match m {
            RxCsum::Verify => crate::vnet::RxCsum::Verify,
            RxCsum::Complete => crate::vnet::RxCsum::Complete,
            RxCsum::Passthrough => crate::vnet::RxCsum::Passthrough,
        }
    }
}

/// The card's end of the link (`--link`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Link {
    #[default]
    Ethernet,
    Ip,
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(64..=32768).contains(&n) || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two between 64 and 32768"));
    }
    Ok(n as u16)
}

/// File permissions in octal, at most 0777.
fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.strip_prefix("0o").unwrap_or(s), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("'{s}' is not a file mode in octal (e.g. 0660)"))
}

/// `IP:PORT`, `[IPv6]:PORT`, or an IP alone (the default metrics port).
fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip = s
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(s);
    ip.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, crate::metrics::DEFAULT_PORT))
        .map_err(|_| {
            format!(
                "'{s}' is not an IP address with an optional port (e.g. 127.0.0.1:{}, [::1])",
                crate::metrics::DEFAULT_PORT
            )
        })
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error(transparent)]
    Identity(#[from] crate::sandbox::SandboxError),
    #[error("--socket, --fd or --vduse is required")]
    NoSocket,
    #[error("{0} applies only with --vduse")]
    VduseOnly(&'static str),
    #[error("--vduse serves one queue pair: Linux's VDUSE refuses net devices with a control virtqueue (VIRTIO_NET_F_CTRL_VQ), and virtio_net refuses a device that offers several pairs without one")]
    VduseQueues,
    #[error("--fd {0} is not a listening Unix stream socket")]
    BadFd(i32),
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error(transparent)]
    Tap(#[from] crate::tap::TapError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error(transparent)]
    Vduse(#[from] crate::vduse::device::DeviceError),
}

/// Where the vhost-user socket comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// Bind this path (and remove it at exit).
    Path(PathBuf),
    /// An inherited listening socket.
    Fd(i32),
    /// No socket: a VDUSE device of the kernel the daemon runs on.
    Vduse(VduseConfig),
}

/// A checked configuration for the daemon.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub control: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    /// Group and mode of the vhost-user socket.
    pub socket_group: Option<u32>,
    pub socket_mode: Option<u32>,
    pub tap: String,
    pub netns: Option<String>,
    pub mtu: u16,
    pub mac: Option<[u8; 6]>,
    pub queues: usize,
    pub queue_size: usize,
    pub features: u64,
    pub rx_csum: crate::vnet::RxCsum,
    pub link: Link,
    pub stats_interval: u64,
    pub keep_tap: bool,
    pub fd_store: bool,
    pub sandbox: Sandbox,
    /// uid and gid to switch to.
    pub identity: Option<(u32, u32)>,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, ConfigError> {
        if a.vduse.is_none() {
            if a.vduse_bind.is_some() {
                return Err(ConfigError::VduseOnly("--vduse-bind"));
            }
            if a.host_mac.is_some() {
                return Err(ConfigError::VduseOnly("--host-mac"));
            }
            if a.vduse_bounce_mib.is_some() {
                return Err(ConfigError::VduseOnly("--vduse-bounce-mib"));
            }
        }
        if a.vduse.is_some() && a.queues > 1 {
            return Err(ConfigError::VduseQueues);
        }
        let listen = match (a.socket, a.fd, a.vduse) {
            (Some(p), None, None) => Listen::Path(p),
            // A process taking a session over gets its listener with the state, not as fd N.
            (None, Some(fd), None)
                if is_listening_unix_socket(fd) || crate::handover::take::requested() =>
            {
                Listen::Fd(fd)
            }
            (None, Some(fd), None) => return Err(ConfigError::BadFd(fd)),
            (None, None, Some(name)) => Listen::Vduse(VduseConfig {
                name,
                bind: a.vduse_bind.unwrap_or(Bind::Virtio),
                host_mac: a.host_mac,
                bounce_mib: a.vduse_bounce_mib,
            }),
            _ => return Err(ConfigError::NoSocket),
        };
        // What can be checked before anything is created.
        if let Listen::Vduse(v) = &listen {
            crate::vduse::device::check_name(&v.name)?;
        }
        crate::tap::check_name(&a.tap)?;
        if let Some(n) = &a.netns {
            if !crate::netns::path_of(n).exists() {
                return Err(crate::netns::NetnsError::Missing(n.clone()).into());
            }
        }
        Ok(Config {
            listen,
            control: a.control,
            metrics_listen: a.metrics_listen,
            socket_group: match &a.socket_group {
                Some(g) => Some(crate::sandbox::lookup_group(g)?),
                None => None,
            },
            socket_mode: a.socket_mode,
            tap: a.tap,
            netns: a.netns,
            mtu: a.mtu,
            mac: a.mac,
            queues: usize::from(a.queues),
            queue_size: usize::from(a.queue_size),
            features: features::resolve(&a.enable, &a.disable)?
                | if a.queues > 1 {
                    1u64 << virtio_bindings::virtio_net::VIRTIO_NET_F_MQ
                } else {
                    0
                },
            rx_csum: a.rx_csum.into(),
            link: a.link,
            stats_interval: a.stats_interval,
            keep_tap: a.keep_tap,
            fd_store: a.fd_store,
            sandbox: a.sandbox,
            identity: match &a.user {
                None => None,
                Some(u) => {
                    let (uid, gid) = crate::sandbox::lookup_user(u)?;
                    let gid = match &a.group {
                        Some(g) => crate::sandbox::lookup_group(g)?,
                        None => gid,
                    };
                    Some((uid, gid))
                }
            },
        })
    }
}

/// Whether `fd` is a listening `AF_UNIX` stream socket.
fn is_listening_unix_socket(fd: i32) -> bool {
    let get = |level, opt| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, which outlives the call; a
        // bad descriptor only makes it fail.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                level,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(v)
    };
    get(libc::SOL_SOCKET, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && get(libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && get(libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1)
}

/// The vhost-user backend capabilities (`VhostUserBackendCapabilities` in QEMU's
/// docs/interop/vhost-user.json): a net backend has no optional features to list.
pub fn capabilities_json() -> String {
    serde_json::json!({ "type": "net" }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("vhost-card").chain(v.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = Config::try_from(parse(&["--socket", "/tmp/s"]).unwrap()).unwrap();
        assert_eq!(c.listen, Listen::Path("/tmp/s".into()));
        assert_eq!(c.mtu, 65520);
        assert_eq!(c.tap, "card0");
        assert_eq!(c.queues, 1);
        assert_eq!(c.rx_csum, crate::vnet::RxCsum::Verify);
        assert_eq!(c.link, Link::Ethernet);
        let c = Config::try_from(
            parse(&[
                "--socket",
                "/tmp/s",
                "--rx-csum",
                "complete",
                "--link",
                "ip",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(c.rx_csum, crate::vnet::RxCsum::Complete);
        assert_eq!(c.link, Link::Ip);
        assert_eq!(c.features, features::default_features());
    }

    #[test]
    fn ranges_are_enforced() {
        assert!(parse(&["--socket", "s", "--mtu", "67"]).is_err());
        assert!(parse(&["--socket", "s", "--mtu", "65536"]).is_err());
        assert!(parse(&["--socket", "s", "--mtu", "65535"]).is_ok());
        assert!(parse(&["--socket", "s", "--queue-size", "100"]).is_err());
        assert!(parse(&["--socket", "s", "--queues", "0"]).is_err());
        assert!(parse(&["--socket", "s", "--mac", "01:02:03:04:05:06"]).is_err());
        assert!(parse(&[]).is_err());
        assert!(parse(&["features"]).is_ok());
        assert!(parse(&["--print-capabilities"]).is_ok());
        assert!(parse(&["--socket", "s", "--fd", "3"]).is_err());
        // QEMU's backend conventions spell it --socket-path.
        let a = parse(&["--socket-path=/tmp/s"]).unwrap();
        assert_eq!(a.socket.as_deref(), Some(std::path::Path::new("/tmp/s")));
        assert!(parse(&["--socket-path", "s", "--fd=3"]).is_err());
        // Descriptor 0 is not a listening socket in the test runner.
        let a = parse(&["--fd", "0"]).unwrap();
        assert!(matches!(Config::try_from(a), Err(ConfigError::BadFd(0))));
    }

    #[test]
    fn fd_accepts_a_listening_unix_socket() {
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("vhc-cfg-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let l = std::os::unix::net::UnixListener::bind(dir.join("s")).unwrap();
        let fd = l.as_raw_fd().to_string();
        let c = Config::try_from(parse(&["--fd", &fd]).unwrap()).unwrap();
        assert_eq!(c.listen, Listen::Fd(l.as_raw_fd()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn metrics_addresses_socket_modes_and_log_levels() {
        let m = |v: &[&str]| {
            Config::try_from(parse(&[&["--socket", "s"], v].concat()).unwrap())
                .unwrap()
                .metrics_listen
        };
        let port = crate::metrics::DEFAULT_PORT;
        assert_eq!(m(&[]), None);
        assert_eq!(
            m(&["--metrics-listen"]),
            Some(([127, 0, 0, 1], port).into())
        );
        assert_eq!(
            m(&["--metrics-listen", "0.0.0.0"]),
            Some(([0, 0, 0, 0], port).into())
        );
        assert_eq!(
            m(&["--metrics-listen=[::1]"]),
            Some(format!("[::1]:{port}").parse().unwrap())
        );
        assert_eq!(
            m(&["--metrics-listen", "127.0.0.1:0"]),
            Some(([127, 0, 0, 1], 0).into())
        );
        assert!(parse(&["--socket", "s", "--metrics-listen", "localhost:x"]).is_err());

        let a = parse(&[
            "--socket",
            "s",
            "--socket-mode",
            "0660",
            "--socket-group",
            "0",
        ])
        .unwrap();
        let c = Config::try_from(a).unwrap();
        assert_eq!((c.socket_mode, c.socket_group), (Some(0o660), Some(0)));
        assert!(parse(&["--socket", "s", "--socket-mode", "0800"]).is_err());
        assert!(parse(&["--socket", "s", "--socket-mode", "01777"]).is_err());
        assert!(parse(&["--fd", "3", "--socket-mode", "0600"]).is_err());

        let a = parse(&["--socket", "s", "--log-level", "debug"]).unwrap();
        assert_eq!(
            a.log_level.map(log::LevelFilter::from),
            Some(log::LevelFilter::Debug)
        );
        assert!(parse(&["--socket", "s", "--log-level", "loud"]).is_err());
    }

    #[test]
    fn what_can_be_checked_is_checked_before_the_daemon_runs() {
        let a = parse(&["--socket", "s", "--tap", "bad/name"]).unwrap();
        assert!(matches!(Config::try_from(a), Err(ConfigError::Tap(_))));
        let a = parse(&["--socket", "s", "--netns", "no-such-namespace-here"]).unwrap();
        let e = Config::try_from(a).unwrap_err().to_string();
        assert!(e.contains("ip netns add no-such-namespace-here"), "{e}");
        let a = parse(&["--socket", "s", "--socket-group", "no-such-group-here"]).unwrap();
        assert!(Config::try_from(a).is_err());
    }

    #[test]
    fn vduse_mode() {
        let c = Config::try_from(parse(&["--vduse", "card"]).unwrap()).unwrap();
        assert_eq!(
            c.listen,
            Listen::Vduse(VduseConfig {
                name: "card".into(),
                bind: Bind::Virtio,
                host_mac: None,
                bounce_mib: None,
            })
        );
        let a = parse(&[
            "--vduse",
            "c",
            "--vduse-bind",
            "none",
            "--host-mac",
            "02:00:00:00:00:01",
        ]);
        let c = Config::try_from(a.unwrap()).unwrap();
        assert!(matches!(
            c.listen,
            Listen::Vduse(VduseConfig {
                bind: Bind::None,
                host_mac: Some(_),
                ..
            })
        ));
        assert!(parse(&["--vduse", "c", "--socket", "s"]).is_err());
        // Checked before anything is created: the device's name, flags of the socket.
        let a = parse(&["--vduse", "a/b"]).unwrap();
        assert!(matches!(Config::try_from(a), Err(ConfigError::Vduse(_))));
        assert!(parse(&["--vduse", "c", "--socket-group", "0"]).is_err());
        assert!(parse(&["--vduse", "c", "--socket-mode", "0600"]).is_err());
        let a = parse(&["--vduse", "c", "--queues", "2"]).unwrap();
        let e = Config::try_from(a).unwrap_err().to_string();
        assert!(e.contains("CTRL_VQ"), "{e}");
        for extra in [
            ["--vduse-bind", "vhost"],
            ["--host-mac", "02:00:00:00:00:01"],
            ["--vduse-bounce-mib", "96"],
        ] {
            let a = parse(&["--socket", "s", extra[0], extra[1]]).unwrap();
            let e = Config::try_from(a).unwrap_err().to_string();
            assert!(e.contains("only with --vduse"), "{e}");
        }
    }

    #[test]
    fn capabilities_are_a_net_backend() {
        let v: serde_json::Value = serde_json::from_str(&capabilities_json()).unwrap();
        assert_eq!(v, serde_json::json!({"type": "net"}));
    }

    #[test]
    fn feature_errors_surface() {
        let a = parse(&["--socket", "s", "--disable", "csum"]).unwrap();
        let e = Config::try_from(a).unwrap_err().to_string();
        assert!(e.contains("host-tso4") && e.contains("needs 'csum'"), "{e}");
        let a = parse(&["--socket", "s", "--enable", "warp-drive"]).unwrap();
        let e = Config::try_from(a).unwrap_err().to_string();
        assert!(
            e.contains("unknown feature 'warp-drive'") && e.contains("guest-csum"),
            "{e}"
        );
    }
}
