//! One test's card: its namespace (and optionally a peer namespace behind a veth pair), the
//! daemon serving a tap in it, the card's addresses, and helpers to reach it from the "host" (the
//! driver in this process).
//!
//! ```text
//!  test process (driver)              card namespace                  peer namespace
//!  HOST_IP 10.99.0.2  --vhost-user-->  card0 (tap) 10.99.0.1
//!  HOST_MAC                            vc0 10.99.1.1 (tx csum off) <--> vp0 10.99.1.2
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::daemon::Daemon;
use crate::frontend::{Control, Offer};
use crate::netdev::{Options, VirtioNet};
use crate::netns::{veth_pair, Netns};
use crate::packet::{udp_frame, VnetHdr};
use crate::require_root;

pub const TAP: &str = "card0";
pub const CARD_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
pub const HOST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xca, 0xfe, 0x01];
pub const CARD_VETH: &str = "vc0";
pub const PEER_VETH: &str = "vp0";
pub const CARD_VETH_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 1);
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 2);

/// A card and its surroundings. Drop order: the daemon first, then the namespaces.
pub struct Card {
    pub daemon: Daemon,
    pub peer: Option<Netns>,
    pub ns: Netns,
    /// MAC address of card0.
    pub mac: [u8; 6],
}

fn quiet_namespace(ns: &Netns) -> Result<()> {
    // No IPv6: the card's kernel would otherwise send router solicitations and MLD reports
    // to the host at random moments.
    ns.sysctl("net.ipv6.conf.all.disable_ipv6=1")?;
    ns.sysctl("net.ipv6.conf.default.disable_ipv6=1")
}

/// Gives card0 in `ns` the card's address and a permanent neighbour entry for the host, so no
/// ARP is needed; returns card0's MAC.
pub fn address(ns: &Netns) -> Result<[u8; 6]> {
    ns.card_address(
        TAP,
        &format!("{CARD_IP}/24"),
        &HOST_IP.to_string(),
        &mac_str(&HOST_MAC),
    )?;
    ns.mac_of(TAP)
}

impl Card {
    /// Starts the daemon with `extra` flags in a fresh namespace and gives card0 its address and
    /// a permanent neighbour entry for the host, so no ARP is needed.
    pub fn start(extra: &[&str]) -> Result<Card> {
        let ns = Card::namespace()?;
        let daemon = Daemon::start(ns.name(), extra)?;
        Card::around(ns, daemon)
    }

    /// A fresh, quiet namespace for a card whose daemon the caller starts.
    pub fn namespace() -> Result<Netns> {
        require_root()?;
        let ns = Netns::new("c")?;
        quiet_namespace(&ns)?;
        Ok(ns)
    }

    /// The card around a daemon serving card0 in `ns`: card0's address and a permanent
    /// neighbour entry for the host, so no ARP is needed.
    pub fn around(ns: Netns, daemon: Daemon) -> Result<Card> {
        let mac = address(&ns)?;
        Ok(Card {
            daemon,
            peer: None,
            ns,
            mac,
        })
    }

    /// Like [`Card::start`], plus a peer namespace reached through a veth pair whose card-side
    /// end has TX checksum offload off, with forwarding on in the card: frames the card forwards
    /// to the peer get their checksums computed in software by the card's kernel.
    pub fn start_with_peer(extra: &[&str]) -> Result<Card> {
        let mut card = Card::start(extra)?;
        card.add_peer()?;
        Ok(card)
    }

    /// Adds the peer namespace of [`Card::start_with_peer`] to a running card.
    pub fn add_peer(&mut self) -> Result<()> {
        let card = self;
        let peer = Netns::new("p")?;
        quiet_namespace(&peer)?;
        veth_pair(&card.ns, CARD_VETH, &peer, PEER_VETH)?;
        card.ns.ip(&[
            "addr",
            "add",
            &format!("{CARD_VETH_IP}/24"),
            "dev",
            CARD_VETH,
        ])?;
        card.ns.ip(&["link", "set", CARD_VETH, "up"])?;
        card.ns.sysctl("net.ipv4.ip_forward=1")?;
        card.ns
            .exec("ethtool", &["-K", CARD_VETH, "tx", "off"])
            .context("turning TX checksum offload off (is ethtool installed?)")?;
        peer.ip(&["addr", "add", &format!("{PEER_IP}/24"), "dev", PEER_VETH])?;
        peer.ip(&["link", "set", PEER_VETH, "up"])?;
        peer.ip(&[
            "route",
            "add",
            "10.99.0.0/24",
            "via",
            &CARD_VETH_IP.to_string(),
        ])?;
        card.peer = Some(peer);
        Ok(())
    }

    pub fn peer(&self) -> Result<&Netns> {
        self.peer.as_ref().context("card started without a peer")
    }

    /// A new vhost-user connection.
    pub fn connect(&self) -> Result<Control> {
        Control::connect(self.daemon.socket())
    }

