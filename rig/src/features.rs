//! virtio-net feature words: names, the guest's sysfs view, and which bits
//! QEMU 7.2 takes from a vhost-user backend.

/// virtio-net and transport feature bits, by number.
pub const NAMES: &[(u32, &str)] = &[
    (0, "CSUM"),
    (1, "GUEST_CSUM"),
    (2, "CTRL_GUEST_OFFLOADS"),
    (3, "MTU"),
    (5, "MAC"),
    (6, "GSO"),
    (7, "GUEST_TSO4"),
    (8, "GUEST_TSO6"),
    (9, "GUEST_ECN"),
    (10, "GUEST_UFO"),
    (11, "HOST_TSO4"),
    (12, "HOST_TSO6"),
    (13, "HOST_ECN"),
    (14, "HOST_UFO"),
    (15, "MRG_RXBUF"),
    (16, "STATUS"),
    (17, "CTRL_VQ"),
    (18, "CTRL_RX"),
    (19, "CTRL_VLAN"),
    (20, "CTRL_RX_EXTRA"),
    (21, "GUEST_ANNOUNCE"),
    (22, "MQ"),
    (23, "CTRL_MAC_ADDR"),
    (24, "NOTIFY_ON_EMPTY"),
    (27, "ANY_LAYOUT"),
    (28, "RING_INDIRECT_DESC"),
    (29, "RING_EVENT_IDX"),
    (30, "PROTOCOL_FEATURES"),
    (32, "VERSION_1"),
    (33, "ACCESS_PLATFORM"),
    (34, "RING_PACKED"),
    (35, "IN_ORDER"),
    (36, "ORDER_PLATFORM"),
    (37, "SR_IOV"),
    (38, "NOTIFICATION_DATA"),
    (40, "RING_RESET"),
    (53, "NOTF_COAL"),
    (54, "GUEST_USO4"),
    (55, "GUEST_USO6"),
    (56, "HOST_USO"),
    (57, "HASH_REPORT"),
    (59, "GUEST_HDRLEN"),
    (60, "RSS"),
    (61, "RSC_EXT"),
    (62, "STANDBY"),
    (63, "SPEED_DUPLEX"),
];

/// The bits QEMU 7.2 passes through from a vhost-user net backend: its
/// `user_feature_bits` (hw/net/vhost_net.c). QEMU clears each of these the
/// backend does not offer; every other bit (MAC, STATUS, the control queue
/// ones) is QEMU's own device model and does not depend on the backend.
pub const QEMU_VHOST_USER_BITS: &[u32] = &[
    24, // NOTIFY_ON_EMPTY
    28, // RING_INDIRECT_DESC
    29, // RING_EVENT_IDX
    27, // ANY_LAYOUT
    32, // VERSION_1
    0,  // CSUM
    1,  // GUEST_CSUM
    6,  // GSO
    7,  // GUEST_TSO4
    8,  // GUEST_TSO6
    9,  // GUEST_ECN
    10, // GUEST_UFO
    11, // HOST_TSO4
    12, // HOST_TSO6
    13, // HOST_ECN
    14, // HOST_UFO
    15, // MRG_RXBUF
    3,  // MTU
    33, // ACCESS_PLATFORM (IOMMU_PLATFORM)
    34, // RING_PACKED
    40, // RING_RESET: listed or not, no difference here: the card never offers it
    60, // RSS
    57, // HASH_REPORT
    21, // GUEST_ANNOUNCE
    22, // MQ
];

/// The mask of [`QEMU_VHOST_USER_BITS`].
pub fn passthrough_mask() -> u64 {
    QEMU_VHOST_USER_BITS.iter().fold(0, |m, b| m | 1 << b)
}

/// vhost-user's own bit, which never reaches the guest.
pub const PROTOCOL_FEATURES_BIT: u32 = 30;

pub fn name(bit: u32) -> String {
    NAMES
        .iter()
        .find(|(b, _)| *b == bit)
        .map_or_else(|| format!("bit{bit}"), |(_, n)| n.to_string())
}

/// Parses sysfs' `device/features`: '0'/'1' per bit, bit 0 first.
pub fn parse_sysfs(bits: &str) -> Option<u64> {
    let bits = bits.trim();
    if bits.is_empty() || bits.len() > 64 || !bits.chars().all(|c| c == '0' || c == '1') {
        return None;
    }
    Some(
        bits.char_indices()
            .filter(|(_, c)| *c == '1')
            .fold(0, |w, (i, _)| w | 1 << i),
    )
}

/// Bit numbers set in `word`.
pub fn bits(word: u64) -> impl Iterator<Item = u32> {
    (0..64).filter(move |b| word & (1 << b) != 0)
}

/// `0x... = NAME NAME ...`
pub fn describe(word: u64) -> String {
    let names: Vec<String> = bits(word).map(name).collect();
    if names.is_empty() {
        return format!("{word:#x}");
    }
    format!("{word:#x} = {}", names.join(" "))
}

/// Names of the bits in `word`, space-separated ("-" when none).
pub fn names(word: u64) -> String {
    let names: Vec<String> = bits(word).map(name).collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs() {
        assert_eq!(parse_sysfs("1101"), Some(0b1011));
        assert_eq!(
            parse_sysfs("0000000000000000000000000000000010"),
            Some(1 << 32)
        );
        assert_eq!(parse_sysfs("12"), None);
        assert_eq!(parse_sysfs(""), None);
    }

    #[test]
    fn passthrough() {
        let m = passthrough_mask();
        assert!(m & 1 != 0 && m & 1 << 32 != 0);
        assert!(m & 1 << 5 == 0, "MAC is QEMU's own");
        assert!(m & 1 << PROTOCOL_FEATURES_BIT == 0);
    }
}
