//! Frame and vnet-header handling: TX header checks, RX header decisions, checksum
//! verification and completion, and the IP-only link's classification of host frames (ARP and
//! ND answers) and Ethernet headers, on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_card::csum;
use vhost_card::link::{self, IpLink, TxClass};
use vhost_card::features::Negotiated;
use vhost_card::vnet::{self, VnetHdr, HDR_MAX};

fuzz_target!(|data: &[u8]| {
    if data.len() < HDR_MAX + 10 {
        return;
    }
    let (head, frame) = data.split_at(HDR_MAX + 10);
    let mut raw = [0u8; HDR_MAX];
    raw.copy_from_slice(&head[..HDR_MAX]);
    // Eight bytes choose the negotiated feature word, two the MTU.
    let word = u64::from_le_bytes(head[HDR_MAX..HDR_MAX + 8].try_into().unwrap());
    let mtu = usize::from(u16::from_le_bytes([head[HDR_MAX + 8], head[HDR_MAX + 9]])).max(68);
    let neg = Negotiated::from_word(word);
    let hdr = VnetHdr::decode(&raw);

    if let Ok(out) = vnet::check_tx(&hdr, frame.len(), mtu, &neg) {
        // What reaches the kernel is always self-consistent.
        if out.flags & vnet::F_NEEDS_CSUM != 0 {
            let end = usize::from(out.csum_start) + usize::from(out.csum_offset) + 2;
            assert!(end <= frame.len() && usize::from(out.csum_start) >= vnet::ETH_HLEN);
            let mut f = frame.to_vec();
            csum::complete(&mut f, out.csum_start.into(), out.csum_offset.into()).unwrap();
        }
        assert_eq!(out.flags & vnet::F_DATA_VALID, 0);
        assert_eq!(out.num_buffers, 0);
        if out.gso_type != vnet::GSO_NONE {
            assert!(out.gso_size > 0 && usize::from(out.gso_size) < frame.len());
            assert!(frame.len() <= vnet::GSO_MAX_FRAME);
        } else {
            assert!(frame.len() <= mtu + vnet::ETH_HLEN + vnet::VLAN_HLEN);
        }
    }
    let mut rx = hdr;
    let mode = [vnet::RxCsum::Verify, vnet::RxCsum::Complete, vnet::RxCsum::Passthrough][(word % 3) as usize];
    let action = vnet::rx_action(&mut rx, &neg, mode);
    if !neg.guest_csum && action != vnet::RxAction::DropGso {
        // A host without GUEST_CSUM only ever sees empty flags.
        assert_eq!(rx.flags, 0);
    }
    let _ = csum::verify(frame);
    let mut f = frame.to_vec();
    let _ = csum::complete(&mut f, usize::from(hdr.csum_start), usize::from(hdr.csum_offset));

    // The IP-only link: whatever the host sends, an answer is a well-formed ARP reply or
    // neighbour advertisement from the card's MAC, within the reply buffer.
    let ip_link = IpLink::new([2, 0xca, 0, 0, 0, 1]);
    let mut reply = [0u8; link::REPLY_MAX];
    let peek = &frame[..frame.len().min(link::PEEK)];
    if let TxClass::Reply(_, n) = ip_link.classify_tx(peek, frame.len(), &mut reply) {
        assert!(n <= link::REPLY_MAX && n >= 42);
        assert_eq!(reply[6..12], [2, 0xca, 0, 0, 0, 1]);
        assert_ne!(csum::verify(&reply[..n]), csum::Verdict::Invalid);
    }
    let _ = ip_link.eth_header(frame);
});
