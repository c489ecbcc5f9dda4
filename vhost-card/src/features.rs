//! The virtio-net feature bits the card can offer, their names on the command line, and the
//! dependency rules of the virtio specification (section 5.1.3.1).
//!
//! Everything here is pure: it turns `--enable`/`--disable` lists into a feature word, checks it,
//! and answers questions about a negotiated word.

use thiserror::Error;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// vhost-user's own bit, offered alongside the device bits.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// vhost's `VHOST_F_LOG_ALL`: the backend logs the guest pages it writes while the frontend
/// asks (live migration, see `dirtylog`).
pub const VHOST_F_LOG_ALL: u32 = 26;

/// One feature bit as the card knows it.
#[derive(Debug)]
pub struct Feature {
    /// Name used by `--enable`/`--disable`.
    pub name: &'static str,
    /// Bit number in the virtio feature word.
    pub bit: u32,
    /// Offered unless disabled.
    pub default: bool,
    /// False for bits the card always offers (they cannot be disabled).
    pub toggle: bool,
    /// Every one of these must be offered too.
    pub needs_all: &'static [&'static str],
    /// At least one of these must be offered too.
    pub needs_any: &'static [&'static str],
    /// What the bit does for the host.
    pub help: &'static str,
}

const fn f(
    name: &'static str,
    bit: u32,
    default: bool,
    needs_all: &'static [&'static str],
    needs_any: &'static [&'static str],
    help: &'static str,
) -> Feature {
    Feature {
        name,
        bit,
        default,
        toggle: true,
        needs_all,
        needs_any,
        help,
    }
}

/// Every feature bit the data path honours, in bit order.
pub static FEATURES: &[Feature] = &[
    f("csum", VIRTIO_NET_F_CSUM, true, &[], &[],
      "host may send frames with a partial checksum (NEEDS_CSUM); the card completes it"),
    f("guest-csum", VIRTIO_NET_F_GUEST_CSUM, true, &[], &[],
      "card may send partially checksummed frames and marks verified ones DATA_VALID"),
    f("mtu", VIRTIO_NET_F_MTU, true, &[], &[],
      "advertise the link MTU (--mtu) to the host driver"),
    f("guest-tso4", VIRTIO_NET_F_GUEST_TSO4, true, &["guest-csum"], &[],
      "card may send TCPv4 segments up to 64 KiB (GSO) to the host"),
    f("guest-tso6", VIRTIO_NET_F_GUEST_TSO6, true, &["guest-csum"], &[],
      "card may send TCPv6 segments up to 64 KiB (GSO) to the host"),
    f("guest-ecn", VIRTIO_NET_F_GUEST_ECN, false, &[], &["guest-tso4", "guest-tso6"],
      "GSO frames to the host may carry the ECN (CWR) bit"),
    f("guest-ufo", VIRTIO_NET_F_GUEST_UFO, false, &["guest-csum"], &[],
      "card may send UDP datagrams to be fragmented by the host (UFO)"),
    f("host-tso4", VIRTIO_NET_F_HOST_TSO4, true, &["csum"], &[],
      "host may send TCPv4 segments up to 64 KiB; the card's kernel segments them"),
    f("host-tso6", VIRTIO_NET_F_HOST_TSO6, true, &["csum"], &[],
      "host may send TCPv6 segments up to 64 KiB; the card's kernel segments them"),
    f("host-ecn", VIRTIO_NET_F_HOST_ECN, false, &[], &["host-tso4", "host-tso6"],
      "GSO frames from the host may carry the ECN (CWR) bit"),
    f("host-ufo", VIRTIO_NET_F_HOST_UFO, false, &["csum"], &[],
      "host may send large UDP datagrams; the card's kernel fragments them (UFO)"),
    f("mrg-rxbuf", VIRTIO_NET_F_MRG_RXBUF, true, &[], &[],
      "spread one received frame over several host buffers (num_buffers)"),
    f("indirect-desc", VIRTIO_RING_F_INDIRECT_DESC, true, &[], &[],
      "host may use indirect descriptor tables"),
    f("event-idx", VIRTIO_RING_F_EVENT_IDX, true, &[], &[],
      "notification suppression with used_event/avail_event"),
    Feature {
        name: "version-1",
        bit: VIRTIO_F_VERSION_1,
        default: true,
        toggle: false,
        needs_all: &[],
        needs_any: &[],
        help: "virtio 1.x device (always offered; legacy drivers are still served)",
    },
    Feature {
        name: "mq",
        bit: VIRTIO_NET_F_MQ,
        default: false,
        toggle: false,
        needs_all: &[],
        needs_any: &[],
        help: "several queue pairs (offered exactly when --queues > 1)",
    },
    f("guest-announce", VIRTIO_NET_F_GUEST_ANNOUNCE, true, &[], &[],
      "the guest announces itself after a live migration (QEMU serves the control queue it needs); without it QEMU asks the card for a RARP (SEND_RARP)"),
    Feature {
        name: "log-all",
        bit: VHOST_F_LOG_ALL,
        default: true,
        toggle: false,
        needs_all: &[],
        needs_any: &[],
        help: "VHOST_F_LOG_ALL: guest pages the card writes are logged during live migration (always offered)",
    },
    f("guest-uso4", VIRTIO_NET_F_GUEST_USO4, false, &["guest-csum"], &[],
      "card may send UDPv4 segmentation (USO) frames to the host (needs Linux >= 6.2 on the card)"),
    f("guest-uso6", VIRTIO_NET_F_GUEST_USO6, false, &["guest-csum"], &[],
      "card may send UDPv6 segmentation (USO) frames to the host (needs Linux >= 6.2 on the card)"),
    f("host-uso", VIRTIO_NET_F_HOST_USO, false, &["csum"], &[],
      "host may send UDP segmentation (USO) frames; the card's kernel segments them"),
];

