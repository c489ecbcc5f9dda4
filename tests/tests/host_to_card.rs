//! Host to card (TX queue): partial checksums the card must complete, and a TSO frame the card's
//! kernel must take.

use std::io::Read;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use card_tests::card::*;
use card_tests::netdev::TxLayout;
use card_tests::packet::*;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// UDP with NEEDS_CSUM, checksum field holding only the pseudo-header sum, forwarded by the card
/// to the peer through a veth with TX checksum offload off: the peer's UDP socket only gets the
/// datagram if the checksum was completed on the way.
#[test]
fn partial_udp_checksums_are_completed() -> Result<()> {
    let card = Card::start_with_peer(&[])?;
    let mut dev = card.driver()?;
    let port = 7100;
    let sock = card.peer()?.udp_socket(SocketAddrV4::new(PEER_IP, port))?;
    let layouts = [
        TxLayout::Combined,
        TxLayout::Split,
        // Header cut in the middle, frame in three pieces.
        TxLayout::Pieces(vec![5, 7, 20, 31]),
        TxLayout::Indirect(vec![12, 14, 100]),
    ];
    let mut sent = 0u64;
    for (i, layout) in layouts.iter().enumerate() {
        for len in [1, 333, 1472] {
            let seed = (i * 10 + len % 7) as u8;
            let payload = pattern(len, seed);
            let mut frame = card.frame_to(SocketAddrV4::new(PEER_IP, port), 41000, &payload)?;
            let hdr = make_partial(&mut frame)?;
            dev.send_wait(&hdr, &frame, layout)?;
            sent += 1;
            let mut buf = [0u8; 2048];
            let n = sock.recv(&mut buf).with_context(|| {
                format!("{layout:?}, {len}-byte payload: nothing reached the peer (checksum not completed?)")
            })?;
            ensure!(
                buf[..n] == payload[..],
                "{layout:?}, {len} bytes: payload differs"
            );
        }
    }

    // Control: the same frame without NEEDS_CSUM is dropped by the peer's stack, so the
    // deliveries above really needed the card to complete the checksum.
    let payload = pattern(100, 99);
    let mut frame = card.frame_to(SocketAddrV4::new(PEER_IP, port), 41000, &payload)?;
    make_partial(&mut frame)?;
    dev.send_wait(&VnetHdr::default(), &frame, &TxLayout::Split)?;
    sock.set_read_timeout(Some(Duration::from_millis(700)))?;
    let mut buf = [0u8; 2048];
    if let Ok(n) = sock.recv(&mut buf) {
        bail!("a frame with a bad checksum and no NEEDS_CSUM reached the peer ({n} bytes): the set-up proves nothing");
    }
    sent += 1;

    let mut d = card.daemon;
    let c = d.wait_counters(Duration::from_secs(4), "all TX frames", |c| {
        c.get("tx_frames") == sent
    })?;
    ensure!(c.get("tx_drop_bad_vnet_hdr") == 0, "{c:?}");
    Ok(())
}

/// Parses a TCP segment from the card to the host.
struct Seg {
    seq: u32,
    ack: u32,
    syn: bool,
    ack_flag: bool,
    window: u16,
}

fn tcp_from_card(frame: &[u8], sport: u16, dport: u16) -> Option<Seg> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(t))) = (&p.net, &p.transport) else {
        return None;
    };
    if ip.header().source_addr() != CARD_IP
        || t.source_port() != sport
        || t.destination_port() != dport
    {
        return None;
    }
    Some(Seg {
        seq: t.sequence_number(),
        ack: t.acknowledgment_number(),
        syn: t.syn(),
        ack_flag: t.ack(),
        window: t.window_size(),
    })
}

/// A TCP handshake driven from the driver, then one TSO frame (gso_type TCPV4, gso_size 1448,
/// about 60 KB) that a listener on the card must read in full.
#[test]
fn tso_frame_reaches_a_tcp_listener() -> Result<()> {
    let card = Card::start(&[])?;
    let mut dev = card.driver()?;
    let (lport, hport) = (5001u16, 40123u16);
    let listener = card.ns.tcp_listener(SocketAddrV4::new(CARD_IP, lport))?;
    let host = SocketAddrV4::new(HOST_IP, hport);
    let cardaddr = SocketAddrV4::new(CARD_IP, lport);
    let isn = 0x1000_0000u32;

    let syn = tcp_frame(
        HOST_MAC,
        card.mac,
        host,
        cardaddr,
        Tcp {
            seq: isn,
            syn: true,
            window: 65535,
            mss: Some(1460),
            ..Tcp::default()
        },
        &[],
    )?;
    dev.send_wait(&VnetHdr::default(), &syn, &TxLayout::Split)?;
    let synack = dev.recv_matching(Duration::from_secs(5), |f| {
        tcp_from_card(&f.frame, lport, hport).is_some_and(|s| s.syn && s.ack_flag)
    })?;
    let s = tcp_from_card(&synack.frame, lport, hport).expect("matched above");
    ensure!(s.ack == isn.wrapping_add(1), "SYN-ACK acks {}", s.ack);

    let ack = tcp_frame(
        HOST_MAC,
        card.mac,
        host,
        cardaddr,
        Tcp {
            seq: isn.wrapping_add(1),
            ack: Some(s.seq.wrapping_add(1)),
            window: 65535,
            ..Tcp::default()
        },
        &[],
    )?;
    dev.send_wait(&VnetHdr::default(), &ack, &TxLayout::Split)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("the handshake did not complete on the card"),
        }
    };

    // One GSO frame, no larger than the window the card advertised.
    let mss = 1448usize;
    let len = (41 * mss).min(usize::from(s.window) / mss * mss);
    ensure!(
        len > 20 * mss,
        "card advertised a window of only {}",
        s.window
    );
    let payload = pattern(len, 7);
    let mut frame = tcp_frame(
        HOST_MAC,
        card.mac,
        host,
        cardaddr,
        Tcp {
            seq: isn.wrapping_add(1),
            ack: Some(s.seq.wrapping_add(1)),
            psh: true,
            window: 65535,
            ..Tcp::default()
        },
        &payload,
    )?;
    let mut hdr = make_partial(&mut frame)?;
    hdr.gso_type = GSO_TCPV4;
    hdr.gso_size = mss as u16;
    hdr.hdr_len = (ETH_HLEN + 20 + 20) as u16;
    dev.send_wait(&hdr, &frame, &TxLayout::Pieces(vec![12, 54, 30000]))?;

    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut got = vec![0u8; len];
    conn.read_exact(&mut got)
        .with_context(|| format!("the listener did not get all {len} bytes"))?;
    ensure!(got == payload, "TSO payload corrupted");

    // The card acknowledges all of it.
    let want = isn.wrapping_add(1).wrapping_add(len as u32);
    dev.recv_matching(Duration::from_secs(5), |f| {
        tcp_from_card(&f.frame, lport, hport).is_some_and(|s| s.ack_flag && s.ack == want)
    })
    .context("no ACK for the TSO frame")?;

    let mut d = card.daemon;
    let c = d.wait_counters(Duration::from_secs(4), "3 TX frames", |c| {
        c.get("tx_frames") == 3
    })?;
    ensure!(
        c.get("tx_bytes") == (syn.len() + ack.len() + frame.len()) as u64,
        "tx_bytes {c:?}"
    );
    Ok(())
}
