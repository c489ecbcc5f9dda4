//! The announcement after a live migration: the frame that tells the card's network where the
//! guest now lives. Pure packet logic.
//!
//! QEMU asks a vhost-user backend for it with `VHOST_USER_SEND_RARP` when the guest's driver
//! cannot announce itself (no VIRTIO_NET_F_GUEST_ANNOUNCE). Like QEMU's own announcement, it is
//! a RARP "reverse request" (RFC 903, operation 3) from the guest's MAC address to everyone:
//! switches and bridges learn the port behind which that address now lives.

use etherparse::{ArpHardwareId, ArpOperation, ArpPacket, EtherType, Ethernet2Header};

/// EtherType of RARP.
pub const ETH_P_RARP: u16 = 0x8035;
/// RARP operation "reverse request".
const RARP_REVERSE_REQUEST: u16 = 3;
/// The frame, padded to Ethernet's minimum (without FCS).
pub const RARP_FRAME_LEN: usize = 60;

/// The announcement frame for `mac`.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; RARP_FRAME_LEN] {
    let mut frame = [0u8; RARP_FRAME_LEN];
    let eth = Ethernet2Header {
        source: mac,
        destination: [0xff; 6],
        ether_type: EtherType(ETH_P_RARP),
    };
    frame[..Ethernet2Header::LEN].copy_from_slice(&eth.to_bytes());
    // Sender and target hardware addresses are the guest's; no protocol addresses yet.
    if let Ok(arp) = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation(RARP_REVERSE_REQUEST),
        &mac,
        &[0; 4],
        &mac,
        &[0; 4],
    ) {
        let body = arp.to_bytes();
        frame[Ethernet2Header::LEN..Ethernet2Header::LEN + body.len()].copy_from_slice(&body);
    }
    frame
}

/// The guest MAC address in a `VHOST_USER_SEND_RARP` body (its first 6 bytes).
pub fn rarp_mac(body: &[u8]) -> Option<[u8; 6]> {
    let mac: [u8; 6] = body.get(..6)?.try_into().ok()?;
    // A multicast or all-zero source address teaches a bridge nothing.
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_is_what_qemu_sends() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = rarp_frame(mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        // htype 1, ptype IPv4, hlen 6, plen 4, op 3.
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac);
        assert!(f[38..].iter().all(|&b| b == 0));
    }

    #[test]
    fn rarp_mac_is_checked() {
        assert_eq!(
            rarp_mac(&[0x52, 0x54, 0, 1, 2, 3, 0, 0]),
            Some([0x52, 0x54, 0, 1, 2, 3])
        );
        assert_eq!(rarp_mac(&[1, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(rarp_mac(&[0; 8]), None);
        assert_eq!(rarp_mac(&[0x52, 0x54]), None);
    }
}