/// Errors in a feature selection.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FeatureError {
    #[error("unknown feature '{name}'; valid names: {valid}")]
    Unknown { name: String, valid: String },
    #[error(
        "feature '{0}' is not chosen by name (version-1 and log-all are always offered, mq follows --queues)"
    )]
    NotToggleable(&'static str),
    #[error("feature '{0}' is both enabled and disabled")]
    Conflict(&'static str),
    #[error("feature '{feature}' needs '{missing}' (virtio spec 5.1.3.1); enable '{missing}' or disable '{feature}'")]
    MissingDependency {
        feature: &'static str,
        missing: String,
    },
}

/// Looks a feature up by its command-line name.
pub fn by_name(name: &str) -> Option<&'static Feature> {
    FEATURES.iter().find(|f| f.name == name)
}

/// The mask of a named feature. Panics only on a typo in this crate's own tables.
fn mask_of(name: &str) -> u64 {
    by_name(name).map_or(0, |f| 1u64 << f.bit)
}

/// The word offered by default.
pub fn default_features() -> u64 {
    FEATURES
        .iter()
        .filter(|f| f.default)
        .fold(0, |acc, f| acc | 1u64 << f.bit)
}

fn parse_names(list: &[String]) -> Result<Vec<&'static Feature>, FeatureError> {
    let mut out = Vec::new();
    for item in list.iter().flat_map(|s| s.split(',')) {
        let name = item.trim();
        if name.is_empty() {
            continue;
        }
        let feat = by_name(name).ok_or_else(|| FeatureError::Unknown {
            name: name.to_string(),
            valid: FEATURES
                .iter()
                .filter(|f| f.toggle)
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        out.push(feat);
    }
    Ok(out)
}

/// Applies `--enable` and `--disable` lists (each entry may hold comma-separated names) to the
/// default word and checks the dependency rules.
pub fn resolve(enable: &[String], disable: &[String]) -> Result<u64, FeatureError> {
    let en = parse_names(enable)?;
    let dis = parse_names(disable)?;
    let mut word = default_features();
    for f in &en {
        if dis.iter().any(|d| d.bit == f.bit) {
            return Err(FeatureError::Conflict(f.name));
        }
        if !f.toggle && !f.default {
            return Err(FeatureError::NotToggleable(f.name));
        }
        word |= 1u64 << f.bit;
    }
    for f in &dis {
        if !f.toggle {
            return Err(FeatureError::NotToggleable(f.name));
        }
        word &= !(1u64 << f.bit);
    }
    check_dependencies(word)?;
    Ok(word)
}

/// Checks section 5.1.3.1's rules on a feature word.
pub fn check_dependencies(word: u64) -> Result<(), FeatureError> {
    for f in FEATURES.iter().filter(|f| word & (1u64 << f.bit) != 0) {
        if let Some(missing) = f.needs_all.iter().find(|n| word & mask_of(n) == 0) {
            return Err(FeatureError::MissingDependency {
                feature: f.name,
                missing: (*missing).to_string(),
            });
        }
        if !f.needs_any.is_empty() && !f.needs_any.iter().any(|n| word & mask_of(n) != 0) {
            return Err(FeatureError::MissingDependency {
                feature: f.name,
                missing: f.needs_any.join(" or "),
            });
        }
    }
    Ok(())
}

/// Names of the card's features set in `word`, in table order.
pub fn names(word: u64) -> Vec<&'static str> {
    FEATURES
        .iter()
        .filter(|f| word & (1u64 << f.bit) != 0)
        .map(|f| f.name)
        .collect()
}

