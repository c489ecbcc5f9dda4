//! The host link (the daemon's tap) over netlink (`rtnetlink` on tokio): brought up with the
//! card's addresses and its routes via the host. The daemon creates the tap (when it starts,
//! or under socket activation when the VMM connects) and may create it again (a restart after
//! a clean exit); [`apply`] is what `up` and `card-os run` do each time it appears.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use crate::error::{Context, Error, Result};
use futures::channel::mpsc::UnboundedReceiver;
use futures::TryStreamExt;
use rtnetlink::packet_core::NetlinkMessage;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::SocketAddr;
use rtnetlink::{Handle, LinkUnspec, MulticastGroup, RouteMessageBuilder};

use crate::config::Config;

/// Netlink messages the kernel sends on its own (the multicast groups we joined).
pub type Events = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// A netlink connection inside network namespace `ns`, its task spawned on the current tokio
/// runtime; with `events`, also the link, address and route events of that namespace.
pub fn open(ns: &str, events: bool) -> Result<(Handle, Events)> {
    let runtime = tokio::runtime::Handle::current();
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    // The socket belongs to the namespace of the thread that creates it: a thread of its own
    // enters the card's namespace for that.
    let (conn, handle, messages) = std::thread::scope(|s| {
        s.spawn(|| -> Result<_> {
            let _rt = runtime.enter();
            // SAFETY: setns(2) with an open namespace file; it moves only this thread, which
            // ends right after creating the socket.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            let groups = [
                MulticastGroup::Link,
                MulticastGroup::Ipv4Ifaddr,
                MulticastGroup::Ipv6Ifaddr,
                MulticastGroup::Ipv4Route,
                MulticastGroup::Ipv6Route,
            ];
            Ok(if events {
                rtnetlink::new_multicast_connection(&groups)?
            } else {
                rtnetlink::new_connection()?
            })
        })
        .join()
        .map_err(|_| Error::Failed("the netlink thread panicked".into()))?
    })?;
    tokio::spawn(conn);
    Ok((handle, messages))
}

/// The host link as [`apply`] left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No tap yet (socket activation: the daemon starts when the VMM connects).
    Absent,
    /// Up with the addresses and routes; the tap's interface index.
    Ready { index: u32 },
}

fn name_of(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// The tap's index and whether it is up, if it exists.
pub async fn find(handle: &Handle, dev: &str) -> Result<Option<(u32, bool)>> {
    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await? {
        if name_of(&link) == Some(dev) {
            let up = link.header.flags.contains(LinkFlags::Up);
            return Ok(Some((link.header.index, up)));
        }
    }
    Ok(None)
}

/// Brings the tap up with the card's addresses (`replace`: idempotent) and its routes via the
/// host; does nothing when there is no tap yet.
pub async fn apply(handle: &Handle, cfg: &Config) -> Result<State> {
    let dev = cfg.tap();
    let Some((index, up)) = find(handle, dev).await? else {
        return Ok(State::Absent);
    };
    if !up {
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("setting {dev} up"))?;
    }
    let link = &cfg.link;
    for cidr in [&link.address4, &link.address6] {
        let mut req = handle
            .address()
            .add(index, cidr.addr, cidr.prefix)
            .replace();
        if cidr.addr.is_ipv6() {
            // No duplicate address detection: the link has two ends, both ours to number.
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .with_context(|| format!("adding {cidr} to {dev}"))?;
    }
    for route in &link.routes {
        let net = route.network();
        let msg = match net.addr {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, net.prefix)
                .gateway(link.host4)
                .output_interface(index)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, net.prefix)
                .gateway(link.host6)
                .output_interface(index)
                .build(),
        };
        handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding the route to {net} via the host on {dev}"))?;
    }
    Ok(State::Ready { index })
}

/// [`apply`] from synchronous code (`card-os up`, `reload`).
pub fn apply_blocking(cfg: &Config) -> Result<State> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (handle, _) = open(cfg.netns(), false)?;
        apply(&handle, cfg).await
    })
}

/// Whether `msg` asks for the host link to be set up again: the tap (re)appeared or went
/// down, or one of its addresses or routes was deleted. `index` is the tap's index as last
/// applied (None: not there yet).
pub fn needs_apply(msg: &RouteNetlinkMessage, dev: &str, index: Option<u32>) -> bool {
    match msg {
        RouteNetlinkMessage::NewLink(link) => {
            name_of(link) == Some(dev)
                && (Some(link.header.index) != index || !link.header.flags.contains(LinkFlags::Up))
        }
        RouteNetlinkMessage::DelAddress(a) => Some(a.header.index) == index,
        RouteNetlinkMessage::DelRoute(r) => r.attributes.iter().any(|a| {
            matches!(a, rtnetlink::packet_route::route::RouteAttribute::Oif(i) if Some(*i) == index)
        }),
        _ => false,
    }
}