    /// Connects, negotiates like QEMU acking every offered feature `keep` leaves in, and
    /// starts the data path.
    pub fn driver_with(&self, keep: impl Fn(u64) -> u64) -> Result<(VirtioNet, Offer)> {
        self.driver_custom(keep, |_| {})
    }

    /// Like [`Card::driver_with`], with the driver options adjusted by `tweak`.
    pub fn driver_custom(
        &self,
        keep: impl Fn(u64) -> u64,
        tweak: impl FnOnce(&mut Options),
    ) -> Result<(VirtioNet, Offer)> {
        let mut ctl = self.connect()?;
        let offer = ctl.handshake()?;
        let features = keep(offer.features);
        let mut opts = Options::for_features(features);
        tweak(&mut opts);
        let dev = VirtioNet::start(ctl, features, &opts)?;
        Ok((dev, offer))
    }

    /// [`Card::driver_with`] acking everything offered.
    pub fn driver(&self) -> Result<VirtioNet> {
        Ok(self.driver_with(|f| f)?.0)
    }

    /// A UDP frame from the host to `dst` (through card0's MAC), valid checksums.
    pub fn frame_to(&self, dst: SocketAddrV4, sport: u16, payload: &[u8]) -> Result<Vec<u8>> {
        udp_frame(
            HOST_MAC,
            self.mac,
            SocketAddrV4::new(HOST_IP, sport),
            dst,
            payload,
        )
    }

    /// Sends one good UDP datagram from the host to a socket on the card and checks it arrives.
    pub fn check_host_to_card(&self, dev: &mut VirtioNet, port: u16, seed: u8) -> Result<()> {
        let sock = self.ns.udp_socket(SocketAddrV4::new(CARD_IP, port))?;
        let payload = crate::packet::pattern(200, seed);
        let frame = self.frame_to(SocketAddrV4::new(CARD_IP, port), 40000, &payload)?;
        dev.send_wait(&VnetHdr::default(), &frame, &crate::netdev::TxLayout::Split)?;
        let mut buf = [0u8; 2048];
        let (n, from) = sock
            .recv_from(&mut buf)
            .context("the card's UDP socket received nothing")?;
        anyhow::ensure!(
            buf[..n] == payload[..],
            "payload corrupted on the way to the card"
        );
        anyhow::ensure!(
            from == std::net::SocketAddr::V4(SocketAddrV4::new(HOST_IP, 40000)),
            "datagram from {from}"
        );
        Ok(())
    }

    /// Injects one UDP frame on card0 with an AF_PACKET socket and checks it reaches the driver.
    pub fn check_card_to_host(&self, dev: &mut VirtioNet, seed: u8) -> Result<()> {
        let pkt = self.ns.packet_socket(TAP)?;
        let frame = udp_frame(
            self.mac,
            HOST_MAC,
            SocketAddrV4::new(CARD_IP, 5555),
            SocketAddrV4::new(HOST_IP, 6000 + u16::from(seed)),
            &crate::packet::pattern(300, seed),
        )?;
        pkt.send(&frame)?;
        let got = dev.recv_matching(Duration::from_secs(5), |f| f.frame == frame)?;
        anyhow::ensure!(
            got.hdr.gso_type == 0,
            "unexpected GSO type {}",
            got.hdr.gso_type
        );
        // Good checksums: DATA_VALID if the driver accepts it (GUEST_CSUM), else no flags.
        let want = if dev.features & crate::netdev::F_GUEST_CSUM != 0 {
            crate::packet::F_DATA_VALID
        } else {
            0
        };
        anyhow::ensure!(
            got.hdr.flags == want,
            "flags {:#x}, expected {want:#x} with features {:#x}",
            got.hdr.flags,
            dev.features
        );
        Ok(())
    }

    /// Whether card0 still exists with its address.
    pub fn tap_has_address(&self) -> Result<bool> {
        let out = self.ns.ip(&["-o", "-4", "addr", "show", "dev", TAP])?;
        Ok(out.contains(&format!("{CARD_IP}/24")))
    }
}

/// Frames each way so far on one driver; every round sends one each way and checks that the TX
/// used index counts every frame (none completed twice or lost), across handovers and restarts.
#[derive(Debug, Default)]
pub struct Traffic {
    pub rounds: u16,
}

impl Traffic {
    pub fn round(&mut self, card: &Card, dev: &mut VirtioNet) -> Result<()> {
        let seed = (self.rounds % 200) as u8;
        card.check_host_to_card(dev, 7000 + self.rounds, seed)?;
        card.check_card_to_host(dev, seed)?;
        self.rounds += 1;
        let tx = dev.tx.used_idx(&dev.mem)?;
        anyhow::ensure!(
            tx == self.rounds,
            "TX used index {tx} after {} frames: a chain completed twice or lost",
            self.rounds
        );
        Ok(())
    }
}

pub fn mac_str(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