/// The table printed by `vhost-card features`.
pub fn table() -> String {
    let mut s = format!(
        "{:<14} {:>3}  {:<8} {}\n",
        "NAME", "BIT", "DEFAULT", "WHAT IT DOES"
    );
    for f in FEATURES {
        let default = match (f.toggle, f.default) {
            (false, true) => "always",
            (false, false) => "auto",
            (true, true) => "on",
            (true, false) => "off",
        };
        let mut help = f.help.to_string();
        if !f.needs_all.is_empty() {
            help.push_str(&format!(" [needs {}]", f.needs_all.join(", ")));
        }
        if !f.needs_any.is_empty() {
            help.push_str(&format!(" [needs {}]", f.needs_any.join(" or ")));
        }
        s.push_str(&format!(
            "{:<14} {:>3}  {:<8} {}\n",
            f.name, f.bit, default, help
        ));
    }
    s.push_str(&format!(
        "{:<14} {:>3}  {:<8} {}\n",
        "(protocol)",
        VHOST_USER_F_PROTOCOL_FEATURES,
        "always",
        "VHOST_USER_F_PROTOCOL_FEATURES: MQ, LOG_SHMFD, RARP, REPLY_ACK and NET_MTU protocol features"
    ));
    s
}

/// What a negotiated feature word means for the data path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    pub version_1: bool,
    pub csum: bool,
    pub guest_csum: bool,
    pub host_tso4: bool,
    pub host_tso6: bool,
    pub host_ecn: bool,
    pub host_ufo: bool,
    pub host_uso: bool,
    pub guest_tso4: bool,
    pub guest_tso6: bool,
    pub guest_ecn: bool,
    pub guest_ufo: bool,
    pub guest_uso4: bool,
    pub guest_uso6: bool,
    pub mrg_rxbuf: bool,
    pub event_idx: bool,
}

impl Negotiated {
    pub fn from_word(w: u64) -> Self {
        let has = |bit: u32| w & (1u64 << bit) != 0;
        Negotiated {
            version_1: has(VIRTIO_F_VERSION_1),
            csum: has(VIRTIO_NET_F_CSUM),
            guest_csum: has(VIRTIO_NET_F_GUEST_CSUM),
            host_tso4: has(VIRTIO_NET_F_HOST_TSO4),
            host_tso6: has(VIRTIO_NET_F_HOST_TSO6),
            host_ecn: has(VIRTIO_NET_F_HOST_ECN),
            host_ufo: has(VIRTIO_NET_F_HOST_UFO),
            host_uso: has(VIRTIO_NET_F_HOST_USO),
            guest_tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            guest_tso6: has(VIRTIO_NET_F_GUEST_TSO6),
            guest_ecn: has(VIRTIO_NET_F_GUEST_ECN),
            guest_ufo: has(VIRTIO_NET_F_GUEST_UFO),
            guest_uso4: has(VIRTIO_NET_F_GUEST_USO4),
            guest_uso6: has(VIRTIO_NET_F_GUEST_USO6),
            mrg_rxbuf: has(VIRTIO_NET_F_MRG_RXBUF),
            event_idx: has(VIRTIO_RING_F_EVENT_IDX),
        }
    }

