//! Scenario 10: checksum honesty against the stock guest, in each `--rx-csum` mode (verify, the
//! default; complete; passthrough).
//!
//! * The card sends N UDP datagrams with a wrong checksum and N with a right one to a closed
//!   port of the guest (AF_PACKET on the card's end of the link, so nothing on the card fixes
//!   them): the guest's `/proc/net/snmp` must count every bad one in `Udp InCsumErrors` and every
//!   good one in `Udp NoPorts`. A card that marked a bad frame DATA_VALID would show it as a
//!   NoPorts instead; one that dropped frames would show fewer. The daemon counts the bad ones
//!   as `rx_unmarked_bad_csum`, or, with `passthrough`, all of them as `rx_unmarked_passthrough`.
//! * A card-to-guest TCP transfer (64 MiB by default): how its frames went up, from the daemon's
//!   counters (rx_data_valid, rx_needs_csum, rx_unmarked_*), which must add up to rx_frames.
//!   With `--rx-csum complete`, rx_needs_csum must stay 0 and every IP frame be DATA_VALID.
//!
//! The helpers are shared with the IP-only link scenario (11).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{Options, DEFAULT_MTU, MIB};
use crate::card::{self, CardConfig};
use crate::nsnet;
use crate::report::key_values;
use crate::rig::{Env, Plug, Rig};

/// Datagrams of each kind.
pub const N: i64 = 50;
/// A port nothing listens on in the guest.
const CLOSED_PORT: u16 = 9;

/// Scenario 10: the honesty case and a transfer's marks in each `--rx-csum` mode.
pub fn run(env: &Env, opts: &Options) -> Result<(bool, String)> {
    let mut pass = true;
    let mut parts = Vec::new();
    for mode in ["verify", "complete", "passthrough"] {
        let cfg = CardConfig {
            mtu: DEFAULT_MTU,
            disable: String::new(),
            queues: 1,
            args: vec!["--rx-csum".into(), mode.into()],
        };
        let mut rig = Rig::boot(env, &format!("csum-{mode}"), &cfg, Plug::Boot)?;
        let result = (|| -> Result<(bool, String)> {
            let (h_ok, h_text) = honesty(&mut rig, false, mode == "passthrough")?;
            let (m_ok, m_text) = transfer_marks(&mut rig, env, opts.mib * MIB, mode == "complete")?;
            Ok((h_ok && m_ok, format!("{h_text}; {m_text}")))
        })();
        let (ok, text) = rig.finish(result)?;
        pass &= ok;
        parts.push(format!("--rx-csum {mode}: {text}"));
    }
    Ok((pass, parts.join("\n       ")))
}

/// An IPv4 UDP packet from the card to the guest's closed port, checksums right, or with the
/// UDP checksum wrong (and not zero, which means "none").
fn udp_packet(seq: u16, good: bool) -> Result<Vec<u8>> {
    let src: Ipv4Addr = card::CARD4.parse()?;
    let dst: Ipv4Addr = card::GUEST4.parse()?;
    let payload: Vec<u8> = (0..200u16).map(|i| (i as u8) ^ (seq as u8)).collect();
    let builder = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .udp(40000 + seq % 1000, CLOSED_PORT);
    let mut p = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut p, &payload)?;
    if !good {
        // The UDP checksum sits 6 bytes into the UDP header, after a 20-byte IPv4 header.
        let right = u16::from_be_bytes([p[26], p[27]]);
        let mut wrong = right ^ 0x5a5a;
        if wrong == 0 || wrong == 0xffff {
            wrong = 0x1234;
        }
        p[26..28].copy_from_slice(&wrong.to_be_bytes());
    }
    Ok(p)
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("MAC {s:?}"))?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("MAC {s:?} is not 6 bytes"))
}

/// Sends `frames` out of `ifname` in namespace `ns` with an AF_PACKET socket, as they are.
fn inject(ns: &str, ifname: &str, frames: Vec<Vec<u8>>) -> Result<()> {
    let ifname = ifname.to_string();
    nsnet::join(nsnet::spawn_in(ns, "card-inject", move || {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname.as_str())?;
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            bail!("no interface {ifname}");
        }
        for f in &frames {
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
            sll.sll_ifindex = libc::c_int::try_from(index)?;
            // SAFETY: `f` and `sll` are valid for reads of the lengths given, for the call.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if n < 0 {
                bail!("sending on {ifname}: {}", std::io::Error::last_os_error());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    })?)
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, k: &str) -> i64 {
    let v = |m: &BTreeMap<String, u64>| i64::try_from(*m.get(k).unwrap_or(&0)).unwrap_or(i64::MAX);
    v(after) - v(before)
}

