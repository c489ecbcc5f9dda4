//! What runs inside the bare-metal host VM (as `e2e-helper guest ...`): the VDUSE feature probe,
//! a TCP sink, a UDP counter and raw UDP frames with right or wrong checksums.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Guest helper: which feature bits the kernel's VDUSE refuses on top of the card's default
/// offer, and which of the offer it requires (each tried with VDUSE_CREATE_DEV).
pub fn probe_features() -> Result<()> {
    use vhost_card::vduse::{device, netcfg, uapi};
    let control = device::open_control()?;
    let base = vhost_card::vduse::offer(vhost_card::features::default_features());
    let config = netcfg::NetConfig {
        mac: [2, 0, 0, 0, 0, 1],
        status: netcfg::STATUS_LINK_UP,
        max_virtqueue_pairs: 1,
        mtu: 1500,
    }
    .encode();
    let try_create = |features: u64| -> bool {
        let name = format!("probe{}", std::process::id());
        let cfg = uapi::DevConfig {
            name: uapi::name_bytes(&name),
            vendor_id: 0,
            device_id: 1,
            features,
            vq_num: 2,
            vq_align: 4096,
            reserved: [0; 13],
            config_size: 0,
        };
        let ok = uapi::create_dev(&control, &cfg, &config).is_ok();
        if ok {
            let _ = uapi::destroy_dev(&control, &name);
        }
        ok
    };
    if !try_create(base) {
        bail!("the kernel refuses the card's own offer {base:#x}");
    }
    let refused: Vec<String> = (0..64)
        .filter(|b| base & 1u64 << b == 0 && !try_create(base | 1u64 << b))
        .map(|b| format!("{b}:{}", crate::features::name(b)))
        .collect();
    let required: Vec<String> = (0..64)
        .filter(|b| base & 1u64 << b != 0 && !try_create(base & !(1u64 << b)))
        .map(|b| format!("{b}:{}", crate::features::name(b)))
        .collect();
    println!("refused={}", refused.join(","));
    println!("required={}", required.join(","));
    Ok(())
}

/// Guest helper: one TCP connection on `port`, copied to standard output.
pub fn tcp_sink(port: u16, ready: &Path) -> Result<()> {
    let listener = std::net::TcpListener::bind(std::net::SocketAddrV6::new(
        std::net::Ipv6Addr::UNSPECIFIED,
        port,
        0,
        0,
    ))
    .or_else(|_| {
        std::net::TcpListener::bind(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::UNSPECIFIED,
            port,
        ))
    })?;
    std::fs::write(ready, b"")?;
    let (mut conn, _) = listener.accept()?;
    let stdout = std::io::stdout();
    std::io::copy(&mut conn, &mut stdout.lock())?;
    Ok(())
}

/// Guest helper: counts the datagrams arriving on `port` until `quiet` passes without one.
pub fn udp_count(port: u16, ready: &Path, quiet: Duration) -> Result<()> {
    let sock = std::net::UdpSocket::bind(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::UNSPECIFIED,
        port,
    ))?;
    sock.set_read_timeout(Some(quiet))?;
    std::fs::write(ready, b"")?;
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while sock.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    println!("received={n}");
    Ok(())
}

