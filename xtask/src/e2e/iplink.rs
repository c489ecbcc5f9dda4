//! Scenario 11: the IP-only link (`vhost-card --link ip`), at MTU 65520 and 1500. The card's
//! end is a TUN device; the stock guest's `virtio_net` must see an ordinary Ethernet link:
//! binding (feature bits, MTU), pings both ways over IPv4 and IPv6 (the card answers the
//! guest's ARP and neighbour solicitations itself), the payload each way over TCP with equal
//! sha256, and the checksum honesty case of scenario 10.

use anyhow::Result;

use super::{honesty, shared_vm, Options, DEFAULT_MTU, MIB};
use crate::card::CardConfig;
use crate::rig::{Env, Plug, Rig};

pub fn run(env: &Env, opts: &Options) -> Result<(bool, String)> {
    let mut pass = true;
    let mut parts = Vec::new();
    for mtu in [DEFAULT_MTU, 1500] {
        let cfg = CardConfig {
            mtu,
            disable: String::new(),
            queues: 1,
            args: vec!["--link".into(), "ip".into()],
        };
        let mut rig = Rig::boot(env, &format!("iplink-{mtu}"), &cfg, Plug::Boot)?;
        let result = one(&mut rig, env, opts);
        let (ok, text) = rig.finish(result)?;
        pass &= ok;
        parts.push(format!("MTU {mtu}: {text}"));
    }
    Ok((pass, parts.join("\n       ")))
}

fn one(rig: &mut Rig, env: &Env, opts: &Options) -> Result<(bool, String)> {
    let (bind_ok, bind) = shared_vm::binding(rig, env, opts)?;
    let pings = rig.pings(3)?;
    let len = opts.mib * MIB;
    let up = rig.send_to_card(env, len)?;
    let down = rig.send_to_guest(env, len)?;
    let (honest, h) = honesty::honesty(rig, true, false)?;
    let stats = rig.card.fresh_stats()?;
    let get = |k: &str| *stats.get(k).unwrap_or(&0);
    let replies = get("arp_replies") > 0 && get("nd_replies") > 0;
    let pass = bind_ok && pings.ok() && up.ok && down.ok && honest && replies;
    Ok((
        pass,
        format!(
            "{bind}; {}; {} MiB TCP guest→card {}, card→guest {}; {h}; the card answered {} ARP \
             request(s) and {} neighbour solicitation(s), dropped {} non-IP frame(s)",
            pings.describe(),
            opts.mib,
            up.describe(),
            down.describe(),
            get("arp_replies"),
            get("nd_replies"),
            get("tx_drop_not_ip"),
        ),
    ))
}
