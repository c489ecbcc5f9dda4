//! `xtask card-guest ...`: what the card-os scenarios run inside the VM
//! (the e2e initramfs carries this binary as /bin/e2e-helper).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rig::nsnet::pmtu_discovery;

#[derive(clap::Subcommand)]
pub enum Helper {
    /// Send one UDP datagram of SIZE bytes (the test pattern) to ADDR:PORT.
    /// With --df the kernel sets Don't Fragment and the helper then waits
    /// for the path MTU to drop (an ICMP frag-needed came back) and prints
    /// it; without, DF is clear and routers may fragment.
    UdpSend {
        addr: Ipv4Addr,
        port: u16,
        size: usize,
        #[arg(long)]
        df: bool,
    },
}

pub fn helper(cmd: &Helper) -> Result<()> {
    let Helper::UdpSend {
        addr,
        port,
        size,
        df,
    } = cmd;
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    sock.connect(SocketAddrV4::new(*addr, *port))?;
    pmtu_discovery(
        &sock,
        if *df {
            libc::IP_PMTUDISC_DO
        } else {
            libc::IP_PMTUDISC_DONT
        },
    )?;
    let data = crate::guest::pattern(*size);
    let before = ip_mtu(&sock)?;
    let sent = sock.send(&data).context("send")?;
    println!("sent={sent}");
    println!("mtu_before={before}");
    if *df {
        // The card answers with frag-needed; the kernel lowers the route's
        // MTU, which IP_MTU on the connected socket shows.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut mtu = before;
        while mtu >= before && Instant::now() < deadline {
            sleep(Duration::from_millis(50));
            mtu = ip_mtu(&sock)?;
        }
        println!("mtu_after={mtu}");
        let again = sock.send(&data);
        println!(
            "resend={}",
            match again {
                Ok(n) => format!("sent {n}"),
                Err(e) => format!("{e}"),
            }
        );
    }
    if sent != *size {
        bail!("sent {sent} of {size} bytes");
    }
    Ok(())
}

/// The path MTU the kernel has for a connected socket (IP_MTU).
fn ip_mtu(sock: &UdpSocket) -> Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on an open socket into a c_int we own, with its
    // size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("IP_MTU");
    }
    Ok(value)
}