/// Guest helper: `count` UDP datagrams as raw frames on `dev`, with a wrong UDP checksum when
/// `bad` (the IP header stays right, so only the UDP check can catch them).
pub fn udp_frames(
    dev: &str,
    dst_mac: &str,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    port: u16,
    count: u32,
    bad: bool,
) -> Result<()> {
    let mac = |s: &str| -> Result<[u8; 6]> {
        let v: Vec<u8> = s
            .trim()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16))
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad MAC {s}"))?;
        v.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s}"))
    };
    let src_mac = mac(&std::fs::read_to_string(format!(
        "/sys/class/net/{dev}/address"
    ))?)?;
    let dst_mac = mac(dst_mac)?;
    let payload = b"vhost-card checksum honesty";
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(40000, port)
        .write(&mut frame, payload)
        .context("building the frame")?;
    if bad {
        // Ethernet 14 + IPv4 20, then the UDP checksum at offset 6; never 0 (which means "no
        // checksum" over IPv4).
        let at = 14 + 20 + 6;
        let wrong = (u16::from_be_bytes([frame[at], frame[at + 1]]) ^ 0x5a5a).max(1);
        frame[at..at + 2].copy_from_slice(&wrong.to_be_bytes());
    }
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {dev}");
    }
    // SAFETY: plain socket(2); the result is checked and closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = i32::try_from(ifindex)?;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst_mac);
    let mut result = Ok(());
    for _ in 0..count {
        // SAFETY: sends `frame` (valid for its length) to the address above, both outliving the
        // call.
        let n = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            result = Err(anyhow::anyhow!(
                "sendto: {}",
                std::io::Error::last_os_error()
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: closes the socket opened above.
    unsafe { libc::close(fd) };
    result
}

/// Guest helper: a vhost-vdpa frontend on `dev` (the card bound to `vhost_vdpa`), as a VMM would
/// be: guest memory in a memfd mapped into the device's IOTLB (the daemon hears
/// `VDUSE_UPDATE_IOTLB` and maps it), one RX and one TX ring, one UDP datagram each way, the
/// rings' bases read back (`VHOST_GET_VRING_BASE`, which the kernel asks the daemon with
/// `VDUSE_GET_VQ_STATE`), then a reset. `send_cmd` makes the card send the frame to receive.
pub fn vdpa_frontend(dev: &str, card_mac: &str, send_cmd: &str) -> Result<()> {
    use card_tests::vring::{Buf, GuestMem, Vq, GUEST_BASE};
    use vhost::vdpa::VhostVdpa;
    use vhost::vhost_kern::vdpa::VhostKernVdpa;
    use vhost::vhost_kern::vhost_binding::VHOST_BACKEND_F_IOTLB_MSG_V2;
    use vhost::vhost_kern::VhostKernFeatures;
    use vhost::{VhostBackend, VringConfigData};
    use vm_memory::{Bytes, GuestAddress};

    const ACK: u8 = 1;
    const DRIVER: u8 = 2;
    const DRIVER_OK: u8 = 4;
    const FEATURES_OK: u8 = 8;
    const SIZE: usize = 4 << 20;
    const HDR: usize = 12;
    let err = |what: &'static str| move |e: vhost::Error| anyhow::anyhow!("{what}: {e}");

    let mut gm = GuestMem::new(SIZE)?;
    let mut rx = Vq::new(&mut gm, 256)?;
    let mut tx = Vq::new(&mut gm, 256)?;
    let mut vdpa = VhostKernVdpa::new(dev, std::sync::Arc::new(gm.mem.clone()))
        .map_err(err("opening the vhost-vdpa device"))?;
    vdpa.set_owner().map_err(err("VHOST_SET_OWNER"))?;
    let backend = vdpa
        .get_backend_features()
        .map_err(err("VHOST_GET_BACKEND_FEATURES"))?;
    vdpa.set_backend_features(backend & (1 << VHOST_BACKEND_F_IOTLB_MSG_V2))
        .map_err(err("VHOST_SET_BACKEND_FEATURES"))?;
    let features = vdpa.get_features().map_err(err("VHOST_GET_FEATURES"))?;
    vdpa.set_status(ACK | DRIVER)
        .map_err(err("status DRIVER"))?;
    vdpa.set_features(features)
        .map_err(err("VHOST_SET_FEATURES"))?;
    vdpa.set_status(ACK | DRIVER | FEATURES_OK)
        .map_err(err("status FEATURES_OK"))?;
    let status = vdpa.get_status().map_err(err("status"))?;
    if status & FEATURES_OK == 0 {
        bail!("the device refused the features {features:#x}");
    }
    // Guest memory at IOVA GUEST_BASE, as a VMM maps guest RAM: the daemon gets
    // VDUSE_UPDATE_IOTLB and maps the same memfd.
    let host = gm.host_addr(GuestAddress(GUEST_BASE))? as *const u8;
    vdpa.dma_map(GUEST_BASE, SIZE as u64, host, false)
        .map_err(err("IOTLB update"))?;
    for (q, vq) in [(0usize, &rx), (1, &tx)] {
        let cfg = VringConfigData {
            queue_max_size: vq.size,
            queue_size: vq.size,
            flags: 0,
            desc_table_addr: vq.desc.0,
            used_ring_addr: vq.used.0,
            avail_ring_addr: vq.avail.0,
            log_addr: None,
        };
        vdpa.set_vring_num(q, vq.size)
            .map_err(err("VHOST_SET_VRING_NUM"))?;
        vdpa.set_vring_addr(q, &cfg)
            .map_err(err("VHOST_SET_VRING_ADDR"))?;
        vdpa.set_vring_base(q, 0)
            .map_err(err("VHOST_SET_VRING_BASE"))?;
        vdpa.set_vring_kick(q, &vq.kick)
            .map_err(err("VHOST_SET_VRING_KICK"))?;
        vdpa.set_vring_call(q, &vq.call)
            .map_err(err("VHOST_SET_VRING_CALL"))?;
        vdpa.set_vring_enable(q, true)
            .map_err(err("VHOST_VDPA_SET_VRING_ENABLE"))?;
    }
    vdpa.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
        .map_err(err("status DRIVER_OK"))?;

    // TX: one datagram to the card, a zero vnet header in front.
    let parse_mac = |s: &str| -> Result<[u8; 6]> {
        let v: Vec<u8> = s
            .split(':')
            .map(|b| u8::from_str_radix(b, 16))
            .collect::<Result<_, _>>()?;
        v.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s}"))
    };
    let own_mac = [0x02, 0, 0, 0, 0x0d, 0x0a];
    let mut frame = vec![0u8; HDR];
    etherparse::PacketBuilder::ethernet2(own_mac, parse_mac(card_mac)?)
        .ipv4([10, 77, 0, 9], [10, 77, 0, 1], 64)
        .udp(7000, 7000)
        .write(&mut frame, b"from a vhost-vdpa frontend")?;
    let at = gm.scratch(frame.len())?;
    gm.mem.write_slice(&frame, at)?;
    let len = u32::try_from(frame.len())?;
    tx.add(
        &gm,
        &[Buf {
            addr: at,
            len,
            write: false,
        }],
    )?;
    tx.kick()?;
    let (_, _) = tx
        .wait_used(&gm, Duration::from_secs(10))
        .context("TX used")?;
    println!("tx_used=1");

    // RX: buffers, then the card sends a frame to this frontend's MAC (its stack may send
    // others first: IPv6 neighbour discovery, MLD).
    let mut bufs = std::collections::BTreeMap::new();
    for _ in 0..16 {
        let buf = gm.alloc(2048, 64)?;
        let head = rx.add(
            &gm,
            &[Buf {
                addr: buf,
                len: 2048,
                write: true,
            }],
        )?;
        bufs.insert(head, buf);
    }
    rx.kick()?;
    let sent = std::process::Command::new("sh")
        .args(["-c", &send_cmd.replace("MAC", "02:00:00:00:0d:0a")])
        .status()?;
    if !sent.success() {
        bail!("`{send_cmd}` failed ({sent})");
    }
    let needle = b"vhost-card checksum honesty";
    let mut rx_used = 0u32;
    let mut payload_ok = false;
    while !payload_ok && rx_used < 16 {
        let (head, used) = rx
            .wait_used(&gm, Duration::from_secs(10))
            .context("RX used")?;
        rx_used += 1;
        let buf = *bufs.get(&head).context("RX used an unknown head")?;
        let got = gm.read(buf, used as usize)?;
        payload_ok = got.windows(needle.len()).any(|w| w == needle);
        if payload_ok {
            println!("rx_len={used}");
        }
    }
    println!("rx_used={rx_used}");
    println!("rx_payload_ok={}", u8::from(payload_ok));
    // The kernel asks the daemon (VDUSE_GET_VQ_STATE) where each ring stands.
    println!(
        "base_rx={}",
        vdpa.get_vring_base(0)
            .map_err(err("VHOST_GET_VRING_BASE"))?
    );
    println!(
        "base_tx={}",
        vdpa.get_vring_base(1)
            .map_err(err("VHOST_GET_VRING_BASE"))?
    );
    println!("features={features:#x}");
    vdpa.set_status(0).map_err(err("reset"))?;
    Ok(())
}