/// The honesty case: N bad and N good datagrams to a closed port; the guest's counters must
/// show every bad one dropped for its checksum and every good one delivered (to no port).
/// On the IP-only link the card's end carries bare IP packets. With `passthrough`
/// (`--rx-csum passthrough`) the card must leave every one of them unmarked.
pub fn honesty(rig: &mut Rig, ip_link: bool, passthrough: bool) -> Result<(bool, String)> {
    let mut frames = Vec::new();
    let eth = if ip_link {
        Vec::new()
    } else {
        let card_mac = rig
            .card
            .ns
            .command("cat")
            .arg(format!("/sys/class/net/{}/address", card::TAP))
            .output()?;
        let mut e = parse_mac(card::MAC)?.to_vec();
        e.extend(parse_mac(&String::from_utf8_lossy(&card_mac.stdout))?);
        e.extend([0x08, 0x00]);
        e
    };
    for i in 0..N.unsigned_abs() as u16 {
        for good in [false, true] {
            let mut f = eth.clone();
            f.extend(udp_packet(i * 2 + u16::from(good), good)?);
            frames.push(f);
        }
    }
    let counters = "echo csum=$(snmp Udp InCsumErrors); echo noports=$(snmp Udp NoPorts); \
                    echo indatagrams=$(snmp Udp InDatagrams)";
    let g0 = key_values(&rig.vm.check(counters, Duration::from_secs(10))?);
    let d0 = rig.card.fresh_stats()?;
    inject(rig.card.ns.name(), card::TAP, frames)?;
    std::thread::sleep(Duration::from_secs(1));
    let g1 = key_values(&rig.vm.check(counters, Duration::from_secs(10))?);
    let d1 = rig.card.fresh_stats()?;
    let num = |kv: &BTreeMap<String, String>, k: &str| -> i64 {
        kv.get(k).and_then(|v| v.parse().ok()).unwrap_or(-1)
    };
    let csum = num(&g1, "csum") - num(&g0, "csum");
    let noports = num(&g1, "noports") - num(&g0, "noports");
    let (unmarked_key, want) = if passthrough {
        ("rx_unmarked_passthrough", 2 * N)
    } else {
        ("rx_unmarked_bad_csum", N)
    };
    let unmarked = delta(&d0, &d1, unmarked_key);
    // With passthrough every frame is unmarked, the card kernel's ARP or neighbour traffic of
    // the same second as well: at least the 2N datagrams.
    let counted = if passthrough {
        unmarked >= want
    } else {
        unmarked == want
    };
    let pass = csum == N && noports == N && counted;
    Ok((
        pass,
        format!(
            "{N} bad + {N} good UDP datagrams from the card to a closed port: guest Udp \
             InCsumErrors +{csum} (want {N}), NoPorts +{noports} (want {N}); daemon \
             {unmarked_key} +{unmarked} (want {}{want}), rx_data_valid +{}",
            if passthrough { "≥ " } else { "" },
            delta(&d0, &d1, "rx_data_valid")
        ),
    ))
}

/// The accounting counters, as the log line names them.
fn accounting(stats: &BTreeMap<String, u64>) -> impl Iterator<Item = (&String, &u64)> {
    stats.iter().filter(|(k, _)| {
        *k == "rx_data_valid" || *k == "rx_needs_csum" || k.starts_with("rx_unmarked_")
    })
}

/// A card-to-guest transfer of `len` bytes and how its frames went up. With `complete`, no
/// NEEDS_CSUM frame and no unmarked IP frame may go up.
pub fn transfer_marks(
    rig: &mut Rig,
    env: &Env,
    len: usize,
    complete: bool,
) -> Result<(bool, String)> {
    let before = rig.card.fresh_stats()?;
    let down = rig.send_to_guest(env, len)?;
    let after = rig.card.fresh_stats()?;
    let frames = delta(&before, &after, "rx_frames");
    let mut marks = Vec::new();
    let mut sum = 0;
    let mut names: Vec<&String> = accounting(&after).map(|(k, _)| k).collect();
    names.extend(accounting(&before).map(|(k, _)| k));
    names.sort();
    names.dedup();
    let mut unmarked_ip = 0;
    for k in names {
        let d = delta(&before, &after, k);
        sum += d;
        if k.starts_with("rx_unmarked_") && k != "rx_unmarked_not_ip" {
            unmarked_ip += d;
        }
        if d != 0 {
            marks.push(format!("{k} +{d}"));
        }
    }
    let needs = delta(&before, &after, "rx_needs_csum");
    let adds_up = sum == frames;
    let pass = down.ok && adds_up && (!complete || (needs == 0 && unmarked_ip == 0));
    Ok((
        pass,
        format!(
            "{} MiB card→guest {}; daemon rx_frames +{frames} = {} ({}){}",
            len / MIB,
            down.describe(),
            marks.join(" + "),
            if adds_up {
                "adds up"
            } else {
                "DOES NOT ADD UP"
            },
            if complete {
                format!(
                    "; NEEDS_CSUM frames {needs} (want 0), unmarked IP frames {unmarked_ip} \
                     (want 0)"
                )
            } else {
                String::new()
            }
        ),
    ))
}
