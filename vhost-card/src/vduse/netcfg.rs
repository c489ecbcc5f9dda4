//! The virtio-net device configuration space a VDUSE device shows the driver (virtio 1.2,
//! 5.1.4), little-endian as VIRTIO_F_VERSION_1 requires. Pure.

/// `VIRTIO_NET_S_LINK_UP`.
pub const STATUS_LINK_UP: u16 = 1;

/// Bytes up to and including `supported_hash_types`: the whole structure as Linux 6.12 knows it.
pub const CONFIG_SIZE: usize = 24;

/// What the configuration space says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub status: u16,
    pub max_virtqueue_pairs: u16,
    pub mtu: u16,
}

impl NetConfig {
    /// The bytes of `struct virtio_net_config`: speed and duplex unknown, no RSS.
    pub fn encode(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..6].copy_from_slice(&self.mac);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        // speed: SPEED_UNKNOWN (-1); duplex: DUPLEX_UNKNOWN (0xff).
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        b[16] = 0xff;
        b
    }
}

/// A stable, locally administered unicast MAC for the host's end, derived from the device name
/// (FNV-1a), so a restarted daemon shows the host the same address.
pub fn mac_for(name: &str) -> [u8; 6] {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x02 | (b[0] & 0xfc), b[1], b[2], b[3], b[4], b[5]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let c = NetConfig {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            status: STATUS_LINK_UP,
            max_virtqueue_pairs: 1,
            mtu: 65520,
        };
        let b = c.encode();
        assert_eq!(&b[..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), 1);
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), 1);
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), 65520);
        assert_eq!(b[16], 0xff);
    }

    #[test]
    fn derived_mac_is_local_unicast_and_stable() {
        let m = mac_for("card0");
        assert_eq!(m[0] & 0x03, 0x02);
        assert_eq!(m, mac_for("card0"));
        assert_ne!(m, mac_for("card1"));
    }
}
