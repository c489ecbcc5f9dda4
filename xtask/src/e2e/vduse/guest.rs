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