    /// Length of the virtio-net header on both queues: 12 bytes for virtio 1.x or with
    /// MRG_RXBUF, 10 for a legacy driver without it.
    pub fn hdr_len(&self) -> usize {
        if self.version_1 || self.mrg_rxbuf {
            12
        } else {
            10
        }
    }

    /// Whether any GSO type may be sent to the host.
    pub fn guest_gso(&self) -> bool {
        self.guest_csum
            && (self.guest_tso4
                || self.guest_tso6
                || self.guest_ufo
                || self.guest_uso4
                || self.guest_uso6)
    }

    /// Whether the host may send any GSO type.
    pub fn host_gso(&self) -> bool {
        self.csum && (self.host_tso4 || self.host_tso6 || self.host_ufo || self.host_uso)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn default_word_is_the_documented_offer() {
        let w = resolve(&[], &[]).unwrap();
        assert_eq!(
            names(w),
            [
                "csum",
                "guest-csum",
                "mtu",
                "guest-tso4",
                "guest-tso6",
                "host-tso4",
                "host-tso6",
                "mrg-rxbuf",
                "indirect-desc",
                "event-idx",
                "version-1",
                "guest-announce",
                "log-all"
            ]
        );
    }

    #[test]
    fn unknown_name_lists_valid_ones() {
        let e = resolve(&s(&["csum,bogus"]), &[]).unwrap_err();
        match e {
            FeatureError::Unknown { name, valid } => {
                assert_eq!(name, "bogus");
                assert!(valid.contains("guest-tso4") && valid.contains("mrg-rxbuf"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn dependency_names_the_missing_bit() {
        assert_eq!(
            resolve(&[], &s(&["csum"])).unwrap_err(),
            FeatureError::MissingDependency {
                feature: "host-tso4",
                missing: "csum".into()
            }
        );
        assert_eq!(
            resolve(&[], &s(&["guest-csum"])).unwrap_err(),
            FeatureError::MissingDependency {
                feature: "guest-tso4",
                missing: "guest-csum".into()
            }
        );
        let e = resolve(&s(&["host-ecn"]), &s(&["host-tso4", "host-tso6"])).unwrap_err();
        assert_eq!(
            e,
            FeatureError::MissingDependency {
                feature: "host-ecn",
                missing: "host-tso4 or host-tso6".into()
            }
        );
    }

    #[test]
    fn toggles_apply() {
        let w = resolve(
            &s(&["host-ufo"]),
            &s(&["mrg-rxbuf,guest-tso4", "guest-tso6"]),
        )
        .unwrap();
        let n = Negotiated::from_word(w);
        assert!(n.host_ufo && !n.mrg_rxbuf && !n.guest_tso4 && !n.guest_tso6);
        assert!(!n.guest_gso() && n.host_gso());
        // Disabling every checksum bit together with what needs it is valid.
        let w = resolve(
            &[],
            &s(&["csum,guest-csum,host-tso4,host-tso6,guest-tso4,guest-tso6"]),
        )
        .unwrap();
        assert!(!Negotiated::from_word(w).csum);
    }

    #[test]
    fn conflicts_and_fixed_bits() {
        assert_eq!(
            resolve(&s(&["csum"]), &s(&["csum"])).unwrap_err(),
            FeatureError::Conflict("csum")
        );
        assert_eq!(
            resolve(&[], &s(&["version-1"])).unwrap_err(),
            FeatureError::NotToggleable("version-1")
        );
    }

    #[test]
    fn header_length_follows_negotiation() {
        assert_eq!(Negotiated::from_word(1 << VIRTIO_F_VERSION_1).hdr_len(), 12);
        assert_eq!(
            Negotiated::from_word(1 << VIRTIO_NET_F_MRG_RXBUF).hdr_len(),
            12
        );
        assert_eq!(Negotiated::from_word(0).hdr_len(), 10);
    }

    #[test]
    fn table_lists_every_bit() {
        let t = table();
        for f in FEATURES {
            assert!(t.contains(f.name));
        }
    }
}
